/**
 * NBD over TLS (nbds://, nbds+unix://): bkfs's NBD client against real TLS servers, qemu-nbd with
 * `--tls-creds` (a tls-creds-x509 object, client certificates verified) and `bkfs serve
 * --tls-creds`, with certificates made here by openssl.
 *
 * Checked: whole-export reads byte-identical to the image over TCP and over a Unix socket; a
 * backup from an nbds:// source equals the image; a server certificate from another CA, one not
 * issued for the host name, a missing client certificate, a TLS server reached without TLS and a
 * plain server reached with TLS are each refused with TLS_FAILED (exit 39 from the CLI, one line,
 * repository unchanged); URI parsing of the TLS parameters.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdClient, parseNbdUri, formatNbdUri } from '../../src/nbd/client';
import { isBkfsError } from '../../src/errors';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { randomBuffer } from '../helpers/images';
import { freeTcpPort, startQemuNbd, type NbdTestServer } from '../helpers/nbd-server';
import { issue, makeCa } from '../helpers/tls-certs';
import { assertCheckpointEquals } from '../helpers/compare';

const MiB = 1 << 20;

async function readAll(c: NbdClient): Promise<Buffer> {
  const out = Buffer.alloc(c.size);
  const step = 4 * MiB;
  const parts: Promise<void>[] = [];
  for (let p = 0; p < c.size; p += step) {
    parts.push(c.readInto(p, out.subarray(p, Math.min(c.size, p + step))));
  }
  await Promise.all(parts);
  return out;
}

function tlsError(re: RegExp) {
  return (e: unknown) => {
    assert.ok(isBkfsError(e, 'TLS_FAILED'), `expected TLS_FAILED, got ${String(e)}`);
    assert.match((e as Error).message, re);
    assert.ok(!(e as Error).message.includes('\n'), 'one line');
    return true;
  };
}

describe('NBD over TLS', () => {
  let work = '';
  let img = '';
  let raw: Buffer = Buffer.alloc(0);
  let srvDir = '';
  let cliDir = '';
  let otherCliDir = '';
  let noCertDir = '';
  const servers: NbdTestServer[] = [];

  before(async () => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-nbdtls-'));
    img = path.join(work, 'disk.qcow2');
    const rnd = path.join(work, 'rnd.bin');
    fs.writeFileSync(rnd, randomBuffer(91, 5 * MiB + 4096));
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '48M']);
    await qemuIo(img, 'qcow2', `write -s ${rnd} 1M ${5 * MiB + 4096}`, 'write -P 0x6b 30M 2M');
    const rawPath = path.join(work, 'disk.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, rawPath]);
    raw = fs.readFileSync(rawPath);

    const ca = await makeCa(path.join(work, 'ca'));
    srvDir = path.join(work, 'server');
    cliDir = path.join(work, 'client');
    await issue(ca, srvDir, 'server', ['localhost', '127.0.0.1']);
    await issue(ca, cliDir, 'client', ['bkfs-client']);
    // A client trusting another CA (with a client certificate of that CA).
    const other = await makeCa(path.join(work, 'other-ca'), 'another CA');
    otherCliDir = path.join(work, 'other-client');
    await issue(other, otherCliDir, 'client', ['bkfs-client']);
    // The right CA but no client certificate.
    noCertDir = path.join(work, 'nocert');
    fs.mkdirSync(noCertDir, { mode: 0o700 });
    fs.copyFileSync(path.join(cliDir, 'ca-cert.pem'), path.join(noCertDir, 'ca-cert.pem'));
  });

  after(async () => {
    for (const s of servers) await s.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  /** qemu-nbd with x509 server credentials that verifies clients (verify-peer=on). */
  async function tlsQemuNbd(tcp: boolean): Promise<NbdTestServer> {
    const s = await startQemuNbd(img, {
      readOnly: true,
      ...(tcp ? { tcpPort: await freeTcpPort() } : {}),
      extraArgs: [
        '--object',
        `tls-creds-x509,id=tls0,dir=${srvDir},endpoint=server,verify-peer=on`,
        '--tls-creds',
        'tls0',
      ],
    });
    servers.push(s);
    return s;
  }

  it("parses nbds:// and nbds+unix:// URIs with libnbd's TLS parameters", () => {
    assert.deepEqual(parseNbdUri('nbds://h.example:10810/sda?tls-certificates=/etc/pki/x'), {
      host: 'h.example',
      port: 10810,
      exportName: 'sda',
      tls: { certDir: '/etc/pki/x' },
    });
    assert.deepEqual(parseNbdUri('nbds+unix:///vda?socket=/run/s.sock&tls-hostname=kvm1'), {
      socket: '/run/s.sock',
      exportName: 'vda',
      tls: { hostname: 'kvm1' },
    });
    const t = parseNbdUri('nbds://10.0.0.1/a%20b?tls-certificates=/d%20x&tls-hostname=kvm');
    assert.deepEqual(parseNbdUri(formatNbdUri(t)), t);
    for (const [uri, re] of [
      ['nbd://h/x?tls-certificates=/d', /needs an nbds:/],
      ['nbds://h/x?tls-verify-peer=false', /always verifies/],
      ['nbds://h/x?tls-psk-file=/k', /not supported/],
      ['nbds://h/x?tls-certificates=', /is empty/],
      ['nbds+unix:///x', /needs \?socket=PATH/],
    ] as const) {
      assert.throws(
        () => parseNbdUri(uri),
        (e: unknown) => isBkfsError(e, 'USAGE') && re.test((e as Error).message),
        uri,
      );
    }
  });

  it('reads qemu-nbd --tls-creds over TCP and over a Unix socket, byte-identical', async () => {
    const tcp = await tlsQemuNbd(true);
    const c = await NbdClient.connect(`nbds://127.0.0.1:${tcp.port}/?tls-certificates=${cliDir}`, {
      metaContexts: ['base:allocation'],
    });
    try {
      assert.equal(c.size, raw.length);
      assert.ok(c.hasMetaContext('base:allocation'));
      assert.ok((await readAll(c)).equals(raw), 'TCP+TLS read equals the image');
      const ext = [];
      for await (const e of c.mapExtents('base:allocation', 0, c.size)) ext.push(e);
      assert.ok(ext.length > 1, 'block status works inside TLS');
    } finally {
      await c.close();
    }
    const unix = await tlsQemuNbd(false);
    const u = await NbdClient.connect(`nbds+unix:///?socket=${unix.socket}&tls-certificates=${cliDir}`);
    try {
      assert.ok((await readAll(u)).equals(raw), 'Unix+TLS read equals the image');
    } finally {
      await u.close();
    }
  });

  it('refuses a wrong CA, a wrong host name, a missing client certificate, and plain<->TLS mismatches', async () => {
    const s = await tlsQemuNbd(true);
    const base = `nbds://127.0.0.1:${s.port}/`;
    await assert.rejects(
      NbdClient.connect(`${base}?tls-certificates=${otherCliDir}`),
      tlsError(/not signed by the trusted CA/),
    );
    await assert.rejects(
      NbdClient.connect(`${base}?tls-certificates=${cliDir}&tls-hostname=kvm9.example`),
      tlsError(/not issued for "kvm9.example"/),
    );
    await assert.rejects(
      NbdClient.connect(`${base}?tls-certificates=${noCertDir}`),
      tlsError(/TLS handshake with .* failed/),
    );
    await assert.rejects(
      NbdClient.connect(`nbd://127.0.0.1:${s.port}/`),
      tlsError(/requires TLS.*: connect with nbds:/),
    );
    const plain = await startQemuNbd(img, { readOnly: true, tcpPort: await freeTcpPort() });
    servers.push(plain);
    await assert.rejects(
      NbdClient.connect(`nbds://127.0.0.1:${plain.port}/?tls-certificates=${cliDir}`),
      tlsError(/does not offer TLS/),
    );
  });

  it('bkfs backup from an nbds:// source; a wrong CA exits 39 with one line, repository unchanged', async () => {
    const s = await tlsQemuNbd(true);
    const repo = path.join(work, 'repo');
    await bkfsOk(['-r', repo, 'init']);
    const ok = await bkfs([
      '-r', repo, 'backup', 'tlsvm', '--disk',
      `vda=nbds://127.0.0.1:${s.port}/?tls-certificates=${cliDir}`, '--level', 'full',
    ]); // prettier-ignore
    assert.equal(ok.code, 0, ok.stderr);
    const rawPath = path.join(work, 'disk.raw');
    await assertCheckpointEquals(repo, 'tlsvm@check1', 'vda', rawPath, 20);
    const before = fs.readdirSync(repo).sort().join(',');
    const bad = await bkfs([
      '-r', repo, 'backup', 'tlsvm', '--disk',
      `vda=nbds://127.0.0.1:${s.port}/?tls-certificates=${otherCliDir}`, '--level', 'full',
    ]); // prettier-ignore
    assert.equal(bad.code, EXIT_CODES.TLS_FAILED, bad.stderr);
    assert.equal(EXIT_CODES.TLS_FAILED, 39);
    assert.match(bad.stderr, /not signed by the trusted CA/);
    assert.equal(bad.stderr.trim().split('\n').length, 1, bad.stderr);
    assert.equal(fs.readdirSync(repo).sort().join(','), before);
    const list = JSON.parse((await bkfsOk(['-r', repo, 'list', 'tlsvm', '--json'])).stdout) as unknown[];
    assert.equal(list.length, 1, 'no second checkpoint');
  });

  it('reads bkfs serve --tls-creds with the client certificate, byte-identical', async () => {
    const repo = path.join(work, 'repo');
    const port = await freeTcpPort();
    const listen = `tcp:127.0.0.1:${port}`;
    await bkfsOk(['-r', repo, 'serve', 'tlsvm@check1', '--listen', listen, '--tls-creds', srvDir]);
    try {
      const c = await NbdClient.connect(`nbds://127.0.0.1:${port}/vda?tls-certificates=${cliDir}`);
      try {
        assert.ok((await readAll(c)).equals(raw), 'bkfs serve over TLS equals the image');
      } finally {
        await c.close();
      }
      await assert.rejects(
        NbdClient.connect(`nbds://127.0.0.1:${port}/vda?tls-certificates=${otherCliDir}`),
        tlsError(/not signed by the trusted CA/),
      );
      await assert.rejects(
        NbdClient.connect(`nbds://localhost:${port}/vda?tls-certificates=${noCertDir}`),
        tlsError(/TLS handshake with .* failed/),
      );
    } finally {
      await bkfsOk(['serve', '--stop', '--listen', listen]);
    }
  });
});
