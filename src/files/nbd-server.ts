/**
 * A small read-only NBD server (fixed newstyle handshake, simple replies) on a Unix socket,
 * serving named exports from `readAt` callbacks: how the file-level engines hand a checkpoint's
 * disks to QEMU (libguestfs' appliance) and to nbdfuse (the kernel engine's loop devices) without
 * writing the disks anywhere. Every write-like command is refused with EPERM, so nothing can ever
 * be written into a backup through it.
 *
 * Options: GO, INFO, EXPORT_NAME, LIST, ABORT; anything else (STRUCTURED_REPLY, meta contexts,
 * STARTTLS) is answered NBD_REP_ERR_UNSUP, which every client handles by falling back. Commands:
 * READ (up to 32 MiB), FLUSH and CACHE (no-ops), DISC. Requests on a connection are served
 * concurrently and answered as they complete (NBD allows any order); each reply is written with one
 * `write` so replies never interleave. Memory: the buffers of the reads in flight (clients keep a
 * bounded number of requests outstanding: QEMU 16, nbdfuse a few). No locking: exports are
 * immutable. The socket lives in a caller-provided private directory.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as P from '../nbd/protocol';

export interface NbdExport {
  size: number;
  readAt(offset: number, length: number): Promise<Buffer>;
}

export interface NbdServerStats {
  connections: number;
  reads: number;
  bytesRead: number;
  errors: number;
}

const MAX_READ = 32 << 20;
const MAX_OPTION = 64 << 10;

/** Incoming bytes as a queue from which exact lengths can be awaited. */
class ByteQueue {
  private chunks: Buffer[] = [];
  private length = 0;
  private waiter: (() => void) | undefined;
  private ended = false;

  push(b: Buffer): void {
    this.chunks.push(b);
    this.length += b.length;
    this.wake();
  }

