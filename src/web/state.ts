/**
 * Files of `bkfs web` outside the repository: the state directory (tokens, the self-signed TLS
 * certificate, the audit log, the daemon's state and log). Everything 0600 in a 0700 directory.
 *
 * State directory: $BKFS_WEB_DIR, else /var/lib/bkfs-web as root, else
 * $XDG_STATE_HOME/bkfs/web (~/.local/state/bkfs/web).
 *
 * The certificate is made by the `openssl` CLI on first start (EC P-256, 10 years, CN = host name,
 * subjectAltName = the host name, localhost, 127.0.0.1, ::1 and the listen address) and reused.
 */
import { X509Certificate } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isIP } from 'node:net';
import { BkfsError } from '../errors';
import { run } from '../util/proc';
import { mkdirPrivateSync, openPrivateSync } from '../util/private-fs';

export function webStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BKFS_WEB_DIR) return path.resolve(env.BKFS_WEB_DIR);
  if (process.getuid?.() === 0) return '/var/lib/bkfs-web';
  const base = env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(base, 'bkfs', 'web');
}

export function ensureStateDir(dir: string): string {
  mkdirPrivateSync(dir, { recursive: true });
  return dir;
}

export const tokensFile = (dir: string): string => path.join(dir, 'tokens.json');
export const auditFile = (dir: string): string => path.join(dir, 'audit.log');
export const daemonStateFile = (dir: string): string => path.join(dir, 'server.json');
export const daemonLogFile = (dir: string): string => path.join(dir, 'server.log');

export interface TlsFiles {
  cert: string;
  key: string;
  /** SHA-256 fingerprint as openssl/browsers show it (AA:BB:...). */
  fingerprint: string;
  generated: boolean;
}

export function fingerprintOf(certPem: string | Buffer): string {
  return new X509Certificate(certPem).fingerprint256;
}

/** The self-signed certificate of the state directory, made on first use. */
export async function selfSignedCert(dir: string, listenHost: string): Promise<TlsFiles> {
  const cert = path.join(dir, 'tls-cert.pem');
  const key = path.join(dir, 'tls-key.pem');
  let generated = false;
  if (!fs.existsSync(cert) || !fs.existsSync(key)) {
    const host = os.hostname();
    const names = new Set([`DNS:${host}`, 'DNS:localhost', 'IP:127.0.0.1', 'IP:::1']);
    if (listenHost && listenHost !== '0.0.0.0' && listenHost !== '::') {
      names.add(isIP(listenHost) ? `IP:${listenHost}` : `DNS:${listenHost}`);
    }
    const tmpKey = `${key}.${process.pid}.tmp`;
    const tmpCert = `${cert}.${process.pid}.tmp`;
    // The key file exists (0600) before openssl writes into it.
    fs.closeSync(openPrivateSync(tmpKey, 'w'));
    try {
      await run('openssl', [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:prime256v1',
        '-nodes',
        '-days',
        '3650',
        '-subj',
        `/CN=${host.replace(/[^A-Za-z0-9.-]/g, '-')}`,
        '-addext',
        `subjectAltName=${[...names].join(',')}`,
        '-keyout',
        tmpKey,
        '-out',
        tmpCert,
      ]);
      fs.chmodSync(tmpCert, 0o600);
      fs.renameSync(tmpKey, key);
      fs.renameSync(tmpCert, cert);
    } finally {
      fs.rmSync(tmpKey, { force: true });
      fs.rmSync(tmpCert, { force: true });
    }
    generated = true;
  }
  return { cert, key, fingerprint: fingerprintOf(fs.readFileSync(cert)), generated };
}

export function userTls(certFile: string, keyFile: string): TlsFiles {
  let pem: Buffer;
  try {
    pem = fs.readFileSync(certFile);
    fs.accessSync(keyFile, fs.constants.R_OK);
  } catch (e) {
    throw new BkfsError('TARGET_INVALID', `cannot read the TLS certificate or key: ${(e as Error).message}`);
  }
  return { cert: certFile, key: keyFile, fingerprint: fingerprintOf(pem), generated: false };
}

/** Loopback addresses, where plain HTTP is allowed without --insecure-http. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** `ADDR:PORT`, `[v6]:PORT` or `PORT` -> host and port. */
export function parseListen(v: string): { host: string; port: number } {
  let host = '127.0.0.1';
  let portText = v;
  const m6 = /^\[([^\]]+)\]:(\d+)$/.exec(v);
  if (m6) {
    host = m6[1]!;
    portText = m6[2]!;
  } else if (v.includes(':')) {
    const i = v.lastIndexOf(':');
    host = v.slice(0, i);
    portText = v.slice(i + 1);
  }
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65535 || host === '') {
    throw new BkfsError(
      'USAGE',
      `--listen takes ADDR:PORT (e.g. 127.0.0.1:8443 or 0.0.0.0:8443), got '${v}'`,
    );
  }
  return { host, port };
}

/** Append-only JSON-lines audit log (0600). */
export class AuditLog {
  private fd: number;
  constructor(readonly file: string) {
    this.fd = openPrivateSync(file, 'a');
  }

  write(entry: Record<string, unknown>): void {
    const line = `${JSON.stringify({ time: new Date().toISOString(), ...entry })}\n`;
    fs.writeSync(this.fd, line);
  }

  close(): void {
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }
}
