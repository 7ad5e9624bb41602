/**
 * Guests are untrusted (issue 11 §4): nothing a guest writes may make bkfs read a host file, write
 * into the guest's disk, or reach the host kernel's filesystem code.
 *
 * Source formats, one crafted image per source kind: a raw disk whose guest wrote, at byte 0, a
 * qcow2 header naming a host file (random bytes in a 0700 directory) as backing file, or as
 * external data file:
 *   - `--disk NAME=IMAGE` (undeclared): refused with SOURCE_UNSAFE (exit 25), naming the file it
 *     refers to and how to declare the format; the image is left byte-identical (no bitmap added);
 *   - `--disk NAME=raw:IMAGE` and `--format raw`: backed up as the raw bytes, byte for byte;
 *   - a declared qcow2 whose backing file has no recorded format: refused (qemu would probe it);
 *   - an offline libvirt domain declaring the disk raw (and one with no driver type: libvirt's
 *     default, raw): the checkpoint equals the raw file, the host file's bytes never appear;
 *   - a running libvirt domain with such a raw disk (QEMU opens it with the declared format).
 * File-level restore: the default engine is libguestfs (checked through `--stats`), the kernel engine only when named (`--engine kernel` or BKFS_FILES_ENGINE=kernel); on a
 * guest without /etc/fstab, a path that exists on one filesystem is found there and said so, one on
 * several filesystems is refused listing them, one on none is NOT_FOUND.
 *
 * Needs root (loop devices, libvirt), qemu-utils, libguestfs-tools, nbdfuse, libvirt + QEMU.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { makeDisk, randomBuffer, sha256 } from '../helpers/images';
import {
  domainXml,
  libvirtMissing,
  startDaemons,
  stopDaemons,
  TestDomain,
  virsh,
  virshTry,
  type Daemons,
} from '../helpers/libvirt';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

process.env.LIBGUESTFS_BACKEND = process.env.LIBGUESTFS_BACKEND ?? 'direct';
process.env.LIBGUESTFS_BACKEND_SETTINGS = process.env.LIBGUESTFS_BACKEND_SETTINGS ?? 'force_tcg';

const MiB = 1 << 20;
const DISK = 16 * MiB;

let work: string;
let secretDir: string;
let secret: Buffer;
let secretFile: string;
let repo: string;

function fileSha(f: string): string {
  return sha256(fs.readFileSync(f));
}

/** Does `file` contain the first 4 KiB of the host secret anywhere? */
function holdsSecret(data: Buffer): boolean {
  return data.includes(secret.subarray(0, 4096));
}

/**
 * A raw guest disk of 16 MiB whose first bytes are a qcow2 header that `qemu-img create` made with
 * `opts` (what a guest can write to its own disk), plus guest data at 8 MiB.
 */
async function craftedRawDisk(name: string, opts: string[]): Promise<string> {
  const img = path.join(work, name);
  const hdr = path.join(work, `${name}.hdr`);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, hdr, `${DISK}`]);
  const header = fs.readFileSync(hdr);
  fs.rmSync(hdr);
  const disk = Buffer.alloc(DISK);
  header.copy(disk, 0);
  randomBuffer(77, MiB).copy(disk, 8 * MiB);
  fs.writeFileSync(img, disk);
  // Proof that the crafted disk is what it claims: probed, it is a qcow2 naming a host file.
  const probed = JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', img])).stdout) as {
    format: string;
  };
  assert.equal(probed.format, 'qcow2');
  return img;
}

/** Every byte the checkpoint holds for `disk`, read through bkfs' own read path. */
async function checkpointBytes(ref: string, disk: string): Promise<Buffer> {
  const out = path.join(work, `read-${process.hrtime.bigint()}.raw`);
  await bkfsOk(['-r', repo, 'restore', ref, '--disk', disk, '--to', out]);
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-guests-test-'));
  fs.chmodSync(work, 0o755); // QEMU (libvirt-qemu) must reach the images of the libvirt tests
  secretDir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-guests-secret-'));
  fs.chmodSync(secretDir, 0o700);
  secret = randomBuffer(4242, 256 * 1024);
  secretFile = path.join(secretDir, 'shadow');
  fs.writeFileSync(secretFile, secret, { mode: 0o600 });
  repo = path.join(work, 'repo');
  await bkfsOk(['-r', repo, 'init']);
});

