/**
 * `bkfs instant-restore VM@CP --to DIR [--define NAME] [--start]`: run a libvirt VM straight from a
 * checkpoint and copy its disks into DIR while it runs (core: src/restore/instant.ts). The export
 * is a `bkfs serve` daemon (the same code and state files as `bkfs serve`) on DIR/bkfs-instant.sock.
 * `--status [NAME]` shows the restores known here, `--resume NAME` finishes one.
 */
import * as path from 'node:path';
import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { ServeState } from '../../nbd/serve';
import type {
  InstantHooks,
  InstantProgress,
  InstantResult,
  InstantState,
  InstantStatus,
} from '../../restore/instant';
import { bytes, duration } from '../../util/format';
import { ProgressBar } from '../progress';
import { interruptSignal, note, out, repoPath, withReader } from '../context';
import { printJson } from '../json';
import { bkfsBin } from './serve';

interface InstantCliOptions {
  to?: string;
  define?: string;
  start?: boolean;
  bandwidth?: string;
  status?: string | boolean;
  resume?: string;
  json?: boolean;
}

async function hooks(json: boolean, signal: AbortSignal, bar: ProgressBar | null): Promise<InstantHooks> {
  const { listServes, serveLogPath, stopServe } = await import('../../nbd/serve');
  const { startDaemon } = await import('../../fuse/daemon');
  const { qemuOwner } = await import('../../restore/instant');
  const owner = await qemuOwner();
  const listen = (s: InstantState) => `unix:${s.socket}`;
  return {
    signal,
    async startExport(s) {
      await startDaemon<ServeState>({
        command: process.execPath,
        args: [
          bkfsBin(),
          '-r',
          s.repo,
          'serve',
          s.ref,
          '--listen',
          listen(s),
          '--foreground',
          ...(owner ? ['--socket-owner', `${owner.uid}:${owner.gid}`] : []),
          '--ready-fd',
          '3',
        ],
        logFile: serveLogPath(listen(s)),
        repoDir: s.repo,
      });
    },
    exportAlive: (s) => listServes().some((x) => x.listen === listen(s)),
    async stopExport(s) {
      await stopServe(listen(s));
    },
    onProgress(p: InstantProgress) {
      if (json) process.stderr.write(JSON.stringify({ progress: p }) + '\n');
      else bar?.update(p.done, p.total);
    },
    onNotice(line) {
      bar?.done();
      if (json) process.stderr.write(JSON.stringify({ notice: line }) + '\n');
      else note(line);
    },
  };
}

function printResult(r: InstantResult): void {
  out(`${r.ref} -> libvirt domain '${r.name}' (${r.phase})`);
  for (const d of r.disks)
    out(
      `  ${d.name}  ${bytes(d.size).padStart(10)}  ${d.overlay}${d.independent ? '' : '  (reads from the export)'}`,
    );
  if (r.startMs !== null) out(`  running after ${duration(r.startMs)}`);
  if (r.independentMs !== null)
    out(`  independent of the backup after ${duration(r.independentMs)}; export stopped`);
  if (r.phase === 'defined')
    out(`  defined, not started: 'bkfs instant-restore --resume ${r.name}' starts it and copies its disks`);
  out(`  state: ${r.stateFile}`);
}

function printStatus(s: InstantStatus): void {
  const dom = s.domain ? `${s.domain.state}${s.domain.reason ? ` (${s.domain.reason})` : ''}` : 'not defined';
  out(
    `${s.name}: ${s.phase}; domain ${dom}; export ${s.exportRunning ? `running on ${s.socket}` : 'stopped'}`,
  );
  out(`  from ${s.ref} (repository ${s.repo}), dir ${s.dir}`);
  for (const p of s.progress) {
    const pct = p.total > 0 ? Math.floor((p.done / p.total) * 100) : 100;
    const what = p.independent ? 'independent' : p.job ? `copying ${pct}%` : 'on the export, no copy running';
    out(`  ${p.name}  ${bytes(p.total).padStart(10)}  ${what}`);
  }
  if (s.lastError) out(`  last error: ${s.lastError}`);
}

