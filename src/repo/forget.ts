/**
 * `forget`: removes checkpoints from the catalogue (by name or by a retention policy), and
 * `protect`/`unprotect`.
 *
 * Design: every checkpoint-disk has a complete copy-on-write page table (FORMAT.md), so forgetting
 * a checkpoint never touches what the others read: its catalogue rows, its page table and the
 * pages no other page table uses are deleted (`deleteCheckpointRows`); chunks are left for `gc`.
 * Checkpoints built on a forgotten one keep their `parent_id`/`base_id`/`chain_id` (dangling ids;
 * ids are never reused, AUTOINCREMENT): an `inc` still builds on the latest checkpoint, a `diff`
 * needs the chain's full and reports CHAIN_BROKEN when it was forgotten.
 *
 * A checkpoint pinned by a reader (`pins.ts`) is hidden instead (state `forgotten`): it leaves the
 * catalogue at once, its rows stay until gc finds it unpinned. Protected checkpoints are never
 * removed by a policy, and forget by name refuses them (PROTECTED).
 *
 * Order (crash-safe, see manifest.ts): journal naming the checkpoints (durable) -> one index
 * transaction hides them (state `forgotten`) -> pins are read -> one transaction deletes the rows
 * of those nobody pins -> manifests deleted -> journal deleted. Reading the pins only after the
 * hide committed is what makes pins race-free (FORMAT.md, "Pins"). Locking: the writer lock for
 * the whole forget, so it never runs beside a backup or gc; `protect`/`unprotect` take it too.
 * Memory: the catalogue rows of the VMs involved.
 */
import { BkfsError } from '../errors';
import {
  getCheckpoint,
  getVm,
  listCheckpoints,
  listVms,
  parseCheckpointRef,
  type CheckpointRow,
  type VmRow,
} from '../index/catalog';
import type { Repository } from './repository';
import { crashPoint, deleteCheckpointRows } from './repository';
import { pinnedCheckpointIds } from './pins';
import { closeForgetJournal, removeManifest, rewriteManifest, writeForgetJournal } from './manifest';
import { applyRetention, hasRules, type RetentionOptions, type RetentionPolicy } from './retention';

export interface ForgetEntry {
  vm: string;
  name: string;
  id: number;
  level: string;
  time: number;
  /** Kept: why ('protected', 'last', 'daily', ...). Removed: empty. */
  reasons: string[];
  /** Removed while a reader pins it: hidden now, rows deleted by a later gc. */
  pinned?: boolean;
}

export interface ForgetResult {
  dryRun: boolean;
  removed: ForgetEntry[];
  kept: ForgetEntry[];
}

export interface ForgetOptions {
  dryRun?: boolean;
}

type Row = CheckpointRow & { uid: string };

function entry(vm: string, cp: CheckpointRow, reasons: string[] = []): ForgetEntry {
  return { vm, name: cp.name, id: cp.id, level: cp.level, time: cp.started, reasons };
}

/** Forget named checkpoints (`VM@CP`); all or nothing. */
export function forgetByName(repo: Repository, refs: string[], o: ForgetOptions = {}): ForgetResult {
  if (refs.length === 0) throw new BkfsError('USAGE', 'name the checkpoints to forget (VM@CHECKPOINT)');
  const resolve = (): { vm: VmRow; cp: Row }[] => {
    const seen = new Set<number>();
    const out: { vm: VmRow; cp: Row }[] = [];
    for (const ref of refs) {
      const r = parseCheckpointRef(ref);
      if (r.checkpoint === undefined) {
        throw new BkfsError(
          'USAGE',
          `forget takes VM@CHECKPOINT, got '${ref}' (to apply a policy use --keep-*)`,
        );
      }
      const vm = getVm(repo.db, r.vm);
      const cp = getCheckpoint(repo.db, vm, r.checkpoint) as Row;
      if (!seen.has(cp.id)) out.push({ vm, cp });
      seen.add(cp.id);
    }
    const prot = out.filter((x) => x.cp.protected === 1);
    if (prot.length > 0) {
      const names = prot.map((x) => `${x.vm.name}@${x.cp.name}`).join(', ');
      throw new BkfsError(
        'PROTECTED',
        `${names} ${prot.length > 1 ? 'are' : 'is'} protected (run 'bkfs unprotect' first)`,
      );
    }
    return out;
  };
  if (o.dryRun) {
    return { dryRun: true, removed: resolve().map((x) => entry(x.vm.name, x.cp)), kept: [] };
  }
  repo.lockWriter('forget');
  try {
    const sel = resolve();
    const removed = forgetRows(
      repo,
      sel.map((x) => ({ vm: x.vm.name, cp: x.cp })),
      true,
    );
    return { dryRun: false, removed, kept: [] };
  } finally {
    repo.unlockWriter();
  }
}

/** Apply a retention policy to one VM or to every VM. */
export function forgetByPolicy(
  repo: Repository,
  vmName: string | undefined,
  policy: RetentionPolicy,
  o: ForgetOptions & RetentionOptions = {},
): ForgetResult {
  if (!hasRules(policy)) {
    throw new BkfsError(
      'USAGE',
      'give at least one --keep-* rule with a count above 0 (or checkpoint names)',
    );
  }
  const plan = (): { removed: { vm: string; cp: Row }[]; result: ForgetResult } => {
    const vms = vmName !== undefined ? [getVm(repo.db, vmName)] : listVms(repo.db);
    const result: ForgetResult = { dryRun: o.dryRun === true, removed: [], kept: [] };
    const removed: { vm: string; cp: Row }[] = [];
    for (const vm of vms) {
      const cps = listCheckpoints(repo.db, vm.id) as Row[];
      const byId = new Map(cps.map((c) => [c.id, c]));
      const decisions = applyRetention(
        cps.map((c) => ({ id: c.id, time: c.started, protected: c.protected === 1 })),
        policy,
        o,
      );
      for (const d of decisions) {
        const cp = byId.get(d.id)!;
        if (d.keep) result.kept.push(entry(vm.name, cp, d.reasons));
        else removed.push({ vm: vm.name, cp });
      }
    }
    return { removed, result };
  };
  if (o.dryRun) {
    const p = plan();
    p.result.removed = p.removed.map((x) => entry(x.vm, x.cp));
    return p.result;
  }
  repo.lockWriter('forget');
  try {
    const p = plan();
    p.result.removed = forgetRows(repo, p.removed, false);
    return p.result;
  } finally {
    repo.unlockWriter();
  }
}

