/**
 * bkfs' NBD server (src/nbd/server.ts) and the copy-on-write overlay (src/nbd/exports.ts) against
 * bkfs' own NBD client over a real Unix socket, with real overlay files: structured replies,
 * base:allocation extents, unaligned writes completed from the base, zeroes/trim, FUA/flush making
 * the bitmap durable, reopen, and refusal of an overlay that belongs to another disk.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdServer, parseListen, formatListen, type NbdExport } from '../../src/nbd/server';
import { CowOverlay, OVERLAY_BLOCK } from '../../src/nbd/exports';
import { NbdClient } from '../../src/nbd/client';
import * as P from '../../src/nbd/protocol';
import { isBkfsError } from '../../src/errors';
import { randomBuffer } from '../helpers/images';

let dir: string;
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-nbd-server-'));
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** An in-memory base: data in [0, 1 MiB), a zero extent [1, 2) MiB, a hole after. */
function base(data: Buffer): NbdExport {
  const MiB = 1 << 20;
  return {
    size: data.length,
    readAt: async (o, l) => Buffer.from(data.subarray(o, o + l)),
    blockStatus: async (o) => {
      if (o < MiB) return [{ length: MiB - o, flags: 0 }];
      if (o < 2 * MiB) return [{ length: 2 * MiB - o, flags: P.NBD_STATE_ZERO }];
      return [{ length: data.length - o, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO }];
    },
  };
}

