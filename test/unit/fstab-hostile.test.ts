/**
 * Hostile guest fstabs (issue 11 §6): a guest writes its /etc/fstab, so bkfs must give a clear
 * error for one that cannot be real (huge, millions of entries) and skip, with a reason, mount
 * points that try to leave the guest tree ('..'), carry control characters or absurd lengths.
 * A fast-check property: any text parses (or fails FS_UNSUPPORTED) and never yields a layout
 * mount point other than a clean absolute path.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { buildLayout, chooseRoot, MAX_FSTAB_BYTES, parseFstab } from '../../src/files/fstab';
import type { Volume, VolumeSet } from '../../src/files/volumes';
import { isBkfsError } from '../../src/errors';

function vol(id: string, type: string, uuid: string, partition: number): Volume {
  return {
    id,
    offset: 0,
    size: 1 << 20,
    disk: 'vda',
    partition,
    probe: { type, usage: 'filesystem', uuid },
  };
}

const root = vol('vda1', 'ext4', '11111111-aaaa-4bbb-8ccc-000000000001', 1);
const data = vol('vda2', 'xfs', '22222222-aaaa-4bbb-8ccc-000000000002', 2);
const set: VolumeSet = {
  disks: [{ name: 'vda', size: 1 << 30, table: { scheme: 'gpt', sectorSize: 512, partitions: [] } }],
  volumes: [root, data],
};

describe('hostile fstabs', () => {
  it('a huge fstab or one with absurdly many entries is a clear FS_UNSUPPORTED error', async () => {
    const huge = '#'.repeat(MAX_FSTAB_BYTES + 1);
    assert.throws(
      () => parseFstab(huge),
      (e) => isBkfsError(e, 'FS_UNSUPPORTED') && /not a usable fstab/.test(String(e)),
    );
    const many = 'UUID=22222222-aaaa-4bbb-8ccc-000000000002 /d xfs defaults 0 0\n'.repeat(5000);
    assert.throws(
      () => parseFstab(many),
      (e) => isBkfsError(e, 'FS_UNSUPPORTED') && /5000 entries/.test(String(e)),
    );
    await assert.rejects(
      chooseRoot(set, () => Promise.resolve(huge)),
      (e) => isBkfsError(e, 'FS_UNSUPPORTED') && /vda1: .*name a volume/.test(String(e)),
    );
  });

  it("mount points with '..', '.', control characters or absurd length are skipped with a reason", () => {
    const spec = 'UUID=22222222-aaaa-4bbb-8ccc-000000000002';
    const text = [
      'UUID=11111111-aaaa-4bbb-8ccc-000000000001 / ext4 defaults 0 1',
      `${spec} /../../etc xfs defaults 0 0`,
      `${spec} /srv/./x xfs defaults 0 0`,
      `${spec} /a\\012b xfs defaults 0 0`,
      `${spec} /${'x'.repeat(5000)} xfs defaults 0 0`,
      `${spec} /data xfs defaults 0 0`,
    ].join('\n');
    const layout = buildLayout(root, parseFstab(text), set);
    assert.deepEqual(
      layout.mounts.map((m) => m.mountpoint),
      ['/', '/data'],
    );
    const reasons = layout.skipped.map((s) => s.reason);
    assert.equal(reasons.filter((r) => /'\.' or '\.\.'/.test(r)).length, 2, reasons.join('; '));
    assert.ok(reasons.some((r) => /control characters/.test(r)));
    assert.ok(reasons.some((r) => /longer than 4096/.test(r)));
  });

  it('property: any fstab text gives clean absolute mount points or FS_UNSUPPORTED', () => {
    const field = fc.oneof(
      fc.constantFrom('/', '/data', '/../x', '/a/./b', 'none', 'relative', '/a\\000b', '//x//', '/x/..'),
      fc.string({ maxLength: 30 }),
    );
    const specs = fc.constantFrom(
      'UUID=22222222-aaaa-4bbb-8ccc-000000000002',
      'UUID=11111111-aaaa-4bbb-8ccc-000000000001',
      '/dev/vda2',
      'LABEL=x',
      'tmpfs',
    );
    const line = fc.tuple(
      specs,
      field,
      fc.constantFrom('xfs', 'ext4', 'swap', 'tmpfs', 'auto'),
      fc.string({ maxLength: 20 }),
    );
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            line.map((l) => l.join(' ')),
            fc.string({ maxLength: 60 }),
          ),
          { maxLength: 30 },
        ),
        (lines) => {
          let entries;
          try {
            entries = parseFstab(lines.join('\n'));
          } catch (e) {
            assert.ok(isBkfsError(e, 'FS_UNSUPPORTED'), String(e));
            return;
          }
          const layout = buildLayout(root, entries, set);
          for (const m of layout.mounts) {
            assert.ok(m.mountpoint.startsWith('/'), m.mountpoint);
            assert.ok(!m.mountpoint.split('/').some((c) => c === '..' || c === '.'), m.mountpoint);
            // eslint-disable-next-line no-control-regex
            assert.ok(!/[\x00-\x1f]/.test(m.mountpoint), JSON.stringify(m.mountpoint));
          }
          assert.equal(new Set(layout.mounts.map((m) => m.mountpoint)).size, layout.mounts.length);
        },
      ),
      { numRuns: 500 },
    );
  });
});
