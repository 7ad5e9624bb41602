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
 */
import { LRUCache } from 'lru-cache';
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import { decodeChunk } from './codec';
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
  }
}
