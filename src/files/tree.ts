/**
 * Pure logic of `find` and `diff` over file listings that the engines produce (one `FileEntry`
 * per path of a walked tree): glob matching, comparing two listings, and the per-path history of
 * a file across checkpoints (when it appeared, changed, vanished). No I/O; unit-tested. Memory: a
 * listing is one small object per file; `diff` holds two listings, `find` only the matches.
 */
import type { EntryKind } from './resolve';

export interface FileEntry {
  /** Absolute guest path. */
  path: string;
  kind: EntryKind;
  size: number;
  /** Permission bits (& 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  mtimeSec: number;
  mtimeNsec: number;
  /** Symlink target. */
  target?: string;
}

// ---------------------------------------------------------------------------------------------
// Globs

function escapeRe(ch: string): string {
  return /[\\^$.*+?()[\]{}|/-]/.test(ch) ? `\\${ch}` : ch;
}

/**
 * A glob as an anchored RegExp over '/'-separated paths: `*` and `?` stay within one component,
 * `[...]`/`[!...]` are character classes, `**` as a whole component spans any number of them,
 * a backslash escapes. Dot files are not special (as `find -name`).
 */
export function globToRegExp(glob: string, ignoreCase = false): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i] as string;
    if (c === '\\' && i + 1 < glob.length) {
      re += escapeRe(glob[++i] as string);
    } else if (c === '*') {
      const whole = glob[i + 1] === '*' && (i === 0 || glob[i - 1] === '/');
      if (whole && (i + 2 === glob.length || glob[i + 2] === '/')) {
        if (glob[i + 2] === '/') {
          re += '(?:.*/)?';
          i += 2;
        } else {
          re += '.*';
          i += 1;
        }
      } else {
        while (glob[i + 1] === '*') i++;
        re += '[^/]*';
      }
    } else if (c === '?') {
      re += '[^/]';
    } else if (c === '[') {
      let j = i + 1;
      if (glob[j] === '!' || glob[j] === '^') j++;
      if (glob[j] === ']') j++;
      while (j < glob.length && glob[j] !== ']') j++;
      if (j >= glob.length) {
        re += '\\[';
        continue;
      }
      let body = glob.slice(i + 1, j);
      let neg = false;
      if (body.startsWith('!') || body.startsWith('^')) {
        neg = true;
        body = body.slice(1);
      }
      const cls = body.replace(/[\\\]^]/g, (m) => `\\${m}`);
      re += neg ? `[^/${cls}]` : `[${cls}]`;
      i = j;
    } else {
      re += escapeRe(c);
    }
  }
  return new RegExp(`^${re}$`, ignoreCase ? 'i' : '');
}

/**
 * A matcher for a `find` pattern: without a '/', it matches the file's name (`*.conf`); with one,
 * the whole path (`/etc/**` from the root, `log/*.gz` at any depth).
 */
export function pathMatcher(pattern: string, ignoreCase = false): (guestPath: string) => boolean {
  if (!pattern.includes('/')) {
    const re = globToRegExp(pattern, ignoreCase);
    return (p) => re.test(p.slice(p.lastIndexOf('/') + 1));
  }
  const anchored = pattern.startsWith('/') ? pattern : `/**/${pattern}`;
  const re = globToRegExp(anchored, ignoreCase);
  return (p) => re.test(p);
}

// ---------------------------------------------------------------------------------------------
// Comparing entries

/** What differs between two entries of the same path (empty: same metadata). */
export function metaChanges(a: FileEntry, b: FileEntry): string[] {
  const out: string[] = [];
  if (a.kind !== b.kind) return ['type'];
  if (a.kind !== 'dir') {
    if (a.size !== b.size) out.push('size');
    if (a.mtimeSec !== b.mtimeSec || a.mtimeNsec !== b.mtimeNsec) out.push('mtime');
  }
  if (a.mode !== b.mode) out.push('mode');
  if (a.uid !== b.uid || a.gid !== b.gid) out.push('owner');
  if (a.kind === 'symlink' && a.target !== b.target) out.push('target');
  return out;
}

export interface DiffItem {
  path: string;
  change: 'added' | 'removed' | 'changed';
  /** For 'changed': size, mtime, mode, owner, type, target, content. */
  what: string[];
  before?: FileEntry;
  after?: FileEntry;
}

