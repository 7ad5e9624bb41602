/**
 * `bkfs serve` for real: checkpoints of a backed-up disk served over NBD and read by the real
 * clients (qemu-img compare/convert, nbdcopy with several connections, nbdinfo --map, qemu-io,
 * nbdfuse, guestfish, a TCG QEMU guest whose kernel reads the partition table), over a Unix socket
 * and over TCP with TLS (certificates made with openssl). Writable serving goes to a COW overlay
 * and the repository's files are checked byte for byte to be unchanged. Every daemon started is
 * stopped on every exit path (after() stops whatever is still recorded in the private run dir).
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { makeDisk, randomBuffer, textFile, toRaw } from '../helpers/images';
import { freeTcpPort } from '../helpers/nbd-server';
import { kernel } from '../helpers/libvirt';
import { run, stopChild } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { listServes } from '../../src/nbd/serve';
import { processAlive } from '../../src/fuse/state';

// guestfish reads the export through libguestfs's appliance: emulated CPU, as in the other tests
// (nested KVM hangs on these machines: the appliance spun at 100 % CPU for 25 minutes in CI).
process.env.LIBGUESTFS_BACKEND = process.env.LIBGUESTFS_BACKEND ?? 'direct';
process.env.LIBGUESTFS_BACKEND_SETTINGS = process.env.LIBGUESTFS_BACKEND_SETTINGS ?? 'force_tcg';

const MiB = 1 << 20;
let work: string;
let repo: string;
let img: string;
/** refs[i] = raw image of checkpoint check(i+1). */
const refs: string[] = [];
let seq = 0;

function sock(): string {
  return path.join(work, `serve-${++seq}.sock`);
}

function uri(socket: string, name = 'vda'): string {
  return `nbd+unix:///${name}?socket=${socket}`;
}

async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { allowFail: true });
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Every file of the repository with its sha256, except the pins directory. */
function repoFingerprint(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) {
        if (e.name !== 'pins') walk(p);
      } else if (!/-(wal|shm)$|\.lock$/.test(e.name)) {
        out.set(path.relative(dir, p), createHash('sha256').update(fs.readFileSync(p)).digest('hex'));
      }
    }
  };
  walk(dir);
  return out;
}

/** Start `bkfs serve` in the background (the default) and return its socket. */
async function serve(...args: string[]): Promise<string> {
  const s = sock();
  await bkfsOk(['-r', repo, 'serve', ...args, '--listen', `unix:${s}`]);
  return s;
}

async function stop(socket: string): Promise<void> {
  await bkfsOk(['serve', '--stop', '--listen', `unix:${socket}`]);
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-serve-test-'));
  process.env.BKFS_RUN_DIR = path.join(work, 'run');
  img = path.join(work, 'disk.qcow2');
  repo = path.join(work, 'repo');
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 96,
    table: 'gpt',
    seed: 41,
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 48,
        label: 'root',
        files: [
          { path: 'etc/hostname', content: Buffer.from('served\n') },
          { path: 'var/lib/blob.bin', content: randomBuffer(42, 6 * MiB) },
          { path: 'var/log/syslog', content: textFile(43, 1 * MiB) },
        ],
      },
    ],
  });
  const snap = async () => {
    const raw = path.join(work, `ref${refs.length + 1}.raw`);
    await toRaw(img, raw);
    refs.push(raw);
  };
  await bkfsOk(['-r', repo, 'init']);
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'full']);
  await snap();
  // A data range past the partition, then a zeroed range: check2 differs from check1.
  await qemuIo(img, 'qcow2', 'write -P 0x5a 60M 3M', 'write -z 52M 64k');
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', 'inc']);
  await snap();
});

