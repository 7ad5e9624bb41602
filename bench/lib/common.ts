/**
 * Shared plumbing of the comparison benchmark (`bench/run`): running tools with timing, background
 * processes tracked by PID, mounts and loop devices released on every exit path, page-cache drops
 * and statistics.
 *
 * Every background process is recorded as `<registry>/pids/<pid>` (its command name inside) and
 * every libvirt domain as `<registry>/domains/<name>` while it exists, so that `bench/run`'s bash
 * trap can release what a crashed or killed node process left behind (it also unmounts everything
 * below the work directory and detaches loop devices whose backing file lies there).
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { mountsUnder } from '../../test/helpers/images';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

// ---------------------------------------------------------------------------------------------
// Logging

let logFile: number | undefined;

/** Also append every log line to this file (the run's log). */
export function setLogFile(file: string): void {
  logFile = fs.openSync(file, 'a');
}

export function log(msg: string): void {
  const line = `[${new Date().toISOString().slice(11, 19)}] ${msg}\n`;
  process.stderr.write(line);
  if (logFile !== undefined) fs.writeSync(logFile, line);
}

/** Verbose lines go to the log file only. */
export function debug(msg: string): void {
  if (logFile !== undefined) fs.writeSync(logFile, `[${new Date().toISOString().slice(11, 19)}]   ${msg}\n`);
}

// ---------------------------------------------------------------------------------------------
// Interruption

let aborted = false;
const running = new Set<ChildProcess>();

/** SIGINT/SIGTERM: stop the running tools (by PID) and make every later `sh` fail, so finally blocks run. */
export function installSignalHandlers(): void {
  const onSignal = (sig: NodeJS.Signals): void => {
    if (aborted) return;
    aborted = true;
    log(`${sig}: stopping (cleaning up first)`);
    for (const c of running) if (c.pid !== undefined && c.exitCode === null) c.kill('SIGTERM');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
}

export function checkAborted(): void {
  if (aborted) throw new Error('interrupted');
}

/** Commands that release things: still run after an interruption, so that finally blocks can clean up. */
const RELEASE = new Set(['umount', 'fusermount3', 'losetup', 'virsh', 'sync', 'mountpoint']);

function checkAbortedFor(cmd: string, args: readonly string[]): void {
  if (aborted && !RELEASE.has(path.basename(cmd)) && !args.includes('umount')) throw new Error('interrupted');
}

// ---------------------------------------------------------------------------------------------
// Running tools

export interface ShOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Feed this file to stdin. */
  stdinFile?: string;
  input?: string;
  /** Write stdout to this file instead of collecting it. */
  stdoutFile?: string;
  allowFail?: boolean;
  timeoutMs?: number;
}

export interface ShResult {
  code: number;
  stdout: string;
  stderr: string;
  /** Wall-clock seconds from spawn to exit. */
  secs: number;
}

const KEEP = 256 * 1024;

function keepTail(chunks: Buffer[], total: { n: number }, d: Buffer): void {
  chunks.push(d);
  total.n += d.length;
  while (total.n > KEEP && chunks.length > 1) total.n -= (chunks.shift() as Buffer).length;
}

