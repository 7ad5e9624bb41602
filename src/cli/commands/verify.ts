import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { SourceDiff, VerifyReport } from '../../repo/verify';
import type { Repository } from '../../repo/repository';
import { bytes } from '../../util/format';
import { ProgressBar } from '../progress';
import { out, repoPath, retryLocked, withRepo } from '../context';
import { printJson } from '../json';

export function registerVerify(program: Command): void {
  program
    .command('verify')
    .description('check the index and re-read and re-hash every chunk that the selection uses')
    .argument('[ref]', 'VM or VM@CHECKPOINT (default: everything)')
    .option('--sample <percent>', 're-read only a random share of the chunks')
    .option(
      '--source',
      "also compare the checkpoint (default: each selected VM's latest) with its source images as they are now",
    )
    .option('--json', 'machine-readable report')
    .option(
      '--read-only',
      'report only: record no damage in the index and take no lock (runs beside a backup or gc)',
    )
    .addHelpText(
      'after',
      `
Damaged chunks are reported with every checkpoint and disk range that uses them, and marked in the
index: 'bkfs list' shows those checkpoints as DAMAGED, and the next backup that reads the same data
stores it again and heals them. Marking needs the maintenance lock: verify fails with exit code 7
(REPO_LOCKED) while a forget or gc runs (see --retry-lock), unless --read-only (or this
user may not write the repository: then it only reads). Exit code 16 when anything is damaged or
differs from its source; with --source, exit code 24 when a source image no longer exists (and
nothing is damaged).

Examples:
  bkfs verify
  bkfs verify web --sample 10
  bkfs verify web@check3 --source
  bkfs verify --read-only --json`,
    )
    .action(verifyAction);
}

interface VerifyCliOptions {
  sample?: string;
  source?: boolean;
  json?: boolean;
  readOnly?: boolean;
}

/** `bkfs verify`: re-read the selection (and with --source compare it), print, exit by outcome. */
async function verifyAction(ref: string | undefined, opts: VerifyCliOptions, cmd: Command): Promise<void> {
  const { parseCheckpointRef } = await import('../../index/catalog');
  const { verifyRepository } = await import('../../repo/verify');
  const { canWriteRepository } = await import('../../repo/repository');
  const sel: { vm?: string; checkpoint?: string } = ref ? parseCheckpointRef(ref) : {};
  const sample = opts.sample === undefined ? undefined : Number(opts.sample);
  if (sample !== undefined && !(sample > 0 && sample <= 100)) {
    throw new BkfsError('USAGE', `--sample takes a percentage in (0, 100], got '${opts.sample}'`);
  }
  const bar = new ProgressBar('verify');
  let sources: SourceDiff[] | undefined;
  // Heals what it finds when this user may write the repository; reads only otherwise.
  // Recording damage takes the writer lock: --retry-lock applies.
  const rep = await withRepo(
    cmd,
    async (repo) => {
      const r = await retryLocked(cmd, () =>
        verifyRepository(repo, {
          ...(sel.vm !== undefined ? { vm: sel.vm } : {}),
          ...(ref?.includes('@') && sel.checkpoint === undefined ? { checkpoint: 'latest' } : {}),
          ...(sel.checkpoint !== undefined ? { checkpoint: sel.checkpoint } : {}),
          ...(sample !== undefined ? { samplePercent: sample } : {}),
          ...(opts.readOnly ? { markDamaged: false } : {}),
          onProgress: (d, t) => bar.update(d, t),
        }),
      );
      bar.done();
      if (opts.source) sources = await compareSources(repo, sel);
      return r;
    },
    { readOnly: opts.readOnly === true || !canWriteRepository(repoPath(cmd)) },
  );
  bar.done();
  if (opts.json) printJson(sources ? { ...rep, sources } : rep);
  else printVerify(rep, sources);
  verifyOutcome(rep, sources);
  if (!opts.json) out('no damage found');
}

