/**
 * The one JSON convention of the CLI (`--json` on every command that reports a result; README
 * "JSON output"):
 *   - times are ISO 8601 strings in UTC with their zone (`2026-12-02T00:03:04.000Z`), never epoch
 *     numbers: core results carry `time`/`started`/`finished` as epoch ms and file entries
 *     `mtimeSec` + `mtimeNsec` (and atime); `printJson` turns them into `time`/`started`/
 *     `finished`/`mtime`/`atime` (ISO strings, millisecond precision);
 *   - sizes and counts are integers in bytes (names end in `Bytes`/`Size` or say what they count);
 *   - durations are integer milliseconds named `...Ms`;
 *   - keys are camelCase; absent values are null, not omitted, where the shape has them.
 * Output is one JSON document on stdout, pretty-printed.
 */
import { isoTime } from '../util/format';

/** Keys whose numbers are epoch milliseconds. */
const MS_TIME_KEYS = new Set(['time', 'started', 'finished']);

/** Apply the convention to a core result (pure: returns a new value). */
export function jsonValue(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(jsonValue);
  if (typeof v === 'bigint') return Number(v);
  if (v === null || typeof v !== 'object') return v;
  if (v instanceof Date) return v.toISOString();
  if (Buffer.isBuffer(v)) return v.toString('base64');
  const o = v as Record<string, unknown>;
  const res: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(o)) {
    const st = /^([a-z]+time)(Sec|Nsec)$/.exec(k); // stat times: mtimeSec + mtimeNsec -> mtime
    if (st && typeof x === 'number') {
      if (st[2] === 'Nsec') continue; // folded into the Sec key's time
      const ns = o[`${st[1]}Nsec`];
      res[st[1]!] = isoTime(x * 1000 + (typeof ns === 'number' ? Math.floor(ns / 1e6) : 0));
      continue;
    }
    if (MS_TIME_KEYS.has(k) && typeof x === 'number') {
      res[k] = isoTime(x);
      continue;
    }
    res[k] = jsonValue(x);
  }
  return res;
}

export function jsonText(v: unknown): string {
  return JSON.stringify(jsonValue(v), null, 2);
}

/** Print a result as the command's JSON document. */
export function printJson(v: unknown): void {
  process.stdout.write(`${jsonText(v)}\n`);
}
