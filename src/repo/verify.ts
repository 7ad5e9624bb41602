/**
 * `verify`: proves that checkpoints can be restored.
 *
 * 1. Index consistency for the selected checkpoints: every extent references an indexed chunk and
 *    lies inside it, extents of a page are sorted and do not overlap, stay inside their page and
 *    the disk, every chunk's pack is indexed and present on disk with the chunk inside it.
 * 2. Deep check: every chunk the selection uses is read back from its pack (in pack order, a few
 *    reads in flight), decompressed and re-hashed. A chunk that fails is reported with every
 *    checkpoint and disk range that uses it.
 * Read-only: takes no lock, works while a backup runs. Memory: the set of chunk ids in use.
 */
import * as fs from 'node:fs';
import type { Repository } from './repository';
import { decodeChunk } from '../store/codec';
import { packPath } from '../store/packs';
import { getCheckpoint, getVm, listCheckpoints, listVms, type CheckpointRow } from '../index/catalog';
import { orderedMap } from '../util/pipeline';

export interface VerifyOptions {
  vm?: string;
  checkpoint?: string;
  /** Re-read only this share of the chunks (0 < p <= 100), chosen at random. */
  samplePercent?: number;
  onProgress?: (done: number, total: number) => void;
}

export interface ChunkUse {
  vm: string;
  checkpoint: string;
  disk: string;
  offset: number;
  length: number;
}

export interface DamagedChunk {
  chunkId: number;
  hash: string;
  error: string;
  uses: ChunkUse[];
}

export interface VerifyReport {
  checkpoints: number;
  chunksChecked: number;
  bytesChecked: number;
  problems: string[];
  damaged: DamagedChunk[];
}

function selectCheckpoints(repo: Repository, o: VerifyOptions): { vm: string; cp: CheckpointRow }[] {
  if (o.vm) {
    const vm = getVm(repo.db, o.vm);
    if (o.checkpoint) return [{ vm: vm.name, cp: getCheckpoint(repo.db, vm, o.checkpoint) }];
    return listCheckpoints(repo.db, vm.id).map((cp) => ({ vm: vm.name, cp }));
  }
  return listVms(repo.db).flatMap((vm) => listCheckpoints(repo.db, vm.id).map((cp) => ({ vm: vm.name, cp })));
}

