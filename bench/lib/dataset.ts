/**
 * The benchmark's disk and its history, made once per run and shared by every tool.
 *
 * State 0 (`base.qcow2`): a GPT disk with an ext4 root partition (75 % of the disk) holding real
 * files — config and text files, documentation, logs (compressible text), libraries, media and a
 * database file (random, incompressible), a preallocated file of zeros — then an unformatted
 * partition (zeros) and unpartitioned space. Fixed seed: the same bytes every run (except ext4
 * timestamps).
 *
 * States 1..N: each is a qcow2 overlay on the previous state in which a guest's day of work was
 * done through QEMU (`modifyDisk`: qemu-nbd -> nbdfuse -> loop mount): logs appended, database
 * pages rewritten in place, part of a media file rewritten, a download added and an older one
 * deleted, config files edited, documents added — about 1.5 % of the disk. The overlay holds
 * exactly the clusters that changed, so `qemu-img map` of it is the state's delta; `replayDelta`
 * writes that delta into another image through qemu-nbd, so every tool's own working image goes
 * through byte-identical states and its persistent dirty bitmaps record the writes as a guest's
 * would.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import {
  makeDisk,
  modifyDisk,
  partitionTableOf,
  randomBuffer,
  textFile,
  type FileSpec,
} from '../../test/helpers/images';
import { Bg, log, MiB, sh, startBg, waitUntil } from './common';

export interface Extent {
  offset: number;
  length: number;
  zero?: boolean;
}

export interface Dataset {
  dir: string;
  sizeMiB: number;
  /** State 0. */
  base: string;
  /** overlays[i-1] is state i (a qcow2 overlay whose backing chain ends at `base`). */
  overlays: string[];
  /** deltas[i-1]: JSON file of the extents state i changed (qcow2 clusters of its overlay). */
  deltas: string[];
  deltaBytes: number[];
  /** Byte range of the ext4 root partition. */
  rootPart: { offset: number; size: number };
  /** The small file restored in the file-restore measurement, and its sha256 at each state. */
  probe: { path: string; size: number; sha256: string[] };
  fileCount: number;
  fileBytes: number;
  /** Allocated (non-zero) bytes of state 0 as qemu-img map reports them. */
  dataBytes: number;
}

const PROBE = 'etc/app/app.conf';

/** Deterministic 32-bit generator (mulberry32) for layout choices. */
function rng(seed: number): () => number {
  let a = (seed * 0x9e3779b1) | 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (t ^ (t >>> 14)) >>> 0;
  };
}

