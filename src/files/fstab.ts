/**
 * The guest's mount layout: which volume is mounted where, taken from the guest's own /etc/fstab,
 * so that `VM@CP:/var/log/syslog` means what it means inside the guest. Pure functions over the
 * probed volumes (`volumes.ts`); the engines only supply the text of candidate fstab files.
 *
 *  - `parseFstab`: fstab(5) lines (comments, `\040` escapes, quoted `UUID="..."`).
 *  - `resolveSpec`: UUID=, LABEL=, PARTUUID=, PARTLABEL=, /dev/disk/by-*, /dev/mapper/VG-LV,
 *    /dev/VG/LV, /dev/vdXN (a guest disk name that is not a backed-up disk name maps by its
 *    letter: sda/vda/xvda/hda -> the first disk, b -> the second...).
 *  - `chooseRoot`: the root filesystem: a Linux filesystem whose fstab mounts itself on '/'
 *    (GPT root-type and `root`-labelled partitions are tried first); without any fstab, the only
 *    filesystem of the checkpoint.
 *  - `buildLayout`, `locate`, `mountsBelow`: mount points sorted parent-first, and the mount that
 *    holds a given guest path.
 * Network, pseudo, swap and bind entries are skipped with a reason, as are entries whose device is
 * not among the checkpoint's volumes.
 */
import { BkfsError } from '../errors';
import type { Volume, VolumeSet } from './volumes';
import { isFilesystem, notAFilesystem } from './volumes';

export interface FstabEntry {
  spec: string;
  file: string;
  vfstype: string;
  options: string[];
  /** 1-based line number. */
  line: number;
}

export interface MountPoint {
  /** Absolute guest path. */
  mountpoint: string;
  volume: Volume;
  /** Options bkfs honours (btrfs subvol=/subvolid=); everything else is bkfs' own read-only set. */
  options: string[];
  /** Where this mount comes from: the fstab spec, or 'root' / 'only filesystem'. */
  source: string;
}

export interface SkippedEntry {
  mountpoint: string;
  spec: string;
  reason: string;
}

export interface Layout {
  /** Sorted parent-first: '/' first. */
  mounts: MountPoint[];
  skipped: SkippedEntry[];
  /** Volume id whose /etc/fstab was used; undefined when there was none. */
  fstabFrom?: string;
}

function unescapeField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Largest /etc/fstab bkfs reads: real ones are a few KB. */
export const MAX_FSTAB_BYTES = 1024 * 1024;
/** Most fstab entries bkfs accepts. */
export const MAX_FSTAB_ENTRIES = 4096;

/**
 * Parse fstab(5) text. Throws FS_UNSUPPORTED for a text that cannot be a real fstab (larger than
 * MAX_FSTAB_BYTES or with more than MAX_FSTAB_ENTRIES entries): a guest controls this file.
 */
export function parseFstab(text: string): FstabEntry[] {
  if (text.length > MAX_FSTAB_BYTES) {
    throw new BkfsError(
      'FS_UNSUPPORTED',
      `/etc/fstab is ${text.length} bytes, more than the ${MAX_FSTAB_BYTES} bkfs reads: not a usable fstab`,
    );
  }
  const out: FstabEntry[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const f = line.split(/\s+/);
    if (f.length < 2) return;
    out.push({
      spec: unescapeField(f[0] ?? ''),
      file: unescapeField(f[1] ?? ''),
      vfstype: f[2] ?? 'auto',
      options: (f[3] ?? 'defaults').split(','),
      line: i + 1,
    });
  });
  if (out.length > MAX_FSTAB_ENTRIES) {
    throw new BkfsError(
      'FS_UNSUPPORTED',
      `/etc/fstab has ${out.length} entries, more than the ${MAX_FSTAB_ENTRIES} bkfs accepts: not a usable fstab`,
    );
  }
  return out;
}

/**
 * Why a mount point from the guest's fstab is not used, or null: it must be a plain absolute path
 * without '.' or '..' components, control characters (an escaped \000...) or absurd length.
 */
export function unsafeMountpoint(mp: string): string | null {
  if (mp.length > 4096) return 'mount point longer than 4096 characters';
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f]/.test(mp)) return 'mount point with control characters';
  if (mp.split('/').some((c) => c === '.' || c === '..')) return "mount point with '.' or '..' components";
  return null;
}

