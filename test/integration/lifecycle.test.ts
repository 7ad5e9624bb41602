/**
 * Repository lifecycle against real qemu-img / qemu-io / qemu-nbd / nbdkit and real SQLite:
 * forget (by name and by policy), protect, gc (with pinned readers and beside a running backup),
 * index rebuild from manifests and packs, crash safety with real SIGKILLs at named steps
 * (BKFS_TEST_CRASH_AT), damaged chunks, verify --source and stats. Every kept checkpoint is
 * checked byte for byte against `qemu-img convert -O raw` of the image at backup time.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { randomBuffer, toRaw } from '../helpers/images';
import { startNbdkit, type NbdTestServer } from '../helpers/nbd-server';
import { Repository } from '../../src/repo/repository';
import { CheckpointReader } from '../../src/chain/reader';
import { pinCheckpoints } from '../../src/repo/pins';
import { listManifestUids } from '../../src/repo/manifest';
import type { GcReport } from '../../src/repo/gc';
import { packFilesOnDisk } from '../helpers/packfiles';
import { PACK_HEADER_LEN, RECORD_HEADER_LEN, packPath } from '../../src/store/packs';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';
import { isBkfsError } from '../../src/errors';

const MiB = 1 << 20;
const KILLED = 128; // bkfs() reports a process killed by a signal as 128
let work: string;

before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-lifecycle-test-'));
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

interface ListRow {
  name: string;
  level: string;
  parent: string | null;
  protected: boolean;
  damaged: boolean;
}

async function listJson(repo: string, vm: string): Promise<ListRow[]> {
  return JSON.parse((await bkfsOk(['-r', repo, 'list', vm, '--json'])).stdout) as ListRow[];
}

async function names(repo: string, vm: string): Promise<string[]> {
  return (await listJson(repo, vm)).map((r) => r.name);
}

/** A file of deterministic random bytes for `qemu-io write -s`. */
function dataFile(dir: string, seed: number, size: number): string {
  const f = path.join(dir, `data-${seed}-${size}.bin`);
  if (!fs.existsSync(f)) fs.writeFileSync(f, randomBuffer(seed, size));
  return f;
}

/**
 * The repository's chunk and pack state against what its checkpoints need, computed through the
 * read path (CheckpointReader.extents), independently of gc's own bookkeeping.
 */
function storeState(repoDir: string): {
  chunks: number[];
  needed: number[];
  packBytes: number;
  exactPackBytes: number;
  orphans: string[];
} {
  const repo = Repository.open(repoDir);
  try {
    const needed = new Set<number>();
    const cps = repo.db
      .prepare(
        "SELECT c.name AS cp, v.name AS vm FROM checkpoints c JOIN vms v ON v.id = c.vm_id WHERE c.state IN ('complete', 'forgotten')",
      )
      .all() as { cp: string; vm: string }[];
    for (const { vm, cp } of cps) {
      const cpRow = repo.db
        .prepare('SELECT c.* FROM checkpoints c JOIN vms v ON v.id = c.vm_id WHERE v.name = ? AND c.name = ?')
        .get(vm, cp) as never;
      const vmRow = repo.db.prepare('SELECT * FROM vms WHERE name = ?').get(vm) as never;
      const r = new CheckpointReader(repo, vmRow, cpRow);
      for (const d of r.disks) for (const e of r.extents(d.name)) if (e.loc) needed.add(e.loc.id);
    }
    const chunks = (repo.db.prepare('SELECT id FROM chunks ORDER BY id').all() as { id: number }[]).map(
      (r) => r.id,
    );
    const packs = repo.db.prepare('SELECT id, name FROM packs').all() as { id: number; name: string }[];
    let exact = 0;
    for (const p of packs) {
      const s = repo.db
        .prepare('SELECT count(*) AS n, coalesce(sum(stored_len), 0) AS b FROM chunks WHERE pack_id = ?')
        .get(p.id) as { n: number; b: number };
      exact += PACK_HEADER_LEN + s.n * RECORD_HEADER_LEN + s.b;
    }
    const indexed = new Set(packs.map((p) => p.name));
    const files = packFilesOnDisk(repoDir);
    return {
      chunks,
      needed: [...needed].sort((a, b) => a - b),
      packBytes: files.reduce((a, f) => a + f.size, 0),
      exactPackBytes: exact,
      orphans: files.filter((f) => !indexed.has(f.name)).map((f) => f.name),
    };
  } finally {
    repo.close();
  }
}

function assertStoreExact(repoDir: string): void {
  const s = storeState(repoDir);
  assert.deepEqual(s.chunks, s.needed, 'the index holds exactly the chunks the checkpoints use');
  assert.equal(s.packBytes, s.exactPackBytes, 'pack files hold exactly the indexed chunks');
  assert.deepEqual(s.orphans, [], 'no pack file outside the index');
}

/**
 * gc with `--max-unused 0`: every pack with an unused byte is rewritten, so the store ends up
 * exact (`assertStoreExact`). The default threshold is tested in firsthour.test.ts.
 */
async function gcJson(repo: string): Promise<GcReport> {
  return JSON.parse((await bkfsOk(['-r', repo, 'gc', '--json', '--max-unused', '0'])).stdout) as GcReport;
}

