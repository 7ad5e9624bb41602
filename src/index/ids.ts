/**
 * Chunk and page ids for concurrent writers (format 3, FORMAT.md "Concurrent writers").
 *
 * A backup hands out chunk ids before the chunk rows exist (its page maps reference a chunk before
 * its pack is sealed) and page ids as it writes pages. With several writers at once, "max(id) + 1"
 * would give two writers the same id, and an id freed by gc could be handed out again while a
 * writer still holds it. So ids come from the `counters` table, in blocks reserved by one short
 * `BEGIN IMMEDIATE` transaction each: two writers never get the same id, and an id is never
 * handed out twice (the counter only grows; it starts above every id already in the index, which
 * also covers an index rebuilt or migrated without counters).
 */
import type Database from 'better-sqlite3';

export type IdKind = 'chunk' | 'page';

function maxExisting(db: Database.Database, kind: IdKind): number {
  if (kind === 'chunk') {
    return (db.prepare('SELECT max(id) AS m FROM chunks').get() as { m: number | null }).m ?? 0;
  }
  const a = db.prepare('SELECT max(page_id) AS m FROM disk_pages').get() as { m: number | null };
  const b = db.prepare('SELECT max(page_id) AS m FROM extents').get() as { m: number | null };
  return Math.max(a.m ?? 0, b.m ?? 0);
}

/**
 * Reserve `n` consecutive ids of `kind`; returns the first. Must run inside a write transaction
 * (`reserveIds` opens one).
 */
export function reserveIdsInTx(db: Database.Database, kind: IdKind, n: number): number {
  const row = db.prepare('SELECT next FROM counters WHERE name = ?').get(kind) as
    { next: number } | undefined;
  const start = Math.max(row?.next ?? 1, maxExisting(db, kind) + 1);
  db.prepare('INSERT OR REPLACE INTO counters (name, next) VALUES (?, ?)').run(kind, start + n);
  return start;
}

/** Reserve `n` ids of `kind` in a transaction of its own (BEGIN IMMEDIATE); returns the first. */
export function reserveIds(db: Database.Database, kind: IdKind, n: number): number {
  return db.transaction(() => reserveIdsInTx(db, kind, n)).immediate();
}

/** Hands out ids of one kind from blocks reserved as needed. */
export class IdBlock {
  private next = 0;
  private end = 0;

  constructor(
    private readonly db: Database.Database,
    private readonly kind: IdKind,
    private readonly blockSize = 4096,
  ) {}

  take(): number {
    if (this.next >= this.end) {
      this.next = reserveIds(this.db, this.kind, this.blockSize);
      this.end = this.next + this.blockSize;
    }
    return this.next++;
  }
}
