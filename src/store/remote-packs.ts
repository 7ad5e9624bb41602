/**
 * Reading packs from object storage (FORMAT.md, "Repositories on object storage"): ranged GETs of
 * fixed-size blocks of a pack (`blockSize`, default 1 MiB, aligned to the pack's start), kept in an
 * on-disk cache bounded by bytes (`chunk-cache/` of the cache directory, `BKFS_CACHE_SIZE`,
 * default 2 GiB), and a sequential read-ahead: when a read continues where the previous read of
 * the same pack ended (a restore, `dd` of a mounted disk), the next `readAhead` blocks are fetched
 * in parallel before they are asked for, so many GETs are in flight at once.
 *
 * Nothing here checks content: the bytes returned are the object's, and the caller (ChunkLoader,
 * verify, gc) checks the chunk hash, so a damaged object or a damaged cache file reads as
 * DATA_DAMAGED, never as other bytes. Cache files are written to a temporary name and renamed, so a
 * crash never leaves a half block under a block's name. Several processes may share the cache:
 * each evicts by its own view of it; a block deleted under another reader is fetched again.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BkfsError, isBkfsError } from '../errors';
import type { ObjectStore } from './objstore';
import { packKey } from './location';

export const DEFAULT_BLOCK = 1 << 20;
export const DEFAULT_CACHE_SIZE = 2 * 1024 ** 3;

/** Parse a size such as 512M, 2G, 1048576 (bytes). */
export function parseSize(s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(s.trim());
  if (!m) return undefined;
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2]!.toLowerCase()] ?? 1;
  return Math.floor(Number(m[1]) * mult);
}

export interface RemoteStats {
  gets: number;
  bytesFetched: number;
  cacheHits: number;
}

export class RemotePacks {
  private readonly inflight = new Map<string, Promise<Buffer>>();
  /** Cache files this process knows, oldest use first (insertion order of a Map). */
  private readonly known = new Map<string, number>();
  private knownBytes = 0;
  private scanned = false;
  /** Per pack: the block after the last one read (to recognise sequential reads). */
  private readonly nextBlock = new Map<string, number>();
  readonly stats: RemoteStats = { gets: 0, bytesFetched: 0, cacheHits: 0 };

  constructor(
    private readonly store: ObjectStore,
    private readonly cacheDir: string,
    private readonly packSize: (name: string) => number | undefined,
    private readonly blockSize = DEFAULT_BLOCK,
    private readonly maxBytes = Number(process.env.BKFS_CACHE_SIZE ?? DEFAULT_CACHE_SIZE),
    private readonly readAhead = Number(process.env.BKFS_READ_AHEAD ?? 16),
  ) {}

  async read(name: string, offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    const size = await this.sizeOf(name);
    if (offset + length > size) {
      throw new BkfsError('DATA_DAMAGED', `pack ${name} is truncated at ${offset}`);
    }
    const seq = this.nextBlock.get(name);
    this.nextBlock.set(name, last + 1);
    if (seq !== undefined && first <= seq && seq <= last + 1) {
      const end = Math.min(last + this.readAhead, Math.ceil(size / this.blockSize) - 1);
      for (let b = last + 1; b <= end; b++) this.block(name, b, size).catch(() => undefined);
    }
    if (first === last) {
      // One block (most reads): from the cache file, only the bytes asked for.
      const start = offset - first * this.blockSize;
      const hit = await this.readCached(name, first, size, start, length);
      if (hit) return hit;
    }
    const parts = await Promise.all(
      Array.from({ length: last - first + 1 }, (_, i) => this.block(name, first + i, size)),
    );
    const all = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const start = offset - first * this.blockSize;
    return Buffer.from(all.subarray(start, start + length));
  }

