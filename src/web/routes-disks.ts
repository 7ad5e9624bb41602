/**
 * Disk routes of `bkfs web`: a checkpoint's disks, a raw disk (HTTP Range supported; the
 * checkpoint is pinned while it streams), its data and zero runs; and uploading a disk image into
 * the restore root (operators).
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import type { Readable } from 'node:stream';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError, errorMessage } from '../errors';
import { checkpointDisks } from '../index/catalog';
import { pinCheckpoints } from '../repo/pins';
import { CheckpointReader } from '../chain/reader';
import { auditEntry, contentDisposition, rows, send, type WebContext } from './context';
import { diskStream, mergeRuns, parseRange } from './disk';
import { targetInRoot } from './paths';
import { cpParams, diskParams } from './schemas';

export function registerDiskRoutes(app: FastifyInstance, ctx: WebContext): void {
  app.get(
    '/api/vms/:vm/checkpoints/:cp/disks',
    { schema: { summary: 'disks of a checkpoint', tags: ['disks'], params: cpParams } },
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { checkpoint } = rows(ctx, p.vm, p.cp);
      return send(
        reply,
        checkpointDisks(ctx.repo.db, checkpoint.id).map((d) => ({
          name: d.name,
          virtualSize: d.virtual_size,
        })),
      );
    },
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/disks/:disk',
    { schema: { summary: 'the raw disk (Range supported)', tags: ['disks'], params: diskParams } },
    (req, reply) => rawDisk(ctx, req, reply),
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/disks/:disk/extents',
    {
      schema: {
        summary: 'data and zero runs of a disk (from its block map)',
        tags: ['disks'],
        params: diskParams,
      },
    },
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string; disk: string };
      const { reader, disk } = diskRow(ctx, p.vm, p.cp, p.disk);
      return send(reply, mergeRuns(reader.extents(disk.name), disk.virtual_size));
    },
  );

  app.put(
    '/api/uploads/:file',
    {
      config: { need: 'operate' },
      schema: {
        summary: 'upload a disk image into the restore root',
        tags: ['operator'],
        params: {
          type: 'object',
          properties: { file: { type: 'string', maxLength: 255 } },
          required: ['file'],
        },
        querystring: { type: 'object', properties: { force: { type: 'boolean', default: false } } },
      },
    },
    (req, reply) => upload(ctx, req, reply),
  );
}

function diskRow(ctx: WebContext, vm: string, cp: string, disk: string) {
  const r = rows(ctx, vm, cp);
  const reader = new CheckpointReader(ctx.repo, r.vm, r.checkpoint, { cacheBytes: 64 << 20 });
  const d = reader.disk(disk);
  return { ...r, reader, disk: d };
}

async function rawDisk(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string; disk: string };
  const { vm, checkpoint, reader, disk } = diskRow(ctx, p.vm, p.cp, p.disk);
  const size = disk.virtual_size;
  const range = parseRange(req.headers.range, size);
  if (range === 'unsatisfiable') {
    throw Object.assign(new BkfsError('USAGE', `range not satisfiable (disk is ${size} bytes)`), {
      statusCode: 416,
      size,
    });
  }
  const r = range ?? { start: 0, end: size };
  const pin = pinCheckpoints(ctx.repo, [checkpoint.id]);
  const info = {
    action: 'disk',
    vm: vm.name,
    checkpoint: checkpoint.name,
    disk: disk.name,
    start: r.start,
    end: r.end,
  };
  const stream = diskStream(reader, disk.name, r, () => pin.release());
  stream.on('error', (e) => auditEntry(ctx, req, { ...info, outcome: 'failed', error: errorMessage(e) }));
  stream.on('end', () => auditEntry(ctx, req, { ...info, outcome: 'ok' }));
  void reply
    .header('accept-ranges', 'bytes')
    .header('content-type', 'application/octet-stream')
    .header('content-length', r.end - r.start)
    .header('content-disposition', contentDisposition(`${vm.name}-${checkpoint.name}-${disk.name}.raw`));
  if (range) void reply.code(206).header('content-range', `bytes ${r.start}-${r.end - 1}/${size}`);
  return reply.send(stream);
}

async function upload(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const { file } = req.params as { file: string };
  const { force } = req.query as { force: boolean };
  const root = ctx.options.restoreRoot;
  if (!root) throw new BkfsError('TARGET_INVALID', 'this server was started without --restore-root');
  if (file.includes('/') || file.startsWith('.'))
    throw new BkfsError('TARGET_INVALID', `bad file name '${file}'`);
  const dest = targetInRoot(root, file);
  if (fs.existsSync(dest) && !force) throw new BkfsError('TARGET_EXISTS', `${file} exists (add ?force=true)`);
  const body = req.body as Readable | undefined;
  if (!body || typeof (body as { pipe?: unknown }).pipe !== 'function') {
    throw new BkfsError('USAGE', 'send the image as the body with Content-Type: application/octet-stream');
  }
  const partial = `${dest}.bkfs-partial`;
  let bytes = 0;
  const info = { action: 'upload', path: dest };
  try {
    bytes = await writeNew(partial, body);
    await fsp.rename(partial, dest);
  } catch (e) {
    await fsp.rm(partial, { force: true });
    auditEntry(ctx, req, { ...info, outcome: 'failed', error: errorMessage(e) });
    if ((e as NodeJS.ErrnoException).code === 'EEXIST')
      throw new BkfsError('TARGET_EXISTS', `${file} is being uploaded by another request`);
    throw e;
  }
  auditEntry(ctx, req, { ...info, bytes, outcome: 'ok' });
  return send(reply, { path: dest, bytes });
}

/** Write `body` to a new file (EEXIST if it exists), synced; its size. */
async function writeNew(file: string, body: Readable): Promise<number> {
  let bytes = 0;
  const fh = await fsp.open(file, 'wx', 0o600);
  try {
    for await (const chunk of body) {
      const c = chunk as Buffer;
      let off = 0;
      while (off < c.length) off += (await fh.write(c, off, c.length - off, bytes + off)).bytesWritten;
      bytes += c.length;
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return bytes;
}
