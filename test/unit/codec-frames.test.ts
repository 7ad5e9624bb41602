/**
 * Frames chunks (codec 2, repository format 4; src/store/codec.ts): encoding, whole and per-frame
 * decoding, and hostile stored bytes. A damaged frame table, frame or chunk decodes to the chunk's
 * bytes or fails DATA_DAMAGED, never to other bytes; a table is bound to its chunk's hash, so the
 * stored bytes of another chunk are refused. Then `ChunkLoader.copyRange` over a real pack file:
 * small ranges decode only their frames (cached per chunk and frame), big ranges the whole chunk,
 * and a damaged frame fails only the ranges that need it.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import Database from 'better-sqlite3';
import {
  CODEC_FRAMES,
  CODEC_RAW,
  CODEC_ZSTD,
  decodeChunk,
  decodeFrame,
  encodeChunk,
  frameTablePrefixLen,
  hashChunk,
  isRawFrames,
  maxFrameTableLen,
  parseFrameTable,
} from '../../src/store/codec';
import { recordForDestination } from '../../src/repo/copy';
import { ChunkLoader, type ChunkLocation } from '../../src/store/chunk-cache';
import { PackReader, PackWriter, checkRecordLengths, packPath } from '../../src/store/packs';
import { randomBuffer, textFile } from '../helpers/images';
import { Repository } from '../../src/repo/repository';
import { PLAIN_FORMAT_VERSION } from '../../src/index/schema';

const KiB = 1024;

function damaged(e: unknown): boolean {
  return (e as { code?: string }).code === 'DATA_DAMAGED';
}

/** 256 KiB: text, then random (raw frames), then zeros. */
function mixedChunk(seed: number, size = 256 * KiB): Buffer {
  const b = Buffer.alloc(size);
  textFile(seed, size).copy(b, 0, 0, size >> 1);
  randomBuffer(seed, size >> 2).copy(b, size >> 1);
  return b;
}

