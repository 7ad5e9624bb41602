/**
 * Migration of a format-1 repository to format 2 (block-map digests, `mapsum.ts`).
 *
 * Runs when a writer takes the lock (`Repository.lockWriter`), before anything else writes: one
 * transaction creates `disk_maps`, computes the entries of every checkpoint-disk from the index as
 * it is, and sets `meta.format` = 2; then `bkfs-repo.json` is rewritten with format 2 (temp file,
 * fsync, rename, fsync dir). A crash in between leaves an index of format 2 with a config saying 1:
 * the next writer only rewrites the config. Readers decide by `meta.format` of the index: a
 * format-1 index is read without digest checks.
 *
 * The digests record the block map as the migration finds it: damage from before cannot be told
 * from intent by the index alone; `verify` compares every block map with its manifest for that.
 * An extent whose chunk row is already missing keeps failing (the reader checks chunk rows first).
 *
 * Then 2 -> 3 (concurrent writers, `migrateToV3`) and 3 -> 4 (frames chunks, codec 2,
 * `migrateToV4`: nothing to convert; `meta.format` and `bkfs-repo.json` are set to 4 in the same
 * way, before the writer writes any codec-2 chunk; old chunks keep their codec).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type Database from 'better-sqlite3';
import type { Repository } from '../repo/repository';
import {
  PLAIN_FORMAT_VERSION,
  RAW_FRAMES_FORMAT_VERSION,
  SCHEMA_V2_TABLES,
  SCHEMA_V3_CHANGES,
} from './schema';
import { repoModes, writeFileDurable } from '../util/private-fs';
import { pageSum, writeDiskSums, type PageSum, type SumExtent } from './mapsum';

/** `meta.format` of an open index. */
export function indexFormat(db: Database.Database): number {
  const r = db.prepare("SELECT value FROM meta WHERE key = 'format'").get() as { value: string } | undefined;
  return Number(r?.value ?? 0);
}

/** Bring the repository to format 2 (caller holds the writer lock). Returns true if it migrated. */
export function migrateToV2(repo: Repository): boolean {
  const db = repo.db;
  let migrated = false;
  if (indexFormat(db) < 2) {
    db.transaction(() => {
      db.exec(SCHEMA_V2_TABLES);
      const disks = db.prepare('SELECT id, virtual_size FROM disks').all() as {
        id: number;
        virtual_size: number;
      }[];
      for (const d of disks) {
        writeDiskSums(db, d.id, d.virtual_size, repo.config.pageSpan, lenientSums(db, d.id));
      }
      db.prepare("UPDATE meta SET value = '2' WHERE key = 'format'").run();
    })();
    migrated = true;
  }
  if (repo.config.format < 2) {
    const cfgPath = path.join(repo.dir, 'bkfs-repo.json');
    const raw = JSON.parse(fs.readFileSync(cfgPath, 'utf8')) as Record<string, unknown>;
    raw.format = 2;
    writeFileDurable(cfgPath, Buffer.from(JSON.stringify(raw, null, 2) + '\n'), repoModes(repo.dir).file);
    (repo.config as { format: number }).format = 2;
  }
  return migrated;
}

