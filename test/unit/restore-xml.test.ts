/** The libvirt domain XML rewrite of restore (pure string work). */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import {
  escapeXmlAttr,
  findElements,
  getAttr,
  removeElements,
  rewriteDomainXml,
  setAttr,
} from '../../src/restore/domain-xml';
import { planConfigs } from '../../src/restore/engine';

const CDROM = `<disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>`;

const DOMAIN = `<domain type='kvm' id='3'>
  <name>web</name>
  <uuid>0b4c3e4e-7d2a-4e8e-9d5b-3a6e1d2c9f10</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web.qcow2' index='3'/>
      <backingStore type='file' index='4'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore type='file' index='5'>
          <format type='raw'/>
          <source file='/var/lib/libvirt/images/base0.raw'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type="block" device="disk">
      <source dev="/dev/vg0/web-data"/>
      <target dev="vdb" bus="virtio"/>
      <mirror type='file' job='copy'><source file='/tmp/m.img'/></mirror>
    </disk>
    ${CDROM}
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
  </devices>
</domain>
`;

function diskOf(xml: string, dev: string): string {
  for (const s of findElements(xml, 'disk')) {
    const el = xml.slice(s.start, s.end);
    if (new RegExp(`<target dev=['"]${dev}['"]`).test(el)) return el;
  }
  throw new Error(`no disk ${dev}`);
}

