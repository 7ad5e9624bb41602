/**
 * Chunk codec: content hash and compression of one chunk.
 *
 * - Hash: BLAKE3-256 of the *uncompressed* bytes (native `@napi-rs/blake-hash`, 4–5 GB/s on one
 *   core here, against 1.1 GB/s for node:crypto SHA-256). Dedup trusts it, so it must be
 *   collision-resistant; it is also re-checked on every read, so damaged data never reaches a user.
 * - Compression: zstd (`zstd-napi`, synchronous, reusable contexts) at level 1 by default: 2.6x on
 *   disk-like data at 310–380 MB/s per core, decompression ~1 GB/s. A chunk that does not shrink
 *   is stored raw (codec 0; from format 6, in a plain repository, as raw frames), so random data
 *   costs no decompression on read.
 *
 * - Frames (codec 2, repository format 4): a chunk larger than `frameSize` (default 32 KiB) is
 *   compressed as independently decodable pieces behind a frame table with a 16-byte BLAKE3 of each
 *   frame's raw bytes, the table itself bound to the chunk's hash (see FORMAT.md, "Frames"). A 4 KiB
 *   random read then reads and decodes one frame instead of the whole chunk (bench/README.md).
 *
 * Pure functions over buffers; no I/O. Used both on the main thread (reads) and in the worker
 * pool (backup ingest). Each thread keeps its own zstd contexts (they are not thread-safe).
 */
import { blake3 } from '@napi-rs/blake-hash';
import * as zstd from 'zstd-napi/binding';
import { BkfsError } from '../errors';

import { CODEC_FRAMES, CODEC_RAW, CODEC_ZSTD, MAX_CHUNK_LEN } from './hash-len';
export { maxFrameTableLen } from './hash-len';
export { CODEC_FRAMES, CODEC_RAW, CODEC_ZSTD, MAX_CHUNK_LEN };
export type Codec = typeof CODEC_RAW | typeof CODEC_ZSTD | typeof CODEC_FRAMES;

export { HASH_LEN } from './hash-len';

export function hashChunk(data: Uint8Array): Buffer {
  return blake3(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength));
}

let cctx: zstd.CCtx | undefined;
let cctxLevel = -100;
let scratch: Buffer | undefined;
let dctx: zstd.DCtx | undefined;

export interface Encoded {
  codec: Codec;
  data: Buffer;
}

/**
 * `Encoded` in parts: the stored bytes are `data` followed by `tail` when there is one. Raw frames
 * (format 6) are their frame table (`data`) and the raw chunk itself (`tail`), so a writer sends
 * both to the pack with one `writev` instead of copying 256 KiB into a new buffer.
 */
export interface EncodedParts extends Encoded {
  tail?: Buffer;
}

/**
 * Raw bytes per frame of a codec-2 chunk written by this bkfs: 32 KiB (chosen by measurement,
 * bench/README.md). `BKFS_FRAME_SIZE` (bytes, a power of two from 4096 to 1 MiB, or 0 = one zstd
 * frame per chunk as formats 1-2 wrote) overrides it: a knob for bench/ A/B runs and tests only.
 */
export const DEFAULT_FRAME_SIZE = frameSizeFromEnv(process.env.BKFS_FRAME_SIZE);

function frameSizeFromEnv(v: string | undefined): number {
  const n = Number(v);
  if (v === undefined || v === '' || !Number.isInteger(n)) return 32 * 1024;
  if (n === 0 || (n >= 4096 && n <= 1 << 20 && (n & (n - 1)) === 0)) return n;
  return 32 * 1024;
}

/** Largest compressed size worth storing for `n` raw bytes: zstd must save at least 1/32. */
function keepLimit(n: number): number {
  return n - (n >> 5) - 1;
}

function compressCtx(level: number): zstd.CCtx {
  if (!cctx || cctxLevel !== level) {
    cctx = new zstd.CCtx();
    cctx.setParameter(zstd.CParameter.compressionLevel, level);
    cctx.setParameter(zstd.CParameter.checksumFlag, 0);
    cctx.setParameter(zstd.CParameter.contentSizeFlag, 1);
    cctxLevel = level;
  }
  return cctx;
}

