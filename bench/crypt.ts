/**
 * Benchmark: the cost of encryption at rest (issue 13 §2). Same machine, same run, same image:
 *
 *   node dist/bench/crypt.js [--mode small|full] [--disk-mib N] [--runs N] [--work DIR] [--out FILE.json] [--md FILE.md]
 *
 * A qcow2 image of `disk-mib` (small 256, full 1024): 3/8 random, 3/8 text (compressible), 1/4
 * zeros. For a plain and an encrypted repository (key-file slot, so unlocking costs no scrypt
 * time), interleaved, `runs` times (small 1, full 3), medians reported:
 *   - backup:  `bkfs backup` (full) wall time, MB/s of allocated data;
 *   - mount:   `bkfs mount` + one sequential read of vda.raw (1 MiB reads), MB/s of disk size;
 *   - restore: `bkfs restore --disk vda --to FILE.raw` wall time, MB/s of allocated data.
 * Page cache is dropped before each step when this process may (root). Plus two micro figures
 * that decided the design (src/crypto/seal.ts, FORMAT.md "Encryption"): sealing throughput of
 * 256 KiB records with libsodium XChaCha20-Poly1305 vs node:crypto AES-256-GCM, and the CPU time
 * of a random 4 KiB read of an uncached frames chunk (read + open + decode one frame), plain vs
 * encrypted.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { run } from '../src/util/proc';
import { Cipher } from '../src/crypto/cipher';
import { newMasterSecret } from '../src/crypto/keys';
import { decodeFrame, encodeChunk, hashChunk, parseFrameTable } from '../src/store/codec';

const MiB = 1 << 20;
const BKFS = path.resolve(__dirname, '../../bin/bkfs');

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? 0 : s[Math.floor(s.length / 2)]!;
};

async function bkfsOk(args: string[]): Promise<string> {
  const r = await run(process.execPath, [BKFS, ...args], {
    allowFail: true,
    env: { ...process.env, CI: 'true', BKFS_PASSWORD_FILE: '', BKFS_PASSWORD_COMMAND: '' },
  });
  if (r.code !== 0) throw new Error(`bkfs ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

async function dropCaches(): Promise<void> {
  try {
    await run('sync', []);
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch {
    // not root: warm caches for both variants alike
  }
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

interface Variant {
  name: 'plain' | 'encrypted';
  backup: number[];
  mountRead: number[];
  restore: number[];
}

/**
 * Micro figures, interleaved in rounds (plain/encrypted or AES/XChaCha alternately, 15 rounds,
 * medians): on a shared machine one long run of each would measure the neighbours, not the code.
 */
function micro(): { sodiumMBs: number; gcmMBs: number; randomReadUsPlain: number; randomReadUsEnc: number } {
  const data = Buffer.alloc(256 * 1024);
  for (let i = 0; i < data.length; i += 64) data.write(`line ${i} ${'y'.repeat(i % 50)}\n`, i);
  const c = new Cipher(newMasterSecret());
  const id = c.chunkHash(data);
  const key = crypto.randomBytes(32);
  const plainHash = hashChunk(data);
  const plainStored = encodeChunk(data, 1, plainHash).data;
  const encStored = c.sealChunk(id, encodeChunk(data, 1, id).data);
  const readOne = (stored: Buffer, h: Buffer) => {
    const t = parseFrameTable(stored, data.length, stored.length, h);
    const f = t.frames[3]!;
    decodeFrame(f, stored.subarray(f.storedOff, f.storedOff + f.storedLen));
  };
  const time = (n: number, fn: () => void): number => {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fn();
    return Number(process.hrtime.bigint() - t0) / 1e9 / n;
  };
  const sod: number[] = [];
  const gcm: number[] = [];
  const rp: number[] = [];
  const re: number[] = [];
  for (let r = 0; r < 15; r++) {
    sod.push(data.length / MiB / time(20, () => c.sealChunk(id, data)));
    gcm.push(
      data.length /
        MiB /
        time(20, () => {
          const g = crypto.createCipheriv('aes-256-gcm', key, crypto.randomBytes(12));
          g.update(data);
          g.final();
          g.getAuthTag();
        }),
    );
    rp.push(time(50, () => readOne(plainStored, plainHash)) * 1e6);
    re.push(time(50, () => readOne(c.openChunk(id, encStored), id)) * 1e6);
  }
  return {
    sodiumMBs: median(sod),
    gcmMBs: median(gcm),
    randomReadUsPlain: median(rp),
    randomReadUsEnc: median(re),
  };
}

