/**
 * The libguestfs engine: one appliance (a small VM with its own kernel) per command, which reads
 * the checkpoint's disks from the session's NBD server and mounts their filesystems inside itself,
 * so an untrusted guest filesystem never reaches the host kernel. Handles ext2/3/4, xfs, btrfs,
 * vfat, NTFS and LVM; needs neither root nor FUSE.
 *
 * Every checkpoint the command may look at is added as read-only drives at launch (drives cannot
 * be added later); libguestfs puts a private overlay under each, so journal replay happens in the
 * overlay and never reaches the NBD server (which refuses writes anyway). One checkpoint's tree is
 * mounted at a time (`umount-all` between); with LVM, `lvm-set-filter` limits LVM to that
 * checkpoint's drives, because all checkpoints hold the same (duplicate) physical volumes.
 *
 * Transfers: file contents come out through `download` (to the destination file, or a FIFO for
 * `cat`), trees through `tar-out` into a FIFO read by the host's `tar -x` (no temporary copy).
 * Listings: `find0` for names, then `lstatnslist` per directory for plain names and `lstatns` for
 * names with whitespace or quotes (guestfish's list syntax cannot carry those). Memory: one listing.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { once } from 'node:events';
import { BkfsError } from '../errors';
import { run } from '../util/proc';
import {
  writeChunk,
  type CheckpointDrives,
  type EngineMount,
  type FilesEngine,
  type GuestStat,
  type MountFailure,
} from './engine';
import { Guestfish, parseStruct, parseStructList, type GuestfishOptions } from './guestfish';
import type { EntryKind } from './resolve';
import type { FileEntry } from './tree';
import type { ProbeResult } from './probe';
import type { Volume, VolumeSet } from './volumes';

const S_IFMT = 0o170000;

function kindOfMode(mode: number): EntryKind {
  switch (mode & S_IFMT) {
    case 0o100000:
      return 'file';
    case 0o040000:
      return 'dir';
    case 0o120000:
      return 'symlink';
    default:
      return 'other';
  }
}

/** A guestfish `statns` struct as a GuestStat (null for lstatnslist's "missing" entries). */
export function statFromStruct(s: Record<string, string>): GuestStat | null {
  const n = (k: string): number => Number(s[k] ?? 0);
  if (s.st_ino === '-1' || s.st_mode === undefined) return null;
  const mode = n('st_mode');
  return {
    kind: kindOfMode(mode),
    size: n('st_size'),
    mode: mode & 0o7777,
    uid: n('st_uid'),
    gid: n('st_gid'),
    mtimeSec: n('st_mtime_sec'),
    mtimeNsec: n('st_mtime_nsec'),
    atimeSec: n('st_atime_sec'),
    atimeNsec: n('st_atime_nsec'),
  };
}

