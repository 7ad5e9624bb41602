/**
 * Benchmark: live backup of a running libvirt domain, bkfs against virtnbdbackup (Debian package
 * `virtnbdbackup`: apt-get install virtnbdbackup), on the same domain, same data, same host.
 *
 *   node dist/bench/libvirt.js [--disk-mib 2048] [--data-mib 1024] [--change-mib 128] [--keep]
 *
 * Builds two qcow2 disks (sda: `disk-mib` with `data-mib` of data; sdb: a quarter of both), half
 * incompressible random data and half text, starts a transient TCG domain on them (see
 * test/helpers/libvirt.ts), then runs three rounds, each a full, `change-mib` of guest-like writes
 * (4 MiB each, through QEMU, half random half text, fresh data every round) and an incremental:
 *   1. bkfs (zstd-1 chunks, dedup)       `bkfs backup --libvirt DOM --level full|inc`
 *   2. virtnbdbackup (stream format)     `virtnbdbackup -d DOM -l full|inc -o DIR`
 *   3. virtnbdbackup -z (lz4)            the same with `--compress`
 * Each round deletes the previous round's libvirt checkpoints first, so no tool pays for another's
 * bitmaps. Reported per run: wall time of the command, and bytes stored: bkfs = growth of the
 * repository (packs + index), virtnbdbackup = its `*.data` files (it also copies the kernel and
 * initrd of a direct-boot domain: listed separately, left out of the ratio). Ratios are
 * bkfs / virtnbdbackup (lower is better for bkfs). Everything it starts is stopped and removed.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBuffer, textFile } from '../test/helpers/images';
import { startDaemons, stopDaemons, TestDomain, virsh, type Daemons } from '../test/helpers/libvirt';
import { run } from '../src/util/proc';

const MiB = 1024 * 1024;
const BKFS = path.resolve(__dirname, '../../bin/bkfs');

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1] ?? def) : def;
}

/** Run a command, return its wall time in seconds; throws with its output on failure. */
function timed(cmd: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, CI: 'true' },
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code === 0) resolve(secs);
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${out.slice(-3000)}`));
    });
  });
}

/** Sum of file sizes under `dir` whose name matches `re`. */
function sizeOf(dir: string, re: RegExp = /./): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile() && re.test(e.name)) n += fs.statSync(path.join(e.parentPath, e.name)).size;
  }
  return n;
}

/** Fill `[0, mib)` MiB of a qcow2 image: even 64 MiB pieces random, odd pieces text. */
async function fill(img: string, mib: number, seed: number, tmp: string): Promise<void> {
  const piece = 64;
  for (let off = 0, i = 0; off < mib; off += piece, i++) {
    const len = Math.min(piece, mib - off);
    const f = path.join(tmp, 'fill.bin');
    fs.writeFileSync(
      f,
      i % 2 === 0 ? randomBuffer(seed + i, len * MiB) : textFile(seed + i, len * MiB).subarray(0, len * MiB),
    );
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -s ${f} ${off}M ${len}M`, img]);
  }
  fs.rmSync(path.join(tmp, 'fill.bin'), { force: true });
}

/** `mib` MiB of guest-like writes, 4 MiB each at spread offsets, fresh data for `seed`. */
async function changes(
  dom: TestDomain,
  dir: string,
  mib: number,
  seed: number,
  sizes: Record<string, number>,
): Promise<void> {
  const targets = Object.keys(sizes);
  for (let i = 0; i < mib / 4; i++) {
    const t = targets[i % targets.length]!;
    const slots = Math.floor(sizes[t]! / 4);
    const off = (((i * 7919 + seed * 104729) % slots) + slots) % slots;
    const f = path.join(dir, `chg-${seed}-${i}.bin`);
    fs.writeFileSync(
      f,
      i % 2 === 0
        ? randomBuffer(seed * 1000 + i, 4 * MiB)
        : textFile(seed * 1000 + i, 4 * MiB).subarray(0, 4 * MiB),
    );
    fs.chmodSync(f, 0o644); // QEMU (libvirt-qemu) reads it
    await dom.qemuIo(t, `write -s ${f} ${off * 4}M 4M`);
    fs.rmSync(f);
  }
}

async function deleteAllCheckpoints(dom: TestDomain): Promise<void> {
  for (const n of (await dom.checkpointNames()).reverse()) {
    await virsh('checkpoint-delete', dom.name, n).catch(() =>
      virsh('checkpoint-delete', dom.name, n, '--metadata'),
    );
  }
}

interface Round {
  tool: string;
  full: number;
  inc: number;
  storedFull: number;
  storedInc: number;
  extra?: number;
}

