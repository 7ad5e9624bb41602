/**
 * A file-level session: everything one `ls`/`cp`/`cat`/`find`/`diff` command needs, opened once and
 * closed on every exit path.
 *
 *   repository -> CheckpointReader per checkpoint (one shared ChunkLoader, i.e. one decoded-chunk
 *   cache) -> in-process read-only NBD server (exports `<checkpoint>/<disk>` on a Unix socket in a
 *   private 0700 directory) -> engine (libguestfs appliance, or nbdfuse + loop + kernel mounts)
 *
 * Volumes are probed from the stored bytes (`volumes.ts`); the guest's mount layout comes from its
 * own fstab (`fstab.ts`), read through the engine; guest paths are resolved inside the guest root
 * (`resolve.ts`). The engine is chosen lazily (`pickEngine`): libguestfs unless the kernel engine
 * was asked for by name (trusted guests only). Only the bytes the guest filesystem code actually reads are
 * loaded from the repository (`stats`).
 *
 * Pins: every checkpoint of the session is pinned, then re-checked, while it is open. Locking:
 * none; the repository is only read. Nothing is written to the repository or to any disk image.
 * Memory: a 64 MiB decoded-chunk cache shared by all checkpoints, each reader's page cache, and
 * the listings `find`/`diff` hold.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Writable } from 'node:stream';
import { BkfsError, errorMessage, isBkfsError } from '../errors';
import { CheckpointReader } from '../chain/reader';
import type { CheckpointRow, VmRow } from '../index/catalog';
import { assertStillComplete, pinCheckpoints, type Pin } from '../repo/pins';
import type { Repository } from '../repo/repository';
import { ChunkLoader } from '../store/chunk-cache';
import { run } from '../util/proc';
import { formatAddress, formatVolumeSpec, type VolumeSpec } from './address';
import { planCopy, tempSibling, type CopyPlan } from './copy';
import {
  detectKernelSupport,
  kernelDriver,
  pickEngine,
  type CheckpointDrives,
  type EngineChoice,
  type EngineMount,
  type FilesEngine,
  type GuestStat,
  type KernelSupport,
} from './engine';
import {
  chooseRoot,
  locate,
  MAX_FSTAB_BYTES,
  mountsBelow,
  noLayoutError,
  type Layout,
  type MountPoint,
} from './fstab';
import { guestfishAvailable } from './guestfish';
import { GuestfsEngine } from './guestfs-engine';
import { KernelEngine } from './kernel';
import { SESSION_DIR_PREFIX, sweepStaleSessions, writeOwner } from './stale';
import { NbdExportServer, type NbdExport } from './nbd-server';
import { resolveInRoot, type EntryKind, type ResolveOps } from './resolve';
import type { FileEntry } from './tree';
import { userPathError } from '../util/userpath';
import {
  discoverVolumes,
  findVolume,
  isFilesystem,
  notAFilesystem,
  type Volume,
  type VolumeSet,
} from './volumes';

export interface FilesSessionOptions {
  engine?: EngineChoice;
  /** libguestfs: software emulation (LIBGUESTFS_BACKEND_SETTINGS=force_tcg). */
  guestfsTcg?: boolean;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
  cacheBytes?: number;
}

/** What a command points at: a checkpoint, optionally a volume, and a guest path. */
export interface Target {
  checkpoint: string;
  volume?: VolumeSpec;
  path: string;
}

export interface ListEntry extends GuestStat {
  name: string;
  path: string;
  target?: string;
}

export interface Prepared {
  engine: FilesEngine;
  /** The mounts of this tree (layout or the one named volume). */
  mounts: MountPoint[];
  layout?: Layout;
}

export interface SessionStats {
  bytesFromStore: number;
  chunksDecoded: number;
  nbdBytesServed: number;
  engine: string | null;
}

interface CpState {
  row: CheckpointRow;
  reader: CheckpointReader;
  probed?: VolumeSet;
  lvsAdded?: boolean;
  layout?: Layout | null;
}