/** zstd of `raw` into the scratch buffer, or -1 when it would not save 1/32 ("too small"). */
function compressToScratch(raw: Buffer, level: number, keep: number): number {
  const c = compressCtx(level);
  if (!scratch || scratch.length < keep) scratch = Buffer.allocUnsafeSlow(Math.max(keep, 256 * 1024));
  try {
    return c.compress2(scratch.subarray(0, keep), raw);
  } catch (e) {
    if (/too small/i.test((e as Error).message)) return -1;
    throw e;
  }
}

/**
 * Compress one chunk; falls back to raw when zstd does not save at least 1/32 of the size.
 *
 * zstd writes into a reused scratch buffer only as large as the largest output we would keep, so
 * incompressible data fails fast ("destination too small") without allocating and page-faulting a
 * fresh compress-bound buffer per chunk (measured: ~10x less CPU per random chunk, bench/README.md).
 * A raw result is `raw` itself (no copy); a compressed result is a fresh exact-size Buffer that owns
 * its whole ArrayBuffer (offset 0), so a worker can transfer it.
 *
 * A chunk longer than `frameSize` is written as frames (codec 2); `hash` is its BLAKE3 (computed
 * here when not given), which the frame table is bound to. `frameSize` 0 writes one zstd frame
 * (codec 1, what repository formats 1-2 hold). `rawFrames` (repository format 6, plain): a chunk
 * of more than one frame that does not compress is written as frames that are all raw (its bytes
 * behind a frame table) instead of codec 0, so a random read of it reads and hashes one frame.
 */
export function encodeChunk(
  raw: Buffer,
  level: number,
  hash?: Buffer,
  frameSize = DEFAULT_FRAME_SIZE,
  rawFrames = false,
): Encoded {
  const e = encodeChunkParts(raw, level, hash, frameSize, rawFrames);
  return e.tail ? { codec: e.codec, data: Buffer.concat([e.data, e.tail]) } : e;
}

/** `encodeChunk`, with raw frames as table + the raw chunk (`EncodedParts`): what writers use. */
export function encodeChunkParts(
  raw: Buffer,
  level: number,
  hash?: Buffer,
  frameSize = DEFAULT_FRAME_SIZE,
  rawFrames = false,
): EncodedParts {
  const keep = keepLimit(raw.length);
  if (keep <= 0) return { codec: CODEC_RAW, data: raw };
  if (frameSize > 0 && raw.length > frameSize)
    return encodeFrames(raw, level, hash ?? hashChunk(raw), frameSize, rawFrames);
  const n = compressToScratch(raw, level, keep);
  if (n < 0) return { codec: CODEC_RAW, data: raw };
  const out = Buffer.allocUnsafeSlow(n);
  scratch!.copy(out, 0, 0, n);
  return { codec: CODEC_ZSTD, data: out };
}

// ---------------------------------------------------------------------------------------------
// Frames (codec 2). Stored bytes, integers big-endian:
//   shift u8 | reserved u8 (0) | count u16 | entry * count | table_sum[16] | frame bytes ...
//   entry := stored_len u32 | kind u8 (0 raw, 1 zstd) | frame_hash[16]
// frame i holds raw bytes [i << shift, min(raw_len, (i + 1) << shift)); frame_hash = BLAKE3 of them
// (first 16 bytes); table_sum = BLAKE3("bkfs-frames-v1\n" | chunk hash | raw_len u32 | header and
// entries) (first 16 bytes). The frames' stored bytes follow in order, without gaps.

const FRAME_HEADER_LEN = 4;
const FRAME_ENTRY_LEN = 21;
const FRAME_SUM_LEN = 16;
const MIN_FRAME_SHIFT = 12;
const MAX_FRAME_SHIFT = 20;
const TABLE_DOMAIN = Buffer.from('bkfs-frames-v1\n');

export interface FrameEntry {
  rawOff: number;
  rawLen: number;
  /** Offset of the frame's stored bytes from the start of the chunk's stored bytes. */
  storedOff: number;
  storedLen: number;
  kind: number;
  hash: Buffer;
}

export interface FrameTable {
  shift: number;
  rawLen: number;
  /** Bytes of header, entries and table sum (the first frame's stored bytes start here). */
  tableLen: number;
  frames: FrameEntry[];
}

