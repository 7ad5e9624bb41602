/**
 * The volumes of one checkpoint: every partition of every disk (from bkfs' own GPT/MBR parser, so
 * no kernel partition scanning is involved), or the whole disk when it has no table, each probed
 * for its filesystem (`probe.ts`). LVM logical volumes are added by the engine that can see inside
 * physical volumes (libguestfs). Cost: one read of the table sectors and one 68 KiB read per
 * partition, through the checkpoint's reader; nothing is mounted.
 */
import { BkfsError } from '../errors';
import { gptTypeName, mbrTypeName, readPartitionTable, type PartitionTable } from '../util/partitions';
import { formatVolumeSpec, partitionId, type VolumeSpec } from './address';
import { probeVolume, type ProbeResult } from './probe';

export interface DiskSource {
  name: string;
  size: number;
  readAt(offset: number, length: number): Promise<Buffer>;
}

export interface DiskInfo {
  name: string;
  size: number;
  table: PartitionTable;
}

export interface Volume {
  /** `vda2`, `vdb` (whole disk) or `vg/lv`. */
  id: string;
  /** Disk and partition (0 = whole disk); absent for logical volumes. */
  disk?: string;
  partition?: number;
  /** Byte range on the disk (partitions and whole disks). */
  offset: number;
  size: number;
  probe: ProbeResult | null;
  /** GPT partition GUID or MBR PARTUUID. */
  partUuid?: string;
  /** GPT partition name. */
  partLabel?: string;
  /** Partition type, human-readable. */
  partType?: string;
  lv?: { vg: string; lv: string };
}

export interface VolumeSet {
  disks: DiskInfo[];
  volumes: Volume[];
}

/** Read every disk's partition table and probe each partition (or the whole disk). */
export async function discoverVolumes(disks: readonly DiskSource[]): Promise<VolumeSet> {
  const infos: DiskInfo[] = [];
  const volumes: Volume[] = [];
  for (const d of disks) {
    const readAt = (o: number, l: number): Promise<Buffer> => d.readAt(o, l);
    const table = await readPartitionTable(readAt, d.size);
    infos.push({ name: d.name, size: d.size, table });
    if (table.scheme === 'none') {
      const probe = await probeVolume(readAt, d.size);
      volumes.push({ id: d.name, disk: d.name, partition: 0, offset: 0, size: d.size, probe });
      continue;
    }
    for (const p of table.partitions) {
      if (p.extended) continue;
      const size = Math.max(0, Math.min(p.size, d.size - p.start));
      const probe = await probeVolume((o, l) => d.readAt(p.start + o, Math.min(l, size - o)), size);
      const v: Volume = {
        id: partitionId(d.name, p.index),
        disk: d.name,
        partition: p.index,
        offset: p.start,
        size,
        probe,
      };
      if (p.uuid !== undefined) v.partUuid = p.uuid;
      if (p.name !== undefined) v.partLabel = p.name;
      const t =
        p.typeGuid !== undefined
          ? gptTypeName(p.typeGuid)
          : p.mbrType !== undefined
            ? mbrTypeName(p.mbrType)
            : undefined;
      if (t !== undefined) v.partType = t;
      volumes.push(v);
    }
  }
  return { disks: infos, volumes };
}

/** True when the volume holds a filesystem that can be mounted (by some engine). */
export function isFilesystem(v: Volume): boolean {
  return v.probe?.usage === 'filesystem';
}

function describeList(set: VolumeSet): string {
  const fs = set.volumes.map((v) => `${v.id}${v.probe ? ` (${v.probe.type})` : ''}`);
  return fs.length > 0 ? fs.join(', ') : 'none';
}

/** The volume a spec names; NOT_FOUND (listing what exists) if there is none. */
export function findVolume(set: VolumeSet, spec: VolumeSpec, where: string): Volume {
  let v: Volume | undefined;
  switch (spec.kind) {
    case 'partition': {
      const disk = set.disks.find((d) => d.name === spec.disk);
      if (!disk) {
        throw new BkfsError(
          'NOT_FOUND',
          `${where} has no disk '${spec.disk}' (disks: ${set.disks.map((d) => d.name).join(', ')})`,
          { noVolume: true },
        );
      }
      v = set.volumes.find((x) => x.disk === spec.disk && x.partition === spec.partition);
      if (!v) {
        const parts = set.volumes.filter((x) => x.disk === spec.disk).map((x) => x.partition);
        const has =
          disk.table.scheme === 'none'
            ? 'it has no partition table'
            : `partitions: ${parts.join(', ') || 'none'}`;
        throw new BkfsError(
          'NOT_FOUND',
          `${where}: disk ${spec.disk} has no partition ${spec.partition} (${has})`,
        );
      }
      break;
    }
    case 'disk': {
      const disk = set.disks.find((d) => d.name === spec.disk);
      if (!disk) {
        throw new BkfsError(
          'NOT_FOUND',
          `${where} has no disk '${spec.disk}' (disks: ${set.disks.map((d) => d.name).join(', ')})`,
          { noVolume: true },
        );
      }
      v = set.volumes.find((x) => x.disk === spec.disk && x.partition === 0);
      if (!v) {
        const parts = set.volumes
          .filter((x) => x.disk === spec.disk)
          .map((x) => `${spec.disk}:${x.partition}`);
        throw new BkfsError(
          'NOT_FOUND',
          `${where}: disk ${spec.disk} has a ${disk.table.scheme.toUpperCase()} partition table; name a partition (${parts.join(', ')})`,
        );
      }
      break;
    }
    case 'lv':
      v = set.volumes.find((x) => x.lv?.vg === spec.vg && x.lv.lv === spec.lv);
      break;
    case 'label':
      v = set.volumes.find((x) => x.probe?.label === spec.value);
      break;
    case 'uuid':
      v = set.volumes.find((x) => x.probe?.uuid?.toLowerCase() === spec.value.toLowerCase());
      break;
  }
  if (!v) {
    const lvmHint =
      spec.kind === 'lv' &&
      set.volumes.some((x) => x.probe?.type === 'LVM2_member') &&
      !set.volumes.some((x) => x.lv)
        ? ' (logical volumes are listed only by the libguestfs engine)'
        : '';
    throw new BkfsError(
      'NOT_FOUND',
      `${where} has no volume ${formatVolumeSpec(spec)}${lvmHint} (volumes: ${describeList(set)})`,
      { noVolume: true },
    );
  }
  return v;
}

/**
 * Why a volume cannot be read as a filesystem (LUKS, LVM container, swap, nothing recognised), or
 * undefined when it can.
 */
export function notAFilesystem(v: Volume): string | undefined {
  const p = v.probe;
  if (!p) return `${v.id} holds no recognisable filesystem`;
  if (p.type === 'crypto_LUKS') {
    return `${v.id} is an encrypted volume (LUKS${p.version ? `${p.version}` : ''}); bkfs cannot open it`;
  }
  if (p.type === 'LVM2_member') return `${v.id} is an LVM physical volume; name a logical volume (VG/LV)`;
  if (p.usage === 'swap') return `${v.id} is swap space, not a filesystem`;
  if (p.usage !== 'filesystem') return `${v.id} holds ${p.type}, not a filesystem`;
  return undefined;
}
