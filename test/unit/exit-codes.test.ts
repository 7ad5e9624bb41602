import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { exitCodeFor } from '../../src/cli/main';
import { BkfsError } from '../../src/errors';

test('every error code has a distinct exit code', () => {
  const codes = Object.values(EXIT_CODES);
  assert.equal(new Set(codes).size, codes.length);
  assert.ok(!codes.includes(0) && !codes.includes(1));
});

test('the README repeats the exit-code table', () => {
  const readme = fs.readFileSync(path.resolve(__dirname, '../../../README.md'), 'utf8');
  for (const [name, code] of Object.entries(EXIT_CODES)) {
    assert.match(readme, new RegExp(`\\| ${code} \\| .*\\(\`${name}\`\\) \\|`), `README row for ${name}`);
  }
});

test('errors map to their exit codes; anything else is an internal error', () => {
  assert.equal(exitCodeFor(new BkfsError('CHAIN_BROKEN', 'x')), 12);
  assert.equal(exitCodeFor(new Error('bug')), 1);
});
