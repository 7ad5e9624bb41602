/**
 * The estate job file (`bkfs run JOBFILE`): TOML (smol-toml) validated against a schema (zod).
 * Pure: `parseJobFile(text, file)` takes the text; reading the file is the caller's business.
 *
 * Every problem is one `BkfsError('JOB_INVALID')` line `FILE:LINE: KEY.PATH: what is wrong`
 * (the line when it can be found: TOML syntax errors always have one; schema errors get the line
 * of the key, found by `keyLine`).
 *
 * The schema is documented in README ("Backing up an estate") and `examples/estate.toml`.
 */
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import { BkfsError } from '../errors';
import { parseDuration } from '../util/format';
import { KEEP_COUNT_FLAGS, parseKeepWithin, type KeepWithin, type RetentionPolicy } from '../repo/retention';

export const DEFAULT_URI = 'qemu:///system';
export const LEVEL_MODES = ['auto', 'full', 'inc', 'diff', 'copy'] as const;
export type LevelMode = (typeof LEVEL_MODES)[number];

/** A level policy: `auto` rotates fulls, anything else is that level every time. */
export interface LevelPolicy {
  mode: LevelMode;
  /** auto: a full when the chain's full is at least this many calendar days old. */
  fullEveryDays?: number;
  /** auto: every Nth backup of a chain is a full (full, N-1 others, full, ...). */
  fullEveryBackups?: number;
  /** auto: the level between fulls. */
  between: 'inc' | 'diff';
}

export interface HostSpec {
  /** Label in the summary; defaults to the URI. */
  name: string;
  uri: string;
  /** Domain names, globs (`web-*`) or `all`. */
  domains: string[];
  exclude: string[];
  /** At most this many backups at once on this host. */
  concurrency: number;
  /** Prepended to each domain name to form the VM name in the repository. */
  vmPrefix: string;
  scratchDir?: string;
}

export interface JobSpec {
  /** The job file's path (as given), for messages and the log file name. */
  file: string;
  repository: string;
  logDir?: string;
  /** At most this many backups at once in total. */
  concurrency: number;
  /** How long each child waits for the repository lock (`--retry-lock`). */
  retryLock: string;
  freeze: boolean;
  level: LevelPolicy;
  retention?: RetentionPolicy;
  gc: { enabled: boolean; maxUnused?: string };
  /** After the backups (and retention, gc): copy the VMs backed up into another repository (a path relative to the job file's directory). */
  copy?: { to: string };
  hosts: HostSpec[];
}

const count = z.number().int().min(0).max(1_000_000);
const positive = z.number().int().min(1).max(1000);
const nonEmpty = z.string().min(1, 'must not be empty');
const duration = z
  .string()
  .refine((v) => parseDuration(v) !== undefined, { message: 'must be a duration such as 30s, 5m or 2h' });
const keepWithin = z.string().refine(
  (v) => {
    try {
      parseKeepWithin(v);
      return true;
    } catch {
      return false;
    }
  },
  { message: 'must be a span such as 14d, 36h or 1y6m (units y, m, d, h)' },
);

const hostSchema = z
  .object({
    name: nonEmpty.optional(),
    uri: nonEmpty.optional(),
    domains: z.array(nonEmpty).min(1, 'must name at least one domain, glob or "all"'),
    exclude: z.array(nonEmpty).optional(),
    concurrency: positive.optional(),
    'vm-prefix': z.string().optional(),
    'scratch-dir': nonEmpty.optional(),
  })
  .strict();

const schema = z
  .object({
    repository: nonEmpty,
    'log-dir': nonEmpty.optional(),
    concurrency: positive.optional(),
    'per-host': positive.optional(),
    'retry-lock': duration.optional(),
    freeze: z.boolean().optional(),
    level: z
      .object({
        mode: z.enum(LEVEL_MODES).optional(),
        'full-every-days': positive.optional(),
        'full-every-backups': positive.optional(),
        between: z.enum(['inc', 'diff']).optional(),
      })
      .strict()
      .optional(),
    retention: z
      .object({
        'keep-last': count.optional(),
        'keep-hourly': count.optional(),
        'keep-daily': count.optional(),
        'keep-weekly': count.optional(),
        'keep-monthly': count.optional(),
        'keep-yearly': count.optional(),
        'keep-within': keepWithin.optional(),
      })
      .strict()
      .optional(),
    gc: z
      .object({
        enabled: z.boolean(),
        'max-unused': z
          .string()
          .regex(/^(unlimited|\d+(\.\d+)?\s*%?)$/, 'must be a percentage such as "5%" or "unlimited"')
          .optional(),
      })
      .strict()
      .optional(),
    copy: z.object({ to: nonEmpty }).strict().optional(),
    host: z.array(hostSchema).min(1, 'the job needs at least one [[host]]'),
  })
  .strict();

