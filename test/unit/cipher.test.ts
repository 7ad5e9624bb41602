/**
 * The repository cipher and its plumbing (src/crypto/cipher.ts, keyring.ts; codec decodeStored;
 * the ingest pool sealing in its workers; the chunk loader opening sealed records, whole and by
 * frame). Real libsodium, zstd and worker threads; a real pack file on disk.
 */
import { describe, it, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { isBkfsError } from '../../src/errors';
import { Cipher } from '../../src/crypto/cipher';
import { makeSlot, newMasterSecret } from '../../src/crypto/keys';
import {
  acceptHandoff,
  forgetMasters,
  handoffPayload,
  rememberedMaster,
  rememberMaster,
  setKeyProvider,
  unlock,
  type EncryptionConfig,
} from '../../src/crypto/keyring';
import { CODEC_FRAMES, decodeStored, encodeChunk, hashChunk } from '../../src/store/codec';
import { IngestPool } from '../../src/store/ingest-pool';
import { PackReader, PackWriter, checkRecordLengths } from '../../src/store/packs';
import { ChunkLoader } from '../../src/store/chunk-cache';
import { SCHEMA } from '../../src/index/schema';

const CHEAP = { N: 1 << 10, r: 8, p: 1 };
const damaged = (e: unknown): boolean => isBkfsError(e) && e.code === 'DATA_DAMAGED';
const code = (c: string) => (e: unknown) => isBkfsError(e) && e.code === c;
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-cipher-unit-'));
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
  setKeyProvider(undefined);
  forgetMasters();
});

/** Compressible chunk data (so codec 2 frames are written). */
function chunkData(seed: number, len = 256 * 1024): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i += 64) b.write(`line ${seed} ${i} ${'x'.repeat(i % 40)}\n`, i);
  return b;
}

describe('Cipher: chunk records', () => {
  const c = new Cipher(newMasterSecret());

  it('ids are keyed: not the plain BLAKE3, and different under another key', () => {
    const d = chunkData(1);
    assert.ok(!c.chunkHash(d).equals(hashChunk(d)));
    assert.ok(!c.chunkHash(d).equals(new Cipher(newMasterSecret()).chunkHash(d)));
    assert.ok(c.chunkHash(d).equals(c.chunkHash(Buffer.from(d))));
  });

  it('decodeStored opens and decodes a sealed record; a flipped bit or a swapped record is DATA_DAMAGED', () => {
    const a = chunkData(2);
    const b = chunkData(3);
    const ia = c.chunkHash(a);
    const ib = c.chunkHash(b);
    const ea = encodeChunk(a, 1, ia);
    assert.equal(ea.codec, CODEC_FRAMES);
    const sa = c.sealChunk(ia, ea.data);
    const sb = c.sealChunk(ib, encodeChunk(b, 1, ib).data);
    assert.equal(sa.indexOf(a.subarray(0, 32)), -1);
    checkRecordLengths({ codec: ea.codec, rawLen: a.length, storedLen: sa.length }, 256 * 1024, true);
    assert.ok(decodeStored(c, sa, ea.codec, a.length, ia).equals(a));
    for (const at of [0, 5, 40, Math.floor(sa.length / 2), sa.length - 1]) {
      const x = Buffer.from(sa);
      x[at]! ^= 0x10;
      assert.throws(() => decodeStored(c, x, ea.codec, a.length, ia), damaged, `bit at ${at}`);
    }
    // b's record where a's should be: bound to b's id, it does not open as a.
    assert.throws(() => decodeStored(c, sb, ea.codec, a.length, ia), damaged);
    // The plain path does not accept sealed bytes either.
    assert.throws(() => decodeStored(null, sa, ea.codec, a.length, ia), damaged);
  });

  it('manifests and configs are bound to their checkpoint (and name)', () => {
    const m = c.sealManifest('a'.repeat(32), Buffer.from('manifest'));
    assert.equal(c.openManifest('a'.repeat(32), m).toString(), 'manifest');
    assert.throws(() => c.openManifest('b'.repeat(32), m), code('REPO_CORRUPT'));
    const x = c.sealConfig('u1', 'domain.xml', Buffer.from('<domain/>'));
    assert.equal(c.openConfig('u1', 'domain.xml', x).toString(), '<domain/>');
    assert.throws(() => c.openConfig('u2', 'domain.xml', x), damaged);
    assert.throws(() => c.openConfig('u1', 'other.xml', x), damaged);
  });
});

