/**
 * Filesystem and container signatures, read straight from the stored bytes of a volume (a
 * partition, a whole disk): type, label and UUID as `blkid` reports them, without mounting, root or
 * an appliance. Knowing what each volume holds up front lets bkfs choose an engine (the host kernel
 * or libguestfs), say clearly what it cannot open (LUKS, unknown data) and match the guest's fstab
 * (`UUID=`, `LABEL=`) before anything is mounted.
 *
 * Recognised: ext2/3/4, xfs, btrfs, vfat (FAT12/16/32), NTFS, iso9660, swap, LUKS (1 and 2) and LVM2
 * physical volumes. One read of the first 68 KiB per volume (the btrfs superblock sits at 64 KiB);
 * pure otherwise (unit-tested against images made by the real mkfs tools).
 */

/** Reads `length` bytes at `offset` of the volume; short results read as zeros. */
export type VolumeReadAt = (offset: number, length: number) => Promise<Buffer>;

export interface ProbeResult {
  /** blkid's TYPE: ext4, xfs, vfat, ntfs, btrfs, swap, iso9660, crypto_LUKS, LVM2_member... */
  type: string;
  label?: string;
  uuid?: string;
  /** What the volume is: a mountable filesystem, swap, or a container (LUKS, LVM). */
  usage: 'filesystem' | 'swap' | 'crypto' | 'raid';
  /** ext3/4: the journal holds transactions that were not replayed (an unclean guest). */
  needsRecovery?: boolean;
  /** LUKS version. */
  version?: number;
}

export const PROBE_BYTES = 68 * 1024;

function ascii(b: Buffer, off: number, len: number): string {
  return b.subarray(off, off + len).toString('latin1');
}

/** NUL- (and optionally space-) padded string field, decoded as UTF-8. */
function cstr(b: Buffer, off: number, len: number, trimSpaces = false): string {
  let s = b.subarray(off, off + len);
  const nul = s.indexOf(0);
  if (nul >= 0) s = s.subarray(0, nul);
  const out = s.toString('utf8');
  return trimSpaces ? out.replace(/ +$/, '') : out;
}

function isZero(b: Buffer, off: number, len: number): boolean {
  for (let i = off; i < off + len; i++) if (b[i] !== 0) return false;
  return true;
}

/** 16 bytes as a lower-case 8-4-4-4-12 UUID (byte order as stored), undefined if all zero. */
function uuid16(b: Buffer, off: number): string | undefined {
  if (isZero(b, off, 16)) return undefined;
  const h = b.subarray(off, off + 16).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function withOpt(r: ProbeResult, label: string | undefined, uuid: string | undefined): ProbeResult {
  if (label !== undefined && label !== '') r.label = label;
  if (uuid !== undefined && uuid !== '') r.uuid = uuid;
  return r;
}

function probeLuks(b: Buffer): ProbeResult | null {
  if (!b.subarray(0, 6).equals(Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]))) return null;
  const version = b.readUInt16BE(6);
  const r: ProbeResult = { type: 'crypto_LUKS', usage: 'crypto', version };
  return withOpt(r, version === 2 ? cstr(b, 24, 48) : undefined, cstr(b, 168, 40));
}

function probeLvm(b: Buffer): ProbeResult | null {
  for (let s = 0; s < 4; s++) {
    const o = s * 512;
    if (ascii(b, o, 8) !== 'LABELONE' || ascii(b, o + 24, 8) !== 'LVM2 001') continue;
    const pvh = o + b.readUInt32LE(o + 20);
    const raw = ascii(b, pvh, 32);
    const cuts = [6, 4, 4, 4, 4, 4, 6];
    const parts: string[] = [];
    let p = 0;
    for (const n of cuts) {
      parts.push(raw.slice(p, p + n));
      p += n;
    }
    return { type: 'LVM2_member', usage: 'raid', uuid: parts.join('-') };
  }
  return null;
}

function probeExt(b: Buffer): ProbeResult | null {
  const sb = 1024;
  if (b.readUInt16LE(sb + 56) !== 0xef53) return null;
  const compat = b.readUInt32LE(sb + 92);
  const incompat = b.readUInt32LE(sb + 96);
  const roCompat = b.readUInt32LE(sb + 100);
  if (incompat & 0x0008) return { type: 'jbd', usage: 'raid' }; // an external journal device
  const hasJournal = (compat & 0x0004) !== 0;
  // As blkid: features ext3 does not know make it ext4; a journal without them, ext3.
  const ext3Unsupported = (incompat & ~(0x0002 | 0x0004 | 0x0010)) !== 0 || (roCompat & ~0x0007) !== 0;
  const type = ext3Unsupported ? 'ext4' : hasJournal ? 'ext3' : 'ext2';
  const r: ProbeResult = { type, usage: 'filesystem' };
  if (incompat & 0x0004) r.needsRecovery = true;
  return withOpt(r, cstr(b, sb + 120, 16), uuid16(b, sb + 104));
}

