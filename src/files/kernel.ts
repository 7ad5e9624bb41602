/**
 * The kernel engine: the host kernel mounts the guest's filesystems read-only. For trusted guests
 * only (a crafted filesystem image reaches the host kernel's filesystem code); needs root.
 *
 * Data path: each disk of the checkpoint is an export of the session's in-process NBD server,
 * shown as a file by `nbdfuse -r` (one process per disk, in the session's private 0700 directory);
 * each partition gets a read-only loop device at its offset (`losetup -r -o OFFSET --sizelimit
 * SIZE`, bkfs' own GPT/MBR parser supplies the numbers, the kernel's partition scanning is never
 * used) and is mounted `ro,nosuid,nodev,noexec` without journal replay (`noload` for ext3/4,
 * `norecovery,nouuid` for xfs), so not a byte is written, not even to the loop device. Files are
 * read with ordinary tools (`find -printf`, `cp -a`) from the mounted tree; guest paths are resolved
 * inside the guest root by the caller (`resolve.ts`), so guest symlinks never lead to host files.
 *
 * Memory: nothing beyond the tools' own. Cleanup, on every path: unmount (deepest first), detach
 * loops, `fusermount -u` each nbdfuse mount and stop its process by PID.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { BkfsError, errorMessage } from '../errors';
import { run, stopChild, waitExit } from '../util/proc';
import {
  abortError,
  kernelDriver,
  writeChunk,
  kernelMountOptions,
  type CheckpointDrives,
  type EngineMount,
  type FilesEngine,
  type GuestStat,
  type KernelSupport,
  type MountFailure,
} from './engine';
import { resolveInRoot, type EntryKind } from './resolve';
import type { FileEntry } from './tree';
import type { Volume } from './volumes';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface DiskFile {
  child: ChildProcess;
  dir: string;
  file: string;
}

interface Mounted {
  hostDir: string;
  loop: string;
}

function kindOf(st: fs.Stats | fs.BigIntStats): EntryKind {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  return 'other';
}

/** `find -printf %T@` ("1700000000.1234567890") as seconds and nanoseconds. */
export function parseFindTime(s: string): { sec: number; nsec: number } {
  const m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(s.trim());
  if (!m) return { sec: 0, nsec: 0 };
  const neg = m[1] === '-';
  const sec = Number(m[2]);
  const nsec = Number(((m[3] ?? '') + '000000000').slice(0, 9));
  if (!neg) return { sec, nsec };
  return nsec === 0 ? { sec: -sec, nsec: 0 } : { sec: -sec - 1, nsec: 1e9 - nsec };
}

const FIND_TYPES: Record<string, EntryKind> = { f: 'file', d: 'dir', l: 'symlink' };

/** Parse `find -printf '%y\0%s\0%T@\0%m\0%U\0%G\0%l\0%P\0'` output into entries below `base`. */
export function parseFindOutput(out: Buffer, base: string): FileEntry[] {
  const fields = out.toString('utf8').split('\0');
  const entries: FileEntry[] = [];
  for (let i = 0; i + 8 <= fields.length; i += 8) {
    const [y, s, t, m, u, g, l, p] = fields.slice(i, i + 8) as [
      string,
      string,
      string,
      string,
      string,
      string,
      string,
      string,
    ];
    const time = parseFindTime(t);
    const e: FileEntry = {
      path: base === '/' ? `/${p}` : `${base}/${p}`,
      kind: FIND_TYPES[y] ?? 'other',
      size: Number(s),
      mode: parseInt(m, 8) & 0o7777,
      uid: Number(u),
      gid: Number(g),
      mtimeSec: time.sec,
      mtimeNsec: time.nsec,
    };
    if (y === 'l') e.target = l;
    entries.push(e);
  }
  return entries;
}

export class KernelEngine implements FilesEngine {
  readonly name = 'kernel' as const;
  private readonly root: string;
  private readonly disks = new Map<string, DiskFile>();
  private mounted: Mounted[] = [];
  private readonly children = new Set<ChildProcess>();

  constructor(
    private readonly work: string,
    private readonly socketPath: string,
    private readonly drives: ReadonlyMap<string, CheckpointDrives>,
    private readonly support: KernelSupport,
    private readonly signal?: AbortSignal,
  ) {
    this.root = path.join(work, 'root');
    fs.mkdirSync(this.root, { recursive: true, mode: 0o700 });
    signal?.addEventListener('abort', () => {
      for (const c of this.children) c.kill('SIGTERM');
    });
  }

  private host(guestPath: string): string {
    return guestPath === '/' ? this.root : path.join(this.root, guestPath);
  }

  async logicalVolumes(): Promise<Volume[]> {
    return [];
  }

