/**
 * Decoding of chunks for a whole-disk restore in worker threads.
 *
 * The restore engine used to decompress and hash-check every chunk on the main thread, which then
 * had no time left to keep reads and writes going: on 2 cores one core decoded, the other mostly
 * waited. Here the main thread only reads the stored bytes from the packs (libuv pool) and writes
 * (libuv pool); `DecodePool` workers (`decode-worker.ts`) open seals, decompress and check each
 * chunk against its hash. Buffers are transferred both ways, never copied (except a stored record
 * smaller than 4 KiB, which Node allocates from its shared pool). A chunk that fails to decode or
 * does not match its hash rejects with DATA_DAMAGED naming it, as `ChunkLoader` does: nothing
 * unchecked reaches a target.
 *
 * `PooledChunks` is the restore's chunk source over the pool: an LRU cache of decoded chunks
 * (a disk often holds the same chunk many times) and one load per chunk in flight.
 * Memory: the cache (`cacheBytes`) plus what the caller has in flight.
 */
import { Worker } from 'node:worker_threads';
import * as os from 'node:os';
import * as path from 'node:path';
import { LRUCache } from 'lru-cache';
import { BkfsError } from '../errors';
import type { Cipher } from '../crypto/cipher';
import type { PackReader } from '../store/packs';
import type { ChunkLocation } from '../store/chunk-cache';
import type { DecodeAnswer, DecodeJob } from './decode-worker';

interface Pending {
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
  loc: ChunkLocation;
  worker: number;
}

/**
 * Workers a restore decodes with: `BKFS_RESTORE_WORKERS` (0 = decode on the main thread; a knob for
 * bench/ A/B runs and tests), else the cores, at most 4.
 */
export function restoreWorkers(): number {
  const v = process.env.BKFS_RESTORE_WORKERS;
  const n = Number(v);
  if (v !== undefined && v !== '' && Number.isInteger(n) && n >= 0) return Math.min(n, 16);
  return Math.max(1, Math.min(4, os.availableParallelism()));
}

/** `b` as a Uint8Array that owns its whole ArrayBuffer (transferable): `b` itself when it does. */
function owned(b: Buffer): Uint8Array {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) {
    return new Uint8Array(b.buffer, 0, b.byteLength);
  }
  const own = new Uint8Array(b.byteLength);
  own.set(b);
  return own;
}

function damaged(loc: ChunkLocation, why: string): BkfsError {
  return new BkfsError(
    'DATA_DAMAGED',
    `chunk ${loc.hash.toString('hex').slice(0, 16)} (pack ${loc.pack}): ${why}`,
    { chunkId: loc.id },
  );
}

export class DecodePool {
  private readonly workers: Worker[] = [];
  private readonly load: number[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failed: Error | undefined;
  private closed = false;

  constructor(size: number, cipher: Cipher | null) {
    for (let i = 0; i < size; i++) {
      const w = new Worker(path.join(__dirname, 'decode-worker.js'), {
        workerData: { keys: cipher ? cipher.workerKeys() : null },
      });
      w.unref(); // referenced only while it has work (see `decode`)
      w.on('message', (m: DecodeAnswer) => this.answer(i, m));
      w.on('error', (e) => this.fail(e));
      w.on('exit', (code) => {
        if (!this.closed) this.fail(new Error(`restore decode worker exited (code ${code})`));
      });
      this.workers.push(w);
      this.load.push(0);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  private answer(wi: number, m: DecodeAnswer): void {
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    if (--this.load[wi]! === 0) this.workers[wi]!.unref();
    if (m.error !== undefined) p.reject(damaged(p.loc, m.error));
    else p.resolve(Buffer.from(m.raw.buffer, m.raw.byteOffset, m.raw.byteLength));
  }

  private fail(e: Error): void {
    if (this.failed) return;
    this.failed = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /**
   * Decode chunk `loc` from its stored bytes (as read from its pack) and check its hash. `stored`
   * is transferred to a worker: the caller must not use it afterwards.
   */
  decode(stored: Buffer, loc: ChunkLocation): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.closed) return Promise.reject(new Error('restore decode pool is closed'));
    let wi = 0;
    for (let i = 1; i < this.workers.length; i++) if (this.load[i]! < this.load[wi]!) wi = i;
    const id = this.nextId++;
    const data = owned(stored);
    const hash = new Uint8Array(loc.hash); // a copy: posting a view would clone its whole buffer
    const job: DecodeJob = { id, stored: data, codec: loc.codec, rawLen: loc.rawLen, hash };
    return new Promise<Buffer>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, loc, worker: wi });
      if (this.load[wi]!++ === 0) this.workers[wi]!.ref();
      this.workers[wi]!.postMessage(job, [data.buffer as ArrayBuffer, hash.buffer]);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }
}

/** The chunks of a restore: read on the main thread, decoded by the pool, cached decoded. */
export class PooledChunks {
  private readonly cache: LRUCache<number, Buffer>;
  private readonly inflight = new Map<number, Promise<Buffer>>();
  chunksDecoded = 0;

  constructor(
    private readonly packs: PackReader,
    private readonly pool: DecodePool,
    cacheBytes: number,
  ) {
    this.cache = new LRUCache<number, Buffer>({
      maxSize: Math.max(1, cacheBytes),
      sizeCalculation: (b) => Math.max(1, b.length),
    });
  }

  load(loc: ChunkLocation): Promise<Buffer> {
    const hit = this.cache.get(loc.id);
    if (hit) return Promise.resolve(hit);
    const running = this.inflight.get(loc.id);
    if (running) return running;
    const p = this.packs
      .read(loc.pack, loc.offset, loc.storedLen)
      .then((stored) => this.pool.decode(stored, loc))
      .then((raw) => {
        this.chunksDecoded++;
        this.cache.set(loc.id, raw);
        return raw;
      })
      .finally(() => this.inflight.delete(loc.id));
    this.inflight.set(loc.id, p);
    return p;
  }
}
