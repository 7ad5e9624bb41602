/**
 * `bkfs copy VM[@CP]... --from REPO --to REPO`: copy checkpoints into another repository
 * (an offsite copy, or back from one). Thin adapter over `src/repo/copy.ts`; prints the result.
 */
import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { CopyResult } from '../../repo/copy';
import { bytes, duration } from '../../util/format';
import { detail, out, repoPath, retryLocked, withLongJob } from '../context';
import { printJson } from '../json';

interface CopyCli {
  from?: string;
  to?: string;
  recompress?: boolean;
  json?: boolean;
}

/** Where the copy reads and writes: the one of --from/--to not given is -r (or the default repository). */
export function copyEnds(o: { from?: string; to?: string }, repo: string): { from: string; to: string } {
  if (o.from === undefined && o.to === undefined) {
    throw new BkfsError(
      'USAGE',
      'give --to REPO (copy from -r into REPO) or --from REPO (copy from REPO into -r)',
    );
  }
  return { from: o.from ?? repo, to: o.to ?? repo };
}

/** Test-only pack size of the destination's writer (`BKFS_TEST_PACK_BYTES`, FORMAT.md "Crash points"). */
function testPackBytes(): number | undefined {
  const v = process.env.BKFS_TEST_PACK_BYTES;
  if (v === undefined) return undefined;
  const n = Number(v);
  return Number.isSafeInteger(n) && n > 0 ? n : undefined;
}

function printCopy(r: CopyResult): void {
  for (const s of r.skipped) out(`present  ${s.vm}@${s.name}: ${s.reason}`);
  for (const c of r.copied) {
    out(
      `copied   ${c.vm}@${c.name} (${c.level}): ${c.chunksTransferred} of ${c.chunks} chunks sent (${bytes(c.bytesTransferred)} stored), ${c.chunksPresent} already there`,
    );
  }
  out(
    `copied ${r.copied.length} checkpoint(s)${r.skipped.length ? `, ${r.skipped.length} already present` : ''} into ${r.to}: ${r.chunksTransferred} chunks (${bytes(r.rawBytesTransferred)}, ${bytes(r.bytesTransferred)} stored) transferred in ${duration(r.durationMs)}`,
  );
}

export function registerCopy(program: Command): void {
  program
    .command('copy')
    .description('copy checkpoints into another repository, sending only the chunks it lacks')
    .argument('<vm...>', 'VM (all its checkpoints), VM@CHECKPOINT or VM@latest')
    .option('--from <repo>', 'repository to copy from (default: -r)')
    .option('--to <repo>', 'repository to copy into (default: -r)')
    .option(
      '--recompress',
      'decode and recompress every chunk sent (default: copy stored chunks as they are)',
    )
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Parents of a checkpoint that the destination lacks are copied first. A checkpoint the destination
already has (same name, same content) is skipped; one with the same name and other content is an
error (exit 17). Interrupted copies resume where they stopped: run the same command again.

Examples:
  bkfs -r /srv/bkfs copy web db --to /mnt/offsite/bkfs
  bkfs -r /srv/bkfs copy web@check12 --to /mnt/offsite/bkfs --json
  bkfs -r /srv/bkfs copy web --from /mnt/offsite/bkfs`,
    )
    .action(async (refs: string[], opts: CopyCli, cmd: Command) => {
      const ends = copyEnds(opts, repoPath(cmd));
      // s3://BUCKET/PREFIX on either side is worked on through its local cache directory.
      const { resolveLocation } = await import('../../store/location');
      const fromDir = await resolveLocation(ends.from);
      const toDir = await resolveLocation(ends.to);
      const { Repository } = await import('../../repo/repository');
      const { publishManifests } = await import('../../repo/manifest');
      const { copyCheckpoints } = await import('../../repo/copy');
      detail(`copy from ${ends.from} to ${ends.to}`);
      const packTarget = testPackBytes();
      const res = await withLongJob('copy', (job) =>
        retryLocked(cmd, async () => {
          const src = Repository.open(fromDir, { readOnly: true });
          try {
            const dst = Repository.open(toDir);
            try {
              const r = await copyCheckpoints(src, dst, {
                refs,
                ...(opts.recompress ? { recompress: true } : {}),
                ...(packTarget !== undefined ? { packTarget } : {}),
                signal: job.signal,
                onNotice: job.onNotice,
                onProgress: (p) => job.onProgress({ done: p.done, total: p.total }),
              });
              await publishManifests(dst); // a bucket gets the new manifests (no-op locally)
              return r;
            } finally {
              dst.close();
            }
          } finally {
            src.close();
          }
        }),
      );
      if (opts.json) printJson(res);
      else printCopy(res);
    });
}
