/**
 * Proves the fixture helpers in test/helpers/images.ts: real partitioned images with populated
 * ext4 / xfs / vfat filesystems, read back through loop mounts and mtools, and guest-like writes
 * through qemu-nbd that persistent dirty bitmaps record. Needs root (loop devices, mount).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { run, stopChild } from '../../src/util/proc';
import { gptTypeName, type PartitionTable } from '../../src/util/partitions';
import {
  fileTreeChecksums,
  makeDisk,
  modifyDisk,
  partitionTableOf,
  randomBuffer,
  sha256,
  textFile,
  toRaw,
  withMountedRange,
  withTempDir,
  type FileSpec,
} from '../helpers/images';

const MiB = 1024 * 1024;
const isRoot = process.getuid?.() === 0;
const skip = isRoot ? false : 'needs root (loop devices and mount)';

function expected(files: readonly FileSpec[]): Map<string, string> {
  return new Map(files.map((f) => [f.path, sha256(f.content)]));
}

function sorted(m: Map<string, string>): [string, string][] {
  return [...m.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

function part(t: PartitionTable, index: number): { start: number; size: number } {
  const p = t.partitions.find((x) => x.index === index);
  assert.ok(p, `partition ${index} missing from ${JSON.stringify(t)}`);
  return p;
}

async function timed<T>(label: string, fn: () => Promise<T>): Promise<T> {
  const t0 = Date.now();
  try {
    return await fn();
  } finally {
    console.log(`${label}: ${Date.now() - t0} ms`);
  }
}

/** Checksums of the files of the vfat filesystem at `offset` in a raw disk, read with mtools. */
async function vfatChecksums(raw: string, offset: number, tmp: string): Promise<Map<string, string>> {
  const out = path.join(tmp, `vfat-${offset}`);
  await fsp.mkdir(out);
  await run('mcopy', ['-s', '-n', '-i', `${raw}@@${offset}`, '::/*', out + '/'], {
    env: { ...process.env, MTOOLS_SKIP_CHECK: '1' },
  });
  const sums = await fileTreeChecksums(out);
  await fsp.rm(out, { recursive: true, force: true });
  return sums;
}

interface DirtyRange {
  offset: number;
  length: number;
}

