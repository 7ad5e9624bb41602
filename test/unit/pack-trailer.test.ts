/**
 * The pack trailer of version-2 packs (FORMAT.md, "Pack trailer"): the documented layout, a round
 * trip, and every damage (a flipped byte anywhere in it, a wrong length) refused as DATA_DAMAGED,
 * so an index rebuild from a bucket never indexes a chunk at a wrong place. Plus the size parser
 * of `--cache-size`.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  PACK_HEADER_LEN,
  RECORD_HEADER_LEN,
  TRAILER_FOOTER_LEN,
  decodePackTrailer,
  encodePackTrailer,
  trailerLength,
  type RecordHeader,
} from '../../src/store/packs';
import { isBkfsError } from '../../src/errors';
import { parseSize } from '../../src/store/remote-packs';

function records(n: number): { recs: RecordHeader[]; end: number } {
  const recs: RecordHeader[] = [];
  let end = PACK_HEADER_LEN;
  for (let i = 0; i < n; i++) {
    const rawLen = 262144;
    const storedLen = i % 2 === 0 ? rawLen : 1000 + i;
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
    assert.deepEqual(trailerLength(t.subarray(t.length - 100), size), { length: t.length, recordsEnd: end });
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
