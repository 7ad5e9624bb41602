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
 * This module builds the app (plugins, hooks, error mapping, OpenAPI) and registers the routes of
 * the routes-*.ts modules in order; what they share is a WebContext (context.ts).
 *
 * Nothing here prints: log lines go to `log`, audit entries to the audit log.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import { BkfsError, errorMessage, isBkfsError, type ErrorCode } from '../errors';
import { EXIT_CODES, EXIT_INTERNAL, HTTP_STATUS } from '../cli/exit-codes';
import { codedFsError } from '../util/userpath';
import { Repository } from '../repo/repository';

import { allowed, bearerToken, findToken, readTokens } from './auth';
import { SessionPool } from './pool';
import { JobManager } from './jobs';
import { AuditLog } from './state';
import type { Browse, User, WebContext, WebServerOptions } from './context';
import { registerAuthRoutes } from './routes-auth';
import { registerCatalogRoutes } from './routes-catalog';
import { registerBrowseRoutes } from './routes-browse';
import { registerFileRoutes } from './routes-files';
import { registerSearchRoutes } from './routes-search';
import { registerDiskRoutes } from './routes-disks';
import { registerJobRoutes } from './routes-jobs';
import { registerRetentionRoutes } from './routes-retention';

export type { WebServerOptions } from './context';

export interface WebServer {
  app: FastifyInstance;
  jobs: JobManager;
  pool: SessionPool<Browse>;
  close(): Promise<void>;
}

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
  const ctx: WebContext = { options: o, repo, audit, jobs, pool, log, signal: stop.signal };

  const app = await buildApp(o);
  handleErrors(app, log);
  addHeaders(app);
  authenticate(app, o.tokensFile);

  registerAuthRoutes(app, ctx);
  registerCatalogRoutes(app, ctx);
  registerBrowseRoutes(app, ctx);
  registerFileRoutes(app, ctx);
  registerSearchRoutes(app, ctx);
  registerDiskRoutes(app, ctx);
  registerJobRoutes(app, ctx);
  registerRetentionRoutes(app, ctx);
  await registerConsole(app, o.staticDir);

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

/** Fastify with its plugins: cookie, session, CSRF protection, rate limit, swagger; raw uploads. */
async function buildApp(o: WebServerOptions): Promise<FastifyInstance> {
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
  return app;
}

/** Errors as JSON bodies with the HTTP status of their code (errorBody); unknown routes too. */
function handleErrors(app: FastifyInstance, log: (line: string) => void): void {
  app.setErrorHandler((e, req, reply) => {
    const { status, body } = errorBody(e);
    if (status >= 500) log(`${req.method} ${req.url}: ${body.error.code}: ${body.error.message}`);
    if (status === 416) void reply.header('content-range', `bytes */${(e as { size?: number }).size ?? 0}`);
    void reply.code(status).header('cache-control', 'no-store').send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send({
      error: {
        code: 'NOT_FOUND',
        exitCode: EXIT_CODES.NOT_FOUND,
        message: `no route ${req.method} ${req.url}`,
      },
    });
  });
}

/** Security headers on every reply; API replies are not cached. */
function addHeaders(app: FastifyInstance): void {
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
}

/**
 * Authentication and roles (bearer token or session cookie; the token file read on each request),
 * then CSRF protection of cookie-authenticated requests that change state.
 */
function authenticate(app: FastifyInstance, tokensFile: string): void {
  app.addHook('preHandler', async (req) => {
    const need = req.routeOptions.config.need ?? (req.url.startsWith('/api/') ? 'read' : 'none');
    if (need === 'none') return;
    const user = await requestUser(req, tokensFile);
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
}

/** The caller: its bearer token, else its session's (ended if the token was removed); UNAUTHORIZED. */
async function requestUser(req: FastifyRequest, tokensFile: string): Promise<User> {
  const tokens = readTokens(tokensFile);
  const bearer = bearerToken(req.headers.authorization);
  if (bearer !== undefined) {
    const r = findToken(tokens, bearer);
    if (!r) throw new BkfsError('UNAUTHORIZED', 'unknown or removed API token');
    return { name: r.name, role: r.role, via: 'bearer' };
  }
  if (req.session.user) {
    const su = req.session.user;
    const r = tokens.find((t) => t.sha256 === su.sha256 && t.name === su.name);
    if (!r) {
      await req.session.destroy();
      throw new BkfsError('UNAUTHORIZED', 'the token of this session was removed; log in again');
    }
    return { name: r.name, role: r.role, via: 'cookie' };
  }
  throw new BkfsError('UNAUTHORIZED', 'log in (POST /api/login) or send Authorization: Bearer TOKEN');
}

/** The console's static files (anonymous: they hold no data), or a note that it is not installed. */
async function registerConsole(app: FastifyInstance, staticDir: string | undefined): Promise<void> {
  if (staticDir && fs.existsSync(staticDir)) {
    await app.register(import('@fastify/static'), {
      root: path.resolve(staticDir),
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
}
