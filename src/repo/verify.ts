/**
 * `verify`: proves that checkpoints can be restored.
 *
 * 1. Index consistency for the selected checkpoints: every extent references an indexed chunk and
 *    lies inside it, extents of a page are sorted and do not overlap, stay inside their page and
 *    the disk, every chunk's pack is indexed and present on disk with the chunk inside it, and
 *    every checkpoint has its manifest (without it an index rebuild would lose the checkpoint).
 * 2. Deep check: every chunk the selection uses (or a random share, `samplePercent`) is read back
 *    from its pack (in pack order, a few reads in flight), decompressed and re-hashed. A chunk that
 *    fails is reported with every checkpoint and disk range that uses it, and marked damaged in the
 *    index with those checkpoints (`chunks.damaged`, `checkpoints.damaged`): `list` shows DAMAGED,
 *    and the next backup that meets the same data stores it again instead of deduplicating against
 *    the damaged copy, which heals the checkpoints (`healDamagedChunks`). A chunk marked damaged
 *    that now reads back correctly (a transient I/O error) is unmarked.
 * 3. Optionally (`compareWithSources`), the disks of a checkpoint are compared byte for byte with
 *    their source images through qemu-nbd (read-only) and the differing ranges reported.
 * 4. Block maps (`verify-map.ts`): each checkpoint-disk's map against its digests (format 2) and
 *    its manifest, and SQLite's `integrity_check`; each disagreement names the checkpoints it affects.
 * Locking: it writes damage flags and heals (one transaction at the end), so it takes the writer
 * lock for its run; with `markDamaged: false` (`--read-only`) it writes nothing, takes no lock and
 * works while a backup or gc runs: a chunk that gc moved meanwhile is looked up again before it is
 * called damaged.
 * Storage: manifests are listed and packs sized through the repository's store, chunks read
 * through the pack reader (FORMAT.md, "Storage interface"); this file touches no file (the source
 * comparison, which reads host files, is in `verify-sources.ts`).
 * Memory: the set of chunk ids in use.
 */
import type { Repository } from './repository';
import { isBkfsError } from '../errors';
import { decodeStored } from '../store/codec';
import { listManifests, packKey } from '../store/location';
import { getCheckpoint, getVm, listCheckpoints, listVms, type CheckpointRow } from '../index/catalog';
import { orderedMap } from '../util/pipeline';
import { healDamagedChunks, refreshCheckpointDamage } from './gc';
import { blockMapProblems, integrityProblems } from './verify-map';

export interface VerifyOptions {
  vm?: string;
  checkpoint?: string;
  /** Re-read only this share of the chunks (0 < p <= 100), chosen at random. */
  samplePercent?: number;
  /** Record damage in the index (default true). */
  markDamaged?: boolean;
  onProgress?: (done: number, total: number) => void;
}

export interface ChunkUse {
  vm: string;
  checkpoint: string;
  disk: string;
  offset: number;
  length: number;
}

export interface DamagedChunk {
  chunkId: number;
  hash: string;
  error: string;
  uses: ChunkUse[];
}

export interface VerifyReport {
  checkpoints: number;
  chunksChecked: number;
  bytesChecked: number;
  problems: string[];
  damaged: DamagedChunk[];
  /** Chunks that were marked damaged and now read back correctly (unmarked). */
  recovered: number;
}

export function selectCheckpoints(
  repo: Repository,
  o: { vm?: string; checkpoint?: string },
): { vm: string; cp: CheckpointRow }[] {
  if (o.vm) {
    const vm = getVm(repo.db, o.vm);
    if (o.checkpoint) return [{ vm: vm.name, cp: getCheckpoint(repo.db, vm, o.checkpoint) }];
    return listCheckpoints(repo.db, vm.id).map((cp) => ({ vm: vm.name, cp }));
  }
  return listVms(repo.db).flatMap((vm) => listCheckpoints(repo.db, vm.id).map((cp) => ({ vm: vm.name, cp })));
}

