/**
 * The NBD client against a hostile server (issue 11 §6): replies longer than asked, structured
 * reply lengths that lie, chunks that overlap, block-status extents beyond the export or of length
 * 0, a server that stalls. Each time the client fails with NBD_PROTOCOL within bounded time and
 * memory and never hands out bytes the server did not send for that range. The server is a real
 * peer on a Unix socket (test/helpers/hostile-nbd.ts). A fast-check property drives the reply
 * parser with random, fragmented, reordered and mutated structured replies.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { NbdClient, BASE_ALLOCATION } from '../../src/nbd/client';
import * as P from '../../src/nbd/protocol';
import { isBkfsError } from '../../src/errors';
import {
  BASE_ALLOCATION_ID,
  extentsPayload,
  startHostileServer,
  u64,
  type Behaviour,
  type HostileServer,
} from '../helpers/hostile-nbd';

const SIZE = 1 << 20;
const data = Buffer.alloc(SIZE);
for (let i = 0; i < SIZE; i++) data[i] = (i * 2654435761) >>> 24;

let srv: HostileServer;
/** What the server does with the next requests (set by each test). */
let behaviour: Behaviour | undefined;

function protocolError(e: unknown): boolean {
  return isBkfsError(e, 'NBD_PROTOCOL');
}

async function connect(replyTimeoutMs = 2000): Promise<NbdClient> {
  return NbdClient.connect(srv.uri, { metaContexts: [BASE_ALLOCATION], replyTimeoutMs });
}

