/**
 * Restore planning: pure functions from disk-map extents to the writes a restore performs.
 *
 * - `diffExtents(a, b, start, end)`: where two maps of the same disk differ within a range, and
 *   what `b` holds there. Two points hold the same bytes when both read as zeros (a zero extent or
 *   no extent) or both come from the same chunk at the same chunk offset (chunks are
 *   content-addressed, so equal ids are equal bytes). Linear in the extents of the range.
 * - `planRuns(extents, opts)`: cuts a sorted extent stream into write runs: data runs (contiguous
 *   pieces of chunks, at most `maxRun` bytes, written with one positioned write) and zero runs
 *   (zero extents and, for targets whose content is unknown, the unmapped gaps).
 *
 * No I/O, no database: the engine feeds these from `CheckpointReader` pages. Memory: `diffExtents`
 * returns one page's worth of extents; `planRuns` is a generator holding one pending run.
 */

/** A map extent: `length` bytes at disk `offset` are bytes `[chunkOff, chunkOff+length)` of `loc`. */
export interface Ext<L extends { id: number }> {
  offset: number;
  length: number;
  chunkOff: number;
  /** Where the chunk is; null = the range reads as zeros. */
  loc: L | null;
}

function sameBytes<L extends { id: number }>(a: Ext<L> | undefined, b: Ext<L> | undefined): boolean {
  const az = !a || a.loc === null;
  const bz = !b || b.loc === null;
  if (az || bz) return az && bz;
  return a.loc!.id === b.loc!.id && a.chunkOff - a.offset === b.chunkOff - b.offset;
}

function pushMerged<L extends { id: number }>(out: Ext<L>[], e: Ext<L>): void {
  const last = out[out.length - 1];
  if (last && last.offset + last.length === e.offset) {
    if (last.loc === null && e.loc === null) {
      last.length += e.length;
      return;
    }
    if (last.loc && e.loc && last.loc.id === e.loc.id && last.chunkOff + last.length === e.chunkOff) {
      last.length += e.length;
      return;
    }
  }
  out.push(e);
}

/**
 * The parts of `[start, end)` where map `b` differs from map `a`, as `b`'s content: data extents of
 * `b` (clipped, chunk offsets adjusted) and zero extents (loc null) where `b` reads as zeros. Both
 * inputs sorted by offset and non-overlapping (a map page satisfies this). Adjacent pieces of the
 * same chunk, and adjacent zero pieces, are merged.
 */
export function diffExtents<L extends { id: number }>(
  a: readonly Ext<L>[],
  b: readonly Ext<L>[],
  start: number,
  end: number,
): Ext<L>[] {
  const out: Ext<L>[] = [];
  let i = 0;
  let j = 0;
  let pos = start;
  while (pos < end) {
    while (i < a.length && a[i]!.offset + a[i]!.length <= pos) i++;
    while (j < b.length && b[j]!.offset + b[j]!.length <= pos) j++;
    const ea = a[i];
    const eb = b[j];
    const inA = ea && ea.offset <= pos ? ea : undefined;
    const inB = eb && eb.offset <= pos ? eb : undefined;
    let next = end;
    if (ea) next = Math.min(next, inA ? ea.offset + ea.length : ea.offset);
    if (eb) next = Math.min(next, inB ? eb.offset + eb.length : eb.offset);
    if (!sameBytes(inA, inB)) {
      if (inB && inB.loc) {
        pushMerged(out, {
          offset: pos,
          length: next - pos,
          chunkOff: inB.chunkOff + (pos - inB.offset),
          loc: inB.loc,
        });
      } else {
        pushMerged(out, { offset: pos, length: next - pos, chunkOff: 0, loc: null });
      }
    }
    pos = next;
  }
  return out;
}

/** A piece of a chunk to write: bytes `[chunkOff, chunkOff+length)` of `loc`. */
export interface Piece<L> {
  loc: L;
  chunkOff: number;
  length: number;
}

export type Run<L> =
  | { kind: 'data'; offset: number; length: number; pieces: Piece<L>[] }
  | { kind: 'zero'; offset: number; length: number };

export interface RunOptions {
  /** Disk size: gaps are filled up to here, and nothing past it is written. */
  size: number;
  /** Largest data run in bytes (a single piece may exceed it). */
  maxRun: number;
  /** Emit zero runs for zero extents (false: a fresh target already reads as zeros there). */
  zeros: boolean;
  /** Emit zero runs for ranges no extent covers (true when the target's content is unknown). */
  fillGaps: boolean;
}

/**
 * Turn extents (sorted, non-overlapping) into write runs in offset order. Adjacent data pieces are
 * grouped into runs of at most `maxRun` bytes; adjacent zero ranges are merged into one zero run.
 */
export function* planRuns<L extends { id: number }>(
  extents: Iterable<Ext<L>>,
  o: RunOptions,
): Generator<Run<L>> {
  let pending: Run<L> | null = null;
  let pos = 0;
  const zero = function* (offset: number, length: number): Generator<Run<L>> {
    if (length <= 0) return;
    if (pending && pending.kind === 'zero' && pending.offset + pending.length === offset) {
      pending.length += length;
      return;
    }
    if (pending) yield pending;
    pending = { kind: 'zero', offset, length };
  };
  for (const e0 of extents) {
    const s = Math.max(e0.offset, pos);
    const t = Math.min(e0.offset + e0.length, o.size);
    if (t <= s) continue;
    if (o.fillGaps && s > pos) yield* zero(pos, s - pos);
    pos = t;
    if (e0.loc === null) {
      if (o.zeros) yield* zero(s, t - s);
      continue;
    }
    const piece: Piece<L> = { loc: e0.loc, chunkOff: e0.chunkOff + (s - e0.offset), length: t - s };
    const p = pending as Run<L> | null;
    if (p && p.kind === 'data' && p.offset + p.length === s && p.length + piece.length <= o.maxRun) {
      p.pieces.push(piece);
      p.length += piece.length;
    } else {
      if (p) yield p;
      pending = { kind: 'data', offset: s, length: t - s, pieces: [piece] };
    }
  }
  if (o.fillGaps && pos < o.size) yield* zero(pos, o.size - pos);
  if (pending) yield pending;
}

/** Total bytes of the data and zero runs of a run list (for reports and tests). */
export function runTotals<L>(runs: Iterable<Run<L>>): { data: number; zero: number; runs: number } {
  let data = 0;
  let zero = 0;
  let n = 0;
  for (const r of runs) {
    n++;
    if (r.kind === 'data') data += r.length;
    else zero += r.length;
  }
  return { data, zero, runs: n };
}

/** Pick up to `n` items spread evenly over `items` (first, last and in between). */
export function spread<T>(items: readonly T[], n: number): T[] {
  if (items.length <= n) return items.slice();
  if (n <= 0) return [];
  if (n === 1) return [items[Math.floor(items.length / 2)]!];
  const out: T[] = [];
  for (let k = 0; k < n; k++) out.push(items[Math.round((k * (items.length - 1)) / (n - 1))]!);
  return out;
}
