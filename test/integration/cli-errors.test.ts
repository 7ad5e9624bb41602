/**
 * Issue 17 (a new administrator's first hour), the CLI's answers to ordinary mistakes, run against
 * the real `bkfs` executable on a real repository (a qcow2 disk with a GPT and an ext4 partition):
 *
 * - 17.2: `init` of a path that cannot be created (/proc, a file, a file as a directory, a
 *   read-only filesystem, a directory this user may not write) fails at once with a coded line;
 * - 17.3: `VM@` (an empty checkpoint name) is a usage error for every command;
 * - 17.6: every command given bad paths (missing directories, files as directories, read-only
 *   directories, no permission as an unprivileged user) exits with a coded error, never 1, and
 *   never prints a raw `EACCES:`-style errno prefix;
 * - 17.12: guest paths without a leading '/', "did you mean" for VM names, `diff VM@CP CP`,
 *   partition offsets in `ls VM@CP`, `bkfs checksum` and `cp --verify`.
 *
 * Needs root (loop devices to build the fixture, a read-only tmpfs, setpriv to act as `nobody`),
 * qemu-utils, e2fsprogs, fdisk, util-linux (setpriv, mount).
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NOBODY, bkfs, bkfsAsNobody, bkfsOk, type CliResult } from '../helpers/cli';
import { makeDisk, modifyDisk } from '../helpers/images';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';

const HOSTNAME = 'web-01\n';
const NGINX = 'worker_processes 2;\nevents { worker_connections 64; }\n';
const MOTD = 'welcome to check2\n';

let work: string;
let repo: string;
let scratch: string;
/** A copy of the repository owned by `nobody`. */
let urepo: string;
let file: string;
let ro: string;
let rootOnly: string;
let rootDir: string;
let roMounted = false;

const sha256 = (b: string | Buffer): string => createHash('sha256').update(b).digest('hex');

/** Files of a repository with sizes (not the SQLite WAL/shm files, which readers may touch). */
function snapshot(dir: string): string[] {
  const outl: string[] = [];
  const walk = (d: string): void => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (!/-(wal|shm)$/.test(e.name)) outl.push(`${path.relative(dir, p)} ${fs.statSync(p).size}`);
    }
  };
  walk(dir);
  return outl.sort();
}

/** The one-line, coded answer every bad input must get. */
function assertCoded(r: CliResult, args: string[], want: number): void {
  const what = `bkfs ${args.join(' ')} -> ${r.code}: ${r.stderr}`;
  assert.notEqual(r.code, 1, `exit 1 is for bugs: ${what}`);
  assert.doesNotMatch(r.stderr, /\bE[A-Z]{2,}:/, `raw errno text: ${what}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${what}`);
  assert.match(r.stderr, /^bkfs: /, what);
  assert.equal(r.code, want, what);
}

before(async () => {
  // File-level commands here read guest files with the kernel engine (root): one libguestfs
  // appliance per command would make this walk take many minutes; the answers do not depend on it.
  process.env.BKFS_FILES_ENGINE = 'kernel';
  if (process.getuid?.() !== 0) throw new Error('cli-errors tests need root (loop devices, mount, setpriv)');
  if (spawnSync('setpriv', ['--version']).status !== 0)
    throw new Error('setpriv missing: apt-get install util-linux');
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-clierr-'));
  fs.chmodSync(work, 0o755); // nobody must reach its repository copy and targets
  const img = path.join(work, 'web.qcow2');
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 48,
    table: 'gpt',
    seed: 17,
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 32,
        label: 'root',
        files: [
          { path: 'etc/hostname', content: Buffer.from(HOSTNAME) },
          { path: 'etc/nginx/nginx.conf', content: Buffer.from(NGINX) },
        ],
      },
    ],
  });
  repo = path.join(work, 'repo');
  await bkfsOk(['-r', repo, 'init']);
  await bkfsOk(['-r', repo, 'backup', 'web', '-d', `vda=${img}`, '--checkpoint', 'check1']);
  await modifyDisk(img, 'qcow2', 1, async (dir) => {
    fs.writeFileSync(path.join(dir, 'etc/motd'), MOTD);
  });
  await bkfsOk(['-r', repo, 'backup', 'web', '-d', `vda=${img}`, '--checkpoint', 'check2']);
  scratch = path.join(work, 'scratch');
  await run('cp', ['-a', repo, scratch]);
  urepo = path.join(work, 'urepo');
  await run('cp', ['-a', repo, urepo]);
  await run('chown', ['-R', `${NOBODY}:${NOBODY}`, urepo]);
  file = path.join(work, 'file');
  fs.writeFileSync(file, 'not a directory\n');
  ro = path.join(work, 'ro');
  fs.mkdirSync(ro);
  await run('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'bkfs-clierr-ro', ro]);
  roMounted = true;
  rootOnly = path.join(work, 'root-only');
  fs.mkdirSync(rootOnly, { mode: 0o700 });
  await run('cp', ['-a', repo, path.join(rootOnly, 'repo')]);
  rootDir = path.join(work, 'root-dir');
  fs.mkdirSync(rootDir, { mode: 0o755 });
});

