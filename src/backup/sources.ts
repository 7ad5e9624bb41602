/**
 * Backup sources: where a disk's bytes and its dirty map come from.
 *
 * Every source ends up as an NBD export read by bkfs's own client, so the engine has one read path:
 *   - ImageSource: a qcow2 or raw file. bkfs starts `qemu-nbd --read-only` itself and, for qcow2,
 *     manages persistent dirty bitmaps as virtnbdbackup does for offline VMs: each checkpoint adds
 *     an enabled bitmap `bkfs-<checkpoint uid>` *before* its data is read (so a write that
 *     lands after the read is never missed), an incremental reads the bitmap of its base
 *     checkpoint through `qemu-nbd -B`, a differential the bitmap of its chain's full, and a new
 *     full removes the older bitmaps this repository recorded once it is committed. Bitmaps are
 *     never reset: each holds every write since its checkpoint, so bitmaps of other repositories
 *     (a `cp -a` copy backing up the same image makes its own, under its own uids) do not matter;
 *     what does is that the recorded bitmap is ours (named after the parent's uid), present,
 *     consistent, and not re-created after a newer bitmap of ours (the image's bitmap directory
 *     keeps creation order: a bitmap removed and added again moves to its end).
 *   - NbdUriSource: any NBD export given by URI; the caller may name a dirty bitmap meta context
 *     (`--bitmap NAME` -> `qemu:dirty-bitmap:NAME`) that holds the changes since the base.
 * The live libvirt source (pull-mode backup) implements the same interface.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { NbdClient, parseNbdUri } from '../nbd/client';
import {
  bitmapAdd,
  bitmapRemove,
  DECLARABLE_FORMATS,
  imageInfo,
  QemuNbd,
  type DeclaredFormat,
  type ImageInfo,
} from './qemu';

export interface SourceProbe {
  size: number;
  format: string;
  /** Things the user should know about this source (reported once, as notices). */
  notes?: string[];
}

const MiB = 1 << 20;

/**
 * A note when a regular file taken as a raw disk does not look like a disk: its size is not a
 * whole number of 512-byte sectors, or under 1 MiB (a configuration file given by mistake, say).
 * Null when it looks like one. Block devices are always disks.
 */
export function rawSourceNote(file: string, fileSize: number): string | null {
  const odd = fileSize % 512 !== 0;
  if (!odd && fileSize >= MiB) return null;
  const why = odd ? `is ${fileSize} bytes, not a multiple of 512` : `is only ${fileSize} bytes`;
  return `${file} ${why}: is it really a disk image? It is backed up as a raw disk${odd ? ' (padded with zeros to whole sectors)' : ''}`;
}

export interface OpenSource {
  client: NbdClient;
  /** Negotiated meta context holding the dirty map, when one was asked for. */
  dirtyContext: string | null;
  close(): Promise<void>;
}

/** What the repository knows of its own bitmaps, to judge the one an inc/diff would read. */
export interface BitmapHistory {
  /** The name the parent's bitmap must have: `bitmapName(parent uid)`. */
  expected: string;
  /** Every bitmap the repository recorded for the VM, oldest checkpoint first. */
  known: readonly string[];
  /** Prefix of bitmaps named by bkfs 0.1 (`bkfs-<repo id>-`): shared by copies, never trusted. */
  legacyPrefix: string;
}

export interface BackupSource {
  readonly location: string;
  probe(): Promise<SourceProbe>;
  /**
   * Optional: start what `probe()` will need now (a child process), so that it runs while the
   * caller loads modules and opens the repository; the next `probe()` takes that answer.
   */
  startProbe?(): void;
  /**
   * The dirty bitmap to read for changes since a checkpoint that recorded `recorded`; throws
   * CHAIN_BROKEN when those changes cannot be read.
   */
  dirtyBitmapFor(recorded: string | null, history: BitmapHistory): Promise<string>;
  /** Before reading: start tracking changes for the new checkpoint. Returns the bitmap to record. */
  prepare(newBitmap: string | null): Promise<string | null>;
  open(dirtyBitmap: string | null): Promise<OpenSource>;
  /** Undo `prepare` after a failed backup (best effort). */
  rollback(): Promise<void>;
  /** After the checkpoint committed: drop tracking that no longer serves a chain. */
  afterCommit(keep: ReadonlySet<string>, history: BitmapHistory, newChain: boolean): Promise<void>;
}

const ALLOC = 'base:allocation';

export class ImageSource implements BackupSource {
  private info: ImageInfo | undefined;
  private added: string | null = null;
  private noted = false;

  readonly location: string;