/** Names lstatnslist can take: its list syntax splits on whitespace and keeps quotes. */
const PLAIN_NAME = /^[^\s"'\\]+$/;

function isMissing(error: string): boolean {
  return /No such file or directory|Not a directory/.test(error);
}

export class GuestfsEngine implements FilesEngine {
  readonly name = 'guestfs' as const;
  /** checkpoint -> disk -> /dev/sdX */
  private readonly devices = new Map<string, Map<string, string>>();
  private lvmFilter: string | undefined;
  private fifoSeq = 0;

  private constructor(
    private readonly g: Guestfish,
    private readonly work: string,
  ) {}

  /** Launch the appliance with every disk of every checkpoint in `drives` (read-only). */
  static async launch(
    work: string,
    socketPath: string,
    drives: readonly CheckpointDrives[],
    opts: GuestfishOptions,
  ): Promise<GuestfsEngine> {
    const g = Guestfish.spawn(opts);
    const engine = new GuestfsEngine(g, work);
    try {
      for (const cp of drives) {
        for (const d of cp.disks) {
          await g.run('add-drive', [
            d.exportName,
            { opt: 'protocol:nbd' },
            { opt: `server:unix:${socketPath}` },
            { opt: 'format:raw' },
            { opt: 'readonly:true' },
          ]);
        }
      }
      const r = await g.send('run');
      if (r.error !== undefined) throw launchError(r.error);
      const devs = (await g.run('list-devices')).split('\n').filter((l) => l.startsWith('/dev/'));
      let i = 0;
      for (const cp of drives) {
        const m = new Map<string, string>();
        for (const d of cp.disks) m.set(d.name, devs[i++] ?? '');
        engine.devices.set(cp.checkpoint, m);
      }
      if (i > devs.length)
        throw new BkfsError('EXTERNAL_TOOL', `the appliance shows ${devs.length} of ${i} drives`);
    } catch (e) {
      await g.close();
      throw e;
    }
    return engine;
  }

  private cpDevices(checkpoint: string): Map<string, string> {
    const m = this.devices.get(checkpoint);
    if (!m) throw new BkfsError('NOT_FOUND', `checkpoint ${checkpoint} was not added to the appliance`);
    return m;
  }

  private device(checkpoint: string, v: Volume): string {
    if (v.lv) return `/dev/${v.lv.vg}/${v.lv.lv}`;
    const dev = this.cpDevices(checkpoint).get(v.disk ?? '');
    if (!dev) throw new BkfsError('NOT_FOUND', `no drive for ${v.id}`);
    return v.partition ? `${dev}${v.partition}` : dev;
  }

  /** Let LVM see only this checkpoint's drives (they duplicate every other checkpoint's PVs). */
  private async useLvmOf(checkpoint: string): Promise<void> {
    if (this.lvmFilter === checkpoint) return;
    await this.g.run('umount-all');
    await this.g.run('lvm-set-filter', [[...this.cpDevices(checkpoint).values()].join(' ')]);
    await this.g.run('vg-activate-all', ['true']);
    this.lvmFilter = checkpoint;
  }

  async logicalVolumes(checkpoint: string, set: VolumeSet): Promise<Volume[]> {
    if (!set.volumes.some((v) => v.probe?.type === 'LVM2_member')) return [];
    await this.useLvmOf(checkpoint);
    const lvs = (await this.g.run('lvs')).split('\n').filter((l) => l.startsWith('/dev/'));
    const out: Volume[] = [];
    for (const dev of lvs) {
      const m = /^\/dev\/([^/]+)\/([^/]+)$/.exec(dev);
      if (!m) continue;
      const type = (await this.g.send('vfs-type', [dev])).output.trim();
      const label = (await this.g.send('vfs-label', [dev])).output.trim();
      const uuid = (await this.g.send('vfs-uuid', [dev])).output.trim();
      const size = Number((await this.g.send('blockdev-getsize64', [dev])).output.trim()) || 0;
      let probe: ProbeResult | null = null;
      if (type !== '') {
        const usage: ProbeResult['usage'] =
          type === 'swap'
            ? 'swap'
            : type === 'crypto_LUKS'
              ? 'crypto'
              : type === 'LVM2_member'
                ? 'raid'
                : 'filesystem';
        probe = { type, usage };
        if (label !== '') probe.label = label;
        if (uuid !== '') probe.uuid = uuid;
      }
      out.push({
        id: `${m[1]}/${m[2]}`,
        lv: { vg: m[1] as string, lv: m[2] as string },
        offset: 0,
        size,
        probe,
      });
    }
    return out;
  }

  async mount(checkpoint: string, mounts: readonly EngineMount[]): Promise<MountFailure[]> {
    if (mounts.some((m) => m.volume.lv)) await this.useLvmOf(checkpoint);
    else await this.g.run('umount-all');
    const failed: MountFailure[] = [];
    for (const m of mounts) {
      const type = m.volume.probe?.type;
      const opts = ['ro', ...(type === 'xfs' ? ['nouuid'] : []), ...m.options];
      const r = await this.g.send('mount-options', [
        opts.join(','),
        this.device(checkpoint, m.volume),
        m.mountpoint,
      ]);
      if (r.error !== undefined) failed.push({ mount: m, reason: `mount ${m.volume.id} failed: ${r.error}` });
    }
    return failed;
  }

  async lstat(guestPath: string): Promise<GuestStat | null> {
    const r = await this.g.send('lstatns', [guestPath]);
    if (r.error !== undefined) {
      if (isMissing(r.error)) return null;
      throw new BkfsError('EXTERNAL_TOOL', `guestfish lstatns ${guestPath}: ${r.error}`);
    }
    return statFromStruct(parseStruct(r.output));
  }

  async lstatMany(dir: string, names: readonly string[]): Promise<Map<string, GuestStat>> {
    const out = new Map<string, GuestStat>();
    const plain = names.filter((n) => PLAIN_NAME.test(n));
    for (let i = 0; i < plain.length; i += 512) {
      const batch = plain.slice(i, i + 512);
      const r = await this.g.send('lstatnslist', [dir, batch.join(' ')]);
      if (r.error !== undefined) {
        if (isMissing(r.error)) continue;
        throw new BkfsError('EXTERNAL_TOOL', `guestfish lstatnslist ${dir}: ${r.error}`);
      }
      parseStructList(r.output).forEach((s, j) => {
        const st = statFromStruct(s);
        const name = batch[j];
        if (st && name !== undefined) out.set(name, st);
      });
    }
    for (const n of names) {
      if (PLAIN_NAME.test(n)) continue;
      const st = await this.lstat(dir === '/' ? `/${n}` : `${dir}/${n}`);
      if (st) out.set(n, st);
    }
    return out;
  }

  async readlink(guestPath: string): Promise<string> {
    const out = await this.g.run('readlink', [guestPath]);
    return out.endsWith('\n') ? out.slice(0, -1) : out;
  }

  private tmpFile(name: string): string {
    return path.join(this.work, `${name}-${++this.fifoSeq}`);
  }

  /** Run a guestfish command that writes a host file, and return that file's bytes. */
  private async viaFile(cmd: string, args: string[]): Promise<Buffer> {
    const f = this.tmpFile(cmd);
    try {
      await this.g.run(cmd, [...args, f]);
      return await fsp.readFile(f);
    } finally {
      await fsp.rm(f, { force: true });
    }
  }

  async readdir(guestPath: string): Promise<string[]> {
    const b = await this.viaFile('ls0', [guestPath]);
    return b
      .toString('utf8')
      .split('\0')
      .filter((n) => n !== '')
      .sort();
  }

  readFile(guestPath: string): Promise<Buffer> {
    return this.viaFile('download', [guestPath]);
  }

  async walk(guestPath: string, filter?: (p: string) => boolean): Promise<FileEntry[]> {
    const names = (await this.viaFile('find0', [guestPath]))
      .toString('utf8')
      .split('\0')
      .filter((n) => n !== '');
    const base = guestPath === '/' ? '' : guestPath;
    const paths = names.map((n) => `${base}/${n}`).filter((p) => !filter || filter(p));
    // One lstatnslist per directory (for plain names).
    const byDir = new Map<string, string[]>();
    for (const p of paths) {
      const slash = p.lastIndexOf('/');
      const dir = slash === 0 ? '/' : p.slice(0, slash);
      const l = byDir.get(dir) ?? [];
      l.push(p.slice(slash + 1));
      byDir.set(dir, l);
    }
    const stats = new Map<string, GuestStat>();
    for (const [dir, list] of byDir) {
      for (const [name, st] of await this.lstatMany(dir, list))
        stats.set(dir === '/' ? `/${name}` : `${dir}/${name}`, st);
    }
    const entries: FileEntry[] = [];
    for (const p of paths) {
      const st = stats.get(p);
      if (!st) continue;
      const e: FileEntry = {
        path: p,
        kind: st.kind,
        size: st.size,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        mtimeSec: st.mtimeSec,
        mtimeNsec: st.mtimeNsec,
      };
      if (st.kind === 'symlink') e.target = await this.readlink(p);
      entries.push(e);
    }
    return entries;
  }

  /**
   * Run `cmd` writing into a FIFO while `consume(fifo)` reads it. If the command fails before it
   * opens the FIFO, the FIFO is opened and closed here so the reader sees EOF instead of waiting.
   */
  private async throughFifo<T>(
    cmd: string,
    args: readonly (string | { opt: string })[],
    consume: (fifo: string) => Promise<T>,
  ): Promise<T> {
    const fifo = this.tmpFile('fifo');
    await run('mkfifo', ['-m', '600', fifo]);
    try {
      let readError: unknown;
      const reading = consume(fifo);
      reading.catch((e: unknown) => (readError = e));
      const r = await this.g.send(cmd, [args[0] as string, fifo, ...args.slice(1)]);
      if (r.error !== undefined) {
        await unblockFifo(fifo);
        await reading.catch(() => undefined);
        // A reader that gave up (tar failing) makes guestfish fail with EPIPE: report the cause.
        if (readError !== undefined) throw readError;
        throw new BkfsError('EXTERNAL_TOOL', `guestfish ${cmd}: ${r.error}`);
      }
      return await reading;
    } finally {
      await fsp.rm(fifo, { force: true });
    }
  }

  async catTo(guestPath: string, out: Writable): Promise<void> {
    await this.throughFifo('download', [guestPath], async (fifo) => {
      const rs = fs.createReadStream(fifo, { highWaterMark: 1 << 20 });
      let failed: unknown;
      for await (const chunk of rs) {
        // After a failed write (EPIPE) the FIFO is still drained, so guestfish can finish.
        if (failed === undefined) await writeChunk(out, chunk as Buffer).catch((e: unknown) => (failed = e));
      }
      if (failed !== undefined) throw failed;
    });
  }

  async copyFile(guestPath: string, hostPath: string): Promise<void> {
    const st = await this.lstat(guestPath);
    if (!st) throw new BkfsError('NOT_FOUND', `${guestPath} vanished`);
    await this.g.run('download', [guestPath, hostPath]);
    await applyMeta(hostPath, st);
  }

  async copyTree(guestPath: string, hostDir: string): Promise<void> {
    await fsp.mkdir(hostDir, { mode: 0o700 });
    const owner = process.getuid?.() === 0 ? '--same-owner' : '--no-same-owner';
    await this.throughFifo('tar-out', [guestPath, { opt: 'numericowner:true' }], (fifo) =>
      extractTar(fifo, ['-x', '-p', '--numeric-owner', owner, '-f', '-', '-C', hostDir]),
    );
  }

  async checksums(guestPaths: readonly string[]): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const p of guestPaths) out.set(p, (await this.g.run('checksum', ['sha256', p])).trim());
    return out;
  }

  async close(): Promise<void> {
    await this.g.close();
  }
}

