/**
 * A pool of worker threads that hash (BLAKE3) and compress (zstd) chunks for the backup engine.
 *
 * Compression is the ingest bottleneck (~350 MB/s per core at zstd level 1), so the work runs on
 * `size` workers (default: number of cores) while the main thread reads NBD and writes packs.
 * Memory: each job holds its raw chunk until answered; callers bound the number of jobs in flight.
 *
 * Encrypted repositories: given the repository's `Cipher`, each worker gets the id and data keys as
 * worker data (copied in memory to the thread, never written anywhere), names chunks with the keyed
 * hash and seals the stored bytes itself, so sealing runs on all cores with compression.
 */
import { Worker } from 'node:worker_threads';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Codec } from './codec';
import type { Cipher } from '../crypto/cipher';

export interface IngestResult {
  hash: Buffer;
  codec: Codec;
  stored: Buffer;
  /** Raw frames (format 6): the chunk's bytes (the caller's own), stored after `stored` (the table). */
  tail?: Buffer;
}

/** Time the workers spent, summed over workers (ms of thread time, not wall time). */
export interface IngestTimes {
  hashMs: number;
  compressMs: number;
  chunks: number;
  rawCodecChunks: number;
}

interface WorkerAnswer {
  id: number;
  hash: Uint8Array;
  codec: Codec;
  stored: Uint8Array | null;
  tail: boolean;
  hashMs: number;
  compressMs: number;
}

interface Pending {
  data: Buffer;
  resolve: (r: IngestResult) => void;
  reject: (e: Error) => void;
}

export class IngestPool {
  private readonly workers: Worker[] = [];
  private readonly load: number[] = [];
  private readonly pending = new Map<number, Pending & { worker: number }>();
  private nextId = 1;
  private failed: Error | undefined;
  readonly times: IngestTimes = { hashMs: 0, compressMs: 0, chunks: 0, rawCodecChunks: 0 };

  constructor(
    private readonly level: number,
    size = Math.max(1, Math.min(4, os.availableParallelism())),
    cipher: Cipher | null = null,
    /** Write incompressible chunks as raw frames (`Repository.writesRawFrames`, format 6). */
    rawFrames = false,
  ) {
    for (let i = 0; i < size; i++) {
      const w = new Worker(path.join(__dirname, 'ingest-worker.js'), {
        workerData: { keys: cipher ? cipher.workerKeys() : null, rawFrames: rawFrames && !cipher },
      });
      w.on('message', (m: WorkerAnswer) => {
        const p = this.pending.get(m.id);
        if (!p) return;
        this.times.hashMs += m.hashMs;
        this.times.compressMs += m.compressMs;
        this.times.chunks++;
        // Stored uncompressed: codec 0, or raw frames (format 6).
        if (m.codec === 0 || m.tail) this.times.rawCodecChunks++;
        this.pending.delete(m.id);
        this.load[p.worker]!--;
        p.resolve({
          hash: Buffer.from(m.hash.buffer, m.hash.byteOffset, m.hash.byteLength),
          codec: m.codec,
          stored: m.stored ? Buffer.from(m.stored.buffer, m.stored.byteOffset, m.stored.byteLength) : p.data,
          ...(m.tail ? { tail: p.data } : {}),
        });
      });
      w.on('error', (e) => this.fail(e));
      this.workers.push(w);
      this.load.push(0);
    }
  }

  private fail(e: Error): void {
    this.failed = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /**
   * Hash and compress one chunk. A view of a SharedArrayBuffer reaches the worker without a copy;
   * any other buffer is copied into a transferable one first, since postMessage would clone its
   * whole backing store. A chunk that stays raw is answered with `stored` = `data` itself (no
   * copy back), so the caller must not reuse that memory until it is done with `stored`.
   */
  process(data: Buffer): Promise<IngestResult> {
    if (this.failed) return Promise.reject(this.failed);
    let wi = 0;
    for (let i = 1; i < this.workers.length; i++) if (this.load[i]! < this.load[wi]!) wi = i;
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { data, resolve, reject, worker: wi });
      this.load[wi]!++;
      if (data.buffer instanceof SharedArrayBuffer) {
        this.workers[wi]!.postMessage({ id, data, level: this.level });
      } else {
        const own = new Uint8Array(data.length);
        own.set(data);
        this.workers[wi]!.postMessage({ id, data: own, level: this.level }, [own.buffer]);
      }
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }
}
