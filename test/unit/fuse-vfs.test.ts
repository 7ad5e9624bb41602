/**
 * The mount's virtual filesystem without mounting: a real repository made by real backups
 * (qemu-img / qemu-io / qemu-nbd) of a small qcow2, read through `CheckpointVfs` and compared byte
 * for byte with `qemu-img convert -O raw` of the image at each checkpoint.
 */
import { CODEC_FRAMES, parseFrameTable } from '../../src/store/codec';
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { qemuIo } from '../helpers/cli';
import { lcg } from '../helpers/compare';
import { randomBuffer, toRaw } from '../helpers/images';
import { run } from '../../src/util/proc';
import { Repository } from '../../src/repo/repository';
import { runBackup } from '../../src/backup/engine';
import { ImageSource } from '../../src/backup/sources';
import { CheckpointReader } from '../../src/chain/reader';
import { packPath } from '../../src/store/packs';
import { CheckpointVfs, FsError, S_IFDIR, S_IFLNK, S_IFREG, type DamageReport } from '../../src/fuse/vfs';

const MiB = 1 << 20;
const KiB = 1024;
/** Not a multiple of the chunk size, so the last chunk is short. */
const DISK_SIZE = 41 * MiB + 123 * KiB;
const DOMAIN_XML = '<domain><name>web</name></domain>\n';
const { O_RDONLY, O_WRONLY, O_RDWR, O_TRUNC, O_APPEND } = fs.constants;

let work: string;
let img: string;
let repoDir: string;
const refs: string[] = [];

async function backup(level: 'full' | 'inc', configs: { name: string; data: Buffer }[] = []): Promise<void> {
  const repo = Repository.open(repoDir);
  try {
    await runBackup(repo, {
      vm: 'web',
      disks: [{ name: 'vda', source: new ImageSource(img) }],
      level,
      configs,
    });
  } finally {
    repo.close();
  }
  const raw = path.join(work, `ref${refs.length + 1}.raw`);
  await toRaw(img, raw);
  refs.push(raw);
}

function expectFsError(fn: () => unknown, code: string): void {
  assert.throws(fn, (e: unknown) => e instanceof FsError && e.code === code, `expected ${code}`);
}

async function readAll(vfs: CheckpointVfs, fh: number, size: number, req = 128 * KiB): Promise<Buffer> {
  const out = Buffer.alloc(size);
  for (let off = 0; off < size; off += req) {
    const n = await vfs.read(fh, off, out.subarray(off, Math.min(size, off + req)));
    assert.equal(n, Math.min(req, size - off));
  }
  return out;
}

function pinFiles(dir: string): { checkpoints: number[] }[] {
  const pins = path.join(dir, 'pins');
  if (!fs.existsSync(pins)) return [];
  return fs
    .readdirSync(pins)
    .filter((n) => n.startsWith(`${process.pid}-`) && n.endsWith('.json'))
    .map((n) => JSON.parse(fs.readFileSync(path.join(pins, n), 'utf8')) as { checkpoints: number[] });
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-fuse-vfs-'));
  img = path.join(work, 'disk.qcow2');
  repoDir = path.join(work, 'repo');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(DISK_SIZE)]);
  const r1 = path.join(work, 'r1.bin');
  fs.writeFileSync(r1, randomBuffer(101, 3 * MiB));
  const r2 = path.join(work, 'r2.bin');
  fs.writeFileSync(r2, randomBuffer(102, 512 * KiB));
  await qemuIo(
    img,
    'qcow2',
    `write -s ${r1} 1000448 ${3 * MiB}`, // unaligned to chunks, crosses several
    `write -P 0x55 ${16 * MiB - 512} ${MiB}`, // crosses the 16 MiB page boundary
    `write -s ${r2} ${DISK_SIZE - 512 * KiB} ${512 * KiB}`, // up to the (short) last chunk
  );
  Repository.init(repoDir).close();
  await backup('full', [
    { name: 'domain.xml', data: Buffer.from(DOMAIN_XML) },
    { name: 'etc/vm.conf', data: Buffer.from('cpus=2\n') },
    { name: 'vda.raw', data: Buffer.from('clashes with the disk file') },
  ]);
  await qemuIo(
    img,
    'qcow2',
    'write -z 1200128 65536',
    `write -P 0x66 ${30 * MiB} ${700 * KiB}`,
    'discard 2M 256k',
  );
  await backup('inc');
});

