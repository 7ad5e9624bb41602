/** Keys, key slots, paper keys and sealing of encrypted repositories (src/crypto). */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { blake3 } from '@napi-rs/blake-hash';
import { isBkfsError } from '../../src/errors';
import {
  deriveKeys,
  fromPaperKey,
  makeSlot,
  newMasterSecret,
  openAnySlot,
  openSlot,
  toPaperKey,
} from '../../src/crypto/keys';
import { chunkId, open, seal, SealKind, SEAL_OVERHEAD } from '../../src/crypto/seal';

const CHEAP = { N: 1 << 10, r: 8, p: 1 }; // test cost; the default is 2^17
const damaged = (e: unknown): boolean => isBkfsError(e) && e.code === 'DATA_DAMAGED';

describe('sealing', () => {
  const keys = deriveKeys(newMasterSecret());
  const ctx = Buffer.from('chunk-context');

  it('opens what it sealed, for any bytes, and the sealed form hides them', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 5000 }), (data) => {
        const plain = Buffer.from(data);
        const s = seal(keys, SealKind.Chunk, ctx, plain);
        assert.equal(s.length, plain.length + SEAL_OVERHEAD);
        assert.ok(open(keys, SealKind.Chunk, ctx, s).equals(plain));
        if (plain.length >= 16) assert.equal(s.indexOf(plain.subarray(0, 16)), -1);
      }),
      { numRuns: 200 },
    );
  });

  it('a changed byte anywhere is DATA_DAMAGED, never other bytes', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 1, maxLength: 2000 }),
        fc.nat(),
        fc.integer({ min: 1, max: 255 }),
        (data, at, x) => {
          const s = seal(keys, SealKind.Chunk, ctx, Buffer.from(data));
          const i = at % s.length;
          s[i] = (s[i] as number) ^ x;
          assert.throws(() => open(keys, SealKind.Chunk, ctx, s), damaged);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('a sealed object moved to another context, kind or key does not open', () => {
    const s = seal(keys, SealKind.Chunk, ctx, Buffer.from('secret data'));
    assert.throws(() => open(keys, SealKind.Chunk, Buffer.from('another chunk'), s), damaged);
    assert.throws(() => open(keys, SealKind.Manifest, ctx, s), damaged);
    assert.throws(() => open(deriveKeys(newMasterSecret()), SealKind.Chunk, ctx, s), damaged);
    assert.throws(() => open(keys, SealKind.Chunk, ctx, s.subarray(0, 20)), damaged);
  });

  it('chunk ids are keyed: stable within a repository, unrelated across repositories and to the plain hash', () => {
    const other = deriveKeys(newMasterSecret());
    const data = Buffer.from('the same block in two repositories');
    assert.ok(chunkId(keys, data).equals(chunkId(keys, Buffer.from(data))));
    assert.ok(!chunkId(keys, data).equals(chunkId(other, data)));
    assert.ok(!chunkId(keys, data).equals(blake3(data)));
    assert.equal(chunkId(keys, data).length, 32);
  });
});

describe('key slots', () => {
  const master = newMasterSecret();

  it('a passphrase slot opens with its passphrase only', () => {
    const slot = makeSlot(master, 'passphrase', Buffer.from('correct horse'), 'admin', CHEAP);
    assert.ok(openSlot(slot, Buffer.from('correct horse'))?.equals(master));
    assert.equal(openSlot(slot, Buffer.from('correct hors')), null);
    assert.doesNotMatch(
      JSON.stringify(slot),
      new RegExp(master.toString('base64').slice(0, 12).replace(/[+/]/g, '.')),
    );
  });

  it('a key-file slot opens with the file bytes; any slot of several opens the repository', () => {
    const file = newMasterSecret().subarray(0, 32);
    const slots = [
      makeSlot(master, 'passphrase', Buffer.from('pw1'), 'a', CHEAP),
      makeSlot(master, 'keyfile', file, 'b'),
    ];
    assert.ok(openAnySlot(slots, file).master.equals(master));
    assert.equal(openAnySlot(slots, Buffer.from('pw1')).slot.name, 'a');
    assert.throws(
      () => openAnySlot(slots, Buffer.from('nope')),
      (e: unknown) => isBkfsError(e) && e.code === 'KEY_INVALID',
    );
  });

  it('a tampered slot never yields a key', () => {
    const slot = makeSlot(master, 'passphrase', Buffer.from('pw'), 'a', CHEAP);
    const raw = Buffer.from(slot.wrapped, 'base64');
    raw[30] = (raw[30] as number) ^ 1;
    assert.equal(openSlot({ ...slot, wrapped: raw.toString('base64') }, Buffer.from('pw')), null);
    // Relabelling a slot with another key id changes its authenticated data: it does not open.
    const other = deriveKeys(newMasterSecret()).keyId.toString('hex');
    assert.equal(openSlot({ ...slot, keyId: other }, Buffer.from('pw')), null);
    assert.throws(
      () => openSlot({ ...slot, wrapped: 'AAAA' }, Buffer.from('pw')),
      (e: unknown) => isBkfsError(e) && e.code === 'REPO_CORRUPT',
    );
    assert.throws(
      () => openSlot({ ...slot, scrypt: { N: 1 << 30, r: 8, p: 1, salt: '00' } }, Buffer.from('pw')),
      (e: unknown) => isBkfsError(e) && e.code === 'REPO_CORRUPT',
    );
  });
});

describe('paper key', () => {
  it('round-trips, forgiving case, dashes, spaces and look-alike letters', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 64, maxLength: 64 }), (b) => {
        const m = Buffer.from(b);
        const paper = toPaperKey(m);
        assert.match(paper, /^([0-9A-Z]{4}-)+[0-9A-Z]{1,4}$/);
        assert.ok(fromPaperKey(paper).equals(m));
        assert.ok(fromPaperKey(paper.toLowerCase().replace(/-/g, ' ')).equals(m));
      }),
      { numRuns: 100 },
    );
  });

  it('detects a mistyped character', () => {
    const m = newMasterSecret();
    const paper = toPaperKey(m).replace(/-/g, '');
    let caught = 0;
    for (let i = 0; i < paper.length; i++) {
      const c = paper[i] === 'Z' ? 'Y' : paper[i] === 'Y' ? 'Z' : paper[i] === '0' ? '2' : '0';
      const typo = paper.slice(0, i) + c + paper.slice(i + 1);
      try {
        if (!fromPaperKey(typo).equals(m)) caught += 0; // accepted a wrong key: counted below
      } catch (e) {
        if (isBkfsError(e) && e.code === 'USAGE') caught++;
      }
    }
    // The last character carries padding bits only in the body; every other typo must be caught.
    assert.ok(caught >= paper.length - 1, `${caught} of ${paper.length} typos caught`);
  });
});
