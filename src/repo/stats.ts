/**
 * `bkfs stats`: what the repository stores and what each VM and checkpoint costs.
 *
 * Definitions (bytes):
 *   - logical: allocated data of a checkpoint's disks (non-zero extents of its block map), summed
 *     over checkpoints: what restoring every checkpoint would produce, holes aside;
 *   - raw: uncompressed size of the distinct chunks used; stored: their compressed size in packs;
 *   - dedup ratio = logical / raw; compression ratio = raw / stored; total = logical / stored;
 *   - unique (per checkpoint): chunks that no other checkpoint uses, i.e. about what forgetting
 *     only that checkpoint and running gc would free; unique (per VM): chunks no other VM uses;
 *   - packs: bytes of the packs in the store (pack files, or bucket objects); reclaimable: pack
 *     bytes that are not live chunks (what gc frees, once forgotten checkpoints are no longer
 *     pinned).
 * Read-only, no lock; packs are listed through the repository's store. One pass over the page
 * tables and the extents of the pages in use (pages shared by several checkpoints are read once).
 * Memory: per-chunk counters (a few typed arrays indexed by chunk id) and the page -> chunks lists
 * of the pages in use.
 */
import type { Repository } from './repository';
import { PACK_HEADER_LEN, RECORD_HEADER_LEN, trailerBytesFor, trailerEntryLen } from '../store/packs';
import { listPacks } from '../store/location';

export interface CheckpointStats {
  vm: string;
  name: string;
  level: string;
  time: number;
  virtualSize: number;
  logicalBytes: number;
  /** Chunks of this checkpoint that no other checkpoint uses. */
  uniqueChunks: number;
  uniqueRawBytes: number;
  uniqueStoredBytes: number;
  protected: boolean;
  damaged: boolean;
}

export interface Totals {
  checkpoints: number;
  logicalBytes: number;
  chunks: number;
  rawBytes: number;
  storedBytes: number;
  dedupRatio: number;
  compressionRatio: number;
  totalRatio: number;
}

export interface VmStats extends Totals {
  vm: string;
  /** Chunks that no other VM uses. */
  uniqueStoredBytes: number;
}

export interface RepoStats {
  repository: Totals & {
    packs: number;
    packBytes: number;
    /** Stored bytes of chunks in the index (live or not yet collected). */
    indexedStoredBytes: number;
    /** Pack bytes that gc can free (dead chunks, and space of chunks already dropped). */
    reclaimableBytes: number;
    /** Format 5: is everything stored sealed, with which cipher and key. */
    encryption: { encrypted: boolean; cipher?: string; keyId?: string; slots?: number };
  };
  vms: VmStats[];
  checkpoints: CheckpointStats[];
}

function ratio(a: number, b: number): number {
  return b > 0 ? a / b : 0;
}

interface CpRow {
  id: number;
  vm: number;
  name: string;
  level: string;
  started: number;
  protected: number;
  damaged: number;
  state: string;
}

interface ChunkRow {
  id: number;
  raw: number;
  stored: number;
}

/** Raw and stored length of every indexed chunk, as typed arrays indexed by chunk id. */
interface ChunkSizes {
  rows: ChunkRow[];
  maxId: number;
  raw: Float64Array;
  stored: Float64Array;
}

/** What each checkpoint uses, and per chunk how many checkpoints and VMs use it. */
interface ChunkUsage {
  cpCount: Uint32Array;
  vmCount: Uint32Array;
  /** Checkpoint id -> its distinct chunk ids. */
  cpChunks: Map<number, number[]>;
  /** Checkpoint id -> its logical bytes. */
  logicalOf: Map<number, number>;
}

/** Page tables of the checkpoints and, per page in use, its logical bytes and chunk ids. */
interface PageUsage {
  pagesOfCp: Map<number, number[]>;
  pageInfo: Map<number, { logical: number; chunks: number[] }>;
}

