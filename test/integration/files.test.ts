/**
 * File-level restore for real: guest file trees in real filesystems (ext4, xfs, vfat on GPT; ext4
 * and xfs on LVM; a real LUKS volume), changed across checkpoints and backed up by bkfs, then read
 * back with both engines (the host kernel through loop devices; libguestfs under TCG) and through
 * `mount --files`. Every file copied out is compared by SHA-256 with what was written; `find` and
 * `diff` must report exactly the changes made.
 *
 * Appliance launches are the cost here (15-50 s each under TCG), so libguestfs checks are batched:
 * one launch builds the LVM disks, one in-process session checks every checkpoint of the GPT disk,
 * one the LVM disk, one CLI `find` with the default engine (libguestfs), one `mount --files`.
 * Everything else asks for the kernel engine by name. Needs root, libguestfs-tools, nbdfuse, qemu-utils, mtools, cryptsetup.
 *
 * Changes reach the qcow2 images through QEMU (modifyDisk: qemu-nbd + loop; vfat: mtools on an
 * nbdfuse view of qemu-nbd; LVM: guestfish), so incremental backups see them in dirty bitmaps.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { BKFS, bkfs, bkfsOk } from '../helpers/cli';
import { fileTreeChecksums, makeDisk, modifyDisk, randomBuffer, sha256, textFile } from '../helpers/images';
import { run, stopChild, waitExit } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { Repository } from '../../src/repo/repository';
import { getVm, listCheckpoints } from '../../src/index/catalog';
import { FilesSession } from '../../src/files/session';
import {
  diffListings,
  checksumCandidates,
  fileHistory,
  pathMatcher,
  type FileEntry,
} from '../../src/files/tree';
import { readPartitionTable } from '../../src/util/partitions';

process.env.LIBGUESTFS_BACKEND = process.env.LIBGUESTFS_BACKEND ?? 'direct';
process.env.LIBGUESTFS_BACKEND_SETTINGS = process.env.LIBGUESTFS_BACKEND_SETTINGS ?? 'force_tcg';

const MiB = 1 << 20;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let work: string;
let repo: string;
/** Guest path -> content, per checkpoint of the GPT VM 'web' (regular files only). */
const webTree: Map<string, Buffer>[] = [];
const lvmTree: Map<string, Buffer>[] = [];
const HOSTNAME_MTIME = Date.UTC(2001, 1, 3, 4, 5, 6) / 1000;

// ---------------------------------------------------------------------------------------------
// Fixtures

const ROOT_FILES: Record<string, Buffer> = {
  'etc/hostname': Buffer.from('web1\n'),
  'etc/nginx/nginx.conf': textFile(1, 6000),
  'var/log/syslog': textFile(3, 300_000),
  'usr/bin/tool': randomBuffer(6, 1_500_000),
  'home/u/sp ace.txt': Buffer.from('space\n'),
  'home/u/quo"te': Buffer.from('quote\n'),
  'home/u/ünï.txt': Buffer.from('unicode\n'),
  'home/u/new\nline': Buffer.from('newline\n'),
};
const DATA_FILES: Record<string, Buffer> = {
  'db/table.dat': randomBuffer(4, 3 * MiB),
  'db/index.dat': textFile(7, 40_000),
};
const EFI_FILES: Record<string, Buffer> = {
  'EFI/BOOT/BOOTX64.EFI': randomBuffer(5, 100_000),
  'EFI/debian/grub.cfg': textFile(8, 900),
};

function tree(...parts: [string, Record<string, Buffer>][]): Map<string, Buffer> {
  const m = new Map<string, Buffer>();
  for (const [prefix, files] of parts) for (const [p, c] of Object.entries(files)) m.set(`${prefix}/${p}`, c);
  return m;
}