  /**
   * `image` relative to the working directory is recorded absolute (`verify --source` from
   * elsewhere). `declared`: the format the user or the domain XML states; undefined: probed (see
   * imageInfo).
   */
  constructor(
    image: string,
    readonly declared?: DeclaredFormat,
  ) {
    this.location = path.resolve(image);
  }

  /** `qemu-img info` started by `startProbe()`, taken by the next `probe()`. */
  private early: Promise<ImageInfo> | undefined;

  startProbe(): void {
    if (this.early) return;
    this.early = imageInfo(this.location, this.declared);
    this.early.catch(() => undefined); // reported by probe(), or dropped if it never runs
  }

  async probe(): Promise<SourceProbe> {
    const early = this.early;
    this.early = undefined;
    this.info = await (early ?? imageInfo(this.location, this.declared));
    if (this.info.format !== 'qcow2' && this.info.format !== 'raw') {
      throw new BkfsError(
        'SOURCE_FORMAT',
        `${this.location} is a ${this.info.format} image; bkfs backs up qcow2 and raw images (convert it with qemu-img)`,
      );
    }
    const notes: string[] = [];
    if (this.info.format === 'raw' && !this.noted) {
      this.noted = true;
      const st = fs.statSync(this.location);
      const note = st.isFile() ? rawSourceNote(this.location, st.size) : null;
      if (note) notes.push(note);
    }
    return { size: this.info.virtualSize, format: this.info.format, notes };
  }

  private get infoOrThrow(): ImageInfo {
    if (!this.info) throw new Error('probe() first');
    return this.info;
  }

  async dirtyBitmapFor(bitmap: string | null, history: BitmapHistory): Promise<string> {
    const info = this.infoOrThrow;
    if (info.format !== 'qcow2') {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `${this.location} is a raw image, which has no dirty bitmaps: use --level full (unchanged data is deduplicated)`,
      );
    }
    if (!bitmap) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `the previous checkpoint of ${this.location} recorded no bitmap: use --level full`,
      );
    }
    if (bitmap.startsWith(history.legacyPrefix) || bitmap !== history.expected) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        bitmap.startsWith(history.legacyPrefix)
          ? `bitmap '${bitmap}' of ${this.location} was named by an older bkfs after the repository id, which every copy of the repository shares, so a copy may have re-created it: use --level full`
          : `bitmap '${bitmap}' recorded for ${this.location} is not named after its checkpoint (expected '${history.expected}'): use --level full`,
      );
    }
    const bm = info.bitmaps.find((b) => b.name === bitmap);
    if (!bm) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `bitmap '${bitmap}' is missing from ${this.location} (removed, or the image was replaced): use --level full`,
      );
    }
    if (bm.flags.includes('in-use')) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `bitmap '${bitmap}' in ${this.location} is inconsistent (a QEMU process using it was killed): use --level full`,
      );
    }
    // Our bitmaps keep the order in which we made them; one that comes after a newer one of ours
    // was removed and made again (empty at that time) by someone else.
    const pos = (n: string) => info.bitmaps.findIndex((b) => b.name === n);
    const mine = pos(bitmap);
    const newer = history.known.slice(history.known.indexOf(bitmap) + 1).find((n) => {
      const p = pos(n);
      return p >= 0 && p < mine;
    });
    if (history.known.includes(bitmap) && newer !== undefined) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `bitmap '${bitmap}' in ${this.location} was created again after the newer '${newer}' (by another program or a copy of the repository), so it may miss writes: use --level full`,
      );
    }
    return bitmap;
  }

  async prepare(newBitmap: string | null): Promise<string | null> {
    const info = this.infoOrThrow;
    if (!newBitmap || info.format !== 'qcow2') return null;
    if (info.bitmaps.some((b) => b.name === newBitmap)) {
      // Left by a backup that crashed before committing: it is ours and belongs to no checkpoint.
      await bitmapRemove(this.location, newBitmap);
    }
    await bitmapAdd(this.location, newBitmap);
    this.added = newBitmap;
    return newBitmap;
  }

  async open(dirtyBitmap: string | null): Promise<OpenSource> {
    const info = this.infoOrThrow;
    const srv = await QemuNbd.start({
      image: this.location,
      format: info.format,
      readOnly: true,
      cache: 'writeback',
      ...(dirtyBitmap ? { bitmap: dirtyBitmap } : {}),
    });
    const dirtyContext = dirtyBitmap ? `qemu:dirty-bitmap:${dirtyBitmap}` : null;
    try {
      const client = await NbdClient.connect(
        { socket: srv.socket },
        { metaContexts: dirtyContext ? [ALLOC, dirtyContext] : [ALLOC] },
      );
      if (dirtyContext && !client.hasMetaContext(dirtyContext)) {
        await client.close();
        throw new BkfsError(
          'CHAIN_BROKEN',
          `qemu-nbd did not export bitmap '${dirtyBitmap}' of ${this.location}`,
        );
      }
      return {
        client,
        dirtyContext,
        close: async () => {
          await client.close().catch(() => undefined);
          await srv.stop();
        },
      };
    } catch (e) {
      await srv.stop();
      throw e;
    }
  }

  async rollback(): Promise<void> {
    if (this.added) {
      await bitmapRemove(this.location, this.added).catch(() => undefined);
      this.added = null;
    }
  }

  async afterCommit(keep: ReadonlySet<string>, history: BitmapHistory, newChain: boolean): Promise<void> {
    const info = this.infoOrThrow;
    if (!newChain || info.format !== 'qcow2') return;
    // The bitmaps as probe() listed them: since then this backup only added the one in `keep`, and
    // no other bkfs backed up this VM (refused while this one runs), so no second `qemu-img info`
    // (a child process on every full backup's path). Only bitmaps this repository recorded (or
    // named the old way): never a copy's own bitmaps, which its chain still needs.
    const ours = new Set(history.known);
    for (const b of info.bitmaps) {
      if ((ours.has(b.name) || b.name.startsWith(history.legacyPrefix)) && !keep.has(b.name)) {
        await bitmapRemove(this.location, b.name);
      }
    }
  }
}

