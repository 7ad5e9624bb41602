/**
 * Bookkeeping of bkfs mounts: where a mount's state file and log live, what the kernel says is
 * mounted where (/proc/self/mountinfo), whether a mount point is free, live or stale, and how a
 * mount is taken down (`fusermount -u`, then its daemon stopped by PID).
 *
 * State file: `<runDir>/<key>.json` = {pid, startTime, mountpoint, repo, ref, log, started}, where
 * `key` = first 16 hex digits of sha256(mount point) and `runDir` = $BKFS_RUN_DIR, else
 * /run/bkfs/mounts as root, else $XDG_RUNTIME_DIR/bkfs/mounts (or <tmpdir>/bkfs-<uid>/mounts).
 * The daemon's log is `<runDir>/<key>.log`. `startTime` (from /proc/<pid>/stat) guards against a
 * recycled PID: a state file only ever leads to signalling the process that wrote it.
 *
 * A mount whose daemon died is "stale": the kernel keeps the mount point but every access fails
 * with ENOTCONN ("Transport endpoint is not connected"). `inspectMountpoint` recognises it from the
 * state file (dead daemon) without touching the mount, or, with no state file, from an lstat that
 * fails with ENOTCONN; `fusermount -uz` removes it. A live daemon's mount is never touched, so a
 * stuck daemon cannot hang `umount`.
 *
 * No locking: two commands racing on the same mount point are resolved by the kernel (one mount
 * wins; fusermount of a path that is no longer mounted fails harmlessly).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { removeStalePins } from '../repo/pins';
import { BkfsError } from '../errors';
import { run, lastLine } from '../util/proc';
import { mkdirPrivateSync, writeFilePrivateSync } from '../util/private-fs';
import { userPathError } from '../util/userpath';

export const FUSE_SUBTYPE = 'bkfs';
export const FUSE_FSTYPE = `fuse.${FUSE_SUBTYPE}`;

export interface MountState {
  pid: number;
  /** Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat). */
  startTime: number | null;
  mountpoint: string;
  repo: string;
  ref: string | null;
  log: string | null;
  started: string;
}

export function runDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BKFS_RUN_DIR) return env.BKFS_RUN_DIR;
  if (process.getuid?.() === 0) return '/run/bkfs/mounts';
  const base = env.XDG_RUNTIME_DIR || path.join(os.tmpdir(), `bkfs-${process.getuid?.() ?? 'user'}`);
  return path.join(base, 'bkfs', 'mounts');
}

export function mountKey(mountpoint: string): string {
  return createHash('sha256').update(mountpoint).digest('hex').slice(0, 16);
}

export function statePath(mountpoint: string, env?: NodeJS.ProcessEnv): string {
  return path.join(runDir(env), `${mountKey(mountpoint)}.json`);
}

export function logPath(mountpoint: string, env?: NodeJS.ProcessEnv): string {
  return path.join(runDir(env), `${mountKey(mountpoint)}.log`);
}

export function readState(mountpoint: string): MountState | undefined {
  try {
    const s = JSON.parse(fs.readFileSync(statePath(mountpoint), 'utf8')) as MountState;
    return typeof s.pid === 'number' ? s : undefined;
  } catch {
    return undefined;
  }
}

export function writeState(s: MountState): void {
  const file = statePath(s.mountpoint);
  mkdirPrivateSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  writeFilePrivateSync(tmp, JSON.stringify(s, null, 2) + '\n');
  fs.renameSync(tmp, file);
}

/** Remove the state file of `mountpoint` if it belongs to `pid` (or unconditionally without pid). */
export function removeState(mountpoint: string, pid?: number): void {
  const s = readState(mountpoint);
  if (pid !== undefined && s && s.pid !== pid) return;
  fs.rmSync(statePath(mountpoint), { force: true });
}

/**
 * The absolute form of a mount point without touching the mount point itself (a stale FUSE mount
 * fails every stat): the parent directory is resolved through symlinks, the last component kept.
 */
export function canonicalMountpoint(p: string): string {
  const abs = path.resolve(p);
  if (abs === '/') return abs;
  let parent = path.dirname(abs);
  try {
    parent = fs.realpathSync(parent);
  } catch {
    // a missing parent is reported by the caller's checks
  }
  const joined = path.join(parent, path.basename(abs));
  if (mountAt(joined)) return joined; // never stat a mount point: its server may be dead or stuck
  try {
    if (fs.lstatSync(joined).isSymbolicLink()) return fs.realpathSync(joined);
  } catch {
    // missing: keep the name
  }
  return joined;
}

