/**
 * The repository's writer lock: at most one process writes the index at a time (backup, forget,
 * gc, verify's damage marking, protect/unprotect, repair).
 *
 * Mechanism: flock(2) on the file `lock`, through the `fs-ext` native module. Why flock:
 *   - the kernel releases it when its holder dies (the last descriptor of the open file
 *     description is closed on exit, kill -9 included), so there is no "stale lock" to detect and
 *     nothing is guessed from PIDs or hostnames (PIDs are per namespace: in containers the old
 *     "is pid N alive here?" test answered wrong), and there is no takeover race: acquiring is one
 *     atomic syscall, whoever gets it holds it;
 *   - flock belongs to the open file description, not to the process: unlike POSIX fcntl locks (and
 *     so unlike an SQLite lock on a lock database), another open/close of the same file in this
 *     process (reading the holder's info, a backup tool copying the repository) never drops it;
 *   - Node opens every file with O_CLOEXEC, so helper processes (qemu-nbd, nbdkit, guestfish) never
 *     inherit the descriptor and cannot keep the lock alive after bkfs died;
 *   - it has a shared mode (LOCK_SH): issue 12's concurrent backups can take `shared` while gc
 *     takes `exclusive` with the same file and the same code path (only `exclusive` is used today).
 * The file is never deleted (deleting a locked file would let a second process lock a new file of
 * the same name). After locking, the holder checks that the file it locked is still the one at
 * that path (someone may have removed it) and retries otherwise.
 *
 * The file's content is information for people only: JSON {pid, host, command, time, lock:
 * "flock"} of the current holder, written after locking and truncated away on release, so that
 * REPO_LOCKED can say who holds the lock. Older bkfs versions created `lock` with O_EXCL, wrote the
 * same JSON without the `lock` field, and deleted it on release; such a file whose pid is alive on
 * this host is still honoured (an older bkfs is writing), and an older bkfs refuses to run beside a
 * newer one (it sees the holder's JSON, or an empty file it cannot parse).
 *
 * On NFS, Linux implements flock with NFS byte-range locks (works across clients with NFSv4).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { flockSync } from 'fs-ext';
import { BkfsError } from '../errors';
import { processAlive } from '../util/proc';

export const LOCK_FILE = 'lock';
/** The holder info is a few hundred bytes; anything larger is not ours and is not read whole. */
const MAX_INFO_BYTES = 64 * 1024;

export interface LockInfo {
  pid: number;
  host: string;
  command: string;
  time: string;
  /** "flock" for this lock; absent in lock files of older bkfs versions (PID-based). */
  lock?: string;
}

export interface LockOptions {
  /**
   * 'exclusive' (default): alone (repair --rebuild-index, migrations, the maintenance lock).
   * 'shared': beside other shared holders (backups, forget, gc, ...), never beside an exclusive
   * one. A shared holder writes no holder info into the file (there are many; their sessions in
   * `writers/` say who they are).
   */
  mode?: 'exclusive' | 'shared';
  /** The lock file's name in the repository (default `lock`; `maint-lock` for maintenance). */
  file?: string;
  /** Keep trying this long (ms) while another process holds the lock; default: `setDefaultLockWait`, else 0. */
  waitMs?: number;
  /** Poll interval while waiting (ms), default 100. */
  pollMs?: number;
}

let defaultWaitMs = 0;

/**
 * Set how long every later `acquireWriterLock` without its own `waitMs` keeps trying (ms; 0 =
 * fail at once, the default). For a CLI option such as `--retry-lock`, set once at startup, so
 * every command that takes the lock (backup, forget, gc, verify, protect, repair) honours it.
 */
export function setDefaultLockWait(ms: number): void {
  if (!Number.isFinite(ms) || ms < 0) throw new BkfsError('USAGE', `lock wait must be >= 0 ms, got ${ms}`);
  defaultWaitMs = ms;
}

/** A held writer lock. `release()` is idempotent; process exit releases it too. */
export class WriterLock {
  private fd: number | undefined;

