/**
 * Benchmark: restore speed of bkfs against `qemu-img convert` of a qcow2 chain of the same state.
 *
 *   node dist/bench/restore.js [--size-mib 1536] [--depth 30] [--runs 5] [--dir /var/tmp]
 *                              [--out-dir /dev/shm] [--cold]
 *
 * Builds (in a temp dir) a qcow2 disk of `size-mib` with half of it data (1 MiB extents every
 * 2 MiB, alternately random and text-like), backs it up (full), then `depth - 1` incrementals,
 * each after qemu-io wrote a few MiB of scattered changes (data, zeros). The same final state is
 * exported with `bkfs export --format qcow2-chain` (one qcow2 layer per checkpoint, `depth` deep).
 * Then `runs` rounds (default 5) over all of these, interleaved so that load from other processes
 * spreads evenly (median, best run and median CPU seconds of the tool's process tree reported):
 *   - bkfs restore to a sparse raw file at the last checkpoint and at checkpoint 1;
 *   - bkfs restore to qcow2 at the last checkpoint; incremental restore check1 -> last;
 *   - qemu-img convert -O raw of the chain's top layer (`depth` deep) and of layer 1;
 *   - qemu-img convert -O raw of the flat source image (one qcow2, same state as the last);
 *   - qemu-img convert -O qcow2 of the chain's top layer.
 * Each timing includes an fsync of the output (bkfs fsyncs before renaming; qemu-img convert's
 * default cache mode does not), so both are charged for getting the data to disk. Warm page
 * cache unless --cold (then caches are dropped before every timed run; needs root). --out-dir
 * /dev/shm times the tools without the disk's write-back.
 * Results are checked: every restored and converted image equals the source (qemu-img compare).
 *
 * `benchRestore(opts)` returns the figures as JSON for the cross-tool runner; run standalone it
 * prints them.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBuffer, textFile } from '../test/helpers/images';

const MiB = 1024 * 1024;
const BKFS = path.resolve(__dirname, '../../bin/bkfs');

export interface RestoreBenchOptions {
  sizeMiB?: number;
  depth?: number;
  runs?: number;
  /** Parent of the temp work directory. */
  dir?: string;
  /** Where restored/converted outputs go (default: the work directory); e.g. /dev/shm to time
   * the tools without the disk's write-back noise. */
  outDir?: string;
  cold?: boolean;
  log?: (msg: string) => void;
}

export interface Timing {
  /** Median seconds. */
  seconds: number;
  /** Fastest run (the tool's own speed when the machine is shared). */
  best: number;
  /** Virtual disk bytes per second (MB/s, 10^6). */
  mbps: number;
  /** Data bytes per second (MB/s) where the data volume is known. */
  dataMbps?: number;
  /** Median CPU seconds (user + system) of the tool's process (GNU time); NaN without it. */
  cpuSeconds: number;
  all: number[];
}

export interface RestoreBenchResult {
  sizeBytes: number;
  dataBytes: number;
  depth: number;
  runs: number;
  cold: boolean;
  outDir: string | null;
  setupSeconds: number;
  timings: Record<string, Timing>;
}

