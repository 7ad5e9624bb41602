/**
 * Creating files and directories that other local users cannot read, whatever the umask.
 *
 * Every file bkfs creates (repository files, restored images, exported chains, mount logs and
 * state, temporary files) goes through these helpers: a new file is created with mode 0600 (so it
 * is never readable by others, not even for the moment before a chmod) and then set to its final
 * mode with fchmod (0600 unless the caller asks for another one, e.g. a guest file's own mode
 * after `bkfs cp`); a new directory is created 0700. An existing file or directory keeps its mode:
 * an administrator who made a repository group-readable on purpose keeps it that way.
 *
 * Repository files follow the repository's root directory (`repoModes`): when an administrator
 * gave the root group read (and search) permission but none to others (e.g. 0750), new files get
 * group read and new directories group read+search, so group readers keep seeing new packs and
 * manifests. Never "other" bits.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';

export const PRIVATE_FILE_MODE = 0o600;
export const PRIVATE_DIR_MODE = 0o700;

export interface Modes {
  file: number;
  dir: number;
}

export const PRIVATE: Modes = { file: PRIVATE_FILE_MODE, dir: PRIVATE_DIR_MODE };

/**
 * Modes for new files inside the repository at `root`: private, plus group read (and search for
 * directories) when the root directory has them. Private when the root cannot be stat'ed.
 */
export function repoModes(root: string): Modes {
  let mode: number;
  try {
    mode = fs.statSync(root).mode;
  } catch {
    return PRIVATE;
  }
  // Group sharing only when it is deliberate: group bits without "other" bits (e.g. 0750). A
  // directory that everyone can read (a default 0755) says nothing about intent: stay private.
  if ((mode & 0o007) !== 0) return PRIVATE;
  return {
    file: PRIVATE_FILE_MODE | (mode & 0o040),
    dir: PRIVATE_DIR_MODE | (mode & 0o050),
  };
}

/**
 * Create `dir` (and, with `recursive`, its missing parents) with `mode` (0700 by default). Only
 * directories this call creates are chmod'ed; existing ones keep their mode. Returns the first
 * directory it created (as `fs.mkdirSync` with `recursive` does), or undefined when `dir` existed:
 * the caller fsyncs that directory's parent to make the new entry durable.
 */
export function mkdirPrivateSync(
  dir: string,
  opts: { recursive?: boolean; mode?: number } = {},
): string | undefined {
  const mode = opts.mode ?? PRIVATE_DIR_MODE;
  const missing: string[] = [];
  if (opts.recursive) {
    for (let d = path.resolve(dir); !fs.existsSync(d); d = path.dirname(d)) {
      missing.unshift(d);
      if (path.dirname(d) === d) break;
    }
    let first: string | undefined;
    for (const d of missing) if (mkdirOne(d, mode)) first ??= d;
    return first;
  }
  return mkdirOne(dir, mode) ? path.resolve(dir) : undefined;
}

/** Create one directory; false when it already existed. */
function mkdirOne(d: string, mode: number): boolean {
  try {
    fs.mkdirSync(d, { mode: mode & PRIVATE_DIR_MODE });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST' && fs.statSync(d).isDirectory()) return false;
    throw e;
  }
  fs.chmodSync(d, mode);
  return true;
}

export function mkdirPrivate(
  dir: string,
  opts: { recursive?: boolean; mode?: number } = {},
): Promise<string | undefined> {
  try {
    return Promise.resolve(mkdirPrivateSync(dir, opts));
  } catch (e) {
    return Promise.reject(e as Error);
  }
}

export type CreateFlag = 'w' | 'wx' | 'a' | 'w+' | 'wx+' | 'a+';

