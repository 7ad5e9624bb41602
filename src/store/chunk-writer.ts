/**
 * ChunkWriter: deduplicating writer of chunks into packs, for one backup (of many at once).
 *
 * `put()` takes a hashed, compressed chunk and returns its chunk id: an existing undamaged chunk
 * with the same hash that is not a gc deletion candidate (in the index, or written earlier by this
 * backup) is reused; otherwise the chunk is appended to the current pack. Chunk ids are handed out
 * up front from blocks reserved in the `counters` table (`ids.ts`: concurrent writers never get
 * the same id), so page maps can reference a chunk before its pack is sealed. When a pack reaches
 * PACK_TARGET it is sealed (fsync + rename) in the background while the next pack fills, and only
 * then are its chunk rows inserted in one short `BEGIN IMMEDIATE` transaction: an indexed chunk is
 * always durable.
 *
 * Two writers storing the same new data at once (FORMAT.md, "Concurrent writers"): both append it
 * to their own packs; the first to seal inserts the chunk row. The second finds the row inside its
 * seal transaction, inserts none, and records "my id -> that id" (`remap`); before the checkpoint's
 * manifest is built, `applyRemap` re-points this backup's extents to the existing row. So there is
 * one chunk row per hash, and the loser's copy is unused bytes in its pack (gc reclaims them).
 *
 * The checkpoint that references chunks is committed after `finish()` and `applyRemap()`, so it
 * never points at data that is not on disk or at an id without a row.
 *
 * `put()` calls are placed in order; their writes are batched (PackWriter). Memory: the pending hash
 * map of the current pack and the buffers of the chunks whose write is in flight.
 */
import type Database from 'better-sqlite3';
import { PackWriter, PACK_TARGET } from './packs';
import type { Codec } from './codec';
import { IdBlock } from '../index/ids';

export interface ChunkStats {
  newChunks: number;
  newRawBytes: number;
  newStoredBytes: number;
  dedupChunks: number;
  dedupBytes: number;
}

export class ChunkWriter {
  private pack: PackWriter | undefined;
  private pending = new Map<string, number>(); // hash hex -> chunk id, chunks of the open pack
  /** Packs being sealed in the background, with their chunks (still found by dedup). */
  private readonly sealing: { pending: Map<string, number>; done: Promise<void> }[] = [];
  private sealError: unknown;
  private readonly ids: IdBlock;
  /** Ids this writer handed out whose hash another writer indexed first -> that writer's id. */
  readonly remap = new Map<number, number>();
  private chain: Promise<unknown> = Promise.resolve();
  private readonly findStmt: Database.Statement;
  /** Packs sealed and indexed so far (their chunks are committed: a crash after keeps them). */
  packsIndexed = 0;
  readonly stats: ChunkStats = {
    newChunks: 0,
    newRawBytes: 0,
    newStoredBytes: 0,
    dedupChunks: 0,
    dedupBytes: 0,
  };

  constructor(
    private readonly db: Database.Database,
    private readonly repoDir: string,
    private readonly packTarget = PACK_TARGET,
    /** The writer's own temp directory (relative to the repository), `tmp/<session>`. */
    private readonly tmpSubdir = 'tmp',
    /** Encrypted repository: `put()` gets sealed stored bytes, packs are flagged sealed. */
    private readonly sealed = false,
  ) {
    this.ids = new IdBlock(db, 'chunk', 4096);
    // Never a deletion candidate (FORMAT.md, "Concurrent writers"): gc may delete it once every
    // writer that was running when it was marked has ended, which does not wait for this one.
    this.findStmt = db.prepare('SELECT id FROM chunks WHERE hash = ? AND damaged = 0 AND candidate IS NULL');
  }

  /**
   * Store a chunk (or find it stored) and resolve with its id once its bytes are written (not yet
   * durable: that is `finish()`). Placement runs in call order; the writes of chunks placed while
   * an earlier write is in flight go out together (PackWriter.append), so a put does not wait for
   * the writes of the puts before it. `stored` must not change until the promise settles. `tail`
   * (raw frames, `IngestResult.tail`): more stored bytes, written after `stored`, same rule.
   */
  put(hash: Buffer, codec: Codec, stored: Buffer, rawLen: number, tail?: Buffer): Promise<number> {
    const placed = this.chain.then(() => this.place(hash, codec, stored, rawLen, tail));
    this.chain = placed.catch(() => undefined);
    return placed.then(async (r) => {
      await r.written;
      return r.id;
    });
  }

  private async place(
    hash: Buffer,
    codec: Codec,
    stored: Buffer,
    rawLen: number,
    tail?: Buffer,
  ): Promise<{ id: number; written: Promise<unknown> | null }> {
    if (this.sealError !== undefined) throw this.sealError;
    const key = hash.toString('hex');
    const known = this.pending.get(key) ?? this.sealingId(key) ?? this.lookup(hash);
    if (known !== undefined) {
      this.stats.dedupChunks++;
      this.stats.dedupBytes += rawLen;
      return { id: known, written: null };
    }
    this.pack ??= await PackWriter.create(this.repoDir, this.tmpSubdir, this.sealed);
    const id = this.ids.take();
    const storedLen = stored.length + (tail?.length ?? 0);
    const written = this.pack.append({ codec, rawLen, storedLen, hash }, stored, tail);
    written.catch(() => undefined); // observed by the caller of put(), and by seal()
    this.pending.set(key, id);
    this.stats.newChunks++;
    this.stats.newRawBytes += rawLen;
    this.stats.newStoredBytes += storedLen;
    if (this.pack.size >= this.packTarget) await this.startSeal();
    return { id, written };
  }

