/**
 * `bkfs web` for real: a repository made by real backups of a GPT disk with an ext4 filesystem
 * (files, a 1200-entry directory, symlinks pointing at host paths), served by the real `bkfs web
 * --daemon` over HTTPS on 127.0.0.1 with its self-signed certificate (verified: the test trusts
 * exactly that certificate). Guest filesystems are read with the server's default engine
 * (libguestfs, TCG here): one file session for the latest checkpoint, one for the two-checkpoint
 * diff/find.
 *
 * Proves: no token -> 401; read-only token cannot restore, upload or forget -> 403; a cookie
 * session without the CSRF token -> 403, with it -> 200; login is rate-limited (429); listings and
 * paging; a downloaded file's sha256 equals the source; a folder's zip and tar.gz list exactly the
 * folder; `..` is refused and guest symlinks never reach host files; `curl --range` pieces and an
 * extents-following client rebuild the disk (`qemu-img compare` with the source image); a restore
 * job reports progress over server-sent events, ends `done`, and its image compares equal;
 * protect/forget; JSON errors carry the CLI's code and exit code; the audit log records downloads
 * and restores; SIGTERM (`bkfs web stop`) stops the server cleanly.
 *
 * Needs root (loop mounts to add symlinks), qemu-utils, libguestfs-tools, curl, unzip, tar.
 */
import { after, before, describe, it } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk } from '../helpers/cli';
import { makeDisk, modifyDisk, randomBuffer, sha256, textFile } from '../helpers/images';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';

process.env.LIBGUESTFS_BACKEND = process.env.LIBGUESTFS_BACKEND ?? 'direct';
process.env.LIBGUESTFS_BACKEND_SETTINGS = process.env.LIBGUESTFS_BACKEND_SETTINGS ?? 'force_tcg';

const MiB = 1 << 20;
/** Parsed JSON of API answers (shapes: src/web/api.md). */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;
let work: string;
let repo: string;
let img: string;
let restoreRoot: string;
let env: NodeJS.ProcessEnv;
let base: string;
let ca: Buffer;
let operator: string;
let reader: string;

const BIG = randomBuffer(21, 3 * MiB + 123);
const DOCS: Record<string, Buffer> = {
  'docs/a.txt': Buffer.from('alpha\n'),
  'docs/sub/b.txt': textFile(2, 5000),
  'docs/sub/deeper/c.bin': randomBuffer(3, 70_000),
};
const MANY = 1200;

interface Res {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

function request(
  method: string,
  url: string,
  opts: { token?: string; headers?: Record<string, string>; body?: unknown } = {},
): Promise<Res> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...(opts.headers ?? {}) };
    if (opts.token) headers.authorization = `Bearer ${opts.token}`;
    let data: Buffer | undefined;
    if (opts.body !== undefined) {
      data = Buffer.isBuffer(opts.body) ? opts.body : Buffer.from(JSON.stringify(opts.body));
      headers['content-type'] ??= Buffer.isBuffer(opts.body)
        ? 'application/octet-stream'
        : 'application/json';
      headers['content-length'] = String(data.length);
    }
    const req = https.request(new URL(url, base), { method, ca, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
      );
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(data);
  });
}

async function json(
  method: string,
  url: string,
  opts: Parameters<typeof request>[2] = {},
  want = 200,
): Promise<Json> {
  const r = await request(method, url, opts);
  assert.equal(r.status, want, `${method} ${url}: ${r.status} ${r.body.toString().slice(0, 400)}`);
  return JSON.parse(r.body.toString('utf8'));
}

