/**
 * `bkfs repair --rebuild-index`: recreates `index.db` from the packs and the manifests.
 *
 * Sources: packs describe their chunks (record headers: hash, lengths, codec), which gives the
 * `packs` and `chunks` tables; each manifest (`manifest.ts`) gives one checkpoint's catalogue rows,
 * configurations, disks and complete block map with chunk hashes. Checkpoint and disk ids are the
 * original ones (kept in the manifests), so chains, extent origins and reader pins stay valid;
 * chunk, pack and page ids are new. Identical pages are stored once, so the rebuilt index shares
 * pages as the original did. Manifests named by a forget journal are skipped (a forgotten
 * checkpoint never comes back).
 *
 * Oddities are reported, not fatal: a pack with a bad header or a torn record is indexed up to the
 * damage; a hash present in several packs is indexed once, from the first copy that decodes and
 * matches its hash; a chunk a manifest needs but no pack has gets a placeholder row marked
 * damaged, and its checkpoints are marked damaged (a later backup of the same data heals them).
 *
 * Crash safety: the new index is built as `index.db.rebuild`, fsynced and renamed to
 * `index.db.new`; then the old `index.db` (and its -wal/-shm) is moved aside to
 * `index.db.broken-<time>`, and `index.db.new` renamed to `index.db`. A crash before the swap
 * leaves the old index in use; a crash in the middle of it is finished by the next
 * `Repository.open`. Locking: the writer lock (taken without opening the index), and it refuses to
 * run while readers hold pins (they use the old index's ids and locations).
 * Memory: hash -> chunk id map (about 100 bytes per chunk) and one manifest at a time.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { BkfsError } from '../errors';
import { SCHEMA } from '../index/schema';
import type { Cipher } from '../crypto/cipher';
import { registerCipher, unlock } from '../crypto/keyring';
import { pageSum, writeDiskSums, type PageSum, type SumExtent } from '../index/mapsum';
import { decodeStored, hashChunk } from '../store/codec';
import {
  PACK_FLAG_SEALED,
  PACK_HEADER_LEN,
  PACK_MAGIC,
  PACK_VERSION,
  PACK_VERSION_TRAILER,
  PACK_VERSION_SEALED_TRAILER,
  RECORD_HEADER_LEN,
  RECORD_MAGIC,
  TRAILER_FOOTER_LEN,
  decodePackTrailer,
  decodeRecordHeader,
  packPath,
  trailerLength,
} from '../store/packs';
import { manifestKey, packKey, remoteStore } from '../store/location';
import type { ObjectStore } from '../store/objstore';
import { DB_FILE, DB_NEW_FILE, Repository, acquireWriterLock, crashPoint, loadConfig } from './repository';
import { activePins } from './pins';
import {
  decodeManifest,
  readManifestBytes,
  storedConfig,
  finishForgetJournals,
  forgottenInJournals,
  fsyncDirSync,
  listManifestUids,
  manifestPath,
  type Manifest,
} from './manifest';
import { PENDING_FILE, packObjects, refreshCheckpointDamage } from './gc';
import { mkdirPrivateSync, precreateDbFile, repoModes } from '../util/private-fs';

const BUILD_FILE = 'index.db.rebuild';

export interface RebuildOptions {
  onProgress?: (phase: 'packs' | 'manifests', done: number, total: number) => void;
}

export interface RebuildReport {
  packs: number;
  chunks: number;
  /** Extra copies of a chunk found in more than one pack (dead space; gc removes it). */
  duplicateChunks: number;
  manifests: number;
  vms: number;
  checkpoints: number;
  /** Manifests skipped because a forget journal names them. */
  skippedForgotten: number;
  /** Chunks a manifest needs that no pack holds. */
  missingChunks: number;
  damagedCheckpoints: string[];
  problems: string[];
  /** Where the old index went (null when there was none). */
  oldIndex: string | null;
  /** Object storage: packs read by their trailer (tail GETs) and whole. */
  remoteReads: { tailReads: number; wholeReads: number };
}

interface ScannedChunk {
  pack: number;
  packName: string;
  offset: number;
  storedLen: number;
  rawLen: number;
  codec: number;
  hash: Buffer;
}