/** `p` must reject with NBD_PROTOCOL (matching `re`) within `ms`. */
async function failsFast<T>(p: Promise<T>, re: RegExp, ms = 3000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still waiting after ${ms} ms`)), ms);
  });
  try {
    await assert.rejects(Promise.race([p, deadline]), (e) => {
      assert.ok(protocolError(e), `not NBD_PROTOCOL: ${String(e)}`);
      assert.match(String((e as Error).message), re);
      return true;
    });
  } finally {
    clearTimeout(timer);
  }
}

describe('NBD client against a hostile server', () => {
  before(async () => {
    srv = await startHostileServer(data, (r, rep) => (behaviour ?? ((x) => rep.honest(x)))(r, rep));
  });
  after(async () => {
    await srv.stop();
  });

  it('reads and maps an honest export', async () => {
    behaviour = undefined;
    const c = await connect();
    assert.deepEqual(await c.read(4096, 65536), data.subarray(4096, 4096 + 65536));
    assert.deepEqual(await c.blockStatus(BASE_ALLOCATION, 0, 8192), [{ offset: 0, length: 8192, flags: 0 }]);
    await c.close();
  });

  it('refuses overlapping data chunks that add up to the request (would leave bytes unset)', async () => {
    behaviour = (r, rep) => {
      const half = r.length / 2;
      const piece = Buffer.concat([u64(r.offset), data.subarray(r.offset, r.offset + half)]);
      rep.chunk(r.handle, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, piece);
      rep.chunk(r.handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, piece);
    };
    const c = await connect();
    await failsFast(c.read(0, 8192), /overlaps/);
    c.destroy();
  });

  it('refuses a hole over data already sent', async () => {
    behaviour = (r, rep) => {
      rep.chunk(
        r.handle,
        0,
        P.NBD_REPLY_TYPE_OFFSET_DATA,
        Buffer.concat([u64(r.offset), data.subarray(r.offset, r.offset + r.length)]),
      );
      const hole = Buffer.alloc(12);
      P.writeU64(hole, r.offset, 0);
      hole.writeUInt32BE(r.length, 8);
      rep.chunk(r.handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_HOLE, hole);
    };
    const c = await connect();
    await failsFast(c.read(0, 4096), /overlaps/);
    c.destroy();
  });

  it('refuses a data chunk whose length field is longer than the request', async () => {
    behaviour = (r, rep) => {
      const payload = Buffer.concat([u64(r.offset), data.subarray(r.offset, r.offset + r.length)]);
      rep.chunk(r.handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, payload, 8 + 4 * r.length);
    };
    const c = await connect();
    await failsFast(c.read(0, 4096), /OFFSET_DATA/);
    c.destroy();
  });

  it('refuses a reply longer than asked (trailing bytes after the data)', async () => {
    behaviour = (r, rep) => {
      rep.honest(r);
      rep.send(Buffer.alloc(100, 0x41));
    };
    const c = await connect();
    const first = c.read(0, 4096);
    await failsFast(Promise.all([first, c.read(4096, 4096)]), /bad reply magic|closed/);
    c.destroy();
  });

  it('refuses an error chunk that claims 60 MiB without waiting for it', async () => {
    behaviour = (r, rep) => {
      const p = Buffer.alloc(6);
      p.writeUInt32BE(P.NBD_EIO, 0);
      rep.chunk(r.handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, p, 60 << 20);
    };
    const c = await connect(60_000);
    await failsFast(c.read(0, 4096), /error chunk length/);
    c.destroy();
  });

  it('refuses a block-status chunk that claims 32 MiB of extents without buffering it', async () => {
    behaviour = (r, rep) => {
      rep.chunk(
        r.handle,
        P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_BLOCK_STATUS,
        extentsPayload(BASE_ALLOCATION_ID, [[r.length, 0]]),
        4 + 8 * (4 << 20),
      );
    };
    const c = await connect(60_000);
    await failsFast(c.blockStatus(BASE_ALLOCATION, 0, 4096), /BLOCK_STATUS chunk/);
    c.destroy();
  });

  it('refuses block-status extents that run beyond the end of the export', async () => {
    behaviour = (r, rep) => {
      rep.chunk(
        r.handle,
        P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_BLOCK_STATUS,
        extentsPayload(BASE_ALLOCATION_ID, [
          [r.length, 0],
          [SIZE, 3],
        ]),
      );
    };
    const c = await connect();
    await failsFast(c.blockStatus(BASE_ALLOCATION, 0, 4096), /beyond the end of the export/);
    c.destroy();
  });

  it('refuses a block-status extent of length 0', async () => {
    behaviour = (r, rep) => {
      rep.chunk(
        r.handle,
        P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_BLOCK_STATUS,
        extentsPayload(BASE_ALLOCATION_ID, [
          [0, 0],
          [r.length, 0],
        ]),
      );
    };
    const c = await connect();
    await failsFast(c.blockStatus(BASE_ALLOCATION, 0, 4096), /zero-length/);
    c.destroy();
  });

  it('fails a read when the server stalls before replying', async () => {
    behaviour = () => undefined;
    const c = await connect(300);
    const t0 = Date.now();
    await failsFast(c.read(0, 4096), /sent nothing for 300 ms/, 3000);
    assert.ok(Date.now() - t0 < 2000);
    c.destroy();
  });

  it('fails a read when the server stalls in the middle of the data', async () => {
    behaviour = (r, rep) => {
      const payload = Buffer.concat([u64(r.offset), data.subarray(r.offset, r.offset + r.length)]);
      rep.chunk(
        r.handle,
        P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_OFFSET_DATA,
        payload.subarray(0, 1000),
        payload.length,
      );
    };
    const c = await connect(300);
    await failsFast(c.read(0, 65536), /sent nothing for 300 ms/);
    c.destroy();
  });

  it('refuses a read split into absurdly many tiny chunks', async () => {
    behaviour = (r, rep) => {
      for (let i = 0; i < r.length; i++) {
        const p = Buffer.concat([u64(r.offset + i), data.subarray(r.offset + i, r.offset + i + 1)]);
        rep.chunk(r.handle, i === r.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0, P.NBD_REPLY_TYPE_OFFSET_DATA, p);
      }
    };
    const c = await connect();
    // The server side writes 65 536 messages: give a loaded machine time (a hang still fails).
    await failsFast(c.read(0, 65536), /too many chunks/, 20000);
    c.destroy();
  });

  describe('property: structured read replies (fast-check)', () => {
    /** A reply plan: pieces [start, end) relative to the request, each data or hole. */
    type Piece = { s: number; e: number; hole: boolean };

    const planArb = fc
      .record({
        offset: fc.integer({ min: 0, max: SIZE - 1 }),
        length: fc.integer({ min: 1, max: 20000 }),
        cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 12 }),
        holes: fc.array(fc.boolean(), { minLength: 13, maxLength: 13 }),
        order: fc.array(fc.nat(), { minLength: 13, maxLength: 13 }),
        frag: fc.array(fc.integer({ min: 1, max: 300 }), { minLength: 1, maxLength: 8 }),
      })
      .map((x) => {
        const length = Math.min(x.length, SIZE - x.offset);
        const points = [...new Set(x.cuts.map((c) => Math.floor(c * length)))].filter(
          (p) => p > 0 && p < length,
        );
        points.sort((a, b) => a - b);
        const bounds = [0, ...points, length];
        const pieces: Piece[] = [];
        for (let i = 0; i + 1 < bounds.length; i++)
          pieces.push({ s: bounds[i]!, e: bounds[i + 1]!, hole: x.holes[i]! });
        // Shuffle (the server may answer in any order).
        const keyed = pieces.map((p, i) => ({ p, k: x.order[i]! }));
        keyed.sort((a, b) => a.k - b.k);
        return { offset: x.offset, length, pieces: keyed.map((k) => k.p), frag: x.frag };
      });

    type Mutation = 'none' | 'duplicate' | 'drop' | 'shift' | 'grow' | 'lie-length';

    function encode(offset: number, pieces: Piece[], handle: number, lie: boolean): Buffer {
      const out: Buffer[] = [];
      pieces.forEach((p, i) => {
        const flags = i === pieces.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
        const h = Buffer.alloc(20);
        h.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
        h.writeUInt16BE(flags, 4);
        h.writeUInt32BE(handle, 12);
        let payload: Buffer;
        if (p.hole) {
          h.writeUInt16BE(P.NBD_REPLY_TYPE_OFFSET_HOLE, 6);
          payload = Buffer.alloc(12);
          P.writeU64(payload, offset + p.s, 0);
          payload.writeUInt32BE(p.e - p.s, 8);
        } else {
          h.writeUInt16BE(P.NBD_REPLY_TYPE_OFFSET_DATA, 6);
          payload = Buffer.concat([u64(offset + p.s), data.subarray(offset + p.s, offset + p.e)]);
        }
        h.writeUInt32BE(payload.length + (lie && i === 0 ? 3 : 0), 16);
        out.push(h, payload);
      });
      return Buffer.concat(out);
    }

    it('any honest reply, in any order and fragmentation, reads exactly the bytes; any mutated one reads them or fails NBD_PROTOCOL', async () => {
      await fc.assert(
        fc.asyncProperty(
          planArb,
          fc.constantFrom<Mutation>('none', 'none', 'duplicate', 'drop', 'shift', 'grow', 'lie-length'),
          fc.nat(),
          async (plan, mutation, pick) => {
            let pieces = plan.pieces.map((p) => ({ ...p }));
            const i = pick % pieces.length;
            if (mutation === 'duplicate') pieces.push({ ...pieces[i]! });
            if (mutation === 'drop' && pieces.length > 1) pieces.splice(i, 1);
            if (mutation === 'shift' && pieces[i]!.s > 0)
              pieces[i] = { ...pieces[i]!, s: pieces[i]!.s - 1, e: pieces[i]!.e - 1 };
            if (mutation === 'grow')
              pieces[i] = { ...pieces[i]!, e: Math.min(pieces[i]!.e + 7, SIZE - plan.offset) };
            pieces = pieces.filter((p) => p.e > p.s);
            const expected = Buffer.from(data.subarray(plan.offset, plan.offset + plan.length));
            for (const p of plan.pieces) if (p.hole) expected.fill(0, p.s, p.e);
            behaviour = (r, rep) => {
              const bytes = encode(r.offset, pieces, r.handle, mutation === 'lie-length');
              // Deliver in fragments of the planned sizes, each in its own write and tick.
              let pos = 0;
              let k = 0;
              const next = (): void => {
                if (pos >= bytes.length) return;
                const n = plan.frag[k++ % plan.frag.length]! * 7;
                rep.send(bytes.subarray(pos, pos + n));
                pos += n;
                setImmediate(next);
              };
              next();
            };
            const c = await connect(1000);
            try {
              const got = await c.read(plan.offset, plan.length);
              assert.ok(got.equals(expected), `read returned other bytes (mutation ${mutation})`);
              if (mutation === 'none') return;
            } catch (e) {
              assert.notEqual(mutation, 'none', `honest reply failed: ${String(e)}`);
              assert.ok(protocolError(e), `not NBD_PROTOCOL: ${String(e)}`);
            } finally {
              c.destroy();
            }
          },
        ),
        { numRuns: 150 },
      );
    });
  });
});
