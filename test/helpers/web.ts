/**
 * The web console's test bench, shared by test/integration/web-ui.test.ts, `npm run screenshots`
 * (scripts/screenshots.ts) and bench/web-ui.ts: a real repository with two checkpoints of a real
 * GPT+ext4 guest disk, tokens made with `bkfs web token add`, the real `bkfs web` server (plain
 * HTTP on loopback) and Debian's chromium driven headless by playwright-core (which never
 * downloads a browser of its own).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { BKFS, bkfsOk } from './cli';
import { makeDisk, modifyDisk, randomBuffer, textFile } from './images';
import { stopChild } from '../../src/util/proc';

const MiB = 1 << 20;

export const CHROMIUM_CANDIDATES = [
  '/usr/bin/chromium',
  '/usr/lib/chromium/chromium',
  '/usr/bin/chromium-browser',
];

/** Debian's chromium, or an error that says what to install. */
export function chromiumPath(): string {
  const env = process.env.BKFS_CHROMIUM;
  if (env) {
    if (!fs.existsSync(env)) throw new Error(`BKFS_CHROMIUM=${env} does not exist`);
    return env;
  }
  const found = CHROMIUM_CANDIDATES.find((p) => fs.existsSync(p));
  if (!found) {
    throw new Error(
      "chromium not found: the browser tests need Debian's chromium (apt-get install -y --no-install-recommends chromium), " +
        'or BKFS_CHROMIUM=/path/to/chrome; playwright-core never downloads a browser',
    );
  }
  return found;
}

export async function launchBrowser(): Promise<Browser> {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: chromiumPath(),
    headless: true,
    // --no-sandbox: the tests run as root, where chromium's sandbox refuses to start.
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
}

/** Guest files of the fixture, per checkpoint (path without the leading '/' -> content). */
export interface WebFixture {
  img: string;
  repo: string;
  check1: Map<string, Buffer>;
  check2: Map<string, Buffer>;
  /** Directory with `bigDirEntries` files, if asked for. */
  bigDir: string | null;
}

export const DOCS = ['docs/readme.txt', 'docs/guide/intro.md', 'docs/guide/setup.md', 'docs/data.bin'];

/**
 * A 96 MiB qcow2 with a GPT and one ext4 partition; check1 = the first full backup, check2 =
 * incremental after the guest edits nginx.conf and adds var/www/new.html. `bigDirEntries` adds a
 * directory /big with that many small files (for the listing benchmark).
 */
export async function makeWebFixture(
  work: string,
  opts: { bigDirEntries?: number } = {},
): Promise<WebFixture> {
  const img = path.join(work, 'web.qcow2');
  const repo = path.join(work, 'repo');
  const check1 = new Map<string, Buffer>([
    ['etc/hostname', Buffer.from('web1\n')],
    ['etc/nginx/nginx.conf', textFile(1, 4000)],
    ['var/www/index.html', textFile(2, 20000)],
    ['var/lib/app/data.bin', randomBuffer(3, 3 * MiB)],
    ['docs/readme.txt', textFile(4, 3000)],
    ['docs/guide/intro.md', textFile(5, 5000)],
    ['docs/guide/setup.md', textFile(6, 7000)],
    ['docs/data.bin', randomBuffer(7, 300_000)],
  ]);
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 96,
    table: 'gpt',
    seed: 15,
    partitions: [
      {
        fs: 'ext4',
        sizeMiB: 80,
        label: 'root',
        files: [...check1].map(([p, content]) => ({ path: p, content })),
      },
    ],
  });
  const env = { BKFS_REPO: repo };
  await bkfsOk(['init'], env);
  await bkfsOk(['backup', 'web', '--disk', `vda=${img}`, '--level', 'full'], env);
  const check2 = new Map(check1);
  check2.set('etc/nginx/nginx.conf', textFile(8, 4300));
  check2.set('var/www/new.html', textFile(9, 30000));
  let bigDir: string | null = null;
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/nginx/nginx.conf'), check2.get('etc/nginx/nginx.conf')!);
    fs.writeFileSync(path.join(m, 'var/www/new.html'), check2.get('var/www/new.html')!);
    if (opts.bigDirEntries) {
      bigDir = '/big';
      fs.mkdirSync(path.join(m, 'big'));
      for (let i = 0; i < opts.bigDirEntries; i++) {
        fs.writeFileSync(path.join(m, 'big', `file-${String(i).padStart(5, '0')}.txt`), `entry ${i}\n`);
      }
    }
  });
  await bkfsOk(['backup', 'web', '--disk', `vda=${img}`, '--level', 'inc'], env);
  return { img, repo, check1, check2, bigDir };
}

/** `bkfs web token add NAME [--read-only]`: the token it prints once. */
export async function addToken(
  repo: string,
  stateDir: string,
  name: string,
  readOnly: boolean,
): Promise<string> {
  const r = await bkfsOk(['web', 'token', 'add', name, ...(readOnly ? ['--read-only'] : [])], {
    BKFS_REPO: repo,
    BKFS_WEB_DIR: stateDir,
  });
  const m = /bkfs_[A-Za-z0-9_-]{20,}/.exec(r.stdout);
  if (!m) throw new Error(`no token in the output of 'bkfs web token add': ${r.stdout}`);
  return m[0];
}

export interface WebServerProc {
  url: string;
  child: ChildProcess;
  output: () => string;
  stop: () => Promise<void>;
}

/**
 * `bkfs web --listen 127.0.0.1:0 --http` in the foreground (plain HTTP is allowed on loopback),
 * with `--engine kernel` for this trusted guest made by the test (libguestfs appliances take
 * 15-50 s each without KVM). The URL is read from the line the server prints when it listens.
 */
export async function startWeb(o: {
  repo: string;
  stateDir: string;
  restoreRoot: string;
  engine?: string;
}): Promise<WebServerProc> {
  const args = [
    BKFS,
    'web',
    '--listen',
    '127.0.0.1:0',
    '--http',
    '--restore-root',
    o.restoreRoot,
    '--engine',
    o.engine ?? 'kernel',
  ];
  const child = spawn(process.execPath, args, {
    env: { ...process.env, BKFS_REPO: o.repo, BKFS_WEB_DIR: o.stateDir, CI: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  const url = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`bkfs web did not print its URL in 30 s:\n${out}`)), 30_000);
    const onData = (d: Buffer): void => {
      out += d.toString();
      const m = /(https?:\/\/(?:127\.0\.0\.1|localhost|\[::1\]):\d+)/.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(m[1]!);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`bkfs web exited ${code}:\n${out}`));
    });
  });
  return { url, child, output: () => out, stop: () => stopChild(child, 10_000) };
}

/** Open the console and log in with a token through the login page. */
export async function login(ctx: BrowserContext, url: string, token: string): Promise<Page> {
  const page = await ctx.newPage();
  await page.goto(`${url}/`);
  await page.fill('#token', token);
  await page.click('#login');
  await page.waitForSelector('#who');
  return page;
}
