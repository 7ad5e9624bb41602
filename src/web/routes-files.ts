/**
 * File content routes of `bkfs web`: the text of a small file, a file's download, a folder as a
 * streamed .zip or .tar.gz. Downloads stream from inside a pooled file session, which is held
 * until the last byte is written; each one is audited.
 */
import * as path from 'node:path';
import { PassThrough, Writable, type Readable } from 'node:stream';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError, errorMessage } from '../errors';
import type { CheckpointRow, VmRow } from '../index/catalog';
import type { Target } from '../files/session';
import { archiveStream, archiveTop, type ArchiveFormat } from './archive';
import {
  auditEntry,
  contentDisposition,
  rows,
  send,
  target,
  withFiles,
  type Browse,
  type WebContext,
} from './context';
import { cpParams, pathQuery } from './schemas';

export function registerFileRoutes(app: FastifyInstance, ctx: WebContext): void {
  app.get(
    '/api/vms/:vm/checkpoints/:cp/preview',
    {
      schema: {
        summary: 'text of a small file',
        tags: ['files'],
        params: cpParams,
        querystring: {
          type: 'object',
          properties: {
            ...pathQuery,
            maxBytes: { type: 'integer', minimum: 1, maximum: 1 << 20, default: 65536 },
          },
          required: ['path'],
        },
      },
    },
    (req, reply) => preview(ctx, req, reply),
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/download',
    {
      schema: {
        summary: 'download a file',
        tags: ['files'],
        params: cpParams,
        querystring: { type: 'object', properties: pathQuery, required: ['path'] },
      },
    },
    (req, reply) => download(ctx, req, reply),
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/archive',
    {
      schema: {
        summary: 'download a folder as a streamed .zip or .tar.gz',
        tags: ['files'],
        params: cpParams,
        querystring: {
          type: 'object',
          properties: { ...pathQuery, format: { type: 'string', enum: ['zip', 'tar.gz'], default: 'zip' } },
          required: ['path'],
        },
      },
    },
    (req, reply) => archive(ctx, req, reply),
  );
}

async function preview(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const q = req.query as { path: string; volume?: string; maxBytes: number };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const t = target(vm, checkpoint, q);
  const r = await withFiles(ctx, vm, [checkpoint], async (b) => {
    const f = await regularFile(b, t);
    if (f.size > q.maxBytes) return { path: f.path, size: f.size, tooLarge: true, binary: false, text: null };
    const c = new Collect();
    await f.engine.catTo(f.path, c);
    const text = isUtf8Text(Buffer.concat(c.chunks));
    return { path: f.path, size: f.size, tooLarge: false, binary: text === null, text };
  });
  return send(reply, r);
}

async function download(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const t = target(vm, checkpoint, req.query as { path: string });
  return streamFromSession(
    ctx,
    req,
    reply,
    vm,
    [checkpoint],
    async (b) => {
      const f = await regularFile(b, t);
      const pt = new PassThrough({ highWaterMark: 1 << 20 });
      return {
        headers: {
          'content-type': 'application/octet-stream',
          'content-length': f.size,
          'content-disposition': contentDisposition(path.posix.basename(t.path) || 'file'),
        },
        stream: pt,
        run: async () => {
          await f.engine.catTo(f.path, pt);
          pt.end();
        },
      };
    },
    { action: 'download', vm: vm.name, checkpoint: checkpoint.name, path: t.path },
  );
}

async function archive(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const q = req.query as { path: string; volume?: string; format: ArchiveFormat };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const t = target(vm, checkpoint, q);
  return streamFromSession(
    ctx,
    req,
    reply,
    vm,
    [checkpoint],
    async (b) => {
      const r = await b.s.resolve(t, { followLast: true, recursive: true, hint: false });
      if (r.kind !== 'dir')
        throw new BkfsError('USAGE', `${t.path} is not a directory (download it as a file)`);
      const self = await r.engine.lstat(r.path);
      if (!self) throw new BkfsError('NOT_FOUND', `${t.path} vanished`);
      const entries = await r.engine.walk(r.path);
      const top = archiveTop(t.path);
      const a = archiveStream(
        { engine: r.engine, root: r.path, top, self: { path: r.path, ...self }, entries },
        q.format,
      );
      return {
        headers: {
          'content-type': q.format === 'zip' ? 'application/zip' : 'application/gzip',
          'content-disposition': contentDisposition(`${top}.${q.format}`),
          'x-bkfs-entries': entries.length + 1,
        },
        stream: a.stream,
        run: () => a.done,
      };
    },
    { action: 'archive', vm: vm.name, checkpoint: checkpoint.name, path: t.path, format: q.format },
  );
}

/** Resolve a regular file (following symlinks inside the guest) and its size. */
async function regularFile(b: Browse, t: Target) {
  const r = await b.s.resolve(t, { followLast: true, recursive: false, hint: false });
  if (r.kind === 'dir') throw new BkfsError('USAGE', `${t.path} is a directory`);
  if (r.kind !== 'file') throw new BkfsError('USAGE', `${t.path} is not a regular file`);
  const st = await r.engine.lstat(r.path);
  if (!st) throw new BkfsError('NOT_FOUND', `${t.path} vanished`);
  return { engine: r.engine, path: r.path, size: st.size };
}

/**
 * Send a stream produced inside a file session: the reply starts at once; the session is held
 * until the prepared `run` has written everything (or the client went away).
 */
async function streamFromSession(
  ctx: WebContext,
  req: FastifyRequest,
  reply: FastifyReply,
  vm: VmRow,
  cps: CheckpointRow[],
  prepare: (
    b: Browse,
  ) => Promise<{ headers: Record<string, string | number>; stream: Readable; run: () => Promise<void> }>,
  auditInfo: Record<string, unknown>,
): Promise<FastifyReply> {
  let started = false;
  await withFiles(ctx, vm, cps, async (b) => {
    const job = await prepare(b);
    for (const [k, v] of Object.entries(job.headers)) void reply.header(k, v);
    started = true;
    void reply.send(job.stream);
    try {
      await job.run();
      auditEntry(ctx, req, { ...auditInfo, outcome: 'ok' });
    } catch (e) {
      auditEntry(ctx, req, { ...auditInfo, outcome: 'failed', error: errorMessage(e) });
      job.stream.destroy(e as Error); // cut the connection: the client sees an incomplete transfer
    }
  });
  if (!started) throw new Error('no reply'); // not reached: prepare threw
  return reply;
}

function isUtf8Text(buf: Buffer): string | null {
  if (buf.includes(0)) return null;
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(buf);
  } catch {
    return null;
  }
}

/** Collects a stream's bytes (for previews of small files). */
class Collect extends Writable {
  chunks: Buffer[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.chunks.push(chunk);
    cb();
  }
}
