/**
 * Pack files: the repository's chunk store.
 *
 * Chunks are appended to pack files of about `PACK_TARGET` bytes instead of one file per chunk: one
 * fsync per pack instead of per chunk, few open files when reading, and packs that describe
 * themselves (every record carries its hash and lengths), so the SQLite index can be rebuilt from
 * the packs alone. The byte layout is documented in `FORMAT.md` beside this file.
 *
 * Writing (one writer at a time, guarded by the repository lock): records go to
 * `tmp/<name>.pack.tmp`; `seal()` fsyncs the file, renames it to `packs/<nn>/<name>.pack` and fsyncs
 * that directory. Only then does the caller insert the pack's chunk rows into the index, so an
 * indexed chunk is always durable. A crash leaves at worst an unreferenced temp file or pack, which
 * `gc` removes.
 *
 * Reading: `PackReader` keeps a small LRU of open file descriptors and reads a record's stored bytes
 * with one positioned read. Memory: the writer copies nothing; it holds the callers' buffers of
 * the records appended while a write is in flight (they go out in one `writev`) until written;
 * the reader holds at most `maxOpen` descriptors.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { blakeHash } from '../crypto/blake';
import { BkfsError } from '../errors';
import { CODEC_FRAMES, CODEC_RAW, CODEC_ZSTD, HASH_LEN, MAX_CHUNK_LEN, maxFrameTableLen } from './hash-len';
import { mkdirPrivate, openPrivate, repoModes } from '../util/private-fs';
import { holdLease, packKey, remoteStore } from './location';
import type { RemotePacks } from './remote-packs';
import type { Cipher } from '../crypto/cipher';
import { SEAL_OVERHEAD, SealKind } from '../crypto/seal';
import { registeredCipher } from '../crypto/keyring';

/** Pack header flag (format 5): every record's stored bytes are sealed (FORMAT.md, "Encryption"). */
export const PACK_FLAG_SEALED = 1;

export const PACK_MAGIC = Buffer.from('BKFSPACK', 'ascii');
/** Version of packs written without a trailer (local repositories). */
export const PACK_VERSION = 1;
/** Version of packs with a trailer index (written to object storage; FORMAT.md "Pack trailer"). */
export const PACK_VERSION_TRAILER = 2;
/**
 * Version of packs with a sealed trailer (encrypted repositories on object storage; FORMAT.md
 * "Sealed pack trailer (pack version 3)").
 */
export const PACK_VERSION_SEALED_TRAILER = 3;
export const TRAILER_MAGIC = Buffer.from('BKPKTRLR', 'ascii');
/** Footer: count u32 | records_end u64 | trailer_sum[16] | magic[8]. */
export const TRAILER_FOOTER_LEN = 4 + 8 + 16 + 8;
export const SEALED_TRAILER_MAGIC = Buffer.from('BKPKTRLS', 'ascii');
/** Footer of a sealed trailer: sealed_len u32 | records_end u64 | magic[8]. */
export const SEALED_TRAILER_FOOTER_LEN = 4 + 8 + 8;

/** The seal context of the trailer of pack `name`: a trailer moved to another pack does not open. */
function trailerContext(name: string): string {
  return `pack-trailer ${name}`;
}

/** What seals (writing) or opens (reading) the trailer of one pack of an encrypted repository. */
export interface TrailerKey {
  cipher: Cipher;
  pack: string;
}
export const PACK_HEADER_LEN = 16;
export const RECORD_MAGIC = Buffer.from('BKCH', 'ascii');
export const RECORD_HEADER_LEN = 4 + 4 + 4 + 4 + HASH_LEN; // 48
export const PACK_TARGET = 64 << 20;

export function packPath(repoDir: string, name: string): string {
  return path.join(repoDir, 'packs', name.slice(0, 2), `${name}.pack`);
}

export function encodePackHeader(sealed = false, version = PACK_VERSION): Buffer {
  const h = Buffer.alloc(PACK_HEADER_LEN);
  PACK_MAGIC.copy(h, 0);
  h.writeUInt32BE(version, 8);
  h.writeUInt32BE(sealed ? PACK_FLAG_SEALED : 0, 12);
  return h;
}

