/**
 * Repository lifecycle commands: forget, protect/unprotect, gc (prune), repair, stats.
 * Thin adapters over `src/repo/{forget,gc,rebuild,manifest,stats}.ts`; the only printing is here.
 */
import type { Command } from 'commander';
import * as fs from 'node:fs';
import { BkfsError } from '../../errors';
import type { ForgetResult } from '../../repo/forget';
import type { GcReport } from '../../repo/gc';
import type { RebuildReport } from '../../repo/rebuild';
import type { RepoStats, Totals } from '../../repo/stats';
import type { RetentionPolicy } from '../../repo/retention';
import type { Repository } from '../../repo/repository';
import { bytes, localTime, ratio } from '../../util/format';
import { ProgressBar } from '../progress';
import { note, out, parseIntOption, repoPath, retryLocked, table, withReader, withRepo } from '../context';
import { printJson } from '../json';

interface ForgetCli {
  keepLast?: string;
  keepHourly?: string;
  keepDaily?: string;
  keepWeekly?: string;
  keepMonthly?: string;
  keepYearly?: string;
  keepWithin?: string;
  dryRun?: boolean;
  prune?: boolean;
  json?: boolean;
}

function printForget(r: ForgetResult): void {
  const rows: { vm: string; t: number; cells: string[] }[] = [];
  for (const k of r.kept)
    rows.push({
      vm: k.vm,
      t: k.time,
      cells: ['keep', `${k.vm}@${k.name}`, k.level, localTime(k.time), k.reasons.join(',')],
    });
  for (const k of r.removed) {
    rows.push({
      vm: k.vm,
      t: k.time,
      cells: [
        r.dryRun ? 'would remove' : 'removed',
        `${k.vm}@${k.name}`,
        k.level,
        localTime(k.time),
        k.pinned ? 'in use by a reader: hidden now, deleted by gc once released' : '',
      ],
    });
  }
  // By VM, then oldest first (as `list`), not by name: check10 comes after check9.
  rows.sort((a, b) => (a.vm < b.vm ? -1 : a.vm > b.vm ? 1 : a.t - b.t));
  if (rows.length > 0)
    out(
      table(
        ['ACTION', 'CHECKPOINT', 'LEVEL', 'TIME', 'WHY'],
        rows.map((x) => x.cells),
      ),
    );
  const n = r.removed.length;
  if (r.dryRun) out(`dry run: ${n} checkpoint(s) would be forgotten, ${r.kept.length} kept; nothing changed`);
  else out(`forgot ${n} checkpoint(s)${r.kept.length ? `, kept ${r.kept.length}` : ''}`);
}

function printGc(r: GcReport): void {
  const verb = r.dryRun ? 'would free' : 'freed';
  if (r.checkpointsRemoved || r.checkpointsPinned) {
    out(
      `forgotten checkpoints: ${r.checkpointsRemoved} removed${r.checkpointsPinned ? `, ${r.checkpointsPinned} still in use by readers` : ''}`,
    );
  }
  out(`chunks: ${r.chunksRemoved} unused (${bytes(r.chunkBytesRemoved)} stored)`);
  if (r.chunksWaiting) {
    out(
      `${r.chunksWaiting} more unused chunk(s) kept until the backups running when gc marked them end (a later gc deletes them)`,
    );
  }
  out(
    `packs: ${r.packsDeleted} deleted, ${r.packsRewritten} rewritten into ${r.packsWritten} (${bytes(r.bytesCopied)} copied${r.packsSmallMerged ? `, ${r.packsSmallMerged} of them small packs merged` : ''})` +
      (r.packsKeptForReaders ? `, ${r.packsKeptForReaders} kept while readers use them` : '') +
      (r.packsKeptDamaged ? `, ${r.packsKeptDamaged} kept because they hold damaged chunks` : '') +
      (r.orphansRemoved ? `, ${r.orphansRemoved} left by a crash removed` : ''),
  );
  if (r.packsKeptUnused) {
    out(
      `${r.packsKeptUnused} pack(s) keep ${bytes(r.bytesKeptUnused)} unused, within --max-unused ${pct(r.maxUnused)}: not worth a rewrite`,
    );
  }
  if (r.extentsHealed) out(`healed ${r.extentsHealed} extent(s) of damaged chunks`);
  if (r.packsPending)
    out(`${r.packsPending} old pack(s) (${bytes(r.bytesPending)}) wait for readers to finish`);
  out(
    `${verb} ${bytes(r.bytesFreed)}; packs now ${bytes(r.bytesAfter)}${r.dryRun ? ' (dry run: nothing changed)' : ''}`,
  );
}

