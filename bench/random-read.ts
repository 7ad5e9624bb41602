/**
 * Random and sequential reads of one disk through every route (issue 14 §3, issue 16), in one run,
 * page cache dropped and a fresh server or mount before every measurement (not part of the tests;
 * needs root for drop_caches and FUSE).
 *
 *   node dist/bench/random-read.js [--small] [--size-mib 1024] [--chain-depth 8] [--fio-secs 8] [--runs 3]
 *                                  [--only mount,serve,...] [--warm-store] [--work DIR] [--keep] [--json]
 *
 * `--small`: what `bench/run --small` runs (512 MiB, 3 overlays, fio 5 s, 1 run); options after it
 * still apply.
 *
 * The disk: a qcow2 of `size-mib` MiB whose 4 KiB pages are half random, half zeros (~2x zstd, no
 * dedup), then `chain-depth` qcow2 overlays each rewriting 64 x 64 KiB at random places. bkfs backs
 * up the top of the chain twice (a full each): repository "frames" as this bkfs writes (codec 2,
 * 32 KiB frames) and repository "single" with `BKFS_FRAME_SIZE=0` (one zstd frame per chunk, as
 * formats 1-2 wrote), so the same run shows what the frames change and what the rest of the read
 * path does. Routes, each with fio 4 KiB randread over the whole disk, QD1 (psync, or the nbd engine
 * with iodepth 1) and QD16 (libaio iodepth 16 with O_DIRECT, or the nbd engine with iodepth 16):
 *   raw        the flat raw file (qemu-img convert of the chain), O_DIRECT
 *   qcow2      the qcow2 chain served by `qemu-nbd -r` (fio's nbd engine, one connection)
 *   serve      `bkfs serve` of the frames repository (fio's nbd engine, one connection)
 *   mount      `bkfs mount` of the frames repository, /mnt/vda.raw with O_DIRECT
 *   mount-v2   `bkfs mount` of the single-frame repository
 * plus cold sequential `dd bs=1M` of the mounts against the fuse-native in-memory ceiling
 * (bench/fuse-ceiling.ts) and a warm re-read. Figures are medians of `runs` rounds; the order of
 * the routes is the same in every round. `--warm-store` keeps the page cache (packs and images
 * cached, servers and mounts still fresh): the CPU cost of each route without the storage.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../test/helpers/cli';
import { randomBuffer } from '../test/helpers/images';
import { fuseCeilingMBps } from './fuse-ceiling';
import { writeHalfRandom } from './mount-read';
import { readState } from '../src/fuse/state';

const MiB = 1 << 20;

export interface FioRow {
  iops: number;
  p99Us: number;
  meanUs: number;
  /** CPU time (user + sys) of the serving process per read, in µs: the cost that does not depend on the machine's load. */
  cpuUsPerRead?: number;
}

/** user + sys CPU seconds of a process (/proc/PID/stat fields 14 and 15, in clock ticks of 10 ms). */
function cpuSeconds(pid: number): number {
  const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** fio while measuring the CPU time `pid` spends. */
function fioCpu(
  pid: number | undefined,
  target: { file: string } | { uri: string },
  secs: number,
  qd: number,
): FioRow {
  const c0 = pid !== undefined ? cpuSeconds(pid) : 0;
  const row = fio(target, secs, qd);
  if (pid !== undefined && row.iops > 0) {
    row.cpuUsPerRead = Math.round(((cpuSeconds(pid) - c0) * 1e6) / (row.iops * secs));
  }
  return row;
}

export interface RandomReadResult {
  machine: { cpus: number; node: string; kernel: string; load: number[] };
  sizeMiB: number;
  chainDepth: number;
  fioSecs: number;
  runs: number;
  /** route -> { qd1, qd16 }: medians over the runs (p99 and mean: of the run with the median IOPS). */
  random4k: Record<
    string,
    { qd1: FioRow; qd16: FioRow; all: { qd1: number[]; qd16: number[] }; cpuUsPerRead: number | null }
  >;
  sequential: Record<string, { coldMBps: number; warmMBps: number; all: number[] }>;
  fuseCeilingMBps: number;
  storedBytes: Record<string, number>;
}

function sh(cmd: string, args: string[], env?: NodeJS.ProcessEnv): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB, env: { ...process.env, ...env } });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