function launchError(msg: string): BkfsError {
  const hints: string[] = [];
  if (
    /kvm|signal 6|Aborted|timed out|appliance closed/i.test(msg) &&
    !/force_tcg/.test(process.env.LIBGUESTFS_BACKEND_SETTINGS ?? '')
  ) {
    hints.push(
      'where KVM is unusable or nested KVM hangs, set LIBGUESTFS_BACKEND_SETTINGS=force_tcg or pass --guestfs-tcg',
    );
  }
  if (/supermin|kernel/i.test(msg))
    hints.push('the appliance needs a kernel in /boot: apt-get install linux-image-amd64');
  hints.push('LIBGUESTFS_DEBUG=1 shows details');
  return new BkfsError(
    'EXTERNAL_TOOL',
    `libguestfs could not start its appliance: ${msg} (${hints.join('; ')})`,
  );
}

async function unblockFifo(fifo: string): Promise<void> {
  try {
    const fd = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    fs.closeSync(fd);
  } catch {
    // nobody reading (ENXIO): nothing to unblock
  }
}

/**
 * Feed the FIFO's bytes to `tar` on its stdin. The FIFO is drained to its end even after tar has
 * stopped reading (GNU tar leaves the zero padding after the end-of-archive marker unread), so the
 * writer never meets EPIPE.
 */
