/**
 * `bkfs mount` / `bkfs umount` for real: FUSE mounts served by the bkfs daemon, read by cmp,
 * qemu-img compare, dd, qemu-nbd + nbdcopy, loop devices with ext4/xfs mounted read-only, and
 * concurrent readers; every byte is checked against `qemu-img convert -O raw` of the image at
 * that checkpoint. Every mount, loop device, daemon and qemu-nbd is removed on every exit path
 * (finally blocks, plus an after() hook that takes down any bkfs mount still recorded in the
 * private run directory).
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BKFS, bkfs, bkfsOk } from '../helpers/cli';
import { lcg } from '../helpers/compare';
import {
  fileTreeChecksums,
  makeDisk,
  modifyDisk,
  partitionTableOf,
  randomBuffer,
  sha256,
  textFile,
  toRaw,
  withMountedRange,
} from '../helpers/images';
import { startQemuNbd } from '../helpers/nbd-server';
import { run, stopChild, waitExit } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { Repository } from '../../src/repo/repository';
import { CheckpointReader } from '../../src/chain/reader';
import { packPath } from '../../src/store/packs';
import {
  daemonAlive,
  logPath,
  mountAt,
  processAlive,
  readState,
  runDir,
  type MountState,
} from '../../src/fuse/state';

const MiB = 1 << 20;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let work: string;
let repo: string;
let img: string;
/** refs[i] = raw image of checkpoint check(i+1). */
const refs: string[] = [];
const DOMAIN_XML = '<domain type="kvm"><name>web</name></domain>\n';
let mountSeq = 0;

function freshDir(name = 'mnt'): string {
  const d = path.join(work, `${name}-${++mountSeq}`);
  fs.mkdirSync(d);
  return d;
}

/** Take down whatever is mounted at `mp` by bkfs, whatever state it is in. */
async function forceUnmount(mp: string): Promise<void> {
  const state = readState(mp);
  if (mountAt(mp)) {
    const r = await bkfs(['umount', mp]);
    if (r.code !== 0) await bkfs(['umount', '--lazy', mp]);
  }
  if (state && daemonAlive(state)) process.kill(state.pid, 'SIGKILL');
  if (mountAt(mp)) await run('fusermount', ['-u', '-z', mp], { allowFail: true });
}

/** Mount in the background (the default), run `fn`, always unmount. */
async function withMount<T>(args: string[], fn: (mp: string) => Promise<T>, repoDir = repo): Promise<T> {
  const mp = freshDir();
  try {
    await bkfsOk(['-r', repoDir, 'mount', ...args, mp]);
    const result = await fn(mp);
    await bkfsOk(['umount', mp]);
    return result;
  } finally {
    await forceUnmount(mp);
  }
}

function stateOf(mp: string): MountState {
  const s = readState(mp);
  assert.ok(s, `state file of ${mp}`);
  return s;
}

function pinsOf(repoDir: string, pid: number): { checkpoints: number[] }[] {
  const dir = path.join(repoDir, 'pins');
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((n) => n.startsWith(`${pid}-`) && n.endsWith('.json'))
    .map((n) => JSON.parse(fs.readFileSync(path.join(dir, n), 'utf8')) as { checkpoints: number[] });
}

function checkpointId(repoDir: string, ref: string): number {
  const r = Repository.open(repoDir);
  try {
    return CheckpointReader.open(r, ref).checkpoint.id;
  } finally {
    r.close();
  }
}

async function assertSameBytes(file: string, ref: string): Promise<void> {
  const c = await run('cmp', [file, ref], { allowFail: true });
  assert.equal(c.code, 0, `cmp ${file} ${ref}: ${c.stdout}${c.stderr}`);
}