function dropCaches(): void {
  sh('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

function fio(target: { file: string } | { uri: string }, secs: number, qd: number): FioRow {
  const common = [
    '--name=r',
    '--rw=randread',
    '--bs=4k',
    `--runtime=${secs}`,
    '--time_based',
    '--output-format=json',
  ];
  const args =
    'file' in target
      ? [
          `--filename=${target.file}`,
          '--direct=1',
          ...(qd === 1 ? ['--ioengine=psync'] : ['--ioengine=libaio', `--iodepth=${qd}`]),
        ]
      : ['--ioengine=nbd', `--uri=${target.uri}`, `--iodepth=${qd}`];
  const out = sh('fio', [...common, ...args]);
  const job = (
    JSON.parse(out.slice(out.indexOf('{'))) as {
      jobs: { read: { iops: number; clat_ns: { mean: number; percentile: Record<string, number> } } }[];
    }
  ).jobs[0]!;
  return {
    iops: Math.round(job.read.iops),
    p99Us: Math.round((job.read.clat_ns.percentile['99.000000'] ?? NaN) / 1000),
    meanUs: Math.round(job.read.clat_ns.mean / 1000),
  };
}

const msSince = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e6;

function ddRate(file: string): number {
  const size = fs.statSync(file).size;
  const t0 = process.hrtime.bigint();
  sh('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'status=none']);
  return size / 1e6 / (msSince(t0) / 1000);
}

async function waitFor(file: string, ms: number): Promise<void> {
  const until = Date.now() + ms;
  while (!fs.existsSync(file)) {
    if (Date.now() > until) throw new Error(`${file} did not appear`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A foreground server process (qemu-nbd or bkfs serve) on a Unix socket; stopped with SIGTERM. */
async function withServer<T>(
  cmd: string,
  args: string[],
  sock: string,
  fn: (pid: number | undefined) => T,
): Promise<T> {
  fs.rmSync(sock, { force: true });
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((r) => child.on('exit', () => r()));
  try {
    await Promise.race([
      waitFor(sock, 30000),
      exited.then(() => {
        throw new Error(`${cmd} exited: ${err}`);
      }),
    ]);
    return fn(child.pid);
  } finally {
    child.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 10000))]);
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

async function withMount<T>(
  repo: string,
  mp: string,
  fn: (disk: string, pid: number | undefined) => T,
): Promise<T> {
  fs.mkdirSync(mp, { recursive: true });
  await bkfsOk(['-r', repo, 'mount', 'vm', mp]);
  try {
    return fn(path.join(mp, 'vda.raw'), readState(mp)?.pid);
  } finally {
    const r = await bkfs(['umount', mp]);
    if (r.code !== 0) await bkfs(['umount', '--lazy', mp]);
  }
}

export interface RandomReadOptions {
  sizeMiB?: number;
  chainDepth?: number;
  fioSecs?: number;
  runs?: number;
  only?: string[];
  /** Do not drop the page cache (packs and images stay cached): the CPU path alone. */
  warmStore?: boolean;
  workDir?: string;
  keep?: boolean;
  log?: (l: string) => void;
}

export async function runRandomRead(o: RandomReadOptions = {}): Promise<RandomReadResult> {
  const log = o.log ?? (() => undefined);
  const sizeMiB = o.sizeMiB ?? 1024;
  const depth = o.chainDepth ?? 8;
  const secs = o.fioSecs ?? 8;
  const runs = o.runs ?? 3;
  const want = (r: string) => !o.only || o.only.includes(r);
  const work = o.workDir ?? fs.mkdtempSync(path.join('/var/tmp', 'bkfs-random-read-'));
  fs.mkdirSync(work, { recursive: true });
  const savedRunDir = process.env.BKFS_RUN_DIR;
  process.env.BKFS_RUN_DIR = path.join(work, 'run');
  try {
    log(`building a ${sizeMiB} MiB disk and a ${depth}-overlay qcow2 chain`);
    const base = path.join(work, 'base.raw');
    writeHalfRandom(base, sizeMiB, 7);
    let top = path.join(work, 'c0.qcow2');
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', base, top]);
    fs.rmSync(base);
    const patch = path.join(work, 'patch.bin');
    for (let c = 1; c <= depth; c++) {
      const next = path.join(work, `c${c}.qcow2`);
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', top, next]);
      fs.writeFileSync(patch, randomBuffer(7000 + c, 64 * 1024));
      const cmds: string[] = [];
      for (let k = 0; k < 64; k++) {
        const off = ((c * 7919 + k * 104729) % Math.floor((sizeMiB * MiB) / 65536)) * 65536;
        cmds.push(`write -s ${patch} ${off} 65536`);
      }
      await qemuIo(next, 'qcow2', ...cmds);
      top = next;
    }
    const flat = path.join(work, 'flat.raw');
    sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, flat]);
    const repos: Record<string, string> = {
      frames: path.join(work, 'repo-frames'),
      single: path.join(work, 'repo-single'),
    };
    const storedBytes: Record<string, number> = {};
    for (const [k, repo] of Object.entries(repos)) {
      log(`backing up the chain into the ${k} repository`);
      const env = k === 'single' ? { BKFS_FRAME_SIZE: '0' } : {};
      await bkfsOk(['-r', repo, 'init'], env);
      await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=qcow2:${top}`, '--level', 'full'], env);
      storedBytes[k] = Number(sh('du', ['-sb', path.join(repo, 'packs')]).split('\t')[0]);
    }
    const bin = path.resolve(__dirname, '../../bin/bkfs');
    const routes: [string, (qd: number) => Promise<FioRow>][] = [
      ['raw', async (qd) => fio({ file: flat }, secs, qd)],
      [
        'qcow2',
        async (qd) => {
          const sock = path.join(work, 'qemu.sock');
          return withServer(
            'qemu-nbd',
            ['-r', '-t', '-f', 'qcow2', '-k', sock, '-x', 'vda', '-e', '4', top],
            sock,
            (pid) => fioCpu(pid, { uri: `nbd+unix:///vda?socket=${sock}` }, secs, qd),
          );
        },
      ],
      [
        'serve',
        async (qd) => {
          const sock = path.join(work, 'bkfs.sock');
          return withServer(
            bin,
            ['-r', repos.frames!, 'serve', 'vm', '--listen', `unix:${sock}`, '--foreground'],
            sock,
            (pid) => fioCpu(pid, { uri: `nbd+unix:///vda?socket=${sock}` }, secs, qd),
          );
        },
      ],
      [
        'mount',
        (qd) =>
          withMount(repos.frames!, path.join(work, 'mnt'), (f, pid) => fioCpu(pid, { file: f }, secs, qd)),
      ],
      [
        'mount-v2',
        (qd) =>
          withMount(repos.single!, path.join(work, 'mnt'), (f, pid) => fioCpu(pid, { file: f }, secs, qd)),
      ],
    ];
    const rnd: Record<string, { qd1: FioRow[]; qd16: FioRow[] }> = {};
    const seq: Record<string, { cold: number[]; warm: number[] }> = {};
    const ceiling: number[] = [];
    for (let r = 0; r < runs; r++) {
      for (const [name, f] of routes) {
        if (!want(name)) continue;
        for (const qd of [1, 16]) {
          if (!o.warmStore) dropCaches();
          const row = await f(qd);
          log(
            `run ${r + 1} ${name} QD${qd}: ${row.iops} IOPS, p99 ${row.p99Us} us, server CPU ${row.cpuUsPerRead ?? '-'} us/read`,
          );
          const slot = (rnd[name] ??= { qd1: [], qd16: [] });
          (qd === 1 ? slot.qd1 : slot.qd16).push(row);
        }
      }
      for (const k of ['mount', 'mount-v2']) {
        if (!want(k) || !want('seq')) continue;
        const repo = k === 'mount' ? repos.frames! : repos.single!;
        await withMount(repo, path.join(work, 'mnt'), (disk) => {
          dropCaches();
          const cold = ddRate(disk);
          const warm = ddRate(disk);
          const slot = (seq[k] ??= { cold: [], warm: [] });
          slot.cold.push(cold);
          slot.warm.push(warm);
          log(`run ${r + 1} ${k} sequential: cold ${cold.toFixed(0)} MB/s, warm ${warm.toFixed(0)} MB/s`);
        });
      }
      if (want('seq')) {
        const [c] = await fuseCeilingMBps(sizeMiB, 1, work);
        ceiling.push(c ?? 0);
        log(`run ${r + 1} fuse-native ceiling: ${(c ?? 0).toFixed(0)} MB/s`);
      }
    }
    const pick = (rows: FioRow[]): FioRow => {
      const m = median(rows.map((x) => x.iops));
      return rows.find((x) => x.iops === m)!;
    };
    const random4k: RandomReadResult['random4k'] = {};
    for (const [k, v] of Object.entries(rnd)) {
      random4k[k] = {
        qd1: pick(v.qd1),
        qd16: pick(v.qd16),
        all: { qd1: v.qd1.map((x) => x.iops), qd16: v.qd16.map((x) => x.iops) },
        cpuUsPerRead:
          v.qd1[0]?.cpuUsPerRead === undefined
            ? null
            : median([...v.qd1, ...v.qd16].map((x) => x.cpuUsPerRead ?? NaN)),
      };
    }
    const sequential: RandomReadResult['sequential'] = {};
    for (const [k, v] of Object.entries(seq)) {
      sequential[k] = {
        coldMBps: Math.round(median(v.cold)),
        warmMBps: Math.round(median(v.warm)),
        all: v.cold.map(Math.round),
      };
    }
    return {
      machine: { cpus: os.cpus().length, node: process.version, kernel: os.release(), load: os.loadavg() },
      sizeMiB,
      chainDepth: depth,
      fioSecs: secs,
      runs,
      random4k,
      sequential,
      fuseCeilingMBps: ceiling.length ? Math.round(median(ceiling)) : 0,
      storedBytes,
    };
  } finally {
    if (savedRunDir === undefined) delete process.env.BKFS_RUN_DIR;
    else process.env.BKFS_RUN_DIR = savedRunDir;
    if (!o.keep && o.workDir === undefined) fs.rmSync(work, { recursive: true, force: true });
  }
}

