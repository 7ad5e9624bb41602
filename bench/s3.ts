/**
 * Benchmark (issue 13, "Done when"): four repositories in one run, through the real `bkfs` command:
 * a local directory, a local directory encrypted (`init --encrypt`), a bucket on a real Ceph RADOS
 * Gateway on 127.0.0.1 (test/helpers/rgw.ts), and an encrypted bucket.
 *
 *   node dist/bench/s3.js [--data-mib 256] [--disk-mib 512]
 *
 * One qcow2 disk holds `data-mib` of data (even 32 MiB pieces random, odd ones text). Measured,
 * each as the wall time of one bkfs command: a full backup, a restore to a raw file, a sequential
 * read of the whole mounted disk (`bkfs mount` + read of vda.raw), and `bkfs verify`. For a
 * bucket, restore, mount-read and verify start with an empty chunk cache (cold: every byte comes
 * from the bucket), and the restore is measured once more with the cache warm. HTTP requests (and
 * bytes) are counted by an SDK middleware (`BKFS_S3_STATS`, src/store/s3store.ts) and given per GiB
 * of data backed up / restored. RGW here is one OSD on a file on the same 2 cores: the figures show
 * the cost of the S3 path (HTTP, SDK, request count) and of encryption, not of a real network or
 * cluster. The machine's load (`/proc/loadavg`) is sampled during the run and printed in the header.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBuffer, textFile } from '../test/helpers/images';
import { startRgw } from '../test/helpers/rgw';
import { run } from '../src/util/proc';

const MiB = 1024 * 1024;
const BKFS = path.resolve(__dirname, '../../bin/bkfs');

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1] ?? def) : def;
}

/** Run bkfs, return its wall time in seconds; throws with its output on failure. */
function timed(args: string[], env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(process.execPath, [BKFS, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, CI: 'true', NODE_NO_WARNINGS: '1', ...env },
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code === 0) resolve(secs);
      else reject(new Error(`bkfs ${args.slice(0, 8).join(' ')} exited ${code}:\n${out.slice(-2000)}`));
    });
  });
}

