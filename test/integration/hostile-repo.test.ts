/**
 * A hostile or damaged repository through the real `bkfs` executable (issue 11 §6): index rows and
 * pack records whose lengths lie (a stored_len of 4 GiB), truncated packs and garbage manifests
 * give one-line errors with their exit codes (DATA_DAMAGED 15, VERIFY_FAILED 16) or a rebuild
 * that lists each problem, never a crash (exit 1), a hang or a huge allocation.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { compress } from 'zstd-napi';
import { bkfs, bkfsOk } from '../helpers/cli';
import { randomBuffer } from '../helpers/images';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { PACK_HEADER_LEN } from '../../src/store/packs';

const MiB = 1 << 20;
let work: string;
let repo: string;
let img: string;

function packFiles(dir: string): string[] {
  const out: string[] = [];
  const packs = path.join(dir, 'packs');
  for (const d of fs.readdirSync(packs))
    for (const f of fs.readdirSync(path.join(packs, d))) out.push(path.join(packs, d, f));
  return out;
}

function copyRepo(name: string): string {
  const dst = path.join(work, name);
  fs.cpSync(repo, dst, { recursive: true });
  return dst;
}

describe('hostile repository files through the CLI', () => {
  before(async () => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-hostile-repo-'));
    repo = path.join(work, 'repo');
    img = path.join(work, 'disk.raw');
    const data = Buffer.alloc(4 * MiB);
    randomBuffer(5, MiB).copy(data, 0);
    Buffer.from('compressible '.repeat(80000)).copy(data, 2 * MiB);
    fs.writeFileSync(img, data);
    await bkfsOk(['-r', repo, 'init', '--chunk-size', '65536']);
    await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
  });
  after(() => {
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('an index row with a stored_len of 4 GiB: restore fails DATA_DAMAGED, verify reports it', async () => {
    const r = copyRepo('lying-index');
    const db = new Database(path.join(r, 'index.db'));
    db.prepare('UPDATE chunks SET stored_len = 4294967295 WHERE id = (SELECT MIN(id) FROM chunks)').run();
    db.prepare('UPDATE chunks SET raw_len = 4294967295 WHERE id = (SELECT MAX(id) FROM chunks)').run();
    db.close();
    const out = path.join(work, 'lying.raw');
    const res = await bkfs(['-r', r, 'restore', 'vm', '--disk', 'vda', '--to', out]);
    assert.equal(res.code, EXIT_CODES.DATA_DAMAGED, res.stderr);
    assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
    const v = await bkfs(['-r', r, 'verify']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stderr + v.stdout);
  });

  it('a truncated pack: restore fails DATA_DAMAGED, verify reports it', async () => {
    const r = copyRepo('truncated');
    const p = packFiles(r)[0]!;
    fs.truncateSync(p, Math.floor(fs.statSync(p).size / 2));
    const res = await bkfs(['-r', r, 'restore', 'vm', '--disk', 'vda', '--to', path.join(work, 'trunc.raw')]);
    assert.equal(res.code, EXIT_CODES.DATA_DAMAGED, res.stderr);
    const v = await bkfs(['-r', r, 'verify']);
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stderr + v.stdout);
  });

  it('a pack record claiming 4 GiB and garbage manifests: the index rebuild lists each problem and finishes', async () => {
    const r = copyRepo('rebuild');
    // The first record of the first pack claims a stored_len of 4 GiB.
    const p = packFiles(r)[0]!;
    const fd = fs.openSync(p, 'r+');
    const h = Buffer.alloc(4);
    h.writeUInt32BE(0xffffffff, 0);
    fs.writeSync(fd, h, 0, 4, PACK_HEADER_LEN + 12); // stored_len of the first record
    fs.closeSync(fd);
    // Garbage manifests next to the real one.
    const mdir = path.join(r, 'manifests');
    const fake = (n: number): string => path.join(mdir, `${String(n).repeat(32)}.json.zst`);
    fs.writeFileSync(fake(1), Buffer.from('not zstd at all'));
    fs.writeFileSync(
      fake(2),
      compress(
        Buffer.from(
          JSON.stringify({ magic: 'bkfs-manifest', version: 1, checkpoint: { uid: 'x' }, disks: [] }),
        ),
      ),
    );
    fs.writeFileSync(fake(3), compress(Buffer.from('{"magic": "bkfs-manifest", "version": 1, "vm": 7')));
    const res = await bkfs(['-r', r, 'repair', '--rebuild-index']);
    assert.equal(res.code, 0, res.stderr + res.stdout);
    const all = res.stdout + res.stderr;
    assert.match(all, /damaged record header at 16/);
    assert.equal(
      (all.match(/problem: manifest .* is damaged|problem: .* is not a bkfs manifest/g) ?? []).length,
      3,
      all,
    );
    // The checkpoint is still listed (as damaged: its first chunks are gone with the pack's rest).
    const ls = await bkfsOk(['-r', r, 'list', 'vm']);
    assert.match(ls.stdout, /check1/);
    const rest = await bkfs([
      '-r',
      r,
      'restore',
      'vm',
      '--disk',
      'vda',
      '--to',
      path.join(work, 'rebuilt.raw'),
    ]);
    assert.equal(rest.code, EXIT_CODES.DATA_DAMAGED, rest.stderr);
  });
});
