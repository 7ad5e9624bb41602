/**
 * `bkfs web`: the web console and HTTP API (src/web/server.ts; contract src/web/api.md), and its
 * tokens (`bkfs web token add|list|remove`). Foreground by default (Ctrl-C/SIGTERM stop it
 * cleanly); `--daemon` starts a detached server like `bkfs mount` and returns once it listens;
 * `bkfs web stop` stops it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Option, type Command } from 'commander';
import { BkfsError } from '../../errors';
import { note, out, parseIntOption, repoPath, table } from '../context';
import { printJson } from '../json';
import { parseDuration } from '../../util/format';
import { UI_ROOT } from '../../web/ui-assets';

interface WebCliOptions {
  listen: string;
  tlsCert?: string;
  tlsKey?: string;
  http?: boolean;
  insecureHttp?: boolean;
  daemon?: boolean;
  restoreRoot?: string;
  staticDir?: string;
  engine?: string;
  guestfsTcg?: boolean;
  maxSessions: string;
  idleTimeout: string;
  readyFd?: string;
  json?: boolean;
}

export interface WebInfo {
  url: string;
  pid: number;
  tls: boolean;
  fingerprint: string | null;
  certificate: string | null;
  stateDir: string;
  repository: string;
  restoreRoot: string | null;
  log: string | null;
}

function bkfsBin(): string {
  const bin = path.resolve(__dirname, '../../../../bin/bkfs');
  if (!fs.existsSync(bin)) throw new BkfsError('MOUNT_FAILED', `cannot find the bkfs launcher at ${bin}`);
  return bin;
}

/** The console's files: --static-dir, $BKFS_WEB_STATIC, else the console built into dist/src/web/ui. */
function staticDir(opt: string | undefined): string {
  return path.resolve(opt ?? process.env.BKFS_WEB_STATIC ?? UI_ROOT);
}

function describe(info: WebInfo): void {
  out(`bkfs web: serving ${info.repository} at ${info.url} (pid ${info.pid})`);
  if (info.fingerprint)
    out(`  TLS certificate ${info.certificate}\n  SHA-256 fingerprint ${info.fingerprint}`);
  else out('  plain HTTP (no TLS)');
  out(`  tokens, audit log: ${info.stateDir} (create a token: bkfs web token add NAME [--read-only])`);
  if (info.restoreRoot) out(`  restores and uploads go below ${info.restoreRoot}`);
}

