/**
 * The power-loss test layer (test/helpers/powerfs.ts) itself, on a real FUSE mount: what survives
 * a power cut is exactly what was made durable by fsync of the file and of its directory. Also
 * shows that SQLite works on it (WAL, mmap'd -shm, locks) and that a WAL commit with
 * `synchronous = NORMAL` is lost by a power cut while one with `FULL` is not (the bkfs finding).
 * Needs root (or fuse group access), /dev/fuse and libfuse2 (scripts/setup.sh).
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { PowerFs } from '../helpers/powerfs';

let work: string;
let n = 0;

before(() => {
  assert.ok(
    fs.existsSync('/dev/fuse'),
    'powerfs needs /dev/fuse (FUSE kernel module; install fuse3/libfuse2)',
  );
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-durable-powerfs-'));
});
after(async () => {
  await PowerFs.killAll();
  fs.rmSync(work, { recursive: true, force: true });
});

/** A fresh backing dir (with `init` applied directly, i.e. durable) and a mount over it. */
async function setup(init?: (dir: string) => void): Promise<{ pfs: PowerFs; mnt: string; back: string }> {
  n++;
  const back = path.join(work, `back${n}`);
  const mnt = path.join(work, `mnt${n}`);
  fs.mkdirSync(back);
  fs.mkdirSync(mnt);
  init?.(back);
  const pfs = await PowerFs.start(back, mnt);
  return { pfs, mnt, back };
}

