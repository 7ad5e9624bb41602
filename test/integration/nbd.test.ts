/**
 * NBD client against real servers (qemu-nbd, nbdkit) on Unix sockets in private temp dirs.
 * Every server is started by the test group that uses it and stopped by PID in its after hook.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { BkfsError, isBkfsError } from '../../src/errors';
import { run } from '../../src/util/proc';
import {
  NbdClient,
  parseNbdUri,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STATE_DIRTY,
  type NbdExtent,
} from '../../src/nbd/client';
import {
  freeTcpPort,
  makeTempDir,
  startNbdkit,
  startQemuNbd,
  type NbdTestServer,
} from '../helpers/nbd-server';

const KiB = 1024;
const MiB = 1024 * 1024;

/** Deterministic PRNG so failures are reproducible. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function isNbdError(code: 'NBD_PROTOCOL' | 'SOURCE_NOT_FOUND' | 'USAGE', re?: RegExp) {
  return (e: unknown): boolean => {
    assert.ok(isBkfsError(e, code), `expected BkfsError(${code}), got ${String(e)}`);
    if (re) assert.match((e as BkfsError).message, re);
    assert.ok(!(e as BkfsError).message.includes('\n'), 'message is one line');
    return true;
  };
}

async function collect(gen: AsyncGenerator<NbdExtent>): Promise<NbdExtent[]> {
  const out: NbdExtent[] = [];
  for await (const e of gen) out.push(e);
  return out;
}

/** Merge adjacent segments with equal keys. */
function mergeSegs<T extends { start: number; length: number }>(segs: T[], key: (s: T) => string): T[] {
  const out: T[] = [];
  for (const s of segs) {
    const last = out[out.length - 1];
    if (last && key(last) === key(s) && last.start + last.length === s.start) last.length += s.length;
    else out.push({ ...s });
  }
  return out;
}

// ------------------------------------------------------------------------------------------------

describe('parseNbdUri', () => {
  it('parses TCP URIs', () => {
    assert.deepEqual(parseNbdUri('nbd://example.com/disk'), {
      host: 'example.com',
      port: 10809,
      exportName: 'disk',
    });
    assert.deepEqual(parseNbdUri('nbd://example.com:1234/'), {
      host: 'example.com',
      port: 1234,
      exportName: '',
    });
    assert.deepEqual(parseNbdUri('nbd://example.com'), { host: 'example.com', port: 10809, exportName: '' });
    assert.deepEqual(parseNbdUri('nbd://[::1]:10810/a%20b'), { host: '::1', port: 10810, exportName: 'a b' });
    assert.deepEqual(parseNbdUri('nbd://h//disk'), { host: 'h', port: 10809, exportName: '/disk' });
    assert.deepEqual(parseNbdUri('NBD://user@h:1/x'), { host: 'h', port: 1, exportName: 'x' });
  });

  it('parses Unix socket URIs', () => {
    assert.deepEqual(parseNbdUri('nbd+unix:///export?socket=/run/a.sock'), {
      socket: '/run/a.sock',
      exportName: 'export',
    });
    assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/tmp/x%20y+z.sock'), {
      socket: '/tmp/x y+z.sock',
      exportName: '',
    });
    assert.deepEqual(parseNbdUri('nbd+unix://?socket=rel.sock'), { socket: 'rel.sock', exportName: '' });
  });

  it('rejects bad URIs with one clear USAGE line', () => {
    const bad: [string, RegExp][] = [
      ['', /expected nbd:/],
      ['/tmp/sock', /expected nbd:/],
      ['http://host/x', /unsupported scheme "http"/],
      ['nbds://host/x?tls-verify-peer=false', /always verifies/],
      ['nbds+unix:///x', /needs \?socket=PATH/],
      ['nbd+unix:///x', /needs \?socket=PATH/],
      ['nbd+unix://host/x?socket=/s', /take no host/],
      ['nbd://host:99999/x', /bad port "99999"/],
      ['nbd://host:abc/x', /bad port/],
      ['nbd:///x', /missing host/],
      ['nbd://host/x?socket=/s', /only valid with nbd\+unix/],
      ['nbd+unix:///x?socket=/s&foo=1', /unknown query parameter "foo"/],
      ['nbd+unix:///x?socket=/s&tls-type=x509', /TLS parameter/],
      ['nbd://host/%zz', /percent-encoding/],
      ['nbd://[::1/x', /IPv6/],
    ];
    for (const [uri, re] of bad) assert.throws(() => parseNbdUri(uri), isNbdError('USAGE', re), uri);
  });
});

