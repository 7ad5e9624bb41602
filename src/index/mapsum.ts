/**
 * Block-map digests (repository format 2; see FORMAT.md, "Block map digests").
 *
 * A deleted `extents` or `disk_pages` row used to be indistinguishable from a hole and read as
 * zeros. Format 2 records, for every checkpoint-disk, one `disk_maps` row:
 *   - `sums`: one 24-byte entry per page of its page table, in page order:
 *       page_no u32 BE | extent count u32 BE | page digest (16 bytes)
 *   - `pages`: the number of entries; `digest`: 16 bytes over (virtual size, page span, sums).
 * A page digest is BLAKE3 over the page's extents in offset order:
 *       offset u64 | length u64 | chunk_off u64 | 0 (zeros) or 1 + chunk hash (32 bytes)
 * truncated to 16 bytes. It names chunks by hash, not id: gc (which moves chunks, ids unchanged) and
 * healing (which re-points extents to another chunk id with the same hash) never touch digests, and
 * an index rebuild (new page ids, shared pages) recomputes the same digests from the manifests.
 *
 * Readers check a disk's entry list once (cached) and each page when they load it (cached with
 * the page): a page whose rows disagree with its entry, a page row without an entry (or the
 * reverse), an extent whose chunk row is missing: DATA_DAMAGED for that page's range only.
 *
 * Pure functions plus the few queries that read and write `disk_maps`.
 */
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import { hashChunk } from '../store/codec';

export const SUM_ENTRY = 24;
export const DIGEST_LEN = 16;

export interface SumExtent {
  offset: number;
  length: number;
  chunkOff: number;
  /** Chunk hash; null for a zero extent. */
  hash: Buffer | null;
}

export interface PageSum {
  pageNo: number;
  count: number;
  digest: Buffer;
}

const PAGE_TAG = Buffer.from('bkfs-page-v2\n');
const DISK_TAG = Buffer.from('bkfs-disk-v2\n');

/** A non-negative safe integer as u64 big-endian (no BigInt: this runs for every extent loaded). */
function writeU64(buf: Buffer, v: number, at: number): void {
  buf.writeUInt32BE(Math.floor(v / 0x100000000), at);
  buf.writeUInt32BE(v % 0x100000000, at + 4);
}

/** Digest of one page's extents (offset order). */
export function pageDigest(exts: readonly SumExtent[]): Buffer {
  const buf = Buffer.alloc(PAGE_TAG.length + exts.length * (25 + 32));
  PAGE_TAG.copy(buf, 0);
  let o = PAGE_TAG.length;
  for (const e of exts) {
    writeU64(buf, e.offset, o);
    writeU64(buf, e.length, o + 8);
    writeU64(buf, e.chunkOff, o + 16);
    o += 24;
    if (e.hash === null) {
      buf[o++] = 0;
    } else {
      buf[o++] = 1;
      e.hash.copy(buf, o, 0, 32);
      o += 32;
    }
  }
  return hashChunk(buf.subarray(0, o)).subarray(0, DIGEST_LEN);
}

export function pageSum(pageNo: number, exts: readonly SumExtent[]): PageSum {
  return { pageNo, count: exts.length, digest: pageDigest(exts) };
}

/** Encode entries (sorted by page number here) into the `sums` blob. */
export function encodeSums(entries: readonly PageSum[]): Buffer {
  const sorted = [...entries].sort((a, b) => a.pageNo - b.pageNo);
  const buf = Buffer.alloc(sorted.length * SUM_ENTRY);
  sorted.forEach((e, i) => {
    buf.writeUInt32BE(e.pageNo, i * SUM_ENTRY);
    buf.writeUInt32BE(e.count, i * SUM_ENTRY + 4);
    e.digest.copy(buf, i * SUM_ENTRY + 8, 0, DIGEST_LEN);
  });
  return buf;
}

export function sumsDigest(virtualSize: number, pageSpan: number, sums: Buffer): Buffer {
  const head = Buffer.alloc(16);
  head.writeBigUInt64BE(BigInt(virtualSize), 0);
  head.writeBigUInt64BE(BigInt(pageSpan), 8);
  return hashChunk(Buffer.concat([DISK_TAG, head, sums])).subarray(0, DIGEST_LEN);
}

/** Write (or replace) a checkpoint-disk's `disk_maps` row. */
export function writeDiskSums(
  db: Database.Database,
  diskId: number,
  virtualSize: number,
  pageSpan: number,
  entries: readonly PageSum[],
): void {
  const sums = encodeSums(entries);
  db.prepare('INSERT OR REPLACE INTO disk_maps (disk_id, pages, sums, digest) VALUES (?, ?, ?, ?)').run(
    diskId,
    entries.length,
    sums,
    sumsDigest(virtualSize, pageSpan, sums),
  );
}

/**
 * A checkpoint-disk's checked entry list. `load` verifies the row (present, length = pages × 24,
 * digest, page numbers strictly increasing and inside the disk) and throws DATA_DAMAGED naming the
 * disk otherwise.
 */
export class DiskSums {
  private constructor(
    readonly sums: Buffer,
    readonly pages: number,
  ) {}