function pct(f: number): string {
  return `${Math.round(f * 1000) / 10} %`;
}

/**
 * Default of `gc --max-unused`: DEFAULT_MAX_UNUSED of src/repo/gc.ts, written out so that `--help`
 * does not load gc (test/unit/gc-select.test.ts checks they agree).
 */
export const DEFAULT_MAX_UNUSED_OPTION = '5%';

/** `--max-unused`: a percentage ('20', '20%', '2.5%') or 'unlimited'; returns a fraction. */
export function parseMaxUnused(v: string): number {
  if (v === 'unlimited') return 1;
  const m = /^(\d+(?:\.\d+)?)\s*%?$/.exec(v.trim());
  const n = m ? Number(m[1]) : NaN;
  if (!(n >= 0 && n <= 100)) {
    throw new BkfsError('USAGE', `--max-unused takes a percentage from 0 to 100 or 'unlimited', got '${v}'`);
  }
  return n / 100;
}

function count(name: string, v: string | undefined): number | undefined {
  return v === undefined ? undefined : parseIntOption(name, v);
}

/** The retention policy of `forget --keep-*`; an empty policy when none is given. */
async function forgetPolicy(opts: ForgetCli): Promise<RetentionPolicy> {
  const policy: RetentionPolicy = {};
  const { KEEP_COUNT_FLAGS, parseKeepWithin } = await import('../../repo/retention');
  for (const [key, flag] of KEEP_COUNT_FLAGS) {
    const n = count(flag, opts[key]);
    if (n !== undefined) policy[key] = n;
  }
  if (opts.keepWithin !== undefined) {
    try {
      policy.keepWithin = parseKeepWithin(opts.keepWithin);
    } catch (e) {
      throw new BkfsError('USAGE', `--${(e as Error).message}`);
    }
  }
  return policy;
}

async function forgetAction(refs: string[], opts: ForgetCli, cmd: Command): Promise<void> {
  const policy = await forgetPolicy(opts);
  const byPolicy = Object.keys(policy).length > 0;
  if (byPolicy && (refs.length > 1 || refs.some((r) => r.includes('@')))) {
    throw new BkfsError('USAGE', 'with --keep-* give at most one VM name, not checkpoints');
  }
  if (!byPolicy && refs.length === 0) {
    throw new BkfsError(
      'USAGE',
      'give checkpoints (VM@CHECKPOINT) or a policy (--keep-last, --keep-daily, ...)',
    );
  }
  const { forgetByName, forgetByPolicy } = await import('../../repo/forget');
  const { runGc } = await import('../../repo/gc');
  await withRepo(cmd, async (repo) => {
    const dry = opts.dryRun === true ? { dryRun: true } : {};
    const r = await retryLocked(cmd, () =>
      byPolicy ? forgetByPolicy(repo, refs[0], policy, dry) : forgetByName(repo, refs, dry),
    );
    let gc: GcReport | undefined;
    if (opts.prune && !opts.dryRun) gc = await retryLocked(cmd, () => runGc(repo));
    if (opts.json) {
      printJson(gc ? { ...r, gc } : r);
      return;
    }
    printForget(r);
    if (gc) printGc(gc);
    else if (!r.dryRun && r.removed.length > 0) out("run 'bkfs gc' to free their space");
  });
}

