import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { overlay, type MapExtent } from '../../src/index/pagemap';

const e = (offset: number, length: number, chunkId: number | null, chunkOff = 0, origin = 1): MapExtent => ({
  offset,
  length,
  chunkId,
  chunkOff,
  origin,
});

/** Byte-level model: which (chunk, offset-in-chunk) each disk byte maps to. */
function model(exts: readonly MapExtent[], size: number): string[] {
  const m = new Array<string>(size).fill('-');
  for (const x of exts)
    for (let i = 0; i < x.length; i++)
      m[x.offset + i] = x.chunkId === null ? '0' : `${x.chunkId}:${x.chunkOff + i}`;
  return m;
}

function assertSortedDisjoint(exts: readonly MapExtent[]): void {
  for (let i = 1; i < exts.length; i++) {
    assert.ok(exts[i - 1]!.offset + exts[i - 1]!.length <= exts[i]!.offset, 'sorted and disjoint');
  }
  for (const x of exts) assert.ok(x.length > 0, 'non-empty');
}

describe('overlay (copy-on-write page map)', () => {
  it('splits a base extent around an update and adjusts chunk offsets', () => {
    const out = overlay([e(0, 100, 7)], [e(30, 10, 9, 0, 2)]);
    assert.deepEqual(out, [e(0, 30, 7), e(30, 10, 9, 0, 2), e(40, 60, 7, 40)]);
  });

  it('zero updates override data; untouched base extents are kept as they are', () => {
    const out = overlay([e(0, 10, 1), e(20, 10, 2), e(40, 10, 3)], [e(5, 20, null, 0, 2)]);
    assert.deepEqual(out, [e(0, 5, 1), e(5, 20, null, 0, 2), e(25, 5, 2, 5), e(40, 10, 3)]);
  });

  it('an update covering several base extents replaces all of them', () => {
    const out = overlay([e(0, 10, 1), e(10, 10, 2), e(20, 10, 3)], [e(0, 30, 4, 0, 2)]);
    assert.deepEqual(out, [e(0, 30, 4, 0, 2)]);
  });

  it('matches a byte-level model on random maps', () => {
    let seed = 12345;
    const rnd = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    const size = 256;
    const randomMap = (origin: number): MapExtent[] => {
      const out: MapExtent[] = [];
      let off = rnd(8);
      while (off < size) {
        const len = Math.min(size - off, 1 + rnd(40));
        out.push(e(off, len, rnd(4) === 0 ? null : 100 + rnd(50), rnd(64), origin));
        off += len + rnd(20);
      }
      return out;
    };
    for (let round = 0; round < 500; round++) {
      const base = randomMap(1);
      const upd = randomMap(2);
      const out = overlay(base, upd);
      assertSortedDisjoint(out);
      const expect = model(base, size);
      const u = model(upd, size);
      for (let i = 0; i < size; i++) if (u[i] !== '-') expect[i] = u[i]!;
      assert.deepEqual(model(out, size), expect, `round ${round}`);
    }
  });
});
