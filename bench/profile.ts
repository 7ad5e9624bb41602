/**
 * Where a full backup's time goes: runs the backup engine in-process on a qcow2 image (read
 * through `qemu-nbd`, as `bkfs backup --disk vda=IMAGE` does) into a fresh repository and prints
 * the engine's `BackupStats` (reading, zero checks, hashing, compressing, pack writes, waiting)
 * with the CPU seconds per GiB of bkfs and of qemu-nbd.
 *
 *   bench/profile [--image FILE.qcow2] [--size-mib 1024] [--data half|mixed] [--runs 1]
 *                 [--read-size BYTES] [--read-concurrency N] [--workers N] [--level N] [--json]
 *                 [--cold] [--make-image FILE.qcow2]
 *
 * Without --image it builds one in a temporary directory: `half` (the engine bench's image:
 * 32 MiB blocks alternating random data and holes) or `mixed` (random / compressible text / hole).
 * The image is read into the page cache first, so the figures are the pipeline's, not the disk's;
 * `--cold` drops the page cache instead (as bench/compare.ts does). `--make-image FILE` only builds
 * the image (--size-mib, --data) and exits, for A/B runs of two builds on one image.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { runBackup, emptyBackupStats, type BackupStats } from '../src/backup/engine';
import { ImageSource } from '../src/backup/sources';
import { Repository } from '../src/repo/repository';
import { randomBuffer, textFile } from '../test/helpers/images';
import { arg, sh } from './lib/common';

const MiB = 1 << 20;
const BLOCK = 32 * MiB;

/** user+sys CPU seconds of this process and of its reaped children (/proc/self/stat). */
function cpuTimes(): { self: number; children: number } {
  const f = fs.readFileSync('/proc/self/stat', 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  // Fields after the comm: index 0 = state (field 3); utime = 14, stime 15, cutime 16, cstime 17.
  const tck = 100; // USER_HZ on Linux
  const n = (field: number) => Number(rest[field - 3]) / tck;
  return { self: n(14) + n(15), children: n(16) + n(17) };
}

/** CPU seconds (user+sys) of each thread of this process, by thread id (/proc/self/task). */
function threadCpu(): Map<number, number> {
  const out = new Map<number, number>();
  for (const t of fs.readdirSync('/proc/self/task')) {
    try {
      const f = fs.readFileSync(`/proc/self/task/${t}/stat`, 'utf8');
      const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
      out.set(Number(t), (Number(rest[11]) + Number(rest[12])) / 100);
    } catch {
      // the thread ended between readdir and read
    }
  }
  return out;
}

/**
 * Samples the threads' CPU every 50 ms while a backup runs, keeping each thread's last figure (the
 * ingest workers end before the backup returns). Threads that did not exist before are the
 * backup's ingest workers; the others are the main thread and Node's helpers (libuv's file-system
 * pool, V8's GC and compiler threads).
 */
class ThreadSampler {
  private readonly before = threadCpu();
  private last = new Map<number, number>();
  private readonly timer = setInterval(() => this.sample(), 50);

  private sample(): void {
    for (const [t, c] of threadCpu()) this.last.set(t, c);
  }

  stop(): { main: number; workers: number; helpers: number } {
    clearInterval(this.timer);
    this.sample();
    const r = { main: 0, workers: 0, helpers: 0 };
    for (const [t, c] of this.last) {
      const d = c - (this.before.get(t) ?? 0);
      if (t === process.pid) r.main += d;
      else if (this.before.has(t)) r.helpers += d;
      else r.workers += d;
    }
    return r;
  }
}

async function makeImage(file: string, sizeMiB: number, data: string): Promise<number> {
  const raw = `${file}.raw`;
  const fh = await fsp.open(raw, 'w', 0o600);
  let bytes = 0;
  try {
    await fh.truncate(sizeMiB * MiB);
    const kinds = data === 'mixed' ? ['random', 'text', 'hole'] : ['random', 'hole'];
    for (let off = 0, i = 0; off < sizeMiB * MiB; off += BLOCK, i++) {
      const kind = kinds[i % kinds.length];
      if (kind === 'hole') continue;
      let b = kind === 'random' ? randomBuffer(9000 + i, BLOCK) : textFile(9000 + i, BLOCK);
      b = b.subarray(0, BLOCK);
      await fh.write(b, 0, b.length, off);
      bytes += b.length;
    }
  } finally {
    await fh.close();
  }
  await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  await fsp.rm(raw, { force: true });
  return bytes;
}

const ms = (x: number) => `${(x / 1000).toFixed(2)} s`;
const pct = (x: number, of: number) => `${((100 * x) / of).toFixed(0)} %`;

interface Cpu {
  bkfs: number;
  nbd: number;
  threads: { main: number; workers: number; helpers: number };
}

function print(s: BackupStats, bytes: number, cpu: Cpu): void {
  const gib = bytes / (1 << 30);
  const main = s.mainBusyMs + s.mainIdleMs;
  const lines: [string, string][] = [
    [
      'wall',
      `${ms(s.wallMs)}  (setup ${ms(s.setupMs)}, reading phase ${ms(s.ingestMs)}, seal+commit ${ms(s.commitMs)})`,
    ],
    [
      '  setup',
      `probe (qemu-img info) ${ms(s.planMs)}, lock+workers+row ${ms(s.startMs)}, bitmap add ${ms(s.trackMs)}, qemu-nbd start+connect ${ms(s.openMs)}`,
    ],
    [
      'read',
      `${(bytes / MiB).toFixed(0)} MiB in ${s.reads} NBD reads over ${s.connections} connection(s), ${s.chunks} chunks hashed (${s.rawChunks} stored raw)`,
    ],
    ['throughput', `${(bytes / MiB / (s.wallMs / 1000)).toFixed(0)} MiB/s wall`],
    [
      'CPU',
      `bkfs ${cpu.bkfs.toFixed(2)} s + qemu-nbd ${cpu.nbd.toFixed(2)} s = ${((cpu.bkfs + cpu.nbd) / gib).toFixed(2)} CPU s/GiB read`,
    ],
    [
      '  by thread',
      `main ${cpu.threads.main.toFixed(2)} s, ingest workers ${cpu.threads.workers.toFixed(2)} s, Node helpers (fs pool, GC) ${cpu.threads.helpers.toFixed(2)} s`,
    ],
    [
      'main thread',
      `busy ${ms(s.mainBusyMs)} (${pct(s.mainBusyMs, main)}), idle ${ms(s.mainIdleMs)} over the reading phase`,
    ],
    ['  waiting: buffer', `${ms(s.bufferWaitMs)} summed over in-flight reads (window full)`],
    [
      '  reading (NBD)',
      `${ms(s.readMs)} summed over in-flight reads, ${(s.readMs / Math.max(1, s.reads)).toFixed(1)} ms per read`,
    ],
    ['  zero check', `${ms(s.zeroCheckMs)} (main thread)`],
    ['  worker round trip', `${ms(s.poolMs)} summed over chunks (queueing included)`],
    ['    hashing', `${ms(s.hashMs)} worker thread time (${pct(s.hashMs, s.ingestMs * 2)} of 2 cores)`],
    [
      '    compressing',
      `${ms(s.compressMs)} worker thread time (${pct(s.compressMs, s.ingestMs * 2)} of 2 cores)`,
    ],
    ['  writing (dedup+pack)', `${ms(s.putMs)} summed over chunks (queueing included)`],
  ];
  const w = Math.max(...lines.map((l) => l[0].length));
  for (const [k, v] of lines) process.stdout.write(`${k.padEnd(w)}  ${v}\n`);
}

async function main(): Promise<void> {
  const tmp = await fsp.mkdtemp(path.join(process.env.BKFS_BENCH_DIR ?? os.tmpdir(), 'bkfs-profile-'));
  try {
    const make = arg('make-image', '');
    if (make) {
      await makeImage(path.resolve(make), Number(arg('size-mib', '1024')), arg('data', 'half'));
      return;
    }
    let image = arg('image', '');
    if (!image) {
      image = path.join(tmp, 'disk.qcow2');
      await makeImage(image, Number(arg('size-mib', '1024')), arg('data', 'half'));
    }
    const runs = Number(arg('runs', '1'));
    const all: unknown[] = [];
    for (let r = 0; r < runs; r++) {
      if (process.argv.includes('--cold')) await sh('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches']);
      else await sh('sh', ['-c', `cat '${image}' > /dev/null`]);
      const dir = path.join(tmp, `repo${r}`);
      const level = arg('level', '');
      const repo = Repository.init(dir, level ? { compressionLevel: Number(level) } : {});
      try {
        const stats = emptyBackupStats();
        const sampler = new ThreadSampler();
        const c0 = cpuTimes();
        const t0 = performance.now();
        const res = await runBackup(repo, {
          vm: 'profile',
          disks: [{ name: 'vda', source: new ImageSource(image) }],
          level: 'full',
          stats,
          readSize: arg('read-size', '') ? Number(arg('read-size', '')) : undefined,
          readConcurrency: arg('read-concurrency', '') ? Number(arg('read-concurrency', '')) : undefined,
          workers: arg('workers', '') ? Number(arg('workers', '')) : undefined,
        });
        const wall = performance.now() - t0;
        const c1 = cpuTimes();
        const cpu = { bkfs: c1.self - c0.self, nbd: c1.children - c0.children, threads: sampler.stop() };
        if (process.argv.includes('--json')) {
          all.push({ stats, cpu, bytesRead: res.bytesRead, wallMs: wall, stored: res.chunks.newStoredBytes });
        } else {
          if (runs > 1) process.stdout.write(`-- run ${r + 1}/${runs}\n`);
          print(stats, res.bytesRead, cpu);
          process.stdout.write(`stored      ${(res.chunks.newStoredBytes / MiB).toFixed(0)} MiB\n`);
        }
      } finally {
        repo.close();
        await fsp.rm(dir, { recursive: true, force: true });
      }
    }
    if (all.length) process.stdout.write(JSON.stringify(all) + '\n');
  } finally {
    await fsp.rm(tmp, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/profile: ${(e as Error).message}\n`);
  process.exit(1);
});
