/**
 * The mount daemon: `serveMount` opens the repository, builds the VFS, mounts it, records a state
 * file and serves until told to stop (an AbortSignal: SIGTERM/SIGINT in the CLI) or until the
 * mount disappears under it (`fusermount -u` by someone else, checked once a second from
 * /proc/self/mountinfo, which also keeps the event loop alive). Then it unmounts if still mounted
 * (`fusermount -u`, lazily if busy), releases its pins, closes the repository and removes its state
 * file. A daemon that dies without this leaves a stale mount, which the next `bkfs mount`/`umount`
 * of that path cleans (state.ts).
 *
 * Background mode (`startDaemon`): the CLI re-executes itself detached (new session, cwd /, stdio
 * to the log file) with `--foreground --ready-fd 3`; the child reports on fd 3 one JSON line,
 * {ok:true,...} once the kernel has initialised the mount or {ok:false,code,message}, and the
 * parent exits with that outcome. So `bkfs mount` returns only when the mount is usable.
 *
 * The daemon never prints by itself: it reports through `log` (the CLI writes it to stderr, which
 * is the log file in background mode). Memory: the VFS's chunk cache (`cacheBytes`) plus pages.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError, errorMessage, isBkfsError, type ErrorCode } from '../errors';
import { Repository } from '../repo/repository';
import { bytes } from '../util/format';
import { onUserPath } from '../util/userpath';
import { mountFuse } from './mount';
import {
  cleanStale,
  fusermount,
  inspectMountpoint,
  mountsAt,
  processStartTime,
  readState,
  removeState,
  writeState,
  type MountState,
} from './state';
import { CheckpointVfs } from './vfs';
import { mkdirPrivateSync, openPrivateSync } from '../util/private-fs';

export interface ServeOptions {
  repoDir: string;
  /** `VM` / `VM@CP`, or undefined for the whole repository. */
  ref?: string;
  /** Canonical absolute mount point. */
  mountpoint: string;
  cacheBytes: number;
  fileMode: number;
  allowOther: boolean;
  /** Log file recorded in the state file (background mode). */
  logFile?: string;
  /** One line per event worth keeping (mounted, damage, stale cleanup, unmounted). */
  log: (line: string) => void;
  /** Called once the mount is usable. */
  onReady?: (info: MountedInfo) => void;
  /** Abort to unmount and return. */
  stop: AbortSignal;
  /** How often to look for the mount having gone away (ms). */
  watchMs?: number;
}

export interface MountedInfo {
  pid: number;
  mountpoint: string;
  mode: 'checkpoint' | 'tree';
  /** `vm@checkpoint` in checkpoint mode. */
  ref: string | null;
  files: { name: string; size: number }[];
  log: string | null;
}

/** Check the mount point; a stale bkfs (or other dead FUSE) mount there is cleaned first. */
export async function prepareMountpoint(mountpoint: string, log: (l: string) => void): Promise<void> {
  let st = await inspectMountpoint(mountpoint);
  if (st.status === 'stale') {
    await cleanStale(mountpoint, st.state);
    log(
      `removed a stale mount at ${mountpoint} (its daemon${st.state ? ` pid ${st.state.pid}` : ''} had died)`,
    );
    st = await inspectMountpoint(mountpoint);
  }
  switch (st.status) {
    case 'free':
      // fusermount (non-root) mounts only where the user may write; say so instead of "fuse failed".
      if (process.getuid?.() !== 0) {
        onUserPath('mount point', mountpoint, () => fs.accessSync(mountpoint, fs.constants.W_OK));
      }
      return;
    case 'missing':
      throw new BkfsError(
        'TARGET_INVALID',
        `mount point ${mountpoint} does not exist (create the directory first)`,
      );
    case 'not-dir':
      throw new BkfsError('TARGET_INVALID', `mount point ${mountpoint} is not a directory`);
    case 'not-empty':
      throw new BkfsError('TARGET_INVALID', `mount point ${mountpoint} is not empty`);
    case 'mounted': {
      const by = st.state
        ? ` by bkfs (pid ${st.state.pid}): run 'bkfs umount ${mountpoint}' first`
        : ` (${st.entry.fstype})`;
      throw new BkfsError('MOUNT_FAILED', `${mountpoint} is already mounted${by}`);
    }
    case 'stale':
      throw new BkfsError('MOUNT_FAILED', `cannot clean the stale mount at ${mountpoint}`);
  }
}

