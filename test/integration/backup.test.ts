/**
 * Backup engine against real qemu-img / qemu-nbd / nbdkit and real SQLite: chains of full, inc and
 * diff backups of images with real filesystems, checked byte for byte against `qemu-img convert`
 * of the image at each checkpoint through the index's own read path.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { makeDisk, modifyDisk, randomBuffer, textFile, toRaw } from '../helpers/images';
import { Repository } from '../../src/repo/repository';
import { runBackup } from '../../src/backup/engine';
import { ImageSource } from '../../src/backup/sources';
import { listCheckpoints, getVm } from '../../src/index/catalog';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run, stopChild } from '../../src/util/proc';

const MiB = 1 << 20;
let work: string;

before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-backup-test-'));
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

function listJson(
  repo: string,
  vm: string,
): Promise<
  { name: string; level: string; parent: string | null; bytesRead: number; bytesNewStored: number }[]
> {
  return bkfsOk(['-r', repo, 'list', vm, '--json']).then((r) => JSON.parse(r.stdout));
}

describe('backup chains of a qcow2 image with ext4 and xfs', () => {
  it('full -> inc -> inc -> diff: every checkpoint equals qemu-img convert of the image at that time', async () => {
    const dir = path.join(work, 'fs-chain');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'disk.qcow2');
    const repo = path.join(dir, 'repo');
    await makeDisk(img, {
      format: 'qcow2',
      sizeMiB: 160,
      table: 'gpt',
      seed: 7,
      partitions: [
        {
          fs: 'ext4',
          sizeMiB: 64,
          label: 'root',
          files: [
            { path: 'etc/hostname', content: Buffer.from('web1\n') },
            { path: 'etc/nginx/nginx.conf', content: textFile(1, 6000) },
            { path: 'var/lib/blob.bin', content: randomBuffer(2, 6 * MiB) },
            { path: 'var/log/syslog', content: textFile(3, 3 * MiB) },
          ],
        },
        {
          fs: 'xfs',
          sizeMiB: 80,
          label: 'data',
          files: [{ path: 'db/table.dat', content: randomBuffer(4, 5 * MiB) }],
        },
      ],
    });
    await bkfsOk(['-r', repo, 'init']);
    const refs: string[] = [];
    const snap = async (i: number) => {
      const raw = path.join(dir, `ref${i}.raw`);
      await toRaw(img, raw);
      refs.push(raw);
    };

    const full = await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'full']);
    assert.match(full.stdout, /web@check1: full backup/);
    await snap(1);

    await modifyDisk(img, 'qcow2', 1, async (m) => {
      fs.writeFileSync(path.join(m, 'etc/nginx/nginx.conf'), textFile(11, 7000));
      fs.rmSync(path.join(m, 'var/log/syslog'));
      fs.writeFileSync(path.join(m, 'var/lib/new.bin'), randomBuffer(12, 2 * MiB));
    });
    await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'inc']);
    await snap(2);

    await modifyDisk(img, 'qcow2', 2, async (m) => {
      const f = path.join(m, 'db/table.dat');
      const fd = fs.openSync(f, 'r+');
      fs.writeSync(fd, randomBuffer(13, 300 * 1024), 0, 300 * 1024, 1234567);
      fs.closeSync(fd);
    });
    await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`]); // auto -> inc
    await snap(3);

    await modifyDisk(img, 'qcow2', 1, async (m) => {
      fs.writeFileSync(path.join(m, 'etc/hostname'), 'web2\n');
    });
    await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'diff']);
    await snap(4);

    const cps = await listJson(repo, 'web');
    assert.deepEqual(
      cps.map((c) => [c.name, c.level, c.parent]),
      [
        ['check1', 'full', null],
        ['check2', 'inc', 'check1'],
        ['check3', 'inc', 'check2'],
        ['check4', 'diff', 'check1'],
      ],
    );
    for (let i = 0; i < 4; i++) await assertCheckpointEquals(repo, `web@check${i + 1}`, 'vda', refs[i]!);
    // Incrementals read what changed, not the disk: far less than the full.
    const [c1, c2, c3, c4] = cps;
    assert.ok(c2!.bytesRead < c1!.bytesRead / 2, `inc read ${c2!.bytesRead} vs full ${c1!.bytesRead}`);
    assert.ok(c3!.bytesRead < 4 * MiB, `second inc read ${c3!.bytesRead}`);
    // The diff holds everything since the full, so it reads at least what both incs read...
    assert.ok(c4!.bytesRead >= c3!.bytesRead);
    // ...but dedup stores almost nothing new for it.
    assert.ok(c4!.bytesNewStored < 256 * 1024, `diff stored ${c4!.bytesNewStored}`);
    const v = await bkfs(['-r', repo, 'verify']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });
});

describe('backup of qemu-io changes, zeros, discards and several disks', () => {
  it('records zeroed and discarded ranges as zero extents without reading them', async () => {
    const dir = path.join(work, 'qio');
    fs.mkdirSync(dir);
    const a = path.join(dir, 'a.qcow2');
    const b = path.join(dir, 'b.qcow2');
    const repoDir = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', a, '96M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', b, '33M']); // not a multiple of the chunk size
    fs.writeFileSync(path.join(dir, 'r.bin'), randomBuffer(5, 24 * MiB));
    await qemuIo(a, 'qcow2', `write -s ${path.join(dir, 'r.bin')} 1M 24M`, 'write -P 0x41 40M 8M');
    await qemuIo(b, 'qcow2', 'write -P 0x42 0 33M');
    const repo = Repository.init(repoDir);
    try {
      const disks = () => [
        { name: 'vda', source: new ImageSource(a) },
        { name: 'vdb', source: new ImageSource(b) },
      ];
      const r1 = await runBackup(repo, { vm: 'db', disks: disks(), level: 'full' });
      assert.equal(r1.level, 'full');
      await toRaw(a, path.join(dir, 'a1.raw'));
      await toRaw(b, path.join(dir, 'b1.raw'));

      // A guest fstrim: a discard over data and a zero write; plus a small unaligned write.
      await qemuIo(a, 'qcow2', 'discard 2M 16M', 'write -z 40M 4M', 'write -P 0x43 70001 5000');
      const r2 = await runBackup(repo, { vm: 'db', disks: disks(), level: 'inc' });
      assert.equal(r2.level, 'inc');
      assert.ok(r2.bytesZero >= 20 * MiB, `zero bytes ${r2.bytesZero}`);
      assert.ok(r2.bytesRead <= 2 * MiB, `read ${r2.bytesRead} bytes for a 5000-byte write`);
      await toRaw(a, path.join(dir, 'a2.raw'));
      await toRaw(b, path.join(dir, 'b2.raw'));

      // Unchanged data backed up again as a new full stores no new chunk.
      const r3 = await runBackup(repo, { vm: 'db', disks: disks(), level: 'full' });
      assert.equal(r3.chunks.newChunks, 0);
      assert.ok(r3.chunks.dedupChunks > 0);
      const cps = listCheckpoints(repo.db, getVm(repo.db, 'db').id);
      assert.deepEqual(
        cps.map((c) => c.name),
        ['check1', 'check2', 'check3'],
      );
    } finally {
      repo.close();
    }
    await assertCheckpointEquals(repoDir, 'db@check1', 'vda', path.join(dir, 'a1.raw'));
    await assertCheckpointEquals(repoDir, 'db@check1', 'vdb', path.join(dir, 'b1.raw'));
    await assertCheckpointEquals(repoDir, 'db@check2', 'vda', path.join(dir, 'a2.raw'));
    await assertCheckpointEquals(repoDir, 'db@check2', 'vdb', path.join(dir, 'b2.raw'));
    await assertCheckpointEquals(repoDir, 'db@check3', 'vda', path.join(dir, 'a2.raw'));
  });
});

describe('NBD URI sources', () => {
  it('backs up an nbdkit export and a qemu-nbd export with a dirty bitmap', async () => {
    const dir = path.join(work, 'uri');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'd.qcow2');
    const repoDir = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await qemuIo(img, 'qcow2', 'write -P 0x10 0 10M', 'write -P 0x20 30M 3M');
    await toRaw(img, path.join(dir, 'ref1.raw'));
    await bkfsOk(['-r', repoDir, 'init']);

    // nbdkit serving a raw file over a unix socket.
    const sock1 = path.join(dir, 'kit.sock');
    const kit = spawn(
      'nbdkit',
      ['-f', '-r', '-U', sock1, '--exit-with-parent', 'file', path.join(dir, 'ref1.raw')],
      { stdio: 'ignore' },
    );
    try {
      await waitFor(() => fs.existsSync(sock1));
      await bkfsOk([
        '-r',
        repoDir,
        'backup',
        'kit',
        '--disk',
        `vda=nbd+unix:///?socket=${sock1}`,
        '--level',
        'full',
      ]);
      const inc = await bkfs([
        '-r',
        repoDir,
        'backup',
        'kit',
        '--disk',
        `vda=nbd+unix:///?socket=${sock1}`,
        '--level',
        'inc',
      ]);
      assert.equal(inc.code, EXIT_CODES.CHAIN_BROKEN, inc.stderr);
      assert.match(inc.stderr, /--bitmap/);
    } finally {
      await stopChild(kit);
    }
    await assertCheckpointEquals(repoDir, 'kit@check1', 'vda', path.join(dir, 'ref1.raw'));

    // qemu-nbd with a bitmap that records the changes after the full.
    await run('qemu-img', ['bitmap', '--add', '--enable', img, 'ext1']);
    await qemuIo(img, 'qcow2', 'write -P 0x30 5M 1M', 'write -z 30M 1M');
    await toRaw(img, path.join(dir, 'ref2.raw'));
    const sock2 = path.join(dir, 'q.sock');
    const q = spawn('qemu-nbd', ['-r', '-f', 'qcow2', '-k', sock2, '-B', 'ext1', '--persistent', img], {
      stdio: 'ignore',
    });
    try {
      await waitFor(() => fs.existsSync(sock2));
      await bkfsOk([
        '-r',
        repoDir,
        'backup',
        'kit',
        '--disk',
        `vda=nbd+unix:///?socket=${sock2}`,
        '--level',
        'inc',
        '--bitmap',
        'ext1',
      ]);
    } finally {
      await stopChild(q);
    }
    const cps = await listJson(repoDir, 'kit');
    assert.equal(cps[1]!.level, 'inc');
    assert.ok(cps[1]!.bytesRead <= 1 * MiB, `inc read ${cps[1]!.bytesRead}`);
    await assertCheckpointEquals(repoDir, 'kit@check2', 'vda', path.join(dir, 'ref2.raw'));
  });
});

async function waitFor(cond: () => boolean, ms = 10000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Everything a failed command must leave untouched. */
function repoState(repoDir: string): string {
  const files: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (!e.name.startsWith('index.db'))
        files.push(`${path.relative(repoDir, p)}:${fs.statSync(p).size}`);
    }
  };
  walk(repoDir);
  const repo = Repository.open(repoDir);
  try {
    const rows = repo.db.prepare('SELECT name, level, state FROM checkpoints ORDER BY id').all();
    const chunks = repo.db.prepare('SELECT count(*) AS n FROM chunks').get();
    return JSON.stringify({ files: files.sort(), rows, chunks });
  } finally {
    repo.close();
  }
}