describe('domain XML rewrite', () => {
  it('points restored disks at the files, sets the format, drops stale chain and job state', () => {
    const r = rewriteDomainXml(DOMAIN, {
      disks: {
        vda: { path: '/restore/web/vda.raw', format: 'raw' },
        vdb: { path: "/restore/it's & <odd>.qcow2", format: 'qcow2' },
      },
    });
    assert.deepEqual(r.rewritten, ['vda', 'vdb']);
    assert.deepEqual(r.untouched, ['sda']);
    assert.deepEqual(r.missing, []);
    assert.equal(r.originalName, 'web');

    const vda = diskOf(r.xml, 'vda');
    assert.match(vda, /^<disk type='file' device='disk'>/);
    assert.match(vda, /<driver name='qemu' type='raw' discard='unmap'\/>/);
    assert.match(vda, /<source file='\/restore\/web\/vda.raw'\/>/);
    assert.doesNotMatch(vda, /backingStore|base\.qcow2|index=/);
    assert.match(vda, /<alias name='virtio-disk0'\/>/);
    assert.equal(findElements(vda, 'source').length, 1);

    const vdb = diskOf(r.xml, 'vdb');
    assert.match(vdb, /^<disk type='file' device="disk">/);
    assert.match(vdb, /<driver name='qemu' type='qcow2'\/>/, 'a driver element is added');
    assert.ok(vdb.includes(`<source file='${escapeXmlAttr("/restore/it's & <odd>.qcow2")}'/>`));
    assert.ok(vdb.includes('&apos;') && vdb.includes('&amp;') && vdb.includes('&lt;'));
    assert.doesNotMatch(vdb, /mirror|\/dev\/vg0/);

    // Everything else is byte for byte as saved.
    assert.ok(r.xml.includes(CDROM));
    assert.ok(r.xml.includes('<uuid>0b4c3e4e-7d2a-4e8e-9d5b-3a6e1d2c9f10</uuid>'));
    assert.ok(
      r.xml.includes(
        "<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>",
      ),
    );
    assert.ok(r.xml.startsWith("<domain type='kvm' id='3'>\n  <name>web</name>"));
  });

  it('a new name replaces <name> and drops <uuid> and the MAC addresses; the same name keeps them', () => {
    const disks = { vda: { path: '/r/vda.raw', format: 'raw' as const } };
    const renamed = rewriteDomainXml(DOMAIN, { disks, name: 'web-restored' });
    assert.match(renamed.xml, /<name>web-restored<\/name>/);
    assert.doesNotMatch(renamed.xml, /<uuid>|<name>web<\/name>|<mac /);
    assert.match(renamed.xml, /<interface type='network'><source network='default'\/><\/interface>/);
    assert.match(renamed.xml, /<name>web-restored<\/name>\n {2}<memory/, 'no blank line left');
    const same = rewriteDomainXml(DOMAIN, { disks, name: 'web' });
    assert.match(same.xml, /<uuid>0b4c3e4e/);
    assert.match(same.xml, /<mac address='52:54:00:12:34:56'\/>/);
    const plain = rewriteDomainXml(DOMAIN, { disks });
    assert.match(plain.xml, /<mac address='52:54:00:12:34:56'\/>/, 'no --define: the saved MAC stays');
  });

  it('an existing domain keeps its UUID when it is redefined', () => {
    const disks = { vda: { path: '/r/vda.raw', format: 'raw' as const } };
    const u = 'd1e2f3a4-0000-4000-8000-000000000001';
    const replaced = rewriteDomainXml(DOMAIN, { disks, name: 'other', uuid: u });
    assert.match(replaced.xml, new RegExp(`<name>other</name>\n  <uuid>${u}</uuid>\n  <memory`));
    const same = rewriteDomainXml(DOMAIN, { disks, name: 'web', uuid: u });
    assert.match(same.xml, new RegExp(`<name>web</name>\n  <uuid>${u}</uuid>\n  <memory`));
    assert.doesNotMatch(same.xml, /0b4c3e4e/);
  });

  it('reports restored disks the XML does not mention and leaves other disks alone', () => {
    const r = rewriteDomainXml(DOMAIN, { disks: { vdc: { path: '/r/vdc.raw', format: 'raw' } } });
    assert.deepEqual(r.missing, ['vdc']);
    assert.deepEqual(r.rewritten, []);
    assert.equal(r.xml, DOMAIN);
  });

  it('drops checkpoint and backup elements anywhere', () => {
    const xml = `<domain><name>x</name><devices><disk type='file'><source file='/a'/><target dev='vda'/><checkpoint name='c1'/></disk></devices><backup mode='pull'><disks/></backup></domain>`;
    const r = rewriteDomainXml(xml, { disks: { vda: { path: '/b', format: 'qcow2' } } });
    assert.equal(
      r.xml,
      `<domain><name>x</name><devices><disk type='file'>\n<driver name='qemu' type='qcow2'/><source file='/b'/><target dev='vda'/></disk></devices></domain>`,
    );
  });

  it('attribute and element helpers', () => {
    assert.equal(getAttr(`<target dev="vda" bus='virtio'/>`, 'dev'), 'vda');
    assert.equal(getAttr(`<source file='/a&amp;b'/>`, 'file'), '/a&b');
    assert.equal(getAttr(`<x a='1'/>`, 'b'), undefined);
    assert.equal(setAttr(`<driver name='qemu'/>`, 'type', 'raw'), `<driver name='qemu' type='raw'/>`);
    assert.equal(setAttr(`<disk type="block">`, 'type', 'file'), `<disk type='file'>`);
    const nested = `<a><b><b/><b>x</b></b><c/><b/></a>`;
    assert.deepEqual(
      findElements(nested, 'b').map((s) => nested.slice(s.start, s.end)),
      ['<b><b/><b>x</b></b>', '<b/>'],
    );
    assert.equal(removeElements('<a>\n  <b/>\n  <c/>\n</a>', 'b'), '<a>\n  <c/>\n</a>');
  });

  it('planConfigs writes the rewritten domain.xml and keeps the saved one', () => {
    const p = planConfigs(
      '/out',
      [
        { name: 'domain.xml', data: Buffer.from(DOMAIN) },
        { name: '../notes.txt', data: Buffer.from('hi') },
      ],
      { vda: { path: '/out/vda.raw', format: 'raw' }, vdb: { path: '/out/vdb.raw', format: 'raw' } },
      'copy',
    );
    assert.equal(p.domainXml, '/out/domain.xml');
    assert.deepEqual([...p.files.keys()].sort(), [
      '/out/domain.orig.xml',
      '/out/domain.xml',
      '/out/notes.txt',
    ]);
    assert.equal(p.files.get('/out/domain.orig.xml')!.toString(), DOMAIN);
    assert.match(p.files.get('/out/domain.xml')!.toString(), /<name>copy<\/name>/);
    assert.deepEqual(p.notes, ['domain.xml: disk sda was not restored; its source is unchanged']);
  });
});