// -------------------------------------------------------------------------------------------------

describe('forget, protect and gc on a chain full -> inc x6 -> diff -> inc; then rebuild the index', () => {
  let dir: string;
  let img: string;
  let repo: string;
  const refs = new Map<string, string>();

  const backup = async (level: string): Promise<string> => {
    const r = await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', level]);
    const m = /vm@(\S+): (\w+) backup/.exec(r.stdout);
    assert.ok(m, r.stdout);
    assert.equal(m[2], level === 'auto' ? 'inc' : level);
    const raw = path.join(dir, `${m[1]}.raw`);
    await toRaw(img, raw);
    refs.set(m[1]!, raw);
    return m[1]!;
  };
  const equalsRef = async (repoDir: string, cp: string): Promise<void> =>
    assertCheckpointEquals(repoDir, `vm@${cp}`, 'vda', refs.get(cp)!, 20);

  before(async () => {
    dir = path.join(work, 'chain');
    fs.mkdirSync(dir);
    img = path.join(dir, 'd.qcow2');
    repo = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '48M']);
    await bkfsOk(['-r', repo, 'init']);
    const w = (seed: number, off: number, len: number) =>
      `write -s ${dataFile(dir, seed, len)} ${off}M ${len}`;
    await qemuIo(img, 'qcow2', w(1, 0, 24 * MiB));
    await backup('full'); // check1
    await qemuIo(img, 'qcow2', w(2, 4, 2 * MiB));
    await backup('inc'); // check2
    await qemuIo(img, 'qcow2', w(3, 10, 2 * MiB));
    await backup('inc'); // check3
    await qemuIo(img, 'qcow2', w(4, 20, 3 * MiB));
    await backup('inc'); // check4
    await qemuIo(img, 'qcow2', w(5, 30, MiB), 'write -z 0 1M');
    await backup('inc'); // check5
    await qemuIo(img, 'qcow2', w(6, 4, 2 * MiB));
    await backup('inc'); // check6
    await qemuIo(img, 'qcow2', 'discard 10M 2M', 'write -P 0x77 12M 100000');
    await backup('inc'); // check7
    await qemuIo(img, 'qcow2', w(8, 40, MiB));
    await backup('diff'); // check8
    await qemuIo(img, 'qcow2', w(9, 22, 2 * MiB));
    await backup('inc'); // check9
  });

  it('forgets checkpoints in the middle by name; every kept checkpoint still equals its source', async () => {
    const r = await bkfsOk(['-r', repo, 'forget', 'vm@check3', 'vm@check4']);
    assert.match(r.stdout, /forgot 2 checkpoint/);
    assert.deepEqual(await names(repo, 'vm'), [
      'check1',
      'check2',
      'check5',
      'check6',
      'check7',
      'check8',
      'check9',
    ]);
    for (const cp of ['check5', 'check7', 'check9']) await equalsRef(repo, cp);
  });

  it('protect: forget by name refuses a protected checkpoint, and policies keep it', async () => {
    await bkfsOk(['-r', repo, 'protect', 'vm@check2']);
    assert.equal((await listJson(repo, 'vm'))[1]!.protected, true);
    const before = await names(repo, 'vm');
    const r = await bkfs(['-r', repo, 'forget', 'vm@check5', 'vm@check2']);
    assert.equal(r.code, EXIT_CODES.PROTECTED, r.stderr);
    assert.match(r.stderr, /vm@check2 is protected/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.deepEqual(await names(repo, 'vm'), before, 'all or nothing');

    const bad = await bkfs(['-r', repo, 'forget', 'vm']);
    assert.equal(bad.code, EXIT_CODES.USAGE);
    const none = await bkfs(['-r', repo, 'forget', 'vm', '--keep-last', '0']);
    assert.equal(none.code, EXIT_CODES.USAGE);
    assert.match(none.stderr, /at least one --keep-\* rule/);
    const ghost = await bkfs(['-r', repo, 'forget', 'vm@check77']);
    assert.equal(ghost.code, EXIT_CODES.NOT_FOUND);
    for (const [args, code] of [
      [['forget', 'vm', '--keep-last', 'x'], 'USAGE'],
      [['forget', 'vm@check5', '--keep-last', '2'], 'USAGE'],
      [['protect', 'vm'], 'USAGE'],
      [['repair'], 'USAGE'],
      [['stats', 'ghost'], 'NOT_FOUND'],
      [['verify', '--sample', '0'], 'USAGE'],
    ] as [string[], keyof typeof EXIT_CODES][]) {
      const x = await bkfs(['-r', repo, ...args]);
      assert.equal(x.code, EXIT_CODES[code], `${args.join(' ')}: ${x.stderr}`);
      assert.equal(x.stderr.trim().split('\n').length, 1, x.stderr);
    }
    assert.deepEqual(await names(repo, 'vm'), before);
  });

  it('forgets by policy, including the chain full at the start; dry run changes nothing', async () => {
    const dry = await bkfsOk(['-r', repo, 'forget', 'vm', '--keep-last', '3', '--dry-run', '--json']);
    const plan = JSON.parse(dry.stdout) as {
      removed: { name: string }[];
      kept: { name: string; reasons: string[] }[];
    };
    assert.deepEqual(plan.removed.map((x) => x.name).sort(), ['check1', 'check5', 'check6']);
    assert.deepEqual(plan.kept.map((x) => `${x.name}:${x.reasons.join('+')}`).sort(), [
      'check2:protected',
      'check7:last',
      'check8:last',
      'check9:last',
    ]);
    assert.deepEqual(await names(repo, 'vm'), [
      'check1',
      'check2',
      'check5',
      'check6',
      'check7',
      'check8',
      'check9',
    ]);

    const r = await bkfsOk(['-r', repo, 'forget', 'vm', '--keep-last', '3', '--keep-daily', '1']);
    assert.match(r.stdout, /removed +vm@check1/);
    assert.deepEqual(await names(repo, 'vm'), ['check2', 'check7', 'check8', 'check9']);
    // Manifests follow the catalogue.
    assert.equal(listManifestUids(repo).length, 4);
    for (const cp of ['check2', 'check7', 'check8', 'check9']) await equalsRef(repo, cp);
  });

  it('stats: per-checkpoint unique bytes, ratios, reclaimable space', async () => {
    const s = JSON.parse((await bkfsOk(['-r', repo, 'stats', 'vm', '--json'])).stdout) as {
      vms: { vm: string; checkpoints: number; storedBytes: number; dedupRatio: number }[];
      checkpoints: { name: string; uniqueRawBytes: number; logicalBytes: number }[];
    };
    assert.equal(s.vms[0]!.checkpoints, 4);
    assert.ok(s.vms[0]!.dedupRatio > 2, `dedup ${s.vms[0]!.dedupRatio}`);
    const c9 = s.checkpoints.find((c) => c.name === 'check9')!;
    assert.equal(c9.uniqueRawBytes, 2 * MiB, 'check9 alone holds the 2 MiB written before it');
    assert.equal(c9.logicalBytes, (24 + 1 - 1 - 2 + 1) * MiB, '24 MiB written, +1 -1 zeroed -2 discarded +1');
    const all = JSON.parse((await bkfsOk(['-r', repo, 'stats', '--json'])).stdout) as {
      repository: { reclaimableBytes: number };
    };
    assert.ok(all.repository.reclaimableBytes > 0, 'forgotten data is reclaimable');
    const text = await bkfsOk(['-r', repo, 'stats']);
    assert.match(text.stdout, /reclaimable by gc/);
    assert.match(text.stdout, /vm@check9 +inc/);
  });

  it('gc frees exactly the chunks no kept checkpoint uses', async () => {
    const before = storeState(repo);
    assert.ok(before.chunks.length > before.needed.length);
    const dry = JSON.parse(
      (await bkfsOk(['-r', repo, 'gc', '--dry-run', '--json', '--max-unused', '0'])).stdout,
    ) as Record<string, number>;
    assert.equal(dry.chunksRemoved, before.chunks.length - before.needed.length);
    assert.deepEqual(storeState(repo), before, 'dry run changes nothing');

    const r = await gcJson(repo);
    assert.equal(r.chunksRemoved, before.chunks.length - before.needed.length);
    assert.equal(r.bytesFreed, dry.bytesFreed, 'the dry run predicted the space freed');
    assert.ok(r.packsRewritten + r.packsDeleted > 0);
    assertStoreExact(repo);
    const after = storeState(repo);
    assert.equal(r.bytesFreed, before.packBytes - after.packBytes);
    assert.deepEqual(after.needed, before.needed, 'chunk ids of live data are kept');
    // Nothing left to do.
    const again = await gcJson(repo);
    assert.equal(again.bytesFreed, 0);
    assert.equal(again.chunksRemoved, 0);
    await bkfsOk(['-r', repo, 'verify']);
    for (const cp of ['check2', 'check7', 'check8', 'check9']) await equalsRef(repo, cp);
  });

  it('verify --sample re-reads a share of the chunks; a missing manifest is reported and repaired', async () => {
    const all = JSON.parse((await bkfsOk(['-r', repo, 'verify', '--json'])).stdout) as {
      chunksChecked: number;
    };
    const some = JSON.parse((await bkfsOk(['-r', repo, 'verify', '--sample', '10', '--json'])).stdout) as {
      chunksChecked: number;
    };
    assert.equal(some.chunksChecked, Math.ceil(all.chunksChecked / 10));

    const uids = listManifestUids(repo);
    const victim = path.join(repo, 'manifests', `${uids[0]}.json.zst`);
    fs.rmSync(victim);
    const v = await bkfs(['-r', repo, 'verify']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED);
    assert.match(v.stdout, /manifest [0-9a-f]{32} is missing/);
    const r = await bkfsOk(['-r', repo, 'repair', '--manifests']);
    assert.match(r.stdout, /wrote 1 missing manifest/);
    assert.ok(fs.existsSync(victim));
    await bkfsOk(['-r', repo, 'verify']);
  });

  it('after the chain full is forgotten: diff is refused, inc and auto build on the latest checkpoint', async () => {
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 10, MiB)} 33M 1M`);
    const d = await bkfs(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'diff']);
    assert.equal(d.code, EXIT_CODES.CHAIN_BROKEN, d.stderr);
    assert.match(d.stderr, /full backup .* was forgotten, and a diff needs its bitmap/);
    assert.equal(await backup('auto'), 'check10');
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 11, MiB)} 35M 1M`);
    assert.equal(await backup('inc'), 'check11');
    for (const cp of ['check10', 'check11', 'check9']) await equalsRef(repo, cp);
    // unprotect, then forget by name works.
    await bkfsOk(['-r', repo, 'unprotect', 'vm@check2']);
    await bkfsOk(['-r', repo, 'forget', 'vm@check2', '--prune']);
    assertStoreExact(repo);
  });

  it('index loss: a copy of the repository (cp -a) rebuilds its index and restores every checkpoint', async () => {
    const copy = path.join(dir, 'copy');
    await run('cp', ['-a', repo, copy]);
    const before = await listJson(copy, 'vm');
    await bkfsOk(['-r', repo, 'protect', 'vm@check8']);
    await run('cp', ['-a', path.join(repo, 'manifests'), path.join(dir, 'm')]); // keep for below
    fs.rmSync(path.join(copy, 'manifests'), { recursive: true });
    await run('cp', ['-a', path.join(dir, 'm'), path.join(copy, 'manifests')]);
    for (const f of fs.readdirSync(copy)) if (f.startsWith('index.db')) fs.rmSync(path.join(copy, f));

    const gone = await bkfs(['-r', copy, 'list']);
    assert.equal(gone.code, EXIT_CODES.REPO_NOT_FOUND);
    assert.match(gone.stderr, /repair --rebuild-index/);
    const r = await bkfsOk(['-r', copy, 'repair', '--rebuild-index', '--json']);
    const rep = JSON.parse(r.stdout) as { checkpoints: number; problems: string[]; oldIndex: string | null };
    assert.deepEqual(rep.problems, []);
    assert.equal(rep.checkpoints, before.length);
    assert.equal(rep.oldIndex, null);
    const afterRows = await listJson(copy, 'vm');
    assert.deepEqual(
      afterRows.map((x) => ({ ...x, protected: x.name === 'check8' ? false : x.protected })),
      before,
      'same catalogue',
    );
    assert.equal(afterRows.find((x) => x.name === 'check8')!.protected, true, 'protect reached the manifest');
    await bkfsOk(['-r', copy, 'verify']);
    for (const row of afterRows) await equalsRef(copy, row.name);
    // Nothing forgotten came back, and the rebuilt store is exactly what the checkpoints need.
    assert.deepEqual(
      afterRows.map((x) => x.name),
      ['check7', 'check8', 'check9', 'check10', 'check11'],
    );
    assertStoreExact(copy);
    // Rebuilding a healthy index keeps the old one aside; the chain continues (bitmaps by name).
    const again = JSON.parse((await bkfsOk(['-r', copy, 'repair', '--rebuild-index', '--json'])).stdout) as {
      oldIndex: string;
    };
    assert.match(again.oldIndex, /^index\.db\.broken-/);
    assert.ok(fs.existsSync(path.join(copy, again.oldIndex)));
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 12, MiB)} 44M 1M`);
    const inc = await bkfsOk(['-r', copy, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'inc']);
    assert.match(inc.stdout, /vm@check12: inc backup/);
    await toRaw(img, path.join(dir, 'c12.raw'));
    await assertCheckpointEquals(copy, 'vm@check12', 'vda', path.join(dir, 'c12.raw'), 20);
    // The original, untouched by all this, still reads.
    await equalsRef(repo, 'check11');
  });
});

// -------------------------------------------------------------------------------------------------

async function pauseControl(sock: string, cmd: 'p' | 'r'): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const c = net.connect(sock);
    c.once('error', reject);
    c.once('data', (d) => {
      c.end();
      if (d.toString() === cmd.toUpperCase()) resolve();
      else reject(new Error(`pause filter answered ${d.toString()}`));
    });
    c.write(cmd);
  });
}

async function waitFor(cond: () => boolean, ms = 60000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Compare a whole disk read through `reader` with a raw file. */
async function readerEquals(reader: CheckpointReader, rawFile: string): Promise<void> {
  const want = fs.readFileSync(rawFile);
  const step = 3 * MiB + 4097;
  for (let off = 0; off < want.length; off += step) {
    const got = await reader.readAt('vda', off, step);
    assert.ok(got.equals(want.subarray(off, off + step)), `bytes at ${off} differ`);
  }
}

describe('gc beside readers and a running backup', () => {
  it('a pinned reader keeps reading old checkpoints through forget and gc; space is freed once it ends', async () => {
    const dir = path.join(work, 'pins');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'd.qcow2');
    const repoDir = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await bkfsOk(['-r', repoDir, 'init']);
    await qemuIo(
      img,
      'qcow2',
      `write -s ${dataFile(dir, 21, 16 * MiB)} 0 16M`,
      `write -s ${dataFile(dir, 22, 16 * MiB)} 16M 16M`,
    );
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full', '-c', 'A']);
    await toRaw(img, path.join(dir, 'A.raw'));
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 23, 16 * MiB)} 16M 16M`);
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'B']);
    await toRaw(img, path.join(dir, 'B.raw'));

    const repo = Repository.open(repoDir);
    try {
      const a = CheckpointReader.open(repo, 'vm@A', { cacheBytes: 4 * MiB });
      const b = CheckpointReader.open(repo, 'vm@B', { cacheBytes: 4 * MiB });
      let pin = pinCheckpoints(repo, [a.checkpoint.id, b.checkpoint.id]);
      try {
        // The readers cache page maps (chunk locations) before anything is collected.
        await readerEquals(a, path.join(dir, 'A.raw'));
        await readerEquals(b, path.join(dir, 'B.raw'));

        const f = JSON.parse((await bkfsOk(['-r', repoDir, 'forget', 'vm@A', '--json'])).stdout) as {
          removed: { name: string; pinned?: boolean }[];
        };
        assert.deepEqual(f.removed, [{ ...f.removed[0], name: 'A', pinned: true }]);
        assert.deepEqual(await names(repoDir, 'vm'), ['B'], 'hidden from the catalogue at once');
        const g1 = await gcJson(repoDir);
        assert.equal(g1.checkpointsPinned, 1);
        assert.equal(g1.chunksRemoved, 0, "a pinned checkpoint's data is live");
        await readerEquals(a, path.join(dir, 'A.raw'));

        // A is released; B (pinned) shares the first pack with A's now dead chunks.
        const pinB = pinCheckpoints(repo, [b.checkpoint.id]);
        pin.release();
        pin = pinB;
        // Read B while gc runs in another process.
        const gc = bkfs(['-r', repoDir, 'gc', '--json', '--max-unused', '0']);
        let done = false;
        void gc.then(() => (done = true));
        let rounds = 0;
        while (!done || rounds === 0) {
          await readerEquals(b, path.join(dir, 'B.raw'));
          rounds++;
        }
        const g2r = await gc;
        assert.equal(g2r.code, 0, g2r.stderr);
        const g2 = JSON.parse(g2r.stdout) as GcReport;
        assert.equal(g2.checkpointsRemoved, 1);
        assert.equal(g2.chunksRemoved, 64, "A's 16 MiB that B overwrote");
        assert.equal(g2.packsKeptForReaders, 1);
        assert.equal(g2.packsRewritten, 0);
        await readerEquals(b, path.join(dir, 'B.raw'));
      } finally {
        pin.release();
      }
      const g3 = await gcJson(repoDir);
      assert.equal(g3.packsRewritten, 1);
      assert.ok(g3.bytesFreed >= 16 * MiB, `freed ${g3.bytesFreed}`);
      // The reader's cached locations point into the deleted pack: a fresh reader is needed now,
      // which is what the pin protocol promises (nothing is moved while pinned).
    } finally {
      repo.close();
    }
    assertStoreExact(repoDir);
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'vm@B', 'vda', path.join(dir, 'B.raw'), 20);
  });

  it('a real bkfs mount keeps serving its checkpoint through forget and gc of what it shares', async () => {
    const dir = path.join(work, 'mount');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'd.qcow2');
    const repoDir = path.join(dir, 'repo');
    const mp = path.join(dir, 'mnt');
    fs.mkdirSync(mp);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '48M']);
    await bkfsOk(['-r', repoDir, 'init']);
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 81, 32 * MiB)} 0 32M`);
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full', '-c', 'A']);
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 82, 16 * MiB)} 16M 16M`);
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'B']);
    const refB = path.join(dir, 'B.raw');
    await toRaw(img, refB);
    const want = fs.readFileSync(refB);
    let mounted = false;
    try {
      await bkfsOk(['-r', repoDir, 'mount', 'vm@B', mp]);
      mounted = true;
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      try {
        const got = Buffer.alloc(want.length);
        fs.readSync(fd, got, 0, 8 * MiB, 0);
        // A's second half is dead now, in the pack B still reads its first half from.
        await bkfsOk(['-r', repoDir, 'forget', 'vm@A']);
        const g = await gcJson(repoDir);
        assert.equal(g.chunksRemoved, 64);
        assert.equal(g.packsKeptForReaders, 1, 'the mounted checkpoint uses that pack');
        for (let off = 8 * MiB; off < want.length; off += 4 * MiB) fs.readSync(fd, got, off, 4 * MiB, off);
        assert.ok(got.equals(want), 'the mount read B intact across forget and gc');
      } finally {
        fs.closeSync(fd);
      }
      await bkfsOk(['umount', mp]);
      mounted = false;
    } finally {
      if (mounted) {
        const u = await bkfs(['umount', mp]);
        if (u.code !== 0) await bkfs(['umount', '--lazy', mp]);
        await run('fusermount', ['-u', '-z', mp], { allowFail: true });
      }
    }
    const g2 = await gcJson(repoDir);
    assert.equal(g2.packsRewritten, 1, 'released by the unmount');
    assertStoreExact(repoDir);
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'vm@B', 'vda', refB, 20);
  });

  it('gc and forget run beside a backup (format 3: no more REPO_LOCKED); the backup completes intact', async () => {
    const dir = path.join(work, 'busy');
    fs.mkdirSync(dir);
    const repoDir = path.join(dir, 'repo');
    const raw = path.join(dir, 'src.raw');
    fs.writeFileSync(raw, Buffer.concat([randomBuffer(31, 24 * MiB), Buffer.alloc(8 * MiB)]));
    await bkfsOk(['-r', repoDir, 'init']);
    let srv: NbdTestServer | undefined;
    const control = path.join(dir, 'pause.sock');
    try {
      srv = await startNbdkit('file', [raw, `pause-control=${control}`], {
        filters: ['pause'],
        readOnly: true,
      });
      await waitFor(() => fs.existsSync(control));
      // Requests wait until resumed: the backup holds the writer lock (shared) until then.
      await pauseControl(control, 'p');
      const backup = bkfs(['-r', repoDir, 'backup', 'busy', '--disk', `vda=${srv.uri}`, '-l', 'full']);
      await waitFor(() => fs.existsSync(path.join(repoDir, 'lock')));
      const g = await bkfs(['-r', repoDir, 'gc']);
      assert.equal(g.code, 0, g.stderr);
      const f = await bkfs(['-r', repoDir, 'forget', 'busy', '--keep-last', '1']);
      assert.equal(f.code, 0, f.stderr);
      await pauseControl(control, 'r');
      const b = await backup;
      assert.equal(b.code, 0, b.stderr);
    } finally {
      await srv?.stop();
    }
    await gcJson(repoDir);
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'busy', 'vda', raw, 20);
  });
});