/** Run a tool to completion; throws with its last stderr lines unless `allowFail`. */
export function sh(cmd: string, args: readonly string[], opts: ShOptions = {}): Promise<ShResult> {
  checkAbortedFor(cmd, args);
  debug(`$ ${cmd} ${args.join(' ')}`);
  return new Promise((resolve, reject) => {
    const fds: number[] = [];
    const stdio: StdioOptions = ['pipe', 'pipe', 'pipe'];
    try {
      if (opts.stdinFile !== undefined) {
        const fd = fs.openSync(opts.stdinFile, 'r');
        fds.push(fd);
        stdio[0] = fd;
      }
      if (opts.stdoutFile !== undefined) {
        const fd = fs.openSync(opts.stdoutFile, 'w');
        fds.push(fd);
        stdio[1] = fd;
      }
    } catch (e) {
      for (const fd of fds) fs.closeSync(fd);
      reject(e as Error);
      return;
    }
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, {
      stdio,
      env: opts.env ?? process.env,
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    });
    running.add(child);
    const pidFile = registerPid(child.pid, cmd);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const errN = { n: 0 };
    // stdout is kept whole (JSON from qemu-img map can be megabytes), stderr only its tail.
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => keepTail(err, errN, d));
    let timer: NodeJS.Timeout | undefined;
    if (opts.timeoutMs !== undefined) timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs);
    const done = (): void => {
      running.delete(child);
      if (pidFile) fs.rmSync(pidFile, { force: true });
      if (timer) clearTimeout(timer);
      for (const fd of fds) fs.closeSync(fd);
    };
    child.on('error', (e) => {
      done();
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      done();
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      const r: ShResult = {
        code: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        secs,
      };
      if (r.code !== 0 && !opts.allowFail) {
        const tail = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-4).join(' | ');
        reject(
          new Error(
            `${cmd} ${args.slice(0, 3).join(' ')} failed (exit ${r.code}${signal ? ` ${signal}` : ''}): ${tail}`,
          ),
        );
        return;
      }
      resolve(r);
    });
    if (opts.stdinFile === undefined) {
      if (opts.input !== undefined) child.stdin?.end(opts.input);
      else child.stdin?.end();
    }
  });
}

/** True when `cmd` is on PATH. */
export async function have(cmd: string): Promise<boolean> {
  const r = await sh('sh', ['-c', `command -v ${cmd}`], { allowFail: true });
  return r.code === 0;
}

// ---------------------------------------------------------------------------------------------
// Background processes

let registryDir = '';

/** Where PIDs and domains are recorded for the bash trap (see the file comment). */
export function setRegistry(dir: string): void {
  registryDir = dir;
  fs.mkdirSync(path.join(dir, 'pids'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'domains'), { recursive: true });
}

/**
 * Record a process for the bash trap: `<registry>/pids/<pid>` holding "<name> <start time>" (field
 * 22 of /proc/<pid>/stat), so that the trap stops exactly that process, never a later one that
 * reused the PID. Returns the file (removed when the process is reaped).
 */
function registerPid(pid: number | undefined, name: string): string | undefined {
  if (!registryDir || pid === undefined) return undefined;
  let start = '?';
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    start = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '?';
  } catch {
    return undefined; // already gone
  }
  const file = path.join(registryDir, 'pids', String(pid));
  fs.writeFileSync(file, `${path.basename(name)} ${start}\n`);
  return file;
}

/** A daemon this run started (not a child): the bash trap stops it by PID at the very end. */
export function registerDaemon(pid: number, name: string): void {
  registerPid(pid, name);
}

export function registerDomain(name: string): void {
  if (registryDir) fs.writeFileSync(path.join(registryDir, 'domains', name), name);
}

export function unregisterDomain(name: string): void {
  if (registryDir) fs.rmSync(path.join(registryDir, 'domains', name), { force: true });
}

