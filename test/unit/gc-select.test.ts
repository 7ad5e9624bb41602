/** gc's pack selection (issue 17.9): which packs are worth rewriting, and what the rewrite writes. */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { choosePacks, packsWrittenFor, SMALL_PACK, DEFAULT_MAX_UNUSED } from '../../src/repo/gc';
import { DEFAULT_MAX_UNUSED_OPTION, parseMaxUnused } from '../../src/cli/commands/lifecycle';
import { PACK_HEADER_LEN, PACK_TARGET } from '../../src/store/packs';
import { isBkfsError } from '../../src/errors';

const MiB = 1 << 20;

test('a big pack with a few KiB unused is not rewritten; one mostly unused is', () => {
  const issue = { size: 52.7 * MiB, live: 52.7 * MiB - 19 * 1024 }; // the issue's pack
  assert.deepEqual(choosePacks([issue], DEFAULT_MAX_UNUSED, false), { rewrite: [], small: [] });
  const packs = [issue, { size: 60 * MiB, live: 30 * MiB }, { size: 64 * MiB, live: 64 * MiB }];
  assert.deepEqual(choosePacks(packs, DEFAULT_MAX_UNUSED, false), { rewrite: [1], small: [] });
  // 0: every pack with any unused byte (the old behaviour); 1 (unlimited): none.
  assert.deepEqual(choosePacks(packs, 0, false).rewrite, [0, 1]);
  assert.deepEqual(choosePacks(packs, 1, false).rewrite, []);
});

test('the emptiest packs go first, until what stays unused is within the limit', () => {
  // 10 packs of 10 MiB with 1..10 MiB unused: 55 MiB unused, 45 MiB used.
  const packs = Array.from({ length: 10 }, (_, i) => ({ size: 10 * MiB, live: (9 - i) * MiB }));
  // 20 %: unused after <= 45 x 0.25 = 11.25 MiB: rewrite the 10, 9, 8, 7, 6, 5 MiB ones (45 MiB).
  assert.deepEqual(choosePacks(packs, 0.2, false).rewrite, [4, 5, 6, 7, 8, 9]);
  // Exactly at the limit is within it: 10 MiB unused of 90 MiB used is 10 % of 100 MiB.
  assert.deepEqual(choosePacks([{ size: 100 * MiB, live: 90 * MiB }], 0.1, false).rewrite, []);
});

test('--repack-small merges two or more small packs, never one alone', () => {
  const small = { size: 4 * MiB, live: 4 * MiB };
  const big = { size: 64 * MiB, live: 64 * MiB };
  assert.deepEqual(choosePacks([big, small], 0.05, true), { rewrite: [], small: [] });
  assert.deepEqual(choosePacks([small, big, small], 0.05, true), { rewrite: [0, 2], small: [0, 2] });
  // One small pack joins a pack that is rewritten anyway.
  const wasteful = { size: 64 * MiB, live: 10 * MiB };
  assert.deepEqual(choosePacks([wasteful, small], 0.05, true), { rewrite: [0, 1], small: [1] });
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

test('--max-unused values; the CLI default is DEFAULT_MAX_UNUSED', () => {
  assert.equal(parseMaxUnused(DEFAULT_MAX_UNUSED_OPTION), DEFAULT_MAX_UNUSED);
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
