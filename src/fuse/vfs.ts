/**
 * The virtual filesystem behind `bkfs mount`: paths -> nodes, attributes, directory listings and
 * reads, over the catalogue and `CheckpointReader`. Pure (no FUSE, no printing): the FUSE binding
 * (`mount.ts`) is a thin translation of these calls, and unit tests drive this class directly.
 *
 * Two layouts:
 *   checkpoint mode (`bkfs mount VM[@CP] DIR`)   /<disk>.raw, /<config>            (one checkpoint)
 *   tree mode       (`bkfs mount DIR`)           /<vm>/<checkpoint>/<disk>.raw, /<vm>/latest -> CP
 * In tree mode every lookup and listing re-queries the catalogue (indexed, tens of microseconds;
 * the kernel caches entries), so checkpoints written while mounted appear and forgotten ones go.
 *
 * Reads: a handle keeps its `CheckpointReader`, so an open file keeps reading the checkpoint it
 * opened whatever happens to the catalogue. All readers share one `ChunkLoader` (the decoded-chunk
 * LRU, `cacheBytes`), so memory is bounded by that cache plus each reader's page cache; idle
 * readers beyond `MAX_IDLE_READERS` are dropped and rebuilt on demand (opening one costs a query).
 *
 * Pins: checkpoint mode pins its checkpoint at open; tree mode pins a checkpoint the first time its
 * contents are looked up, listed or opened (`Pin.add`). Pins last until `close()`, so forget/gc
 * keep everything a mount serves. A read that meets damaged data (hash or decompression failure)
 * fails with EIO, never with wrong bytes, and `onDamage` reports the affected disk range once per
 * damaged chunk.
 *
 * Locking: none taken. The repository is opened read-only-in-spirit (no writes to the index); the
 * writer lock is never needed because SQLite WAL gives readers committed state.
 */
import { constants as fsConstants } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { BkfsError, errorMessage, isBkfsError } from '../errors';
import { CheckpointReader } from '../chain/reader';
import {
  checkpointById,
  checkpointDisks,
  findVm,
  getCheckpoint,
  getConfigs,
  listCheckpoints,
  listVms,
  resolveRef,
  type CheckpointRow,
  type DiskRow,
  type VmRow,
} from '../index/catalog';
import { pinCheckpoints, type Pin } from '../repo/pins';
import type { Repository } from '../repo/repository';
import { ChunkLoader, DEFAULT_CACHE_BYTES } from '../store/chunk-cache';

export type Errno =
  'ENOENT' | 'ENOTDIR' | 'EISDIR' | 'EROFS' | 'EIO' | 'EBADF' | 'EINVAL' | 'EACCES' | 'ENOTSUP';

/** A failure reported to the kernel as an errno. */
export class FsError extends Error {
  constructor(
    readonly code: Errno,
    message: string,
  ) {
    super(message);
    this.name = 'FsError';
  }
  /** The positive errno number (Linux). */
  get errno(): number {
    return osConstants.errno[this.code];
  }
}

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;

export interface NodeAttr {
  kind: 'dir' | 'file' | 'symlink';
  /** st_mode: type and permission bits. */
  mode: number;
  size: number;
  /** Modification time, ms since the epoch (a checkpoint's completion time). */
  mtime: number;
  nlink: number;
  uid: number;
  gid: number;
}

export interface DirEntry {
  name: string;
  attr: NodeAttr;
}

export interface DamageReport {
  vm: string;
  checkpoint: string;
  disk: string;
  /** Disk byte range served by the damaged chunk (within the failed read's pages). */
  offset: number;
  length: number;
  /** The read that failed. */
  readOffset: number;
  readLength: number;
  message: string;
}