/** The markdown section bench/report.ts appends. */
export function renderRandomRead(r: RandomReadResult): string {
  const qc = r.random4k.qcow2;
  const x = (a: number, b: number | undefined): string => (b ? `${(a / b).toFixed(2)}x` : 'n/a');
  const lines = [
    `## Random 4 KiB reads (fio randread, cold page cache, ${r.sizeMiB} MiB disk, median of ${r.runs})`,
    '',
    'Routes: `raw` = the flat raw file (O_DIRECT); `qcow2` = the qcow2 chain of ' +
      `${r.chainDepth + 1} images through \`qemu-nbd -r\` (fio's nbd engine); \`serve\` = \`bkfs serve\` (nbd engine); ` +
      '`mount` = `bkfs mount`, /mnt/vda.raw (O_DIRECT); `mount-v2` = the same with single-frame chunks (formats 1-2). ' +
      'QD16: libaio iodepth 16, or the nbd engine with 16 requests in flight on one connection. ' +
      'CPU: user+sys of the serving process per read (median of all runs).',
    '',
    '| route | QD1 IOPS | QD1 p99 µs | QD1 vs qcow2 | QD16 IOPS | QD16 p99 µs | QD16 vs qcow2 | CPU µs/read |',
    '| ----- | -------: | ---------: | -----------: | --------: | ----------: | ------------: | ----------: |',
  ];
  for (const [k, v] of Object.entries(r.random4k)) {
    lines.push(
      `| ${k} | ${v.qd1.iops} | ${v.qd1.p99Us} | ${x(v.qd1.iops, qc?.qd1.iops)} | ${v.qd16.iops} | ${v.qd16.p99Us} | ${x(v.qd16.iops, qc?.qd16.iops)} | ${v.cpuUsPerRead ?? 'n/a'} |`,
    );
  }
  if (Object.keys(r.sequential).length) {
    lines.push(
      '',
      `Sequential \`dd bs=1M\` of the mount, cold: fuse-native in-memory ceiling ${r.fuseCeilingMBps} MB/s.`,
      '',
    );
    lines.push(
      '| route | cold MB/s | vs ceiling | warm MB/s |',
      '| ----- | --------: | ---------: | --------: |',
    );
    for (const [k, v] of Object.entries(r.sequential)) {
      lines.push(`| ${k} | ${v.coldMBps} | ${x(v.coldMBps, r.fuseCeilingMBps)} | ${v.warmMBps} |`);
    }
  }
  lines.push(
    '',
    `Load average during the run: ${r.machine.load.map((l) => l.toFixed(1)).join(' ')} on ${r.machine.cpus} CPUs.`,
    '',
  );
  return lines.join('\n');
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function main(): Promise<void> {
  const num = (n: string) => (arg(n) === undefined ? undefined : Number(arg(n)));
  const opts: RandomReadOptions = {
    log: (l) => console.error(`random-read: ${l}`),
    keep: process.argv.includes('--keep'),
  };
  if (process.argv.includes('--small'))
    Object.assign(opts, { sizeMiB: 512, chainDepth: 3, fioSecs: 5, runs: 1 });
  if (num('size-mib') !== undefined) opts.sizeMiB = num('size-mib')!;
  if (num('chain-depth') !== undefined) opts.chainDepth = num('chain-depth')!;
  if (num('fio-secs') !== undefined) opts.fioSecs = num('fio-secs')!;
  if (num('runs') !== undefined) opts.runs = num('runs')!;
  if (arg('only') !== undefined) opts.only = arg('only')!.split(',');
  if (arg('work') !== undefined) opts.workDir = arg('work')!;
  if (process.argv.includes('--warm-store')) opts.warmStore = true;
  const r = await runRandomRead(opts);
  if (process.argv.includes('--json')) {
    console.log(JSON.stringify(r, null, 2));
    return;
  }
  console.log(
    `random 4 KiB reads, ${process.argv.includes('--warm-store') ? 'page cache kept (--warm-store)' : 'cold'}, ${r.sizeMiB} MiB disk, qcow2 chain of ${r.chainDepth + 1}, fio ${r.fioSecs} s, median of ${r.runs} (load ${r.machine.load.map((x) => x.toFixed(1)).join(' ')})`,
  );
  const qc = r.random4k.qcow2;
  for (const [k, v] of Object.entries(r.random4k)) {
    const ratio = (a: number, b: number | undefined) => (b ? ` (${(a / b).toFixed(2)}x qcow2)` : '');
    console.log(
      `  ${k.padEnd(9)} QD1 ${String(v.qd1.iops).padStart(6)} IOPS p99 ${String(v.qd1.p99Us).padStart(5)} us${ratio(v.qd1.iops, qc?.qd1.iops)}   QD16 ${String(v.qd16.iops).padStart(6)} IOPS p99 ${String(v.qd16.p99Us).padStart(5)} us${ratio(v.qd16.iops, qc?.qd16.iops)}   CPU ${v.cpuUsPerRead ?? '-'} us/read   [${v.all.qd1.join(', ')} | ${v.all.qd16.join(', ')}]`,
    );
  }
  for (const [k, v] of Object.entries(r.sequential)) {
    console.log(
      `  ${k.padEnd(9)} sequential cold ${v.coldMBps} MB/s (${(v.coldMBps / r.fuseCeilingMBps).toFixed(2)}x fuse-native ceiling ${r.fuseCeilingMBps} MB/s) [${v.all.join(', ')}], warm ${v.warmMBps} MB/s`,
    );
  }
  console.log(
    `  stored: ${Object.entries(r.storedBytes)
      .map(([k, v]) => `${k} ${(v / MiB).toFixed(1)} MiB`)
      .join(', ')}`,
  );
}

if (require.main === module) {
  main().catch((e: unknown) => {
    console.error(`random-read: ${(e as Error).stack ?? String(e)}`);
    process.exitCode = 1;
  });
}
