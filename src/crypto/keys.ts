/**
 * Keys of an encrypted repository (issue 13 §2). Pure functions: no files, no prompts.
 *
 * One random 64-byte **master secret** per repository. Everything else derives from it with
 * BLAKE3's key derivation (distinct context strings, so the keys are independent):
 *   - `dataKey`  (32 bytes): AES-256-GCM key for chunks, manifests, configs, index snapshots;
 *   - `idKey`    (32 bytes): key of the keyed BLAKE3 that names chunks, so a stored chunk id says
 *                nothing about its plaintext (an unkeyed hash would let anyone holding a file test
 *                whether the repository has it);
 *   - `keyId`    (8 bytes):  names the master secret in sealed objects, so a reader knows which key
 *                opens them and new data can move to a new key (rotation) while old data stays
 *                readable.
 *
 * The master secret is stored only wrapped, in **key slots**: each slot is the master secret sealed
 * with AES-256-GCM under a key derived from a passphrase (scrypt) or from a key file's 32 random
 * bytes. Any slot opens the repository; `key add/remove/change-passphrase` add and remove slots
 * without touching data. Losing every slot's passphrase/key file and the paper key loses the data:
 * there is no back door.
 *
 * The paper key is the master secret in Crockford base32, in groups of 4, with a 4-character
 * BLAKE3 checksum at the end, so a typo is detected before it is used.
 */
import { createCipheriv, createDecipheriv, randomBytes, scryptSync, timingSafeEqual } from 'node:crypto';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { BkfsError } from '../errors';

export const MASTER_LEN = 64;
const GCM_NONCE = 12;
const GCM_TAG = 16;

export interface RepoKeys {
  keyId: Buffer;
  dataKey: Buffer;
  idKey: Buffer;
}

export function newMasterSecret(): Buffer {
  return randomBytes(MASTER_LEN);
}

export function deriveKeys(master: Buffer): RepoKeys {
  if (master.length !== MASTER_LEN) throw new BkfsError('REPO_CORRUPT', 'master secret has the wrong length');
  return {
    keyId: Blake3Hasher.deriveKey('bkfs 2026-12 key id', master).subarray(0, 8),
    dataKey: Blake3Hasher.deriveKey('bkfs 2026-12 data encryption key', master),
    idKey: Blake3Hasher.deriveKey('bkfs 2026-12 chunk id key', master),
  };
}

/** scrypt cost: N=2^17, r=8, p=1 (128 MiB, ~0.3–0.5 s here): the cost of one guess. */
export const SCRYPT_DEFAULT = { N: 1 << 17, r: 8, p: 1 };

export interface KeySlot {
  version: 1;
  /** 'passphrase' (scrypt) or 'keyfile' (the file's 32 bytes, through BLAKE3 derive-key). */
  kind: 'passphrase' | 'keyfile';
  name: string;
  /** hex of the master key's keyId, to check that a slot belongs to this repository. */
  keyId: string;
  created: string;
  scrypt?: { N: number; r: number; p: number; salt: string };
  /** base64: nonce (12) | AES-256-GCM(master secret) | tag (16). */
  wrapped: string;
}

function wrappingKey(
  kind: KeySlot['kind'],
  secret: Buffer,
  scrypt: { N: number; r: number; p: number; salt: Buffer } | undefined,
): Buffer {
  if (kind === 'keyfile') {
    if (secret.length < 32) throw new BkfsError('USAGE', 'a key file must hold at least 32 bytes');
    return Blake3Hasher.deriveKey('bkfs 2026-12 key file wrapping key', secret);
  }
  if (!scrypt) throw new BkfsError('REPO_CORRUPT', 'passphrase key slot without scrypt parameters');
  return scryptSync(secret, scrypt.salt, 32, {
    N: scrypt.N,
    r: scrypt.r,
    p: scrypt.p,
    maxmem: 256 * scrypt.N * scrypt.r + (1 << 20),
  });
}

/** Wrap `master` in a new slot opened by `secret` (a passphrase's UTF-8 bytes or a key file's bytes). */
export function makeSlot(
  master: Buffer,
  kind: KeySlot['kind'],
  secret: Buffer,
  name: string,
  cost = SCRYPT_DEFAULT,
): KeySlot {
  const scrypt = kind === 'passphrase' ? { ...cost, salt: randomBytes(16) } : undefined;
  const key = wrappingKey(kind, secret, scrypt);
  const keyId = deriveKeys(master).keyId;
  const nonce = randomBytes(GCM_NONCE);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(slotAad(kind, keyId));
  const body = Buffer.concat([c.update(master), c.final()]);
  return {
    version: 1,
    kind,
    name,
    keyId: keyId.toString('hex'),
    created: new Date().toISOString(),
    scrypt: scrypt && { N: scrypt.N, r: scrypt.r, p: scrypt.p, salt: scrypt.salt.toString('hex') },
    wrapped: Buffer.concat([nonce, body, c.getAuthTag()]).toString('base64'),
  };
}