function tableLenFor(count: number): number {
  return FRAME_HEADER_LEN + count * FRAME_ENTRY_LEN + FRAME_SUM_LEN;
}

function tableSum(chunkHash: Buffer, rawLen: number, headerAndEntries: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(rawLen);
  return blake3(Buffer.concat([TABLE_DOMAIN, chunkHash, len, headerAndEntries])).subarray(0, FRAME_SUM_LEN);
}

function frameHash(raw: Buffer): Buffer {
  return hashChunk(raw).subarray(0, FRAME_SUM_LEN);
}

/**
 * Whether zstd saves 1/32 on the whole of `raw` (written into the reused `scratch`, thrown away).
 * On incompressible data it fails at its first 128 KiB block, so a random 256 KiB chunk costs
 * about one 32 KiB frame's attempt.
 */
function wholeChunkShrinks(c: zstd.CCtx, raw: Buffer, keep: number): boolean {
  if (!scratch || scratch.length < keep) scratch = Buffer.allocUnsafeSlow(Math.max(keep, 256 * 1024));
  try {
    c.compress2(scratch.subarray(0, keep), raw);
    return true;
  } catch (e) {
    if (/too small/i.test((e as Error).message)) return false;
    throw e;
  }
}

/** Reused output of encodeFrames (one per thread): the table and frames are built here, then copied once. */
let framesScratch: Buffer | undefined;

/**
 * Frames are compressed straight into a reused buffer capped at the largest result worth keeping,
 * so a chunk that ends up raw (random data) allocates nothing, and a compressed one is copied once
 * into its exact-size result (bench/README.md, "Third session").
 */
function encodeFrames(
  raw: Buffer,
  level: number,
  hash: Buffer,
  frameSize: number,
  rawFrames: boolean,
): EncodedParts {
  let shift = MIN_FRAME_SHIFT;
  while (shift < MAX_FRAME_SHIFT && 1 << shift < frameSize) shift++;
  const size = 1 << shift;
  const count = Math.ceil(raw.length / size);
  const tableLen = tableLenFor(count);
  const keep = keepLimit(raw.length);
  if (tableLen >= keep || count > 0xffff) return { codec: CODEC_RAW, data: raw };
  const stored = (): EncodedParts =>
    rawFrames && raw.length + tableLen <= MAX_CHUNK_LEN
      ? encodeRawFrames(raw, hash, shift, count)
      : { codec: CODEC_RAW, data: raw };
  if (!framesScratch || framesScratch.length < keep) {
    framesScratch = Buffer.allocUnsafeSlow(Math.max(keep, 256 * 1024));
  }
  const out = framesScratch;
  out.writeUInt8(shift, 0);
  out.writeUInt8(0, 1);
  out.writeUInt16BE(count, 2);
  let pos = tableLen;
  const c = compressCtx(level);
  for (let i = 0; i < count; i++) {
    const piece = raw.subarray(i * size, Math.min(raw.length, (i + 1) * size));
    // At most what the frame may take to be worth compressing, and never past `keep`.
    const cap = Math.min(keepLimit(piece.length), keep - pos);
    let n = -1;
    if (cap > 0) {
      try {
        n = c.compress2(out.subarray(pos, pos + cap), piece);
      } catch (e) {
        if (!/too small/i.test((e as Error).message)) throw e;
      }
    }
    if (i === 0 && n < 0 && count > 1 && !wholeChunkShrinks(c, raw, keep)) {
      // The first frame did not shrink, and zstd over the whole chunk does not either (one call
      // that fails fast on incompressible data, ~6x cheaper than trying every frame): store raw.
      return stored();
    }
    const len = n < 0 ? piece.length : n;
    if (pos + len > keep) return stored(); // frames do not save 1/32 overall
    if (n < 0) piece.copy(out, pos);
    const e = FRAME_HEADER_LEN + i * FRAME_ENTRY_LEN;
    out.writeUInt32BE(len, e);
    out.writeUInt8(n < 0 ? 0 : 1, e + 4);
    frameHash(piece).copy(out, e + 5);
    pos += len;
  }
  tableSum(hash, raw.length, out.subarray(0, tableLen - FRAME_SUM_LEN)).copy(out, tableLen - FRAME_SUM_LEN);
  const data = Buffer.allocUnsafeSlow(pos);
  out.copy(data, 0, 0, pos);
  return { codec: CODEC_FRAMES, data };
}

