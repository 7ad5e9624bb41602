/**
 * NBD exports of a checkpoint's disks (`checkpointExport`) and the copy-on-write overlay that makes
 * one writable without ever writing the backup (`CowOverlay`).
 *
 * Block status (base:allocation) comes from the disk's block map: a range no extent covers is a
 * hole (HOLE|ZERO), a zero extent reads as zeros (ZERO), a chunk extent is data. Extents lie inside
 * their page (FORMAT.md, "Block map"), so one page answers for its own span.
 *
 * Overlay files, in a directory the user chooses (created 0700, files 0600), per disk NAME:
 *   NAME.cow   sparse file of the disk's size holding the blocks written through the export;
 *   NAME.map   allocation bitmap, one bit per 4 KiB block (bit set = the block is in NAME.cow);
 *   NAME.json  {format:"bkfs-overlay-1", vm, checkpoint, disk, size, blockSize}: reopening an
 *              overlay for another checkpoint or size is refused.
 * Crash safety: data goes to NAME.cow before its bits are set, and NAME.map is replaced atomically
 * (write, fsync, rename) on every flush/FUA and at close, after NAME.cow is fsynced. A crash loses
 * at most writes that were never flushed (as a disk's volatile cache would); a block whose bit is
 * set always holds data written through the export. Unaligned writes to blocks not yet in the
 * overlay are completed from the backup first (read-modify-write under one lock per overlay).
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { mkdirPrivate } from '../util/private-fs';
import type { CheckpointReader } from '../chain/reader';
import * as P from './protocol';
import type { BlockExtent, NbdExport } from './server';

/** base:allocation of `[offset, offset+length)` of a disk, from the page holding `offset`. */
export function blockStatusOf(
  reader: CheckpointReader,
  diskName: string,
  offset: number,
  length: number,
): BlockExtent[] {
  const disk = reader.disk(diskName);
  const span = reader.repo.config.pageSpan;
  const pageNo = Math.floor(offset / span);
  const end = Math.min(offset + length, (pageNo + 1) * span, disk.virtual_size);
  const out: BlockExtent[] = [];
  const push = (l: number, flags: number) => {
    if (l <= 0) return;
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += l;
    else out.push({ length: l, flags });
  };
  let pos = offset;
  for (const e of reader.page(disk, pageNo)) {
    const eEnd = e.offset + e.length;
    if (eEnd <= pos) continue;
    if (e.offset >= end) break;
    if (e.offset > pos) {
      push(e.offset - pos, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO);
      pos = e.offset;
    }
    const t = Math.min(eEnd, end);
    push(t - pos, e.loc === null ? P.NBD_STATE_ZERO : 0);
    pos = t;
  }
  push(end - pos, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO);
  return out;
}

/** A read-only export of one disk of a checkpoint. */
export function checkpointExport(reader: CheckpointReader, diskName: string): NbdExport {
  const disk = reader.disk(diskName);
  return {
    size: disk.virtual_size,
    readAt: (o, l) => reader.readAt(diskName, o, l),
    readInto: async (o, target) => {
      await reader.readInto(diskName, o, target);
    },
    blockStatus: (o, l) => Promise.resolve(blockStatusOf(reader, diskName, o, l)),
  };
}

export const OVERLAY_BLOCK = 4096;
const OVERLAY_FORMAT = 'bkfs-overlay-1';
/** Largest piece written at once by zero/trim. */
const ZERO_PIECE = 4 << 20;

export interface OverlayIdentity {
  vm: string;
  checkpoint: string;
  disk: string;
  size: number;
}

/** File-name-safe form of a disk name. */
function safeName(disk: string): string {
  return encodeURIComponent(disk).replace(/^\./, '%2E');
}

export class CowOverlay implements NbdExport {
  readonly size: number;
  private lock: Promise<void> = Promise.resolve();
  private dirty = false;
  private closed = false;

  private constructor(
    private readonly base: NbdExport,
    private readonly fh: fsp.FileHandle,
    private readonly bitmap: Uint8Array,
    private readonly mapFile: string,
    readonly cowFile: string,
  ) {
    this.size = base.size;
  }

