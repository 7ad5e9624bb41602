/**
 * File addresses of the file-level commands (`ls`, `cp`, `cat`, `find`, `diff`), parsed without
 * touching the repository:
 *
 *   VM[@CP]                       the checkpoint itself (`ls` lists its disks and filesystems)
 *   VM[@CP]:/path                 a guest path, resolved through the guest's own mount layout
 *   VM[@CP]:DISK:PART:/path       a path on partition PART (1-based, as Linux numbers them)
 *   VM[@CP]:DISK:/path            a filesystem on the whole disk (also DISK:0)
 *   VM[@CP]:VG/LV:/path           a path on an LVM logical volume
 *   VM[@CP]:LABEL=x:/path         a filesystem by label (also UUID=x)
 *
 * The path after the volume may be left out (`vm@c1:vda:2` is its root). The guest path is
 * normalised lexically (`.`/`..`/repeated slashes); symlinks are resolved later, inside the guest
 * (`resolve.ts`). Pure: no I/O, unit-tested.
 */
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { NAME_RE, parseCheckpointRef } from '../index/catalog';

export type VolumeSpec =
  | { kind: 'partition'; disk: string; partition: number }
  | { kind: 'disk'; disk: string }
  | { kind: 'lv'; vg: string; lv: string }
  | { kind: 'label'; value: string }
  | { kind: 'uuid'; value: string };

export interface FileAddress {
  /** `VM` or `VM@CP` as given (what `resolveRef` takes). */
  ref: string;
  vm: string;
  /** Undefined: the latest checkpoint. */
  checkpoint?: string;
  volume?: VolumeSpec;
  /** Absolute, normalised guest path; undefined when only the checkpoint was named. */
  path?: string;
  /**
   * `VM@CP:etc/hostname`: a word after the colon that reads both as a volume (`VG/LV`, `DISK`) and as
   * a guest path without its leading '/'. `volume` holds the first reading, this the second: it
   * applies when the checkpoint has no such volume.
   */
  orPath?: string;
}

/** LVM VG and LV names: letters, digits and `+_.-`, not starting with `-`. */
const LVM_NAME_RE = /^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$/;

function usage(s: string, why: string): BkfsError {
  return new BkfsError(
    'USAGE',
    `bad file address '${s}': ${why} (use VM@CP:/path, VM@CP:DISK:PART:/path, VM@CP:VG/LV:/path)`,
  );
}

/** Normalise an absolute guest path: no trailing slash (except '/'), no '.', '..' or '//'. */
export function normaliseGuestPath(p: string): string {
  if (!p.startsWith('/')) throw new BkfsError('USAGE', `guest path '${p}' must start with /`);
  if (p.includes('\0')) throw new BkfsError('USAGE', 'guest path contains a NUL byte');
  const n = path.posix.normalize(p);
  return n.length > 1 && n.endsWith('/') ? n.slice(0, -1) : n;
}

function parseVolume(s: string, text: string): VolumeSpec {
  if (/^LABEL=/i.test(text)) {
    const value = text.slice(6);
    if (value === '') throw usage(s, 'empty LABEL=');
    return { kind: 'label', value };
  }
  if (/^UUID=/i.test(text)) {
    const value = text.slice(5);
    if (!/^[0-9A-Fa-f-]+$/.test(value)) throw usage(s, `bad UUID '${value}'`);
    return { kind: 'uuid', value };
  }
  const slash = text.indexOf('/');
  if (slash >= 0) {
    const vg = text.slice(0, slash);
    const lv = text.slice(slash + 1);
    if (!LVM_NAME_RE.test(vg) || !LVM_NAME_RE.test(lv)) throw usage(s, `bad logical volume '${text}'`);
    return { kind: 'lv', vg, lv };
  }
  if (!NAME_RE.test(text)) throw usage(s, `bad disk name '${text}'`);
  return { kind: 'disk', disk: text };
}

/**
 * Parse a file address. `needPath`: a guest path (or a volume, meaning its root) is required
 * (`cp`, `cat`); otherwise `VM[@CP]` alone is accepted (`ls`).
 */
export function parseFileAddress(s: string, opts: { needPath?: boolean } = {}): FileAddress {
  const colon = s.indexOf(':');
  const ref = colon < 0 ? s : s.slice(0, colon);
  const r = parseCheckpointRef(ref);
  const out: FileAddress = { ref, vm: r.vm };
  if (r.checkpoint !== undefined) out.checkpoint = r.checkpoint;
  if (colon < 0) {
    if (opts.needPath) throw usage(s, 'no guest path');
    return out;
  }
  let rest = s.slice(colon + 1);
  if (rest === '') throw usage(s, 'nothing after the colon');
  if (!rest.startsWith('/')) {
    // A volume: LABEL=x / UUID=x / VG/LV / DISK, then for a disk an optional partition number.
    const c1 = rest.indexOf(':');
    const first = c1 < 0 ? rest : rest.slice(0, c1);
    if (c1 < 0) {
      // One word: a volume's root, or a guest path written without its leading '/'.
      let volume: VolumeSpec;
      try {
        volume = parseVolume(s, first);
      } catch {
        out.path = normaliseGuestPath(`/${rest}`);
        return out;
      }
      out.volume = volume;
      out.path = '/';
      if (volume.kind === 'disk' || volume.kind === 'lv') out.orPath = normaliseGuestPath(`/${rest}`);
      return out;
    }
    let volume = parseVolume(s, first);
    rest = rest.slice(c1 + 1);
    if (volume.kind === 'disk' && rest !== '' && !rest.startsWith('/')) {
      const c2 = rest.indexOf(':');
      const part = c2 < 0 ? rest : rest.slice(0, c2);
      if (/^\d{1,4}$/.test(part)) {
        const n = Number(part);
        if (n > 0) volume = { kind: 'partition', disk: volume.disk, partition: n };
        rest = c2 < 0 ? '' : rest.slice(c2 + 1);
      } else if (c2 >= 0) throw usage(s, `bad partition number '${part}'`);
    }
    out.volume = volume;
    // A path without its leading '/' (vda:2:etc/hostname) is taken as absolute.
    out.path = rest === '' ? '/' : normaliseGuestPath(rest.startsWith('/') ? rest : `/${rest}`);
    return out;
  }
  out.path = normaliseGuestPath(rest);
  return out;
}

/** The short name of a volume as `ls` shows it and `mount --files` names directories. */
export function partitionId(disk: string, partition: number): string {
  if (partition === 0) return disk;
  return /\d$/.test(disk) ? `${disk}p${partition}` : `${disk}${partition}`;
}

/** A volume spec written back in address syntax (for messages). */
export function formatVolumeSpec(v: VolumeSpec): string {
  switch (v.kind) {
    case 'partition':
      return `${v.disk}:${v.partition}`;
    case 'disk':
      return v.disk;
    case 'lv':
      return `${v.vg}/${v.lv}`;
    case 'label':
      return `LABEL=${v.value}`;
    case 'uuid':
      return `UUID=${v.value}`;
  }
}

/** `VM@CP[:VOLUME]:/path` for messages. */
export function formatAddress(
  vm: string,
  checkpoint: string,
  guestPath: string,
  volume?: VolumeSpec,
): string {
  return `${vm}@${checkpoint}:${volume ? `${formatVolumeSpec(volume)}:` : ''}${guestPath}`;
}
