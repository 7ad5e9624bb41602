/**
 * bkfs command line: argument parsing (commander), output, exit codes. The only place that prints.
 * Each command lives in `src/cli/commands/<name>.ts` and calls core modules; errors are
 * `BkfsError`s mapped to exit codes by `exit-codes.ts`.
 *
 * Start-up: this module and the command definitions load only commander and small helpers; each
 * action imports the core modules it needs when it runs (`bkfs --help` loads no SQLite, zstd or
 * FUSE; `bkfs list` loads SQLite only).
 */
import { Command, CommanderError, Option } from 'commander';
import { BkfsError, errorMessage } from '../errors';
import { EXIT_CODES, EXIT_INTERNAL } from './exit-codes';
import { note, setVerbosity, verbosity } from './context';
import { parseDuration } from '../util/format';
import { codedFsError } from '../util/userpath';
import { registerBackup } from './commands/backup';
import { registerCatalog } from './commands/catalog';
import { registerInit } from './commands/init';
import { registerVerify } from './commands/verify';
import { registerOptional } from './commands/optional';
import { registerLifecycle } from './commands/lifecycle';
import { registerRestore } from './commands/restore';
import { registerMount } from './commands/mount';
import { registerServe } from './commands/serve';
import { registerInstantRestore } from './commands/instant-restore';
import { registerFiles } from './commands/files';
import { registerMeta } from './commands/meta';
import { registerWeb } from './commands/web';
import { registerRun } from './commands/run';
import { registerKey } from './commands/key';
import { acceptHandoff, setKeyProvider } from '../crypto/keyring';
import { cliKeyProvider } from './keysource';

export function buildProgram(): Command {
  const program = new Command('bkfs');
  program
    .description('Block-level backup of virtual machine disks, with every checkpoint mountable as a raw disk')
    .option(
      '-r, --repo <path>',
      'repository directory (default: $BKFS_REPO, /var/lib/bkfs as root, ~/.local/share/bkfs otherwise)',
    )
    .option('-q, --quiet', 'no progress bars and no notes on stderr (errors and results still print)')
    .option('-v, --verbose', 'more detail on stderr: the repository used, time taken, stack traces of bugs')
    .option(
      '--retry-lock <duration>',
      'commands that write: wait up to DURATION (e.g. 30s, 5m, 1h) for another writer to finish instead of failing with exit code 7',
    )
    .option(
      '--key-file <file>',
      'encrypted repositories: a key file that opens a key slot (also $BKFS_KEY_FILE; passphrases come from $BKFS_PASSWORD_FILE, $BKFS_PASSWORD_COMMAND or the terminal)',
    )
    .addOption(new Option('-V, --version', 'print version information (as bkfs version)'))
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ outputError: (s, write) => write(s) })
    .exitOverride();
  program.hook('preAction', (_program, action) => {
    const o = action.optsWithGlobals<{
      quiet?: boolean;
      verbose?: boolean;
      retryLock?: string;
      keyFile?: string;
    }>();
    setKeyProvider(cliKeyProvider(o.keyFile));
    if (o.quiet && o.verbose) throw new BkfsError('USAGE', '--quiet and --verbose exclude each other');
    setVerbosity(o.quiet ? 'quiet' : o.verbose ? 'verbose' : 'normal');
    if (o.retryLock !== undefined && parseDuration(o.retryLock) === undefined) {
      throw new BkfsError(
        'USAGE',
        `--retry-lock takes a duration such as 30s, 5m or 1h, got '${o.retryLock}'`,
      );
    }
  });
  registerInit(program);
  registerBackup(program);
  registerCatalog(program);
  registerVerify(program);
  registerOptional(program);
  registerLifecycle(program);
  registerRestore(program);
  registerMount(program);
  registerServe(program);
  registerInstantRestore(program);
  registerFiles(program);
  registerWeb(program);
  registerMeta(program);
  registerRun(program);
  registerKey(program);
  program.addHelpText(
    'after',
    `
Addresses: VM means its latest checkpoint, VM@NAME a checkpoint by name.
Times: shown in local time with their UTC offset (TZ is honoured); --json gives ISO 8601 UTC.
Exit codes: see README ("Exit codes").

Examples:
  bkfs -r /srv/bkfs init
  bkfs backup web --disk vda=/var/lib/libvirt/images/web.qcow2
  bkfs list web
  bkfs mount web /mnt/web
  bkfs forget --keep-daily 7 --keep-weekly 4 --prune
  bkfs help restore`,
  );
  return program;
}

/** Global options that take a value (to find where the command name is in argv). */
const GLOBAL_WITH_VALUE = new Set(['-r', '--repo', '--retry-lock', '--key-file']);

/**
 * `bkfs --version` / `bkfs -V` (before any command) runs `bkfs version`, so both print the same
 * full information.
 */
export function rewriteVersionFlag(args: string[]): string[] {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--version' || a === '-V') return [...args.slice(0, i), 'version', ...args.slice(i + 1)];
    if (GLOBAL_WITH_VALUE.has(a)) i++;
    else if (!a.startsWith('-')) break; // a command: its own -V is its business
  }
  return args;
}

export async function main(argv: string[]): Promise<void> {
  const t0 = Date.now();
  // `bkfs list | head`, `bkfs backup ... 2>&1 | head`: a closed pipe silences output, not the work.
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') return; // the reader went away: keep working, stop talking
      throw e;
    });
  }
  const program = buildProgram();
  // A parent bkfs (mount daemon starter, job runner) may hand this process the keys it unlocked,
  // through an inherited pipe (never argv or environment): read them before anything else.
  acceptHandoff();
  try {
    await program.parseAsync([...argv.slice(0, 2), ...rewriteVersionFlag(argv.slice(2))]);
  } catch (raw) {
    const e = codedFsError(raw); // a raw EACCES/ENOTDIR/... on a user's path: coded, not exit 1
    process.exitCode = exitCodeFor(e);
    if (e instanceof CommanderError) return; // commander already printed
    process.stderr.write(`bkfs: ${errorMessage(e)}\n`);
    if (!(e instanceof BkfsError) && (process.env.BKFS_DEBUG || verbosity() === 'verbose'))
      process.stderr.write(`${(e as Error).stack}\n`);
  } finally {
    if (verbosity() === 'verbose') note(`done in ${Date.now() - t0} ms (exit code ${process.exitCode ?? 0})`);
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
