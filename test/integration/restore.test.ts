/**
 * Restore and export against real qemu-img / qemu-nbd and a real repository: a full -> inc -> inc
 * -> diff chain of two disks (ext4 changed through QEMU, plus qemu-io writes, zeroing and
 * discards), every checkpoint restored to raw, qcow2, an NBD export and incrementally, and
 * exported as a qcow2 backing chain; each result is compared with `qemu-img compare` against
 * `qemu-img convert -O raw` of the source at that checkpoint.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startDaemons, stopDaemons } from '../helpers/libvirt';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { makeDisk, modifyDisk, randomBuffer, textFile, toRaw } from '../helpers/images';
import { startNbdkit, startQemuNbd } from '../helpers/nbd-server';
import { Repository } from '../../src/repo/repository';
import { checkpointDisks, resolveRef } from '../../src/index/catalog';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const SIZE_A = 96 * MiB;
const SIZE_B = 33 * MiB;
let work: string;
let repo: string;
let imgA: string;
let imgB: string;
/** refs[i] = raw images of vda / vdb at check(i+1). */
const refs: { vda: string; vdb: string }[] = [];

const DOMAIN_XML = `<domain type='qemu'>
  <name>web</name>
  <uuid>6a1c2f7e-0d7b-4b8e-9a53-2f0c1e9d4b21</uuid>
  <memory unit='MiB'>512</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web-vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
`;

async function same(a: string, fa: string, b: string, fb: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-f', fa, '-F', fb, a, b], { allowFail: true });
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

async function qcheck(img: string): Promise<void> {
  const r = await run('qemu-img', ['check', '-f', 'qcow2', img], { allowFail: true });
  assert.equal(r.code, 0, `qemu-img check ${img}: ${r.stdout}${r.stderr}`);
}

async function restoreJson(args: string[]): Promise<{
  since: string | null;
  disks: {
    disk: string;
    bytesWritten: number;
    bytesZeroed: number;
    holes: number;
    pagesCompared?: number;
    pagesSkipped?: number;
  }[];
  configs: string[];
  domainXml: string | null;
}> {
  const r = await bkfsOk(['-r', repo, 'restore', ...args, '--json']);
  return JSON.parse(r.stdout);
}

/** Bytes that differ between two equally long files. */
function differingBytes(a: string, b: string): number {
  const x = fs.readFileSync(a);
  const y = fs.readFileSync(b);
  assert.equal(x.length, y.length);
  let n = 0;
  for (let off = 0; off < x.length; off += MiB) {
    const end = Math.min(x.length, off + MiB);
    if (x.subarray(off, end).equals(y.subarray(off, end))) continue;
    for (let i = off; i < end; i++) if (x[i] !== y[i]) n++;
  }
  return n;
}

/** Bytes of a checkpoint-disk's own extents (data and zeros): what its backup recorded. */
function ownBytes(ref: string, disk: string): number {
  const r = Repository.open(repo);
  try {
    const { checkpoint } = resolveRef(r.db, ref);
    const d = checkpointDisks(r.db, checkpoint.id).find((x) => x.name === disk)!;
    return (
      r.db
        .prepare(
          `SELECT coalesce(sum(e.length), 0) AS n FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id
            WHERE dp.disk_id = ? AND e.origin = ?`,
        )
        .get(d.id, d.id) as { n: number }
    ).n;
  } finally {
    r.close();
  }
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-restore-test-'));
  repo = path.join(work, 'repo');
  imgA = path.join(work, 'vda.qcow2');
  imgB = path.join(work, 'vdb.qcow2');
  const xml = path.join(work, 'domain.xml');
  fs.writeFileSync(xml, DOMAIN_XML);
  await makeDisk(imgA, {
    format: 'qcow2',
    sizeMiB: 96,
    table: 'gpt',
    seed: 11,
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 48,
        label: 'root',
        files: [
          { path: 'etc/hostname', content: Buffer.from('web\n') },
          { path: 'var/lib/blob.bin', content: randomBuffer(1, 5 * MiB) },
          { path: 'var/log/syslog', content: textFile(2, 2 * MiB) },
        ],
      },
      { fs: 'none', sizeMiB: 40 },
    ],
  });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', imgB, String(SIZE_B)]);
  await qemuIo(imgB, 'qcow2', 'write -P 0x42 0 3M', 'write -P 0x43 20M 1M');
  await bkfsOk(['-r', repo, 'init']);
  const backup = async (level: string) => {
    await bkfsOk([
      '-r',
      repo,
      'backup',
      'web',
      '--disk',
      `vda=${imgA}`,
      '--disk',
      `vdb=${imgB}`,
      '--level',
      level,
      '--config',
      `domain.xml=${xml}`,
    ]);
    const i = refs.length;
    const r = { vda: path.join(work, `ref${i + 1}-vda.raw`), vdb: path.join(work, `ref${i + 1}-vdb.raw`) };
    await toRaw(imgA, r.vda);
    await toRaw(imgB, r.vdb);
    refs.push(r);
  };
  await backup('full'); // check1
  await modifyDisk(imgA, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/hostname'), 'web-2\n');
    fs.rmSync(path.join(m, 'var/log/syslog'));
    fs.writeFileSync(path.join(m, 'var/lib/new.bin'), randomBuffer(3, 2 * MiB));
  });
  await qemuIo(imgB, 'qcow2', 'write -P 0x44 1M 512k');
  await backup('inc'); // check2
  // Raw guest-like writes in the unpartitioned area: data, zeroing, a discard, an unaligned write.
  fs.writeFileSync(path.join(work, 'r.bin'), randomBuffer(4, 4 * MiB));
  await qemuIo(
    imgA,
    'qcow2',
    `write -s ${path.join(work, 'r.bin')} 60M 4M`,
    'write -P 0x55 80M 1M',
    'write -P 0x57 70001 5000',
  );
  await qemuIo(imgB, 'qcow2', 'write -z 0 1M', 'discard 20M 1M');
  await backup('inc'); // check3
  await qemuIo(imgA, 'qcow2', 'write -z 61M 2M', 'discard 80M 1M', 'write -P 0x58 90M 300k');
  await backup('diff'); // check4
});