/** Up to `maxDisks` disks' worth of checkpoints around `target` (nearest first, target first). */
export function neighbours<T>(
  all: readonly T[],
  target: T,
  disksOf: (t: T) => number,
  maxDisks: number,
): T[] {
  const i = all.indexOf(target);
  const order: T[] = [target];
  for (let d = 1; d < all.length; d++) {
    const before = all[i - d];
    const after = all[i + d];
    if (before !== undefined) order.push(before);
    if (after !== undefined) order.push(after);
  }
  const out: T[] = [];
  let disks = 0;
  for (const t of order) {
    const n = disksOf(t);
    if (out.length > 0 && disks + n > maxDisks) break;
    out.push(t);
    disks += n;
  }
  return out;
}

export class FilesSession {
  private engine: FilesEngine | undefined;
  private readonly support: KernelSupport = detectKernelSupport();
  private readonly choice: EngineChoice;
  private current: { checkpoint: string; key: string } | undefined;
  private closed = false;

  private constructor(
    readonly repo: Repository,
    readonly vm: VmRow,
    private readonly cps: Map<string, CpState>,
    readonly loader: ChunkLoader,
    private readonly work: string,
    private readonly server: NbdExportServer,
    private readonly drives: Map<string, CheckpointDrives>,
    private readonly pin: Pin | undefined,
    private readonly opts: FilesSessionOptions,
  ) {
    this.choice = opts.engine ?? 'auto';
  }

  /** Open a session over `checkpoints` of `vm` (oldest first). */
  static async open(
    repo: Repository,
    vm: VmRow,
    checkpoints: readonly CheckpointRow[],
    opts: FilesSessionOptions = {},
  ): Promise<FilesSession> {
    const loader = new ChunkLoader(repo.db, repo.packs, opts.cacheBytes ?? 64 << 20);
    let pin: Pin | undefined;
    try {
      pin = pinCheckpoints(
        repo,
        checkpoints.map((c) => c.id),
      );
    } catch (e) {
      opts.onNotice?.(
        `cannot pin the checkpoints (forget/gc will not know they are in use): ${errorMessage(e)}`,
      );
    }
    try {
      // Looked up before the pin: a forget may have run in between (FORMAT.md, "Pins").
      for (const cp of checkpoints) assertStillComplete(repo, cp, vm.name, 'the file session');
    } catch (e) {
      pin?.release();
      throw e;
    }
    await sweepStaleSessions(opts.onNotice);
    const work = await fsp.mkdtemp(path.join(os.tmpdir(), SESSION_DIR_PREFIX));
    const damage: { first?: BkfsError } = {};
    try {
      writeOwner(work);
      const cps = new Map<string, CpState>();
      const exports = new Map<string, NbdExport>();
      const drives = new Map<string, CheckpointDrives>();
      for (const row of checkpoints) {
        const reader = new CheckpointReader(repo, vm, row, { loader });
        cps.set(row.name, { row, reader });
        const d: CheckpointDrives = { checkpoint: row.name, disks: [] };
        for (const disk of reader.disks) {
          const exportName = `${row.name}/${disk.name}`;
          exports.set(exportName, {
            size: disk.virtual_size,
            readAt: (o, l) =>
              reader.readAt(disk.name, o, l).catch((e: unknown) => {
                // The engine only sees an NBD EIO: remember what it was, so that a command that
                // fails on it reports DATA_DAMAGED with the disk range (see `damage`).
                if (isBkfsError(e, 'DATA_DAMAGED')) damage.first ??= e;
                throw e;
              }),
          });
          d.disks.push({ name: disk.name, size: disk.virtual_size, exportName });
        }
        drives.set(row.name, d);
      }
      const server = await NbdExportServer.listen(path.join(work, 'nbd.sock'), exports, (m) =>
        opts.onNotice?.(m),
      );
      const session = new FilesSession(repo, vm, cps, loader, work, server, drives, pin, opts);
      session.damage = damage;
      return session;
    } catch (e) {
      pin?.release();
      await fsp.rm(work, { recursive: true, force: true });
      throw e;
    }
  }

