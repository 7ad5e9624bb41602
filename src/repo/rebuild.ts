/**
 * `bkfs repair --rebuild-index`: recreates `index.db` from the packs and the manifests.
 *
 * Sources: packs describe their chunks (record headers: hash, lengths, codec), which gives the
 * `packs` and `chunks` tables; each manifest (`manifest.ts`) gives one checkpoint's catalogue rows,
 * configurations, disks and complete block map with chunk hashes. Checkpoint and disk ids are the
 * original ones (kept in the manifests), so chains, extent origins and reader pins stay valid;
 * chunk, pack and page ids are new. Identical pages are stored once, so the rebuilt index shares
 * pages as the original did. Manifests named by a forget journal are skipped (a forgotten
 * checkpoint never comes back).
 *
 * Oddities are reported, not fatal: a pack with a bad header or a torn record is indexed up to the
 * damage; a hash present in several packs is indexed once, from the first copy that decodes and
 * matches its hash; a chunk a manifest needs but no pack has gets a placeholder row marked
 * damaged, and its checkpoints are marked damaged (a later backup of the same data heals them).
 *
 * Crash safety: the new index is built as `index.db.rebuild`, fsynced and renamed to
 * `index.db.new`; then the old `index.db` (and its -wal/-shm) is moved aside to
 * `index.db.broken-<time>`, and `index.db.new` renamed to `index.db`. A crash before the swap
 * leaves the old index in use; a crash in the middle of it is finished by the next
 * `Repository.open`. Locking: the writer lock (taken without opening the index), and it refuses to
 * run while readers hold pins (they use the old index's ids and locations).
 * Storage: packs and manifests are read through the repository's store (FORMAT.md, "Storage
 * interface"), one code path for a local directory and a bucket: the store is listed, packs are
 * read by their trailer or record by record with ranged reads, manifests whole. What is local by
 * nature (the index files, their swap, `tmp/`) is in `index-files.ts`; this file touches no file.
 * Memory: hash -> chunk id map (about 100 bytes per chunk), every manifest (decoded: they are
 * sorted by checkpoint id before use), and one scan window of a pack (16 MiB).
 */
import type Database from 'better-sqlite3';
import { BkfsError, isBkfsError } from '../errors';
import { SCHEMA } from '../index/schema';
import type { Cipher } from '../crypto/cipher';
import { registerCipher, unlock } from '../crypto/keyring';
import { pageSum, writeDiskSums, type PageSum, type SumExtent } from '../index/mapsum';
import { decodeStored, hashChunk } from '../store/codec';
import {
  PACK_FLAG_SEALED,
  PACK_HEADER_LEN,
  PACK_MAGIC,
  PACK_VERSION,
  PACK_VERSION_TRAILER,
  PACK_VERSION_SEALED_TRAILER,
  RECORD_HEADER_LEN,
  RECORD_MAGIC,
  TRAILER_FOOTER_LEN,
  decodePackTrailer,
  decodeRecordHeader,
  trailerLength,
} from '../store/packs';
import { listManifests, listPacks, manifestKey, packKey, storeFor } from '../store/location';
import type { ObjectStore } from '../store/objstore';
import { Repository, acquireWriterLock, loadConfig } from './repository';
import { activePins } from './pins';
import {
  MAX_MANIFEST_FILE,
  decodeManifest,
  keepManifestCopy,
  listManifestUids,
  openManifestObject,
  readManifestBytes,
  storedConfig,
  finishForgetJournals,
  forgottenInJournals,
  type Manifest,
  type ManifestDisk,
} from './manifest';
import { refreshCheckpointDamage } from './gc';
import { removePending } from './gc-pending';
import { clearTmp, createBuildDb, installBuiltIndex } from './index-files';

export interface RebuildOptions {
  onProgress?: (phase: 'packs' | 'manifests', done: number, total: number) => void;
}

