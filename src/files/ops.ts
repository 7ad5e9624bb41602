/**
 * The file-level commands as library calls (the CLI in `src/cli/commands/files.ts` only parses and
 * prints): each opens a `FilesSession` over the checkpoints it needs, does its work and closes the
 * session on every path. Progress and remarks go to `onNotice`; nothing here prints.
 *
 * Appliance launches: one per command (`find` over more checkpoints than fit in one appliance,
 * `MAX_DRIVES` disks, uses one per group). Memory: `diff` holds two listings, `find` the matches.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import type { Writable } from 'node:stream';
import { BkfsError, isBkfsError } from '../errors';
import {
  findVm,
  getVm,
  listCheckpoints,
  NAME_RE,
  resolveRef,
  type CheckpointRow,
  type VmRow,
} from '../index/catalog';
import type { Repository } from '../repo/repository';
import { parseFileAddress, type FileAddress } from './address';
import type { EngineChoice } from './engine';
import type { Layout } from './fstab';
import { FilesSession, neighbours, type ListEntry, type SessionStats, type Target } from './session';
import {
  checksumCandidates,
  diffListings,
  fileHistory,
  pathMatcher,
  type DiffItem,
  type FileEntry,
  type HistoryRow,
} from './tree';
import type { DiskInfo, Volume } from './volumes';

export interface FilesOptions {
  engine?: EngineChoice;
  guestfsTcg?: boolean;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
  /** Called with the session's statistics just before it closes. */
  onStats?: (s: SessionStats) => void;
}

/** Disks of all checkpoints that one appliance gets at most (libguestfs allows a few hundred). */
export const MAX_DRIVES = 64;

