/**
 * CLI plumbing that needs no repository: lazy loading (start-up), the global options, version flag,
 * durations, local times, the JSON convention, help examples, completion scripts and the man page.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { COMMAND_MODULES, buildProgram, rewriteVersionFlag, soleCommand } from '../../src/cli/main';
import {
  bashCompletion,
  fishCompletion,
  helpAfterText,
  manPage,
  zshCompletion,
} from '../../src/cli/commands/meta';
import { DEFAULT_CACHE_SIZE, parseSize } from '../../src/cli/commands/mount';
import { DEFAULT_CACHE_BYTES } from '../../src/store/chunk-cache';
import { jsonValue } from '../../src/cli/json';
import { localTime, parseDuration } from '../../src/util/format';

const ROOT = path.resolve(__dirname, '../../..');

test('loading the CLI loads no SQLite, zstd, BLAKE3, FUSE or core engine module', () => {
  const script = `
    require(${JSON.stringify(path.join(ROOT, 'dist/src/cli/main.js'))});
    process.stdout.write(JSON.stringify(Object.keys(require.cache)));`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const loaded = JSON.parse(r.stdout) as string[];
  const heavy = loaded.filter((f) =>
    /better-sqlite3|zstd-napi|blake-hash|fuse-native|lru-cache|src[\\/](repo|backup|restore|store|fuse|chain|nbd)[\\/]/.test(
      f.replace(/src[\\/]repo[\\/]default-path\.js$/, ''),
    ),
  );
  assert.deepEqual(heavy, []);
});

test('COMMAND_MODULES names exactly the commands each module defines; `bkfs CMD` loads only its module', () => {
  const all = buildProgram()
    .commands.flatMap((c) => [c.name(), ...c.aliases()])
    .sort();
  assert.deepEqual([...COMMAND_MODULES.flatMap((m) => m.commands)].sort(), all);
  for (const m of COMMAND_MODULES) {
    for (const name of m.commands.filter((n) => soleCommand([n]) !== undefined)) {
      const p = buildProgram(name);
      const got = p.commands.flatMap((c) => [c.name(), ...c.aliases()]).sort();
      assert.deepEqual(got, [...m.commands].sort(), name);
    }
  }
  assert.equal(soleCommand(['-r', '/x', 'list', '--json']), 'list');
  assert.equal(soleCommand(['--retry-lock', '5s', 'backup', 'vm']), 'backup');
  assert.equal(soleCommand(['web', 'list']), 'web');
  for (const all of [[], ['--help'], ['help', 'list'], ['completion', 'bash'], ['man'], ['lsit']])
    assert.equal(soleCommand(all), undefined, all.join(' '));
  // In a fresh process: `bkfs list` compiles the catalog commands and no other command module.
  const script = `
    const m = require(${JSON.stringify(path.join(ROOT, 'dist/src/cli/main.js'))});
    m.buildProgram(m.soleCommand(['list']));
    process.stdout.write(JSON.stringify(Object.keys(require.cache)));`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const cmds = (JSON.parse(r.stdout) as string[]).filter((f) => /cli[\\/]commands[\\/]/.test(f));
  assert.deepEqual(
    cmds.map((f) => path.basename(f)),
    ['catalog.js'],
  );
});

test('the --cache-size default written in mount.ts is the chunk cache default', () => {
  assert.equal(parseSize('--cache-size', DEFAULT_CACHE_SIZE), DEFAULT_CACHE_BYTES);
});

test('every command has an Examples section in its --help; snapshots is list', () => {
  const program = buildProgram();
  const names = program.commands.map((c) => c.name());
  for (const must of ['init', 'list', 'info', 'gc', 'stats', 'umount', 'version', 'completion', 'man'])
    assert.ok(names.includes(must), must);
  for (const c of program.commands) {
    assert.match(
      helpAfterText(c),
      /^Examples:\n {2}bkfs /m,
      `bkfs ${c.name()} --help has no Examples section`,
    );
  }
  assert.deepEqual(program.commands.find((c) => c.name() === 'list')?.aliases(), ['snapshots']);
});

test('--version / -V before a command means `bkfs version`', () => {
  assert.deepEqual(rewriteVersionFlag(['--version']), ['version']);
  assert.deepEqual(rewriteVersionFlag(['-r', '/x', '-V']), ['-r', '/x', 'version']);
  assert.deepEqual(rewriteVersionFlag(['--retry-lock', '5s', '--version', '--json']), [
    '--retry-lock',
    '5s',
    'version',
    '--json',
  ]);
  assert.deepEqual(rewriteVersionFlag(['list', '--version']), ['list', '--version']);
});

test('durations for --retry-lock', () => {
  assert.equal(parseDuration('30s'), 30_000);
  assert.equal(parseDuration('5m'), 300_000);
  assert.equal(parseDuration('1h30m'), 5_400_000);
  assert.equal(parseDuration('1.5h'), 5_400_000);
  assert.equal(parseDuration('250ms'), 250);
  assert.equal(parseDuration('10'), 10_000);
  for (const bad of ['', 'm', '5x', '5 m', '-5s', '5s3']) assert.equal(parseDuration(bad), undefined, bad);
});

test('local times honour TZ and carry their offset', () => {
  const t = Date.parse('2026-07-01T12:34:56Z');
  const run = (tz: string) =>
    spawnSync(
      process.execPath,
      [
        '-e',
        `process.stdout.write(require(${JSON.stringify(path.join(ROOT, 'dist/src/util/format.js'))}).localTime(${t}))`,
      ],
      { encoding: 'utf8', env: { ...process.env, TZ: tz } },
    ).stdout;
  assert.equal(run('UTC'), '2026-07-01 12:34:56 +0000');
  assert.equal(run('Asia/Kolkata'), '2026-07-01 18:04:56 +0530');
  assert.equal(run('America/New_York'), '2026-07-01 08:34:56 -0400');
  assert.match(localTime(t), /^2026-07-0[12] \d\d:\d\d:56 [+-]\d{4}$/);
});

test('the JSON convention turns epoch times and stat seconds into ISO 8601', () => {
  const v = jsonValue({
    time: Date.parse('2026-01-02T03:04:05.678Z'),
    started: 0,
    list: [{ mtimeSec: 1700000000, mtimeNsec: 123_456_789, atimeSec: 1, atimeNsec: 0, size: 5 }],
    durationMs: 12,
    name: 'x',
    none: null,
  });
  assert.deepEqual(v, {
    time: '2026-01-02T03:04:05.678Z',
    started: '1970-01-01T00:00:00.000Z',
    list: [{ mtime: '2023-11-14T22:13:20.123Z', atime: '1970-01-01T00:00:01.000Z', size: 5 }],
    durationMs: 12,
    name: 'x',
    none: null,
  });
});

test('completion scripts are generated from the definitions and parse in their shell', () => {
  const program = buildProgram();
  const bash = bashCompletion(program);
  for (const w of ['snapshots', 'forget', '--keep-within', '--retry-lock', 'completion'])
    assert.ok(bash.includes(w), w);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-clifeat-compl-'));
  try {
    const f = path.join(dir, 'bkfs.bash');
    fs.writeFileSync(f, bash);
    // Source it and complete `bkfs for<TAB>` and `bkfs forget --keep-w<TAB>` for real.
    const script = `source ${f}
COMP_WORDS=(bkfs for); COMP_CWORD=1; _bkfs; echo "\${COMPREPLY[*]}"
COMP_WORDS=(bkfs -r /x forget --keep-w); COMP_CWORD=4; _bkfs; echo "\${COMPREPLY[*]}"`;
    const r = spawnSync('bash', ['-c', script], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['forget', '--keep-weekly --keep-within']);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const zsh = zshCompletion(program);
  assert.match(zsh, /^#compdef bkfs/);
  assert.ok(zsh.includes("'snapshots:"));
  const fish = fishCompletion(program);
  assert.ok(fish.includes('-l keep-within'));
  assert.ok(fish.includes('-a snapshots'));
});

test('the man page renders with groff and documents every command and exit code', () => {
  const program = buildProgram();
  const page = manPage(program, '0.0.0');
  const r = spawnSync('groff', ['-man', '-Tutf8', '-ww'], { input: page, encoding: 'utf8' });
  assert.equal(r.status, 0, `groff is needed (apt-get install groff-base): ${r.stderr}`);
  assert.equal(r.stderr, '', 'groff warnings');
  // eslint-disable-next-line no-control-regex -- groff overstrikes bold text with backspaces
  const text = r.stdout.replace(/.\x08/g, '');
  for (const c of program.commands) assert.ok(text.includes(`bkfs ${c.name()}`), c.name());
  assert.ok(text.includes('REPO_LOCKED'));
  assert.ok(text.includes('--keep-within'));
  assert.ok(text.includes('Examples:'));
});