/** --source: an explicit checkpoint, else the latest of each selected VM, against its images now. */
async function compareSources(
  repo: Repository,
  sel: { vm?: string; checkpoint?: string },
): Promise<SourceDiff[]> {
  const { getCheckpoint, getVm, listVms } = await import('../../index/catalog');
  const { compareWithSources, selectCheckpoints } = await import('../../repo/verify');
  const which =
    sel.vm === undefined
      ? listVms(repo.db).flatMap((v) => {
          try {
            return [{ vm: v.name, cp: getCheckpoint(repo.db, v) }];
          } catch {
            return [];
          }
        })
      : sel.checkpoint !== undefined
        ? selectCheckpoints(repo, { vm: sel.vm, checkpoint: sel.checkpoint })
        : [{ vm: sel.vm, cp: getCheckpoint(repo.db, getVm(repo.db, sel.vm)) }];
  const sbar = new ProgressBar('compare');
  const sources = await compareWithSources(repo, which, (d, t) => sbar.update(d, t));
  sbar.done();
  return sources;
}

function printVerify(rep: VerifyReport, sources: SourceDiff[] | undefined): void {
  out(
    `checked ${rep.checkpoints} checkpoint(s), ${rep.chunksChecked} chunks, ${bytes(rep.bytesChecked)} stored`,
  );
  for (const p of rep.problems) out(`index problem: ${p}`);
  for (const d of rep.damaged) {
    out(`damaged chunk ${d.hash.slice(0, 16)}: ${d.error}`);
    for (const u of d.uses)
      out(`  used by ${u.vm}@${u.checkpoint} ${u.disk} bytes ${u.offset}-${u.offset + u.length - 1}`);
  }
  if (rep.recovered) out(`${rep.recovered} chunk(s) marked damaged earlier read back correctly now`);
  for (const s of sources ?? []) {
    const what = `source ${s.vm}@${s.checkpoint} ${s.disk} (${s.source ?? '-'})`;
    if (s.status === 'skipped') out(`${what}: skipped, ${s.reason ?? ''}`);
    else if (s.status === 'gone') out(`${what}: GONE, ${s.reason ?? ''}`);
    else if (s.status === 'same') out(`${what}: identical (${bytes(s.bytesCompared)})`);
    else {
      out(
        `${what}: DIFFERS in ${s.ranges.length} range(s), ${bytes(s.bytesDiffering)}${s.reason ? `; ${s.reason}` : ''}`,
      );
      for (const r of s.ranges.slice(0, 20)) out(`  bytes ${r.offset}-${r.offset + r.length - 1}`);
      if (s.ranges.length > 20) out(`  ... and ${s.ranges.length - 20} more (--json lists all)`);
    }
  }
}

/** VERIFY_FAILED for damage, index problems or differing sources; else SOURCE_GONE for a lost source. */
function verifyOutcome(rep: VerifyReport, sources: SourceDiff[] | undefined): void {
  const differing = (sources ?? []).filter((s) => s.status === 'differs');
  if (rep.problems.length > 0 || rep.damaged.length > 0 || differing.length > 0) {
    const parts = [
      `${rep.damaged.length} damaged chunk(s)`,
      `${rep.problems.length} index problem(s)`,
      ...(sources ? [`${differing.length} disk(s) differing from their source`] : []),
    ];
    throw new BkfsError('VERIFY_FAILED', `verify found ${parts.join(', ')}`);
  }
  const gone = (sources ?? []).filter((s) => s.status === 'gone');
  if (gone.length > 0) {
    // Asked to compare with the source, and could not: not a success.
    const g = gone[0]!;
    throw new BkfsError(
      'SOURCE_GONE',
      `the source of ${g.vm}@${g.checkpoint} ${g.disk} (${g.source ?? '-'}) no longer exists${gone.length > 1 ? ` (and ${gone.length - 1} more disk(s))` : ''}; no damage found otherwise`,
    );
  }
}
