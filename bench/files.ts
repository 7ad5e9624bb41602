/**
 * Benchmark of file-level restore (not part of the tests; needs root, libguestfs-tools, nbdfuse).
 *
 *   node dist/bench/files.js [--disk-mib 2048] [--data-mib 512] [--checkpoints 10] [--work DIR]
 *                            [--keep] [--json]
 *
 * Builds with the real CLI a qcow2 disk (GPT: ext4 root with `data-mib` of incompressible data in
 * 64 MiB files plus 2000 small config files, an xfs /srv) and `checkpoints` backups (a full, then
 * incrementals each changing a few small files and adding a 1 MiB one). Then, with each engine
 * (kernel; libguestfs with LIBGUESTFS_BACKEND_SETTINGS=force_tcg unless set):
 *   - `bkfs cp VM@CP:/etc/conf.d/file-1234.conf DEST`: wall time, and the bytes the command read
 *     from the repository (`--stats`: compressed bytes from pack files, chunks decoded) against the
 *     disk's stored size;
 *   - `bkfs find VM '*.conf'` over every checkpoint: wall time and matches;
 *   - `bkfs diff` of the first and last checkpoint: wall time.
 * libguestfs figures include its appliance launch (one per command), reported separately from a
 * `guestfish` launch of an empty appliance.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfsOk } from '../test/helpers/cli';
import { makeDisk, modifyDisk, randomBuffer, textFile } from '../test/helpers/images';
import { run } from '../src/util/proc';

const MiB = 1 << 20;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

interface Stats {
  fromStore: string;
  chunks: number;
}

function parseStats(stderr: string): Stats | undefined {
  const m = /read with|engine \S+: ([\d.]+ \S+) read from the repository \((\d+) chunks decoded\)/.exec(
    stderr,
  );
  return m ? { fromStore: m[1] ?? '', chunks: Number(m[2]) } : undefined;
}

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = process.hrtime.bigint();
  const value = await fn();
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6, value };
}

export async function main(): Promise<void> {
  process.env.LIBGUESTFS_BACKEND = process.env.LIBGUESTFS_BACKEND ?? 'direct';
  process.env.LIBGUESTFS_BACKEND_SETTINGS = process.env.LIBGUESTFS_BACKEND_SETTINGS ?? 'force_tcg';
  const diskMiB = Number(arg('disk-mib', '2048'));
  const dataMiB = Number(arg('data-mib', '512'));
  const nCp = Number(arg('checkpoints', '10'));
  const keep = process.argv.includes('--keep');
  const json = process.argv.includes('--json');
  const work = arg('work', '') || fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-bench-files-'));
  const log = (s: string): void => {
    if (!json) process.stdout.write(`${s}\n`);
  };
  const img = path.join(work, 'disk.qcow2');
  const repo = path.join(work, 'repo');
  const figures: Record<string, unknown> = { diskMiB, dataMiB, checkpoints: nCp };
  try {
    const files: { path: string; content: Buffer }[] = [];
    for (let i = 0; i < dataMiB / 64; i++)
      files.push({ path: `var/lib/blobs/blob${i}`, content: randomBuffer(100 + i, 64 * MiB) });
    for (let i = 0; i < 2000; i++)
      files.push({ path: `etc/conf.d/file-${i}.conf`, content: textFile(i, 600) });
    const rootMiB = diskMiB - 256 - 2;
    log(`building a ${diskMiB} MiB disk (${dataMiB} MiB of data, 2000 small files)...`);
    await makeDisk(img, {
      format: 'qcow2',
      sizeMiB: diskMiB,
      table: 'gpt',
      seed: 1,
      partitions: [
        { fs: 'ext4', sizeMiB: rootMiB, label: 'root', files },
        {
          fs: 'xfs',
          sizeMiB: 256,
          label: 'srv',
          files: [{ path: 'www/index.html', content: textFile(5, 5000) }],
        },
      ],
    });
    files.length = 0;
    await modifyDisk(img, 'qcow2', 1, async (m) => {
      fs.writeFileSync(
        path.join(m, 'etc/fstab'),
        'LABEL=root / ext4 defaults 0 1\nLABEL=srv /srv xfs defaults 0 2\n',
      );
      fs.mkdirSync(path.join(m, 'srv'));
    });
    await bkfsOk(['-r', repo, 'init']);
    const full = await timed(() =>
      bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']),
    );
    log(`full backup: ${(full.ms / 1000).toFixed(1)} s`);
    for (let c = 2; c <= nCp; c++) {
      await modifyDisk(img, 'qcow2', 1, async (m) => {
        for (let k = 0; k < 5; k++)
          fs.writeFileSync(
            path.join(m, `etc/conf.d/file-${(c * 37 + k) % 2000}.conf`),
            textFile(c * 100 + k, 700),
          );
        fs.writeFileSync(path.join(m, `var/lib/blobs/new-${c}.bin`), randomBuffer(1000 + c, MiB));
      });
      await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'inc']);
    }
    const list = JSON.parse((await bkfsOk(['-r', repo, 'list', 'vm', '--json'])).stdout) as {
      bytesNewStored: number;
    }[];
    const stored = list.reduce((n, c) => n + c.bytesNewStored, 0);
    figures.repositoryStoredBytes = stored;
    log(`${nCp} checkpoints, ${(stored / MiB).toFixed(1)} MiB stored`);

    const launch = await timed(() => run('guestfish', ['-a', '/dev/null', 'run']));
    figures.guestfsEmptyLaunchMs = Math.round(launch.ms);
    log(
      `libguestfs appliance launch (empty, TCG=${process.env.LIBGUESTFS_BACKEND_SETTINGS}): ${(launch.ms / 1000).toFixed(1)} s`,
    );

    const target = `vm@check${Math.max(1, nCp - 1)}:/etc/conf.d/file-1234.conf`;
    for (const engine of ['kernel', 'guestfs']) {
      const dest = path.join(work, `out-${engine}.conf`);
      const cp = await timed(() => bkfsOk(['-r', repo, 'cp', target, dest, '--engine', engine, '--stats']));
      const st = parseStats(cp.value.stderr);
      const find = await timed(() =>
        bkfsOk(['-r', repo, 'find', 'vm', '*.conf', '--engine', engine, '--json']),
      );
      const matches = (JSON.parse(find.value.stdout) as { matches: unknown[] }).matches.length;
      const diff = await timed(() =>
        bkfsOk(['-r', repo, 'diff', 'vm@check1', `vm@check${nCp}`, '--engine', engine, '--json']),
      );
      const changes = (JSON.parse(diff.value.stdout) as { items: unknown[] }).items.length;
      figures[engine] = {
        cpMs: Math.round(cp.ms),
        cpReadFromRepository: st?.fromStore,
        cpChunksDecoded: st?.chunks,
        findMs: Math.round(find.ms),
        findMatches: matches,
        diffMs: Math.round(diff.ms),
        diffChanges: changes,
      };
      log(
        `${engine.padEnd(7)} cp one small file: ${(cp.ms / 1000).toFixed(2)} s, ${st?.fromStore ?? '?'} read from the repository (${st?.chunks ?? '?'} chunks); ` +
          `find over ${nCp} checkpoints: ${(find.ms / 1000).toFixed(1)} s (${matches} paths); diff first/last: ${(diff.ms / 1000).toFixed(1)} s (${changes} changes)`,
      );
    }
    if (json) process.stdout.write(JSON.stringify(figures, null, 2) + '\n');
  } finally {
    if (!keep) fs.rmSync(work, { recursive: true, force: true });
  }
}

if (require.main === module) {
  main().catch((e: unknown) => {
    process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
