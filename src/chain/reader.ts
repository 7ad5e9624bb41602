/**
 * CheckpointReader: the bytes of every disk of one checkpoint, by offset.
 *
 * `readAt(disk, offset, length)` resolves the range through the disk's page table (one indexed
 * query per 16 MiB page, cached), loads the chunks it needs through the shared `ChunkLoader`
 * (cached, hash-checked, concurrent) and copies the pieces into a zero-filled buffer: holes, zero
 * extents and unallocated ranges read as zeros. Reads past the end of the disk are clipped.
 *
 * Sequential access (a read starting where the previous one of the same *stream* ended; a stream is
 * an open file of the mount, given by the caller, or else the disk) triggers read-ahead: the next
 * `readAheadBytes` of chunks are loaded in the background, so `dd`/`cp`-style readers find them
 * decoded. Access is noted when a read starts, not when it ends, so overlapping in-order requests
 * (the kernel may keep more than one 128 KiB FUSE read in flight) still count as sequential.
 * `readInto` fills a caller's buffer (the FUSE request buffer) without an extra copy; a failed read
 * rejects only after every piece of it has settled, so nothing writes into the buffer afterwards.
 * Opening a reader costs one query for the checkpoint's disks, whatever the chain length or disk
 * size. A reader pins nothing on disk by itself: mounts hold their own repository handle,
 * and SQLite WAL snapshots keep the rows they read consistent.
 *
 * Never invented bytes: an extent whose chunk row is missing, and (format 2) a page whose rows do not
 * match the disk's block-map digests (`src/index/mapsum.ts`: a lost extent or page-table row, a
 * changed length), fail with DATA_DAMAGED naming the disk range (EIO through the mount), never
 * zeros. The disk's digest list is checked once per reader and each page once when it is loaded
 * (both cached with the page), so the check costs nothing per read. A format-1 index (not yet
 * migrated by a writer) is read without digests.
 *
 * This module is the one read path: the FUSE layer, restore and verify all use it.
 */
import { LRUCache } from 'lru-cache';
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import type { Repository } from '../repo/repository';
import { ChunkLoader, DEFAULT_CACHE_BYTES, type ChunkLocation } from '../store/chunk-cache';
import {
  checkpointDisks,
  getConfigs,
  resolveRef,
  type CheckpointRow,
  type DiskRow,
  type VmRow,
} from '../index/catalog';
import { DiskSums, missingChunk, pageMismatch } from '../index/mapsum';
import { indexFormat } from '../index/migrate';

export interface PageExtent {
  offset: number;
  length: number;
  chunkOff: number;
  origin: number;
  loc: ChunkLocation | null;
}

export interface ReaderOptions {
  cacheBytes?: number;
  readAheadBytes?: number;
  /** Share one chunk cache between readers of the same repository. */
  loader?: ChunkLoader;
}

export class CheckpointReader {
  readonly disks: DiskRow[];
  readonly loader: ChunkLoader;
  private readonly pages = new LRUCache<string, PageExtent[]>({ max: 4096 });
  private readonly pageStmt: Database.Statement;
  private readonly pageSpan: number;
  private readonly readAhead: number;
  /** Per stream (an open file's token, or the disk name): where its last read ended / read-ahead reached. */
  private readonly lastEnd = new Map<unknown, number>();
  private readonly prefetched = new Map<unknown, number>();
  /** `meta.format` of the index: 2 and later have block-map digests. */
  readonly format: number;
  private readonly sums = new Map<number, DiskSums>();

  constructor(
    readonly repo: Repository,
    readonly vm: VmRow,
    readonly checkpoint: CheckpointRow,
    opts: ReaderOptions = {},
  ) {
    this.disks = checkpointDisks(repo.db, checkpoint.id);
    this.loader = opts.loader ?? new ChunkLoader(repo.db, repo.packs, opts.cacheBytes ?? DEFAULT_CACHE_BYTES);
    this.pageSpan = repo.config.pageSpan;
    this.readAhead = opts.readAheadBytes ?? 8 * repo.config.chunkSize;
    this.format = indexFormat(repo.db);
    this.pageStmt = repo.db.prepare(
      `SELECT e.offset AS offset, e.length AS length, e.chunk_off AS chunkOff, e.origin AS origin,
              e.chunk_id AS chunkId,
              c.id AS id, c.hash AS hash, p.name AS pack, c.offset AS coff, c.stored_len AS storedLen,
              c.raw_len AS rawLen, c.codec AS codec
         FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id
         LEFT JOIN chunks c ON c.id = e.chunk_id LEFT JOIN packs p ON p.id = c.pack_id
        WHERE dp.disk_id = ? AND dp.page_no = ? ORDER BY e.offset`,
    );
  }

