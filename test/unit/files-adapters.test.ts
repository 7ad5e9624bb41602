/**
 * The thin adapters of file-level restore, without an appliance: the read-only NBD server against
 * bkfs' own NBD client, qemu-img and a hand-written request (writes must be refused on the wire);
 * guestfish argument quoting, error attribution and struct parsing; `find -printf` parsing; the
 * guestfish script of `mount --files`.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdExportServer, type NbdExport } from '../../src/files/nbd-server';
import { NbdClient } from '../../src/nbd/client';
import { run } from '../../src/util/proc';
import { commandLine, parseStruct, parseStructList, quoteArg, splitErrors } from '../../src/files/guestfish';
import { statFromStruct } from '../../src/files/guestfs-engine';
import { parseFindOutput, parseFindTime } from '../../src/files/kernel';
import { guestfishMountScript } from '../../src/files/fsmount';
import { randomBuffer } from '../helpers/images';

let dir: string;
before(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bkfs-files-adapters-'));
});
after(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

function memExport(data: Buffer): NbdExport & { reads: number } {
  const e = {
    size: data.length,
    reads: 0,
    readAt: async (o: number, l: number) => {
      e.reads++;
      return data.subarray(o, o + l);
    },
  };
  return e;
}

describe('read-only NBD server', () => {
  it('serves named exports to bkfs, qemu-img and nbdinfo, and refuses writes on the wire', async () => {
    const a = randomBuffer(1, 3 * 1024 * 1024 + 512);
    const b = randomBuffer(2, 1024 * 1024);
    const sock = path.join(dir, 'nbd.sock');
    const server = await NbdExportServer.listen(
      sock,
      new Map([
        ['c1/vda', memExport(a)],
        ['c1/vdb', memExport(b)],
      ]),
    );
    try {
      const c = await NbdClient.connect({ socket: sock, exportName: 'c1/vda' });
      try {
        assert.equal(c.size, a.length);
        assert.ok(c.readOnly);
        assert.deepEqual(await c.read(1000, 70000), a.subarray(1000, 71000));
        const parallel = await Promise.all([0, 1, 2, 3].map((i) => c.read(i * 65536, 65536)));
        assert.deepEqual(Buffer.concat(parallel), a.subarray(0, 4 * 65536));
      } finally {
        await c.close();
      }
      await assert.rejects(NbdClient.connect({ socket: sock, exportName: 'nope' }), /no export named "nope"/);

      // A real third-party client: qemu-img reads the whole export.
      const out = path.join(dir, 'vdb.raw');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///c1/vdb?socket=${sock}`, out]);
      assert.deepEqual(await fsp.readFile(out), b);
      const list = await run('nbdinfo', ['--list', `nbd+unix:///?socket=${sock}`]);
      assert.match(list.stdout, /c1\/vda/);
      assert.match(list.stdout, /c1\/vdb/);

      // A write sent anyway (bkfs' client would refuse locally) is answered EPERM.
      const errno = await rawWrite(sock, 'c1/vda');
      assert.equal(errno, 1);
      assert.ok(server.stats.reads > 0);
    } finally {
      await server.close();
    }
    await assert.rejects(fsp.stat(sock), /ENOENT/);
  });
});

/** Handshake by hand (fixed newstyle, EXPORT_NAME) and send one NBD_CMD_WRITE; returns its errno. */
function rawWrite(sock: string, name: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.connect(sock);
    let buf = Buffer.alloc(0);
    let stage = 0;
    s.on('error', reject);
    s.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (stage === 0 && buf.length >= 18) {
        buf = buf.subarray(18);
        stage = 1;
        const flags = Buffer.alloc(4);
        flags.writeUInt32BE(3); // FIXED_NEWSTYLE | NO_ZEROES
        const opt = Buffer.alloc(16);
        opt.write('IHAVEOPT', 0, 'latin1');
        opt.writeUInt32BE(1, 8); // EXPORT_NAME
        opt.writeUInt32BE(Buffer.byteLength(name), 12);
        s.write(Buffer.concat([flags, opt, Buffer.from(name)]));
      }
      if (stage === 1 && buf.length >= 10) {
        buf = buf.subarray(10);
        stage = 2;
        const req = Buffer.alloc(28 + 4);
        req.writeUInt32BE(0x25609513, 0);
        req.writeUInt16BE(1, 6); // WRITE
        req.writeUInt32BE(7, 12); // handle
        req.writeUInt32BE(4, 24);
        s.write(req);
      }
      if (stage === 2 && buf.length >= 16) {
        assert.equal(buf.readUInt32BE(0), 0x67446698);
        assert.equal(buf.readUInt32BE(12), 7);
        resolve(buf.readUInt32BE(4));
        s.destroy();
      }
    });
  });
}

