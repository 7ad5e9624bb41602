/**
 * `verify --compare-source`: the disks of checkpoints compared byte for byte with their source
 * images (an image file through `qemu-nbd --read-only`, or an NBD URI). Apart from `verify.ts`
 * because it reads host files (the sources), not the repository, which verify reaches only
 * through its store.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Repository } from './repository';
import { getVm, type CheckpointRow } from '../index/catalog';
import { orderedMap } from '../util/pipeline';
import { CheckpointReader } from '../chain/reader';
import { NbdClient } from '../nbd/client';
import { QemuNbd, imageInfo } from '../backup/qemu';

// ---------------------------------------------------------------------------------------------
// Comparison with the source images

export interface SourceDiff {
  vm: string;
  checkpoint: string;
  disk: string;
  source: string | null;
  /** 'same', 'differs', 'gone' (the source image no longer exists) or 'skipped' (none recorded, unreachable). */
  status: 'same' | 'differs' | 'gone' | 'skipped';
  reason?: string;
  bytesCompared: number;
  bytesDiffering: number;
  /** Differing byte ranges (runs of equal bytes shorter than 4 KiB inside a run are included). */
  ranges: { offset: number; length: number }[];
}

const NBD_URI_RE = /^nbds?(\+unix)?:\/\//;
const BLOCK = 4 << 20;
const SEG = 4096;

/** Differing ranges of `a` and `b` (same length) at `base`, appended to `out` (merging). */
function diffRanges(a: Buffer, b: Buffer, base: number, out: { offset: number; length: number }[]): number {
  let n = 0;
  for (let s = 0; s < a.length; s += SEG) {
    const e = Math.min(a.length, s + SEG);
    if (a.subarray(s, e).equals(b.subarray(s, e))) continue;
    let first = s;
    while (a[first] === b[first]) first++;
    let last = e - 1;
    while (a[last] === b[last]) last--;
    const start = base + first;
    const end = base + last + 1;
    const prev = out[out.length - 1];
    if (prev && start - (prev.offset + prev.length) < SEG) {
      n += end - (prev.offset + prev.length);
      prev.length = end - prev.offset;
    } else {
      out.push({ offset: start, length: end - start });
      n += end - start;
    }
  }
  return n;
}

/**
 * Compare every disk of the given checkpoints with its source as it is now (an image file through
 * `qemu-nbd --read-only`, or an NBD URI), reading both sides in 4 MiB blocks. Meaningful for a
 * checkpoint whose source has not changed since (the latest backup of a stopped VM).
 */
export async function compareWithSources(
  repo: Repository,
  sel: { vm: string; cp: CheckpointRow }[],
  onProgress?: (done: number, total: number) => void,
): Promise<SourceDiff[]> {
  const out: SourceDiff[] = [];
  for (const { vm, cp } of sel) {
    const reader = new CheckpointReader(repo, getVm(repo.db, vm), cp, { cacheBytes: 32 << 20 });
    for (const d of reader.disks) {
      const r: SourceDiff = {
        vm,
        checkpoint: cp.name,
        disk: d.name,
        source: d.source,
        status: 'same',
        bytesCompared: 0,
        bytesDiffering: 0,
        ranges: [],
      };
      out.push(r);
      const src = d.source;
      if (!src) {
        Object.assign(r, { status: 'skipped', reason: 'no source recorded' });
        continue;
      }
      let client: NbdClient;
      let srv: QemuNbd | undefined;
      if (NBD_URI_RE.test(src)) {
        try {
          client = await NbdClient.connect(src);
        } catch (e) {
          Object.assign(r, { status: 'skipped', reason: `cannot connect: ${(e as Error).message}` });
          continue;
        }
      } else {
        if (!fs.existsSync(src)) {
          Object.assign(r, {
            status: 'gone',
            reason: path.isAbsolute(src)
              ? 'the source image no longer exists'
              : `the source image no longer exists here (an older bkfs recorded the relative path '${src}')`,
          });
          continue;
        }
        // The format recorded at backup time (declared or safely probed); never a new probe.
        const declared = d.format === 'raw' || d.format === 'qcow2' ? d.format : undefined;
        const info = await imageInfo(src, declared);
        srv = await QemuNbd.start({ image: src, format: info.format, readOnly: true });
        try {
          client = await NbdClient.connect({ socket: srv.socket });
        } catch (e) {
          await srv.stop();
          throw e;
        }
      }
      try {
        const size = d.virtual_size;
        if (client.size !== size) {
          r.status = 'differs';
          r.reason = `the source is ${client.size} bytes, the checkpoint ${size}`;
        }
        const common = Math.min(size, client.size);
        const blocks: number[] = [];
        for (let off = 0; off < common; off += BLOCK) blocks.push(off);
        const results = orderedMap(blocks, 4, async (off) => {
          const len = Math.min(BLOCK, common - off);
          const [a, b] = await Promise.all([reader.readAt(d.name, off, len), client.read(off, len)]);
          return { off, a, b };
        });
        for await (const { off, a, b } of results) {
          r.bytesCompared += a.length;
          if (!a.equals(b)) r.bytesDiffering += diffRanges(a, b, off, r.ranges);
          onProgress?.(r.bytesCompared, common);
        }
        if (r.ranges.length > 0) r.status = 'differs';
      } finally {
        await client.close().catch(() => undefined);
        if (srv) await srv.stop();
      }
    }
  }
  return out;
}
