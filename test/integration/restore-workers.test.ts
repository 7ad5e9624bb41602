/**
 * Whole-disk restore with chunks decoded in worker threads (src/restore/decode-pool.ts), against
 * real qemu-img / qemu-io and a real repository: a disk with random data, compressible text, one
 * chunk repeated many times (served from the decoded-chunk cache), explicit zeros, discards, small
 * unaligned writes and holes, backed up over three checkpoints. Every checkpoint restored with the
 * worker pool is byte-identical to `qemu-img convert` of the source at that checkpoint and to a
 * restore decoding on the main thread (BKFS_RESTORE_WORKERS=0); holes and zeroed ranges stay holes;
 * a damaged chunk fails the restore with DATA_DAMAGED (exit 15) and no final file; kill -9 in the
 * middle of a restore leaves no final file.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BKFS, bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { randomBuffer, textFile, toRaw } from '../helpers/images';
import { Repository } from '../../src/repo/repository';
import { packPath } from '../../src/store/packs';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const SIZE = 64 * MiB;
const POOL = { BKFS_RESTORE_WORKERS: '2' };
const MAIN = { BKFS_RESTORE_WORKERS: '0' };
let work: string;
let repo: string;
let img: string;
/** refs[i]: raw image of the source at check(i+1). */
const refs: string[] = [];

/** Data ranges of a raw file, from `qemu-img map` (SEEK_DATA/SEEK_HOLE): [start, end) pairs. */
async function dataRanges(file: string): Promise<[number, number][]> {
  const r = await run('qemu-img', ['map', '--output=json', '-f', 'raw', file]);
  const map = JSON.parse(r.stdout) as { start: number; length: number; data: boolean }[];
  return map.filter((m) => m.data).map((m) => [m.start, m.start + m.length]);
}

function overlaps(ranges: [number, number][], s: number, e: number): boolean {
  return ranges.some(([a, b]) => a < e && s < b);
}

async function same(a: string, b: string): Promise<void> {
  const r = await run('cmp', [a, b], { allowFail: true });
  assert.equal(r.code, 0, `cmp ${a} ${b}: ${r.stdout}${r.stderr}`);
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-restoreworkers-test-'));
  repo = path.join(work, 'repo');
  img = path.join(work, 'vda.qcow2');
  const rnd = path.join(work, 'random.bin');
  const txt = path.join(work, 'text.bin');
  fs.writeFileSync(rnd, randomBuffer(71, 8 * MiB));
  fs.writeFileSync(txt, textFile(72, 8 * MiB).subarray(0, 8 * MiB));
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(SIZE)]);
  // check1: random 0-8M, text 8-16M, one repeated chunk pattern 16-24M, hole 24-32M, random
  // 32-40M, text 40-48M, hole 48-64M but for small unaligned writes.
  await qemuIo(
    img,
    'qcow2',
    `write -s ${rnd} 0 8M`,
    `write -s ${txt} 8M 8M`,
    'write -P 0x5a 16M 8M',
    `write -s ${rnd} 32M 8M`,
    `write -s ${txt} 40M 8M`,
    'write -P 0x33 50M 4k',
    'write -P 0x34 53M 12k',
  );
  await bkfsOk(['-r', repo, 'init']);
  await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
  refs.push(path.join(work, 'ref1.raw'));
  await toRaw(img, refs[0]!);
  // check2: 32-40M becomes zeros, new data over part of the pattern and in a hole.
  await qemuIo(img, 'qcow2', 'write -z 32M 8M', 'write -P 0x77 20M 1M', `write -s ${rnd} 26M 512k`);
  await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'inc']);
  refs.push(path.join(work, 'ref2.raw'));
  await toRaw(img, refs[1]!);
  // check3: part of the text discarded, a small write near the end.
  await qemuIo(img, 'qcow2', 'discard 40M 4M', 'write -P 0x11 60M 64k', 'write -z 0 1M');
  await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'inc']);
  refs.push(path.join(work, 'ref3.raw'));
  await toRaw(img, refs[2]!);
});

