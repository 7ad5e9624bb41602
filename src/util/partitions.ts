/**
 * A pure GPT + MBR partition table parser. It reads through a caller-supplied `readAt`, so it
 * works the same on a raw file, an NBD export or a stored checkpoint, and it never mounts, probes
 * filesystems or prints.
 *
 * Numbering follows Linux, so `index` matches the `sdaN`/`nbd0pN` the guest sees:
 *  - GPT: the 1-based slot in the partition entry array (empty slots leave gaps).
 *  - MBR: primary slots 1..4 (empty slots leave gaps); logical partitions inside the extended
 *    partition are numbered from 5 in EBR chain order. The extended container itself is listed
 *    too (as `sfdisk` and the kernel do) with `extended: true`; it holds no filesystem.
 *
 * Sector size: everything is read with 512-byte logical sectors. Disks with 4096-byte logical
 * sectors (4Kn) are assumed to be presented as 512e, which is what QEMU does for qcow2/raw images
 * unless a guest was configured with `logical_block_size=4096`; a 4Kn GPT (header at byte 4096)
 * is not recognised and reads as scheme 'none'.
 *
 * Damage handling: a GPT whose primary header or entry array fails its CRC32 (or is otherwise
 * inconsistent) falls back to the backup header in the disk's last sector; the reason is
 * reported in `warnings`. If neither copy is usable the result is scheme 'none' with a warning.
 * Broken EBR chains stop at the break (also with a warning) and keep what was found before it.
 */
import { crc32 } from './crc32';

/** Reads `length` bytes at byte `offset` of the disk. Short results are treated as zero-filled. */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

export interface Partition {
  /** 1-based, as Linux numbers them (see the module comment). */
  index: number;
  /** Byte offset of the first sector. */
  start: number;
  /** Length in bytes. */
  size: number;
  /** GPT partition type GUID, upper case (e.g. '0FC63DAF-8483-4772-8E79-3D69D8477DE4'). */
  typeGuid?: string;
  /** MBR partition type byte (e.g. 0x83). */
  mbrType?: number;
  /** GPT partition name (only when not empty). */
  name?: string;
  /**
   * GPT: the unique partition GUID (upper case). MBR: the PARTUUID Linux derives from the disk
   * signature, 'xxxxxxxx-NN' (lower case hex), when the disk signature is not zero.
   */
  uuid?: string;
  /** MBR only: true for the extended partition that holds the logical ones. */
  extended?: boolean;
  /** MBR only: the active (bootable) flag. */
  bootable?: boolean;
  scheme: 'gpt' | 'mbr';
}

export interface PartitionTable {
  scheme: 'gpt' | 'mbr' | 'none';
  /** Always 512 (see the module comment). */
  sectorSize: number;
  /** GPT disk GUID (upper case). */
  diskGuid?: string;
  /** MBR disk signature as sfdisk prints it ('0x1234abcd'). */
  diskId?: string;
  /** Sorted by `index`. */
  partitions: Partition[];
  /** Problems met while reading (damaged primary GPT, broken EBR chain...); absent when none. */
  warnings?: string[];
}

export const SECTOR_SIZE = 512;

const GPT_SIGNATURE = Buffer.from('EFI PART', 'latin1');
const GPT_MIN_HEADER_SIZE = 92;
/** Upper bound for the entry array we are willing to read (the usual one is 16 KiB). */
const GPT_MAX_ENTRIES_BYTES = 4 * 1024 * 1024;
const MBR_TYPE_PROTECTIVE = 0xee;
const MBR_EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const MAX_LOGICAL = 256;
/** Largest sector number whose byte offset is still a safe integer. */
const MAX_SAFE_LBA = Math.floor(Number.MAX_SAFE_INTEGER / SECTOR_SIZE);

/** Read exactly `length` bytes, zero-filling anything past the end of the disk or a short read. */
async function readExact(readAt: ReadAt, diskSize: number, offset: number, length: number): Promise<Buffer> {
  const avail = Math.max(0, Math.min(length, diskSize - offset));
  const got = avail > 0 ? await readAt(offset, avail) : Buffer.alloc(0);
  if (got.length === length) return got;
  const out = Buffer.alloc(length);
  got.copy(out, 0, 0, Math.min(got.length, length));
  return out;
}

