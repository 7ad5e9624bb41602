/**
 * Benchmark: instant recovery. How soon does a VM backed up by bkfs run again, and how soon does it
 * stop depending on the backup?
 *
 *   node dist/bench/instant.js [--mode small|full] [--disk-mib N] [--data-mib N] [--work DIR] [--out FILE]
 *
 * The marker guest of test/helpers/libvirt.ts (TCG, host kernel, busybox initrd; it prints
 * `BKFS-MARKER <text>` once it has read its marker sector from /dev/vda) on a qcow2 disk of
 * `disk-mib` (default 2048, small mode 512) holding `data-mib` of random data (default half), backed
 * up with `bkfs backup --disk vda=IMG --config domain.xml=XML`, then:
 *   1. restore + boot: `bkfs restore web --to DIR --define NAME` (raw files), `virsh start`, until
 *      the marker is on the console. Reported: restore time, time to marker.
 *   2. instant: `bkfs instant-restore web --to DIR --define NAME --start` until the marker is on the
 *      console (time to marker), and until the command returns (time to independence: every disk
 *      copied, export stopped).
 * Both start from the same repository with a cold page cache (drop_caches before each run). The
 * TCG boot itself (~25 s of CPU) is in both times to marker; the difference is the restore.
 * Every domain and daemon it starts is destroyed/undefined/stopped on every exit path.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBuffer } from '../test/helpers/images';
import {
  buildMarkerInitrd,
  consoleLines,
  DEFAULT_MARKER_GUEST,
  markerDomainXml,
  markerGuestMissing,
  libvirtMissing,
  startDaemons,
  stopDaemons,
  virsh,
  virshTry,
  writeMarker,
  type Daemons,
} from '../test/helpers/libvirt';
import { run } from '../src/util/proc';

const MiB = 1 << 20;
const BKFS = path.resolve(__dirname, '../../bin/bkfs');

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

export interface InstantBenchResult {
  diskMiB: number;
  dataMiB: number;
  restoreBoot: { restoreSecs: number; markerSecs: number } | null;
  instant: { markerSecs: number; independentSecs: number } | null;
  errors: string[];
  durationSecs: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, cond: () => boolean, capMs: number): Promise<void> {
  const end = Date.now() + capMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`gave up waiting: ${what}`);
    await sleep(100);
  }
}

async function bkfsOk(args: string[]): Promise<string> {
  const r = await run(process.execPath, [BKFS, ...args], {
    allowFail: true,
    env: { ...process.env, CI: 'true' },
  });
  if (r.code !== 0) throw new Error(`bkfs ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

async function dropCaches(): Promise<void> {
  await run('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
}

async function main(): Promise<void> {
  const started = Date.now();
  const mode = arg('mode', 'full');
  const diskMiB = Number(arg('disk-mib', mode === 'small' ? '512' : '2048'));
  const dataMiB = Number(arg('data-mib', String(Math.floor(diskMiB / 2))));
  const outFile = arg('out', '');
  const missing = libvirtMissing() ?? markerGuestMissing();
  if (missing) throw new Error(`cannot run: ${missing}`);
  // The default scratch directory is made only when --work is not given (bench/run gives it).
  const work = path.resolve(arg('work', '') || fs.mkdtempSync('/var/tmp/bkfs-bench-instant-'));
  fs.mkdirSync(work, { recursive: true });
  fs.chmodSync(work, 0o755); // libvirt's QEMU must reach the images
  const res: InstantBenchResult = {
    diskMiB,
    dataMiB,
    restoreBoot: null,
    instant: null,
    errors: [],
    durationSecs: 0,
  };
  const names = [`bkfs-bench-restore-${process.pid}`, `bkfs-bench-instant-${process.pid}`];
  let daemons: Daemons = { started: [] };
  const instantDir = path.join(work, 'instant');
  try {
    daemons = await startDaemons();
    const spec = { ...DEFAULT_MARKER_GUEST, writes: 0 };
    const initrd = path.join(work, 'initrd');
    buildMarkerInitrd(initrd, spec);
    const raw = path.join(work, 'disk.raw');
    const fd = fs.openSync(raw, 'w');
    for (let off = 0; off < dataMiB; off += 64) {
      const n = Math.min(64, dataMiB - off);
      fs.writeSync(fd, randomBuffer(off + 1, n * MiB), 0, n * MiB, off * MiB);
    }
    fs.ftruncateSync(fd, diskMiB * MiB);
    fs.closeSync(fd);
    const marker = `bench-marker-${process.pid}`;
    writeMarker(raw, marker, spec);
    const img = path.join(work, 'disk.qcow2');
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, img]);
    fs.rmSync(raw);
    const consoleLog = path.join(work, 'console.log');
    const xml = path.join(work, 'domain.xml');
    fs.writeFileSync(
      xml,
      markerDomainXml('bkfs-bench-web', { initrd, disk: img, format: 'qcow2', consoleLog }),
    );
    const repo = path.join(work, 'repo');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--config', `domain.xml=${xml}`]);
    const markerSeen = () => consoleLines(consoleLog, 'BKFS-MARKER').some((l) => l.includes(marker));

    // 1. restore, then boot
    try {
      fs.rmSync(consoleLog, { force: true });
      await dropCaches();
      const restored = path.join(work, 'restored');
      fs.mkdirSync(restored, { mode: 0o755 }); // QEMU must reach the restored files (bkfs makes DIR 0700)
      fs.chmodSync(restored, 0o755);
      const t0 = Date.now();
      await bkfsOk(['-r', repo, 'restore', 'web', '--to', restored, '--define', names[0]!]);
      const restoreSecs = (Date.now() - t0) / 1000;
      await virsh('start', names[0]!);
      await until('the marker (restore + boot)', markerSeen, 900_000);
      res.restoreBoot = { restoreSecs, markerSecs: (Date.now() - t0) / 1000 };
      process.stderr.write(
        `restore+boot: restore ${restoreSecs.toFixed(1)} s, marker ${res.restoreBoot.markerSecs.toFixed(1)} s\n`,
      );
    } catch (e) {
      res.errors.push(`restore+boot: ${(e as Error).message}`);
    } finally {
      await virshTry('destroy', names[0]!);
      await virshTry('undefine', names[0]!);
    }

    // 2. instant-restore
    try {
      fs.rmSync(consoleLog, { force: true });
      await dropCaches();
      const t0 = Date.now();
      let markerAt = 0;
      const child = spawn(
        process.execPath,
        [
          BKFS,
          '-r',
          repo,
          'instant-restore',
          'web',
          '--to',
          instantDir,
          '--define',
          names[1]!,
          '--start',
          '--json',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CI: 'true' } },
      );
      let err = '';
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      child.stdout.resume();
      const code = new Promise<number | null>((r) => child.on('close', (c) => r(c)));
      const watch = setInterval(() => {
        if (markerAt === 0 && markerSeen()) markerAt = Date.now();
      }, 100);
      const rc = await code;
      const independentSecs = (Date.now() - t0) / 1000;
      if (rc !== 0) throw new Error(`instant-restore exited ${rc}: ${err.slice(-2000)}`);
      await until('the marker (instant)', markerSeen, 900_000);
      clearInterval(watch);
      if (markerAt === 0) markerAt = Date.now();
      res.instant = { markerSecs: (markerAt - t0) / 1000, independentSecs };
      process.stderr.write(
        `instant: marker ${res.instant.markerSecs.toFixed(1)} s, independent ${independentSecs.toFixed(1)} s\n`,
      );
    } catch (e) {
      res.errors.push(`instant: ${(e as Error).message}`);
    } finally {
      await virshTry('destroy', names[1]!);
      await virshTry('undefine', names[1]!);
      await run(
        process.execPath,
        [BKFS, 'serve', '--stop', '--listen', `unix:${instantDir}/bkfs-instant.sock`],
        {
          allowFail: true,
        },
      );
    }
  } finally {
    await stopDaemons(daemons);
    if (!process.argv.includes('--keep')) fs.rmSync(work, { recursive: true, force: true });
  }
  res.durationSecs = Math.round((Date.now() - started) / 1000);
  const json = JSON.stringify(res, null, 2) + '\n';
  if (outFile) fs.writeFileSync(outFile, json);
  process.stdout.write(json);
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/instant failed: ${(e as Error).message}\n`);
  process.exitCode = 1;
});