function probeXfs(b: Buffer): ProbeResult | null {
  if (ascii(b, 0, 4) !== 'XFSB') return null;
  return withOpt({ type: 'xfs', usage: 'filesystem' }, cstr(b, 108, 12), uuid16(b, 32));
}

function probeBtrfs(b: Buffer): ProbeResult | null {
  const sb = 0x10000;
  if (b.length < sb + 0x22b || ascii(b, sb + 64, 8) !== '_BHRfS_M') return null;
  return withOpt({ type: 'btrfs', usage: 'filesystem' }, cstr(b, sb + 0x12b, 256), uuid16(b, sb + 32));
}

function probeSwap(b: Buffer): ProbeResult | null {
  for (const page of [4096, 8192, 16384, 65536]) {
    if (page > b.length) break;
    const sig = ascii(b, page - 10, 10);
    if (sig === 'SWAPSPACE2') {
      return withOpt({ type: 'swap', usage: 'swap' }, cstr(b, 1024 + 28, 16), uuid16(b, 1024 + 12));
    }
    if (sig === 'SWAP-SPACE') return { type: 'swap', usage: 'swap' };
  }
  return null;
}

function probeNtfs(b: Buffer): ProbeResult | null {
  if (ascii(b, 3, 8) !== 'NTFS    ') return null;
  const serial = b.readBigUInt64LE(72);
  const uuid = serial === 0n ? undefined : serial.toString(16).toUpperCase().padStart(16, '0');
  return withOpt({ type: 'ntfs', usage: 'filesystem' }, undefined, uuid);
}

function probeVfat(b: Buffer): ProbeResult | null {
  if (b[510] !== 0x55 || b[511] !== 0xaa) return null;
  const jump = b[0] === 0xeb || b[0] === 0xe9;
  const bps = b.readUInt16LE(11);
  const spc = b[13] as number;
  const reserved = b.readUInt16LE(14);
  const fats = b[16] as number;
  const media = b[21] as number;
  const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  if (!jump || !pow2(bps) || bps < 512 || bps > 4096 || !pow2(spc) || reserved < 1) return null;
  if (fats < 1 || fats > 2 || (media !== 0xf0 && media < 0xf8)) return null;
  const fat32 = ascii(b, 82, 5) === 'FAT32';
  const fat1x = ascii(b, 54, 3) === 'FAT';
  if (!fat32 && !fat1x) return null;
  const base = fat32 ? 64 : 36; // drive number; boot signature at +2, serial +3, label +7
  let uuid: string | undefined;
  let label: string | undefined;
  if (b[base + 2] === 0x29 || b[base + 2] === 0x28) {
    const serial = b.readUInt32LE(base + 3);
    const hex = serial.toString(16).toUpperCase().padStart(8, '0');
    uuid = `${hex.slice(0, 4)}-${hex.slice(4)}`;
    const l = cstr(b, base + 7, 11, true);
    if (l !== 'NO NAME' && l !== '') label = l;
  }
  return withOpt({ type: 'vfat', usage: 'filesystem' }, label, uuid);
}

function probeIso(b: Buffer): ProbeResult | null {
  if (b.length < 0x8000 + 72 || ascii(b, 0x8001, 5) !== 'CD001') return null;
  return withOpt({ type: 'iso9660', usage: 'filesystem' }, cstr(b, 0x8028, 32, true), undefined);
}

/** Identify the contents of the first bytes of a volume (`PROBE_BYTES` of them, or fewer). */
export function probeBytes(first: Buffer): ProbeResult | null {
  const b =
    first.length >= PROBE_BYTES ? first : Buffer.concat([first, Buffer.alloc(PROBE_BYTES - first.length)]);
  return (
    probeLuks(b) ??
    probeLvm(b) ??
    probeExt(b) ??
    probeXfs(b) ??
    probeBtrfs(b) ??
    probeSwap(b) ??
    probeNtfs(b) ??
    probeVfat(b) ??
    probeIso(b)
  );
}

/** Probe a volume of `size` bytes through `readAt`. */
export async function probeVolume(readAt: VolumeReadAt, size: number): Promise<ProbeResult | null> {
  if (size < 4096) return null;
  return probeBytes(await readAt(0, Math.min(size, PROBE_BYTES)));
}
