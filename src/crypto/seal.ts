/**
 * Sealing objects of an encrypted repository: XChaCha20-Poly1305 (libsodium through the maintained
 * `sodium-native` binding) over the compressed bytes, and chunk ids from a keyed BLAKE3 (see keys.ts
 * for where the keys come from).
 *
 *   sealed := version u8 (= 1) | kind u8 | keyId[8] | nonce[24] | ciphertext | tag[16]
 *   AAD    := "bkfs-seal-v1" | version | kind | keyId | context
 *
 * Why XChaCha20-Poly1305 (libsodium) and not AES-256-GCM (node:crypto, with AES-NI): its
 * 192-bit random nonces lift the ~2^32 objects-per-key limit of random 96-bit GCM nonces (NIST SP
 * 800-38D), so one key seals any number of chunks without counters or rotation. Speed decided
 * nothing: on the shared 2-core VM of this project both seal 256 KiB records at 40-300 MiB/s per
 * core depending on the neighbours' load (`bench/crypt.ts` micro figures, interleaved rounds), in
 * the range of zstd level 1, and the backup, restore and mount figures with and without
 * encryption differ by less than run-to-run noise (bench/README.md, "crypt").
 *
 * `kind` says what the object is (chunk, manifest, config, index snapshot, pack trailer) and
 * `context` binds it to where it belongs (a chunk's id, a manifest's uid): a sealed object copied
 * to another place, or a chunk swapped for another, fails to open instead of returning other bytes.
 *
 * Opening checks the tag before anything is returned: a changed byte anywhere gives
 * DATA_DAMAGED, which the read paths turn into EIO, as a hash mismatch does in plain repositories.
 */
import { randomBytes } from 'node:crypto';
import { blakeHash } from './blake';
import { BkfsError } from '../errors';
import type { RepoKeys } from './keys';

// sodium-native has no type declarations; the two functions used here.
interface Sodium {
  crypto_aead_xchacha20poly1305_ietf_encrypt(
    c: Buffer,
    m: Buffer,
    ad: Buffer | null,
    nsec: null,
    npub: Buffer,
    k: Buffer,
  ): number;
  crypto_aead_xchacha20poly1305_ietf_decrypt(
    m: Buffer,
    nsec: null,
    c: Buffer,
    ad: Buffer | null,
    npub: Buffer,
    k: Buffer,
  ): number;
}
let sodiumMod: Sodium | undefined;
/** Loaded on first use: a plain repository never seals, and `bkfs list` should not pay for it. */
function sodium(): Sodium {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (sodiumMod ??= require('sodium-native') as Sodium);
}

export const SEAL_VERSION = 1;
const NONCE = 24;
const HEADER = 1 + 1 + 8 + NONCE;
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
  return blakeHash().Blake3Hasher.newKeyed(keys.idKey).update(plain).digestBuffer();
}

export function seal(keys: RepoKeys, kind: SealKind, context: Buffer, plain: Buffer): Buffer {
  const out = Buffer.allocUnsafeSlow(HEADER + plain.length + TAG);
  out[0] = SEAL_VERSION;
  out[1] = kind;
  keys.keyId.copy(out, 2);
  const nonce = out.subarray(10, HEADER);
  randomBytes(NONCE).copy(nonce);
  sodium().crypto_aead_xchacha20poly1305_ietf_encrypt(
    out.subarray(HEADER),
    plain,
    aad(kind, keys.keyId, context),
    null,
    nonce,
    keys.dataKey,
  );
  return out;
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
  const out = Buffer.allocUnsafeSlow(sealed.length - SEAL_OVERHEAD);
  try {
    sodium().crypto_aead_xchacha20poly1305_ietf_decrypt(
      out,
      null,
      sealed.subarray(HEADER),
      aad(kind, keyId, context),
      sealed.subarray(10, HEADER),
      keys.dataKey,
    );
  } catch {
    throw new BkfsError('DATA_DAMAGED', `${what}: authentication failed (changed or not ours)`);
  }
  return out;
}