export class Bg {
  readonly exited: Promise<number>;
  private readonly errChunks: Buffer[] = [];
  private readonly errN = { n: 0 };
  private readonly outChunks: Buffer[] = [];
  private readonly outN = { n: 0 };
  exitCode: number | null = null;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    running.add(child);
    child.stderr?.on('data', (d: Buffer) => keepTail(this.errChunks, this.errN, d));
    child.stdout?.on('data', (d: Buffer) => keepTail(this.outChunks, this.outN, d));
    this.exited = new Promise((resolve) => {
      child.on('error', () => undefined);
      child.on('close', (code, signal) => {
        running.delete(child);
        this.exitCode = code ?? (signal ? 128 : 1);
        if (this.pidFile) fs.rmSync(this.pidFile, { force: true });
        resolve(this.exitCode);
      });
    });
    this.pidFile = registerPid(child.pid, name);
  }

  private readonly pidFile: string | undefined;

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.exitCode === null && this.child.pid !== undefined;
  }

  stderr(): string {
    return Buffer.concat(this.errChunks).toString('utf8').trim();
  }

  stdout(): string {
    return Buffer.concat(this.outChunks).toString('utf8').trim();
  }

  /** SIGTERM by PID, wait up to `graceMs`, then SIGKILL. */
  async stop(graceMs = 20000): Promise<void> {
    if (!this.running) return;
    this.child.kill('SIGTERM');
    if (await waitOrTimeout(this.exited, graceMs)) return;
    log(`${this.name} (pid ${this.pid}) ignored SIGTERM for ${graceMs} ms: SIGKILL`);
    this.child.kill('SIGKILL');
    await waitOrTimeout(this.exited, 5000);
  }

  /** Wait for it to exit by itself; false on timeout. */
  waitExit(ms: number): Promise<boolean> {
    return waitOrTimeout(this.exited, ms);
  }
}

async function waitOrTimeout(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    p.then(() => true),
    new Promise<boolean>((res) => (timer = setTimeout(() => res(false), ms))),
  ]);
  clearTimeout(timer);
  return r;
}

