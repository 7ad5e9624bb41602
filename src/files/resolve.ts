/**
 * Guest path resolution confined to the guest's root, like openat2(RESOLVE_IN_ROOT): symlinks are
 * followed one component at a time through caller-supplied `lstat`/`readlink` (an engine's view of
 * the mounted guest), absolute targets restart at the guest's root and `..` never climbs above it.
 * A guest symlink such as `/evil -> /etc` therefore names the guest's /etc, never the host's, even
 * when the guest is mounted on the host by the kernel engine. Pure; unit-tested with a fake tree.
 */
export type EntryKind = 'file' | 'dir' | 'symlink' | 'other';

export interface ResolveOps {
  /** Kind of the entry at this (already resolved, symlink-free but for the last component) path. */
  kind(guestPath: string): Promise<EntryKind | null>;
  readlink(guestPath: string): Promise<string>;
}

export type Resolved =
  | { ok: true; path: string; kind: EntryKind }
  | { ok: false; reason: 'ENOENT' | 'ENOTDIR' | 'ELOOP'; at: string };

export const MAX_SYMLINKS = 40;

function join(parts: readonly string[]): string {
  return '/' + parts.join('/');
}

/**
 * Resolve `guestPath` (absolute). `followLast`: also follow a symlink in the last component (cat,
 * cp of a file); otherwise the link itself is the result (ls -d, cp -R copying links as links).
 */
export async function resolveInRoot(
  guestPath: string,
  ops: ResolveOps,
  followLast: boolean,
): Promise<Resolved> {
  const resolved: string[] = [];
  let pending = guestPath.split('/').filter((c) => c !== '' && c !== '.');
  let links = 0;
  let kind: EntryKind = 'dir';
  while (pending.length > 0) {
    const c = pending[0] as string;
    pending = pending.slice(1);
    if (c === '..') {
      resolved.pop();
      kind = 'dir';
      continue;
    }
    const candidate = join([...resolved, c]);
    const k = await ops.kind(candidate);
    if (k === null) return { ok: false, reason: 'ENOENT', at: candidate };
    const last = pending.length === 0;
    if (k === 'symlink' && (!last || followLast)) {
      if (++links > MAX_SYMLINKS) return { ok: false, reason: 'ELOOP', at: candidate };
      const target = await ops.readlink(candidate);
      if (target.startsWith('/')) resolved.length = 0;
      pending = [...target.split('/').filter((x) => x !== '' && x !== '.'), ...pending];
      kind = 'dir';
      continue;
    }
    if (!last && k !== 'dir') return { ok: false, reason: 'ENOTDIR', at: candidate };
    resolved.push(c);
    kind = k;
  }
  return { ok: true, path: join(resolved), kind };
}
