/**
 * A bkfs repository: one self-contained directory (see `src/store/FORMAT.md`).
 *
 *   bkfs-repo.json   magic, format version, repository id and chunking parameters
 *   index.db         SQLite block index and catalogue (WAL mode)
 *   packs/NN/*.pack  chunk data
 *   tmp/             packs being written
 *   manifests/       one manifest per checkpoint, to rebuild the index (`manifest.ts`)
 *   pins/            checkpoints in use by readers (`pins.ts`)
 *   lock             writer lock: flock(2) held by the writer (`lock.ts`); JSON info of the holder
 *
 * Locking: one writer at a time holds the flock on `lock` (`lock.ts`: the kernel releases it when
 * the holder dies, so there is no stale lock to take over). Every command that writes the index
 * takes it. Readers (list, mount, restore, `verify --read-only`) take no lock: SQLite's WAL lets
 * them read committed state while a backup writes, a checkpoint becomes visible only when its
 * final transaction flips it to `complete`, and long-lived readers pin what they read (`pins.ts`).
 *
 * Recovery: whoever takes the writer lock first removes what a crashed writer left behind:
 * checkpoints still marked `running` (with their disks, page maps and manifests), temp packs, and
 * half-done forgets (`finishForgetJournals`). Chunks that were indexed stay; they are valid data,
 * reused by dedup or removed by gc.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import {
  ENCRYPTED_FORMAT_VERSION,
  FORMAT_VERSION,
  PLAIN_FORMAT_VERSION,
  RAW_FRAMES_FORMAT_VERSION,
  SCHEMA,
} from '../index/schema';
import type { Cipher } from '../crypto/cipher';
import type { KeySlot } from '../crypto/keys';
import {
  checkEncryptionConfig,
  registerCipher,
  registerDbCipher,
  rememberMaster,
  unlock,
  type EncryptionConfig,
} from '../crypto/keyring';
import { PackReader, trailerKindOf, type TrailerKind } from '../store/packs';
import {
  CHUNK_CACHE_DIR,
  initRemote,
  isS3Url,
  releaseStore,
  remoteStore,
  resolveLocation,
  retainStore,
  storeFor,
} from '../store/location';
import type { ObjectStore } from '../store/objstore';
import { RemotePacks } from '../store/remote-packs';
import { makeDirs, onUserPath } from '../util/userpath';
import { acquireWriterLock, type LockOptions, type WriterLock } from './lock';
import { cleanTmp, sessionLive, startSession, type Session } from './sessions';
import {
  fsyncDirSync,
  mkdirPrivateSync,
  precreateDbFile,
  repoModes,
  writeFileDurable,
} from '../util/private-fs';

export const REPO_MAGIC = 'bkfs-repository';
export const CONFIG_FILE = 'bkfs-repo.json';
export const DB_FILE = 'index.db';
/** A rebuilt index that is complete and durable, waiting to replace `index.db` (see rebuild.ts). */
export const DB_NEW_FILE = 'index.db.new';
/** Maintenance lock (format 3): forget, gc, verify's damage marking, protect, repair --manifests. */
export const MAINT_LOCK_FILE = 'maint-lock';

/**
 * What a writer does, which decides its locks (FORMAT.md, "Locking"):
 *   - 'backup': `lock` shared and a session: any number run at once, beside maintenance too;
 *   - 'maintenance' (forget, gc, protect, verify's damage marking, repair --manifests): `lock`
 *     shared, a session, and `maint-lock` exclusive: one at a time, beside backups.
 * `repair --rebuild-index` and format migrations take `lock` exclusive (alone).
 */
export type WriterKind = 'backup' | 'maintenance';

export interface WriterOptions extends LockOptions {
  kind?: WriterKind;
}

/**
 * Test-only crash injection: when `BKFS_TEST_CRASH_AT` names `step`, the process kills itself with
 * SIGKILL right there (a real kill of the real process, so crash-safety tests need no fakes). The
 * steps are listed in FORMAT.md ("Crash points").
 */
