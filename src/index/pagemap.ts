/**
 * The block map: which bytes a disk has at a checkpoint.
 *
 * Design (see FORMAT.md, "Block map"): a disk's address space is cut into pages of `pageSpan` bytes
 * (default 64 chunks = 16 MiB). Every checkpoint-disk has a complete page table (`disk_pages`:
 * page number -> page id); a page is a sorted, non-overlapping list of extents (`extents` rows:
 * offset, length, chunk id or NULL for zeros, offset inside the chunk). Pages are immutable and
 * shared: an incremental copies its base's page table and writes new pages only where its extents
 * fall (copy-on-write, as Proxmox's fixed index clones its parent). Hence:
 *   - lookup of (disk, offset) = one primary-key probe into disk_pages + one range of a small page:
 *     O(log n), independent of the chain's length;
 *   - opening a checkpoint reads nothing up front;
 *   - an incremental costs the pages it touches plus one page-table copy (16 bytes per 16 MiB of
 *     allocated disk), never a replay of the chain;
 *   - forgetting a checkpoint drops its page table; pages still used by others stay.
 *
 * Memory: a page holds at most a few hundred extents; writers keep only the current page.
 */
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import { DiskSums, pageMismatch, pageSum, writeDiskSums, type PageSum } from './mapsum';

export interface MapExtent {
  offset: number;
  length: number;
  /** Chunk id, or null for a range that reads as zeros. */
  chunkId: number | null;
  /** Offset of this extent's first byte inside the chunk's uncompressed data. */
  chunkOff: number;
  /** Disk row (checkpoint-disk) that wrote this extent. */
  origin: number;
  /**
   * Hash of the chunk (null for zeros). Required by `DiskMapWriter` for data extents: page
   * digests (format 2, `mapsum.ts`) name chunks by hash.
   */
  hash?: Buffer | null;
}

/**
 * Overlay `updates` on `base` (both sorted by offset, non-overlapping): ranges covered by an
 * update take the update; base extents are trimmed or split around them (their chunk offsets
 * adjusted). Pure; returns a new sorted, non-overlapping list.
 */
export function overlay(base: readonly MapExtent[], updates: readonly MapExtent[]): MapExtent[] {
  if (updates.length === 0) return base.slice();
  const out: MapExtent[] = [];
  let j = 0;
  for (const b of base) {
    const end = b.offset + b.length;
    let cur = b.offset;
    // Skip updates that end before this base extent.
    while (j < updates.length && updates[j]!.offset + updates[j]!.length <= cur) j++;
    let k = j;
    while (cur < end && k < updates.length && updates[k]!.offset < end) {
      const u = updates[k]!;
      if (u.offset > cur) out.push(slice(b, cur, u.offset));
      cur = Math.max(cur, u.offset + u.length);
      k++;
    }
    if (cur < end) out.push(slice(b, cur, end));
  }
  for (const u of updates) out.push(u);
  out.sort((a, b) => a.offset - b.offset);
  return out;
}

function slice(e: MapExtent, start: number, end: number): MapExtent {
  return {
    offset: start,
    length: end - start,
    chunkId: e.chunkId,
    chunkOff: e.chunkId === null ? 0 : e.chunkOff + (start - e.offset),
    origin: e.origin,
    ...(e.hash !== undefined ? { hash: e.hash } : {}),
  };
}

/** Read one page of a disk's map (empty when the page has no data), with chunk hashes. */
export function readPageExtents(db: Database.Database, diskId: number, pageNo: number): MapExtent[] {
  return db
    .prepare(
      `SELECT e.offset AS offset, e.length AS length, e.chunk_id AS chunkId, e.chunk_off AS chunkOff, e.origin AS origin,
              c.hash AS hash
           FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
          WHERE dp.disk_id = ? AND dp.page_no = ? ORDER BY e.offset`,
    )
    .all(diskId, pageNo) as MapExtent[];
}

/**
 * Builds one checkpoint-disk's map while a backup streams extents in increasing offset order.
 * Pages are written in batches inside the caller's running checkpoint; `finish()` copies every
 * page the backup did not touch from the base disk.
 */
export class DiskMapWriter {
  private curPage = -1;
  private curUpdates: MapExtent[] = [];
  private readonly touched = new Set<number>();
  private pendingPages: { pageNo: number; rows: MapExtent[] }[] = [];
  private pendingRows = 0;
  /** Digest entries of the pages this writer wrote (format 2, `mapsum.ts`). */
  private readonly sums: PageSum[] = [];
  private baseSums: DiskSums | undefined;
  extentsWritten = 0;

  private readonly insPage: Database.Statement;
  private readonly insExtent: Database.Statement;

  constructor(
    private readonly db: Database.Database,
    private readonly pageSpan: number,
    private readonly diskId: number,
    private readonly baseDiskId: number | null,
    private readonly allocPageId: () => number,
  ) {
    this.insPage = db.prepare('INSERT INTO disk_pages (disk_id, page_no, page_id) VALUES (?, ?, ?)');
    this.insExtent = db.prepare(
      'INSERT INTO extents (page_id, offset, length, chunk_id, chunk_off, origin) VALUES (?, ?, ?, ?, ?, ?)',
    );
  }

  /** Add an extent; it must not cross a page boundary and must come after the previous one. */
  add(e: MapExtent): void {
    const p = Math.floor(e.offset / this.pageSpan);
    if (p !== this.curPage) {
      this.closePage();
      this.curPage = p;
    }
    const last = this.curUpdates[this.curUpdates.length - 1];
    if (last && last.chunkId === null && e.chunkId === null && last.offset + last.length === e.offset) {
      last.length += e.length; // merge adjacent zero extents
    } else {
      this.curUpdates.push({ ...e });
    }
  }