export interface RecordHeader {
  codec: number;
  rawLen: number;
  storedLen: number;
  hash: Buffer;
}

export function encodeRecordHeader(r: RecordHeader): Buffer {
  const h = Buffer.alloc(RECORD_HEADER_LEN);
  RECORD_MAGIC.copy(h, 0);
  h.writeUInt8(r.codec, 4);
  h.writeUInt32BE(r.rawLen, 8);
  h.writeUInt32BE(r.storedLen, 12);
  r.hash.copy(h, 16);
  return h;
}

function trailerSum(entries: Buffer, count: number, recordsEnd: number): Buffer {
  const n = Buffer.alloc(12);
  n.writeUInt32BE(count, 0);
  n.writeBigUInt64BE(BigInt(recordsEnd), 4);
  return blakeHash()
    .blake3(Buffer.concat([Buffer.from('bkfs-pack-trailer-v1\n'), n, entries]))
    .subarray(0, 16);
}

/**
 * The trailer of a version-2 pack (FORMAT.md, "Pack trailer"): every record header again, in
 * pack order, then a footer, so that an index rebuild reads the tail of a pack object (one ranged
 * GET) instead of the whole pack. The one function that encodes it (and `decodePackTrailer` the
 * one that reads it). With `key` (an encrypted repository, pack version 3) that trailer is sealed
 * as kind 5 bound to the pack's name, followed by a clear 20-byte footer (FORMAT.md, "Sealed pack
 * trailer").
 */
export function encodePackTrailer(records: RecordHeader[], recordsEnd: number, key?: TrailerKey): Buffer {
  const entries = Buffer.concat(records.map((r) => encodeRecordHeader(r)));
  const f = Buffer.alloc(TRAILER_FOOTER_LEN);
  f.writeUInt32BE(records.length, 0);
  f.writeBigUInt64BE(BigInt(recordsEnd), 4);
  trailerSum(entries, records.length, recordsEnd).copy(f, 12);
  TRAILER_MAGIC.copy(f, 28);
  const plain = Buffer.concat([entries, f]);
  if (!key) return plain;
  const sealed = key.cipher.seal(SealKind.PackTrailer, trailerContext(key.pack), plain);
  const sf = Buffer.alloc(SEALED_TRAILER_FOOTER_LEN);
  sf.writeUInt32BE(sealed.length, 0);
  sf.writeBigUInt64BE(BigInt(recordsEnd), 4);
  SEALED_TRAILER_MAGIC.copy(sf, 12);
  return Buffer.concat([sealed, sf]);
}

/** Which trailer a repository's new packs carry (`PackWriter.create`): none locally. */
export type TrailerKind = 'none' | 'plain' | 'sealed';

export function trailerKindOf(remote: boolean, encrypted: boolean): TrailerKind {
  return !remote ? 'none' : encrypted ? 'sealed' : 'plain';
}

/**
 * Bytes of the trailer of a pack of `records` records: one entry per record plus the footer (and
 * the seal and the clear footer when sealed), 0 without a trailer. gc and stats count the entries
 * of live records and the footer as live, so a bucket pack is not taken for one with unused bytes
 * because of its trailer (which `--max-unused 0` would rewrite at every gc).
 */
export function trailerBytesFor(records: number, kind: TrailerKind): number {
  if (kind === 'none') return 0;
  const plain = records * trailerEntryLen(kind) + TRAILER_FOOTER_LEN;
  return kind === 'plain' ? plain : plain + SEAL_OVERHEAD + SEALED_TRAILER_FOOTER_LEN;
}

/** Bytes one record adds to its pack's trailer: its header again (0 without a trailer). */
export function trailerEntryLen(kind: TrailerKind): number {
  return kind === 'none' ? 0 : RECORD_HEADER_LEN;
}

/**
 * Length of the trailer a footer announces (entries + footer, or sealed trailer + footer), or
 * null if `footer` is not one. `sealed`: a version-3 trailer (its clear `recordsEnd` is only a
 * hint until the trailer opens).
 */
