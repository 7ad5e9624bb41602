/**
 * Writer sessions (format 3, FORMAT.md "Concurrent writers"): how concurrent writers (backups,
 * forget, gc, ...) tell each other, and gc, that they are alive.
 *
 * A session is a small immutable JSON file `writers/<pid>-<random>.json` = {pid, host, command,
 * time, lock: "flock"} whose creator holds an exclusive flock(2) on it for as long as it writes
 * the repository. As with pins (`pins.ts`): it is written and locked under a temporary name and
 * renamed into place, so it is never visible unlocked; it is live exactly while that flock is held
 * (the kernel drops it when the writer exits or is killed), nothing is guessed from PIDs.
 *
 * What sessions decide:
 *   - a `running` checkpoint whose `checkpoints.writer` session is not live belongs to a dead
 *     writer: recovery deletes it (a live writer's running checkpoint is left alone);
 *   - `tmp/<session>/` holds that writer's temp packs: cleanup removes only directories of dead
 *     sessions (and loose files of older versions);
 *   - gc records the sessions live right after it marked deletion candidates, and deletes those
 *     candidates only once all of them ended (and, for unindexed pack files, the same).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { flockSync } from 'fs-ext';
import { mkdirPrivateSync, repoModes } from '../util/private-fs';

export const SESSIONS_DIR = 'writers';
const SUFFIX = '.json';
const MAX_SESSION_BYTES = 64 * 1024;

export interface SessionInfo {
  pid: number;
  host: string;
  command: string;
  time: string;
  lock: 'flock';
  /** The session's name (file name without `.json`). */
  name?: string;
}

/** A writer session held by this process until `end()` (or its death). */
export class Session {
  private fd: number | undefined;

  constructor(
    readonly dir: string,
    readonly name: string,
    fd: number,
    readonly info: SessionInfo,
  ) {
    this.fd = fd;
  }

  get live(): boolean {
    return this.fd !== undefined;
  }

  end(): void {
    const fd = this.fd;
    if (fd === undefined) return;
    this.fd = undefined;
    fs.rmSync(path.join(this.dir, SESSIONS_DIR, this.name + SUFFIX), { force: true });
    fs.rmSync(path.join(this.dir, 'tmp', this.name), { recursive: true, force: true });
    fs.closeSync(fd);
  }
}

/** Start a session in repository `dir` for `command`. */
export function startSession(dir: string, command: string): Session {
  const sdir = path.join(dir, SESSIONS_DIR);
  mkdirPrivateSync(sdir, { recursive: true, mode: repoModes(dir).dir });
  const name = `${process.pid}-${randomBytes(6).toString('hex')}`;
  const tmp = path.join(sdir, `.${name}.tmp`);
  const info: SessionInfo = {
    pid: process.pid,
    host: os.hostname(),
    command,
    time: new Date().toISOString(),
    lock: 'flock',
  };
  const fd = fs.openSync(
    tmp,
    fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW,
    repoModes(dir).file,
  );
  try {
    flockSync(fd, 'exnb'); // a new file nobody else has: never blocks
    fs.writeSync(fd, JSON.stringify(info));
    fs.renameSync(tmp, path.join(sdir, name + SUFFIX));
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  return new Session(dir, name, fd, info);
}

function isWouldBlock(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'EAGAIN' || code === 'EWOULDBLOCK';
}

/** Is the session `name` live (its file exists and its flock is held by someone)? */
export function sessionLive(dir: string, name: string): boolean {
  if (!/^[0-9]+-[0-9a-f]+$/.test(name)) return false;
  let fd: number;
  try {
    fd = fs.openSync(
      path.join(dir, SESSIONS_DIR, name + SUFFIX),
      fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK,
    );
  } catch {
    return false;
  }
  try {
    flockSync(fd, 'shnb');
    return false; // we could lock it: nobody holds it
  } catch (e) {
    if (isWouldBlock(e)) return true;
    throw e;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Live sessions, oldest file name order; files of dead sessions (and temp files of writers that
 * died before the rename, older than a minute) are removed. Never throws for a broken file: a
 * session file that cannot be parsed but is locked counts as live (its info unknown).
 */
export function liveSessions(dir: string): SessionInfo[] {
  const sdir = path.join(dir, SESSIONS_DIR);
  let names: string[];
  try {
    names = fs.readdirSync(sdir);
  } catch {
    return [];
  }
  const out: SessionInfo[] = [];
  for (const n of names.sort()) {
    const p = path.join(sdir, n);
    const tmp = n.startsWith('.') && n.endsWith('.tmp');
    if (!tmp && !n.endsWith(SUFFIX)) continue;
    let fd: number;
    try {
      fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    } catch {
      continue;
    }
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) continue;
      let held = false;
      try {
        flockSync(fd, 'shnb');
      } catch (e) {
        if (!isWouldBlock(e)) throw e;
        held = true;
      }
      if (tmp) {
        if (!held && Date.now() - st.mtimeMs > 60_000) fs.rmSync(p, { force: true });
        continue;
      }
      const name = n.slice(0, -SUFFIX.length);
      if (!held) {
        fs.rmSync(p, { force: true }); // names are unique: this removes only that dead session
        continue;
      }
      let info: SessionInfo = { pid: 0, host: '?', command: '?', time: '?', lock: 'flock' };
      try {
        const size = Math.min(st.size, MAX_SESSION_BYTES);
        const buf = Buffer.alloc(size);
        const got = size > 0 ? fs.readSync(fd, buf, 0, size, 0) : 0;
        info = JSON.parse(buf.subarray(0, got).toString('utf8')) as SessionInfo;
      } catch {
        // being written or not ours: live, info unknown
      }
      out.push({ ...info, name });
    } finally {
      fs.closeSync(fd);
    }
  }
  return out;
}

/**
 * Remove what dead writers left in `tmp/`: directories of sessions that are not live, and loose
 * files (temp packs of bkfs before format 3, which ran alone). Live writers' directories stay.
 */
export function cleanTmp(dir: string): void {
  const tmp = path.join(dir, 'tmp');
  mkdirPrivateSync(tmp, { recursive: true, mode: repoModes(dir).dir });
  for (const f of fs.readdirSync(tmp)) {
    if (sessionLive(dir, f)) continue;
    fs.rmSync(path.join(tmp, f), { force: true, recursive: true });
  }
}