describe('frames codec', () => {
  it('a chunk larger than a frame is stored as frames: table checked, every frame decodes alone', () => {
    const raw = mixedChunk(1);
    const h = hashChunk(raw);
    const enc = encodeChunk(raw, 1, h);
    assert.equal(enc.codec, CODEC_FRAMES);
    assert.ok(enc.data.length < raw.length - (raw.length >> 5));
    assert.equal(enc.data.byteOffset, 0);
    assert.equal(enc.data.buffer.byteLength, enc.data.length, 'owns its ArrayBuffer (transferable)');
    checkRecordLengths({ codec: enc.codec, rawLen: raw.length, storedLen: enc.data.length });
    assert.deepEqual(decodeChunk(enc.data, CODEC_FRAMES, raw.length, h), raw);
    assert.deepEqual(
      decodeChunk(enc.data, CODEC_FRAMES, raw.length),
      raw,
      'frame hashes checked without the chunk hash',
    );
    const t = parseFrameTable(enc.data, raw.length, enc.data.length, h);
    assert.equal(t.frames.length, 8);
    assert.equal(1 << t.shift, 32 * KiB);
    assert.ok(
      t.frames.some((f) => f.kind === 0) && t.frames.some((f) => f.kind === 1),
      'raw and zstd frames',
    );
    const prefix = enc.data.subarray(0, frameTablePrefixLen(raw.length, enc.data.length));
    assert.deepEqual(
      parseFrameTable(prefix, raw.length, enc.data.length, h),
      t,
      'the prefix holds the table',
    );
    for (const f of t.frames) {
      const got = decodeFrame(f, enc.data.subarray(f.storedOff, f.storedOff + f.storedLen));
      assert.deepEqual(got, raw.subarray(f.rawOff, f.rawOff + f.rawLen));
    }
    // The same hash of the same bytes, whatever the frame size (dedup does not depend on it).
    const one = encodeChunk(raw, 1, h, 0);
    assert.equal(one.codec, CODEC_ZSTD);
    assert.deepEqual(decodeChunk(one.data, CODEC_ZSTD, raw.length, h), raw);
  });

  it('incompressible chunks stay raw; chunks up to one frame are one zstd frame', () => {
    const random = randomBuffer(3, 256 * KiB);
    assert.equal(encodeChunk(random, 1).codec, CODEC_RAW);
    const small = textFile(4, 32 * KiB).subarray(0, 32 * KiB);
    assert.equal(encodeChunk(small, 1).codec, CODEC_ZSTD);
  });

  it('a chunk whose first frame is random but which shrinks overall is still stored as frames', () => {
    // encodeChunk tries the whole chunk in one zstd call when the first frame does not shrink
    // (the fast path for random data): that must not turn a compressible chunk raw.
    const raw = Buffer.alloc(256 * KiB);
    randomBuffer(11, 32 * KiB).copy(raw, 0);
    textFile(11, 224 * KiB).copy(raw, 32 * KiB, 0, 224 * KiB);
    const h = hashChunk(raw);
    const enc = encodeChunk(raw, 1, h);
    assert.equal(enc.codec, CODEC_FRAMES);
    const t = parseFrameTable(enc.data, raw.length, enc.data.length, h);
    assert.equal(t.frames[0]!.kind, 0, 'the random frame is raw');
    assert.ok(t.frames.slice(1).every((f) => f.kind === 1));
    // Encoding other chunks afterwards (the reused buffers) leaves this result intact.
    const copy = Buffer.from(enc.data);
    encodeChunk(mixedChunk(12), 1);
    encodeChunk(randomBuffer(13, 256 * KiB), 1);
    assert.deepEqual(enc.data, copy);
    assert.deepEqual(decodeChunk(enc.data, CODEC_FRAMES, raw.length, h), raw);
    // Random in every frame but the last, whose text saves more than 1/32 of the chunk: the
    // whole-chunk check does not give up at its first (random) block, so it is frames too.
    const mostly = randomBuffer(14, 256 * KiB);
    textFile(14, 32 * KiB).copy(mostly, 224 * KiB, 0, 32 * KiB);
    const m = encodeChunk(mostly, 1);
    assert.equal(m.codec, CODEC_FRAMES);
    assert.deepEqual(decodeChunk(m.data, CODEC_FRAMES, mostly.length), mostly);
    assert.equal(encodeChunk(randomBuffer(15, 256 * KiB), 1).codec, CODEC_RAW);
  });

  it('round-trips any chunk at any frame size (fast-check)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 300 * KiB }),
        fc.constantFrom(4096, 8192, 32 * KiB, 64 * KiB),
        fc.integer({ min: 0, max: 1000 }),
        fc.integer({ min: 0, max: 3 }),
        (size, frameSize, seed, kind) => {
          const raw =
            kind === 0
              ? randomBuffer(seed, size)
              : kind === 1
                ? Buffer.from(textFile(seed, size).subarray(0, size))
                : kind === 2
                  ? Buffer.alloc(size, seed & 0xff)
                  : mixedChunk(seed, size);
          const h = hashChunk(raw);
          const enc = encodeChunk(raw, 1, h, frameSize);
          assert.ok(enc.codec === CODEC_RAW || enc.data.length < raw.length);
          assert.deepEqual(decodeChunk(Buffer.from(enc.data), enc.codec, raw.length, h), raw);
          if (enc.codec === CODEC_FRAMES) {
            const t = parseFrameTable(enc.data, raw.length, enc.data.length, h);
            assert.equal(t.frames.length, Math.ceil(raw.length / (1 << t.shift)));
          }
        },
      ),
      { numRuns: 60 },
    );
  });

  it('hostile stored bytes: any flipped or cut bytes give the chunk (or its frame) or DATA_DAMAGED', () => {
    const raw = mixedChunk(5, 96 * KiB);
    const h = hashChunk(raw);
    const enc = encodeChunk(raw, 1, h, 8192);
    assert.equal(enc.codec, CODEC_FRAMES);
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(enc.data.length - 1), fc.integer({ min: 0, max: 255 })), {
          minLength: 1,
          maxLength: 6,
        }),
        fc.integer({ min: 0, max: 3 }),
        fc.boolean(),
        (edits, cut, tableOnly) => {
          const b = Buffer.from(enc.data.subarray(0, enc.data.length - cut));
          const limit = tableOnly ? frameTablePrefixLen(raw.length, enc.data.length) : b.length;
          for (const [i, v] of edits) if (i < limit && i < b.length) b[i] = v;
          // Whole chunk.
          try {
            assert.ok(
              decodeChunk(b, CODEC_FRAMES, raw.length, h).equals(raw),
              'whole decode gave other bytes',
            );
          } catch (e) {
            assert.ok(damaged(e), String(e));
          }
          // Frame by frame, as a random read does (the stored length comes from the index).
          let t;
          try {
            t = parseFrameTable(b, raw.length, enc.data.length, h);
          } catch (e) {
            assert.ok(damaged(e), String(e));
            return;
          }
          for (const f of t.frames) {
            try {
              const got = decodeFrame(f, b.subarray(f.storedOff, f.storedOff + f.storedLen));
              assert.ok(
                got.equals(raw.subarray(f.rawOff, f.rawOff + f.rawLen)),
                'frame decoded to other bytes',
              );
            } catch (e) {
              assert.ok(damaged(e), String(e));
            }
          }
        },
      ),
      { numRuns: 400 },
    );
  });

  it('a frame table is bound to its chunk: another chunk hash, raw length or stored length fails', () => {
    const a = mixedChunk(6);
    const b = mixedChunk(7);
    const ea = encodeChunk(a, 1);
    assert.throws(() => parseFrameTable(ea.data, a.length, ea.data.length, hashChunk(b)), /table checksum/);
    assert.throws(() => decodeChunk(ea.data, CODEC_FRAMES, a.length, hashChunk(b)), damaged);
    assert.throws(() => parseFrameTable(ea.data, a.length - 1, ea.data.length, hashChunk(a)), damaged);
    assert.throws(() => parseFrameTable(ea.data, a.length, ea.data.length + 1, hashChunk(a)), damaged);
    assert.throws(
      () => parseFrameTable(ea.data.subarray(0, 10), a.length, ea.data.length, hashChunk(a)),
      damaged,
    );
    // A hostile table whose checksum was recomputed by someone without the chunk hash still fails a frame.
    const bad = Buffer.from(ea.data);
    bad[0] = 11; // frame size 2^11: below the minimum
    assert.throws(() => parseFrameTable(bad, a.length, bad.length), /frame size/);
    const huge = Buffer.from(ea.data);
    huge.writeUInt32BE(0xffffffff, 4); // first frame's stored length
    assert.throws(() => parseFrameTable(huge, a.length, huge.length), damaged);
    assert.throws(() => decodeChunk(huge, CODEC_FRAMES, a.length), damaged);
  });
});