  /**
   * The first stored-data failure (DATA_DAMAGED) a guest filesystem read met through the NBD
   * export, if any: a command that fails after it failed because of it.
   */
  damage: { first?: BkfsError } = {};

  get stats(): SessionStats {
    return {
      bytesFromStore: this.loader.bytesFromStore,
      chunksDecoded: this.loader.chunksDecoded,
      nbdBytesServed: this.server.stats.bytesRead,
      engine: this.engine?.name ?? null,
    };
  }

  get engineName(): string | null {
    return this.engine?.name ?? null;
  }

  checkpointNames(): string[] {
    return [...this.cps.keys()];
  }

  private cp(name: string): CpState {
    const c = this.cps.get(name);
    if (!c) throw new BkfsError('NOT_FOUND', `checkpoint ${name} is not part of this session`);
    return c;
  }

  private where(checkpoint: string): string {
    return `${this.vm.name}@${checkpoint}`;
  }

  /** Probed volumes of a checkpoint, plus its logical volumes once an engine that sees them runs. */
  async volumes(checkpoint: string): Promise<VolumeSet> {
    const c = this.cp(checkpoint);
    if (!c.probed) {
      c.probed = await discoverVolumes(
        c.reader.disks.map((d) => ({
          name: d.name,
          size: d.virtual_size,
          readAt: (o: number, l: number) => c.reader.readAt(d.name, o, l),
        })),
      );
    }
    if (!c.lvsAdded && this.engine?.name === 'guestfs' && c.probed.volumes.some(isPv)) {
      const lvs = await this.engine.logicalVolumes(checkpoint, c.probed);
      c.probed = { disks: c.probed.disks, volumes: [...c.probed.volumes, ...lvs] };
      c.lvsAdded = true;
    }
    return c.probed;
  }

  /**
   * An engine able to mount `volumes` (LVM physical volumes among them mean: logical volumes are
   * needed). Starts one; an explicitly chosen kernel engine that cannot mount them fails.
   */
  private async engineFor(volumes: readonly Volume[]): Promise<FilesEngine> {
    const e = this.engine;
    if (e) {
      if (e.name === 'guestfs') return e;
      const cannot = volumes.map((v) => kernelDriver(v, this.support)).find((r) => 'reason' in r);
      if (!cannot) return e;
    }
    const pick = pickEngine(this.choice, this.support, guestfishAvailable(), volumes);
    if (e && pick.engine === e.name) return e;
    if (pick.note) this.opts.onNotice?.(pick.note);
    if (e) {
      this.engine = undefined;
      this.current = undefined;
      await e.close();
    }
    const drives = [...this.drives.values()];
    this.engine =
      pick.engine === 'kernel'
        ? new KernelEngine(this.work, this.server.socketPath, this.drives, this.support, this.opts.signal)
        : await GuestfsEngine.launch(this.work, this.server.socketPath, drives, {
            ...(this.opts.guestfsTcg ? { tcg: true } : {}),
            ...(this.opts.signal ? { signal: this.opts.signal } : {}),
          });
    // Volumes probed before were missing their logical volumes; layouts may have depended on them.
    for (const c of this.cps.values()) {
      if (!c.lvsAdded && c.probed?.volumes.some(isPv)) c.layout = undefined;
    }
    return this.engine;
  }

  private async mountTree(
    checkpoint: string,
    mounts: readonly EngineMount[],
    key: string,
  ): Promise<FilesEngine> {
    const engine = this.engine as FilesEngine;
    if (this.current?.checkpoint === checkpoint && this.current.key === key) return engine;
    this.current = undefined;
    const failed = await engine.mount(checkpoint, mounts);
    const rootFailed = failed.find((x) => x.mount.mountpoint === '/');
    if (rootFailed) throw new BkfsError('FS_UNSUPPORTED', `${this.where(checkpoint)}: ${rootFailed.reason}`);
    this.current = { checkpoint, key };
    this.lastFailures = failed.map((f) => ({ mountpoint: f.mount.mountpoint, reason: f.reason }));
    return engine;
  }

