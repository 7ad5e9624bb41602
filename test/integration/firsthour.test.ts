/**
 * The rough edges of a new administrator's first hour (issue 17): relative source paths and
 * `verify --source` after the source is gone (17.4), files that are no disk taken as raw disks
 * (17.13), a reader without write permission on the repository (17.5), and gc's pack selection
 * (17.9). Real qemu-img/qemu-nbd, SQLite and the real `bkfs` executable.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BKFS, bkfs, bkfsAsNobody as asNobody, bkfsOk, qemuIo, type CliResult } from '../helpers/cli';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

let work: string;
before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-firsthour-'));
  fs.chmodSync(work, 0o755);
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

/** bkfs in working directory `cwd` (the shared helper runs it in the test's own). */
function bkfsIn(cwd: string, args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BKFS, ...args], {
      cwd,
      env: { ...process.env, CI: 'true' },
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

describe('source paths (17.4)', () => {
  it('a relative --disk path is stored absolute; a source that is gone makes verify --source exit 24', async () => {
    const dir = path.join(work, 'rel');
    fs.mkdirSync(dir);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'web.qcow2'), '8M']);
    await qemuIo(path.join(dir, 'web.qcow2'), 'qcow2', 'write -P 0x5a 0 1M');
    const repo = path.join(work, 'rel-repo');
    await bkfsOk(['-r', repo, 'init']);
    const b = await bkfsIn(dir, ['-r', repo, 'backup', 'web', '-d', 'vda=web.qcow2']);
    assert.equal(b.code, 0, b.stderr);
    const info = JSON.parse((await bkfsOk(['-r', repo, 'info', 'web@check1', '--json'])).stdout) as {
      disks: { source: string }[];
    };
    assert.equal(info.disks[0]!.source, path.join(dir, 'web.qcow2'));
    // From another working directory.
    const ok = await bkfsIn(os.tmpdir(), ['-r', repo, 'verify', 'web', '--source']);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    assert.match(ok.stdout, /identical/);

    fs.rmSync(path.join(dir, 'web.qcow2'));
    const gone = await bkfs(['-r', repo, 'verify', 'web', '--source']);
    assert.equal(gone.code, EXIT_CODES.SOURCE_GONE, gone.stdout + gone.stderr);
    assert.match(gone.stderr, /the source of web@check1 vda \(.*web\.qcow2\) no longer exists/);
    assert.equal(gone.stderr.trim().split('\n').length, 1, gone.stderr);
    const js = await bkfs(['-r', repo, 'verify', 'web', '--source', '--json']);
    assert.equal(js.code, EXIT_CODES.SOURCE_GONE);
    assert.equal((JSON.parse(js.stdout) as { sources: { status: string }[] }).sources[0]!.status, 'gone');
    // Without --source, a gone source is none of verify's business.
    assert.equal((await bkfs(['-r', repo, 'verify', 'web'])).code, 0);
  });
});

describe('files that are no disk (17.13)', () => {
  it('a raw source of an odd size or under 1 MiB gets a note that it is taken as a raw disk', async () => {
    const repo = path.join(work, 'raw-repo');
    await bkfsOk(['-r', repo, 'init']);
    const conf = path.join(work, 'nginx.conf');
    fs.writeFileSync(conf, 'x'.repeat(4500));
    const r1 = await bkfsOk(['-r', repo, 'backup', 'cfg', '-d', `vda=${conf}`]);
    assert.match(r1.stderr, /nginx\.conf is 4500 bytes, not a multiple of 512: is it really a disk image\?/);
    assert.match(r1.stderr, /backed up as a raw disk/);
    assert.equal(r1.stderr.match(/really a disk image/g)?.length, 1, 'noted once');

    const small = path.join(work, 'small.img');
    fs.writeFileSync(small, Buffer.alloc(64 * 1024, 1));
    const r2 = await bkfsOk(['-r', repo, 'backup', 'small', '-d', `vda=${small}`]);
    assert.match(r2.stderr, /small\.img is only 65536 bytes: is it really a disk image\?/);

    const disk = path.join(work, 'disk.img');
    fs.writeFileSync(disk, Buffer.alloc(2 << 20, 2));
    const r3 = await bkfsOk(['-r', repo, 'backup', 'disk', '-d', `vda=${disk}`]);
    assert.doesNotMatch(r3.stderr, /disk image/);
  });
});

