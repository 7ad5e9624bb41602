/**
 * Auth routes of `bkfs web`: log in (a token for a session cookie, rate-limited), log out, who is
 * logged in; and the OpenAPI document (anonymous).
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { BkfsError } from '../errors';
import { findToken, readTokens } from './auth';
import { auditEntry, send, type User, type WebContext } from './context';

export function registerAuthRoutes(app: FastifyInstance, ctx: WebContext): void {
  app.post(
    '/api/login',
    {
      config: {
        need: 'none',
        rateLimit: {
          max: ctx.options.loginPerMinute ?? 10,
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
    (req, reply) => login(ctx, req, reply),
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
}

async function login(ctx: WebContext, req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
  const { token } = req.body as { token: string };
  const r = findToken(readTokens(ctx.options.tokensFile), token);
  if (!r) {
    auditEntry(ctx, req, { action: 'login', outcome: 'refused' });
    throw new BkfsError('UNAUTHORIZED', 'unknown token');
  }
  await req.session.regenerate();
  req.session.user = { name: r.name, role: r.role, sha256: r.sha256 };
  req.user = { name: r.name, role: r.role, via: 'cookie' };
  const csrfToken = reply.generateCsrf();
  auditEntry(ctx, req, { action: 'login', outcome: 'ok' });
  return send(reply, { name: r.name, role: r.role, csrfToken });
}