  private lastFailures: { mountpoint: string; reason: string }[] = [];
  private readonly skipNoted = new Set<string>();

  private resolveOps(engine: FilesEngine): ResolveOps {
    return {
      kind: async (p) => (await engine.lstat(p))?.kind ?? null,
      readlink: (p) => engine.readlink(p),
    };
  }

  /** The guest's layout (null: several filesystems and no fstab). */
  async layout(checkpoint: string): Promise<Layout | null> {
    const c = this.cp(checkpoint);
    if (c.layout !== undefined) return c.layout;
    let set = await this.volumes(checkpoint);
    const candidates = set.volumes.filter(
      (v) => isFilesystem(v) && ['ext2', 'ext3', 'ext4', 'xfs', 'btrfs'].includes(v.probe?.type ?? ''),
    );
    const pvs = set.volumes.filter(isPv);
    // An explicit kernel engine reads the fstab of what it can mount (logical volumes stay unknown
    // and fstab entries on them are skipped); otherwise every candidate (and LVM) is needed.
    const explicitKernel = this.choice === 'kernel';
    const canKernel = (v: Volume): boolean => !('reason' in kernelDriver(v, this.support));
    const need = explicitKernel ? candidates.filter(canKernel) : [...candidates, ...pvs];
    if (need.length > 0 || explicitKernel) {
      await this.engineFor(need);
      set = await this.volumes(checkpoint);
    }
    const layout = await chooseRoot(set, async (v) => {
      if (explicitKernel && !canKernel(v)) return null;
      const engine = await this.engineFor([v]);
      try {
        await this.mountTree(checkpoint, [{ mountpoint: '/', volume: v, options: [] }], `vol:${v.id}`);
      } catch (e) {
        if (!isBkfsError(e, 'FS_UNSUPPORTED')) throw e;
        this.opts.onNotice?.(`${this.where(checkpoint)}: looking for /etc/fstab: ${e.message}`);
        return null; // a candidate that does not mount is not the root
      }
      const r = await resolveInRoot('/etc/fstab', this.resolveOps(engine), true);
      if (!r.ok || r.kind !== 'file') return null;
      // The guest wrote this file: refuse an absurd one before reading it into memory.
      const st = await engine.lstat(r.path);
      if (st && st.size > MAX_FSTAB_BYTES) {
        throw new BkfsError(
          'FS_UNSUPPORTED',
          `${this.where(checkpoint)}: ${v.id}: /etc/fstab is ${st.size} bytes, more than the ${MAX_FSTAB_BYTES} bkfs reads: not a usable fstab; name a volume explicitly (VM@CP:VOLUME:/path)`,
        );
      }
      return (await engine.readFile(r.path)).toString('utf8');
    });
    c.layout = layout ?? null;
    return c.layout;
  }

