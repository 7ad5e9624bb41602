/**
 * Power loss: real `bkfs` processes run backup (init + full, inc), forget, gc (dead-pack deletion
 * and pack rewriting), `repair --rebuild-index` and verify's healing with the repository on powerfs
 * (test/helpers/powerfs.ts, a FUSE layer that keeps only what was fsynced); the power is cut at
 * fsync boundaries and at seeded random points, the command is SIGKILLed, and the repository must
 * then open, verify clean, hold every committed checkpoint byte for byte, and take a new backup
 * (test/helpers/powerloss.ts). kill -9 alone keeps the page cache and could not find these bugs.
 *
 * `make test` runs a short sample (a few fsync boundaries per scenario); `make test-faults`
 * (BKFS_POWERLOSS=full) cuts at every fsync boundary plus more random points and prints the count.
 * Needs root, /dev/fuse, libfuse2, qemu-utils (scripts/setup.sh).
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { randomBuffer, toRaw } from '../helpers/images';
import { PowerFs } from '../helpers/powerfs';
import { sweep, type CutOutcome, type Scenario } from '../helpers/powerloss';
import { packFilesOnDisk } from '../helpers/packfiles';
import { packPath, PACK_HEADER_LEN, RECORD_HEADER_LEN } from '../../src/store/packs';
import { run } from '../../src/util/proc';

const FULL = process.env.BKFS_POWERLOSS === 'full';
const SWEEP = FULL ? { randomPoints: 8, seed: 11 } : { maxFsyncPoints: 1, randomPoints: 1, seed: 11 };
const MiB = 1 << 20;
let work: string;
const tally = { cuts: 0, byScenario: new Map<string, number>() };

before(() => {
  assert.ok(fs.existsSync('/dev/fuse'), 'the power-loss suite needs /dev/fuse (run scripts/setup.sh)');
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-durable-powerloss-'));
});
after(async () => {
  await PowerFs.killAll();
  fs.rmSync(work, { recursive: true, force: true });
  const per = [...tally.byScenario].map(([k, v]) => `${k} ${v}`).join(', ');
  console.log(`power-loss: ${tally.cuts} cut points tried (${per}), 0 losses`);
});

function count(sc: string): (o: CutOutcome) => void {
  return (o) => {
    if (FULL) console.log(`power-loss: ${sc}: cut at ${o.point ?? '?'}: ok (${tally.cuts + 1} so far)`);
    tally.cuts++;
    tally.byScenario.set(sc, (tally.byScenario.get(sc) ?? 0) + 1);
  };
}

/** A qcow2 image with random data written at `writes` ([seed, offset MiB, length MiB]). */
async function image(file: string, writes: [number, number, number][]): Promise<void> {
  if (!fs.existsSync(file)) await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, '24M']);
  await write(file, writes);
}

async function write(file: string, writes: [number, number, number][]): Promise<void> {
  for (const [seed, off, len] of writes) {
    const data = path.join(path.dirname(file), `data-${seed}-${len}`);
    fs.writeFileSync(data, randomBuffer(seed, len * MiB));
    await qemuIo(file, 'qcow2', `write -s ${data} ${off}M ${len * MiB}`);
    fs.rmSync(data);
  }
}

/** Make a template dir with an image and (optionally) an initialized repository. */
function template(name: string): { dir: string; repo: string; img: string } {
  const dir = path.join(work, `tpl-${name}`);
  fs.mkdirSync(path.join(dir, 'repo'), { recursive: true });
  return { dir, repo: path.join(dir, 'repo'), img: path.join(dir, 'vda.qcow2') };
}

async function ref(img: string, name: string): Promise<string> {
  const raw = path.join(path.dirname(img), `${name}.raw`);
  await toRaw(img, raw);
  return raw;
}

async function backupVm(repo: string, vm: string, cp: string, img: string, level = 'auto'): Promise<void> {
  await bkfsOk(['-r', repo, 'backup', vm, '-c', cp, '--disk', `vda=${img}`, '--level', level]);
}

