/**
 * Many writers, one repository (issue 12 §2), with real processes and real qcow2 images served by
 * qemu-nbd:
 *   - 6 concurrent `bkfs backup` processes of overlapping images (shared base data + private data
 *     per VM; later rounds write the same new data into every VM, and put back base data that only
 *     forgotten checkpoints used) while a `forget --keep-last 1` + `gc --max-unused 0` loop runs
 *     beside them, 3 rounds (full, inc, inc): every backup succeeds, every surviving checkpoint
 *     reads byte for byte like its `qemu-img convert` reference, `verify` is clean, and after a
 *     final gc every chunk hash has exactly one row and every row is used (exact dedup, no leak);
 *   - kill -9 of one random process (a backup or the gc) at a random moment while 6 backups and a
 *     gc loop run, 3 rounds: every backup the others committed reads back exactly, the killed
 *     backup's checkpoint is absent or complete (and then exact), `verify` is clean, and the next
 *     backup of the killed VM works.
 * Timing figures are in bench/parallel.ts, not here.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { BKFS, bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { randomBuffer, toRaw } from '../helpers/images';
import { assertCheckpointEquals, lcg } from '../helpers/compare';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const VMS = 6;
const BASE = 6 * MiB;
const SIZE = 10 * MiB;
/** Kill rounds (BKFS_TEST_KILL_ROUNDS, default 2; each kills one random process). */
const KILL_ROUNDS = Number(process.env.BKFS_TEST_KILL_ROUNDS ?? 2);
/** gc runs that left unused chunks waiting for running backups (candidates): reported, not asserted. */
let waitingGcs = 0;

let work: string;
let repo: string;
const images: string[] = [];
/** Reference raw image of each checkpoint, by `vm@name`. */
const refs = new Map<string, string>();

interface Proc {
  child: ChildProcess;
  what: string;
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; out: string }>;
}

