/**
 * `make demo`: a real run of bkfs's main job on a small disk image with a real filesystem.
 * Creates a GPT qcow2 with an ext4 partition full of files, backs it up (full), changes files the
 * way a guest would (through QEMU, so the dirty bitmap records it), backs up again (incremental),
 * lists the checkpoints and verifies the repository, then starts the web console (`bkfs web
 * --daemon`, plain HTTP on loopback) and prints its URL and a token. Needs root for the file
 * changes (loop mount).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeDisk, modifyDisk, randomBuffer, textFile } from '../test/helpers/images';

const BKFS = path.resolve(__dirname, '../../bin/bkfs');
const MiB = 1 << 20;

function step(title: string): void {
  process.stdout.write(`\n\x1b[1m== ${title}\x1b[0m\n`);
}

function bkfs(...args: string[]): void {
  process.stdout.write(`$ bkfs ${args.join(' ')}\n`);
  const r = spawnSync(process.execPath, [BKFS, ...args], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`bkfs ${args[0]} failed with exit code ${r.status}`);
}

/** bkfs with --json: its parsed output (stderr shown). */
function bkfsJson<T>(...args: string[]): T {
  process.stdout.write(`$ bkfs ${args.join(' ')}\n`);
  const r = spawnSync(process.execPath, [BKFS, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`bkfs ${args[0]} failed with exit code ${r.status}`);
  return JSON.parse(r.stdout) as T;
}

async function main(): Promise<void> {
  const work = path.resolve(process.env.BKFS_DEMO_DIR ?? 'demo-work');
  // The console of a previous run serves the repository about to be removed: stop it first.
  process.env.BKFS_WEB_DIR = path.join(work, 'web-state');
  if (fs.existsSync(path.join(work, 'web-state', 'server.json'))) {
    spawnSync(process.execPath, [BKFS, 'web', 'stop'], { stdio: 'inherit' });
  }
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const img = path.join(work, 'web.qcow2');
  const repo = path.join(work, 'repo');
  process.env.BKFS_REPO = repo;

  step(`making a 512 MiB qcow2 disk with a GPT and an ext4 filesystem: ${img}`);
  const files = [
    { path: 'etc/hostname', content: Buffer.from('web1\n') },
    { path: 'etc/nginx/nginx.conf', content: textFile(1, 4000) },
    { path: 'var/www/index.html', content: textFile(2, 20000) },
    { path: 'var/lib/app/data.bin', content: randomBuffer(3, 48 * MiB) },
    { path: 'var/log/syslog', content: textFile(4, 16 * MiB) },
  ];
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 512,
    table: 'gpt',
    seed: 1,
    partitions: [{ fs: 'ext4', sizeMiB: 400, label: 'root', files }],
  });
  for (const f of files) process.stdout.write(`  /${f.path} (${f.content.length} bytes)\n`);

  step('creating a repository');
  bkfs('init');

  step('full backup');
  bkfs('backup', 'web', '--disk', `vda=${img}`, '--level', 'full');

  step('the guest changes files: edits nginx.conf, appends to syslog, adds a file');
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/nginx/nginx.conf'), textFile(5, 4200));
    fs.appendFileSync(path.join(m, 'var/log/syslog'), textFile(6, 2 * MiB));
    fs.writeFileSync(path.join(m, 'var/www/new.html'), textFile(7, 30000));
  });

  step('incremental backup (reads only what the dirty bitmap marks)');
  bkfs('backup', 'web', '--disk', `vda=${img}`, '--level', 'inc');

  step('checkpoints');
  bkfs('list', 'web');
  bkfs('info', 'web@check2');

  // File-level commands parse guest filesystems in the libguestfs appliance by default (isolated
  // from the host; a launch takes 15-50 s without KVM). This guest was made by the demo itself, so
  // it is trusted and the fast host-kernel engine may read it.
  step('what changed between the two checkpoints (file level; our own guest: --engine kernel)');
  bkfs('diff', '--engine', 'kernel', 'web@check1', 'web@check2');

  step('get the old nginx.conf back from check1');
  const restored = path.join(work, 'restored');
  fs.mkdirSync(restored);
  bkfs('cp', '--engine', 'kernel', 'web@check1:/etc/nginx/nginx.conf', restored);
  const same = fs.readFileSync(path.join(restored, 'nginx.conf')).equals(files[1]!.content);
  process.stdout.write(
    `  ${path.join(restored, 'nginx.conf')}: ${same ? 'identical to the original' : 'DIFFERS'}\n`,
  );
  if (!same) throw new Error('restored file differs');

  step('mount check1 as a raw disk');
  const mnt = path.join(work, 'mnt');
  fs.mkdirSync(mnt);
  bkfs('mount', 'web@check1', mnt);
  try {
    for (const f of fs.readdirSync(mnt)) {
      process.stdout.write(`  ${path.join(mnt, f)}  ${fs.statSync(path.join(mnt, f)).size} bytes\n`);
    }
  } finally {
    bkfs('umount', mnt);
  }

  step('verify: re-read and re-hash every chunk');
  bkfs('verify', 'web');

  step('the web console: a token, then bkfs web in the background (plain HTTP on loopback)');
  const { token } = bkfsJson<{ token: string }>('web', 'token', 'add', 'demo', '--json');
  const restores = path.join(work, 'restores');
  fs.mkdirSync(restores, { mode: 0o700 });
  // Port 0: any free port (the URL below says which). The demo's guest is its own: kernel engine.
  const web = bkfsJson<{ url: string }>(
    'web',
    '--daemon',
    '--http',
    '--listen',
    '127.0.0.1:0',
    '--engine',
    'kernel',
    '--restore-root',
    restores,
    '--json',
  );

  process.stdout.write(`\nDone. The repository is in ${repo}; try: BKFS_REPO=${repo} bkfs list\n`);
  process.stdout.write(`\n\x1b[1mWeb console:\x1b[0m ${web.url}\n`);
  process.stdout.write(`  log in with this operator token: ${token}\n`);
  process.stdout.write(
    `  (from another machine: ssh -L 8480:${web.url.replace(/^https?:\/\/|\/$/g, '')} this-host, then http://127.0.0.1:8480/)\n`,
  );
  process.stdout.write(`  stop it with: BKFS_WEB_DIR=${process.env.BKFS_WEB_DIR} bkfs web stop\n`);
}

main().catch((e: unknown) => {
  process.stderr.write(`demo failed: ${(e as Error).message}\n`);
  process.exit(1);
});
