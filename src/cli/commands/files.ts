/**
 * File-level restore: `ls`, `cp`, `cat`, `find`, `diff` over the guest filesystems of checkpoints
 * (library: `src/files/ops.ts`). This file parses options and prints; nothing else.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { Command, Option } from 'commander';
import { BkfsError, errorMessage } from '../../errors';
import type { EngineChoice } from '../../files/engine';
import type { DiffResult, FilesOptions, FindResult, Overview } from '../../files/ops';
import type { ListEntry, SessionStats } from '../../files/session';
import { modeString, type DiffItem, type FileEntry } from '../../files/tree';
import { bytes } from '../../util/format';
import { interruptSignal, note, out, table, withReader } from '../context';
import { printJson } from '../json';

/**
 * The engine `BKFS_FILES_ENGINE` names (or the default). `files/engine` is loaded here, when a
 * command runs, not with this module: it pulls in the libguestfs driver (child processes, crypto),
 * which `bkfs --help` does not need (start-up).
 */
function defaultEngine(): EngineChoice {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { engineFromEnv } = require('../../files/engine') as typeof import('../../files/engine');
  return engineFromEnv(process.env.BKFS_FILES_ENGINE);
}

interface EngineCliOptions {
  engine?: string;
  guestfsTcg?: boolean;
  stats?: boolean;
}

const ENGINE_HELP = `
Engines: 'guestfs' (the default; 'auto' is the same) runs libguestfs (guestfish) in a small
appliance VM, so guest filesystem metadata is parsed neither by the host kernel nor by a host root
process; it reads ext2/3/4, xfs, btrfs, vfat, NTFS and LVM and needs no root. 'kernel' (root only,
TRUSTED GUESTS ONLY: a crafted filesystem reaches the host kernel) mounts partitions read-only
through loop devices, without journal replay; much faster, limited to what this kernel can mount
(no LVM); only used when asked for: --engine kernel, or BKFS_FILES_ENGINE=kernel on the host.
libguestfs: LIBGUESTFS_BACKEND defaults to 'direct'; where KVM is unusable or nested KVM hangs, set
LIBGUESTFS_BACKEND_SETTINGS=force_tcg (or pass --guestfs-tcg).`;

function engineOptions(cmd: Command): Command {
  return cmd
    .addOption(
      new Option(
        '--engine <engine>',
        'how guest filesystems are read (default: BKFS_FILES_ENGINE, else auto = guestfs)',
      ).choices(['auto', 'guestfs', 'kernel']),
    )
    .option('--guestfs-tcg', 'libguestfs: emulate the CPU (force_tcg), for hosts without usable KVM')
    .option('--stats', 'report the bytes read from the repository (on stderr)');
}

function filesOptions(o: EngineCliOptions, signal: AbortSignal): FilesOptions {
  return {
    engine: (o.engine as EngineChoice | undefined) ?? defaultEngine(),
    ...(o.guestfsTcg ? { guestfsTcg: true } : {}),
    onNotice: (m) => note(m),
    signal,
    ...(o.stats ? { onStats: (s: SessionStats) => note(statsLine(s)) } : {}),
  };
}

function statsLine(s: SessionStats): string {
  return `engine ${s.engine ?? 'none'}: ${bytes(s.bytesFromStore)} read from the repository (${s.chunksDecoded} chunks decoded), ${bytes(s.nbdBytesServed)} served to the engine`;
}

async function withInterrupt<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const intr = interruptSignal();
  try {
    return await fn(intr.signal);
  } catch (e) {
    // Whatever a tool said while being stopped, the command was interrupted (exit 130).
    if (intr.signal.aborted) throw new BkfsError('INTERRUPTED', errorMessage(intr.signal.reason));
    throw e;
  } finally {
    intr.dispose();
  }
}

/**
 * Standard output written with fs.write on fd 1, so that a reader going away (`bkfs cat ... |
 * head`) fails this command's writes (EPIPE) and the command cleans up (unmounts, stops the
 * appliance) before exiting, instead of process.stdout's error handler exiting at once.
 */
class StdoutFd extends Writable {
  constructor() {
    super({ highWaterMark: 1 << 20 });
    this.on('error', () => undefined); // reported through the write callbacks
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    let off = 0;
    const next = (): void => {
      if (off >= chunk.length) {
        cb();
        return;
      }
      fs.write(1, chunk, off, chunk.length - off, null, (err, n) => {
        if (err?.code === 'EAGAIN') {
          setTimeout(next, 5);
          return;
        }
        if (err) {
          cb(err);
          return;
        }
        off += n;
        next();
      });
    };
    next();
  }
}

