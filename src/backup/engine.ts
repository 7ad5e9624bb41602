/**
 * The backup engine: reads disks from sources and commits one checkpoint.
 *
 * Flow of `runBackup` (every step before 4 changes nothing in the repository):
 *   1. plan: resolve the level (`auto` -> full when the VM has no usable chain or an incremental is
 *      impossible), the base checkpoint (whose map an inc/diff overlays: the chain's latest) and
 *      the parent (inc: the base, diff: the chain's full), and which bitmap each disk must read;
 *   2. probe every source (exists, format, not in use, same virtual size as the base);
 *   3. take the writer lock (shared: other backups, forget and gc run beside it) and a session;
 *   4. insert the checkpoint as `running`; per disk: start change tracking for the new checkpoint,
 *      read the ranges to back up (full: allocated data from `base:allocation`; inc/diff: the dirty
 *      bitmap intersected with `base:allocation`, so dirty ranges that are now holes or zeros are
 *      recorded as zero extents without being read), split them on the chunk grid, hash+compress in
 *      the worker pool, dedup and append to packs, and build the disk's page map;
 *   5. seal packs (fsync), write the checkpoint's manifest (fsync), then flip the checkpoint to
 *      `complete` in one transaction (`commitCheckpoint`).
 * Failure or interruption at any point: the `running` rows are deleted (or, after a crash, by the
 * next writer), change tracking added in step 4 is rolled back, and the repository is as before.
 * Phases: `checkBackupRequest` + `makePlan` (1-2), `insertRunningCheckpoint`, `startTracking`,
 * `ingestDisks` (4), `commitBackup` (5), `dropStaleTracking` (after a full), `abortBackup` (failure).
 *
 * Memory: bounded by the read window (`readConcurrency` x `readSize`) plus the pool's jobs, never
 * by disk size; dirty/allocation maps are consumed as streams, window by window.
 * Core code: reports through `onProgress`/`onNotice`, never prints.
 */
import { randomBytes } from 'node:crypto';
import { BkfsError, isBkfsError } from '../errors';
import type { Repository } from '../repo/repository';
import { deleteCheckpointRows } from '../repo/repository';
import { commitCheckpoint, publishManifests } from '../repo/manifest';
import {
  checkName,
  checkpointById,
  checkpointDisks,
  ensureVm,
  findVm,
  listCheckpoints,
  type CheckpointRow,
  type DiskRow,
  type Level,
} from '../index/catalog';
import { DiskMapWriter, type MapExtent } from '../index/pagemap';
import { IdBlock } from '../index/ids';
import { sessionLive } from '../repo/sessions';
import { ChunkWriter, type ChunkStats } from '../store/chunk-writer';
import { IngestPool } from '../store/ingest-pool';
import { isZero } from '../store/codec';
import { orderedMap } from '../util/pipeline';
import { NbdClient } from '../nbd/client';
import type { BackupSource, BitmapHistory } from './sources';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';

export interface DiskSpec {
  name: string;
  source: BackupSource;
}

export interface BackupProgress {
  disk: string;
  /** Bytes read or resolved so far, over all disks. */
  done: number;
  /** Bytes to read over all disks (known once every disk's map was scanned). */
  total: number;
}

export interface BackupOptions {
  vm: string;
  disks: DiskSpec[];
  level: Level | 'auto';
  checkpoint?: string;
  configs?: { name: string; data: Buffer }[];
  libvirtCheckpoint?: string;
  /** The new checkpoint's uid (drawn at random when not given; libvirt names its checkpoint after it). */
  uid?: string;
  onProgress?: (p: BackupProgress) => void;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
  /**
   * Read request size (default 256 KiB, at least one chunk) and how many are in flight (default
   * 32). qemu-nbd serves reads of 1 MiB and more several times slower than 256 KiB ones, at more
   * CPU (bench/README.md), so requests stay small and many.
   */
  readSize?: number;
  readConcurrency?: number;
  /**
   * NBD connections to read through (default 2), when the server advertises multi-conn (its
   * connections see the same data): the reads spread over them, as `nbdcopy` does.
   */
  connections?: number;
  workers?: number;
  /** Filled in while the backup runs: where its time goes (see `BackupStats`). */
  stats?: BackupStats;
}

/**
 * Where a backup's time goes, for `bench/profile`. Stage times are sums over everything in
 * flight (8 reads overlap, so `readMs` can exceed the wall time); `main*Ms` is the main thread's
 * event-loop utilization over the reading phase (busy = running JS/native code, idle = waiting).
 */
