/**
 * The restore engine: writes disks of a checkpoint out of the repository.
 *
 * Design
 * - One read path: every byte comes from `CheckpointReader` — its map pages (`page()`/`extents()`)
 *   say what each range holds, and chunks come through its `ChunkLoader`, which checks each chunk's
 *   BLAKE3 hash as it decodes it. So everything restore writes was verified against the index on
 *   the way (a damaged chunk stops the restore with DATA_DAMAGED; nothing wrong is written).
 * - `planRuns` (plan.ts) turns the extents into data runs (up to `runBytes`, default 4 MiB, of
 *   contiguous chunk pieces) and zero runs. Up to `concurrency` runs (default 8) are in flight:
 *   their chunks are read from the packs in parallel (libuv pool), decompressed and hash-checked
 *   on the main thread (or, with `BKFS_RESTORE_WORKERS=N`, in N worker threads: `decode-pool.ts`),
 *   and written with one positioned write per run straight from the decoded chunk buffers (no copy
 *   for files). Concurrent loads of one chunk are shared, and a chunk loaded a second time is
 *   cached (`PooledChunks`: a disk often holds one chunk many times, but caching every chunk
 *   only cycled fresh memory, whose page faults cost more than the decoding).
 * - Full restore into a fresh file/image writes data only (zeros stay holes / unallocated
 *   clusters); into an NBD export whose content is unknown, every other byte becomes WRITE_ZEROES.
 * - Incremental restore (`since`): the two checkpoints' page tables are compared; pages with the
 *   same page id are the same bytes and skipped without reading them; differing pages are compared
 *   extent by extent (`diffExtents`: same chunk id and offset = same bytes). Only what differs is
 *   written, so the work is proportional to the change. Before writing, a few unchanged ranges of
 *   the target are compared with the repository, to refuse a target that does not hold `since`.
 *
 * Memory: bounded by `concurrency` x `runBytes` plus the chunk cache (`cacheBytes`, default
 * 64 MiB) plus, for an incremental restore, the extents of the changed pages.
 * Locking: takes no writer lock (a reader); the checkpoints it reads are pinned
 * (`pinCheckpoints`) while it runs, so forget/gc keep them. Core code: reports through
 * `onProgress`/`onNotice`, never prints.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BkfsError, isBkfsError } from '../errors';
import { makeDirs } from '../util/userpath';
import type { Repository } from '../repo/repository';
import { pinCheckpoints } from '../repo/pins';
import { CheckpointReader, type PageExtent } from '../chain/reader';
import type { ChunkLocation } from '../store/chunk-cache';
import { checkpointById, resolveRef, type CheckpointRow, type DiskRow } from '../index/catalog';
import { diffExtents, planRuns, spread, type Ext, type Run } from './plan';
import {
  RawFileTarget,
  checkFileTarget,
  createQcow2,
  detectImageFormat,
  isNbdUri,
  openNbdUri,
  updateQcow2,
  type RestoreTarget,
} from './targets';
import { rewriteDomainXml, type DiskRewrite } from './domain-xml';
import { defineDomain, domainUuid } from './libvirt';
import { checkMarker, diskMapDigest, removeMarker, writeMarker, type MarkerSubject } from './marker';
import { writeFilePrivate } from '../util/private-fs';
import { DecodePool, PooledChunks, restoreWorkers } from './decode-pool';

export type FileFormat = 'raw' | 'qcow2';

export interface RestoreProgress {
  disk: string;
  /** Data bytes written so far, over all disks. */
  done: number;
  /** Data bytes to write over all disks (grows as each disk is planned). */
  total: number;
}

export interface CopyTuning {
  /** Runs in flight (default 8). */
  concurrency?: number;
  /** Largest data run in bytes (default 4 MiB). */
  runBytes?: number;
  /** Chunk cache of the reader (default 64 MiB). */
  cacheBytes?: number;
}

export interface RestoreOptions extends CopyTuning {
  /** VM or VM@CHECKPOINT. */
  ref: string;
  /** Directory (all disks), file (with `disk`), or nbd:// / nbd+unix:// URI. */
  to: string;
  disk?: string;
  format?: FileFormat;
  /** VM@CHECKPOINT that the target already holds: write only the difference. */
  since?: string;
  /**
   * With `since`: prove that the target holds it by comparing it in full with the repository,
   * instead of by its restore marker (`marker.ts`). The only way for an NBD target.
   */
  verifyTarget?: boolean;
  force?: boolean;
  /** Define the restored VM in libvirt under this name. */
  define?: string;
  /** libvirt URI for --define on this host (e.g. qemu:///session); default: virsh's default. */
  connect?: string;
  /** Permission bits of restored image files (default 0600: owner only). */
  mode?: number;
  onProgress?: (p: RestoreProgress) => void;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
}

