/**
 * Repositories on S3-compatible object storage (issue 13 §1), end to end through the real `bkfs`
 * executable against a real Ceph RADOS Gateway (test/helpers/rgw.ts, started once for the file):
 * init, full + inc backup of a qemu-img image, restore and mount byte-identical to the source,
 * verify, forget + gc deleting objects, an index rebuilt from the bucket alone on a fresh cache
 * directory, bad credentials / missing bucket / unreachable endpoint, a flipped byte in a pack
 * object, and a backup killed (SIGKILL) between a pack's upload and its index commit.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import Database from 'better-sqlite3';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { startRgw, type Rgw } from '../helpers/rgw';

const MiB = 1024 * 1024;
let work: string;
let rgw: Rgw;
let s3: S3Client;

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-s3repo-'));
  rgw = await startRgw();
  s3 = new S3Client({
    endpoint: rgw.endpoint,
    forcePathStyle: true,
    region: 'us-east-1',
    credentials: { accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey },
  });
});

after(async () => {
  s3?.destroy();
  await rgw?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

async function keys(bucket: string, prefix = ''): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  let token: string | undefined;
  do {
    const r = await s3.send(
      new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }),
    );
    for (const o of r.Contents ?? []) out.set(o.Key!, o.Size ?? 0);
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return out;
}

function dataFile(name: string, bytes: number): string {
  const f = path.join(work, name);
  fs.writeFileSync(f, randomBytes(bytes));
  return f;
}

async function toRaw(img: string, out: string): Promise<Buffer> {
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out]);
  return fs.readFileSync(out);
}

/** A bkfs invocation on `url` with the RGW's credentials and its own cache directory. */
function client(url: string, cacheDir: string) {
  const env = { ...rgw.env, NODE_NO_WARNINGS: '1', BKFS_CACHE_DIR: cacheDir };
  return {
    ok: (args: string[], extra: NodeJS.ProcessEnv = {}) => bkfsOk(['-r', url, ...args], { ...env, ...extra }),
    run: (args: string[], extra: NodeJS.ProcessEnv = {}) => bkfs(['-r', url, ...args], { ...env, ...extra }),
  };
}