/**
 * Verify the selection. With `markDamaged` (the default) verify writes damage flags and heals, so
 * it holds the writer lock for the whole run (REPO_LOCKED beside a backup, forget or gc: the flags
 * it would write are computed from what it read, which a writer could change meanwhile). With
 * `markDamaged: false` it only reads and takes no lock.
 */
export async function verifyRepository(repo: Repository, o: VerifyOptions = {}): Promise<VerifyReport> {
  // A reader that may not write the repository cannot record damage: it only reads.
  if (o.markDamaged === false || !repo.writable) return verifyUnlocked(repo, o);
  repo.lockWriter('verify');
  try {
    return await verifyUnlocked(repo, o);
  } finally {
    repo.unlockWriter();
  }
}

/** The verify run itself (steps 1, 4, 2, then the damage transaction); the caller holds any lock. */
async function verifyUnlocked(repo: Repository, o: VerifyOptions): Promise<VerifyReport> {
  const sel = selectCheckpoints(repo, o);
  const problems: string[] = [];
  const used = await checkIndex(repo, sel, problems);
  // Block maps against their digests and manifests, and SQLite's own check (verify-map.ts).
  problems.push(...integrityProblems(repo), ...blockMapProblems(repo, sel));
  const deep = newDeepCheck(repo);
  const locs = locateChunks(deep, sampleIds([...used], o.samplePercent));
  const { damaged, recovered } = await readBackChunks(deep, locs, o);
  let unmarked = 0;
  if (o.markDamaged !== false)
    unmarked = recordDamage(
      repo,
      damaged.map((d) => d.chunkId),
      recovered,
    );
  return {
    checkpoints: sel.length,
    chunksChecked: locs.length,
    bytesChecked: deep.bytesChecked,
    problems,
    damaged,
    recovered: unmarked,
  };
}

/** An extent of a disk's block map, with its chunk's raw length (null: no such chunk). */
interface ExtentRow {
  pageNo: number;
  offset: number;
  length: number;
  chunkId: number | null;
  chunkOff: number;
  rawLen: number | null;
  present: number | null;
}

/** Step 1: manifests and block maps of the selection; appends problems, returns the chunk ids used. */
async function checkIndex(
  repo: Repository,
  sel: { vm: string; cp: CheckpointRow }[],
  problems: string[],
): Promise<Set<number>> {
  const db = repo.db;
  const used = new Set<number>();
  const extStmt = db.prepare(
    `SELECT dp.page_no AS pageNo, e.offset AS offset, e.length AS length, e.chunk_id AS chunkId,
            e.chunk_off AS chunkOff, c.raw_len AS rawLen, c.id AS present
       FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
      WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
  );
  // The manifests in the store (one listing; on object storage, the bucket's: what a rebuild
  // on another machine has).
  const manifests = new Set(sel.length > 0 ? (await listManifests(repo.store)).map((m) => m.uid) : []);
  for (const { vm, cp } of sel) {
    const uid = (cp as CheckpointRow & { uid?: string }).uid;
    if (uid && !manifests.has(uid)) {
      problems.push(
        `${vm}@${cp.name}: manifest ${uid} is missing (an index rebuild would lose this checkpoint; 'bkfs repair --manifests' writes it)`,
      );
    }
    const disks = db.prepare('SELECT * FROM disks WHERE checkpoint_id = ?').all(cp.id) as {
      id: number;
      name: string;
      virtual_size: number;
    }[];
    if (disks.length === 0) problems.push(`${vm}@${cp.name}: checkpoint has no disks`);
    for (const d of disks) {
      const rows = extStmt.iterate(d.id) as IterableIterator<ExtentRow>;
      checkDiskExtents(
        `${vm}@${cp.name} disk ${d.name}`,
        d.virtual_size,
        repo.config.pageSpan,
        rows,
        problems,
        used,
      );
    }
  }
  return used;
}

/** One disk's extents (in page and offset order): bounds, order, chunk references; adds used chunks. */
function checkDiskExtents(
  where: string,
  virtualSize: number,
  span: number,
  rows: IterableIterator<ExtentRow>,
  problems: string[],
  used: Set<number>,
): void {
  let prevEnd = -1;
  let prevPage = -1;
  for (const r of rows) {
    if (r.pageNo !== prevPage) prevEnd = -1;
    prevPage = r.pageNo;
    if (r.length <= 0) problems.push(`${where}: empty extent at ${r.offset}`);
    if (r.offset < prevEnd) problems.push(`${where}: overlapping extents at ${r.offset}`);
    if (
      Math.floor(r.offset / span) !== r.pageNo ||
      Math.floor((r.offset + r.length - 1) / span) !== r.pageNo
    ) {
      problems.push(`${where}: extent at ${r.offset} is outside its page ${r.pageNo}`);
    }
    if (r.offset + r.length > virtualSize)
      problems.push(`${where}: extent at ${r.offset} is past the disk's end`);
    prevEnd = r.offset + r.length;
    if (r.chunkId === null) continue;
    if (r.present === null) {
      problems.push(`${where}: extent at ${r.offset} references missing chunk ${r.chunkId}`);
      continue;
    }
    if (r.chunkOff + r.length > (r.rawLen ?? 0)) {
      problems.push(`${where}: extent at ${r.offset} reaches past the end of chunk ${r.chunkId}`);
    }
    used.add(r.chunkId);
  }
}

