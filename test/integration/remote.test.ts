/**
 * Backups of a domain on a remote hypervisor (`--connect qemu+ssh://...`): the "remote host" is
 * test/helpers/remote-host.ts (a network + mount namespace with its own libvirtd, virtlogd and sshd;
 * bkfs reaches it only through ssh to the namespace's address). The domain's images and the job's
 * scratch directory live in the namespace's private tmpfs (/var/lib/libvirt), which this host's
 * view of the filesystem does not have: every byte bkfs stores came through the ssh-forwarded NBD
 * socket.
 *
 * Checked: full -> inc -> inc -> diff byte for byte against reference raw files that receive the
 * same writes as the VM (the VM name taken from the domain); desync (a libvirt checkpoint deleted
 * on the remote host) refused for inc and healed by auto; kill -9 of bkfs in the middle of a backup
 * (the guard on the hypervisor, fed by bkfs's ssh process, ends the job and removes the job
 * directory within a bounded time, before any next run); the ssh data path dropping mid-backup
 * (exit 28, job ended on the hypervisor); an unreachable or unauthenticated host (exit 28,
 * repository unchanged).
 *
 * Fails (does not skip) when a prerequisite is missing, naming the package.
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
  buildMarkerInitrd,
  childrenMatching,
  consoleLines,
  domainXml,
  eventually,
  markerDomainXml,
  markerGuestMissing,
  procState,
  stopAtBackupDumpxml,
  writeMarker,
} from '../helpers/libvirt';
import { RemoteHost, remoteHostMissing, type RemoteDomain } from '../helpers/remote-host';
import { Repository } from '../../src/repo/repository';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
/** Only in the remote host's mount namespace (its /var/lib/libvirt is a private tmpfs). */
const RDIR = '/var/lib/libvirt/bkfs-remote-test';
const RSCRATCH = `${RDIR}/scratch`;

interface ListRow {
  name: string;
  level: string;
  parent: string | null;
  bytesRead: number;
  libvirtCheckpoint: string | null;
}