function start(args: string[], what: string): Proc {
  const child = spawn(process.execPath, [BKFS, '-r', repo, ...args], {
    env: { ...process.env, CI: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; out: string }>((resolve) =>
    child.on('close', (code, signal) => resolve({ code, signal, out })),
  );
  return { child, what, done };
}

const vmName = (i: number): string => `vm${i}`;

/** Change the images for round `r`: data written into every VM alike, private data, base put back. */
async function changeImages(r: number): Promise<void> {
  const shared = path.join(work, `shared-${r}.bin`);
  fs.writeFileSync(shared, randomBuffer(1000 + r, MiB));
  const baseBack = path.join(work, `base-back-${r}.bin`);
  // The base's bytes at [2 MiB, 3 MiB): round 1 overwrites them, round 2 puts them back, so round 2
  // dedups against chunks that only checkpoints forgotten meanwhile used (gc candidates).
  fs.writeFileSync(baseBack, randomBuffer(1, BASE).subarray(2 * MiB, 3 * MiB));
  for (let i = 0; i < VMS; i++) {
    const priv = path.join(work, `priv-${i}-${r}.bin`);
    fs.writeFileSync(priv, randomBuffer(100 * r + i, 512 * 1024));
    const cmds = [`write -s ${priv} ${7 * MiB + r * 512 * 1024} ${512 * 1024}`];
    if (r % 2 === 1) cmds.push(`write -s ${shared} ${2 * MiB} ${MiB}`);
    else cmds.push(`write -s ${baseBack} ${2 * MiB} ${MiB}`, `write -s ${shared} ${4 * MiB} ${MiB}`);
    await qemuIo(images[i]!, 'qcow2', ...cmds);
  }
}

/**
 * Garbage the round's backups will want: a forgotten checkpoint holding the data the round writes
 * into every VM, so the gc loop marks it as deletion candidates while the backups dedup against it
 * (or, once it is marked, store it again and rescue it at commit).
 */
async function scratchGarbage(r: number): Promise<void> {
  const raw = path.join(work, `scratch-${r}.raw`);
  fs.writeFileSync(raw, fs.readFileSync(path.join(work, `shared-${r}.bin`)));
  await bkfsOk(['-r', repo, 'backup', 'scratch', '--disk', `vda=${raw}`, '-l', 'full', '-c', `s${r}`]);
  await bkfsOk(['-r', repo, 'forget', `scratch@s${r}`]);
}

async function snapshotRefs(tag: string): Promise<void> {
  for (let i = 0; i < VMS; i++) {
    const ref = path.join(work, `ref-${vmName(i)}-${tag}.raw`);
    await toRaw(images[i]!, ref);
    refs.set(`${vmName(i)}@${tag}`, ref);
  }
}

function backupOf(i: number, tag: string): Proc {
  return start(['backup', vmName(i), '--disk', `vda=${images[i]}`, '-c', tag], `backup ${vmName(i)}@${tag}`);
}

/** forget + gc over and over until `stop` resolves; returns how many gc runs completed. */
async function maintenanceLoop(
  stop: Promise<unknown>,
  forget: boolean,
  onProc?: (p: Proc) => void,
): Promise<number> {
  let stopped = false;
  void stop.then(() => (stopped = true));
  let gcs = 0;
  while (!stopped) {
    if (forget) {
      const f = start(['forget', '--keep-last', '1'], 'forget');
      onProc?.(f);
      const fr = await f.done;
      assert.ok(fr.code === 0 || fr.signal === 'SIGKILL', `forget failed: ${fr.out}`);
    }
    const g = start(['gc', '--max-unused', '0'], 'gc');
    onProc?.(g);
    const gr = await g.done;
    assert.ok(gr.code === 0 || gr.signal === 'SIGKILL', `gc failed: ${gr.out}`);
    if (/kept until the backups running/.test(gr.out)) waitingGcs++;
    if (gr.code === 0) gcs++;
  }
  return gcs;
}

interface ListEntry {
  vm: string;
  name: string;
}

async function listAll(): Promise<ListEntry[]> {
  return JSON.parse((await bkfsOk(['-r', repo, 'list', '--json'])).stdout) as ListEntry[];
}

async function assertAllExact(only?: (c: ListEntry) => boolean): Promise<number> {
  const cps = (await listAll()).filter((c) => only?.(c) ?? true);
  for (const c of cps) {
    const ref = refs.get(`${c.vm}@${c.name}`);
    assert.ok(ref, `no reference for ${c.vm}@${c.name}`);
    await assertCheckpointEquals(repo, `${c.vm}@${c.name}`, 'vda', ref, 10);
  }
  return cps.length;
}

async function assertVerifyClean(): Promise<void> {
  const v = await bkfs(['-r', repo, 'verify']);
  assert.equal(v.code, 0, `verify: ${v.stdout}${v.stderr}`);
}

/** After a gc with no writer beside it: one row per hash, every row used, no candidate left. */
function assertExactDedup(): void {
  const db = new Database(path.join(repo, 'index.db'), { readonly: true });
  try {
    const c = db.prepare('SELECT count(*) AS n, count(DISTINCT hash) AS h FROM chunks').get() as {
      n: number;
      h: number;
    };
    assert.equal(c.n, c.h, 'a chunk hash has more than one row');
    const cand = db.prepare('SELECT count(*) AS n FROM chunks WHERE candidate IS NOT NULL').get() as {
      n: number;
    };
    assert.equal(cand.n, 0, 'deletion candidates left after a gc alone');
    const used = db
      .prepare(
        `SELECT count(DISTINCT e.chunk_id) AS n FROM checkpoints cp JOIN disks d ON d.checkpoint_id = cp.id
           JOIN disk_pages dp ON dp.disk_id = d.id JOIN extents e ON e.page_id = dp.page_id
          WHERE cp.state = 'complete' AND e.chunk_id IS NOT NULL`,
      )
      .get() as { n: number };
    assert.equal(used.n, c.n, 'chunk rows that no checkpoint uses are left after a gc alone');
  } finally {
    db.close();
  }
}

async function waitQemuNbdGone(img: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if ((await run('pgrep', ['-f', `qemu-nbd.*${img}`], { allowFail: true })).code !== 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`qemu-nbd of ${img} left running`);
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-writers-test-'));
  repo = path.join(work, 'repo');
  const base = randomBuffer(1, BASE);
  for (let i = 0; i < VMS; i++) {
    const raw = path.join(work, `${vmName(i)}.raw`);
    const data = Buffer.alloc(SIZE);
    base.copy(data, 0);
    randomBuffer(10 + i, MiB).copy(data, BASE); // private data
    fs.writeFileSync(raw, data);
    const img = path.join(work, `${vmName(i)}.qcow2`);
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, img]);
    fs.rmSync(raw);
    images.push(img);
  }
  await bkfsOk(['-r', repo, 'init', '--chunk-size', '65536']);
});

