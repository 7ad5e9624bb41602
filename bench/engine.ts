/**
 * Backup-engine figures: bkfs's full backup of a qcow2 that is half random data, half zeros
 * (unallocated), read through qemu-nbd, against `qemu-img convert -O raw` of the same image and
 * `nbdcopy` from a `qemu-nbd -r` export of it to a file; an incremental after 1 % of the disk
 * changed, as a share of the full's time; index bytes per GiB backed up; peak RSS of the bkfs
 * process for two image sizes.
 *
 *   node dist/bench/engine.js --mode small|full --work DIR --out FILE.json [--bkfs BIN] [--runs N]
 *
 * These figures measure the pipeline, not the disk: before every timed run the image is read
 * into the page cache (for every tool alike), and every run is timed up to a `sync` after it.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { randomBuffer } from '../test/helpers/images';
import {
  arg,
  errMsg,
  GiB,
  installSignalHandlers,
  log,
  MiB,
  rmTree,
  setLogFile,
  setRegistry,
  sh,
  stat,
  timed,
  type Stat,
} from './lib/common';
import { HELPER, PYTHON, qemuNbd } from './lib/dataset';
import type { EngineResult } from './lib/report';

const mode = arg('mode', 'small') === 'full' ? 'full' : 'small';
const small = mode === 'small';
const WORK = path.resolve(arg('work', `/var/tmp/bkfs-engine-${process.pid}`));
const OUT = path.resolve(arg('out', path.join(WORK, 'engine.json')));
const BKFS = path.resolve(arg('bkfs', path.join(__dirname, '../../bin/bkfs')));
const RUNS = Number(arg('runs', small ? '1' : '3'));
const MAIN_MIB = small ? 1024 : 4096;
const RSS_MIB = small ? [512, 1024] : [1024, 4096];
/** A large, mostly unallocated disk for the peak-RSS check (issue 16: flat up to 40 GiB). */
const SPARSE_MIB = small ? 8192 : 40960;
const BLOCK = 32 * MiB;

/**
 * qcow2 of `sizeMiB`: 32 MiB blocks of random data, every `every`-th block (default 2: half the
 * disk), the rest unallocated zeros.
 */
async function halfImage(file: string, sizeMiB: number, every = 2): Promise<number> {
  const raw = `${file}.raw`;
  const fh = await fsp.open(raw, 'w');
  let data = 0;
  try {
    await fh.truncate(sizeMiB * MiB);
    for (let off = 0, i = 0; off < sizeMiB * MiB; off += BLOCK, i++) {
      if (i % every !== 0) continue;
      const b = randomBuffer(9000 + i, BLOCK);
      await fh.write(b, 0, b.length, off);
      data += b.length;
    }
  } finally {
    await fh.close();
  }
  await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  await fsp.rm(raw, { force: true });
  return data;
}

/** Read the image into the page cache, then write back everything dirty, so each timed run starts alike. */
async function warm(file: string): Promise<void> {
  await sh('sh', ['-c', `cat '${file}' > /dev/null`]);
  await sh('sync', []);
}

async function bitmaps(image: string): Promise<string[]> {
  const info = JSON.parse((await sh('qemu-img', ['info', '--output=json', image])).stdout) as {
    'format-specific'?: { data?: { bitmaps?: { name: string }[] } };
  };
  return (info['format-specific']?.data?.bitmaps ?? []).map((b) => b.name);
}

/** The bitmaps a repository recorded (named after checkpoint uids: the index knows which). */
function repoBitmaps(repo: string): Set<string> {
  const db = new Database(path.join(repo, 'index.db'), { readonly: true });
  try {
    const rows = db.prepare('SELECT bitmap FROM disks WHERE bitmap IS NOT NULL').all() as {
      bitmap: string;
    }[];
    return new Set(rows.map((r) => r.bitmap));
  } finally {
    db.close();
  }
}

/** A bkfs backup under /usr/bin/time -v: wall seconds (to a sync after it) and peak RSS in bytes. */
async function bkfsBackup(
  repo: string,
  image: string,
  level: string,
): Promise<{ secs: number; rss: number; cpu: number; cpuSecs: number }> {
  const tv = path.join(WORK, 'time-v.txt');
  const secs = await timed(async () => {
    await sh('/usr/bin/time', [
      '-v',
      '-o',
      tv,
      BKFS,
      '-r',
      repo,
      'backup',
      'vm',
      '--disk',
      `vda=${image}`,
      '--level',
      level,
    ]);
    await sh('sync', []);
  });
  const text = await fsp.readFile(tv, 'utf8');
  const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(text);
  const c = /Percent of CPU this job got: (\d+)%/.exec(text);
  const u = /User time \(seconds\): ([\d.]+)/.exec(text);
  const sy = /System time \(seconds\): ([\d.]+)/.exec(text);
  return {
    secs,
    rss: m ? Number(m[1]) * 1024 : 0,
    cpu: c ? Number(c[1]) : NaN,
    cpuSecs: u && sy ? Number(u[1]) + Number(sy[1]) : NaN,
  };
}

