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

/** Image formats bkfs reads; a declared format is one of these. */
export type DeclaredFormat = 'raw' | 'qcow2';
export const DECLARABLE_FORMATS: readonly DeclaredFormat[] = ['raw', 'qcow2'];

export interface QemuImgInfoJson {
  format: string;
  filename?: string;
  'virtual-size': number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type?: string; data?: { bitmaps?: QcowBitmap[]; 'data-file'?: string } };
}

/** The files an image's header names (backing file, external data file), for messages. */
export function externalReferences(j: QemuImgInfoJson): string[] {
  const refs: string[] = [];
  const backing = j['full-backing-filename'] ?? j['backing-filename'];
  if (backing !== undefined) refs.push(`backing file ${backing}`);
  const data = j['format-specific']?.data?.['data-file'];
  if (data !== undefined) refs.push(`data file ${data}`);
  return refs;
}

function unsafe(image: string, probed: string, refs: string[]): BkfsError {
  return new BkfsError(
    'SOURCE_UNSAFE',
    `${image} looks like a ${probed} image that refers to ${refs.join(' and ')}; bkfs does not follow what an undeclared image refers to (a guest can write such a header into a raw disk): declare the format, e.g. --disk NAME=raw:${image} for a raw disk, or --disk NAME=${probed}:${image} if you created this image`,
  );
}

async function qemuImgInfo(image: string, args: string[]): Promise<unknown> {
  if (!fs.existsSync(image)) throw new BkfsError('SOURCE_NOT_FOUND', `image ${image} does not exist`);
  const st = fs.statSync(image);
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new BkfsError('SOURCE_FORMAT', `${image} is not an image file or block device`);
  }
  const r = await run('qemu-img', ['info', '--output=json', ...args, image], { allowFail: true });
  if (r.code !== 0) throw classifyQemuError(image, r.stderr);
  return JSON.parse(r.stdout) as unknown;
}

/**
 * `qemu-img info`, taking the image's shared lock: fails with SOURCE_IN_USE when a VM writes it.
 *
 * Guests are untrusted: a guest can write any header into the start of its raw disk, so what
 * qemu-img probes is only trusted when it cannot make qemu open another file.
 *   - `declared` (the domain XML's driver type, or `--disk NAME=FORMAT:PATH`): opened with `-f`.
 *     A declared qcow2 may have a backing chain (the host made it), but every link must record
 *     its backing file's format: an unrecorded one would be probed from guest-written bytes.
 *   - undeclared: probed (qemu-img info opens no backing file); raw is taken as raw; a probed
 *     qcow2 without backing or data file is taken as qcow2; one with them is refused with
 *     SOURCE_UNSAFE naming what it refers to; other formats are refused (SOURCE_FORMAT).
 * The returned `format` is then always passed with `-f`/`--format` to qemu-img and qemu-nbd.
 */
export async function imageInfo(image: string, declared?: DeclaredFormat): Promise<ImageInfo> {
  let j: QemuImgInfoJson;
  if (declared !== undefined) {
    const chain = (await qemuImgInfo(image, ['-f', declared, '--backing-chain'])) as QemuImgInfoJson[];
    j = chain[0] as QemuImgInfoJson;
    for (const link of chain) {
      const backing = link['full-backing-filename'] ?? link['backing-filename'];
      if (backing !== undefined && link['backing-filename-format'] === undefined) {
        throw new BkfsError(
          'SOURCE_UNSAFE',
          `${link.filename ?? image} names backing file ${backing} without its format, so qemu would guess it from bytes a guest may have written: record it with qemu-img rebase -u -F raw|qcow2 -b ${backing} ${link.filename ?? image}`,
        );
      }
    }
  } else {
    j = (await qemuImgInfo(image, [])) as QemuImgInfoJson;
    if (j.format !== 'raw') {
      const refs = externalReferences(j);
      if (refs.length > 0) throw unsafe(image, j.format, refs);
    }
    if (j.format !== 'raw' && j.format !== 'qcow2') {
      throw new BkfsError(
        'SOURCE_FORMAT',
        `${image} probes as a ${j.format} image; bkfs backs up qcow2 and raw images (convert it with qemu-img; if it is a raw disk whose guest wrote that header, declare it: --disk NAME=raw:${image})`,
      );
    }
  }
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
  /**
   * Host cache mode (default `none`: O_DIRECT). A backup reads with `writeback`: large reads from a
   * cold image then get the kernel's read-ahead, as `qemu-img convert` does (bench/README.md).
   */
  cache?: 'none' | 'writeback';
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
      `--cache=${o.cache ?? 'none'}`,
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
      await new Promise((r) => setTimeout(r, 5)); // start-up is on every backup's critical path
    }
  }

  async stop(): Promise<void> {
    await stopChild(this.child);
    if (this.ownDir) await fsp.rm(this.dir, { recursive: true, force: true });
  }
}