export function trailerLength(
  footer: Buffer,
  packSize: number,
): { length: number; recordsEnd: number; sealed: boolean } | null {
  if (footer.length >= SEALED_TRAILER_FOOTER_LEN) {
    const sf = footer.subarray(footer.length - SEALED_TRAILER_FOOTER_LEN);
    if (sf.subarray(12).equals(SEALED_TRAILER_MAGIC)) {
      const sealedLen = sf.readUInt32BE(0);
      const recordsEnd = Number(sf.readBigUInt64BE(4));
      const length = sealedLen + SEALED_TRAILER_FOOTER_LEN;
      if (
        sealedLen < SEAL_OVERHEAD + TRAILER_FOOTER_LEN ||
        recordsEnd < PACK_HEADER_LEN ||
        recordsEnd + length !== packSize
      )
        return null;
      return { length, recordsEnd, sealed: true };
    }
  }
  if (footer.length < TRAILER_FOOTER_LEN) return null;
  const f = footer.subarray(footer.length - TRAILER_FOOTER_LEN);
  if (!f.subarray(28).equals(TRAILER_MAGIC)) return null;
  const count = f.readUInt32BE(0);
  const recordsEnd = Number(f.readBigUInt64BE(4));
  const length = count * RECORD_HEADER_LEN + TRAILER_FOOTER_LEN;
  if (recordsEnd < PACK_HEADER_LEN || recordsEnd + length !== packSize) return null;
  return { length, recordsEnd, sealed: false };
}

/**
 * Decode a trailer (entries + footer, as stored at the end of a pack of `packSize` bytes): the
 * chunks with their offsets. DATA_DAMAGED when its sum or any entry is wrong, or the records it
 * describes do not end where it says. A sealed trailer (version 3) is opened with `key` first:
 * DATA_DAMAGED too when it was changed, belongs to another pack, or there is no key; in an
 * encrypted repository (`key` given) a plain trailer is accepted only when `allowPlain` (the
 * pack's header says version 2, written before sealed trailers).
 */
export function decodePackTrailer(
  t: Buffer,
  packSize: number,
  chunkSize = MAX_CHUNK_LEN,
  key?: TrailerKey,
  allowPlain = true,
): PackedChunk[] {
  const tl = trailerLength(t, packSize);
  if (!tl || tl.length !== t.length) throw new BkfsError('DATA_DAMAGED', 'pack trailer has a bad footer');
  if (tl.sealed) {
    if (!key) throw new BkfsError('DATA_DAMAGED', 'pack trailer is sealed and no key was given');
    const plain = key.cipher.open(
      SealKind.PackTrailer,
      trailerContext(key.pack),
      t.subarray(0, t.length - SEALED_TRAILER_FOOTER_LEN),
      `pack ${key.pack} trailer`,
    );
    // The sealed trailer is a version-2 trailer whose records end where the clear footer says.
    const inner = trailerLength(plain, tl.recordsEnd + plain.length);
    if (!inner || inner.sealed || inner.length !== plain.length) {
      throw new BkfsError('DATA_DAMAGED', 'sealed pack trailer has a bad footer inside');
    }
    return decodePlainTrailer(plain, inner.recordsEnd, chunkSize, true);
  }
  if (key && !allowPlain) {
    throw new BkfsError('DATA_DAMAGED', 'pack trailer is not sealed in an encrypted repository');
  }
  // The records of an encrypted repository's packs are sealed (their stored_len counts the seal).
  return decodePlainTrailer(t, tl.recordsEnd, chunkSize, key !== undefined);
}

function decodePlainTrailer(
  t: Buffer,
  recordsEnd: number,
  chunkSize: number,
  sealedRecords: boolean,
): PackedChunk[] {
  const tl = { recordsEnd };
  const count = (t.length - TRAILER_FOOTER_LEN) / RECORD_HEADER_LEN;
  const entries = t.subarray(0, t.length - TRAILER_FOOTER_LEN);
  if (
    !trailerSum(entries, count, tl.recordsEnd).equals(
      t.subarray(t.length - TRAILER_FOOTER_LEN + 12, t.length - 8),
    )
  ) {
    throw new BkfsError('DATA_DAMAGED', 'pack trailer does not match its sum');
  }
  const out: PackedChunk[] = [];
  let pos = PACK_HEADER_LEN;
  for (let i = 0; i < count; i++) {
    const h = decodeRecordHeader(
      entries.subarray(i * RECORD_HEADER_LEN, (i + 1) * RECORD_HEADER_LEN),
      chunkSize,
      sealedRecords,
    );
    out.push({ ...h, offset: pos + RECORD_HEADER_LEN });
    pos += RECORD_HEADER_LEN + h.storedLen;
  }
  if (pos !== tl.recordsEnd) throw new BkfsError('DATA_DAMAGED', 'pack trailer does not describe the pack');
  return out;
}

