/**
 * The GPT/MBR parser against tables written by sgdisk, sfdisk and parted, compared with
 * `sfdisk --json`, plus hand-made damage (corrupt primary GPT, EBR loops) and disks without a
 * table. Needs sgdisk (gdisk), sfdisk (fdisk), parted, mkfs.ext4, mkfs.vfat; no root.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { run } from '../../src/util/proc';
import { crc32 } from '../../src/util/crc32';
import {
  gptTypeName,
  isExtendedMbrType,
  mbrTypeName,
  readPartitionTable,
  type PartitionTable,
  type ReadAt,
} from '../../src/util/partitions';
import { partitionTableOf, withTempDir } from '../helpers/images';

const MiB = 1024 * 1024;

interface SfdiskPart {
  node: string;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  bootable?: boolean;
}
interface SfdiskTable {
  label: 'gpt' | 'dos';
  id: string;
  sectorsize: number;
  partitions: SfdiskPart[];
}

async function sfdiskJson(img: string): Promise<SfdiskTable> {
  const { stdout } = await run('sfdisk', ['--json', img]);
  return (JSON.parse(stdout) as { partitiontable: SfdiskTable }).partitiontable;
}

async function blankImage(file: string, sizeMiB: number): Promise<void> {
  await fsp.writeFile(file, '');
  await fsp.truncate(file, sizeMiB * MiB);
}

/** Check our parse against sfdisk's view of the same image. */
function assertMatchesSfdisk(t: PartitionTable, s: SfdiskTable): void {
  assert.equal(t.scheme, s.label === 'dos' ? 'mbr' : 'gpt');
  assert.equal(t.sectorSize, s.sectorsize);
  if (s.label === 'gpt') assert.equal(t.diskGuid, s.id);
  else assert.equal(t.diskId, s.id);
  assert.equal(t.partitions.length, s.partitions.length, 'partition count');
  for (const sp of s.partitions) {
    const index = Number(/(\d+)$/.exec(sp.node)?.[1]);
    const p = t.partitions.find((x) => x.index === index);
    assert.ok(p, `partition ${index} (${sp.node}) missing`);
    assert.equal(p.start, sp.start * 512, `start of ${index}`);
    assert.equal(p.size, sp.size * 512, `size of ${index}`);
    if (s.label === 'gpt') {
      assert.equal(p.typeGuid, sp.type, `type of ${index}`);
      assert.equal(p.uuid, sp.uuid, `uuid of ${index}`);
      assert.equal(p.name, sp.name, `name of ${index}`);
    } else {
      assert.equal(p.mbrType, parseInt(sp.type, 16), `type of ${index}`);
      assert.equal(p.bootable === true, sp.bootable === true, `bootable flag of ${index}`);
      assert.equal(p.extended === true, isExtendedMbrType(parseInt(sp.type, 16)));
    }
  }
}

/** A ReadAt over an in-memory disk. */
function memReadAt(disk: Buffer): ReadAt {
  return (offset, length) => Promise.resolve(disk.subarray(offset, offset + length));
}

async function writeGpt(img: string): Promise<void> {
  await blankImage(img, 64);
  await run('sgdisk', [
    '--clear',
    '--disk-guid=8F1D3A7E-51C2-4B9D-A1E4-3C2B1A0F9E8D',
    '--new=1:2048:+8M',
    '--typecode=1:EF00',
    '--change-name=1:EFI system',
    '--new=2:0:+1M',
    '--typecode=2:EF02',
    '--change-name=2:bios',
    '--new=3:0:+16M',
    '--typecode=3:8300',
    '--change-name=3:root fs',
    '--partition-guid=3:11111111-2222-4333-8444-555555555555',
    // slot 4 stays empty: numbering must keep the gap
    '--new=5:0:+4M',
    '--typecode=5:8200',
    '--change-name=5:swäp ünïcode ✓',
    '--new=6:0:+8M',
    '--typecode=6:8E00',
    '--new=7:0:0', // rest of the disk
    '--typecode=7:0700',
    '--change-name=7:data',
    img,
  ]);
}