/** All the ids, or (samplePercent < 100) a random share of them, at least one. */
function sampleIds(ids: number[], samplePercent: number | undefined): number[] {
  if (samplePercent === undefined || samplePercent >= 100) return ids;
  const keep = Math.max(1, Math.ceil((ids.length * samplePercent) / 100));
  for (let i = ids.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [ids[i], ids[j]] = [ids[j]!, ids[i]!];
  }
  return ids.slice(0, keep);
}

/** Where a chunk is stored, as the index says. */
interface Loc {
  id: number;
  hash: Buffer;
  pack: string | null;
  packSize: number | null;
  offset: number;
  storedLen: number;
  rawLen: number;
  codec: number;
  damaged: number;
}

/** State of step 2 (deep check): the location lookup, pack sizes seen, bytes read back. */
interface DeepCheck {
  repo: Repository;
  locStmt: { get(id: number): unknown };
  packSizes: Map<string, number>;
  bytesChecked: number;
}

/** A deep check of the repository, nothing read yet. */
function newDeepCheck(repo: Repository): DeepCheck {
  const locStmt = repo.db.prepare(
    `SELECT c.id AS id, c.hash AS hash, p.name AS pack, p.size AS packSize, c.offset AS offset,
            c.stored_len AS storedLen, c.raw_len AS rawLen, c.codec AS codec, c.damaged AS damaged
       FROM chunks c LEFT JOIN packs p ON p.id = c.pack_id WHERE c.id = ?`,
  );
  return { repo, locStmt, packSizes: new Map(), bytesChecked: 0 };
}

/** The locations of the chunks still indexed, in pack order. */
function locateChunks(deep: DeepCheck, ids: number[]): Loc[] {
  const locs = ids
    .map((id) => deep.locStmt.get(id) as Loc | undefined)
    .filter((l): l is Loc => l !== undefined);
  locs.sort((a, b) => (a.pack ?? '').localeCompare(b.pack ?? '') || a.offset - b.offset);
  return locs;
}

/** Read one chunk back and decode it: undefined if good, else why not (store errors are thrown). */
async function checkChunk(deep: DeepCheck, loc: Loc): Promise<string | undefined> {
  const { repo, packSizes } = deep;
  if (!loc.pack) return 'its pack is not in the index';
  let size = packSizes.get(loc.pack);
  if (size === undefined) {
    // The pack's size in the store (a stat locally, a HEAD on object storage; a store that
    // cannot be reached is an error, never damage).
    size = (await repo.store.head(packKey(loc.pack)))?.size ?? -1;
    packSizes.set(loc.pack, size);
  }
  if (size < 0) return `pack ${loc.pack} is missing`;
  if (loc.offset + loc.storedLen > size) return `pack ${loc.pack} is truncated`;
  try {
    const stored = await repo.packs.read(loc.pack, loc.offset, loc.storedLen);
    decodeStored(repo.cipher, stored, loc.codec, loc.rawLen, loc.hash, repo.config.chunkSize);
    deep.bytesChecked += loc.storedLen;
    return undefined;
  } catch (e) {
    if (isBkfsError(e) && (e.code === 'STORE_UNAVAILABLE' || e.code === 'STORE_ACCESS')) throw e;
    return (e as Error).message;
  }
}