  /**
   * Mount the tree `t` needs (the guest layout, or the one named volume) with an engine that can
   * mount every volume under `t.path` (`recursive`) or holding it.
   */
  async prepare(t: Target, recursive: boolean): Promise<Prepared> {
    const where = this.where(t.checkpoint);
    if (t.volume) {
      const spec = t.volume;
      let set = await this.volumes(t.checkpoint);
      if (spec.kind === 'lv' || spec.kind === 'label' || spec.kind === 'uuid') {
        const pvs = set.volumes.filter(isPv);
        if (pvs.length > 0 && !set.volumes.some((v) => v.lv)) {
          const found = (() => {
            try {
              return findVolume(set, spec, where);
            } catch {
              return undefined;
            }
          })();
          if (!found) {
            await this.engineFor(pvs);
            set = await this.volumes(t.checkpoint);
          }
        }
      }
      const v = findVolume(set, spec, where);
      const bad = notAFilesystem(v);
      if (bad) throw new BkfsError('FS_UNSUPPORTED', `${where}: ${bad}`);
      await this.engineFor([v]);
      const mounts: MountPoint[] = [
        { mountpoint: '/', volume: v, options: [], source: formatVolumeSpec(spec) },
      ];
      const engine = await this.mountTree(t.checkpoint, mounts, `vol:${v.id}`);
      return { engine, mounts };
    }
    const layout = await this.layout(t.checkpoint);
    if (!layout) return this.prepare({ ...t, volume: await this.findVolumeOf(t) }, recursive);
    const holding = locate(layout, t.path).mount;
    let below = recursive ? mountsBelow(layout, t.path) : [];
    if (this.choice === 'kernel') {
      // Asked for the kernel explicitly: what it cannot mount below the path is left out, said once.
      const skip = below.filter((m) => 'reason' in kernelDriver(m.volume, this.support));
      for (const m of skip) {
        const r = kernelDriver(m.volume, this.support);
        const key = `${t.checkpoint}:${m.mountpoint}`;
        if ('reason' in r && !this.skipNoted.has(key)) {
          this.skipNoted.add(key);
          this.opts.onNotice?.(`${where}:${m.mountpoint} left out: ${r.reason}`);
        }
      }
      below = below.filter((m) => !skip.includes(m));
    }
    const needed = [holding, ...below];
    for (const m of needed) {
      const bad = notAFilesystem(m.volume);
      if (bad) throw new BkfsError('FS_UNSUPPORTED', `${where}: ${bad}`);
    }
    await this.engineFor(needed.map((m) => m.volume));
    const engine = await this.mountTree(t.checkpoint, layout.mounts, 'layout');
    const failedNeeded = this.lastFailures.filter((f) => needed.some((m) => m.mountpoint === f.mountpoint));
    if (failedNeeded.length > 0) {
      throw new BkfsError(
        'FS_UNSUPPORTED',
        `${where}: ${failedNeeded.map((f) => `${f.mountpoint}: ${f.reason}`).join('; ')}`,
      );
    }
    return { engine, mounts: layout.mounts, layout };
  }

  private readonly foundOn = new Map<string, VolumeSpec>();

  /**
   * A checkpoint with several filesystems and no /etc/fstab to place them (data disks, Windows,
   * appliances): the one filesystem on which `t.path` exists. Exactly one: used, and said (via
   * `onNotice`); several: USAGE listing them; none: NOT_FOUND. Each filesystem is mounted alone
   * as `/` and the path resolved inside it (a final symlink is not followed).
   */
  private async findVolumeOf(t: Target): Promise<VolumeSpec> {
    const key = `${t.checkpoint}\0${t.path}`;
    const known = this.foundOn.get(key);
    if (known) return known;
    const where = this.where(t.checkpoint);
    const set = await this.volumes(t.checkpoint);
    const filesystems = set.volumes.filter((v) => isFilesystem(v) && notAFilesystem(v) === undefined);
    if (filesystems.length < 2) throw noLayoutError(where, set);
    const hits: Volume[] = [];
    const unreadable: string[] = [];
    for (const v of filesystems) {
      try {
        const engine = await this.engineFor([v]);
        await this.mountTree(t.checkpoint, [{ mountpoint: '/', volume: v, options: [] }], `vol:${v.id}`);
        const r = await resolveInRoot(t.path, this.resolveOps(engine), false);
        if (r.ok) hits.push(v);
      } catch (e) {
        if (!isBkfsError(e, 'FS_UNSUPPORTED')) throw e;
        unreadable.push(`${volumeName(v)}: ${e.message}`);
      }
    }
    const names = filesystems.map(describeVolume).join(', ');
    const skipped = unreadable.length > 0 ? `; not searched: ${unreadable.join('; ')}` : '';
    const only = hits[0];
    if (hits.length === 1 && only) {
      const spec = volumeSpecOf(only);
      this.opts.onNotice?.(
        `${where} has no /etc/fstab: ${t.path} exists only on ${describeVolume(only)}, using it (${formatAddress(this.vm.name, t.checkpoint, t.path, spec)})`,
      );
      this.foundOn.set(key, spec);
      return spec;
    }
    if (hits.length === 0) {
      throw new BkfsError(
        'NOT_FOUND',
        `${formatAddress(this.vm.name, t.checkpoint, t.path)} exists on none of the filesystems of ${where}, which has no /etc/fstab (filesystems: ${names}${skipped})`,
        { missing: true },
      );
    }
    const first = volumeSpecOf(hits[0] as Volume);
    throw new BkfsError(
      'USAGE',
      `${where} has no /etc/fstab and ${t.path} exists on several filesystems: ${hits.map(describeVolume).join(', ')}; name one, e.g. ${formatAddress(this.vm.name, t.checkpoint, t.path, first)}${skipped}`,
    );
  }