/** Regular files present in both listings with the same size and mtime: checksum candidates. */
export function checksumCandidates(a: readonly FileEntry[], b: readonly FileEntry[]): string[] {
  const bm = new Map(b.map((e) => [e.path, e]));
  const out: string[] = [];
  for (const x of a) {
    const y = bm.get(x.path);
    if (
      y &&
      x.kind === 'file' &&
      y.kind === 'file' &&
      metaChanges(x, y).every((w) => w === 'mode' || w === 'owner')
    ) {
      out.push(x.path);
    }
  }
  return out;
}

/**
 * Files added, removed and changed from listing `a` to listing `b`, sorted by path. Directories
 * count as changed only for type, mode or owner (their size and mtime follow their contents).
 * With checksums (path -> digest) for both sides, same-metadata files whose digests differ are
 * reported as changed ('content').
 */
export function diffListings(
  a: readonly FileEntry[],
  b: readonly FileEntry[],
  checksums?: { a: Map<string, string>; b: Map<string, string> },
): DiffItem[] {
  const am = new Map(a.map((e) => [e.path, e]));
  const bm = new Map(b.map((e) => [e.path, e]));
  const out: DiffItem[] = [];
  for (const x of a) {
    const y = bm.get(x.path);
    if (!y) {
      out.push({ path: x.path, change: 'removed', what: [], before: x });
      continue;
    }
    const what = metaChanges(x, y);
    if (checksums && x.kind === 'file' && y.kind === 'file' && !what.includes('size')) {
      const ha = checksums.a.get(x.path);
      const hb = checksums.b.get(x.path);
      if (ha !== undefined && hb !== undefined && ha !== hb) what.push('content');
    }
    if (what.length > 0) out.push({ path: x.path, change: 'changed', what, before: x, after: y });
  }
  for (const y of b) {
    if (!am.has(y.path)) out.push({ path: y.path, change: 'added', what: [], after: y });
  }
  return out.sort((p, q) => (p.path < q.path ? -1 : p.path > q.path ? 1 : 0));
}

// ---------------------------------------------------------------------------------------------
// History across checkpoints

export interface HistoryRow {
  checkpoint: string;
  /** present: first checkpoint searched; added/changed/unchanged vs the previous checkpoint. */
  state: 'present' | 'added' | 'changed' | 'unchanged' | 'removed';
  entry?: FileEntry;
}

/**
 * For each path matched in any checkpoint (oldest first), its rows: one per checkpoint where it
 * exists, plus a 'removed' row where it vanished. Paths sorted.
 */
export function fileHistory(
  perCheckpoint: readonly { checkpoint: string; matches: ReadonlyMap<string, FileEntry> }[],
): Map<string, HistoryRow[]> {
  const paths = new Set<string>();
  for (const c of perCheckpoint) for (const p of c.matches.keys()) paths.add(p);
  const out = new Map<string, HistoryRow[]>();
  for (const p of [...paths].sort()) {
    const rows: HistoryRow[] = [];
    let prev: FileEntry | undefined;
    perCheckpoint.forEach((c, i) => {
      const e = c.matches.get(p);
      if (e) {
        const state: HistoryRow['state'] =
          i === 0 ? 'present' : !prev ? 'added' : metaChanges(prev, e).length > 0 ? 'changed' : 'unchanged';
        rows.push({ checkpoint: c.checkpoint, state, entry: e });
      } else if (prev) {
        rows.push({ checkpoint: c.checkpoint, state: 'removed' });
      }
      prev = e;
    });
    out.set(p, rows);
  }
  return out;
}

/** Octal permission string with type letter, as `ls -l`: drwxr-xr-x. */
export function modeString(kind: EntryKind, mode: number): string {
  const t = kind === 'dir' ? 'd' : kind === 'symlink' ? 'l' : kind === 'file' ? '-' : '?';
  const bits = 'rwxrwxrwx'
    .split('')
    .map((ch, i) => ((mode >> (8 - i)) & 1 ? ch : '-'))
    .join('')
    .split('');
  if (mode & 0o4000) bits[2] = bits[2] === 'x' ? 's' : 'S';
  if (mode & 0o2000) bits[5] = bits[5] === 'x' ? 's' : 'S';
  if (mode & 0o1000) bits[8] = bits[8] === 'x' ? 't' : 'T';
  return t + bits.join('');
}
