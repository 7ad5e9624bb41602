/**
 * Checkpoint manifests: what it takes to rebuild the index without the index.
 *
 * Every committed checkpoint has `manifests/<uid>.json.zst` (zstd-compressed JSON, format in
 * FORMAT.md, "Manifests"): its catalogue row (VM, name, level, times, statistics, parent/base/chain
 * by id, uid and name, libvirt checkpoint, protected), its configurations, its disks and each disk's
 * complete block map as the index holds it (extents with chunk HASHES, not chunk ids, so the map
 * survives chunk renumbering by gc and by a rebuild). With the packs, which describe their chunks,
 * the manifests are enough to recreate `index.db` (`rebuild.ts`).
 *
 * Commit order (`commitCheckpoint`, called by the backup engine once every pack is sealed): the
 * manifest is written to a temp file, fsynced, renamed and its directory fsynced; only then does
 * one transaction flip the checkpoint to `complete`. A crash in between leaves a manifest of a
 * `running` checkpoint, which the next writer deletes (before the rows, see `Repository.recover`).
 *
 * Forget order (`forget.ts`): a journal `manifests/forget-<random>.json` listing the checkpoints is
 * made durable first, then the index transaction runs, then the manifests are deleted, then the
 * journal. An index rebuild skips every checkpoint a journal names, so a leftover manifest never
 * resurrects a forgotten checkpoint; the next writer finishes (or, if the transaction never ran,
 * drops) each journal it finds (`finishForgetJournals`).
 *
 * Size and memory: about 5 numbers per extent plus 32 bytes per distinct chunk before compression;
 * a checkpoint of 1 GiB of allocated data (4096 chunks of 256 KiB) gives about 150 KiB
 * compressed. The whole manifest is built in memory (a few MB for a 100 GiB disk).
 * Locking: written under the writer lock, except `rewriteManifest` (protect/unprotect), which only
 * ever replaces a file atomically with the same map.
 */
import { constants as bufferConstants } from 'node:buffer';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import type Database from 'better-sqlite3';
import { compress } from 'zstd-napi';
import * as zstd from 'zstd-napi/binding';
import { BkfsError } from '../errors';
import type { CheckpointRow, DiskRow } from '../index/catalog';
import type { Repository } from './repository';
import { crashPoint, loadConfig } from './repository';
import type { Cipher } from '../crypto/cipher';
import { cipherOfDb, registerCipher, registeredCipher, unlock } from '../crypto/keyring';
import { healDamagedChunks, rescueCandidates } from './gc';
import { holdLease, manifestKey, remoteStore } from '../store/location';
import type { ObjectStore } from '../store/objstore';
import { fsyncDirSync, mkdirPrivateSync, repoModes, writeFileDurable } from '../util/private-fs';

export const MANIFEST_DIR = 'manifests';
export const MANIFEST_MAGIC = 'bkfs-manifest';
export const MANIFEST_VERSION = 1;
const MANIFEST_SUFFIX = '.json.zst';
const JOURNAL_PREFIX = 'forget-';

/** A link to another checkpoint: id and uid (stable), name (for people). */
export interface ManifestRef {
  id: number;
  uid: string | null;
  name: string | null;
}

export interface ManifestDisk {
  id: number;
  name: string;
  virtualSize: number;
  source: string | null;
  format: string | null;
  bitmap: string | null;
  bytesRead: number;
  bytesZero: number;
  /**
   * The disk's block map, 5 numbers per extent, in offset order:
   * gap (offset minus the previous extent's end), length, hash index (-1 = zeros), chunk offset,
   * origin index.
   */
  extents: number[];
}

