/**
 * Benchmark of `bkfs mount` reads (not part of the tests; needs root for drop_caches and FUSE).
 *
 *   node dist/bench/mount-read.js [--size-mib 1536] [--chain-depth 30] [--sparse-gib 100]
 *                                 [--fio-seconds 10] [--work DIR] [--keep] [--json]
 *
 * Builds, in a work directory (default: a fresh one under os.tmpdir()), with the real CLI:
 *   1. a qcow2 with `size-mib` of data (each 4 KiB page half random, half zeros: zstd ~2x, no
 *      dedup) and a full backup; then
 *      - sequential: `dd bs=1M` of the mounted checkpoint, page cache dropped and a fresh daemon,
 *        against `dd` of the same bytes from a raw file (page cache dropped), plus a warm re-read;
 *      - random 4 KiB reads with fio (--direct=1, psync, queue depth 1 and 8 jobs): IOPS and p99
 *        latency over the whole disk (mostly chunk-cache misses) and over a 128 MiB region that
 *        fits the chunk cache;
 *   2. a `sparse-gib` GiB qcow2 holding ~1 GiB of data: wall time of `bkfs mount` and the time from
 *      its return to the first byte read;
 *   3. a chain of `chain-depth` checkpoints (a full, then incrementals each rewriting ~4 MiB at
 *      random places): mount time, first-byte time and cold sequential throughput at checkpoint 1
 *      vs the last one.
 * `runMountBench(options)` returns every figure as JSON (for bench/run); run standalone it also
 * prints a summary.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../test/helpers/cli';
import { randomBuffer } from '../test/helpers/images';
import { run } from '../src/util/proc';
import { mountAt } from '../src/fuse/state';
import { fuseCeilingMBps } from './fuse-ceiling';

const MiB = 1 << 20;
const GiB = 1 << 30;

export interface MountBenchOptions {
  sizeMiB?: number;
  chainDepth?: number;
  sparseGiB?: number;
  fioSeconds?: number;
  workDir?: string;
  keep?: boolean;
  log?: (line: string) => void;
}

export interface FioFigures {
  iops: number;
  p99LatencyUs: number;
  meanLatencyUs: number;
}

export interface MountBenchResult {
  machine: { cpus: number; node: string; kernel: string };
  dataMiB: number;
  sequential: {
    mountColdMBps: number;
    rawFileColdMBps: number;
    mountWarmMBps: number;
    /** The same dd of a fuse-native file system serving the bytes from memory (bench/fuse-ceiling.ts). */
    fuseCeilingColdMBps: number;
  };
  random4k: {
    wholeDiskQd1: FioFigures;
    wholeDisk8Jobs: FioFigures;
    cachedRegionQd1: FioFigures;
    /** The same reads on the raw file (page cache dropped): the storage's own figure. */
    rawFileQd1: FioFigures;
  };
  sparse: { virtualGiB: number; dataMiB: number; mountMs: number; firstByteMs: number };
  chain: {
    depth: number;
    first: { mountMs: number; firstByteMs: number; coldMBps: number };
    last: { mountMs: number; firstByteMs: number; coldMBps: number };
  };
}

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

