/**
 * Pure decisions of `bkfs run`: which domains of a host a job selects (names, globs, `all`,
 * excludes), which level each backup gets (the job's level policy over the VM's history), and
 * the order/limits of the run (`Scheduler`). No I/O, no clock (callers pass `now`).
 */
import picomatch from 'picomatch';
import type { LevelPolicy } from './jobfile';

/** True when `pattern` is a glob rather than a plain domain name. */
export function isGlob(pattern: string): boolean {
  return pattern === 'all' || picomatch.scan(pattern).isGlob;
}

function matcher(patterns: readonly string[]): (name: string) => boolean {
  const globs = patterns.filter(isGlob).map((p) => (p === 'all' ? '*' : p));
  const names = new Set(patterns.filter((p) => !isGlob(p)));
  const m = globs.length > 0 ? picomatch(globs, { dot: true }) : () => false;
  return (n) => names.has(n) || m(n);
}

export interface Selection {
  /** Selected domains, in the host's order (as `virsh list --all --name` gives them). */
  domains: string[];
  /** Plain names (not globs) the job asks for that the host does not have. */
  missing: string[];
}

/**
 * The domains of a host that `include` selects and `exclude` does not. A plain name not on the
 * host is `missing` (its backup fails) unless it is also excluded; a glob that matches nothing is
 * not an error.
 */
export function selectDomains(
  available: readonly string[],
  include: readonly string[],
  exclude: readonly string[] = [],
): Selection {
  const inc = matcher(include);
  const exc = matcher(exclude);
  const have = new Set(available);
  const domains = [...new Set(available)].filter((d) => inc(d) && !exc(d));
  const missing = include.filter((p) => !isGlob(p) && !have.has(p) && !exc(p));
  return { domains, missing: [...new Set(missing)] };
}

/** The parts of a checkpoint that the level policy looks at. */
export interface HistoryItem {
  level: 'full' | 'inc' | 'diff' | 'copy';
  /** Checkpoint time, ms since the epoch. */
  time: number;
}

export interface LevelDecision {
  /** What `bkfs backup --level` gets. */
  level: 'full' | 'inc' | 'diff' | 'copy' | 'auto';
  /** What the run expects to happen, for the plan and the summary ('inc' for an auto inc). */
  expect: 'full' | 'inc' | 'diff' | 'copy';
  /** Why, in a few words. */
  reason: string;
}

/** Calendar days from `a` to `b` (local dates, or UTC with `utc`). */
export function calendarDays(a: number, b: number, utc = false): number {
  const day = (t: number) => {
    const d = new Date(t);
    return utc
      ? Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate())
      : Date.UTC(d.getFullYear(), d.getMonth(), d.getDate());
  };
  return Math.round((day(b) - day(a)) / 86_400_000);
}

/**
 * The level of the next backup of a VM whose complete checkpoints (oldest first) are `history`.
 *
 * Fixed modes give that level. `auto`: a full when the VM has no full yet, when the last full is
 * at least `fullEveryDays` calendar days old, or when the chain since it (the full and every inc
 * or diff after it; copies do not count) has `fullEveryBackups` backups; otherwise `between`.
 * An auto inc is passed as `--level auto`, so a chain libvirt can no longer extend (a bitmap
 * lost) falls back to a full instead of failing.
 */
export function decideLevel(
  history: readonly HistoryItem[],
  policy: LevelPolicy,
  now: number,
  utc = false,
): LevelDecision {
  if (policy.mode !== 'auto') return { level: policy.mode, expect: policy.mode, reason: 'fixed level' };
  const chain = history.filter((h) => h.level !== 'copy');
  let lastFull = -1;
  chain.forEach((h, i) => {
    if (h.level === 'full') lastFull = i;
  });
  if (lastFull < 0) return { level: 'full', expect: 'full', reason: 'no full yet' };
  const full = chain[lastFull]!;
  if (policy.fullEveryDays !== undefined) {
    const age = calendarDays(full.time, now, utc);
    if (age >= policy.fullEveryDays) {
      return { level: 'full', expect: 'full', reason: `last full ${age} day(s) ago` };
    }
  }
  const since = chain.length - lastFull; // the full and what follows it
  if (policy.fullEveryBackups !== undefined && since >= policy.fullEveryBackups) {
    return { level: 'full', expect: 'full', reason: `${since} backup(s) since the last full` };
  }
  return policy.between === 'diff'
    ? { level: 'diff', expect: 'diff', reason: 'since the last full' }
    : { level: 'auto', expect: 'inc', reason: 'since the last backup' };
}

/**
 * Start order of a run within two limits: at most `total` tasks at once, and at most
 * `perHost(host)` at once for each host. Tasks of one host start in the order given; hosts take
 * turns (the host with the fewest running tasks first), so one large host does not hold back the
 * others.
 */
export class Scheduler<T extends { host: string }> {
  private readonly queue: T[];
  private readonly running = new Map<string, number>();
  private active = 0;

  constructor(
    tasks: readonly T[],
    private readonly total: number,
    private readonly perHost: (host: string) => number,
  ) {
    if (!(total >= 1)) throw new RangeError('the overall limit must be at least 1');
    this.queue = [...tasks];
  }

  /** Tasks not started yet. */
  get pending(): number {
    return this.queue.length;
  }

  get runningCount(): number {
    return this.active;
  }

  runningOn(host: string): number {
    return this.running.get(host) ?? 0;
  }

  /** The next task that may start now (marked running), or undefined. */
  next(): T | undefined {
    if (this.active >= this.total) return undefined;
    let best = -1;
    for (let i = 0; i < this.queue.length; i++) {
      const h = this.queue[i]!.host;
      const n = this.runningOn(h);
      if (n >= Math.max(1, this.perHost(h))) continue;
      if (best < 0 || n < this.runningOn(this.queue[best]!.host)) best = i;
    }
    if (best < 0) return undefined;
    const [t] = this.queue.splice(best, 1);
    this.running.set(t!.host, this.runningOn(t!.host) + 1);
    this.active++;
    return t;
  }

  /** A started task has ended (whatever its result). */
  finish(t: T): void {
    const n = this.runningOn(t.host);
    if (n <= 0 || this.active <= 0) throw new Error(`finish of a task that is not running (${t.host})`);
    this.running.set(t.host, n - 1);
    this.active--;
  }

  get done(): boolean {
    return this.queue.length === 0 && this.active === 0;
  }
}
