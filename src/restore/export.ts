/**
 * Export of a checkpoint as a qcow2 backing chain (`bkfs export VM@CP --format qcow2-chain`).
 *
 * Layout: `DIR/<disk>/<checkpoint>.qcow2` for every checkpoint on the path from the chain's full to
 * CP (following `base_id`, the map predecessor), each created with `qemu-img create -f qcow2
 * -b <previous>.qcow2 -F qcow2` (a relative name: the directory can be moved), plus the saved
 * configuration files and a rewritten `DIR/domain.xml` pointing at the top layers. `qemu-img
 * convert DIR/<disk>/<CP>.qcow2` reads the disk as of CP.
 *
 * Each layer holds only that checkpoint's own extents (map extents whose `origin` is that
 * checkpoint-disk), zero extents included (written as WRITE_ZEROES, i.e. qcow2 zero clusters, so
 * they hide the backing file). The bottom layer holds its checkpoint's complete map — for an intact
 * chain that is the full, whose extents are all its own; if a checkpoint on the path was forgotten,
 * the chain simply starts at the oldest one still there. Layers are written bottom-up through a
 * private writable qemu-nbd each, as `<cp>.qcow2.bkfs-partial`, and renamed into place when
 * complete, so an upper layer is only ever created on a finished backing file.
 *
 * Reads go through `CheckpointReader` (hash-checked chunks, shared cache); the checkpoints used
 * are pinned while the export runs. Memory as for restore (engine.ts). Never prints.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { makeDirs } from '../util/userpath';
import type { Repository } from '../repo/repository';
import { pinCheckpoints } from '../repo/pins';
import { CheckpointReader } from '../chain/reader';
import { ChunkLoader } from '../store/chunk-cache';
import {
  checkpointById,
  checkpointDisks,
  resolveRef,
  type CheckpointRow,
  type DiskRow,
} from '../index/catalog';
import { planRuns } from './plan';
import { createQcow2 } from './targets';
import {
  copyRuns,
  dataBytes,
  planConfigs,
  writeConfigFiles,
  stillThere,
  type CopyTuning,
  type RestoreProgress,
} from './engine';
import type { DiskRewrite } from './domain-xml';

export interface ExportOptions extends CopyTuning {
  ref: string;
  to: string;
  format: 'qcow2-chain';
  /** Export one disk only. */
  disk?: string;
  force?: boolean;
  onProgress?: (p: RestoreProgress) => void;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
}

export interface ExportLayer {
  checkpoint: string;
  file: string;
  /** Backing file name as written into the image (relative), or null for the bottom layer. */
  backing: string | null;
  bytesWritten: number;
  bytesZeroed: number;
}

export interface ExportResult {
  vm: string;
  checkpoint: string;
  dir: string;
  disks: { disk: string; virtualSize: number; top: string; layers: ExportLayer[] }[];
  configs: string[];
  domainXml: string | null;
  durationMs: number;
}

/** Checkpoints from the oldest available map predecessor (normally the chain's full) up to `cp`. */
export function chainPath(repo: Repository, cp: CheckpointRow): CheckpointRow[] {
  const out = [cp];
  const seen = new Set([cp.id]);
  let cur = cp;
  while (cur.base_id !== null) {
    const b = checkpointById(repo.db, cur.base_id);
    if (!b || b.state !== 'complete' || seen.has(b.id)) break;
    out.unshift(b);
    seen.add(b.id);
    cur = b;
  }
  return out;
}

interface LayerPlan {
  cp: CheckpointRow;
  disk: DiskRow;
  file: string;
  backing: string | null;
  /** Bottom layer: the complete map; others: own extents only. */
  complete: boolean;
}