after(() => {
  fs.rmSync(work, { recursive: true, force: true });
  fs.rmSync(secretDir, { recursive: true, force: true });
});

describe('image sources: a guest-written qcow2 header never reaches a host file', () => {
  it('--disk undeclared: refused (exit 25) naming the backing file, image untouched', async () => {
    const img = await craftedRawDisk('evil-backing.img', ['-F', 'raw', '-b', secretFile]);
    const before = fileSha(img);
    const r = await bkfs(['-r', repo, 'backup', 'evil', '--disk', `vda=${img}`, '--level', 'full']);
    assert.equal(r.code, EXIT_CODES.SOURCE_UNSAFE, r.stderr);
    assert.equal(r.code, 25);
    assert.match(r.stderr, new RegExp(`backing file ${secretFile}`));
    assert.match(r.stderr, new RegExp(`--disk NAME=raw:${img}`));
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.equal(fileSha(img), before, 'bkfs wrote nothing (no bitmap) into the disk');
    const list = await bkfsOk(['-r', repo, 'list', '--json']);
    assert.deepEqual(JSON.parse(list.stdout), [], 'no checkpoint');
  });

  it('--disk undeclared: an external data file is refused the same way', async () => {
    const img = await craftedRawDisk('evil-data.img', ['-o', `data_file=${path.join(secretDir, 'data')}`]);
    fs.writeFileSync(path.join(secretDir, 'data'), secret);
    const r = await bkfs(['-r', repo, 'backup', 'evil', '--disk', `vda=${img}`, '--level', 'full']);
    assert.equal(r.code, EXIT_CODES.SOURCE_UNSAFE, r.stderr);
    assert.match(r.stderr, /data file .*bkfs-guests-secret-.*\/data/);
  });

  it('--disk vda=raw:IMAGE and --format raw: the raw bytes, byte for byte, image untouched', async () => {
    const img = await craftedRawDisk('evil-raw.img', ['-F', 'raw', '-b', secretFile]);
    const before = fileSha(img);
    await bkfsOk(['-r', repo, 'backup', 'declared', '--disk', `vda=raw:${img}`, '--level', 'full']);
    await bkfsOk([
      '-r',
      repo,
      'backup',
      'declared',
      '--disk',
      `vda=${img}`,
      '--format',
      'raw',
      '--level',
      'full',
    ]);
    assert.equal(fileSha(img), before, 'bkfs wrote nothing into the raw disk');
    for (const cp of ['check1', 'check2']) {
      await assertCheckpointEquals(repo, `declared@${cp}`, 'vda', img, 20);
      const bytes = await checkpointBytes(`declared@${cp}`, 'vda');
      assert.equal(holdsSecret(bytes), false, 'the host file is not in the backup');
    }
    const info = JSON.parse((await bkfsOk(['-r', repo, 'list', 'declared', '--json'])).stdout) as {
      disks: { name: string }[];
    }[];
    assert.equal(info.length, 2);
    // An incremental needs bitmaps, which a raw disk does not have (and bkfs never adds one).
    const inc = await bkfs(['-r', repo, 'backup', 'declared', '--disk', `vda=raw:${img}`, '--level', 'inc']);
    assert.equal(inc.code, EXIT_CODES.CHAIN_BROKEN, inc.stderr);
    assert.equal(fileSha(img), before);
  });

  it('a declared qcow2 is read as qcow2; one whose backing format is not recorded is refused', async () => {
    const base = path.join(work, 'base.raw');
    fs.writeFileSync(base, randomBuffer(5, 4 * MiB));
    const top = path.join(work, 'top.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', base, top]);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 64k', top]);
    const ref = path.join(work, 'top.ref');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, ref]);
    await bkfsOk(['-r', repo, 'backup', 'chain', '--disk', `vda=qcow2:${top}`, '--level', 'full']);
    await assertCheckpointEquals(repo, 'chain@check1', 'vda', ref, 10);
    // The same overlay with its backing format removed: qemu would guess the base's format from
    // bytes a guest wrote into it.
    // (qemu-img 7 no longer writes such images: end the header extensions at the backing format one.)
    const q = fs.readFileSync(top);
    const ext = q.subarray(0, 4096).indexOf(Buffer.from('e2792aca', 'hex'));
    assert.ok(ext > 0, 'backing format header extension found');
    q.writeUInt32BE(0, ext);
    fs.writeFileSync(top, q);
    const probed = JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', top])).stdout) as Record<
      string,
      unknown
    >;
    assert.equal(probed['backing-filename-format'], undefined, 'the backing format is gone');
    const r = await bkfs(['-r', repo, 'backup', 'chain', '--disk', `vda=qcow2:${top}`, '--level', 'full']);
    assert.equal(r.code, EXIT_CODES.SOURCE_UNSAFE, r.stderr);
    assert.match(r.stderr, /without its format.*qemu-img rebase -u -F/);
    const u = await bkfs(['-r', repo, 'backup', 'chain', '--disk', `vda=${top}`, '--level', 'full']);
    assert.equal(u.code, EXIT_CODES.SOURCE_UNSAFE, u.stderr);
    // Bad declarations.
    const bad = await bkfs(['-r', repo, 'backup', 'chain', '--disk', `vda=${top}`, '--format', 'vmdk']);
    assert.equal(bad.code, EXIT_CODES.SOURCE_FORMAT, bad.stderr);
    const wrong = await bkfs([
      '-r',
      repo,
      'backup',
      'chain',
      '--disk',
      `vda=qcow2:${base}`,
      '--level',
      'full',
    ]);
    assert.equal(wrong.code, EXIT_CODES.SOURCE_FORMAT, wrong.stderr);
  });
});