const SKIP_TYPES = new Set([
  'swap',
  'proc',
  'sysfs',
  'devpts',
  'tmpfs',
  'devtmpfs',
  'ramfs',
  'cgroup',
  'cgroup2',
  'securityfs',
  'debugfs',
  'efivarfs',
  'hugetlbfs',
  'mqueue',
  'nfs',
  'nfs4',
  'cifs',
  'smbfs',
  'smb3',
  'sshfs',
  '9p',
  'virtiofs',
  'glusterfs',
  'ceph',
  'overlay',
  'none',
  'ignore',
]);

function unquote(s: string): string {
  return s.length >= 2 && ((s.startsWith('"') && s.endsWith('"')) || (s.startsWith("'") && s.endsWith("'")))
    ? s.slice(1, -1)
    : s;
}

/** udev's \xHH escapes in /dev/disk/by-label names. */
function udevUnescape(s: string): string {
  return s.replace(/\\x([0-9a-fA-F]{2})/g, (_m, h: string) => String.fromCharCode(parseInt(h, 16)));
}

/** `/dev/mapper/` name -> [vg, lv] (LVM doubles dashes inside names). */
export function splitMapperName(name: string): [string, string] | undefined {
  for (let i = 1; i < name.length - 1; i++) {
    if (name[i] !== '-') continue;
    if (name[i + 1] === '-') {
      i++;
      continue;
    }
    return [name.slice(0, i).replace(/--/g, '-'), name.slice(i + 1).replace(/--/g, '-')];
  }
  return undefined;
}

/** Letters of a guest disk name ('a' -> 0, 'z' -> 25, 'aa' -> 26). */
function letterIndex(letters: string): number {
  let n = 0;
  for (const ch of letters) n = n * 26 + (ch.charCodeAt(0) - 96);
  return n - 1;
}

/** The disk name a guest device name refers to, among the checkpoint's disk names. */
export function guestDiskName(guestName: string, diskNames: readonly string[]): string | undefined {
  if (diskNames.includes(guestName)) return guestName;
  const m = /^(?:sd|vd|xvd|hd)([a-z]{1,2})$/.exec(guestName);
  if (!m) return undefined;
  return [...diskNames].sort()[letterIndex(m[1] ?? 'a')];
}

/** Split a /dev/ name into disk and partition: vda2, sda, nvme0n1p3, mmcblk0p1. */
function splitDeviceName(name: string): { disk: string; partition: number } | undefined {
  let m = /^((?:nvme\d+n\d+)|(?:mmcblk\d+)|(?:loop\d+))(?:p(\d+))?$/.exec(name);
  if (m) return { disk: m[1] ?? '', partition: m[2] ? Number(m[2]) : 0 };
  m = /^([a-z]+)(\d*)$/.exec(name);
  if (m) return { disk: m[1] ?? '', partition: m[2] ? Number(m[2]) : 0 };
  return undefined;
}

/** The volume an fstab spec names, or undefined. */
export function resolveSpec(spec: string, set: VolumeSet): Volume | undefined {
  const vols = set.volumes;
  const eq = spec.indexOf('=');
  if (eq > 0 && !spec.startsWith('/')) {
    const key = spec.slice(0, eq).toUpperCase();
    const value = unquote(spec.slice(eq + 1));
    switch (key) {
      case 'UUID':
        return vols.find(
          (v) => v.probe?.uuid !== undefined && v.probe.uuid.toLowerCase() === value.toLowerCase(),
        );
      case 'LABEL':
        return vols.find((v) => v.probe?.label === value);
      case 'PARTUUID':
        return vols.find((v) => v.partUuid !== undefined && v.partUuid.toLowerCase() === value.toLowerCase());
      case 'PARTLABEL':
        return vols.find((v) => v.partLabel === value);
      default:
        return undefined;
    }
  }
  const byPrefix: [string, string][] = [
    ['/dev/disk/by-uuid/', 'UUID'],
    ['/dev/disk/by-label/', 'LABEL'],
    ['/dev/disk/by-partuuid/', 'PARTUUID'],
    ['/dev/disk/by-partlabel/', 'PARTLABEL'],
  ];
  for (const [prefix, key] of byPrefix) {
    if (spec.startsWith(prefix)) return resolveSpec(`${key}=${udevUnescape(spec.slice(prefix.length))}`, set);
  }
  if (spec.startsWith('/dev/mapper/')) {
    const vl = splitMapperName(spec.slice('/dev/mapper/'.length));
    return vl ? vols.find((v) => v.lv?.vg === vl[0] && v.lv.lv === vl[1]) : undefined;
  }
  const m = /^\/dev\/([^/]+)\/([^/]+)$/.exec(spec);
  if (m) return vols.find((v) => v.lv !== undefined && v.lv.vg === m[1] && v.lv.lv === m[2]);
  const d = /^\/dev\/([^/]+)$/.exec(spec);
  if (d) {
    const parts = splitDeviceName(d[1] ?? '');
    if (!parts) return undefined;
    const disk = guestDiskName(
      parts.disk,
      set.disks.map((x) => x.name),
    );
    if (disk === undefined) return undefined;
    return vols.find((v) => v.disk === disk && v.partition === parts.partition);
  }
  return undefined;
}