after(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('restore of every checkpoint of a full -> inc -> inc -> diff chain', () => {
  it('raw into a directory: every disk equals the source, sparse, with the configuration', async () => {
    for (let i = 0; i < refs.length; i++) {
      const out = path.join(work, `raw${i + 1}`);
      const res = await restoreJson([`web@check${i + 1}`, '--to', out]);
      await same(refs[i]!.vda, 'raw', path.join(out, 'vda.raw'), 'raw');
      await same(refs[i]!.vdb, 'raw', path.join(out, 'vdb.raw'), 'raw');
      const st = fs.statSync(path.join(out, 'vda.raw'));
      assert.equal(st.size, SIZE_A);
      assert.ok(st.blocks * 512 < SIZE_A / 4, `vda.raw allocates ${st.blocks * 512} of ${SIZE_A} bytes`);
      const vda = res.disks.find((d) => d.disk === 'vda')!;
      assert.equal(vda.holes, SIZE_A - vda.bytesWritten);
      assert.equal(vda.bytesZeroed, 0);
      // Configuration: the saved XML, and one rewritten for the restored files.
      assert.equal(fs.readFileSync(path.join(out, 'domain.orig.xml'), 'utf8'), DOMAIN_XML);
      const xml = fs.readFileSync(path.join(out, 'domain.xml'), 'utf8');
      assert.ok(xml.includes(`<source file='${path.join(out, 'vda.raw')}'/>`), xml);
      assert.ok(xml.includes(`<source file='${path.join(out, 'vdb.raw')}'/>`), xml);
      assert.equal((xml.match(/type='raw'/g) ?? []).length, 2);
      assert.ok(!fs.readdirSync(out).some((f) => f.endsWith('.bkfs-partial')));
    }
    assert.deepEqual(fs.readdirSync(path.join(repo, 'pins')), [], 'pins are released');
  });

  it('qcow2 files: equal to the source, and qemu-img check passes', async () => {
    for (let i = 0; i < refs.length; i++) {
      const out = path.join(work, `q${i + 1}`);
      await bkfsOk(['-r', repo, 'restore', `web@check${i + 1}`, '--to', out, '--format', 'qcow2']);
      for (const d of ['vda', 'vdb'] as const) {
        const f = path.join(out, `${d}.qcow2`);
        await qcheck(f);
        await same(refs[i]![d], 'raw', f, 'qcow2');
      }
    }
    // One disk to a file; the format follows the extension.
    const one = path.join(work, 'one.qcow2');
    await bkfsOk(['-r', repo, 'restore', 'web@check3', '--disk', 'vdb', '--to', one]);
    await qcheck(one);
    await same(refs[2]!.vdb, 'raw', one, 'qcow2');
  });

  it('into a writable qemu-nbd export holding other data', async () => {
    const img = path.join(work, 'nbd-target.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(SIZE_A)]);
    await qemuIo(img, 'qcow2', `write -P 0xee 0 ${SIZE_A}`); // every byte must be overwritten
    const srv = await startQemuNbd(img, { format: 'qcow2' });
    let res;
    try {
      res = await restoreJson(['web@check4', '--disk', 'vda', '--to', srv.uri]);
    } finally {
      await srv.stop();
    }
    await qcheck(img);
    await same(refs[3]!.vda, 'raw', img, 'qcow2');
    const d = res.disks[0]!;
    assert.equal(d.bytesWritten + d.bytesZeroed, SIZE_A);
  });
});

describe('NBD export with a 64 KiB minimum block size', () => {
  it('unaligned extent edges are written as whole blocks of the checkpoint', async () => {
    // A raw disk of an odd size with a hole that is 4 KiB- but not 64 KiB-aligned.
    const src = path.join(work, 'odd.raw');
    const size = 1000001;
    const fd = fs.openSync(src, 'w');
    fs.ftruncateSync(fd, size);
    fs.writeSync(fd, randomBuffer(21, 299008), 0, 299008, 0);
    fs.writeSync(fd, randomBuffer(22, size - 704512), 0, size - 704512, 704512);
    fs.closeSync(fd);
    const r = await bkfsOk(['-r', repo, 'backup', 'odd', '--disk', `vda=${src}`, '--level', 'full']);
    assert.match(r.stdout, /odd@check1/);
    const virt = 1000448; // qemu-nbd serves the raw file rounded up to 512 bytes
    const target = path.join(work, 'odd-target.raw');
    fs.writeFileSync(target, Buffer.alloc(2 * MiB, 0xee));
    const kit = await startNbdkit(
      'file',
      [
        target,
        'blocksize-minimum=65536',
        'blocksize-preferred=65536',
        'blocksize-maximum=33554432',
        'blocksize-error-policy=error',
      ],
      { filters: ['blocksize-policy'] },
    );
    try {
      await bkfsOk(['-r', repo, 'restore', 'odd', '--to', kit.uri]);
    } finally {
      await kit.stop();
    }
    const got = fs.readFileSync(target);
    const want = Buffer.alloc(virt);
    fs.readFileSync(src).copy(want);
    assert.ok(got.subarray(0, virt).equals(want), 'the disk');
    const blockEnd = Math.ceil(virt / 65536) * 65536;
    assert.ok(got.subarray(virt, blockEnd).equals(Buffer.alloc(blockEnd - virt)), 'zeros to the block end');
    assert.ok(got.subarray(blockEnd).equals(Buffer.alloc(2 * MiB - blockEnd, 0xee)), 'the rest untouched');
  });
});

describe('incremental restore', () => {
  it('writes only what the maps say differs, and equals a direct restore', async (t) => {
    const file = path.join(work, 'inc-vda.raw');
    await bkfsOk(['-r', repo, 'restore', 'web@check1', '--disk', 'vda', '--to', file]);
    const steps: [number, number][] = [
      [1, 2],
      [2, 3],
      [3, 4],
      [4, 1], // backwards works the same way
    ];
    for (const [from, to] of steps) {
      const before = path.join(work, `inc-before-${from}.raw`);
      fs.copyFileSync(file, before);
      const res = await restoreJson([
        `web@check${to}`,
        '--disk',
        'vda',
        '--to',
        file,
        '--since',
        `web@check${from}`,
      ]);
      await same(refs[to - 1]!.vda, 'raw', file, 'raw');
      const d = res.disks[0]!;
      const changed = d.bytesWritten + d.bytesZeroed;
      const differ = differingBytes(before, refs[to - 1]!.vda);
      t.diagnostic(
        `${from}->${to}: ${changed} bytes written or zeroed, ${differ} differ; pages compared ${d.pagesCompared}, skipped ${d.pagesSkipped}`,
      );
      assert.ok(changed >= differ, `${from}->${to}: wrote ${changed}, ${differ} bytes differ`);
      assert.ok(changed < SIZE_A / 8, `${from}->${to}: wrote ${changed} of ${SIZE_A}`);
      if (to === from + 1 || (from === 3 && to === 4)) {
        // Between a checkpoint and the next one, the maps differ at most in the later one's own
        // extents (check4 is a diff on check1 whose map overlays check3's).
        const own = ownBytes(`web@check${to}`, 'vda');
        assert.ok(changed <= own, `${from}->${to}: wrote ${changed}, own extents ${own}`);
      }
      if (from === 2) {
        // check3 changes only a few 16 MiB map pages: the others are skipped unread. (check4, a
        // diff, rewrites every page changed since the full, so its pages are compared extent by
        // extent instead.)
        assert.ok((d.pagesSkipped ?? 0) >= 1, `${from}->${to}: ${d.pagesSkipped} pages skipped`);
      }
      fs.rmSync(before);
    }
    // Same checkpoint: nothing to write.
    const res = await restoreJson(['web@check1', '--disk', 'vda', '--to', file, '--since', 'web@check1']);
    assert.equal(res.disks[0]!.bytesWritten + res.disks[0]!.bytesZeroed, 0);
  });

  it('updates a qcow2 image and a directory restore in place', async () => {
    const out = path.join(work, 'incdir');
    await bkfsOk(['-r', repo, 'restore', 'web@check2', '--to', out, '--format', 'qcow2']);
    const res = await restoreJson(['web@check4', '--to', out, '--since', 'web@check2']);
    assert.equal(res.since, 'check2');
    for (const d of ['vda', 'vdb'] as const) {
      const f = path.join(out, `${d}.qcow2`);
      await qcheck(f);
      await same(refs[3]![d], 'raw', f, 'qcow2');
    }
    const xml = fs.readFileSync(path.join(out, 'domain.xml'), 'utf8');
    assert.ok(xml.includes(`<source file='${path.join(out, 'vda.qcow2')}'/>`));
  });
});

describe('export as a qcow2 backing chain', () => {
  it('one layer per checkpoint, relative backing names, reads back equal to the source', async () => {
    const dir = path.join(work, 'export');
    const r = await bkfsOk([
      '-r',
      repo,
      'export',
      'web@check4',
      '--format',
      'qcow2-chain',
      '--to',
      dir,
      '--json',
    ]);
    const res = JSON.parse(r.stdout) as {
      disks: {
        disk: string;
        layers: { checkpoint: string; backing: string | null; bytesWritten: number }[];
      }[];
    };
    const vda = res.disks.find((d) => d.disk === 'vda')!;
    assert.deepEqual(
      vda.layers.map((l) => [l.checkpoint, l.backing]),
      [
        ['check1', null],
        ['check2', 'check1.qcow2'],
        ['check3', 'check2.qcow2'],
        ['check4', 'check3.qcow2'],
      ],
    );
    // Upper layers hold only their own changes.
    assert.ok(vda.layers[1]!.bytesWritten < vda.layers[0]!.bytesWritten);
    // The directory can be moved: backing names are relative.
    const moved = path.join(work, 'export-moved');
    fs.renameSync(dir, moved);
    for (const d of ['vda', 'vdb'] as const) {
      for (let i = 1; i <= 4; i++) {
        const layer = path.join(moved, d, `check${i}.qcow2`);
        await qcheck(layer);
        const info = JSON.parse((await run('qemu-img', ['info', '--output=json', layer])).stdout) as {
          'backing-filename'?: string;
        };
        assert.equal(info['backing-filename'], i === 1 ? undefined : `check${i - 1}.qcow2`);
      }
      const out = path.join(work, `export-${d}.raw`);
      await run('qemu-img', ['convert', '-O', 'raw', path.join(moved, d, 'check4.qcow2'), out]);
      await same(refs[3]![d], 'raw', out, 'raw');
      // Every layer is the disk as of its checkpoint.
      await same(refs[1]![d], 'raw', path.join(moved, d, 'check2.qcow2'), 'qcow2');
    }
    const xml = fs.readFileSync(path.join(moved, 'domain.xml'), 'utf8');
    assert.ok(xml.includes(`${path.join(dir, 'vda', 'check4.qcow2')}'`));
    assert.equal((xml.match(/type='qcow2'/g) ?? []).length, 2);
  });
});

describe('bad input: one clear line, a distinct exit code, nothing overwritten', () => {
  async function fails(args: string[], code: keyof typeof EXIT_CODES, msg: RegExp): Promise<string> {
    const r = await bkfs(['-r', repo, ...args]);
    assert.equal(r.code, EXIT_CODES[code], `exit code for ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, msg);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
    return r.stderr;
  }

  it('missing checkpoint, VM or disk', async () => {
    await fails(
      ['restore', 'web@check9', '--to', path.join(work, 'x')],
      'NOT_FOUND',
      /no checkpoint 'check9'/,
    );
    await fails(['restore', 'ghost', '--to', path.join(work, 'x')], 'NOT_FOUND', /no VM named 'ghost'/);
    await fails(
      ['restore', 'web', '--disk', 'vdz', '--to', path.join(work, 'x.raw')],
      'NOT_FOUND',
      /no disk 'vdz'/,
    );
    await fails(['export', 'web@nope', '--to', path.join(work, 'x')], 'NOT_FOUND', /no checkpoint 'nope'/);
    assert.ok(!fs.existsSync(path.join(work, 'x')));
  });

  it('an existing target needs --force', async () => {
    const f = path.join(work, 'exists.raw');
    fs.writeFileSync(f, 'precious');
    await fails(['restore', 'web', '--disk', 'vdb', '--to', f], 'TARGET_EXISTS', /exists \(use --force/);
    assert.equal(fs.readFileSync(f, 'utf8'), 'precious');
    await fails(['restore', 'web', '--to', path.join(work, 'raw1')], 'TARGET_EXISTS', /vda.raw exists/);
    await fails(['export', 'web', '--to', path.join(work, 'export-moved')], 'TARGET_EXISTS', /exists/);
    await bkfsOk(['-r', repo, 'restore', 'web', '--disk', 'vdb', '--to', f, '--force']);
    await same(refs[3]!.vdb, 'raw', f, 'raw');
  });

  it('unwritable target, bad format, NBD target too small or read-only', async () => {
    await fails(
      ['restore', 'web', '--disk', 'vdb', '--to', path.join(work, 'no/such/dir/x.raw')],
      'TARGET_INVALID',
      /directory does not exist/,
    );
    await fails(
      ['restore', 'web', '--to', path.join(work, 'y'), '--format', 'vmdk'],
      'USAGE',
      /raw or qcow2/,
    );
    const small = path.join(work, 'small.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', small, '16M']);
    const srv = await startQemuNbd(small, { format: 'qcow2' });
    try {
      await fails(['restore', 'web', '--disk', 'vdb', '--to', srv.uri], 'TARGET_INVALID', /too small/);
    } finally {
      await srv.stop();
    }
    const ro = await startQemuNbd(imgB, { format: 'qcow2', readOnly: true });
    try {
      await fails(['restore', 'web', '--disk', 'vdb', '--to', ro.uri], 'TARGET_INVALID', /read-only/);
    } finally {
      await ro.stop();
    }
  });

  it('--since: another VM, another disk size, a target that does not hold it', async () => {
    const other = path.join(work, 'other.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', other, String(SIZE_B)]);
    await qemuIo(other, 'qcow2', 'write -P 0x21 0 1M');
    await bkfsOk(['-r', repo, 'backup', 'other', '--disk', `vdb=${other}`, '--level', 'full']);
    const bigger = path.join(work, 'other-48m.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', bigger, '48M']);
    await qemuIo(bigger, 'qcow2', 'write -P 0x21 0 1M');
    await bkfsOk(['-r', repo, 'backup', 'other', '--disk', `vdb=${bigger}`, '--level', 'full']);
    const f = path.join(work, 'since-target.raw');
    await bkfsOk(['-r', repo, 'restore', 'web@check1', '--disk', 'vdb', '--to', f]);
    await fails(
      ['restore', 'web@check2', '--disk', 'vdb', '--to', f, '--since', 'other@check1'],
      'CHAIN_BROKEN',
      /checkpoint of VM 'other'/,
    );
    await fails(
      ['restore', 'other@check2', '--disk', 'vdb', '--to', f, '--since', 'other@check1'],
      'SIZE_CHANGED',
      /restore without --since/,
    );
    // A file of the right size that holds something else: refused before anything is written.
    const wrong = path.join(work, 'wrong.raw');
    fs.writeFileSync(wrong, Buffer.alloc(SIZE_B, 0x5a));
    await fails(
      ['restore', 'web@check2', '--disk', 'vdb', '--to', wrong, '--since', 'web@check1'],
      'TARGET_MISMATCH',
      /has no bkfs restore marker/,
    );
    await fails(
      ['restore', 'web@check2', '--disk', 'vdb', '--to', wrong, '--since', 'web@check1', '--verify-target'],
      'TARGET_MISMATCH',
      /does not hold web@check1/,
    );
    assert.ok(fs.readFileSync(wrong).equals(Buffer.alloc(SIZE_B, 0x5a)), 'left as it was');
    assert.ok(!fs.existsSync(`${wrong}.bkfs-partial`));
    await fails(
      [
        'restore',
        'web@check2',
        '--disk',
        'vdb',
        '--to',
        path.join(work, 'nope.raw'),
        '--since',
        'web@check1',
      ],
      'TARGET_INVALID',
      /does not exist/,
    );
  });

  it('damaged data stops the restore and leaves a clearly named partial file', async () => {
    const copy = path.join(work, 'repo-damaged');
    fs.cpSync(repo, copy, { recursive: true });
    // Overwrite a few bytes in the middle of every pack (a real on-disk corruption): runs at the
    // start of the disk are written before the damaged chunk is met.
    const packs: string[] = [];
    const walk = (d: string) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (e.name.endsWith('.pack')) packs.push(p);
      }
    };
    walk(path.join(copy, 'packs'));
    for (const p of packs) {
      const fd = fs.openSync(p, 'r+');
      const size = fs.fstatSync(fd).size;
      for (const at of [0.5, 0.55, 0.6]) fs.writeSync(fd, Buffer.from('DAMAGE'), 0, 6, Math.floor(size * at));
      fs.closeSync(fd);
    }
    const f = path.join(work, 'damaged.raw');
    const r = await bkfs(['-r', copy, 'restore', 'web@check1', '--disk', 'vda', '--to', f]);
    assert.equal(r.code, EXIT_CODES.DATA_DAMAGED, r.stderr);
    assert.match(r.stderr, /partial output left in .*damaged\.raw\.bkfs-partial/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.ok(!fs.existsSync(f));
    assert.ok(fs.existsSync(`${f}.bkfs-partial`));
  });
});

describe('--define with libvirt', () => {
  it('defines the restored VM under a new name', async (t) => {
    // libvirtd runs here (scripts/setup.sh installs it); start it for this test if it is not running.
    const daemons = await startDaemons();
    t.after(() => stopDaemons(daemons));
    const name = `bkfs-restore-test-${process.pid}`;
    const out = path.join(work, 'define');
    try {
      // A local --connect URI only selects the libvirt that --define talks to.
      await bkfsOk([
        '-r',
        repo,
        'restore',
        'web@check2',
        '--to',
        out,
        '--define',
        name,
        '--connect',
        'qemu:///system',
      ]);
      // QEMU (another user) must reach the disks of a defined domain: searchable, not listable.
      assert.equal(fs.statSync(out).mode & 0o777, 0o711);
      assert.equal(fs.statSync(path.join(out, 'vda.raw')).mode & 0o777, 0o600);
      const xml = (await run('virsh', ['dumpxml', name])).stdout;
      assert.ok(xml.includes(path.join(out, 'vda.raw')));
      assert.ok(!xml.includes('6a1c2f7e-0d7b-4b8e-9a53-2f0c1e9d4b21'), 'a new uuid');
      const uuid = (await run('virsh', ['domuuid', name])).stdout.trim();
      const again = await bkfs(['-r', repo, 'restore', 'web@check3', '--to', `${out}2`, '--define', name]);
      assert.equal(again.code, EXIT_CODES.TARGET_EXISTS, again.stderr);
      assert.ok(!fs.existsSync(`${out}2`), 'nothing written');
      // --force redefines it (same UUID) on the newly restored files.
      await bkfsOk(['-r', repo, 'restore', 'web@check3', '--to', `${out}2`, '--define', name, '--force']);
      const xml2 = (await run('virsh', ['dumpxml', name])).stdout;
      assert.ok(xml2.includes(path.join(`${out}2`, 'vda.raw')));
      assert.equal((await run('virsh', ['domuuid', name])).stdout.trim(), uuid);
    } finally {
      await run('virsh', ['undefine', name], { allowFail: true });
    }
  });
});