async function serveForeground(
  cmd: Command,
  opts: WebCliOptions,
  readyFd: number | undefined,
): Promise<void> {
  const state = await import('../../web/state');
  const { createWebServer } = await import('../../web/server');
  const { sendReady, sendReadyError } = await import('../../fuse/daemon');
  const { processStartTime } = await import('../../fuse/state');
  const { writeFilePrivateSync } = await import('../../util/private-fs');
  const daemon = readyFd !== undefined;
  const log = daemon
    ? (line: string) =>
        process.stderr.write(`${new Date().toISOString()} bkfs-web[${process.pid}]: ${line}\n`)
    : (line: string) => note(line);
  let ready = false;
  try {
    const { host, port } = state.parseListen(opts.listen);
    const plain = opts.http || opts.insecureHttp;
    if (plain && !opts.insecureHttp && !state.isLoopback(host)) {
      throw new BkfsError(
        'USAGE',
        `plain HTTP on ${host} would send tokens in clear: use HTTPS (the default), a loopback address, or --insecure-http`,
      );
    }
    if ((opts.tlsCert === undefined) !== (opts.tlsKey === undefined))
      throw new BkfsError('USAGE', '--tls-cert and --tls-key go together');
    if (plain && opts.tlsCert) throw new BkfsError('USAGE', '--tls-cert makes no sense with plain HTTP');
    const maxSessions = parseIntOption('--max-sessions', opts.maxSessions);
    if (maxSessions < 1) throw new BkfsError('USAGE', '--max-sessions must be at least 1');
    const idleMs = parseDuration(opts.idleTimeout);
    if (idleMs === undefined)
      throw new BkfsError('USAGE', `--idle-timeout takes a duration such as 5m, got '${opts.idleTimeout}'`);
    const engine = opts.engine ?? process.env.BKFS_FILES_ENGINE ?? 'auto';
    if (!['auto', 'guestfs', 'kernel'].includes(engine))
      throw new BkfsError('USAGE', `--engine must be auto, guestfs or kernel, got '${engine}'`);
    const restoreRoot = opts.restoreRoot !== undefined ? path.resolve(opts.restoreRoot) : undefined;
    if (restoreRoot !== undefined && !fs.statSync(restoreRoot, { throwIfNoEntry: false })?.isDirectory())
      throw new BkfsError('TARGET_INVALID', `--restore-root ${restoreRoot} is not a directory`);
    const dir = state.ensureStateDir(state.webStateDir());
    const tls = plain
      ? undefined
      : opts.tlsCert !== undefined
        ? state.userTls(path.resolve(opts.tlsCert), path.resolve(opts.tlsKey as string))
        : await state.selfSignedCert(dir, host);
    if (tls?.generated) log(`generated a self-signed TLS certificate: ${tls.cert}`);
    const repoDir = path.resolve(repoPath(cmd));
    const server = await createWebServer({
      repoDir,
      tokensFile: state.tokensFile(dir),
      auditFile: state.auditFile(dir),
      ...(restoreRoot !== undefined ? { restoreRoot } : {}),
      engine: engine as 'auto' | 'guestfs' | 'kernel',
      ...(opts.guestfsTcg ? { guestfsTcg: true } : {}),
      maxSessions,
      idleMs,
      ...(tls ? { https: { key: fs.readFileSync(tls.key), cert: fs.readFileSync(tls.cert) } } : {}),
      staticDir: staticDir(opts.staticDir),
      log,
    });
    const address = await server.app.listen({ host, port });
    const url = `${tls ? 'https' : 'http'}://${address.replace(/^https?:\/\//, '')}/`;
    const info: WebInfo = {
      url,
      pid: process.pid,
      tls: tls !== undefined,
      fingerprint: tls?.fingerprint ?? null,
      certificate: tls?.cert ?? null,
      stateDir: dir,
      repository: repoDir,
      restoreRoot: restoreRoot ?? null,
      log: daemon ? state.daemonLogFile(dir) : null,
    };
    writeFilePrivateSync(
      state.daemonStateFile(dir),
      JSON.stringify({ ...info, startTime: processStartTime(process.pid) }),
    );
    ready = true;
    if (readyFd !== undefined) sendReady<WebInfo>(readyFd, { ok: true, info });
    else if (opts.json) printJson(info);
    else {
      describe(info);
      out("serving in the foreground: Ctrl-C or 'bkfs web stop' stops");
    }
    await new Promise<void>((resolve) => {
      const onSignal = (sig: NodeJS.Signals) => {
        log(`${sig} received, stopping`);
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        resolve();
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      if (daemon) process.on('SIGHUP', () => undefined);
    });
    await server.close();
    try {
      const s = JSON.parse(fs.readFileSync(state.daemonStateFile(dir), 'utf8')) as { pid?: number };
      if (s.pid === process.pid) fs.rmSync(state.daemonStateFile(dir), { force: true });
    } catch {
      // already gone
    }
    log('stopped');
  } catch (e) {
    if (!ready) sendReadyError(readyFd, e);
    throw e;
  }
}

export function registerWeb(program: Command): void {
  const web = program
    .command('web')
    .description('serve the web console and HTTP API (browse, download, restore) over HTTPS')
    .option('--listen <addr>', 'ADDR:PORT to listen on', '127.0.0.1:8443')
    .option('--tls-cert <file>', 'TLS certificate (PEM; default: a self-signed one made on first start)')
    .option('--tls-key <file>', 'TLS private key (PEM) of --tls-cert')
    .option('--http', 'plain HTTP, on a loopback address only')
    .option('--insecure-http', 'plain HTTP on any address (tokens and data in clear)')
    .option('--daemon', 'start a detached server and return once it listens (stop: bkfs web stop)')
    .option('--restore-root <dir>', 'operators restore disks and upload images below this directory only')
    .option(
      '--static-dir <dir>',
      'the console files (default: $BKFS_WEB_STATIC, else the console built by npm run build)',
    )
    .addOption(
      new Option('--engine <engine>', 'how guest filesystems are read (as bkfs ls)').choices([
        'auto',
        'guestfs',
        'kernel',
      ]),
    )
    .option('--guestfs-tcg', 'libguestfs: emulate the CPU (force_tcg), for hosts without usable KVM')
    .option('--max-sessions <n>', 'file sessions (appliances) open at most', '2')
    .option('--idle-timeout <duration>', 'close a file session unused for this long', '5m')
    .option('--json', 'machine-readable start-up information')
    .addOption(new Option('--ready-fd <fd>', 'internal: report readiness on this fd (daemon)').hideHelp())
    .addHelpText(
      'after',
      `
No anonymous access: create tokens with 'bkfs web token add NAME' (operator: restore, upload,
protect/unprotect, forget) or 'bkfs web token add NAME --read-only' (browse and download). Log in
to the console with a token, or send 'Authorization: Bearer TOKEN' to the API (/api/openapi.json).
State (tokens, certificate, audit log): $BKFS_WEB_DIR, else /var/lib/bkfs-web as root, else
~/.local/state/bkfs/web.

Examples:
  bkfs web token add alice
  bkfs web --listen 0.0.0.0:8443 --restore-root /srv/restore
  bkfs web --daemon && bkfs web stop
  bkfs web --http --listen 127.0.0.1:8080`,
    )
    .action(async (opts: WebCliOptions, cmd: Command) => {
      if (opts.readyFd !== undefined || !opts.daemon) {
        const fd = opts.readyFd === undefined ? undefined : Number(opts.readyFd);
        if (fd !== undefined && !Number.isInteger(fd))
          throw new BkfsError('USAGE', '--ready-fd takes a number');
        await serveForeground(cmd, opts, fd);
        return;
      }
      await startWebDaemon(opts, cmd);
    });

  web
    .command('stop')
    .description('stop the web server started with --daemon')
    .option('--json', 'machine-readable result')
    .addHelpText('after', '\nExamples:\n  bkfs web stop')
    .action(stopWeb);

  registerTokens(web);
}

function registerTokens(web: Command): void {
  const token = web
    .command('token')
    .description('API tokens of the web server')
    .addHelpText(
      'after',
      `
Examples:
  bkfs web token add alice
  bkfs web token add auditor --read-only
  bkfs web token list
  bkfs web token remove auditor`,
    );
  token
    .command('add')
    .description('create a token (printed once; only its hash is kept)')
    .argument('<name>', 'who or what uses it')
    .option('--read-only', 'browse and download only (default: operator)')
    .option('--json', 'machine-readable output')
    .addHelpText('after', '\nExamples:\n  bkfs web token add alice\n  bkfs web token add auditor --read-only')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<{ readOnly?: boolean; json?: boolean }>();
      const state = await import('../../web/state');
      const { addToken } = await import('../../web/auth');
      const dir = state.ensureStateDir(state.webStateDir());
      const { token: t, record } = addToken(
        state.tokensFile(dir),
        name,
        opts.readOnly ? 'read-only' : 'operator',
      );
      if (opts.json) {
        printJson({ name: record.name, role: record.role, token: t, created: record.created });
        return;
      }
      out(t);
      note(`token '${record.name}' (${record.role}) created; it is shown only now`);
    });
  token
    .command('list')
    .description('list tokens (names and roles; tokens themselves are not stored)')
    .option('--json', 'machine-readable output')
    .addHelpText('after', '\nExamples:\n  bkfs web token list')
    .action(async (_o: unknown, cmd: Command) => {
      const opts = cmd.optsWithGlobals<{ json?: boolean }>();
      const state = await import('../../web/state');
      const { readTokens } = await import('../../web/auth');
      const list = readTokens(state.tokensFile(state.webStateDir()));
      if (opts.json) {
        printJson(list.map((r) => ({ name: r.name, role: r.role, created: r.created })));
        return;
      }
      if (list.length === 0) out('no tokens (create one: bkfs web token add NAME)');
      else
        out(
          table(
            ['NAME', 'ROLE', 'CREATED'],
            list.map((r) => [r.name, r.role, r.created]),
          ),
        );
    });
  token
    .command('remove')
    .description('remove a token (its sessions end at their next request)')
    .argument('<name>', 'token name')
    .addHelpText('after', '\nExamples:\n  bkfs web token remove auditor')
    .action(async (name: string) => {
      const state = await import('../../web/state');
      const { removeToken } = await import('../../web/auth');
      removeToken(state.tokensFile(state.webStateDir()), name);
      out(`removed token '${name}'`);
    });
}