export function registerInstantRestore(program: Command): void {
  program
    .command('instant-restore')
    .description('run a libvirt VM straight from a checkpoint and copy its disks into DIR while it runs')
    .argument('[ref]', 'VM or VM@CHECKPOINT (needs the saved domain.xml of a libvirt backup)')
    .option('-t, --to <dir>', 'directory for the disks (DIR/<disk>.qcow2), domain XML and state')
    .option('--define <name>', 'domain name (default: the saved one); a new name gets a new UUID and MACs')
    .option('--start', 'start the VM and copy its disks now (without: defined only; --resume starts it)')
    .option(
      '--bandwidth <MiB/s>',
      'limit the background copy (per disk, MiB/s; with --resume, 0 lifts the limit)',
    )
    .option('--status [name]', 'show the instant restores known here (or one)')
    .option('--resume <name>', 'restart the export if needed, start/resume the VM and finish the copy')
    .option('--json', 'machine-readable result on stdout; progress as JSON lines on stderr')
    .addHelpText(
      'after',
      `
The VM runs from qcow2 overlays in DIR whose backing is a bkfs NBD export of the checkpoint
(DIR/bkfs-instant.sock); QEMU copies every block into the overlays in the background
(virsh blockpull), guest writes included. When all disks are copied the overlays are standalone
images, the export stops and the VM no longer depends on bkfs or the backup. An export outage
pauses the VM (error policy 'stop') instead of failing its I/O; --resume restarts the export and
resumes it. DIR and its parents must be reachable by libvirt's QEMU user.

Examples:
  bkfs instant-restore web@check3 --to /var/lib/libvirt/images/web-now --define web-now --start
  bkfs instant-restore --status
  bkfs instant-restore --resume web-now`,
    )
    .action(async (ref: string | undefined, opts: InstantCliOptions, cmd: Command) => {
      const core = await import('../../restore/instant');
      const bandwidth = opts.bandwidth !== undefined ? Number(opts.bandwidth) : undefined;
      const minBw = opts.resume !== undefined ? 0 : 1; // --resume: 0 lifts the limit
      if (bandwidth !== undefined && !(Number.isInteger(bandwidth) && bandwidth >= minBw))
        throw new BkfsError('USAGE', `--bandwidth takes a whole number of MiB/s, got '${opts.bandwidth}'`);
      if (opts.status !== undefined) {
        if (ref !== undefined || opts.resume !== undefined)
          throw new BkfsError('USAGE', '--status takes no VM@CHECKPOINT and no --resume');
        const { listServes } = await import('../../nbd/serve');
        const alive = (s: InstantState) => listServes().some((x) => x.listen === `unix:${s.socket}`);
        const states =
          opts.to !== undefined
            ? [core.readStateDir(path.resolve(opts.to))]
            : typeof opts.status === 'string'
              ? [core.findState(opts.status)]
              : core.listStates();
        const all: InstantStatus[] = [];
        for (const s of states) all.push(await core.instantStatus(s, alive));
        if (opts.json) printJson(typeof opts.status === 'string' || opts.to !== undefined ? all[0] : all);
        else if (all.length === 0) out('no instant restore is known here');
        else all.forEach(printStatus);
        return;
      }
      const intr = interruptSignal();
      const bar = opts.json ? null : new ProgressBar(`copy`);
      try {
        const h = await hooks(opts.json ?? false, intr.signal, bar);
        let res: InstantResult;
        if (opts.resume !== undefined) {
          if (ref !== undefined) throw new BkfsError('USAGE', '--resume NAME takes no VM@CHECKPOINT');
          const s =
            opts.to !== undefined ? core.readStateDir(path.resolve(opts.to)) : core.findState(opts.resume);
          if (s.name !== opts.resume)
            throw new BkfsError(
              'USAGE',
              `${s.dir} holds the instant restore of '${s.name}', not '${opts.resume}'`,
            );
          res = await core.resumeInstant(s, h, bandwidth !== undefined ? { bandwidthMiB: bandwidth } : {});
        } else {
          if (ref === undefined)
            throw new BkfsError('USAGE', 'instant-restore needs VM@CHECKPOINT (or --status / --resume NAME)');
          if (opts.to === undefined) throw new BkfsError('USAGE', 'instant-restore needs --to DIR');
          const to = opts.to;
          const repoDir = path.resolve(repoPath(cmd));
          // The repository is open only to prepare; the copy reads through the export daemon.
          const prepared = await withReader(cmd, (repo) =>
            core.instantRestore(
              repo,
              {
                ref,
                dir: to,
                repoDir,
                ...(opts.define !== undefined ? { define: opts.define } : {}),
                start: opts.start ?? false,
                ...(bandwidth !== undefined ? { bandwidthMiB: bandwidth } : {}),
              },
              h,
            ),
          );
          res = await core.finishInstant(prepared, h);
        }
        bar?.done();
        if (opts.json) printJson(res);
        else printResult(res);
      } finally {
        bar?.done();
        intr.dispose();
      }
    });
}
