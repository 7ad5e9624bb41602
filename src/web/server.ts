/**
 * The `bkfs web` server: Fastify with its official plugins (cookie, session, CSRF protection, rate
 * limit, static files, swagger for the OpenAPI document). Routes are thin over the core modules:
 * the catalogue (index), file sessions (files/session.ts, the same isolated engine as the CLI),
 * CheckpointReader for disks, the restore engine, forget/protect. Contract: src/web/api.md.
 *
 * Auth (every /api route but login and the OpenAPI document): `Authorization: Bearer TOKEN`, or
 * the session cookie set by POST /api/login; cookie-authenticated requests that change state must
 * carry the CSRF token (`x-csrf-token`). Roles are checked per route (`config.need`). The token
 * file is re-read on each request, so `bkfs web token remove` takes effect at once (sessions made
 * with a removed token end too).
 *
 * Nothing here prints: log lines go to `log`, audit entries to the audit log.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { PassThrough, Writable, type Readable } from 'node:stream';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { BkfsError, errorMessage, isBkfsError, type ErrorCode } from '../errors';
import { EXIT_CODES, EXIT_INTERNAL, HTTP_STATUS } from '../cli/exit-codes';
import { jsonValue } from '../cli/json';
import { codedFsError } from '../util/userpath';
import {
  checkpointDisks,
  listCheckpoints,
  resolveRef,
  type CheckpointRow,
  type VmRow,
} from '../index/catalog';
import { Repository } from '../repo/repository';
import { pinCheckpoints } from '../repo/pins';
import { CheckpointReader } from '../chain/reader';
import { parseFileAddress } from '../files/address';
import type { EngineChoice } from '../files/engine';
import { FilesSession, neighbours, type ListEntry, type Target } from '../files/session';
import { diffListings, fileHistory, pathMatcher, checksumCandidates, type FileEntry } from '../files/tree';
import { MAX_DRIVES } from '../files/ops';

import { allowed, bearerToken, findToken, readTokens, type Need, type Role } from './auth';
import { checkpointView, configsOf, vmViews } from './catalog';
import { SessionPool } from './pool';
import { checkGuestPath, checkVolume, targetInRoot } from './paths';
import { diskStream, mergeRuns, parseRange } from './disk';
import { archiveStream, archiveTop, type ArchiveFormat } from './archive';
import { JobManager, type Job } from './jobs';
import { AuditLog } from './state';

export interface WebServerOptions {
  repoDir: string;
  tokensFile: string;
  auditFile: string;
  /** Restore targets and uploads go below this directory (none: only NBD targets). */
  restoreRoot?: string;
  engine?: EngineChoice;
  guestfsTcg?: boolean;
  /** Open file sessions at most (appliances). */
  maxSessions?: number;
  idleMs?: number;
  https?: { key: Buffer; cert: Buffer };
  /** The console's static files (index.html ...). */
  staticDir?: string;
  /** Login attempts per address and minute. */
  loginPerMinute?: number;
  log?: (line: string) => void;
}

export interface WebServer {
  app: FastifyInstance;
  jobs: JobManager;
  pool: SessionPool<Browse>;
  close(): Promise<void>;
}

interface User {
  name: string;
  role: Role;
  via: 'bearer' | 'cookie';
}

declare module 'fastify' {
  interface FastifyRequest {
    user?: User;
  }
  interface FastifyContextConfig {
    need?: Need | 'none';
  }
  interface Session {
    user?: { name: string; role: Role; sha256: string };
  }
}

/** A pooled file session plus the listings it served (paging a big directory lists it once). */
interface Browse {
  s: FilesSession;
  listings: Map<string, { dir: boolean; path: string; entries: ListEntry[] }>;
}

const LISTING_CACHE = 8;
const MAX_PAGE = 10000;

