/**
 * A bkfs repository: one self-contained directory (see `src/store/FORMAT.md`).
 *
 *   bkfs-repo.json   magic, format version, repository id and chunking parameters
 *   index.db         SQLite block index and catalogue (WAL mode)
 *   packs/NN/*.pack  chunk data
 *   tmp/             packs being written
 *   manifests/       one manifest per checkpoint, to rebuild the index (`manifest.ts`)
 *   pins/            checkpoints in use by readers (`pins.ts`)
 *   lock             writer lock (JSON: pid, host, command, time)
 *
 * Locking: one writer at a time holds `lock` (created with O_EXCL; a lock whose process is gone on
 * this host is stale and taken over). Readers (list, mount, restore, verify) take no lock: SQLite's
 * WAL lets them read committed state while a backup writes, and a checkpoint becomes visible only
 * when its final transaction flips it to `complete`.
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
import { FORMAT_VERSION, SCHEMA } from '../index/schema';
import { PackReader } from '../store/packs';
import { processAlive } from '../util/proc';
import { makeDirs, onUserPath } from '../util/userpath';

export const REPO_MAGIC = 'bkfs-repository';
export const CONFIG_FILE = 'bkfs-repo.json';
export const DB_FILE = 'index.db';
/** A rebuilt index that is complete and durable, waiting to replace `index.db` (see rebuild.ts). */
export const DB_NEW_FILE = 'index.db.new';

/**
 * Test-only crash injection: when `BKFS_TEST_CRASH_AT` names `step`, the process kills itself with
 * SIGKILL right there (a real kill of the real process, so crash-safety tests need no fakes). The
 * steps are listed in FORMAT.md ("Crash points").
 */
export function crashPoint(step: string): void {
  if (process.env.BKFS_TEST_CRASH_AT === step) process.kill(process.pid, 'SIGKILL');
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
}

export interface InitOptions {
  chunkSize?: number;
  pageCells?: number;
  compressionLevel?: number;
}