export interface BackupStats {
  wallMs: number;
  /** Plan, probe, lock and source start-up (qemu-nbd), before the first read. */
  setupMs: number;
  /** Parts of the set-up: planning and probing the sources (`qemu-img info`), ... */
  planMs: number;
  /** ... the writer lock, worker pool and the checkpoint's row, ... */
  startMs: number;
  /** ... starting change tracking (`qemu-img bitmap --add`), ... */
  trackMs: number;
  /** ... and opening the sources (qemu-nbd started, NBD handshake), summed over disks. */
  openMs: number;
  /** The reading phase: first read to the last chunk handed to the pack writer. */
  ingestMs: number;
  /** Sealing the last packs and committing the checkpoint. */
  commitMs: number;
  /** Waiting for a free read buffer (the window is full). */
  bufferWaitMs: number;
  /** NBD reads, from request to the last byte received (summed over concurrent reads). */
  readMs: number;
  reads: number;
  /** Zero check of read chunks on the main thread. */
  zeroCheckMs: number;
  /** A chunk's round trip through the worker pool (queueing included), summed. */
  poolMs: number;
  /** Thread time inside the workers: BLAKE3 and zstd. */
  hashMs: number;
  compressMs: number;
  /** Dedup lookup and pack append, queueing behind earlier chunks included, summed. */
  putMs: number;
  chunks: number;
  /** Chunks stored raw because zstd did not shrink them. */
  rawChunks: number;
  mainBusyMs: number;
  mainIdleMs: number;
  /** NBD connections the data was read through (the most over the disks). */
  connections: number;
}

export function emptyBackupStats(): BackupStats {
  return {
    wallMs: 0,
    setupMs: 0,
    planMs: 0,
    startMs: 0,
    trackMs: 0,
    openMs: 0,
    ingestMs: 0,
    commitMs: 0,
    bufferWaitMs: 0,
    readMs: 0,
    reads: 0,
    zeroCheckMs: 0,
    poolMs: 0,
    hashMs: 0,
    compressMs: 0,
    putMs: 0,
    chunks: 0,
    rawChunks: 0,
    mainBusyMs: 0,
    mainIdleMs: 0,
    connections: 0,
  };
}

export interface BackupResult {
  checkpoint: CheckpointRow;
  level: Level;
  bytesRead: number;
  bytesZero: number;
  virtualSize: number;
  chunks: ChunkStats;
  durationMs: number;
}

interface DiskPlan {
  spec: DiskSpec;
  size: number;
  format: string;
  baseDisk: DiskRow | null;
  readBitmap: string | null;
}

export interface Plan {
  level: Level;
  base: CheckpointRow | null;
  parent: CheckpointRow | null;
  chainFull: CheckpointRow | null;
}

/**
 * Name of the dirty bitmap (qcow2) or libvirt checkpoint of the checkpoint with uid `uid`. A uid is
 * drawn at random for every new checkpoint, so no copy of the repository (`cp -a`) ever makes a
 * bitmap of the same name: copies never reset or reuse each other's bitmaps.
 */
export function bitmapName(uid: string): string {
  return `bkfs-${uid}`;
}
/**
 * Prefix of the bitmaps bkfs 0.1 named `bkfs-<repo id>-<checkpoint>`: every copy of a repository
 * shares these names, so an incremental never trusts one (it could have been re-created by a copy).
 */
export function legacyBitmapPrefix(repoId: string): string {
  return `bkfs-${repoId}-`;
}

/** A fresh checkpoint uid (the form of the schema's default: 32 lower-case hex digits). */
export function newCheckpointUid(): string {
  return randomBytes(16).toString('hex');
}

/** Every bitmap this repository recorded for the checkpoints of VM `vmId`, oldest first. */
export function knownBitmaps(repo: Repository, vmName: string): string[] {
  const vm = findVm(repo.db, vmName);
  if (!vm) return [];
  const rows = repo.db
    .prepare(
      `SELECT DISTINCT d.bitmap AS b FROM disks d JOIN checkpoints c ON c.id = d.checkpoint_id
       WHERE c.vm_id = ? AND d.bitmap IS NOT NULL ORDER BY c.id`,
    )
    .all(vm.id) as { b: string }[];
  return rows.map((r) => r.b);
}

