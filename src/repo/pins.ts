/**
 * Pins: how a long-lived reader (a mount, a restore, an export, a file session) tells forget/gc
 * which checkpoints it is using.
 *
 * A pin is a small immutable JSON file `pins/<pid>-<random>.json` = {pid, host, checkpoints:
 * number[], time, lock: "flock"} whose creator holds an exclusive flock(2) on it for as long as
 * the pin lasts (see `lock.ts` for why flock). A pin is live exactly while that flock is held: the
 * kernel drops it when the reader dies, so a pin file that can be locked by someone else is stale
 * (removed by `activePins`); nothing is guessed from PIDs. The file is written and locked under a
 * temporary name and renamed into place, so a pin is never visible unlocked or half-written; it is
 * never rewritten (`Pin.add` creates one more file), so a scan never meets a torn pin or misses a
 * checkpoint because a file was being replaced. Pin files of older bkfs versions (no `lock` field,
 * no flock) are live while their pid is alive on this host.
 *
 * The protocol (proved in FORMAT.md, "Pins"): a reader pins a checkpoint, THEN checks that it is
 * still `complete`, and only then reads its rows; `forget` first commits the checkpoint's state
 * `forgotten`, THEN reads the pins, and deletes rows only of checkpoints nobody pins; gc deletes
 * rows only of checkpoints that were already forgotten before it read the pins. So a reader either
 * sees `forgotten` and refuses, or its pin is seen and the rows stay until it is done.
 *
 * A pin file that cannot be read or parsed is REPO_CORRUPT for forget and gc (never "no pin").
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { flockSync } from 'fs-ext';
import { BkfsError } from '../errors';
import { checkpointById, type CheckpointRow } from '../index/catalog';
import type { Repository } from './repository';
import { processAlive } from '../util/proc';

export const PINS_DIR = 'pins';
const PIN_SUFFIX = '.json';
/** A pin lists checkpoint ids: 1 MiB is tens of thousands of them. Larger is not a pin. */
export const MAX_PIN_BYTES = 1 << 20;

export interface PinInfo {
  pid: number;
  host: string;
  checkpoints: number[];
  time: string;
  /** "flock" for pins held by a flock; absent in pins of older bkfs versions (PID-based). */
  lock?: string;
  /** The pin's file name in `pins/`. */
  file?: string;
}

interface PinFile {
  file: string;
  fd: number;
}

/** A set of pinned checkpoints, held until `release()` (or the death of this process). */
export class Pin {
  private released = false;
  private readonly files: PinFile[] = [];
  private readonly ids = new Set<number>();

  constructor(
    private readonly dir: string,
    checkpoints: number[],
  ) {
    this.files.push(writePinFile(dir, [...new Set(checkpoints)]));
    for (const id of checkpoints) this.ids.add(id);
  }

  /** The checkpoints pinned so far. */
  get checkpoints(): number[] {
    return [...this.ids].sort((a, b) => a - b);
  }

  /** Pin one more checkpoint (a tree mount opening another one): one more pin file. */
  add(id: number): void {
    if (this.released || this.ids.has(id)) return;
    this.files.push(writePinFile(this.dir, [id]));
    this.ids.add(id);
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    for (const f of this.files) {
      fs.rmSync(path.join(this.dir, f.file), { force: true });
      fs.closeSync(f.fd);
    }
    this.files.length = 0;
  }
}

function pinsDir(repo: { dir: string }): string {
  return path.join(repo.dir, PINS_DIR);
}