after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

describe('CheckpointVfs in checkpoint mode', () => {
  it('lists the disks and saved configs with sizes and read-only modes', async () => {
    const notices: string[] = [];
    const repo = Repository.open(repoDir);
    const vfs = CheckpointVfs.open(repo, { ref: 'web@check1', onNotice: (m) => notices.push(m) });
    try {
      assert.equal(vfs.mode, 'checkpoint');
      const names = vfs.readdir('/').map((e) => e.name);
      // Config names become one safe path component; one that would shadow a disk is hidden.
      assert.deepEqual(names, ['vda.raw', 'domain.xml', 'etc_vm.conf']);
      assert.ok(
        notices.some((n) => n.includes("'vda.raw'")),
        notices.join('\n'),
      );
      const root = vfs.getattr('/');
      assert.equal(root.mode, S_IFDIR | 0o500);
      const disk = vfs.getattr('/vda.raw');
      assert.equal(disk.kind, 'file');
      assert.equal(disk.mode, S_IFREG | 0o400);
      assert.equal(disk.size, DISK_SIZE);
      assert.equal(vfs.getattr('/domain.xml').size, Buffer.byteLength(DOMAIN_XML));
      const fh = vfs.open('/etc_vm.conf', O_RDONLY);
      const b = Buffer.alloc(100);
      const n = await vfs.read(fh, 0, b);
      assert.equal(b.subarray(0, n).toString(), 'cpus=2\n');
      assert.equal(await vfs.read(fh, 7, b), 0);
    } finally {
      vfs.close();
      repo.close();
    }
  });

  it('reads every byte of each checkpoint like qemu-img convert, sequentially and at random', async () => {
    const repo = Repository.open(repoDir);
    try {
      for (const [i, ref] of refs.entries()) {
        const vfs = CheckpointVfs.open(repo, { ref: `web@check${i + 1}`, cacheBytes: 8 * MiB });
        try {
          const expected = fs.readFileSync(ref);
          const fh = vfs.open('/vda.raw', O_RDONLY);
          assert.ok((await readAll(vfs, fh, DISK_SIZE)).equals(expected), `check${i + 1} sequential`);
          const rnd = lcg(1234 + i);
          for (let k = 0; k < 200; k++) {
            const off = Math.floor(rnd() * (DISK_SIZE + 8192));
            const len = 1 + Math.floor(rnd() * 700 * KiB);
            const buf = Buffer.alloc(len, 0xee);
            const n = await vfs.read(fh, off, buf);
            const want = Math.max(0, Math.min(len, DISK_SIZE - off));
            assert.equal(n, want, `read ${off}+${len} length`);
            assert.ok(buf.subarray(0, n).equals(expected.subarray(off, off + n)), `read ${off}+${len} bytes`);
          }
          assert.equal(await vfs.read(fh, DISK_SIZE, Buffer.alloc(10)), 0);
          vfs.release(fh);
        } finally {
          vfs.close();
        }
      }
    } finally {
      repo.close();
    }
  });

  it('read-ahead follows each open file: interleaved sequential readers both get it', async () => {
    const repo = Repository.open(repoDir);
    try {
      const ahead = async (streams: boolean): Promise<boolean> => {
        const reader = CheckpointReader.open(repo, 'web@check1', { cacheBytes: 64 * MiB });
        const disk = reader.disk('vda');
        const at2M = reader.page(disk, 0).find((e) => e.offset <= 2 * MiB && e.offset + e.length > 2 * MiB);
        assert.ok(at2M?.loc, 'data at 2 MiB');
        const a = {};
        const b = {};
        const buf = Buffer.alloc(128 * KiB);
        await reader.readInto('vda', MiB, buf, streams ? a : undefined);
        await reader.readInto('vda', 30 * MiB, buf, streams ? b : undefined);
        await reader.readInto('vda', MiB + 128 * KiB, buf, streams ? a : undefined); // sequential for a
        await new Promise((r) => setImmediate(r));
        const has = reader.loader.has(at2M.loc.id);
        reader.endStream(a);
        reader.endStream(b);
        return has;
      };
      assert.equal(await ahead(true), true, 'per-file streams: the next chunks are being loaded');
      assert.equal(await ahead(false), false, 'one stream per disk: the other reader broke the sequence');
    } finally {
      repo.close();
    }
  });

  it('refuses writes with EROFS and answers ENOENT, ENOTDIR, EISDIR and EBADF', async () => {
    const repo = Repository.open(repoDir);
    const vfs = CheckpointVfs.open(repo, { ref: 'web' });
    try {
      for (const flags of [O_WRONLY, O_RDWR, O_RDONLY | O_TRUNC, O_RDONLY | O_APPEND]) {
        expectFsError(() => vfs.open('/vda.raw', flags), 'EROFS');
      }
      expectFsError(() => vfs.getattr('/nope'), 'ENOENT');
      expectFsError(() => vfs.getattr('/vda'), 'ENOENT');
      expectFsError(() => vfs.getattr('/vda.raw/x'), 'ENOTDIR');
      expectFsError(() => vfs.readdir('/vda.raw'), 'ENOTDIR');
      expectFsError(() => vfs.open('/', O_RDONLY), 'EISDIR');
      expectFsError(() => vfs.readlink('/vda.raw'), 'EINVAL');
      const fh = vfs.open('/vda.raw', O_RDONLY);
      vfs.release(fh);
      await assert.rejects(
        vfs.read(fh, 0, Buffer.alloc(1)),
        (e: unknown) => e instanceof FsError && e.code === 'EBADF',
      );
      assert.equal(new FsError('EROFS', 'x').errno, os.constants.errno.EROFS);
    } finally {
      vfs.close();
      repo.close();
    }
  });

  it('pins its checkpoint from open until close; unknown checkpoints fail with NOT_FOUND', () => {
    const repo = Repository.open(repoDir);
    try {
      assert.throws(() => CheckpointVfs.open(repo, { ref: 'web@check9' }), /no checkpoint 'check9'/);
      assert.throws(() => CheckpointVfs.open(repo, { ref: 'db' }), /no VM named 'db'/);
      assert.deepEqual(pinFiles(repoDir), []);
      const vfs = CheckpointVfs.open(repo, { ref: 'web@check1' });
      const id = vfs.checkpoint!.checkpoint.id;
      assert.deepEqual(
        pinFiles(repoDir).map((p) => p.checkpoints),
        [[id]],
      );
      vfs.close();
      assert.deepEqual(pinFiles(repoDir), []);
    } finally {
      repo.close();
    }
  });
});

