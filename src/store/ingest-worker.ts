/**
 * Worker thread of the ingest pool: hashes and compresses chunks off the main thread.
 * Receives `{ id, data, level }`, answers `{ id, hash, codec, stored, hashMs, compressMs }` (buffers
 * transferred; the two timings feed the engine's stats).
 */
import { parentPort } from 'node:worker_threads';
import { encodeChunk, hashChunk } from './codec';

interface Job {
  id: number;
  data: Uint8Array;
  level: number;
}

parentPort?.on('message', (job: Job) => {
  const raw = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
  const t0 = performance.now();
  const hash = hashChunk(raw);
  const t1 = performance.now();
  const enc = encodeChunk(raw, job.level);
  const t2 = performance.now();
  // Copy into fresh ArrayBuffers so they can be transferred (zstd output may share a pool).
  const stored = new Uint8Array(enc.data.length);
  stored.set(enc.data);
  const h = new Uint8Array(hash.length);
  h.set(hash);
  parentPort?.postMessage(
    { id: job.id, hash: h, codec: enc.codec, stored, hashMs: t1 - t0, compressMs: t2 - t1 },
    [stored.buffer, h.buffer],
  );
});
