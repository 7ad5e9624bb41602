/**
 * Everyday CLI features against a real repository (raw image sources, real SQLite): `list` in
 * local time with its offset (TZ honoured), `forget` rows in time order, `--retry-lock` waiting
 * for a real writer lock, `-q`/`-v`, `version`/`--version`, `snapshots`.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { BKFS, bkfs, bkfsOk, type CliResult } from '../helpers/cli';
import { randomBuffer } from '../helpers/images';
import { Repository } from '../../src/repo/repository';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { ENCRYPTED_FORMAT_VERSION, FORMAT_VERSION, PLAIN_FORMAT_VERSION } from '../../src/index/schema';

/** A bkfs run whose stderr can be watched while it runs. */
function spawnBkfs(args: string[]): { saw: (re: RegExp) => Promise<void>; done: Promise<CliResult> } {
  const child = spawn(process.execPath, [BKFS, ...args], {
    env: { ...process.env, CI: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  const waiters: { re: RegExp; resolve: () => void }[] = [];
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
    for (const w of waiters.splice(0)) {
      if (w.re.test(stderr)) w.resolve();
      else waiters.push(w);
    }
  });
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? 128, stdout, stderr }));
  });
  return {
    saw: (re) =>
      re.test(stderr)
        ? Promise.resolve()
        : Promise.race([
            new Promise<void>((resolve) => waiters.push({ re, resolve })),
            done.then((r) => {
              throw new Error(`bkfs ended (${r.code}) before printing ${re}: ${r.stderr}`);
            }),
          ]),
    done,
  };
}