  static load(
    db: Database.Database,
    disk: { id: number; virtual_size: number },
    pageSpan: number,
    what: string,
  ): DiskSums {
    const row = db.prepare('SELECT pages, sums, digest FROM disk_maps WHERE disk_id = ?').get(disk.id) as
      { pages: number; sums: Buffer; digest: Buffer } | undefined;
    const bad = (why: string): BkfsError =>
      new BkfsError(
        'DATA_DAMAGED',
        `block map of ${what} is damaged (bytes 0-${disk.virtual_size}): ${why}`,
        { diskId: disk.id, start: 0, end: disk.virtual_size },
      );
    if (!row) throw bad('its page digests (disk_maps row) are missing');
    const sums = Buffer.isBuffer(row.sums) ? row.sums : Buffer.alloc(0);
    if (sums.length !== row.pages * SUM_ENTRY) throw bad(`page digest list has a wrong length`);
    if (!Buffer.isBuffer(row.digest) || !sumsDigest(disk.virtual_size, pageSpan, sums).equals(row.digest)) {
      throw bad('page digest list does not match its digest');
    }
    const maxPages = Math.ceil(disk.virtual_size / pageSpan);
    let prev = -1;
    for (let i = 0; i < row.pages; i++) {
      const p = sums.readUInt32BE(i * SUM_ENTRY);
      if (p <= prev || p >= maxPages) throw bad(`page ${p} is out of order or past the disk's end`);
      prev = p;
    }
    return new DiskSums(sums, row.pages);
  }

  /** The entry of page `pageNo`, or undefined for a page that holds nothing (a hole). */
  find(pageNo: number): PageSum | undefined {
    let lo = 0;
    let hi = this.pages;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const p = this.sums.readUInt32BE(mid * SUM_ENTRY);
      if (p === pageNo) {
        return {
          pageNo,
          count: this.sums.readUInt32BE(mid * SUM_ENTRY + 4),
          digest: this.sums.subarray(mid * SUM_ENTRY + 8, mid * SUM_ENTRY + SUM_ENTRY),
        };
      }
      if (p < pageNo) lo = mid + 1;
      else hi = mid;
    }
    return undefined;
  }

  pageNos(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.pages; i++) out.push(this.sums.readUInt32BE(i * SUM_ENTRY));
    return out;
  }

  entries(): PageSum[] {
    return this.pageNos().map((p) => this.find(p)!);
  }
}

/**
 * Why a page's rows do not match its entry (undefined when they match). `rows` are the page's
 * extents as the index holds them, with the chunk's hash (null when the chunk row is missing) and
 * the extent's chunk id (null for zeros).
 */
export function pageMismatch(
  expected: PageSum | undefined,
  rows: readonly (SumExtent & { chunkId: number | null })[],
): string | undefined {
  const missing = missingChunk(rows);
  if (missing !== undefined) return missing;
  if (expected === undefined) {
    return rows.length === 0 ? undefined : `page has ${rows.length} extents but none were recorded`;
  }
  if (rows.length !== expected.count) {
    return `page has ${rows.length} extents, ${expected.count} were recorded`;
  }
  if (!pageDigest(rows).equals(expected.digest)) return 'page extents do not match their digest';
  return undefined;
}

/** Why a page is unreadable in any format: an extent whose chunk row is missing. */
export function missingChunk(
  rows: readonly { offset: number; length: number; chunkId: number | null; hash: Buffer | null }[],
): string | undefined {
  const m = rows.find((r) => r.chunkId !== null && r.hash === null);
  return m === undefined
    ? undefined
    : `extent at ${m.offset}+${m.length} references chunk ${m.chunkId}, which is not in the index`;
}

/** Compute the entries of one checkpoint-disk from the index (migration, tests). */
export function sumsFromIndex(db: Database.Database, diskId: number): PageSum[] {
  const rows = db
    .prepare(
      `SELECT dp.page_no AS pageNo, e.offset AS offset, e.length AS length, e.chunk_off AS chunkOff,
              e.chunk_id AS chunkId, c.hash AS hash
         FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
        WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
    )
    .all(diskId) as (SumExtent & { pageNo: number; chunkId: number | null })[];
  const out: PageSum[] = [];
  let cur: SumExtent[] = [];
  let page = -1;
  const flush = (): void => {
    if (page >= 0 && cur.length > 0) out.push(pageSum(page, cur));
  };
  for (const r of rows) {
    if (r.pageNo !== page) {
      flush();
      page = r.pageNo;
      cur = [];
    }
    if (r.chunkId !== null && r.hash === null) {
      throw new BkfsError(
        'DATA_DAMAGED',
        `disk ${diskId}: extent at ${r.offset} references chunk ${r.chunkId}, which is not in the index`,
      );
    }
    cur.push({ offset: r.offset, length: r.length, chunkOff: r.chunkOff, hash: r.hash });
  }
  flush();
  return out;
}

/** Entries of a disk given as a stream of extents in offset order (manifests). */
export function sumsFromExtents(exts: Iterable<SumExtent>, pageSpan: number): PageSum[] {
  const out: PageSum[] = [];
  let cur: SumExtent[] = [];
  let page = -1;
  for (const e of exts) {
    const p = Math.floor(e.offset / pageSpan);
    if (p !== page) {
      if (page >= 0 && cur.length > 0) out.push(pageSum(page, cur));
      page = p;
      cur = [];
    }
    cur.push(e);
  }
  if (page >= 0 && cur.length > 0) out.push(pageSum(page, cur));
  return out;
}