after(async () => {
  if (roMounted) await run('umount', [ro], { allowFail: true });
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('bkfs init on paths that cannot be created (issue 17.2)', () => {
  it('fails at once with a coded line and creates nothing', async () => {
    const cases: [string, number][] = [
      ['/proc/bkfs-clierr-nope', EXIT_CODES.TARGET_INVALID],
      ['/proc/bkfs-clierr-nope/a/b', EXIT_CODES.TARGET_INVALID],
      [file, EXIT_CODES.TARGET_INVALID],
      [path.join(file, 'sub'), EXIT_CODES.TARGET_INVALID],
      [path.join(ro, 'repo'), EXIT_CODES.PERMISSION_DENIED],
    ];
    for (const [p, want] of cases) {
      // Before the fix, /proc made Node's recursive mkdir spin at 100 % CPU forever: a hang guard
      // (not a timing goal) kills the command after 60 s so the test fails instead of hanging.
      const args = ['init', '-r', p];
      const r = await Promise.race([
        bkfs(args),
        new Promise<CliResult>((resolve) =>
          setTimeout(() => resolve({ code: -1, stdout: '', stderr: 'hung' }), 60_000).unref(),
        ),
      ]);
      assert.notEqual(r.code, -1, `bkfs ${args.join(' ')} hung`);
      assertCoded(r, args, want);
      assert.match(r.stderr, new RegExp(p.replace(/[/.]/g, '\\$&')), 'the message names the path');
    }
    assert.equal(fs.readFileSync(file, 'utf8'), 'not a directory\n');
    assert.deepEqual(fs.readdirSync(ro), []);
    // No permission: as nobody, in a directory owned by root.
    for (const p of [path.join(rootOnly, 'x'), path.join(rootDir, 'x', 'y')]) {
      const r = await bkfsAsNobody(['init', '-r', p], { home: work });
      assertCoded(r, ['init', '-r', p, '(as nobody)'], EXIT_CODES.PERMISSION_DENIED);
      assert.match(r.stderr, /permission denied/);
    }
    assert.deepEqual(fs.readdirSync(rootDir), []);
    // A missing parent chain is still created, directories 0700.
    const deep = path.join(work, 'new', 'a', 'b');
    await bkfsOk(['init', '-r', deep]);
    assert.equal(fs.statSync(path.join(work, 'new')).mode & 0o777, 0o700);
    assert.equal(fs.statSync(deep).mode & 0o777, 0o700);
  });
});

describe('VM@ with an empty checkpoint name (issue 17.3)', () => {
  it('is a usage error (exit 2) for every command, never "latest"', async () => {
    const before = snapshot(repo);
    const out = path.join(work, 'empty-cp-target');
    const mp = path.join(work, 'empty-cp-mnt');
    fs.mkdirSync(mp);
    const cmds: string[][] = [
      ['info', 'web@'],
      ['list', 'web@'],
      ['restore', 'web@', '--to', out],
      ['restore', 'web@check2', '--since', 'web@', '--to', out],
      ['export', 'web@', '--to', out],
      ['mount', 'web@', mp],
      ['mount', '--files', 'web@', mp],
      ['verify', 'web@'],
      ['cat', 'web@:/etc/hostname'],
      ['ls', 'web@'],
      ['ls', 'web@:/etc'],
      ['cp', 'web@:/etc/hostname', out],
      ['checksum', 'web@:/etc/hostname'],
      ['find', 'web@', '*.conf'],
      ['diff', 'web@', 'web@check2'],
      ['diff', 'web@check1', 'web@'],
      ['forget', 'web@'],
      ['protect', 'web@'],
      ['unprotect', 'web@'],
      ['info', '@check1'],
      ['backup', 'web@', '-d', `vda=${path.join(work, 'web.qcow2')}`],
    ];
    for (const c of cmds) {
      const args = ['-r', repo, ...c];
      const r = await bkfs(args);
      assertCoded(r, args, EXIT_CODES.USAGE);
      assert.match(r.stderr, /names no (checkpoint|VM)|takes a VM name/, c.join(' '));
    }
    assert.equal(fs.existsSync(out), false, 'nothing restored');
    assert.deepEqual(snapshot(repo), before);
    // VM@latest and VM alone still mean the latest checkpoint.
    assert.match((await bkfsOk(['-r', repo, 'info', 'web@latest'])).stdout, /web@check2/);
    assert.match((await bkfsOk(['-r', repo, 'info', 'web'])).stdout, /web@check2/);
  });
});

describe('filesystem mistakes on user paths (issue 17.6)', () => {
  it('exit with a coded one-line message naming the path, never 1 or raw errno text', async () => {
    const missing = path.join(work, 'missing', 'deeper');
    const fileAsDir = path.join(file, 'sub');
    const proc = '/proc/bkfs-clierr-nope';
    const roX = path.join(ro, 'x');
    const T = EXIT_CODES.TARGET_INVALID;
    const P = EXIT_CODES.PERMISSION_DENIED;
    const before = snapshot(repo);
    const cases: [string[], number][] = [
      // The repository path itself.
      [['-r', missing, 'list'], EXIT_CODES.REPO_NOT_FOUND],
      [['-r', file, 'list'], EXIT_CODES.REPO_NOT_FOUND],
      [['-r', fileAsDir, 'info', 'web'], EXIT_CODES.REPO_NOT_FOUND],
      [['-r', fileAsDir, 'verify'], EXIT_CODES.REPO_NOT_FOUND],
      // restore: a directory target (all disks) and a file target (--disk).
      [['-r', repo, 'restore', 'web', '--to', fileAsDir], T],
      [['-r', repo, 'restore', 'web', '--to', roX], P],
      [['-r', repo, 'restore', 'web', '--to', proc], T],
      [['-r', repo, 'restore', 'web', '--disk', 'vda', '--to', path.join(missing, 'vda.raw')], T],
      [['-r', repo, 'restore', 'web', '--disk', 'vda', '--to', path.join(fileAsDir, 'vda.raw')], T],
      [['-r', repo, 'restore', 'web', '--disk', 'vda', '--to', path.join(ro, 'vda.raw')], P],
      [['-r', repo, 'restore', 'web', '--disk', 'vda', '--to', path.join(ro, 'vda.qcow2')], P],
      [['-r', repo, 'restore', 'web', '--disk', 'vda', '--to', `${proc}.raw`], T],
      // export
      [['-r', repo, 'export', 'web', '--to', file], T],
      [['-r', repo, 'export', 'web', '--to', fileAsDir], T],
      [['-r', repo, 'export', 'web', '--to', roX], P],
      [['-r', repo, 'export', 'web', '--to', proc], T],
      // cp (file-level restore)
      [['-r', repo, 'cp', 'web@check1:/etc/nginx/nginx.conf', `${path.join(work, 'nosuchdir')}/`], T],
      [['-r', repo, 'cp', 'web@check1:/etc/nginx/nginx.conf', path.join(missing, 'nginx.conf')], T],
      [['-r', repo, 'cp', 'web@check1:/etc/nginx/nginx.conf', fileAsDir], T],
      [['-r', repo, 'cp', 'web@check1:/etc/nginx/nginx.conf', `${ro}/`], P],
      [['-r', repo, 'cp', '-R', 'web@check1:/etc', path.join(ro, 'etc')], P],
      [['-r', repo, 'cp', 'web@check1:/etc/hostname', `${proc}/`], T],
      // mount / umount
      [['-r', repo, 'mount', 'web@check1', missing], T],
      [['-r', repo, 'mount', 'web@check1', file], T],
      [['-r', repo, 'mount', '--all', fileAsDir], T],
      [['umount', missing], T],
      [['umount', file], T],
      // backup sources (on a scratch copy: a failed backup must not matter to the rest)
      [
        ['-r', scratch, 'backup', 'web', '-d', `vda=${path.join(work, 'nosuch.qcow2')}`],
        EXIT_CODES.SOURCE_NOT_FOUND,
      ],
      [['-r', scratch, 'backup', 'web', '-d', `vda=${fileAsDir}`], EXIT_CODES.SOURCE_NOT_FOUND],
      [['-r', scratch, 'backup', 'web', '-d', `vda=${proc}`], EXIT_CODES.SOURCE_NOT_FOUND],
    ];
    for (const [args, want] of cases) assertCoded(await bkfs(args), args, want);
    assert.deepEqual(fs.readdirSync(ro), []);
    assert.equal(fs.existsSync(path.join(work, 'missing')), false);
    // The message names the user's path, not a temporary sibling.
    const cp = await bkfs(['-r', repo, 'cp', 'web@check1:/etc/nginx/nginx.conf', `${ro}/`]);
    assert.match(cp.stderr, new RegExp(`${ro}/nginx\\.conf: read-only filesystem`));
    assert.doesNotMatch(cp.stderr, /\.bkfs-/);

    // No permission, as an unprivileged user with a repository of their own.
    const asNobody: [string[], number][] = [
      [['-r', path.join(rootOnly, 'repo'), 'list'], P],
      [['-r', urepo, 'restore', 'web', '--to', path.join(rootDir, 'web')], P],
      [['-r', urepo, 'restore', 'web', '--to', path.join(rootOnly, 'web')], P],
      [['-r', urepo, 'restore', 'web', '--disk', 'vda', '--to', path.join(rootDir, 'vda.raw')], P],
      [['-r', urepo, 'restore', 'web', '--disk', 'vda', '--to', path.join(rootOnly, 'vda.raw')], P],
      [['-r', urepo, 'export', 'web', '--to', path.join(rootDir, 'web')], P],
      [['-r', urepo, 'mount', 'web@check1', rootDir], P],
      [['-r', urepo, 'mount', 'web@check1', path.join(rootOnly, 'mnt')], P],
      [['umount', path.join(rootOnly, 'mnt')], P],
    ];
    for (const [args, want] of asNobody) {
      const r = await bkfsAsNobody(args, { home: work });
      assertCoded(r, [...args, '(as nobody)'], want);
      assert.match(r.stderr, /permission denied/, args.join(' '));
    }
    assert.deepEqual(fs.readdirSync(rootDir), []);
    assert.deepEqual(snapshot(repo), before, 'the repository is unchanged');
  });
});

describe('first-hour conveniences (issue 17.12)', () => {
  it("keeps a non-root user's mount state in $XDG_RUNTIME_DIR when set, else /tmp/bkfs-UID", () => {
    const runDirAs = (env: NodeJS.ProcessEnv): string => {
      const state = path.resolve(__dirname, '../../src/fuse/state.js');
      const r = spawnSync(
        'setpriv',
        [
          `--reuid=${NOBODY}`,
          `--regid=${NOBODY}`,
          '--clear-groups',
          process.execPath,
          '-e',
          `process.stdout.write(require(${JSON.stringify(state)}).runDir())`,
        ],
        { env: { PATH: process.env.PATH, ...env }, encoding: 'utf8' },
      );
      assert.equal(r.status, 0, r.stderr);
      return r.stdout;
    };
    assert.equal(runDirAs({ XDG_RUNTIME_DIR: '/run/user/65534' }), '/run/user/65534/bkfs/mounts');
    assert.equal(runDirAs({ TMPDIR: '/tmp' }), `/tmp/bkfs-${NOBODY}/bkfs/mounts`);
    assert.equal(runDirAs({ BKFS_RUN_DIR: '/srv/run', XDG_RUNTIME_DIR: '/run/user/65534' }), '/srv/run');
  });

  it('accepts a guest path without its leading /', async () => {
    for (const a of ['web@check2:etc/hostname', 'web@check2:vda:1:etc/hostname']) {
      assert.equal((await bkfsOk(['-r', repo, 'cat', a])).stdout, HOSTNAME, a);
    }
    assert.deepEqual(
      (await bkfsOk(['-r', repo, 'ls', 'web@check2:etc'])).stdout.split('\n').filter(Boolean).sort(),
      ['hostname', 'motd', 'nginx/'],
    );
    assert.equal((await bkfsOk(['-r', repo, 'cat', 'web@check2:etc/nginx/nginx.conf'])).stdout, NGINX);
  });

  it('suggests the VM meant by a mistyped name', async () => {
    for (const c of [
      ['info', 'wbe'],
      ['list', 'weeb'],
      ['cat', 'Web@check1:/etc/hostname'],
    ]) {
      const r = await bkfs(['-r', repo, ...c]);
      assertCoded(r, c, EXIT_CODES.NOT_FOUND);
      assert.match(r.stderr, /did you mean 'web'\?/, c.join(' '));
    }
    const r = await bkfs(['-r', repo, 'info', 'web@chek2']);
    assert.match(r.stderr, /did you mean 'check2'\?/);
  });

  it('diff takes a bare checkpoint as one of the same VM', async () => {
    const full = await bkfsOk(['-r', repo, 'diff', 'web@check1', 'web@check2', '/etc']);
    const bare = await bkfsOk(['-r', repo, 'diff', 'web@check1', 'check2', 'etc']);
    assert.equal(bare.stdout, full.stdout);
    assert.match(bare.stdout, /^\+ \/etc\/motd$/m);
    assert.match((await bkfsOk(['-r', repo, 'diff', 'web@check1', 'latest', '/etc'])).stdout, /\/etc\/motd/);
  });

  it('shows each partition offset in ls VM@CP', async () => {
    const r = await bkfsOk(['-r', repo, 'ls', 'web@check2']);
    assert.match(r.stdout, /OFFSET/);
    // The fixture's only partition starts at 1 MiB.
    assert.match(r.stdout, /^vda1\s.*\s1048576\s/m);
    assert.match(r.stdout, /losetup -r -o 1048576 --sizelimit \d+/);
  });

  it('checks a restored file: bkfs checksum and cp --verify', async () => {
    const sums = await bkfsOk(['-r', repo, 'checksum', 'web@check1:/etc/hostname', 'web@check2:etc/motd']);
    assert.equal(
      sums.stdout,
      `${sha256(HOSTNAME)}  web@check1:/etc/hostname\n${sha256(MOTD)}  web@check2:/etc/motd\n`,
    );
    const dest = path.join(work, 'restored-nginx.conf');
    const cp = await bkfsOk(['-r', repo, 'cp', '--verify', 'web@check2:/etc/nginx/nginx.conf', dest]);
    assert.match(
      cp.stdout,
      new RegExp(
        `verified: .*restored-nginx\\.conf matches web@check2:/etc/nginx/nginx\\.conf \\(sha256 ${sha256(NGINX)}\\)`,
      ),
    );
    assert.equal(fs.readFileSync(dest, 'utf8'), NGINX);
    const dir = await bkfs(['-r', repo, 'checksum', 'web@check2:/etc']);
    assertCoded(dir, ['checksum', 'web@check2:/etc'], EXIT_CODES.USAGE);
  });
});