export interface VfsOptions {
  /** `VM` or `VM@CP`: checkpoint mode. Absent: tree mode (the whole repository). */
  ref?: string;
  /** Decoded-chunk cache shared by every checkpoint served (bytes). */
  cacheBytes?: number;
  readAheadBytes?: number;
  /** Permission bits of files (directories get x where r is set). Default 0o400. */
  fileMode?: number;
  uid?: number;
  gid?: number;
  /** Called once per damaged chunk (per disk) met by a read. */
  onDamage?: (d: DamageReport) => void;
  /** Anything else worth a log line (a pin that could not be written, an unexpected error). */
  onNotice?: (msg: string) => void;
}

/** What one checkpoint directory holds. Immutable once built. */
interface CheckpointView {
  vm: VmRow;
  checkpoint: CheckpointRow;
  disks: DiskRow[];
  configs: Map<string, Buffer>;
  mtime: number;
}

type Node =
  | { kind: 'root' }
  | { kind: 'vm'; vm: VmRow }
  | { kind: 'latest'; vm: VmRow; target: CheckpointRow }
  | { kind: 'cpdir'; view: CheckpointView }
  | { kind: 'disk'; view: CheckpointView; disk: DiskRow }
  | { kind: 'config'; view: CheckpointView; name: string; data: Buffer };

interface Handle {
  node: Extract<Node, { kind: 'disk' } | { kind: 'config' }>;
  reader?: CheckpointReader;
}

const MAX_IDLE_READERS = 32;
const MAX_VIEWS = 1024;
const DISK_SUFFIX = '.raw';

/** Open flags as the kernel passes them (Linux values). */
const O_ACCMODE = 0o3;
const WRITE_FLAGS = fsConstants.O_TRUNC | fsConstants.O_CREAT | fsConstants.O_APPEND;

export class CheckpointVfs {
  readonly mode: 'checkpoint' | 'tree';
  readonly loader: ChunkLoader;
  private readonly single: CheckpointView | undefined;
  private readonly views = new Map<number, CheckpointView>();
  private readonly readers = new Map<number, CheckpointReader>();
  private readonly handles = new Map<number, Handle>();
  private readonly damaged = new Set<string>();
  private readonly pinned = new Set<number>();
  /** Pinned, but found gone by the re-check: never served. */
  private readonly refused = new Set<number>();
  private pin: Pin | undefined;
  private nextFh = 1;
  private closed = false;
  private readonly mountTime = Date.now();
  private readonly fileMode: number;
  private readonly dirMode: number;
  private readonly uid: number;
  private readonly gid: number;

  private constructor(
    readonly repo: Repository,
    private readonly opts: VfsOptions,
  ) {
    this.loader = new ChunkLoader(repo.db, repo.packs, opts.cacheBytes ?? DEFAULT_CACHE_BYTES);
    this.fileMode = (opts.fileMode ?? 0o400) & 0o444;
    this.dirMode = this.fileMode | ((this.fileMode & 0o444) >> 2);
    this.uid = opts.uid ?? process.getuid?.() ?? 0;
    this.gid = opts.gid ?? process.getgid?.() ?? 0;
    this.mode = opts.ref === undefined ? 'tree' : 'checkpoint';
    if (opts.ref !== undefined) {
      const { vm, checkpoint } = resolveRef(repo.db, opts.ref);
      // Pin, then re-read: a forget that ran in between must not leave us serving a ghost.
      if (!this.pinCheckpoint(checkpoint.id)) {
        this.close();
        throw new BkfsError('NOT_FOUND', `checkpoint ${vm.name}@${checkpoint.name} was just removed`);
      }
      this.single = this.view(vm, checkpoint);
    }
  }

  /**
   * Open the view: checkpoint mode resolves `ref` (BkfsError NOT_FOUND / BAD_NAME) and pins it;
   * tree mode pins lazily. The repository stays the caller's (closed after `close()`).
   */
  static open(repo: Repository, opts: VfsOptions = {}): CheckpointVfs {
    return new CheckpointVfs(repo, opts);
  }

