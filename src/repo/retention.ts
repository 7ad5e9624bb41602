/**
 * Retention policy: which checkpoints a `forget --keep-*` keeps. Pure (no I/O, no clock).
 *
 * Rules as restic's `forget`: the checkpoints of one VM are walked newest first;
 *   - keep-last N keeps the N newest;
 *   - keep-daily N keeps, for each of the last N days that have checkpoints, the newest checkpoint
 *     of that day; keep-weekly (ISO 8601 weeks, Monday first) and keep-monthly likewise;
 *   - a checkpoint kept by any rule is kept, and a protected checkpoint is always kept (and uses
 *     up no rule's count).
 * Days, weeks and months are those of the local time zone unless `utc` is set (tests).
 */

export interface RetentionPolicy {
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
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
  /** Why it is kept: 'protected', 'last', 'daily', 'weekly', 'monthly' (empty when removed). */
  reasons: string[];
}

export interface RetentionOptions {
  utc?: boolean;
}

/** True when the policy keeps anything by rule (a policy without rules would remove everything). */
export function hasRules(p: RetentionPolicy): boolean {
  return [p.keepLast, p.keepDaily, p.keepWeekly, p.keepMonthly].some((n) => n !== undefined && n > 0);
}

function parts(t: number, utc: boolean): { y: number; m: number; d: number } {
  const dt = new Date(t);
  return utc
    ? { y: dt.getUTCFullYear(), m: dt.getUTCMonth(), d: dt.getUTCDate() }
    : { y: dt.getFullYear(), m: dt.getMonth(), d: dt.getDate() };
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
    { reason: 'daily', count: policy.keepDaily ?? 0, key: (it) => dayKey(it.time, utc) },
    { reason: 'weekly', count: policy.keepWeekly ?? 0, key: (it) => isoWeekKey(it.time, utc) },
    { reason: 'monthly', count: policy.keepMonthly ?? 0, key: (it) => monthKey(it.time, utc) },
  ];
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
      i++;
    }
    out.push({ id: it.id, time: it.time, keep: reasons.length > 0, reasons });
  }
  return out;
}