  /** Open (or create) the overlay of `id` in `dir` over `base`. */
  static async open(dir: string, id: OverlayIdentity, base: NbdExport): Promise<CowOverlay> {
    await mkdirPrivate(dir, { recursive: true });
    const stem = path.join(dir, safeName(id.disk));
    const metaFile = `${stem}.json`;
    const mapFile = `${stem}.map`;
    const cowFile = `${stem}.cow`;
    const blocks = Math.ceil(id.size / OVERLAY_BLOCK);
    const mapBytes = Math.ceil(blocks / 8);
    const meta = { format: OVERLAY_FORMAT, ...id, blockSize: OVERLAY_BLOCK };
    let bitmap = new Uint8Array(mapBytes);
    if (fs.existsSync(metaFile)) {
      let old: Record<string, unknown>;
      try {
        old = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as Record<string, unknown>;
      } catch (e) {
        throw new BkfsError('TARGET_INVALID', `overlay ${metaFile} is unreadable: ${(e as Error).message}`);
      }
      for (const k of ['format', 'vm', 'checkpoint', 'disk', 'size', 'blockSize'] as const) {
        if (old[k] !== meta[k]) {
          throw new BkfsError(
            'TARGET_MISMATCH',
            `overlay ${metaFile} belongs to ${String(old.vm)}@${String(old.checkpoint)} disk ` +
              `${String(old.disk)} (${k} differs): use another --overlay-dir`,
          );
        }
      }
      if (fs.existsSync(mapFile)) {
        const b = fs.readFileSync(mapFile);
        if (b.length !== mapBytes)
          throw new BkfsError('TARGET_INVALID', `overlay bitmap ${mapFile} has the wrong size`);
        bitmap = new Uint8Array(b);
      }
    } else {
      const tmp = `${metaFile}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify(meta) + '\n', { mode: 0o600 });
      fs.chmodSync(tmp, 0o600); // whatever the umask
      fs.renameSync(tmp, metaFile);
    }
    const fh = await fsp.open(cowFile, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    await fh.chmod(0o600);
    await fh.truncate(id.size);
    return new CowOverlay(base, fh, bitmap, mapFile, cowFile);
  }

  private has(block: number): boolean {
    return ((this.bitmap[block >> 3] ?? 0) & (1 << (block & 7))) !== 0;
  }

  private mark(first: number, last: number): void {
    for (let b = first; b <= last; b++) this.bitmap[b >> 3]! |= 1 << (b & 7);
    this.dirty = true;
  }

  /** Blocks written through the export. */
  allocatedBlocks(): number {
    let n = 0;
    for (const byte of this.bitmap) for (let v = byte; v; v &= v - 1) n++;
    return n;
  }

  /** Runs of blocks with the same allocation in `[offset, end)`: [start, end, inOverlay]. */
  private runs(offset: number, end: number): [number, number, boolean][] {
    const out: [number, number, boolean][] = [];
    let pos = offset;
    while (pos < end) {
      const blk = Math.floor(pos / OVERLAY_BLOCK);
      const mine = this.has(blk);
      let b = blk + 1;
      while (b * OVERLAY_BLOCK < end && this.has(b) === mine) b++;
      const t = Math.min(end, b * OVERLAY_BLOCK);
      out.push([pos, t, mine]);
      pos = t;
    }
    return out;
  }

  async readAt(offset: number, length: number): Promise<Buffer> {
    const end = Math.min(offset + length, this.size);
    const out = Buffer.alloc(Math.max(0, end - offset));
    await Promise.all(
      this.runs(offset, end).map(async ([s, t, mine]) => {
        if (mine) await this.fh.read(out, s - offset, t - s, s);
        else (await this.base.readAt(s, t - s)).copy(out, s - offset);
      }),
    );
    return out;
  }

  async blockStatus(offset: number, length: number): Promise<BlockExtent[]> {
    const end = Math.min(offset + length, this.size);
    const first = this.runs(offset, end)[0];
    if (!first) return [];
    const [s, t, mine] = first;
    if (mine) return [{ length: t - s, flags: 0 }];
    if (this.base.blockStatus) {
      const got = await this.base.blockStatus(s, t - s);
      if (got.length > 0) return got;
    }
    return [{ length: t - s, flags: 0 }];
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn);
    this.lock = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** Write `data` at `offset`, completing partial blocks from the current contents. */
  private async put(offset: number, data: Buffer): Promise<void> {
    if (this.closed) throw new Error('the overlay is closed');
    const end = offset + data.length;
    const a = Math.floor(offset / OVERLAY_BLOCK) * OVERLAY_BLOCK;
    const b = Math.min(Math.ceil(end / OVERLAY_BLOCK) * OVERLAY_BLOCK, this.size);
    let buf = data;
    if (a !== offset || b !== end) {
      buf = Buffer.alloc(b - a);
      if (a < offset) (await this.readAt(a, OVERLAY_BLOCK)).copy(buf, 0);
      if (b > end) {
        const last = Math.max(a, b - OVERLAY_BLOCK);
        (await this.readAt(last, b - last)).copy(buf, last - a);
      }
      data.copy(buf, offset - a);
    }
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, a + done);
      done += bytesWritten;
    }
    this.mark(a / OVERLAY_BLOCK, Math.ceil(b / OVERLAY_BLOCK) - 1);
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.exclusive(async () => {
      await this.put(offset, data);
      if (fua) await this.sync();
    });
  }

  zero(offset: number, length: number, fua: boolean): Promise<void> {
    return this.exclusive(async () => {
      for (let pos = offset; pos < offset + length; pos += ZERO_PIECE) {
        await this.put(pos, Buffer.alloc(Math.min(ZERO_PIECE, offset + length - pos)));
      }
      if (fua) await this.sync();
    });
  }

  /** Trim: whole blocks inside the range read as zeros afterwards; partial blocks are kept. */
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    const a = Math.ceil(offset / OVERLAY_BLOCK) * OVERLAY_BLOCK;
    const b = Math.floor((offset + length) / OVERLAY_BLOCK) * OVERLAY_BLOCK;
    if (b <= a) return Promise.resolve();
    return this.zero(a, b - a, fua);
  }

  flush(): Promise<void> {
    return this.exclusive(() => this.sync());
  }

  private async sync(): Promise<void> {
    await this.fh.datasync();
    if (!this.dirty) return;
    this.dirty = false;
    const tmp = `${this.mapFile}.tmp`;
    const h = await fsp.open(tmp, 'w', 0o600);
    try {
      await h.chmod(0o600);
      await h.writeFile(this.bitmap);
      await h.sync();
    } finally {
      await h.close();
    }
    await fsp.rename(tmp, this.mapFile);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.flush();
    this.closed = true;
    await this.fh.close();
  }
}