/**
 * A frames record whose frames are all raw (kind 0; repository format 6): the table (`data`), then
 * the chunk's raw bytes (`tail`, the caller's buffer: not copied). Costs one BLAKE3 pass over the
 * chunk (the frame hashes); its stored length is the raw length plus the table (~190 bytes for
 * 256 KiB in 32 KiB frames).
 */
function encodeRawFrames(raw: Buffer, hash: Buffer, shift: number, count: number): EncodedParts {
  const tableLen = tableLenFor(count);
  const data = Buffer.allocUnsafeSlow(tableLen);
  data.writeUInt8(shift, 0);
  data.writeUInt8(0, 1);
  data.writeUInt16BE(count, 2);
  const size = 1 << shift;
  for (let i = 0; i < count; i++) {
    const piece = raw.subarray(i * size, Math.min(raw.length, (i + 1) * size));
    const e = FRAME_HEADER_LEN + i * FRAME_ENTRY_LEN;
    data.writeUInt32BE(piece.length, e);
    data.writeUInt8(0, e + 4);
    frameHash(piece).copy(data, e + 5);
  }
  tableSum(hash, raw.length, data.subarray(0, tableLen - FRAME_SUM_LEN)).copy(data, tableLen - FRAME_SUM_LEN);
  return { codec: CODEC_FRAMES, data, tail: raw };
}

/** Whether a codec-2 record holds its chunk's bytes uncompressed (all frames raw, format 6). */
export function isRawFrames(codec: number, storedLen: number, rawLen: number): boolean {
  return codec === CODEC_FRAMES && storedLen > rawLen;
}

/**
 * How many leading stored bytes of a codec-2 chunk surely hold its frame table (for the smallest
 * frame size a table may declare): read this much, then `parseFrameTable`.
 */
export function frameTablePrefixLen(rawLen: number, storedLen: number): number {
  return Math.min(storedLen, tableLenFor(Math.ceil(rawLen / (1 << MIN_FRAME_SHIFT))));
}

/**
 * Parse and check the frame table at the start of a codec-2 chunk's stored bytes (`prefix` may be
 * longer). Throws DATA_DAMAGED unless every field is possible for a chunk of `rawLen` raw and
 * `storedLen` stored bytes and (when `chunkHash` is given) the table sum matches: a bad table never
 * sends a reader to other bytes.
 */
export function parseFrameTable(
  prefix: Buffer,
  rawLen: number,
  storedLen: number,
  chunkHash?: Buffer,
): FrameTable {
  const bad = (why: string): BkfsError =>
    new BkfsError('DATA_DAMAGED', `chunk frame table is damaged: ${why}`);
  if (!Number.isSafeInteger(rawLen) || rawLen <= 0 || rawLen > MAX_CHUNK_LEN)
    throw bad(`raw length ${rawLen}`);
  if (prefix.length < FRAME_HEADER_LEN) throw bad('too short');
  const shift = prefix.readUInt8(0);
  const count = prefix.readUInt16BE(2);
  if (shift < MIN_FRAME_SHIFT || shift > MAX_FRAME_SHIFT || prefix.readUInt8(1) !== 0) {
    throw bad(`frame size 2^${shift}`);
  }
  const size = 1 << shift;
  if (count !== Math.ceil(rawLen / size)) throw bad(`${count} frames for ${rawLen} bytes of 2^${shift}`);
  const tableLen = tableLenFor(count);
  if (prefix.length < tableLen || tableLen > storedLen) throw bad('truncated');
  if (chunkHash) {
    const want = tableSum(chunkHash, rawLen, prefix.subarray(0, tableLen - FRAME_SUM_LEN));
    if (!want.equals(prefix.subarray(tableLen - FRAME_SUM_LEN, tableLen)))
      throw bad('table checksum mismatch');
  }
  const frames: FrameEntry[] = [];
  let pos = tableLen;
  for (let i = 0; i < count; i++) {
    const e = FRAME_HEADER_LEN + i * FRAME_ENTRY_LEN;
    const rawOff = i * size;
    const fRaw = Math.min(rawLen, rawOff + size) - rawOff;
    const sLen = prefix.readUInt32BE(e);
    const kind = prefix.readUInt8(e + 4);
    if (kind > 1 || sLen <= 0 || (kind === 0 ? sLen !== fRaw : sLen >= fRaw)) {
      throw bad(`frame ${i} has kind ${kind} and ${sLen} stored bytes for ${fRaw}`);
    }
    frames.push({
      rawOff,
      rawLen: fRaw,
      storedOff: pos,
      storedLen: sLen,
      kind,
      hash: Buffer.from(prefix.subarray(e + 5, e + 5 + FRAME_SUM_LEN)),
    });
    pos += sLen;
  }
  if (pos !== storedLen) throw bad(`frames end at ${pos}, the chunk at ${storedLen}`);
  return { shift, rawLen, tableLen, frames };
}