/** The checkpoints an inc/diff of `vm` would build on, or nulls when there is no chain. */
export function chainPlan(repo: Repository, vmName: string, level: Level): Plan {
  if (level === 'full' || level === 'copy') return { level, base: null, parent: null, chainFull: null };
  const vm = findVm(repo.db, vmName);
  const cps = vm ? listCheckpoints(repo.db, vm.id).filter((c) => c.level !== 'copy') : [];
  const base = cps[cps.length - 1];
  if (!base) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `VM '${vmName}' has no full backup to build a${level === 'inc' ? 'n inc' : ' diff'} on: use --level full`,
    );
  }
  const chainFull = checkpointById(repo.db, base.chain_id) ?? null;
  if (!chainFull || chainFull.state !== 'complete') {
    // Forgotten full: an inc only needs the latest checkpoint (its bitmap); a diff needs the full's.
    if (level === 'inc') return { level, base, parent: base, chainFull: null };
    throw new BkfsError(
      'CHAIN_BROKEN',
      `the full backup of VM '${vmName}''s chain was forgotten, and a diff needs its bitmap: use --level inc or full`,
    );
  }
  return { level, base, parent: level === 'inc' ? base : chainFull, chainFull };
}

/** The default name of a VM's next checkpoint (check1, check2, ...), given every name it has. */
export function nextCheckpointNameOf(existing: readonly string[]): string {
  let max = 0;
  for (const n of existing) {
    const m = /^check(\d+)$/.exec(n);
    if (m) max = Math.max(max, Number(m[1]));
  }
  return `check${max + 1}`;
}

function nextCheckpointName(repo: Repository, vmName: string): string {
  const vm = findVm(repo.db, vmName);
  if (!vm) return 'check1';
  const rows = repo.db.prepare('SELECT name FROM checkpoints WHERE vm_id = ?').all(vm.id) as {
    name: string;
  }[];
  return nextCheckpointNameOf(rows.map((r) => r.name));
}

async function planDisks(repo: Repository, opts: BackupOptions, plan: Plan): Promise<DiskPlan[]> {
  const out: DiskPlan[] = [];
  const baseDisks = plan.base ? checkpointDisks(repo.db, plan.base.id) : [];
  const parentDisks = plan.parent ? checkpointDisks(repo.db, plan.parent.id) : [];
  const history: BitmapHistory = {
    expected: plan.parent ? bitmapName(plan.parent.uid) : '',
    known: plan.parent ? knownBitmaps(repo, opts.vm) : [],
    legacyPrefix: legacyBitmapPrefix(repo.config.id),
  };
  for (const spec of opts.disks) {
    const probe = await spec.source.probe();
    for (const n of probe.notes ?? []) opts.onNotice?.(`disk '${spec.name}': ${n}`);
    let baseDisk: DiskRow | null = null;
    let readBitmap: string | null = null;
    if (plan.base && plan.parent) {
      baseDisk = baseDisks.find((d) => d.name === spec.name) ?? null;
      const parentDisk = parentDisks.find((d) => d.name === spec.name);
      if (!baseDisk || !parentDisk) {
        throw new BkfsError(
          'CHAIN_BROKEN',
          `disk '${spec.name}' is not in checkpoint ${plan.parent.name}: a new disk needs --level full`,
        );
      }
      if (baseDisk.virtual_size !== probe.size) {
        throw new BkfsError(
          'SIZE_CHANGED',
          `disk '${spec.name}' changed size since ${plan.base.name} (${baseDisk.virtual_size} -> ${probe.size} bytes): use --level full`,
        );
      }
      readBitmap = await spec.source.dirtyBitmapFor(parentDisk.bitmap, history);
    }
    out.push({ spec, size: probe.size, format: probe.format, baseDisk, readBitmap });
  }
  return out;
}

/** Resolve `auto` and check everything that can be checked before the repository is touched. */
async function makePlan(repo: Repository, opts: BackupOptions): Promise<{ plan: Plan; disks: DiskPlan[] }> {
  if (opts.level !== 'auto') {
    const plan = chainPlan(repo, opts.vm, opts.level);
    return { plan, disks: await planDisks(repo, opts, plan) };
  }
  try {
    const plan = chainPlan(repo, opts.vm, 'inc');
    return { plan, disks: await planDisks(repo, opts, plan) };
  } catch (e) {
    if (!isBkfsError(e, 'CHAIN_BROKEN') && !isBkfsError(e, 'SIZE_CHANGED')) throw e;
    if (findVm(repo.db, opts.vm))
      opts.onNotice?.(`${e.message.replace(/: use --level full$/, '')}; taking a full backup`);
    const plan = chainPlan(repo, opts.vm, 'full');
    return { plan, disks: await planDisks(repo, opts, plan) };
  }
}

function checkAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new BkfsError('INTERRUPTED', 'backup interrupted');
}

/** State one backup shares between its phases (created once the writer lock is held). */
interface BackupRun {
  repo: Repository;
  opts: BackupOptions;
  plan: Plan;
  /** Wall-clock start (`started`, `durationMs`) and `performance` start (stats). */
  t0: number;
  tStart: number;
  /** Time of the last `markPhase`. */
  tMark: number;
  pool: IngestPool;
  chunks: ChunkWriter;
  /** Disks whose source prepared change tracking: rolled back on failure. */
  prepared: DiskPlan[];
  /** The `running` checkpoint row, until it is committed (then undefined again). */
  cpId: number | undefined;
  diskRows: TrackedDisk[];
  progress: { done: number; total: number };
  bytesRead: number;
  bytesZero: number;
  virtualSize: number;
}

/** A disk of the new checkpoint: its plan, its `disks` row and the bitmap started for it. */
interface TrackedDisk {
  plan: DiskPlan;
  diskId: number;
  newBitmap: string | null;
}

type PhaseKey = 'planMs' | 'startMs' | 'trackMs' | 'openMs';

/** Add the time since the last mark to `stats[k]` (when stats are kept) and set a new mark. */
function markPhase(run: BackupRun, k: PhaseKey): void {
  const now = performance.now();
  if (run.opts.stats) run.opts.stats[k] += now - run.tMark;
  run.tMark = now;
}

export async function runBackup(repo: Repository, opts: BackupOptions): Promise<BackupResult> {
  const t0 = Date.now();
  const tStart = performance.now();
  checkBackupRequest(opts);
  const { plan, disks } = await makePlan(repo, opts);
  checkAborted(opts.signal);
  const tMark = performance.now();
  if (opts.stats) opts.stats.planMs += tMark - tStart;

  // Shared with other backups and with forget/gc (FORMAT.md, "Concurrent writers").
  repo.lockWriter(`backup ${opts.vm}`, { kind: 'backup' });
  const run = newBackupRun(repo, opts, plan, { t0, tStart, tMark });
  try {
    const uid = opts.uid ?? newCheckpointUid();
    run.cpId = insertRunningCheckpoint(run, uid);
    const pageIds = new IdBlock(repo.db, 'page', 1024);
    markPhase(run, 'startMs');
    await startTracking(run, disks, uid);
    await ingestDisks(run, () => pageIds.take());
    const committedId = await commitBackup(run);
    await dropStaleTracking(run);
    return {
      checkpoint: checkpointById(repo.db, committedId)!,
      level: plan.level,
      bytesRead: run.bytesRead,
      bytesZero: run.bytesZero,
      virtualSize: run.virtualSize,
      chunks: run.chunks.stats,
      durationMs: Date.now() - t0,
    };
  } catch (e) {
    await abortBackup(run);
    throw e;
  } finally {
    await run.pool.close();
    repo.unlockWriter();
  }
}

/** The state of a backup that now holds the writer lock: its ingest pool and chunk writer. */
function newBackupRun(
  repo: Repository,
  opts: BackupOptions,
  plan: Plan,
  times: { t0: number; tStart: number; tMark: number },
): BackupRun {
  return {
    repo,
    opts,
    plan,
    ...times,
    pool: new IngestPool(repo.config.compression.level, opts.workers, repo.cipher, repo.writesRawFrames),
    chunks: new ChunkWriter(repo.db, repo.dir, undefined, repo.tmpSubdir, repo.cipher !== null),
    prepared: [],
    cpId: undefined,
    diskRows: [],
    progress: { done: 0, total: 0 },
    bytesRead: 0,
    bytesZero: 0,
    virtualSize: 0,
  };
}

/** Check the names and the disk list of a request; touches nothing. */
function checkBackupRequest(opts: BackupOptions): void {
  checkName('VM', opts.vm);
  if (opts.checkpoint !== undefined) checkName('checkpoint', opts.checkpoint);
  if (opts.disks.length === 0) throw new BkfsError('USAGE', 'no disks to back up (give --disk NAME=SOURCE)');
  const seen = new Set<string>();
  for (const d of opts.disks) {
    checkName('disk', d.name);
    if (seen.has(d.name)) throw new BkfsError('USAGE', `disk '${d.name}' is given twice`);
    seen.add(d.name);
  }
}

/**
 * Insert the checkpoint as `running` in one short write transaction: the name is chosen and the row
 * inserted with no other writer in between (a crash leaves a `running` row the next writer deletes).
 */