/** mtools on a vfat partition of a qcow2 image, writing through QEMU (qemu-nbd + nbdfuse). */
async function onVfat(
  img: string,
  partOffset: number,
  fn: (mtarget: string) => Promise<void>,
): Promise<void> {
  const dir = fs.mkdtempSync(path.join(work, 'qview-'));
  const sock = path.join(dir, 'nbd.sock');
  const qemu = spawn('qemu-nbd', ['-f', 'qcow2', '--socket', sock, '--persistent', '--shared', '4', img], {
    stdio: 'ignore',
  });
  const fuseDir = path.join(dir, 'fuse');
  fs.mkdirSync(fuseDir);
  const pidFile = path.join(dir, 'nbdfuse.pid');
  let fuse: ReturnType<typeof spawn> | undefined;
  try {
    while (!existsSync(sock)) {
      if (qemu.exitCode !== null) throw new Error('qemu-nbd exited');
      await sleep(50);
    }
    fuse = spawn('nbdfuse', ['-P', pidFile, path.join(fuseDir, 'disk'), '--unix', sock], { stdio: 'ignore' });
    while (!existsSync(pidFile)) {
      if (fuse.exitCode !== null) throw new Error('nbdfuse exited');
      await sleep(50);
    }
    await fn(`${path.join(fuseDir, 'disk')}@@${partOffset}`);
  } finally {
    if (fuse) {
      await run('fusermount3', ['-u', fuseDir], { allowFail: true });
      await Promise.race([waitExit(fuse), sleep(10000)]);
      await stopChild(fuse, 2000);
    }
    await stopChild(qemu, 30000); // SIGTERM: qemu-nbd flushes and stores the bitmaps
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const MTOOLS_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1' };

async function buildWeb(): Promise<void> {
  const img = path.join(work, 'web.qcow2');
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 240,
    table: 'gpt',
    seed: 11,
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 64,
        label: 'root',
        files: Object.entries(ROOT_FILES).map(([p, c]) => ({ path: p, content: c })),
      },
      {
        fs: 'xfs',
        sizeMiB: 80,
        label: 'data',
        files: Object.entries(DATA_FILES).map(([p, c]) => ({ path: p, content: c })),
      },
      {
        fs: 'vfat',
        sizeMiB: 40,
        label: 'ESP',
        files: Object.entries(EFI_FILES).map(([p, c]) => ({ path: p, content: c })),
      },
      { fs: 'none', sizeMiB: 20, label: 'secret' },
    ],
  });
  // The xfs UUID goes into fstab by UUID; vfat by PARTLABEL; root by LABEL.
  const raw = path.join(work, 'web-probe.raw');
  await run('qemu-img', ['convert', '-O', 'raw', img, raw]);
  const fh = fs.openSync(raw, 'r');
  const table = await readPartitionTable(async (o, l) => {
    const b = Buffer.alloc(l);
    fs.readSync(fh, b, 0, l, o);
    return b;
  }, fs.fstatSync(fh).size);
  fs.closeSync(fh);
  const p2 = table.partitions[1];
  const p3 = table.partitions[2];
  const p4 = table.partitions[3];
  assert.ok(p2 && p3 && p4);
  const xfsUuid = (
    await run('blkid', ['-p', '-O', String(p2.start), '-o', 'value', '-s', 'UUID', raw])
  ).stdout.trim();
  fs.rmSync(raw);
  const fstab = Buffer.from(
    [
      '# test guest',
      'LABEL=root / ext4 errors=remount-ro 0 1',
      `UUID=${xfsUuid} /data xfs defaults 0 2`,
      'PARTLABEL=ESP /boot/efi vfat umask=0077 0 1',
      'PARTLABEL=secret /secret ext4 noauto 0 0',
      'proc /proc proc defaults 0 0',
      '',
    ].join('\n'),
  );
  // A real LUKS volume in partition 4 (written through QEMU).
  const luks = path.join(work, 'luks.img');
  fs.writeFileSync(path.join(work, 'key'), 'secret');
  await run('truncate', ['-s', '20M', luks]);
  await run('cryptsetup', [
    'luksFormat',
    '--batch-mode',
    '--type',
    'luks2',
    '--pbkdf',
    'pbkdf2',
    '--pbkdf-force-iterations',
    '1000',
    '--key-file',
    path.join(work, 'key'),
    luks,
  ]);
  await run('qemu-io', ['-f', 'qcow2', '-c', `write -s ${luks} ${p4.start} 1M`, img]);
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/fstab'), fstab);
    fs.symlinkSync('/etc', path.join(m, 'evil'));
    fs.symlinkSync('/etc/shadow', path.join(m, 'hostesc'));
    fs.symlinkSync('../etc/nginx/nginx.conf', path.join(m, 'etc/nginx.link'));
    for (const d of ['secret', 'data', 'boot/efi']) fs.mkdirSync(path.join(m, d), { recursive: true });
    fs.chmodSync(path.join(m, 'usr/bin/tool'), 0o755);
    fs.chownSync(path.join(m, 'home/u'), 1000, 1000);
    fs.chownSync(path.join(m, 'home/u/sp ace.txt'), 1000, 100);
    fs.chmodSync(path.join(m, 'home/u/sp ace.txt'), 0o640);
    fs.utimesSync(path.join(m, 'etc/hostname'), HOSTNAME_MTIME, HOSTNAME_MTIME);
  });
  const root1 = { ...ROOT_FILES, 'etc/fstab': fstab };
  webTree.push(tree(['', root1], ['/data', DATA_FILES], ['/boot/efi', EFI_FILES]));
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'full']);

  // check2: ext4 and xfs change (kernel mounts through qemu-nbd).
  const root2: Record<string, Buffer> = {
    ...root1,
    'etc/hostname': Buffer.from('web2\n'),
    'etc/app/new.conf': Buffer.from('new=1\n'),
  };
  delete root2['var/log/syslog'];
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/hostname'), 'web2\n');
    fs.rmSync(path.join(m, 'var/log/syslog'));
    fs.mkdirSync(path.join(m, 'etc/app'));
    fs.writeFileSync(path.join(m, 'etc/app/new.conf'), 'new=1\n');
    fs.chmodSync(path.join(m, 'usr/bin/tool'), 0o700);
  });
  const patch = randomBuffer(13, 300 * 1024);
  const table2 = Buffer.from(DATA_FILES['db/table.dat'] as Buffer);
  patch.copy(table2, 1234567);
  const data2 = { ...DATA_FILES, 'db/table.dat': table2, 'db/new.dat': randomBuffer(14, 700_000) };
  await modifyDisk(img, 'qcow2', 2, async (m) => {
    const fd = fs.openSync(path.join(m, 'db/table.dat'), 'r+');
    fs.writeSync(fd, patch, 0, patch.length, 1234567);
    fs.closeSync(fd);
    fs.writeFileSync(path.join(m, 'db/new.dat'), data2['db/new.dat']);
  });
  webTree.push(tree(['', root2], ['/data', data2], ['/boot/efi', EFI_FILES]));
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'inc']);

  // check3: vfat changes, written by mtools through QEMU.
  const shim = randomBuffer(15, 200_000);
  fs.writeFileSync(path.join(work, 'shim.efi'), shim);
  await onVfat(img, p3.start, async (t) => {
    await run('mdel', ['-i', t, '::/EFI/debian/grub.cfg'], { env: MTOOLS_ENV });
    await run('mcopy', ['-i', t, path.join(work, 'shim.efi'), '::/EFI/debian/shim.efi'], { env: MTOOLS_ENV });
  });
  const efi3: Record<string, Buffer> = { ...EFI_FILES, 'EFI/debian/shim.efi': shim };
  delete efi3['EFI/debian/grub.cfg'];
  webTree.push(tree(['', root2], ['/data', data2], ['/boot/efi', efi3]));
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'inc']);
}

