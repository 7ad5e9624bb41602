/**
 * The engine's timing/stats callback object (BackupOptions.stats, read by bench/profile): a real
 * full backup through qemu-nbd fills it consistently with what was backed up.
 */
import { describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBuffer, textFile } from '../helpers/images';
import { Repository } from '../../src/repo/repository';
import { emptyBackupStats, runBackup } from '../../src/backup/engine';
import { ImageSource } from '../../src/backup/sources';
import { run } from '../../src/util/proc';

const MiB = 1 << 20;

describe('backup stats', () => {
  it('a full backup reports its reads, chunks, raw chunks and stage times', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-speed-stats-'));
    try {
      const raw = path.join(dir, 'd.raw');
      const img = path.join(dir, 'd.qcow2');
      const fd = fs.openSync(raw, 'w', 0o600);
      fs.ftruncateSync(fd, 32 * MiB);
      fs.writeSync(fd, randomBuffer(1, 4 * MiB), 0, 4 * MiB, 0); // 16 incompressible chunks
      fs.writeSync(fd, textFile(2, 4 * MiB).subarray(0, 4 * MiB), 0, 4 * MiB, 8 * MiB); // compressible
      fs.closeSync(fd);
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
      const repo = Repository.init(path.join(dir, 'repo'));
      try {
        const stats = emptyBackupStats();
        const r = await runBackup(repo, {
          vm: 'stats',
          disks: [{ name: 'vda', source: new ImageSource(img) }],
          level: 'full',
          stats,
        });
        assert.equal(r.bytesRead, 8 * MiB);
        assert.ok(stats.reads >= 2, `reads ${stats.reads}`);
        assert.equal(stats.chunks, 32, 'every read chunk went through the worker pool');
        assert.equal(stats.rawChunks, 16, 'the random chunks, and only them, are stored raw');
        assert.equal(r.chunks.newChunks + r.chunks.dedupChunks, 32);
        for (const k of [
          'wallMs',
          'setupMs',
          'ingestMs',
          'readMs',
          'poolMs',
          'hashMs',
          'compressMs',
          'putMs',
        ] as const) {
          assert.ok(stats[k] > 0, `${k} = ${stats[k]}`);
        }
        assert.ok(stats.setupMs + stats.ingestMs + stats.commitMs <= stats.wallMs + 1);
        assert.ok(stats.mainBusyMs + stats.mainIdleMs > 0);
      } finally {
        repo.close();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
