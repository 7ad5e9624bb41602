/**
 * `npm run screenshots`: regenerates docs/screenshots/*.png (the README's "Web console" pictures)
 * from the real console: the same fixture, server and headless chromium as
 * test/integration/web-ui.test.ts (test/helpers/web.ts). Needs root, qemu-utils and chromium.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Page } from 'playwright-core';
import { addToken, launchBrowser, login, makeWebFixture, startWeb } from '../test/helpers/web';

const OUT = path.resolve(__dirname, '../../docs/screenshots');

async function shot(page: Page, name: string): Promise<void> {
  await page.waitForTimeout(150); // let the last render settle
  const file = path.join(OUT, `${name}.png`);
  await page.screenshot({ path: file, fullPage: false });
  process.stdout.write(`  ${path.relative(process.cwd(), file)}\n`);
}

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-webui-shots-'));
  fs.mkdirSync(OUT, { recursive: true });
  const restoreRoot = path.join(work, 'restores');
  fs.mkdirSync(restoreRoot, { mode: 0o700 });
  process.stdout.write(`making a repository with two checkpoints in ${work}\n`);
  const fx = await makeWebFixture(work);
  const stateDir = path.join(work, 'state');
  const token = await addToken(fx.repo, stateDir, 'alice', false);
  const server = await startWeb({ repo: fx.repo, stateDir, restoreRoot });
  const browser = await launchBrowser();
  try {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1 });
    const first = await ctx.newPage();
    await first.goto(`${server.url}/`);
    await first.waitForSelector('#token');
    await shot(first, 'login');
    await first.close();
    const page = await login(ctx, server.url, token);
    await page.waitForSelector('#vms a.vm-link');
    await shot(page, 'vms');
    await page.goto(`${server.url}/#/vm/web`);
    await page.waitForSelector('#timeline li');
    await shot(page, 'vm-timeline');
    await page.goto(`${server.url}/#/vm/web/cp/check2`);
    await page.waitForSelector('#volumes a.browse-volume', { timeout: 60_000 });
    await shot(page, 'checkpoint');
    await page.goto(`${server.url}/#/vm/web/cp/check2/fs/vda:1?path=/etc/nginx&file=nginx.conf`);
    await page.waitForSelector('#preview-text');
    await shot(page, 'file-browser');
    await page.goto(`${server.url}/#/vm/web/compare?from=check1&to=check2`);
    await page.waitForSelector('#diff tbody tr', { timeout: 60_000 });
    await shot(page, 'compare');
    await page.goto(`${server.url}/#/vm/web/cp/check2`);
    await page.waitForSelector('#restore-form');
    await page.fill('#restore-to', 'web-vda.raw');
    await page.click('#restore-start');
    await page.waitForSelector('#job-state:text-is("done")', { timeout: 120_000 });
    await shot(page, 'restore');
  } finally {
    await browser.close();
    await server.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`screenshots failed: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