/**
 * Decode a record header and check that its lengths are possible for a repository whose chunks
 * are at most `chunkSize` bytes: 0 < raw_len <= chunkSize, a raw record stores exactly raw_len
 * bytes, a zstd record fewer. A header that lies (a stored_len of 4 GiB) is refused here, before
 * anything is allocated or read for it.
 */
export function decodeRecordHeader(h: Buffer, chunkSize = MAX_CHUNK_LEN, sealed = false): RecordHeader {
  if (h.length < RECORD_HEADER_LEN || !h.subarray(0, 4).equals(RECORD_MAGIC)) {
    throw new BkfsError('DATA_DAMAGED', 'pack record header has a bad magic');
  }
  const r: RecordHeader = {
    codec: h.readUInt8(4),
    rawLen: h.readUInt32BE(8),
    storedLen: h.readUInt32BE(12),
    hash: Buffer.from(h.subarray(16, 16 + HASH_LEN)),
  };
  checkRecordLengths(r, chunkSize, sealed);
  return r;
}

/**
 * Throws DATA_DAMAGED unless the record's codec and lengths are possible (see decodeRecordHeader).
 * `sealed` (encrypted repositories): `storedLen` counts the seal's overhead, the rules apply to
 * the codec's bytes inside it.
 */
export function checkRecordLengths(
  rec: Omit<RecordHeader, 'hash'>,
  chunkSize = MAX_CHUNK_LEN,
  sealed = false,
): void {
  const max = Math.min(chunkSize, MAX_CHUNK_LEN);
  const r = sealed ? { ...rec, storedLen: rec.storedLen - SEAL_OVERHEAD } : rec;
  const ok =
    (r.codec === CODEC_RAW || r.codec === CODEC_ZSTD || r.codec === CODEC_FRAMES) &&
    Number.isSafeInteger(r.rawLen) &&
    Number.isSafeInteger(r.storedLen) &&
    r.rawLen > 0 &&
    r.rawLen <= max &&
    r.storedLen > 0 &&
    r.storedLen <= MAX_CHUNK_LEN &&
    (r.codec === CODEC_RAW
      ? r.storedLen === r.rawLen
      : r.codec === CODEC_ZSTD
        ? r.storedLen < r.rawLen
        : r.storedLen <= r.rawLen + maxFrameTableLen(r.rawLen)); // frames: raw frames (format 6) add a table
  if (!ok) {
    throw new BkfsError(
      'DATA_DAMAGED',
      `pack record has impossible lengths (codec ${r.codec}, raw ${r.rawLen}, stored ${r.storedLen}, chunk size ${max})`,
    );
  }
}

/** A chunk placed in a pack: where its stored bytes start and how long they are. */
export interface PackedChunk extends RecordHeader {
  offset: number; // offset of the stored bytes (after the record header)
}

/** `crashPoint` of repository.ts (not imported: packs.ts is below it); FORMAT.md "Crash points". */
function testCrashPoint(step: string): void {
  if (process.env.BKFS_TEST_CRASH_AT === step) process.kill(process.pid, 'SIGKILL');
}

/** Buffers in one writev (IOV_MAX is 1024 on Linux; two buffers per record). */
const MAX_IOV = 1024;