function insertRunningCheckpoint(run: BackupRun, uid: string): number {
  const { repo, opts, plan } = run;
  const db = repo.db;
  // A VM that another live writer is backing up is refused (its bitmaps and chain would be shared
  // by two backups at once).
  return db
    .transaction((): number => {
      const name = opts.checkpoint ?? nextCheckpointName(repo, opts.vm);
      const vm = ensureVm(db, opts.vm);
      const busy = db
        .prepare(
          "SELECT writer FROM checkpoints WHERE vm_id = ? AND state = 'running' AND writer IS NOT NULL",
        )
        .all(vm.id) as { writer: string }[];
      const other = busy.find((b) => b.writer !== repo.session && sessionLive(repo.dir, b.writer));
      if (other) {
        throw new BkfsError(
          'REPO_LOCKED',
          `VM '${opts.vm}' is being backed up by another process (pid ${other.writer.split('-')[0]})`,
        );
      }
      if (db.prepare('SELECT 1 FROM checkpoints WHERE vm_id = ? AND name = ?').get(vm.id, name)) {
        throw new BkfsError('BAD_NAME', `VM '${opts.vm}' already has a checkpoint named '${name}'`);
      }
      const ins = db
        .prepare(
          `INSERT INTO checkpoints (uid, vm_id, name, level, state, chain_id, parent_id, base_id, started, libvirt_checkpoint, writer)
             VALUES (?, ?, ?, ?, 'running', 0, ?, ?, ?, ?, ?)`,
        )
        .run(
          uid,
          vm.id,
          name,
          plan.level,
          plan.parent?.id ?? null,
          plan.base?.id ?? null,
          run.t0,
          opts.libvirtCheckpoint ?? null,
          repo.session ?? null,
        );
      const id = Number(ins.lastInsertRowid);
      db.prepare('UPDATE checkpoints SET chain_id = ? WHERE id = ?').run(plan.base?.chain_id ?? id, id);
      return id;
    })
    .immediate();
}

/**
 * Start change tracking for the new checkpoint on every disk (before any data is read) and insert
 * each disk's row; every disk that prepared tracking is in `run.prepared`, for rollback.
 */
async function startTracking(run: BackupRun, disks: DiskPlan[], uid: string): Promise<void> {
  const db = run.repo.db;
  for (const dp of disks) {
    const newBitmap = run.plan.level === 'copy' ? null : await dp.spec.source.prepare(bitmapName(uid));
    markPhase(run, 'trackMs');
    run.prepared.push(dp);
    const id = run.cpId;
    const r = db
      .transaction(() =>
        db
          .prepare(
            'INSERT INTO disks (checkpoint_id, name, virtual_size, source, format, bitmap) VALUES (?, ?, ?, ?, ?, ?)',
          )
          .run(id, dp.spec.name, dp.size, dp.spec.source.location, dp.format, newBitmap),
      )
      .immediate();
    run.diskRows.push({ plan: dp, diskId: Number(r.lastInsertRowid), newBitmap });
    run.virtualSize += dp.size;
  }
}

/** Event-loop and timing marks of the ingest phase, carried from disk to disk. */
interface IngestTimes {
  elu: EventLoopUtilization;
  tIngest: number;
}

/** Read, chunk and index every disk in turn (data goes to packs, maps to the `running` rows). */
async function ingestDisks(run: BackupRun, allocPage: () => number): Promise<void> {
  const times: IngestTimes = { elu: performance.eventLoopUtilization(), tIngest: 0 };
  for (const d of run.diskRows) await ingestDisk(run, d, allocPage, times);
}

/** Open one disk's source, back it up into its page map and record its byte counts. */
async function ingestDisk(
  run: BackupRun,
  d: TrackedDisk,
  allocPage: () => number,
  times: IngestTimes,
): Promise<void> {
  const { repo, opts } = run;
  const stats = opts.stats;
  checkAborted(opts.signal);
  run.tMark = performance.now();
  const src = await d.plan.spec.source.open(d.plan.readBitmap);
  markPhase(run, 'openMs');
  let readers: NbdClient[] = [src.client];
  if (stats) {
    if (times.tIngest === 0) stats.setupMs = performance.now() - run.tStart;
    times.tIngest = performance.now();
    times.elu = performance.eventLoopUtilization();
  }
  try {
    checkOpenedSource(d, src);
    const writer = new DiskMapWriter(
      repo.db,
      repo.config.pageSpan,
      d.diskId,
      d.plan.baseDisk?.id ?? null,
      allocPage,
    );
    readers = await moreReaders(src.client, opts.connections ?? DEFAULT_CONNECTIONS);
    const r = await backupDisk(diskJob(run, d, src.client, src.dirtyContext, writer, readers));
    writer.finish();
    recordDiskTotals(run, d, r, readers.length, times);
  } finally {
    for (const c of readers.slice(1)) await c.close().catch(() => undefined);
    await src.close();
  }
}