/** Every path under `dir` with size and mtime: what a reader must leave as it found it. */
function treeState(dir: string): string {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const n of fs.readdirSync(d).sort()) {
      const p = path.join(d, n);
      const st = fs.lstatSync(p);
      out.push(`${path.relative(dir, p)} ${st.isDirectory() ? 'd' : st.size} ${st.mtimeMs}`);
      if (st.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return out.join('\n');
}

describe('readers without write access (17.5)', () => {
  let repo: string;
  let shared: string;
  let img: string;
  before(async () => {
    if (process.getuid?.() !== 0) throw new Error('these tests switch to user nobody: run them as root');
    if (!fs.existsSync('/usr/bin/setpriv')) throw new Error('setpriv is missing: apt-get install util-linux');
    img = path.join(work, 'ro.img');
    const data = Buffer.alloc(4 << 20);
    for (let i = 0; i < data.length; i += 4096) data.fill(i / 4096, i, i + 512);
    fs.writeFileSync(img, data);
    repo = path.join(work, 'ro-repo');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'web', '-d', `vda=${img}`]);
    // The administrator shares a copy with group nogroup, read-only.
    shared = path.join(work, 'ro-shared');
    await run('cp', ['-a', repo, shared]);
    await run('chown', ['-R', 'root:nogroup', shared]);
    await run('chmod', ['-R', 'g+rX,g-w,o-rwx', shared]);
  });

  it('list, info, stats, verify and restore work on a root-owned, group-readable repository', async () => {
    const before = treeState(shared);
    const list = await asNobody(['-r', shared, 'list', 'web'], { cwd: '/' });
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /check1/);
    const info = await asNobody(['-r', shared, 'info', 'web@check1', '--json'], { cwd: '/' });
    assert.equal(info.code, 0, info.stderr);
    assert.equal((await asNobody(['-r', shared, 'stats'], { cwd: '/' })).code, 0);
    const v = await asNobody(['-r', shared, 'verify'], { cwd: '/' });
    assert.equal(v.code, 0, v.stdout + v.stderr);
    const out = fs.mkdtempSync(path.join(work, 'nobody-out-'));
    await run('chown', ['nobody:nogroup', out]);
    const target = path.join(out, 'vda.raw');
    const r = await asNobody(['-r', shared, 'restore', 'web', '--disk', 'vda', '--to', target], { cwd: '/' });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(fs.readFileSync(target).equals(fs.readFileSync(img)), 'restored bytes');
    assert.equal(treeState(shared), before, 'the readers changed nothing in the repository');
    assert.deepEqual(
      fs
        .readdirSync(os.tmpdir())
        .filter((n) => n.startsWith('bkfs-index-') && fs.statSync(path.join(os.tmpdir(), n)).uid === 65534),
      [],
      'no private index copy left behind',
    );
  });

  it('while a process with write access has the index open, the reader reads through the WAL', async () => {
    // A root reader keeps index.db-wal/-shm in place (as a running backup or mount would).
    const { Repository } = await import('../../src/repo/repository');
    const held = Repository.open(shared);
    try {
      held.db.prepare('SELECT count(*) FROM checkpoints').get();
      assert.ok(fs.existsSync(path.join(shared, 'index.db-wal')));
      const list = await asNobody(['-r', shared, 'list', 'web'], { cwd: '/' });
      assert.equal(list.code, 0, list.stderr);
      assert.match(list.stdout, /check1/);
    } finally {
      held.close();
    }
  });

  it('a repository this user may not read: PERMISSION_DENIED (exit 23), one line', async () => {
    const priv = path.join(work, 'ro-private');
    await run('cp', ['-a', repo, priv]);
    await run('chmod', ['-R', 'go-rwx', priv]);
    for (const args of [
      ['list'],
      ['info', 'web'],
      ['restore', 'web', '--disk', 'vda', '--to', '/tmp/x.raw'],
    ]) {
      const r = await asNobody(['-r', priv, ...args], { cwd: '/' });
      assert.equal(r.code, EXIT_CODES.PERMISSION_DENIED, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, /permission denied: this user \(uid 65534\) cannot read/);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    }
  });

  it('a read-only bind mount of the repository (root reader)', async () => {
    const mnt = path.join(work, 'ro-mnt-firsthour');
    fs.mkdirSync(mnt);
    await run('mount', ['--bind', repo, mnt]);
    try {
      await run('mount', ['-o', 'remount,bind,ro', mnt]);
      const list = await bkfs(['-r', mnt, 'list', 'web']);
      assert.equal(list.code, 0, list.stderr);
      const v = await bkfs(['-r', mnt, 'verify']);
      assert.equal(v.code, 0, v.stdout + v.stderr);
      const w = await bkfs(['-r', mnt, 'backup', 'web', '-d', `vda=${img}`]);
      assert.notEqual(w.code, 0, 'a writer cannot write a read-only mount');
    } finally {
      await run('umount', [mnt]);
    }
  });
});

