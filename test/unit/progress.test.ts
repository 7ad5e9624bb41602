/** The progress line at common terminal widths (pure function over the width). */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { renderProgress } from '../../src/cli/progress';
import { rate } from '../../src/util/format';

const MiB = 1 << 20;
const base = { label: 'backup web', done: 800 * MiB, total: 2048 * MiB, elapsedMs: 10_000 };

test('the line fits every width and keeps its tail (units are never cut)', () => {
  for (const columns of [20, 30, 40, 60, 80, 120, 200]) {
    const line = renderProgress({ ...base, columns });
    assert.ok(line.length <= columns - 1, `${columns} columns: '${line}' is ${line.length} long`);
    assert.match(line, /\d+%/, `${columns}: percentage kept`);
    // Whatever is shown ends on a whole token, not a cut unit.
    assert.match(line, /(%|MiB|GiB|MiB\/s|ETA \S+ ?\S*)$/, `${columns}: '${line}'`);
  }
});

test('the bar goes before the numbers', () => {
  const at = (columns: number) => renderProgress({ ...base, columns });
  const w120 = at(120);
  const w80 = at(80);
  const w60 = at(60);
  const w40 = at(40);
  assert.match(w120, /^backup web \[#+\.+\] +39% 800 MiB\/2\.00 GiB 80\.0 MiB\/s ETA 15\.6 s$/);
  assert.match(w80, /^backup web \[#+\.+\] +39% 800 MiB\/2\.00 GiB 80\.0 MiB\/s ETA 15\.6 s$/);
  assert.ok(w80.length <= 79);
  // 60 columns: no room for a 10-wide bar; every number stays.
  assert.equal(w60, 'backup web  39% 800 MiB/2.00 GiB 80.0 MiB/s ETA 15.6 s');
  // 40 columns: the label goes, then the ETA.
  assert.equal(w40, ' 39% 800 MiB/2.00 GiB 80.0 MiB/s');
  assert.ok(!w40.includes('['));
});

test('sizes and rates use one unit system (IEC)', () => {
  const line = renderProgress({ ...base, columns: 120 });
  assert.doesNotMatch(line, /MB\/s|\bMB\b|GB\b/);
  assert.equal(rate(80 * MiB), '80.0 MiB/s');
  assert.equal(rate(1.5 * 1024 * MiB), '1.50 GiB/s');
});

test('start and end: no ETA before any progress, 100% at the end', () => {
  assert.match(
    renderProgress({ ...base, done: 0, elapsedMs: 0, columns: 80 }),
    / {2}0% 0 B\/2\.00 GiB 0 B\/s ETA -$/,
  );
  const end = renderProgress({ ...base, done: base.total, columns: 80 });
  assert.match(end, /\[#{10,}\] 100% 2\.00 GiB\/2\.00 GiB/);
  assert.ok(!end.includes('.]'));
});
