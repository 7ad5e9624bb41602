/**
 * A repository copied with `cp -a` and both copies backing up the same qcow2 image (issue 17.1):
 * each copy names its bitmaps after its own checkpoints' uids, so neither resets or reuses the
 * other's, and every checkpoint of both equals the image byte for byte at the time it was taken.
 * Real qemu-img/qemu-io/qemu-nbd and SQLite.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { toRaw } from '../helpers/images';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';
import Database from 'better-sqlite3';

let work: string;
before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-firsthour-copy-'));
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

async function bitmaps(img: string): Promise<string[]> {
  const j = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout) as {
    'format-specific'?: { data?: { bitmaps?: { name: string }[] } };
  };
  return (j['format-specific']?.data?.bitmaps ?? []).map((b) => b.name);
}

async function listJson(repo: string, vm: string): Promise<{ name: string; level: string }[]> {
  return JSON.parse((await bkfsOk(['-r', repo, 'list', vm, '--json'])).stdout) as {
    name: string;
    level: string;
  }[];
}

describe('a copied repository backing up the same image as the original', () => {
  it('alternating backups of r1 and its copy: every checkpoint equals the image byte for byte', async () => {
    const img = path.join(work, 'web.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await qemuIo(img, 'qcow2', 'write -P 0x11 0 8M', 'write -P 0x12 16M 4M');
    const r1 = path.join(work, 'r1');
    const r1c = path.join(work, 'r1-copy');
    await bkfsOk(['-r', r1, 'init']);
    await bkfsOk(['-r', r1, 'backup', 'web', '-d', `vda=${img}`]);
    await run('cp', ['-a', r1, r1c]);

    const checks: { repo: string; ref: string; raw: string }[] = [];
    const snap = async (repo: string, tag: string) => {
      const cps = await listJson(repo, 'web');
      const last = cps[cps.length - 1]!;
      const raw = path.join(work, `${tag}.raw`);
      await toRaw(img, raw);
      checks.push({ repo, ref: `web@${last.name}`, raw });
      // Checked at once too: a later backup must not be what makes an earlier one right.
      await assertCheckpointEquals(repo, `web@${last.name}`, 'vda', raw, 20);
      return last;
    };
    for (let i = 0; i < 3; i++) {
      // Distinct offsets per round, so a missed write shows up as a difference.
      await qemuIo(img, 'qcow2', `write -P ${0x20 + i} ${i * 2 + 1}M 256k`);
      await bkfsOk(['-r', r1c, 'backup', 'web', '-d', `vda=${img}`]);
      const c = await snap(r1c, `copy${i}`);
      await qemuIo(img, 'qcow2', `write -P ${0x30 + i} ${i * 2 + 20}M 256k`);
      await bkfsOk(['-r', r1, 'backup', 'web', '-d', `vda=${img}`]);
      const o = await snap(r1, `orig${i}`);
      // Still incrementals: sharing the image costs neither copy its chain.
      assert.equal(c.level, 'inc', `copy round ${i}`);
      assert.equal(o.level, 'inc', `original round ${i}`);
    }
    for (const c of checks) await assertCheckpointEquals(c.repo, c.ref, 'vda', c.raw);
    // The original backed up last: its latest checkpoint is the image as it is now.
    const v = await bkfs(['-r', r1, 'verify', 'web', '--source']);
    assert.equal(v.code, 0, `${v.stdout}${v.stderr}`);

    // A new full in the copy removes the bitmaps the copy knows (also the shared check1's) but
    // never the original's own: the original's next inc still reads its own latest bitmap.
    const before = await bitmaps(img);
    await bkfsOk(['-r', r1c, 'backup', 'web', '-d', `vda=${img}`, '-l', 'full']);
    const afterFull = await bitmaps(img);
    assert.ok(afterFull.length < before.length, `${before} -> ${afterFull}`);
    await qemuIo(img, 'qcow2', 'write -P 0x44 30M 64k');
    await bkfsOk(['-r', r1, 'backup', 'web', '-d', `vda=${img}`, '-l', 'inc']);
    await snap(r1, 'orig-after-copy-full');
    // And the copy's next inc builds on its own new full.
    await qemuIo(img, 'qcow2', 'write -P 0x45 31M 64k');
    await bkfsOk(['-r', r1c, 'backup', 'web', '-d', `vda=${img}`, '-l', 'inc']);
    await snap(r1c, 'copy-after-full');
  });

  it('a parent bitmap re-created after a newer one of ours breaks the chain: diff exits 12', async () => {
    const img = path.join(work, 'diff.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    await qemuIo(img, 'qcow2', 'write -P 0x11 0 4M');
    const repo = path.join(work, 'rdiff');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'db', '-d', `vda=${img}`]);
    await qemuIo(img, 'qcow2', 'write -P 0x12 4M 1M');
    await bkfsOk(['-r', repo, 'backup', 'db', '-d', `vda=${img}`, '-l', 'inc']);
    const [full] = await bitmaps(img);
    assert.ok(full, 'the full recorded a bitmap');
    // What a second writer with the same bitmap name would do: remove and add it again (empty).
    await run('qemu-img', ['bitmap', '--remove', img, full]);
    await run('qemu-img', ['bitmap', '--add', '--enable', img, full]);
    await qemuIo(img, 'qcow2', 'write -P 0x13 8M 1M');
    const r = await bkfs(['-r', repo, 'backup', 'db', '-d', `vda=${img}`, '-l', 'diff']);
    assert.equal(r.code, EXIT_CODES.CHAIN_BROKEN, r.stderr);
    assert.match(r.stderr, /was created again after/);
    // An inc reads check2's bitmap, which nobody touched.
    const a = await bkfsOk(['-r', repo, 'backup', 'db', '-d', `vda=${img}`, '-l', 'auto']);
    assert.match(a.stdout, /db@check3: inc/);
    const raw = path.join(work, 'diff.raw');
    await toRaw(img, raw);
    await assertCheckpointEquals(repo, 'db@check3', 'vda', raw);
  });

  it('a bitmap recorded under a name every copy shares (older bkfs) is not trusted', async () => {
    const img = path.join(work, 'legacy.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    const repo = path.join(work, 'rlegacy');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'old', '-d', `vda=${img}`]);
    // Rename the recorded bitmap to the old scheme bkfs-<repo id>-<checkpoint>, as bkfs 0.1 did.
    const id = (JSON.parse(fs.readFileSync(path.join(repo, 'bkfs-repo.json'), 'utf8')) as { id: string }).id;
    const [cur] = await bitmaps(img);
    const legacy = `bkfs-${id}-check1`;
    await run('qemu-img', ['bitmap', '--remove', img, cur!]);
    await run('qemu-img', ['bitmap', '--add', '--enable', img, legacy]);
    const db = new Database(path.join(repo, 'index.db'));
    db.prepare('UPDATE disks SET bitmap = ?').run(legacy);
    db.close();
    const r = await bkfs(['-r', repo, 'backup', 'old', '-d', `vda=${img}`, '-l', 'inc']);
    assert.equal(r.code, EXIT_CODES.CHAIN_BROKEN, r.stderr);
    assert.match(r.stderr, /older bkfs/);
    await bkfsOk(['-r', repo, 'backup', 'old', '-d', `vda=${img}`]);
    // The new full removed the legacy bitmap of this repository.
    assert.ok(!(await bitmaps(img)).includes(legacy));
  });
});
