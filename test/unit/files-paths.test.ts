/**
 * Pure parts of file-level restore: file addresses, in-root path resolution, destination planning
 * of `cp`, choosing checkpoints around a target.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { parseFileAddress, partitionId, formatAddress } from '../../src/files/address';
import { resolveInRoot, type EntryKind, type ResolveOps } from '../../src/files/resolve';
import { planCopy, tempSibling } from '../../src/files/copy';
import { neighbours } from '../../src/files/session';
import { isBkfsError } from '../../src/errors';

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    return isBkfsError(e) ? e.code : 'OTHER';
  }
  return undefined;
}

describe('file addresses', () => {
  it('parses the checkpoint, optional volume and path', () => {
    assert.deepEqual(parseFileAddress('web'), { ref: 'web', vm: 'web' });
    assert.deepEqual(parseFileAddress('web@check2'), { ref: 'web@check2', vm: 'web', checkpoint: 'check2' });
    assert.deepEqual(parseFileAddress('web@latest:/etc/hosts'), {
      ref: 'web@latest',
      vm: 'web',
      path: '/etc/hosts',
    });
    assert.deepEqual(parseFileAddress('vm@check2:vda:2:/var/log/syslog'), {
      ref: 'vm@check2',
      vm: 'vm',
      checkpoint: 'check2',
      volume: { kind: 'partition', disk: 'vda', partition: 2 },
      path: '/var/log/syslog',
    });
    assert.deepEqual(parseFileAddress('vm:vdb:/x').volume, { kind: 'disk', disk: 'vdb' });
    assert.deepEqual(parseFileAddress('vm:vdb:0:/x').volume, { kind: 'disk', disk: 'vdb' });
    assert.deepEqual(parseFileAddress('vm:vg0/root:/home').volume, { kind: 'lv', vg: 'vg0', lv: 'root' });
    assert.deepEqual(parseFileAddress('vm:LABEL=data:/db').volume, { kind: 'label', value: 'data' });
    assert.deepEqual(parseFileAddress('vm:UUID=ABCD-1234:/').volume, { kind: 'uuid', value: 'ABCD-1234' });
  });

  it('normalises the guest path and keeps colons inside it', () => {
    assert.equal(parseFileAddress('vm:/a//b/./c/../d/').path, '/a/b/d');
    assert.equal(parseFileAddress('vm:/../../etc').path, '/etc');
    assert.equal(parseFileAddress('vm:/srv/a:b:c').path, '/srv/a:b:c');
    assert.equal(parseFileAddress('vm:vda:1:/x:y').path, '/x:y');
    assert.equal(parseFileAddress('vm:vda:1').path, '/');
  });

  it('takes a guest path without its leading slash as absolute (issue 17.12)', () => {
    // Unambiguous: two slashes, or after a volume.
    assert.deepEqual(parseFileAddress('web@check2:etc/nginx/nginx.conf'), {
      ref: 'web@check2',
      vm: 'web',
      checkpoint: 'check2',
      path: '/etc/nginx/nginx.conf',
    });
    assert.equal(parseFileAddress('vm:vda:1:p').path, '/p');
    assert.equal(parseFileAddress('vm:vda:etc/x').path, '/etc/x');
    assert.deepEqual(parseFileAddress('vm:vda:etc/x').volume, { kind: 'disk', disk: 'vda' });
    // One word that also reads as a volume (VG/LV, DISK): the volume if the checkpoint has it, else
    // the path (ops.ts decides with the checkpoint's volumes).
    const a = parseFileAddress('web@check2:etc/hostname');
    assert.deepEqual(a.volume, { kind: 'lv', vg: 'etc', lv: 'hostname' });
    assert.equal(a.path, '/');
    assert.equal(a.orPath, '/etc/hostname');
    assert.equal(parseFileAddress('web:etc').orPath, '/etc');
    assert.equal(parseFileAddress('web:vg0/root:/home').orPath, undefined);
    assert.equal(parseFileAddress('web:/etc/hostname').orPath, undefined);
  });

  it('rejects malformed addresses with USAGE or BAD_NAME', () => {
    assert.equal(
      code(() => parseFileAddress('vm:')),
      'USAGE',
    );
    assert.equal(
      code(() => parseFileAddress('vm:vda:x:/p')),
      'USAGE',
    );
    assert.equal(
      code(() => parseFileAddress('vm:-bad/lv:/p')),
      'USAGE',
    );
    assert.equal(
      code(() => parseFileAddress('web', { needPath: true })),
      'USAGE',
    );
    assert.equal(
      code(() => parseFileAddress('bad name:/p')),
      'BAD_NAME',
    );
    assert.equal(
      code(() => parseFileAddress('vm:/a\0b')),
      'USAGE',
    );
  });

  it('names partitions as Linux does', () => {
    assert.equal(partitionId('vda', 2), 'vda2');
    assert.equal(partitionId('nvme0n1', 3), 'nvme0n1p3');
    assert.equal(partitionId('vdb', 0), 'vdb');
    assert.equal(
      formatAddress('vm', 'c1', '/x', { kind: 'partition', disk: 'vda', partition: 1 }),
      'vm@c1:vda:1:/x',
    );
  });
});

/** A fake guest tree: path -> kind (+ symlink target). */
function tree(entries: Record<string, EntryKind | { link: string }>): ResolveOps & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    kind: async (p) => {
      calls.push(p);
      const e = entries[p];
      if (e === undefined) return null;
      return typeof e === 'string' ? e : 'symlink';
    },
    readlink: async (p) => {
      const e = entries[p];
      if (e === undefined || typeof e === 'string') throw new Error(`not a link: ${p}`);
      return e.link;
    },
  };
}