  private sealingId(key: string): number | undefined {
    for (const s of this.sealing) {
      const id = s.pending.get(key);
      if (id !== undefined) return id;
    }
    return undefined;
  }

  /**
   * Seal the open pack in the background (its fsync must not stall ingest) and start a new one.
   * At most two seals run at once; `finish()` waits for all of them before the checkpoint commits.
   */
  private async startSeal(): Promise<void> {
    const pack = this.pack;
    if (!pack) return;
    this.pack = undefined;
    const pending = this.pending;
    this.pending = new Map();
    const entry = { pending, done: Promise.resolve() };
    entry.done = this.sealPack(pack, pending).then(
      () => {
        this.sealing.splice(this.sealing.indexOf(entry), 1);
      },
      (e: unknown) => {
        this.sealError ??= e;
      },
    );
    this.sealing.push(entry);
    if (this.sealing.length > 2) await this.sealing[0]!.done;
  }

  private lookup(hash: Buffer): number | undefined {
    const r = this.findStmt.get(hash) as { id: number } | undefined;
    return r?.id;
  }

  private async sealPack(pack: PackWriter, pending: Map<string, number>): Promise<void> {
    await pack.seal();
    const insPack = this.db.prepare('INSERT INTO packs (name, size, created) VALUES (?, ?, ?)');
    const insChunk = this.db.prepare(
      'INSERT INTO chunks (id, hash, pack_id, offset, stored_len, raw_len, codec) VALUES (?, ?, ?, ?, ?, ?, ?)',
    );
    let lost = 0;
    let lostRaw = 0;
    let lostStored = 0;
    const indexed = this.db
      .transaction(() => {
        // Inside the write transaction: no other writer can insert the same hash meanwhile.
        const mine: { id: number; c: (typeof pack.chunks)[number] }[] = [];
        for (const c of pack.chunks) {
          const id = pending.get(c.hash.toString('hex'));
          if (id === undefined) continue;
          const other = this.findStmt.get(c.hash) as { id: number } | undefined;
          if (other !== undefined) {
            this.remap.set(id, other.id); // another writer stored it first
            lost++;
            lostRaw += c.rawLen;
            lostStored += c.storedLen;
          } else {
            mine.push({ id, c });
          }
        }
        if (mine.length === 0) return false;
        const packId = Number(insPack.run(pack.name, pack.size, Date.now()).lastInsertRowid);
        for (const { id, c } of mine) {
          insChunk.run(id, c.hash, packId, c.offset, c.storedLen, c.rawLen, c.codec);
        }
        return true;
      })
      .immediate();
    if (indexed) this.packsIndexed++;
    this.stats.newChunks -= lost;
    this.stats.newRawBytes -= lostRaw;
    this.stats.newStoredBytes -= lostStored;
    this.stats.dedupChunks += lost;
    this.stats.dedupBytes += lostRaw;
    // Every chunk of the pack was stored by others first: the file is garbage (nothing names it).
    if (!indexed) await pack.removeSealed();
  }

  /**
   * Re-point this backup's extents (in the page tables of `diskIds`) from ids that lost a race
   * (`remap`) to the chunk rows that won. Call after `finish()`, before the manifest is built.
   * Pages written by this backup are used by no one else yet, and the winning row has the same
   * hash (digests name chunks by hash), so nothing else changes.
   */
  applyRemap(diskIds: readonly number[]): number {
    if (this.remap.size === 0) return 0;
    const sel = this.db.prepare(
      `SELECT e.page_id AS p, e.offset AS o, e.chunk_id AS c FROM disk_pages dp
         JOIN extents e ON e.page_id = dp.page_id WHERE dp.disk_id = ? AND e.chunk_id IS NOT NULL`,
    );
    const todo: { p: number; o: number; c: number }[] = [];
    for (const d of diskIds) {
      for (const r of sel.iterate(d) as IterableIterator<{ p: number; o: number; c: number }>) {
        const to = this.remap.get(r.c);
        if (to !== undefined) todo.push({ p: r.p, o: r.o, c: to });
      }
    }
    if (todo.length === 0) return 0;
    const upd = this.db.prepare('UPDATE extents SET chunk_id = ? WHERE page_id = ? AND offset = ?');
    this.db
      .transaction(() => {
        for (const t of todo) upd.run(t.c, t.p, t.o);
      })
      .immediate();
    return todo.length;
  }

  /** Seal the open pack; after this every chunk handed out is durable and indexed. */
  async finish(): Promise<void> {
    await this.chain;
    await this.startSeal();
    await Promise.all(this.sealing.map((x) => x.done));
    if (this.sealError !== undefined) throw this.sealError;
  }

  /** Drop the open pack (sealed packs stay: their chunks are indexed and valid). */
  async abort(): Promise<void> {
    await this.chain.catch(() => undefined);
    await Promise.all(this.sealing.map((x) => x.done));
    const pack = this.pack;
    this.pack = undefined;
    this.pending.clear();
    if (pack) await pack.abort();
  }
}
