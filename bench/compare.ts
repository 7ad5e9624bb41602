/**
 * bkfs beside the tools users would pick instead, on one disk image and one history.
 *
 *   node dist/bench/compare.js --mode small|full --work DIR --out FILE.json [--bkfs BIN]
 *                              [--runs N] [--checkpoints N] [--size-mib N] [--only a,b]
 *
 * Run through `bash bench/run`, which installs the tools, starts libvirt when needed and releases
 * everything on every exit path. Steps:
 *   1. the dataset (lib/dataset.ts): a GPT + ext4 disk and N-1 days of guest writes, made once;
 *   2. full backups (R runs per tool; the last one is kept), then the history: each state is
 *      written into every qcow2 tool's working image through qemu-nbd and given to raw tools as a
 *      raw file, and every tool takes an incremental backup (dd: none);
 *   3. stored bytes; sequential read (dd bs=1M) of the newest and the oldest checkpoint and
 *      random 4 KiB reads (fio) of the newest through each tool's mount; time to restore one small
 *      file (mount + loop mount of the ext4 partition + cp) and a whole disk (R runs each).
 * Before every timed step: `sync; echo 3 > /proc/sys/vm/drop_caches`, for every tool alike; every
 * mount is fresh, so tools start with empty caches of their own too. Backups and disk restores
 * are timed up to a `sync` after the command, so tools that do not fsync are not favoured.
 * A tool or command that is missing or fails gives `n/a` (with the reason) and the rest goes on.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  allocatedBytes,
  arg,
  dropCaches,
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
  withExt4ReadOnly,
} from './lib/common';
import { makeDataset, qemuNbd, replayDelta, stateRaw, type Dataset } from './lib/dataset';
import {
  Bkfs,
  Borg,
  DdRaw,
  NotSupported,
  QemuChain,
  Restic,
  Tool,
  VirtNbdBackup,
  logNotes,
} from './lib/tools';
import type { Baselines, Cell, CompareResult, Metric } from './lib/report';

const mode = arg('mode', 'small') === 'full' ? 'full' : 'small';
const small = mode === 'small';
const WORK = path.resolve(arg('work', `/var/tmp/bkfs-bench-${process.pid}`));
const OUT = path.resolve(arg('out', path.join(WORK, 'compare.json')));
const BKFS = path.resolve(arg('bkfs', path.join(__dirname, '../../bin/bkfs')));
const RUNS = Number(arg('runs', small ? '1' : '3'));
const CHECKPOINTS = Number(arg('checkpoints', small ? '3' : '10'));
const SIZE_MIB = Number(arg('size-mib', small ? '512' : '4096'));
const ONLY = arg('only', '');
/** Cap of one sequential read, so that a very slow mount cannot stall the run (reported as partial). */
const SEQ_CAP_SECS = Number(arg('seq-cap', small ? '60' : '240'));
const FIO_SECS = Number(arg('fio-secs', small ? '3' : '10'));

class Results {
  readonly metrics: Metric[] = [];

  metric(id: string, label: string, unit: string, better: 'lower' | 'higher'): Metric {
    let m = this.metrics.find((x) => x.id === id);
    if (!m) {
      m = { id, label, unit, better, cells: {} };
      this.metrics.push(m);
    }
    return m;
  }

  add(id: string, tool: string, v: number, partial = false): void {
    const m = this.metrics.find((x) => x.id === id) as Metric;
    const c = m.cells[tool];
    if (c && 'samples' in c) {
      c.samples.push(v);
      if (partial) c.partial = true;
    } else {
      m.cells[tool] = { samples: [v], ...(partial ? { partial: true } : {}) };
    }
  }

  na(id: string, tool: string, reason: string): void {
    const m = this.metrics.find((x) => x.id === id) as Metric;
    const c = m.cells[tool];
    if (!c || !('samples' in c)) m.cells[tool] = { na: reason };
  }

  note(id: string, tool: string, note: string): void {
    const m = this.metrics.find((x) => x.id === id) as Metric;
    const c: Cell = m.cells[tool] ?? { na: note };
    c.note = note;
    m.cells[tool] = c;
  }
}