function time(sec: number): string {
  return new Date(sec * 1000).toISOString().replace('T', ' ').slice(0, 19);
}

function longRow(e: ListEntry | FileEntry, name: string): string[] {
  return [
    modeString(e.kind, e.mode),
    String(e.uid),
    String(e.gid),
    String(e.size),
    time(e.mtimeSec),
    e.kind === 'symlink' && e.target !== undefined ? `${name} -> ${e.target}` : name,
  ];
}

function printOverview(o: Overview): void {
  out(`${o.vm}@${o.checkpoint}${o.engine ? ` (read with ${o.engine})` : ''}`);
  out(
    table(
      ['DISK', 'SIZE', 'TABLE'],
      o.disks.map((d) => [
        d.name,
        bytes(d.size),
        d.table === 'none'
          ? 'none'
          : `${d.table} (${d.partitions} partition${d.partitions === 1 ? '' : 's'})`,
      ]),
    ),
  );
  for (const d of o.disks) for (const w of d.warnings) out(`  ${d.name}: ${w}`);
  out('');
  out(
    table(
      ['VOLUME', 'TYPE', 'LABEL', 'UUID', 'OFFSET', 'SIZE', 'MOUNT', 'PARTITION TYPE'],
      o.volumes.map((v) => [
        v.id,
        v.type ?? '-',
        v.label ?? '-',
        v.uuid ?? '-',
        v.lv ? '-' : String(v.offset),
        bytes(v.size),
        v.mountpoint ?? (v.note ? `(${v.note})` : '-'),
        v.partType ?? (v.lv ? 'LVM logical volume' : '-'),
      ]),
    ),
  );
  const part = o.volumes.find((v) => !v.lv && v.partition);
  if (part) {
    out(
      `\nOFFSET is in bytes from the start of the disk: losetup -r -o ${part.offset} --sizelimit ${part.size} /dev/loopN DIR/${part.disk ?? 'vda'}.raw (on a bkfs mount)`,
    );
  }
  if (o.fstabFrom) out(`\nmount points from /etc/fstab on ${o.fstabFrom}`);
  else if (o.volumes.some((v) => v.mountpoint === '/')) out('\nno /etc/fstab: the only filesystem is /');
  else out('\nno /etc/fstab found: name a volume in paths (VM@CP:DISK:PART:/path)');
  for (const s of o.skipped) out(`  fstab ${s.mountpoint} (${s.spec}) not shown: ${s.reason}`);
}

function describeChange(d: DiffItem): string {
  if (d.change !== 'changed' || !d.before || !d.after) return '';
  const parts = d.what.map((w) => {
    const a = d.before as FileEntry;
    const b = d.after as FileEntry;
    switch (w) {
      case 'size':
        return `size ${a.size} -> ${b.size}`;
      case 'mtime':
        return `mtime ${time(a.mtimeSec)} -> ${time(b.mtimeSec)}`;
      case 'mode':
        return `mode ${a.mode.toString(8)} -> ${b.mode.toString(8)}`;
      case 'owner':
        return `owner ${a.uid}:${a.gid} -> ${b.uid}:${b.gid}`;
      case 'type':
        return `type ${a.kind} -> ${b.kind}`;
      case 'target':
        return `target ${a.target ?? ''} -> ${b.target ?? ''}`;
      default:
        return w;
    }
  });
  return `  (${parts.join(', ')})`;
}

/**
 * `bkfs mount --files VM@CP DIR` (wired from mount.ts): DIR/disks (the FUSE raw disks) and
 * DIR/fs/<volume> (the guest filesystems).
 */
