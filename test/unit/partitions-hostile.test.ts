/**
 * Hostile partition tables (issue 11 §6): entries beyond the disk, overlapping entries, absurd
 * entry counts, EBR chains that never end. The parser gives a table whose partitions all lie inside
 * the disk plus a warning for each problem, reads a bounded number of bytes, and never throws.
 * fast-check properties: well-formed MBR and GPT tables (made here, CRCs included) parse back to
 * what was written; arbitrary sectors never produce a partition outside the disk.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import fc from 'fast-check';
import { crc32 } from '../../src/util/crc32';
import { readPartitionTable, type PartitionTable, type ReadAt } from '../../src/util/partitions';

const S = 512;

/** A ReadAt over an in-memory disk that counts the bytes it was asked for. */
function counted(disk: Buffer): { readAt: ReadAt; bytes: () => number } {
  let n = 0;
  return {
    readAt: (offset, length) => {
      n += length;
      return Promise.resolve(disk.subarray(offset, offset + length));
    },
    bytes: () => n,
  };
}

interface MbrPart {
  type: number;
  start: number; // LBA
  sectors: number;
  boot?: boolean;
}

function writeMbrEntries(sec: Buffer, at: number, parts: MbrPart[]): void {
  parts.forEach((p, i) => {
    const o = at + 446 + i * 16;
    sec[o] = p.boot ? 0x80 : 0;
    sec[o + 4] = p.type;
    sec.writeUInt32LE(p.start, o + 8);
    sec.writeUInt32LE(p.sectors, o + 12);
  });
  sec[at + 510] = 0x55;
  sec[at + 511] = 0xaa;
}

function mbrDisk(sectors: number, parts: MbrPart[]): Buffer {
  const d = Buffer.alloc(sectors * S);
  d.writeUInt32LE(0x12345678, 440);
  writeMbrEntries(d, 0, parts);
  return d;
}

interface GptPart {
  first: number;
  last: number;
}

function guid(seed: number): Buffer {
  const b = Buffer.alloc(16);
  for (let i = 0; i < 16; i++) b[i] = (seed * 31 + i * 17 + 1) & 0xff;
  return b;
}

/** A disk with a protective MBR and primary + backup GPT (valid CRCs). */
function gptDisk(
  sectors: number,
  parts: GptPart[],
  o: { numEntries?: number; entrySize?: number } = {},
): Buffer {
  const d = Buffer.alloc(sectors * S);
  writeMbrEntries(d, 0, [{ type: 0xee, start: 1, sectors: Math.min(sectors - 1, 0xffffffff) }]);
  const numEntries = o.numEntries ?? 128;
  const entrySize = o.entrySize ?? 128;
  const arrBytes = Math.min(numEntries * entrySize, 32 * S);
  const arr = Buffer.alloc(arrBytes);
  parts.forEach((p, i) => {
    const off = i * entrySize;
    guid(0xaf).copy(arr, off); // type
    guid(i + 2).copy(arr, off + 16);
    arr.writeBigUInt64LE(BigInt(p.first), off + 32);
    arr.writeBigUInt64LE(BigInt(p.last), off + 40);
  });
  const entrySectors = 32;
  const firstUsable = 2 + entrySectors;
  const lastUsable = sectors - 2 - entrySectors;
  const header = (myLba: number, altLba: number, entriesLba: number): Buffer => {
    const h = Buffer.alloc(S);
    h.write('EFI PART', 0, 'latin1');
    h.writeUInt32LE(0x00010000, 8);
    h.writeUInt32LE(92, 12);
    h.writeBigUInt64LE(BigInt(myLba), 24);
    h.writeBigUInt64LE(BigInt(altLba), 32);
    h.writeBigUInt64LE(BigInt(firstUsable), 40);
    h.writeBigUInt64LE(BigInt(lastUsable), 48);
    guid(99).copy(h, 56);
    h.writeBigUInt64LE(BigInt(entriesLba), 72);
    h.writeUInt32LE(numEntries, 80);
    h.writeUInt32LE(entrySize, 84);
    h.writeUInt32LE(crc32(arr), 88);
    h.writeUInt32LE(crc32(h.subarray(0, 92)), 16);
    return h;
  };
  header(1, sectors - 1, 2).copy(d, S);
  arr.copy(d, 2 * S);
  arr.copy(d, (sectors - 1 - entrySectors) * S);
  header(sectors - 1, 1, sectors - 1 - entrySectors).copy(d, (sectors - 1) * S);
  return d;
}

