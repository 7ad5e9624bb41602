/**
 * NBD client, written from the protocol document
 * (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md); no libnbd.
 *
 * Protocol subset
 * - Handshake: fixed newstyle with NBD_FLAG_C_FIXED_NEWSTYLE and NBD_FLAG_C_NO_ZEROES (plain
 *   newstyle and oldstyle servers are accepted too). Options: NBD_OPT_STRUCTURED_REPLY,
 *   NBD_OPT_SET_META_CONTEXT (only with structured replies), NBD_OPT_GO requesting
 *   NBD_INFO_BLOCK_SIZE, falling back to NBD_OPT_EXPORT_NAME when GO is unsupported. No extended
 *   headers.
 * - TLS (nbds:// targets, `target.tls`): NBD_OPT_STARTTLS first, then a TLS handshake over the
 *   same socket verifying the server's certificate against the CA and the host name (`tls.ts`),
 *   then the options above inside TLS. A server that does not offer TLS is refused (TLS_FAILED),
 *   never fallen back to plain; a server that requires TLS from a plain client is TLS_FAILED too.
 *   Over TLS the zero-copy receive below does not apply: decrypted data is copied once into place. A meta context the server does not grant is simply absent
 *   (`hasMetaContext()` is false); option errors become one-line `BkfsError('NBD_PROTOCOL')`.
 * - Transmission: READ, WRITE (+FUA), WRITE_ZEROES (+NO_HOLE), TRIM, FLUSH, BLOCK_STATUS, DISC.
 *   Simple replies and structured replies (OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, NONE and every
 *   error chunk type) are both handled. Size constraints from NBD_INFO_BLOCK_SIZE are obeyed:
 *   payloads are split at `maxBlockSize`, and unaligned reads / block-status queries are widened
 *   to `minBlockSize` and clipped (unaligned writes are refused rather than read-modify-written).
 *
 * Concurrency
 * - Every request gets a distinct 32-bit handle (the high half of the 64-bit cookie is 0) and is
 *   pipelined; replies are demultiplexed by handle, so the server may answer out of order and
 *   interleave structured chunks. At most `maxInFlight` (default 16) requests are on the wire;
 *   the rest wait in a FIFO inside the client. Requests queued in the same tick are sent with one
 *   corked write. A socket error, EOF or protocol violation rejects every pending and queued
 *   request with `BkfsError('NBD_PROTOCOL')` and the client is dead from then on.
 *
 * Memory and copies
 * - Replies are parsed by an incremental state machine fed from `onread` (no 'data' events, no
 *   Buffer.concat, no per-read allocation). Headers straddling reads are gathered in a 20-byte
 *   scratch buffer. Read payload is never accumulated: while the parser is inside a large data
 *   chunk (>= 64 KiB left), the next socket read is pointed at the caller's preallocated result
 *   buffer at the chunk's final position, exactly the bytes still missing, so the kernel writes
 *   the data in place and there is no userspace copy at all; smaller remainders arrive in one
 *   reusable 256 KiB buffer and are copied once into place. Holes are zero-filled in place. Only
 *   small payloads (block-status descriptors, error messages) get a buffer of their exact size.
 * - Write payloads go to the socket without copying (callers must not modify them until the
 *   promise settles). Memory is bounded by the callers' own buffers plus ~256 KiB per client.
 *
 * Core code: never prints.
 */
import * as net from 'node:net';
import { BkfsError, errorMessage, isBkfsError } from '../errors';
import * as P from './protocol';
import { isTlsAlert, loadClientTls, startClientTls, tlsFailure, type ClientTlsCreds } from './tls';
import { describeNbdTarget, parseNbdUri, type NbdTarget } from './uri';

export { parseNbdUri, formatNbdUri, describeNbdTarget, type NbdTarget } from './uri';
export {
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STATE_DIRTY,
  BASE_ALLOCATION,
  QEMU_DIRTY_BITMAP_PREFIX,
} from './protocol';

export interface NbdExtent {
  offset: number;
  length: number;
  flags: number;
}

export interface NbdConnectOptions {
  /** Meta contexts to negotiate with NBD_OPT_SET_META_CONTEXT, e.g. ['base:allocation']. */
  metaContexts?: string[];
  /** Requests on the wire at once (default 16); more wait in the client. */
  maxInFlight?: number;
  /** Limit for connecting plus the whole handshake (default 20 s). */
  connectTimeoutMs?: number;
  /**
   * While requests are in flight, fail the connection with NBD_PROTOCOL when the server sends
   * nothing for this long (default 120 s; 0 = wait forever). A stalled server cannot hang bkfs.
   */
  replyTimeoutMs?: number;
}

const DEFAULT_MAX_IN_FLIGHT = 16;
const DEFAULT_CONNECT_TIMEOUT_MS = 20_000;
const DEFAULT_REPLY_TIMEOUT_MS = 120_000;
/** Largest payload we ever put in one READ/WRITE, whatever the server advertises. */
const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Largest range in one BLOCK_STATUS request. */
const MAX_BLOCK_STATUS = 2 ** 31;
/** Largest range in one WRITE_ZEROES / TRIM request (no payload, 32-bit length field). */
const MAX_NO_PAYLOAD = 2 ** 30;
/** Size of the reusable socket read buffer. */
const READ_BUFFER_SIZE = 256 * 1024;
/** Payload remainders at least this big are received directly into the caller's buffer. */
const DIRECT_READ_MIN = 64 * 1024;
/** Limit for option replies in the handshake (names and descriptions are at most 4 KiB each). */
const MAX_SMALL_PAYLOAD = 1024 * 1024;
/**
 * Limit for one BLOCK_STATUS chunk: 4 + 8 bytes per extent. qemu-nbd sends at most 2^17 extents
 * (1 MiB) per reply; a longer one is refused instead of being buffered.
 */
const MAX_BLOCK_STATUS_PAYLOAD = 4 + 8 * 262144;
/** Limit for an error chunk: errno, message length, a message of at most 4096 bytes, an offset. */
const MAX_ERROR_PAYLOAD = 4 + 2 + 4096 + 8;
/** Data chunks a read may arrive in beyond one per 512 bytes (holes and data interleaved). */
const READ_CHUNKS_SLACK = 16;
const ZERO_BUFFER_SIZE = 4 * 1024 * 1024;

// ------------------------------------------------------------------------------------------------
// Requests

type Settle = (err: Error | null) => void;

class Req {
  handle = 0;
  /** READ: bytes delivered so far. */
  covered = 0;
  /** READ: ranges delivered so far, relative to `offset`, as sorted disjoint [start, end) pairs. */
  spans: number[] = [];
  /** READ: structured chunks received. */
  chunks = 0;
  /** BLOCK_STATUS: the context id we want, and its extents once received. */
  contextId = -1;
  extents: NbdExtent[] | null = null;
  error: BkfsError | null = null;
  next: Req | null = null;

  constructor(
    readonly cmd: number,
    readonly flags: number,
    readonly offset: number,
    readonly length: number,
    readonly data: Buffer | null,
    readonly target: Buffer | null,
    readonly targetPos: number,
    readonly settle: Settle,
  ) {}

