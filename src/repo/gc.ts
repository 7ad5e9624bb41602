/**
 * Garbage collection (`bkfs gc`, alias `prune`): frees exactly the chunks no checkpoint uses.
 *
 * Locking: gc takes the writer lock for its whole run, so no backup, forget or other gc runs
 * alongside (a backup started meanwhile fails at once with REPO_LOCKED, as any second writer does).
 * Readers take no lock; the ones that live long (mounts, restores) pin their checkpoints
 * (`pins.ts`) BEFORE reading any chunk location, and gc respects that:
 *   - rows of forgotten checkpoints stay while pinned; chunks and pages of pinned checkpoints are
 *     live;
 *   - a pack holding a chunk that a pinned checkpoint uses is not rewritten while pinned (a reader
 *     may have cached its location);
 *   - a pack file that leaves the index while a pin exists that may have seen it in the index (a
 *     pin that appeared during gc, or any pin for an orphan file) is not deleted but recorded in
 *     `gc-pending.json` with those pin files, and deleted by a later gc once they are all gone.
 *
 * Steps (each one leaves a consistent repository if the process dies right after it):
 *   1. heal: extents of damaged chunks that have a good copy are re-pointed to it;
 *   2. rows: forgotten/failed checkpoints that nobody pins are deleted (page tables, pages used by
 *      no one else); then every chunk row no live page references (one transaction);
 *   3. files: pending packs whose pins are gone, and pack files the index does not know (left by a
 *      crash), are deleted;
 *   4. packs without live chunks: row deleted, then the file;
 *   5. packs with dead bytes: live chunks are read, checked against their hash and appended to a
 *      new pack; the new pack is sealed (fsync, rename, fsync dir); ONE transaction inserts it,
 *      re-points the moved chunk rows and deletes the old packs' rows; then the old files are
 *      deleted. A crash before the transaction leaves an unindexed new pack, after it an
 *      unindexed old pack: both are found and removed by step 3 of the next gc.
 * A pack holding a live chunk that fails its hash is left alone (the chunk and its checkpoints are
 * marked damaged), so gc never destroys evidence.
 *
 * Memory: the set of live chunk ids and page ids, plus the live stored bytes of one source pack
 * (at most a pack, 64 MiB) while it is copied.
 *
 * Also here: damage bookkeeping shared by verify, gc and the backup commit (`markChunksDamaged`,
 * `healDamagedChunks`, `refreshCheckpointDamage`).
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import type Database from 'better-sqlite3';
import type { Repository } from './repository';
import { crashPoint, deleteCheckpointRows } from './repository';
import { activePins } from './pins';
import { BkfsError } from '../errors';
import { decodeChunk } from '../store/codec';
import {
  PACK_HEADER_LEN,
  PACK_TARGET,
  PackWriter,
  RECORD_HEADER_LEN,
  fsyncDir,
  packPath,
  checkRecordLengths,
} from '../store/packs';
import { openPrivate, repoModes } from '../util/private-fs';

export const PENDING_FILE = 'gc-pending.json';

// ---------------------------------------------------------------------------------------------
// Damage bookkeeping

/** Set `checkpoints.damaged` from scratch: 1 exactly for checkpoints that use a damaged chunk. */
export function refreshCheckpointDamage(db: Database.Database): void {
  const anyDamaged = db.prepare('SELECT 1 FROM chunks WHERE damaged = 1 LIMIT 1').get();
  if (!anyDamaged) {
    db.prepare('UPDATE checkpoints SET damaged = 0 WHERE damaged = 1').run();
    return;
  }
  db.exec(`UPDATE checkpoints SET damaged = (id IN (
             SELECT d.checkpoint_id FROM chunks c JOIN extents e ON e.chunk_id = c.id
               JOIN disk_pages dp ON dp.page_id = e.page_id JOIN disks d ON d.id = dp.disk_id
              WHERE c.damaged = 1))`);
}

/** Mark chunks damaged, and every checkpoint that uses one of them. */
export function markChunksDamaged(db: Database.Database, chunkIds: number[]): void {
  if (chunkIds.length === 0) return;
  db.transaction(() => {
    const st = db.prepare('UPDATE chunks SET damaged = 1 WHERE id = ?');
    for (const id of chunkIds) st.run(id);
    refreshCheckpointDamage(db);
  })();
}

/**
 * Re-point extents that use a damaged chunk to an undamaged chunk with the same hash (stored again
 * by a later backup), so checkpoints that used the damaged copy read correctly again; the damaged
 * copy is then unused and gc removes it. Returns how many extents were re-pointed. Call inside a
 * transaction or on its own (it is one statement plus a flag refresh).
 */
