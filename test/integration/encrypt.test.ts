/**
 * Encrypted repositories (issue 13 §2, FORMAT.md "Encryption (format 5)"), end to end with the real
 * bkfs, qemu-img/qemu-io images, FUSE mounts and libsodium: backup, mount, restore, verify,
 * forget/gc, rebuild and damage on an encrypted repository; nothing of the plaintext (a marker
 * written into the image and into the saved domain XML) in any repository file; key sources
 * (passphrase file and command, key file, paper key), wrong or missing keys (exit 35/36, nothing
 * changed), key slots, and the mount daemon getting the key through a pipe, not argv/environment.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, type CliResult } from '../helpers/cli';
import { run } from '../../src/util/proc';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { Repository } from '../../src/repo/repository';
import { CheckpointReader } from '../../src/chain/reader';
import { PACK_FLAG_SEALED, PACK_HEADER_LEN, packPath } from '../../src/store/packs';
import { fromPaperKey } from '../../src/crypto/keys';
import { forgetMasters, rememberMaster } from '../../src/crypto/keyring';
import { getConfigs } from '../../src/index/catalog';
import { daemonAlive, mountAt, readState } from '../../src/fuse/state';
import { PLAIN_FORMAT_VERSION } from '../../src/index/schema';

const MiB = 1 << 20;
const MARKER = 'BKFS-CRYPT-TEST-MARKER-6f1d2c9e';
const XML_MARKER = 'vnc-password-7a5e11b0';

let work = '';
let repo = '';
let img = '';
let pwFile = '';
let keyFile = '';
let paperKey = '';
let master: Buffer;
const refs: Record<string, string> = {};

/** Environment of a bkfs with exactly one key source (and none inherited from the test runner). */
function env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return {
    BKFS_PASSWORD_FILE: '',
    BKFS_PASSWORD_COMMAND: '',
    BKFS_KEY_FILE: '',
    BKFS_PAPER_KEY_FILE: '',
    ...extra,
  };
}
const withPw = (): NodeJS.ProcessEnv => env({ BKFS_PASSWORD_FILE: pwFile });
const withKf = (): NodeJS.ProcessEnv => env({ BKFS_KEY_FILE: keyFile });

async function ok(args: string[], e: NodeJS.ProcessEnv = withKf()): Promise<CliResult> {
  return bkfsOk(['-r', repo, ...args], e);
}

/** Every file of the repository with its bytes' SHA-256 (and mode), to show nothing changed. */
function snapshot(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string): void => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else
        out.set(path.relative(dir, p), crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex'));
    }
  };
  walk(dir);
  return out;
}

function allFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out.push(p);
    }
  };
  walk(dir);
  return out;
}

async function restoreTo(ref: string, file: string, e = withKf()): Promise<CliResult> {
  fs.rmSync(file, { force: true });
  return bkfs(['-r', repo, 'restore', ref, '--disk', 'vda', '--to', file], e);
}

/** A restored raw image equals the reference (the restore may round the size up: compare its prefix). */
function sameAsRef(file: string, ref: string): void {
  const want = fs.readFileSync(refs[ref]!);
  const got = fs.readFileSync(file);
  assert.ok(got.length >= want.length, `${file} is shorter than ${ref}`);
  assert.ok(got.subarray(0, want.length).equals(want), `${file} differs from ${ref}`);
  assert.ok(
    got.subarray(want.length).every((b) => b === 0),
    `${file} has bytes after ${ref}'s end`,
  );
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-crypt-test-'));
  process.env.BKFS_RUN_DIR = path.join(work, 'run'); // mount state of the bkfs the tests start
  repo = path.join(work, 'repo');
  img = path.join(work, 'disk.qcow2');
  pwFile = path.join(work, 'pw');
  keyFile = path.join(work, 'key');
  fs.writeFileSync(pwFile, 'correct horse battery staple\n');
  // A 32 MiB image: random data, text with the marker, zeros, a repeated block.
  const raw = Buffer.alloc(32 * MiB);
  crypto.randomFillSync(raw, 0, 6 * MiB);
  const text = Buffer.from(`${MARKER} some guest file text\n`.repeat(20000));
  text.copy(raw, 8 * MiB);
  raw.fill(0x41, 20 * MiB, 24 * MiB);
  const rawFile = path.join(work, 'disk.raw');
  fs.writeFileSync(rawFile, raw);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawFile, img]);
  refs.check1 = rawFile;
});