  constructor(
    readonly dir: string,
    fd: number,
    readonly info: LockInfo,
    readonly mode: 'exclusive' | 'shared' = 'exclusive',
  ) {
    this.fd = fd;
  }

  /**
   * Turn a shared lock into an exclusive one without waiting (REPO_LOCKED naming the other
   * holders when it cannot), for a migration; `downgrade()` turns it back. flock(2) converts in
   * place, but not atomically: between the two states another process may take the lock.
   */
  upgrade(command: string): void {
    if (this.fd === undefined) throw new Error('lock not held');
    try {
      flockSync(this.fd, 'exnb');
    } catch (e) {
      if (!isWouldBlock(e)) throw e;
      throw lockedError(this.dir, undefined, true);
    }
    writeInfo(this.fd, command);
  }

  downgrade(): void {
    if (this.fd === undefined) throw new Error('lock not held');
    fs.ftruncateSync(this.fd, 0);
    flockSync(this.fd, 'sh');
  }

  get held(): boolean {
    return this.fd !== undefined;
  }

  release(): void {
    const fd = this.fd;
    if (fd === undefined) return;
    this.fd = undefined;
    try {
      // The info describes the exclusive holder; there is none now. (A shared holder never wrote
      // it, and must not erase an exclusive holder's that is waiting... it cannot exist meanwhile.)
      if (this.mode === 'exclusive') fs.ftruncateSync(fd, 0);
    } finally {
      fs.closeSync(fd); // releases the flock
    }
  }
}

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function isWouldBlock(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'EAGAIN' || code === 'EWOULDBLOCK';
}

/** Read the holder info from an open descriptor (bounded); undefined when empty or not ours. */
function readInfoFd(fd: number): LockInfo | undefined {
  const size = Math.min(fs.fstatSync(fd).size, MAX_INFO_BYTES);
  if (size === 0) return undefined;
  const buf = Buffer.alloc(size);
  const n = fs.readSync(fd, buf, 0, size, 0);
  try {
    const j = JSON.parse(buf.subarray(0, n).toString('utf8')) as LockInfo;
    return typeof j === 'object' && j !== null && typeof j.pid === 'number' ? j : undefined;
  } catch {
    return undefined;
  }
}

/** The holder info as the lock file shows it now (for messages), if any. */
export function readLockInfo(dir: string): LockInfo | undefined {
  return readInfoAt(path.join(dir, LOCK_FILE));
}

function readInfoAt(file: string): LockInfo | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch {
    return undefined;
  }
  try {
    return readInfoFd(fd);
  } finally {
    fs.closeSync(fd); // a flock is per open file description: closing this one drops nothing
  }
}

function writeInfo(fd: number, command: string): LockInfo {
  const info: LockInfo = {
    pid: process.pid,
    host: os.hostname(),
    command,
    time: new Date().toISOString(),
    lock: 'flock',
  };
  const buf = Buffer.from(JSON.stringify(info) + '\n');
  fs.ftruncateSync(fd, 0);
  fs.writeSync(fd, buf, 0, buf.length, 0);
  return info;
}

/** Who the running writers are, from their sessions (`sessions.ts`), for REPO_LOCKED messages. */
function sessionHolders(dir: string): string | undefined {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { liveSessions } = require('./sessions') as typeof import('./sessions');
  let live: { pid: number; host: string; command: string; time: string }[] = [];
  try {
    live = liveSessions(dir).filter((s) => s.pid !== process.pid);
  } catch {
    return undefined;
  }
  if (live.length === 0) return undefined;
  const shown = live.slice(0, 4).map((h) => `pid ${h.pid} on ${h.host} (${h.command}, since ${h.time})`);
  return shown.join(', ') + (live.length > shown.length ? ` and ${live.length - shown.length} more` : '');
}

function lockedError(dir: string, holder: LockInfo | undefined, wantedExclusive = false): BkfsError {
  const who = holder
    ? `pid ${holder.pid} on ${holder.host} (${holder.command}, since ${holder.time})`
    : ((wantedExclusive ? sessionHolders(dir) : undefined) ?? 'another process');
  return new BkfsError('REPO_LOCKED', `repository ${dir} is locked by ${who}`, {
    ...(holder ? { holder } : {}),
  });
}