after(async () => {
  for (const s of listServes()) {
    try {
      process.kill(s.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('bkfs serve (read-only)', () => {
  it('serves every checkpoint byte for byte to qemu-img, nbdcopy (4 connections) and nbdinfo', async () => {
    const before = repoFingerprint(repo);
    const s1 = await serve('web@check1');
    const s2 = await serve('web@check2');
    try {
      await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refs[0]!, uri(s1)]);
      await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refs[1]!, uri(s2)]);
      const copy = path.join(work, 'copy.raw');
      await ok('nbdcopy', ['--connections=4', '--requests=16', uri(s2), copy]);
      await ok('cmp', [copy, refs[1]!]);
      // qemu-img convert through block status: the result is sparse and equal.
      const conv = path.join(work, 'conv.qcow2');
      await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri(s1), conv]);
      await ok('qemu-img', ['compare', '-F', 'raw', conv, refs[0]!]);
      // nbdinfo --map: holes reported, data where the backup has data.
      const map = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri(s2)])) as {
        offset: number;
        length: number;
        type: number;
      }[];
      const total = map.reduce((a, e) => a + e.length, 0);
      assert.equal(total, 96 * MiB);
      const at = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!;
      assert.equal(at(60 * MiB + 5).type & 1, 0, 'the written range is data');
      assert.equal(at(90 * MiB).type & 2, 2, 'the untouched tail reads as zeros');
      const holes = map.filter((e) => e.type & 1).reduce((a, e) => a + e.length, 0);
      assert.ok(holes > 30 * MiB, `${holes} bytes reported as holes`);
      // The checkpoints are pinned while served.
      const pins = fs.readdirSync(path.join(repo, 'pins')).filter((n) => n.endsWith('.json'));
      assert.equal(pins.length, 2);
      // --list shows both, in JSON too.
      const list = JSON.parse((await bkfsOk(['serve', '--list', '--json'])).stdout) as {
        ref: string;
        listen: string;
        exports: { name: string; size: number }[];
      }[];
      assert.deepEqual(
        list.map((l) => [l.ref, l.listen, l.exports[0]!.size]),
        [
          ['web@check1', `unix:${s1}`, 96 * MiB],
          ['web@check2', `unix:${s2}`, 96 * MiB],
        ],
      );
    } finally {
      await stop(s1);
      await stop(s2);
    }
    assert.equal(fs.existsSync(s1), false, 'socket removed');
    assert.deepEqual(listServes(), []);
    assert.deepEqual(
      fs.readdirSync(path.join(repo, 'pins')).filter((n) => n.endsWith('.json')),
      [],
      'pins released',
    );
    assert.deepEqual(repoFingerprint(repo), before, 'repository unchanged');
  });

  it('refuses writes on a read-only export (EPERM) and keeps serving', async () => {
    const s = await serve('web@check1');
    try {
      const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 4k', uri(s)], { allowFail: true });
      assert.match(r.stdout + r.stderr, /Operation not permitted|read-only|Permission denied/i);
      await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refs[0]!, uri(s)]);
    } finally {
      await stop(s);
    }
  });

  it('nbdfuse and guestfish read the export', async () => {
    const s = await serve('web@check2', '--disk', 'vda');
    const mp = path.join(work, 'nbdfuse');
    fs.mkdirSync(mp);
    const fuse = spawn('nbdfuse', ['-r', mp, uri(s)], { stdio: ['ignore', 'ignore', 'pipe'] });
    try {
      const file = path.join(mp, 'nbd');
      for (let i = 0; i < 100 && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 100));
      await ok('cmp', [file, refs[1]!]);
    } finally {
      await run('fusermount', ['-u', mp], { allowFail: true });
      await stopChild(fuse);
    }
    try {
      const out = await ok('guestfish', [
        '--ro',
        '--format=raw',
        '-a',
        `nbd:///vda?socket=${s}`,
        'run',
        ':',
        'mount',
        '/dev/sda1',
        '/',
        ':',
        'cat',
        '/etc/hostname',
      ]);
      assert.equal(out.trimEnd(), 'served'); // guestfish adds a newline after cat's output
    } finally {
      await stop(s);
    }
  });

  it('a TCG QEMU guest uses the export as its disk (kernel reads the partition table)', async () => {
    const k = kernel();
    assert.ok(k, 'no kernel and initrd in /boot (install linux-image-amd64)');
    const s = await serve('web@check1');
    const consoleLog = path.join(work, 'guest-console.log');
    const qemu = spawn(
      'qemu-system-x86_64',
      [
        '-machine',
        'pc,accel=tcg',
        '-m',
        '1024',
        '-nodefaults',
        '-display',
        'none',
        '-kernel',
        k.kernel,
        '-initrd',
        k.initrd,
        '-append',
        'console=ttyS0 root=/dev/bkfs-no-root rootdelay=100000 panic=0 loglevel=7',
        '-serial',
        `file:${consoleLog}`,
        '-device',
        'virtio-scsi-pci,id=scsi0',
        '-blockdev',
        `driver=nbd,node-name=bk0,server.type=unix,server.path=${s},export=vda,read-only=on`,
        '-device',
        'scsi-hd,drive=bk0',
      ],
      { stdio: 'ignore' },
    );
    try {
      let text = '';
      for (let i = 0; i < 1200; i++) {
        text = fs.existsSync(consoleLog) ? fs.readFileSync(consoleLog, 'utf8') : '';
        if (/sda: sda1|Kernel panic/.test(text)) break;
        await new Promise((r) => setTimeout(r, 250));
      }
      assert.match(text, /\[sda\] 196608 512-byte logical blocks/);
      assert.match(text, /sda: sda1/, 'the guest kernel read the GPT through the export');
    } finally {
      await stopChild(qemu);
      await stop(s);
    }
  });

  it('TLS over TCP: qemu-img with x509 client credentials reads it; a plain client is refused', async () => {
    const creds = path.join(work, 'tls');
    fs.mkdirSync(creds, { mode: 0o700 });
    const ssl = (...a: string[]) => ok('openssl', a);
    const p = (f: string) => path.join(creds, f);
    await ssl(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      p('ca-key.pem'),
      '-out',
      p('ca-cert.pem'),
      '-days',
      '2',
      '-subj',
      '/CN=bkfs test CA',
    );
    for (const who of ['server', 'client']) {
      await ssl(
        'req',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        p(`${who}-key.pem`),
        '-out',
        p(`${who}.csr`),
        '-subj',
        `/CN=localhost`,
      );
      const ext = p(`${who}.ext`);
      fs.writeFileSync(
        ext,
        `subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=${who === 'server' ? 'serverAuth' : 'clientAuth'}\n`,
      );
      await ssl(
        'x509',
        '-req',
        '-in',
        p(`${who}.csr`),
        '-CA',
        p('ca-cert.pem'),
        '-CAkey',
        p('ca-key.pem'),
        '-CAcreateserial',
        '-out',
        p(`${who}-cert.pem`),
        '-days',
        '2',
        '-extfile',
        ext,
      );
    }
    const port = await freeTcpPort();
    const listen = `tcp:127.0.0.1:${port}`;
    await bkfsOk(['-r', repo, 'serve', 'web@check2', '--listen', listen, '--tls-creds', creds]);
    try {
      await ok('qemu-img', [
        'compare',
        '--object',
        `tls-creds-x509,id=tls0,dir=${creds},endpoint=client`,
        '--image-opts',
        `driver=raw,file.filename=${refs[1]!}`,
        `driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port=${port},file.export=vda,file.tls-creds=tls0`,
      ]);
      const plain = await run('qemu-img', ['info', `nbd://127.0.0.1:${port}/vda`], { allowFail: true });
      assert.notEqual(plain.code, 0, 'a client without TLS is refused');
    } finally {
      await bkfsOk(['serve', '--stop', '--listen', listen]);
    }
  });
});

