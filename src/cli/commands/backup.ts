import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import { runBackup, type DiskSpec } from '../../backup/engine';
import { sourceFor } from '../../backup/sources';
import type { Level } from '../../index/catalog';
import { bytes, duration, rate, ratio } from '../../util/format';
import { ProgressBar } from '../progress';
import { interruptSignal, note, out, withRepo } from '../context';

const LEVELS = ['full', 'inc', 'diff', 'copy', 'auto'];

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

export function parseDiskSpecs(specs: string[], bitmap: string | null): DiskSpec[] {
  return specs.map((s) => {
    const eq = s.indexOf('=');
    if (eq <= 0 || eq === s.length - 1) {
      throw new BkfsError('USAGE', `--disk takes NAME=SOURCE (an image path or an NBD URI), got '${s}'`);
    }
    return { name: s.slice(0, eq), source: sourceFor(s.slice(eq + 1), bitmap) };
  });
}

interface BackupCliOptions {
  disk: string[];
  level: string;
  checkpoint?: string;
  bitmap?: string;
  config: string[];
}

export function registerBackup(program: Command): void {
  program
    .command('backup')
    .description('back up the disks of a VM into a new checkpoint')
    .argument('<vm>', 'VM name in the repository')
    .option(
      '-d, --disk <name=source>',
      'disk to back up: NAME=IMAGE (qcow2/raw) or NAME=NBD-URI (repeatable)',
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
    .addHelpText(
      'after',
      `
Levels: full starts a new chain; inc stores the changes since the previous checkpoint; diff the
changes since the chain's full; copy is a standalone full that no chain builds on; auto is inc when
possible, otherwise full.

Examples:
  bkfs backup web --disk vda=/var/lib/libvirt/images/web.qcow2 --level full
  bkfs backup web --disk vda=/var/lib/libvirt/images/web.qcow2          # auto: incremental
  bkfs backup db --disk vda=nbd+unix:///vda?socket=/run/x.sock --level full`,
    )
    .action(async (vm: string, opts: BackupCliOptions, cmd: Command) => {
      if (!LEVELS.includes(opts.level)) {
        throw new BkfsError('USAGE', `--level must be one of ${LEVELS.join(', ')}, got '${opts.level}'`);
      }
      const disks = parseDiskSpecs(opts.disk, opts.bitmap ?? null);
      const configs = opts.config.map((c) => {
        const eq = c.indexOf('=');
        const name = eq > 0 ? c.slice(0, eq) : path.basename(c);
        const file = eq > 0 ? c.slice(eq + 1) : c;
        if (!fs.existsSync(file)) throw new BkfsError('USAGE', `configuration file ${file} does not exist`);
        return { name, data: fs.readFileSync(file) };
      });
      const bar = new ProgressBar(`backup ${vm}`);
      const intr = interruptSignal();
      try {
        const res = await withRepo(cmd, (repo) =>
          runBackup(repo, {
            vm,
            disks,
            level: opts.level as Level | 'auto',
            ...(opts.checkpoint !== undefined ? { checkpoint: opts.checkpoint } : {}),
            configs,
            signal: intr.signal,
            onProgress: (p) => bar.update(p.done, p.total),
            onNotice: (m) => {
              bar.done();
              note(m);
            },
          }),
        );
        bar.done();
        const secs = res.durationMs / 1000;
        const st = res.chunks;
        out(
          `${vm}@${res.checkpoint.name}: ${res.level} backup of ${disks.length} disk(s), ${bytes(res.virtualSize)} virtual`,
        );
        out(
          `  read      ${bytes(res.bytesRead)} in ${duration(res.durationMs)} (${rate(res.bytesRead / Math.max(secs, 0.001))}), ${bytes(res.bytesZero)} zeros skipped`,
        );
        out(
          `  new data  ${bytes(st.newRawBytes)} in ${st.newChunks} chunks, stored as ${bytes(st.newStoredBytes)} (compression ${ratio(st.newRawBytes, st.newStoredBytes)})`,
        );
        out(`  dedup     ${bytes(st.dedupBytes)} in ${st.dedupChunks} chunks already stored`);
      } finally {
        bar.done();
        intr.dispose();
      }
    });
}