export async function runExport(repo: Repository, o: ExportOptions): Promise<ExportResult> {
  const t0 = Date.now();
  if (o.format !== 'qcow2-chain') {
    throw new BkfsError('USAGE', `export --format must be qcow2-chain, got '${String(o.format)}'`);
  }
  const { vm, checkpoint } = resolveRef(repo.db, o.ref);
  const loader = new ChunkLoader(repo.db, repo.packs, o.cacheBytes ?? 64 << 20);
  const top = new CheckpointReader(repo, vm, checkpoint, { loader, readAheadBytes: 0 });
  const disks = o.disk !== undefined ? [top.disk(o.disk)] : top.disks;
  const pathCps = chainPath(repo, checkpoint);

  const plans = planLayers(repo, disks, pathCps, o.to);
  const diskMap: Record<string, DiskRewrite> = {};
  for (const [name, layers] of plans) {
    diskMap[name] = { path: path.resolve(layers[layers.length - 1]!.file), format: 'qcow2' };
  }
  const cfg = o.disk === undefined ? planConfigs(o.to, top.configs(), diskMap, undefined) : null;

  checkTargets(o, plans, cfg);
  // One level at a time, coded errors naming the user's path (makeDirs; 0700 like mkdirPrivate).
  for (const name of plans.keys()) makeDirs(path.join(o.to, name), 'export target');

  const pin = pinCheckpoints(
    repo,
    pathCps.map((c) => c.id),
  );
  const progress = { done: 0, total: 0 };
  for (const layers of plans.values()) {
    for (const l of layers) progress.total += dataBytes(repo, l.disk.id, l.complete ? undefined : l.disk.id);
  }
  const out: ExportResult['disks'] = [];
  const partial: { path?: string } = {};
  try {
    stillThere(repo, pathCps, vm.name);
    for (const [name, layers] of plans) {
      const done: ExportLayer[] = [];
      for (const l of layers) {
        if (o.signal?.aborted) throw new BkfsError('INTERRUPTED', 'export interrupted');
        done.push(
          await exportLayer(
            new CheckpointReader(repo, vm, l.cp, { loader, readAheadBytes: 0 }),
            name,
            l,
            o,
            progress,
            partial,
          ),
        );
      }
      out.push({
        disk: name,
        virtualSize: layers[layers.length - 1]!.disk.virtual_size,
        top: layers[layers.length - 1]!.file,
        layers: done,
      });
    }
    if (cfg) {
      for (const n of cfg.notes) o.onNotice?.(n);
      await writeConfigFiles(cfg.files);
    }
  } catch (e) {
    if (partial.path !== undefined && fs.existsSync(partial.path) && e instanceof BkfsError) {
      throw new BkfsError(e.code, `${e.message} (partial layer left in ${partial.path})`, e.data);
    }
    throw e;
  } finally {
    pin.release();
  }
  return {
    vm: vm.name,
    checkpoint: checkpoint.name,
    dir: o.to,
    disks: out,
    configs: cfg ? [...cfg.files.keys()] : [],
    domainXml: cfg?.domainXml ?? null,
    durationMs: Date.now() - t0,
  };
}

/**
 * The layers of each disk, bottom first: walking down from the checkpoint while the disk is there
 * with the same size, the lowest found is the complete bottom layer; each names the one below.
 */
function planLayers(
  repo: Repository,
  disks: readonly DiskRow[],
  pathCps: CheckpointRow[],
  to: string,
): Map<string, LayerPlan[]> {
  const plans = new Map<string, LayerPlan[]>();
  for (const d of disks) {
    const layers: { cp: CheckpointRow; disk: DiskRow }[] = [];
    for (let i = pathCps.length - 1; i >= 0; i--) {
      const cp = pathCps[i]!;
      const row = checkpointDisks(repo.db, cp.id).find((x) => x.name === d.name);
      if (!row || row.virtual_size !== d.virtual_size) break;
      layers.unshift({ cp, disk: row });
    }
    const diskDir = path.join(to, d.name);
    plans.set(
      d.name,
      layers.map((l, i) => ({
        cp: l.cp,
        disk: l.disk,
        file: path.join(diskDir, `${l.cp.name}.qcow2`),
        backing: i === 0 ? null : `${layers[i - 1]!.cp.name}.qcow2`,
        complete: i === 0,
      })),
    );
  }
  return plans;
}

/** Every target checked before anything is written: a directory, and no file there unless --force. */
function checkTargets(
  o: ExportOptions,
  plans: Map<string, LayerPlan[]>,
  cfg: { files: Map<string, unknown> } | null,
): void {
  if (fs.existsSync(o.to) && !fs.statSync(o.to).isDirectory()) {
    throw new BkfsError('TARGET_INVALID', `${o.to} exists and is not a directory`);
  }
  if (!o.force) {
    const files = [...[...plans.values()].flat().map((l) => l.file), ...(cfg ? cfg.files.keys() : [])];
    for (const f of files) {
      if (fs.existsSync(f)) throw new BkfsError('TARGET_EXISTS', `${f} exists (use --force to replace it)`);
    }
  }
}

/** Write one layer: its qcow2 (backed by the layer below) with the extents it owns (all: bottom). */
async function exportLayer(
  reader: CheckpointReader,
  name: string,
  l: LayerPlan,
  o: ExportOptions,
  progress: { done: number; total: number },
  partial: { path?: string },
): Promise<ExportLayer> {
  const size = l.disk.virtual_size;
  const target = await createQcow2(l.file, size, l.backing !== null ? { backing: l.backing } : {});
  partial.path = target.partialPath;
  let ok = false;
  try {
    const own = l.complete ? reader.extents(name) : ownExtents(reader, name, l.disk.id);
    const st = await copyRuns(
      {
        reader,
        disk: l.disk,
        target,
        concurrency: o.concurrency ?? 8,
        signal: o.signal,
        onBytes: (n) => {
          progress.done += n;
          o.onProgress?.({ disk: name, done: progress.done, total: progress.total });
        },
      },
      planRuns(own, { size, maxRun: o.runBytes ?? 4 << 20, zeros: !l.complete, fillGaps: false }),
    );
    await target.finish();
    ok = true;
    partial.path = undefined;
    return {
      checkpoint: l.cp.name,
      file: l.file,
      backing: l.backing,
      bytesWritten: st.data,
      bytesZeroed: st.zero,
    };
  } finally {
    if (!ok) await target.abort();
  }
}

function* ownExtents(reader: CheckpointReader, disk: string, diskId: number) {
  for (const e of reader.extents(disk)) if (e.origin === diskId) yield e;
}
