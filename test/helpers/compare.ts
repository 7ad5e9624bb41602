/** Byte-for-byte comparison of a checkpoint's disk (through the index's read path) with a file. */
import * as fs from 'node:fs';
import * as assert from 'node:assert/strict';
import { Repository } from '../../src/repo/repository';
import { CheckpointReader } from '../../src/chain/reader';

/** Deterministic PRNG for random read offsets. */
export function lcg(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

/**
 * Assert that disk `disk` of checkpoint `ref` reads exactly like `rawFile`: sequentially in 8 MiB
 * steps over the whole disk, then `randomReads` reads at random offsets and sizes (unaligned,
 * crossing chunk and page boundaries, and past the end of the disk).
 */
export async function assertCheckpointEquals(
  repoDir: string,
  ref: string,
  disk: string,
  rawFile: string,
  randomReads = 100,
): Promise<void> {
  const repo = Repository.open(repoDir);
  const fd = fs.openSync(rawFile, 'r');
  try {
    const reader = CheckpointReader.open(repo, ref, { cacheBytes: 32 << 20 });
    const size = fs.fstatSync(fd).size;
    assert.equal(reader.disk(disk).virtual_size, size, `${ref} ${disk}: virtual size`);
    const step = 8 << 20;
    const exp = Buffer.alloc(step);
    for (let off = 0; off < size; off += step) {
      const n = fs.readSync(fd, exp, 0, Math.min(step, size - off), off);
      const got = await reader.readAt(disk, off, n);
      if (!got.equals(exp.subarray(0, n))) {
        let i = 0;
        while (got[i] === exp[i]) i++;
        assert.fail(`${ref} ${disk}: first difference at byte ${off + i}`);
      }
    }
    const rnd = lcg(size ^ randomReads);
    for (let i = 0; i < randomReads; i++) {
      const off = Math.floor(rnd() * (size + 4096));
      const len = Math.floor(rnd() * 3 * 1024 * 1024) + 1;
      const want = Math.max(0, Math.min(len, size - off));
      const e = Buffer.alloc(want);
      if (want > 0) fs.readSync(fd, e, 0, want, off);
      const got = await reader.readAt(disk, off, len);
      assert.ok(got.equals(e), `${ref} ${disk}: random read ${off}+${len} differs`);
    }
  } finally {
    fs.closeSync(fd);
    repo.close();
  }
}
