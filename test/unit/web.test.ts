/**
 * Pure parts of `bkfs web`: token generation, hashing and lookup; roles; guest and host path
 * checks; HTTP Range parsing; data/zero runs from block-map extents; archive member names; the
 * file-session pool's policy (idle timeout, bound, one user at a time); error bodies.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  addToken,
  allowed,
  bearerToken,
  findToken,
  generateToken,
  hashToken,
  readTokens,
  removeToken,
  type TokenRecord,
} from '../../src/web/auth';
import { checkGuestPath, checkVolume, insideRoot, targetInRoot } from '../../src/web/paths';
import { mergeRuns, parseRange } from '../../src/web/disk';
import { archiveTop, memberName } from '../../src/web/archive';
import { SessionPool } from '../../src/web/pool';
import { isLoopback, parseListen } from '../../src/web/state';
import { errorBody } from '../../src/web/server';
import { BkfsError } from '../../src/errors';

test('tokens: 256 random bits, stored as sha256, found in constant time; wrong ones are not', () => {
  const t = generateToken();
  assert.match(t, /^bkfs_[A-Za-z0-9_-]{43}$/);
  assert.notEqual(generateToken(), t);
  const rec: TokenRecord = { name: 'a', role: 'operator', sha256: hashToken(t), created: '' };
  assert.equal(hashToken(t).length, 64);
  assert.equal(findToken([rec], t), rec);
  assert.equal(findToken([rec], `${t}x`), undefined);
  assert.equal(findToken([rec], t.slice(0, -1)), undefined);
  assert.equal(findToken([rec], 'nope'), undefined);
  assert.equal(findToken([], t), undefined);
});

test('token file: add prints once, keeps only the hash (0600), remove, duplicate names refused', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-webunit-'));
  try {
    const file = path.join(dir, 'tokens.json');
    const { token, record } = addToken(file, 'alice', 'read-only');
    assert.equal(fs.statSync(file).mode & 0o777, 0o600);
    const text = fs.readFileSync(file, 'utf8');
    assert.ok(!text.includes(token), 'the token itself is not stored');
    assert.ok(text.includes(hashToken(token)));
    assert.equal(findToken(readTokens(file), token)?.role, 'read-only');
    assert.equal(record.name, 'alice');
    assert.throws(
      () => addToken(file, 'alice', 'operator'),
      (e) => e instanceof BkfsError && e.code === 'TARGET_EXISTS',
    );
    assert.throws(
      () => addToken(file, '../x', 'operator'),
      (e) => e instanceof BkfsError && e.code === 'BAD_NAME',
    );
    removeToken(file, 'alice');
    assert.equal(findToken(readTokens(file), token), undefined);
    assert.throws(
      () => removeToken(file, 'alice'),
      (e) => e instanceof BkfsError && e.code === 'NOT_FOUND',
    );
    fs.writeFileSync(file, '{"tokens":[{"name":"x"}]}');
    assert.throws(
      () => readTokens(file),
      (e) => e instanceof BkfsError && e.code === 'REPO_CORRUPT',
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('roles: read-only reads, only operators operate; bearer header parsing', () => {
  assert.equal(allowed('read-only', 'read'), true);
  assert.equal(allowed('read-only', 'operate'), false);
  assert.equal(allowed('operator', 'read'), true);
  assert.equal(allowed('operator', 'operate'), true);
  assert.equal(bearerToken('Bearer abc'), 'abc');
  assert.equal(bearerToken('bearer  abc '), 'abc');
  assert.equal(bearerToken('Basic abc'), undefined);
  assert.equal(bearerToken(undefined), undefined);
});

test('guest paths: absolute, no .., no NUL', () => {
  assert.equal(checkGuestPath(undefined), '/');
  assert.equal(checkGuestPath('/etc/hosts'), '/etc/hosts');
  assert.equal(checkGuestPath('/a/./b'), '/a/./b'); // '.' is harmless; normalised later
  for (const bad of ['etc', '/..', '/a/../b', '/a/..', '/a\0b', `/${'x'.repeat(5000)}`]) {
    assert.throws(
      () => checkGuestPath(bad),
      (e) => e instanceof BkfsError && e.code === 'USAGE',
      bad,
    );
  }
  assert.equal(checkVolume('vda:2'), 'vda:2');
  assert.equal(checkVolume('vg0/root'), 'vg0/root');
  assert.equal(checkVolume('LABEL=root'), 'LABEL=root');
  for (const bad of ['/dev/sda', 'vda:../x', 'a b']) assert.throws(() => checkVolume(bad), bad);
});

test('host targets stay inside the restore root (lexically and through symlinks)', () => {
  assert.equal(insideRoot('/srv/r', 'a.raw'), '/srv/r/a.raw');
  assert.equal(insideRoot('/srv/r', 'd/a.raw'), '/srv/r/d/a.raw');
  for (const bad of ['/etc/passwd', '../x', 'd/../../x', '.', '']) {
    assert.throws(
      () => insideRoot('/srv/r', bad),
      (e) => e instanceof BkfsError,
      bad,
    );
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-webunit-'));
  try {
    const root = path.join(dir, 'root');
    fs.mkdirSync(root);
    fs.symlinkSync('/etc', path.join(root, 'out'));
    fs.symlinkSync('/etc/passwd', path.join(root, 'pw'));
    fs.mkdirSync(path.join(root, 'in'));
    assert.equal(targetInRoot(root, 'in/x.raw'), path.join(fs.realpathSync(root), 'in/x.raw'));
    assert.equal(targetInRoot(root, 'new/x.raw'), path.join(fs.realpathSync(root), 'new/x.raw'));
    assert.throws(
      () => targetInRoot(root, 'out/x.raw'),
      (e) => e instanceof BkfsError && e.code === 'TARGET_INVALID',
    );
    assert.throws(
      () => targetInRoot(root, 'pw'),
      (e) => e instanceof BkfsError && e.code === 'TARGET_INVALID',
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('Range headers', () => {
  assert.equal(parseRange(undefined, 100), undefined);
  assert.deepEqual(parseRange('bytes=0-9', 100), { start: 0, end: 10 });
  assert.deepEqual(parseRange('bytes=90-', 100), { start: 90, end: 100 });
  assert.deepEqual(parseRange('bytes=90-1000', 100), { start: 90, end: 100 });
  assert.deepEqual(parseRange('bytes=-10', 100), { start: 90, end: 100 });
  assert.deepEqual(parseRange('bytes=-1000', 100), { start: 0, end: 100 });
  assert.equal(parseRange('bytes=100-', 100), 'unsatisfiable');
  assert.equal(parseRange('bytes=-0', 100), 'unsatisfiable');
  assert.equal(parseRange('bytes=5-2', 100), undefined);
  assert.equal(parseRange('bytes=0-1,5-6', 100), undefined); // several ranges: the whole disk
  assert.equal(parseRange('items=0-1', 100), undefined);
});

test('extents become contiguous data/zero runs covering the disk', () => {
  const loc = { pack: 1 } as never;
  assert.deepEqual(mergeRuns([], 100), [{ start: 0, length: 100, zero: true }]);
  assert.deepEqual(
    mergeRuns(
      [
        { offset: 10, length: 10, loc },
        { offset: 20, length: 5, loc },
        { offset: 25, length: 5, loc: null },
        { offset: 40, length: 100, loc },
      ],
      100,
    ),
    [
      { start: 0, length: 10, zero: true },
      { start: 10, length: 15, zero: false },
      { start: 25, length: 15, zero: true },
      { start: 40, length: 60, zero: false },
    ],
  );
});

test('archive member names stay below the top folder', () => {
  assert.equal(memberName('/docs', '/docs/a.txt', 'docs'), 'docs/a.txt');
  assert.equal(memberName('/docs', '/docs//sub/b', 'docs'), 'docs/sub/b');
  assert.equal(memberName('/', '/etc/hosts', 'root'), 'root/etc/hosts');
  assert.throws(() => memberName('/docs', '/etc/passwd', 'docs'));
  assert.equal(archiveTop('/'), 'root');
  assert.equal(archiveTop('/var/log'), 'log');
  assert.equal(archiveTop('/x/..hidden'), '_hidden');
});

test('listen addresses; plain HTTP only on loopback', () => {
  assert.deepEqual(parseListen('127.0.0.1:8443'), { host: '127.0.0.1', port: 8443 });
  assert.deepEqual(parseListen('[::1]:80'), { host: '::1', port: 80 });
  assert.deepEqual(parseListen('8443'), { host: '127.0.0.1', port: 8443 });
  assert.throws(() => parseListen('host:99999'));
  assert.equal(isLoopback('127.0.0.1'), true);
  assert.equal(isLoopback('::1'), true);
  assert.equal(isLoopback('0.0.0.0'), false);
  assert.equal(isLoopback('192.168.1.1'), false);
});

test('error bodies carry the code, its exit code and HTTP status', () => {
  assert.deepEqual(errorBody(new BkfsError('NOT_FOUND', 'x')), {
    status: 404,
    body: { error: { code: 'NOT_FOUND', exitCode: 8, message: 'x' } },
  });
  assert.equal(errorBody(new BkfsError('UNAUTHORIZED', 'x')).status, 401);
  assert.equal(
    errorBody(Object.assign(new Error('csrf'), { code: 'FST_CSRF_INVALID_TOKEN', statusCode: 403 })).body
      .error.code,
    'PERMISSION_DENIED',
  );
  assert.equal(errorBody(new Error('bug')).status, 500);
  assert.equal(errorBody(new Error('bug')).body.error.code, 'INTERNAL');
});

test('session pool: one user at a time, idle close, bounded, reopened after a failed open', async () => {
  const log: string[] = [];
  let opened = 0;
  const pool = new SessionPool<string>({
    max: 2,
    idleMs: 50,
    close: async (s) => void log.push(`close ${s}`),
  });
  const open = (k: string) => async () => {
    opened++;
    log.push(`open ${k}`);
    return k;
  };
  // Serialised on one key.
  let inside = 0;
  let most = 0;
  await Promise.all(
    [1, 2, 3].map(() =>
      pool.use('a', open('a'), async () => {
        inside++;
        most = Math.max(most, inside);
        await new Promise((r) => setTimeout(r, 10));
        inside--;
      }),
    ),
  );
  assert.equal(most, 1);
  assert.equal(opened, 1);
  // Bound: a third key closes the least recently used idle one.
  await pool.use('b', open('b'), async () => undefined);
  await pool.use('c', open('c'), async () => undefined);
  assert.ok(log.includes('close a'), log.join(','));
  assert.equal(pool.size, 2);
  // Idle timeout.
  await new Promise((r) => setTimeout(r, 120));
  assert.equal(pool.size, 0);
  assert.ok(log.includes('close b') && log.includes('close c'));
  // A failed open is not kept.
  await assert.rejects(
    pool.use(
      'd',
      async () => Promise.reject(new Error('boom')),
      async () => undefined,
    ),
    /boom/,
  );
  assert.equal(pool.size, 0);
  await pool.use('d', open('d'), async () => undefined);
  await pool.closeAll();
  assert.ok(log.includes('close d'));
});