describe('gc rewrites only packs worth it (17.9)', () => {
  interface GcJson {
    packsRewritten: number;
    packsWritten: number;
    bytesCopied: number;
    bytesFreed: number;
    bytesAfter: number;
    packsKeptUnused: number;
    bytesKeptUnused: number;
    packsSmallMerged: number;
  }
  const gcJson = async (repo: string, ...args: string[]): Promise<GcJson> =>
    JSON.parse((await bkfsOk(['-r', repo, 'gc', '--json', ...args])).stdout) as GcJson;
  const packCount = (repo: string): number =>
    fs
      .readdirSync(path.join(repo, 'packs'))
      .flatMap((d) => fs.readdirSync(path.join(repo, 'packs', d)))
      .filter((n) => n.endsWith('.pack')).length;

  it('a pack with a little unused is kept; -n shows the figures the real run then has', async () => {
    const img = path.join(work, 'gc.img');
    const data = Buffer.alloc(24 << 20);
    for (let i = 0; i < data.length; i += 4)
      data.writeUInt32LE((Math.imul(i, 2654435761) ^ (i >>> 7)) >>> 0, i);
    fs.writeFileSync(img, data);
    const repo = path.join(work, 'gc-repo');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'web', '-d', `vda=${img}`]);
    // One 256 KiB chunk changes: check1's copy of it is what a forget leaves unused.
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.alloc(256 << 10, 0x77), 0, 256 << 10, 4 << 20);
    fs.closeSync(fd);
    await bkfsOk(['-r', repo, 'backup', 'web', '-d', `vda=${img}`]);
    await bkfsOk(['-r', repo, 'forget', 'web@check1']);
    assert.equal(packCount(repo), 2);

    // Default threshold: the 24 MiB pack with 256 KiB unused (about 1 %) is left alone.
    const dflt = await gcJson(repo, '-n');
    assert.equal(dflt.packsRewritten, 0);
    assert.equal(dflt.packsKeptUnused, 1);
    assert.ok(dflt.bytesKeptUnused >= 256 << 10, String(dflt.bytesKeptUnused));
    const text = await bkfsOk(['-r', repo, 'gc', '-n']);
    assert.doesNotMatch(text.stdout, /\?/);
    assert.match(text.stdout, /1 pack\(s\) keep .* unused, within --max-unused 5 %/);
    const real0 = await gcJson(repo);
    assert.equal(real0.packsRewritten, 0);
    assert.equal(packCount(repo), 2);

    // --max-unused 0: the dry run's figures are the real run's.
    const dry = await gcJson(repo, '-n', '--max-unused', '0');
    assert.equal(dry.packsRewritten, 1);
    assert.equal(dry.packsWritten, 1);
    const real = await gcJson(repo, '--max-unused', '0');
    for (const k of ['packsRewritten', 'packsWritten', 'bytesCopied', 'bytesFreed', 'bytesAfter'] as const) {
      assert.equal(real[k], dry[k], k);
    }
    assert.ok(real.bytesFreed >= 256 << 10);

    // --repack-small: the two packs (both far under 64 MiB) become one, same figures as -n.
    const dsmall = await gcJson(repo, '-n', '--repack-small');
    assert.equal(dsmall.packsSmallMerged, 2);
    assert.equal(dsmall.packsWritten, 1);
    const small = await gcJson(repo, '--repack-small');
    assert.equal(small.packsWritten, 1);
    assert.equal(small.bytesAfter, dsmall.bytesAfter);
    assert.equal(packCount(repo), 1);
    const restored = path.join(work, 'gc-restored.raw');
    await bkfsOk(['-r', repo, 'restore', 'web', '--disk', 'vda', '--to', restored]);
    assert.ok(fs.readFileSync(restored).equals(fs.readFileSync(img)));
    assert.equal((await bkfs(['-r', repo, 'gc', '--max-unused', 'lots'])).code, EXIT_CODES.USAGE);
  });
});