export { defaultRepoPath } from './default-path';

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export class Repository {
  readonly packs: PackReader;
  private lockHeld = false;

  private constructor(
    readonly dir: string,
    readonly config: RepoConfig,
    readonly db: Database.Database,
  ) {
    this.packs = new PackReader(dir);
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
    makeDirs(dir, 'repository');
    if (onUserPath('repository', dir, () => fs.readdirSync(dir)).length > 0) {
      throw new BkfsError('REPO_EXISTS', `${dir} is not empty; choose an empty or new directory`);
    }
    onUserPath('repository', dir, () => {
      for (const sub of ['packs', 'tmp', 'manifests']) fs.mkdirSync(path.join(dir, sub), { mode: 0o700 });
    });
    const config: RepoConfig = {
      magic: REPO_MAGIC,
      format: FORMAT_VERSION,
      id: randomBytes(8).toString('hex'),
      chunkSize,
      pageSpan: chunkSize * pageCells,
      hash: 'blake3',
      compression: { codec: 'zstd', level: opts.compressionLevel ?? 1 },
      created: new Date().toISOString(),
    };
    const db = new Database(path.join(dir, DB_FILE));
    db.pragma('journal_mode = WAL');
    db.exec(SCHEMA);
    db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('format', String(FORMAT_VERSION));
    db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('repo_id', config.id);
    db.close();
    // The config file is written last: a directory without it is not a repository.
    const tmp = path.join(dir, `${CONFIG_FILE}.tmp`);
    fs.writeFileSync(tmp, JSON.stringify(config, null, 2) + '\n');
    fs.renameSync(tmp, path.join(dir, CONFIG_FILE));
    return Repository.open(dir);
  }

  static open(dir: string): Repository {
    const config = loadConfig(dir);
    const dbPath = path.join(dir, DB_FILE);
    if (!fs.existsSync(dbPath) && fs.existsSync(path.join(dir, DB_NEW_FILE))) {
      // An index rebuild was interrupted right after moving the old index aside: finish it.
      try {
        fs.renameSync(path.join(dir, DB_NEW_FILE), dbPath);
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
    db.pragma('busy_timeout = 10000');
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    const ver = db.prepare("SELECT value FROM meta WHERE key = 'format'").get() as
      { value: string } | undefined;
    if (!ver || Number(ver.value) > FORMAT_VERSION) {
      db.close();
      throw new BkfsError('REPO_VERSION', `index of ${dir} has format ${ver?.value ?? '?'}; upgrade bkfs`);
    }
    return new Repository(dir, config, db);
  }

  get lockPath(): string {
    return path.join(this.dir, 'lock');
  }

  /** Take the writer lock, then clean up after any writer that crashed. */
  lockWriter(command: string): void {
    acquireWriterLock(this.dir, command);
    this.lockHeld = true;
    this.recover();
  }

  unlockWriter(): void {
    if (!this.lockHeld) return;
    this.lockHeld = false;
    releaseWriterLock(this.dir);
  }

  /** Remove what an interrupted writer left: running checkpoints, their maps, temp packs. */
  private recover(): void {
    // Loaded here, not at the top: readers (`bkfs list`) never recover, and manifest.ts pulls in
    // zstd and gc (start-up time).
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { finishForgetJournals, removeManifest } = require('./manifest') as typeof import('./manifest');
    const running = this.db.prepare("SELECT id, uid FROM checkpoints WHERE state = 'running'").all() as {
      id: number;
      uid: string;
    }[];
    if (running.length > 0) {
      // Manifest first: a crash in between leaves a running row without a manifest, never a
      // manifest that an index rebuild would take for a committed checkpoint.
      for (const r of running) removeManifest(this.dir, r.uid);
      this.db.transaction(() => {
        for (const { id } of running) deleteCheckpointRows(this.db, id);
      })();
    }
    finishForgetJournals(this);
    const tmp = path.join(this.dir, 'tmp');
    fs.mkdirSync(tmp, { recursive: true });
    for (const f of fs.readdirSync(tmp)) fs.rmSync(path.join(tmp, f), { force: true, recursive: true });
  }

  close(): void {
    this.unlockWriter();
    this.packs.close();
    if (this.db.open) this.db.close();
  }
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
  }
  db.prepare('DELETE FROM disks WHERE checkpoint_id = ?').run(checkpointId);
  db.prepare('DELETE FROM configs WHERE checkpoint_id = ?').run(checkpointId);
  db.prepare('DELETE FROM checkpoints WHERE id = ?').run(checkpointId);
}

/** Read and check `bkfs-repo.json` (without opening the index). */
export function loadConfig(dir: string): RepoConfig {
  const cfgPath = path.join(dir, CONFIG_FILE);
  let raw: string;
  try {
    raw = fs.readFileSync(cfgPath, 'utf8');
  } catch (e) {
    const c = (e as NodeJS.ErrnoException).code;
    if (c === 'EACCES' || c === 'EPERM') {
      throw new BkfsError(
        'PERMISSION_DENIED',
        `repository ${dir}: permission denied (uid ${process.getuid?.() ?? '?'} may not read ${cfgPath})`,
      );
    }
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
  return config;
}

/**
 * Take the writer lock of the repository in `dir` (O_EXCL create of `lock`; a lock left by a dead
 * process of this host is taken over). Throws REPO_LOCKED when a live process holds it. Used by
 * `Repository.lockWriter` and by the index rebuild, which runs without an index.
 */
export function acquireWriterLock(dir: string, command: string): void {
  const lockPath = path.join(dir, 'lock');
  const info = JSON.stringify({
    pid: process.pid,
    host: os.hostname(),
    command,
    time: new Date().toISOString(),
  });
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(lockPath, info, { flag: 'wx' });
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const holder = readLock(lockPath);
    if (holder && holder.host === os.hostname() && !processAlive(holder.pid)) {
      fs.rmSync(lockPath, { force: true });
      continue;
    }
    const who = holder
      ? `pid ${holder.pid} on ${holder.host} (${holder.command}, since ${holder.time})`
      : 'another process';
    throw new BkfsError('REPO_LOCKED', `repository ${dir} is locked by ${who}`);
  }
  throw new BkfsError('REPO_LOCKED', `repository ${dir} is locked`);
}

/** Release the writer lock if this process holds it. */
export function releaseWriterLock(dir: string): void {
  const lockPath = path.join(dir, 'lock');
  const holder = readLock(lockPath);
  if (holder && holder.pid === process.pid) fs.rmSync(lockPath, { force: true });
}

interface LockInfo {
  pid: number;
  host: string;
  command: string;
  time: string;
}

function readLock(p: string): LockInfo | undefined {
  try {
    return JSON.parse(fs.readFileSync(p, 'utf8')) as LockInfo;
  } catch {
    return undefined;
  }
}