/** Decode one frame from its stored bytes and check it against the table's frame hash. */
export function decodeFrame(f: FrameEntry, stored: Buffer): Buffer {
  if (stored.length !== f.storedLen) {
    throw new BkfsError(
      'DATA_DAMAGED',
      `chunk frame has ${stored.length} stored bytes, expected ${f.storedLen}`,
    );
  }
  const raw = f.kind === 0 ? stored : decompressBounded(stored, f.rawLen);
  if (!frameHash(raw).equals(f.hash)) throw new BkfsError('DATA_DAMAGED', 'chunk frame hash mismatch');
  return raw;
}

/** `decodeFrame` into `out` (exactly the frame's raw length; e.g. a cache slot): no allocation. */
export function decodeFrameInto(f: FrameEntry, stored: Buffer, out: Buffer): void {
  if (stored.length !== f.storedLen || out.length !== f.rawLen) {
    throw new BkfsError(
      'DATA_DAMAGED',
      `chunk frame has ${stored.length} stored bytes, expected ${f.storedLen}`,
    );
  }
  if (f.kind === 0) stored.copy(out);
  else decompressInto(stored, out);
  if (!frameHash(out).equals(f.hash)) throw new BkfsError('DATA_DAMAGED', 'chunk frame hash mismatch');
}

/**
 * Every frame of a codec-2 chunk, decoded into one buffer (hashes: the caller checks the chunk's).
 * Raw frames (format 6) are returned as a view of `stored` after the table, without a copy.
 */
function decodeAllFrames(stored: Buffer, rawLen: number, chunkHash?: Buffer): Buffer {
  const t = parseFrameTable(stored, rawLen, stored.length, chunkHash);
  const allRaw = t.frames.every((f) => f.kind === 0);
  const out = allRaw ? stored.subarray(t.tableLen, t.tableLen + rawLen) : Buffer.allocUnsafe(rawLen);
  if (!allRaw)
    for (const f of t.frames) {
      const src = stored.subarray(f.storedOff, f.storedOff + f.storedLen);
      if (f.kind === 0) src.copy(out, f.rawOff);
      else decompressInto(src, out.subarray(f.rawOff, f.rawOff + f.rawLen));
    }
  if (!chunkHash)
    for (const f of t.frames) {
      if (!frameHash(out.subarray(f.rawOff, f.rawOff + f.rawLen)).equals(f.hash)) {
        throw new BkfsError('DATA_DAMAGED', 'chunk frame hash mismatch');
      }
    }
  return out;
}

/**
 * Decode a stored chunk and check it against its expected hash and length. Throws
 * BkfsError('DATA_DAMAGED') on any mismatch: callers turn that into EIO, never into wrong bytes.
 *
 * Memory and time are bounded whatever the stored bytes say: `rawLen` (from the index or a pack
 * record) must be at most `maxRawLen` (the repository's chunk size, or MAX_CHUNK_LEN); a zstd frame
 * must declare exactly `rawLen` bytes in its header and is decompressed into a buffer of that size,
 * so a frame that would decompress past it fails instead of growing (no zstd "bomb").
 */
