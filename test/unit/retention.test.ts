/** Retention rules (restic semantics) on synthetic timestamps, in UTC. */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import {
  applyRetention,
  hasRules,
  isoWeekKey,
  parseKeepWithin,
  withinThreshold,
  type RetentionItem,
} from '../../src/repo/retention';

const H = 3600_000;
const D = 24 * H;
const t = (iso: string): number => Date.parse(iso);

/** Ids kept, oldest first. */
function kept(items: RetentionItem[], policy: Parameters<typeof applyRetention>[1]): number[] {
  return applyRetention(items, policy, { utc: true })
    .filter((d) => d.keep)
    .map((d) => d.id)
    .sort((a, b) => a - b);
}

/** Two checkpoints a day (06:00 and 18:00) from 2024-01-01 for `days` days; ids in time order. */
function twiceDaily(days: number): RetentionItem[] {
  const out: RetentionItem[] = [];
  const t0 = t('2024-01-01T06:00:00Z');
  for (let d = 0; d < days; d++) {
    out.push({ id: out.length + 1, time: t0 + d * D });
    out.push({ id: out.length + 1, time: t0 + d * D + 12 * H });
  }
  return out;
}

test('keep-last keeps the n newest, whatever the input order', () => {
  const items = twiceDaily(5).reverse();
  assert.deepEqual(kept(items, { keepLast: 3 }), [8, 9, 10]);
  assert.deepEqual(kept(items, { keepLast: 100 }).length, 10);
});

test('keep-daily keeps the newest of each of the last n days that have checkpoints', () => {
  const items = twiceDaily(10);
  // The evening checkpoint (even ids) of the last 4 days.
  assert.deepEqual(kept(items, { keepDaily: 4 }), [14, 16, 18, 20]);
  // Days without checkpoints do not count.
  const gappy = items.filter((i) => i.id <= 6 || i.id >= 17); // days 1-3 and 9-10
  assert.deepEqual(kept(gappy, { keepDaily: 4 }), [4, 6, 18, 20]);
});

test('rules combine: a checkpoint kept by any rule is kept', () => {
  const items = twiceDaily(10);
  assert.deepEqual(kept(items, { keepLast: 3, keepDaily: 2 }), [18, 19, 20]);
  assert.deepEqual(kept(items, { keepLast: 1, keepDaily: 3 }), [16, 18, 20]);
  const reasons = applyRetention(items, { keepLast: 1, keepDaily: 3 }, { utc: true });
  assert.deepEqual(reasons[0], { id: 20, time: items[19]!.time, keep: true, reasons: ['last', 'daily'] });
  assert.deepEqual(reasons[1]!.reasons, []);
});

test('keep-weekly uses ISO weeks (Monday first; the week of a Thursday)', () => {
  assert.equal(isoWeekKey(t('2024-01-01T00:00:00Z'), true), '2024-W01'); // a Monday
  assert.equal(isoWeekKey(t('2023-12-31T23:00:00Z'), true), '2023-W52'); // Sunday before
  assert.equal(isoWeekKey(t('2021-01-03T12:00:00Z'), true), '2020-W53'); // 2020 had 53 weeks
  assert.equal(isoWeekKey(t('2026-12-31T12:00:00Z'), true), '2026-W53');
  assert.equal(isoWeekKey(t('2019-12-30T12:00:00Z'), true), '2020-W01'); // Monday of 2020's week 1
  // 2024-01-01 is a Monday: 21 days = 3 weeks; keep the newest of the last 2 weeks.
  const items = twiceDaily(21);
  // Last checkpoint of week 3 (Sunday 2024-01-21 18:00, id 42) and of week 2 (Sunday 01-14, id 28).
  assert.deepEqual(kept(items, { keepWeekly: 2 }), [28, 42]);
});

test('keep-monthly keeps the newest of each of the last n months', () => {
  const items: RetentionItem[] = [
    { id: 1, time: t('2024-01-05T00:00:00Z') },
    { id: 2, time: t('2024-01-31T23:59:59Z') },
    { id: 3, time: t('2024-02-01T00:00:00Z') },
    { id: 4, time: t('2024-02-15T00:00:00Z') },
    { id: 5, time: t('2024-04-01T00:00:00Z') },
  ];
  assert.deepEqual(kept(items, { keepMonthly: 2 }), [4, 5]);
  assert.deepEqual(kept(items, { keepMonthly: 5 }), [2, 4, 5]);
  assert.deepEqual(kept(items, { keepMonthly: 1, keepDaily: 2 }), [4, 5]);
});

test('protected checkpoints are always kept and use up no count', () => {
  const items = twiceDaily(3).map((i) => (i.id === 6 || i.id === 1 ? { ...i, protected: true } : i));
  // keep-last 2 skips the protected newest (6) and keeps 4 and 5 besides it.
  assert.deepEqual(kept(items, { keepLast: 2 }), [1, 4, 5, 6]);
  const d = applyRetention(items, { keepLast: 2 }, { utc: true }).find((x) => x.id === 1)!;
  assert.deepEqual(d.reasons, ['protected']);
});

