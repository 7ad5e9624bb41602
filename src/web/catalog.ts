/**
 * What the web API shows of the catalogue: VMs with their latest checkpoint, and checkpoints with
 * their sizes (the same fields as `bkfs list --json`, plus the data bytes each one holds). Reads
 * the index only.
 */
import {
  checkpointDisks,
  describeCheckpoint,
  getConfigs,
  listCheckpoints,
  listVms,
  type CheckpointRow,
  type CheckpointSummary,
} from '../index/catalog';
import type { Repository } from '../repo/repository';

/** `bkfs list --json`'s fields (time in ms), plus the data bytes the checkpoint's block maps hold. */
export interface CheckpointView extends CheckpointSummary {
  logicalBytes: number;
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
  return { ...describeCheckpoint(repo.db, vm, cp), logicalBytes: logicalBytes(repo, cp.id) };
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