const R = new Results();
R.metric('full', 'Full backup', 's', 'lower');
R.metric('inc', 'Incremental backup (median over the history)', 's', 'lower');
R.metric('stored', 'Stored after the history', 'GiB', 'lower');
R.metric('mount', 'Mount of the newest checkpoint', 's', 'lower');
R.metric('seqNew', 'Sequential read, newest', 'MiB/s', 'higher');
R.metric('seqOld', 'Sequential read, oldest', 'MiB/s', 'higher');
R.metric('iops', 'Random 4 KiB reads, newest', 'IOPS', 'higher');
R.metric('file', 'Restore one small file', 's', 'lower');
R.metric('disk', 'Restore the whole disk', 's', 'lower');

const errors: string[] = [];
const baselines: Baselines = { convertRaw: [], nbdcopy: [], bkfsFullCpuSecs: [] };

/**
 * `qemu-img convert -O raw` and `nbdcopy` (from `qemu-nbd -r`, as bkfs reads) of the full's image
 * to a file on the same disk, each after dropping the caches and timed up to a `sync`, as the
 * tools' full backups are.
 */
async function fullBaselines(ds: Dataset): Promise<void> {
  const out = path.join(WORK, 'baseline.raw');
  try {
    await dropCaches();
    const c = await timed(async () => {
      await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', ds.base, out]);
      await sh('sync', []);
    });
    baselines.convertRaw.push(c);
    await fsp.rm(out, { force: true });
    const srv = await qemuNbd(ds.base, path.join(WORK, 'baseline.sock'), { readOnly: true });
    try {
      await dropCaches();
      const n = await timed(async () => {
        await sh('nbdcopy', [srv.uri, out]);
        await sh('sync', []);
      });
      baselines.nbdcopy.push(n);
    } finally {
      await srv.stop();
    }
    log(
      `baselines: qemu-img convert -O raw ${c.toFixed(2)} s, nbdcopy ${baselines.nbdcopy.at(-1)?.toFixed(2)} s`,
    );
  } catch (e) {
    log(`baselines failed: ${errMsg(e)}`);
    errors.push(`baselines: ${errMsg(e)}`);
  } finally {
    await fsp.rm(out, { force: true });
  }
}

function fail(metric: string, t: Tool, e: unknown): void {
  const msg = errMsg(e);
  if (msg === 'interrupted') {
    R.na(metric, t.id, msg);
    return;
  }
  if (e instanceof NotSupported) {
    R.na(metric, t.id, msg);
    return;
  }
  log(`${t.id}: ${metric} failed: ${msg}`);
  errors.push(`${t.id} ${metric}: ${msg}`);
  R.na(metric, t.id, `failed: ${msg.slice(0, 200)}`);
}

async function syncSecs(): Promise<number> {
  return timed(() => sh('sync', []));
}

async function seqRead(file: string): Promise<{ mibs: number; partial: boolean; bytes: number }> {
  const r = await sh(
    'timeout',
    ['-s', 'INT', String(SEQ_CAP_SECS), 'dd', `if=${file}`, 'of=/dev/null', 'bs=1M'],
    {
      allowFail: true,
    },
  );
  const m = /(\d+) bytes.*copied, ([\d.]+) s/.exec(r.stderr);
  if ((r.code !== 0 && r.code !== 124) || !m)
    throw new Error(`dd failed (${r.code}): ${r.stderr.trim().slice(-300)}`);
  const bytes = Number(m[1]);
  return { mibs: bytes / MiB / Number(m[2]), partial: r.code === 124, bytes };
}

async function directIoWorks(file: string): Promise<boolean> {
  const r = await sh(
    'dd',
    [`if=${file}`, 'of=/dev/null', 'bs=4096', 'count=1', 'iflag=direct', 'status=none'],
    {
      allowFail: true,
    },
  );
  return r.code === 0;
}

async function randRead(file: string, size: number): Promise<{ iops: number; direct: boolean }> {
  const direct = await directIoWorks(file);
  if (!direct) await dropCaches();
  const r = await sh('fio', [
    '--name=randread',
    `--filename=${file}`,
    '--rw=randread',
    '--bs=4k',
    `--direct=${direct ? 1 : 0}`,
    '--ioengine=psync',
    '--iodepth=1',
    '--numjobs=1',
    `--size=${size}`,
    `--runtime=${FIO_SECS}`,
    '--time_based',
    '--readonly',
    '--randrepeat=1',
    '--invalidate=1',
    '--output-format=json',
  ]);
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { read: { iops: number } }[] };
  return { iops: j.jobs[0]?.read.iops ?? 0, direct };
}

