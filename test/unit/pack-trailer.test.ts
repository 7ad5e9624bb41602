/**
 * The pack trailer of version-2 packs (FORMAT.md, "Pack trailer"): the documented layout, a round
 * trip, and every damage (a flipped byte anywhere in it, a wrong length) refused as DATA_DAMAGED,
 * so an index rebuild from a bucket never indexes a chunk at a wrong place. The sealed trailer of
 * version-3 packs (encrypted repositories, FORMAT.md "Sealed pack trailer"): a round trip with the
 * key (real libsodium), and refused without it, under another key, moved to another pack, with a
 * byte flipped, or replaced by a plain trailer. Plus the size parser of `--cache-size`.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  PACK_HEADER_LEN,
  RECORD_HEADER_LEN,
  SEALED_TRAILER_FOOTER_LEN,
  TRAILER_FOOTER_LEN,
  decodePackTrailer,
  encodePackTrailer,
  trailerBytesFor,
  trailerKindOf,
  trailerLength,
  type RecordHeader,
} from '../../src/store/packs';
import { isBkfsError } from '../../src/errors';
import { parseSize } from '../../src/store/remote-packs';
import { Cipher } from '../../src/crypto/cipher';
import { newMasterSecret } from '../../src/crypto/keys';
import { SEAL_OVERHEAD } from '../../src/crypto/seal';

const damaged = (e: unknown): boolean => isBkfsError(e) && e.code === 'DATA_DAMAGED';

/** Records as a pack holds them; `sealed`: an encrypted repository's (stored_len counts the seal). */
function records(n: number, sealed = false): { recs: RecordHeader[]; end: number } {
  const recs: RecordHeader[] = [];
  let end = PACK_HEADER_LEN;
  for (let i = 0; i < n; i++) {
    const rawLen = 262144;
    const storedLen = (i % 2 === 0 ? rawLen : 1000 + i) + (sealed ? SEAL_OVERHEAD : 0);
    recs.push({ codec: i % 2 === 0 ? 0 : 1, rawLen, storedLen, hash: randomBytes(32) });
    end += RECORD_HEADER_LEN + storedLen;
  }
  return { recs, end };
}

describe('pack trailer', () => {
  it('has the documented layout and round-trips with the records offsets', () => {
    const { recs, end } = records(5);
    const t = encodePackTrailer(recs, end);
    assert.equal(t.length, 5 * RECORD_HEADER_LEN + TRAILER_FOOTER_LEN);
    assert.equal(t.subarray(t.length - 8).toString('ascii'), 'BKPKTRLR');
    assert.equal(t.readUInt32BE(t.length - TRAILER_FOOTER_LEN), 5);
    assert.equal(Number(t.readBigUInt64BE(t.length - TRAILER_FOOTER_LEN + 4)), end);
    const size = end + t.length;
    assert.deepEqual(trailerLength(t.subarray(t.length - 100), size), {
      length: t.length,
      recordsEnd: end,
      sealed: false,
    });
    const got = decodePackTrailer(t, size);
    let off = PACK_HEADER_LEN;
    got.forEach((c, i) => {
      assert.equal(c.offset, off + RECORD_HEADER_LEN);
      assert.ok(c.hash.equals(recs[i]!.hash));
      assert.equal(c.storedLen, recs[i]!.storedLen);
      off += RECORD_HEADER_LEN + c.storedLen;
    });
  });

  it('an empty pack has a footer-only trailer', () => {
    const t = encodePackTrailer([], PACK_HEADER_LEN);
    assert.deepEqual(decodePackTrailer(t, PACK_HEADER_LEN + t.length), []);
  });

  it('refuses a trailer with any byte flipped, or that does not fit the pack size', () => {
    const { recs, end } = records(3);
    const t = encodePackTrailer(recs, end);
    const size = end + t.length;
    for (let i = 0; i < t.length; i++) {
      const bad = Buffer.from(t);
      bad[i]! ^= 0x10;
      assert.throws(
        () => decodePackTrailer(bad, size),
        (e: unknown) => isBkfsError(e) && e.code === 'DATA_DAMAGED',
        `byte ${i}`,
      );
    }
    assert.equal(trailerLength(t, size + 1), null, 'a pack one byte longer: not this trailer');
    assert.throws(
      () => decodePackTrailer(t, size - 1),
      (e: unknown) => isBkfsError(e) && e.code === 'DATA_DAMAGED',
    );
  });
});

