/**
 * NBD wire constants and small encoders, written from the protocol document
 * (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
 *
 * Only what bkfs' client uses is defined here: fixed newstyle handshake (plus oldstyle for
 * completeness), the options STRUCTURED_REPLY / SET_META_CONTEXT / GO / EXPORT_NAME / ABORT,
 * simple and structured replies, and the commands READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES,
 * BLOCK_STATUS. Extended headers (64-bit lengths) are not negotiated.
 *
 * All integers on the wire are big-endian. 64-bit fields are handled as JS numbers split into two
 * 32-bit halves; offsets above 2^53 cannot occur for exports bkfs can address.
 */

// ---- Handshake magics -----------------------------------------------------------------------

/** 'NBDMAGIC', first 8 bytes from every server. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': newstyle server magic, and the prefix of every client option. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** Oldstyle negotiation magic (cliserv_magic). */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
/** Magic of an option reply (fixed newstyle). */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;

// ---- Handshake flags ------------------------------------------------------------------------

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- Transmission flags ---------------------------------------------------------------------

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- Options --------------------------------------------------------------------------------

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

// ---- Option replies -------------------------------------------------------------------------

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
/** Error replies have bit 31 set. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

// ---- NBD_INFO types (NBD_OPT_GO / NBD_OPT_INFO) ---------------------------------------------

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- Transmission phase ---------------------------------------------------------------------

export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_SIZE = 20;

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Error chunk types have bit 15 set. */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

// ---- Metadata contexts ----------------------------------------------------------------------

export const BASE_ALLOCATION = 'base:allocation';
/** base:allocation: the extent is not allocated on the server. */
export const NBD_STATE_HOLE = 1;
/** base:allocation: the extent reads as zeroes. */
export const NBD_STATE_ZERO = 2;
/** qemu:dirty-bitmap:NAME: the extent is dirty (changed since the bitmap was created/cleared). */
export const NBD_STATE_DIRTY = 1;
/** Prefix of qemu's dirty bitmap contexts; the bitmap name follows. */
export const QEMU_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

// ---- Errors ---------------------------------------------------------------------------------

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM (operation not permitted)',
  5: 'EIO (input/output error)',
  12: 'ENOMEM (cannot allocate memory)',
  22: 'EINVAL (invalid argument)',
  28: 'ENOSPC (no space left on device)',
  75: 'EOVERFLOW (value too large)',
  95: 'ENOTSUP (operation not supported)',
  108: 'ESHUTDOWN (server is shutting down)',
};

export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Human name of an NBD error value carried in a reply. */
export function nbdErrorName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `error ${errno}`;
}

const REP_ERR_NAMES: Record<number, string> = {
  [NBD_REP_ERR_UNSUP]: 'option not supported by the server',
  [NBD_REP_ERR_POLICY]: 'refused by server policy',
  [NBD_REP_ERR_INVALID]: 'invalid option',
  [NBD_REP_ERR_PLATFORM]: 'not supported on the server platform',
  [NBD_REP_ERR_TLS_REQD]: 'server requires TLS, which bkfs does not support',
  [NBD_REP_ERR_UNKNOWN]: 'no such export',
  [NBD_REP_ERR_SHUTDOWN]: 'server is shutting down',
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'server requires block size negotiation',
  [NBD_REP_ERR_TOO_BIG]: 'request too big',
  [NBD_REP_ERR_EXT_HEADER_REQD]: 'server requires extended headers',
};

/** Human description of an option error reply type. */
export function repErrorName(type: number): string {
  return REP_ERR_NAMES[type] ?? `option error 0x${type.toString(16)}`;
}

export function optionName(opt: number): string {
  switch (opt) {
    case NBD_OPT_EXPORT_NAME:
      return 'NBD_OPT_EXPORT_NAME';
    case NBD_OPT_ABORT:
      return 'NBD_OPT_ABORT';
    case NBD_OPT_GO:
      return 'NBD_OPT_GO';
    case NBD_OPT_INFO:
      return 'NBD_OPT_INFO';
    case NBD_OPT_STRUCTURED_REPLY:
      return 'NBD_OPT_STRUCTURED_REPLY';
    case NBD_OPT_SET_META_CONTEXT:
      return 'NBD_OPT_SET_META_CONTEXT';
    case NBD_OPT_LIST_META_CONTEXT:
      return 'NBD_OPT_LIST_META_CONTEXT';
    default:
      return `option ${opt}`;
  }
}

export function commandName(cmd: number): string {
  switch (cmd) {
    case NBD_CMD_READ:
      return 'read';
    case NBD_CMD_WRITE:
      return 'write';
    case NBD_CMD_DISC:
      return 'disconnect';
    case NBD_CMD_FLUSH:
      return 'flush';
    case NBD_CMD_TRIM:
      return 'trim';
    case NBD_CMD_CACHE:
      return 'cache';
    case NBD_CMD_WRITE_ZEROES:
      return 'write-zeroes';
    case NBD_CMD_BLOCK_STATUS:
      return 'block-status';
    default:
      return `command ${cmd}`;
  }
}

// ---- Encoders -------------------------------------------------------------------------------

const TWO_32 = 0x1_0000_0000;

/** Write a non-negative integer (< 2^53) as a big-endian 64-bit value. */
export function writeU64(buf: Buffer, value: number, pos: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), pos);
  buf.writeUInt32BE(value >>> 0, pos + 4);
}

/** Read a big-endian 64-bit value as a number; returns -1 if it does not fit in 2^53. */
export function readU64(buf: Buffer, pos: number): number {
  const hi = buf.readUInt32BE(pos);
  if (hi >= 0x200000) return -1;
  return hi * TWO_32 + buf.readUInt32BE(pos + 4);
}

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(16 + data.length);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** Data of NBD_OPT_GO / NBD_OPT_INFO: export name and the NBD_INFO items requested. */
export function encodeGoData(exportName: string, infos: readonly number[]): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  let p = 4 + name.length;
  b.writeUInt16BE(infos.length, p);
  p += 2;
  for (const i of infos) {
    b.writeUInt16BE(i, p);
    p += 2;
  }
  return b;
}

/** Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT. */
export function encodeMetaContextData(exportName: string, queries: readonly string[]): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const qs = queries.map((q) => Buffer.from(q, 'utf8'));
  const total = 4 + name.length + 4 + qs.reduce((n, q) => n + 4 + q.length, 0);
  const b = Buffer.allocUnsafe(total);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  let p = 4 + name.length;
  b.writeUInt32BE(qs.length, p);
  p += 4;
  for (const q of qs) {
    b.writeUInt32BE(q.length, p);
    q.copy(b, p + 4);
    p += 4 + q.length;
  }
  return b;
}

/** Fill a 28-byte request header at `pos` of `buf`. The handle's high 32 bits are always zero. */
export function encodeRequest(
  buf: Buffer,
  pos: number,
  flags: number,
  type: number,
  handle: number,
  offset: number,
  length: number,
): void {
  buf.writeUInt32BE(NBD_REQUEST_MAGIC, pos);
  buf.writeUInt16BE(flags, pos + 4);
  buf.writeUInt16BE(type, pos + 6);
  buf.writeUInt32BE(0, pos + 8);
  buf.writeUInt32BE(handle, pos + 12);
  writeU64(buf, offset, pos + 16);
  buf.writeUInt32BE(length, pos + 24);
}
