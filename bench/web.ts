/**
 * Benchmark of `bkfs web` downloads (not part of the tests; needs root, qemu-utils,
 * libguestfs-tools, curl).
 *
 *   node dist/bench/web.js [--file-mib 1024] [--work DIR] [--keep] [--json]
 *
 * Builds with the real CLI a qcow2 disk (GPT, ext4) holding one incompressible file of `file-mib`
 * MiB, backs it up, starts `bkfs web --daemon` (HTTPS, self-signed certificate, default engine:
 * libguestfs, TCG unless LIBGUESTFS_BACKEND_SETTINGS is set) and measures:
 *   - the file: `curl` of /download over HTTPS (after one request that starts the VM's appliance,
 *     timed separately) against `bkfs cp` (which starts its own appliance: its time includes it);
 *   - the whole disk: `curl` of /disks/vda over HTTPS against `bkfs restore --disk vda`;
 * and checks every download's sha256 / `qemu-img compare`. Prints a table (or JSON).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk } from '../test/helpers/cli';
import { makeDisk } from '../test/helpers/images';
import { run } from '../src/util/proc';

const MiB = 1 << 20;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

async function timed<T>(fn: () => Promise<T>): Promise<{ s: number; value: T }> {
  const t0 = process.hrtime.bigint();
  const value = await fn();
  return { s: Number(process.hrtime.bigint() - t0) / 1e9, value };
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of fs.createReadStream(file, { highWaterMark: 4 * MiB })) h.update(c as Buffer);
  return h.digest('hex');
}

/** A deterministic incompressible file written in 16 MiB steps (no 1 GiB buffer in memory). */
function writeRandomFile(file: string, bytes: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    let seed = createHash('sha256').update('bkfs-bench-web').digest();
    for (let off = 0; off < bytes;) {
      const n = Math.min(16 * MiB, bytes - off);
      const buf = Buffer.alloc(n);
      for (let i = 0; i < n; i += 32) {
        seed = createHash('sha256').update(seed).digest();
        seed.copy(buf, i, 0, Math.min(32, n - i));
      }
      fs.writeSync(fd, buf);
      off += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

export async function main(): Promise<void> {
  process.env.LIBGUESTFS_BACKEND = process.env.LIBGUESTFS_BACKEND ?? 'direct';
  process.env.LIBGUESTFS_BACKEND_SETTINGS = process.env.LIBGUESTFS_BACKEND_SETTINGS ?? 'force_tcg';
  const fileMiB = Number(arg('file-mib', '1024'));
  const keep = process.argv.includes('--keep');
  const json = process.argv.includes('--json');
  const work = arg('work', '') || fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-bench-web-'));
  const log = (s: string) => process.stderr.write(`bench/web: ${s}\n`);
  const env = { BKFS_WEB_DIR: path.join(work, 'state') };
  const repo = path.join(work, 'repo');
  const img = path.join(work, 'disk.qcow2');
  let started = false;
  try {
    const src = path.join(work, 'big.bin');
    log(`writing a ${fileMiB} MiB file and a disk holding it`);
    writeRandomFile(src, fileMiB * MiB);
    // makeDisk takes contents in memory: build the filesystem from a directory instead.
    const tree = path.join(work, 'tree');
    fs.mkdirSync(path.join(tree, 'data'), { recursive: true });
    fs.renameSync(src, path.join(tree, 'data', 'big.bin'));
    const fsSize = fileMiB + 128;
    const fsImg = path.join(work, 'root.ext4');
    await run('mkfs.ext4', ['-q', '-F', '-L', 'root', '-d', tree, fsImg, `${fsSize}M`]);
    await makeDisk(path.join(work, 'disk.raw'), {
      format: 'raw',
      sizeMiB: fsSize + 4,
      table: 'gpt',
      partitions: [{ fs: 'none', sizeMiB: fsSize }],
    });
    await run('dd', [
      `if=${fsImg}`,
      `of=${path.join(work, 'disk.raw')}`,
      'bs=4M',
      `seek=${1 * MiB}`,
      'oflag=seek_bytes',
      'conv=notrunc,sparse',
      'status=none',
    ]);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(work, 'disk.raw'), img]);
    fs.rmSync(path.join(work, 'disk.raw'));
    fs.rmSync(fsImg);
    const want = await sha256File(path.join(tree, 'data', 'big.bin'));
    fs.rmSync(tree, { recursive: true });
    await bkfsOk(['-r', repo, 'init']);
    log('backing up');
    await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
    const token = JSON.parse((await bkfsOk(['web', 'token', 'add', 'bench', '--json'], env)).stdout)
      .token as string;
    const info = JSON.parse(
      (
        await bkfsOk(
          ['-r', repo, 'web', '--daemon', '--json', '--listen', '127.0.0.1:0', '--idle-timeout', '30m'],
          env,
        )
      ).stdout,
    ) as { url: string; certificate: string };
    started = true;
    const curl = (url: string, out: string) =>
      run('curl', [
        '-sS',
        '--fail',
        '--cacert',
        info.certificate,
        '-H',
        `Authorization: Bearer ${token}`,
        '-o',
        out,
        url,
      ]);
    const fileUrl = `${info.url}api/vms/vm/checkpoints/latest/download?path=/data/big.bin`;
    const diskUrl = `${info.url}api/vms/vm/checkpoints/latest/disks/vda`;
    log('starting the appliance (first request)');
    const launch = await timed(() =>
      curl(`${info.url}api/vms/vm/checkpoints/latest/stat?path=/data/big.bin`, path.join(work, 'stat.json')),
    );
    const bytes = fileMiB * MiB;
    const out1 = path.join(work, 'web-file');
    log('web file download');
    const webFile = await timed(() => curl(fileUrl, out1));
    if ((await sha256File(out1)) !== want) throw new Error('web download differs from the source file');
    fs.rmSync(out1);
    const out2 = path.join(work, 'cp-file');
    log('bkfs cp');
    const cp = await timed(() => bkfsOk(['-r', repo, 'cp', 'vm:/data/big.bin', out2]));
    if ((await sha256File(out2)) !== want) throw new Error('bkfs cp differs from the source file');
    fs.rmSync(out2);
    const out3 = path.join(work, 'web-disk.raw');
    log('web disk download');
    const webDisk = await timed(() => curl(diskUrl, out3));
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', out3, img]);
    const diskBytes = fs.statSync(out3).size;
    fs.rmSync(out3);
    const out4 = path.join(work, 'restore.raw');
    log('bkfs restore');
    const restore = await timed(() => bkfsOk(['-r', repo, 'restore', 'vm', '--disk', 'vda', '--to', out4]));
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', out4, img]);
    fs.rmSync(out4);
    const rate = (b: number, s: number) => b / MiB / s;
    const rows = [
      {
        what: `file ${fileMiB} MiB: bkfs web (HTTPS, appliance already running)`,
        seconds: webFile.s,
        mibPerSec: rate(bytes, webFile.s),
      },
      {
        what: `file ${fileMiB} MiB: bkfs cp (includes its appliance launch)`,
        seconds: cp.s,
        mibPerSec: rate(bytes, cp.s),
      },
      { what: 'bkfs web: first request of a VM (appliance launch)', seconds: launch.s, mibPerSec: null },
      {
        what: `disk ${diskBytes / MiB} MiB: bkfs web /disks/vda (HTTPS, zeros sent)`,
        seconds: webDisk.s,
        mibPerSec: rate(diskBytes, webDisk.s),
      },
      {
        what: `disk ${diskBytes / MiB} MiB: bkfs restore --disk (sparse file)`,
        seconds: restore.s,
        mibPerSec: rate(diskBytes, restore.s),
      },
    ];
    if (json) process.stdout.write(`${JSON.stringify({ fileMiB, rows }, null, 2)}\n`);
    else {
      process.stdout.write('| measurement | seconds | MiB/s |\n|---|---|---|\n');
      for (const r of rows)
        process.stdout.write(
          `| ${r.what} | ${r.seconds.toFixed(2)} | ${r.mibPerSec === null ? '-' : r.mibPerSec.toFixed(1)} |\n`,
        );
    }
  } finally {
    if (started) await bkfs(['web', 'stop'], env);
    if (!keep) fs.rmSync(work, { recursive: true, force: true });
  }
}

if (require.main === module) {
  main().catch((e: unknown) => {
    process.stderr.write(`bench/web: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