/** GUID at `off` in the mixed-endian on-disk layout, formatted upper case. */
export function formatGuid(b: Buffer, off: number): string {
  const hex = (order: number[]): string =>
    order.map((i) => (b[off + i] as number).toString(16).padStart(2, '0')).join('');
  const parts = [
    [3, 2, 1, 0],
    [5, 4],
    [7, 6],
    [8, 9],
    [10, 11, 12, 13, 14, 15],
  ];
  return parts.map(hex).join('-').toUpperCase();
}

function isZero(b: Buffer, off: number, len: number): boolean {
  for (let i = off; i < off + len; i++) if (b[i] !== 0) return false;
  return true;
}

function u64(b: Buffer, off: number): number {
  const v = b.readBigUInt64LE(off);
  return v > BigInt(MAX_SAFE_LBA) ? Number.POSITIVE_INFINITY : Number(v);
}

// ---------------------------------------------------------------------------------------------
// GPT

interface GptHeader {
  myLba: number;
  altLba: number;
  firstUsable: number;
  lastUsable: number;
  diskGuid: string;
  entriesLba: number;
  numEntries: number;
  entrySize: number;
  entriesCrc: number;
}

/** Parse and check a GPT header sector; returns the reason as a string when it is not usable. */
function parseGptHeader(sec: Buffer, expectLba: number, totalSectors: number): GptHeader | string {
  if (!sec.subarray(0, 8).equals(GPT_SIGNATURE)) return 'no "EFI PART" signature';
  const headerSize = sec.readUInt32LE(12);
  if (headerSize < GPT_MIN_HEADER_SIZE || headerSize > SECTOR_SIZE) return `bad header size ${headerSize}`;
  const stored = sec.readUInt32LE(16);
  const copy = Buffer.from(sec.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== stored) return 'header CRC32 mismatch';
  const h: GptHeader = {
    myLba: u64(sec, 24),
    altLba: u64(sec, 32),
    firstUsable: u64(sec, 40),
    lastUsable: u64(sec, 48),
    diskGuid: formatGuid(sec, 56),
    entriesLba: u64(sec, 72),
    numEntries: sec.readUInt32LE(80),
    entrySize: sec.readUInt32LE(84),
    entriesCrc: sec.readUInt32LE(88),
  };
  if (h.myLba !== expectLba) return `header says it is at LBA ${h.myLba}, found at LBA ${expectLba}`;
  if (h.entrySize < 128 || h.entrySize % 8 !== 0) return `bad partition entry size ${h.entrySize}`;
  const bytes = h.numEntries * h.entrySize;
  if (bytes > GPT_MAX_ENTRIES_BYTES) return `partition entry array too large (${bytes} bytes)`;
  if (h.firstUsable > h.lastUsable + 1 || h.lastUsable >= totalSectors) {
    return `bad usable range ${h.firstUsable}..${h.lastUsable} for a disk of ${totalSectors} sectors`;
  }
  const entrySectors = Math.ceil(bytes / SECTOR_SIZE);
  if (h.entriesLba < 1 || h.entriesLba + entrySectors > totalSectors) {
    return `partition entry array at LBA ${h.entriesLba} lies outside the disk`;
  }
  return h;
}

interface GptResult {
  diskGuid: string;
  partitions: Partition[];
  warnings: string[];
}