export interface Manifest {
  magic: typeof MANIFEST_MAGIC;
  version: number;
  repo: string;
  vm: { name: string; created: number };
  checkpoint: {
    id: number;
    uid: string;
    name: string;
    level: string;
    started: number;
    finished: number | null;
    bytesRead: number;
    bytesNewRaw: number;
    bytesNewStored: number;
    chunksNew: number;
    libvirtCheckpoint: string | null;
    protected: boolean;
    parent: ManifestRef | null;
    base: ManifestRef | null;
    chain: ManifestRef;
  };
  configs: { name: string; data: string }[];
  /** Chunk hashes (hex) that the extents refer to by index. */
  hashes: string[];
  /** Disks that wrote extents (`extents.origin`): disk id, its checkpoint uid and names if known. */
  origins: {
    disk: number;
    checkpoint: string | null;
    checkpointName: string | null;
    diskName: string | null;
  }[];
  disks: ManifestDisk[];
}

export function manifestDir(repoDir: string): string {
  return path.join(repoDir, MANIFEST_DIR);
}

export function manifestPath(repoDir: string, uid: string): string {
  return path.join(manifestDir(repoDir), `${uid}${MANIFEST_SUFFIX}`);
}

/** Uids of every manifest file present. */
export function listManifestUids(repoDir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(manifestDir(repoDir));
  } catch {
    return [];
  }
  return names
    .filter((n) => /^[0-9a-f]{32}\.json\.zst$/.test(n))
    .map((n) => n.slice(0, -MANIFEST_SUFFIX.length))
    .sort();
}

// ---------------------------------------------------------------------------------------------
// Durable small-file helpers

export { fsyncDirSync };

/** Write a repository file under `manifests/` atomically and durably, with the repository's mode. */
function writeManifestDurable(file: string, data: Buffer): void {
  writeFileDurable(file, data, repoModes(path.dirname(path.dirname(file))).file);
}

// ---------------------------------------------------------------------------------------------
// Building, writing, reading

export interface ManifestOverrides {
  finished?: number;
  bytesRead?: number;
  bytesNewRaw?: number;
  bytesNewStored?: number;
  chunksNew?: number;
  /** Configurations not yet in the index (a commit in progress). */
  configs?: { name: string; data: Buffer }[];
}