after(() => {
  forgetMasters();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

describe('bkfs on an encrypted repository', () => {
  it('init --encrypt makes a format-5 repository with a passphrase and a key-file slot and prints the paper key once', async () => {
    const r = await bkfsOk(['-r', repo, '--key-file', keyFile, 'init', '--encrypt'], withPw());
    assert.match(r.stderr, /WARNING: this repository is encrypted\. Without one of its passphrases/);
    assert.match(r.stderr, /created key file/);
    const m = /paper key[^\n]*\n\s+([0-9A-Z-]+)\n/.exec(r.stdout);
    assert.ok(m, r.stdout);
    paperKey = m[1]!;
    master = fromPaperKey(paperKey);
    assert.equal(fs.statSync(keyFile).mode & 0o777, 0o600);
    assert.equal(fs.readFileSync(keyFile).length, 64);
    const cfg = JSON.parse(fs.readFileSync(path.join(repo, 'bkfs-repo.json'), 'utf8')) as {
      format: number;
      encryption: { cipher: string; slots: { kind: string; name: string }[] };
    };
    assert.equal(cfg.format, 5);
    assert.equal(cfg.encryption.cipher, 'xchacha20-poly1305');
    assert.deepEqual(
      cfg.encryption.slots.map((s) => `${s.name}:${s.kind}`),
      ['passphrase:passphrase', 'keyfile:keyfile'],
    );
    // Nothing of the key in the configuration.
    assert.equal(fs.readFileSync(path.join(repo, 'bkfs-repo.json')).indexOf(master.subarray(0, 16)), -1);
    const v = await ok(['version', '--json']);
    assert.deepEqual(
      (JSON.parse(v.stdout) as { repository: { encrypted: boolean } }).repository.encrypted,
      true,
    );
  });

  it('full and incremental backups, restored byte for byte, verify clean', async () => {
    const xml = path.join(work, 'domain.xml');
    fs.writeFileSync(xml, `<domain><name>vm</name><graphics passwd="${XML_MARKER}"/></domain>\n`);
    await ok(['backup', 'vm', '--disk', `vda=${img}`, '--config', `domain.xml=${xml}`], withPw());
    // Guest writes: a second marker block and a pattern, recorded by the image's dirty bitmap.
    const src = path.join(work, 'more.txt');
    fs.writeFileSync(src, Buffer.from(`${MARKER} written later\n`.repeat(4096)).subarray(0, MiB));
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `write -s ${src} ${12 * MiB} ${MiB}`,
      '-c',
      `write -P 0x5c ${2 * MiB} 64k`,
      img,
    ]);
    const b2 = await ok(['backup', 'vm', '--disk', `vda=${img}`, '--json']);
    assert.equal((JSON.parse(b2.stdout) as { level: string }).level, 'inc');
    const raw2 = path.join(work, 'disk2.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw2]);
    refs.check2 = raw2;
    const out = path.join(work, 'out.raw');
    assert.equal((await restoreTo('vm@check1', out)).code, 0);
    sameAsRef(out, 'check1');
    assert.equal((await restoreTo('vm@check2', out, withPw())).code, 0);
    sameAsRef(out, 'check2');
    const v = await ok(['verify']);
    assert.match(v.stdout, /no damage found/);
    const s = await ok(['stats']);
    assert.match(s.stdout, /^encryption: xchacha20-poly1305, key id [0-9a-f]{16}, 2 key slot\(s\)$/m);
  });

  it('no repository file holds the plaintext: not the data, not the domain XML, not the chunk hashes', async () => {
    const files = allFiles(repo);
    assert.ok(files.some((f) => f.endsWith('.pack')));
    assert.ok(files.some((f) => f.endsWith('.json.zst')));
    // The index also holds the domain XML (sealed) and chunk ids (keyed): grep every file.
    const plainHash = Buffer.from(
      (await import('@napi-rs/blake-hash')).blake3(
        fs.readFileSync(refs.check1!).subarray(20 * MiB, 20 * MiB + 262144),
      ),
    );
    for (const f of files) {
      const b = fs.readFileSync(f);
      assert.equal(b.indexOf(MARKER), -1, `${f} holds the data marker`);
      assert.equal(b.indexOf(XML_MARKER), -1, `${f} holds the domain XML`);
      assert.equal(b.indexOf('<domain>'), -1, `${f} holds the domain XML`);
      assert.equal(b.indexOf(plainHash), -1, `${f} holds a plain BLAKE3 chunk hash`);
    }
    for (const f of files.filter((x) => x.endsWith('.pack'))) {
      const h = Buffer.alloc(PACK_HEADER_LEN);
      const fd = fs.openSync(f, 'r');
      fs.readSync(fd, h, 0, PACK_HEADER_LEN, 0);
      fs.closeSync(fd);
      assert.equal(h.readUInt32BE(12) & PACK_FLAG_SEALED, PACK_FLAG_SEALED, `${f} is flagged sealed`);
    }
    // The configuration comes back whole through the key.
    rememberMaster(master);
    const r = Repository.open(repo, { readOnly: true });
    try {
      const cp = r.db.prepare("SELECT id FROM checkpoints WHERE name = 'check1'").get() as { id: number };
      const cfgs = getConfigs(r.db, cp.id);
      assert.equal(cfgs.length, 1);
      assert.match(cfgs[0]!.data.toString(), new RegExp(XML_MARKER));
    } finally {
      r.close();
      forgetMasters();
    }
  });

  it('a wrong passphrase exits 35, no key source exits 36, and neither changes the repository', async () => {
    const before = snapshot(repo);
    const bad = path.join(work, 'bad-pw');
    fs.writeFileSync(bad, 'Correct horse battery staple\n');
    const badKey = path.join(work, 'bad-key');
    fs.writeFileSync(badKey, crypto.randomBytes(64));
    for (const args of [
      ['list'],
      ['backup', 'vm', '--disk', `vda=${img}`],
      ['gc'],
      ['verify'],
      ['forget', 'vm@check1'],
    ]) {
      const w = await bkfs(['-r', repo, ...args], env({ BKFS_PASSWORD_FILE: bad }));
      assert.equal(w.code, EXIT_CODES.KEY_INVALID, `${args.join(' ')}: ${w.stderr}`);
      assert.equal(w.stderr.trim().split('\n').length, 1, w.stderr);
      assert.match(w.stderr, /wrong passphrase or key file/);
      const k = await bkfs(['-r', repo, '--key-file', badKey, ...args], env());
      assert.equal(k.code, EXIT_CODES.KEY_INVALID, k.stderr);
      const n = await bkfs(['-r', repo, ...args], env());
      assert.equal(n.code, EXIT_CODES.KEY_REQUIRED, `${args.join(' ')}: ${n.stderr}`);
      assert.equal(n.stderr.trim().split('\n').length, 1, n.stderr);
      assert.match(n.stderr, /is encrypted: give its passphrase/);
    }
    const failing = await bkfs(['-r', repo, 'list'], env({ BKFS_PASSWORD_COMMAND: 'exit 3' }));
    assert.equal(failing.code, EXIT_CODES.KEY_REQUIRED, failing.stderr);
    assert.deepEqual(snapshot(repo), before);
  });

  it('opens with BKFS_PASSWORD_COMMAND, a key file (--key-file and BKFS_KEY_FILE) and the paper key', async () => {
    const cmd = await bkfs(['-r', repo, 'list'], env({ BKFS_PASSWORD_COMMAND: `cat '${pwFile}'` }));
    assert.equal(cmd.code, 0, cmd.stderr);
    assert.match(cmd.stdout, /vm@check2/);
    assert.equal((await bkfs(['-r', repo, '--key-file', keyFile, 'list'], env())).code, 0);
    assert.equal((await bkfs(['-r', repo, 'list'], withKf())).code, 0);
    const paper = path.join(work, 'paper.txt');
    fs.writeFileSync(paper, `${paperKey.toLowerCase()}\n`);
    const p = await bkfs(['-r', repo, 'list'], env({ BKFS_PAPER_KEY_FILE: paper }));
    assert.equal(p.code, 0, p.stderr);
  });

  it('key add, change-passphrase and remove round trip; the last slot is never removed', async () => {
    const pw2 = path.join(work, 'pw2');
    const pw3 = path.join(work, 'pw3');
    fs.writeFileSync(pw2, 'second passphrase\n');
    fs.writeFileSync(pw3, 'third passphrase\n');
    await ok(['key', 'add', '--name', 'second', '--new-password-file', pw2], withPw());
    const list = JSON.parse((await ok(['key', 'list', '--json'], env())).stdout) as {
      slots: { name: string }[];
    };
    assert.deepEqual(
      list.slots.map((s) => s.name),
      ['passphrase', 'keyfile', 'second'],
    );
    assert.equal((await bkfs(['-r', repo, 'list'], env({ BKFS_PASSWORD_FILE: pw2 }))).code, 0);
    await ok(['key', 'change-passphrase', '--new-password-file', pw3], env({ BKFS_PASSWORD_FILE: pw2 }));
    assert.equal(
      (await bkfs(['-r', repo, 'list'], env({ BKFS_PASSWORD_FILE: pw2 }))).code,
      EXIT_CODES.KEY_INVALID,
    );
    assert.equal((await bkfs(['-r', repo, 'list'], env({ BKFS_PASSWORD_FILE: pw3 }))).code, 0);
    assert.equal(
      (await bkfs(['-r', repo, 'list'], withPw())).code,
      0,
      'the other passphrase slot is unchanged',
    );
    // Removing needs a key too.
    assert.equal((await bkfs(['-r', repo, 'key', 'remove', 'second'], env())).code, EXIT_CODES.KEY_REQUIRED);
    await ok(['key', 'remove', 'second'], withKf());
    await ok(['key', 'remove', 'passphrase'], withKf());
    assert.equal((await bkfs(['-r', repo, 'list'], withPw())).code, EXIT_CODES.KEY_INVALID);
    const before = snapshot(repo);
    const last = await bkfs(['-r', repo, 'key', 'remove', 'keyfile'], withKf());
    assert.equal(last.code, EXIT_CODES.USAGE, last.stderr);
    assert.match(last.stderr, /last key slot/);
    assert.deepEqual(snapshot(repo), before);
    // A passphrase again, from the paper key (the recovery path).
    const paper = path.join(work, 'paper.txt');
    await ok(['key', 'add', '--new-password-file', pwFile], env({ BKFS_PAPER_KEY_FILE: paper }));
    assert.equal((await bkfs(['-r', repo, 'list'], withPw())).code, 0);
  });

  it('the mount daemon reads the checkpoint; the key is in neither its argv nor its environment', async () => {
    const mp = path.join(work, 'mnt');
    fs.mkdirSync(mp);
    const passphrase = fs.readFileSync(pwFile, 'utf8').trim();
    try {
      const r = await ok(['mount', 'vm@check2', mp], withPw());
      const pid = Number(/daemon pid (\d+)/.exec(r.stdout)?.[1]);
      assert.ok(pid > 0, r.stdout);
      const got = fs.readFileSync(path.join(mp, 'vda.raw'));
      const want = fs.readFileSync(refs.check2!);
      assert.ok(got.subarray(0, want.length).equals(want), 'mounted bytes');
      const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`);
      const environ = fs.readFileSync(`/proc/${pid}/environ`);
      for (const [what, b] of [
        ['argv', cmdline],
        ['environment', environ],
      ] as const) {
        for (const secret of [master.toString('hex'), master.toString('base64'), paperKey, passphrase]) {
          assert.equal(b.indexOf(secret), -1, `the key is in the daemon's ${what}`);
        }
      }
      // The daemon got the key through the pipe: it has no passphrase source of its own to use.
      assert.match(environ.toString(), /BKFS_KEY_FD=4/);
      await ok(['umount', mp]);
    } finally {
      const st = readState(mp);
      if (mountAt(mp)) await bkfs(['umount', '--lazy', mp]);
      if (st && daemonAlive(st)) process.kill(st.pid, 'SIGKILL');
    }
  });

  it('forget, gc and repair --rebuild-index work; checkpoints still restore and verify clean', async () => {
    await ok(['forget', 'vm@check1', '--prune']);
    await ok(['repair', '--rebuild-index']);
    const out = path.join(work, 'out.raw');
    assert.equal((await restoreTo('vm@check2', out)).code, 0);
    sameAsRef(out, 'check2');
    assert.match((await ok(['verify'])).stdout, /no damage found/);
    // A new full after the rebuild dedups against the rebuilt index (keyed ids read from the packs).
    // (A chunk an inc stored as a 64 KiB dirty piece is read whole by the full: at most that is new.)
    const b3 = JSON.parse(
      (await ok(['backup', 'vm', '--disk', `vda=${img}`, '--level', 'full', '--json'])).stdout,
    ) as {
      chunks: { newChunks: number; dedupChunks: number };
    };
    assert.ok(b3.chunks.dedupChunks >= 20, JSON.stringify(b3.chunks));
    assert.ok(b3.chunks.newChunks <= 2, JSON.stringify(b3.chunks));
  });

  it('a flipped byte in a pack: EIO through a mount, DATA_DAMAGED from restore, never other bytes', async () => {
    rememberMaster(master);
    let target: { offset: number; length: number };
    const r = Repository.open(repo, { readOnly: true });
    try {
      const reader = CheckpointReader.open(r, 'vm@check2');
      const ext = [...reader.extents('vda')].find(
        (e) => e.loc && e.offset >= 8 * MiB && e.length >= 64 * 1024,
      );
      assert.ok(ext?.loc, 'a data extent');
      target = { offset: ext.offset, length: ext.length };
      const file = packPath(repo, ext.loc.pack);
      const fd = fs.openSync(file, 'r+');
      // One byte deep inside the sealed bytes (the ciphertext, not the header): only the tag can tell.
      const at = ext.loc.offset + Math.floor(ext.loc.storedLen / 2);
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, at);
      b[0] = b[0]! ^ 0x01;
      fs.writeSync(fd, b, 0, 1, at);
      fs.closeSync(fd);
    } finally {
      r.close();
      forgetMasters();
    }
    const res = await restoreTo('vm@check2', path.join(work, 'damaged.raw'));
    assert.equal(res.code, EXIT_CODES.DATA_DAMAGED, res.stderr);
    const mp = path.join(work, 'mnt2');
    fs.mkdirSync(mp);
    try {
      await ok(['mount', 'vm@check2', mp]);
      const fd = fs.openSync(path.join(mp, 'vda.raw'), 'r');
      try {
        const b = Buffer.alloc(4096);
        let code: string | undefined;
        try {
          fs.readSync(fd, b, 0, 4096, target.offset);
        } catch (e) {
          code = (e as NodeJS.ErrnoException).code;
        }
        assert.equal(code, 'EIO');
        const want = fs.readFileSync(refs.check2!);
        const good = Buffer.alloc(MiB);
        assert.equal(fs.readSync(fd, good, 0, MiB, 0), MiB);
        assert.ok(good.equals(want.subarray(0, MiB)), 'undamaged bytes read normally');
      } finally {
        fs.closeSync(fd);
      }
      await ok(['umount', mp]);
    } finally {
      const st = readState(mp);
      if (mountAt(mp)) await bkfs(['umount', '--lazy', mp]);
      if (st && daemonAlive(st)) process.kill(st.pid, 'SIGKILL');
    }
    const v = await bkfs(['-r', repo, 'verify'], withKf());
    assert.equal(v.code, EXIT_CODES.VERIFY_FAILED, v.stderr + v.stdout);
  });

  it('plain repositories are unaffected: format 6, no encryption, unsealed packs, no key asked', async () => {
    const plain = path.join(work, 'plain');
    await bkfsOk(['-r', plain, 'init'], env());
    const cfg = JSON.parse(fs.readFileSync(path.join(plain, 'bkfs-repo.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    assert.equal(cfg.format, PLAIN_FORMAT_VERSION);
    assert.equal(cfg.encryption, undefined);
    await bkfsOk(['-r', plain, 'backup', 'vm', '--disk', `vda=${img}`], env());
    const packs = allFiles(plain).filter((f) => f.endsWith('.pack'));
    assert.ok(packs.length > 0);
    for (const f of packs) assert.equal(fs.readFileSync(f).readUInt32BE(12), 0);
    const out = path.join(work, 'plain.raw');
    await bkfsOk(['-r', plain, 'restore', 'vm', '--disk', 'vda', '--to', out], env());
    sameAsRef(out, 'check2');
    assert.match((await bkfsOk(['-r', plain, 'stats'], env())).stdout, /^encryption: none/m);
    const k = await bkfs(['-r', plain, 'key', 'list'], env());
    assert.match(k.stdout, /is not encrypted/);
  });
});

describe('bkfs copy between plain and encrypted repositories', () => {
  it('plain -> encrypted -> plain: byte-identical at each hop, re-sealed with the destination key', async () => {
    const plain = path.join(work, 'copy-plain');
    const enc = path.join(work, 'copy-enc');
    const back = path.join(work, 'copy-back');
    const kf = path.join(work, 'copy-key');
    const ref = path.join(work, 'copy-ref.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, ref]);
    refs.copy = ref;
    const xml = path.join(work, 'copy-domain.xml');
    fs.writeFileSync(xml, `<domain><name>cvm</name><graphics passwd="${XML_MARKER}"/></domain>\n`);
    await bkfsOk(['-r', plain, 'init'], env());
    await bkfsOk(
      ['-r', plain, 'backup', 'cvm', '--disk', `vda=${img}`, '--config', `domain.xml=${xml}`],
      env(),
    );
    await bkfsOk(['-r', enc, '--key-file', kf, 'init', '--encrypt'], env());
    const withKey = env({ BKFS_KEY_FILE: kf });
    const c1 = JSON.parse(
      (await bkfsOk(['-r', plain, 'copy', 'cvm', '--to', enc, '--json'], withKey)).stdout,
    ) as { chunksTransferred: number };
    assert.ok(c1.chunksTransferred > 0);
    // Nothing of the plaintext (data marker, domain XML) in the encrypted copy.
    for (const f of allFiles(enc)) {
      const b = fs.readFileSync(f);
      assert.equal(b.indexOf(MARKER), -1, `${f} holds the data marker`);
      assert.equal(b.indexOf(XML_MARKER), -1, `${f} holds the domain XML`);
    }
    const out = path.join(work, 'copy-out.raw');
    const r1 = await bkfs(['-r', enc, 'restore', 'cvm', '--disk', 'vda', '--to', out], withKey);
    assert.equal(r1.code, 0, r1.stderr);
    sameAsRef(out, 'copy');
    assert.match((await bkfsOk(['-r', enc, 'verify'], withKey)).stdout, /no damage found/);
    // And back out into a plain repository.
    await bkfsOk(['-r', back, 'init'], env());
    await bkfsOk(['-r', back, 'copy', 'cvm', '--from', enc], withKey);
    fs.rmSync(out, { force: true });
    const r2 = await bkfs(['-r', back, 'restore', 'cvm', '--disk', 'vda', '--to', out], env());
    assert.equal(r2.code, 0, r2.stderr);
    sameAsRef(out, 'copy');
    const b = Repository.open(back, { readOnly: true });
    try {
      const cp = b.db.prepare('SELECT id FROM checkpoints').get() as { id: number };
      const cfg = getConfigs(b.db, cp.id);
      assert.ok(
        cfg.some((c) => c.name === 'domain.xml' && c.data.toString().includes(XML_MARKER)),
        'the domain XML came back as plaintext',
      );
    } finally {
      b.close();
    }
    // Without the destination's key the copy is refused before anything is written.
    const plain2 = path.join(work, 'copy-plain2');
    await bkfsOk(['-r', plain2, 'init'], env());
    const denied = await bkfs(['-r', plain2, 'copy', 'cvm', '--from', enc], env());
    assert.equal(denied.code, EXIT_CODES.KEY_REQUIRED, denied.stderr);
  });
});
