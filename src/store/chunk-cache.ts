/**
 * Cached chunk loading for readers (mount, restore, verify).
 *
 * `ChunkLoader.load(id)` returns the uncompressed, hash-checked bytes of a chunk. Decoded chunks
 * are kept in an `lru-cache` bounded by bytes (`cacheBytes`, default 256 MiB); concurrent loads of
 * the same chunk share one read and one decompression. A chunk that fails its hash or cannot be
 * decoded rejects with BkfsError('DATA_DAMAGED') naming the chunk, and is not cached, so a reader
 * never returns wrong bytes.
 *
 * Chunk locations come from the index with one prepared statement per load; a reader that already
 * has them (from a page query) passes them in.
 *
 * `copyRange` serves part of a chunk. For a frames chunk (codec 2, format 4) and a range of at most
 * half the chunk that is neither cached nor being loaded whole, it reads the chunk's frame table
 * (cached, checked against the chunk's hash) and only the frames the range needs (one read), checks
 * each against its frame hash and keeps it in a decoded-frame cache keyed by (chunk, frame): a
 * random 4 KiB read decodes 32 KiB instead of 256 KiB. Everything else loads the whole chunk.
 */
import { LRUCache } from 'lru-cache';
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import {
  CODEC_FRAMES,
  decodeChunk,
  decodeFrame,
  frameTablePrefixLen,
  parseFrameTable,
  type FrameTable,
} from './codec';
import type { PackReader } from './packs';

export interface ChunkLocation {
  id: number;
  hash: Buffer;
  pack: string;
  offset: number;
  storedLen: number;
  rawLen: number;
  codec: number;
}

export const DEFAULT_CACHE_BYTES = 256 << 20;

export class ChunkLoader {
  private readonly cache: LRUCache<number, Buffer>;
  private readonly inflight = new Map<number, Promise<Buffer>>();
  /** Decoded frames of codec-2 chunks, keyed `chunkId:frame`. */
  private readonly frames: LRUCache<string, Buffer>;
  private readonly frameInflight = new Map<string, Promise<Buffer>>();
  /** Checked frame tables of codec-2 chunks. */
  private readonly tables = new LRUCache<number, FrameTable>({ max: 16384 });
  private readonly tableInflight = new Map<number, Promise<FrameTable>>();
  framesDecoded = 0;
  private readonly locStmt: Database.Statement;
  /** Bytes read from pack files (compressed), for statistics. */
  bytesFromStore = 0;
  chunksDecoded = 0;

  constructor(
    db: Database.Database,
    private readonly packs: PackReader,
    cacheBytes = DEFAULT_CACHE_BYTES,
  ) {
    this.cache = new LRUCache<number, Buffer>({
      maxSize: Math.max(1, cacheBytes),
      sizeCalculation: (b) => Math.max(1, b.length),
    });
    this.frames = new LRUCache<string, Buffer>({
      maxSize: Math.max(1, cacheBytes >> 1),
      sizeCalculation: (b) => Math.max(1, b.length),
    });
    this.locStmt = db.prepare(
      `SELECT c.id AS id, c.hash AS hash, p.name AS pack, c.offset AS offset, c.stored_len AS storedLen,
              c.raw_len AS rawLen, c.codec AS codec
         FROM chunks c JOIN packs p ON p.id = c.pack_id WHERE c.id = ?`,
    );
  }

  location(id: number): ChunkLocation {
    const loc = this.locStmt.get(id) as ChunkLocation | undefined;
    if (!loc) throw new BkfsError('DATA_DAMAGED', `chunk ${id} is referenced but missing from the index`);
    return loc;
  }

  has(id: number): boolean {
    return this.cache.has(id) || this.inflight.has(id);
  }

  load(id: number, loc?: ChunkLocation): Promise<Buffer> {
    const hit = this.cache.get(id);
    if (hit) return Promise.resolve(hit);
    const running = this.inflight.get(id);
    if (running) return running;
    const p = this.fetch(id, loc).finally(() => this.inflight.delete(id));
    this.inflight.set(id, p);
    return p;
  }