/** `bkfs web --daemon`: start a detached server (this program with `--ready-fd 3`); return once it listens. */
async function startWebDaemon(opts: WebCliOptions, cmd: Command): Promise<void> {
  const state = await import('../../web/state');
  const { startDaemon } = await import('../../fuse/daemon');
  state.parseListen(opts.listen);
  const dir = state.ensureStateDir(state.webStateDir());
  const args = [bkfsBin(), '-r', path.resolve(repoPath(cmd)), 'web', '--listen', opts.listen];
  for (const [flag, v] of [
    ['--tls-cert', opts.tlsCert],
    ['--tls-key', opts.tlsKey],
    ['--restore-root', opts.restoreRoot],
    ['--static-dir', opts.staticDir],
    ['--engine', opts.engine],
  ] as const) {
    if (v !== undefined) args.push(flag, path.isAbsolute(v) || flag === '--engine' ? v : path.resolve(v));
  }
  if (opts.http) args.push('--http');
  if (opts.insecureHttp) args.push('--insecure-http');
  if (opts.guestfsTcg) args.push('--guestfs-tcg');
  args.push('--max-sessions', opts.maxSessions, '--idle-timeout', opts.idleTimeout, '--ready-fd', '3');
  const info = await startDaemon<WebInfo>({
    command: process.execPath,
    args,
    logFile: state.daemonLogFile(dir),
    repoDir: path.resolve(repoPath(cmd)),
  });
  if (opts.json) {
    printJson(info);
    return;
  }
  describe(info);
  out(`log: ${info.log ?? '-'}; stop with: bkfs web stop`);
}

/** `bkfs web stop`. */
async function stopWeb(_o: unknown, cmd: Command): Promise<void> {
  const opts = cmd.optsWithGlobals<{ json?: boolean }>(); // --json is also an option of 'web'
  const state = await import('../../web/state');
  const { stopDaemon } = await import('../../fuse/state');
  const file = state.daemonStateFile(state.webStateDir());
  let s: { pid: number; startTime: number | null; url: string };
  try {
    s = JSON.parse(fs.readFileSync(file, 'utf8')) as typeof s;
  } catch {
    throw new BkfsError('NOT_FOUND', `no bkfs web server is running (no ${file})`);
  }
  await stopDaemon({
    pid: s.pid,
    startTime: s.startTime,
    mountpoint: '',
    repo: '',
    ref: null,
    log: null,
    started: '',
  });
  fs.rmSync(file, { force: true });
  if (opts.json) printJson({ stopped: s.url, pid: s.pid });
  else out(`stopped the bkfs web server at ${s.url} (pid ${s.pid})`);
}