function fsyncFile(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function rmDbFiles(base: string): void {
  for (const suffix of ['', '-wal', '-shm', '-journal']) fs.rmSync(`${base}${suffix}`, { force: true });
}

/** Read every record header of a pack; returns the chunks up to the first problem. */
function scanPack(
  file: string,
  name: string,
  packId: number,
  problems: string[],
  chunkSize: number,
  sealed: boolean,
): ScannedChunk[] {
  const out: ScannedChunk[] = [];
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    problems.push(`pack ${name} cannot be opened: ${(e as Error).message}`);
    return out;
  }
  try {
    let size = fs.fstatSync(fd).size;
    const head = Buffer.alloc(PACK_HEADER_LEN);
    if (
      fs.readSync(fd, head, 0, PACK_HEADER_LEN, 0) !== PACK_HEADER_LEN ||
      !head.subarray(0, 8).equals(PACK_MAGIC) ||
      ![PACK_VERSION, PACK_VERSION_TRAILER, PACK_VERSION_SEALED_TRAILER].includes(head.readUInt32BE(8))
    ) {
      problems.push(`pack ${name} has no valid pack header; skipped`);
      return out;
    }
    if (((head.readUInt32BE(12) & PACK_FLAG_SEALED) !== 0) !== sealed) {
      problems.push(
        `pack ${name} is ${sealed ? 'not sealed in an encrypted' : 'sealed in a plain'} repository; skipped`,
      );
      return out;
    }
    // A sealed trailer (version 3) starts where its clear footer says, unchecked without opening
    // it: the scan reads records until one does not start there with a record magic (a sealed
    // trailer never does), so a forged footer cannot hide records.
    let sealedTrailerAt = -1;
    if (head.readUInt32BE(8) !== PACK_VERSION) {
      // The records end where the trailer starts; a damaged trailer: scan up to the damage.
      const foot = Buffer.alloc(Math.min(size, TRAILER_FOOTER_LEN));
      fs.readSync(fd, foot, 0, foot.length, size - foot.length);
      const tl = trailerLength(foot, size);
      if (tl?.sealed) sealedTrailerAt = tl.recordsEnd;
      else if (tl) size = tl.recordsEnd;
    }
    const rh = Buffer.alloc(RECORD_HEADER_LEN);
    let pos = PACK_HEADER_LEN;
    while (pos < size) {
      const n = fs.readSync(fd, rh, 0, RECORD_HEADER_LEN, pos);
      if (pos === sealedTrailerAt && !rh.subarray(0, 4).equals(RECORD_MAGIC)) break;
      if (n < RECORD_HEADER_LEN) {
        problems.push(`pack ${name} ends with a torn record at ${pos}`);
        break;
      }
      let h;
      try {
        h = decodeRecordHeader(rh, chunkSize, sealed);
      } catch (e) {
        problems.push(
          `pack ${name} has a damaged record header at ${pos} (${(e as Error).message}); the rest of the pack is skipped`,
        );
        break;
      }
      const start = pos + RECORD_HEADER_LEN;
      if (start + h.storedLen > size) {
        problems.push(`pack ${name} is truncated inside the record at ${pos}`);
        break;
      }
      out.push({
        pack: packId,
        packName: name,
        offset: start,
        storedLen: h.storedLen,
        rawLen: h.rawLen,
        codec: h.codec,
        hash: h.hash,
      });
      pos = start + h.storedLen;
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

/**
 * The chunks of a pack object in a bucket: its trailer (version 2; version 3 sealed, opened with
 * the repository's key) from one ranged GET of the tail (a second one if the trailer is longer),
 * else (version 1, or a damaged trailer, or a sealed one that does not open: changed, or moved
 * from another pack) the whole object, downloaded into `tmp/` and scanned as a file. In an
 * encrypted repository a plain trailer is taken only from a pack whose header says version 2
 * (written before sealed trailers; one more 16-byte GET).
 */
async function scanRemotePack(
  store: ObjectStore,
  tmpDir: string,
  name: string,
  size: number,
  packId: number,
  problems: string[],
  chunkSize: number,
  stats: { tailReads: number; wholeReads: number },
  cipher: Cipher | null,
): Promise<ScannedChunk[]> {
  const sealed = cipher !== null;
  const key = packKey(name);
  if (size >= PACK_HEADER_LEN + TRAILER_FOOTER_LEN) {
    const tailLen = Math.min(size, 64 << 10);
    let tail = await store.getRange(key, size - tailLen, tailLen);
    stats.tailReads++;
    const tl = trailerLength(tail, size);
    if (tl) {
      if (tl.length > tail.length) tail = await store.getRange(key, size - tl.length, tl.length);
      else tail = tail.subarray(tail.length - tl.length);
      try {
        let allowPlain = true;
        if (cipher && !tl.sealed) {
          const head = await store.getRange(key, 0, PACK_HEADER_LEN);
          allowPlain = head.length === PACK_HEADER_LEN && head.readUInt32BE(8) === PACK_VERSION_TRAILER;
        }
        const key5 = cipher ? { cipher, pack: name } : undefined;
        return decodePackTrailer(tail, size, chunkSize, key5, allowPlain).map((c) => ({
          pack: packId,
          packName: name,
          offset: c.offset,
          storedLen: c.storedLen,
          rawLen: c.rawLen,
          codec: c.codec,
          hash: c.hash,
        }));
      } catch (e) {
        problems.push(`pack ${name}: ${(e as Error).message}; the whole pack is read instead`);
      }
    }
  }
  stats.wholeReads++;
  const file = path.join(tmpDir, `${name}.pack.download`);
  fs.writeFileSync(file, await store.get(key), { mode: 0o600 });
  try {
    return scanPack(file, name, packId, problems, chunkSize, sealed);
  } finally {
    fs.rmSync(file, { force: true });
  }
}

async function remoteChunkIsGood(
  store: ObjectStore,
  c: ScannedChunk,
  chunkSize: number,
  cipher: Cipher | null,
): Promise<boolean> {
  try {
    const buf = await store.getRange(packKey(c.packName), c.offset, c.storedLen);
    decodeStored(cipher, buf, c.codec, c.rawLen, c.hash, chunkSize);
    return true;
  } catch {
    return false;
  }
}

/**
 * A cache directory rebuilt from its bucket: every manifest of the bucket is copied into the
 * local `manifests/` first (the bucket's copy wins: it is what other machines see).
 */
async function fetchManifests(store: ObjectStore, dir: string): Promise<void> {
  const mdir = path.join(dir, 'manifests');
  mkdirPrivateSync(mdir, { recursive: true, mode: 0o700 });
  for await (const o of store.list('manifests/')) {
    const m = /^manifests\/([0-9a-f]{32})\.json\.zst$/.exec(o.key);
    if (!m) continue;
    const data = await store.get(manifestKey(m[1]!));
    const tmp = path.join(mdir, `.${m[1]}.download`);
    fs.writeFileSync(tmp, data, { mode: 0o600 });
    fs.renameSync(tmp, manifestPath(dir, m[1]!));
  }
  fsyncDirSync(mdir);
}

function chunkIsGood(repoDir: string, c: ScannedChunk, chunkSize: number, cipher: Cipher | null): boolean {
  try {
    const fd = fs.openSync(packPath(repoDir, c.packName), 'r');
    try {
      const buf = Buffer.alloc(c.storedLen);
      if (fs.readSync(fd, buf, 0, c.storedLen, c.offset) !== c.storedLen) return false;
      decodeStored(cipher, buf, c.codec, c.rawLen, c.hash, chunkSize);
      return true;
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return false;
  }
}

export async function rebuildIndex(dir: string, o: RebuildOptions = {}): Promise<RebuildReport> {
  const config = loadConfig(dir);
  // Unlocked before anything is touched: a missing or wrong key leaves the repository as it is.
  const cipher = config.encryption ? unlock(dir, config.id, config.encryption) : null;
  registerCipher(dir, cipher);
  const lock = acquireWriterLock(dir, 'repair --rebuild-index');
  try {
    // The pins module only needs the directory.
    const readers = activePins({ dir });
    if (readers.length > 0) {
      throw new BkfsError(
        'REPO_LOCKED',
        `readers are using the repository (pid ${[...new Set(readers.map((r) => r.pid))].join(', ')}): stop them (unmount) first`,
      );
    }
    return await build(dir, config.id, config.chunkSize, config.pageSpan, o, config.format, cipher);
  } finally {
    lock.release();
  }
}

async function build(
  dir: string,
  repoId: string,
  chunkSize: number,
  pageSpan: number,
  o: RebuildOptions,
  format: number,
  cipher: Cipher | null,
): Promise<RebuildReport> {
  const rep: RebuildReport = {
    packs: 0,
    chunks: 0,
    duplicateChunks: 0,
    manifests: 0,
    vms: 0,
    checkpoints: 0,
    skippedForgotten: 0,
    missingChunks: 0,
    damagedCheckpoints: [],
    problems: [],
    oldIndex: null,
    remoteReads: { tailReads: 0, wholeReads: 0 },
  };
  const tmpDir = path.join(dir, 'tmp');
  mkdirPrivateSync(tmpDir, { recursive: true, mode: repoModes(dir).dir });
  for (const f of fs.readdirSync(tmpDir)) fs.rmSync(path.join(tmpDir, f), { force: true, recursive: true });
  const buildPath = path.join(dir, BUILD_FILE);
  rmDbFiles(buildPath);
  rmDbFiles(path.join(dir, DB_NEW_FILE));

  precreateDbFile(buildPath, repoModes(dir).file);
  const db = new Database(buildPath);
  try {
    db.pragma('journal_mode = MEMORY');
    db.pragma('synchronous = OFF');
    db.exec(SCHEMA);
    db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('format', String(format));
    db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)').run('repo_id', repoId);

    // Packs -> packs and chunks (object storage: the bucket's manifests first, see fetchManifests).
    const remote = remoteStore(dir);
    if (remote) await fetchManifests(remote, dir);
    const files = await packObjects(dir);
    const insPack = db.prepare('INSERT INTO packs (name, size, created) VALUES (?, ?, ?)');
    const insChunk = db.prepare(
      'INSERT INTO chunks (hash, pack_id, offset, stored_len, raw_len, codec, damaged) VALUES (?, ?, ?, ?, ?, ?, ?)',
    );
    const chunkIds = new Map<string, number>();
    const copies = new Map<string, ScannedChunk[]>();
    let i = 0;
    for (const f of files) {
      const p = packPath(dir, f.name);
      const mtime = remote ? Date.now() : fs.statSync(p).mtimeMs;
      const packId = Number(insPack.run(f.name, f.size, Math.round(mtime)).lastInsertRowid);
      rep.packs++;
      const scanned = remote
        ? await scanRemotePack(
            remote,
            tmpDir,
            f.name,
            f.size,
            packId,
            rep.problems,
            chunkSize,
            rep.remoteReads,
            cipher,
          )
        : scanPack(p, f.name, packId, rep.problems, chunkSize, cipher !== null);
      db.transaction(() => {
        for (const c of scanned) {
          const hex = c.hash.toString('hex');
          const first = copies.get(hex);
          if (first) {
            first.push(c);
            rep.duplicateChunks++;
            continue;
          }
          copies.set(hex, [c]);
          const id = Number(
            insChunk.run(c.hash, c.pack, c.offset, c.storedLen, c.rawLen, c.codec, 0).lastInsertRowid,
          );
          chunkIds.set(hex, id);
          rep.chunks++;
        }
      })();
      o.onProgress?.('packs', ++i, files.length);
    }
    // A hash stored more than once (a chunk stored again after damage, a crash before indexing):
    // index the first copy that is intact.
    const repoint = db.prepare(
      'UPDATE chunks SET pack_id = ?, offset = ?, stored_len = ?, raw_len = ?, codec = ?, damaged = ? WHERE id = ?',
    );
    for (const [hex, cs] of copies) {
      if (cs.length < 2) continue;
      let good: ScannedChunk | undefined;
      for (const c of cs) {
        if (
          remote
            ? await remoteChunkIsGood(remote, c, chunkSize, cipher)
            : chunkIsGood(dir, c, chunkSize, cipher)
        ) {
          good = c;
          break;
        }
      }
      const c = good ?? cs[0]!;
      repoint.run(c.pack, c.offset, c.storedLen, c.rawLen, c.codec, good ? 0 : 1, chunkIds.get(hex)!);
    }
    copies.clear();

    // Manifests -> catalogue and block maps.
    const forgotten = forgottenInJournals(dir);
    const manifests: Manifest[] = [];
    for (const uid of listManifestUids(dir)) {
      if (forgotten.uids.has(uid)) {
        rep.skippedForgotten++;
        continue;
      }
      try {
        const m = decodeManifest(readManifestBytes(dir, uid), `${uid}.json.zst`);
        if (m.repo !== repoId) {
          rep.problems.push(`manifest ${uid} belongs to repository ${m.repo}; skipped`);
          continue;
        }
        manifests.push(m);
      } catch (e) {
        rep.problems.push((e as Error).message);
      }
    }
    manifests.sort((a, b) => a.checkpoint.id - b.checkpoint.id);
    rep.manifests = manifests.length;

    const vmIds = new Map<string, number>();
    const insVm = db.prepare('INSERT INTO vms (name, created) VALUES (?, ?)');
    for (const m of manifests) {
      const id = vmIds.get(m.vm.name);
      if (id === undefined) {
        vmIds.set(m.vm.name, Number(insVm.run(m.vm.name, m.vm.created).lastInsertRowid));
      }
    }
    rep.vms = vmIds.size;
    const insCp = db.prepare(
      `INSERT INTO checkpoints (id, uid, vm_id, name, level, state, chain_id, parent_id, base_id, started, finished,
                                bytes_read, bytes_new_raw, bytes_new_stored, chunks_new, libvirt_checkpoint, protected, damaged)
       VALUES (?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    );
    const insCfg = db.prepare('INSERT INTO configs (checkpoint_id, name, data) VALUES (?, ?, ?)');
    const insDisk = db.prepare(
      `INSERT INTO disks (id, checkpoint_id, name, virtual_size, source, format, bitmap, bytes_read, bytes_zero)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    );
    const insDp = db.prepare('INSERT INTO disk_pages (disk_id, page_no, page_id) VALUES (?, ?, ?)');
    const insExt = db.prepare(
      'INSERT INTO extents (page_id, offset, length, chunk_id, chunk_off, origin) VALUES (?, ?, ?, ?, ?, ?)',
    );
    const nameTaken = db.prepare('SELECT 1 FROM checkpoints WHERE vm_id = ? AND name = ?');
    const idTaken = db.prepare('SELECT 1 FROM checkpoints WHERE id = ? OR uid = ?');
    const pageIds = new Map<string, number>();
    const placeholders = new Set<number>();
    let nextPage = 0;
    i = 0;
    for (const m of manifests) {
      const c = m.checkpoint;
      const vmId = vmIds.get(m.vm.name)!;
      const where = `${m.vm.name}@${c.name}`;
      if (nameTaken.get(vmId, c.name) || idTaken.get(c.id, c.uid)) {
        rep.problems.push(`manifest ${c.uid} (${where}) clashes with another checkpoint; skipped`);
        continue;
      }
      let missing = 0;
      // Map entries made by this manifest's transaction, forgotten again if it rolls back.
      const newPages: string[] = [];
      const newHashes: string[] = [];
      try {
        db.transaction(() => {
          insCp.run(
            c.id,
            c.uid,
            vmId,
            c.name,
            c.level,
            c.chain.id,
            c.parent?.id ?? null,
            c.base?.id ?? null,
            c.started,
            c.finished,
            c.bytesRead,
            c.bytesNewRaw,
            c.bytesNewStored,
            c.chunksNew,
            c.libvirtCheckpoint,
            c.protected ? 1 : 0,
            0,
          );
          for (const cfg of m.configs)
            insCfg.run(
              c.id,
              cfg.name,
              storedConfig(cipher, m.checkpoint.uid, cfg.name, Buffer.from(cfg.data, 'base64')),
            );
          const idOfHash = (h: number): number => {
            const hex = m.hashes[h];
            if (hex === undefined) throw new Error(`hash index ${h} out of range`);
            let id = chunkIds.get(hex);
            if (id === undefined) {
              // No pack holds it: a damaged placeholder, so the checkpoint lists as DAMAGED.
              id = Number(insChunk.run(Buffer.from(hex, 'hex'), 0, 0, 0, chunkSize, 0, 1).lastInsertRowid);
              chunkIds.set(hex, id);
              newHashes.push(hex);
              placeholders.add(id);
              rep.missingChunks++;
            }
            if (placeholders.has(id)) missing++;
            return id;
          };
          for (const d of m.disks) {
            insDisk.run(
              d.id,
              c.id,
              d.name,
              d.virtualSize,
              d.source,
              d.format,
              d.bitmap,
              d.bytesRead,
              d.bytesZero,
            );
            const x = d.extents;
            let prevEnd = 0;
            let page = -1;
            let rows: [number, number, number | null, number, number][] = [];
            let sumRows: SumExtent[] = [];
            const sums: PageSum[] = [];
            const flush = (): void => {
              if (page < 0 || rows.length === 0) return;
              sums.push(pageSum(page, sumRows));
              const key = hashChunk(Buffer.from(JSON.stringify(rows))).toString('hex');
              let pid = pageIds.get(key);
              if (pid === undefined) {
                pid = ++nextPage;
                pageIds.set(key, pid);
                newPages.push(key);
                for (const r of rows) insExt.run(pid, r[0], r[1], r[2], r[3], r[4]);
              }
              insDp.run(d.id, page, pid);
            };
            for (let k = 0; k < x.length; k += 5) {
              const offset = prevEnd + x[k]!;
              const length = x[k + 1]!;
              const h = x[k + 2]!;
              const chunkOff = x[k + 3]!;
              const origin = m.origins[x[k + 4]!];
              if (!origin || length <= 0 || offset < 0) throw new Error(`malformed extent at ${offset}`);
              const p = Math.floor(offset / pageSpan);
              if (p !== page) {
                flush();
                page = p;
                rows = [];
                sumRows = [];
              }
              rows.push([offset, length, h < 0 ? null : idOfHash(h), chunkOff, origin.disk]);
              sumRows.push({
                offset,
                length,
                chunkOff,
                hash: h < 0 ? null : Buffer.from(m.hashes[h]!, 'hex'),
              });
              prevEnd = offset + length;
            }
            flush();
            writeDiskSums(db, d.id, d.virtualSize, pageSpan, sums);
          }
          if (missing > 0) db.prepare('UPDATE checkpoints SET damaged = 1 WHERE id = ?').run(c.id);
        })();
        rep.checkpoints++;
        if (missing > 0) rep.damagedCheckpoints.push(where);
      } catch (e) {
        for (const k of newPages) pageIds.delete(k);
        for (const h of newHashes) chunkIds.delete(h);
        rep.problems.push(`manifest ${c.uid} (${where}) could not be restored: ${(e as Error).message}`);
      }
      o.onProgress?.('manifests', ++i, manifests.length);
    }
    // Ids of forgotten checkpoints are never reused.
    const maxId = Math.max(forgotten.maxId, ...manifests.map((m) => m.checkpoint.id), 0);
    if (maxId > 0) {
      db.prepare("DELETE FROM sqlite_sequence WHERE name = 'checkpoints'").run();
      db.prepare("INSERT INTO sqlite_sequence (name, seq) VALUES ('checkpoints', ?)").run(maxId);
    }
    refreshCheckpointDamage(db);
  } finally {
    db.close();
  }
  fsyncFile(buildPath);
  const newPath = path.join(dir, DB_NEW_FILE);
  fs.renameSync(buildPath, newPath);
  fsyncDirSync(dir);
  crashPoint('rebuild-before-swap');

  // Swap: old index (and any -wal/-shm, which must never meet the new file) aside, new in place.
  const dbPath = path.join(dir, DB_FILE);
  const stamp = new Date()
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
  const aside = `${DB_FILE}.broken-${stamp}`;
  let moved = false;
  for (const suffix of ['', '-wal', '-shm']) {
    if (fs.existsSync(dbPath + suffix)) {
      fs.renameSync(dbPath + suffix, path.join(dir, aside + suffix));
      moved = moved || suffix === '';
    }
  }
  if (moved) rep.oldIndex = aside;
  fsyncDirSync(dir);
  crashPoint('rebuild-after-move-aside');
  try {
    fs.renameSync(newPath, dbPath);
  } catch (e) {
    // A reader's Repository.open may have finished the swap first.
    if (!fs.existsSync(dbPath)) throw e;
  }
  fsyncDirSync(dir);
  // Packs that a gc kept for readers are indexed again now (their chunks are live or dead like
  // any other pack's); finish interrupted forgets against the new index.
  fs.rmSync(path.join(dir, PENDING_FILE), { force: true });
  const repo = Repository.open(dir);
  try {
    finishForgetJournals(repo);
  } finally {
    repo.close();
  }
  return rep;
}