export interface DiskRestoreResult {
  disk: string;
  target: string;
  format: FileFormat | 'nbd';
  virtualSize: number;
  /** Data bytes written. */
  bytesWritten: number;
  /** Bytes explicitly zeroed (WRITE_ZEROES, punched holes, zero writes). */
  bytesZeroed: number;
  /** Bytes left unwritten in a fresh target (holes / unallocated clusters). */
  holes: number;
  /** Incremental restore: map pages compared extent by extent, and skipped as identical. */
  pagesCompared?: number;
  pagesSkipped?: number;
  durationMs: number;
}

export interface RestoreResult {
  vm: string;
  checkpoint: string;
  since: string | null;
  disks: DiskRestoreResult[];
  /** Configuration files written (paths). */
  configs: string[];
  /** The rewritten domain XML (path), when the checkpoint has a domain.xml. */
  domainXml: string | null;
  /** Domain name defined in libvirt. */
  defined: string | null;
  durationMs: number;
}

const DEFAULT_CONCURRENCY = 8;
export const DEFAULT_RUN_BYTES = 4 << 20;
export const DEFAULT_CACHE_BYTES = 64 << 20;
const SAMPLE_CHECKS = 8;
const SAMPLE_BYTES = 64 << 10;
export const DOMAIN_XML = 'domain.xml';

function interrupted(): BkfsError {
  return new BkfsError('INTERRUPTED', 'restore interrupted');
}

// ------------------------------------------------------------------------------------------------
// Copying runs

export interface CopyContext {
  reader: CheckpointReader;
  disk: DiskRow;
  target: RestoreTarget;
  concurrency: number;
  signal: AbortSignal | undefined;
  onBytes: (n: number) => void;
  /** Where data runs' chunks come from (default: the reader's loader, decoding on this thread). */
  chunks?: ChunkSource | undefined;
}

/** A source of checked, decoded chunks (`PooledChunks`: decoded in worker threads). */
export interface ChunkSource {
  load(loc: ChunkLocation): Promise<Buffer>;
}

/**
 * `copyRuns` of one disk with `o`'s tuning, reporting the progress over all disks (`progress`,
 * shared by the disks of one restore) before the first byte and as bytes land.
 */
export function copyDiskRuns(
  reader: CheckpointReader,
  disk: DiskRow,
  target: RestoreTarget,
  runs: Iterable<Run<ChunkLocation>>,
  o: CopyTuning & { signal?: AbortSignal; onProgress?: (p: RestoreProgress) => void },
  progress: { done: number; total: number },
  chunks?: ChunkSource,
): Promise<{ data: number; zero: number }> {
  const report = (): void => o.onProgress?.({ disk: disk.name, done: progress.done, total: progress.total });
  report();
  return copyRuns(
    {
      reader,
      disk,
      target,
      concurrency: o.concurrency ?? DEFAULT_CONCURRENCY,
      signal: o.signal,
      onBytes: (n) => {
        progress.done += n;
        report();
      },
      chunks,
    },
    runs,
  );
}

/**
 * Write `runs` to the target with up to `concurrency` runs in flight. Returns bytes written as data
 * and bytes zeroed. Stops issuing at the first error or abort and waits for what is in flight.
 */