export function crashPoint(step: string): void {
  if (process.env.BKFS_TEST_CRASH_AT === step) process.kill(process.pid, 'SIGKILL');
  if (process.env.BKFS_TEST_PAUSE_AT === step) pauseHere(process.env.BKFS_TEST_PAUSE_FILE);
}

/**
 * Test-only pause (`BKFS_TEST_PAUSE_AT=step`, `BKFS_TEST_PAUSE_FILE=F`): create `F.paused`, then
 * wait until `F.resume` exists (at most a minute, or `BKFS_TEST_PAUSE_MS`). Lets race tests start a real second process at
 * an exact point of a real first one (e.g. a mount between forget's two transactions).
 */
function pauseHere(file: string | undefined): void {
  if (!file) return;
  fs.writeFileSync(`${file}.paused`, String(process.pid));
  const end = Date.now() + Number(process.env.BKFS_TEST_PAUSE_MS ?? 60_000);
  const cell = new Int32Array(new SharedArrayBuffer(4));
  while (!fs.existsSync(`${file}.resume`) && Date.now() < end) Atomics.wait(cell, 0, 0, 20);
}

export interface RepoConfig {
  magic: string;
  format: number;
  id: string;
  /** Chunk grid: extents are split at multiples of this (bytes, power of two). */
  chunkSize: number;
  /** Bytes of disk covered by one map page (a multiple of chunkSize). */
  pageSpan: number;
  hash: 'blake3';
  compression: { codec: 'zstd'; level: number };
  created: string;
  /** Format 5: the repository is encrypted (FORMAT.md, "Encryption (format 5)"). */
  encryption?: EncryptionConfig;
}

export interface InitOptions {
  chunkSize?: number;
  pageCells?: number;
  compressionLevel?: number;
  /** Create an encrypted repository (format 5) with this master secret, wrapped in these slots. */
  encryption?: { master: Buffer; slots: KeySlot[] };
}

export { defaultRepoPath } from './default-path';

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export interface OpenOptions {
  /**
   * Open for reading only (list, info, mount, cat/ls/cp, restore, export, stats, verify): the index
   * is opened read-only, and a repository this user may read but not write (a root-owned,
   * group-readable one; a read-only mount or snapshot) works too. See `openIndexReadOnly`.
   */
  readOnly?: boolean;
}

export class Repository {
  readonly packs: PackReader;
  private lock: WriterLock | undefined;
  private maint: WriterLock | undefined;
  private sessionHandle: Session | undefined;

  private constructor(
    readonly dir: string,
    readonly config: RepoConfig,
    readonly db: Database.Database,
    /** False when this process cannot write the repository: no pins, no healing, no writer. */
    readonly writable = true,
    private readonly snapshotDir: string | null = null,
    /** The repository's cipher (null: a plain repository). Keys in memory only. */
    readonly cipher: Cipher | null = null,
  ) {
    const remote = remoteStore(dir);
    retainStore(dir);
    let sizeStmt: Database.Statement | undefined;
    this.packs = new PackReader(
      dir,
      64,
      remote
        ? new RemotePacks(remote, path.join(dir, CHUNK_CACHE_DIR), (name) => {
            sizeStmt ??= db.prepare('SELECT size FROM packs WHERE name = ?');
            return (sizeStmt.get(name) as { size: number } | undefined)?.size;
          })
        : undefined,
    );
    this.packs.cipher = cipher;
    registerDbCipher(db, cipher);
    registerCipher(dir, cipher);
  }

  /**
   * Where the repository's packs, manifests and configuration are (FORMAT.md, "Storage
   * interface"): a `LocalStore` of this directory, or the bucket of a cache directory.
   */
  get store(): ObjectStore {
    return storeFor(this.dir);
  }

