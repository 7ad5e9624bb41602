/**
 * bkfs' one NBD server: serves named exports from `readAt` callbacks (a checkpoint's disks, or a
 * copy-on-write overlay over them), on a Unix socket or TCP, optionally with TLS.
 *
 * Handshake: fixed newstyle. Options: GO, INFO, EXPORT_NAME, LIST, ABORT, STRUCTURED_REPLY,
 * LIST_META_CONTEXT / SET_META_CONTEXT (the one context `base:allocation`), STARTTLS (when the
 * server has TLS credentials: then every other option before STARTTLS is answered TLS_REQD, as
 * qemu-nbd does). Extended headers are not offered (clients fall back).
 *
 * Commands: READ (up to 32 MiB; a structured OFFSET_DATA chunk once structured replies are
 * negotiated, else a simple reply), BLOCK_STATUS (base:allocation from the export's `blockStatus`:
 * holes and zero extents so nbdcopy / qemu-img convert skip them), FLUSH, CACHE, DISC; on a
 * writable export also WRITE, TRIM, WRITE_ZEROES (with FUA). On a read-only export every write-like
 * command is refused with EPERM, so nothing can be written through it.
 *
 * Requests on a connection are served concurrently and answered as they complete (NBD allows any
 * order); every reply is written with one `write` so replies never interleave. Multi-conn is
 * advertised: read-only exports are immutable, and a writable export's `flush` makes every write
 * completed before it (on any connection) durable, which is what CAN_MULTI_CONN requires.
 * Memory: the buffers of the requests in flight (clients bound them: QEMU 16, nbdcopy 64).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import * as P from './protocol';

/** One extent of a block-status answer: `flags` are base:allocation's NBD_STATE_* bits. */
export interface BlockExtent {
  length: number;
  flags: number;
}

