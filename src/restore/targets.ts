/**
 * Restore targets: where restored disk bytes go. Thin adapters over files, qemu-nbd and NBD.
 *
 * - Raw file (`RawFileTarget`): positioned `pwritev` of chunk slices straight from the chunk cache
 *   (no copy). A fresh target is `FILE.bkfs-partial`, truncated to the disk size, so everything
 *   not written is a hole; `finish()` fsyncs it and renames it over FILE. An update (`--since`)
 *   renames FILE to `FILE.bkfs-partial` for the duration, writes in place and punches holes
 *   (`fallocate --punch-hole`) for ranges that became zeros.
 * - qcow2 file (`NbdTarget` over a private `qemu-nbd -f qcow2`): a fresh one is made by
 *   `qemu-img create` (optionally on a backing file, for chain export); zero runs become NBD
 *   WRITE_ZEROES (qcow2 zero clusters). Same partial-name rule as raw files.
 * - NBD export (`NbdTarget` on a URI): written in place; zero runs and unmapped ranges become
 *   WRITE_ZEROES (may trim). Refused when read-only or smaller than the disk.
 *
 * A target never decides what to write; the engine does. Memory: none beyond the caller's
 * buffers (NBD writes of several pieces are concatenated into one buffer per run).
 * Partial files are left in place on failure or interruption (`abort()`), clearly named.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BkfsError, errorMessage, isBkfsError } from '../errors';
import { NbdClient, describeNbdTarget, parseNbdUri } from '../nbd/client';
import { QemuNbd } from '../backup/qemu';
import { run } from '../util/proc';
import { openPrivate } from '../util/private-fs';
import { errnoCode, userPathError } from '../util/userpath';

export const PARTIAL_SUFFIX = '.bkfs-partial';

export interface RestoreTarget {
  /** For messages: a path or an NBD server description. */
  readonly description: string;
  /** Bytes the target can hold. */
  readonly size: number;
  /** Writes must start and end on multiples of this (except at the end of the target). */
  readonly align: number;
  /** Everything not written reads as zeros (a new file or image): zero runs may be skipped. */
  readonly fresh: boolean;
  write(offset: number, bufs: Buffer[]): Promise<void>;
  zero(offset: number, length: number): Promise<void>;
  read(offset: number, length: number): Promise<Buffer>;
  /** Make the data durable and put the target in place (rename a partial file). */
  finish(): Promise<void>;
  /** Stop using the target; a partial file stays where it is. Idempotent. */
  abort(): Promise<void>;
  /** Path of the partial file while one exists. */
  readonly partialPath: string | undefined;
}

export function isNbdUri(s: string): boolean {
  return /^nbds?(\+unix)?:\/\//i.test(s);
}

/** qcow2 or raw, from the file's first bytes. */
export async function detectImageFormat(file: string): Promise<'qcow2' | 'raw'> {
  const fh = await fsp.open(file, 'r');
  try {
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, 0);
    return b.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb])) ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

function targetError(file: string, e: unknown): BkfsError {
  if (e instanceof BkfsError) return e;
  if (errnoCode(e) === 'ENOENT') {
    return new BkfsError('TARGET_INVALID', `cannot write ${file}: its directory does not exist`);
  }
  // Permission (EACCES/EPERM/EROFS) -> PERMISSION_DENIED; not a directory, no space... -> TARGET_INVALID.
  const mapped = userPathError(e, 'cannot write', file);
  if (mapped instanceof BkfsError) return mapped;
  return new BkfsError('TARGET_INVALID', `cannot write ${file}: ${errorMessage(e)}`);
}

/**
 * Check a file target before anything is written: it must be a regular file (or absent), and absent
 * unless `force` (fresh restore) / present with the right size (update).
 */
