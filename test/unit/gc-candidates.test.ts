/**
 * Concurrent writers without processes (FORMAT.md, "Concurrent writers"): several writer handles
 * of one real repository in this process (each with its own session file and flock: flock
 * belongs to the open file description, so two handles of one process exclude each other as two
 * processes do), real SQLite, real packs.
 *   - gc marks a chunk that a running writer stored but does not reference yet as a deletion
 *     candidate and keeps it while that writer lives; the writer's commit rescues it (clears the
 *     mark) and a later gc keeps it; the bytes read back;
 *   - a writer that started after the marking never dedups against a candidate: it stores the data
 *     again (a second row, allowed because candidates are outside the unique hash index), and the
 *     older writer's commit then uses that twin; gc deletes the candidate afterwards: one row;
 *   - a candidate nobody rescues is deleted once the writers live at marking time have ended, not
 *     before;
 *   - two writers storing the same new chunk at once: one chunk row, the second writer's extents
 *     re-pointed to it (`applyRemap`), nothing dangling;
 *   - recovery deletes a `running` checkpoint only once its writer's session is gone, and never one
 *     whose writer committed between recovery's listing and its session check;
 *   - `markDeletable` (pure);
 *   - a format-2 repository (the format-3 additions dropped again) is read as it is and migrated
 *     to format 3 by the first writer.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { deadRunningCheckpoints, Repository, type RunningCheckpoint } from '../../src/repo/repository';
import { sessionLive } from '../../src/repo/sessions';
import { ChunkWriter } from '../../src/store/chunk-writer';
import { hashChunk } from '../../src/store/codec';
import { CODEC_RAW } from '../../src/store/hash-len';
import { DiskMapWriter } from '../../src/index/pagemap';
import { IdBlock } from '../../src/index/ids';
import { ensureVm } from '../../src/index/catalog';
import { commitCheckpoint, manifestPath } from '../../src/repo/manifest';
import { markDeletable, runGc } from '../../src/repo/gc';
import { CheckpointReader } from '../../src/chain/reader';
import { randomBuffer } from '../helpers/images';
import { downgradeToV2 } from '../helpers/v1repo';
import { indexFormat } from '../../src/index/migrate';

const CHUNK = 65536;
let work: string;
let n = 0;

before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-gc-candidates-'));
});
after(() => fs.rmSync(work, { recursive: true, force: true }));

function newRepo(): string {
  const dir = path.join(work, `repo${n++}`);
  Repository.init(dir, { chunkSize: CHUNK }).close();
  return dir;
}

function writer(dir: string, what: string): Repository {
  const r = Repository.open(dir);
  r.lockWriter(`backup ${what}`, { kind: 'backup' });
  return r;
}

async function storeChunk(r: Repository, data: Buffer): Promise<{ id: number; cw: ChunkWriter }> {
  const cw = new ChunkWriter(r.db, r.dir, undefined, r.tmpSubdir);
  const id = await cw.put(hashChunk(data), CODEC_RAW, data, data.length);
  await cw.finish();
  return { id, cw };
}

/** A running checkpoint of `vm` whose one disk holds `data` in chunk `chunkId`; returns its id. */
function runningCheckpoint(
  r: Repository,
  vm: string,
  chunkId: number,
  data: Buffer,
): { cp: number; disk: number } {
  const db = r.db;
  return db
    .transaction(() => {
      const v = ensureVm(db, vm);
      const cp = Number(
        db
          .prepare(
            `INSERT INTO checkpoints (vm_id, name, level, state, chain_id, started, writer)
             VALUES (?, 'c1', 'full', 'running', 0, ?, ?)`,
          )
          .run(v.id, Date.now(), r.session ?? null).lastInsertRowid,
      );
      db.prepare('UPDATE checkpoints SET chain_id = ? WHERE id = ?').run(cp, cp);
      const disk = Number(
        db
          .prepare(
            "INSERT INTO disks (checkpoint_id, name, virtual_size, format) VALUES (?, 'vda', ?, 'raw')",
          )
          .run(cp, data.length).lastInsertRowid,
      );
      return { cp, disk };
    })
    .immediate();
}

function writeMap(r: Repository, disk: number, chunkId: number, data: Buffer): void {
  const pages = new IdBlock(r.db, 'page', 16);
  const w = new DiskMapWriter(r.db, r.config.pageSpan, disk, null, () => pages.take());
  w.add({ offset: 0, length: data.length, chunkId, chunkOff: 0, origin: disk, hash: hashChunk(data) });
  w.finish();
}

function commit(r: Repository, cp: number): void {
  commitCheckpoint(r, cp, { configs: [], bytesRead: 0, bytesNewRaw: 0, bytesNewStored: 0, chunksNew: 0 });
}

function chunkRows(dir: string): { id: number; candidate: number | null }[] {
  const r = Repository.open(dir, { readOnly: true });
  try {
    return r.db.prepare('SELECT id, candidate FROM chunks ORDER BY id').all() as {
      id: number;
      candidate: number | null;
    }[];
  } finally {
    r.close();
  }
}

