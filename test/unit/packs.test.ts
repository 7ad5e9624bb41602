import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import {
  decodeRecordHeader,
  encodePackHeader,
  encodeRecordHeader,
  PackReader,
  PackWriter,
  packPath,
  RECORD_HEADER_LEN,
} from '../../src/store/packs';
import { CODEC_RAW, CODEC_ZSTD, decodeChunk, encodeChunk, hashChunk, isZero } from '../../src/store/codec';

describe('pack format (golden bytes)', () => {
  it('pack header', () => {
    assert.equal(
      encodePackHeader().toString('hex'),
      Buffer.from('BKFSPACK').toString('hex') + '00000001' + '00000000',
    );
  });

  it('record header round-trips and has the documented layout', () => {
    const hash = Buffer.alloc(32, 0xab);
    const h = encodeRecordHeader({ codec: 1, rawLen: 0x40000, storedLen: 0x1234, hash });
    assert.equal(h.length, RECORD_HEADER_LEN);
    assert.equal(
      h.subarray(0, 16).toString('hex'),
      Buffer.from('BKCH').toString('hex') + '01000000' + '00040000' + '00001234',
    );
    assert.deepEqual(decodeRecordHeader(h), { codec: 1, rawLen: 0x40000, storedLen: 0x1234, hash });
    assert.throws(() => decodeRecordHeader(Buffer.alloc(48)), /bad magic/);
  });

  it('BLAKE3 of a known input', () => {
    // Official BLAKE3 test vector for the empty input.
    assert.equal(
      hashChunk(Buffer.alloc(0)).toString('hex'),
      'af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262',
    );
  });
});

describe('chunk codec', () => {
  it('compresses compressible data and stores random data raw', () => {
    const text = Buffer.from('block backup '.repeat(20000));
    const z = encodeChunk(text, 1, undefined, 0); // one zstd frame (codec 1, formats 1-2)
    assert.equal(z.codec, CODEC_ZSTD);
    assert.ok(z.data.length < text.length / 10);
    assert.ok(decodeChunk(z.data, z.codec, text.length, hashChunk(text)).equals(text));
    const random = randomBytes(65536);
    const r = encodeChunk(random, 1);
    assert.equal(r.codec, CODEC_RAW);
    assert.ok(r.data.equals(random));
  });

  it('rejects damaged data instead of returning wrong bytes', () => {
    const text = Buffer.from('x'.repeat(100000));
    const z = encodeChunk(text, 1, undefined, 0);
    const bad = Buffer.from(z.data);
    bad[bad.length - 3]! ^= 0xff;
    assert.throws(
      () => decodeChunk(bad, CODEC_ZSTD, text.length, hashChunk(text)),
      (e: Error & { code?: string }) => e.code === 'DATA_DAMAGED',
    );
    const raw = Buffer.from(text);
    raw[5] = 0x79;
    assert.throws(() => decodeChunk(raw, CODEC_RAW, text.length, hashChunk(text)), /hash mismatch/);
  });

  it('isZero', () => {
    assert.ok(isZero(Buffer.alloc(9 << 20)));
    const b = Buffer.alloc(9 << 20);
    b[(9 << 20) - 1] = 1;
    assert.ok(!isZero(b));
  });
});

