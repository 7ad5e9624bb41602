/**
 * A format-1 repository for tests, from one written by this bkfs: format 2 is format 1 plus the
 * `disk_maps` table (see src/index/schema.ts: SCHEMA = SCHEMA_V1 + SCHEMA_V2_TABLES) and the format
 * number, so dropping the table and writing 1 back gives exactly what the format-1 code wrote
 * (tests compare the resulting schema with SCHEMA_V1).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';

export function downgradeToV1(repoDir: string): void {
  const db = new Database(path.join(repoDir, 'index.db'));
  try {
    db.exec('DROP TABLE IF EXISTS disk_maps');
    db.prepare("UPDATE meta SET value = '1' WHERE key = 'format'").run();
    db.pragma('wal_checkpoint(TRUNCATE)');
  } finally {
    db.close();
  }
  const cfg = path.join(repoDir, 'bkfs-repo.json');
  const c = JSON.parse(fs.readFileSync(cfg, 'utf8')) as Record<string, unknown>;
  c.format = 1;
  fs.writeFileSync(cfg, JSON.stringify(c, null, 2) + '\n');
}
