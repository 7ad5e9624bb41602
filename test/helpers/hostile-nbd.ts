/**
 * A small, real NBD server speaking raw bytes over a Unix socket, whose replies a test scripts:
 * honest by default, or hostile (replies longer than asked, structured-reply lengths that lie,
 * overlapping chunks, block-status extents beyond the export or of length 0, stalls). It is a real
 * peer on a real socket (the client under test cannot tell it from qemu-nbd), not a mock; it
 * exists because qemu-nbd and nbdkit cannot be made to break the protocol.
 *
 * Handshake: fixed newstyle, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT (base:allocation,
 * context id 1) and NBD_OPT_GO; every other option is answered NBD_REP_ERR_UNSUP.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as P from '../../src/nbd/protocol';

export interface HostileRequest {
  type: number;
  flags: number;
  handle: number;
  offset: number;
  length: number;
}

export interface Replier {
  /** The export's bytes. */
  data: Buffer;
  /** Send raw bytes. */
  send(b: Buffer): void;
  /** A simple reply header (plus, for a successful read, `payload`). */
  simple(handle: number, errno: number, payload?: Buffer): void;
  /**
   * A structured reply chunk; `length` overrides the length field (to lie about it), the
   * payload is sent as given.
   */
  chunk(handle: number, flags: number, type: number, payload: Buffer, length?: number): void;
  /** Honest answer to a request (structured when negotiated). */
  honest(r: HostileRequest): void;
}

/** What the server does with a transmission request; the default is `rep.honest(r)`. */
export type Behaviour = (r: HostileRequest, rep: Replier) => void;

export interface HostileServer {
  socket: string;
  uri: string;
  /** Requests received, in order. */
  requests: HostileRequest[];
  stop(): Promise<void>;
}

export const BASE_ALLOCATION_ID = 1;

export function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  P.writeU64(b, n, 0);
  return b;
}

/** Block-status payload: context id, then (length, flags) pairs. */
export function extentsPayload(ctx: number, extents: [number, number][]): Buffer {
  const b = Buffer.alloc(4 + 8 * extents.length);
  b.writeUInt32BE(ctx, 0);
  extents.forEach(([len, flags], i) => {
    b.writeUInt32BE(len, 4 + 8 * i);
    b.writeUInt32BE(flags, 8 + 8 * i);
  });
  return b;
}