function slotAad(kind: string, keyId: Buffer): Buffer {
  return Buffer.from(`bkfs key slot v1 ${kind} ${keyId.toString('hex')}`);
}

/**
 * The master secret from a slot, or null if `secret` does not open it (wrong passphrase or key
 * file). REPO_CORRUPT if the slot is malformed or opens to a secret that is not its key's.
 */
export function openSlot(slot: KeySlot, secret: Buffer): Buffer | null {
  const raw = Buffer.from(slot.wrapped, 'base64');
  if (
    slot.version !== 1 ||
    raw.length !== GCM_NONCE + MASTER_LEN + GCM_TAG ||
    !/^[0-9a-f]{16}$/.test(slot.keyId)
  ) {
    throw new BkfsError('REPO_CORRUPT', `key slot '${slot.name}' is malformed`);
  }
  const scrypt = slot.scrypt && { ...slot.scrypt, salt: Buffer.from(slot.scrypt.salt, 'hex') };
  if (scrypt && (scrypt.N > 1 << 20 || scrypt.r > 32 || scrypt.p > 16)) {
    throw new BkfsError('REPO_CORRUPT', `key slot '${slot.name}' asks for an unreasonable scrypt cost`);
  }
  if (slot.kind === 'keyfile' && secret.length < 32) return null; // not a key file: cannot be this slot's
  const key = wrappingKey(slot.kind, secret, scrypt);
  const d = createDecipheriv('aes-256-gcm', key, raw.subarray(0, GCM_NONCE));
  d.setAAD(slotAad(slot.kind, Buffer.from(slot.keyId, 'hex')));
  d.setAuthTag(raw.subarray(raw.length - GCM_TAG));
  let master: Buffer;
  try {
    master = Buffer.concat([d.update(raw.subarray(GCM_NONCE, raw.length - GCM_TAG)), d.final()]);
  } catch {
    return null;
  }
  if (!timingSafeEqual(deriveKeys(master).keyId, Buffer.from(slot.keyId, 'hex'))) {
    throw new BkfsError('REPO_CORRUPT', `key slot '${slot.name}' holds another repository's key`);
  }
  return master;
}

/** Open the first slot that `secret` opens; KEY_INVALID when none does. */
export function openAnySlot(slots: KeySlot[], secret: Buffer): { master: Buffer; slot: KeySlot } {
  for (const slot of slots) {
    const master = openSlot(slot, secret);
    if (master) return { master, slot };
  }
  throw new BkfsError(
    'KEY_INVALID',
    'wrong passphrase or key file: no key slot of this repository opens with it',
  );
}

// ---- paper key ----

const B32 = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

function base32(buf: Buffer): string {
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of buf) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    value &= (1 << bits) - 1;
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

function unbase32(s: string): Buffer {
  const out: number[] = [];
  let bits = 0;
  let value = 0;
  for (const ch of s) {
    const v = B32.indexOf(ch);
    if (v < 0) throw new BkfsError('USAGE', `paper key: '${ch}' is not a key character`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
      value &= (1 << bits) - 1;
    }
  }
  return Buffer.from(out);
}

function paperChecksum(master: Buffer): string {
  return base32(Blake3Hasher.deriveKey('bkfs 2026-12 paper key checksum', master).subarray(0, 3)).slice(0, 4);
}

/** The master secret for printing: groups of 4 characters, the last group a checksum. */
export function toPaperKey(master: Buffer): string {
  const s = base32(master) + paperChecksum(master);
  return (s.match(/.{1,4}/g) ?? []).join('-');
}

/** Read a paper key back (case, spaces, dashes and the O/I/L look-alikes forgiven). */
export function fromPaperKey(text: string): Buffer {
  const s = text.toUpperCase().replace(/[\s-]/g, '').replace(/O/g, '0').replace(/[IL]/g, '1');
  const bodyLen = Math.ceil((MASTER_LEN * 8) / 5);
  if (s.length !== bodyLen + 4) {
    throw new BkfsError('USAGE', `paper key: expected ${bodyLen + 4} key characters, got ${s.length}`);
  }
  const master = unbase32(s.slice(0, bodyLen)).subarray(0, MASTER_LEN);
  if (paperChecksum(master) !== s.slice(bodyLen)) {
    throw new BkfsError('USAGE', 'paper key: checksum does not match (a character is wrong)');
  }
  return master;
}
