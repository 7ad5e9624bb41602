/**
 * The synchronous read fast path (`CheckpointReader.readIntoNow`, `ChunkLoader.copyCached`, and the
 * NBD server's and the mount's cache-hit answers) over a real repository made by a real backup of
 * a qcow2 (text: frames chunks; random: raw chunks; zeros; a pattern across the 16 MiB map page
 * boundary; a short last chunk), compared byte for byte with `qemu-img convert -O raw`:
 *   - a read served from the caches returns the same bytes as the first (loading) read and as a
 *     fresh reader's async `readAt`, for random ranges across chunk, frame and page boundaries and
 *     past the end of the disk (fast-check), and it is answered without a promise;
 *   - a frame damaged in the pack fails with DATA_DAMAGED (EIO through the mount, an NBD error
 *     through the server) every time, never served from a cache; the chunk's other frames read;
 *   - the NBD server answers cache hits at once with the right bytes (structured and simple
 *     replies), and an export that throws synchronously fails that request only;
 *   - fuse-native's read handler answers a cache hit before it returns.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import { qemuIo } from '../helpers/cli';
import { randomBuffer, textFile, toRaw } from '../helpers/images';
import { run } from '../../src/util/proc';
import { Repository } from '../../src/repo/repository';
import { runBackup } from '../../src/backup/engine';
import { ImageSource } from '../../src/backup/sources';
import { CheckpointReader, type PageExtent } from '../../src/chain/reader';
import { CODEC_FRAMES, parseFrameTable } from '../../src/store/codec';
import { packPath } from '../../src/store/packs';
import { checkpointExport } from '../../src/nbd/exports';
import { NbdServer, type NbdExport } from '../../src/nbd/server';
import { NbdClient } from '../../src/nbd/client';
import * as P from '../../src/nbd/protocol';
import { CheckpointVfs, FsError } from '../../src/fuse/vfs';
import { fuseOps } from '../../src/fuse/mount';

const MiB = 1 << 20;
const KiB = 1024;
/** Past the first 16 MiB map page; not a multiple of the chunk size (a short last chunk). */
const DISK_SIZE = 18 * MiB + 69 * KiB;

let work: string;
let repoDir: string;
let expected: Buffer;

function damaged(e: unknown): boolean {
  return (e as { code?: string }).code === 'DATA_DAMAGED';
}

/** The bytes a read of `len` at `off` must return (clipped at the disk's end). */
function want(off: number, len: number): Buffer {
  return expected.subarray(Math.min(off, DISK_SIZE), Math.min(off + len, DISK_SIZE));
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-read-fastpath-'));
  const img = path.join(work, 'disk.qcow2');
  repoDir = path.join(work, 'repo');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(DISK_SIZE)]);
  const text = path.join(work, 'text.bin');
  fs.writeFileSync(text, textFile(5, 3 * MiB).subarray(0, 3 * MiB));
  const rnd = path.join(work, 'rnd.bin');
  fs.writeFileSync(rnd, randomBuffer(6, MiB));
  const tail = path.join(work, 'tail.bin');
  fs.writeFileSync(tail, textFile(7, MiB).subarray(0, MiB));
  await qemuIo(
    img,
    'qcow2',
    `write -s ${text} 512 ${3 * MiB}`, // unaligned: frames chunks across chunk boundaries
    `write -s ${rnd} ${5 * MiB} ${MiB}`, // incompressible: raw chunks
    `write -P 0x55 ${16 * MiB - 4096} 65536`, // across the map page boundary
    `write -s ${tail} ${DISK_SIZE - MiB} ${MiB}`, // up to the short last chunk
  );
  const repo = Repository.init(repoDir);
  try {
    await runBackup(repo, {
      vm: 'vm',
      disks: [{ name: 'vda', source: new ImageSource(img) }],
      level: 'full',
    });
  } finally {
    repo.close();
  }
  const raw = path.join(work, 'ref.raw');
  await toRaw(img, raw);
  expected = fs.readFileSync(raw);
  assert.equal(expected.length, DISK_SIZE);
});

after(() => fs.rmSync(work, { recursive: true, force: true }));