function oneLine(stderr: string, code: keyof typeof EXIT_CODES): void {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line: ${stderr}`);
  assert.match(lines[0]!, /^bkfs: /);
  void code;
}

describe('repository on S3 (Ceph RGW)', () => {
  let bucket: string;
  let url: string;
  let cacheA: string;
  let img: string;
  let ref1: Buffer;
  let ref2: Buffer;

  before(async () => {
    bucket = await rgw.bucket(`bkfs-s3repo-${randomBytes(4).toString('hex')}`);
    url = `s3://${bucket}/site1`;
    cacheA = path.join(work, 'cacheA');
    img = path.join(work, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
  });

  it('init creates bkfs-repo.json in the bucket and a 0700 cache directory named by the id', async () => {
    const r = await client(url, cacheA).ok(['init', '--json']);
    const j = JSON.parse(r.stdout) as { id: string; cacheDir: string };
    assert.equal(j.cacheDir, path.join(cacheA, j.id));
    assert.equal(fs.statSync(j.cacheDir).mode & 0o777, 0o700);
    const k = await keys(bucket, 'site1/');
    assert.deepEqual([...k.keys()], ['site1/bkfs-repo.json']);
    const again = await client(url, cacheA).run(['init']);
    assert.equal(again.code, EXIT_CODES.REPO_EXISTS, again.stderr);
  });

  it('full + inc backups put packs and manifests in the bucket; restore is byte-identical', async () => {
    const c = client(url, cacheA);
    await qemuIo(img, 'qcow2', `write -s ${dataFile('d1', 24 * MiB)} 0 24M`);
    await c.ok(['backup', 'vm', '--disk', `vda=${img}`, '-l', 'full', '-c', 'one']);
    ref1 = await toRaw(img, path.join(work, 'ref1.raw'));
    // Overwrites part of what vm@one holds: forgetting vm@one later makes those chunks dead.
    await qemuIo(img, 'qcow2', `write -s ${dataFile('d2', 6 * MiB)} 0 6M`);
    await c.ok(['backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'two']);
    ref2 = await toRaw(img, path.join(work, 'ref2.raw'));
    const k = await keys(bucket, 'site1/');
    const packs = [...k.keys()].filter((x) => /^site1\/packs\/[0-9a-f]{2}\/[0-9a-f]{32}\.pack$/.test(x));
    const manifests = [...k.keys()].filter((x) => /^site1\/manifests\/[0-9a-f]{32}\.json\.zst$/.test(x));
    assert.ok(packs.length >= 2, `packs in the bucket: ${[...k.keys()].join(' ')}`);
    assert.equal(manifests.length, 2);
    assert.ok(k.has('site1/lease.json'), 'the writer lease');
    // Nothing of the packs stays in the cache directory's tmp/ or packs/.
    const id = fs.readdirSync(cacheA).find((n) => /^[0-9a-f]{16}$/.test(n))!;
    const leftovers = (
      await run('find', [path.join(cacheA, id, 'tmp'), path.join(cacheA, id, 'packs'), '-type', 'f'])
    ).stdout.trim();
    assert.equal(leftovers, '');
    for (const [cp, ref] of [
      ['one', ref1],
      ['two', ref2],
    ] as const) {
      const out = path.join(work, `restore-${cp}.raw`);
      await c.ok(['restore', `vm@${cp}`, '--disk', 'vda', '--to', out]);
      assert.ok(fs.readFileSync(out).equals(ref), `vm@${cp} restored byte for byte`);
    }
    const v = await c.ok(['verify']);
    assert.match(v.stdout, /no damage found/);
  });

  it('a mount reads the checkpoint byte-identical (ranged GETs through the chunk cache)', async () => {
    const c = client(url, path.join(work, 'cacheMount'));
    // A second cache directory for the same bucket: rebuilt from the bucket first.
    await c.ok(['repair', '--rebuild-index']);
    const mp = path.join(work, 'mnt');
    fs.mkdirSync(mp);
    await c.ok(['mount', 'vm@two', mp]);
    try {
      const got = fs.readFileSync(path.join(mp, 'vda.raw'));
      assert.ok(got.equals(ref2), 'the mounted disk equals the source');
    } finally {
      const u = await c.run(['umount', mp]);
      if (u.code !== 0) await run('fusermount', ['-u', '-z', mp], { allowFail: true });
    }
  });

  it('an index rebuilt from the bucket alone on a fresh cache directory has identical checkpoints', async () => {
    const fresh = client(url, path.join(work, 'cacheFresh'));
    const before = await fresh.run(['list']);
    assert.equal(before.code, EXIT_CODES.REPO_NOT_FOUND, 'a fresh cache has no index yet');
    const rb = JSON.parse((await fresh.ok(['repair', '--rebuild-index', '--json'])).stdout) as {
      checkpoints: number;
      problems: string[];
      remoteReads: { tailReads: number; wholeReads: number };
    };
    assert.equal(rb.checkpoints, 2);
    assert.deepEqual(rb.problems, []);
    assert.equal(rb.remoteReads.wholeReads, 0, 'packs read by their trailers, not whole');
    const a = JSON.parse((await client(url, cacheA).ok(['list', '--json'])).stdout) as unknown[];
    const b = JSON.parse((await fresh.ok(['list', '--json'])).stdout) as unknown[];
    assert.deepEqual(b, a);
    const out = path.join(work, 'fresh-two.raw');
    await fresh.ok(['restore', 'vm@two', '--disk', 'vda', '--to', out]);
    assert.ok(fs.readFileSync(out).equals(ref2));
  });

  it('a backup killed after uploading a pack, before its index commit, loses nothing committed', async () => {
    const c = client(url, cacheA);
    await qemuIo(img, 'qcow2', `write -s ${dataFile('d3', 4 * MiB)} 50M 4M`);
    const r = await c.run(['backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'three'], {
      BKFS_TEST_CRASH_AT: 'pack-after-upload',
    });
    assert.notEqual(r.code, 0, 'killed');
    const l = JSON.parse((await c.ok(['list', '--json'])).stdout) as { name: string }[];
    assert.deepEqual(
      l.map((x) => x.name),
      ['one', 'two'],
    );
    const out = path.join(work, 'after-kill.raw');
    await c.ok(['restore', 'vm@two', '--disk', 'vda', '--to', out]);
    assert.ok(fs.readFileSync(out).equals(ref2));
    await c.ok(['backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'three']);
    // gc (no other writer, no reader) removes the orphan pack object the killed backup uploaded.
    const g = JSON.parse((await c.ok(['gc', '--json'])).stdout) as { orphansRemoved: number };
    assert.equal(g.orphansRemoved, 1);
  });

  it('forget + gc delete pack objects and manifests from the bucket', async () => {
    const c = client(url, cacheA);
    const before = await keys(bucket, 'site1/');
    await c.ok(['forget', 'vm@one', 'vm@two']);
    const g = JSON.parse((await c.ok(['gc', '--max-unused', '0', '--json'])).stdout) as {
      chunksRemoved: number;
      packsRewritten: number;
    };
    assert.equal(g.chunksRemoved, 24, 'the 6 MiB of vm@one that vm@two overwrote');
    assert.ok(g.packsRewritten >= 1);
    const afterKeys = await keys(bucket, 'site1/');
    const manifests = [...afterKeys.keys()].filter((x) => x.includes('/manifests/'));
    assert.equal(manifests.length, 1, 'only vm@three keeps its manifest');
    const bytes = (m: Map<string, number>) =>
      [...m].filter(([k]) => k.includes('/packs/')).reduce((a, [, s]) => a + s, 0);
    assert.ok(bytes(afterKeys) < bytes(before), `pack bytes ${bytes(before)} -> ${bytes(afterKeys)}`);
    const out = path.join(work, 'three.raw');
    await c.ok(['restore', 'vm@three', '--disk', 'vda', '--to', out]);
    assert.ok(fs.readFileSync(out).equals(await toRaw(img, path.join(work, 'ref3.raw'))));
    assert.match((await c.ok(['verify'])).stdout, /no damage found/);
    // The packs' trailers are not unused bytes: a second gc, with nothing forgotten, rewrites nothing.
    const again = JSON.parse((await c.ok(['gc', '--max-unused', '0', '--json'])).stdout) as {
      packsRewritten: number;
      packsKeptUnused: number;
    };
    assert.deepEqual([again.packsRewritten, again.packsKeptUnused], [0, 0]);
    const st = JSON.parse((await c.ok(['stats', '--json'])).stdout) as {
      repository: { reclaimableBytes: number };
    };
    assert.equal(st.repository.reclaimableBytes, 0);
  });

  it('a flipped byte in a pack object reads as DATA_DAMAGED, never as other bytes', async () => {
    const c = client(url, path.join(work, 'cacheFlip'));
    await c.ok(['repair', '--rebuild-index']);
    const id = fs.readdirSync(path.join(work, 'cacheFlip'))[0]!;
    const db = new Database(path.join(work, 'cacheFlip', id, 'index.db'), { readonly: true });
    const loc = db
      .prepare(
        'SELECT p.name AS pack, c.offset AS offset FROM extents e JOIN chunks c ON c.id = e.chunk_id JOIN packs p ON p.id = c.pack_id LIMIT 1',
      )
      .get() as { pack: string; offset: number };
    db.close();
    const packKey = `site1/packs/${loc.pack.slice(0, 2)}/${loc.pack}.pack`;
    const obj = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: packKey }));
    const body = Buffer.from(await obj.Body!.transformToByteArray());
    // Inside the stored bytes of a chunk vm@three uses, past a frame table (random data: raw frames).
    body[loc.offset + 1000]! ^= 0x01;
    await s3.send(new PutObjectCommand({ Bucket: bucket, Key: packKey, Body: body }));
    const out = path.join(work, 'flip.raw');
    const r = await c.run(['restore', 'vm@three', '--disk', 'vda', '--to', out]);
    assert.equal(r.code, EXIT_CODES.DATA_DAMAGED, r.stderr);
    const v = await c.run(['verify']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stdout + v.stderr);
    assert.match(v.stdout, /damaged chunk [0-9a-f]+: chunk (hash mismatch|frame)/);
  });

  it('bad credentials, a missing bucket, an unreachable endpoint: one line, its exit code, bucket unchanged', async () => {
    const before = await keys(bucket);
    const cache = path.join(work, 'cacheErr');
    const bad = await client(url, cache).run(['list'], { AWS_SECRET_ACCESS_KEY: 'wrong'.padEnd(40, 'x') });
    assert.equal(bad.code, EXIT_CODES.STORE_ACCESS, bad.stderr);
    oneLine(bad.stderr, 'STORE_ACCESS');
    const badInit = await client(`s3://${bucket}/other`, cache).run(['init'], {
      AWS_ACCESS_KEY_ID: 'NOSUCHKEY0000000000',
    });
    assert.equal(badInit.code, EXIT_CODES.STORE_ACCESS, badInit.stderr);
    const missing = await client(`s3://no-such-bucket-${randomBytes(3).toString('hex')}/x`, cache).run([
      'init',
    ]);
    assert.equal(missing.code, EXIT_CODES.REPO_NOT_FOUND, missing.stderr);
    oneLine(missing.stderr, 'REPO_NOT_FOUND');
    const port = await new Promise<number>((resolve) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => resolve(p));
      });
    });
    const t0 = Date.now();
    const down = await client(url, cache).run(['list'], { AWS_ENDPOINT_URL: `http://127.0.0.1:${port}` });
    assert.equal(down.code, EXIT_CODES.STORE_UNAVAILABLE, down.stderr);
    oneLine(down.stderr, 'STORE_UNAVAILABLE');
    assert.ok(Date.now() - t0 < 60_000, 'fails in bounded time');
    assert.deepEqual(await keys(bucket), before, 'the bucket is as it was');
    assert.ok(!fs.existsSync(cache) || fs.readdirSync(cache).length === 0, 'no cache directory made');
  });

  it('a second machine (another cache directory) cannot write while the lease is fresh; can once stale', async () => {
    const a = client(url, cacheA);
    const other = client(url, path.join(work, 'cacheMount'));
    // Machine A writes (a lease that stays fresh for 10 minutes), then machine B tries.
    await qemuIo(img, 'qcow2', `write -s ${dataFile('d4', 2 * MiB)} 56M 2M`);
    await a.ok(['backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'four'], {
      BKFS_LEASE_TTL_MS: '600000',
    });
    await qemuIo(img, 'qcow2', `write -s ${dataFile('d5', 2 * MiB)} 58M 2M`);
    const before = await keys(bucket);
    const r = await other.run(['backup', 'vm2', '--disk', `vda=${img}`, '-l', 'full', '-c', 'b1']);
    assert.equal(r.code, EXIT_CODES.REPO_LOCKED, r.stderr);
    assert.match(r.stderr, /lease/);
    const afterKeys = await keys(bucket);
    afterKeys.delete(`site1/lease.json`);
    before.delete(`site1/lease.json`);
    assert.deepEqual(afterKeys, before, 'nothing of B in the bucket');
    // A's lease, 2 s long this time, goes stale: B takes it over.
    await a.ok(['protect', 'vm@four'], { BKFS_LEASE_TTL_MS: '2000' });
    await new Promise((res) => setTimeout(res, 3000));
    await other.ok(['backup', 'vm2', '--disk', `vda=${img}`, '-l', 'full', '-c', 'b1']);
    const lease = JSON.parse(
      Buffer.from(
        await (
          await s3.send(new GetObjectCommand({ Bucket: bucket, Key: 'site1/lease.json' }))
        ).Body!.transformToByteArray(),
      ).toString('utf8'),
    ) as { owner: string };
    assert.equal(
      lease.owner,
      fs
        .readFileSync(
          path.join(work, 'cacheMount', fs.readdirSync(path.join(work, 'cacheMount'))[0]!, 'owner-id'),
          'utf8',
        )
        .trim(),
    );
  });
});

