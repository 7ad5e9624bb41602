/**
 * powerfs: a power-loss file system for tests, in the spirit of LazyFS.
 *
 * A FUSE passthrough (fuse-native, libfuse 2) over a backing directory. Every operation is done on
 * the backing directory at once (the "page cache" view that running processes see), and powerfs
 * also keeps the DURABLE state, i.e. what a disk would hold if the power failed now, following the
 * POSIX rules a crashed kernel follows (the strict model, as LazyFS's default):
 *   - a file's content is durable as of its last fsync/fdatasync; writes and truncations since
 *     then are lost (a file created and never fsynced comes back empty, if its name survives);
 *   - a directory's entries are durable as of its last fsync; every create, mkdir, rename (in
 *     either directory), unlink and rmdir since then is undone (a renamed-away or unlinked file
 *     comes back under its old name with its durable content; a new name disappears).
 * `cut()` applies that: the backing directory is rewritten to exactly the durable state. Every
 * fsync boundary is counted, as is every mutating operation, so a test can have the power fail
 * when the N-th fsync (or N-th mutating operation) arrives: from that moment every operation
 * fails with EIO and changes nothing (the machine is off), the test SIGKILLs its process, and then
 * cuts.
 *
 * Data model: every file and directory gets an id. Files: `durable` is 'live' (the backing file is
 * durable as is), 'shadow' (a copy of the durable content taken before the first change since the
 * last fsync, in the shadow directory next to the backing directory) or 'absent' (never fsynced:
 * empty). Directories: `live` entries (name -> id) and `durable` entries (undefined = same as
 * live; a snapshot taken before the first change since the last directory fsync).
 * Metadata (mode, times, owner) is passed through and not modelled. Hard links and symlinks are
 * not supported (bkfs does not use them).
 *
 * SQLite's `-shm` is mmap'd: fuse-native does not set direct_io, so the kernel's page cache backs
 * MAP_SHARED mappings and writes them back through `write` (coherent for every process on this
 * mount). Its content after a cut does not matter: the first SQLite connection re-initialises it.
 * POSIX locks are not implemented here, so the kernel handles them locally (one host).
 * `hard_remove` makes unlink of an open file a real unlink (no `.fuse_hidden` renames).
 *
 * The daemon runs in its own process (`startPowerFs` forks this file) so that the test process
 * can use the mount with synchronous calls without deadlocking the FUSE loop.
 */
