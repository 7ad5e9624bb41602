/**
 * The index's files during `repair --rebuild-index` (local state, FORMAT.md "Storage interface"):
 * `index.db.rebuild` being built, `index.db.new` complete and durable, the swap that moves the old
 * `index.db` (and its -wal/-shm) aside and the new one in place, and the clearing of `tmp/`.
 * The index is local by nature (a cache of the bucket for a repository on object storage), so
 * this is the one place rebuild.ts reaches the file system; everything it reads from packs and
 * manifests goes through the store.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { DB_FILE, DB_NEW_FILE, crashPoint } from './repository';
import { fsyncDirSync, mkdirPrivateSync, precreateDbFile, repoModes } from '../util/private-fs';

export const BUILD_FILE = 'index.db.rebuild';

function rmDbFiles(base: string): void {
  for (const suffix of ['', '-wal', '-shm', '-journal']) fs.rmSync(`${base}${suffix}`, { force: true });
}

function fsyncFile(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Empty `tmp/` (no writer runs: the rebuild holds the writer lock exclusively); returns it. */
export function clearTmp(dir: string): string {
  const tmpDir = path.join(dir, 'tmp');
  mkdirPrivateSync(tmpDir, { recursive: true, mode: repoModes(dir).dir });
  for (const f of fs.readdirSync(tmpDir)) fs.rmSync(path.join(tmpDir, f), { force: true, recursive: true });
  return tmpDir;
}

/** A new, empty database file `index.db.rebuild` (leftovers of an earlier attempt removed). */
export function createBuildDb(dir: string): Database.Database {
  const buildPath = path.join(dir, BUILD_FILE);
  rmDbFiles(buildPath);
  rmDbFiles(path.join(dir, DB_NEW_FILE));
  precreateDbFile(buildPath, repoModes(dir).file);
  return new Database(buildPath);
}

/**
 * Put the built (and closed) index in place: fsync it, rename it to `index.db.new` (durable),
 * move the old index and its -wal/-shm aside to `index.db.broken-<time>`, rename the new one to
 * `index.db`. A crash before the move leaves the old index in use; one after it is finished by
 * the next `Repository.open`. Returns the name the old index went to, or null if there was none.
 */
export function installBuiltIndex(dir: string): string | null {
  const buildPath = path.join(dir, BUILD_FILE);
  fsyncFile(buildPath);
  const newPath = path.join(dir, DB_NEW_FILE);
  fs.renameSync(buildPath, newPath);
  fsyncDirSync(dir);
  crashPoint('rebuild-before-swap');

  // Swap: old index (and any -wal/-shm, which must never meet the new file) aside, new in place.
  const dbPath = path.join(dir, DB_FILE);
  const stamp = new Date()
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
  const aside = `${DB_FILE}.broken-${stamp}`;
  let moved = false;
  for (const suffix of ['', '-wal', '-shm']) {
    if (fs.existsSync(dbPath + suffix)) {
      fs.renameSync(dbPath + suffix, path.join(dir, aside + suffix));
      moved = moved || suffix === '';
    }
  }
  fsyncDirSync(dir);
  crashPoint('rebuild-after-move-aside');
  try {
    fs.renameSync(newPath, dbPath);
  } catch (e) {
    // A reader's Repository.open may have finished the swap first.
    if (!fs.existsSync(dbPath)) throw e;
  }
  fsyncDirSync(dir);
  return moved ? aside : null;
}
