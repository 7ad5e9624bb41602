/**
 * What a file-level engine does, and which engine to use.
 *
 * An engine shows one checkpoint's guest tree at a time: `mount(cp, mounts)` puts the listed
 * volumes at their guest mount points (replacing what was there), then paths are guest paths.
 * Two engines implement it:
 *  - `guestfs` (guestfs-engine.ts): one libguestfs appliance for the whole command; the guest's
 *    filesystems never touch the host kernel; handles every filesystem and LVM; no root needed.
 *  - `kernel` (kernel.ts): read-only loop devices at each partition's offset and read-only mounts
 *    without journal replay; fast, for trusted guests only (a crafted filesystem image is parsed
 *    by the host kernel); needs root and the filesystem drivers; never chosen unless asked for.
 * The pure functions below decide which one a command may use and say why the kernel cannot.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { BkfsError } from '../errors';
import { GUESTFS_MISSING } from './guestfish';
import type { EntryKind } from './resolve';
import type { FileEntry } from './tree';
import type { Volume, VolumeSet } from './volumes';

export type EngineName = 'kernel' | 'guestfs';
export type EngineChoice = 'auto' | EngineName;

export interface GuestStat {
  kind: EntryKind;
  size: number;
  /** Permission bits (& 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  mtimeSec: number;
  mtimeNsec: number;
  atimeSec: number;
  atimeNsec: number;
}

export interface EngineMount {
  mountpoint: string;
  volume: Volume;
  options: string[];
}

/** The disks of one checkpoint as NBD exports of the session's server. */
export interface CheckpointDrives {
  checkpoint: string;
  disks: { name: string; size: number; exportName: string }[];
}

export interface MountFailure {
  mount: EngineMount;
  reason: string;
}