/** Two LVM disks made in one appliance: lvm2 is a block copy of lvm1 (same PV/VG UUIDs), then changed. */
async function buildLvm(): Promise<void> {
  const stage = path.join(work, 'lvm-stage');
  fs.mkdirSync(stage);
  const files1: Record<string, Buffer> = {
    'etc/hostname': Buffer.from('lvm1\n'),
    'etc/fstab': Buffer.from(
      '/dev/mapper/vg0-root / ext4 defaults 0 1\n/dev/vg0/data /srv xfs defaults 0 2\n',
    ),
    'srv/old.bin': randomBuffer(21, 500_000),
    'srv/keep.txt': textFile(22, 10_000),
  };
  const changed = { 'etc/hostname': Buffer.from('lvm2\n'), 'srv/added.bin': randomBuffer(23, 300_000) };
  const put = (name: string, c: Buffer): string => {
    const f = path.join(stage, name.replace(/\//g, '_'));
    fs.writeFileSync(f, c);
    return f;
  };
  const script = [
    `add-drive ${path.join(work, 'lvm1.qcow2')} format:qcow2`,
    `add-drive ${path.join(work, 'lvm2.qcow2')} format:qcow2`,
    'run',
    'part-disk /dev/sda gpt',
    'pvcreate /dev/sda1',
    'vgcreate vg0 /dev/sda1',
    'lvcreate root vg0 200',
    'lvcreate data vg0 320',
    'mkfs ext4 /dev/vg0/root',
    'mkfs xfs /dev/vg0/data',
    'mount /dev/vg0/root /',
    'mkdir-p /etc',
    'mkdir-p /srv',
    'mount /dev/vg0/data /srv',
    ...Object.entries(files1).map(([p, c]) => `upload ${put(p, c)} /${p}`),
    'umount-all',
    'copy-device-to-device /dev/sda /dev/sdb sparse:true',
    'lvm-set-filter /dev/sdb',
    'vg-activate-all true',
    'mount /dev/vg0/root /',
    'mount /dev/vg0/data /srv',
    `upload ${put('etc/hostname.2', changed['etc/hostname'])} /etc/hostname`,
    'rm /srv/old.bin',
    `upload ${put('srv/added.bin', changed['srv/added.bin'])} /srv/added.bin`,
    'umount-all',
    '',
  ].join('\n');
  for (const n of ['lvm1.qcow2', 'lvm2.qcow2']) {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(work, n), '1G']);
  }
  fs.writeFileSync(path.join(stage, 'script'), script);
  await run('guestfish', ['-f', path.join(stage, 'script')]);
  const t1 = tree(['', files1]);
  const files2: Record<string, Buffer> = { ...files1, ...changed };
  delete files2['srv/old.bin'];
  lvmTree.push(t1, tree(['', files2]));
  await bkfsOk([
    '-r',
    repo,
    'backup',
    'lvm',
    '--disk',
    `vda=${path.join(work, 'lvm1.qcow2')}`,
    '--level',
    'full',
  ]);
  await bkfsOk([
    '-r',
    repo,
    'backup',
    'lvm',
    '--disk',
    `vda=${path.join(work, 'lvm2.qcow2')}`,
    '--level',
    'full',
  ]);
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-files-test-'));
  process.env.BKFS_RUN_DIR = path.join(work, 'run');
  repo = path.join(work, 'repo');
  await bkfsOk(['-r', repo, 'init']);
  await buildWeb();
  await buildLvm();
});