function sh(cmd: string, args: string[], input?: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

const GNU_TIME = '/usr/bin/time';
/** CPU seconds (user + system) of the commands run by `timed` since the last reset. */
let cpuSeconds = 0;

/** `sh` under GNU time (when installed), adding the command's CPU time to `cpuSeconds`. */
function timed(cmd: string, args: string[]): void {
  if (!fs.existsSync(GNU_TIME)) {
    sh(cmd, args);
    cpuSeconds = NaN;
    return;
  }
  const f = path.join(os.tmpdir(), `bkfs-bench-time-${process.pid}`);
  try {
    sh(GNU_TIME, ['-f', '%U %S', '-o', f, cmd, ...args]);
    const [u, sy] = fs.readFileSync(f, 'utf8').trim().split(/\s+/).slice(-2).map(Number);
    cpuSeconds += (u ?? NaN) + (sy ?? NaN);
  } finally {
    fs.rmSync(f, { force: true });
  }
}

function dropCaches(): void {
  sh('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

export async function benchRestore(o: RestoreBenchOptions = {}): Promise<RestoreBenchResult> {
  const sizeMiB = o.sizeMiB ?? 1536;
  const depth = o.depth ?? 30;
  const runs = o.runs ?? 5;
  const log = o.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  const size = sizeMiB * MiB;
  const work = fs.mkdtempSync(path.join(o.dir ?? os.tmpdir(), 'bkfs-bench-restore-'));
  const repo = path.join(work, 'repo');
  const src = path.join(work, 'src.qcow2');
  const bk = (...args: string[]) => sh(process.execPath, [BKFS, '-r', repo, ...args]);
  const tbk = (...args: string[]) => timed(process.execPath, [BKFS, '-r', repo, ...args]);
  const cleanup: (() => void)[] = [() => fs.rmSync(work, { recursive: true, force: true })];
  try {
    const t0 = Date.now();
    // Source: half data, in 1 MiB extents every 2 MiB, alternately incompressible and text.
    log(`building a ${sizeMiB} MiB disk, half data`);
    const raw = path.join(work, 'src.raw');
    const fd = fs.openSync(raw, 'w');
    fs.ftruncateSync(fd, size);
    const text = textFile(1, MiB).subarray(0, MiB);
    let dataBytes = 0;
    for (let off = 0, i = 0; off + MiB <= size; off += 2 * MiB, i++) {
      const buf = i % 2 === 0 ? randomBuffer(1000 + i, MiB) : text;
      fs.writeSync(fd, buf, 0, MiB, off);
      dataBytes += MiB;
    }
    fs.closeSync(fd);
    sh('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, src]);
    fs.rmSync(raw);
    bk('init');
    bk('backup', 'vm', '--disk', `vda=${src}`, '--level', 'full');
    const chg = path.join(work, 'chg.bin');
    for (let c = 2; c <= depth; c++) {
      fs.writeFileSync(chg, randomBuffer(5000 + c, MiB));
      const cmds: string[] = [];
      for (let k = 0; k < 8; k++) {
        const at = (((c * 7919 + k * 104729) % (sizeMiB - 2)) + 0.25) * MiB;
        cmds.push('-c', `write -s ${chg} ${Math.floor(at)} ${MiB / 2}`);
      }
      cmds.push('-c', `write -z ${(((c * 31) % (sizeMiB - 1)) * MiB).toString()} ${MiB}`);
      sh('qemu-io', ['-f', 'qcow2', ...cmds, src]);
      bk('backup', 'vm', '--disk', `vda=${src}`, '--level', 'inc');
    }
    log(`${depth} checkpoints backed up; exporting the qcow2 chain`);
    const chain = path.join(work, 'chain');
    bk('export', `vm@check${depth}`, '--format', 'qcow2-chain', '--to', chain);
    const setupSeconds = (Date.now() - t0) / 1000;
    // The state at check1, for checking restores of it.
    const ref1 = path.join(chain, 'vda', 'check1.qcow2');
    const top = path.join(chain, 'vda', `check${depth}.qcow2`);

    const outDir = o.outDir !== undefined ? fs.mkdtempSync(path.join(o.outDir, 'bkfs-bench-out-')) : work;
    cleanup.push(() => fs.rmSync(outDir, { recursive: true, force: true }));
    const out = path.join(outDir, 'out');
    interface Case {
      name: string;
      run: () => void;
      /** The image the output must equal. */
      check: { image: string; format: string };
      output: string;
      data?: number;
      prep?: () => void;
    }
    const rawOut = `${out}.raw`;
    const qOut = `${out}.qcow2`;
    const last = { image: src, format: 'qcow2' };
    const first = { image: ref1, format: 'qcow2' };
    // A raw file at check1, for the incremental restore to the last checkpoint.
    const incBase = path.join(work, 'inc-base.raw');
    bk('restore', 'vm@check1', '--disk', 'vda', '--to', incBase);
    const cases: Case[] = [
      {
        name: `bkfs restore raw @check${depth}`,
        run: () => tbk('restore', `vm@check${depth}`, '--disk', 'vda', '--to', rawOut),
        check: last,
        output: rawOut,
        data: dataBytes,
      },
      {
        name: `qemu-img convert chain(${depth}) -> raw`,
        run: () => timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, rawOut]),
        check: last,
        output: rawOut,
        data: dataBytes,
      },
      {
        name: 'bkfs restore raw @check1',
        run: () => tbk('restore', 'vm@check1', '--disk', 'vda', '--to', rawOut),
        check: first,
        output: rawOut,
        data: dataBytes,
      },
      {
        name: 'qemu-img convert chain(1) -> raw',
        run: () => timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', ref1, rawOut]),
        check: first,
        output: rawOut,
        data: dataBytes,
      },
      {
        name: 'qemu-img convert flat qcow2 -> raw',
        run: () => timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', src, rawOut]),
        check: last,
        output: rawOut,
        data: dataBytes,
      },
      {
        name: `bkfs restore qcow2 @check${depth}`,
        run: () => tbk('restore', `vm@check${depth}`, '--disk', 'vda', '--to', qOut),
        check: last,
        output: qOut,
        data: dataBytes,
      },
      {
        name: `qemu-img convert chain(${depth}) -> qcow2`,
        run: () => timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', top, qOut]),
        check: last,
        output: qOut,
        data: dataBytes,
      },
      {
        name: `bkfs restore --since check1 -> check${depth}`,
        run: () =>
          tbk('restore', `vm@check${depth}`, '--disk', 'vda', '--to', rawOut, '--since', 'vm@check1'),
        check: last,
        output: rawOut,
        prep: () => {
          sh('cp', ['--sparse=always', incBase, rawOut]);
          sh('sync', [rawOut]);
        },
      },
    ];
    // Rounds over all cases (not one case after another), so that load from other processes on
    // the machine spreads over every case alike.
    const all = new Map<string, number[]>(cases.map((c) => [c.name, []]));
    const cpu = new Map<string, number[]>(cases.map((c) => [c.name, []]));
    for (let r = 0; r < runs; r++) {
      for (const c of cases) {
        fs.rmSync(c.output, { recursive: true, force: true });
        c.prep?.();
        if (o.cold) dropCaches();
        const t = process.hrtime.bigint();
        cpuSeconds = 0;
        c.run();
        sh('sync', [c.output]);
        all.get(c.name)!.push(Number(process.hrtime.bigint() - t) / 1e9);
        cpu.get(c.name)!.push(cpuSeconds);
        if (r === 0) {
          const fmt = c.output.endsWith('.qcow2') ? 'qcow2' : 'raw';
          sh('qemu-img', ['compare', '-q', '-f', c.check.format, '-F', fmt, c.check.image, c.output]);
        }
      }
    }
    const timings: Record<string, Timing> = {};
    for (const c of cases) {
      const xs = all.get(c.name)!;
      const sec = median(xs);
      timings[c.name] = {
        seconds: sec,
        best: Math.min(...xs),
        mbps: size / sec / 1e6,
        ...(c.data !== undefined ? { dataMbps: c.data / sec / 1e6 } : {}),
        cpuSeconds: median(cpu.get(c.name)!),
        all: xs,
      };
      log(
        `${c.name}: ${sec.toFixed(2)} s, cpu ${timings[c.name]!.cpuSeconds.toFixed(2)} s (${xs.map((x) => x.toFixed(2)).join(' ')}), ${(size / sec / 1e6).toFixed(0)} MB/s of disk`,
      );
    }
    return {
      sizeBytes: size,
      dataBytes,
      depth,
      runs,
      cold: o.cold ?? false,
      outDir: o.outDir ?? null,
      setupSeconds,
      timings,
    };
  } finally {
    for (const c of cleanup.reverse()) c();
  }
}

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

if (require.main === module) {
  benchRestore({
    sizeMiB: Number(arg('size-mib', '1536')),
    depth: Number(arg('depth', '30')),
    runs: Number(arg('runs', '5')),
    dir: arg('dir', os.tmpdir()),
    ...(arg('out-dir', '') !== '' ? { outDir: arg('out-dir', '') } : {}),
    cold: process.argv.includes('--cold'),
  })
    .then((r) => console.log(JSON.stringify(r, null, 2)))
    .catch((e: unknown) => {
      console.error(e);
      process.exitCode = 1;
    });
}
