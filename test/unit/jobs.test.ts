/**
 * The pure parts of `bkfs run`: job file validation (one JOB_INVALID line with file:line and the
 * key path), domain selection (names, globs, all, excludes), the level policy (a full every N
 * days / every Nth backup) and the scheduler's limits (overall and per host never exceeded,
 * every task run once).
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { parseJobFile, keyLine, retentionArgs } from '../../src/jobs/jobfile';
import { calendarDays, decideLevel, Scheduler, selectDomains, type HistoryItem } from '../../src/jobs/plan';
import { BkfsError } from '../../src/errors';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { renderRunning, summaryTable } from '../../src/cli/commands/run';
import { runFailure, type RunResult } from '../../src/jobs/run';

const GOOD = `# estate
repository = "/srv/bkfs"
concurrency = 4
per-host = 2
retry-lock = "1h"

[level]
mode = "auto"
full-every-days = 30
full-every-backups = 10

[retention]
keep-daily = 7
keep-weekly = 4
keep-within = "14d"

[gc]
enabled = true
max-unused = "10%"

[[host]]
name = "kvm1"
domains = ["web-*", "db1"]
exclude = ["web-test"]

[[host]]
name = "kvm2"
uri = "qemu+ssh://root@kvm2/system"
domains = ["all"]
concurrency = 1
vm-prefix = "kvm2-"
`;

function invalid(text: string, re: RegExp): void {
  assert.throws(
    () => parseJobFile(text, 'estate.toml'),
    (e: unknown) => {
      assert.ok(e instanceof BkfsError, String(e));
      assert.equal(e.code, 'JOB_INVALID');
      assert.equal(EXIT_CODES[e.code], 29);
      assert.ok(!e.message.includes('\n'), `one line: ${e.message}`);
      assert.match(e.message, re);
      return true;
    },
  );
}

describe('job file', () => {
  it('a valid file gives the job with its defaults', () => {
    const j = parseJobFile(GOOD, 'estate.toml');
    assert.equal(j.repository, '/srv/bkfs');
    assert.equal(j.concurrency, 4);
    assert.equal(j.retryLock, '1h');
    assert.equal(j.freeze, true);
    assert.deepEqual(j.level, { mode: 'auto', fullEveryDays: 30, fullEveryBackups: 10, between: 'inc' });
    assert.deepEqual(j.retention, {
      keepDaily: 7,
      keepWeekly: 4,
      keepWithin: { years: 0, months: 0, days: 14, hours: 0 },
    });
    assert.deepEqual(retentionArgs(j.retention!), [
      '--keep-daily',
      '7',
      '--keep-weekly',
      '4',
      '--keep-within',
      '14d',
    ]);
    assert.deepEqual(j.gc, { enabled: true, maxUnused: '10%' });
    assert.equal(j.hosts.length, 2);
    assert.deepEqual(j.hosts[0], {
      name: 'kvm1',
      uri: 'qemu:///system',
      domains: ['web-*', 'db1'],
      exclude: ['web-test'],
      concurrency: 2,
      vmPrefix: '',
    });
    assert.equal(j.hosts[1]!.concurrency, 1);
    assert.equal(j.hosts[1]!.vmPrefix, 'kvm2-');
  });

  it('the smallest file: a repository and one host', () => {
    const j = parseJobFile('repository = "r"\n[[host]]\ndomains = ["all"]\n', 'x.toml');
    assert.equal(j.hosts[0]!.uri, 'qemu:///system');
    assert.equal(j.hosts[0]!.name, 'qemu:///system');
    assert.equal(j.level.mode, 'auto');
    assert.equal(j.retention, undefined);
    assert.equal(j.gc.enabled, false);
  });

  it('an unknown key: its line, its path and the keys allowed there', () => {
    invalid(
      GOOD.replace('vm-prefix = "kvm2-"', 'vm-prefix = "kvm2-"\nexclude_ = ["x"]'),
      /^estate\.toml:32: host\[1\]\.exclude_: unknown key \(known here: name, uri, domains/,
    );
    invalid(
      GOOD.replace('[gc]', 'compress = true\n[gc]'),
      /^estate\.toml:17: retention\.compress: unknown key/,
    );
    invalid(`repo = "x"\n${GOOD}`, /^estate\.toml:1: repo: unknown key \(known here: repository,/);
  });

  it('a bad level', () => {
    invalid(
      GOOD.replace('mode = "auto"', 'mode = "weekly"'),
      /^estate\.toml:8: level\.mode: must be one of "auto", "full", "inc", "diff", "copy"$/,
    );
    invalid(
      GOOD.replace('mode = "auto"', 'mode = "full"'),
      /^estate\.toml:9: level\.full-every-days: only with mode = "auto"$/,
    );
    invalid(
      GOOD.replace('full-every-days = 30', 'full-every-days = 0'),
      /^estate\.toml:9: level\.full-every-days: must be at least 1$/,
    );
  });

  it('bad keep values and numbers', () => {
    invalid(
      GOOD.replace('keep-daily = 7', 'keep-daily = -1'),
      /^estate\.toml:13: retention\.keep-daily: must be at least 0$/,
    );
    invalid(
      GOOD.replace('keep-daily = 7', 'keep-daily = 2.5'),
      /^estate\.toml:13: retention\.keep-daily: must be a whole number, got 2\.5$/,
    );
    invalid(
      GOOD.replace('keep-daily = 7', 'keep-daily = "7"'),
      /^estate\.toml:13: retention\.keep-daily: must be a number, got string$/,
    );
    invalid(
      GOOD.replace('keep-within = "14d"', 'keep-within = "2 weeks"'),
      /^estate\.toml:15: retention\.keep-within: must be a span such as 14d/,
    );
    invalid(
      GOOD.replace('concurrency = 4', 'concurrency = 0'),
      /^estate\.toml:3: concurrency: must be at least 1$/,
    );
    invalid(
      GOOD.replace('retry-lock = "1h"', 'retry-lock = "soon"'),
      /^estate\.toml:5: retry-lock: must be a duration/,
    );
    invalid(
      GOOD.replace('max-unused = "10%"', 'max-unused = "lots"'),
      /^estate\.toml:19: gc\.max-unused: must be a percentage/,
    );
    invalid(
      'repository = "r"\n[retention]\n[[host]]\ndomains = ["a"]\n',
      /^estate\.toml:2: retention: give at least one keep-\* rule$/,
    );
  });

  it('missing repository, missing hosts, empty domains, duplicate host names', () => {
    invalid(GOOD.replace('repository = "/srv/bkfs"\n', ''), /^estate\.toml: repository: missing$/);
    invalid('repository = "r"\n', /^estate\.toml: host: missing$/);
    invalid(
      GOOD.replace('domains = ["all"]', 'domains = []'),
      /^estate\.toml:29: host\[1\]\.domains: must name at least one domain/,
    );
    invalid(
      GOOD.replace('name = "kvm2"', 'name = "kvm1"'),
      /^estate\.toml:\d+: host\[1\]: host name 'kvm1' is used by host\[0\] too/,
    );
  });

  it('TOML syntax errors carry their line', () => {
    invalid('repository = "r"\n[[host]]\ndomains = ["a",\n', /^estate\.toml:\d+: not valid TOML: /);
    invalid('repository = "r"\nrepository = "s"\n', /^estate\.toml:2: not valid TOML: /);
  });

  it('keyLine finds keys in tables and arrays of tables', () => {
    assert.equal(keyLine(GOOD, ['concurrency']), 3);
    assert.equal(keyLine(GOOD, ['gc', 'enabled']), 18);
    assert.equal(keyLine(GOOD, ['host', 1, 'concurrency']), 30);
    assert.equal(keyLine(GOOD, ['host', 0, 'concurrency']), undefined);
    assert.equal(keyLine(GOOD, ['host', 1]), 26);
  });
});

describe('domain selection', () => {
  const host = ['web-1', 'web-2', 'web-test', 'db1', 'db2', 'mail'];

  it('names, globs and excludes', () => {
    assert.deepEqual(selectDomains(host, ['web-*', 'db1'], ['web-test']), {
      domains: ['web-1', 'web-2', 'db1'],
      missing: [],
    });
    assert.deepEqual(selectDomains(host, ['db?'], []).domains, ['db1', 'db2']);
    assert.deepEqual(selectDomains(host, ['web-[12]'], []).domains, ['web-1', 'web-2']);
  });

  it('all, minus excludes (globs too)', () => {
    assert.deepEqual(selectDomains(host, ['all'], ['web-*', 'mail']).domains, ['db1', 'db2']);
    assert.deepEqual(selectDomains(host, ['*'], []).domains, host);
  });

  it('a plain name the host lacks is missing; a glob matching nothing is not', () => {
    assert.deepEqual(selectDomains(host, ['web-9', 'ftp-*', 'db1'], []), {
      domains: ['db1'],
      missing: ['web-9'],
    });
    assert.deepEqual(selectDomains(host, ['web-9'], ['web-9']), { domains: [], missing: [] });
  });

  it('each domain once, in the host order, whatever matches it twice', () => {
    assert.deepEqual(selectDomains(host, ['mail', 'm*', 'all'], ['d*']).domains, [
      'web-1',
      'web-2',
      'web-test',
      'mail',
    ]);
  });

  it('glob characters in a domain name only match as globs (a name with dots is literal)', () => {
    assert.deepEqual(selectDomains(['a.b', 'axb'], ['a.b'], []).domains, ['a.b']);
  });
});

describe('level policy', () => {
  const day = 86_400_000;
  const t0 = Date.UTC(2026, 0, 1, 1, 0, 0);
  const auto = { mode: 'auto' as const, between: 'inc' as const };

  it('no history, or only copies: a full', () => {
    assert.equal(decideLevel([], { ...auto, fullEveryDays: 7 }, t0, true).level, 'full');
    assert.equal(decideLevel([{ level: 'copy', time: t0 }], auto, t0 + day, true).level, 'full');
  });

  it('auto without rotation: inc (passed as --level auto) forever after the first full', () => {
    const h: HistoryItem[] = [{ level: 'full', time: t0 }];
    for (let i = 1; i < 50; i++) h.push({ level: 'inc', time: t0 + i * day });
    assert.deepEqual(decideLevel(h, auto, t0 + 60 * day, true), {
      level: 'auto',
      expect: 'inc',
      reason: 'since the last backup',
    });
  });

  it('a full every N calendar days, whatever the time of day of the runs', () => {
    const p = { ...auto, fullEveryDays: 7 };
    const h: HistoryItem[] = [{ level: 'full', time: t0 + 5 * 60_000 }]; // 01:05 on day 0
    assert.equal(decideLevel(h, p, t0 + 6 * day + 22 * 3600_000, true).level, 'auto'); // day 6, 23:00
    // day 7 at 01:00, 5 minutes short of 7 x 24 h: still day 7, a full
    assert.deepEqual(decideLevel(h, p, t0 + 7 * day, true), {
      level: 'full',
      expect: 'full',
      reason: 'last full 7 day(s) ago',
    });
    assert.equal(calendarDays(Date.UTC(2026, 0, 31, 23), Date.UTC(2026, 1, 1, 0), true), 1);
  });

  it('every Nth backup a full: full, N-1 incs, full, ...', () => {
    const p = { ...auto, fullEveryBackups: 4 };
    const h: HistoryItem[] = [];
    const levels: string[] = [];
    for (let i = 0; i < 9; i++) {
      const d = decideLevel(h, p, t0 + i * day, true);
      levels.push(d.expect);
      h.push({ level: d.expect === 'inc' ? 'inc' : (d.expect as HistoryItem['level']), time: t0 + i * day });
      if (i === 2) h.push({ level: 'copy', time: t0 + i * day + 1 }); // a copy does not count
    }
    assert.deepEqual(levels, ['full', 'inc', 'inc', 'inc', 'full', 'inc', 'inc', 'inc', 'full']);
  });

  it('between = diff gives diffs; fixed modes are passed through', () => {
    const h: HistoryItem[] = [
      { level: 'full', time: t0 },
      { level: 'diff', time: t0 + day },
    ];
    assert.equal(decideLevel(h, { ...auto, between: 'diff' }, t0 + 2 * day, true).level, 'diff');
    for (const m of ['full', 'inc', 'diff', 'copy'] as const) {
      assert.equal(decideLevel(h, { mode: m, between: 'inc' }, t0, true).level, m);
    }
  });

  it('whichever rule comes first makes the full', () => {
    const p = { ...auto, fullEveryDays: 30, fullEveryBackups: 3 };
    const h: HistoryItem[] = [
      { level: 'full', time: t0 },
      { level: 'inc', time: t0 + day },
    ];
    assert.equal(decideLevel(h, p, t0 + 2 * day, true).level, 'auto');
    h.push({ level: 'inc', time: t0 + 2 * day });
    assert.equal(decideLevel(h, p, t0 + 3 * day, true).level, 'full');
    assert.equal(decideLevel(h.slice(0, 1), p, t0 + 31 * day, true).level, 'full');
  });
});

describe('scheduler', () => {
  it('never exceeds the overall or a per-host limit, and runs every task once (random runs)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.integer({ min: 0, max: 3 }), { maxLength: 40 }),
        fc.integer({ min: 1, max: 5 }),
        fc.array(fc.integer({ min: 0, max: 4 }), { minLength: 4, maxLength: 4 }),
        fc.array(fc.nat(), { maxLength: 100 }),
        (hostsOf, total, limits, picks) => {
          const tasks = hostsOf.map((h, i) => ({ host: `h${h}`, id: i }));
          const limit = (h: string) => limits[Number(h.slice(1))]!;
          const s = new Scheduler(tasks, total, limit);
          const running: typeof tasks = [];
          const ran: number[] = [];
          let step = 0;
          while (!s.done) {
            for (let t = s.next(); t; t = s.next()) {
              running.push(t);
              ran.push(t.id);
            }
            assert.ok(running.length <= total, 'overall limit');
            for (const h of ['h0', 'h1', 'h2', 'h3']) {
              const n = running.filter((t) => t.host === h).length;
              assert.ok(n <= Math.max(1, limit(h)), `limit of ${h}`);
              assert.equal(n, s.runningOn(h));
            }
            assert.ok(running.length > 0, 'progress: something runs while tasks wait');
            // finish a "random" running task
            const [t] = running.splice((picks[step++ % Math.max(1, picks.length)] ?? 0) % running.length, 1);
            s.finish(t!);
          }
          assert.deepEqual(
            [...ran].sort((a, b) => a - b),
            tasks.map((t) => t.id),
          );
          // within one host, the job's order
          for (const h of ['h0', 'h1', 'h2', 'h3']) {
            const order = ran.filter((id) => tasks[id]!.host === h);
            assert.deepEqual(
              order,
              [...order].sort((a, b) => a - b),
            );
          }
        },
      ),
    );
  });

  it('fills every slot it may at once; hosts take turns', () => {
    const tasks = ['a', 'a', 'a', 'b', 'b', 'c'].map((host, id) => ({ host, id }));
    const s = new Scheduler(tasks, 4, (h) => (h === 'a' ? 2 : 1));
    const first: string[] = [];
    for (let t = s.next(); t; t = s.next()) first.push(`${t.host}${t.id}`);
    assert.deepEqual(first, ['a0', 'b3', 'c5', 'a1']);
    assert.equal(s.pending, 2);
  });

  it('a limit below 1 is refused; finishing a task that does not run is a bug', () => {
    assert.throws(() => new Scheduler([], 0, () => 1), RangeError);
    const s = new Scheduler([{ host: 'a' }], 1, () => 1);
    assert.throws(() => s.finish({ host: 'a' }));
  });
});

describe('run display and summary', () => {
  it('one progress line per running VM, fitting the terminal', () => {
    const lines = renderRunning(
      [
        { vm: 'web-1', host: 'kvm1', level: 'inc', startedMs: 0, done: 512 << 20, total: 1 << 30 },
        { vm: 'db1', host: 'kvm2', level: 'full', startedMs: 0, done: 0, total: 0 },
      ],
      10_000,
      60,
    );
    assert.equal(lines.length, 2);
    assert.match(lines[0]!, /^web-1 \(kvm1, inc\) .* 50%/);
    assert.match(lines[1]!, /^db1 \(kvm2, full\) starting, 10\.0 s$/);
    for (const l of lines) assert.ok(l.length <= 59, l);
  });

  it('the summary table has one row per VM with its error', () => {
    const vm = {
      host: 'kvm1',
      uri: 'qemu:///system',
      plannedLevel: 'inc',
      levelReason: 'since the last backup',
      started: 0,
      finished: 1,
      virtualSize: 1 << 30,
      storedBytes: 1 << 20,
      bytesRead: 4 << 20,
      durationMs: 1500,
      backupMs: 1200,
      checkpoint: 'check2',
    };
    const r: RunResult = {
      job: 'e.toml',
      repository: '/r',
      dryRun: false,
      started: 0,
      finished: 2,
      durationMs: 2,
      vms: [
        { ...vm, domain: 'web-1', vm: 'web-1', level: 'inc', result: 'ok', error: null },
        {
          ...vm,
          domain: 'db9',
          vm: 'db9',
          level: null,
          result: 'failed',
          checkpoint: null,
          bytesRead: null,
          storedBytes: null,
          started: null,
          durationMs: 0,
          backupMs: 0,
          error: { code: 'SOURCE_NOT_FOUND', exitCode: null, message: "host kvm1 has no domain 'db9'" },
        },
      ],
      retention: null,
      gc: null,
      copy: null,
      succeeded: 1,
      failed: 1,
      interrupted: false,
    };
    const t = summaryTable(r).split('\n');
    assert.match(t[0]!, /^HOST\s+VM\s+LEVEL\s+RESULT\s+TIME\s+READ\s+STORED\s+ERROR$/);
    assert.match(t[1]!, /^kvm1\s+web-1\s+inc\s+ok\s+1\.5 s\s+4\.00 MiB\s+1\.00 MiB$/);
    assert.match(
      t[2]!,
      /^kvm1\s+db9\s+\(inc\)\s+failed\s+-\s+-\s+-\s+SOURCE_NOT_FOUND: host kvm1 has no domain 'db9'$/,
    );
  });
});

describe('job file: the copy step', () => {
  it('[copy] to = REPO is parsed; absent means no copy; a bad key or an empty path is refused', () => {
    assert.equal(parseJobFile(GOOD, 'estate.toml').copy, undefined);
    const j = parseJobFile(
      GOOD.replace('[[host]]', '[copy]\nto = "/mnt/offsite/bkfs"\n\n[[host]]'),
      'estate.toml',
    );
    assert.deepEqual(j.copy, { to: '/mnt/offsite/bkfs' });
    invalid(
      GOOD.replace('[[host]]', '[copy]\nto = "/x"\nfrom = "/y"\n\n[[host]]'),
      /copy\.from: unknown key \(known here: to\)/,
    );
    invalid(GOOD.replace('[[host]]', '[copy]\nto = ""\n\n[[host]]'), /copy\.to: must not be empty/);
    invalid(GOOD.replace('[[host]]', '[copy]\n\n[[host]]'), /copy\.to: missing/);
  });

  it('a failed copy step makes the run partial (exit 30)', () => {
    const base: RunResult = {
      job: 'e.toml',
      repository: '/r',
      dryRun: false,
      started: 0,
      finished: 1,
      durationMs: 1,
      vms: [],
      retention: null,
      gc: null,
      copy: {
        ok: false,
        error: { code: 'TARGET_EXISTS', exitCode: 17, message: 'the destination already has web@check1' },
        to: '/o',
        vms: ['web'],
        copied: 0,
        skipped: 0,
        chunksTransferred: 0,
        bytesTransferred: 0,
      },
      succeeded: 0,
      failed: 0,
      interrupted: false,
    };
    const f = runFailure(base);
    assert.equal(f?.code, 'JOB_PARTIAL');
    assert.match(f!.message, /copy failed: the destination already has web@check1/);
    assert.equal(runFailure({ ...base, copy: { ...base.copy!, ok: true, error: null } }), null);
  });
});

describe('shipped examples', () => {
  it('examples/estate.toml is a valid job file', async () => {
    const fs = await import('node:fs');
    const path = await import('node:path');
    const file = path.resolve(__dirname, '../../../examples/estate.toml');
    const j = parseJobFile(fs.readFileSync(file, 'utf8'), file);
    assert.equal(j.hosts.length, 2);
    assert.equal(j.level.fullEveryDays, 30);
    assert.equal(j.gc.enabled, true);
  });
});
