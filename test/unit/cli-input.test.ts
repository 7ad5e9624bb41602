/**
 * Pure parts of the CLI's input handling (issue 17): checkpoint references, the two forms of
 * `mount`, "did you mean", and the mapping of filesystem errors on user paths to coded errors
 * (with real failing syscalls where the machine can produce them).
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isBkfsError, type ErrorCode } from '../../src/errors';
import { parseCheckpointRef } from '../../src/index/catalog';
import { mountForm } from '../../src/cli/commands/mount';
import { didYouMean, suggestSimilar } from '../../src/util/suggest';
import { codedFsError, makeDirs, userPathError } from '../../src/util/userpath';

function codeOf(fn: () => unknown): ErrorCode | 'OTHER' | undefined {
  try {
    fn();
  } catch (e) {
    return isBkfsError(e) ? e.code : 'OTHER';
  }
  return undefined;
}

describe('checkpoint references', () => {
  it('VM, VM@CP and VM@latest parse; an empty side is a usage error (issue 17.3)', () => {
    assert.deepEqual(parseCheckpointRef('web'), { vm: 'web' });
    assert.deepEqual(parseCheckpointRef('web@check2'), { vm: 'web', checkpoint: 'check2' });
    assert.deepEqual(parseCheckpointRef('web@latest'), { vm: 'web' });
    for (const bad of ['web@', '@check1', '@', ''])
      assert.equal(
        codeOf(() => parseCheckpointRef(bad)),
        'USAGE',
        bad,
      );
    assert.equal(
      codeOf(() => parseCheckpointRef('bad name@x')),
      'BAD_NAME',
    );
    assert.equal(
      codeOf(() => parseCheckpointRef('web@bad name')),
      'BAD_NAME',
    );
  });
});

describe('mount forms (issue 17.7)', () => {
  it('a ref always needs a mount point; the whole repository is --all DIR', () => {
    assert.deepEqual(mountForm('web@check2', '/mnt/web', false), { ref: 'web@check2', dir: '/mnt/web' });
    assert.deepEqual(mountForm('/mnt/all', undefined, true), { dir: '/mnt/all' });
    const msg = (fn: () => unknown): string => {
      try {
        fn();
      } catch (e) {
        assert.ok(isBkfsError(e, 'USAGE'), String(e));
        return e.message;
      }
      throw new Error('no error');
    };
    assert.match(
      msg(() => mountForm('web@check2', undefined, false)),
      /understood 'web@check2' as the checkpoint to mount, but no mount point.*bkfs mount --all web@check2/,
    );
    assert.match(
      msg(() => mountForm('web', '/mnt', true)),
      /takes only the mount point/,
    );
    assert.match(
      msg(() => mountForm(undefined, undefined, true)),
      /--all needs a mount point/,
    );
    assert.match(
      msg(() => mountForm(undefined, undefined, false)),
      /needs VM\[@CP\] and a mount point/,
    );
  });
});

describe('did you mean', () => {
  it('suggests close names only', () => {
    assert.deepEqual(suggestSimilar('wbe', ['web', 'db', 'mail']), ['web']);
    assert.deepEqual(suggestSimilar('Web', ['web', 'db']), ['web']);
    assert.deepEqual(suggestSimilar('chek2', ['check1', 'check2', 'check3']), ['check2']);
    assert.deepEqual(suggestSimilar('zzz', ['web', 'db']), []);
    assert.equal(didYouMean('dbb', ['db', 'web']), " (did you mean 'db'?)");
    assert.equal(didYouMean('x', []), '');
  });
});

describe('filesystem errors on user paths (issue 17.6)', () => {
  it('maps errno codes to PERMISSION_DENIED, TARGET_INVALID, NOT_FOUND, naming the path', () => {
    const err = (code: string): NodeJS.ErrnoException =>
      Object.assign(new Error(`${code}: raw text, mkdir '/x/.y.bkfs-1'`), {
        code,
        syscall: 'mkdir',
        path: '/x',
      });
    const cases: [string, ErrorCode][] = [
      ['EACCES', 'PERMISSION_DENIED'],
      ['EPERM', 'PERMISSION_DENIED'],
      ['EROFS', 'PERMISSION_DENIED'],
      ['ENOTDIR', 'TARGET_INVALID'],
      ['EISDIR', 'TARGET_INVALID'],
      ['ENOSPC', 'TARGET_INVALID'],
      ['ENOENT', 'NOT_FOUND'],
      ['EEXIST', 'TARGET_EXISTS'],
    ];
    for (const [c, want] of cases) {
      const e = userPathError(err(c), 'restore target', '/srv/out');
      assert.ok(isBkfsError(e, want), `${c}: ${String(e)}`);
      assert.match(e.message, /^restore target \/srv\/out: /);
      assert.doesNotMatch(e.message, /\bE[A-Z]+:/);
      const central = codedFsError(err(c));
      assert.ok(isBkfsError(central, want), c);
      assert.match(central.message, /^cannot mkdir \/x: /);
    }
    // Not a filesystem error: left alone (a bug, exit 1).
    const bug = new TypeError('x is undefined');
    assert.equal(userPathError(bug, 'target', '/x'), bug);
    assert.equal(codedFsError(bug), bug);
    const eio = Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
    assert.equal(userPathError(eio, 't', '/x'), eio, 'an I/O error is not a user mistake');
  });

  it('makeDirs creates missing levels 0700 and fails at once where it cannot (issue 17.2)', () => {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-clierr-unit-'));
    try {
      const deep = path.join(work, 'a', 'b', 'c');
      assert.deepEqual(makeDirs(deep, 'repository'), [path.join(work, 'a'), path.join(work, 'a', 'b'), deep]);
      assert.equal(fs.statSync(path.join(work, 'a')).mode & 0o777, 0o700);
      assert.deepEqual(makeDirs(deep, 'repository'), [], 'an existing directory is fine');
      const file = path.join(work, 'file');
      fs.writeFileSync(file, '');
      assert.equal(
        codeOf(() => makeDirs(file, 'repository')),
        'TARGET_INVALID',
      );
      assert.equal(
        codeOf(() => makeDirs(path.join(file, 'x', 'y'), 'repository')),
        'TARGET_INVALID',
      );
      // /proc answers ENOENT to mkdir, which made Node's recursive mkdir spin forever.
      assert.equal(
        codeOf(() => makeDirs('/proc/bkfs-clierr-nope/a', 'repository')),
        'TARGET_INVALID',
      );
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  });
});