  /**
   * Record that [s, e) (relative to the request) was delivered; false if it overlaps a range
   * delivered before (a server that sends a range twice could otherwise leave another one unset
   * while the byte count still adds up). Adjacent ranges are merged, so in-order replies keep one.
   */
  addSpan(s: number, e: number): boolean {
    const a = this.spans;
    // First pair whose end is > s.
    let lo = 0;
    let hi = a.length / 2;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (a[2 * mid + 1]! > s) hi = mid;
      else lo = mid + 1;
    }
    const i = lo;
    if (i < a.length / 2 && a[2 * i]! < e) return false; // overlaps pair i
    const joinPrev = i > 0 && a[2 * i - 1] === s;
    const joinNext = i < a.length / 2 && a[2 * i] === e;
    if (joinPrev && joinNext) {
      a[2 * i - 1] = a[2 * i + 1]!;
      a.splice(2 * i, 2);
    } else if (joinPrev) {
      a[2 * i - 1] = e;
    } else if (joinNext) {
      a[2 * i] = s;
    } else {
      a.splice(2 * i, 0, s, e);
    }
    this.covered += e - s;
    return true;
  }
}

/** FIFO of requests waiting for an in-flight slot (singly linked, O(1) both ends). */
class ReqQueue {
  private head: Req | null = null;
  private tail: Req | null = null;
  size = 0;

  push(r: Req): void {
    r.next = null;
    if (this.tail) this.tail.next = r;
    else this.head = r;
    this.tail = r;
    this.size++;
  }

  shift(): Req | null {
    const r = this.head;
    if (!r) return null;
    this.head = r.next;
    if (!this.head) this.tail = null;
    r.next = null;
    this.size--;
    return r;
  }
}

// ------------------------------------------------------------------------------------------------
// Connection plumbing shared by the handshake and the client

/** The socket plus a replaceable consumer of incoming bytes (the `onread` buffer is reused). */
interface Wire {
  socket: net.Socket;
  /** The reusable read buffer. */
  readBuf: Buffer;
  /** Chooses the buffer the next socket read lands in (normally `readBuf`). */
  nextBuffer: () => Buffer;
  /** Receives `buf[0, end)` (buf is what `nextBuffer` returned); must not keep `readBuf` references. */
  sink: (buf: Buffer, end: number) => void;
  /** Called once when the socket is gone (error first, if any). */
  onGone: (err: Error | null) => void;
  lastError: Error | null;
}

function protoError(msg: string, data?: Record<string, unknown>): BkfsError {
  return new BkfsError('NBD_PROTOCOL', msg, data);
}

