/**
 * Adapters over qemu-img and qemu-nbd (process spawning only; no backup logic).
 *
 * qemu-nbd always runs as a child of bkfs, serving on a unix socket in a private 0700 temp
 * directory, and is started through `setpriv --pdeathsig TERM` when available so that it ends even
 * when bkfs is killed with SIGKILL (SIGTERM lets qemu-nbd close qcow2 bitmaps cleanly). `stop()`
 * ends it by PID and removes the directory.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { lastLine, run, stopChild } from '../util/proc';

export interface QcowBitmap {
  name: string;
  flags: string[];
  granularity: number;
}

export interface ImageInfo {
  path: string;
  format: string;
  virtualSize: number;
  bitmaps: QcowBitmap[];
}

function classifyQemuError(image: string, stderr: string): BkfsError {
  const line = lastLine(stderr);
  if (/lock/i.test(stderr)) {
    return new BkfsError('SOURCE_IN_USE', `${image} is in use by another process (a running VM?): ${line}`);
  }
  if (/No such file|Could not open/i.test(stderr) && !fs.existsSync(image)) {
    return new BkfsError('SOURCE_NOT_FOUND', `image ${image} does not exist`);
  }
  return new BkfsError('SOURCE_FORMAT', `cannot open ${image}: ${line}`);
}

/** `qemu-img info`, taking the image's shared lock: fails with SOURCE_IN_USE when a VM writes it. */
export async function imageInfo(image: string): Promise<ImageInfo> {
  if (!fs.existsSync(image)) throw new BkfsError('SOURCE_NOT_FOUND', `image ${image} does not exist`);
  const st = fs.statSync(image);
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new BkfsError('SOURCE_FORMAT', `${image} is not an image file or block device`);
  }
  const r = await run('qemu-img', ['info', '--output=json', image], { allowFail: true });
  if (r.code !== 0) throw classifyQemuError(image, r.stderr);
  const j = JSON.parse(r.stdout) as {
    format: string;
    'virtual-size': number;
    'format-specific'?: { data?: { bitmaps?: QcowBitmap[] } };
  };
  return {
    path: image,
    format: j.format,
    virtualSize: j['virtual-size'],
    bitmaps: j['format-specific']?.data?.bitmaps ?? [],
  };
}

export async function bitmapAdd(image: string, name: string): Promise<void> {
  const r = await run('qemu-img', ['bitmap', '--add', '--enable', '-f', 'qcow2', image, name], {
    allowFail: true,
  });
  if (r.code !== 0) throw classifyQemuError(image, r.stderr);
}

export async function bitmapRemove(image: string, name: string): Promise<void> {
  const r = await run('qemu-img', ['bitmap', '--remove', '-f', 'qcow2', image, name], { allowFail: true });
  if (r.code !== 0) throw classifyQemuError(image, r.stderr);
}

function canConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(socket);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

let setprivChecked: boolean | undefined;
function hasSetprivPdeathsig(): boolean {
  if (setprivChecked === undefined) {
    setprivChecked = ['/usr/bin/setpriv', '/bin/setpriv'].some((p) => fs.existsSync(p));
  }
  return setprivChecked;
}

export interface QemuNbdOptions {
  image: string;
  format: string;
  readOnly: boolean;
  bitmap?: string;
  /** Directory for the socket; a private temp dir by default. */
  dir?: string;
}

export class QemuNbd {
  private constructor(
    readonly socket: string,
    private readonly child: ChildProcess,
    private readonly dir: string,
    private readonly ownDir: boolean,
  ) {}

  get pid(): number | undefined {
    return this.child.pid;
  }

  static async start(o: QemuNbdOptions): Promise<QemuNbd> {
    const ownDir = o.dir === undefined;
    const dir = o.dir ?? (await fsp.mkdtemp(path.join(os.tmpdir(), 'bkfs-nbd-')));
    const socket = path.join(dir, 'nbd.sock');
    const args = [
      `--format=${o.format}`,
      `--socket=${socket}`,
      '--persistent',
      '--shared=16',
      '--cache=none',
      '--aio=threads',
    ];
    if (o.readOnly) args.push('--read-only');
    if (o.bitmap) args.push(`--bitmap=${o.bitmap}`);
    args.push(o.image);
    const [cmd, argv] = hasSetprivPdeathsig()
      ? ['setpriv', ['--pdeathsig', 'TERM', 'qemu-nbd', ...args]]
      : ['qemu-nbd', args];
    const child = spawn(cmd, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    const srv = new QemuNbd(socket, child, dir, ownDir);
    const deadline = Date.now() + 15000;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        await srv.stop();
        throw classifyQemuError(o.image, stderr || 'qemu-nbd exited');
      }
      // The socket file appears before qemu-nbd listens on it: wait until a connect succeeds.
      if (fs.existsSync(socket) && (await canConnect(socket))) return srv;
      if (Date.now() > deadline) {
        await srv.stop();
        throw new BkfsError('EXTERNAL_TOOL', `qemu-nbd did not start serving ${o.image} in time`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async stop(): Promise<void> {
    await stopChild(this.child);
    if (this.ownDir) await fsp.rm(this.dir, { recursive: true, force: true });
  }
}
