/**
 * Live backups of a running libvirt domain (real libvirtd, QEMU in TCG, qemu-img, SQLite):
 * a pull-mode chain full -> inc -> inc -> diff checked byte for byte against reference raw files
 * that receive the same writes as the VM; libvirt's and the repository's checkpoint lists kept in
 * agreement; every desync case (a libvirt checkpoint deleted by hand, a bitmap removed through
 * QMP, a checkpoint made by another tool), SIGKILL and SIGTERM in the middle of a backup, a job bkfs
 * did not start, bad input, and a shut-off domain.
 *
 * One transient domain serves the whole file; it is destroyed in `after` whatever happens, and
 * libvirtd/virtlogd are stopped by PID if this file started them.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { bkfs, bkfsOk, BKFS, qemuIo } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { randomBuffer } from '../helpers/images';
import {
  childrenMatching,
  domainXml,
  eventually,
  libvirtMissing,
  procState,
  startDaemons,
  stopAtBackupDumpxml,
  stopDaemons,
  TestDomain,
  virsh,
  virshTry,
  type Daemons,
  type DiskDef,
} from '../helpers/libvirt';
import { Repository } from '../../src/repo/repository';
import { getConfigs, getVm, listCheckpoints } from '../../src/index/catalog';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const missing = libvirtMissing();

interface ListRow {
  name: string;
  level: string;
  parent: string | null;
  bytesRead: number;
  libvirtCheckpoint: string | null;
  disks: { name: string }[];
}

describe('live backups of a running libvirt domain', { skip: missing ?? false }, () => {
  let work: string;
  let daemons: Daemons = { started: [] };
  let dom: TestDomain | undefined;
  let repoDir: string;
  let scratch: string;
  let repoId: string;
  const domName = `bkfs-test-${process.pid}`;
  /** bkfs processes started by `stoppedBackup`, and their job guards' PIDs. */
  const children: ChildProcess[] = [];
  const guardPids: number[] = [];
  /** Image and reference raw file of each disk. */
  const disks: Record<string, { img: string; ref: string; format: 'qcow2' | 'raw' }> = {};

  const cli = (...args: string[]) => bkfs(['-r', repoDir, ...args]);
  const cliOk = (...args: string[]) => bkfsOk(['-r', repoDir, ...args]);
  const backup = (...args: string[]) =>
    cli('backup', 'web', '--libvirt', domName, '--scratch-dir', scratch, ...args);
  const backupOk = async (...args: string[]) => {
    const r = await backup(...args);
    assert.equal(r.code, 0, `bkfs backup ${args.join(' ')}: ${r.stderr}`);
    return r;
  };
  const list = async (): Promise<ListRow[]> =>
    JSON.parse((await cliOk('list', 'web', '--json')).stdout) as ListRow[];
  /** The libvirt checkpoint the repository recorded for `cp`. */
  const lvOf = async (cp: string): Promise<string> => {
    const lv = (await list()).find((r) => r.name === cp)?.libvirtCheckpoint;
    assert.ok(lv, `${cp} has a libvirt checkpoint`);
    return lv;
  };

  /** The same write into the VM (through QEMU) and into the disk's reference raw file. */
  async function write(target: string, cmd: string): Promise<void> {
    await dom!.qemuIo(target, cmd);
    await qemuIo(disks[target]!.ref, 'raw', cmd);
  }

  /** A copy of each reference at this point in time, to compare a checkpoint against later. */
  function snapshot(label: string): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [t, d] of Object.entries(disks)) {
      out[t] = path.join(work, `${label}-${t}.raw`);
      fs.copyFileSync(d.ref, out[t]!);
    }
    return out;
  }

  /** libvirt's bkfs checkpoints are exactly those of the repository's current chain. */
  async function assertListsAgree(): Promise<void> {
    const rows = await list();
    let start = -1;
    rows.forEach((r, i) => {
      if (r.level === 'full') start = i;
    });
    const chain = rows.slice(start).filter((r) => r.level !== 'copy' && r.libvirtCheckpoint !== null);
    // This test's domain is backed up by this repository only: every bkfs-* checkpoint is its.
    const own = (await dom!.checkpointNames()).filter((n) => n.startsWith('bkfs-'));
    assert.deepEqual(
      own.sort(),
      chain.map((r) => r.libvirtCheckpoint!).sort(),
      'libvirt vs repository checkpoints',
    );
  }

  /** Nothing left behind: no job, an empty scratch directory. */
  async function assertNoLeftovers(): Promise<void> {
    assert.equal(await dom!.job(), null, 'no backup job left running');
    assert.deepEqual(fs.readdirSync(scratch), [], 'scratch directory is empty');
  }

  /** What a refused command must leave untouched. */
  function repoState(): string {
    const repo = Repository.open(repoDir);
    try {
      return JSON.stringify({
        rows: repo.db
          .prepare('SELECT name, level, state, libvirt_checkpoint FROM checkpoints ORDER BY id')
          .all(),
        chunks: repo.db.prepare('SELECT count(*) AS n FROM chunks').get(),
        packs: fs.readdirSync(path.join(repoDir, 'packs'), { recursive: true }).length,
      });
    } finally {
      repo.close();
    }
  }

  async function assertRefused(
    args: string[],
    code: keyof typeof EXIT_CODES,
    msg: RegExp,
    run: (a: string[]) => ReturnType<typeof backup> = (a) => backup(...a),
  ): Promise<void> {
    const before = repoState();
    const lvBefore = await dom!.checkpointNames();
    const r = await run(args);
    assert.equal(r.code, EXIT_CODES[code], `exit code of ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, msg);
    const errLines = r.stderr
      .split('\n')
      .filter((l) => l.startsWith('bkfs: ') && !/not backed up|guest agent/.test(l));
    assert.equal(errLines.length, 1, `one error line: ${r.stderr}`);
    assert.equal(repoState(), before, 'repository unchanged');
    assert.deepEqual(await dom!.checkpointNames(), lvBefore, 'libvirt checkpoints unchanged');
    await assertNoLeftovers();
  }

  before(async () => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-libvirt-test-'));
    fs.chmodSync(work, 0o755); // QEMU (libvirt-qemu) must reach the images and the scratch dir
    scratch = path.join(work, 'scratch');
    fs.mkdirSync(scratch, { mode: 0o755 });
    daemons = await startDaemons();
    const defs: DiskDef[] = [
      { target: 'sda', format: 'qcow2' },
      { target: 'sdb', format: 'qcow2' },
      { target: 'sdc', format: 'raw' },
    ];
    for (const d of defs) {
      const img = path.join(work, `${d.target}.${d.format}`);
      d.file = img;
      disks[d.target] = { img, ref: path.join(work, `${d.target}.ref.raw`), format: d.format };
    }
    // Initial content: random data, a pattern, an unaligned pattern, holes.
    const rnd = path.join(work, 'random.bin');
    fs.writeFileSync(rnd, randomBuffer(61, 6 * MiB));
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disks.sda!.img, '64M']);
    await qemuIo(disks.sda!.img, 'qcow2', `write -s ${rnd} 1M 6M`, 'write -P 0x11 32M 3M');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disks.sdb!.img, '64M']);
    await qemuIo(disks.sdb!.img, 'qcow2', 'write -P 0x22 100000 2M', `write -s ${rnd} 40M 1M`);
    await run('qemu-img', ['create', '-q', '-f', 'raw', disks.sdc!.img, '4M']);
    await qemuIo(disks.sdc!.img, 'raw', 'write -P 0x33 0 1M');
    for (const d of Object.values(disks)) {
      await run('qemu-img', ['convert', '-O', 'raw', '-f', d.format, d.img, d.ref]);
    }
    defs.push({ target: 'hdc', format: 'raw', device: 'cdrom', bus: 'ide', readonly: true });
    dom = await TestDomain.create(work, domName, defs);
    repoDir = path.join(work, 'repo');
    await cliOk('init');
    repoId = (JSON.parse(fs.readFileSync(path.join(repoDir, 'bkfs-repo.json'), 'utf8')) as { id: string }).id;
  });

  after(async () => {
    // bkfs processes (and their guards) a failed test may have left stopped: kill them by PID.
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const pid of guardPids) {
      const cmd = fs.existsSync(`/proc/${pid}/cmdline`)
        ? fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8')
        : '';
      if (cmd.includes('bkfs-job-guard')) process.kill(pid, 'SIGKILL');
    }
    try {
      await dom?.destroy();
    } finally {
      await stopDaemons(daemons);
      fs.rmSync(work, { recursive: true, force: true });
    }
  });

  it('full -> inc -> inc -> diff: every checkpoint equals the disks at that instant', async () => {
    const full = await backupOk('--level', 'full');
    assert.match(full.stdout, /web@check1: full backup of 3 disk\(s\)/);
    assert.match(full.stdout, /crash-consistent, checkpoint bkfs-[0-9a-f]{32}$/m);
    assert.match(full.stderr, /disk 'hdc' is not backed up: a cdrom/);
    assert.match(full.stderr, /has no guest agent: the backup is crash-consistent/);
    const s1 = snapshot('s1');
    await assertNoLeftovers();
    await assertListsAgree();

    // Writes of all kinds: random-looking data, zeros over data, unaligned, across chunk edges.
    await write('sda', 'write -P 0x5a 20M 1M');
    await write('sda', 'write -z 2M 2M');
    await write('sdb', 'write -P 0x7e 12345 7000');
    const inc1 = await backupOk(); // auto -> inc
    assert.match(inc1.stdout, /web@check2: inc backup of 2 disk\(s\)/);
    assert.match(inc1.stderr, /disk 'sdc' is not backed up: raw, which has no dirty bitmaps/);
    const s2 = snapshot('s2');

    await write('sdb', 'write -P 0x01 63M 1M');
    await write('sda', 'write -P 0x02 262000 1000');
    await backupOk('--level', 'inc', '--no-freeze');
    const s3 = snapshot('s3');

    await write('sda', 'write -P 0x03 40M 512k');
    const diff = await backupOk('--level', 'diff', '--disks', 'sda,sdb');
    assert.match(diff.stdout, /web@check4: diff backup/);
    const s4 = snapshot('s4');
    await assertNoLeftovers();
    await assertListsAgree();

    const rows = await list();
    assert.deepEqual(
      rows.map((r) => [r.name, r.level, r.parent]),
      [
        ['check1', 'full', null],
        ['check2', 'inc', 'check1'],
        ['check3', 'inc', 'check2'],
        ['check4', 'diff', 'check1'],
      ],
    );
    // Named after each checkpoint's own uid: nothing a copy of the repository would share.
    for (const r of rows) assert.match(r.libvirtCheckpoint ?? '', /^bkfs-[0-9a-f]{32}$/);
    assert.equal(new Set(rows.map((r) => r.libvirtCheckpoint)).size, rows.length);
    assert.ok(!rows.some((r) => r.libvirtCheckpoint!.includes(repoId)));
    // Incrementals read what changed (dirty bitmap ∩ allocation), not the disks.
    assert.ok(rows[1]!.bytesRead <= 2 * MiB, `inc read ${rows[1]!.bytesRead}`);
    assert.ok(rows[2]!.bytesRead <= 2 * MiB, `inc read ${rows[2]!.bytesRead}`);
    assert.ok(rows[3]!.bytesRead >= rows[1]!.bytesRead, 'the diff covers everything since the full');
    for (const [cp, snap] of [
      ['check1', s1],
      ['check2', s2],
      ['check3', s3],
      ['check4', s4],
    ] as const) {
      for (const t of cp === 'check1' ? ['sda', 'sdb', 'sdc'] : ['sda', 'sdb']) {
        await assertCheckpointEquals(repoDir, `web@${cp}`, t, snap[t]!, 40);
      }
    }
    // The inactive domain definition is saved with every checkpoint.
    const repo = Repository.open(repoDir);
    try {
      for (const cp of listCheckpoints(repo.db, getVm(repo.db, 'web').id)) {
        const xml = getConfigs(repo.db, cp.id)
          .find((c) => c.name === 'domain.xml')
          ?.data.toString();
        assert.match(xml ?? '', new RegExp(`<name>${domName}</name>`));
      }
    } finally {
      repo.close();
    }
    const v = await cli('verify');
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });

  it('a libvirt checkpoint deleted by hand: inc refused, diff still possible, auto takes a full', async () => {
    await virsh('checkpoint-delete', domName, await lvOf('check4'));
    await assertRefused(
      ['--level', 'inc'],
      'CHAIN_BROKEN',
      /libvirt checkpoint 'bkfs-[0-9a-f]{32}' of check4 is missing from domain .*--level full/,
    );
    // The full's checkpoint is intact, so a diff works.
    await write('sdb', 'write -P 0x44 5M 64k');
    await backupOk('--level', 'diff');
    const snap = snapshot('s5');
    await assertCheckpointEquals(repoDir, 'web@check5', 'sdb', snap.sdb!, 20);
    await virsh('checkpoint-delete', domName, await lvOf('check5'));
    const auto = await backupOk();
    assert.match(auto.stderr, /check5 is missing from domain .*; taking a full backup/);
    assert.match(auto.stdout, /web@check6: full backup of 3 disk\(s\)/);
    // A new chain: the older libvirt checkpoints are gone, only check6's remains.
    assert.deepEqual(await dom!.checkpointNames(), [await lvOf('check6')]);
    await assertListsAgree();
  });

  it('a dirty bitmap removed through QMP: inc and diff refused, auto takes a full', async () => {
    await dom!.removeBitmap('sdb', await lvOf('check6'));
    await assertRefused(
      ['--level', 'inc'],
      'CHAIN_BROKEN',
      /dirty bitmap 'bkfs-[0-9a-f]{32}' of disk 'sdb' is missing or broken/,
    );
    await assertRefused(['--level', 'diff'], 'CHAIN_BROKEN', /missing or broken/);
    // Excluding the broken disk is the user's way out for the other one.
    await backupOk('--level', 'inc', '--exclude', 'sdb');
    // sdb is not in that inc's checkpoint, so auto now takes a full.
    const auto = await backupOk();
    assert.match(auto.stderr, /disk 'sdb' is not in checkpoint check7.*; taking a full backup/);
    assert.match(auto.stdout, /web@check8: full backup/);
    // libvirt could delete the old checkpoint only as metadata (its sdb bitmap is gone): a note.
    assert.match(auto.stderr, /deleted its metadata only/);
    await assertListsAgree();
    const snap = snapshot('s8');
    for (const t of ['sda', 'sdb', 'sdc'])
      await assertCheckpointEquals(repoDir, 'web@check8', t, snap[t]!, 20);
  });

  it("a checkpoint made by another tool after bkfs's: inc refused, auto takes a full, the other is left alone", async () => {
    const xml = path.join(work, 'foreign.xml');
    fs.writeFileSync(
      xml,
      `<domaincheckpoint><name>other-tool.0</name><disks><disk name='sda' checkpoint='bitmap'/><disk name='sdb' checkpoint='no'/><disk name='sdc' checkpoint='no'/><disk name='hdc' checkpoint='no'/></disks></domaincheckpoint>`,
    );
    await virsh('checkpoint-create', domName, xml);
    try {
      await assertRefused(
        ['--level', 'inc'],
        'CHAIN_BROKEN',
        /'other-tool.0' .* was made by another tool after bkfs's/,
      );
      const auto = await backupOk();
      assert.match(auto.stderr, /another tool.*; taking a full backup/);
      assert.ok((await dom!.checkpointNames()).includes('other-tool.0'), "the other tool's checkpoint stays");
      // Now the other checkpoint is older than bkfs's: incrementals work again.
      await write('sda', 'write -P 0x66 7M 128k');
      const inc = await backupOk();
      assert.match(inc.stdout, /inc backup/);
      const snap = snapshot('s10');
      await assertCheckpointEquals(repoDir, 'web@check10', 'sda', snap.sda!, 20);
      await assertListsAgree();
    } finally {
      await virshTry('checkpoint-delete', domName, 'other-tool.0');
    }
  });

  /** Start a backup that stops itself right after backup-begin; returns its pid and guard's. */
  async function stoppedBackup(label: string, args: string[]) {
    const stopFile = path.join(work, `${label}.pid`);
    const bin = stopAtBackupDumpxml(path.join(work, label), stopFile);
    const child = spawn(
      process.execPath,
      [BKFS, '-r', repoDir, 'backup', 'web', '--libvirt', domName, '--scratch-dir', scratch, ...args],
      {
        env: { ...process.env, CI: 'true', PATH: `${bin}:${process.env.PATH}` },
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    children.push(child);
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number>((res) =>
      child.once('exit', (code, sig) => res(code ?? (sig ? 128 : 1))),
    );
    await eventually(
      'bkfs stopped after backup-begin',
      () => fs.existsSync(stopFile) && procState(child.pid!) === 'T',
    );
    assert.equal(await dom!.job(), 'Backup', 'the job runs while bkfs is stopped');
    const guards = childrenMatching(child.pid!, 'bkfs-job-guard');
    guardPids.push(...guards);
    assert.equal(guards.length, 1, 'one job guard');
    return { child, guard: guards[0]!, exited, stderr: () => stderr };
  }

  it('SIGKILL in the middle of a backup: the guard ends the job, the next backup cleans up and works', async () => {
    const before = await list();
    const b = await stoppedBackup('kill1', ['--level', 'inc']);
    b.child.kill('SIGKILL');
    await b.exited;
    await eventually('the guard ended the job', async () => (await dom!.job()) === null);
    await eventually('the guard exited', () => procState(b.guard) === null);
    assert.deepEqual(fs.readdirSync(scratch), [], 'the guard removed the job directory');
    assert.deepEqual((await list()).length, before.length, 'no half checkpoint');
    // The killed run's libvirt checkpoint is an orphan the next run deletes.
    await write('sdb', 'write -P 0x77 9M 64k');
    const next = await backupOk('--level', 'inc');
    assert.match(
      next.stderr,
      /deleted libvirt checkpoint 'bkfs-[0-9a-f]{32}'.*no checkpoint of the repository uses it/,
    );
    const snap = snapshot('s11');
    await assertCheckpointEquals(repoDir, 'web@check11', 'sdb', snap.sdb!, 20);
    await assertNoLeftovers();
    await assertListsAgree();
  });

  it('SIGKILL of bkfs and its guard: the next backup ends the leftover job and works', async () => {
    const b = await stoppedBackup('kill2', ['--level', 'inc']);
    process.kill(b.guard, 'SIGKILL');
    b.child.kill('SIGKILL');
    await b.exited;
    await eventually('the guard is gone', () => procState(b.guard) === null);
    assert.equal(await dom!.job(), 'Backup', 'nobody ended the job');
    assert.equal(fs.readdirSync(scratch).length, 1, 'the job directory is still there');
    const next = await backupOk();
    assert.match(next.stderr, /ended the backup job of domain .* left by a bkfs that was killed \(pid \d+\)/);
    assert.match(next.stderr, /deleted libvirt checkpoint 'bkfs-[0-9a-f]{32}'/);
    assert.match(next.stdout, /web@check12: inc backup/);
    await assertNoLeftovers();
    await assertListsAgree();
    const v = await cli('verify');
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });

  it('SIGTERM in the middle of a backup: exit 130, job ended, new checkpoint removed, repository unchanged', async () => {
    const before = repoState();
    const lvBefore = await dom!.checkpointNames();
    const b = await stoppedBackup('term', ['--level', 'full']);
    b.child.kill('SIGTERM');
    b.child.kill('SIGCONT');
    assert.equal(await b.exited, EXIT_CODES.INTERRUPTED, b.stderr());
    assert.match(b.stderr(), /SIGTERM received/);
    await eventually('the guard exited', () => procState(b.guard) === null);
    assert.equal(repoState(), before);
    assert.deepEqual(await dom!.checkpointNames(), lvBefore);
    await assertNoLeftovers();
  });

  it('a backup job that bkfs did not start is left alone', async () => {
    const jd = path.join(work, 'foreign-job');
    fs.mkdirSync(jd);
    const { uid, gid } = fs.statSync(disks.sda!.img); // libvirt gave the running VM's images to QEMU's user
    fs.chownSync(jd, uid, gid);
    const xml = path.join(work, 'foreign-job.xml');
    fs.writeFileSync(
      xml,
      `<domainbackup mode='pull'><server transport='unix' socket='${jd}/s.sock'/><disks><disk name='sda' backup='yes' type='file'><scratch file='${jd}/sda.scratch'/></disk><disk name='sdb' backup='no'/><disk name='sdc' backup='no'/><disk name='hdc' backup='no'/></disks></domainbackup>`,
    );
    await virsh('backup-begin', domName, xml);
    try {
      const before = repoState();
      const r = await backup('--level', 'full');
      assert.equal(r.code, EXIT_CODES.SOURCE_IN_USE, r.stderr);
      assert.match(r.stderr, /already has a backup job that bkfs did not start.*virsh domjobabort/);
      assert.equal(await dom!.job(), 'Backup', 'the other job still runs');
      assert.equal(repoState(), before);
    } finally {
      await virshTry('domjobabort', domName);
    }
  });

  it('bad input: one clear line, a distinct exit code, nothing changed', async () => {
    const cases: [string[], keyof typeof EXIT_CODES, RegExp][] = [
      [
        ['--connect', 'qemu+tcp://backup@host/system'],
        'USAGE',
        /unencrypted and unauthenticated.*--insecure-tcp/,
      ],
      [['--disks', 'vdz'], 'USAGE', /has no disk 'vdz'/],
      [['--disks', 'hdc'], 'USAGE', /'hdc' cannot be backed up.*cdrom/],
      [['--exclude', 'sda,sdb,sdc'], 'USAGE', /no disk of the domain can be backed up/],
      [['--disk', 'vda=/x.qcow2'], 'USAGE', /--libvirt and --disk exclude each other/],
      [['--level', 'inc', '--disks', 'sdc'], 'CHAIN_BROKEN', /'sdc' is raw, which has no dirty bitmaps/],
      [['--scratch-dir', '/nonexistent'], 'USAGE', /not a directory/],
      [['--checkpoint', 'check1'], 'BAD_NAME', /already has a checkpoint named 'check1'/],
    ];
    for (const [args, code, msg] of cases) await assertRefused(args, code, msg);
    await assertRefused([], 'SOURCE_NOT_FOUND', /libvirt has no domain 'no-such-domain'/, () =>
      cli('backup', 'web', '--libvirt', 'no-such-domain'),
    );
    await assertRefused([], 'USAGE', /--exclude needs --libvirt/, () =>
      cli('backup', 'web', '--disk', `sda=${disks.sda!.img}`, '--exclude', 'sda'),
    );
  });

  it('a shut-off domain: full from its images without a libvirt checkpoint; inc refused', async () => {
    const name = `bkfs-test-off-${process.pid}`;
    const img = path.join(work, 'off.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    await qemuIo(img, 'qcow2', 'write -P 0x99 1M 3M');
    const ref = path.join(work, 'off.raw');
    await run('qemu-img', ['convert', '-O', 'raw', img, ref]);
    const xmlFile = path.join(work, 'off.xml');
    fs.writeFileSync(
      xmlFile,
      domainXml(name, [
        { target: 'vda', file: img, format: 'qcow2', bus: 'virtio' },
        { target: 'hdc', format: 'raw', device: 'cdrom', bus: 'ide', readonly: true },
      ]),
    );
    await virsh('define', xmlFile);
    try {
      const off = (...a: string[]) => cli('backup', 'off', '--libvirt', name, ...a);
      let r = await off('--level', 'inc');
      assert.equal(r.code, EXIT_CODES.CHAIN_BROKEN, r.stderr);
      assert.match(r.stderr, /is shut off: an inc needs the running domain .*start it.*--disk NAME=IMAGE/);
      r = await off();
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /is shut off: taking a full backup of its images, without a libvirt checkpoint/);
      assert.match(
        r.stdout,
        /off@check1: full backup of 1 disk\(s\).*\n(.*\n)*.*offline, no libvirt checkpoint/,
      );
      await assertCheckpointEquals(repoDir, 'off@check1', 'vda', ref, 20);
      // bkfs added no bitmap of its own to the image (libvirt owns change tracking).
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout) as {
        'format-specific': { data: { bitmaps?: unknown[] } };
      };
      assert.deepEqual(info['format-specific'].data.bitmaps ?? [], []);
      const rows = JSON.parse((await cliOk('list', 'off', '--json')).stdout) as ListRow[];
      assert.equal(rows[0]!.libvirtCheckpoint, null);
    } finally {
      await virshTry('undefine', name);
    }
  });
});
