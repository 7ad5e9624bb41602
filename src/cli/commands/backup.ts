/**
 * `bkfs backup VM`: from images / NBD URIs (`--disk NAME=SOURCE`, the engine directly) or from a
 * libvirt domain (`--libvirt DOMAIN`, a pull-mode backup job through `backup/libvirt.ts`).
 * Prints the summary; notes from the core go to stderr as they come.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { BackupOptions, BackupResult, DiskSpec } from '../../backup/engine';
import type { LibvirtBackupResult } from '../../backup/libvirt';
import type { Level } from '../../index/catalog';
import { bytes, duration, rate, ratio } from '../../util/format';
import { out, retryLocked, withLongJob, withRepo, type LongJob } from '../context';
import { printJson } from '../json';

const LEVELS = ['full', 'inc', 'diff', 'copy', 'auto'];

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

export async function parseDiskSpecs(
  specs: string[],
  bitmap: string | null,
  format?: string,
): Promise<DiskSpec[]> {
  const { sourceFor } = await import('../../backup/sources');
  return specs.map((s) => {
    const eq = s.indexOf('=');
    if (eq <= 0 || eq === s.length - 1) {
      throw new BkfsError('USAGE', `--disk takes NAME=SOURCE (an image path or an NBD URI), got '${s}'`);
    }
    return { name: s.slice(0, eq), source: sourceFor(s.slice(eq + 1), bitmap, format) };
  });
}

interface BackupCliOptions {
  disk: string[];
  level: string;
  checkpoint?: string;
  bitmap?: string;
  format?: string;
  config: string[];
  libvirt?: string;
  connect?: string;
  disks: string[];
  exclude: string[];
  freeze: boolean;
  scratchDir?: string;
  nbdTls?: string;
  insecureTcp?: boolean;
  nbdPorts?: string;
  json?: boolean;
}

/** Options that only make sense with --libvirt, and the reverse. */
function checkModeOptions(opts: BackupCliOptions): void {
  if (opts.libvirt !== undefined) {
    if (opts.disk.length > 0) {
      throw new BkfsError(
        'USAGE',
        '--libvirt and --disk exclude each other (use --disks vda,vdb to choose disks)',
      );
    }
    if (opts.bitmap !== undefined) {
      throw new BkfsError(
        'USAGE',
        '--bitmap is for NBD URI sources; with --libvirt, libvirt provides the bitmaps',
      );
    }
    if (opts.format !== undefined) {
      throw new BkfsError(
        'USAGE',
        '--format is for --disk images; with --libvirt, the domain XML declares it',
      );
    }
    return;
  }
  const only: [string, boolean][] = [
    ['--connect', opts.connect !== undefined],
    ['--disks', opts.disks.length > 0],
    ['--exclude', opts.exclude.length > 0],
    ['--no-freeze', !opts.freeze],
    ['--scratch-dir', opts.scratchDir !== undefined],
    ['--nbd-tls', opts.nbdTls !== undefined],
    ['--insecure-tcp', opts.insecureTcp === true],
    ['--nbd-ports', opts.nbdPorts !== undefined],
  ];
  const bad = only.find(([, given]) => given);
  if (bad) throw new BkfsError('USAGE', `${bad[0]} needs --libvirt DOMAIN`);
}

/** The options of `backup`: the engine's (--disk ...), then --libvirt's. */
function backupOptions(cmd: Command): Command {
  return cmd
    .option(
      '-d, --disk <name=source>',
      'disk to back up: NAME=IMAGE, NAME=raw:IMAGE, NAME=qcow2:IMAGE or NAME=NBD-URI (repeatable)',
      collect,
      [],
    )
    .option('-l, --level <level>', `backup level: ${LEVELS.join(', ')}`, 'auto')
    .option('-c, --checkpoint <name>', 'checkpoint name (default: check1, check2, ...)')
    .option(
      '--bitmap <name>',
      'for NBD URI sources: dirty bitmap holding the changes since the previous checkpoint',
    )
    .option(
      '--config <name=file>',
      'save a configuration file with the checkpoint (e.g. domain.xml=vm.xml)',
      collect,
      [],
    )
    .option('--libvirt <domain>', 'back up a libvirt domain (running: live pull-mode backup)')
    .option(
      '--connect <uri>',
      'with --libvirt: libvirt URI, local or qemu+ssh://[USER@]HOST/system (default: virsh default)',
    )
    .option('--format <format>', 'declare the format (raw or qcow2) of every --disk image without a prefix')
    .option('--disks <list>', 'with --libvirt: back up only these disks (targets, e.g. vda,vdb)', collect, [])
    .option('--exclude <list>', 'with --libvirt: leave these disks out (e.g. vdb)', collect, [])
    .option('--no-freeze', 'with --libvirt: do not freeze guest filesystems through the guest agent')
    .option(
      '--scratch-dir <dir>',
      'with --libvirt: where the backup job keeps scratch files (default /var/tmp)',
    )
    .option(
      '--nbd-tls <dir>',
      'with a remote --connect: read the disks over NBD+TLS (x509 client certificates in DIR: ca-cert.pem, client-cert.pem, client-key.pem) instead of through ssh; the default for qemu+tls:// (with its ?pkipath=DIR)',
    )
    .option(
      '--insecure-tcp',
      'with a remote --connect: read the disks over plain NBD/TCP. The disk contents cross the network UNENCRYPTED and UNAUTHENTICATED: anyone on the path can read them, and anyone who reaches the port can read the disks during the backup',
    )
    .option(
      '--nbd-ports <min-max>',
      'with --nbd-tls/--insecure-tcp/qemu+tls: TCP ports the NBD server on the hypervisor may use (default 10809-10872)',
    )
    .option('--json', 'machine-readable summary');
}

