/**
 * Where a repository's files live: one small interface with two implementations, a local
 * directory (`LocalStore`, here) and an S3-compatible bucket (`S3Store`, `s3store.ts`).
 *
 * The model is an object store's, because that is the weaker of the two: objects are written
 * whole and never changed (packs, manifests, configuration, index snapshots), read whole or by
 * byte range, listed by key prefix, and deleted. The one extra is a conditional create
 * (`ifAbsent`) for the few objects whose first writer must win (configuration, leases): S3's
 * `If-None-Match: *`, a `link(2)` locally.
 *
 * Keys are relative, '/'-separated, made of [A-Za-z0-9._-] segments, never '.' or '..' — a key
 * can never name anything outside the store, whoever chose it.
 *
 * Durability: `put` resolves only when the object is durable (locally: data fsynced before the
 * rename/link, directory fsynced after; S3: the PUT returned 200, which RGW and AWS acknowledge
 * after the write is durable). `delete` resolves when the objects are gone (locally the directory
 * is fsynced). What must be durable before what (packs before the index names them, and so on) is
 * the callers' business and is written down in FORMAT.md.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BkfsError } from '../errors';
import { fsyncDirSync } from '../util/private-fs';

export interface ObjectInfo {
  key: string;
  size: number;
}

export interface PutOptions {
  /** Fail with TARGET_EXISTS instead of replacing an existing object (first writer wins). */
  ifAbsent?: boolean;
}

export interface ObjectStore {
  /** 'local' or 's3'. */
  readonly kind: 'local' | 's3';
  /** Where it is, for messages: a directory path or s3://bucket/prefix. */
  readonly location: string;
  put(key: string, data: Buffer, opts?: PutOptions): Promise<void>;
  /** Upload a local file as one object (multipart on S3 for large files). */
  putFile(key: string, file: string, opts?: PutOptions): Promise<void>;
  /** The whole object; NOT_FOUND if it does not exist. */
  get(key: string): Promise<Buffer>;
  /** `length` bytes at `offset`; DATA_DAMAGED if the object is shorter, NOT_FOUND if missing. */
  getRange(key: string, offset: number, length: number): Promise<Buffer>;
  /** Size of an object, or null if it does not exist. */
  head(key: string): Promise<ObjectInfo | null>;
  /** Every object whose key starts with `prefix`, in key order. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  /** Delete objects; missing ones are not an error. */
  delete(keys: string[]): Promise<void>;
  close(): Promise<void>;
}

const SEGMENT = /^[A-Za-z0-9._-]+$/;

/** Throws unless `key` is a safe relative key (see the top of this file). */
export function checkKey(key: string): void {
  const parts = key.split('/');
  if (
    key.length === 0 ||
    key.length > 1024 ||
    parts.some((p) => !SEGMENT.test(p) || p === '.' || p === '..')
  ) {
    throw new BkfsError('USAGE', `invalid object key '${key.slice(0, 200)}'`);
  }
}

/** A prefix for `list`: empty, or a key, or a key followed by '/'. */
function checkPrefix(prefix: string): void {
  if (prefix === '') return;
  checkKey(prefix.endsWith('/') ? prefix.slice(0, -1) : prefix);
}

/** The local directory implementation. */
export class LocalStore implements ObjectStore {
  readonly kind = 'local' as const;
  readonly location: string;

  constructor(private readonly root: string) {
    this.location = root;
  }

  private file(key: string): string {
    checkKey(key);
    return path.join(this.root, ...key.split('/'));
  }

  async put(key: string, data: Buffer, opts: PutOptions = {}): Promise<void> {
    const dest = this.file(key);
    await this.commit(dest, key, opts, async (tmp) => {
      const fh = await fsp.open(tmp, 'wx', 0o600);
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
    });
  }

