/** Restore planning (pure): map differences and write runs, checked against a byte-level model. */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { diffExtents, planRuns, runTotals, spread, type Ext, type Run } from '../../src/restore/plan';
import { configFileName } from '../../src/restore/engine';

type L = { id: number };

/** Deterministic PRNG in [0, 1). */
function lcg(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}
const E = (offset: number, length: number, id: number | null, chunkOff = 0): Ext<L> => ({
  offset,
  length,
  chunkOff,
  loc: id === null ? null : { id },
});

/** What each byte of [0, size) reads as under a map: 'z' or 'id:offsetInChunk'. */
function model(map: readonly Ext<L>[], size: number): string[] {
  const out = new Array<string>(size).fill('z');
  for (const e of map) {
    for (let i = 0; i < e.length; i++) out[e.offset + i] = e.loc ? `${e.loc.id}:${e.chunkOff + i}` : 'z';
  }
  return out;
}

/** A random sorted, non-overlapping map over [0, size) drawn from a few chunks. */
function randomMap(rnd: () => number, size: number): Ext<L>[] {
  const out: Ext<L>[] = [];
  let pos = Math.floor(rnd() * 4);
  while (pos < size) {
    const len = 1 + Math.floor(rnd() * 12);
    const end = Math.min(size, pos + len);
    const r = rnd();
    if (r < 0.6) out.push(E(pos, end - pos, 1 + Math.floor(rnd() * 3), Math.floor(rnd() * 3)));
    else if (r < 0.8) out.push(E(pos, end - pos, null));
    pos = end + (rnd() < 0.3 ? Math.floor(rnd() * 5) : 0);
  }
  return out;
}

describe('diffExtents', () => {
  it('identical maps differ nowhere', () => {
    const m = [E(0, 10, 1), E(10, 5, null), E(20, 8, 2, 4)];
    assert.deepEqual(diffExtents(m, m, 0, 40), []);
  });

  it('a zero extent and no extent both read as zeros', () => {
    assert.deepEqual(diffExtents([E(0, 50, null)], [], 0, 100), []);
    assert.deepEqual(diffExtents([], [E(10, 20, null)], 0, 100), []);
  });

  it('a split of the same chunk is the same bytes; another chunk or chunk offset is not', () => {
    const a = [E(0, 100, 1)];
    const b = [E(0, 40, 1), E(40, 20, 2), E(60, 40, 1, 60)];
    assert.deepEqual(diffExtents(a, b, 0, 100), [E(40, 20, 2)]);
    assert.deepEqual(diffExtents(a, [E(0, 100, 1, 1)], 0, 100), [E(0, 100, 1, 1)]);
  });

  it('data that became zeros or a hole is a zero extent; new data is the target data', () => {
    const a = [E(0, 30, 1), E(50, 10, 3)];
    const b = [E(0, 10, 1), E(10, 5, null), E(40, 20, 4)];
    assert.deepEqual(diffExtents(a, b, 0, 64), [E(10, 20, null), E(40, 20, 4)]);
  });

  it('clips to the range and adjusts chunk offsets', () => {
    const a: Ext<L>[] = [];
    const b = [E(0, 100, 7, 10)];
    assert.deepEqual(diffExtents(a, b, 25, 60), [E(25, 35, 7, 35)]);
  });

  it('matches a byte-level model on random maps', () => {
    const rnd = lcg(42);
    for (let round = 0; round < 500; round++) {
      const size = 20 + Math.floor(rnd() * 80);
      const a = randomMap(rnd, size);
      const b = randomMap(rnd, size);
      const start = Math.floor(rnd() * 10);
      const end = size - Math.floor(rnd() * 10);
      const d = diffExtents(a, b, start, end);
      const ma = model(a, size);
      const mb = model(b, size);
      // Applying the difference to a gives b inside the range; it covers exactly what differs.
      const md = model(d, size);
      const covered = new Array<boolean>(size).fill(false);
      let prevEnd = -1;
      for (const e of d) {
        assert.ok(e.length > 0 && e.offset >= start && e.offset + e.length <= end);
        assert.ok(e.offset >= prevEnd, 'sorted, non-overlapping');
        prevEnd = e.offset + e.length;
        for (let i = e.offset; i < e.offset + e.length; i++) covered[i] = true;
      }
      for (let i = start; i < end; i++) {
        assert.equal(covered[i], ma[i] !== mb[i], `round ${round} byte ${i}: covered iff different`);
        if (covered[i]) assert.equal(md[i], mb[i], `round ${round} byte ${i}: b's content`);
      }
    }
  });
});

