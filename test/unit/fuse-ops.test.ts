/**
 * The fuse-native operation handlers (`fuseOps`) without mounting: callback codes (0, byte counts,
 * negative errnos), stat arrays and buffer filling, over a real repository made by a real backup.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { qemuIo } from '../helpers/cli';
import { randomBuffer, toRaw } from '../helpers/images';
import { run } from '../../src/util/proc';
import { Repository } from '../../src/repo/repository';
import { runBackup } from '../../src/backup/engine';
import { ImageSource } from '../../src/backup/sources';
import { CheckpointVfs, S_IFDIR, S_IFREG } from '../../src/fuse/vfs';
import { fuseOps, guardOps, WRITE_OPS, type FuseOps, type FuseStat } from '../../src/fuse/mount';

const MiB = 1 << 20;
const SIZE = 9 * MiB + 4096;
const E = os.constants.errno;

let work: string;
let repoDir: string;
let expected: Buffer;

/** Call a callback-style op and collect what it reports. */
function call(ops: FuseOps, name: string, ...args: unknown[]): Promise<unknown[]> {
  return new Promise((resolve) => {
    const op = ops[name] as (...a: unknown[]) => void;
    op(...args, (...res: unknown[]) => resolve(res));
  });
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-fuse-ops-'));
  const img = path.join(work, 'disk.qcow2');
  repoDir = path.join(work, 'repo');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(SIZE)]);
  const data = path.join(work, 'data.bin');
  fs.writeFileSync(data, randomBuffer(7, 2 * MiB));
  await qemuIo(img, 'qcow2', `write -s ${data} 3584 ${2 * MiB}`, `write -P 0x31 ${8 * MiB} 4096`);
  const repo = Repository.init(repoDir);
  try {
    await runBackup(repo, {
      vm: 'db',
      disks: [{ name: 'vdb', source: new ImageSource(img) }],
      level: 'full',
      configs: [{ name: 'domain.xml', data: Buffer.from('<domain/>') }],
    });
  } finally {
    repo.close();
  }
  const raw = path.join(work, 'ref.raw');
  await toRaw(img, raw);
  expected = fs.readFileSync(raw);
});

after(() => fs.rmSync(work, { recursive: true, force: true }));

describe('fuseOps', () => {
  it('answers getattr, readdir, open, read and release the way fuse-native expects', async () => {
    const repo = Repository.open(repoDir);
    const errors: string[] = [];
    const vfs = CheckpointVfs.open(repo, { ref: 'db', fileMode: 0o444 });
    const ops = fuseOps(vfs, (m) => errors.push(m));
    try {
      const [code, st] = (await call(ops, 'getattr', '/vdb.raw')) as [number, FuseStat];
      assert.equal(code, 0);
      assert.equal(st.mode, S_IFREG | 0o444);
      assert.equal(st.size, SIZE);
      assert.equal(st.blocks, SIZE / 512);
      assert.equal(st.mtime, vfs.checkpoint!.checkpoint.finished);
      assert.deepEqual(await call(ops, 'getattr', '/nope'), [-E.ENOENT]);

      const [dcode, names, stats] = (await call(ops, 'readdir', '/')) as [number, string[], FuseStat[]];
      assert.equal(dcode, 0);
      assert.deepEqual(names, ['.', '..', 'vdb.raw', 'domain.xml']);
      assert.equal(stats.length, names.length);
      assert.equal(stats[0]!.mode, S_IFDIR | 0o555);
      assert.equal(stats[3]!.size, 9);
      assert.deepEqual(await call(ops, 'readdir', '/vdb.raw'), [-E.ENOTDIR]);

      const [ocode, fh] = (await call(ops, 'open', '/vdb.raw', fs.constants.O_RDONLY)) as [number, number];
      assert.equal(ocode, 0);
      assert.ok(fh > 0);
      // A kernel request: fill the buffer, report the byte count.
      const buf = Buffer.alloc(128 * 1024, 0xff);
      for (const off of [0, 3000, 2 * MiB - 100, SIZE - 128 * 1024]) {
        assert.deepEqual(await call(ops, 'read', '/vdb.raw', fh, buf, buf.length, off), [buf.length]);
        assert.ok(buf.equals(expected.subarray(off, off + buf.length)), `read at ${off}`);
      }
      assert.deepEqual(await call(ops, 'read', '/vdb.raw', fh, buf, 4096, SIZE - 100), [100]);
      assert.ok(buf.subarray(0, 100).equals(expected.subarray(SIZE - 100)));
      assert.deepEqual(await call(ops, 'read', '/vdb.raw', fh, buf, 4096, SIZE), [0]);
      assert.deepEqual(await call(ops, 'release', '/vdb.raw', fh), [0]);
      assert.deepEqual(await call(ops, 'read', '/vdb.raw', fh, buf, 4096, 0), [-E.EBADF]);

      const [scode, sfs] = (await call(ops, 'statfs', '/')) as [number, { flag: number }];
      assert.equal(scode, 0);
      assert.equal(sfs.flag, 1, 'ST_RDONLY');
      assert.deepEqual(errors, [], 'plain filesystem answers are not logged as errors');
    } finally {
      vfs.close();
      repo.close();
    }
  });

  it('answers EROFS to every operation that would change something', async () => {
    const repo = Repository.open(repoDir);
    const vfs = CheckpointVfs.open(repo, { ref: 'db' });
    const ops = fuseOps(vfs);
    try {
      for (const flags of [fs.constants.O_WRONLY, fs.constants.O_RDWR, fs.constants.O_TRUNC]) {
        assert.deepEqual(await call(ops, 'open', '/vdb.raw', flags), [-E.EROFS]);
      }
      for (const name of WRITE_OPS) {
        // Arguments vary per operation; the callback is always last.
        assert.deepEqual(await call(ops, name, '/vdb.raw', 0, 0), [-E.EROFS], name);
      }
    } finally {
      vfs.close();
      repo.close();
    }
  });
});