  /** The bucket of a repository on object storage (this directory is its cache), or null. */
  get remote(): ObjectStore | null {
    return remoteStore(this.dir);
  }

  get encrypted(): boolean {
    return this.cipher !== null;
  }

  /**
   * Whether this repository's writers store incompressible chunks as raw frames (FORMAT.md, "Raw
   * frames (format 6)"): plain repositories of format 6, once a writer has migrated them.
   */
  get writesRawFrames(): boolean {
    return (
      this.cipher === null &&
      this.config.encryption === undefined &&
      this.config.format >= RAW_FRAMES_FORMAT_VERSION
    );
  }

  /** The trailer this repository's new packs carry (none locally; gc and stats count it as live). */
  get trailerKind(): TrailerKind {
    return trailerKindOf(this.remote !== null, this.encrypted);
  }

  static init(dir: string, opts: InitOptions = {}): Repository {
    const chunkSize = opts.chunkSize ?? 256 * 1024;
    const pageCells = opts.pageCells ?? 64;
    if (!isPowerOfTwo(chunkSize) || chunkSize < 4096 || chunkSize > 16 << 20) {
      throw new BkfsError(
        'USAGE',
        `chunk size must be a power of two between 4 KiB and 16 MiB, got ${chunkSize}`,
      );
    }
    if (fs.existsSync(path.join(dir, CONFIG_FILE))) {
      throw new BkfsError('REPO_EXISTS', `a bkfs repository already exists at ${dir}`);
    }
    // One level at a time (makeDirs): Node's recursive mkdir loops forever under /proc.
    // `created`: the first directory made, whose parent is fsynced below (as mkdirPrivateSync).
    const created = makeDirs(dir, 'repository')[0];
    if (onUserPath('repository', dir, () => fs.readdirSync(dir)).length > 0) {
      throw new BkfsError('REPO_EXISTS', `${dir} is not empty; choose an empty or new directory`);
    }
    // A new root is 0700 (makeDirs); an existing (empty) one keeps its mode, and what is created
    // inside follows it (private unless the root is deliberately group-readable, see private-fs.ts).
    const modes = repoModes(dir);
    onUserPath('repository', dir, () => {
      for (const sub of ['packs', 'tmp', 'manifests'])
        mkdirPrivateSync(path.join(dir, sub), { mode: modes.dir });
    });
    let encryption: EncryptionConfig | undefined;
    if (opts.encryption) {
      const { deriveKeys } = require('../crypto/keys') as typeof import('../crypto/keys'); // eslint-disable-line @typescript-eslint/no-require-imports
      const keyId = deriveKeys(opts.encryption.master).keyId.toString('hex');
      if (opts.encryption.slots.length === 0 || opts.encryption.slots.some((k) => k.keyId !== keyId)) {
        throw new BkfsError('USAGE', 'an encrypted repository needs at least one key slot of its key');
      }
      encryption = {
        cipher: 'xchacha20-poly1305',
        idHash: 'blake3-keyed',
        keyId,
        slots: opts.encryption.slots,
      };
      rememberMaster(opts.encryption.master);
    }
    const format = encryption ? ENCRYPTED_FORMAT_VERSION : PLAIN_FORMAT_VERSION;
    const config: RepoConfig = {
      magic: REPO_MAGIC,
      format,
      id: randomBytes(8).toString('hex'),
      chunkSize,
      pageSpan: chunkSize * pageCells,
      hash: 'blake3',
      compression: { codec: 'zstd', level: opts.compressionLevel ?? 1 },
      created: new Date().toISOString(),
      ...(encryption ? { encryption } : {}),
    };
    precreateDbFile(path.join(dir, DB_FILE), modes.file);
    const db = new Database(path.join(dir, DB_FILE));
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.exec(SCHEMA);
    db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('format', String(format));
    db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('repo_id', config.id);
    db.close();
    // The config file is written last, durably: a directory without it is not a repository, and
    // one with it has its index and directories on disk (see "Durability" in FORMAT.md).
    fsyncDirSync(dir); // packs/, tmp/, manifests/, index.db
    if (created !== undefined) fsyncDirSync(path.dirname(created));
    writeFileDurable(
      path.join(dir, CONFIG_FILE),
      Buffer.from(JSON.stringify(config, null, 2) + '\n'),
      modes.file,
    );
    return Repository.open(dir);
  }