/** The error body of a failed request: code, exit code and the HTTP status of the code. */
async function apiError(
  method: string,
  url: string,
  opts: Parameters<typeof request>[2],
  status: number,
  code: string,
) {
  const r = await request(method, url, opts);
  assert.equal(r.status, status, `${method} ${url}: ${r.body.toString()}`);
  const e = JSON.parse(r.body.toString('utf8')).error;
  assert.equal(e.code, code);
  assert.equal(e.exitCode, EXIT_CODES[code as keyof typeof EXIT_CODES]);
  assert.ok(typeof e.message === 'string' && e.message.length > 0);
  return e;
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-webapi-'));
  repo = path.join(work, 'repo');
  img = path.join(work, 'web.qcow2');
  restoreRoot = path.join(work, 'restore');
  fs.mkdirSync(restoreRoot);
  env = { BKFS_WEB_DIR: path.join(work, 'state') };
  const files = [
    { path: 'etc/hostname', content: Buffer.from('guest-one\n') },
    { path: 'data/big.bin', content: BIG },
    ...Object.entries(DOCS).map(([p, c]) => ({ path: p, content: c })),
    ...Array.from({ length: MANY }, (_, i) => ({
      path: `many/f${String(i).padStart(5, '0')}`,
      content: Buffer.from(`${i}\n`),
    })),
  ];
  await makeDisk(img, {
    format: 'qcow2',
    sizeMiB: 48,
    table: 'gpt',
    seed: 5,
    partitions: [{ fs: 'ext4', sizeMiB: 40, label: 'root', files }],
  });
  // Symlinks that name host paths: absolute, and climbing above the root.
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.symlinkSync('/etc', path.join(m, 'evil'));
    fs.symlinkSync('/etc/shadow', path.join(m, 'hostesc'));
    fs.symlinkSync('../../../../../../etc/passwd', path.join(m, 'docs/up'));
  });
  await bkfsOk(['-r', repo, 'init']);
  await bkfsOk([
    '-r',
    repo,
    'backup',
    'web',
    '--disk',
    `vda=${img}`,
    '--level',
    'full',
    '--checkpoint',
    'c1',
  ]);
  await modifyDisk(img, 'qcow2', 1, async (m) => {
    fs.writeFileSync(path.join(m, 'etc/hostname'), 'guest-two\n');
    fs.writeFileSync(path.join(m, 'docs/new.txt'), 'new\n');
  });
  await bkfsOk(['-r', repo, 'backup', 'web', '--disk', `vda=${img}`, '--checkpoint', 'c2']);
  operator = JSON.parse((await bkfsOk(['web', 'token', 'add', 'op', '--json'], env)).stdout).token;
  reader = JSON.parse(
    (await bkfsOk(['web', 'token', 'add', 'ro', '--read-only', '--json'], env)).stdout,
  ).token;
  const started = await bkfsOk(
    ['-r', repo, 'web', '--daemon', '--json', '--listen', '127.0.0.1:0', '--restore-root', restoreRoot],
    env,
  );
  const info = JSON.parse(started.stdout);
  base = info.url;
  assert.match(base, /^https:\/\/127\.0\.0\.1:\d+\/$/);
  ca = fs.readFileSync(info.certificate);
  assert.equal(fs.statSync(info.certificate).mode & 0o777, 0o600);
  assert.match(info.fingerprint, /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
});

