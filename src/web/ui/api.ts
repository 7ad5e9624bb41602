/**
 * The console's only door to the server: typed calls of the HTTP API (src/web/api.md). The session
 * cookie is sent by the browser; state-changing calls add the CSRF token the login returned.
 */

export type Role = 'operator' | 'read-only';

export interface Session {
  name: string;
  role: Role;
  csrfToken: string | null;
}

export interface Vm {
  name: string;
  checkpoints: number;
  latest: { name: string; time: string; level: string } | null;
  virtualSize: number;
  storedBytes: number;
  protected: number;
  damaged: number;
}

export interface CheckpointDisk {
  name: string;
  virtualSize: number;
  bytesRead: number;
  source: string | null;
  format: string | null;
  bitmap: string | null;
}

export interface Checkpoint {
  vm: string;
  name: string;
  level: string;
  parent: string | null;
  time: string;
  durationMs: number;
  disks: CheckpointDisk[];
  virtualSize: number;
  bytesRead: number;
  bytesNewRaw: number;
  bytesNewStored: number;
  chunksNew: number;
  logicalBytes?: number;
  libvirtCheckpoint: string | null;
  protected: boolean;
  damaged: boolean;
}

export interface OverviewVolume {
  id: string;
  disk: string | null;
  partition: number | null;
  lv: string | null;
  offset: number;
  size: number;
  type: string | null;
  label: string | null;
  uuid: string | null;
  partType: string | null;
  partLabel: string | null;
  mountpoint: string | null;
  note: string | null;
}

export interface Overview {
  vm: string;
  checkpoint: string;
  engine: string | null;
  disks: { name: string; size: number; table: string; partitions: number; warnings: string[] }[];
  volumes: OverviewVolume[];
  fstabFrom: string | null;
  skipped: { mountpoint: string; spec: string; reason: string }[];
}

export interface Entry {
  name: string;
  path: string;
  kind: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtime: string;
  target?: string | null;
}

export interface Listing {
  vm: string;
  checkpoint: string;
  volume: string | null;
  path: string;
  dir: boolean;
  total: number;
  offset: number;
  limit: number;
  entries: Entry[];
}

export interface Preview {
  path: string;
  size: number;
  /** size > maxBytes: no text. */
  tooLarge: boolean;
  binary: boolean;
  text: string | null;
}

export interface FileEntryJson {
  path: string;
  kind: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtime: string;
  target?: string;
}

export interface FindResult {
  vm: string;
  checkpoints: string[];
  missing: string[];
  matches: { path: string; history: { checkpoint: string; state: string; entry?: FileEntryJson }[] }[];
}

export interface DiffItem {
  path: string;
  change: 'added' | 'removed' | 'changed';
  what: string[];
  before?: FileEntryJson;
  after?: FileEntryJson;
}

export interface DiffResult {
  vm: string;
  from: string;
  to: string;
  path: string;
  checksummed: number;
  items: DiffItem[];
}

export interface ApiErrorBody {
  code: string;
  exitCode: number;
  message: string;
}

export interface Job {
  id: string;
  kind: string;
  state: 'running' | 'done' | 'failed' | 'cancelled';
  vm: string;
  checkpoint: string;
  disk: string | null;
  to: string;
  user: string;
  started: string;
  finished: string | null;
  done: number;
  total: number;
  result: unknown;
  error: ApiErrorBody | null;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

let csrf: string | null = null;
let onUnauthorized: (() => void) | null = null;

export function setCsrf(token: string | null): void {
  csrf = token;
}

/** Called when the server says the session is gone (401), so the app shows the login page. */
export function setUnauthorizedHandler(fn: () => void): void {
  onUnauthorized = fn;
}

type Query = Record<string, string | number | boolean | undefined | null>;

export function qs(q: Query): string {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v !== undefined && v !== null && v !== '') p.set(k, String(v));
  const s = p.toString();
  return s ? `?${s}` : '';
}

const enc = encodeURIComponent;

