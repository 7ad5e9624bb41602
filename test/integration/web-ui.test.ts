/**
 * The web console in a real browser (issue 15): Debian's chromium, headless, driven by
 * playwright-core against the real `bkfs web` server on a real repository holding two checkpoints
 * of a real GPT+ext4 guest disk. A person's path through it: log in with a token, open the VM,
 * pick a checkpoint, walk the directory tree to a file, preview and download it (sha256 against
 * what the guest wrote), download a folder as .zip (its listing and contents checked with unzip),
 * compare two checkpoints and download the old side of a changed file, restore the disk with live
 * progress (checked with `qemu-img compare` against the source image), protect and forget with
 * confirmation; then a read-only token: no operator controls in the page, and the API refuses a
 * restore even when asked directly. Needs root (loop mounts for the fixture and the kernel
 * engine), qemu-utils, chromium.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Browser, BrowserContext, Download, Page } from 'playwright-core';
import { run } from '../../src/util/proc';
import {
  addToken,
  chromiumPath,
  launchBrowser,
  login,
  makeWebFixture,
  startWeb,
  type WebFixture,
  type WebServerProc,
} from '../helpers/web';

let work: string;
let fx: WebFixture;
let server: WebServerProc | undefined;
let browser: Browser | undefined;
let opCtx: BrowserContext;
let page: Page;
let operatorToken: string;
let readOnlyToken: string;
let restoreRoot: string;

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

async function saved(d: Download): Promise<Buffer> {
  const f = path.join(work, 'dl', `${Date.now()}-${d.suggestedFilename()}`);
  fs.mkdirSync(path.dirname(f), { recursive: true });
  await d.saveAs(f);
  return fs.readFileSync(f);
}

async function download(
  p: Page,
  click: () => Promise<void>,
): Promise<{ name: string; data: Buffer; file: string }> {
  const [d] = await Promise.all([p.waitForEvent('download', { timeout: 60_000 }), click()]);
  const data = await saved(d);
  const file = path.join(work, 'dl', `last-${d.suggestedFilename()}`);
  fs.writeFileSync(file, data);
  return { name: d.suggestedFilename(), data, file };
}

describe('web console in chromium', { timeout: 240_000 }, () => {
  before(async () => {
    chromiumPath(); // fails first, saying what to install
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-webui-'));
    restoreRoot = path.join(work, 'restores');
    fs.mkdirSync(restoreRoot, { mode: 0o700 });
    fx = await makeWebFixture(work);
    const stateDir = path.join(work, 'state');
    operatorToken = await addToken(fx.repo, stateDir, 'alice', false);
    readOnlyToken = await addToken(fx.repo, stateDir, 'bob', true);
    server = await startWeb({ repo: fx.repo, stateDir, restoreRoot });
    browser = await launchBrowser();
    opCtx = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
    page = await login(opCtx, server.url, operatorToken);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('logs in with a token and lists the VM with its latest checkpoint', async () => {
    assert.match((await page.textContent('#who')) ?? '', /alice \(operator\)/);
    await page.waitForSelector('#vms a.vm-link');
    const row = await page.textContent('#vms tbody tr');
    assert.match(row ?? '', /web/);
    assert.match(row ?? '', /check2/);
  });

  it('opens the VM: a timeline of both checkpoints and the logical vs stored chart', async () => {
    await page.click('#vms a.vm-link');
    await page.waitForSelector('#timeline li');
    const cps = await page.$$eval('#timeline li', (lis) => lis.map((l) => l.getAttribute('data-cp')));
    assert.deepEqual(cps, ['check2', 'check1']);
    const levels = await page.textContent('#timeline');
    assert.match(levels ?? '', /full/);
    assert.match(levels ?? '', /inc/);
    assert.equal(await page.locator('svg.chart path.logical').count(), 1);
    assert.equal(await page.locator('svg.chart circle').count(), 4);
  });

  it('picks a checkpoint, walks to a file, previews and downloads it (sha256 as written by the guest)', async () => {
    await page.click('#timeline li[data-cp="check2"] a.cp-link');
    await page.waitForSelector('#volumes a.browse-volume', { timeout: 60_000 });
    assert.match((await page.textContent('#disks')) ?? '', /vda/);
    assert.match((await page.textContent('#volumes')) ?? '', /ext4/);
    await page.click('#volumes a.browse-volume');
    for (const dir of ['etc', 'nginx']) {
      await page.click(`.listing .item[data-name="${dir}"] a.entry-link`);
      await page.waitForSelector(`.crumbs [aria-current="page"]:text-is("${dir}")`);
    }
    await page.click('.listing .item[data-name="nginx.conf"] a.entry-link');
    await page.waitForSelector('#preview-text');
    const want = fx.check2.get('etc/nginx/nginx.conf')!;
    assert.equal(await page.textContent('#preview-text'), want.toString('utf8'));
    const d = await download(page, () => page.click('#download-file'));
    assert.equal(d.name, 'nginx.conf');
    assert.equal(sha(d.data), sha(want));
  });

  it('sorts the listing and shows the tree', async () => {
    await page.click('.crumbs a:text-is("vda:1")').catch(async () => page.click('.crumbs a >> nth=2'));
    await page.waitForSelector('.listing .item[data-name="var"]');
    const names = async (): Promise<string[]> =>
      page.$$eval('.listing .item', (xs) => xs.map((x) => x.getAttribute('data-name') ?? ''));
    const asc = await names();
    await page.click('#sort-name');
    const desc = await names();
    const dirsAsc = asc.filter((n) => ['docs', 'etc', 'var', 'lost+found'].includes(n));
    const dirsDesc = desc.filter((n) => ['docs', 'etc', 'var', 'lost+found'].includes(n));
    assert.deepEqual(dirsDesc, [...dirsAsc].reverse());
    assert.ok((await page.locator('.tree a').count()) >= 4, 'the tree lists the root and its directories');
  });

  it('downloads a folder as .zip: the listing and the contents are the guest files', async () => {
    await page.click('.listing .item[data-name="docs"] a.entry-link');
    await page.waitForSelector('.crumbs [aria-current="page"]:text-is("docs")');
    const d = await download(page, () => page.click('#dl-zip'));
    assert.equal(d.name, 'docs.zip');
    const list = (await run('unzip', ['-Z1', d.file])).stdout
      .split('\n')
      .filter((l) => l && !l.endsWith('/'))
      .sort();
    assert.deepEqual(list, DOCS_IN_ZIP);
    const x = path.join(work, 'unzipped');
    await run('unzip', ['-q', d.file, '-d', x]);
    for (const p of DOCS_IN_ZIP)
      assert.equal(sha(fs.readFileSync(path.join(x, p))), sha(fx.check2.get(p)!), p);
    await page.waitForSelector('#archive-done');
  });

  it('compares two checkpoints and downloads the old side of a changed file', async () => {
    await page.goto(`${server!.url}/#/vm/web/compare?from=check1&to=check2`);
    await page.waitForSelector('#diff tbody tr', { timeout: 60_000 });
    const rows = await page.$$eval('#diff tbody tr', (trs) =>
      trs.map((t) => `${t.getAttribute('data-change')} ${t.getAttribute('data-path')}`),
    );
    assert.ok(rows.includes('changed /etc/nginx/nginx.conf'), rows.join('\n'));
    assert.ok(rows.includes('added /var/www/new.html'), rows.join('\n'));
    const d = await download(page, () => page.click('#diff tr[data-path="/etc/nginx/nginx.conf"] a.dl-from'));
    assert.equal(sha(d.data), sha(fx.check1.get('etc/nginx/nginx.conf')!));
    const e = await download(page, () => page.click('#diff tr[data-path="/var/www/new.html"] a.dl-to'));
    assert.equal(sha(e.data), sha(fx.check2.get('var/www/new.html')!));
  });

  it('restores the disk with live progress; qemu-img compare finds it identical to the source', async () => {
    await page.goto(`${server!.url}/#/vm/web/cp/check2`);
    await page.waitForSelector('#restore-form');
    await page.fill('#restore-to', 'web-vda.raw');
    await page.selectOption('#restore-format', 'raw');
    await page.click('#restore-start');
    await page.waitForSelector('#job-state');
    await page.waitForSelector('#job-state:text-is("done")', { timeout: 120_000 });
    const pct = await page.$eval('progress[aria-label="Restore progress"]', (p) =>
      Number(p.getAttribute('value')),
    );
    assert.equal(pct, 100);
    const out = path.join(restoreRoot, 'web-vda.raw');
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', out, fx.img]);
    assert.match(r.stdout, /Images are identical/);
  });

  it('protects and forgets a checkpoint (forget asks to type its name)', async () => {
    await page.goto(`${server!.url}/#/vm/web`);
    const li = (cp: string): string => `#timeline li[data-cp="${cp}"]`;
    await page.waitForSelector(`${li('check1')} button.protect`);
    await page.click(`${li('check1')} button.protect`);
    await page.waitForSelector(`${li('check1')} .flag.protected`);
    assert.equal(
      await page.isDisabled(`${li('check1')} button.forget`),
      true,
      'a protected checkpoint cannot be forgotten',
    );
    await page.click(`${li('check1')} button.protect`);
    await page.waitForSelector(`${li('check1')} .flag.protected`, { state: 'detached' });
    await page.click(`${li('check1')} button.forget`);
    const dlg = page.locator('dialog[open]');
    await dlg.waitFor();
    assert.equal(await dlg.locator('#confirm-ok').isDisabled(), true, 'not before the name is typed');
    await dlg.locator('#confirm-text').fill('web@check1');
    await dlg.locator('#confirm-ok').click();
    await page.waitForSelector(li('check1'), { state: 'detached' });
    assert.deepEqual(await page.$$eval('#timeline li', (l) => l.map((x) => x.getAttribute('data-cp'))), [
      'check2',
    ]);
  });

  it('a read-only token sees no operator actions and the API refuses its restore', async () => {
    const ctx = await browser!.newContext();
    try {
      const ro = await login(ctx, server!.url, readOnlyToken);
      assert.match((await ro.textContent('#who')) ?? '', /bob \(read-only\)/);
      await ro.goto(`${server!.url}/#/vm/web`);
      await ro.waitForSelector('#timeline li');
      assert.equal(await ro.locator('button.protect, button.forget').count(), 0);
      await ro.goto(`${server!.url}/#/vm/web/cp/check2`);
      await ro.waitForSelector('#disks');
      await ro.waitForSelector('#volumes', { timeout: 60_000 });
      assert.equal(await ro.locator('#restore-form').count(), 0);
      assert.equal(await ro.locator('a[href="#/jobs"]').count(), 0);
      // The API itself refuses, even with the session's own CSRF token.
      const res = await ro.evaluate(async () => {
        const s = (await (await fetch('/api/session')).json()) as { csrfToken: string };
        const r = await fetch('/api/jobs/restore', {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'x-csrf-token': s.csrfToken },
          body: JSON.stringify({ vm: 'web', checkpoint: 'check2', disk: 'vda', to: 'ro.raw' }),
        });
        return { status: r.status, body: (await r.json()) as { error: { code: string } } };
      });
      assert.equal(res.status, 403);
      assert.equal(res.body.error.code, 'PERMISSION_DENIED');
      assert.equal(fs.existsSync(path.join(restoreRoot, 'ro.raw')), false);
    } finally {
      await ctx.close();
    }
  });
});

const DOCS_IN_ZIP = ['docs/data.bin', 'docs/guide/intro.md', 'docs/guide/setup.md', 'docs/readme.txt'];