  async putFile(key: string, file: string, opts: PutOptions = {}): Promise<void> {
    const dest = this.file(key);
    await this.commit(dest, key, opts, async (tmp) => {
      await fsp.copyFile(file, tmp, fs.constants.COPYFILE_EXCL);
      await fsp.chmod(tmp, 0o600);
      const fh = await fsp.open(tmp, 'r+');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    });
  }

  /** Write a temporary sibling with `write`, then rename (or link, for ifAbsent) it into place. */
  private async commit(
    dest: string,
    key: string,
    opts: PutOptions,
    write: (tmp: string) => Promise<void>,
  ): Promise<void> {
    const dir = path.dirname(dest);
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = path.join(dir, `.${path.basename(dest)}.${randomBytes(6).toString('hex')}.tmp`);
    try {
      await write(tmp);
      if (opts.ifAbsent) {
        try {
          await fsp.link(tmp, dest);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
            throw new BkfsError('TARGET_EXISTS', `object ${key} exists already in ${this.location}`);
          }
          throw e;
        }
        await fsp.unlink(tmp);
      } else {
        await fsp.rename(tmp, dest);
      }
      fsyncDirSync(dir);
    } catch (e) {
      await fsp.rm(tmp, { force: true });
      throw e;
    }
  }

  async get(key: string): Promise<Buffer> {
    try {
      return await fsp.readFile(this.file(key));
    } catch (e) {
      throw this.missing(e, key);
    }
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.file(key), 'r');
    } catch (e) {
      throw this.missing(e, key);
    }
    try {
      const buf = Buffer.allocUnsafe(length);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      if (got < length) {
        throw new BkfsError(
          'DATA_DAMAGED',
          `object ${key} ends before byte ${offset + length} (short by ${length - got} bytes)`,
        );
      }
      return buf;
    } finally {
      await fh.close();
    }
  }

  async head(key: string): Promise<ObjectInfo | null> {
    try {
      const st = await fsp.stat(this.file(key));
      return st.isFile() ? { key, size: st.size } : null;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return null;
      throw e;
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    checkPrefix(prefix);
    // Walk only the directories the prefix can be in: its directory part.
    const slash = prefix.lastIndexOf('/');
    const base = slash < 0 ? '' : prefix.slice(0, slash);
    const out: ObjectInfo[] = [];
    const walk = async (rel: string): Promise<void> => {
      let entries: fs.Dirent[];
      try {
        entries = await fsp.readdir(rel ? path.join(this.root, ...rel.split('/')) : this.root, {
          withFileTypes: true,
        });
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOENT' || code === 'ENOTDIR') return;
        if (code === 'EACCES' || code === 'EPERM') {
          throw new BkfsError(
            'PERMISSION_DENIED',
            `permission denied: cannot list ${path.join(this.root, ...(rel ? rel.split('/') : []))}`,
          );
        }
        throw e;
      }
      for (const e of entries) {
        if (!SEGMENT.test(e.name) || e.name.startsWith('.')) continue; // temporaries, foreign names
        const key = rel ? `${rel}/${e.name}` : e.name;
        if (e.isDirectory()) {
          if (prefix.startsWith(`${key}/`) || key.startsWith(prefix)) await walk(key);
        } else if (e.isFile() && key.startsWith(prefix)) {
          try {
            const st = await fsp.stat(path.join(this.root, ...key.split('/')));
            out.push({ key, size: st.size });
          } catch (err) {
            // Deleted between readdir and stat (a gc beside this listing): not there any more.
            if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
          }
        }
      }
    };
    await walk(base);
    out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    yield* out;
  }

  async delete(keys: string[]): Promise<void> {
    const dirs = new Set<string>();
    for (const key of keys) {
      const f = this.file(key);
      await fsp.rm(f, { force: true });
      dirs.add(path.dirname(f));
    }
    for (const d of dirs) {
      try {
        fsyncDirSync(d);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
    }
  }

  async close(): Promise<void> {
    // Nothing held open.
  }

  private missing(e: unknown, key: string): unknown {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      return new BkfsError('NOT_FOUND', `object ${key} is not in ${this.location}`);
    }
    return e;
  }
}
