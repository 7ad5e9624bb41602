/**
 * `bkfs run JOBFILE`: back up an estate described by a job file (`src/jobs/jobfile.ts`), through
 * `src/jobs/run.ts`. This adapter prints the plan or the summary table (or `--json`), draws one
 * progress line per running VM on a terminal, and writes the run's log file.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { JobSpec } from '../../jobs/jobfile';
import type { RunResult, VmResult, VmTask } from '../../jobs/run';
import { bytes, duration } from '../../util/format';
import { interruptSignal, note, out, table, verbosity } from '../context';
import { printJson } from '../json';
import { renderProgress } from '../progress';

/** Where run logs go without `log-dir` / `--log-dir`. */
export function defaultLogDir(env: NodeJS.ProcessEnv = process.env): string {
  if (process.getuid?.() === 0) return '/var/log/bkfs';
  const state = env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(state, 'bkfs', 'log');
}

/** One line per running VM (pure: unit-testable). */
export interface RunningLine {
  vm: string;
  host: string;
  level: string;
  startedMs: number;
  done: number;
  total: number;
}

export function renderRunning(rows: readonly RunningLine[], now: number, columns: number): string[] {
  const width = Math.max(1, columns - 1);
  return rows.map((r) => {
    // The VM's name always shows (shortened to half the line at most); the bar fits the rest.
    let label = `${r.vm} (${r.host}, ${r.level})`;
    if (label.length > width / 2) label = r.vm.slice(0, Math.max(1, Math.floor(width / 2)));
    const rest =
      r.total > 0
        ? renderProgress({
            label: '',
            done: r.done,
            total: r.total,
            elapsedMs: now - r.startedMs,
            columns: columns - label.length - 1,
          })
        : `starting, ${duration(now - r.startedMs)}`;
    return `${label} ${rest}`.slice(0, width);
  });
}

/** The multi-line progress display on stderr (a terminal only, not with -q or CI). */
class RunDisplay {
  private readonly rows = new Map<string, RunningLine>();
  private drawn = 0;
  private last = 0;
  private timer: NodeJS.Timeout | undefined;
  readonly enabled: boolean;

  constructor(private readonly stream: NodeJS.WriteStream = process.stderr) {
    this.enabled = Boolean(stream.isTTY) && !process.env.CI && verbosity() !== 'quiet';
    if (this.enabled) this.timer = setInterval(() => this.draw(true), 1000).unref();
  }

  start(key: string, line: RunningLine): void {
    this.rows.set(key, line);
    this.draw(true);
  }

  progress(key: string, done: number, total: number): void {
    const r = this.rows.get(key);
    if (!r) return;
    r.done = done;
    r.total = total;
    this.draw(false);
  }

  /** A VM finished: its line leaves the display and `message` is printed above it. */
  end(key: string, message: string): void {
    this.rows.delete(key);
    if (!this.enabled) return;
    this.clear();
    this.stream.write(`${message}\n`);
    this.draw(true);
  }

  private clear(): void {
    if (this.drawn > 0) this.stream.write(`\x1b[${this.drawn}F\x1b[J`);
    this.drawn = 0;
  }

  private draw(force: boolean): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (!force && now - this.last < 200) return;
    this.last = now;
    this.clear();
    const lines = renderRunning([...this.rows.values()], now, this.stream.columns || 80);
    for (const l of lines) this.stream.write(`${l}\n`);
    this.drawn = lines.length;
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.enabled) this.clear();
  }
}

/** The run's log file: created 0600 in a 0700 directory; one timestamped line per event. */
class RunLog {
  readonly path: string;
  private fd: number;

  constructor(dir: string, job: string, t: number) {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const stamp = new Date(t)
      .toISOString()
      .replace(/[-:]/g, '')
      .replace(/\.\d+Z$/, 'Z');
    const base = path
      .basename(job)
      .replace(/\.toml$/i, '')
      .replace(/[^A-Za-z0-9_.+-]/g, '_');
    this.path = path.join(dir, `run-${base}-${stamp}-${process.pid}.log`);
    this.fd = fs.openSync(
      this.path,
      fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL,
      0o600,
    );
  }

  line(l: string): void {
    if (this.fd < 0) return;
    fs.writeSync(this.fd, `${new Date().toISOString()} ${l}\n`);
  }

  close(): void {
    if (this.fd < 0) return;
    fs.fsyncSync(this.fd);
    fs.closeSync(this.fd);
    this.fd = -1;
  }
}

function cell(v: number | null, f: (n: number) => string): string {
  return v === null ? '-' : f(v);
}

export function summaryTable(r: RunResult): string {
  return table(
    ['HOST', 'VM', 'LEVEL', 'RESULT', 'TIME', 'READ', 'STORED', 'ERROR'],
    r.vms.map((v) => [
      v.host,
      v.vm ?? v.domain,
      v.level ?? (v.plannedLevel !== null ? (r.dryRun ? v.plannedLevel : `(${v.plannedLevel})`) : '-'),
      v.result,
      v.started === null ? '-' : duration(v.durationMs),
      cell(v.bytesRead, bytes),
      cell(v.storedBytes, bytes),
      v.error ? `${v.error.code}: ${v.error.message}` : r.dryRun && v.levelReason ? v.levelReason : '',
    ]),
  );
}