async function readGptAt(
  readAt: ReadAt,
  diskSize: number,
  lba: number,
  totalSectors: number,
): Promise<GptResult | string> {
  const sec = await readExact(readAt, diskSize, lba * SECTOR_SIZE, SECTOR_SIZE);
  const h = parseGptHeader(sec, lba, totalSectors);
  if (typeof h === 'string') return h;
  const arr = await readExact(readAt, diskSize, h.entriesLba * SECTOR_SIZE, h.numEntries * h.entrySize);
  if (crc32(arr) !== h.entriesCrc) return 'partition entry array CRC32 mismatch';
  const partitions: Partition[] = [];
  const warnings: string[] = [];
  for (let i = 0; i < h.numEntries; i++) {
    const off = i * h.entrySize;
    if (isZero(arr, off, 16)) continue; // unused slot
    const first = u64(arr, off + 32);
    const last = u64(arr, off + 40);
    if (first > last || last > h.lastUsable || first < h.firstUsable) {
      warnings.push(
        `GPT entry ${i + 1} ignored: sectors ${first}..${last} outside ${h.firstUsable}..${h.lastUsable}`,
      );
      continue;
    }
    const p: Partition = {
      index: i + 1,
      start: first * SECTOR_SIZE,
      size: (last - first + 1) * SECTOR_SIZE,
      typeGuid: formatGuid(arr, off),
      uuid: formatGuid(arr, off + 16),
      scheme: 'gpt',
    };
    const nameRaw = arr.subarray(off + 56, off + Math.min(h.entrySize, 128));
    let end = 0;
    while (end + 1 < nameRaw.length && (nameRaw[end] !== 0 || nameRaw[end + 1] !== 0)) end += 2;
    if (end > 0) p.name = nameRaw.subarray(0, end).toString('utf16le');
    partitions.push(p);
  }
  return { diskGuid: h.diskGuid, partitions, warnings };
}

async function readGpt(readAt: ReadAt, diskSize: number, totalSectors: number): Promise<GptResult | string> {
  const primary = await readGptAt(readAt, diskSize, 1, totalSectors);
  if (typeof primary !== 'string') return primary;
  const lastLba = totalSectors - 1;
  if (lastLba <= 1) return `primary GPT header unusable (${primary}) and no room for a backup`;
  const backup = await readGptAt(readAt, diskSize, lastLba, totalSectors);
  if (typeof backup === 'string') {
    return `primary GPT header unusable (${primary}); backup at LBA ${lastLba} unusable (${backup})`;
  }
  backup.warnings.unshift(
    `primary GPT header unusable (${primary}); using the backup header at LBA ${lastLba}`,
  );
  return backup;
}

// ---------------------------------------------------------------------------------------------
// MBR

interface MbrEntry {
  status: number;
  type: number;
  startLba: number;
  sectors: number;
}

function hasMbrSignature(sec: Buffer): boolean {
  return sec[510] === 0x55 && sec[511] === 0xaa;
}

function mbrEntries(sec: Buffer): MbrEntry[] {
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const o = 446 + i * 16;
    out.push({
      status: sec[o] as number,
      type: sec[o + 4] as number,
      startLba: sec.readUInt32LE(o + 8),
      sectors: sec.readUInt32LE(o + 12),
    });
  }
  return out;
}

/** True when a 0x55AA sector looks like a FAT/NTFS boot sector (a BIOS parameter block). */
function looksLikeBootSector(sec: Buffer): boolean {
  const jump = sec[0] === 0xeb || sec[0] === 0xe9;
  const bps = sec.readUInt16LE(11);
  const spc = sec[13] as number;
  const reserved = sec.readUInt16LE(14);
  const fats = sec[16] as number;
  const media = sec[21] as number;
  const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  const ntfs = sec.subarray(3, 11).toString('latin1') === 'NTFS    ';
  return (
    jump &&
    bps >= 512 &&
    bps <= 4096 &&
    pow2(bps) &&
    pow2(spc) &&
    (ntfs || (reserved >= 1 && fats >= 1 && fats <= 2 && (media === 0xf0 || media >= 0xf8)))
  );
}

