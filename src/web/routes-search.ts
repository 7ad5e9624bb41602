/**
 * Search routes of `bkfs web` (across checkpoints of a VM): file names matching a pattern with
 * their history (bkfs find), files added, removed and changed between two checkpoints (bkfs diff).
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError } from '../errors';
import { getVm, listCheckpoints, type CheckpointRow } from '../index/catalog';
import { MAX_DRIVES } from '../files/ops';
import { diffListings, fileHistory, pathMatcher, checksumCandidates, type FileEntry } from '../files/tree';
import { checkpointView } from './catalog';
import { rows, send, target, withFiles, type WebContext } from './context';
import { nameParam, pathQuery, vmParams } from './schemas';

export function registerSearchRoutes(app: FastifyInstance, ctx: WebContext): void {
  app.get(
    '/api/vms/:vm/find',
    {
      schema: {
        summary: 'search file names across checkpoints (bkfs find)',
        tags: ['files'],
        params: vmParams,
        querystring: {
          type: 'object',
          properties: {
            ...pathQuery,
            pattern: { type: 'string', minLength: 1, maxLength: 1024 },
            checkpoint: nameParam,
            ignoreCase: { type: 'boolean', default: false },
          },
          required: ['pattern'],
        },
      },
    },
    (req, reply) => find(ctx, req, reply),
  );

  app.get(
    '/api/vms/:vm/diff',
    {
      schema: {
        summary: 'files added, removed and changed between two checkpoints (bkfs diff)',
        tags: ['files'],
        params: vmParams,
        querystring: {
          type: 'object',
          properties: {
            ...pathQuery,
            from: nameParam,
            to: nameParam,
            checksum: { type: 'boolean', default: false },
          },
          required: ['from', 'to'],
        },
      },
    },
    (req, reply) => diff(ctx, req, reply),
  );
}

async function find(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const { vm: vmName } = req.params as { vm: string };
  const q = req.query as {
    pattern: string;
    checkpoint?: string;
    path?: string;
    volume?: string;
    ignoreCase: boolean;
  };
  const vm = getVm(ctx.repo.db, vmName);
  const cps = q.checkpoint
    ? [rows(ctx, vm.name, q.checkpoint).checkpoint]
    : listCheckpoints(ctx.repo.db, vm.id);
  if (cps.length === 0) throw new BkfsError('NOT_FOUND', `VM '${vm.name}' has no checkpoints`);
  const match = pathMatcher(q.pattern, q.ignoreCase);
  const per: { checkpoint: string; matches: Map<string, FileEntry> }[] = [];
  const missing: string[] = [];
  for (const g of applianceGroups(ctx, vm.name, cps)) {
    await withFiles(ctx, vm, g, async (b) => {
      for (const c of g) {
        const t = target(vm, c, q);
        const entries = await b.s.walk(t, match);
        if (entries === null) missing.push(c.name);
        per.push({ checkpoint: c.name, matches: new Map((entries ?? []).map((e) => [e.path, e])) });
      }
    });
  }
  const history = fileHistory(per);
  return send(reply, {
    vm: vm.name,
    checkpoints: cps.map((c) => c.name),
    missing,
    matches: [...history].map(([p, h]) => ({ path: p, history: h })),
  });
}

/** Groups of checkpoints that fit one appliance (MAX_DRIVES disks), newest first kept together. */
function applianceGroups(ctx: WebContext, vmName: string, cps: CheckpointRow[]): CheckpointRow[][] {
  const groups: CheckpointRow[][] = [];
  let cur: CheckpointRow[] = [];
  let disks = 0;
  for (const c of cps) {
    const n = Math.max(1, checkpointView(ctx.repo, vmName, c).disks.length);
    if (cur.length > 0 && disks + n > MAX_DRIVES) {
      groups.push(cur);
      cur = [];
      disks = 0;
    }
    cur.push(c);
    disks += n;
  }
  if (cur.length > 0) groups.push(cur);
  return groups;
}

async function diff(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const { vm: vmName } = req.params as { vm: string };
  const q = req.query as { from: string; to: string; path?: string; volume?: string; checksum: boolean };
  const a = rows(ctx, vmName, q.from);
  const bRow = rows(ctx, vmName, q.to).checkpoint;
  const vm = a.vm;
  const ta = target(vm, a.checkpoint, q);
  const tb = target(vm, bRow, q);
  const cps = a.checkpoint.id === bRow.id ? [bRow] : [a.checkpoint, bRow].sort((x, y) => x.id - y.id);
  const r = await withFiles(ctx, vm, cps, async (b) => {
    const la = await b.s.walk(ta);
    const lb = await b.s.walk(tb);
    if (la === null && lb === null) {
      throw new BkfsError(
        'NOT_FOUND',
        `${ta.path} exists in neither ${vm.name}@${ta.checkpoint} nor ${tb.checkpoint}`,
      );
    }
    let sums: { a: Map<string, string>; b: Map<string, string> } | undefined;
    let checksummed = 0;
    if (q.checksum && la && lb) {
      const cand = checksumCandidates(la, lb);
      checksummed = cand.length;
      sums = { a: await b.s.checksums(ta, cand), b: await b.s.checksums(tb, cand) };
    }
    return {
      vm: vm.name,
      from: ta.checkpoint,
      to: tb.checkpoint,
      path: ta.path,
      checksummed,
      items: diffListings(la ?? [], lb ?? [], sums),
    };
  });
  return send(reply, r);
}
