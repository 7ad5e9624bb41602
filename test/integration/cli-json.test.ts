/**
 * Every command that reports a result, run with --json against a real repository (real qcow2
 * image with an ext4 filesystem, real qemu-nbd, SQLite, FUSE and loop devices), and each output
 * checked against its schema (test/helpers/schema.ts) and the CLI's JSON conventions: times are
 * ISO 8601 with zone (never epoch ms or `mtimeSec`), bytes integers, durations integer ms.
 *
 * Needs root (kernel file engine, FUSE mount), qemu-utils, nbdfuse, fuse3, e2fsprogs, sfdisk.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk } from '../helpers/cli';
import { makeDisk, modifyDisk } from '../helpers/images';
import {
  arr,
  bool,
  int,
  nul,
  nullable,
  num,
  obj,
  oneOf,
  optional,
  str,
  time,
  validate,
  type Schema,
} from '../helpers/schema';

let work: string;
let repo: string;
let img: string;
const KERNEL = ['--engine', 'kernel'];

async function json(args: string[], schema: Schema): Promise<unknown> {
  const r = await bkfsOk(['-r', repo, ...args, '--json']);
  return validate(`bkfs ${args.join(' ')} --json`, r.stdout, schema);
}

const chunkStats = obj({
  newChunks: int,
  newRawBytes: int,
  newStoredBytes: int,
  dedupChunks: int,
  dedupBytes: int,
});
const backupSchema = obj({
  vm: str,
  checkpoint: str,
  level: oneOf('full', 'inc', 'diff', 'copy'),
  time,
  durationMs: int,
  disks: int,
  virtualSize: int,
  bytesRead: int,
  bytesZero: int,
  chunks: chunkStats,
  libvirt: nul,
});
const checkpointSchema = obj({
  vm: str,
  name: str,
  level: str,
  parent: nullable(str),
  time,
  durationMs: int,
  disks: arr(
    obj({
      name: str,
      virtualSize: int,
      bytesRead: int,
      source: nullable(str),
      format: nullable(str),
      bitmap: nullable(str),
    }),
    { min: 1 },
  ),
  virtualSize: int,
  bytesRead: int,
  bytesNewRaw: int,
  bytesNewStored: int,
  chunksNew: int,
  libvirtCheckpoint: nullable(str),
  protected: bool,
  damaged: bool,
});
const forgetEntry = obj({
  vm: str,
  name: str,
  id: int,
  level: str,
  time,
  reasons: arr(str),
  pinned: optional(bool),
});
const forgetSchema = obj({ dryRun: bool, removed: arr(forgetEntry), kept: arr(forgetEntry) });
const gcSchema = obj(
  Object.fromEntries(
    [
      'checkpointsRemoved',
      'checkpointsPinned',
      'chunksRemoved',
      'chunkBytesRemoved',
      'packsDeleted',
      'packsRewritten',
      'packsWritten',
      'bytesCopied',
      'packsKeptForReaders',
      'packsKeptDamaged',
      'orphansRemoved',
      'packsPending',
      'bytesPending',
      'bytesBefore',
      'bytesAfter',
      'bytesFreed',
      'extentsHealed',
      'packsKeptUnused',
      'bytesKeptUnused',
      'packsSmallMerged',
    ]
      .map((k) => [k, int] as [string, Schema])
      .concat([
        ['dryRun', bool],
        ['maxUnused', num],
      ]),
  ),
);
const totals = {
  checkpoints: int,
  logicalBytes: int,
  chunks: int,
  rawBytes: int,
  storedBytes: int,
  dedupRatio: num,
  compressionRatio: num,
  totalRatio: num,
};
const statEntry = obj({
  path: str,
  kind: oneOf('file', 'dir', 'symlink', 'other', 'blockdev', 'chardev', 'fifo', 'socket'),
  size: int,
  mode: int,
  uid: int,
  gid: int,
  mtime: time,
});

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-clifeat-json-'));
  repo = path.join(work, 'repo');
  img = path.join(work, 'web.qcow2');
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 64,
    table: 'gpt',
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 32,
        label: 'root',
        files: [
          { path: 'etc/hostname', content: Buffer.from('web\n') },
          { path: 'etc/app.conf', content: Buffer.from('level=1\n') },
          { path: 'etc/fstab', content: Buffer.from('LABEL=root / ext4 defaults 0 1\n') },
        ],
      },
    ],
  });
});

after(async () => {
  const mnt = path.join(work, 'mnt');
  if (fs.existsSync(mnt)) await bkfs(['umount', mnt]);
  fs.rmSync(work, { recursive: true, force: true });
});

describe('every command with --json matches its schema', () => {
  it('init', async () => {
    await json(
      ['init'],
      obj({ id: str, path: str, format: int, chunkSize: int, pageSpan: int, created: time }),
    );
  });

  it('backup (full, then incremental after a guest change)', async () => {
    const b1 = (await json(['backup', 'web', '--disk', `vda=${img}`, '--level', 'full'], backupSchema)) as {
      checkpoint: string;
    };
    assert.equal(b1.checkpoint, 'check1');
    await modifyDisk(img, 'qcow2', 1, async (dir) => {
      fs.writeFileSync(path.join(dir, 'etc/app.conf'), 'level=2\nmore=yes\n');
      fs.writeFileSync(path.join(dir, 'etc/new.conf'), 'new\n');
    });
    const b2 = (await json(['backup', 'web', '--disk', `vda=${img}`], backupSchema)) as { level: string };
    assert.equal(b2.level, 'inc');
  });

  it('list, snapshots, info', async () => {
    const l = (await json(['list'], arr(checkpointSchema, { min: 2 }))) as unknown[];
    assert.equal(l.length, 2);
    await json(['snapshots', 'web'], arr(checkpointSchema, { min: 2 }));
    await json(['info', 'web@check1'], checkpointSchema);
  });

  it('stats, verify, verify --source', async () => {
    await json(
      ['stats'],
      obj({
        repository: obj({
          ...totals,
          packs: int,
          packBytes: int,
          indexedStoredBytes: int,
          reclaimableBytes: int,
        }),
        vms: arr(obj({ ...totals, vm: str, uniqueStoredBytes: int }), { min: 1 }),
        checkpoints: arr(
          obj({
            vm: str,
            name: str,
            level: str,
            time,
            virtualSize: int,
            logicalBytes: int,
            uniqueChunks: int,
            uniqueRawBytes: int,
            uniqueStoredBytes: int,
            protected: bool,
            damaged: bool,
          }),
          { min: 2 },
        ),
      }),
    );
    const verify = {
      checkpoints: int,
      chunksChecked: int,
      bytesChecked: int,
      problems: arr(str),
      damaged: arr(obj({ chunkId: int, hash: str, error: str })),
      recovered: int,
    };
    await json(['verify'], obj(verify));
    await json(
      ['verify', 'web', '--source'],
      obj({
        ...verify,
        sources: arr(
          obj({
            vm: str,
            checkpoint: str,
            disk: str,
            source: nullable(str),
            status: oneOf('same', 'differs', 'gone', 'skipped'),
            bytesCompared: int,
            bytesDiffering: int,
            ranges: arr(obj({ offset: int, length: int })),
          }),
          { min: 1 },
        ),
      }),
    );
  });

  it('protect, unprotect', async () => {
    const s = obj({ protected: bool, changed: arr(obj({ vm: str, name: str })) });
    const p = (await json(['protect', 'web@check1'], s)) as { changed: unknown[] };
    assert.equal(p.changed.length, 1);
    await json(['unprotect', 'web@check1'], s);
  });

  it('ls (overview and directory), find, diff, cp', async () => {
    await json(
      ['ls', 'web@check2', ...KERNEL],
      obj({
        vm: str,
        checkpoint: str,
        engine: nullable(str),
        disks: arr(obj({ name: str, size: int, table: str, partitions: int, warnings: arr(str) }), {
          min: 1,
        }),
        volumes: arr(
          obj({ id: str, offset: int, size: int, type: nullable(str), mountpoint: nullable(str) }),
          {
            min: 1,
          },
        ),
        fstabFrom: nullable(str),
      }),
    );
    const ls = (await json(
      ['ls', 'web@check2:/etc', ...KERNEL],
      obj({
        entries: arr(obj({ name: str, path: str, kind: str, size: int, mtime: time, atime: time }), {
          min: 3,
        }),
      }),
    )) as { entries: { name: string }[] };
    assert.ok(ls.entries.some((e) => e.name === 'new.conf'));
    const find = (await json(
      ['find', 'web', 'app.conf', ...KERNEL],
      obj({
        vm: str,
        checkpoints: arr(str),
        missing: arr(str),
        matches: arr(
          obj({
            path: str,
            history: arr(obj({ checkpoint: str, state: str, entry: optional(statEntry) }), { min: 2 }),
          }),
          { min: 1 },
        ),
      }),
    )) as { matches: { history: { state: string }[] }[] };
    assert.deepEqual(
      find.matches[0]!.history.map((h) => h.state),
      ['present', 'changed'],
    );
    const diff = (await json(
      ['diff', 'web@check1', 'web@check2', ...KERNEL],
      obj({
        vm: str,
        from: str,
        to: str,
        path: str,
        checksummed: int,
        items: arr(
          obj({
            path: str,
            change: oneOf('added', 'removed', 'changed'),
            what: arr(str),
            before: optional(statEntry),
            after: optional(statEntry),
          }),
          { min: 2 },
        ),
      }),
    )) as { items: { path: string; change: string }[] };
    assert.ok(diff.items.some((d) => d.path === '/etc/new.conf' && d.change === 'added'));
    await json(
      ['cp', 'web@check2:/etc/app.conf', path.join(work, 'app.conf'), ...KERNEL],
      obj({
        vm: str,
        checkpoint: str,
        source: str,
        dest: str,
        kind: str,
        action: str,
        engine: nullable(str),
      }),
    );
    assert.equal(fs.readFileSync(path.join(work, 'app.conf'), 'utf8'), 'level=2\nmore=yes\n');
  });

  it('restore, export', async () => {
    await json(
      ['restore', 'web@check2', '--to', path.join(work, 'restored')],
      obj({
        vm: str,
        checkpoint: str,
        since: nullable(str),
        disks: arr(
          obj({
            disk: str,
            target: str,
            format: str,
            virtualSize: int,
            bytesWritten: int,
            bytesZeroed: int,
            holes: int,
            durationMs: int,
          }),
          { min: 1 },
        ),
        configs: arr(str),
        domainXml: nullable(str),
        defined: nullable(str),
        durationMs: int,
      }),
    );
    await json(
      ['export', 'web@check2', '--to', path.join(work, 'export')],
      obj({
        vm: str,
        checkpoint: str,
        dir: str,
        disks: arr(
          obj({
            disk: str,
            virtualSize: int,
            top: str,
            layers: arr(
              obj({
                checkpoint: str,
                file: str,
                backing: nullable(str),
                bytesWritten: int,
                bytesZeroed: int,
              }),
              { min: 2 },
            ),
          }),
          { min: 1 },
        ),
        configs: arr(str),
        durationMs: int,
      }),
    );
  });

  it('mount, umount', async () => {
    const mnt = path.join(work, 'mnt');
    fs.mkdirSync(mnt);
    const m = (await json(
      ['mount', 'web@check2', mnt],
      obj({
        pid: int,
        mountpoint: str,
        mode: oneOf('checkpoint', 'tree'),
        ref: nullable(str),
        files: arr(obj({ name: str, size: int }), { min: 1 }),
        log: nullable(str),
        repository: str,
      }),
    )) as { files: { name: string }[] };
    assert.ok(m.files.some((f) => f.name === 'vda.raw'));
    const u = (await json(['umount', mnt], obj({ mountpoint: str, outcome: str }))) as { outcome: string };
    assert.equal(u.outcome, 'unmounted');
  });

  it('forget (dry run, policy), gc, repair, version', async () => {
    const dry = (await json(['forget', 'web', '--keep-last', '1', '--dry-run'], forgetSchema)) as {
      removed: { name: string }[];
    };
    assert.deepEqual(
      dry.removed.map((r) => r.name),
      ['check1'],
    );
    await json(['gc', '--dry-run'], gcSchema);
    await json(
      ['forget', 'web', '--keep-last', '1', '--prune'],
      obj({ ...forgetSchemaShape(), gc: gcSchema }),
    );
    await json(['gc'], gcSchema);
    await json(['repair', '--manifests'], obj({ written: arr(str) }));
    await json(
      ['repair', '--rebuild-index'],
      obj({
        packs: int,
        chunks: int,
        manifests: int,
        vms: int,
        checkpoints: int,
        problems: arr(str),
        oldIndex: nullable(str),
      }),
    );
    const v = (await json(
      ['version'],
      obj({
        bkfs: str,
        repositoryFormats: arr(int, { min: 1 }),
        repositoryFormatWritten: int,
        repositoryFormatEncrypted: int,
        repository: nullable(
          obj({ path: str, format: int, encrypted: bool, cipher: optional(str), keyId: optional(str) }),
        ),
        node: str,
        gitCommit: nullable(str),
        dependencies: obj({
          betterSqlite3: str,
          sqlite: str,
          zstdNapi: str,
          zstd: str,
          fuseNative: str,
          blakeHash: str,
          commander: str,
        }),
        qemuImg: nullable(str),
      }),
    )) as { node: string };
    assert.equal(v.node, process.versions.node);
  });
});

function forgetSchemaShape(): Record<string, Schema> {
  return { dryRun: bool, removed: arr(forgetEntry), kept: arr(forgetEntry) };
}