export async function startHostileServer(data: Buffer, behaviour?: Behaviour): Promise<HostileServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-hostile-nbd-'));
  const socket = path.join(dir, 'nbd.sock');
  const requests: HostileRequest[] = [];
  const conns = new Set<net.Socket>();
  const server = net.createServer((c) => {
    conns.add(c);
    c.on('close', () => conns.delete(c));
    c.on('error', () => undefined);
    serve(c, data, behaviour, requests);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socket, () => resolve());
  });
  return {
    socket,
    uri: `nbd+unix:///?socket=${socket}`,
    requests,
    stop: async () => {
      for (const c of conns) c.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function serve(
  c: net.Socket,
  data: Buffer,
  behaviour: Behaviour | undefined,
  requests: HostileRequest[],
): void {
  let buf = Buffer.alloc(0);
  let phase: 'flags' | 'options' | 'transmission' = 'flags';
  let structured = false;
  const send = (b: Buffer): void => {
    if (!c.destroyed) c.write(b);
  };
  const optReply = (opt: number, type: number, payload: Buffer = Buffer.alloc(0)): void => {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(P.NBD_REP_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(payload.length, 16);
    send(Buffer.concat([h, payload]));
  };
  const rep: Replier = {
    data,
    send,
    simple(handle, errno, payload) {
      const h = Buffer.alloc(16);
      h.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
      h.writeUInt32BE(errno, 4);
      h.writeUInt32BE(handle, 12);
      send(payload ? Buffer.concat([h, payload]) : h);
    },
    chunk(handle, flags, type, payload, length) {
      const h = Buffer.alloc(20);
      h.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
      h.writeUInt16BE(flags, 4);
      h.writeUInt16BE(type, 6);
      h.writeUInt32BE(handle, 12);
      h.writeUInt32BE(length ?? payload.length, 16);
      send(Buffer.concat([h, payload]));
    },
    honest(r) {
      if (r.type === P.NBD_CMD_READ) {
        const bytes = data.subarray(r.offset, r.offset + r.length);
        if (!structured) return rep.simple(r.handle, 0, bytes);
        return rep.chunk(
          r.handle,
          P.NBD_REPLY_FLAG_DONE,
          P.NBD_REPLY_TYPE_OFFSET_DATA,
          Buffer.concat([u64(r.offset), bytes]),
        );
      }
      if (r.type === P.NBD_CMD_BLOCK_STATUS) {
        return rep.chunk(
          r.handle,
          P.NBD_REPLY_FLAG_DONE,
          P.NBD_REPLY_TYPE_BLOCK_STATUS,
          extentsPayload(BASE_ALLOCATION_ID, [[r.length, 0]]),
        );
      }
      if (r.type === P.NBD_CMD_DISC) {
        c.end();
        return;
      }
      return structured
        ? rep.chunk(r.handle, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, Buffer.alloc(0))
        : rep.simple(r.handle, 0);
    },
  };

  const hello = Buffer.alloc(18);
  hello.writeBigUInt64BE(P.NBD_MAGIC, 0);
  hello.writeBigUInt64BE(P.NBD_IHAVEOPT, 8);
  hello.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
  send(hello);

  c.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      if (phase === 'flags') {
        if (buf.length < 4) return;
        buf = buf.subarray(4);
        phase = 'options';
      } else if (phase === 'options') {
        if (buf.length < 16) return;
        const opt = buf.readUInt32BE(8);
        const len = buf.readUInt32BE(12);
        if (buf.length < 16 + len) return;
        const body = buf.subarray(16, 16 + len);
        buf = buf.subarray(16 + len);
        if (opt === P.NBD_OPT_STRUCTURED_REPLY) {
          structured = true;
          optReply(opt, P.NBD_REP_ACK);
        } else if (opt === P.NBD_OPT_SET_META_CONTEXT) {
          const nameLen = body.readUInt32BE(0);
          const n = body.readUInt32BE(4 + nameLen);
          let q = 8 + nameLen;
          for (let i = 0; i < n; i++) {
            const ql = body.readUInt32BE(q);
            const name = body.toString('utf8', q + 4, q + 4 + ql);
            q += 4 + ql;
            if (name === P.BASE_ALLOCATION) {
              const p = Buffer.alloc(4 + name.length);
              p.writeUInt32BE(BASE_ALLOCATION_ID, 0);
              p.write(name, 4);
              optReply(opt, P.NBD_REP_META_CONTEXT, p);
            }
          }
          optReply(opt, P.NBD_REP_ACK);
        } else if (opt === P.NBD_OPT_GO) {
          const info = Buffer.alloc(12);
          info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
          P.writeU64(info, data.length, 2);
          info.writeUInt16BE(P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_READ_ONLY, 10);
          optReply(opt, P.NBD_REP_INFO, info);
          optReply(opt, P.NBD_REP_ACK);
          phase = 'transmission';
        } else {
          optReply(opt, P.NBD_REP_ERR_UNSUP);
        }
      } else {
        if (buf.length < 28) return;
        const r: HostileRequest = {
          flags: buf.readUInt16BE(4),
          type: buf.readUInt16BE(6),
          handle: buf.readUInt32BE(12),
          offset: P.readU64(buf, 16),
          length: buf.readUInt32BE(24),
        };
        buf = buf.subarray(28);
        requests.push(r);
        if (behaviour && r.type !== P.NBD_CMD_DISC) behaviour(r, rep);
        else rep.honest(r);
      }
    }
  });
}
