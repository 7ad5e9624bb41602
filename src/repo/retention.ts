/**
 * Retention policy: which checkpoints a `forget --keep-*` keeps. Pure (no I/O, no clock).
 *
 * Rules as restic's `forget`: the checkpoints of one VM are walked newest first;
 *   - keep-last N keeps the N newest;
 *   - keep-daily N keeps, for each of the last N days that have checkpoints, the newest checkpoint
 *     of that day; keep-hourly, keep-weekly (ISO 8601 weeks, Monday first), keep-monthly and
 *     keep-yearly likewise;
 *   - keep-within DURATION (e.g. `1y6m`, `14d`, `36h`) keeps every checkpoint not older than
 *     DURATION before the newest checkpoint of the VM (not before "now": a VM whose backups stopped
 *     keeps its last ones);
 *   - a checkpoint kept by any rule is kept, and a protected checkpoint is always kept (and uses
 *     up no rule's count).
 * Days, weeks and months are those of the local time zone unless `utc` is set (tests).
 */

export interface RetentionPolicy {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
  keepWithin?: KeepWithin;
}

/** The count rules of a policy and the `forget` option of each (the CLI and job files share them). */
export const KEEP_COUNT_FLAGS = [
  ['keepLast', '--keep-last'],
  ['keepHourly', '--keep-hourly'],
  ['keepDaily', '--keep-daily'],
  ['keepWeekly', '--keep-weekly'],
  ['keepMonthly', '--keep-monthly'],
  ['keepYearly', '--keep-yearly'],
] as const;

/** A calendar span for keep-within: years and months count calendar months, days calendar days. */
export interface KeepWithin {
  years: number;
  months: number;
  days: number;
  hours: number;
}

/**
 * Parse a keep-within span as restic writes it: whole numbers with units y (years), m (months),
 * d (days), h (hours), e.g. `1y5m7d2h`, `14d`, `36h`. Throws RangeError on anything else.
 */
export function parseKeepWithin(v: string): KeepWithin {
  const w: KeepWithin = { years: 0, months: 0, days: 0, hours: 0 };
  const unit = { y: 'years', m: 'months', d: 'days', h: 'hours' } as const;
  const re = /(\d+)([ymdh])/gy;
  let pos = 0;
  let m: RegExpExecArray | null;
  const seen = new Set<string>();
  while ((m = re.exec(v)) !== null) {
    const key = unit[m[2] as keyof typeof unit];
    if (seen.has(key)) break;
    seen.add(key);
    w[key] = Number(m[1]);
    pos = re.lastIndex;
  }
  if (v.length === 0 || pos !== v.length || !Object.values(w).some((n) => n > 0)) {
    throw new RangeError(`keep-within takes a span such as 14d, 36h or 1y6m (units y, m, d, h), got '${v}'`);
  }
  return w;
}

/** The oldest time `within` keeps: `newest` minus the span (calendar arithmetic). */
export function withinThreshold(newest: number, w: KeepWithin, utc = false): number {
  const d = new Date(newest);
  if (utc) {
    d.setUTCFullYear(d.getUTCFullYear() - w.years, d.getUTCMonth() - w.months, d.getUTCDate() - w.days);
  } else {
    d.setFullYear(d.getFullYear() - w.years, d.getMonth() - w.months, d.getDate() - w.days);
  }
  return d.getTime() - w.hours * 3600_000;
}

export interface RetentionItem {
  id: number;
  /** Checkpoint time, ms since the epoch. */
  time: number;
  protected?: boolean;
}

export interface RetentionDecision {
  id: number;
  time: number;
  keep: boolean;
  /**
   * Why it is kept: 'protected', 'last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly',
   * 'within' (empty when removed).
   */
  reasons: string[];
}

export interface RetentionOptions {
  utc?: boolean;
}