const BACKUP_HELP = `
Levels: full starts a new chain; inc stores the changes since the previous checkpoint; diff the
changes since the chain's full; copy is a standalone full that no chain builds on; auto is inc when
possible, otherwise full.

libvirt: one pull-mode backup job covers all disks at one instant; each checkpoint creates a libvirt
checkpoint bkfs-<checkpoint uid>. cdrom, read-only and shareable disks are skipped; raw disks
only in full/copy. A shut-off domain gets a full (or copy) from its images.

Image formats: declare them (NAME=raw:IMAGE, NAME=qcow2:IMAGE or --format). An undeclared image is
probed; one that probes as an image referring to other files (backing file, data file) is refused
(exit 25): a guest can write such a header into its raw disk to make bkfs read a host file.

Examples:
  bkfs backup web --disk vda=/var/lib/libvirt/images/web.qcow2 --level full
  bkfs backup web --disk vda=raw:/var/lib/libvirt/images/data.img --level full
  bkfs backup web --disk vda=/var/lib/libvirt/images/web.qcow2          # auto: incremental
  bkfs backup db --disk vda=nbd+unix:///vda?socket=/run/x.sock --level full
  bkfs backup web --libvirt web --level full
  bkfs backup --libvirt web                                               # VM name = domain name
  bkfs backup --libvirt web --connect 'qemu+ssh://root@kvm1/system?keyfile=/root/.ssh/bkfs'
  bkfs backup --libvirt web --connect 'qemu+tls://kvm1/system?pkipath=/etc/pki/bkfs'      # NBD+TLS
  bkfs backup --libvirt web --connect qemu+ssh://root@kvm1/system --nbd-tls /etc/pki/bkfs
  bkfs backup web --libvirt web --exclude vdb                             # auto: incremental`;

/** Checks the arguments before anything runs; returns the VM name. */
function backupVm(vmArg: string | undefined, opts: BackupCliOptions): string {
  if (vmArg === undefined && opts.libvirt === undefined) {
    throw new BkfsError('USAGE', 'backup needs a VM name (or --libvirt DOMAIN, whose name it then takes)');
  }
  const vm = vmArg ?? (opts.libvirt as string);
  if (vm.includes('@')) {
    throw new BkfsError(
      'USAGE',
      `backup takes a VM name, got '${vm}' (name the new checkpoint with --checkpoint NAME)`,
    );
  }
  if (!LEVELS.includes(opts.level)) {
    throw new BkfsError('USAGE', `--level must be one of ${LEVELS.join(', ')}, got '${opts.level}'`);
  }
  checkModeOptions(opts);
  if (opts.libvirt === undefined && opts.disk.length === 0) {
    throw new BkfsError('USAGE', 'no disks to back up (give --disk NAME=SOURCE or --libvirt DOMAIN)');
  }
  return vm;
}

/** `--config NAME=FILE` (or FILE, saved under its base name): the files' contents. */
function readConfigs(specs: string[]): { name: string; data: Buffer }[] {
  return specs.map((c) => {
    const eq = c.indexOf('=');
    const name = eq > 0 ? c.slice(0, eq) : path.basename(c);
    const file = eq > 0 ? c.slice(eq + 1) : c;
    if (!fs.existsSync(file)) throw new BkfsError('USAGE', `configuration file ${file} does not exist`);
    return { name, data: fs.readFileSync(file) };
  });
}

/** What the engine and the libvirt backup share: the checkpoint to make, with the job's callbacks. */
type CommonBackupOptions = Pick<BackupOptions, 'vm' | 'level' | 'checkpoint' | 'configs'> & LongJob;

/** What a backup ran, for its summary. */
interface BackupOutcome {
  res: BackupResult;
  diskCount: number;
  extra: string[];
  libvirt: LibvirtBackupResult | undefined;
}