/** Dirty ranges of persistent bitmap `bitmap` in a qcow2, via qemu-nbd -B and nbdinfo --map. */
async function dirtyRanges(image: string, bitmap: string, tmp: string): Promise<DirtyRange[]> {
  const sock = path.join(tmp, 'map.sock');
  const child = spawn(
    'qemu-nbd',
    ['-r', '-f', 'qcow2', '-B', bitmap, '--socket', sock, '--persistent', image],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  const err: Buffer[] = [];
  child.stderr?.on('data', (d: Buffer) => err.push(d));
  try {
    for (let i = 0; ; i++) {
      const st = await fsp.stat(sock).catch(() => undefined);
      if (st) break;
      if (child.exitCode !== null || i > 300)
        throw new Error(`qemu-nbd -B: ${Buffer.concat(err).toString()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const { stdout } = await run('nbdinfo', [
      `--map=qemu:dirty-bitmap:${bitmap}`,
      `nbd+unix:///?socket=${sock}`,
    ]);
    const ranges: DirtyRange[] = [];
    for (const line of stdout.split('\n')) {
      const m = /^\s*(\d+)\s+(\d+)\s+(\d+)/.exec(line);
      if (m && Number(m[3]) & 1) ranges.push({ offset: Number(m[1]), length: Number(m[2]) });
    }
    return ranges;
  } finally {
    await stopChild(child);
  }
}

function overlaps(ranges: DirtyRange[], start: number, size: number): DirtyRange[] {
  return ranges.filter((r) => r.offset < start + size && r.offset + r.length > start);
}

/** Loop devices, mounts and processes that still reference `dir`. */
async function leaksUnder(dir: string): Promise<string[]> {
  const leaks: string[] = [];
  const loops = (await run('losetup', ['-a'])).stdout.split('\n').filter((l) => l.includes(dir));
  leaks.push(...loops.map((l) => `loop: ${l}`));
  const mounts = (await fsp.readFile('/proc/self/mounts', 'utf8')).split('\n').filter((l) => l.includes(dir));
  leaks.push(...mounts.map((l) => `mount: ${l}`));
  const procs = (await run('pgrep', ['-a', '-f', dir], { allowFail: true })).stdout
    .split('\n')
    .filter((l) => l.trim() !== '');
  leaks.push(...procs.map((l) => `process: ${l}`));
  return leaks;
}

const ext4Files: FileSpec[] = [
  { path: 'hello.txt', content: textFile(1, 20_000) },
  { path: 'etc/fstab', content: Buffer.from('UUID=x / ext4 defaults 0 1\n') },
  { path: 'dir/sub/random.bin', content: randomBuffer(2, 3 * MiB + 123) },
  { path: 'empty', content: Buffer.alloc(0) },
];
const xfsFiles: FileSpec[] = [
  { path: 'a/b/c.txt', content: textFile(3, 50_000) },
  { path: 'big.bin', content: randomBuffer(4, 5 * MiB) },
];
const vfatFiles: FileSpec[] = [
  { path: 'EFI/BOOT/BOOTX64.EFI', content: randomBuffer(5, 100_000) },
  { path: 'readme.txt', content: textFile(6, 3000) },
];

test(
  'GPT qcow2 with ext4, xfs and vfat: layout, contents, and bitmap-tracked modification',
  { skip },
  async () => {
    await withTempDir(async (dir) => {
      const img = path.join(dir, 'disk.qcow2');
      await timed('makeDisk qcow2 gpt ext4+xfs+vfat (160 MiB)', () =>
        makeDisk(img, {
          format: 'qcow2',
          sizeMiB: 160,
          table: 'gpt',
          seed: 42,
          partitions: [
            { fs: 'ext4', sizeMiB: 40, label: 'root', files: ext4Files },
            { fs: 'xfs', sizeMiB: 64, label: 'data', files: xfsFiles },
            { fs: 'vfat', sizeMiB: 34, label: 'ESP', files: vfatFiles },
          ],
        }),
      );
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout) as {
        format: string;
        'virtual-size': number;
        'actual-size': number;
      };
      assert.equal(info.format, 'qcow2');
      assert.equal(info['virtual-size'], 160 * MiB);
      assert.ok(info['actual-size'] < 40 * MiB, `qcow2 not sparse: ${info['actual-size']}`);

      const raw = path.join(dir, 'disk.raw');
      await timed('toRaw', () => toRaw(img, raw));
      const t = await partitionTableOf(raw);
      const sf = JSON.parse((await run('sfdisk', ['--json', raw])).stdout) as {
        partitiontable: {
          id: string;
          partitions: { node: string; start: number; size: number; name?: string }[];
        };
      };
      assert.equal(t.scheme, 'gpt');
      assert.equal(t.diskGuid, sf.partitiontable.id);
      assert.deepEqual(
        t.partitions.map((p) => [p.index, p.start, p.size, p.name]),
        sf.partitiontable.partitions.map((p) => [
          Number(/(\d+)$/.exec(p.node)?.[1]),
          p.start * 512,
          p.size * 512,
          p.name,
        ]),
      );
      assert.deepEqual(
        t.partitions.map((p) => [
          p.index,
          p.start / MiB,
          p.size / MiB,
          p.name,
          gptTypeName(p.typeGuid ?? ''),
        ]),
        [
          [1, 1, 40, 'root', 'Linux filesystem'],
          [2, 41, 64, 'data', 'Linux filesystem'],
          [3, 105, 34, 'ESP', 'Microsoft basic data'],
        ],
      );

      const p1 = part(t, 1);
      const p2 = part(t, 2);
      const p3 = part(t, 3);
      const blk = await run('blkid', ['-p', '-o', 'export', '--offset', String(p2.start), raw], {
        allowFail: true,
      });
      assert.match(blk.stdout, /TYPE=xfs/);
      assert.match(blk.stdout, /LABEL=data/);

      await timed('mount + checksum ext4 and xfs', async () => {
        const ext4 = await withMountedRange(raw, p1.start, p1.size, (m) => fileTreeChecksums(m));
        assert.deepEqual(sorted(ext4), sorted(expected(ext4Files)));
        const xfs = await withMountedRange(raw, p2.start, p2.size, (m) => fileTreeChecksums(m));
        assert.deepEqual(sorted(xfs), sorted(expected(xfsFiles)));
      });
      const vfat = await vfatChecksums(raw, p3.start, dir);
      assert.deepEqual(sorted(vfat), sorted(expected(vfatFiles)));

      // Guest-like writes through QEMU must be recorded in an enabled persistent bitmap.
      await run('qemu-img', ['bitmap', '--add', '--enable', img, 'b1']);
      const newHello = textFile(99, 30_000);
      const added = randomBuffer(7, MiB);
      await timed('modifyDisk qcow2 (qemu-nbd + nbdfuse + loop)', () =>
        modifyDisk(img, 'qcow2', 1, async (m) => {
          await fsp.writeFile(path.join(m, 'hello.txt'), newHello);
          await fsp.mkdir(path.join(m, 'new'));
          await fsp.writeFile(path.join(m, 'new/added.bin'), added);
          await fsp.rm(path.join(m, 'empty'));
        }),
      );
      const bm = (await run('qemu-img', ['info', '--output=json', img])).stdout;
      assert.doesNotMatch(bm, /in-use/, 'bitmap left in-use: qemu-nbd was not stopped cleanly');
      const dirty = await dirtyRanges(img, 'b1', dir);
      console.log(`dirty ranges: ${JSON.stringify(dirty)}`);
      assert.ok(overlaps(dirty, p1.start, p1.size).length > 0, 'no dirty range inside partition 1');
      assert.deepEqual(overlaps(dirty, p2.start, p2.size), [], 'xfs partition should be clean');
      assert.deepEqual(overlaps(dirty, p3.start, p3.size), [], 'vfat partition should be clean');
      const dirtyBytes = dirty.reduce((s, r) => s + r.length, 0);
      assert.ok(dirtyBytes >= MiB && dirtyBytes < 20 * MiB, `dirty bytes ${dirtyBytes}`);

      await toRaw(img, raw);
      const after = await withMountedRange(raw, p1.start, p1.size, (m) => fileTreeChecksums(m));
      const want = expected(ext4Files);
      want.set('hello.txt', sha256(newHello));
      want.set('new/added.bin', sha256(added));
      want.delete('empty');
      assert.deepEqual(sorted(after), sorted(want));
      const xfsAfter = await withMountedRange(raw, p2.start, p2.size, (m) => fileTreeChecksums(m));
      assert.deepEqual(sorted(xfsAfter), sorted(expected(xfsFiles)));

      // vfat cannot be mounted here: a clear error, and everything set up so far is released.
      await assert.rejects(
        modifyDisk(img, 'qcow2', 3, () => Promise.resolve()),
        /vfat, which this kernel cannot mount/,
      );

      assert.deepEqual(await leaksUnder(dir), []);
    });
  },
);