async function main(): Promise<void> {
  const diskMib = arg('disk-mib', 2048);
  const dataMib = arg('data-mib', 1024);
  const changeMib = arg('change-mib', 128);
  const keep = process.argv.includes('--keep');
  const work = fs.mkdtempSync('/var/tmp/bkfs-bench-libvirt-');
  fs.chmodSync(work, 0o755);
  let daemons: Daemons = { started: [] };
  let dom: TestDomain | undefined;
  const rounds: Round[] = [];
  try {
    const sizes = { sda: diskMib, sdb: Math.max(64, Math.floor(diskMib / 4)) };
    const imgs = { sda: path.join(work, 'sda.qcow2'), sdb: path.join(work, 'sdb.qcow2') };
    for (const [t, img] of Object.entries(imgs)) {
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, `${sizes[t as 'sda']}M`]);
    }
    console.error(`bench: writing ${dataMib} + ${Math.floor(dataMib / 4)} MiB of data`);
    await fill(imgs.sda, dataMib, 1, work);
    await fill(imgs.sdb, Math.floor(dataMib / 4), 100, work);
    daemons = await startDaemons();
    const name = `bkfs-lvbench-${process.pid}`;
    dom = await TestDomain.create(work, name, [
      { target: 'sda', file: imgs.sda, format: 'qcow2' },
      { target: 'sdb', file: imgs.sdb, format: 'qcow2' },
    ]);
    const scratch = path.join(work, 'scratch');
    fs.mkdirSync(scratch, { mode: 0o755 });

    // 1. bkfs
    const repo = path.join(work, 'repo');
    await run(process.execPath, [BKFS, '-r', repo, 'init']);
    const bk = (level: string) =>
      timed(process.execPath, [
        BKFS,
        '-r',
        repo,
        'backup',
        'bench',
        '--libvirt',
        name,
        '--level',
        level,
        '--scratch-dir',
        scratch,
      ]);
    const r0 = sizeOf(repo);
    console.error('bench: bkfs full');
    const bFull = await bk('full');
    const r1 = sizeOf(repo);
    await changes(dom, work, changeMib, 1, sizes);
    console.error('bench: bkfs inc');
    const bInc = await bk('inc');
    rounds.push({ tool: 'bkfs', full: bFull, inc: bInc, storedFull: r1 - r0, storedInc: sizeOf(repo) - r1 });

    // 2./3. virtnbdbackup, plain and lz4
    for (const [tool, extra, seed] of [
      ['virtnbdbackup', [] as string[], 2],
      ['virtnbdbackup -z', ['--compress'], 3],
    ] as const) {
      await deleteAllCheckpoints(dom);
      const out = path.join(work, `vnb-${seed}`);
      const vb = (level: string) =>
        timed('virtnbdbackup', ['-d', name, '-l', level, '-o', out, '-n', '-S', scratch, ...extra]);
      console.error(`bench: ${tool} full`);
      const full = await vb('full');
      const d1 = sizeOf(out, /\.data$/);
      await changes(dom, work, changeMib, seed, sizes);
      console.error(`bench: ${tool} inc`);
      const inc = await vb('inc');
      rounds.push({
        tool,
        full,
        inc,
        storedFull: d1,
        storedInc: sizeOf(out, /\.data$/) - d1,
        extra: sizeOf(out, /^(vmlinuz|initrd)/),
      });
    }
  } finally {
    await dom?.destroy().catch(() => undefined);
    await stopDaemons(daemons);
    if (!keep) fs.rmSync(work, { recursive: true, force: true });
  }

  const mb = (n: number) => (n / MiB).toFixed(1);
  console.log(
    `disks: sda ${diskMib} MiB (${dataMib} MiB data), sdb ${Math.max(64, Math.floor(diskMib / 4))} MiB; changes ${changeMib} MiB`,
  );
  console.log('tool               full s   inc s   full stored MiB   inc stored MiB');
  for (const r of rounds) {
    console.log(
      `${r.tool.padEnd(17)} ${r.full.toFixed(2).padStart(7)} ${r.inc.toFixed(2).padStart(7)} ${mb(r.storedFull).padStart(17)} ${mb(r.storedInc).padStart(16)}${r.extra ? `   (+${mb(r.extra)} MiB kernel/initrd copies)` : ''}`,
    );
  }
  const b = rounds[0]!;
  for (const r of rounds.slice(1)) {
    console.log(
      `bkfs / ${r.tool}: full time ${(b.full / r.full).toFixed(2)}, inc time ${(b.inc / r.inc).toFixed(2)}, full stored ${(b.storedFull / r.storedFull).toFixed(2)}, inc stored ${(b.storedInc / r.storedInc).toFixed(2)}`,
    );
  }
  console.log(JSON.stringify({ diskMib, dataMib, changeMib, rounds }));
}

main().catch((e: unknown) => {
  console.error((e as Error).stack ?? String(e));
  process.exitCode = 1;
});