describe('IngestPool and ChunkLoader on an encrypted repository', () => {
  it('workers name chunks with the keyed hash and seal them; the loader reads them back whole, also for a 4 KiB range', async () => {
    const c = new Cipher(newMasterSecret());
    const pool = new IngestPool(1, 2, c);
    const datas = [chunkData(10), crypto.randomBytes(256 * 1024), chunkData(11, 100_000)];
    let results: Awaited<ReturnType<IngestPool['process']>>[];
    try {
      results = await Promise.all(datas.map((d) => pool.process(Buffer.from(d))));
    } finally {
      await pool.close();
    }
    fs.mkdirSync(path.join(work, 'tmp'), { recursive: true });
    const w = await PackWriter.create(work, 'tmp', true);
    const placed = [];
    for (let i = 0; i < datas.length; i++) {
      const r = results[i]!;
      assert.ok(r.hash.equals(c.chunkHash(datas[i]!)), 'keyed id');
      // Even a raw (incompressible) chunk comes back sealed, never as the caller's plaintext.
      assert.equal(r.stored.indexOf(datas[i]!.subarray(0, 64)), -1);
      placed.push(
        await w.append(
          { codec: r.codec, rawLen: datas[i]!.length, storedLen: r.stored.length, hash: r.hash },
          r.stored,
        ),
      );
    }
    await w.seal();
    const db = new Database(':memory:');
    db.exec(SCHEMA);
    db.prepare('INSERT INTO packs (id, name, size, created) VALUES (1, ?, 0, 0)').run(w.name);
    const ins = db.prepare(
      'INSERT INTO chunks (id, hash, pack_id, offset, stored_len, raw_len, codec) VALUES (?, ?, 1, ?, ?, ?, ?)',
    );
    placed.forEach((p, i) => ins.run(i + 1, p.hash, p.offset, p.storedLen, p.rawLen, p.codec));
    const reader = new PackReader(work);
    reader.cipher = c;
    const loader = new ChunkLoader(db, reader, 8 << 20);
    try {
      // A 4 KiB read of a frames chunk: a sealed record is opened whole, so the whole chunk is
      // decoded and checked (no frame-only read), and the range comes from it.
      const out = Buffer.alloc(4096);
      await loader.copyRange(1, loader.location(1), 40_000, 44_096, out, 0);
      assert.ok(out.equals(datas[0]!.subarray(40_000, 44_096)));
      assert.equal(loader.framesDecoded, 0);
      assert.equal(loader.chunksDecoded, 1);
      for (let i = 0; i < datas.length; i++)
        assert.ok((await loader.load(i + 1)).equals(datas[i]!), `chunk ${i + 1}`);
      // Without the cipher the same records are damage, never bytes.
      const plain = new ChunkLoader(db, new PackReader(work), 8 << 20);
      await assert.rejects(plain.load(1), damaged);
    } finally {
      reader.close();
      db.close();
    }
  });
});

describe('keyring', () => {
  const master = newMasterSecret();
  const c = new Cipher(master);
  const enc: EncryptionConfig = {
    cipher: 'xchacha20-poly1305',
    idHash: 'blake3-keyed',
    keyId: c.keyIdHex,
    slots: [
      makeSlot(master, 'passphrase', Buffer.from('pw'), 'passphrase', CHEAP),
      makeSlot(master, 'keyfile', Buffer.alloc(32, 7), 'keyfile', CHEAP),
    ],
  };

  it('KEY_REQUIRED without a source, KEY_INVALID for wrong secrets, then the master is remembered', () => {
    forgetMasters();
    setKeyProvider(undefined);
    assert.throws(() => unlock('/r', 'id', enc), code('KEY_REQUIRED'));
    setKeyProvider(() => [
      { kind: 'passphrase', secret: Buffer.from('nope'), from: 'a' },
      { kind: 'keyfile', secret: Buffer.alloc(32, 8), from: 'b' },
    ]);
    assert.throws(() => unlock('/r', 'id', enc), code('KEY_INVALID'));
    assert.equal(rememberedMaster(enc.keyId), undefined);
    let asked = 0;
    setKeyProvider(() => {
      asked++;
      return [{ kind: 'keyfile', secret: Buffer.alloc(32, 7), from: 'kf' }];
    });
    assert.equal(unlock('/r', 'id', enc).keyIdHex, enc.keyId);
    assert.equal(unlock('/r', 'id', enc).keyIdHex, enc.keyId);
    assert.equal(asked, 1, 'the second open uses the remembered key');
    forgetMasters();
    setKeyProvider(() => [{ kind: 'master', secret: master, from: 'paper' }]);
    assert.equal(unlock('/r', 'id', enc).keyIdHex, enc.keyId);
  });

  it('hands the masters to a child through an fd and removes BKFS_KEY_FD', () => {
    forgetMasters();
    assert.equal(handoffPayload(), null);
    rememberMaster(master);
    const payload = handoffPayload()!;
    forgetMasters();
    const file = path.join(work, 'handoff');
    fs.writeFileSync(file, payload, { mode: 0o600 });
    const fd = fs.openSync(file, 'r');
    const env: NodeJS.ProcessEnv = { BKFS_KEY_FD: String(fd) };
    acceptHandoff(env);
    assert.equal(env.BKFS_KEY_FD, undefined);
    assert.ok(rememberedMaster(enc.keyId)?.equals(master));
    assert.throws(() => fs.fstatSync(fd), /EBADF/, 'the fd is closed');
  });
});