export class PackWriter {
  readonly name: string;
  private readonly tmpPath: string;
  private fh: fsp.FileHandle | undefined;
  /** End of the placed records (the pack's size once every queued write is done). */
  private pos = 0;
  /** Buffers placed but not yet handed to writev, starting at file offset `queuedAt`. */
  private queue: Buffer[] = [];
  private queuedAt = 0;
  /** Bytes [0, written) are in the file. */
  private written = 0;
  private flushing: Promise<void> | null = null;
  private writeError: unknown;
  private waiters: { end: number; resolve: () => void; reject: (e: unknown) => void }[] = [];
  readonly chunks: PackedChunk[] = [];
  private trailer = false;
  /** Encrypted repository on object storage: the trailer is sealed with this (pack version 3). */
  private trailerCipher: Cipher | null = null;
  /** Bytes of the trailer written at seal (0 for version-1 packs). */
  trailerBytes = 0;

  private constructor(
    private readonly repoDir: string,
    name: string,
    tmpSubdir: string,
  ) {
    this.name = name;
    this.tmpPath = path.join(repoDir, tmpSubdir, `${name}.pack.tmp`);
  }

  /**
   * Start a pack. `tmpSubdir` (relative to the repository): the writer's own temp directory,
   * `tmp/<session>` (format 3: another writer's cleanup never removes a live writer's temp packs);
   * default `tmp`. Names are 128 random bits: concurrent writers never collide.
   */
  static async create(repoDir: string, tmpSubdir = 'tmp', sealed = false): Promise<PackWriter> {
    const w = new PackWriter(repoDir, randomBytes(16).toString('hex'), tmpSubdir);
    w.fh = await openPrivate(w.tmpPath, 'wx', repoModes(repoDir).file);
    // Packs for object storage carry a trailer (version 2; sealed in an encrypted repository,
    // version 3); local packs stay version 1.
    w.trailer = remoteStore(repoDir) !== null;
    if (w.trailer && sealed) {
      const c = registeredCipher(repoDir);
      if (!c) {
        await w.abort();
        throw new Error(`no key registered for the encrypted repository ${repoDir}`);
      }
      w.trailerCipher = c;
    }
    const version = !w.trailer
      ? PACK_VERSION
      : w.trailerCipher
        ? PACK_VERSION_SEALED_TRAILER
        : PACK_VERSION_TRAILER;
    const h = encodePackHeader(sealed, version);
    await w.fh.write(h, 0, h.length, 0);
    w.pos = h.length;
    w.queuedAt = h.length;
    w.written = h.length;
    return w;
  }

  /** The pack's size: its records, and after seal its trailer. */
  get size(): number {
    return this.pos + this.trailerBytes;
  }

  /**
   * Append a record. Its place in the pack is fixed at once (synchronously, in call order); the
   * bytes are written together with the records appended while an earlier write was in flight
   * (one `writev` for many records), and the promise resolves once this record's bytes are in the
   * file. `stored` (and `tail`, more stored bytes written after it: raw frames) must not change
   * until then; together they are `rec.storedLen` bytes.
   */
  append(rec: RecordHeader, stored: Buffer, tail?: Buffer): Promise<PackedChunk> {
    if (!this.fh) return Promise.reject(new Error('pack writer is closed'));
    if (this.writeError !== undefined) return Promise.reject(this.writeError);
    const len = stored.length + (tail?.length ?? 0);
    if (len !== rec.storedLen) {
      return Promise.reject(new Error(`record of ${len} stored bytes declares ${rec.storedLen}`));
    }
    const header = encodeRecordHeader(rec);
    const pc: PackedChunk = { ...rec, offset: this.pos + header.length };
    this.queue.push(header, stored);
    if (tail) this.queue.push(tail);
    this.pos += header.length + len;
    this.chunks.push(pc);
    const end = this.pos;
    const p = new Promise<PackedChunk>((resolve, reject) => {
      this.waiters.push({ end, resolve: () => resolve(pc), reject });
    });
    this.flushing ??= this.flushLoop();
    return p;
  }

