/**
 * Thin wrappers over child_process for the external tools bkfs drives (qemu-img, qemu-nbd,
 * guestfish, virsh, losetup, mount). Output is collected in memory, so use `run` only for tools
 * whose output is small (JSON, tables). Failures become `BkfsError('EXTERNAL_TOOL')` whose message
 * names the tool and carries its last stderr line, so the CLI can show one clear line.
 */
import { spawn, type SpawnOptions, type ChildProcess } from 'node:child_process';
import { BkfsError } from '../errors';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

export interface RunOptions {
  /** Do not throw on a non-zero exit; return the result instead. */
  allowFail?: boolean;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  input?: string | Buffer;
  /** Kill the process after this many milliseconds. */
  timeoutMs?: number;
}

/** Run a program to completion and collect its output. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const so: SpawnOptions = { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env };
    if (opts.cwd !== undefined) so.cwd = opts.cwd;
    let child: ChildProcess;
    try {
      child = spawn(cmd, args, so);
    } catch (e) {
      reject(new BkfsError('EXTERNAL_TOOL', `cannot start ${cmd}: ${(e as Error).message}`));
      return;
    }
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    let timer: NodeJS.Timeout | undefined;
    if (opts.timeoutMs !== undefined) {
      timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs);
    }
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (timer) clearTimeout(timer);
      const hint = e.code === 'ENOENT' ? ` (is ${cmd} installed?)` : '';
      reject(new BkfsError('EXTERNAL_TOOL', `cannot run ${cmd}: ${e.message}${hint}`, { cmd }));
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const res: RunResult = {
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        code: code ?? (signal ? 128 : 1),
      };
      if (res.code !== 0 && !opts.allowFail) {
        reject(
          new BkfsError(
            'EXTERNAL_TOOL',
            `${cmd} ${args[0] ?? ''} failed: ${lastLine(res.stderr || res.stdout)}`,
            {
              cmd,
              args,
              code: res.code,
              stderr: res.stderr,
            },
          ),
        );
        return;
      }
      resolve(res);
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

/** The last non-empty line of a tool's output, for one-line error messages. */
export function lastLine(s: string): string {
  const lines = s
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
  return lines[lines.length - 1] ?? '(no output)';
}

/** Wait for a child to exit; resolves with its exit code (or 128+signal). */
export function waitExit(child: ChildProcess): Promise<number> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  if (child.signalCode !== null) return Promise.resolve(128);
  return new Promise((resolve) => child.once('exit', (code) => resolve(code ?? 128)));
}

/** Stop a child by PID: SIGTERM, then SIGKILL after `graceMs`. Resolves once it has exited. */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = waitExit(child);
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(t);
}

/** Whether a process with this PID exists on this host (EPERM means it exists as another user). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
