/**
 * The chunks of a whole-disk restore: read, decoded and hash-checked, optionally in worker threads.
 *
 * `PooledChunks` is the restore's chunk source: stored bytes are read from the packs (libuv pool),
 * then decoded (seal opened, zstd / frames) and checked against the chunk's hash, on the main
 * thread or in a `DecodePool`. A chunk that fails to decode or does not match its hash rejects
 * with DATA_DAMAGED naming it, as `ChunkLoader` does: nothing unchecked reaches a target. One load
 * per chunk is in flight; a chunk is cached from its second load on (see `load`).
 *
 * `DecodePool` (`BKFS_RESTORE_WORKERS=N`, default 0; bench/README.md "Restore" for why): workers
 * (`decode-worker.ts`) decode and check; buffers are transferred both ways, never copied (except a
 * stored record smaller than 4 KiB, which Node allocates from its shared pool).
 * Memory: the cache (`cacheBytes`) plus what the caller has in flight.
 */
import { Worker } from 'node:worker_threads';
import * as path from 'node:path';
import { LRUCache } from 'lru-cache';
import { BkfsError } from '../errors';
import { decodeStored } from '../store/codec';
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
 * Workers a restore decodes with: `BKFS_RESTORE_WORKERS` (a knob for bench/ A/B runs and tests),
 * else 0 = decode on the main thread. Measured on the 2-core bench machine (bench/README.md,
 * "Restore"), the pool did not pay: the bench disk's chunks are mostly stored raw (only a hash
 * check) or repeated (cached), so there is little to decode, while each worker costs its start-up
 * and a message per chunk. A disk of mostly compressed, distinct chunks on more cores may differ:
 * measure with BKFS_RESTORE_WORKERS before changing the default.
 */
export function restoreWorkers(): number {
  const v = process.env.BKFS_RESTORE_WORKERS;
  const n = Number(v);
  if (v !== undefined && v !== '' && Number.isInteger(n) && n >= 0) return Math.min(n, 16);
  return 0;
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

/** Decode on this thread (the same checks as a worker's). */
function decodeHere(cipher: Cipher | null, stored: Buffer, loc: ChunkLocation): Promise<Buffer> {
  try {
    return Promise.resolve(decodeStored(cipher, stored, loc.codec, loc.rawLen, loc.hash));
  } catch (e) {
    return Promise.reject(damaged(loc, (e as Error).message));
  }
}

export class DecodePool {
  private readonly workers: Worker[] = [];
  private readonly load: number[] = [];
  private readonly ready: boolean[] = [];
  private readyCount = 0;
  /** Resolves when the first worker is ready. */
  private readonly firstReady: Promise<void>;
  private onFirstReady: () => void = () => undefined;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failed: Error | undefined;
  private closed = false;

  constructor(size: number, cipher: Cipher | null) {
    this.firstReady = new Promise((resolve) => (this.onFirstReady = resolve));
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
      this.ready.push(false);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  private answer(wi: number, m: DecodeAnswer): void {
    if ('ready' in m) {
      if (!this.ready[wi]) this.readyCount++;
      this.ready[wi] = true;
      this.onFirstReady();
      return;
    }
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
    this.onFirstReady(); // waiting decodes see the failure
  }

  /**
   * Decode chunk `loc` from its stored bytes (as read from its pack) and check its hash. `stored`
   * is transferred to a worker: the caller must not use it afterwards.
   */
  decode(stored: Buffer, loc: ChunkLocation): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.closed) return Promise.reject(new Error('restore decode pool is closed'));
    // A worker takes a few hundred ms to start (more on a busy machine): wait for the first.
    if (this.readyCount === 0) return this.firstReady.then(() => this.decode(stored, loc));
    let wi = -1;
    for (let i = 0; i < this.workers.length; i++) {
      if (this.ready[i] && (wi < 0 || this.load[i]! < this.load[wi]!)) wi = i;
    }
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
    this.onFirstReady();
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }
}

/** The chunks of a restore: read on the main thread, decoded by the pool, cached decoded. */
export class PooledChunks {
  private readonly cache: LRUCache<number, Buffer>;
  private readonly inflight = new Map<number, Promise<Buffer>>();
  /** Chunks loaded once: a chunk is cached from its second load on (see `load`). */
  private readonly seen = new Set<number>();
  private readonly cipher: Cipher | null;
  chunksDecoded = 0;

  constructor(
    private readonly packs: PackReader,
    /** Null: decode on this thread. */
    private readonly pool: DecodePool | null,
    cacheBytes: number,
  ) {
    this.cipher = packs.cipher;
    this.cache = new LRUCache<number, Buffer>({
      maxSize: Math.max(1, cacheBytes),
      sizeCalculation: (b) => Math.max(1, b.length),
    });
  }

  /**
   * The checked bytes of chunk `loc`. Most chunks of a disk are used once: caching them would only
   * cycle fresh memory through the cache (page faults cost more here than decoding), so a chunk is
   * kept only when it is loaded a second time; a repeated chunk is decoded twice, then served from
   * the cache.
   */
  load(loc: ChunkLocation): Promise<Buffer> {
    const hit = this.cache.get(loc.id);
    if (hit) return Promise.resolve(hit);
    const running = this.inflight.get(loc.id);
    if (running) return running;
    const again = this.seen.has(loc.id);
    if (!again) this.seen.add(loc.id);
    const p = this.packs
      .read(loc.pack, loc.offset, loc.storedLen)
      .then((stored) => (this.pool ? this.pool.decode(stored, loc) : decodeHere(this.cipher, stored, loc)))
      .then((raw) => {
        this.chunksDecoded++;
        if (again) this.cache.set(loc.id, raw);
        return raw;
      })
      .finally(() => this.inflight.delete(loc.id));
    this.inflight.set(loc.id, p);
    return p;
  }
}