export async function copyRuns(
  ctx: CopyContext,
  runs: Iterable<Run<ChunkLocation>>,
): Promise<{ data: number; zero: number }> {
  const { reader, disk, target } = ctx;
  const a = Math.max(1, target.align);
  const size = disk.virtual_size;
  const isAligned = (off: number, end: number) =>
    a === 1 || (off % a === 0 && (end % a === 0 || (end === size && end === target.size)));
  // Unaligned edges (only for NBD servers with a minimum block size): write whole blocks with the
  // checkpoint's own bytes around them, read through the same reader.
  const writeAround = async (off: number, end: number) => {
    const s = Math.floor(off / a) * a;
    const e = Math.min(Math.ceil(end / a) * a, Math.max(target.size, end));
    const buf = Buffer.alloc(e - s); // past the disk's end (a qcow2 rounds its size up): zeros
    (await reader.readAt(disk.name, s, e - s)).copy(buf);
    await target.write(s, [buf]);
  };
  const stats = { data: 0, zero: 0 };
  const load = ctx.chunks
    ? (loc: ChunkLocation) => ctx.chunks!.load(loc)
    : (loc: ChunkLocation) => reader.loader.load(loc.id, loc);
  const writeData = async (r: Run<ChunkLocation> & { kind: 'data' }) => {
    const bufs = await Promise.all(
      r.pieces.map(async (pc) => {
        const raw = await load(pc.loc);
        const b = raw.subarray(pc.chunkOff, pc.chunkOff + pc.length);
        if (b.length !== pc.length) {
          throw new BkfsError(
            'DATA_DAMAGED',
            `chunk ${pc.loc.hash.toString('hex').slice(0, 16)} is shorter than the map says (${raw.length} bytes)`,
          );
        }
        return b;
      }),
    );
    if (isAligned(r.offset, r.offset + r.length)) await target.write(r.offset, bufs);
    else await writeAround(r.offset, r.offset + r.length);
    stats.data += r.length;
    ctx.onBytes(r.length);
  };
  const writeZero = async (off: number, len: number) => {
    const end = off + len;
    if (isAligned(off, end)) {
      await target.zero(off, len);
    } else {
      const zs = Math.ceil(off / a) * a;
      const ze = end === size && end === target.size ? end : Math.floor(end / a) * a;
      if (zs >= ze) {
        await writeAround(off, end);
      } else {
        await target.zero(zs, ze - zs);
        if (off < zs) await writeAround(off, zs);
        if (ze < end) await writeAround(ze, end);
      }
    }
    stats.zero += len;
  };

  const inflight = new Set<Promise<void>>();
  const state: { failure: unknown; failed: boolean } = { failure: undefined, failed: false };
  for (const r of runs) {
    if (state.failed) break;
    if (ctx.signal?.aborted) {
      state.failed = true;
      state.failure = interrupted();
      break;
    }
    const job = r.kind === 'data' ? writeData(r) : writeZero(r.offset, r.length);
    const p: Promise<void> = job
      .catch((e: unknown) => {
        if (!state.failed) {
          state.failed = true;
          state.failure = e;
        }
      })
      .then(() => {
        inflight.delete(p);
      });
    inflight.add(p);
    while (inflight.size >= ctx.concurrency) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  if (state.failed) throw state.failure;
  if (ctx.signal?.aborted) throw interrupted();
  return stats;
}

/** Sum of the data extents' lengths of a checkpoint-disk (one query; for progress). */
export function dataBytes(repo: Repository, diskId: number, origin?: number): number {
  const sql = `SELECT coalesce(sum(e.length), 0) AS n FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id
                WHERE dp.disk_id = ? AND e.chunk_id IS NOT NULL${origin === undefined ? '' : ' AND e.origin = ?'}`;
  const args = origin === undefined ? [diskId] : [diskId, origin];
  return (repo.db.prepare(sql).get(...args) as { n: number }).n;
}

function pageTable(repo: Repository, diskId: number): Map<number, number> {
  const rows = repo.db.prepare('SELECT page_no, page_id FROM disk_pages WHERE disk_id = ?').all(diskId) as {
    page_no: number;
    page_id: number;
  }[];
  return new Map(rows.map((r) => [r.page_no, r.page_id]));
}

export interface DiskDiff {
  extents: Ext<ChunkLocation>[];
  /** Pages present in both tables with the same page id (identical, not read). */
  samePages: number[];
  pagesCompared: number;
}

/**
 * What disk `b` (of reader `rb`) holds where it differs from disk `a` (of reader `ra`), both of the
 * same size: page ids first, extents only inside differing pages.
 */
export function diffDisks(
  repo: Repository,
  ra: CheckpointReader,
  a: DiskRow,
  rb: CheckpointReader,
  b: DiskRow,
): DiskDiff {
  const span = repo.config.pageSpan;
  const ta = pageTable(repo, a.id);
  const tb = pageTable(repo, b.id);
  // Page tables and (format 2) digest lists: a page whose table row was lost is compared (and fails).
  const pages = [...new Set([...ta.keys(), ...tb.keys(), ...ra.pageNos(a), ...rb.pageNos(b)])].sort(
    (x, y) => x - y,
  );
  const extents: Ext<ChunkLocation>[] = [];
  const samePages: number[] = [];
  let pagesCompared = 0;
  for (const p of pages) {
    const ia = ta.get(p);
    const ib = tb.get(p);
    if (ia !== undefined && ia === ib) {
      samePages.push(p);
      continue;
    }
    pagesCompared++;
    const ea: PageExtent[] = ra.page(a, p);
    const eb: PageExtent[] = rb.page(b, p);
    const end = Math.min((p + 1) * span, b.virtual_size);
    for (const e of diffExtents(ea, eb, p * span, end)) extents.push(e);
  }
  return { extents, samePages, pagesCompared };
}

/**
 * Check that the target holds the repository's bytes in a few ranges that an incremental restore
 * will not write (the same in both checkpoints): a cheap second guard after the restore marker.
 * Throws TARGET_MISMATCH on a difference.
 */
async function checkSince(
  reader: CheckpointReader,
  disk: DiskRow,
  samePages: number[],
  target: RestoreTarget,
  sinceRef: string,
): Promise<void> {
  for (const p of spread(samePages, SAMPLE_CHECKS)) {
    const data = reader.page(disk, p).filter((e) => e.loc !== null);
    const e = data[Math.floor(data.length / 2)];
    if (!e || !e.loc) continue;
    const n = Math.min(e.length, SAMPLE_BYTES);
    const raw = await reader.loader.load(e.loc.id, e.loc);
    const want = raw.subarray(e.chunkOff, e.chunkOff + n);
    const got = await target.read(e.offset, n);
    if (!got.equals(want)) {
      throw new BkfsError(
        'TARGET_MISMATCH',
        `${target.description} does not hold ${sinceRef} (bytes at offset ${e.offset} differ): restore without --since`,
      );
    }
  }
}

function subject(repo: Repository, vm: string, cp: CheckpointRow, disk: DiskRow): MarkerSubject {
  return { repo: repo.config.id, vm, uid: cp.uid, name: cp.name, disk, mapDigest: diskMapDigest(repo, disk) };
}

/**
 * `--verify-target`: the target must hold exactly `sinceRef`'s disk (read in full, 4 MiB at a
 * time, compared with the repository); TARGET_MISMATCH at the first difference.
 */
async function compareTarget(
  reader: CheckpointReader,
  disk: DiskRow,
  target: RestoreTarget,
  sinceRef: string,
  signal: AbortSignal | undefined,
): Promise<void> {
  const step = 4 << 20;
  for (let off = 0; off < disk.virtual_size; off += step) {
    if (signal?.aborted) throw interrupted();
    const n = Math.min(step, disk.virtual_size - off);
    const [want, got] = await Promise.all([reader.readAt(disk.name, off, n), target.read(off, n)]);
    if (!got.equals(want)) {
      let i = 0;
      while (i < n && got[i] === want[i]) i++;
      throw new BkfsError(
        'TARGET_MISMATCH',
        `${target.description} does not hold ${sinceRef} (first difference at byte ${off + i}): restore without --since`,
      );
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Restore of a checkpoint

interface Job {
  disk: DiskRow;
  kind: FileFormat | 'nbd';
  to: string;
}

function fileFormatFor(file: string, given: FileFormat | undefined): FileFormat {
  if (given) return given;
  return /\.qcow2$/i.test(file) ? 'qcow2' : 'raw';
}

/** Configuration names are file names inside the target directory: nothing that climbs out. */
export function configFileName(name: string): string {
  const base = path.basename(name.replace(/\\/g, '/'));
  if (base === '' || base === '.' || base === '..') return 'config';
  return base;
}

export interface ConfigPlan {
  /** Files to write: path -> bytes. */
  files: Map<string, Buffer>;
  /** Path of the rewritten domain XML, if any. */
  domainXml: string | null;
  notes: string[];
}

/**
 * The configuration files to write into `dir`: every saved config under its name, and for a
 * libvirt `domain.xml` the rewritten XML as `domain.xml` plus the saved one as `domain.orig.xml`.
 */
export function planConfigs(
  dir: string,
  configs: { name: string; data: Buffer }[],
  disks: Record<string, DiskRewrite>,
  name: string | undefined,
  uuid?: string,
): ConfigPlan {
  const files = new Map<string, Buffer>();
  const notes: string[] = [];
  let domainXml: string | null = null;
  for (const c of configs) {
    const fname = configFileName(c.name);
    if (fname === DOMAIN_XML) {
      const r = rewriteDomainXml(c.data.toString('utf8'), {
        disks,
        ...(name !== undefined ? { name } : {}),
        ...(uuid !== undefined ? { uuid } : {}),
      });
      domainXml = path.join(dir, DOMAIN_XML);
      files.set(path.join(dir, 'domain.orig.xml'), c.data);
      files.set(domainXml, Buffer.from(r.xml, 'utf8'));
      for (const u of r.untouched)
        notes.push(`domain.xml: disk ${u} was not restored; its source is unchanged`);
      for (const m of r.missing) notes.push(`domain.xml: no <disk> with target '${m}'; add it by hand`);
    } else {
      files.set(path.join(dir, fname), c.data);
    }
  }
  return { files, domainXml, notes };
}

export async function writeConfigFiles(files: Map<string, Buffer>): Promise<void> {
  for (const [p, data] of files) {
    const tmp = `${p}.bkfs-partial`;
    await writeFilePrivate(tmp, data);
    await fsp.rename(tmp, p);
  }
}

async function openTarget(job: Job, size: number, update: boolean): Promise<RestoreTarget> {
  if (job.kind === 'nbd') return openNbdUri(job.to, size);
  if (job.kind === 'raw')
    return update ? RawFileTarget.update(job.to, size) : RawFileTarget.create(job.to, size);
  return update ? updateQcow2(job.to, size) : createQcow2(job.to, size);
}

function resolveJobs(reader: CheckpointReader, o: RestoreOptions): { jobs: Job[]; dir: string | null } {
  if (isNbdUri(o.to)) {
    if (o.format) throw new BkfsError('USAGE', '--format does not apply to an NBD target');
    let disk: DiskRow;
    if (o.disk !== undefined) disk = reader.disk(o.disk);
    else if (reader.disks.length === 1) disk = reader.disks[0]!;
    else {
      throw new BkfsError(
        'USAGE',
        `${reader.vm.name}@${reader.checkpoint.name} has ${reader.disks.length} disks: give --disk NAME for an NBD target`,
      );
    }
    return { jobs: [{ disk, kind: 'nbd', to: o.to }], dir: null };
  }
  if (o.disk !== undefined) {
    const disk = reader.disk(o.disk);
    if (fs.existsSync(o.to) && fs.statSync(o.to).isDirectory()) {
      throw new BkfsError('USAGE', `${o.to} is a directory: with --disk, --to names the file to write`);
    }
    return { jobs: [{ disk, kind: fileFormatFor(o.to, o.format), to: o.to }], dir: null };
  }
  if (fs.existsSync(o.to) && !fs.statSync(o.to).isDirectory()) {
    throw new BkfsError('USAGE', `${o.to} is a file: without --disk, --to names a directory for all disks`);
  }
  if (reader.disks.length === 0) throw new BkfsError('NOT_FOUND', 'the checkpoint has no disks');
  const jobs = reader.disks.map((disk): Job => {
    if (o.format || !o.since) {
      const kind = o.format ?? 'raw';
      return { disk, kind, to: path.join(o.to, `${disk.name}.${kind}`) };
    }
    // --since without --format: update whichever of DISK.raw / DISK.qcow2 is there.
    const have = (['raw', 'qcow2'] as const).filter((k) =>
      fs.existsSync(path.join(o.to, `${disk.name}.${k}`)),
    );
    if (have.length > 1) {
      throw new BkfsError('USAGE', `${o.to} has both ${disk.name}.raw and ${disk.name}.qcow2: give --format`);
    }
    const kind = have[0] ?? 'raw';
    return { disk, kind, to: path.join(o.to, `${disk.name}.${kind}`) };
  });
  return { jobs, dir: o.to };
}

function sinceOf(
  repo: Repository,
  reader: CheckpointReader,
  ref: string,
): { reader: CheckpointReader; cp: CheckpointRow } {
  const { vm, checkpoint } = resolveRef(repo.db, ref);
  if (vm.id !== reader.vm.id) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `--since ${ref} is a checkpoint of VM '${vm.name}', not of '${reader.vm.name}': an incremental restore needs the same VM's history`,
    );
  }
  return { reader: new CheckpointReader(repo, vm, checkpoint, { loader: reader.loader }), cp: checkpoint };
}

export async function runRestore(repo: Repository, o: RestoreOptions): Promise<RestoreResult> {
  // Decode workers (if any) start first: their threads boot while the restore is planned and
  // checked; until one is ready, chunks are decoded on this thread.
  const n = restoreWorkers();
  const pool = n > 0 ? new DecodePool(n, repo.packs.cipher) : null;
  try {
    return await restoreCheckpoint(repo, o, pool);
  } finally {
    await pool?.close();
  }
}

/** State one restore shares between its phases: what it restores, from where, and into what. */
interface RestoreRun {
  repo: Repository;
  o: RestoreOptions;
  /** Start of the restore (`durationMs`). */
  t0: number;
  reader: CheckpointReader;
  /** `VM@CHECKPOINT` of the restored checkpoint, for messages. */
  cpRef: string;
  /** The checkpoint the target already holds (`--since`), and its `VM@CHECKPOINT`. */
  since: { reader: CheckpointReader; cp: CheckpointRow } | undefined;
  sinceRef: string | null;
  jobs: Job[];
  /** Target directory of a whole-VM restore; null for one disk or an NBD export. */
  dir: string | null;
  /** Incremental restore: the targets exist and are updated in place. */
  update: boolean;
}

/** Progress over all disks of one restore. */
type RestoreCounter = { done: number; total: number };

async function restoreCheckpoint(
  repo: Repository,
  o: RestoreOptions,
  pool: DecodePool | null,
): Promise<RestoreResult> {
  const run = openRestore(repo, o);
  const { reader, since } = run;
  // Everything that can be checked is checked before anything is written.
  const sinceDisks = await checkTargets(run);
  const cfg = await planRestoreConfigs(run);
  makeTargetDir(run);

  const pin = pinCheckpoints(repo, [reader.checkpoint.id, ...(since ? [since.cp.id] : [])]);
  const progress: RestoreCounter = { done: 0, total: 0 };
  const chunks = new PooledChunks(repo.packs, pool, o.cacheBytes ?? DEFAULT_CACHE_BYTES);
  const results: DiskRestoreResult[] = [];
  try {
    stillThere(repo, [reader.checkpoint, ...(since ? [since.cp] : [])], reader.vm.name);
    for (const j of run.jobs) {
      if (o.signal?.aborted) throw interrupted();
      results.push(await restoreDisk(run, j, sinceDisks.get(j.disk.name), progress, chunks));
    }
    const defined = await writeRestoreConfigs(run, cfg);
    return {
      vm: reader.vm.name,
      checkpoint: reader.checkpoint.name,
      since: since ? since.cp.name : null,
      disks: results,
      configs: cfg ? [...cfg.files.keys()] : [],
      domainXml: cfg?.domainXml ?? null,
      defined,
      durationMs: Date.now() - run.t0,
    };
  } catch (e) {
    throw withPartialNote(e, run.jobs);
  } finally {
    pin.release();
  }
}

/** Open the checkpoint (and `--since`'s) and resolve the target of each disk; writes nothing. */
function openRestore(repo: Repository, o: RestoreOptions): RestoreRun {
  const t0 = Date.now();
  const reader = CheckpointReader.open(repo, o.ref, {
    cacheBytes: o.cacheBytes ?? DEFAULT_CACHE_BYTES,
    readAheadBytes: 0,
  });
  const cpRef = `${reader.vm.name}@${reader.checkpoint.name}`;
  const since = o.since !== undefined ? sinceOf(repo, reader, o.since) : undefined;
  const sinceRef = since ? `${since.reader.vm.name}@${since.cp.name}` : null;
  const { jobs, dir } = resolveJobs(reader, o);
  return { repo, o, t0, reader, cpRef, since, sinceRef, jobs, dir, update: since !== undefined };
}

/**
 * Check every job's disk against `--since` and its target, before anything is written; returns
 * each disk's row at `since` (empty without `--since`). May set a job's `kind` to its image's format.
 */
async function checkTargets(run: RestoreRun): Promise<Map<string, DiskRow>> {
  const sinceDisks = new Map<string, DiskRow>();
  for (const j of run.jobs) {
    if (run.since) sinceDisks.set(j.disk.name, checkSinceDisk(run, run.since, j));
    await checkTarget(run, j);
  }
  return sinceDisks;
}

/** The job's disk at `since`: same size, and (without --verify-target) a marker proving the target holds it. */
function checkSinceDisk(run: RestoreRun, since: NonNullable<RestoreRun['since']>, j: Job): DiskRow {
  const { o, sinceRef } = run;
  const sd = since.reader.disks.find((d) => d.name === j.disk.name);
  if (!sd) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `disk '${j.disk.name}' is not in ${sinceRef}: restore it without --since`,
    );
  }
  if (sd.virtual_size !== j.disk.virtual_size) {
    throw new BkfsError(
      'SIZE_CHANGED',
      `disk '${j.disk.name}' is ${j.disk.virtual_size} bytes at ${run.cpRef} but ${sd.virtual_size} at ${sinceRef}: restore without --since`,
    );
  }
  // Proof that the target holds `since` (marker.ts), or a full compare when the disk is restored.
  if (!o.verifyTarget) {
    if (j.kind === 'nbd') {
      throw new BkfsError(
        'TARGET_MISMATCH',
        `${j.to} is an NBD export and carries no bkfs restore marker: add --verify-target to compare it with ${sinceRef} in full, or restore without --since`,
      );
    }
    if (fs.existsSync(j.to)) checkMarker(j.to, subject(run.repo, since.reader.vm.name, since.cp, sd));
  }
  return sd;
}