export interface RebuildReport {
  packs: number;
  chunks: number;
  /** Extra copies of a chunk found in more than one pack (dead space; gc removes it). */
  duplicateChunks: number;
  manifests: number;
  vms: number;
  checkpoints: number;
  /** Manifests skipped because a forget journal names them. */
  skippedForgotten: number;
  /** Chunks a manifest needs that no pack holds. */
  missingChunks: number;
  damagedCheckpoints: string[];
  problems: string[];
  /** Where the old index went (null when there was none). */
  oldIndex: string | null;
  /**
   * How the packs were read (locally and on object storage alike): by their trailer (tail
   * reads), or record by record (`wholeReads`: version-1 packs, damaged trailers).
   */
  remoteReads: { tailReads: number; wholeReads: number };
}

interface ScannedChunk {
  pack: number;
  packName: string;
  offset: number;
  storedLen: number;
  rawLen: number;
  codec: number;
  hash: Buffer;
}

/** Bytes of a pack read at once when it is scanned record by record. */
const SCAN_WINDOW = 16 << 20;

/** A pack being scanned record by record: where to read it, and the window last read. */
interface PackScan {
  read: (offset: number, length: number) => Promise<Buffer>;
  size: number;
  name: string;
  packId: number;
  problems: string[];
  chunkSize: number;
  sealed: boolean;
  win: Buffer;
  winAt: number;
}

/**
 * Read every record header of a pack through `read` (ranged reads of its object, `size` bytes);
 * returns the chunks up to the first problem. Reads windows of `SCAN_WINDOW` bytes, so a pack
 * costs a few reads whatever its records. Read-only (a crash anywhere in it changes nothing).
 */
async function scanRecords(
  read: (offset: number, length: number) => Promise<Buffer>,
  size: number,
  name: string,
  packId: number,
  problems: string[],
  chunkSize: number,
  sealed: boolean,
): Promise<ScannedChunk[]> {
  const s: PackScan = {
    read,
    size,
    name,
    packId,
    problems,
    chunkSize,
    sealed,
    win: Buffer.alloc(0),
    winAt: 0,
  };
  const head = await readPackHeader(s);
  if (!head) return [];
  const { end, sealedTrailerAt } = await recordsEnd(s, head);
  return readRecords(s, end, sealedTrailerAt);
}

/** `length` bytes at `pos` (pos + length <= size), from the window or a new window read there. */
async function scanBytes(s: PackScan, pos: number, length: number): Promise<Buffer> {
  if (pos < s.winAt || pos + length > s.winAt + s.win.length) {
    s.win = await s.read(pos, Math.max(length, Math.min(SCAN_WINDOW, s.size - pos)));
    s.winAt = pos;
  }
  return s.win.subarray(pos - s.winAt, pos - s.winAt + length);
}

/** The pack header if valid and sealed as the repository is; else null, with the problem noted. */
async function readPackHeader(s: PackScan): Promise<Buffer | null> {
  const { name, sealed, problems } = s;
  if (s.size < PACK_HEADER_LEN) {
    problems.push(`pack ${name} has no valid pack header; skipped`);
    return null;
  }
  const head = await scanBytes(s, 0, PACK_HEADER_LEN);
  if (
    !head.subarray(0, 8).equals(PACK_MAGIC) ||
    ![PACK_VERSION, PACK_VERSION_TRAILER, PACK_VERSION_SEALED_TRAILER].includes(head.readUInt32BE(8))
  ) {
    problems.push(`pack ${name} has no valid pack header; skipped`);
    return null;
  }
  if (((head.readUInt32BE(12) & PACK_FLAG_SEALED) !== 0) !== sealed) {
    problems.push(
      `pack ${name} is ${sealed ? 'not sealed in an encrypted' : 'sealed in a plain'} repository; skipped`,
    );
    return null;
  }
  return head;
}