/** Write a pin file, locked before it becomes visible under its final name. */
function writePinFile(dir: string, checkpoints: number[]): PinFile {
  const name = `${process.pid}-${randomBytes(6).toString('hex')}${PIN_SUFFIX}`;
  const tmp = path.join(dir, `.${name}.tmp`);
  const info: PinInfo = {
    pid: process.pid,
    host: os.hostname(),
    checkpoints: [...checkpoints].sort((a, b) => a - b),
    time: new Date().toISOString(),
    lock: 'flock',
  };
  const fd = fs.openSync(
    tmp,
    fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW,
    0o600,
  );
  try {
    flockSync(fd, 'exnb'); // a new file nobody else has: never blocks
    fs.writeSync(fd, JSON.stringify(info));
    fs.renameSync(tmp, path.join(dir, name));
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  return { file: name, fd };
}

/** Pin `checkpoints` (by id). Then check that they are still complete (`assertStillComplete`). */
export function pinCheckpoints(repo: { dir: string }, checkpoints: number[]): Pin {
  const dir = pinsDir(repo);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  return new Pin(dir, checkpoints);
}

/** NOT_FOUND unless checkpoint `cp` is still complete (call after pinning it). */
export function assertStillComplete(repo: Repository, cp: CheckpointRow, vm: string, what: string): void {
  if (checkpointById(repo.db, cp.id)?.state !== 'complete') {
    throw new BkfsError('NOT_FOUND', `checkpoint ${vm}@${cp.name} was removed while ${what} started`);
  }
}

function corrupt(file: string, why: string): BkfsError {
  return new BkfsError(
    'REPO_CORRUPT',
    `pin file ${file} is unreadable (${why}); if no bkfs mount, restore or file session runs, remove it`,
  );
}

/** Parse a pin file's content; REPO_CORRUPT when it is not a pin. */
function parsePin(file: string, text: string): PinInfo {
  let j: unknown;
  try {
    j = JSON.parse(text);
  } catch {
    throw corrupt(file, 'not JSON');
  }
  const o = j as Partial<PinInfo> | null;
  if (
    typeof o !== 'object' ||
    o === null ||
    typeof o.pid !== 'number' ||
    typeof o.host !== 'string' ||
    !Array.isArray(o.checkpoints) ||
    !o.checkpoints.every((c) => Number.isSafeInteger(c))
  ) {
    throw corrupt(file, 'not a pin');
  }
  return { ...(o as PinInfo), file: path.basename(file) };
}

/**
 * Pins held by live readers; stale pin files (their flock is free) are removed. Throws
 * REPO_CORRUPT for a pin file that cannot be read or parsed: forget and gc must never take a
 * broken pin for no pin.
 */
export function activePins(repo: { dir: string }): PinInfo[] {
  const dir = pinsDir(repo);
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((n) => n.endsWith(PIN_SUFFIX) && !n.startsWith('.'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new BkfsError('REPO_CORRUPT', `cannot list ${dir}: ${(e as Error).message}`);
  }
  const out: PinInfo[] = [];
  for (const n of names.sort()) {
    const p = path.join(dir, n);
    let fd: number;
    try {
      fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // released meanwhile
      throw corrupt(p, (e as NodeJS.ErrnoException).code ?? String(e));
    }
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) throw corrupt(p, 'not a regular file');
      if (st.size > MAX_PIN_BYTES) throw corrupt(p, `${st.size} bytes, more than a pin holds`);
      let held = false;
      try {
        flockSync(fd, 'shnb');
      } catch (e) {
        if (!isWouldBlock(e)) throw e;
        held = true;
      }
      const buf = Buffer.alloc(st.size);
      const got = st.size > 0 ? fs.readSync(fd, buf, 0, st.size, 0) : 0;
      const info = parsePin(p, buf.subarray(0, got).toString('utf8'));
      if (held) {
        out.push(info);
        continue;
      }
      // Nobody holds its flock: a dead reader's pin, unless an older bkfs (PID-based) wrote it.
      if (legacyLive(info)) out.push(info);
      else fs.rmSync(p, { force: true }); // names are unique: this removes only that dead pin
    } finally {
      fs.closeSync(fd);
    }
  }
  return out;
}

/** A pin of an older bkfs (no flock): live unless its process is gone from this host. */
function legacyLive(info: PinInfo): boolean {
  return info.lock === undefined && !(info.host === os.hostname() && !processAlive(info.pid));
}

/**
 * Tidy `pins/`: remove pin files whose flock nobody holds (their reader died) and temporary files
 * of pin writers that died before the rename (older than a minute, unlocked). Never throws: a
 * broken pin is left for forget/gc to report.
 */
export function removeStalePins(repo: { dir: string }): void {
  const dir = pinsDir(repo);
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) {
    const p = path.join(dir, n);
    const tmp = n.startsWith('.') && n.endsWith('.tmp');
    if (!tmp && !n.endsWith(PIN_SUFFIX)) continue;
    try {
      const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
      try {
        const st = fs.fstatSync(fd);
        if (!st.isFile() || st.size > MAX_PIN_BYTES) continue;
        if (tmp && Date.now() - st.mtimeMs < 60_000) continue;
        flockSync(fd, 'shnb'); // throws while a live reader holds it
        if (!tmp) {
          const buf = Buffer.alloc(st.size);
          const info = parsePin(p, buf.subarray(0, fs.readSync(fd, buf, 0, st.size, 0)).toString('utf8'));
          if (legacyLive(info)) continue;
        }
        fs.rmSync(p, { force: true });
      } finally {
        fs.closeSync(fd);
      }
    } catch {
      // held, gone or broken: leave it
    }
  }
}

function isWouldBlock(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'EAGAIN' || code === 'EWOULDBLOCK';
}

/** Ids of every checkpoint pinned by a live process. */
export function pinnedCheckpointIds(repo: { dir: string }): Set<number> {
  return new Set(activePins(repo).flatMap((p) => p.checkpoints));
}
