/**
 * `bkfs mount VM[@CP] DIR`, `bkfs mount --all DIR` and `bkfs umount DIR`.
 *
 * By default `mount` checks its arguments, starts a detached daemon (this same program with
 * `--foreground --ready-fd 3`), waits until the daemon reports the mount usable, prints what it
 * mounted and exits 0; the daemon keeps serving and logs to a file next to its state file
 * (src/fuse/state.ts). `--foreground` serves in this process and unmounts on Ctrl-C/SIGTERM.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Option, type Command } from 'commander';
import { BkfsError } from '../../errors';
import { parseCheckpointRef, resolveRef } from '../../index/catalog';
import { bytes } from '../../util/format';
import type { MountedInfo } from '../../fuse/daemon';
import { note, out, repoPath, withReader } from '../context';
import { printJson } from '../json';

/**
 * The default of --cache-size: DEFAULT_CACHE_BYTES of src/store/chunk-cache.ts, written out so that
 * `--help` does not load the chunk cache (test/unit/cli-startup.test.ts checks they agree).
 */
export const DEFAULT_CACHE_SIZE = '256M';

interface MountCliOptions {
  json?: boolean;
  foreground?: boolean;
  cacheSize: string;
  mode: string;
  readyFd?: string;
  files?: boolean;
  engine?: string;
  guestfsTcg?: boolean;
  all?: boolean;
}

/**
 * The two forms of `mount`, never guessed from the argument count alone: `VM[@CP] DIR` (one
 * checkpoint) and `--all DIR` (the whole repository). A missing or extra argument is a usage error
 * that says which form was understood and what is missing.
 */
export function mountForm(
  first: string | undefined,
  second: string | undefined,
  all: boolean,
): { ref?: string; dir: string } {
  if (all) {
    if (first === undefined)
      throw new BkfsError('USAGE', 'mount --all needs a mount point: bkfs mount --all DIR');
    if (second !== undefined) {
      throw new BkfsError(
        'USAGE',
        `mount --all mounts the whole repository and takes only the mount point, got '${first}' and '${second}' (to mount one checkpoint: bkfs mount ${first} ${second})`,
      );
    }
    return { dir: first };
  }
  if (first === undefined) {
    throw new BkfsError(
      'USAGE',
      'mount needs VM[@CP] and a mount point (or --all DIR for the whole repository)',
    );
  }
  if (second === undefined) {
    throw new BkfsError(
      'USAGE',
      `mount ${first}: understood '${first}' as the checkpoint to mount, but no mount point was given (bkfs mount ${first} DIR; to mount the whole repository on ${first}: bkfs mount --all ${first})`,
    );
  }
  return { ref: first, dir: second };
}

const UNITS: Record<string, number> = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };

/** "268435456", "256M", "256MiB", "1G", "1.5g" -> bytes. */
export function parseSize(name: string, v: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$/i.exec(v);
  const n = m ? Math.floor(Number(m[1]) * (UNITS[(m[2] ?? '').toUpperCase()] ?? NaN)) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new BkfsError('USAGE', `${name} takes a size such as 256M or 1G, got '${v}'`);
  }
  return n;
}

function parseMode(v: string): number {
  if (!/^0?[0-7]{3}$/.test(v))
    throw new BkfsError('USAGE', `--mode takes octal permission bits such as 0400 or 0444, got '${v}'`);
  return parseInt(v, 8);
}

/** bin/bkfs of this installation: the daemon is this same program. */
function bkfsBin(): string {
  const bin = path.resolve(__dirname, '../../../../bin/bkfs');
  if (!fs.existsSync(bin)) throw new BkfsError('MOUNT_FAILED', `cannot find the bkfs launcher at ${bin}`);
  return bin;
}

function describeMount(info: MountedInfo, repoDir: string): void {
  const what = info.ref ?? `repository ${repoDir}`;
  out(`mounted ${what} on ${info.mountpoint} (daemon pid ${info.pid})`);
  const width = Math.max(0, ...info.files.map((f) => f.name.length));
  for (const f of info.files)
    out(`  ${f.name.padEnd(width)}${info.mode === 'checkpoint' ? `  ${bytes(f.size)}` : ''}`);
  if (info.files.length === 0) out('  (empty)');
}