  /** Mounts of the current tree that could not be mounted (skipped, with reasons). */
  get skippedMounts(): { mountpoint: string; reason: string }[] {
    return this.lastFailures;
  }

  /**
   * Resolve `t.path` inside the guest root. `followLast`: follow a final symlink. Throws NOT_FOUND
   * naming the checkpoints of this session where the path exists.
   */
  async resolve(
    t: Target,
    opts: { followLast: boolean; recursive: boolean; hint?: boolean },
  ): Promise<{ engine: FilesEngine; path: string; kind: EntryKind }> {
    const { engine } = await this.prepare(t, opts.recursive);
    const r = await resolveInRoot(t.path, this.resolveOps(engine), opts.followLast);
    if (r.ok) return { engine: this.engine as FilesEngine, path: r.path, kind: r.kind };
    const what =
      r.reason === 'ENOENT'
        ? r.at === t.path
          ? 'does not exist'
          : `does not exist (${r.at} is missing)`
        : r.reason === 'ENOTDIR'
          ? `does not exist (${r.at} is not a directory)`
          : `cannot be resolved (too many levels of symlinks at ${r.at})`;
    if (opts.hint === false) {
      throw new BkfsError(
        'NOT_FOUND',
        `${formatAddress(this.vm.name, t.checkpoint, t.path, t.volume)} ${what}`,
        {
          missing: true,
        },
      );
    }
    const elsewhere = await this.whereExists(t);
    const hint =
      elsewhere.length > 0
        ? `; it exists in ${elsewhere.map((c) => `${this.vm.name}@${c}`).join(', ')}`
        : this.cps.size > 1
          ? '; it exists in none of the other checkpoints either'
          : '';
    throw new BkfsError(
      'NOT_FOUND',
      `${formatAddress(this.vm.name, t.checkpoint, t.path, t.volume)} ${what}${hint}`,
      { missing: true, existsIn: elsewhere },
    );
  }

  /** The other checkpoints of the session in which `t.path` exists (after following symlinks). */
  async whereExists(t: Target): Promise<string[]> {
    const found: string[] = [];
    for (const name of this.cps.keys()) {
      if (name === t.checkpoint) continue;
      try {
        const { engine } = await this.prepare({ ...t, checkpoint: name }, false);
        const r = await resolveInRoot(t.path, this.resolveOps(engine), true);
        if (r.ok) found.push(name);
      } catch (e) {
        if (!isBkfsError(e)) throw e;
        // that checkpoint cannot show the path (no such volume, no layout...): not there
      }
    }
    return found;
  }

  private async statEntry(engine: FilesEngine, p: string, st: GuestStat): Promise<ListEntry> {
    const e: ListEntry = { ...st, name: p === '/' ? '/' : path.posix.basename(p), path: p };
    if (st.kind === 'symlink') e.target = await engine.readlink(p);
    return e;
  }

  /** `ls`: a directory's entries (sorted), or the one entry a non-directory path names. */
  async list(t: Target): Promise<{ dir: boolean; path: string; entries: ListEntry[] }> {
    const r = await this.resolve(t, { followLast: false, recursive: false });
    let p = r.path;
    let kind = r.kind;
    if (kind === 'symlink') {
      const f = await resolveInRoot(p, this.resolveOps(r.engine), true);
      if (f.ok && f.kind === 'dir') {
        p = f.path;
        kind = 'dir';
      }
    }
    const engine = r.engine;
    if (kind !== 'dir') {
      const st = await engine.lstat(p);
      if (!st) throw new BkfsError('NOT_FOUND', `${p} vanished`);
      return { dir: false, path: p, entries: [await this.statEntry(engine, p, st)] };
    }
    const names = await engine.readdir(p);
    const stats = await engine.lstatMany(p, names);
    const entries: ListEntry[] = [];
    for (const n of names) {
      const st = stats.get(n);
      if (st) entries.push(await this.statEntry(engine, p === '/' ? `/${n}` : `${p}/${n}`, st));
    }
    return { dir: true, path: p, entries };
  }