function printSummary(r: RunResult, job: JobSpec, logPath: string | null): void {
  out(summaryTable(r));
  if (r.dryRun) {
    out(
      `dry run: ${r.vms.filter((v) => v.result === 'planned').length} backup(s) would run` +
        `${r.failed ? `, ${r.failed} cannot` : ''}` +
        `${job.retention ? ', then retention' : ''}${job.gc.enabled ? ', then gc' : ''}${job.copy ? `, then a copy into ${job.copy.to}` : ''}; nothing started`,
    );
    return;
  }
  if (r.retention) {
    out(
      r.retention.ok
        ? `retention: forgot ${r.retention.removed} checkpoint(s) of ${r.retention.vms.length} VM(s), kept ${r.retention.kept}`
        : `retention: FAILED: ${r.retention.error!.message}`,
    );
  }
  if (r.gc) out(r.gc.ok ? `gc: freed ${bytes(r.gc.bytesFreed ?? 0)}` : `gc: FAILED: ${r.gc.error!.message}`);
  if (r.copy) {
    out(
      r.copy.ok
        ? `copy: ${r.copy.copied} checkpoint(s) of ${r.copy.vms.length} VM(s) into ${r.copy.to}, ${bytes(r.copy.bytesTransferred)} stored sent`
        : `copy: FAILED: ${r.copy.error!.message}`,
    );
  }
  out(`${r.succeeded} of ${r.vms.length} VM(s) backed up, ${r.failed} failed, in ${duration(r.durationMs)}`);
  if (logPath) out(`log: ${logPath}`);
}

function endMessage(v: VmResult): string {
  return v.result === 'ok'
    ? `${v.vm}: ${v.level} backup done in ${duration(v.durationMs)}, ${bytes(v.storedBytes ?? 0)} new`
    : `${v.vm ?? v.domain}: ${v.result}: ${v.error?.message ?? ''}`;
}

export function registerRun(program: Command): void {
  program
    .command('run')
    .description('back up an estate: every VM a job file selects, then retention and gc')
    .argument('<jobfile>', 'job file (TOML; see README "Backing up an estate" and examples/estate.toml)')
    .option('-n, --dry-run', 'resolve the domains and show the plan (levels); start nothing')
    .option(
      '--log-dir <dir>',
      'directory of the run logs (default: log-dir of the job file, else /var/log/bkfs as root)',
    )
    .option('--json', 'machine-readable summary')
    .addHelpText(
      'after',
      `
Each VM is backed up by a child 'bkfs backup VM --libvirt DOMAIN --connect URI --json' process,
at most 'concurrency' at once and 'concurrency' of its [[host]] per host; one VM's failure does not
stop the others. Then retention (forget) runs for the VMs backed up, and gc if the job says so.
Exit code 0 when everything succeeded, 30 (JOB_PARTIAL) when something failed, 29 (JOB_INVALID)
for a bad job file.

Examples:
  bkfs run /etc/bkfs/estate.toml --dry-run
  bkfs run /etc/bkfs/estate.toml
  bkfs run /etc/bkfs/estate.toml --json > /var/lib/bkfs-last-run.json`,
    )
    .action(
      async (file: string, opts: { dryRun?: boolean; json?: boolean; logDir?: string }, cmd: Command) => {
        const g = cmd.optsWithGlobals<{ repo?: string; retryLock?: string }>();
        if (g.repo !== undefined) {
          throw new BkfsError('USAGE', 'bkfs run takes the repository from the job file, not from -r');
        }
        const { parseJobFile } = await import('../../jobs/jobfile');
        let text: string;
        try {
          text = fs.readFileSync(file, 'utf8');
        } catch (e) {
          throw new BkfsError('JOB_INVALID', `${file}: cannot read the job file: ${(e as Error).message}`);
        }
        const job = parseJobFile(text, file);
        const base = path.dirname(path.resolve(file));
        job.repository = path.resolve(base, job.repository);
        if (job.copy) job.copy.to = path.resolve(base, job.copy.to);
        if (g.retryLock !== undefined) job.retryLock = g.retryLock;
        for (const h of job.hosts)
          if (h.scratchDir !== undefined) h.scratchDir = path.resolve(base, h.scratchDir);
        const logDir =
          opts.logDir ?? (job.logDir !== undefined ? path.resolve(base, job.logDir) : defaultLogDir());
        const started = Date.now();
        const log = opts.dryRun ? null : new RunLog(logDir, file, started);
        const display = new RunDisplay();
        const intr = interruptSignal();
        const key = (t: { host: string; domain: string }) => `${t.host}\0${t.domain}`;
        const { runJob, runFailure } = await import('../../jobs/run');
        let r: RunResult;
        try {
          r = await runJob(job, {
            ...(opts.dryRun ? { dryRun: true } : {}),
            signal: intr.signal,
            hooks: {
              log: (l) => log?.line(l),
              onStart: (t: VmTask) =>
                display.start(key(t), {
                  vm: t.vm!,
                  host: t.host,
                  level: t.decision!.expect,
                  startedMs: Date.now(),
                  done: 0,
                  total: 0,
                }),
              onProgress: (t, d, n) => display.progress(key(t), d, n),
              onEnd: (v) => display.end(key(v), endMessage(v)),
              onStep: (s) => {
                if (display.enabled) note(`${s}...`);
              },
            },
          });
          const failure = runFailure(r);
          if (log) {
            for (const l of summaryTable(r).split('\n')) log.line(l);
            log.line(failure ? `finished: ${failure.message}` : 'finished: all succeeded');
          }
          display.close();
          if (opts.json) printJson({ ...r, log: log?.path ?? null });
          else printSummary(r, job, log?.path ?? null);
          if (failure) throw failure;
        } catch (e) {
          if (log && !(e instanceof BkfsError && (e.code === 'JOB_PARTIAL' || e.code === 'INTERRUPTED')))
            log.line(`failed: ${(e as Error).message}`);
          throw e;
        } finally {
          display.close();
          intr.dispose();
          log?.close();
        }
      },
    );
}
