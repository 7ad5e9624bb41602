/**
 * Terminal progress bar: bytes done of bytes to do, rate and ETA, redrawn at most 10 times a
 * second on stderr. Silent when stderr is not a TTY (CI, pipes, cron) or with `-q`.
 *
 * The line always fits the terminal: the bar shrinks first and goes before any number does; then
 * the label, the ETA and the rate go, in that order. Sizes and rates are IEC (MiB, MiB/s).
 */
import { bytes, duration, rate } from '../util/format';

export interface ProgressState {
  label: string;
  done: number;
  total: number;
  elapsedMs: number;
  /** Terminal width; the line is at most columns - 1 characters (no wrap in the last column). */
  columns: number;
}

const BAR_MAX = 40;
const BAR_MIN = 10;

/** The progress line for a terminal `columns` wide (pure: the unit tests call it directly). */
export function renderProgress(s: ProgressState): string {
  const width = Math.max(1, s.columns - 1);
  const frac = s.total > 0 ? Math.min(1, Math.max(0, s.done / s.total)) : 0;
  const secs = s.elapsedMs / 1000;
  const r = secs > 0 ? s.done / secs : 0;
  const eta = r > 0 && s.total > s.done ? duration(((s.total - s.done) / r) * 1000) : '-';
  const pct = `${(frac * 100).toFixed(0).padStart(3)}%`;
  const sizes = `${bytes(s.done)}/${bytes(s.total)}`;
  // Candidate layouts, richest first; the first that fits wins.
  const numbers = [[pct, sizes, rate(r), `ETA ${eta}`], [pct, sizes, rate(r)], [pct, sizes], [pct]].map(
    (parts) => parts.join(' '),
  );
  for (const nums of numbers) {
    for (const label of [s.label, '']) {
      const head = label ? `${label} ` : '';
      const room = width - head.length - nums.length - 3; // "[", "] "
      if (label === s.label && nums === numbers[0] && room >= BAR_MIN) {
        const w = Math.min(BAR_MAX, room);
        const filled = Math.round(frac * w);
        return `${head}[${'#'.repeat(filled)}${'.'.repeat(w - filled)}] ${nums}`;
      }
      if (head.length + nums.length <= width) return `${head}${nums}`;
    }
  }
  return pct.trim().slice(0, width);
}

let quiet = false;

/** `-q`: no progress bars at all. */
export function setProgressQuiet(q: boolean): void {
  quiet = q;
}

/**
 * With BKFS_PROGRESS=json (set by `bkfs run` for its child processes) progress goes to stderr as
 * lines `bkfs-progress {"done":N,"total":N}`, at most twice a second, whatever the terminal.
 */
export const PROGRESS_JSON_PREFIX = 'bkfs-progress ';

export class ProgressBar {
  private last = 0;
  private readonly t0 = Date.now();
  private drawn = false;
  readonly enabled: boolean;
  private readonly json: boolean;

  constructor(
    private readonly label: string,
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {
    this.json = process.env.BKFS_PROGRESS === 'json';
    this.enabled = this.json || (Boolean(stream.isTTY) && !process.env.CI && !quiet);
  }

  update(done: number, total: number, force = false): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (this.json) {
      if (!force && now - this.last < 500) return;
      this.last = now;
      this.stream.write(`${PROGRESS_JSON_PREFIX}${JSON.stringify({ done, total })}\n`);
      return;
    }
    if (!force && now - this.last < 100) return;
    this.last = now;
    const line = renderProgress({
      label: this.label,
      done,
      total,
      elapsedMs: now - this.t0,
      columns: this.stream.columns || 80,
    });
    this.stream.write(`\r${line}\x1b[K`);
    this.drawn = true;
  }

  done(): void {
    if (this.drawn) this.stream.write('\r\x1b[K');
    this.drawn = false;
  }
}