async function extractTar(fifo: string, args: string[]): Promise<void> {
  const child = spawn('tar', args, { stdio: ['pipe', 'ignore', 'pipe'] });
  const err: Buffer[] = [];
  child.stderr.on('data', (d: Buffer) => err.push(d));
  let stdinOpen = true;
  child.stdin.on('error', () => (stdinOpen = false));
  child.stdin.on('close', () => (stdinOpen = false));
  const exit = new Promise<number>((resolve, reject) => {
    child.on('error', (e) => reject(new BkfsError('EXTERNAL_TOOL', `cannot run tar: ${e.message}`)));
    child.on('close', (code) => resolve(code ?? 128));
  });
  exit.catch(() => undefined);
  for await (const chunk of fs.createReadStream(fifo, { highWaterMark: 1 << 20 })) {
    if (!stdinOpen) continue;
    if (!child.stdin.write(chunk as Buffer)) {
      await Promise.race([once(child.stdin, 'drain'), once(child.stdin, 'close')]);
    }
  }
  if (stdinOpen) child.stdin.end();
  const code = await exit;
  if (code !== 0) {
    const msg = Buffer.concat(err).toString().trim().split('\n').pop() ?? '';
    throw new BkfsError('EXTERNAL_TOOL', `tar -x failed: ${msg || `exit ${code}`}`);
  }
}

/** Mode, owner (as root) and times of a guest file onto a copied host file. */
export async function applyMeta(hostPath: string, st: GuestStat): Promise<void> {
  if (process.getuid?.() === 0) await fsp.lchown(hostPath, st.uid, st.gid);
  await fsp.chmod(hostPath, st.mode);
  await fsp.utimes(hostPath, st.atimeSec + st.atimeNsec / 1e9, st.mtimeSec + st.mtimeNsec / 1e9);
}
