/**
 * Encrypted repositories in a bucket (issue 13 §1 + §2), end to end through the real `bkfs` against
 * a real Ceph RADOS Gateway (test/helpers/rgw.ts, started once for this file, stopped after) and
 * real libsodium: `init --encrypt -r s3://`, full + incremental backups of a qcow2 holding a text
 * marker, mount and restore byte-identical to `qemu-img convert` at each checkpoint; no plaintext in
 * any object of the bucket; a new machine (empty cache directory) rebuilding the index from the
 * bucket with the key (by sealed pack trailers, version 3: a few KiB fetched, not the packs), and
 * refused without it (36) or with a wrong passphrase (35) with the bucket unchanged; a sealed
 * trailer moved from another pack (its clear footer forged to fit) refused, the pack scanned whole
 * instead, and everything still restoring; a flipped byte in a chunk record of a pack object: EIO
 * through a mount, exit 15 from restore, reported by verify, never other bytes.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import Database from 'better-sqlite3';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { fromPaperKey, deriveKeys } from '../../src/crypto/keys';
import {
  PACK_FLAG_SEALED,
  PACK_HEADER_LEN,
  PACK_VERSION_SEALED_TRAILER,
  PACK_VERSION_TRAILER,
  SEALED_TRAILER_FOOTER_LEN,
  SEALED_TRAILER_MAGIC,
  decodePackTrailer,
  encodePackTrailer,
} from '../../src/store/packs';
import { Cipher } from '../../src/crypto/cipher';
import { bkfs, bkfsOk, type CliResult } from '../helpers/cli';
import { startRgw, type Rgw } from '../helpers/rgw';

const MiB = 1024 * 1024;
const MARKER = 'BKFS-S3CRYPT-MARKER-0c5d7a31';
const XML_MARKER = 'vnc-passwd-s3crypt-9e24b6';
const VM = 'vm-secret-s3crypt-d41e';
const CPS = ['cp-alpha-s3crypt', 'cp-beta-s3crypt'] as const;
const PREFIX = 'enc';

let work = '';
let rgw: Rgw;
let s3: S3Client;
let bucket = '';
let url = '';
let img = '';
let pwFile = '';
let master: Buffer;
const refs: Record<string, Buffer> = {};

/** Environment with exactly the key sources given (none inherited from the test runner). */
function env(cacheDir: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return {
    ...rgw.env,
    NODE_NO_WARNINGS: '1',
    BKFS_CACHE_DIR: cacheDir,
    BKFS_PASSWORD_FILE: '',
    BKFS_PASSWORD_COMMAND: '',
    BKFS_KEY_FILE: '',
    BKFS_PAPER_KEY_FILE: '',
    ...extra,
  };
}

/** A machine: bkfs on the bucket with its own cache directory, the passphrase unless `key: false`. */
function machine(cacheDir: string) {
  const e = (extra: NodeJS.ProcessEnv) => env(cacheDir, { BKFS_PASSWORD_FILE: pwFile, ...extra });
  return {
    cacheDir,
    ok: (args: string[], extra: NodeJS.ProcessEnv = {}) => bkfsOk(['-r', url, ...args], e(extra)),
    run: (args: string[], extra: NodeJS.ProcessEnv = {}) => bkfs(['-r', url, ...args], e(extra)),
    /** The repository's cache directory (`<cacheDir>/<repository id>`). */
    repoDir: () =>
      path.join(
        cacheDir,
        fs.readdirSync(cacheDir).find((n) => /^[0-9a-f]{16}$/.test(n))!,
      ),
  };
}

async function objects(): Promise<Map<string, { size: number; etag: string }>> {
  const out = new Map<string, { size: number; etag: string }>();
  let token: string | undefined;
  do {
    const r = await s3.send(new ListObjectsV2Command({ Bucket: bucket, ContinuationToken: token }));
    for (const o of r.Contents ?? []) out.set(o.Key!, { size: o.Size ?? 0, etag: o.ETag ?? '' });
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return out;
}

async function getObject(key: string): Promise<Buffer> {
  const r = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
  return Buffer.from(await r.Body!.transformToByteArray());
}

async function putObject(key: string, body: Buffer): Promise<void> {
  await s3.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body }));
}