  /** The checkpoint served in checkpoint mode. */
  get checkpoint(): { vm: VmRow; checkpoint: CheckpointRow; disks: DiskRow[]; files: string[] } | undefined {
    const v = this.single;
    if (!v) return undefined;
    return { vm: v.vm, checkpoint: v.checkpoint, disks: v.disks, files: this.fileNames(v) };
  }

  /** Ids of the checkpoints pinned so far. */
  get pinnedIds(): number[] {
    return [...this.pinned].sort((a, b) => a - b);
  }

  get openHandles(): number {
    return this.handles.size;
  }

  // -------------------------------------------------------------------------------------------
  // Metadata

  getattr(path: string): NodeAttr {
    return this.attrOf(this.resolve(path));
  }

  readdir(path: string): DirEntry[] {
    const node = this.resolve(path);
    switch (node.kind) {
      case 'root':
        if (this.single) return this.checkpointEntries(this.single);
        return listVms(this.repo.db).map((vm) => ({ name: vm.name, attr: this.attrOf({ kind: 'vm', vm }) }));
      case 'vm': {
        const cps = listCheckpoints(this.repo.db, node.vm.id);
        const out: DirEntry[] = cps.map((cp) => ({
          name: cp.name,
          attr: this.dirAttr(cp.finished ?? cp.started),
        }));
        const last = cps[cps.length - 1];
        if (last)
          out.push({ name: 'latest', attr: this.attrOf({ kind: 'latest', vm: node.vm, target: last }) });
        return out;
      }
      case 'cpdir':
        this.pinOrGone(node.view, path);
        return this.checkpointEntries(node.view);
      default:
        throw new FsError('ENOTDIR', `${path} is not a directory`);
    }
  }

  readlink(path: string): string {
    const node = this.resolve(path);
    if (node.kind !== 'latest') throw new FsError('EINVAL', `${path} is not a symbolic link`);
    return node.target.name;
  }

  statfs(): { bsize: number; blocks: number; files: number; namemax: number } {
    const bytes = this.single ? this.single.disks.reduce((a, d) => a + d.virtual_size, 0) : 0;
    return { bsize: 4096, blocks: Math.ceil(bytes / 4096), files: this.handles.size, namemax: 255 };
  }

  // -------------------------------------------------------------------------------------------
  // Files

  /** Open a file for reading; returns a handle (> 0). Any write intent fails with EROFS. */
  open(path: string, flags: number): number {
    if ((flags & O_ACCMODE) !== fsConstants.O_RDONLY || (flags & WRITE_FLAGS) !== 0) {
      throw new FsError('EROFS', `${path}: the mount is read-only`);
    }
    const node = this.resolve(path);
    if (node.kind !== 'disk' && node.kind !== 'config') {
      if (node.kind === 'latest') throw new FsError('EINVAL', `${path} is a symbolic link`);
      throw new FsError('EISDIR', `${path} is a directory`);
    }
    this.pinOrGone(node.view, path);
    const h: Handle = { node };
    if (node.kind === 'disk') h.reader = this.readerFor(node.view);
    const fh = this.allocFh();
    this.handles.set(fh, h);
    return fh;
  }

  /**
   * Read into `target` (up to its length) at `offset`; resolves with the bytes read (short only
   * at the end of the file). Damaged data: FsError EIO.
   */
  async read(fh: number, offset: number, target: Buffer): Promise<number> {
    const h = this.handles.get(fh);
    if (!h) throw new FsError('EBADF', `no open file with handle ${fh}`);
    if (!Number.isSafeInteger(offset) || offset < 0) throw new FsError('EINVAL', `bad offset ${offset}`);
    const node = h.node;
    if (node.kind === 'config') {
      if (offset >= node.data.length) return 0;
      return node.data.copy(target, 0, offset, Math.min(node.data.length, offset + target.length));
    }
    const reader = h.reader!;
    try {
      return await reader.readInto(node.disk.name, offset, target, h); // read-ahead per open file
    } catch (e) {
      this.reportReadError(reader, node, offset, target.length, e);
      throw new FsError('EIO', errorMessage(e));
    }
  }