export function decodeChunk(
  stored: Buffer,
  codec: number,
  rawLen: number,
  expectedHash?: Buffer,
  maxRawLen = MAX_CHUNK_LEN,
  hashFn: (b: Buffer) => Buffer = hashChunk,
): Buffer {
  if (!Number.isSafeInteger(rawLen) || rawLen < 0 || rawLen > Math.min(maxRawLen, MAX_CHUNK_LEN)) {
    throw new BkfsError('DATA_DAMAGED', `chunk claims ${rawLen} bytes, more than a chunk can hold`);
  }
  let raw: Buffer;
  if (codec === CODEC_RAW) {
    raw = stored;
  } else if (codec === CODEC_ZSTD) {
    raw = decompressBounded(stored, rawLen);
  } else if (codec === CODEC_FRAMES) {
    raw = decodeAllFrames(stored, rawLen, expectedHash);
  } else {
    throw new BkfsError('DATA_DAMAGED', `chunk has unknown codec ${codec}`);
  }
  if (raw.length !== rawLen) {
    throw new BkfsError('DATA_DAMAGED', `chunk decodes to ${raw.length} bytes, expected ${rawLen}`);
  }
  if (expectedHash && !hashFn(raw).equals(expectedHash)) {
    throw new BkfsError('DATA_DAMAGED', 'chunk hash mismatch');
  }
  return raw;
}

/** What `decodeStored` needs of a repository's cipher (`src/crypto/cipher.ts`). */
export interface ChunkOpener {
  openChunk(id: Buffer, sealed: Buffer): Buffer;
  chunkHash(plain: Buffer): Buffer;
}

/**
 * A record's stored bytes as read from a pack, to the checked raw chunk: in an encrypted
 * repository (`cipher` given) the seal is opened first (bound to the chunk id: a changed or moved
 * record is DATA_DAMAGED) and the id checked as a keyed hash; in a plain one, `decodeChunk`.
 */
export function decodeStored(
  cipher: ChunkOpener | null,
  stored: Buffer,
  codec: number,
  rawLen: number,
  hash: Buffer,
  maxRawLen = MAX_CHUNK_LEN,
): Buffer {
  if (!cipher) return decodeChunk(stored, codec, rawLen, hash, maxRawLen);
  const inner = cipher.openChunk(hash, stored);
  return decodeChunk(inner, codec, rawLen, hash, maxRawLen, (b) => cipher.chunkHash(b));
}

/** Decompress zstd data that must hold exactly `rawLen` bytes, never allocating more. */
function decompressBounded(stored: Buffer, rawLen: number): Buffer {
  const out = Buffer.allocUnsafe(rawLen);
  decompressInto(stored, out);
  return out;
}

/** Decompress one zstd frame into exactly `out.length` bytes; anything else is DATA_DAMAGED. */
function decompressInto(stored: Buffer, out: Buffer): void {
  const rawLen = out.length;
  let declared: number | null;
  try {
    declared = zstd.getFrameContentSize(stored);
  } catch (e) {
    throw new BkfsError('DATA_DAMAGED', `chunk cannot be decompressed: ${(e as Error).message}`);
  }
  if (declared !== null && declared !== rawLen) {
    throw new BkfsError('DATA_DAMAGED', `chunk's zstd frame declares ${declared} bytes, expected ${rawLen}`);
  }
  let n: number;
  try {
    dctx ??= new zstd.DCtx();
    n = dctx.decompress(out, stored);
  } catch (e) {
    dctx = undefined; // a context that failed mid-frame is not reused
    throw new BkfsError('DATA_DAMAGED', `chunk cannot be decompressed: ${(e as Error).message}`);
  }
  if (n !== rawLen) {
    throw new BkfsError('DATA_DAMAGED', `chunk decodes to ${n} bytes, expected ${rawLen}`);
  }
}

const ZERO = Buffer.alloc(4 << 20);

/** True when every byte is zero (memcmp against a static zero page). */
export function isZero(buf: Buffer): boolean {
  for (let off = 0; off < buf.length; off += ZERO.length) {
    const end = Math.min(buf.length, off + ZERO.length);
    if (!buf.subarray(off, end).equals(ZERO.subarray(0, end - off))) return false;
  }
  return true;
}