export async function verifyRepository(repo: Repository, o: VerifyOptions = {}): Promise<VerifyReport> {
  const db = repo.db;
  const sel = selectCheckpoints(repo, o);
  const problems: string[] = [];
  const used = new Set<number>();
  const span = repo.config.pageSpan;
  const extStmt = db.prepare(
    `SELECT dp.page_no AS pageNo, e.offset AS offset, e.length AS length, e.chunk_id AS chunkId,
            e.chunk_off AS chunkOff, c.raw_len AS rawLen, c.id AS present
       FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
      WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
  );
  for (const { vm, cp } of sel) {
    const disks = db.prepare('SELECT * FROM disks WHERE checkpoint_id = ?').all(cp.id) as {
      id: number;
      name: string;
      virtual_size: number;
    }[];
    if (disks.length === 0) problems.push(`${vm}@${cp.name}: checkpoint has no disks`);
    for (const d of disks) {
      let prevEnd = -1;
      let prevPage = -1;
      const where = `${vm}@${cp.name} disk ${d.name}`;
      for (const r of extStmt.iterate(d.id) as IterableIterator<{
        pageNo: number;
        offset: number;
        length: number;
        chunkId: number | null;
        chunkOff: number;
        rawLen: number | null;
        present: number | null;
      }>) {
        if (r.pageNo !== prevPage) prevEnd = -1;
        prevPage = r.pageNo;
        if (r.length <= 0) problems.push(`${where}: empty extent at ${r.offset}`);
        if (r.offset < prevEnd) problems.push(`${where}: overlapping extents at ${r.offset}`);
        if (
          Math.floor(r.offset / span) !== r.pageNo ||
          Math.floor((r.offset + r.length - 1) / span) !== r.pageNo
        ) {
          problems.push(`${where}: extent at ${r.offset} is outside its page ${r.pageNo}`);
        }
        if (r.offset + r.length > d.virtual_size)
          problems.push(`${where}: extent at ${r.offset} is past the disk's end`);
        prevEnd = r.offset + r.length;
        if (r.chunkId === null) continue;
        if (r.present === null) {
          problems.push(`${where}: extent at ${r.offset} references missing chunk ${r.chunkId}`);
          continue;
        }
        if (r.chunkOff + r.length > (r.rawLen ?? 0)) {
          problems.push(`${where}: extent at ${r.offset} reaches past the end of chunk ${r.chunkId}`);
        }
        used.add(r.chunkId);
      }
    }
  }

  let ids = [...used];
  if (o.samplePercent !== undefined && o.samplePercent < 100) {
    const keep = Math.max(1, Math.ceil((ids.length * o.samplePercent) / 100));
    for (let i = ids.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [ids[i], ids[j]] = [ids[j]!, ids[i]!];
    }
    ids = ids.slice(0, keep);
  }
  const locStmt = db.prepare(
    `SELECT c.id AS id, c.hash AS hash, p.name AS pack, p.size AS packSize, c.offset AS offset,
            c.stored_len AS storedLen, c.raw_len AS rawLen, c.codec AS codec
       FROM chunks c LEFT JOIN packs p ON p.id = c.pack_id WHERE c.id = ?`,
  );
  type Loc = {
    id: number;
    hash: Buffer;
    pack: string | null;
    packSize: number | null;
    offset: number;
    storedLen: number;
    rawLen: number;
    codec: number;
  };
  const locs = ids.map((id) => locStmt.get(id) as Loc);
  locs.sort((a, b) => (a.pack ?? '').localeCompare(b.pack ?? '') || a.offset - b.offset);
  const packSizes = new Map<string, number>();
  const damaged: DamagedChunk[] = [];
  let done = 0;
  let bytesChecked = 0;
  const results = orderedMap(locs, 4, async (loc): Promise<{ loc: Loc; error?: string }> => {
    if (!loc.pack) return { loc, error: 'its pack is not in the index' };
    let size = packSizes.get(loc.pack);
    if (size === undefined) {
      try {
        size = fs.statSync(packPath(repo.dir, loc.pack)).size;
      } catch {
        size = -1;
      }
      packSizes.set(loc.pack, size);
    }
    if (size < 0) return { loc, error: `pack ${loc.pack} is missing` };
    if (loc.offset + loc.storedLen > size) return { loc, error: `pack ${loc.pack} is truncated` };
    try {
      const stored = await repo.packs.read(loc.pack, loc.offset, loc.storedLen);
      decodeChunk(stored, loc.codec, loc.rawLen, loc.hash);
      bytesChecked += loc.storedLen;
      return { loc };
    } catch (e) {
      return { loc, error: (e as Error).message };
    }
  });
  for await (const r of results) {
    done++;
    o.onProgress?.(done, locs.length);
    if (r.error)
      damaged.push({
        chunkId: r.loc.id,
        hash: r.loc.hash.toString('hex'),
        error: r.error,
        uses: chunkUses(repo, r.loc.id),
      });
  }
  return { checkpoints: sel.length, chunksChecked: locs.length, bytesChecked, problems, damaged };
}

/** Every complete checkpoint and disk range that reads a chunk. */
export function chunkUses(repo: Repository, chunkId: number): ChunkUse[] {
  return repo.db
    .prepare(
      `SELECT v.name AS vm, c.name AS checkpoint, d.name AS disk, e.offset AS offset, e.length AS length
         FROM extents e JOIN disk_pages dp ON dp.page_id = e.page_id JOIN disks d ON d.id = dp.disk_id
         JOIN checkpoints c ON c.id = d.checkpoint_id JOIN vms v ON v.id = c.vm_id
        WHERE e.chunk_id = ? AND c.state = 'complete' ORDER BY v.name, c.id, d.name, e.offset`,
    )
    .all(chunkId) as ChunkUse[];
}
