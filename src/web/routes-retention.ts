/**
 * Retention routes of `bkfs web` (operators): protect and unprotect a checkpoint, forget one
 * (confirmed by its name). Each call opens a writable repository of its own.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError } from '../errors';
import { Repository } from '../repo/repository';
import { auditEntry, rows, send, type WebContext } from './context';
import { cpParams } from './schemas';

export function registerRetentionRoutes(app: FastifyInstance, ctx: WebContext): void {
  for (const value of [true, false]) {
    app.post(
      `/api/vms/:vm/checkpoints/:cp/${value ? 'protect' : 'unprotect'}`,
      {
        config: { need: 'operate' },
        schema: {
          summary: value ? 'protect a checkpoint from forget' : 'unprotect',
          tags: ['operator'],
          params: cpParams,
        },
      },
      (req, reply) => protect(ctx, req, reply, value),
    );
  }

  app.delete(
    '/api/vms/:vm/checkpoints/:cp',
    {
      config: { need: 'operate' },
      schema: {
        summary: 'forget a checkpoint (confirm=VM@CP)',
        tags: ['operator'],
        params: cpParams,
        querystring: {
          type: 'object',
          properties: { confirm: { type: 'string', maxLength: 300 } },
          required: ['confirm'],
        },
      },
    },
    (req, reply) => forget(ctx, req, reply),
  );
}

/** Run `fn` on the repository opened writable for the call. */
async function withWriter<T>(ctx: WebContext, fn: (w: Repository) => T): Promise<T> {
  const w = Repository.open(ctx.options.repoDir);
  try {
    return fn(w);
  } finally {
    w.close();
  }
}

async function protect(
  ctx: WebContext,
  req: FastifyRequest,
  reply: FastifyReply,
  value: boolean,
): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const { setProtected } = await import('../repo/forget');
  const ref = `${vm.name}@${checkpoint.name}`;
  const changed = await withWriter(ctx, (w) => setProtected(w, [ref], value));
  auditEntry(ctx, req, {
    action: value ? 'protect' : 'unprotect',
    vm: vm.name,
    checkpoint: checkpoint.name,
    outcome: 'ok',
  });
  return send(reply, {
    vm: vm.name,
    checkpoint: checkpoint.name,
    protected: value,
    changed: changed.length > 0,
  });
}

async function forget(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const { confirm } = req.query as { confirm: string };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const ref = `${vm.name}@${checkpoint.name}`;
  if (confirm !== ref) throw new BkfsError('USAGE', `to forget ${ref}, confirm with confirm=${ref}`);
  const { forgetByName } = await import('../repo/forget');
  const r = await withWriter(ctx, (w) => forgetByName(w, [ref]));
  auditEntry(ctx, req, { action: 'forget', vm: vm.name, checkpoint: checkpoint.name, outcome: 'ok' });
  return send(reply, {
    removed: r.removed.map((x) => ({ vm: x.vm, name: x.name, level: x.level, time: x.time })),
  });
}