  /** `cat`: a regular file's bytes to `out`. */
  async cat(t: Target, out: Writable): Promise<void> {
    const r = await this.resolve(t, { followLast: true, recursive: false });
    if (r.kind === 'dir') throw new BkfsError('USAGE', `${t.path} is a directory`);
    if (r.kind !== 'file') throw new BkfsError('USAGE', `${t.path} is not a regular file`);
    await r.engine.catTo(r.path, out);
  }

  /** sha256 (hex) of one regular file. */
  async checksum(t: Target): Promise<{ path: string; sha256: string; size: number }> {
    const r = await this.resolve(t, { followLast: true, recursive: false });
    if (r.kind === 'dir') throw new BkfsError('USAGE', `${t.path} is a directory`);
    if (r.kind !== 'file') throw new BkfsError('USAGE', `${t.path} is not a regular file`);
    const sums = await r.engine.checksums([r.path]);
    const st = await r.engine.lstat(r.path);
    return { path: r.path, sha256: sums.get(r.path) ?? '', size: st?.size ?? 0 };
  }

  /** `cp`: a file (or with `recursive` a tree) to `dest`, keeping mode, times and (as root) owners. */
  async copy(
    t: Target,
    dest: string,
    opts: { recursive: boolean; force: boolean },
  ): Promise<CopyPlan & { kind: EntryKind; source: string }> {
    const r = await this.resolve(t, { followLast: !opts.recursive, recursive: opts.recursive });
    const name = t.path === '/' ? '' : path.posix.basename(t.path);
    const plan = await planCopy(name, r.kind, dest, opts, async (p) => {
      try {
        const st = await fsp.lstat(p);
        return {
          kind: st.isDirectory() ? 'dir' : st.isFile() ? 'file' : st.isSymbolicLink() ? 'symlink' : 'other',
        };
      } catch {
        return null;
      }
    });
    // A read-only or foreign destination directory fails here, naming the user's path, before an
    // external copy tool meets it under the temporary name.
    try {
      await fsp.access(path.dirname(path.resolve(plan.final)), fs.constants.W_OK);
    } catch (e) {
      throw userPathError(e, 'cannot write', plan.final);
    }
    // The copy is made inside a private (0700) directory beside the target and renamed into
    // place: until its mode is the guest's, nobody else can open what is being written.
    const box = await fsp.mkdtemp(tempSibling(plan.final, randomBytes(4).toString('hex')));
    const tmp = path.join(box, 'copy');
    try {
      if (r.kind === 'symlink') {
        await fsp.symlink(await r.engine.readlink(r.path), tmp);
        await fsp.rename(tmp, plan.final);
      } else if (r.kind === 'file') {
        await r.engine.copyFile(r.path, tmp);
        await fsp.rename(tmp, plan.final);
      } else if (plan.action === 'merge') {
        await r.engine.copyTree(r.path, tmp);
        await run('cp', ['-a', '-T', '--', tmp, plan.final]);
      } else {
        await r.engine.copyTree(r.path, tmp);
        await fsp.rename(tmp, plan.final);
      }
    } catch (e) {
      // Name the user's destination, not the temporary sibling (`.name.bkfs-…`).
      throw userPathError(e, 'cannot write', plan.final);
    } finally {
      await fsp.rm(box, { recursive: true, force: true });
    }
    return { ...plan, kind: r.kind, source: r.path };
  }