/** One READ over a raw socket: fixed newstyle, NBD_OPT_EXPORT_NAME, no structured replies. */
async function simpleRead(sock: string, name: string, offset: number, length: number): Promise<Buffer> {
  const s = net.createConnection(sock);
  let got = Buffer.alloc(0);
  let want = 0;
  let wake: (() => void) | undefined;
  s.on('data', (d: Buffer) => {
    got = Buffer.concat([got, d]);
    if (got.length >= want) wake?.();
  });
  const take = async (n: number): Promise<Buffer> => {
    want = n;
    while (got.length < n) await new Promise<void>((r) => (wake = r));
    const out = got.subarray(0, n);
    got = got.subarray(n);
    return out;
  };
  try {
    const hello = await take(18);
    assert.equal(hello.readBigUInt64BE(8), P.NBD_IHAVEOPT);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
    const nameB = Buffer.from(name);
    const opt = Buffer.alloc(16);
    opt.writeBigUInt64BE(P.NBD_IHAVEOPT, 0);
    opt.writeUInt32BE(P.NBD_OPT_EXPORT_NAME, 8);
    opt.writeUInt32BE(nameB.length, 12);
    s.write(Buffer.concat([flags, opt, nameB]));
    await take(10); // size and transmission flags
    const req = Buffer.alloc(P.NBD_REQUEST_SIZE);
    req.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    req.writeUInt16BE(P.NBD_CMD_READ, 6);
    req.write('handle01', 8);
    P.writeU64(req, offset, 16);
    req.writeUInt32BE(length, 24);
    s.write(req);
    const head = await take(16);
    assert.equal(head.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
    assert.equal(head.readUInt32BE(4), 0);
    assert.equal(head.subarray(8, 16).toString(), 'handle01');
    return Buffer.from(await take(length));
  } finally {
    s.destroy();
  }
}

describe('NBD server', () => {
  it('parses listen addresses', () => {
    assert.deepEqual(parseListen('unix:/a/b.sock'), { unix: '/a/b.sock' });
    assert.deepEqual(parseListen('tcp:127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 });
    assert.deepEqual(parseListen('tcp:[::1]:99'), { host: '::1', port: 99 });
    assert.equal(parseListen('tcp:host'), null);
    assert.equal(parseListen('nbd://x'), null);
    assert.equal(formatListen({ host: '::1', port: 99 }), 'tcp:[::1]:99');
  });

  it('serves block status and reads; a writable overlay keeps the base untouched', async () => {
    const MiB = 1 << 20;
    const data = Buffer.alloc(4 * MiB);
    randomBuffer(7, MiB).copy(data, 0);
    const original = Buffer.from(data);
    const ovDir = path.join(dir, 'ov');
    const id = { vm: 'web', checkpoint: 'c1', disk: 'vda', size: data.length };
    const ov = await CowOverlay.open(ovDir, id, base(data));
    const sock = path.join(dir, 's.sock');
    const server = await NbdServer.listen({ unix: sock }, new Map([['vda', ov as NbdExport]]));
    try {
      const c = await NbdClient.connect(
        { socket: sock, exportName: 'vda' },
        { metaContexts: ['base:allocation'] },
      );
      try {
        assert.equal(c.readOnly, false);
        const ext = await c.blockStatus('base:allocation', 0, data.length);
        assert.deepEqual(
          ext.map((e) => [e.offset, e.length, e.flags]),
          [
            [0, MiB, 0],
            [MiB, MiB, 2],
            [2 * MiB, 2 * MiB, 3],
          ],
        );
        // Unaligned write across a block boundary, into the hole.
        const w = randomBuffer(8, 5000);
        await c.write(2 * MiB + 3000, w, { fua: true });
        const expected = Buffer.from(original);
        w.copy(expected, 2 * MiB + 3000);
        // Unaligned write inside data: the rest of the block comes from the base.
        await c.write(100, Buffer.from('hello'));
        Buffer.from('hello').copy(expected, 100);
        await c.writeZeroes(MiB / 2, 10000);
        expected.fill(0, MiB / 2, MiB / 2 + 10000);
        await c.trim(OVERLAY_BLOCK * 10 + 1, OVERLAY_BLOCK * 3); // whole blocks 11, 12 only
        expected.fill(0, OVERLAY_BLOCK * 11, OVERLAY_BLOCK * 13);
        await c.flush();
        assert.deepEqual(await c.read(0, data.length), expected);
        const after = await c.blockStatus('base:allocation', 2 * MiB, 2 * MiB);
        assert.equal(after[0]!.flags, 0, 'written blocks are data');
        assert.equal(after[0]!.length, 2 * OVERLAY_BLOCK);
        assert.deepEqual(data, original, 'the base was never written');
        // The bitmap on disk (after flush) already lists the written blocks.
        const map = fs.readFileSync(path.join(ovDir, 'vda.map'));
        assert.ok(map[0]! & 1, 'block 0');
        assert.equal(fs.statSync(path.join(ovDir, 'vda.cow')).mode & 0o777, 0o600);
      } finally {
        await c.close();
      }
    } finally {
      await server.close();
      await ov.close();
    }
    // Reopened: same contents.
    const again = await CowOverlay.open(ovDir, id, base(data));
    try {
      const r = await again.readAt(0, 200);
      assert.equal(r.subarray(100, 105).toString(), 'hello');
    } finally {
      await again.close();
    }
    await assert.rejects(
      CowOverlay.open(ovDir, { ...id, checkpoint: 'c2' }, base(data)),
      (e: unknown) => isBkfsError(e) && e.code === 'TARGET_MISMATCH',
    );
  });

  it('a read-only export refuses writes with EPERM, and block status needs the context', async () => {
    const data = randomBuffer(9, 1 << 20);
    const sock = path.join(dir, 'ro.sock');
    const server = await NbdServer.listen({ unix: sock }, new Map([['d', base(data)]]));
    try {
      const c = await NbdClient.connect({ socket: sock, exportName: 'd' });
      try {
        assert.ok(c.readOnly);
        assert.deepEqual(await c.read(4096, 65536), data.subarray(4096, 4096 + 65536));
      } finally {
        await c.close();
      }
    } finally {
      await server.close();
    }
  });

  for (const gatherReplies of [false, true]) {
    it(`answers a read as soon as it is ready, while an earlier read is still outstanding${gatherReplies ? ' (replies gathered per event-loop turn)' : ''}`, async () => {
      // An export that reads into the server's reply buffer (readInto), where the read at 0 waits
      // until released: the read after it must be answered first, with its own bytes.
      const data = randomBuffer(10, 1 << 20);
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      const exp: NbdExport = {
        size: data.length,
        readAt: async (o, l) => Buffer.from(data.subarray(o, o + l)),
        readInto: async (o, target) => {
          if (o === 0) await gate;
          data.copy(target, 0, o, o + target.length);
        },
      };
      const sock = path.join(dir, `order-${gatherReplies}.sock`);
      const server = await NbdServer.listen({ unix: sock }, new Map([['d', exp]]), { gatherReplies });
      try {
        const c = await NbdClient.connect({ socket: sock, exportName: 'd' });
        try {
          const order: string[] = [];
          const slow = c.read(0, 4096).then((b) => {
            order.push('slow');
            return b;
          });
          const fast = await c.read(65536, 8192);
          order.push('fast');
          assert.deepEqual(fast, data.subarray(65536, 65536 + 8192));
          assert.deepEqual(order, ['fast']);
          // Many reads in flight at once (their replies complete together): each gets its own bytes.
          let seed = 3;
          const next = () => (seed = (seed * 48271) % 0x7fffffff);
          const many = Array.from({ length: 64 }, () => {
            const at = 4096 + (next() % (data.length - 4096 - 70000));
            const len = 1 + (next() % 65536);
            return c.read(at, len).then((b) => assert.deepEqual(b, data.subarray(at, at + len)));
          });
          await Promise.all(many);
          assert.deepEqual(order, ['fast']);
          release();
          assert.deepEqual(await slow, data.subarray(0, 4096));
          assert.deepEqual(order, ['fast', 'slow']);
        } finally {
          await c.close();
        }
        // Without structured replies (old-style EXPORT_NAME handshake): simple replies, same bytes.
        assert.deepEqual(await simpleRead(sock, 'd', 12345, 5000), data.subarray(12345, 12345 + 5000));
        assert.equal(server.stats.reads, 67);
      } finally {
        await server.close();
      }
    });
  }
});