function registerForget(program: Command): void {
  program
    .command('forget')
    .description('remove checkpoints from the catalogue, by name or by a retention policy (then run gc)')
    .argument('[refs...]', 'VM@CHECKPOINT to forget; with --keep-*: an optional VM (default: every VM)')
    .option('--keep-last <n>', 'keep the n newest checkpoints')
    .option('--keep-hourly <n>', 'keep the newest checkpoint of each of the last n hours that have one')
    .option('--keep-daily <n>', 'keep the newest checkpoint of each of the last n days that have one')
    .option('--keep-weekly <n>', 'same per ISO week')
    .option('--keep-monthly <n>', 'same per month')
    .option('--keep-yearly <n>', 'same per year')
    .option(
      '--keep-within <span>',
      "keep every checkpoint not older than span before the VM's newest, e.g. 14d, 36h, 1y6m (y m d h)",
    )
    .option('-n, --dry-run', 'show what would be forgotten; change nothing')
    .option('--prune', 'run gc afterwards')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Every kept checkpoint stays complete whatever is forgotten (each has a full block map). Protected
checkpoints are kept by every policy and refused by name. A checkpoint in use by a mount or restore
disappears from the catalogue at once; its data goes at the first gc after the reader ends.

Examples:
  bkfs forget web@check3 web@check4
  bkfs forget web --keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
  bkfs forget web --keep-hourly 24 --keep-within 30d --keep-yearly 5
  bkfs forget --keep-daily 14 --prune        # every VM, then free the space`,
    )
    .action(forgetAction);
}

/** `protect` (value true) or `unprotect` (false). */
function registerProtect(program: Command, value: boolean): void {
  const name = value ? 'protect' : 'unprotect';
  program
    .command(name)
    .description(
      value
        ? 'protect checkpoints: no retention policy removes them and forget by name refuses them'
        : 'remove the protection of checkpoints',
    )
    .argument('<refs...>', 'VM@CHECKPOINT')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Examples:
  bkfs ${name} web@check1
  bkfs ${name} web@check1 db@check7 --json`,
    )
    .action(async (refs: string[], opts: { json?: boolean }, cmd: Command) => {
      const { setProtected } = await import('../../repo/forget');
      await withRepo(cmd, async (repo) => {
        const changed = await retryLocked(cmd, () => setProtected(repo, refs, value));
        const names = changed.map((c) => `${c.vm}@${c.name}`);
        if (opts.json) {
          printJson({ protected: value, changed: changed.map((c) => ({ vm: c.vm, name: c.name })) });
          return;
        }
        if (names.length === 0) out(`nothing to do: already ${value ? 'protected' : 'unprotected'}`);
        else out(`${value ? 'protected' : 'unprotected'} ${names.join(', ')}`);
      });
    });
}

interface GcCli {
  dryRun?: boolean;
  json?: boolean;
  maxUnused: string;
  repackSmall?: boolean;
}

async function gcAction(opts: GcCli, cmd: Command): Promise<void> {
  const maxUnused = parseMaxUnused(opts.maxUnused);
  const { runGc } = await import('../../repo/gc');
  const bar = new ProgressBar('gc');
  try {
    const r = await retryLocked(cmd, () =>
      withRepo(cmd, (repo) =>
        runGc(repo, {
          ...(opts.dryRun ? { dryRun: true } : {}),
          maxUnused,
          ...(opts.repackSmall ? { repackSmall: true } : {}),
          onProgress: (d, t) => bar.update(d, t),
          onNotice: (m) => {
            bar.done();
            note(m);
          },
        }),
      ),
    );
    bar.done();
    if (opts.json) printJson(r);
    else printGc(r);
  } finally {
    bar.done();
  }
}

function registerGc(program: Command): void {
  program
    .command('gc')
    .alias('prune')
    .description('delete data that no checkpoint uses and compact packs (runs beside backups)')
    .option('-n, --dry-run', 'show what would be freed; change nothing')
    .option(
      '--max-unused <percent>',
      `leave at most this share of the packs unused, rewriting the emptiest first (0: rewrite every pack with unused bytes; 'unlimited': none)`,
      DEFAULT_MAX_UNUSED_OPTION,
    )
    .option('--repack-small', 'also merge small packs (under 80 % of the 64 MiB target) into full ones')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Packs without any used chunk are always deleted. Partly unused packs are rewritten (their used
chunks copied into new packs), the emptiest first, only until what stays unused is within
--max-unused of the packs' size (as restic's prune): rewriting a 64 MiB pack to free a few KiB
costs more than it saves.

gc runs beside backups: chunks no checkpoint uses while backups run become deletion candidates
that a later gc deletes once those backups have ended (a backup that uses one keeps it). One
maintenance command (gc, forget, protect, verify's damage marking) runs at a time: another fails
with exit code 7 (REPO_LOCKED, see --retry-lock). Mounts and restores keep working:
whatever their checkpoints use is kept, and packs they may be reading are only rewritten or
deleted once they are done (a later gc finishes the job).

Examples:
  bkfs gc --dry-run
  bkfs gc
  bkfs gc --max-unused 0 --repack-small
  bkfs --retry-lock 10m gc --json`,
    )
    .action(gcAction);
}