describe('libvirt sources use the domain XML format', { skip: libvirtMissing() ?? false }, () => {
  let daemons: Daemons = { started: [] };
  before(async () => {
    daemons = await startDaemons();
  });
  after(async () => {
    await stopDaemons(daemons);
  });

  it('offline domain: a raw disk holding a qcow2 header is backed up as raw (declared and default)', async () => {
    const img = await craftedRawDisk('off-evil.img', ['-F', 'raw', '-b', secretFile]);
    const before = fileSha(img);
    for (const declared of [true, false]) {
      const name = `bkfs-guests-off-${declared ? 'raw' : 'none'}-${process.pid}`;
      const xml = domainXml(name, [{ target: 'vda', file: img, format: 'raw', bus: 'virtio' }]);
      const xmlFile = path.join(work, `${name}.xml`);
      // No driver type at all: libvirt reads the disk as raw (it does not probe), and so must bkfs.
      fs.writeFileSync(xmlFile, declared ? xml : xml.replace(/ type='raw'/, ''));
      await virsh('define', xmlFile);
      try {
        const vm = declared ? 'offraw' : 'offnone';
        const r = await bkfs(['-r', repo, 'backup', vm, '--libvirt', name, '--level', 'full']);
        assert.equal(r.code, 0, r.stderr);
        await assertCheckpointEquals(repo, `${vm}@check1`, 'vda', img, 20);
        assert.equal(holdsSecret(await checkpointBytes(`${vm}@check1`, 'vda')), false);
      } finally {
        await virshTry('undefine', name);
      }
    }
    assert.equal(fileSha(img), before);
  });

  it('running domain: the pull-mode backup of such a raw disk holds the raw bytes', async () => {
    const img = await craftedRawDisk('live-evil.img', ['-F', 'raw', '-b', secretFile]);
    const scratch = fs.mkdtempSync(path.join(work, 'scratch-'));
    fs.chmodSync(scratch, 0o755);
    const name = `bkfs-guests-live-${process.pid}`;
    const dom = await TestDomain.create(work, name, [
      { target: 'vda', file: img, format: 'raw', bus: 'virtio', readonly: false },
    ]);
    try {
      const r = await bkfs([
        '-r',
        repo,
        'backup',
        'live',
        '--libvirt',
        name,
        '--level',
        'full',
        '--scratch-dir',
        scratch,
      ]);
      assert.equal(r.code, 0, r.stderr);
      await assertCheckpointEquals(repo, 'live@check1', 'vda', img, 20);
      assert.equal(holdsSecret(await checkpointBytes('live@check1', 'vda')), false);
    } finally {
      await dom.destroy();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// File-level restore

describe('file-level restore of an untrusted guest', () => {
  const ONLY = Buffer.from('only on the first data filesystem\n');
  let fsRepo: string;

  before(async () => {
    // Data disks without any /etc/fstab: a GPT disk with two ext4 filesystems, and a whole-disk ext4.
    const a = path.join(work, 'data-a.img');
    const b = path.join(work, 'data-b.img');
    await makeDisk(a, {
      format: 'raw',
      sizeMiB: 40,
      table: 'gpt',
      seed: 3,
      partitions: [
        {
          fs: 'ext4',
          sizeMiB: 16,
          label: 'data1',
          files: [
            { path: 'only-here.txt', content: ONLY },
            { path: 'common.txt', content: Buffer.from('one\n') },
          ],
        },
        {
          fs: 'ext4',
          sizeMiB: 16,
          label: 'data2',
          files: [{ path: 'common.txt', content: Buffer.from('two\n') }],
        },
      ],
    });
    await makeDisk(b, {
      format: 'raw',
      sizeMiB: 16,
      table: 'none',
      seed: 4,
      partitions: [
        {
          fs: 'ext4',
          sizeMiB: 16,
          label: 'data3',
          files: [{ path: 'other/x.txt', content: Buffer.from('x\n') }],
        },
      ],
    });
    fsRepo = path.join(work, 'fsrepo');
    await bkfsOk(['-r', fsRepo, 'init']);
    await bkfsOk([
      '-r',
      fsRepo,
      'backup',
      'nofstab',
      '--disk',
      `vda=raw:${a}`,
      '--disk',
      `vdb=raw:${b}`,
      '--level',
      'full',
    ]);
  });

  it('no fstab: a path on exactly one filesystem is used and said; several: listed; none: NOT_FOUND', async () => {
    const k = ['--engine', 'kernel'];
    const cat = await bkfs(['-r', fsRepo, 'cat', 'nofstab@check1:/only-here.txt', ...k]);
    assert.equal(cat.code, 0, cat.stderr);
    assert.equal(cat.stdout, ONLY.toString());
    assert.match(
      cat.stderr,
      /has no \/etc\/fstab: \/only-here\.txt exists only on vda:1 \(ext4 'data1'\), using it/,
    );
    const deep = await bkfsOk(['-r', fsRepo, 'ls', 'nofstab@check1:/other', ...k, '--json']);
    assert.match(deep.stderr, /exists only on vdb \(ext4 'data3'\)/);
    assert.match(deep.stdout, /x\.txt/);
    const several = await bkfs(['-r', fsRepo, 'cat', 'nofstab@check1:/common.txt', ...k]);
    assert.equal(several.code, EXIT_CODES.USAGE, several.stderr);
    assert.match(
      several.stderr,
      /exists on several filesystems: vda:1 \(ext4 'data1'\), vda:2 \(ext4 'data2'\); name one, e.g. nofstab@check1:vda:1:\/common\.txt/,
    );
    const none = await bkfs(['-r', fsRepo, 'cat', 'nofstab@check1:/nowhere', ...k]);
    assert.equal(none.code, EXIT_CODES.NOT_FOUND, none.stderr);
    assert.match(none.stderr, /exists on none of the filesystems.*vda:1.*vda:2.*vdb/);
    // Named explicitly, as before.
    const named = await bkfsOk(['-r', fsRepo, 'cat', 'nofstab@check1:vda:2:/common.txt', ...k]);
    assert.equal(named.stdout, 'two\n');
  });

  it('BKFS_FILES_ENGINE=kernel is the documented host opt-in for the kernel engine', async () => {
    const r = await bkfsOk(['-r', fsRepo, 'cat', 'nofstab@check1:/only-here.txt', '--stats'], {
      BKFS_FILES_ENGINE: 'kernel',
    });
    assert.match(r.stderr, /engine kernel:/);
    const bad = await bkfs(['-r', fsRepo, 'cat', 'nofstab@check1:/only-here.txt'], {
      BKFS_FILES_ENGINE: 'loop',
    });
    assert.equal(bad.code, EXIT_CODES.USAGE, bad.stderr);
  });

  it('the default engine is libguestfs: cp of one small file (found on the only filesystem that has it)', async () => {
    const dest = path.join(work, 'only-here.txt');
    const t0 = Date.now();
    const r = await bkfs(['-r', fsRepo, 'cp', 'nofstab@check1:/only-here.txt', dest, '--stats'], {
      BKFS_FILES_ENGINE: '',
    });
    const ms = Date.now() - t0;
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /engine guestfs:/);
    assert.match(r.stderr, /exists only on vda:1/);
    assert.deepEqual(fs.readFileSync(dest), ONLY);
    process.stderr.write(`guests.test: default-engine cp of one small file took ${ms} ms\n`);
  });
});