  /**
   * Copy bytes [from, to) of chunk `id` into `out` at `outOff` (the range must lie in the chunk).
   * Rejects with DATA_DAMAGED naming the chunk; nothing is written into `out` after it settles.
   */
  async copyRange(
    id: number,
    loc: ChunkLocation,
    from: number,
    to: number,
    out: Buffer,
    outOff: number,
  ): Promise<void> {
    const whole = this.cache.get(id) ?? this.inflight.get(id);
    if (whole !== undefined || loc.codec !== CODEC_FRAMES || (to - from) * 2 > loc.rawLen) {
      const raw = await (whole ?? this.load(id, loc));
      raw.copy(out, outOff, from, to);
      return;
    }
    const table = await this.table(id, loc);
    const first = Math.floor(from / (1 << table.shift));
    const last = Math.floor((to - 1) / (1 << table.shift));
    const got = this.framesOf(id, loc, table, first, last);
    for (let i = first; i <= last; i++) {
      const f = table.frames[i]!;
      const raw = await got[i - first]!;
      const s = Math.max(from, f.rawOff);
      const e = Math.min(to, f.rawOff + f.rawLen);
      raw.copy(out, outOff + (s - from), s - f.rawOff, e - f.rawOff);
    }
  }

  /** Decoded frames first..last of a codec-2 chunk: cached, in flight, or read together. */
  private framesOf(
    id: number,
    loc: ChunkLocation,
    t: FrameTable,
    first: number,
    last: number,
  ): Promise<Buffer>[] {
    const res: (Promise<Buffer> | undefined)[] = [];
    let missFrom = -1;
    let missTo = -1;
    for (let i = first; i <= last; i++) {
      const key = `${id}:${i}`;
      const hit = this.frames.get(key);
      const p = hit !== undefined ? Promise.resolve(hit) : this.frameInflight.get(key);
      res.push(p);
      if (p === undefined) {
        if (missFrom < 0) missFrom = i;
        missTo = i;
      }
    }
    if (missFrom >= 0) {
      const a = t.frames[missFrom]!;
      const b = t.frames[missTo]!;
      const read = this.packs.read(
        loc.pack,
        loc.offset + a.storedOff,
        b.storedOff + b.storedLen - a.storedOff,
      );
      for (let i = missFrom; i <= missTo; i++) {
        if (res[i - first] !== undefined) continue;
        const key = `${id}:${i}`;
        const f = t.frames[i]!;
        const p = read
          .then((buf) => {
            this.bytesFromStore += f.storedLen;
            const raw = decodeFrame(
              f,
              buf.subarray(f.storedOff - a.storedOff, f.storedOff - a.storedOff + f.storedLen),
            );
            const own = raw.buffer.byteLength > raw.length * 2 ? Buffer.from(raw) : raw; // do not pin the read buffer
            this.framesDecoded++;
            this.frames.set(key, own);
            return own;
          })
          .catch((e: unknown) => {
            throw this.damage(id, loc, e);
          })
          .finally(() => this.frameInflight.delete(key));
        this.frameInflight.set(key, p);
        res[i - first] = p;
      }
    }
    return res as Promise<Buffer>[];
  }

  /** The checked frame table of a codec-2 chunk (cached). */
  private table(id: number, loc: ChunkLocation): Promise<FrameTable> {
    const hit = this.tables.get(id);
    if (hit) return Promise.resolve(hit);
    const running = this.tableInflight.get(id);
    if (running) return running;
    const p = this.packs
      .read(loc.pack, loc.offset, frameTablePrefixLen(loc.rawLen, loc.storedLen))
      .then((prefix) => {
        const t = parseFrameTable(prefix, loc.rawLen, loc.storedLen, loc.hash);
        this.tables.set(id, t);
        return t;
      })
      .catch((e: unknown) => {
        throw this.damage(id, loc, e);
      })
      .finally(() => this.tableInflight.delete(id));
    this.tableInflight.set(id, p);
    return p;
  }

  private damage(id: number, loc: ChunkLocation, e: unknown): BkfsError {
    if (e instanceof BkfsError && e.data?.chunkId !== undefined) return e;
    return new BkfsError(
      'DATA_DAMAGED',
      `chunk ${loc.hash.toString('hex').slice(0, 16)} (pack ${loc.pack}): ${(e as Error).message}`,
      { chunkId: id },
    );
  }

  private async fetch(id: number, given?: ChunkLocation): Promise<Buffer> {
    const loc = given ?? this.location(id);
    const stored = await this.packs.read(loc.pack, loc.offset, loc.storedLen);
    this.bytesFromStore += loc.storedLen;
    let raw: Buffer;
    try {
      raw = decodeChunk(stored, loc.codec, loc.rawLen, loc.hash);
    } catch (e) {
      throw new BkfsError(
        'DATA_DAMAGED',
        `chunk ${loc.hash.toString('hex').slice(0, 16)} (pack ${loc.pack}): ${(e as Error).message}`,
        {
          chunkId: id,
        },
      );
    }
    this.chunksDecoded++;
    this.cache.set(id, raw);
    return raw;
  }

  clear(): void {
    this.cache.clear();
    this.frames.clear();
    this.tables.clear();
  }
}