/** Options bkfs carries over from fstab (btrfs subvolumes); the rest is replaced by read-only ones. */
function keptOptions(vfstype: string, options: readonly string[]): string[] {
  if (vfstype !== 'btrfs') return [];
  return options.filter((o) => o.startsWith('subvol=') || o.startsWith('subvolid='));
}

function depth(p: string): number {
  return p === '/' ? 0 : p.split('/').length - 1;
}

function normaliseMountpoint(p: string): string {
  const n = p.replace(/\/+/g, '/');
  return n.length > 1 && n.endsWith('/') ? n.slice(0, -1) : n;
}

/** The layout from the root volume and (when there is one) its fstab. */
export function buildLayout(
  root: Volume,
  entries: readonly FstabEntry[] | undefined,
  set: VolumeSet,
): Layout {
  const rootEntry = entries?.find((e) => normaliseMountpoint(e.file) === '/');
  const mounts: MountPoint[] = [
    {
      mountpoint: '/',
      volume: root,
      options: rootEntry ? keptOptions(rootEntry.vfstype, rootEntry.options) : [],
      source: rootEntry ? rootEntry.spec : entries ? 'root' : 'only filesystem',
    },
  ];
  const skipped: SkippedEntry[] = [];
  for (const e of entries ?? []) {
    const mp = normaliseMountpoint(e.file);
    if (mp === '/') continue;
    const skip = (reason: string): void => {
      skipped.push({ mountpoint: mp, spec: e.spec, reason });
    };
    if (e.vfstype === 'swap') continue; // swap space, not a mount
    if (!mp.startsWith('/')) {
      if (mp !== 'none') skip('not an absolute mount point');
      continue;
    }
    const unsafe = unsafeMountpoint(mp);
    if (unsafe) {
      skip(unsafe);
      continue;
    }
    if (e.options.includes('bind') || e.options.includes('rbind')) {
      skip('bind mount');
      continue;
    }
    if (SKIP_TYPES.has(e.vfstype) || e.vfstype.startsWith('fuse')) {
      skip(`${e.vfstype} is not on a disk`);
      continue;
    }
    const v = resolveSpec(e.spec, set);
    if (!v) {
      skip('no volume of this checkpoint matches it');
      continue;
    }
    const bad = notAFilesystem(v);
    if (bad) {
      skip(bad);
      continue;
    }
    if (mounts.some((m) => m.mountpoint === mp)) {
      skip('mount point listed twice');
      continue;
    }
    const kept = keptOptions(e.vfstype, e.options);
    if (v === root && kept.length === 0) {
      skip('same volume as /');
      continue;
    }
    mounts.push({ mountpoint: mp, volume: v, options: kept, source: e.spec });
  }
  mounts.sort((a, b) => depth(a.mountpoint) - depth(b.mountpoint) || (a.mountpoint < b.mountpoint ? -1 : 1));
  return { mounts, skipped };
}

const LINUX_ROOT_TYPES = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'btrfs']);

/**
 * Find the root filesystem. `readFstab(volume)` returns the text of /etc/fstab on that volume, or
 * null when it has none. Returns the layout, or undefined when the checkpoint has several
 * filesystems and no fstab places them (callers then ask for an explicit volume).
 */