  release(fh: number): void {
    const h = this.handles.get(fh);
    if (h?.reader) h.reader.endStream(h);
    this.handles.delete(fh);
  }

  /** Drop every handle and release the pin. Idempotent; the repository is the caller's to close. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handles.clear();
    this.readers.clear();
    this.loader.clear();
    this.pin?.release();
  }

  // -------------------------------------------------------------------------------------------
  // Internals

  private allocFh(): number {
    for (;;) {
      const fh = this.nextFh;
      this.nextFh = this.nextFh >= 0x7fffffff ? 1 : this.nextFh + 1;
      if (!this.handles.has(fh)) return fh;
    }
  }

  private resolve(path: string): Node {
    if (this.closed) throw new FsError('EIO', 'the mount is shutting down');
    if (!path.startsWith('/')) throw new FsError('ENOENT', `${path}: not an absolute path`);
    const parts = path.split('/').filter((p) => p !== '');
    if (this.single) {
      if (parts.length === 0) return { kind: 'root' };
      if (parts.length === 1) return this.fileNode(this.single, parts[0]!, path);
      return this.throwBelow(this.fileNodeOrNull(this.single, parts[0]!), path);
    }
    if (parts.length === 0) return { kind: 'root' };
    const vm = this.lookupVm(parts[0]!, path);
    if (parts.length === 1) return { kind: 'vm', vm };
    const cpName = parts[1]!;
    if (cpName === 'latest') {
      const target = this.lookupCheckpoint(vm, undefined, path);
      if (parts.length === 2) return { kind: 'latest', vm, target };
      // The kernel follows the link itself; a direct path through it resolves the same way.
      return this.resolve(`/${vm.name}/${target.name}/${parts.slice(2).join('/')}`);
    }
    const cp = this.lookupCheckpoint(vm, cpName, path);
    const view = this.view(vm, cp);
    if (parts.length === 2) return { kind: 'cpdir', view };
    if (parts.length > 3) return this.throwBelow(this.fileNodeOrNull(view, parts[2]!), path);
    const file = this.fileNode(view, parts[2]!, path);
    this.pinOrGone(view, path); // its files are being looked up: keep it while mounted
    return file;
  }

  private throwBelow(parent: Node | null, path: string): never {
    if (parent) throw new FsError('ENOTDIR', `${path}: not a directory`);
    throw new FsError('ENOENT', `${path}: no such file`);
  }

  private lookupVm(name: string, path: string): VmRow {
    const vm = findVm(this.repo.db, name);
    if (!vm) throw new FsError('ENOENT', `${path}: no VM ${name}`);
    return vm;
  }

  /** A complete checkpoint by name (one indexed query), or the latest when `name` is undefined. */
  private lookupCheckpoint(vm: VmRow, name: string | undefined, path: string): CheckpointRow {
    try {
      return getCheckpoint(this.repo.db, vm, name);
    } catch (e) {
      if (isBkfsError(e, 'NOT_FOUND')) throw new FsError('ENOENT', `${path}: ${e.message}`);
      throw e;
    }
  }

  private fileNodeOrNull(view: CheckpointView, name: string): Node | null {
    if (name.endsWith(DISK_SUFFIX)) {
      const disk = view.disks.find((d) => d.name + DISK_SUFFIX === name);
      if (disk) return { kind: 'disk', view, disk };
    }
    const data = view.configs.get(name);
    if (data) return { kind: 'config', view, name, data };
    return null;
  }

  private fileNode(view: CheckpointView, name: string, path: string): Node {
    const n = this.fileNodeOrNull(view, name);
    if (!n) throw new FsError('ENOENT', `${path}: no such file`);
    return n;
  }

  private fileNames(view: CheckpointView): string[] {
    return [...view.disks.map((d) => d.name + DISK_SUFFIX), ...view.configs.keys()];
  }

