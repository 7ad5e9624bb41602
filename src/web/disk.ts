/**
 * Disk transfer of `bkfs web` (like oVirt imageio): a checkpoint's raw disk as a byte stream with
 * `Range` support, and its data/zero runs from the block map so clients skip holes.
 *
 * Every byte comes from `CheckpointReader` (hash-checked chunks); a damaged range fails the stream
 * (the connection is cut: a client never receives other bytes than the backed-up ones).
 */
import { Readable } from 'node:stream';
import { BkfsError } from '../errors';
import type { CheckpointReader, PageExtent } from '../chain/reader';

export interface ByteRange {
  start: number;
  /** Exclusive. */
  end: number;
}

/**
 * A `Range` header against a resource of `size` bytes: undefined = no (usable) range, serve it all
 * (several ranges are answered with the whole resource, which RFC 9110 allows); 'unsatisfiable'
 * for 416.
 */
export function parseRange(
  header: string | undefined,
  size: number,
): ByteRange | 'unsatisfiable' | undefined {
  if (header === undefined) return undefined;
  const m = /^bytes=\s*(\d*)\s*-\s*(\d*)\s*$/.exec(header.trim());
  if (!m) return undefined;
  const [, a, b] = m as unknown as [string, string, string];
  if (a === '' && b === '') return undefined;
  let start: number;
  let end: number;
  if (a === '') {
    const n = Number(b);
    if (n === 0) return 'unsatisfiable';
    start = Math.max(0, size - n);
    end = size;
  } else {
    start = Number(a);
    end = b === '' ? size : Math.min(size, Number(b) + 1);
    if (b !== '' && Number(b) < start) return undefined; // invalid: ignored
  }
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start >= size) return 'unsatisfiable';
  return { start, end };
}

export interface Run {
  start: number;
  length: number;
  zero: boolean;
}

/**
 * Data and zero runs covering [0, size): extents with a chunk are data, the rest (zero extents,
 * unmapped gaps) zero; neighbours of the same kind merged.
 */
export function mergeRuns(
  extents: Iterable<Pick<PageExtent, 'offset' | 'length' | 'loc'>>,
  size: number,
): Run[] {
  const out: Run[] = [];
  const push = (start: number, length: number, zero: boolean) => {
    if (length <= 0) return;
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.start + last.length === start) last.length += length;
    else out.push({ start, length, zero });
  };
  let pos = 0;
  for (const e of extents) {
    const start = Math.max(e.offset, pos);
    const end = Math.min(e.offset + e.length, size);
    if (end <= start) continue;
    push(pos, start - pos, true);
    push(start, end - start, e.loc === null);
    pos = end;
  }
  push(pos, size - pos, true);
  return out;
}

/** Bytes [range.start, range.end) of a disk as a stream (1 MiB reads, backpressure respected). */
export function diskStream(
  reader: CheckpointReader,
  disk: string,
  range: ByteRange,
  onEnd?: () => void,
): Readable {
  let pos = range.start;
  const step = 1 << 20;
  let ended = false;
  const finish = () => {
    if (!ended) {
      ended = true;
      onEnd?.();
    }
  };
  const stream = new Readable({
    highWaterMark: 4 << 20,
    read() {
      if (pos >= range.end) {
        this.push(null);
        return;
      }
      const len = Math.min(step, range.end - pos);
      const at = pos;
      pos += len;
      reader.readAt(disk, at, len).then(
        (buf) => {
          if (buf.length !== len) {
            this.destroy(new BkfsError('DATA_DAMAGED', `short read of ${disk} at ${at}`));
            return;
          }
          this.push(buf);
        },
        (e: unknown) => this.destroy(e as Error),
      );
    },
  });
  stream.on('close', finish);
  return stream;
}