export async function mountFilesAction(
  cmd: Command,
  ref: string,
  dir: string,
  opts: { engine?: string; guestfsTcg?: boolean; json?: boolean },
): Promise<void> {
  const engine = (opts.engine ?? defaultEngine()) as EngineChoice;
  if (!['auto', 'guestfs', 'kernel'].includes(engine)) {
    throw new BkfsError('USAGE', `--engine must be auto, guestfs or kernel, got '${engine}'`);
  }
  const { mountFiles } = await import('../../files/fsmount');
  await withReader(cmd, async (repo) => {
    const s = await mountFiles(repo, {
      dir,
      ref,
      engine,
      ...(opts.guestfsTcg ? { guestfsTcg: true } : {}),
      bkfsBin: path.resolve(__dirname, '../../../../bin/bkfs'),
      onNotice: (m) => note(m),
    });
    if (opts.json) {
      printJson({
        ref: s.ref,
        mountpoint: s.dir,
        engine: s.engine,
        disks: path.join(s.dir, 'disks'),
        volumes: s.volumes.map((v) => ({
          name: v.name,
          path: path.join(s.dir, 'fs', v.name),
          type: v.type,
          mounted: v.mounted,
          note: v.note ?? null,
        })),
      });
      return;
    }
    out(`mounted ${s.ref} on ${s.dir} (filesystems read with ${s.engine})`);
    out(`  ${path.join(s.dir, 'disks')}/   raw disks`);
    for (const v of s.volumes) {
      out(
        `  ${path.join(s.dir, 'fs', v.name)}/   ${v.type}${v.mounted ? '' : ` (not mounted: ${v.note ?? 'failed'})`}`,
      );
    }
    out(`unmount with: bkfs umount ${s.dir}`);
  });
}

/** `bkfs umount DIR` of a --files mount; returns false when DIR is not one. */
export async function umountFilesAction(dir: string, lazy: boolean, json = false): Promise<boolean> {
  const { readFilesState, unmountFiles } = await import('../../files/fsmount');
  if (!readFilesState(dir)) return false;
  const s = await unmountFiles(dir, { lazy });
  if (json) {
    printJson({ mountpoint: s.dir, outcome: 'unmounted', ref: s.ref });
    return true;
  }
  out(`unmounted ${s.dir} (filesystems and disks of ${s.ref})`);
  return true;
}

type LsOptions = EngineCliOptions & { long?: boolean; json?: boolean };
type CpOptions = EngineCliOptions & {
  recursive?: boolean;
  force?: boolean;
  verify?: boolean;
  json?: boolean;
};
type FindOptions = EngineCliOptions & { ignoreCase?: boolean; json?: boolean };
type DiffOptions = EngineCliOptions & { checksum?: boolean; json?: boolean };

/** `bkfs ls VM[@CP]` (an overview of disks and filesystems) or `bkfs ls ADDRESS` (a directory). */
async function lsAction(address: string, opts: LsOptions, cmd: Command): Promise<void> {
  const { overview, listFiles } = await import('../../files/ops');
  await withInterrupt((signal) =>
    withReader(cmd, async (repo) => {
      const fo = filesOptions(opts, signal);
      if (!address.includes(':')) {
        const o = await overview(repo, address, fo);
        if (opts.json) printJson(o);
        else printOverview(o);
        return;
      }
      const r = await listFiles(repo, address, fo);
      if (opts.json) {
        printJson(r);
        return;
      }
      const name = (e: ListEntry): string => (r.dir ? e.name : e.path) + (e.kind === 'dir' ? '/' : '');
      if (opts.long)
        out(
          table(
            ['MODE', 'UID', 'GID', 'SIZE', 'MTIME (UTC)', 'NAME'],
            r.entries.map((e) => longRow(e, name(e))),
          ),
        );
      else for (const e of r.entries) out(name(e));
    }),
  );
}

function registerLs(program: Command): void {
  engineOptions(
    program
      .command('ls')
      .description(
        "list a directory of a checkpoint's guest filesystem, or (VM@CP alone) its disks and filesystems",
      )
      .argument('<address>', 'VM[@CP], VM[@CP]:/path, VM[@CP]:DISK:PART:/path or VM[@CP]:VG/LV:/path')
      .option('-l, --long', 'type, mode, owner, size and mtime of each entry')
      .option('--json', 'machine-readable output'),
  )
    .addHelpText(
      'after',
      `
Paths are resolved through the guest's own mount layout (its /etc/fstab); name a volume to bypass it.
Examples:
  bkfs ls web@check2                      disks, partitions, filesystems, mount points
  bkfs ls -l web@check2:/etc
  bkfs ls web@check2:vda:2:/var/log       partition 2 of disk vda
  bkfs ls web:vg0/root:/home              LVM logical volume (latest checkpoint)
${ENGINE_HELP}`,
    )
    .action(lsAction);
}

