/**
 * FUSE binding: `fuseOps(vfs)` translates fuse-native's callback operations into `CheckpointVfs`
 * calls and errno codes (unit-tested without mounting), and `mountFuse` mounts them.
 *
 * fuse-native (libfuse 2, high-level path API, multi-threaded loop): each kernel request waits on
 * a libfuse thread while the JS thread runs the handler, so every handler returns quickly and
 * reads run concurrently as promises. Options, chosen for immutable checkpoints:
 *   - `timeout: false`: no per-request watchdog (a cold read of a damaged pack may take long);
 *   - read-only at the kernel: `ro` goes into the mount options (through the fsname option, which
 *     is the only free-text option fuse-native passes on), so writes, truncate, chmod, create...
 *     fail with EROFS before reaching us; the handlers below answer EROFS as well;
 *   - checkpoint mode: `kernel_cache` and hour-long attribute/entry timeouts (nothing changes);
 *     tree mode: `auto_cache` (a name could come back as a different checkpoint after forget) and
 *     short timeouts, so new checkpoints show up at once;
 *   - `default_permissions` (the kernel checks the mode bits) and, as root, `allow_other`.
 * Memory: nothing beyond the VFS; the kernel's request buffers are filled in place.
 */
import { constants as osConstants } from 'node:os';
import { BkfsError, errorMessage } from '../errors';
import { CheckpointVfs, errnoOf, FsError, type NodeAttr } from './vfs';
import { FUSE_SUBTYPE } from './state';

type Cb = (code: number, ...rest: unknown[]) => void;

/** fuse-native's stat object (times in ms). */
export interface FuseStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  nlink: number;
  mtime: number;
  atime: number;
  ctime: number;
  blksize: number;
  blocks: number;
}

export interface FuseOps {
  init(cb: Cb): void;
  getattr(path: string, cb: Cb): void;
  readdir(path: string, cb: Cb): void;
  readlink(path: string, cb: Cb): void;
  open(path: string, flags: number, cb: Cb): void;
  read(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: Cb): void;
  release(path: string, fd: number, cb: Cb): void;
  statfs(path: string, cb: Cb): void;
  [writeOp: string]: (...args: never[]) => void;
}

/** Operations that would change something: all answer EROFS. */
export const WRITE_OPS = [
  'write',
  'truncate',
  'ftruncate',
  'chmod',
  'chown',
  'create',
  'mknod',
  'mkdir',
  'rmdir',
  'unlink',
  'rename',
  'link',
  'symlink',
  'utimens',
  'setxattr',
  'removexattr',
] as const;

const E = osConstants.errno;

export function toFuseStat(a: NodeAttr): FuseStat {
  return {
    mode: a.mode,
    uid: a.uid,
    gid: a.gid,
    size: a.size,
    nlink: a.nlink,
    mtime: a.mtime,
    atime: a.mtime,
    ctime: a.mtime,
    blksize: 4096,
    blocks: Math.ceil(a.size / 512),
  };
}

/**
 * The fuse-native operations over a VFS. `onError` hears about failures that are not plain
 * filesystem answers (ENOENT etc.), i.e. bugs or I/O trouble worth a log line.
 */
export function fuseOps(vfs: CheckpointVfs, onError: (msg: string) => void = () => undefined): FuseOps {
  const fail = (cb: Cb, op: string, path: string, e: unknown): void => {
    if (!(e instanceof FsError)) onError(`${op} ${path}: ${errorMessage(e)}`);
    cb(-errnoOf(e));
  };
  const ops: FuseOps = {
    init: (cb) => cb(0),
    getattr: (path, cb) => {
      try {
        cb(0, toFuseStat(vfs.getattr(path)));
      } catch (e) {
        fail(cb, 'getattr', path, e);
      }
    },
    readdir: (path, cb) => {
      try {
        const entries = vfs.readdir(path);
        const self = toFuseStat(vfs.getattr(path));
        const names = ['.', '..', ...entries.map((x) => x.name)];
        const stats = [self, self, ...entries.map((x) => toFuseStat(x.attr))];
        cb(0, names, stats);
      } catch (e) {
        fail(cb, 'readdir', path, e);
      }
    },
    readlink: (path, cb) => {
      try {
        cb(0, vfs.readlink(path));
      } catch (e) {
        fail(cb, 'readlink', path, e);
      }
    },
    open: (path, flags, cb) => {
      try {
        cb(0, vfs.open(path, flags));
      } catch (e) {
        fail(cb, 'open', path, e);
      }
    },
    read: (path, fd, buf, len, pos, cb) => {
      // `buf` is the kernel request's memory: fill it before cb, never touch it after.
      vfs
        .read(fd, pos, buf.length > len ? buf.subarray(0, len) : buf)
        .then(
          (n) => cb(n),
          (e: unknown) => fail(cb, 'read', path, e),
        )
        .catch((e: unknown) => {
          // fail() itself threw: still answer, never leave an unhandled rejection
          onError(`read ${path}: ${errorMessage(e)}`);
          cb(-E.EIO);
        });
    },
    release: (_path, fd, cb) => {
      vfs.release(fd);
      cb(0);
    },
    statfs: (_path, cb) => {
      const s = vfs.statfs();
      cb(0, {
        bsize: s.bsize,
        frsize: s.bsize,
        blocks: s.blocks,
        bfree: 0,
        bavail: 0,
        files: s.files,
        ffree: 0,
        favail: 0,
        fsid: 0,
        flag: 1, // ST_RDONLY
        namemax: s.namemax,
      });
    },
  };
  for (const name of WRITE_OPS) {
    ops[name] = (...args: unknown[]) => (args[args.length - 1] as Cb)(-E.EROFS);
  }
  return guardOps(ops, onError);
}

