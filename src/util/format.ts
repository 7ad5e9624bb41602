/** Human-readable sizes, rates and durations (used by the CLI and reports). */
export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

/** Bytes per second in the same IEC units as `bytes` (MiB/s), so sizes and rates compare. */
export function rate(bytesPerSec: number): string {
  return `${bytes(Math.round(bytesPerSec))}/s`;
}

export function duration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
}

export function ratio(a: number, b: number): string {
  if (b <= 0) return '-';
  return `${(a / b).toFixed(2)}x`;
}

/**
 * A time for people: local time (honours TZ, like `ls -l`) with its UTC offset, so it is never
 * ambiguous: `2026-12-02 01:03:04 +0100`.
 */
export function localTime(ms: number): string {
  const d = new Date(ms);
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  const off = -d.getTimezoneOffset();
  const sign = off < 0 ? '-' : '+';
  const a = Math.abs(off);
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())} ${sign}${p(Math.floor(a / 60))}${p(a % 60)}`;
}

/** A time for machines (`--json`): ISO 8601 in UTC with its zone, `2026-12-02T00:03:04.000Z`. */
export function isoTime(ms: number): string {
  return new Date(ms).toISOString();
}

/**
 * A duration as Go and restic write them, to milliseconds: a sequence of numbers with units
 * ms, s, m (minutes), h, d, e.g. `30s`, `5m`, `1h30m`, `1.5h`; a bare number is seconds.
 * Undefined when `v` is not one.
 */
export function parseDuration(v: string): number | undefined {
  const unit: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
  if (/^\d+(\.\d+)?$/.test(v)) return Math.round(Number(v) * 1000);
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/y;
  let total = 0;
  let pos = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(v)) !== null) {
    total += Number(m[1]) * unit[m[2]!]!;
    pos = re.lastIndex;
  }
  if (v.length === 0 || pos !== v.length) return undefined;
  return Math.round(total);
}
