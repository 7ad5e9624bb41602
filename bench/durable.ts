/**
 * The cost of durability: backup time of two bkfs builds side by side (e.g. the index with
 * `synchronous = NORMAL` before and `FULL` now): a full backup of a qcow2 that is half random
 * data, then an incremental after 1 % of the disk changed, each the median of several runs
 * (fresh repository per run, builds alternating so that machine noise hits both alike). Every run
 * is timed up to a `sync` after it, so what is measured is what the fsyncs add, not dirty pages
 * left for later.
 *
 *   node dist/bench/durable.js --bkfs A=/path/a/bin/bkfs,B=/path/b/bin/bkfs [--size-mib 512] [--runs 5] [--work DIR]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBuffer } from '../test/helpers/images';
import { arg, MiB, sh, stat, timed } from './lib/common';

const SIZE_MIB = Number(arg('size-mib', '512'));
const RUNS = Number(arg('runs', '5'));
const BLOCK = 32 * MiB;

async function halfImage(file: string): Promise<void> {
  const raw = `${file}.raw`;
  const fd = fs.openSync(raw, 'w');
  try {
    fs.ftruncateSync(fd, SIZE_MIB * MiB);
    for (let off = 0, i = 0; off < SIZE_MIB * MiB; off += BLOCK, i++) {
      if (i % 2 === 0) fs.writeSync(fd, randomBuffer(7000 + i, BLOCK), 0, BLOCK, off);
    }
  } finally {
    fs.closeSync(fd);
  }
  await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  fs.rmSync(raw);
}

/** 1 % of the disk: 1 MiB pieces of random data at spread offsets, written through qemu-io. */
async function changeOnePercent(image: string, work: string, seed: number): Promise<void> {
  const pieces = Math.max(1, Math.round(SIZE_MIB / 100));
  const data = path.join(work, 'piece.bin');
  const cmds: string[] = [];
  fs.writeFileSync(data, randomBuffer(seed, MiB));
  for (let i = 0; i < pieces; i++) {
    const off = Math.floor(((i + 0.5) * SIZE_MIB) / pieces);
    cmds.push('-c', `write -s ${data} ${off}M 1M`);
  }
  await sh('qemu-io', ['-f', 'qcow2', ...cmds, image]);
}

async function main(): Promise<void> {
  const builds = arg('bkfs', '')
    .split(',')
    .filter(Boolean)
    .map((kv) => {
      const [label, bin] = kv.split('=') as [string, string];
      return { label, bin: path.resolve(bin) };
    });
  if (builds.length === 0) throw new Error('--bkfs LABEL=BIN[,LABEL=BIN...] is required');
  const work = fs.mkdtempSync(path.join(arg('work', os.tmpdir()), 'bkfs-bench-durable-'));
  try {
    const base = path.join(work, 'base.qcow2');
    await halfImage(base);
    const res = new Map(builds.map((b) => [b.label, { full: [] as number[], inc: [] as number[] }]));
    for (let r = 0; r < RUNS; r++) {
      for (const b of r % 2 === 0 ? builds : [...builds].reverse()) {
        const img = path.join(work, 'img.qcow2');
        const repo = path.join(work, 'repo');
        fs.rmSync(repo, { recursive: true, force: true });
        fs.copyFileSync(base, img);
        await sh(b.bin, ['-r', repo, 'init']);
        await sh('sync', []);
        const backup = (level: string) =>
          timed(async () => {
            await sh(b.bin, ['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', level]);
            await sh('sync', []);
          });
        const full = await backup('full');
        await changeOnePercent(img, work, 100 + r);
        await sh('sync', []);
        const inc = await backup('inc');
        res.get(b.label)!.full.push(full);
        res.get(b.label)!.inc.push(inc);
        console.log(`${b.label} run ${r + 1}/${RUNS}: full ${full.toFixed(2)} s, inc ${inc.toFixed(2)} s`);
      }
    }
    const fmt = (xs: number[]): string => {
      const s = stat(xs)!;
      return `median ${s.median.toFixed(2)} s (min ${s.min.toFixed(2)}, max ${s.max.toFixed(2)}, n ${s.n})`;
    };
    console.log(`\n${SIZE_MIB} MiB qcow2, half random data; inc after 1 % changed`);
    for (const [label, r] of res) console.log(`${label}: full ${fmt(r.full)}; inc ${fmt(r.inc)}`);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