test('MBR raw disk with logical partitions; xfs names with spaces; modifyDisk on raw', { skip }, async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'disk.raw');
    const spaced: FileSpec[] = [
      { path: 'with space/file name.txt', content: textFile(10, 5000) },
      { path: 'plain.bin', content: randomBuffer(11, 200_000) },
    ];
    const logical: FileSpec[] = [{ path: 'logical.txt', content: Buffer.from('in a logical partition\n') }];
    await timed('makeDisk raw mbr 5 partitions (200 MiB)', () =>
      makeDisk(img, {
        format: 'raw',
        sizeMiB: 200,
        table: 'mbr',
        partitions: [
          { fs: 'ext4', sizeMiB: 24, label: 'boot', files: ext4Files.slice(0, 2) },
          { fs: 'none', sizeMiB: 8 },
          { fs: 'vfat', sizeMiB: 16, label: 'FAT', files: vfatFiles.slice(1) },
          { fs: 'xfs', sizeMiB: 64, label: 'spaces', files: spaced },
          { fs: 'ext4', sizeMiB: 16, files: logical },
        ],
      }),
    );
    const st = await fsp.stat(img);
    assert.equal(st.size, 200 * MiB);
    assert.ok(st.blocks * 512 < 60 * MiB, `raw image not sparse: ${st.blocks * 512}`);
    const t = await partitionTableOf(img);
    assert.equal(t.scheme, 'mbr');
    assert.deepEqual(
      t.partitions.map((p) => [p.index, p.start / MiB, p.size / MiB, p.mbrType]),
      [
        [1, 1, 24, 0x83],
        [2, 25, 8, 0x83],
        [3, 33, 16, 0x0c],
        [4, 49, 82, 0x05],
        [5, 50, 64, 0x83],
        [6, 115, 16, 0x83],
      ],
    );
    const xfs = await withMountedRange(img, part(t, 5).start, part(t, 5).size, (m) => fileTreeChecksums(m));
    assert.deepEqual(sorted(xfs), sorted(expected(spaced)));
    const lg = await withMountedRange(img, part(t, 6).start, part(t, 6).size, (m) => fileTreeChecksums(m));
    assert.deepEqual(sorted(lg), sorted(expected(logical)));
    assert.deepEqual(
      sorted(await vfatChecksums(img, part(t, 3).start, dir)),
      sorted(expected(vfatFiles.slice(1))),
    );

    await timed('modifyDisk raw (loop)', () =>
      modifyDisk(img, 'raw', 6, async (m) => {
        await fsp.appendFile(path.join(m, 'logical.txt'), 'more\n');
      }),
    );
    const lg2 = await withMountedRange(img, part(t, 6).start, part(t, 6).size, (m) => fileTreeChecksums(m));
    assert.equal(lg2.get('logical.txt'), sha256(Buffer.from('in a logical partition\nmore\n')));

    // xfs through modifyDisk too (partition 5 is logical).
    await modifyDisk(img, 'raw', 5, (m) => fsp.writeFile(path.join(m, 'plain.bin'), 'x'));
    const xfs2 = await withMountedRange(img, part(t, 5).start, part(t, 5).size, (m) => fileTreeChecksums(m));
    assert.equal(xfs2.get('plain.bin'), sha256(Buffer.from('x')));

    assert.deepEqual(await leaksUnder(dir), []);
  });
});