function baseFlags(flag: CreateFlag): { noCreate: number; exclusive: boolean } {
  const C = fs.constants;
  const rw = flag.endsWith('+') ? C.O_RDWR : C.O_WRONLY;
  switch (flag) {
    case 'w':
    case 'w+':
      return { noCreate: rw | C.O_TRUNC, exclusive: false };
    case 'wx':
    case 'wx+':
      return { noCreate: rw, exclusive: true };
    default:
      return { noCreate: rw | C.O_APPEND, exclusive: false };
  }
}

/**
 * Open `file` for writing the way `fs.openSync(file, flag)` would, except that a file this call
 * creates is created 0600 and then fchmod'ed to `mode` (0600 by default). An existing file keeps
 * its mode ('w' truncates it, 'a' appends, 'wx' fails with EEXIST). Returns the descriptor.
 */
export function openPrivateSync(file: string, flag: CreateFlag = 'w', mode = PRIVATE_FILE_MODE): number {
  const C = fs.constants;
  const { noCreate, exclusive } = baseFlags(flag);
  let fd: number;
  try {
    fd = fs.openSync(file, noCreate | C.O_CREAT | C.O_EXCL, PRIVATE_FILE_MODE);
  } catch (e) {
    if (exclusive || (e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    return fs.openSync(file, noCreate);
  }
  try {
    fs.fchmodSync(fd, mode);
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
  return fd;
}

/** Async form of `openPrivateSync`. */
export async function openPrivate(
  file: string,
  flag: CreateFlag = 'w',
  mode = PRIVATE_FILE_MODE,
): Promise<fsp.FileHandle> {
  const C = fs.constants;
  const { noCreate, exclusive } = baseFlags(flag);
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(file, noCreate | C.O_CREAT | C.O_EXCL, PRIVATE_FILE_MODE);
  } catch (e) {
    if (exclusive || (e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    return fsp.open(file, noCreate);
  }
  try {
    await fh.chmod(mode);
  } catch (e) {
    await fh.close();
    throw e;
  }
  return fh;
}

/** `fs.writeFileSync` with `openPrivateSync`'s modes. */
export function writeFilePrivateSync(
  file: string,
  data: string | Uint8Array,
  opts: { flag?: CreateFlag; mode?: number } = {},
): void {
  const fd = openPrivateSync(file, opts.flag ?? 'w', opts.mode);
  try {
    fs.writeFileSync(fd, data);
  } finally {
    fs.closeSync(fd);
  }
}

/** Async `writeFilePrivateSync`. */
export async function writeFilePrivate(
  file: string,
  data: string | Uint8Array,
  opts: { flag?: CreateFlag; mode?: number } = {},
): Promise<void> {
  const fh = await openPrivate(file, opts.flag ?? 'w', opts.mode);
  try {
    await fh.writeFile(data);
  } finally {
    await fh.close();
  }
}

/**
 * Make sure an SQLite database file exists with `mode` before SQLite opens it: SQLite creates a
 * new database with the umask's mode, and its `-wal` / `-shm` / `-journal` files copy the mode of
 * the database file. An empty file is a valid empty database.
 */
export function precreateDbFile(file: string, mode = PRIVATE_FILE_MODE): void {
  fs.closeSync(openPrivateSync(file, 'a', mode));
}

/**
 * "Others can read it" check for `init`: true when `dir` exists and its mode gives "other" users
 * read or search permission.
 */
export function othersCanRead(dir: string): boolean {
  try {
    const st = fs.statSync(dir);
    return st.isDirectory() && (st.mode & 0o005) !== 0;
  } catch {
    return false;
  }
}

/** fsync a directory: makes its entries (creates, renames, unlinks) durable. */
export function fsyncDirSync(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Write a small file atomically and durably, created with `mode`: temp file, fsync, rename, fsync
 * the directory (FORMAT.md, "Durability", rule 2).
 */
export function writeFileDurable(file: string, data: Buffer, mode: number): void {
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = openPrivateSync(tmp, 'w', mode);
  try {
    let off = 0;
    while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  fsyncDirSync(path.dirname(file));
}