describe('guestfish adapter', () => {
  it('quotes any file name', () => {
    assert.equal(quoteArg('/a b/"q"\\x'), '"/a b/\\"q\\"\\\\x"');
    assert.equal(quoteArg('new\nline\t\x7f'), '"new\\x0aline\\x09\\x7f"');
    assert.equal(quoteArg('ünï'), '"ünï"');
    assert.equal(commandLine('add-drive', ['vda', { opt: 'format:raw' }]), 'add-drive "vda" format:raw');
  });

  it("attributes errors to their command's line and drops advice lines", () => {
    const text = ['some output', '*stdin*:7: libguestfs: error: lstatns: /x: No such file or directory'].join(
      '\n',
    );
    assert.deepEqual(splitErrors(text, 7), {
      output: 'some output',
      error: 'lstatns: /x: No such file or directory',
    });
    const launch = [
      '*stdin*:2: libguestfs: error: appliance closed the connection unexpectedly.',
      'This usually means the libguestfs appliance crashed.',
      'Do:',
      '  export LIBGUESTFS_DEBUG=1 LIBGUESTFS_TRACE=1',
      '*stdin*:2: libguestfs: error: guestfs_launch failed.',
      '',
    ].join('\n');
    assert.equal(
      splitErrors(launch, 2).error,
      'appliance closed the connection unexpectedly.; guestfs_launch failed.',
    );
    assert.deepEqual(splitErrors('a\nb\n', 3), { output: 'a\nb\n' });
  });

  it('parses stat structs, including lstatnslist holes', () => {
    const one = parseStruct(
      'st_dev: 2049\nst_ino: 13\nst_mode: 33188\nst_uid: 0\nst_gid: 5\nst_size: 11\nst_mtime_sec: 1700000000\nst_mtime_nsec: 5\n',
    );
    assert.deepEqual(statFromStruct(one), {
      kind: 'file',
      size: 11,
      mode: 0o644,
      uid: 0,
      gid: 5,
      mtimeSec: 1700000000,
      mtimeNsec: 5,
      atimeSec: 0,
      atimeNsec: 0,
    });
    const list = parseStructList(
      '[0] = {\n  st_ino: 2\n  st_mode: 16877\n}\n[1] = {\n  st_ino: -1\n  st_mode: 0\n}\n',
    );
    assert.equal(list.length, 2);
    assert.equal(statFromStruct(list[0] as Record<string, string>)?.kind, 'dir');
    assert.equal(statFromStruct(list[1] as Record<string, string>), null);
  });

  it('writes the mount --files script, without allow_other', () => {
    const s = guestfishMountScript(
      [{ file: '/m/disks/vda.raw' }],
      [
        { name: 'vda1', device: '/dev/sda1', options: 'ro' },
        { name: 'vg0-root', device: '/dev/vg0/root', options: 'ro,nouuid' },
      ],
      '/m/fs',
    );
    assert.equal(
      s,
      [
        'add-drive "/m/disks/vda.raw" format:raw readonly:true',
        'run',
        'mkmountpoint "/vda1"',
        'mkmountpoint "/vg0-root"',
        '-mount-options "ro" "/dev/sda1" "/vda1"',
        '-mount-options "ro,nouuid" "/dev/vg0/root" "/vg0-root"',
        'mount-local "/m/fs" readonly:true', // never allow_other: only the mounting user
        'mount-local-run',
        '',
      ].join('\n'),
    );
  });
});

describe('kernel engine listings', () => {
  it('parses find -printf output, any file name', () => {
    const rec = (...f: string[]) => f.join('\0') + '\0';
    const out = Buffer.from(
      rec('d', '4096', '1700000000.1234567890', '755', '0', '0', '', 'etc') +
        rec('f', '12', '1700000001.0000000000', '4644', '1000', '100', '', 'etc/new\nline') +
        rec('l', '5', '1699999999.5000000000', '777', '0', '0', '/etc', 'evil'),
    );
    const e = parseFindOutput(out, '/');
    assert.deepEqual(
      e.map((x) => [x.path, x.kind, x.size, x.mode.toString(8), x.uid, x.mtimeSec, x.mtimeNsec, x.target]),
      [
        ['/etc', 'dir', 4096, '755', 0, 1700000000, 123456789, undefined],
        ['/etc/new\nline', 'file', 12, '4644', 1000, 1700000001, 0, undefined],
        ['/evil', 'symlink', 5, '777', 0, 1699999999, 500000000, '/etc'],
      ],
    );
    assert.equal(parseFindOutput(out, '/srv')[0]?.path, '/srv/etc');
    assert.deepEqual(parseFindTime('-1.2500000000'), { sec: -2, nsec: 750000000 });
  });
});