const packKeys = async (): Promise<string[]> =>
  [...(await objects()).keys()].filter((k) => /^enc\/packs\/[0-9a-f]{2}\/[0-9a-f]{32}\.pack$/.test(k)).sort();

async function toRaw(out: string): Promise<Buffer> {
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out]);
  return fs.readFileSync(out);
}

async function restoreEquals(m: ReturnType<typeof machine>, cp: string): Promise<void> {
  const out = path.join(work, `restore-${crypto.randomBytes(4).toString('hex')}.raw`);
  await m.ok(['restore', `${VM}@${cp}`, '--disk', 'vda', '--to', out]);
  assert.ok(fs.readFileSync(out).equals(refs[cp]!), `${VM}@${cp} restored byte for byte`);
  fs.rmSync(out);
}

async function mountEquals(m: ReturnType<typeof machine>, cp: string): Promise<void> {
  const mp = fs.mkdtempSync(path.join(work, 'mnt-'));
  await m.ok(['mount', `${VM}@${cp}`, mp]);
  try {
    assert.ok(
      fs.readFileSync(path.join(mp, 'vda.raw')).equals(refs[cp]!),
      `${VM}@${cp} mounted byte for byte`,
    );
  } finally {
    await unmount(m, mp);
  }
}

async function unmount(m: ReturnType<typeof machine>, mp: string): Promise<void> {
  const u = await m.run(['umount', mp]);
  if (u.code !== 0) await run('fusermount', ['-u', '-z', mp], { allowFail: true });
}

function oneLine(r: CliResult): void {
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-s3crypt-'));
  process.env.BKFS_RUN_DIR = path.join(work, 'run'); // mount state of the bkfs the tests start
  rgw = await startRgw();
  s3 = new S3Client({
    endpoint: rgw.endpoint,
    forcePathStyle: true,
    region: 'us-east-1',
    credentials: { accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey },
  });
  bucket = await rgw.bucket(`bkfs-s3crypt-${crypto.randomBytes(4).toString('hex')}`);
  url = `s3://${bucket}/${PREFIX}`;
  pwFile = path.join(work, 'pw');
  fs.writeFileSync(pwFile, 'offsite passphrase for s3crypt\n', { mode: 0o600 });
  // A 32 MiB disk: random data, guest text holding the marker, a repeated pattern, zeros.
  const raw = Buffer.alloc(32 * MiB);
  crypto.randomFillSync(raw, 0, 6 * MiB);
  Buffer.from(`${MARKER} some guest file text\n`.repeat(20000)).copy(raw, 8 * MiB);
  raw.fill(0x41, 20 * MiB, 24 * MiB);
  const rawFile = path.join(work, 'source.raw');
  fs.writeFileSync(rawFile, raw);
  img = path.join(work, 'source-disk-s3crypt.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawFile, img]);
  fs.rmSync(rawFile);
});