describe('planRuns', () => {
  const ids = (runs: Run<L>[]) =>
    runs.map((r) => (r.kind === 'data' ? `D${r.offset}+${r.length}` : `Z${r.offset}+${r.length}`));

  it('fresh target: data only, grouped while contiguous and within maxRun', () => {
    const ex = [E(0, 4, 1), E(4, 4, 2), E(8, 4, null), E(12, 4, 3), E(16, 4, 4), E(20, 4, 5), E(30, 2, 6)];
    const runs = [...planRuns(ex, { size: 40, maxRun: 8, zeros: false, fillGaps: false })];
    assert.deepEqual(ids(runs), ['D0+8', 'D12+8', 'D20+4', 'D30+2']);
    const first = runs[0]!;
    assert.ok(first.kind === 'data');
    assert.deepEqual(first.pieces, [
      { loc: { id: 1 }, chunkOff: 0, length: 4 },
      { loc: { id: 2 }, chunkOff: 0, length: 4 },
    ]);
  });

  it('unknown target: zero extents and gaps merge into zero runs up to the disk size', () => {
    const ex = [E(4, 4, 1), E(8, 4, null), E(14, 2, null), E(16, 4, 2)];
    const runs = [...planRuns(ex, { size: 30, maxRun: 64, zeros: true, fillGaps: true })];
    assert.deepEqual(ids(runs), ['Z0+4', 'D4+4', 'Z8+8', 'D16+4', 'Z20+10']);
    assert.deepEqual(runTotals(runs), { data: 8, zero: 22, runs: 5 });
  });

  it('an empty map is one zero run or nothing', () => {
    assert.deepEqual(ids([...planRuns([], { size: 10, maxRun: 4, zeros: true, fillGaps: true })]), ['Z0+10']);
    assert.deepEqual(ids([...planRuns([], { size: 10, maxRun: 4, zeros: false, fillGaps: false })]), []);
  });

  it('never writes past the disk size', () => {
    const runs = [...planRuns([E(8, 8, 1, 2)], { size: 12, maxRun: 64, zeros: true, fillGaps: true })];
    assert.deepEqual(ids(runs), ['Z0+8', 'D8+4']);
  });

  it('covers every byte exactly once when filling gaps (random maps)', () => {
    const rnd = lcg(7);
    for (let round = 0; round < 200; round++) {
      const size = 30 + Math.floor(rnd() * 60);
      const map = randomMap(rnd, size);
      const runs = [
        ...planRuns(map, { size, maxRun: 1 + Math.floor(rnd() * 20), zeros: true, fillGaps: true }),
      ];
      const want = model(map, size);
      const got = new Array<string | undefined>(size).fill(undefined);
      for (const r of runs) {
        if (r.kind === 'zero') for (let i = 0; i < r.length; i++) got[r.offset + i] = 'z';
        else {
          let p = r.offset;
          for (const pc of r.pieces)
            for (let i = 0; i < pc.length; i++) got[p++] = `${pc.loc.id}:${pc.chunkOff + i}`;
          assert.equal(p, r.offset + r.length);
        }
      }
      assert.deepEqual(got, want);
    }
  });
});

describe('helpers', () => {
  it('spread picks evenly, including both ends', () => {
    assert.deepEqual(spread([1, 2, 3], 8), [1, 2, 3]);
    assert.deepEqual(spread([0, 1, 2, 3, 4, 5, 6, 7, 8], 3), [0, 4, 8]);
    assert.deepEqual(spread([1, 2, 3], 0), []);
  });

  it('config names cannot climb out of the target directory', () => {
    assert.equal(configFileName('domain.xml'), 'domain.xml');
    assert.equal(configFileName('../../etc/passwd'), 'passwd');
    assert.equal(configFileName('..'), 'config');
    assert.equal(configFileName('a\\..\\b.conf'), 'b.conf');
  });
});