/** sgdisk takes about a second per call, so the GPT image is made once and copied. */
let gptTemplate: Promise<string> | undefined;
let templateDir: string | undefined;
after(async () => {
  if (templateDir !== undefined) await fsp.rm(templateDir, { recursive: true, force: true });
});
async function makeGpt(img: string): Promise<void> {
  gptTemplate ??= (async () => {
    templateDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bkfs-gpt-'));
    const file = path.join(templateDir, 'gpt.img');
    await writeGpt(file);
    return file;
  })();
  await fsp.copyFile(await gptTemplate, img);
}

test('crc32 matches the standard check values', () => {
  assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  assert.equal(crc32(Buffer.alloc(0)), 0);
  assert.equal(crc32(Buffer.from('The quick brown fox jumps over the lazy dog')), 0x414fa339);
  const a = Buffer.from('hello ');
  const b = Buffer.from('world');
  assert.equal(crc32(b, crc32(a)), crc32(Buffer.concat([a, b])));
});

test('GPT written by sgdisk matches sfdisk --json', async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'gpt.img');
    await makeGpt(img);
    const t = await partitionTableOf(img);
    assertMatchesSfdisk(t, await sfdiskJson(img));
    assert.equal(t.warnings, undefined);
    assert.deepEqual(
      t.partitions.map((p) => p.index),
      [1, 2, 3, 5, 6, 7],
    );
    assert.equal(t.diskGuid, '8F1D3A7E-51C2-4B9D-A1E4-3C2B1A0F9E8D');
    const byIndex = (i: number) => t.partitions.find((p) => p.index === i);
    assert.equal(byIndex(3)?.uuid, '11111111-2222-4333-8444-555555555555');
    assert.equal(byIndex(5)?.name, 'swäp ünïcode ✓');
    assert.equal(byIndex(6)?.name, undefined);
    assert.equal(byIndex(1)?.start, MiB);
    assert.equal(byIndex(1)?.size, 8 * MiB);
    const names = t.partitions.map((p) => gptTypeName(p.typeGuid ?? ''));
    assert.deepEqual(names, [
      'EFI System',
      'BIOS boot',
      'Linux filesystem',
      'Linux swap',
      'Linux LVM',
      'Microsoft basic data',
    ]);
    assert.ok(t.partitions.every((p) => p.scheme === 'gpt'));
  });
});

test('GPT: a corrupt primary header falls back to the backup header', async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'gpt.img');
    await makeGpt(img);
    const good = await partitionTableOf(img);
    const fh = await fsp.open(img, 'r+');
    try {
      // Flip a byte of the disk GUID inside the primary header (LBA 1): header CRC32 breaks.
      const b = Buffer.alloc(1);
      await fh.read(b, 0, 1, 512 + 60);
      b[0] = (b[0] as number) ^ 0xff;
      await fh.write(b, 0, 1, 512 + 60);
    } finally {
      await fh.close();
    }
    const t = await partitionTableOf(img);
    assert.equal(t.scheme, 'gpt');
    assert.deepEqual(t.partitions, good.partitions);
    assert.equal(t.diskGuid, good.diskGuid);
    assert.ok(t.warnings?.[0]?.includes('header CRC32 mismatch'), String(t.warnings));
    assert.ok(t.warnings?.[0]?.includes('backup'), String(t.warnings));
  });
});

test('GPT: a corrupt primary entry array falls back; both copies broken gives none', async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'gpt.img');
    await makeGpt(img);
    const good = await partitionTableOf(img);
    const disk = await fsp.readFile(img);
    const size = disk.length;
    disk[1024 + 40] = (disk[1024 + 40] as number) ^ 0x01; // entry 1's first LBA, primary array
    let t = await readPartitionTable(memReadAt(disk), size);
    assert.equal(t.scheme, 'gpt');
    assert.deepEqual(t.partitions, good.partitions);
    assert.match(t.warnings?.[0] ?? '', /entry array CRC32 mismatch/);

    disk.fill(0, size - 512); // wipe the backup header too
    t = await readPartitionTable(memReadAt(disk), size);
    assert.equal(t.scheme, 'none');
    assert.deepEqual(t.partitions, []);
    assert.match(t.warnings?.[0] ?? '', /protective MBR present but no usable GPT/);
  });
});

