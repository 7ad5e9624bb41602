/**
 * Unlocking encrypted repositories, in memory only.
 *
 * `bkfs-repo.json` of an encrypted repository (format 5) holds an `encryption` object: the key id
 * and the key slots (`keys.ts`). To open it, the process needs one secret that opens a slot: a
 * passphrase, a key file's bytes, or the master secret itself (a paper key, or handed over by a
 * parent bkfs through a pipe). Where secrets come from is the adapter's business (the CLI asks
 * `BKFS_PASSWORD_FILE`, `BKFS_PASSWORD_COMMAND`, `--key-file`/`BKFS_KEY_FILE`, then the terminal):
 * it installs a `KeyProvider`; core code only calls `unlock`. Without a provider, or when it has no
 * source, that is KEY_REQUIRED; secrets that open no slot are KEY_INVALID.
 *
 * An unlocked master secret is kept in this process's memory (by key id), so one command that
 * opens the repository several times derives the scrypt key once. Nothing is written to disk; a
 * child bkfs (mount daemon, job runs) gets the master through an inherited pipe (`handoffPayload`
 * / `acceptHandoff`, fd number in `BKFS_KEY_FD`), never through argv or the environment.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import type { Cipher } from './cipher';
import type { KeySlot } from './keys';

// Loaded when first needed: the CLI installs this module for every command, and `bkfs --help`
// should not load native crypto modules.
/* eslint-disable @typescript-eslint/no-require-imports */
const keysMod = () => require('./keys') as typeof import('./keys');
const cipherMod = () => require('./cipher') as typeof import('./cipher');
/* eslint-enable @typescript-eslint/no-require-imports */
const MASTER_LEN = 64;

export interface EncryptionConfig {
  /** AEAD of sealed objects (`seal.ts`). */
  cipher: 'xchacha20-poly1305';
  /** How chunk ids are made. */
  idHash: 'blake3-keyed';
  /** Hex of the master key's id (8 bytes). */
  keyId: string;
  slots: KeySlot[];
}

export interface KeySource {
  kind: 'passphrase' | 'keyfile' | 'master';
  secret: Buffer;
  /** For messages: where it came from ("BKFS_PASSWORD_FILE /x", "the terminal"). */
  from: string;
}

export interface KeyRequest {
  dir: string;
  repoId: string;
  /** Which kinds of slots the repository has (a provider need not ask for a passphrase if none). */
  kinds: Set<KeySlot['kind']>;
}

/** Returns the secrets to try, or throws KEY_REQUIRED when it has none. */
export type KeyProvider = (req: KeyRequest) => KeySource[];

let provider: KeyProvider | undefined;
const masters = new Map<string, Buffer>();

export function setKeyProvider(p: KeyProvider | undefined): void {
  provider = p;
}

/** Remember an unlocked (or just created) master secret for this process. */
export function rememberMaster(master: Buffer): void {
  masters.set(keysMod().deriveKeys(master).keyId.toString('hex'), Buffer.from(master));
}

/** Forget every remembered master secret (tests; `key` commands that must ask again). */
export function forgetMasters(): void {
  for (const m of masters.values()) m.fill(0);
  masters.clear();
}

export function rememberedMaster(keyIdHex: string): Buffer | undefined {
  return masters.get(keyIdHex);
}

/** Check an `encryption` object of a config; REPO_CORRUPT when it is not one bkfs wrote. */
export function checkEncryptionConfig(e: unknown, where: string): EncryptionConfig {
  const bad = (why: string) =>
    new BkfsError('REPO_CORRUPT', `${where}: encryption settings are damaged (${why})`);
  if (typeof e !== 'object' || e === null) throw bad('not an object');
  const c = e as Partial<EncryptionConfig>;
  if (c.cipher !== 'xchacha20-poly1305') throw bad(`unknown cipher ${String(c.cipher)}`);
  if (c.idHash !== 'blake3-keyed') throw bad(`unknown id hash ${String(c.idHash)}`);
  if (typeof c.keyId !== 'string' || !/^[0-9a-f]{16}$/.test(c.keyId)) throw bad('key id');
  if (!Array.isArray(c.slots) || c.slots.length === 0) throw bad('no key slots');
  for (const s of c.slots) {
    if (
      typeof s !== 'object' ||
      s === null ||
      (s.kind !== 'passphrase' && s.kind !== 'keyfile') ||
      typeof s.name !== 'string' ||
      s.keyId !== c.keyId ||
      typeof s.wrapped !== 'string'
    ) {
      throw bad('a key slot is malformed');
    }
  }
  return c as EncryptionConfig;
}

/**
 * The cipher of an encrypted repository: from the remembered master, else from the provider's
 * secrets (KEY_REQUIRED without any, KEY_INVALID when none opens a slot).
 */
