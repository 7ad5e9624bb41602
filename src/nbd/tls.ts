/**
 * Client side of NBD over TLS: reading x509 credentials and turning a plain socket into a verified
 * TLS stream after NBD_OPT_STARTTLS (node:tls, OpenSSL).
 *
 * Credentials directory, qemu's layout (`tls-creds-x509,dir=DIR,endpoint=client`): ca-cert.pem,
 * client-cert.pem, client-key.pem. libvirt's pki layout (`?pkipath=DIR` of a qemu+tls:// URI) is
 * accepted too: cacert.pem, clientcert.pem, clientkey.pem. The CA file is required; the client
 * certificate and key are optional (a server that verifies clients refuses the handshake without
 * them) and go together.
 *
 * Verification is always on: the server's chain must end at the CA and its certificate must carry
 * the expected name (DNS or IP subjectAltName). Failures are one-line `BkfsError('TLS_FAILED')`.
 * Core code: never prints.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { BkfsError, errorMessage } from '../errors';

export interface ClientTlsCreds {
  /** Absent: the system's CAs. */
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

function readFirst(dir: string, names: readonly string[]): { name: string; data: Buffer } | null {
  for (const n of names) {
    const p = path.join(dir, n);
    try {
      return { name: n, data: fs.readFileSync(p) };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') continue;
      throw new BkfsError('USAGE', `TLS credentials ${dir}: cannot read ${n}: ${errorMessage(e)}`);
    }
  }
  return null;
}

/** The client credentials in `dir` (see the module comment); USAGE when the directory is unusable. */
export function loadClientTls(dir: string): ClientTlsCreds {
  const st = fs.statSync(dir, { throwIfNoEntry: false });
  if (!st?.isDirectory()) {
    throw new BkfsError('USAGE', `TLS credentials ${dir}: not a directory`);
  }
  const ca = readFirst(dir, ['ca-cert.pem', 'cacert.pem']);
  if (ca === null) {
    throw new BkfsError('USAGE', `TLS credentials ${dir}: no CA certificate (ca-cert.pem)`);
  }
  const cert = readFirst(dir, ['client-cert.pem', 'clientcert.pem']);
  const key = readFirst(dir, ['client-key.pem', 'clientkey.pem']);
  if ((cert === null) !== (key === null)) {
    throw new BkfsError(
      'USAGE',
      `TLS credentials ${dir}: ${cert ? cert.name : key!.name} without ${cert ? 'client-key.pem' : 'client-cert.pem'}`,
    );
  }
  return { ca: ca.data, ...(cert && key ? { cert: cert.data, key: key.data } : {}) };
}

/**
 * TLS handshake over `raw` (after the server acknowledged NBD_OPT_STARTTLS), verifying the server
 * as `hostname`. Resolves with the TLS socket once it is secure; TLS_FAILED otherwise.
 */
export function startClientTls(
  raw: net.Socket,
  creds: ClientTlsCreds,
  hostname: string,
  where: string,
): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const ip = net.isIP(hostname) !== 0;
    const ts = tls.connect({
      socket: raw,
      host: hostname,
      ...(ip ? {} : { servername: hostname }),
      ...(creds.ca ? { ca: creds.ca } : {}),
      ...(creds.cert ? { cert: creds.cert, key: creds.key } : {}),
      rejectUnauthorized: true,
      minVersion: 'TLSv1.2',
    });
    let done = false;
    const fail = (why: string): void => {
      if (done) return;
      done = true;
      ts.destroy();
      reject(new BkfsError('TLS_FAILED', `TLS handshake with ${where} failed: ${why}`));
    };
    ts.once('secureConnect', () => {
      if (done) return;
      done = true;
      ts.removeAllListeners('error');
      ts.removeAllListeners('close');
      resolve(ts);
    });
    ts.once('error', (e: NodeJS.ErrnoException) => {
      if (done) return;
      done = true;
      ts.destroy();
      reject(tlsFailure(e, hostname, where));
    });
    ts.once('close', () =>
      fail("the server closed the connection (does it accept bkfs's client certificate?)"),
    );
  });
}

/** An error of a TLS stream that is the peer's alert or a certificate problem. */
export function isTlsAlert(e: Error): boolean {
  const code = (e as NodeJS.ErrnoException).code ?? '';
  return /^ERR_SSL_|^ERR_TLS_|CERT|UNABLE_TO/.test(code) || /alert/i.test(e.message);
}

export function tlsFailure(e: Error, hostname: string, where: string): BkfsError {
  return new BkfsError('TLS_FAILED', `TLS handshake with ${where} failed: ${tlsErrorText(e, hostname)}`);
}

function tlsErrorText(e: NodeJS.ErrnoException, hostname: string): string {
  const code = e.code ?? '';
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') {
    return `the server's certificate is not issued for "${hostname}" (${e.message.replace(/\s+/g, ' ')})`;
  }
  if (
    /SELF_SIGNED|UNABLE_TO_GET_ISSUER|UNABLE_TO_VERIFY_LEAF|CERT_UNTRUSTED|CERT_SIGNATURE_FAILURE/.test(code)
  ) {
    return `the server's certificate is not signed by the trusted CA (${e.message})`;
  }
  if (/CERT_HAS_EXPIRED|CERT_NOT_YET_VALID/.test(code))
    return `the server's certificate is not valid now (${e.message})`;
  if (/alert|certificate required|unknown ca|bad certificate/i.test(e.message)) {
    return `the server refused bkfs's client certificate (${e.message.replace(/\s+/g, ' ').trim()})`;
  }
  return e.message.replace(/\s+/g, ' ').trim();
}