async function readMbr(
  readAt: ReadAt,
  diskSize: number,
  sec0: Buffer,
  diskIdNum: number,
): Promise<{ partitions: Partition[]; warnings: string[] }> {
  const partitions: Partition[] = [];
  const warnings: string[] = [];
  const partUuid = (index: number): string | undefined =>
    diskIdNum !== 0
      ? `${diskIdNum.toString(16).padStart(8, '0')}-${index.toString(16).padStart(2, '0')}`
      : undefined;
  const add = (p: Omit<Partition, 'scheme' | 'uuid'>): void => {
    const part: Partition = { ...p, scheme: 'mbr' };
    const uuid = partUuid(p.index);
    if (uuid !== undefined) part.uuid = uuid;
    partitions.push(part);
  };
  const entries = mbrEntries(sec0);
  let ext: { start: number; sectors: number } | undefined;
  entries.forEach((e, i) => {
    if (e.type === 0 || e.sectors === 0) return;
    const isExt = MBR_EXTENDED_TYPES.has(e.type);
    const p: Omit<Partition, 'scheme' | 'uuid'> = {
      index: i + 1,
      start: e.startLba * SECTOR_SIZE,
      size: e.sectors * SECTOR_SIZE,
      mbrType: e.type,
    };
    if (e.status === 0x80) p.bootable = true;
    if (isExt) {
      p.extended = true;
      if (ext === undefined) ext = { start: e.startLba, sectors: e.sectors };
      else warnings.push(`more than one extended partition; ignoring the one in slot ${i + 1}`);
    }
    add(p);
  });
  if (ext === undefined) return { partitions, warnings };

  // Walk the EBR chain. Each EBR holds a data partition (relative to the EBR) and a link to the
  // next EBR (relative to the start of the extended partition).
  const extStart = ext.start;
  const extEnd = ext.start + ext.sectors;
  const seen = new Set<number>();
  let ebr = extStart;
  let next = 5;
  for (;;) {
    if (seen.has(ebr)) {
      warnings.push(`EBR chain loops back to sector ${ebr}; stopped`);
      break;
    }
    if (seen.size >= MAX_LOGICAL) {
      warnings.push(`more than ${MAX_LOGICAL} logical partitions; stopped`);
      break;
    }
    seen.add(ebr);
    if ((ebr + 1) * SECTOR_SIZE > diskSize) {
      warnings.push(`EBR at sector ${ebr} lies beyond the end of the disk; stopped`);
      break;
    }
    const sec = await readExact(readAt, diskSize, ebr * SECTOR_SIZE, SECTOR_SIZE);
    if (!hasMbrSignature(sec)) {
      warnings.push(`EBR at sector ${ebr} has no 0x55AA signature; stopped`);
      break;
    }
    const es = mbrEntries(sec);
    es.forEach((e, i) => {
      if (e.sectors === 0 || e.type === 0 || MBR_EXTENDED_TYPES.has(e.type)) return;
      const start = ebr + e.startLba;
      // Like Linux: the 3rd and 4th entries often hold garbage; only trust them when they fit.
      if (i >= 2 && (start < extStart || start + e.sectors > extEnd)) return;
      const p: Omit<Partition, 'scheme' | 'uuid'> = {
        index: next++,
        start: start * SECTOR_SIZE,
        size: e.sectors * SECTOR_SIZE,
        mbrType: e.type,
      };
      if (e.status === 0x80) p.bootable = true;
      add(p);
    });
    const link = es.find((e) => e.sectors !== 0 && MBR_EXTENDED_TYPES.has(e.type));
    if (link === undefined) break;
    ebr = extStart + link.startLba;
  }
  return { partitions, warnings };
}

// ---------------------------------------------------------------------------------------------

/**
 * Read the partition table of a disk of `diskSize` bytes.
 *
 * Order of decisions: a 0x55AA sector 0 with a type 0xEE entry is a protective (or hybrid) MBR,
 * so the GPT is read (primary, then backup). A sector 0 without 0x55AA is still checked for a
 * GPT header at LBA 1 (a wiped protective MBR). Otherwise a 0x55AA sector 0 is an MBR unless it
 * is the boot sector of a filesystem written to the whole disk (invalid boot flags, or a FAT/NTFS
 * BIOS parameter block and no partition entries), which is scheme 'none'.
 */
