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