// ---------------------------------------------------------------------------------------------
// /proc/self/mountinfo

export interface MountEntry {
  mountId: number;
  mountpoint: string;
  fstype: string;
  source: string;
  options: string;
}

/** `\040` style escapes of mountinfo fields. */
function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Parse /proc/<pid>/mountinfo text (pure; see proc(5)). */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (sep < 0 || f.length < sep + 3) continue;
    out.push({
      mountId: Number(f[0]),
      mountpoint: unescapeMountField(f[4] ?? ''),
      options: f[5] ?? '',
      fstype: f[sep + 1] ?? '',
      source: unescapeMountField(f[sep + 2] ?? ''),
    });
  }
  return out;
}

export function mountsAt(mountpoint: string): MountEntry[] {
  let text = '';
  try {
    text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  return parseMountinfo(text).filter((m) => m.mountpoint === mountpoint);
}

/** The top-most mount at `mountpoint`, if any. */
export function mountAt(mountpoint: string): MountEntry | undefined {
  const all = mountsAt(mountpoint);
  return all[all.length - 1];
}

// ---------------------------------------------------------------------------------------------
// Processes

/** Whether `pid` runs. A zombie (exited, not yet reaped by its parent or init) does not. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const state = procStatField(pid, 3);
  return state !== 'Z' && state !== 'X';
}

/** Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat, or undefined. */
function procStatField(pid: number, n: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 2 (comm) may contain spaces and parentheses: count from the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[n - 3];
  } catch {
    return undefined;
  }
}

export function processStartTime(pid: number): number | null {
  const v = Number(procStatField(pid, 22));
  return Number.isFinite(v) && v > 0 ? v : null;
}