// ------------------------------------------------------------------------------------------------

describe('qemu-nbd serving a qcow2', () => {
  let dir = '';
  let img = '';
  let raw: Buffer = Buffer.alloc(0);
  let server: NbdTestServer | undefined;
  let client: NbdClient | undefined;
  const size = 64 * MiB;

  before(async () => {
    dir = makeTempDir();
    img = join(dir, 'disk.qcow2');
    const rnd = join(dir, 'random.bin');
    writeFileSync(rnd, randomBytes(3 * MiB + 12345));
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(size)]);
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -q -P 0x5a 1M 3M',
      '-c',
      'write -q -z 10M 1M',
      '-c',
      `write -q -s ${rnd} 20M ${3 * MiB + 12345}`,
      '-c',
      'write -q -P 0x11 40M 64k',
      '-c',
      'write -q -P 0x22 63M 1M',
      img,
    ]);
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, join(dir, 'disk.raw')]);
    raw = readFileSync(join(dir, 'disk.raw'));
    assert.equal(raw.length, size);
    server = await startQemuNbd(img, { readOnly: true });
    client = await NbdClient.connect({ socket: server.socket }, { metaContexts: ['base:allocation'] });
  });

  after(async () => {
    await client?.close();
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('reports size, flags and block sizes', () => {
    const c = client as NbdClient;
    assert.equal(c.size, size);
    assert.equal(c.readOnly, true);
    assert.equal(c.structuredReplies, true);
    assert.equal(c.handshakeMode, 'go');
    assert.equal(c.hasMetaContext('base:allocation'), true);
    assert.equal(c.hasMetaContext('qemu:dirty-bitmap:x'), false);
    assert.equal(c.minBlockSize, 1);
    assert.equal(c.preferredBlockSize, 4096);
    assert.equal(c.maxBlockSize, 32 * MiB);
  });

  it('reads ranges byte for byte like qemu-img convert', async () => {
    const c = client as NbdClient;
    const ranges: [number, number][] = [
      [0, 4096],
      [0, 1],
      [MiB - 100, 200], // hole -> data
      [4 * MiB - 10, 20], // data -> hole
      [123457, 999999], // unaligned, crosses into data
      [10 * MiB - 5, MiB + 10], // explicit zero cluster
      [20 * MiB + 1, 3 * MiB + 12345], // random data, unaligned end
      [40 * MiB - 3, 64 * KiB + 6],
      [size - 1, 1],
      [0, size], // > maxBlockSize: several concurrent requests
      [1, size - 2],
    ];
    for (const [off, len] of ranges) {
      const got = await c.read(off, len);
      assert.equal(got.length, len);
      assert.ok(got.equals(raw.subarray(off, off + len)), `read(${off}, ${len}) differs`);
    }
    const into = Buffer.alloc(MiB);
    await c.readInto(MiB + 7, into);
    assert.ok(into.equals(raw.subarray(MiB + 7, 2 * MiB + 7)));
    assert.equal((await c.read(5, 0)).length, 0);
  });

  it('rejects reads beyond the end of the export', async () => {
    const c = client as NbdClient;
    await assert.rejects(c.read(size - 10, 11), isNbdError('NBD_PROTOCOL', /beyond the end/));
    await assert.rejects(c.read(-1, 1), isNbdError('NBD_PROTOCOL', /bad NBD read range/));
  });

  it('handles 200 concurrent random reads', async () => {
    const c = client as NbdClient;
    const rand = prng(42);
    const reqs = Array.from({ length: 200 }, () => {
      const len = 1 + Math.floor(rand() * 300 * KiB);
      const off = Math.floor(rand() * (size - len));
      return { off, len };
    });
    const results = await Promise.all(reqs.map((r) => c.read(r.off, r.len)));
    results.forEach((b, i) => {
      const r = reqs[i] as { off: number; len: number };
      assert.ok(b.equals(raw.subarray(r.off, r.off + r.len)), `concurrent read ${i} differs`);
    });
    assert.equal(c.pendingRequests, 0);
  });

  it('maps base:allocation like qemu-img map', async () => {
    const c = client as NbdClient;
    const map = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', img])).stdout) as {
      start: number;
      length: number;
      data: boolean;
      zero: boolean;
    }[];
    const expected = mergeSegs(
      map.map((m) => ({ start: m.start, length: m.length, data: m.data, zero: m.zero })),
      (s) => `${s.data}/${s.zero}`,
    );
    const extents = await collect(c.mapExtents('base:allocation', 0, size));
    // mapExtents merges equal neighbours, covers the range exactly, in order.
    let pos = 0;
    for (let i = 0; i < extents.length; i++) {
      const e = extents[i] as NbdExtent;
      assert.equal(e.offset, pos);
      assert.ok(e.length > 0);
      if (i > 0) assert.notEqual(e.flags, (extents[i - 1] as NbdExtent).flags);
      pos += e.length;
    }
    assert.equal(pos, size);
    const got = mergeSegs(
      extents.map((e) => ({
        start: e.offset,
        length: e.length,
        data: (e.flags & NBD_STATE_HOLE) === 0,
        zero: (e.flags & NBD_STATE_ZERO) !== 0,
      })),
      (s) => `${s.data}/${s.zero}`,
    );
    assert.deepEqual(got, expected);
    // Spot checks of the layout we wrote.
    const at = (off: number) =>
      extents.find((e) => e.offset <= off && off < e.offset + e.length) as NbdExtent;
    assert.equal(at(0).flags, NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert.equal(at(MiB).flags & NBD_STATE_HOLE, 0);
    assert.notEqual(at(10 * MiB).flags & NBD_STATE_ZERO, 0);
  });

  it('blockStatus clips to the request and starts at the offset', async () => {
    const c = client as NbdClient;
    const ext = await c.blockStatus('base:allocation', MiB - 100, 1000);
    assert.ok(ext.length >= 1);
    assert.deepEqual(ext[0], { offset: MiB - 100, length: 100, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
    const last = ext[ext.length - 1] as NbdExtent;
    assert.ok(last.offset + last.length <= MiB + 900);
    const clipped = await collect(c.mapExtents('base:allocation', 2 * MiB + 3, 5 * MiB));
    assert.deepEqual(
      clipped.map((e) => [e.offset, e.length, e.flags & NBD_STATE_HOLE]),
      [
        [2 * MiB + 3, 2 * MiB - 3, 0],
        [4 * MiB, 3 * MiB + 3, NBD_STATE_HOLE],
      ],
    );
    await assert.rejects(
      c.blockStatus('qemu:dirty-bitmap:nope', 0, 4096),
      isNbdError('NBD_PROTOCOL', /meta context "qemu:dirty-bitmap:nope" was not negotiated/),
    );
  });

  it('refuses writes on the read-only export', async () => {
    const c = client as NbdClient;
    await assert.rejects(c.write(0, Buffer.alloc(512)), isNbdError('NBD_PROTOCOL', /read-only/));
    await assert.rejects(c.writeZeroes(0, 512), isNbdError('NBD_PROTOCOL', /read-only/));
    await assert.rejects(c.trim(0, 512), isNbdError('NBD_PROTOCOL', /read-only/));
  });

  it('connects by URI string, and close() is idempotent', async () => {
    const c = await NbdClient.connect((server as NbdTestServer).uri);
    assert.equal(c.size, size);
    assert.equal(c.hasMetaContext('base:allocation'), false);
    await assert.rejects(
      c.blockStatus('base:allocation', 0, 512),
      isNbdError('NBD_PROTOCOL', /not negotiated/),
    );
    const p1 = c.read(0, 100);
    const closing = c.close();
    assert.ok((await p1).equals(raw.subarray(0, 100)), 'in-flight read completes before disconnect');
    await Promise.all([closing, c.close()]);
    await assert.rejects(c.read(0, 1), isNbdError('NBD_PROTOCOL', /closed/));
  });
});

// ------------------------------------------------------------------------------------------------

describe('qemu-nbd with a dirty bitmap and a named export', () => {
  let dir = '';
  let server: NbdTestServer | undefined;

  before(async () => {
    dir = makeTempDir();
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x01 8M 1M', img]); // before the bitmap
    await run('qemu-img', ['bitmap', '--add', '--enable', img, 'b1']);
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -q -P 0x02 0 64k',
      '-c',
      'write -q -P 0x03 1M 192k',
      '-c',
      'write -q -z 5M 128k',
      '-c',
      'write -q -P 0x04 63M 1M',
      img,
    ]);
    server = await startQemuNbd(img, { readOnly: true, bitmap: 'b1', exportName: 'vda' });
  });

  after(async () => {
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('reports exactly the written ranges as dirty', async () => {
    const c = await NbdClient.connect(
      { socket: (server as NbdTestServer).socket, exportName: 'vda' },
      { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:missing'] },
    );
    try {
      assert.equal(c.hasMetaContext('qemu:dirty-bitmap:b1'), true);
      assert.equal(c.hasMetaContext('base:allocation'), true);
      assert.equal(c.hasMetaContext('qemu:dirty-bitmap:missing'), false);
      const all = await collect(c.mapExtents('qemu:dirty-bitmap:b1', 0, c.size));
      const dirty = all.filter((e) => e.flags & NBD_STATE_DIRTY).map((e) => [e.offset, e.length]);
      assert.deepEqual(dirty, [
        [0, 64 * KiB],
        [MiB, 192 * KiB],
        [5 * MiB, 128 * KiB],
        [63 * MiB, MiB],
      ]);
      // Sub-range, unaligned: clipped to the request.
      const part = await collect(c.mapExtents('qemu:dirty-bitmap:b1', MiB + 100, 100 * KiB));
      assert.deepEqual(part, [{ offset: MiB + 100, length: 100 * KiB, flags: NBD_STATE_DIRTY }]);
      // Data before the bitmap existed is allocated but clean.
      const alloc = await c.blockStatus('base:allocation', 8 * MiB, MiB);
      assert.equal((alloc[0] as NbdExtent).flags & NBD_STATE_HOLE, 0);
      const clean = await c.blockStatus('qemu:dirty-bitmap:b1', 8 * MiB, MiB);
      assert.deepEqual(clean, [{ offset: 8 * MiB, length: MiB, flags: 0 }]);
    } finally {
      await c.close();
    }
  });

  it('fails clearly for an unknown export name', async () => {
    await assert.rejects(
      NbdClient.connect({ socket: (server as NbdTestServer).socket, exportName: 'nope' }),
      isNbdError('NBD_PROTOCOL', /no export named "nope"/),
    );
  });
});

// ------------------------------------------------------------------------------------------------

describe('nbdkit memory (writable)', () => {
  let server: NbdTestServer | undefined;
  let client: NbdClient | undefined;
  const size = 64 * MiB;

  before(async () => {
    server = await startNbdkit('memory', [String(size)]);
    client = await NbdClient.connect(
      { socket: server.socket },
      { metaContexts: ['base:allocation'], maxInFlight: 4 },
    );
  });

  after(async () => {
    await client?.close();
    await server?.stop();
  });

  it('writes, zeroes, trims, flushes and reads back', async () => {
    const c = client as NbdClient;
    assert.equal(c.readOnly, false);
    assert.ok(c.canWriteZeroes && c.canTrim && c.canFlush);
    const data = randomBytes(40 * MiB + 333); // > maxBlockSize: split writes
    await c.write(3 * MiB + 5, data);
    assert.ok((await c.read(3 * MiB + 5, data.length)).equals(data));

    await c.writeZeroes(4 * MiB, 2 * MiB + 1);
    await c.writeZeroes(10 * MiB + 7, 1000, { mayTrim: false });
    const expect = Buffer.alloc(size);
    data.copy(expect, 3 * MiB + 5);
    expect.fill(0, 4 * MiB, 6 * MiB + 1);
    expect.fill(0, 10 * MiB + 7, 10 * MiB + 1007);
    await c.write(60 * MiB, Buffer.from('hello'), { fua: true });
    expect.write('hello', 60 * MiB);
    await c.flush();
    assert.ok((await c.read(0, size)).equals(expect));

    await c.trim(20 * MiB, 4 * MiB);
    await c.flush();
    // nbdkit-memory reports trimmed space as a hole.
    const ext = await c.blockStatus('base:allocation', 20 * MiB, 4 * MiB);
    assert.deepEqual(ext, [{ offset: 20 * MiB, length: 4 * MiB, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }]);
    assert.ok((await c.read(20 * MiB, 4 * MiB)).equals(Buffer.alloc(4 * MiB)));
    assert.ok((await c.read(24 * MiB, MiB)).equals(expect.subarray(24 * MiB, 25 * MiB)));
  });

  it('rejects writes past the end without sending them', async () => {
    const c = client as NbdClient;
    await assert.rejects(c.write(size - 1, Buffer.alloc(2)), isNbdError('NBD_PROTOCOL', /beyond the end/));
  });
});

describe('nbdkit variants', () => {
  it('read-only server: write fails with a clear error', async () => {
    const s = await startNbdkit('pattern', ['16M'], { readOnly: true });
    try {
      const c = await NbdClient.connect({ socket: s.socket });
      try {
        assert.equal(c.readOnly, true);
        await assert.rejects(c.write(0, Buffer.alloc(4096)), isNbdError('NBD_PROTOCOL', /is read-only/));
        const b = await c.read(8, 8); // the pattern plugin stores each 8-byte offset big-endian
        assert.equal(b.readBigUInt64BE(0), 8n);
      } finally {
        await c.close();
      }
    } finally {
      await s.stop();
    }
  });

  it('falls back to zero writes when WRITE_ZEROES is unsupported', async () => {
    const s = await startNbdkit('memory', ['8M'], { filters: ['nozero'] });
    try {
      const c = await NbdClient.connect({ socket: s.socket });
      try {
        assert.equal(c.canWriteZeroes, false);
        const d = randomBytes(8 * MiB);
        await c.write(0, d);
        await c.writeZeroes(MiB + 1, 5 * MiB);
        d.fill(0, MiB + 1, 6 * MiB + 1);
        assert.ok((await c.read(0, 8 * MiB)).equals(d));
      } finally {
        await c.close();
      }
    } finally {
      await s.stop();
    }
  });

  it('obeys advertised block size constraints', async () => {
    const s = await startNbdkit(
      'memory',
      ['4M', 'blocksize-minimum=512', 'blocksize-maximum=64K', 'blocksize-error-policy=error'],
      { filters: ['blocksize-policy'] },
    );
    try {
      const c = await NbdClient.connect({ socket: s.socket }, { metaContexts: ['base:allocation'] });
      try {
        assert.equal(c.minBlockSize, 512);
        assert.equal(c.maxBlockSize, 64 * KiB);
        const d = randomBytes(MiB);
        await c.write(512, d); // split into 64 KiB writes
        assert.ok((await c.read(512, MiB)).equals(d));
        assert.ok((await c.read(1000, 70000)).equals(d.subarray(488, 488 + 70000))); // widened + clipped
        const ext = await c.blockStatus('base:allocation', 100, 1000);
        assert.equal((ext[0] as NbdExtent).offset, 100);
        await assert.rejects(c.write(100, Buffer.alloc(10)), isNbdError('NBD_PROTOCOL', /not aligned/));
      } finally {
        await c.close();
      }
    } finally {
      await s.stop();
    }
  });

  it('reports server read errors (structured ERROR chunk) and stays usable', async () => {
    const dir = makeTempDir();
    const trigger = join(dir, 'inject');
    const s = await startNbdkit('pattern', ['8M', 'error-pread-rate=100%', `error-pread-file=${trigger}`], {
      filters: ['error'],
    });
    try {
      const c = await NbdClient.connect({ socket: s.socket });
      try {
        assert.equal((await c.read(0, 8)).readBigUInt64BE(0), 0n);
        writeFileSync(trigger, '');
        await assert.rejects(
          c.read(4096, 4096),
          isNbdError('NBD_PROTOCOL', /NBD read of 4096 bytes at offset 4096 failed: EIO/),
        );
        rmSync(trigger);
        assert.equal((await c.read(16, 8)).readBigUInt64BE(0), 16n);
      } finally {
        await c.close();
      }
    } finally {
      await s.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('works without structured replies (simple replies); block status is refused clearly', async () => {
    const s = await startNbdkit('pattern', ['8M'], { serverArgs: ['--no-sr'] });
    try {
      const c = await NbdClient.connect({ socket: s.socket }, { metaContexts: ['base:allocation'] });
      try {
        assert.equal(c.structuredReplies, false);
        assert.equal(c.hasMetaContext('base:allocation'), false);
        const b = await c.read(MiB - 4, 44);
        for (let i = 0; i < 5; i++) assert.equal(b.readBigUInt64BE(4 + i * 8), BigInt(MiB + i * 8));
        const big = await c.read(MiB, 5 * MiB); // simple replies with large payloads, several requests
        for (let i = 0; i < big.length; i += 8) {
          if (big.readBigUInt64BE(i) !== BigInt(MiB + i)) assert.fail(`pattern mismatch at ${MiB + i}`);
        }
        await assert.rejects(
          c.blockStatus('base:allocation', 0, 4096),
          isNbdError('NBD_PROTOCOL', /does not support structured replies/),
        );
      } finally {
        await c.close();
      }
    } finally {
      await s.stop();
    }
  });

  it('handles non-fixed newstyle (NBD_OPT_EXPORT_NAME) and oldstyle servers', async () => {
    for (const serverArgs of [['--mask-handshake=0'], ['--oldstyle']]) {
      const s = await startNbdkit('pattern', ['1M'], { serverArgs });
      try {
        const c = await NbdClient.connect({ socket: s.socket });
        try {
          assert.equal(c.size, MiB);
          assert.equal(c.handshakeMode, serverArgs[0] === '--oldstyle' ? 'oldstyle' : 'export-name');
          assert.equal((await c.read(1024, 8)).readBigUInt64BE(0), 1024n);
        } finally {
          await c.close();
        }
      } finally {
        await s.stop();
      }
    }
  });

  it('rejects every pending request when the server dies', async () => {
    const s = await startNbdkit('pattern', ['8M', 'rdelay=2'], { filters: ['delay'] });
    let c: NbdClient | undefined;
    try {
      c = await NbdClient.connect({ socket: s.socket }, { maxInFlight: 2 });
      const reads = Array.from({ length: 6 }, (_, i) => c?.read(i * 4096, 4096) as Promise<Buffer>);
      const settled = Promise.allSettled(reads);
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(c.pendingRequests, 6);
      s.child.kill('SIGKILL');
      const results = await settled;
      for (const r of results) {
        assert.equal(r.status, 'rejected');
        isNbdError(
          'NBD_PROTOCOL',
          /closed the connection|connection to .* failed/,
        )((r as PromiseRejectedResult).reason);
      }
      await assert.rejects(c.read(0, 1), isNbdError('NBD_PROTOCOL'));
    } finally {
      await c?.close();
      await s.stop();
    }
  });

  it('connects over TCP', async () => {
    const s = await startNbdkit('pattern', ['2M'], { tcpPort: await freeTcpPort() });
    try {
      const c = await NbdClient.connect(s.uri);
      try {
        assert.deepEqual(c.target, { host: '127.0.0.1', port: s.port, exportName: '' });
        assert.equal(c.size, 2 * MiB);
        assert.equal((await c.read(MiB, 8)).readBigUInt64BE(0), BigInt(MiB));
      } finally {
        await c.close();
      }
    } finally {
      await s.stop();
    }
  });
});

describe('connection failures', () => {
  it('missing socket -> SOURCE_NOT_FOUND', async () => {
    const dir = makeTempDir();
    try {
      await assert.rejects(
        NbdClient.connect({ socket: join(dir, 'none.sock') }),
        isNbdError(
          'SOURCE_NOT_FOUND',
          /cannot connect to NBD server at unix socket .*none\.sock: no such socket \(ENOENT\)/,
        ),
      );
      await assert.rejects(
        NbdClient.connect(`nbd+unix:///x?socket=${join(dir, 'none.sock')}`),
        isNbdError('SOURCE_NOT_FOUND'),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refused TCP port -> SOURCE_NOT_FOUND', async () => {
    await assert.rejects(
      NbdClient.connect({ host: '127.0.0.1', port: 1 }),
      isNbdError('SOURCE_NOT_FOUND', /127\.0\.0\.1:1: connection refused \(ECONNREFUSED\)/),
    );
  });

  it('a peer that is not an NBD server -> NBD_PROTOCOL; a silent one times out', async () => {
    const dir = makeTempDir();
    const sock = join(dir, 'fake.sock');
    let silent = false;
    const conns: net.Socket[] = [];
    const srv = net.createServer((s) => {
      conns.push(s);
      if (!silent) s.end('HTTP/1.0 400 Bad Request\r\n\r\n');
    });
    await new Promise<void>((r) => srv.listen(sock, r));
    try {
      await assert.rejects(
        NbdClient.connect({ socket: sock }),
        isNbdError('NBD_PROTOCOL', /not an NBD server/),
      );
      silent = true; // from now on, accept and say nothing
      await assert.rejects(
        NbdClient.connect({ socket: sock }, { connectTimeoutMs: 200 }),
        isNbdError('NBD_PROTOCOL', /timed out/),
      );
    } finally {
      for (const s of conns) s.destroy();
      await new Promise((r) => srv.close(r));
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