export async function readPartitionTable(readAt: ReadAt, diskSize: number): Promise<PartitionTable> {
  const totalSectors = Math.floor(diskSize / SECTOR_SIZE);
  const none = (warnings: string[] = []): PartitionTable => {
    const t: PartitionTable = { scheme: 'none', sectorSize: SECTOR_SIZE, partitions: [] };
    if (warnings.length > 0) t.warnings = warnings;
    return t;
  };
  if (totalSectors < 1) return none();
  const sec0 = await readExact(readAt, diskSize, 0, SECTOR_SIZE);
  const mbrSig = hasMbrSignature(sec0);
  const entries = mbrEntries(sec0);
  const protective = mbrSig && entries.some((e) => e.type === MBR_TYPE_PROTECTIVE);

  if (protective || (!mbrSig && totalSectors >= 3)) {
    const gpt = await readGpt(readAt, diskSize, totalSectors);
    if (typeof gpt !== 'string') {
      const t: PartitionTable = {
        scheme: 'gpt',
        sectorSize: SECTOR_SIZE,
        diskGuid: gpt.diskGuid,
        partitions: sanePartitions(gpt.partitions, diskSize, gpt.warnings),
      };
      if (!protective) gpt.warnings.unshift('GPT found without a protective MBR');
      if (gpt.warnings.length > 0) t.warnings = gpt.warnings;
      return t;
    }
    if (protective) return none([`protective MBR present but no usable GPT: ${gpt}`]);
    return none();
  }
  if (!mbrSig) return none();

  // 0x55AA present: a DOS partition table or the boot sector of a whole-disk filesystem.
  if (entries.some((e) => e.status !== 0x00 && e.status !== 0x80)) return none();
  const used = entries.filter((e) => e.type !== 0 && e.sectors !== 0);
  if (used.length === 0 && looksLikeBootSector(sec0)) return none();

  const diskIdNum = sec0.readUInt32LE(440);
  const mbr = await readMbr(readAt, diskSize, sec0, diskIdNum);
  const warnings = mbr.warnings;
  mbr.partitions.sort((a, b) => a.index - b.index);
  const partitions = sanePartitions(mbr.partitions, diskSize, warnings);
  const t: PartitionTable = {
    scheme: 'mbr',
    sectorSize: SECTOR_SIZE,
    diskId: '0x' + diskIdNum.toString(16).padStart(8, '0'),
    partitions,
  };
  if (warnings.length > 0) t.warnings = warnings;
  return t;
}

/**
 * What a hostile table may not do to its readers: a partition that starts beyond the end of the
 * disk is dropped, one that runs past it is cut at the end (as Linux does), both with a warning,
 * so every partition returned lies inside the disk. Overlapping partitions are kept (Linux keeps
 * them too) but reported: primaries (and the extended container) among themselves, logical
 * partitions among themselves and against their container, GPT entries among themselves.
 */
function sanePartitions(parts: Partition[], diskSize: number, warnings: string[]): Partition[] {
  const out: Partition[] = [];
  for (const p of parts) {
    if (p.start >= diskSize) {
      warnings.push(
        `partition ${p.index} starts at byte ${p.start}, beyond the end of the disk (${diskSize}); ignored`,
      );
      continue;
    }
    if (p.start + p.size > diskSize) {
      warnings.push(
        `partition ${p.index} ends at byte ${p.start + p.size}, past the end of the disk (${diskSize}); cut at the end of the disk`,
      );
      out.push({ ...p, size: diskSize - p.start });
      continue;
    }
    out.push(p);
  }
  const overlaps = (group: Partition[]): void => {
    const sorted = [...group].sort((a, b) => a.start - b.start || a.index - b.index);
    let reach: Partition | undefined;
    for (const p of sorted) {
      if (reach && p.start < reach.start + reach.size) {
        warnings.push(`partitions ${reach.index} and ${p.index} overlap`);
      }
      if (!reach || p.start + p.size > reach.start + reach.size) reach = p;
    }
  };
  if (out.some((p) => p.scheme === 'mbr')) {
    overlaps(out.filter((p) => p.index <= 4));
    const logical = out.filter((p) => p.index > 4);
    overlaps(logical);
    const ext = out.find((p) => p.extended);
    for (const l of logical) {
      if (ext && (l.start < ext.start || l.start + l.size > ext.start + ext.size)) {
        warnings.push(`logical partition ${l.index} lies outside its extended partition ${ext.index}`);
      }
    }
  } else {
    overlaps(out);
  }
  return out;
}