export function healDamagedChunks(db: Database.Database): number {
  const twin = `SELECT d.id FROM chunks d JOIN chunks g ON g.hash = d.hash AND g.damaged = 0 WHERE d.damaged = 1`;
  if (!db.prepare(`${twin} LIMIT 1`).get()) return 0;
  const r = db
    .prepare(
      `UPDATE extents SET chunk_id = (SELECT g.id FROM chunks d JOIN chunks g ON g.hash = d.hash AND g.damaged = 0
                                        WHERE d.id = extents.chunk_id)
        WHERE chunk_id IN (${twin})`,
    )
    .run();
  refreshCheckpointDamage(db);
  return r.changes;
}

// ---------------------------------------------------------------------------------------------
// Pins and pending files

interface PinState {
  ids: Set<number>;
  files: string[];
}

function pinState(repo: Repository): PinState {
  const pins = activePins(repo); // also drops pin files of dead readers; REPO_CORRUPT if broken
  return {
    ids: new Set(pins.flatMap((p) => p.checkpoints)),
    files: pins.map((p) => p.file!),
  };
}

interface PendingPack {
  name: string;
  size: number;
  /** Pin files that existed when the pack left the index; it is deleted once all are gone. */
  pins: string[];
}

/** `gc-pending.json` lists a few names per pack; larger is not ours and is not read whole. */
export const MAX_PENDING_BYTES = 16 << 20;

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
function readPending(repoDir: string): PendingPack[] {
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
        p.pins.every((f) => typeof f === 'string'),
    );
  if (!ok) throw pendingCorrupt(file, 'not a list of packs');
  return packs as PendingPack[];
}