function errnoCode(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (e) {
    return (e as NodeJS.ErrnoException).code;
  }
  return undefined;
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-mount-test-'));
  process.env.BKFS_RUN_DIR = path.join(work, 'run'); // inherited by every bkfs the tests start
  img = path.join(work, 'disk.qcow2');
  repo = path.join(work, 'repo');
  const cfg = path.join(work, 'domain.xml');
  fs.writeFileSync(cfg, DOMAIN_XML);
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 160,
    table: 'gpt',
    seed: 31,
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 64,
        label: 'root',
        files: [
          { path: 'etc/hostname', content: Buffer.from('web1\n') },
          { path: 'etc/app.conf', content: textFile(21, 9000) },
          { path: 'var/lib/blob.bin', content: randomBuffer(22, 5 * MiB) },
          { path: 'var/log/syslog', content: textFile(23, 2 * MiB) },
        ],
      },
      {
        fs: 'xfs',
        sizeMiB: 80,
        label: 'data',
        files: [{ path: 'db/table.dat', content: randomBuffer(24, 4 * MiB) }],
      },
    ],
  });
  const snap = async () => {
    const raw = path.join(work, `ref${refs.length + 1}.raw`);
    await toRaw(img, raw);
    refs.push(raw);
  };
  const backup = (level: string, ...extra: string[]) =>
    bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--level', level, ...extra]);
  await bkfsOk(['-r', repo, 'init']);
  await backup('full', '--config', `domain.xml=${cfg}`);
  await snap();
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/app.conf'), textFile(31, 12000));
    fs.rmSync(path.join(m, 'var/log/syslog'));
    fs.writeFileSync(path.join(m, 'var/lib/new.bin'), randomBuffer(32, 3 * MiB));
  });
  await backup('inc');
  await snap();
  await modifyDisk(img, 'qcow2', 2, async (m) => {
    const fd = fs.openSync(path.join(m, 'db/table.dat'), 'r+');
    fs.writeSync(fd, randomBuffer(33, 700 * 1024), 0, 700 * 1024, 1234567);
    fs.closeSync(fd);
  });
  await backup('inc');
  await snap();
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/hostname'), 'web2\n');
  });
  await backup('diff', '--config', `domain.xml=${cfg}`);
  await snap();
});

after(async () => {
  // Safety net: any bkfs mount still recorded in our private run directory goes away.
  const dir = runDir();
  const states = fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => n.endsWith('.json')) : [];
  for (const n of states) {
    try {
      const s = JSON.parse(fs.readFileSync(path.join(dir, n), 'utf8')) as MountState;
      await forceUnmount(s.mountpoint);
    } catch {
      // keep cleaning the others
    }
  }
  const mounted = fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.includes(` ${work}/`));
  if (!mounted) fs.rmSync(work, { recursive: true, force: true });
  delete process.env.BKFS_RUN_DIR;
});

describe('bkfs mount of one checkpoint', () => {
  it('shows each checkpoint of a full->inc->inc->diff chain byte-identical to qemu-img convert, with its configs', async () => {
    for (let i = 0; i < 4; i++) {
      // `web` alone is the latest checkpoint.
      const ref = i === 3 ? 'web' : `web@check${i + 1}`;
      await withMount([ref], async (mp) => {
        const names = fs.readdirSync(mp).sort();
        assert.deepEqual(names, i === 0 || i === 3 ? ['domain.xml', 'vda.raw'] : ['vda.raw'], ref);
        if (names.includes('domain.xml'))
          assert.equal(fs.readFileSync(path.join(mp, 'domain.xml'), 'utf8'), DOMAIN_XML);
        const disk = path.join(mp, 'vda.raw');
        const st = fs.statSync(disk);
        assert.equal(st.size, 160 * MiB);
        assert.ok(st.isFile());
        await assertSameBytes(disk, refs[i]!);
        const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', disk, refs[i]!], {
          allowFail: true,
        });
        assert.equal(cmp.code, 0, `qemu-img compare ${ref}: ${cmp.stdout}${cmp.stderr}`);
      });
    }
  });

  it('serves the same bytes to qemu-nbd (read with nbdcopy) and to dd', async () => {
    await withMount(['web@check2'], async (mp) => {
      const disk = path.join(mp, 'vda.raw');
      const server = await startQemuNbd(disk, { format: 'raw', readOnly: true });
      try {
        const out = path.join(work, 'nbdcopy.raw');
        await run('nbdcopy', [server.uri, out]);
        await assertSameBytes(out, refs[1]!);
        fs.rmSync(out);
      } finally {
        await server.stop();
      }
      const out = path.join(work, 'dd.raw');
      await run('dd', [`if=${disk}`, `of=${out}`, 'bs=1M', 'status=none']);
      await assertSameBytes(out, refs[1]!);
      fs.rmSync(out);
    });
  });

  it('is read-only: writes, truncate, chmod, create, unlink, mkdir, rename fail with EROFS', async () => {
    await withMount(['web@check3'], async (mp) => {
      const disk = path.join(mp, 'vda.raw');
      assert.equal(
        errnoCode(() => fs.openSync(disk, 'r+')),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.openSync(disk, 'a')),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.truncateSync(disk, 0)),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.chmodSync(disk, 0o666)),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.utimesSync(disk, 1, 1)),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.writeFileSync(path.join(mp, 'new.raw'), 'x')),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.unlinkSync(disk)),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.mkdirSync(path.join(mp, 'dir'))),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.renameSync(disk, path.join(mp, 'x.raw'))),
        'EROFS',
      );
      assert.equal(
        errnoCode(() => fs.symlinkSync('vda.raw', path.join(mp, 'l'))),
        'EROFS',
      );
      await assertSameBytes(disk, refs[2]!);
    });
  });
});

