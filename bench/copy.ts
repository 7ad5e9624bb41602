/**
 * `bkfs copy` throughput (issue 13 §3): a full and then an incremental copied into a second
 * local repository, stored path and recompress path.
 *
 *   node dist/bench/copy.js [--size-mib 512] [--change 3] [--runs 3]
 *
 * Workload: a raw image, half incompressible and half text-like (compressible) data, is backed up
 * (full) into repository A; then `change` % of its 256 KiB chunks (random places, seeded) are
 * overwritten and backed up again (a full of a raw image: only the changed chunks are new). Each
 * run copies check1 into an empty repository B and then check2 (the incremental copy: only the
 * changed chunks travel), timing each, in both modes (stored records as they are; `--recompress`).
 * Figures: wall time, raw MB/s of the data the checkpoint holds, chunks and stored bytes sent;
 * medians over the runs. The scratch directory ($BKFS_BENCH_DIR, default /var/tmp) is removed.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Repository } from '../src/repo/repository';
import { runBackup } from '../src/backup/engine';
import { ImageSource } from '../src/backup/sources';
import { copyCheckpoints, type CopyResult } from '../src/repo/copy';
import { randomBuffer, textFile } from '../test/helpers/images';

const MiB = 1 << 20;
const CHUNK = 256 << 10;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function main(): Promise<void> {
  const sizeMiB = Number(arg('size-mib', '512'));
  const change = Number(arg('change', '3')) / 100;
  const runs = Number(arg('runs', '3'));
  const base = process.env.BKFS_BENCH_DIR ?? '/var/tmp';
  const dir = fs.mkdtempSync(path.join(base, 'bkfs-bench-copy-'));
  try {
    const img = path.join(dir, 'disk.raw');
    const fd = fs.openSync(img, 'w');
    for (let i = 0; i < sizeMiB; i += 16) {
      const block =
        i % 32 === 0 ? randomBuffer(3000 + i, 16 * MiB) : textFile(3000 + i, 16 * MiB).subarray(0, 16 * MiB);
      fs.writeSync(fd, block);
    }
    fs.closeSync(fd);
    const A = Repository.init(path.join(dir, 'A'));
    const backup = () =>
      runBackup(A, { vm: 'vm', disks: [{ name: 'vda', source: new ImageSource(img) }], level: 'full' });
    const c0 = process.cpuUsage();
    await backup();
    const cb = process.cpuUsage(c0);
    const backupCpu = (cb.user + cb.system) / 1e6;
    const chunks = (sizeMiB * MiB) / CHUNK;
    let seed = 11;
    const rnd = () => {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
      return seed / 4294967296;
    };
    const w = fs.openSync(img, 'r+');
    for (let k = 0; k < Math.round(chunks * change); k++) {
      fs.writeSync(w, randomBuffer(5000 + k, CHUNK), 0, CHUNK, Math.floor(rnd() * chunks) * CHUNK);
    }
    fs.closeSync(w);
    await backup();
    A.close();

    const rows: string[] = [];
    for (const mode of ['stored', 'recompress'] as const) {
      const full: CopyResult[] = [];
      const inc: CopyResult[] = [];
      const cpu = new Map<CopyResult[], number[]>([
        [full, []],
        [inc, []],
      ]);
      for (let r = 0; r < runs; r++) {
        const bdir = path.join(dir, `B-${mode}-${r}`);
        Repository.init(bdir).close();
        for (const [ref, into] of [
          ['vm@check1', full],
          ['vm@check2', inc],
        ] as const) {
          const src = Repository.open(path.join(dir, 'A'), { readOnly: true });
          const dst = Repository.open(bdir);
          try {
            const u0 = process.cpuUsage();
            into.push(await copyCheckpoints(src, dst, { refs: [ref], recompress: mode === 'recompress' }));
            const u = process.cpuUsage(u0);
            cpu.get(into)!.push((u.user + u.system) / 1e6);
          } finally {
            dst.close();
            src.close();
          }
        }
        fs.rmSync(bdir, { recursive: true, force: true });
      }
      for (const [what, rs] of [
        ['full', full],
        ['incremental', inc],
      ] as const) {
        const ms = median(rs.map((x) => x.durationMs));
        const r0 = rs[0]!;
        rows.push(
          `| ${what} | ${mode} | ${(ms / 1000).toFixed(2)} | ${((sizeMiB * MiB) / MiB / (ms / 1000)).toFixed(0)} | ${r0.chunksTransferred} | ${(r0.rawBytesTransferred / MiB).toFixed(1)} | ${(r0.bytesTransferred / MiB).toFixed(1)} | ${r0.chunksPresent} | ${median(cpu.get(rs)!).toFixed(2)} |`,
        );
      }
    }
    process.stdout.write(
      `bkfs copy, ${sizeMiB} MiB image (half random, half text), ${change * 100} % of chunks changed for the incremental, median of ${runs}\n\n` +
        '| copy | mode | time (s) | data MiB/s | chunks sent | raw MiB sent | stored MiB sent | chunks already there | CPU s (process) |\n' +
        '|---|---|---:|---:|---:|---:|---:|---:|---:|\n' +
        rows.join('\n') +
        `\n\nThe full backup of the same image: ${backupCpu.toFixed(2)} CPU s (process: its hashing and compression in worker threads included).\n`,
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
