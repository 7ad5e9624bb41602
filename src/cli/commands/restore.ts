import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { FileFormat, RestoreResult } from '../../restore/engine';
import type { ExportResult } from '../../restore/export';
import { bytes, duration, rate } from '../../util/format';
import { out, parseIntOption, withLongJob, withReader } from '../context';
import { printJson } from '../json';
import type { SshTarget } from '../../backup/libvirt-plan';

interface RestoreCliOptions {
  to: string;
  disk?: string;
  format?: string;
  since?: string;
  verifyTarget?: boolean;
  force?: boolean;
  define?: string;
  connect?: string;
  concurrency?: string;
  mode?: string;
  json?: boolean;
}

interface ExportCliOptions {
  to: string;
  disk?: string;
  format: string;
  force?: boolean;
  json?: boolean;
}

function printRestore(r: RestoreResult): void {
  const written = r.disks.reduce((n, d) => n + d.bytesWritten, 0);
  const secs = Math.max(r.durationMs / 1000, 0.001);
  const what = r.since ? `incremental restore from ${r.vm}@${r.since}` : 'restore';
  out(`${r.vm}@${r.checkpoint}: ${what} of ${r.disks.length} disk(s) in ${duration(r.durationMs)}`);
  for (const d of r.disks) {
    const extra = r.since
      ? `, ${bytes(d.bytesZeroed)} zeroed; ${d.pagesCompared ?? 0} map page(s) compared, ${d.pagesSkipped ?? 0} identical skipped`
      : d.holes > 0
        ? `, ${bytes(d.holes)} left as holes`
        : `, ${bytes(d.bytesZeroed)} zeroed`;
    out(
      `  ${d.disk} -> ${d.target} (${d.format}, ${bytes(d.virtualSize)}): ${bytes(d.bytesWritten)} written${extra}, ${rate(d.bytesWritten / Math.max(d.durationMs / 1000, 0.001))}`,
    );
  }
  out(`  total     ${bytes(written)} written in ${duration(r.durationMs)} (${rate(written / secs)})`);
  for (const c of r.configs) out(`  config    ${c}`);
  if (r.defined) out(`  defined libvirt domain '${r.defined}'`);
  else if (r.domainXml)
    out(`  domain XML for the restored disks: ${r.domainXml} (virsh define it, or use --define NAME)`);
}

function printExport(r: ExportResult): void {
  out(`${r.vm}@${r.checkpoint}: exported as qcow2 chains into ${r.dir} in ${duration(r.durationMs)}`);
  for (const d of r.disks) {
    out(`  ${d.disk}: ${d.layers.length} layer(s), top ${d.top}`);
    for (const l of d.layers) {
      out(
        `    ${l.checkpoint}.qcow2  ${bytes(l.bytesWritten)} data, ${bytes(l.bytesZeroed)} zeros${l.backing ? `, backing ${l.backing}` : ''}`,
      );
    }
  }
  for (const c of r.configs) out(`  config    ${c}`);
}

export function registerRestore(program: Command): void {
  program
    .command('restore')
    .description('restore the disks of a checkpoint into files, qcow2 images or an NBD export')
    .argument('<ref>', 'VM or VM@CHECKPOINT')
    .requiredOption(
      '-t, --to <target>',
      'directory (all disks), file (with --disk), or nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH',
    )
    .option('-d, --disk <name>', 'restore only this disk (then --to is a file or an NBD URI)')
    .option('-f, --format <format>', 'raw (sparse) or qcow2 (default: raw, or qcow2 for a FILE.qcow2)')
    .option('--since <ref>', 'the target already holds VM@CHECKPOINT: write only what differs')
    .option(
      '--verify-target',
      'with --since: compare the target in full with that checkpoint instead of trusting its restore marker',
    )
    .option('--force', 'replace existing target files (and an existing libvirt domain with --define)')
    .option('--define <name>', 'define the restored VM in libvirt under this name (needs a saved domain.xml)')
    .option(
      '-c, --connect <uri>',
      'libvirt URI; qemu+ssh://[USER@]HOST/system writes the disks onto that host (--to is a path there)',
    )
    .option('--concurrency <n>', 'writes in flight (default 8)')
    .option('--mode <octal>', 'permission bits of restored image files (default 0600: owner only)')
    .option('--json', 'machine-readable summary')
    .addHelpText(
      'after',
      `
Without --disk, every disk is written to DIR/<disk>.raw (or .qcow2) together with the saved
configuration files; a saved libvirt domain.xml is rewritten to use the restored files
(DIR/domain.xml; the saved one is DIR/domain.orig.xml). Files are written as FILE.bkfs-partial and
renamed when complete. Every chunk is checked against its BLAKE3 hash as it is read.

Each restored file gets a marker FILE.bkfs-restore.json (checkpoint, block-map digest, the file's
size/mtime/ctime/inode). --since writes only the differences, so it needs proof that the target
holds that checkpoint unchanged: the marker, or a full comparison with --verify-target (the only
way for an NBD target). A file modified since (e.g. a VM booted from it) is refused (exit 26).

With --connect qemu+ssh://[USER@]HOST/system the disks are written onto that hypervisor (--to is
an absolute path there) through qemu-nbd on it, over the ssh connection (nothing else needs to be
reachable), and --define defines the domain there. Until every disk is written and flushed the
files are FILE.bkfs-partial; an interrupted or failed remote restore removes them (nothing existing
is replaced before that).

Examples:
  bkfs restore web@check3 --to /srv/restore/web
  bkfs restore web --disk vda --to /var/lib/libvirt/images/web-vda.qcow2
  bkfs restore web@check5 --disk vda --to web-vda.raw --since web@check3
  bkfs restore web --disk vda --to 'nbd+unix:///?socket=/run/web-vda.sock'
  bkfs restore web --to /var/lib/libvirt/images/web2 --format qcow2 --define web2
  bkfs restore web@check3 --connect qemu+ssh://root@kvm2/system --to /var/lib/libvirt/images/web2 --define web2`,
    )
    .action(restoreAction);

  registerExport(program);
}