const GPT_TYPES: Record<string, string> = {
  'C12A7328-F81F-11D2-BA4B-00A0C93EC93B': 'EFI System',
  '024DEE41-33E7-11D3-9D69-0008C781F39F': 'MBR partition scheme',
  '21686148-6449-6E6F-744E-656564454649': 'BIOS boot',
  'E3C9E316-0B5C-4DB8-817D-F92DF00215AE': 'Microsoft reserved',
  'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7': 'Microsoft basic data',
  '5808C8AA-7E8F-42E0-85D2-E1E90434CFB3': 'Microsoft LDM metadata',
  'AF9B60A0-1431-4F62-BC68-3311714A69AD': 'Microsoft LDM data',
  'DE94BBA4-06D1-4D40-A16A-BFD50179D6AC': 'Windows recovery environment',
  'E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D': 'Microsoft Storage Spaces',
  '0FC63DAF-8483-4772-8E79-3D69D8477DE4': 'Linux filesystem',
  '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F': 'Linux swap',
  'E6D6D379-F507-44C2-A23C-238F2A3DF928': 'Linux LVM',
  'A19D880F-05FC-4D3B-A006-743F0F84911E': 'Linux RAID',
  '933AC7E1-2EB4-4F13-B844-0E14E2AEF915': 'Linux home',
  '3B8F8425-20E0-4F3B-907F-1A25A76F98E8': 'Linux server data',
  '44479540-F297-41B2-9AF7-D131D5F0458A': 'Linux root (x86)',
  '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709': 'Linux root (x86-64)',
  '69DAD710-2CE4-4E3C-B16C-21A1D49ABED3': 'Linux root (ARM)',
  'B921B045-1DF0-41C3-AF44-4C6F280D3FAE': 'Linux root (ARM-64)',
  '75250D76-8CC6-458E-BD66-BD47CC81A812': 'Linux /usr (x86)',
  '8484680C-9521-48C6-9C11-B0720656F69E': 'Linux /usr (x86-64)',
  '7D0359A3-02B3-4F0A-865C-654403E70625': 'Linux /usr (ARM)',
  'B0E01050-EE5F-4390-949A-9101B17104E9': 'Linux /usr (ARM-64)',
  '8DA63339-0007-60C0-C436-083AC8230908': 'Linux reserved',
  '4D21B016-B534-45C2-A9FB-5C16E091FD2D': 'Linux variable data',
  '7EC6F557-3BC5-4ACA-B293-16EF5DF639D1': 'Linux temporary data',
  'CA7D7CCB-63ED-4C53-861C-1742536059CC': 'Linux LUKS',
  'BC13C2FF-59E6-4262-A352-B275FD6F7172': 'Linux extended boot',
  '48465300-0000-11AA-AA11-00306543ECAC': 'Apple HFS/HFS+',
  '7C3457EF-0000-11AA-AA11-00306543ECAC': 'Apple APFS',
  '516E7CB4-6ECF-11D6-8FF8-00022D09712B': 'FreeBSD data',
  '516E7CB5-6ECF-11D6-8FF8-00022D09712B': 'FreeBSD swap',
  '516E7CB6-6ECF-11D6-8FF8-00022D09712B': 'FreeBSD UFS',
  '516E7CBA-6ECF-11D6-8FF8-00022D09712B': 'FreeBSD ZFS',
};

/** Human name of a GPT partition type GUID (any case), as `sfdisk` names it; undefined if unknown. */
export function gptTypeName(guid: string): string | undefined {
  return GPT_TYPES[guid.toUpperCase()];
}

const MBR_TYPES: Record<number, string> = {
  0x01: 'FAT12',
  0x04: 'FAT16 <32M',
  0x05: 'Extended',
  0x06: 'FAT16',
  0x07: 'HPFS/NTFS/exFAT',
  0x0b: 'W95 FAT32',
  0x0c: 'W95 FAT32 (LBA)',
  0x0e: 'W95 FAT16 (LBA)',
  0x0f: "W95 Ext'd (LBA)",
  0x27: 'Hidden NTFS WinRE',
  0x82: 'Linux swap / Solaris',
  0x83: 'Linux',
  0x85: 'Linux extended',
  0x8e: 'Linux LVM',
  0xa5: 'FreeBSD',
  0xee: 'GPT',
  0xef: 'EFI (FAT-12/16/32)',
  0xfd: 'Linux raid autodetect',
};

/** Human name of an MBR partition type byte, as `sfdisk` names it; undefined if unknown. */
export function mbrTypeName(type: number): string | undefined {
  return MBR_TYPES[type];
}

/** True for MBR types that are extended-partition containers (0x05, 0x0F, 0x85). */
export function isExtendedMbrType(type: number): boolean {
  return MBR_EXTENDED_TYPES.has(type);
}
