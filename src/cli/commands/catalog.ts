import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { CheckpointRow } from '../../index/catalog';
import type { Repository } from '../../repo/repository';
import { bytes, duration, localTime } from '../../util/format';
import { out, table, withReader } from '../context';
import { printJson } from '../json';

type Catalog = typeof import('../../index/catalog');

/** `time` as ISO-8601, in its place among the fields (the JSON convention of every command). */
function describe(cat: Catalog, repo: Repository, vm: string, cp: CheckpointRow) {
  return { ...cat.describeCheckpoint(repo.db, vm, cp), time: new Date(cp.started).toISOString() };
}

export function registerCatalog(program: Command): void {
  program
    .command('list')
    .alias('snapshots')
    .description('list checkpoints (of one VM, or of all), oldest first')
    .argument('[vm]', 'VM name')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Times are local (TZ is honoured) with their UTC offset; --json gives ISO 8601 UTC times.

Examples:
  bkfs list
  bkfs list web
  TZ=UTC bkfs snapshots web
  bkfs list web --json | jq -r '.[].name'`,
    )
    .action(listAction);

  program
    .command('info')
    .description('show one checkpoint in detail')
    .argument('<ref>', 'VM or VM@CHECKPOINT')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Examples:
  bkfs info web
  bkfs info web@check3
  bkfs info web@check3 --json`,
    )
    .action(infoAction);
}

/** `bkfs list [VM]`: the checkpoints, oldest first, as a table or JSON. */
async function listAction(vmName: string | undefined, opts: { json?: boolean }, cmd: Command): Promise<void> {
  const cat = await import('../../index/catalog');
  const { getVm, listVms, listCheckpoints, parseCheckpointRef } = cat;
  await withReader(cmd, (repo) => {
    if (vmName !== undefined) {
      parseCheckpointRef(vmName); // 'web@' is a usage error like everywhere
      if (vmName.includes('@'))
        throw new BkfsError(
          'USAGE',
          `list takes a VM name, got '${vmName}' (see one checkpoint with 'bkfs info')`,
        );
    }
    const vms = vmName ? [getVm(repo.db, vmName)] : listVms(repo.db);
    const rows = vms.flatMap((vm) =>
      listCheckpoints(repo.db, vm.id).map((cp) => describe(cat, repo, vm.name, cp)),
    );
    if (opts.json) {
      printJson(rows);
      return;
    }
    if (rows.length === 0) {
      out(vmName ? `VM '${vmName}' has no checkpoints` : 'the repository has no checkpoints');
      return;
    }
    out(
      table(
        ['CHECKPOINT', 'LEVEL', 'PARENT', 'TIME', 'DISKS', 'VIRTUAL', 'READ', 'NEW STORED', 'TOOK', 'FLAGS'],
        rows.map((r) => [
          `${r.vm}@${r.name}`,
          r.level,
          r.parent ?? '-',
          localTime(Date.parse(r.time)),
          r.disks.map((d) => d.name).join(','),
          bytes(r.virtualSize),
          bytes(r.bytesRead),
          bytes(r.bytesNewStored),
          duration(r.durationMs),
          [r.protected ? 'protected' : '', r.damaged ? 'DAMAGED' : ''].filter(Boolean).join(',') || '-',
        ]),
      ),
    );
  });
}

/** `bkfs info VM[@CP]`: one checkpoint in detail. */
async function infoAction(ref: string, opts: { json?: boolean }, cmd: Command): Promise<void> {
  const cat = await import('../../index/catalog');
  const { resolveRef, getConfigs } = cat;
  await withReader(cmd, (repo) => {
    const { vm, checkpoint } = resolveRef(repo.db, ref);
    const d = describe(cat, repo, vm.name, checkpoint);
    const configs = getConfigs(repo.db, checkpoint.id).map((c) => ({
      name: c.name,
      size: c.data.length,
    }));
    if (opts.json) {
      printJson({ ...d, configs });
      return;
    }
    out(`checkpoint  ${d.vm}@${d.name}`);
    out(`level       ${d.level}${d.parent ? ` (parent ${d.parent})` : ''}`);
    out(`time        ${localTime(Date.parse(d.time))} (took ${duration(d.durationMs)})`);
    out(
      `read        ${bytes(d.bytesRead)}; new data ${bytes(d.bytesNewRaw)} stored as ${bytes(d.bytesNewStored)} (${d.chunksNew} chunks)`,
    );
    if (d.libvirtCheckpoint) out(`libvirt     checkpoint ${d.libvirtCheckpoint}`);
    for (const k of d.disks) {
      out(
        `disk ${k.name}  ${bytes(k.virtualSize)} virtual, ${bytes(k.bytesRead)} read, from ${k.source ?? '?'} (${k.format ?? '?'})${k.bitmap ? `, bitmap ${k.bitmap}` : ''}`,
      );
    }
    for (const c of configs) out(`config ${c.name}  ${bytes(c.size)}`);
  });
}
