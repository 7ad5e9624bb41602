/**
 * libvirt XML: the parser, the facts read from domain / checkpoint / backup-job XML (samples
 * trimmed from libvirt 9.0 on Debian 12), and the documents bkfs writes (golden text, and parsed
 * back).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import {
  backupXml,
  checkpointXml,
  escapeXml,
  parseBackupJob,
  parseCheckpoint,
  parseDomain,
  parseXml,
} from '../../src/backup/libvirt-xml';
import { isBkfsError } from '../../src/errors';

const DOMAIN = `<domain type='qemu' id='3'>
  <name>web &amp; db</name>
  <uuid>a1c00a56-30bb-43e4-8edf-0e15b6e20914</uuid>
  <!-- a comment with <disk> inside -->
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/a b.qcow2' index='2'/>
      <backingStore/>
      <target dev='sda' bus='scsi'/>
      <alias name='scsi0-0-0-0'/>
    </disk>
    <disk type="block" device="disk">
      <driver name="qemu" type="raw"/>
      <source dev="/dev/vg/data"/>
      <target dev="vdb" bus="virtio"/>
      <shareable/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source protocol='nbd' name='exp'><host name='h' port='10809'/></source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='default' volume='v1.qcow2'/>
      <target dev='vdd' bus='virtio'/>
      <transient/>
    </disk>
  </devices>
</domain>
`;

test('parseDomain reads every disk with its facts', () => {
  const d = parseDomain(DOMAIN);
  assert.equal(d.name, 'web & db');
  assert.deepEqual(
    d.disks.map((x) => [x.target, x.device, x.type, x.format, x.bus, x.source]),
    [
      ['sda', 'disk', 'file', 'qcow2', 'scsi', '/var/lib/libvirt/images/a b.qcow2'],
      ['vdb', 'disk', 'block', 'raw', 'virtio', '/dev/vg/data'],
      ['vdc', 'disk', 'network', 'qcow2', 'virtio', 'nbd:exp'],
      ['hdc', 'cdrom', 'file', 'raw', 'ide', null],
      ['vdd', 'disk', 'volume', 'qcow2', 'virtio', 'default/v1.qcow2'],
    ],
  );
  assert.deepEqual(
    d.disks.map((x) => [x.readonly, x.shareable, x.transient]),
    [
      [false, false, false],
      [false, true, false],
      [false, false, false],
      [true, false, false],
      [false, false, true],
    ],
  );
});

test('parseXml: entities, CDATA, processing instructions, both quotes', () => {
  const x = parseXml(
    `<?xml version="1.0"?>\n<!DOCTYPE a>\n<a k="1 &lt; 2" j='&#65;&#x42;'><b>x<![CDATA[<y>]]>z</b><c/></a>`,
  );
  assert.equal(x.attrs.k, '1 < 2');
  assert.equal(x.attrs.j, 'AB');
  assert.equal(x.children[0]?.text, 'x<y>z');
  assert.equal(x.children[1]?.name, 'c');
});

test('parseXml refuses broken documents with one clear error', () => {
  for (const bad of ['<a><b></a>', '<a>', 'text', '<a></a><b/>', '<a x=1/>', '<a>&bogus;</a>', '']) {
    assert.throws(
      () => parseXml(bad),
      (e: unknown) => isBkfsError(e, 'EXTERNAL_TOOL') && /XML/.test((e as Error).message),
      bad,
    );
  }
});

test('parseCheckpoint: parent, creation time, per-disk bitmap and size (present only when healthy)', () => {
  const cp = parseCheckpoint(`<domaincheckpoint>
  <name>bkfs-0123-check2</name>
  <parent>
    <name>bkfs-0123-check1</name>
  </parent>
  <creationTime>1795317021</creationTime>
  <disks>
    <disk name='sda' checkpoint='bitmap' bitmap='bkfs-0123-check2'/>
    <disk name='sdb' checkpoint='bitmap' bitmap='bkfs-0123-check2' size='65536'/>
    <disk name='sdc' checkpoint='no'/>
  </disks>
</domaincheckpoint>`);
  assert.equal(cp.name, 'bkfs-0123-check2');
  assert.equal(cp.parent, 'bkfs-0123-check1');
  assert.equal(cp.creationTime, 1795317021);
  assert.deepEqual(cp.disks, [
    { name: 'sda', checkpoint: 'bitmap', bitmap: 'bkfs-0123-check2', size: null },
    { name: 'sdb', checkpoint: 'bitmap', bitmap: 'bkfs-0123-check2', size: 65536 },
    { name: 'sdc', checkpoint: 'no', bitmap: null, size: null },
  ]);
  assert.equal(parseCheckpoint('<domaincheckpoint><name>x</name></domaincheckpoint>').parent, null);
});

test('parseBackupJob: socket, export names and bitmaps', () => {
  const job = parseBackupJob(`<domainbackup mode='pull'>
  <incremental>bkfs-r1-check1</incremental>
  <server transport='unix' socket='/var/tmp/bkfs-pull-x/nbd.sock'/>
  <disks>
    <disk name='sda' backup='yes' type='file' backupmode='incremental' incremental='bkfs-r1-check1' exportname='sda' exportbitmap='backup-sda' index='5'>
      <driver type='qcow2'/>
      <scratch file='/var/tmp/bkfs-pull-x/sda.qcow2'/>
    </disk>
    <disk name='hdc' backup='no'/>
  </disks>
</domainbackup>`);
  assert.equal(job.mode, 'pull');
  assert.equal(job.incremental, 'bkfs-r1-check1');
  assert.equal(job.socket, '/var/tmp/bkfs-pull-x/nbd.sock');
  assert.deepEqual(job.disks, [
    {
      name: 'sda',
      backup: true,
      exportName: 'sda',
      exportBitmap: 'backup-sda',
      scratch: '/var/tmp/bkfs-pull-x/sda.qcow2',
    },
    { name: 'hdc', backup: false, exportName: null, exportBitmap: null, scratch: null },
  ]);
  const tcp = parseBackupJob(
    `<domainbackup mode='pull'><server name='localhost' port='10809'/></domainbackup>`,
  );
  assert.equal(tcp.socket, null);
  assert.deepEqual(tcp.tcp, { host: 'localhost', port: 10809, tls: false });
});

test('backupXml: a TCP+TLS server round-trips', () => {
  const xml = backupXml({ host: '10.0.0.2', port: 10811, tls: true }, null, [
    { name: 'sda', scratch: '/s/x' },
  ]);
  assert.match(xml, /<server transport='tcp' tls='yes' name='10.0.0.2' port='10811'\/>/);
  const job = parseBackupJob(xml);
  assert.equal(job.socket, null);
  assert.deepEqual(job.tcp, { host: '10.0.0.2', port: 10811, tls: true });
  const plain = backupXml({ host: 'kvm1', port: 10809, tls: false }, null, [
    { name: 'sda', scratch: '/s/x' },
  ]);
  assert.match(plain, /<server transport='tcp' name='kvm1' port='10809'\/>/);
});

test('backupXml: golden text for an incremental pull-mode job', () => {
  const xml = backupXml('/var/tmp/bkfs-pull-a/nbd.sock', 'bkfs-r1-check1', [
    { name: 'sda', scratch: '/var/tmp/bkfs-pull-a/sda.qcow2' },
    { name: 'hdc' },
  ]);
  assert.equal(
    xml,
    `<domainbackup mode='pull'>
  <incremental>bkfs-r1-check1</incremental>
  <server transport='unix' socket='/var/tmp/bkfs-pull-a/nbd.sock'/>
  <disks>
    <disk name='sda' backup='yes' type='file'>
      <scratch file='/var/tmp/bkfs-pull-a/sda.qcow2'/>
    </disk>
    <disk name='hdc' backup='no'/>
  </disks>
</domainbackup>
`,
  );
  const back = parseBackupJob(xml);
  assert.equal(back.incremental, 'bkfs-r1-check1');
  assert.deepEqual(
    back.disks.map((d) => [d.name, d.backup, d.scratch]),
    [
      ['sda', true, '/var/tmp/bkfs-pull-a/sda.qcow2'],
      ['hdc', false, null],
    ],
  );
  // A full has no <incremental>; odd characters in paths are escaped.
  const full = backupXml("/tmp/it's & <x>/nbd.sock", null, [{ name: 'vda', scratch: '/s' }]);
  assert.ok(!full.includes('<incremental>'));
  assert.equal(parseBackupJob(full).socket, "/tmp/it's & <x>/nbd.sock");
});

test('checkpointXml: golden text, every disk bitmap or no', () => {
  const xml = checkpointXml('bkfs-r1-check3', 'bkfs checkpoint web@check3', [
    { name: 'sda', bitmap: true },
    { name: 'sdc', bitmap: false },
  ]);
  assert.equal(
    xml,
    `<domaincheckpoint>
  <name>bkfs-r1-check3</name>
  <description>bkfs checkpoint web@check3</description>
  <disks>
    <disk name='sda' checkpoint='bitmap'/>
    <disk name='sdc' checkpoint='no'/>
  </disks>
</domaincheckpoint>
`,
  );
  const back = parseCheckpoint(xml);
  assert.equal(back.name, 'bkfs-r1-check3');
  assert.deepEqual(
    back.disks.map((d) => [d.name, d.checkpoint]),
    [
      ['sda', 'bitmap'],
      ['sdc', 'no'],
    ],
  );
});

test('escapeXml escapes all five special characters', () => {
  assert.equal(escapeXml(`<a href="x">'&'</a>`), '&lt;a href=&quot;x&quot;&gt;&apos;&amp;&apos;&lt;/a&gt;');
});
