/**
 * `bkfs run`: resolve a job's domains on its hosts, plan levels, run each VM's backup as a child
 * `bkfs backup ... --json` process (isolation: one VM's crash or hang is that VM's failure), in
 * parallel within the job's limits, then retention (`bkfs forget`), gc and the `[copy]` step
 * (`bkfs copy VM... --to`) as children too.
 *
 * Core module: it never prints. The CLI (`src/cli/commands/run.ts`) gets events through
 * `RunHooks` (progress display, the run's log file) and the result for the summary.
 *
 * Children wait for the repository lock (`--retry-lock`), so the run works whether backups may
 * write into one repository at once or take turns.
 */
import { spawn } from 'node:child_process';
import { keyHandoff } from '../crypto/keyring';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { BkfsError, errorMessage, type ErrorCode } from '../errors';
import { EXIT_CODES } from '../cli/exit-codes';
import { PROGRESS_JSON_PREFIX } from '../cli/progress';
import { Virsh } from '../backup/libvirt-virsh';
import type { HostSpec, JobSpec } from './jobfile';
import { retentionArgs } from './jobfile';
import type { RetentionPolicy } from '../repo/retention';
import { decideLevel, Scheduler, selectDomains, type HistoryItem, type LevelDecision } from './plan';

/** The bkfs executable the children run (this installation's). */
export const BKFS_BIN = path.resolve(__dirname, '../../../bin/bkfs');

/** Prefix of the progress lines a child writes on stderr with BKFS_PROGRESS=json. */
const PROGRESS_PREFIX = PROGRESS_JSON_PREFIX;

export interface VmError {
  /** The error code (`SOURCE_NOT_FOUND`, ...) or `CHILD_FAILED` when the child gave none. */
  code: string;
  /** The child's exit code, or null when no child ran. */
  exitCode: number | null;
  message: string;
}

export interface VmTask {
  host: string;
  uri: string;
  /** The domain (or, when the host could not be listed, the pattern that could not be resolved). */
  domain: string;
  /** VM name in the repository, null when there is none (unresolved pattern). */
  vm: string | null;
  decision: LevelDecision | null;
  /** Set when the task fails before any child runs (host unreachable, domain missing). */
  error: VmError | null;
  hostSpec: HostSpec;
}

export type VmOutcome = 'ok' | 'failed' | 'planned' | 'interrupted';

export interface VmResult {
  host: string;
  uri: string;
  domain: string;
  vm: string | null;
  plannedLevel: string | null;
  levelReason: string | null;
  /** The level the backup got (the child's report). */
  level: string | null;
  result: VmOutcome;
  checkpoint: string | null;
  started: number | null;
  finished: number | null;
  /** Wall time of the VM's child process (waiting for the lock included); 0 when none ran. */
  durationMs: number;
  /** The backup's own time (the child's report); 0 when it did not succeed. */
  backupMs: number;
  virtualSize: number | null;
  bytesRead: number | null;
  /** New data stored by this backup (compressed). */
  storedBytes: number | null;
  error: VmError | null;
}

export interface StepResult {
  ok: boolean;
  error: VmError | null;
}

export interface RetentionResult extends StepResult {
  vms: string[];
  removed: number;
  kept: number;
}

export interface GcResult extends StepResult {
  bytesFreed: number | null;
  report: unknown;
}

export interface CopyStepResult extends StepResult {
  to: string;
  vms: string[];
  copied: number;
  skipped: number;
  chunksTransferred: number;
  bytesTransferred: number;
}

export interface RunResult {
  job: string;
  repository: string;
  dryRun: boolean;
  started: number;
  finished: number;
  durationMs: number;
  vms: VmResult[];
  retention: RetentionResult | null;
  gc: GcResult | null;
  copy: CopyStepResult | null;
  succeeded: number;
  failed: number;
  interrupted: boolean;
}

export interface RunHooks {
  /** A line for the run's log. */
  log?: (line: string) => void;
  /** A VM's child has started (`argv` is its command line). */
  onStart?: (t: VmTask, argv: string[]) => void;
  onProgress?: (t: VmTask, done: number, total: number) => void;
  onEnd?: (r: VmResult) => void;
  /** A step after the backups (retention, gc) starts. */
  onStep?: (what: string) => void;
}

export interface RunOptions {
  dryRun?: boolean;
  signal?: AbortSignal;
  hooks?: RunHooks;
  /** Clock (tests). */
  now?: number;
  /** Environment of the children (default: this process's). */
  env?: NodeJS.ProcessEnv;
}

