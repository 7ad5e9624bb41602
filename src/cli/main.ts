/**
 * bkfs command line: argument parsing (commander), output, exit codes. The only place that prints.
 * Each command lives in `src/cli/commands/<name>.ts` and calls core modules; errors are
 * `BkfsError`s mapped to exit codes by `exit-codes.ts`.
 *
 * Start-up: this module loads only commander and small helpers; `bkfs CMD` loads the definitions
 * of CMD's module only (COMMAND_MODULES), and each action imports the core modules it needs when it
 * runs (`bkfs --help` loads no SQLite, zstd or FUSE; `bkfs list` loads SQLite only).
 */
import { Command, CommanderError, Option } from 'commander';
import { BkfsError, errorMessage } from '../errors';
import { EXIT_CODES, EXIT_INTERNAL } from './exit-codes';
import { note, setVerbosity, verbosity } from './context';
import { parseDuration } from '../util/format';
import { codedFsError } from '../util/userpath';

/**
 * `-r s3://BUCKET/PREFIX` (or BKFS_REPO=s3://...): every command works on the bucket's local cache
 * directory (src/store/location.ts), so `-r` is replaced by it before the command runs. `init`
 * creates the repository itself (it has no cache directory yet).
 */
async function resolveRepoLocation(program: Command, action: Command): Promise<void> {
  const o = action.optsWithGlobals<{ repo?: string; cacheDir?: string; cacheSize?: string }>();
  if (o.cacheDir !== undefined) process.env.BKFS_CACHE_DIR = o.cacheDir;
  if (o.cacheSize !== undefined) {
    const { parseSize } = await import('../store/remote-packs');
    const n = parseSize(o.cacheSize);
    if (n === undefined)
      throw new BkfsError('USAGE', `--cache-size takes a size such as 512M or 4G, got '${o.cacheSize}'`);
    process.env.BKFS_CACHE_SIZE = String(n);
  }
  const loc = o.repo ?? process.env.BKFS_REPO;
  if (loc === undefined || !loc.startsWith('s3://') || action.name() === 'init') return;
  const { resolveLocation } = await import('../store/location');
  const dir = await resolveLocation(loc);
  if (o.repo !== undefined) program.setOptionValue('repo', dir);
  else process.env.BKFS_REPO = dir;
}

type Registrar = (program: Command) => void;

/**
 * The command modules, in help order, with the commands (and aliases) each registers. `bkfs CMD`
 * loads only CMD's module (start-up: compiling the other fourteen is most of the CLI's own load
 * time); `bkfs`, `bkfs --help`, `help`, `completion`, `man` and unknown names load them all. A unit
 * test checks this table against what each module registers.
 */
/* eslint-disable @typescript-eslint/no-require-imports -- synchronous lazy loading of one command module */
export const COMMAND_MODULES: readonly { commands: readonly string[]; load: () => Registrar }[] = [
  {
    commands: ['init'],
    load: () => (require('./commands/init') as typeof import('./commands/init')).registerInit,
  },
  {
    commands: ['backup'],
    load: () => (require('./commands/backup') as typeof import('./commands/backup')).registerBackup,
  },
  {
    commands: ['list', 'snapshots', 'info'],
    load: () => (require('./commands/catalog') as typeof import('./commands/catalog')).registerCatalog,
  },
  {
    commands: ['verify'],
    load: () => (require('./commands/verify') as typeof import('./commands/verify')).registerVerify,
  },
  {
    commands: [],
    load: () => (require('./commands/optional') as typeof import('./commands/optional')).registerOptional,
  },
  {
    commands: ['forget', 'protect', 'unprotect', 'gc', 'prune', 'repair', 'stats'],
    load: () => (require('./commands/lifecycle') as typeof import('./commands/lifecycle')).registerLifecycle,
  },
  {
    commands: ['restore', 'export'],
    load: () => (require('./commands/restore') as typeof import('./commands/restore')).registerRestore,
  },
  {
    commands: ['mount', 'umount', 'unmount'],
    load: () => (require('./commands/mount') as typeof import('./commands/mount')).registerMount,
  },
  {
    commands: ['serve'],
    load: () => (require('./commands/serve') as typeof import('./commands/serve')).registerServe,
  },
  {
    commands: ['instant-restore'],
    load: () =>
      (require('./commands/instant-restore') as typeof import('./commands/instant-restore'))
        .registerInstantRestore,
  },
  {
    commands: ['ls', 'cp', 'cat', 'checksum', 'find', 'diff'],
    load: () => (require('./commands/files') as typeof import('./commands/files')).registerFiles,
  },
  {
    commands: ['web'],
    load: () => (require('./commands/web') as typeof import('./commands/web')).registerWeb,
  },
  {
    commands: ['version', 'completion', 'man'],
    load: () => (require('./commands/meta') as typeof import('./commands/meta')).registerMeta,
  },
  {
    commands: ['run'],
    load: () => (require('./commands/run') as typeof import('./commands/run')).registerRun,
  },
  {
    commands: ['copy'],
    load: () => (require('./commands/copy') as typeof import('./commands/copy')).registerCopy,
  },
];