  /**
   * `open` for a location: a directory, or `s3://BUCKET/PREFIX` (then its cache directory,
   * `src/store/location.ts`, under `cacheDir` or the default root).
   */
  static async openLocation(
    loc: string,
    opts: OpenOptions & { cacheDir?: string } = {},
  ): Promise<Repository> {
    const dir = await resolveLocation(loc, opts.cacheDir !== undefined ? { cacheDir: opts.cacheDir } : {});
    return Repository.open(dir, opts);
  }

  /** `init` for a location: a directory, or `s3://BUCKET/PREFIX` (the bucket must exist). */
  static async initLocation(
    loc: string,
    opts: InitOptions & { cacheDir?: string } = {},
  ): Promise<Repository> {
    if (!isS3Url(loc)) return Repository.init(loc, opts);
    const dir = await initRemote(
      loc,
      (d) => {
        const r = Repository.init(d, opts);
        const id = r.config.id;
        r.close();
        return { id };
      },
      opts.cacheDir !== undefined ? { cacheDir: opts.cacheDir } : {},
    );
    return Repository.open(dir);
  }

  static open(dir: string, opts: OpenOptions = {}): Repository {
    const config = loadConfig(dir);
    // Unlocked before the index is opened: a missing or wrong key changes nothing.
    const cipher = config.encryption ? unlock(dir, config.id, config.encryption) : null;
    const dbPath = path.join(dir, DB_FILE);
    if (opts.readOnly) {
      const ro = openIndexReadOnly(dir);
      checkIndexVersion(ro.db, dir);
      return new Repository(dir, config, ro.db, ro.writable, ro.snapshotDir, cipher);
    }
    if (!fs.existsSync(dbPath) && fs.existsSync(path.join(dir, DB_NEW_FILE))) {
      // An index rebuild was interrupted right after moving the old index aside: finish it.
      try {
        fs.renameSync(path.join(dir, DB_NEW_FILE), dbPath);
        fsyncDirSync(dir);
      } catch {
        // another process finished it first
      }
    }
    if (!fs.existsSync(dbPath)) {
      throw new BkfsError(
        'REPO_NOT_FOUND',
        `repository ${dir} has no index (${DB_FILE}); run 'bkfs repair --rebuild-index'`,
      );
    }
    const db = new Database(dbPath, { fileMustExist: true });
    // Concurrent writers (FORMAT.md, "Concurrent writers") keep every write transaction short
    // (BEGIN IMMEDIATE, no transaction across NBD reads or pack writes); a minute covers gc's
    // longest one (its row deletion) on a large index.
    db.pragma('busy_timeout = 60000');
    db.pragma('journal_mode = WAL');
    // FULL: a transaction that returned is durable (the WAL is fsynced at each commit). Every
    // writer deletes or overwrites files only after the index state that no longer needs them has
    // committed, so this is what makes gc's pack deletion and forget's manifest deletion safe
    // against power loss (FORMAT.md, "Durability"; the cost is measured in bench/durable.ts).
    db.pragma('synchronous = FULL');
    checkIndexVersion(db, dir);
    return new Repository(dir, config, db, true, null, cipher);
  }

  get lockPath(): string {
    return path.join(this.dir, 'lock');
  }

