/**
 * `bkfs copy` (issue 13 §3): checkpoints copied A -> B -> C between local repositories with real
 * qemu-img/qemu-io images, real bkfs processes, SQLite and pack files. Every checkpoint is compared
 * byte for byte with the image as it was backed up (the qemu-img raw conversion taken right after
 * each backup) in every repository it reaches; kill -9 mid-copy and resume; a copy beside a
 * backup of the source and beside a forget + gc of the source; only missing chunks are sent.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import Database from 'better-sqlite3';
import { bkfs, bkfsOk, qemuIo, BKFS } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { randomBuffer, toRaw } from '../helpers/images';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

let work: string;
before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-copy-test-'));
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

interface ListedCp {
  name: string;
  level: string;
  parent: string | null;
  time: string;
  protected: boolean;
  damaged: boolean;
  disks: { name: string; virtualSize: number; bitmap: string | null; source: string | null }[];
}

async function list(repo: string, vm: string): Promise<ListedCp[]> {
  const r = await bkfs(['-r', repo, 'list', vm, '--json']);
  if (r.code === EXIT_CODES.NOT_FOUND) return [];
  if (r.code !== 0) throw new Error(`list: ${r.stderr}`);
  return JSON.parse(r.stdout) as ListedCp[];
}

interface CopyJson {
  mode: string;
  copied: {
    vm: string;
    name: string;
    level: string;
    chunks: number;
    chunksTransferred: number;
    chunksPresent: number;
  }[];
  skipped: { vm: string; name: string }[];
  chunksTransferred: number;
  chunksPresent: number;
  bytesTransferred: number;
}

async function copy(repo: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<CopyJson> {
  const r = await bkfsOk(['-r', repo, 'copy', ...args, '--json'], env);
  return JSON.parse(r.stdout) as CopyJson;
}

/** Read-only look into an index (counting chunks and pages), closed at once. */
function query<T>(repo: string, sql: string): T {
  const db = new Database(path.join(repo, 'index.db'), { readonly: true });
  try {
    return db.prepare(sql).get() as T;
  } finally {
    db.close();
  }
}

function configsOf(repo: string, vm: string, cp: string): Record<string, string> {
  const db = new Database(path.join(repo, 'index.db'), { readonly: true });
  try {
    const rows = db
      .prepare(
        `SELECT f.name AS name, f.data AS data FROM configs f JOIN checkpoints c ON c.id = f.checkpoint_id
           JOIN vms v ON v.id = c.vm_id WHERE v.name = ? AND c.name = ? ORDER BY f.name`,
      )
      .all(vm, cp) as { name: string; data: Buffer }[];
    return Object.fromEntries(rows.map((r) => [r.name, r.data.toString('utf8')]));
  } finally {
    db.close();
  }
}

async function verifyClean(repo: string): Promise<void> {
  const v = await bkfs(['-r', repo, 'verify']);
  assert.equal(v.code, 0, `verify ${repo}: ${v.stdout}${v.stderr}`);
}

