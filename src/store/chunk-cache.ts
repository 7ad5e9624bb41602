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
 * half the chunk that is neither cached nor being loaded whole, it decodes only the frames the range
 * needs, checks each against its frame hash and keeps it in a decoded-frame cache keyed by
 * (chunk, frame): a random 4 KiB read decodes and hashes 32 KiB instead of 256 KiB. The first such
 * read of a chunk reads its whole stored bytes (one read: it also brings the rest of the chunk into
 * the page cache) and checks the frame table against the chunk's hash; the checked table is kept in
 * a small table cache of its own, so every later miss on that chunk reads only the stored bytes of
 * the frame it needs (one small positioned read), and a hit in the frame cache reads nothing.
 * Everything else loads the whole chunk. Memory: `cacheBytes` in all, half for whole chunks, 7/16
 * for decoded frames, 1/16 for frame tables (a 256 KiB chunk's table costs well under 1 KiB).
 *
 * Encrypted repositories (`packs.cipher` set): a record's stored bytes are sealed whole (bound to
 * the chunk id), so a frame cannot be read or authenticated on its own: every read loads the whole
 * chunk, opens it (authenticate + decrypt), decodes it and checks it against its keyed-BLAKE3 id.
 * (Sealing each frame would bring the frame path back; FORMAT.md, "Encryption".)
 */