export function unlock(dir: string, repoId: string, enc: EncryptionConfig): Cipher {
  const known = masters.get(enc.keyId);
  if (known) return new (cipherMod().Cipher)(known);
  const kinds = new Set(enc.slots.map((s) => s.kind));
  if (!provider) {
    throw new BkfsError('KEY_REQUIRED', `repository ${dir} is encrypted and no key source is set`);
  }
  const sources = provider({ dir, repoId, kinds });
  const tried: string[] = [];
  for (const src of sources) {
    tried.push(src.from);
    const master = masterFrom(enc, src);
    if (master) {
      rememberMaster(master);
      return new (cipherMod().Cipher)(master);
    }
  }
  throw new BkfsError(
    'KEY_INVALID',
    `wrong passphrase or key file for encrypted repository ${dir}: no key slot opens with ${tried.join(', ') || 'what was given'}`,
  );
}

/** The master secret `src` gives for this repository, or null. */
export function masterFrom(enc: EncryptionConfig, src: KeySource): Buffer | null {
  if (src.kind === 'master') {
    if (src.secret.length !== MASTER_LEN) return null;
    return keysMod().deriveKeys(src.secret).keyId.toString('hex') === enc.keyId ? src.secret : null;
  }
  for (const slot of enc.slots) {
    if (slot.kind !== src.kind) continue;
    const m = keysMod().openSlot(slot, src.secret);
    if (m) return m;
  }
  return null;
}

// ---- hand-over to a child bkfs ----

/** Environment variable naming the fd a child reads its master secrets from. */
export const KEY_FD_ENV = 'BKFS_KEY_FD';

/**
 * What a parent writes into the pipe for a child: the remembered master secrets (hex, one a line).
 * Empty when this process unlocked nothing (a plain repository): the child then needs no key.
 */
export function handoffPayload(): Buffer | null {
  if (masters.size === 0) return null;
  return Buffer.from([...masters.values()].map((m) => m.toString('hex')).join('\n') + '\n');
}

/**
 * Child side: read the master secrets from the fd named by `BKFS_KEY_FD` (until EOF), remember
 * them, close the fd and remove the variable (so the child's own children do not inherit it).
 */
export function acceptHandoff(env: NodeJS.ProcessEnv = process.env): void {
  const v = env[KEY_FD_ENV];
  if (v === undefined) return;
  delete env[KEY_FD_ENV];
  const fd = Number(v);
  if (!Number.isInteger(fd) || fd < 3) return;
  let text: string;
  try {
    text = fs.readFileSync(fd, 'utf8');
  } catch {
    return;
  } finally {
    try {
      fs.closeSync(fd);
    } catch {
      // already closed
    }
  }
  for (const line of text.split('\n')) {
    if (/^[0-9a-f]+$/.test(line) && line.length === MASTER_LEN * 2) rememberMaster(Buffer.from(line, 'hex'));
  }
}

/**
 * Spawn settings for a child that should get this process's keys: add `'pipe'` at stdio index
 * `fd` and `BKFS_KEY_FD=fd` to its environment, then call `send(child)` right after spawning.
 * When nothing is unlocked, returns no changes.
 */
export function keyHandoff(fd: number): {
  env: Record<string, string>;
  send: (stdio: unknown[]) => void;
  active: boolean;
} {
  const payload = handoffPayload();
  if (!payload) return { env: {}, send: () => undefined, active: false };
  return {
    env: { [KEY_FD_ENV]: String(fd) },
    active: true,
    send: (stdio) => {
      const w = stdio[fd] as NodeJS.WritableStream | null | undefined;
      if (!w) return;
      w.on('error', () => undefined); // the child died first: it reports its own failure
      w.end(payload);
    },
  };
}

/**
 * Unlock the repository at `dir` in this process if it is encrypted (so that `keyHandoff` has its
 * key for a child); nothing for a plain one or one that is not there (the child reports that).
 */
export function unlockForChild(dir: string): void {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { loadConfig } = require('../repo/repository') as typeof import('../repo/repository');
  let config;
  try {
    config = loadConfig(dir);
  } catch {
    return;
  }
  if (config.encryption) unlock(dir, config.id, config.encryption);
}

// ---- per-directory and per-index lookups ----

const byDir = new Map<string, Cipher | null>();

/** Record the cipher of the repository at `dir` (done by Repository.open and the rebuild). */
export function registerCipher(dir: string, cipher: Cipher | null): void {
  byDir.set(path.resolve(dir), cipher);
}

const byDb = new WeakMap<object, Cipher | null>();

/** Record the cipher that goes with an open index (so code holding only `db` can seal/open configs). */
export function registerDbCipher(db: object, cipher: Cipher | null): void {
  byDb.set(db, cipher);
}

/** The cipher of the repository whose index `db` is (null: plain, or not registered). */
export function cipherOfDb(db: object): Cipher | null {
  return byDb.get(db) ?? null;
}

/** The cipher registered for `dir` (undefined: none registered yet). */
export function registeredCipher(dir: string): Cipher | null | undefined {
  return byDir.get(path.resolve(dir));
}