function inside(t: PartitionTable, diskSize: number): void {
  for (const p of t.partitions) {
    assert.ok(
      Number.isSafeInteger(p.start) && Number.isSafeInteger(p.size),
      `partition ${p.index}: ${p.start}+${p.size}`,
    );
    assert.ok(
      p.start >= 0 && p.size > 0 && p.start + p.size <= diskSize,
      `partition ${p.index} (${p.start}+${p.size}) outside a disk of ${diskSize}`,
    );
  }
  const idx = t.partitions.map((p) => p.index);
  assert.equal(new Set(idx).size, idx.length, 'duplicate partition numbers');
}

describe('hostile partition tables', () => {
  it('an MBR entry beyond the disk is dropped and one running past the end is cut, with warnings', async () => {
    const sectors = 2048;
    const d = mbrDisk(sectors, [
      { type: 0x83, start: 2048, sectors: 100 }, // starts at the end
      { type: 0x83, start: 100, sectors: 0xffffff00 }, // 2 TiB on a 1 MiB disk
      { type: 0x83, start: 10, sectors: 80 },
    ]);
    const t = await readPartitionTable(counted(d).readAt, d.length);
    assert.equal(t.scheme, 'mbr');
    inside(t, d.length);
    assert.deepEqual(
      t.partitions.map((p) => [p.index, p.start / S, p.size / S]),
      [
        [2, 100, sectors - 100],
        [3, 10, 80],
      ],
    );
    assert.ok(
      t.warnings?.some((w) => /partition 1 starts .* beyond the end of the disk/.test(w)),
      String(t.warnings),
    );
    assert.ok(t.warnings?.some((w) => /partition 2 ends .* cut at the end/.test(w)));
  });

  it('overlapping partitions are reported', async () => {
    const d = mbrDisk(4096, [
      { type: 0x83, start: 2048, sectors: 1000 },
      { type: 0x83, start: 2500, sectors: 1000 },
    ]);
    const t = await readPartitionTable(counted(d).readAt, d.length);
    assert.equal(t.partitions.length, 2);
    assert.ok(
      t.warnings?.some((w) => /partitions 1 and 2 overlap/.test(w)),
      String(t.warnings),
    );
    const g = gptDisk(4096, [
      { first: 100, last: 1000 },
      { first: 900, last: 2000 },
    ]);
    const tg = await readPartitionTable(counted(g).readAt, g.length);
    assert.equal(tg.scheme, 'gpt');
    assert.ok(
      tg.warnings?.some((w) => /partitions 1 and 2 overlap/.test(w)),
      String(tg.warnings),
    );
  });

  it('logical partitions outside their extended partition and beyond the disk are reported and kept inside the disk', async () => {
    const sectors = 4096;
    const d = mbrDisk(sectors, [{ type: 0x05, start: 1000, sectors: 1000 }]);
    // EBR at 1000: a logical partition that runs far past the extended partition and the disk.
    writeMbrEntries(d, 1000 * S, [{ type: 0x83, start: 1, sectors: 1_000_000 }]);
    const t = await readPartitionTable(counted(d).readAt, d.length);
    inside(t, d.length);
    assert.ok(
      t.warnings?.some((w) => /logical partition 5 lies outside/.test(w)),
      String(t.warnings),
    );
  });

  it('an absurd GPT entry count is refused without reading it', async () => {
    const g = gptDisk(4096, [{ first: 100, last: 200 }], { numEntries: 0xffffffff });
    const c = counted(g);
    const t = await readPartitionTable(c.readAt, g.length);
    assert.equal(t.scheme, 'none');
    assert.ok(
      t.warnings?.some((w) => /too large/.test(w)),
      String(t.warnings),
    );
    assert.ok(c.bytes() < 64 * 1024, `read ${c.bytes()} bytes`);
  });

  it('an EBR chain of thousands of links stops at the logical partition limit', async () => {
    const sectors = 20000;
    const d = mbrDisk(sectors, [{ type: 0x05, start: 10, sectors: sectors - 10 }]);
    for (let i = 0; i < 5000 && 10 + 3 * i + 3 < sectors; i++) {
      const ebr = 10 + 3 * i;
      writeMbrEntries(d, ebr * S, [
        { type: 0x83, start: 1, sectors: 2 },
        { type: 0x05, start: 3 * (i + 1), sectors: 3 },
      ]);
    }
    const c = counted(d);
    const t = await readPartitionTable(c.readAt, d.length);
    inside(t, d.length);
    assert.ok(t.partitions.length <= 1 + 256);
    assert.ok(
      t.warnings?.some((w) => /more than 256 logical partitions/.test(w)),
      String(t.warnings),
    );
  });
});

