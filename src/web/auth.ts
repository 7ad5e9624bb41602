/**
 * API tokens and roles of `bkfs web` (pure parts plus the token file).
 *
 * A token is `bkfs_` + 32 random bytes (base64url): 256 bits, so an unsalted SHA-256 is enough to
 * store it (nothing to brute-force, unlike a password). The token file (`tokens.json` in the web
 * state directory, 0600, written atomically) holds `{name, role, sha256, created}` per token; the
 * token itself is printed once by `bkfs web token add` and never stored.
 *
 * Roles: `read-only` browses and downloads; `operator` may also restore, upload disk images,
 * protect/unprotect and forget (`allowed`).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import { BkfsError } from '../errors';
import { NAME_RE } from '../index/catalog';
import { writeFileDurable, PRIVATE_FILE_MODE } from '../util/private-fs';

export type Role = 'read-only' | 'operator';
/** What a route needs: `read` (any valid token) or `operate` (operator role). */
export type Need = 'read' | 'operate';

export interface TokenRecord {
  name: string;
  role: Role;
  /** SHA-256 of the token, hex. */
  sha256: string;
  created: string;
}

export const TOKEN_PREFIX = 'bkfs_';

export function generateToken(): string {
  return TOKEN_PREFIX + randomBytes(32).toString('base64url');
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** The record a token belongs to, compared in constant time over every record; undefined if none. */
export function findToken(records: readonly TokenRecord[], token: string): TokenRecord | undefined {
  if (!token.startsWith(TOKEN_PREFIX) || token.length > 200) return undefined;
  const h = Buffer.from(hashToken(token), 'hex');
  let found: TokenRecord | undefined;
  for (const r of records) {
    const stored = Buffer.from(r.sha256, 'hex');
    if (stored.length === h.length && timingSafeEqual(stored, h)) found = r;
  }
  return found;
}

export function allowed(role: Role, need: Need): boolean {
  return need === 'read' || role === 'operator';
}

/** `Authorization: Bearer TOKEN` -> TOKEN (undefined when absent or another scheme). */
export function bearerToken(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m?.[1];
}

export function checkTokenName(name: string): string {
  if (!NAME_RE.test(name)) {
    throw new BkfsError(
      'BAD_NAME',
      `token name '${name}' may use letters, digits and _ . + - (up to 128 characters)`,
    );
  }
  return name;
}

function isRecord(x: unknown): x is TokenRecord {
  const r = x as TokenRecord;
  return (
    typeof r === 'object' &&
    r !== null &&
    typeof r.name === 'string' &&
    (r.role === 'read-only' || r.role === 'operator') &&
    typeof r.sha256 === 'string' &&
    /^[0-9a-f]{64}$/.test(r.sha256)
  );
}

export function readTokens(file: string): TokenRecord[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new BkfsError('REPO_CORRUPT', `${file} is not valid JSON`);
  }
  const list = (data as { tokens?: unknown }).tokens;
  if (!Array.isArray(list) || !list.every(isRecord)) {
    throw new BkfsError('REPO_CORRUPT', `${file} is not a bkfs token file`);
  }
  return list;
}

export function writeTokens(file: string, tokens: readonly TokenRecord[]): void {
  writeFileDurable(file, Buffer.from(`${JSON.stringify({ tokens }, null, 2)}\n`), PRIVATE_FILE_MODE);
}

/** Add a token; returns it (the only time it exists in clear). */
export function addToken(
  file: string,
  name: string,
  role: Role,
  now = Date.now(),
): { token: string; record: TokenRecord } {
  checkTokenName(name);
  const tokens = readTokens(file);
  if (tokens.some((t) => t.name === name)) {
    throw new BkfsError('TARGET_EXISTS', `a token named '${name}' exists already (remove it first)`);
  }
  const token = generateToken();
  const record: TokenRecord = { name, role, sha256: hashToken(token), created: new Date(now).toISOString() };
  writeTokens(file, [...tokens, record]);
  return { token, record };
}

export function removeToken(file: string, name: string): TokenRecord {
  const tokens = readTokens(file);
  const r = tokens.find((t) => t.name === name);
  if (!r) throw new BkfsError('NOT_FOUND', `no token named '${name}'`);
  writeTokens(
    file,
    tokens.filter((t) => t !== r),
  );
  return r;
}