/** Mount and serve until `opts.stop` aborts or the mount goes away. */
export async function serveMount(opts: ServeOptions): Promise<void> {
  const { mountpoint } = opts;
  // The log is removed with a mount that ends cleanly; one that met damage, an error or a failure
  // (or a log kept from an earlier failed mount at this path) stays for the administrator.
  let keepLog =
    opts.logFile !== undefined && (fs.statSync(opts.logFile, { throwIfNoEntry: false })?.size ?? 0) > 0;
  const log = opts.log;
  const trouble = (line: string): void => {
    keepLog = true;
    log(line);
  };
  let cleanEnd = false;
  await prepareMountpoint(mountpoint, log);
  const repo = Repository.open(opts.repoDir, { readOnly: true });
  let vfs: CheckpointVfs | undefined;
  let mountId: number | undefined;
  // Backstop: an exception that escapes a handler's own guard or a background task (read-ahead)
  // is logged and the mount keeps serving; a dead daemon would leave a stale mount (ENOTCONN).
  const onStray = (e: unknown): void => {
    try {
      log(`error: unexpected failure outside a request (the mount keeps serving): ${errorMessage(e)}`);
    } catch {
      // nothing more to do
    }
  };
  process.on('uncaughtException', onStray);
  process.on('unhandledRejection', onStray);
  try {
    vfs = CheckpointVfs.open(repo, {
      ...(opts.ref !== undefined ? { ref: opts.ref } : {}),
      cacheBytes: opts.cacheBytes,
      fileMode: opts.fileMode,
      onDamage: (d) =>
        trouble(
          `damaged data: ${d.vm}@${d.checkpoint} ${d.disk} bytes ${d.offset}-${d.offset + d.length - 1} ` +
            `(${bytes(d.length)}) read as EIO: ${d.message}`,
        ),
      onNotice: log,
    });
    const cp = vfs.checkpoint;
    await mountFuse(vfs, mountpoint, { allowOther: opts.allowOther, onError: (m) => trouble(`error: ${m}`) });
    const mine = mountsAt(mountpoint);
    mountId = mine[mine.length - 1]?.mountId;
    const state: MountState = {
      pid: process.pid,
      startTime: processStartTime(process.pid),
      mountpoint,
      repo: opts.repoDir,
      ref: cp ? `${cp.vm.name}@${cp.checkpoint.name}` : null,
      log: opts.logFile ?? null,
      started: new Date().toISOString(),
    };
    writeState(state);
    const files = cp
      ? vfs.readdir('/').map((e) => ({ name: e.name, size: e.attr.size }))
      : vfs.readdir('/').map((e) => ({ name: `${e.name}/`, size: 0 }));
    log(
      `mounted ${state.ref ?? `repository ${opts.repoDir}`} on ${mountpoint} ` +
        `(pid ${process.pid}, cache ${bytes(opts.cacheBytes)})`,
    );
    opts.onReady?.({
      pid: process.pid,
      mountpoint,
      mode: vfs.mode,
      ref: state.ref,
      files,
      log: state.log,
    });
    const why = await waitForEnd(opts.stop, () => isOurs(mountpoint, mountId), opts.watchMs ?? 1000);
    log(why === 'gone' ? `${mountpoint} was unmounted` : `stopping: unmounting ${mountpoint}`);
    cleanEnd = true;
  } finally {
    if (mountId !== undefined && isOurs(mountpoint, mountId)) {
      const r = await fusermount(mountpoint, false);
      if (r.code !== 0 && isOurs(mountpoint, mountId)) {
        log(`${mountpoint} is busy (${r.message}); detaching it lazily`);
        await fusermount(mountpoint, true);
      }
    }
    vfs?.close();
    await repo.packs.drain();
    repo.close();
    process.off('uncaughtException', onStray);
    process.off('unhandledRejection', onStray);
    if (readState(mountpoint)?.pid === process.pid) removeState(mountpoint, process.pid);
    if (mountId !== undefined) log(`unmounted ${mountpoint}`);
    if (
      opts.logFile !== undefined &&
      cleanEnd &&
      !keepLog &&
      mountId !== undefined &&
      !isOurs(mountpoint, mountId)
    ) {
      fs.rmSync(opts.logFile, { force: true });
    }
  }
}

function isOurs(mountpoint: string, mountId: number | undefined): boolean {
  return mountId !== undefined && mountsAt(mountpoint).some((m) => m.mountId === mountId);
}

