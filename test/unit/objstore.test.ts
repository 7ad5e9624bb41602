/**
 * `LocalStore`, the local directory implementation of the storage interface that gc, verify,
 * rebuild and stats use for every pack and manifest (FORMAT.md, "Storage interface"): real files
 * in a temp directory, no fakes.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { LocalStore, type ObjectStore } from '../../src/store/objstore';
import { holdLease, listManifests, listPacks, packKey, packNameOfKey } from '../../src/store/location';
import { PackReader, PackWriter } from '../../src/store/packs';
import { CODEC_RAW, hashChunk } from '../../src/store/codec';

const code = (c: string) => (e: Error & { code?: string }) => e.code === c;

async function keys(s: ObjectStore, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of s.list(prefix)) out.push(o.key);
  return out;
}

describe('LocalStore', () => {
  let parent: string;
  let dir: string;
  let store: LocalStore;
  before(() => {
    // The store in a private parent: a key that escaped it would land beside it, in `parent`
    // (not in /tmp, where other files may have any name).
    parent = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-store-objstore-'));
    dir = path.join(parent, 'store');
    fs.mkdirSync(dir);
    store = new LocalStore(dir);
  });
  after(() => fs.rmSync(parent, { recursive: true, force: true }));

  it('refuses keys that could leave the store (.., absolute, empty, odd characters) with USAGE', async () => {
    for (const k of ['', '..', '../x', 'a/../../x', '/etc/passwd', 'a//b', 'a/./b', 'a/', 'a b', 'a\\b']) {
      await assert.rejects(store.put(k, Buffer.from('x')), code('USAGE'), `put ${JSON.stringify(k)}`);
      await assert.rejects(store.get(k), code('USAGE'), `get ${JSON.stringify(k)}`);
      await assert.rejects(store.getRange(k, 0, 1), code('USAGE'), `getRange ${JSON.stringify(k)}`);
      await assert.rejects(store.head(k), code('USAGE'), `head ${JSON.stringify(k)}`);
      await assert.rejects(store.delete([k]), code('USAGE'), `delete ${JSON.stringify(k)}`);
    }
    await assert.rejects(keys(store, '../'), code('USAGE'));
    await assert.rejects(keys(store, '/etc/'), code('USAGE'));
    assert.deepEqual(fs.readdirSync(dir), [], 'nothing was created');
    assert.deepEqual(fs.readdirSync(parent), ['store'], 'nothing was created beside the store');
  });

  it('put ifAbsent: the second one is TARGET_EXISTS and the first content stays', async () => {
    await store.put('locks/lease.json', Buffer.from('first'), { ifAbsent: true });
    await assert.rejects(
      store.put('locks/lease.json', Buffer.from('second'), { ifAbsent: true }),
      code('TARGET_EXISTS'),
    );
    assert.equal((await store.get('locks/lease.json')).toString(), 'first');
    // No temporary is left behind by the refused put.
    assert.deepEqual(fs.readdirSync(path.join(dir, 'locks')), ['lease.json']);
    // A plain put replaces.
    await store.put('locks/lease.json', Buffer.from('third'));
    assert.equal((await store.get('locks/lease.json')).toString(), 'third');
  });

  it('get, getRange and head; a range past the end is DATA_DAMAGED, a missing key NOT_FOUND', async () => {
    await store.put('packs/ab/obj', Buffer.from('0123456789'));
    assert.equal((await store.getRange('packs/ab/obj', 2, 5)).toString(), '23456');
    assert.equal((await store.getRange('packs/ab/obj', 0, 10)).toString(), '0123456789');
    await assert.rejects(store.getRange('packs/ab/obj', 8, 3), code('DATA_DAMAGED'));
    await assert.rejects(store.getRange('packs/ab/obj', 20, 1), code('DATA_DAMAGED'));
    await assert.rejects(store.get('packs/ab/missing'), code('NOT_FOUND'));
    await assert.rejects(store.getRange('packs/ab/missing', 0, 1), code('NOT_FOUND'));
    // Below a file that is not a directory: missing too.
    await assert.rejects(store.get('packs/ab/obj/x'), code('NOT_FOUND'));
    assert.deepEqual(await store.head('packs/ab/obj'), { key: 'packs/ab/obj', size: 10 });
    assert.equal(await store.head('packs/ab/missing'), null);
    assert.equal(await store.head('packs/ab/obj/x'), null);
    assert.equal(await store.head('packs'), null, 'a directory is not an object');
  });

  it('list: only keys under the prefix, in key order; temporaries and foreign names hidden', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-store-list-'));
    try {
      const s = new LocalStore(d);
      for (const k of [
        'packs/cd/2.pack',
        'packs/ab/1.pack',
        'packs/ab/0.pack',
        'packsx',
        'manifests/m.json.zst',
      ]) {
        await s.put(k, Buffer.from(k));
      }
      // A writer's temporary, a hidden file, a name that is no key, a symlink, a directory.
      fs.writeFileSync(path.join(d, 'packs', 'ab', '.1.pack.0123.tmp'), 'tmp');
      fs.writeFileSync(path.join(d, 'packs', 'ab', 'with space'), 'x');
      fs.symlinkSync('/etc/passwd', path.join(d, 'packs', 'ab', 'link.pack'));
      fs.mkdirSync(path.join(d, 'packs', 'ef'));
      assert.deepEqual(await keys(s, 'packs/'), ['packs/ab/0.pack', 'packs/ab/1.pack', 'packs/cd/2.pack']);
      assert.deepEqual(await keys(s, 'packs/ab/'), ['packs/ab/0.pack', 'packs/ab/1.pack']);
      assert.deepEqual(await keys(s, 'packs/ab/1'), ['packs/ab/1.pack']);
      assert.deepEqual(await keys(s, 'packs'), [
        'packs/ab/0.pack',
        'packs/ab/1.pack',
        'packs/cd/2.pack',
        'packsx',
      ]);
      assert.deepEqual(await keys(s, 'nothing/'), []);
      assert.deepEqual(await keys(s, ''), [
        'manifests/m.json.zst',
        'packs/ab/0.pack',
        'packs/ab/1.pack',
        'packs/cd/2.pack',
        'packsx',
      ]);
      const sizes: number[] = [];
      for await (const o of s.list('packs/cd/')) sizes.push(o.size);
      assert.deepEqual(sizes, ['packs/cd/2.pack'.length]);
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('delete: the objects go; missing keys are fine', async () => {
    await store.put('manifests/a.json.zst', Buffer.from('a'));
    await store.put('manifests/b.json.zst', Buffer.from('b'));
    await store.delete(['manifests/a.json.zst', 'manifests/never.json.zst', 'gone/dir/x']);
    assert.deepEqual(await keys(store, 'manifests/'), ['manifests/b.json.zst']);
    await store.delete([]);
  });

  it('creates files 0600 and directories 0700 (put and putFile)', async () => {
    const prev = process.umask(0o000); // the modes are bkfs's own, not the umask's
    try {
      await store.put('perm/deep/er/x', Buffer.from('x'));
      const src = path.join(dir, 'source-file');
      fs.writeFileSync(src, 'from a file', { mode: 0o644 });
      await store.putFile('perm/y', src);
    } finally {
      process.umask(prev);
    }
    assert.equal((await store.get('perm/y')).toString(), 'from a file');
    for (const f of ['perm/deep/er/x', 'perm/y']) {
      assert.equal(fs.statSync(path.join(dir, f)).mode & 0o777, 0o600, f);
    }
    for (const d of ['perm', 'perm/deep', 'perm/deep/er']) {
      assert.equal(fs.statSync(path.join(dir, d)).mode & 0o777, 0o700, d);
    }
  });
});

describe('store helpers', () => {
  it('listPacks and listManifests take only pack and manifest keys; the rest is foreign', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-store-keys-'));
    try {
      const s = new LocalStore(d);
      const a = 'ab' + '0'.repeat(30);
      const b = 'cd' + '1'.repeat(30);
      await s.put(packKey(a), Buffer.alloc(5));
      await s.put(packKey(b), Buffer.alloc(7));
      await s.put('packs/ab/notapack.txt', Buffer.from('x'));
      await s.put(`packs/ff/${a}.pack`, Buffer.from('wrong directory'));
      await s.put('packs/ab/ab.pack', Buffer.from('short name'));
      await s.put(`manifests/${a}.json.zst`, Buffer.from('m'));
      await s.put('manifests/forget-0011.json', Buffer.from('{}'));
      assert.deepEqual(await listPacks(s), [
        { name: a, size: 5 },
        { name: b, size: 7 },
      ]);
      assert.deepEqual(await listManifests(s), [{ uid: a, size: 1 }]);
      assert.equal(packNameOfKey(packKey(a)), a);
      assert.equal(packNameOfKey(`packs/ff/${a}.pack`), null);
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('the writer lease is a no-op for a local store (nothing written)', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-store-lease-'));
    try {
      await holdLease(d, new LocalStore(d));
      assert.deepEqual(fs.readdirSync(d), []);
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('PackReader.forget closes the descriptor of a deleted pack (its space is freed)', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-store-forget-'));
    try {
      fs.mkdirSync(path.join(d, 'tmp'));
      const w = await PackWriter.create(d);
      const data = Buffer.alloc(4096, 7);
      const pc = await w.append(
        { codec: CODEC_RAW, rawLen: 4096, storedLen: 4096, hash: hashChunk(data) },
        data,
      );
      await w.seal();
      const reader = new PackReader(d);
      assert.deepEqual(await reader.read(w.name, pc.offset, 4096), data);
      const held = (): boolean =>
        fs.readdirSync('/proc/self/fd').some((fd) => {
          try {
            return fs.readlinkSync(`/proc/self/fd/${fd}`).includes(w.name);
          } catch {
            return false;
          }
        });
      assert.ok(held(), 'the reader keeps the pack open');
      await new LocalStore(d).delete([packKey(w.name)]);
      reader.forget(w.name);
      assert.equal(held(), false, 'no descriptor of the deleted pack is left');
      await assert.rejects(reader.read(w.name, pc.offset, 4096), code('DATA_DAMAGED'));
      reader.close();
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });
});
