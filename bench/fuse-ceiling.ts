/**
 * The fuse-native ceiling for sequential reads through a mount: a tiny read-only fuse-native file
 * system that serves one file, `vda.raw`, from memory, mounted with the same options as
 * `bkfs mount` of a disk checkpoint (src/fuse/mount.ts: kernelCache, long attr/entry timeouts). No
 * decompression, no hashing, no index: what `dd bs=1M` of it reaches is the most any fuse-native
 * file system can deliver on this machine and kernel, so mount-read reports bkfs's cold sequential
 * read as a ratio of it, measured in the same run.
 *
 * The file system runs in a child process (dd is run synchronously by the benchmark, which would
 * otherwise block the event loop that answers FUSE):
 *
 *   node dist/bench/fuse-ceiling.js --serve MOUNTPOINT --size-mib N     (prints "ready", SIGTERM ends it)
 *   node dist/bench/fuse-ceiling.js [--size-mib 1024] [--runs 3]        (measures, prints MB/s)
 *
 * The bytes are a 64 MiB pseudo-random pattern repeated (memory stays small for large sizes).
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBuffer } from '../test/helpers/images';

const MiB = 1 << 20;
const PATTERN = 64 * MiB;

type Cb = (code: number, value?: unknown) => void;

function argOf(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

function serve(mountpoint: string, size: number): void {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const Fuse = require('fuse-native') as new (
    mnt: string,
    ops: object,
    opts: object,
  ) => { mount(cb: (e: Error | null) => void): void };
  const data = randomBuffer(4242, Math.min(size, PATTERN));
  const now = Date.now();
  const stat = (mode: number, sz: number) => ({
    mode,
    uid: process.getuid?.() ?? 0,
    gid: process.getgid?.() ?? 0,
    size: sz,
    nlink: 1,
    mtime: now,
    atime: now,
    ctime: now,
    blksize: 4096,
    blocks: Math.ceil(sz / 512),
  });
  const ops = {
    init: (cb: Cb) => cb(0),
    getattr: (p: string, cb: Cb) => {
      if (p === '/') cb(0, stat(0o40500, 4096));
      else if (p === '/vda.raw') cb(0, stat(0o100400, size));
      else cb(-2);
    },
    readdir: (p: string, cb: Cb) => (p === '/' ? cb(0, ['.', '..', 'vda.raw']) : cb(-2)),
    open: (p: string, _flags: number, cb: Cb) => (p === '/vda.raw' ? cb(0, 1) : cb(-2)),
    release: (_p: string, _fd: number, cb: Cb) => cb(0),
    read: (_p: string, _fd: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
      const n = Math.max(0, Math.min(len, size - pos));
      let done = 0;
      while (done < n) {
        const off = (pos + done) % data.length;
        done += data.copy(buf, done, off, Math.min(data.length, off + (n - done)));
      }
      cb(n);
    },
  };
  const fuse = new Fuse(mountpoint, ops, {
    timeout: false,
    force: false,
    mkdir: false,
    fsname: 'fuseceiling,ro',
    subtype: 'fuseceiling',
    defaultPermissions: true,
    kernelCache: true,
    attrTimeout: 3600,
    entryTimeout: 3600,
  });
  fuse.mount((err) => {
    if (err) {
      process.stderr.write(`fuse-ceiling: cannot mount on ${mountpoint}: ${err.message}\n`);
      process.exit(1);
    }
    process.stdout.write('ready\n');
  });
  const stop = () => {
    spawnSync('fusermount', ['-u', '-z', mountpoint]);
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function dropCaches(): void {
  spawnSync('sync');
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

/** Mount the in-memory file system, dd it cold (fresh mount, caches dropped) `runs` times; MB/s each. */
export async function fuseCeilingMBps(sizeMiB: number, runs = 1, workDir?: string): Promise<number[]> {
  const dir = fs.mkdtempSync(path.join(workDir ?? os.tmpdir(), 'bkfs-fuse-ceiling-'));
  const out: number[] = [];
  try {
    for (let r = 0; r < runs; r++) {
      const mp = path.join(dir, `mnt${r}`);
      fs.mkdirSync(mp, { mode: 0o700 });
      const child = spawn(process.execPath, [__filename, '--serve', mp, '--size-mib', String(sizeMiB)], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      try {
        await new Promise<void>((resolve, reject) => {
          let text = '';
          child.stdout.on('data', (b: Buffer) => {
            text += b.toString();
            if (text.includes('ready')) resolve();
          });
          child.on('exit', (code) => reject(new Error(`fuse-ceiling server exited with ${code}`)));
        });
        dropCaches();
        const t0 = process.hrtime.bigint();
        const dd = spawnSync('dd', [
          `if=${path.join(mp, 'vda.raw')}`,
          'of=/dev/null',
          'bs=1M',
          'status=none',
        ]);
        const secs = Number(process.hrtime.bigint() - t0) / 1e9;
        if (dd.status !== 0) throw new Error(`dd failed: ${dd.stderr.toString().trim()}`);
        out.push((sizeMiB * MiB) / 1e6 / secs);
      } finally {
        if (child.exitCode === null && child.signalCode === null) {
          const exited = new Promise((res) => child.once('exit', res));
          child.kill('SIGTERM');
          await exited;
        }
        fs.rmSync(mp, { recursive: true, force: true });
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return out;
}

if (require.main === module) {
  const sizeMiB = Number(argOf('size-mib', '1024'));
  const mp = argOf('serve', '');
  if (mp) {
    serve(mp, sizeMiB * MiB);
  } else {
    fuseCeilingMBps(sizeMiB, Number(argOf('runs', '3'))).then(
      (r) => {
        const sorted = [...r].sort((a, b) => a - b);
        process.stdout.write(
          `fuse-native in-memory ceiling, dd bs=1M cold of ${sizeMiB} MiB: ${r.map((x) => x.toFixed(0)).join(', ')} MB/s (median ${sorted[Math.floor(sorted.length / 2)]!.toFixed(0)})\n`,
        );
      },
      (e: unknown) => {
        process.stderr.write(`fuse-ceiling: ${(e as Error).message}\n`);
        process.exit(1);
      },
    );
  }
}