const NAME_BY_EXIT = new Map<number, ErrorCode>(
  Object.entries(EXIT_CODES).map(([k, v]) => [v, k as ErrorCode]),
);

/** Resolve every host's domains; a host that cannot be listed fails its entries. */
export async function resolveTasks(job: JobSpec, log: (l: string) => void = () => {}): Promise<VmTask[]> {
  const tasks: VmTask[] = [];
  const vmOwner = new Map<string, VmTask>();
  const lists = await Promise.all(
    job.hosts.map(async (h) => {
      try {
        const out = await new Virsh(h.uri).out(['list', '--all', '--name'], 60_000);
        return {
          h,
          names: out
            .split('\n')
            .map((l) => l.trim())
            .filter((l) => l !== ''),
        };
      } catch (e) {
        return { h, error: errorMessage(e) };
      }
    }),
  );
  for (const l of lists) {
    const h = l.h;
    const base = { host: h.name, uri: h.uri, hostSpec: h, decision: null };
    if ('error' in l) {
      log(`host ${h.name} (${h.uri}): cannot list domains: ${l.error}`);
      for (const p of h.domains) {
        tasks.push({
          ...base,
          domain: p,
          vm: null,
          error: {
            code: 'HOST_UNREACHABLE',
            exitCode: null,
            message: `host ${h.name} unreachable: ${l.error}`,
          },
        });
      }
      continue;
    }
    const sel = selectDomains(l.names, h.domains, h.exclude);
    log(
      `host ${h.name} (${h.uri}): ${l.names.length} domain(s), selected ${sel.domains.join(', ') || 'none'}`,
    );
    for (const d of sel.domains) {
      const vm = `${h.vmPrefix}${d}`;
      const t: VmTask = { ...base, domain: d, vm, error: null };
      const other = vmOwner.get(vm);
      if (other) {
        const msg = `VM name '${vm}' is selected on hosts ${other.host} and ${h.name} (give a host a vm-prefix)`;
        t.error = { code: 'JOB_CONFLICT', exitCode: null, message: msg };
        if (other.error === null) other.error = { ...t.error };
      } else vmOwner.set(vm, t);
      tasks.push(t);
    }
    for (const d of sel.missing) {
      tasks.push({
        ...base,
        domain: d,
        vm: `${h.vmPrefix}${d}`,
        error: {
          code: 'SOURCE_NOT_FOUND',
          exitCode: null,
          message: `host ${h.name} has no domain '${d}' (see 'virsh -c ${h.uri} list --all')`,
        },
      });
    }
  }
  return tasks;
}

/** Complete checkpoints of each VM, for the level policy (read-only; REPO_NOT_FOUND if none). */
export async function readHistory(repoDir: string, vms: string[]): Promise<Map<string, HistoryItem[]>> {
  const { Repository } = await import('../repo/repository');
  const { findVm, listCheckpoints } = await import('../index/catalog');
  const repo = Repository.open(repoDir, { readOnly: true });
  try {
    const out = new Map<string, HistoryItem[]>();
    for (const name of vms) {
      const vm = findVm(repo.db, name);
      out.set(
        name,
        vm ? listCheckpoints(repo.db, vm.id).map((c) => ({ level: c.level, time: c.started })) : [],
      );
    }
    return out;
  } finally {
    repo.close();
  }
}

/** The arguments of the child `bkfs backup` for a task. */
export function backupArgs(job: JobSpec, t: VmTask): string[] {
  const h = t.hostSpec;
  return [
    '-r',
    job.repository,
    '--retry-lock',
    job.retryLock,
    'backup',
    t.vm!,
    '--libvirt',
    t.domain,
    '--connect',
    t.uri,
    '--level',
    t.decision!.level,
    '--json',
    ...(job.freeze ? [] : ['--no-freeze']),
    ...(h.scratchDir !== undefined ? ['--scratch-dir', h.scratchDir] : []),
  ];
}

interface ChildOutcome {
  code: number;
  stdout: string;
  /** The child's last `bkfs: ...` line (its error), without the prefix. */
  lastError: string | null;
}

