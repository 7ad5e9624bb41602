/**
 * bkfs command line: argument parsing (commander), output, exit codes. The only place that prints.
 * Each command lives in `src/cli/commands/<name>.ts` and calls core modules; errors are
 * `BkfsError`s mapped to exit codes by `exit-codes.ts`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Command, CommanderError } from 'commander';
import { BkfsError, errorMessage } from '../errors';
import { EXIT_CODES, EXIT_INTERNAL } from './exit-codes';
import { codedFsError } from '../util/userpath';
import { registerBackup } from './commands/backup';
import { registerCatalog } from './commands/catalog';
import { registerInit } from './commands/init';
import { registerVerify } from './commands/verify';
import { registerOptional } from './commands/optional';
import { registerLifecycle } from './commands/lifecycle';
import { registerRestore } from './commands/restore';
import { registerMount } from './commands/mount';
import { registerFiles } from './commands/files';

function packageVersion(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '../../../package.json'), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

export function buildProgram(): Command {
  const program = new Command('bkfs');
  program
    .description('Block-level backup of virtual machine disks, with every checkpoint mountable as a raw disk')
    .version(packageVersion())
    .option(
      '-r, --repo <path>',
      'repository directory (default: $BKFS_REPO, /var/lib/bkfs as root, ~/.local/share/bkfs otherwise)',
    )
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ outputError: (s, write) => write(s) })
    .exitOverride();
  registerInit(program);
  registerBackup(program);
  registerCatalog(program);
  registerVerify(program);
  registerOptional(program);
  registerLifecycle(program);
  registerRestore(program);
  registerMount(program);
  registerFiles(program);
  program.addHelpText(
    'after',
    '\nAddresses: VM means its latest checkpoint, VM@NAME a checkpoint by name.\nExit codes: see README ("Exit codes").',
  );
  return program;
}

export async function main(argv: string[]): Promise<void> {
  // `bkfs list | head`, `bkfs backup ... 2>&1 | head`: a closed pipe silences output, not the work.
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') return; // the reader went away: keep working, stop talking
      throw e;
    });
  }
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (raw) {
    const e = codedFsError(raw); // a raw EACCES/ENOTDIR/... on a user's path: coded, not exit 1
    process.exitCode = exitCodeFor(e);
    if (e instanceof CommanderError) return; // commander already printed
    process.stderr.write(`bkfs: ${errorMessage(e)}\n`);
    if (!(e instanceof BkfsError) && process.env.BKFS_DEBUG) process.stderr.write(`${(e as Error).stack}\n`);
  }
}

export function exitCodeFor(e: unknown): number {
  if (e instanceof CommanderError) {
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.exitCode === 0) return 0;
    return EXIT_CODES.USAGE;
  }
  if (e instanceof BkfsError) return EXIT_CODES[e.code];
  return EXIT_INTERNAL;
}