describe('ChunkLoader.copyRange over a real pack', () => {
  let dir: string;
  let db: Database.Database;
  let packs: PackReader;
  const chunks: { raw: Buffer; loc: ChunkLocation }[] = [];

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-frames-readpath-'));
    fs.mkdirSync(path.join(dir, 'tmp'));
    fs.mkdirSync(path.join(dir, 'packs'));
    const w = await PackWriter.create(dir);
    for (let i = 0; i < 6; i++) {
      const raw = mixedChunk(20 + i);
      const hash = hashChunk(raw);
      const enc = encodeChunk(raw, 1, hash);
      assert.equal(enc.codec, CODEC_FRAMES);
      const pc = await w.append(
        { codec: enc.codec, rawLen: raw.length, storedLen: enc.data.length, hash },
        enc.data,
      );
      chunks.push({
        raw,
        loc: {
          id: i + 1,
          hash,
          pack: w.name,
          offset: pc.offset,
          storedLen: enc.data.length,
          rawLen: raw.length,
          codec: enc.codec,
        },
      });
    }
    await w.seal();
    db = new Database(':memory:');
    db.exec(
      'CREATE TABLE chunks (id, hash, pack_id, offset, stored_len, raw_len, codec); CREATE TABLE packs (id, name)',
    );
    packs = new PackReader(dir);
  });

  after(() => {
    packs.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a 4 KiB read decodes one frame, cached by (chunk, frame); a large read decodes the chunk', async () => {
    const loader = new ChunkLoader(db, packs, 64 << 20);
    const c = chunks[0]!;
    const out = Buffer.alloc(4096);
    await loader.copyRange(c.loc.id, c.loc, 70 * KiB, 74 * KiB, out, 0);
    assert.deepEqual(out, c.raw.subarray(70 * KiB, 74 * KiB));
    assert.equal(loader.framesDecoded, 1);
    assert.equal(loader.chunksDecoded, 0);
    // Again, and across a frame boundary (frames 0 and 1 at 32 KiB): one more frame decoded.
    await loader.copyRange(c.loc.id, c.loc, 70 * KiB, 74 * KiB, out, 0);
    assert.equal(loader.framesDecoded, 1);
    const across = Buffer.alloc(8192);
    await loader.copyRange(c.loc.id, c.loc, 28 * KiB, 36 * KiB, across, 0);
    assert.deepEqual(across, c.raw.subarray(28 * KiB, 36 * KiB));
    assert.equal(loader.framesDecoded, 3);
    // Concurrent small reads of another chunk share one pack read.
    const before = loader.bytesFromStore;
    const d = chunks[1]!;
    const outs = [0, 1, 2, 3, 4, 5, 6, 7].map(() => Buffer.alloc(4096));
    await Promise.all(
      outs.map((o, i) =>
        loader.copyRange(d.loc.id, d.loc, i * 32 * KiB + 100, i * 32 * KiB + 100 + 4096, o, 0),
      ),
    );
    outs.forEach((o, i) =>
      assert.deepEqual(o, d.raw.subarray(i * 32 * KiB + 100, i * 32 * KiB + 100 + 4096)),
    );
    assert.equal(loader.bytesFromStore - before, d.loc.storedLen, 'one read of the stored chunk');
    // More than half the chunk: the whole chunk, hash-checked.
    const big = Buffer.alloc(200 * KiB);
    await loader.copyRange(chunks[2]!.loc.id, chunks[2]!.loc, 10 * KiB, 210 * KiB, big, 0);
    assert.deepEqual(big, chunks[2]!.raw.subarray(10 * KiB, 210 * KiB));
    assert.equal(loader.chunksDecoded, 1);
  });

  it('once a chunk was read, a frame-cache hit reads nothing and a miss reads only its frame', async () => {
    // A cache too small to keep a chunk's stored bytes: the old loader kept the frame table with
    // them, so every later read of the chunk, even a frame-cache hit, read the whole chunk again.
    const loader = new ChunkLoader(db, packs, 160 * KiB);
    const c = chunks[4]!;
    const t = parseFrameTable(
      fs.readFileSync(packPath(dir, c.loc.pack)).subarray(c.loc.offset, c.loc.offset + c.loc.storedLen),
      c.loc.rawLen,
      c.loc.storedLen,
      c.loc.hash,
    );
    assert.ok(c.loc.storedLen > 40 * KiB);
    const out = Buffer.alloc(4096);
    const at = (frame: number) => t.frames[frame]!.rawOff + 1000;
    await loader.copyRange(c.loc.id, c.loc, at(2), at(2) + 4096, out, 0);
    assert.deepEqual(out, c.raw.subarray(at(2), at(2) + 4096));
    assert.equal(loader.bytesFromStore, c.loc.storedLen, 'the first read of a chunk reads it whole');
    assert.equal(loader.framesDecoded, 1);
    await loader.copyRange(c.loc.id, c.loc, at(2) + 8192, at(2) + 12288, out, 0);
    assert.deepEqual(out, c.raw.subarray(at(2) + 8192, at(2) + 12288));
    assert.equal(loader.bytesFromStore, c.loc.storedLen, 'a frame-cache hit reads nothing');
    assert.equal(loader.framesDecoded, 1);
    for (const frame of [5, 0, 7]) {
      const before = loader.bytesFromStore;
      await loader.copyRange(c.loc.id, c.loc, at(frame), at(frame) + 4096, out, 0);
      assert.deepEqual(out, c.raw.subarray(at(frame), at(frame) + 4096));
      assert.equal(loader.bytesFromStore - before, t.frames[frame]!.storedLen, `frame ${frame} alone`);
    }
    assert.equal(loader.framesDecoded, 4);
    // Concurrent misses of one frame share its read; a range across two frames reads both.
    let before = loader.bytesFromStore;
    await Promise.all(
      [0, 1, 2].map(() => loader.copyRange(c.loc.id, c.loc, at(3), at(3) + 4096, Buffer.alloc(4096), 0)),
    );
    assert.equal(loader.bytesFromStore - before, t.frames[3]!.storedLen);
    before = loader.bytesFromStore;
    const across = Buffer.alloc(8192);
    const edge = t.frames[6]!.rawOff - 4096;
    await loader.copyRange(c.loc.id, c.loc, edge, edge + 8192, across, 0);
    assert.deepEqual(across, c.raw.subarray(edge, edge + 8192));
  });

  it("a two-slot frame cache under many concurrent reads never hands out another frame's bytes", async () => {
    // Decoded frames live in reused slots: with 2 slots and 48 reads in flight over 3 chunks,
    // slots are taken over while other reads still wait for theirs.
    const loader = new ChunkLoader(db, packs, 160 * KiB);
    const use = [chunks[0]!, chunks[1]!, chunks[2]!];
    for (const c of use) await loader.copyRange(c.loc.id, c.loc, 0, 4096, Buffer.alloc(4096), 0);
    let seed = 7;
    const next = () => (seed = (seed * 48271) % 0x7fffffff);
    for (let round = 0; round < 4; round++) {
      const reads = Array.from({ length: 48 }, () => {
        const c = use[next() % use.length]!;
        const at = next() % (c.loc.rawLen - 4096);
        const out = Buffer.alloc(4096);
        return loader.copyRange(c.loc.id, c.loc, at, at + 4096, out, 0).then(() => {
          assert.deepEqual(out, c.raw.subarray(at, at + 4096));
        });
      });
      await Promise.all(reads);
    }
    assert.ok(loader.framesDecoded > 20);
  });

  it('first reads share pooled stored-bytes buffers: concurrent frame reads and whole loads get their own bytes', async () => {
    // A cache too small to keep tables or chunks for long: first reads (whole stored chunk into a
    // pooled buffer) keep recurring, concurrently with whole-chunk loads that share the same read.
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.array(
            fc.record({
              chunk: fc.integer({ min: 0, max: 4 }),
              whole: fc.boolean(),
              at: fc.integer({ min: 0, max: 256 * KiB - 4096 }),
            }),
            { minLength: 1, maxLength: 12 },
          ),
          { minLength: 1, maxLength: 6 },
        ),
        async (batches) => {
          const loader = new ChunkLoader(db, packs, 48 * KiB);
          for (const batch of batches) {
            await Promise.all(
              batch.map(async ({ chunk, whole, at }) => {
                const c = chunks[chunk]!;
                if (whole) {
                  const raw = await loader.load(c.loc.id, c.loc);
                  assert.ok(raw.equals(c.raw), `chunk ${chunk} whole`);
                  return;
                }
                const out = Buffer.alloc(4096);
                await loader.copyRange(c.loc.id, c.loc, at, at + 4096, out, 0);
                assert.ok(out.equals(c.raw.subarray(at, at + 4096)), `chunk ${chunk} at ${at}`);
              }),
            );
            loader.clear();
          }
          // Buffers go back to the pool: never more than the reads that were in flight at once.
          assert.ok(loader.storedBuffers <= Math.max(...batches.map((b) => b.length)));
        },
      ),
      { numRuns: 60 },
    );
  });

  it('a frame damaged after its table was cached fails alone (DATA_DAMAGED); a damaged table fails the chunk', async () => {
    const c = chunks[5]!;
    const file = packPath(dir, c.loc.pack);
    const t = parseFrameTable(
      fs.readFileSync(file).subarray(c.loc.offset, c.loc.offset + c.loc.storedLen),
      c.loc.rawLen,
      c.loc.storedLen,
      c.loc.hash,
    );
    const loader = new ChunkLoader(db, packs, 160 * KiB);
    const out = Buffer.alloc(4096);
    await loader.copyRange(c.loc.id, c.loc, 0, 4096, out, 0); // table now cached
    const flip = (at: number) => {
      fs.chmodSync(file, 0o600);
      const fd = fs.openSync(file, 'r+');
      const one = Buffer.alloc(1);
      fs.readSync(fd, one, 0, 1, at);
      one[0] = one[0]! ^ 0x5a;
      fs.writeSync(fd, one, 0, 1, at);
      fs.closeSync(fd);
    };
    const f = t.frames[3]!;
    flip(c.loc.offset + f.storedOff + (f.storedLen >> 1));
    await assert.rejects(loader.copyRange(c.loc.id, c.loc, f.rawOff, f.rawOff + 4096, out, 0), damaged);
    const g = t.frames[4]!;
    await loader.copyRange(c.loc.id, c.loc, g.rawOff, g.rawOff + 4096, out, 0);
    assert.deepEqual(out, c.raw.subarray(g.rawOff, g.rawOff + 4096));
    // The table itself damaged: a fresh loader (no cached table) refuses every frame of the chunk.
    flip(c.loc.offset + 5);
    const fresh = new ChunkLoader(db, packs, 160 * KiB);
    await assert.rejects(fresh.copyRange(c.loc.id, c.loc, g.rawOff, g.rawOff + 4096, out, 0), damaged);
    flip(c.loc.offset + 5);
    flip(c.loc.offset + f.storedOff + (f.storedLen >> 1));
  });

  it('a damaged frame fails the reads that need it (DATA_DAMAGED), the other frames still read', async () => {
    const c = chunks[3]!;
    const t = parseFrameTable(
      fs.readFileSync(packPath(dir, c.loc.pack)).subarray(c.loc.offset, c.loc.offset + c.loc.storedLen),
      c.loc.rawLen,
      c.loc.storedLen,
      c.loc.hash,
    );
    const f = t.frames[2]!;
    const file = packPath(dir, c.loc.pack);
    fs.chmodSync(file, 0o600);
    const fd = fs.openSync(file, 'r+');
    const at = c.loc.offset + f.storedOff + (f.storedLen >> 1);
    const one = Buffer.alloc(1);
    fs.readSync(fd, one, 0, 1, at);
    one[0] = one[0]! ^ 0x5a;
    fs.writeSync(fd, one, 0, 1, at);
    fs.closeSync(fd);
    packs.close();
    const loader = new ChunkLoader(db, packs, 64 << 20);
    const out = Buffer.alloc(4096);
    await assert.rejects(
      loader.copyRange(c.loc.id, c.loc, f.rawOff + 8, f.rawOff + 8 + 4096, out, 0),
      damaged,
    );
    await loader.copyRange(c.loc.id, c.loc, 0, 4096, out, 0);
    assert.deepEqual(out, c.raw.subarray(0, 4096));
    await assert.rejects(
      loader.copyRange(c.loc.id, c.loc, 0, 200 * KiB, Buffer.alloc(200 * KiB), 0),
      damaged,
    );
    await assert.rejects(loader.load(c.loc.id, c.loc), damaged);
  });
});

