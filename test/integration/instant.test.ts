/**
 * `bkfs instant-restore` with a real libvirt, a real TCG guest and the real bkfs NBD export:
 * the marker guest (test/helpers/libvirt.ts: busybox initrd that reads a marker sector from
 * /dev/vda and then writes counter sectors) is backed up live, destroyed, and instant-restored
 * under a new name with a slow background copy (--bandwidth 1). The test proves that
 *   - the restored VM boots and prints the marker read through the export (its overlay is empty);
 *   - bkfs (instant-restore and its export daemon) killed with SIGKILL mid-copy: `--resume`
 *     restarts the export, resumes the VM if the outage paused it, and finishes the copy;
 *   - guest writes made during the copy are in the final image; the final image is standalone
 *     (no backing file) and equals the checkpoint (as `bkfs restore` writes it) + the guest writes,
 *     compared with qemu-img compare;
 *   - after independence the export is stopped and gone, the VM still runs and its uncached reads
 *     (page cache dropped) still return the marker and the written data;
 *   - the persistent definition names no NBD backing; new name => new UUID and MAC.
 * Bad input (existing domain name, missing --to) fails with its own exit code and creates nothing.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { bkfs, bkfsOk, BKFS } from '../helpers/cli';
import { randomBuffer } from '../helpers/images';
import {
  buildMarkerInitrd,
  consoleLines,
  DEFAULT_MARKER_GUEST,
  eventually,
  libvirtMissing,
  markerDomainXml,
  markerGuestMissing,
  markerGuestWrite,
  startDaemons,
  stopDaemons,
  virsh,
  virshTry,
  writeMarker,
  type Daemons,
  type MarkerGuestSpec,
} from '../helpers/libvirt';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;
const SPEC: MarkerGuestSpec = { ...DEFAULT_MARKER_GUEST, writes: 20, intervalSec: 0.5 };
const MARKER = `instant-marker-${process.pid}`;

interface ServeRow {
  pid: number;
  listen: string;
}

describe('instant-restore: a libvirt VM runs from a checkpoint and becomes independent', () => {
  let work: string;
  let repoDir: string;
  let daemons: Daemons = { started: [] };
  const origName = `bkfs-instant-orig-${process.pid}`;
  const newName = `bkfs-instant-new-${process.pid}`;
  const failName = `bkfs-instant-fail-${process.pid}`;
  let consoleLog: string;
  let outDir: string;
  const children: ChildProcess[] = [];
  const cli = (...a: string[]) => bkfs(['-r', repoDir, ...a]);
  const cliOk = (...a: string[]) => bkfsOk(['-r', repoDir, ...a]);
  /** Lines of the restored guest (the console log is removed before it starts). */
  const lines = (prefix: string) => consoleLines(consoleLog, prefix);

  before(async () => {
    const why = libvirtMissing() ?? markerGuestMissing();
    if (why) throw new Error(`cannot run the instant-restore test: ${why}`);
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-instant-test-'));
    fs.chmodSync(work, 0o755); // QEMU (libvirt-qemu) must reach the images, the initrd and DIR
    repoDir = path.join(work, 'repo');
    consoleLog = path.join(work, 'console.log');
    outDir = path.join(work, 'restored');
    daemons = await startDaemons();
    const initrd = path.join(work, 'initrd');
    buildMarkerInitrd(initrd, SPEC);
    // 64 MiB disk: 48 MiB of random data (the copy has real work: ~48 s at 1 MiB/s), a hole
    // after it, the marker at 4 MiB; the guest writes from 8 MiB on.
    const raw = path.join(work, 'orig.raw');
    fs.writeFileSync(raw, randomBuffer(14, 48 * MiB));
    fs.truncateSync(raw, 64 * MiB);
    writeMarker(raw, MARKER, SPEC);
    const img = path.join(work, 'orig.qcow2');
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, img]);
    fs.rmSync(raw);
    const xml = path.join(work, 'orig.xml');
    fs.writeFileSync(xml, markerDomainXml(origName, { initrd, disk: img, format: 'qcow2', consoleLog }));
    await virsh('create', xml);
    await cliOk('init');
    const scratch = path.join(work, 'scratch');
    fs.mkdirSync(scratch, { mode: 0o755 });
    await cliOk('backup', 'web', '--libvirt', origName, '--scratch-dir', scratch);
    await virsh('destroy', origName);
    fs.rmSync(consoleLog, { force: true });
  });

  after(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const n of [origName, newName, failName]) {
      await virshTry('destroy', n);
      await virshTry('undefine', n, '--checkpoints-metadata');
    }
    for (const d of [outDir, path.join(work ?? '/nonexistent', 'failed')]) {
      if (d) await bkfs(['serve', '--stop', '--listen', `unix:${path.join(d, 'bkfs-instant.sock')}`]);
    }
    await stopDaemons(daemons);
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  it('refuses an existing domain name and a missing --to, creating nothing', async () => {
    // The original domain is gone (transient, destroyed): define a placeholder under newName.
    const placeholder = path.join(work, 'placeholder.xml');
    fs.writeFileSync(
      placeholder,
      markerDomainXml(newName, {
        initrd: path.join(work, 'initrd'),
        disk: path.join(work, 'orig.qcow2'),
        format: 'qcow2',
        consoleLog: path.join(work, 'placeholder.log'),
      }),
    );
    await virsh('define', placeholder);
    try {
      const dir = path.join(work, 'refused');
      const r = await cli('instant-restore', 'web', '--to', dir, '--define', newName, '--start');
      assert.equal(r.code, EXIT_CODES.TARGET_EXISTS, r.stderr);
      assert.match(r.stderr, /already has a domain named/);
      assert.equal(fs.existsSync(dir), false, 'nothing created');
      const r2 = await cli('instant-restore', 'web', '--define', 'x');
      assert.equal(r2.code, EXIT_CODES.USAGE, r2.stderr);
    } finally {
      await virsh('undefine', newName);
    }
  });

  it('boots from the export, survives bkfs being killed, keeps guest writes, ends independent', async () => {
    const t0 = Date.now();
    const child = spawn(
      process.execPath,
      [BKFS, '-r', repoDir, 'instant-restore', 'web', '--to', outDir, '--define', newName, '--start'] //
        .concat(['--bandwidth', '1', '--json']),
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CI: 'true' } },
    );
    children.push(child);
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('close', (c) => r(c)));

    // Hold the copy back until the (slow, TCG) guest has written: 1 byte/s through libvirt's own
    // block job API, so "writes during the copy" does not depend on the machine's load.
    // `--resume --bandwidth 0` lifts it.
    await eventually(
      'the copy job',
      async () => (await virshTry('blockjob', newName, 'vda', '--info')).stderr.includes('Block Pull'),
      240_000,
    );
    await virsh('blockjob', newName, 'vda', '--bandwidth', '1', '--bytes');

    await eventually(`the marker on ${newName}'s console`, () => lines('BKFS-MARKER').length > 0, 600_000);
    const markerMs = Date.now() - t0;
    assert.deepEqual(lines('BKFS-MARKER'), [`BKFS-MARKER ${MARKER}`], 'the marker read through the export');

    // The copy is still running, the VM reads from the export.
    const st = JSON.parse((await cliOk('instant-restore', '--status', newName, '--json')).stdout) as {
      phase: string;
      exportRunning: boolean;
      progress: { independent: boolean }[];
      domain: { state: string };
    };
    assert.equal(st.phase, 'copying');
    assert.equal(st.exportRunning, true);
    assert.equal(st.domain.state, 'running');
    assert.equal(st.progress[0]!.independent, false, `copy still running: ${stderr}`);

    // A guest write during the copy, then bkfs killed: instant-restore and its export daemon.
    await eventually('a guest write', () => lines('BKFS-WROTE').length > 0, 300_000);
    const serves = JSON.parse((await bkfsOk(['serve', '--list', '--json'])).stdout) as ServeRow[];
    const socket = path.join(outDir, 'bkfs-instant.sock');
    const exp = serves.find((s) => s.listen === `unix:${socket}`);
    assert.ok(exp, `the export daemon runs: ${JSON.stringify(serves)}`);
    child.kill('SIGKILL');
    process.kill(exp.pid, 'SIGKILL');
    await exited;
    const writesBeforeKill = lines('BKFS-WROTE').length;
    await new Promise((r) => setTimeout(r, 3000)); // the export is down: the VM pauses or waits

    const resumed = await cliOk('instant-restore', '--resume', newName, '--bandwidth', '0', '--json');
    const res = JSON.parse(resumed.stdout) as {
      phase: string;
      disks: { overlay: string; independent: boolean }[];
    };
    const independentMs = Date.now() - t0;
    const writesAtIndependence = lines('BKFS-WROTE').length;
    assert.equal(res.phase, 'independent', resumed.stderr);
    assert.equal(res.disks[0]!.independent, true);
    assert.match(resumed.stderr, /restarting it/, 'resume restarted the export');
    assert.ok(writesBeforeKill >= 1, 'guest writes happened during the copy');
    process.stdout.write(
      `# time to marker ${markerMs} ms, to independence ${independentMs} ms; guest writes: ${writesBeforeKill} before the kill, ${writesAtIndependence} at independence\n`,
    );

    // Independent: the export is stopped and gone; the VM runs; the image has no backing file.
    const after = JSON.parse((await bkfsOk(['serve', '--list', '--json'])).stdout) as ServeRow[];
    assert.equal(
      after.find((s) => s.listen === `unix:${socket}`),
      undefined,
      'export stopped',
    );
    assert.equal(fs.existsSync(socket), false, 'socket removed');
    const overlay = res.disks[0]!.overlay;
    const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', overlay])).stdout) as {
      'backing-filename'?: string;
    };
    assert.equal(info['backing-filename'], undefined, 'standalone image');
    const persistent = await virsh('dumpxml', '--inactive', newName);
    assert.doesNotMatch(persistent, /protocol='nbd'|bkfs-instant\.sock/, 'definition names no export');
    assert.doesNotMatch(persistent, /52:54:00:4b:46:53/, 'new MAC');
    assert.match(await virsh('domstate', newName), /running/);

    // The guest finishes its writes without the export, then reads the disk uncached.
    await eventually('the guest writes done', () => lines('BKFS-WRITES-DONE').length > 0, 600_000);
    assert.deepEqual(lines('BKFS-WRITE-FAILED'), [], 'no guest write failed');
    const readsBefore = lines('BKFS-READ').length;
    await eventually(
      'an uncached read after independence',
      () => lines('BKFS-READ').length > readsBefore + 1,
    );
    assert.equal(lines('BKFS-READ').at(-1), `BKFS-READ ${MARKER} BKFS-WRITE00000000`);
    assert.match(await virsh('domstate', newName), /running/);

    // Final image = checkpoint + the guest's writes.
    await virsh('destroy', newName);
    const expected = path.join(work, 'expected.raw');
    await cliOk('restore', 'web', '--disk', 'vda', '--to', expected);
    const fd = fs.openSync(expected, 'r+');
    for (let i = 0; i < SPEC.writes; i++)
      fs.writeSync(fd, markerGuestWrite(i), 0, 512, (SPEC.writeSector + i) * 512);
    fs.closeSync(fd);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', expected, overlay], {
      allowFail: true,
    });
    assert.equal(cmp.code, 0, `final image = checkpoint + guest writes: ${cmp.stdout}${cmp.stderr}`);

    const done = JSON.parse((await cliOk('instant-restore', '--status', newName, '--json')).stdout) as {
      phase: string;
      exportRunning: boolean;
    };
    assert.equal(done.phase, 'independent');
    assert.equal(done.exportRunning, false);
    const mode = fs.statSync(path.join(outDir, 'bkfs-instant.json')).mode & 0o777;
    assert.equal(mode, 0o600, 'state file 0600');
  });

  it('a VM stopped mid-copy: exit 32 with a state that says so; --resume starts it and finishes', async () => {
    const dir = path.join(work, 'failed');
    const child = spawn(
      process.execPath,
      [BKFS, '-r', repoDir, 'instant-restore', 'web', '--to', dir, '--define', failName, '--start'] //
        .concat(['--bandwidth', '1']),
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CI: 'true' } },
    );
    children.push(child);
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('close', (c) => r(c)));
    await eventually(
      'the copy job',
      async () => (await virshTry('blockjob', failName, 'vda', '--info')).stderr.includes('Block Pull'),
      240_000,
    );
    await virsh('destroy', failName);
    assert.equal(await exited, EXIT_CODES.RECOVERY_FAILED, stderr);
    assert.match(stderr, /stopped .*--resume/);
    const st = JSON.parse((await cliOk('instant-restore', '--status', failName, '--json')).stdout) as {
      phase: string;
      lastError: string;
      exportRunning: boolean;
      domain: { state: string };
      progress: { independent: boolean }[];
    };
    assert.equal(st.phase, 'copying');
    assert.match(st.lastError, /stopped/);
    assert.equal(st.exportRunning, true, 'the export stays for --resume');
    assert.equal(st.domain.state, 'shut off');
    assert.equal(st.progress[0]!.independent, false);

    const r = await cliOk('instant-restore', '--resume', failName, '--bandwidth', '0', '--json');
    const res = JSON.parse(r.stdout) as { phase: string; disks: { overlay: string }[] };
    assert.equal(res.phase, 'independent', r.stderr);
    const info = JSON.parse(
      (await run('qemu-img', ['info', '-U', '--output=json', res.disks[0]!.overlay])).stdout,
    ) as { 'backing-filename'?: string };
    assert.equal(info['backing-filename'], undefined, 'standalone image');
    assert.match(await virsh('domstate', failName), /running/);
    await virsh('destroy', failName);
    await virsh('undefine', failName);
  });
});
