/**
 * Path checks of `bkfs web`.
 *
 * Guest paths (query `path`): absolute, no NUL, no `..` component, bounded length. Whatever the
 * guest's symlinks say, they are resolved inside the guest root by the engine (files/resolve.ts),
 * so no guest path reaches a host file; `..` is refused outright rather than clamped.
 *
 * Host paths (restore targets, uploads): relative to the operator-chosen restore root, no `..`,
 * not absolute; the existing part is resolved with realpath and must stay inside the root, so a
 * symlink in the root cannot send a write elsewhere.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError } from '../errors';

export const MAX_GUEST_PATH = 4096;

export function checkGuestPath(p: string | undefined, dflt = '/'): string {
  const v = p === undefined || p === '' ? dflt : p;
  if (!v.startsWith('/')) throw new BkfsError('USAGE', `guest path '${v}' must be absolute (start with /)`);
  if (v.includes('\0')) throw new BkfsError('USAGE', 'guest path contains a NUL byte');
  if (v.length > MAX_GUEST_PATH)
    throw new BkfsError('USAGE', `guest path longer than ${MAX_GUEST_PATH} bytes`);
  if (v.split('/').some((c) => c === '..')) {
    throw new BkfsError('USAGE', `guest path '${v}' has a '..' component; give the path without it`);
  }
  return v;
}

/** A volume parameter: the CLI's address syntax (vda:2, vdb, vg/lv, LABEL=x, UUID=x), no path. */
export function checkVolume(v: string | undefined): string | undefined {
  if (v === undefined || v === '') return undefined;
  if (!/^[A-Za-z0-9_.+=/:-]{1,256}$/.test(v) || v.includes('..') || v.startsWith('/')) {
    throw new BkfsError('USAGE', `bad volume '${v}' (use vda:2, vdb, vg0/root, LABEL=NAME or UUID=U)`);
  }
  return v;
}

/**
 * `rel` inside `root` (lexically): relative, no `..`, no NUL, not empty. Pure.
 */
export function insideRoot(root: string, rel: string): string {
  if (rel === '' || rel.includes('\0')) throw new BkfsError('USAGE', 'empty target path');
  if (path.isAbsolute(rel)) {
    throw new BkfsError('TARGET_INVALID', `target '${rel}' must be relative to the restore root`);
  }
  if (rel.split(/[\\/]/).some((c) => c === '..')) {
    throw new BkfsError('TARGET_INVALID', `target '${rel}' has a '..' component`);
  }
  const full = path.resolve(root, rel);
  if (full === root || !full.startsWith(root.endsWith('/') ? root : `${root}/`)) {
    throw new BkfsError('TARGET_INVALID', `target '${rel}' is not inside the restore root`);
  }
  return full;
}

/**
 * `insideRoot`, then the deepest existing ancestor of the target (and the target itself if it is a
 * symlink) resolved with realpath must be inside the real root.
 */
export function targetInRoot(root: string, rel: string): string {
  const realRoot = fs.realpathSync(root);
  const full = insideRoot(realRoot, rel);
  let probe = full;
  for (;;) {
    let st: fs.Stats | undefined;
    try {
      st = fs.lstatSync(probe);
    } catch {
      st = undefined;
    }
    if (st) {
      const real = fs.realpathSync(probe);
      if (real !== realRoot && !real.startsWith(`${realRoot}/`)) {
        throw new BkfsError('TARGET_INVALID', `target '${rel}' leads outside the restore root`);
      }
      if (st.isSymbolicLink() && probe === full) {
        throw new BkfsError('TARGET_INVALID', `target '${rel}' is a symlink`);
      }
      break;
    }
    const up = path.dirname(probe);
    if (up === probe) break;
    probe = up;
  }
  return full;
}