/** The `backupDisk` job of one disk: its source connections, map writer and tuning; progress goes to `onProgress`. */
function diskJob(
  run: BackupRun,
  d: TrackedDisk,
  client: NbdClient,
  dirtyContext: string | null,
  writer: DiskMapWriter,
  readers: NbdClient[],
): DiskJob {
  const { repo, opts } = run;
  const stats = opts.stats;
  return {
    client,
    dirtyContext,
    size: d.plan.size,
    chunkSize: repo.config.chunkSize,
    pageSpan: repo.config.pageSpan,
    recordZeros: d.plan.baseDisk !== null,
    diskId: d.diskId,
    writer,
    pool: run.pool,
    chunks: run.chunks,
    readers,
    readSize: Math.max(opts.readSize ?? DEFAULT_READ_SIZE, repo.config.chunkSize),
    readConcurrency: opts.readConcurrency ?? DEFAULT_READ_CONCURRENCY,
    signal: opts.signal,
    stats,
    onBytes: (n, total) => {
      if (total !== undefined) run.progress.total += total;
      run.progress.done += n;
      opts.onProgress?.({ disk: d.plan.spec.name, done: run.progress.done, total: run.progress.total });
    },
  };
}

/** Refuse a source that lost its dirty bitmap or changed size since it was probed. */
function checkOpenedSource(d: TrackedDisk, src: { client: NbdClient; dirtyContext: string | null }): void {
  if (src.dirtyContext && !src.client.hasMetaContext(src.dirtyContext)) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `${d.plan.spec.source.location} does not export ${src.dirtyContext}: use --level full`,
    );
  }
  if (src.client.size !== d.plan.size) {
    throw new BkfsError('SIZE_CHANGED', `disk '${d.plan.spec.name}' changed size while being backed up`);
  }
}

/** Add a disk's read/zero bytes to the run, store them in its row and update the stats. */
function recordDiskTotals(
  run: BackupRun,
  d: TrackedDisk,
  r: { read: number; zero: number },
  connections: number,
  times: IngestTimes,
): void {
  const stats = run.opts.stats;
  const db = run.repo.db;
  if (stats) stats.connections = Math.max(stats.connections, connections);
  run.bytesRead += r.read;
  run.bytesZero += r.zero;
  db.transaction(() =>
    db.prepare('UPDATE disks SET bytes_read = ?, bytes_zero = ? WHERE id = ?').run(r.read, r.zero, d.diskId),
  ).immediate();
  if (stats) {
    stats.ingestMs += performance.now() - times.tIngest;
    const u = performance.eventLoopUtilization(times.elu);
    stats.mainBusyMs += u.active;
    stats.mainIdleMs += u.idle;
  }
}

/**
 * Seal the packs (fsync), write the manifest (durable), then flip the checkpoint to `complete` in
 * one transaction (`commitCheckpoint`); returns its id. A crash before the flip leaves it `running`.
 */
async function commitBackup(run: BackupRun): Promise<number> {
  const { repo, opts, chunks, pool } = run;
  const stats = opts.stats;
  const tCommit = performance.now();
  await chunks.finish();
  // Chunks another backup indexed first: point this backup's extents at those rows.
  chunks.applyRemap(run.diskRows.map((d) => d.diskId));
  checkAborted(opts.signal);
  const committedId = run.cpId!;
  // Manifest (durable), then one transaction: configs, statistics, state = 'complete'.
  commitCheckpoint(repo, committedId, {
    configs: opts.configs ?? [],
    bytesRead: run.bytesRead,
    bytesNewRaw: chunks.stats.newRawBytes,
    bytesNewStored: chunks.stats.newStoredBytes,
    chunksNew: chunks.stats.newChunks,
  });
  run.cpId = undefined;
  // Object storage: the manifest goes to the bucket after the index commit.
  await publishManifests(repo, true);
  if (stats) {
    stats.commitMs = performance.now() - tCommit;
    stats.hashMs = pool.times.hashMs;
    stats.compressMs = pool.times.compressMs;
    stats.chunks = pool.times.chunks;
    stats.rawChunks = pool.times.rawCodecChunks;
    stats.wallMs = performance.now() - run.tStart;
  }
  return committedId;
}

