/**
 * What the routes of `bkfs web` share (src/web/server.ts builds it; the routes-*.ts modules take
 * it): the server's options, the read-only repository, the audit log, restore jobs and the pool of
 * file sessions; and the helpers every route module needs: catalogue lookups, running work on a
 * pooled file session, audit entries, JSON replies.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import { errorMessage } from '../errors';
import { jsonValue } from '../cli/json';
import {
  checkpointDisks,
  listCheckpoints,
  resolveRef,
  type CheckpointRow,
  type VmRow,
} from '../index/catalog';
import type { Repository } from '../repo/repository';
import { parseFileAddress } from '../files/address';
import type { EngineChoice } from '../files/engine';
import { FilesSession, neighbours, type ListEntry, type Target } from '../files/session';
import { MAX_DRIVES } from '../files/ops';
import type { Need, Role } from './auth';
import type { SessionPool } from './pool';
import { checkGuestPath, checkVolume } from './paths';
import type { JobManager } from './jobs';
import type { AuditLog } from './state';

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

/** The caller of a request, set by the authentication hook. */
export interface User {
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

/** What FilesSession.list gives: a directory's entries, or (`dir` false) the one entry a path names. */
export interface Listing {
  dir: boolean;
  path: string;
  entries: ListEntry[];
}

/** A pooled file session plus the listings it served (paging a big directory lists it once). */
export interface Browse {
  s: FilesSession;
  listings: Map<string, Listing>;
}

/** The state the routes share. */
export interface WebContext {
  options: WebServerOptions;
  /** The repository, opened read-only for the server's life (writers open their own). */
  repo: Repository;
  audit: AuditLog;
  jobs: JobManager;
  pool: SessionPool<Browse>;
  log: (line: string) => void;
  /** Aborted when the server stops (file sessions being opened give up). */
  signal: AbortSignal;
}

/** Append to the audit log: who (user, role, address) did what; a failing audit log is logged. */
export function auditEntry(ctx: WebContext, req: FastifyRequest, entry: Record<string, unknown>): void {
  try {
    ctx.audit.write({
      user: req.user?.name ?? null,
      role: req.user?.role ?? null,
      address: req.ip,
      ...entry,
    });
  } catch (e) {
    ctx.log(`audit log: ${errorMessage(e)}`);
  }
}

/** A JSON reply (the CLI's JSON conventions: jsonValue). */
export function send(reply: FastifyReply, v: unknown, status = 200): FastifyReply {
  return reply.code(status).send(jsonValue(v));
}

export function contentDisposition(name: string): string {
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, '_');
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(name)}`;
}

// -------------------------------------------------------------------------------------------------
// Catalogue lookups and file sessions

/** The rows of VM@CP (NOT_FOUND as the CLI's). */
export function rows(ctx: WebContext, vm: string, cp: string): { vm: VmRow; checkpoint: CheckpointRow } {
  return resolveRef(ctx.repo.db, `${vm}@${cp}`);
}

function openBrowse(ctx: WebContext, vm: VmRow, cps: CheckpointRow[]): () => Promise<Browse> {
  const o = ctx.options;
  return async () => ({
    s: await FilesSession.open(ctx.repo, vm, cps, {
      ...(o.engine ? { engine: o.engine } : {}),
      ...(o.guestfsTcg ? { guestfsTcg: true } : {}),
      onNotice: ctx.log,
      signal: ctx.signal,
    }),
    listings: new Map(),
  });
}

/**
 * The checkpoints a file session for `want` covers: every checkpoint of the VM when their disks
 * fit one appliance (MAX_DRIVES), so browsing, find and diff of a VM share one appliance;
 * otherwise the neighbours of `want` (as the CLI does).
 */
function sessionSet(ctx: WebContext, vm: VmRow, want: CheckpointRow[]): CheckpointRow[] {
  const db = ctx.repo.db;
  const all = listCheckpoints(db, vm.id);
  const disks = (c: CheckpointRow) => Math.max(1, checkpointDisks(db, c.id).length);
  const total = all.reduce((a, c) => a + disks(c), 0);
  if (total <= MAX_DRIVES && want.every((w) => all.some((c) => c.id === w.id))) return all;
  if (want.length !== 1) return want;
  const first = all.find((c) => c.id === want[0]!.id) ?? want[0]!;
  return neighbours(all, first, disks, MAX_DRIVES).sort((x, y) => x.id - y.id);
}

/** Run `fn` on a file session holding `want` (one request at a time on it); damage reported as such. */
export function withFiles<T>(
  ctx: WebContext,
  vm: VmRow,
  want: CheckpointRow[],
  fn: (b: Browse) => Promise<T>,
): Promise<T> {
  const cps = sessionSet(ctx, vm, want);
  const key = `${vm.id}:${cps.map((c) => c.id).join(',')}`;
  return ctx.pool.use(key, openBrowse(ctx, vm, cps), async (b) => {
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
}

/** The session target of a request: checkpoint, volume, guest path (through the CLI's parser). */
export function target(vm: VmRow, cp: CheckpointRow, q: { path?: string; volume?: string }): Target {
  const p = checkGuestPath(q.path);
  const volume = checkVolume(q.volume);
  const a = parseFileAddress(`${vm.name}@${cp.name}:${volume !== undefined ? `${volume}:` : ''}${p}`);
  const t: Target = { checkpoint: cp.name, path: a.path ?? '/' };
  if (a.volume) t.volume = a.volume;
  return t;
}
