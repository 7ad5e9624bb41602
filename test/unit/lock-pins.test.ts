/**
 * The writer lock and pin files (src/repo/lock.ts, src/repo/pins.ts) on a real filesystem with
 * real flock(2): a lock is exclusive even between two handles of one process, `waitMs` waits for a
 * real holder process to go, a lock file replaced under a waiting process is not trusted, pins are
 * live exactly while their flock is held (a SIGKILLed holder's pin is stale), and broken pin files
 * are REPO_CORRUPT.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { acquireWriterLock, readLockInfo, writerLockHolder } from '../../src/repo/lock';
import { activePins, pinCheckpoints, pinnedCheckpointIds, removeStalePins } from '../../src/repo/pins';
import { isBkfsError } from '../../src/errors';

let work: string;
before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-lock-unit-'));
});
after(() => fs.rmSync(work, { recursive: true, force: true }));

function fresh(name: string): string {
  const d = path.join(work, name);
  fs.mkdirSync(d);
  return d;
}

/** A real process that runs `code` (CommonJS, with `dir` and the dist paths) and reports 'ready'. */
function helper(
  code: string,
  dir: string,
): Promise<{ pid: number; exited: Promise<void>; kill: () => void }> {
  const lockJs = path.resolve(__dirname, '../../src/repo/lock.js');
  const pinsJs = path.resolve(__dirname, '../../src/repo/pins.js');
  const child = spawn(
    process.execPath,
    [
      '-e',
      `const dir=${JSON.stringify(dir)};const L=require(${JSON.stringify(lockJs)});const P=require(${JSON.stringify(pinsJs)});${code}`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return new Promise((resolve, reject) => {
    child.stdout.once('data', () => resolve({ pid: child.pid!, exited, kill: () => child.kill('SIGKILL') }));
    child.once('exit', (c) => reject(new Error(`helper exited ${c}`)));
  });
}

describe('writer lock', () => {
  it('is exclusive between two handles of one process, names its holder, and is free after release', () => {
    const dir = fresh('one');
    const a = acquireWriterLock(dir, 'backup x');
    assert.throws(
      () => acquireWriterLock(dir, 'gc'),
      (e: unknown) =>
        isBkfsError(e, 'REPO_LOCKED') && /locked by pid \d+ on .* \(backup x, since/.test(e.message),
    );
    assert.equal(readLockInfo(dir)?.command, 'backup x');
    assert.equal((writerLockHolder(dir) as { pid: number }).pid, process.pid);
    assert.equal(fs.statSync(path.join(dir, 'lock')).mode & 0o777, 0o600);
    a.release();
    a.release(); // idempotent
    assert.equal(writerLockHolder(dir), undefined);
    assert.equal(fs.readFileSync(path.join(dir, 'lock'), 'utf8'), '', 'no holder info left');
    acquireWriterLock(dir, 'gc').release();
  });

  it('waitMs waits for a real holder to exit; kill -9 of a holder frees it at once', async () => {
    const dir = fresh('wait');
    const h = await helper(
      `L.acquireWriterLock(dir,'holder');process.stdout.write('ready');setTimeout(()=>process.exit(0),400);`,
      dir,
    );
    assert.throws(
      () => acquireWriterLock(dir, 'x'),
      (e: unknown) => isBkfsError(e, 'REPO_LOCKED'),
    );
    const t0 = Date.now();
    const l = acquireWriterLock(dir, 'waiter', { waitMs: 20000, pollMs: 20 });
    assert.ok(Date.now() - t0 < 15000);
    l.release();
    await h.exited;

    const k = await helper(
      `L.acquireWriterLock(dir,'holder');process.stdout.write('ready');setInterval(()=>{},1000);`,
      dir,
    );
    assert.equal((writerLockHolder(dir) as { pid: number }).pid, k.pid);
    k.kill();
    await k.exited;
    assert.equal(writerLockHolder(dir), undefined, 'the kernel released it');
    acquireWriterLock(dir, 'after').release();
  });

  it('honours a lock file of an older bkfs whose process is alive on this host, not a dead one', async () => {
    const dir = fresh('legacy');
    const k = await helper(`process.stdout.write('ready');setInterval(()=>{},1000);`, dir);
    try {
      fs.writeFileSync(
        path.join(dir, 'lock'),
        JSON.stringify({ pid: k.pid, host: os.hostname(), command: 'backup old', time: 't' }),
      );
      assert.throws(
        () => acquireWriterLock(dir, 'x'),
        (e: unknown) => isBkfsError(e, 'REPO_LOCKED') && e.message.includes(`pid ${k.pid}`),
      );
    } finally {
      k.kill();
      await k.exited;
    }
    acquireWriterLock(dir, 'x').release();
  });
});

describe('pins', () => {
  it('are live while their flock is held: a killed reader leaves a stale pin that scans remove', async () => {
    const dir = fresh('pins');
    const repo = { dir };
    const mine = pinCheckpoints(repo, [3, 1]);
    mine.add(7);
    mine.add(7);
    assert.deepEqual(mine.checkpoints, [1, 3, 7]);
    const names = fs.readdirSync(path.join(dir, 'pins'));
    assert.equal(names.length, 2, 'one immutable file per pinning step');
    for (const n of names) assert.equal(fs.statSync(path.join(dir, 'pins', n)).mode & 0o777, 0o600);
    const k = await helper(
      `P.pinCheckpoints({dir},[42]);process.stdout.write('ready');setInterval(()=>{},1000);`,
      dir,
    );
    assert.deepEqual(
      [...pinnedCheckpointIds(repo)].sort((a, b) => a - b),
      [1, 3, 7, 42],
    );
    k.kill();
    await k.exited;
    assert.deepEqual(
      [...pinnedCheckpointIds(repo)].sort((a, b) => a - b),
      [1, 3, 7],
    );
    assert.equal(fs.readdirSync(path.join(dir, 'pins')).length, 2, "the dead reader's pin is gone");
    mine.release();
    assert.deepEqual(activePins(repo), []);
    assert.deepEqual(fs.readdirSync(path.join(dir, 'pins')), []);
  });

  it('a broken pin file is REPO_CORRUPT for scans, left alone by tidying', () => {
    const dir = fresh('broken');
    fs.mkdirSync(path.join(dir, 'pins'));
    const f = path.join(dir, 'pins', '1-aa.json');
    fs.writeFileSync(f, '{"pid":1,');
    assert.throws(
      () => activePins({ dir }),
      (e: unknown) => isBkfsError(e, 'REPO_CORRUPT'),
    );
    removeStalePins({ dir });
    assert.ok(fs.existsSync(f));
    fs.writeFileSync(f, JSON.stringify({ pid: 1, host: 'h', checkpoints: [1, 'x'], time: 't' }));
    assert.throws(
      () => activePins({ dir }),
      (e: unknown) => isBkfsError(e, 'REPO_CORRUPT'),
    );
  });
});
