/**
 * Backup sources for libvirt domains (the `BackupSource` interface of `sources.ts`).
 *
 * - PullSource: one disk of a running pull-mode backup job. libvirt's NBD server (inside QEMU)
 *   exports the disk's content at the instant of `backup-begin` under the disk's target name, and
 *   for an incremental job the changes since the job's `<incremental>` checkpoint as the meta
 *   context `qemu:dirty-bitmap:<exportbitmap>` (`backup-<target>` on libvirt 9; bkfs reads the
 *   name from `virsh backup-dumpxml`). Change tracking for the new checkpoint was started
 *   atomically by `backup-begin` (the libvirt checkpoint), so `prepare` only reports its name;
 *   the job, the checkpoint and their cleanup belong to the orchestrator in `libvirt.ts`.
 * - OfflineImageSource: a disk image of a shut-off domain, read through `ImageSource` (read-only
 *   `qemu-nbd`, with the format the domain XML declares) but without bkfs's own qcow2 bitmaps: those would be invisible to libvirt, which
 *   owns change tracking for its domains. So an offline backup is a full or copy only.
 *
 * Memory: one NBD connection per open disk (the engine opens disks one at a time). No locking:
 * QEMU owns the running disk; an offline image is protected by QEMU's image lock (taken by
 * `qemu-img info` and `qemu-nbd`), so a domain started meanwhile fails to start or bkfs fails.
 */
import { BkfsError } from '../errors';
import { NbdClient, type NbdTarget } from '../nbd/client';
import type { NbdTls } from '../nbd/uri';
import { declaredFormat, ImageSource, type BackupSource, type OpenSource, type SourceProbe } from './sources';

const ALLOC = 'base:allocation';

export interface PullDisk {
  /** Unix socket of the job's NBD server (unless `tcp`). */
  socket: string;
  /** The job's NBD server over TCP (with TLS when `tls` is set), instead of `socket`. */
  tcp?: { host: string; port: number; tls?: NbdTls };
  /** Disk target (`sda`), for messages. */
  target: string;
  exportName: string;
  /** Exported dirty bitmap of an incremental job, or null (full job). */
  exportBitmap: string | null;
  /** The job's `<incremental>` checkpoint, or null. */
  incremental: string | null;
  /** The libvirt checkpoint created with the job that tracks this disk, or null. */
  newCheckpoint: string | null;
  /** What `disks.source` records: the disk's image path (or network name). */
  location: string;
  /** Driver format of the disk in the domain (qcow2, raw). */
  format: string;
}

export class PullSource implements BackupSource {
  readonly location: string;

  constructor(private readonly d: PullDisk) {
    this.location = d.location;
  }

  private get nbd(): NbdTarget {
    const t = this.d.tcp;
    if (!t) return { socket: this.d.socket, exportName: this.d.exportName };
    return { host: t.host, port: t.port, exportName: this.d.exportName, ...(t.tls ? { tls: t.tls } : {}) };
  }

  async probe(): Promise<SourceProbe> {
    const c = await NbdClient.connect(this.nbd);
    try {
      return { size: c.size, format: this.d.format };
    } finally {
      await c.close();
    }
  }

  async dirtyBitmapFor(recorded: string | null): Promise<string> {
    if (this.d.incremental === null || this.d.exportBitmap === null) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `the libvirt backup job exports no dirty bitmap for disk '${this.d.target}': use --level full`,
      );
    }
    if (recorded !== this.d.incremental) {
      throw new BkfsError(
        'CHAIN_BROKEN',
        `disk '${this.d.target}' of the parent checkpoint recorded bitmap '${recorded ?? 'none'}', not libvirt checkpoint '${this.d.incremental}': use --level full`,
      );
    }
    return this.d.exportBitmap;
  }

  async prepare(): Promise<string | null> {
    return this.d.newCheckpoint;
  }

  async open(dirtyBitmap: string | null): Promise<OpenSource> {
    const dirtyContext = dirtyBitmap ? `qemu:dirty-bitmap:${dirtyBitmap}` : null;
    const client = await NbdClient.connect(this.nbd, {
      metaContexts: dirtyContext ? [ALLOC, dirtyContext] : [ALLOC],
    });
    return { client, dirtyContext, close: () => client.close() };
  }

  async rollback(): Promise<void> {}
  async afterCommit(): Promise<void> {}
}

export class OfflineImageSource implements BackupSource {
  private readonly image: ImageSource;

  /**
   * `format`: the disk's driver type in the domain XML. libvirt does not probe formats (a disk
   * without a driver type is raw), and neither does bkfs: a guest of a raw disk can write a qcow2
   * header naming a host file as backing file into it.
   */
  constructor(
    readonly location: string,
    private readonly domain: string,
    format: string | null,
  ) {
    this.image = new ImageSource(location, declaredFormat(format ?? 'raw'));
  }

  probe(): Promise<SourceProbe> {
    return this.image.probe();
  }

  async dirtyBitmapFor(): Promise<string> {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `domain '${this.domain}' is shut off: an incremental needs the running domain; start it, or back up the images with --disk NAME=IMAGE`,
    );
  }

  async prepare(): Promise<string | null> {
    return null;
  }

  open(): Promise<OpenSource> {
    return this.image.open(null);
  }

  async rollback(): Promise<void> {}
  async afterCommit(): Promise<void> {}
}
