/**
 * `bkfs serve VM[@CP] --listen ADDR`: a checkpoint's disks as NBD exports (src/nbd/serve.ts).
 *
 * Like `bkfs mount`: by default a detached daemon (this program with `--foreground --ready-fd 3`)
 * is started and the command returns once it listens; `--foreground` serves in this process until
 * Ctrl-C/SIGTERM. `--list` shows the running serve daemons, `--stop --listen ADDR` stops one.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Option, type Command } from 'commander';
import { BkfsError } from '../../errors';
import { parseCheckpointRef } from '../../index/catalog';
import { bytes } from '../../util/format';
import type { ServeState } from '../../nbd/serve';
import type { ListenAddress } from '../../nbd/server';
import { note, out, repoPath, withRepo } from '../context';
import { printJson } from '../json';
import { DEFAULT_CACHE_SIZE, parseSize } from './mount';

interface ServeCliOptions {
  disk?: string;
  listen?: string;
  tlsCreds?: string;
  writable?: boolean;
  overlayDir?: string;
  foreground?: boolean;
  cacheSize: string;
  readyFd?: string;
  socketOwner?: string;
  list?: boolean;
  stop?: boolean;
  json?: boolean;
}

export function bkfsBin(): string {
  const bin = path.resolve(__dirname, '../../../../bin/bkfs');
  if (!fs.existsSync(bin)) throw new BkfsError('MOUNT_FAILED', `cannot find the bkfs launcher at ${bin}`);
  return bin;
}

/** nbd URI of an export, for the message (qemu-img/nbdinfo syntax). */
function exportUri(listen: string, name: string, tls: boolean): string {
  const n = encodeURIComponent(name);
  if (listen.startsWith('unix:')) return `nbd${tls ? 's' : ''}+unix:///${n}?socket=${listen.slice(5)}`;
  return `nbd${tls ? 's' : ''}://${listen.slice(4)}/${n}`;
}

function describe(s: ServeState): void {
  out(
    `serving ${s.ref} on ${s.listen} (${s.writable ? `writable, overlays in ${s.overlayDir}` : 'read-only'}` +
      `${s.tls ? ', TLS' : ''}; pid ${s.pid})`,
  );
  const width = Math.max(0, ...s.exports.map((e) => e.name.length));
  for (const e of s.exports)
    out(`  ${e.name.padEnd(width)}  ${bytes(e.size).padStart(10)}  ${exportUri(s.listen, e.name, s.tls)}`);
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description('serve the disks of a checkpoint over NBD (one export per disk; read-only by default)')
    .argument('[ref]', 'VM or VM@CHECKPOINT to serve (latest checkpoint without @)')
    .option('--listen <addr>', 'unix:PATH or tcp:HOST:PORT')
    .option('--disk <name>', 'serve only this disk')
    .option(
      '--tls-creds <dir>',
      'require TLS: x509 credentials dir (ca-cert.pem, server-cert.pem, server-key.pem)',
    )
    .option(
      '--writable',
      'accept writes, into copy-on-write overlays in --overlay-dir (never into the backup)',
    )
    .option('--overlay-dir <dir>', 'with --writable: where the overlays live (reused when serving again)')
    .option('--foreground', 'serve in this process until Ctrl-C or SIGTERM (default: return once listening)')
    .option('--cache-size <size>', 'decoded chunk cache, e.g. 256M, 1G', DEFAULT_CACHE_SIZE)
    .option('--list', 'list the running serve daemons')
    .option('--stop', 'stop the serve daemon listening on --listen ADDR')
    .option('--json', 'machine-readable output')
    .addOption(new Option('--ready-fd <fd>', 'internal: report readiness on this fd (daemon)').hideHelp())
    .addOption(
      new Option(
        '--socket-owner <uid:gid>',
        'internal: owner of the Unix socket (instant-restore)',
      ).hideHelp(),
    )
    .addHelpText(
      'after',
      `
Export names are the disk names. Clients: qemu-img, qemu (file.driver=nbd), nbdcopy, nbdinfo,
nbdfuse, guestfish. Block status (base:allocation) reports holes and zero extents, so copies skip
them. With --writable, guest writes, trims and zeroes go to NAME.cow/NAME.map in --overlay-dir;
serving the same checkpoint again with that directory continues from them.

Examples:
  bkfs serve web@check3 --listen unix:/run/web.sock
  qemu-img convert -O qcow2 'nbd+unix:///vda?socket=/run/web.sock' vda.qcow2
  bkfs serve web --listen tcp:0.0.0.0:10809 --tls-creds /etc/pki/bkfs
  bkfs serve web@check3 --listen unix:/tmp/w.sock --writable --overlay-dir /var/tmp/web-cow
  bkfs serve --list
  bkfs serve --stop --listen unix:/run/web.sock`,
    )
    .action(serveAction);
}