  /** Write queued buffers until none are left; one writev per batch, one batch at a time. */
  private async flushLoop(): Promise<void> {
    // Let the appends of the current tick (and those that arrive while a write is in flight)
    // join one batch.
    await new Promise<void>((r) => setImmediate(r));
    try {
      while (this.queue.length > 0 && this.fh) {
        const batch = this.queue.splice(0, MAX_IOV);
        const at = this.queuedAt;
        let len = 0;
        for (const b of batch) len += b.length;
        this.queuedAt += len;
        let off = 0;
        while (off < len) {
          // writev may write less than asked (a signal, a full disk): continue where it stopped.
          const bufs = off === 0 ? batch : remainder(batch, off);
          const r = await this.fh.writev(bufs, at + off);
          if (r.bytesWritten <= 0) throw new Error(`short write to ${this.tmpPath}`);
          off += r.bytesWritten;
        }
        this.written = at + len;
        const done = this.waiters.filter((w) => w.end <= this.written);
        this.waiters = this.waiters.filter((w) => w.end > this.written);
        for (const w of done) w.resolve();
      }
    } catch (e) {
      this.writeError ??= e;
      for (const w of this.waiters.splice(0)) w.reject(e);
      this.queue = [];
    } finally {
      this.flushing = null;
    }
  }

  /** Resolves when every appended record is in the file (rejects if a write failed). */
  private async drain(): Promise<void> {
    while (this.flushing) await this.flushing;
    if (this.writeError !== undefined) throw this.writeError;
  }

  /** Make the pack durable under its final name. */
  async seal(): Promise<void> {
    if (!this.fh) throw new Error('pack writer is closed');
    await this.drain();
    if (this.trailer) {
      const t = encodePackTrailer(
        this.chunks,
        this.pos,
        this.trailerCipher ? { cipher: this.trailerCipher, pack: this.name } : undefined,
      );
      await this.fh.write(t, 0, t.length, this.pos);
      this.trailerBytes = t.length;
    }
    await this.fh.datasync();
    await this.fh.close();
    this.fh = undefined;
    const remote = remoteStore(this.repoDir);
    if (remote) {
      // Object storage: the sealed temp file is uploaded (Content-MD5 checked by the server; a
      // name is never reused, so ifAbsent) and resolves once the object is durable; only then
      // does the caller index its chunks (FORMAT.md, "Repositories on object storage").
      await holdLease(this.repoDir, remote);
      await remote.putFile(packKey(this.name), this.tmpPath, { ifAbsent: true });
      testCrashPoint('pack-after-upload');
      await fsp.rm(this.tmpPath, { force: true });
      return;
    }
    const final = packPath(this.repoDir, this.name);
    // A new packs/NN/ must be durable in packs/ too, or a power cut loses the pack with it.
    const mode = repoModes(this.repoDir).dir;
    if ((await mkdirPrivate(path.dirname(final), { recursive: true, mode })) !== undefined) {
      await fsyncDir(path.dirname(path.dirname(final)));
    }
    await fsp.rename(this.tmpPath, final);
    await fsyncDir(path.dirname(final));
  }

  /** Delete a sealed pack that nothing indexed (garbage: no fsync needed, FORMAT.md "Durability" 4). */
  async removeSealed(): Promise<void> {
    const remote = remoteStore(this.repoDir);
    if (remote) {
      await remote.delete([packKey(this.name)]);
      return;
    }
    await fsp.rm(packPath(this.repoDir, this.name), { force: true });
  }

  /** Drop an unsealed pack (on failure). */
  async abort(): Promise<void> {
    await this.drain().catch(() => undefined);
    if (this.fh) {
      await this.fh.close().catch(() => undefined);
      this.fh = undefined;
    }
    await fsp.rm(this.tmpPath, { force: true });
  }
}

/** The buffers of `bufs` from byte `skip` on (views, no copies). */
function remainder(bufs: Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of bufs) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Positioned reads of stored chunk bytes with a small LRU of open descriptors. A descriptor with
 * reads in flight is never closed by eviction.
 */
export class PackReader {
  /** The repository's cipher (set by Repository): readers open sealed records with it. */
  cipher: Cipher | null = null;
  private readonly fds = new Map<string, { fd: number; busy: number; doomed?: boolean }>();
  private inflight = 0;
  private readonly drained: (() => void)[] = [];

  constructor(
    private readonly repoDir: string,
    private readonly maxOpen = 64,
    /** Packs in a bucket (a cache directory's repository): read through the block cache. */
    readonly remote?: RemotePacks,
  ) {}