function waitForEnd(
  stop: AbortSignal,
  stillMounted: () => boolean,
  watchMs: number,
): Promise<'stop' | 'gone'> {
  return new Promise((resolve) => {
    const done = (why: 'stop' | 'gone') => {
      clearInterval(timer);
      stop.removeEventListener('abort', onAbort);
      resolve(why);
    };
    const onAbort = () => done('stop');
    const timer = setInterval(() => {
      if (!stillMounted()) done('gone');
    }, watchMs);
    if (stop.aborted) done('stop');
    else stop.addEventListener('abort', onAbort);
  });
}

// ---------------------------------------------------------------------------------------------
// Background start

export type ReadyMessage<T = MountedInfo> =
  { ok: true; info: T } | { ok: false; code: ErrorCode | 'INTERNAL'; message: string };

/** Child side: send the readiness message on `fd` and close it. */
export function sendReady<T = MountedInfo>(fd: number, msg: ReadyMessage<T>): void {
  try {
    fs.writeSync(fd, JSON.stringify(msg) + '\n');
    fs.closeSync(fd);
  } catch {
    // the parent is gone; nothing to tell
  }
}

/**
 * Tell the parent waiting on `fd` (if any, and if nothing was told yet) that starting failed with
 * `e`, so it exits with the same code and message as a foreground run would.
 */
export function sendReadyError(fd: number | undefined, e: unknown): void {
  if (fd === undefined) return;
  sendReady(
    fd,
    isBkfsError(e)
      ? { ok: false, code: e.code, message: e.message }
      : { ok: false, code: 'INTERNAL', message: errorMessage(e) },
  );
}

export interface StartOptions {
  /** Program and arguments of the daemon (it must accept `--ready-fd 3`). */
  command: string;
  args: string[];
  logFile: string;
  /** Give up (and kill the child) after this long without an answer. */
  timeoutMs?: number;
}

/**
 * Start a detached daemon and wait for its readiness message. Resolves with what it mounted;
 * rejects with the daemon's own error (same code) or MOUNT_FAILED if it died without a word.
 */
/** (Also used by `bkfs serve`, whose daemon reports its own info type `T`.) */
export function startDaemon<T = MountedInfo>(o: StartOptions): Promise<T> {
  mkdirPrivateSync(path.dirname(o.logFile), { recursive: true });
  const logFd = openPrivateSync(o.logFile, 'a');
  let child;
  try {
    child = spawn(o.command, o.args, {
      detached: true,
      cwd: '/',
      stdio: ['ignore', logFd, logFd, 'pipe'],
    });
  } finally {
    fs.closeSync(logFd);
  }
  const pipe = child.stdio[3] as NodeJS.ReadableStream | null;
  return new Promise<T>((resolve, reject) => {
    let text = '';
    let settled = false;
    const finish = (err: Error | null, info?: T) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      pipe?.removeAllListeners();
      (pipe as { destroy?: () => void } | null)?.destroy?.();
      child.unref();
      if (err) reject(err);
      else resolve(info!);
    };
    const timer = setTimeout(() => {
      if (child.pid !== undefined) child.kill('SIGKILL');
      finish(new BkfsError('MOUNT_FAILED', `the mount daemon did not get ready in time; see ${o.logFile}`));
    }, o.timeoutMs ?? 120000);
    const lastLog = () => {
      try {
        const lines = fs.readFileSync(o.logFile, 'utf8').trim().split('\n');
        return lines[lines.length - 1] ?? '';
      } catch {
        return '';
      }
    };
    child.on('error', (e) =>
      finish(new BkfsError('MOUNT_FAILED', `cannot start the mount daemon: ${e.message}`)),
    );
    pipe?.on('data', (d: Buffer) => {
      text += d.toString('utf8');
      const nl = text.indexOf('\n');
      if (nl < 0) return;
      let msg: ReadyMessage<T>;
      try {
        msg = JSON.parse(text.slice(0, nl)) as ReadyMessage<T>;
      } catch (e) {
        finish(new BkfsError('MOUNT_FAILED', `bad message from the mount daemon: ${errorMessage(e)}`));
        return;
      }
      if (msg.ok) finish(null, msg.info);
      else if (msg.code === 'INTERNAL') finish(new Error(msg.message));
      else finish(new BkfsError(msg.code, msg.message));
    });
    // End of the pipe without a message: the daemon died (its own error, if any, is in the log).
    pipe?.on('end', () =>
      finish(
        new BkfsError(
          'MOUNT_FAILED',
          `the mount daemon exited before the mount was ready: ${lastLog() || 'no output'} (log ${o.logFile})`,
        ),
      ),
    );
    pipe?.on('error', () => undefined);
  });
}