describe('fuseOps never lets an exception out of a handler', () => {
  it('answers EIO exactly once and logs, when the index under the VFS is gone (closed database)', async () => {
    const repo = Repository.open(repoDir);
    const errors: string[] = [];
    const vfs = CheckpointVfs.open(repo, { ref: 'db', fileMode: 0o444 });
    const ops = fuseOps(vfs, (m) => errors.push(m));
    try {
      const [, fh] = (await call(ops, 'open', '/vdb.raw', fs.constants.O_RDONLY)) as [number, number];
      // A real failure: the SQLite handle is closed under the VFS, so every query throws.
      repo.db.close();
      const answers = new Map<string, unknown[][]>();
      const collect = (name: string, ...args: unknown[]): Promise<void> =>
        new Promise((resolve) => {
          const got: unknown[][] = [];
          answers.set(name, got);
          const op = ops[name] as (...a: unknown[]) => void;
          assert.doesNotThrow(() =>
            op(...args, (...res: unknown[]) => {
              got.push(res);
              resolve();
            }),
          );
          setTimeout(resolve, 200); // then count how many answers came
        });
      const buf = Buffer.alloc(4 * MiB);
      await collect('read', '/vdb.raw', fh, buf, buf.length, 5 * MiB);
      await collect('statfs', '/');
      await collect('readdir', '/');
      await collect('getattr', '/vdb.raw');
      await collect('open', '/vdb.raw', fs.constants.O_RDONLY);
      for (const [name, got] of answers) {
        assert.equal(got.length, 1, `${name} answered once`);
        const code = got[0]![0] as number;
        assert.ok(code <= 0, `${name}: ${code}`);
      }
      assert.deepEqual(answers.get('read')![0], [-E.EIO]);
    } finally {
      vfs.close();
      repo.close();
    }
  });

  it('guardOps: a handler that throws answers EIO once, a handler that answered keeps its answer', async () => {
    // A deliberately throwing handler: the guard's own contract, which no real VFS path reaches
    // on purpose (the test above reaches it through a real closed database where it can).
    const errors: string[] = [];
    const ops = guardOps(
      {
        init: (cb) => cb(0),
        getattr: () => {
          throw new Error('boom');
        },
        readdir: (_p, cb) => {
          cb(0, [], []);
          throw new Error('after answering');
        },
        readlink: (_p, cb) => cb(0, 'x'),
        open: (_p, _f, cb) => cb(0, 1),
        read: (_p, _fd, _b, _l, _pos, cb) => cb(0),
        release: (_p, _fd, cb) => cb(0),
        statfs: (_p, cb) => cb(0, {}),
      } as FuseOps,
      (m) => errors.push(m),
    );
    assert.deepEqual(await call(ops, 'getattr', '/x'), [-E.EIO]);
    const got: unknown[][] = [];
    (ops.readdir as (p: string, cb: (...a: unknown[]) => void) => void)('/', (...a) => got.push(a));
    assert.deepEqual(got, [[0, [], []]]);
    assert.equal(errors.length, 2);
    assert.match(errors[0]!, /getattr \/x: boom/);
  });
});
