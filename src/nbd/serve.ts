/**
 * `serveCheckpoint`: serve the disks of one checkpoint over NBD until told to stop (the core of
 * `bkfs serve`). Opens the repository, resolves VM[@CP], pins the checkpoint (forget/gc keep what
 * is served), builds one export per disk (export name = disk name; a CowOverlay over it with
 * `overlayDir`), listens, records a state file and serves until `stop` aborts; then closes the
 * listener and every connection, flushes the overlays, releases the pin and removes the state file.
 *
 * State files: `<runDir>/serve/<key>.json` (runDir as for mounts, src/fuse/state.ts; key = first
 * 16 hex digits of sha256 of the listen address) = {pid, startTime, listen, repo, ref, exports,
 * writable, overlayDir, log, started}; the daemon's log is `<key>.log` next to it.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError, errorMessage } from '../errors';
import { resolveRef } from '../index/catalog';
import { CheckpointReader } from '../chain/reader';
import { Repository } from '../repo/repository';
import { pinCheckpoints, type Pin } from '../repo/pins';
import { daemonAlive, processStartTime, runDir, stopDaemon } from '../fuse/state';
import { ChunkLoader } from '../store/chunk-cache';
import { bytes } from '../util/format';
import { mkdirPrivateSync } from '../util/private-fs';
import { checkpointExport, CowOverlay } from './exports';
import { formatListen, NbdServer, type ListenAddress, type NbdExport, type TlsCreds } from './server';

export interface ServeState {
  pid: number;
  startTime: number | null;
  listen: string;
  repo: string;
  ref: string;
  exports: { name: string; size: number }[];
  writable: boolean;
  overlayDir: string | null;
  tls: boolean;
  log: string | null;
  started: string;
}

export interface ServeOptions {
  repoDir: string;
  ref: string;
  disk?: string;
  listen: ListenAddress;
  tlsDir?: string;
  /** Serve writable through copy-on-write overlays in this directory. */
  overlayDir?: string;
  /**
   * Give the Unix socket to this owner (still mode 0600): `bkfs instant-restore` serves QEMU,
   * which libvirt runs as its own user (e.g. libvirt-qemu).
   */
  socketOwner?: { uid: number; gid: number };
  cacheBytes: number;
  logFile?: string;
  log: (line: string) => void;
  onReady?: (state: ServeState) => void;
  stop: AbortSignal;
}

export function serveDir(env?: NodeJS.ProcessEnv): string {
  return path.join(runDir(env), 'serve');
}

function key(listen: string): string {
  return createHash('sha256').update(listen).digest('hex').slice(0, 16);
}

export function serveStatePath(listen: string): string {
  return path.join(serveDir(), `${key(listen)}.json`);
}

export function serveLogPath(listen: string): string {
  return path.join(serveDir(), `${key(listen)}.log`);
}

/** Canonical address: Unix socket paths made absolute. */
export function canonicalListen(a: ListenAddress): ListenAddress {
  return 'unix' in a ? { unix: path.resolve(a.unix) } : a;
}

/** x509 credentials in qemu's layout: ca-cert.pem, server-cert.pem, server-key.pem. */
export function loadTlsCreds(dir: string): TlsCreds {
  const read = (f: string) => {
    try {
      return fs.readFileSync(path.join(dir, f));
    } catch (e) {
      throw new BkfsError('USAGE', `--tls-creds ${dir}: cannot read ${f}: ${errorMessage(e)}`);
    }
  };
  return { ca: read('ca-cert.pem'), cert: read('server-cert.pem'), key: read('server-key.pem') };
}

function readServeState(file: string): ServeState | undefined {
  try {
    const s = JSON.parse(fs.readFileSync(file, 'utf8')) as ServeState;
    return typeof s.pid === 'number' && typeof s.listen === 'string' ? s : undefined;
  } catch {
    return undefined;
  }
}

/** Live serve daemons of this user; state files of dead ones are removed. */
export function listServes(): ServeState[] {
  let names: string[];
  try {
    names = fs.readdirSync(serveDir()).filter((n) => n.endsWith('.json'));
  } catch {
    return [];
  }
  const out: ServeState[] = [];
  for (const n of names) {
    const file = path.join(serveDir(), n);
    const s = readServeState(file);
    if (s && daemonAlive({ ...s, mountpoint: s.listen, ref: s.ref })) out.push(s);
    else fs.rmSync(file, { force: true });
  }
  return out.sort((a, b) => a.started.localeCompare(b.started));
}

/** Stop the serve daemon listening on `listen`; false if none runs there. */
export async function stopServe(listen: string): Promise<ServeState | undefined> {
  const s = listServes().find((x) => x.listen === listen);
  if (!s) return undefined;
  await stopDaemon({ ...s, mountpoint: s.listen });
  fs.rmSync(serveStatePath(listen), { force: true });
  return s;
}