/** What `bkfs stats` shows: repository totals, then per VM and per checkpoint (of `vmName` only, if given). */
export async function repositoryStats(repo: Repository, vmName?: string): Promise<RepoStats> {
  const db = repo.db;
  const vms = db.prepare('SELECT id, name FROM vms ORDER BY name').all() as { id: number; name: string }[];
  const vmName_ = new Map(vms.map((v) => [v.id, v.name]));
  const cps = loadCheckpoints(db);
  const sizes = loadChunkSizes(db);
  const usage = countChunkUses(cps, loadPages(db, cps), sizes.maxId);
  const visible = cps.filter((c) => c.state === 'complete');
  const wanted = (vmId: number): boolean => vmName === undefined || vmName_.get(vmId) === vmName;
  const checkpoints = checkpointStats(
    db,
    visible.filter((c) => wanted(c.vm)),
    vmName_,
    usage,
    sizes,
  );
  const vmStats: VmStats[] = vms
    .filter((v) => wanted(v.id))
    .map((v) => {
      const t = totalsOf(
        visible.filter((c) => c.vm === v.id),
        usage,
        sizes,
      );
      const { uniqueStored, ...rest } = t;
      return { vm: v.name, ...rest, uniqueStoredBytes: uniqueStored };
    });
  const all = totalsOf(visible, usage, sizes);
  const packs = await packStats(repo, sizes.rows, usage.cpCount);
  const { uniqueStored: _u, ...repoTotals } = all;
  return {
    repository: { ...repoTotals, ...packs, encryption: encryptionInfo(repo) },
    vms: vmStats,
    checkpoints,
  };
}

/** Checkpoints that still have rows (complete, or forgotten and pinned), in id order. */
function loadCheckpoints(db: Repository['db']): CpRow[] {
  return db
    .prepare(
      `SELECT id, vm_id AS vm, name, level, started, protected, damaged, state FROM checkpoints
        WHERE state IN ('complete', 'forgotten') ORDER BY id`,
    )
    .all() as CpRow[];
}

/** Every indexed chunk's raw and stored length, indexed by chunk id. */
function loadChunkSizes(db: Repository['db']): ChunkSizes {
  const rows = db.prepare('SELECT id, raw_len AS raw, stored_len AS stored FROM chunks').all() as ChunkRow[];
  let maxId = 0;
  for (const c of rows) maxId = Math.max(maxId, c.id);
  const raw = new Float64Array(maxId + 1);
  const stored = new Float64Array(maxId + 1);
  for (const c of rows) {
    raw[c.id] = c.raw;
    stored[c.id] = c.stored;
  }
  return { rows, maxId, raw, stored };
}

/** Pages of each checkpoint, and logical bytes + chunks of each page in use (one extents pass). */
function loadPages(db: Repository['db'], cps: CpRow[]): PageUsage {
  const pagesOfCp = new Map<number, number[]>();
  const pageInfo = new Map<number, { logical: number; chunks: number[] }>();
  const pageStmt = db.prepare(
    'SELECT dp.page_id AS p FROM disks d JOIN disk_pages dp ON dp.disk_id = d.id WHERE d.checkpoint_id = ?',
  );
  for (const cp of cps) {
    const ps = (pageStmt.all(cp.id) as { p: number }[]).map((r) => r.p);
    pagesOfCp.set(cp.id, ps);
    for (const p of ps) if (!pageInfo.has(p)) pageInfo.set(p, { logical: 0, chunks: [] });
  }
  const extStmt = db.prepare(
    'SELECT page_id AS p, length AS len, chunk_id AS c FROM extents WHERE chunk_id IS NOT NULL',
  );
  for (const e of extStmt.iterate() as IterableIterator<{ p: number; len: number; c: number }>) {
    const pi = pageInfo.get(e.p);
    if (!pi) continue;
    pi.logical += e.len;
    pi.chunks.push(e.c);
  }
  return { pagesOfCp, pageInfo };
}

/** Per chunk: how many checkpoints and VMs use it; per checkpoint: its distinct chunks and logical bytes. */
function countChunkUses(cps: CpRow[], pages: PageUsage, maxId: number): ChunkUsage {
  const cpCount = new Uint32Array(maxId + 1);
  const vmCount = new Uint32Array(maxId + 1);
  const vmLast = new Int32Array(maxId + 1).fill(-1);
  const seen = new Int32Array(maxId + 1).fill(-1);
  const cpChunks = new Map<number, number[]>();
  const logicalOf = new Map<number, number>();
  // Walk checkpoints VM by VM, so a chunk's VM count goes up exactly when a new VM uses it.
  const byVm = [...cps].sort((a, b) => a.vm - b.vm || a.id - b.id);
  for (const cp of byVm) {
    const list: number[] = [];
    let logical = 0;
    for (const p of pages.pagesOfCp.get(cp.id) ?? []) {
      const pi = pages.pageInfo.get(p)!;
      logical += pi.logical;
      for (const c of pi.chunks) {
        if (c > maxId || seen[c] === cp.id) continue;
        seen[c] = cp.id;
        list.push(c);
        cpCount[c]!++;
        if (vmLast[c] !== cp.vm) {
          vmCount[c]!++;
          vmLast[c] = cp.vm;
        }
      }
    }
    cpChunks.set(cp.id, list);
    logicalOf.set(cp.id, logical);
  }
  return { cpCount, vmCount, cpChunks, logicalOf };
}

