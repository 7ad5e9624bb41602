/**
 * The one repository-level cipher of an encrypted repository (issue 13 §2). A plain repository has
 * none (`null` wherever a `Cipher | null` is taken). Everything that an encrypted repository stores
 * sealed goes through here:
 *
 *   - chunk ids: keyed BLAKE3 of the plaintext (`chunkHash`), so a stored id says nothing about it;
 *   - chunk records: the codec's stored bytes (one zstd frame, frames with their table, or raw)
 *     sealed whole, bound to the chunk id (`sealChunk`/`openChunk`);
 *   - manifests (bound to the checkpoint uid) and stored configurations (domain XML: bound to the
 *     checkpoint uid and the config name), in the manifest files and in the index;
 *   - for other modules (object-store index snapshots, pack trailers): `seal(kind, context, bytes)`
 *     and `open(kind, context, bytes)`, the same AEAD with their own kind and context.
 *
 * The keys live in memory only (derived from the master secret when the repository is unlocked,
 * `keyring.ts`); nothing here writes them anywhere.
 */
import { BkfsError } from '../errors';
import { deriveKeys, type RepoKeys } from './keys';
import { chunkId, open, seal, SealKind, SEAL_OVERHEAD } from './seal';

export { SealKind, SEAL_OVERHEAD };

/** The keys a worker thread needs to name and seal chunks (passed as worker data, in memory). */
export interface WorkerKeys {
  keyId: Uint8Array;
  dataKey: Uint8Array;
  idKey: Uint8Array;
}

export class Cipher {
  readonly keys: RepoKeys;

  constructor(master: Buffer | RepoKeys) {
    this.keys = Buffer.isBuffer(master) ? deriveKeys(master) : master;
  }

  static fromWorkerKeys(k: WorkerKeys): Cipher {
    return new Cipher({
      keyId: Buffer.from(k.keyId),
      dataKey: Buffer.from(k.dataKey),
      idKey: Buffer.from(k.idKey),
    });
  }

  /** Hex of the key id (what `bkfs-repo.json` and the key slots name). */
  get keyIdHex(): string {
    return this.keys.keyId.toString('hex');
  }

  workerKeys(): WorkerKeys {
    return {
      keyId: new Uint8Array(this.keys.keyId),
      dataKey: new Uint8Array(this.keys.dataKey),
      idKey: new Uint8Array(this.keys.idKey),
    };
  }

  /** The id of a chunk: keyed BLAKE3-256 of its plaintext (32 bytes, as the plain hash). */
  chunkHash(plain: Uint8Array): Buffer {
    return chunkId(
      this.keys,
      Buffer.isBuffer(plain) ? plain : Buffer.from(plain.buffer, plain.byteOffset, plain.byteLength),
    );
  }

  sealChunk(id: Buffer, encoded: Buffer): Buffer {
    return seal(this.keys, SealKind.Chunk, id, encoded);
  }

  /** The codec's stored bytes of chunk `id`, or DATA_DAMAGED if the record was changed or moved. */
  openChunk(id: Buffer, sealed: Buffer): Buffer {
    return open(this.keys, SealKind.Chunk, id, sealed, `chunk ${id.toString('hex').slice(0, 16)}`);
  }

  seal(kind: SealKind, context: string | Buffer, bytes: Buffer): Buffer {
    return seal(this.keys, kind, typeof context === 'string' ? Buffer.from(context) : context, bytes);
  }

  open(kind: SealKind, context: string | Buffer, sealed: Buffer, what = 'object'): Buffer {
    return open(this.keys, kind, typeof context === 'string' ? Buffer.from(context) : context, sealed, what);
  }

  sealManifest(uid: string, bytes: Buffer): Buffer {
    return this.seal(SealKind.Manifest, `manifest ${uid}`, bytes);
  }

  openManifest(uid: string, sealed: Buffer): Buffer {
    try {
      return this.open(SealKind.Manifest, `manifest ${uid}`, sealed, `manifest ${uid}`);
    } catch (e) {
      // A manifest that does not open is a damaged repository file, as a garbled one is.
      throw new BkfsError('REPO_CORRUPT', `manifest ${uid} is damaged: ${(e as Error).message}`);
    }
  }

  sealConfig(uid: string, name: string, data: Buffer): Buffer {
    return this.seal(SealKind.Config, `config ${uid} ${name}`, data);
  }

  openConfig(uid: string, name: string, sealed: Buffer): Buffer {
    return this.open(SealKind.Config, `config ${uid} ${name}`, sealed, `configuration ${name}`);
  }
}