describe('bkfs serve --writable', () => {
  it('writes, trims and zeroes land in the overlay, persist across restarts, never in the repository', async () => {
    const before = repoFingerprint(repo);
    const ov = path.join(work, 'overlay');
    const expected = path.join(work, 'expected.raw');
    fs.copyFileSync(refs[1]!, expected);
    const ops = ['write -P 0x33 4096 8192', 'write -P 0x44 70000 5000', 'write -z 60M 1M', 'discard 61M 64k'];
    await qemuIo(expected, 'raw', ...ops.slice(0, 3));
    await qemuIo(expected, 'raw', 'write -z 61M 64k');
    let s = await serve('web@check2', '--writable', '--overlay-dir', ov);
    try {
      await ok('qemu-io', ['-f', 'raw', ...ops.flatMap((o) => ['-c', o]), uri(s)]);
      await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', expected, uri(s)]);
    } finally {
      await stop(s);
    }
    const st = fs.statSync(path.join(ov, 'vda.cow'));
    assert.equal(st.mode & 0o777, 0o600);
    assert.equal(fs.statSync(ov).mode & 0o777, 0o700);
    // Served again with the same overlay: the writes are still there.
    s = await serve('web@check2', '--writable', '--overlay-dir', ov);
    try {
      await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', expected, uri(s)]);
    } finally {
      await stop(s);
    }
    // The overlay belongs to check2: serving check1 with it is refused with its own exit code.
    const r = await bkfs([
      '-r',
      repo,
      'serve',
      'web@check1',
      '--writable',
      '--overlay-dir',
      ov,
      '--listen',
      `unix:${sock()}`,
    ]);
    assert.equal(r.code, EXIT_CODES.TARGET_MISMATCH, r.stderr);
    assert.deepEqual(repoFingerprint(repo), before, 'repository unchanged');
    // Read-only serving of the same checkpoint still gives the backed-up bytes.
    s = await serve('web@check2');
    try {
      await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refs[1]!, uri(s)]);
    } finally {
      await stop(s);
    }
  });
});