/** Entries from the index; an extent whose chunk row is missing is digested as zeros (it fails on read anyway). */
function lenientSums(db: Database.Database, diskId: number): PageSum[] {
  const rows = db
    .prepare(
      `SELECT dp.page_no AS pageNo, e.offset AS offset, e.length AS length, e.chunk_off AS chunkOff, c.hash AS hash
         FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
        WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
    )
    .all(diskId) as (SumExtent & { pageNo: number })[];
  const out: PageSum[] = [];
  let cur: SumExtent[] = [];
  let page = -1;
  for (const r of rows) {
    if (r.pageNo !== page) {
      if (page >= 0 && cur.length > 0) out.push(pageSum(page, cur));
      page = r.pageNo;
      cur = [];
    }
    cur.push({ offset: r.offset, length: r.length, chunkOff: r.chunkOff, hash: r.hash });
  }
  if (page >= 0 && cur.length > 0) out.push(pageSum(page, cur));
  return out;
}

/**
 * Bring the repository from format 2 to 3 (concurrent writers: `checkpoints.writer`,
 * `chunks.candidate`, `gc_marks`, `counters`; see schema.ts). Caller holds the lock EXCLUSIVE:
 * no other writer runs. One transaction changes the schema and sets `meta.format` = 3; then
 * `bkfs-repo.json` is rewritten (as for 1 -> 2; a crash in between: the next writer only rewrites
 * the config). Nothing else changes: no chunk is a candidate, no running checkpoint has a writer
 * (so recovery treats it as a dead writer's, as format 2 did). Returns true if it migrated.
 */
export function migrateToV3(repo: Repository): boolean {
  const db = repo.db;
  let migrated = false;
  if (indexFormat(db) < 3) {
    db.transaction(() => {
      db.exec(SCHEMA_V3_CHANGES);
      db.prepare("UPDATE meta SET value = '3' WHERE key = 'format'").run();
    }).immediate();
    migrated = true;
  }
  const cfgPath = path.join(repo.dir, 'bkfs-repo.json');
  const raw = JSON.parse(fs.readFileSync(cfgPath, 'utf8')) as Record<string, unknown>;
  if (typeof raw.format !== 'number' || raw.format < 3) {
    raw.format = 3;
    writeFileDurable(cfgPath, Buffer.from(JSON.stringify(raw, null, 2) + '\n'), repoModes(repo.dir).file);
  }
  (repo.config as { format: number }).format = 3;
  return migrated;
}

/**
 * Bring the repository from format 3 to 4 (frames chunks, codec 2; see FORMAT.md): no table
 * changes, only the number, so that an older bkfs, which cannot decode codec 2, refuses it. Set in
 * the index, then in `bkfs-repo.json`, before this writer writes any codec-2 chunk. Returns true if
 * the index changed.
 */
export function migrateToV4(repo: Repository): boolean {
  const db = repo.db;
  let migrated = false;
  if (indexFormat(db) < 4) {
    db.prepare("UPDATE meta SET value = '4' WHERE key = 'format'").run();
    migrated = true;
  }
  const cfgPath = path.join(repo.dir, 'bkfs-repo.json');
  const raw = JSON.parse(fs.readFileSync(cfgPath, 'utf8')) as Record<string, unknown>;
  if (typeof raw.format !== 'number' || raw.format < 4) {
    raw.format = 4;
    writeFileDurable(cfgPath, Buffer.from(JSON.stringify(raw, null, 2) + '\n'), repoModes(repo.dir).file);
  }
  (repo.config as { format: number }).format = 4;
  return migrated;
}

/**
 * Bring a local plain repository from format 4 to 6 (raw frames; FORMAT.md "Raw frames (format
 * 6)"): no table changes, only the number, set in the index, then in `bkfs-repo.json`, before this
 * writer writes a raw-frames record, so that an older bkfs, which refuses such records as damaged,
 * refuses the repository instead. Encrypted repositories (5) and repositories in a bucket (whose
 * configuration lives in the bucket) keep their format and get no raw frames. Returns true if the
 * index changed.
 */
export function migrateToV6(repo: Repository): boolean {
  if (!upgradesToRawFrames(repo)) return false;
  const db = repo.db;
  let migrated = false;
  if (indexFormat(db) < RAW_FRAMES_FORMAT_VERSION) {
    db.prepare("UPDATE meta SET value = '6' WHERE key = 'format'").run();
    migrated = true;
  }
  const cfgPath = path.join(repo.dir, 'bkfs-repo.json');
  const raw = JSON.parse(fs.readFileSync(cfgPath, 'utf8')) as Record<string, unknown>;
  if (typeof raw.format !== 'number' || raw.format < RAW_FRAMES_FORMAT_VERSION) {
    raw.format = RAW_FRAMES_FORMAT_VERSION;
    writeFileDurable(cfgPath, Buffer.from(JSON.stringify(raw, null, 2) + '\n'), repoModes(repo.dir).file);
  }
  (repo.config as { format: number }).format = RAW_FRAMES_FORMAT_VERSION;
  return migrated;
}

/** Whether migrations take this repository to format 6: local and plain. */
function upgradesToRawFrames(repo: Repository): boolean {
  return repo.config.encryption === undefined && repo.remote === null;
}

/** Does this repository need a migration (index or config older than this bkfs writes)? */
export function needsMigration(repo: Repository): boolean {
  const target = upgradesToRawFrames(repo) ? PLAIN_FORMAT_VERSION : 4;
  if (indexFormat(repo.db) < target) return true;
  const raw = JSON.parse(fs.readFileSync(path.join(repo.dir, 'bkfs-repo.json'), 'utf8')) as {
    format?: unknown;
  };
  return typeof raw.format !== 'number' || raw.format < target;
}
