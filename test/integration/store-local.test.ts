/**
 * gc, verify, repair --rebuild-index and stats reach a local repository's packs and manifests
 * only through its store (FORMAT.md, "Storage interface"): whatever else lies under `packs/` or
 * `manifests/` (a foreign file, a `.pack` file whose name is no pack's, a writer's temporary) is
 * not a pack or a manifest, exactly as a bucket's foreign keys are not: gc does not count or
 * delete it, verify and rebuild do not report it, stats does not count it. A real orphan pack is
 * still found and deleted. Also: the eslint rule that keeps fs out of those four files.
 * Real qcow2 images, real bkfs processes, real SQLite.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { assertCheckpointEquals } from '../helpers/compare';
import { toRaw } from '../helpers/images';
import { packFilesOnDisk } from '../helpers/packfiles';
import { packPath } from '../../src/store/packs';
import { run } from '../../src/util/proc';
import type { GcReport } from '../../src/repo/gc';
import type { VerifyReport } from '../../src/repo/verify';
import type { RebuildReport } from '../../src/repo/rebuild';

const ROOT = path.resolve(__dirname, '../../..');
const MiB = 1 << 20;
let work: string;

before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-store-local-test-'));
});
after(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

const json = async <T>(args: string[]): Promise<T> => JSON.parse((await bkfsOk(args)).stdout) as T;

/** The bytes of each of `files` (relative to `dir`). */
function snapshot(dir: string, files: string[]): Map<string, Buffer> {
  return new Map(files.map((f) => [f, fs.readFileSync(path.join(dir, f))]));
}