function writeServeState(s: ServeState): void {
  const file = serveStatePath(s.listen);
  mkdirPrivateSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(s, null, 2) + '\n', { mode: 0o600 });
  fs.chmodSync(tmp, 0o600);
  fs.renameSync(tmp, file);
}

export async function serveCheckpoint(opts: ServeOptions): Promise<void> {
  const { log } = opts;
  const listenStr = formatListen(canonicalListen(opts.listen));
  const other = listServes().find((s) => s.listen === listenStr);
  if (other) {
    throw new BkfsError(
      'TARGET_EXISTS',
      `bkfs serve (pid ${other.pid}) already listens on ${listenStr}: 'bkfs serve --stop --listen ${listenStr}'`,
    );
  }
  const tlsCreds = opts.tlsDir !== undefined ? loadTlsCreds(opts.tlsDir) : undefined;
  const repo = Repository.open(opts.repoDir);
  let pin: Pin | undefined;
  let server: NbdServer | undefined;
  const overlays: CowOverlay[] = [];
  let stateListen = listenStr;
  try {
    const { vm, checkpoint } = resolveRef(repo.db, opts.ref);
    try {
      pin = pinCheckpoints(repo, [checkpoint.id]);
    } catch (e) {
      log(
        `cannot pin ${vm.name}@${checkpoint.name} (forget/gc will not know it is served): ${errorMessage(e)}`,
      );
    }
    const loader = new ChunkLoader(repo.db, repo.packs, opts.cacheBytes);
    const reader = new CheckpointReader(repo, vm, checkpoint, { loader });
    const disks = opts.disk !== undefined ? [reader.disk(opts.disk)] : reader.disks;
    const exports = new Map<string, NbdExport>();
    for (const d of disks) {
      const base = checkpointExport(reader, d.name);
      if (opts.overlayDir !== undefined) {
        const ov = await CowOverlay.open(
          opts.overlayDir,
          { vm: vm.name, checkpoint: checkpoint.name, disk: d.name, size: d.virtual_size },
          base,
        );
        overlays.push(ov);
        exports.set(d.name, ov);
      } else exports.set(d.name, base);
    }
    try {
      server = await NbdServer.listen(canonicalListen(opts.listen), exports, {
        ...(tlsCreds ? { tls: tlsCreds } : {}),
        onError: (m) => log(`error: ${m}`),
        gatherReplies: true, // a process of its own: nothing here waits on its clients
      });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new BkfsError(
        code === 'EADDRINUSE' ? 'TARGET_EXISTS' : 'TARGET_INVALID',
        `cannot listen on ${listenStr}: ${errorMessage(e)}`,
      );
    }
    if (opts.socketOwner !== undefined && 'unix' in server.address) {
      fs.chownSync(server.address.unix, opts.socketOwner.uid, opts.socketOwner.gid);
    }
    const state: ServeState = {
      pid: process.pid,
      startTime: processStartTime(process.pid),
      listen: formatListen(server.address),
      repo: opts.repoDir,
      ref: `${vm.name}@${checkpoint.name}`,
      exports: disks.map((d) => ({ name: d.name, size: d.virtual_size })),
      writable: opts.overlayDir !== undefined,
      overlayDir: opts.overlayDir ?? null,
      tls: tlsCreds !== undefined,
      log: opts.logFile ?? null,
      started: new Date().toISOString(),
    };
    stateListen = state.listen;
    writeServeState(state);
    log(
      `serving ${state.ref} on ${state.listen} (${state.writable ? `writable, overlays in ${state.overlayDir}` : 'read-only'}` +
        `${state.tls ? ', TLS' : ''}; exports ${disks.map((d) => `${d.name} ${bytes(d.virtual_size)}`).join(', ')})`,
    );
    opts.onReady?.(state);
    await new Promise<void>((resolve) => {
      if (opts.stop.aborted) resolve();
      else opts.stop.addEventListener('abort', () => resolve(), { once: true });
      // keep the event loop alive even with no client
      const t = setInterval(() => undefined, 1 << 30);
      opts.stop.addEventListener('abort', () => clearInterval(t), { once: true });
    });
    log(
      `stopping: ${server.stats.connections} connections, ${bytes(server.stats.bytesRead)} read, ${bytes(server.stats.bytesWritten)} written`,
    );
  } finally {
    await server?.close();
    for (const ov of overlays) {
      try {
        await ov.close();
      } catch (e) {
        log(`error: cannot flush the overlay ${ov.cowFile}: ${errorMessage(e)}`);
      }
    }
    pin?.release();
    repo.close();
    const mine = readServeState(serveStatePath(stateListen));
    if (mine?.pid === process.pid) fs.rmSync(serveStatePath(stateListen), { force: true });
  }
}