test('GPT without its protective MBR is still found (with a warning)', async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'gpt.img');
    await makeGpt(img);
    const good = await partitionTableOf(img);
    const disk = await fsp.readFile(img);
    disk.fill(0, 0, 512);
    const t = await readPartitionTable(memReadAt(disk), disk.length);
    assert.equal(t.scheme, 'gpt');
    assert.deepEqual(t.partitions, good.partitions);
    assert.match(t.warnings?.[0] ?? '', /without a protective MBR/);
  });
});

test('MBR with extended and logical partitions (sfdisk) matches sfdisk --json', async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'mbr.img');
    await blankImage(img, 64);
    // Named lines let slot 3 stay empty while slot 4 holds the extended partition.
    const script = [
      'label: dos',
      'label-id: 0x5eed1234',
      'unit: sectors',
      '',
      `${img}1 : start=2048, size=16384, type=83, bootable`,
      `${img}2 : start=18432, size=8192, type=c`,
      `${img}4 : start=30720, size=100352, type=5`,
      `${img}5 : start=32768, size=20480, type=83`,
      `${img}6 : start=55296, size=8192, type=82`,
      `${img}7 : start=65536, size=2048, type=8e`,
      `${img}8 : start=69632, size=61440, type=7`,
    ];
    await run('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', img], {
      input: script.join('\n') + '\n',
    });
    const s = await sfdiskJson(img);
    const t = await partitionTableOf(img);
    assertMatchesSfdisk(t, s);
    assert.equal(t.warnings, undefined);
    assert.deepEqual(
      t.partitions.map((p) => [p.index, p.mbrType]),
      [
        [1, 0x83],
        [2, 0x0c],
        [4, 0x05],
        [5, 0x83],
        [6, 0x82],
        [7, 0x8e],
        [8, 0x07],
      ],
    );
    assert.equal(t.diskId, '0x5eed1234');
    assert.equal(t.partitions[0]?.uuid, '5eed1234-01');
    assert.equal(t.partitions.find((p) => p.index === 7)?.uuid, '5eed1234-07');
    assert.equal(t.partitions.find((p) => p.index === 8)?.start, 69632 * 512);
    assert.equal(mbrTypeName(0x83), 'Linux');
    assert.equal(mbrTypeName(0x05), 'Extended');
  });
});

test('MBR written by parted (LBA extended type 0x0f) matches sfdisk --json', async () => {
  await withTempDir(async (dir) => {
    const img = path.join(dir, 'parted.img');
    await blankImage(img, 64);
    await run('parted', [
      '-s',
      img,
      'mklabel',
      'msdos',
      'mkpart',
      'primary',
      'ext4',
      '1MiB',
      '9MiB',
      'mkpart',
      'extended',
      '9MiB',
      '60MiB',
      'mkpart',
      'logical',
      'ext4',
      '10MiB',
      '20MiB',
      'mkpart',
      'logical',
      'linux-swap',
      '21MiB',
      '30MiB',
      'mkpart',
      'logical',
      'fat32',
      '31MiB',
      '60MiB',
      'set',
      '1',
      'boot',
      'on',
    ]);
    const s = await sfdiskJson(img);
    const t = await partitionTableOf(img);
    assertMatchesSfdisk(t, s);
    assert.deepEqual(
      t.partitions.map((p) => p.index),
      [1, 2, 5, 6, 7],
    );
    assert.equal(t.partitions.find((p) => p.index === 2)?.extended, true);
    assert.equal(t.partitions.find((p) => p.index === 5)?.start, 10 * MiB);
  });
});