  /** The nbdfuse file of one disk of a checkpoint, started on first use. */
  private async diskFile(checkpoint: string, disk: string): Promise<string> {
    const key = `${checkpoint}/${disk}`;
    const have = this.disks.get(key);
    if (have) return have.file;
    const d = this.drives.get(checkpoint)?.disks.find((x) => x.name === disk);
    if (!d) throw new BkfsError('NOT_FOUND', `checkpoint ${checkpoint} has no disk ${disk}`);
    const dir = path.join(this.work, 'disks', `${this.disks.size}`);
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const pidFile = `${dir}.pid`;
    const uri = `nbd+unix:///${d.exportName}?socket=${this.socketPath}`;
    const child = spawn('nbdfuse', ['-r', '-P', pidFile, path.join(dir, 'disk.raw'), uri], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const err: Buffer[] = [];
    child.stderr?.on('data', (b: Buffer) => err.push(b));
    child.on('error', () => undefined);
    const entry: DiskFile = { child, dir, file: path.join(dir, 'disk.raw') };
    this.disks.set(key, entry);
    // nbdfuse writes its PID file once the FUSE mount serves requests.
    while (!fs.existsSync(pidFile)) {
      if (child.exitCode !== null || child.signalCode !== null) {
        this.disks.delete(key);
        throw new BkfsError(
          'EXTERNAL_TOOL',
          `nbdfuse failed for ${key}: ${Buffer.concat(err).toString().trim() || 'exited'}`,
        );
      }
      await sleep(20);
    }
    return entry.file;
  }

  async mount(checkpoint: string, mounts: readonly EngineMount[]): Promise<MountFailure[]> {
    await this.unmountAll();
    const failed: MountFailure[] = [];
    for (const m of mounts) {
      const drv = kernelDriver(m.volume, this.support);
      if ('reason' in drv) {
        failed.push({ mount: m, reason: drv.reason });
        continue;
      }
      let hostDir = this.root;
      if (m.mountpoint !== '/') {
        const r = await resolveInRoot(m.mountpoint, this.resolveOps(), true);
        if (!r.ok || r.kind !== 'dir') {
          failed.push({ mount: m, reason: `mount point ${m.mountpoint} is not a directory in the guest` });
          continue;
        }
        hostDir = this.host(r.path);
      }
      const v = m.volume;
      if (v.disk === undefined) {
        failed.push({ mount: m, reason: `${v.id} is not on a disk` });
        continue;
      }
      const file = await this.diskFile(checkpoint, v.disk);
      const { stdout } = await run('losetup', [
        '--find',
        '--show',
        '--read-only',
        '--offset',
        String(v.offset),
        '--sizelimit',
        String(v.size),
        file,
      ]);
      const loop = stdout.trim();
      const opts = kernelMountOptions(v.probe?.type ?? '', m.options);
      const r = await run('mount', ['-t', drv.driver, '-o', opts.join(','), loop, hostDir], {
        allowFail: true,
      });
      if (r.code !== 0) {
        await detachLoop(loop);
        failed.push({ mount: m, reason: `mount ${v.id} (${drv.driver}) failed: ${lastLine(r.stderr)}` });
        continue;
      }
      this.mounted.push({ hostDir, loop });
    }
    return failed;
  }

  private async unmountAll(): Promise<void> {
    const errors: string[] = [];
    while (this.mounted.length > 0) {
      const m = this.mounted.pop() as Mounted;
      try {
        await unmount(m.hostDir);
        await detachLoop(m.loop);
      } catch (e) {
        errors.push(errorMessage(e));
      }
    }
    if (errors.length > 0) throw new BkfsError('MOUNT_FAILED', errors.join('; '));
  }

  private resolveOps() {
    return {
      kind: async (p: string): Promise<EntryKind | null> => (await this.lstat(p))?.kind ?? null,
      readlink: (p: string): Promise<string> => this.readlink(p),
    };
  }

  async lstat(guestPath: string): Promise<GuestStat | null> {
    let st: fs.BigIntStats;
    try {
      st = await fsp.lstat(this.host(guestPath), { bigint: true });
    } catch {
      return null;
    }
    return {
      kind: kindOf(st),
      size: Number(st.size),
      mode: Number(st.mode) & 0o7777,
      uid: Number(st.uid),
      gid: Number(st.gid),
      mtimeSec: Number(st.mtimeNs / 1_000_000_000n),
      mtimeNsec: Number(st.mtimeNs % 1_000_000_000n),
      atimeSec: Number(st.atimeNs / 1_000_000_000n),
      atimeNsec: Number(st.atimeNs % 1_000_000_000n),
    };
  }

  async lstatMany(dir: string, names: readonly string[]): Promise<Map<string, GuestStat>> {
    const out = new Map<string, GuestStat>();
    for (const n of names) {
      const st = await this.lstat(dir === '/' ? `/${n}` : `${dir}/${n}`);
      if (st) out.set(n, st);
    }
    return out;
  }

  readlink(guestPath: string): Promise<string> {
    return fsp.readlink(this.host(guestPath));
  }

  async readdir(guestPath: string): Promise<string[]> {
    return (await fsp.readdir(this.host(guestPath))).sort();
  }

  readFile(guestPath: string): Promise<Buffer> {
    return fsp.readFile(this.host(guestPath));
  }

  async walk(guestPath: string, filter?: (p: string) => boolean): Promise<FileEntry[]> {
    const fmt = '%y\\0%s\\0%T@\\0%m\\0%U\\0%G\\0%l\\0%P\\0';
    const out = await this.exec('find', ['-P', this.host(guestPath), '-mindepth', '1', '-printf', fmt]);
    const all = parseFindOutput(out, guestPath);
    return filter ? all.filter((e) => filter(e.path)) : all;
  }

  async catTo(guestPath: string, out: Writable): Promise<void> {
    const rs = fs.createReadStream(this.host(guestPath), { highWaterMark: 1 << 20 });
    try {
      for await (const chunk of rs) {
        if (this.signal?.aborted) throw abortError(this.signal);
        await writeChunk(out, chunk as Buffer);
      }
    } finally {
      rs.destroy();
    }
  }

  async copyFile(guestPath: string, hostPath: string): Promise<void> {
    await this.exec('cp', [
      '--preserve=mode,ownership,timestamps',
      '-T',
      '--',
      this.host(guestPath),
      hostPath,
    ]);
  }

  async copyTree(guestPath: string, hostDir: string): Promise<void> {
    await this.exec('cp', ['-a', '-T', '--', this.host(guestPath), hostDir]);
  }

  /** Run a (possibly long) tool; stopped by PID when the command is interrupted. */
  private async exec(cmd: string, args: readonly string[]): Promise<Buffer> {
    if (this.signal?.aborted) throw abortError(this.signal);
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.add(child);
    let out: Buffer;
    try {
      out = await collect(child, cmd);
    } catch (e) {
      // A tool killed because of the interrupt reports the interrupt, not its own failure.
      throw this.signal?.aborted ? abortError(this.signal) : e;
    } finally {
      this.children.delete(child);
    }
    return out;
  }

  async checksums(guestPaths: readonly string[]): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const p of guestPaths) {
      const h = createHash('sha256');
      for await (const chunk of fs.createReadStream(this.host(p), { highWaterMark: 1 << 20 })) {
        if (this.signal?.aborted) throw abortError(this.signal);
        h.update(chunk as Buffer);
      }
      out.set(p, h.digest('hex'));
    }
    return out;
  }

  async close(): Promise<void> {
    const errors: string[] = [];
    try {
      await this.unmountAll();
    } catch (e) {
      errors.push(errorMessage(e));
    }
    for (const [key, d] of this.disks) {
      try {
        await stopNbdfuse(d);
      } catch (e) {
        errors.push(`${key}: ${errorMessage(e)}`);
      }
    }
    this.disks.clear();
    if (errors.length > 0) throw new BkfsError('MOUNT_FAILED', `cleanup failed: ${errors.join('; ')}`);
  }
}

