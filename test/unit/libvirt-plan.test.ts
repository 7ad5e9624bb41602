/**
 * Decisions of a libvirt backup: disk selection, checkpoint names, the reconciliation of libvirt's
 * checkpoints with the repository (every desync case), libvirt URIs (local, ssh, refused ones),
 * the quoting of remote commands, virsh output.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import {
  checkConnectUri,
  parseLibvirtUri,
  incrementalDisks,
  isBkfsSocket,
  isLiveState,
  isNoAgentError,
  jobOperation,
  libvirtCheckpointName,
  legacyPrefix,
  nextCheckpointName,
  ownCheckpointsToDelete,
  reconcileProblem,
  selectDisks,
  virshError,
  type ReconcileInput,
  bkfsJobKey,
  chooseTransport,
  parseDirectUri,
  parsePortRange,
} from '../../src/backup/libvirt-plan';
import type { DomainDisk, LibvirtCheckpoint } from '../../src/backup/libvirt-xml';
import { isBkfsError } from '../../src/errors';
import { remoteCommand, shq, sshArgs } from '../../src/backup/libvirt-remote';
import { run } from '../../src/util/proc';

function disk(target: string, o: Partial<DomainDisk> = {}): DomainDisk {
  return {
    target,
    device: 'disk',
    type: 'file',
    format: 'qcow2',
    bus: 'scsi',
    source: `/img/${target}.qcow2`,
    readonly: false,
    shareable: false,
    transient: false,
    ...o,
  };
}

const DISKS = [
  disk('sda'),
  disk('sdb'),
  disk('sdc', { format: 'raw', source: '/img/sdc.raw' }),
  disk('hdc', { device: 'cdrom', source: null, readonly: true }),
  disk('sdd', { readonly: true }),
  disk('sde', { shareable: true }),
  disk('vdn', { type: 'network', source: 'nbd:x' }),
];

const targets = (ds: DomainDisk[]) => ds.map((d) => d.target);

test('selectDisks: full takes qcow2 and raw, skips cdrom, read-only and shareable with a reason', () => {
  const s = selectDisks(DISKS, 'full', true);
  assert.deepEqual(targets(s.selected), ['sda', 'sdb', 'sdc', 'vdn']);
  assert.deepEqual(
    s.skipped.map((x) => x.target),
    ['hdc', 'sdd', 'sde'],
  );
  assert.match(s.skipped[0]!.reason, /cdrom/);
  assert.match(s.skipped[1]!.reason, /read-only/);
  assert.match(s.skipped[2]!.reason, /shareable/);
});

test('selectDisks: inc/diff skip raw disks (no bitmaps); offline skips network disks', () => {
  const inc = selectDisks(DISKS, 'inc', true);
  assert.deepEqual(targets(inc.selected), ['sda', 'sdb', 'vdn']);
  assert.match(inc.skipped.find((x) => x.target === 'sdc')!.reason, /raw, which has no dirty bitmaps/);
  const off = selectDisks(DISKS, 'full', false);
  assert.deepEqual(targets(off.selected), ['sda', 'sdb', 'sdc']);
  assert.match(off.skipped.find((x) => x.target === 'vdn')!.reason, /running domain/);
});

test('selectDisks: --disks and --exclude, comma lists, unknown and impossible names are errors', () => {
  assert.deepEqual(targets(selectDisks(DISKS, 'full', true, { only: ['sdb,sda'] }).selected), ['sda', 'sdb']);
  const ex = selectDisks(DISKS, 'full', true, { exclude: ['sdb', 'sdc'] });
  assert.deepEqual(targets(ex.selected), ['sda', 'vdn']);
  assert.deepEqual(
    ex.skipped.filter((x) => x.reason === 'excluded').map((x) => x.target),
    ['sdb', 'sdc'],
  );
  const usage = (re: RegExp) => (e: unknown) => isBkfsError(e, 'USAGE') && re.test((e as Error).message);
  assert.throws(
    () => selectDisks(DISKS, 'full', true, { only: ['vdz'] }),
    usage(/no disk 'vdz'.*it has: sda/),
  );
  assert.throws(() => selectDisks(DISKS, 'full', true, { exclude: ['vdz'] }), usage(/no disk 'vdz'/));
  assert.throws(
    () => selectDisks(DISKS, 'full', true, { only: ['hdc'] }),
    usage(/'hdc' cannot be backed up.*cdrom/),
  );
  assert.throws(() => selectDisks(DISKS, 'inc', true, { only: ['sdc'] }), usage(/'sdc' cannot.*level inc/));
  assert.throws(
    () => selectDisks([DISKS[3]!], 'full', true),
    usage(/no disk of the domain can be backed up/),
  );
});

test('incrementalDisks: the qcow2 disks; CHAIN_BROKEN when a named disk is raw or none is qcow2', () => {
  assert.deepEqual(incrementalDisks(DISKS), ['sda', 'sdb', 'vdn']);
  assert.deepEqual(incrementalDisks(DISKS, { exclude: ['sda'] }), ['sdb', 'vdn']);
  const broken = (e: unknown) => isBkfsError(e, 'CHAIN_BROKEN') && /--level full$/.test((e as Error).message);
  assert.throws(() => incrementalDisks(DISKS, { only: ['sda,sdc'] }), broken);
  assert.throws(() => incrementalDisks([DISKS[2]!]), broken);
});

test('checkpoint names: after the checkpoint uid, next name like the engine', () => {
  const uid = '0123456789abcdef0123456789abcdef';
  assert.equal(libvirtCheckpointName(uid), `bkfs-${uid}`);
  // Nothing of the repository id: a copy of the repository (same id) never makes the same name.
  assert.ok(!libvirtCheckpointName(uid).startsWith(legacyPrefix('00aa')));
  assert.equal(nextCheckpointName([]), 'check1');
  assert.equal(nextCheckpointName(['check1', 'nightly', 'check9', 'check10x']), 'check10');
});

const P = legacyPrefix('r1');
function cp(
  name: string,
  t: number,
  parent: string | null,
  sizes: (number | null)[] = [0, 0],
): LibvirtCheckpoint {
  return {
    name,
    parent,
    creationTime: t,
    disks: [
      { name: 'sda', checkpoint: 'bitmap', bitmap: name, size: sizes[0] ?? null },
      { name: 'sdb', checkpoint: 'bitmap', bitmap: name, size: sizes[1] ?? null },
      { name: 'sdc', checkpoint: 'no', bitmap: null, size: null },
    ],
  };
}

function input(over: Partial<ReconcileInput> = {}): ReconcileInput {
  return {
    domain: 'web',
    parent: { name: 'check2', libvirtCheckpoint: `${P}check2`, disks: ['sda', 'sdb', 'sdc'] },
    disks: ['sda', 'sdb'],
    checkpoints: [cp(`${P}check1`, 100, null), cp(`${P}check2`, 200, `${P}check1`)],
    own: new Set([`${P}check1`, `${P}check2`]),
    ...over,
  };
}

test('reconcile: agreement', () => {
  assert.equal(reconcileProblem(input()), null);
  // Our own later checkpoints (an orphan of a killed run whose row is still 'running', a later
  // inc) and older foreign ones are fine.
  const cps = [
    cp('other-tool.0', 50, null),
    cp(`${P}check1`, 100, 'other-tool.0'),
    cp(`${P}check2`, 200, `${P}check1`),
    cp(`${P}check3`, 300, `${P}check2`),
  ];
  const own = new Set([`${P}check1`, `${P}check2`, `${P}check3`]);
  assert.equal(reconcileProblem(input({ checkpoints: cps, own })), null);
  // The same names made by a copy of the repository (unknown to this one) come after ours.
  assert.match(
    reconcileProblem(input({ checkpoints: cps }))!,
    /checkpoint 'bkfs-r1-check3' of domain 'web' was made by another tool/,
  );
});

test('reconcile: the parent has no libvirt checkpoint (taken offline or from images)', () => {
  const p = reconcileProblem(input({ parent: { name: 'check2', libvirtCheckpoint: null, disks: ['sda'] } }));
  assert.match(p!, /check2 has no libvirt checkpoint/);
});

test('reconcile: the libvirt checkpoint was deleted', () => {
  const p = reconcileProblem(input({ checkpoints: [cp(`${P}check1`, 100, null)] }));
  assert.match(p!, /libvirt checkpoint 'bkfs-r1-check2' of check2 is missing from domain 'web'/);
});

test('reconcile: a bitmap missing or broken (no size reported)', () => {
  const p = reconcileProblem(
    input({ checkpoints: [cp(`${P}check1`, 100, null), cp(`${P}check2`, 200, `${P}check1`, [0, null])] }),
  );
  assert.match(p!, /dirty bitmap 'bkfs-r1-check2' of disk 'sdb' is missing or broken/);
});

test('reconcile: a disk the checkpoint does not track, or that the parent does not have', () => {
  assert.match(
    reconcileProblem(input({ disks: ['sda', 'sdc'] }))!,
    /'sdc' is not tracked by libvirt checkpoint/,
  );
  assert.match(
    reconcileProblem(input({ parent: { name: 'check2', libvirtCheckpoint: `${P}check2`, disks: ['sda'] } }))!,
    /disk 'sdb' is not in checkpoint check2/,
  );
});

test('reconcile: a checkpoint made by another tool after ours (newer, or a descendant)', () => {
  const newer = [
    cp(`${P}check1`, 100, null),
    cp(`${P}check2`, 200, `${P}check1`),
    cp('virtnbdbackup.0', 300, null),
  ];
  assert.match(
    reconcileProblem(input({ checkpoints: newer }))!,
    /checkpoint 'virtnbdbackup.0' of domain 'web' was made by another tool after bkfs's 'bkfs-r1-check2'/,
  );
  // Same second: cannot tell the order, so it counts as after.
  const same = [cp(`${P}check2`, 200, null), cp('x', 200, null)];
  assert.ok(reconcileProblem(input({ checkpoints: same })));
  // A descendant with an odd clock.
  const child = [cp(`${P}check2`, 200, null), cp('x', 10, `${P}check2`)];
  assert.ok(reconcileProblem(input({ checkpoints: child })));
  // An ancestor is before ours, whatever the clock says.
  const ancestor = [cp('x', 200, null), cp(`${P}check2`, 200, 'x')];
  assert.equal(reconcileProblem(input({ checkpoints: ancestor })), null);
  // Another bkfs repository (a copy of this one too) is another tool.
  const otherRepo = [cp(`${P}check2`, 200, null), cp('bkfs-r2-check1', 300, `${P}check2`)];
  assert.ok(reconcileProblem(input({ checkpoints: otherRepo })));
});

test('ownCheckpointsToDelete: only this repository, only those not kept', () => {
  const names = [`${P}check1`, `${P}check2`, `${P}check3`, 'virtnbdbackup.0', `${legacyPrefix('r2')}check1`];
  assert.deepEqual(ownCheckpointsToDelete(names, P, new Set([`${P}check2`])), [`${P}check1`, `${P}check3`]);
  // bkfs-r1- must not match bkfs-r10-...
  assert.deepEqual(ownCheckpointsToDelete([`${legacyPrefix('r10')}check1`], P, new Set()), []);
});

test('parseLibvirtUri: local QEMU, or a remote host through ssh', () => {
  for (const ok of [
    undefined,
    'qemu:///system',
    'qemu:///session',
    'qemu+unix:///system',
    'QEMU:///system',
  ]) {
    assert.equal(parseLibvirtUri(ok, {}), null);
    assert.doesNotThrow(() => checkConnectUri(ok, {}));
  }
  assert.deepEqual(
    parseLibvirtUri('qemu+ssh://backup@kvm1:2222/system?keyfile=/k/id&no_verify=1&no_tty=1', {}),
    {
      uri: 'qemu+ssh://backup@kvm1:2222/system?keyfile=/k/id&no_verify=1&no_tty=1',
      user: 'backup',
      host: 'kvm1',
      port: 2222,
      keyfile: '/k/id',
      knownHosts: null,
      noVerify: true,
      localUri: 'qemu:///system',
    },
  );
  const t = parseLibvirtUri('qemu+ssh://[fd00::2]/session?known_hosts=/kh', {})!;
  assert.equal(t.host, 'fd00::2');
  assert.equal(t.user, null);
  assert.equal(t.localUri, 'qemu:///session');
  assert.deepEqual(sshArgs(t).slice(-4), ['-o', 'UserKnownHostsFile=/kh', '--', 'fd00::2']);
  // The environment's default counts when --connect is not given.
  assert.equal(parseLibvirtUri(undefined, { LIBVIRT_DEFAULT_URI: 'qemu+ssh://h/system' })?.host, 'h');
  const usage = (re: RegExp) => (e: unknown) => isBkfsError(e, 'USAGE') && re.test((e as Error).message);
  assert.throws(() => parseLibvirtUri('qemu+tcp://host/system', {}), usage(/through ssh only/));
  assert.throws(() => parseLibvirtUri('qemu+tls://host/system', {}), usage(/through ssh only/));
  // A backup also reaches hypervisors over libvirt's own TLS (and, when asked, TCP) transport.
  assert.doesNotThrow(() => checkConnectUri('qemu+tls://host/system', {}));
  assert.throws(() => checkConnectUri('qemu://host/system', {}), usage(/qemu\+ssh/));
  assert.throws(() => checkConnectUri('xen:///system', {}), usage(/QEMU domains only/));
  assert.throws(() => checkConnectUri('system', {}), usage(/not a libvirt URI/));
  assert.throws(() => checkConnectUri('qemu+ssh:///system', {}), usage(/no host/));
});

test('remote commands: every argument is one shell word', async () => {
  const args = ["it's", 'a b', '$(touch /x)', '`y`', '"q"', '\\', ''];
  const r = await run('sh', ['-c', `${remoteCommand('printf "%s\\n" "$@"', args)}`]);
  assert.deepEqual(r.stdout.split('\n').slice(0, -1), args);
  assert.equal(shq("a'b"), `'a'\\''b'`);
});

test('virsh output: job info, domain state, agent errors, error lines, bkfs sockets', () => {
  assert.equal(jobOperation('Job type:         None        \n\n'), null);
  assert.equal(
    jobOperation(
      'Job type:         Unbounded   \nOperation:        Backup      \nTime elapsed:     162 ms\n',
    ),
    'Backup',
  );
  assert.ok(isLiveState('running\n'));
  assert.ok(isLiveState('paused'));
  assert.ok(!isLiveState('shut off\n'));
  assert.ok(isNoAgentError('error: argument unsupported: QEMU guest agent is not configured'));
  assert.ok(isNoAgentError('error: Guest agent is not responding: QEMU guest agent is not connected'));
  assert.ok(!isNoAgentError('error: Unable to freeze filesystems: Input/output error'));
  assert.equal(
    virshError('error: Failed to delete checkpoint x\nerror: internal error: bitmap not found\n'),
    'Failed to delete checkpoint x: internal error: bitmap not found',
  );
  assert.ok(isBkfsSocket('/var/tmp/bkfs-pull-a1B2c3/nbd.sock'));
  assert.ok(!isBkfsSocket('/var/tmp/other/nbd.sock'));
  assert.ok(!isBkfsSocket(null));
});

test('parseDirectUri: qemu+tls:// and qemu+tcp:// hypervisors (no ssh)', () => {
  assert.deepEqual(parseDirectUri('qemu+tls://kvm1.example/system?pkipath=/etc/pki/bkfs', {}), {
    uri: 'qemu+tls://kvm1.example/system?pkipath=/etc/pki/bkfs',
    kind: 'tls',
    host: 'kvm1.example',
    pkipath: '/etc/pki/bkfs',
  });
  assert.equal(parseDirectUri('qemu+tcp://[fd00::5]:16509/system', {})?.host, 'fd00::5');
  assert.equal(parseDirectUri('qemu+ssh://h/system', {}), null);
  assert.equal(parseDirectUri(undefined, {}), null);
});

test('chooseTransport: ssh forwarding by default, TLS for qemu+tls, plain TCP only when asked', () => {
  const usage = (re: RegExp) => (e: unknown) => isBkfsError(e, 'USAGE') && re.test((e as Error).message);
  assert.deepEqual(chooseTransport('local', {}), { kind: 'unix' });
  assert.deepEqual(chooseTransport('ssh', {}), { kind: 'ssh' });
  assert.deepEqual(chooseTransport('ssh', { nbdTls: '/d' }), { kind: 'tls', certDir: '/d' });
  assert.deepEqual(chooseTransport('ssh', { insecureTcp: true }), { kind: 'tcp' });
  assert.deepEqual(chooseTransport('tls', { pkipath: '/p' }), { kind: 'tls', certDir: '/p' });
  assert.deepEqual(chooseTransport('tls', { pkipath: '/p', nbdTls: '/d' }), { kind: 'tls', certDir: '/d' });
  assert.deepEqual(chooseTransport('tcp', { insecureTcp: true }), { kind: 'tcp' });
  assert.throws(() => chooseTransport('tls', {}), usage(/--nbd-tls DIR/));
  assert.throws(() => chooseTransport('tcp', {}), usage(/unencrypted and unauthenticated.*--insecure-tcp/));
  assert.throws(() => chooseTransport('tcp', { nbdTls: '/d' }), usage(/--insecure-tcp/));
  assert.throws(() => chooseTransport('local', { nbdTls: '/d' }), usage(/remote hypervisor/));
  assert.throws(() => chooseTransport('local', { insecureTcp: true }), usage(/remote hypervisor/));
  assert.throws(
    () => chooseTransport('ssh', { nbdTls: '/d', insecureTcp: true }),
    usage(/exclude each other/),
  );
});

test('bkfsJobKey: the job directory (socket or scratch files), or the scratch prefix without one', () => {
  const job = (socket: string | null, ...scratch: (string | null)[]) => ({
    socket,
    disks: scratch.map((s) => ({ scratch: s })),
  });
  assert.equal(bkfsJobKey(job('/var/tmp/bkfs-pull-abc/nbd.sock')), '/var/tmp/bkfs-pull-abc');
  assert.equal(bkfsJobKey(job(null, null, '/var/tmp/bkfs-pull-abc/sda.qcow2')), '/var/tmp/bkfs-pull-abc');
  assert.equal(
    bkfsJobKey(job(null, '/s/bkfs-pull-12-0a1b2c3d-ff00.vda.qcow2')),
    '/s/bkfs-pull-12-0a1b2c3d-ff00',
  );
  assert.equal(bkfsJobKey(job('/run/other/nbd.sock', '/var/lib/libvirt/qemu/x/sda.scratch')), null);
  assert.equal(bkfsJobKey(job(null)), null);
});

test('parsePortRange', () => {
  assert.deepEqual(parsePortRange('10809-10872'), { min: 10809, max: 10872 });
  assert.deepEqual(parsePortRange('20000'), { min: 20000, max: 20000 });
  for (const bad of ['0-5', '10-5', 'x', '1-70000', ''])
    assert.throws(
      () => parsePortRange(bad),
      (e: unknown) => isBkfsError(e, 'USAGE'),
      bad,
    );
});