async function cpAction(source: string, dest: string, opts: CpOptions, cmd: Command): Promise<void> {
  if (opts.verify && opts.recursive)
    throw new BkfsError('USAGE', '--verify checks one copied file; not with -R');
  const { copyOut } = await import('../../files/ops');
  await withInterrupt((signal) =>
    withReader(cmd, async (repo) => {
      const r = await copyOut(
        repo,
        source,
        dest,
        {
          recursive: opts.recursive ?? false,
          force: opts.force ?? false,
          ...(opts.verify ? { verify: true } : {}),
        },
        filesOptions(opts, signal),
      );
      if (opts.json) printJson(r);
      else {
        out(
          `${r.vm}@${r.checkpoint}:${r.source} -> ${r.dest} (${r.kind}${r.action !== 'create' ? `, ${r.action}d` : ''})`,
        );
        if (r.verified)
          out(
            `verified: ${r.dest} matches ${r.vm}@${r.checkpoint}:${r.source} (sha256 ${r.verified.sha256})`,
          );
      }
    }),
  );
}

function registerCp(program: Command): void {
  engineOptions(
    program
      .command('cp')
      .description('copy a file (or with -R a directory tree) out of a checkpoint')
      .argument('<source>', 'VM[@CP]:/path or VM[@CP]:DISK:PART:/path')
      .argument('<dest>', 'host path: a new name, or an existing directory to copy into')
      .option('-R, --recursive', 'copy a directory tree (symlinks are copied as symlinks)')
      .option('-f, --force', 'overwrite an existing destination file (merge into an existing directory)')
      .option('--verify', 're-read the copied file and check that its sha256 matches the checkpoint')
      .option('--json', 'machine-readable summary'),
  )
    .addHelpText(
      'after',
      `
Mode, times and (when run as root) owners are kept. The copy is written under a temporary name
next to DEST and renamed into place when complete.
Examples:
  bkfs cp web@check2:/etc/nginx/nginx.conf ./nginx.conf
  bkfs cp -R web@check2:/var/www /srv/restore/
  bkfs cp web@check2:vda:2:/var/log/syslog /tmp/
  bkfs cp --verify web@check2:/etc/hosts ./hosts    # then: copy matches web@check2:/etc/hosts
${ENGINE_HELP}`,
    )
    .action(cpAction);
}

function registerCat(program: Command): void {
  engineOptions(
    program
      .command('cat')
      .description('write a file of a checkpoint to standard output')
      .argument('<address>', 'VM[@CP]:/path or VM[@CP]:DISK:PART:/path'),
  )
    .addHelpText(
      'after',
      `
Examples:
  bkfs cat web@check2:/etc/hostname
  bkfs cat web:/var/log/syslog | grep -i error
${ENGINE_HELP}`,
    )
    .action(async (address: string, opts: EngineCliOptions, cmd: Command) => {
      const { catFile } = await import('../../files/ops');
      await withInterrupt((signal) =>
        withReader(cmd, async (repo) => {
          try {
            await catFile(repo, address, new StdoutFd(), filesOptions(opts, signal));
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === 'EPIPE') return; // the reader has gone: done
            throw e;
          }
        }),
      );
    });
}

function registerChecksum(program: Command): void {
  engineOptions(
    program
      .command('checksum')
      .description(
        'print the sha256 of files of a checkpoint (like sha256sum), e.g. to check a restored copy',
      )
      .argument('<address...>', 'VM[@CP]:/path or VM[@CP]:DISK:PART:/path')
      .option('--json', 'machine-readable output'),
  )
    .addHelpText(
      'after',
      `
Examples:
  bkfs checksum web@check2:/etc/nginx/nginx.conf
  bkfs checksum web@check2:/etc/hosts web@check3:/etc/hosts
  sha256sum ./nginx.conf                  # compare with a restored copy (or: bkfs cp --verify)
${ENGINE_HELP}`,
    )
    .action(async (addresses: string[], opts: EngineCliOptions & { json?: boolean }, cmd: Command) => {
      const { checksumFile } = await import('../../files/ops');
      await withInterrupt((signal) =>
        withReader(cmd, async (repo) => {
          const rows = [];
          for (const a of addresses) {
            const r = await checksumFile(repo, a, filesOptions(opts, signal));
            rows.push(r);
            if (!opts.json) out(`${r.sha256}  ${r.vm}@${r.checkpoint}:${r.path}`);
          }
          if (opts.json) printJson(rows);
        }),
      );
    });
}

function printFind(r: FindResult): void {
  if (r.missing.length > 0)
    note(`the searched path does not exist in ${r.missing.map((c) => `${r.vm}@${c}`).join(', ')}`);
  if (r.matches.length === 0) {
    out(`no match in ${r.checkpoints.length} checkpoint(s) of ${r.vm}`);
    return;
  }
  for (const m of r.matches) {
    out(m.path);
    out(
      table(
        ['  CHECKPOINT', 'STATE', 'SIZE', 'MTIME (UTC)', 'MODE'],
        m.history.map((h) => [
          `  ${h.checkpoint}`,
          h.state,
          h.entry ? String(h.entry.size) : '-',
          h.entry ? time(h.entry.mtimeSec) : '-',
          h.entry ? modeString(h.entry.kind, h.entry.mode) : '-',
        ]),
      ),
    );
  }
}