function registerExport(program: Command): void {
  program
    .command('export')
    .description('export a checkpoint as a qcow2 backing chain (one layer per checkpoint of its chain)')
    .argument('<ref>', 'VM or VM@CHECKPOINT')
    .requiredOption('-t, --to <dir>', 'directory: DIR/<disk>/<checkpoint>.qcow2')
    .option('-f, --format <format>', 'qcow2-chain', 'qcow2-chain')
    .option('-d, --disk <name>', 'export only this disk')
    .option('--force', 'replace existing layer files')
    .option('--json', 'machine-readable summary')
    .addHelpText(
      'after',
      `
Each layer holds only its own checkpoint's changes and names the layer below by a relative path
(qemu-img create -b <previous>.qcow2 -F qcow2), so the directory can be moved. qemu-img convert
DIR/<disk>/<checkpoint>.qcow2 reads the disk as of that checkpoint.

Examples:
  bkfs export web@check4 --format qcow2-chain --to /srv/export/web`,
    )
    .action(async (ref: string, opts: ExportCliOptions, cmd: Command) => {
      if (opts.format !== 'qcow2-chain') {
        throw new BkfsError('USAGE', `--format must be qcow2-chain, got '${opts.format}'`);
      }
      const { runExport } = await import('../../restore/export');
      const res = await withLongJob(`export ${ref}`, (job) =>
        withReader(cmd, (repo) =>
          runExport(repo, {
            ref,
            to: opts.to,
            format: 'qcow2-chain',
            ...(opts.disk !== undefined ? { disk: opts.disk } : {}),
            force: opts.force ?? false,
            ...job,
          }),
        ),
      );
      if (opts.json) printJson(res);
      else printExport(res);
    });
}

/** `bkfs restore`: check the options, then restore locally (files, qcow2, NBD) or onto `--connect`. */
async function restoreAction(ref: string, opts: RestoreCliOptions, cmd: Command): Promise<void> {
  if (opts.format !== undefined && opts.format !== 'raw' && opts.format !== 'qcow2') {
    throw new BkfsError('USAGE', `--format must be raw or qcow2, got '${opts.format}'`);
  }
  const concurrency =
    opts.concurrency !== undefined ? parseIntOption('--concurrency', opts.concurrency) : undefined;
  if (concurrency === 0) throw new BkfsError('USAGE', '--concurrency must be at least 1');
  if (opts.mode !== undefined && !/^0?[0-7]{3}$/.test(opts.mode)) {
    throw new BkfsError('USAGE', `--mode must be octal permission bits like 0640, got '${opts.mode}'`);
  }
  const mode = opts.mode !== undefined ? parseInt(opts.mode, 8) : undefined;
  const { parseLibvirtUri } = await import('../../backup/libvirt-plan');
  const remote = opts.connect !== undefined ? parseLibvirtUri(opts.connect) : null;
  if (remote) {
    await restoreRemote(ref, opts, cmd, remote, concurrency);
    return;
  }
  const { runRestore } = await import('../../restore/engine');
  const res = await withLongJob(`restore ${ref}`, (job) =>
    withReader(cmd, (repo) =>
      runRestore(repo, {
        ref,
        to: opts.to,
        ...(opts.disk !== undefined ? { disk: opts.disk } : {}),
        ...(opts.format !== undefined ? { format: opts.format as FileFormat } : {}),
        ...(opts.since !== undefined ? { since: opts.since } : {}),
        ...(opts.verifyTarget ? { verifyTarget: true } : {}),
        ...(opts.define !== undefined ? { define: opts.define } : {}),
        ...(opts.connect !== undefined ? { connect: opts.connect } : {}),
        ...(concurrency !== undefined ? { concurrency } : {}),
        ...(mode !== undefined ? { mode } : {}),
        force: opts.force ?? false,
        ...job,
      }),
    ),
  );
  if (opts.json) printJson(res);
  else printRestore(res);
}

/** `bkfs restore --connect qemu+ssh://`: the disks written onto that hypervisor. */
async function restoreRemote(
  ref: string,
  opts: RestoreCliOptions,
  cmd: Command,
  remote: SshTarget,
  concurrency: number | undefined,
): Promise<void> {
  for (const [given, flag] of [
    [opts.since !== undefined, '--since'],
    [opts.verifyTarget, '--verify-target'],
    [opts.mode !== undefined, '--mode'],
  ] as const) {
    if (given) throw new BkfsError('USAGE', `${flag} does not apply to a restore onto a remote host`);
  }
  if (/^nbds?(\+unix)?:\/\//i.test(opts.to)) {
    throw new BkfsError('USAGE', '--to: with --connect qemu+ssh://, --to is a path on the remote host');
  }
  const { runRemoteRestore } = await import('../../restore/remote');
  const res = await withLongJob(`restore ${ref}`, (job) =>
    withReader(cmd, (repo) =>
      runRemoteRestore(repo, {
        ref,
        remote,
        to: opts.to,
        ...(opts.disk !== undefined ? { disk: opts.disk } : {}),
        ...(opts.format !== undefined ? { format: opts.format as FileFormat } : {}),
        ...(opts.define !== undefined ? { define: opts.define } : {}),
        ...(concurrency !== undefined ? { concurrency } : {}),
        force: opts.force ?? false,
        ...job,
      }),
    ),
  );
  if (opts.json) printJson(res);
  else printRestore(res);
}
