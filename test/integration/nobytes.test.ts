/**
 * Never invent bytes (issue 11 §3), against a real repository written by the real `bkfs backup`
 * from a real qcow2 image (qemu-img, qemu-nbd, SQLite, FUSE):
 *  - damage to the block map in a copy of the repository (a deleted `extents` row, a deleted
 *    `disk_pages` row, a deleted `chunks` row, an extent's length changed) makes reads of that
 *    page's range fail: DATA_DAMAGED in the reader, exit 15 from restore, EIO through a mount,
 *    a report from verify (exit 16) naming the range and every checkpoint it affects; every other
 *    range still reads the backed-up bytes;
 *  - a format-1 repository (the format-1 schema, without digests) still reads, verify finds a lost
 *    extent row in it by the manifest, and the first writer migrates it to format 2.
 * These are the tests that fail on the format-1 code: there each damage read back as zeros and
 * verify said "no damage found".
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { randomBuffer } from '../helpers/images';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { Repository } from '../../src/repo/repository';
import { CheckpointReader } from '../../src/chain/reader';
import { PLAIN_FORMAT_VERSION, SCHEMA_V1 } from '../../src/index/schema';
import { logPath } from '../../src/fuse/state';
import { downgradeToV1 } from '../helpers/v1repo';

const MiB = 1 << 20;
const SPAN = 16 * MiB; // default page span
const SIZE = 80 * MiB; // pages 0..4
let work: string;
let repo: string;
let img: string;
let ref1: Buffer; // the disk at check1
let ref2: Buffer; // the disk at check2

/** Data in pages 0-4 at [p*16M, p*16M+4M); check2 rewrites 1 MiB of page 2. */
before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-nobytes-'));
  repo = path.join(work, 'repo');
  const raw = path.join(work, 'src.raw');
  const data = Buffer.alloc(SIZE);
  for (let p = 0; p < 5; p++) randomBuffer(100 + p, 4 * MiB).copy(data, p * SPAN);
  fs.writeFileSync(raw, data);
  img = path.join(work, 'vda.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
  fs.rmSync(raw);
  await bkfsOk(['-r', repo, 'init']);
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'full']);
  ref1 = data;
  await qemuIo(img, 'qcow2', `write -P 0x11 ${40 * MiB} ${MiB}`);
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'inc']);
  ref2 = Buffer.from(data);
  ref2.fill(0x11, 40 * MiB, 41 * MiB);
});