/** Where the records end (the trailer's start, else the pack's end), and where a sealed trailer may start (-1: none). */
async function recordsEnd(s: PackScan, head: Buffer): Promise<{ end: number; sealedTrailerAt: number }> {
  const { size } = s;
  let end = size;
  // A sealed trailer (version 3) starts where its clear footer says, unchecked without opening
  // it: the scan reads records until one does not start there with a record magic (a sealed
  // trailer never does), so a forged footer cannot hide records.
  let sealedTrailerAt = -1;
  if (head.readUInt32BE(8) !== PACK_VERSION) {
    // The records end where the trailer starts; a damaged trailer: scan up to the damage.
    const footLen = Math.min(size, TRAILER_FOOTER_LEN);
    const tl = trailerLength(await s.read(size - footLen, footLen), size);
    if (tl?.sealed) sealedTrailerAt = tl.recordsEnd;
    else if (tl) end = tl.recordsEnd;
  }
  return { end, sealedTrailerAt };
}

/** The records from the header up to `end`, stopping at the first torn or damaged one (noted as a problem). */
async function readRecords(s: PackScan, end: number, sealedTrailerAt: number): Promise<ScannedChunk[]> {
  const { name, problems } = s;
  const out: ScannedChunk[] = [];
  let pos = PACK_HEADER_LEN;
  while (pos < end) {
    if (pos === sealedTrailerAt && !(await scanBytes(s, pos, Math.min(4, end - pos))).equals(RECORD_MAGIC))
      break;
    if (pos + RECORD_HEADER_LEN > end) {
      problems.push(`pack ${name} ends with a torn record at ${pos}`);
      break;
    }
    let h;
    try {
      h = decodeRecordHeader(await scanBytes(s, pos, RECORD_HEADER_LEN), s.chunkSize, s.sealed);
    } catch (e) {
      problems.push(
        `pack ${name} has a damaged record header at ${pos} (${(e as Error).message}); the rest of the pack is skipped`,
      );
      break;
    }
    const start = pos + RECORD_HEADER_LEN;
    if (start + h.storedLen > end) {
      problems.push(`pack ${name} is truncated inside the record at ${pos}`);
      break;
    }
    out.push({
      pack: s.packId,
      packName: name,
      offset: start,
      storedLen: h.storedLen,
      rawLen: h.rawLen,
      codec: h.codec,
      hash: h.hash,
    });
    pos = start + h.storedLen;
  }
  return out;
}

/**
 * The chunks of a pack in the store, local directory or bucket alike: its trailer (version 2;
 * version 3 sealed, opened with the repository's key) from one ranged read of the tail (a second
 * one if the trailer is longer), else (version 1, or a damaged trailer, or a sealed one that does
 * not open: changed, or moved from another pack) its record headers (`scanRecords`). In an
 * encrypted repository a plain trailer is taken only from a pack whose header says version 2
 * (written before sealed trailers; one more 16-byte read). A pack that vanished or shrank since it
 * was listed is a problem, not an error; a store that cannot be reached is an error.
 */
async function scanPackObject(
  store: ObjectStore,
  name: string,
  size: number,
  packId: number,
  problems: string[],
  chunkSize: number,
  stats: { tailReads: number; wholeReads: number },
  cipher: Cipher | null,
): Promise<ScannedChunk[]> {
  const sealed = cipher !== null;
  const key = packKey(name);
  try {
    if (size >= PACK_HEADER_LEN + TRAILER_FOOTER_LEN) {
      const tailLen = Math.min(size, 64 << 10);
      let tail = await store.getRange(key, size - tailLen, tailLen);
      stats.tailReads++;
      const tl = trailerLength(tail, size);
      if (tl) {
        if (tl.length > tail.length) tail = await store.getRange(key, size - tl.length, tl.length);
        else tail = tail.subarray(tail.length - tl.length);
        try {
          let allowPlain = true;
          if (cipher && !tl.sealed) {
            const head = await store.getRange(key, 0, PACK_HEADER_LEN);
            allowPlain = head.length === PACK_HEADER_LEN && head.readUInt32BE(8) === PACK_VERSION_TRAILER;
          }
          const key5 = cipher ? { cipher, pack: name } : undefined;
          return decodePackTrailer(tail, size, chunkSize, key5, allowPlain).map((c) => ({
            pack: packId,
            packName: name,
            offset: c.offset,
            storedLen: c.storedLen,
            rawLen: c.rawLen,
            codec: c.codec,
            hash: c.hash,
          }));
        } catch (e) {
          problems.push(`pack ${name}: ${(e as Error).message}; the whole pack is read instead`);
        }
      }
    }
    stats.wholeReads++;
    return await scanRecords(
      (offset, length) => store.getRange(key, offset, length),
      size,
      name,
      packId,
      problems,
      chunkSize,
      sealed,
    );
  } catch (e) {
    if (isBkfsError(e) && (e.code === 'NOT_FOUND' || e.code === 'DATA_DAMAGED')) {
      problems.push(`pack ${name} cannot be read: ${e.message}`);
      return [];
    }
    throw e;
  }
}

