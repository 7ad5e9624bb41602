/**
 * Lifecycle benchmark: gc, verify and index-rebuild throughput on a repository of a few GiB, manifest
 * size per GiB, and the time to forget one checkpoint out of 100.
 *
 *   node dist/bench/lifecycle.js [--size-mib 3072] [--checkpoints 100] [--keep]
 *
 * Scratch space: $BKFS_BENCH_DIR (default /var/tmp), about 3x --size-mib. Part 1 writes
 * `size-mib` x 0.8 of random data into a qcow2 image, backs it up (full), overwrites every other
 * 32 MiB (so every pack ends up half dead), backs up again (inc), forgets the full, then times
 * verify (every chunk re-read and re-hashed), gc (rewrites every pack) and a full index rebuild.
 * Part 2 builds a chain of `checkpoints` backups of a 256 MiB image (1 MiB changed each time) and
 * times forgetting one checkpoint in the middle, in-process and through the CLI. Figures are
 * printed as a Markdown table (MB = 10^6 bytes). Everything is removed afterwards (unless --keep).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Repository } from '../src/repo/repository';
import { runBackup } from '../src/backup/engine';
import { ImageSource } from '../src/backup/sources';
import { verifyRepository } from '../src/repo/verify';
import { runGc } from '../src/repo/gc';
import { forgetByName } from '../src/repo/forget';
import { rebuildIndex } from '../src/repo/rebuild';
import { listManifestUids, manifestPath } from '../src/repo/manifest';
import { randomBuffer } from '../test/helpers/images';

const MiB = 1 << 20;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status})`);
}

function log(msg: string): void {
  process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

async function timed<T>(fn: () => Promise<T> | T): Promise<{ ms: number; v: T }> {
  const t0 = process.hrtime.bigint();
  const v = await fn();
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6, v };
}

/** Write `mib` MiB of fresh random data at `offMiB` of a qcow2 image, in 64 MiB pieces. */
function writeRandom(dir: string, img: string, seed: number, offMiB: number, mib: number): void {
  const tmp = path.join(dir, 'piece.bin');
  for (let done = 0; done < mib; done += 64) {
    const n = Math.min(64, mib - done);
    fs.writeFileSync(tmp, randomBuffer(seed * 100000 + done, n * MiB));
    sh('qemu-io', ['-f', 'qcow2', '-c', `write -s ${tmp} ${offMiB + done}M ${n}M`, img]);
  }
  fs.rmSync(tmp, { force: true });
}

const rate = (bytes: number, ms: number): string => `${(bytes / 1e6 / (ms / 1000)).toFixed(0)} MB/s`;

