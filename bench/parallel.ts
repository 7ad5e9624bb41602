/**
 * Many backups into one repository (issue 12 §2): total wall time of full backups of N VMs run
 * one after another (`--parallel 1`) and with 2, 4, 8 `bkfs backup` processes at once, and gc's
 * time alone and with backups running beside it. Real processes, real qcow2 images (a shared base
 * of random data plus private random data per VM, served by qemu-nbd as `bkfs backup` does).
 * Every figure is the median of `--runs` runs, each in a fresh repository.
 *
 *   node dist/bench/parallel.js [--bkfs bin/bkfs] [--vms 8] [--size-mib 64] [--shared 0.5]
 *        [--parallel 1,2,4,8] [--runs 3] [--work DIR] [--out FILE.json]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBuffer } from '../test/helpers/images';
import { arg, MiB, sh, stat } from './lib/common';

const BKFS = path.resolve(arg('bkfs', path.join(__dirname, '../../bin/bkfs')));
const VMS = Number(arg('vms', '8'));
const SIZE_MIB = Number(arg('size-mib', '64'));
const SHARED = Number(arg('shared', '0.5'));
const RUNS = Number(arg('runs', '3'));
const LEVELS = arg('parallel', '1,2,4,8')
  .split(',')
  .map(Number)
  .filter((n) => n > 0);

async function bkfs(args: string[]): Promise<void> {
  await sh(process.execPath, [BKFS, ...args]);
}

async function makeImages(work: string): Promise<string[]> {
  const sharedMiB = Math.round(SIZE_MIB * SHARED);
  const base = randomBuffer(1, sharedMiB * MiB);
  const out: string[] = [];
  for (let i = 0; i < VMS; i++) {
    const raw = path.join(work, `vm${i}.raw`);
    const fd = fs.openSync(raw, 'w');
    try {
      fs.writeSync(fd, base, 0, base.length, 0);
      for (let off = sharedMiB; off < SIZE_MIB; off += 8) {
        const n = Math.min(8, SIZE_MIB - off) * MiB;
        fs.writeSync(fd, randomBuffer(1000 * (i + 1) + off, n), 0, n, off * MiB);
      }
    } finally {
      fs.closeSync(fd);
    }
    const img = path.join(work, `vm${i}.qcow2`);
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
    fs.rmSync(raw);
    out.push(img);
  }
  return out;
}

/** Back up every image (full) into `repo` with at most `p` processes at once; wall seconds. */
async function backupAll(repo: string, images: string[], p: number, tag: string): Promise<number> {
  const t0 = performance.now();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < images.length) {
      const i = next++;
      await bkfs([
        '-r',
        repo,
        '-q',
        'backup',
        `vm${i}`,
        '--disk',
        `vda=${images[i]}`,
        '-l',
        'full',
        '-c',
        tag,
      ]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(p, images.length) }, worker));
  return (performance.now() - t0) / 1000;
}

async function timedGc(repo: string): Promise<number> {
  const t0 = performance.now();
  await bkfs(['-r', repo, '-q', 'gc', '--max-unused', '0']);
  return (performance.now() - t0) / 1000;
}

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(arg('work', os.tmpdir()), 'bkfs-bench-parallel-'));
  try {
    const images = await makeImages(work);
    const totals: Record<string, number[]> = {};
    for (let run = 0; run < RUNS; run++) {
      for (const p of LEVELS) {
        const repo = path.join(work, `repo-p${p}-${run}`);
        await bkfs(['-r', repo, 'init']);
        const s = await backupAll(repo, images, p, 'a');
        (totals[p] ??= []).push(s);
        console.log(`run ${run + 1}/${RUNS}: ${VMS} backups, ${p} at once: ${s.toFixed(1)} s`);
        fs.rmSync(repo, { recursive: true, force: true });
      }
    }
    // gc: a repository with garbage (two fulls of every VM, the first forgotten; the second round
    // re-writes the private halves), gc alone vs gc while 4 backups of new VM names run.
    const gcAlone: number[] = [];
    const gcBeside: number[] = [];
    for (let run = 0; run < RUNS; run++) {
      const repo = path.join(work, `repo-gc-${run}`);
      await bkfs(['-r', repo, 'init']);
      await backupAll(repo, images, 4, 'a');
      for (const img of images)
        await sh('qemu-io', [
          '-f',
          'qcow2',
          '-c',
          `write -P ${run + 7} ${(SIZE_MIB / 2) | 0}M ${(SIZE_MIB / 4) | 0}M`,
          img,
        ]);
      await backupAll(repo, images, 4, 'b');
      await bkfs(['-r', repo, '-q', 'forget', '--keep-last', '1']);
      const copy = `${repo}-copy`;
      await sh('cp', ['-a', repo, copy]);
      gcAlone.push(await timedGc(repo));
      const beside = images
        .slice(0, 4)
        .map((img, i) =>
          bkfs(['-r', copy, '-q', 'backup', `other${i}`, '--disk', `vda=${img}`, '-l', 'full']),
        );
      await new Promise((r) => setTimeout(r, 500)); // the backups have started
      gcBeside.push(await timedGc(copy));
      await Promise.all(beside);
      console.log(
        `run ${run + 1}/${RUNS}: gc alone ${gcAlone[run]!.toFixed(1)} s, beside 4 backups ${gcBeside[run]!.toFixed(1)} s`,
      );
      fs.rmSync(repo, { recursive: true, force: true });
      fs.rmSync(copy, { recursive: true, force: true });
    }
    const med = (xs: number[]) => stat(xs)?.median ?? NaN;
    const seq = med(totals[1] ?? totals[LEVELS[0]!]!);
    const result = {
      vms: VMS,
      sizeMiB: SIZE_MIB,
      shared: SHARED,
      runs: RUNS,
      cpus: os.cpus().length,
      loadAvg: os.loadavg()[0],
      backups: LEVELS.map((p) => ({
        parallel: p,
        medianSecs: med(totals[p]!),
        runs: totals[p],
        speedup: seq / med(totals[p]!),
      })),
      gc: {
        aloneMedianSecs: med(gcAlone),
        besideBackupsMedianSecs: med(gcBeside),
        alone: gcAlone,
        beside: gcBeside,
      },
    };
    console.log(
      `\n${VMS} full backups of ${SIZE_MIB} MiB (${Math.round(SHARED * 100)} % shared), median of ${RUNS}:`,
    );
    for (const b of result.backups) {
      console.log(
        `  --parallel ${b.parallel}: ${b.medianSecs.toFixed(1)} s (x${b.speedup.toFixed(2)} vs one after another)`,
      );
    }
    console.log(
      `gc alone ${result.gc.aloneMedianSecs.toFixed(1)} s, beside 4 backups ${result.gc.besideBackupsMedianSecs.toFixed(1)} s`,
    );
    const out = arg('out', '');
    if (out) fs.writeFileSync(out, JSON.stringify(result, null, 2));
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
