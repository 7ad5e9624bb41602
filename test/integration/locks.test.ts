/**
 * One writer means one writer, and pins that cannot race (issue 11 §2, §6), with real processes:
 *   - several real processes try to take the writer lock at the same instant against a stale lock
 *     (left by a holder killed with SIGKILL, or an older bkfs's PID lock file of a dead process),
 *     many rounds: exactly one proceeds each time, and the killed holder's lock is free at once;
 *   - every command that writes the index (verify, protect, unprotect, forget, gc, backup, repair)
 *     refuses with REPO_LOCKED while another process holds the lock exclusively (as a rebuild or a
 *     format migration does), and changes nothing;
 *   - concurrent writers (format 3): while a real backup is stopped holding the lock shared (right
 *     before its commit), another VM's backup, forget, gc, protect and verify all run (no more
 *     exit 7); a second backup of the same VM and `repair --rebuild-index` refuse with REPO_LOCKED
 *     naming the backup; the stopped backup then commits intact. Maintenance commands are one at
 *     a time: while a process holds `maint-lock`, gc/forget/protect/verify/repair refuse and a
 *     backup runs;
 *   - a corrupt `gc-pending.json` or pin file makes gc/forget fail with REPO_CORRUPT (exit 27),
 *     never read as "nothing pending" or "no pin";
 *   - a forget racing a real FUSE mount of the same checkpoint, many rounds (with forget stopped at
 *     exact points by BKFS_TEST_PAUSE_AT, and free races): the mount either serves the checkpoint's
 *     bytes to the end or refuses to mount it; it never serves zeros.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { randomBuffer } from '../helpers/images';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { writerLockHolder } from '../../src/repo/lock';
import { daemonAlive, mountAt, readState } from '../../src/fuse/state';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const ROUNDS = Number(process.env.BKFS_TEST_LOCK_ROUNDS ?? 50);
const MOUNT_ROUNDS = Number(process.env.BKFS_TEST_MOUNT_ROUNDS ?? 2);
const LOCK_JS = path.resolve(__dirname, '../../src/repo/lock.js');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let work: string;
let img: string;
let baseRepo: string;

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-locks-test-'));
  process.env.BKFS_RUN_DIR = path.join(work, 'run'); // mount state of this file's mounts only
  img = path.join(work, 'disk.raw');
  // Data everywhere (no zero run): a page served as a hole would show.
  fs.writeFileSync(img, randomBuffer(11, 8 * MiB));
  baseRepo = path.join(work, 'base');
  await bkfsOk(['-r', baseRepo, 'init', '--chunk-size', '65536']);
  await bkfsOk(['-r', baseRepo, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full', '-c', 'cp']);
});

after(async () => {
  delete process.env.BKFS_RUN_DIR;
  fs.rmSync(work, { recursive: true, force: true });
});

function copyRepo(name: string): string {
  const dir = path.join(work, name);
  fs.cpSync(baseRepo, dir, { recursive: true });
  return dir;
}

// -------------------------------------------------------------------------------------------------
// Lock contenders: real node processes that take the lock through bkfs's own code when told to.

const CONTENDER = `
const { acquireWriterLock } = require(${JSON.stringify(LOCK_JS)});
const dir = process.argv[2];
const file = process.argv[3]; // another lock file (maint-lock), default the writer lock
let held;
require('node:readline').createInterface({ input: process.stdin }).on('line', (line) => {
  const [cmd, at] = line.split(' ');
  if (cmd !== 'go') return;
  while (Date.now() < Number(at)) {} // every contender starts at the same instant
  try {
    held = acquireWriterLock(dir, 'race ' + process.pid, file ? { file } : {});
    process.stdout.write('got\\n');
  } catch (e) {
    process.stdout.write('locked ' + (e.code || e.message) + '\\n');
  }
});
process.stdout.write('ready\\n');
`;

class Contender {
  readonly child: ChildProcessWithoutNullStreams;
  private buf = '';
  private waiting: ((line: string) => void)[] = [];
  private lines: string[] = [];

  constructor(script: string, repoDir: string, file?: string) {
    this.child = spawn(process.execPath, [script, repoDir, ...(file ? [file] : [])], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.child.stdout.on('data', (d: Buffer) => {
      this.buf += d.toString();
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const w = this.waiting.shift();
        if (w) w(line);
        else this.lines.push(line);
      }
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  line(ms = 20000): Promise<string> {
    const l = this.lines.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`contender ${this.pid} said nothing`)), ms);
      this.waiting.push((x) => {
        clearTimeout(t);
        resolve(x);
      });
    });
  }

  go(at: number): void {
    this.child.stdin.write(`go ${at}\n`);
  }

  async kill9(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGKILL');
    await exited;
  }
}

async function contender(script: string, repoDir: string, file?: string): Promise<Contender> {
  const c = new Contender(script, repoDir, file);
  assert.equal(await c.line(), 'ready');
  return c;
}

describe('the writer lock', () => {
  it(`contenders started at the same instant against a stale lock: exactly one proceeds (${ROUNDS} rounds); kill -9 frees it`, async () => {
    const repoDir = copyRepo('race');
    const script = path.join(work, 'contender.js');
    fs.writeFileSync(script, CONTENDER);
    const K = 4;
    const cs: Contender[] = [];
    try {
      for (let i = 0; i < K; i++) cs.push(await contender(script, repoDir));
      for (let round = 0; round < ROUNDS; round++) {
        const at = Date.now() + 150;
        for (const c of cs) c.go(at);
        const answers = await Promise.all(cs.map((c) => c.line()));
        const winners = cs.filter((_, i) => answers[i] === 'got');
        assert.equal(winners.length, 1, `round ${round}: ${answers.join(', ')}`);
        for (let i = 0; i < K; i++) {
          if (answers[i] !== 'got') assert.equal(answers[i], 'locked REPO_LOCKED', `round ${round}`);
        }
        const w = winners[0]!;
        const holder = writerLockHolder(repoDir) as { pid?: number; command?: string } | undefined;
        assert.equal(holder?.pid, w.pid, `round ${round}: the lock file names its holder`);
        assert.equal(holder?.command, `race ${w.pid}`);
        // The holder dies without releasing anything: the kernel frees the lock at once.
        await w.kill9();
        assert.equal(writerLockHolder(repoDir), undefined, `round ${round}: free after kill -9`);
        if (round % 2 === 1) {
          // A lock file as an older bkfs left it (PID based, no flock) for a dead process.
          fs.writeFileSync(
            path.join(repoDir, 'lock'),
            JSON.stringify({ pid: w.pid, host: os.hostname(), command: 'backup old', time: 'then' }),
          );
        }
        cs[cs.indexOf(w)] = await contender(script, repoDir);
      }
    } finally {
      for (const c of cs) await c.kill9();
    }
    // A stale lock never blocks a real command either.
    await bkfsOk(['-r', repoDir, 'gc']);
  });

  it('verify, protect, unprotect, forget, gc, backup and repair refuse with REPO_LOCKED while another process holds it', async () => {
    const repoDir = copyRepo('held');
    const script = path.join(work, 'contender.js');
    fs.writeFileSync(script, CONTENDER);
    const holder = await contender(script, repoDir);
    try {
      holder.go(0);
      assert.equal(await holder.line(), 'got');
      const listBefore = (await bkfsOk(['-r', repoDir, 'list', 'vm', '--json'])).stdout;
      const cmds = [
        ['verify'],
        ['protect', 'vm@cp'],
        ['unprotect', 'vm@cp'],
        ['forget', 'vm@cp'],
        ['forget', 'vm', '--keep-last', '1'],
        ['gc'],
        ['backup', 'vm', '--disk', `vda=${img}`, '-l', 'full'],
        ['repair', '--manifests'],
        ['repair', '--rebuild-index'],
      ];
      for (const args of cmds) {
        const r = await bkfs(['-r', repoDir, ...args]);
        assert.equal(r.code, EXIT_CODES.REPO_LOCKED, `${args.join(' ')}: ${r.stderr}`);
        assert.match(r.stderr, new RegExp(`locked by pid ${holder.pid} on .*\\(race ${holder.pid}, since`));
        assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
      }
      assert.equal(
        (await bkfsOk(['-r', repoDir, 'list', 'vm', '--json'])).stdout,
        listBefore,
        'nothing changed',
      );
      // Readers do not need the lock.
      const v = await bkfs(['-r', repoDir, 'verify', '--read-only']);
      assert.equal(v.code, 0, v.stderr);
      await holder.kill9();
      await bkfsOk(['-r', repoDir, 'protect', 'vm@cp']);
      await bkfsOk(['-r', repoDir, 'verify']);
    } finally {
      await holder.kill9();
    }
  });

  it('concurrent writers: backups share the lock with backups, forget and gc; what must be alone still is', async () => {
    const repoDir = copyRepo('shared');
    const pause = path.join(work, 'shared-pause');
    const img2 = path.join(work, 'disk2.raw');
    fs.writeFileSync(img2, Buffer.concat([randomBuffer(11, 4 * MiB), randomBuffer(12, 4 * MiB)]));
    // A real backup stopped right before its commit, holding the lock shared (and its session).
    const first = spawn(
      process.execPath,
      [
        path.resolve(__dirname, '../../../bin/bkfs'),
        '-r',
        repoDir,
        'backup',
        'vm',
        '--disk',
        `vda=${img}`,
        '-c',
        'two',
      ],
      {
        env: {
          ...process.env,
          BKFS_TEST_PAUSE_AT: 'backup-after-manifest',
          BKFS_TEST_PAUSE_FILE: pause,
          BKFS_TEST_PAUSE_MS: '600000',
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let firstErr = '';
    first.stderr.on('data', (d: Buffer) => (firstErr += d.toString()));
    const firstDone = new Promise<number | null>((r) => first.on('close', (code) => r(code)));
    try {
      for (let i = 0; i < 600 && !fs.existsSync(`${pause}.paused`); i++) await sleep(100);
      assert.ok(fs.existsSync(`${pause}.paused`), `the backup did not reach its commit: ${firstErr}`);
      assert.deepEqual(writerLockHolder(repoDir), {}, 'held (shared): no single holder to name');
      // Another VM's backup, and maintenance, run beside it (format 2 bkfs: exit 7 for all).
      await bkfsOk(['-r', repoDir, 'backup', 'vm2', '--disk', `vda=${img2}`, '-l', 'full', '-c', 'one']);
      await bkfsOk(['-r', repoDir, 'protect', 'vm@cp']);
      await bkfsOk(['-r', repoDir, 'unprotect', 'vm@cp']);
      await bkfsOk(['-r', repoDir, 'gc', '--max-unused', '0']);
      await bkfsOk(['-r', repoDir, 'forget', 'vm2', '--keep-last', '1']);
      await bkfsOk(['-r', repoDir, 'verify']);
      // A second backup of the same VM, and a rebuild (needs the repository alone), refuse.
      const same = await bkfs(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-c', 'three']);
      assert.equal(same.code, EXIT_CODES.REPO_LOCKED, same.stderr);
      assert.match(
        same.stderr,
        new RegExp(`VM 'vm' is being backed up by another process \\(pid ${first.pid}\\)`),
      );
      const rebuild = await bkfs(['-r', repoDir, 'repair', '--rebuild-index']);
      assert.equal(rebuild.code, EXIT_CODES.REPO_LOCKED, rebuild.stderr);
      assert.match(rebuild.stderr, new RegExp(`locked by pid ${first.pid} on .*\\(backup vm, since`));
      assert.equal(rebuild.stderr.trim().split('\n').length, 1, `one line: ${rebuild.stderr}`);
    } finally {
      fs.writeFileSync(`${pause}.resume`, '');
    }
    assert.equal(await firstDone, 0, firstErr);
    const names = (
      JSON.parse((await bkfsOk(['-r', repoDir, 'list', '--json'])).stdout) as { vm: string; name: string }[]
    )
      .map((c) => `${c.vm}@${c.name}`)
      .sort();
    assert.deepEqual(names, ['vm2@one', 'vm@cp', 'vm@two']);
    await bkfsOk(['-r', repoDir, 'gc', '--max-unused', '0']);
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'vm@two', 'vda', img, 20);
    await assertCheckpointEquals(repoDir, 'vm2@one', 'vda', img2, 20);
    await bkfsOk(['-r', repoDir, 'repair', '--rebuild-index']); // alone now: runs
  });

  it('maintenance commands run one at a time; a backup runs beside one', async () => {
    const repoDir = copyRepo('maint');
    const script = path.join(work, 'contender.js');
    fs.writeFileSync(script, CONTENDER);
    const holder = await contender(script, repoDir, 'maint-lock');
    try {
      holder.go(0);
      assert.equal(await holder.line(), 'got');
      for (const args of [
        ['verify'],
        ['protect', 'vm@cp'],
        ['forget', 'vm@cp'],
        ['gc'],
        ['repair', '--manifests'],
      ]) {
        const r = await bkfs(['-r', repoDir, ...args]);
        assert.equal(r.code, EXIT_CODES.REPO_LOCKED, `${args.join(' ')}: ${r.stderr}`);
        assert.match(r.stderr, new RegExp(`locked by pid ${holder.pid} on .*\\(race ${holder.pid}, since`));
      }
      await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-c', 'beside']);
    } finally {
      await holder.kill9();
    }
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'vm@beside', 'vda', img, 10);
  });
});

// -------------------------------------------------------------------------------------------------

describe('corrupt pins and gc state; forget killed between its transactions', () => {
  it('a corrupt gc-pending.json or pin file is REPO_CORRUPT (exit 27) for gc and forget; nothing changes', async () => {
    const repoDir = copyRepo('corrupt');
    const pending = path.join(repoDir, 'gc-pending.json');
    const listBefore = (await bkfsOk(['-r', repoDir, 'list', 'vm', '--json'])).stdout;
    const expect27 = async (args: string[], what: RegExp): Promise<void> => {
      const r = await bkfs(['-r', repoDir, ...args]);
      assert.equal(r.code, EXIT_CODES.REPO_CORRUPT, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, what);
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
    };
    for (const bad of [
      '{"packs": [{"name": "ab',
      '{"packs": 7}',
      '{"packs": [{"name": "../../../etc/passwd", "size": 1, "pins": []}]}',
      'null',
    ]) {
      fs.writeFileSync(pending, bad);
      await expect27(['gc'], /gc-pending\.json is unreadable/);
    }
    // Bounded: a huge file is refused by its size, not read.
    fs.writeFileSync(pending, '');
    fs.truncateSync(pending, 64 * MiB);
    await expect27(['gc'], /gc-pending\.json is unreadable \(\d+ bytes\)/);
    fs.rmSync(pending);

    const pins = path.join(repoDir, 'pins');
    fs.mkdirSync(pins, { recursive: true });
    const pin = path.join(pins, '4242-0badc0ffee00.json');
    for (const bad of ['{"pid": 4242, "host": "h", "checkpoints": [1,', '{"pid": "x"}', '[]']) {
      fs.writeFileSync(pin, bad);
      await expect27(['forget', 'vm@cp'], /pin file .*4242-0badc0ffee00\.json is unreadable/);
      await expect27(['gc'], /pin file .* is unreadable/);
    }
    fs.writeFileSync(pin, '');
    fs.truncateSync(pin, 8 * MiB);
    await expect27(['forget', 'vm@cp'], /pin file .* is unreadable \(\d+ bytes/);
    assert.equal(
      (await bkfsOk(['-r', repoDir, 'list', 'vm', '--json'])).stdout,
      listBefore,
      'nothing changed',
    );
    assert.ok(!fs.readdirSync(path.join(repoDir, 'manifests')).some((n) => n.startsWith('forget-')));

    // A well-formed pin whose reader is gone (nobody holds its flock) is stale, not corrupt.
    fs.writeFileSync(
      pin,
      JSON.stringify({ pid: 4242, host: os.hostname(), checkpoints: [1], time: 'then', lock: 'flock' }),
    );
    const f = JSON.parse((await bkfsOk(['-r', repoDir, 'forget', 'vm@cp', '--json'])).stdout) as {
      removed: { name: string; pinned?: boolean }[];
    };
    assert.equal(f.removed[0]?.pinned, undefined, 'the stale pin does not keep it');
    assert.ok(!fs.existsSync(pin), 'stale pin removed');
    await bkfsOk(['-r', repoDir, 'gc']);
  });

  it('kill -9 between hiding and deleting: hidden at once, the rows go with the next gc, never back', async () => {
    const repoDir = copyRepo('hide-crash');
    const r = await bkfs(['-r', repoDir, 'forget', 'vm@cp'], { BKFS_TEST_CRASH_AT: 'forget-after-hide' });
    assert.equal(r.code, 128, `killed at forget-after-hide: ${r.code} ${r.stderr}`);
    assert.deepEqual(JSON.parse((await bkfsOk(['-r', repoDir, 'list', 'vm', '--json'])).stdout), []);
    const g = JSON.parse((await bkfsOk(['-r', repoDir, 'gc', '--json'])).stdout) as {
      checkpointsRemoved: number;
      chunksRemoved: number;
    };
    assert.equal(g.checkpointsRemoved, 1);
    assert.ok(g.chunksRemoved > 0);
    assert.deepEqual(fs.readdirSync(path.join(repoDir, 'manifests')), [], 'manifest and journal gone');
    await bkfsOk(['-r', repoDir, 'verify']);
  });
});

// -------------------------------------------------------------------------------------------------

/** Take down whatever bkfs mounted at `mp`. */
async function forceUnmount(mp: string): Promise<void> {
  const state = readState(mp);
  if (mountAt(mp)) {
    const r = await bkfs(['umount', mp]);
    if (r.code !== 0) await bkfs(['umount', '--lazy', mp]);
  }
  if (state && daemonAlive(state)) process.kill(state.pid, 'SIGKILL');
  if (mountAt(mp)) await run('fusermount', ['-u', '-z', mp], { allowFail: true });
}