/** A frames chunk extent of the text area and its frame table (read from the pack). */
function framesExtent(
  repo: Repository,
  reader: CheckpointReader,
): { ext: PageExtent; table: ReturnType<typeof parseFrameTable> } {
  const disk = reader.disk('vda');
  const ext = reader
    .page(disk, 0)
    .find(
      (e) =>
        e.loc?.codec === CODEC_FRAMES && e.offset >= 256 * KiB && e.length >= 256 * KiB && e.chunkOff === 0,
    );
  assert.ok(ext?.loc, 'a whole frames chunk in the text area');
  const stored = Buffer.alloc(ext.loc.storedLen);
  const fd = fs.openSync(packPath(repo.dir, ext.loc.pack), 'r');
  try {
    fs.readSync(fd, stored, 0, stored.length, ext.loc.offset);
  } finally {
    fs.closeSync(fd);
  }
  const table = parseFrameTable(stored, ext.loc.rawLen, ext.loc.storedLen, ext.loc.hash);
  assert.ok(table.frames.length >= 4);
  return { ext, table };
}

describe('read fast path', () => {
  it('cache hits return the same bytes as the loading read and a fresh reader, without a promise (fast-check)', async () => {
    const repo = Repository.open(repoDir, { readOnly: true });
    try {
      const reader = CheckpointReader.open(repo, 'vm');
      let sync = 0;
      await fc.assert(
        fc.asyncProperty(
          fc.oneof(
            fc.integer({ min: 0, max: DISK_SIZE + 64 * KiB }),
            // near chunk (256 KiB), frame (32 KiB) and page (16 MiB) boundaries and the end
            fc
              .tuple(
                fc.constantFrom(32 * KiB, 256 * KiB, 16 * MiB, DISK_SIZE),
                fc.integer({ min: 0, max: 72 }),
                fc.integer({ min: -9000, max: 9000 }),
              )
              .map(([unit, k, d]) => Math.max(0, (unit === DISK_SIZE ? 1 : k) * unit + d)),
          ),
          fc.oneof(fc.integer({ min: 1, max: 9000 }), fc.integer({ min: 1, max: 600 * KiB })),
          async (off, len) => {
            const w = want(off, len);
            const a = Buffer.alloc(len, 0xee);
            const r1 = reader.readIntoNow('vda', off, a);
            assert.equal(typeof r1 === 'number' ? r1 : await r1, w.length);
            assert.ok(a.subarray(0, w.length).equals(w), `first read ${off}+${len}`);
            // Everything it needed is cached now: the same read is answered synchronously.
            const b = Buffer.alloc(len, 0xdd);
            const r2 = reader.readIntoNow('vda', off, b);
            assert.equal(typeof r2, 'number', `a repeated read of ${off}+${len} is served from the caches`);
            assert.equal(r2, w.length);
            assert.ok(b.subarray(0, w.length).equals(w), `cached read ${off}+${len}`);
            sync++;
            // The async API of a reader with a cache of one chunk (always loading) agrees.
            const fresh = CheckpointReader.open(repo, 'vm', { cacheBytes: 256 * KiB, readAheadBytes: 0 });
            assert.ok((await fresh.readAt('vda', off, len)).equals(w), `fresh readAt ${off}+${len}`);
          },
        ),
        { numRuns: 150, seed: 14 },
      );
      assert.equal(sync, 150);
      // At and past the end: nothing, synchronously.
      assert.equal(reader.readIntoNow('vda', DISK_SIZE, Buffer.alloc(4096)), 0);
      assert.equal(reader.readIntoNow('vda', DISK_SIZE + 5, Buffer.alloc(4096)), 0);
      assert.throws(() => reader.readIntoNow('vda', -1, Buffer.alloc(1)), /invalid read range/);
    } finally {
      repo.close();
    }
  });

  it('a damaged frame fails every time (DATA_DAMAGED / EIO / NBD error), never from a cache; its neighbours read', async () => {
    const copy = path.join(work, 'damaged-repo');
    fs.cpSync(repoDir, copy, { recursive: true });
    const repo = Repository.open(copy);
    let vfs: CheckpointVfs | undefined;
    let server: NbdServer | undefined;
    try {
      const reader = CheckpointReader.open(repo, 'vm');
      const { ext, table } = framesExtent(repo, reader);
      const loc = ext.loc!;
      const bad = table.frames[2]!;
      // Flip one byte in the middle of frame 2's stored bytes.
      const fd = fs.openSync(packPath(copy, loc.pack), 'r+');
      try {
        const at = loc.offset + bad.storedOff + (bad.storedLen >> 1);
        const b = Buffer.alloc(1);
        fs.readSync(fd, b, 0, 1, at);
        b[0] = b[0]! ^ 0x40;
        fs.writeSync(fd, b, 0, 1, at);
      } finally {
        fs.closeSync(fd);
      }
      const diskOff = (frame: number) => ext.offset - ext.chunkOff + frame * (1 << table.shift) + 100;
      const read = async (r: CheckpointReader, off: number): Promise<Buffer> => {
        const buf = Buffer.alloc(4096);
        const n = r.readIntoNow('vda', off, buf);
        assert.equal(typeof n === 'number' ? n : await n, 4096);
        return buf;
      };
      // First read of the chunk (whole stored chunk, table checked): the damaged frame fails.
      await assert.rejects(read(reader, diskOff(2)), damaged);
      // Its neighbours read, the second time from the cache (synchronously).
      assert.ok((await read(reader, diskOff(1))).equals(want(diskOff(1), 4096)));
      const hit = Buffer.alloc(4096);
      assert.equal(reader.readIntoNow('vda', diskOff(1), hit), 4096);
      assert.ok(hit.equals(want(diskOff(1), 4096)));
      // The table is cached now: the damaged frame alone is read again, and fails again.
      for (let i = 0; i < 3; i++) await assert.rejects(read(reader, diskOff(2)), damaged);
      // A read that spans a good cached frame and the damaged one fails as a whole.
      const span = Buffer.alloc(64 * KiB);
      await assert.rejects(async () => reader.readIntoNow('vda', diskOff(1), span), damaged);

      // Through the mount's handlers: EIO, every time.
      vfs = CheckpointVfs.open(repo, { ref: 'vm' });
      const fh = vfs.open('/vda.raw', fs.constants.O_RDONLY);
      for (let i = 0; i < 2; i++) {
        await assert.rejects(
          async () => vfs!.readNow(fh, diskOff(2), Buffer.alloc(4096)),
          (e: unknown) => e instanceof FsError && e.code === 'EIO',
        );
      }
      const ok = Buffer.alloc(4096);
      const n = vfs.readNow(fh, diskOff(3), ok);
      assert.equal(typeof n === 'number' ? n : await n, 4096);
      assert.ok(ok.equals(want(diskOff(3), 4096)));

      // Through the NBD server: an error reply each time, and the connection goes on serving.
      const sock = path.join(work, 'damaged.sock');
      server = await NbdServer.listen({ unix: sock }, new Map([['vda', checkpointExport(reader, 'vda')]]));
      const c = await NbdClient.connect({ socket: sock, exportName: 'vda' });
      try {
        for (let i = 0; i < 2; i++) await assert.rejects(c.read(diskOff(2), 4096));
        for (let i = 0; i < 2; i++)
          assert.ok((await c.read(diskOff(1), 4096)).equals(want(diskOff(1), 4096)));
      } finally {
        await c.close();
      }
      assert.equal(server.stats.errors, 2);
    } finally {
      await server?.close();
      vfs?.close();
      repo.close();
    }
  });

  it('the NBD server answers cache hits with the right bytes; a synchronous throw fails that request only', async () => {
    const repo = Repository.open(repoDir, { readOnly: true });
    let server: NbdServer | undefined;
    try {
      const reader = CheckpointReader.open(repo, 'vm');
      const real = checkpointExport(reader, 'vda');
      let calls = 0;
      // The checkpoint export, except that every 5th read throws synchronously.
      const flaky: NbdExport = {
        ...real,
        readInto: (o, t) => {
          if (++calls % 5 === 0) throw new Error('synchronous failure');
          return real.readInto!(o, t);
        },
      };
      const sock = path.join(work, 'fast.sock');
      server = await NbdServer.listen(
        { unix: sock },
        new Map([
          ['vda', real],
          ['flaky', flaky],
        ]),
      );
      const offs = Array.from({ length: 40 }, (_, i) => (i * 7919 * 4096 + i * 333) % (DISK_SIZE - 65536));
      const c = await NbdClient.connect({ socket: sock, exportName: 'vda' });
      try {
        for (let round = 0; round < 2; round++) {
          // 16 in flight: loads and cache hits answered in any order, each with its own bytes.
          const got = await Promise.all(offs.map((o, i) => c.read(o, 4096 + (i % 3) * 8192)));
          got.forEach((b, i) => assert.ok(b.equals(want(offs[i]!, 4096 + (i % 3) * 8192)), `read ${i}`));
        }
        assert.ok((await c.read(DISK_SIZE - 1000, 1000)).equals(want(DISK_SIZE - 1000, 1000)));
      } finally {
        await c.close();
      }
      assert.equal(server.stats.reads, 81);
      // Simple replies (no structured reply negotiated) from the cache.
      assert.ok((await simpleRead(sock, 'vda', offs[3]!, 4096)).equals(want(offs[3]!, 4096)));
      const f = await NbdClient.connect({ socket: sock, exportName: 'flaky' });
      try {
        const results = await Promise.allSettled(offs.slice(0, 10).map((o) => f.read(o, 4096)));
        results.forEach((r, i) => {
          if ((i + 1) % 5 === 0) assert.equal(r.status, 'rejected', `read ${i} fails`);
          else assert.ok(r.status === 'fulfilled' && r.value.equals(want(offs[i]!, 4096)), `read ${i}`);
        });
        assert.ok((await f.read(offs[0]!, 4096)).equals(want(offs[0]!, 4096)), 'the connection still serves');
      } finally {
        await f.close();
      }
    } finally {
      await server?.close();
      repo.close();
    }
  });

  it("fuse-native's read handler answers a cache hit before it returns", async () => {
    const repo = Repository.open(repoDir, { readOnly: true });
    const vfs = CheckpointVfs.open(repo, { ref: 'vm' });
    try {
      const ops = fuseOps(vfs);
      const fh = vfs.open('/vda.raw', fs.constants.O_RDONLY);
      const off = 1 * MiB + 3000;
      const first = Buffer.alloc(4096);
      const code = await new Promise<unknown>((r) => ops.read('/vda.raw', fh, first, 4096, off, (c) => r(c)));
      assert.equal(code, 4096);
      assert.ok(first.equals(want(off, 4096)));
      const again = Buffer.alloc(8192);
      let answer: unknown;
      ops.read('/vda.raw', fh, again, 4096, off, (c) => (answer = c));
      assert.equal(answer, 4096, 'answered synchronously');
      assert.ok(again.subarray(0, 4096).equals(want(off, 4096)));
      assert.ok(again.subarray(4096).equals(Buffer.alloc(4096)), 'nothing written past len');
    } finally {
      vfs.close();
      repo.close();
    }
  });
});