/* eslint-enable @typescript-eslint/no-require-imports */

/** Commands that need every command defined (they list or generate from all of them). */
const NEEDS_ALL = new Set(['help', 'completion', 'man']);

/**
 * The program with every command, or (`only`: a command name from COMMAND_MODULES) with just the
 * module that defines it.
 */
export function buildProgram(only?: string): Command {
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
      '--cache-dir <dir>',
      'for -r s3://...: where the local index, locks and chunk cache live (default: $BKFS_CACHE_DIR, /var/cache/bkfs as root, ~/.cache/bkfs otherwise)',
    )
    .option(
      '--cache-size <size>',
      'for -r s3://...: bound of the on-disk chunk cache, e.g. 512M, 4G (default 2G)',
    )
    .addOption(new Option('-V, --version', 'print version information (as bkfs version)'))
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ outputError: (s, write) => write(s) })
    .exitOverride();
  program.hook('preAction', async (_program, action) => {
    const o = action.optsWithGlobals<{ quiet?: boolean; verbose?: boolean; retryLock?: string }>();
    if (o.quiet && o.verbose) throw new BkfsError('USAGE', '--quiet and --verbose exclude each other');
    setVerbosity(o.quiet ? 'quiet' : o.verbose ? 'verbose' : 'normal');
    if (o.retryLock !== undefined && parseDuration(o.retryLock) === undefined) {
      throw new BkfsError(
        'USAGE',
        `--retry-lock takes a duration such as 30s, 5m or 1h, got '${o.retryLock}'`,
      );
    }
    await resolveRepoLocation(program, action);
  });
  const mods =
    only === undefined ? COMMAND_MODULES : COMMAND_MODULES.filter((m) => m.commands.includes(only));
  for (const m of mods) m.load()(program);
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
const GLOBAL_WITH_VALUE = new Set(['-r', '--repo', '--retry-lock']);

/**
 * `bkfs --version` / `bkfs -V` (before any command) runs `bkfs version`, so both print the same
 * full information.
 */
/** The command word of `args` (after the global options), if any. */
export function commandWord(args: readonly string[]): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (GLOBAL_WITH_VALUE.has(a)) i++;
    else if (!a.startsWith('-')) return a;
  }
  return undefined;
}

/** The command to load alone for `args`, or undefined to load them all (see COMMAND_MODULES). */
export function soleCommand(args: readonly string[]): string | undefined {
  const w = commandWord(args);
  if (w === undefined || NEEDS_ALL.has(w)) return undefined;
  return COMMAND_MODULES.some((m) => m.commands.includes(w)) ? w : undefined;
}

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
  const args = rewriteVersionFlag(argv.slice(2));
  const program = buildProgram(soleCommand(args));
  try {
    await program.parseAsync([...argv.slice(0, 2), ...args]);
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