interface Forget {
  done: Promise<{ code: number; stdout: string; stderr: string }>;
  resume: () => void;
}

/** Start `bkfs forget vm@cp --json`, stopped at `step` (if any) until `resume()`. */
async function startForget(repoDir: string, step: string | undefined, tag: string): Promise<Forget> {
  const ctl = path.join(work, `pause-${tag}`);
  const env: NodeJS.ProcessEnv = step ? { BKFS_TEST_PAUSE_AT: step, BKFS_TEST_PAUSE_FILE: ctl } : {};
  const done = bkfs(['-r', repoDir, 'forget', 'vm@cp', '--json'], env);
  if (step) {
    const end = Date.now() + 30000;
    while (!fs.existsSync(`${ctl}.paused`)) {
      if (Date.now() > end) throw new Error(`forget never reached ${step}: ${(await done).stderr}`);
      await sleep(10);
    }
  }
  return { done, resume: () => fs.writeFileSync(`${ctl}.resume`, '') };
}

function pinnedOf(stdout: string): boolean {
  const j = JSON.parse(stdout) as { removed: { pinned?: boolean }[] };
  assert.equal(j.removed.length, 1);
  return j.removed[0]!.pinned === true;
}

/** The whole disk through the mount equals the source image (no zeros where data was). */
function assertServesSource(file: string, what: string): void {
  const got = fs.readFileSync(file);
  const want = fs.readFileSync(img);
  assert.equal(got.length, want.length, what);
  if (!got.equals(want)) {
    let at = 0;
    while (got[at] === want[at]) at++;
    assert.fail(
      `${what}: bytes differ from offset ${at} (served ${got.subarray(at, at + 8).toString('hex')})`,
    );
  }
}