/** Build the manifest of checkpoint `cpId` from the index (plus `o` for a commit in progress). */
export function buildManifest(
  db: Database.Database,
  repoId: string,
  cpId: number,
  o: ManifestOverrides = {},
): Manifest {
  const cp = db.prepare('SELECT * FROM checkpoints WHERE id = ?').get(cpId) as CheckpointRow | undefined;
  if (!cp) throw new BkfsError('NOT_FOUND', `checkpoint ${cpId} is not in the index`);
  const vm = db.prepare('SELECT name, created FROM vms WHERE id = ?').get(cp.vm_id) as {
    name: string;
    created: number;
  };
  const refStmt = db.prepare('SELECT id, uid, name FROM checkpoints WHERE id = ?');
  const ref = (id: number | null): ManifestRef | null => {
    if (id === null) return null;
    const r = refStmt.get(id) as { id: number; uid: string; name: string } | undefined;
    return r ? { id, uid: r.uid, name: r.name } : { id, uid: null, name: null };
  };
  const configs = o.configs ?? readConfigs(db, cpId);
  const t = new ManifestTables(db);
  const extStmt = db.prepare(
    `SELECT e.offset AS offset, e.length AS length, e.chunk_id AS chunkId, e.chunk_off AS chunkOff,
            e.origin AS origin, c.hash AS hash
       FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
      WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
  );
  const diskRows = db
    .prepare('SELECT * FROM disks WHERE checkpoint_id = ? ORDER BY name')
    .all(cpId) as DiskRow[];
  const disks = diskRows.map((d) => manifestDisk(d, extStmt, t));
  return {
    magic: MANIFEST_MAGIC,
    version: MANIFEST_VERSION,
    repo: repoId,
    vm: { name: vm.name, created: vm.created },
    checkpoint: {
      id: cp.id,
      uid: cp.uid,
      name: cp.name,
      level: cp.level,
      started: cp.started,
      finished: o.finished ?? cp.finished,
      bytesRead: o.bytesRead ?? cp.bytes_read,
      bytesNewRaw: o.bytesNewRaw ?? cp.bytes_new_raw,
      bytesNewStored: o.bytesNewStored ?? cp.bytes_new_stored,
      chunksNew: o.chunksNew ?? cp.chunks_new,
      libvirtCheckpoint: cp.libvirt_checkpoint,
      protected: cp.protected === 1,
      parent: ref(cp.parent_id),
      base: ref(cp.base_id),
      chain: ref(cp.chain_id) ?? { id: cp.chain_id, uid: null, name: null },
    },
    configs: configs.map((c) => ({ name: c.name, data: c.data.toString('base64') })),
    hashes: t.hashes,
    origins: t.origins,
    disks,
  };
}

/** An extent of the index with its chunk's hash (null: a zero extent, or a chunk gone missing). */
export interface ExtentRow {
  offset: number;
  length: number;
  chunkId: number | null;
  chunkOff: number;
  origin: number;
  hash: Buffer | null;
}

/** A manifest's shared tables: chunk hashes and extent origins, each stored once, by index. */
class ManifestTables {
  readonly hashes: string[] = [];
  readonly origins: Manifest['origins'] = [];
  private readonly hashIdx = new Map<string, number>();
  private readonly originIdx = new Map<number, number>();
  private readonly originStmt: Database.Statement;

  constructor(db: Database.Database) {
    this.originStmt = db.prepare(
      `SELECT d.name AS diskName, c.uid AS uid, c.name AS cpName
         FROM disks d JOIN checkpoints c ON c.id = d.checkpoint_id WHERE d.id = ?`,
    );
  }

  hash(h: Buffer): number {
    const hex = h.toString('hex');
    let i = this.hashIdx.get(hex);
    if (i === undefined) {
      i = this.hashes.length;
      this.hashes.push(hex);
      this.hashIdx.set(hex, i);
    }
    return i;
  }

  origin(disk: number): number {
    let i = this.originIdx.get(disk);
    if (i === undefined) {
      const r = this.originStmt.get(disk) as { diskName: string; uid: string; cpName: string } | undefined;
      i = this.origins.length;
      this.origins.push({
        disk,
        checkpoint: r?.uid ?? null,
        checkpointName: r?.cpName ?? null,
        diskName: r?.diskName ?? null,
      });
      this.originIdx.set(disk, i);
    }
    return i;
  }
}

/** One disk of the manifest: its extents as (gap, length, hash index, chunk offset, origin index). */
function manifestDisk(d: DiskRow, extStmt: Database.Statement, t: ManifestTables): ManifestDisk {
  const ext: number[] = [];
  let prevEnd = 0;
  for (const e of extStmt.iterate(d.id) as IterableIterator<ExtentRow>) {
    let h = -1;
    if (e.chunkId !== null) {
      if (!e.hash)
        throw new Error(`extent at ${e.offset} of disk ${d.id} references missing chunk ${e.chunkId}`);
      h = t.hash(e.hash);
    }
    ext.push(e.offset - prevEnd, e.length, h, e.chunkOff, t.origin(e.origin));
    prevEnd = e.offset + e.length;
  }
  return {
    id: d.id,
    name: d.name,
    virtualSize: d.virtual_size,
    source: d.source,
    format: d.format,
    bitmap: d.bitmap,
    bytesRead: d.bytes_read,
    bytesZero: d.bytes_zero,
    extents: ext,
  };
}

export function encodeManifest(m: Manifest): Buffer {
  return compress(Buffer.from(JSON.stringify(m)), { compressionLevel: 3 });
}

/**
 * Largest manifest bkfs reads, decompressed: V8's longest string (a larger one could not be
 * parsed anyway). A manifest whose zstd header declares more is refused before any allocation; one
 * without a declared size is decompressed in steps and refused once it passes this.
 */
export const MAX_MANIFEST_BYTES = Math.min(bufferConstants.MAX_STRING_LENGTH, 512 << 20);
/** Largest manifest file read from disk (compressed); a manifest is a few MB for 100 GiB. */
export const MAX_MANIFEST_FILE = 256 << 20;

function corrupt(where: string, what: string): BkfsError {
  return new BkfsError('REPO_CORRUPT', `manifest ${where} is damaged: ${what}`);
}

/**
 * zstd-decompress `data`, which must hold at most `limit` bytes, allocating only the real output:
 * a frame that declares its size is decoded into a buffer of exactly that size; one that does not
 * is first decoded into a small reused buffer to count its size (a "zstd bomb" is refused there,
 * having cost time but no memory), then decoded again into a buffer of that size.
 */
function decompressLimited(data: Buffer, limit: number, where: string): Buffer {
  let declared: number | null;
  try {
    declared = zstd.getFrameContentSize(data);
  } catch (e) {
    throw corrupt(where, (e as Error).message);
  }
  if (declared !== null && declared > limit) {
    throw corrupt(where, `it declares ${declared} bytes, more than the ${limit} bkfs reads`);
  }
  const dctx = new zstd.DCtx();
  // bkfs writes manifests at level 3 (window <= 2 MiB): a frame asking for a larger window is
  // refused instead of making zstd allocate up to 128 MiB for it.
  dctx.setParameter(zstd.DParameter.windowLogMax, 22);
  try {
    let size = declared;
    if (size === null) {
      const scratch = Buffer.allocUnsafe(1 << 20);
      let input = data;
      size = 0;
      for (;;) {
        const [left, produced, consumed] = dctx.decompressStream(scratch, input);
        input = input.subarray(consumed);
        size += produced;
        if (size > limit) throw corrupt(where, `it decompresses to more than ${limit} bytes`);
        if (input.length === 0 && left === 0) break;
        if (produced === 0 && consumed === 0) throw corrupt(where, 'its zstd data is truncated');
      }
      dctx.reset(zstd.ResetDirective.sessionOnly);
    }
    const out = Buffer.allocUnsafe(size);
    const n = dctx.decompress(out, data);
    if (n !== size) throw corrupt(where, `it decompresses to ${n} bytes, expected ${size}`);
    return out;
  } catch (e) {
    if (e instanceof BkfsError) throw e;
    throw corrupt(where, (e as Error).message);
  }
}

export function decodeManifest(data: Buffer, where: string): Manifest {
  let parsed: unknown;
  const text = decompressLimited(data, MAX_MANIFEST_BYTES, where);
  try {
    parsed = JSON.parse(text.toString('utf8'));
  } catch (e) {
    throw corrupt(where, (e as Error).message);
  }
  const m = parsed as Manifest;
  if ((m as { magic?: unknown } | null)?.magic !== MANIFEST_MAGIC) {
    throw new BkfsError('REPO_CORRUPT', `${where} is not a bkfs manifest`);
  }
  if (typeof m.version !== 'number' || m.version > MANIFEST_VERSION) {
    throw new BkfsError('REPO_VERSION', `manifest ${where} has version ${String(m.version)}; upgrade bkfs`);
  }
  const problem = manifestProblem(m);
  if (problem !== null) throw corrupt(where, problem);
  return m;
}

type Check = (v: unknown) => boolean;
const isObj = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);
const str: Check = (v) => typeof v === 'string';
const strOrNull: Check = (v) => v === null || typeof v === 'string';
const count: Check = (v) => Number.isSafeInteger(v) && (v as number) >= 0;
const countOrNull: Check = (v) => v === null || count(v);
const id: Check = (v) => Number.isSafeInteger(v) && (v as number) > 0;
const ref: Check = (v) => isObj(v) && id(v.id) && strOrNull(v.uid) && strOrNull(v.name);
const refOrNull: Check = (v) => v === null || ref(v);

function fieldsProblem(o: unknown, what: string, fields: Record<string, Check>): string | null {
  if (!isObj(o)) return `${what} is missing`;
  for (const [k, check] of Object.entries(fields)) {
    if (!check(o[k])) return `${what}.${k} is missing or invalid`;
  }
  return null;
}

/**
 * What is wrong with a parsed manifest, or null: every field a rebuild uses has its type, every
 * extent its five integers with a positive length, a hash and an origin that exist, inside its
 * disk. A garbage manifest is refused here rather than crashing (or misleading) the rebuild.
 */
export function manifestProblem(m: Manifest): string | null {
  const top = fieldsProblem(m, 'manifest', {
    repo: str,
    vm: isObj,
    checkpoint: isObj,
    configs: Array.isArray,
    hashes: Array.isArray,
    origins: Array.isArray,
    disks: Array.isArray,
  });
  if (top) return top;
  const p =
    fieldsProblem(m.vm, 'vm', { name: str, created: count }) ??
    fieldsProblem(m.checkpoint, 'checkpoint', {
      id,
      uid: (v) => typeof v === 'string' && /^[0-9a-f]{32}$/.test(v),
      name: str,
      level: str,
      started: count,
      finished: countOrNull,
      bytesRead: count,
      bytesNewRaw: count,
      bytesNewStored: count,
      chunksNew: count,
      libvirtCheckpoint: strOrNull,
      protected: (v) => typeof v === 'boolean',
      parent: refOrNull,
      base: refOrNull,
      chain: (v) => isObj(v) && id(v.id),
    });
  if (p) return p;
  for (const c of m.configs) {
    const e = fieldsProblem(c, 'configs[]', { name: str, data: str });
    if (e) return e;
  }
  for (const h of m.hashes as unknown[]) {
    if (typeof h !== 'string' || !/^[0-9a-f]{64}$/.test(h)) return 'a chunk hash is not 64 hex digits';
  }
  for (const o of m.origins) {
    const e = fieldsProblem(o, 'origins[]', {
      disk: id,
      checkpoint: strOrNull,
      checkpointName: strOrNull,
      diskName: strOrNull,
    });
    if (e) return e;
  }
  for (const d of m.disks) {
    const e = fieldsProblem(d, 'disks[]', {
      id,
      name: str,
      virtualSize: count,
      source: strOrNull,
      format: strOrNull,
      bitmap: strOrNull,
      bytesRead: count,
      bytesZero: count,
      extents: Array.isArray,
    });
    if (e) return e;
    const x = d.extents as unknown[];
    if (x.length % 5 !== 0) return `disk ${d.name} has a malformed block map`;
    let end = 0;
    for (let k = 0; k < x.length; k += 5) {
      const [gap, len, h, off, origin] = x.slice(k, k + 5) as number[];
      if (
        !count(gap) ||
        !id(len) ||
        !Number.isSafeInteger(h) ||
        h! < -1 ||
        h! >= m.hashes.length ||
        !count(off) ||
        !count(origin) ||
        origin! >= m.origins.length
      ) {
        return `disk ${d.name}: extent ${k / 5} is malformed`;
      }
      end += gap! + len!;
      if (end > d.virtualSize) return `disk ${d.name}: extent ${k / 5} ends beyond the disk`;
    }
  }
  return null;
}

export function readManifest(repoDir: string, uid: string): Manifest {
  const p = manifestPath(repoDir, uid);
  return decodeManifest(readManifestBytes(repoDir, uid), p);
}

/**
 * The cipher of the repository at `repoDir` for its manifests: the one its open Repository
 * registered, else unlocked from its config (null for a plain repository).
 */
export function manifestCipher(repoDir: string): Cipher | null {
  const known = registeredCipher(repoDir);
  if (known !== undefined) return known;
  const config = loadConfig(repoDir);
  const c = config.encryption ? unlock(repoDir, config.id, config.encryption) : null;
  registerCipher(repoDir, c);
  return c;
}

/** A manifest's zstd bytes: the file, opened in an encrypted repository (REPO_CORRUPT if it fails). */
export function readManifestBytes(repoDir: string, uid: string): Buffer {
  return openManifestObject(repoDir, uid, readManifestFile(manifestPath(repoDir, uid)));
}

/**
 * A manifest's zstd bytes from the bytes of its object (read from the store, or the file):
 * opened in an encrypted repository (REPO_CORRUPT if that fails).
 */
export function openManifestObject(repoDir: string, uid: string, data: Buffer): Buffer {
  const c = manifestCipher(repoDir);
  return c ? c.openManifest(uid, data) : data;
}

/**
 * Keep a manifest object read from `store` as the repository directory's own copy too, when the
 * store is not that directory (the cache directory of a bucket: the bucket's copy wins, it is
 * what other machines see). Nothing to do when the store is the directory itself.
 */
export function keepManifestCopy(repoDir: string, store: ObjectStore, uid: string, data: Buffer): void {
  if (store.kind === 'local' && path.resolve(store.location) === path.resolve(repoDir)) return;
  mkdirPrivateSync(manifestDir(repoDir), { recursive: true, mode: repoModes(repoDir).dir });
  writeManifestDurable(manifestPath(repoDir, uid), data);
}

/**
 * The configurations saved with a checkpoint (domain XML), as plaintext: in an encrypted
 * repository the index holds them sealed (bound to the checkpoint's uid and the config's name).
 */
export function readConfigs(db: Database.Database, cpId: number): { name: string; data: Buffer }[] {
  const rows = db
    .prepare(
      `SELECT f.name AS name, f.data AS data, c.uid AS uid FROM configs f
         JOIN checkpoints c ON c.id = f.checkpoint_id WHERE f.checkpoint_id = ? ORDER BY f.name`,
    )
    .all(cpId) as { name: string; data: Buffer; uid: string }[];
  const c = cipherOfDb(db);
  return rows.map((r) => ({ name: r.name, data: c ? c.openConfig(r.uid, r.name, r.data) : r.data }));
}

/** A configuration as the index stores it: sealed in an encrypted repository. */
export function storedConfig(cipher: Cipher | null, uid: string, name: string, data: Buffer): Buffer {
  return cipher ? cipher.sealConfig(uid, name, data) : data;
}

/** A manifest file's bytes, refusing one larger than MAX_MANIFEST_FILE (REPO_CORRUPT). */
export function readManifestFile(p: string): Buffer {
  const size = fs.statSync(p).size;
  if (size > MAX_MANIFEST_FILE) {
    throw new BkfsError(
      'REPO_CORRUPT',
      `manifest ${p} is damaged: ${size} bytes is more than a manifest can be`,
    );
  }
  return fs.readFileSync(p);
}

export function writeManifest(repoDir: string, m: Manifest): void {
  mkdirPrivateSync(manifestDir(repoDir), { recursive: true, mode: repoModes(repoDir).dir });
  const c = manifestCipher(repoDir);
  const data = encodeManifest(m);
  writeManifestDurable(
    manifestPath(repoDir, m.checkpoint.uid),
    c ? c.sealManifest(m.checkpoint.uid, data) : data,
  );
  noteManifestChange(repoDir, m.checkpoint.uid);
}

export function removeManifest(repoDir: string, uid: string): void {
  fs.rmSync(manifestPath(repoDir, uid), { force: true });
  noteManifestChange(repoDir, uid);
}

// ---------------------------------------------------------------------------------------------
// Manifests on object storage (FORMAT.md, "Repositories on object storage"): the local
// `manifests/` of a cache directory is written as for a local repository, and `publishManifests`
// makes the bucket follow it after the index commit (upload written ones, delete removed ones).

const changedManifests = new Map<string, Set<string>>();

function noteManifestChange(repoDir: string, uid: string): void {
  const key = path.resolve(repoDir);
  if (!remoteStore(repoDir)) return;
  let s = changedManifests.get(key);
  if (!s) changedManifests.set(key, (s = new Set()));
  s.add(uid);
}

/**
 * Make the bucket's manifests follow the local ones (a no-op for a local repository): upload
 * the manifests written since the last call, delete the removed ones; with `reconcile`, also
 * upload every local manifest of a complete checkpoint that the bucket lacks (a writer killed
 * between its index commit and its upload).
 */
export async function publishManifests(repo: Repository, reconcile = false): Promise<void> {
  const remote = remoteStore(repo.dir);
  if (!remote) return;
  const key = path.resolve(repo.dir);
  const todo = changedManifests.get(key) ?? new Set<string>();
  changedManifests.delete(key);
  if (reconcile) {
    const inBucket = new Set<string>();
    for await (const o of remote.list('manifests/')) inBucket.add(o.key);
    const complete = repo.db.prepare("SELECT uid FROM checkpoints WHERE state = 'complete'").all() as {
      uid: string;
    }[];
    for (const { uid } of complete) {
      if (!inBucket.has(manifestKey(uid)) && fs.existsSync(manifestPath(repo.dir, uid))) todo.add(uid);
    }
  }
  if (todo.size === 0) return;
  await holdLease(repo.dir, remote);
  const gone: string[] = [];
  for (const uid of todo) {
    const p = manifestPath(repo.dir, uid);
    if (fs.existsSync(p)) await remote.putFile(manifestKey(uid), p);
    else gone.push(manifestKey(uid));
  }
  if (gone.length > 0) await remote.delete(gone);
}

/** Rewrite a committed checkpoint's manifest from the index (after protect/unprotect, repair). */
export function rewriteManifest(repo: Repository, cpId: number): void {
  writeManifest(repo.dir, buildManifest(repo.db, repo.config.id, cpId));
}

// ---------------------------------------------------------------------------------------------
// Commit of a backup

export interface CommitInfo {
  configs: { name: string; data: Buffer }[];
  bytesRead: number;
  bytesNewRaw: number;
  bytesNewStored: number;
  chunksNew: number;
}

/**
 * Commit a `running` checkpoint whose chunks are all sealed and indexed: write its manifest
 * durably, then in one transaction save its configurations and statistics, flip it to `complete`
 * and re-point extents of damaged chunks that now have a good copy (`healDamagedChunks`). Throws
 * CHAIN_BROKEN when the checkpoint it builds on was forgotten (and its rows removed) between the
 * backup's planning and its taking of the writer lock: its map would then be incomplete.
 */
export function commitCheckpoint(repo: Repository, cpId: number, info: CommitInfo): void {
  const db = repo.db;
  const finished = Date.now();
  const m = buildManifest(db, repo.config.id, cpId, { ...info, finished });
  writeManifest(repo.dir, m);
  crashPoint('backup-after-manifest');
  try {
    db.transaction(() => {
      const cp = db.prepare('SELECT base_id FROM checkpoints WHERE id = ?').get(cpId) as {
        base_id: number | null;
      };
      if (cp.base_id !== null && !db.prepare('SELECT 1 FROM checkpoints WHERE id = ?').get(cp.base_id)) {
        throw new BkfsError(
          'CHAIN_BROKEN',
          `checkpoint ${m.checkpoint.base?.name ?? cp.base_id}, which this backup builds on, was forgotten while it started: run the backup again`,
        );
      }
      const insCfg = db.prepare('INSERT INTO configs (checkpoint_id, name, data) VALUES (?, ?, ?)');
      for (const c of info.configs)
        insCfg.run(cpId, c.name, storedConfig(repo.cipher, m.checkpoint.uid, c.name, c.data));
      db.prepare(
        `UPDATE checkpoints SET state = 'complete', finished = ?, bytes_read = ?, bytes_new_raw = ?,
                bytes_new_stored = ?, chunks_new = ? WHERE id = ?`,
      ).run(finished, info.bytesRead, info.bytesNewRaw, info.bytesNewStored, info.chunksNew, cpId);
      // Deletion candidates this checkpoint uses (gc marked them while it ran): rescued in the
      // same transaction that makes it complete (FORMAT.md, "Concurrent writers").
      rescueCandidates(db, cpId);
      healDamagedChunks(db);
    }).immediate();
  } catch (e) {
    removeManifest(repo.dir, m.checkpoint.uid);
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Forget journals (tombstones)

export interface ForgetJournal {
  time: string;
  checkpoints: { id: number; uid: string }[];
}

function journalFiles(repoDir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(manifestDir(repoDir));
  } catch {
    return [];
  }
  return names
    .filter((n) => n.startsWith(JOURNAL_PREFIX) && n.endsWith('.json'))
    .map((n) => path.join(manifestDir(repoDir), n));
}

/** Durably record that these checkpoints are being forgotten; returns the journal's path. */
export function writeForgetJournal(repoDir: string, checkpoints: { id: number; uid: string }[]): string {
  mkdirPrivateSync(manifestDir(repoDir), { recursive: true, mode: repoModes(repoDir).dir });
  const file = path.join(manifestDir(repoDir), `${JOURNAL_PREFIX}${randomBytes(8).toString('hex')}.json`);
  const j: ForgetJournal = { time: new Date().toISOString(), checkpoints };
  writeManifestDurable(file, Buffer.from(JSON.stringify(j)));
  return file;
}

function readJournal(file: string): ForgetJournal | undefined {
  try {
    const j = JSON.parse(fs.readFileSync(file, 'utf8')) as ForgetJournal;
    return Array.isArray(j.checkpoints) ? j : undefined;
  } catch {
    return undefined;
  }
}

/** Every checkpoint named by a forget journal (an index rebuild skips them). */
export function forgottenInJournals(repoDir: string): { uids: Set<string>; maxId: number } {
  const uids = new Set<string>();
  let maxId = 0;
  for (const f of journalFiles(repoDir)) {
    for (const c of readJournal(f)?.checkpoints ?? []) {
      uids.add(c.uid);
      maxId = Math.max(maxId, c.id);
    }
  }
  return { uids, maxId };
}

/**
 * Finish what interrupted forgets left (runs under the writer lock): for each journal, delete the
 * manifest of every listed checkpoint that is no longer `complete` in the index (the forget's
 * transaction ran), keep the others (it did not), then delete the journal. Also removes temp
 * files of processes that are gone.
 */
export function finishForgetJournals(repo: Repository): void {
  const dir = manifestDir(repo.dir);
  const files = journalFiles(repo.dir);
  if (files.length > 0) {
    const st = repo.db.prepare('SELECT state FROM checkpoints WHERE uid = ?');
    for (const f of files) {
      for (const c of readJournal(f)?.checkpoints ?? []) {
        const row = st.get(c.uid) as { state: string } | undefined;
        if (!row || row.state !== 'complete') removeManifest(repo.dir, c.uid);
      }
      fsyncDirSync(dir);
      fs.rmSync(f, { force: true });
    }
  }
  let names: string[] = [];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) {
    const m = /\.(\d+)\.tmp$/.exec(n);
    if (m && !pidAlive(Number(m[1]))) fs.rmSync(path.join(dir, n), { force: true });
  }
}

/** Delete a forget journal once its manifests are gone (durably). */
export function closeForgetJournal(repoDir: string, file: string): void {
  fsyncDirSync(manifestDir(repoDir));
  fs.rmSync(file, { force: true });
}

function pidAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
