/** Shared helpers of CLI commands: repository opening, signals, output. */
import type { Command } from 'commander';
import { BkfsError } from '../errors';
import { defaultRepoPath, Repository, type OpenOptions } from '../repo/repository';
import { ProgressBar } from './progress';

export function repoPath(cmd: Command): string {
  const opts = cmd.optsWithGlobals<{ repo?: string }>();
  return opts.repo ?? defaultRepoPath();
}

/**
 * Open the repository, run `fn`, always close. Readers pass `{ readOnly: true }`: they then work
 * on a repository this user may read but not write.
 */
export async function withRepo<T>(
  cmd: Command,
  fn: (repo: Repository) => Promise<T> | T,
  opts: OpenOptions = {},
): Promise<T> {
  const repo = Repository.open(repoPath(cmd), opts);
  try {
    return await fn(repo);
  } finally {
    repo.close();
  }
}

/** `withRepo` for commands that only read: works on a repository this user may not write. */
export function withReader<T>(cmd: Command, fn: (repo: Repository) => Promise<T> | T): Promise<T> {
  return withRepo(cmd, fn, { readOnly: true });
}

/**
 * An AbortSignal fired by SIGINT/SIGTERM so long commands clean up (stop qemu-nbd, roll back)
 * before exiting; a second signal exits at once.
 */
export function interruptSignal(): { signal: AbortSignal; dispose: () => void } {
  const ac = new AbortController();
  const handler = (sig: NodeJS.Signals) => {
    if (ac.signal.aborted) process.exit(130);
    process.stderr.write(`\nbkfs: ${sig} received, stopping cleanly (again to force)\n`);
    ac.abort(new BkfsError('INTERRUPTED', `interrupted by ${sig}`));
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return {
    signal: ac.signal,
    dispose: () => {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    },
  };
}

export function out(line = ''): void {
  process.stdout.write(`${line}\n`);
}

export function note(line: string): void {
  process.stderr.write(`bkfs: ${line}\n`);
}

export function parseIntOption(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0)
    throw new BkfsError('USAGE', `${name} must be a whole number, got '${v}'`);
  return n;
}

/** Render rows as an aligned text table. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const fmt = (r: string[]) =>
    r
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  return [fmt(header), ...rows.map(fmt)].join('\n');
}

/** What a long-running command hands to core code: cancellation and progress/notice callbacks. */
export interface LongJob {
  signal: AbortSignal;
  onProgress: (p: { done: number; total: number }) => void;
  onNotice: (msg: string) => void;
}

/**
 * Run a long job (backup, restore, export) with a progress bar on a terminal and SIGINT/SIGTERM
 * turned into an abort; the bar is cleared before the caller prints its summary.
 */
export async function withLongJob<T>(label: string, fn: (job: LongJob) => Promise<T>): Promise<T> {
  const bar = new ProgressBar(label);
  const intr = interruptSignal();
  try {
    return await fn({
      signal: intr.signal,
      onProgress: (p) => bar.update(p.done, p.total),
      onNotice: (m) => {
        bar.done();
        note(m);
      },
    });
  } finally {
    bar.done();
    intr.dispose();
  }
}
