/**
 * Test fixtures: real disk images (qcow2 or raw) with a GPT or MBR partition table and real
 * ext4 / xfs / vfat filesystems holding known files, plus a way to change files inside them the
 * way a guest would (through QEMU for qcow2, so persistent dirty bitmaps record the writes).
 *
 * Needs (Debian packages): qemu-utils, nbdfuse (libnbd-bin), fuse3, e2fsprogs, xfsprogs,
 * dosfstools, mtools, fdisk (sfdisk), util-linux (losetup, mount). `makeDisk` needs root only for
 * xfs filesystems whose file names contain whitespace (those are populated through a loop mount);
 * `modifyDisk` always needs root (loop devices, mount).
 *
 * Every helper that mounts or attaches something undoes it on every exit path; processes it
 * starts are stopped by PID.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { run, stopChild, waitExit } from '../../src/util/proc';
import { readPartitionTable, type PartitionTable } from '../../src/util/partitions';

export interface FileSpec {
  /** Path relative to the filesystem root, '/'-separated; parent directories are created. */
  path: string;
  content: Buffer;
}

export interface PartSpec {
  /** 'none' leaves the partition unformatted (zeros, sparse). */
  fs: 'ext4' | 'xfs' | 'vfat' | 'none';
  sizeMiB: number;
  /** Filesystem label (ext4 ≤16, xfs ≤12, vfat ≤11 characters) and, for GPT, the partition name. */
  label?: string;
  files?: FileSpec[];
}

export interface MakeDiskOptions {
  format: 'qcow2' | 'raw';
  /** Virtual size of the disk. */
  sizeMiB: number;
  table: 'gpt' | 'mbr' | 'none';
  /**
   * Partitions in order, laid out contiguously from 1 MiB, each 1 MiB-aligned. GPT: numbered
   * 1..n (the last MiB of the disk is kept for the backup GPT). MBR: up to 4 are primary (1..4);
   * with more, 1..3 are primary, slot 4 is an extended partition and the rest are logical (5..),
   * each preceded by a 1 MiB gap for its EBR. 'none': at most one spec, the filesystem at byte 0.
   */
  partitions: PartSpec[];
  /**
   * Makes disk/partition GUIDs, the MBR disk signature and filesystem UUIDs/serials
   * deterministic. Without it the tools choose random ones. (Timestamps still differ run to run.)
   */
  seed?: number;
}

const MiB = 1024 * 1024;
const SECTOR = 512;
const MTOOLS_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1' };
/** mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under xfstests. */
const XFS_SMALL_ENV = { ...process.env, TEST_DIR: '1', TEST_DEV: '1', QA_CHECK_FS: '1' };

// ---------------------------------------------------------------------------------------------
// Deterministic data