async function libvirtBackup(
  cmd: Command,
  { backupLibvirt }: typeof import('../../backup/libvirt'),
  domain: string,
  opts: BackupCliOptions,
  common: CommonBackupOptions,
): Promise<BackupOutcome> {
  const nbdPorts =
    opts.nbdPorts !== undefined
      ? (await import('../../backup/libvirt-plan')).parsePortRange(opts.nbdPorts)
      : undefined;
  const lv = await retryLocked(cmd, () =>
    withRepo(cmd, (repo) =>
      backupLibvirt(repo, {
        ...common,
        domain,
        ...(opts.connect !== undefined ? { connect: opts.connect } : {}),
        ...(opts.disks.length > 0 ? { disks: opts.disks } : {}),
        ...(opts.exclude.length > 0 ? { exclude: opts.exclude } : {}),
        freeze: opts.freeze,
        ...(opts.scratchDir !== undefined ? { scratchDir: opts.scratchDir } : {}),
        ...(opts.nbdTls !== undefined ? { nbdTls: path.resolve(opts.nbdTls) } : {}),
        ...(opts.insecureTcp ? { insecureTcp: true } : {}),
        ...(nbdPorts !== undefined ? { nbdPorts } : {}),
      }),
    ),
  );
  const line =
    `  libvirt   domain ${lv.domain}, disks ${lv.disks.join(', ')}, ${lv.consistency}` +
    (lv.libvirtCheckpoint ? `, checkpoint ${lv.libvirtCheckpoint}` : ', no libvirt checkpoint');
  return { res: lv, diskCount: lv.disks.length, extra: [line], libvirt: lv };
}

function printBackupJson(vm: string, { res, diskCount, libvirt }: BackupOutcome): void {
  const cp = res.checkpoint;
  printJson({
    vm,
    checkpoint: cp.name,
    level: res.level,
    time: cp.started,
    durationMs: res.durationMs,
    disks: diskCount,
    virtualSize: res.virtualSize,
    bytesRead: res.bytesRead,
    bytesZero: res.bytesZero,
    chunks: res.chunks,
    libvirt: libvirt
      ? {
          domain: libvirt.domain,
          disks: libvirt.disks,
          consistency: libvirt.consistency,
          checkpoint: libvirt.libvirtCheckpoint ?? null,
        }
      : null,
  });
}

function printBackup(vm: string, { res, diskCount, extra }: BackupOutcome): void {
  const secs = res.durationMs / 1000;
  const st = res.chunks;
  out(
    `${vm}@${res.checkpoint.name}: ${res.level} backup of ${diskCount} disk(s), ${bytes(res.virtualSize)} virtual`,
  );
  out(
    `  read      ${bytes(res.bytesRead)} in ${duration(res.durationMs)} (${rate(res.bytesRead / Math.max(secs, 0.001))}), ${bytes(res.bytesZero)} zeros skipped`,
  );
  out(
    `  new data  ${bytes(st.newRawBytes)} in ${st.newChunks} chunks, stored as ${bytes(st.newStoredBytes)} (compression ${ratio(st.newRawBytes, st.newStoredBytes)})`,
  );
  out(`  dedup     ${bytes(st.dedupBytes)} in ${st.dedupChunks} chunks already stored`);
  for (const l of extra) out(l);
}

async function backupAction(vmArg: string | undefined, opts: BackupCliOptions, cmd: Command): Promise<void> {
  const vm = backupVm(vmArg, opts);
  const disks =
    opts.libvirt === undefined ? await parseDiskSpecs(opts.disk, opts.bitmap ?? null, opts.format) : [];
  // qemu-img info of each image runs while the engine's modules load and the repository opens.
  for (const d of disks) d.source.startProbe?.();
  const configs = readConfigs(opts.config);
  const { runBackup } = await import('../../backup/engine');
  const libvirtModule = await import('../../backup/libvirt');
  const outcome = await withLongJob(`backup ${vm}`, async (job): Promise<BackupOutcome> => {
    const common: CommonBackupOptions = {
      vm,
      level: opts.level as Level | 'auto',
      ...(opts.checkpoint !== undefined ? { checkpoint: opts.checkpoint } : {}),
      configs,
      ...job,
    };
    if (opts.libvirt !== undefined) return libvirtBackup(cmd, libvirtModule, opts.libvirt, opts, common);
    const r: BackupResult = await retryLocked(cmd, () =>
      withRepo(cmd, (repo) => runBackup(repo, { ...common, disks })),
    );
    return { res: r, diskCount: disks.length, extra: [], libvirt: undefined };
  });
  if (opts.json) printBackupJson(vm, outcome);
  else printBackup(vm, outcome);
}

export function registerBackup(program: Command): void {
  backupOptions(
    program
      .command('backup')
      .description('back up the disks of a VM into a new checkpoint')
      .argument('[vm]', 'VM name in the repository (default with --libvirt: the domain name)'),
  )
    .addHelpText('after', BACKUP_HELP)
    .action(backupAction);
}