async function writePending(repoDir: string, packs: PendingPack[]): Promise<void> {
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

/** Names of every `.pack` file under `packs/`. */
export function packFilesOnDisk(repoDir: string): { name: string; size: number }[] {
  const out: { name: string; size: number }[] = [];
  const root = path.join(repoDir, 'packs');
  let subdirs: string[] = [];
  try {
    subdirs = fs.readdirSync(root);
  } catch {
    return out;
  }
  for (const sd of subdirs.sort()) {
    let names: string[] = [];
    try {
      names = fs.readdirSync(path.join(root, sd));
    } catch {
      continue;
    }
    for (const n of names.sort()) {
      if (!n.endsWith('.pack')) continue;
      const name = n.slice(0, -'.pack'.length);
      try {
        out.push({ name, size: fs.statSync(path.join(root, sd, n)).size });
      } catch {
        // removed meanwhile
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Live set

/** Ids of checkpoints whose data must stay: complete, running (a dry run beside a backup), pinned. */
function liveCheckpointIds(db: Database.Database, pinned: Set<number>): number[] {
  const rows = db.prepare('SELECT id, state FROM checkpoints').all() as { id: number; state: string }[];
  return rows
    .filter((r) => r.state === 'complete' || r.state === 'running' || pinned.has(r.id))
    .map((r) => r.id);
}

function pagesOf(db: Database.Database, checkpointIds: Iterable<number>): Set<number> {
  const st = db.prepare(
    'SELECT dp.page_id AS p FROM disks d JOIN disk_pages dp ON dp.disk_id = d.id WHERE d.checkpoint_id = ?',
  );
  const pages = new Set<number>();
  for (const id of checkpointIds)
    for (const r of st.iterate(id) as IterableIterator<{ p: number }>) pages.add(r.p);
  return pages;
}

function chunksOfPages(db: Database.Database, pages: Set<number>): Set<number> {
  const live = new Set<number>();
  const st = db.prepare('SELECT page_id AS p, chunk_id AS c FROM extents WHERE chunk_id IS NOT NULL');
  for (const r of st.iterate() as IterableIterator<{ p: number; c: number }>)
    if (pages.has(r.p)) live.add(r.c);
  return live;
}

/** Chunk ids used by the given checkpoints. */
export function chunksOfCheckpoints(db: Database.Database, checkpointIds: Iterable<number>): Set<number> {
  const pages = pagesOf(db, checkpointIds);
  if (pages.size === 0) return new Set();
  return chunksOfPages(db, pages);
}

// ---------------------------------------------------------------------------------------------
// gc

export interface GcOptions {
  /** Compute and report what gc would do; change nothing (takes no lock). */
  dryRun?: boolean;
  /** Progress of the pack rewriting, in stored bytes. */
  onProgress?: (done: number, total: number) => void;
  onNotice?: (msg: string) => void;
}

export interface GcReport {
  dryRun: boolean;
  /** Forgotten checkpoints whose rows were deleted (their readers are gone). */
  checkpointsRemoved: number;
  /** Forgotten checkpoints still pinned by a reader: rows and data kept. */
  checkpointsPinned: number;
  chunksRemoved: number;
  /** Stored bytes of the removed chunks. */
  chunkBytesRemoved: number;
  packsDeleted: number;
  packsRewritten: number;
  packsWritten: number;
  /** Live stored bytes copied into new packs. */
  bytesCopied: number;
  /** Packs with dead bytes left as they are: a pinned checkpoint uses them. */
  packsKeptForReaders: number;
  /** Packs with dead bytes left as they are: they hold a damaged live chunk. */
  packsKeptDamaged: number;
  /** Pack files not in the index (left by a crash) that were deleted. */
  orphansRemoved: number;
  /** Pack files out of the index but kept until readers finish (`gc-pending.json`). */
  packsPending: number;
  bytesPending: number;
  /** Pack bytes on disk before and after, and the difference. */
  bytesBefore: number;
  bytesAfter: number;
  bytesFreed: number;
  /** Extents re-pointed from damaged chunks to good copies. */
  extentsHealed: number;
}

interface PackInfo {
  id: number;
  name: string;
  size: number;
  chunks: number;
  live: number; // live bytes: header + records of indexed chunks
  damaged: boolean;
  pinned: boolean;
  /** Chunks copied out of this pack by the rewrite in progress. */
  movedIds?: number[];
}

function packInfos(db: Database.Database, pinnedChunks: Set<number>): PackInfo[] {
  const packs = db.prepare('SELECT id, name, size FROM packs ORDER BY id').all() as {
    id: number;
    name: string;
    size: number;
  }[];
  const byId = new Map<number, PackInfo>();
  for (const p of packs) {
    byId.set(p.id, { ...p, chunks: 0, live: PACK_HEADER_LEN, damaged: false, pinned: false });
  }
  const st = db.prepare('SELECT id, pack_id AS pack, stored_len AS len, damaged FROM chunks');
  for (const c of st.iterate() as IterableIterator<{
    id: number;
    pack: number;
    len: number;
    damaged: number;
  }>) {
    const p = byId.get(c.pack);
    if (!p) continue;
    p.chunks++;
    p.live += RECORD_HEADER_LEN + c.len;
    if (c.damaged) p.damaged = true;
    if (pinnedChunks.has(c.id)) p.pinned = true;
  }
  return [...byId.values()];
}

export async function runGc(repo: Repository, o: GcOptions = {}): Promise<GcReport> {
  const db = repo.db;
  const rep: GcReport = {
    dryRun: o.dryRun === true,
    checkpointsRemoved: 0,
    checkpointsPinned: 0,
    chunksRemoved: 0,
    chunkBytesRemoved: 0,
    packsDeleted: 0,
    packsRewritten: 0,
    packsWritten: 0,
    bytesCopied: 0,
    packsKeptForReaders: 0,
    packsKeptDamaged: 0,
    orphansRemoved: 0,
    packsPending: 0,
    bytesPending: 0,
    bytesBefore: 0,
    bytesAfter: 0,
    bytesFreed: 0,
    extentsHealed: 0,
  };
  if (!o.dryRun) repo.lockWriter('gc');
  try {
    const filesBefore = packFilesOnDisk(repo.dir);
    rep.bytesBefore = filesBefore.reduce((a, f) => a + f.size, 0);
    let pins = pinState(repo);

    // 1-2. Heal, then rows of forgotten checkpoints nobody reads, then dead chunk rows.
    const gone = (
      db.prepare("SELECT id FROM checkpoints WHERE state IN ('forgotten', 'failed')").all() as {
        id: number;
      }[]
    ).map((r) => r.id);
    const removable = gone.filter((id) => !pins.ids.has(id));
    rep.checkpointsRemoved = removable.length;
    rep.checkpointsPinned = gone.length - removable.length;
    const liveCps = liveCheckpointIds(db, pins.ids);
    const livePages = pagesOf(db, liveCps);
    if (!o.dryRun) {
      rep.extentsHealed = db.transaction(() => healDamagedChunks(db))();
    }
    const liveChunks = chunksOfPages(db, livePages);
    const allChunks = db.prepare('SELECT id, stored_len AS len FROM chunks').all() as {
      id: number;
      len: number;
    }[];
    const dead = allChunks.filter((c) => !liveChunks.has(c.id));
    rep.chunksRemoved = dead.length;
    rep.chunkBytesRemoved = dead.reduce((a, c) => a + c.len, 0);
    if (!o.dryRun) {
      db.transaction(() => {
        for (const id of removable) deleteCheckpointRows(db, id);
        // Pages no page table uses (left by an interrupted forget of an older bkfs, or by hand).
        db.exec('DELETE FROM extents WHERE page_id NOT IN (SELECT page_id FROM disk_pages)');
        const del = db.prepare('DELETE FROM chunks WHERE id = ?');
        for (const c of dead) del.run(c.id);
      })();
      crashPoint('gc-after-rows');
    }

    // 3. Pending packs whose readers are gone; pack files the index does not know.
    const indexed = new Set(
      (db.prepare('SELECT name FROM packs').all() as { name: string }[]).map((r) => r.name),
    );
    let pending = readPending(repo.dir);
    const pendingNames = new Set(pending.map((p) => p.name));
    const stillPending: PendingPack[] = [];
    for (const p of pending) {
      if (indexed.has(p.name)) continue; // re-indexed by a rebuild: a normal pack again
      if (p.pins.some((f) => pins.files.includes(f))) {
        stillPending.push(p);
      } else if (!o.dryRun) {
        await fsp.rm(packPath(repo.dir, p.name), { force: true });
      }
    }
    for (const f of filesBefore) {
      if (indexed.has(f.name) || pendingNames.has(f.name)) continue;
      if (pins.files.length > 0) {
        stillPending.push({ name: f.name, size: f.size, pins: pins.files });
      } else {
        rep.orphansRemoved++;
        if (!o.dryRun) await fsp.rm(packPath(repo.dir, f.name), { force: true });
      }
    }
    pending = stillPending;
    if (!o.dryRun) await writePending(repo.dir, pending);

    // 4-5. Packs: delete the dead ones, rewrite the ones with dead bytes.
    const pinnedChunks = chunksOfCheckpoints(db, pins.ids);
    let infos = packInfos(db, pinnedChunks);
    if (o.dryRun) {
      // Nothing was deleted: count the dead chunks out of their packs.
      const deadSet = new Map(dead.map((c) => [c.id, c.len]));
      const packOf = db.prepare('SELECT pack_id AS p FROM chunks WHERE id = ?');
      const byId = new Map(infos.map((p) => [p.id, p]));
      for (const [id, len] of deadSet) {
        const p = byId.get((packOf.get(id) as { p: number }).p);
        if (p) {
          p.chunks--;
          p.live -= RECORD_HEADER_LEN + len;
        }
      }
    }
    const deadPacks = infos.filter((p) => p.chunks === 0);
    rep.packsDeleted = deadPacks.length;
    if (!o.dryRun && deadPacks.length > 0) {
      db.transaction(() => {
        const del = db.prepare('DELETE FROM packs WHERE id = ?');
        for (const p of deadPacks) del.run(p.id);
      })();
      // No pinned reader reads a dead pack (its chunks are used by no pinned checkpoint).
      for (const p of deadPacks) await fsp.rm(packPath(repo.dir, p.name), { force: true });
    }
    infos = infos.filter((p) => p.chunks > 0 && p.live < p.size);
    const candidates: PackInfo[] = [];
    for (const p of infos) {
      if (p.damaged) rep.packsKeptDamaged++;
      else if (p.pinned) rep.packsKeptForReaders++;
      else candidates.push(p);
    }
    if (o.dryRun) {
      rep.packsRewritten = candidates.length;
      rep.bytesCopied = candidates.reduce((a, p) => a + p.live - PACK_HEADER_LEN, 0);
      const freed =
        deadPacks.reduce((a, p) => a + p.size, 0) + candidates.reduce((a, p) => a + p.size - p.live, 0);
      rep.packsPending = pending.length;
      rep.bytesPending = pending.reduce((a, p) => a + p.size, 0);
      rep.bytesAfter = rep.bytesBefore - freed;
      rep.bytesFreed = freed;
      return rep;
    }

    const total = candidates.reduce((a, p) => a + p.live, 0);
    let done = 0;
    let writer: PackWriter | undefined;
    let group: PackInfo[] = [];
    let moved: { id: number; offset: number }[] = [];
    const commitGroup = async (): Promise<void> => {
      if (!writer) return;
      const w = writer;
      writer = undefined;
      await w.seal();
      crashPoint('gc-after-new-pack');
      const g = group;
      const mv = moved;
      group = [];
      moved = [];
      db.transaction(() => {
        const packId = Number(
          db
            .prepare('INSERT INTO packs (name, size, created) VALUES (?, ?, ?)')
            .run(w.name, w.size, Date.now()).lastInsertRowid,
        );
        const upd = db.prepare('UPDATE chunks SET pack_id = ?, offset = ? WHERE id = ?');
        for (const m of mv) upd.run(packId, m.offset, m.id);
        const left = db.prepare('SELECT count(*) AS n FROM chunks WHERE pack_id = ?');
        const del = db.prepare('DELETE FROM packs WHERE id = ?');
        for (const p of g) {
          if ((left.get(p.id) as { n: number }).n !== 0) throw new Error(`pack ${p.name} still has chunks`);
          del.run(p.id);
        }
      })();
      rep.packsWritten++;
      rep.packsRewritten += g.length;
      crashPoint('gc-after-index');
      // A pin that appeared during gc may have cached locations in the old packs.
      pins = pinState(repo);
      const nowPinned = pins.ids.size > 0 ? chunksOfCheckpoints(db, pins.ids) : new Set<number>();
      for (const p of g) {
        const risky = (p.movedIds ?? []).some((id) => nowPinned.has(id));
        if (risky) {
          pending.push({ name: p.name, size: p.size, pins: pins.files });
          await writePending(repo.dir, pending);
        } else {
          await fsp.rm(packPath(repo.dir, p.name), { force: true });
        }
      }
    };
    try {
      for (const src of candidates) {
        const rows = db
          .prepare(
            'SELECT id, hash, offset, stored_len AS storedLen, raw_len AS rawLen, codec FROM chunks WHERE pack_id = ? ORDER BY offset',
          )
          .all(src.id) as {
          id: number;
          hash: Buffer;
          offset: number;
          storedLen: number;
          rawLen: number;
          codec: number;
        }[];
        // Read and check every live chunk of this pack before copying any of it.
        const data: Buffer[] = [];
        const bad: number[] = [];
        const fh = await fsp.open(packPath(repo.dir, src.name), 'r').catch(() => undefined);
        if (!fh) {
          bad.push(...rows.map((r) => r.id));
        } else {
          try {
            for (const r of rows) {
              try {
                checkRecordLengths(r, repo.config.chunkSize);
                const buf = Buffer.allocUnsafe(r.storedLen);
                const { bytesRead } = await fh.read(buf, 0, r.storedLen, r.offset);
                if (bytesRead !== r.storedLen) throw new Error('truncated');
                decodeChunk(buf, r.codec, r.rawLen, r.hash, repo.config.chunkSize);
                data.push(buf);
              } catch {
                bad.push(r.id);
              }
            }
          } finally {
            await fh.close();
          }
        }
        if (bad.length > 0) {
          markChunksDamaged(db, bad);
          rep.packsKeptDamaged++;
          o.onNotice?.(
            `pack ${src.name} holds ${bad.length} damaged chunk(s): left as it is; run 'bkfs verify' for details`,
          );
          done += src.live;
          continue;
        }
        if (writer && group.length > 0 && writer.size + src.live - PACK_HEADER_LEN > PACK_TARGET) {
          await commitGroup();
        }
        writer ??= await PackWriter.create(repo.dir);
        src.movedIds = [];
        for (let i = 0; i < rows.length; i++) {
          const r = rows[i]!;
          const pc = await writer.append(
            { codec: r.codec, rawLen: r.rawLen, storedLen: r.storedLen, hash: r.hash },
            data[i]!,
          );
          moved.push({ id: r.id, offset: pc.offset });
          src.movedIds.push(r.id);
          rep.bytesCopied += r.storedLen;
        }
        group.push(src);
        done += src.live;
        o.onProgress?.(done, total);
      }
      await commitGroup();
    } catch (e) {
      if (writer) await writer.abort();
      throw e;
    }
    const after = packFilesOnDisk(repo.dir);
    rep.bytesAfter = after.reduce((a, f) => a + f.size, 0);
    rep.packsPending = pending.length;
    rep.bytesPending = pending.reduce((a, p) => a + p.size, 0);
    rep.bytesFreed = rep.bytesBefore - rep.bytesAfter;
    return rep;
  } finally {
    if (!o.dryRun) repo.unlockWriter();
  }
}