test(
  'modifyDisk cleans up when the callback throws (qcow2 and raw) and refuses bad input',
  { skip },
  async () => {
    await withTempDir(async (dir) => {
      const img = path.join(dir, 'one.qcow2');
      await makeDisk(img, {
        format: 'qcow2',
        sizeMiB: 64,
        table: 'none',
        partitions: [{ fs: 'ext4', sizeMiB: 64, files: [{ path: 'f', content: Buffer.from('1') }] }],
      });
      assert.equal((await partitionTableOf(img)).scheme, 'none'); // qcow2 header is not a table
      let seenMount = '';
      await assert.rejects(
        modifyDisk(img, 'qcow2', 1, async (m) => {
          seenMount = m;
          await fsp.writeFile(path.join(m, 'f'), '2');
          throw new Error('boom from callback');
        }),
        /boom from callback/,
      );
      assert.notEqual(seenMount, '');
      assert.deepEqual(await leaksUnder(dir), []);
      assert.deepEqual(await leaksUnder(path.dirname(seenMount)), []);
      // The write before the throw still landed (the filesystem was unmounted cleanly).
      const raw = path.join(dir, 'one.raw');
      await toRaw(img, raw);
      const sums = await withMountedRange(raw, 0, 64 * MiB, (m) => fileTreeChecksums(m));
      assert.equal(sums.get('f'), sha256(Buffer.from('2')));

      await assert.rejects(
        modifyDisk(raw, 'raw', 0, () => Promise.reject(new Error('raw boom'))),
        /raw boom/,
      );
      await assert.rejects(
        modifyDisk(raw, 'qcow2', 1, () => Promise.resolve()),
        /is raw, not qcow2/,
      );
      await assert.rejects(
        modifyDisk(img, 'qcow2', 3, () => Promise.resolve()),
        /no partition 3/,
      );
      assert.deepEqual(await leaksUnder(dir), []);
    });
  },
);

test('a seed makes disk and partition identifiers deterministic', async () => {
  await withTempDir(async (dir) => {
    const ids = async (seed: number, name: string): Promise<(string | undefined)[]> => {
      const f = path.join(dir, name);
      await makeDisk(f, {
        format: 'raw',
        sizeMiB: 8,
        table: 'gpt',
        seed,
        partitions: [
          { fs: 'none', sizeMiB: 2, label: 'p1' },
          { fs: 'none', sizeMiB: 2 },
        ],
      });
      const t = await partitionTableOf(f);
      return [t.diskGuid, ...t.partitions.map((p) => p.uuid)];
    };
    const a = await ids(7, 'a.raw');
    assert.deepEqual(await ids(7, 'b.raw'), a);
    assert.notDeepEqual(await ids(8, 'c.raw'), a);
    assert.equal(new Set(a).size, 3);
  });
});

test('deterministic data helpers', () => {
  const a = randomBuffer(1, 1000);
  assert.equal(a.length, 1000);
  assert.deepEqual(randomBuffer(1, 1000), a);
  assert.deepEqual(randomBuffer(1, 333), a.subarray(0, 333));
  assert.notDeepEqual(randomBuffer(2, 1000), a);
  const t0 = Date.now();
  const big = randomBuffer(3, 64 * MiB);
  console.log(`randomBuffer 64 MiB: ${Date.now() - t0} ms`);
  assert.equal(big.length, 64 * MiB);
  const txt = textFile(1, 10_000);
  assert.ok(txt.length >= 10_000 && txt.length < 10_200);
  assert.deepEqual(textFile(1, 10_000), txt);
  assert.match(txt.toString('utf8'), /^1: [a-z ]+\.\n2: /);
});
