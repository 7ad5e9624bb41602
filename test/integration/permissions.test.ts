/**
 * Local users cannot read backups (issue 11 §5): the real `bkfs` executable run with umask 022
 * creates every repository file 0600 and directory 0700, restored images and exported chains 0600,
 * mount logs and state files 0600; a second, unprivileged user (`nobody`, through setpriv) cannot
 * read any of them, even when every directory on the way is made searchable for it. A repository
 * whose root an administrator made group-readable (0750) gives new files group read, never more.
 * `init` into a directory that others can read warns on stderr.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BKFS, NOBODY, type CliResult } from '../helpers/cli';
import { randomBuffer } from '../helpers/images';
import { Repository } from '../../src/repo/repository';

const MiB = 1 << 20;
let work: string;
let repo: string;
let img: string;
let runDir: string;

/** The bkfs executable under umask 022 (the usual default that made everything world-readable). */
function bkfs022(args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', 'umask 022 && exec "$0" "$@"', process.execPath, BKFS, ...args], {
      env: { ...process.env, CI: 'true', BKFS_RUN_DIR: runDir },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? 128, stdout, stderr }));
  });
}

async function ok022(args: string[]): Promise<CliResult> {
  const r = await bkfs022(args);
  assert.equal(r.code, 0, `bkfs ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r;
}

/** Every path below `dir` (itself included), directories first. */
function walk(dir: string): { p: string; dir: boolean }[] {
  const out: { p: string; dir: boolean }[] = [{ p: dir, dir: true }];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...walk(p));
    else out.push({ p, dir: false });
  }
  return out;
}

function modeOf(p: string): number {
  return fs.statSync(p).mode & 0o777;
}

/** Try to open `p` for reading (or list it) as `nobody`; returns setpriv's exit and stderr. */
function asNobody(p: string, dir: boolean): { code: number; stderr: string } {
  const r = spawnSync(
    'setpriv',
    [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', dir ? 'ls' : 'head', '-c1', p].filter(
      (a) => !(dir && a === '-c1'),
    ),
    { encoding: 'utf8' },
  );
  return { code: r.status ?? 128, stderr: r.stderr };
}

describe('permissions: other local users cannot read backups (umask 022)', () => {
  before(async () => {
    if (process.getuid?.() !== 0)
      throw new Error('this test needs root (it runs commands as user nobody with setpriv)');
    if (spawnSync('setpriv', ['--version']).status !== 0)
      throw new Error('setpriv is missing: apt-get install util-linux');
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-hostile-perm-'));
    // The test directory itself is open to everyone: only bkfs's own modes may stop `nobody`.
    fs.chmodSync(work, 0o755);
    repo = path.join(work, 'repo');
    runDir = path.join(work, 'run');
    img = path.join(work, 'disk.raw');
    const data = Buffer.alloc(8 * MiB);
    randomBuffer(11, 2 * MiB).copy(data, 0);
    randomBuffer(12, 1 * MiB).copy(data, 5 * MiB);
    fs.writeFileSync(img, data);
    fs.chmodSync(img, 0o644);
    await ok022(['-r', repo, 'init', '--chunk-size', '65536']);
    await ok022(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
    await ok022(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
  });

  after(() => {
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('creates every repository directory 0700 and every file 0600', () => {
    const entries = walk(repo);
    const files = entries.filter((e) => !e.dir).map((e) => path.relative(repo, e.p));
    for (const want of ['bkfs-repo.json', 'index.db'])
      assert.ok(files.includes(want), `${want} missing: ${files.join(' ')}`);
    assert.ok(
      files.some((f) => f.startsWith('packs/') && f.endsWith('.pack')),
      'no pack',
    );
    assert.ok(
      files.some((f) => f.startsWith('manifests/')),
      'no manifest',
    );
    for (const e of entries) {
      assert.equal(modeOf(e.p), e.dir ? 0o700 : 0o600, `${e.p} has mode ${modeOf(e.p).toString(8)}`);
    }
  });

  it('user nobody can read no repository file, even with every directory searchable', () => {
    const entries = walk(repo);
    // As bkfs made it: the repository root stops everyone.
    const root = asNobody(repo, true);
    assert.notEqual(root.code, 0);
    assert.match(root.stderr, /Permission denied/);
    // Open every directory for search (not read): the files' own modes must stop nobody.
    for (const e of entries) if (e.dir) fs.chmodSync(e.p, 0o711);
    try {
      for (const e of entries.filter((x) => !x.dir)) {
        const r = asNobody(e.p, false);
        assert.notEqual(r.code, 0, `nobody could read ${e.p}`);
        assert.match(r.stderr, /Permission denied/, e.p);
      }
      // Sanity: the same command as nobody does read a world-readable file.
      assert.equal(asNobody(img, false).code, 0, 'setpriv as nobody cannot read a 0644 file');
    } finally {
      for (const e of entries) if (e.dir) fs.chmodSync(e.p, 0o700);
    }
  });

  it('restores raw and qcow2 images and exports chains 0600 that nobody can read', async () => {
    const raw = path.join(work, 'restored.raw');
    const q = path.join(work, 'restored.qcow2');
    const exp = path.join(work, 'export');
    await ok022(['-r', repo, 'restore', 'vm', '--disk', 'vda', '--to', raw]);
    await ok022(['-r', repo, 'restore', 'vm', '--disk', 'vda', '--to', q]);
    await ok022(['-r', repo, 'export', 'vm', '--to', exp]);
    assert.deepEqual(fs.readFileSync(raw), fs.readFileSync(img));
    for (const f of [raw, q]) {
      assert.equal(modeOf(f), 0o600, `${f}: ${modeOf(f).toString(8)}`);
      assert.notEqual(asNobody(f, false).code, 0, `nobody read ${f}`);
    }
    const layers = walk(exp);
    assert.ok(
      layers.some((e) => e.p.endsWith('.qcow2')),
      `no layer in ${layers.map((e) => e.p).join(' ')}`,
    );
    for (const e of layers) {
      if (e.p === exp) continue; // --to names the user's own directory
      assert.equal(modeOf(e.p), e.dir ? 0o700 : 0o600, `${e.p}: ${modeOf(e.p).toString(8)}`);
    }
    // Asked for: --mode gives restored images the requested bits.
    const shared = path.join(work, 'shared.raw');
    await ok022(['-r', repo, 'restore', 'vm', '--disk', 'vda', '--to', shared, '--mode', '0640']);
    assert.equal(modeOf(shared), 0o640);
    const bad = await bkfs022([
      '-r',
      repo,
      'restore',
      'vm',
      '--disk',
      'vda',
      '--to',
      shared + '2',
      '--mode',
      'rw',
    ]);
    assert.equal(bad.code, 2, bad.stderr);
    fs.chmodSync(exp, 0o755);
    for (const e of layers) if (e.dir) fs.chmodSync(e.p, 0o755);
    for (const e of layers.filter((x) => !x.dir)) assert.notEqual(asNobody(e.p, false).code, 0, e.p);
  });

  it('writes mount logs, state files and pins 0600', async () => {
    const mp = path.join(work, 'mnt');
    fs.mkdirSync(mp);
    await ok022(['-r', repo, 'mount', 'vm', mp]);
    try {
      const run = walk(runDir).filter((e) => !e.dir);
      assert.ok(
        run.some((e) => e.p.endsWith('.log')),
        `no log in ${runDir}`,
      );
      assert.ok(
        run.some((e) => e.p.endsWith('.json')),
        `no state file in ${runDir}`,
      );
      for (const e of walk(runDir)) assert.equal(modeOf(e.p), e.dir ? 0o700 : 0o600, e.p);
      const pins = walk(path.join(repo, 'pins')).filter((e) => !e.dir);
      assert.ok(pins.length > 0, 'the mount holds no pin');
      for (const e of pins) assert.equal(modeOf(e.p), 0o600, e.p);
    } finally {
      await ok022(['umount', mp]);
    }
  });

  it('keeps a deliberately group-readable repository group-readable, never world-readable', async () => {
    for (const e of walk(repo)) if (e.dir) fs.chmodSync(e.p, 0o750);
    const before = new Set(walk(repo).map((e) => e.p));
    await ok022(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
    const fresh = walk(repo).filter((e) => !before.has(e.p) && !e.dir);
    assert.ok(
      fresh.some((e) => e.p.endsWith('.json.zst')),
      'no new manifest',
    );
    for (const e of fresh) assert.equal(modeOf(e.p), 0o640, `${e.p}: ${modeOf(e.p).toString(8)}`);
    for (const e of walk(repo)) if (e.dir) fs.chmodSync(e.p, 0o700);
  });

  it('the writer lock is 0600', () => {
    const old = process.umask(0o022);
    const r = Repository.open(repo);
    try {
      r.lockWriter('test');
      assert.equal(modeOf(r.lockPath), 0o600);
    } finally {
      r.close();
      process.umask(old);
    }
  });

  it('init into a directory that others can read warns on stderr; a fresh one is 0700', async () => {
    const open = path.join(work, 'open-repo');
    fs.mkdirSync(open);
    fs.chmodSync(open, 0o755);
    const r = await ok022(['-r', open, 'init']);
    assert.match(r.stderr, /warning: .* can be read by other local users \(mode 0755\)/);
    for (const e of walk(open)) if (e.p !== open) assert.equal(modeOf(e.p), e.dir ? 0o700 : 0o600, e.p);
    const fresh = path.join(work, 'fresh-repo');
    const f = await ok022(['-r', fresh, 'init']);
    assert.equal(f.stderr, '');
    assert.equal(modeOf(fresh), 0o700);
  });
});