/** Check a chunk; if it fails, look it up again (gc may have moved or removed it) and retry there. */
async function checkChunkAgain(
  deep: DeepCheck,
  loc: Loc,
): Promise<{ loc: Loc; error?: string; gone?: boolean }> {
  let error = await checkChunk(deep, loc);
  if (error !== undefined) {
    // gc may have moved or removed the chunk since it was looked up: look again.
    const now = deep.locStmt.get(loc.id) as Loc | undefined;
    if (!now) return { loc, gone: true };
    if (now.pack !== loc.pack || now.offset !== loc.offset) {
      deep.packSizes.delete(now.pack ?? '');
      error = await checkChunk(deep, now);
    }
  }
  return error === undefined ? { loc } : { loc, error };
}

/** Step 2: read back the chunks (a few in flight); the damaged ones, and the marked ones that read fine. */
async function readBackChunks(
  deep: DeepCheck,
  locs: Loc[],
  o: VerifyOptions,
): Promise<{ damaged: DamagedChunk[]; recovered: number[] }> {
  const damaged: DamagedChunk[] = [];
  const recovered: number[] = [];
  let done = 0;
  for await (const r of orderedMap(locs, 4, (loc) => checkChunkAgain(deep, loc))) {
    done++;
    o.onProgress?.(done, locs.length);
    if (r.error !== undefined) {
      damaged.push({
        chunkId: r.loc.id,
        hash: r.loc.hash.toString('hex'),
        error: r.error,
        uses: chunkUses(deep.repo, r.loc.id),
      });
    } else if (!r.gone && r.loc.damaged === 1) {
      recovered.push(r.loc.id);
    }
  }
  return { damaged, recovered };
}

/**
 * Write verify's findings to the index in one transaction: damaged chunks and the checkpoints that
 * use them are marked; chunks that read back fine are unmarked (unless an undamaged copy with the
 * same hash exists, which then takes over their extents). Returns how many were unmarked.
 */
function recordDamage(repo: Repository, damagedIds: number[], fineIds: number[]): number {
  if (damagedIds.length === 0 && fineIds.length === 0) return 0;
  // A reader without write access reports what it found and records nothing.
  if (!repo.writable || repo.db.readonly) return 0;
  const db = repo.db;
  let unmarked = 0;
  db.transaction(() => {
    const mark = db.prepare('UPDATE chunks SET damaged = 1 WHERE id = ?');
    for (const id of damagedIds) mark.run(id);
    const twin = db.prepare(
      'SELECT 1 FROM chunks g JOIN chunks d ON g.hash = d.hash WHERE d.id = ? AND g.damaged = 0 AND g.id != d.id',
    );
    const unmark = db.prepare('UPDATE chunks SET damaged = 0 WHERE id = ?');
    for (const id of fineIds) {
      if (!twin.get(id)) {
        unmark.run(id);
        unmarked++;
      }
    }
    healDamagedChunks(db);
    refreshCheckpointDamage(db);
  }).immediate();
  return unmarked;
}

/** Every complete checkpoint and disk range that reads a chunk. */
export function chunkUses(repo: Repository, chunkId: number): ChunkUse[] {
  return repo.db
    .prepare(
      `SELECT v.name AS vm, c.name AS checkpoint, d.name AS disk, e.offset AS offset, e.length AS length
         FROM extents e JOIN disk_pages dp ON dp.page_id = e.page_id JOIN disks d ON d.id = dp.disk_id
         JOIN checkpoints c ON c.id = d.checkpoint_id JOIN vms v ON v.id = c.vm_id
        WHERE e.chunk_id = ? AND c.state = 'complete' ORDER BY v.name, c.id, d.name, e.offset`,
    )
    .all(chunkId) as ChunkUse[];
}

export { compareWithSources, type SourceDiff } from './verify-sources';
