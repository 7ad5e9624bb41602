/**
 * Terminal progress bar: bytes done of bytes to do, rate and ETA, redrawn at most 10 times a
 * second on stderr. Silent when stderr is not a TTY (CI, pipes, cron).
 */
import { bytes, duration, rate } from '../util/format';

export class ProgressBar {
  private last = 0;
  private readonly t0 = Date.now();
  private drawn = false;
  readonly enabled: boolean;

  constructor(
    private readonly label: string,
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {
    this.enabled = Boolean(stream.isTTY) && !process.env.CI;
  }

  update(done: number, total: number, force = false): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (!force && now - this.last < 100) return;
    this.last = now;
    const width = 30;
    const frac = total > 0 ? Math.min(1, done / total) : 0;
    const filled = Math.round(frac * width);
    const secs = (now - this.t0) / 1000;
    const r = secs > 0 ? done / secs : 0;
    const eta = r > 0 && total > done ? duration(((total - done) / r) * 1000) : '-';
    const line = `${this.label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(0).padStart(3)}% ${bytes(done)}/${bytes(total)} ${rate(r)} ETA ${eta}`;
    this.stream.write(
      `\r${line.padEnd((this.stream.columns ?? 100) - 1).slice(0, (this.stream.columns ?? 100) - 1)}`,
    );
    this.drawn = true;
  }

  done(): void {
    if (this.drawn) this.stream.write('\r\x1b[K');
    this.drawn = false;
  }
}