describe('backups of a domain on a remote hypervisor (qemu+ssh)', () => {
  let host: RemoteHost | undefined;
  let dom: RemoteDomain | undefined;
  let work: string;
  let repoDir: string;
  const domName = `bkfs-remote-${process.pid}`;
  const children: ChildProcess[] = [];
  const refs: Record<string, string> = {};

  const cli = (...args: string[]) => bkfs(['-r', repoDir, ...args]);
  const cliOk = (...args: string[]) => bkfsOk(['-r', repoDir, ...args]);
  /** `bkfs backup --libvirt DOMAIN --connect URI` (no VM argument: the domain's name is used). */
  const backupArgs = (...args: string[]) => [
    '-r',
    repoDir,
    'backup',
    '--libvirt',
    domName,
    '--connect',
    host!.uri,
    '--scratch-dir',
    RSCRATCH,
    ...args,
  ];
  const backup = (...args: string[]) => bkfs(backupArgs(...args));
  const backupOk = async (...args: string[]) => {
    const r = await backup(...args);
    assert.equal(r.code, 0, `bkfs backup ${args.join(' ')}: ${r.stderr}`);
    return r;
  };
  const list = async (): Promise<ListRow[]> =>
    JSON.parse((await cliOk('list', domName, '--json')).stdout) as ListRow[];

  async function write(target: string, cmd: string): Promise<void> {
    await dom!.qemuIo(target, cmd);
    await qemuIo(refs[target]!, 'raw', cmd);
  }

  function snapshot(label: string): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [t, ref] of Object.entries(refs)) {
      out[t] = path.join(work, `${label}-${t}.raw`);
      fs.copyFileSync(ref, out[t]!);
    }
    return out;
  }

  /** Entries of the remote scratch directory (read on the remote host). */
  async function remoteScratch(): Promise<string[]> {
    const r = await host!.exec('ls', ['-A', RSCRATCH]);
    assert.equal(r.code, 0, r.stderr);
    return r.stdout.split('\n').filter((l) => l !== '');
  }

  async function assertNoLeftovers(): Promise<void> {
    assert.deepEqual(await host!.runningJobs(), [], 'no job left running on the remote host');
    assert.deepEqual(await remoteScratch(), [], 'remote scratch directory is empty');
  }

  function repoState(): string {
    const repo = Repository.open(repoDir);
    try {
      return JSON.stringify({
        rows: repo.db
          .prepare('SELECT name, level, state, libvirt_checkpoint FROM checkpoints ORDER BY id')
          .all(),
        chunks: repo.db.prepare('SELECT count(*) AS n FROM chunks').get(),
      });
    } finally {
      repo.close();
    }
  }

  /** libvirt's bkfs checkpoints on the remote host are exactly those of the current chain. */
  async function assertListsAgree(): Promise<void> {
    const rows = await list();
    let start = -1;
    rows.forEach((r, i) => {
      if (r.level === 'full') start = i;
    });
    const chain = rows.slice(start).filter((r) => r.libvirtCheckpoint !== null);
    const own = (await dom!.checkpointNames()).filter((n) => n.startsWith('bkfs-'));
    assert.deepEqual(own.sort(), chain.map((r) => r.libvirtCheckpoint!).sort());
  }

  before(async () => {
    const missing = remoteHostMissing();
    if (missing !== null) throw new Error(`remote tests cannot run: ${missing}`);
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-remote-test-'));
    host = await RemoteHost.start();
    const mk = await host.exec('mkdir', ['-p', '-m', '0755', RDIR, RSCRATCH]);
    assert.equal(mk.code, 0, mk.stderr);
    // Images made here, then copied into the remote host's private tmpfs.
    const rnd = path.join(work, 'random.bin');
    fs.writeFileSync(rnd, randomBuffer(71, 6 * MiB));
    const local: Record<string, string> = {};
    for (const t of ['sda', 'sdb']) {
      local[t] = path.join(work, `${t}.qcow2`);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', local[t], '64M']);
    }
    await qemuIo(local.sda!, 'qcow2', `write -s ${rnd} 1M 6M`, 'write -P 0x11 32M 3M');
    await qemuIo(local.sdb!, 'qcow2', 'write -P 0x22 100000 2M', `write -s ${rnd} 40M 1M`);
    for (const t of ['sda', 'sdb']) {
      refs[t] = path.join(work, `${t}.ref.raw`);
      await run('qemu-img', ['convert', '-O', 'raw', '-f', 'qcow2', local[t]!, refs[t]]);
      const cp = await host.exec('cp', [local[t]!, `${RDIR}/${t}.qcow2`]);
      assert.equal(cp.code, 0, cp.stderr);
      fs.rmSync(local[t]!);
    }
    assert.ok(!fs.existsSync(`${RDIR}/sda.qcow2`), 'the images exist on the remote host only');
    dom = await host.createDomain(domName, [
      { target: 'sda', format: 'qcow2', file: `${RDIR}/sda.qcow2` },
      { target: 'sdb', format: 'qcow2', file: `${RDIR}/sdb.qcow2` },
    ]);
    repoDir = path.join(work, 'repo');
    await cliOk('init');
  });

  after(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    try {
      await host?.stop();
    } finally {
      if (work) fs.rmSync(work, { recursive: true, force: true });
    }
  });

  it('full -> inc -> inc -> diff of a running remote domain: every checkpoint equals the disks', async () => {
    const full = await backupOk('--level', 'full');
    assert.match(full.stdout, new RegExp(`${domName}@check1: full backup of 2 disk\\(s\\)`));
    assert.match(full.stdout, /crash-consistent, checkpoint bkfs-[0-9a-f]{32}$/m);
    const s1 = snapshot('s1');
    await assertNoLeftovers();
    await assertListsAgree();

    await write('sda', 'write -P 0x5a 20M 1M');
    await write('sda', 'write -z 2M 2M');
    await write('sdb', 'write -P 0x7e 12345 7000');
    const inc1 = await backupOk();
    assert.match(inc1.stdout, /@check2: inc backup of 2 disk\(s\)/);
    const s2 = snapshot('s2');

    await write('sdb', 'write -P 0x01 63M 1M');
    await write('sda', 'write -P 0x02 262000 1000');
    await backupOk('--level', 'inc', '--no-freeze');
    const s3 = snapshot('s3');

    await write('sda', 'write -P 0x03 40M 512k');
    const diff = await backupOk('--level', 'diff');
    assert.match(diff.stdout, /@check4: diff backup/);
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
    assert.ok(rows[1]!.bytesRead <= 2 * MiB, `inc read ${rows[1]!.bytesRead}`);
    assert.ok(rows[3]!.bytesRead >= rows[1]!.bytesRead);
    for (const [cp, snap] of [
      ['check1', s1],
      ['check2', s2],
      ['check3', s3],
      ['check4', s4],
    ] as const) {
      for (const t of ['sda', 'sdb']) {
        await assertCheckpointEquals(repoDir, `${domName}@${cp}`, t, snap[t]!, 30);
      }
    }
    const v = await cli('verify');
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });

  it('desync: a libvirt checkpoint deleted on the remote host: inc refused, auto takes a full', async () => {
    const rows = await list();
    await host!.virsh('checkpoint-delete', domName, rows[rows.length - 1]!.libvirtCheckpoint!);
    const before = repoState();
    const r = await backup('--level', 'inc');
    assert.equal(r.code, EXIT_CODES.CHAIN_BROKEN, r.stderr);
    assert.match(
      r.stderr,
      /libvirt checkpoint 'bkfs-[0-9a-f]{32}' of check4 is missing from domain .*--level full/,
    );
    assert.equal(repoState(), before, 'repository unchanged');
    await assertNoLeftovers();
    await write('sdb', 'write -P 0x44 5M 64k');
    const auto = await backupOk();
    assert.match(auto.stderr, /check4 is missing from domain .*; taking a full backup/);
    assert.match(auto.stdout, /@check5: full backup of 2 disk\(s\)/);
    assert.deepEqual(await dom!.checkpointNames(), [(await list())[4]!.libvirtCheckpoint]);
    const snap = snapshot('s5');
    for (const t of ['sda', 'sdb'])
      await assertCheckpointEquals(repoDir, `${domName}@check5`, t, snap[t]!, 20);
    await assertNoLeftovers();
  });

  /** A backup that stops itself (SIGSTOP) right after backup-begin; with its ssh child's PID. */
  async function stoppedBackup(label: string, args: string[]) {
    const stopFile = path.join(work, `${label}.pid`);
    const bin = stopAtBackupDumpxml(path.join(work, label), stopFile);
    const child = spawn(process.execPath, [BKFS, ...backupArgs(...args)], {
      env: { ...process.env, CI: 'true', PATH: `${bin}:${process.env.PATH}` },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
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
    assert.equal(await dom!.job(), 'Backup', 'the job runs on the remote host while bkfs is stopped');
    assert.equal((await remoteScratch()).length, 1, 'one job directory on the remote host');
    const ssh = childrenMatching(child.pid!, 'StreamLocalBindUnlink');
    assert.equal(ssh.length, 1, 'one ssh process carries the data path and the guard');
    return { child, ssh: ssh[0]!, exited, stderr: () => stderr };
  }

  it('kill -9 of bkfs mid-backup: the job on the remote host ends within 60 s, before any next run', async () => {
    const before = await list();
    const b = await stoppedBackup('kill', ['--level', 'inc']);
    b.child.kill('SIGKILL');
    await b.exited;
    const t0 = Date.now();
    await eventually('the remote guard ended the job', async () => (await dom!.job()) === null, 60_000);
    await eventually(
      'the remote guard removed the job directory',
      async () => (await remoteScratch()).length === 0,
      60_000,
    );
    await eventually('the ssh process exited', () => procState(b.ssh) === null, 60_000);
    assert.ok(Date.now() - t0 < 60_000);
    assert.equal((await list()).length, before.length, 'no half checkpoint');
    // The killed run's libvirt checkpoint is an orphan the next run deletes.
    await write('sda', 'write -P 0x77 9M 64k');
    const next = await backupOk('--level', 'inc');
    assert.match(
      next.stderr,
      /deleted libvirt checkpoint 'bkfs-[0-9a-f]{32}'.*no checkpoint of the repository uses it/,
    );
    const snap = snapshot('s6');
    await assertCheckpointEquals(repoDir, `${domName}@check6`, 'sda', snap.sda!, 20);
    await assertNoLeftovers();
    await assertListsAgree();
  });

  it('the ssh data path drops mid-backup: exit 28, nothing committed, the job ends on the remote host', async () => {
    const before = repoState();
    const b = await stoppedBackup('drop', ['--level', 'full']);
    // The master connection (every ssh of bkfs rides on it) dies.
    const master = childrenMatching(b.child.pid!, 'ControlPersist=no');
    assert.equal(master.length, 1, 'one ssh master connection');
    process.kill(master[0]!, 'SIGKILL');
    const gone = (pid: number) => [null, 'Z'].includes(procState(pid)); // a zombie: bkfs is stopped
    await eventually('ssh gone', () => gone(master[0]!) && gone(b.ssh));
    b.child.kill('SIGCONT');
    const code = await b.exited;
    assert.equal(code, EXIT_CODES.REMOTE_FAILED, b.stderr());
    assert.match(b.stderr(), /ssh connection to root@[\d.]+ carrying the backup data dropped/);
    assert.equal(repoState(), before, 'repository unchanged');
    await eventually(
      'no job on the remote host',
      async () => (await host!.runningJobs()).length === 0,
      60_000,
    );
    await eventually('remote scratch empty', async () => (await remoteScratch()).length === 0, 60_000);
    await assertListsAgree();
  });

  it('a shut-off remote domain: a full of its images through qemu-nbd on the remote host', async () => {
    const off = `${domName}-off`;
    const rnd = path.join(work, 'random2.bin');
    fs.writeFileSync(rnd, randomBuffer(72, 3 * MiB));
    const offRefs: Record<string, string> = {};
    for (const [t, fmt] of [
      ['vda', 'qcow2'],
      ['vdb', 'raw'],
    ] as const) {
      const img = path.join(work, `off-${t}.${fmt}`);
      await run('qemu-img', ['create', '-q', '-f', fmt, img, '24M']);
      await qemuIo(img, fmt, `write -s ${rnd} 3M 3M`, `write -P 0x${t === 'vda' ? '61' : '62'} 17M 1M`);
      offRefs[t] = path.join(work, `off-${t}.ref.raw`);
      await run('qemu-img', ['convert', '-O', 'raw', '-f', fmt, img, offRefs[t]]);
      const cp = await host!.exec('cp', [img, `${RDIR}/off-${t}.${fmt}`]);
      assert.equal(cp.code, 0, cp.stderr);
      fs.rmSync(img);
    }
    const xml = path.join(work, 'off.xml');
    fs.writeFileSync(
      xml,
      domainXml(off, [
        { target: 'vda', format: 'qcow2', file: `${RDIR}/off-vda.qcow2`, bus: 'virtio' },
        { target: 'vdb', format: 'raw', file: `${RDIR}/off-vdb.raw`, bus: 'virtio' },
      ]),
    );
    await host!.virsh('define', xml);
    const r = await bkfs([...backupArgs().map((a) => (a === domName ? off : a))]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /is shut off: taking a full backup of its images/);
    assert.match(r.stdout, new RegExp(`${off}@check1: full backup of 2 disk\\(s\\)`));
    assert.match(r.stdout, /offline, no libvirt checkpoint/);
    for (const t of ['vda', 'vdb'])
      await assertCheckpointEquals(repoDir, `${off}@check1`, t, offRefs[t]!, 20);
    assert.deepEqual(await remoteScratch(), [], 'qemu-nbd and its directory are gone on the remote host');
    const inc = await bkfs([...backupArgs('--level', 'inc').map((a) => (a === domName ? off : a))]);
    assert.equal(inc.code, EXIT_CODES.CHAIN_BROKEN, inc.stderr);
    assert.match(inc.stderr, /is shut off/);
  });

  it('an unreachable or unauthenticated host: exit 28, one line, repository unchanged', async () => {
    const before = repoState();
    const otherKey = path.join(work, 'other_key');
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', otherKey]);
    for (const uri of [
      host!.uri.replace(host!.keyfile, otherKey),
      // The host side of the veth pair: nothing listens on port 22 there.
      `qemu+ssh://root@${host!.hostAddress}:22/system?keyfile=${host!.keyfile}&no_verify=1&no_tty=1`,
    ]) {
      const r = await bkfs(['-r', repoDir, 'backup', '--libvirt', domName, '--connect', uri]);
      assert.equal(r.code, EXIT_CODES.REMOTE_FAILED, r.stderr);
      assert.match(
        r.stderr,
        /cannot reach root@[\d.]+(:22)? over ssh: .*(Permission denied|Connection refused)/,
      );
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    }
    assert.equal(repoState(), before);
  });
});

