/**
 * Part of `npm run build` (after the two tsc runs): puts the web console's static files next to its
 * compiled modules in dist/src/web/ui/, so the package ships a ready console and the user runs no
 * build step. The browser loads ES modules directly: preact and htm are copied from node_modules
 * into vendor/, and the bare specifiers ('preact', 'preact/hooks', 'htm') in the compiled modules
 * and in the vendor files are rewritten to those files' URLs (an inline import map would need
 * 'unsafe-inline' in the server's Content-Security-Policy). Nothing is bundled or fetched from a CDN.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.resolve(__dirname, '../..');
const src = path.join(root, 'src/web/ui');
const out = path.join(root, 'dist/src/web/ui');

/** Vendor ES modules: [package-relative source, file name served under /vendor/, bare specifier]. */
const VENDOR: [string, string, string][] = [
  ['preact/dist/preact.mjs', 'preact.mjs', 'preact'],
  ['preact/hooks/dist/hooks.mjs', 'hooks.mjs', 'preact/hooks'],
  ['htm/dist/htm.mjs', 'htm.mjs', 'htm'],
];

const URL_OF = new Map(VENDOR.map(([, file, spec]) => [spec, `/vendor/${file}`]));

/**
 * `from "preact"` / `import "htm"` -> `from "/vendor/preact.mjs"`. A compiled module's own import
 * line naming any other bare specifier fails the build (the console would not load).
 */
export function rewriteSpecifiers(code: string, file: string): string {
  const specs = [...URL_OF.keys()].map((k) => k.replace(/[/]/g, '\\/')).join('|');
  const re = new RegExp(`(\\bfrom\\s*|\\bimport\\s*)(["'])(${specs})\\2`, 'g');
  const out = code.replace(
    re,
    (_all, pre: string, q: string, spec: string) => `${pre}${q}${URL_OF.get(spec)}${q}`,
  );
  const stray = /^import\b[^'"]*(?:from\s*)?['"]([^'"./][^'"]*)['"]/m.exec(out);
  if (stray) throw new Error(`${file}: import of '${stray[1]}', which the console does not ship`);
  return out;
}

function main(): void {
  fs.mkdirSync(path.join(out, 'vendor'), { recursive: true });
  for (const f of fs.readdirSync(src)) {
    if (/\.(html|css|svg|ico)$/.test(f)) fs.copyFileSync(path.join(src, f), path.join(out, f));
  }
  for (const [from, to] of VENDOR) {
    const code = fs.readFileSync(path.join(root, 'node_modules', from), 'utf8');
    fs.writeFileSync(path.join(out, 'vendor', to), rewriteSpecifiers(code, from));
  }
  for (const f of fs.readdirSync(out)) {
    if (!f.endsWith('.js')) continue;
    const file = path.join(out, f);
    fs.writeFileSync(file, rewriteSpecifiers(fs.readFileSync(file, 'utf8'), file));
  }
}

if (require.main === module) main();