function fsyncPath(p: string): void {
  const fd = fs.openSync(p, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function writeSynced(p: string, data: string): void {
  const fd = fs.openSync(p, 'w');
  fs.writeSync(fd, data);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

describe('powerfs: a power cut keeps exactly what was made durable', () => {
  it('writes without fsync are lost; fsynced content stays', async () => {
    const { pfs, mnt, back } = await setup((d) => fs.writeFileSync(path.join(d, 'a'), 'old'));
    const f = path.join(mnt, 'a');
    assert.equal(fs.readFileSync(f, 'utf8'), 'old');
    fs.writeFileSync(f, 'new content, not synced');
    assert.equal(fs.readFileSync(f, 'utf8'), 'new content, not synced');
    await pfs.cut();
    assert.equal(fs.readFileSync(path.join(back, 'a'), 'utf8'), 'old');

    const s = await setup((d) => fs.writeFileSync(path.join(d, 'a'), 'old'));
    writeSynced(path.join(s.mnt, 'a'), 'synced');
    fs.appendFileSync(path.join(s.mnt, 'a'), ' + tail not synced');
    await s.pfs.cut();
    assert.equal(fs.readFileSync(path.join(s.back, 'a'), 'utf8'), 'synced');
  });

  it('a new file fsynced but not its directory is gone; with the directory fsync it stays', async () => {
    const { pfs, mnt, back } = await setup();
    writeSynced(path.join(mnt, 'new'), 'data');
    fs.mkdirSync(path.join(mnt, 'sub'));
    writeSynced(path.join(mnt, 'sub', 'x'), 'x');
    fsyncPath(path.join(mnt, 'sub')); // sub's entries durable, but sub itself is not in the root
    await pfs.cut();
    assert.deepEqual(fs.readdirSync(back), []);

    const s = await setup();
    writeSynced(path.join(s.mnt, 'new'), 'data');
    fs.writeFileSync(path.join(s.mnt, 'empty'), 'never synced');
    fsyncPath(s.mnt);
    await s.pfs.cut();
    assert.equal(fs.readFileSync(path.join(s.back, 'new'), 'utf8'), 'data');
    // Its name is durable, its content never was.
    assert.equal(fs.readFileSync(path.join(s.back, 'empty'), 'utf8'), '');
  });

  it('a rename without a directory fsync comes back under its old name; rename over a file too', async () => {
    const { pfs, mnt, back } = await setup((d) => {
      fs.writeFileSync(path.join(d, 'a'), 'A');
      fs.writeFileSync(path.join(d, 'b'), 'B');
      fs.mkdirSync(path.join(d, 'sub'));
    });
    fs.renameSync(path.join(mnt, 'a'), path.join(mnt, 'b')); // replaces b
    fs.renameSync(path.join(mnt, 'b'), path.join(mnt, 'sub', 'c'));
    assert.deepEqual(fs.readdirSync(mnt).sort(), ['sub']);
    await pfs.cut();
    assert.deepEqual(fs.readdirSync(back).sort(), ['a', 'b', 'sub']);
    assert.equal(fs.readFileSync(path.join(back, 'a'), 'utf8'), 'A');
    assert.equal(fs.readFileSync(path.join(back, 'b'), 'utf8'), 'B');
    assert.deepEqual(fs.readdirSync(path.join(back, 'sub')), []);

    // The atomic-replace idiom made durable: temp, fsync, rename, fsync dir.
    const s = await setup((d) => fs.writeFileSync(path.join(d, 'cfg'), 'v1'));
    writeSynced(path.join(s.mnt, 'cfg.tmp'), 'v2');
    fs.renameSync(path.join(s.mnt, 'cfg.tmp'), path.join(s.mnt, 'cfg'));
    fsyncPath(s.mnt);
    await s.pfs.cut();
    assert.deepEqual(fs.readdirSync(s.back), ['cfg']);
    assert.equal(fs.readFileSync(path.join(s.back, 'cfg'), 'utf8'), 'v2');
  });

  it('an unlink without a directory fsync is undone; with it, it is not', async () => {
    const { pfs, mnt, back } = await setup((d) => {
      fs.writeFileSync(path.join(d, 'a'), 'A');
      fs.writeFileSync(path.join(d, 'b'), 'B');
    });
    fs.rmSync(path.join(mnt, 'a'));
    await pfs.sync(); // like `sync`: a's removal is durable now
    fs.rmSync(path.join(mnt, 'b'));
    await pfs.cut();
    assert.deepEqual(fs.readdirSync(back), ['b']);
    assert.equal(fs.readFileSync(path.join(back, 'b'), 'utf8'), 'B');
  });

  it('keepDirOps: the journal kept every directory change, file data is still only what was fsynced', async () => {
    const { pfs, mnt, back } = await setup((d) => fs.writeFileSync(path.join(d, 'old'), 'O'));
    await pfs.arm({ keepDirOps: true });
    writeSynced(path.join(mnt, 'synced'), 'S');
    fs.writeFileSync(path.join(mnt, 'unsynced'), 'U');
    fs.renameSync(path.join(mnt, 'old'), path.join(mnt, 'renamed'));
    await pfs.cut();
    assert.deepEqual(fs.readdirSync(back).sort(), ['renamed', 'synced', 'unsynced']);
    assert.equal(fs.readFileSync(path.join(back, 'renamed'), 'utf8'), 'O');
    assert.equal(fs.readFileSync(path.join(back, 'synced'), 'utf8'), 'S');
    assert.equal(fs.readFileSync(path.join(back, 'unsynced'), 'utf8'), '');
  });

  it('counts fsync boundaries and cuts at the N-th: that fsync and everything after it fail, change nothing', async () => {
    const { pfs, mnt, back } = await setup();
    await pfs.arm({ atFsync: 3 });
    writeSynced(path.join(mnt, 'one'), '1'); // fsync 1
    fsyncPath(mnt); // fsync 2
    const fd = fs.openSync(path.join(mnt, 'two'), 'w');
    fs.writeSync(fd, '2');
    assert.throws(() => fs.fsyncSync(fd), { code: 'EIO' }); // fsync 3: the power fails
    assert.throws(() => fs.writeSync(fd, 'more'), { code: 'EIO' });
    fs.closeSync(fd);
    const dead = await pfs.whenDead();
    assert.equal(dead.fsyncs, 3);
    assert.equal(dead.dead, true);
    await pfs.cut();
    assert.deepEqual(fs.readdirSync(back), ['one']);
    assert.equal(fs.readFileSync(path.join(back, 'one'), 'utf8'), '1');

    const s = await setup();
    await s.pfs.arm({ atOp: 2 }); // create = op 1, first write = op 2
    const fd2 = fs.openSync(path.join(s.mnt, 'f'), 'w');
    assert.throws(() => fs.writeSync(fd2, 'x'), { code: 'EIO' });
    fs.closeSync(fd2);
    assert.equal((await s.pfs.whenDead()).ops, 2);
    await s.pfs.cut();
    assert.deepEqual(fs.readdirSync(s.back), []);
  });

  it('SQLite runs on it (WAL + mmap -shm); a NORMAL commit can be lost by a power cut, a FULL one is not', async () => {
    for (const sync of ['NORMAL', 'FULL']) {
      const { pfs, mnt, back } = await setup();
      const db = new Database(path.join(mnt, 'db'));
      db.pragma('journal_mode = WAL');
      db.pragma(`synchronous = ${sync}`);
      db.exec('CREATE TABLE t (v TEXT)');
      db.prepare('INSERT INTO t VALUES (?)').run('first');
      db.pragma('wal_checkpoint(TRUNCATE)');
      db.prepare('INSERT INTO t VALUES (?)').run('committed'); // returned: the caller believes it
      // A second connection (another process would do the same) sees it through the shared -shm.
      const other = new Database(path.join(mnt, 'db'), { readonly: true });
      assert.equal((other.prepare('SELECT count(*) AS n FROM t').get() as { n: number }).n, 2);
      other.close();
      await pfs.arm({ atOp: 1 }); // the next change never happens: the power is off
      assert.throws(() => db.prepare('INSERT INTO t VALUES (?)').run('never'));
      db.close();
      await pfs.cut();
      const after = new Database(path.join(back, 'db'));
      const rows = (after.prepare('SELECT v FROM t ORDER BY rowid').all() as { v: string }[]).map((r) => r.v);
      after.close();
      if (sync === 'FULL') assert.deepEqual(rows, ['first', 'committed']);
      else assert.deepEqual(rows, ['first'], 'synchronous=NORMAL loses a returned commit on power loss');
    }
  });
});
