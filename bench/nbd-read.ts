/**
 * Micro-benchmark: sequential read throughput of NbdClient through qemu-nbd, against nbdcopy.
 *
 *   node dist/bench/nbd-read.js [--size-mib 1024] [--request-mib 2] [--in-flight 8,16] [--runs 3]
 *                               [--image existing.qcow2]
 *
 * Creates (unless --image) a qcow2 full of random data in a temp dir, warms the page cache, serves
 * it with `qemu-nbd -r` on a Unix socket, then for each in-flight depth reads the whole export in
 * `request-mib` pieces keeping that many reads outstanding, with `read()` (fresh Buffer per
 * request, as the backup engine does) and `readInto()` (reused buffers). Every variant is compared
 * with `nbdcopy --connections=1 --requests=N --request-size=R URI null:` on the same export.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../src/nbd/client';
import { makeTempDir, startQemuNbd } from '../test/helpers/nbd-server';

const MiB = 1024 * 1024;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} failed (${r.status})`);
}

async function readLoop(c: NbdClient, reqSize: number, inFlight: number, into: boolean): Promise<number> {
  const size = c.size;
  let next = 0;
  let checksum = 0;
  const bufs = Array.from({ length: inFlight }, () => Buffer.allocUnsafe(reqSize));
  const worker = async (w: number): Promise<void> => {
    for (;;) {
      const off = next;
      if (off >= size) return;
      const len = Math.min(reqSize, size - off);
      next += len;
      let b: Buffer;
      if (into) {
        b = (bufs[w] as Buffer).subarray(0, len);
        await c.readInto(off, b);
      } else {
        b = await c.read(off, len);
      }
      checksum ^= b[0] ?? 0; // touch the data
    }
  };
  await Promise.all(Array.from({ length: inFlight }, (_, w) => worker(w)));
  return checksum;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

async function main(): Promise<void> {
  const sizeMiB = Number(arg('size-mib', '1024'));
  const reqSize = Number(arg('request-mib', '2')) * MiB;
  const depths = arg('in-flight', '8,16').split(',').map(Number);
  const runs = Number(arg('runs', '3'));
  const dir = makeTempDir('bkfs-nbd-bench-');
  try {
    let img = arg('image', '');
    if (!img) {
      img = join(dir, 'random.qcow2');
      const raw = join(dir, 'random.raw');
      const fd = openSync(raw, 'w');
      const chunk = Buffer.allocUnsafe(16 * MiB);
      for (let i = 0; i < (sizeMiB * MiB) / chunk.length; i++) writeSync(fd, randomFillSync(chunk));
      closeSync(fd);
      sh('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, img]);
      rmSync(raw);
    }
    readFileSync(img); // warm the page cache (file <= a few GiB)
    const server = await startQemuNbd(img, { readOnly: true });
    try {
      console.log(`export: ${img} via qemu-nbd, request size ${reqSize / MiB} MiB, best/median of ${runs}`);
      for (const depth of depths) {
        const c = await NbdClient.connect(server.uri, { maxInFlight: depth });
        const sizeMB = c.size / MiB;
        for (const into of [false, true]) {
          const rates: number[] = [];
          for (let r = 0; r < runs; r++) {
            const t0 = process.hrtime.bigint();
            await readLoop(c, reqSize, depth, into);
            const s = Number(process.hrtime.bigint() - t0) / 1e9;
            rates.push(sizeMB / s);
          }
          console.log(
            `bkfs NbdClient ${into ? 'readInto' : 'read    '} in-flight ${String(depth).padStart(2)}: ` +
              `best ${Math.max(...rates).toFixed(0)} MiB/s, median ${median(rates).toFixed(0)} MiB/s`,
          );
        }
        await c.close();
        const rates: number[] = [];
        for (let r = 0; r < runs; r++) {
          const t0 = process.hrtime.bigint();
          sh('nbdcopy', [
            '--connections=1',
            `--requests=${depth}`,
            `--request-size=${reqSize}`,
            server.uri,
            'null:',
          ]);
          const s = Number(process.hrtime.bigint() - t0) / 1e9;
          rates.push(sizeMB / s);
        }
        console.log(
          `nbdcopy (1 conn)         in-flight ${String(depth).padStart(2)}: ` +
            `best ${Math.max(...rates).toFixed(0)} MiB/s, median ${median(rates).toFixed(0)} MiB/s`,
        );
      }
    } finally {
      await server.stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