// -------------------------------------------------------------------------------------------------

describe('kill -9 at every step of forget, gc, repair and a backup commit', () => {
  let dir: string;
  let img: string;
  let repo: string;
  const refs = new Map<string, string>();

  const crash = async (step: string, args: string[]): Promise<void> => {
    const r = await bkfs(['-r', repo, ...args], { BKFS_TEST_CRASH_AT: step });
    assert.equal(r.code, KILLED, `expected a SIGKILL at ${step}: ${r.code} ${r.stderr}`);
  };
  const healthy = async (expected: string[]): Promise<void> => {
    // --read-only: a reader's check (verify that records damage is a writer and would finish the
    // interrupted command's recovery itself, which the steps below check explicitly).
    const v = await bkfs(['-r', repo, 'verify', '--read-only']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    assert.deepEqual(await names(repo, 'vm'), expected);
    for (const cp of expected) await assertCheckpointEquals(repo, `vm@${cp}`, 'vda', refs.get(cp)!, 10);
  };
  /** Rebuild a copy's index from scratch and return its checkpoint names. */
  const rebuiltNames = async (tag: string): Promise<string[]> => {
    const copy = path.join(dir, `copy-${tag}`);
    await run('cp', ['-a', repo, copy]);
    for (const f of fs.readdirSync(copy)) if (f.startsWith('index.db')) fs.rmSync(path.join(copy, f));
    fs.rmSync(path.join(copy, 'lock'), { force: true });
    await bkfsOk(['-r', copy, 'repair', '--rebuild-index']);
    const n = await names(copy, 'vm');
    fs.rmSync(copy, { recursive: true, force: true });
    return n;
  };

  before(async () => {
    dir = path.join(work, 'crash');
    fs.mkdirSync(dir);
    img = path.join(dir, 'd.qcow2');
    repo = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await bkfsOk(['-r', repo, 'init']);
    for (let i = 1; i <= 6; i++) {
      const len = i === 1 ? 12 * MiB : 2 * MiB;
      await qemuIo(
        img,
        'qcow2',
        `write -s ${dataFile(dir, 40 + i, len)} ${i === 1 ? 0 : (i - 1) * 2}M ${len}`,
      );
      await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`]);
      const raw = path.join(dir, `check${i}.raw`);
      await toRaw(img, raw);
      refs.set(`check${i}`, raw);
    }
  });

  it('forget: after the journal, after the index transaction, after the manifests', async () => {
    await crash('forget-after-journal', ['forget', 'vm@check2']);
    await healthy(['check1', 'check2', 'check3', 'check4', 'check5', 'check6']);

    await crash('forget-after-index', ['forget', 'vm@check3']);
    await healthy(['check1', 'check2', 'check4', 'check5', 'check6']);
    // check3's manifest is still there, but the journal keeps a rebuild from resurrecting it.
    assert.equal(listManifestUids(repo).length, 6);
    assert.deepEqual(await rebuiltNames('a'), ['check1', 'check2', 'check4', 'check5', 'check6']);

    await crash('forget-after-manifests', ['forget', 'vm@check4']);
    await healthy(['check1', 'check2', 'check5', 'check6']);
    // The next writer finishes the journals: check2 (never forgotten) keeps its manifest.
    await bkfsOk(['-r', repo, 'forget', 'vm@check1']);
    assert.equal(listManifestUids(repo).length, 3);
    assert.deepEqual(
      fs.readdirSync(path.join(repo, 'manifests')).filter((n) => !n.endsWith('.json.zst')),
      [],
    );
    assert.deepEqual(await rebuiltNames('b'), ['check2', 'check5', 'check6']);
    await healthy(['check2', 'check5', 'check6']);
  });

  it('gc: after deleting rows, after sealing a new pack, after the index transaction', async () => {
    const want = ['check2', 'check5', 'check6'];
    await crash('gc-after-rows', ['gc', '--max-unused', '0']);
    await healthy(want);
    await crash('gc-after-new-pack', ['gc', '--max-unused', '0']);
    await healthy(want);
    assert.equal(storeState(repo).orphans.length, 1, 'the unindexed new pack');
    await crash('gc-after-index', ['gc', '--max-unused', '0']);
    await healthy(want);
    assert.equal(storeState(repo).orphans.length, 1, 'the unindexed old pack');
    const g = await gcJson(repo);
    assert.ok(g.orphansRemoved >= 1);
    assertStoreExact(repo);
    await healthy(want);
  });

  it('repair: before the swap, and with the old index moved aside', async () => {
    const want = ['check2', 'check5', 'check6'];
    await crash('rebuild-before-swap', ['repair', '--rebuild-index']);
    await healthy(want); // the old index is still in use (the dead process's lock is taken over)
    await crash('rebuild-after-move-aside', ['repair', '--rebuild-index']);
    assert.ok(!fs.existsSync(path.join(repo, 'index.db')));
    await healthy(want); // the next open finishes the swap
    await bkfsOk(['-r', repo, 'repair', '--rebuild-index']);
    await healthy(want);
    assertStoreExact(repo);
  });

  it('backup: after the manifest, before the commit', async () => {
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 50, MiB)} 30M 1M`);
    await crash('backup-after-manifest', ['backup', 'vm', '--disk', `vda=${img}`]);
    await healthy(['check2', 'check5', 'check6']);
    assert.equal(listManifestUids(repo).length, 4, 'the uncommitted checkpoint left its manifest');
    // The next writer removes it, and the backup is simply taken again.
    await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '-c', 'again']);
    await toRaw(img, path.join(dir, 'again.raw'));
    refs.set('again', path.join(dir, 'again.raw'));
    assert.equal(listManifestUids(repo).length, 4);
    await healthy(['check2', 'check5', 'check6', 'again']);
    assert.deepEqual(await rebuiltNames('c'), ['check2', 'check5', 'check6', 'again']);
  });
});