/** After the commit of a full: drop change tracking that no longer serves a chain (notices only). */
async function dropStaleTracking(run: BackupRun): Promise<void> {
  const { repo, opts } = run;
  if (run.plan.level !== 'full') return;
  const history: BitmapHistory = {
    expected: '',
    known: knownBitmaps(repo, opts.vm),
    legacyPrefix: legacyBitmapPrefix(repo.config.id),
  };
  for (const d of run.diskRows) {
    const keep = new Set(d.newBitmap ? [d.newBitmap] : []);
    await d.plan.spec.source
      .afterCommit(keep, history, true)
      .catch((e: unknown) => opts.onNotice?.(`could not remove old bitmaps: ${(e as Error).message}`));
  }
}

/**
 * Undo a failed backup: drop unsealed pack data, roll back the change tracking it started and delete
 * its `running` rows, so the repository is as before.
 */
async function abortBackup(run: BackupRun): Promise<void> {
  await run.chunks.abort();
  for (const dp of run.prepared) await dp.spec.source.rollback();
  if (run.cpId !== undefined) {
    const id = run.cpId;
    const db = run.repo.db;
    db.transaction(() => deleteCheckpointRows(db, id)).immediate();
  }
}

const DEFAULT_READ_SIZE = 256 << 10;
const DEFAULT_READ_CONCURRENCY = 32;
const DEFAULT_CONNECTIONS = 2;

/**
 * `client` plus up to `n - 1` more connections to its export, when the server allows multi-conn
 * (a server that does not advertise it may give different connections inconsistent views). A
 * connection that cannot be made is simply not used: the backup reads through those it has.
 */
async function moreReaders(client: NbdClient, n: number): Promise<NbdClient[]> {
  const out = [client];
  if (!client.canMultiConn) return out;
  for (let i = 1; i < n; i++) {
    try {
      out.push(await NbdClient.connect(client.target));
    } catch {
      break;
    }
  }
  return out;
}

interface DiskJob {
  client: NbdClient;
  /** Connections to read data through (`client` first); the engine closes all but `client`. */
  readers: NbdClient[];
  dirtyContext: string | null;
  size: number;
  chunkSize: number;
  pageSpan: number;
  /** Record zero extents (inc/diff: they override the base); a full simply leaves them out. */
  recordZeros: boolean;
  diskId: number;
  writer: DiskMapWriter;
  pool: IngestPool;
  chunks: ChunkWriter;
  readSize: number;
  readConcurrency: number;
  signal: AbortSignal | undefined;
  stats: BackupStats | undefined;
  onBytes: (n: number, total?: number) => void;
}

/** A range to back up: `zero` ranges are known zeros (no read). */
interface Range {
  offset: number;
  length: number;
  zero: boolean;
}

const ALLOC = 'base:allocation';
const NBD_STATE_ZERO = 2;
const WINDOW = 1 << 30;

/**
 * The ranges to back up in [start, end): allocated data (full), or dirty ∩ allocation (inc/diff),
 * from NBD block status. Yields ranges in offset order.
 */
async function* rangesOf(job: DiskJob, start: number, end: number): AsyncGenerator<Range> {
  const c = job.client;
  const hasAlloc = c.hasMetaContext(ALLOC);
  const alloc = async function* (s: number, e: number): AsyncGenerator<Range> {
    if (!hasAlloc) {
      yield { offset: s, length: e - s, zero: false };
      return;
    }
    for await (const x of c.mapExtents(ALLOC, s, e - s)) {
      yield { offset: x.offset, length: x.length, zero: (x.flags & NBD_STATE_ZERO) !== 0 };
    }
  };
  if (!job.dirtyContext) {
    for await (const r of alloc(start, end)) if (!r.zero) yield r;
    return;
  }
  for await (const d of c.mapExtents(job.dirtyContext, start, end - start)) {
    if ((d.flags & 1) === 0) continue;
    yield* alloc(d.offset, d.offset + d.length);
  }
}

/** Split ranges on the chunk grid and group them into reads of at most `readSize`. */
function* pieces(r: Range, chunkSize: number): Generator<Range> {
  let off = r.offset;
  const end = r.offset + r.length;
  while (off < end) {
    const next = Math.min(end, (Math.floor(off / chunkSize) + 1) * chunkSize);
    yield { offset: off, length: next - off, zero: r.zero };
    off = next;
  }
}

