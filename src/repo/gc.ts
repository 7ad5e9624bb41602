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
 * Storage: packs are listed, read (through the pack reader) and deleted through the repository's
 * store (FORMAT.md, "Storage interface"): one code path for a local directory and a bucket; what
 * a bucket needs more (its writer lease, dropping cached blocks) is inside `deletePack`. The one
 * local file gc keeps, `gc-pending.json`, is handled by `gc-pending.ts`; this file touches no file.
 *
 * Memory: the set of live chunk ids and page ids, plus the live stored bytes of one source pack
 * (at most a pack, 64 MiB) while it is copied.
 *
 * Also here: damage bookkeeping shared by verify, gc and the backup commit (`markChunksDamaged`,
 * `healDamagedChunks`, `refreshCheckpointDamage`).
 */
import type Database from 'better-sqlite3';
import type { Repository } from './repository';
import { crashPoint, deleteCheckpointRows } from './repository';
import { activePins } from './pins';
import { liveSessions, sessionLive } from './sessions';
import { readPending, writePending, type PendingPack } from './gc-pending';
import { isBkfsError } from '../errors';
import { holdLease, listPacks, packKey } from '../store/location';
import { decodeStored } from '../store/codec';
import {
  PACK_HEADER_LEN,
  PACK_TARGET,
  PackWriter,
  RECORD_HEADER_LEN,
  checkRecordLengths,
  trailerBytesFor,
  trailerEntryLen,
  type TrailerKind,
} from '../store/packs';

export { PENDING_FILE } from './gc-pending';

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
  }).immediate();
}

/**
 * Re-point extents that use a damaged chunk to an undamaged chunk with the same hash (stored again
 * by a later backup), so checkpoints that used the damaged copy read correctly again; the damaged
 * copy is then unused and gc removes it. Returns how many extents were re-pointed. Call inside a
 * transaction or on its own (it is one statement plus a flag refresh).
 */