  /** `length` bytes at `start` of a cached block, or null when it is not cached (whole). */
  private async readCached(
    name: string,
    b: number,
    size: number,
    start: number,
    length: number,
  ): Promise<Buffer | null> {
    if (this.inflight.has(`${name}.${b}`)) return null;
    const want = Math.min(this.blockSize, size - b * this.blockSize);
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.file(name, b), 'r');
    } catch {
      return null;
    }
    try {
      if ((await fh.stat()).size !== want) return null;
      const buf = Buffer.allocUnsafe(length);
      const { bytesRead } = await fh.read(buf, 0, length, start);
      if (bytesRead !== length) return null;
      this.stats.cacheHits++;
      this.touch(`${name.slice(0, 2)}/${name}.${b}`, want);
      return buf;
    } finally {
      await fh.close();
    }
  }

  private sizes = new Map<string, number>();

  private async sizeOf(name: string): Promise<number> {
    const known = this.sizes.get(name) ?? this.packSize(name);
    if (known !== undefined) return known;
    const h = await this.store.head(packKey(name));
    if (!h) throw new BkfsError('DATA_DAMAGED', `pack ${name} is missing from ${this.store.location}`);
    this.sizes.set(name, h.size);
    return h.size;
  }

  private file(name: string, b: number): string {
    return path.join(this.cacheDir, name.slice(0, 2), `${name}.${b}`);
  }

  private block(name: string, b: number, size: number): Promise<Buffer> {
    const key = `${name}.${b}`;
    let p = this.inflight.get(key);
    if (!p) {
      p = this.loadBlock(name, b, size).finally(() => this.inflight.delete(key));
      this.inflight.set(key, p);
    }
    return p;
  }

  private async loadBlock(name: string, b: number, size: number): Promise<Buffer> {
    const f = this.file(name, b);
    const want = Math.min(this.blockSize, size - b * this.blockSize);
    try {
      const buf = await fsp.readFile(f);
      if (buf.length === want) {
        this.stats.cacheHits++;
        this.touch(`${name.slice(0, 2)}/${name}.${b}`, buf.length);
        return buf;
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    let buf: Buffer;
    try {
      buf = await this.store.getRange(packKey(name), b * this.blockSize, want);
    } catch (e) {
      if (isBkfsError(e) && e.code === 'NOT_FOUND') {
        throw new BkfsError('DATA_DAMAGED', `pack ${name} is missing from ${this.store.location}`);
      }
      throw e;
    }
    this.stats.gets++;
    this.stats.bytesFetched += buf.length;
    await this.save(f, `${name.slice(0, 2)}/${name}.${b}`, buf).catch(() => undefined); // a full disk: serve uncached
    return buf;
  }

  private async save(f: string, rel: string, buf: Buffer): Promise<void> {
    if (this.maxBytes <= 0) return;
    this.scan();
    await fsp.mkdir(path.dirname(f), { recursive: true, mode: 0o700 });
    const tmp = `${f}.${randomBytes(4).toString('hex')}.tmp`;
    await fsp.writeFile(tmp, buf, { mode: 0o600, flag: 'wx' });
    await fsp.rename(tmp, f);
    this.touch(rel, buf.length);
    this.evict();
  }

  private touch(rel: string, size: number): void {
    const old = this.known.get(rel);
    if (old !== undefined) {
      this.known.delete(rel);
      this.knownBytes -= old;
    }
    this.known.set(rel, size);
    this.knownBytes += size;
  }

  /** Learn what the cache holds already (oldest first by mtime), once. */
  private scan(): void {
    if (this.scanned) return;
    this.scanned = true;
    const found: { rel: string; size: number; t: number }[] = [];
    let subs: string[] = [];
    try {
      subs = fs.readdirSync(this.cacheDir);
    } catch {
      return;
    }
    for (const sd of subs) {
      let names: string[] = [];
      try {
        names = fs.readdirSync(path.join(this.cacheDir, sd));
      } catch {
        continue;
      }
      for (const n of names) {
        try {
          const st = fs.statSync(path.join(this.cacheDir, sd, n));
          if (n.endsWith('.tmp')) {
            if (Date.now() - st.mtimeMs > 3600_000)
              fs.rmSync(path.join(this.cacheDir, sd, n), { force: true });
            continue;
          }
          found.push({ rel: `${sd}/${n}`, size: st.size, t: st.mtimeMs });
        } catch {
          // removed meanwhile
        }
      }
    }
    found.sort((a, b) => a.t - b.t);
    for (const x of found) if (!this.known.has(x.rel)) this.touch(x.rel, x.size);
  }

  private evict(): void {
    for (const [rel, size] of this.known) {
      if (this.knownBytes <= this.maxBytes) break;
      this.known.delete(rel);
      this.knownBytes -= size;
      fs.rm(path.join(this.cacheDir, ...rel.split('/')), { force: true }, () => undefined);
    }
  }

  /** Forget cached blocks of a pack (gc deleted it). */
  dropPack(name: string): void {
    const prefix = `${name.slice(0, 2)}/${name}.`;
    for (const [rel, size] of [...this.known]) {
      if (rel.startsWith(prefix)) {
        this.known.delete(rel);
        this.knownBytes -= size;
      }
    }
    const d = path.join(this.cacheDir, name.slice(0, 2));
    try {
      for (const n of fs.readdirSync(d)) {
        if (n.startsWith(`${name}.`)) fs.rmSync(path.join(d, n), { force: true });
      }
    } catch {
      // nothing cached
    }
  }
}