  private acquire(name: string): { fd: number; busy: number } {
    let e = this.fds.get(name);
    if (e !== undefined) {
      this.fds.delete(name);
      this.fds.set(name, e);
    } else {
      let fd: number;
      try {
        fd = fs.openSync(packPath(this.repoDir, name), 'r');
      } catch (err) {
        throw new BkfsError('DATA_DAMAGED', `pack ${name} cannot be opened: ${(err as Error).message}`);
      }
      e = { fd, busy: 0 };
      this.fds.set(name, e);
      if (this.fds.size > this.maxOpen) {
        for (const [n, old] of this.fds) {
          if (old.busy === 0 && n !== name) {
            this.fds.delete(n);
            fs.closeSync(old.fd);
            break;
          }
        }
      }
    }
    e.busy++;
    return e;
  }

  read(name: string, offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(length) || length < 0 || length > MAX_CHUNK_LEN)
      return this.impossible(name, offset, length);
    if (this.remote) return this.readRemote(name, offset, length);
    const buf = Buffer.allocUnsafe(length);
    return this.readInto(name, offset, buf).then(() => buf);
  }

  private readRemote(name: string, offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || offset < 0) return this.impossible(name, offset, length);
    this.inflight++;
    const done = (): void => {
      this.inflight--;
      if (this.inflight === 0) for (const w of this.drained.splice(0)) w();
    };
    return this.remote!.read(name, offset, length).finally(done);
  }

  /** Read exactly `target.length` bytes at `offset` of pack `name` into `target`. */
  readInto(name: string, offset: number, target: Buffer): Promise<void> {
    const length = target.length;
    if (
      !Number.isSafeInteger(offset) ||
      offset < 0 ||
      !Number.isSafeInteger(length) ||
      length < 0 ||
      length > MAX_CHUNK_LEN
    ) {
      return this.impossible(name, offset, length);
    }
    if (this.remote) {
      return this.readRemote(name, offset, length).then((b) => {
        if (b.length !== length)
          throw new BkfsError('DATA_DAMAGED', `pack ${name} is truncated at ${offset}`);
        b.copy(target);
      });
    }
    let e: { fd: number; busy: number; doomed?: boolean };
    try {
      e = this.acquire(name);
    } catch (err) {
      return Promise.reject(err);
    }
    this.inflight++;
    return new Promise((resolve, reject) => {
      fs.read(e.fd, target, 0, length, offset, (err, n) => {
        e.busy--;
        // A descriptor that close() left open for this read is closed by its last reader: closing
        // it under a read in flight could let the number be reused for another file, whose bytes
        // the read would then return.
        if (e.doomed && e.busy === 0) fs.close(e.fd, () => undefined);
        this.inflight--;
        if (this.inflight === 0) for (const w of this.drained.splice(0)) w();
        if (err) reject(new BkfsError('DATA_DAMAGED', `pack ${name}: ${err.message}`));
        else if (n !== length)
          reject(new BkfsError('DATA_DAMAGED', `pack ${name} is truncated at ${offset}`));
        else resolve();
      });
    });
  }

  /** Lengths come from the index: a damaged or hostile row must not make us allocate 4 GiB. */
  private impossible(name: string, offset: number, length: number): Promise<never> {
    return Promise.reject(
      new BkfsError(
        'DATA_DAMAGED',
        `pack ${name}: impossible chunk location (offset ${offset}, length ${length})`,
      ),
    );
  }

  /** Resolves when no read is in flight. */
  drain(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drained.push(resolve));
  }

  /**
   * A pack was deleted (gc): close its descriptor (the space of a deleted file is freed only once
   * nothing holds it open) or, on object storage, drop its blocks from the chunk cache. Not on the
   * read path.
   */
  forget(name: string): void {
    if (this.remote) {
      this.remote.dropPack(name);
      return;
    }
    const e = this.fds.get(name);
    if (!e) return;
    this.fds.delete(name);
    if (e.busy === 0) fs.closeSync(e.fd);
    else e.doomed = true;
  }

  /**
   * Close every descriptor; one with reads in flight is closed when its last read returns (those
   * reads complete normally). Later reads open the pack again.
   */
  close(): void {
    for (const e of this.fds.values()) {
      if (e.busy === 0) fs.closeSync(e.fd);
      else (e as { doomed?: boolean }).doomed = true;
    }
    this.fds.clear();
  }
}