function printRebuild(r: RebuildReport): void {
  out(
    `rebuilt the index: ${r.checkpoints} checkpoint(s) of ${r.vms} VM(s) from ${r.manifests} manifest(s), ${r.chunks} chunks in ${r.packs} pack(s)`,
  );
  if (r.skippedForgotten) out(`skipped ${r.skippedForgotten} manifest(s) of forgotten checkpoints`);
  if (r.duplicateChunks) out(`${r.duplicateChunks} duplicate chunk copies (gc removes them)`);
  for (const p of r.problems) out(`problem: ${p}`);
  if (r.missingChunks) {
    out(`${r.missingChunks} chunk(s) are in no pack; damaged: ${r.damagedCheckpoints.join(', ')}`);
  }
  if (r.oldIndex) out(`the old index is kept as ${r.oldIndex}`);
}

interface RepairCli {
  rebuildIndex?: boolean;
  manifests?: boolean;
  json?: boolean;
}

async function repairAction(opts: RepairCli, cmd: Command): Promise<void> {
  if (!opts.rebuildIndex && !opts.manifests) {
    throw new BkfsError('USAGE', 'say what to repair: --rebuild-index or --manifests');
  }
  const dir = repoPath(cmd);
  let rebuilt: object | undefined;
  if (opts.rebuildIndex) {
    const { rebuildIndex } = await import('../../repo/rebuild');
    const bar = new ProgressBar('rebuild');
    const r = await retryLocked(cmd, () => rebuildIndex(dir, { onProgress: (_p, d, t) => bar.update(d, t) }));
    bar.done();
    if (opts.json) {
      if (opts.manifests) rebuilt = r;
      else printJson(r);
    } else printRebuild(r);
  }
  if (opts.manifests) {
    const manifest = await import('../../repo/manifest');
    const written = await retryLocked(cmd, () =>
      withRepo(cmd, (repo) => writeMissingManifests(repo, manifest)),
    );
    if (!opts.json)
      out(`wrote ${written.length} missing manifest(s)${written.length ? `: ${written.join(', ')}` : ''}`);
    else printJson({ ...rebuilt, written });
  }
}