async function chunkIsGood(
  store: ObjectStore,
  c: ScannedChunk,
  chunkSize: number,
  cipher: Cipher | null,
): Promise<boolean> {
  try {
    const buf = await store.getRange(packKey(c.packName), c.offset, c.storedLen);
    decodeStored(cipher, buf, c.codec, c.rawLen, c.hash, chunkSize);
    return true;
  } catch (e) {
    if (isBkfsError(e) && (e.code === 'STORE_UNAVAILABLE' || e.code === 'STORE_ACCESS')) throw e;
    return false;
  }
}

/**
 * Every manifest's zstd bytes, in uid order: the store's (the bucket's copy, kept in the cache
 * directory too: `keepManifestCopy`), then any the repository directory has that the store lacks
 * (a cache directory whose writer died before uploading; none for a local repository, whose
 * store is its directory). A manifest that cannot be read or opened is a problem, not an error.
 */
async function readAllManifests(
  dir: string,
  store: ObjectStore,
  problems: string[],
  skip: (uid: string) => boolean,
): Promise<{ uid: string; data: Buffer }[]> {
  const out: { uid: string; data: Buffer }[] = [];
  const seen = new Set<string>();
  for (const { uid, size } of await listManifests(store)) {
    seen.add(uid);
    if (skip(uid)) continue;
    try {
      if (size > MAX_MANIFEST_FILE) {
        throw new BkfsError(
          'REPO_CORRUPT',
          `manifest ${uid} is damaged: ${size} bytes is more than a manifest can be`,
        );
      }
      const data = await store.get(manifestKey(uid));
      keepManifestCopy(dir, store, uid, data);
      out.push({ uid, data: openManifestObject(dir, uid, data) });
    } catch (e) {
      if (isBkfsError(e) && (e.code === 'STORE_UNAVAILABLE' || e.code === 'STORE_ACCESS')) throw e;
      problems.push((e as Error).message);
    }
  }
  for (const uid of listManifestUids(dir)) {
    if (seen.has(uid) || skip(uid)) continue;
    try {
      out.push({ uid, data: readManifestBytes(dir, uid) });
    } catch (e) {
      problems.push((e as Error).message);
    }
  }
  return out.sort((a, b) => (a.uid < b.uid ? -1 : a.uid > b.uid ? 1 : 0));
}

export async function rebuildIndex(dir: string, o: RebuildOptions = {}): Promise<RebuildReport> {
  const config = loadConfig(dir);
  // Unlocked before anything is touched: a missing or wrong key leaves the repository as it is.
  const cipher = config.encryption ? unlock(dir, config.id, config.encryption) : null;
  registerCipher(dir, cipher);
  const lock = acquireWriterLock(dir, 'repair --rebuild-index');
  try {
    // The pins module only needs the directory.
    const readers = activePins({ dir });
    if (readers.length > 0) {
      throw new BkfsError(
        'REPO_LOCKED',
        `readers are using the repository (pid ${[...new Set(readers.map((r) => r.pid))].join(', ')}): stop them (unmount) first`,
      );
    }
    return await build(dir, config.id, config.chunkSize, config.pageSpan, o, config.format, cipher);
  } finally {
    lock.release();
  }
}

/** What the phases of one rebuild share. */
interface Build {
  repoId: string;
  chunkSize: number;
  pageSpan: number;
  cipher: Cipher | null;
  o: RebuildOptions;
  /** The index being built (`index.db.rebuild`). */
  db: Database.Database;
  rep: RebuildReport;
  /** Chunk id of every hash (hex) indexed so far: from the packs, then placeholders. */
  chunkIds: Map<string, number>;
}