/** A file target must not exist (fresh restore, unless --force) or must be an image of the right format (update). */
async function checkTarget(run: RestoreRun, j: Job): Promise<void> {
  const { o, update } = run;
  if (j.kind === 'nbd') return;
  if (run.dir !== null && !update) {
    if (fs.existsSync(j.to) && !o.force) {
      throw new BkfsError('TARGET_EXISTS', `${j.to} exists (use --force to replace it)`);
    }
    return; // the directory is created by makeTargetDir
  }
  checkFileTarget(j.to, update ? 'update' : 'fresh', o.force ?? false);
  if (update) {
    const fmt = await detectImageFormat(j.to);
    if (fmt !== j.kind) {
      if (o.format) {
        throw new BkfsError('TARGET_INVALID', `${j.to} is a ${fmt} image, not ${o.format}`);
      }
      j.kind = fmt;
    }
  }
}

/** Plan the configuration files of a whole-VM restore and check --define and their paths; writes nothing. */
async function planRestoreConfigs(run: RestoreRun): Promise<ConfigPlan | null> {
  const { o, dir, jobs } = run;
  const configs = dir !== null ? run.reader.configs() : [];
  const diskMap: Record<string, DiskRewrite> = {};
  for (const j of jobs) {
    if (j.kind !== 'nbd') diskMap[j.disk.name] = { path: path.resolve(j.to), format: j.kind };
  }
  const existingUuid = o.define !== undefined ? await checkDefine(run, o.define, configs) : null;
  const cfg = dir !== null ? planConfigs(dir, configs, diskMap, o.define, existingUuid ?? undefined) : null;
  if (cfg && !run.update && !o.force) {
    for (const p of cfg.files.keys()) {
      if (fs.existsSync(p)) throw new BkfsError('TARGET_EXISTS', `${p} exists (use --force to replace it)`);
    }
  }
  return cfg;
}

