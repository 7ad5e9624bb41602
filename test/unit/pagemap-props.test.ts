/**
 * fast-check properties of the page-map overlay (src/index/pagemap.ts), beside the hand-written
 * and LCG cases of pagemap.test.ts: for any sorted, non-overlapping base and updates, the result
 * is sorted, non-overlapping, has no empty extents, and every byte maps to what a byte-level model
 * says (the update's chunk and offset where an update covers it, else the base's, else a hole).
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { overlay, type MapExtent } from '../../src/index/pagemap';

const SPAN = 400;

/** Sorted, non-overlapping extents inside [0, SPAN) from gaps and lengths. */
const extentsArb = (origin: number): fc.Arbitrary<MapExtent[]> =>
  fc
    .array(
      fc.record({
        gap: fc.integer({ min: 0, max: 40 }),
        len: fc.integer({ min: 1, max: 60 }),
        chunk: fc.option(fc.integer({ min: 1, max: 1000 }), { nil: null }),
        off: fc.integer({ min: 0, max: 5000 }),
      }),
      { maxLength: 12 },
    )
    .map((xs) => {
      const out: MapExtent[] = [];
      let at = 0;
      for (const x of xs) {
        const offset = at + x.gap;
        if (offset + x.len > SPAN) break;
        out.push({ offset, length: x.len, chunkId: x.chunk, chunkOff: x.chunk === null ? 0 : x.off, origin });
        at = offset + x.len;
      }
      return out;
    });

type Cell = { chunk: number | null; off: number; origin: number } | undefined;

function model(exts: readonly MapExtent[]): Cell[] {
  const cells: Cell[] = new Array<Cell>(SPAN).fill(undefined);
  for (const e of exts) {
    for (let i = 0; i < e.length; i++) {
      cells[e.offset + i] = {
        chunk: e.chunkId,
        off: e.chunkId === null ? 0 : e.chunkOff + i,
        origin: e.origin,
      };
    }
  }
  return cells;
}

describe('overlay properties (fast-check)', () => {
  it('matches the byte-level model and keeps the map well-formed', () => {
    fc.assert(
      fc.property(extentsArb(1), extentsArb(2), (base, updates) => {
        const out = overlay(base, updates);
        let prevEnd = 0;
        for (const e of out) {
          assert.ok(e.length > 0, 'empty extent');
          assert.ok(e.offset >= prevEnd, 'unsorted or overlapping');
          prevEnd = e.offset + e.length;
        }
        const want = model(base);
        const up = model(updates);
        for (let i = 0; i < SPAN; i++) if (up[i]) want[i] = up[i];
        assert.deepEqual(model(out), want);
      }),
      { numRuns: 1000 },
    );
  });

  it('overlaying nothing changes nothing; overlaying twice is the same as once', () => {
    fc.assert(
      fc.property(extentsArb(1), extentsArb(2), (base, updates) => {
        assert.deepEqual(overlay(base, []), base);
        const once = overlay(base, updates);
        assert.deepEqual(model(overlay(once, updates)), model(once));
      }),
      { numRuns: 500 },
    );
  });
});