const INSERT_CHUNK =
  'INSERT INTO chunks (hash, pack_id, offset, stored_len, raw_len, codec, damaged) VALUES (?, ?, ?, ?, ?, ?, ?)';

/** Builds the new index as `index.db.rebuild`, phase by phase, then swaps it in (`installIndex`). */
async function build(
  dir: string,
  repoId: string,
  chunkSize: number,
  pageSpan: number,
  o: RebuildOptions,
  format: number,
  cipher: Cipher | null,
): Promise<RebuildReport> {
  const rep = newRebuildReport();
  clearTmp(dir);
  const db = createBuildDb(dir);
  try {
    initBuildDb(db, format, repoId);
    const b: Build = { repoId, chunkSize, pageSpan, cipher, o, db, rep, chunkIds: new Map() };

    // Manifests are listed before the packs: every pack a listed manifest needs was durable
    // before the manifest was written, so it is in the pack listing that follows.
    const store = storeFor(dir);
    const forgotten = forgottenInJournals(dir);
    const skip = (uid: string): boolean => {
      if (!forgotten.uids.has(uid)) return false;
      rep.skippedForgotten++;
      return true;
    };
    const manifestData = await readAllManifests(dir, store, rep.problems, skip);

    const copies = await indexPacks(b, store);
    await pickIntactCopies(b, store, copies);

    const manifests = decodeManifests(b, manifestData);
    const vmIds = insertVms(db, manifests);
    rep.vms = vmIds.size;
    restoreCheckpoints(b, manifests, vmIds);
    reserveCheckpointIds(db, forgotten.maxId, manifests);
    refreshCheckpointDamage(db);
  } finally {
    db.close();
  }
  rep.oldIndex = installIndex(dir);
  return rep;
}

/** A report with every count at 0. */
function newRebuildReport(): RebuildReport {
  return {
    packs: 0,
    chunks: 0,
    duplicateChunks: 0,
    manifests: 0,
    vms: 0,
    checkpoints: 0,
    skippedForgotten: 0,
    missingChunks: 0,
    damagedCheckpoints: [],
    problems: [],
    oldIndex: null,
    remoteReads: { tailReads: 0, wholeReads: 0 },
  };
}

/** Schema and meta rows of the new index; no journal nor fsyncs (the file is fsynced before its swap). */
function initBuildDb(db: Database.Database, format: number, repoId: string): void {
  db.pragma('journal_mode = MEMORY');
  db.pragma('synchronous = OFF');
  db.exec(SCHEMA);
  db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('format', String(format));
  db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('repo_id', repoId);
}

/**
 * Packs -> `packs` and `chunks` rows (one transaction per pack), read through the store (the
 * directory, or the bucket). A hash found again is indexed once; returns every copy of each hash.
 */
async function indexPacks(b: Build, store: ObjectStore): Promise<Map<string, ScannedChunk[]>> {
  const { db, rep } = b;
  const files = await listPacks(store);
  const insPack = db.prepare('INSERT INTO packs (name, size, created) VALUES (?, ?, ?)');
  const insChunk = db.prepare(INSERT_CHUNK);
  const copies = new Map<string, ScannedChunk[]>();
  let i = 0;
  for (const f of files) {
    const packId = Number(insPack.run(f.name, f.size, Date.now()).lastInsertRowid);
    rep.packs++;
    const scanned = await scanPackObject(
      store,
      f.name,
      f.size,
      packId,
      rep.problems,
      b.chunkSize,
      rep.remoteReads,
      b.cipher,
    );
    db.transaction(() => {
      for (const c of scanned) {
        const hex = c.hash.toString('hex');
        const first = copies.get(hex);
        if (first) {
          first.push(c);
          rep.duplicateChunks++;
          continue;
        }
        copies.set(hex, [c]);
        const id = Number(
          insChunk.run(c.hash, c.pack, c.offset, c.storedLen, c.rawLen, c.codec, 0).lastInsertRowid,
        );
        b.chunkIds.set(hex, id);
        rep.chunks++;
      }
    })();
    b.o.onProgress?.('packs', ++i, files.length);
  }
  return copies;
}