  private closePage(): void {
    if (this.curPage < 0) return;
    const base = this.baseDiskId === null ? [] : this.basePage(this.baseDiskId, this.curPage);
    const rows = overlay(base, this.curUpdates);
    this.touched.add(this.curPage);
    if (rows.length > 0) {
      for (const r of rows) {
        if (r.chunkId !== null && !r.hash) {
          throw new Error(`extent at ${r.offset} has chunk ${r.chunkId} but no hash (bug)`);
        }
      }
      this.sums.push(
        pageSum(
          this.curPage,
          rows.map((r) => ({ ...r, hash: r.chunkId === null ? null : r.hash! })),
        ),
      );
      this.pendingPages.push({ pageNo: this.curPage, rows });
      this.pendingRows += rows.length;
    }
    this.curUpdates = [];
    this.curPage = -1;
    if (this.pendingRows >= 20000) this.flush();
  }

  private loadBaseSums(baseDiskId: number): DiskSums {
    const d = this.db.prepare('SELECT id, virtual_size FROM disks WHERE id = ?').get(baseDiskId) as
      { id: number; virtual_size: number } | undefined;
    if (!d) throw new BkfsError('CHAIN_BROKEN', `base disk ${baseDiskId} no longer exists: use --level full`);
    this.baseSums ??= DiskSums.load(this.db, d, this.pageSpan, `base disk ${baseDiskId}`);
    return this.baseSums;
  }

  /** A base page, checked against the base's digests: an incremental never builds on damage. */
  private basePage(baseDiskId: number, pageNo: number): MapExtent[] {
    const rows = readPageExtents(this.db, baseDiskId, pageNo);
    const why = pageMismatch(
      this.loadBaseSums(baseDiskId).find(pageNo),
      rows.map((r) => ({ ...r, hash: r.hash ?? null })),
    );
    if (why !== undefined) {
      const start = pageNo * this.pageSpan;
      throw new BkfsError(
        'DATA_DAMAGED',
        `the base checkpoint's block map is damaged at bytes ${start}-${start + this.pageSpan} (${why}): take a full backup (--level full)`,
      );
    }
    return rows;
  }

  /** Write finished pages in one transaction. */
  flush(): void {
    if (this.pendingPages.length === 0) return;
    const pages = this.pendingPages;
    this.pendingPages = [];
    this.pendingRows = 0;
    // Ids first (they may need a transaction of their own, `ids.ts`), then one short write.
    const ids = pages.map(() => this.allocPageId());
    this.db
      .transaction(() => {
        for (let i = 0; i < pages.length; i++) {
          const pg = pages[i]!;
          const pageId = ids[i]!;
          this.insPage.run(this.diskId, pg.pageNo, pageId);
          for (const r of pg.rows) {
            this.insExtent.run(pageId, r.offset, r.length, r.chunkId, r.chunkOff, r.origin);
          }
          this.extentsWritten += pg.rows.length;
        }
      })
      .immediate();
  }

  /** Close the last page, write everything, and share the base's untouched pages. */
  finish(): void {
    this.closePage();
    this.flush();
    const disk = this.db.prepare('SELECT virtual_size FROM disks WHERE id = ?').get(this.diskId) as
      { virtual_size: number } | undefined;
    if (!disk) throw new Error(`disk ${this.diskId} has no disks row (bug)`);
    const sums = this.sums;
    if (this.baseDiskId === null) {
      this.db
        .transaction(() => writeDiskSums(this.db, this.diskId, disk.virtual_size, this.pageSpan, sums))
        .immediate();
      return;
    }
    const touched = this.touched;
    const baseSums = this.loadBaseSums(this.baseDiskId);
    const sel = this.db.prepare('SELECT page_no, page_id FROM disk_pages WHERE disk_id = ? ORDER BY page_no');
    const rows = sel.all(this.baseDiskId) as { page_no: number; page_id: number }[];
    // The base's page table must agree with its digest list (a lost row would be copied as a hole).
    const listed = baseSums.pageNos();
    const present = new Set(rows.map((r) => r.page_no));
    for (const p of listed) {
      if (!touched.has(p) && !present.has(p)) {
        const start = p * this.pageSpan;
        throw new BkfsError(
          'DATA_DAMAGED',
          `the base checkpoint's block map is damaged at bytes ${start}-${start + this.pageSpan} (page row missing): take a full backup (--level full)`,
        );
      }
    }
    this.db
      .transaction(() => {
        for (const r of rows) {
          if (touched.has(r.page_no)) continue;
          const entry = baseSums.find(r.page_no);
          if (!entry) {
            const start = r.page_no * this.pageSpan;
            throw new BkfsError(
              'DATA_DAMAGED',
              `the base checkpoint's block map is damaged at bytes ${start}-${start + this.pageSpan} (page without digest): take a full backup (--level full)`,
            );
          }
          this.insPage.run(this.diskId, r.page_no, r.page_id);
          sums.push(entry);
        }
        writeDiskSums(this.db, this.diskId, disk.virtual_size, this.pageSpan, sums);
      })
      .immediate();
  }
}

/** Highest page id in use (format 3 writers allocate from `counters`, see `ids.ts`). */
export function maxPageId(db: Database.Database): number {
  const a = db.prepare('SELECT max(page_id) AS m FROM disk_pages').get() as { m: number | null };
  const b = db.prepare('SELECT max(page_id) AS m FROM extents').get() as { m: number | null };
  return Math.max(a.m ?? 0, b.m ?? 0);
}