/** Run a child bkfs; stderr lines go to `onLine`, progress lines to `onProgress`. */
function runChild(
  args: string[],
  env: NodeJS.ProcessEnv,
  signal: AbortSignal | undefined,
  onLine: (l: string) => void,
  onProgress: (done: number, total: number) => void = () => {},
): Promise<ChildOutcome> {
  return new Promise((resolve, reject) => {
    // An encrypted repository unlocked here: its key goes to the child through a pipe (fd 3).
    const handoff = keyHandoff(3);
    const child = spawn(process.execPath, [BKFS_BIN, ...args], {
      stdio: ['ignore', 'pipe', 'pipe', handoff.active ? 'pipe' : 'ignore'],
      env: { ...env, ...handoff.env, BKFS_PROGRESS: 'json' },
    });
    handoff.send(child.stdio as unknown[]);
    let stdout = '';
    let lastError: string | null = null;
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    const rl = readline.createInterface({ input: child.stderr! });
    rl.on('line', (l) => {
      if (l.startsWith(PROGRESS_PREFIX)) {
        try {
          const p = JSON.parse(l.slice(PROGRESS_PREFIX.length)) as { done: number; total: number };
          onProgress(p.done, p.total);
        } catch {
          onLine(l);
        }
        return;
      }
      if (l.startsWith('bkfs: ')) lastError = l.slice(6);
      if (l.trim() !== '') onLine(l);
    });
    const stop = () => child.kill('SIGTERM'); // the child cleans up (ends the libvirt job) and exits
    signal?.addEventListener('abort', stop, { once: true });
    child.on('error', reject);
    child.on('close', (code, sig) => {
      signal?.removeEventListener('abort', stop);
      resolve({ code: code ?? (sig === 'SIGINT' || sig === 'SIGTERM' ? 130 : 128), stdout, lastError });
    });
  });
}

function childError(o: ChildOutcome, what: string): VmError {
  const name = NAME_BY_EXIT.get(o.code);
  return {
    code: name ?? (o.code === 1 ? 'INTERNAL' : 'CHILD_FAILED'),
    exitCode: o.code,
    message: o.lastError ?? `${what} exited with code ${o.code}`,
  };
}

function emptyResult(t: VmTask, result: VmOutcome): VmResult {
  return {
    host: t.host,
    uri: t.uri,
    domain: t.domain,
    vm: t.vm,
    plannedLevel: t.decision?.expect ?? null,
    levelReason: t.decision?.reason ?? null,
    level: null,
    result,
    checkpoint: null,
    started: null,
    finished: null,
    durationMs: 0,
    backupMs: 0,
    virtualSize: null,
    bytesRead: null,
    storedBytes: null,
    error: t.error,
  };
}

interface BackupJson {
  checkpoint: string;
  level: string;
  durationMs: number;
  virtualSize: number;
  bytesRead: number;
  chunks: { newStoredBytes: number };
}

async function backupOne(job: JobSpec, t: VmTask, o: RunOptions): Promise<VmResult> {
  const hooks = o.hooks ?? {};
  const args = backupArgs(job, t);
  const res = emptyResult(t, 'failed');
  res.started = Date.now();
  hooks.onStart?.(t, ['bkfs', ...args]);
  hooks.log?.(`[${t.vm}] start: bkfs ${args.join(' ')}`);
  let outcome: ChildOutcome;
  try {
    outcome = await runChild(
      args,
      o.env ?? process.env,
      o.signal,
      (l) => hooks.log?.(`[${t.vm}] ${l}`),
      (d, n) => hooks.onProgress?.(t, d, n),
    );
  } catch (e) {
    outcome = { code: 128, stdout: '', lastError: `cannot start bkfs: ${errorMessage(e)}` };
  }
  res.finished = Date.now();
  res.durationMs = res.finished - res.started;
  if (outcome.code === 0) {
    try {
      const j = JSON.parse(outcome.stdout) as BackupJson;
      res.result = 'ok';
      res.level = j.level;
      res.checkpoint = j.checkpoint;
      res.virtualSize = j.virtualSize;
      res.bytesRead = j.bytesRead;
      res.storedBytes = j.chunks.newStoredBytes;
      res.backupMs = j.durationMs;
    } catch (e) {
      res.error = {
        code: 'CHILD_FAILED',
        exitCode: 0,
        message: `unreadable report of bkfs backup: ${errorMessage(e)}`,
      };
    }
  } else {
    res.result = o.signal?.aborted ? 'interrupted' : 'failed';
    res.error = childError(outcome, 'bkfs backup');
  }
  hooks.log?.(
    `[${t.vm}] ${res.result}${res.checkpoint ? ` ${t.vm}@${res.checkpoint} (${res.level})` : ''}` +
      `${res.error ? `: ${res.error.code}: ${res.error.message}` : ''} in ${res.durationMs} ms`,
  );
  return res;
}

