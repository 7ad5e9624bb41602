/**
 * `bkfs copy`: copy checkpoints from one repository into another (issue 13 §3; FORMAT.md,
 * "Copying checkpoints between repositories").
 *
 * The source is a reader: it is opened read-only, every checkpoint to copy is pinned and then
 * checked to be still complete (the pin protocol of `pins.ts`), so a forget + gc there while the
 * copy runs hides the checkpoint but deletes none of its rows or chunks until the copy is done.
 * Its block maps are read through `CheckpointReader` (digest-checked pages), its chunks through the
 * pack reader (stored bytes, decoded and hash-checked before they are passed on).
 *
 * The destination is a writer like a backup (`lock` shared and a writer session; other backups,
 * forget and gc run beside it) and commits each checkpoint as a backup does: the checkpoint and
 * its disks are inserted `running`; chunks the destination lacks are appended to packs through
 * its `ChunkWriter` (each pack, when full, is sealed and indexed: committed in batches before the
 * checkpoint, so an interrupted copy resumes without sending them again); the block map is written
 * page by page, sharing the pages that equal those of the checkpoint's base already in the
 * destination (copy-on-write, as an incremental backup shares its base's pages); then the
 * manifest, then one transaction flips it to `complete` (rescuing gc deletion candidates it uses).
 * A crash before that leaves nothing visible; the next writer deletes the `running` rows.
 *
 * Chunk transfer:
 *   - stored path (default, when both repositories name chunks the same way: plain BLAKE3 ids):
 *     a chunk the destination has (by id, undamaged, not a gc candidate) is not read at all; the
 *     others are copied as stored records (same codec, no recompression) after a decode + hash
 *     check of the source bytes;
 *   - recompress path (`recompress`, and the only one possible when the id schemes differ, e.g.
 *     keyed ids of an encrypted repository): the plaintext is read through the source's chunk
 *     loader and stored through the destination's ingest pool, which computes the destination's
 *     own id, codec and stored bytes. Block maps are translated from source to destination ids.
 *
 * Identity: a checkpoint keeps its uid, name, level, times, statistics, configurations, protected
 * flag, libvirt checkpoint and disk rows (source, format, bitmap). Ids are the destination's own:
 * `parent_id`/`base_id`/`chain_id` and extent origins are translated through the uids of the
 * checkpoints they name; one that names a checkpoint the destination does not have (forgotten in
 * the source) becomes a fresh dangling id, drawn from the destination's id sequence before the
 * checkpoint's own row so that it never meets another checkpoint (invariant 7). Parents that are
 * still complete in the source are copied first.
 *
 * A checkpoint already in the destination under the same VM and name is skipped when its content
 * (the block map by chunk hash, `contentDigest`) is the same, and is TARGET_EXISTS otherwise; all
 * of that is decided before anything is written.
 *
 * Core code: never prints; progress and notices through callbacks.
 */
import * as fs from 'node:fs';
import { createHash } from 'node:crypto';
import type Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import {
  checkpointById,
  checkpointDisks,
  findVm,
  getCheckpoint,
  getVm,
  listCheckpoints,
  parseCheckpointRef,
  type CheckpointRow,
  type DiskRow,
} from '../index/catalog';
import { CheckpointReader, type PageExtent } from '../chain/reader';
import { ChunkLoader, type ChunkLocation } from '../store/chunk-cache';
import { ChunkWriter, type ChunkStats } from '../store/chunk-writer';
import { IngestPool } from '../store/ingest-pool';
import { CODEC_RAW, decodeStored, isRawFrames, type Codec } from '../store/codec';
import { pageSum, writeDiskSums, type PageSum } from '../index/mapsum';
import { reserveIdsInTx } from '../index/ids';
import {
  buildManifest,
  readConfigs,
  removeManifest,
  storedConfig,
  writeManifest,
  type ExtentRow,
} from './manifest';
import { healDamagedChunks, refreshCheckpointDamage, rescueCandidates } from './gc';
import { crashPoint, deleteCheckpointRows, type Repository } from './repository';
import { pinCheckpoints } from './pins';
import { sessionLive } from './sessions';

export interface CopyProgress {
  /** `VM@CP` being copied, its position and how many are copied in all. */
  checkpoint: string;
  index: number;
  count: number;
  /** Bytes of the checkpoint's disks (virtual) gone through, and their total. */
  done: number;
  total: number;
}

export interface CopyOptions {
  /** `VM` (every checkpoint of it), `VM@CP` or `VM@latest`. */
  refs: string[];
  /** Store every missing chunk through the destination's ingest pool (decode, hash, compress). */
  recompress?: boolean;
  /** Pack size of the destination's writer (tests; default PACK_TARGET). */
  packTarget?: number;
  /** How long to wait for the destination's writer lock (ms). */
  waitMs?: number;
  onProgress?: (p: CopyProgress) => void;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
}

