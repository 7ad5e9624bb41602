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
 * half the chunk that is neither cached nor being loaded whole, it reads the chunk's stored bytes
 * (one read; kept in a small stored-bytes cache), checks the frame table against the chunk's hash,
 * decodes only the frames the range needs, checks each against its frame hash and keeps it in a
 * decoded-frame cache keyed by (chunk, frame): a random 4 KiB read decodes and hashes 32 KiB instead
 * of 256 KiB. Everything else loads the whole chunk (from the stored-bytes cache when it is there).
 * Memory: `cacheBytes` in all, half for whole chunks, a quarter each for stored bytes and frames.
 *
 * Encrypted repositories (`packs.cipher` set): a record's stored bytes are opened (authenticated
 * and decrypted, bound to the chunk id) right after they are read, and the stored-bytes cache keeps
 * the opened bytes, so the frame path above works unchanged (one open per chunk read from disk,
 * then any number of frame decodes); a whole chunk is checked against its keyed-BLAKE3 id.
 */
import { LRUCache } from 'lru-cache';
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import { CODEC_FRAMES, decodeChunk, decodeFrame, hashChunk, parseFrameTable, type FrameTable } from './codec';
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
  /** Stored (compressed) bytes of codec-2 chunks read for frames, with their checked table once parsed. */
  private readonly stored: LRUCache<number, { data: Buffer; table?: FrameTable }>;
  private readonly storedInflight = new Map<number, Promise<Buffer>>();
  framesDecoded = 0;
  /** Read small ranges of frames chunks frame by frame (false: always whole chunks; for A/B in bench/). */
  frameReads = true;
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
      maxSize: Math.max(1, cacheBytes >> 1),
      sizeCalculation: (b) => Math.max(1, b.length),
    });
    this.frames = new LRUCache<string, Buffer>({
      maxSize: Math.max(1, cacheBytes >> 2),
      sizeCalculation: (b) => Math.max(1, b.length),
    });
    this.stored = new LRUCache<number, { data: Buffer; table?: FrameTable }>({
      maxSize: Math.max(1, cacheBytes >> 2),
      sizeCalculation: (v) => Math.max(1, v.data.length),
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
    if (
      whole !== undefined ||
      loc.codec !== CODEC_FRAMES ||
      !this.frameReads ||
      (to - from) * 2 > loc.rawLen
    ) {
      const raw = await (whole ?? this.load(id, loc));
      raw.copy(out, outOff, from, to);
      return;
    }
    let hit = this.frameHits(id, from, to, out, outOff);
    if (hit) return;
    const data = await this.storedBytes(id, loc);
    hit = this.frameHits(id, from, to, out, outOff); // another read may have decoded them meanwhile
    if (hit) return;
    const entry = this.stored.get(id) ?? { data };
    try {
      entry.table ??= parseFrameTable(data, loc.rawLen, data.length, loc.hash);
      const t = entry.table;
      const size = 1 << t.shift;
      for (let i = Math.floor(from / size); i <= Math.floor((to - 1) / size); i++) {
        const key = `${id}:${i}`;
        const f = t.frames[i]!;
        let raw = this.frames.get(key);
        if (raw === undefined) {
          raw = decodeFrame(f, data.subarray(f.storedOff, f.storedOff + f.storedLen));
          if (raw.buffer === data.buffer) raw = Buffer.from(raw); // a raw frame: do not pin the stored bytes
          this.framesDecoded++;
          this.frames.set(key, raw);
        }
        const s = Math.max(from, f.rawOff);
        const e = Math.min(to, f.rawOff + f.rawLen);
        raw.copy(out, outOff + (s - from), s - f.rawOff, e - f.rawOff);
      }
    } catch (e) {
      this.stored.delete(id);
      throw this.damage(id, loc, e);
    }
  }

  /** Copy [from, to) from cached frames if every frame it needs is cached (needs the table). */
  private frameHits(id: number, from: number, to: number, out: Buffer, outOff: number): boolean {
    const t = this.stored.get(id)?.table;
    if (!t) return false;
    const size = 1 << t.shift;
    const a = Math.floor(from / size);
    const b = Math.floor((to - 1) / size);
    const got: Buffer[] = [];
    for (let i = a; i <= b; i++) {
      const raw = this.frames.get(`${id}:${i}`);
      if (raw === undefined) return false;
      got.push(raw);
    }
    for (let i = a; i <= b; i++) {
      const f = t.frames[i]!;
      const s = Math.max(from, f.rawOff);
      const e = Math.min(to, f.rawOff + f.rawLen);
      got[i - a]!.copy(out, outOff + (s - from), s - f.rawOff, e - f.rawOff);
    }
    return true;
  }

  /** The stored bytes of a chunk: cached, being read, or read now (one read, shared). */
  private storedBytes(id: number, loc: ChunkLocation): Promise<Buffer> {
    const hit = this.stored.get(id);
    if (hit) return Promise.resolve(hit.data);
    const running = this.storedInflight.get(id);
    if (running) return running;
    const p = this.packs
      .read(loc.pack, loc.offset, loc.storedLen)
      .then((read) => {
        this.bytesFromStore += loc.storedLen;
        let data: Buffer;
        try {
          data = this.opened(loc, read);
        } catch (e) {
          throw this.damage(id, loc, e);
        }
        this.stored.set(id, { data });
        return data;
      })
      .finally(() => this.storedInflight.delete(id));
    this.storedInflight.set(id, p);
    return p;
  }

  /** A record's stored bytes as the codec wrote them: opened in an encrypted repository. */
  private opened(loc: ChunkLocation, read: Buffer): Buffer {
    const c = this.packs.cipher;
    return c ? c.openChunk(loc.hash, read) : read;
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
    const cached = this.stored.get(id)?.data ?? (await this.storedInflight.get(id));
    const read = cached ? undefined : await this.packs.read(loc.pack, loc.offset, loc.storedLen);
    if (!cached) this.bytesFromStore += loc.storedLen;
    const c = this.packs.cipher;
    let raw: Buffer;
    try {
      const stored = cached ?? this.opened(loc, read!);
      raw = decodeChunk(
        stored,
        loc.codec,
        loc.rawLen,
        loc.hash,
        undefined,
        c ? (b) => c.chunkHash(b) : hashChunk,
      );
    } catch (e) {
      this.stored.delete(id);
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
    this.stored.clear();
  }
}