/**
 * Every handler answers exactly once, whatever happens inside it: an exception thrown by a handler
 * (or by its callback's argument conversion) becomes EIO for that request and a log line, never an
 * uncaught exception that kills the daemon into a stale mount, and never an unanswered request.
 */
export function guardOps(ops: FuseOps, onError: (msg: string) => void): FuseOps {
  const out: Record<string, (...args: never[]) => void> = {};
  for (const [name, fn] of Object.entries(ops)) {
    if (typeof fn !== 'function') continue;
    out[name] = (...args: unknown[]) => {
      const cb = args[args.length - 1] as Cb;
      let answered = false;
      const once: Cb = (...r: unknown[]) => {
        if (answered) return;
        answered = true;
        (cb as (...a: unknown[]) => void)(...r);
      };
      args[args.length - 1] = once;
      try {
        (fn as (...a: unknown[]) => void)(...args);
      } catch (e) {
        try {
          onError(`${name} ${typeof args[0] === 'string' ? args[0] : ''}: ${errorMessage(e)}`);
        } catch {
          // logging must not take the daemon down either
        }
        if (!answered) {
          answered = true;
          (cb as (...a: unknown[]) => void)(-E.EIO);
        }
      }
    };
  }
  return out as unknown as FuseOps;
}

export interface MountOptions {
  /** Let other users (and root's loop devices) in: needs root or user_allow_other. */
  allowOther: boolean;
  /** Log hook for unexpected handler failures. */
  onError?: (msg: string) => void;
  debug?: boolean;
}

export interface FuseMount {
  readonly mountpoint: string;
}

interface FuseInstance {
  mount(cb: (err: Error | null) => void): void;
}
type FuseConstructor = new (mnt: string, ops: FuseOps, opts: Record<string, unknown>) => FuseInstance;

function sourceName(vfs: CheckpointVfs): string {
  const cp = vfs.checkpoint;
  return cp ? `${cp.vm.name}@${cp.checkpoint.name}` : 'repository';
}

function loadFuse(): FuseConstructor {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require('fuse-native') as FuseConstructor;
  } catch (e) {
    throw new BkfsError(
      'MOUNT_FAILED',
      `cannot load fuse-native (is libfuse2 installed? run scripts/setup.sh): ${errorMessage(e)}`,
    );
  }
}

/**
 * Mount `vfs` on `mountpoint` (an empty directory; callers check). Resolves once the kernel has
 * initialised the connection, i.e. the mount is usable. Taking it down is `fusermount -u` (see
 * state.ts); the process that called this must then exit, since fuse-native keeps a handle open.
 */
export function mountFuse(vfs: CheckpointVfs, mountpoint: string, opts: MountOptions): Promise<FuseMount> {
  const Fuse = loadFuse();
  const tree = vfs.mode === 'tree';
  const fuse = new Fuse(mountpoint, fuseOps(vfs, opts.onError), {
    timeout: false,
    force: false,
    mkdir: false,
    // fuse-native passes only known options; `fsname` is free text, so `ro` rides along with it.
    // The source shown by mount/df: bkfs:VM@CP or bkfs:repository (names are option-safe).
    fsname: `${FUSE_SUBTYPE}:${sourceName(vfs)},ro`,
    subtype: FUSE_SUBTYPE,
    allowOther: opts.allowOther,
    defaultPermissions: true,
    kernelCache: !tree,
    autoCache: tree,
    attrTimeout: tree ? 1 : 3600,
    entryTimeout: tree ? 1 : 3600,
    debug: opts.debug ?? false,
  });
  return new Promise((resolve, reject) => {
    fuse.mount((err) => {
      if (err) {
        reject(new BkfsError('MOUNT_FAILED', `cannot mount on ${mountpoint}: ${errorMessage(err)}`));
        return;
      }
      resolve({ mountpoint });
    });
  });
}