/**
 * A hash stored more than once (a chunk stored again after damage, a crash before indexing):
 * index the first copy that is intact (damaged when none is). Empties `copies`.
 */
async function pickIntactCopies(
  b: Build,
  store: ObjectStore,
  copies: Map<string, ScannedChunk[]>,
): Promise<void> {
  const repoint = b.db.prepare(
    'UPDATE chunks SET pack_id = ?, offset = ?, stored_len = ?, raw_len = ?, codec = ?, damaged = ? WHERE id = ?',
  );
  for (const [hex, cs] of copies) {
    if (cs.length < 2) continue;
    let good: ScannedChunk | undefined;
    for (const c of cs) {
      if (await chunkIsGood(store, c, b.chunkSize, b.cipher)) {
        good = c;
        break;
      }
    }
    const c = good ?? cs[0]!;
    repoint.run(c.pack, c.offset, c.storedLen, c.rawLen, c.codec, good ? 0 : 1, b.chunkIds.get(hex)!);
  }
  copies.clear();
}

/** Decodes the manifests (emptying `manifestData`) of this repository, sorted by checkpoint id. */
function decodeManifests(b: Build, manifestData: { uid: string; data: Buffer }[]): Manifest[] {
  const manifests: Manifest[] = [];
  for (const { uid, data } of manifestData.splice(0)) {
    try {
      const m = decodeManifest(data, `${uid}.json.zst`);
      if (m.repo !== b.repoId) {
        b.rep.problems.push(`manifest ${uid} belongs to repository ${m.repo}; skipped`);
        continue;
      }
      manifests.push(m);
    } catch (e) {
      b.rep.problems.push((e as Error).message);
    }
  }
  manifests.sort((x, y) => x.checkpoint.id - y.checkpoint.id);
  b.rep.manifests = manifests.length;
  return manifests;
}

/** One `vms` row per VM name the manifests use (in manifest order); returns their ids. */
function insertVms(db: Database.Database, manifests: Manifest[]): Map<string, number> {
  const vmIds = new Map<string, number>();
  const insVm = db.prepare('INSERT INTO vms (name, created) VALUES (?, ?)');
  for (const m of manifests) {
    const id = vmIds.get(m.vm.name);
    if (id === undefined) {
      vmIds.set(m.vm.name, Number(insVm.run(m.vm.name, m.vm.created).lastInsertRowid));
    }
  }
  return vmIds;
}

/** The statements the checkpoint phase runs, prepared once. */
function checkpointStatements(db: Database.Database) {
  return {
    insCp: db.prepare(
      `INSERT INTO checkpoints (id, uid, vm_id, name, level, state, chain_id, parent_id, base_id, started, finished,
                                bytes_read, bytes_new_raw, bytes_new_stored, chunks_new, libvirt_checkpoint, protected, damaged)
       VALUES (?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    ),
    insCfg: db.prepare('INSERT INTO configs (checkpoint_id, name, data) VALUES (?, ?, ?)'),
    insDisk: db.prepare(
      `INSERT INTO disks (id, checkpoint_id, name, virtual_size, source, format, bitmap, bytes_read, bytes_zero)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    ),
    insDp: db.prepare('INSERT INTO disk_pages (disk_id, page_no, page_id) VALUES (?, ?, ?)'),
    insExt: db.prepare(
      'INSERT INTO extents (page_id, offset, length, chunk_id, chunk_off, origin) VALUES (?, ?, ?, ?, ?, ?)',
    ),
    nameTaken: db.prepare('SELECT 1 FROM checkpoints WHERE vm_id = ? AND name = ?'),
    idTaken: db.prepare('SELECT 1 FROM checkpoints WHERE id = ? OR uid = ?'),
    insChunk: db.prepare(INSERT_CHUNK),
  };
}

