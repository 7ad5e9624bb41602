/**
 * Hostile stored data (issue 11 §6): chunk records and index rows whose lengths lie, zstd frames
 * that decompress past their chunk ("zstd bombs"), truncated packs, garbage manifests. Each gives a
 * clear BkfsError within bounded memory and time, never a crash or a huge allocation. Beside the
 * hand-written cases, fast-check properties: the codec and the record header round-trip, and
 * arbitrary bytes never decode to anything but the original chunk or a DATA_DAMAGED error.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import { Compressor, compress } from 'zstd-napi';
import {
  CODEC_RAW,
  CODEC_ZSTD,
  MAX_CHUNK_LEN,
  decodeChunk,
  encodeChunk,
  hashChunk,
} from '../../src/store/codec';
import {
  decodeRecordHeader,
  encodeRecordHeader,
  PackReader,
  PackWriter,
  RECORD_HEADER_LEN,
} from '../../src/store/packs';
import { decodeManifest, encodeManifest, type Manifest } from '../../src/repo/manifest';
import { isBkfsError } from '../../src/errors';

const MiB = 1 << 20;

function damaged(e: unknown): boolean {
  return isBkfsError(e, 'DATA_DAMAGED');
}

/** A zstd frame of `total` zero bytes without a content size (streamed): a few KB on disk. */
function zeroBomb(total: number): Buffer {
  const c = new Compressor();
  c.setParameters({ compressionLevel: 1, contentSizeFlag: false });
  // One-shot compression with the size unknown to the frame: compress a small block, then
  // concatenate frames (zstd decodes concatenated frames as one stream).
  const block = c.compress(Buffer.alloc(4 * MiB));
  const frames: Buffer[] = [];
  for (let n = 0; n < total; n += 4 * MiB) frames.push(block);
  return Buffer.concat(frames);
}

function maxRssBytes(): number {
  return process.resourceUsage().maxRSS * 1024;
}

