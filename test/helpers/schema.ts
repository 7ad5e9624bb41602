/**
 * Schemas as code for the CLI's JSON output (README "JSON output"): small combinators that
 * return the list of problems (empty = valid). Objects must have every key their schema names,
 * with the right type; extra keys are allowed (as in JSON Schema) but `checkConventions` checks
 * every key and value of the whole document against the CLI's conventions.
 */
export type Schema = (v: unknown, at: string) => string[];

const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

const typed =
  (name: string, ok: (v: unknown) => boolean): Schema =>
  (v, at) =>
    ok(v) ? [] : [`${at}: expected ${name}, got ${JSON.stringify(v)}`];

export const str = typed('a string', (v) => typeof v === 'string');
export const bool = typed('a boolean', (v) => typeof v === 'boolean');
/** A whole number >= 0 (bytes, counts, ids, offsets, milliseconds). */
export const int = typed('a whole number >= 0', (v) => Number.isSafeInteger(v) && (v as number) >= 0);
/** A real number (ratios). */
export const num = typed('a number', (v) => typeof v === 'number' && Number.isFinite(v));
/** A time: ISO 8601 with its zone. */
export const time = typed('an ISO 8601 time with zone', (v) => typeof v === 'string' && ISO.test(v));
export const nul = typed('null', (v) => v === null);

export function oneOf(...values: unknown[]): Schema {
  return typed(`one of ${JSON.stringify(values)}`, (v) => values.includes(v));
}

export function nullable(s: Schema): Schema {
  return (v, at) => (v === null ? [] : s(v, at));
}

/** A key that may be absent (only where the command really omits it). */
export function optional(s: Schema): Schema & { optional: true } {
  return Object.assign((v: unknown, at: string) => (v === undefined ? [] : s(v, at)), {
    optional: true as const,
  });
}

export function arr(item: Schema, opts: { min?: number } = {}): Schema {
  return (v, at) => {
    if (!Array.isArray(v)) return [`${at}: expected an array`];
    const errs = v.flatMap((x, i) => item(x, `${at}[${i}]`));
    if (opts.min !== undefined && v.length < opts.min)
      errs.push(`${at}: expected at least ${opts.min} item(s), got ${v.length}`);
    return errs;
  };
}

export function obj(shape: Record<string, Schema>): Schema {
  return (v, at) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return [`${at}: expected an object`];
    const o = v as Record<string, unknown>;
    const errs: string[] = [];
    for (const [k, s] of Object.entries(shape)) {
      if (!(k in o) && !(s as { optional?: boolean }).optional) errs.push(`${at}.${k}: missing`);
      else errs.push(...s(o[k], `${at}.${k}`));
    }
    return errs;
  };
}

/** Names that say "this is a time": they must hold ISO 8601 strings with a zone. */
const TIME_KEY = /^(time|started|finished|created|mtime|atime|ctime)$|(Time|At)$/;

/**
 * The conventions over a whole document: no `...Sec`/`...Nsec` keys (epoch seconds), every
 * time-named key an ISO 8601 string with zone, no number that looks like epoch milliseconds
 * under a time-like name, and only integers under byte/size/count names.
 */
export function checkConventions(v: unknown, at = '$'): string[] {
  if (Array.isArray(v)) return v.flatMap((x, i) => checkConventions(x, `${at}[${i}]`));
  if (v === null || typeof v !== 'object') return [];
  const errs: string[] = [];
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
    const p = `${at}.${k}`;
    if (/(Sec|Nsec)$/.test(k)) errs.push(`${p}: epoch seconds (use an ISO 8601 time)`);
    if (TIME_KEY.test(k) && x !== null && !(typeof x === 'string' && ISO.test(x)))
      errs.push(`${p}: a time must be ISO 8601 with zone, got ${JSON.stringify(x)}`);
    if (/(Bytes|Size|bytes|size)$/.test(k) && x !== null && typeof x !== 'object' && !Number.isSafeInteger(x))
      errs.push(`${p}: bytes must be an integer, got ${JSON.stringify(x)}`);
    if (/Ms$/.test(k) && !Number.isSafeInteger(x)) errs.push(`${p}: durations are integer milliseconds`);
    errs.push(...checkConventions(x, p));
  }
  return errs;
}

/** Parse `stdout` as one JSON document and check it against `schema` and the conventions. */
export function validate(what: string, stdout: string, schema: Schema): unknown {
  let doc: unknown;
  try {
    doc = JSON.parse(stdout);
  } catch (e) {
    throw new Error(
      `${what}: output is not one JSON document (${(e as Error).message}):\n${stdout.slice(0, 500)}`,
    );
  }
  const errs = [...schema(doc, '$'), ...checkConventions(doc)];
  if (errs.length > 0)
    throw new Error(`${what}: ${errs.length} problem(s):\n  ${errs.slice(0, 20).join('\n  ')}`);
  return doc;
}
