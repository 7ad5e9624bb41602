/**
 * Catalogue queries over the index: VMs, checkpoints, disks, saved configurations.
 * Plain synchronous better-sqlite3 calls; callers own transactions.
 */
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import { didYouMean } from '../util/suggest';

export type Level = 'full' | 'inc' | 'diff' | 'copy';
export type CheckpointState = 'running' | 'complete' | 'failed' | 'forgotten';

export interface VmRow {
  id: number;
  name: string;
  created: number;
}

export interface CheckpointRow {
  id: number;
  /** Random id naming the checkpoint's manifest (stable across index rebuilds). */
  uid: string;
  vm_id: number;
  name: string;
  level: Level;
  state: CheckpointState;
  chain_id: number;
  parent_id: number | null;
  base_id: number | null;
  started: number;
  finished: number | null;
  bytes_read: number;
  bytes_new_raw: number;
  bytes_new_stored: number;
  chunks_new: number;
  libvirt_checkpoint: string | null;
  protected: number;
  damaged: number;
}

export interface DiskRow {
  id: number;
  checkpoint_id: number;
  name: string;
  virtual_size: number;
  source: string | null;
  format: string | null;
  bitmap: string | null;
  bytes_read: number;
  bytes_zero: number;
}

/** Names of VMs, disks and checkpoints: safe as file names and in `VM@CP:DISK` addresses. */
export const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$/;

export function checkName(kind: string, name: string): string {
  if (!NAME_RE.test(name) || name === '.' || name === '..' || name === 'latest') {
    throw new BkfsError(
      'BAD_NAME',
      `invalid ${kind} name '${name}': use letters, digits and _ . + - (not starting with . + -, at most 128, not 'latest')`,
    );
  }
  return name;
}

export function findVm(db: Database.Database, name: string): VmRow | undefined {
  return db.prepare('SELECT * FROM vms WHERE name = ?').get(name) as VmRow | undefined;
}

export function getVm(db: Database.Database, name: string): VmRow {
  const vm = findVm(db, name);
  if (!vm) {
    const names = listVms(db).map((v) => v.name);
    const hint =
      didYouMean(name, names) ||
      (names.length === 0 ? ' (it has none yet)' : names.length <= 8 ? ` (VMs: ${names.join(', ')})` : '');
    throw new BkfsError('NOT_FOUND', `no VM named '${name}' in this repository${hint}`);
  }
  return vm;
}

export function ensureVm(db: Database.Database, name: string): VmRow {
  const vm = findVm(db, name);
  if (vm) return vm;
  db.prepare('INSERT INTO vms (name, created) VALUES (?, ?)').run(name, Date.now());
  return getVm(db, name);
}

export function listVms(db: Database.Database): VmRow[] {
  return db.prepare('SELECT * FROM vms ORDER BY name').all() as VmRow[];
}

/** Complete checkpoints of a VM, oldest first. */
export function listCheckpoints(db: Database.Database, vmId: number): CheckpointRow[] {
  return db
    .prepare("SELECT * FROM checkpoints WHERE vm_id = ? AND state = 'complete' ORDER BY id")
    .all(vmId) as CheckpointRow[];
}

export function checkpointById(db: Database.Database, id: number): CheckpointRow | undefined {
  return db.prepare('SELECT * FROM checkpoints WHERE id = ?').get(id) as CheckpointRow | undefined;
}

/** A complete checkpoint by name, or the latest one when `name` is undefined or 'latest'. */
export function getCheckpoint(db: Database.Database, vm: VmRow, name?: string): CheckpointRow {
  if (name === undefined || name === 'latest') {
    const cp = db
      .prepare("SELECT * FROM checkpoints WHERE vm_id = ? AND state = 'complete' ORDER BY id DESC LIMIT 1")
      .get(vm.id) as CheckpointRow | undefined;
    if (!cp) throw new BkfsError('NOT_FOUND', `VM '${vm.name}' has no checkpoints`);
    return cp;
  }
  const cp = db
    .prepare("SELECT * FROM checkpoints WHERE vm_id = ? AND name = ? AND state = 'complete'")
    .get(vm.id, name) as CheckpointRow | undefined;
  if (!cp) {
    const names = listCheckpoints(db, vm.id).map((c) => c.name);
    const hint = names.length ? ` (it has: ${names.slice(-8).join(', ')})` : '';
    const dym = didYouMean(name, names);
    const more = dym && hint ? `${dym.slice(0, -1)} ${hint.slice(2)}` : dym || hint;
    throw new BkfsError('NOT_FOUND', `VM '${vm.name}' has no checkpoint '${name}'${more}`);
  }
  return cp;
}

export function checkpointDisks(db: Database.Database, checkpointId: number): DiskRow[] {
  return db
    .prepare('SELECT * FROM disks WHERE checkpoint_id = ? ORDER BY name')
    .all(checkpointId) as DiskRow[];
}

/**
 * What `bkfs list/info --json` and the web API show of a checkpoint (`time` in ms since the epoch;
 * the CLI prints it as ISO-8601, the web API adds `logicalBytes`).
 */
export interface CheckpointSummary {
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
  libvirtCheckpoint: string | null;
  protected: boolean;
  damaged: boolean;
}

export function describeCheckpoint(db: Database.Database, vm: string, cp: CheckpointRow): CheckpointSummary {
  const disks = checkpointDisks(db, cp.id);
  const parent = cp.parent_id !== null ? checkpointById(db, cp.parent_id) : undefined;
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
    libvirtCheckpoint: cp.libvirt_checkpoint,
    protected: cp.protected === 1,
    damaged: cp.damaged === 1,
  };
}

export function getConfigs(db: Database.Database, checkpointId: number): { name: string; data: Buffer }[] {
  // Loaded here: manifest.ts pulls in zstd and gc (start-up time of list/info).
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { readConfigs } = require('../repo/manifest') as typeof import('../repo/manifest');
  return readConfigs(db, checkpointId);
}

/**
 * Parse `VM`, `VM@CP`, `VM@latest`; returns the names (not validated against the repository).
 * The one parser of checkpoint references: every command goes through it. An empty side (`VM@`,
 * `@CP`, typically `web@$CP` with CP unset in a script) is a usage error, never "latest".
 */
export function parseCheckpointRef(ref: string): { vm: string; checkpoint?: string } {
  const at = ref.indexOf('@');
  if (ref === '') throw new BkfsError('USAGE', 'empty VM name (give VM or VM@CHECKPOINT)');
  if (at < 0) return { vm: checkName('VM', ref) };
  const cp = ref.slice(at + 1);
  if (at === 0) {
    throw new BkfsError(
      'USAGE',
      `'${ref}' names no VM: write VM@CHECKPOINT (an unset variable in a script?)`,
    );
  }
  if (cp === '') {
    throw new BkfsError(
      'USAGE',
      `'${ref}' names no checkpoint: write VM@CHECKPOINT, VM@latest or VM (an unset variable in a script?)`,
    );
  }
  const vm = checkName('VM', ref.slice(0, at));
  if (cp === 'latest') return { vm };
  return { vm, checkpoint: checkName('checkpoint', cp) };
}

/** Resolve `VM[@CP]` to rows. */
export function resolveRef(db: Database.Database, ref: string): { vm: VmRow; checkpoint: CheckpointRow } {
  const r = parseCheckpointRef(ref);
  const vm = getVm(db, r.vm);
  return { vm, checkpoint: getCheckpoint(db, vm, r.checkpoint) };
}
