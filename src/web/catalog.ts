/**
 * What the web API shows of the catalogue: VMs with their latest checkpoint, and checkpoints with
 * their sizes (the same fields as `bkfs list --json`, plus the data bytes each one holds). Reads
 * the index only.
 */
import {
  checkpointById,
  checkpointDisks,
  getConfigs,
  listCheckpoints,
  listVms,
  type CheckpointRow,
} from '../index/catalog';
import type { Repository } from '../repo/repository';

export interface CheckpointView {
  vm: string;
  name: string;
  level: string;
  parent: string | null;
  time: number;
  durationMs: number;
  disks: {
    name: string;
    virtualSize: number;
    bytesRead: number;
    source: string | null;
    format: string | null;
    bitmap: string | null;
  }[];
  virtualSize: number;
  bytesRead: number;
  bytesNewRaw: number;
  bytesNewStored: number;
  chunksNew: number;
  logicalBytes: number;
  libvirtCheckpoint: string | null;
  protected: boolean;
  damaged: boolean;
}

export interface VmView {
  name: string;
  checkpoints: number;
  latest: { name: string; time: number; level: string } | null;
  virtualSize: number;
  storedBytes: number;
  protected: number;
  damaged: number;
}

/** Bytes of data (not zeros or holes) in the block maps of a checkpoint's disks. */
export function logicalBytes(repo: Repository, cpId: number): number {
  const r = repo.db
    .prepare(
      `SELECT COALESCE(SUM(e.length), 0) AS n FROM disks d JOIN disk_pages dp ON dp.disk_id = d.id
         JOIN extents e ON e.page_id = dp.page_id WHERE d.checkpoint_id = ? AND e.chunk_id IS NOT NULL`,
    )
    .get(cpId) as { n: number };
  return r.n;
}

export function checkpointView(repo: Repository, vm: string, cp: CheckpointRow): CheckpointView {
  const disks = checkpointDisks(repo.db, cp.id);
  const parent = cp.parent_id !== null ? checkpointById(repo.db, cp.parent_id) : undefined;
  return {
    vm,
    name: cp.name,
    level: cp.level,
    parent: parent?.name ?? null,
    time: cp.started,
    durationMs: (cp.finished ?? cp.started) - cp.started,
    disks: disks.map((d) => ({
      name: d.name,
      virtualSize: d.virtual_size,
      bytesRead: d.bytes_read,
      source: d.source,
      format: d.format,
      bitmap: d.bitmap,
    })),
    virtualSize: disks.reduce((a, d) => a + d.virtual_size, 0),
    bytesRead: cp.bytes_read,
    bytesNewRaw: cp.bytes_new_raw,
    bytesNewStored: cp.bytes_new_stored,
    chunksNew: cp.chunks_new,
    logicalBytes: logicalBytes(repo, cp.id),
    libvirtCheckpoint: cp.libvirt_checkpoint,
    protected: cp.protected === 1,
    damaged: cp.damaged === 1,
  };
}

export function configsOf(repo: Repository, cp: CheckpointRow): { name: string; size: number }[] {
  return getConfigs(repo.db, cp.id).map((c) => ({ name: c.name, size: c.data.length }));
}

export function vmViews(repo: Repository): VmView[] {
  return listVms(repo.db).map((vm) => {
    const cps = listCheckpoints(repo.db, vm.id);
    const last = cps[cps.length - 1];
    const virtualSize = last ? checkpointDisks(repo.db, last.id).reduce((a, d) => a + d.virtual_size, 0) : 0;
    return {
      name: vm.name,
      checkpoints: cps.length,
      latest: last ? { name: last.name, time: last.started, level: last.level } : null,
      virtualSize,
      storedBytes: cps.reduce((a, c) => a + c.bytes_new_stored, 0),
      protected: cps.filter((c) => c.protected === 1).length,
      damaged: cps.filter((c) => c.damaged === 1).length,
    };
  });
}
