import type { Command } from 'commander';

/** Commands of later milestones register here (mount, restore, ...). */
export function registerOptional(_program: Command): void {}
