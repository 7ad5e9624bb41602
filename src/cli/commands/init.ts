import * as fs from 'node:fs';
import type { Command } from 'commander';
import * as path from 'node:path';
import { othersCanRead } from '../../util/private-fs';
import { note, out, parseIntOption, repoPath } from '../context';
import { printJson } from '../json';

export function registerInit(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository')
    .option('--chunk-size <bytes>', 'chunk grid in bytes (power of two, 4 KiB to 16 MiB)', '262144')
    .option('--compression-level <n>', 'zstd level for new chunks', '1')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Examples:
  bkfs -r /srv/bkfs init
  BKFS_REPO=/srv/bkfs bkfs init --chunk-size 1048576
  bkfs -r /srv/bkfs init --json`,
    )
    .action(async (opts: { chunkSize: string; compressionLevel: string; json?: boolean }, cmd: Command) => {
      const loc = repoPath(cmd);
      const { Repository } = await import('../../repo/repository');
      const initOpts = {
        chunkSize: parseIntOption('--chunk-size', opts.chunkSize),
        compressionLevel: Number(opts.compressionLevel),
      };
      if (loc.startsWith('s3://')) {
        const { initRemote, loadRemoteConfig } = await import('../../store/location');
        const cacheDir = await initRemote(loc, (d) => {
          const r = Repository.init(d, initOpts);
          const id = r.config.id;
          r.close();
          return { id };
        });
        const c = loadRemoteConfig(cacheDir);
        if (opts.json) {
          printJson({
            id: c.id,
            path: loc,
            cacheDir,
            format: c.format,
            chunkSize: c.chunkSize,
            pageSpan: c.pageSpan,
            hash: c.hash,
            compression: c.compression,
            created: c.created,
          });
          return;
        }
        out(`created bkfs repository ${c.id} at ${loc} (local cache ${cacheDir})`);
        return;
      }
      const dir = loc;
      if (othersCanRead(dir)) {
        note(
          `warning: ${dir} can be read by other local users (mode ${modeOf(dir)}); bkfs creates its files 0600, but others can list them: run 'chmod 700 ${dir}' so that only you can reach the repository`,
        );
      }
      const repo = Repository.init(dir, initOpts);
      const c = repo.config;
      repo.close();
      if (opts.json) {
        printJson({
          id: c.id,
          path: path.resolve(dir),
          format: c.format,
          chunkSize: c.chunkSize,
          pageSpan: c.pageSpan,
          hash: c.hash,
          compression: c.compression,
          created: c.created,
        });
        return;
      }
      out(`created bkfs repository ${c.id} at ${dir}`);
    });
}

function modeOf(dir: string): string {
  return (fs.statSync(dir).mode & 0o7777).toString(8).padStart(4, '0');
}