import { LRUCache } from 'lru-cache';
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import {
  CODEC_FRAMES,
  decodeChunk,
  decodeFrame,
  decodeFrameInto,
  hashChunk,
  parseFrameTable,
  type FrameEntry,
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

/** Estimated memory of a cached frame table: the object, and per frame its entry and hash. */
const TABLE_COST = 128;
const FRAME_ENTRY_COST = 160;

/** Frame `i` of chunk `id` as one number (a table has at most 0xffff frames). */
function frameKey(id: number, i: number): number {
  return id * 0x10000 + i;
}

/** Copy the part of decoded frame `f` (`raw`) inside the chunk range [from, to) to `out`. */
function copyFrame(raw: Buffer, f: FrameEntry, from: number, to: number, out: Buffer, outOff: number): void {
  const s = Math.max(from, f.rawOff);
  const e = Math.min(to, f.rawOff + f.rawLen);
  raw.copy(out, outOff + (s - from), s - f.rawOff, e - f.rawOff);
}

/**
 * Decoded frames in fixed slots of a few large buffers (slabs of 64 slots, allocated as needed),
 * least recently used first out: decoding a frame allocates nothing, so random reads do not churn
 * the garbage collector with 32 KiB buffers. A view returned by `get` is valid only until the next
 * `alloc` (which may reuse its slot): callers copy from it at once, synchronously.
 */
class FrameCache {
  private readonly slabs: Buffer[] = [];
  /** key -> slot; Map order is recency order (oldest first). */
  private readonly map = new Map<number, number>();
  private readonly lens: number[] = [];
  private readonly free: number[] = [];
  private used = 0;

  constructor(
    readonly slots: number,
    readonly slotSize: number,
  ) {}

  get size(): number {
    return this.map.size;
  }

  get(key: number): Buffer | undefined {
    const slot = this.map.get(key);
    if (slot === undefined) return undefined;
    this.map.delete(key);
    this.map.set(key, slot);
    return this.view(slot, this.lens[slot]!);
  }

  /** Whether a frame of `len` bytes can be cached. */
  fits(len: number): boolean {
    return len <= this.slotSize && this.slots > 0;
  }

  /** A slot to decode into (evicting the least recently used frame); undefined when it cannot hold `len`. */
  alloc(len: number): number | undefined {
    if (!this.fits(len)) return undefined;
    const f = this.free.pop();
    if (f !== undefined) return f;
    if (this.used < this.slots) {
      const slot = this.used++;
      if (slot >> SLAB_SHIFT >= this.slabs.length) {
        this.slabs.push(Buffer.allocUnsafeSlow(this.slotSize << SLAB_SHIFT));
      }
      return slot;
    }
    const oldest = this.map.keys().next().value as number;
    const slot = this.map.get(oldest)!;
    this.map.delete(oldest);
    return slot;
  }

  view(slot: number, len: number): Buffer {
    const at = (slot & ((1 << SLAB_SHIFT) - 1)) * this.slotSize;
    return this.slabs[slot >> SLAB_SHIFT]!.subarray(at, at + len);
  }

  /** The slot now holds frame `key` (`len` bytes). */
  commit(key: number, slot: number, len: number): void {
    const old = this.map.get(key);
    if (old !== undefined && old !== slot) this.free.push(old);
    this.lens[slot] = len;
    this.map.set(key, slot);
  }

  /** Give back a slot that was not committed (its decode failed). */
  release(slot: number): void {
    this.free.push(slot);
  }

  clear(): void {
    this.map.clear();
    this.free.length = 0;
    this.used = 0;
    this.slabs.length = 0;
  }
}

const SLAB_SHIFT = 6;

/** Size of a pooled buffer for a whole stored chunk (a 256 KiB chunk's, raw frames and table included). */
const STORED_SLOT = 260 * 1024;
const STORED_POOL_MAX = 16;

/** A whole stored chunk being read, shared by its concurrent readers (`borrowStored`). */
interface StoredRead {
  p: Promise<Buffer>;
  /** Holders that have not given it back. */
  refs: number;
  settled: boolean;
  /** The pooled buffer behind `p`'s bytes, until it goes back to the pool. */
  pooled: Buffer | undefined;
}
/** Slot size of the frame cache: frames of this bkfs (32 KiB); larger frames are decoded uncached. */
const FRAME_SLOT = 32 * 1024;

export class ChunkLoader {
  private readonly cache: LRUCache<number, Buffer>;
  private readonly inflight = new Map<number, Promise<Buffer>>();
  /** Decoded frames of codec-2 chunks, keyed by `frameKey(chunkId, frame)`. */
  private readonly frames: FrameCache;
  /** Frames being read (the chunk's table already known), same keys. */
  private readonly framesInflight = new Map<number, Promise<Buffer | undefined>>();
  /** Buffers for the stored bytes of one frame while it is decoded. */
  private readonly scratch: Buffer[] = [];
  /** Checked frame tables of codec-2 chunks, by chunk id. */
  private readonly tables: LRUCache<number, FrameTable>;
  /** Whole stored bytes of codec-2 chunks being read (shared by concurrent first reads; not kept). */
  private readonly storedInflight = new Map<number, StoredRead>();
  /** Reused buffers for whole stored chunks (`STORED_SLOT` bytes each), see `borrowStored`. */
  private readonly storedPool: Buffer[] = [];
  framesDecoded = 0;
  /** Pooled buffers for whole stored chunks allocated so far (statistics; tests check the reuse). */
  storedBuffers = 0;
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
    this.frames = new FrameCache(Math.floor((cacheBytes * 7) / 16 / FRAME_SLOT), FRAME_SLOT);
    this.tables = new LRUCache<number, FrameTable>({
      maxSize: Math.max(TABLE_COST, cacheBytes >> 4),
      sizeCalculation: (t) => TABLE_COST + t.frames.length * FRAME_ENTRY_COST,
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
      this.packs.cipher ||
      (to - from) * 2 > loc.rawLen
    ) {
      const raw = await (whole ?? this.load(id, loc));
      raw.copy(out, outOff, from, to);
      return;
    }
    let table = this.tables.get(id);
    if (table && this.frameHits(id, table, from, to, out, outOff)) return;
    try {
      if (!table) {
        // First read of this chunk: its whole stored bytes, one read (shared with concurrent ones),
        // in a pooled buffer lent until this continuation returns (everything below is synchronous).
        const lent = this.borrowStored(id, loc);
        try {
          const data = await lent.p;
          table = this.tables.get(id);
          if (!table) {
            table = parseFrameTable(data, loc.rawLen, loc.storedLen, loc.hash);
            this.tables.set(id, table);
          }
          const t = table;
          this.eachFrame(t, from, to, (i, f) => {
            const key = frameKey(id, i);
            const raw =
              this.frames.get(key) ??
              this.decodeTo(key, f, data.subarray(f.storedOff, f.storedOff + f.storedLen));
            copyFrame(raw, f, from, to, out, outOff); // at once: a cache slot is only lent
          });
        } finally {
          this.giveBack(lent);
        }
        return;
      }
      // The table is known: read and decode only the missing frames (each one small read).
      const t = table;
      const parts: Promise<void>[] = [];
      this.eachFrame(t, from, to, (i, f) => {
        const raw = this.frames.get(frameKey(id, i));
        if (raw !== undefined) copyFrame(raw, f, from, to, out, outOff);
        else parts.push(this.frameInto(id, loc, i, f, from, to, out, outOff));
      });
      if (parts.length === 1) await parts[0];
      else if (parts.length > 1) {
        // Every piece settles before the read fails: nothing lands in `out` afterwards.
        const results = await Promise.allSettled(parts);
        for (const r of results) if (r.status === 'rejected') throw r.reason;
      }
    } catch (e) {
      throw this.damage(id, loc, e);
    }
  }

  /** Frames [i, f] of a table that the raw range [from, to) touches, in order. */
  private eachFrame(t: FrameTable, from: number, to: number, fn: (i: number, f: FrameEntry) => void): void {
    const last = Math.floor((to - 1) / (1 << t.shift));
    for (let i = Math.floor(from / (1 << t.shift)); i <= last; i++) fn(i, t.frames[i]!);
  }

  /** Copy [from, to) from cached frames if every frame it needs is cached. */
  private frameHits(
    id: number,
    t: FrameTable,
    from: number,
    to: number,
    out: Buffer,
    outOff: number,
  ): boolean {
    const size = 1 << t.shift;
    const a = Math.floor(from / size);
    const b = Math.floor((to - 1) / size);
    if (a === b) {
      const raw = this.frames.get(frameKey(id, a));
      if (raw === undefined) return false;
      copyFrame(raw, t.frames[a]!, from, to, out, outOff);
      return true;
    }
    const got: Buffer[] = [];
    for (let i = a; i <= b; i++) {
      const raw = this.frames.get(frameKey(id, i));
      if (raw === undefined) return false;
      got.push(raw);
    }
    for (let i = a; i <= b; i++) copyFrame(got[i - a]!, t.frames[i]!, from, to, out, outOff);
    return true;
  }

  /**
   * Decode frame `f` from its stored bytes into a cache slot (or, when it cannot be cached, a
   * buffer of its own) and return a view valid until the next decode: copy from it at once.
   */
  private decodeTo(key: number, f: FrameEntry, stored: Buffer): Buffer {
    const slot = this.frames.alloc(f.rawLen);
    if (slot === undefined) {
      const raw = decodeFrame(f, stored);
      this.framesDecoded++;
      return raw.buffer === stored.buffer ? Buffer.from(raw) : raw;
    }
    const view = this.frames.view(slot, f.rawLen);
    try {
      decodeFrameInto(f, stored, view);
    } catch (e) {
      this.frames.release(slot);
      throw e;
    }
    this.framesDecoded++;
    this.frames.commit(key, slot, f.rawLen);
    return view;
  }

  /** Copy the part of frame `i` inside [from, to) into `out` once it is read (table known). */
  private async frameInto(
    id: number,
    loc: ChunkLocation,
    i: number,
    f: FrameEntry,
    from: number,
    to: number,
    out: Buffer,
    outOff: number,
  ): Promise<void> {
    const key = frameKey(id, i);
    for (let attempt = 0; ; attempt++) {
      // A shared read fills a cache slot, which other decodes may reuse before this continuation
      // runs: look again, and after one miss read a private copy.
      const own = await this.readFrame(id, loc, i, f, attempt > 0);
      const raw = own ?? this.frames.get(key);
      if (raw !== undefined) {
        copyFrame(raw, f, from, to, out, outOff);
        return;
      }
    }
  }

  /**
   * Read and decode one frame of a chunk whose table is known: its stored bytes only (one small
   * read, shared by concurrent readers). Resolves with a buffer of its own when the frame was not
   * cached (`private`, or too large for a slot), else undefined (it is in the frame cache).
   */
  private readFrame(
    id: number,
    loc: ChunkLocation,
    i: number,
    f: FrameEntry,
    privateCopy: boolean,
  ): Promise<Buffer | undefined> {
    const key = frameKey(id, i);
    const running = privateCopy ? undefined : this.framesInflight.get(key);
    if (running) return running;
    const scratch =
      f.storedLen <= FRAME_SLOT ? (this.scratch.pop() ?? Buffer.allocUnsafeSlow(FRAME_SLOT)) : undefined;
    const stored = scratch ? scratch.subarray(0, f.storedLen) : Buffer.allocUnsafe(f.storedLen);
    const p = this.packs
      .readInto(loc.pack, loc.offset + f.storedOff, stored)
      .then(() => {
        this.bytesFromStore += f.storedLen;
        if (privateCopy) {
          const raw = decodeFrame(f, stored);
          this.framesDecoded++;
          return raw.buffer === stored.buffer ? Buffer.from(raw) : raw;
        }
        const raw = this.decodeTo(key, f, stored);
        return this.frames.fits(f.rawLen) ? undefined : raw;
      })
      .finally(() => {
        if (scratch && this.scratch.length < 64) this.scratch.push(scratch);
        if (!privateCopy) this.framesInflight.delete(key);
      });
    if (!privateCopy) this.framesInflight.set(key, p);
    return p;
  }

  /**
   * The whole stored bytes of a chunk: being read, or read now (one read, shared; not kept). The
   * caller holds a reference until `giveBack`, and uses the bytes only synchronously after its
   * `await`: the buffer goes back to the pool once the read has settled and every holder gave it
   * back. Pooling matters: a fresh 128 KiB buffer per cold random read made V8 run a full
   * mark-compact every ~100 ms (external memory), which set the QD1 tail (bench/README.md).
   */
  private borrowStored(id: number, loc: ChunkLocation): StoredRead {
    let r = this.storedInflight.get(id);
    if (!r) {
      const pooled =
        loc.storedLen <= STORED_SLOT ? (this.storedPool.pop() ?? this.newStoredBuffer()) : undefined;
      const target = pooled ? pooled.subarray(0, loc.storedLen) : Buffer.allocUnsafe(loc.storedLen);
      const entry: StoredRead = {
        refs: 0,
        settled: false,
        pooled,
        p: this.packs.readInto(loc.pack, loc.offset, target).then(() => {
          this.bytesFromStore += loc.storedLen;
          return target;
        }),
      };
      // Registered before any holder's await, so it runs first: later holders find no entry.
      const settle = (): void => {
        this.storedInflight.delete(id);
        entry.settled = true;
        this.recycle(entry);
      };
      entry.p.then(settle, settle);
      this.storedInflight.set(id, entry);
      r = entry;
    }
    r.refs++;
    return r;
  }

  private newStoredBuffer(): Buffer {
    this.storedBuffers++;
    return Buffer.allocUnsafeSlow(STORED_SLOT);
  }

  private giveBack(r: StoredRead): void {
    r.refs--;
    this.recycle(r);
  }

  private recycle(r: StoredRead): void {
    if (!r.settled || r.refs > 0 || r.pooled === undefined) return;
    if (this.storedPool.length < STORED_POOL_MAX) this.storedPool.push(r.pooled);
    r.pooled = undefined;
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
    const running = this.storedInflight.get(id);
    if (running) running.refs++;
    try {
      const stored = running ? await running.p : await this.packs.read(loc.pack, loc.offset, loc.storedLen);
      if (!running) this.bytesFromStore += loc.storedLen;
      const raw = this.decodeFetched(id, loc, stored);
      // Pooled stored bytes go back to the pool: a result that is a view of them must own its bytes.
      return running && raw.buffer === stored.buffer ? this.recache(id, raw) : raw;
    } finally {
      if (running) this.giveBack(running);
    }
  }

  /**
   * Decode and check a chunk's stored bytes and cache the result. The result never shares memory
   * with `stored` unless `stored` was the caller's own read (codec 0): pooled bytes are never kept.
   */
  private decodeFetched(id: number, loc: ChunkLocation, stored: Buffer): Buffer {
    const c = this.packs.cipher;
    let raw: Buffer;
    try {
      raw = c
        ? decodeChunk(c.openChunk(loc.hash, stored), loc.codec, loc.rawLen, loc.hash, undefined, (b) =>
            c.chunkHash(b),
          )
        : decodeChunk(stored, loc.codec, loc.rawLen, loc.hash, undefined, hashChunk);
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

  private recache(id: number, view: Buffer): Buffer {
    const own = Buffer.from(view);
    this.cache.set(id, own);
    return own;
  }

  clear(): void {
    this.cache.clear();
    this.frames.clear();
    this.tables.clear();
  }
}