test('hand-made MBR: EBR loop and missing EBR signature stop the chain with a warning', async () => {
  const disk = Buffer.alloc(8 * MiB);
  const entry = (sector: number, slot: number, type: number, start: number, count: number): void => {
    const o = sector * 512 + 446 + slot * 16;
    disk[o + 4] = type;
    disk.writeUInt32LE(start, o + 8);
    disk.writeUInt32LE(count, o + 12);
  };
  const sig = (sector: number): void => {
    disk[sector * 512 + 510] = 0x55;
    disk[sector * 512 + 511] = 0xaa;
  };
  sig(0);
  entry(0, 0, 0x83, 2048, 2048);
  entry(0, 1, 0x0f, 4096, 8192);
  // EBR 1 at 4096: logical at +2048, next EBR at extended+4096 = 8192
  sig(4096);
  entry(4096, 0, 0x83, 2048, 1024);
  entry(4096, 1, 0x05, 4096, 4096);
  // EBR 2 at 8192: logical at +100, next EBR points back to EBR 1
  sig(8192);
  entry(8192, 0, 0x07, 100, 500);
  entry(8192, 1, 0x05, 0, 4096);
  let t = await readPartitionTable(memReadAt(disk), disk.length);
  assert.equal(t.scheme, 'mbr');
  assert.deepEqual(
    t.partitions.map((p) => [p.index, p.start / 512, p.size / 512, p.mbrType]),
    [
      [1, 2048, 2048, 0x83],
      [2, 4096, 8192, 0x0f],
      [5, 6144, 1024, 0x83],
      [6, 8292, 500, 0x07],
    ],
  );
  assert.equal(t.diskId, '0x00000000');
  assert.equal(t.partitions[0]?.uuid, undefined);
  assert.match(t.warnings?.join(';') ?? '', /loops back/);

  disk[8192 * 512 + 510] = 0; // second EBR without signature
  t = await readPartitionTable(memReadAt(disk), disk.length);
  assert.deepEqual(
    t.partitions.map((p) => p.index),
    [1, 2, 5],
  );
  assert.match(t.warnings?.join(';') ?? '', /no 0x55AA signature/);
});

test('disks without a partition table are scheme none', async () => {
  await withTempDir(async (dir) => {
    const zero = path.join(dir, 'zero.img');
    await blankImage(zero, 8);
    assert.deepEqual(await partitionTableOf(zero), { scheme: 'none', sectorSize: 512, partitions: [] });

    const ext4 = path.join(dir, 'ext4.img');
    await blankImage(ext4, 16);
    await run('mkfs.ext4', ['-q', '-F', ext4]);
    assert.equal((await partitionTableOf(ext4)).scheme, 'none');

    // A FAT filesystem on the whole disk has 0x55AA at byte 510 but is not a partition table.
    const fat = path.join(dir, 'fat.img');
    await blankImage(fat, 16);
    await run('mkfs.vfat', ['--mbr=n', fat]);
    assert.equal((await partitionTableOf(fat)).scheme, 'none');

    // Tiny and empty disks.
    assert.equal((await readPartitionTable(memReadAt(Buffer.alloc(0)), 0)).scheme, 'none');
    assert.equal((await readPartitionTable(memReadAt(Buffer.alloc(512)), 512)).scheme, 'none');
  });
});

test('gptTypeName agrees with sfdisk on the GUIDs it knows', async () => {
  const { stdout } = await run('sfdisk', ['--label', 'gpt', '--list-types']);
  const sf = new Map<string, string>();
  for (const line of stdout.split('\n')) {
    const m = /^\s*([0-9A-F-]{36})\s+(.*)$/.exec(line);
    if (m) sf.set(m[1] as string, (m[2] as string).trim());
  }
  const known = [
    'C12A7328-F81F-11D2-BA4B-00A0C93EC93B',
    '21686148-6449-6E6F-744E-656564454649',
    'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7',
    '0FC63DAF-8483-4772-8E79-3D69D8477DE4',
    '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F',
    'E6D6D379-F507-44C2-A23C-238F2A3DF928',
    '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709',
    '8484680C-9521-48C6-9C11-B0720656F69E',
    '7C3457EF-0000-11AA-AA11-00306543ECAC',
    '516E7CBA-6ECF-11D6-8FF8-00022D09712B',
  ];
  for (const g of known) {
    assert.ok(sf.has(g), `sfdisk does not know ${g}`);
    assert.equal(gptTypeName(g), sf.get(g));
  }
  assert.equal(gptTypeName('0fc63daf-8483-4772-8e79-3d69d8477de4'), 'Linux filesystem');
  assert.equal(gptTypeName('00000000-0000-0000-0000-000000000001'), undefined);
});