type Raw = z.infer<typeof schema>;

/** `host[1].domains[0]` from a zod path. */
export function pathText(p: readonly PropertyKey[]): string {
  let s = '';
  for (const k of p) {
    if (typeof k === 'number') s += `[${k}]`;
    else s += s === '' ? String(k) : `.${String(k)}`;
  }
  return s;
}

/**
 * The 1-based line of the key at `p` in TOML `text`, or undefined: tables `[level]` and arrays of
 * tables `[[host]]` are followed by header, then `key =` lines up to the next header. Keys written
 * as dotted keys or inline tables are not found (the message then has no line).
 */
export function keyLine(text: string, p: readonly PropertyKey[]): number | undefined {
  const lines = text.split(/\r?\n/);
  const keyRe = (k: string) => new RegExp(`^\\s*(?:"${esc(k)}"|'${esc(k)}'|${esc(k)})\\s*=`);
  const headerRe = /^\s*\[\[?\s*([^\]]+?)\s*\]\]?/;
  let start = 0; // first line of the table the key is in
  let end = lines.length;
  let rest = [...p];
  if (typeof rest[0] === 'string' && (typeof rest[1] === 'number' || typeof rest[1] === 'string')) {
    const table = rest[0];
    const index = typeof rest[1] === 'number' ? rest[1] : undefined;
    let seen = -1;
    let found = -1;
    for (let i = 0; i < lines.length; i++) {
      const m = headerRe.exec(lines[i]!);
      if (m && m[1] === table) {
        seen++;
        if (index === undefined || seen === index) {
          found = i;
          break;
        }
      }
    }
    if (found >= 0) {
      start = found + 1;
      end = lines.findIndex((l, i) => i >= start && headerRe.test(l));
      if (end < 0) end = lines.length;
      rest = index === undefined ? rest.slice(1) : rest.slice(2);
      if (rest.length === 0) return found + 1;
    }
  } else {
    end = lines.findIndex((l) => headerRe.test(l));
    if (end < 0) end = lines.length;
  }
  const key = rest[0];
  if (typeof key !== 'string') return undefined;
  for (let i = start; i < end; i++) if (keyRe(key).test(lines[i]!)) return i + 1;
  if (p.length === 1) {
    // A table's own problem: the line of its header.
    const i = lines.findIndex((l) => headerRe.exec(l)?.[1] === key);
    if (i >= 0) return i + 1;
  }
  return undefined;
}