function dropCaches(): void {
  sh('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

const ms = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e6;

/** dd the whole file to /dev/null with 1 MiB blocks; MB/s (10^6 bytes). */
function ddRate(file: string): number {
  const size = fs.statSync(file).size;
  const t0 = process.hrtime.bigint();
  sh('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'status=none']);
  return size / 1e6 / (ms(t0) / 1000);
}

function fio(file: string, seconds: number, jobs: number, sizeBytes?: number): FioFigures {
  const out = sh('fio', [
    '--name=r',
    `--filename=${file}`,
    '--rw=randread',
    '--bs=4k',
    '--direct=1',
    '--ioengine=psync',
    `--numjobs=${jobs}`,
    '--group_reporting',
    `--runtime=${seconds}`,
    '--time_based',
    ...(sizeBytes !== undefined ? [`--size=${sizeBytes}`] : []),
    '--output-format=json',
  ]);
  const job = (
    JSON.parse(out) as {
      jobs: { read: { iops: number; clat_ns: { mean: number; percentile: Record<string, number> } } }[];
    }
  ).jobs[0]!;
  return {
    iops: Math.round(job.read.iops),
    p99LatencyUs: Math.round((job.read.clat_ns.percentile['99.000000'] ?? NaN) / 1000),
    meanLatencyUs: Math.round(job.read.clat_ns.mean / 1000),
  };
}

/** A raw file of `mib` MiB whose 4 KiB pages are half random, half zeros (unique, ~2x zstd). */
export function writeHalfRandom(file: string, mib: number, seed: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    for (let i = 0; i < mib; i += 16) {
      const n = Math.min(16, mib - i);
      const b = randomBuffer(seed * 1000003 + i, n * MiB);
      for (let p = 2048; p < b.length; p += 4096) b.fill(0, p, p + 2048);
      fs.writeSync(fd, b, 0, b.length, i * MiB);
    }
  } finally {
    fs.closeSync(fd);
  }
}

class Mounts {
  private readonly live = new Set<string>();
  constructor(private readonly work: string) {}
  /** `bkfs mount` in the background; returns the mount point and the command's wall time. */
  async mount(repo: string, ref: string | null, name: string): Promise<{ mp: string; ms: number }> {
    const mp = path.join(this.work, name);
    fs.mkdirSync(mp, { recursive: true });
    const t0 = process.hrtime.bigint();
    await bkfsOk(['-r', repo, 'mount', ...(ref ? [ref] : ['--all']), mp]);
    const took = ms(t0);
    this.live.add(mp);
    return { mp, ms: took };
  }
  async umount(mp: string): Promise<void> {
    const r = await bkfs(['umount', mp]);
    if (r.code !== 0) await bkfs(['umount', '--lazy', mp]);
    this.live.delete(mp);
  }
  async all(): Promise<void> {
    for (const mp of [...this.live]) {
      await this.umount(mp);
      if (mountAt(mp)) await run('fusermount', ['-u', '-z', mp], { allowFail: true });
    }
  }
}

/** Open + read 4 KiB at `offset`: ms from call to data. */
function firstByte(file: string, offset: number): number {
  const t0 = process.hrtime.bigint();
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(4096);
    fs.readSync(fd, b, 0, 4096, offset);
  } finally {
    fs.closeSync(fd);
  }
  return ms(t0);
}

export async function runMountBench(o: MountBenchOptions = {}): Promise<MountBenchResult> {
  const log = o.log ?? (() => undefined);
  const sizeMiB = o.sizeMiB ?? 1536;
  const depth = o.chainDepth ?? 30;
  const sparseGiB = o.sparseGiB ?? 100;
  const fioSeconds = o.fioSeconds ?? 10;
  const work = o.workDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-mount-bench-'));
  fs.mkdirSync(work, { recursive: true });
  const savedRunDir = process.env.BKFS_RUN_DIR;
  process.env.BKFS_RUN_DIR = path.join(work, 'run');
  const mounts = new Mounts(work);
  try {
    // 1. Sequential and random reads.
    log(`building a ${sizeMiB} MiB data image`);
    const raw = path.join(work, 'data.raw');
    writeHalfRandom(raw, sizeMiB, 1);
    const img = path.join(work, 'data.qcow2');
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
    const repo = path.join(work, 'repo');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);

    log('sequential dd, cold');
    dropCaches();
    const rawColdMBps = ddRate(raw);
    let m = await mounts.mount(repo, 'vm', 'seq');
    const disk = path.join(m.mp, 'vda.raw');
    dropCaches();
    const mountColdMBps = ddRate(disk);
    const mountWarmMBps = ddRate(disk);
    await mounts.umount(m.mp);
    log('sequential dd, cold, fuse-native in-memory ceiling');
    const [fuseCeilingColdMBps] = await fuseCeilingMBps(sizeMiB, 1, work);

    log('fio random 4 KiB');
    m = await mounts.mount(repo, 'vm', 'fio');
    const fdisk = path.join(m.mp, 'vda.raw');
    dropCaches();
    const wholeDiskQd1 = fio(fdisk, fioSeconds, 1);
    const wholeDisk8Jobs = fio(fdisk, fioSeconds, 8);
    const cachedRegionQd1 = fio(fdisk, fioSeconds, 1, 128 * MiB);
    await mounts.umount(m.mp);
    dropCaches();
    const rawFileQd1 = fio(raw, fioSeconds, 1);
    fs.rmSync(raw);

    // 2. A large sparse disk.
    log(`building a ${sparseGiB} GiB sparse disk with ~1 GiB of data`);
    const sraw = path.join(work, 'sparse.raw');
    fs.writeFileSync(sraw, '');
    fs.truncateSync(sraw, sparseGiB * GiB);
    const pieces = 64;
    const stride = Math.floor((sparseGiB * GiB) / pieces / MiB) * MiB;
    {
      const fd = fs.openSync(sraw, 'r+');
      try {
        for (let i = 0; i < pieces; i++)
          fs.writeSync(fd, randomBuffer(500 + i, 16 * MiB), 0, 16 * MiB, i * stride);
      } finally {
        fs.closeSync(fd);
      }
    }
    const simg = path.join(work, 'sparse.qcow2');
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', sraw, simg]);
    fs.rmSync(sraw);
    await bkfsOk(['-r', repo, 'backup', 'big', '--disk', `vda=${simg}`, '--level', 'full']);
    dropCaches();
    m = await mounts.mount(repo, 'big', 'sparse');
    const sparse = {
      virtualGiB: sparseGiB,
      dataMiB: pieces * 16,
      mountMs: Math.round(m.ms),
      firstByteMs: Math.round(firstByte(path.join(m.mp, 'vda.raw'), 37 * stride + 5 * MiB) * 100) / 100,
    };
    await mounts.umount(m.mp);

    // 3. Chain depth.
    log(`building a ${depth}-deep incremental chain`);
    const craw = path.join(work, 'chain.raw');
    writeHalfRandom(craw, 256, 2);
    fs.truncateSync(craw, 512 * MiB);
    const cimg = path.join(work, 'chain.qcow2');
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', craw, cimg]);
    fs.rmSync(craw);
    const patch = path.join(work, 'patch.bin');
    await bkfsOk(['-r', repo, 'backup', 'chain', '--disk', `vda=${cimg}`, '--level', 'full']);
    for (let c = 2; c <= depth; c++) {
      fs.writeFileSync(patch, randomBuffer(9000 + c, 64 * 1024));
      const cmds: string[] = [];
      for (let k = 0; k < 64; k++) {
        const off = (((c * 7919 + k * 104729) % 8191) * 64 * 1024) % (500 * MiB);
        cmds.push(`write -s ${patch} ${off} 65536`);
      }
      await qemuIo(cimg, 'qcow2', ...cmds);
      await bkfsOk(['-r', repo, 'backup', 'chain', '--disk', `vda=${cimg}`, '--level', 'inc']);
    }
    const chainPoint = async (ref: string, name: string) => {
      dropCaches();
      const mm = await mounts.mount(repo, ref, name);
      const f = path.join(mm.mp, 'vda.raw');
      const fb = firstByte(f, 100 * MiB + 12345);
      dropCaches();
      const rate = ddRate(f);
      await mounts.umount(mm.mp);
      return {
        mountMs: Math.round(mm.ms),
        firstByteMs: Math.round(fb * 100) / 100,
        coldMBps: Math.round(rate),
      };
    };
    const chain = {
      depth,
      first: await chainPoint('chain@check1', 'chain1'),
      last: await chainPoint(`chain@check${depth}`, `chain${depth}`),
    };

    return {
      machine: { cpus: os.cpus().length, node: process.version, kernel: os.release() },
      dataMiB: sizeMiB,
      sequential: {
        mountColdMBps: Math.round(mountColdMBps),
        rawFileColdMBps: Math.round(rawColdMBps),
        mountWarmMBps: Math.round(mountWarmMBps),
        fuseCeilingColdMBps: Math.round(fuseCeilingColdMBps ?? 0),
      },
      random4k: { wholeDiskQd1, wholeDisk8Jobs, cachedRegionQd1, rawFileQd1 },
      sparse,
      chain,
    };
  } finally {
    await mounts.all();
    if (savedRunDir === undefined) delete process.env.BKFS_RUN_DIR;
    else process.env.BKFS_RUN_DIR = savedRunDir;
    if (!o.keep && o.workDir === undefined) fs.rmSync(work, { recursive: true, force: true });
  }
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function main(): Promise<void> {
  const num = (n: string) => (arg(n) === undefined ? undefined : Number(arg(n)));
  const opts: MountBenchOptions = {
    log: (l) => console.error(`mount-read: ${l}`),
    keep: process.argv.includes('--keep'),
  };
  const sizeMiB = num('size-mib');
  const chainDepth = num('chain-depth');
  const sparseGiB = num('sparse-gib');
  const fioSeconds = num('fio-seconds');
  const workDir = arg('work');
  if (sizeMiB !== undefined) opts.sizeMiB = sizeMiB;
  if (chainDepth !== undefined) opts.chainDepth = chainDepth;
  if (sparseGiB !== undefined) opts.sparseGiB = sparseGiB;
  if (fioSeconds !== undefined) opts.fioSeconds = fioSeconds;
  if (workDir !== undefined) opts.workDir = workDir;
  const r = await runMountBench(opts);
  if (process.argv.includes('--json')) {
    console.log(JSON.stringify(r, null, 2));
    return;
  }
  const f = (x: FioFigures) => `${x.iops} IOPS, mean ${x.meanLatencyUs} us, p99 ${x.p99LatencyUs} us`;
  console.log(
    `bkfs mount read benchmark (${r.machine.cpus} CPUs, node ${r.machine.node}, ${r.dataMiB} MiB of data)`,
  );
  console.log(
    `sequential dd bs=1M, page cache dropped: mount ${r.sequential.mountColdMBps} MB/s, raw file ${r.sequential.rawFileColdMBps} MB/s; warm re-read ${r.sequential.mountWarmMBps} MB/s; fuse-native in-memory ceiling ${r.sequential.fuseCeilingColdMBps} MB/s (mount ${(r.sequential.mountColdMBps / r.sequential.fuseCeilingColdMBps).toFixed(2)}x)`,
  );
  console.log(`random 4 KiB (fio, O_DIRECT): whole disk QD1 ${f(r.random4k.wholeDiskQd1)}`);
  console.log(`                              whole disk 8 jobs ${f(r.random4k.wholeDisk8Jobs)}`);
  console.log(
    `                              128 MiB region (cached chunks) QD1 ${f(r.random4k.cachedRegionQd1)}`,
  );
  console.log(`                              raw file QD1 ${f(r.random4k.rawFileQd1)}`);
  console.log(
    `sparse ${r.sparse.virtualGiB} GiB disk (${r.sparse.dataMiB} MiB data): bkfs mount ${r.sparse.mountMs} ms, then first 4 KiB in ${r.sparse.firstByteMs} ms`,
  );
  for (const [k, v] of [
    ['checkpoint 1', r.chain.first],
    [`checkpoint ${r.chain.depth}`, r.chain.last],
  ] as const) {
    console.log(
      `chain ${k}: bkfs mount ${v.mountMs} ms, first 4 KiB ${v.firstByteMs} ms, cold dd ${v.coldMBps} MB/s`,
    );
  }
}

if (require.main === module) {
  main().catch((e: unknown) => {
    console.error(`mount-read: ${(e as Error).stack ?? String(e)}`);
    process.exitCode = 1;
  });
}
