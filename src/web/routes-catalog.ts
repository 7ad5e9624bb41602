/** Catalogue routes of `bkfs web`: VMs, their checkpoints, one checkpoint (the index only). */
import type { FastifyInstance } from 'fastify';
import { getVm, listCheckpoints } from '../index/catalog';
import { checkpointView, configsOf, vmViews } from './catalog';
import { rows, send, type WebContext } from './context';
import { cpParams, vmParams } from './schemas';

export function registerCatalogRoutes(app: FastifyInstance, ctx: WebContext): void {
  const { repo } = ctx;

  app.get(
    '/api/vms',
    { schema: { summary: 'VMs with their latest checkpoint', tags: ['browse'] } },
    async (_req, reply) => send(reply, vmViews(repo)),
  );

  app.get(
    '/api/vms/:vm/checkpoints',
    { schema: { summary: 'checkpoints of a VM, oldest first', tags: ['browse'], params: vmParams } },
    async (req, reply) => {
      const { vm } = req.params as { vm: string };
      const v = getVm(repo.db, vm);
      return send(
        reply,
        listCheckpoints(repo.db, v.id).map((c) => checkpointView(repo, v.name, c)),
      );
    },
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp',
    { schema: { summary: 'one checkpoint', tags: ['browse'], params: cpParams } },
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
      return send(reply, {
        ...checkpointView(repo, vm.name, checkpoint),
        configs: configsOf(repo, checkpoint),
      });
    },
  );
}