after(async () => {
  if (base) await bkfs(['web', 'stop'], env);
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('bkfs web API', { timeout: 900_000 }, () => {
  it('refuses requests without valid credentials, with the CLI error code', async () => {
    await apiError('GET', '/api/vms', {}, 401, 'UNAUTHORIZED');
    await apiError('GET', '/api/vms', { token: 'bkfs_nope' }, 401, 'UNAUTHORIZED');
    // The OpenAPI document is public and lists the routes.
    const doc = await json('GET', '/api/openapi.json');
    assert.ok(doc.paths['/api/vms/{vm}/checkpoints/{cp}/disks/{disk}/extents']);
    assert.ok(doc.paths['/api/jobs/restore']);
  });

  it('lists VMs and checkpoints', async () => {
    const vms = await json('GET', '/api/vms', { token: reader });
    assert.equal(vms.length, 1);
    assert.equal(vms[0].name, 'web');
    assert.equal(vms[0].checkpoints, 2);
    assert.equal(vms[0].latest.name, 'c2');
    assert.equal(vms[0].virtualSize, 48 * MiB);
    const cps = await json('GET', '/api/vms/web/checkpoints', { token: reader });
    assert.deepEqual(
      cps.map((c: { name: string }) => c.name),
      ['c1', 'c2'],
    );
    assert.equal(cps[0].level, 'full');
    assert.ok(cps[0].logicalBytes >= BIG.length && cps[0].logicalBytes <= 48 * MiB);
    assert.ok(cps[0].bytesNewStored > 0);
    assert.match(cps[0].time, /^\d{4}-\d\d-\d\dT.*Z$/);
    await apiError('GET', '/api/vms/nope/checkpoints', { token: reader }, 404, 'NOT_FOUND');
    await apiError('GET', '/api/vms/web/checkpoints/zz', { token: reader }, 404, 'NOT_FOUND');
  });

  it('browses a checkpoint: overview, paged listing, stat, preview', async () => {
    const ov = await json('GET', '/api/vms/web/checkpoints/c2/overview', { token: reader });
    assert.equal(ov.disks[0].name, 'vda');
    assert.ok(
      ov.volumes.some((v: { type: string; mountpoint: string }) => v.type === 'ext4' && v.mountpoint === '/'),
    );
    const root = await json('GET', '/api/vms/web/checkpoints/c2/files?path=/', { token: reader });
    const names = root.entries.map((e: { name: string }) => e.name);
    for (const n of ['etc', 'data', 'docs', 'many', 'evil', 'hostesc']) assert.ok(names.includes(n), n);
    const evil = root.entries.find((e: { name: string }) => e.name === 'evil');
    assert.equal(evil.kind, 'symlink');
    assert.equal(evil.target, '/etc');
    let seen: string[] = [];
    for (let offset = 0; ; offset += 500) {
      const page = await json(
        'GET',
        `/api/vms/web/checkpoints/c2/files?path=/many&offset=${offset}&limit=500`,
        {
          token: reader,
        },
      );
      assert.equal(page.total, MANY);
      seen = seen.concat(page.entries.map((e: { name: string }) => e.name));
      if (page.entries.length < 500) break;
    }
    assert.equal(seen.length, MANY);
    assert.equal(new Set(seen).size, MANY);
    const bySize = await json('GET', '/api/vms/web/checkpoints/c2/files?path=/data&sort=size&order=desc', {
      token: reader,
    });
    assert.equal(bySize.entries[0].name, 'big.bin');
    const st = await json('GET', '/api/vms/web/checkpoints/c2/stat?path=/data/big.bin', { token: reader });
    assert.equal(st.size, BIG.length);
    assert.equal(st.kind, 'file');
    const pv = await json('GET', '/api/vms/web/checkpoints/c2/preview?path=/etc/hostname', { token: reader });
    assert.equal(pv.text, 'guest-two\n');
    const pb = await json('GET', '/api/vms/web/checkpoints/c2/preview?path=/data/big.bin&maxBytes=1000', {
      token: reader,
    });
    assert.equal(pb.tooLarge, true);
    assert.equal(pb.text, null);
  });

  it('downloads a file whose sha256 is the source file', async () => {
    const r = await request('GET', '/api/vms/web/checkpoints/c2/download?path=/data/big.bin', {
      token: reader,
    });
    assert.equal(r.status, 200);
    assert.equal(Number(r.headers['content-length']), BIG.length);
    assert.match(String(r.headers['content-disposition']), /filename="big\.bin"/);
    assert.equal(sha256(r.body), sha256(BIG));
  });

  it('downloads a folder as a streamed zip and tar.gz holding exactly the folder', async () => {
    const want = [
      'docs/',
      'docs/a.txt',
      'docs/new.txt',
      'docs/sub/',
      'docs/sub/b.txt',
      'docs/sub/deeper/',
      'docs/sub/deeper/c.bin',
      'docs/up',
    ];
    const z = await request('GET', '/api/vms/web/checkpoints/c2/archive?path=/docs&format=zip', {
      token: reader,
    });
    assert.equal(z.status, 200, z.body.toString().slice(0, 300));
    assert.equal(z.headers['content-length'], undefined); // streamed, not built first
    const zf = path.join(work, 'docs.zip');
    fs.writeFileSync(zf, z.body);
    const listed = (await run('zipinfo', ['-1', zf])).stdout.trim().split('\n').sort();
    assert.deepEqual(listed, want);
    const ex = path.join(work, 'unz');
    await run('unzip', ['-q', zf, '-d', ex]);
    for (const [p, c] of Object.entries(DOCS))
      assert.equal(sha256(fs.readFileSync(path.join(ex, p))), sha256(c), p);
    // The guest's symlink is stored as a symlink (its text), never followed to a host file.
    assert.equal(fs.readlinkSync(path.join(ex, 'docs/up')), '../../../../../../etc/passwd');
    const t = await request('GET', '/api/vms/web/checkpoints/c2/archive?path=/docs&format=tar.gz', {
      token: reader,
    });
    assert.equal(t.status, 200);
    const tf = path.join(work, 'docs.tar.gz');
    fs.writeFileSync(tf, t.body);
    const tl = (await run('tar', ['-tzf', tf])).stdout
      .trim()
      .split('\n')
      .map((l) => l.replace(/\/$/, ''))
      .sort();
    assert.deepEqual(tl, want.map((w) => w.replace(/\/$/, '')).sort());
  });

  it('never reaches a host file: .. refused, guest symlinks resolved inside the guest', async () => {
    await apiError(
      'GET',
      '/api/vms/web/checkpoints/c2/download?path=/etc/../../etc/passwd',
      { token: reader },
      400,
      'USAGE',
    );
    await apiError('GET', '/api/vms/web/checkpoints/c2/files?path=/..', { token: reader }, 400, 'USAGE');
    await apiError(
      'GET',
      '/api/vms/web/checkpoints/c2/download?path=etc/hostname',
      { token: reader },
      400,
      'USAGE',
    );
    // /hostesc -> /etc/shadow: the guest has none; the host's is never read.
    await apiError(
      'GET',
      '/api/vms/web/checkpoints/c2/download?path=/hostesc',
      { token: reader },
      404,
      'NOT_FOUND',
    );
    // /evil -> /etc: the guest's /etc.
    const h = await request('GET', '/api/vms/web/checkpoints/c2/download?path=/evil/hostname', {
      token: reader,
    });
    assert.equal(h.status, 200);
    assert.equal(h.body.toString(), 'guest-two\n');
    // docs/up climbs above the root: clamped at the guest root, where there is no /etc/passwd.
    await apiError(
      'GET',
      '/api/vms/web/checkpoints/c2/download?path=/docs/up',
      { token: reader },
      404,
      'NOT_FOUND',
    );
    const ls = await request('GET', '/api/vms/web/checkpoints/c2/files?path=/evil', { token: reader });
    const names = JSON.parse(ls.body.toString()).entries.map((e: { name: string }) => e.name);
    assert.deepEqual(names, ['hostname']);
  });

  it('finds files across checkpoints and diffs two checkpoints', async () => {
    const f = await json('GET', '/api/vms/web/find?pattern=*.txt', { token: reader });
    const paths = f.matches.map((m: { path: string }) => m.path);
    assert.deepEqual(paths, ['/docs/a.txt', '/docs/new.txt', '/docs/sub/b.txt']);
    const nw = f.matches.find((m: { path: string }) => m.path === '/docs/new.txt');
    assert.deepEqual(
      nw.history.map((h: { checkpoint: string; state: string }) => [h.checkpoint, h.state]),
      [['c2', 'added']],
    );
    const d = await json('GET', '/api/vms/web/diff?from=c1&to=c2&path=/', { token: reader });
    const changes = d.items.map((i: { change: string; path: string }) => `${i.change} ${i.path}`).sort();
    assert.ok(changes.includes('added /docs/new.txt'), changes.join(', '));
    assert.ok(changes.includes('changed /etc/hostname'), changes.join(', '));
  });

  it('streams a disk with Range (curl) and by its extents; both equal the source image', async () => {
    const disks = await json('GET', '/api/vms/web/checkpoints/c2/disks', { token: reader });
    assert.deepEqual(disks, [{ name: 'vda', virtualSize: 48 * MiB }]);
    const url = new URL('/api/vms/web/checkpoints/c2/disks/vda', base).toString();
    const cert = path.join(work, 'ca.pem');
    fs.writeFileSync(cert, ca);
    // curl --range in three pieces, concatenated.
    const pieces = [`0-${10 * MiB - 1}`, `${10 * MiB}-${30 * MiB - 1}`, `${30 * MiB}-`];
    const raw1 = path.join(work, 'curl.raw');
    fs.writeFileSync(raw1, '');
    for (const r of pieces) {
      const part = path.join(work, 'part');
      const c = await run('curl', [
        '-sS',
        '--fail',
        '--cacert',
        cert,
        '-H',
        `Authorization: Bearer ${reader}`,
        '--range',
        r,
        '-o',
        part,
        '-w',
        '%{http_code}',
        url,
      ]);
      assert.equal(c.stdout, '206');
      fs.appendFileSync(raw1, fs.readFileSync(part));
    }
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw1, img]);
    // A client that follows the extents: only data runs are fetched, into a sparse file.
    const runs = await json('GET', '/api/vms/web/checkpoints/c2/disks/vda/extents', { token: reader });
    let pos = 0;
    for (const r of runs) {
      assert.equal(r.start, pos);
      pos += r.length;
    }
    assert.equal(pos, 48 * MiB);
    const data = runs.filter((r: { zero: boolean }) => !r.zero);
    assert.ok(data.length > 0 && runs.some((r: { zero: boolean }) => r.zero));
    const raw2 = path.join(work, 'extents.raw');
    const fd = fs.openSync(raw2, 'w');
    fs.ftruncateSync(fd, 48 * MiB);
    let fetched = 0;
    for (const r of data) {
      const res = await request('GET', url, {
        token: reader,
        headers: { range: `bytes=${r.start}-${r.start + r.length - 1}` },
      });
      assert.equal(res.status, 206);
      assert.equal(res.headers['content-range'], `bytes ${r.start}-${r.start + r.length - 1}/${48 * MiB}`);
      fs.writeSync(fd, res.body, 0, res.body.length, r.start);
      fetched += res.body.length;
    }
    fs.closeSync(fd);
    assert.ok(fetched < 48 * MiB, `fetched ${fetched} bytes: holes were skipped`);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw2, img]);
    const bad = await request('GET', url, { token: reader, headers: { range: `bytes=${48 * MiB}-` } });
    assert.equal(bad.status, 416);
  });

  it('runs a restore job with progress events; the restored disk equals the source', async () => {
    await apiError(
      'POST',
      '/api/jobs/restore',
      { token: reader, body: { vm: 'web', checkpoint: 'c2', disk: 'vda', to: 'x.raw' } },
      403,
      'PERMISSION_DENIED',
    );
    await apiError(
      'POST',
      '/api/jobs/restore',
      { token: operator, body: { vm: 'web', checkpoint: 'c2', disk: 'vda', to: '../x.raw' } },
      400,
      'TARGET_INVALID',
    );
    await apiError(
      'POST',
      '/api/jobs/restore',
      { token: operator, body: { vm: 'web', checkpoint: 'c2', disk: 'vda', to: '/tmp/x.raw' } },
      400,
      'TARGET_INVALID',
    );
    const job = await json(
      'POST',
      '/api/jobs/restore',
      { token: operator, body: { vm: 'web', checkpoint: 'c2', disk: 'vda', to: 'vda.raw' } },
      202,
    );
    assert.equal(job.state, 'running');
    // Server-sent events until the end event.
    const events = await new Promise<{ event: string; data: Json }[]>((resolve, reject) => {
      const got: { event: string; data: Json }[] = [];
      https
        .get(
          new URL(`/api/jobs/${job.id}/events`, base),
          { ca, headers: { authorization: `Bearer ${operator}` } },
          (res) => {
            assert.equal(res.statusCode, 200);
            assert.match(String(res.headers['content-type']), /text\/event-stream/);
            let buf = '';
            res.on('data', (c: Buffer) => {
              buf += c.toString('utf8');
              let i;
              while ((i = buf.indexOf('\n\n')) >= 0) {
                const block = buf.slice(0, i);
                buf = buf.slice(i + 2);
                const ev = /^event: (.*)$/m.exec(block)?.[1] ?? '';
                const data = JSON.parse(/^data: (.*)$/m.exec(block)?.[1] ?? 'null');
                got.push({ event: ev, data });
              }
            });
            res.on('end', () => resolve(got));
            res.on('error', reject);
          },
        )
        .on('error', reject);
    });
    const end = events[events.length - 1]!;
    assert.equal(end.event, 'end');
    assert.equal(end.data.state, 'done', JSON.stringify(end.data.error));
    assert.ok(events.some((e) => e.event === 'progress'));
    assert.ok(end.data.total > 0 && end.data.done === end.data.total);
    const out = path.join(restoreRoot, 'vda.raw');
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', out, img]);
    assert.equal(fs.statSync(out).mode & 0o777, 0o600);
    const again = await json('GET', `/api/jobs/${job.id}`, { token: operator });
    assert.equal(again.state, 'done');
    assert.equal(again.result.disks[0].disk, 'vda');
  });

  it('uploads a disk image into the restore root (operators only)', async () => {
    const body = randomBuffer(9, 2 * MiB);
    await apiError('PUT', '/api/uploads/up.raw', { token: reader, body }, 403, 'PERMISSION_DENIED');
    const r = await json('PUT', '/api/uploads/up.raw', { token: operator, body });
    assert.equal(r.bytes, body.length);
    assert.equal(sha256(fs.readFileSync(path.join(restoreRoot, 'up.raw'))), sha256(body));
    await apiError('PUT', '/api/uploads/up.raw', { token: operator, body }, 409, 'TARGET_EXISTS');
  });

  it('cookie sessions need the CSRF token for changes; protect, forget with confirmation', async () => {
    await bkfsOk([
      '-r',
      repo,
      'backup',
      'web',
      '--disk',
      `vda=${img}`,
      '--level',
      'full',
      '--checkpoint',
      'c3',
    ]);
    const login = await request('POST', '/api/login', { body: { token: operator } });
    assert.equal(login.status, 200);
    const setCookie = String(login.headers['set-cookie']);
    assert.match(setCookie, /bkfs_session=/);
    assert.match(setCookie, /HttpOnly/i);
    assert.match(setCookie, /Secure/i);
    assert.match(setCookie, /SameSite=Strict/i);
    const cookie = setCookie.split(';')[0]!;
    const { csrfToken, role } = JSON.parse(login.body.toString());
    assert.equal(role, 'operator');
    const who = await json('GET', '/api/session', { headers: { cookie } });
    assert.equal(who.name, 'op');
    await apiError(
      'POST',
      '/api/vms/web/checkpoints/c3/protect',
      { headers: { cookie } },
      403,
      'PERMISSION_DENIED',
    );
    await apiError(
      'POST',
      '/api/vms/web/checkpoints/c3/protect',
      { headers: { cookie, 'x-csrf-token': 'forged' } },
      403,
      'PERMISSION_DENIED',
    );
    const p = await json('POST', '/api/vms/web/checkpoints/c3/protect', {
      headers: { cookie, 'x-csrf-token': csrfToken },
    });
    assert.deepEqual(p, { vm: 'web', checkpoint: 'c3', protected: true, changed: true });
    await apiError(
      'DELETE',
      '/api/vms/web/checkpoints/c3?confirm=web@c3',
      { token: reader },
      403,
      'PERMISSION_DENIED',
    );
    await apiError(
      'DELETE',
      '/api/vms/web/checkpoints/c3?confirm=web@c3',
      { token: operator },
      409,
      'PROTECTED',
    );
    await json('POST', '/api/vms/web/checkpoints/c3/unprotect', { token: operator });
    await apiError('DELETE', '/api/vms/web/checkpoints/c3?confirm=web@c2', { token: operator }, 400, 'USAGE');
    const f = await json('DELETE', '/api/vms/web/checkpoints/c3?confirm=web@c3', {
      headers: { cookie, 'x-csrf-token': csrfToken },
    });
    assert.deepEqual(
      f.removed.map((x: { name: string }) => x.name),
      ['c3'],
    );
    const cps = await json('GET', '/api/vms/web/checkpoints', { token: reader });
    assert.deepEqual(
      cps.map((c: { name: string }) => c.name),
      ['c1', 'c2'],
    );
    // A removed token ends its sessions.
    await bkfsOk(['web', 'token', 'add', 'temp', '--json'], env).then(async (r) => {
      const t = JSON.parse(r.stdout).token;
      const l = await request('POST', '/api/login', { body: { token: t } });
      const c = String(l.headers['set-cookie']).split(';')[0]!;
      await json('GET', '/api/vms', { headers: { cookie: c } });
      await bkfsOk(['web', 'token', 'remove', 'temp'], env);
      await apiError('GET', '/api/vms', { headers: { cookie: c } }, 401, 'UNAUTHORIZED');
    });
  });

  it('rate-limits login attempts', async () => {
    let limited: Res | undefined;
    for (let i = 0; i < 15 && !limited; i++) {
      const r = await request('POST', '/api/login', { body: { token: `bkfs_guess${i}` } });
      if (r.status === 429) limited = r;
      else assert.equal(r.status, 401);
    }
    assert.ok(limited, 'no 429 after 15 attempts');
    assert.equal(JSON.parse(limited.body.toString()).error.code, 'UNAUTHORIZED');
    // The right token is refused too while limited.
    assert.equal((await request('POST', '/api/login', { body: { token: operator } })).status, 429);
  });

  it('keeps an audit log of downloads and restores (0600)', () => {
    const file = path.join(work, 'state', 'audit.log');
    assert.equal(fs.statSync(file).mode & 0o777, 0o600);
    const lines = fs
      .readFileSync(file, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    const dl = lines.find((l) => l.action === 'download' && l.path === '/data/big.bin');
    assert.ok(
      dl && dl.user === 'ro' && dl.outcome === 'ok' && dl.checkpoint === 'c2' && typeof dl.time === 'string',
    );
    const rs = lines.filter((l) => l.action === 'restore');
    assert.ok(
      rs.some((l) => l.user === 'op' && l.outcome === 'done' && l.to === path.join(restoreRoot, 'vda.raw')),
    );
    assert.ok(lines.some((l) => l.action === 'archive' && l.format === 'zip'));
    assert.ok(lines.some((l) => l.action === 'forget' && l.checkpoint === 'c3'));
  });

  it('stops cleanly on bkfs web stop (SIGTERM)', async () => {
    const r = await bkfs(['web', 'stop'], env);
    assert.equal(r.code, 0, r.stderr);
    base = '';
    const log = fs.readFileSync(path.join(work, 'state', 'server.log'), 'utf8');
    assert.match(log, /SIGTERM received, stopping/);
    assert.match(log, /stopped/);
    // No appliance or file session left behind.
    assert.doesNotMatch(log, /still has mounts/);
  });
});