export interface NbdExport {
  size: number;
  readAt(offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: fill all of `target` with the bytes at `offset` (in range). The server then reads
   * straight into its reply buffer: one allocation and one socket write per read, no copy.
   */
  readInto?(offset: number, target: Buffer): Promise<void>;
  /**
   * Allocation of `[offset, offset+length)`: extents in order from `offset`, covering at least one
   * byte (they may stop short of `length`). Without it, everything is reported as data.
   */
  blockStatus?(offset: number, length: number): Promise<BlockExtent[]>;
  /** Writable exports implement all four. */
  write?(offset: number, data: Buffer, fua: boolean): Promise<void>;
  zero?(offset: number, length: number, fua: boolean): Promise<void>;
  trim?(offset: number, length: number, fua: boolean): Promise<void>;
  flush?(): Promise<void>;
}

export interface NbdServerStats {
  connections: number;
  reads: number;
  bytesRead: number;
  writes: number;
  bytesWritten: number;
  errors: number;
}

export type ListenAddress = { unix: string } | { host: string; port: number };

export interface TlsCreds {
  /** PEM: CA that signed the clients' certificates (and, usually, the server's). */
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** Require a client certificate signed by `ca` (qemu's verify-peer; default true). */
  verifyPeer?: boolean;
}

export interface ServerOptions {
  tls?: TlsCreds;
  onError?: (msg: string) => void;
  /**
   * Gather the replies that complete while other requests of the connection are in flight until
   * the event loop's check phase, so that they leave in one write (at QD16 one write per reply was
   * a quarter of the serving thread; bench/README.md). Only for a server whose process never waits
   * synchronously on its own clients (a standalone `bkfs serve`): the file-restore engine reads
   * its in-process export through kernel mounts, and a reply held back while that process blocked
   * (a synchronous umount, or exit) never left and deadlocked it. Off by default.
   */
  gatherReplies?: boolean;
}

export const MAX_REQUEST = 32 << 20;
const MAX_OPTION = 64 << 10;
const META_BASE_ALLOCATION = 1;
/** At most this many block-status descriptors in one reply. */
const MAX_EXTENTS = 8192;

/** Parse `unix:PATH`, `tcp:HOST:PORT`, `tcp:[V6]:PORT`. */
export function parseListen(spec: string): ListenAddress | null {
  if (spec.startsWith('unix:') && spec.length > 5) return { unix: spec.slice(5) };
  const m = /^tcp:(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(spec);
  if (m) {
    const port = Number(m[3]);
    if (port > 0 && port < 65536) return { host: (m[1] ?? m[2]) as string, port };
  }
  return null;
}

export function formatListen(a: ListenAddress): string {
  return 'unix' in a ? `unix:${a.unix}` : `tcp:${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

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

  /** Bytes received but not taken (must be none when STARTTLS switches the stream). */
  get buffered(): number {
    return this.length;
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

function structuredHeader(handle: Buffer, type: number, flags: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(20);
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

function structuredError(handle: Buffer, error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 200), 'utf8');
  const body = Buffer.allocUnsafe(6 + msg.length);
  body.writeUInt32BE(error, 0);
  body.writeUInt16BE(msg.length, 4);
  msg.copy(body, 6);
  return Buffer.concat([
    structuredHeader(handle, P.NBD_REPLY_TYPE_ERROR, P.NBD_REPLY_FLAG_DONE, body.length),
    body,
  ]);
}

function isWritable(e: NbdExport): boolean {
  return !!(e.write && e.zero && e.trim && e.flush);
}

/** The reply to a read of `length` bytes at `offset` (in range), simple or structured. */
async function readReply(
  exp: NbdExport,
  handle: Buffer,
  offset: number,
  length: number,
  structured: boolean,
): Promise<Buffer | Buffer[]> {
  if (exp.readInto && length > 0) {
    // Header and data in one buffer, filled in place: one write, nothing copied.
    const head = structured ? 28 : 16;
    const reply = Buffer.allocUnsafe(head + length);
    await exp.readInto(offset, reply.subarray(head));
    if (!structured) {
      reply.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
      reply.writeUInt32BE(0, 4);
      handle.copy(reply, 8);
    } else {
      reply.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
      reply.writeUInt16BE(P.NBD_REPLY_FLAG_DONE, 4);
      reply.writeUInt16BE(P.NBD_REPLY_TYPE_OFFSET_DATA, 6);
      handle.copy(reply, 8);
      reply.writeUInt32BE(8 + length, 16);
      P.writeU64(reply, offset, 20);
    }
    return reply;
  }
  const data = await exp.readAt(offset, length);
  const body = data.length === length ? data : Buffer.concat([data, Buffer.alloc(length - data.length)]);
  if (!structured) return [simpleReply(handle, 0), body];
  if (length === 0) return structuredHeader(handle, P.NBD_REPLY_TYPE_NONE, P.NBD_REPLY_FLAG_DONE, 0);
  const h = structuredHeader(handle, P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_FLAG_DONE, 8 + length);
  const off = Buffer.allocUnsafe(8);
  P.writeU64(off, offset, 0);
  return [h, off, body];
}

/** The `base:allocation` block status reply carrying `ext`. */
function blockStatusReply(handle: Buffer, ext: BlockExtent[]): Buffer[] {
  const body = Buffer.allocUnsafe(4 + 8 * ext.length);
  body.writeUInt32BE(META_BASE_ALLOCATION, 0);
  ext.forEach((e, i) => {
    body.writeUInt32BE(e.length, 4 + 8 * i);
    body.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return [structuredHeader(handle, P.NBD_REPLY_TYPE_BLOCK_STATUS, P.NBD_REPLY_FLAG_DONE, body.length), body];
}

function transmissionFlags(e: NbdExport): number {
  let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_CAN_MULTI_CONN | P.NBD_FLAG_SEND_CACHE;
  if (isWritable(e)) f |= P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES;
  else f |= P.NBD_FLAG_READ_ONLY;
  return f;
}

/** Parse the data of LIST/SET_META_CONTEXT: export name and queries, or null if malformed. */
function parseMetaQuery(data: Buffer): { name: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  let pos = 4 + nameLen;
  if (pos + 4 > data.length) return null;
  const name = data.subarray(4, pos).toString('utf8');
  const n = data.readUInt32BE(pos);
  pos += 4;
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    if (pos + 4 > data.length) return null;
    const l = data.readUInt32BE(pos);
    pos += 4;
    if (pos + l > data.length) return null;
    queries.push(data.subarray(pos, pos + l).toString('utf8'));
    pos += l;
  }
  return pos === data.length ? { name, queries } : null;
}

function matchesBaseAllocation(q: string): boolean {
  return q === 'base:' || q === P.BASE_ALLOCATION;
}

/** A connection's stream; replaced by a TLS stream after STARTTLS. */
interface Conn {
  sock: net.Socket;
  q: ByteQueue;
}

export class NbdServer {
  readonly stats: NbdServerStats = {
    connections: 0,
    reads: 0,
    bytesRead: 0,
    writes: 0,
    bytesWritten: 0,
    errors: 0,
  };
  private readonly sockets = new Set<net.Socket>();
  private closed = false;
  private readonly secureContext: tls.SecureContext | undefined;
  private readonly onError: (msg: string) => void;

  private constructor(
    public address: ListenAddress,
    private readonly server: net.Server,
    private readonly exports: ReadonlyMap<string, NbdExport>,
    private readonly opts: ServerOptions,
  ) {
    this.onError = opts.onError ?? (() => undefined);
    this.secureContext = opts.tls
      ? tls.createSecureContext({ ca: opts.tls.ca, cert: opts.tls.cert, key: opts.tls.key })
      : undefined;
  }

  /** Listen on `address` (a Unix socket path is replaced if it exists; created 0600). */
  static async listen(
    address: ListenAddress,
    exports: ReadonlyMap<string, NbdExport>,
    opts: ServerOptions = {},
  ): Promise<NbdServer> {
    if ('unix' in address) fs.rmSync(address.unix, { force: true });
    const server = net.createServer({ noDelay: true });
    const self = new NbdServer(address, server, exports, opts);
    server.on('connection', (s) => self.serve(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = () => {
        server.off('error', reject);
        resolve();
      };
      if ('unix' in address) server.listen(address.unix, done);
      else server.listen(address.port, address.host, done);
    });
    if ('unix' in address) fs.chmodSync(address.unix, 0o600);
    const bound = server.address();
    if (!('unix' in address) && bound && typeof bound === 'object') {
      self.address = { host: address.host, port: bound.port }; // the real port of tcp:HOST:0
    }
    return self;
  }

  /** Stop listening and drop every connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    if ('unix' in this.address) fs.rmSync(this.address.unix, { force: true });
  }

  private attach(sock: net.Socket): Conn {
    const q = new ByteQueue();
    sock.on('data', (d: Buffer) => q.push(d));
    sock.on('end', () => q.end());
    sock.on('close', () => q.end());
    sock.on('error', () => q.end());
    return { sock, q };
  }

  private serve(sock: net.Socket): void {
    this.stats.connections++;
    this.sockets.add(sock);
    sock.setNoDelay?.(true);
    sock.on('close', () => this.sockets.delete(sock));
    const conn = this.attach(sock);
    this.session(conn).catch((e: unknown) => {
      this.stats.errors++;
      this.onError(`NBD connection: ${(e as Error).message}`);
      sock.destroy();
    });
  }

  private async startTls(conn: Conn): Promise<Conn> {
    const raw = conn.sock;
    raw.removeAllListeners('data');
    raw.removeAllListeners('end');
    const verify = this.opts.tls?.verifyPeer ?? true;
    const ts = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: this.secureContext!,
      requestCert: verify,
      rejectUnauthorized: verify,
    });
    await new Promise<void>((resolve, reject) => {
      ts.once('secure', resolve);
      ts.once('error', reject);
      ts.once('close', () => reject(new Error('TLS handshake failed: connection closed')));
    });
    ts.removeAllListeners('error');
    ts.removeAllListeners('close');
    ts.on('close', () => raw.destroy());
    return this.attach(ts);
  }

  private async session(conn: Conn): Promise<void> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(P.NBD_MAGIC, 0);
    hello.writeBigUInt64BE(P.NBD_IHAVEOPT, 8);
    hello.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    conn.sock.write(hello);
    const cflagsB = await conn.q.take(4);
    if (!cflagsB) return;
    const noZeroes = (cflagsB.readUInt32BE(0) & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    let tlsDone = this.secureContext === undefined;
    let structured = false;
    let metaExport: string | undefined; // export the base:allocation context was set for
    let chosen: NbdExport | undefined;
    let chosenName = '';
    while (!chosen) {
      const { sock, q } = conn;
      const head = await q.take(16);
      if (!head) return;
      if (head.readBigUInt64BE(0) !== P.NBD_IHAVEOPT) throw new Error('bad option magic');
      const opt = head.readUInt32BE(8);
      const len = head.readUInt32BE(12);
      if (len > MAX_OPTION) throw new Error(`option ${opt} too long (${len} bytes)`);
      const data = await q.take(len);
      if (!data) return;
      if (opt === P.NBD_OPT_ABORT) {
        sock.end(optionReply(opt, P.NBD_REP_ACK));
        return;
      }
      if (opt === P.NBD_OPT_STARTTLS) {
        if (tlsDone) {
          sock.write(optionReply(opt, this.secureContext ? P.NBD_REP_ERR_INVALID : P.NBD_REP_ERR_POLICY));
          continue;
        }
        if (len !== 0 || q.buffered !== 0) throw new Error('data after STARTTLS');
        sock.write(optionReply(opt, P.NBD_REP_ACK));
        conn = await this.startTls(conn);
        this.sockets.add(conn.sock);
        tlsDone = true;
        continue;
      }
      if (!tlsDone) {
        if (opt === P.NBD_OPT_EXPORT_NAME) {
          sock.destroy(); // no error reply exists for EXPORT_NAME
          return;
        }
        sock.write(optionReply(opt, P.NBD_REP_ERR_TLS_REQD, Buffer.from('TLS is required')));
        continue;
      }
      switch (opt) {
        case P.NBD_OPT_EXPORT_NAME: {
          const name = data.toString('utf8');
          const exp = this.exports.get(name);
          if (!exp) {
            sock.destroy();
            return;
          }
          const b = Buffer.alloc(noZeroes ? 10 : 134);
          P.writeU64(b, exp.size, 0);
          b.writeUInt16BE(transmissionFlags(exp), 8);
          sock.write(b);
          chosen = exp;
          chosenName = name;
          break;
        }
        case P.NBD_OPT_GO:
        case P.NBD_OPT_INFO: {
          const found = this.optInfo(sock, opt, data);
          if (found && opt === P.NBD_OPT_GO) {
            chosen = found.exp;
            chosenName = found.name;
          }
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
        case P.NBD_OPT_STRUCTURED_REPLY:
          if (len !== 0) sock.write(optionReply(opt, P.NBD_REP_ERR_INVALID));
          else {
            structured = true;
            sock.write(optionReply(opt, P.NBD_REP_ACK));
          }
          break;
        case P.NBD_OPT_LIST_META_CONTEXT:
        case P.NBD_OPT_SET_META_CONTEXT: {
          const r = this.optMetaContext(sock, opt, data, structured);
          if (r && opt === P.NBD_OPT_SET_META_CONTEXT) metaExport = r.set;
          break;
        }
        default:
          sock.write(optionReply(opt, P.NBD_REP_ERR_UNSUP));
      }
    }
    const blockStatus = metaExport !== undefined && metaExport === chosenName;
    await this.transmission(conn, chosen, structured, blockStatus);
  }

  /**
   * NBD_OPT_INFO / NBD_OPT_GO: the export's size and flags (and block sizes when asked), then ACK.
   * Returns the export, or undefined after an error reply.
   */
  private optInfo(sock: net.Socket, opt: number, data: Buffer): { exp: NbdExport; name: string } | undefined {
    if (data.length < 6) {
      sock.write(optionReply(opt, P.NBD_REP_ERR_INVALID));
      return undefined;
    }
    const nameLen = data.readUInt32BE(0);
    if (4 + nameLen + 2 > data.length) {
      sock.write(optionReply(opt, P.NBD_REP_ERR_INVALID));
      return undefined;
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
      return undefined;
    }
    const info = Buffer.alloc(12);
    info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    P.writeU64(info, exp.size, 2);
    info.writeUInt16BE(transmissionFlags(exp), 10);
    sock.write(optionReply(opt, P.NBD_REP_INFO, info));
    if (infos.includes(P.NBD_INFO_BLOCK_SIZE)) {
      const bs = Buffer.alloc(14);
      bs.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
      bs.writeUInt32BE(1, 2);
      bs.writeUInt32BE(4096, 6);
      bs.writeUInt32BE(MAX_REQUEST, 10);
      sock.write(optionReply(opt, P.NBD_REP_INFO, bs));
    }
    sock.write(optionReply(opt, P.NBD_REP_ACK));
    return { exp, name };
  }

  /**
   * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: only `base:allocation` exists. Returns
   * the export the context is set for (undefined: none asked), or null after an error reply.
   */
  private optMetaContext(
    sock: net.Socket,
    opt: number,
    data: Buffer,
    structured: boolean,
  ): { set: string | undefined } | null {
    const mq = parseMetaQuery(data);
    if (!mq || (opt === P.NBD_OPT_SET_META_CONTEXT && !structured)) {
      sock.write(optionReply(opt, P.NBD_REP_ERR_INVALID));
      return null;
    }
    if (!this.exports.has(mq.name)) {
      sock.write(optionReply(opt, P.NBD_REP_ERR_UNKNOWN, Buffer.from(`no export named "${mq.name}"`)));
      return null;
    }
    const want =
      opt === P.NBD_OPT_LIST_META_CONTEXT && mq.queries.length === 0
        ? true
        : mq.queries.some(matchesBaseAllocation);
    if (want) {
      const n = Buffer.from(P.BASE_ALLOCATION);
      const b = Buffer.alloc(4 + n.length);
      b.writeUInt32BE(META_BASE_ALLOCATION, 0);
      n.copy(b, 4);
      sock.write(optionReply(opt, P.NBD_REP_META_CONTEXT, b));
    }
    sock.write(optionReply(opt, P.NBD_REP_ACK));
    return { set: want ? mq.name : undefined };
  }

  private async transmission(
    conn: Conn,
    exp: NbdExport,
    structured: boolean,
    blockStatus: boolean,
  ): Promise<void> {
    const { sock, q } = conn;
    const inflight = new Set<Promise<void>>();
    const writable = isWritable(exp);
    // A lone request's reply leaves at once; with `gatherReplies`, those that complete while
    // others are in flight wait for the check phase and leave together (ServerOptions).
    const gather = this.opts.gatherReplies === true;
    let corked = false;
    const flush = (): void => {
      corked = false;
      if (!sock.destroyed) sock.uncork();
    };
    const send = (b: Buffer | Buffer[]) => {
      if (sock.destroyed) return;
      if (gather && !corked && inflight.size > 1) {
        corked = true;
        sock.cork();
        setImmediate(flush);
      }
      if (Array.isArray(b)) {
        sock.cork();
        for (const x of b) sock.write(x);
        sock.uncork();
      } else sock.write(b);
    };
    const fail = (handle: Buffer, errno: number, message: string) =>
      send(structured ? structuredError(handle, errno, message) : simpleReply(handle, errno));
    const track = (handle: Buffer, what: string, job: () => Promise<Buffer | Buffer[] | undefined>): void => {
      const p = job().then(
        (reply) => send(reply ?? simpleReply(handle, 0)),
        (e: unknown) => {
          this.stats.errors++;
          const msg = (e as Error).message;
          this.onError(`${what} failed: ${msg}`);
          const errno = (e as { nbdErrno?: number }).nbdErrno ?? P.NBD_EIO;
          fail(handle, errno, msg);
        },
      );
      const tracked = p.finally(() => inflight.delete(tracked));
      inflight.add(tracked);
    };
    for (;;) {
      const req = await q.take(P.NBD_REQUEST_SIZE);
      if (!req) break;
      if (req.readUInt32BE(0) !== P.NBD_REQUEST_MAGIC) throw new Error('bad request magic');
      const flags = req.readUInt16BE(4);
      const type = req.readUInt16BE(6);
      const handle = Buffer.from(req.subarray(8, 16));
      const offset = P.readU64(req, 16);
      const length = req.readUInt32BE(24);
      const fua = (flags & P.NBD_CMD_FLAG_FUA) !== 0;
      const inRange = offset >= 0 && offset + length <= exp.size;
      if (type === P.NBD_CMD_WRITE) {
        if (length > MAX_REQUEST) throw new Error(`write of ${length} bytes is too large`);
        const payload = await q.take(length);
        if (!payload) break;
        if (!writable) fail(handle, P.NBD_EPERM, 'the export is read-only');
        else if (!inRange) fail(handle, P.NBD_ENOSPC, 'write past the end of the export');
        else {
          const data = Buffer.from(payload);
          track(handle, `write of ${length} bytes at ${offset}`, async () => {
            await exp.write!(offset, data, fua);
            this.stats.writes++;
            this.stats.bytesWritten += length;
            return undefined;
          });
        }
        continue;
      }
      switch (type) {
        case P.NBD_CMD_DISC:
          await Promise.all(inflight);
          sock.end();
          return;
        case P.NBD_CMD_FLUSH:
          if (writable) {
            // Every write answered before this flush arrived is in `inflight` or done.
            const before = [...inflight];
            track(handle, 'flush', async () => {
              await Promise.all(before);
              await exp.flush!();
              return undefined;
            });
          } else send(simpleReply(handle, 0));
          break;
        case P.NBD_CMD_CACHE:
          send(simpleReply(handle, 0));
          break;
        case P.NBD_CMD_TRIM:
        case P.NBD_CMD_WRITE_ZEROES:
          if (!writable) fail(handle, P.NBD_EPERM, 'the export is read-only');
          else if (!inRange) fail(handle, P.NBD_ENOSPC, 'request past the end of the export');
          else if (type === P.NBD_CMD_TRIM)
            track(handle, `trim of ${length} bytes at ${offset}`, async () => {
              await exp.trim!(offset, length, fua);
              return undefined;
            });
          else
            track(handle, `zero of ${length} bytes at ${offset}`, async () => {
              await exp.zero!(offset, length, fua);
              return undefined;
            });
          break;
        case P.NBD_CMD_READ:
          if (!inRange || length > MAX_REQUEST) {
            fail(handle, P.NBD_EINVAL, 'read out of range');
            break;
          }
          track(handle, `read of ${length} bytes at ${offset}`, async () => {
            const reply = await readReply(exp, handle, offset, length, structured);
            this.stats.reads++;
            this.stats.bytesRead += length;
            return reply;
          });
          break;
        case P.NBD_CMD_BLOCK_STATUS:
          if (!blockStatus || !structured) {
            fail(handle, P.NBD_EINVAL, 'no metadata context was negotiated');
            break;
          }
          if (!inRange || length === 0) {
            fail(handle, P.NBD_EINVAL, 'block status out of range');
            break;
          }
          track(handle, `block status at ${offset}`, async () => {
            const reqOne = (flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
            const ext = await this.extents(exp, offset, length, reqOne ? 1 : MAX_EXTENTS);
            return blockStatusReply(handle, ext);
          });
          break;
        default:
          fail(handle, P.NBD_EINVAL, `unknown command ${type}`);
      }
    }
    await Promise.all(inflight);
    sock.end();
  }

  /** Extents from `offset`, clipped to `length`, merged when flags agree, at most `max`. */
  private async extents(exp: NbdExport, offset: number, length: number, max: number): Promise<BlockExtent[]> {
    if (!exp.blockStatus) return [{ length, flags: 0 }];
    const out: BlockExtent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length < max) {
      const got = await exp.blockStatus(pos, end - pos);
      if (got.length === 0) break;
      for (const e of got) {
        const l = Math.min(e.length, end - pos);
        if (l <= 0) break;
        const last = out[out.length - 1];
        if (last && last.flags === e.flags) last.length += l;
        else if (out.length < max) out.push({ length: l, flags: e.flags });
        else break;
        pos += l;
      }
      if (out.length >= max && max === 1) break;
    }
    if (out.length === 0) out.push({ length: Math.min(length, 4096), flags: 0 });
    return out;
  }
}
