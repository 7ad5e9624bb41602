/**
 * x509 test certificates made with openssl (Debian: openssl): a CA, server and client certificates
 * signed by it, written in the directory layouts the tools expect:
 *
 * - qemu server (`tls-creds-x509,endpoint=server`, qemu.conf backup_tls_x509_cert_dir, bkfs serve
 *   --tls-creds): ca-cert.pem, server-cert.pem, server-key.pem
 * - qemu/bkfs client (`endpoint=client`, nbds:// tls-certificates=, bkfs --nbd-tls): ca-cert.pem,
 *   client-cert.pem, client-key.pem
 * - libvirt client pki (`qemu+tls://...?pkipath=DIR`): cacert.pem, clientcert.pem, clientkey.pem
 * - libvirtd server (libvirtd.conf ca_file/cert_file/key_file): the server files above.
 *
 * Keys are 0600 in 0700 directories unless a mode is asked for.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run } from '../../src/util/proc';

export interface TestCa {
  dir: string;
  cert: string;
  key: string;
}

async function ssl(args: string[]): Promise<void> {
  const r = await run('openssl', args, { allowFail: true });
  if (r.code !== 0) throw new Error(`openssl ${args.slice(0, 3).join(' ')}: ${r.stderr.trim()}`);
}

/** A self-signed CA in `dir` (made 0700). */
export async function makeCa(dir: string, cn = 'bkfs test CA'): Promise<TestCa> {
  if (!fs.existsSync('/usr/bin/openssl')) throw new Error('openssl is missing: apt-get install openssl');
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cert = path.join(dir, 'ca-cert.pem');
  const key = path.join(dir, 'ca-key.pem');
  await ssl([
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert,
    '-days', '3', '-subj', `/CN=${cn}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]); // prettier-ignore
  return { dir, cert, key };
}

/**
 * A certificate signed by `ca` for `names` (IPs become IP SANs, others DNS SANs), as
 * `<prefix>-cert.pem` / `<prefix>-key.pem` in `out`, plus `ca-cert.pem`.
 */
export async function issue(
  ca: TestCa,
  out: string,
  role: 'server' | 'client',
  names: string[],
): Promise<{ cert: string; key: string }> {
  fs.mkdirSync(out, { recursive: true, mode: 0o700 });
  const cert = path.join(out, `${role}-cert.pem`);
  const key = path.join(out, `${role}-key.pem`);
  const csr = path.join(ca.dir, `${role}-${path.basename(out)}.csr`);
  const ext = path.join(ca.dir, `${role}-${path.basename(out)}.ext`);
  await ssl([
    'req',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    key,
    '-out',
    csr,
    '-subj',
    `/CN=${names[0] ?? role}`,
  ]);
  const san = names.map((n) => (/^[\d.]+$|:/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
  fs.writeFileSync(
    ext,
    `subjectAltName=${san}\nextendedKeyUsage=${role === 'server' ? 'serverAuth' : 'clientAuth'}\n` +
      'keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n',
  );
  await ssl([
    'x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial',
    '-out', cert, '-days', '2', '-extfile', ext,
  ]); // prettier-ignore
  fs.copyFileSync(ca.cert, path.join(out, 'ca-cert.pem'));
  fs.chmodSync(key, 0o600);
  return { cert, key };
}

/** libvirt's client pki layout (cacert.pem, clientcert.pem, clientkey.pem) of a client dir. */
export function libvirtPkiDir(clientDir: string, out: string): string {
  fs.mkdirSync(out, { recursive: true, mode: 0o700 });
  fs.copyFileSync(path.join(clientDir, 'ca-cert.pem'), path.join(out, 'cacert.pem'));
  fs.copyFileSync(path.join(clientDir, 'client-cert.pem'), path.join(out, 'clientcert.pem'));
  fs.copyFileSync(path.join(clientDir, 'client-key.pem'), path.join(out, 'clientkey.pem'));
  fs.chmodSync(path.join(out, 'clientkey.pem'), 0o600);
  return out;
}