export class NbdUriSource implements BackupSource {
  constructor(
    readonly location: string,
    private readonly bitmap: string | null,
  ) {
    parseNbdUri(location); // validate early
  }

  async probe(): Promise<SourceProbe> {
    const c = await NbdClient.connect(this.location);
    try {
      return { size: c.size, format: 'nbd' };
    } finally {
      await c.close();
    }
  }

  async dirtyBitmapFor(): Promise<string> {
    if (!this.bitmap) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `an incremental from ${this.location} needs --bitmap NAME (a dirty bitmap exported by the server): use --level full`,
      );
    }
    const ctx = `qemu:dirty-bitmap:${this.bitmap}`;
    const c = await NbdClient.connect(this.location, { metaContexts: [ctx] });
    try {
      if (!c.hasMetaContext(ctx)) {
        throw new BkfsError(
          'CHAIN_BROKEN',
          `${this.location} does not export dirty bitmap '${this.bitmap}': use --level full`,
        );
      }
      return this.bitmap;
    } finally {
      await c.close();
    }
  }

  async prepare(): Promise<string | null> {
    return null;
  }

  async open(dirtyBitmap: string | null): Promise<OpenSource> {
    const dirtyContext = dirtyBitmap ? `qemu:dirty-bitmap:${dirtyBitmap}` : null;
    const client = await NbdClient.connect(this.location, {
      metaContexts: dirtyContext ? [ALLOC, dirtyContext] : [ALLOC],
    });
    return { client, dirtyContext, close: () => client.close() };
  }

  async rollback(): Promise<void> {}
  async afterCommit(): Promise<void> {}
}

/**
 * `SOURCE` of `--disk NAME=SOURCE`: an NBD URI, or an image path with an optional declared format
 * (`raw:PATH`, `qcow2:PATH`); `format` (`--format`) declares it for paths without a prefix.
 */
export function sourceFor(spec: string, bitmap: string | null, format?: string): BackupSource {
  if (/^nbds?(\+unix)?:\/\//.test(spec)) {
    if (format !== undefined) {
      throw new BkfsError('USAGE', `--format applies to image files, not to NBD URI ${spec}`);
    }
    return new NbdUriSource(spec, bitmap);
  }
  const m = /^([a-z0-9]+):(.+)$/.exec(spec);
  if (m && (DECLARABLE_FORMATS as readonly string[]).includes(m[1] as string)) {
    return new ImageSource(m[2] as string, m[1] as DeclaredFormat);
  }
  if (format !== undefined) return new ImageSource(spec, declaredFormat(format));
  return new ImageSource(spec);
}

/** Check a format named by the user or a domain XML. */
export function declaredFormat(format: string): DeclaredFormat {
  if (!(DECLARABLE_FORMATS as readonly string[]).includes(format)) {
    throw new BkfsError(
      'SOURCE_FORMAT',
      `format '${format}' is not one bkfs reads (${DECLARABLE_FORMATS.join(', ')}): convert the image with qemu-img`,
    );
  }
  return format as DeclaredFormat;
}