after(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('restore with chunks decoded in worker threads', () => {
  it('every checkpoint is byte-identical to the source and to a main-thread restore', async () => {
    for (let i = 0; i < refs.length; i++) {
      const viaPool = path.join(work, `pool-${i + 1}.raw`);
      const viaMain = path.join(work, `main-${i + 1}.raw`);
      await bkfsOk(['-r', repo, 'restore', `vm@check${i + 1}`, '--disk', 'vda', '--to', viaPool], POOL);
      await bkfsOk(['-r', repo, 'restore', `vm@check${i + 1}`, '--disk', 'vda', '--to', viaMain], MAIN);
      await same(refs[i]!, viaPool);
      await same(viaMain, viaPool);
      assert.equal(fs.statSync(viaPool).size, SIZE);
      assert.equal(fs.statSync(viaPool).mode & 0o777, 0o600);
      assert.ok(!fs.existsSync(`${viaPool}.bkfs-partial`));
    }
  });

  it('a whole-VM restore into a directory and an incremental restore use the pool too', async () => {
    const dir = path.join(work, 'vmdir');
    await bkfsOk(['-r', repo, 'restore', 'vm@check1', '--to', dir], POOL);
    await same(refs[0]!, path.join(dir, 'vda.raw'));
    await bkfsOk(['-r', repo, 'restore', 'vm@check3', '--to', dir, '--since', 'vm@check1'], POOL);
    await same(refs[2]!, path.join(dir, 'vda.raw'));
  });

  it('holes and zeroed ranges stay holes', async () => {
    const f = path.join(work, 'holes.raw');
    await bkfsOk(['-r', repo, 'restore', 'vm@check3', '--disk', 'vda', '--to', f], POOL);
    await same(refs[2]!, f);
    const data = await dataRanges(f);
    // Never written, zeroed (write -z), discarded: no data blocks.
    for (const [s, e] of [
      [0, 1 * MiB], // write -z in check3
      [24 * MiB, 26 * MiB],
      [27 * MiB, 32 * MiB],
      [32 * MiB, 40 * MiB], // write -z in check2
      [40 * MiB, 44 * MiB], // discarded in check3
      [48 * MiB, 50 * MiB],
      [54 * MiB, 60 * MiB],
      [61 * MiB, 64 * MiB],
    ] as [number, number][]) {
      assert.ok(!overlaps(data, s, e), `[${s / MiB}M, ${e / MiB}M) has data blocks: ${JSON.stringify(data)}`);
    }
    for (const [s, e] of [
      [1 * MiB, 8 * MiB],
      [8 * MiB, 16 * MiB],
      [16 * MiB, 24 * MiB],
      [26 * MiB, 26 * MiB + 512 * 1024],
      [44 * MiB, 48 * MiB],
      [60 * MiB, 60 * MiB + 65536],
    ] as [number, number][]) {
      assert.ok(overlaps(data, s, e), `[${s / MiB}M, ${e / MiB}M) has no data blocks`);
    }
    // Allocated space: the data written, not the disk's size (the written ranges above add to
    // about 34.6 MiB; allow file system rounding).
    const allocated = fs.statSync(f).blocks * 512;
    assert.ok(allocated < 37 * MiB, `${allocated} bytes allocated`);
  });

  it('a damaged chunk fails the restore with DATA_DAMAGED and leaves no final file', async () => {
    const copy = path.join(work, 'repo-damaged');
    fs.cpSync(repo, copy, { recursive: true });
    // One byte flipped in the middle of a compressed chunk that check1 uses (text at 8-16M).
    const r0 = Repository.open(copy);
    let chunk: { pack: string; offset: number; storedLen: number; hash: Buffer };
    try {
      chunk = r0.db
        .prepare(
          `SELECT p.name AS pack, c.offset AS offset, c.stored_len AS storedLen, c.hash AS hash
             FROM chunks c JOIN packs p ON p.id = c.pack_id
            WHERE c.codec <> 0 AND c.raw_len > c.stored_len * 2 ORDER BY c.id LIMIT 1`,
        )
        .get() as typeof chunk;
    } finally {
      r0.close();
    }
    assert.ok(chunk, 'the repository has a compressed chunk');
    const pf = packPath(copy, chunk.pack);
    const fd = fs.openSync(pf, 'r+');
    const at = chunk.offset + Math.floor(chunk.storedLen / 2);
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, at);
    b[0] = b[0]! ^ 0x40;
    fs.writeSync(fd, b, 0, 1, at);
    fs.closeSync(fd);
    for (const env of [POOL, MAIN]) {
      const f = path.join(work, `damaged-${env.BKFS_RESTORE_WORKERS}.raw`);
      const r = await bkfs(['-r', copy, 'restore', 'vm@check1', '--disk', 'vda', '--to', f], env);
      assert.equal(r.code, EXIT_CODES.DATA_DAMAGED, r.stderr);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.match(r.stderr, new RegExp(`chunk ${chunk.hash.toString('hex').slice(0, 16)}`));
      assert.ok(!fs.existsSync(f), 'no final file');
    }
  });

  it('kill -9 during the restore leaves no final file; the next restore replaces the partial one', async () => {
    const f = path.join(work, 'killed.raw');
    const partial = `${f}.bkfs-partial`;
    const child = spawn(
      process.execPath,
      [BKFS, '-r', repo, 'restore', 'vm@check1', '--disk', 'vda', '--to', f, '--concurrency', '1'],
      { env: { ...process.env, CI: 'true', ...POOL }, stdio: 'ignore' },
    );
    const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
    // Kill it as soon as the first data block is in the partial file.
    const deadline = Date.now() + 30_000;
    let started = false;
    while (Date.now() < deadline && child.exitCode === null) {
      try {
        if (fs.statSync(partial).blocks > 0) {
          started = true;
          break;
        }
      } catch {
        // not created yet
      }
      await new Promise((r) => setImmediate(r));
    }
    child.kill('SIGKILL');
    await exited;
    assert.ok(started, 'the restore started writing before it was killed');
    assert.equal(child.signalCode, 'SIGKILL', 'the restore was still running when killed');
    assert.ok(!fs.existsSync(f), 'no final file after kill -9');
    assert.ok(fs.existsSync(partial), 'the partial file is left, clearly named');
    await bkfsOk(['-r', repo, 'restore', 'vm@check1', '--disk', 'vda', '--to', f], POOL);
    await same(refs[0]!, f);
    assert.ok(!fs.existsSync(partial));
  });
});
