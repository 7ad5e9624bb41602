/**
 * Mount bookkeeping without mounting: mountinfo parsing, state files, mount point inspection,
 * and the CLI's size parsing.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  canonicalMountpoint,
  daemonAlive,
  inspectMountpoint,
  mountKey,
  parseMountinfo,
  processStartTime,
  readState,
  removeState,
  statePath,
  writeState,
  type MountState,
} from '../../src/fuse/state';
import { parseSize } from '../../src/cli/commands/mount';
import { isBkfsError } from '../../src/errors';

let work: string;
let savedRunDir: string | undefined;

before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-fuse-state-'));
  savedRunDir = process.env.BKFS_RUN_DIR;
  process.env.BKFS_RUN_DIR = path.join(work, 'run');
});

after(() => {
  if (savedRunDir === undefined) delete process.env.BKFS_RUN_DIR;
  else process.env.BKFS_RUN_DIR = savedRunDir;
  fs.rmSync(work, { recursive: true, force: true });
});

describe('mount bookkeeping', () => {
  it('parses /proc/self/mountinfo lines, optional fields and escaped paths included', () => {
    const text = [
      '22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw',
      '58 27 0:40 / /tmp/my\\040dir/m ro,nosuid,nodev,relatime - fuse.bkfs bkfs ro,user_id=0,group_id=0',
      '60 27 0:41 / /mnt/x rw master:3 shared:9 - tmpfs none rw',
      '',
    ].join('\n');
    const m = parseMountinfo(text);
    assert.equal(m.length, 3);
    assert.deepEqual(m[1], {
      mountId: 58,
      mountpoint: '/tmp/my dir/m',
      options: 'ro,nosuid,nodev,relatime',
      fstype: 'fuse.bkfs',
      source: 'bkfs',
    });
    assert.equal(m[2]!.fstype, 'tmpfs');
    assert.equal(m[0]!.mountpoint, '/');
  });

  it('keeps one state file per mount point and recognises its daemon by PID and start time', () => {
    const mp = path.join(work, 'mnt');
    assert.equal(mountKey(mp), mountKey(mp));
    assert.notEqual(mountKey(mp), mountKey(`${mp}2`));
    assert.equal(path.dirname(statePath(mp)), path.join(work, 'run'));
    const s: MountState = {
      pid: process.pid,
      startTime: processStartTime(process.pid),
      mountpoint: mp,
      repo: '/r',
      ref: 'web@check1',
      log: null,
      started: new Date().toISOString(),
    };
    assert.ok(s.startTime !== null);
    writeState(s);
    assert.deepEqual(readState(mp), s);
    assert.ok(daemonAlive(s));
    assert.ok(!daemonAlive({ ...s, startTime: s.startTime! + 1 }), 'a recycled PID is not our daemon');
    removeState(mp, process.pid + 1);
    assert.ok(readState(mp), 'only the owner removes a state file');
    removeState(mp, process.pid);
    assert.equal(readState(mp), undefined);
  });

  it('inspects mount points: missing, not a directory, not empty, free', async () => {
    const file = path.join(work, 'file');
    fs.writeFileSync(file, 'x');
    const full = path.join(work, 'full');
    fs.mkdirSync(full);
    fs.writeFileSync(path.join(full, 'a'), 'a');
    const free = path.join(work, 'free');
    fs.mkdirSync(free);
    assert.deepEqual(await inspectMountpoint(path.join(work, 'nope')), { status: 'missing' });
    assert.deepEqual(await inspectMountpoint(file), { status: 'not-dir' });
    assert.deepEqual(await inspectMountpoint(full), { status: 'not-empty' });
    assert.deepEqual(await inspectMountpoint(free), { status: 'free' });
    // Resolves symlinks in the parent without touching the mount point itself.
    const link = path.join(work, 'link');
    fs.symlinkSync(work, link);
    assert.equal(canonicalMountpoint(path.join(link, 'free')), path.join(fs.realpathSync(work), 'free'));
  });

  it('parses --cache-size values', () => {
    assert.equal(parseSize('x', '268435456'), 256 << 20);
    assert.equal(parseSize('x', '256M'), 256 << 20);
    assert.equal(parseSize('x', '256MiB'), 256 << 20);
    assert.equal(parseSize('x', '1g'), 1 << 30);
    assert.equal(parseSize('x', '1.5G'), 1.5 * (1 << 30));
    for (const bad of ['', '0', '-1M', '12x', 'M']) {
      assert.throws(
        () => parseSize('--cache-size', bad),
        (e: unknown) => isBkfsError(e, 'USAGE'),
        bad,
      );
    }
  });
});