/** splitmix32: spreads nearby seeds apart before they feed a PRNG. */
function mixSeed(seed: number): number {
  let z = (seed + 0x9e3779b9) | 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/** mulberry32 generator of 32-bit words. */
function prng(seed: number): () => number {
  let a = mixSeed(seed);
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/**
 * `size` deterministic pseudo-random (incompressible) bytes; the same (seed, size) always gives
 * the same bytes, and a shorter size is a prefix of a longer one. About 100 ms for 64 MiB.
 */
export function randomBuffer(seed: number, size: number): Buffer {
  const words = Math.ceil(size / 4);
  const ab = new ArrayBuffer(words * 4);
  const dv = new DataView(ab);
  const u32 = new Uint32Array(ab);
  const next = prng(seed);
  const le = os.endianness() === 'LE';
  if (le) for (let i = 0; i < words; i++) u32[i] = next();
  else for (let i = 0; i < words; i++) dv.setUint32(i * 4, next(), true);
  return Buffer.from(ab, 0, size);
}

const WORDS = (
  'the quick brown fox jumps over lazy dog block disk backup checkpoint chunk store index ' +
  'qemu nbd bitmap dirty clean sector partition filesystem inode extent journal snapshot ' +
  'restore verify compress dedup hash pack volume mount read write flush sync guest host'
).split(' ');

/** Deterministic, very compressible text of about `approxSize` bytes (numbered lines of words). */
export function textFile(seed: number, approxSize: number): Buffer {
  const next = prng(seed);
  const parts: string[] = [];
  let len = 0;
  let line = 1;
  while (len < approxSize) {
    const n = 6 + (next() % 10);
    const ws: string[] = [];
    for (let i = 0; i < n; i++) ws.push(WORDS[next() % WORDS.length] as string);
    const s = `${line++}: ${ws.join(' ')}.\n`;
    parts.push(s);
    len += s.length;
  }
  return Buffer.from(parts.join(''), 'utf8');
}

/** A UUID made from the PRNG (version 4 layout), for deterministic identifiers. */
function seededUuid(next: () => number): string {
  const b = Buffer.alloc(16);
  for (let i = 0; i < 16; i += 4) b.writeUInt32LE(next(), i);
  b[6] = ((b[6] as number) & 0x0f) | 0x40;
  b[8] = ((b[8] as number) & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---------------------------------------------------------------------------------------------
// Files and temp dirs

/**
 * Relative path ('/'-separated) -> sha256 hex of every regular file under `dir`. Directories are
 * walked; symlinks and other special files are skipped.
 */
export async function fileTreeChecksums(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (rel: string): Promise<void> => {
    const entries = await fsp.readdir(path.join(dir, rel), { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      const r = rel === '' ? e.name : `${rel}/${e.name}`;
      if (e.isDirectory()) await walk(r);
      else if (e.isFile()) out.set(r, await sha256File(path.join(dir, r)));
    }
  };
  await walk('');
  return out;
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  const fh = await fsp.open(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
    }
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}

/** sha256 hex of a buffer (to compare with `fileTreeChecksums`). */
export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Mount points at or below `dir`, deepest first (from /proc/self/mounts). */
export async function mountsUnder(dir: string): Promise<string[]> {
  const real = await fsp.realpath(dir).catch(() => dir);
  const text = await fsp.readFile('/proc/self/mounts', 'utf8').catch(() => '');
  const decode = (s: string): string =>
    s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
  return text
    .split('\n')
    .map((l) => decode(l.split(' ')[1] ?? ''))
    .filter((m) => m === real || m.startsWith(real + '/'))
    .sort((a, b) => b.length - a.length);
}

/**
 * Run `fn` with a fresh directory under os.tmpdir(), removed afterwards. If something is still
 * mounted below it (a helper failed to clean up), that is unmounted first; if it cannot be, the
 * directory is left in place rather than deleting through the mount.
 */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bkfs-test-'));
  try {
    return await fn(dir);
  } finally {
    for (const m of await mountsUnder(dir)) await unmount(m).catch(() => undefined);
    const left = await mountsUnder(dir);
    if (left.length === 0) await fsp.rm(dir, { recursive: true, force: true });
  }
}

async function writeTree(root: string, files: readonly FileSpec[]): Promise<void> {
  await fsp.mkdir(root, { recursive: true });
  for (const f of files) {
    const rel = f.path.replace(/^\/+/, '');
    if (rel === '' || rel.split('/').some((c) => c === '..' || c === '.' || c === '')) {
      throw new Error(`bad file path in FileSpec: ${JSON.stringify(f.path)}`);
    }
    const dest = path.join(root, rel);
    await fsp.mkdir(path.dirname(dest), { recursive: true });
    await fsp.writeFile(dest, f.content);
  }
}

// ---------------------------------------------------------------------------------------------
// Loop devices, mounts, cleanup

/** Resources released in reverse order; every release runs even if an earlier one fails. */
class Cleanup {
  private readonly steps: { what: string; fn: () => Promise<void> }[] = [];
  push(what: string, fn: () => Promise<void>): void {
    this.steps.push({ what, fn });
  }
  /** Run every step (last pushed first); returns the errors. */
  async runAll(): Promise<Error[]> {
    const errors: Error[] = [];
    while (this.steps.length > 0) {
      const s = this.steps.pop() as { what: string; fn: () => Promise<void> };
      try {
        await s.fn();
      } catch (e) {
        errors.push(new Error(`cleanup (${s.what}) failed: ${(e as Error).message}`));
      }
    }
    return errors;
  }
}

/** Run `body` with a Cleanup; the body's own error wins over cleanup errors. */
async function withCleanup<T>(body: (c: Cleanup) => Promise<T>): Promise<T> {
  const c = new Cleanup();
  let result: T;
  try {
    result = await body(c);
  } catch (e) {
    await c.runAll();
    throw e;
  }
  const errors = await c.runAll();
  if (errors.length > 0) throw errors[0];
  return result;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Attach `file` (a byte range of it) to a free loop device; returns /dev/loopN. */
async function attachLoop(file: string, offset: number, size: number, readOnly: boolean): Promise<string> {
  const args = ['--find', '--show', '--offset', String(offset), '--sizelimit', String(size)];
  if (readOnly) args.push('--read-only');
  const { stdout } = await run('losetup', [...args, file]);
  const dev = stdout.trim();
  if (!dev.startsWith('/dev/loop')) throw new Error(`losetup printed ${JSON.stringify(stdout)}`);
  return dev;
}

async function detachLoop(dev: string): Promise<void> {
  for (let i = 0; ; i++) {
    const r = await run('losetup', ['-d', dev], { allowFail: true });
    if (r.code === 0) return;
    if (i >= 20) throw new Error(`losetup -d ${dev}: ${r.stderr.trim()}`);
    await sleep(250);
  }
}

async function unmount(dir: string): Promise<void> {
  for (let i = 0; ; i++) {
    const r = await run('umount', [dir], { allowFail: true });
    if (r.code === 0) return;
    if (i >= 20) {
      await run('umount', ['-l', dir], { allowFail: true });
      throw new Error(`umount ${dir}: ${r.stderr.trim()} (lazily unmounted)`);
    }
    await sleep(250);
  }
}

/**
 * Attach `file`'s byte range to a loop device and mount it on `dir`; the loop device and the
 * mount are registered with `c` for release.
 */
async function mountRange(
  c: Cleanup,
  file: string,
  offset: number,
  size: number,
  dir: string,
  opts: { readOnly: boolean; fsType?: string },
): Promise<string> {
  const dev = await attachLoop(file, offset, size, opts.readOnly);
  c.push(`losetup -d ${dev}`, async () => {
    await run('sync', []);
    await run('blockdev', ['--flushbufs', dev], { allowFail: true });
    await detachLoop(dev);
  });
  await fsp.mkdir(dir, { recursive: true });
  const fsType = opts.fsType ?? (await probeFsType(dev));
  await run('mount', ['-t', fsType, '-o', opts.readOnly ? 'ro' : 'rw', dev, dir]);
  c.push(`umount ${dir}`, () => unmount(dir));
  return dev;
}

/**
 * Mount the filesystem at bytes [offset, offset+size) of the raw file `rawFile` READ-ONLY on a
 * fresh directory, run `fn`, then unmount and detach. ext4 is mounted with `noload`, xfs with
 * `norecovery`, so an unclean image is never replayed (and never written).
 */
export async function withMountedRange<T>(
  rawFile: string,
  offset: number,
  size: number,
  fn: (mountDir: string) => Promise<T>,
): Promise<T> {
  return withTempDir((tmp) =>
    withCleanup(async (c) => {
      const dev = await attachLoop(rawFile, offset, size, true);
      c.push(`losetup -d ${dev}`, () => detachLoop(dev));
      const fsType = await probeFsType(dev);
      const extra =
        fsType === 'ext4' || fsType === 'ext3' ? 'noload' : fsType === 'xfs' ? 'norecovery' : undefined;
      const dir = path.join(tmp, 'mnt');
      await fsp.mkdir(dir);
      await run('mount', ['-t', fsType, '-o', ['ro', ...(extra ? [extra] : [])].join(','), dev, dir]);
      c.push(`umount ${dir}`, () => unmount(dir));
      return fn(dir);
    }),
  );
}

async function probeFsType(dev: string): Promise<string> {
  const r = await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', dev], { allowFail: true });
  const t = r.stdout.trim();
  if (r.code !== 0 || t === '') throw new Error(`no filesystem found on ${dev}`);
  if (t === 'vfat') throw new Error(`${dev} holds vfat, which this kernel cannot mount (use mtools)`);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Building filesystems

/** Protofile for `mkfs.xfs -p` describing the tree under `root` (names must have no whitespace). */
async function xfsProto(root: string): Promise<string> {
  const lines: string[] = ['/dev/null', '0 0', 'd--755 0 0'];
  const walk = async (dir: string, depth: number): Promise<void> => {
    const entries = await fsp.readdir(dir, { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const ind = '  '.repeat(depth);
    for (const e of entries) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) {
        lines.push(`${ind}${e.name} d--755 0 0`);
        await walk(p, depth + 1);
        lines.push(`${ind}$`);
      } else {
        lines.push(`${ind}${e.name} ---644 0 0 ${p}`);
      }
    }
  };
  await walk(root, 1);
  lines.push('$', '');
  return lines.join('\n');
}

/** Copy a directory's contents into a mounted filesystem (the fallback for xfs). */
async function copyTree(src: string, dst: string): Promise<void> {
  await fsp.cp(src, dst, { recursive: true });
}

interface FsBuild {
  spec: PartSpec;
  /** Byte offset of the filesystem on the disk (FAT wants it as "hidden sectors"). */
  offset: number;
  uuid?: string;
}

/** Build the filesystem of one partition as the raw file `img` (size = spec.sizeMiB). */
async function buildFs(img: string, work: string, b: FsBuild): Promise<void> {
  const { spec } = b;
  await fsp.writeFile(img, '');
  await fsp.truncate(img, spec.sizeMiB * MiB);
  if (spec.fs === 'none') return;
  const stage = path.join(work, path.basename(img) + '.d');
  await writeTree(stage, spec.files ?? []);
  const label = spec.label;
  switch (spec.fs) {
    case 'ext4': {
      const args = ['-q', '-F', '-t', 'ext4', '-b', '4096', '-I', '256'];
      // Initialise inode tables and journal now, so that a later read-write mount does not
      // write them in the background (which would show up in dirty bitmaps).
      const ext = ['lazy_itable_init=0', 'lazy_journal_init=0', 'root_owner=0:0'];
      if (b.uuid !== undefined) {
        args.push('-U', b.uuid);
        ext.push(`hash_seed=${b.uuid}`);
      }
      args.push('-E', ext.join(','));
      if (label !== undefined) args.push('-L', label);
      args.push('-d', stage, img);
      await run('mkfs.ext4', args);
      return;
    }
    case 'xfs': {
      const args = ['-q', '-f'];
      if (label !== undefined) args.push('-L', label);
      if (b.uuid !== undefined) args.push('-m', `uuid=${b.uuid}`);
      // Protofile names are whitespace-separated tokens and '$' ends a directory; other names
      // are copied in through a loop mount instead (needs root).
      const protoSafe = (spec.files ?? []).every((f) =>
        f.path.split('/').every((c) => !/[\s]/.test(c) && !c.startsWith('$')),
      );
      if (protoSafe) {
        const proto = path.join(work, path.basename(img) + '.proto');
        await fsp.writeFile(proto, await xfsProto(stage));
        await run('mkfs.xfs', [...args, '-p', proto, img], { env: XFS_SMALL_ENV });
        return;
      }
      await run('mkfs.xfs', [...args, img], { env: XFS_SMALL_ENV });
      await withCleanup(async (c) => {
        const mnt = path.join(work, path.basename(img) + '.mnt');
        await mountRange(c, img, 0, spec.sizeMiB * MiB, mnt, { readOnly: false, fsType: 'xfs' });
        await copyTree(stage, mnt);
      });
      return;
    }
    case 'vfat': {
      const args = ['--mbr=n', '-h', String(b.offset / SECTOR)];
      if (label !== undefined) args.push('-n', label);
      if (b.uuid !== undefined) args.push('-i', b.uuid.replace(/-/g, '').slice(0, 8));
      await run('mkfs.vfat', [...args, img]);
      const top = await fsp.readdir(stage);
      if (top.length > 0) {
        await run('mcopy', ['-s', '-Q', '-m', '-i', img, ...top.map((n) => path.join(stage, n)), '::/'], {
          env: MTOOLS_ENV,
        });
      }
      return;
    }
  }
}

/** Copy `src` into `dst` at byte `offset`, skipping all-zero 64 KiB blocks so the result stays sparse. */
async function copySparse(src: string, dst: string, offset: number): Promise<void> {
  const BLOCK = 64 * 1024;
  const zero = Buffer.alloc(BLOCK);
  const inp = await fsp.open(src, 'r');
  try {
    const out = await fsp.open(dst, 'r+');
    try {
      const buf = Buffer.allocUnsafe(4 * MiB);
      let pos = 0;
      for (;;) {
        const { bytesRead } = await inp.read(buf, 0, buf.length, pos);
        if (bytesRead === 0) break;
        for (let o = 0; o < bytesRead; o += BLOCK) {
          const chunk = buf.subarray(o, Math.min(o + BLOCK, bytesRead));
          if (chunk.equals(zero.subarray(0, chunk.length))) continue;
          await out.write(chunk, 0, chunk.length, offset + pos + o);
        }
        pos += bytesRead;
      }
    } finally {
      await out.close();
    }
  } finally {
    await inp.close();
  }
}

interface Placed {
  spec: PartSpec;
  /** Partition number as Linux will see it. */
  index: number;
  startMiB: number;
}

interface Layout {
  placed: Placed[];
  /** MBR only: the extended partition. */
  extended?: { startMiB: number; sizeMiB: number };
}

function layout(opts: MakeDiskOptions): Layout {
  const parts = opts.partitions;
  for (const p of parts) {
    if (!Number.isInteger(p.sizeMiB) || p.sizeMiB <= 0) throw new Error(`bad partition size ${p.sizeMiB}`);
  }
  if (opts.table === 'none') {
    if (parts.length > 1) throw new Error("table 'none' takes at most one partition spec");
    const p = parts[0];
    if (p && p.sizeMiB > opts.sizeMiB) throw new Error('filesystem larger than the disk');
    return { placed: p ? [{ spec: p, index: 1, startMiB: 0 }] : [] };
  }
  const placed: Placed[] = [];
  let cursor = 1;
  let extended: Layout['extended'];
  if (opts.table === 'gpt') {
    if (parts.length > 128) throw new Error('at most 128 GPT partitions');
    parts.forEach((spec, i) => {
      placed.push({ spec, index: i + 1, startMiB: cursor });
      cursor += spec.sizeMiB;
    });
    cursor += 1; // backup GPT
  } else if (parts.length <= 4) {
    parts.forEach((spec, i) => {
      placed.push({ spec, index: i + 1, startMiB: cursor });
      cursor += spec.sizeMiB;
    });
  } else {
    parts.slice(0, 3).forEach((spec, i) => {
      placed.push({ spec, index: i + 1, startMiB: cursor });
      cursor += spec.sizeMiB;
    });
    const extStart = cursor;
    parts.slice(3).forEach((spec, i) => {
      cursor += 1; // room for the EBR
      placed.push({ spec, index: 5 + i, startMiB: cursor });
      cursor += spec.sizeMiB;
    });
    extended = { startMiB: extStart, sizeMiB: cursor - extStart };
  }
  if (cursor > opts.sizeMiB) {
    throw new Error(`partitions need ${cursor} MiB but the disk has ${opts.sizeMiB} MiB`);
  }
  const l: Layout = { placed };
  if (extended) l.extended = extended;
  return l;
}

const GPT_TYPE: Record<PartSpec['fs'], string> = {
  ext4: '0FC63DAF-8483-4772-8E79-3D69D8477DE4',
  xfs: '0FC63DAF-8483-4772-8E79-3D69D8477DE4',
  none: '0FC63DAF-8483-4772-8E79-3D69D8477DE4',
  vfat: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7',
};
const MBR_TYPE: Record<PartSpec['fs'], string> = { ext4: '83', xfs: '83', none: '83', vfat: 'c' };

function sfdiskScript(opts: MakeDiskOptions, l: Layout, next: (() => number) | undefined): string {
  const sec = (mib: number): number => (mib * MiB) / SECTOR;
  const lines: string[] = [];
  if (opts.table === 'gpt') {
    lines.push('label: gpt');
    if (next) lines.push(`label-id: ${seededUuid(next).toUpperCase()}`);
  } else {
    lines.push('label: dos');
    if (next) lines.push(`label-id: 0x${(next() | 1).toString(16).padStart(8, '0')}`);
  }
  lines.push('unit: sectors', '');
  for (const p of l.placed) {
    if (opts.table === 'mbr' && p.index === 5 && l.extended) {
      lines.push(`start=${sec(l.extended.startMiB)}, size=${sec(l.extended.sizeMiB)}, type=5`);
    }
    const f = [`start=${sec(p.startMiB)}`, `size=${sec(p.spec.sizeMiB)}`];
    if (opts.table === 'gpt') {
      f.push(`type=${GPT_TYPE[p.spec.fs]}`);
      if (next) f.push(`uuid=${seededUuid(next).toUpperCase()}`);
      if (p.spec.label !== undefined) {
        if (/["\\]/.test(p.spec.label)) throw new Error(`label ${p.spec.label} has a quote or backslash`);
        f.push(`name="${p.spec.label}"`);
      }
    } else {
      f.push(`type=${MBR_TYPE[p.spec.fs]}`);
    }
    lines.push(f.join(', '));
  }
  return lines.join('\n') + '\n';
}

/** 'qcow2' or 'raw' from the image's first bytes. */
async function detectFormat(image: string): Promise<'qcow2' | 'raw'> {
  const fh = await fsp.open(image, 'r');
  try {
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, 0);
    return b.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb])) ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

/**
 * Create a disk image at `imgPath` with a partition table and real, populated filesystems. The
 * filesystems are built as separate raw files without mounting (mkfs.ext4 -d, mkfs.xfs -p
 * protofile, mkfs.vfat + mcopy), then copied into a sparse raw disk at the partition offsets;
 * for qcow2 that raw disk is converted with `qemu-img convert` (zeros are not allocated).
 */
export async function makeDisk(imgPath: string, opts: MakeDiskOptions): Promise<void> {
  if (!Number.isInteger(opts.sizeMiB) || opts.sizeMiB <= 0) throw new Error(`bad disk size ${opts.sizeMiB}`);
  const l = layout(opts);
  const next = opts.seed !== undefined ? prng(opts.seed) : undefined;
  const tableScript = opts.table === 'none' ? undefined : sfdiskScript(opts, l, next);
  await withTempDir(async (work) => {
    const raw = opts.format === 'raw' ? imgPath : path.join(work, 'disk.raw');
    await fsp.rm(raw, { force: true });
    await fsp.writeFile(raw, '');
    await fsp.truncate(raw, opts.sizeMiB * MiB);
    if (tableScript !== undefined) {
      await run('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', '--wipe', 'never', raw], {
        input: tableScript,
      });
    }
    for (const p of l.placed) {
      if (p.spec.fs === 'none') continue;
      const fsImg = path.join(work, `part${p.index}.img`);
      const build: FsBuild = { spec: p.spec, offset: p.startMiB * MiB };
      if (next) build.uuid = seededUuid(next);
      await buildFs(fsImg, work, build);
      await copySparse(fsImg, raw, p.startMiB * MiB);
      await fsp.rm(fsImg, { force: true });
    }
    if (opts.format === 'qcow2') {
      await fsp.rm(imgPath, { force: true });
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, imgPath]);
    }
  });
}

/** Convert any qcow2 or raw image to a sparse raw file (`qemu-img convert -O raw`). */
export async function toRaw(image: string, out: string): Promise<void> {
  const fmt = await detectFormat(image);
  await fsp.rm(out, { force: true });
  await run('qemu-img', ['convert', '-f', fmt, '-O', 'raw', image, out]);
}

/** The partition table of a raw image file (or any file/FUSE view of a disk), read with fs reads. */
export async function partitionTableOf(rawFile: string): Promise<PartitionTable> {
  const fh = await fsp.open(rawFile, 'r');
  try {
    const { size } = await fh.stat();
    return await readPartitionTable(async (offset, length) => {
      const b = Buffer.alloc(length);
      const { bytesRead } = await fh.read(b, 0, length, offset);
      return b.subarray(0, bytesRead);
    }, size);
  } finally {
    await fh.close();
  }
}

/**
 * Byte range of partition `partIndex` of a raw disk view; 0 (or 1 on a disk without a table)
 * means the whole disk.
 */
async function partitionRange(rawFile: string, partIndex: number): Promise<{ offset: number; size: number }> {
  const t = await partitionTableOf(rawFile);
  const size = (await fsp.stat(rawFile)).size;
  if (partIndex === 0 || (t.scheme === 'none' && partIndex === 1)) return { offset: 0, size };
  const p = t.partitions.find((x) => x.index === partIndex && !x.extended);
  if (!p) {
    throw new Error(
      `no partition ${partIndex} (table ${t.scheme}: ${t.partitions.map((x) => x.index).join(',')})`,
    );
  }
  return { offset: p.start, size: p.size };
}

// ---------------------------------------------------------------------------------------------
// Serving a qcow2 through QEMU as a raw file

function spawnTool(cmd: string, args: string[]): { child: ChildProcess; stderr: () => string } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const err: Buffer[] = [];
  child.stderr?.on('data', (d: Buffer) => err.push(d));
  child.on('error', () => undefined); // reported through waitFor()
  return { child, stderr: () => Buffer.concat(err).toString('utf8').trim() };
}

/** Poll `ready` until true; fail early if `child` exits, or after `timeoutMs`. */
async function waitFor(
  what: string,
  child: ChildProcess,
  stderr: () => string,
  ready: () => boolean,
  timeoutMs = 15000,
): Promise<void> {
  const t0 = Date.now();
  while (!ready()) {
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) {
      throw new Error(`${what} exited before it was ready: ${stderr() || '(no output)'}`);
    }
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what} not ready after ${timeoutMs} ms: ${stderr()}`);
    await sleep(50);
  }
}

/**
 * Serve a qcow2 image writable with qemu-nbd on a unix socket and expose it as a raw file with
 * nbdfuse; returns that file's path. Registers with `c`: fusermount -u (then waiting for
 * nbdfuse to exit, SIGKILL by PID as a last resort) and SIGTERM to qemu-nbd by PID (SIGTERM
 * makes qemu-nbd flush and store persistent bitmaps; SIGKILL would leave them "in use").
 */
async function serveAsRawFile(c: Cleanup, image: string, work: string): Promise<string> {
  const sock = path.join(work, 'nbd.sock');
  const qemu = spawnTool('qemu-nbd', [
    '-f',
    'qcow2',
    '--socket',
    sock,
    '--persistent',
    '--shared',
    '4',
    image,
  ]);
  c.push('stop qemu-nbd', async () => {
    if (qemu.child.pid !== undefined) await stopChild(qemu.child, 30000);
  });
  await waitFor('qemu-nbd', qemu.child, qemu.stderr, () => existsSync(sock));

  const fuseDir = path.join(work, 'fuse');
  await fsp.mkdir(fuseDir);
  const pidFile = path.join(work, 'nbdfuse.pid');
  const fuse = spawnTool('nbdfuse', ['-C', '1', '-P', pidFile, path.join(fuseDir, 'disk'), '--unix', sock]);
  c.push('stop nbdfuse', async () => {
    const mounted = (await mountsUnder(fuseDir)).length > 0;
    if (mounted) {
      let ok = false;
      for (let i = 0; i < 20 && !ok; i++) {
        ok = (await run('fusermount3', ['-u', fuseDir], { allowFail: true })).code === 0;
        if (!ok) await sleep(250);
      }
      if (!ok) await run('fusermount3', ['-u', '-z', fuseDir], { allowFail: true });
    }
    // nbdfuse exits by itself once unmounted; only if it does not is it killed (by PID).
    let timer: NodeJS.Timeout | undefined;
    const exited = await Promise.race([
      waitExit(fuse.child).then(() => true),
      new Promise<boolean>((r) => (timer = setTimeout(() => r(false), 10000))),
    ]);
    clearTimeout(timer);
    if (!exited && fuse.child.pid !== undefined) await stopChild(fuse.child, 2000);
  });
  await waitFor('nbdfuse', fuse.child, fuse.stderr, () => existsSync(pidFile));
  return path.join(fuseDir, 'disk');
}

/**
 * Mount partition `partIndex` of `image` READ-WRITE, run `fn` on the mount point, then unmount
 * and release everything (also when `fn` throws). For qcow2 all writes go through qemu-nbd
 * (qemu-nbd -> nbdfuse -> loop device at the partition offset), so enabled persistent dirty
 * bitmaps in the image record them. For raw, a loop device on the image at the offset is used.
 *
 * `partIndex` is the Linux partition number; 0 (or 1 on a disk without a table) means the
 * whole disk. The filesystem must be one this kernel mounts (ext4, xfs), not vfat.
 */
export async function modifyDisk(
  image: string,
  format: 'qcow2' | 'raw',
  partIndex: number,
  fn: (mountDir: string) => Promise<void>,
): Promise<void> {
  const actual = await detectFormat(image);
  if (actual !== format) throw new Error(`${image} is ${actual}, not ${format}`);
  await withTempDir((work) =>
    withCleanup(async (c) => {
      const rawView = format === 'qcow2' ? await serveAsRawFile(c, image, work) : image;
      const { offset, size } = await partitionRange(rawView, partIndex);
      const mnt = path.join(work, 'mnt');
      await mountRange(c, rawView, offset, size, mnt, { readOnly: false });
      await fn(mnt);
    }),
  );
}
