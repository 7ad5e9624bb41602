/**
 * Real NBD servers for tests: qemu-nbd and nbdkit on a Unix socket inside a private mkdtemp
 * directory. Each server is one ChildProcess kept by PID (nbdkit runs with -f so it does not fork
 * away, plus --exit-with-parent); `stop()` ends it with SIGTERM/SIGKILL and removes the directory.
 * Servers still running when the test process exits (a crashed test, an exception in a hook) are
 * SIGKILLed and their directories removed by a process 'exit' hook, so no path leaks them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stopChild } from '../../src/util/proc';

export interface NbdTestServer {
  /** Socket path (in `dir`); unused (but still reserved) when the server listens on TCP. */
  socket: string;
  /** TCP port when started with `tcpPort`. */
  port?: number;
  /** Private temp directory holding the socket. */
  dir: string;
  child: ChildProcess;
  /** nbd+unix URI of the (default or named) export. */
  uri: string;
  /** Stop the server by PID and remove its directory. Idempotent. */
  stop(): Promise<void>;
}

const live = new Set<{ child: ChildProcess; dir: string }>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const s of live) {
      try {
        if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGKILL');
      } catch {
        // already gone
      }
      rmSync(s.dir, { recursive: true, force: true });
    }
    live.clear();
  });
}

/** A fresh private temporary directory (removed by the caller, or at exit if registered). */
export function makeTempDir(prefix = 'bkfs-nbd-test-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

type Endpoint = { path: string } | { host: string; port: number };

/** Try to connect until the server accepts, the child dies, or the timeout passes. */
async function waitReady(
  child: ChildProcess,
  ep: Endpoint,
  stderr: () => string,
  timeoutMs: number,
): Promise<void> {
  const where = 'path' in ep ? ep.path : `${ep.host}:${ep.port}`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(
        `NBD test server exited early (${child.exitCode ?? child.signalCode}): ${stderr().trim()}`,
      );
    }
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(ep);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline)
      throw new Error(`NBD test server did not listen on ${where}: ${stderr().trim()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function startServer(
  cmd: string,
  argsFor: (socket: string) => string[],
  exportName: string,
  tcpPort?: number,
  timeoutMs = 10_000,
): Promise<NbdTestServer> {
  installExitHook();
  const dir = makeTempDir();
  const socket = join(dir, 'nbd.sock');
  const child = spawn(cmd, argsFor(socket), { stdio: ['ignore', 'ignore', 'pipe'] });
  const entry = { child, dir };
  live.add(entry);
  let err = '';
  child.stderr?.on('data', (d: Buffer) => {
    if (err.length < 8192) err += d.toString('utf8');
  });
  child.on('error', (e) => {
    err += `\n${e.message}`;
  });
  let stopped: Promise<void> | null = null;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      await stopChild(child, 3000);
      rmSync(dir, { recursive: true, force: true });
      live.delete(entry);
    })();
    return stopped;
  };
  try {
    const ep: Endpoint = tcpPort === undefined ? { path: socket } : { host: '127.0.0.1', port: tcpPort };
    await waitReady(child, ep, () => err, timeoutMs);
  } catch (e) {
    await stop();
    throw e;
  }
  const exp = encodeURIComponent(exportName);
  const uri =
    tcpPort === undefined ? `nbd+unix:///${exp}?socket=${socket}` : `nbd://127.0.0.1:${tcpPort}/${exp}`;
  return { socket, dir, child, uri, stop, ...(tcpPort === undefined ? {} : { port: tcpPort }) };
}

export interface QemuNbdOptions {
  format?: 'qcow2' | 'raw';
  readOnly?: boolean;
  /** Dirty bitmap to export as qemu:dirty-bitmap:NAME (-B). */
  bitmap?: string;
  /** Export name (-x); default is the empty name. */
  exportName?: string;
  extraArgs?: string[];
  /** Listen on 127.0.0.1:PORT instead of the Unix socket. */
  tcpPort?: number;
}

/** qemu-nbd serving `image`, persistent, up to 8 clients. */
export function startQemuNbd(image: string, o: QemuNbdOptions = {}): Promise<NbdTestServer> {
  return startServer(
    'qemu-nbd',
    (socket) => [
      ...(o.tcpPort === undefined ? ['-k', socket] : ['-b', '127.0.0.1', '-p', String(o.tcpPort)]),
      '--persistent',
      '--shared=8',
      '-f',
      o.format ?? 'qcow2',
      ...(o.readOnly ? ['-r'] : []),
      ...(o.bitmap ? ['-B', o.bitmap] : []),
      ...(o.exportName !== undefined ? ['-x', o.exportName] : []),
      ...(o.extraArgs ?? []),
      image,
    ],
    o.exportName ?? '',
    o.tcpPort,
  );
}

export interface NbdkitOptions {
  readOnly?: boolean;
  filters?: string[];
  /** Options placed before the plugin name (e.g. --no-sr, --oldstyle). */
  serverArgs?: string[];
  /** Listen on 127.0.0.1:PORT instead of the Unix socket. */
  tcpPort?: number;
}

/** A TCP port that was free a moment ago (for servers that cannot report the one they chose). */
export function freeTcpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const p = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(p));
    });
  });
}

/** nbdkit in the foreground (-f) with --exit-with-parent: `plugin` and its `params`. */
export function startNbdkit(plugin: string, params: string[], o: NbdkitOptions = {}): Promise<NbdTestServer> {
  return startServer(
    'nbdkit',
    (socket) => [
      '-f',
      '--exit-with-parent',
      ...(o.tcpPort === undefined ? ['-U', socket] : ['-i', '127.0.0.1', '-p', String(o.tcpPort)]),
      ...(o.readOnly ? ['-r'] : []),
      ...(o.filters ?? []).map((f) => `--filter=${f}`),
      ...(o.serverArgs ?? []),
      plugin,
      ...params,
    ],
    '',
    o.tcpPort,
  );
}