/** What the checkpoint phase shares across manifests. */
interface Restore {
  b: Build;
  st: ReturnType<typeof checkpointStatements>;
  /** Page id of each stored page, by a key of its rows: identical pages are stored once. */
  pageIds: Map<string, number>;
  /** Ids of placeholder chunks (hashes no pack holds). */
  placeholders: Set<number>;
  /** The last page id given. */
  nextPage: number;
}

/** What one manifest's transaction did: chunks missing, map entries made (forgotten if it rolls back). */
interface ManifestTx {
  missing: number;
  newPages: string[];
  newHashes: string[];
}

/** An `extents` row of a page: offset, length, chunk id (null: zeros), offset in the chunk, origin disk. */
type ExtentRow = [number, number, number | null, number, number];

/** Manifests -> catalogue and block maps, one transaction per checkpoint (one that fails leaves no row). */
function restoreCheckpoints(b: Build, manifests: Manifest[], vmIds: Map<string, number>): void {
  const r: Restore = {
    b,
    st: checkpointStatements(b.db),
    pageIds: new Map(),
    placeholders: new Set(),
    nextPage: 0,
  };
  let i = 0;
  for (const m of manifests) {
    if (!restoreCheckpoint(r, m, vmIds.get(m.vm.name)!)) continue;
    b.o.onProgress?.('manifests', ++i, manifests.length);
  }
}

/** One manifest's checkpoint, in one transaction; false when it clashes with one restored already. */
function restoreCheckpoint(r: Restore, m: Manifest, vmId: number): boolean {
  const { b } = r;
  const c = m.checkpoint;
  const where = `${m.vm.name}@${c.name}`;
  if (r.st.nameTaken.get(vmId, c.name) || r.st.idTaken.get(c.id, c.uid)) {
    b.rep.problems.push(`manifest ${c.uid} (${where}) clashes with another checkpoint; skipped`);
    return false;
  }
  const tx: ManifestTx = { missing: 0, newPages: [], newHashes: [] };
  try {
    b.db.transaction(() => insertCheckpoint(r, tx, m, vmId))();
    b.rep.checkpoints++;
    if (tx.missing > 0) b.rep.damagedCheckpoints.push(where);
  } catch (e) {
    for (const k of tx.newPages) r.pageIds.delete(k);
    for (const h of tx.newHashes) b.chunkIds.delete(h);
    b.rep.problems.push(`manifest ${c.uid} (${where}) could not be restored: ${(e as Error).message}`);
  }
  return true;
}

/** In the checkpoint's transaction: its row, configurations, disks, block maps (damaged if missing chunks). */
function insertCheckpoint(r: Restore, tx: ManifestTx, m: Manifest, vmId: number): void {
  const { b, st } = r;
  const c = m.checkpoint;
  st.insCp.run(
    c.id,
    c.uid,
    vmId,
    c.name,
    c.level,
    c.chain.id,
    c.parent?.id ?? null,
    c.base?.id ?? null,
    c.started,
    c.finished,
    c.bytesRead,
    c.bytesNewRaw,
    c.bytesNewStored,
    c.chunksNew,
    c.libvirtCheckpoint,
    c.protected ? 1 : 0,
    0,
  );
  for (const cfg of m.configs)
    st.insCfg.run(
      c.id,
      cfg.name,
      storedConfig(b.cipher, m.checkpoint.uid, cfg.name, Buffer.from(cfg.data, 'base64')),
    );
  for (const d of m.disks) {
    st.insDisk.run(d.id, c.id, d.name, d.virtualSize, d.source, d.format, d.bitmap, d.bytesRead, d.bytesZero);
    insertDiskMap(r, tx, m, d);
  }
  if (tx.missing > 0) b.db.prepare('UPDATE checkpoints SET damaged = 1 WHERE id = ?').run(c.id);
}

