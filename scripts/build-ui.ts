/**
 * Part of `npm run build` (after the two tsc runs): puts the web console's static files next to its
 * compiled modules in dist/src/web/ui/, so the package ships a ready console and the user runs no
 * build step. The browser loads ES modules directly (an import map in index.html names the vendor
 * files): preact and htm are copied from node_modules, nothing is bundled or fetched from a CDN.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(__dirname, '../..');
const src = path.join(root, 'src/web/ui');
const out = path.join(root, 'dist/src/web/ui');

/** Vendor ES modules: [package-relative source, file name served under /vendor/]. */
const VENDOR: [string, string][] = [
  ['preact/dist/preact.mjs', 'preact.mjs'],
  ['preact/hooks/dist/hooks.mjs', 'hooks.mjs'],
  ['htm/dist/htm.mjs', 'htm.mjs'],
];

function main(): void {
  fs.mkdirSync(path.join(out, 'vendor'), { recursive: true });
  for (const f of fs.readdirSync(src)) {
    if (/\.(html|css|svg|ico)$/.test(f)) fs.copyFileSync(path.join(src, f), path.join(out, f));
  }
  for (const [from, to] of VENDOR) {
    fs.copyFileSync(require.resolve(path.join(root, 'node_modules', from)), path.join(out, 'vendor', to));
  }
}

main();
