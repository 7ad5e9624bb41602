/**
 * verify's block-map checks (issue 11 §3): damage in the index that a read would otherwise serve as
 * zeros.
 *
 *  - SQLite `PRAGMA integrity_check` of the whole index.
 *  - Every selected checkpoint-disk's block map (page table + extents, with chunk hashes) against
 *      (a) its digest list (`disk_maps`, format 2: `src/index/mapsum.ts`), page by page, and
 *      (b) its manifest, which records the same map by chunk hash: pages that differ, disks that
 *          are missing on either side, a different virtual size.
 *  Each disagreement is reported once with every checkpoint it affects (a page shared by several
 *  checkpoints names them all).
 *
 * Pure reads; no lock. Cost: one pass over the selected block maps plus one manifest decode per
 * checkpoint (the extents pass of verify reads the same rows).
 */
import type { Repository } from './repository';
import type { CheckpointRow } from '../index/catalog';
import { DiskSums, pageMismatch, sumsFromExtents, type PageSum, type SumExtent } from '../index/mapsum';
import { indexFormat } from '../index/migrate';
import { readManifest } from './manifest';

/** Lines from `PRAGMA integrity_check` other than "ok". */
export function integrityProblems(repo: Repository): string[] {
  const rows = repo.db.pragma('integrity_check') as { integrity_check: string }[];
  return rows
    .map((r) => r.integrity_check)
    .filter((s) => s !== 'ok')
    .map((s) => `SQLite integrity_check: ${s} (affects the whole index)`);
}

interface IndexPage {
  pageNo: number;
  pageId: number | null;
  rows: (SumExtent & { chunkId: number | null })[];
}

/** The pages of a disk as the index holds them (page-table rows, plus listed pages without a row). */
function indexPages(repo: Repository, diskId: number): Map<number, IndexPage> {
  const out = new Map<number, IndexPage>();
  const pt = repo.db.prepare('SELECT page_no AS pageNo, page_id AS pageId FROM disk_pages WHERE disk_id = ?');
  for (const r of pt.all(diskId) as { pageNo: number; pageId: number }[]) {
    out.set(r.pageNo, { pageNo: r.pageNo, pageId: r.pageId, rows: [] });
  }
  const ext = repo.db.prepare(
    `SELECT dp.page_no AS pageNo, e.offset AS offset, e.length AS length, e.chunk_off AS chunkOff,
            e.chunk_id AS chunkId, c.hash AS hash
       FROM disk_pages dp JOIN extents e ON e.page_id = dp.page_id LEFT JOIN chunks c ON c.id = e.chunk_id
      WHERE dp.disk_id = ? ORDER BY dp.page_no, e.offset`,
  );
  for (const r of ext.iterate(diskId) as IterableIterator<
    SumExtent & { pageNo: number; chunkId: number | null }
  >) {
    out.get(r.pageNo)!.rows.push({
      offset: r.offset,
      length: r.length,
      chunkOff: r.chunkOff,
      chunkId: r.chunkId,
      hash: r.chunkId === null ? null : r.hash,
    });
  }
  return out;
}