describe('a local repository through its store: foreign files are not packs or manifests', () => {
  let repo: string;
  let raw: string;
  const foreign = new Map<string, Buffer>();

  before(async () => {
    const img = path.join(work, 'd.qcow2');
    repo = path.join(work, 'repo');
    raw = path.join(work, 'd.raw');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    const data = path.join(work, 'data');
    fs.writeFileSync(data, randomBytes(6 * MiB));
    await qemuIo(img, 'qcow2', `write -s ${data} 0 ${6 * MiB}`, 'write -P 0x5a 10M 1M');
    await bkfsOk(['-r', repo, 'init']);
    await bkfsOk(['-r', repo, 'backup', 'vm', '--disk', `vda=${img}`, '--level', 'full']);
    await toRaw(img, raw);
    const packs = packFilesOnDisk(repo);
    assert.ok(packs.length >= 1);
    const sub = packs[0]!.name.slice(0, 2);
    // Foreign things a person or another tool may leave: none of them is a pack or a manifest.
    const put = (rel: string, content: Buffer): void => {
      fs.mkdirSync(path.dirname(path.join(repo, rel)), { recursive: true, mode: 0o700 });
      fs.writeFileSync(path.join(repo, rel), content, { mode: 0o600 });
      foreign.set(rel, content);
    };
    put(`packs/${sub}/notapack.txt`, Buffer.from('notes\n'));
    put(`packs/${sub}/notapack.pack`, randomBytes(4096)); // ends in .pack, no pack's name
    put(`packs/${sub}/.${packs[0]!.name}.pack.1234abcd.tmp`, randomBytes(100)); // a temporary
    put(`packs/ff/${'0'.repeat(32)}.pack`, randomBytes(100)); // a pack's name in the wrong directory
    put('packs/README', Buffer.from('foreign\n'));
    put('manifests/notes.json.zst', Buffer.from('not a manifest'));
  });

  it('gc neither counts nor deletes them, and still deletes a real orphan pack', async () => {
    const packs = packFilesOnDisk(repo);
    // A real orphan: a copy of a pack under a new pack name (what a crash before indexing leaves).
    const orphan = randomBytes(16).toString('hex');
    fs.mkdirSync(path.dirname(packPath(repo, orphan)), { recursive: true, mode: 0o700 });
    fs.copyFileSync(packPath(repo, packs[0]!.name), packPath(repo, orphan));
    const bytes = packs.reduce((a, p) => a + p.size, 0);
    const rep = await json<GcReport>(['-r', repo, 'gc', '--json']);
    assert.equal(rep.orphansRemoved, 1, 'the orphan pack, and nothing foreign');
    assert.equal(fs.existsSync(packPath(repo, orphan)), false);
    assert.equal(rep.bytesBefore, bytes + packs[0]!.size, 'pack bytes: the packs and the orphan only');
    assert.equal(rep.bytesAfter, bytes);
    assert.deepEqual(packFilesOnDisk(repo), packs, 'the indexed packs are untouched');
    assert.deepEqual(snapshot(repo, [...foreign.keys()]), foreign, 'foreign files untouched');
  });

  it('verify reports nothing about them', async () => {
    const rep = await json<VerifyReport>(['-r', repo, 'verify', '--json']);
    assert.deepEqual(rep.problems, []);
    assert.deepEqual(rep.damaged, []);
    assert.ok(rep.chunksChecked > 0);
  });

  it('stats counts the packs only', async () => {
    const s = await json<{ repository: { packs: number; packBytes: number } }>([
      '-r',
      repo,
      'stats',
      '--json',
    ]);
    const packs = packFilesOnDisk(repo);
    assert.equal(s.repository.packs, packs.length);
    assert.equal(
      s.repository.packBytes,
      packs.reduce((a, p) => a + p.size, 0),
    );
  });

  it('repair --rebuild-index indexes the packs and manifests only; the checkpoint reads back', async () => {
    const packs = packFilesOnDisk(repo);
    for (const f of fs.readdirSync(repo)) if (f.startsWith('index.db')) fs.rmSync(path.join(repo, f));
    const rep = await json<RebuildReport>(['-r', repo, 'repair', '--rebuild-index', '--json']);
    assert.deepEqual(rep.problems, []);
    assert.equal(rep.packs, packs.length);
    assert.equal(rep.manifests, 1);
    assert.equal(rep.checkpoints, 1);
    assert.equal(rep.missingChunks, 0);
    // Local packs are version 1 (no trailer): read record by record, through the store.
    assert.equal(rep.remoteReads.wholeReads, packs.length);
    await assertCheckpointEquals(repo, 'vm@check1', 'vda', raw, 20);
    const again = await json<VerifyReport>(['-r', repo, 'verify', '--json']);
    assert.deepEqual(again.problems, []);
    assert.deepEqual(again.damaged, []);
    assert.deepEqual(snapshot(repo, [...foreign.keys()]), foreign, 'foreign files untouched');
  });

  it('verify finds a missing manifest and a missing pack through the store', async () => {
    const uid = fs
      .readdirSync(path.join(repo, 'manifests'))
      .find((n) => /^[0-9a-f]{32}\.json\.zst$/.test(n))!;
    const aside = path.join(work, 'manifest-aside');
    fs.renameSync(path.join(repo, 'manifests', uid), aside);
    const [pack] = packFilesOnDisk(repo);
    const packAside = path.join(work, 'pack-aside');
    fs.renameSync(packPath(repo, pack!.name), packAside);
    try {
      const r = await bkfs(['-r', repo, 'verify', '--read-only', '--json']);
      assert.equal(r.code, EXIT_CODES.VERIFY_FAILED, r.stderr);
      const rep = JSON.parse(r.stdout) as VerifyReport;
      assert.ok(
        rep.problems.some((p) => p.includes(`manifest ${uid.slice(0, 32)} is missing`)),
        rep.problems.join('\n'),
      );
      assert.ok(rep.damaged.length > 0 && rep.damaged.every((d) => /is missing/.test(d.error)));
    } finally {
      fs.renameSync(aside, path.join(repo, 'manifests', uid));
      fs.renameSync(packAside, packPath(repo, pack!.name));
    }
  });
});

describe('the eslint rule: gc, verify, rebuild and stats import no fs', () => {
  it('an fs import in those files is an error pointing at the store; elsewhere it is fine', async () => {
    const { ESLint } = await import('eslint');
    const eslint = new ESLint({ cwd: ROOT });
    const code = "import * as fs from 'node:fs';\nexport const x = fs.existsSync('/');\n";
    for (const f of ['src/repo/gc.ts', 'src/repo/verify.ts', 'src/repo/rebuild.ts', 'src/repo/stats.ts']) {
      for (const mod of ['node:fs', 'fs', 'node:fs/promises']) {
        const [res] = await eslint.lintText(code.replace('node:fs', mod), { filePath: path.join(ROOT, f) });
        const msgs = res!.messages.filter((m) => m.ruleId === 'no-restricted-imports');
        assert.equal(msgs.length, 1, `${f} importing ${mod}`);
        assert.match(msgs[0]!.message, /repository store/);
      }
    }
    const [ok] = await eslint.lintText(code, { filePath: path.join(ROOT, 'src/repo/gc-pending.ts') });
    assert.equal(ok!.messages.filter((m) => m.ruleId === 'no-restricted-imports').length, 0);
  });
});