const sha256File = async (f: string): Promise<string> =>
  createHash('sha256')
    .update(await fsp.readFile(f))
    .digest('hex');

async function main(): Promise<void> {
  const t0 = Date.now();
  await fsp.mkdir(WORK, { recursive: true });
  setLogFile(path.join(WORK, 'compare.log'));
  setRegistry(WORK);
  installSignalHandlers();
  log(
    `compare: mode ${mode}, ${SIZE_MIB} MiB disk, ${CHECKPOINTS} checkpoints, ${RUNS} run(s), work ${WORK}`,
  );

  let tools: Tool[] = [
    new Bkfs(BKFS),
    new VirtNbdBackup(),
    new QemuChain(),
    new Restic(),
    new Borg(),
    new DdRaw(),
  ];
  if (ONLY) tools = tools.filter((t) => ONLY.split(',').includes(t.id));
  const unavailable = new Map<string, string>();
  const versions: Record<string, string> = {};
  for (const t of tools) {
    const why = await t.check().catch((e: unknown) => `check failed: ${errMsg(e)}`);
    if (why !== null) {
      unavailable.set(t.id, why);
      log(`${t.id}: not available: ${why}`);
      for (const m of R.metrics) R.na(m.id, t.id, why);
    }
    versions[t.id] = await t.version().catch(() => '?');
  }
  let active = tools.filter((t) => !unavailable.has(t.id));
  const broken = new Set<string>();
  const dd = active.find((t): t is DdRaw => t instanceof DdRaw);

  let ds: Dataset | undefined;
  try {
    const tds = Date.now();
    ds = await makeDataset(path.join(WORK, 'data'), SIZE_MIB, CHECKPOINTS);
    const dsSecs = (Date.now() - tds) / 1000;
    log(
      `dataset ready in ${dsSecs.toFixed(0)} s: ${(ds.dataBytes / MiB).toFixed(0)} MiB allocated of ${SIZE_MIB} MiB`,
    );
    const rawDir = (k: number): string => path.join(WORK, 'raw', String(k));
    const rawOf = (k: number): string => path.join(rawDir(k), 'disk.raw');
    const newest = CHECKPOINTS - 1;

    for (const t of active) {
      try {
        await t.prepare({ dir: path.join(WORK, 'tools', t.id), ds, checkpoints: CHECKPOINTS });
        logNotes(t);
      } catch (e) {
        fail('full', t, e);
        broken.add(t.id);
      }
    }
    active = active.filter((t) => !broken.has(t.id));

    // Full backups: R runs, the last one kept.
    await fsp.mkdir(rawDir(0), { recursive: true });
    await stateRaw(ds, 0, rawOf(0));
    dd?.raws.set(0, rawOf(0));
    dd?.perCheckpoint.push(await allocatedBytes(rawOf(0)));
    for (let r = 0; r < RUNS; r++) {
      const slot = r === RUNS - 1 ? 'main' : `t${r}`;
      for (const t of active) {
        if (broken.has(t.id)) continue;
        try {
          const src = t.source === 'qcow2' ? t.image : rawOf(0);
          await t.beforeBackup();
          let secs: number;
          try {
            await dropCaches();
            secs = (await t.full(slot, src)) + (await syncSecs());
          } finally {
            await t.afterBackup();
          }
          R.add('full', t.id, secs);
          log(`${t.id}: full backup run ${r + 1}/${RUNS}: ${secs.toFixed(2)} s`);
          if (t instanceof Bkfs) baselines.bkfsFullCpuSecs.push(t.lastFullCpuSecs);
          if (slot !== 'main') await t.discardSlot(slot);
        } catch (e) {
          fail('full', t, e);
          broken.add(t.id);
        }
      }
      // Issue 16's baselines for the full backup, on the same image in the same run.
      await fullBaselines(ds);
    }

    // The history.
    for (let i = 1; i < CHECKPOINTS; i++) {
      for (const t of active) {
        if (broken.has(t.id) || t.source !== 'qcow2') continue;
        try {
          await replayDelta(ds, i, t.image, path.join(WORK, 'tools', t.id));
        } catch (e) {
          fail('inc', t, e);
          broken.add(t.id);
        }
      }
      await fsp.mkdir(rawDir(i), { recursive: true });
      await stateRaw(ds, i, rawOf(i));
      dd?.perCheckpoint.push(await allocatedBytes(rawOf(i)));
      if (i === newest) dd?.raws.set(i, rawOf(i));
      for (const t of active) {
        if (broken.has(t.id) || !t.hasInc) continue;
        try {
          const src = t.source === 'qcow2' ? t.image : rawOf(i);
          await t.beforeBackup();
          let secs: number;
          try {
            await dropCaches();
            secs = (await t.inc(i, src)) + (await syncSecs());
          } finally {
            await t.afterBackup();
          }
          R.add('inc', t.id, secs);
          log(`${t.id}: incremental ${i}/${CHECKPOINTS - 1}: ${secs.toFixed(2)} s`);
        } catch (e) {
          fail('inc', t, e);
          broken.add(t.id);
        }
      }
      if (i - 1 !== 0) await rmTree(rawDir(i - 1));
    }
    for (const t of active) {
      if (!t.hasInc) R.na('inc', t.id, 'no incremental mode');
      if (broken.has(t.id)) continue;
      try {
        R.add('stored', t.id, (await t.storedBytes()) / GiB);
      } catch (e) {
        fail('stored', t, e);
      }
    }
    if (dd) R.note('stored', dd.id, 'one sparse copy per checkpoint');
    const readers = active.filter((t) => !broken.has(t.id));
    const mnt = path.join(WORK, 'mnt');
    const vsize = SIZE_MIB * MiB;

    // Sequential reads of the newest and the oldest checkpoint, random reads of the newest.
    for (const [metric, k] of [
      ['seqNew', newest],
      ['seqOld', 0],
    ] as const) {
      for (let r = 0; r < RUNS; r++) {
        for (const t of readers) {
          try {
            const m = await t.mount(k, path.join(mnt, t.id));
            try {
              if (metric === 'seqNew') R.add('mount', t.id, m.setupSecs);
              await dropCaches();
              const s = await seqRead(m.file);
              R.add(metric, t.id, s.mibs, s.partial);
              log(
                `${t.id}: sequential read of checkpoint ${k}: ${s.mibs.toFixed(1)} MiB/s${s.partial ? ` (stopped after ${SEQ_CAP_SECS} s, ${(s.bytes / MiB).toFixed(0)} MiB)` : ''}, mount ${m.setupSecs.toFixed(2)} s`,
              );
            } finally {
              await m.unmount();
            }
          } catch (e) {
            fail(metric, t, e);
            if (metric === 'seqNew') fail('mount', t, e);
          }
        }
      }
    }
    for (let r = 0; r < RUNS; r++) {
      for (const t of readers) {
        try {
          const m = await t.mount(newest, path.join(mnt, t.id));
          try {
            await dropCaches();
            const x = await randRead(m.file, vsize);
            R.add('iops', t.id, x.iops);
            if (!x.direct) R.note('iops', t.id, 'buffered (no O_DIRECT), caches dropped first');
            log(
              `${t.id}: random 4 KiB reads: ${x.iops.toFixed(0)} IOPS (${x.direct ? 'O_DIRECT' : 'buffered'})`,
            );
          } finally {
            await m.unmount();
          }
        } catch (e) {
          fail('iops', t, e);
        }
      }
    }

    // Restore one small file: mount, loop-mount the ext4 partition read-only, cp.
    for (let r = 0; r < RUNS; r++) {
      for (const t of readers) {
        const out = path.join(WORK, 'restored', t.id);
        try {
          await rmTree(out);
          await fsp.mkdir(out, { recursive: true });
          const dest = path.join(out, path.basename(ds.probe.path));
          await dropCaches();
          const phases: string[] = [];
          const secs = await timed(async () => {
            let p0 = process.hrtime.bigint();
            const lap = (what: string): void => {
              const p1 = process.hrtime.bigint();
              phases.push(`${what} ${(Number(p1 - p0) / 1e9).toFixed(2)}`);
              p0 = p1;
            };
            const m = await t.mount(newest, path.join(mnt, t.id));
            lap('mount');
            try {
              await withExt4ReadOnly(
                m.file,
                ds!.rootPart.offset,
                ds!.rootPart.size,
                path.join(mnt, `${t.id}-fs`),
                async (d) => {
                  await sh('cp', [path.join(d, ds!.probe.path), dest]);
                  lap('loop + ext4 mount + cp');
                },
              );
              lap('ext4 umount + loop detach');
            } finally {
              await m.unmount();
              lap('unmount');
            }
          });
          const got = await sha256File(dest);
          if (got !== ds.probe.sha256[newest])
            throw new Error(`restored ${ds.probe.path} has the wrong content`);
          R.add('file', t.id, secs);
          log(`${t.id}: restore of /${ds.probe.path}: ${secs.toFixed(2)} s (${phases.join(', ')})`);
        } catch (e) {
          fail('file', t, e);
        } finally {
          await rmTree(out).catch(() => undefined);
        }
      }
    }

    // Restore the whole newest disk (verified against the state's raw image on the first run).
    for (let r = 0; r < RUNS; r++) {
      for (const t of readers) {
        const out = path.join(WORK, 'restored', t.id);
        try {
          await rmTree(out);
          await fsp.mkdir(out, { recursive: true });
          await dropCaches();
          let res: Awaited<ReturnType<Tool['restoreDisk']>> | undefined;
          const secs = await timed(async () => {
            res = await t.restoreDisk(newest, out);
            await sh('sync', []);
          });
          const rd = res as NonNullable<typeof res>;
          if (r === 0) {
            const c =
              rd.format === 'raw'
                ? await sh('cmp', ['-s', rd.file, rawOf(newest)], { allowFail: true })
                : await sh(
                    'qemu-img',
                    ['compare', '-q', '-f', 'qcow2', '-F', 'raw', rd.file, rawOf(newest)],
                    {
                      allowFail: true,
                    },
                  );
            if (c.code !== 0) throw new Error(`restored disk differs from the checkpoint (${rd.format})`);
          }
          R.add('disk', t.id, secs);
          if (rd.format !== 'raw') R.note('disk', t.id, `to ${rd.format}`);
          log(`${t.id}: whole-disk restore: ${secs.toFixed(2)} s (${rd.format})`);
        } catch (e) {
          fail('disk', t, e);
        } finally {
          await rmTree(out).catch(() => undefined);
        }
      }
    }
  } catch (e) {
    log(`compare: stopped: ${errMsg(e)}`);
    errors.push(`stopped: ${errMsg(e)}`);
    process.exitCode = 1;
  } finally {
    for (const t of tools) await t.teardown().catch((e: unknown) => log(`${t.id}: teardown: ${errMsg(e)}`));
    const result: CompareResult = {
      mode,
      baselines,
      params: {
        diskMiB: SIZE_MIB,
        checkpoints: CHECKPOINTS,
        runs: RUNS,
        seqCapSecs: SEQ_CAP_SECS,
        fioSecs: FIO_SECS,
        ...(ds
          ? {
              files: ds.fileCount,
              fileMiB: Math.round(ds.fileBytes / MiB),
              allocatedMiB: Math.round(ds.dataBytes / MiB),
              changedMiB: ds.deltaBytes.map((b) => Math.round((10 * b) / MiB) / 10),
            }
          : {}),
      },
      tools: tools.map((t) => ({
        id: t.id,
        label: t.label,
        version: versions[t.id] ?? '?',
        notes: t.notes,
        ...(unavailable.has(t.id) ? { unavailable: unavailable.get(t.id) as string } : {}),
      })),
      metrics: R.metrics.map((m) => ({
        ...m,
        cells: Object.fromEntries(
          Object.entries(m.cells).map(([k, c]) => [k, 'samples' in c ? { ...c, stat: stat(c.samples) } : c]),
        ),
      })),
      errors,
      durationSecs: Math.round((Date.now() - t0) / 1000),
      host: os.hostname(),
    };
    fs.writeFileSync(OUT, JSON.stringify(result, null, 2));
    log(`compare: results in ${OUT} (${result.durationSecs} s)`);
  }
}

main().catch((e: unknown) => {
  log(`compare failed: ${errMsg(e)}`);
  process.exitCode = 1;
});