function lastLine(s: string): string {
  const l = s
    .split('\n')
    .map((x) => x.trim())
    .filter((x) => x !== '');
  return l[l.length - 1] ?? '(no output)';
}

/** A child's stdout as bytes (NUL-separated output stays intact); rejects on a non-zero exit. */
function collect(child: ChildProcess, cmd: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (d: Buffer) => out.push(d));
    child.stderr?.on('data', (d: Buffer) => err.push(d));
    child.on('error', (e) => reject(new BkfsError('EXTERNAL_TOOL', `cannot run ${cmd}: ${e.message}`)));
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(out));
      else
        reject(new BkfsError('EXTERNAL_TOOL', `${cmd} failed: ${lastLine(Buffer.concat(err).toString())}`));
    });
  });
}

export async function unmount(dir: string): Promise<void> {
  for (let i = 0; ; i++) {
    const r = await run('umount', [dir], { allowFail: true });
    if (r.code === 0) return;
    if (/not mounted|no mount point/i.test(r.stderr)) return;
    if (i >= 20) {
      await run('umount', ['-l', dir], { allowFail: true });
      throw new BkfsError('MOUNT_FAILED', `umount ${dir}: ${lastLine(r.stderr)} (detached lazily)`);
    }
    await sleep(250);
  }
}

export async function detachLoop(dev: string): Promise<void> {
  for (let i = 0; ; i++) {
    const r = await run('losetup', ['-d', dev], { allowFail: true });
    if (r.code === 0) return;
    if (i >= 20) throw new BkfsError('MOUNT_FAILED', `losetup -d ${dev}: ${lastLine(r.stderr)}`);
    await sleep(250);
  }
}

async function stopNbdfuse(d: DiskFile): Promise<void> {
  if (d.child.exitCode === null && d.child.signalCode === null) {
    let ok = false;
    for (let i = 0; i < 20 && !ok; i++) {
      ok = (await run('fusermount3', ['-u', d.dir], { allowFail: true })).code === 0;
      if (!ok) {
        if (d.child.exitCode !== null) break;
        await sleep(250);
      }
    }
    if (!ok) await run('fusermount3', ['-u', '-z', d.dir], { allowFail: true });
    // nbdfuse exits once unmounted; if it does not, it is stopped by PID.
    let timer: NodeJS.Timeout | undefined;
    const exited = await Promise.race([
      waitExit(d.child).then(() => true),
      new Promise<boolean>((r) => (timer = setTimeout(() => r(false), 10000))),
    ]);
    clearTimeout(timer);
    if (!exited) await stopChild(d.child, 2000);
  }
  await fsp.rm(d.dir, { recursive: true, force: true }).catch(() => undefined);
}