describe('sealed pack trailer (pack version 3)', () => {
  const cipher = new Cipher(newMasterSecret());
  const pack = 'a1'.repeat(16);
  const other = 'b2'.repeat(16);

  it('round-trips with the key; its clear footer says where the records end and nothing else', () => {
    const { recs, end } = records(4, true);
    const t = encodePackTrailer(recs, end, { cipher, pack });
    const plainLen = 4 * RECORD_HEADER_LEN + TRAILER_FOOTER_LEN;
    assert.equal(t.length, plainLen + SEAL_OVERHEAD + SEALED_TRAILER_FOOTER_LEN);
    assert.equal(t.subarray(t.length - 8).toString('ascii'), 'BKPKTRLS');
    assert.equal(t.readUInt32BE(t.length - SEALED_TRAILER_FOOTER_LEN), plainLen + SEAL_OVERHEAD);
    assert.equal(Number(t.readBigUInt64BE(t.length - SEALED_TRAILER_FOOTER_LEN + 4)), end);
    // No record header (nor a chunk id) in the clear.
    for (const r of recs) assert.equal(t.indexOf(r.hash), -1);
    assert.equal(t.indexOf('BKCH'), -1);
    const size = end + t.length;
    assert.deepEqual(trailerLength(t.subarray(t.length - 64), size), {
      length: t.length,
      recordsEnd: end,
      sealed: true,
    });
    const got = decodePackTrailer(t, size, undefined, { cipher, pack });
    assert.equal(got.length, 4);
    let off = PACK_HEADER_LEN;
    got.forEach((c, i) => {
      assert.equal(c.offset, off + RECORD_HEADER_LEN);
      assert.ok(c.hash.equals(recs[i]!.hash));
      assert.equal(c.rawLen, recs[i]!.rawLen);
      assert.equal(c.storedLen, recs[i]!.storedLen, 'a sealed record: raw length + the seal');
      off += RECORD_HEADER_LEN + c.storedLen;
    });
  });

  it('does not open without the key, under another key, or moved to another pack', () => {
    const { recs, end } = records(3, true);
    const t = encodePackTrailer(recs, end, { cipher, pack });
    const size = end + t.length;
    assert.throws(() => decodePackTrailer(t, size), damaged, 'no key');
    assert.throws(
      () => decodePackTrailer(t, size, undefined, { cipher: new Cipher(newMasterSecret()), pack }),
      damaged,
      'another key',
    );
    assert.throws(() => decodePackTrailer(t, size, undefined, { cipher, pack: other }), damaged, 'moved');
  });

  it('refuses any flipped byte, and a plain trailer where a sealed one is due', () => {
    const { recs, end } = records(2, true);
    const t = encodePackTrailer(recs, end, { cipher, pack });
    const size = end + t.length;
    for (let i = 0; i < t.length; i++) {
      const bad = Buffer.from(t);
      bad[i]! ^= 0x04;
      assert.throws(() => decodePackTrailer(bad, size, undefined, { cipher, pack }), damaged, `byte ${i}`);
    }
    const plain = encodePackTrailer(recs, end);
    const psize = end + plain.length;
    assert.throws(() => decodePackTrailer(plain, psize, undefined, { cipher, pack }, false), damaged);
    // A version-2 pack of an encrypted repository written before sealed trailers still reads.
    assert.equal(decodePackTrailer(plain, psize, undefined, { cipher, pack }, true).length, 2);
  });
});

describe('trailer bytes as gc and stats count them', () => {
  it('equal the length of the trailer encoded for that many records: plain, sealed, none', () => {
    const cipher = new Cipher(newMasterSecret());
    for (const n of [0, 1, 7, 300]) {
      const { recs, end } = records(n);
      assert.equal(trailerBytesFor(n, 'plain'), encodePackTrailer(recs, end).length, `plain, ${n} records`);
      const s = records(n, true);
      const sealed = encodePackTrailer(s.recs, s.end, { cipher, pack: 'c3'.repeat(16) });
      assert.equal(trailerBytesFor(n, 'sealed'), sealed.length, `sealed, ${n} records`);
      assert.equal(trailerBytesFor(n, 'none'), 0);
    }
    assert.deepEqual(
      [trailerKindOf(false, true), trailerKindOf(true, false), trailerKindOf(true, true)],
      ['none', 'plain', 'sealed'],
    );
  });
});

describe('--cache-size', () => {
  it('parses sizes', () => {
    assert.equal(parseSize('512M'), 512 * 1024 ** 2);
    assert.equal(parseSize('2G'), 2 * 1024 ** 3);
    assert.equal(parseSize('1.5g'), 1.5 * 1024 ** 3);
    assert.equal(parseSize('4096'), 4096);
    assert.equal(parseSize('10GiB'), 10 * 1024 ** 3);
    assert.equal(parseSize('lots'), undefined);
  });
});