function between(next: () => number, lo: number, hi: number): number {
  return lo + (next() % Math.max(1, hi - lo + 1));
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** Files of state 0, scaled by disk size (f = sizeMiB / 4096). */
function baseFiles(sizeMiB: number): FileSpec[] {
  const f = sizeMiB / 4096;
  const next = rng(11);
  const files: FileSpec[] = [];
  let seed = 1000;
  const text = (p: string, size: number): void => {
    files.push({ path: p, content: textFile(seed++, size) });
  };
  const rand = (p: string, size: number): void => {
    files.push({ path: p, content: randomBuffer(seed++, size) });
  };
  // Configuration: 150 small text files.
  text(PROBE, 3000);
  const etcDirs = ['app', 'nginx', 'ssh', 'systemd/system', 'default', 'cron.d', 'security', 'network'];
  for (let i = 0; i < 149; i++) {
    const d = etcDirs[i % etcDirs.length] as string;
    text(`etc/${d}/file${i}.conf`, between(next, 200, 6000));
  }
  // Documentation and documents: many small text files.
  for (let i = 0; i < 600; i++)
    text(`usr/share/doc/pkg${i % 120}/doc${i}.txt`, between(next, 1024, 48 * 1024));
  for (let i = 0; i < 200; i++) text(`home/user/docs/note${i}.txt`, between(next, 2048, 200 * 1024));
  // Libraries: random content, 64 KiB .. 12 MiB, about 300 MiB per 4 GiB.
  let left = Math.round(300 * MiB * f);
  for (let i = 0; left > 0; i++) {
    const sz = Math.min(
      left,
      between(next, 64 * 1024, Math.max(128 * 1024, Math.round(12 * MiB * Math.sqrt(f)))),
    );
    rand(`usr/lib/x86_64-linux-gnu/lib${i}.so`, sz);
    left -= sz;
  }
  // Logs: compressible text, about 160 MiB per 4 GiB in 6 files.
  const logs = ['syslog', 'app.log', 'auth.log', 'kern.log', 'nginx/access.log', 'nginx/error.log'];
  for (const l of logs) text(`var/log/${l}`, Math.round((160 * MiB * f) / logs.length));
  // Media: random, about 420 MiB per 4 GiB.
  left = Math.round(420 * MiB * f);
  for (let i = 0; left > 0; i++) {
    const sz = Math.min(left, Math.max(MiB, Math.round(between(next, 16, 64) * MiB * f)));
    rand(`home/user/media/clip${i}.mp4`, sz);
    left -= sz;
  }
  // A database file (random pages) and a preallocated file of zeros.
  rand('var/lib/db/app.db', Math.round(192 * MiB * f));
  files.push({ path: 'var/cache/prealloc.img', content: Buffer.alloc(Math.round(96 * MiB * f)) });
  return files;
}

/** One day of guest activity (state `i`), about 1.5 % of the disk; returns the probe file's new content. */
async function dayOfWork(mnt: string, i: number, sizeMiB: number): Promise<Buffer> {
  const c = sizeMiB / 4096;
  const next = rng(5000 + i);
  let seed = 100000 * i;
  const p = (rel: string): string => path.join(mnt, rel);
  // Logs grow.
  for (const l of ['var/log/syslog', 'var/log/app.log']) {
    await fsp.appendFile(p(l), textFile(seed++, Math.round(6 * MiB * c)));
  }
  // Database: random 16 KiB pages rewritten in place.
  const db = await fsp.open(p('var/lib/db/app.db'), 'r+');
  try {
    const pages = Math.floor((await db.stat()).size / 16384);
    const n = Math.max(20, Math.round(300 * c));
    const data = randomBuffer(seed++, n * 16384);
    for (let k = 0; k < n; k++) {
      await db.write(data, k * 16384, 16384, (next() % pages) * 16384);
    }
    await db.sync();
  } finally {
    await db.close();
  }
  // Part of a media file is rewritten (an edit).
  const media = (await fsp.readdir(p('home/user/media'))).sort();
  const clip = p(`home/user/media/${media[i % media.length] as string}`);
  const mf = await fsp.open(clip, 'r+');
  try {
    const size = (await mf.stat()).size;
    const len = Math.min(size, Math.round(12 * MiB * c));
    const at = Math.floor(((next() % 1000) / 1000) * (size - len));
    await mf.write(randomBuffer(seed++, len), 0, len, at);
    await mf.sync();
  } finally {
    await mf.close();
  }
  // A download arrives; the one from two days ago is deleted (no discard).
  await fsp.mkdir(p('home/user/downloads'), { recursive: true });
  await fsp.writeFile(p(`home/user/downloads/dl-${i}.bin`), randomBuffer(seed++, Math.round(16 * MiB * c)));
  await fsp.rm(p(`home/user/downloads/dl-${i - 2}.bin`), { force: true });
  // Configuration edits (the probe file among them) and new documents.
  const probe = textFile(seed++, 3000 + i * 17);
  await fsp.writeFile(p(PROBE), probe);
  for (let k = 0; k < 9; k++) {
    const n = next() % 149;
    const d = ['app', 'nginx', 'ssh', 'systemd/system', 'default', 'cron.d', 'security', 'network'][
      n % 8
    ] as string;
    await fsp.writeFile(p(`etc/${d}/file${n}.conf`), textFile(seed++, between(next, 200, 6000)));
  }
  for (let k = 0; k < 20; k++) {
    await fsp.writeFile(
      p(`home/user/docs/new-${i}-${k}.txt`),
      textFile(seed++, between(next, 2048, 40 * 1024)),
    );
  }
  return probe;
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
}

async function qemuMap(image: string): Promise<MapEntry[]> {
  const r = await sh('qemu-img', ['map', '--output=json', image]);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** Extents held by the top layer of `image` (its own clusters, data or zero). */
async function topLayerExtents(image: string): Promise<Extent[]> {
  const out: Extent[] = [];
  for (const e of await qemuMap(image)) {
    if (e.depth !== 0 || !(e.data || e.zero)) continue;
    const zero = !e.data;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === e.start && Boolean(last.zero) === zero) last.length += e.length;
    else
      out.push(
        zero ? { offset: e.start, length: e.length, zero: true } : { offset: e.start, length: e.length },
      );
  }
  return out;
}

/** Build the disk and its history under `dir`. */
export async function makeDataset(dir: string, sizeMiB: number, states: number): Promise<Dataset> {
  await fsp.mkdir(dir, { recursive: true });
  const base = path.join(dir, 'base.qcow2');
  const files = baseFiles(sizeMiB);
  const fileBytes = files.reduce((a, x) => a + x.content.length, 0);
  log(`dataset: ${sizeMiB} MiB disk, ext4 with ${files.length} files (${(fileBytes / MiB).toFixed(0)} MiB)`);
  const rootMiB = Math.floor(sizeMiB * 0.75);
  await makeDisk(base, {
    format: 'qcow2',
    sizeMiB,
    table: 'gpt',
    seed: 7,
    partitions: [
      { fs: 'ext4', sizeMiB: rootMiB, label: 'root', files },
      { fs: 'none', sizeMiB: Math.floor(sizeMiB / 16), label: 'swap' },
    ],
  });
  const probeFile = files.find((x) => x.path === PROBE) as FileSpec;
  const probeSha = [sha(probeFile.content)];
  const rootPart = { offset: MiB, size: rootMiB * MiB };
  const overlays: string[] = [];
  const deltas: string[] = [];
  const deltaBytes: number[] = [];
  let prev = base;
  for (let i = 1; i <= states - 1; i++) {
    const ov = path.join(dir, `state${i}.qcow2`);
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.basename(prev), '-F', 'qcow2', ov]);
    let probe: Buffer = Buffer.alloc(0);
    await modifyDisk(ov, 'qcow2', 1, async (mnt) => {
      probe = await dayOfWork(mnt, i, sizeMiB);
    });
    probeSha.push(sha(probe));
    const ext = await topLayerExtents(ov);
    const file = path.join(dir, `delta${i}.json`);
    await fsp.writeFile(file, JSON.stringify(ext));
    const bytes = ext.reduce((a, e) => a + e.length, 0);
    log(
      `dataset: state ${i}: ${(bytes / MiB).toFixed(1)} MiB changed (${((100 * bytes) / (sizeMiB * MiB)).toFixed(2)} % of the disk)`,
    );
    overlays.push(ov);
    deltas.push(file);
    deltaBytes.push(bytes);
    prev = ov;
  }
  const dataBytes = (await qemuMap(base)).filter((e) => e.data).reduce((a, e) => a + e.length, 0);
  // Check the partition the file restores will loop-mount.
  const raw0 = path.join(dir, 'check.raw');
  await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', base, raw0]);
  const t = await partitionTableOf(raw0);
  await fsp.rm(raw0, { force: true });
  const p1 = t.partitions.find((x) => x.index === 1);
  if (!p1 || p1.start !== rootPart.offset || p1.size !== rootPart.size) {
    throw new Error(`unexpected partition table: ${JSON.stringify(t.partitions)}`);
  }
  return {
    dir,
    sizeMiB,
    base,
    overlays,
    deltas,
    deltaBytes,
    rootPart,
    probe: { path: PROBE, size: probeFile.content.length, sha256: probeSha },
    fileCount: files.length,
    fileBytes,
    dataBytes,
  };
}