function esc(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function invalid(file: string, line: number | undefined, msg: string): BkfsError {
  return new BkfsError('JOB_INVALID', `${file}${line !== undefined ? `:${line}` : ''}: ${msg}`);
}

/** Parse and validate a job file's text; one JOB_INVALID line on the first problem. */
export function parseJobFile(text: string, file: string): JobSpec {
  let doc: unknown;
  try {
    doc = parseToml(text);
  } catch (e) {
    if (e instanceof TomlError) {
      const what = e.message.split('\n')[0]!.replace(/^Invalid TOML document:\s*/, '');
      throw invalid(file, e.line, `not valid TOML: ${what}`);
    }
    throw e;
  }
  const r = schema.safeParse(doc, { reportInput: true });
  if (!r.success) {
    const issue = r.error.issues[0]!;
    if (issue.code === 'unrecognized_keys') {
      const p = [...issue.path, issue.keys[0]!];
      const known = knownKeys(issue.path);
      throw invalid(
        file,
        keyLine(text, p),
        `${pathText(p)}: unknown key${known ? ` (known here: ${known})` : ''}`,
      );
    }
    const p = issue.path;
    const at = p.length > 0 ? `${pathText(p)}: ` : '';
    const msg = issue.code === 'invalid_type' && issue.input === undefined ? 'missing' : issueMessage(issue);
    throw invalid(file, keyLine(text, p), `${at}${msg}`);
  }
  return normalize(r.data, file, text);
}

function issueMessage(issue: z.core.$ZodIssue): string {
  if (issue.code === 'invalid_value')
    return `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}`;
  if (issue.code === 'too_small' && issue.origin === 'number')
    return `must be at least ${String(issue.minimum)}`;
  if (issue.code === 'too_big' && issue.origin === 'number')
    return `must be at most ${String(issue.maximum)}`;
  if (issue.code === 'invalid_type') {
    const got = issue.input === null ? 'null' : Array.isArray(issue.input) ? 'an array' : typeof issue.input;
    const want = issue.expected === 'int' ? 'a whole number' : `a ${issue.expected}`;
    return `must be ${want}, got ${got === 'number' ? String(issue.input) : got}`;
  }
  return issue.message;
}

/** The keys a table of the schema allows, for "unknown key" messages. */
function knownKeys(p: readonly PropertyKey[]): string {
  let s: z.ZodType = schema;
  for (const k of p) {
    if (s instanceof z.ZodOptional) s = s.unwrap() as z.ZodType;
    if (typeof k === 'number' && s instanceof z.ZodArray) s = s.element as z.ZodType;
    else if (typeof k === 'string' && s instanceof z.ZodObject) s = s.shape[k] as z.ZodType;
    else return '';
  }
  if (s instanceof z.ZodOptional) s = s.unwrap() as z.ZodType;
  return s instanceof z.ZodObject ? Object.keys(s.shape).join(', ') : '';
}

function normalize(raw: Raw, file: string, text: string): JobSpec {
  const perHost = raw['per-host'] ?? 2;
  const hosts: HostSpec[] = raw.host.map((h) => ({
    name: h.name ?? h.uri ?? DEFAULT_URI,
    uri: h.uri ?? DEFAULT_URI,
    domains: h.domains,
    exclude: h.exclude ?? [],
    concurrency: h.concurrency ?? perHost,
    vmPrefix: h['vm-prefix'] ?? '',
    ...(h['scratch-dir'] !== undefined ? { scratchDir: h['scratch-dir'] } : {}),
  }));
  const names = new Map<string, number>();
  hosts.forEach((h, i) => {
    const prev = names.get(h.name);
    if (prev !== undefined) {
      throw invalid(
        file,
        keyLine(text, ['host', i, 'name']) ?? keyLine(text, ['host', i]),
        `host[${i}]: host name '${h.name}' is used by host[${prev}] too (give each [[host]] its own name)`,
      );
    }
    names.set(h.name, i);
  });
  const lv = raw.level;
  if (lv && (lv.mode ?? 'auto') !== 'auto') {
    for (const k of ['full-every-days', 'full-every-backups', 'between'] as const) {
      if (lv[k] !== undefined)
        throw invalid(file, keyLine(text, ['level', k]), `level.${k}: only with mode = "auto"`);
    }
  }
  let retention: RetentionPolicy | undefined;
  if (raw.retention) {
    const r = raw.retention;
    retention = {};
    const map = [
      ['keep-last', 'keepLast'],
      ['keep-hourly', 'keepHourly'],
      ['keep-daily', 'keepDaily'],
      ['keep-weekly', 'keepWeekly'],
      ['keep-monthly', 'keepMonthly'],
      ['keep-yearly', 'keepYearly'],
    ] as const;
    for (const [k, key] of map) if (r[k] !== undefined) retention[key] = r[k];
    if (r['keep-within'] !== undefined)
      retention.keepWithin = parseKeepWithin(r['keep-within']) as KeepWithin;
    if (Object.keys(retention).length === 0) {
      throw invalid(file, keyLine(text, ['retention']), 'retention: give at least one keep-* rule');
    }
  }
  return {
    file,
    repository: raw.repository,
    ...(raw['log-dir'] !== undefined ? { logDir: raw['log-dir'] } : {}),
    concurrency: raw.concurrency ?? 2,
    retryLock: raw['retry-lock'] ?? '6h',
    freeze: raw.freeze ?? true,
    level: {
      mode: lv?.mode ?? 'auto',
      ...(lv?.['full-every-days'] !== undefined ? { fullEveryDays: lv['full-every-days'] } : {}),
      ...(lv?.['full-every-backups'] !== undefined ? { fullEveryBackups: lv['full-every-backups'] } : {}),
      between: lv?.between ?? 'inc',
    },
    ...(retention ? { retention } : {}),
    gc: {
      enabled: raw.gc?.enabled ?? false,
      ...(raw.gc?.['max-unused'] !== undefined ? { maxUnused: raw.gc['max-unused'] } : {}),
    },
    ...(raw.copy ? { copy: { to: raw.copy.to } } : {}),
    hosts,
  };
}

/** The `forget` options that express `policy` (for the child `bkfs forget`). */
export function retentionArgs(policy: RetentionPolicy): string[] {
  const out: string[] = [];
  for (const [k, flag] of KEEP_COUNT_FLAGS) if (policy[k] !== undefined) out.push(flag, String(policy[k]));
  const w = policy.keepWithin;
  if (w) {
    const span = `${w.years ? `${w.years}y` : ''}${w.months ? `${w.months}m` : ''}${w.days ? `${w.days}d` : ''}${w.hours ? `${w.hours}h` : ''}`;
    out.push('--keep-within', span);
  }
  return out;
}
