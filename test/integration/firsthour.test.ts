/**
 * The rough edges of a new administrator's first hour (issue 17): relative source paths and
 * `verify --source` after the source is gone (17.4), files that are no disk taken as raw disks
 * (17.13), a reader without write permission on the repository (17.5), and gc's pack selection
 * (17.9). Real qemu-img/qemu-nbd, SQLite and the real `bkfs` executable.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BKFS, bkfs, bkfsOk, qemuIo, type CliResult } from '../helpers/cli';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

let work: string;
before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-firsthour-'));
  fs.chmodSync(work, 0o755);
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

/** bkfs in working directory `cwd` (the shared helper runs it in the test's own). */
function bkfsIn(cwd: string, args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BKFS, ...args], {
      cwd,
      env: { ...process.env, CI: 'true' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? 128, stdout, stderr }));
  });
}

describe('source paths (17.4)', () => {
  it('a relative --disk path is stored absolute; a source that is gone makes verify --source exit 24', async () => {
    const dir = path.join(work, 'rel');
    fs.mkdirSync(dir);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'web.qcow2'), '8M']);
    await qemuIo(path.join(dir, 'web.qcow2'), 'qcow2', 'write -P 0x5a 0 1M');
    const repo = path.join(work, 'rel-repo');
    await bkfsOk(['-r', repo, 'init']);
    const b = await bkfsIn(dir, ['-r', repo, 'backup', 'web', '-d', 'vda=web.qcow2']);
    assert.equal(b.code, 0, b.stderr);
    const info = JSON.parse((await bkfsOk(['-r', repo, 'info', 'web@check1', '--json'])).stdout) as {
      disks: { source: string }[];
    };
    assert.equal(info.disks[0]!.source, path.join(dir, 'web.qcow2'));
    // From another working directory.
    const ok = await bkfsIn(os.tmpdir(), ['-r', repo, 'verify', 'web', '--source']);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    assert.match(ok.stdout, /identical/);

    fs.rmSync(path.join(dir, 'web.qcow2'));
    const gone = await bkfs(['-r', repo, 'verify', 'web', '--source']);
    assert.equal(gone.code, EXIT_CODES.SOURCE_GONE, gone.stdout + gone.stderr);
    assert.match(gone.stderr, /the source of web@check1 vda \(.*web\.qcow2\) no longer exists/);
    assert.equal(gone.stderr.trim().split('\n').length, 1, gone.stderr);
    const js = await bkfs(['-r', repo, 'verify', 'web', '--source', '--json']);
    assert.equal(js.code, EXIT_CODES.SOURCE_GONE);
    assert.equal((JSON.parse(js.stdout) as { sources: { status: string }[] }).sources[0]!.status, 'gone');
    // Without --source, a gone source is none of verify's business.
    assert.equal((await bkfs(['-r', repo, 'verify', 'web'])).code, 0);
  });
});

describe('files that are no disk (17.13)', () => {
  it('a raw source of an odd size or under 1 MiB gets a note that it is taken as a raw disk', async () => {
    const repo = path.join(work, 'raw-repo');
    await bkfsOk(['-r', repo, 'init']);
    const conf = path.join(work, 'nginx.conf');
    fs.writeFileSync(conf, 'x'.repeat(4500));
    const r1 = await bkfsOk(['-r', repo, 'backup', 'cfg', '-d', `vda=${conf}`]);
    assert.match(r1.stderr, /nginx\.conf is 4500 bytes, not a multiple of 512: is it really a disk image\?/);
    assert.match(r1.stderr, /backed up as a raw disk/);
    assert.equal(r1.stderr.match(/really a disk image/g)?.length, 1, 'noted once');

    const small = path.join(work, 'small.img');
    fs.writeFileSync(small, Buffer.alloc(64 * 1024, 1));
    const r2 = await bkfsOk(['-r', repo, 'backup', 'small', '-d', `vda=${small}`]);
    assert.match(r2.stderr, /small\.img is only 65536 bytes: is it really a disk image\?/);

    const disk = path.join(work, 'disk.img');
    fs.writeFileSync(disk, Buffer.alloc(2 << 20, 2));
    const r3 = await bkfsOk(['-r', repo, 'backup', 'disk', '-d', `vda=${disk}`]);
    assert.doesNotMatch(r3.stderr, /disk image/);
  });
});
