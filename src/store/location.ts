/**
 * Where a repository lives: a local directory (the default), or an S3 bucket with a local cache
 * directory (FORMAT.md, "Repositories on object storage").
 *
 * A repository on object storage is used through its cache directory: a directory of the local
 * layout (`bkfs-repo.json`, `index.db`, `lock`, `writers/`, `pins/`, `tmp/`, `manifests/`) that
 * holds no packs but a file `remote.json` naming the bucket, and a chunk cache (`chunk-cache/`).
 * Every module that is handed the cache directory (the FUSE daemon, the NBD server, the web
 * server, restore) therefore works on the bucket without knowing it: `storeFor(dir)` gives the
 * store of a repository directory, the bucket when `remote.json` is there.
 *
 * `-r s3://BUCKET/PREFIX` is turned into the cache directory by `resolveLocation` (the CLI does
 * it once, before a command runs): it reads `bkfs-repo.json` from the bucket and names the cache
 * directory after the repository id, under `--cache-dir` / `BKFS_CACHE_DIR`, else
 * `$XDG_CACHE_HOME/bkfs` (`~/.cache/bkfs`), or `/var/cache/bkfs` for root.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BkfsError, isBkfsError } from '../errors';
import { fsyncDirSync, mkdirPrivateSync, writeFileDurable } from '../util/private-fs';
import { LocalStore, type ObjectStore } from './objstore';
import type { S3Store as S3StoreT } from './s3store';

/** Loaded on demand: the AWS SDK is not needed for local repositories (start-up time). */
function newS3Store(url: string): S3StoreT {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { S3Store } = require('./s3store') as typeof import('./s3store');
  return new S3Store(url);
}

export const REMOTE_FILE = 'remote.json';
export const CONFIG_KEY = 'bkfs-repo.json';
export const CHUNK_CACHE_DIR = 'chunk-cache';

export interface RemoteInfo {
  /** s3://BUCKET[/PREFIX] */
  location: string;
}

export function isS3Url(loc: string): boolean {
  return loc.startsWith('s3://');
}

/** Object key of a pack. */
export function packKey(name: string): string {
  return `packs/${name.slice(0, 2)}/${name}.pack`;
}

/** Object key of a manifest (`manifests/<uid>.json.zst`). */
export function manifestKey(uid: string): string {
  return `manifests/${uid}.json.zst`;
}

const PACK_KEY = /^packs\/([0-9a-f]{2})\/([0-9a-f]{32})\.pack$/;
const MANIFEST_KEY = /^manifests\/([0-9a-f]{32})\.json\.zst$/;

/** The pack name of a key (`packs/NN/<name>.pack`, NN its first two digits), or null. */
export function packNameOfKey(key: string): string | null {
  const m = PACK_KEY.exec(key);
  return m && m[2]!.startsWith(m[1]!) ? m[2]! : null;
}

/** The checkpoint uid of a manifest key (`manifests/<uid>.json.zst`), or null. */
export function manifestUidOfKey(key: string): string | null {
  return MANIFEST_KEY.exec(key)?.[1] ?? null;
}

/** The objects under `prefix` whose key `parse` accepts, with what it made of the key, in key order. */
async function listParsed(
  store: ObjectStore,
  prefix: string,
  parse: (key: string) => string | null,
): Promise<{ id: string; size: number }[]> {
  const out: { id: string; size: number }[] = [];
  for await (const o of store.list(prefix)) {
    const id = parse(o.key);
    if (id !== null) out.push({ id, size: o.size });
  }
  return out;
}

/**
 * Every pack of a store, in name order: the objects under `packs/` whose key is a pack's key.
 * Anything else there (a foreign file, a temporary) is not a pack and is never touched.
 */
export async function listPacks(store: ObjectStore): Promise<{ name: string; size: number }[]> {
  return (await listParsed(store, 'packs/', packNameOfKey)).map((o) => ({ name: o.id, size: o.size }));
}

/** Every manifest of a store: checkpoint uid and object size, in uid order. */
export async function listManifests(store: ObjectStore): Promise<{ uid: string; size: number }[]> {
  return (await listParsed(store, 'manifests/', manifestUidOfKey)).map((o) => ({ uid: o.id, size: o.size }));
}

export function defaultCacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BKFS_CACHE_DIR) return env.BKFS_CACHE_DIR;
  if (process.getuid?.() === 0) return '/var/cache/bkfs';
  return path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'bkfs');
}

