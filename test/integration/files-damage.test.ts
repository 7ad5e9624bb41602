/**
 * File-level restore over damaged stored data: the guest filesystem engine only sees an NBD I/O
 * error, but `bkfs cat`/`cp` must say what it was — DATA_DAMAGED (exit 15) naming the disk range —
 * and never print other bytes. The damage is real: the chunk row behind the file's data is deleted
 * from a copy of the index, as a bad disk or a bug would leave it.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { bkfs, bkfsOk } from '../helpers/cli';
import { makeDisk, randomBuffer, toRaw } from '../helpers/images';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';

const MiB = 1024 * 1024;
let work = '';
let repo = '';
let content: Buffer;

before(async () => {
  if (process.getuid?.() !== 0) throw new Error('files-damage tests need root (loop devices, mount)');
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-files-damage-'));
  content = randomBuffer(4242, 2 * MiB);
  const img = path.join(work, 'web.qcow2');
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 48,
    table: 'gpt',
    seed: 23,
    // The filler pushes the file's data past the first 16 MiB map page, which holds the partition
    // table and the filesystem's metadata: only the file's own page is damaged below.
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 40,
        label: 'root',
        files: [
          { path: 'aa/filler.bin', content: randomBuffer(99, 20 * MiB) },
          { path: 'srv/data.bin', content },
        ],
      },
    ],
  });
  repo = path.join(work, 'repo');
  await bkfsOk(['-r', repo, 'init']);
  await bkfsOk(['-r', repo, 'backup', 'web', '-d', `vda=${img}`, '--checkpoint', 'check1']);
  // Where the file's bytes lie on the disk (ext4 keeps a 2 MiB file in one extent here).
  const raw = path.join(work, 'web.raw');
  await toRaw(img, raw);
  const at = fs.readFileSync(raw).indexOf(content.subarray(0, 64 * 1024));
  assert.ok(at >= 16 * MiB, `the file content is on the disk, past the first map page (at ${at})`);
  fs.writeFileSync(path.join(work, 'offset'), String(at));
});

after(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('file-level restore over damaged data', () => {
  it('cp of an intact checkpoint gives the file; a lost chunk row makes cat and cp exit 15', async () => {
    const env = { BKFS_FILES_ENGINE: 'kernel' };
    const good = path.join(work, 'good.bin');
    await bkfsOk(['-r', repo, 'cp', 'web@check1:/srv/data.bin', good], env);
    assert.ok(fs.readFileSync(good).equals(content), 'the intact checkpoint gives the file');

    const copy = path.join(work, 'copy');
    await run('cp', ['-a', repo, copy]);
    const offset = Number(fs.readFileSync(path.join(work, 'offset'), 'utf8')) + 512 * 1024;
    const db = new Database(path.join(copy, 'index.db'));
    try {
      const row = db
        .prepare(
          `SELECT e.chunk_id AS chunk FROM extents e
             JOIN disk_pages dp ON dp.page_id = e.page_id
             JOIN disks d ON d.id = dp.disk_id
            WHERE d.name = 'vda' AND e.chunk_id IS NOT NULL AND e.offset <= ? AND e.offset + e.length > ?`,
        )
        .get(offset, offset) as { chunk: number } | undefined;
      assert.ok(row, 'an extent holds the file data');
      db.prepare('DELETE FROM chunks WHERE id = ?').run(row.chunk);
    } finally {
      db.close();
    }
    for (const args of [
      ['cat', 'web@check1:/srv/data.bin'],
      ['cp', 'web@check1:/srv/data.bin', path.join(work, 'out.bin')],
    ]) {
      const res = await bkfs(['-r', copy, ...args], env);
      assert.equal(res.code, EXIT_CODES.DATA_DAMAGED, `${args[0]}: ${res.stderr}`);
      assert.match(res.stderr, /damaged/, res.stderr);
      assert.match(res.stderr, /bytes \d+-\d+/, 'the message names the disk range');
    }
    assert.ok(!fs.existsSync(path.join(work, 'out.bin')), 'cp leaves no target behind');
  });
});
