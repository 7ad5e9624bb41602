import type { Command } from 'commander';
import { out, parseIntOption, repoPath } from '../context';

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
    .action(async (opts: { chunkSize: string; compressionLevel: string }, cmd: Command) => {
      const dir = repoPath(cmd);
      const { Repository } = await import('../../repo/repository');
      const repo = Repository.init(dir, {
        chunkSize: parseIntOption('--chunk-size', opts.chunkSize),
        compressionLevel: Number(opts.compressionLevel),
      });
      out(`created bkfs repository ${repo.config.id} at ${dir}`);
      repo.close();
    });
}