/** One row per selected checkpoint: sizes, and the chunks no other checkpoint uses. */
function checkpointStats(
  db: Repository['db'],
  selected: CpRow[],
  vmName_: Map<number, string>,
  usage: ChunkUsage,
  sizes: ChunkSizes,
): CheckpointStats[] {
  const diskSize = db.prepare(
    'SELECT coalesce(sum(virtual_size), 0) AS n FROM disks WHERE checkpoint_id = ?',
  );
  return selected.map((cp) => {
    let n = 0;
    let r = 0;
    let s = 0;
    for (const c of usage.cpChunks.get(cp.id)!) {
      if (usage.cpCount[c] === 1) {
        n++;
        r += sizes.raw[c]!;
        s += sizes.stored[c]!;
      }
    }
    return {
      vm: vmName_.get(cp.vm) ?? '?',
      name: cp.name,
      level: cp.level,
      time: cp.started,
      virtualSize: (diskSize.get(cp.id) as { n: number }).n,
      logicalBytes: usage.logicalOf.get(cp.id) ?? 0,
      uniqueChunks: n,
      uniqueRawBytes: r,
      uniqueStoredBytes: s,
      protected: cp.protected === 1,
      damaged: cp.damaged === 1,
    };
  });
}

/** Totals over a selection of checkpoints, plus the stored bytes of its chunks no other VM uses. */
function totalsOf(sel: CpRow[], usage: ChunkUsage, sizes: ChunkSizes): Totals & { uniqueStored: number } {
  const set = new Set<number>();
  let logical = 0;
  for (const cp of sel) {
    logical += usage.logicalOf.get(cp.id) ?? 0;
    for (const c of usage.cpChunks.get(cp.id)!) set.add(c);
  }
  let r = 0;
  let s = 0;
  let u = 0;
  for (const c of set) {
    r += sizes.raw[c]!;
    s += sizes.stored[c]!;
    if (usage.vmCount[c]! <= 1) u += sizes.stored[c]!;
  }
  return {
    checkpoints: sel.length,
    logicalBytes: logical,
    chunks: set.size,
    rawBytes: r,
    storedBytes: s,
    dedupRatio: ratio(logical, r),
    compressionRatio: ratio(r, s),
    totalRatio: ratio(logical, s),
    uniqueStored: u,
  };
}

/** The packs in the store: count, bytes, indexed stored bytes and what gc could reclaim. */
async function packStats(
  repo: Repository,
  chunkRows: ChunkRow[],
  cpCount: Uint32Array,
): Promise<{ packs: number; packBytes: number; indexedStoredBytes: number; reclaimableBytes: number }> {
  // The packs in the store: its pack files, or the bucket's pack objects (a listing request per
  // 1000 packs), orphans and packs kept for readers included.
  const files = await listPacks(repo.store);
  const packBytes = files.reduce((a, f) => a + f.size, 0);
  const indexedStored = chunkRows.reduce((a, c) => a + c.stored, 0);
  // Live = chunks used by any checkpoint that still has rows (complete or pinned-forgotten).
  // A bucket pack's trailer: an entry per live record and a footer per pack are live too.
  const trailer = repo.trailerKind;
  const perEntry = trailerEntryLen(trailer);
  let liveBytes = files.length * trailerBytesFor(0, trailer);
  for (const c of chunkRows) if (cpCount[c.id]! > 0) liveBytes += RECORD_HEADER_LEN + c.stored + perEntry;
  return {
    packs: files.length,
    packBytes,
    indexedStoredBytes: indexedStored,
    reclaimableBytes: Math.max(0, packBytes - liveBytes - files.length * PACK_HEADER_LEN),
  };
}

/** Format 5: whether everything stored is sealed, with which cipher and key. */
function encryptionInfo(repo: Repository): RepoStats['repository']['encryption'] {
  return repo.config.encryption
    ? {
        encrypted: true,
        cipher: repo.config.encryption.cipher,
        keyId: repo.config.encryption.keyId,
        slots: repo.config.encryption.slots.length,
      }
    : { encrypted: false };
}