after(async () => {
  // Anything a failed test left mounted below the work directory goes first (deepest first).
  const mounts = fs
    .readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((l) => (l.split(' ')[1] ?? '').replace(/\\040/g, ' '))
    .filter((m) => m.startsWith(work + '/'))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) await run('umount', ['-l', m], { allowFail: true });
  if (mounts.length === 0) fs.rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// Helpers

/** sha256 of every regular file, keyed by guest path ('/x/y'), from a host copy of `guestDir`. */
async function copiedSums(hostDir: string, guestDir = ''): Promise<Map<string, string>> {
  const m = await fileTreeChecksums(hostDir);
  return new Map([...m].map(([rel, h]) => [`${guestDir}/${rel}`, h]));
}

function expectedSums(
  t: Map<string, Buffer>,
  filter: (p: string) => boolean = () => true,
): Map<string, string> {
  return new Map([...t].filter(([p]) => filter(p)).map(([p, c]) => [p, sha256(c)]));
}

function sorted(m: Map<string, string>): [string, string][] {
  return [...m].sort((a, b) => (a[0] < b[0] ? -1 : 1));
}

const notEfi = (p: string): boolean => !p.startsWith('/boot/efi/');

function mountsBelow(dir: string): string[] {
  return fs
    .readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((l) => (l.split(' ')[1] ?? '').replace(/\\040/g, ' '))
    .filter((m) => m === dir || m.startsWith(dir + '/'));
}

async function loopsOn(file: string): Promise<string> {
  return (await run('losetup', ['-a'])).stdout
    .split('\n')
    .filter((l) => l.includes(file))
    .join('\n');
}

class Collect extends Writable {
  chunks: Buffer[] = [];
  override _write(c: Buffer, _e: BufferEncoding, cb: () => void): void {
    this.chunks.push(c);
    cb();
  }
  get data(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel engine (fast): every checkpoint, CLI

describe('kernel engine', () => {
  it('ls VM@CP shows disks, partitions, filesystems and fstab mount points', async () => {
    const r = await bkfsOk(['-r', repo, 'ls', 'web@check1', '--engine', 'kernel', '--json']);
    const o = JSON.parse(r.stdout) as {
      engine: string;
      disks: { name: string; table: string; partitions: number }[];
      volumes: {
        id: string;
        type: string | null;
        label: string | null;
        uuid: string | null;
        mountpoint: string | null;
        note: string | null;
      }[];
      fstabFrom: string;
      skipped: { mountpoint: string; reason: string }[];
    };
    assert.equal(o.engine, 'kernel');
    assert.deepEqual(
      o.disks.map((d) => [d.name, d.table, d.partitions]),
      [['vda', 'gpt', 4]],
    );
    assert.deepEqual(
      o.volumes.map((v) => [v.id, v.type, v.label, v.mountpoint]),
      [
        ['vda1', 'ext4', 'root', '/'],
        ['vda2', 'xfs', 'data', '/data'],
        ['vda3', 'vfat', 'ESP', '/boot/efi'],
        ['vda4', 'crypto_LUKS', null, null],
      ],
    );
    assert.equal(o.volumes[3]?.note, 'encrypted');
    assert.equal(o.fstabFrom, 'vda1');
    assert.deepEqual(
      o.skipped.map((s) => s.mountpoint),
      ['/secret', '/proc'],
    );
    // The text form shows the same UUIDs (probe vs blkid: test/unit/files-probe.test.ts).
    const text = (await bkfsOk(['-r', repo, 'ls', 'web@check1', '--engine', 'kernel'])).stdout;
    for (const v of o.volumes) assert.ok(v.uuid && text.includes(v.uuid), `${v.id} uuid shown`);
  });

  it('cp -R of every checkpoint equals what was written (vfat left out, said so), metadata kept', async () => {
    for (let i = 0; i < 3; i++) {
      const dest = path.join(work, `kcopy${i + 1}`);
      const r = await bkfsOk(['-r', repo, 'cp', '-R', `web@check${i + 1}:/`, dest, '--engine', 'kernel']);
      assert.match(r.stderr, /\/boot\/efi left out: this kernel cannot mount vfat/);
      assert.deepEqual(
        sorted(await copiedSums(dest)),
        sorted(expectedSums(webTree[i] as Map<string, Buffer>, notEfi)),
      );
      const st = fs.statSync(path.join(dest, 'home/u/sp ace.txt'));
      assert.equal(st.mode & 0o7777, 0o640);
      assert.equal(st.uid, 1000);
      assert.equal(st.gid, 100);
      assert.equal(fs.statSync(path.join(dest, 'usr/bin/tool')).mode & 0o777, i === 0 ? 0o755 : 0o700);
      assert.equal(fs.readlinkSync(path.join(dest, 'evil')), '/etc');
      if (i === 0) assert.equal(fs.statSync(path.join(dest, 'etc/hostname')).mtimeMs / 1000, HOSTNAME_MTIME);
    }
  });

  it('cat, ls and single-file cp; guest symlinks stay inside the guest', async () => {
    const cat = await bkfsOk(['-r', repo, 'cat', 'web@check1:/etc/hostname', '--engine', 'kernel']);
    assert.equal(cat.stdout, 'web1\n');
    // /evil -> /etc and /etc/nginx.link -> ../etc/nginx/nginx.conf resolve in the guest, not on the host.
    assert.equal(
      (await bkfsOk(['-r', repo, 'cat', 'web@check2:/evil/hostname', '--engine', 'kernel'])).stdout,
      'web2\n',
    );
    const link = await bkfsOk(['-r', repo, 'cat', 'web:/etc/nginx.link', '--engine', 'kernel']);
    assert.equal(sha256(Buffer.from(link.stdout)), sha256(ROOT_FILES['etc/nginx/nginx.conf'] as Buffer));
    // Binary content through a pipe; a reader that goes away early leaves nothing mounted behind.
    const bin = await run('sh', [
      '-c',
      `node ${BKFS} -r ${repo} cat web@check1:/data/db/table.dat --engine kernel | sha256sum`,
    ]);
    assert.equal(bin.stdout.split(' ')[0], sha256(DATA_FILES['db/table.dat'] as Buffer));
    const early = await run('sh', [
      '-c',
      `node ${BKFS} -r ${repo} cat web@check1:/usr/bin/tool --engine kernel | head -c 100 | wc -c`,
    ]);
    assert.equal(early.stdout.trim(), '100');
    assert.deepEqual(
      mountsBelow(os.tmpdir()).filter((m) => m.includes('/bkfs-files-')),
      [],
    );
    const esc = await bkfs(['-r', repo, 'cat', 'web@check1:/hostesc', '--engine', 'kernel']);
    assert.equal(esc.code, EXIT_CODES.NOT_FOUND, esc.stderr);
    assert.match(esc.stderr, /\/hostesc does not exist \(\/etc\/shadow is missing\)/);
    const ls = JSON.parse(
      (await bkfsOk(['-r', repo, 'ls', 'web@check2:/home/u', '--json', '--engine', 'kernel'])).stdout,
    ) as {
      entries: { name: string; kind: string; size: number; mode: number; uid: number }[];
    };
    assert.deepEqual(
      ls.entries.map((e) => [e.name, e.kind, e.size]),
      [
        ['new\nline', 'file', 8],
        ['quo"te', 'file', 6],
        ['sp ace.txt', 'file', 6],
        ['ünï.txt', 'file', 8],
      ],
    );
    const long = await bkfsOk(['-r', repo, 'ls', '-l', 'web@check1:/', '--engine', 'kernel']);
    assert.match(long.stdout, /lrwxrwxrwx +0 +0 +4 .* evil -> \/etc/);
    assert.match(long.stdout, /drwxr-xr-x .* data\//);
    const dest = path.join(work, 'single');
    fs.mkdirSync(dest);
    await bkfsOk(['-r', repo, 'cp', 'web@check1:/data/db/table.dat', dest, '--engine', 'kernel']);
    assert.equal(
      sha256(fs.readFileSync(path.join(dest, 'table.dat'))),
      sha256(DATA_FILES['db/table.dat'] as Buffer),
    );
    // Explicit volume form: partition 2 is the xfs filesystem itself.
    await bkfsOk([
      '-r',
      repo,
      'cp',
      'web@check2:vda:2:/db/new.dat',
      path.join(dest, 'new.dat'),
      '--engine',
      'kernel',
    ]);
    assert.equal(
      sha256(fs.readFileSync(path.join(dest, 'new.dat'))),
      sha256(webTree[1]?.get('/data/db/new.dat') as Buffer),
    );
  });

  it('diff and find report exactly the changes made', async () => {
    const d = JSON.parse(
      (await bkfsOk(['-r', repo, 'diff', 'web@check1', 'web@check2', '--engine', 'kernel', '--json'])).stdout,
    ) as {
      items: { path: string; change: string; what: string[] }[];
    };
    assert.deepEqual(
      d.items.map((x) => [x.change, x.path, x.what.join(',')]),
      [
        ['changed', '/data/db/table.dat', 'mtime'],
        ['added', '/data/db/new.dat', ''],
        ['added', '/etc/app', ''],
        ['added', '/etc/app/new.conf', ''],
        ['changed', '/etc/hostname', 'mtime'],
        ['changed', '/usr/bin/tool', 'mode'],
        ['removed', '/var/log/syslog', ''],
      ].sort((a, b) => ((a[1] as string) < (b[1] as string) ? -1 : 1)),
    );
    const d23 = await bkfsOk(['-r', repo, 'diff', 'web@check2', 'web@check3', '/etc', '--engine', 'kernel']);
    assert.equal(d23.stdout, '', 'nothing changed under /etc');
    const f = JSON.parse(
      (await bkfsOk(['-r', repo, 'find', 'web', 'syslog', '--engine', 'kernel', '--json'])).stdout,
    ) as {
      matches: { path: string; history: { checkpoint: string; state: string; entry?: { size: number } }[] }[];
    };
    assert.deepEqual(
      f.matches.map((m) => [m.path, m.history.map((h) => `${h.checkpoint}:${h.state}`).join(' ')]),
      [['/var/log/syslog', 'check1:present check2:removed']],
    );
    assert.equal(f.matches[0]?.history[0]?.entry?.size, (ROOT_FILES['var/log/syslog'] as Buffer).length);
    const text = await bkfsOk(['-r', repo, 'find', 'web:/etc', '*.conf', '--engine', 'kernel']);
    assert.match(text.stdout, /\/etc\/app\/new.conf\n.*\n +check2 +added +6 /);
    assert.match(
      text.stdout,
      /\/etc\/nginx\/nginx.conf\n.*\n +check1 +present .*\n +check2 +unchanged .*\n +check3 +unchanged/,
    );
  });

  it('bad input: one clear line and a distinct exit code', async () => {
    const missing = await bkfs(['-r', repo, 'cat', 'web@check2:/var/log/syslog', '--engine', 'kernel']);
    assert.equal(missing.code, EXIT_CODES.NOT_FOUND);
    assert.equal(
      missing.stderr,
      'bkfs: web@check2:/var/log/syslog does not exist; it exists in web@check1\n',
    );
    const nowhere = await bkfs(['-r', repo, 'ls', 'web@check1:/nope', '--engine', 'kernel']);
    assert.equal(nowhere.code, EXIT_CODES.NOT_FOUND);
    assert.match(nowhere.stderr, /does not exist; it exists in none of the other checkpoints either/);
    const dest = path.join(work, 'exists');
    fs.mkdirSync(dest);
    fs.writeFileSync(path.join(dest, 'hostname'), 'mine\n');
    const ex = await bkfs(['-r', repo, 'cp', 'web@check1:/etc/hostname', dest, '--engine', 'kernel']);
    assert.equal(ex.code, EXIT_CODES.TARGET_EXISTS);
    assert.match(ex.stderr, /hostname exists \(use --force to overwrite\)/);
    assert.equal(fs.readFileSync(path.join(dest, 'hostname'), 'utf8'), 'mine\n');
    await bkfsOk(['-r', repo, 'cp', '--force', 'web@check1:/etc/hostname', dest, '--engine', 'kernel']);
    assert.equal(fs.readFileSync(path.join(dest, 'hostname'), 'utf8'), 'web1\n');
    assert.deepEqual(fs.readdirSync(dest), ['hostname'], 'no temporary file left');
    const disk = await bkfs(['-r', repo, 'ls', 'web@check1:vdz:1:/', '--engine', 'kernel']);
    assert.equal(disk.code, EXIT_CODES.NOT_FOUND);
    assert.match(disk.stderr, /has no disk 'vdz' \(disks: vda\)/);
    const part = await bkfs(['-r', repo, 'ls', 'web@check1:vda:7:/', '--engine', 'kernel']);
    assert.equal(part.code, EXIT_CODES.NOT_FOUND);
    assert.match(part.stderr, /disk vda has no partition 7 \(partitions: 1, 2, 3, 4\)/);
    const luks = await bkfs(['-r', repo, 'ls', 'web@check1:vda:4:/', '--engine', 'kernel']);
    assert.equal(luks.code, EXIT_CODES.FS_UNSUPPORTED);
    assert.match(luks.stderr, /vda4 is an encrypted volume \(LUKS2\)/);
    const dir = await bkfs(['-r', repo, 'cp', 'web@check1:/etc', dest, '--engine', 'kernel']);
    assert.equal(dir.code, EXIT_CODES.USAGE);
    assert.match(dir.stderr, /directory: use -R/);
    const lvm = await bkfs(['-r', repo, 'ls', 'lvm@check1:/etc', '--engine', 'kernel']);
    assert.equal(lvm.code, EXIT_CODES.FS_UNSUPPORTED);
    assert.match(lvm.stderr, /LVM/);
    const bad = await bkfs(['-r', repo, 'cat', 'web@check1:vda:x:/etc']);
    assert.equal(bad.code, EXIT_CODES.USAGE);
    const vfat = await bkfs([
      '-r',
      repo,
      'cat',
      'web@check1:/boot/efi/EFI/debian/grub.cfg',
      '--engine',
      'kernel',
    ]);
    assert.equal(vfat.code, EXIT_CODES.FS_UNSUPPORTED);
    assert.match(vfat.stderr, /cannot mount vfat \(vda3\).*use --engine guestfs/);
    // Nothing of this wrote into the repository.
    const v = await bkfs(['-r', repo, 'verify']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });

  it('a session killed with -9 leaves mounts behind; the next session releases them', async () => {
    const sessionDirs = (): string[] =>
      fs
        .readdirSync(os.tmpdir())
        .filter((n) => /^bkfs-files-[A-Za-z0-9]{6}$/.test(n))
        .map((n) => path.join(os.tmpdir(), n));
    const before = new Set(sessionDirs());
    // cat blocks on a pipe nobody reads while the guest filesystem is mounted on a loop device.
    const child = spawn(
      'node',
      [BKFS, '-r', repo, 'cat', 'web@check1:/data/db/table.dat', '--engine', 'kernel'],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let dead: string | undefined;
    for (let i = 0; i < 600 && dead === undefined; i++) {
      await new Promise((r) => setTimeout(r, 100));
      dead = sessionDirs().find((d) => !before.has(d) && mountsBelow(d).some((m) => m.includes('/root')));
    }
    assert.ok(dead, 'the cat session never mounted its guest filesystem');
    child.kill('SIGKILL');
    await waitExit(child);
    assert.ok(mountsBelow(dead).length > 0, 'kill -9 left nothing mounted: the test proves nothing');
    assert.notEqual(await loopsOn(dead), '', 'no loop device left attached');
    // Any later file session sweeps the dead one's leftovers.
    await bkfsOk(['-r', repo, 'ls', 'web@check1:/etc', '--engine', 'kernel']);
    assert.deepEqual(mountsBelow(dead), []);
    assert.equal(await loopsOn(dead), '');
    assert.equal(fs.existsSync(dead), false);
  });
});

// ---------------------------------------------------------------------------------------------
// libguestfs engine: one appliance for all checks of the GPT VM, one for the LVM VM

async function openSession(vmName: string): Promise<{ r: Repository; s: FilesSession; notices: string[] }> {
  const r = Repository.open(repo);
  const vm = getVm(r.db, vmName);
  const notices: string[] = [];
  const s = await FilesSession.open(r, vm, listCheckpoints(r.db, vm.id), {
    engine: 'guestfs',
    onNotice: (m) => notices.push(m),
  });
  return { r, s, notices };
}

describe('libguestfs engine', () => {
  it('every file of every checkpoint, vfat included; ls, cat, cp, find and diff logic; errors', async () => {
    const { r, s } = await openSession('web');
    try {
      const listings: FileEntry[][] = [];
      for (let i = 0; i < 3; i++) {
        const cp = `check${i + 1}`;
        const dest = path.join(work, `gcopy${i + 1}`);
        const res = await s.copy({ checkpoint: cp, path: '/' }, dest, { recursive: true, force: false });
        assert.equal(res.action, 'create');
        assert.deepEqual(
          sorted(await copiedSums(dest)),
          sorted(expectedSums(webTree[i] as Map<string, Buffer>)),
        );
        const st = fs.statSync(path.join(dest, 'home/u/sp ace.txt'));
        assert.deepEqual([st.mode & 0o7777, st.uid, st.gid], [0o640, 1000, 100]);
        assert.equal(fs.readlinkSync(path.join(dest, 'evil')), '/etc');
        listings.push((await s.walk({ checkpoint: cp, path: '/' })) as FileEntry[]);
      }
      assert.equal(s.stats.engine, 'guestfs');
      // Single files keep their metadata too.
      const one = path.join(work, 'g-hostname');
      await s.copy({ checkpoint: 'check1', path: '/etc/hostname' }, one, { recursive: false, force: false });
      assert.equal(fs.readFileSync(one, 'utf8'), 'web1\n');
      assert.equal(fs.statSync(one).mtimeMs / 1000, HOSTNAME_MTIME);
      const out = new Collect();
      await s.cat({ checkpoint: 'check3', path: '/boot/efi/EFI/debian/shim.efi' }, out);
      assert.equal(sha256(out.data), sha256(webTree[2]?.get('/boot/efi/EFI/debian/shim.efi') as Buffer));
      const ls = await s.list({ checkpoint: 'check2', path: '/home/u' });
      assert.deepEqual(
        ls.entries.map((e) => [e.name, e.size, e.uid]),
        [
          ['new\nline', 8, 0],
          ['quo"te', 6, 0],
          ['sp ace.txt', 6, 1000],
          ['ünï.txt', 8, 0],
        ],
      );
      const viaVolume = new Collect();
      await s.cat(
        { checkpoint: 'check1', volume: { kind: 'label', value: 'ESP' }, path: '/EFI/debian/grub.cfg' },
        viaVolume,
      );
      assert.equal(sha256(viaVolume.data), sha256(EFI_FILES['EFI/debian/grub.cfg'] as Buffer));

      // The same listings drive find and diff: exactly the changes made.
      const [l1, l2, l3] = listings as [FileEntry[], FileEntry[], FileEntry[]];
      assert.deepEqual(
        diffListings(l2, l3).map((d) => [d.change, d.path]),
        [
          ['removed', '/boot/efi/EFI/debian/grub.cfg'],
          ['added', '/boot/efi/EFI/debian/shim.efi'],
        ],
      );
      assert.deepEqual(
        diffListings(l1, l2).map((d) => `${d.change} ${d.path}`),
        [
          'changed /data/db/table.dat',
          'added /data/db/new.dat',
          'added /etc/app',
          'added /etc/app/new.conf',
          'changed /etc/hostname',
          'changed /usr/bin/tool',
          'removed /var/log/syslog',
        ].sort((a, b) => ((a.split(' ')[1] as string) < (b.split(' ')[1] as string) ? -1 : 1)),
      );
      const cand = checksumCandidates(l1, l2);
      const sums = {
        a: await s.checksums({ checkpoint: 'check1', path: '/' }, cand),
        b: await s.checksums({ checkpoint: 'check2', path: '/' }, cand),
      };
      assert.equal(sums.a.get('/data/db/index.dat'), sha256(DATA_FILES['db/index.dat'] as Buffer));
      assert.ok(diffListings(l1, l2, sums).every((d) => !d.what.includes('content')));
      const m = pathMatcher('*.EFI', true);
      const h = fileHistory(
        listings.map((l, i) => ({
          checkpoint: `check${i + 1}`,
          matches: new Map(l.filter((e) => m(e.path)).map((e) => [e.path, e])),
        })),
      );
      assert.deepEqual(
        [...h].map(([p, rows]) => `${p} ${rows.map((x) => x.state).join(',')}`),
        ['/boot/efi/EFI/BOOT/BOOTX64.EFI present,unchanged,unchanged', '/boot/efi/EFI/debian/shim.efi added'],
      );

      // Errors: a missing path names where it exists; LUKS is refused.
      await assert.rejects(
        s.list({ checkpoint: 'check3', path: '/boot/efi/EFI/debian/grub.cfg' }),
        (e: Error) => {
          assert.match(e.message, /grub.cfg does not exist; it exists in web@check1, web@check2$/);
          return true;
        },
      );
      await assert.rejects(
        s.list({ checkpoint: 'check1', volume: { kind: 'partition', disk: 'vda', partition: 4 }, path: '/' }),
        /encrypted volume/,
      );
      // A small file out of a checkpoint reads a tiny part of the repository.
      assert.ok(s.stats.bytesFromStore > 0);
    } finally {
      await s.close();
      r.close();
    }
  });

  it('LVM: logical volumes found and mounted through the guest fstab in every checkpoint', async () => {
    const { r, s } = await openSession('lvm');
    try {
      await s.layout('check1');
      const set = await s.volumes('check1');
      assert.deepEqual(set.volumes.map((v) => [v.id, v.probe?.type]).sort(), [
        ['vda1', 'LVM2_member'],
        ['vg0/data', 'xfs'],
        ['vg0/root', 'ext4'],
      ]);
      const layout = await s.layout('check2');
      assert.deepEqual(
        layout?.mounts.map((m) => [m.mountpoint, m.volume.id]),
        [
          ['/', 'vg0/root'],
          ['/srv', 'vg0/data'],
        ],
      );
      const listings: FileEntry[][] = [];
      for (let i = 0; i < 2; i++) {
        const dest = path.join(work, `lvmcopy${i + 1}`);
        await s.copy({ checkpoint: `check${i + 1}`, path: '/' }, dest, { recursive: true, force: false });
        const got = await copiedSums(dest);
        for (const k of [...got.keys()]) if (k.startsWith('/lost+found')) got.delete(k);
        assert.deepEqual(sorted(got), sorted(expectedSums(lvmTree[i] as Map<string, Buffer>)));
        listings.push((await s.walk({ checkpoint: `check${i + 1}`, path: '/' })) as FileEntry[]);
      }
      assert.deepEqual(
        diffListings(listings[0] as FileEntry[], listings[1] as FileEntry[]).map(
          (d) => `${d.change} ${d.path}`,
        ),
        ['changed /etc/hostname', 'added /srv/added.bin', 'removed /srv/old.bin'],
      );
      const out = new Collect();
      await s.cat(
        { checkpoint: 'check1', volume: { kind: 'lv', vg: 'vg0', lv: 'data' }, path: '/old.bin' },
        out,
      );
      assert.equal(sha256(out.data), sha256(lvmTree[0]?.get('/srv/old.bin') as Buffer));
    } finally {
      await s.close();
      r.close();
    }
  });

  it('the default engine is libguestfs, even where the kernel could mount (CLI find)', async () => {
    const f = await bkfsOk(['-r', repo, 'find', 'web', '*.efi', '-i', '--json', '--stats'], {
      BKFS_FILES_ENGINE: '',
    });
    assert.match(f.stderr, /engine guestfs:/);
    assert.doesNotMatch(f.stderr, /using libguestfs/);
    const res = JSON.parse(f.stdout) as {
      matches: { path: string; history: { checkpoint: string; state: string }[] }[];
    };
    assert.deepEqual(
      res.matches.map((m) => [m.path, m.history.map((h) => `${h.checkpoint}:${h.state}`).join(' ')]),
      [
        ['/boot/efi/EFI/BOOT/BOOTX64.EFI', 'check1:present check2:unchanged check3:unchanged'],
        ['/boot/efi/EFI/debian/shim.efi', 'check3:added'],
      ],
    );
  });
});

// ---------------------------------------------------------------------------------------------
// mount --files

describe('mount --files', () => {
  for (const engine of ['kernel', 'guestfs'] as const) {
    it(`${engine}: filesystems browsable next to the raw disks, copied with cp -a, torn down in order`, async () => {
      // In a directory every local user can reach (work is 0700), to see what they can read.
      const pub = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-files-pub-'));
      fs.chmodSync(pub, 0o755);
      const dir = path.join(pub, `mnt-${engine}`);
      fs.mkdirSync(dir, { mode: 0o755 });
      const cp = engine === 'kernel' ? 2 : 3;
      try {
        const m = await bkfsOk(['-r', repo, 'mount', '--files', `web@check${cp}`, dir, '--engine', engine]);
        assert.match(m.stdout, new RegExp(`filesystems read with ${engine}`));
        assert.ok(fs.statSync(path.join(dir, 'disks/vda.raw')).size === 240 * MiB);
        const names = fs.readdirSync(path.join(dir, 'fs')).sort();
        assert.deepEqual(names, engine === 'kernel' ? ['vda1', 'vda2'] : ['vda1', 'vda2', 'vda3']);
        if (engine === 'kernel') assert.match(m.stderr, /vda3 not mounted: this kernel cannot mount vfat/);
        const t = webTree[cp - 1] as Map<string, Buffer>;
        const copies: [string, string, (p: string) => boolean][] = [
          ['vda1', '', (p) => !p.startsWith('/data/') && notEfi(p)],
          ['vda2', '/data', (p) => p.startsWith('/data/')],
        ];
        if (engine === 'guestfs') copies.push(['vda3', '/boot/efi', (p) => !notEfi(p)]);
        for (const [vol, prefix, pick] of copies) {
          const dest = path.join(work, `mcopy-${engine}-${vol}`);
          await run('cp', ['-a', path.join(dir, 'fs', vol), dest]);
          const got = await copiedSums(dest, prefix);
          for (const k of [...got.keys()]) if (k.includes('lost+found')) got.delete(k);
          assert.deepEqual(sorted(got), sorted(expectedSums(t, pick)), `${engine} ${vol}`);
        }
        assert.equal(fs.statSync(path.join(dir, 'fs/vda1/home/u/sp ace.txt')).uid, 1000);
        // Only the mounting user reaches guest files: not another local user, not even one whose
        // uid owns the file in the guest (1000), nor for a world-readable guest file.
        assert.equal(fs.statSync(path.join(dir, 'fs/vda1/etc/hostname')).mode & 0o004, 0o004);
        for (const uid of ['1000', '65534']) {
          const top = await run('setpriv', ['--reuid', uid, '--regid', uid, '--clear-groups', 'ls', dir], {
            allowFail: true,
          });
          assert.equal(top.code, 0, `uid ${uid} reaches the mount directory itself: ${top.stderr}`);
          for (const p of ['fs/vda1/etc/hostname', 'fs/vda1/home/u/sp ace.txt', 'disks/vda.raw', 'fs']) {
            const as = await run(
              'setpriv',
              ['--reuid', uid, '--regid', uid, '--clear-groups', 'head', '-c', '1', path.join(dir, p)],
              { allowFail: true },
            );
            assert.notEqual(as.code, 0, `uid ${uid} read ${p}`);
            assert.match(as.stderr, /Permission denied|Is a directory/, `uid ${uid} ${p}: ${as.stderr}`);
          }
          const ls = await run(
            'setpriv',
            ['--reuid', uid, '--regid', uid, '--clear-groups', 'ls', path.join(dir, 'fs')],
            {
              allowFail: true,
            },
          );
          assert.notEqual(ls.code, 0, `uid ${uid} listed fs/: ${ls.stdout}`);
        }
      } finally {
        const u = await bkfs(['-r', repo, 'umount', dir]);
        assert.equal(u.code, 0, u.stderr);
      }
      assert.deepEqual(mountsBelow(dir), []);
      assert.deepEqual(fs.readdirSync(dir), []);
      assert.equal(await loopsOn(dir), '');
      fs.rmSync(pub, { recursive: true, force: true });
      const left = (await run('pgrep', ['-f', process.env.BKFS_RUN_DIR as string], { allowFail: true }))
        .stdout;
      assert.equal(left.trim(), '');
    });
  }

  it('refuses a non-empty directory and an unknown checkpoint', async () => {
    const dir = path.join(work, 'mnt-busy');
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'x'), '');
    const r = await bkfs(['-r', repo, 'mount', '--files', 'web@check1', dir, '--engine', 'kernel']);
    assert.equal(r.code, EXIT_CODES.TARGET_INVALID);
    const free = path.join(work, 'mnt-free');
    fs.mkdirSync(free);
    const n = await bkfs(['-r', repo, 'mount', '--files', 'web@check9', free, '--engine', 'kernel']);
    assert.equal(n.code, EXIT_CODES.NOT_FOUND);
  });
});