describe('partition parser properties (fast-check)', () => {
  it('well-formed MBR tables parse back to what was written', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            len: fc.integer({ min: 1, max: 500 }),
            gap: fc.integer({ min: 0, max: 50 }),
            type: fc.constantFrom(0x83, 0x07, 0x0c, 0x82),
            boot: fc.boolean(),
          }),
          { minLength: 1, maxLength: 4 },
        ),
        async (spec) => {
          let at = 1;
          const parts: MbrPart[] = spec.map((x) => {
            const p = { type: x.type, start: at + x.gap, sectors: x.len, boot: x.boot };
            at = p.start + p.sectors;
            return p;
          });
          const d = mbrDisk(at + 10, parts);
          const t = await readPartitionTable(counted(d).readAt, d.length);
          assert.equal(t.scheme, 'mbr');
          assert.equal(t.warnings, undefined);
          assert.deepEqual(
            t.partitions.map((p) => [p.index, p.start, p.size, p.mbrType, p.bootable === true]),
            parts.map((p, i) => [i + 1, p.start * S, p.sectors * S, p.type, p.boot === true]),
          );
        },
      ),
      { numRuns: 100 },
    );
  });

  it('well-formed GPT tables parse back to what was written', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ len: fc.integer({ min: 1, max: 300 }), gap: fc.integer({ min: 0, max: 30 }) }), {
          minLength: 1,
          maxLength: 20,
        }),
        async (spec) => {
          let at = 34;
          const parts: GptPart[] = spec.map((x) => {
            const p = { first: at + x.gap, last: at + x.gap + x.len - 1 };
            at = p.last + 1;
            return p;
          });
          const d = gptDisk(at + 40, parts);
          const t = await readPartitionTable(counted(d).readAt, d.length);
          assert.equal(t.scheme, 'gpt');
          assert.equal(t.warnings, undefined, String(t.warnings));
          assert.deepEqual(
            t.partitions.map((p) => [p.index, p.start, p.size]),
            parts.map((p, i) => [i + 1, p.first * S, (p.last - p.first + 1) * S]),
          );
        },
      ),
      { numRuns: 100 },
    );
  });

  it('arbitrary MBR entries and EBR chains never give a partition outside the disk, and never throw', async () => {
    const entry = fc.record({
      type: fc.constantFrom(0x00, 0x05, 0x0f, 0x85, 0x83, 0x07, 0xee),
      start: fc.oneof(fc.integer({ min: 0, max: 3000 }), fc.constant(0xffffffff), fc.nat()),
      sectors: fc.oneof(fc.integer({ min: 0, max: 3000 }), fc.constant(0xffffffff), fc.nat()),
      boot: fc.boolean(),
    });
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 2048 }),
        fc.array(entry, { minLength: 4, maxLength: 4 }),
        fc.array(
          fc.tuple(fc.integer({ min: 0, max: 2047 }), fc.array(entry, { minLength: 4, maxLength: 4 })),
          { maxLength: 6 },
        ),
        async (sectors, primaries, ebrs) => {
          const d = mbrDisk(sectors, primaries);
          for (const [lba, es] of ebrs) if (lba > 0 && lba < sectors) writeMbrEntries(d, lba * S, es);
          const c = counted(d);
          const t = await readPartitionTable(c.readAt, d.length);
          inside(t, d.length);
          assert.ok(c.bytes() <= 600 * S, `read ${c.bytes()} bytes`);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('random bytes in the first sectors never give a partition outside the disk', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ minLength: 3 * S, maxLength: 3 * S }),
        fc.integer({ min: 3, max: 64 }),
        fc.boolean(),
        async (head, sectors, sig) => {
          const d = Buffer.alloc(sectors * S);
          Buffer.from(head).copy(d, 0, 0, Math.min(head.length, d.length));
          if (sig) {
            d[510] = 0x55;
            d[511] = 0xaa;
          }
          const t = await readPartitionTable(counted(d).readAt, d.length);
          inside(t, d.length);
        },
      ),
      { numRuns: 300 },
    );
  });
});