async function main(): Promise<void> {
  const mode = arg('mode', 'small');
  const diskMiB = Number(arg('disk-mib', mode === 'full' ? '1024' : '256'));
  const runs = Number(arg('runs', mode === 'full' ? '3' : '1'));
  const work = arg('work', '') || fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-bench-crypt-'));
  fs.mkdirSync(work, { recursive: true });
  const t0 = Date.now();
  const img = path.join(work, 'disk.qcow2');
  const rawImg = path.join(work, 'disk.raw');
  {
    const fd = fs.openSync(rawImg, 'w');
    const block = Buffer.alloc(MiB);
    for (let m = 0; m < diskMiB; m++) {
      const part = m / diskMiB;
      if (part < 0.375) crypto.randomFillSync(block);
      else if (part < 0.75) {
        for (let i = 0; i < MiB; i += 64) block.write(`guest text ${m} ${i} ${'z'.repeat(i % 40)}\n`, i);
      } else break;
      fs.writeSync(fd, block);
    }
    fs.ftruncateSync(fd, diskMiB * MiB);
    fs.closeSync(fd);
  }
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawImg, img]);
  fs.rmSync(rawImg);
  const dataMiB = diskMiB * 0.75;
  const keyFile = path.join(work, 'bench.key');
  fs.writeFileSync(keyFile, crypto.randomBytes(64), { mode: 0o600 });
  const variants: Variant[] = [
    { name: 'plain', backup: [], mountRead: [], restore: [] },
    { name: 'encrypted', backup: [], mountRead: [], restore: [] },
  ];
  process.env.BKFS_RUN_DIR = path.join(work, 'run');
  for (let r = 0; r < runs; r++) {
    for (const v of variants) {
      const repo = path.join(work, `repo-${v.name}-${r}`);
      const g = v.name === 'encrypted' ? ['--key-file', keyFile] : [];
      await bkfsOk(['-r', repo, ...g, 'init', ...(v.name === 'encrypted' ? ['--encrypt'] : [])]);
      await dropCaches();
      v.backup.push(await timed(() => bkfsOk(['-r', repo, ...g, 'backup', 'vm', '--disk', `vda=${img}`])));
      const mp = path.join(work, `mnt-${v.name}-${r}`);
      fs.mkdirSync(mp);
      await dropCaches();
      await bkfsOk(['-r', repo, ...g, 'mount', 'vm', mp]);
      try {
        v.mountRead.push(
          await timed(async () => {
            const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
            const b = Buffer.alloc(MiB);
            try {
              let pos = 0;
              for (;;) {
                const n = fs.readSync(fd, b, 0, MiB, pos);
                if (n <= 0) break;
                pos += n;
              }
            } finally {
              fs.closeSync(fd);
            }
          }),
        );
      } finally {
        await bkfsOk(['umount', mp]);
      }
      const out = path.join(work, `out-${v.name}.raw`);
      fs.rmSync(out, { force: true });
      await dropCaches();
      v.restore.push(
        await timed(() => bkfsOk(['-r', repo, ...g, 'restore', 'vm', '--disk', 'vda', '--to', out])),
      );
      fs.rmSync(out, { force: true });
      fs.rmSync(repo, { recursive: true, force: true });
    }
  }
  const m = micro();
  const rate = (mib: number, secs: number) => (secs > 0 ? mib / secs : 0);
  const res = {
    diskMiB,
    dataMiB,
    runs,
    variants: variants.map((v) => ({
      name: v.name,
      backupSecs: median(v.backup),
      backupMiBs: rate(dataMiB, median(v.backup)),
      mountReadSecs: median(v.mountRead),
      mountReadMiBs: rate(diskMiB, median(v.mountRead)),
      restoreSecs: median(v.restore),
      restoreMiBs: rate(dataMiB, median(v.restore)),
    })),
    micro: m,
    durationSecs: (Date.now() - t0) / 1000,
  };
  const md = [
    `Encryption cost (bench/crypt.ts, ${mode}): ${diskMiB} MiB qcow2, ${dataMiB} MiB data (half random, half text), median of ${runs} run(s), ${os.cpus().length} cores`,
    '',
    '| repository | backup | mount sequential read | restore |',
    '|---|---|---|---|',
    ...res.variants.map(
      (v) =>
        `| ${v.name} | ${v.backupSecs.toFixed(1)} s (${v.backupMiBs.toFixed(0)} MiB/s) | ${v.mountReadSecs.toFixed(1)} s (${v.mountReadMiBs.toFixed(0)} MiB/s) | ${v.restoreSecs.toFixed(1)} s (${v.restoreMiBs.toFixed(0)} MiB/s) |`,
    ),
    '',
    `Sealing 256 KiB records, one core, medians of 15 interleaved rounds: libsodium XChaCha20-Poly1305 ${m.sodiumMBs.toFixed(0)} MiB/s, node:crypto AES-256-GCM ${m.gcmMBs.toFixed(0)} MiB/s.`,
    `Random 4 KiB read of an uncached frames chunk (CPU, medians of 15 interleaved rounds): plain ${m.randomReadUsPlain.toFixed(0)} µs, encrypted ${m.randomReadUsEnc.toFixed(0)} µs (open of the whole 256 KiB record + one 32 KiB frame).`,
    '',
  ].join('\n');
  const outJson = arg('out', '');
  if (outJson) fs.writeFileSync(outJson, JSON.stringify(res, null, 2) + '\n');
  const outMd = arg('md', '');
  if (outMd) fs.writeFileSync(outMd, md);
  process.stdout.write(md);
  if (!arg('work', '')) fs.rmSync(work, { recursive: true, force: true });
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/crypt: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