describe('CheckpointVfs in tree mode', () => {
  it('shows VMs, checkpoints and a latest link; pins lazily; new checkpoints appear; open files keep reading', async () => {
    const repo = Repository.open(repoDir);
    const vfs = CheckpointVfs.open(repo, { fileMode: 0o444 });
    try {
      assert.equal(vfs.mode, 'tree');
      assert.deepEqual(
        vfs.readdir('/').map((e) => e.name),
        ['web'],
      );
      assert.deepEqual(
        vfs.readdir('/web').map((e) => e.name),
        ['check1', 'check2', 'latest'],
      );
      const link = vfs.getattr('/web/latest');
      assert.equal(link.mode, S_IFLNK | 0o777);
      assert.equal(vfs.readlink('/web/latest'), 'check2');
      assert.equal(vfs.getattr('/web/check1').mode, S_IFDIR | 0o555);
      assert.equal(vfs.getattr('/web').kind, 'dir');
      expectFsError(() => vfs.getattr('/db'), 'ENOENT');
      expectFsError(() => vfs.getattr('/web/check7'), 'ENOENT');
      expectFsError(() => vfs.getattr('/web/check1/vdb.raw'), 'ENOENT');
      assert.deepEqual(vfs.pinnedIds, [], 'listing VMs and checkpoints pins nothing');

      assert.deepEqual(
        vfs.readdir('/web/check1').map((e) => e.name),
        ['vda.raw', 'domain.xml', 'etc_vm.conf'],
      );
      assert.equal(vfs.getattr('/web/check1/vda.raw').mode, S_IFREG | 0o444);
      assert.equal(vfs.pinnedIds.length, 1);
      const old = vfs.open('/web/check1/vda.raw', O_RDONLY);
      const viaLatest = vfs.open('/web/latest/vda.raw', O_RDONLY);
      assert.equal(vfs.pinnedIds.length, 2);
      // One immutable pin file per pinning step (src/repo/pins.ts); together they hold every id.
      assert.deepEqual(
        pinFiles(repoDir)
          .flatMap((p) => p.checkpoints)
          .sort((a, b) => a - b),
        vfs.pinnedIds,
      );

      // A new checkpoint written by another repository handle (as another process would).
      await qemuIo(img, 'qcow2', `write -P 0x77 ${5 * MiB} ${MiB}`);
      await backup('inc');
      assert.deepEqual(
        vfs.readdir('/web').map((e) => e.name),
        ['check1', 'check2', 'check3', 'latest'],
      );
      assert.equal(vfs.readlink('/web/latest'), 'check3');
      const fresh = vfs.open('/web/latest/vda.raw', O_RDONLY);
      assert.ok((await readAll(vfs, fresh, DISK_SIZE)).equals(fs.readFileSync(refs[2]!)), 'check3');
      // Handles opened before keep reading what they opened.
      assert.ok((await readAll(vfs, old, DISK_SIZE)).equals(fs.readFileSync(refs[0]!)), 'check1');
      assert.ok((await readAll(vfs, viaLatest, DISK_SIZE)).equals(fs.readFileSync(refs[1]!)), 'check2');
    } finally {
      vfs.close();
      repo.close();
    }
    assert.deepEqual(pinFiles(repoDir), []);
  });
});