after(async () => {
  s3?.destroy();
  await rgw?.stop();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('encrypted repository in a bucket (Ceph RGW)', () => {
  let a: ReturnType<typeof machine>;
  let fresh: ReturnType<typeof machine>;

  it('init --encrypt -r s3:// puts only a key-less bkfs-repo.json (format 5) in the bucket', async () => {
    a = machine(path.join(work, 'cacheA'));
    const r = await a.ok(['init', '--encrypt']);
    assert.match(r.stderr, /WARNING: this repository is encrypted/);
    const m = /paper key[^\n]*\n\s+([0-9A-Z-]+)\n/.exec(r.stdout);
    assert.ok(m, r.stdout);
    master = fromPaperKey(m[1]!);
    assert.deepEqual([...(await objects()).keys()], [`${PREFIX}/bkfs-repo.json`]);
    const cfgBytes = await getObject(`${PREFIX}/bkfs-repo.json`);
    const cfg = JSON.parse(cfgBytes.toString('utf8')) as { format: number; encryption: { slots: unknown[] } };
    assert.equal(cfg.format, 5);
    assert.equal(cfg.encryption.slots.length, 1);
    const k = deriveKeys(master);
    for (const secret of [master, k.dataKey, k.idKey]) {
      for (const enc of ['hex', 'base64'] as const) {
        assert.equal(cfgBytes.indexOf(secret.toString(enc)), -1, 'no key in bkfs-repo.json');
      }
      assert.equal(cfgBytes.indexOf(secret), -1);
    }
  });

  it('full + incremental backups: mount and restore byte-identical at each checkpoint', async () => {
    const xml = path.join(work, 'domain.xml');
    fs.writeFileSync(xml, `<domain><name>${VM}</name><graphics passwd="${XML_MARKER}"/></domain>\n`);
    await a.ok([
      'backup',
      VM,
      '--disk',
      `vda=${img}`,
      '--config',
      `domain.xml=${xml}`,
      '-l',
      'full',
      '-c',
      CPS[0],
    ]);
    refs[CPS[0]] = await toRaw(path.join(work, 'ref0.raw'));
    const more = path.join(work, 'more.txt');
    fs.writeFileSync(more, Buffer.from(`${MARKER} written later\n`.repeat(4096)).subarray(0, MiB));
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `write -s ${more} ${12 * MiB} ${MiB}`,
      '-c',
      `write -P 0x5c ${2 * MiB} 64k`,
      img,
    ]);
    const b2 = JSON.parse(
      (await a.ok(['backup', VM, '--disk', `vda=${img}`, '-l', 'inc', '-c', CPS[1], '--json'])).stdout,
    ) as { level: string };
    assert.equal(b2.level, 'inc');
    refs[CPS[1]] = await toRaw(path.join(work, 'ref1.raw'));
    assert.ok(!refs[CPS[0]]!.equals(refs[CPS[1]]!));
    for (const cp of CPS) {
      await mountEquals(a, cp);
      await restoreEquals(a, cp);
    }
    assert.match((await a.ok(['verify'])).stdout, /no damage found/);
    // Sealed trailers are not unused bytes: with nothing forgotten, gc rewrites no pack.
    const g = JSON.parse((await a.ok(['gc', '--max-unused', '0', '--json'])).stdout) as {
      packsRewritten: number;
      packsKeptUnused: number;
    };
    assert.deepEqual([g.packsRewritten, g.packsKeptUnused], [0, 0]);
    const st = JSON.parse((await a.ok(['stats', '--json'])).stdout) as {
      repository: { reclaimableBytes: number };
    };
    assert.equal(st.repository.reclaimableBytes, 0);
  });

  it('no object in the bucket holds plaintext: data, domain XML, names, manifest JSON, chunk ids in hex', async () => {
    const all = await objects();
    const keys = [...all.keys()];
    const packs = keys.filter((k) => k.includes('/packs/'));
    const manifests = keys.filter((k) => k.includes('/manifests/'));
    assert.ok(packs.length >= 2, keys.join(' '));
    assert.equal(manifests.length, 2);
    const db = new Database(path.join(a.repoDir(), 'index.db'), { readonly: true });
    const ids = (db.prepare('SELECT hash FROM chunks').all() as { hash: Buffer }[]).map((r) =>
      r.hash.toString('hex'),
    );
    db.close();
    assert.ok(ids.length > 10);
    const forbidden = [
      MARKER,
      XML_MARKER,
      '<domain',
      VM,
      ...CPS,
      'source-disk-s3crypt',
      'bkfs-manifest',
      '"virtualSize"',
      '"checkpoint"',
      ...ids,
    ];
    for (const k of keys) {
      const b = await getObject(k);
      if (k === `${PREFIX}/bkfs-repo.json` || k === `${PREFIX}/lease.json`) {
        // The two plain objects: parameters and key slots; the writer lease.
        JSON.parse(b.toString('utf8'));
        for (const f of [MARKER, XML_MARKER, VM, ...CPS]) assert.equal(b.indexOf(f), -1, `${k} holds ${f}`);
        continue;
      }
      for (const f of forbidden) assert.equal(b.indexOf(f), -1, `${k} holds ${f.slice(0, 40)}`);
      assert.throws(() => JSON.parse(b.toString('utf8')) as unknown, SyntaxError, `${k} is not JSON`);
      if (manifests.includes(k)) {
        // A sealed object (version 1, kind 2 = manifest), not a zstd frame.
        assert.deepEqual([b[0], b[1]], [1, 2], `${k} is a sealed manifest`);
      } else {
        assert.equal(b.subarray(0, 8).toString('ascii'), 'BKFSPACK');
        assert.equal(b.readUInt32BE(8), PACK_VERSION_SEALED_TRAILER, `${k} has a sealed trailer`);
        assert.equal(b.readUInt32BE(12) & PACK_FLAG_SEALED, PACK_FLAG_SEALED);
        assert.ok(b.subarray(b.length - 8).equals(SEALED_TRAILER_MAGIC));
      }
    }
  });

  it('a new machine: no key -> 36, wrong passphrase -> 35, bucket unchanged; with the key the index is rebuilt from the sealed trailers', async () => {
    fresh = machine(path.join(work, 'cacheFresh'));
    const before = await objects();
    const none = await bkfs(['-r', url, 'repair', '--rebuild-index'], env(fresh.cacheDir));
    assert.equal(none.code, EXIT_CODES.KEY_REQUIRED, none.stderr);
    oneLine(none);
    const bad = path.join(work, 'bad-pw');
    fs.writeFileSync(bad, 'Offsite passphrase for s3crypt\n');
    const wrong = await fresh.run(['repair', '--rebuild-index'], { BKFS_PASSWORD_FILE: bad });
    assert.equal(wrong.code, EXIT_CODES.KEY_INVALID, wrong.stderr);
    oneLine(wrong);
    for (const args of [
      ['list'],
      ['restore', `${VM}@${CPS[1]}`, '--disk', 'vda', '--to', path.join(work, 'x.raw')],
    ]) {
      const n = await bkfs(['-r', url, ...args], env(fresh.cacheDir));
      assert.ok(
        n.code === EXIT_CODES.KEY_REQUIRED || n.code === EXIT_CODES.REPO_NOT_FOUND,
        `${args[0]}: ${n.code} ${n.stderr}`,
      );
    }
    assert.deepEqual(await objects(), before, 'the bucket is as it was');

    const stats = path.join(work, 'rebuild-stats.jsonl');
    const rb = JSON.parse(
      (await fresh.ok(['repair', '--rebuild-index', '--json'], { BKFS_S3_STATS: stats })).stdout,
    ) as {
      checkpoints: number;
      packs: number;
      problems: string[];
      remoteReads: { tailReads: number; wholeReads: number };
    };
    assert.equal(rb.checkpoints, 2);
    assert.deepEqual(rb.problems, []);
    assert.equal(rb.remoteReads.wholeReads, 0, 'every pack read by its sealed trailer');
    assert.equal(rb.remoteReads.tailReads, rb.packs);
    const packBytes = [...before].filter(([k]) => k.includes('/packs/')).reduce((s, [, o]) => s + o.size, 0);
    const fetched = fs
      .readFileSync(stats, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { bytesIn: number })
      .reduce((s, j) => s + j.bytesIn, 0);
    assert.ok(fetched > 0, 'BKFS_S3_STATS counted the bytes fetched');
    assert.ok(fetched * 10 < packBytes, `rebuild fetched ${fetched} bytes of ${packBytes} bytes of packs`);
    const la = JSON.parse((await a.ok(['list', '--json'])).stdout) as unknown[];
    const lb = JSON.parse((await fresh.ok(['list', '--json'])).stdout) as unknown[];
    assert.deepEqual(lb, la);
    for (const cp of CPS) await restoreEquals(fresh, cp);
  });

  it('a sealed trailer moved from another pack (footer forged to fit) does not open: the pack is scanned whole', async () => {
    const [ka, kb] = await packKeys();
    const pa = await getObject(ka!);
    const pb = await getObject(kb!);
    const footA = pa.subarray(pa.length - SEALED_TRAILER_FOOTER_LEN);
    const footB = pb.subarray(pb.length - SEALED_TRAILER_FOOTER_LEN);
    const endA = Number(footA.readBigUInt64BE(4));
    const sealedB = pb.subarray(
      pb.length - SEALED_TRAILER_FOOTER_LEN - footB.readUInt32BE(0),
      pb.length - SEALED_TRAILER_FOOTER_LEN,
    );
    // Pack A's records, then B's sealed trailer with a clear footer that fits A (length, end).
    const forgedFoot = Buffer.from(footB);
    forgedFoot.writeBigUInt64BE(BigInt(endA), 4);
    await putObject(ka!, Buffer.concat([pa.subarray(0, endA), sealedB, forgedFoot]));
    try {
      const m = machine(path.join(work, 'cacheMoved'));
      const rb = JSON.parse((await m.ok(['repair', '--rebuild-index', '--json'])).stdout) as {
        checkpoints: number;
        problems: string[];
        damagedCheckpoints: string[];
        remoteReads: { tailReads: number; wholeReads: number };
      };
      assert.equal(rb.checkpoints, 2);
      assert.equal(rb.remoteReads.wholeReads, 1, 'the pack with the foreign trailer is read whole');
      assert.equal(rb.problems.length, 1, rb.problems.join('\n'));
      assert.match(rb.problems[0]!, /authentication failed.*the whole pack is read instead/);
      assert.deepEqual(rb.damagedCheckpoints, []);
      for (const cp of CPS) await restoreEquals(m, cp);
    } finally {
      await putObject(ka!, pa);
    }
    assert.ok(PACK_HEADER_LEN < endA, 'pack A has records');
  });

  it('a version-2 pack (plain trailer, written before sealed trailers) still rebuilds by its trailer; a plain trailer on a version-3 pack is refused', async () => {
    const [ka] = await packKeys();
    const pa = await getObject(ka!);
    const name = path.basename(ka!, '.pack');
    const foot = pa.subarray(pa.length - SEALED_TRAILER_FOOTER_LEN);
    const end = Number(foot.readBigUInt64BE(4));
    // The plain trailer of the same records, from the sealed one opened with the key.
    const chunks = decodePackTrailer(pa.subarray(end), pa.length, undefined, {
      cipher: new Cipher(master),
      pack: name,
    });
    const plain = encodePackTrailer(chunks, end);
    const rebuild = async (cache: string) =>
      JSON.parse(
        (await machine(path.join(work, cache)).ok(['repair', '--rebuild-index', '--json'])).stdout,
      ) as {
        checkpoints: number;
        problems: string[];
        remoteReads: { tailReads: number; wholeReads: number };
      };
    try {
      const v2 = Buffer.concat([pa.subarray(0, end), plain]);
      v2.writeUInt32BE(PACK_VERSION_TRAILER, 8);
      await putObject(ka!, v2);
      const r2 = await rebuild('cacheV2');
      assert.deepEqual(r2.problems, []);
      assert.equal(r2.remoteReads.wholeReads, 0, 'the version-2 pack is read by its plain trailer');
      assert.equal(r2.checkpoints, 2);
      await putObject(ka!, Buffer.concat([pa.subarray(0, end), plain])); // header still version 3
      const r3 = await rebuild('cacheV3plain');
      assert.equal(r3.remoteReads.wholeReads, 1, 'a plain trailer on a version-3 pack is not taken');
      assert.equal(r3.problems.length, 1, r3.problems.join('\n'));
      assert.match(r3.problems[0]!, /not sealed in an encrypted repository/);
      assert.equal(r3.checkpoints, 2);
      for (const cp of CPS) await restoreEquals(machine(path.join(work, 'cacheV3plain')), cp);
    } finally {
      await putObject(ka!, pa);
    }
  });

  it('a flipped byte in a chunk record of a pack object: EIO in a mount, restore exit 15, verify reports it', async () => {
    const m = fresh;
    const repoDir = m.repoDir();
    const db = new Database(path.join(repoDir, 'index.db'), { readonly: true });
    const loc = db
      .prepare(
        `SELECT p.name AS pack, c.offset AS offset, c.stored_len AS storedLen,
                e.offset AS diskOffset, e.length AS length
           FROM checkpoints cp JOIN disks d ON d.checkpoint_id = cp.id
           JOIN disk_pages dp ON dp.disk_id = d.id JOIN extents e ON e.page_id = dp.page_id
           JOIN chunks c ON c.id = e.chunk_id JOIN packs p ON p.id = c.pack_id
          WHERE cp.name = ? ORDER BY c.id LIMIT 1`,
      )
      .get(CPS[1]) as { pack: string; offset: number; storedLen: number; diskOffset: number; length: number };
    db.close();
    assert.ok(loc, 'a chunk of the latest checkpoint');
    const key = `${PREFIX}/packs/${loc.pack.slice(0, 2)}/${loc.pack}.pack`;
    const body = await getObject(key);
    body[loc.offset + Math.floor(loc.storedLen / 2)]! ^= 0x20; // inside the sealed ciphertext
    await putObject(key, body);
    fs.rmSync(path.join(repoDir, 'chunk-cache'), { recursive: true, force: true });

    const mp = fs.mkdtempSync(path.join(work, 'mnt-'));
    await m.ok(['mount', `${VM}@${CPS[1]}`, mp]);
    try {
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      try {
        const buf = Buffer.alloc(4096);
        assert.throws(
          () => fs.readSync(fd, buf, 0, buf.length, loc.diskOffset),
          (e: NodeJS.ErrnoException) => e.code === 'EIO',
        );
        // Every other read returns the backed-up bytes or EIO, never other bytes.
        const ref = refs[CPS[1]]!;
        const piece = Buffer.alloc(64 * 1024);
        let eio = 0;
        for (let off = 0; off < ref.length; off += piece.length) {
          try {
            const n = fs.readSync(fd, piece, 0, piece.length, off);
            assert.ok(piece.subarray(0, n).equals(ref.subarray(off, off + n)), `bytes at ${off}`);
          } catch (e) {
            assert.equal((e as NodeJS.ErrnoException).code, 'EIO');
            eio++;
          }
        }
        assert.ok(eio >= 1 && eio * 64 * 1024 <= 2 * MiB, `${eio} pieces of 64 KiB gave EIO`);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      await unmount(m, mp);
    }
    const out = path.join(work, 'damaged.raw');
    const r = await m.run(['restore', `${VM}@${CPS[1]}`, '--disk', 'vda', '--to', out]);
    assert.equal(r.code, EXIT_CODES.DATA_DAMAGED, r.stderr);
    const v = await m.run(['verify', '--json']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stdout + v.stderr);
    const vj = JSON.parse(v.stdout) as { damaged: unknown[] };
    assert.equal(vj.damaged.length, 1, v.stdout);
    // The checkpoint that does not use that chunk still restores (the full one may share it).
    const l = JSON.parse((await m.ok(['list', '--json'])).stdout) as { name: string; damaged?: boolean }[];
    assert.ok(
      l.some((c) => c.name === CPS[1] && c.damaged),
      JSON.stringify(l),
    );
  });
});