export interface CopiedCheckpoint {
  vm: string;
  name: string;
  uid: string;
  level: string;
  /** The checkpoint's own time (when its backup started), ms since the epoch. */
  time: number;
  /** Distinct chunks its block map uses. */
  chunks: number;
  /** Chunks stored into the destination by this copy, their raw and stored bytes. */
  chunksTransferred: number;
  rawBytesTransferred: number;
  bytesTransferred: number;
  /** Chunks the destination already had (not read from the source). */
  chunksPresent: number;
  durationMs: number;
}

export interface SkippedCheckpoint {
  vm: string;
  name: string;
  uid: string;
  reason: string;
}

export interface CopyResult {
  from: string;
  to: string;
  /** 'stored': stored records copied as they are; 'recompress': through the destination's pool. */
  mode: 'stored' | 'recompress';
  copied: CopiedCheckpoint[];
  skipped: SkippedCheckpoint[];
  chunksTransferred: number;
  rawBytesTransferred: number;
  bytesTransferred: number;
  chunksPresent: number;
  /** Bytes read from the source's packs. */
  bytesReadFromSource: number;
  durationMs: number;
}

interface SourceCheckpoint {
  row: CheckpointRow;
  vm: string;
  vmCreated: number;
  /** Named on the command line (not only an ancestor of one that is). */
  requested: boolean;
}

/**
 * How a repository names and stores chunks. Stored records are copied as they are, and chunk ids
 * looked up before reading, only between repositories of one scheme; otherwise every chunk goes
 * through the recompress path (plaintext in, the destination's own id and stored bytes out). An
 * encrypted repository (keyed ids, sealed records) must give a scheme of its own per key, so that
 * stored records are never copied into a repository that cannot open them.
 */
export function idScheme(repo: Repository): string {
  // Encrypted repositories name chunks by a hash keyed with their own key (FORMAT.md,
  // "Encryption"), and their stored records are sealed with it: only the same key matches.
  return repo.cipher ? `keyed:${repo.cipher.keyIdHex}` : repo.config.hash;
}

function aborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new BkfsError('INTERRUPTED', 'copy interrupted');
}

/**
 * The checkpoints `refs` name in the source, plus every ancestor (parent, base, chain's full) that
 * is still complete there, oldest first.
 */
export function selectCheckpoints(db: Database.Database, refs: readonly string[]): SourceCheckpoint[] {
  const byId = new Map<number, SourceCheckpoint>();
  const add = (row: CheckpointRow, vm: string, vmCreated: number, requested: boolean): void => {
    const have = byId.get(row.id);
    if (have) {
      have.requested ||= requested;
      return;
    }
    byId.set(row.id, { row, vm, vmCreated, requested });
    for (const id of [row.parent_id, row.base_id, row.chain_id]) {
      if (id === null || id === row.id) continue;
      const a = checkpointById(db, id);
      if (a?.state === 'complete') add(a, vm, vmCreated, false);
    }
  };
  for (const ref of refs) {
    const r = parseCheckpointRef(ref);
    const vm = getVm(db, r.vm);
    if (!ref.includes('@')) {
      const all = listCheckpoints(db, vm.id);
      if (all.length === 0) throw new BkfsError('NOT_FOUND', `VM '${vm.name}' has no checkpoints`);
      for (const c of all) add(c, vm.name, vm.created, true);
    } else {
      add(getCheckpoint(db, vm, r.checkpoint), vm.name, vm.created, true);
    }
  }
  return [...byId.values()].sort((a, b) => a.row.id - b.row.id);
}

/**
 * What a checkpoint holds, independent of ids and of how its map is cut into pages: for each disk
 * (by name) its virtual size and its data extents by chunk hash, adjacent pieces of one chunk
 * merged, zero extents left out (they read as zeros as a hole does). Equal digests: the two
 * checkpoints read the same bytes (given one chunk id scheme).
 */