async function serveAction(ref: string | undefined, opts: ServeCliOptions, cmd: Command): Promise<void> {
  const { canonicalListen, listServes, stopServe } = await import('../../nbd/serve');
  const { formatListen, parseListen } = await import('../../nbd/server');
  if (opts.list) {
    const all = listServes();
    if (opts.json) printJson(all);
    else if (all.length === 0) out('no bkfs serve daemon is running');
    else all.forEach(describe);
    return;
  }
  if (opts.listen === undefined)
    throw new BkfsError('USAGE', 'serve needs --listen unix:PATH or tcp:HOST:PORT');
  const addr = parseListen(opts.listen);
  if (!addr) throw new BkfsError('USAGE', `--listen takes unix:PATH or tcp:HOST:PORT, got '${opts.listen}'`);
  const listen = formatListen(canonicalListen(addr));
  if (opts.stop) {
    const s = await stopServe(listen);
    if (!s) throw new BkfsError('NOT_FOUND', `no bkfs serve daemon listens on ${listen}`);
    if (opts.json) printJson({ stopped: listen, pid: s.pid });
    else out(`stopped the serve daemon on ${listen} (pid ${s.pid})`);
    return;
  }
  if (ref === undefined) throw new BkfsError('USAGE', 'serve needs VM[@CHECKPOINT]');
  const req = serveRequest(ref, addr, listen, opts, cmd);
  if (opts.readyFd !== undefined || opts.foreground) await serveHere(req, opts);
  else await startServeDaemon(req, opts, cmd);
}

/** What to serve, from the command line, checked. */
interface ServeRequest {
  ref: string;
  addr: ListenAddress;
  listen: string;
  repoDir: string;
  overlayDir?: string;
  tlsDir?: string;
  cacheBytes: number;
  socketOwner?: { uid: number; gid: number };
}

function serveRequest(
  ref: string,
  addr: ListenAddress,
  listen: string,
  opts: ServeCliOptions,
  cmd: Command,
): ServeRequest {
  parseCheckpointRef(ref);
  if (opts.writable && opts.overlayDir === undefined)
    throw new BkfsError('USAGE', '--writable needs --overlay-dir DIR (writes never go into the backup)');
  if (opts.overlayDir !== undefined && !opts.writable)
    throw new BkfsError('USAGE', '--overlay-dir is only used with --writable');
  const req: ServeRequest = {
    ref,
    addr,
    listen,
    repoDir: path.resolve(repoPath(cmd)),
    cacheBytes: parseSize('--cache-size', opts.cacheSize),
  };
  if (opts.overlayDir !== undefined) req.overlayDir = path.resolve(opts.overlayDir);
  if (opts.tlsCreds !== undefined) req.tlsDir = path.resolve(opts.tlsCreds);
  if (opts.socketOwner !== undefined) {
    const m = /^(\d+):(\d+)$/.exec(opts.socketOwner);
    if (!m) throw new BkfsError('USAGE', `--socket-owner takes UID:GID, got '${opts.socketOwner}'`);
    req.socketOwner = { uid: Number(m[1]), gid: Number(m[2]) };
  }
  return req;
}

