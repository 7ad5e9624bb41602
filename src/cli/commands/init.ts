import * as fs from 'node:fs';
import type { Command } from 'commander';
import { Repository } from '../../repo/repository';
import { othersCanRead } from '../../util/private-fs';
import { note, out, parseIntOption, repoPath } from '../context';

export function registerInit(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository')
    .option('--chunk-size <bytes>', 'chunk grid in bytes (power of two, 4 KiB to 16 MiB)', '262144')
    .option('--compression-level <n>', 'zstd level for new chunks', '1')
    .action((opts: { chunkSize: string; compressionLevel: string }, cmd: Command) => {
      const dir = repoPath(cmd);
      if (othersCanRead(dir)) {
        note(
          `warning: ${dir} can be read by other local users (mode ${modeOf(dir)}); bkfs creates its files 0600, but others can list them: run 'chmod 700 ${dir}' so that only you can reach the repository`,
        );
      }
      const repo = Repository.init(dir, {
        chunkSize: parseIntOption('--chunk-size', opts.chunkSize),
        compressionLevel: Number(opts.compressionLevel),
      });
      out(`created bkfs repository ${repo.config.id} at ${dir}`);
      repo.close();
    });
}

function modeOf(dir: string): string {
  return (fs.statSync(dir).mode & 0o7777).toString(8).padStart(4, '0');
}