/** A lock file written by an older bkfs (O_EXCL + PID) whose process is alive on this host. */
function legacyHolder(info: LockInfo | undefined): LockInfo | undefined {
  if (!info || info.lock !== undefined) return undefined;
  return info.host === os.hostname() && processAlive(info.pid) ? info : undefined;
}

/**
 * Take the writer lock of the repository in `dir` for `command` (shown to whoever is refused).
 * Fails with REPO_LOCKED, naming the holder, when another process holds it and `waitMs` passed.
 * Used by `Repository.lockWriter` and by the index rebuild, which runs without an index.
 */
export function acquireWriterLock(dir: string, command: string, o: LockOptions = {}): WriterLock {
  const lockPath = path.join(dir, o.file ?? LOCK_FILE);
  const mode = o.mode ?? 'exclusive';
  const deadline = Date.now() + Math.max(0, o.waitMs ?? defaultWaitMs);
  const poll = Math.max(1, o.pollMs ?? 100);
  for (;;) {
    let fd: number;
    try {
      fd = fs.openSync(lockPath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o600);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') {
        throw new BkfsError('REPO_NOT_FOUND', `no bkfs repository at ${dir}`);
      }
      if (code === 'EACCES' || code === 'EROFS' || code === 'EPERM') {
        throw new BkfsError('PERMISSION_DENIED', `cannot open ${lockPath} to lock the repository (${code})`);
      }
      throw e;
    }
    let holder: LockInfo | undefined;
    let locked = false;
    try {
      flockSync(fd, mode === 'shared' ? 'shnb' : 'exnb');
      locked = true;
      // The file we locked must still be the lock file: a process that locked a file just removed
      // from the directory holds nothing.
      const mine = fs.fstatSync(fd);
      let current: fs.Stats | undefined;
      try {
        current = fs.statSync(lockPath);
      } catch {
        current = undefined;
      }
      if (!current || current.ino !== mine.ino || current.dev !== mine.dev) {
        fs.closeSync(fd);
        continue;
      }
      holder = legacyHolder(readInfoFd(fd));
      if (!holder) {
        if (mode === 'shared') {
          const info: LockInfo = {
            pid: process.pid,
            host: os.hostname(),
            command,
            time: new Date().toISOString(),
            lock: 'flock',
          };
          return new WriterLock(dir, fd, info, 'shared');
        }
        return new WriterLock(dir, fd, writeInfo(fd, command));
      }
    } catch (e) {
      fs.closeSync(fd);
      if (!isWouldBlock(e)) throw e;
    }
    // Held by another process (or an older bkfs).
    if (locked) fs.closeSync(fd);
    if (Date.now() >= deadline) {
      const info = holder ?? readInfoAt(lockPath);
      throw lockedError(dir, info, mode === 'exclusive' && info === undefined);
    }
    sleepMs(Math.min(poll, Math.max(1, deadline - Date.now())));
  }
}

/**
 * Who holds the writer lock right now, without taking it: the exclusive holder's info, `{}` when
 * it is held but says nothing (shared holders, or being written), or undefined when it is free.
 * Shared holders (concurrent backups) are found by their sessions (`writers/`). For status
 * displays and tests.
 */
export function writerLockHolder(dir: string): LockInfo | Record<string, never> | undefined {
  let fd: number;
  try {
    fd = fs.openSync(path.join(dir, LOCK_FILE), fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch {
    return undefined;
  }
  try {
    const info = readInfoFd(fd);
    try {
      flockSync(fd, 'shnb');
    } catch (e) {
      if (isWouldBlock(e)) return info ?? {};
      throw e;
    }
    const legacy = legacyHolder(info);
    if (legacy) return legacy;
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { liveSessions } = require('./sessions') as typeof import('./sessions');
    return liveSessions(dir).length > 0 ? {} : undefined;
  } finally {
    fs.closeSync(fd);
  }
}