describe('CheckpointVfs on damaged data', () => {
  it('fails reads that touch a damaged chunk with EIO, reports the range once, and reads the rest', async () => {
    const copy = path.join(work, 'damaged-repo');
    fs.cpSync(repoDir, copy, { recursive: true });
    const at = 1500 * KiB; // inside the random data of check1
    const repo = Repository.open(copy);
    const reports: DamageReport[] = [];
    let vfs: CheckpointVfs | undefined;
    try {
      const reader = CheckpointReader.open(repo, 'web@check1');
      const ext = reader.page(reader.disk('vda'), 0).find((e) => e.offset <= at && at < e.offset + e.length);
      assert.ok(ext?.loc, 'an extent with data at the damaged offset');
      // Damage the stored bytes that hold `at`: in a frames chunk (codec 2, the random data is raw
      // frames since format 6) the frame with that offset, since other frames still read.
      let damageAt = ext.loc.offset + Math.floor(ext.loc.storedLen / 2);
      if (ext.loc.codec === CODEC_FRAMES) {
        const stored = fs
          .readFileSync(packPath(copy, ext.loc.pack))
          .subarray(ext.loc.offset, ext.loc.offset + ext.loc.storedLen);
        const t = parseFrameTable(stored, ext.loc.rawLen, ext.loc.storedLen, ext.loc.hash);
        const inChunk = at - ext.offset + ext.chunkOff;
        const f = t.frames.find((x) => x.rawOff <= inChunk && inChunk < x.rawOff + x.rawLen)!;
        damageAt = ext.loc.offset + f.storedOff + Math.floor(f.storedLen / 2);
      }
      const fd = fs.openSync(packPath(copy, ext.loc.pack), 'r+');
      fs.writeSync(fd, Buffer.alloc(64, 0xa5), 0, 64, damageAt);
      fs.closeSync(fd);

      vfs = CheckpointVfs.open(repo, { ref: 'web@check1', onDamage: (d) => reports.push(d) });
      const fh = vfs.open('/vda.raw', O_RDONLY);
      for (let i = 0; i < 2; i++) {
        await assert.rejects(
          vfs.read(fh, at - 100, Buffer.alloc(128 * KiB)),
          (e: unknown) => e instanceof FsError && e.code === 'EIO',
        );
      }
      assert.equal(reports.length, 1, 'one report per damaged chunk');
      const r = reports[0]!;
      assert.equal(r.disk, 'vda');
      assert.equal(r.checkpoint, 'check1');
      assert.ok(r.offset <= at && at < r.offset + r.length, `range ${r.offset}+${r.length} holds ${at}`);
      assert.ok(r.length <= repo.config.chunkSize);
      assert.match(r.message, /chunk/);
      // Everything outside that chunk still reads correctly.
      const expected = fs.readFileSync(refs[0]!);
      for (const [off, len] of [
        [0, r.offset],
        [r.offset + r.length, 4 * MiB],
      ] as const) {
        const b = Buffer.alloc(len);
        assert.equal(await vfs.read(fh, off, b), len);
        assert.ok(b.equals(expected.subarray(off, off + len)), `bytes ${off}+${len}`);
      }
    } finally {
      vfs?.close();
      repo.close();
    }
  });
});