/** Check that `--define NAME` can be done; returns the UUID of libvirt's domain NAME, if any. */
async function checkDefine(
  run: RestoreRun,
  name: string,
  configs: { name: string; data: Buffer }[],
): Promise<string | null> {
  const { o } = run;
  if (run.dir === null)
    throw new BkfsError('USAGE', '--define needs a whole-VM restore into a directory (no --disk)');
  if (!configs.some((c) => configFileName(c.name) === DOMAIN_XML)) {
    throw new BkfsError(
      'NOT_FOUND',
      `${run.cpRef} has no saved ${DOMAIN_XML} to define (back up with --config ${DOMAIN_XML}=FILE)`,
    );
  }
  const existingUuid = await domainUuid(name, o.connect);
  if (existingUuid !== null && !o.force) {
    throw new BkfsError(
      'TARGET_EXISTS',
      `libvirt already has a domain named '${name}' (use --force to redefine it)`,
    );
  }
  return existingUuid;
}

/** Create the target directory of a whole-VM restore (the first write of the restore). */
function makeTargetDir(run: RestoreRun): void {
  if (run.dir === null) return;
  // One level at a time, coded errors naming the user's path (makeDirs; 0700 like mkdirPrivate).
  // A directory for a domain to be defined must let libvirt's QEMU user reach the disks (libvirt
  // chowns the image files, not their directories): 0711, searchable but not listable; the
  // images in it stay 0600.
  makeDirs(run.dir, 'restore target', run.o.define !== undefined ? 0o711 : 0o700);
}