/** Serve in this process (`--foreground`, or the daemon started by `startServeDaemon`). */
async function serveHere(req: ServeRequest, opts: ServeCliOptions): Promise<void> {
  const fd = opts.readyFd === undefined ? undefined : Number(opts.readyFd);
  if (fd !== undefined && !Number.isInteger(fd)) throw new BkfsError('USAGE', '--ready-fd takes a number');
  const { serveCheckpoint, serveLogPath } = await import('../../nbd/serve');
  const { sendReady, sendReadyError } = await import('../../fuse/daemon');
  const daemon = fd !== undefined;
  const log = daemon
    ? (line: string) => process.stderr.write(`${new Date().toISOString()} bkfs[${process.pid}]: ${line}\n`)
    : (line: string) => note(line);
  const ac = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    if (ac.signal.aborted) return;
    log(`${sig} received`);
    ac.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', daemon ? () => undefined : onSignal);
  let ready = false;
  try {
    await serveCheckpoint({
      repoDir: req.repoDir,
      ref: req.ref,
      ...(opts.disk !== undefined ? { disk: opts.disk } : {}),
      listen: req.addr,
      ...(req.tlsDir !== undefined ? { tlsDir: req.tlsDir } : {}),
      ...(req.overlayDir !== undefined ? { overlayDir: req.overlayDir } : {}),
      ...(req.socketOwner !== undefined ? { socketOwner: req.socketOwner } : {}),
      cacheBytes: req.cacheBytes,
      ...(daemon ? { logFile: serveLogPath(req.listen) } : {}),
      log,
      stop: ac.signal,
      onReady: (state) => {
        ready = true;
        if (fd !== undefined) sendReady<ServeState>(fd, { ok: true, info: state });
        else if (opts.json) printJson(state);
        else {
          describe(state);
          out(`serving in the foreground: Ctrl-C or 'bkfs serve --stop --listen ${state.listen}' stops`);
        }
      },
    });
  } catch (e) {
    if (!ready) sendReadyError(fd, e);
    throw e;
  }
}

/** Start a detached daemon (this program with `--foreground --ready-fd 3`); return once it listens. */
async function startServeDaemon(req: ServeRequest, opts: ServeCliOptions, cmd: Command): Promise<void> {
  // Check what can be checked here, so errors come with their own exit codes at once.
  await withRepo(cmd, async (repo) => {
    const { resolveRef } = await import('../../index/catalog');
    resolveRef(repo.db, req.ref);
  });
  const { loadTlsCreds, serveLogPath } = await import('../../nbd/serve');
  if (req.tlsDir !== undefined) loadTlsCreds(req.tlsDir);
  const { startDaemon } = await import('../../fuse/daemon');
  const state = await startDaemon<ServeState>({
    command: process.execPath,
    args: [
      bkfsBin(),
      '-r',
      req.repoDir,
      'serve',
      req.ref,
      '--listen',
      req.listen,
      '--foreground',
      '--cache-size',
      String(req.cacheBytes),
      ...(opts.disk !== undefined ? ['--disk', opts.disk] : []),
      ...(req.tlsDir !== undefined ? ['--tls-creds', req.tlsDir] : []),
      ...(req.overlayDir !== undefined ? ['--writable', '--overlay-dir', req.overlayDir] : []),
      ...(opts.socketOwner !== undefined ? ['--socket-owner', opts.socketOwner] : []),
      '--ready-fd',
      '3',
    ],
    logFile: serveLogPath(req.listen),
    repoDir: req.repoDir,
  });
  if (opts.json) {
    printJson(state);
    return;
  }
  describe(state);
  out(`log: ${state.log ?? '-'}; stop with: bkfs serve --stop --listen ${state.listen}`);
}