async function indexBytes(repo: string): Promise<number> {
  const db = path.join(repo, 'index.db');
  await sh('sqlite3', [db, 'PRAGMA wal_checkpoint(TRUNCATE);'], { allowFail: true });
  let n = 0;
  for (const f of [db, `${db}-wal`]) if (fs.existsSync(f)) n += fs.statSync(f).size;
  return n;
}

/** Write 1 % of the disk (random data, 1 MiB pieces at random 64 KiB-aligned offsets) through qemu-nbd. */
async function changeOnePercent(image: string, sizeMiB: number, seed: number): Promise<void> {
  const pieces = Math.max(1, Math.round(sizeMiB / 100));
  const raw = path.join(WORK, 'change.raw');
  const ext: { offset: number; length: number }[] = [];
  const fh = await fsp.open(raw, 'w');
  try {
    await fh.truncate(sizeMiB * MiB);
    const r = randomBuffer(seed, pieces * 8);
    const slots = (sizeMiB * MiB) / (64 * 1024) - 16;
    const used = new Set<number>();
    for (let i = 0; i < pieces; i++) {
      let s = r.readUInt32LE(i * 8) % slots;
      while ([...Array(16).keys()].some((k) => used.has(s + k) || used.has(s - k))) s = (s + 17) % slots;
      used.add(s);
      const off = s * 64 * 1024;
      await fh.write(randomBuffer(seed * 1000 + i, MiB), 0, MiB, off);
      ext.push({ offset: off, length: MiB });
    }
  } finally {
    await fh.close();
  }
  const extFile = path.join(WORK, 'change.json');
  await fsp.writeFile(extFile, JSON.stringify(ext));
  const src = await qemuNbd(raw, path.join(WORK, 'chg-src.sock'), { readOnly: true, format: 'raw' });
  try {
    const dst = await qemuNbd(image, path.join(WORK, 'chg-dst.sock'), { readOnly: false });
    try {
      await sh(PYTHON, [HELPER, 'copy', src.uri, dst.uri, extFile]);
    } finally {
      await dst.stop();
    }
  } finally {
    await src.stop();
  }
  await fsp.rm(raw, { force: true });
}

const s = (xs: number[]): Stat | null => stat(xs);

/** Wall ms of `bkfs --help`, `bkfs list` (an empty repository) and `node -e 0`, 15 runs each. */
async function startup(): Promise<{ help: Stat | null; list: Stat | null; node: Stat | null }> {
  const repo = path.join(WORK, 'startup-repo');
  await sh(BKFS, ['-r', repo, 'init']);
  const times = async (cmd: string, args: string[]): Promise<Stat | null> => {
    const xs: number[] = [];
    for (let i = 0; i < 15; i++) xs.push(1000 * (await timed(() => sh(cmd, args))));
    return s(xs);
  };
  const r = {
    node: await times(process.execPath, ['-e', '0']),
    help: await times(BKFS, ['--help']),
    list: await times(BKFS, ['-r', repo, 'list']),
  };
  await rmTree(repo);
  log(
    `engine: start-up (median of 15): node -e 0 ${r.node?.median.toFixed(0)} ms, bkfs --help ${r.help?.median.toFixed(0)} ms, bkfs list ${r.list?.median.toFixed(0)} ms`,
  );
  return r;
}