/** Timestamped log lines for the daemon's log file (its stderr). */
function daemonLogger(foreground: boolean): (line: string) => void {
  if (foreground) return (line) => note(line);
  return (line) => process.stderr.write(`${new Date().toISOString()} bkfs[${process.pid}]: ${line}\n`);
}

async function runForeground(
  repoDir: string,
  ref: string | undefined,
  mountpoint: string,
  cacheBytes: number,
  fileMode: number,
  readyFd: number | undefined,
): Promise<void> {
  const daemon = readyFd !== undefined;
  const log = daemonLogger(!daemon);
  const ac = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    if (ac.signal.aborted) return;
    log(`${sig} received`);
    ac.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // A detached daemon has no terminal to lose; in the foreground a hang-up ends the session.
  if (daemon) process.on('SIGHUP', () => undefined);
  else process.on('SIGHUP', onSignal);
  let ready = false;
  const { sendReady, sendReadyError, serveMount } = await import('../../fuse/daemon');
  const { logPath } = await import('../../fuse/state');
  try {
    await serveMount({
      repoDir,
      ...(ref !== undefined ? { ref } : {}),
      mountpoint,
      cacheBytes,
      fileMode,
      allowOther: process.getuid?.() === 0,
      ...(daemon ? { logFile: logPath(mountpoint) } : {}),
      log,
      stop: ac.signal,
      onReady: (info) => {
        ready = true;
        if (readyFd !== undefined) {
          sendReady(readyFd, { ok: true, info });
        } else {
          describeMount(info, repoDir);
          out(`serving in the foreground: Ctrl-C or 'bkfs umount ${mountpoint}' unmounts`);
        }
      },
    });
  } catch (e) {
    if (!ready) sendReadyError(readyFd, e);
    throw e;
  } finally {
    // fuse-native keeps a libuv handle after a mount: end the process once the action is done
    // (after the CLI has reported any error and set the exit code).
    setImmediate(() => process.exit());
  }
}

export function registerMount(program: Command): void {
  program
    .command('mount')
    .description(
      'show a checkpoint (or, with --all, the whole repository) as read-only raw disk files over FUSE',
    )
    .argument('[ref]', 'VM or VM@CHECKPOINT to mount (with --all: the mount point)')
    .argument('[dir]', 'mount point (an existing empty directory)')
    .option('--all', 'mount the whole repository: DIR/<vm>/<checkpoint>/<disk>.raw')
    .option('--foreground', 'serve in this process until Ctrl-C or SIGTERM (default: return once mounted)')
    .option(
      '--cache-size <size>',
      'decoded chunk cache shared by all files, e.g. 256M, 1G',
      DEFAULT_CACHE_SIZE,
    )
    .option('--mode <octal>', 'permission bits of the files: 0400 owner only, 0444 every local user', '0400')
    .addOption(new Option('--ready-fd <fd>', 'internal: report readiness on this fd (daemon)').hideHelp())
    .option(
      '--files',
      'also mount the guest filesystems: DIR/disks/<disk>.raw and DIR/fs/<volume>/ (see bkfs ls --help)',
    )
    .option('--engine <engine>', 'with --files: auto, guestfs or kernel')
    .option('--guestfs-tcg', 'with --files: libguestfs without KVM (force_tcg)')
    .option('--json', 'machine-readable summary of what was mounted')
    .addHelpText(
      'after',
      `
Files: DIR/<disk>.raw for every disk of the checkpoint (its virtual size, its exact bytes) and the
saved configurations (e.g. domain.xml). With --all, DIR/<vm>/<checkpoint>/<disk>.raw for the whole
repository, with DIR/<vm>/latest -> newest checkpoint; new checkpoints appear while mounted.
Everything is read-only. Partitions: losetup -r -o OFFSET --sizelimit SIZE DIR/vda.raw.

Examples:
  bkfs mount web@check3 /mnt/web && ls -l /mnt/web
  bkfs mount --all /mnt/backups && ls /mnt/backups/web/latest/
  bkfs umount /mnt/web`,
    )
    .action(mountAction);

  program
    .command('umount')
    .alias('unmount')
    .description('unmount a bkfs mount and stop its daemon (also cleans a mount whose daemon died)')
    .argument('<dir>', 'mount point')
    .option('-z, --lazy', 'detach now even if files are open (they fail once the daemon stops)')
    .addHelpText(
      'after',
      `
Examples:
  bkfs umount /mnt/web
  bkfs umount --lazy /mnt/web`,
    )
    .option('--json', 'machine-readable result')
    .action(async (dir: string, opts: { lazy?: boolean; json?: boolean }) => {
      const { canonicalMountpoint, unmountPath } = await import('../../fuse/state');
      const { umountFilesAction } = await import('./files');
      const mountpoint = canonicalMountpoint(dir);
      if (await umountFilesAction(mountpoint, opts.lazy ?? false, opts.json ?? false)) return;
      const r = await unmountPath(mountpoint, { lazy: opts.lazy ?? false });
      if (opts.json) {
        printJson({ mountpoint, outcome: r.outcome, pid: r.pid ?? null });
        return;
      }
      if (r.outcome === 'stale') {
        out(`removed the stale mount at ${mountpoint} (its daemon${r.pid ? ` pid ${r.pid}` : ''} had died)`);
      } else {
        out(`unmounted ${mountpoint}`);
      }
    });
}