  static open(repo: Repository, ref: string, opts: ReaderOptions = {}): CheckpointReader {
    const { vm, checkpoint } = resolveRef(repo.db, ref);
    return new CheckpointReader(repo, vm, checkpoint, opts);
  }

  disk(name: string): DiskRow {
    const d = this.disks.find((x) => x.name === name);
    if (!d) {
      const names = this.disks.map((x) => x.name).join(', ');
      throw new BkfsError(
        'NOT_FOUND',
        `checkpoint ${this.vm.name}@${this.checkpoint.name} has no disk '${name}' (disks: ${names})`,
      );
    }
    return d;
  }

  configs(): { name: string; data: Buffer }[] {
    return getConfigs(this.repo.db, this.checkpoint.id);
  }

  /** The checked digest list of a disk (format 2; cached). Throws DATA_DAMAGED for the whole disk. */
  private sumsOf(disk: DiskRow): DiskSums {
    let s = this.sums.get(disk.id);
    if (!s) {
      s = DiskSums.load(this.repo.db, disk, this.pageSpan, this.diskLabel(disk));
      this.sums.set(disk.id, s);
    }
    return s;
  }

  private diskLabel(disk: DiskRow): string {
    return `disk ${disk.name} of ${this.vm.name}@${this.checkpoint.name}`;
  }

  /** DATA_DAMAGED for bytes [start, end) of a disk. */
  private damaged(disk: DiskRow, start: number, end: number, why: string): BkfsError {
    const e = Math.min(end, disk.virtual_size);
    return new BkfsError('DATA_DAMAGED', `${this.diskLabel(disk)}: bytes ${start}-${e} are damaged: ${why}`, {
      diskId: disk.id,
      start,
      end: e,
    });
  }

  /**
   * Page numbers of a disk's map in order: its page table and (format 2) its digest list, so a
   * page whose table row was lost is still visited (and fails).
   */
  pageNos(disk: DiskRow): number[] {
    const rows = this.repo.db
      .prepare('SELECT page_no FROM disk_pages WHERE disk_id = ? ORDER BY page_no')
      .all(disk.id) as { page_no: number }[];
    const set = new Set(rows.map((r) => r.page_no));
    if (this.format >= 2) for (const p of this.sumsOf(disk).pageNos()) set.add(p);
    return [...set].sort((a, b) => a - b);
  }

  /**
   * The extents of one map page (cached), checked: an extent whose chunk row is missing, or
   * (format 2) rows that do not match the page's digest, throw DATA_DAMAGED for the page's range.
   */
  page(disk: DiskRow, pageNo: number): PageExtent[] {
    const key = `${disk.id}:${pageNo}`;
    let pg = this.pages.get(key);
    if (pg) return pg;
    const rows = this.pageStmt.all(disk.id, pageNo) as {
      offset: number;
      length: number;
      chunkOff: number;
      origin: number;
      chunkId: number | null;
      id: number | null;
      hash: Buffer | null;
      pack: string | null;
      coff: number | null;
      storedLen: number | null;
      rawLen: number | null;
      codec: number | null;
    }[];
    const pageStart = pageNo * this.pageSpan;
    const checked = rows.map((r) => ({
      offset: r.offset,
      length: r.length,
      chunkOff: r.chunkOff,
      chunkId: r.chunkId,
      hash: r.chunkId === null ? null : r.hash,
    }));
    const why =
      this.format >= 2 ? pageMismatch(this.sumsOf(disk).find(pageNo), checked) : missingChunk(checked);
    if (why !== undefined) {
      throw this.damaged(disk, pageStart, pageStart + this.pageSpan, why);
    }
    pg = rows.map((r) => ({
      offset: r.offset,
      length: r.length,
      chunkOff: r.chunkOff,
      origin: r.origin,
      loc:
        r.chunkId === null
          ? null
          : {
              id: r.id!,
              hash: r.hash!,
              pack: r.pack ?? '',
              offset: r.coff ?? 0,
              storedLen: r.storedLen ?? 0,
              rawLen: r.rawLen ?? 0,
              codec: r.codec ?? 0,
            },
    }));
    this.pages.set(key, pg);
    return pg;
  }

  /** Every extent of a disk's map in offset order (zero extents have loc === null). */
  *extents(diskName: string): Generator<PageExtent> {
    const disk = this.disk(diskName);
    for (const p of this.pageNos(disk)) yield* this.page(disk, p);
  }

  /** Read `length` bytes at `offset` of a disk; clipped at the disk's end. */
  async readAt(diskName: string, offset: number, length: number, stream?: object): Promise<Buffer> {
    const disk = this.disk(diskName);
    checkRange(offset, length);
    const end = Math.min(offset + length, disk.virtual_size);
    if (end <= offset) return Buffer.alloc(0);
    const out = Buffer.alloc(end - offset);
    await this.readRange(disk, offset, end, out, stream);
    return out;
  }