describe('bkfs mount of the whole repository', () => {
  it("mounts the partitions of every checkpoint read-only on loop devices with that checkpoint's files", async () => {
    await withMount(['--all'], async (mp) => {
      for (let i = 0; i < 4; i++) {
        const disk = path.join(mp, 'web', `check${i + 1}`, 'vda.raw');
        const table = await partitionTableOf(disk);
        assert.deepEqual(table, await partitionTableOf(refs[i]!));
        assert.equal(table.scheme, 'gpt');
        const parts = table.partitions.filter((p) => !p.extended);
        assert.equal(parts.length, 2);
        for (const p of parts) {
          const got = await withMountedRange(disk, p.start, p.size, (d) => fileTreeChecksums(d));
          const want = await withMountedRange(refs[i]!, p.start, p.size, (d) => fileTreeChecksums(d));
          assert.deepEqual(got, want, `check${i + 1} partition ${p.index}`);
          if (p.index === 1) {
            assert.equal(got.get('etc/hostname'), sha256(Buffer.from(i === 3 ? 'web2\n' : 'web1\n')));
            assert.equal(got.has('var/lib/new.bin'), i > 0);
          }
        }
      }
    });
  });

  it('serves several concurrent reader processes and random unaligned reads of different checkpoints', async () => {
    await withMount(['--all'], async (mp) => {
      const disk = (i: number) => path.join(mp, 'web', `check${i + 1}`, 'vda.raw');
      const randomReads = async (i: number, seed: number): Promise<void> => {
        const want = fs.readFileSync(refs[i]!);
        const size = want.length;
        const fh = await fs.promises.open(disk(i), 'r');
        try {
          const rnd = lcg(seed);
          for (let k = 0; k < 150; k++) {
            // Unaligned, crossing chunk (256 KiB) and page (16 MiB) boundaries, and past the end.
            const off = k % 10 === 0 ? 16 * MiB - 777 : Math.floor(rnd() * (size + 8192));
            const len = 1 + Math.floor(rnd() * 2 * MiB);
            const b = Buffer.alloc(len);
            const { bytesRead } = await fh.read(b, 0, len, off);
            assert.equal(bytesRead, Math.max(0, Math.min(len, size - off)), `read ${off}+${len}`);
            assert.ok(
              b.subarray(0, bytesRead).equals(want.subarray(off, off + bytesRead)),
              `bytes ${off}+${len}`,
            );
          }
        } finally {
          await fh.close();
        }
      };
      await Promise.all([
        ...[0, 1, 2, 3].map((i) => assertSameBytes(disk(i), refs[i]!)),
        ...[0, 1, 2, 3].map((i) => run('sha256sum', [disk(i)])),
        randomReads(2, 99),
        randomReads(3, 7),
      ]);
    });
  });

  it('has a latest link, shows a checkpoint made while mounted, keeps open files reading, pins until unmount', async () => {
    const mp = freshDir();
    try {
      await bkfsOk(['-r', repo, 'mount', '--all', mp]);
      const pid = stateOf(mp).pid;
      assert.deepEqual(fs.readdirSync(mp), ['web']);
      assert.deepEqual(fs.readdirSync(path.join(mp, 'web')), [
        'check1',
        'check2',
        'check3',
        'check4',
        'latest',
      ]);
      assert.equal(fs.readlinkSync(path.join(mp, 'web', 'latest')), 'check4');
      assert.deepEqual(pinsOf(repo, pid), [], 'listing pins nothing');

      // An open file keeps reading while a new backup is written (a full from the check4 image).
      const want1 = fs.readFileSync(refs[0]!);
      const fd = fs.openSync(path.join(mp, 'web', 'check1', 'vda.raw'), 'r');
      try {
        const half = 80 * MiB;
        const got = Buffer.alloc(want1.length);
        assert.equal(fs.readSync(fd, got, 0, half, 0), half);
        assert.deepEqual(
          pinsOf(repo, pid).flatMap((p) => p.checkpoints),
          [checkpointId(repo, 'web@check1')],
          "opening a checkpoint's file pins it",
        );
        const pending = bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${refs[3]!}`, '--level', 'full']);
        for (let off = half; off < want1.length; off += 4 * MiB) {
          fs.readSync(fd, got, off, Math.min(4 * MiB, want1.length - off), off);
        }
        await pending;
        assert.ok(got.equals(want1), 'check1 read across a concurrent backup');
      } finally {
        fs.closeSync(fd);
      }
      assert.deepEqual(fs.readdirSync(path.join(mp, 'web')), [
        'check1',
        'check2',
        'check3',
        'check4',
        'check5',
        'latest',
      ]);
      assert.equal(fs.readlinkSync(path.join(mp, 'web', 'latest')), 'check5');
      await assertSameBytes(path.join(mp, 'web', 'latest', 'vda.raw'), refs[3]!);
      const pinned = pinsOf(repo, pid).flatMap((p) => p.checkpoints);
      assert.ok(pinned.includes(checkpointId(repo, 'web@check1')), `pins ${pinned.join(',')}`);
      assert.ok(pinned.includes(checkpointId(repo, 'web@check5')), `pins ${pinned.join(',')}`);
      await bkfsOk(['umount', mp]);
      assert.deepEqual(pinsOf(repo, pid), [], 'pins released on unmount');
    } finally {
      await forceUnmount(mp);
    }
  });
});

describe('bkfs mount daemon lifecycle', () => {
  it('returns once the mount is live; umount unmounts and stops the daemon', async () => {
    const mp = freshDir();
    try {
      const r = await bkfsOk(['-r', repo, 'mount', 'web@check1', mp]);
      assert.match(r.stdout, /mounted web@check1 on .* \(daemon pid \d+\)/);
      assert.equal(mountAt(mp)?.fstype, 'fuse.bkfs', 'mounted when the command returns');
      const s = stateOf(mp);
      assert.ok(daemonAlive(s));
      assert.ok(pinsOf(repo, s.pid).length === 1);
      assert.match(fs.readFileSync(logPath(mp), 'utf8'), /mounted web@check1/);
      const u = await bkfsOk(['umount', mp]);
      assert.match(u.stdout, /unmounted/);
      assert.equal(mountAt(mp), undefined);
      assert.ok(!processAlive(s.pid), 'daemon stopped');
      assert.equal(readState(mp), undefined);
      assert.deepEqual(pinsOf(repo, s.pid), []);
      // Issue 17.12: a mount that ended cleanly takes its log with it (logs no longer pile up).
      assert.equal(fs.existsSync(logPath(mp)), false, 'the log of a clean mount is removed');
    } finally {
      await forceUnmount(mp);
    }
  });

  it('--foreground serves until SIGTERM, then unmounts and exits 0', async () => {
    const mp = freshDir();
    const child = spawn(process.execPath, [BKFS, '-r', repo, 'mount', 'web@check2', mp, '--foreground'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    try {
      let stdout = '';
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (d: Buffer) => {
          stdout += d.toString();
          if (stdout.includes('serving in the foreground')) resolve();
        });
        child.on('exit', (code) => reject(new Error(`bkfs mount --foreground exited ${code}: ${stdout}`)));
      });
      assert.equal(mountAt(mp)?.fstype, 'fuse.bkfs');
      assert.equal(stateOf(mp).pid, child.pid);
      const b = Buffer.alloc(4096);
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      fs.readSync(fd, b, 0, 4096, 512); // the GPT header
      fs.closeSync(fd);
      assert.equal(b.subarray(0, 8).toString(), 'EFI PART');
      child.kill('SIGTERM');
      assert.equal(await waitExit(child), 0);
      assert.equal(mountAt(mp), undefined);
      assert.equal(readState(mp), undefined);
      assert.deepEqual(pinsOf(repo, child.pid!), []);
    } finally {
      await stopChild(child, 2000);
      await forceUnmount(mp);
    }
  });

  it('a killed daemon leaves a stale mount that the next umount, or mount, cleans; a frozen one does not hang umount', async () => {
    const mp = freshDir();
    const kill9 = async (): Promise<number> => {
      const s = stateOf(mp);
      process.kill(s.pid, 'SIGKILL');
      while (processAlive(s.pid)) await sleep(20);
      return s.pid;
    };
    let frozen: number | undefined;
    try {
      await bkfsOk(['-r', repo, 'mount', 'web@check1', mp]);
      const pid1 = await kill9();
      // "Transport endpoint is not connected" (or, while a request was in flight, aborted).
      assert.ok(['ENOTCONN', 'ECONNABORTED'].includes(errnoCode(() => fs.statSync(mp)) ?? ''));
      const u = await bkfsOk(['umount', mp]);
      assert.match(u.stdout, new RegExp(`removed the stale mount .*pid ${pid1}`));
      assert.equal(mountAt(mp), undefined);
      assert.ok(fs.statSync(mp).isDirectory());
      assert.deepEqual(pinsOf(repo, pid1), [], "a dead daemon's pins are tidied");

      await bkfsOk(['-r', repo, 'mount', 'web@check1', mp]);
      await kill9();
      const m = await bkfsOk(['-r', repo, 'mount', 'web@check2', mp]);
      assert.match(m.stderr, /removed a stale mount/);
      await assertSameBytes(path.join(mp, 'vda.raw'), refs[1]!);

      // A frozen daemon (SIGSTOP) does not hang umount: the mount is never touched, the daemon is
      // continued and stopped.
      frozen = stateOf(mp).pid;
      process.kill(frozen, 'SIGSTOP');
      // Hang guard, not a timing assertion: if umount touched the frozen mount it would wait
      // forever; after a minute the daemon is continued so the test fails instead of hanging.
      let hung = false;
      const guard = setTimeout(() => {
        hung = true;
        process.kill(frozen!, 'SIGCONT');
      }, 60000);
      try {
        await bkfsOk(['umount', mp]);
      } finally {
        clearTimeout(guard);
      }
      assert.ok(!hung, 'umount waited on the frozen daemon');
      assert.equal(mountAt(mp), undefined);
      assert.ok(!processAlive(frozen));
    } finally {
      if (frozen !== undefined && processAlive(frozen)) process.kill(frozen, 'SIGCONT');
      await forceUnmount(mp);
    }
  });
});

describe('bkfs mount of damaged data', () => {
  it('answers EIO for reads of a damaged chunk, correct bytes elsewhere, and logs the range once', async () => {
    const copy = path.join(work, 'damaged-repo');
    await run('cp', ['-a', repo, copy]);
    // A chunk of check1 with data, well inside the ext4 partition: damage its stored bytes.
    const r = Repository.open(copy);
    let target: { offset: number; length: number };
    const chunk = r.config.chunkSize;
    try {
      const reader = CheckpointReader.open(r, 'web@check1');
      const ext = [...reader.extents('vda')].find(
        (e) => e.loc && e.offset >= 8 * MiB && e.length >= 64 * 1024,
      );
      assert.ok(ext?.loc, 'a data extent to damage');
      target = { offset: ext.offset, length: ext.length };
      const fd = fs.openSync(packPath(copy, ext.loc.pack), 'r+');
      // Near the start of the stored bytes: a frames chunk's (codec 2) frame table, so every read
      // of the chunk fails (damage inside one frame fails only that frame's reads:
      // test/unit/codec-frames.test.ts); a raw or single-frame chunk fails as a whole either way.
      fs.writeSync(fd, Buffer.alloc(32, 0x5a), 0, 32, ext.loc.offset + 8);
      fs.closeSync(fd);
    } finally {
      r.close();
    }
    let damagedMp = '';
    await withMount(
      ['web@check1'],
      async (mp) => {
        damagedMp = mp;
        const want = fs.readFileSync(refs[0]!);
        const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
        try {
          const b = Buffer.alloc(4096);
          assert.equal(
            errnoCode(() => fs.readSync(fd, b, 0, 4096, target.offset)),
            'EIO',
          );
          assert.equal(
            errnoCode(() => fs.readSync(fd, b, 0, 4096, target.offset + 4096)),
            'EIO',
          );
          // Bytes before and after that chunk's slot on the chunk grid are intact.
          const slot = Math.floor(target.offset / chunk) * chunk;
          for (const off of [0, 4 * MiB, slot - MiB, slot + chunk, slot + chunk + 3 * MiB]) {
            const len = MiB;
            const got = Buffer.alloc(len);
            assert.equal(fs.readSync(fd, got, 0, len, off), len);
            assert.ok(got.equals(want.subarray(off, off + len)), `bytes at ${off}`);
          }
        } finally {
          fs.closeSync(fd);
        }
        const lines = fs
          .readFileSync(logPath(mp), 'utf8')
          .split('\n')
          .filter((l) => l.includes('damaged data'));
        assert.equal(lines.length, 1, lines.join('\n'));
        const m = /web@check1 vda bytes (\d+)-(\d+)/.exec(lines[0]!);
        assert.ok(m, lines[0]);
        assert.ok(Number(m[1]) <= target.offset && target.offset <= Number(m[2]), lines[0]);
      },
      copy,
    );
    // A mount that met damage keeps its log after the unmount (clean ones remove theirs).
    assert.match(fs.readFileSync(logPath(damagedMp), 'utf8'), /damaged data[\s\S]*unmounted/);
    fs.rmSync(logPath(damagedMp), { force: true });
  });
});

describe('bkfs mount and umount on bad input', () => {
  it('fail with one clear line and a distinct exit code, and leave the repository as it was', async () => {
    const oneLine = (r: { stderr: string }) => assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    const file = path.join(work, 'not-a-dir');
    fs.writeFileSync(file, 'x');
    const full = freshDir('full');
    fs.writeFileSync(path.join(full, 'keep'), 'x');
    const mp = freshDir();
    const cases: [string[], number, RegExp][] = [
      [['-r', repo, 'mount', 'web', path.join(work, 'missing')], EXIT_CODES.TARGET_INVALID, /does not exist/],
      [['-r', repo, 'mount', 'web', file], EXIT_CODES.TARGET_INVALID, /not a directory/],
      [['-r', repo, 'mount', 'web', full], EXIT_CODES.TARGET_INVALID, /not empty/],
      [['-r', repo, 'mount', 'web@check9', mp], EXIT_CODES.NOT_FOUND, /no checkpoint 'check9'/],
      [['-r', repo, 'mount', 'db', mp], EXIT_CODES.NOT_FOUND, /no VM named 'db'/],
      [['-r', repo, 'mount', 'bad name', mp], EXIT_CODES.BAD_NAME, /invalid VM name/],
      [
        ['-r', path.join(work, 'no-repo'), 'mount', 'web', mp],
        EXIT_CODES.REPO_NOT_FOUND,
        /no bkfs repository/,
      ],
      [['-r', repo, 'mount', 'web', mp, '--cache-size', 'lots'], EXIT_CODES.USAGE, /--cache-size/],
      // Issue 17.7: one argument is never guessed to be a ref or a mount point.
      [
        ['-r', repo, 'mount', 'web@check2'],
        EXIT_CODES.USAGE,
        /understood 'web@check2' as the checkpoint.*no mount point/,
      ],
      [['-r', repo, 'mount', mp], EXIT_CODES.USAGE, /no mount point.*bkfs mount --all/],
      [['-r', repo, 'mount', '--all'], EXIT_CODES.USAGE, /--all needs a mount point/],
      [['-r', repo, 'mount', '--all', 'web', mp], EXIT_CODES.USAGE, /takes only the mount point/],
      [['-r', repo, 'mount'], EXIT_CODES.USAGE, /needs VM\[@CP\] and a mount point/],
      [['-r', repo, 'mount', 'web@', mp], EXIT_CODES.USAGE, /names no checkpoint/],
      [['umount', mp], EXIT_CODES.TARGET_INVALID, /nothing is mounted/],
      [['umount', work], EXIT_CODES.TARGET_INVALID, /nothing is mounted/],
    ];
    for (const [args, code, re] of cases) {
      const r = await bkfs(args);
      assert.equal(r.code, code, `bkfs ${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, re);
      oneLine(r);
    }
    assert.equal(mountAt(mp), undefined);
    try {
      await bkfsOk(['-r', repo, 'mount', 'web@check1', mp]);
      const again = await bkfs(['-r', repo, 'mount', 'web@check2', mp]);
      assert.equal(again.code, EXIT_CODES.MOUNT_FAILED, again.stderr);
      assert.match(again.stderr, /already mounted/);
      oneLine(again);
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      try {
        const busy = await bkfs(['umount', mp]);
        assert.equal(busy.code, EXIT_CODES.MOUNT_FAILED, busy.stderr);
        assert.match(busy.stderr, /busy/);
        oneLine(busy);
        assert.equal(mountAt(mp)?.fstype, 'fuse.bkfs', 'still mounted and serving');
        assert.equal(fs.readSync(fd, Buffer.alloc(16), 0, 16, 0), 16);
      } finally {
        fs.closeSync(fd);
      }
      await bkfsOk(['umount', mp]);
    } finally {
      await forceUnmount(mp);
    }
    const v = await bkfs(['-r', repo, 'verify']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });
});