/** Start a long-running tool (stdout/stderr kept, stdin closed). */
export function startBg(
  cmd: string,
  args: readonly string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Bg {
  checkAborted();
  debug(`$ ${cmd} ${args.join(' ')} &`);
  const child = spawn(cmd, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: opts.env ?? process.env,
    ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
  });
  return new Bg(path.basename(cmd), child);
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Poll `ready` until true; fails when `bg` exits first or after `timeoutMs`. */
export async function waitUntil(
  what: string,
  ready: () => boolean | Promise<boolean>,
  bg?: Bg,
  timeoutMs = 60000,
): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    if (await ready()) return;
    checkAborted();
    if (bg && !bg.running && bg.exitCode !== 0) {
      throw new Error(
        `${what}: ${bg.name} exited (${bg.exitCode}) before it was ready: ${bg.stderr().split('\n').slice(-3).join(' | ')}`,
      );
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what}: not ready after ${timeoutMs} ms`);
    await sleep(25);
  }
}

// ---------------------------------------------------------------------------------------------
// Cleanup stack

/** Steps released in reverse order; every step runs even if an earlier one fails. */
export class Cleanup {
  private readonly steps: { what: string; fn: () => Promise<void> }[] = [];

  push(what: string, fn: () => Promise<void>): void {
    this.steps.push({ what, fn });
  }

  async runAll(): Promise<void> {
    while (this.steps.length > 0) {
      const s = this.steps.pop() as { what: string; fn: () => Promise<void> };
      try {
        await s.fn();
      } catch (e) {
        log(`cleanup (${s.what}) failed: ${(e as Error).message}`);
      }
    }
  }
}

export async function withCleanup<T>(body: (c: Cleanup) => Promise<T>): Promise<T> {
  const c = new Cleanup();
  try {
    return await body(c);
  } finally {
    await c.runAll();
  }
}

// ---------------------------------------------------------------------------------------------
// Mounts and loop devices

export async function isMounted(dir: string): Promise<boolean> {
  const real = await fsp.realpath(dir).catch(() => dir);
  return (await mountsUnder(real)).includes(real);
}

/** Unmount a FUSE mount (fusermount3 -u, retried; lazy as a last resort). */
export async function fuseUnmount(dir: string): Promise<void> {
  for (let i = 0; i < 40; i++) {
    if (!(await isMounted(dir))) return;
    const r = await sh('fusermount3', ['-u', dir], { allowFail: true });
    if (r.code === 0) return;
    await sleep(250);
  }
  await sh('fusermount3', ['-u', '-z', dir], { allowFail: true });
  throw new Error(`fusermount3 -u ${dir} kept failing (unmounted lazily)`);
}

export async function umount(dir: string): Promise<void> {
  for (let i = 0; i < 40; i++) {
    if (!(await isMounted(dir))) return;
    const r = await sh('umount', [dir], { allowFail: true });
    if (r.code === 0) return;
    await sleep(250);
  }
  await sh('umount', ['-l', dir], { allowFail: true });
  throw new Error(`umount ${dir} kept failing (unmounted lazily)`);
}

/** Attach bytes [offset, offset+size) of `file` read-only to a loop device. */
export async function loopAttachRO(file: string, offset: number, size: number): Promise<string> {
  const r = await sh('losetup', [
    '-r',
    '-o',
    String(offset),
    '--sizelimit',
    String(size),
    '--find',
    '--show',
    file,
  ]);
  const dev = r.stdout.trim();
  if (!dev.startsWith('/dev/loop')) throw new Error(`losetup printed ${JSON.stringify(r.stdout)}`);
  return dev;
}

export async function loopDetach(dev: string): Promise<void> {
  for (let i = 0; ; i++) {
    const r = await sh('losetup', ['-d', dev], { allowFail: true });
    if (r.code === 0) return;
    if (i >= 40) throw new Error(`losetup -d ${dev}: ${r.stderr.trim()}`);
    await sleep(250);
  }
}

/**
 * Loop-mount the ext4 filesystem at [offset, offset+size) of the raw disk view `rawFile` read-only
 * (`losetup -r -o OFFSET --sizelimit SIZE`, `mount -o ro,noload`) on `dir`, run `fn`, release.
 */
export async function withExt4ReadOnly<T>(
  rawFile: string,
  offset: number,
  size: number,
  dir: string,
  fn: (mnt: string) => Promise<T>,
): Promise<T> {
  return withCleanup(async (c) => {
    const dev = await loopAttachRO(rawFile, offset, size);
    c.push(`losetup -d ${dev}`, () => loopDetach(dev));
    await fsp.mkdir(dir, { recursive: true });
    await sh('mount', ['-t', 'ext4', '-o', 'ro,noload', dev, dir]);
    c.push(`umount ${dir}`, () => umount(dir));
    return fn(dir);
  });
}

// ---------------------------------------------------------------------------------------------
// Page cache, sizes

let dropWarned = false;

/** `sync; echo 3 > /proc/sys/vm/drop_caches` (every tool alike, before every cold measurement). */
export async function dropCaches(): Promise<boolean> {
  await sh('sync', []);
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch (e) {
    if (!dropWarned) log(`cannot drop the page cache (${(e as Error).message}): figures are warm-cache`);
    dropWarned = true;
    return false;
  }
}

/** Bytes allocated on disk by everything under `p` (du --block-size=1), 0 when absent. */
export async function allocatedBytes(p: string): Promise<number> {
  if (!fs.existsSync(p)) return 0;
  const r = await sh('du', ['-s', '--block-size=1', p]);
  return Number(r.stdout.split(/\s/)[0]);
}

/** Remove a directory tree, refusing when something is still mounted below it. */
export async function rmTree(p: string): Promise<void> {
  if (!fs.existsSync(p)) return;
  const m = await mountsUnder(p);
  if (m.length > 0) throw new Error(`not removing ${p}: ${m.join(', ')} still mounted`);
  await fsp.rm(p, { recursive: true, force: true });
}

// ---------------------------------------------------------------------------------------------
// Statistics

export interface Stat {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function stat(xs: readonly number[]): Stat | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  const median = s.length % 2 === 1 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
  return { median, min: s[0] as number, max: s[s.length - 1] as number, n: s.length };
}

/** Run `fn`, return its wall-clock seconds. */
export async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

export function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

export function flag(name: string): boolean {
  return process.argv.includes(`--${name}`);
}

export function errMsg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
