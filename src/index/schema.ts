/**
 * SQLite schema of the block index and catalogue (repository format 3).
 * The meaning of every table and its invariants are documented in `src/store/FORMAT.md`.
 * Changing anything here means a new FORMAT_VERSION and a migration.
 *
 * Format 2 = format 1 + `disk_maps` (block-map digests, `src/index/mapsum.ts`). A format-1 index
 * is read as is (without digest checks) and migrated by the first writer (`src/index/migrate.ts`).
 * Format 3 = format 2 + concurrent writers (`SCHEMA_V3_CHANGES`). Format 4 = format 3 + chunks of
 * codec 2 (frames, `src/store/codec.ts`); no table changes: the first writer only renumbers (so
 * that an older bkfs, which cannot decode codec 2, refuses it). Format 6 = format 4 + raw frames
 * (codec-2 records longer than their chunk); no table changes either, renumbered the same way.
 */
/** The highest repository format this bkfs reads (and writes for plain repositories). */
export const FORMAT_VERSION = 6;
/**
 * The format of plain (unencrypted) repositories: 6 = 4 + raw frames (an incompressible chunk
 * stored as frames that are all raw, FORMAT.md "Raw frames (format 6)"). Local plain repositories
 * are migrated to it by their first writer; a plain repository in a bucket stays at the format it
 * was created with (its configuration lives in the bucket). Version 5 only adds encryption
 * (FORMAT.md, "Encryption (format 5)"): an encrypted repository is created at 5 and stays there
 * (its chunks are sealed whole, so raw frames would not make its reads cheaper).
 */
export const PLAIN_FORMAT_VERSION = 6;
export const ENCRYPTED_FORMAT_VERSION = 5;
/** From this format on, a plain repository's writers store incompressible chunks as raw frames. */
export const RAW_FRAMES_FORMAT_VERSION = 6;

/** Tables added by format 2. */
export const SCHEMA_V2_TABLES = `
CREATE TABLE disk_maps (
  disk_id INTEGER PRIMARY KEY,
  pages INTEGER NOT NULL,
  sums BLOB NOT NULL,
  digest BLOB NOT NULL
);
`;

/** The format-1 schema, unchanged (kept to migrate from and to build format-1 test fixtures). */
export const SCHEMA_V1 = `
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

CREATE TABLE vms (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created INTEGER NOT NULL
);

CREATE TABLE checkpoints (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  uid TEXT NOT NULL UNIQUE DEFAULT (lower(hex(randomblob(16)))),
  vm_id INTEGER NOT NULL,
  name TEXT NOT NULL,
  level TEXT NOT NULL CHECK (level IN ('full', 'inc', 'diff', 'copy')),
  state TEXT NOT NULL CHECK (state IN ('running', 'complete', 'failed', 'forgotten')),
  chain_id INTEGER NOT NULL,
  parent_id INTEGER,
  base_id INTEGER,
  started INTEGER NOT NULL,
  finished INTEGER,
  bytes_read INTEGER NOT NULL DEFAULT 0,
  bytes_new_raw INTEGER NOT NULL DEFAULT 0,
  bytes_new_stored INTEGER NOT NULL DEFAULT 0,
  chunks_new INTEGER NOT NULL DEFAULT 0,
  libvirt_checkpoint TEXT,
  protected INTEGER NOT NULL DEFAULT 0,
  damaged INTEGER NOT NULL DEFAULT 0,
  UNIQUE (vm_id, name)
);

CREATE TABLE configs (
  checkpoint_id INTEGER NOT NULL,
  name TEXT NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (checkpoint_id, name)
) WITHOUT ROWID;

CREATE TABLE disks (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  checkpoint_id INTEGER NOT NULL,
  name TEXT NOT NULL,
  virtual_size INTEGER NOT NULL,
  source TEXT,
  format TEXT,
  bitmap TEXT,
  bytes_read INTEGER NOT NULL DEFAULT 0,
  bytes_zero INTEGER NOT NULL DEFAULT 0,
  UNIQUE (checkpoint_id, name)
);

CREATE TABLE disk_pages (
  disk_id INTEGER NOT NULL,
  page_no INTEGER NOT NULL,
  page_id INTEGER NOT NULL,
  PRIMARY KEY (disk_id, page_no)
) WITHOUT ROWID;
CREATE INDEX disk_pages_by_page ON disk_pages (page_id);

CREATE TABLE extents (
  page_id INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  length INTEGER NOT NULL,
  chunk_id INTEGER,
  chunk_off INTEGER NOT NULL DEFAULT 0,
  origin INTEGER NOT NULL,
  PRIMARY KEY (page_id, offset)
) WITHOUT ROWID;

CREATE TABLE packs (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  size INTEGER NOT NULL,
  created INTEGER NOT NULL
);

CREATE TABLE chunks (
  id INTEGER PRIMARY KEY,
  hash BLOB NOT NULL,
  pack_id INTEGER NOT NULL,
  offset INTEGER NOT NULL,
  stored_len INTEGER NOT NULL,
  raw_len INTEGER NOT NULL,
  codec INTEGER NOT NULL,
  damaged INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX chunks_by_hash ON chunks (hash) WHERE damaged = 0;
CREATE INDEX chunks_damaged ON chunks (hash) WHERE damaged = 1;
CREATE INDEX chunks_by_pack ON chunks (pack_id);
`;

/**
 * Format 3 = format 2 + concurrent writers (FORMAT.md, "Concurrent writers"):
 *   - `checkpoints.writer`: the session file (`writers/<name>.json`) of the process writing a
 *     `running` checkpoint, so recovery deletes only rows of writers that are gone;
 *   - `chunks.candidate`: the gc generation that marked the chunk as a deletion candidate (NULL =
 *     not a candidate); dedup never uses a candidate, and `chunks_by_hash` is unique among
 *     undamaged non-candidates only;
 *   - `gc_marks`: one row per gc generation, with the writer sessions that were live when it was
 *     marked (its candidates are deleted only after all of them ended);
 *   - `counters`: the next chunk and page id to hand out, so concurrent writers never collide and
 *     an id is never reused.
 */
export const SCHEMA_V3_CHANGES = `
ALTER TABLE checkpoints ADD COLUMN writer TEXT;
ALTER TABLE chunks ADD COLUMN candidate INTEGER;
DROP INDEX chunks_by_hash;
CREATE UNIQUE INDEX chunks_by_hash ON chunks (hash) WHERE damaged = 0 AND candidate IS NULL;
CREATE INDEX chunks_candidates ON chunks (candidate) WHERE candidate IS NOT NULL;
CREATE TABLE gc_marks (
  gen INTEGER PRIMARY KEY,
  time INTEGER NOT NULL,
  sessions TEXT
);
CREATE TABLE counters (name TEXT PRIMARY KEY, next INTEGER NOT NULL) WITHOUT ROWID;
`;

export const SCHEMA = SCHEMA_V1 + SCHEMA_V2_TABLES + SCHEMA_V3_CHANGES;
