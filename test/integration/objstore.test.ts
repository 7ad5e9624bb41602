/**
 * The storage interface (src/store/objstore.ts) against its two implementations: a local
 * directory and a real S3 endpoint (Ceph RADOS Gateway started by test/helpers/rgw.ts). The same
 * cases run against both, so gc, verify and rebuild can rely on one behaviour.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { isBkfsError } from '../../src/errors';
import { LocalStore, type ObjectStore } from '../../src/store/objstore';
import { S3Store } from '../../src/store/s3store';
import { startRgw, type Rgw } from '../helpers/rgw';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

async function rejectsWith(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(isBkfsError(e), `expected a BkfsError ${code}, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.doesNotMatch(e.message, /\n/, 'one-line message');
    return true;
  });
}

async function collect(
  it: AsyncIterable<{ key: string; size: number }>,
): Promise<{ key: string; size: number }[]> {
  const out = [];
  for await (const o of it) out.push(o);
  return out;
}

let work: string;
let rgw: Rgw;

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-objstore-'));
  rgw = await startRgw();
});

after(async () => {
  await rgw?.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

function conformance(name: string, open: () => Promise<ObjectStore>): void {
  describe(`object store conformance: ${name}`, () => {
    let store: ObjectStore;
    before(async () => {
      store = await open();
    });
    after(async () => {
      await store?.close();
    });

    it('puts, gets and reads ranges byte for byte', async () => {
      const data = randomBytes(1 << 20);
      await store.put('packs/ab/abcdef.pack', data);
      assert.equal(sha(await store.get('packs/ab/abcdef.pack')), sha(data));
      for (const [off, len] of <[number, number][]>[
        [0, 1],
        [4095, 4097],
        [(1 << 20) - 10, 10],
        [123457, 65536],
      ]) {
        assert.ok(
          (await store.getRange('packs/ab/abcdef.pack', off, len)).equals(data.subarray(off, off + len)),
        );
      }
      assert.deepEqual(await store.head('packs/ab/abcdef.pack'), {
        key: 'packs/ab/abcdef.pack',
        size: 1 << 20,
      });
      await rejectsWith(store.getRange('packs/ab/abcdef.pack', (1 << 20) - 10, 20), 'DATA_DAMAGED');
    });

    it('reports a missing object as NOT_FOUND (get, range) and null (head)', async () => {
      await rejectsWith(store.get('manifests/nope.json'), 'NOT_FOUND');
      await rejectsWith(store.getRange('manifests/nope.json', 0, 10), 'NOT_FOUND');
      assert.equal(await store.head('manifests/nope.json'), null);
    });

    it('replaces on put, and ifAbsent lets exactly one of many racers win', async () => {
      await store.put('cfg/x.json', Buffer.from('one'));
      await store.put('cfg/x.json', Buffer.from('two'));
      assert.equal((await store.get('cfg/x.json')).toString(), 'two');
      await rejectsWith(store.put('cfg/x.json', Buffer.from('three'), { ifAbsent: true }), 'TARGET_EXISTS');
      assert.equal((await store.get('cfg/x.json')).toString(), 'two');
      const racers = await Promise.allSettled(
        Array.from({ length: 8 }, (_, i) =>
          store.put('cfg/lease.json', Buffer.from(`racer ${i}`), { ifAbsent: true }),
        ),
      );
      const won = racers.filter((r) => r.status === 'fulfilled');
      assert.equal(won.length, 1, 'exactly one racer creates the object');
      for (const r of racers) {
        if (r.status === 'rejected') assert.equal((r.reason as { code?: string }).code, 'TARGET_EXISTS');
      }
      assert.match((await store.get('cfg/lease.json')).toString(), /^racer \d$/);
    });

    it('lists by prefix in key order across pages, and deletes in batches', async () => {
      const keys = Array.from({ length: 1105 }, (_, i) => `many/k${String(i).padStart(5, '0')}`);
      for (let i = 0; i < keys.length; i += 32) {
        await Promise.all(keys.slice(i, i + 32).map((k) => store.put(k, Buffer.from(k))));
      }
      await store.put('manyother/z', Buffer.from('z'));
      const listed = await collect(store.list('many/'));
      assert.deepEqual(
        listed.map((o) => o.key),
        keys,
      );
      assert.ok(listed.every((o) => o.size === o.key.length));
      await store.delete([...keys.slice(0, 1050), 'many/never-existed']);
      assert.deepEqual(
        (await collect(store.list('many/'))).map((o) => o.key),
        keys.slice(1050),
      );
      assert.equal((await collect(store.list('manyother/'))).length, 1);
    });

    it('uploads a large file (in parts on S3) and reads it back', async () => {
      const f = path.join(work, `big-${name}`);
      const data = randomBytes(40 << 20);
      fs.writeFileSync(f, data);
      await store.putFile('packs/cd/big.pack', f);
      assert.equal((await store.head('packs/cd/big.pack'))?.size, data.length);
      assert.equal(sha(await store.get('packs/cd/big.pack')), sha(data));
      assert.ok(
        (await store.getRange('packs/cd/big.pack', 17 << 20, 1 << 20)).equals(
          data.subarray(17 << 20, 18 << 20),
        ),
      );
      fs.rmSync(f);
    });

    it('refuses keys that could name anything outside the store', async () => {
      for (const k of ['../x', '/abs', 'a//b', 'a/../b', '.', 'a/./b', '', 'a b', 'x\0y']) {
        await rejectsWith(store.put(k, Buffer.from('x')), 'USAGE');
        await rejectsWith(store.get(k), 'USAGE');
      }
    });
  });
}

conformance('local directory', async () => new LocalStore(fs.mkdtempSync(path.join(work, 'local-'))));
conformance('S3 (Ceph RGW)', async () => {
  const bucket = await rgw.bucket(`bkfs-conf-${randomBytes(4).toString('hex')}`);
  const s = new S3Store(`s3://${bucket}/repo1`, {
    endpoint: rgw.endpoint,
    accessKeyId: rgw.accessKeyId,
    secretAccessKey: rgw.secretAccessKey,
    partSize: 8 << 20,
  });
  await s.check();
  return s;
});

describe('object store: local directory specifics', () => {
  it('writes objects 0600 durably and leaves no temporary file behind a refused create', async () => {
    const root = fs.mkdtempSync(path.join(work, 'modes-'));
    const s = new LocalStore(root);
    await s.put('manifests/a.json', Buffer.from('{}'));
    assert.equal(fs.statSync(path.join(root, 'manifests/a.json')).mode & 0o777, 0o600);
    assert.equal(fs.statSync(path.join(root, 'manifests')).mode & 0o777, 0o700);
    await rejectsWith(s.put('manifests/a.json', Buffer.from('x'), { ifAbsent: true }), 'TARGET_EXISTS');
    assert.deepEqual(fs.readdirSync(path.join(root, 'manifests')), ['a.json']);
  });
});

describe('object store: S3 failures are one-line coded errors', () => {
  it('bad credentials -> STORE_ACCESS', async () => {
    const bucket = await rgw.bucket(`bkfs-auth-${randomBytes(4).toString('hex')}`);
    const s = new S3Store(`s3://${bucket}`, {
      endpoint: rgw.endpoint,
      accessKeyId: rgw.accessKeyId,
      secretAccessKey: 'wrong-secret-wrong-secret-wrong-secret00',
    });
    await rejectsWith(s.check(), 'STORE_ACCESS');
    await rejectsWith(s.put('x', Buffer.from('x')), 'STORE_ACCESS');
    await s.close();
  });

  it('a bucket that does not exist -> REPO_NOT_FOUND', async () => {
    const s = new S3Store('s3://bkfs-no-such-bucket-here', {
      endpoint: rgw.endpoint,
      accessKeyId: rgw.accessKeyId,
      secretAccessKey: rgw.secretAccessKey,
    });
    await rejectsWith(s.check(), 'REPO_NOT_FOUND');
    await s.close();
  });

  it('an endpoint nobody listens on -> STORE_UNAVAILABLE after the retries, in bounded time', async () => {
    // A port that was free a moment ago: connection refused on loopback.
    const port = await new Promise<number>((resolve) => {
      const srv = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (srv.address() as net.AddressInfo).port;
        srv.close(() => resolve(p));
      });
    });
    const s = new S3Store('s3://anybucket', {
      endpoint: `http://127.0.0.1:${port}`,
      accessKeyId: 'x',
      secretAccessKey: 'y',
      maxAttempts: 3,
    });
    const t0 = Date.now();
    await rejectsWith(s.check(), 'STORE_UNAVAILABLE');
    assert.ok(Date.now() - t0 < 30000, 'gave up within 30 s');
    await s.close();
  });

  it('rejects malformed s3:// locations', () => {
    for (const u of ['s3://', 's3://A_B', 's3://ab', 'http://x/y', 's3://bucket/../x']) {
      assert.throws(
        () => new S3Store(u),
        (e: unknown) => isBkfsError(e) && e.code === 'USAGE',
        u,
      );
    }
  });
});