describe('power loss: every committed checkpoint survives a power cut at any point', () => {
  it('init + full backup', async () => {
    const t = template('full');
    await image(t.img, [
      [1, 0, 4],
      [2, 8, 2],
    ]);
    const sc: Scenario = {
      name: 'full',
      template: t.dir,
      commands: [['init'], ['backup', 'vm', '-c', 'c1', '--level', 'full', '--disk', 'vda=$RUN/vda.qcow2']],
      refs: new Map([['vm@c1', { image: 'vda.qcow2', raw: await ref(t.img, 'c1') }]]),
      keep: [],
      creates: new Map([[1, ['vm@c1']]]),
      after: { vm: 'vm', image: 'vda.qcow2' },
    };
    await sweep(sc, work, { ...SWEEP, onCut: count('full') });
  });

  it('incremental backup', async () => {
    const t = template('inc');
    await image(t.img, [
      [1, 0, 4],
      [2, 8, 2],
    ]);
    await bkfsOk(['-r', t.repo, 'init']);
    await backupVm(t.repo, 'vm', 'c1', t.img, 'full');
    const c1 = await ref(t.img, 'c1');
    await write(t.img, [
      [3, 2, 1],
      [4, 12, 1],
    ]);
    const sc: Scenario = {
      name: 'inc',
      template: t.dir,
      commands: [['backup', 'vm', '-c', 'c2', '--level', 'inc', '--disk', 'vda=$RUN/vda.qcow2']],
      refs: new Map([
        ['vm@c1', { image: 'vda.qcow2', raw: c1 }],
        ['vm@c2', { image: 'vda.qcow2', raw: await ref(t.img, 'c2') }],
      ]),
      keep: ['vm@c1'],
      creates: new Map([[0, ['vm@c2']]]),
      after: { vm: 'vm', image: 'vda.qcow2' },
    };
    await sweep(sc, work, { ...SWEEP, onCut: count('inc') });
  });

  it('forget a checkpoint in the middle of a chain', async () => {
    const t = template('forget');
    await image(t.img, [[1, 0, 4]]);
    await bkfsOk(['-r', t.repo, 'init']);
    await backupVm(t.repo, 'vm', 'c1', t.img, 'full');
    const c1 = await ref(t.img, 'c1');
    await write(t.img, [[2, 1, 2]]);
    await backupVm(t.repo, 'vm', 'c2', t.img, 'inc');
    const c2 = await ref(t.img, 'c2');
    await write(t.img, [[3, 6, 1]]);
    await backupVm(t.repo, 'vm', 'c3', t.img, 'inc');
    const c3 = await ref(t.img, 'c3');
    const sc: Scenario = {
      name: 'forget',
      template: t.dir,
      commands: [['forget', 'vm@c2']],
      refs: new Map([
        ['vm@c1', { image: 'vda.qcow2', raw: c1 }],
        ['vm@c2', { image: 'vda.qcow2', raw: c2 }],
        ['vm@c3', { image: 'vda.qcow2', raw: c3 }],
      ]),
      keep: ['vm@c1', 'vm@c3'],
      removes: new Map([[0, ['vm@c2']]]),
      after: { vm: 'vm', image: 'vda.qcow2' },
    };
    await sweep(sc, work, { ...SWEEP, onCut: count('forget') });
  });

  it('gc: deletes a dead pack and rewrites a partly dead one', async () => {
    const t = template('gc');
    const imgA = path.join(t.dir, 'a.qcow2');
    const imgB = path.join(t.dir, 'b.qcow2');
    const imgC = path.join(t.dir, 'c.qcow2');
    await image(imgA, [
      [10, 0, 3],
      [11, 3, 3],
    ]);
    await image(imgB, [[12, 0, 3]]);
    await image(imgC, [[10, 0, 3]]); // the same data as a's first 3 MiB: shares a's pack
    await bkfsOk(['-r', t.repo, 'init']);
    await backupVm(t.repo, 'a', 'a1', imgA);
    await backupVm(t.repo, 'b', 'b1', imgB);
    await backupVm(t.repo, 'c', 'c1', imgC);
    await bkfsOk(['-r', t.repo, 'forget', 'a@a1', 'b@b1']);
    const dry = JSON.parse((await bkfsOk(['-r', t.repo, 'gc', '--dry-run', '--json'])).stdout) as {
      packsDeleted: number;
      packsRewritten: number;
    };
    assert.ok(dry.packsDeleted >= 1 && dry.packsRewritten >= 1, JSON.stringify(dry));
    const sc: Scenario = {
      name: 'gc',
      template: t.dir,
      commands: [['gc']],
      refs: new Map([['c@c1', { image: 'c.qcow2', raw: await ref(imgC, 'c1') }]]),
      keep: ['c@c1'],
      after: { vm: 'c', image: 'c.qcow2' },
    };
    await sweep(sc, work, { ...SWEEP, onCut: count('gc') });
  });

  it('repair --rebuild-index', async () => {
    const t = template('rebuild');
    await image(t.img, [[1, 0, 4]]);
    await bkfsOk(['-r', t.repo, 'init']);
    await backupVm(t.repo, 'vm', 'c1', t.img, 'full');
    const c1 = await ref(t.img, 'c1');
    await write(t.img, [[2, 1, 2]]);
    await backupVm(t.repo, 'vm', 'c2', t.img, 'inc');
    const sc: Scenario = {
      name: 'rebuild',
      template: t.dir,
      commands: [['repair', '--rebuild-index']],
      refs: new Map([
        ['vm@c1', { image: 'vda.qcow2', raw: c1 }],
        ['vm@c2', { image: 'vda.qcow2', raw: await ref(t.img, 'c2') }],
      ]),
      keep: ['vm@c1', 'vm@c2'],
      after: { vm: 'vm', image: 'vda.qcow2' },
    };
    await sweep(sc, work, { ...SWEEP, onCut: count('rebuild') });
  });

  it("verify's healing (a damaged chunk whose pack reads back correctly again)", async () => {
    const t = template('verify');
    await image(t.img, [[1, 0, 4]]);
    await bkfsOk(['-r', t.repo, 'init']);
    await backupVm(t.repo, 'vm', 'c1', t.img, 'full');
    // Damage one chunk's stored bytes, let verify mark it, then put the good pack file back.
    const [pack] = packFilesOnDisk(t.repo);
    assert.ok(pack);
    const file = packPath(t.repo, pack.name);
    const good = fs.readFileSync(file);
    const bad = Buffer.from(good);
    bad.writeUInt8(
      bad.readUInt8(PACK_HEADER_LEN + RECORD_HEADER_LEN + 100) ^ 0xff,
      PACK_HEADER_LEN + RECORD_HEADER_LEN + 100,
    );
    fs.writeFileSync(file, bad);
    const v = await bkfs(['-r', t.repo, 'verify']);
    assert.equal(v.code, 16, v.stdout + v.stderr);
    fs.writeFileSync(file, good);
    const sc: Scenario = {
      name: 'verify',
      template: t.dir,
      commands: [['verify']],
      refs: new Map([['vm@c1', { image: 'vda.qcow2', raw: await ref(t.img, 'c1') }]]),
      keep: ['vm@c1'],
      after: { vm: 'vm', image: 'vda.qcow2' },
    };
    await sweep(sc, work, { ...SWEEP, onCut: count('verify') });
  });
});

