/** Shared helpers of CLI commands: repository opening, signals, output. */
import type { Command } from 'commander';
import { BkfsError } from '../errors';
import { defaultRepoPath } from '../repo/default-path';
import type { OpenOptions, Repository } from '../repo/repository';
import { ProgressBar, setProgressQuiet } from './progress';
import { duration, parseDuration } from '../util/format';

export type Verbosity = 'quiet' | 'normal' | 'verbose';
let level: Verbosity = 'normal';

/** Set by the global -q / -v before every action. */
export function setVerbosity(v: Verbosity): void {
  level = v;
  setProgressQuiet(v === 'quiet');
}

export function verbosity(): Verbosity {
  return level;
}

export function repoPath(cmd: Command): string {
  const opts = cmd.optsWithGlobals<{ repo?: string }>();
  return opts.repo ?? defaultRepoPath();
}

/**
 * Open the repository, run `fn`, always close. Readers pass `{ readOnly: true }` (`withReader`):
 * they then work on a repository this user may read but not write.
 */
export async function withRepo<T>(
  cmd: Command,
  fn: (repo: Repository) => Promise<T> | T,
  opts: OpenOptions = {},
): Promise<T> {
  // Loaded on demand: the index and pack modules (SQLite, zstd) are not needed for --help.
  const { Repository } = await import('../repo/repository');
  const dir = repoPath(cmd);
  if (level === 'verbose') note(`repository ${dir}`);
  const repo = Repository.open(dir, opts);
  try {
    const r = await fn(repo);
    if (!opts.readOnly && repo.remote) {
      // Object storage: manifests written by this command go to the bucket (after its commits).
      const { publishManifests } = await import('../repo/manifest');
      await publishManifests(repo);
    }
    return r;
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

/** A note for people on stderr (silenced by -q). */
export function note(line: string): void {
  if (level === 'quiet') return;
  process.stderr.write(`bkfs: ${line}\n`);
}

/** A detail printed only with -v. */
export function detail(line: string): void {
  if (level === 'verbose') process.stderr.write(`bkfs: ${line}\n`);
}

/**
 * Run `fn`, which takes the repository's writer lock; with the global `--retry-lock DURATION`, a
 * REPO_LOCKED failure is retried (the whole call: lock holders take the lock before changing
 * anything) until DURATION has passed, then the last REPO_LOCKED is thrown. Works on the error code
 * only, so it does not depend on how the lock is implemented.
 */
export async function retryLocked<T>(cmd: Command, fn: () => Promise<T> | T): Promise<T> {
  const spec = cmd.optsWithGlobals<{ retryLock?: string }>().retryLock;
  const waitMs = spec === undefined ? 0 : parseDuration(spec);
  if (waitMs === undefined) {
    throw new BkfsError('USAGE', `--retry-lock takes a duration such as 30s, 5m or 1h, got '${spec}'`);
  }
  const deadline = Date.now() + waitMs;
  let delay = 250;
  let told = false;
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      if (!(e instanceof BkfsError) || e.code !== 'REPO_LOCKED' || Date.now() >= deadline) throw e;
      if (!told) note(`${e.message}; waiting up to ${duration(deadline - Date.now())} (--retry-lock)`);
      told = true;
      await new Promise((r) => setTimeout(r, Math.min(delay, Math.max(0, deadline - Date.now()))));
      delay = Math.min(delay * 2, 5000);
    }
  }
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
