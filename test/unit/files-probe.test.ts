/**
 * Filesystem probing against images made by the real tools (mkfs.ext2/3/4, mkfs.xfs, mkfs.vfat,
 * mkfs.btrfs, mkntfs, mkswap, cryptsetup luksFormat), compared with `blkid -p`; and the engine
 * choice rules for a given host. No root needed.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { run } from '../../src/util/proc';
import { probeVolume, PROBE_BYTES } from '../../src/files/probe';
import {
  engineFromEnv,
  kernelDriver,
  kernelMountOptions,
  pickEngine,
  type KernelSupport,
} from '../../src/files/engine';
import type { Volume } from '../../src/files/volumes';
import { isBkfsError } from '../../src/errors';

const MiB = 1 << 20;
let dir: string;

before(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bkfs-probe-test-'));
});
after(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

async function image(name: string, sizeMiB: number): Promise<string> {
  const f = path.join(dir, name);
  await fsp.writeFile(f, '');
  await fsp.truncate(f, sizeMiB * MiB);
  return f;
}

async function probeFile(f: string): Promise<ReturnType<typeof probeVolume>> {
  const fh = await fsp.open(f, 'r');
  try {
    const { size } = await fh.stat();
    return await probeVolume(async (o, l) => {
      const b = Buffer.alloc(l);
      const { bytesRead } = await fh.read(b, 0, l, o);
      return b.subarray(0, bytesRead);
    }, size);
  } finally {
    await fh.close();
  }
}

async function blkid(f: string): Promise<Record<string, string>> {
  const r = await run('blkid', ['-p', '-o', 'export', f], { allowFail: true });
  const out: Record<string, string> = {};
  for (const l of r.stdout.split('\n')) {
    const i = l.indexOf('=');
    if (i > 0) out[l.slice(0, i)] = l.slice(i + 1);
  }
  return out;
}

async function sameAsBlkid(f: string, expectType: string): Promise<void> {
  const p = await probeFile(f);
  const b = await blkid(f);
  assert.equal(b.TYPE, expectType, `blkid type of ${path.basename(f)}`);
  assert.equal(p?.type, b.TYPE);
  assert.equal(p?.label, b.LABEL);
  assert.equal(p?.uuid, b.UUID);
}

const XFS_ENV = { ...process.env, TEST_DIR: '1', TEST_DEV: '1', QA_CHECK_FS: '1' };

describe('probe', () => {
  it('ext2, ext3 and ext4 with label and UUID', async () => {
    for (const t of ['ext2', 'ext3', 'ext4']) {
      const f = await image(`${t}.img`, 16);
      await run(`mkfs.${t}`, ['-q', '-F', '-L', `lbl-${t}`, '-U', '0e8f6f4c-1c4b-4f56-9d0a-5c1a2b3c4d5e', f]);
      await sameAsBlkid(f, t);
    }
  });

  it('xfs, btrfs, vfat, NTFS and swap', async () => {
    const xfs = await image('xfs.img', 300);
    await run(
      'mkfs.xfs',
      ['-q', '-f', '-L', 'data', '-m', 'uuid=6b3c1ad0-8d3e-4d1e-9d7f-111111111111', xfs],
      {
        env: XFS_ENV,
      },
    );
    await sameAsBlkid(xfs, 'xfs');
    const btrfs = await image('btrfs.img', 128);
    await run('mkfs.btrfs', ['-q', '-f', '-L', 'pool', '-U', '7b3c1ad0-8d3e-4d1e-9d7f-222222222222', btrfs]);
    await sameAsBlkid(btrfs, 'btrfs');
    const fat32 = await image('fat32.img', 64);
    await run('mkfs.vfat', ['-F', '32', '-n', 'ESP', '-i', '1234ABCD', fat32]);
    await sameAsBlkid(fat32, 'vfat');
    const fat16 = await image('fat16.img', 16);
    await run('mkfs.vfat', ['-F', '16', '-i', '0000BEEF', fat16]);
    await sameAsBlkid(fat16, 'vfat');
    const ntfs = await image('ntfs.img', 16);
    await run('mkntfs', ['-q', '-F', '-Q', '-L', 'win', ntfs]);
    const p = await probeFile(ntfs);
    const b = await blkid(ntfs);
    assert.equal(p?.type, 'ntfs');
    assert.equal(p?.uuid, b.UUID, 'NTFS serial'); // the NTFS label lives in the MFT: not probed
    const swap = await image('swap.img', 8);
    await run('mkswap', ['-L', 'sw', '-U', '9b3c1ad0-8d3e-4d1e-9d7f-333333333333', swap]);
    await sameAsBlkid(swap, 'swap');
  });

  it('LUKS1 and LUKS2 are recognised as encrypted', async () => {
    const key = path.join(dir, 'key');
    await fsp.writeFile(key, 'secret');
    for (const type of ['luks1', 'luks2']) {
      const f = await image(`${type}.img`, 20);
      await run('cryptsetup', [
        'luksFormat',
        '--batch-mode',
        '--type',
        type,
        '--pbkdf',
        'pbkdf2',
        '--pbkdf-force-iterations',
        '1000',
        '--key-file',
        key,
        '--uuid',
        'a1b2c3d4-0000-4000-8000-000000000001',
        f,
      ]);
      const p = await probeFile(f);
      assert.equal(p?.type, 'crypto_LUKS');
      assert.equal(p?.usage, 'crypto');
      assert.equal(p?.version, type === 'luks1' ? 1 : 2);
      assert.equal(p?.uuid, (await blkid(f)).UUID);
    }
  });

  it('nothing on zeros or random data; short volumes are fine', async () => {
    assert.equal(await probeFile(await image('zero.img', 1)), null);
    const r = path.join(dir, 'rand.img');
    const buf = Buffer.alloc(PROBE_BYTES);
    for (let i = 0; i < buf.length; i++) buf[i] = (i * 2654435761) >>> 24;
    await fsp.writeFile(r, buf);
    assert.equal(await probeFile(r), null);
    assert.equal(await probeVolume(async () => Buffer.alloc(0), 100), null);
  });
});

describe('engine choice', () => {
  const host = (over: Partial<KernelSupport> = {}): KernelSupport => ({
    root: true,
    filesystems: new Set(['ext3', 'ext4', 'xfs', 'btrfs']),
    deviceMapper: false,
    loop: true,
    fuse: true,
    nbdfuse: true,
    ...over,
  });
  const v = (id: string, type: string, extra: Partial<Volume> = {}): Volume => ({
    id,
    offset: 0,
    size: MiB,
    probe: { type, usage: type === 'LVM2_member' ? 'raid' : 'filesystem' },
    ...extra,
  });

  it('auto is libguestfs even where the kernel could mount everything (guests are untrusted)', () => {
    assert.deepEqual(pickEngine('auto', host(), true, [v('vda1', 'ext4'), v('vda2', 'xfs')]), {
      engine: 'guestfs',
    });
    assert.deepEqual(pickEngine('auto', host(), true, []), { engine: 'guestfs' });
    assert.deepEqual(pickEngine('kernel', host(), true, [v('vda1', 'ext4')]), { engine: 'kernel' });
    assert.equal(engineFromEnv(undefined), 'auto');
    assert.equal(engineFromEnv('kernel'), 'kernel');
    assert.throws(() => engineFromEnv('loop'), /BKFS_FILES_ENGINE must be auto, guestfs or kernel/);
  });

  it('an explicit engine fails clearly when it cannot serve', () => {
    const code = (fn: () => unknown) => {
      try {
        fn();
      } catch (e) {
        return isBkfsError(e) ? `${e.code}: ${e.message}` : 'OTHER';
      }
      return 'ok';
    };
    assert.match(
      code(() => pickEngine('kernel', host(), true, [v('p', 'ntfs')])),
      /^FS_UNSUPPORTED: .*ntfs3\/ntfs/,
    );
    assert.match(
      code(() => pickEngine('kernel', host({ nbdfuse: false }), true, [])),
      /^FS_UNSUPPORTED: .*libnbd-bin/,
    );
    assert.match(
      code(() => pickEngine('guestfs', host(), false, [])),
      /^EXTERNAL_TOOL: .*libguestfs-tools/,
    );
    assert.match(
      code(() => pickEngine('auto', host({ root: false }), false, [])),
      /^EXTERNAL_TOOL: .*libguestfs-tools.*trusted guests only, --engine kernel/,
    );
  });

  it('maps probed types to drivers and read-only options', () => {
    assert.deepEqual(kernelDriver(v('a', 'ext2'), host()), { driver: 'ext4' });
    assert.deepEqual(kernelDriver(v('a', 'ext3'), host()), { driver: 'ext3' });
    assert.match(
      JSON.stringify(kernelDriver(v('a', 'ext4', { lv: { vg: 'g', lv: 'l' } }), host())),
      /logical volume/,
    );
    assert.deepEqual(kernelMountOptions('ext4', []), ['ro', 'nosuid', 'nodev', 'noexec', 'noload']);
    assert.deepEqual(kernelMountOptions('xfs', []), [
      'ro',
      'nosuid',
      'nodev',
      'noexec',
      'norecovery',
      'nouuid',
    ]);
    assert.deepEqual(kernelMountOptions('btrfs', ['subvol=@']), [
      'ro',
      'nosuid',
      'nodev',
      'noexec',
      'rescue=nologreplay',
      'subvol=@',
    ]);
  });
});