/** One READ over a raw socket: fixed newstyle, NBD_OPT_EXPORT_NAME, no structured replies. */
async function simpleRead(sock: string, name: string, offset: number, length: number): Promise<Buffer> {
  const s = net.createConnection(sock);
  let got = Buffer.alloc(0);
  let need = 0;
  let wake: (() => void) | undefined;
  s.on('data', (d: Buffer) => {
    got = Buffer.concat([got, d]);
    if (got.length >= need) wake?.();
  });
  const take = async (n: number): Promise<Buffer> => {
    need = n;
    while (got.length < n) await new Promise<void>((r) => (wake = r));
    const out = got.subarray(0, n);
    got = got.subarray(n);
    return out;
  };
  try {
    await take(18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
    const nameB = Buffer.from(name);
    const opt = Buffer.alloc(16);
    opt.writeBigUInt64BE(P.NBD_IHAVEOPT, 0);
    opt.writeUInt32BE(P.NBD_OPT_EXPORT_NAME, 8);
    opt.writeUInt32BE(nameB.length, 12);
    s.write(Buffer.concat([flags, opt, nameB]));
    await take(10);
    const req = Buffer.alloc(P.NBD_REQUEST_SIZE);
    req.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    req.writeUInt16BE(P.NBD_CMD_READ, 6);
    req.write('handle02', 8);
    P.writeU64(req, offset, 16);
    req.writeUInt32BE(length, 24);
    s.write(req);
    const head = await take(16);
    assert.equal(head.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
    assert.equal(head.readUInt32BE(4), 0);
    assert.equal(head.subarray(8, 16).toString(), 'handle02');
    return Buffer.from(await take(length));
  } finally {
    s.destroy();
  }
}
