/**
 * Worker thread of the ingest pool: hashes and compresses chunks off the main thread.
 * Worker data: the keys of an encrypted repository, and whether to write raw frames (format 6).
 * Receives `{ id, data, level }`, answers `{ id, hash, codec, stored, tail, hashMs, compressMs }` (`stored` null for a
 * raw chunk: the caller has those bytes; `tail` true for raw frames: `stored` is their table and the
 * caller's bytes follow it; buffers
 * transferred; the two timings feed the engine's stats).
 */
import { parentPort, workerData } from 'node:worker_threads';
import { CODEC_RAW, encodeChunkParts, hashChunk } from './codec';
import { Cipher, type WorkerKeys } from '../crypto/cipher';

// Encrypted repository: the keys came as worker data (in memory). Chunks are then named by the
// keyed hash and their stored bytes sealed here; a sealed result is always sent back.
const data = workerData as { keys: WorkerKeys | null; rawFrames?: boolean } | null;
const keys = data?.keys ?? null;
const cipher = keys ? Cipher.fromWorkerKeys(keys) : null;
// Plain repository of format 6: incompressible chunks become raw frames (codec.ts, FORMAT.md).
const rawFrames = data?.rawFrames === true && !cipher;

interface Job {
  id: number;
  data: Uint8Array;
  level: number;
}

parentPort?.on('message', (job: Job) => {
  const raw = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
  const t0 = performance.now();
  const hash = cipher ? cipher.chunkHash(raw) : hashChunk(raw);
  const t1 = performance.now();
  const enc = encodeChunkParts(raw, job.level, hash, undefined, rawFrames);
  if (cipher) enc.data = cipher.sealChunk(hash, enc.data); // a fresh buffer that owns its memory
  const t2 = performance.now();
  // A raw chunk is not sent back: the pool answers with the caller's own bytes. A zstd result owns
  // its ArrayBuffer (encodeChunk), so it is transferred, not copied; the hash is copied (32 bytes).
  const h = new Uint8Array(hash.length);
  h.set(hash);
  const stored =
    enc.codec === CODEC_RAW && !cipher
      ? null
      : new Uint8Array(enc.data.buffer as ArrayBuffer, enc.data.byteOffset, enc.data.length);
  // Raw frames: `stored` is the frame table; the raw chunk (the caller's bytes) follows it (`tail`).
  parentPort?.postMessage(
    {
      id: job.id,
      hash: h,
      codec: enc.codec,
      stored,
      tail: enc.tail !== undefined,
      hashMs: t1 - t0,
      compressMs: t2 - t1,
    },
    stored ? [stored.buffer, h.buffer] : [h.buffer],
  );
});