describe('bad input: one clear line, a distinct exit code, repository unchanged', () => {
  let dir: string;
  let repoDir: string;
  let img: string;
  before(async () => {
    dir = path.join(work, 'bad');
    fs.mkdirSync(dir);
    repoDir = path.join(dir, 'repo');
    img = path.join(dir, 'd.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await qemuIo(img, 'qcow2', 'write -P 0x61 0 2M');
    await bkfsOk(['-r', repoDir, 'init']);
  });

  const cases: {
    name: string;
    code: keyof typeof EXIT_CODES;
    msg: RegExp;
    setup?: () => Promise<void>;
    args: () => string[];
  }[] = [
    {
      name: 'nonexistent image',
      code: 'SOURCE_NOT_FOUND',
      msg: /does not exist/,
      args: () => ['backup', 'vm', '--disk', `vda=${dir}/nope.qcow2`, '-l', 'full'],
    },
    {
      name: 'image that is neither qcow2 nor raw',
      code: 'SOURCE_FORMAT',
      msg: /vmdk image/,
      setup: () =>
        run('qemu-img', ['create', '-q', '-f', 'vmdk', `${dir}/x.vmdk`, '8M']).then(() => undefined),
      args: () => ['backup', 'vm', '--disk', `vda=${dir}/x.vmdk`, '-l', 'full'],
    },
    {
      name: 'missing socket',
      code: 'SOURCE_NOT_FOUND',
      msg: /socket|connect/i,
      args: () => ['backup', 'vm', '--disk', `vda=nbd+unix:///?socket=${dir}/no.sock`, '-l', 'full'],
    },
    {
      name: 'incremental with no full',
      code: 'CHAIN_BROKEN',
      msg: /no full backup.*--level full/,
      args: () => ['backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc'],
    },
    {
      name: 'bad VM name',
      code: 'BAD_NAME',
      msg: /invalid VM name/,
      args: () => ['backup', '../etc', '--disk', `vda=${img}`, '-l', 'full'],
    },
    {
      name: 'bad disk name',
      code: 'BAD_NAME',
      msg: /invalid disk name/,
      args: () => ['backup', 'vm', '--disk', `a/b=${img}`, '-l', 'full'],
    },
    {
      name: 'bad level',
      code: 'USAGE',
      msg: /--level must be one of/,
      args: () => ['backup', 'vm', '--disk', `vda=${img}`, '-l', 'weekly'],
    },
    {
      name: 'disk without source',
      code: 'USAGE',
      msg: /NAME=SOURCE/,
      args: () => ['backup', 'vm', '--disk', 'vda', '-l', 'full'],
    },
    {
      name: 'unknown checkpoint',
      code: 'NOT_FOUND',
      msg: /no VM named/,
      args: () => ['info', 'ghost@check9'],
    },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      if (c.setup) await c.setup();
      const before = repoState(repoDir);
      const r = await bkfs(['-r', repoDir, ...c.args()]);
      assert.equal(r.code, EXIT_CODES[c.code], `exit code for ${c.name}: ${r.stderr}`);
      assert.match(r.stderr, c.msg);
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
      assert.equal(repoState(repoDir), before);
    });
  }

  it('inc after the bitmap was removed or broken; auto falls back to full', async () => {
    await bkfsOk(['-r', repoDir, 'backup', 'bm', '--disk', `vda=${img}`, '-l', 'full']);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout);
    const name: string = info['format-specific'].data.bitmaps[0].name;
    await run('qemu-img', ['bitmap', '--remove', img, name]);
    let before = repoState(repoDir);
    let r = await bkfs(['-r', repoDir, 'backup', 'bm', '--disk', `vda=${img}`, '-l', 'inc']);
    assert.equal(r.code, EXIT_CODES.CHAIN_BROKEN);
    assert.match(r.stderr, /bitmap '.*' is missing.*--level full/);
    assert.equal(repoState(repoDir), before);
    r = await bkfsOk(['-r', repoDir, 'backup', 'bm', '--disk', `vda=${img}`]);
    assert.match(r.stderr, /taking a full backup/);
    assert.match(r.stdout, /bm@check2: full backup/);

    // A bitmap left 'in-use' by a QEMU that was killed.
    const sock = path.join(dir, 'rw.sock');
    const q = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, img], { stdio: 'ignore' });
    await waitFor(() => fs.existsSync(sock));
    for (let i = 0; i < 100; i++) {
      const j = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', img])).stdout);
      if (JSON.stringify(j['format-specific'].data.bitmaps ?? []).includes('in-use')) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    q.kill('SIGKILL');
    await new Promise((res) => q.once('exit', res));
    before = repoState(repoDir);
    r = await bkfs(['-r', repoDir, 'backup', 'bm', '--disk', `vda=${img}`, '-l', 'inc']);
    assert.equal(r.code, EXIT_CODES.CHAIN_BROKEN, r.stderr);
    assert.match(r.stderr, /inconsistent/);
    assert.equal(repoState(repoDir), before);
  });

  it('image in use by another process', async () => {
    const sock = path.join(dir, 'busy.sock');
    const q = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, img], { stdio: 'ignore' });
    try {
      await waitFor(() => fs.existsSync(sock));
      const before = repoState(repoDir);
      const r = await bkfs(['-r', repoDir, 'backup', 'busy', '--disk', `vda=${img}`, '-l', 'full']);
      assert.equal(r.code, EXIT_CODES.SOURCE_IN_USE, r.stderr);
      assert.match(r.stderr, /in use/);
      assert.equal(repoState(repoDir), before);
    } finally {
      await stopChild(q);
    }
  });

  it('disk whose virtual size changed', async () => {
    // An image of its own: a full of VM 'grow' leaves the other VMs' bitmaps on the shared image
    // alone (the in-use one of the case above would stop qemu-img resize).
    const grow = path.join(dir, 'grow.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', grow, '32M']);
    await qemuIo(grow, 'qcow2', 'write -P 0x62 0 1M');
    await bkfsOk(['-r', repoDir, 'backup', 'grow', '--disk', `vda=${grow}`, '-l', 'full']);
    await run('qemu-img', ['resize', '-q', grow, '48M']);
    const before = repoState(repoDir);
    const r = await bkfs(['-r', repoDir, 'backup', 'grow', '--disk', `vda=${grow}`, '-l', 'inc']);
    assert.equal(r.code, EXIT_CODES.SIZE_CHANGED, r.stderr);
    assert.match(r.stderr, /changed size/);
    assert.equal(repoState(repoDir), before);
  });

  it('missing repository, newer format, and a second writer', async () => {
    let r = await bkfs(['-r', path.join(dir, 'none'), 'list']);
    assert.equal(r.code, EXIT_CODES.REPO_NOT_FOUND);
    assert.match(r.stderr, /no bkfs repository/);
    r = await bkfs(['-r', repoDir, 'init']);
    assert.equal(r.code, EXIT_CODES.REPO_EXISTS);

    const newer = path.join(dir, 'newer');
    await bkfsOk(['-r', newer, 'init']);
    const cfgPath = path.join(newer, 'bkfs-repo.json');
    const cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
    fs.writeFileSync(cfgPath, JSON.stringify({ ...cfg, format: 99 }));
    r = await bkfs(['-r', newer, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full']);
    assert.equal(r.code, EXIT_CODES.REPO_VERSION);
    assert.match(r.stderr, /format 99/);

    // A live process holds the writer lock.
    const sleeper = spawn('sleep', ['30']);
    fs.writeFileSync(
      path.join(repoDir, 'lock'),
      JSON.stringify({ pid: sleeper.pid, host: os.hostname(), command: 'backup x', time: 'now' }),
    );
    try {
      const before = repoState(repoDir);
      r = await bkfs(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full']);
      assert.equal(r.code, EXIT_CODES.REPO_LOCKED);
      assert.match(r.stderr, new RegExp(`locked by pid ${sleeper.pid}`));
      // Readers work while a writer holds the lock.
      await bkfsOk(['-r', repoDir, 'list']);
      assert.equal(repoState(repoDir), before);
    } finally {
      sleeper.kill('SIGKILL');
      fs.rmSync(path.join(repoDir, 'lock'), { force: true });
    }
  });
});

describe('crash safety', () => {
  it('kill -9 in the middle of a backup leaves a consistent repository and the next backup works', async () => {
    const dir = path.join(work, 'kill');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'big.qcow2');
    const repoDir = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '512M']);
    fs.writeFileSync(path.join(dir, 'r.bin'), randomBuffer(9, 64 * MiB));
    const cmds: string[] = [];
    for (let i = 0; i < 6; i++) cmds.push(`write -s ${path.join(dir, 'r.bin')} ${i * 80}M 64M`);
    await qemuIo(img, 'qcow2', ...cmds);
    await bkfsOk(['-r', repoDir, 'init']);
    await bkfsOk([
      '-r',
      repoDir,
      'backup',
      'k',
      '--disk',
      `vda=${img}`,
      '-l',
      'full',
      '--checkpoint',
      'base',
    ]);
    await qemuIo(img, 'qcow2', 'write -P 0x99 0 200M');
    await toRaw(img, path.join(dir, 'ref.raw'));

    const child = spawn(
      process.execPath,
      [
        path.resolve(__dirname, '../../../bin/bkfs'),
        '-r',
        repoDir,
        'backup',
        'k',
        '--disk',
        `vda=${img}`,
        '-l',
        'full',
      ],
      {
        stdio: 'ignore',
      },
    );
    // Kill once the backup has sealed data into the repository but before it finished.
    await waitFor(() => fs.readdirSync(path.join(repoDir, 'tmp')).length > 0, 20000);
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    // qemu-nbd died with its parent (pdeathsig); the image is free again.
    for (
      let i = 0;
      i < 50 && (await run('pgrep', ['-f', `qemu-nbd.*${img}`], { allowFail: true })).code === 0;
      i++
    ) {
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.notEqual(
      (await run('pgrep', ['-f', `qemu-nbd.*${img}`], { allowFail: true })).code,
      0,
      'qemu-nbd left running',
    );

    const cps = await listJson(repoDir, 'k');
    assert.deepEqual(
      cps.map((c) => c.name),
      ['base'],
      'no half checkpoint is listed',
    );
    const v = await bkfs(['-r', repoDir, 'verify']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    // The stale lock is taken over, the leftovers cleaned, and the next backup works.
    await bkfsOk(['-r', repoDir, 'backup', 'k', '--disk', `vda=${img}`]);
    const after = await listJson(repoDir, 'k');
    assert.deepEqual(
      after.map((c) => c.name),
      ['base', 'check1'],
    );
    assert.equal(fs.readdirSync(path.join(repoDir, 'tmp')).length, 0);
    await assertCheckpointEquals(repoDir, 'k@check1', 'vda', path.join(dir, 'ref.raw'), 20);
  });
});