describe('resolution inside the guest root', () => {
  const fs = tree({
    '/etc': 'dir',
    '/etc/hosts': 'file',
    '/etc/alt': { link: 'hosts' },
    '/evil': { link: '/etc' },
    '/up': { link: '../../../etc/hosts' },
    '/loop1': { link: '/loop2' },
    '/loop2': { link: '/loop1' },
    '/file': 'file',
    '/var': 'dir',
    '/var/run': { link: '../run' },
    '/run': 'dir',
    '/run/x': 'file',
  });

  it('follows relative and absolute symlinks within the guest', async () => {
    assert.deepEqual(await resolveInRoot('/etc/alt', fs, true), {
      ok: true,
      path: '/etc/hosts',
      kind: 'file',
    });
    assert.deepEqual(await resolveInRoot('/etc/alt', fs, false), {
      ok: true,
      path: '/etc/alt',
      kind: 'symlink',
    });
    assert.deepEqual(await resolveInRoot('/evil/hosts', fs, true), {
      ok: true,
      path: '/etc/hosts',
      kind: 'file',
    });
    assert.deepEqual(await resolveInRoot('/var/run/x', fs, true), { ok: true, path: '/run/x', kind: 'file' });
    assert.deepEqual(await resolveInRoot('/', fs, true), { ok: true, path: '/', kind: 'dir' });
  });

  it('never climbs above the guest root', async () => {
    assert.deepEqual(await resolveInRoot('/up', fs, true), { ok: true, path: '/etc/hosts', kind: 'file' });
    assert.deepEqual(await resolveInRoot('/../etc/hosts', fs, true), {
      ok: true,
      path: '/etc/hosts',
      kind: 'file',
    });
  });

  it('reports missing components, files used as directories and loops', async () => {
    assert.deepEqual(await resolveInRoot('/etc/nope', fs, true), {
      ok: false,
      reason: 'ENOENT',
      at: '/etc/nope',
    });
    assert.deepEqual(await resolveInRoot('/file/x', fs, true), { ok: false, reason: 'ENOTDIR', at: '/file' });
    const r = await resolveInRoot('/loop1', fs, true);
    assert.equal(r.ok, false);
    assert.equal(!r.ok && r.reason, 'ELOOP');
  });
});

describe('cp destinations', () => {
  const host = (m: Record<string, EntryKind>) => async (p: string) => (m[p] ? { kind: m[p] } : null);

  it('copies into an existing directory under the source name, else to the path itself', async () => {
    const st = host({ '/out': 'dir', '/': 'dir' });
    assert.deepEqual(await planCopy('hosts', 'file', '/out', { recursive: false, force: false }, st), {
      final: '/out/hosts',
      action: 'create',
    });
    assert.deepEqual(await planCopy('hosts', 'file', '/out/h2', { recursive: false, force: false }, st), {
      final: '/out/h2',
      action: 'create',
    });
    assert.deepEqual(await planCopy('', 'dir', '/new', { recursive: true, force: false }, st), {
      final: '/new',
      action: 'create',
    });
  });

  it('takes a trailing slash to mean an existing directory (issue 17.6: cp x out/nosuchdir/)', async () => {
    const st = host({ '/out': 'dir', '/out/': 'dir', '/': 'dir' });
    assert.deepEqual(await planCopy('hosts', 'file', '/out/', { recursive: false, force: false }, st), {
      final: '/out/hosts',
      action: 'create',
    });
    await assert.rejects(
      planCopy('hosts', 'file', '/out/nosuchdir/', { recursive: false, force: false }, st),
      (e: unknown) =>
        isBkfsError(e, 'TARGET_INVALID') && /out\/nosuchdir\/: no such directory/.test(e.message),
    );
  });

  it('refuses an existing destination unless forced, and nonsense always', async () => {
    const st = host({ '/out': 'dir', '/out/hosts': 'file', '/out/etc': 'dir', '/': 'dir' });
    const fail = async (p: Promise<unknown>) => {
      try {
        await p;
      } catch (e) {
        return isBkfsError(e) ? e.code : 'OTHER';
      }
      return undefined;
    };
    assert.equal(
      await fail(planCopy('hosts', 'file', '/out', { recursive: false, force: false }, st)),
      'TARGET_EXISTS',
    );
    assert.deepEqual(await planCopy('hosts', 'file', '/out', { recursive: false, force: true }, st), {
      final: '/out/hosts',
      action: 'replace',
    });
    assert.deepEqual(await planCopy('etc', 'dir', '/out', { recursive: true, force: true }, st), {
      final: '/out/etc',
      action: 'merge',
    });
    assert.equal(await fail(planCopy('etc', 'dir', '/out', { recursive: false, force: false }, st)), 'USAGE');
    assert.equal(
      await fail(planCopy('etc', 'dir', '/out/hosts', { recursive: true, force: true }, st)),
      'TARGET_INVALID',
    );
    assert.equal(
      await fail(planCopy('x', 'file', '/nodir/x', { recursive: false, force: false }, st)),
      'TARGET_INVALID',
    );
    assert.equal(
      await fail(planCopy('dev', 'other', '/out/d', { recursive: false, force: false }, st)),
      'USAGE',
    );
    assert.equal(tempSibling('/out/hosts', 'ab12'), '/out/.hosts.bkfs-ab12');
  });
});

describe('checkpoints around a target', () => {
  it('takes the target first, then the nearest ones, within the disk budget', () => {
    const all = [1, 2, 3, 4, 5, 6];
    assert.deepEqual(
      neighbours(all, 4, () => 1, 3),
      [4, 3, 5],
    );
    assert.deepEqual(
      neighbours(all, 1, () => 2, 6),
      [1, 2, 3],
    );
    assert.deepEqual(
      neighbours(all, 6, () => 10, 3),
      [6],
    );
  });
});