/**
 * Forget checkpoints (caller holds the writer lock). `strict`: a checkpoint that became protected
 * or went away meanwhile fails the whole forget; otherwise it is skipped.
 */
function forgetRows(repo: Repository, sel: { vm: string; cp: Row }[], strict: boolean): ForgetEntry[] {
  if (sel.length === 0) return [];
  const db = repo.db;
  // Fail on a broken pin file before changing anything (the decision uses the scan below).
  pinnedCheckpointIds(repo);
  const journal = writeForgetJournal(
    repo.dir,
    sel.map((x) => ({ id: x.cp.id, uid: x.cp.uid })),
  );
  crashPoint('forget-after-journal');
  const hidden: ForgetEntry[] = [];
  try {
    // 1. Hide: from this commit on, a reader that pins one of them and re-checks sees it gone.
    db.transaction(() => {
      const cur = db.prepare('SELECT state, protected FROM checkpoints WHERE id = ?');
      const hide = db.prepare("UPDATE checkpoints SET state = 'forgotten' WHERE id = ?");
      for (const x of sel) {
        const c = cur.get(x.cp.id) as { state: string; protected: number } | undefined;
        const where = `${x.vm}@${x.cp.name}`;
        if (!c || c.state !== 'complete' || c.protected === 1) {
          if (!strict) continue;
          if (c?.protected === 1)
            throw new BkfsError('PROTECTED', `${where} is protected (run 'bkfs unprotect' first)`);
          throw new BkfsError('NOT_FOUND', `${where} was removed meanwhile`);
        }
        hide.run(x.cp.id);
        hidden.push(entry(x.vm, x.cp));
      }
    }).immediate();
  } catch (e) {
    // Nothing was forgotten: the journal must not make a rebuild drop these checkpoints.
    closeForgetJournal(repo.dir, journal);
    throw e;
  }
  crashPoint('forget-after-hide');
  // 2. Pins, read AFTER the hide committed (FORMAT.md, "Pins"): a reader pinned before this scan
  // is seen here and keeps the rows; one pinned after it re-checks and finds the checkpoint gone.
  // A crash or a broken pin from here on leaves them hidden with their rows: gc deletes those.
  const pinned = pinnedCheckpointIds(repo);
  const done: ForgetEntry[] = hidden.map((h) => (pinned.has(h.id) ? { ...h, pinned: true } : h));
  db.transaction(() => {
    const cur = db.prepare('SELECT state FROM checkpoints WHERE id = ?');
    for (const d of done) {
      if (d.pinned) continue;
      if ((cur.get(d.id) as { state: string } | undefined)?.state === 'forgotten')
        deleteCheckpointRows(db, d.id);
    }
  }).immediate();
  crashPoint('forget-after-index');
  for (const x of sel) {
    if (done.some((d) => d.id === x.cp.id)) removeManifest(repo.dir, x.cp.uid);
  }
  crashPoint('forget-after-manifests');
  closeForgetJournal(repo.dir, journal);
  return done;
}

/** Set or clear the protected flag of checkpoints (`VM@CP`); returns the ones that changed. */
export function setProtected(repo: Repository, refs: string[], value: boolean): ForgetEntry[] {
  if (refs.length === 0) throw new BkfsError('USAGE', 'name the checkpoints (VM@CHECKPOINT)');
  const sel: { vm: string; cp: CheckpointRow }[] = [];
  for (const ref of refs) {
    const r = parseCheckpointRef(ref);
    if (r.checkpoint === undefined) throw new BkfsError('USAGE', `expected VM@CHECKPOINT, got '${ref}'`);
    const vm = getVm(repo.db, r.vm);
    sel.push({ vm: vm.name, cp: getCheckpoint(repo.db, vm, r.checkpoint) });
  }
  const changed: ForgetEntry[] = [];
  // The flag is in the index and in the manifest: a writer's change, under the writer lock.
  repo.lockWriter(value ? 'protect' : 'unprotect');
  try {
    repo.db
      .transaction(() => {
        const upd = repo.db.prepare(
          "UPDATE checkpoints SET protected = ? WHERE id = ? AND state = 'complete' AND protected != ?",
        );
        const exists = repo.db.prepare("SELECT 1 FROM checkpoints WHERE id = ? AND state = 'complete'");
        for (const x of sel) {
          if (!exists.get(x.cp.id))
            throw new BkfsError('NOT_FOUND', `${x.vm}@${x.cp.name} was forgotten meanwhile`);
          const v = value ? 1 : 0;
          if (upd.run(v, x.cp.id, v).changes > 0) changed.push(entry(x.vm, x.cp));
        }
      })
      .immediate();
    // The manifest carries the flag, so an index rebuild keeps it.
    for (const c of changed) rewriteManifest(repo, c.id);
  } finally {
    repo.unlockWriter();
  }
  return changed;
}
