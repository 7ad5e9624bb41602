import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import { parseCheckpointRef } from '../../index/catalog';
import { verifyRepository } from '../../repo/verify';
import { bytes } from '../../util/format';
import { ProgressBar } from '../progress';
import { out, withRepo } from '../context';

export function registerVerify(program: Command): void {
  program
    .command('verify')
    .description('check the index and re-read and re-hash every chunk that the selection uses')
    .argument('[ref]', 'VM or VM@CHECKPOINT (default: everything)')
    .option('--sample <percent>', 're-read only a random share of the chunks')
    .option('--json', 'machine-readable report')
    .action(async (ref: string | undefined, opts: { sample?: string; json?: boolean }, cmd: Command) => {
      const sel: { vm?: string; checkpoint?: string } = ref ? parseCheckpointRef(ref) : {};
      const sample = opts.sample === undefined ? undefined : Number(opts.sample);
      if (sample !== undefined && !(sample > 0 && sample <= 100)) {
        throw new BkfsError('USAGE', `--sample takes a percentage in (0, 100], got '${opts.sample}'`);
      }
      const bar = new ProgressBar('verify');
      const rep = await withRepo(cmd, (repo) =>
        verifyRepository(repo, {
          ...(sel.vm !== undefined ? { vm: sel.vm } : {}),
          ...(ref?.includes('@') && sel.checkpoint === undefined ? { checkpoint: 'latest' } : {}),
          ...(sel.checkpoint !== undefined ? { checkpoint: sel.checkpoint } : {}),
          ...(sample !== undefined ? { samplePercent: sample } : {}),
          onProgress: (d, t) => bar.update(d, t),
        }),
      );
      bar.done();
      if (opts.json) {
        out(JSON.stringify(rep, null, 2));
      } else {
        out(
          `checked ${rep.checkpoints} checkpoint(s), ${rep.chunksChecked} chunks, ${bytes(rep.bytesChecked)} stored`,
        );
        for (const p of rep.problems) out(`index problem: ${p}`);
        for (const d of rep.damaged) {
          out(`damaged chunk ${d.hash.slice(0, 16)}: ${d.error}`);
          for (const u of d.uses)
            out(`  used by ${u.vm}@${u.checkpoint} ${u.disk} bytes ${u.offset}-${u.offset + u.length - 1}`);
        }
      }
      if (rep.problems.length > 0 || rep.damaged.length > 0) {
        throw new BkfsError(
          'VERIFY_FAILED',
          `verify found ${rep.damaged.length} damaged chunk(s) and ${rep.problems.length} index problem(s)`,
        );
      }
      if (!opts.json) out('no damage found');
    });
}
