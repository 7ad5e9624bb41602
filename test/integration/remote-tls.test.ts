/**
 * Remote backups whose disk data travels over NBD+TLS (libvirt `<server transport='tcp' tls='yes'>`,
 * qemu.conf backup_tls_x509_*), or, only when asked, over plain NBD/TCP; and libvirt's own
 * qemu+tls:// transport. The hypervisor is test/helpers/remote-host.ts started with `{ tls: true }`
 * (certificates made by openssl; libvirtd listening on TLS and TCP in the namespace).
 *
 * Checked: qemu+ssh + --nbd-tls: full -> inc byte for byte, and while the job runs its NBD server
 * speaks TLS only (a plain client is refused) and no ssh forwarding exists; qemu+tls://?pkipath=
 * (virsh over TLS, NBD over TLS with the same certificates by default): inc byte for byte; a client
 * certificate of another CA: exit 39 (TLS_FAILED), one line, repository unchanged, no job left on
 * the hypervisor; qemu+tcp:// refused without --insecure-tcp (exit 2) and working with it, as does
 * --insecure-tcp with qemu+ssh; a shut-off domain over qemu+tls:// refused (exit 2) rather than
 * its image path being read on this host.
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
import { childrenMatching, domainXml, eventually, procState, stopAtBackupDumpxml } from '../helpers/libvirt';
import { RemoteHost, remoteHostMissing, type RemoteDomain } from '../helpers/remote-host';
import { issue, libvirtPkiDir, makeCa } from '../helpers/tls-certs';
import { Repository } from '../../src/repo/repository';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { NbdClient } from '../../src/nbd/client';
import { isBkfsError } from '../../src/errors';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const RDIR = '/var/lib/libvirt/bkfs-remote-tls-test';
const RSCRATCH = `${RDIR}/scratch`;

describe('remote backups over NBD+TLS, qemu+tls:// and --insecure-tcp', () => {
  let host: RemoteHost | undefined;
  let dom: RemoteDomain | undefined;
  let work = '';
  let repoDir = '';
  let ref = '';
  let otherClient = '';
  let otherPki = '';
  const domName = `bkfs-rtls-${process.pid}`;
  const children: ChildProcess[] = [];

  const backupArgs = (uri: string, ...args: string[]) => [
    '-r', repoDir, 'backup', '--libvirt', domName, '--connect', uri, '--scratch-dir', RSCRATCH, ...args,
  ]; // prettier-ignore

  async function write(cmd: string): Promise<void> {
    await dom!.qemuIo('sda', cmd);
    await qemuIo(ref, 'raw', cmd);
  }

  function snapshot(label: string): string {
    const p = path.join(work, `${label}.raw`);
    fs.copyFileSync(ref, p);
    return p;
  }

  async function assertNoLeftovers(): Promise<void> {
    await eventually(
      'no job on the remote host',
      async () => (await host!.runningJobs()).length === 0,
      60_000,
    );
    const r = await host!.exec('ls', ['-A', RSCRATCH]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '', 'remote scratch directory is empty');
  }

  function repoState(): string {
    const repo = Repository.open(repoDir);
    try {
      return JSON.stringify(
        repo.db.prepare('SELECT name, level, state, libvirt_checkpoint FROM checkpoints ORDER BY id').all(),
      );
    } finally {
      repo.close();
    }
  }

  before(async () => {
    const missing = remoteHostMissing();
    if (missing !== null) throw new Error(`remote-tls tests cannot run: ${missing}`);
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-remote-tls-test-'));
    host = await RemoteHost.start({ tls: true });
    const mk = await host.exec('mkdir', ['-p', '-m', '0755', RDIR, RSCRATCH]);
    assert.equal(mk.code, 0, mk.stderr);
    const rnd = path.join(work, 'random.bin');
    fs.writeFileSync(rnd, randomBuffer(81, 5 * MiB));
    const img = path.join(work, 'sda.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '48M']);
    await qemuIo(img, 'qcow2', `write -s ${rnd} 1M 5M`, 'write -P 0x21 20M 2M');
    ref = path.join(work, 'sda.ref.raw');
    await run('qemu-img', ['convert', '-O', 'raw', '-f', 'qcow2', img, ref]);
    const cp = await host.exec('cp', [img, `${RDIR}/sda.qcow2`]);
    assert.equal(cp.code, 0, cp.stderr);
    fs.rmSync(img);
    dom = await host.createDomain(domName, [{ target: 'sda', format: 'qcow2', file: `${RDIR}/sda.qcow2` }]);
    repoDir = path.join(work, 'repo');
    await bkfsOk(['-r', repoDir, 'init']);
    // Certificates of another CA: what a misconfigured backup server would present.
    const other = await makeCa(path.join(work, 'other-ca'), 'another CA');
    otherClient = path.join(work, 'other-client');
    await issue(other, otherClient, 'client', ['bkfs-backup-server']);
    otherPki = libvirtPkiDir(otherClient, path.join(work, 'other-pki'));
  });

  after(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    try {
      await host?.stop();
    } finally {
      if (work) fs.rmSync(work, { recursive: true, force: true });
    }
  });

  it('qemu+ssh + --nbd-tls: full -> inc byte for byte; the job serves NBD over TLS only, no ssh forwarding', async () => {
    const stopFile = path.join(work, 'stop.pid');
    const bin = stopAtBackupDumpxml(path.join(work, 'stop'), stopFile);
    const child = spawn(
      process.execPath,
      [BKFS, ...backupArgs(host!.uri, '--nbd-tls', host!.clientTlsDir, '--level', 'full')],
      {
        env: { ...process.env, CI: 'true', PATH: `${bin}:${process.env.PATH}` },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    children.push(child);
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdout.resume();
    const exited = new Promise<number>((res) =>
      child.once('exit', (code, sig) => res(code ?? (sig ? 128 : 1))),
    );
    await eventually(
      'bkfs stopped after backup-begin',
      () => fs.existsSync(stopFile) && procState(child.pid!) === 'T',
    );
    const xml = await host!.virsh('backup-dumpxml', domName);
    const m = /<server transport='tcp' tls='yes' name='([^']+)' port='(\d+)'\/>/.exec(xml);
    assert.ok(m, `the job serves NBD over TCP+TLS: ${xml}`);
    assert.equal(m[1], host!.address);
    const port = Number(m[2]);
    assert.ok(port >= 10809 && port <= 10872, `port ${port} from the default range`);
    await assert.rejects(
      NbdClient.connect(`nbd://${host!.address}:${port}/sda`),
      (e: unknown) => isBkfsError(e, 'TLS_FAILED') && /requires TLS/.test((e as Error).message),
      'a plain NBD client is refused by the job',
    );
    assert.deepEqual(childrenMatching(child.pid!, 'StreamLocalBindUnlink'), [], 'no ssh forwarding');
    child.kill('SIGCONT');
    assert.equal(await exited, 0, stderr);
    const s1 = snapshot('s1');
    await assertNoLeftovers();

    await write('write -P 0x5a 9M 1M');
    await write('write -z 2M 64k');
    const inc = await bkfs(backupArgs(host!.uri, '--nbd-tls', host!.clientTlsDir, '--level', 'inc'));
    assert.equal(inc.code, 0, inc.stderr);
    assert.match(inc.stdout, /@check2: inc backup of 1 disk\(s\)/);
    const s2 = snapshot('s2');
    await assertCheckpointEquals(repoDir, `${domName}@check1`, 'sda', s1, 20);
    await assertCheckpointEquals(repoDir, `${domName}@check2`, 'sda', s2, 20);
    await assertNoLeftovers();
  });

  it('qemu+tls://?pkipath=: virsh over libvirt TLS and NBD over TLS with the same certificates; inc byte for byte', async () => {
    const list = await run('virsh', ['-c', host!.tlsUri, 'list', '--name'], { allowFail: true });
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, new RegExp(domName));
    await write('write -P 0x6c 30M 512k');
    const r = await bkfs(backupArgs(host!.tlsUri, '--level', 'inc'));
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /@check3: inc backup of 1 disk\(s\)/);
    await assertCheckpointEquals(repoDir, `${domName}@check3`, 'sda', snapshot('s3'), 20);
    await assertNoLeftovers();
    // No ssh anywhere: the job's scratch files were made by libvirt itself and are gone.
  });

  it('a client certificate of another CA: exit 39, one line, repository unchanged, no job left', async () => {
    const before = repoState();
    // (--no-freeze: the test guest has no agent, whose note would be a second line)
    const viaSsh = await bkfs(
      backupArgs(host!.uri, '--nbd-tls', otherClient, '--level', 'full', '--no-freeze'),
    );
    assert.equal(viaSsh.code, EXIT_CODES.TLS_FAILED, viaSsh.stderr);
    assert.match(viaSsh.stderr, /not signed by the trusted CA/);
    assert.equal(viaSsh.stderr.trim().split('\n').length, 1, viaSsh.stderr);
    assert.equal(repoState(), before, 'repository unchanged');
    await assertNoLeftovers();
    const viaTls = await bkfs(
      backupArgs(host!.tlsUri.replace(host!.pkiDir, otherPki), '--level', 'full', '--no-freeze'),
    );
    assert.match(viaTls.stderr, /TLS connection to libvirt at qemu\+tls:.* failed/);
    assert.equal(viaTls.code, EXIT_CODES.TLS_FAILED, viaTls.stderr);
    assert.equal(viaTls.stderr.trim().split('\n').length, 1, viaTls.stderr);
    assert.equal(repoState(), before, 'repository unchanged');
    await assertNoLeftovers();
  });

  it('plain TCP only with --insecure-tcp: qemu+tcp:// is refused without it and works with it', async () => {
    const before = repoState();
    const refused = await bkfs(backupArgs(host!.tcpUri, '--level', 'inc'));
    assert.equal(refused.code, EXIT_CODES.USAGE, refused.stderr);
    assert.match(refused.stderr, /unencrypted and unauthenticated.*--insecure-tcp/);
    assert.equal(refused.stderr.trim().split('\n').length, 1);
    const both = await bkfs(backupArgs(host!.uri, '--insecure-tcp', '--nbd-tls', host!.clientTlsDir));
    assert.equal(both.code, EXIT_CODES.USAGE, both.stderr);
    assert.equal(repoState(), before);
    await assertNoLeftovers();

    await write('write -P 0x7d 40M 256k');
    const ok = await bkfs(backupArgs(host!.tcpUri, '--insecure-tcp', '--level', 'inc'));
    assert.equal(ok.code, 0, ok.stderr);
    await assertCheckpointEquals(repoDir, `${domName}@check4`, 'sda', snapshot('s4'), 20);
    await write('write -P 0x7e 41M 256k');
    const viaSsh = await bkfs(backupArgs(host!.uri, '--insecure-tcp', '--level', 'inc'));
    assert.equal(viaSsh.code, 0, viaSsh.stderr);
    await assertCheckpointEquals(repoDir, `${domName}@check5`, 'sda', snapshot('s5'), 20);
    await assertNoLeftovers();
    const v = await bkfs(['-r', repoDir, 'verify']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });

  it('a shut-off domain over qemu+tls://: refused (its images are read through ssh only), nothing read here', async () => {
    const off = `${domName}-off`;
    const xml = path.join(work, 'off.xml');
    fs.writeFileSync(
      xml,
      domainXml(off, [{ target: 'vda', format: 'qcow2', file: `${RDIR}/sda.qcow2`, bus: 'virtio' }]),
    );
    await host!.virsh('define', xml);
    const r = await bkfs(['-r', repoDir, 'backup', '--libvirt', off, '--connect', host!.tlsUri]);
    assert.equal(r.code, EXIT_CODES.USAGE, r.stderr);
    assert.match(r.stderr, /is shut off: bkfs reads the images of a shut-off remote domain through ssh only/);
  });
});
