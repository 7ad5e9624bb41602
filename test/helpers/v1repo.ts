/**
 * Older-format repositories for tests, from one written by this bkfs (see src/index/schema.ts):
 * formats 4 and 6 add no tables to 3, format 3 is format 2 plus SCHEMA_V3_CHANGES, format 2 is format 1
 * plus the `disk_maps` table. Undoing those and writing the number back gives the schema the older
 * code wrote (tests compare the result with SCHEMA_V1). Chunks stay as this bkfs wrote them (codec
 * 2 frames unless written with BKFS_FRAME_SIZE=0).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';

/** Format 6/4/3 -> 2: what format 3 added, removed (formats 4 and 6 only renumbered). */
export function downgradeToV2(repoDir: string): void {
  const db = new Database(path.join(repoDir, 'index.db'));
  try {
    db.exec(`DROP INDEX chunks_candidates; DROP INDEX chunks_by_hash; ALTER TABLE chunks DROP COLUMN candidate;
             CREATE UNIQUE INDEX chunks_by_hash ON chunks (hash) WHERE damaged = 0;
             ALTER TABLE checkpoints DROP COLUMN writer; DROP TABLE gc_marks; DROP TABLE counters;
             UPDATE meta SET value = '2' WHERE key = 'format';`);
    db.pragma('wal_checkpoint(TRUNCATE)');
  } finally {
    db.close();
  }
  setConfigFormat(repoDir, 2);
}

function setConfigFormat(repoDir: string, format: number): void {
  const cfg = path.join(repoDir, 'bkfs-repo.json');
  const c = JSON.parse(fs.readFileSync(cfg, 'utf8')) as Record<string, unknown>;
  c.format = format;
  fs.writeFileSync(cfg, JSON.stringify(c, null, 2) + '\n');
}

export function downgradeToV1(repoDir: string): void {
  downgradeToV2(repoDir);
  const db = new Database(path.join(repoDir, 'index.db'));
  try {
    db.exec('DROP TABLE IF EXISTS disk_maps');
    db.prepare("UPDATE meta SET value = '1' WHERE key = 'format'").run();
    db.pragma('wal_checkpoint(TRUNCATE)');
  } finally {
    db.close();
  }
  setConfigFormat(repoDir, 1);
}
