/**
 * gc's local state (FORMAT.md, "Storage interface"): `gc-pending.json`, the packs that left the
 * index while readers or writers may still use them, kept until they are gone. It lives in the
 * repository directory (the cache directory of a bucket's repository) beside the index and the
 * pins it refers to, never in the store: it describes this machine's readers.
 *
 * gc.ts itself touches no file (an eslint rule keeps it so): packs and manifests go through the
 * store, this file through here.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { fsyncDir } from '../store/packs';
import { openPrivate, repoModes } from '../util/private-fs';

export const PENDING_FILE = 'gc-pending.json';

/** `gc-pending.json` lists a few names per pack; larger is not ours and is not read whole. */
export const MAX_PENDING_BYTES = 16 << 20;

export interface PendingPack {
  name: string;
  size: number;
  /** Pin files that existed when the pack left the index; it is deleted once all are gone. */
  pins: string[];
  /**
   * Writer sessions (format 3) live when an unindexed file was found: it may be one of theirs,
   * sealed and about to be indexed; it is deleted only once all of them ended and it is still
   * not indexed. Absent in files of format 2.
   */
  writers?: string[];
}

function pendingCorrupt(file: string, why: string): BkfsError {
  return new BkfsError(
    'REPO_CORRUPT',
    `${file} is unreadable (${why}); it lists pack files kept for readers: if no bkfs mount or restore runs, remove it (gc then treats those packs as unindexed files)`,
  );
}

/**
 * The packs gc keeps for readers. A missing file is an empty list; an unreadable, oversized or
 * malformed one is REPO_CORRUPT (never taken for an empty list: its packs would be lost track of).
 */
export function readPending(repoDir: string): PendingPack[] {
  const file = path.join(repoDir, PENDING_FILE);
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw pendingCorrupt(file, (e as NodeJS.ErrnoException).code ?? String(e));
  }
  let text: string;
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw pendingCorrupt(file, 'not a regular file');
    if (st.size > MAX_PENDING_BYTES) throw pendingCorrupt(file, `${st.size} bytes`);
    const buf = Buffer.alloc(st.size);
    text = buf.subarray(0, st.size > 0 ? fs.readSync(fd, buf, 0, st.size, 0) : 0).toString('utf8');
  } finally {
    fs.closeSync(fd);
  }
  let j: unknown;
  try {
    j = JSON.parse(text);
  } catch {
    throw pendingCorrupt(file, 'not JSON');
  }
  const packs = (j as { packs?: unknown } | null)?.packs;
  const ok =
    Array.isArray(packs) &&
    packs.every(
      (p: Partial<PendingPack> | null) =>
        typeof p === 'object' &&
        p !== null &&
        typeof p.name === 'string' &&
        /^[0-9a-zA-Z_-]{1,128}$/.test(p.name) &&
        Number.isSafeInteger(p.size) &&
        Array.isArray(p.pins) &&
        p.pins.every((f) => typeof f === 'string') &&
        (p.writers === undefined ||
          (Array.isArray(p.writers) && p.writers.every((f) => typeof f === 'string'))),
    );
  if (!ok) throw pendingCorrupt(file, 'not a list of packs');
  return packs as PendingPack[];
}

/** Replace the list durably (temp file, fsync, rename, fsync dir); an empty list removes it. */
export async function writePending(repoDir: string, packs: PendingPack[]): Promise<void> {
  const file = path.join(repoDir, PENDING_FILE);
  if (packs.length === 0) {
    await fsp.rm(file, { force: true });
    return;
  }
  const tmp = `${file}.tmp`;
  const fh = await openPrivate(tmp, 'w', repoModes(repoDir).file);
  try {
    await fh.writeFile(JSON.stringify({ packs }, null, 1));
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, file);
  await fsyncDir(repoDir);
}

/** Forget the list (an index rebuild indexes those packs again). */
export function removePending(repoDir: string): void {
  fs.rmSync(path.join(repoDir, PENDING_FILE), { force: true });
}
