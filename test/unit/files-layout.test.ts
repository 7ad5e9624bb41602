/**
 * The guest mount layout (fstab parsing, device resolution, root choice) and the find/diff logic,
 * over hand-built volume sets and listings.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  buildLayout,
  chooseRoot,
  guestDiskName,
  locate,
  mountsBelow,
  parseFstab,
  resolveSpec,
  splitMapperName,
} from '../../src/files/fstab';
import type { Volume, VolumeSet } from '../../src/files/volumes';
import {
  checksumCandidates,
  diffListings,
  fileHistory,
  globToRegExp,
  modeString,
  pathMatcher,
  type FileEntry,
} from '../../src/files/tree';

function vol(id: string, extra: Partial<Volume> & { type?: string; label?: string; uuid?: string }): Volume {
  const { type, label, uuid, ...rest } = extra;
  const probe = type
    ? { type, usage: 'filesystem' as const, ...(label ? { label } : {}), ...(uuid ? { uuid } : {}) }
    : null;
  return { id, offset: 0, size: 1 << 20, probe, ...rest };
}

const root = vol('vda1', {
  disk: 'vda',
  partition: 1,
  type: 'ext4',
  label: 'root',
  uuid: '11111111-aaaa-4bbb-8ccc-000000000001',
  partType: 'Linux root (x86-64)',
});
const data = vol('vda2', {
  disk: 'vda',
  partition: 2,
  type: 'xfs',
  uuid: '22222222-aaaa-4bbb-8ccc-000000000002',
  partUuid: 'AB12CD34-0000-4000-8000-000000000002',
});
const esp = vol('vda3', {
  disk: 'vda',
  partition: 3,
  type: 'vfat',
  label: 'ESP',
  uuid: '7B2E-808D',
  partLabel: 'EFI system',
});
const home = vol('vg0/home', { lv: { vg: 'vg0', lv: 'home' }, type: 'ext4' });
const dashed = vol('my-vg/lv-x', { lv: { vg: 'my-vg', lv: 'lv-x' }, type: 'xfs' });
const other = vol('vdb', { disk: 'vdb', partition: 0, type: 'ext4' });
const set: VolumeSet = {
  disks: [
    { name: 'vda', size: 1 << 30, table: { scheme: 'gpt', sectorSize: 512, partitions: [] } },
    { name: 'vdb', size: 1 << 30, table: { scheme: 'none', sectorSize: 512, partitions: [] } },
  ],
  volumes: [root, data, esp, home, dashed, other],
};

const FSTAB = `# /etc/fstab
UUID=11111111-AAAA-4bbb-8ccc-000000000001 /         ext4 errors=remount-ro 0 1
PARTUUID=ab12cd34-0000-4000-8000-000000000002 /srv/data xfs defaults 0 2
LABEL=ESP       /boot/efi vfat umask=0077 0 1
/dev/mapper/vg0-home /home ext4 defaults 0 2
/dev/my-vg/lv-x /srv/x xfs defaults 0 2
/dev/sdb        /mnt/b    ext4 noauto 0 0
/dev/sdb1       /swap     swap sw 0 0
proc            /proc     proc defaults 0 0
tmpfs           /tmp      tmpfs defaults 0 0
server:/export  /nfs      nfs4 defaults 0 0
/srv/data       /bound    none bind 0 0
UUID=deadbeef-0000-4000-8000-000000000000 /gone ext4 defaults 0 2
/dev/disk/by-label/My\\x20Disk /odd ext4 defaults 0 0
/dev/vda2\t/tab\\040dir xfs defaults 0 0
`;

describe('fstab', () => {
  it('parses fields, comments and escapes', () => {
    const e = parseFstab(FSTAB);
    assert.equal(e.length, 14);
    assert.deepEqual(e[0], {
      spec: 'UUID=11111111-AAAA-4bbb-8ccc-000000000001',
      file: '/',
      vfstype: 'ext4',
      options: ['errors=remount-ro'],
      line: 2,
    });
    assert.equal(e[13]?.file, '/tab dir');
  });

  it('resolves every kind of device name', () => {
    assert.equal(resolveSpec('UUID=11111111-AAAA-4BBB-8CCC-000000000001', set), root);
    assert.equal(resolveSpec('UUID="7b2e-808d"', set), esp);
    assert.equal(resolveSpec('LABEL=ESP', set), esp);
    assert.equal(resolveSpec('PARTUUID=ab12cd34-0000-4000-8000-000000000002', set), data);
    assert.equal(resolveSpec('PARTLABEL=EFI system', set), esp);
    assert.equal(resolveSpec('/dev/disk/by-uuid/7B2E-808D', set), esp);
    assert.equal(resolveSpec('/dev/mapper/vg0-home', set), home);
    assert.equal(resolveSpec('/dev/mapper/my--vg-lv--x', set), dashed);
    assert.equal(resolveSpec('/dev/vg0/home', set), home);
    assert.equal(resolveSpec('/dev/vda2', set), data);
    assert.equal(resolveSpec('/dev/sda3', set), esp, 'sda maps to the first disk');
    assert.equal(resolveSpec('/dev/xvdb', set), other);
    assert.equal(resolveSpec('/dev/sdc1', set), undefined);
    assert.equal(resolveSpec('UUID=00000000-0000-0000-0000-000000000000', set), undefined);
    assert.deepEqual(splitMapperName('a--b-c--d'), ['a-b', 'c-d']);
    assert.equal(guestDiskName('hdb', ['vdb', 'vda']), 'vdb');
  });

  it('builds the layout parent-first and says what it skipped', () => {
    const l = buildLayout(root, parseFstab(FSTAB), set);
    assert.deepEqual(
      l.mounts.map((m) => [m.mountpoint, m.volume.id]),
      [
        ['/', 'vda1'],
        ['/home', 'vg0/home'],
        ['/tab dir', 'vda2'],
        ['/boot/efi', 'vda3'],
        ['/mnt/b', 'vdb'],
        ['/srv/data', 'vda2'],
        ['/srv/x', 'my-vg/lv-x'],
      ],
    );
    const skipped = Object.fromEntries(l.skipped.map((s) => [s.mountpoint, s.reason]));
    assert.match(skipped['/proc'] ?? '', /not on a disk/);
    assert.match(skipped['/nfs'] ?? '', /not on a disk/);
    assert.match(skipped['/bound'] ?? '', /bind/);
    assert.match(skipped['/gone'] ?? '', /no volume/);
    assert.match(skipped['/odd'] ?? '', /no volume/);
    assert.equal(skipped['/swap'], undefined, 'swap lines are not mount points: not reported');
    assert.deepEqual(locate(l, '/srv/data/db/t').mount.volume, data);
    assert.equal(locate(l, '/srv/data/db/t').inner, '/db/t');
    assert.equal(locate(l, '/srv/database').mount.volume, root);
    assert.equal(locate(l, '/boot/efi').inner, '/');
    assert.deepEqual(
      mountsBelow(l, '/srv').map((m) => m.mountpoint),
      ['/srv/data', '/srv/x'],
    );
    assert.equal(mountsBelow(l, '/').length, 6);
  });

  it('finds the root through fstab, else the only filesystem, else gives up', async () => {
    const texts = new Map([['vda1', FSTAB]]);
    const reads: string[] = [];
    const layout = await chooseRoot(set, async (v) => {
      reads.push(v.id);
      return texts.get(v.id) ?? null;
    });
    assert.equal(layout?.fstabFrom, 'vda1');
    assert.equal(reads[0], 'vda1', 'the GPT root-type, root-labelled partition is tried first');
    const none = await chooseRoot(set, async () => null);
    assert.equal(none, undefined, 'several filesystems and no fstab');
    const single: VolumeSet = { disks: set.disks, volumes: [other] };
    const only = await chooseRoot(single, async () => null);
    assert.equal(only?.mounts[0]?.volume, other);
    assert.equal(only?.mounts[0]?.source, 'only filesystem');
  });
});

function entry(
  path: string,
  kind: FileEntry['kind'],
  size = 0,
  mtimeSec = 100,
  extra: Partial<FileEntry> = {},
): FileEntry {
  return {
    path,
    kind,
    size,
    mode: kind === 'dir' ? 0o755 : 0o644,
    uid: 0,
    gid: 0,
    mtimeSec,
    mtimeNsec: 0,
    ...extra,
  };
}

describe('globs', () => {
  it('matches like find -name and path globs', () => {
    const m = (g: string, p: string) => pathMatcher(g)(p);
    assert.ok(m('*.conf', '/etc/nginx/nginx.conf'));
    assert.ok(m('*.conf', '/.hidden.conf'));
    assert.ok(!m('*.conf', '/etc/conf.d'));
    assert.ok(m('host?', '/etc/hosts'));
    assert.ok(m('[hp]osts', '/etc/hosts'));
    assert.ok(!m('[!h]osts', '/etc/hosts'));
    assert.ok(m('/etc/**/*.conf', '/etc/a/b/c.conf'));
    assert.ok(m('/etc/**/*.conf', '/etc/c.conf'));
    assert.ok(!m('/etc/*.conf', '/etc/a/c.conf'));
    assert.ok(m('log/*.gz', '/var/log/x.gz'));
    assert.ok(!m('log/*.gz', '/var/log/old/x.gz'));
    assert.ok(m('/home/*/.ssh/authorized_keys', '/home/u/.ssh/authorized_keys'));
    assert.ok(m('a\\*b', '/a*b') && !m('a\\*b', '/axb'));
    assert.ok(m('sp ace*', '/home/sp ace.txt'));
    assert.ok(pathMatcher('*.CONF', true)('/x.conf'));
    assert.equal(globToRegExp('[abc').source, '^\\[abc$');
    assert.ok(globToRegExp('/**').test('/a/b/c'));
  });
});