/** Run (or with dryRun, plan) a whole job. */
export async function runJob(job: JobSpec, o: RunOptions = {}): Promise<RunResult> {
  const hooks = o.hooks ?? {};
  const log = hooks.log ?? (() => {});
  const started = Date.now();
  const now = o.now ?? started;
  log(`job ${job.file}: repository ${job.repository}${o.dryRun ? ' (dry run)' : ''}`);
  const tasks = await resolveTasks(job, log);
  const names = tasks.filter((t) => t.vm !== null).map((t) => t.vm!);
  const history = await readHistory(job.repository, names);
  for (const t of tasks) {
    if (t.vm === null) continue;
    t.decision = decideLevel(history.get(t.vm) ?? [], job.level, now);
  }
  const results: VmResult[] = [];
  const runnable = tasks.filter((t) => t.error === null);
  for (const t of tasks) {
    if (t.error !== null) {
      const r = emptyResult(t, 'failed');
      log(`[${t.vm ?? t.domain}] failed: ${t.error.message}`);
      results.push(r);
      hooks.onEnd?.(r);
    }
  }
  if (o.dryRun) {
    for (const t of runnable) {
      log(`[${t.vm}] would run: bkfs ${backupArgs(job, t).join(' ')} (${t.decision!.reason})`);
      results.push(emptyResult(t, 'planned'));
    }
  } else {
    await runBackups(job, runnable, o, results);
  }
  // Summary order: as the job lists hosts and the hosts list domains.
  const order = new Map(tasks.map((t, i) => [t, i]));
  const key = (r: VmResult) =>
    order.get(tasks.find((t) => t.host === r.host && t.domain === r.domain && t.vm === r.vm)!) ?? 0;
  results.sort((a, b) => key(a) - key(b));

  const env = o.env ?? process.env;
  // Each step runs unless this is a dry run or the run was interrupted (before or during a step).
  const go = () => !o.dryRun && !o.signal?.aborted;
  const okVms = results.filter((r) => r.result === 'ok').map((r) => r.vm!);
  const retention = go() && job.retention ? await retentionStep(job, job.retention, okVms, env, o) : null;
  const gc =
    go() && job.gc.enabled && (retention === null || retention.ok) ? await gcStep(job, env, o) : null;
  const copy = go() && job.copy && okVms.length > 0 ? await copyStep(job, job.copy, okVms, env, o) : null;
  const finished = Date.now();
  const failed = results.filter((r) => r.result === 'failed' || r.result === 'interrupted').length;
  return {
    job: job.file,
    repository: job.repository,
    dryRun: o.dryRun === true,
    started,
    finished,
    durationMs: finished - started,
    vms: results,
    retention,
    gc,
    copy,
    succeeded: results.filter((r) => r.result === 'ok').length,
    failed,
    interrupted: o.signal?.aborted === true,
  };
}

/** The backups of `runnable`, as many at once as the job and each host allow; results pushed as they end. */
async function runBackups(
  job: JobSpec,
  runnable: VmTask[],
  o: RunOptions,
  results: VmResult[],
): Promise<void> {
  const hooks = o.hooks ?? {};
  const sched = new Scheduler(
    runnable,
    job.concurrency,
    (h) => job.hosts.find((x) => x.name === h)!.concurrency,
  );
  await new Promise<void>((resolve) => {
    const pump = () => {
      if (o.signal?.aborted) {
        // Nothing new starts; the ones queued are reported as interrupted.
        for (let t = sched.next(); t; t = sched.next()) {
          sched.finish(t);
          const r = emptyResult(t, 'interrupted');
          r.error = {
            code: 'INTERRUPTED',
            exitCode: null,
            message: 'not started: the run was interrupted',
          };
          results.push(r);
          hooks.onEnd?.(r);
        }
      }
      for (let t = sched.next(); t; t = sched.next()) {
        const task = t;
        void backupOne(job, task, o).then((r) => {
          sched.finish(task);
          results.push(r);
          hooks.onEnd?.(r);
          pump();
        });
      }
      if (sched.done) resolve();
    };
    pump();
  });
}

/** `bkfs --retry-lock … -r REPO`: the options every step's child starts with. */
function commonArgs(job: JobSpec): string[] {
  return ['-r', job.repository, '--retry-lock', job.retryLock];
}

