/**
 * The child processes on a backup's path (issue 16, start-up): `bkfs backup --disk vda=IMAGE.qcow2`
 * runs one `qemu-img info` (started before the repository opens), one `qemu-img bitmap --add` and
 * one `qemu-nbd`; a full backup that ends a chain removes the chain's bitmaps without listing them
 * again. The real qemu-img and qemu-nbd run behind logging wrappers put first on PATH; every
 * checkpoint is compared with the image byte for byte.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfsOk, qemuIo } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { toRaw } from '../helpers/images';
import { run } from '../../src/util/proc';

let work: string;
let shims: string;
let log: string;

function which(cmd: string): string {
  for (const d of (process.env.PATH ?? '').split(':')) {
    const f = path.join(d, cmd);
    if (fs.existsSync(f)) return f;
  }
  throw new Error(`${cmd} not found on PATH: install qemu-utils`);
}

before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-speed-children-'));
  shims = path.join(work, 'bin');
  log = path.join(work, 'children.log');
  fs.mkdirSync(shims);
  for (const cmd of ['qemu-img', 'qemu-nbd']) {
    const real = which(cmd);
    fs.writeFileSync(
      path.join(shims, cmd),
      `#!/bin/sh\necho "${cmd} $1 $2" >> '${log}'\nexec '${real}' "$@"\n`,
      { mode: 0o700 },
    );
  }
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

/** The children a `bkfs backup` ran (first two words of each command line), and clears the log. */
function children(): string[] {
  const lines = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').trim().split('\n') : [];
  fs.rmSync(log, { force: true });
  return lines.map((l) => l.replace(/^(qemu-nbd) .*/, '$1').replace(/^(qemu-img \S+) .*/, '$1'));
}

async function bitmaps(img: string): Promise<string[]> {
  const j = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout) as {
    'format-specific'?: { data?: { bitmaps?: { name: string }[] } };
  };
  return (j['format-specific']?.data?.bitmaps ?? []).map((b) => b.name);
}

describe('child processes of bkfs backup', () => {
  it('full, inc, full: one qemu-img info each, the new chain drops the old bitmaps; every checkpoint exact', async () => {
    const img = path.join(work, 'web.qcow2');
    const repo = path.join(work, 'r');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    await qemuIo(img, 'qcow2', 'write -P 0x21 0 6M', 'write -P 0x22 20M 2M');
    await bkfsOk(['-r', repo, 'init']);
    const env = { PATH: `${shims}:${process.env.PATH ?? ''}` };
    const backup = async (level: string, name: string) => {
      await bkfsOk(
        ['-r', repo, 'backup', 'web', '-d', `vda=${img}`, '--level', level, '--checkpoint', name],
        env,
      );
      const raw = path.join(work, `${name}.raw`);
      await toRaw(img, raw);
      await assertCheckpointEquals(repo, `web@${name}`, 'vda', raw, 20);
    };

    await backup('full', 'f1');
    assert.deepEqual(children(), ['qemu-img info', 'qemu-img bitmap', 'qemu-nbd']);
    assert.equal((await bitmaps(img)).length, 1);

    await qemuIo(img, 'qcow2', 'write -P 0x23 1M 1M');
    await backup('inc', 'i1');
    assert.deepEqual(children(), ['qemu-img info', 'qemu-img bitmap', 'qemu-nbd']);
    const chain = await bitmaps(img);
    assert.equal(chain.length, 2);

    // A new full: its own bitmap stays, the two of the old chain go, with no second qemu-img info.
    await qemuIo(img, 'qcow2', 'write -P 0x24 3M 1M');
    await backup('full', 'f2');
    assert.deepEqual(children(), [
      'qemu-img info',
      'qemu-img bitmap',
      'qemu-nbd',
      'qemu-img bitmap',
      'qemu-img bitmap',
    ]);
    const left = await bitmaps(img);
    assert.equal(left.length, 1);
    assert.ok(!chain.includes(left[0]!));
  });
});
