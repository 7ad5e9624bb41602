/**
 * NBD URIs (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md), the subset bkfs
 * can connect to:
 *
 *   nbd://host[:port][/export]                 TCP, port defaults to 10809
 *   nbd+unix:///[export]?socket=PATH            Unix domain socket
 *   nbds://host[:port][/export][?tls-...]       TCP with TLS (NBD_OPT_STARTTLS), x509 verified
 *   nbds+unix:///[export]?socket=PATH[&tls-...] Unix domain socket with TLS
 *
 * TLS parameters, spelled as libnbd spells them (nbds only):
 *   tls-certificates=DIR  x509 directory in qemu's layout: ca-cert.pem (the CA the server's
 *                         certificate must chain to), client-cert.pem + client-key.pem (optional,
 *                         for servers that verify clients). libvirt's pki layout (cacert.pem,
 *                         clientcert.pem, clientkey.pem) is read too. Without it: the system's CAs.
 *   tls-hostname=NAME     the name the server's certificate must carry (default: the URI's host;
 *                         for a Unix socket, "localhost").
 * Verification cannot be turned off (libnbd's tls-verify-peer=false is refused).
 *
 * The export name is the path without its leading '/', percent-decoded ('' is the default export).
 * Query values are percent-decoded as RFC 3986 says ('+' stays a plus). Anything else (vsock,
 * unknown parameters, TLS parameters on a plain nbd:// URI) is a `BkfsError('USAGE')` with one line.
 */
import { BkfsError } from '../errors';

export const NBD_DEFAULT_PORT = 10809;

/** TLS for an NBD connection (STARTTLS, then x509 verification of the server). */
export interface NbdTls {
  /** x509 directory (see the module comment); undefined: the system's CAs, no client certificate. */
  certDir?: string;
  /** Name the server's certificate must carry (default: the host; "localhost" for a socket). */
  hostname?: string;
}

export type NbdTarget =
  | { socket: string; exportName?: string; tls?: NbdTls }
  | { host: string; port: number; exportName?: string; tls?: NbdTls };

const TLS_PARAMS = new Set(['tls-certificates', 'tls-hostname']);

const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/;

function bad(uri: string, why: string): BkfsError {
  return new BkfsError('USAGE', `invalid NBD URI "${uri}": ${why}`, { uri });
}

function decode(uri: string, s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw bad(uri, `bad percent-encoding in ${what}`);
  }
}