export interface FilesEngine {
  readonly name: EngineName;
  /** Logical volumes of a checkpoint (only libguestfs sees inside LVM). */
  logicalVolumes(checkpoint: string, set: VolumeSet): Promise<Volume[]>;
  /** Show `mounts` (parent first) of `checkpoint` as the guest tree; returns what failed. */
  mount(checkpoint: string, mounts: readonly EngineMount[]): Promise<MountFailure[]>;
  lstat(guestPath: string): Promise<GuestStat | null>;
  /** lstat of several entries of one directory (absent ones are left out). */
  lstatMany(dir: string, names: readonly string[]): Promise<Map<string, GuestStat>>;
  readlink(guestPath: string): Promise<string>;
  readdir(guestPath: string): Promise<string[]>;
  /** A small file's bytes (fstab). */
  readFile(guestPath: string): Promise<Buffer>;
  /** Every entry below `guestPath` (not itself); `filter` limits which get full metadata. */
  walk(guestPath: string, filter?: (p: string) => boolean): Promise<FileEntry[]>;
  catTo(guestPath: string, out: Writable): Promise<void>;
  /** Copy a regular file to `hostPath` (must not exist) keeping mode, times, owner (as root). */
  copyFile(guestPath: string, hostPath: string): Promise<void>;
  /** Copy a directory tree to `hostDir` (must not exist) keeping modes, times, owners, links. */
  copyTree(guestPath: string, hostDir: string): Promise<void>;
  /** sha256 of regular files. */
  checksums(guestPaths: readonly string[]): Promise<Map<string, string>>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// What the host kernel can do

export interface KernelSupport {
  root: boolean;
  /** Filesystem types from /proc/filesystems. */
  filesystems: Set<string>;
  deviceMapper: boolean;
  loop: boolean;
  fuse: boolean;
  nbdfuse: boolean;
}

function onPath(cmd: string): boolean {
  return (process.env.PATH ?? '/usr/bin:/bin').split(':').some((d) => {
    try {
      fs.accessSync(path.join(d, cmd), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/** Look at this host: root, /proc/filesystems, /dev/mapper/control, /dev/loop-control, FUSE. */
export function detectKernelSupport(): KernelSupport {
  let text = '';
  try {
    text = fs.readFileSync('/proc/filesystems', 'utf8');
  } catch {
    // no /proc: nothing is supported
  }
  const filesystems = new Set(
    text
      .split('\n')
      .map((l) => l.trim().split(/\s+/).pop() ?? '')
      .filter((s) => s !== ''),
  );
  return {
    root: process.getuid?.() === 0,
    filesystems,
    deviceMapper: fs.existsSync('/dev/mapper/control'),
    loop: fs.existsSync('/dev/loop-control'),
    fuse: fs.existsSync('/dev/fuse'),
    nbdfuse: onPath('nbdfuse'),
  };
}

/** Why the kernel engine cannot run at all here, or undefined. */
export function kernelUnusable(s: KernelSupport): string | undefined {
  if (!s.root) return 'the kernel engine needs root (loop devices and mounts)';
  if (!s.loop) return 'the kernel engine needs loop devices (/dev/loop-control is missing)';
  if (!s.fuse) return 'the kernel engine needs FUSE (/dev/fuse is missing)';
  if (!s.nbdfuse) return 'the kernel engine needs nbdfuse (Debian package libnbd-bin)';
  return undefined;
}

/** Kernel driver names for a probed type (any one of them will do). */
const KERNEL_DRIVERS: Record<string, string[]> = {
  ext2: ['ext2', 'ext4'],
  ext3: ['ext3', 'ext4'],
  ext4: ['ext4'],
  xfs: ['xfs'],
  btrfs: ['btrfs'],
  vfat: ['vfat'],
  ntfs: ['ntfs3', 'ntfs'],
  iso9660: ['iso9660'],
};

/** The kernel driver to mount a volume with, or the reason the kernel engine cannot. */
export function kernelDriver(v: Volume, s: KernelSupport): { driver: string } | { reason: string } {
  if (v.lv) {
    return {
      reason: `${v.id} is an LVM logical volume, which the kernel engine does not open${s.deviceMapper ? '' : ' (no device-mapper here)'}`,
    };
  }
  const t = v.probe?.type;
  if (t === 'LVM2_member') {
    return {
      reason: `${v.id} is an LVM physical volume, which the kernel engine does not open${s.deviceMapper ? '' : ' (no device-mapper here)'}`,
    };
  }
  if (!t || v.probe?.usage !== 'filesystem') return { reason: `${v.id} holds no filesystem` };
  const drivers = KERNEL_DRIVERS[t];
  if (!drivers) return { reason: `the kernel engine does not mount ${t} (${v.id})` };
  const d = drivers.find((x) => s.filesystems.has(x));
  if (!d)
    return {
      reason: `this kernel cannot mount ${t} (${v.id}): no ${drivers.join('/')} in /proc/filesystems`,
    };
  return { driver: d };
}

/** Read-only mount options of the kernel engine: no journal replay, nothing executable. */
export function kernelMountOptions(type: string, extra: readonly string[]): string[] {
  const o = ['ro', 'nosuid', 'nodev', 'noexec'];
  if (type === 'ext3' || type === 'ext4') o.push('noload');
  if (type === 'xfs') o.push('norecovery', 'nouuid');
  if (type === 'btrfs') o.push('rescue=nologreplay');
  return [...o, ...extra];
}

/**
 * The engine for a command. Guests are untrusted: `auto` is libguestfs, whose appliance keeps
 * guest filesystem code out of the host kernel and out of host-root processes. The kernel engine
 * (a crafted filesystem reaches the host kernel) runs only when asked for by name (`--engine
 * kernel`, or BKFS_FILES_ENGINE=kernel, which the CLI turns into that choice). Throws when the
 * chosen engine cannot serve.
 */
export function pickEngine(
  choice: EngineChoice,
  s: KernelSupport,
  guestfsInstalled: boolean,
  volumes: readonly Volume[],
): { engine: EngineName; note?: string } {
  if (choice === 'kernel') {
    const unusable = kernelUnusable(s);
    if (unusable) throw new BkfsError('FS_UNSUPPORTED', `${unusable}; use --engine guestfs`);
    const cannot = volumes
      .map((v) => kernelDriver(v, s))
      .filter((r): r is { reason: string } => 'reason' in r)
      .map((r) => r.reason);
    if (cannot.length > 0)
      throw new BkfsError('FS_UNSUPPORTED', `${cannot.join('; ')}; use --engine guestfs`);
    return { engine: 'kernel' };
  }
  if (!guestfsInstalled) {
    throw new BkfsError(
      'EXTERNAL_TOOL',
      `${GUESTFS_MISSING}${choice === 'auto' ? ' (or, for trusted guests only, --engine kernel)' : ''}`,
    );
  }
  return { engine: 'guestfs' };
}

/** The engine choice a host setting (BKFS_FILES_ENGINE) asks for, when no --engine was given. */
export function engineFromEnv(value: string | undefined): EngineChoice {
  if (value === undefined || value === '') return 'auto';
  if (value === 'auto' || value === 'guestfs' || value === 'kernel') return value;
  throw new BkfsError('USAGE', `BKFS_FILES_ENGINE must be auto, guestfs or kernel, got '${value}'`);
}

/** Write one chunk and wait until it is handed on (rejects on EPIPE etc. instead of hanging). */
export function writeChunk(out: Writable, chunk: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    out.write(chunk, (err) => (err ? reject(err) : resolve()));
  });
}

/** The abort reason as an error (INTERRUPTED unless the signal carries one). */
export function abortError(signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new BkfsError('INTERRUPTED', 'interrupted');
}