export function errorBody(e: unknown): {
  status: number;
  body: { error: { code: string; exitCode: number; message: string } };
} {
  const err = codedFsError(e);
  if (isBkfsError(err)) {
    const status = (err as BkfsError & { statusCode?: number }).statusCode ?? HTTP_STATUS[err.code];
    return {
      status,
      body: { error: { code: err.code, exitCode: EXIT_CODES[err.code], message: err.message } },
    };
  }
  const fe = err as { code?: string; statusCode?: number; message?: string; validation?: unknown };
  const coded = (code: ErrorCode, status: number, message: string) => ({
    status,
    body: { error: { code, exitCode: EXIT_CODES[code], message } },
  });
  if (fe.validation !== undefined || fe.code === 'FST_ERR_VALIDATION')
    return coded('USAGE', 400, fe.message ?? 'bad request');
  if (typeof fe.code === 'string' && fe.code.startsWith('FST_CSRF_'))
    return coded('PERMISSION_DENIED', 403, 'missing or invalid CSRF token (send the x-csrf-token header)');
  if (typeof fe.code === 'string' && fe.code.startsWith('FST_ERR_CTP_'))
    return coded('USAGE', fe.statusCode ?? 400, fe.message ?? 'bad request body');
  if (fe.statusCode !== undefined && fe.statusCode >= 400 && fe.statusCode < 500)
    return coded('USAGE', fe.statusCode, fe.message ?? 'bad request');
  return {
    status: 500,
    body: { error: { code: 'INTERNAL', exitCode: EXIT_INTERNAL, message: errorMessage(err) } },
  };
}