/** PIDs of the processes named `comm` that run in `host`'s mount namespace (its qemu-nbds...). */
function remoteProcesses(host: RemoteHost, comm: string): number[] {
  const ns = fs.readlinkSync(`/proc/${host.holderPid}/ns/mnt`);
  const out: number[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (fs.readFileSync(`/proc/${e}/comm`, 'utf8').trim() !== comm) continue;
      if (fs.readlinkSync(`/proc/${e}/ns/mnt`) === ns) out.push(Number(e));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/**
 * Restores onto the remote hypervisor (`bkfs restore --connect qemu+ssh://`): the marker guest
 * (test/helpers/libvirt.ts) is defined, shut off, on the remote host and backed up from its images
 * over ssh; the checkpoint is restored with --define onto that host, where the new domain boots to
 * its marker. Checked too: the restored files are byte-identical to the checkpoint (raw, and qcow2
 * read back with qemu-img on the remote host), 0600 in a 0711 directory; existing files and
 * domains are refused (exit 17) without a change; kill -9 of bkfs mid-restore leaves no qemu-nbd
 * running on the remote host and no file behind; an unreachable host is exit 28.
 */
describe('restores onto a remote hypervisor (qemu+ssh)', () => {
  let host: RemoteHost | undefined;
  let work: string;
  let repoDir: string;
  const origName = `bkfs-rrestore-orig-${process.pid}`;
  const newName = `bkfs-rrestore-new-${process.pid}`;
  const MARKER = `remote-restore-marker-${process.pid}`;
  const RCONSOLE = `${RDIR}/console.log`;
  const children: ChildProcess[] = [];
  let origRaw: string;
  let bigRaw: string;

  const cli = (...args: string[]) => bkfs(['-r', repoDir, ...args]);
  const cliOk = (...args: string[]) => bkfsOk(['-r', repoDir, ...args]);
  /** A path on the remote host as this host sees it (through the namespace holder's root). */
  const rpath = (p: string) => `/proc/${host!.holderPid}/root${p}`;
  const rls = (p: string) => (fs.existsSync(rpath(p)) ? fs.readdirSync(rpath(p)).sort() : null);

  before(async () => {
    const missing = remoteHostMissing() ?? markerGuestMissing();
    if (missing !== null) throw new Error(`remote restore tests cannot run: ${missing}`);
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-rrestore-test-'));
    fs.chmodSync(work, 0o755); // the remote host's QEMU (libvirt-qemu) reads the initrd here
    host = await RemoteHost.start();
    const mk = await host.exec('mkdir', ['-p', '-m', '0755', RDIR, RSCRATCH]);
    assert.equal(mk.code, 0, mk.stderr);
    const initrd = path.join(work, 'initrd');
    buildMarkerInitrd(initrd);
    // 64 MiB: 24 MiB of random data from 0 (the marker sector at 4 MiB inside it), then a hole.
    origRaw = path.join(work, 'orig.raw');
    fs.writeFileSync(origRaw, randomBuffer(81, 24 * MiB));
    fs.truncateSync(origRaw, 64 * MiB);
    writeMarker(origRaw, MARKER);
    const qcow = path.join(work, 'orig.qcow2');
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', origRaw, qcow]);
    const cp = await host.exec('cp', [qcow, `${RDIR}/orig.qcow2`]);
    assert.equal(cp.code, 0, cp.stderr);
    fs.rmSync(qcow);
    const xml = path.join(work, 'orig.xml');
    fs.writeFileSync(
      xml,
      markerDomainXml(origName, {
        initrd,
        disk: `${RDIR}/orig.qcow2`,
        format: 'qcow2',
        consoleLog: RCONSOLE,
      }),
    );
    await host.virsh('define', xml);
    repoDir = path.join(work, 'repo');
    await cliOk('init');
    // The shut-off remote domain: a full of its image through qemu-nbd on the remote host.
    const b = await cliOk('backup', '--libvirt', origName, '--connect', host.uri, '--scratch-dir', RSCRATCH);
    assert.match(b.stderr, /is shut off: taking a full backup of its images/);
    // A larger VM for the kill test (backed up from a local file).
    bigRaw = path.join(work, 'big.raw');
    fs.writeFileSync(bigRaw, randomBuffer(82, 160 * MiB));
    await cliOk('backup', 'big', '--disk', `vda=raw:${bigRaw}`);
  });

  after(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    try {
      await host?.stop();
    } finally {
      if (work) fs.rmSync(work, { recursive: true, force: true });
    }
  });

  it('the shut-off remote domain backup is byte-identical to its image', async () => {
    await assertCheckpointEquals(repoDir, `${origName}@check1`, 'vda', origRaw, 30);
  });

  it('restore --connect --define: byte-identical files on the remote host, and the domain boots there to its marker', async () => {
    const dir = `${RDIR}/restored`;
    const r = await cliOk(
      'restore',
      `${origName}@check1`,
      '--connect',
      host!.uri,
      '--to',
      dir,
      '--define',
      newName,
    );
    assert.match(
      r.stdout,
      new RegExp(`vda -> root@[\\d.]+:${dir}/vda\\.raw \\(raw, 64\\.0 MiB\\): 24\\.0 MiB written`),
    );
    assert.match(r.stdout, new RegExp(`defined libvirt domain '${newName}'`));
    assert.deepEqual(
      rls(dir),
      ['domain.orig.xml', 'domain.xml', 'vda.raw'],
      'no partial file or socket left',
    );
    assert.equal(fs.statSync(rpath(dir)).mode & 0o777, 0o711, 'libvirt-qemu may reach the images');
    assert.equal(fs.statSync(rpath(`${dir}/vda.raw`)).mode & 0o777, 0o600);
    assert.ok(fs.statSync(rpath(`${dir}/vda.raw`)).blocks * 512 < 40 * MiB, 'the hole stays a hole');
    await assertCheckpointEquals(repoDir, `${origName}@check1`, 'vda', rpath(`${dir}/vda.raw`), 30);
    assert.deepEqual(remoteProcesses(host!, 'qemu-nbd'), [], 'no qemu-nbd left on the remote host');

    const def = await host!.virsh('dumpxml', '--inactive', newName);
    assert.match(def, new RegExp(`<source file='${dir}/vda\\.raw'/>`));
    assert.match(def, /<driver name='qemu' type='raw'\/>/);
    assert.doesNotMatch(def, /52:54:00:4b:46:53/, 'a new MAC address');
    const uuid = (await host!.virsh('domuuid', newName)).trim();
    assert.notEqual(uuid, (await host!.virsh('domuuid', origName)).trim(), 'a new UUID');

    // Existing files and an existing domain are refused: nothing changes.
    const mtime = fs.statSync(rpath(`${dir}/vda.raw`)).mtimeMs;
    const again = await cli('restore', `${origName}@check1`, '--connect', host!.uri, '--to', dir);
    assert.equal(again.code, EXIT_CODES.TARGET_EXISTS, again.stderr);
    assert.match(again.stderr, /vda\.raw exists \(use --force to replace it\)/);
    const dup = await cli(
      'restore',
      origName,
      '--connect',
      host!.uri,
      '--to',
      `${RDIR}/dup`,
      '--define',
      newName,
    );
    assert.equal(dup.code, EXIT_CODES.TARGET_EXISTS, dup.stderr);
    assert.match(dup.stderr, /already has a domain named/);
    assert.equal(rls(`${RDIR}/dup`), null, 'nothing created');
    assert.deepEqual(rls(dir), ['domain.orig.xml', 'domain.xml', 'vda.raw']);
    assert.equal(fs.statSync(rpath(`${dir}/vda.raw`)).mtimeMs, mtime);
    // --force replaces the files and redefines the domain, keeping its UUID.
    const forced = await cli(
      'restore',
      `${origName}@check1`,
      '--connect',
      host!.uri,
      '--to',
      dir,
      '--define',
      newName,
      '--force',
    );
    assert.equal(forced.code, 0, forced.stderr);
    assert.notEqual(fs.statSync(rpath(`${dir}/vda.raw`)).mtimeMs, mtime, 'replaced');
    assert.equal((await host!.virsh('domuuid', newName)).trim(), uuid, 'the same UUID');
    assert.deepEqual(rls(dir), ['domain.orig.xml', 'domain.xml', 'vda.raw']);

    // The restored domain boots on the remote host and reads its marker from the restored disk.
    fs.rmSync(rpath(RCONSOLE), { force: true });
    await host!.virsh('start', newName);
    await eventually(
      "the marker on the restored domain's console",
      () => consoleLines(rpath(RCONSOLE), 'BKFS-MARKER').length > 0,
      600_000,
    );
    assert.deepEqual(consoleLines(rpath(RCONSOLE), 'BKFS-MARKER'), [`BKFS-MARKER ${MARKER}`]);
    await host!.virsh('destroy', newName);
  });

  it('restore --connect --format qcow2: the image read back on the remote host equals the checkpoint', async () => {
    const dir = `${RDIR}/as-qcow2`;
    await cliOk('restore', origName, '--connect', host!.uri, '--to', dir, '--format', 'qcow2');
    assert.deepEqual(rls(dir), ['domain.orig.xml', 'domain.xml', 'vda.qcow2']);
    assert.equal(fs.statSync(rpath(dir)).mode & 0o777, 0o700);
    const c = await host!.exec('qemu-img', [
      'convert',
      '-f',
      'qcow2',
      '-O',
      'raw',
      `${dir}/vda.qcow2`,
      `${dir}/back.raw`,
    ]);
    assert.equal(c.code, 0, c.stderr);
    await assertCheckpointEquals(repoDir, `${origName}@check1`, 'vda', rpath(`${dir}/back.raw`), 10);
    const cmp = await host!.exec('qemu-img', ['compare', '-q', `${dir}/vda.qcow2`, `${RDIR}/orig.qcow2`]);
    assert.equal(cmp.code, 0, 'qemu-img compare on the remote host: identical');
  });

  it('kill -9 of bkfs mid-restore: no qemu-nbd stays running on the remote host, no file is left', async () => {
    const dir = `${RDIR}/killed`;
    const child = spawn(
      process.execPath,
      [BKFS, '-r', repoDir, 'restore', 'big', '--connect', host!.uri, '--to', dir],
      {
        env: { ...process.env, CI: 'true' },
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    children.push(child);
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<void>((res) => child.once('exit', () => res()));
    const partial = rpath(`${dir}/vda.raw.bkfs-partial`);
    // Poll hard: the moment data has reached the partial file on the remote host, kill bkfs.
    for (let i = 0; ; i++) {
      const st = fs.statSync(partial, { throwIfNoEntry: false });
      // (qemu-img create already allocates the first block: wait for real data.)
      if (st && st.blocks * 512 >= 4 * MiB) break;
      assert.ok(child.exitCode === null, `bkfs ended before the kill: ${stderr}`);
      assert.ok(i < 600_000, 'data never reached the remote host');
      await new Promise((r) => setTimeout(r, 2));
    }
    const ssh = childrenMatching(child.pid!, 'ssh');
    const nbds = remoteProcesses(host!, 'qemu-nbd');
    assert.equal(nbds.length, 1, `one qemu-nbd serves the partial file: ${nbds.join(',')}`);
    child.kill('SIGKILL');
    await exited;
    const t0 = Date.now();
    await eventually(
      'no qemu-nbd on the remote host',
      () => remoteProcesses(host!, 'qemu-nbd').length === 0,
      60_000,
    );
    await eventually('the partial file and the directory removed', () => rls(dir) === null, 60_000);
    await eventually("bkfs's ssh processes exited", () => ssh.every((p) => procState(p) === null), 60_000);
    assert.ok(Date.now() - t0 < 60_000);
    assert.ok(ssh.length >= 2, `the master and the session ssh: ${ssh.join(',')}`);
    assert.equal(fs.readdirSync(rpath(RDIR)).filter((n) => n.includes('bkfs-restore')).length, 0);
  });

  it('an unreachable host: exit 28, one line, nothing written', async () => {
    const otherKey = path.join(work, 'other_key');
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', otherKey]);
    const r = await cli(
      'restore',
      origName,
      '--connect',
      host!.uri.replace(host!.keyfile, otherKey),
      '--to',
      `${RDIR}/never`,
    );
    assert.equal(r.code, EXIT_CODES.REMOTE_FAILED, r.stderr);
    assert.match(r.stderr, /cannot reach root@[\d.]+ over ssh: .*Permission denied/);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.equal(rls(`${RDIR}/never`), null);
    const rel = await cli('restore', origName, '--connect', host!.uri, '--to', 'relative/dir');
    assert.equal(rel.code, EXIT_CODES.USAGE, rel.stderr);
  });
});