/** Whether the daemon a state file names is still running (same PID and start time). */
export function daemonAlive(s: MountState): boolean {
  if (!processAlive(s.pid)) return false;
  if (s.startTime === null) return true;
  const now = processStartTime(s.pid);
  return now === null || now === s.startTime;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** SIGTERM the daemon of `s`, wait for it to exit, SIGKILL after `graceMs`. */
export async function stopDaemon(s: MountState, graceMs = 15000): Promise<void> {
  if (s.pid === process.pid || !daemonAlive(s)) return;
  try {
    process.kill(s.pid, 'SIGTERM');
    process.kill(s.pid, 'SIGCONT'); // a stopped (SIGSTOP, ^Z) daemon handles SIGTERM only once continued
  } catch {
    return;
  }
  const t0 = Date.now();
  while (daemonAlive(s)) {
    if (Date.now() - t0 > graceMs) {
      try {
        process.kill(s.pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
      return;
    }
    await sleep(50);
  }
}

// ---------------------------------------------------------------------------------------------
// Mount points

export type MountpointStatus =
  | { status: 'free' }
  | { status: 'missing' }
  | { status: 'not-dir' }
  | { status: 'not-empty' }
  | { status: 'mounted'; entry: MountEntry; state?: MountState }
  | { status: 'stale'; entry: MountEntry; state?: MountState };

/**
 * What is at `mountpoint` (canonical): nothing usable, a free empty directory, a live mount, or a
 * stale one. A bkfs mount whose recorded daemon is dead is stale without touching it; otherwise
 * an lstat that fails with ENOTCONN marks it stale.
 */
export async function inspectMountpoint(mountpoint: string): Promise<MountpointStatus> {
  const entry = mountAt(mountpoint);
  if (entry) {
    const state = readState(mountpoint);
    const withState = state ? { state } : {};
    if (entry.fstype === FUSE_FSTYPE && state) {
      // Known daemon: decide from its process, never by touching a mount it may be too stuck to serve.
      return { status: daemonAlive(state) ? 'mounted' : 'stale', entry, ...withState };
    }
    // Unknown FUSE mount: a dead server answers ENOTCONN at once; a stuck one is left alone.
    const probe = await Promise.race([
      fs.promises.lstat(mountpoint).then(
        () => 'ok',
        (e: NodeJS.ErrnoException) => e.code ?? 'error',
      ),
      new Promise<string>((r) => setTimeout(() => r('timeout'), 3000).unref()),
    ]);
    if (probe === 'ENOTCONN' || probe === 'ECONNABORTED') return { status: 'stale', entry, ...withState };
    return { status: 'mounted', entry, ...withState };
  }
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(mountpoint);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return { status: 'missing' };
    throw userPathError(e, 'mount point', mountpoint, 'TARGET_INVALID');
  }
  if (!st.isDirectory()) return { status: 'not-dir' };
  let names: string[];
  try {
    names = await fs.promises.readdir(mountpoint);
  } catch (e) {
    throw userPathError(e, 'mount point', mountpoint, 'TARGET_INVALID');
  }
  if (names.length > 0) return { status: 'not-empty' };
  return { status: 'free' };
}

/** Run `fusermount -u [-z] mountpoint`; resolves with its exit code and last stderr line. */
export async function fusermount(
  mountpoint: string,
  lazy: boolean,
): Promise<{ code: number; message: string }> {
  const args = ['-u', ...(lazy ? ['-z'] : []), mountpoint];
  let r;
  try {
    r = await run('fusermount', args, { allowFail: true });
  } catch {
    r = await run('fusermount3', args, { allowFail: true });
  }
  return { code: r.code, message: lastLine(r.stderr || r.stdout) };
}

/** Lazily detach a stale mount and forget its state. Throws MOUNT_FAILED if that fails. */
export async function cleanStale(mountpoint: string, state?: MountState): Promise<void> {
  const r = await fusermount(mountpoint, true);
  if (r.code !== 0 && mountAt(mountpoint)) {
    throw new BkfsError('MOUNT_FAILED', `cannot remove the stale mount at ${mountpoint}: ${r.message}`);
  }
  if (state && daemonAlive(state)) await stopDaemon(state, 2000); // alive but not serving: hung
  if (state) removeDeadPins(state);
  removeState(mountpoint);
}

/**
 * Pin files of a daemon that is gone (`src/repo/pins.ts`): forget/gc would drop them as stale
 * anyway (nobody holds their flock); removing them keeps the directory tidy. Decided by the pins'
 * flocks, never by PID (a PID in another namespace may equal the dead daemon's).
 */
function removeDeadPins(state: MountState): void {
  removeStalePins({ dir: state.repo });
}

export interface UnmountResult {
  /** 'unmounted' normally; 'stale' when the daemon had died and the mount was cleaned. */
  outcome: 'unmounted' | 'stale';
  pid: number | null;
}

/**
 * Take down the bkfs mount at `mountpoint`: `fusermount -u` (with `lazy`: `-uz`, which also works
 * while files are open), then stop its daemon by PID. A stale mount is cleaned. Errors: not a
 * mount point or not a bkfs mount (TARGET_INVALID), busy (MOUNT_FAILED).
 */
export async function unmountPath(mountpoint: string, opts: { lazy?: boolean } = {}): Promise<UnmountResult> {
  const st = await inspectMountpoint(mountpoint);
  if (st.status === 'stale') {
    await cleanStale(mountpoint, st.state);
    return { outcome: 'stale', pid: st.state?.pid ?? null };
  }
  if (st.status !== 'mounted') {
    const s = readState(mountpoint);
    if (s) {
      // A daemon whose mount is gone (someone ran fusermount): stop it, drop the record.
      await stopDaemon(s);
      removeState(mountpoint);
    }
    if (st.status === 'missing') throw new BkfsError('TARGET_INVALID', `${mountpoint} does not exist`);
    throw new BkfsError('TARGET_INVALID', `nothing is mounted on ${mountpoint}`);
  }
  if (st.entry.fstype !== FUSE_FSTYPE) {
    throw new BkfsError(
      'TARGET_INVALID',
      `${mountpoint} is not a bkfs mount (it is ${st.entry.fstype} from ${st.entry.source})`,
    );
  }
  const r = await fusermount(mountpoint, opts.lazy ?? false);
  if (r.code !== 0 && mountAt(mountpoint)?.fstype === FUSE_FSTYPE) {
    const busy = /busy/i.test(r.message);
    throw new BkfsError(
      'MOUNT_FAILED',
      busy
        ? `${mountpoint} is busy (files are open or a process uses it): close them, or use --lazy`
        : `cannot unmount ${mountpoint}: ${r.message}`,
    );
  }
  const state = st.state;
  if (state) await stopDaemon(state);
  removeState(mountpoint);
  return { outcome: 'unmounted', pid: state?.pid ?? null };
}