describe('bkfs serve: errors and lifecycle', () => {
  it('bad input exits with distinct codes; SIGTERM stops a foreground server cleanly', async () => {
    assert.equal((await bkfs(['-r', repo, 'serve', 'web@check1'])).code, EXIT_CODES.USAGE);
    assert.equal((await bkfs(['-r', repo, 'serve', 'web', '--listen', 'http://x'])).code, EXIT_CODES.USAGE);
    assert.equal(
      (await bkfs(['-r', repo, 'serve', 'web@nope', '--listen', `unix:${sock()}`])).code,
      EXIT_CODES.NOT_FOUND,
    );
    assert.equal(
      (await bkfs(['-r', repo, 'serve', 'web', '--writable', '--listen', `unix:${sock()}`])).code,
      EXIT_CODES.USAGE,
    );
    assert.equal((await bkfs(['serve', '--stop', '--listen', `unix:${sock()}`])).code, EXIT_CODES.NOT_FOUND);
    const s = await serve('web');
    try {
      const again = await bkfs(['-r', repo, 'serve', 'web', '--listen', `unix:${s}`]);
      assert.equal(again.code, EXIT_CODES.TARGET_EXISTS, again.stderr);
    } finally {
      await stop(s);
    }
    // Foreground: SIGTERM while a client is connected.
    const fg = sock();
    const child = spawn(
      process.execPath,
      [
        path.resolve(__dirname, '../../../bin/bkfs'),
        '-r',
        repo,
        'serve',
        'web',
        '--foreground',
        '--listen',
        `unix:${fg}`,
      ],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: process.env,
      },
    );
    let outText = '';
    child.stdout.on('data', (d: Buffer) => (outText += d.toString()));
    for (let i = 0; i < 200 && !outText.includes('serving in the foreground'); i++)
      await new Promise((r) => setTimeout(r, 100));
    assert.match(outText, /serving web@check2/);
    await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refs[1]!, uri(fg)]);
    const code = new Promise<number | null>((r) => child.on('close', (c) => r(c)));
    child.kill('SIGTERM');
    assert.equal(await code, 0);
    assert.equal(fs.existsSync(fg), false);
    assert.equal(processAlive(child.pid!), false);
    assert.deepEqual(listServes(), []);
  });
});