describe('forget racing a real FUSE mount of the same checkpoint', () => {
  it(`serves the checkpoint correctly to the end or refuses, never zeros (${MOUNT_ROUNDS} rounds per case)`, async () => {
    type Case = 'before-hide' | 'after-hide' | 'free-race' | 'tree-before-hide' | 'tree-after-hide';
    const cases: Case[] = ['before-hide', 'after-hide', 'free-race', 'tree-before-hide', 'tree-after-hide'];
    let served = 0;
    let refused = 0;
    for (let round = 0; round < MOUNT_ROUNDS; round++) {
      for (const c of cases) {
        const tag = `${c}-${round}`;
        const repoDir = copyRepo(`m-${tag}`);
        const mp = path.join(work, `mnt-${tag}`);
        fs.mkdirSync(mp);
        try {
          if (c === 'before-hide' || c === 'after-hide') {
            // forget is stopped after its journal (nothing hidden yet) or after hiding, before it
            // reads the pins; the mount starts right there.
            const f = await startForget(
              repoDir,
              c === 'before-hide' ? 'forget-after-journal' : 'forget-after-hide',
              tag,
            );
            const m = await bkfs(['-r', repoDir, 'mount', 'vm@cp', mp]);
            f.resume();
            const fr = await f.done;
            assert.equal(fr.code, 0, fr.stderr);
            if (c === 'before-hide') {
              assert.equal(m.code, 0, `${tag}: ${m.stderr}`);
              assertServesSource(path.join(mp, 'vda.raw'), tag);
              assert.ok(pinnedOf(fr.stdout), `${tag}: forget saw the mount's pin`);
              served++;
            } else {
              assert.equal(m.code, EXIT_CODES.NOT_FOUND, `${tag}: ${m.stderr}`);
              assert.match(m.stderr, /checkpoint/);
              assert.ok(!pinnedOf(fr.stdout));
              refused++;
            }
          } else if (c === 'free-race') {
            const [m, fr] = await Promise.all([
              bkfs(['-r', repoDir, 'mount', 'vm@cp', mp]),
              bkfs(['-r', repoDir, 'forget', 'vm@cp', '--json']),
            ]);
            assert.equal(fr.code, 0, fr.stderr);
            if (m.code === 0) {
              assertServesSource(path.join(mp, 'vda.raw'), tag);
              served++;
            } else {
              assert.equal(m.code, EXIT_CODES.NOT_FOUND, `${tag}: ${m.stderr}`);
              refused++;
            }
          } else {
            // A tree mount looks the checkpoint up and pins it when its files are first used.
            await bkfsOk(['-r', repoDir, 'mount', '--all', mp]);
            const f = await startForget(
              repoDir,
              c === 'tree-before-hide' ? 'forget-after-journal' : 'forget-after-hide',
              tag,
            );
            const file = path.join(mp, 'vm', 'cp', 'vda.raw');
            let fd: number | undefined;
            try {
              fd = fs.openSync(file, 'r');
            } catch (e) {
              assert.equal((e as NodeJS.ErrnoException).code, 'ENOENT', `${tag}: ${String(e)}`);
            }
            f.resume();
            const fr = await f.done;
            assert.equal(fr.code, 0, fr.stderr);
            if (c === 'tree-before-hide') {
              assert.ok(fd !== undefined, `${tag}: opened before the forget hid it`);
              assert.ok(pinnedOf(fr.stdout), `${tag}: forget saw the tree mount's pin`);
              const want = fs.readFileSync(img);
              const got = Buffer.alloc(want.length);
              assert.equal(fs.readSync(fd, got, 0, got.length, 0), got.length);
              assert.ok(got.equals(want), `${tag}: bytes differ`);
              served++;
            } else {
              assert.equal(fd, undefined, `${tag}: a hidden checkpoint is not opened`);
              refused++;
            }
            if (fd !== undefined) fs.closeSync(fd);
          }
          if (mountAt(mp)) await bkfsOk(['umount', mp]);
          if (round === 0) {
            // Unmounted: gc deletes what the mount kept, and the repository is sound.
            await bkfsOk(['-r', repoDir, 'gc']);
            const left = await bkfsOk(['-r', repoDir, 'list', 'vm', '--json']);
            assert.deepEqual(JSON.parse(left.stdout), [], `${tag}: forgotten`);
            await bkfsOk(['-r', repoDir, 'verify']);
          }
        } finally {
          await forceUnmount(mp);
          fs.rmSync(repoDir, { recursive: true, force: true });
        }
      }
    }
    assert.ok(served > 0 && refused > 0, `served ${served}, refused ${refused}`);
  });
});