/** True when the policy keeps anything by rule (a policy without rules would remove everything). */
export function hasRules(p: RetentionPolicy): boolean {
  return (
    p.keepWithin !== undefined ||
    [p.keepLast, p.keepHourly, p.keepDaily, p.keepWeekly, p.keepMonthly, p.keepYearly].some(
      (n) => n !== undefined && n > 0,
    )
  );
}

function parts(t: number, utc: boolean): { y: number; m: number; d: number; h: number } {
  const dt = new Date(t);
  return utc
    ? { y: dt.getUTCFullYear(), m: dt.getUTCMonth(), d: dt.getUTCDate(), h: dt.getUTCHours() }
    : { y: dt.getFullYear(), m: dt.getMonth(), d: dt.getDate(), h: dt.getHours() };
}

export function hourKey(t: number, utc = false): string {
  const { y, m, d, h } = parts(t, utc);
  return `${y}-${m + 1}-${d}T${h}`;
}

export function dayKey(t: number, utc = false): string {
  const { y, m, d } = parts(t, utc);
  return `${y}-${m + 1}-${d}`;
}

export function monthKey(t: number, utc = false): string {
  const { y, m } = parts(t, utc);
  return `${y}-${m + 1}`;
}

/** ISO 8601 week, e.g. '2021-W52' (the week belongs to the year of its Thursday). */
export function isoWeekKey(t: number, utc = false): string {
  const { y, m, d } = parts(t, utc);
  const DAY = 86400000;
  const date = Date.UTC(y, m, d);
  const dow = (new Date(date).getUTCDay() + 6) % 7; // Monday = 0
  const thursday = date + (3 - dow) * DAY;
  const wy = new Date(thursday).getUTCFullYear();
  const week = 1 + Math.floor((thursday - Date.UTC(wy, 0, 1)) / (7 * DAY));
  return `${wy}-W${String(week).padStart(2, '0')}`;
}

/** Decide for every item (any order in); decisions come out newest first. */
export function applyRetention(
  items: readonly RetentionItem[],
  policy: RetentionPolicy,
  opts: RetentionOptions = {},
): RetentionDecision[] {
  const utc = opts.utc === true;
  const sorted = [...items].sort((a, b) => b.time - a.time || b.id - a.id);
  const rules: {
    reason: string;
    count: number;
    key: (it: RetentionItem, i: number) => string;
    last?: string;
  }[] = [
    { reason: 'last', count: policy.keepLast ?? 0, key: (_it, i) => String(i) },
    { reason: 'hourly', count: policy.keepHourly ?? 0, key: (it) => hourKey(it.time, utc) },
    { reason: 'daily', count: policy.keepDaily ?? 0, key: (it) => dayKey(it.time, utc) },
    { reason: 'weekly', count: policy.keepWeekly ?? 0, key: (it) => isoWeekKey(it.time, utc) },
    { reason: 'monthly', count: policy.keepMonthly ?? 0, key: (it) => monthKey(it.time, utc) },
    {
      reason: 'yearly',
      count: policy.keepYearly ?? 0,
      key: (it) => String(parts(it.time, utc).y),
    },
  ];
  const newest = sorted[0]?.time;
  const within =
    policy.keepWithin !== undefined && newest !== undefined
      ? withinThreshold(newest, policy.keepWithin, utc)
      : undefined;
  for (const r of rules) {
    if (!Number.isSafeInteger(r.count) || r.count < 0) {
      throw new RangeError(`keep-${r.reason} must be a whole number >= 0, got ${r.count}`);
    }
  }
  const out: RetentionDecision[] = [];
  let i = 0;
  for (const it of sorted) {
    const reasons: string[] = [];
    if (it.protected) {
      reasons.push('protected');
    } else {
      for (const r of rules) {
        if (r.count <= 0) continue;
        const k = r.key(it, i);
        if (k !== r.last) {
          r.last = k;
          r.count--;
          reasons.push(r.reason);
        }
      }
      if (within !== undefined && it.time >= within) reasons.push('within');
      i++;
    }
    out.push({ id: it.id, time: it.time, keep: reasons.length > 0, reasons });
  }
  return out;
}