function registerRepair(program: Command): void {
  program
    .command('repair')
    .description('repair the index: rebuild it from packs and manifests, or rewrite missing manifests')
    .option('--rebuild-index', 'recreate index.db from the manifests and packs (the old one is kept aside)')
    .option('--manifests', 'write the manifest of every checkpoint that lacks one')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Examples:
  bkfs repair --manifests
  bkfs repair --rebuild-index`,
    )
    .action(repairAction);
}

function statsLine(label: string, t: Totals): string {
  return `${label}: ${t.checkpoints} checkpoint(s), logical ${bytes(t.logicalBytes)}, unique ${bytes(t.rawBytes)} in ${t.chunks} chunks, stored ${bytes(t.storedBytes)} (dedup ${ratio(t.logicalBytes, t.rawBytes)}, compression ${ratio(t.rawBytes, t.storedBytes)}, total ${ratio(t.logicalBytes, t.storedBytes)})`;
}

function printStats(s: RepoStats, vm: string | undefined): void {
  if (vm === undefined) {
    const r = s.repository;
    out(statsLine('repository', r));
    out(`packs: ${r.packs} file(s), ${bytes(r.packBytes)}; reclaimable by gc ${bytes(r.reclaimableBytes)}`);
    const e = r.encryption;
    out(
      e.encrypted
        ? `encryption: ${e.cipher}, key id ${e.keyId}, ${e.slots} key slot(s)`
        : 'encryption: none (plain repository)',
    );
  }
  for (const v of s.vms) out(`${statsLine(`VM ${v.vm}`, v)}; only this VM: ${bytes(v.uniqueStoredBytes)}`);
  if (s.checkpoints.length > 0) {
    out('');
    out(
      table(
        ['CHECKPOINT', 'LEVEL', 'TIME', 'VIRTUAL', 'LOGICAL', 'ONLY HERE (STORED)', 'FLAGS'],
        s.checkpoints.map((c) => [
          `${c.vm}@${c.name}`,
          c.level,
          localTime(c.time),
          bytes(c.virtualSize),
          bytes(c.logicalBytes),
          bytes(c.uniqueStoredBytes),
          [c.protected ? 'protected' : '', c.damaged ? 'DAMAGED' : ''].filter(Boolean).join(',') || '-',
        ]),
      ),
    );
  }
}

function registerStats(program: Command): void {
  program
    .command('stats')
    .description('logical and stored size, dedup and compression, per VM and per checkpoint')
    .argument('[vm]', 'only this VM')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Examples:
  bkfs stats
  bkfs stats web
  bkfs stats --json | jq .repository.storedBytes`,
    )
    .action(async (vm: string | undefined, opts: { json?: boolean }, cmd: Command) => {
      const { repositoryStats } = await import('../../repo/stats');
      await withReader(cmd, async (repo) => {
        if (vm !== undefined && !repo.db.prepare('SELECT 1 FROM vms WHERE name = ?').get(vm)) {
          throw new BkfsError('NOT_FOUND', `no VM named '${vm}' in this repository`);
        }
        const s = await repositoryStats(repo, vm);
        if (opts.json) printJson(s);
        else printStats(s, vm);
      });
    });
}

/** forget, protect, unprotect, gc (alias prune), repair, stats (in this order: the order of `bkfs --help`). */
export function registerLifecycle(program: Command): void {
  registerForget(program);
  registerProtect(program, true);
  registerProtect(program, false);
  registerGc(program);
  registerRepair(program);
  registerStats(program);
}

/** `repair --manifests`: write the manifest of each complete checkpoint that has none. */
function writeMissingManifests(
  repo: Repository,
  { manifestPath, rewriteManifest }: typeof import('../../repo/manifest'),
): string[] {
  repo.lockWriter('repair --manifests');
  try {
    const rows = repo.db
      .prepare(
        "SELECT c.id, c.uid, c.name, v.name AS vm FROM checkpoints c JOIN vms v ON v.id = c.vm_id WHERE c.state = 'complete' ORDER BY c.id",
      )
      .all() as { id: number; uid: string; name: string; vm: string }[];
    const written: string[] = [];
    for (const r of rows) {
      if (fs.existsSync(manifestPath(repo.dir, r.uid))) continue;
      rewriteManifest(repo, r.id);
      written.push(`${r.vm}@${r.name}`);
    }
    return written;
  } finally {
    repo.unlockWriter();
  }
}