/** Retention: `bkfs forget VM --keep-…` for each VM backed up; stops at the first failure. */
async function retentionStep(
  job: JobSpec,
  policy: RetentionPolicy,
  vms: string[],
  env: NodeJS.ProcessEnv,
  o: RunOptions,
): Promise<RetentionResult> {
  const log = o.hooks?.log ?? (() => {});
  const retention: RetentionResult = { ok: true, error: null, vms, removed: 0, kept: 0 };
  o.hooks?.onStep?.('retention');
  for (const vm of vms) {
    const args = [...commonArgs(job), 'forget', vm, ...retentionArgs(policy), '--json'];
    log(`[retention] bkfs ${args.join(' ')}`);
    const c = await runChild(args, env, o.signal, (l) => log(`[retention ${vm}] ${l}`));
    if (c.code !== 0) {
      retention.ok = false;
      retention.error = childError(c, `bkfs forget ${vm}`);
      log(`[retention] ${vm} failed: ${retention.error.message}`);
      break;
    }
    const j = JSON.parse(c.stdout) as { removed: unknown[]; kept: unknown[] };
    retention.removed += j.removed.length;
    retention.kept += j.kept.length;
  }
  return retention;
}

/** `bkfs gc` after the backups (and retention). */
async function gcStep(job: JobSpec, env: NodeJS.ProcessEnv, o: RunOptions): Promise<GcResult> {
  const log = o.hooks?.log ?? (() => {});
  o.hooks?.onStep?.('gc');
  const maxUnused = job.gc.maxUnused ? ['--max-unused', job.gc.maxUnused] : [];
  const args = [...commonArgs(job), 'gc', '--json', ...maxUnused];
  log(`[gc] bkfs ${args.join(' ')}`);
  const c = await runChild(args, env, o.signal, (l) => log(`[gc] ${l}`));
  if (c.code === 0) {
    const report = JSON.parse(c.stdout) as { bytesFreed: number };
    return { ok: true, error: null, bytesFreed: report.bytesFreed, report };
  }
  const gc: GcResult = { ok: false, error: childError(c, 'bkfs gc'), bytesFreed: null, report: null };
  log(`[gc] failed: ${gc.error!.message}`);
  return gc;
}

/** `bkfs copy VM… --to DEST` of the VMs backed up. */
async function copyStep(
  job: JobSpec,
  dest: { to: string },
  vms: string[],
  env: NodeJS.ProcessEnv,
  o: RunOptions,
): Promise<CopyStepResult> {
  const log = o.hooks?.log ?? (() => {});
  o.hooks?.onStep?.('copy');
  const args = [...commonArgs(job), 'copy', ...vms, '--to', dest.to, '--json'];
  log(`[copy] bkfs ${args.join(' ')}`);
  const c = await runChild(args, env, o.signal, (l) => log(`[copy] ${l}`));
  const copy: CopyStepResult = {
    ok: c.code === 0,
    error: null,
    to: dest.to,
    vms,
    copied: 0,
    skipped: 0,
    chunksTransferred: 0,
    bytesTransferred: 0,
  };
  if (c.code === 0) {
    const j = JSON.parse(c.stdout) as {
      copied: unknown[];
      skipped: unknown[];
      chunksTransferred: number;
      bytesTransferred: number;
    };
    copy.copied = j.copied.length;
    copy.skipped = j.skipped.length;
    copy.chunksTransferred = j.chunksTransferred;
    copy.bytesTransferred = j.bytesTransferred;
  } else {
    copy.error = childError(c, 'bkfs copy');
    log(`[copy] failed: ${copy.error.message}`);
  }
  return copy;
}

/** The run's failure, or null when everything succeeded (`JOB_PARTIAL` / `INTERRUPTED`). */
export function runFailure(r: RunResult): BkfsError | null {
  if (r.interrupted) return new BkfsError('INTERRUPTED', 'the run was interrupted');
  const parts: string[] = [];
  if (r.failed > 0) parts.push(`${r.failed} of ${r.vms.length} VM backup(s) failed`);
  if (r.retention && !r.retention.ok) parts.push(`retention failed: ${r.retention.error!.message}`);
  if (r.gc && !r.gc.ok) parts.push(`gc failed: ${r.gc.error!.message}`);
  if (r.copy && !r.copy.ok) parts.push(`copy failed: ${r.copy.error!.message}`);
  return parts.length > 0 ? new BkfsError('JOB_PARTIAL', parts.join('; ')) : null;
}