/** Check the block maps of the selected checkpoints; returns one line per disagreement. */
export function blockMapProblems(repo: Repository, sel: { vm: string; cp: CheckpointRow }[]): string[] {
  const db = repo.db;
  const span = repo.config.pageSpan;
  const v2 = indexFormat(db) >= 2;
  // key -> what is wrong, and who it affects (in order)
  const found = new Map<string, { what: string; who: string[] }>();
  const note = (key: string, what: string, who: string): void => {
    const f = found.get(key);
    if (f) {
      if (!f.who.includes(who)) f.who.push(who);
    } else found.set(key, { what, who: [who] });
  };
  const range = (p: number, size: number): string => `bytes ${p * span}-${Math.min((p + 1) * span, size)}`;
  for (const { vm, cp } of sel) {
    const cpName = `${vm}@${cp.name}`;
    const disks = db
      .prepare('SELECT id, name, virtual_size FROM disks WHERE checkpoint_id = ? ORDER BY name')
      .all(cp.id) as { id: number; name: string; virtual_size: number }[];
    let manifest: ReturnType<typeof readManifest> | undefined;
    const uid = (cp as CheckpointRow & { uid?: string }).uid;
    if (uid) {
      try {
        manifest = readManifest(repo.dir, uid);
      } catch {
        manifest = undefined; // a missing or unreadable manifest is reported by verify itself
      }
    }
    for (const d of disks) {
      const who = `${cpName} disk ${d.name}`;
      const pages = indexPages(repo, d.id);
      // (a) digests
      if (v2) {
        let sums: DiskSums | undefined;
        try {
          sums = DiskSums.load(db, d, span, `disk ${d.name}`);
        } catch (e) {
          note(`disk-sums:${d.id}`, `${(e as Error).message}`, who);
        }
        if (sums) {
          const nos = new Set([...pages.keys(), ...sums.pageNos()]);
          for (const p of [...nos].sort((a, b) => a - b)) {
            const pg = pages.get(p);
            const why = pageMismatch(sums.find(p), pg?.rows ?? []);
            if (why === undefined) continue;
            const detail = pg === undefined ? 'its page-table row is missing' : why;
            // A page shared by several checkpoints is one problem for all of them.
            const key = pg?.pageId != null ? `page:${pg.pageId}:${detail}` : `nopage:${d.id}:${p}`;
            note(key, `block map ${range(p, d.virtual_size)} does not match its digest: ${detail}`, who);
          }
        }
      }
      // (b) manifest
      if (!manifest) continue;
      const md = manifest.disks.find((x) => x.name === d.name);
      if (!md) {
        note(`nomd:${d.id}`, `disk ${d.name} is in the index but not in the checkpoint's manifest`, who);
        continue;
      }
      if (md.virtualSize !== d.virtual_size) {
        note(
          `size:${d.id}`,
          `virtual size ${d.virtual_size} in the index, ${md.virtualSize} in the manifest`,
          who,
        );
      }
      const want = new Map<number, PageSum>(
        sumsFromExtents(manifestExtents(md.extents, manifest.hashes), span).map((s) => [s.pageNo, s]),
      );
      const nos = new Set([...pages.keys(), ...want.keys()]);
      for (const p of [...nos].sort((a, b) => a - b)) {
        const pg = pages.get(p);
        const why = pageMismatch(want.get(p), pg?.rows ?? []);
        if (why === undefined) continue;
        const detail = pg === undefined ? 'the page-table row is missing' : why;
        note(
          pg?.pageId != null ? `mf:${pg.pageId}:${detail}` : `mf:${d.id}:${p}`,
          `block map ${range(p, d.virtual_size)} disagrees with the manifest: ${detail}`,
          who,
        );
      }
    }
    if (manifest) {
      for (const md of manifest.disks) {
        if (!disks.some((d) => d.name === md.name)) {
          note(
            `noidx:${cp.id}:${md.name}`,
            `disk ${md.name} of the manifest is missing from the index`,
            cpName,
          );
        }
      }
    }
  }
  return [...found.values()].map((f) => `${f.what}; affects ${f.who.join(', ')}`);
}

function* manifestExtents(x: number[], hashes: string[]): Generator<SumExtent> {
  let prevEnd = 0;
  for (let k = 0; k + 4 < x.length; k += 5) {
    const offset = prevEnd + x[k]!;
    const length = x[k + 1]!;
    const h = x[k + 2]!;
    const hex = h < 0 ? undefined : hashes[h];
    yield {
      offset,
      length,
      chunkOff: x[k + 3]!,
      hash: h < 0 ? null : Buffer.from(hex ?? '00', 'hex'),
    };
    prevEnd = offset + length;
  }
}
