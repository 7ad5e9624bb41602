/**
 * Job routes of `bkfs web` (operators): start a restore (to a path below the restore root or an
 * NBD URI), list, show and cancel jobs, follow a job's progress (server-sent events).
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError } from '../errors';
import { jsonValue } from '../cli/json';
import { CheckpointReader } from '../chain/reader';
import { auditEntry, rows, send, type WebContext } from './context';
import type { Job } from './jobs';
import { targetInRoot } from './paths';
import { nameParam } from './schemas';

const jobsNeed = { need: 'operate' as const };

const jobParams = {
  type: 'object',
  properties: { id: { type: 'string', maxLength: 64 } },
  required: ['id'],
} as const;

interface RestoreBody {
  vm: string;
  checkpoint: string;
  disk?: string;
  to: string;
  format?: 'raw' | 'qcow2';
  force: boolean;
}

export function registerJobRoutes(app: FastifyInstance, ctx: WebContext): void {
  const { jobs } = ctx;

  app.post(
    '/api/jobs/restore',
    {
      config: jobsNeed,
      schema: {
        summary: 'start restoring a checkpoint (or one disk) to a path below the restore root or an NBD URI',
        tags: ['operator'],
        body: {
          type: 'object',
          properties: {
            vm: nameParam,
            checkpoint: nameParam,
            disk: nameParam,
            to: { type: 'string', minLength: 1, maxLength: 4096 },
            format: { type: 'string', enum: ['raw', 'qcow2'] },
            force: { type: 'boolean', default: false },
          },
          required: ['vm', 'checkpoint', 'to'],
          additionalProperties: false,
        },
      },
    },
    (req, reply) => restore(ctx, req, reply),
  );

  app.get(
    '/api/jobs',
    { config: jobsNeed, schema: { summary: 'jobs of this server', tags: ['operator'] } },
    async (_req, reply) => send(reply, jobs.list()),
  );

  app.get(
    '/api/jobs/:id',
    { config: jobsNeed, schema: { summary: 'one job', tags: ['operator'], params: jobParams } },
    async (req, reply) => send(reply, jobs.get((req.params as { id: string }).id)),
  );

  app.delete(
    '/api/jobs/:id',
    { config: jobsNeed, schema: { summary: 'cancel a job', tags: ['operator'], params: jobParams } },
    async (req, reply) => {
      const j = jobs.cancel((req.params as { id: string }).id);
      auditEntry(ctx, req, { action: 'cancel', job: j.id });
      return send(reply, j);
    },
  );

  app.get(
    '/api/jobs/:id/events',
    {
      config: jobsNeed,
      schema: { summary: 'progress of a job (server-sent events)', tags: ['operator'], params: jobParams },
    },
    (req, reply) => events(ctx, req, reply),
  );
}

/** Where a restore goes: an NBD URI (one disk), or a path below the restore root. */
async function restoreTarget(ctx: WebContext, b: RestoreBody): Promise<string> {
  const { isNbdUri } = await import('../restore/targets');
  if (isNbdUri(b.to)) {
    if (b.disk === undefined) throw new BkfsError('USAGE', 'an NBD target takes one disk: give disk');
    return b.to;
  }
  if (!ctx.options.restoreRoot)
    throw new BkfsError('TARGET_INVALID', 'this server was started without --restore-root: only NBD targets');
  return targetInRoot(ctx.options.restoreRoot, b.to);
}

async function restore(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const b = req.body as RestoreBody;
  const { vm, checkpoint } = rows(ctx, b.vm, b.checkpoint);
  const to = await restoreTarget(ctx, b);
  if (b.disk !== undefined) new CheckpointReader(ctx.repo, vm, checkpoint).disk(b.disk); // NOT_FOUND now
  const { runRestore } = await import('../restore/engine');
  const info = { action: 'restore', vm: vm.name, checkpoint: checkpoint.name, disk: b.disk ?? null, to };
  auditEntry(ctx, req, { ...info, outcome: 'started' });
  const job = ctx.jobs.start(
    {
      kind: 'restore',
      vm: vm.name,
      checkpoint: checkpoint.name,
      disk: b.disk ?? null,
      to,
      user: req.user?.name ?? '',
    },
    (jc) =>
      runRestore(ctx.repo, {
        ref: `${vm.name}@${checkpoint.name}`,
        to,
        ...(b.disk !== undefined ? { disk: b.disk } : {}),
        ...(b.format !== undefined ? { format: b.format } : {}),
        force: b.force,
        signal: jc.signal,
        onProgress: (p) => jc.onProgress(p),
        onNotice: ctx.log,
      }),
    (j: Job) =>
      auditEntry(ctx, req, {
        ...info,
        job: j.id,
        outcome: j.state,
        ...(j.error ? { code: j.error.code } : {}),
      }),
  );
  return send(reply, job, 202);
}

async function events(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<void> {
  const { jobs } = ctx;
  const id = (req.params as { id: string }).id;
  jobs.get(id); // 404 before the stream starts
  reply.hijack();
  const res = reply.raw;
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-store',
    connection: 'keep-alive',
    'x-content-type-options': 'nosniff',
  });
  const write = (event: string, job: Job) =>
    res.write(`event: ${event}\ndata: ${JSON.stringify(jsonValue(job))}\n\n`);
  write('progress', jobs.get(id));
  const unsubscribe = jobs.subscribe(id, (event, job) => {
    write(event, job);
    if (event === 'end') res.end();
  });
  req.raw.on('close', unsubscribe);
}