function extentChunks(dir: string): number[] {
  const r = Repository.open(dir, { readOnly: true });
  try {
    return (r.db.prepare('SELECT chunk_id AS c FROM extents ORDER BY page_id').all() as { c: number }[]).map(
      (x) => x.c,
    );
  } finally {
    r.close();
  }
}

async function gc(dir: string): ReturnType<typeof runGc> {
  const r = Repository.open(dir);
  try {
    return await runGc(r, { maxUnused: 0 });
  } finally {
    r.close();
  }
}

async function readBack(dir: string, ref: string, len: number): Promise<Buffer> {
  const r = Repository.open(dir, { readOnly: true });
  try {
    return await CheckpointReader.open(r, ref).readAt('vda', 0, len);
  } finally {
    r.close();
  }
}

describe('gc deletion candidates beside running writers', () => {
  it('a chunk marked while its writer runs is kept, rescued at commit, and reads back', async () => {
    const dir = newRepo();
    const data = randomBuffer(1, CHUNK);
    const w1 = writer(dir, 'a');
    const { id } = await storeChunk(w1, data);
    const g1 = await gc(dir);
    assert.equal(g1.chunksRemoved, 0, 'a live writer may still reference it');
    assert.equal(g1.chunksWaiting, 1);
    assert.notEqual(chunkRows(dir)[0]!.candidate, null, 'marked');
    const { cp, disk } = runningCheckpoint(w1, 'a', id, data);
    writeMap(w1, disk, id, data);
    commit(w1, cp);
    w1.close();
    assert.deepEqual(chunkRows(dir), [{ id, candidate: null }], 'rescued by the commit');
    const g2 = await gc(dir);
    assert.equal(g2.chunksRemoved, 0);
    assert.deepEqual(chunkRows(dir), [{ id, candidate: null }]);
    assert.ok((await readBack(dir, 'a@c1', CHUNK)).equals(data));
  });

  it('a writer started after the marking stores the data again; the older commit uses that twin', async () => {
    const dir = newRepo();
    const data = randomBuffer(2, CHUNK);
    const w1 = writer(dir, 'a');
    const { id: x } = await storeChunk(w1, data);
    await gc(dir); // marks x; w1 is live
    const w2 = writer(dir, 'b');
    const { id: twin } = await storeChunk(w2, data);
    assert.notEqual(twin, x, 'no dedup against a candidate');
    assert.equal(chunkRows(dir).length, 2);
    const a = runningCheckpoint(w1, 'a', x, data);
    writeMap(w1, a.disk, x, data);
    commit(w1, a.cp);
    w1.close();
    assert.deepEqual(extentChunks(dir), [twin], 'the commit re-pointed its extent to the twin');
    const b = runningCheckpoint(w2, 'b', twin, data);
    writeMap(w2, b.disk, twin, data);
    commit(w2, b.cp);
    w2.close();
    const g = await gc(dir);
    assert.equal(g.chunksRemoved, 1, 'the candidate goes once its writers ended');
    assert.deepEqual(chunkRows(dir), [{ id: twin, candidate: null }], 'one row for the hash');
    assert.ok((await readBack(dir, 'a@c1', CHUNK)).equals(data));
    assert.ok((await readBack(dir, 'b@c1', CHUNK)).equals(data));
  });

  it('an unrescued candidate is deleted only after every writer live at marking time ended', async () => {
    const dir = newRepo();
    const w1 = writer(dir, 'a');
    await storeChunk(w1, randomBuffer(3, CHUNK));
    await gc(dir);
    const w2 = writer(dir, 'b'); // started after the marking: not waited for
    assert.equal((await gc(dir)).chunksRemoved, 0, 'w1 still runs');
    assert.equal(chunkRows(dir).length, 1);
    w1.close(); // ends without a commit
    const g = await gc(dir);
    assert.equal(g.chunksRemoved, 1);
    assert.equal(chunkRows(dir).length, 0);
    w2.close();
  });

  it('two writers storing the same new chunk at once: one row, the second re-pointed to it', async () => {
    const dir = newRepo();
    const data = randomBuffer(4, CHUNK);
    const w1 = writer(dir, 'a');
    const w2 = writer(dir, 'b');
    const c1 = new ChunkWriter(w1.db, w1.dir, undefined, w1.tmpSubdir);
    const c2 = new ChunkWriter(w2.db, w2.dir, undefined, w2.tmpSubdir);
    const h = hashChunk(data);
    const id1 = await c1.put(h, CODEC_RAW, data, data.length);
    const id2 = await c2.put(h, CODEC_RAW, data, data.length); // neither is indexed yet
    assert.notEqual(id1, id2, 'ids never collide');
    await c1.finish();
    await c2.finish();
    assert.equal(chunkRows(dir).length, 1, 'one chunk row');
    assert.equal(c2.remap.get(id2), id1);
    assert.equal(c2.stats.newChunks, 0);
    assert.equal(c2.stats.dedupChunks, 1);
    const b = runningCheckpoint(w2, 'b', id2, data);
    writeMap(w2, b.disk, id2, data);
    assert.equal(c2.applyRemap([b.disk]), 1);
    commit(w2, b.cp);
    assert.deepEqual(extentChunks(dir), [id1], 'no extent names the id without a row');
    w1.close();
    w2.close();
    assert.ok((await readBack(dir, 'b@c1', CHUNK)).equals(data));
    // The second writer's pack held only that chunk: it was never indexed and is gone.
    const g = await gc(dir);
    assert.equal(g.orphansRemoved, 0);
    assert.equal(chunkRows(dir).length, 1);
  });

  it("recovery leaves a live writer's running checkpoint alone and removes a dead one's", () => {
    const dir = newRepo();
    const w1 = writer(dir, 'a');
    const { cp } = runningCheckpoint(w1, 'a', 0, Buffer.alloc(CHUNK));
    const other = Repository.open(dir);
    other.lockWriter('forget'); // recovers
    const state = () =>
      other.db.prepare('SELECT state FROM checkpoints WHERE id = ?').get(cp) as { state: string } | undefined;
    assert.equal(state()?.state, 'running');
    other.unlockWriter();
    w1.close(); // its writer is gone (a kill -9 drops the flock the same way)
    other.lockWriter('forget');
    assert.equal(state(), undefined);
    other.close();
  });

  it('recovery that listed a checkpoint as running keeps its manifest when its writer committed and exited before the session check', async () => {
    const dir = newRepo();
    const w1 = writer(dir, 'a');
    const data = randomBuffer(7, CHUNK);
    const other = Repository.open(dir);
    try {
      const { id } = await storeChunk(w1, data);
      const { cp, disk } = runningCheckpoint(w1, 'a', id, data);
      writeMap(w1, disk, id, data);
      // What a concurrent recovery lists first, while the checkpoint is still running ...
      const seen = other.db
        .prepare("SELECT id, uid, writer FROM checkpoints WHERE state = 'running'")
        .all() as RunningCheckpoint[];
      assert.deepEqual(
        seen.map((r) => r.id),
        [cp],
      );
      assert.deepEqual(
        deadRunningCheckpoints(other.db, dir, undefined, seen),
        [],
        'a live writer is not dead',
      );
      // ... then its writer commits (manifest written) and ends its session ...
      commit(w1, cp);
      const uid = (other.db.prepare('SELECT uid FROM checkpoints WHERE id = ?').get(cp) as { uid: string })
        .uid;
      w1.close();
      assert.equal(sessionLive(dir, seen[0]!.writer!), false);
      // ... so the session check says "gone", yet the checkpoint is complete: not dead.
      assert.deepEqual(deadRunningCheckpoints(other.db, dir, undefined, seen), []);
      other.lockWriter('forget'); // recovers
      assert.ok(fs.existsSync(manifestPath(dir, uid)), 'the committed checkpoint keeps its manifest');
      assert.equal(
        (other.db.prepare('SELECT state FROM checkpoints WHERE id = ?').get(cp) as { state: string }).state,
        'complete',
      );
    } finally {
      other.close();
    }
  });

  it('markDeletable: only when every recorded writer ended (pure)', () => {
    const live = new Set(['1-a', '2-b']);
    const isLive = (s: string) => live.has(s);
    assert.equal(markDeletable({ gen: 1, time: 0, sessions: [] }, isLive), true);
    assert.equal(markDeletable({ gen: 1, time: 0, sessions: ['3-c'] }, isLive), true);
    assert.equal(markDeletable({ gen: 1, time: 0, sessions: ['3-c', '1-a'] }, isLive), false);
    assert.equal(markDeletable({ gen: 1, time: 0, sessions: ['1-a'] }, isLive, '1-a'), true, 'not its own');
    assert.equal(markDeletable({ gen: 1, time: 0, sessions: null }, isLive), false, 'writers never recorded');
  });

  it('a format-2 repository is read as it is and migrated (through 3 and 4) to format 6 by the first writer', async () => {
    const dir = newRepo();
    const data = randomBuffer(5, CHUNK);
    const w = writer(dir, 'a');
    const { id } = await storeChunk(w, data);
    const { cp, disk } = runningCheckpoint(w, 'a', id, data);
    writeMap(w, disk, id, data);
    commit(w, cp);
    w.close();
    downgradeToV2(dir); // back to format 2: what format 3 added, removed
    const cfgPath = path.join(dir, 'bkfs-repo.json');
    assert.ok((await readBack(dir, 'a@c1', CHUNK)).equals(data), 'read as format 2');
    const r = Repository.open(dir);
    assert.equal(indexFormat(r.db), 2, 'a reader does not migrate');
    r.lockWriter('gc');
    assert.equal(indexFormat(r.db), 6);
    r.close();
    assert.equal((JSON.parse(fs.readFileSync(cfgPath, 'utf8')) as { format: number }).format, 6);
    assert.equal((await gc(dir)).chunksRemoved, 0);
    assert.ok((await readBack(dir, 'a@c1', CHUNK)).equals(data), 'read as format 6');
  });
});