describe('bkfs copy through a bucket (issue 13 §3)', () => {
  it('local -> s3 -> a new local repository: every checkpoint byte-identical at each hop', async () => {
    const bucket = await rgw.bucket(`bkfs-s3copy-${randomBytes(4).toString('hex')}`);
    const url = `s3://${bucket}/offsite`;
    const env = { ...rgw.env, NODE_NO_WARNINGS: '1' };
    const local = path.join(work, 'copy-local');
    const back = path.join(work, 'copy-back');
    const img = path.join(work, 'copy.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await bkfsOk(['-r', local, 'init']);
    await qemuIo(img, 'qcow2', `write -s ${dataFile('c1', 12 * MiB)} 0 12M`);
    await bkfsOk(['-r', local, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'full', '-c', 'one']);
    const ref1 = await toRaw(img, path.join(work, 'copy-ref1.raw'));
    await qemuIo(img, 'qcow2', `write -s ${dataFile('c2', 2 * MiB)} 4M 2M`);
    await bkfsOk(['-r', local, 'backup', 'vm', '--disk', `vda=${img}`, '-l', 'inc', '-c', 'two']);
    const ref2 = await toRaw(img, path.join(work, 'copy-ref2.raw'));
    await bkfsOk(['-r', local, 'protect', 'vm@one']);

    // Hop 1: into the bucket (through one machine's cache directory).
    const cacheOut = path.join(work, 'copy-cache-out');
    await client(url, cacheOut).ok(['init']);
    const first = JSON.parse(
      (await bkfsOk(['-r', local, 'copy', 'vm', '--to', url, '--json'], { ...env, BKFS_CACHE_DIR: cacheOut }))
        .stdout,
    ) as { chunksTransferred: number };
    assert.ok(first.chunksTransferred > 0);
    const again = JSON.parse(
      (await bkfsOk(['-r', local, 'copy', 'vm', '--to', url, '--json'], { ...env, BKFS_CACHE_DIR: cacheOut }))
        .stdout,
    ) as { chunksTransferred: number };
    assert.equal(again.chunksTransferred, 0, 'a second copy sends nothing');
    const k = await keys(bucket, 'offsite/');
    assert.ok(
      [...k.keys()].some((x) => x.startsWith('offsite/manifests/')),
      'manifests are in the bucket',
    );

    // Hop 2: another machine (a fresh cache directory) rebuilds from the bucket alone and copies
    // everything into a new local repository.
    const cacheIn = path.join(work, 'copy-cache-in');
    const other = client(url, cacheIn);
    await other.ok(['repair', '--rebuild-index']);
    await bkfsOk(['-r', back, 'init']);
    await bkfsOk(['-r', back, 'copy', 'vm', '--from', url], { ...env, BKFS_CACHE_DIR: cacheIn });
    for (const [repoArgs, extra] of [
      [['-r', url], { ...env, BKFS_CACHE_DIR: cacheIn }],
      [['-r', back], {}],
    ] as const) {
      for (const [cp, ref] of [
        ['one', ref1],
        ['two', ref2],
      ] as const) {
        const out = path.join(work, `copy-${cp}-${randomBytes(3).toString('hex')}.raw`);
        await bkfsOk([...repoArgs, 'restore', `vm@${cp}`, '--disk', 'vda', '--to', out], extra);
        assert.ok(fs.readFileSync(out).equals(ref), `${repoArgs[1]}: vm@${cp} byte for byte`);
        fs.rmSync(out);
      }
    }
    const list = JSON.parse((await bkfsOk(['-r', back, 'list', 'vm', '--json'])).stdout) as {
      name: string;
      protected: boolean;
      level: string;
    }[];
    assert.deepEqual(
      list.map((c) => [c.name, c.level, c.protected]),
      [
        ['one', 'full', true],
        ['two', 'inc', false],
      ],
    );
    await bkfsOk(['-r', back, 'verify']);
  });
});
