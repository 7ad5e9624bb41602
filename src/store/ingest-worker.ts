/**
 * Worker thread of the ingest pool: hashes and compresses chunks off the main thread.
 * Receives `{ id, data, level }`, answers `{ id, hash, codec, stored, hashMs, compressMs }` (`stored` null for a
 * raw chunk: the caller has those bytes; buffers
 * transferred; the two timings feed the engine's stats).
 */
import { parentPort } from 'node:worker_threads';
import { CODEC_RAW, encodeChunk, hashChunk } from './codec';

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
  const enc = encodeChunk(raw, job.level, hash);
  const t2 = performance.now();
  // A raw chunk is not sent back: the pool answers with the caller's own bytes. A zstd result owns
  // its ArrayBuffer (encodeChunk), so it is transferred, not copied; the hash is copied (32 bytes).
  const h = new Uint8Array(hash.length);
  h.set(hash);
  const stored =
    enc.codec === CODEC_RAW ? null : new Uint8Array(enc.data.buffer as ArrayBuffer, 0, enc.data.length);
  parentPort?.postMessage(
    { id: job.id, hash: h, codec: enc.codec, stored, hashMs: t1 - t0, compressMs: t2 - t1 },
    stored ? [stored.buffer, h.buffer] : [h.buffer],
  );
});
