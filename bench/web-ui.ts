/**
 * Time to list a directory of 10 000 entries in the web console, in headless chromium.
 *
 *   node dist/bench/web-ui.js [--entries 10000] [--runs 5]
 *
 * A guest ext4 with /big holding N files is backed up (full, then incremental with /big added);
 * `bkfs web` serves it (kernel engine, plain HTTP on loopback). Measured in the browser, from
 * `page.goto` of the folder's route to the listing showing "N entries" with its first rows drawn:
 *   - cold: the first visit (the server starts the checkpoint's file session and lists /big);
 *   - warm: later visits in fresh tabs (the server's listing cache answers; the page fetches,
 *     sorts and draws the whole list again);
 * the API call alone (fetch + JSON parse of the whole listing, from the page), then the time to
 * scroll the virtualized list to its last entry, and the number of row elements
 * in the DOM (it stays small: only the visible rows are drawn).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { addToken, launchBrowser, login, makeWebFixture, startWeb } from '../test/helpers/web';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
};

async function main(): Promise<void> {
  const entries = Number(arg('entries', '10000'));
  const runs = Number(arg('runs', '5'));
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-bench-webui-'));
  const restoreRoot = path.join(work, 'restores');
  fs.mkdirSync(restoreRoot);
  const fx = await makeWebFixture(work, { bigDirEntries: entries });
  const stateDir = path.join(work, 'state');
  const token = await addToken(fx.repo, stateDir, 'bench', true);
  const server = await startWeb({ repo: fx.repo, stateDir, restoreRoot });
  const browser = await launchBrowser();
  try {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    (await login(ctx, server.url, token)).close();
    const route = `${server.url}/#/vm/web/cp/check2/fs/vda:1?path=/big`;
    const listOnce = async (): Promise<{ ms: number; scrollMs: number; domRows: number }> => {
      const page = await ctx.newPage();
      const t0 = performance.now();
      await page.goto(route);
      await page
        .locator('#entry-count', { hasText: new RegExp(`^${entries} entries$`) })
        .waitFor({ timeout: 120_000 })
        .catch(async (e: Error) => {
          const shown = await page
            .locator('main')
            .innerText()
            .catch(() => '?');
          throw new Error(`${e.message}\nthe page shows:\n${shown.slice(0, 2000)}`);
        });
      await page.locator('.listing .item').first().waitFor();
      const ms = performance.now() - t0;
      const s0 = performance.now();
      await page.$eval('.vlist', (el) => {
        el.scrollTop = el.scrollHeight;
      });
      const last = `file-${String(entries - 1).padStart(5, '0')}.txt`;
      await page.waitForSelector(`.listing .item[data-name="${last}"]`, { timeout: 30_000 });
      const scrollMs = performance.now() - s0;
      const domRows = await page.locator('.listing .item').count();
      await page.close();
      return { ms, scrollMs, domRows };
    };
    const cold = await listOnce();
    // The API alone, from the page (same cookie): fetch and parse the whole listing.
    const apiPage = await ctx.newPage();
    await apiPage.goto(`${server.url}/`);
    const apiMs: number[] = [];
    for (let i = 0; i < runs; i++) {
      apiMs.push(
        await apiPage.evaluate(async (n) => {
          const t = performance.now();
          const r = await fetch(`/api/vms/web/checkpoints/check2/files?path=/big&volume=vda:1&limit=${n}`);
          const j = (await r.json()) as { entries: unknown[] };
          if (j.entries.length !== n) throw new Error(`listed ${j.entries.length}`);
          return performance.now() - t;
        }, entries),
      );
    }
    await apiPage.close();
    const warm: { ms: number; scrollMs: number; domRows: number }[] = [];
    for (let i = 0; i < runs; i++) warm.push(await listOnce());
    const res = {
      entries,
      coldMs: Math.round(cold.ms),
      warmMs: warm.map((w) => Math.round(w.ms)),
      warmMedianMs: Math.round(median(warm.map((w) => w.ms))),
      apiOnlyMedianMs: Math.round(median(apiMs)),
      scrollToEndMedianMs: Math.round(median(warm.map((w) => w.scrollMs))),
      rowElementsInDom: cold.domRows,
      loadAverage: os.loadavg().map((x) => Number(x.toFixed(2))),
    };
    process.stdout.write(`${JSON.stringify(res, null, 2)}\n`);
  } finally {
    await browser.close();
    await server.stop();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`bench web-ui failed: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