// -------------------------------------------------------------------------------------------------

describe('damaged chunks and verify --source', () => {
  it('verify reports and marks a damaged chunk; the next backup of the same data heals it', async () => {
    const dir = path.join(work, 'damage');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'd.qcow2');
    const repoDir = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await bkfsOk(['-r', repoDir, 'init']);
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 61, 8 * MiB)} 0 8M`);
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full']);
    await toRaw(img, path.join(dir, 'c1.raw'));
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 62, MiB)} 10M 1M`);
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc']);
    await toRaw(img, path.join(dir, 'c2.raw'));

    // Flip bytes inside the stored data of the chunk at disk offset 1 MiB (used by both).
    let hash: string;
    {
      const repo = Repository.open(repoDir);
      try {
        const r = CheckpointReader.open(repo, 'vm@check1');
        const e = [...r.extents('vda')].find((x) => x.offset === MiB)!;
        hash = e.loc!.hash.toString('hex');
        const fd = fs.openSync(packPath(repoDir, e.loc!.pack), 'r+');
        fs.writeSync(fd, Buffer.from('garbage!'), 0, 8, e.loc!.offset + 1000);
        fs.closeSync(fd);
      } finally {
        repo.close();
      }
    }
    const v = await bkfs(['-r', repoDir, 'verify']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stdout + v.stderr);
    assert.match(v.stdout, new RegExp(`damaged chunk ${hash.slice(0, 16)}: chunk hash mismatch`));
    assert.match(v.stdout, /used by vm@check1 vda bytes 1048576-1310719/);
    assert.match(v.stdout, /used by vm@check2 vda bytes 1048576-1310719/);
    assert.deepEqual(
      (await listJson(repoDir, 'vm')).map((x) => x.damaged),
      [true, true],
    );
    assert.match((await bkfsOk(['-r', repoDir, 'list'])).stdout, /vm@check1 .*DAMAGED/);
    // Reads of the damaged range fail; others work.
    {
      const repo = Repository.open(repoDir);
      try {
        const r = CheckpointReader.open(repo, 'vm@check2');
        await assert.rejects(r.readAt('vda', MiB + 5, 10), (e) => isBkfsError(e, 'DATA_DAMAGED'));
        assert.ok(
          (await r.readAt('vda', 0, MiB)).equals(fs.readFileSync(path.join(dir, 'c2.raw')).subarray(0, MiB)),
        );
      } finally {
        repo.close();
      }
    }
    // An inc does not read that range again; a full does and stores the chunk anew.
    const full = await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full']);
    assert.match(full.stdout, /new data +256 KiB in 1 chunks/);
    const rows = await listJson(repoDir, 'vm');
    assert.deepEqual(
      rows.map((x) => x.damaged),
      [false, false, false],
      'the old checkpoints healed',
    );
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'vm@check1', 'vda', path.join(dir, 'c1.raw'), 20);
    await assertCheckpointEquals(repoDir, 'vm@check2', 'vda', path.join(dir, 'c2.raw'), 20);

    // Index loss now: the hash is in two packs, the first copy damaged; the rebuild picks the good one.
    const copy = path.join(dir, 'copy');
    await run('cp', ['-a', repoDir, copy]);
    for (const f of fs.readdirSync(copy)) if (f.startsWith('index.db')) fs.rmSync(path.join(copy, f));
    const rb = JSON.parse((await bkfsOk(['-r', copy, 'repair', '--rebuild-index', '--json'])).stdout) as {
      duplicateChunks: number;
      damagedCheckpoints: string[];
    };
    assert.equal(rb.duplicateChunks, 1);
    assert.deepEqual(rb.damagedCheckpoints, []);
    await bkfsOk(['-r', copy, 'verify']);
    await assertCheckpointEquals(copy, 'vm@check1', 'vda', path.join(dir, 'c1.raw'), 20);
    fs.rmSync(copy, { recursive: true });

    const g = await gcJson(repoDir);
    assert.equal(g.chunksRemoved, 1, 'the damaged copy is now unused');
    assert.equal(g.packsKeptDamaged, 0);
    assertStoreExact(repoDir);
  });

  it('a pack lost with the index: its checkpoints come back DAMAGED, and a full backup heals them', async () => {
    const dir = path.join(work, 'damage');
    const repoDir = path.join(dir, 'repo');
    const img = path.join(dir, 'd.qcow2');
    // The pack of check2's own chunk (1 MiB at 10 MiB) goes missing, and so does the index.
    let lost: string;
    {
      const repo = Repository.open(repoDir);
      try {
        const e = [...CheckpointReader.open(repo, 'vm@check2').extents('vda')].find(
          (x) => x.offset === 10 * MiB,
        )!;
        lost = e.loc!.pack;
      } finally {
        repo.close();
      }
    }
    fs.rmSync(packPath(repoDir, lost));
    for (const f of fs.readdirSync(repoDir)) if (f.startsWith('index.db')) fs.rmSync(path.join(repoDir, f));
    const rb = JSON.parse((await bkfsOk(['-r', repoDir, 'repair', '--rebuild-index', '--json'])).stdout) as {
      missingChunks: number;
      damagedCheckpoints: string[];
    };
    assert.ok(rb.missingChunks >= 4, `missing ${rb.missingChunks}`);
    assert.ok(rb.damagedCheckpoints.includes('vm@check2'), rb.damagedCheckpoints.join());
    assert.match((await bkfsOk(['-r', repoDir, 'list'])).stdout, /vm@check2 .*DAMAGED/);
    const v = await bkfs(['-r', repoDir, 'verify', 'vm@check2']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED);
    assert.match(v.stdout, /its pack is not in the index/);
    // The image still has that data: a full stores it again and every checkpoint heals.
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full']);
    assert.deepEqual(
      (await listJson(repoDir, 'vm')).map((x) => x.damaged),
      (await listJson(repoDir, 'vm')).map(() => false),
    );
    await bkfsOk(['-r', repoDir, 'verify']);
    await assertCheckpointEquals(repoDir, 'vm@check2', 'vda', path.join(dir, 'c2.raw'), 20);
    await gcJson(repoDir);
    assertStoreExact(repoDir);
  });

  it('verify --source compares the latest checkpoint with its image and reports differing ranges', async () => {
    const dir = path.join(work, 'source');
    fs.mkdirSync(dir);
    const img = path.join(dir, 'd.qcow2');
    const repoDir = path.join(dir, 'repo');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await bkfsOk(['-r', repoDir, 'init']);
    await qemuIo(img, 'qcow2', `write -s ${dataFile(dir, 71, 4 * MiB)} 0 4M`);
    await bkfsOk(['-r', repoDir, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full']);
    const same = await bkfsOk(['-r', repoDir, 'verify', 'vm', '--source']);
    assert.match(same.stdout, /source vm@check1 vda .*: identical \(32\.0 MiB\)/);

    await qemuIo(img, 'qcow2', 'write -P 0x55 20070001 5000', 'write -P 0x66 30M 1M');
    const r = await bkfs(['-r', repoDir, 'verify', 'vm@check1', '--source', '--json']);
    assert.equal(r.code, EXIT_CODES.VERIFY_FAILED, r.stderr);
    const rep = JSON.parse(r.stdout) as {
      sources: { status: string; ranges: unknown[]; bytesDiffering: number }[];
    };
    assert.equal(rep.sources[0]!.status, 'differs');
    assert.deepEqual(rep.sources[0]!.ranges, [
      { offset: 20070001, length: 5000 },
      { offset: 30 * MiB, length: MiB },
    ]);
    assert.equal(rep.sources[0]!.bytesDiffering, MiB + 5000);
    const text = await bkfs(['-r', repoDir, 'verify', 'vm', '--source']);
    assert.equal(text.code, EXIT_CODES.VERIFY_FAILED);
    assert.match(text.stdout, /DIFFERS in 2 range\(s\)/);
    assert.match(text.stdout, /bytes 20070001-20075000/);

    fs.renameSync(img, `${img}.moved`);
    // Asked to compare with a source that is gone: a distinct failure, not a success (issue 17.4).
    const gone = await bkfs(['-r', repoDir, 'verify', 'vm', '--source']);
    assert.equal(gone.code, EXIT_CODES.SOURCE_GONE, gone.stderr);
    assert.match(gone.stdout, /GONE, the source image no longer exists/);
  });
});