  /**
   * Become a writer (FORMAT.md, "Locking" and "Concurrent writers"): migrate the format first if
   * needed (with `lock` exclusive, waiting up to a minute for other writers), then take `lock`
   * shared, for maintenance also `maint-lock` exclusive (REPO_LOCKED when another process holds
   * what is needed after `o.waitMs`), start a writer session, then clean up after writers that
   * died. Not reentrant: a second call while held is a bug.
   */
  lockWriter(command: string, o: WriterOptions = {}): void {
    if (this.lock?.held) throw new Error(`writer lock already held (${this.lock.info.command})`);
    const kind = o.kind ?? 'maintenance';
    // Loaded here, not at the top, for start-up time of readers.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const mig = require('../index/migrate') as typeof import('../index/migrate');
    if (mig.needsMigration(this)) {
      const ex = acquireWriterLock(this.dir, `${command} (format upgrade)`, {
        ...o,
        mode: 'exclusive',
        waitMs: Math.max(o.waitMs ?? 0, 60_000),
      });
      try {
        mig.migrateToV2(this);
        mig.migrateToV3(this);
        mig.migrateToV4(this);
        mig.migrateToV6(this);
      } finally {
        ex.release();
      }
    }
    const lockOpts: LockOptions = { ...(o.waitMs !== undefined ? { waitMs: o.waitMs } : {}) };
    if (o.pollMs !== undefined) lockOpts.pollMs = o.pollMs;
    this.lock = acquireWriterLock(this.dir, command, { ...lockOpts, mode: 'shared' });
    try {
      if (kind === 'maintenance') {
        this.maint = acquireWriterLock(this.dir, command, { ...lockOpts, file: MAINT_LOCK_FILE });
      } else {
        // The first writer of any kind creates both lock files, so that a later maintenance
        // command refused for bad input leaves the repository's file set as it found it.
        fs.closeSync(
          fs.openSync(
            path.join(this.dir, MAINT_LOCK_FILE),
            fs.constants.O_RDONLY | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW,
            0o600,
          ),
        );
      }
      this.sessionHandle = startSession(this.dir, command);
      mkdirPrivateSync(path.join(this.dir, 'tmp', this.sessionHandle.name), {
        recursive: true,
        mode: repoModes(this.dir).dir,
      });
      this.recover(kind === 'maintenance');
    } catch (e) {
      this.unlockWriter();
      throw e;
    }
  }

  /** True while this handle holds the writer lock. */
  get writerLocked(): boolean {
    return this.lock?.held === true;
  }

  /** This writer's session name (`writers/<name>.json`), while it holds the writer lock. */
  get session(): string | undefined {
    return this.sessionHandle?.live ? this.sessionHandle.name : undefined;
  }

  /** Where this writer's temp packs go: `tmp/<session>` (relative to the repository). */
  get tmpSubdir(): string | undefined {
    const s = this.session;
    return s === undefined ? undefined : path.join('tmp', s);
  }

  unlockWriter(): void {
    const s = this.sessionHandle;
    const m = this.maint;
    const l = this.lock;
    this.sessionHandle = undefined;
    this.maint = undefined;
    this.lock = undefined;
    try {
      s?.end();
    } finally {
      m?.release();
      l?.release();
    }
  }

  /**
   * Remove what writers that died left: their running checkpoints (a live writer's are left
   * alone: its session is live), their temp packs; for maintenance, also half-done forgets
   * (`finishForgetJournals`; only maintenance runs forgets, one at a time).
   */
  private recover(maintenance: boolean): void {
    // Loaded here, not at the top: readers (`bkfs list`) never recover, and manifest.ts pulls in
    // zstd and gc (start-up time).
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { finishForgetJournals, removeManifest } = require('./manifest') as typeof import('./manifest');
    const running = this.db
      .prepare("SELECT id, uid, writer FROM checkpoints WHERE state = 'running'")
      .all() as RunningCheckpoint[];
    const dead = deadRunningCheckpoints(this.db, this.dir, this.session, running);
    if (dead.length > 0) {
      // Manifest first: a crash in between leaves a running row without a manifest, never a
      // manifest that an index rebuild would take for a committed checkpoint.
      for (const r of dead) removeManifest(this.dir, r.uid);
      this.db
        .transaction(() => {
          const st = this.db.prepare('SELECT state FROM checkpoints WHERE id = ?');
          for (const { id } of dead) {
            if ((st.get(id) as { state: string } | undefined)?.state === 'running')
              deleteCheckpointRows(this.db, id);
          }
        })
        .immediate();
    }
    if (maintenance) finishForgetJournals(this);
    cleanTmp(this.dir);
  }