/** Spawn bkfs without waiting (for pause points); resolves with its exit code or signal. */
function start(
  args: string[],
  env: NodeJS.ProcessEnv,
): { done: Promise<{ code: number | null; signal: string | null; out: string }> } {
  const child = spawn(process.execPath, [BKFS, ...args], {
    env: { ...process.env, CI: 'true', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let outText = '';
  child.stdout.on('data', (d: Buffer) => (outText += d.toString()));
  child.stderr.on('data', (d: Buffer) => (outText += d.toString()));
  return {
    done: new Promise((resolve) =>
      child.on('close', (code, signal) => resolve({ code, signal, out: outText })),
    ),
  };
}

async function waitFor(file: string): Promise<void> {
  for (let i = 0; i < 600 && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 100));
  assert.ok(fs.existsSync(file), `${file} did not appear`);
}

describe('bkfs copy between local repositories', () => {
  it('A -> B -> C: full, inc, diff and inc with zeroed ranges, byte-identical at every hop, with flags and configs', async () => {
    const img = path.join(work, 'web.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    const A = path.join(work, 'A');
    const B = path.join(work, 'B');
    const C = path.join(work, 'C');
    for (const r of [A, B, C]) await bkfsOk(['-r', r, 'init']);
    const xml = path.join(work, 'domain.xml');
    fs.writeFileSync(xml, '<domain><name>web</name><secret>s3cr3t</secret></domain>\n');
    const raws = new Map<string, string>();
    const backup = async (level: string, writes: string[]): Promise<void> => {
      if (writes.length > 0) await qemuIo(img, 'qcow2', ...writes);
      await bkfsOk([
        '-r',
        A,
        'backup',
        'web',
        '-d',
        `vda=${img}`,
        '--level',
        level,
        '--config',
        `domain.xml=${xml}`,
      ]);
      const cps = await list(A, 'web');
      const raw = path.join(work, `web-${cps.length}.raw`);
      await toRaw(img, raw);
      raws.set(cps[cps.length - 1]!.name, raw);
    };
    await backup('full', ['write -P 0x11 0 8M', 'write -P 0x12 20M 4M', 'write -P 0x13 40M 1M']);
    await backup('inc', ['write -P 0x21 1M 512k', 'write -P 0x22 33M 256k']);
    await backup('diff', ['write -P 0x31 6M 2M']);
    await backup('inc', ['write -z 0 2M', 'write -P 0x41 50M 3M']);
    await bkfsOk(['-r', A, 'protect', 'web@check2']);

    // One checkpoint: its missing parents (check1; check2 is the base its map overlays) come first.
    const first = await copy(A, ['web@check3', '--to', B]);
    assert.equal(first.mode, 'stored');
    assert.deepEqual(
      first.copied.map((c) => c.name),
      ['check1', 'check2', 'check3'],
    );
    assert.equal(first.copied[0]!.chunksPresent, 0);
    // The rest of the VM: only check4 is new, and only its new chunks travel.
    const rest = await copy(A, ['web', '--to', B]);
    assert.deepEqual(
      rest.copied.map((c) => c.name),
      ['check4'],
    );
    assert.deepEqual(
      rest.skipped.map((c) => c.name),
      ['check1', 'check2', 'check3'],
    );
    assert.ok(rest.copied[0]!.chunksPresent > 0, 'check4 shares chunks with what B has');
    assert.equal(rest.chunksTransferred, 1, 'check4 wrote 3 MiB of one new pattern: one distinct chunk');
    // B -> C through the recompress path (decode, hash, compress in the destination's pool).
    const hop = await copy(C, ['web', '--from', B, '--recompress']);
    assert.equal(hop.mode, 'recompress');
    assert.equal(hop.copied.length, 4);

    const listA = await list(A, 'web');
    for (const repo of [B, C]) {
      const l = await list(repo, 'web');
      assert.deepEqual(
        l.map((c) => [c.name, c.level, c.parent, c.time, c.protected, c.damaged]),
        listA.map((c) => [c.name, c.level, c.parent, c.time, c.protected, c.damaged]),
        `catalogue of ${repo}`,
      );
      assert.deepEqual(
        l.map((c) => c.disks),
        listA.map((c) => c.disks),
        `disk rows (source, bitmap) of ${repo}`,
      );
      for (const cp of l) {
        assert.deepEqual(
          configsOf(repo, 'web', cp.name),
          configsOf(A, 'web', cp.name),
          `configs of ${cp.name}`,
        );
      }
      await verifyClean(repo);
    }
    assert.equal(listA.find((c) => c.name === 'check2')!.protected, true);
    for (const repo of [A, B, C]) {
      for (const [name, raw] of raws) await assertCheckpointEquals(repo, `web@${name}`, 'vda', raw, 20);
    }
    // The block maps share pages as the source's do (copy-on-write), not one full map per copy.
    const pagesA = query<{ n: number }>(A, 'SELECT count(DISTINCT page_id) AS n FROM disk_pages').n;
    assert.equal(query<{ n: number }>(B, 'SELECT count(DISTINCT page_id) AS n FROM disk_pages').n, pagesA);
    assert.equal(query<{ n: number }>(C, 'SELECT count(DISTINCT page_id) AS n FROM disk_pages').n, pagesA);
    // The copies' manifests rebuild the same index.
    await bkfsOk(['-r', C, 'repair', '--rebuild-index']);
    for (const [name, raw] of raws) await assertCheckpointEquals(C, `web@${name}`, 'vda', raw, 5);

    // Again: nothing to do, nothing sent.
    const again = await copy(A, ['web', '--to', B]);
    assert.equal(again.copied.length, 0);
    assert.equal(again.chunksTransferred, 0);

    // A repository with another web@check1: refused, nothing written there.
    const D = path.join(work, 'D');
    await bkfsOk(['-r', D, 'init']);
    const other = path.join(work, 'other.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', other, '16M']);
    await qemuIo(other, 'qcow2', 'write -P 0x77 0 1M');
    await bkfsOk(['-r', D, 'backup', 'web', '-d', `vda=${other}`]);
    const before = fs.readdirSync(path.join(D, 'packs'), { recursive: true }).length;
    const clash = await bkfs(['-r', A, 'copy', 'web', '--to', D]);
    assert.equal(clash.code, EXIT_CODES.TARGET_EXISTS, clash.stderr);
    assert.match(clash.stderr, /already has a different checkpoint named web@check1/);
    assert.equal((await list(D, 'web')).length, 1);
    assert.equal(fs.readdirSync(path.join(D, 'packs'), { recursive: true }).length, before);

    const usage = await bkfs(['-r', A, 'copy', 'web']);
    assert.equal(usage.code, EXIT_CODES.USAGE);
    const same = await bkfs(['-r', A, 'copy', 'web', '--to', A]);
    assert.equal(same.code, EXIT_CODES.USAGE);
    const missing = await bkfs(['-r', A, 'copy', 'nosuchvm', '--to', B]);
    assert.equal(missing.code, EXIT_CODES.NOT_FOUND);
  });

  it('kill -9 mid-copy: nothing visible; the second run sends only the rest', async () => {
    const img = path.join(work, 'big.raw');
    fs.writeFileSync(img, Buffer.concat([randomBuffer(7, 12 << 20), Buffer.alloc(4 << 20)]));
    const A = path.join(work, 'kA');
    const B = path.join(work, 'kB');
    await bkfsOk(['-r', A, 'init']);
    await bkfsOk(['-r', B, 'init']);
    await bkfsOk(['-r', A, 'backup', 'big', '-d', `vda=raw:${img}`]);
    const total = query<{ n: number }>(A, 'SELECT count(*) AS n FROM chunks').n;
    assert.equal(total, 48);
    // 1 MiB packs: the copy commits a batch of chunks every 4 chunks; killed after the first one.
    const small = { BKFS_TEST_PACK_BYTES: String(1 << 20) };
    const killed = await bkfs(['-r', A, 'copy', 'big', '--to', B], {
      ...small,
      BKFS_TEST_CRASH_AT: 'copy-after-pack',
    });
    assert.notEqual(killed.code, 0);
    assert.deepEqual(await list(B, 'big'), []);
    const kept = query<{ n: number }>(B, 'SELECT count(*) AS n FROM chunks').n;
    assert.ok(kept > 0 && kept < total, `${kept} chunks committed before the kill`);
    // Killed after the manifest, before the commit: still nothing visible, every chunk there.
    const killed2 = await bkfs(['-r', A, 'copy', 'big', '--to', B], {
      BKFS_TEST_CRASH_AT: 'copy-after-manifest',
    });
    assert.notEqual(killed2.code, 0);
    assert.deepEqual(await list(B, 'big'), []);
    const r2 = await copy(A, ['big', '--to', B], small);
    assert.equal(r2.chunksTransferred, 0, 'every chunk was committed by the runs before');
    assert.equal(r2.chunksPresent, total);
    await assertCheckpointEquals(B, 'big@check1', 'vda', img, 10);
    await verifyClean(B);

    // Once more from the first crash point, into a fresh repository: the resumed run sends exactly
    // the chunks the killed run did not commit.
    const B2 = path.join(work, 'kB2');
    await bkfsOk(['-r', B2, 'init']);
    const k3 = await bkfs(['-r', A, 'copy', 'big', '--to', B2], {
      ...small,
      BKFS_TEST_CRASH_AT: 'copy-after-pack',
    });
    assert.notEqual(k3.code, 0);
    const kept3 = query<{ n: number }>(B2, 'SELECT count(*) AS n FROM chunks').n;
    const r3 = await copy(A, ['big', '--to', B2], small);
    assert.equal(r3.chunksPresent, kept3);
    assert.equal(r3.chunksTransferred, total - kept3);
    assert.equal(query<{ n: number }>(B2, 'SELECT count(*) AS n FROM chunks').n, total);
    await assertCheckpointEquals(B2, 'big@check1', 'vda', img, 10);
    await verifyClean(B2);
  });

  it('a copy beside a backup writing the source, and beside a forget + gc of the source', async () => {
    const img = path.join(work, 'db.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await qemuIo(img, 'qcow2', 'write -P 0x51 0 4M');
    const A = path.join(work, 'cA');
    const B = path.join(work, 'cB');
    await bkfsOk(['-r', A, 'init']);
    await bkfsOk(['-r', B, 'init']);
    await bkfsOk(['-r', A, 'backup', 'db', '-d', `vda=${img}`]);
    const raw1 = path.join(work, 'db1.raw');
    await toRaw(img, raw1);
    await qemuIo(img, 'qcow2', 'write -P 0x52 8M 2M');
    const raw2 = path.join(work, 'db2.raw');
    await toRaw(img, raw2);

    // A backup of the source paused after its manifest (its checkpoint is written, not committed).
    const pause = path.join(work, 'backup-pause');
    const b = start(['-r', A, 'backup', 'db', '-d', `vda=${img}`], {
      BKFS_TEST_PAUSE_AT: 'backup-after-manifest',
      BKFS_TEST_PAUSE_FILE: pause,
    });
    await waitFor(`${pause}.paused`);
    const during = await copy(A, ['db', '--to', B]);
    assert.deepEqual(
      during.copied.map((c) => c.name),
      ['check1'],
      'only complete checkpoints are copied',
    );
    fs.writeFileSync(`${pause}.resume`, '');
    const br = await b.done;
    assert.equal(br.code, 0, br.out);
    const after = await copy(A, ['db', '--to', B]);
    assert.deepEqual(
      after.copied.map((c) => c.name),
      ['check2'],
    );
    await assertCheckpointEquals(B, 'db@check1', 'vda', raw1, 10);
    await assertCheckpointEquals(B, 'db@check2', 'vda', raw2, 10);

    // A copy paused after its first committed batch while the source forgets and gc's what it
    // copies: the pin keeps the rows and chunks until the copy is done.
    const C = path.join(work, 'cC');
    await bkfsOk(['-r', C, 'init']);
    const cpause = path.join(work, 'copy-pause');
    const c = start(['-r', A, 'copy', 'db@check2', '--to', C], {
      BKFS_TEST_PACK_BYTES: String(1 << 20),
      BKFS_TEST_PAUSE_AT: 'copy-after-pack',
      BKFS_TEST_PAUSE_FILE: cpause,
    });
    await waitFor(`${cpause}.paused`);
    await bkfsOk(['-r', A, 'forget', 'db@check1', 'db@check2']);
    const gc = await bkfsOk(['-r', A, 'gc', '--max-unused', '0']);
    assert.match(gc.stdout, /still in use by readers|wait for readers/);
    fs.writeFileSync(`${cpause}.resume`, '');
    const cr = await c.done;
    assert.equal(cr.code, 0, cr.out);
    await assertCheckpointEquals(C, 'db@check1', 'vda', raw1, 10);
    await assertCheckpointEquals(C, 'db@check2', 'vda', raw2, 10);
    await verifyClean(C);
    // Released: the next gc of the source removes them.
    await bkfsOk(['-r', A, 'gc']);
    assert.equal(query<{ n: number }>(A, 'SELECT count(*) AS n FROM checkpoints').n, 0);
  });

  it('into a repository that already holds shared data: only the difference is sent', async () => {
    // Random data: every chunk distinct (a repeated pattern would dedup into one chunk).
    const img = path.join(work, 'base.raw');
    const data = Buffer.concat([randomBuffer(21, 8 << 20), Buffer.alloc(8 << 20)]);
    fs.writeFileSync(img, data);
    const clone = path.join(work, 'clone.raw');
    randomBuffer(22, 512 << 10).copy(data, 1 << 20);
    fs.writeFileSync(clone, data);
    const A = path.join(work, 'sA');
    const B = path.join(work, 'sB');
    await bkfsOk(['-r', A, 'init']);
    await bkfsOk(['-r', B, 'init']);
    await bkfsOk(['-r', A, 'backup', 'base', '-d', `vda=raw:${img}`]);
    await bkfsOk(['-r', A, 'backup', 'clone', '-d', `vda=raw:${clone}`]);
    // B got the base VM by a backup of its own (same data, other ids and packs).
    await bkfsOk(['-r', B, 'backup', 'base', '-d', `vda=raw:${img}`]);
    const r = await copy(A, ['clone', '--to', B]);
    assert.equal(r.copied.length, 1);
    assert.equal(r.chunksTransferred, 2, 'the clone differs from base in 512 KiB: two chunks');
    assert.equal(r.chunksPresent, r.copied[0]!.chunks - 2);
    await assertCheckpointEquals(B, 'clone@check1', 'vda', clone, 10);
    // base@check1 exists in B already with the same content: skipped, nothing sent.
    const b2 = await copy(A, ['base', '--to', B]);
    assert.equal(b2.copied.length, 0);
    assert.deepEqual(
      b2.skipped.map((s) => s.name),
      ['check1'],
    );
  });

  it('other chunk sizes: a larger destination grid works, a smaller one is refused; a damaged source chunk is never passed on', async () => {
    const img = path.join(work, 'grid.raw');
    fs.writeFileSync(
      img,
      Buffer.concat([randomBuffer(31, 20 << 20), Buffer.alloc(12 << 20), randomBuffer(32, 3 << 20)]),
    );
    const A = path.join(work, 'gA');
    const big = path.join(work, 'gBig');
    const small = path.join(work, 'gSmall');
    await bkfsOk(['-r', A, 'init']);
    await bkfsOk(['-r', big, 'init', '--chunk-size', String(1 << 20)]); // 64 MiB pages: source pages merge
    await bkfsOk(['-r', small, 'init', '--chunk-size', String(64 << 10)]);
    await bkfsOk(['-r', A, 'backup', 'grid', '-d', `vda=raw:${img}`]);
    await copy(A, ['grid', '--to', big]);
    await assertCheckpointEquals(big, 'grid@check1', 'vda', img, 20);
    await verifyClean(big);
    const refused = await bkfs(['-r', A, 'copy', 'grid', '--to', small]);
    assert.equal(refused.code, EXIT_CODES.TARGET_INVALID, refused.stderr);
    assert.match(refused.stderr, /chunk size/);
    assert.deepEqual(await list(small, 'grid'), []);

    // One flipped byte in a source pack: the copy fails (exit 15) and leaves nothing visible.
    const packs = fs
      .readdirSync(path.join(A, 'packs'), { recursive: true, withFileTypes: true })
      .filter((e) => e.isFile() && e.name.endsWith('.pack'))
      .map((e) => path.join(e.parentPath, e.name));
    assert.equal(packs.length, 1);
    const fd = fs.openSync(packs[0]!, 'r+');
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, 16 + 48 + 1000);
    b[0] = b[0]! ^ 0xff;
    fs.writeSync(fd, b, 0, 1, 16 + 48 + 1000);
    fs.closeSync(fd);
    const D = path.join(work, 'gD');
    await bkfsOk(['-r', D, 'init']);
    const bad = await bkfs(['-r', A, 'copy', 'grid', '--to', D]);
    assert.equal(bad.code, EXIT_CODES.DATA_DAMAGED, bad.stderr);
    assert.match(bad.stderr, /of the source .* is damaged/);
    assert.deepEqual(await list(D, 'grid'), []);
  });
});
