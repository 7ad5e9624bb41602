/**
 * The one JSON convention of the CLI (`--json` on every command that reports a result; README
 * "JSON output"):
 *   - times are ISO 8601 strings in UTC with their zone (`2026-12-02T00:03:04.000Z`), never epoch
 *     numbers: core results carry `time`/`started`/`finished` as epoch ms and file entries
 *     `mtimeSec` + `mtimeNsec`; `printJson` turns them into `time`/`started`/`finished`/`mtime`;
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
    if (k === 'mtimeNsec') continue; // folded into mtime
    if (k === 'mtimeSec' && typeof x === 'number') {
      const ns = typeof o.mtimeNsec === 'number' ? o.mtimeNsec : 0;
      res.mtime = isoTime(x * 1000 + Math.floor(ns / 1e6));
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