describe('power loss: a restore that reports success is durable', () => {
  it('restore to a file: a cut at each fsync either fails the restore or leaves the whole image', async () => {
    const t = template('restore');
    await image(t.img, [[1, 0, 4]]);
    await bkfsOk(['-r', t.repo, 'init']);
    await backupVm(t.repo, 'vm', 'c1', t.img, 'full');
    const raw = await ref(t.img, 'c1');
    // Count the restore's fsyncs once, then cut at each one (the target directory is on powerfs).
    const cuts: (number | undefined)[] = [];
    for (let n = 1; ; n++) {
      const dir = path.join(work, `restore-${n}`);
      const back = path.join(dir, 'back');
      const mnt = path.join(dir, 'mnt');
      fs.mkdirSync(back, { recursive: true });
      fs.mkdirSync(mnt);
      const pfs = await PowerFs.start(back, mnt, { atFsync: n });
      const r = await bkfs(['-r', t.repo, 'restore', 'vm@c1', '-d', 'vda', '-t', path.join(mnt, 'vda.raw')]);
      const reached = pfs.deadAt !== undefined;
      await pfs.cut();
      const target = path.join(back, 'vda.raw');
      if (r.code === 0) {
        assert.ok(
          fs.existsSync(target),
          `cut at fsync ${n}: restore reported success, but the image is gone`,
        );
        assert.ok(
          fs.readFileSync(target).equals(fs.readFileSync(raw)),
          `cut at fsync ${n}: restored bytes differ`,
        );
      }
      count('restore')({ point: `fsync ${n}`, stats: { fsyncs: n, ops: 0, dead: reached }, exits: [r.code] });
      fs.rmSync(dir, { recursive: true, force: true });
      cuts.push(n);
      if (!reached) break; // the restore finished before its n-th fsync: every boundary was tried
    }
    assert.ok(cuts.length >= 3, `restore made ${cuts.length - 1} fsyncs`);
  });
});