/**
 * Restore one disk into its target. Crash safety: the target carries no marker while it is
 * written (a crash leaves none); the marker is written only after `target.finish()`.
 */
async function restoreDisk(
  run: RestoreRun,
  j: Job,
  sd: DiskRow | undefined,
  progress: RestoreCounter,
  chunks: PooledChunks,
): Promise<DiskRestoreResult> {
  const { o, reader } = run;
  const t1 = Date.now();
  const size = j.disk.virtual_size;
  // No marker may claim a content while the file is being written (a crash leaves none).
  if (j.kind !== 'nbd' && !run.update) removeMarker(j.to);
  const target = await openTarget(j, size, run.update);
  let ok = false;
  try {
    const { runs, diffInfo } = await planDiskRuns(run, j, sd, target, progress);
    const st = await copyDiskRuns(reader, j.disk, target, runs, o, progress, chunks);
    await target.finish();
    // Images are created 0600 (private-fs.ts); a wider mode only when the user asked for it.
    if (o.mode !== undefined && j.kind !== 'nbd') await fsp.chmod(j.to, o.mode);
    ok = true;
    if (j.kind !== 'nbd') writeMarker(j.to, subject(run.repo, reader.vm.name, reader.checkpoint, j.disk));
    if (j.kind === 'nbd' && target.size > size) {
      o.onNotice?.(
        `${target.description} is larger than the disk (${target.size} > ${size} bytes); bytes past ${size} were left as they were`,
      );
    }
    return {
      disk: j.disk.name,
      target: target.description,
      format: j.kind,
      virtualSize: size,
      bytesWritten: st.data,
      bytesZeroed: st.zero,
      holes: target.fresh ? size - st.data : 0,
      ...(diffInfo ? { pagesCompared: diffInfo.pagesCompared, pagesSkipped: diffInfo.samePages.length } : {}),
      durationMs: Date.now() - t1,
    };
  } finally {
    if (!ok) await target.abort();
  }
}