async function withSession<T>(
  repo: Repository,
  vm: VmRow,
  cps: readonly CheckpointRow[],
  opts: FilesOptions,
  fn: (s: FilesSession) => Promise<T>,
): Promise<T> {
  const sopts = {
    ...(opts.engine ? { engine: opts.engine } : {}),
    ...(opts.guestfsTcg ? { guestfsTcg: true } : {}),
    ...(opts.onNotice ? { onNotice: opts.onNotice } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  };
  const s = await FilesSession.open(repo, vm, cps, sopts);
  let result: T;
  try {
    result = await fn(s);
  } catch (e) {
    await s.close().catch(() => undefined);
    // The engine reports a damaged range as an I/O error of its own; say what it really was.
    throw s.damage.first ?? e;
  }
  opts.onStats?.(s.stats);
  await s.close();
  return result;
}

function diskCount(repo: Repository, cp: CheckpointRow): number {
  const r = repo.db.prepare('SELECT COUNT(*) AS n FROM disks WHERE checkpoint_id = ?').get(cp.id) as {
    n: number;
  };
  return Math.max(1, r.n);
}

/** Resolve an address to rows plus its target. */
function target(repo: Repository, a: FileAddress): { vm: VmRow; cp: CheckpointRow; t: Target } {
  const { vm, checkpoint } = resolveRef(repo.db, a.ref);
  const t: Target = { checkpoint: checkpoint.name, path: a.path ?? '/' };
  if (a.volume) t.volume = a.volume;
  return { vm, cp: checkpoint, t };
}

/**
 * Run `fn` on the target; for `VM@CP:etc/hostname` (a word that reads as a volume or as a path
 * without its leading '/'), on the path when the checkpoint has no such volume.
 */
async function orPath<T>(a: FileAddress, t: Target, fn: (t: Target) => Promise<T>): Promise<T> {
  if (a.orPath === undefined) return fn(t);
  try {
    return await fn(t);
  } catch (e) {
    if (!isBkfsError(e, 'NOT_FOUND') || e.data?.noVolume !== true) throw e;
    return fn({ checkpoint: t.checkpoint, path: a.orPath });
  }
}

/** A single-path command: the target checkpoint plus its neighbours (for "it exists in ..."). */
async function withTarget<T>(
  repo: Repository,
  address: string,
  opts: FilesOptions,
  fn: (s: FilesSession, t: Target) => Promise<T>,
): Promise<T> {
  const a = parseFileAddress(address, { needPath: true });
  const { vm, cp, t } = target(repo, a);
  const all = listCheckpoints(repo.db, vm.id);
  const cps = neighbours(all, all.find((c) => c.id === cp.id) ?? cp, (c) => diskCount(repo, c), MAX_DRIVES);
  cps.sort((x, y) => x.id - y.id);
  return withSession(repo, vm, cps, opts, (s) => orPath(a, t, (tt) => fn(s, tt)));
}

export function listFiles(
  repo: Repository,
  address: string,
  opts: FilesOptions,
): Promise<{ vm: string; checkpoint: string; dir: boolean; path: string; entries: ListEntry[] }> {
  return withTarget(repo, address, opts, async (s, t) => ({
    vm: s.vm.name,
    checkpoint: t.checkpoint,
    ...(await s.list(t)),
  }));
}

export function catFile(repo: Repository, address: string, out: Writable, opts: FilesOptions): Promise<void> {
  return withTarget(repo, address, opts, (s, t) => s.cat(t, out));
}

export interface ChecksumResult {
  vm: string;
  checkpoint: string;
  path: string;
  size: number;
  sha256: string;
}

/** sha256 of a regular file of a checkpoint (`bkfs checksum`). */
export function checksumFile(repo: Repository, address: string, opts: FilesOptions): Promise<ChecksumResult> {
  return withTarget(repo, address, opts, async (s, t) => {
    const c = await s.checksum(t);
    return { vm: s.vm.name, checkpoint: t.checkpoint, path: t.path, size: c.size, sha256: c.sha256 };
  });
}

/** sha256 (hex) of a host file. */
export async function hostFileSha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

export interface CopyResult {
  vm: string;
  checkpoint: string;
  source: string;
  dest: string;
  kind: string;
  action: string;
  engine: string | null;
  /** With `verify`: the sha256 that both the checkpoint's file and the written copy have. */
  verified?: { sha256: string };
}

export function copyOut(
  repo: Repository,
  address: string,
  dest: string,
  copts: { recursive: boolean; force: boolean; verify?: boolean },
  opts: FilesOptions,
): Promise<CopyResult> {
  return withTarget(repo, address, opts, async (s, t) => {
    const r = await s.copy(t, dest, copts);
    let verified: { sha256: string } | undefined;
    if (copts.verify) {
      if (r.kind !== 'file') {
        throw new BkfsError('USAGE', `--verify checks a copied regular file; ${r.source} is a ${r.kind}`);
      }
      // Re-read both: the file in the checkpoint and the copy as written on the host.
      const want = (await s.checksum(t)).sha256;
      const got = await hostFileSha256(r.final);
      if (want !== got) {
        throw new BkfsError(
          'VERIFY_FAILED',
          `${r.final} does not match ${s.vm.name}@${t.checkpoint}:${r.source} (sha256 ${got} vs ${want})`,
        );
      }
      verified = { sha256: want };
    }
    return {
      ...(verified ? { verified } : {}),
      vm: s.vm.name,
      checkpoint: t.checkpoint,
      source: r.source,
      dest: r.final,
      kind: r.kind,
      action: r.action,
      engine: s.engineName,
    };
  });
}

// ---------------------------------------------------------------------------------------------
// ls VM@CP: disks, volumes, layout

export interface OverviewVolume {
  id: string;
  disk: string | null;
  partition: number | null;
  lv: string | null;
  offset: number;
  size: number;
  type: string | null;
  label: string | null;
  uuid: string | null;
  partType: string | null;
  partLabel: string | null;
  partUuid: string | null;
  mountpoint: string | null;
  note: string | null;
}

export interface Overview {
  vm: string;
  checkpoint: string;
  engine: string | null;
  disks: { name: string; size: number; table: string; partitions: number; warnings: string[] }[];
  volumes: OverviewVolume[];
  fstabFrom: string | null;
  skipped: { mountpoint: string; spec: string; reason: string }[];
}

function overviewVolume(v: Volume, layout: Layout | null): OverviewVolume {
  const mp = layout?.mounts.find((m) => m.volume.id === v.id)?.mountpoint ?? null;
  const p = v.probe;
  let note: string | null = null;
  if (p?.type === 'crypto_LUKS') note = 'encrypted';
  else if (p?.needsRecovery) note = 'journal not replayed';
  else if (!p) note = 'no filesystem recognised';
  return {
    id: v.id,
    disk: v.disk ?? null,
    partition: v.partition ?? null,
    lv: v.lv ? `${v.lv.vg}/${v.lv.lv}` : null,
    offset: v.offset,
    size: v.size,
    type: p?.type ?? null,
    label: p?.label ?? null,
    uuid: p?.uuid ?? null,
    partType: v.partType ?? null,
    partLabel: v.partLabel ?? null,
    partUuid: v.partUuid ?? null,
    mountpoint: mp,
    note,
  };
}

export async function overview(repo: Repository, ref: string, opts: FilesOptions): Promise<Overview> {
  const a = parseFileAddress(ref);
  if (a.path !== undefined) throw new BkfsError('USAGE', 'overview takes VM[@CP] only');
  const { vm, checkpoint } = resolveRef(repo.db, a.ref);
  return withSession(repo, vm, [checkpoint], opts, (s) => overviewOf(s, vm.name, checkpoint.name));
}

/** The overview of one checkpoint of an open session (`bkfs ls VM@CP`, the web console). */
export async function overviewOf(s: FilesSession, vmName: string, cpName: string): Promise<Overview> {
  const layout = await s.layout(cpName);
  const set = await s.volumes(cpName);
  return {
    vm: vmName,
    checkpoint: cpName,
    engine: s.engineName,
    disks: set.disks.map((d: DiskInfo) => ({
      name: d.name,
      size: d.size,
      table: d.table.scheme,
      partitions: d.table.partitions.filter((p) => !p.extended).length,
      warnings: d.table.warnings ?? [],
    })),
    volumes: set.volumes.map((v) => overviewVolume(v, layout)),
    fstabFrom: layout?.fstabFrom ?? null,
    skipped: layout?.skipped ?? [],
  };
}

// ---------------------------------------------------------------------------------------------
// find

export interface FindResult {
  vm: string;
  checkpoints: string[];
  /** Checkpoints in which the searched path itself does not exist. */
  missing: string[];
  matches: { path: string; history: HistoryRow[] }[];
}

/**
 * Search file names (glob, see `pathMatcher`) in every checkpoint `scope` names: `VM` (all of its
 * checkpoints) or `VM@CP`, optionally `:[VOLUME:]/path` to search below a path.
 */
export async function findFiles(
  repo: Repository,
  scope: string,
  pattern: string,
  opts: FilesOptions & { ignoreCase?: boolean },
): Promise<FindResult> {
  const a = parseFileAddress(scope);
  const vm = getVm(repo.db, a.vm);
  const cps = a.checkpoint ? [resolveRef(repo.db, a.ref).checkpoint] : listCheckpoints(repo.db, vm.id);
  if (cps.length === 0) throw new BkfsError('NOT_FOUND', `VM '${vm.name}' has no checkpoints`);
  const match = pathMatcher(pattern, opts.ignoreCase ?? false);
  const per: { checkpoint: string; matches: Map<string, FileEntry> }[] = [];
  const missing: string[] = [];
  // One appliance per group of checkpoints that fits MAX_DRIVES.
  let i = 0;
  while (i < cps.length) {
    const group: CheckpointRow[] = [];
    let disks = 0;
    while (i < cps.length) {
      const c = cps[i] as CheckpointRow;
      const n = diskCount(repo, c);
      if (group.length > 0 && disks + n > MAX_DRIVES) break;
      group.push(c);
      disks += n;
      i++;
    }
    await withSession(repo, vm, group, opts, async (s) => {
      for (const c of group) {
        const t: Target = { checkpoint: c.name, path: a.path ?? '/' };
        if (a.volume) t.volume = a.volume;
        const entries = await orPath(a, t, (tt) => s.walk(tt, match));
        if (entries === null) missing.push(c.name);
        per.push({ checkpoint: c.name, matches: new Map((entries ?? []).map((e) => [e.path, e])) });
      }
    });
  }
  const history = fileHistory(per);
  return {
    vm: vm.name,
    checkpoints: cps.map((c) => c.name),
    missing,
    matches: [...history].map(([path, rows]) => ({ path, history: rows })),
  };
}

// ---------------------------------------------------------------------------------------------
// diff

export interface DiffResult {
  vm: string;
  from: string;
  to: string;
  path: string;
  checksummed: number;
  items: DiffItem[];
}

/**
 * `diff web@check1 check2`: a second argument without '@' names a checkpoint of the first one's VM
 * when that VM has a checkpoint of that name (or it is 'latest'); otherwise it is a VM.
 */
export function sameVmRef(repo: Repository, vmName: string, to: string): string {
  const colon = to.indexOf(':');
  const head = colon < 0 ? to : to.slice(0, colon);
  if (head.includes('@') || !NAME_RE.test(head)) return to;
  if (head === 'latest') return `${vmName}@${to}`;
  const vm = findVm(repo.db, vmName);
  if (!vm) return to;
  const has = repo.db
    .prepare("SELECT 1 FROM checkpoints WHERE vm_id = ? AND name = ? AND state = 'complete'")
    .get(vm.id, head);
  return has ? `${vmName}@${to}` : to;
}

/**
 * Files added, removed and changed between two checkpoints of one VM, below `path` (default '/').
 * `checksum`: also compare the contents of files whose size and mtime are equal.
 */
export async function diffCheckpoints(
  repo: Repository,
  fromRef: string,
  toRef: string,
  guestPath: string | undefined,
  opts: FilesOptions & { checksum?: boolean },
): Promise<DiffResult> {
  const a = parseFileAddress(fromRef);
  const b = parseFileAddress(sameVmRef(repo, a.vm, toRef));
  const ra = target(repo, a);
  const rb = target(repo, b);
  if (ra.vm.id !== rb.vm.id)
    throw new BkfsError('USAGE', `diff compares two checkpoints of one VM (${ra.vm.name} vs ${rb.vm.name})`);
  const p = guestPath ?? a.path ?? b.path ?? '/';
  const ta: Target = { ...ra.t, path: p };
  const tb: Target = { ...rb.t, path: p };
  if (!tb.volume && ta.volume) tb.volume = ta.volume;
  if (!ta.volume && tb.volume) ta.volume = tb.volume;
  const cps = ra.cp.id === rb.cp.id ? [ra.cp] : [ra.cp, rb.cp].sort((x, y) => x.id - y.id);
  return withSession(repo, ra.vm, cps, opts, async (s) => {
    const la = await s.walk(ta);
    const lb = await s.walk(tb);
    if (la === null && lb === null) {
      throw new BkfsError(
        'NOT_FOUND',
        `${p} exists in neither ${ra.vm.name}@${ta.checkpoint} nor ${tb.checkpoint}`,
      );
    }
    let checksums: { a: Map<string, string>; b: Map<string, string> } | undefined;
    let checksummed = 0;
    if (opts.checksum && la && lb) {
      const cand = checksumCandidates(la, lb);
      checksummed = cand.length;
      checksums = { a: await s.checksums(ta, cand), b: await s.checksums(tb, cand) };
    }
    return {
      vm: ra.vm.name,
      from: ta.checkpoint,
      to: tb.checkpoint,
      path: p,
      checksummed,
      items: diffListings(la ?? [], lb ?? [], checksums),
    };
  });
}