after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

describe('many backups into one repository', () => {
  it('6 concurrent backups beside a forget + gc loop, 3 rounds: exact, verified, deduplicated', async (t) => {
    for (let r = 0; r < 3; r++) {
      const tag = `r${r}`;
      if (r > 0) await changeImages(r);
      if (r > 0) await scratchGarbage(r);
      await snapshotRefs(tag);
      const backups = Array.from({ length: VMS }, (_, i) => backupOf(i, tag));
      const all = Promise.all(backups.map((b) => b.done));
      const gcs = maintenanceLoop(all, true);
      const results = await all;
      await gcs;
      results.forEach((res, i) => assert.equal(res.code, 0, `${backups[i]!.what}: ${res.out}`));
      if (r > 0) for (const res of results) assert.match(res.out, /\binc\b/, res.out);
    }
    await bkfsOk(['-r', repo, 'forget', '--keep-last', '1']);
    await bkfsOk(['-r', repo, 'gc', '--max-unused', '0']);
    const n = await assertAllExact();
    assert.equal(n, VMS);
    t.diagnostic(`gc runs that kept candidates for running backups: ${waitingGcs}`);
    await assertVerifyClean();
    assertExactDedup();
  });

  it('kill -9 of one random backup or gc at a random moment loses nothing the others committed', async (t) => {
    const rnd = lcg(Number(process.env.BKFS_TEST_SEED ?? Date.now() % 100000));
    for (let r = 3; r < 3 + KILL_ROUNDS; r++) {
      const tag = `r${r}`;
      await changeImages(r);
      await snapshotRefs(tag);
      const backups = Array.from({ length: VMS }, (_, i) => backupOf(i, tag));
      const all = Promise.all(backups.map((b) => b.done));
      let gcProc: Proc | undefined;
      const gcs = maintenanceLoop(all, false, (p) => (gcProc = p));
      // Kill a random running process after a random delay.
      const victimIsGc = rnd() < 0.35;
      await new Promise((res) => setTimeout(res, 300 + rnd() * 5000));
      let victim: Proc | undefined;
      if (victimIsGc && gcProc && gcProc.child.exitCode === null) victim = gcProc;
      else {
        const running = backups.filter((b) => b.child.exitCode === null && b.child.signalCode === null);
        victim = running.length > 0 ? running[Math.floor(rnd() * running.length)] : gcProc;
      }
      victim?.child.kill('SIGKILL');
      const results = await all;
      await gcs;
      const cps = new Set((await listAll()).map((c) => `${c.vm}@${c.name}`));
      results.forEach((res, i) => {
        const ref = `${vmName(i)}@${tag}`;
        if (backups[i] === victim && res.signal === 'SIGKILL') return; // absent or complete: checked below
        assert.equal(res.code, 0, `${backups[i]!.what}: ${res.out}`);
        assert.ok(cps.has(ref), `${ref} was committed but is not listed`);
      });
      // Every checkpoint of this round (the killed backup's too, if it committed) reads exactly;
      // verify checks every chunk of the others.
      await assertAllExact((c) => c.name === tag);
      await assertVerifyClean();
      for (let i = 0; i < VMS; i++) {
        if (backups[i] !== victim) continue;
        await waitQemuNbdGone(images[i]!);
        // The next backup of the killed VM works (and cleans up what the killed one left).
        const again = `${tag}b`;
        refs.set(`${vmName(i)}@${again}`, refs.get(`${vmName(i)}@${tag}`)!);
        await bkfsOk(['-r', repo, 'backup', vmName(i), '--disk', `vda=${images[i]}`, '-c', again]);
      }
    }
    await bkfsOk(['-r', repo, 'gc', '--max-unused', '0']);
    await assertAllExact();
    await assertVerifyClean();
    assertExactDedup();
    // No dead writer's temp files or sessions are left once nothing runs.
    assert.deepEqual(fs.readdirSync(path.join(repo, 'tmp')), []);
    assert.deepEqual(
      fs.readdirSync(path.join(repo, 'writers')).filter((n) => !n.startsWith('.')),
      [],
    );
    t.diagnostic(`gc runs that kept candidates for running backups: ${waitingGcs}`);
  });
});