  private closed = false;

  close(): void {
    this.unlockWriter();
    if (this.closed) return;
    this.closed = true;
    this.packs.close();
    if (this.db.open) this.db.close();
    if (this.snapshotDir) fs.rmSync(this.snapshotDir, { recursive: true, force: true });
    releaseStore(this.dir);
  }
}

/** May this process write the repository in `dir` (its directory and index)? */
export function canWriteRepository(dir: string): boolean {
  return accessible(dir, fs.constants.W_OK) && accessible(path.join(dir, DB_FILE), fs.constants.W_OK);
}

function checkIndexVersion(db: Database.Database, dir: string): void {
  const ver = db.prepare("SELECT value FROM meta WHERE key = 'format'").get() as
    { value: string } | undefined;
  if (!ver || Number(ver.value) > FORMAT_VERSION) {
    db.close();
    throw new BkfsError('REPO_VERSION', `index of ${dir} has format ${ver?.value ?? '?'}; upgrade bkfs`);
  }
}

function accessible(p: string, mode: number): boolean {
  try {
    fs.accessSync(p, mode);
    return true;
  } catch {
    return false;
  }
}

function permissionDenied(p: string, what: string): BkfsError {
  let owner = '';
  try {
    const st = fs.statSync(p);
    owner = ` (owner uid ${st.uid}, gid ${st.gid}, mode ${(st.mode & 0o777).toString(8).padStart(4, '0')})`;
  } catch {
    // stat needs search permission on the parent: say nothing more
  }
  return new BkfsError(
    'PERMISSION_DENIED',
    `permission denied: this user (uid ${process.getuid?.() ?? '?'}) cannot ${what} ${p}${owner}`,
  );
}

/**
 * Open the index of `dir` for reading only.
 *
 * - The repository is writable by this process: SQLite `readonly` on the index itself (it sees
 *   what writers commit, through the shared WAL index `-shm`).
 * - Not writable (a root-owned, group-readable repository read by another user; a read-only
 *   mount or snapshot), while a process with write access has the index open (`-wal` and `-shm`
 *   exist): SQLite's read-only WAL access, which reads both without writing them.
 * - Not writable and nobody has it open: the index is then complete in `index.db` alone (the last
 *   connection to close checkpointed the WAL into it and removed it), so it is copied into a
 *   private temp directory and the copy is read. The copy is checked against the original
 *   afterwards (size and change time unchanged, still no WAL), so a writer that started during the
 *   copy is noticed and the copy taken again.
 *
 * Such a reader cannot leave pins (`pins.ts`): forget/gc by a writer while it reads may make its
 * reads fail with EIO, never return other bytes. Lacking read permission is PERMISSION_DENIED.
 */