/**
 * The runs to write to one opened target and add them to `progress.total`. With `--since`: first
 * proves the target holds `since` (compare or spot checks), then removes its marker, then diffs.
 */
async function planDiskRuns(
  run: RestoreRun,
  j: Job,
  sd: DiskRow | undefined,
  target: RestoreTarget,
  progress: RestoreCounter,
): Promise<{ runs: Iterable<Run<ChunkLocation>>; diffInfo: DiskDiff | undefined }> {
  const { repo, o, reader, since } = run;
  const size = j.disk.virtual_size;
  if (since) {
    const diffInfo = diffDisks(repo, since.reader, sd!, reader, j.disk);
    if (o.verifyTarget) await compareTarget(since.reader, sd!, target, run.sinceRef!, o.signal);
    else await checkSince(reader, j.disk, diffInfo.samePages, target, run.sinceRef!);
    if (j.kind !== 'nbd') removeMarker(j.to);
    progress.total += diffInfo.extents.reduce((n, e) => n + (e.loc ? e.length : 0), 0);
    const runs = planRuns(diffInfo.extents, {
      size,
      maxRun: o.runBytes ?? DEFAULT_RUN_BYTES,
      zeros: true,
      fillGaps: false,
    });
    return { runs, diffInfo };
  }
  progress.total += dataBytes(repo, j.disk.id);
  const runs = planRuns(reader.extents(j.disk.name), {
    size,
    maxRun: o.runBytes ?? DEFAULT_RUN_BYTES,
    zeros: !target.fresh,
    fillGaps: !target.fresh,
  });
  return { runs, diffInfo: undefined };
}