describe('raw frames (format 6)', () => {
  it('an incompressible chunk is stored as raw frames behind a checked table, when the repository writes them', () => {
    const raw = randomBuffer(41, 256 * KiB);
    const h = hashChunk(raw);
    assert.equal(encodeChunk(raw, 1, h).codec, CODEC_RAW, 'before format 6: codec 0');
    const enc = encodeChunk(raw, 1, h, undefined, true);
    assert.equal(enc.codec, CODEC_FRAMES);
    const t = parseFrameTable(enc.data, raw.length, enc.data.length, h);
    assert.equal(t.frames.length, 8);
    assert.ok(t.frames.every((f) => f.kind === 0 && f.storedLen === f.rawLen));
    assert.equal(enc.data.length, raw.length + t.tableLen);
    assert.ok(t.tableLen <= maxFrameTableLen(raw.length));
    assert.ok(isRawFrames(enc.codec, enc.data.length, raw.length));
    assert.ok(enc.data.subarray(t.tableLen).equals(raw));
    checkRecordLengths({ codec: enc.codec, rawLen: raw.length, storedLen: enc.data.length });
    assert.deepEqual(decodeChunk(enc.data, CODEC_FRAMES, raw.length, h), raw);
    for (const f of t.frames) {
      const one = decodeFrame(f, enc.data.subarray(f.storedOff, f.storedOff + f.storedLen));
      assert.ok(one.equals(raw.subarray(f.rawOff, f.rawOff + f.rawLen)));
    }
    // Bound to its chunk: another chunk's hash fails the table, a changed byte its frame.
    assert.throws(() => decodeChunk(enc.data, CODEC_FRAMES, raw.length, hashChunk(Buffer.alloc(8))), damaged);
    const bad = Buffer.from(enc.data);
    bad[t.tableLen + 5 * 32 * KiB + 9]! ^= 1;
    assert.throws(() => decodeChunk(bad, CODEC_FRAMES, raw.length, h), damaged);
    const f5 = t.frames[5]!;
    assert.throws(() => decodeFrame(f5, bad.subarray(f5.storedOff, f5.storedOff + f5.storedLen)), damaged);
    // A compressible chunk is unchanged by the option; records longer than raw + table are refused.
    const mixed = mixedChunk(3);
    const m = encodeChunk(mixed, 1, hashChunk(mixed), undefined, true);
    assert.equal(m.codec, CODEC_FRAMES);
    assert.ok(m.data.length < mixed.length && !isRawFrames(m.codec, m.data.length, mixed.length));
    assert.throws(
      () =>
        checkRecordLengths({
          codec: CODEC_FRAMES,
          rawLen: raw.length,
          storedLen: raw.length + maxFrameTableLen(raw.length) + 1,
        }),
      damaged,
    );
    assert.throws(
      () => checkRecordLengths({ codec: 1, rawLen: raw.length, storedLen: raw.length + 100 }),
      damaged,
    );
  });

  it('a random 4 KiB read of a raw-frames chunk reads and hashes one frame once the table is known', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-rawframes-'));
    fs.mkdirSync(path.join(dir, 'tmp'));
    fs.mkdirSync(path.join(dir, 'packs'));
    const db = new Database(':memory:');
    db.exec(
      'CREATE TABLE chunks (id, hash, pack_id, offset, stored_len, raw_len, codec); CREATE TABLE packs (id, name)',
    );
    const packs = new PackReader(dir);
    try {
      const raw = randomBuffer(42, 256 * KiB);
      const hash = hashChunk(raw);
      const enc = encodeChunk(raw, 1, hash, undefined, true);
      const w = await PackWriter.create(dir);
      const pc = await w.append(
        { codec: enc.codec, rawLen: raw.length, storedLen: enc.data.length, hash },
        enc.data,
      );
      await w.seal();
      const loc: ChunkLocation = {
        id: 1,
        hash,
        pack: w.name,
        offset: pc.offset,
        storedLen: enc.data.length,
        rawLen: raw.length,
        codec: enc.codec,
      };
      const loader = new ChunkLoader(db, packs, 64 << 20);
      const out = Buffer.alloc(4096);
      await loader.copyRange(1, loc, 100 * KiB, 104 * KiB, out, 0);
      assert.ok(out.equals(raw.subarray(100 * KiB, 104 * KiB)));
      assert.equal(loader.bytesFromStore, enc.data.length, 'first read: the whole record, once');
      assert.equal(loader.framesDecoded, 1);
      assert.equal(loader.chunksDecoded, 0, 'the 256 KiB chunk is neither hashed nor cached whole');
      await loader.copyRange(1, loc, 200 * KiB, 204 * KiB, out, 0);
      assert.ok(out.equals(raw.subarray(200 * KiB, 204 * KiB)));
      assert.equal(loader.bytesFromStore, enc.data.length + 32 * KiB, 'then one 32 KiB frame');
      assert.deepEqual(await loader.load(1, loc), raw);
    } finally {
      packs.close();
      db.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('bkfs copy gives a destination without raw frames the raw bytes as codec 0, others the record', () => {
    const raw = randomBuffer(43, 256 * KiB);
    const enc = encodeChunk(raw, 1, hashChunk(raw), undefined, true);
    const loc = { codec: enc.codec, storedLen: enc.data.length, rawLen: raw.length };
    assert.deepEqual(recordForDestination(loc, enc.data, raw, false), { codec: CODEC_RAW, stored: raw });
    assert.deepEqual(recordForDestination(loc, enc.data, raw, true), {
      codec: CODEC_FRAMES,
      stored: enc.data,
    });
    const mixed = mixedChunk(4);
    const m = encodeChunk(mixed, 1, hashChunk(mixed), undefined, true);
    const mloc = { codec: m.codec, storedLen: m.data.length, rawLen: mixed.length };
    assert.equal(recordForDestination(mloc, m.data, mixed, false).stored, m.data);
  });
});

describe('format 3 and 4 -> 6', () => {
  for (const from of [3, 4]) {
    it(`the first writer renumbers a local plain format-${from} repository to 6 (index and config) before writing`, () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-format6-readpath-'));
      try {
        const repoDir = path.join(dir, 'repo');
        Repository.init(repoDir).close();
        const fmt = (): [string, number] => {
          const d = new Database(path.join(repoDir, 'index.db'), { readonly: true });
          try {
            const v = (d.prepare("SELECT value FROM meta WHERE key = 'format'").get() as { value: string })
              .value;
            return [
              v,
              (
                JSON.parse(fs.readFileSync(path.join(repoDir, 'bkfs-repo.json'), 'utf8')) as {
                  format: number;
                }
              ).format,
            ];
          } finally {
            d.close();
          }
        };
        assert.equal(PLAIN_FORMAT_VERSION, 6);
        assert.deepEqual(fmt(), ['6', 6], 'init writes format 6');
        const d = new Database(path.join(repoDir, 'index.db'));
        d.prepare("UPDATE meta SET value = ? WHERE key = 'format'").run(String(from));
        d.close();
        const cfg = path.join(repoDir, 'bkfs-repo.json');
        fs.writeFileSync(cfg, JSON.stringify({ ...JSON.parse(fs.readFileSync(cfg, 'utf8')), format: from }));
        const ro = Repository.open(repoDir);
        assert.equal(ro.writesRawFrames, false, `a format-${from} repository gets no raw frames`);
        ro.close();
        assert.deepEqual(fmt(), [String(from), from], 'readers do not migrate');
        const w = Repository.open(repoDir);
        try {
          w.lockWriter('test');
          assert.equal(w.config.format, 6);
          assert.equal(w.writesRawFrames, true);
          w.unlockWriter();
        } finally {
          w.close();
        }
        assert.deepEqual(fmt(), ['6', 6]);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