/** Parse an NBD URI into a connection target. */
export function parseNbdUri(uri: string): NbdTarget {
  const m = URI_RE.exec(uri);
  if (!m) {
    throw bad(
      uri,
      'expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds:// and nbds+unix:// with TLS)',
    );
  }
  const scheme = (m[1] ?? '').toLowerCase();
  const authority = m[2] ?? '';
  const path = m[3] ?? '';
  const query = m[4];

  if (!['nbd', 'nbd+unix', 'nbds', 'nbds+unix'].includes(scheme)) {
    throw bad(uri, `unsupported scheme "${scheme}" (use nbd://, nbds://, nbd+unix:// or nbds+unix://)`);
  }
  const useTls = scheme.startsWith('nbds');
  const unix = scheme.endsWith('+unix');

  if (path !== '' && !path.startsWith('/')) throw bad(uri, 'the export name must follow a "/"');
  const exportName = decode(uri, path.slice(1), 'the export name');
  if (exportName.includes('\0')) throw bad(uri, 'the export name contains NUL');

  const params = new Map<string, string>();
  if (query !== undefined && query !== '') {
    for (const part of query.split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const key = decode(uri, eq < 0 ? part : part.slice(0, eq), 'a query parameter');
      const value = decode(uri, eq < 0 ? '' : part.slice(eq + 1), 'a query parameter');
      if (params.has(key)) throw bad(uri, `query parameter "${key}" given twice`);
      params.set(key, value);
    }
  }
  for (const key of params.keys()) {
    if (key.startsWith('tls-')) {
      if (!useTls) throw bad(uri, `TLS parameter "${key}" needs an nbds:// or nbds+unix:// URI`);
      if (key === 'tls-verify-peer') {
        throw bad(uri, "tls-verify-peer: bkfs always verifies the server's certificate");
      }
      if (!TLS_PARAMS.has(key)) throw bad(uri, `TLS parameter "${key}" is not supported`);
      if (params.get(key) === '') throw bad(uri, `TLS parameter "${key}" is empty`);
    } else if (key !== 'socket') throw bad(uri, `unknown query parameter "${key}"`);
  }
  const certDir = params.get('tls-certificates');
  const hostname = params.get('tls-hostname');
  const tls: NbdTls | undefined = useTls
    ? { ...(certDir !== undefined ? { certDir } : {}), ...(hostname !== undefined ? { hostname } : {}) }
    : undefined;

  if (unix) {
    if (authority !== '') {
      throw bad(uri, `${scheme} URIs take no host (write ${scheme}:///EXPORT?socket=PATH)`);
    }
    const socket = params.get('socket');
    if (socket === undefined || socket === '') throw bad(uri, `${scheme} needs ?socket=PATH`);
    return tls ? { socket, exportName, tls } : { socket, exportName };
  }

  // nbd://[userinfo@]host[:port]
  if (params.has('socket')) throw bad(uri, `?socket= is only valid with ${scheme}+unix://`);
  const hostPort = authority.includes('@') ? authority.slice(authority.lastIndexOf('@') + 1) : authority;
  let host: string;
  let portStr: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) throw bad(uri, 'unterminated IPv6 address');
    host = hostPort.slice(1, close);
    const rest = hostPort.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) throw bad(uri, 'junk after IPv6 address');
    portStr = rest === '' ? undefined : rest.slice(1);
  } else {
    const colon = hostPort.lastIndexOf(':');
    host = colon < 0 ? hostPort : hostPort.slice(0, colon);
    portStr = colon < 0 ? undefined : hostPort.slice(colon + 1);
    host = decode(uri, host, 'the host');
  }
  if (host === '') throw bad(uri, 'missing host (write nbd://HOST[:PORT]/EXPORT)');
  let port = NBD_DEFAULT_PORT;
  if (portStr !== undefined && portStr !== '') {
    if (!/^[0-9]{1,5}$/.test(portStr) || Number(portStr) < 1 || Number(portStr) > 65535) {
      throw bad(uri, `bad port "${portStr}"`);
    }
    port = Number(portStr);
  }
  return tls ? { host, port, exportName, tls } : { host, port, exportName };
}

/** A short human description of a target, for messages: "unix socket /run/x.sock, export "sda"". */
export function describeNbdTarget(target: NbdTarget): string {
  const where =
    'socket' in target ? `unix socket ${target.socket}` : `${formatHost(target.host)}:${target.port}`;
  const exp = target.exportName ? `, export "${target.exportName}"` : '';
  return `NBD server at ${where}${exp}${target.tls ? ' (TLS)' : ''}`;
}

function formatHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

/** The URI of a target (for tools such as qemu-img that accept NBD URIs). */
export function formatNbdUri(target: NbdTarget): string {
  const exp = encodeURIComponent(target.exportName ?? '').replace(/%2F/gi, '/');
  const q = (s: string) => encodeURIComponent(s).replace(/%2F/gi, '/');
  const s = target.tls ? 'nbds' : 'nbd';
  const tlsParams: string[] = [];
  if (target.tls?.certDir !== undefined) tlsParams.push(`tls-certificates=${q(target.tls.certDir)}`);
  if (target.tls?.hostname !== undefined) tlsParams.push(`tls-hostname=${q(target.tls.hostname)}`);
  if ('socket' in target) {
    return `${s}+unix:///${exp}?${[`socket=${q(target.socket)}`, ...tlsParams].join('&')}`;
  }
  const port = target.port === NBD_DEFAULT_PORT ? '' : `:${target.port}`;
  return `${s}://${formatHost(target.host)}${port}/${exp}${tlsParams.length ? `?${tlsParams.join('&')}` : ''}`;
}