/** Write the planned configuration files (temp file + rename each), then define the domain if asked. */
async function writeRestoreConfigs(run: RestoreRun, cfg: ConfigPlan | null): Promise<string | null> {
  const { o } = run;
  if (!cfg) return null;
  for (const n of cfg.notes) o.onNotice?.(n);
  await writeConfigFiles(cfg.files);
  if (o.define !== undefined && cfg.domainXml) {
    await defineDomain(cfg.domainXml, o.connect);
    return o.define;
  }
  return null;
}

/**
 * After pinning: the checkpoints must still be there (a `forget` may have run between looking them
 * up and pinning them; from the pin on, forget and gc keep them).
 */
export function stillThere(repo: Repository, cps: CheckpointRow[], vm: string): void {
  for (const cp of cps) {
    if (checkpointById(repo.db, cp.id)?.state !== 'complete') {
      throw new BkfsError('NOT_FOUND', `checkpoint ${vm}@${cp.name} was removed while the restore started`);
    }
  }
}

/** Add "partial output left in X" to an error's message when a partial file was left. */
function withPartialNote(e: unknown, jobs: Job[]): unknown {
  if (!isBkfsError(e)) return e;
  const left = jobs
    .filter((j) => j.kind !== 'nbd')
    .map((j) => `${j.to}.bkfs-partial`)
    .filter((p) => fs.existsSync(p));
  if (left.length === 0) return e;
  return new BkfsError(e.code, `${e.message} (partial output left in ${left.join(', ')})`, e.data);
}