function readAll(file: string): number {
  const t0 = process.hrtime.bigint();
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(4 * MiB);
  try {
    let pos = 0;
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      pos += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

type Counts = Record<string, number>;

function takeCounts(file: string): Counts {
  const out: Counts = {};
  if (!fs.existsSync(file)) return out;
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    if (!line) continue;
    const j = JSON.parse(line) as { requests: Counts; bytesOut?: number; bytesIn?: number };
    for (const [k, v] of Object.entries(j.requests)) out[k] = (out[k] ?? 0) + v;
    out.bytesOut = (out.bytesOut ?? 0) + (j.bytesOut ?? 0);
    out.bytesIn = (out.bytesIn ?? 0) + (j.bytesIn ?? 0);
  }
  fs.rmSync(file);
  return out;
}

const sum = (c: Counts, ops: string[]): number => ops.reduce((a, o) => a + (c[o] ?? 0), 0);

function loadavg(): number[] {
  return fs
    .readFileSync('/proc/loadavg', 'utf8')
    .split(' ')
    .slice(0, 3)
    .map((x) => Number(x));
}

interface Target {
  name: string;
  repo: string;
  bucket: boolean;
  encrypted: boolean;
  env: NodeJS.ProcessEnv;
  cache?: string;
}

async function main(): Promise<void> {
  const dataMib = arg('data-mib', 256);
  const diskMib = arg('disk-mib', Math.max(dataMib * 2, 64));
  const work = fs.mkdtempSync('/var/tmp/bkfs-bench-s3-');
  const loadStart = fs.readFileSync('/proc/loadavg', 'utf8').trim();
  const loads: number[] = [];
  const sampler = setInterval(() => loads.push(loadavg()[0]!), 5000);
  const rgw = await startRgw();
  try {
    const img = path.join(work, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, `${diskMib}M`]);
    for (let off = 0, i = 0; off < dataMib; off += 32, i++) {
      const len = Math.min(32, dataMib - off);
      const f = path.join(work, 'fill.bin');
      fs.writeFileSync(
        f,
        i % 2 === 0 ? randomBuffer(i + 1, len * MiB) : textFile(i + 1, len * MiB).subarray(0, len * MiB),
      );
      await run('qemu-io', ['-f', 'qcow2', '-c', `write -s ${f} ${off}M ${len}M`, img]);
      fs.rmSync(f);
    }
    const bucket = await rgw.bucket('bkfs-bench-s3');
    const stats = path.join(work, 's3-requests.jsonl');
    const pw = path.join(work, 'passphrase');
    fs.writeFileSync(pw, 'bench passphrase\n', { mode: 0o600 });
    const keyEnv = { BKFS_PASSWORD_FILE: pw, BKFS_PASSWORD_COMMAND: '', BKFS_KEY_FILE: '' };
    const s3env = (cache: string): NodeJS.ProcessEnv => ({
      ...rgw.env,
      BKFS_CACHE_DIR: cache,
      BKFS_S3_STATS: stats,
    });
    const targets: Target[] = [
      { name: 'local', repo: path.join(work, 'repo'), bucket: false, encrypted: false, env: {} },
      {
        name: 'local + encrypted',
        repo: path.join(work, 'repo-enc'),
        bucket: false,
        encrypted: true,
        env: keyEnv,
      },
      {
        name: 'RGW',
        repo: `s3://${bucket}/bench`,
        bucket: true,
        encrypted: false,
        env: s3env(path.join(work, 'cache')),
        cache: path.join(work, 'cache'),
      },
      {
        name: 'RGW + encrypted',
        repo: `s3://${bucket}/bench-enc`,
        bucket: true,
        encrypted: true,
        env: { ...s3env(path.join(work, 'cache-enc')), ...keyEnv },
        cache: path.join(work, 'cache-enc'),
      },
    ];
    const rows: string[][] = [];
    const reqRows: string[][] = [];
    const gib = dataMib / 1024;
    for (const t of targets) {
      const r = (args: string[]) => timed(['-r', t.repo, ...args], t.env);
      const coldCache = () => {
        if (t.cache) {
          for (const d of fs.readdirSync(t.cache)) {
            fs.rmSync(path.join(t.cache, d, 'chunk-cache'), { recursive: true, force: true });
          }
        }
      };
      await r(t.encrypted ? ['init', '--encrypt'] : ['init']);
      takeCounts(stats);
      const backup = await r(['backup', 'vm', '--disk', `vda=${img}`, '-l', 'full', '-c', 'full']);
      const cBackup = takeCounts(stats);
      coldCache();
      const out = path.join(work, 'restore.raw');
      const restore = await r(['restore', 'vm@full', '--disk', 'vda', '--to', out, '--force']);
      const cRestore = takeCounts(stats);
      const restoreWarm = await r(['restore', 'vm@full', '--disk', 'vda', '--to', out, '--force']);
      takeCounts(stats);
      fs.rmSync(out, { force: true });
      coldCache();
      const mp = path.join(work, `mnt-${t.name.replace(/\W+/g, '-')}`);
      fs.mkdirSync(mp);
      await r(['mount', 'vm@full', mp]);
      let mountRead: number;
      try {
        mountRead = readAll(path.join(mp, 'vda.raw'));
      } finally {
        await timed(['umount', mp], t.env).catch(() =>
          run('fusermount', ['-u', '-z', mp], { allowFail: true }),
        );
      }
      const cMount = takeCounts(stats);
      coldCache();
      const verify = await r(['verify']);
      const cVerify = takeCounts(stats);
      const mbs = (s: number, mib: number) => `${s.toFixed(1)} s (${(mib / s).toFixed(0)} MiB/s)`;
      rows.push([
        t.name,
        mbs(backup, dataMib),
        mbs(restore, dataMib),
        t.bucket ? mbs(restoreWarm, dataMib) : '-',
        mbs(mountRead, diskMib),
        mbs(verify, dataMib),
      ]);
      if (t.bucket) {
        const puts = ['PutObject', 'UploadPart', 'CreateMultipartUpload', 'CompleteMultipartUpload'];
        const row = (what: string, c: Counts, put: boolean): string[] => [
          t.name,
          what,
          put ? `${(sum(c, puts) / gib).toFixed(0)}` : '-',
          `${((c.GetObject ?? 0) / gib).toFixed(0)}`,
          `${((put ? (c.bytesOut ?? 0) : (c.bytesIn ?? 0)) / MiB / gib).toFixed(0)} MiB`,
          JSON.stringify(Object.fromEntries(Object.entries(c).filter(([k]) => !k.startsWith('bytes')))),
        ];
        reqRows.push(
          row('backup (full)', cBackup, true),
          row('restore (cold cache)', cRestore, false),
          row('mount read (cold cache)', cMount, false),
          row('verify (cold cache)', cVerify, false),
        );
      }
    }
    clearInterval(sampler);
    const loadEnd = fs.readFileSync('/proc/loadavg', 'utf8').trim();
    const maxLoad = loads.length > 0 ? Math.max(...loads) : loadavg()[0]!;
    const meanLoad = loads.length > 0 ? loads.reduce((a, b) => a + b, 0) / loads.length : maxLoad;
    const md = [
      `### Object storage and encryption: local, local + encrypted, RGW, RGW + encrypted (${dataMib} MiB of data on a ${diskMib} MiB disk)`,
      '',
      `Machine load during the run (\`/proc/loadavg\`, 2 cores): at the start \`${loadStart}\`, at the end \`${loadEnd}\`; 1-minute load sampled every 5 s: mean ${meanLoad.toFixed(2)}, max ${maxLoad.toFixed(2)}.`,
      '',
      '| repository | full backup | restore (cold cache) | restore (warm cache) | mount sequential read | verify |',
      '| --- | --- | --- | --- | --- | --- |',
      ...rows.map((r) => `| ${r.join(' | ')} |`),
      '',
      `Requests per GiB of data (buckets; ${dataMib} MiB backed up / restored); bytes = sent for the backup, received otherwise:`,
      '',
      '| repository | operation | PUT-type per GiB | GET per GiB | bytes per GiB | all requests |',
      '| --- | --- | --- | --- | --- | --- |',
      ...reqRows.map((r) => `| ${r.join(' | ')} |`),
      '',
    ].join('\n');
    process.stdout.write(md);
  } finally {
    clearInterval(sampler);
    await rgw.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
