/**
 * The power-loss suite's engine: run real `bkfs` commands (child processes) with the repository on
 * powerfs (powerfs.ts), cut the power at a chosen point, SIGKILL the command, leave the repository
 * in the durable state, and check what must hold after any power cut:
 *   - the repository opens and `bkfs verify` finds no damage;
 *   - every checkpoint that existed before and was not the target of the command, and every
 *     checkpoint a command reported as committed (exit 0) before the cut, is listed and reads
 *     byte-identical to its source (the qemu-img convert of the image at backup time); any other
 *     listed checkpoint also reads exactly its source (a complete checkpoint is never partial);
 *   - a checkpoint a `forget` reported as forgotten does not come back;
 *   - a new backup works and reads back identical.
 * Cut points: every fsync boundary of the run (the power fails when the N-th fsync arrives), the
 * end of the run (everything reported must be durable without a later sync), and a seeded random
 * sample of other mutating operations.
 */
import { spawn } from 'node:child_process';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { BKFS, bkfs } from './cli';
import { assertCheckpointEquals, lcg } from './compare';
import { toRaw } from './images';
import { PowerFs, type CutPlan, type PowerFsStats } from './powerfs';

export interface Scenario {
  name: string;
  /** Template directory: `repo/` (pre-state; may be empty), images, reference raw files. */
  template: string;
  /** Commands run in order against the repository on powerfs (`-r <mount>` is prepended). */
  commands: string[][];
  /** Checkpoints (`vm@name`) -> { disk image (relative to the run dir), reference raw (absolute) }. */
  refs: Map<string, { image: string; raw: string }>;
  /** Checkpoints present before that must survive whatever happens. */
  keep: string[];
  /** Index of a command -> checkpoints it creates (must exist once it reported success). */
  creates?: Map<number, string[]>;
  /** Index of a command -> checkpoints it removes (must stay gone once it reported success). */
  removes?: Map<number, string[]>;
  /** After the cut: a new backup of this VM from this image (relative to the run dir). */
  after: { vm: string; image: string };
}

export interface CutOutcome {
  point: string;
  stats: PowerFsStats;
  exits: (number | 'killed')[];
}

function copyTree(src: string, dst: string): void {
  fs.cpSync(src, dst, { recursive: true, preserveTimestamps: true });
}

interface RunResult {
  code: number | 'killed';
  stdout: string;
  stderr: string;
}

/** Run one bkfs command; if the power goes off meanwhile, SIGKILL it. */
function runUntilDead(args: string[], pfs: PowerFs): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BKFS, ...args], {
      env: { ...process.env, CI: 'true' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    let killed = false;
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    void pfs.whenDead().then(() => {
      if (child.exitCode === null && child.signalCode === null) {
        killed = true;
        child.kill('SIGKILL');
      }
    });
    child.on('close', (code) => resolve({ code: killed ? 'killed' : (code ?? 128), stdout, stderr }));
  });
}

/**
 * Run the scenario once on powerfs with `plan`, cut, and check. Returns what happened. `runDir`
 * must not exist.
 */
export async function runCut(sc: Scenario, runDir: string, plan: CutPlan | 'count'): Promise<CutOutcome> {
  copyTree(sc.template, runDir);
  const repo = path.join(runDir, 'repo');
  const mnt = path.join(runDir, 'mnt');
  fs.mkdirSync(mnt);
  const pfs = await PowerFs.start(repo, mnt, plan === 'count' ? {} : plan);
  const exits: (number | 'killed')[] = [];
  const reported: number[] = [];
  const logs: string[] = [];
  let stats: PowerFsStats;
  try {
    for (let i = 0; i < sc.commands.length; i++) {
      if (pfs.deadAt) break;
      const args = sc.commands[i]!.map((a) => a.replace('$RUN', runDir));
      const r = await runUntilDead(['-r', mnt, ...args], pfs);
      exits.push(r.code);
      logs.push(`$ bkfs ${args.join(' ')} -> ${r.code}\n${r.stdout}${r.stderr}`);
      if (r.code === 0) reported.push(i);
      else if (!pfs.deadAt) {
        throw new Error(`command failed without a power cut:\n${logs.join('\n')}`);
      }
    }
    stats = plan === 'count' ? await pfs.stop() : await pfs.cut();
  } catch (e) {
    await pfs.kill();
    throw e;
  }
  let point =
    plan === 'count'
      ? 'none'
      : plan.atFsync
        ? `fsync ${plan.atFsync}`
        : plan.atOp
          ? `op ${plan.atOp}`
          : 'end';
  if (plan !== 'count' && plan.keepDirOps) point += ' (directory changes committed)';
  if (plan === 'count') return { point, stats, exits };
  try {
    await checkAfterCut(sc, runDir, reported);
  } catch (e) {
    throw new Error(
      `${sc.name}, power cut at ${point} (${JSON.stringify(stats)}): ${(e as Error).message}\n${logs.join('\n')}`,
      {
        cause: e,
      },
    );
  }
  return { point, stats, exits };
}