async function main(): Promise<void> {
  const sizeMiB = Number(arg('size-mib', '3072'));
  const count = Number(arg('checkpoints', '100'));
  const base = process.env.BKFS_BENCH_DIR ?? '/var/tmp';
  const dir = fs.mkdtempSync(path.join(base, 'bkfs-bench-lifecycle-'));
  const rows: [string, string][] = [];
  const bin = path.resolve(__dirname, '../../bin/bkfs');
  try {
    // ---- Part 1: a few GiB, half of every pack dead.
    const img = path.join(dir, 'big.qcow2');
    const repoDir = path.join(dir, 'repo');
    const dataMiB = Math.floor((sizeMiB * 0.8) / 64) * 64;
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', img, `${sizeMiB}M`]);
    log(`writing ${dataMiB} MiB of random data`);
    writeRandom(dir, img, 1, 0, dataMiB);
    const repo = Repository.init(repoDir);
    try {
      const disks = () => [{ name: 'vda', source: new ImageSource(img) }];
      const full = await timed(() => runBackup(repo, { vm: 'big', disks: disks(), level: 'full' }));
      rows.push([
        'full backup (context)',
        `${(full.ms / 1000).toFixed(1)} s, ${rate(full.v.bytesRead, full.ms)}`,
      ]);
      log('overwriting every other 32 MiB');
      for (let off = 0; off < dataMiB; off += 64) writeRandom(dir, img, 2 + off, off, 32);
      await runBackup(repo, { vm: 'big', disks: disks(), level: 'inc' });
      const sizes = listManifestUids(repoDir).map((u) => fs.statSync(manifestPath(repoDir, u)).size);
      const biggest = Math.max(...sizes);
      rows.push([
        'manifest size (complete map of one checkpoint)',
        `${(biggest / 1024).toFixed(0)} KiB for ${dataMiB} MiB of allocated data = ${(biggest / dataMiB).toFixed(0)} KiB per GiB`,
      ]);
      forgetByName(repo, ['big@check1']);

      sh('sync', []);
      const v = await timed(() => verifyRepository(repo));
      if (v.v.damaged.length || v.v.problems.length) throw new Error('verify found damage');
      rows.push([
        'verify (re-read + hash every chunk)',
        `${rate(v.v.bytesChecked, v.ms)} of stored data (${(v.v.bytesChecked / 1e9).toFixed(2)} GB in ${(v.ms / 1000).toFixed(1)} s)`,
      ]);

      const g = await timed(() => runGc(repo));
      rows.push([
        'gc (rewrite every half-dead pack)',
        `${rate(g.v.bytesBefore, g.ms)} of packs processed, ${rate(g.v.bytesCopied, g.ms)} copied; ${(g.v.bytesBefore / 1e9).toFixed(2)} GB -> ${(g.v.bytesAfter / 1e9).toFixed(2)} GB in ${(g.ms / 1000).toFixed(1)} s`,
      ]);
      const v2 = await timed(() => verifyRepository(repo));
      if (v2.v.damaged.length || v2.v.problems.length) throw new Error('verify after gc found damage');
    } finally {
      repo.close();
    }
    for (const f of fs.readdirSync(repoDir)) if (f.startsWith('index.db')) fs.rmSync(path.join(repoDir, f));
    const rb = await timed(() => rebuildIndex(repoDir));
    const packBytes = fs
      .readdirSync(path.join(repoDir, 'packs'))
      .flatMap((d) =>
        fs.readdirSync(path.join(repoDir, 'packs', d)).map((f) => path.join(repoDir, 'packs', d, f)),
      )
      .reduce((a, f) => a + fs.statSync(f).size, 0);
    rows.push([
      'repair --rebuild-index',
      `${(rb.ms / 1000).toFixed(2)} s for ${rb.v.chunks} chunks in ${rb.v.packs} packs (${(packBytes / 1e9).toFixed(2)} GB), ${rb.v.checkpoints} checkpoint(s)`,
    ]);
    fs.rmSync(img, { force: true });

    // ---- Part 2: forget one checkpoint out of `count`.
    const img2 = path.join(dir, 'small.qcow2');
    const repo2Dir = path.join(dir, 'repo2');
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', img2, '256M']);
    writeRandom(dir, img2, 9, 0, 128);
    const repo2 = Repository.init(repo2Dir);
    try {
      const disks = () => [{ name: 'vda', source: new ImageSource(img2) }];
      log(`building a chain of ${count} checkpoints`);
      await runBackup(repo2, { vm: 'vm', disks: disks(), level: 'full' });
      const tmp = path.join(dir, 'one.bin');
      for (let i = 2; i <= count; i++) {
        fs.writeFileSync(tmp, randomBuffer(1000 + i, MiB));
        sh('qemu-io', ['-f', 'qcow2', '-c', `write -s ${tmp} ${(i * 7) % 250}M 1M`, img2]);
        await runBackup(repo2, { vm: 'vm', disks: disks(), level: 'inc' });
      }
      const mid = `vm@check${Math.floor(count / 2)}`;
      const f = await timed(() => forgetByName(repo2, [mid]));
      rows.push([`forget 1 of ${count} checkpoints (in-process)`, `${f.ms.toFixed(0)} ms`]);
    } finally {
      repo2.close();
    }
    const cli = await timed(() => {
      const r = spawnSync(process.execPath, [
        bin,
        '-r',
        repo2Dir,
        'forget',
        `vm@check${Math.floor(count / 2) + 1}`,
      ]);
      if (r.status !== 0) throw new Error(`bkfs forget failed: ${r.stderr.toString()}`);
    });
    rows.push([
      `forget 1 of ${count - 1} checkpoints (bkfs CLI, incl. node start-up)`,
      `${cli.ms.toFixed(0)} ms`,
    ]);
    const g2 = await timed(() => {
      const r = spawnSync(process.execPath, [bin, '-r', repo2Dir, 'gc']);
      if (r.status !== 0) throw new Error(`bkfs gc failed: ${r.stderr.toString()}`);
    });
    rows.push([`gc after that (bkfs CLI)`, `${g2.ms.toFixed(0)} ms`]);

    process.stdout.write(
      `\n| lifecycle (${sizeMiB} MiB image, ${count} checkpoints) | figure |\n|---|---|\n`,
    );
    for (const [k, val] of rows) process.stdout.write(`| ${k} | ${val} |\n`);
  } finally {
    if (!process.argv.includes('--keep')) fs.rmSync(dir, { recursive: true, force: true });
    else log(`kept ${dir}`);
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/lifecycle: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