function contentDisposition(name: string): string {
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, '_');
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(name)}`;
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

const nameParam = { type: 'string', maxLength: 128 } as const;
const vmParams = { type: 'object', properties: { vm: nameParam }, required: ['vm'] } as const;
const cpParams = {
  type: 'object',
  properties: { vm: nameParam, cp: nameParam },
  required: ['vm', 'cp'],
} as const;
const diskParams = {
  type: 'object',
  properties: { vm: nameParam, cp: nameParam, disk: nameParam },
  required: ['vm', 'cp', 'disk'],
} as const;
const pathQuery = {
  path: { type: 'string', maxLength: 4096, description: 'absolute guest path' },
  volume: { type: 'string', maxLength: 256, description: 'vda:2, vdb, vg/lv, LABEL=x, UUID=x' },
} as const;

export async function createWebServer(o: WebServerOptions): Promise<WebServer> {
  const log = o.log ?? (() => undefined);
  const repo = Repository.open(o.repoDir, { readOnly: true });
  const audit = new AuditLog(o.auditFile);
  const stop = new AbortController();
  const jobs = new JobManager();
  const pool = new SessionPool<Browse>({
    max: o.maxSessions ?? 2,
    idleMs: o.idleMs ?? 5 * 60_000,
    close: async (b) => b.s.close(),
    onNotice: log,
  });
  const https = o.https !== undefined;
  const app = Fastify({
    logger: false,
    ...(o.https ? { https: { key: o.https.key, cert: o.https.cert } } : {}),
    bodyLimit: 1 << 20,
    routerOptions: { maxParamLength: 256 },
  } as Parameters<typeof Fastify>[0]) as unknown as FastifyInstance;

  await app.register(import('@fastify/cookie'));
  await app.register(import('@fastify/session'), {
    secret: randomBytes(32).toString('hex'),
    cookieName: 'bkfs_session',
    saveUninitialized: false,
    cookie: { secure: https, httpOnly: true, sameSite: 'strict', path: '/', maxAge: 12 * 3600 * 1000 },
  });
  await app.register(import('@fastify/csrf-protection'), { sessionPlugin: '@fastify/session' });
  await app.register(import('@fastify/rate-limit'), { global: false });
  await app.register(import('@fastify/swagger'), {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'bkfs web API',
        version: '1',
        description:
          'Browse, download and restore bkfs checkpoints. Errors: {"error": {"code", "exitCode", "message"}} with the HTTP status of the code (README, "Exit codes"). Contract with JSON shapes: src/web/api.md.',
      },
      components: {
        securitySchemes: {
          bearer: { type: 'http', scheme: 'bearer' },
          cookie: { type: 'apiKey', in: 'cookie', name: 'bkfs_session' },
        },
      },
      security: [{ bearer: [] }, { cookie: [] }],
    },
  });

  // Raw bodies (disk uploads) stay streams; JSON keeps the default parser.
  app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));

  app.setErrorHandler((e, req, reply) => {
    const { status, body } = errorBody(e);
    if (status >= 500) log(`${req.method} ${req.url}: ${body.error.code}: ${body.error.message}`);
    if (status === 416) void reply.header('content-range', `bytes */${(e as { size?: number }).size ?? 0}`);
    void reply.code(status).header('cache-control', 'no-store').send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    void reply
      .code(404)
      .send({
        error: {
          code: 'NOT_FOUND',
          exitCode: EXIT_CODES.NOT_FOUND,
          message: `no route ${req.method} ${req.url}`,
        },
      });
  });

  app.addHook('onSend', async (req, reply, payload) => {
    reply.header('x-content-type-options', 'nosniff');
    reply.header('referrer-policy', 'no-referrer');
    reply.header('x-frame-options', 'DENY');
    reply.header(
      'content-security-policy',
      "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    );
    if (req.url.startsWith('/api/')) reply.header('cache-control', 'no-store');
    return payload;
  });

  // Authentication and roles.
  app.addHook('preHandler', async (req) => {
    const need = req.routeOptions.config.need ?? (req.url.startsWith('/api/') ? 'read' : 'none');
    if (need === 'none') return;
    const tokens = readTokens(o.tokensFile);
    const bearer = bearerToken(req.headers.authorization);
    let user: User | undefined;
    if (bearer !== undefined) {
      const r = findToken(tokens, bearer);
      if (!r) throw new BkfsError('UNAUTHORIZED', 'unknown or removed API token');
      user = { name: r.name, role: r.role, via: 'bearer' };
    } else if (req.session.user) {
      const su = req.session.user;
      const r = tokens.find((t) => t.sha256 === su.sha256 && t.name === su.name);
      if (!r) {
        await req.session.destroy();
        throw new BkfsError('UNAUTHORIZED', 'the token of this session was removed; log in again');
      }
      user = { name: r.name, role: r.role, via: 'cookie' };
    }
    if (!user)
      throw new BkfsError('UNAUTHORIZED', 'log in (POST /api/login) or send Authorization: Bearer TOKEN');
    req.user = user;
    if (!allowed(user.role, need)) {
      throw new BkfsError(
        'PERMISSION_DENIED',
        `token '${user.name}' is read-only; this needs an operator token`,
      );
    }
  });
  // CSRF: cookie-authenticated requests that change state.
  app.addHook('preHandler', (req, reply, done) => {
    const safe = req.method === 'GET' || req.method === 'HEAD' || req.method === 'OPTIONS';
    if (safe || req.user?.via !== 'cookie') {
      done();
      return;
    }
    app.csrfProtection(req, reply, done);
  });

  const auditEntry = (req: FastifyRequest, entry: Record<string, unknown>) => {
    try {
      audit.write({ user: req.user?.name ?? null, role: req.user?.role ?? null, address: req.ip, ...entry });
    } catch (e) {
      log(`audit log: ${errorMessage(e)}`);
    }
  };

  const send = (reply: FastifyReply, v: unknown, status = 200) => reply.code(status).send(jsonValue(v));

  // ---------------------------------------------------------------------------------------------
  // Catalogue lookups

  const rows = (vm: string, cp: string): { vm: VmRow; checkpoint: CheckpointRow } =>
    resolveRef(repo.db, `${vm}@${cp}`);

  const openBrowse = (vm: VmRow, cps: CheckpointRow[]) => async (): Promise<Browse> => ({
    s: await FilesSession.open(repo, vm, cps, {
      ...(o.engine ? { engine: o.engine } : {}),
      ...(o.guestfsTcg ? { guestfsTcg: true } : {}),
      onNotice: log,
      signal: stop.signal,
    }),
    listings: new Map(),
  });

  /**
   * The checkpoints a file session for `want` covers: every checkpoint of the VM when their disks
   * fit one appliance (MAX_DRIVES), so browsing, find and diff of a VM share one appliance;
   * otherwise the neighbours of `want` (as the CLI does).
   */
  const sessionSet = (vm: VmRow, want: CheckpointRow[]): CheckpointRow[] => {
    const all = listCheckpoints(repo.db, vm.id);
    const disks = (c: CheckpointRow) => Math.max(1, checkpointDisks(repo.db, c.id).length);
    const total = all.reduce((a, c) => a + disks(c), 0);
    if (total <= MAX_DRIVES && want.every((w) => all.some((c) => c.id === w.id))) return all;
    if (want.length !== 1) return want;
    const first = all.find((c) => c.id === want[0]!.id) ?? want[0]!;
    return neighbours(all, first, disks, MAX_DRIVES).sort((x, y) => x.id - y.id);
  };

  /** Run `fn` on a file session holding `want` (one request at a time on it); damage reported as such. */
  const withFiles = <T>(vm: VmRow, want: CheckpointRow[], fn: (b: Browse) => Promise<T>): Promise<T> => {
    const cps = sessionSet(vm, want);
    const key = `${vm.id}:${cps.map((c) => c.id).join(',')}`;
    return pool.use(key, openBrowse(vm, cps), async (b) => {
      try {
        return await fn(b);
      } catch (e) {
        const d = b.s.damage.first;
        if (d) {
          delete b.s.damage.first;
          throw d;
        }
        throw e;
      }
    });
  };

  /** The session target of a request: checkpoint, volume, guest path (through the CLI's parser). */
  const target = (vm: VmRow, cp: CheckpointRow, q: { path?: string; volume?: string }): Target => {
    const p = checkGuestPath(q.path);
    const volume = checkVolume(q.volume);
    const a = parseFileAddress(`${vm.name}@${cp.name}:${volume !== undefined ? `${volume}:` : ''}${p}`);
    const t: Target = { checkpoint: cp.name, path: a.path ?? '/' };
    if (a.volume) t.volume = a.volume;
    return t;
  };

  const listing = async (b: Browse, t: Target) => {
    const key = `${JSON.stringify(t.volume ?? null)}|${t.path}`;
    let l = b.listings.get(key);
    if (!l) {
      l = await b.s.list(t);
      b.listings.set(key, l);
      if (b.listings.size > LISTING_CACHE) b.listings.delete(b.listings.keys().next().value as string);
    }
    return l;
  };

  // ---------------------------------------------------------------------------------------------
  // Auth routes

  app.post(
    '/api/login',
    {
      config: {
        need: 'none',
        rateLimit: {
          max: o.loginPerMinute ?? 10,
          timeWindow: 60_000,
          errorResponseBuilder: () =>
            Object.assign(new BkfsError('UNAUTHORIZED', 'too many login attempts; wait a minute'), {
              statusCode: 429,
            }),
        },
      },
      schema: {
        summary: 'exchange a token for a session cookie',
        tags: ['auth'],
        security: [],
        body: {
          type: 'object',
          properties: { token: { type: 'string', maxLength: 200 } },
          required: ['token'],
        },
      },
    },
    async (req, reply) => {
      const { token } = req.body as { token: string };
      const r = findToken(readTokens(o.tokensFile), token);
      if (!r) {
        auditEntry(req, { action: 'login', outcome: 'refused' });
        throw new BkfsError('UNAUTHORIZED', 'unknown token');
      }
      await req.session.regenerate();
      req.session.user = { name: r.name, role: r.role, sha256: r.sha256 };
      req.user = { name: r.name, role: r.role, via: 'cookie' };
      const csrfToken = reply.generateCsrf();
      auditEntry(req, { action: 'login', outcome: 'ok' });
      return send(reply, { name: r.name, role: r.role, csrfToken });
    },
  );

  app.post(
    '/api/logout',
    { config: { need: 'read' }, schema: { summary: 'end the session', tags: ['auth'] } },
    async (req, reply) => {
      if (req.user?.via === 'cookie') await req.session.destroy();
      return send(reply, { ok: true });
    },
  );

  app.get(
    '/api/session',
    { config: { need: 'read' }, schema: { summary: 'who is logged in; the CSRF token', tags: ['auth'] } },
    async (req, reply) => {
      const u = req.user as User;
      return send(reply, {
        name: u.name,
        role: u.role,
        csrfToken: u.via === 'cookie' ? reply.generateCsrf() : null,
      });
    },
  );

  app.get('/api/openapi.json', { config: { need: 'none' }, schema: { hide: true } }, async () =>
    app.swagger(),
  );

  // ---------------------------------------------------------------------------------------------
  // Catalogue

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
      const { getVm, listCheckpoints } = await import('../index/catalog');
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
      const { vm, checkpoint } = rows(p.vm, p.cp);
      return send(reply, {
        ...checkpointView(repo, vm.name, checkpoint),
        configs: configsOf(repo, checkpoint),
      });
    },
  );

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
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const { overviewOf } = await import('../files/ops');
      const r = await withFiles(vm, [checkpoint], (b) => overviewOf(b.s, vm.name, checkpoint.name));
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
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const q = req.query as {
        path?: string;
        volume?: string;
        offset: number;
        limit: number;
        sort: string;
        order: string;
      };
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const t = target(vm, checkpoint, q);
      const l = await withFiles(vm, [checkpoint], (b) => listing(b, t));
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
    },
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
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const t = target(vm, checkpoint, req.query as { path: string });
      const e = await withFiles(vm, [checkpoint], async (b) => {
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
    },
  );

  /** Resolve a regular file (following symlinks inside the guest) and its size. */
  const regularFile = async (b: Browse, t: Target) => {
    const r = await b.s.resolve(t, { followLast: true, recursive: false, hint: false });
    if (r.kind === 'dir') throw new BkfsError('USAGE', `${t.path} is a directory`);
    if (r.kind !== 'file') throw new BkfsError('USAGE', `${t.path} is not a regular file`);
    const st = await r.engine.lstat(r.path);
    if (!st) throw new BkfsError('NOT_FOUND', `${t.path} vanished`);
    return { engine: r.engine, path: r.path, size: st.size };
  };

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
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const q = req.query as { path: string; volume?: string; maxBytes: number };
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const t = target(vm, checkpoint, q);
      const r = await withFiles(vm, [checkpoint], async (b) => {
        const f = await regularFile(b, t);
        if (f.size > q.maxBytes)
          return { path: f.path, size: f.size, tooLarge: true, binary: false, text: null };
        const c = new Collect();
        await f.engine.catTo(f.path, c);
        const text = isUtf8Text(Buffer.concat(c.chunks));
        return { path: f.path, size: f.size, tooLarge: false, binary: text === null, text };
      });
      return send(reply, r);
    },
  );

  /**
   * Send a stream produced inside a file session: the reply starts at once; the session is held
   * until `produce` has written everything (or the client went away).
   */
  const streamFromSession = async (
    req: FastifyRequest,
    reply: FastifyReply,
    vm: VmRow,
    cps: CheckpointRow[],
    prepare: (
      b: Browse,
    ) => Promise<{ headers: Record<string, string | number>; stream: Readable; run: () => Promise<void> }>,
    auditInfo: Record<string, unknown>,
  ): Promise<FastifyReply> => {
    let started = false;
    await withFiles(vm, cps, async (b) => {
      const job = await prepare(b);
      for (const [k, v] of Object.entries(job.headers)) void reply.header(k, v);
      started = true;
      void reply.send(job.stream);
      try {
        await job.run();
        auditEntry(req, { ...auditInfo, outcome: 'ok' });
      } catch (e) {
        auditEntry(req, { ...auditInfo, outcome: 'failed', error: errorMessage(e) });
        job.stream.destroy(e as Error); // cut the connection: the client sees an incomplete transfer
      }
    });
    if (!started) throw new Error('no reply'); // not reached: prepare threw
    return reply;
  };

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
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const t = target(vm, checkpoint, req.query as { path: string });
      return streamFromSession(
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
    },
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
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const q = req.query as { path: string; volume?: string; format: ArchiveFormat };
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const t = target(vm, checkpoint, q);
      return streamFromSession(
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
    },
  );

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
    async (req, reply) => {
      const { vm: vmName } = req.params as { vm: string };
      const q = req.query as {
        pattern: string;
        checkpoint?: string;
        path?: string;
        volume?: string;
        ignoreCase: boolean;
      };
      const { getVm, listCheckpoints } = await import('../index/catalog');
      const vm = getVm(repo.db, vmName);
      const cps = q.checkpoint ? [rows(vm.name, q.checkpoint).checkpoint] : listCheckpoints(repo.db, vm.id);
      if (cps.length === 0) throw new BkfsError('NOT_FOUND', `VM '${vm.name}' has no checkpoints`);
      const match = pathMatcher(q.pattern, q.ignoreCase);
      // Groups of checkpoints that fit one appliance (MAX_DRIVES disks), newest first kept together.
      const groups: CheckpointRow[][] = [];
      let cur: CheckpointRow[] = [];
      let disks = 0;
      for (const c of cps) {
        const n = Math.max(1, checkpointView(repo, vm.name, c).disks.length);
        if (cur.length > 0 && disks + n > MAX_DRIVES) {
          groups.push(cur);
          cur = [];
          disks = 0;
        }
        cur.push(c);
        disks += n;
      }
      if (cur.length > 0) groups.push(cur);
      const per: { checkpoint: string; matches: Map<string, FileEntry> }[] = [];
      const missing: string[] = [];
      for (const g of groups) {
        await withFiles(vm, g, async (b) => {
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
    },
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
    async (req, reply) => {
      const { vm: vmName } = req.params as { vm: string };
      const q = req.query as { from: string; to: string; path?: string; volume?: string; checksum: boolean };
      const a = rows(vmName, q.from);
      const bRow = rows(vmName, q.to).checkpoint;
      const vm = a.vm;
      const ta = target(vm, a.checkpoint, q);
      const tb = target(vm, bRow, q);
      const cps = a.checkpoint.id === bRow.id ? [bRow] : [a.checkpoint, bRow].sort((x, y) => x.id - y.id);
      const r = await withFiles(vm, cps, async (b) => {
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
    },
  );

  // ---------------------------------------------------------------------------------------------
  // Disks

  const diskRow = (vm: string, cp: string, disk: string) => {
    const r = rows(vm, cp);
    const reader = new CheckpointReader(repo, r.vm, r.checkpoint, { cacheBytes: 64 << 20 });
    const d = reader.disk(disk);
    return { ...r, reader, disk: d };
  };

  app.get(
    '/api/vms/:vm/checkpoints/:cp/disks',
    { schema: { summary: 'disks of a checkpoint', tags: ['disks'], params: cpParams } },
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { checkpoint } = rows(p.vm, p.cp);
      const { checkpointDisks } = await import('../index/catalog');
      return send(
        reply,
        checkpointDisks(repo.db, checkpoint.id).map((d) => ({ name: d.name, virtualSize: d.virtual_size })),
      );
    },
  );

  app.get(
    '/api/vms/:vm/checkpoints/:cp/disks/:disk',
    { schema: { summary: 'the raw disk (Range supported)', tags: ['disks'], params: diskParams } },
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string; disk: string };
      const { vm, checkpoint, reader, disk } = diskRow(p.vm, p.cp, p.disk);
      const size = disk.virtual_size;
      const range = parseRange(req.headers.range, size);
      if (range === 'unsatisfiable') {
        throw Object.assign(new BkfsError('USAGE', `range not satisfiable (disk is ${size} bytes)`), {
          statusCode: 416,
          size,
        });
      }
      const r = range ?? { start: 0, end: size };
      const pin = pinCheckpoints(repo, [checkpoint.id]);
      const info = {
        action: 'disk',
        vm: vm.name,
        checkpoint: checkpoint.name,
        disk: disk.name,
        start: r.start,
        end: r.end,
      };
      const stream = diskStream(reader, disk.name, r, () => pin.release());
      stream.on('error', (e) => auditEntry(req, { ...info, outcome: 'failed', error: errorMessage(e) }));
      stream.on('end', () => auditEntry(req, { ...info, outcome: 'ok' }));
      void reply
        .header('accept-ranges', 'bytes')
        .header('content-type', 'application/octet-stream')
        .header('content-length', r.end - r.start)
        .header('content-disposition', contentDisposition(`${vm.name}-${checkpoint.name}-${disk.name}.raw`));
      if (range) void reply.code(206).header('content-range', `bytes ${r.start}-${r.end - 1}/${size}`);
      return reply.send(stream);
    },
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
      const { reader, disk } = diskRow(p.vm, p.cp, p.disk);
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
    async (req, reply) => {
      const { file } = req.params as { file: string };
      const { force } = req.query as { force: boolean };
      if (!o.restoreRoot)
        throw new BkfsError('TARGET_INVALID', 'this server was started without --restore-root');
      if (file.includes('/') || file.startsWith('.'))
        throw new BkfsError('TARGET_INVALID', `bad file name '${file}'`);
      const dest = targetInRoot(o.restoreRoot, file);
      if (fs.existsSync(dest) && !force)
        throw new BkfsError('TARGET_EXISTS', `${file} exists (add ?force=true)`);
      const body = req.body as Readable | undefined;
      if (!body || typeof (body as { pipe?: unknown }).pipe !== 'function') {
        throw new BkfsError(
          'USAGE',
          'send the image as the body with Content-Type: application/octet-stream',
        );
      }
      const partial = `${dest}.bkfs-partial`;
      let bytes = 0;
      const info = { action: 'upload', path: dest };
      try {
        const fh = await fsp.open(partial, 'wx', 0o600);
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
        await fsp.rename(partial, dest);
      } catch (e) {
        await fsp.rm(partial, { force: true });
        auditEntry(req, { ...info, outcome: 'failed', error: errorMessage(e) });
        if ((e as NodeJS.ErrnoException).code === 'EEXIST')
          throw new BkfsError('TARGET_EXISTS', `${file} is being uploaded by another request`);
        throw e;
      }
      auditEntry(req, { ...info, bytes, outcome: 'ok' });
      return send(reply, { path: dest, bytes });
    },
  );

  // ---------------------------------------------------------------------------------------------
  // Jobs (restore)

  const jobsNeed = { need: 'operate' as const };

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
    async (req, reply) => {
      const b = req.body as {
        vm: string;
        checkpoint: string;
        disk?: string;
        to: string;
        format?: 'raw' | 'qcow2';
        force: boolean;
      };
      const { vm, checkpoint } = rows(b.vm, b.checkpoint);
      const { isNbdUri } = await import('../restore/targets');
      let to: string;
      if (isNbdUri(b.to)) {
        if (b.disk === undefined) throw new BkfsError('USAGE', 'an NBD target takes one disk: give disk');
        to = b.to;
      } else {
        if (!o.restoreRoot)
          throw new BkfsError(
            'TARGET_INVALID',
            'this server was started without --restore-root: only NBD targets',
          );
        to = targetInRoot(o.restoreRoot, b.to);
      }
      if (b.disk !== undefined) new CheckpointReader(repo, vm, checkpoint).disk(b.disk); // NOT_FOUND now
      const { runRestore } = await import('../restore/engine');
      const info = { action: 'restore', vm: vm.name, checkpoint: checkpoint.name, disk: b.disk ?? null, to };
      auditEntry(req, { ...info, outcome: 'started' });
      const job = jobs.start(
        {
          kind: 'restore',
          vm: vm.name,
          checkpoint: checkpoint.name,
          disk: b.disk ?? null,
          to,
          user: req.user?.name ?? '',
        },
        (ctx) =>
          runRestore(repo, {
            ref: `${vm.name}@${checkpoint.name}`,
            to,
            ...(b.disk !== undefined ? { disk: b.disk } : {}),
            ...(b.format !== undefined ? { format: b.format } : {}),
            force: b.force,
            signal: ctx.signal,
            onProgress: (p) => ctx.onProgress(p),
            onNotice: log,
          }),
        (j: Job) =>
          auditEntry(req, {
            ...info,
            job: j.id,
            outcome: j.state,
            ...(j.error ? { code: j.error.code } : {}),
          }),
      );
      return send(reply, job, 202);
    },
  );

  app.get(
    '/api/jobs',
    { config: jobsNeed, schema: { summary: 'jobs of this server', tags: ['operator'] } },
    async (_req, reply) => send(reply, jobs.list()),
  );

  const jobParams = {
    type: 'object',
    properties: { id: { type: 'string', maxLength: 64 } },
    required: ['id'],
  } as const;

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
      auditEntry(req, { action: 'cancel', job: j.id });
      return send(reply, j);
    },
  );

  app.get(
    '/api/jobs/:id/events',
    {
      config: jobsNeed,
      schema: { summary: 'progress of a job (server-sent events)', tags: ['operator'], params: jobParams },
    },
    async (req, reply) => {
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
    },
  );

  // ---------------------------------------------------------------------------------------------
  // Protect, unprotect, forget (writers: a writable repository opened for the call)

  const withWriter = async <T>(fn: (w: Repository) => T): Promise<T> => {
    const w = Repository.open(o.repoDir);
    try {
      return fn(w);
    } finally {
      w.close();
    }
  };

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
      async (req, reply) => {
        const p = req.params as { vm: string; cp: string };
        const { vm, checkpoint } = rows(p.vm, p.cp);
        const { setProtected } = await import('../repo/forget');
        const ref = `${vm.name}@${checkpoint.name}`;
        const changed = await withWriter((w) => setProtected(w, [ref], value));
        auditEntry(req, {
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
      },
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
    async (req, reply) => {
      const p = req.params as { vm: string; cp: string };
      const { confirm } = req.query as { confirm: string };
      const { vm, checkpoint } = rows(p.vm, p.cp);
      const ref = `${vm.name}@${checkpoint.name}`;
      if (confirm !== ref) throw new BkfsError('USAGE', `to forget ${ref}, confirm with confirm=${ref}`);
      const { forgetByName } = await import('../repo/forget');
      const r = await withWriter((w) => forgetByName(w, [ref]));
      auditEntry(req, { action: 'forget', vm: vm.name, checkpoint: checkpoint.name, outcome: 'ok' });
      return send(reply, {
        removed: r.removed.map((x) => ({ vm: x.vm, name: x.name, level: x.level, time: x.time })),
      });
    },
  );

  // ---------------------------------------------------------------------------------------------
  // The console's static files (anonymous: they hold no data)

  if (o.staticDir && fs.existsSync(o.staticDir)) {
    await app.register(import('@fastify/static'), {
      root: path.resolve(o.staticDir),
      prefix: '/',
      index: 'index.html',
    });
  } else {
    app.get('/', { config: { need: 'none' }, schema: { hide: true } }, async (_req, reply) =>
      reply
        .type('text/plain')
        .send('bkfs web: the console is not installed; the API is at /api/ (see /api/openapi.json)\n'),
    );
  }

  await app.ready();

  let closed = false;
  return {
    app,
    jobs,
    pool,
    close: async () => {
      if (closed) return;
      closed = true;
      stop.abort(new BkfsError('INTERRUPTED', 'the server is stopping'));
      await jobs.stopAll();
      await app.close();
      await pool.closeAll();
      audit.close();
      repo.close();
    },
  };
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