  end(): void {
    this.ended = true;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** Exactly `n` bytes, or null when the peer closed first. */
  async take(n: number): Promise<Buffer | null> {
    while (this.length < n) {
      if (this.ended) return null;
      await new Promise<void>((r) => (this.waiter = r));
    }
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.length = rest.length;
    return out;
  }
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(20 + data.length);
  b.writeBigUInt64BE(P.NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

function simpleReply(handle: Buffer, error: number, data?: Buffer): Buffer {
  const b = Buffer.allocUnsafe(16 + (data?.length ?? 0));
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8);
  data?.copy(b, 16);
  return b;
}

const TRANSMISSION_FLAGS =
  P.NBD_FLAG_HAS_FLAGS |
  P.NBD_FLAG_READ_ONLY |
  P.NBD_FLAG_SEND_FLUSH |
  P.NBD_FLAG_CAN_MULTI_CONN |
  P.NBD_FLAG_SEND_CACHE;

export class NbdExportServer {
  readonly stats: NbdServerStats = { connections: 0, reads: 0, bytesRead: 0, errors: 0 };
  private readonly sockets = new Set<net.Socket>();
  private closed = false;

  private constructor(
    readonly socketPath: string,
    private readonly server: net.Server,
    private readonly exports: ReadonlyMap<string, NbdExport>,
    private readonly onError: (msg: string) => void,
  ) {}

  /** Listen on `socketPath` (removed first if it exists). */
  static async listen(
    socketPath: string,
    exports: ReadonlyMap<string, NbdExport>,
    onError: (msg: string) => void = () => undefined,
  ): Promise<NbdExportServer> {
    fs.rmSync(socketPath, { force: true });
    const server = net.createServer();
    const self = new NbdExportServer(socketPath, server, exports, onError);
    server.on('connection', (s) => self.serve(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    fs.chmodSync(socketPath, 0o600);
    return self;
  }

  /** Stop listening and drop every connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    fs.rmSync(this.socketPath, { force: true });
  }

  private serve(sock: net.Socket): void {
    this.stats.connections++;
    this.sockets.add(sock);
    const q = new ByteQueue();
    sock.on('data', (d: Buffer) => q.push(d));
    sock.on('end', () => q.end());
    sock.on('close', () => {
      q.end();
      this.sockets.delete(sock);
    });
    sock.on('error', () => q.end());
    this.session(sock, q).catch((e: unknown) => {
      this.stats.errors++;
      this.onError(`NBD connection: ${(e as Error).message}`);
      sock.destroy();
    });
  }

  private async session(sock: net.Socket, q: ByteQueue): Promise<void> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(P.NBD_MAGIC, 0);
    hello.writeBigUInt64BE(P.NBD_IHAVEOPT, 8);
    hello.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    sock.write(hello);
    const cflagsB = await q.take(4);
    if (!cflagsB) return;
    const noZeroes = (cflagsB.readUInt32BE(0) & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    let chosen: NbdExport | undefined;
    while (!chosen) {
      const head = await q.take(16);
      if (!head) return;
      if (head.readBigUInt64BE(0) !== P.NBD_IHAVEOPT) throw new Error('bad option magic');
      const opt = head.readUInt32BE(8);
      const len = head.readUInt32BE(12);
      if (len > MAX_OPTION) throw new Error(`option ${opt} too long (${len} bytes)`);
      const data = await q.take(len);
      if (!data) return;
      switch (opt) {
        case P.NBD_OPT_EXPORT_NAME: {
          const exp = this.exports.get(data.toString('utf8'));
          if (!exp) {
            sock.destroy(); // the protocol has no error reply for EXPORT_NAME
            return;
          }
          const b = Buffer.alloc(noZeroes ? 10 : 134);
          P.writeU64(b, exp.size, 0);
          b.writeUInt16BE(TRANSMISSION_FLAGS, 8);
          sock.write(b);
          chosen = exp;
          break;
        }
        case P.NBD_OPT_GO:
        case P.NBD_OPT_INFO: {
          if (data.length < 6) {
            sock.write(optionReply(opt, P.NBD_REP_ERR_INVALID));
            break;
          }
          const nameLen = data.readUInt32BE(0);
          if (4 + nameLen + 2 > data.length) {
            sock.write(optionReply(opt, P.NBD_REP_ERR_INVALID));
            break;
          }
          const name = data.subarray(4, 4 + nameLen).toString('utf8');
          const nInfo = data.readUInt16BE(4 + nameLen);
          const infos: number[] = [];
          for (let i = 0; i < nInfo && 4 + nameLen + 2 + 2 * i + 2 <= data.length; i++) {
            infos.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
          }
          const exp = this.exports.get(name);
          if (!exp) {
            sock.write(optionReply(opt, P.NBD_REP_ERR_UNKNOWN, Buffer.from(`no export named "${name}"`)));
            break;
          }
          const info = Buffer.alloc(12);
          info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
          P.writeU64(info, exp.size, 2);
          info.writeUInt16BE(TRANSMISSION_FLAGS, 10);
          sock.write(optionReply(opt, P.NBD_REP_INFO, info));
          if (infos.includes(P.NBD_INFO_BLOCK_SIZE)) {
            const bs = Buffer.alloc(14);
            bs.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
            bs.writeUInt32BE(1, 2);
            bs.writeUInt32BE(4096, 6);
            bs.writeUInt32BE(MAX_READ, 10);
            sock.write(optionReply(opt, P.NBD_REP_INFO, bs));
          }
          sock.write(optionReply(opt, P.NBD_REP_ACK));
          if (opt === P.NBD_OPT_GO) chosen = exp;
          break;
        }
        case P.NBD_OPT_LIST: {
          for (const name of this.exports.keys()) {
            const n = Buffer.from(name, 'utf8');
            const b = Buffer.alloc(4 + n.length);
            b.writeUInt32BE(n.length, 0);
            n.copy(b, 4);
            sock.write(optionReply(opt, P.NBD_REP_SERVER, b));
          }
          sock.write(optionReply(opt, P.NBD_REP_ACK));
          break;
        }
        case P.NBD_OPT_ABORT:
          sock.end(optionReply(opt, P.NBD_REP_ACK));
          return;
        default:
          sock.write(optionReply(opt, P.NBD_REP_ERR_UNSUP));
      }
    }
    await this.transmission(sock, q, chosen);
  }

  private async transmission(sock: net.Socket, q: ByteQueue, exp: NbdExport): Promise<void> {
    const inflight = new Set<Promise<void>>();
    for (;;) {
      const req = await q.take(P.NBD_REQUEST_SIZE);
      if (!req) break;
      if (req.readUInt32BE(0) !== P.NBD_REQUEST_MAGIC) throw new Error('bad request magic');
      const type = req.readUInt16BE(6);
      const handle = Buffer.from(req.subarray(8, 16));
      const offset = P.readU64(req, 16);
      const length = req.readUInt32BE(24);
      if (type === P.NBD_CMD_WRITE) {
        const payload = await q.take(length); // consume it, then refuse
        if (!payload) break;
        sock.write(simpleReply(handle, P.NBD_EPERM));
        continue;
      }
      if (type === P.NBD_CMD_DISC) break;
      if (type === P.NBD_CMD_FLUSH || type === P.NBD_CMD_CACHE) {
        sock.write(simpleReply(handle, 0));
        continue;
      }
      if (type === P.NBD_CMD_TRIM || type === P.NBD_CMD_WRITE_ZEROES) {
        sock.write(simpleReply(handle, P.NBD_EPERM));
        continue;
      }
      if (type !== P.NBD_CMD_READ) {
        sock.write(simpleReply(handle, P.NBD_EINVAL));
        continue;
      }
      if (offset < 0 || length > MAX_READ || offset + length > exp.size) {
        sock.write(simpleReply(handle, P.NBD_EINVAL));
        continue;
      }
      const job = exp.readAt(offset, length).then(
        (data) => {
          this.stats.reads++;
          this.stats.bytesRead += length;
          const body =
            data.length === length ? data : Buffer.concat([data, Buffer.alloc(length - data.length)]);
          if (!sock.destroyed) sock.write(simpleReply(handle, 0, body));
        },
        (e: unknown) => {
          this.stats.errors++;
          this.onError(`read of ${length} bytes at ${offset} failed: ${(e as Error).message}`);
          if (!sock.destroyed) sock.write(simpleReply(handle, P.NBD_EIO));
        },
      );
      const tracked = job.finally(() => inflight.delete(tracked));
      inflight.add(tracked);
    }
    await Promise.all(inflight);
    sock.end();
  }
}