after(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

let copySeq = 0;
/** A copy of the repository with `damage` applied to its index (SQLite, as a bad disk or bug would). */
async function damagedCopy(damage: (db: Database.Database) => void): Promise<string> {
  const copy = path.join(work, `copy-${++copySeq}`);
  await run('cp', ['-a', repo, copy]);
  const db = new Database(path.join(copy, 'index.db'));
  try {
    damage(db);
  } finally {
    db.close();
  }
  return copy;
}

function diskId(db: Database.Database, cp: string): number {
  return (
    db
      .prepare(
        `SELECT d.id AS id FROM disks d JOIN checkpoints c ON c.id = d.checkpoint_id WHERE c.name = ? AND d.name = 'vda'`,
      )
      .get(cp) as { id: number }
  ).id;
}

function pageId(db: Database.Database, cp: string, pageNo: number): number {
  return (
    db
      .prepare('SELECT page_id AS p FROM disk_pages WHERE disk_id = ? AND page_no = ?')
      .get(diskId(db, cp), pageNo) as { p: number }
  ).p;
}

/** A data extent of a page: [page id, offset]. */
function someExtent(
  db: Database.Database,
  cp: string,
  pageNo: number,
): { pid: number; offset: number; chunk: number } {
  const pid = pageId(db, cp, pageNo);
  const r = db
    .prepare(
      'SELECT offset, chunk_id AS chunk FROM extents WHERE page_id = ? AND chunk_id IS NOT NULL ORDER BY offset LIMIT 1 OFFSET 3',
    )
    .get(pid) as { offset: number; chunk: number };
  return { pid, offset: r.offset, chunk: r.chunk };
}

/** Reads of `bad` pages fail with DATA_DAMAGED naming their range; every other page reads right. */
async function assertReads(copy: string, cp: string, want: Buffer, bad: number[]): Promise<void> {
  const r = Repository.open(copy);
  try {
    const reader = CheckpointReader.open(r, `web@${cp}`);
    for (let p = 0; p < 5; p++) {
      const off = p * SPAN;
      if (bad.includes(p)) {
        await assert.rejects(reader.readAt('vda', off + 3 * MiB, 4096), (e: Error & { code?: string }) => {
          assert.equal(e.code, 'DATA_DAMAGED', e.message);
          assert.match(e.message, new RegExp(`bytes ${off}-${off + SPAN}`));
          return true;
        });
      } else {
        const got = await reader.readAt('vda', off, SPAN);
        assert.ok(got.equals(want.subarray(off, off + SPAN)), `${cp} page ${p} reads the backed-up bytes`);
      }
    }
  } finally {
    r.close();
  }
}

async function assertRestoreFails(copy: string, cp: string, page: number): Promise<void> {
  const out = path.join(work, `restore-${++copySeq}.raw`);
  const res = await bkfs(['-r', copy, 'restore', `web@${cp}`, '--disk', 'vda', '--to', out]);
  assert.equal(res.code, EXIT_CODES.DATA_DAMAGED, res.stderr);
  assert.match(res.stderr, new RegExp(`bytes ${page * SPAN}-${(page + 1) * SPAN}`));
  assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
  assert.ok(!fs.existsSync(out), 'no restored file with invented bytes');
}

async function assertVerifyReports(copy: string, page: number, affects: string[]): Promise<void> {
  const res = await bkfs(['-r', copy, 'verify']);
  assert.equal(res.code, EXIT_CODES.VERIFY_FAILED, res.stdout + res.stderr);
  const text = res.stdout + res.stderr;
  const lines = text.split('\n').filter((l) => l.includes(`bytes ${page * SPAN}-${(page + 1) * SPAN}`));
  assert.ok(lines.length > 0, text);
  for (const cp of affects)
    assert.ok(
      lines.some((l) => l.includes(`web@${cp} disk vda`)),
      `${cp}: ${text}`,
    );
}

describe('damage to the block map is never read as zeros', () => {
  it('a deleted extents row of a page shared by two checkpoints', async () => {
    const copy = await damagedCopy((db) => {
      const e = someExtent(db, 'check1', 1);
      assert.equal(pageId(db, 'check2', 1), e.pid, 'page 1 is shared');
      db.prepare('DELETE FROM extents WHERE page_id = ? AND offset = ?').run(e.pid, e.offset);
    });
    await assertReads(copy, 'check1', ref1, [1]);
    await assertReads(copy, 'check2', ref2, [1]);
    await assertRestoreFails(copy, 'check1', 1);
    await assertVerifyReports(copy, 1, ['check1', 'check2']);
  });

  it('a deleted disk_pages row', async () => {
    const copy = await damagedCopy((db) => {
      db.prepare('DELETE FROM disk_pages WHERE disk_id = ? AND page_no = 3').run(diskId(db, 'check1'));
    });
    await assertReads(copy, 'check1', ref1, [3]);
    await assertReads(copy, 'check2', ref2, []);
    await assertRestoreFails(copy, 'check1', 3);
    await assertVerifyReports(copy, 3, ['check1']);
  });

  it('a deleted chunks row', async () => {
    const copy = await damagedCopy((db) => {
      const e = someExtent(db, 'check1', 0);
      db.prepare('DELETE FROM chunks WHERE id = ?').run(e.chunk);
    });
    await assertReads(copy, 'check1', ref1, [0]);
    await assertReads(copy, 'check2', ref2, [0]);
    await assertRestoreFails(copy, 'check2', 0);
    await assertVerifyReports(copy, 0, ['check1', 'check2']);
  });

  it("a changed extent length (check1's own page; check2 rewrote it)", async () => {
    const copy = await damagedCopy((db) => {
      const e = someExtent(db, 'check1', 2);
      assert.notEqual(pageId(db, 'check2', 2), e.pid);
      db.prepare('UPDATE extents SET length = length - 4096 WHERE page_id = ? AND offset = ?').run(
        e.pid,
        e.offset,
      );
    });
    await assertReads(copy, 'check1', ref1, [2]);
    await assertReads(copy, 'check2', ref2, []);
    await assertRestoreFails(copy, 'check1', 2);
    await assertVerifyReports(copy, 2, ['check1']);
  });

  it('through a mount: EIO for the damaged pages, the backed-up bytes elsewhere, a log line naming the range', async () => {
    const copy = await damagedCopy((db) => {
      const a = someExtent(db, 'check1', 1);
      db.prepare('DELETE FROM extents WHERE page_id = ? AND offset = ?').run(a.pid, a.offset);
      db.prepare('DELETE FROM disk_pages WHERE disk_id = ? AND page_no = 3').run(diskId(db, 'check1'));
      db.prepare('DELETE FROM chunks WHERE id = ?').run(someExtent(db, 'check1', 0).chunk);
      const d = someExtent(db, 'check1', 2);
      db.prepare('UPDATE extents SET length = length - 4096 WHERE page_id = ? AND offset = ?').run(
        d.pid,
        d.offset,
      );
    });
    const mp = path.join(work, 'mnt-damaged');
    fs.mkdirSync(mp);
    await bkfsOk(['-r', copy, 'mount', 'web@check1', mp]);
    try {
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      try {
        for (let p = 0; p < 5; p++) {
          const off = p * SPAN;
          const b = Buffer.alloc(MiB);
          if (p < 4) {
            assert.throws(() => fs.readSync(fd, b, 0, b.length, off + MiB), { code: 'EIO' }, `page ${p}`);
            // a hole of a damaged page is not zeros either
            assert.throws(
              () => fs.readSync(fd, b, 0, b.length, off + 8 * MiB),
              { code: 'EIO' },
              `page ${p} hole`,
            );
          } else {
            assert.equal(fs.readSync(fd, b, 0, b.length, off), b.length);
            assert.ok(b.equals(ref1.subarray(off, off + MiB)), 'page 4 reads the backed-up bytes');
          }
        }
      } finally {
        fs.closeSync(fd);
      }
      const log = fs.readFileSync(logPath(mp), 'utf8');
      for (let p = 0; p < 4; p++) {
        assert.match(log, new RegExp(`damaged data: web@check1 vda bytes ${p * SPAN}-`), log);
      }
    } finally {
      await bkfsOk(['umount', mp]);
    }
  });
});

describe('format 1 repositories', () => {
  it('read without digests, verify finds a lost row by the manifest, and the first writer migrates to format 2', async () => {
    const copy = path.join(work, 'v1');
    await run('cp', ['-a', repo, copy]);
    downgradeToV1(copy);
    // The fixture is a true format-1 repository: the format-1 schema, format 1 everywhere.
    const db = new Database(path.join(copy, 'index.db'));
    const fresh = new Database(':memory:');
    fresh.exec(SCHEMA_V1);
    const schema = (d: Database.Database) =>
      d
        .prepare("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
        .all();
    assert.deepEqual(schema(db), schema(fresh));
    fresh.close();
    db.close();
    assert.equal(JSON.parse(fs.readFileSync(path.join(copy, 'bkfs-repo.json'), 'utf8')).format, 1);

    await assertReads(copy, 'check1', ref1, []);
    await assertReads(copy, 'check2', ref2, []);
    await bkfsOk(['-r', copy, 'verify', '--read-only']); // takes no lock: does not migrate

    // Lost extent row in format 1: the index alone cannot tell, the manifest can.
    const bad = path.join(work, 'v1-bad');
    await run('cp', ['-a', copy, bad]);
    const bdb = new Database(path.join(bad, 'index.db'));
    const e = someExtent(bdb, 'check1', 4);
    bdb.prepare('DELETE FROM extents WHERE page_id = ? AND offset = ?').run(e.pid, e.offset);
    bdb.close();
    const v = await bkfs(['-r', bad, 'verify', '--read-only']);
    assert.equal(JSON.parse(fs.readFileSync(path.join(bad, 'bkfs-repo.json'), 'utf8')).format, 1);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stdout + v.stderr);
    assert.match(
      v.stdout + v.stderr,
      new RegExp(`bytes ${4 * SPAN}-${SIZE} disagrees with the manifest.*web@check1 disk vda`),
    );

    // A writer (gc) migrates: format 2's digests for every disk, and the current format (4: frames
    // chunks, which need nothing converted) in the index and the config.
    await bkfsOk(['-r', copy, 'gc']);
    assert.equal(
      JSON.parse(fs.readFileSync(path.join(copy, 'bkfs-repo.json'), 'utf8')).format,
      PLAIN_FORMAT_VERSION,
    );
    const mdb = new Database(path.join(copy, 'index.db'), { readonly: true });
    assert.equal(
      (mdb.prepare("SELECT value FROM meta WHERE key = 'format'").get() as { value: string }).value,
      String(PLAIN_FORMAT_VERSION),
    );
    assert.equal(
      (
        mdb
          .prepare('SELECT count(*) AS n FROM disks WHERE id NOT IN (SELECT disk_id FROM disk_maps)')
          .get() as { n: number }
      ).n,
      0,
    );
    mdb.close();
    await assertReads(copy, 'check1', ref1, []);
    await assertReads(copy, 'check2', ref2, []);
    await bkfsOk(['-r', copy, 'verify']);
    // ... and from now on a lost row is caught on the read path.
    const db2 = new Database(path.join(copy, 'index.db'));
    db2.prepare('DELETE FROM disk_pages WHERE disk_id = ? AND page_no = 4').run(diskId(db2, 'check2'));
    db2.close();
    await assertReads(copy, 'check2', ref2, [4]);
  });
});

describe('restore --since needs proof that the target holds the older checkpoint', () => {
  const since = (file: string, to: string, from: string, ...extra: string[]) =>
    bkfs([
      '-r',
      repo,
      'restore',
      `web@${to}`,
      '--disk',
      'vda',
      '--to',
      file,
      '--since',
      `web@${from}`,
      ...extra,
    ]);
  const mismatch = (r: { code: number; stderr: string }, re: RegExp) => {
    assert.equal(r.code, EXIT_CODES.TARGET_MISMATCH, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, re);
  };

  it('accepts its own unmodified restore (marker), refuses a modified, foreign or unmarked file', async () => {
    const file = path.join(work, 'since-vda.raw');
    await bkfsOk(['-r', repo, 'restore', 'web@check1', '--disk', 'vda', '--to', file]);
    const marker = `${file}.bkfs-restore.json`;
    assert.equal(fs.statSync(marker).mode & 0o777, 0o600);
    assert.equal(JSON.parse(fs.readFileSync(marker, 'utf8')).checkpoint.name, 'check1');

    // The marker proves check1: only the difference is written, and the result is check2.
    const ok = await since(file, 'check2', 'check1', '--json');
    assert.equal(ok.code, 0, ok.stderr);
    assert.ok(fs.readFileSync(file).equals(ref2));
    assert.equal(JSON.parse(fs.readFileSync(marker, 'utf8')).checkpoint.name, 'check2');

    // The marker names check2 now: --since check1 is refused.
    mismatch(await since(file, 'check1', 'check1'), /holds web@check2 disk vda, not web@check1/);

    // A VM that ran from the restored disk wrote to it (a real write through QEMU's block layer).
    const before = fs.readFileSync(file);
    await qemuIo(file, 'raw', 'write -P 0x42 0 4096');
    const r = await since(file, 'check1', 'check2');
    mismatch(r, /was modified after bkfs restored web@check2 into it .*(mtime|ctime)/);
    assert.ok(fs.readFileSync(file).subarray(4096).equals(before.subarray(4096)), 'nothing written');
    // Even a write that changes nothing but the times is caught.
    fs.writeFileSync(file, before);
    mismatch(await since(file, 'check1', 'check2'), /was modified/);

    // --verify-target compares in full instead: it refuses a target that differs ...
    await qemuIo(file, 'raw', `write -P 0x42 ${20 * MiB} 4096`);
    mismatch(await since(file, 'check1', 'check2', '--verify-target'), /first difference at byte 20971520/);
    // ... and accepts one that holds the checkpoint, marker or not.
    await qemuIo(file, 'raw', `write -P 0x00 ${20 * MiB} 4096`);
    fs.writeFileSync(file, ref2);
    fs.rmSync(marker);
    mismatch(await since(file, 'check1', 'check2'), /has no bkfs restore marker/);
    const v = await since(file, 'check1', 'check2', '--verify-target');
    assert.equal(v.code, 0, v.stderr);
    assert.ok(fs.readFileSync(file).equals(ref1));
    assert.equal(JSON.parse(fs.readFileSync(marker, 'utf8')).checkpoint.name, 'check1');

    // A copy of a restored file carries no marker of its own.
    const copy = path.join(work, 'since-copy.raw');
    fs.copyFileSync(file, copy);
    mismatch(await since(copy, 'check2', 'check1'), /has no bkfs restore marker/);
    // Someone else's marker next to it does not help either (other inode).
    fs.copyFileSync(marker, `${copy}.bkfs-restore.json`);
    mismatch(await since(copy, 'check2', 'check1'), /inode/);
  });
});

describe('the mount daemon survives failures under it', () => {
  it('read-ahead into a damaged page, a pack truncated under the mount: EIO there, the right bytes elsewhere, the daemon lives', async () => {
    let cut = 0;
    let cachedOk: number[] = [];
    const copy = await damagedCopy((db) => {
      const d = someExtent(db, 'check1', 2);
      db.prepare('UPDATE extents SET length = length - 4096 WHERE page_id = ? AND offset = ?').run(
        d.pid,
        d.offset,
      );
    });
    const db = new Database(path.join(copy, 'index.db'), { readonly: true });
    const chunksOf = (p: number) =>
      db
        .prepare(
          `SELECT pk.name AS pack, c.offset AS off, c.stored_len AS len FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id
             JOIN chunks c ON c.id = e.chunk_id JOIN packs pk ON pk.id = c.pack_id WHERE dp.disk_id = ? AND dp.page_no = ?`,
        )
        .all(diskId(db, 'check1'), p) as { pack: string; off: number; len: number }[];
    const p4 = chunksOf(4);
    const pack = p4[0]!.pack;
    assert.ok(p4.every((c) => c.pack === pack));
    cut = Math.min(...p4.map((c) => c.off)) - 48; // before page 4's first record
    // Pages whose chunks all lie before the cut still read from the pack; page 1 is read (and
    // cached) before the cut.
    cachedOk = [0, 3].filter((p) => chunksOf(p).every((c) => c.pack === pack && c.off + c.len <= cut));
    db.close();
    const mp = path.join(work, 'mnt-survive');
    fs.mkdirSync(mp);
    await bkfsOk(['-r', copy, 'mount', 'web@check1', mp]);
    try {
      const { readState } = await import('../../src/fuse/state');
      const pid = readState(mp)!.pid;
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      try {
        // Sequential 128 KiB reads to the end of page 1: read-ahead runs into page 2 (damaged).
        const b = Buffer.alloc(128 * 1024);
        for (let off = SPAN; off < 2 * SPAN; off += b.length) {
          assert.equal(fs.readSync(fd, b, 0, b.length, off), b.length);
          assert.ok(b.equals(ref1.subarray(off, off + b.length)), `page 1 at ${off}`);
        }
        await new Promise((r) => setTimeout(r, 300));
        assert.throws(() => fs.readSync(fd, b, 0, b.length, 2 * SPAN), { code: 'EIO' });
        // The pack loses its tail under the mount (a real on-disk truncation).
        fs.truncateSync(path.join(copy, 'packs', pack.slice(0, 2), `${pack}.pack`), cut);
        const m = Buffer.alloc(MiB);
        assert.throws(() => fs.readSync(fd, m, 0, m.length, 4 * SPAN), { code: 'EIO' }, 'page 4 is gone');
        for (const p of [1, ...cachedOk]) {
          assert.equal(fs.readSync(fd, m, 0, m.length, p * SPAN), m.length);
          assert.ok(m.equals(ref1.subarray(p * SPAN, p * SPAN + MiB)), `page ${p} still reads right`);
        }
        assert.equal(fs.statSync(path.join(mp, 'vda.raw')).size, SIZE, 'the mount answers');
        process.kill(pid, 0); // the daemon is alive
      } finally {
        fs.closeSync(fd);
      }
      const log = fs.readFileSync(logPath(mp), 'utf8');
      assert.doesNotMatch(log, /unexpected failure/, log);
    } finally {
      await bkfsOk(['umount', mp]);
    }
  });
});

describe('digests survive gc pack rewrites and an index rebuild', () => {
  it('forget + gc (pack rewrite) and repair --rebuild-index keep every block map matching its digests', async () => {
    const copy = path.join(work, 'lifecycle');
    await run('cp', ['-a', repo, copy]);
    await bkfsOk(['-r', copy, 'forget', 'web@check1']);
    await bkfsOk(['-r', copy, 'gc']);
    await assertReads(copy, 'check2', ref2, []);
    await bkfsOk(['-r', copy, 'verify']);
    const before = new Database(path.join(copy, 'index.db'), { readonly: true });
    const sums = before.prepare('SELECT disk_id, digest FROM disk_maps ORDER BY disk_id').all();
    before.close();
    await bkfsOk(['-r', copy, 'repair', '--rebuild-index']);
    const after = new Database(path.join(copy, 'index.db'), { readonly: true });
    assert.deepEqual(after.prepare('SELECT disk_id, digest FROM disk_maps ORDER BY disk_id').all(), sums);
    after.close();
    await assertReads(copy, 'check2', ref2, []);
    await bkfsOk(['-r', copy, 'verify']);
  });
});
