/**
 * A real S3 endpoint for tests: a throw-away single-node Ceph cluster with a RADOS Gateway on
 * 127.0.0.1 (scripts/ceph-s3.sh), started by the test and stopped (by PID) in its `after`.
 * Needs root and Debian's ceph-mon, ceph-osd, radosgw, ceph-common, curl (scripts/setup.sh).
 * Start-up takes 7–20 s here; share one cluster per test file.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { run } from '../../src/util/proc';

const SCRIPT = path.resolve(__dirname, '../../../scripts/ceph-s3.sh');

export interface Rgw {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** Environment for a bkfs child process (AWS_* variables). */
  env: NodeJS.ProcessEnv;
  /** Create a bucket; returns its name. */
  bucket(name: string): Promise<string>;
  stop(): Promise<void>;
}

/** Why the RGW tests cannot run here, or null. */
export function rgwMissing(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (ceph daemons)';
  for (const bin of [
    '/usr/bin/ceph-mon',
    '/usr/bin/ceph-osd',
    '/usr/bin/radosgw',
    '/usr/bin/ceph',
    '/usr/bin/curl',
  ]) {
    if (!fs.existsSync(bin))
      return `${bin} is missing: apt-get install ceph-mon ceph-osd radosgw ceph-common curl`;
  }
  return null;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export async function startRgw(): Promise<Rgw> {
  const missing = rgwMissing();
  if (missing) throw new Error(`a real S3 endpoint (Ceph RGW) is needed: ${missing}`);
  // bluestore opens its block file O_DIRECT: /var/tmp, not a tmpfs /tmp.
  const dir = fs.mkdtempSync('/var/tmp/bkfs-rgw-');
  let port = await freePort();
  while (port > 55535) port = await freePort(); // the monitor takes port + 10000
  const r = await run('bash', [SCRIPT, 'up', dir, String(port)], { allowFail: true });
  const m = /S3_ENDPOINT=(\S+) AWS_ACCESS_KEY_ID=(\S+) AWS_SECRET_ACCESS_KEY=(\S+)/.exec(r.stdout);
  if (r.code !== 0 || !m) {
    await run('bash', [SCRIPT, 'down', dir], { allowFail: true });
    throw new Error(`ceph-s3.sh up failed (${r.code}): ${r.stderr.slice(-2000)}`);
  }
  const [endpoint, accessKeyId, secretAccessKey] = [m[1], m[2], m[3]] as [string, string, string];
  const client = new S3Client({
    endpoint,
    forcePathStyle: true,
    region: 'us-east-1',
    credentials: { accessKeyId, secretAccessKey },
  });
  return {
    endpoint,
    accessKeyId,
    secretAccessKey,
    env: {
      AWS_ENDPOINT_URL: endpoint,
      AWS_ACCESS_KEY_ID: accessKeyId,
      AWS_SECRET_ACCESS_KEY: secretAccessKey,
      AWS_REGION: 'us-east-1',
    },
    async bucket(name: string): Promise<string> {
      await client.send(new CreateBucketCommand({ Bucket: name }));
      return name;
    },
    async stop(): Promise<void> {
      client.destroy();
      await run('bash', [SCRIPT, 'down', dir], { allowFail: true });
    },
  };
}