describe('hostile chunks: bounded decode', () => {
  it('a zstd stream that decompresses to 1 GiB is refused for a 64 KiB chunk without allocating it', () => {
    const bomb = zeroBomb(1024 * MiB);
    assert.ok(bomb.length < 4 * MiB, `bomb is ${bomb.length} bytes`);
    const before = maxRssBytes();
    const t0 = Date.now();
    assert.throws(() => decodeChunk(bomb, CODEC_ZSTD, 65536), damaged);
    const grew = maxRssBytes() - before;
    assert.ok(grew < 64 * MiB, `decoding grew the peak RSS by ${grew >> 20} MiB`);
    assert.ok(Date.now() - t0 < 5000);
  });

  it('a zstd frame whose header declares more (or less) than raw_len is refused before decoding', () => {
    const raw = Buffer.alloc(65536, 7);
    const z = compress(raw);
    assert.throws(() => decodeChunk(z, CODEC_ZSTD, 1000), /declares 65536 bytes, expected 1000/);
    assert.throws(() => decodeChunk(z, CODEC_ZSTD, 131072), /declares 65536 bytes/);
    assert.deepEqual(decodeChunk(z, CODEC_ZSTD, 65536, hashChunk(raw)), raw);
  });

  it('a raw_len beyond the chunk size (4 GiB from a lying index row) is refused before allocating', () => {
    assert.throws(() => decodeChunk(Buffer.alloc(16), CODEC_ZSTD, 0xffffffff), damaged);
    assert.throws(() => decodeChunk(Buffer.alloc(16), CODEC_RAW, 300000, undefined, 262144), damaged);
    assert.throws(() => decodeChunk(Buffer.alloc(16), CODEC_ZSTD, -1), damaged);
  });

  it('record headers with impossible lengths are refused', () => {
    const hash = Buffer.alloc(32, 1);
    const bad = [
      { codec: CODEC_RAW, rawLen: 65536, storedLen: 0xffffffff }, // stored_len of 4 GiB
      { codec: CODEC_ZSTD, rawLen: 0xffffffff, storedLen: 100 }, // raw_len of 4 GiB
      { codec: CODEC_ZSTD, rawLen: 65536, storedLen: 65536 }, // zstd never stores >= raw
      { codec: CODEC_RAW, rawLen: 65536, storedLen: 100 }, // raw stores exactly raw_len
      { codec: CODEC_RAW, rawLen: 0, storedLen: 0 },
      { codec: 7, rawLen: 100, storedLen: 100 },
    ];
    for (const r of bad) {
      assert.throws(
        () => decodeRecordHeader(encodeRecordHeader({ ...r, hash }), 262144),
        damaged,
        JSON.stringify(r),
      );
    }
    assert.throws(
      () =>
        decodeRecordHeader(
          encodeRecordHeader({ codec: CODEC_RAW, rawLen: 524288, storedLen: 524288, hash }),
          262144,
        ),
      damaged,
    );
  });

  it('PackReader refuses a 4 GiB read and reports a truncated pack as DATA_DAMAGED', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-hostile-pack-'));
    try {
      fs.mkdirSync(path.join(dir, 'tmp'));
      const w = await PackWriter.create(dir);
      const data = Buffer.alloc(65536, 3);
      const pc = await w.append(
        { codec: CODEC_RAW, rawLen: data.length, storedLen: data.length, hash: hashChunk(data) },
        data,
      );
      await w.seal();
      const r = new PackReader(dir);
      await assert.rejects(
        r.read(w.name, pc.offset, 0xffffffff),
        (e) => damaged(e) && /impossible/.test(String(e)),
      );
      await assert.rejects(r.read(w.name, -5, 10), damaged);
      assert.deepEqual(await r.read(w.name, pc.offset, data.length), data);
      r.close();
      // Truncate the pack in the middle of the record.
      const p = path.join(dir, 'packs', w.name.slice(0, 2), `${w.name}.pack`);
      fs.truncateSync(p, pc.offset + 100);
      const r2 = new PackReader(dir);
      await assert.rejects(
        r2.read(w.name, pc.offset, data.length),
        (e) => damaged(e) && /truncated/.test(String(e)),
      );
      r2.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

function validManifest(): Manifest {
  return {
    magic: 'bkfs-manifest',
    version: 1,
    repo: '0123456789abcdef',
    vm: { name: 'vm', created: 1 },
    checkpoint: {
      id: 1,
      uid: 'a'.repeat(32),
      name: 'check1',
      level: 'full',
      started: 1,
      finished: 2,
      bytesRead: 10,
      bytesNewRaw: 10,
      bytesNewStored: 10,
      chunksNew: 1,
      libvirtCheckpoint: null,
      protected: false,
      parent: null,
      base: null,
      chain: { id: 1, uid: 'a'.repeat(32), name: 'check1' },
    },
    configs: [],
    hashes: ['b'.repeat(64)],
    origins: [{ disk: 1, checkpoint: 'a'.repeat(32), checkpointName: 'check1', diskName: 'vda' }],
    disks: [
      {
        id: 1,
        name: 'vda',
        virtualSize: 1 << 20,
        source: null,
        format: 'raw',
        bitmap: null,
        bytesRead: 0,
        bytesZero: 0,
        extents: [0, 65536, 0, 0, 0, 65536, 4096, -1, 0, 0],
      },
    ],
  };
}

function corrupt(e: unknown): boolean {
  return isBkfsError(e, 'REPO_CORRUPT');
}

describe('hostile manifests', () => {
  it('a valid manifest decodes', () => {
    assert.deepEqual(decodeManifest(encodeManifest(validManifest()), 'm'), validManifest());
  });

  it('garbage, truncated and wrongly typed manifests are REPO_CORRUPT, never a TypeError', () => {
    const z = (v: unknown): Buffer => compress(Buffer.from(JSON.stringify(v)));
    const good = encodeManifest(validManifest());
    // Deliberately untyped: the point is to write what the type forbids.
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    type Loose = Record<string, any>;
    const mutate = (f: (m: Loose) => void): Buffer => {
      const m = validManifest() as unknown as Loose;
      f(m);
      return z(m);
    };
    const cases: [string, Buffer][] = [
      ['not zstd', Buffer.from('hello, this is not a manifest')],
      ['empty', Buffer.alloc(0)],
      ['truncated', good.subarray(0, good.length >> 1)],
      ['not JSON', compress(Buffer.from('{"magic": "bkfs-manifest", '))],
      ['null', z(null)],
      ['array', z([1, 2])],
      ['no vm', mutate((m) => delete m.vm)],
      ['vm name a number', mutate((m) => (m.vm.name = 5))],
      ['checkpoint id a string', mutate((m) => (m.checkpoint.id = '1'))],
      ['uid not hex', mutate((m) => (m.checkpoint.uid = '../../etc/passwd'))],
      ['chain missing', mutate((m) => delete m.checkpoint.chain)],
      ['configs not array', mutate((m) => (m.configs = {}))],
      ['config data a number', mutate((m) => (m.configs = [{ name: 'x', data: 1 }]))],
      ['hash not hex', mutate((m) => (m.hashes = ['zz']))],
      ['disks a string', mutate((m) => (m.disks = 'vda'))],
      ['extents not multiple of 5', mutate((m) => m.disks[0].extents.push(1))],
      ['extent length 0', mutate((m) => (m.disks[0].extents[1] = 0))],
      ['extent hash index out of range', mutate((m) => (m.disks[0].extents[2] = 7))],
      ['extent origin out of range', mutate((m) => (m.disks[0].extents[4] = 3))],
      ['extent not an integer', mutate((m) => (m.disks[0].extents[3] = 0.5))],
      ['extent beyond the disk', mutate((m) => (m.disks[0].extents[5] = 1 << 30))],
      ['negative size', mutate((m) => (m.disks[0].virtualSize = -1))],
    ];
    for (const [what, data] of cases) {
      assert.throws(() => decodeManifest(data, what), corrupt, what);
    }
  });

  it('a manifest that decompresses to 1 GiB is refused without inflating it', () => {
    const bomb = zeroBomb(1024 * MiB);
    const before = maxRssBytes();
    assert.throws(
      () => decodeManifest(bomb, 'bomb'),
      (e) => corrupt(e) && /more than/.test(String(e)),
    );
    const grew = maxRssBytes() - before;
    assert.ok(grew < 64 * MiB, `grew the peak RSS by ${grew >> 20} MiB`);
  });

  it('property: any mutation of a manifest decodes to a valid manifest or fails with a BkfsError', () => {
    const good = encodeManifest(validManifest());
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(good.length - 1), fc.integer({ min: 0, max: 255 })), {
          minLength: 1,
          maxLength: 8,
        }),
        (edits) => {
          const b = Buffer.from(good);
          for (const [i, v] of edits) b[i] = v;
          try {
            decodeManifest(b, 'fuzz');
          } catch (e) {
            assert.ok(isBkfsError(e), `not a BkfsError: ${String(e)}`);
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe('codec and record properties (fast-check)', () => {
  it('encodeChunk/decodeChunk round-trip any chunk, with the hash checked', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 1, maxLength: 70000 }),
        fc.integer({ min: 1, max: 5 }),
        (u, level) => {
          const raw = Buffer.from(u);
          const enc = encodeChunk(raw, level);
          assert.ok(enc.data.length <= raw.length);
          assert.deepEqual(decodeChunk(Buffer.from(enc.data), enc.codec, raw.length, hashChunk(raw)), raw);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('compressible chunks round-trip (long runs exercise the zstd path)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.integer({ min: 0, max: 255 }), fc.integer({ min: 1, max: 5000 })), {
          minLength: 1,
          maxLength: 40,
        }),
        (runs) => {
          const raw = Buffer.concat(runs.map(([b, n]) => Buffer.alloc(n, b)));
          const enc = encodeChunk(raw, 1);
          assert.deepEqual(decodeChunk(Buffer.from(enc.data), enc.codec, raw.length, hashChunk(raw)), raw);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('a stored chunk with any bytes flipped decodes to the original or fails DATA_DAMAGED', () => {
    const raw = Buffer.concat([Buffer.alloc(30000, 1), Buffer.from('some text '.repeat(3000))]);
    const enc = encodeChunk(raw, 1, undefined, 0); // one zstd frame; frames: test/unit/codec-frames.test.ts
    assert.equal(enc.codec, CODEC_ZSTD);
    const h = hashChunk(raw);
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(enc.data.length - 1), fc.integer({ min: 0, max: 255 })), {
          minLength: 1,
          maxLength: 6,
        }),
        fc.integer({ min: 0, max: 4 }),
        (edits, cut) => {
          const b = Buffer.from(enc.data.subarray(0, enc.data.length - cut));
          for (const [i, v] of edits) if (i < b.length) b[i] = v;
          let out: Buffer | undefined;
          try {
            out = decodeChunk(b, CODEC_ZSTD, raw.length, h);
          } catch (e) {
            assert.ok(damaged(e), String(e));
            return;
          }
          assert.ok(out.equals(raw), 'decoded bytes differ from the chunk');
        },
      ),
      { numRuns: 500 },
    );
  });

  it('arbitrary bytes as a zstd chunk never decode to more than raw_len or anything but DATA_DAMAGED', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2000 }), fc.integer({ min: 1, max: 1 << 20 }), (u, rawLen) => {
        try {
          const out = decodeChunk(Buffer.from(u), CODEC_ZSTD, rawLen);
          assert.equal(out.length, rawLen);
        } catch (e) {
          assert.ok(damaged(e), String(e));
        }
      }),
      { numRuns: 500 },
    );
  });

  it('record headers round-trip for every possible length, and any 48 bytes decode or fail DATA_DAMAGED', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: MAX_CHUNK_LEN }),
        fc.boolean(),
        fc.uint8Array({ minLength: 32, maxLength: 32 }),
        fc.integer({ min: 1, max: MAX_CHUNK_LEN }),
        (rawLen, zstd, hash, s) => {
          const storedLen = zstd ? Math.max(1, s % rawLen) : rawLen;
          if (zstd && storedLen >= rawLen) return;
          const r = { codec: zstd ? CODEC_ZSTD : CODEC_RAW, rawLen, storedLen, hash: Buffer.from(hash) };
          assert.deepEqual(decodeRecordHeader(encodeRecordHeader(r)), r);
        },
      ),
    );
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: RECORD_HEADER_LEN, maxLength: RECORD_HEADER_LEN }),
        fc.boolean(),
        (u, magic) => {
          const b = Buffer.from(u);
          if (magic) b.write('BKCH', 0, 'ascii');
          try {
            const h = decodeRecordHeader(b, 262144);
            assert.ok(h.rawLen <= 262144 && h.storedLen <= h.rawLen);
          } catch (e) {
            assert.ok(damaged(e), String(e));
          }
        },
      ),
      { numRuns: 1000 },
    );
  });
});