/** Chunk id of hash index `h` of `m`; a hash no pack holds gets a damaged placeholder row (missing). */
function chunkIdOf(r: Restore, tx: ManifestTx, m: Manifest, h: number): number {
  const { b } = r;
  const hex = m.hashes[h];
  if (hex === undefined) throw new Error(`hash index ${h} out of range`);
  let id = b.chunkIds.get(hex);
  if (id === undefined) {
    // No pack holds it: a damaged placeholder, so the checkpoint lists as DAMAGED.
    id = Number(r.st.insChunk.run(Buffer.from(hex, 'hex'), 0, 0, 0, b.chunkSize, 0, 1).lastInsertRowid);
    b.chunkIds.set(hex, id);
    tx.newHashes.push(hex);
    r.placeholders.add(id);
    b.rep.missingChunks++;
  }
  if (r.placeholders.has(id)) tx.missing++;
  return id;
}

/** A disk's block map: its extents cut into pages of `pageSpan` bytes (`storePage`), then its page sums. */
function insertDiskMap(r: Restore, tx: ManifestTx, m: Manifest, d: ManifestDisk): void {
  const x = d.extents;
  let prevEnd = 0;
  let page = -1;
  let rows: ExtentRow[] = [];
  let sumRows: SumExtent[] = [];
  const sums: PageSum[] = [];
  const flush = (): void => {
    if (page < 0 || rows.length === 0) return;
    sums.push(pageSum(page, sumRows));
    storePage(r, tx, d.id, page, rows);
  };
  for (let k = 0; k < x.length; k += 5) {
    const offset = prevEnd + x[k]!;
    const length = x[k + 1]!;
    const h = x[k + 2]!;
    const chunkOff = x[k + 3]!;
    const origin = m.origins[x[k + 4]!];
    if (!origin || length <= 0 || offset < 0) throw new Error(`malformed extent at ${offset}`);
    const p = Math.floor(offset / r.b.pageSpan);
    if (p !== page) {
      flush();
      page = p;
      rows = [];
      sumRows = [];
    }
    rows.push([offset, length, h < 0 ? null : chunkIdOf(r, tx, m, h), chunkOff, origin.disk]);
    sumRows.push({
      offset,
      length,
      chunkOff,
      hash: h < 0 ? null : Buffer.from(m.hashes[h]!, 'hex'),
    });
    prevEnd = offset + length;
  }
  flush();
  writeDiskSums(r.b.db, d.id, d.virtualSize, r.b.pageSpan, sums);
}

/** Page `pageNo` of disk `diskId`: a page with the same rows as one stored already is shared, else stored. */
function storePage(r: Restore, tx: ManifestTx, diskId: number, pageNo: number, rows: ExtentRow[]): void {
  const key = hashChunk(Buffer.from(JSON.stringify(rows))).toString('hex');
  let pid = r.pageIds.get(key);
  if (pid === undefined) {
    pid = ++r.nextPage;
    r.pageIds.set(key, pid);
    tx.newPages.push(key);
    for (const e of rows) r.st.insExt.run(pid, e[0], e[1], e[2], e[3], e[4]);
  }
  r.st.insDp.run(diskId, pageNo, pid);
}

/** Ids of forgotten checkpoints are never reused: the checkpoint id sequence starts after every id known. */
function reserveCheckpointIds(db: Database.Database, forgottenMaxId: number, manifests: Manifest[]): void {
  const maxId = Math.max(forgottenMaxId, ...manifests.map((m) => m.checkpoint.id), 0);
  if (maxId > 0) {
    db.prepare("DELETE FROM sqlite_sequence WHERE name = 'checkpoints'").run();
    db.prepare("INSERT INTO sqlite_sequence (name, seq) VALUES ('checkpoints', ?)").run(maxId);
  }
}

/**
 * Swaps the built index in (`installBuiltIndex`: a crash before the swap leaves the old index, one
 * in its middle is finished by the next open), then finishes what needs the new index; returns
 * where the old index went.
 */
function installIndex(dir: string): string | null {
  const oldIndex = installBuiltIndex(dir);
  // Packs that a gc kept for readers are indexed again now (their chunks are live or dead like
  // any other pack's); finish interrupted forgets against the new index.
  removePending(dir);
  const repo = Repository.open(dir);
  try {
    finishForgetJournals(repo);
  } finally {
    repo.close();
  }
  return oldIndex;
}
