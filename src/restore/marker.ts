/**
 * Restore markers: proof that a file holds a checkpoint, for `restore --since`.
 *
 * An incremental restore writes only what differs between two checkpoints, so it is right only if
 * the target holds the older one byte for byte. After every restore into a file (raw or qcow2), bkfs
 * writes a sidecar `FILE.bkfs-restore.json` (0600, temp file + fsync + rename + directory fsync):
 *
 *   { magic: "bkfs-restore", version: 1, repo, vm, checkpoint: {uid, name}, disk, virtualSize,
 *     mapDigest, file: {size, mtimeNs, ctimeNs, ino}, written }
 *
 * `mapDigest` = the disk's block-map digest at that checkpoint (`disk_maps.digest`, format 2; the
 * same value computed from the index for format 1): it names the content, not just the name, so a
 * checkpoint re-created under the same name does not match. `file` is the target's `stat` right
 * after the restore: any later write (a VM that booted from the restored disk, a `qemu-img`
 * operation, a copy moved in its place) changes mtime/ctime/size/inode, and `--since` refuses.
 * Before an update writes anything, the marker is removed, so an interrupted restore leaves no
 * claim. `--verify-target` replaces the marker check with a full comparison of the target with the
 * older checkpoint. NBD targets carry no marker: `--since` needs `--verify-target` there.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import type { Repository } from '../repo/repository';
import type { DiskRow } from '../index/catalog';
import { encodeSums, sumsDigest, sumsFromIndex } from '../index/mapsum';
import { indexFormat } from '../index/migrate';
import { fsyncDirSync, writeFileDurable } from '../util/private-fs';

export const MARKER_SUFFIX = '.bkfs-restore.json';
const MAGIC = 'bkfs-restore';

export interface RestoreMarker {
  magic: typeof MAGIC;
  version: 1;
  repo: string;
  vm: string;
  checkpoint: { uid: string; name: string };
  disk: string;
  virtualSize: number;
  mapDigest: string;
  file: { size: string; mtimeNs: string; ctimeNs: string; ino: string };
  written: string;
}

export interface MarkerSubject {
  repo: string;
  vm: string;
  uid: string;
  name: string;
  disk: DiskRow;
  mapDigest: string;
}

export function markerPath(file: string): string {
  return file + MARKER_SUFFIX;
}

/** The block-map digest of a checkpoint-disk (hex). */
export function diskMapDigest(repo: Repository, disk: DiskRow): string {
  if (indexFormat(repo.db) >= 2) {
    const r = repo.db.prepare('SELECT digest FROM disk_maps WHERE disk_id = ?').get(disk.id) as
      { digest: Buffer } | undefined;
    if (r) return r.digest.toString('hex');
  }
  const sums = encodeSums(sumsFromIndex(repo.db, disk.id));
  return sumsDigest(disk.virtual_size, repo.config.pageSpan, sums).toString('hex');
}

/** Remove a file's marker (durably) before anything writes to the file. */
export function removeMarker(file: string): void {
  const p = markerPath(file);
  if (!fs.existsSync(p)) return;
  fs.rmSync(p, { force: true });
  fsyncDirSync(path.dirname(path.resolve(p)));
}

/** Record that `file` now holds `s` (call after the file is complete, durable and in place). */
export function writeMarker(file: string, s: MarkerSubject): void {
  const st = fs.statSync(file, { bigint: true });
  const m: RestoreMarker = {
    magic: MAGIC,
    version: 1,
    repo: s.repo,
    vm: s.vm,
    checkpoint: { uid: s.uid, name: s.name },
    disk: s.disk.name,
    virtualSize: s.disk.virtual_size,
    mapDigest: s.mapDigest,
    file: {
      size: st.size.toString(),
      mtimeNs: st.mtimeNs.toString(),
      ctimeNs: st.ctimeNs.toString(),
      ino: st.ino.toString(),
    },
    written: new Date().toISOString(),
  };
  writeFileDurable(markerPath(file), Buffer.from(JSON.stringify(m, null, 2) + '\n'), 0o600);
}

/**
 * Check that `file` still holds `s` as bkfs's own restore left it; TARGET_MISMATCH (one line)
 * otherwise.
 */
export function checkMarker(file: string, s: MarkerSubject): void {
  const ref = `${s.vm}@${s.name}`;
  const how = 'restore without --since, or add --verify-target to compare it in full';
  const p = markerPath(file);
  let m: RestoreMarker;
  try {
    m = JSON.parse(fs.readFileSync(p, 'utf8')) as RestoreMarker;
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'has no' : 'has an unreadable';
    throw new BkfsError(
      'TARGET_MISMATCH',
      `${file} ${why} bkfs restore marker (${path.basename(p)}), so nothing shows that it holds ${ref}: ${how}`,
    );
  }
  if (m?.magic !== MAGIC || typeof m.file !== 'object' || m.file === null) {
    throw new BkfsError('TARGET_MISMATCH', `${p} is not a bkfs restore marker: ${how}`);
  }
  if (m.repo !== s.repo || m.vm !== s.vm || m.checkpoint?.uid !== s.uid || m.disk !== s.disk.name) {
    throw new BkfsError(
      'TARGET_MISMATCH',
      `${file} holds ${m.vm}@${m.checkpoint?.name} disk ${m.disk}${m.repo !== s.repo ? ' of another repository' : ''}, not ${ref} disk ${s.disk.name}: ${how}`,
    );
  }
  if (m.mapDigest !== s.mapDigest || m.virtualSize !== s.disk.virtual_size) {
    throw new BkfsError(
      'TARGET_MISMATCH',
      `${file} was restored from a different ${ref} (block-map digest differs): ${how}`,
    );
  }
  let st: fs.BigIntStats;
  try {
    st = fs.statSync(file, { bigint: true });
  } catch (e) {
    throw new BkfsError('TARGET_MISMATCH', `${file}: ${(e as Error).message}`);
  }
  const changed: string[] = [];
  if (st.size.toString() !== m.file.size) changed.push('size');
  if (st.mtimeNs.toString() !== m.file.mtimeNs) changed.push('mtime');
  if (st.ctimeNs.toString() !== m.file.ctimeNs) changed.push('ctime');
  if (st.ino.toString() !== m.file.ino) changed.push('inode');
  if (changed.length > 0) {
    throw new BkfsError(
      'TARGET_MISMATCH',
      `${file} was modified after bkfs restored ${ref} into it (${changed.join(', ')} changed; e.g. a VM ran from it): ${how}`,
    );
  }
}
