/**
 * Reads spread over several NBD connections (multi-conn) and many small reads in flight: the
 * checkpoint is byte for byte what `qemu-img convert` makes of the image, whatever the number of
 * connections, read size and depth; a server that does not advertise multi-conn gets one.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBuffer, textFile, toRaw } from '../helpers/images';
import { assertCheckpointEquals } from '../helpers/compare';
import { Repository } from '../../src/repo/repository';
import { emptyBackupStats, runBackup } from '../../src/backup/engine';
import { ImageSource, NbdUriSource } from '../../src/backup/sources';
import { NbdClient } from '../../src/nbd/client';
import { run } from '../../src/util/proc';
import { startNbdkit } from '../helpers/nbd-server';

const MiB = 1 << 20;

describe('multi-conn backup reads', () => {
  it('2 and 4 connections, 1 read in flight or 64: every checkpoint equals qemu-img convert', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-writepath-multiconn-'));
    try {
      const raw = path.join(dir, 'd.raw');
      const img = path.join(dir, 'd.qcow2');
      const size = 40 * MiB + 12345 * 512; // not a multiple of the chunk size
      const fd = fs.openSync(raw, 'w', 0o600);
      fs.ftruncateSync(fd, size);
      // Random, text, a hole, data across the end: many chunks on many connections.
      fs.writeSync(fd, randomBuffer(11, 9 * MiB), 0, 9 * MiB, 1 * MiB + 4096);
      fs.writeSync(fd, textFile(12, 7 * MiB).subarray(0, 7 * MiB), 0, 7 * MiB, 13 * MiB);
      fs.writeSync(fd, randomBuffer(13, 3 * MiB), 0, 3 * MiB, size - 3 * MiB);
      fs.closeSync(fd);
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
      const expected = path.join(dir, 'expected.raw');
      await toRaw(img, expected);
      const repoDir = path.join(dir, 'repo');
      const repo = Repository.init(repoDir);
      const cases = [
        { connections: 1, readConcurrency: 1, readSize: 256 << 10 },
        { connections: 2, readConcurrency: 32, readSize: 256 << 10 },
        { connections: 4, readConcurrency: 64, readSize: 512 << 10 },
      ];
      const read: number[] = [];
      try {
        for (const c of cases) {
          const stats = emptyBackupStats();
          const r = await runBackup(repo, {
            vm: `mc${c.connections}`,
            disks: [{ name: 'vda', source: new ImageSource(img) }],
            level: 'full',
            stats,
            ...c,
          });
          read.push(r.bytesRead);
          assert.equal(stats.connections, c.connections, 'qemu-nbd -r advertises multi-conn');
        }
      } finally {
        repo.close();
      }
      // The allocated clusters (64 KiB-aligned) around the 19 MiB written, the same every time.
      assert.ok(read[0]! >= 19 * MiB && read[0]! <= 20 * MiB, `read ${read[0]}`);
      assert.deepEqual(read, [read[0], read[0], read[0]]);
      for (const c of cases)
        await assertCheckpointEquals(repoDir, `mc${c.connections}@check1`, 'vda', expected);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a server that does not advertise multi-conn is read through one connection', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-writepath-singleconn-'));
    // nbdkit's memory plugin behind the multi-conn filter told never to advertise multi-conn.
    const srv = await startNbdkit('memory', ['size=8M', 'multi-conn-mode=disable'], {
      filters: ['multi-conn'],
    });
    try {
      const probe = await NbdClient.connect(srv.uri);
      const multi = probe.canMultiConn;
      await probe.write(0, randomBuffer(21, 2 * MiB));
      await probe.close();
      assert.equal(
        multi,
        false,
        'nbdkit --filter=multi-conn multi-conn-mode=disable must not advertise multi-conn',
      );
      const repo = Repository.init(path.join(dir, 'repo'));
      try {
        const stats = emptyBackupStats();
        const r = await runBackup(repo, {
          vm: 'single',
          disks: [{ name: 'vda', source: new NbdUriSource(srv.uri, null) }],
          level: 'full',
          stats,
          connections: 4,
        });
        assert.equal(stats.connections, 1);
        assert.equal(r.bytesRead, 2 * MiB);
      } finally {
        repo.close();
      }
    } finally {
      await srv.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