describe('diff and history', () => {
  const a = [
    entry('/etc', 'dir'),
    entry('/etc/hosts', 'file', 10),
    entry('/etc/gone', 'file', 5),
    entry('/etc/same', 'file', 7),
    entry('/etc/touched', 'file', 7),
    entry('/etc/link', 'symlink', 5, 100, { target: 'hosts' }),
    entry('/etc/chmod', 'file', 1),
  ];
  const b = [
    entry('/etc', 'dir', 4096, 200),
    entry('/etc/hosts', 'file', 12, 150),
    entry('/etc/new', 'file', 3),
    entry('/etc/same', 'file', 7),
    entry('/etc/touched', 'file', 7, 300),
    entry('/etc/link', 'symlink', 5, 100, { target: 'other' }),
    entry('/etc/chmod', 'file', 1, 100, { mode: 0o600 }),
  ];

  it('lists added, removed and changed entries; directories only by type/mode/owner', () => {
    const d = diffListings(a, b);
    assert.deepEqual(
      d.map((x) => [x.change, x.path, x.what.join(',')]),
      [
        ['changed', '/etc/chmod', 'mode'],
        ['removed', '/etc/gone', ''],
        ['changed', '/etc/hosts', 'size,mtime'],
        ['changed', '/etc/link', 'target'],
        ['added', '/etc/new', ''],
        ['changed', '/etc/touched', 'mtime'],
      ],
    );
  });

  it('checksums only same-size same-mtime files and reports content changes', () => {
    assert.deepEqual(checksumCandidates(a, b), ['/etc/same', '/etc/chmod']);
    const d = diffListings(a, b, {
      a: new Map([['/etc/same', 'x']]),
      b: new Map([['/etc/same', 'y']]),
    });
    assert.deepEqual(d.find((x) => x.path === '/etc/same')?.what, ['content']);
  });

  it('follows each path across checkpoints', () => {
    const h = fileHistory([
      { checkpoint: 'c1', matches: new Map([['/f', entry('/f', 'file', 1)]]) },
      { checkpoint: 'c2', matches: new Map([['/f', entry('/f', 'file', 1)]]) },
      {
        checkpoint: 'c3',
        matches: new Map([
          ['/f', entry('/f', 'file', 2)],
          ['/g', entry('/g', 'file', 1)],
        ]),
      },
      { checkpoint: 'c4', matches: new Map() },
      { checkpoint: 'c5', matches: new Map([['/f', entry('/f', 'file', 2)]]) },
    ]);
    assert.deepEqual(
      h.get('/f')?.map((r) => `${r.checkpoint}:${r.state}`),
      ['c1:present', 'c2:unchanged', 'c3:changed', 'c4:removed', 'c5:added'],
    );
    assert.deepEqual(
      h.get('/g')?.map((r) => `${r.checkpoint}:${r.state}`),
      ['c3:added', 'c4:removed'],
    );
    assert.deepEqual([...h.keys()], ['/f', '/g']);
  });

  it('renders modes as ls does', () => {
    assert.equal(modeString('dir', 0o755), 'drwxr-xr-x');
    assert.equal(modeString('file', 0o4755), '-rwsr-xr-x');
    assert.equal(modeString('dir', 0o1777), 'drwxrwxrwt');
    assert.equal(modeString('symlink', 0o777), 'lrwxrwxrwx');
  });
});