export function contentDigest(db: Database.Database, cpId: number): string {
  const h = createHash('sha256');
  const st = db.prepare(
    `SELECT e.offset AS offset, e.length AS length, e.chunk_off AS chunkOff, e.chunk_id AS chunkId, c.hash AS hash
       FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
      WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
  );
  for (const d of checkpointDisks(db, cpId)) {
    h.update(`disk ${d.name} ${d.virtual_size}\n`);
    let cur: { offset: number; length: number; chunkOff: number; hash: Buffer } | undefined;
    const emit = (): void => {
      if (cur) h.update(`${cur.offset} ${cur.length} ${cur.chunkOff} ${cur.hash.toString('hex')}\n`);
    };
    for (const r of st.iterate(d.id) as IterableIterator<{
      offset: number;
      length: number;
      chunkOff: number;
      chunkId: number | null;
      hash: Buffer | null;
    }>) {
      if (r.chunkId === null) continue;
      if (!r.hash) {
        throw new BkfsError(
          'DATA_DAMAGED',
          `disk ${d.name}: extent at ${r.offset} references chunk ${r.chunkId}, which is not in the index`,
        );
      }
      if (
        cur &&
        cur.offset + cur.length === r.offset &&
        cur.chunkOff + cur.length === r.chunkOff &&
        cur.hash.equals(r.hash)
      ) {
        cur.length += r.length;
        continue;
      }
      emit();
      cur = { offset: r.offset, length: r.length, chunkOff: r.chunkOff, hash: r.hash };
    }
    emit();
  }
  return h.digest('hex');
}

/** Run at most `n` of the returned function's tasks at once. */
function limiter(n: number): <T>(fn: () => Promise<T>) => Promise<T> {
  let active = 0;
  const queue: (() => void)[] = [];
  return async <T>(fn: () => Promise<T>): Promise<T> => {
    if (active >= n) await new Promise<void>((r) => queue.push(r));
    active++;
    try {
      return await fn();
    } finally {
      active--;
      queue.shift()?.();
    }
  };
}

/** Copy checkpoints from `src` (opened read-only) into `dst`; see the top of this file. */
export async function copyCheckpoints(src: Repository, dst: Repository, o: CopyOptions): Promise<CopyResult> {
  const t0 = Date.now();
  if (o.refs.length === 0) throw new BkfsError('USAGE', 'name at least one VM or VM@CHECKPOINT to copy');
  if (fs.realpathSync(src.dir) === fs.realpathSync(dst.dir)) {
    throw new BkfsError('USAGE', `the source and the destination are the same repository (${dst.dir})`);
  }
  if (src.config.chunkSize > dst.config.chunkSize) {
    throw new BkfsError(
      'TARGET_INVALID',
      `the destination's chunk size (${dst.config.chunkSize} bytes) is smaller than the source's (${src.config.chunkSize}): make the destination with 'bkfs init --chunk-size ${src.config.chunkSize}' or larger`,
    );
  }
  const selected = selectCheckpoints(src.db, o.refs);
  const pin = pinCheckpoints(
    src,
    selected.map((s) => s.row.id),
  );
  try {
    // Pinned, then checked: what is still complete now stays readable until the pin is released.
    const live: SourceCheckpoint[] = [];
    for (const s of selected) {
      if (checkpointById(src.db, s.row.id)?.state === 'complete') live.push(s);
      else if (s.requested) {
        throw new BkfsError(
          'NOT_FOUND',
          `checkpoint ${s.vm}@${s.row.name} was removed while the copy started`,
        );
      }
    }
    if (!src.writable) {
      o.onNotice?.(
        'the source repository is not writable by this user: the copy cannot pin what it reads, so a forget and gc there meanwhile would make it fail (never copy other bytes)',
      );
    }
    const vms = [...new Set(live.map((s) => s.vm))];
    dst.lockWriter(`copy ${vms.join(' ')}`, {
      kind: 'backup',
      ...(o.waitMs !== undefined ? { waitMs: o.waitMs } : {}),
    });
    try {
      const job = new CopyJob(src, dst, o);
      try {
        return await job.run(live, t0);
      } finally {
        await job.close();
      }
    } finally {
      dst.unlockWriter();
    }
  } finally {
    pin.release();
  }
}

interface DestChunk {
  id: number;
  hash: Buffer;
}

type Row = ExtentRow;

class CopyJob {
  private readonly sameIds: boolean;
  private readonly recompress: boolean;
  /** Source checkpoint id -> destination id, for every checkpoint copied or found present. */
  private readonly cpMap = new Map<number, number>();
  /** Dangling ids handed out in this run (source id -> destination id). */
  private readonly danglingCp = new Map<number, number>();
  private readonly danglingDisk = new Map<number, number>();
  private readonly findStmt: Database.Statement;
  private readonly limit = limiter(32);
  private pool: IngestPool | undefined;
  private loader: ChunkLoader | undefined;
  private bytesFromSource = 0;
  private batchCommitted = false;

  constructor(
    private readonly src: Repository,
    private readonly dst: Repository,
    private readonly o: CopyOptions,
  ) {
    this.sameIds = idScheme(src) === idScheme(dst);
    this.recompress = o.recompress === true || !this.sameIds;
    this.findStmt = dst.db.prepare(
      'SELECT id FROM chunks WHERE hash = ? AND damaged = 0 AND candidate IS NULL',
    );
  }

  async close(): Promise<void> {
    await this.pool?.close();
    this.loader?.clear();
  }

  async run(live: SourceCheckpoint[], t0: number): Promise<CopyResult> {
    const res: CopyResult = {
      from: this.src.dir,
      to: this.dst.dir,
      mode: this.recompress ? 'recompress' : 'stored',
      copied: [],
      skipped: [],
      chunksTransferred: 0,
      rawBytesTransferred: 0,
      bytesTransferred: 0,
      chunksPresent: 0,
      bytesReadFromSource: 0,
      durationMs: 0,
    };
    // Every decision first: a conflict fails the copy before anything is written.
    const todo: SourceCheckpoint[] = [];
    for (const s of live) {
      const present = this.decide(s);
      if (present === undefined) {
        todo.push(s);
      } else {
        this.cpMap.set(s.row.id, present);
        res.skipped.push({
          vm: s.vm,
          name: s.row.name,
          uid: s.row.uid,
          reason: 'already in the destination',
        });
      }
    }
    for (let i = 0; i < todo.length; i++) {
      aborted(this.o.signal);
      const c = await this.copyOne(todo[i]!, i + 1, todo.length);
      res.copied.push(c);
      res.chunksTransferred += c.chunksTransferred;
      res.rawBytesTransferred += c.rawBytesTransferred;
      res.bytesTransferred += c.bytesTransferred;
      res.chunksPresent += c.chunksPresent;
    }
    res.bytesReadFromSource = this.bytesFromSource;
    res.durationMs = Date.now() - t0;
    return res;
  }

  /** The destination id of a checkpoint that is already there with the same content, or undefined to copy it. */
  private decide(s: SourceCheckpoint): number | undefined {
    const db = this.dst.db;
    const where = `${s.vm}@${s.row.name}`;
    const vm = findVm(db, s.vm);
    const byName = vm
      ? (db.prepare('SELECT * FROM checkpoints WHERE vm_id = ? AND name = ?').get(vm.id, s.row.name) as
          (CheckpointRow & { writer: string | null }) | undefined)
      : undefined;
    if (byName) {
      if (byName.state === 'running') {
        if (byName.writer !== null && sessionLive(this.dst.dir, byName.writer)) {
          throw new BkfsError(
            'REPO_LOCKED',
            `${where} is being written into the destination by another process (pid ${byName.writer.split('-')[0]})`,
          );
        }
      } else if (byName.state !== 'complete') {
        throw new BkfsError(
          'TARGET_EXISTS',
          `${where} exists in the destination but is being forgotten there (a reader still uses it); retry once it is released and 'bkfs gc' ran`,
        );
      } else {
        // Different id schemes name the same data differently: then only the uid (the very
        // checkpoint, copied before) says it is the same.
        const same = this.sameIds
          ? contentDigest(db, byName.id) === contentDigest(this.src.db, s.row.id)
          : byName.uid === s.row.uid;
        if (same) return byName.id;
        throw new BkfsError(
          'TARGET_EXISTS',
          `the destination already has a different checkpoint named ${where}; forget it there first or copy into another repository`,
        );
      }
    }
    const byUid = db
      .prepare(
        'SELECT c.name AS name, v.name AS vm FROM checkpoints c JOIN vms v ON v.id = c.vm_id WHERE c.uid = ?',
      )
      .get(s.row.uid) as { name: string; vm: string } | undefined;
    if (byUid) {
      throw new BkfsError(
        'TARGET_EXISTS',
        `checkpoint ${where} (uid ${s.row.uid}) is already in the destination as ${byUid.vm}@${byUid.name}`,
      );
    }
    return undefined;
  }

  /** The destination id of source checkpoint `id` when the destination has it (copied or present). */
  private translated(id: number): number | undefined {
    const m = this.cpMap.get(id);
    if (m !== undefined) return m;
    const row = checkpointById(this.src.db, id);
    if (!row) return undefined;
    const d = this.dst.db.prepare('SELECT id FROM checkpoints WHERE uid = ?').get(row.uid) as
      { id: number } | undefined;
    return d?.id;
  }

  /** A fresh id of `table` that no row has or will ever get (inside a write transaction). */
  private freshId(table: 'checkpoints' | 'disks'): number {
    const db = this.dst.db;
    const max = (db.prepare(`SELECT coalesce(max(id), 0) AS m FROM ${table}`).get() as { m: number }).m;
    const seq = db.prepare('SELECT seq FROM sqlite_sequence WHERE name = ?').get(table) as
      { seq: number } | undefined;
    const id = Math.max(max, seq?.seq ?? 0) + 1;
    if (seq) db.prepare('UPDATE sqlite_sequence SET seq = ? WHERE name = ?').run(id, table);
    else db.prepare('INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)').run(table, id);
    return id;
  }

  /** Translate a reference to another checkpoint (inside the insert transaction). */
  private ref(id: number | null): number | null {
    if (id === null) return null;
    const t = this.translated(id);
    if (t !== undefined) return t;
    let d = this.danglingCp.get(id);
    if (d === undefined) {
      d = this.freshId('checkpoints');
      this.danglingCp.set(id, d);
    }
    return d;
  }

  private async copyOne(s: SourceCheckpoint, index: number, count: number): Promise<CopiedCheckpoint> {
    const t0 = Date.now();
    const dst = this.dst;
    const db = dst.db;
    const where = `${s.vm}@${s.row.name}`;
    const vm = { id: s.row.vm_id, name: s.vm, created: s.vmCreated };
    const reader = new CheckpointReader(this.src, vm, s.row, { cacheBytes: 16 << 20 });
    const { own, other } = this.originsOf(s, reader.disks);
    const { cpId, diskIds, origins } = this.insertRunning(s, reader.disks, own, other, where);
    const writer = new ChunkWriter(db, dst.dir, this.o.packTarget, dst.tmpSubdir, dst.cipher !== null);
    let copied: { chunks: number; present: number };
    try {
      copied = await this.copyPages(s, reader, writer, diskIds, origins, { where, index, count });
      await writer.finish();
      if (writer.packsIndexed > 0) this.afterBatch();
      writer.applyRemap([...diskIds.values()]);
      aborted(this.o.signal);
      this.commit(cpId);
    } catch (e) {
      await writer.abort();
      db.transaction(() => deleteCheckpointRows(db, cpId)).immediate();
      throw e;
    }
    this.cpMap.set(s.row.id, cpId);
    const st: ChunkStats = writer.stats;
    return {
      vm: s.vm,
      name: s.row.name,
      uid: s.row.uid,
      level: s.row.level,
      time: s.row.started,
      chunks: copied.chunks,
      chunksTransferred: st.newChunks,
      rawBytesTransferred: st.newRawBytes,
      bytesTransferred: st.newStoredBytes,
      chunksPresent: copied.present,
      durationMs: Date.now() - t0,
    };
  }

  /**
   * Where the extents of checkpoint `s` come from: its own disks (`own`: source disk id -> name),
   * or disks of other checkpoints (`other`: source disk id -> the destination's disk id, or null
   * when the destination does not have that checkpoint: a dangling origin).
   */
  private originsOf(
    s: SourceCheckpoint,
    srcDisks: readonly DiskRow[],
  ): { own: Map<number, string>; other: Map<number, number | null> } {
    const src = this.src;
    const db = this.dst.db;
    const originStmt = src.db.prepare(
      `SELECT DISTINCT e.origin AS origin FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id WHERE dp.disk_id = ?`,
    );
    const srcDiskOf = src.db.prepare('SELECT checkpoint_id AS cp, name FROM disks WHERE id = ?');
    const own = new Map<number, string>();
    const other = new Map<number, number | null>();
    for (const d of srcDisks) {
      for (const r of originStmt.iterate(d.id) as IterableIterator<{ origin: number }>) {
        if (own.has(r.origin) || other.has(r.origin)) continue;
        const info = srcDiskOf.get(r.origin) as { cp: number; name: string } | undefined;
        if (info?.cp === s.row.id) {
          own.set(r.origin, info.name);
          continue;
        }
        const dcp = info ? this.translated(info.cp) : undefined;
        const dd =
          dcp === undefined
            ? undefined
            : (db
                .prepare('SELECT id FROM disks WHERE checkpoint_id = ? AND name = ?')
                .get(dcp, info!.name) as { id: number } | undefined);
        other.set(r.origin, dd?.id ?? null);
      }
    }

    return { own, other };
  }

  /**
   * Step 1 of a checkpoint's copy (FORMAT.md, "Copying checkpoints between repositories"): one transaction inserts the
   * checkpoint as `running` with its configs and disks, after the dangling ids it needs; returns its
   * id, its disks' ids and the translation of every extent origin.
   */
  private insertRunning(
    s: SourceCheckpoint,
    srcDisks: readonly DiskRow[],
    own: Map<number, string>,
    other: Map<number, number | null>,
    where: string,
  ): { cpId: number; diskIds: Map<string, number>; origins: Map<number, number> } {
    const src = this.src;
    const dst = this.dst;
    const db = dst.db;
    // Plaintext here; sealed again for the destination (bound to the same uid) if it is encrypted.
    const configs = readConfigs(src.db, s.row.id);
    const diskIds = new Map<string, number>();
    const origins = new Map<number, number>();
    const cpId = db
      .transaction((): number => {
        // Dangling ids first, so that they are below the checkpoint's own (an index rebuild
        // restarts the sequences at the highest id the manifests name).
        for (const [o, d] of other) {
          if (d !== null) {
            origins.set(o, d);
            continue;
          }
          let x = this.danglingDisk.get(o);
          if (x === undefined) {
            x = this.freshId('disks');
            this.danglingDisk.set(o, x);
          }
          origins.set(o, x);
        }
        const parent = this.ref(s.row.parent_id);
        const base = this.ref(s.row.base_id);
        let chain: number | null = null;
        if (s.row.chain_id !== s.row.id) {
          chain = this.translated(s.row.chain_id) ?? null;
          if (chain === null && s.row.parent_id !== null) {
            // The chain's full is gone: the chain is the parent's, when they share it.
            const sp = checkpointById(src.db, s.row.parent_id);
            const dp = this.translated(s.row.parent_id);
            if (sp?.chain_id === s.row.chain_id && dp !== undefined)
              chain = checkpointById(db, dp)?.chain_id ?? null;
          }
          chain ??= this.ref(s.row.chain_id);
        }
        let vm = findVm(db, s.vm);
        if (!vm) {
          db.prepare('INSERT INTO vms (name, created) VALUES (?, ?)').run(s.vm, s.vmCreated);
          vm = findVm(db, s.vm)!;
        }
        if (db.prepare('SELECT 1 FROM checkpoints WHERE vm_id = ? AND name = ?').get(vm.id, s.row.name)) {
          throw new BkfsError('TARGET_EXISTS', `the destination got a checkpoint named ${where} meanwhile`);
        }
        const r = s.row;
        const ins = db
          .prepare(
            `INSERT INTO checkpoints (uid, vm_id, name, level, state, chain_id, parent_id, base_id, started, finished,
                                      bytes_read, bytes_new_raw, bytes_new_stored, chunks_new, libvirt_checkpoint,
                                      protected, writer)
             VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
          )
          .run(
            r.uid,
            vm.id,
            r.name,
            r.level,
            chain ?? 0,
            parent,
            base,
            r.started,
            r.finished,
            r.bytes_read,
            r.bytes_new_raw,
            r.bytes_new_stored,
            r.chunks_new,
            r.libvirt_checkpoint,
            r.protected,
            dst.session ?? null,
          );
        const id = Number(ins.lastInsertRowid);
        if (chain === null) db.prepare('UPDATE checkpoints SET chain_id = ? WHERE id = ?').run(id, id);
        const insCfg = db.prepare('INSERT INTO configs (checkpoint_id, name, data) VALUES (?, ?, ?)');
        for (const c of configs) insCfg.run(id, c.name, storedConfig(dst.cipher, s.row.uid, c.name, c.data));
        const insDisk = db.prepare(
          `INSERT INTO disks (checkpoint_id, name, virtual_size, source, format, bitmap, bytes_read, bytes_zero)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
        );
        for (const d of srcDisks) {
          const x = insDisk.run(
            id,
            d.name,
            d.virtual_size,
            d.source,
            d.format,
            d.bitmap,
            d.bytes_read,
            d.bytes_zero,
          );
          diskIds.set(d.name, Number(x.lastInsertRowid));
        }
        for (const [o, name] of own) origins.set(o, diskIds.get(name)!);
        return id;
      })
      .immediate();

    return { cpId, diskIds, origins };
  }

  /**
   * Steps 2-3: every disk's pages, in groups of pages whose chunks are sent (those the destination
   * lacks) before the pages are written. Returns how many distinct chunks the checkpoint uses and
   * how many of them the destination had.
   */
  private async copyPages(
    s: SourceCheckpoint,
    reader: CheckpointReader,
    writer: ChunkWriter,
    diskIds: Map<string, number>,
    origins: Map<number, number>,
    at: { where: string; index: number; count: number },
  ): Promise<{ chunks: number; present: number }> {
    const { where, index, count } = at;
    const src = this.src;
    const dst = this.dst;
    const db = dst.db;
    const srcDisks = reader.disks;
    const chunkMap = new Map<string, DestChunk>();
    let present = 0;
    const total = srcDisks.reduce((a, d) => a + d.virtual_size, 0);
    let done = 0;
    const shareCp = this.shareCheckpoint(s.row);
    for (const d of srcDisks) {
      const diskId = diskIds.get(d.name)!;
      const share = shareCp === undefined ? null : this.shareDisk(shareCp, d);
      const pw = new PageWriter(db, dst.config.pageSpan, diskId, share);
      const pageNos = reader.pageNos(d);
      const GROUP = 4;
      for (let i = 0; i < pageNos.length; i += GROUP) {
        aborted(this.o.signal);
        const group = pageNos.slice(i, i + GROUP).map((p) => reader.page(d, p));
        const inflight = new Map<string, Promise<void>>();
        for (const exts of group) {
          for (const e of exts) {
            if (!e.loc) continue;
            const hex = e.loc.hash.toString('hex');
            if (chunkMap.has(hex) || inflight.has(hex)) continue;
            const loc = e.loc;
            inflight.set(
              hex,
              this.limit(() => this.transfer(loc, writer, where)).then((r) => {
                if (r.present) present++;
                chunkMap.set(hex, r.chunk);
                if (writer.packsIndexed > 0) this.afterBatch();
              }),
            );
          }
        }
        const settled = await Promise.allSettled(inflight.values());
        const failed = settled.find((x): x is PromiseRejectedResult => x.status === 'rejected');
        if (failed) throw failed.reason;
        for (const exts of group) {
          for (const e of exts) pw.add(this.row(e, chunkMap, origins));
        }
        const last = pageNos[Math.min(i + GROUP, pageNos.length) - 1]!;
        this.o.onProgress?.({
          checkpoint: where,
          index,
          count,
          done: done + Math.min(d.virtual_size, (last + 1) * src.config.pageSpan),
          total,
        });
      }
      pw.finish(d.virtual_size);
      done += d.virtual_size;
      this.o.onProgress?.({ checkpoint: where, index, count, done, total });
    }
    return { chunks: chunkMap.size, present };
  }

  /** The first batch of chunks is committed (test crash/pause point `copy-after-pack`, once). */
  private afterBatch(): void {
    if (this.batchCommitted) return;
    this.batchCommitted = true;
    crashPoint('copy-after-pack');
  }

  /**
   * The destination checkpoint whose pages a copy may share: the copy of the source's base (the
   * checkpoint its map overlays), else of its parent.
   */
  private shareCheckpoint(row: CheckpointRow): number | undefined {
    for (const id of [row.base_id, row.parent_id]) {
      if (id === null) continue;
      const t = this.translated(id);
      if (t !== undefined && checkpointById(this.dst.db, t)?.state === 'complete') return t;
    }
    return undefined;
  }

  private shareDisk(cpId: number, d: DiskRow): number | null {
    const r = this.dst.db
      .prepare('SELECT id FROM disks WHERE checkpoint_id = ? AND name = ? AND virtual_size = ?')
      .get(cpId, d.name, d.virtual_size) as { id: number } | undefined;
    return r?.id ?? null;
  }

  private row(e: PageExtent, chunkMap: Map<string, DestChunk>, origins: Map<number, number>): Row {
    const origin = origins.get(e.origin);
    if (origin === undefined) throw new Error(`extent origin ${e.origin} was not translated (bug)`);
    if (!e.loc) return { offset: e.offset, length: e.length, chunkId: null, chunkOff: 0, origin, hash: null };
    const c = chunkMap.get(e.loc.hash.toString('hex'));
    if (!c) throw new Error(`chunk ${e.loc.hash.toString('hex')} was not transferred (bug)`);
    return { offset: e.offset, length: e.length, chunkId: c.id, chunkOff: e.chunkOff, origin, hash: c.hash };
  }

  /** Make the destination hold the chunk at `loc` of the source; its destination id and hash. */
  private async transfer(
    loc: ChunkLocation,
    writer: ChunkWriter,
    where: string,
  ): Promise<{ chunk: DestChunk; present: boolean }> {
    if (this.sameIds) {
      const hit = this.findStmt.get(loc.hash) as { id: number } | undefined;
      if (hit) return { chunk: { id: hit.id, hash: loc.hash }, present: true };
    }
    const damaged = (e: unknown): BkfsError =>
      new BkfsError(
        'DATA_DAMAGED',
        `${where}: chunk ${loc.hash.toString('hex').slice(0, 16)} of the source (pack ${loc.pack}) is damaged: ${(e as Error).message}; nothing of ${where} was copied`,
      );
    if (!this.recompress) {
      let stored: Buffer;
      let raw: Buffer;
      try {
        stored = await this.src.packs.read(loc.pack, loc.offset, loc.storedLen);
        this.bytesFromSource += stored.length;
        // Never pass on bytes that are not the chunk: decode and hash them first.
        raw = decodeStored(
          this.src.cipher,
          stored,
          loc.codec,
          loc.rawLen,
          loc.hash,
          this.src.config.chunkSize,
        );
      } catch (e) {
        throw damaged(e);
      }
      const rec = recordForDestination(loc, stored, raw, this.dst.writesRawFrames);
      const id = await writer.put(loc.hash, rec.codec, rec.stored, loc.rawLen);
      return { chunk: { id, hash: loc.hash }, present: false };
    }
    // A chunk is read once: the loader's cache only has to hold the ones in flight.
    this.loader ??= new ChunkLoader(this.src.db, this.src.packs, 16 << 20);
    this.pool ??= new IngestPool(
      this.dst.config.compression.level,
      undefined,
      this.dst.cipher,
      this.dst.writesRawFrames,
    );
    let raw: Buffer;
    try {
      raw = await this.loader.load(loc.id, loc);
      this.bytesFromSource += loc.storedLen;
    } catch (e) {
      throw damaged(e);
    }
    const enc = await this.pool.process(raw);
    if (!this.sameIds) {
      const hit = this.findStmt.get(enc.hash) as { id: number } | undefined;
      if (hit) return { chunk: { id: hit.id, hash: enc.hash }, present: true };
    }
    const id = await writer.put(enc.hash, enc.codec, enc.stored, raw.length, enc.tail);
    return { chunk: { id, hash: enc.hash }, present: false };
  }

  /** Manifest (durable), then one transaction: complete, gc candidates rescued, damage healed. */
  private commit(cpId: number): void {
    const db = this.dst.db;
    const m = buildManifest(db, this.dst.config.id, cpId);
    writeManifest(this.dst.dir, m);
    crashPoint('copy-after-manifest');
    try {
      db.transaction(() => {
        db.prepare("UPDATE checkpoints SET state = 'complete' WHERE id = ?").run(cpId);
        rescueCandidates(db, cpId);
        healDamagedChunks(db);
        refreshCheckpointDamage(db);
      }).immediate();
    } catch (e) {
      removeManifest(this.dst.dir, m.checkpoint.uid);
      throw e;
    }
  }
}

/**
 * Writes one destination disk's block map from extents in offset order, cut at the destination's
 * page boundaries. A page whose rows equal the share disk's page of the same number reuses that
 * page (decided and inserted in one transaction, so a forget of the share disk cannot delete the
 * page in between); others get new page ids. `finish` writes the disk's map digests.
 */
class PageWriter {
  private page = -1;
  private rows: Row[] = [];
  private pending: { pageNo: number; rows: Row[] }[] = [];
  private pendingRows = 0;
  private readonly sums: PageSum[] = [];
  shared = 0;

  constructor(
    private readonly db: Database.Database,
    private readonly pageSpan: number,
    private readonly diskId: number,
    private readonly shareDiskId: number | null,
  ) {}

  add(e: Row): void {
    let off = e.offset;
    let coff = e.chunkOff;
    const end = e.offset + e.length;
    while (off < end) {
      const p = Math.floor(off / this.pageSpan);
      const pieceEnd = Math.min(end, (p + 1) * this.pageSpan);
      if (p !== this.page) {
        this.closePage();
        this.page = p;
      }
      this.rows.push({ ...e, offset: off, length: pieceEnd - off, chunkOff: e.chunkId === null ? 0 : coff });
      coff += pieceEnd - off;
      off = pieceEnd;
    }
  }

  private closePage(): void {
    if (this.page >= 0 && this.rows.length > 0) {
      this.sums.push(pageSum(this.page, this.rows));
      this.pending.push({ pageNo: this.page, rows: this.rows });
      this.pendingRows += this.rows.length;
    }
    this.rows = [];
    this.page = -1;
    if (this.pendingRows >= 20000) this.flush();
  }

  private flush(): void {
    if (this.pending.length === 0) return;
    const pages = this.pending;
    this.pending = [];
    this.pendingRows = 0;
    const db = this.db;
    const insPage = db.prepare('INSERT INTO disk_pages (disk_id, page_no, page_id) VALUES (?, ?, ?)');
    const insExt = db.prepare(
      'INSERT INTO extents (page_id, offset, length, chunk_id, chunk_off, origin) VALUES (?, ?, ?, ?, ?, ?)',
    );
    const sharedPage = db.prepare('SELECT page_id FROM disk_pages WHERE disk_id = ? AND page_no = ?');
    const pageRows = db.prepare(
      `SELECT e.offset AS offset, e.length AS length, e.chunk_off AS chunkOff, e.origin AS origin,
              e.chunk_id AS chunkId, c.hash AS hash
         FROM extents e LEFT JOIN chunks c ON c.id = e.chunk_id WHERE e.page_id = ? ORDER BY e.offset`,
    );
    db.transaction(() => {
      const fresh: { pageNo: number; rows: Row[] }[] = [];
      for (const pg of pages) {
        const cand =
          this.shareDiskId === null
            ? undefined
            : (sharedPage.get(this.shareDiskId, pg.pageNo) as { page_id: number } | undefined);
        if (cand && sameRows(pageRows.all(cand.page_id) as Row[], pg.rows)) {
          insPage.run(this.diskId, pg.pageNo, cand.page_id);
          this.shared++;
        } else {
          fresh.push(pg);
        }
      }
      if (fresh.length === 0) return;
      let id = reserveIdsInTx(db, 'page', fresh.length);
      for (const pg of fresh) {
        insPage.run(this.diskId, pg.pageNo, id);
        for (const r of pg.rows) insExt.run(id, r.offset, r.length, r.chunkId, r.chunkOff, r.origin);
        id++;
      }
    }).immediate();
  }

  finish(virtualSize: number): void {
    this.closePage();
    this.flush();
    this.db
      .transaction(() => writeDiskSums(this.db, this.diskId, virtualSize, this.pageSpan, this.sums))
      .immediate();
  }
}

function sameRows(a: readonly Row[], b: readonly Row[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x.offset !== y.offset || x.length !== y.length || x.chunkOff !== y.chunkOff || x.origin !== y.origin)
      return false;
    if ((x.chunkId === null) !== (y.chunkId === null)) return false;
    if (x.chunkId !== null && (!x.hash || !y.hash || !x.hash.equals(y.hash))) return false;
  }
  return true;
}

/**
 * The record a chunk copied as stored bytes gets in the destination: the source's own, except a
 * raw-frames record (format 6) for a destination that does not write raw frames (a plain
 * repository in a bucket created before format 6): an older bkfs reading that repository would
 * refuse the record as damaged, so it gets the chunk's raw bytes as codec 0, as it would have had
 * before format 6. `raw` is the decoded, hash-checked chunk.
 */
export function recordForDestination(
  loc: { codec: number; storedLen: number; rawLen: number },
  stored: Buffer,
  raw: Buffer,
  destinationWritesRawFrames: boolean,
): { codec: Codec; stored: Buffer } {
  if (!destinationWritesRawFrames && isRawFrames(loc.codec, loc.storedLen, loc.rawLen)) {
    return { codec: CODEC_RAW, stored: raw };
  }
  return { codec: loc.codec as Codec, stored };
}