export function healDamagedChunks(db: Database.Database): number {
  // The good copy is never a deletion candidate (FORMAT.md, "Concurrent writers").
  const twin = `SELECT d.id FROM chunks d JOIN chunks g ON g.hash = d.hash AND g.damaged = 0 AND g.candidate IS NULL WHERE d.damaged = 1`;
  if (!db.prepare(`${twin} LIMIT 1`).get()) return 0;
  const r = db
    .prepare(
      `UPDATE extents SET chunk_id = (SELECT g.id FROM chunks d JOIN chunks g ON g.hash = d.hash AND g.damaged = 0
                                        AND g.candidate IS NULL WHERE d.id = extents.chunk_id)
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

/**
 * Delete a pack from the store: the bucket's writer lease first (a no-op locally), then the
 * object (locally its file, the directory fsynced), then what the reader holds of it (a
 * descriptor, or blocks in the chunk cache).
 */
export async function deletePack(repo: Repository, name: string): Promise<void> {
  await holdLease(repo.dir, repo.store);
  await repo.store.delete([packKey(name)]);
  repo.packs.forget(name);
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
// Deletion candidates (format 3, FORMAT.md "Concurrent writers")

/** A gc generation: when it marked its candidates, and the writers live right after. */
export interface GcMark {
  gen: number;
  time: number;
  /** Session names; null = not recorded yet (gc died between marking and listing). */
  sessions: string[] | null;
}

export function gcMarks(db: Database.Database): GcMark[] {
  const rows = db.prepare('SELECT gen, time, sessions FROM gc_marks ORDER BY gen').all() as {
    gen: number;
    time: number;
    sessions: string | null;
  }[];
  return rows.map((r) => ({
    ...r,
    sessions: r.sessions === null ? null : (JSON.parse(r.sessions) as string[]),
  }));
}

/**
 * May the candidates of `mark` be deleted? Only once every writer that was live when they were
 * marked has ended (pure; `live` tells whether a session is live). A generation whose writers were
 * never recorded is not deletable (the caller records the writers live now, which is a superset
 * of those of the marking time that are still running, and decides next time).
 */
export function markDeletable(mark: GcMark, live: (session: string) => boolean, own?: string): boolean {
  if (mark.sessions === null) return false;
  return mark.sessions.every((s) => s === own || !live(s));
}

/**
 * Inside a backup's commit transaction: rescue every deletion candidate the checkpoint's block
 * map uses. A candidate with a non-candidate twin (same hash, undamaged; a writer that started
 * after the marking stored it again) is replaced by the twin in the extents (same bytes, same
 * digests); otherwise its mark is cleared. Returns how many candidates were rescued.
 */
export function rescueCandidates(db: Database.Database, cpId: number): number {
  const rows = db
    .prepare(
      `SELECT e.page_id AS p, e.offset AS o, c.id AS c, c.hash AS h
         FROM disks d CROSS JOIN disk_pages dp CROSS JOIN extents e CROSS JOIN chunks c
        WHERE d.checkpoint_id = ? AND dp.disk_id = d.id AND e.page_id = dp.page_id
          AND c.id = e.chunk_id AND c.candidate IS NOT NULL`,
    )
    .all(cpId) as { p: number; o: number; c: number; h: Buffer }[];
  if (rows.length === 0) return 0;
  const twin = db.prepare('SELECT id FROM chunks WHERE hash = ? AND damaged = 0 AND candidate IS NULL');
  const clear = db.prepare('UPDATE chunks SET candidate = NULL WHERE id = ?');
  const upd = db.prepare('UPDATE extents SET chunk_id = ? WHERE page_id = ? AND offset = ?');
  const decided = new Map<number, number>();
  for (const r of rows) {
    let to = decided.get(r.c);
    if (to === undefined) {
      const t = twin.get(r.h) as { id: number } | undefined;
      if (t) {
        to = t.id;
      } else {
        clear.run(r.c);
        to = r.c;
      }
      decided.set(r.c, to);
    }
    if (to !== r.c) upd.run(to, r.p, r.o);
  }
  return decided.size;
}

/** What gc's index step reports. */
type SweepCounts = Pick<
  GcReport,
  'checkpointsRemoved' | 'checkpointsPinned' | 'chunksRemoved' | 'chunkBytesRemoved' | 'chunksWaiting'
>;

/** State shared by the phases of `markAndSweep`. */
interface SweepCtx {
  repo: Repository;
  db: Database.Database;
  pins: PinState;
  own: string | undefined;
  out: SweepCounts;
}

/**
 * gc's index step (caller holds the maintenance lock and a session `own`): record the writers of
 * generations that have none, then ONE transaction deletes the rows of forgotten/failed
 * checkpoints nobody pins, computes the live chunks (used by complete, running or pinned
 * checkpoints), deletes the candidates of generations whose writers have all ended (never a live
 * one), and marks every other unused chunk as a candidate of a new generation. Then the writers
 * live now are recorded for it; when there are none, its candidates are deleted at once (a gc
 * with no backup beside it removes every unused chunk, as before format 3).
 * Crash safety: each transaction leaves a consistent index; a crash between them leaves a
 * generation with no writers recorded, which the next gc records first (and never deletes early).
 */
function markAndSweep(repo: Repository, pins: PinState, own: string | undefined): SweepCounts {
  const out: SweepCounts = {
    checkpointsRemoved: 0,
    checkpointsPinned: 0,
    chunksRemoved: 0,
    chunkBytesRemoved: 0,
    chunksWaiting: 0,
  };
  const ctx: SweepCtx = { repo, db: repo.db, pins, own, out };
  recordMissingWriters(ctx);
  const deletable = deletableGenerations(ctx);
  const gen = ctx.db.transaction((): number => sweepAndMark(ctx, deletable)).immediate();
  if (gen !== 0) recordWritersOrDelete(ctx, gen);
  out.chunksWaiting = countWaiting(ctx.db);
  return out;
}

/** Session names of the live writers other than gc's own. */
function otherWriters(ctx: SweepCtx): string[] {
  return liveSessions(ctx.repo.dir)
    .map((x) => x.name!)
    .filter((n) => n !== ctx.own);
}

/** Generations whose writers were never recorded (gc died in between) get the writers live now (one transaction). */
function recordMissingWriters(ctx: SweepCtx): void {
  const { db } = ctx;
  const unrecorded = gcMarks(db).filter((m) => m.sessions === null);
  if (unrecorded.length === 0) return;
  const now = JSON.stringify(otherWriters(ctx));
  const st = db.prepare('UPDATE gc_marks SET sessions = ? WHERE gen = ? AND sessions IS NULL');
  db.transaction(() => {
    for (const m of unrecorded) st.run(now, m.gen);
  }).immediate();
}

/** Generations whose writers have all ended (ended writers stay ended: safe to decide before the transaction). */
function deletableGenerations(ctx: SweepCtx): Set<number> {
  const live = (sname: string) => sessionLive(ctx.repo.dir, sname);
  return new Set(
    gcMarks(ctx.db)
      .filter((m) => markDeletable(m, live, ctx.own))
      .map((m) => m.gen),
  );
}

/** Inside the transaction: rows of unpinned gone checkpoints, candidates, a new generation; returns it (0: none). */
function sweepAndMark(ctx: SweepCtx, deletable: Set<number>): number {
  const { db } = ctx;
  removeGoneCheckpoints(ctx);
  // Pages no page table uses (left by an interrupted forget of an older bkfs, or by hand).
  // A writer inserts a page's extents and its page-table row in one transaction.
  db.exec('DELETE FROM extents WHERE page_id NOT IN (SELECT page_id FROM disk_pages)');
  const liveChunks = chunksOfPages(db, pagesOf(db, liveCheckpointIds(db, ctx.pins.ids)));
  const g = ((db.prepare('SELECT max(gen) AS m FROM gc_marks').get() as { m: number | null }).m ?? 0) + 1;
  const marked = sweepCandidates(ctx, liveChunks, deletable, g);
  const delMark = db.prepare(
    'DELETE FROM gc_marks WHERE gen = ? AND NOT EXISTS (SELECT 1 FROM chunks WHERE candidate = ?)',
  );
  for (const d of deletable) delMark.run(d, d);
  if (marked === 0) return 0;
  db.prepare('INSERT INTO gc_marks (gen, time, sessions) VALUES (?, ?, NULL)').run(g, Date.now());
  return g;
}

/** Delete the rows of forgotten/failed checkpoints that nobody pins; count them and the pinned ones. */
function removeGoneCheckpoints(ctx: SweepCtx): void {
  const { db, out } = ctx;
  const gone = (
    db.prepare("SELECT id FROM checkpoints WHERE state IN ('forgotten', 'failed')").all() as {
      id: number;
    }[]
  ).map((r) => r.id);
  const removable = gone.filter((id) => !ctx.pins.ids.has(id));
  out.checkpointsRemoved = removable.length;
  out.checkpointsPinned = gone.length - removable.length;
  for (const id of removable) deleteCheckpointRows(db, id);
}

/** Unused chunks: deletable candidates are deleted, others not yet candidates marked with `g`; returns how many marked. */
function sweepCandidates(ctx: SweepCtx, liveChunks: Set<number>, deletable: Set<number>, g: number): number {
  const { db, out } = ctx;
  const del = db.prepare('DELETE FROM chunks WHERE id = ?');
  const mark = db.prepare('UPDATE chunks SET candidate = ? WHERE id = ?');
  let marked = 0;
  const rows = db.prepare('SELECT id, stored_len AS len, candidate AS cand FROM chunks').all() as {
    id: number;
    len: number;
    cand: number | null;
  }[];
  for (const c of rows) {
    if (liveChunks.has(c.id)) continue; // a live candidate: a running writer rescues it
    if (c.cand === null) {
      mark.run(g, c.id);
      marked++;
    } else if (deletable.has(c.cand)) {
      del.run(c.id);
      out.chunksRemoved++;
      out.chunkBytesRemoved += c.len;
    }
  }
  return marked;
}

/** Record the writers live after generation `gen` committed; with none, delete its candidates at once (own transaction). */
function recordWritersOrDelete(ctx: SweepCtx, gen: number): void {
  const { db, out } = ctx;
  // Writers live AFTER the marking committed: every writer that may hold a candidate's id.
  const writers = otherWriters(ctx);
  db.transaction(() =>
    db.prepare('UPDATE gc_marks SET sessions = ? WHERE gen = ?').run(JSON.stringify(writers), gen),
  ).immediate();
  if (writers.length > 0) return;
  db.transaction(() => {
    const r = db
      .prepare('SELECT count(*) AS n, coalesce(sum(stored_len), 0) AS b FROM chunks WHERE candidate = ?')
      .get(gen) as { n: number; b: number };
    db.prepare('DELETE FROM chunks WHERE candidate = ?').run(gen);
    db.prepare('DELETE FROM gc_marks WHERE gen = ?').run(gen);
    out.chunksRemoved += r.n;
    out.chunkBytesRemoved += r.b;
  }).immediate();
}

function countWaiting(db: Database.Database): number {
  return (db.prepare('SELECT count(*) AS n FROM chunks WHERE candidate IS NOT NULL').get() as { n: number })
    .n;
}

// ---------------------------------------------------------------------------------------------
// gc

/**
 * Default `maxUnused`: gc leaves at most this share of the packs' bytes unused, rewriting the packs
 * with the largest unused share first (restic's `--max-unused`, whose default is 5 %). Chosen by
 * measurement (`bench/gc-threshold.ts`, README "gc: which packs are rewritten"): it copies a
 * fraction of what rewriting every pack with an unused byte did (that copied a 52.7 MiB pack to
 * free 19 KiB), and bounds what stays unused.
 */
export const DEFAULT_MAX_UNUSED = 0.05;
/** `repackSmall`: packs under this size (of `PACK_TARGET`) are merged, as restic does (80 %). */
export const SMALL_PACK = Math.floor(PACK_TARGET * 0.8);

export interface GcOptions {
  /** Compute and report what gc would do; change nothing (takes no lock). */
  dryRun?: boolean;
  /**
   * Unused bytes gc may leave in packs, as a fraction of all pack bytes after gc: packs are
   * rewritten, largest unused share first, until the rest is within it (0 = rewrite every pack
   * with an unused byte; 1 = never rewrite; packs with no live chunk are always deleted).
   * Default `DEFAULT_MAX_UNUSED`.
   */
  maxUnused?: number;
  /** Also merge packs smaller than `SMALL_PACK` (two or more) into full-size ones. */
  repackSmall?: boolean;
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
  /** The threshold used (fraction of a pack's bytes). */
  maxUnused: number;
  /** Packs with unused bytes left as they are: what they leave unused is within `maxUnused`. */
  packsKeptUnused: number;
  bytesKeptUnused: number;
  /** Of `packsRewritten`: small packs merged for `repackSmall` (no unused bytes worth it). */
  packsSmallMerged: number;
  /**
   * Unused chunks left as deletion candidates because backups were running when gc marked them
   * (FORMAT.md, "Concurrent writers"): a later gc deletes them once those backups have ended.
   */
  chunksWaiting: number;
}

/** A pack gc may rewrite, reduced to what the selection needs (pure, unit-tested). */
export interface PackChoice {
  size: number;
  /** Live bytes: header + records of live chunks. */
  live: number;
}

/**
 * Which packs to rewrite (restic's rule): the ones with the largest unused share first, until the
 * unused bytes left in the others are at most `maxUnused` of the packs' bytes after gc, i.e.
 * unused <= used x maxUnused / (1 - maxUnused); every pack with an unused byte when `maxUnused` is
 * 0, none when it is 1. With `repackSmall`, also the packs smaller than `SMALL_PACK` when at least
 * two packs get rewritten (one small pack alone would only be copied). Returns indexes into
 * `packs`, and which were added as small.
 */
export function choosePacks(
  packs: readonly PackChoice[],
  maxUnused: number,
  repackSmall: boolean,
): { rewrite: number[]; small: number[] } {
  const used = packs.reduce((a, p) => a + p.live, 0);
  let unused = packs.reduce((a, p) => a + p.size - p.live, 0);
  const limit = maxUnused >= 1 ? Infinity : (used * maxUnused) / (1 - maxUnused);
  const order = packs
    .map((p, i) => ({ i, unused: p.size - p.live, share: (p.size - p.live) / p.size }))
    .filter((x) => x.unused > 0)
    .sort((a, b) => b.share - a.share || b.unused - a.unused);
  const chosen = new Set<number>();
  for (const x of order) {
    if (unused <= limit) break;
    chosen.add(x.i);
    unused -= x.unused;
  }
  let small: number[] = [];
  if (repackSmall) {
    small = packs
      .map((p, i) => ({ p, i }))
      .filter((x) => !chosen.has(x.i) && x.p.live < SMALL_PACK)
      .map((x) => x.i);
    if (small.length + chosen.size < 2) small = [];
  }
  return { rewrite: [...chosen, ...small].sort((a, b) => a - b), small };
}

/** How many packs the rewrite of `live` (live bytes of each source pack, in order) writes. */
export function packsWrittenFor(live: readonly number[]): { packs: number; bytes: number } {
  let packs = 0;
  let bytes = 0;
  let cur = -1; // bytes of the pack being filled, -1 = none
  for (const l of live) {
    const body = l - PACK_HEADER_LEN;
    if (cur >= 0 && cur + body > PACK_TARGET) {
      bytes += cur;
      cur = -1;
    }
    if (cur < 0) {
      cur = PACK_HEADER_LEN;
      packs++;
    }
    cur += body;
  }
  if (cur >= 0) bytes += cur;
  return { packs, bytes };
}

interface PackInfo {
  id: number;
  name: string;
  size: number;
  chunks: number;
  /** Live bytes: header + records of indexed chunks + their trailer entries and footer, if any. */
  live: number;
  damaged: boolean;
  pinned: boolean;
  /** Holds a deletion candidate (format 3): left until a later gc deleted it. */
  candidates: boolean;
  /** Chunks copied out of this pack by the rewrite in progress. */
  movedIds?: number[];
}

function packInfos(db: Database.Database, pinnedChunks: Set<number>, trailer: TrailerKind): PackInfo[] {
  const packs = db.prepare('SELECT id, name, size FROM packs ORDER BY id').all() as {
    id: number;
    name: string;
    size: number;
  }[];
  const byId = new Map<number, PackInfo>();
  for (const p of packs) {
    byId.set(p.id, {
      ...p,
      chunks: 0,
      live: PACK_HEADER_LEN,
      damaged: false,
      pinned: false,
      candidates: false,
    });
  }
  const st = db.prepare(
    'SELECT id, pack_id AS pack, stored_len AS len, damaged, candidate IS NOT NULL AS cand FROM chunks',
  );
  for (const c of st.iterate() as IterableIterator<{
    id: number;
    pack: number;
    len: number;
    damaged: number;
    cand: number;
  }>) {
    const p = byId.get(c.pack);
    if (!p) continue;
    p.chunks++;
    p.live += RECORD_HEADER_LEN + c.len;
    if (c.damaged) p.damaged = true;
    if (c.cand) p.candidates = true;
    if (pinnedChunks.has(c.id)) p.pinned = true;
  }
  // The trailer's entries of live records and its footer are live too (a pack written before
  // trailers, in a bucket, has none: never count more than the pack holds).
  for (const p of byId.values()) p.live = Math.min(p.size, p.live + trailerBytesFor(p.chunks, trailer));
  return [...byId.values()];
}

// ---------------------------------------------------------------------------------------------
// gc run, phase by phase

/** What the phases of one gc run share. */
interface GcRun {
  repo: Repository;
  db: Database.Database;
  o: GcOptions;
  rep: GcReport;
  /** The pins when gc started. */
  pins: PinState;
  /** This gc's writer session, if it has one. */
  own: string | undefined;
  /** Pack files out of the index kept for readers or writers (`gc-pending.json`), as gc leaves them. */
  pending: PendingPack[];
}

/** A chunk no live checkpoint uses (dry run). */
interface DeadChunk {
  id: number;
  len: number;
}

/** A chunk row as the rewrite copies it. */
interface ChunkRow {
  id: number;
  hash: Buffer;
  offset: number;
  storedLen: number;
  rawLen: number;
  codec: number;
}

/** The pack being written by a rewrite, the source packs it takes over, and where their chunks went. */
interface Rewrite {
  writer: PackWriter | undefined;
  group: PackInfo[];
  moved: { id: number; offset: number }[];
}

/** Runs gc's steps in order (see the file's header); a dry run only computes the report. */
export async function runGc(repo: Repository, o: GcOptions = {}): Promise<GcReport> {
  const rep = newReport(o);
  if (!o.dryRun) repo.lockWriter('gc');
  try {
    const filesBefore = await listPacks(repo.store);
    rep.bytesBefore = filesBefore.reduce((a, f) => a + f.size, 0);
    const run: GcRun = { repo, db: repo.db, o, rep, pins: pinState(repo), own: repo.session, pending: [] };
    let dead: DeadChunk[] = [];
    if (o.dryRun) dead = planRows(run);
    else sweepRows(run);
    await sweepFiles(run, filesBefore);

    // 4-5. Packs: delete the dead ones, rewrite the ones with dead bytes.
    const pinnedChunks = chunksOfCheckpoints(run.db, run.pins.ids);
    const trailer = repo.trailerKind;
    const infos = packInfos(run.db, pinnedChunks, trailer);
    if (o.dryRun) discountDeadChunks(run.db, infos, dead, trailer);
    const deadPacks = infos.filter((p) => p.chunks === 0);
    await deleteDeadPacks(run, deadPacks);
    const candidates = chooseRewrites(
      run,
      infos.filter((p) => p.chunks > 0),
    );
    if (o.dryRun) {
      reportPlan(run, deadPacks, candidates, trailer);
      return rep;
    }
    await rewritePacks(run, candidates);
    await reportAfter(run);
    return rep;
  } finally {
    if (!o.dryRun) repo.unlockWriter();
  }
}

/** A report with every count at 0 and the threshold of the options. */
function newReport(o: GcOptions): GcReport {
  return {
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
    maxUnused: o.maxUnused ?? DEFAULT_MAX_UNUSED,
    packsKeptUnused: 0,
    bytesKeptUnused: 0,
    packsSmallMerged: 0,
    chunksWaiting: 0,
  };
}

/** Dry run of steps 1-2: counts what a gc alone would remove now (every unused chunk); changes nothing. */
function planRows(run: GcRun): DeadChunk[] {
  const { db, rep, pins } = run;
  const gone = (
    db.prepare("SELECT id FROM checkpoints WHERE state IN ('forgotten', 'failed')").all() as {
      id: number;
    }[]
  ).map((r) => r.id);
  rep.checkpointsRemoved = gone.filter((id) => !pins.ids.has(id)).length;
  rep.checkpointsPinned = gone.length - rep.checkpointsRemoved;
  const liveChunks = chunksOfPages(db, pagesOf(db, liveCheckpointIds(db, pins.ids)));
  const allChunks = db.prepare('SELECT id, stored_len AS len FROM chunks').all() as DeadChunk[];
  const dead = allChunks.filter((c) => !liveChunks.has(c.id));
  rep.chunksRemoved = dead.length;
  rep.chunkBytesRemoved = dead.reduce((a, c) => a + c.len, 0);
  return dead;
}

/** Steps 1-2: heal, then rows, sweep and mark; each transaction leaves a consistent index. */
function sweepRows(run: GcRun): void {
  const { db, rep } = run;
  rep.extentsHealed = db.transaction(() => healDamagedChunks(db)).immediate();
  const m = markAndSweep(run.repo, run.pins, run.own);
  Object.assign(rep, m);
  crashPoint('gc-after-rows');
}

/**
 * Step 3: deletes the pending packs whose readers and writers are gone and the pack files the
 * index does not know, or keeps them pending while a pin or another writer may still see them;
 * sets `run.pending` and (unless a dry run) writes it. Only unindexed files are deleted.
 */
async function sweepFiles(run: GcRun, filesBefore: { name: string; size: number }[]): Promise<void> {
  const { repo, db, o, rep, pins, own } = run;
  // Order matters: files listed (by the caller), THEN live writers, THEN the index (per file): a
  // file not indexed by then whose writer was already gone will never be indexed.
  const writersNow = liveSessions(repo.dir)
    .map((x) => x.name!)
    .filter((n) => n !== own);
  const isIndexed = db.prepare('SELECT 1 FROM packs WHERE name = ?');
  const pending = readPending(repo.dir);
  const pendingNames = new Set(pending.map((p) => p.name));
  const stillPending: PendingPack[] = [];
  for (const p of pending) {
    const waiting =
      p.pins.some((f) => pins.files.includes(f)) || (p.writers ?? []).some((w) => sessionLive(repo.dir, w));
    if (waiting) {
      stillPending.push(p);
      continue;
    }
    if (isIndexed.get(p.name)) continue; // indexed (by its writer, or a rebuild): a normal pack
    if (!o.dryRun) await deletePack(repo, p.name);
  }
  for (const f of filesBefore) {
    if (pendingNames.has(f.name) || isIndexed.get(f.name)) continue;
    if (pins.files.length > 0 || writersNow.length > 0) {
      stillPending.push({ name: f.name, size: f.size, pins: pins.files, writers: writersNow });
    } else {
      rep.orphansRemoved++;
      if (!o.dryRun) await deletePack(repo, f.name);
    }
  }
  run.pending = stillPending;
  if (!o.dryRun) await writePending(repo.dir, run.pending);
}

/** Dry run: nothing was deleted, so counts the dead chunks out of their packs' `chunks` and `live`. */
function discountDeadChunks(
  db: Database.Database,
  infos: PackInfo[],
  dead: DeadChunk[],
  trailer: TrailerKind,
): void {
  const deadSet = new Map(dead.map((c) => [c.id, c.len]));
  const packOf = db.prepare('SELECT pack_id AS p FROM chunks WHERE id = ?');
  const byId = new Map(infos.map((p) => [p.id, p]));
  for (const [id, len] of deadSet) {
    const p = byId.get((packOf.get(id) as { p: number }).p);
    if (p) {
      p.chunks--;
      p.live -= RECORD_HEADER_LEN + len + trailerEntryLen(trailer);
    }
  }
}

/** Step 4: deletes packs without live chunks: rows (one transaction), then files (a crash leaves orphans). */
async function deleteDeadPacks(run: GcRun, deadPacks: PackInfo[]): Promise<void> {
  const { repo, db } = run;
  run.rep.packsDeleted = deadPacks.length;
  if (run.o.dryRun || deadPacks.length === 0) return;
  db.transaction(() => {
    // Re-checked inside: a pack row never gains chunks (writers insert a pack with its chunks).
    const del = db.prepare(
      'DELETE FROM packs WHERE id = ? AND NOT EXISTS (SELECT 1 FROM chunks WHERE pack_id = ?)',
    );
    for (const p of deadPacks) del.run(p.id, p.id);
  }).immediate();
  // No pinned reader reads a dead pack (its chunks are used by no pinned checkpoint).
  for (const p of deadPacks) await deletePack(repo, p.name);
}

/** Which packs with live chunks to rewrite (`choosePacks` over the movable ones); counts the ones kept. */
function chooseRewrites(run: GcRun, infos: PackInfo[]): PackInfo[] {
  const rep = run.rep;
  const movable: PackInfo[] = [];
  for (const p of infos) {
    if (p.live < p.size && p.damaged) rep.packsKeptDamaged++;
    else if (p.live < p.size && p.pinned) rep.packsKeptForReaders++;
    else if (!p.damaged && !p.pinned && !p.candidates) movable.push(p);
  }
  const choice = choosePacks(movable, rep.maxUnused, run.o.repackSmall === true);
  const candidates = choice.rewrite.map((i) => movable[i]!);
  const chosen = new Set(candidates);
  for (const p of movable) {
    if (!chosen.has(p) && p.live < p.size) {
      rep.packsKeptUnused++;
      rep.bytesKeptUnused += p.size - p.live;
    }
  }
  rep.packsSmallMerged = choice.small.length;
  return candidates;
}

/** Dry run: reports what the rewrite of `candidates` would write and what gc would free. */
function reportPlan(run: GcRun, deadPacks: PackInfo[], candidates: PackInfo[], trailer: TrailerKind): void {
  const { rep, pending } = run;
  const plan = packsWrittenFor(candidates.map((p) => p.live));
  rep.packsRewritten = candidates.length;
  rep.packsWritten = plan.packs;
  // Stored bytes of the live chunks, as the real run counts them.
  rep.bytesCopied = candidates.reduce(
    (a, p) =>
      a + p.live - PACK_HEADER_LEN - p.chunks * RECORD_HEADER_LEN - trailerBytesFor(p.chunks, trailer),
    0,
  );
  const freed =
    deadPacks.reduce((a, p) => a + p.size, 0) + candidates.reduce((a, p) => a + p.size, 0) - plan.bytes;
  rep.packsPending = pending.length;
  rep.bytesPending = pending.reduce((a, p) => a + p.size, 0);
  rep.bytesAfter = rep.bytesBefore - freed;
  rep.bytesFreed = freed;
}

/**
 * Step 5: copies the live chunks of `candidates` into new packs, committing each full one
 * (`commitGroup`); a pack holding a damaged live chunk is left as it is. On an error the pack being
 * written is aborted: it was never indexed.
 */
async function rewritePacks(run: GcRun, candidates: PackInfo[]): Promise<void> {
  const total = candidates.reduce((a, p) => a + p.live, 0);
  let done = 0;
  const rw: Rewrite = { writer: undefined, group: [], moved: [] };
  try {
    for (const src of candidates) {
      const copied = await copyPack(run, rw, src);
      done += src.live;
      if (copied) run.o.onProgress?.(done, total);
    }
    await commitGroup(run, rw);
  } catch (e) {
    if (rw.writer) await rw.writer.abort();
    throw e;
  }
}

/**
 * Appends the live chunks of `src` to the pack being written (committing it first when `src`
 * would overfill it); false, with the chunks marked damaged and nothing copied, when one fails.
 */
async function copyPack(run: GcRun, rw: Rewrite, src: PackInfo): Promise<boolean> {
  const { repo, rep } = run;
  const { rows, data, bad } = await readLiveChunks(run, src);
  if (bad.length > 0) {
    markChunksDamaged(run.db, bad);
    rep.packsKeptDamaged++;
    run.o.onNotice?.(
      `pack ${src.name} holds ${bad.length} damaged chunk(s): left as it is; run 'bkfs verify' for details`,
    );
    return false;
  }
  if (rw.writer && rw.group.length > 0 && rw.writer.size + src.live - PACK_HEADER_LEN > PACK_TARGET) {
    await commitGroup(run, rw);
  }
  const writer = (rw.writer ??= await PackWriter.create(repo.dir, repo.tmpSubdir, repo.cipher !== null));
  src.movedIds = [];
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i]!;
    const pc = await writer.append(
      { codec: r.codec, rawLen: r.rawLen, storedLen: r.storedLen, hash: r.hash },
      data[i]!,
    );
    rw.moved.push({ id: r.id, offset: pc.offset });
    src.movedIds.push(r.id);
    rep.bytesCopied += r.storedLen;
  }
  rw.group.push(src);
  return true;
}

/**
 * Reads and checks every live chunk of `src` before any of it is copied (through the pack reader:
 * a descriptor locally, ranged GETs and the block cache on object storage). Returns the chunk rows
 * in offset order, their stored bytes, and the ids of those that fail. A store that cannot be
 * reached is an error, never damage.
 */
async function readLiveChunks(
  run: GcRun,
  src: PackInfo,
): Promise<{ rows: ChunkRow[]; data: Buffer[]; bad: number[] }> {
  const repo = run.repo;
  const rows = run.db
    .prepare(
      'SELECT id, hash, offset, stored_len AS storedLen, raw_len AS rawLen, codec FROM chunks WHERE pack_id = ? ORDER BY offset',
    )
    .all(src.id) as ChunkRow[];
  const data: Buffer[] = [];
  const bad: number[] = [];
  for (const r of rows) {
    try {
      checkRecordLengths(r, repo.config.chunkSize, repo.cipher !== null);
      const buf = await repo.packs.read(src.name, r.offset, r.storedLen);
      decodeStored(repo.cipher, buf, r.codec, r.rawLen, r.hash, repo.config.chunkSize);
      data.push(buf);
    } catch (e) {
      if (isBkfsError(e) && (e.code === 'STORE_UNAVAILABLE' || e.code === 'STORE_ACCESS')) throw e;
      bad.push(r.id);
    }
  }
  return { rows, data, bad };
}

/**
 * Seals the pack being written (crash point `gc-after-new-pack`: an unindexed new pack), indexes
 * it in ONE transaction with its group (`indexNewPack`; crash point `gc-after-index`: unindexed
 * old packs), then releases the old packs. Both crash states are cleaned by step 3 of a later gc.
 */
async function commitGroup(run: GcRun, rw: Rewrite): Promise<void> {
  if (!rw.writer) return;
  const w = rw.writer;
  rw.writer = undefined;
  await w.seal();
  crashPoint('gc-after-new-pack');
  const g = rw.group;
  const mv = rw.moved;
  rw.group = [];
  rw.moved = [];
  indexNewPack(run.db, w, mv, g);
  run.rep.packsWritten++;
  run.rep.packsRewritten += g.length;
  crashPoint('gc-after-index');
  await releaseOldPacks(run, g);
}

/** ONE transaction: inserts the new pack, re-points the moved chunks, deletes the emptied packs' rows. */
function indexNewPack(
  db: Database.Database,
  w: PackWriter,
  moved: { id: number; offset: number }[],
  group: PackInfo[],
): void {
  db.transaction(() => {
    const packId = Number(
      db.prepare('INSERT INTO packs (name, size, created) VALUES (?, ?, ?)').run(w.name, w.size, Date.now())
        .lastInsertRowid,
    );
    const upd = db.prepare('UPDATE chunks SET pack_id = ?, offset = ? WHERE id = ?');
    for (const m of moved) upd.run(packId, m.offset, m.id);
    const left = db.prepare('SELECT count(*) AS n FROM chunks WHERE pack_id = ?');
    const del = db.prepare('DELETE FROM packs WHERE id = ?');
    for (const p of group) {
      if ((left.get(p.id) as { n: number }).n !== 0) throw new Error(`pack ${p.name} still has chunks`);
      del.run(p.id);
    }
  }).immediate();
}

/** Deletes the packs a rewrite emptied, or records them pending if a pin that appeared since may read one. */
async function releaseOldPacks(run: GcRun, group: PackInfo[]): Promise<void> {
  const { repo, db } = run;
  // A pin that appeared during gc may have cached locations in the old packs.
  const pinsNow = pinState(repo);
  const nowPinned = pinsNow.ids.size > 0 ? chunksOfCheckpoints(db, pinsNow.ids) : new Set<number>();
  for (const p of group) {
    const risky = (p.movedIds ?? []).some((id) => nowPinned.has(id));
    if (risky) {
      run.pending.push({ name: p.name, size: p.size, pins: pinsNow.files });
      await writePending(repo.dir, run.pending);
    } else {
      await deletePack(repo, p.name);
    }
  }
}

/** The store's pack bytes after gc, and what is left pending. */
async function reportAfter(run: GcRun): Promise<void> {
  const rep = run.rep;
  const after = await listPacks(run.repo.store);
  rep.bytesAfter = after.reduce((a, f) => a + f.size, 0);
  rep.packsPending = run.pending.length;
  rep.bytesPending = run.pending.reduce((a, p) => a + p.size, 0);
  rep.bytesFreed = rep.bytesBefore - rep.bytesAfter;
}