async function call<T>(
  method: string,
  url: string,
  body?: unknown,
  opts: { signal?: AbortSignal } = {},
): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (method !== 'GET' && csrf) headers['x-csrf-token'] = csrf;
  const res = await fetch(url, {
    method,
    headers,
    credentials: 'same-origin',
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  const text = await res.text();
  let data: unknown = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = (data as { error?: ApiErrorBody } | null)?.error;
    if (res.status === 401 && url !== '/api/login') onUnauthorized?.();
    throw new ApiError(
      res.status,
      e?.code ?? `HTTP_${res.status}`,
      e?.message ?? `${res.status} ${res.statusText}`,
    );
  }
  return data as T;
}

function cpBase(vm: string, cp: string): string {
  return `/api/vms/${enc(vm)}/checkpoints/${enc(cp)}`;
}

export const api = {
  login: (token: string) => call<Session>('POST', '/api/login', { token }),
  logout: () => call<{ ok: boolean }>('POST', '/api/logout', {}),
  session: () => call<Session>('GET', '/api/session'),
  vms: () => call<Vm[]>('GET', '/api/vms'),
  checkpoints: (vm: string) => call<Checkpoint[]>('GET', `/api/vms/${enc(vm)}/checkpoints`),
  checkpoint: (vm: string, cp: string) =>
    call<Checkpoint & { configs: { name: string; size: number }[] }>('GET', cpBase(vm, cp)),
  overview: (vm: string, cp: string) => call<Overview>('GET', `${cpBase(vm, cp)}/overview`),
  files: (
    vm: string,
    cp: string,
    q: { path: string; volume?: string | null; offset?: number; limit?: number },
    signal?: AbortSignal,
  ) => call<Listing>('GET', `${cpBase(vm, cp)}/files${qs(q)}`, undefined, signal ? { signal } : {}),
  preview: (vm: string, cp: string, q: { path: string; volume?: string | null; maxBytes?: number }) =>
    call<Preview>('GET', `${cpBase(vm, cp)}/preview${qs(q)}`),
  find: (
    vm: string,
    q: { pattern: string; checkpoint?: string; path?: string; volume?: string | null; ignoreCase?: boolean },
  ) => call<FindResult>('GET', `/api/vms/${enc(vm)}/find${qs(q)}`),
  diff: (
    vm: string,
    q: { from: string; to: string; path?: string; volume?: string | null; checksum?: boolean },
  ) => call<DiffResult>('GET', `/api/vms/${enc(vm)}/diff${qs(q)}`),
  protect: (vm: string, cp: string, on: boolean) =>
    call<{ protected: boolean; changed: boolean }>(
      'POST',
      `${cpBase(vm, cp)}/${on ? 'protect' : 'unprotect'}`,
      {},
    ),
  forget: (vm: string, cp: string) =>
    call<{ removed: { vm: string; name: string }[] }>(
      'DELETE',
      `${cpBase(vm, cp)}${qs({ confirm: `${vm}@${cp}` })}`,
    ),
  restore: (b: {
    vm: string;
    checkpoint: string;
    disk?: string;
    to: string;
    format?: 'raw' | 'qcow2';
    force?: boolean;
  }) => call<Job>('POST', '/api/jobs/restore', b),
  jobs: () => call<Job[]>('GET', '/api/jobs'),
  job: (id: string) => call<Job>('GET', `/api/jobs/${enc(id)}`),
  cancelJob: (id: string) => call<Job>('DELETE', `/api/jobs/${enc(id)}`),
};

/** URLs the browser fetches itself (downloads, event streams). */
export const urls = {
  download: (vm: string, cp: string, path: string, volume?: string | null) =>
    `${cpBase(vm, cp)}/download${qs({ path, volume })}`,
  archive: (vm: string, cp: string, path: string, format: 'zip' | 'tar.gz', volume?: string | null) =>
    `${cpBase(vm, cp)}/archive${qs({ path, volume, format })}`,
  disk: (vm: string, cp: string, disk: string) => `${cpBase(vm, cp)}/disks/${enc(disk)}`,
  jobEvents: (id: string) => `/api/jobs/${enc(id)}/events`,
};