async function findAction(scope: string, pattern: string, opts: FindOptions, cmd: Command): Promise<void> {
  const { findFiles } = await import('../../files/ops');
  await withInterrupt((signal) =>
    withReader(cmd, async (repo) => {
      const r = await findFiles(repo, scope, pattern, {
        ...filesOptions(opts, signal),
        ignoreCase: opts.ignoreCase ?? false,
      });
      if (opts.json) printJson(r);
      else printFind(r);
    }),
  );
}

function registerFind(program: Command): void {
  engineOptions(
    program
      .command('find')
      .description(
        'search file names in every checkpoint of a VM; shows when each match appeared, changed, vanished',
      )
      .argument(
        '<scope>',
        'VM (all checkpoints) or VM@CP, optionally :/path or :DISK:PART:/path to search below',
      )
      .argument(
        '<pattern>',
        "glob: '*.conf' matches names; with a '/', the path ('/etc/**/*.conf', 'log/*.gz')",
      )
      .option('-i, --ignore-case', 'case-insensitive match')
      .option('--json', 'machine-readable output'),
  )
    .addHelpText(
      'after',
      `
Examples:
  bkfs find web 'nginx.conf'
  bkfs find web:/var/log '*.gz'
  bkfs find web '/home/*/.ssh/authorized_keys'
${ENGINE_HELP}`,
    )
    .action(findAction);
}

function printDiff(r: DiffResult, checksum: boolean | undefined): void {
  const sign = { added: '+', removed: '-', changed: 'M' } as const;
  for (const d of r.items) {
    const e = d.after ?? d.before;
    out(`${sign[d.change]} ${d.path}${e?.kind === 'dir' ? '/' : ''}${describeChange(d)}`);
  }
  const n = (c: DiffItem['change']): number => r.items.filter((d) => d.change === c).length;
  note(
    `${r.vm}@${r.from} -> ${r.to} ${r.path}: ${n('added')} added, ${n('removed')} removed, ${n('changed')} changed${checksum ? ` (${r.checksummed} same-size same-mtime files checksummed)` : ''}`,
  );
}

async function diffAction(
  from: string,
  to: string,
  guestPath: string | undefined,
  opts: DiffOptions,
  cmd: Command,
): Promise<void> {
  // A path without its leading '/' is taken as absolute (as in addresses).
  if (guestPath !== undefined && !guestPath.startsWith('/')) guestPath = `/${guestPath}`;
  const { diffCheckpoints } = await import('../../files/ops');
  await withInterrupt((signal) =>
    withReader(cmd, async (repo) => {
      const r = await diffCheckpoints(repo, from, to, guestPath, {
        ...filesOptions(opts, signal),
        checksum: opts.checksum ?? false,
      });
      if (opts.json) printJson(r);
      else printDiff(r, opts.checksum);
    }),
  );
}

function registerDiff(program: Command): void {
  engineOptions(
    program
      .command('diff')
      .description('list files added (+), removed (-) and changed (M) between two checkpoints')
      .argument('<from>', 'VM@CP (optionally :DISK:PART or :VG/LV to compare one volume)')
      .argument('<to>', 'VM@CP, or CP alone for a checkpoint of the same VM')
      .argument('[path]', 'compare below this guest path (default /)')
      .option('--checksum', 'also compare the contents of files whose size and mtime are equal (sha256)')
      .option('--json', 'machine-readable output'),
  )
    .addHelpText(
      'after',
      `
Files compare by type, size, mtime, mode, owner and symlink target; directories by type, mode and
owner only (their size and mtime follow their contents).
Examples:
  bkfs diff web@check1 web@check3 /etc
  bkfs diff web@check1 check3 /etc        # the same: CP alone is a checkpoint of web
  bkfs diff web@check1 web@check3 --checksum --json
${ENGINE_HELP}`,
    )
    .action(diffAction);
}

/** ls, cp, cat, checksum, find, diff (in this order: the order of `bkfs --help`). */
export function registerFiles(program: Command): void {
  registerLs(program);
  registerCp(program);
  registerCat(program);
  registerChecksum(program);
  registerFind(program);
  registerDiff(program);
}
