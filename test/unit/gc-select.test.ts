/** gc's pack selection (issue 17.9): which packs are worth rewriting, and what the rewrite writes. */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { choosePacks, packsWrittenFor, SMALL_PACK, DEFAULT_MAX_UNUSED } from '../../src/repo/gc';
import { parseMaxUnused } from '../../src/cli/commands/lifecycle';
import { PACK_HEADER_LEN, PACK_TARGET } from '../../src/store/packs';
import { isBkfsError } from '../../src/errors';

const MiB = 1 << 20;

test('a big pack with a few KiB unused is not rewritten; one mostly unused is', () => {
  const packs = [
    { size: 52.7 * MiB, live: 52.7 * MiB - 19 * 1024 }, // the pack
    { size: 60 * MiB, live: 30 * MiB },
    { size: 64 * MiB, live: 64 * MiB },
  ];
  assert.deepEqual(choosePacks(packs, DEFAULT_MAX_UNUSED, false), { rewrite: [1], small: [] });
  // 0: every pack with any unused byte (the old behaviour); 1: none.
  assert.deepEqual(choosePacks(packs, 0, false).rewrite, [0, 1]);
  assert.deepEqual(choosePacks(packs, 1, false).rewrite, []);
  // Exactly at the threshold stays.
  assert.deepEqual(choosePacks([{ size: 100, live: 80 }], 0.2, false).rewrite, []);
});

test('--repack-small merges two or more small packs, never one alone', () => {
  const small = { size: 4 * MiB, live: 4 * MiB };
  const big = { size: 64 * MiB, live: 64 * MiB };
  assert.deepEqual(choosePacks([big, small], 0.2, true), { rewrite: [], small: [] });
  assert.deepEqual(choosePacks([small, big, small], 0.2, true), { rewrite: [0, 2], small: [0, 2] });
  // One small pack joins a pack that is rewritten anyway.
  const wasteful = { size: 64 * MiB, live: 10 * MiB };
  assert.deepEqual(choosePacks([wasteful, small], 0.2, true), { rewrite: [0, 1], small: [1] });
  assert.ok(SMALL_PACK < PACK_TARGET);
});

test('packsWrittenFor: how many new packs and bytes the rewrite makes', () => {
  assert.deepEqual(packsWrittenFor([]), { packs: 0, bytes: 0 });
  const body = 10 * MiB;
  assert.deepEqual(packsWrittenFor([PACK_HEADER_LEN + body, PACK_HEADER_LEN + body]), {
    packs: 1,
    bytes: PACK_HEADER_LEN + 2 * body,
  });
  const big = 40 * MiB;
  assert.deepEqual(packsWrittenFor([PACK_HEADER_LEN + big, PACK_HEADER_LEN + big]), {
    packs: 2,
    bytes: 2 * (PACK_HEADER_LEN + big),
  });
});

test('--max-unused values', () => {
  assert.equal(parseMaxUnused('20%'), 0.2);
  assert.equal(parseMaxUnused('5'), 0.05);
  assert.equal(parseMaxUnused('2.5%'), 0.025);
  assert.equal(parseMaxUnused('0'), 0);
  assert.equal(parseMaxUnused('unlimited'), 1);
  for (const bad of ['-1', '101%', 'lots', '']) {
    assert.throws(
      () => parseMaxUnused(bad),
      (e) => isBkfsError(e, 'USAGE'),
      bad,
    );
  }
});