/** The image holding state `i` (0 = base). */
export function stateImage(ds: Dataset, i: number): string {
  return i === 0 ? ds.base : (ds.overlays[i - 1] as string);
}

/** Write state `i` as a sparse raw file. */
export async function stateRaw(ds: Dataset, i: number, out: string): Promise<void> {
  await fsp.rm(out, { force: true });
  await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', stateImage(ds, i), out]);
}

// ---------------------------------------------------------------------------------------------
// qemu-nbd servers and the extent helper

export const HELPER = path.resolve(__dirname, '../../../bench/lib/nbd-extents.py');
export const VNBD_MAP = path.resolve(__dirname, '../../../bench/lib/vnbd-map.py');
/** Debian's python with the libnbd and libvirtnbdbackup modules (not a pyenv shim). */
export const PYTHON = '/usr/bin/python3';

export interface NbdServer {
  bg: Bg;
  sock: string;
  uri: string;
  stop(): Promise<void>;
}

/**
 * `qemu-nbd` on a unix socket (stopped with SIGTERM by PID so that persistent bitmaps are stored).
 * `bitmap` exports that dirty bitmap as the qemu:dirty-bitmap:NAME context.
 */
export async function qemuNbd(
  image: string,
  sock: string,
  opts: { readOnly: boolean; format?: 'qcow2' | 'raw'; bitmap?: string },
): Promise<NbdServer> {
  fs.mkdirSync(path.dirname(sock), { recursive: true });
  fs.rmSync(sock, { force: true });
  const args = [
    '-f',
    opts.format ?? 'qcow2',
    '-k',
    sock,
    '--persistent',
    '--shared',
    '8',
    '--cache=writeback',
  ];
  if (opts.readOnly) args.push('-r');
  if (opts.bitmap !== undefined) args.push('-B', opts.bitmap);
  args.push(image);
  const bg = startBg('qemu-nbd', args);
  await waitUntil(`qemu-nbd ${path.basename(image)}`, () => fs.existsSync(sock), bg, 30000);
  return {
    bg,
    sock,
    uri: `nbd+unix:///?socket=${sock}`,
    stop: async () => {
      await bg.stop(60000);
      fs.rmSync(sock, { force: true });
    },
  };
}

/** Copy `extentsFile`'s ranges from `srcImage` (read-only) into `dstImage` through qemu-nbd. */
export async function copyExtents(
  srcImage: string,
  dstImage: string,
  extentsFile: string,
  tmp: string,
): Promise<void> {
  const src = await qemuNbd(srcImage, path.join(tmp, 'src.sock'), { readOnly: true });
  try {
    const dst = await qemuNbd(dstImage, path.join(tmp, 'dst.sock'), { readOnly: false });
    try {
      await sh(PYTHON, [HELPER, 'copy', src.uri, dst.uri, extentsFile]);
    } finally {
      await dst.stop();
    }
  } finally {
    await src.stop();
  }
}

/** Bring `image` (holding state i-1) to state i: the guest's writes of that day, through QEMU. */
export async function replayDelta(ds: Dataset, i: number, image: string, tmp: string): Promise<void> {
  await copyExtents(stateImage(ds, i), image, ds.deltas[i - 1] as string, tmp);
}