/** `remote.json` of a repository directory, or null for a plain local repository. */
export function remoteInfo(dir: string): RemoteInfo | null {
  let raw: string;
  try {
    raw = fs.readFileSync(path.join(dir, REMOTE_FILE), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR')
      return null;
    throw e;
  }
  const j = JSON.parse(raw) as RemoteInfo;
  if (typeof j.location !== 'string' || !isS3Url(j.location)) {
    throw new BkfsError('REPO_CORRUPT', `${path.join(dir, REMOTE_FILE)} does not name an s3:// location`);
  }
  return j;
}

const stores = new Map<string, ObjectStore>();

/** The store of the repository in `dir` (cached per directory; closed by `closeStore`). */
export function storeFor(dir: string): ObjectStore {
  const key = path.resolve(dir);
  let s = stores.get(key);
  if (!s) {
    const r = remoteInfo(dir);
    s = r ? newS3Store(r.location) : new LocalStore(dir);
    stores.set(key, s);
  }
  return s;
}

/** The bucket of a cache directory, or null for a local repository. */
export function remoteStore(dir: string): ObjectStore | null {
  const s = storeFor(dir);
  return s.kind === 'local' ? null : s;
}

const users = new Map<string, number>();

/** A Repository handle uses the store of `dir` until `releaseStore`. */
export function retainStore(dir: string): void {
  const key = path.resolve(dir);
  users.set(key, (users.get(key) ?? 0) + 1);
}

/** The last handle of `dir` closes its store (an S3 client's connections). */
export function releaseStore(dir: string): void {
  const key = path.resolve(dir);
  const n = (users.get(key) ?? 1) - 1;
  if (n > 0) {
    users.set(key, n);
    return;
  }
  users.delete(key);
  const s = stores.get(key);
  stores.delete(key);
  dropLease(dir);
  void s?.close();
}

/** Make the cache directory of a bucket's repository ready; returns it. */
function prepareCacheDir(cacheDir: string, location: string, configBytes: Buffer): void {
  mkdirPrivateSync(cacheDir, { recursive: true, mode: 0o700 });
  for (const sub of ['tmp', 'manifests', CHUNK_CACHE_DIR]) {
    mkdirPrivateSync(path.join(cacheDir, sub), { recursive: true, mode: 0o700 });
  }
  const cfg = path.join(cacheDir, CONFIG_KEY);
  if (!fs.existsSync(cfg) || !fs.readFileSync(cfg).equals(configBytes)) {
    writeFileDurable(cfg, configBytes, 0o600);
  }
  const cur = remoteInfo(cacheDir);
  if (cur?.location !== location) {
    writeFileDurable(
      path.join(cacheDir, REMOTE_FILE),
      Buffer.from(JSON.stringify({ location } satisfies RemoteInfo) + '\n'),
      0o600,
    );
  }
}

/**
 * Turn a location (directory or s3:// URL) into the directory bkfs works on: the directory
 * itself, or the bucket's cache directory (created and filled with the bucket's configuration
 * when new). Errors: the bucket's (STORE_ACCESS, STORE_UNAVAILABLE, REPO_NOT_FOUND).
 */
export async function resolveLocation(loc: string, o: { cacheDir?: string } = {}): Promise<string> {
  if (!isS3Url(loc)) return loc;
  const store = newS3Store(loc);
  try {
    await store.check();
    let configBytes: Buffer;
    try {
      configBytes = await store.get(CONFIG_KEY);
    } catch (e) {
      if (isBkfsError(e) && e.code === 'NOT_FOUND') {
        throw new BkfsError(
          'REPO_NOT_FOUND',
          `no bkfs repository at ${store.location} (run 'bkfs init -r ${loc}' first)`,
        );
      }
      throw e;
    }
    let id: unknown;
    try {
      id = (JSON.parse(configBytes.toString('utf8')) as { id?: unknown }).id;
    } catch {
      id = undefined;
    }
    if (typeof id !== 'string' || !/^[0-9a-f]{16}$/.test(id)) {
      throw new BkfsError(
        'REPO_NOT_FOUND',
        `${store.location}/${CONFIG_KEY} is not a bkfs repository configuration`,
      );
    }
    const dir = path.join(o.cacheDir ?? defaultCacheRoot(), id);
    prepareCacheDir(dir, store.location, configBytes);
    return dir;
  } finally {
    await store.close();
  }
}

/**
 * Create a repository in a bucket: the index and configuration in a new cache directory first,
 * then `bkfs-repo.json` uploaded last with a conditional create (a bucket with it is a repository;
 * of two concurrent inits one wins, the other gets REPO_EXISTS). Returns the cache directory.
 * `initLocal` creates a local repository in the directory it is given (Repository.init).
 */
export async function initRemote(
  loc: string,
  initLocal: (dir: string) => { id: string },
  o: { cacheDir?: string } = {},
): Promise<string> {
  const store = newS3Store(loc);
  try {
    await store.check();
    if (await store.head(CONFIG_KEY)) {
      throw new BkfsError('REPO_EXISTS', `a bkfs repository already exists at ${store.location}`);
    }
    const root = o.cacheDir ?? defaultCacheRoot();
    mkdirPrivateSync(root, { recursive: true, mode: 0o700 });
    const staging = path.join(root, `.init-${randomBytes(6).toString('hex')}`);
    let dir: string | undefined;
    try {
      const { id } = initLocal(staging);
      dir = path.join(root, id);
      fs.renameSync(staging, dir);
      fsyncDirSync(root);
      const configBytes = fs.readFileSync(path.join(dir, CONFIG_KEY));
      prepareCacheDir(dir, store.location, configBytes);
      try {
        await store.put(CONFIG_KEY, configBytes, { ifAbsent: true });
      } catch (e) {
        if (isBkfsError(e) && e.code === 'TARGET_EXISTS') {
          throw new BkfsError('REPO_EXISTS', `a bkfs repository already exists at ${store.location}`);
        }
        throw e;
      }
      return dir;
    } catch (e) {
      fs.rmSync(staging, { recursive: true, force: true });
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  } finally {
    await store.close();
  }
}

// ---------------------------------------------------------------------------------------------
// The writer lease (FORMAT.md, "Repositories on object storage"): one machine writes a bucket.

export const LEASE_KEY = 'lease.json';
/** A lease not renewed for this long is stale and may be taken over by another machine. */
export const LEASE_TTL_MS = Number(process.env.BKFS_LEASE_TTL_MS ?? 120_000);

interface Lease {
  owner: string;
  host: string;
  pid: number;
  renewed: string;
  ttlMs: number;
}

/** This machine's writer identity for a cache directory (`owner-id`, made once). */
function ownerId(dir: string): string {
  const f = path.join(dir, 'owner-id');
  try {
    return fs.readFileSync(f, 'utf8').trim();
  } catch {
    const id = `${os.hostname()}-${randomBytes(8).toString('hex')}`;
    try {
      fs.writeFileSync(f, id + '\n', { mode: 0o600, flag: 'wx' });
      return id;
    } catch {
      return fs.readFileSync(f, 'utf8').trim();
    }
  }
}

const leases = new Map<string, { timer: NodeJS.Timeout; until: number }>();

/**
 * Hold the bucket's writer lease for this machine before changing anything in the bucket: create
 * `lease.json` if absent; renew it if it is this machine's (any writer process of the same cache
 * directory: those coordinate through the local locks); take it over if another machine's has not
 * been renewed for its ttl; else REPO_LOCKED. Renewed in the background while the process lives.
 * A no-op for a local store, so callers call it before any change of the store, whatever it is.
 */
export async function holdLease(dir: string, store: ObjectStore): Promise<void> {
  // A local directory has no lease: its writers coordinate through the local locks alone.
  if (store.kind === 'local') return;
  const key = path.resolve(dir);
  const held = leases.get(key);
  if (held && held.until > Date.now() + LEASE_TTL_MS / 2) return;
  const owner = ownerId(dir);
  const mine = (): Buffer =>
    Buffer.from(
      JSON.stringify({
        owner,
        host: os.hostname(),
        pid: process.pid,
        renewed: new Date().toISOString(),
        ttlMs: LEASE_TTL_MS,
      } satisfies Lease),
    );
  const take = async (): Promise<void> => {
    try {
      await store.put(LEASE_KEY, mine(), { ifAbsent: true });
      return;
    } catch (e) {
      if (!isBkfsError(e) || e.code !== 'TARGET_EXISTS') throw e;
    }
    let cur: Lease | undefined;
    try {
      cur = JSON.parse((await store.get(LEASE_KEY)).toString('utf8')) as Lease;
    } catch (e) {
      if (!(e instanceof SyntaxError) && !(isBkfsError(e) && e.code === 'NOT_FOUND')) throw e;
    }
    const age = cur ? Date.now() - Date.parse(cur.renewed) : Infinity;
    if (cur && cur.owner !== owner && age < (cur.ttlMs || LEASE_TTL_MS)) {
      throw new BkfsError(
        'REPO_LOCKED',
        `${store.location} is being written by ${cur.host} (pid ${cur.pid}, lease renewed ${Math.round(age / 1000)}s ago, stale after ${Math.round((cur.ttlMs || LEASE_TTL_MS) / 1000)}s)`,
      );
    }
    await store.put(LEASE_KEY, mine());
  };
  await take();
  const until = Date.now() + LEASE_TTL_MS;
  if (held) {
    held.until = until;
    return;
  }
  const timer = setInterval(() => {
    take().then(
      () => {
        const h = leases.get(key);
        if (h) h.until = Date.now() + LEASE_TTL_MS;
      },
      () => undefined, // the next write re-checks and fails if the lease was lost
    );
  }, LEASE_TTL_MS / 3);
  timer.unref();
  leases.set(key, { timer, until });
}

/** Stop renewing (the lease then goes stale after its ttl; this machine may still write). */
export function dropLease(dir: string): void {
  const key = path.resolve(dir);
  const h = leases.get(key);
  if (h) clearInterval(h.timer);
  leases.delete(key);
}

/** The configuration copied into a cache directory. */
export function loadRemoteConfig(dir: string): {
  id: string;
  format: number;
  chunkSize: number;
  pageSpan: number;
  hash: string;
  compression: unknown;
  created: string;
} {
  return JSON.parse(fs.readFileSync(path.join(dir, CONFIG_KEY), 'utf8')) as ReturnType<
    typeof loadRemoteConfig
  >;
}
