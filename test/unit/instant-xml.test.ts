/** instant-restore's domain XML rewrites (pure string work, src/restore/instant.ts). */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { findElements } from '../../src/restore/domain-xml';
import { independentDomainXml, instantDomainXml, type InstantState } from '../../src/restore/instant';

const SAVED = `<domain type='kvm'>
  <name>web</name>
  <uuid>0b4c3e4e-7d2a-4e8e-9d5b-3a6e1d2c9f10</uuid>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' error_policy='report'/>
      <source dev='/dev/vg/web'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>
`;

const disks = [{ name: 'vda', overlay: "/srv/now/vda's.qcow2", size: 1 << 30, independent: false }];
const socket = '/srv/now/bkfs-instant.sock';

describe('instantDomainXml', () => {
  it('points the disk at its overlay with the NBD export as backingStore and error policy stop', () => {
    const r = instantDomainXml(SAVED, { name: 'web-now', socket, disks });
    const disk = r.xml.slice(findElements(r.xml, 'disk')[0]!.start, findElements(r.xml, 'disk')[0]!.end);
    assert.match(disk, /<disk type='file' device='disk'>/);
    assert.match(
      disk,
      /<source file='\/srv\/now\/vda&apos;s\.qcow2'\/>\s*<backingStore type='network' index='1'>/,
    );
    assert.match(
      disk,
      /<source protocol='nbd' name='vda'>\s*<host transport='unix' socket='\/srv\/now\/bkfs-instant\.sock'\/>/,
    );
    assert.match(
      disk,
      /<driver name='qemu' type='qcow2' cache='none' error_policy='stop' rerror_policy='stop'\/>/,
    );
    assert.doesNotMatch(disk, /\/dev\/vg\/web/);
    assert.deepEqual(r.policies, { vda: { errorPolicy: 'report', rerrorPolicy: null } });
    assert.deepEqual(r.untouched, ['sda']);
    assert.deepEqual(r.missing, []);
  });

  it('a new name drops the UUID and the MAC addresses; the same name keeps both', () => {
    const renamed = instantDomainXml(SAVED, { name: 'web-now', socket, disks }).xml;
    assert.match(renamed, /<name>web-now<\/name>/);
    assert.doesNotMatch(renamed, /<uuid>|<mac /);
    assert.match(renamed, /<source network='default'\/>/);
    const same = instantDomainXml(SAVED, { name: 'web', socket, disks }).xml;
    assert.match(same, /<uuid>0b4c3e4e/);
    assert.match(same, /<mac address='52:54:00:aa:bb:cc'\/>/);
  });
});

describe('independentDomainXml', () => {
  it('removes the export backing and restores the saved error policies', () => {
    const r = instantDomainXml(SAVED, { name: 'web-now', socket, disks });
    const s = { disks, policies: r.policies } as unknown as InstantState;
    const x = independentDomainXml(r.xml, s);
    assert.doesNotMatch(x, /backingStore|nbd|bkfs-instant\.sock|rerror_policy/);
    assert.match(x, /<driver name='qemu' type='qcow2' cache='none' error_policy='report'\/>/);
    assert.match(x, /<source file='\/srv\/now\/vda&apos;s\.qcow2'\/>/);
  });
});
