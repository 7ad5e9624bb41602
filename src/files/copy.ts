/**
 * Where `bkfs cp` puts a copy, decided before anything is written (pure; unit-tested). Like cp(1):
 * into an existing directory under the source's name, otherwise at the destination path itself.
 * An existing destination is refused unless `force` (a file is then replaced atomically, a directory
 * merged into). The copy is made under a temporary name next to its final place and renamed into
 * it, so an interrupted copy never leaves a half-written file under the final name.
 */
import * as path from 'node:path';
import { BkfsError } from '../errors';
import type { EntryKind } from './resolve';

export interface DestInfo {
  kind: EntryKind;
}

export interface CopyPlan {
  /** Host path of the result. */
  final: string;
  /** create: nothing there; replace: an existing file (force); merge: an existing directory (force). */
  action: 'create' | 'replace' | 'merge';
}

/**
 * `srcName`: the source's last path component ('' for the guest root). `stat(p)`: what exists at
 * a host path (lstat; null if nothing).
 */
export async function planCopy(
  srcName: string,
  srcKind: EntryKind,
  dest: string,
  opts: { recursive: boolean; force: boolean },
  stat: (p: string) => Promise<DestInfo | null>,
): Promise<CopyPlan> {
  if (srcKind === 'dir' && !opts.recursive) {
    throw new BkfsError('USAGE', `the source is a directory: use -R to copy a tree`);
  }
  if (srcKind === 'other')
    throw new BkfsError('USAGE', 'the source is not a regular file, directory or symlink');
  let final = dest;
  let there = await stat(dest);
  if (!there && /\/\.?$/.test(dest)) {
    // `cp x out/nosuchdir/`: a trailing slash names a directory, which must exist (as cp(1) does).
    throw new BkfsError('TARGET_INVALID', `cannot copy into ${dest}: no such directory`);
  }
  if (there?.kind === 'dir' && srcName !== '') {
    final = path.join(dest, srcName);
    there = await stat(final);
  }
  if (!there) {
    const parent = await stat(path.dirname(path.resolve(final)));
    if (parent?.kind !== 'dir') {
      throw new BkfsError(
        'TARGET_INVALID',
        `cannot create ${final}: ${path.dirname(final)} is not a directory`,
      );
    }
    return { final, action: 'create' };
  }
  if (!opts.force) throw new BkfsError('TARGET_EXISTS', `${final} exists (use --force to overwrite)`);
  if (srcKind === 'dir') {
    if (there.kind !== 'dir') {
      throw new BkfsError(
        'TARGET_INVALID',
        `cannot overwrite ${final}, which is not a directory, with a directory`,
      );
    }
    return { final, action: 'merge' };
  }
  if (there.kind === 'dir') {
    throw new BkfsError('TARGET_INVALID', `cannot overwrite the directory ${final} with a file`);
  }
  return { final, action: 'replace' };
}

/** A temporary name next to `final`, hidden and unlikely to clash. */
export function tempSibling(final: string, tag: string): string {
  return path.join(path.dirname(final), `.${path.basename(final)}.bkfs-${tag}`);
}