  /** Forget a stream's read-ahead state (its file was closed). */
  endStream(stream: object): void {
    this.lastEnd.delete(stream);
    this.prefetched.delete(stream);
  }

  /**
   * Read up to `target.length` bytes at `offset` of a disk into `target`; returns how many bytes
   * were filled (clipped at the disk's end; 0 at or past it). Holes are zero-filled. `stream`
   * (e.g. the open file's handle object) keys read-ahead; without it, the disk does.
   */
  async readInto(diskName: string, offset: number, target: Buffer, stream?: object): Promise<number> {
    const disk = this.disk(diskName);
    checkRange(offset, target.length);
    const end = Math.min(offset + target.length, disk.virtual_size);
    if (end <= offset) return 0;
    const out = target.subarray(0, end - offset);
    out.fill(0);
    await this.readRange(disk, offset, end, out, stream);
    return end - offset;
  }

  /** Fill the zeroed `out` with bytes [start, end) of `disk`, noting the access for read-ahead. */
  private readRange(disk: DiskRow, start: number, end: number, out: Buffer, stream?: object): Promise<void> {
    const done = this.fill(disk, start, end, out); // starts every load synchronously
    this.noteAccess(disk, start, end, stream ?? disk.name);
    return done;
  }

  private async fill(disk: DiskRow, start: number, end: number, out: Buffer): Promise<void> {
    const jobs: Promise<void>[] = [];
    const firstPage = Math.floor(start / this.pageSpan);
    const lastPage = Math.floor((end - 1) / this.pageSpan);
    for (let p = firstPage; p <= lastPage; p++) {
      const pg = this.page(disk, p);
      for (const e of firstOverlap(pg, start)) {
        if (e.offset >= end) break;
        const eEnd = e.offset + e.length;
        if (eEnd <= start || e.loc === null) continue;
        const s = Math.max(start, e.offset);
        const t = Math.min(end, eEnd);
        const loc = e.loc;
        const from = e.chunkOff + (s - e.offset);
        if (loc.pack === '') {
          jobs.push(Promise.reject(this.damaged(disk, s, t, `chunk ${loc.id} is in no indexed pack`)));
          continue;
        }
        jobs.push(this.loader.copyRange(loc.id, loc, from, from + (t - s), out, s - start));
      }
    }
    if (jobs.length === 1) {
      await jobs[0];
    } else if (jobs.length > 1) {
      // Wait for every piece before failing: no copy may land in `out` after the caller gave up.
      const results = await Promise.allSettled(jobs);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
    }
  }

  private noteAccess(disk: DiskRow, start: number, end: number, key: unknown): void {
    if (this.readAhead <= 0) return;
    const sequential = this.lastEnd.get(key) === start;
    this.lastEnd.set(key, end);
    if (!sequential) return;
    const from = Math.max(end, this.prefetched.get(key) ?? 0);
    const to = Math.min(disk.virtual_size, end + this.readAhead);
    if (from >= to) return;
    this.prefetched.set(key, to);
    setImmediate(() => this.prefetch(disk, from, to));
  }

  /** Background read-ahead: never throws (it runs from setImmediate); the real read reports errors. */
  private prefetch(disk: DiskRow, start: number, end: number): void {
    try {
      this.prefetchNow(disk, start, end);
    } catch {
      // a damaged page: the read of that range fails with DATA_DAMAGED itself
    }
  }

  private prefetchNow(disk: DiskRow, start: number, end: number): void {
    const firstPage = Math.floor(start / this.pageSpan);
    const lastPage = Math.floor((end - 1) / this.pageSpan);
    for (let p = firstPage; p <= lastPage; p++) {
      for (const e of firstOverlap(this.page(disk, p), start)) {
        if (e.offset >= end) break;
        if (e.loc && e.loc.pack !== '' && e.offset + e.length > start && !this.loader.has(e.loc.id)) {
          this.loader.load(e.loc.id, e.loc).catch(() => undefined); // the real read reports errors
        }
      }
    }
  }
}

function checkRange(offset: number, length: number): void {
  if (offset < 0 || length < 0 || !Number.isSafeInteger(offset) || !Number.isSafeInteger(length)) {
    throw new BkfsError('USAGE', `invalid read range ${offset}+${length}`);
  }
}

/** Extents of a sorted page from the first one that may overlap `pos` (binary search). */
function* firstOverlap(pg: PageExtent[], pos: number): Generator<PageExtent> {
  let lo = 0;
  let hi = pg.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const e = pg[mid]!;
    if (e.offset + e.length <= pos) lo = mid + 1;
    else hi = mid;
  }
  for (let i = lo; i < pg.length; i++) yield pg[i]!;
}