/** `bkfs mount`: one checkpoint or --all, in this process (--foreground) or by a daemon it waits for. */
async function mountAction(
  first: string | undefined,
  second: string | undefined,
  opts: MountCliOptions,
  cmd: Command,
): Promise<void> {
  const form = mountForm(first, second, opts.all ?? false);
  const ref = form.ref;
  const { canonicalMountpoint } = await import('../../fuse/state');
  const { prepareMountpoint } = await import('../../fuse/daemon');
  const mountpoint = canonicalMountpoint(form.dir);
  if (ref !== undefined) parseCheckpointRef(ref); // BAD_NAME before anything else
  if (opts.files) {
    if (ref === undefined) throw new BkfsError('USAGE', '--files needs VM[@CP] and a directory, not --all');
    const { mountFilesAction } = await import('./files');
    return mountFilesAction(cmd, ref, mountpoint, opts);
  }
  const cacheBytes = parseSize('--cache-size', opts.cacheSize);
  const fileMode = parseMode(opts.mode);
  const repoDir = path.resolve(repoPath(cmd));
  if (opts.readyFd !== undefined || opts.foreground) {
    const fd = opts.readyFd === undefined ? undefined : Number(opts.readyFd);
    if (fd !== undefined && !Number.isInteger(fd)) throw new BkfsError('USAGE', '--ready-fd takes a number');
    await runForeground(repoDir, ref, mountpoint, cacheBytes, fileMode, fd);
    return;
  }
  // Check what can be checked here, so errors come with their own exit codes at once.
  await withReader(cmd, (repo) => {
    if (ref !== undefined) resolveRef(repo.db, ref);
  });
  await prepareMountpoint(mountpoint, note);
  const info = await startMountDaemon(repoDir, ref, mountpoint, cacheBytes, opts.mode);
  if (opts.json) {
    printJson({ ...info, repository: repoDir });
    return;
  }
  describeMount(info, repoDir);
  out(`log: ${info.log ?? '-'}; unmount with: bkfs umount ${mountpoint}`);
}

/** Start `bkfs mount --foreground` as a daemon and wait until it has mounted (or failed). */
async function startMountDaemon(
  repoDir: string,
  ref: string | undefined,
  mountpoint: string,
  cacheBytes: number,
  mode: string,
): Promise<MountedInfo> {
  const { startDaemon } = await import('../../fuse/daemon');
  const { logPath } = await import('../../fuse/state');
  return startDaemon({
    command: process.execPath,
    args: [
      bkfsBin(),
      '-r',
      repoDir,
      'mount',
      ...(ref !== undefined ? [ref] : ['--all']),
      mountpoint,
      '--foreground',
      '--cache-size',
      String(cacheBytes),
      '--mode',
      mode,
      '--ready-fd',
      '3',
    ],
    logFile: logPath(mountpoint),
    repoDir,
  });
}
