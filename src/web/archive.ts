/**
 * A guest folder as a streamed `.zip` (yazl) or `.tar.gz` (tar-stream + zlib): entries are written
 * one after the other as the engine reads them; nothing is built in memory or on disk first (memory:
 * the folder's listing plus stream buffers). Symlinks are stored as symlinks (their target as
 * written in the guest, never followed); devices, FIFOs and sockets are left out.
 */
import { PassThrough, type Readable, type Writable } from 'node:stream';
import * as zlib from 'node:zlib';
import * as tar from 'tar-stream';
import * as yazl from 'yazl';
import type { FilesEngine } from '../files/engine';
import type { FileEntry } from '../files/tree';

export type ArchiveFormat = 'zip' | 'tar.gz';

const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;

/** Archive member name of `p` below `root`, under the top folder `top`. */
export function memberName(root: string, p: string, top: string): string {
  const r = root.replace(/\/+$/, '');
  const q = p.replace(/\/{2,}/g, '/');
  if (q !== r && !q.startsWith(`${r}/`)) throw new Error(`${p} is not below ${root}`);
  const rel = q.slice(r.length).replace(/^\/+/, '');
  return rel === '' ? top : `${top}/${rel}`;
}

/** The folder's archive name: its base name, `root` for `/`; only safe characters. */
export function archiveTop(guestPath: string): string {
  const base = guestPath === '/' ? 'root' : guestPath.slice(guestPath.lastIndexOf('/') + 1);
  return base.replace(/[^A-Za-z0-9._+-]/g, '_').replace(/^\.+/, '_') || 'folder';
}

export interface ArchiveSource {
  engine: FilesEngine;
  /** Resolved guest path of the folder. */
  root: string;
  top: string;
  self: FileEntry;
  entries: FileEntry[];
}

/**
 * Start writing the archive; returns the stream to send and a promise that settles when every
 * entry was read (rejects on the first failure, after which the stream is destroyed).
 */
export function archiveStream(
  src: ArchiveSource,
  format: ArchiveFormat,
): { stream: Readable; done: Promise<void> } {
  return format === 'zip' ? zipStream(src) : tarGzStream(src);
}

function mtime(e: FileEntry): Date {
  return new Date(e.mtimeSec * 1000);
}

function zipStream(src: ArchiveSource): { stream: Readable; done: Promise<void> } {
  const zip = new yazl.ZipFile();
  const out = new PassThrough();
  zip.outputStream.on('error', (e: Error) => out.destroy(e));
  zip.outputStream.pipe(out);
  const done = (async () => {
    zip.addEmptyDirectory(src.top, { mtime: mtime(src.self), mode: S_IFDIR | src.self.mode });
    for (const e of src.entries) {
      if (out.destroyed) throw new Error('the download was cancelled');
      const name = memberName(src.root, e.path, src.top);
      const opts = { mtime: mtime(e), mode: 0 };
      if (e.kind === 'dir') {
        zip.addEmptyDirectory(name, { ...opts, mode: S_IFDIR | e.mode });
      } else if (e.kind === 'symlink') {
        zip.addBuffer(Buffer.from(e.target ?? '', 'utf8'), name, {
          ...opts,
          mode: S_IFLNK | 0o777,
          compress: false,
        });
      } else if (e.kind === 'file') {
        const pt = new PassThrough({ highWaterMark: 1 << 20 });
        zip.addReadStream(pt, name, { ...opts, mode: S_IFREG | e.mode, size: e.size });
        await src.engine.catTo(e.path, pt);
        pt.end();
      }
    }
    zip.end();
  })();
  done.catch((e: unknown) => out.destroy(e as Error));
  return { stream: out, done };
}

function tarGzStream(src: ArchiveSource): { stream: Readable; done: Promise<void> } {
  const pack = tar.pack();
  const gz = zlib.createGzip();
  const out = new PassThrough();
  pack.on('error', (e: Error) => out.destroy(e));
  gz.on('error', (e: Error) => out.destroy(e));
  pack.pipe(gz).pipe(out);
  const header = (e: FileEntry, name: string) => ({
    name,
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    mtime: mtime(e),
  });
  const done = (async () => {
    pack.entry({ ...header(src.self, src.top), type: 'directory' });
    for (const e of src.entries) {
      if (out.destroyed) throw new Error('the download was cancelled');
      const name = memberName(src.root, e.path, src.top);
      if (e.kind === 'dir') pack.entry({ ...header(e, name), type: 'directory' });
      else if (e.kind === 'symlink')
        pack.entry({ ...header(e, name), type: 'symlink', linkname: e.target ?? '' });
      else if (e.kind === 'file') {
        await new Promise<void>((resolve, reject) => {
          const entry = pack.entry({ ...header(e, name), type: 'file', size: e.size }, (err) =>
            err ? reject(err) : resolve(),
          );
          // tar-stream's entries are streamx streams: fed through a Node stream's pipe (drain aware).
          const pt = new PassThrough({ highWaterMark: 1 << 20 });
          pt.pipe(entry as unknown as Writable);
          src.engine.catTo(e.path, pt).then(
            () => pt.end(),
            (err: unknown) => {
              pt.destroy(err as Error);
              reject(err as Error);
            },
          );
        });
      }
    }
    pack.finalize();
  })();
  done.catch((e: unknown) => out.destroy(e as Error));
  return { stream: out, done };
}
