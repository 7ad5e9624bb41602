/**
 * Worker thread of the restore decode pool (`decode-pool.ts`): decodes stored chunk bytes (open
 * the seal of an encrypted repository, zstd / frames) and checks them against the chunk's hash,
 * off the main thread. Receives `{ id, stored, codec, rawLen, hash }` (stored transferred) and
 * answers `{ id, raw }` (transferred) or `{ id, error }` (the message of the decode failure: the
 * pool turns it into DATA_DAMAGED naming the chunk). Nothing unchecked is ever sent back.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { decodeStored } from '../store/codec';
import type { WorkerKeys } from '../crypto/cipher';

// The cipher module (libsodium) is loaded only for an encrypted repository: start-up is the cost
// of a worker (the pool decodes on the main thread until a worker said it is ready).
const keys = (workerData as { keys: WorkerKeys | null } | null)?.keys ?? null;
const cipher = keys
  ? // eslint-disable-next-line @typescript-eslint/no-require-imports
    (require('../crypto/cipher') as typeof import('../crypto/cipher')).Cipher.fromWorkerKeys(keys)
  : null;

export interface DecodeJob {
  id: number;
  stored: Uint8Array;
  codec: number;
  rawLen: number;
  hash: Uint8Array;
}

export type DecodeAnswer =
  | { id: number; raw: Uint8Array; error?: undefined }
  | { id: number; error: string }
  | { id: 0; ready: true; error?: undefined };

/**
 * `b` as a Uint8Array whose ArrayBuffer can be transferred: its own, or a view of `stored` (the
 * job's bytes, transferred to this thread: raw frames decode to a view of them), else a copy (a
 * view of anything else may be of Node's shared allocation pool).
 */
function owned(b: Buffer, stored: Buffer): Uint8Array {
  if (
    ((b.byteOffset === 0 && b.byteLength === b.buffer.byteLength) || b.buffer === stored.buffer) &&
    !(b.buffer instanceof SharedArrayBuffer)
  ) {
    return new Uint8Array(b.buffer as ArrayBuffer, b.byteOffset, b.byteLength);
  }
  const own = new Uint8Array(b.byteLength);
  own.set(b);
  return own;
}

parentPort?.on('message', (job: DecodeJob) => {
  const stored = Buffer.from(job.stored.buffer, job.stored.byteOffset, job.stored.byteLength);
  const hash = Buffer.from(job.hash.buffer, job.hash.byteOffset, job.hash.byteLength);
  let answer: DecodeAnswer;
  let transfer: ArrayBuffer[] = [];
  try {
    const raw = owned(decodeStored(cipher, stored, job.codec, job.rawLen, hash), stored);
    answer = { id: job.id, raw };
    transfer = [raw.buffer as ArrayBuffer];
  } catch (e) {
    answer = { id: job.id, error: (e as Error).message };
  }
  parentPort?.postMessage(answer, transfer);
});

parentPort?.postMessage({ id: 0, ready: true } satisfies DecodeAnswer);