let work: string;
let repo: string;
let disk: string;

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-clifeat-features-'));
  repo = path.join(work, 'repo');
  disk = path.join(work, 'vda.raw');
  await bkfsOk(['-r', repo, 'init']);
  for (let i = 0; i < 11; i++) {
    fs.writeFileSync(disk, randomBuffer(i + 1, 1 << 20));
    await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${disk}`, '--level', 'full']);
  }
});

after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

describe('times and order', () => {
  it('list shows local time with its offset and honours TZ; JSON stays UTC', async () => {
    const rows = JSON.parse((await bkfsOk(['-r', repo, 'list', 'web', '--json'])).stdout) as {
      name: string;
      time: string;
    }[];
    const t = Date.parse(rows[0]!.time);
    const utc = (await bkfsOk(['-r', repo, 'list', 'web'], { TZ: 'UTC' })).stdout;
    const iso = new Date(t).toISOString();
    assert.ok(utc.includes(`${iso.slice(0, 10)} ${iso.slice(11, 19)} +0000`), utc);
    const ist = (await bkfsOk(['-r', repo, 'snapshots', 'web'], { TZ: 'Asia/Kolkata' })).stdout;
    const local = new Date(t + 330 * 60_000).toISOString();
    assert.ok(ist.includes(`${local.slice(0, 10)} ${local.slice(11, 19)} +0530`), ist);
    assert.equal(ist.split('\n')[0], utc.split('\n')[0]); // same header: snapshots is list
  });

  it('forget lists checkpoints in time order, not name order (check10 after check9)', async () => {
    const r = await bkfsOk(['-r', repo, 'forget', 'web', '--keep-last', '2', '--dry-run']);
    const names = r.stdout
      .split('\n')
      .map((l) => /web@(check\d+)/.exec(l)?.[1])
      .filter((x): x is string => x !== undefined);
    assert.deepEqual(
      names,
      Array.from({ length: 11 }, (_, i) => `check${i + 1}`),
    );
  });

  it('forget --keep-within / --keep-hourly / --keep-yearly', async () => {
    const within = JSON.parse(
      (await bkfsOk(['-r', repo, 'forget', 'web', '--keep-within', '1d', '--dry-run', '--json'])).stdout,
    ) as { kept: { reasons: string[] }[]; removed: unknown[] };
    assert.equal(within.kept.length, 11);
    assert.ok(within.kept.every((k) => k.reasons.includes('within')));
    const hy = JSON.parse(
      (
        await bkfsOk([
          '-r',
          repo,
          'forget',
          'web',
          '--keep-hourly',
          '1',
          '--keep-yearly',
          '1',
          '--dry-run',
          '--json',
        ])
      ).stdout,
    ) as { kept: { name: string; reasons: string[] }[] };
    assert.ok(hy.kept.length >= 1 && hy.kept.length <= 2);
    assert.deepEqual(hy.kept[0]!.reasons.slice().sort(), ['hourly', 'yearly']);
    const bad = await bkfs(['-r', repo, 'forget', 'web', '--keep-within', '3w']);
    assert.equal(bad.code, EXIT_CODES.USAGE);
    assert.match(bad.stderr, /keep-within takes a span/);
  });
});

describe('--retry-lock', () => {
  it('fails at once without it, waits for the lock with it, and gives up after the duration', async () => {
    const holder = Repository.open(repo);
    holder.lockWriter('test holds the lock');
    try {
      const t0 = Date.now();
      const now = await bkfs(['-r', repo, 'gc']);
      assert.equal(now.code, EXIT_CODES.REPO_LOCKED);
      const short = await bkfs(['-r', repo, '--retry-lock', '1500ms', 'gc']);
      assert.equal(short.code, EXIT_CODES.REPO_LOCKED, short.stderr);
      assert.match(short.stderr, /waiting up to .*--retry-lock/);
      assert.ok(Date.now() - t0 >= 1500);
      // A writer that waits: the lock goes away after 1.5 s and gc runs.
      const waiting = spawnBkfs(['-r', repo, '--retry-lock', '60s', 'gc', '--json']);
      const quiet = spawnBkfs(['-r', repo, '-q', '--retry-lock', '60s', 'forget', 'web@check1', '--json']);
      // Release only once the first has met the lock (it says so), and the quiet one had time to.
      await waiting.saw(/waiting up to/);
      await new Promise((r) => setTimeout(r, 3000));
      holder.unlockWriter();
      const [w, q] = await Promise.all([waiting.done, quiet.done]);
      assert.equal(w.code, 0, w.stderr);
      assert.equal(q.code, 0, q.stderr);
      assert.equal(q.stderr, '', '-q: no notes');
      assert.match(w.stderr, /locked by .*waiting up to/);
      const f = JSON.parse(q.stdout) as { removed: { name: string }[] };
      assert.deepEqual(
        f.removed.map((x) => x.name),
        ['check1'],
      );
    } finally {
      holder.close();
    }
  });

  it('a bad duration is a usage error', async () => {
    const r = await bkfs(['-r', repo, '--retry-lock', 'soon', 'gc']);
    assert.equal(r.code, EXIT_CODES.USAGE);
    assert.match(r.stderr, /--retry-lock takes a duration/);
  });
});

describe('global options and version', () => {
  it('-v tells the repository and the time taken; -q with -v is refused', async () => {
    const r = await bkfsOk(['-r', repo, '-v', 'list']);
    assert.match(r.stderr, new RegExp(`repository ${repo}`));
    assert.match(r.stderr, /done in \d+ ms \(exit code 0\)/);
    const both = await bkfs(['-r', repo, '-q', '-v', 'list']);
    assert.equal(both.code, EXIT_CODES.USAGE);
  });

  it('bkfs version and --version print bkfs, format, node and library versions', async () => {
    const pkg = JSON.parse(fs.readFileSync(path.resolve(__dirname, '../../../package.json'), 'utf8')) as {
      version: string;
    };
    const a = await bkfsOk(['version']);
    const b = await bkfsOk(['--version']);
    assert.equal(a.stdout, b.stdout);
    assert.match(a.stdout, new RegExp(`^bkfs ${pkg.version.replace(/\./g, '\\.')}`));
    const all = Array.from({ length: FORMAT_VERSION }, (_, i) => i + 1).join(', ');
    assert.match(
      a.stdout,
      new RegExp(
        `^repository format ${PLAIN_FORMAT_VERSION} \\(reads ${all}; writes ${PLAIN_FORMAT_VERSION}, or ${ENCRYPTED_FORMAT_VERSION} when encrypted\\)$`,
        'm',
      ),
    );
    assert.match(a.stdout, new RegExp(`^node ${process.versions.node} `, 'm'));
    assert.match(a.stdout, /^better-sqlite3 \d+\.\d+\.\d+, SQLite 3\.\d+/m);
    assert.match(a.stdout, /^zstd-napi \S+, zstd 1\.\d+\.\d+$/m);
    assert.match(a.stdout, /^fuse-native \d/m);
    assert.match(a.stdout, /, commander \d+\.\d+\.\d+$/m);
    assert.match(a.stdout, /^qemu-img \d+\.\d+/m);
  });
});
