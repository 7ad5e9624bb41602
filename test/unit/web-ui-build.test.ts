/**
 * The web console as built by `npm run build` (scripts/build-ui.ts): the bare module specifiers
 * are rewritten to the vendor files the package ships (the server's CSP forbids an inline import
 * map), nothing else is touched, every module the page loads exists, and the page has no inline
 * script. Also: the console's mode strings are the CLI's.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { rewriteSpecifiers } from '../../scripts/build-ui';
import { UI_ROOT } from '../../src/web/ui-assets';
import { modeString } from '../../src/files/tree';
import type { EntryKind } from '../../src/files/resolve';

describe('console build: module specifiers', () => {
  it('rewrites preact, preact/hooks and htm, minified or not', () => {
    assert.equal(
      rewriteSpecifiers(
        `import { h } from 'preact';\nimport { useState } from "preact/hooks";\nimport htm from 'htm';`,
        'x',
      ),
      `import { h } from '/vendor/preact.mjs';\nimport { useState } from "/vendor/hooks.mjs";\nimport htm from '/vendor/htm.mjs';`,
    );
    assert.equal(
      rewriteSpecifiers('import{options as n}from"preact";var t', 'x'),
      'import{options as n}from"/vendor/preact.mjs";var t',
    );
  });

  it('leaves relative imports and text that merely contains "from" alone', () => {
    const code = `import { api } from './api.js';\nconst f = query.get('from') ?? '';\nconst t = \`from 'x'\`;`;
    assert.equal(rewriteSpecifiers(code, 'x'), code);
  });

  it('fails the build on an import the console does not ship', () => {
    assert.throws(
      () => rewriteSpecifiers(`import _ from 'lodash';`, 'app.js'),
      /app\.js: import of 'lodash'/,
    );
  });
});

describe('console build: dist/src/web/ui', () => {
  const files = fs.readdirSync(UI_ROOT);

  it('has the page, its styles, the app and the vendor modules', () => {
    for (const f of ['index.html', 'style.css', 'app.js']) assert.ok(files.includes(f), f);
    for (const f of ['preact.mjs', 'hooks.mjs', 'htm.mjs'])
      assert.ok(fs.existsSync(path.join(UI_ROOT, 'vendor', f)), f);
  });

  it('index.html has no inline script and loads files that exist', () => {
    const html = fs.readFileSync(path.join(UI_ROOT, 'index.html'), 'utf8');
    for (const m of html.matchAll(/<script\b([^>]*)>([\s\S]*?)<\/script>/g)) {
      assert.match(m[1]!, /\bsrc=/, 'every script is a file (CSP: no inline scripts)');
      assert.equal(m[2]!.trim(), '');
    }
    for (const m of html.matchAll(/(?:src|href)="\/([^"]+)"/g))
      assert.ok(fs.existsSync(path.join(UI_ROOT, m[1]!)), m[1]);
  });

  it('every import of every module resolves to a shipped file', () => {
    const mods = [
      ...files.filter((f) => f.endsWith('.js')),
      ...['preact.mjs', 'hooks.mjs', 'htm.mjs'].map((f) => `vendor/${f}`),
    ];
    for (const m of mods) {
      const code = fs.readFileSync(path.join(UI_ROOT, m), 'utf8');
      for (const im of code.matchAll(/(?:^|[;\s}])(?:import|export)\b[^'"]*?from\s*["']([^"']+)["']/g)) {
        const spec = im[1]!;
        const target = spec.startsWith('/')
          ? path.join(UI_ROOT, spec)
          : path.join(UI_ROOT, path.dirname(m), spec);
        assert.ok(fs.existsSync(target), `${m} imports ${spec}`);
      }
    }
  });
});

describe('console format helpers', () => {
  it('modeString is the CLI one', async () => {
    const code = fs.readFileSync(path.join(UI_ROOT, 'format.js'), 'utf8');
    // A real dynamic import (tsc would turn import() into require): format.js is an ES module.
    const importEsm = new Function('u', 'return import(u)') as (u: string) => Promise<unknown>;
    const ui = (await importEsm(`data:text/javascript,${encodeURIComponent(code)}`)) as {
      modeString: (k: string, m: number) => string;
      bytes: (n: number) => string;
    };
    const kinds: EntryKind[] = ['file', 'dir', 'symlink'];
    for (const k of kinds) {
      for (const m of [0o644, 0o755, 0o4755, 0o2750, 0o1777, 0o4644, 0o000, 0o7777]) {
        assert.equal(ui.modeString(k, m), modeString(k, m), `${k} ${m.toString(8)}`);
      }
    }
    assert.equal(ui.bytes(512), '512 B');
    assert.equal(ui.bytes(10 * 1024 * 1024), '10.0 MiB');
  });
});