interface ReadGroup {
  offset: number;
  length: number;
  zero: boolean;
  parts: Range[];
}

async function* readGroups(job: DiskJob, start: number, end: number): AsyncGenerator<ReadGroup> {
  let g: ReadGroup | undefined;
  for await (const r of rangesOf(job, start, end)) {
    for (const p of pieces(r, job.chunkSize)) {
      if (g && g.zero === p.zero && g.offset + g.length === p.offset && g.length + p.length <= job.readSize) {
        g.length += p.length;
        g.parts.push(p);
      } else {
        if (g) yield g;
        g = { offset: p.offset, length: p.length, zero: p.zero, parts: [p] };
      }
    }
  }
  if (g) yield g;
}

/**
 * Read buffers live in SharedArrayBuffers: the NBD client reads into them and the ingest workers
 * see the same memory (a view of a SharedArrayBuffer is shared, not copied, by postMessage), so a
 * chunk is never copied between threads. A buffer returns to the pool once every chunk of its
 * read has been hashed and compressed.
 */
class BufferPool {
  private readonly free: Buffer[] = [];
  private readonly waiters: ((b: Buffer) => void)[] = [];
  private made = 0;

  /** Up to `count` buffers of `size` bytes, made when first needed (a small incremental makes few). */
  constructor(
    private readonly count: number,
    private readonly size: number,
  ) {}

  acquire(): Promise<Buffer> {
    const b = this.free.pop();
    if (b) return Promise.resolve(b);
    if (this.made < this.count) {
      this.made++;
      return Promise.resolve(Buffer.from(new SharedArrayBuffer(this.size)));
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(b: Buffer): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }
}

async function backupDisk(job: DiskJob): Promise<{ read: number; zero: number }> {
  let read = 0;
  let zero = 0;
  // First pass over the maps (cheap: block status only) to know the total for progress.
  let total = 0;
  for await (const r of rangesOf(job, 0, job.size)) if (!r.zero) total += r.length;
  job.onBytes(0, total);
  const buffers = new BufferPool(job.readConcurrency, job.readSize);
  let nextReader = 0;
  const zeroExtent = (p: Range): MapExtent => ({
    offset: p.offset,
    length: p.length,
    chunkId: null,
    chunkOff: 0,
    origin: job.diskId,
  });

  for (let w = 0; w < job.size; w += WINDOW) {
    const wEnd = Math.min(job.size, w + WINDOW);
    const results = orderedMap(
      readGroups(job, w, wEnd),
      job.readConcurrency,
      async (g): Promise<MapExtent[]> => {
        checkAborted(job.signal);
        if (g.zero) return job.recordZeros ? g.parts.map(zeroExtent) : [];
        const st = job.stats;
        let t = st ? performance.now() : 0;
        const buf = await buffers.acquire();
        try {
          const data = buf.subarray(0, g.length);
          if (st) {
            const now = performance.now();
            st.bufferWaitMs += now - t;
            t = now;
          }
          await job.readers[(nextReader++ % job.readers.length) | 0]!.readInto(g.offset, data);
          if (st) {
            st.readMs += performance.now() - t;
            st.reads++;
          }
          read += g.length;
          const exts = await Promise.all(
            g.parts.map(async (p): Promise<MapExtent | null> => {
              const piece = data.subarray(p.offset - g.offset, p.offset - g.offset + p.length);
              let tp = st ? performance.now() : 0;
              const zero = isZero(piece);
              if (st) {
                const now = performance.now();
                st.zeroCheckMs += now - tp;
                tp = now;
              }
              if (zero) return job.recordZeros ? zeroExtent(p) : null;
              const enc = await job.pool.process(piece);
              if (st) {
                const now = performance.now();
                st.poolMs += now - tp;
                tp = now;
              }
              const id = await job.chunks.put(enc.hash, enc.codec, enc.stored, p.length, enc.tail);
              if (st) st.putMs += performance.now() - tp;
              return {
                offset: p.offset,
                length: p.length,
                chunkId: id,
                chunkOff: 0,
                origin: job.diskId,
                hash: Buffer.from(enc.hash),
              };
            }),
          );
          job.onBytes(g.length);
          return exts.filter((e): e is MapExtent => e !== null);
        } finally {
          buffers.release(buf);
        }
      },
    );
    for await (const exts of results) {
      for (const e of exts) {
        if (e.chunkId === null) zero += e.length;
        job.writer.add(e);
      }
    }
  }
  return { read, zero };
}
