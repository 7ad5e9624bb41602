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

export interface MapExtent {
  offset: number;
  length: number;
  /** Chunk id, or null for a range that reads as zeros. */
  chunkId: number | null;
  /** Offset of this extent's first byte inside the chunk's uncompressed data. */
  chunkOff: number;
  /** Disk row (checkpoint-disk) that wrote this extent. */
  origin: number;
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
  };
}

/** Read one page of a disk's map (empty when the page has no data). */
export function readPageExtents(db: Database.Database, diskId: number, pageNo: number): MapExtent[] {
  return db
    .prepare(
      `SELECT e.offset AS offset, e.length AS length, e.chunk_id AS chunkId, e.chunk_off AS chunkOff, e.origin AS origin
           FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id
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
    const base = this.baseDiskId === null ? [] : readPageExtents(this.db, this.baseDiskId, this.curPage);
    const rows = overlay(base, this.curUpdates);
    this.touched.add(this.curPage);
    if (rows.length > 0) {
      this.pendingPages.push({ pageNo: this.curPage, rows });
      this.pendingRows += rows.length;
    }
    this.curUpdates = [];
    this.curPage = -1;
    if (this.pendingRows >= 20000) this.flush();
  }

  /** Write finished pages in one transaction. */
  flush(): void {
    if (this.pendingPages.length === 0) return;
    const pages = this.pendingPages;
    this.pendingPages = [];
    this.pendingRows = 0;
    this.db.transaction(() => {
      for (const pg of pages) {
        const pageId = this.allocPageId();
        this.insPage.run(this.diskId, pg.pageNo, pageId);
        for (const r of pg.rows) {
          this.insExtent.run(pageId, r.offset, r.length, r.chunkId, r.chunkOff, r.origin);
        }
        this.extentsWritten += pg.rows.length;
      }
    })();
  }

  /** Close the last page, write everything, and share the base's untouched pages. */
  finish(): void {
    this.closePage();
    this.flush();
    if (this.baseDiskId === null) return;
    const touched = this.touched;
    const sel = this.db.prepare('SELECT page_no, page_id FROM disk_pages WHERE disk_id = ? ORDER BY page_no');
    const rows = sel.all(this.baseDiskId) as { page_no: number; page_id: number }[];
    this.db.transaction(() => {
      for (const r of rows) if (!touched.has(r.page_no)) this.insPage.run(this.diskId, r.page_no, r.page_id);
    })();
  }
}

/** Highest page id in use, so a writer can allocate new ones (the writer lock makes this safe). */
export function maxPageId(db: Database.Database): number {
  const a = db.prepare('SELECT max(page_id) AS m FROM disk_pages').get() as { m: number | null };
  const b = db.prepare('SELECT max(page_id) AS m FROM extents').get() as { m: number | null };
  return Math.max(a.m ?? 0, b.m ?? 0);
}