function completeCheckpoints(repo: string): Set<string> {
  const db = new Database(path.join(repo, 'index.db'), { readonly: true, fileMustExist: true });
  try {
    const rows = db
      .prepare(
        "SELECT v.name AS vm, c.name AS cp FROM checkpoints c JOIN vms v ON v.id = c.vm_id WHERE c.state = 'complete'",
      )
      .all() as { vm: string; cp: string }[];
    return new Set(rows.map((r) => `${r.vm}@${r.cp}`));
  } finally {
    db.close();
  }
}

async function checkAfterCut(sc: Scenario, runDir: string, reported: number[]): Promise<void> {
  const repo = path.join(runDir, 'repo');
  if (!fs.existsSync(path.join(repo, 'bkfs-repo.json'))) {
    // Only before `init` reported success (then nothing was committed).
    assert.ok(
      sc.keep.length === 0 && !reported.some((i) => sc.commands[i]![0] === 'init'),
      'the repository is gone',
    );
    return;
  }
  const v = await bkfs(['-r', repo, 'verify']);
  assert.equal(v.code, 0, `verify after the cut: ${v.stdout}${v.stderr}`);
  const present = completeCheckpoints(repo);
  const must = new Set(sc.keep);
  const gone = new Set<string>();
  for (const i of reported) {
    for (const c of sc.creates?.get(i) ?? []) must.add(c);
    for (const c of sc.removes?.get(i) ?? []) {
      gone.add(c);
      must.delete(c);
    }
  }
  for (const c of must)
    assert.ok(present.has(c), `committed checkpoint ${c} is lost (present: ${[...present].join(', ')})`);
  for (const c of gone) assert.ok(!present.has(c), `forgotten checkpoint ${c} came back`);
  for (const c of present) {
    const ref = sc.refs.get(c);
    assert.ok(ref, `unexpected checkpoint ${c}`);
    await assertCheckpointEquals(repo, c, 'vda', ref.raw, 8);
  }
  // A new backup works.
  const img = path.join(runDir, sc.after.image);
  const b = await bkfs(['-r', repo, 'backup', sc.after.vm, '-c', 'after-cut', '--disk', `vda=${img}`]);
  assert.equal(b.code, 0, `a new backup after the cut: ${b.stdout}${b.stderr}`);
  const raw = path.join(runDir, 'after-cut.raw');
  await toRaw(img, raw);
  await assertCheckpointEquals(repo, `${sc.after.vm}@after-cut`, 'vda', raw, 8);
}

export interface SweepOptions {
  /** Cut at every fsync boundary, or at most this many, evenly spread. */
  maxFsyncPoints?: number;
  /** How many random other points. */
  randomPoints: number;
  seed: number;
  /** Called after each cut (progress, figures). */
  onCut?: (o: CutOutcome) => void;
}

/** Count the run's fsync boundaries, then cut at each chosen point. Returns every outcome. */
export async function sweep(sc: Scenario, work: string, o: SweepOptions): Promise<CutOutcome[]> {
  let k = 0;
  const dir = (): string => path.join(work, `${sc.name}-${k++}`);
  const clean = (d: string): void => fs.rmSync(d, { recursive: true, force: true });
  const d0 = dir();
  const count = await runCut(sc, d0, 'count');
  clean(d0);
  const total = count.stats;
  assert.ok(total.fsyncs > 0, `${sc.name}: no fsync at all`);
  const points: CutPlan[] = [];
  const all = Array.from({ length: total.fsyncs }, (_, i) => i + 1);
  let chosen = all;
  if (o.maxFsyncPoints !== undefined && all.length > o.maxFsyncPoints) {
    const step = all.length / o.maxFsyncPoints;
    // Spread out, ending at the last fsync (where commands commit).
    chosen = Array.from({ length: o.maxFsyncPoints }, (_, i) => all[Math.ceil((i + 1) * step) - 1]!);
  }
  // Each fsync boundary twice: the strict state, and the state where the journal also committed
  // every directory change (an unlink or rename that happened before a commit that is not durable).
  for (const n of chosen) points.push({ atFsync: n }, { atFsync: n, keepDirOps: true });
  points.push({}); // the end: after everything, no sync
  points.push({ keepDirOps: true }); // the end, the journal having committed every directory change
  // Random other points, half of them with directory changes committed by the journal.
  const rnd = lcg(o.seed);
  for (let i = 0; i < o.randomPoints; i++) {
    points.push({ atOp: 1 + Math.floor(rnd() * total.ops), ...(i % 2 === 0 ? { keepDirOps: true } : {}) });
  }
  const out: CutOutcome[] = [];
  for (const p of points) {
    const d = dir();
    const r = await runCut(sc, d, p);
    clean(d);
    o.onCut?.(r);
    out.push(r);
  }
  return out;
}

export { BKFS };