export async function chooseRoot(
  set: VolumeSet,
  readFstab: (v: Volume) => Promise<string | null>,
): Promise<Layout | undefined> {
  const filesystems = set.volumes.filter(isFilesystem);
  const score = (v: Volume): number =>
    (v.partType?.startsWith('Linux root') ? 0 : 4) +
    (/^(root|rootfs|\/)$/i.test(v.probe?.label ?? '') ? 0 : 2);
  const candidates = filesystems
    .filter((v) => LINUX_ROOT_TYPES.has(v.probe?.type ?? ''))
    .map((v, i) => ({ v, i }))
    .sort((a, b) => score(a.v) - score(b.v) || a.i - b.i)
    .map((x) => x.v);
  let fallback: { v: Volume; entries: FstabEntry[] } | undefined;
  for (const v of candidates) {
    const text = await readFstab(v);
    if (text === null) continue;
    let entries: FstabEntry[];
    try {
      entries = parseFstab(text);
    } catch (e) {
      if (!(e instanceof BkfsError)) throw e;
      throw new BkfsError(e.code, `${v.id}: ${e.message}; name a volume explicitly (VM@CP:VOLUME:/path)`);
    }
    const rootEntry = entries.find((e) => normaliseMountpoint(e.file) === '/');
    const target = rootEntry ? resolveSpec(rootEntry.spec, set) : undefined;
    if (target === v) return { ...buildLayout(v, entries, set), fstabFrom: v.id };
    if (!fallback) fallback = { v, entries };
  }
  if (fallback) return { ...buildLayout(fallback.v, fallback.entries, set), fstabFrom: fallback.v.id };
  const only = filesystems.length === 1 ? filesystems[0] : undefined;
  return only ? buildLayout(only, undefined, set) : undefined;
}

/** The error for a plain guest path when the checkpoint has no layout. */
export function noLayoutError(where: string, set: VolumeSet): BkfsError {
  const pvs = set.volumes.filter((v) => v.probe?.type === 'LVM2_member').map((v) => v.id);
  const fs = set.volumes
    .filter(isFilesystem)
    .map(
      (v) =>
        `${v.disk && v.partition ? `${v.disk}:${v.partition}` : v.id} (${v.probe?.type ?? '?'}${v.probe?.label ? ` '${v.probe.label}'` : ''})`,
    );
  if (fs.length === 0 && pvs.length > 0) {
    return new BkfsError(
      'FS_UNSUPPORTED',
      `${where} keeps its filesystems in LVM (physical volume ${pvs.join(', ')}), which only the libguestfs engine opens: use --engine guestfs`,
    );
  }
  if (fs.length === 0) {
    return new BkfsError(
      'FS_UNSUPPORTED',
      `${where} has no recognisable filesystem (volumes: ${set.volumes.map((v) => `${v.id}${v.probe ? ` ${v.probe.type}` : ''}`).join(', ') || 'none'})`,
    );
  }
  return new BkfsError(
    'USAGE',
    `${where} has several filesystems and no /etc/fstab to place them: name one, e.g. ${where}:${fs[0]?.split(' ')[0] ?? 'vda:1'}:/path (filesystems: ${fs.join(', ')})`,
  );
}

/** The mount holding `guestPath` and the path inside that filesystem. */
export function locate(layout: Layout, guestPath: string): { mount: MountPoint; inner: string } {
  let best: MountPoint | undefined;
  for (const m of layout.mounts) {
    const mp = m.mountpoint;
    if (mp === '/' || guestPath === mp || guestPath.startsWith(mp + '/')) {
      if (!best || mp.length > best.mountpoint.length) best = m;
    }
  }
  const mount = best ?? (layout.mounts[0] as MountPoint);
  const inner = mount.mountpoint === '/' ? guestPath : guestPath.slice(mount.mountpoint.length) || '/';
  return { mount, inner };
}

/** Mounts strictly below `guestPath` (those a recursive operation on it crosses into). */
export function mountsBelow(layout: Layout, guestPath: string): MountPoint[] {
  const prefix = guestPath === '/' ? '/' : guestPath + '/';
  return layout.mounts.filter((m) => m.mountpoint !== guestPath && m.mountpoint.startsWith(prefix));
}
