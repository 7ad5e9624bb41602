/**
 * Browsing routes of `bkfs web`: a checkpoint's overview (disks, partitions, filesystems), paged
 * directory listings (a session keeps its last listings, so paging lists a directory once), one
 * entry's metadata.
 */
import * as path from 'node:path';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError } from '../errors';
import type { ListEntry, Target } from '../files/session';
import { rows, send, target, withFiles, type Browse, type Listing, type WebContext } from './context';
import { cpParams, pathQuery } from './schemas';

const LISTING_CACHE = 8;
const MAX_PAGE = 10000;

export function registerBrowseRoutes(app: FastifyInstance, ctx: WebContext): void {
  app.get(
    '/api/vms/:vm/checkpoints/:cp/overview',
    {
      schema: {
        summary: 'disks, partitions, filesystems (bkfs ls VM@CP)',
        tags: ['files'],
        params: cpParams,
      },
    },
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
      const { overviewOf } = await import('../files/ops');
      const r = await withFiles(ctx, vm, [checkpoint], (b) => overviewOf(b.s, vm.name, checkpoint.name));
      return send(reply, r);
    },
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/files',
    {
      schema: {
        summary: 'a directory listing (paged)',
        tags: ['files'],
        params: cpParams,
        querystring: {
          type: 'object',
          properties: {
            ...pathQuery,
            offset: { type: 'integer', minimum: 0, default: 0 },
            limit: { type: 'integer', minimum: 1, maximum: MAX_PAGE, default: 1000 },
            sort: { type: 'string', enum: ['name', 'size', 'mtime'], default: 'name' },
            order: { type: 'string', enum: ['asc', 'desc'], default: 'asc' },
          },
        },
      },
    },
    (req, reply) => files(ctx, req, reply),
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/stat',
    {
      schema: {
        summary: 'one entry (not following a final symlink)',
        tags: ['files'],
        params: cpParams,
        querystring: { type: 'object', properties: pathQuery, required: ['path'] },
      },
    },
    (req, reply) => stat(ctx, req, reply),
  );
}

async function files(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const q = req.query as {
    path?: string;
    volume?: string;
    offset: number;
    limit: number;
    sort: string;
    order: string;
  };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const t = target(vm, checkpoint, q);
  const l = await withFiles(ctx, vm, [checkpoint], (b) => listing(b, t));
  const sorted = sortEntries(l.entries, q.sort, q.order);
  return send(reply, {
    vm: vm.name,
    checkpoint: checkpoint.name,
    volume: q.volume ?? null,
    path: l.path,
    dir: l.dir,
    total: sorted.length,
    offset: q.offset,
    limit: q.limit,
    entries: sorted.slice(q.offset, q.offset + q.limit).map(entryView),
  });
}

async function stat(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const p = req.params as { vm: string; cp: string };
  const { vm, checkpoint } = rows(ctx, p.vm, p.cp);
  const t = target(vm, checkpoint, req.query as { path: string });
  const e = await withFiles(ctx, vm, [checkpoint], async (b) => {
    const r = await b.s.resolve(t, { followLast: false, recursive: false, hint: false });
    const st = await r.engine.lstat(r.path);
    if (!st) throw new BkfsError('NOT_FOUND', `${t.path} vanished`);
    const out: ListEntry = {
      ...st,
      name: r.path === '/' ? '/' : path.posix.basename(r.path),
      path: r.path,
    };
    if (st.kind === 'symlink') out.target = await r.engine.readlink(r.path);
    return out;
  });
  return send(reply, entryView(e));
}

/** The listing of a directory, from the session's cache of its last listings. */
async function listing(b: Browse, t: Target): Promise<Listing> {
  const key = `${JSON.stringify(t.volume ?? null)}|${t.path}`;
  let l = b.listings.get(key);
  if (!l) {
    l = await b.s.list(t);
    b.listings.set(key, l);
    if (b.listings.size > LISTING_CACHE) b.listings.delete(b.listings.keys().next().value as string);
  }
  return l;
}

function sortEntries(entries: ListEntry[], by: string, order: string): ListEntry[] {
  const dir = order === 'desc' ? -1 : 1;
  const key = (e: ListEntry): number | string =>
    by === 'size' ? e.size : by === 'mtime' ? e.mtimeSec * 1e9 + e.mtimeNsec : e.name;
  return [...entries].sort((a, b) => {
    const x = key(a);
    const y = key(b);
    return (x < y ? -1 : x > y ? 1 : a.name < b.name ? -1 : a.name > b.name ? 1 : 0) * dir;
  });
}

function entryView(e: ListEntry): Record<string, unknown> {
  return {
    name: e.name,
    path: e.path,
    kind: e.kind,
    size: e.size,
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    mtimeSec: e.mtimeSec,
    mtimeNsec: e.mtimeNsec,
    target: e.target ?? null,
  };
}