export function checkFileTarget(file: string, mode: 'fresh' | 'update', force: boolean): void {
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(file);
  } catch {
    st = undefined;
  }
  if (mode === 'update') {
    if (!st) {
      const hint = fs.existsSync(file + PARTIAL_SUFFIX)
        ? ` (${file}${PARTIAL_SUFFIX} holds an interrupted restore: rename it back and run again, or restore without --since)`
        : '';
      throw new BkfsError(
        'TARGET_INVALID',
        `${file} does not exist, so --since has nothing to update${hint}`,
      );
    }
    if (!st.isFile()) throw new BkfsError('TARGET_INVALID', `${file} is not a regular file`);
    return;
  }
  if (st) {
    if (!st.isFile()) {
      throw new BkfsError(
        'TARGET_INVALID',
        `${file} is not a regular file (block devices: export them with qemu-nbd and restore to an nbd+unix:// URI)`,
      );
    }
    if (!force) throw new BkfsError('TARGET_EXISTS', `${file} exists (use --force to replace it)`);
  }
  const dir = path.dirname(path.resolve(file));
  let dst: fs.Stats;
  try {
    dst = fs.statSync(dir);
  } catch (e) {
    throw targetError(file, e);
  }
  if (!dst.isDirectory())
    throw new BkfsError('TARGET_INVALID', `cannot write ${file}: ${dir} is not a directory`);
  try {
    fs.accessSync(dir, fs.constants.W_OK);
  } catch (e) {
    throw targetError(file, e);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

// ------------------------------------------------------------------------------------------------

const ZEROS = Buffer.alloc(1 << 20);
/** Zero runs at least this long are punched as holes; shorter ones are written as zeros. */
const PUNCH_MIN = 1 << 20;

export class RawFileTarget implements RestoreTarget {
  readonly align = 1;
  private closed = false;
  private punchWorks = true;
  private wrote = false;

  private constructor(
    readonly finalPath: string,
    readonly partialPath: string,
    private readonly fh: fsp.FileHandle,
    readonly size: number,
    readonly fresh: boolean,
  ) {}

  get description(): string {
    return this.finalPath;
  }

  /** A new sparse file of `size` bytes at `file.bkfs-partial`. */
  static async create(file: string, size: number): Promise<RawFileTarget> {
    const partial = file + PARTIAL_SUFFIX;
    let fh: fsp.FileHandle;
    try {
      // A leftover partial file (an interrupted run) is replaced; never written through a link.
      await fsp.rm(partial, { force: true });
      fh = await openPrivate(partial, 'wx');
    } catch (e) {
      throw targetError(file, e);
    }
    try {
      await fh.truncate(size);
    } catch (e) {
      await fh.close();
      await fsp.rm(partial, { force: true });
      throw targetError(file, e);
    }
    return new RawFileTarget(file, partial, fh, size, true);
  }

  /** An existing raw file holding an earlier state of the disk (incremental restore). */
  static async update(file: string, size: number): Promise<RawFileTarget> {
    const st = await fsp.stat(file);
    if (st.size !== size) {
      throw new BkfsError(
        'TARGET_INVALID',
        `${file} is ${st.size} bytes but the disk is ${size} bytes: it does not hold this disk`,
      );
    }
    const partial = file + PARTIAL_SUFFIX;
    await fsp.rename(file, partial);
    try {
      return new RawFileTarget(file, partial, await fsp.open(partial, 'r+'), size, false);
    } catch (e) {
      await fsp.rename(partial, file).catch(() => undefined);
      throw targetError(file, e);
    }
  }

  async write(offset: number, bufs: Buffer[]): Promise<void> {
    this.wrote = true;
    let pos = offset;
    let list = bufs;
    for (;;) {
      const total = list.reduce((n, b) => n + b.length, 0);
      if (total === 0) return;
      const { bytesWritten } = await this.fh.writev(list, pos);
      if (bytesWritten === total) return;
      if (bytesWritten <= 0) throw new BkfsError('TARGET_INVALID', `short write to ${this.finalPath}`);
      // Rare short write: continue after what was written.
      pos += bytesWritten;
      let skip = bytesWritten;
      const rest: Buffer[] = [];
      for (const b of list) {
        if (skip >= b.length) skip -= b.length;
        else {
          rest.push(b.subarray(skip));
          skip = 0;
        }
      }
      list = rest;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.wrote = true;
    if (length >= PUNCH_MIN && this.punchWorks) {
      const r = await run(
        'fallocate',
        [
          '--punch-hole',
          '--keep-size',
          '--offset',
          String(offset),
          '--length',
          String(length),
          this.partialPath,
        ],
        { allowFail: true },
      ).catch(() => ({ code: 1 }));
      if (r.code === 0) return;
      this.punchWorks = false; // e.g. a filesystem without hole punching: write zeros instead
    }
    for (let p = 0; p < length; p += ZEROS.length) {
      const n = Math.min(ZEROS.length, length - p);
      await this.write(offset + p, [ZEROS.subarray(0, n)]);
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    await this.fh.read(b, 0, length, offset);
    return b;
  }

  async finish(): Promise<void> {
    try {
      await this.fh.datasync();
    } catch (e) {
      throw targetError(this.finalPath, e);
    } finally {
      this.closed = true;
      await this.fh.close();
    }
    await fsp.rename(this.partialPath, this.finalPath);
    // The rename is durable only once the directory is: a failure here is a failed restore.
    await fsyncDir(path.dirname(path.resolve(this.finalPath))).catch((e: unknown) => {
      throw targetError(this.finalPath, e);
    });
  }

  async abort(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close().catch(() => undefined);
    if (this.wrote) return; // the partial file stays, clearly named
    // Nothing was written: leave things as they were.
    if (this.fresh) await fsp.rm(this.partialPath, { force: true });
    else await fsp.rename(this.partialPath, this.finalPath).catch(() => undefined);
  }
}

// ------------------------------------------------------------------------------------------------

export class NbdTarget implements RestoreTarget {
  private done = false;
  private wrote = false;

  constructor(
    private readonly client: NbdClient,
    readonly description: string,
    readonly fresh: boolean,
    readonly size: number,
    private readonly onFinish: () => Promise<void> = async () => undefined,
    /** Called with whether anything was written. */
    private readonly onAbort: (wrote: boolean) => Promise<void> = async () => undefined,
    readonly partialPath: string | undefined = undefined,
  ) {}

  get align(): number {
    return this.client.minBlockSize;
  }

  write(offset: number, bufs: Buffer[]): Promise<void> {
    this.wrote = true;
    const data = bufs.length === 1 ? bufs[0]! : Buffer.concat(bufs);
    return this.client.write(offset, data);
  }

  zero(offset: number, length: number): Promise<void> {
    this.wrote = true;
    return this.client.writeZeroes(offset, length);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.client.read(offset, length);
  }

  async finish(): Promise<void> {
    this.done = true;
    try {
      await this.client.flush();
      await this.client.close();
    } catch (e) {
      this.client.destroy();
      await this.onAbort(true);
      throw e;
    }
    await this.onFinish();
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.client.destroy();
    await this.onAbort(this.wrote);
  }
}

/** Connect to a writable NBD export at least `diskSize` bytes large. */
export async function openNbdUri(uri: string, diskSize: number): Promise<NbdTarget> {
  const t = parseNbdUri(uri);
  const where = describeNbdTarget(t);
  let client: NbdClient;
  try {
    client = await NbdClient.connect(t);
  } catch (e) {
    if (isBkfsError(e, 'SOURCE_NOT_FOUND')) throw new BkfsError('TARGET_INVALID', e.message);
    throw e;
  }
  if (client.readOnly) {
    await client.close();
    throw new BkfsError('TARGET_INVALID', `the ${where} is read-only: restore needs a writable export`);
  }
  if (client.size < diskSize) {
    await client.close();
    throw new BkfsError(
      'TARGET_INVALID',
      `the ${where} has ${client.size} bytes but the disk has ${diskSize}: the target is too small`,
    );
  }
  return new NbdTarget(client, where, false, client.size);
}

/** Serve `image` writable with a private qemu-nbd and connect; everything is undone on failure. */
async function serveImage(image: string, label: string): Promise<{ srv: QemuNbd; client: NbdClient }> {
  let srv: QemuNbd;
  try {
    srv = await QemuNbd.start({ image, format: 'qcow2', readOnly: false });
  } catch (e) {
    throw new BkfsError('TARGET_INVALID', `cannot open ${label}: ${errorMessage(e)}`);
  }
  try {
    return { srv, client: await connectWhenListening(srv.socket) };
  } catch (e) {
    await srv.stop();
    throw isBkfsError(e, 'SOURCE_NOT_FOUND')
      ? new BkfsError('EXTERNAL_TOOL', `qemu-nbd serving ${label} did not accept a connection: ${e.message}`)
      : e;
  }
}

/**
 * Connect to a qemu-nbd that was just started. Its socket file appears when qemu-nbd binds it,
 * a moment before it listens, so a refused connection is retried for a while.
 */
async function connectWhenListening(socket: string): Promise<NbdClient> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      return await NbdClient.connect({ socket });
    } catch (e) {
      const refused = isBkfsError(e, 'SOURCE_NOT_FOUND') && e.data?.code === 'ECONNREFUSED';
      if (!refused || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

export interface Qcow2Options {
  /** Backing file name, relative to the new image's directory (chain export). */
  backing?: string;
}

/**
 * A new qcow2 image of `size` bytes at `file.bkfs-partial`, written through a private qemu-nbd;
 * renamed to `file` by `finish()`.
 */
export async function createQcow2(file: string, size: number, o: Qcow2Options = {}): Promise<NbdTarget> {
  const partial = file + PARTIAL_SUFFIX;
  await fsp.rm(partial, { force: true });
  // Created 0600 first: qemu-img then writes into the existing file, which keeps its mode.
  await (await openPrivate(partial, 'wx')).close();
  const args = ['create', '-q', '-f', 'qcow2'];
  if (o.backing !== undefined) args.push('-b', o.backing, '-F', 'qcow2');
  args.push(partial, String(size));
  const r = await run('qemu-img', args, { allowFail: true });
  if (r.code !== 0) {
    await fsp.rm(partial, { force: true });
    throw new BkfsError(
      'TARGET_INVALID',
      `cannot create ${file}: ${r.stderr.trim().split('\n').pop() ?? ''}`,
    );
  }
  const { srv, client } = await serveImage(partial, file).catch(async (e: unknown) => {
    await fsp.rm(partial, { force: true });
    throw e;
  });
  return new NbdTarget(
    client,
    file,
    o.backing === undefined,
    client.size,
    async () => {
      await srv.stop();
      await fsp.rename(partial, file);
      await fsyncDir(path.dirname(path.resolve(file))).catch((e: unknown) => {
        throw targetError(file, e);
      });
    },
    async (wrote) => {
      await srv.stop();
      if (!wrote) await fsp.rm(partial, { force: true });
    },
    partial,
  );
}

/** An existing qcow2 image holding an earlier state of the disk (incremental restore). */
export async function updateQcow2(file: string, size: number): Promise<NbdTarget> {
  const partial = file + PARTIAL_SUFFIX;
  await fsp.rename(file, partial);
  let served: { srv: QemuNbd; client: NbdClient };
  try {
    served = await serveImage(partial, file);
  } catch (e) {
    await fsp.rename(partial, file).catch(() => undefined);
    throw e;
  }
  const { srv, client } = served;
  if (client.size !== size) {
    await client.close().catch(() => undefined);
    await srv.stop();
    await fsp.rename(partial, file).catch(() => undefined);
    throw new BkfsError(
      'TARGET_INVALID',
      `${file} has a virtual size of ${client.size} bytes but the disk is ${size} bytes: it does not hold this disk`,
    );
  }
  return new NbdTarget(
    client,
    file,
    false,
    client.size,
    async () => {
      await srv.stop();
      await fsp.rename(partial, file);
    },
    async (wrote) => {
      await srv.stop();
      if (!wrote) await fsp.rename(partial, file).catch(() => undefined);
    },
    partial,
  );
}