import { execFile, fork, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

type Durable = { kind: 'live' } | { kind: 'shadow'; file: string } | { kind: 'absent' };

interface Node {
  id: number;
  dir: boolean;
  /** Live location; parent undefined once unlinked. */
  parent?: Node;
  name: string;
  mode: number;
  durable: Durable;
  /** Directories: live entries. */
  live?: Map<string, Node>;
  /** Directories: durable entries; undefined = same as live. */
  durableEntries?: Map<string, Node>;
}

export interface PowerFsStats {
  /** fsync + fdatasync + directory fsync requests seen. */
  fsyncs: number;
  /** Mutating requests seen (writes, truncations, creates, renames, unlinks, mkdir, rmdir, fsyncs). */
  ops: number;
  /** True once the power is off. */
  dead: boolean;
}

export interface CutPlan {
  /** Power fails when the N-th fsync request arrives (before it takes effect). */
  atFsync?: number;
  /** Power fails when the N-th mutating request arrives (before it takes effect). */
  atOp?: number;
  /**
   * Also a state a crashed kernel can leave: the file system's journal committed every directory
   * change (create, rename, unlink) made so far, but file data is still only what was fsynced
   * (e.g. ext4 commits metadata every few seconds, whatever the application fsynced). Default:
   * the strict state (directory changes since the directory's last fsync are lost too).
   */
  keepDirOps?: boolean;
}

const EIO = -5;
const ENOENT = -2;
const EEXIST = -17;
const EPERM = -1;

function errno(e: unknown): number {
  const n = (e as NodeJS.ErrnoException).errno;
  return typeof n === 'number' ? (n > 0 ? -n : n) : EIO;
}

/** The durable-state model and the passthrough operations (runs in the daemon process). */
export class PowerFsModel {
  private nextId = 1;
  private readonly root: Node;
  private readonly handles = new Map<number, Node>();
  readonly stats: PowerFsStats = { fsyncs: 0, ops: 0, dead: false };
  plan: CutPlan = {};
  onDead: () => void = () => undefined;

  constructor(
    readonly backing: string,
    readonly shadow: string,
  ) {
    fs.mkdirSync(shadow, { recursive: true });
    this.root = this.scan(undefined, '', backing);
  }

  private scan(parent: Node | undefined, name: string, p: string): Node {
    const st = fs.lstatSync(p);
    const node: Node = {
      id: this.nextId++,
      dir: st.isDirectory(),
      parent,
      name,
      mode: st.mode,
      durable: { kind: 'live' },
    };
    if (node.dir) {
      node.live = new Map();
      for (const n of fs.readdirSync(p)) node.live.set(n, this.scan(node, n, path.join(p, n)));
    }
    return node;
  }

  private livePath(n: Node): string {
    const parts: string[] = [];
    for (let x: Node | undefined = n; x && x !== this.root; x = x.parent) parts.push(x.name);
    return path.join(this.backing, ...parts.reverse());
  }

  private lookup(p: string): Node | undefined {
    let n: Node | undefined = this.root;
    for (const part of p.split('/')) {
      if (part === '') continue;
      n = n?.live?.get(part);
      if (!n) return undefined;
    }
    return n;
  }

  private parentOf(p: string): { dir: Node; name: string } {
    const dir = this.lookup(path.posix.dirname(p));
    if (!dir || !dir.dir) throw Object.assign(new Error('no parent'), { errno: ENOENT });
    return { dir, name: path.posix.basename(p) };
  }

  /** Count a mutating request; true when the power is (now) off. */
  private tick(isFsync: boolean): boolean {
    if (this.stats.dead) return true;
    this.stats.ops++;
    if (isFsync) this.stats.fsyncs++;
    if (
      (isFsync && this.plan.atFsync !== undefined && this.stats.fsyncs >= this.plan.atFsync) ||
      (this.plan.atOp !== undefined && this.stats.ops >= this.plan.atOp)
    ) {
      this.stats.dead = true;
      this.onDead();
      return true;
    }
    return false;
  }

  /** Before changing a file's content: keep its durable content if the backing file holds it. */
  private cowFile(n: Node): void {
    if (n.durable.kind !== 'live') return;
    const file = path.join(this.shadow, `f${n.id}-${this.stats.ops}`);
    fs.copyFileSync(this.livePath(n), file);
    n.durable = { kind: 'shadow', file };
  }

  /** Before a file leaves the live namespace: move its durable content out of the way. */
  private detachFile(n: Node): void {
    if (n.dir || n.durable.kind !== 'live') return;
    const file = path.join(this.shadow, `f${n.id}-${this.stats.ops}`);
    fs.renameSync(this.livePath(n), file);
    n.durable = { kind: 'shadow', file };
  }

  private cowDir(d: Node): void {
    if (!d.durableEntries) d.durableEntries = new Map(d.live);
  }

  private dropShadow(n: Node): void {
    if (n.durable.kind === 'shadow') fs.rmSync(n.durable.file, { force: true });
  }

  // ----- operations (fuse-native callback style) -----

  ops(): Record<string, unknown> {
    /** A synchronous operation `fn(...args)` with fuse-native's trailing callback. */
    const wrap =
      (fn: (...a: never[]) => number | void) =>
      (...args: unknown[]): void => {
        const cb = args.pop() as (r: number) => void;
        if (this.stats.dead) return cb(EIO);
        try {
          const r = fn(...(args as never[]));
          cb(typeof r === 'number' ? r : 0);
        } catch (e) {
          cb(errno(e));
        }
      };
    const statOf = (st: fs.Stats) => ({
      mode: st.mode,
      uid: st.uid,
      gid: st.gid,
      size: st.size,
      nlink: st.nlink,
      blksize: st.blksize,
      blocks: st.blocks,
      atime: st.atime,
      mtime: st.mtime,
      ctime: st.ctime,
    });
    return {
      init: (cb: (e: number) => void) => cb(0),
      statfs: (_p: string, cb: (e: number, s?: unknown) => void) => {
        const s = fs.statfsSync(this.backing);
        cb(0, {
          bsize: s.bsize,
          frsize: s.bsize,
          blocks: s.blocks,
          bfree: s.bfree,
          bavail: s.bavail,
          files: s.files,
          ffree: s.ffree,
          favail: s.ffree,
          fsid: 0,
          flag: 0,
          namemax: 255,
        });
      },
      getattr: (p: string, cb: (e: number, s?: unknown) => void) => {
        if (this.stats.dead) return cb(EIO);
        const n = this.lookup(p);
        if (!n) return cb(ENOENT);
        try {
          cb(0, statOf(fs.lstatSync(this.livePath(n))));
        } catch (e) {
          cb(errno(e));
        }
      },
      fgetattr: (p: string, _fd: number, cb: (e: number, s?: unknown) => void) => {
        if (this.stats.dead) return cb(EIO);
        try {
          cb(0, statOf(fs.lstatSync(path.join(this.backing, p))));
        } catch (e) {
          cb(errno(e));
        }
      },
      access: (_p: string, _m: number, cb: (e: number) => void) => cb(this.stats.dead ? EIO : 0),
      readdir: (p: string, cb: (e: number, names?: string[]) => void) => {
        if (this.stats.dead) return cb(EIO);
        const n = this.lookup(p);
        if (!n?.live) return cb(ENOENT);
        cb(0, [...n.live.keys()]);
      },
      opendir: (_p: string, _f: number, cb: (e: number, fd?: number) => void) =>
        cb(this.stats.dead ? EIO : 0, 0),
      releasedir: (_p: string, _fd: number, cb: (e: number) => void) => cb(0),
      open: (p: string, flags: number, cb: (e: number, fd?: number) => void) => {
        if (this.stats.dead) return cb(EIO);
        const n = this.lookup(p);
        if (!n || n.dir) return cb(ENOENT);
        try {
          if (flags & fs.constants.O_TRUNC) {
            if (this.tick(false)) return cb(EIO);
            this.cowFile(n);
          }
          const fd = fs.openSync(
            this.livePath(n),
            flags & ~(fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_APPEND),
          );
          this.handles.set(fd, n);
          cb(0, fd);
        } catch (e) {
          cb(errno(e));
        }
      },
      create: (p: string, mode: number, cb: (e: number, fd?: number) => void) => {
        if (this.tick(false)) return cb(EIO);
        try {
          const { dir, name } = this.parentOf(p);
          let n = dir.live!.get(name);
          if (!n) {
            this.cowDir(dir);
            n = { id: this.nextId++, dir: false, parent: dir, name, mode, durable: { kind: 'absent' } };
            const fd = fs.openSync(
              path.join(this.livePath(dir), name),
              fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_RDWR,
              mode & 0o7777,
            );
            dir.live!.set(name, n);
            this.handles.set(fd, n);
            return cb(0, fd);
          }
          const fd = fs.openSync(this.livePath(n), fs.constants.O_RDWR);
          this.handles.set(fd, n);
          cb(0, fd);
        } catch (e) {
          cb(errno(e));
        }
      },
      read: (_p: string, fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
        if (this.stats.dead) return cb(EIO);
        try {
          cb(fs.readSync(fd, buf, 0, len, pos));
        } catch (e) {
          cb(errno(e));
        }
      },
      write: (_p: string, fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
        if (this.tick(false)) return cb(EIO);
        const n = this.handles.get(fd);
        try {
          if (n) this.cowFile(n);
          let done = 0;
          while (done < len) done += fs.writeSync(fd, buf, done, len - done, pos + done);
          cb(len);
        } catch (e) {
          cb(errno(e));
        }
      },
      // close() never reports the power cut (a dead machine does not return at all; the test
      // SIGKILLs the process anyway).
      flush: (_p: string, _fd: number, cb: (e: number) => void) => cb(0),
      release: (_p: string, fd: number, cb: (e: number) => void) => {
        this.handles.delete(fd);
        try {
          fs.closeSync(fd);
        } catch {
          // already closed
        }
        cb(0);
      },
      fsync: (_p: string, _datasync: boolean, fd: number, cb: (e: number) => void) => {
        if (this.tick(true)) return cb(EIO);
        const n = this.handles.get(fd);
        if (n && !n.dir) {
          this.dropShadow(n);
          n.durable = { kind: 'live' };
        }
        cb(0);
      },
      fsyncdir: (p: string, _datasync: boolean, _fd: number, cb: (e: number) => void) => {
        if (this.tick(true)) return cb(EIO);
        const n = this.lookup(p);
        if (!n?.dir) return cb(ENOENT);
        n.durableEntries = undefined;
        cb(0);
      },
      truncate: wrap((p: string, size: number) => {
        if (this.tick(false)) return EIO;
        const n = this.lookup(p);
        if (!n) return ENOENT;
        this.cowFile(n);
        fs.truncateSync(this.livePath(n), size);
      }),
      ftruncate: (_p: string, fd: number, size: number, cb: (e: number) => void) => {
        if (this.tick(false)) return cb(EIO);
        const n = this.handles.get(fd);
        try {
          if (n) this.cowFile(n);
          fs.ftruncateSync(fd, size);
          cb(0);
        } catch (e) {
          cb(errno(e));
        }
      },
      mkdir: (p: string, mode: number, cb: (e: number) => void) => {
        if (this.tick(false)) return cb(EIO);
        try {
          const { dir, name } = this.parentOf(p);
          if (dir.live!.has(name)) return cb(EEXIST);
          this.cowDir(dir);
          fs.mkdirSync(path.join(this.livePath(dir), name), mode & 0o7777);
          dir.live!.set(name, {
            id: this.nextId++,
            dir: true,
            parent: dir,
            name,
            mode,
            durable: { kind: 'absent' },
            live: new Map(),
            durableEntries: new Map(),
          });
          cb(0);
        } catch (e) {
          cb(errno(e));
        }
      },
      unlink: (p: string, cb: (e: number) => void) => this.remove(p, false, cb),
      rmdir: (p: string, cb: (e: number) => void) => this.remove(p, true, cb),
      rename: (src: string, dst: string, cb: (e: number) => void) => {
        if (this.tick(false)) return cb(EIO);
        try {
          const n = this.lookup(src);
          if (!n) return cb(ENOENT);
          const from = this.parentOf(src);
          const to = this.parentOf(dst);
          const old = to.dir.live!.get(to.name);
          if (old === n) return cb(0);
          this.cowDir(from.dir);
          this.cowDir(to.dir);
          if (old && !old.dir) this.detachFile(old);
          fs.renameSync(this.livePath(n), path.join(this.livePath(to.dir), to.name));
          if (old) old.parent = undefined;
          from.dir.live!.delete(from.name);
          to.dir.live!.set(to.name, n);
          n.parent = to.dir;
          n.name = to.name;
          cb(0);
        } catch (e) {
          cb(errno(e));
        }
      },
      chmod: wrap((p: string, mode: number) => fs.chmodSync(path.join(this.backing, p), mode)),
      chown: wrap((p: string, u: number, g: number) => fs.chownSync(path.join(this.backing, p), u, g)),
      utimens: wrap((p: string, a: number, m: number) =>
        fs.utimesSync(path.join(this.backing, p), a / 1000, m / 1000),
      ),
      link: (_a: string, _b: string, cb: (e: number) => void) => cb(EPERM),
      symlink: (_a: string, _b: string, cb: (e: number) => void) => cb(EPERM),
    };
  }

  private remove(p: string, isDir: boolean, cb: (e: number) => void): void {
    if (this.tick(false)) return cb(EIO);
    try {
      const n = this.lookup(p);
      if (!n) return cb(ENOENT);
      const { dir, name } = this.parentOf(p);
      this.cowDir(dir);
      if (isDir) fs.rmdirSync(this.livePath(n));
      else {
        this.detachFile(n);
        fs.rmSync(this.livePath(n), { force: true });
      }
      dir.live!.delete(name);
      n.parent = undefined;
      cb(0);
    } catch (e) {
      cb(errno(e));
    }
  }

  /** Make everything durable (as `sync` would). */
  syncAll(): void {
    const visit = (n: Node): void => {
      if (n.dir) {
        n.durableEntries = undefined;
        for (const c of n.live!.values()) visit(c);
      } else {
        this.dropShadow(n);
        n.durable = { kind: 'live' };
      }
    };
    visit(this.root);
  }

  /**
   * Write the durable state to `out` (a new directory on the backing file system). Called after
   * the FUSE mount is gone.
   */
  materialize(out: string, keepDirOps = false): void {
    const seen = new Set<number>();
    const walk = (d: Node, dirPath: string): void => {
      if (seen.has(d.id)) return;
      seen.add(d.id);
      for (const [name, n] of keepDirOps ? d.live! : (d.durableEntries ?? d.live!)) {
        const p = path.join(dirPath, name);
        if (n.dir) {
          fs.mkdirSync(p, { mode: 0o700 });
          walk(n, p);
          continue;
        }
        const src =
          n.durable.kind === 'live'
            ? this.livePath(n)
            : n.durable.kind === 'shadow'
              ? n.durable.file
              : undefined;
        if (src) fs.copyFileSync(src, p);
        else fs.writeFileSync(p, '');
        fs.chmodSync(p, n.mode & 0o7777);
      }
    };
    fs.mkdirSync(out, { mode: 0o700 });
    walk(this.root, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Daemon process

type ToDaemon =
  { cmd: 'arm'; plan: CutPlan } | { cmd: 'stats' } | { cmd: 'cut' } | { cmd: 'stop' } | { cmd: 'sync' };
type FromDaemon =
  | { ev: 'ready' }
  | { ev: 'error'; message: string }
  | { ev: 'dead'; stats: PowerFsStats }
  | { ev: 'stats'; stats: PowerFsStats }
  | { ev: 'done'; stats: PowerFsStats };

interface FuseLike {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
}

function daemonMain(backing: string, mnt: string): void {
  const send = (m: FromDaemon): void => {
    process.send?.(m);
  };
  const shadow = `${backing}.powerfs-shadow`;
  fs.rmSync(shadow, { recursive: true, force: true });
  const model = new PowerFsModel(backing, shadow);
  model.onDead = () => send({ ev: 'dead', stats: { ...model.stats } });
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const Fuse = require('fuse-native') as new (
    m: string,
    o: unknown,
    opts: Record<string, unknown>,
  ) => FuseLike;
  const fuse = new Fuse(mnt, model.ops(), {
    timeout: false,
    force: true,
    mkdir: false,
    // fuse-native passes only known options; `fsname` is free text, so libfuse options ride along.
    fsname: 'powerfs,hard_remove,big_writes',
    attrTimeout: 0,
    entryTimeout: 0,
  });
  const unmount = (): Promise<void> =>
    new Promise((resolve) => {
      fuse.unmount(() => resolve());
    });
  process.on('message', (m: ToDaemon) => {
    void (async () => {
      try {
        if (m.cmd === 'arm') {
          model.plan = m.plan;
          send({ ev: 'stats', stats: { ...model.stats } });
        } else if (m.cmd === 'stats') {
          send({ ev: 'stats', stats: { ...model.stats } });
        } else if (m.cmd === 'sync') {
          model.syncAll();
          send({ ev: 'stats', stats: { ...model.stats } });
        } else if (m.cmd === 'stop') {
          await unmount();
          model.syncAll();
          fs.rmSync(shadow, { recursive: true, force: true });
          send({ ev: 'done', stats: { ...model.stats } });
          process.exit(0);
        } else if (m.cmd === 'cut') {
          model.stats.dead = true;
          await unmount();
          const out = `${backing}.powerfs-durable`;
          fs.rmSync(out, { recursive: true, force: true });
          model.materialize(out, model.plan.keepDirOps === true);
          fs.rmSync(backing, { recursive: true, force: true });
          fs.renameSync(out, backing);
          fs.rmSync(shadow, { recursive: true, force: true });
          send({ ev: 'done', stats: { ...model.stats } });
          process.exit(0);
        }
      } catch (e) {
        send({ ev: 'error', message: (e as Error).stack ?? String(e) });
      }
    })();
  });
  // The test process died without stopping us: do not leave a mount behind.
  process.on('disconnect', () => {
    model.stats.dead = true;
    fuse.unmount(() => process.exit(1));
  });
  fuse.mount((err) => {
    if (err) {
      send({ ev: 'error', message: `cannot mount powerfs on ${mnt}: ${err.message}` });
      process.exit(1);
    }
    send({ ev: 'ready' });
  });
}

if (require.main === module) daemonMain(process.argv[2]!, process.argv[3]!);

// ---------------------------------------------------------------------------------------------
// Controller (test process)

export class PowerFs {
  /** Every instance started by this process (for `killAll` in a test's `after`). */
  static readonly all = new Set<PowerFs>();

  static async killAll(): Promise<void> {
    for (const p of PowerFs.all) await p.kill();
    PowerFs.all.clear();
  }

  private readonly waiters: ((m: FromDaemon) => void)[] = [];
  private deadListeners: ((s: PowerFsStats) => void)[] = [];
  /** Set once the power went off (the armed cut point was reached). */
  deadAt?: PowerFsStats;
  private exited = false;

  private constructor(
    private readonly child: ChildProcess,
    readonly backing: string,
    readonly mountpoint: string,
  ) {
    child.on('message', (m: FromDaemon) => {
      if (m.ev === 'dead') {
        this.deadAt = m.stats;
        for (const l of this.deadListeners) l(m.stats);
        this.deadListeners = [];
        return;
      }
      this.waiters.shift()?.(m);
    });
    child.on('exit', () => {
      this.exited = true;
      for (const w of this.waiters.splice(0)) w({ ev: 'error', message: 'powerfs daemon exited' });
    });
  }

  /**
   * Mount powerfs on `mountpoint` over `backing`. The backing directory's current content is the
   * initial durable state.
   */
  static async start(backing: string, mountpoint: string, plan: CutPlan = {}): Promise<PowerFs> {
    const child = fork(__filename, [backing, mountpoint], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const pfs = new PowerFs(child, backing, mountpoint);
    PowerFs.all.add(pfs);
    const m = await pfs.next();
    if (m.ev !== 'ready') {
      child.kill('SIGKILL');
      throw new Error(m.ev === 'error' ? m.message : `powerfs: unexpected ${m.ev}`);
    }
    if (plan.atFsync !== undefined || plan.atOp !== undefined || plan.keepDirOps) await pfs.arm(plan);
    return pfs;
  }

  private next(): Promise<FromDaemon> {
    return new Promise((resolve) => {
      if (this.exited) resolve({ ev: 'error', message: 'powerfs daemon exited' });
      else this.waiters.push(resolve);
    });
  }

  private async request(m: ToDaemon): Promise<PowerFsStats> {
    const p = this.next();
    this.child.send(m);
    const r = await p;
    if (r.ev === 'error') throw new Error(`powerfs: ${r.message}`);
    if (r.ev === 'ready' || r.ev === 'dead') throw new Error(`powerfs: unexpected ${r.ev}`);
    return r.stats;
  }

  arm(plan: CutPlan): Promise<PowerFsStats> {
    return this.request({ cmd: 'arm', plan });
  }

  stats(): Promise<PowerFsStats> {
    return this.request({ cmd: 'stats' });
  }

  /** Make everything durable now (like `sync`). */
  sync(): Promise<PowerFsStats> {
    return this.request({ cmd: 'sync' });
  }

  /** Resolves when the power goes off (the armed cut point is reached). */
  whenDead(): Promise<PowerFsStats> {
    if (this.deadAt) return Promise.resolve(this.deadAt);
    return new Promise((resolve) => this.deadListeners.push(resolve));
  }

  /**
   * Cut the power now (if the armed point was not reached yet): unmount, and leave the backing
   * directory in the durable state. Processes using the mount must be dead first.
   */
  async cut(): Promise<PowerFsStats> {
    const s = await this.request({ cmd: 'cut' });
    await this.waitExit();
    return s;
  }

  /** Clean shutdown: unmount, everything written is kept. */
  async stop(): Promise<PowerFsStats> {
    const s = await this.request({ cmd: 'stop' });
    await this.waitExit();
    return s;
  }

  /** Emergency cleanup (a failed test): stop the daemon and lazily unmount. */
  async kill(): Promise<void> {
    if (this.exited) return;
    this.child.kill('SIGKILL');
    await this.waitExit();
    await new Promise<void>((resolve) => {
      execFile('fusermount', ['-uz', this.mountpoint], () => resolve());
    });
  }

  get running(): boolean {
    return !this.exited;
  }

  private waitExit(): Promise<void> {
    return new Promise((resolve) => {
      if (this.exited) resolve();
      else this.child.once('exit', () => resolve());
    });
  }
}