  private checkpointEntries(view: CheckpointView): DirEntry[] {
    return this.fileNames(view).map((name) => ({
      name,
      attr: this.attrOf(this.fileNodeOrNull(view, name)!),
    }));
  }

  /** The (cached) contents of a checkpoint directory. */
  private view(vm: VmRow, checkpoint: CheckpointRow): CheckpointView {
    let v = this.views.get(checkpoint.id);
    if (v) return v;
    const disks = checkpointDisks(this.repo.db, checkpoint.id);
    const configs = new Map<string, Buffer>();
    const diskFiles = new Set(disks.map((d) => d.name + DISK_SUFFIX));
    for (const c of getConfigs(this.repo.db, checkpoint.id)) {
      // Config names are free text: make them one safe path component that no disk file uses.
      const name = c.name.replace(/[/\0]/g, '_');
      if (name === '' || name === '.' || name === '..' || diskFiles.has(name) || configs.has(name)) {
        this.opts.onNotice?.(`config '${c.name}' of ${vm.name}@${checkpoint.name} is not shown (name clash)`);
        continue;
      }
      configs.set(name, c.data);
    }
    v = { vm, checkpoint, disks, configs, mtime: checkpoint.finished ?? checkpoint.started };
    this.views.set(checkpoint.id, v);
    if (this.views.size > MAX_VIEWS) this.views.delete(this.views.keys().next().value as number);
    return v;
  }

  private readerFor(view: CheckpointView): CheckpointReader {
    const id = view.checkpoint.id;
    let r = this.readers.get(id);
    if (r) {
      this.readers.delete(id); // move to the end (most recently used)
      this.readers.set(id, r);
      return r;
    }
    r = new CheckpointReader(this.repo, view.vm, view.checkpoint, {
      loader: this.loader,
      ...(this.opts.readAheadBytes !== undefined ? { readAheadBytes: this.opts.readAheadBytes } : {}),
    });
    this.readers.set(id, r);
    // Handles hold their reader, so dropping the map's reference never breaks an open file.
    while (this.readers.size > MAX_IDLE_READERS) {
      const oldest = this.readers.keys().next().value as number;
      this.readers.delete(oldest);
    }
    return r;
  }