async function main(): Promise<void> {
  const t0 = Date.now();
  await fsp.mkdir(WORK, { recursive: true });
  setLogFile(path.join(WORK, 'engine.log'));
  setRegistry(WORK);
  installSignalHandlers();
  const res: EngineResult = { mode, runs: RUNS, imageMiB: MAIN_MIB, errors: [] };
  try {
    const img = path.join(WORK, 'half.qcow2');
    const dataBytes = await halfImage(img, MAIN_MIB);
    res.dataBytes = dataBytes;
    log(
      `engine: ${MAIN_MIB} MiB qcow2, ${(dataBytes / MiB).toFixed(0)} MiB random data, the rest unallocated`,
    );
    const vsize = MAIN_MIB * MiB;
    const full: number[] = [];
    const rss: number[] = [];
    const cpu: number[] = [];
    const cpuSecs: number[] = [];
    const convert: number[] = [];
    const copy: number[] = [];
    const mainRepo = path.join(WORK, 'repo-main');
    for (let r = 0; r < RUNS; r++) {
      // bkfs full (the last run's repository is kept for the incrementals).
      const repo = r === RUNS - 1 ? mainRepo : path.join(WORK, `repo-${r}`);
      await sh(BKFS, ['-r', repo, 'init']);
      await warm(img);
      const b = await bkfsBackup(repo, img, 'full');
      full.push(b.secs);
      rss.push(b.rss);
      cpu.push(b.cpu);
      cpuSecs.push(b.cpuSecs / (dataBytes / GiB));
      log(
        `engine: bkfs full ${r + 1}/${RUNS}: ${b.secs.toFixed(2)} s, peak RSS ${(b.rss / MiB).toFixed(0)} MiB, CPU ${b.cpu} %`,
      );
      if (repo !== mainRepo) {
        const own = repoBitmaps(repo);
        for (const n of await bitmaps(img))
          if (own.has(n)) await sh('qemu-img', ['bitmap', '--remove', img, n]);
        await rmTree(repo);
      }
      // qemu-img convert -O raw.
      const out = path.join(WORK, 'out.raw');
      await warm(img);
      convert.push(
        await timed(async () => {
          await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out]);
          await sh('sync', []);
        }),
      );
      await fsp.rm(out, { force: true });
      // nbdcopy from a qemu-nbd -r export to a file.
      const srv = await qemuNbd(img, path.join(WORK, 'copy.sock'), { readOnly: true });
      try {
        await warm(img);
        copy.push(
          await timed(async () => {
            await sh('nbdcopy', [srv.uri, out]);
            await sh('sync', []);
          }),
        );
      } finally {
        await srv.stop();
      }
      await fsp.rm(out, { force: true });
      log(`engine: qemu-img convert ${convert[r]?.toFixed(2)} s, nbdcopy ${copy[r]?.toFixed(2)} s`);
    }
    res.full = s(full);
    res.fullCpuPercent = s(cpu.filter((x) => Number.isFinite(x)));
    res.fullCpuSecsPerGiB = s(cpuSecs.filter((x) => Number.isFinite(x)));
    res.nproc = os.availableParallelism();
    res.convert = s(convert);
    res.nbdcopy = s(copy);
    res.rss = { [String(MAIN_MIB)]: s(rss) };
    res.indexBytes = await indexBytes(mainRepo);
    res.indexBytesPerGiB = res.indexBytes / (dataBytes / GiB);
    res.repoBytes = Number((await sh('du', ['-s', '--block-size=1', mainRepo])).stdout.split(/\s/)[0]);
    const fm = res.full?.median ?? NaN;
    res.virtualMBs = vsize / 1e6 / fm;
    res.dataMBs = dataBytes / 1e6 / fm;
    res.vsConvert = fm / (res.convert?.median ?? NaN);
    res.vsNbdcopy = fm / (res.nbdcopy?.median ?? NaN);

    // Incrementals after 1 % changes.
    const inc: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      await changeOnePercent(img, MAIN_MIB, 77 + r);
      await warm(img);
      const b = await bkfsBackup(mainRepo, img, 'inc');
      inc.push(b.secs);
      log(`engine: bkfs incremental after 1 % change ${r + 1}/${RUNS}: ${b.secs.toFixed(2)} s`);
    }
    res.inc = s(inc);
    res.incPercentOfFull = (100 * (res.inc?.median ?? NaN)) / fm;
    await fsp.rm(img, { force: true });
    await rmTree(mainRepo);

    // Peak RSS on the other image size.
    for (const mib of RSS_MIB) {
      if (mib === MAIN_MIB) continue;
      const im = path.join(WORK, `rss${mib}.qcow2`);
      await halfImage(im, mib);
      const xs: number[] = [];
      for (let r = 0; r < RUNS; r++) {
        const repo = path.join(WORK, `rss-repo-${r}`);
        await sh(BKFS, ['-r', repo, 'init']);
        await warm(im);
        const b = await bkfsBackup(repo, im, 'full');
        xs.push(b.rss);
        log(
          `engine: bkfs full of ${mib} MiB: ${b.secs.toFixed(2)} s, peak RSS ${(b.rss / MiB).toFixed(0)} MiB`,
        );
        await rmTree(repo);
      }
      res.rss[String(mib)] = s(xs);
      await fsp.rm(im, { force: true });
    }
    {
      // Flat in disk size: a large disk with one 32 MiB block of data in 20.
      const im = path.join(WORK, `sparse${SPARSE_MIB}.qcow2`);
      const data = await halfImage(im, SPARSE_MIB, 20);
      const xs: number[] = [];
      for (let r = 0; r < RUNS; r++) {
        const repo = path.join(WORK, `sparse-repo-${r}`);
        await sh(BKFS, ['-r', repo, 'init']);
        await warm(im);
        const b = await bkfsBackup(repo, im, 'full');
        xs.push(b.rss);
        log(
          `engine: bkfs full of ${SPARSE_MIB} MiB (${(data / MiB).toFixed(0)} MiB data): ${b.secs.toFixed(2)} s, peak RSS ${(b.rss / MiB).toFixed(0)} MiB`,
        );
        await rmTree(repo);
      }
      res.rss[String(SPARSE_MIB)] = s(xs);
      await fsp.rm(im, { force: true });
    }
    res.startupMs = await startup();
  } catch (e) {
    log(`engine: stopped: ${errMsg(e)}`);
    res.errors.push(errMsg(e));
    process.exitCode = 1;
  } finally {
    res.durationSecs = Math.round((Date.now() - t0) / 1000);
    fs.writeFileSync(OUT, JSON.stringify(res, null, 2));
    log(`engine: results in ${OUT} (${res.durationSecs} s)`);
  }
}

main().catch((e: unknown) => {
  log(`engine failed: ${errMsg(e)}`);
  process.exitCode = 1;
});