/** Collects handshake bytes (copied out of the shared read buffer) and hands out exact reads. */
class HandshakeReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  /** What we were waiting for, for the message if the server hangs up. */
  context = 'the greeting';

  push(buf: Buffer, end: number): void {
    this.chunks.push(Buffer.from(buf.subarray(0, end)));
    this.have += end;
    this.wake();
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
  }

  read(n: number): Promise<Buffer> {
    if (this.have >= n) return Promise.resolve(this.take(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  /** Bytes received beyond what the handshake consumed (normally none). */
  leftover(): Buffer[] {
    const l = this.chunks;
    this.chunks = [];
    this.have = 0;
    return l;
  }

  private wake(): void {
    const w = this.waiter;
    if (w && this.have >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
    }
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks, this.have);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.have = rest.length;
    return out;
  }
}

interface Negotiated {
  size: number;
  flags: number;
  structured: boolean;
  contexts: Map<string, number>;
  minBlock: number;
  prefBlock: number;
  maxBlock: number;
  mode: 'go' | 'export-name' | 'oldstyle';
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

async function readOptReply(
  rd: HandshakeReader,
  opt: number,
): Promise<{ type: number; data: Buffer; message: string }> {
  rd.context = `the reply to ${P.optionName(opt)}`;
  const h = await rd.read(20);
  if (h.readBigUInt64BE(0) !== P.NBD_REP_MAGIC) {
    throw protoError(`bad option reply magic from the NBD server (after ${P.optionName(opt)})`);
  }
  const rOpt = h.readUInt32BE(8);
  const type = h.readUInt32BE(12);
  const len = h.readUInt32BE(16);
  if (rOpt !== opt) {
    throw protoError(`NBD server answered ${P.optionName(rOpt)} to ${P.optionName(opt)}`);
  }
  if (len > MAX_SMALL_PAYLOAD) throw protoError(`NBD option reply too large (${len} bytes)`);
  const data = len > 0 ? await rd.read(len) : Buffer.alloc(0);
  const message = type & P.NBD_REP_FLAG_ERROR ? data.toString('utf8').replace(/\s+/g, ' ').trim() : '';
  return { type, data, message };
}

/** A server that insists on TLS while bkfs connected without it. */
function tlsRequired(r: { message: string }): BkfsError {
  return new BkfsError(
    'TLS_FAILED',
    `the NBD server requires TLS${r.message ? ` (${r.message})` : ''}: connect with nbds://HOST/EXPORT?tls-certificates=DIR`,
  );
}

function optError(
  what: string,
  r: { type: number; message: string },
  data?: Record<string, unknown>,
): BkfsError {
  const msg = r.message ? `: ${r.message}` : '';
  return protoError(`${what}: ${P.repErrorName(r.type)}${msg}`, { repType: r.type, ...data });
}

async function negotiate(
  wire: Wire,
  rd: HandshakeReader,
  exportName: string,
  metaContexts: readonly string[],
  starttls: (() => Promise<void>) | null,
): Promise<Negotiated> {
  const send = (b: Buffer): void => {
    wire.socket.write(b);
  };
  const noTls = (why: string): BkfsError =>
    new BkfsError(
      'TLS_FAILED',
      `the NBD server does not offer TLS (${why}): bkfs does not send the disk contents unencrypted over an nbds:// connection`,
    );
  const hello = await rd.read(16);
  if (hello.readBigUInt64BE(0) !== P.NBD_MAGIC) {
    throw protoError('the peer is not an NBD server (bad greeting magic)');
  }
  const magic2 = hello.readBigUInt64BE(8);
  const defaults = { minBlock: 1, prefBlock: 4096, maxBlock: MAX_PAYLOAD };

  if (magic2 === P.NBD_OLDSTYLE_MAGIC) {
    if (starttls) throw noTls('oldstyle negotiation');
    rd.context = 'the oldstyle greeting';
    const b = await rd.read(8 + 4 + 124);
    if (exportName !== '') {
      throw protoError(`NBD server uses oldstyle negotiation, which cannot select export "${exportName}"`);
    }
    const size = P.readU64(b, 0);
    if (size < 0) throw protoError('NBD export size is too large');
    const flags = b.readUInt32BE(8) & 0xffff;
    return { size, flags, structured: false, contexts: new Map(), ...defaults, mode: 'oldstyle' };
  }
  if (magic2 !== P.NBD_IHAVEOPT) throw protoError('unknown NBD handshake (bad second magic)');

  rd.context = 'the handshake flags';
  const hsFlags = (await rd.read(2)).readUInt16BE(0);
  const fixed = (hsFlags & P.NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (hsFlags & P.NBD_FLAG_NO_ZEROES) !== 0;
  const cflags = Buffer.allocUnsafe(4);
  cflags.writeUInt32BE(
    (fixed ? P.NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0),
    0,
  );
  send(cflags);

  if (starttls) {
    if (!fixed) throw noTls('no fixed newstyle negotiation');
    send(P.encodeOption(P.NBD_OPT_STARTTLS));
    const r = await readOptReply(rd, P.NBD_OPT_STARTTLS);
    if (r.type !== P.NBD_REP_ACK) {
      throw noTls(`${P.repErrorName(r.type)}${r.message ? `: ${r.message}` : ''}`);
    }
    if (rd.leftover().length > 0) throw protoError('NBD server sent data after acknowledging STARTTLS');
    rd.context = 'the TLS handshake';
    await starttls();
  }

  const exportNameOption = async (
    structured: boolean,
    contexts: Map<string, number>,
  ): Promise<Negotiated> => {
    send(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
    rd.context = `the reply to NBD_OPT_EXPORT_NAME (does export "${exportName}" exist?)`;
    const b = await rd.read(10 + (noZeroes ? 0 : 124));
    const size = P.readU64(b, 0);
    if (size < 0) throw protoError('NBD export size is too large');
    return { size, flags: b.readUInt16BE(8), structured, contexts, ...defaults, mode: 'export-name' };
  };

  if (!fixed) return exportNameOption(false, new Map());

  // Structured replies: required for block status and sparse reads; optional otherwise.
  send(P.encodeOption(P.NBD_OPT_STRUCTURED_REPLY));
  const sr = await readOptReply(rd, P.NBD_OPT_STRUCTURED_REPLY);
  let structured = false;
  if (sr.type === P.NBD_REP_ACK) structured = true;
  else if (sr.type === P.NBD_REP_ERR_TLS_REQD) throw tlsRequired(sr);
  else if (sr.type === P.NBD_REP_ERR_SHUTDOWN) {
    throw optError('NBD server refused the connection', sr);
  } else if (!(sr.type & P.NBD_REP_FLAG_ERROR)) {
    throw protoError(`unexpected reply ${sr.type} to NBD_OPT_STRUCTURED_REPLY`);
  }

  const contexts =
    structured && metaContexts.length > 0
      ? await setMetaContexts(send, rd, exportName, metaContexts)
      : new Map<string, number>();
  const go = await optGo(send, rd, exportName, defaults);
  if (go === 'unsupported') return exportNameOption(structured, contexts);
  return { ...go, structured, contexts, mode: 'go' };
}

/** NBD_OPT_SET_META_CONTEXT: the granted contexts. Ungranted ones are just missing; an error reply selects none. */
async function setMetaContexts(
  send: (b: Buffer) => void,
  rd: HandshakeReader,
  exportName: string,
  metaContexts: readonly string[],
): Promise<Map<string, number>> {
  const contexts = new Map<string, number>();
  send(P.encodeOption(P.NBD_OPT_SET_META_CONTEXT, P.encodeMetaContextData(exportName, metaContexts)));
  for (;;) {
    const r = await readOptReply(rd, P.NBD_OPT_SET_META_CONTEXT);
    if (r.type === P.NBD_REP_META_CONTEXT) {
      if (r.data.length < 4) throw protoError('short NBD_REP_META_CONTEXT reply');
      contexts.set(r.data.toString('utf8', 4), r.data.readUInt32BE(0));
    } else if (r.type === P.NBD_REP_ACK) {
      return contexts;
    } else if (r.type === P.NBD_REP_ERR_TLS_REQD) {
      throw tlsRequired(r);
    } else if (r.type === P.NBD_REP_ERR_SHUTDOWN) {
      throw optError('NBD server refused the connection', r);
    } else if (r.type & P.NBD_REP_FLAG_ERROR) {
      return new Map();
    } else {
      throw protoError(`unexpected reply ${r.type} to NBD_OPT_SET_META_CONTEXT`);
    }
  }
}

type GoResult = Pick<Negotiated, 'size' | 'flags' | 'minBlock' | 'prefBlock' | 'maxBlock'>;

/**
 * NBD_OPT_GO with NBD_INFO_BLOCK_SIZE (we honour size constraints): the export's size, flags and
 * block sizes, or 'unsupported' when the server wants the old NBD_OPT_EXPORT_NAME.
 */
async function optGo(
  send: (b: Buffer) => void,
  rd: HandshakeReader,
  exportName: string,
  defaults: { minBlock: number; prefBlock: number; maxBlock: number },
): Promise<GoResult | 'unsupported'> {
  send(P.encodeOption(P.NBD_OPT_GO, P.encodeGoData(exportName, [P.NBD_INFO_BLOCK_SIZE])));
  let size = -1;
  let flags = 0;
  let { minBlock, prefBlock, maxBlock } = defaults;
  for (;;) {
    const r = await readOptReply(rd, P.NBD_OPT_GO);
    if (r.type === P.NBD_REP_INFO) {
      if (r.data.length < 2) throw protoError('short NBD_REP_INFO reply');
      const info = r.data.readUInt16BE(0);
      if (info === P.NBD_INFO_EXPORT) {
        if (r.data.length !== 12) throw protoError('bad NBD_INFO_EXPORT length');
        size = P.readU64(r.data, 2);
        if (size < 0) throw protoError('NBD export size is too large');
        flags = r.data.readUInt16BE(10);
      } else if (info === P.NBD_INFO_BLOCK_SIZE) {
        if (r.data.length !== 14) throw protoError('bad NBD_INFO_BLOCK_SIZE length');
        const min = r.data.readUInt32BE(2);
        const pref = r.data.readUInt32BE(6);
        const max = r.data.readUInt32BE(10);
        if (isPow2(min) && min <= 65536) minBlock = min;
        if (isPow2(pref) && pref >= minBlock) prefBlock = pref;
        if (max >= minBlock) maxBlock = Math.min(max, MAX_PAYLOAD);
      }
      // Other NBD_INFO types (name, description) are ignored, as the spec requires.
    } else if (r.type === P.NBD_REP_ACK) {
      if (size < 0) throw protoError('NBD server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT');
      // maxBlock must be a multiple of minBlock so that split requests stay aligned.
      maxBlock = Math.max(minBlock, maxBlock - (maxBlock % minBlock));
      return { size, flags, minBlock, prefBlock, maxBlock };
    } else if (r.type === P.NBD_REP_ERR_UNSUP) {
      return 'unsupported';
    } else if (r.type === P.NBD_REP_ERR_TLS_REQD) {
      throw tlsRequired(r);
    } else if (r.type === P.NBD_REP_ERR_UNKNOWN) {
      throw protoError(
        exportName === ''
          ? 'the NBD server has no default export (give an export name)'
          : `the NBD server has no export named "${exportName}"${r.message ? ` (${r.message})` : ''}`,
        { reason: 'unknown-export', exportName },
      );
    } else if (r.type & P.NBD_REP_FLAG_ERROR) {
      throw optError(`NBD server refused export "${exportName}"`, r, { exportName });
    } else {
      throw protoError(`unexpected reply ${r.type} to NBD_OPT_GO`);
    }
  }
}

const CONNECT_ERRORS: Record<string, string> = {
  ENOENT: 'no such socket',
  ECONNREFUSED: 'connection refused',
  EACCES: 'permission denied',
  ENOTFOUND: 'host not found',
  EAI_AGAIN: 'host name lookup failed',
  ETIMEDOUT: 'connection timed out',
  EHOSTUNREACH: 'host unreachable',
  ENETUNREACH: 'network unreachable',
  ENOTSOCK: 'not a socket',
};

function connectErrorText(e: NodeJS.ErrnoException): string {
  const known = e.code !== undefined ? CONNECT_ERRORS[e.code] : undefined;
  return known !== undefined ? `${known} (${e.code})` : errorMessage(e);
}

function connectSocket(target: NbdTarget, wire: Wire): net.Socket {
  if (target.tls) {
    // TLS takes the socket over after STARTTLS: plain 'data' events until then (see connect()).
    const s =
      'socket' in target
        ? net.connect({ path: target.socket })
        : net.connect({ host: target.host, port: target.port });
    s.on('data', (d: Buffer) => wire.sink(d, d.length));
    return s;
  }
  // `buffer` as a function is called after every read to pick the next read's buffer; that is how
  // payload data is received straight into the caller's result buffer (see nextReadBuffer()).
  const onread = {
    buffer: (): Buffer => wire.nextBuffer(),
    callback: (n: number, buf: Uint8Array): boolean => {
      wire.sink(buf as Buffer, n);
      return true;
    },
  };
  return 'socket' in target
    ? net.connect({ path: target.socket, onread })
    : net.connect({ host: target.host, port: target.port, onread });
}

// ------------------------------------------------------------------------------------------------
// The client

const ST_HEADER = 0;
const ST_SMALL = 1;
const ST_DATA = 2;
/** Pseudo reply type for the data of a simple READ reply. */
const TYPE_SIMPLE_READ = -1;

export class NbdClient {
  /** Export size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  readonly canTrim: boolean;
  readonly canWriteZeroes: boolean;
  readonly canFlush: boolean;
  readonly canFua: boolean;
  readonly canMultiConn: boolean;
  /** Size constraints (NBD_INFO_BLOCK_SIZE or defaults 1 / 4096 / 32 MiB; max capped at 32 MiB). */
  readonly minBlockSize: number;
  readonly preferredBlockSize: number;
  readonly maxBlockSize: number;
  /** Whether structured replies were negotiated (needed for block status). */
  readonly structuredReplies: boolean;
  readonly exportName: string;
  readonly target: NbdTarget;
  /** Raw transmission flags from the server. */
  readonly transmissionFlags: number;
  /** How transmission was entered: NBD_OPT_GO, NBD_OPT_EXPORT_NAME fallback, or oldstyle. */
  readonly handshakeMode: 'go' | 'export-name' | 'oldstyle';

  private readonly socket: net.Socket;
  private readonly readBuf: Buffer;
  /** The view of a caller's buffer handed to the socket for the next read, if any. */
  private direct: Buffer | null = null;
  private readonly contexts: Map<string, number>;
  private readonly maxInFlight: number;
  private readonly replyTimeoutMs: number;

  private readonly pending = new Map<number, Req>();
  private readonly queue = new ReqQueue();
  private inflight = 0;
  private nextHandle = 0;
  private pumpScheduled = false;
  private failure: BkfsError | null = null;
  private closing = false;
  private closePromise: Promise<void> | null = null;
  private idleWaiters: (() => void)[] = [];
  private zeroBuf: Buffer | null = null;

  // Reply parser state.
  private st = ST_HEADER;
  private readonly hdr = Buffer.alloc(P.NBD_STRUCTURED_REPLY_SIZE);
  private hdrHave = 0;
  private cur: Req | null = null;
  private curFlags = 0;
  private curType = 0;
  private curLen = 0;
  private readonly small = Buffer.alloc(16);
  private payBuf: Buffer = this.small;
  private payHave = 0;
  private payNeed = 0;
  private dataDest: Buffer = this.small;
  private dataPos = 0;
  private dataLeft = 0;

  private constructor(wire: Wire, target: NbdTarget, n: Negotiated, opts: NbdConnectOptions) {
    this.socket = wire.socket;
    this.target = target;
    this.exportName = target.exportName ?? '';
    this.size = n.size;
    this.transmissionFlags = n.flags;
    this.readOnly = (n.flags & P.NBD_FLAG_READ_ONLY) !== 0;
    this.canFlush = (n.flags & P.NBD_FLAG_SEND_FLUSH) !== 0;
    this.canFua = (n.flags & P.NBD_FLAG_SEND_FUA) !== 0;
    this.canTrim = (n.flags & P.NBD_FLAG_SEND_TRIM) !== 0;
    this.canWriteZeroes = (n.flags & P.NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    this.canMultiConn = (n.flags & P.NBD_FLAG_CAN_MULTI_CONN) !== 0;
    this.minBlockSize = n.minBlock;
    this.preferredBlockSize = n.prefBlock;
    this.maxBlockSize = n.maxBlock;
    this.structuredReplies = n.structured;
    this.contexts = n.contexts;
    this.handshakeMode = n.mode;
    this.maxInFlight = opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    this.replyTimeoutMs = opts.replyTimeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS;
    this.socket.on('timeout', () => {
      if (this.inflight > 0 && !this.failure) {
        this.fail(
          protoError(
            `NBD server ${describeNbdTarget(this.target)} sent nothing for ${this.replyTimeoutMs} ms while ${this.inflight} request(s) waited for a reply`,
          ),
        );
      }
    });

    this.readBuf = wire.readBuf;
    wire.nextBuffer = () => this.nextReadBuffer();
    wire.sink = (buf, end) => this.onRead(buf, end);
    wire.onGone = (err) => this.onGone(err);
  }

  /** Connect to an NBD server (a target or an nbd:// / nbd+unix:// URI) and negotiate an export. */
  static async connect(target: NbdTarget | string, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const t = typeof target === 'string' ? parseNbdUri(target) : target;
    const maxInFlight = opts.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1) {
      throw new BkfsError('USAGE', `maxInFlight must be a positive integer (got ${maxInFlight})`);
    }
    const exportName = t.exportName ?? '';
    const where = describeNbdTarget(t);
    // Credentials are read before connecting: a bad directory is a usage error, not a network one.
    const creds: ClientTlsCreds | null = t.tls
      ? t.tls.certDir !== undefined
        ? loadClientTls(t.tls.certDir)
        : {}
      : null;
    const rd = new HandshakeReader();
    const readBuf = Buffer.allocUnsafe(READ_BUFFER_SIZE);
    const wire: Wire = {
      socket: undefined as unknown as net.Socket,
      readBuf,
      nextBuffer: () => readBuf,
      sink: (buf, end) => rd.push(buf, end),
      onGone: () => undefined,
      lastError: null,
    };
    let connected = false;
    let settledConnect: ((err: Error | null) => void) | null = null;
    const connectedP = new Promise<void>((resolve, reject) => {
      settledConnect = (err) => (err ? reject(err) : resolve());
    });
    const socket = connectSocket(t, wire);
    wire.socket = socket;
    socket.on('connect', () => {
      connected = true;
      if ('host' in t) socket.setNoDelay(true);
      settledConnect?.(null);
    });
    socket.on('error', (e: NodeJS.ErrnoException) => {
      wire.lastError = e;
      if (!connected) {
        settledConnect?.(
          new BkfsError('SOURCE_NOT_FOUND', `cannot connect to ${where}: ${connectErrorText(e)}`, {
            code: e.code,
          }),
        );
      }
    });
    socket.on('close', () => {
      const err = wire.lastError;
      wire.onGone(err);
      rd.fail(
        protoError(
          `${where} closed the connection while bkfs waited for ${rd.context}${err ? ` (${errorMessage(err)})` : ''}`,
        ),
      );
      if (!connected) {
        settledConnect?.(new BkfsError('SOURCE_NOT_FOUND', `cannot connect to ${where}: connection closed`));
      }
    });

    const timeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const err = connected
          ? protoError(`NBD handshake with ${where} timed out after ${timeoutMs} ms`)
          : new BkfsError('SOURCE_NOT_FOUND', `cannot connect to ${where}: timed out after ${timeoutMs} ms`);
        reject(err);
      }, timeoutMs);
    });
    // TLS is up but the server has sent nothing inside it yet.
    let tlsSilent = false;
    try {
      const starttls = creds
        ? async (): Promise<void> => {
            const hostname = t.tls?.hostname ?? ('host' in t ? t.host : 'localhost');
            socket.removeAllListeners('data');
            const ts = await startClientTls(socket, creds, hostname, where);
            tlsSilent = true;
            ts.on('data', (d: Buffer) => {
              tlsSilent = false;
              wire.sink(d, d.length);
            });
            ts.on('error', (e: Error) => {
              wire.lastError = e;
            });
            wire.socket = ts;
          }
        : null;
      const n = await Promise.race([
        connectedP.then(() => negotiate(wire, rd, exportName, opts.metaContexts ?? [], starttls)),
        timeout,
      ]);
      const client = new NbdClient(wire, { ...t, exportName }, n, opts);
      if (wire.socket.destroyed) client.onGone(wire.lastError);
      for (const b of rd.leftover()) client.onBytes(b, 0, b.length);
      return client;
    } catch (e) {
      wire.socket.destroy();
      socket.destroy();
      // TLS 1.3: a server that rejects the client certificate says so after the client's side of
      // the handshake completed, as an alert on the next read.
      if (creds && wire.lastError && isTlsAlert(wire.lastError) && !isBkfsError(e, 'TLS_FAILED')) {
        throw tlsFailure(wire.lastError, t.tls?.hostname ?? ('host' in t ? t.host : 'localhost'), where);
      }
      if (tlsSilent && isBkfsError(e, 'NBD_PROTOCOL') && wire.socket.destroyed) {
        // GnuTLS servers (qemu-nbd) drop a client whose certificate they reject without an alert.
        throw new BkfsError(
          'TLS_FAILED',
          `TLS handshake with ${where} failed: the server closed the connection right after the handshake (it verifies clients: give a client certificate it trusts, client-cert.pem and client-key.pem)`,
        );
      }
      if (e instanceof BkfsError) throw e;
      throw protoError(`NBD handshake with ${where} failed: ${errorMessage(e)}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Whether `name` was granted by the server in NBD_OPT_SET_META_CONTEXT. */
  hasMetaContext(name: string): boolean {
    return this.contexts.has(name);
  }

  /** Names of the negotiated meta contexts. */
  get metaContexts(): string[] {
    return [...this.contexts.keys()];
  }

  /** Requests currently on the wire plus those waiting in the client. */
  get pendingRequests(): number {
    return this.inflight + this.queue.size;
  }

  // ---- Reads ----------------------------------------------------------------------------------

  /** Read `length` bytes at `offset` (split into concurrent requests of at most maxBlockSize). */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange('read', offset, length);
    const buf = Buffer.allocUnsafe(length);
    if (length > 0) await this.readIntoUnchecked(offset, buf);
    return buf;
  }

  /** Read `target.length` bytes at `offset` into `target` (no allocation for aligned reads). */
  async readInto(offset: number, target: Buffer): Promise<void> {
    this.checkRange('read', offset, target.length);
    if (target.length > 0) await this.readIntoUnchecked(offset, target);
  }

  private async readIntoUnchecked(offset: number, target: Buffer): Promise<void> {
    const length = target.length;
    const a = this.align(offset, length);
    if (a.offset !== offset || a.length !== length) {
      // The server's minimum block size forces an aligned read; read around and copy out.
      const tmp = Buffer.allocUnsafe(a.length);
      await this.readIntoUnchecked(a.offset, tmp);
      tmp.copy(target, 0, offset - a.offset, offset - a.offset + length);
      return;
    }
    const step = this.maxBlockSize;
    if (length <= step) {
      await this.submit(P.NBD_CMD_READ, 0, offset, length, null, target, 0);
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let p = 0; p < length; p += step) {
      parts.push(this.submit(P.NBD_CMD_READ, 0, offset + p, Math.min(step, length - p), null, target, p));
    }
    await Promise.all(parts);
  }

  // ---- Block status ---------------------------------------------------------------------------

  /**
   * One NBD_CMD_BLOCK_STATUS for `context`: the extents from `offset`, contiguous, clipped to the
   * request (they may cover less than `length`, never more; at least one unless length is 0).
   */
  async blockStatus(context: string, offset: number, length: number): Promise<NbdExtent[]> {
    const id = this.contextId(context);
    this.checkRange('block status', offset, length);
    const end = offset + length;
    const out: NbdExtent[] = [];
    if (length === 0) return out;
    let a = this.align(offset, length);
    if (a.length > MAX_BLOCK_STATUS) a = { offset: a.offset, length: MAX_BLOCK_STATUS };
    const aEnd = Math.min(end, a.offset + a.length);
    const req = await this.submit(P.NBD_CMD_BLOCK_STATUS, 0, a.offset, a.length, null, null, 0, id);
    let p = a.offset;
    for (const e of req.extents ?? []) {
      const s = Math.max(p, offset);
      const t = Math.min(p + e.length, aEnd);
      if (t > s) out.push({ offset: s, length: t - s, flags: e.flags });
      p += e.length;
      if (p >= aEnd) break;
    }
    if (out.length === 0) {
      // Only possible if a server ignores its own minimum block size in its extents.
      throw protoError(`NBD server returned no usable block status extents at offset ${offset}`);
    }
    return out;
  }

  /**
   * All extents of [offset, offset+length) for `context`, in order, adjacent extents with equal
   * flags merged, clipped to the range. Issues the next BLOCK_STATUS while the caller consumes.
   */
  async *mapExtents(context: string, offset: number, length: number): AsyncGenerator<NbdExtent> {
    this.contextId(context);
    this.checkRange('block status', offset, length);
    const end = offset + length;
    let acc: NbdExtent | null = null;
    let next: Promise<NbdExtent[]> | null = length > 0 ? this.blockStatus(context, offset, length) : null;
    while (next) {
      const exts: NbdExtent[] = await next;
      next = null;
      const last = exts[exts.length - 1];
      const reached = last ? last.offset + last.length : end;
      if (reached < end) {
        next = this.blockStatus(context, reached, end - reached);
        next.catch(() => undefined); // observed when awaited; avoid an unhandled rejection if abandoned
      }
      for (const e of exts) {
        if (acc && acc.flags === e.flags && acc.offset + acc.length === e.offset) {
          acc.length += e.length;
        } else {
          if (acc) yield acc;
          acc = { offset: e.offset, length: e.length, flags: e.flags };
        }
      }
    }
    if (acc) yield acc;
  }

  // ---- Writes ---------------------------------------------------------------------------------

  /** Write `data` at `offset` (split at maxBlockSize). Do not modify `data` until this settles. */
  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkWritable('write');
    this.checkRange('write', offset, data.length);
    this.checkAligned('write', offset, data.length);
    const flags = opts.fua && this.canFua ? P.NBD_CMD_FLAG_FUA : 0;
    const step = this.maxBlockSize;
    const parts: Promise<unknown>[] = [];
    for (let p = 0; p < data.length; p += step) {
      const n = Math.min(step, data.length - p);
      parts.push(this.submit(P.NBD_CMD_WRITE, flags, offset + p, n, data.subarray(p, p + n), null, 0));
    }
    await Promise.all(parts);
  }

  /**
   * Make [offset, offset+length) read as zeroes with NBD_CMD_WRITE_ZEROES, or by writing zero
   * buffers if the server lacks it. `mayTrim` (default true) lets the server punch holes;
   * `mayTrim: false` sends NBD_CMD_FLAG_NO_HOLE so the range stays allocated.
   */
  async writeZeroes(
    offset: number,
    length: number,
    opts: { mayTrim?: boolean; fua?: boolean } = {},
  ): Promise<void> {
    this.checkWritable('write zeroes');
    this.checkRange('write zeroes', offset, length);
    this.checkAligned('write zeroes', offset, length);
    const fua = opts.fua && this.canFua ? P.NBD_CMD_FLAG_FUA : 0;
    const parts: Promise<unknown>[] = [];
    if (this.canWriteZeroes) {
      const flags = fua | (opts.mayTrim === false ? P.NBD_CMD_FLAG_NO_HOLE : 0);
      for (let p = 0; p < length; p += MAX_NO_PAYLOAD) {
        const n = Math.min(MAX_NO_PAYLOAD, length - p);
        parts.push(this.submit(P.NBD_CMD_WRITE_ZEROES, flags, offset + p, n, null, null, 0));
      }
    } else {
      const step = Math.min(this.maxBlockSize, ZERO_BUFFER_SIZE);
      if (!this.zeroBuf || this.zeroBuf.length < Math.min(step, length)) {
        this.zeroBuf = Buffer.alloc(step);
      }
      for (let p = 0; p < length; p += step) {
        const n = Math.min(step, length - p);
        parts.push(this.submit(P.NBD_CMD_WRITE, fua, offset + p, n, this.zeroBuf.subarray(0, n), null, 0));
      }
    }
    await Promise.all(parts);
  }

  /** Tell the server the range is unused (NBD_CMD_TRIM). A no-op if the server cannot trim. */
  async trim(offset: number, length: number): Promise<void> {
    this.checkWritable('trim');
    this.checkRange('trim', offset, length);
    if (!this.canTrim || length === 0) return;
    this.checkAligned('trim', offset, length);
    const parts: Promise<unknown>[] = [];
    for (let p = 0; p < length; p += MAX_NO_PAYLOAD) {
      parts.push(
        this.submit(P.NBD_CMD_TRIM, 0, offset + p, Math.min(MAX_NO_PAYLOAD, length - p), null, null, 0),
      );
    }
    await Promise.all(parts);
  }

  /** Persist completed writes (NBD_CMD_FLUSH). A no-op if the server does not advertise flush. */
  async flush(): Promise<void> {
    if (!this.canFlush) {
      if (this.failure) throw this.failure;
      return;
    }
    await this.submit(P.NBD_CMD_FLUSH, 0, 0, 0, null, null, 0);
  }

  // ---- Closing --------------------------------------------------------------------------------

  /**
   * Wait for outstanding requests, send NBD_CMD_DISC and close the socket. Idempotent; new
   * requests are refused from the first call on.
   */
  close(): Promise<void> {
    this.closePromise ??= this.doClose();
    return this.closePromise;
  }

  /** Hard disconnect now: every pending request is rejected. */
  destroy(): void {
    this.closing = true;
    this.fail(protoError('NBD connection was closed by bkfs'));
  }

  private async doClose(): Promise<void> {
    this.closing = true;
    if (!this.failure && this.inflight + this.queue.size > 0) {
      await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    }
    const sock = this.socket;
    if (sock.destroyed) return;
    const gone = new Promise<void>((resolve) => sock.once('close', () => resolve()));
    if (!this.failure) {
      const hdr = Buffer.allocUnsafe(P.NBD_REQUEST_SIZE);
      P.encodeRequest(hdr, 0, 0, P.NBD_CMD_DISC, this.allocHandle(), 0, 0);
      this.failure = protoError('NBD connection is closed');
      sock.end(hdr);
    } else {
      sock.destroy();
    }
    const t = setTimeout(() => sock.destroy(), 5000);
    await gone;
    clearTimeout(t);
  }

  // ---- Request plumbing -----------------------------------------------------------------------

  private submit(
    cmd: number,
    flags: number,
    offset: number,
    length: number,
    data: Buffer | null,
    target: Buffer | null,
    targetPos: number,
    contextId = -1,
  ): Promise<Req> {
    return new Promise<Req>((resolve, reject) => {
      if (this.failure || this.closing) {
        reject(this.failure ?? protoError('NBD connection is closing'));
        return;
      }
      const req: Req = new Req(cmd, flags, offset, length, data, target, targetPos, (err) =>
        err ? reject(err) : resolve(req),
      );
      req.contextId = contextId;
      this.queue.push(req);
      if (!this.pumpScheduled) {
        this.pumpScheduled = true;
        queueMicrotask(() => this.pump());
      }
    });
  }

  private allocHandle(): number {
    let h: number;
    do {
      h = this.nextHandle = (this.nextHandle + 1) >>> 0;
    } while (this.pending.has(h));
    return h;
  }

  /** Send queued requests while there is room in flight, in one corked write. */
  private pump(): void {
    this.pumpScheduled = false;
    if (this.failure || this.queue.size === 0 || this.inflight >= this.maxInFlight) return;
    const sock = this.socket;
    sock.cork();
    while (this.inflight < this.maxInFlight) {
      const req = this.queue.shift();
      if (!req) break;
      req.handle = this.allocHandle();
      this.pending.set(req.handle, req);
      this.inflight++;
      const hdr = Buffer.allocUnsafe(P.NBD_REQUEST_SIZE);
      P.encodeRequest(hdr, 0, req.flags, req.cmd, req.handle, req.offset, req.length);
      sock.write(hdr);
      if (req.data) sock.write(req.data);
    }
    sock.uncork();
    if (this.inflight > 0 && this.replyTimeoutMs > 0) sock.setTimeout(this.replyTimeoutMs);
  }

  private finish(req: Req): void {
    this.pending.delete(req.handle);
    this.inflight--;
    let err: Error | null = req.error;
    if (!err && req.cmd === P.NBD_CMD_READ && req.covered !== req.length) {
      err = protoError(
        `NBD server reported success for a read of ${req.length} bytes at offset ${req.offset} but sent only ${req.covered}`,
      );
    }
    if (!err && req.cmd === P.NBD_CMD_BLOCK_STATUS && !req.extents) {
      err = protoError(`NBD server sent no block status for the requested context at offset ${req.offset}`);
    }
    req.settle(err);
    if (this.queue.size > 0 && !this.pumpScheduled) {
      this.pumpScheduled = true;
      queueMicrotask(() => this.pump());
    }
    if (this.inflight === 0) this.socket.setTimeout(0);
    if (this.inflight === 0 && this.queue.size === 0) this.wakeIdle();
  }

  private wakeIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  /** Fail the connection: reject everything pending and queued, drop the socket. */
  private fail(err: BkfsError): void {
    this.failure ??= err;
    const reqs = [...this.pending.values()];
    this.pending.clear();
    this.inflight = 0;
    for (let r = this.queue.shift(); r; r = this.queue.shift()) reqs.push(r);
    this.socket.destroy();
    for (const r of reqs) r.settle(err);
    this.wakeIdle();
  }

  private onGone(err: Error | null): void {
    const where = describeNbdTarget(this.target);
    this.fail(
      protoError(
        err ? `NBD connection to ${where} failed: ${errorMessage(err)}` : `${where} closed the connection`,
      ),
    );
  }

  private protocolError(msg: string): void {
    this.fail(protoError(`NBD protocol error from ${describeNbdTarget(this.target)}: ${msg}`));
  }

  private requestError(req: Req, errno: number, message: string, errorOffset?: number): BkfsError {
    const what = `NBD ${P.commandName(req.cmd)} of ${req.length} bytes at offset ${req.offset}`;
    return protoError(`${what} failed: ${P.nbdErrorName(errno)}${message ? `: ${message}` : ''}`, {
      errno,
      command: P.commandName(req.cmd),
      offset: req.offset,
      length: req.length,
      ...(errorOffset !== undefined ? { errorOffset } : {}),
    });
  }

  // ---- Reply parser ---------------------------------------------------------------------------

  /**
   * Where the next socket read should land. In the middle of a large read payload, that is the
   * caller's result buffer itself, exactly the bytes still missing (so the read cannot overrun into
   * the next reply): the kernel copies into place and we copy nothing. Otherwise the shared buffer.
   */
  private nextReadBuffer(): Buffer {
    if (this.st === ST_DATA && this.dataLeft >= DIRECT_READ_MIN && !this.failure) {
      this.direct = this.dataDest.subarray(this.dataPos, this.dataPos + this.dataLeft);
      return this.direct;
    }
    this.direct = null;
    return this.readBuf;
  }

  private onRead(buf: Buffer, n: number): void {
    if (buf === this.direct) {
      this.direct = null;
      this.dataPos += n;
      this.dataLeft -= n;
      if (this.dataLeft === 0) this.onDataDone();
      return;
    }
    this.onBytes(buf, 0, n);
  }

  /** Consume `buf[pos, end)`. Nothing in `buf` is retained after return. */
  private onBytes(buf: Buffer, pos: number, end: number): void {
    while (pos < end && !this.failure) {
      switch (this.st) {
        case ST_DATA: {
          const n = Math.min(this.dataLeft, end - pos);
          buf.copy(this.dataDest, this.dataPos, pos, pos + n);
          pos += n;
          this.dataPos += n;
          this.dataLeft -= n;
          if (this.dataLeft === 0) this.onDataDone();
          break;
        }
        case ST_SMALL: {
          const n = Math.min(this.payNeed - this.payHave, end - pos);
          buf.copy(this.payBuf, this.payHave, pos, pos + n);
          pos += n;
          this.payHave += n;
          if (this.payHave === this.payNeed) this.onSmall();
          break;
        }
        default:
          pos = this.readHeader(buf, pos, end);
      }
    }
  }

  private readHeader(buf: Buffer, pos: number, end: number): number {
    if (this.hdrHave === 0) {
      const avail = end - pos;
      if (avail >= P.NBD_STRUCTURED_REPLY_SIZE) return pos + this.parseHeader(buf, pos);
      if (avail >= P.NBD_SIMPLE_REPLY_SIZE && buf.readUInt32BE(pos) === P.NBD_SIMPLE_REPLY_MAGIC) {
        return pos + this.parseHeader(buf, pos);
      }
    }
    // Slow path: the header straddles reads; gather it in `hdr`.
    for (;;) {
      const need = this.hdrHave < 4 ? 4 : this.headerSize(this.hdr.readUInt32BE(0));
      if (need < 0) {
        this.protocolError(`bad reply magic 0x${this.hdr.readUInt32BE(0).toString(16)}`);
        return end;
      }
      const n = Math.min(need - this.hdrHave, end - pos);
      buf.copy(this.hdr, this.hdrHave, pos, pos + n);
      this.hdrHave += n;
      pos += n;
      if (this.hdrHave < need) return pos;
      if (need > 4) {
        this.hdrHave = 0;
        this.parseHeader(this.hdr, 0);
        return pos;
      }
    }
  }

  private headerSize(magic: number): number {
    if (magic === P.NBD_STRUCTURED_REPLY_MAGIC) return P.NBD_STRUCTURED_REPLY_SIZE;
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) return P.NBD_SIMPLE_REPLY_SIZE;
    return -1;
  }

  /** Parse a complete reply header at `buf[p]`; returns its size. */
  private parseHeader(buf: Buffer, p: number): number {
    const magic = buf.readUInt32BE(p);
    if (magic === P.NBD_STRUCTURED_REPLY_MAGIC) {
      const flags = buf.readUInt16BE(p + 4);
      const type = buf.readUInt16BE(p + 6);
      const req = this.lookup(buf.readUInt32BE(p + 8), buf.readUInt32BE(p + 12));
      const len = buf.readUInt32BE(p + 16);
      if (req) this.startChunk(req, flags, type, len);
      return P.NBD_STRUCTURED_REPLY_SIZE;
    }
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
      const errno = buf.readUInt32BE(p + 4);
      const req = this.lookup(buf.readUInt32BE(p + 8), buf.readUInt32BE(p + 12));
      if (req) {
        if (errno !== 0) {
          req.error = this.requestError(req, errno, '');
          this.finish(req);
        } else if (req.cmd === P.NBD_CMD_READ) {
          this.cur = req;
          this.curType = TYPE_SIMPLE_READ;
          this.startData(req.target as Buffer, req.targetPos, req.length);
        } else if (req.cmd === P.NBD_CMD_BLOCK_STATUS) {
          this.protocolError('simple reply to a block status request');
        } else {
          this.finish(req);
        }
      }
      return P.NBD_SIMPLE_REPLY_SIZE;
    }
    this.protocolError(`bad reply magic 0x${magic.toString(16)}`);
    return 0;
  }

  private lookup(hi: number, lo: number): Req | undefined {
    const req = hi === 0 ? this.pending.get(lo) : undefined;
    if (!req)
      this.protocolError(`reply for unknown handle 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}`);
    return req;
  }

  private startChunk(req: Req, flags: number, type: number, len: number): void {
    this.cur = req;
    this.curFlags = flags;
    this.curType = type;
    this.curLen = len;
    switch (type) {
      case P.NBD_REPLY_TYPE_OFFSET_DATA:
        if (req.cmd !== P.NBD_CMD_READ || len < 9 || len - 8 > req.length)
          return this.protocolError(`unexpected OFFSET_DATA chunk of ${len} bytes`);
        if (++req.chunks > READ_CHUNKS_SLACK + req.length / 512)
          return this.protocolError(`too many chunks for a read of ${req.length} bytes`);
        return this.startSmall(8);
      case P.NBD_REPLY_TYPE_OFFSET_HOLE:
        if (req.cmd !== P.NBD_CMD_READ || len !== 12)
          return this.protocolError('unexpected OFFSET_HOLE chunk');
        if (++req.chunks > READ_CHUNKS_SLACK + req.length / 512)
          return this.protocolError(`too many chunks for a read of ${req.length} bytes`);
        return this.startSmall(12);
      case P.NBD_REPLY_TYPE_BLOCK_STATUS:
        if (
          req.cmd !== P.NBD_CMD_BLOCK_STATUS ||
          len < 12 ||
          (len - 4) % 8 !== 0 ||
          len > MAX_BLOCK_STATUS_PAYLOAD
        ) {
          return this.protocolError(`bad BLOCK_STATUS chunk of ${len} bytes`);
        }
        return this.startSmall(len);
      case P.NBD_REPLY_TYPE_NONE:
        if (len !== 0 || !(flags & P.NBD_REPLY_FLAG_DONE)) return this.protocolError('bad NONE chunk');
        return this.chunkDone();
      default:
        if (type & P.NBD_REPLY_TYPE_ERROR_BIT) {
          if (len < 6 || len > MAX_ERROR_PAYLOAD) return this.protocolError(`bad error chunk length ${len}`);
          return this.startSmall(len);
        }
        return this.protocolError(`unknown structured reply type ${type}`);
    }
  }

  private startSmall(n: number): void {
    this.payBuf = n <= this.small.length ? this.small : Buffer.allocUnsafe(n);
    this.payNeed = n;
    this.payHave = 0;
    this.st = ST_SMALL;
  }

  private startData(dest: Buffer, pos: number, n: number): void {
    this.dataDest = dest;
    this.dataPos = pos;
    this.dataLeft = n;
    this.st = ST_DATA;
    if (n === 0) this.onDataDone();
  }

  private onDataDone(): void {
    const req = this.cur as Req;
    if (this.curType === TYPE_SIMPLE_READ) {
      req.covered = req.length;
      this.st = ST_HEADER;
      this.cur = null;
      this.finish(req);
      return;
    }
    this.chunkDone();
  }

  /** A small payload (or the 8-byte prefix of OFFSET_DATA) is complete. */
  private onSmall(): void {
    const req = this.cur as Req;
    const b = this.payBuf;
    switch (this.curType) {
      case P.NBD_REPLY_TYPE_OFFSET_DATA: {
        const off = P.readU64(b, 0);
        const n = this.curLen - 8;
        const rel = off - req.offset;
        if (off < 0 || rel < 0 || rel + n > req.length)
          return this.protocolError('OFFSET_DATA outside the request');
        if (!req.addSpan(rel, rel + n)) return this.protocolError('OFFSET_DATA overlaps data already sent');
        return this.startData(req.target as Buffer, req.targetPos + rel, n);
      }
      case P.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const off = P.readU64(b, 0);
        const n = b.readUInt32BE(8);
        const rel = off - req.offset;
        if (off < 0 || rel < 0 || n === 0 || rel + n > req.length) {
          return this.protocolError('OFFSET_HOLE outside the request');
        }
        if (!req.addSpan(rel, rel + n)) return this.protocolError('OFFSET_HOLE overlaps data already sent');
        const start = req.targetPos + rel;
        (req.target as Buffer).fill(0, start, start + n);
        return this.chunkDone();
      }
      case P.NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (b.readUInt32BE(0) === req.contextId) {
          if (req.extents) return this.protocolError('duplicate BLOCK_STATUS chunk for one context');
          const count = (this.payNeed - 4) / 8;
          // Only extents up to the end of the request are kept; the rest are only checked.
          const ext: NbdExtent[] = [];
          const reqEnd = req.offset + req.length;
          let pos = req.offset;
          for (let i = 0, q = 4; i < count; i++, q += 8) {
            const len = b.readUInt32BE(q);
            if (len === 0) return this.protocolError('zero-length block status extent');
            if (pos < reqEnd) ext.push({ offset: pos, length: len, flags: b.readUInt32BE(q + 4) });
            pos += len;
            if (pos > this.size) {
              return this.protocolError(
                `block status extent ends at ${pos}, beyond the end of the export (${this.size} bytes)`,
              );
            }
          }
          req.extents = ext;
        }
        return this.chunkDone();
      }
      default: {
        // Error chunk (any type with bit 15 set).
        const errno = b.readUInt32BE(0);
        const mlen = b.readUInt16BE(4);
        if (6 + mlen > this.payNeed) return this.protocolError('error chunk message longer than the chunk');
        const msg = b
          .toString('utf8', 6, 6 + mlen)
          .replace(/\s+/g, ' ')
          .trim();
        const errOff =
          this.curType === P.NBD_REPLY_TYPE_ERROR_OFFSET && this.payNeed >= 6 + mlen + 8
            ? P.readU64(b, 6 + mlen)
            : undefined;
        req.error ??= this.requestError(req, errno === 0 ? P.NBD_EIO : errno, msg, errOff);
        return this.chunkDone();
      }
    }
  }

  private chunkDone(): void {
    const req = this.cur as Req;
    this.st = ST_HEADER;
    this.cur = null;
    if (this.curFlags & P.NBD_REPLY_FLAG_DONE) this.finish(req);
  }

  // ---- Argument checks ------------------------------------------------------------------------

  private contextId(context: string): number {
    if (!this.structuredReplies) {
      throw protoError(
        `block status is unavailable: ${describeNbdTarget(this.target)} does not support structured replies`,
      );
    }
    const id = this.contexts.get(context);
    if (id === undefined) {
      throw protoError(
        `meta context "${context}" was not negotiated with ${describeNbdTarget(this.target)}` +
          (this.contexts.size > 0 ? ` (have: ${[...this.contexts.keys()].join(', ')})` : ''),
      );
    }
    return id;
  }

  private checkRange(what: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw protoError(`bad NBD ${what} range: offset ${offset}, length ${length}`);
    }
    if (offset + length > this.size) {
      throw protoError(
        `NBD ${what} of ${length} bytes at offset ${offset} is beyond the end of the export (${this.size} bytes)`,
      );
    }
    if (this.failure) throw this.failure;
  }

  private checkWritable(what: string): void {
    if (this.readOnly) {
      throw protoError(`cannot ${what}: the NBD export at ${describeNbdTarget(this.target)} is read-only`, {
        reason: 'read-only',
      });
    }
  }

  private checkAligned(what: string, offset: number, length: number): void {
    const m = this.minBlockSize;
    if (m > 1 && (offset % m !== 0 || (length % m !== 0 && offset + length !== this.size))) {
      throw protoError(
        `NBD ${what} at offset ${offset}, length ${length} is not aligned to the server's minimum block size ${m}`,
      );
    }
  }

  /** The smallest range aligned to minBlockSize that covers [offset, offset+length). */
  private align(offset: number, length: number): { offset: number; length: number } {
    const m = this.minBlockSize;
    if (m === 1) return { offset, length };
    const s = offset - (offset % m);
    const e = Math.min(Math.ceil((offset + length) / m) * m, this.size);
    return { offset: s, length: e - s };
  }
}
