import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { EXIT_CODES, HTTP_STATUS } from '../../src/cli/exit-codes';
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
    const status = HTTP_STATUS[name as keyof typeof HTTP_STATUS];
    assert.match(
      readme,
      new RegExp(`\\| ${code} \\| .*\\(\`${name}\`\\) \\| ${status} \\|`),
      `README row for ${name} (exit code ${code}, HTTP ${status})`,
    );
  }
});

test('errors map to their exit codes; anything else is an internal error', () => {
  assert.equal(exitCodeFor(new BkfsError('CHAIN_BROKEN', 'x')), 12);
  assert.equal(exitCodeFor(new Error('bug')), 1);
});

test('every error code has an HTTP status for the web API (4xx or 5xx)', () => {
  for (const name of Object.keys(EXIT_CODES)) {
    const s = HTTP_STATUS[name as keyof typeof HTTP_STATUS];
    assert.ok(s >= 400 && s < 600, `${name}: ${s}`);
  }
  assert.equal(HTTP_STATUS.UNAUTHORIZED, 401);
  assert.equal(HTTP_STATUS.PERMISSION_DENIED, 403);
  assert.equal(HTTP_STATUS.NOT_FOUND, 404);
});
