/**
 * Sealing objects of an encrypted repository: AES-256-GCM (node:crypto, AES-NI) over the
 * compressed bytes, and chunk ids from a keyed BLAKE3 (see keys.ts for where the keys come from).
 *
 *   sealed := version u8 (= 1) | kind u8 | keyId[8] | nonce[12] | ciphertext | tag[16]
 *   AAD    := "bkfs-seal-v1" | version | kind | keyId | context
 *
 * `kind` says what the object is (chunk, manifest, config, index snapshot, pack trailer) and
 * `context` binds it to where it belongs (a chunk's id, a manifest's uid): a sealed object copied
 * to another place, or a chunk swapped for another, fails to open instead of returning other bytes.
 * Nonces are 96 random bits per object; with random nonces one key may seal about 2^32 objects
 * (NIST SP 800-38D) — 1 PiB of 256 KiB chunks — before it must be rotated (a new master key for new
 * data; the key id tells readers which key opens what).
 *
 * Opening checks the tag before anything is returned: a changed byte anywhere gives
 * DATA_DAMAGED, which the read paths turn into EIO, as a hash mismatch does in plain repositories.
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { BkfsError } from '../errors';
import type { RepoKeys } from './keys';

export const SEAL_VERSION = 1;
const HEADER = 1 + 1 + 8 + 12;
const TAG = 16;
export const SEAL_OVERHEAD = HEADER + TAG;

export enum SealKind {
  Chunk = 1,
  Manifest = 2,
  Config = 3,
  IndexSnapshot = 4,
  PackTrailer = 5,
}

const AAD_PREFIX = Buffer.from('bkfs-seal-v1');

function aad(kind: SealKind, keyId: Buffer, context: Buffer): Buffer {
  return Buffer.concat([AAD_PREFIX, Buffer.from([SEAL_VERSION, kind]), keyId, context]);
}

/** The id of a chunk in an encrypted repository: keyed BLAKE3-256 of its plaintext. */
export function chunkId(keys: RepoKeys, plain: Buffer): Buffer {
  return Blake3Hasher.newKeyed(keys.idKey).update(plain).digestBuffer();
}

export function seal(keys: RepoKeys, kind: SealKind, context: Buffer, plain: Buffer): Buffer {
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', keys.dataKey, nonce);
  c.setAAD(aad(kind, keys.keyId, context));
  const head = Buffer.concat([Buffer.from([SEAL_VERSION, kind]), keys.keyId, nonce]);
  const body = c.update(plain);
  const fin = c.final();
  return Buffer.concat([head, body, fin, c.getAuthTag()]);
}

/** The key id a sealed object names (to pick the key from a keyring), or DATA_DAMAGED. */
export function sealedKeyId(sealed: Buffer): Buffer {
  if (sealed.length < SEAL_OVERHEAD || sealed[0] !== SEAL_VERSION) {
    throw new BkfsError('DATA_DAMAGED', 'sealed object is too short or of an unknown version');
  }
  return sealed.subarray(2, 10);
}

/**
 * The plaintext of a sealed object, checked: DATA_DAMAGED if it was changed, is of another kind,
 * belongs to another context, or was sealed with another key.
 */
export function open(
  keys: RepoKeys,
  kind: SealKind,
  context: Buffer,
  sealed: Buffer,
  what = 'object',
): Buffer {
  const keyId = sealedKeyId(sealed);
  if (sealed[1] !== kind) throw new BkfsError('DATA_DAMAGED', `${what}: sealed as another kind of object`);
  if (!keyId.equals(keys.keyId)) {
    throw new BkfsError('DATA_DAMAGED', `${what}: sealed with another key (${keyId.toString('hex')})`);
  }
  const d = createDecipheriv('aes-256-gcm', keys.dataKey, sealed.subarray(10, HEADER));
  d.setAAD(aad(kind, keyId, context));
  d.setAuthTag(sealed.subarray(sealed.length - TAG));
  try {
    return Buffer.concat([d.update(sealed.subarray(HEADER, sealed.length - TAG)), d.final()]);
  } catch {
    throw new BkfsError('DATA_DAMAGED', `${what}: authentication failed (changed or not ours)`);
  }
}