  /**
   * Pin a checkpoint (once), then check that it is still complete: a forget commits `forgotten`
   * before it reads the pins, so either it saw this pin and keeps the rows while we are mounted,
   * or this check sees the checkpoint gone (FORMAT.md, "Pins"). False: gone, do not serve it.
   */
  private pinCheckpoint(id: number): boolean {
    if (this.refused.has(id)) return false;
    if (this.pinned.has(id)) return true;
    this.pinned.add(id);
    try {
      if (this.pin) this.pin.add(id);
      else this.pin = pinCheckpoints(this.repo, [id]);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EROFS' && code !== 'EACCES' && code !== 'EPERM') {
        // Unpinned, a forget could delete its rows while we serve it: refuse instead.
        this.pinned.delete(id);
        this.opts.onNotice?.(`cannot pin checkpoint ${id}, not serving it: ${errorMessage(e)}`);
        return false;
      }
      // A repository we may not write (read-only media, another user's) cannot take pins.
      this.opts.onNotice?.(
        `cannot pin checkpoint ${id} (forget/gc will not see this mount): ${errorMessage(e)}`,
      );
    }
    if (checkpointById(this.repo.db, id)?.state !== 'complete') {
      this.refused.add(id);
      return false;
    }
    return true;
  }

  /** Tree mode: pin the checkpoint of `view` before serving anything of it; ENOENT if it went. */
  private pinOrGone(view: CheckpointView, path: string): void {
    if (this.pinCheckpoint(view.checkpoint.id)) return;
    this.views.delete(view.checkpoint.id);
    this.readers.delete(view.checkpoint.id);
    throw new FsError(
      'ENOENT',
      `${path}: checkpoint ${view.vm.name}@${view.checkpoint.name} was just removed`,
    );
  }

  private dirAttr(mtime: number): NodeAttr {
    return {
      kind: 'dir',
      mode: S_IFDIR | this.dirMode,
      size: 4096,
      mtime,
      nlink: 2,
      uid: this.uid,
      gid: this.gid,
    };
  }

  private fileAttr(size: number, mtime: number): NodeAttr {
    return {
      kind: 'file',
      mode: S_IFREG | this.fileMode,
      size,
      mtime,
      nlink: 1,
      uid: this.uid,
      gid: this.gid,
    };
  }

  private attrOf(node: Node): NodeAttr {
    switch (node.kind) {
      case 'root':
        return this.dirAttr(this.single ? this.single.mtime : this.mountTime);
      case 'vm':
        return this.dirAttr(node.vm.created);
      case 'latest':
        return {
          kind: 'symlink',
          mode: S_IFLNK | 0o777,
          size: Buffer.byteLength(node.target.name),
          mtime: node.target.finished ?? node.target.started,
          nlink: 1,
          uid: this.uid,
          gid: this.gid,
        };
      case 'cpdir':
        return this.dirAttr(node.view.mtime);
      case 'disk':
        return this.fileAttr(node.disk.virtual_size, node.view.mtime);
      case 'config':
        return this.fileAttr(node.data.length, node.view.mtime);
    }
  }

  /** Tell `onDamage` (once per damaged chunk and disk) which disk bytes a failed read touched. */
  private reportReadError(
    reader: CheckpointReader,
    node: { view: CheckpointView; disk: DiskRow },
    offset: number,
    length: number,
    e: unknown,
  ): void {
    const { view, disk } = node;
    const chunkId = isBkfsError(e, 'DATA_DAMAGED') ? (e.data?.chunkId as number | undefined) : undefined;
    if (!isBkfsError(e, 'DATA_DAMAGED')) {
      this.opts.onNotice?.(
        `read of ${view.vm.name}@${view.checkpoint.name} ${disk.name} bytes ${offset}+${length} failed: ${errorMessage(e)}`,
      );
      return;
    }
    const key = `${disk.id}:${chunkId ?? errorMessage(e)}`;
    if (this.damaged.has(key)) return;
    this.damaged.add(key);
    let start = offset;
    let end = Math.min(offset + length, disk.virtual_size);
    const data = isBkfsError(e, 'DATA_DAMAGED') ? e.data : undefined;
    if (typeof data?.start === 'number' && typeof data.end === 'number') {
      // Block-map damage: the error names the disk range itself.
      start = data.start;
      end = data.end;
    } else if (chunkId !== undefined) {
      // The disk range that chunk serves, from the map pages this read touched.
      const span = this.repo.config.pageSpan;
      let lo = Infinity;
      let hi = -Infinity;
      try {
        for (let p = Math.floor(offset / span); p <= Math.floor((end - 1) / span); p++) {
          for (const x of reader.page(disk, p)) {
            if (x.loc?.id === chunkId) {
              lo = Math.min(lo, x.offset);
              hi = Math.max(hi, x.offset + x.length);
            }
          }
        }
      } catch {
        // a page that fails its own check: report the read's range
      }
      if (lo < hi) {
        start = lo;
        end = hi;
      }
    }
    this.opts.onDamage?.({
      vm: view.vm.name,
      checkpoint: view.checkpoint.name,
      disk: disk.name,
      offset: start,
      length: end - start,
      readOffset: offset,
      readLength: length,
      message: errorMessage(e),
    });
  }
}

/** Map any error from the VFS to a positive errno (unexpected ones become EIO). */
export function errnoOf(e: unknown): number {
  if (e instanceof FsError) return e.errno;
  if (isBkfsError(e, 'NOT_FOUND') || isBkfsError(e, 'BAD_NAME')) return osConstants.errno.ENOENT;
  return osConstants.errno.EIO;
}