function openIndexReadOnly(dir: string): {
  db: Database.Database;
  writable: boolean;
  snapshotDir: string | null;
} {
  const dbPath = path.join(dir, DB_FILE);
  if (!fs.existsSync(dbPath)) {
    if (fs.existsSync(path.join(dir, DB_NEW_FILE))) {
      try {
        fs.renameSync(path.join(dir, DB_NEW_FILE), dbPath);
      } catch {
        // not ours to finish (read-only), or another process did
      }
    }
    if (!fs.existsSync(dbPath)) {
      throw new BkfsError(
        'REPO_NOT_FOUND',
        `repository ${dir} has no index (${DB_FILE}); run 'bkfs repair --rebuild-index'`,
      );
    }
  }
  if (!accessible(dbPath, fs.constants.R_OK)) throw permissionDenied(dbPath, 'read');
  const packs = path.join(dir, 'packs');
  if (fs.existsSync(packs) && !accessible(packs, fs.constants.R_OK | fs.constants.X_OK)) {
    throw permissionDenied(packs, 'read');
  }
  const wal = `${dbPath}-wal`;
  const shm = `${dbPath}-shm`;
  const writable =
    accessible(dir, fs.constants.W_OK) &&
    accessible(dbPath, fs.constants.W_OK) &&
    (!fs.existsSync(shm) || accessible(shm, fs.constants.R_OK | fs.constants.W_OK));
  const openRo = (p: string): Database.Database => {
    const db = new Database(p, { readonly: true, fileMustExist: true });
    db.pragma('busy_timeout = 10000');
    db.prepare('SELECT 1 FROM meta LIMIT 1').get(); // the first read is where WAL access fails
    return db;
  };
  if (writable) return { db: openRo(dbPath), writable: true, snapshotDir: null };
  for (let attempt = 0; attempt < 5; attempt++) {
    if (fs.existsSync(wal) || fs.existsSync(shm)) {
      try {
        return { db: openRo(dbPath), writable: false, snapshotDir: null };
      } catch (e) {
        if (!fs.existsSync(wal) && !fs.existsSync(shm)) continue; // closed meanwhile: copy it
        throw new BkfsError(
          'PERMISSION_DENIED',
          `cannot read the index of ${dir} without write access while its write-ahead log is incomplete (a writer is starting, or one was killed): ${(e as Error).message}; retry, or run a bkfs command as the repository's owner first`,
        );
      }
    }
    const before = fs.statSync(dbPath);
    const snap = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-index-'));
    const copy = path.join(snap, DB_FILE);
    fs.copyFileSync(dbPath, copy);
    const after = fs.statSync(dbPath);
    if (
      before.size === after.size &&
      before.ctimeMs === after.ctimeMs &&
      before.mtimeMs === after.mtimeMs &&
      !fs.existsSync(wal)
    ) {
      fs.chmodSync(copy, 0o600);
      try {
        return { db: openRo(copy), writable: false, snapshotDir: snap };
      } catch (e) {
        fs.rmSync(snap, { recursive: true, force: true });
        throw e;
      }
    }
    fs.rmSync(snap, { recursive: true, force: true });
  }
  throw new BkfsError('REPO_LOCKED', `the index of ${dir} kept changing while it was read; retry`);
}

/**
 * Delete a checkpoint's catalogue rows and every map page only it referenced. Chunks are left for
 * gc. Must run inside a transaction.
 */
export function deleteCheckpointRows(db: Database.Database, checkpointId: number): void {
  const disks = db.prepare('SELECT id FROM disks WHERE checkpoint_id = ?').all(checkpointId) as {
    id: number;
  }[];
  const pagesOf = db.prepare('SELECT page_id FROM disk_pages WHERE disk_id = ?');
  const otherRefs = db.prepare('SELECT 1 FROM disk_pages WHERE page_id = ? AND disk_id != ? LIMIT 1');
  const delExtents = db.prepare('DELETE FROM extents WHERE page_id = ?');
  for (const d of disks) {
    for (const row of pagesOf.all(d.id) as { page_id: number }[]) {
      if (!otherRefs.get(row.page_id, d.id)) delExtents.run(row.page_id);
    }
    db.prepare('DELETE FROM disk_pages WHERE disk_id = ?').run(d.id);
    db.prepare('DELETE FROM disk_maps WHERE disk_id = ?').run(d.id);
  }
  db.prepare('DELETE FROM disks WHERE checkpoint_id = ?').run(checkpointId);
  db.prepare('DELETE FROM configs WHERE checkpoint_id = ?').run(checkpointId);
  db.prepare('DELETE FROM checkpoints WHERE id = ?').run(checkpointId);
}

