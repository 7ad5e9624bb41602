/**
 * Filesystem errors on paths the user named (a repository directory, a restore target, a copy
 * destination, a mount point) turned into coded one-line messages, and a `mkdir -p` that cannot
 * loop.
 *
 * Node's `fs.mkdirSync(p, { recursive: true })` spins forever at 100 % CPU when a parent refuses
 * the new directory with ENOENT instead of EACCES (under /proc, for one: `mkdir /proc/nope`
 * answers ENOENT, so Node retries the parent, which exists, and starts again). `makeDirs` walks
 * the path itself, creating one level at a time, so every failure ends it at once.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError, type ErrorCode } from '../errors';

/** errno codes that describe the user's path or machine, not a bug in bkfs. */
const PERMISSION = new Set(['EACCES', 'EPERM', 'EROFS']);
const INVALID = new Set([
  'ENOTDIR',
  'EISDIR',
  'ENAMETOOLONG',
  'ELOOP',
  'EINVAL',
  'EXDEV',
  'EBUSY',
  'ENOSPC',
  'EDQUOT',
  'EMLINK',
  'ETXTBSY',
  'ENOTEMPTY',
]);

const REASON: Record<string, string> = {
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EROFS: 'read-only filesystem',
  ENOTDIR: 'a part of the path is not a directory',
  EISDIR: 'is a directory',
  ENAMETOOLONG: 'name too long',
  ELOOP: 'too many levels of symbolic links',
  EINVAL: 'not a valid path here',
  EXDEV: 'on another filesystem',
  EBUSY: 'busy',
  ENOSPC: 'no space left on the device',
  EDQUOT: 'disk quota exceeded',
  EMLINK: 'too many links',
  ETXTBSY: 'file busy',
  ENOTEMPTY: 'directory not empty',
  ENOENT: 'does not exist',
  EEXIST: 'exists already',
};

export function errnoCode(e: unknown): string | undefined {
  const c = (e as NodeJS.ErrnoException | undefined)?.code;
  return typeof c === 'string' && /^E[A-Z0-9]+$/.test(c) ? c : undefined;
}

/** Whether `e` is a filesystem error that `userPathError` turns into a coded message. */
export function isUserPathErrno(e: unknown): boolean {
  const c = errnoCode(e);
  return c !== undefined && (PERMISSION.has(c) || INVALID.has(c) || c === 'ENOENT' || c === 'EEXIST');
}

/**
 * A BkfsError for a filesystem error met on `p`, a path the user gave (or one directly derived from
 * it), described as `what` ("restore target", "repository"). `missing` is the code for ENOENT.
 * Anything that is not an expected filesystem error is returned unchanged (a bug: exit 1).
 */
export function userPathError(
  e: unknown,
  what: string,
  p: string,
  missing: ErrorCode = 'NOT_FOUND',
): unknown {
  if (e instanceof BkfsError || !isUserPathErrno(e)) return e;
  const c = errnoCode(e) as string;
  const reason = REASON[c] ?? c;
  const code: ErrorCode = PERMISSION.has(c)
    ? 'PERMISSION_DENIED'
    : c === 'ENOENT'
      ? missing
      : c === 'EEXIST'
        ? 'TARGET_EXISTS'
        : 'TARGET_INVALID';
  const hint = PERMISSION.has(c) && c !== 'EROFS' ? ` (running as uid ${process.getuid?.() ?? '?'})` : '';
  return new BkfsError(code, `${what} ${p}: ${reason}${hint}`, { errno: c });
}

/** Run `fn`; a filesystem error on the user's path `p` becomes a coded BkfsError. */
export function onUserPath<T>(what: string, p: string, fn: () => T, missing: ErrorCode = 'NOT_FOUND'): T {
  try {
    return fn();
  } catch (e) {
    throw userPathError(e, what, p, missing);
  }
}

/** Async `onUserPath`. */
export async function onUserPathAsync<T>(
  what: string,
  p: string,
  fn: () => Promise<T>,
  missing: ErrorCode = 'NOT_FOUND',
): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw userPathError(e, what, p, missing);
  }
}

/**
 * `mkdir -p` of a directory the user named, one level at a time: the nearest existing ancestor
 * must be a directory, and each missing level is created with `mode`. Errors name `dir` (as the
 * user wrote it) and are coded (TARGET_INVALID, PERMISSION_DENIED). Returns the directories it
 * created, outermost first.
 */
export function makeDirs(dir: string, what: string, mode = 0o700): string[] {
  const abs = path.resolve(dir);
  const missing: string[] = [];
  let cur = abs;
  for (;;) {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(cur);
    } catch (e) {
      const c = errnoCode(e);
      if (c !== 'ENOENT') throw userPathError(e, what, dir);
    }
    if (st) {
      if (!st.isDirectory()) {
        const which = cur === abs ? '' : ` (${cur} is not a directory)`;
        throw new BkfsError('TARGET_INVALID', `${what} ${dir}: not a directory${which}`);
      }
      break;
    }
    missing.unshift(cur);
    const parent = path.dirname(cur);
    if (parent === cur) break; // the root itself is missing: mkdir below reports it
    cur = parent;
  }
  for (const d of missing) {
    try {
      fs.mkdirSync(d, { mode });
    } catch (e) {
      const c = errnoCode(e);
      if (c === 'EEXIST' && fs.statSync(d, { throwIfNoEntry: false })?.isDirectory()) continue;
      if (c === 'ENOENT') {
        // The parent exists (we just checked or made it) yet refuses a child: /proc, /sys, a
        // directory removed meanwhile.
        throw new BkfsError(
          'TARGET_INVALID',
          `${what} ${dir}: cannot create ${d} (${path.dirname(d)} does not accept new directories)`,
        );
      }
      throw userPathError(e, what, dir);
    }
  }
  return missing;
}

/** Async `makeDirs` (the same synchronous walk: a handful of mkdir calls). */
export function makeDirsAsync(dir: string, what: string, mode = 0o700): Promise<string[]> {
  return Promise.resolve().then(() => makeDirs(dir, what, mode));
}

/**
 * The CLI's last resort: an expected filesystem error that no boundary wrapped (a raw
 * `EACCES: permission denied, open '...'`) becomes a coded one-line error naming its path, so exit
 * code 1 stays reserved for bugs. Other values are returned unchanged.
 */
export function codedFsError(e: unknown): unknown {
  if (e instanceof BkfsError || !isUserPathErrno(e)) return e;
  const err = e as NodeJS.ErrnoException & { dest?: unknown };
  const what = err.syscall ? `cannot ${err.syscall}` : 'cannot use';
  if (typeof err.path === 'string') {
    const dest = typeof err.dest === 'string' ? ` -> ${err.dest}` : '';
    return userPathError(e, what, `${err.path}${dest}`);
  }
  const mapped = userPathError(e, 'filesystem error:', '');
  if (mapped instanceof BkfsError) {
    return new BkfsError(mapped.code, mapped.message.replace('filesystem error: : ', 'filesystem error: '));
  }
  return e;
}