describe('pack writer and reader', () => {
  it('seals a pack under its final name and reads records back', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-pack-'));
    try {
      fs.mkdirSync(path.join(dir, 'tmp'));
      const w = await PackWriter.create(dir);
      const a = await w.append(
        { codec: 0, rawLen: 3, storedLen: 3, hash: hashChunk(Buffer.from('abc')) },
        Buffer.from('abc'),
      );
      const b = await w.append(
        { codec: 0, rawLen: 2, storedLen: 2, hash: hashChunk(Buffer.from('de')) },
        Buffer.from('de'),
      );
      assert.ok(fs.existsSync(path.join(dir, 'tmp', `${w.name}.pack.tmp`)));
      await w.seal();
      assert.ok(fs.existsSync(packPath(dir, w.name)));
      assert.equal(fs.readdirSync(path.join(dir, 'tmp')).length, 0);
      const r = new PackReader(dir, 1);
      assert.equal((await r.read(w.name, a.offset, 3)).toString(), 'abc');
      assert.equal((await r.read(w.name, b.offset, 2)).toString(), 'de');
      const file = fs.readFileSync(packPath(dir, w.name));
      assert.deepEqual(decodeRecordHeader(file.subarray(16, 16 + RECORD_HEADER_LEN)).rawLen, 3);
      await assert.rejects(r.read(w.name, file.length - 1, 10), /truncated/);
      r.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('PackReader.close with reads in flight', () => {
  it('keeps a descriptor open until its reads return, so no read lands in a reused descriptor', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-pack-close-'));
    try {
      fs.mkdirSync(path.join(dir, 'tmp'));
      const w = await PackWriter.create(dir);
      const data = randomBytes(1 << 20);
      const c = await w.append(
        { codec: 0, rawLen: data.length, storedLen: data.length, hash: hashChunk(data) },
        data,
      );
      await w.seal();
      const other = path.join(dir, 'other');
      fs.writeFileSync(other, Buffer.alloc(2 << 20, 0x77));
      for (let round = 0; round < 50; round++) {
        const r = new PackReader(dir);
        const reads = [r.read(w.name, c.offset, data.length), r.read(w.name, c.offset, data.length)];
        r.close(); // while both reads are in flight
        // Grab descriptors: with the old close() one of them could get the pack's number and the
        // reads above would return this file's bytes.
        const fds = [fs.openSync(other, 'r'), fs.openSync(other, 'r')];
        try {
          for (const got of await Promise.all(reads)) assert.ok(got.equals(data), `round ${round}`);
          await r.drain();
        } finally {
          for (const fd of fds) fs.closeSync(fd);
        }
        // Later reads open the pack again.
        assert.ok((await r.read(w.name, c.offset, 16)).equals(data.subarray(0, 16)));
        r.close();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('pack writer: batched appends', () => {
  it('places records in call order and writes many of them per writev, every byte where its offset says', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-pack-batch-'));
    try {
      fs.mkdirSync(path.join(dir, 'tmp'));
      const w = await PackWriter.create(dir);
      // 1500 records appended in one tick: more than one writev batch (1024 buffers = 512 records).
      const datas = Array.from({ length: 1500 }, (_, i) => randomBytes(1 + ((i * 7919) % 5000)));
      const placed = datas.map((d) =>
        w.append({ codec: 0, rawLen: d.length, storedLen: d.length, hash: hashChunk(d) }, d),
      );
      const pcs = await Promise.all(placed);
      // Offsets follow call order, back to back.
      let expect = 16;
      for (let i = 0; i < pcs.length; i++) {
        assert.equal(pcs[i]!.offset, expect + RECORD_HEADER_LEN);
        expect += RECORD_HEADER_LEN + datas[i]!.length;
      }
      assert.equal(w.size, expect);
      // Resolved means written: the bytes are in the temp file before seal.
      const tmp = fs.readFileSync(path.join(dir, 'tmp', `${w.name}.pack.tmp`));
      assert.equal(tmp.length, expect);
      // Appends after the first batch went out also land in place.
      const late = randomBytes(777);
      const pl = await w.append({ codec: 0, rawLen: 777, storedLen: 777, hash: hashChunk(late) }, late);
      await w.seal();
      const file = fs.readFileSync(packPath(dir, w.name));
      for (let i = 0; i < pcs.length; i++) {
        const h = decodeRecordHeader(file.subarray(pcs[i]!.offset - RECORD_HEADER_LEN, pcs[i]!.offset));
        assert.ok(h.hash.equals(hashChunk(datas[i]!)), `record ${i}`);
        assert.ok(file.subarray(pcs[i]!.offset, pcs[i]!.offset + datas[i]!.length).equals(datas[i]!));
      }
      assert.ok(file.subarray(pl.offset, pl.offset + 777).equals(late));
      assert.equal(file.length, pl.offset + 777);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a failed write (a full file system) rejects the appends waiting for it and the seal', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-pack-enospc-'));
    const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=256k,mode=0700', 'bkfs-writepath-test', dir]);
    assert.equal(r.status, 0, `mounting a small tmpfs needs root and mount(8): ${r.stderr}`);
    try {
      fs.mkdirSync(path.join(dir, 'tmp'));
      const w = await PackWriter.create(dir);
      const a = randomBytes(100_000);
      const b = randomBytes(200_000); // does not fit: ENOSPC
      const pa = w.append({ codec: 0, rawLen: a.length, storedLen: a.length, hash: hashChunk(a) }, a);
      const pb = w.append({ codec: 0, rawLen: b.length, storedLen: b.length, hash: hashChunk(b) }, b);
      const results = await Promise.allSettled([pa, pb]);
      assert.equal(results[1]!.status, 'rejected');
      await assert.rejects(w.seal(), /ENOSPC|no space/i);
      await w.abort();
      assert.deepEqual(fs.readdirSync(path.join(dir, 'tmp')), []);
      assert.equal(fs.existsSync(path.join(dir, 'packs')), false);
    } finally {
      spawnSync('umount', [dir]);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