/**
 * Rewrite `bkfs-repo.json` (key slots changed): temp file, fsync, rename, fsync dir. Only the
 * `encryption.slots` of a format-5 repository change this way (FORMAT.md, "Encryption").
 */
export function writeConfig(dir: string, config: RepoConfig): void {
  writeFileDurable(
    path.join(dir, CONFIG_FILE),
    Buffer.from(JSON.stringify(config, null, 2) + '\n'),
    repoModes(dir).file,
  );
}

/** Read and check `bkfs-repo.json` (without opening the index). */
export function loadConfig(dir: string): RepoConfig {
  const cfgPath = path.join(dir, CONFIG_FILE);
  let raw: string;
  try {
    raw = fs.readFileSync(cfgPath, 'utf8');
  } catch (e) {
    const c = (e as NodeJS.ErrnoException).code;
    if (c === 'EACCES' || c === 'EPERM') throw permissionDenied(cfgPath, 'read');
    throw new BkfsError('REPO_NOT_FOUND', `no bkfs repository at ${dir} (run 'bkfs init -r ${dir}' first)`);
  }
  let config: RepoConfig;
  try {
    config = JSON.parse(raw) as RepoConfig;
  } catch {
    throw new BkfsError('REPO_NOT_FOUND', `${cfgPath} is not a bkfs repository configuration`);
  }
  if (config.magic !== REPO_MAGIC) {
    throw new BkfsError('REPO_NOT_FOUND', `${cfgPath} is not a bkfs repository configuration`);
  }
  if (typeof config.format !== 'number' || config.format > FORMAT_VERSION) {
    throw new BkfsError(
      'REPO_VERSION',
      `repository ${dir} has format ${String(config.format)}; this bkfs reads format ${FORMAT_VERSION} (upgrade bkfs)`,
    );
  }
  // Format 5 is the encrypted one (6 is plain, with raw frames): encryption settings and format 5
  // go together.
  if (config.format === ENCRYPTED_FORMAT_VERSION || config.encryption !== undefined) {
    if (config.format !== ENCRYPTED_FORMAT_VERSION) {
      throw new BkfsError('REPO_CORRUPT', `${cfgPath} has encryption settings but format ${config.format}`);
    }
    config.encryption = checkEncryptionConfig(config.encryption, cfgPath);
  }
  return config;
}

export {
  acquireWriterLock,
  setDefaultLockWait,
  readLockInfo,
  writerLockHolder,
  WriterLock,
  type LockInfo,
  type LockOptions,
} from './lock';

/** A `running` checkpoint as recovery lists it. */
export interface RunningCheckpoint {
  id: number;
  uid: string;
  writer: string | null;
}

/**
 * Which of `seen` (checkpoints listed as `running` a moment ago) belong to writers that are gone,
 * so that recovery may delete their manifests and rows; `self` is the caller's own session.
 *
 * The order matters. A writer ends its session only after it committed its checkpoint (or gave it
 * up), so the sessions are checked first and the states read again afterwards: a checkpoint whose
 * writer committed and exited between the listing and the session check is `complete` by then and
 * is left alone. (Checking only the listing's state let a concurrent recovery delete the manifest
 * of a checkpoint committed in between: complete in the index, no manifest on disk.) A checkpoint
 * still `running` once its session is found dead can never be committed any more.
 */
export function deadRunningCheckpoints(
  db: Database.Database,
  dir: string,
  self: string | undefined,
  seen: readonly RunningCheckpoint[],
): RunningCheckpoint[] {
  const gone = seen.filter((r) => r.writer !== self && (r.writer === null || !sessionLive(dir, r.writer)));
  if (gone.length === 0) return gone;
  const st = db.prepare('SELECT state FROM checkpoints WHERE id = ?');
  return gone.filter((r) => (st.get(r.id) as { state: string } | undefined)?.state === 'running');
}