  /**
   * Every entry below `t.path` (not itself), or null when the path does not exist in that
   * checkpoint. `filter` limits the entries returned (and, with libguestfs, the ones stat'ed).
   */
  async walk(t: Target, filter?: (p: string) => boolean): Promise<FileEntry[] | null> {
    let r;
    try {
      r = await this.resolve(t, { followLast: true, recursive: true, hint: false });
    } catch (e) {
      if (isBkfsError(e, 'NOT_FOUND') && e.data?.missing === true) return null;
      throw e;
    }
    if (r.kind !== 'dir') {
      const st = await r.engine.lstat(r.path);
      if (!st) return null;
      const e: FileEntry = { path: t.path, ...pick(st) };
      return !filter || filter(t.path) ? [e] : [];
    }
    const entries = await r.engine.walk(r.path, filter);
    if (r.path === t.path) return entries;
    // The path was reached through a symlink: report entries under the name the user gave.
    return entries.map((e) => ({ ...e, path: t.path + e.path.slice(r.path === '/' ? 0 : r.path.length) }));
  }

  /** sha256 of files of one checkpoint (paths as returned by `walk`). */
  async checksums(t: Target, paths: readonly string[]): Promise<Map<string, string>> {
    const r = await this.resolve(t, { followLast: true, recursive: true, hint: false });
    if (r.path === t.path) return r.engine.checksums(paths);
    const mapped = paths.map((p) => r.path + p.slice(t.path === '/' ? 0 : t.path.length));
    const sums = await r.engine.checksums(mapped);
    return new Map(paths.map((p, i) => [p, sums.get(mapped[i] as string) ?? '']));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const errors: string[] = [];
    if (this.engine) {
      try {
        await this.engine.close();
      } catch (e) {
        errors.push(errorMessage(e));
      }
      this.engine = undefined;
    }
    try {
      await this.server.close();
    } catch (e) {
      errors.push(errorMessage(e));
    }
    this.pin?.release();
    const stillMounted = fs.existsSync(this.work) && mountedBelow(this.work);
    if (!stillMounted) await fsp.rm(this.work, { recursive: true, force: true });
    else errors.push(`${this.work} still has mounts; left in place`);
    if (errors.length > 0) throw new BkfsError('MOUNT_FAILED', `cleanup: ${errors.join('; ')}`);
  }
}

function isPv(v: Volume): boolean {
  return v.probe?.type === 'LVM2_member';
}

function pick(st: GuestStat): Omit<FileEntry, 'path'> {
  return {
    kind: st.kind,
    size: st.size,
    mode: st.mode,
    uid: st.uid,
    gid: st.gid,
    mtimeSec: st.mtimeSec,
    mtimeNsec: st.mtimeNsec,
  };
}

function mountedBelow(dir: string): boolean {
  let text = '';
  try {
    text = fs.readFileSync('/proc/self/mounts', 'utf8');
  } catch {
    return false;
  }
  const real = fs.realpathSync(dir);
  return text.split('\n').some((l) => {
    const mp = (l.split(' ')[1] ?? '').replace(/\\([0-7]{3})/g, (_m, o: string) =>
      String.fromCharCode(parseInt(o, 8)),
    );
    return mp === real || mp.startsWith(real + '/');
  });
}

/** A volume in address syntax: vda:1, vdb, vg/lv. */
function volumeSpecOf(v: Volume): VolumeSpec {
  if (v.lv) return { kind: 'lv', vg: v.lv.vg, lv: v.lv.lv };
  if (v.disk !== undefined && v.partition) return { kind: 'partition', disk: v.disk, partition: v.partition };
  if (v.disk !== undefined) return { kind: 'disk', disk: v.disk };
  return { kind: 'label', value: v.probe?.label ?? v.id };
}

function volumeName(v: Volume): string {
  return formatVolumeSpec(volumeSpecOf(v));
}

/** `vdb:1 (ext4 'data')` for messages. */
function describeVolume(v: Volume): string {
  return `${volumeName(v)} (${v.probe?.type ?? '?'}${v.probe?.label ? ` '${v.probe.label}'` : ''})`;
}