test('a policy needs a rule; counts must be whole numbers', () => {
  assert.equal(hasRules({}), false);
  assert.equal(hasRules({ keepLast: 0 }), false);
  assert.equal(hasRules({ keepWeekly: 1 }), true);
  assert.throws(() => applyRetention([], { keepLast: -1 }), RangeError);
  assert.throws(() => applyRetention([], { keepDaily: 1.5 }), RangeError);
  assert.deepEqual(applyRetention([], { keepLast: 3 }), []);
});

test('equal times: the higher id counts as newer', () => {
  const items = [
    { id: 1, time: 1000 },
    { id: 2, time: 1000 },
  ];
  assert.deepEqual(kept(items, { keepLast: 1 }), [2]);
  assert.deepEqual(kept(items, { keepDaily: 1 }), [2]);
});

test('keep-hourly keeps the newest of each of the last n hours that have checkpoints', () => {
  const t0 = t('2024-03-10T10:00:00Z');
  // Every 20 minutes for 4 hours: 10:00 .. 13:40, ids 1..12.
  const items = Array.from({ length: 12 }, (_, i) => ({ id: i + 1, time: t0 + i * 20 * 60_000 }));
  assert.deepEqual(kept(items, { keepHourly: 2 }), [9, 12]);
  assert.deepEqual(kept(items, { keepHourly: 10 }), [3, 6, 9, 12]);
  assert.deepEqual(applyRetention(items, { keepHourly: 1, keepDaily: 1 }, { utc: true })[0]!.reasons, [
    'hourly',
    'daily',
  ]);
});

test('keep-yearly keeps the newest of each of the last n years', () => {
  const items: RetentionItem[] = [
    { id: 1, time: t('2021-06-01T00:00:00Z') },
    { id: 2, time: t('2021-12-31T23:59:59Z') },
    { id: 3, time: t('2022-01-01T00:00:00Z') },
    { id: 4, time: t('2024-02-15T00:00:00Z') },
    { id: 5, time: t('2024-04-01T00:00:00Z') },
  ];
  assert.deepEqual(kept(items, { keepYearly: 2 }), [3, 5]);
  assert.deepEqual(kept(items, { keepYearly: 9 }), [2, 3, 5]);
});

test('keep-within keeps everything not older than the span before the newest checkpoint', () => {
  const items = twiceDaily(10); // 2024-01-01 06:00 .. 2024-01-10 18:00
  // 2 days before the newest (01-10 18:00) is 01-08 18:00: ids 16 (01-08 18:00) .. 20.
  assert.deepEqual(kept(items, { keepWithin: parseKeepWithin('2d') }), [16, 17, 18, 19, 20]);
  // 36 h before is 01-09 06:00, the time of id 17: a checkpoint exactly at the limit is kept.
  assert.deepEqual(kept(items, { keepWithin: parseKeepWithin('36h') }), [17, 18, 19, 20]);
  assert.deepEqual(kept(items, { keepWithin: parseKeepWithin('1d11h') }), [18, 19, 20]);
  // Relative to the newest checkpoint, not to now: old backups are not all dropped.
  assert.ok(kept(items, { keepWithin: parseKeepWithin('1y') }).length === 20);
  // Months are calendar months: 1 month before 03-31 is 02-31 = 03-02.
  const m: RetentionItem[] = [
    { id: 1, time: t('2024-03-01T12:00:00Z') },
    { id: 2, time: t('2024-03-02T12:00:00Z') },
    { id: 3, time: t('2024-03-31T12:00:00Z') },
  ];
  assert.deepEqual(kept(m, { keepWithin: parseKeepWithin('1m') }), [2, 3]);
  assert.deepEqual(
    applyRetention(items, { keepLast: 1, keepWithin: parseKeepWithin('1d') }, { utc: true })[0]!.reasons,
    ['last', 'within'],
  );
  assert.equal(hasRules({ keepWithin: parseKeepWithin('1h') }), true);
  assert.equal(hasRules({ keepHourly: 1 }), true);
  assert.equal(hasRules({ keepYearly: 1 }), true);
});

test('keep-within spans: restic units, anything else refused', () => {
  assert.deepEqual(parseKeepWithin('1y5m7d2h'), { years: 1, months: 5, days: 7, hours: 2 });
  assert.deepEqual(parseKeepWithin('14d'), { years: 0, months: 0, days: 14, hours: 0 });
  for (const bad of ['', '7', 'd', '1w', '2d3', '0d', '1d1d', ' 1d', '-1d', '1.5d'])
    assert.throws(() => parseKeepWithin(bad), RangeError, bad);
  assert.equal(
    withinThreshold(t('2024-03-31T12:00:00Z'), parseKeepWithin('1y'), true),
    t('2023-03-31T12:00:00Z'),
  );
});
