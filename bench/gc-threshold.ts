/**
 * gc's --max-unused threshold (issue 17.9): what each threshold copies and frees on a repository
 * after a typical retention run, to choose the default.
 *
 *   node dist/bench/gc-threshold.js [--size-mib 512] [--rounds 8] [--change 3] [--keep-last 3]
 *
 * Workload: a raw image of incompressible data is backed up, then `rounds` times `change` % of its
 * 256 KiB chunks (random places, seeded) are overwritten and backed up again (a full of a raw
 * image: only the changed chunks are new, dedup takes the rest); then every checkpoint but the
 * last `keep-last` is forgotten. For each threshold, `gc --dry-run --max-unused T` reports the
 * packs it would rewrite, the bytes it would copy and free, and the unused bytes it would leave
 * (the dry run's figures equal the real run's, see test/integration/firsthour.test.ts). Printed as
 * a Markdown table; the scratch directory ($BKFS_BENCH_DIR, default /var/tmp) is removed.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Repository } from '../src/repo/repository';
import { runBackup } from '../src/backup/engine';
import { ImageSource } from '../src/backup/sources';
import { runGc } from '../src/repo/gc';
import { forgetByName } from '../src/repo/forget';
import { randomBuffer } from '../test/helpers/images';

const MiB = 1 << 20;
const CHUNK = 256 << 10;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

function mib(n: number): string {
  return (n / MiB).toFixed(1);
}

async function main(): Promise<void> {
  const sizeMiB = Number(arg('size-mib', '512'));
  const rounds = Number(arg('rounds', '8'));
  const change = Number(arg('change', '3')) / 100;
  const keepLast = Number(arg('keep-last', '3'));
  const base = process.env.BKFS_BENCH_DIR ?? '/var/tmp';
  const dir = fs.mkdtempSync(path.join(base, 'bkfs-bench-gc-threshold-'));
  try {
    const img = path.join(dir, 'disk.raw');
    const fd = fs.openSync(img, 'w');
    for (let i = 0; i < sizeMiB; i += 16) fs.writeSync(fd, randomBuffer(1000 + i, 16 * MiB));
    fs.closeSync(fd);
    const repo = Repository.init(path.join(dir, 'repo'));
    const backup = () =>
      runBackup(repo, { vm: 'vm', disks: [{ name: 'vda', source: new ImageSource(img) }], level: 'full' });
    await backup();
    const chunks = (sizeMiB * MiB) / CHUNK;
    let seed = 7;
    const rnd = () => {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
      return seed / 4294967296;
    };
    for (let r = 0; r < rounds; r++) {
      const w = fs.openSync(img, 'r+');
      for (let k = 0; k < Math.round(chunks * change); k++) {
        const c = Math.floor(rnd() * chunks);
        fs.writeSync(w, randomBuffer(5000 + r * 100000 + k, CHUNK), 0, CHUNK, c * CHUNK);
      }
      fs.closeSync(w);
      await backup();
    }
    const names = (
      repo.db.prepare("SELECT name FROM checkpoints WHERE state = 'complete' ORDER BY id").all() as {
        name: string;
      }[]
    ).map((r) => `vm@${r.name}`);
    forgetByName(repo, names.slice(0, names.length - keepLast));
    console.log(
      `${sizeMiB} MiB disk, ${rounds} backups after the first with ${change * 100} % of its chunks changed each, all but the last ${keepLast} forgotten\n`,
    );
    console.log(
      '| --max-unused | packs rewritten | MiB copied | MiB freed | MiB copied per MiB freed | MiB left unused |',
    );
    console.log('|---|---|---|---|---|---|');
    for (const t of [0, 1, 2, 5, 10, 20, 100]) {
      const r = await runGc(repo, { dryRun: true, maxUnused: t / 100 });
      const freed = r.bytesFreed;
      console.log(
        `| ${t} % | ${r.packsRewritten} | ${mib(r.bytesCopied)} | ${mib(freed)} | ${freed > 0 ? (r.bytesCopied / freed).toFixed(2) : '-'} | ${mib(r.bytesKeptUnused)} |`,
      );
    }
    repo.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
