/**
 * `bkfs run JOBFILE` against real libvirt (TCG domains of test/helpers/libvirt.ts), real child
 * `bkfs backup` processes, SQLite and packs.
 *
 * The job has three "hosts": `qemu:///system`, the same libvirtd reached through a second URI form
 * (`qemu+unix:///system?socket=...`; to be switched to the `remote` helper's network-namespace
 * host), and a host whose socket does not exist (unreachable). Domains are selected with a glob and
 * an exclude, one named domain is missing. Checked: `--dry-run` starts nothing; a run backs up
 * every reachable domain, fails the missing one and the unreachable host's, says so in the summary
 * and exits 30 (JOB_PARTIAL); `--json` matches its schema; the backups are byte-exact; the level
 * policy gives full, then inc, then full (every 2nd backup); retention and gc run at the end, then
 * the `[copy]` step into an offsite repository (byte-exact there, which keeps what retention removed
 * here); a log file per run, 0600 in a 0700 directory.
 */
import { describe, it, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { bkfs, bkfsOk, qemuIo } from '../helpers/cli';
import { assertCheckpointEquals } from '../helpers/compare';
import { libvirtMissing, startDaemons, stopDaemons, TestDomain, type Daemons } from '../helpers/libvirt';
import { arr, bool, int, nullable, obj, oneOf, str, time, validate, type Schema } from '../helpers/schema';
import { EXIT_CODES } from '../../src/cli/exit-codes';
import { run } from '../../src/util/proc';

const missing = libvirtMissing();
const SOCKET = '/run/libvirt/libvirt-sock';

const errSchema: Schema = nullable(obj({ code: str, exitCode: nullable(int), message: str }));
const vmSchema = obj({
  host: str,
  uri: str,
  domain: str,
  vm: nullable(str),
  plannedLevel: nullable(oneOf('full', 'inc', 'diff', 'copy')),
  levelReason: nullable(str),
  level: nullable(oneOf('full', 'inc', 'diff', 'copy')),
  result: oneOf('ok', 'failed', 'planned', 'interrupted'),
  checkpoint: nullable(str),
  started: nullable(time),
  finished: nullable(time),
  durationMs: int,
  backupMs: int,
  virtualSize: nullable(int),
  bytesRead: nullable(int),
  storedBytes: nullable(int),
  error: errSchema,
});
const runSchema = obj({
  job: str,
  repository: str,
  dryRun: bool,
  started: time,
  finished: time,
  durationMs: int,
  vms: arr(vmSchema, { min: 1 }),
  retention: nullable(obj({ ok: bool, error: errSchema, vms: arr(str), removed: int, kept: int })),
  gc: nullable(obj({ ok: bool, error: errSchema, bytesFreed: nullable(int) })),
  copy: nullable(
    obj({
      ok: bool,
      error: errSchema,
      to: str,
      vms: arr(str),
      copied: int,
      skipped: int,
      chunksTransferred: int,
      bytesTransferred: int,
    }),
  ),
  succeeded: int,
  failed: int,
  interrupted: bool,
  log: nullable(str),
});

interface VmJson {
  host: string;
  domain: string;
  vm: string | null;
  plannedLevel: string | null;
  level: string | null;
  result: string;
  checkpoint: string | null;
  bytesRead: number | null;
  storedBytes: number | null;
  error: { code: string; message: string } | null;
}
interface RunJson {
  vms: VmJson[];
  succeeded: number;
  failed: number;
  retention: { ok: boolean; removed: number; kept: number; vms: string[] } | null;
  gc: { ok: boolean; bytesFreed: number | null } | null;
  copy: { ok: boolean; to: string; vms: string[]; copied: number; skipped: number } | null;
  log: string | null;
}

describe('bkfs run: a job file for an estate', { skip: missing ?? false }, () => {
  let work: string;
  let daemons: Daemons = { started: [] };
  const doms: TestDomain[] = [];
  const prefix = `bkfs-jobs-${process.pid}`;
  const names = { web1: `${prefix}-web1`, web2: `${prefix}-web2`, db1: `${prefix}-db1` };
  const refs: Record<string, string> = {};
  const images: Record<string, string> = {};
  let repo: string;
  let offsite: string;
  let logDir: string;
  let jobFile: string;
  let scratch: string;

  const runJob = (...args: string[]) => bkfs(['run', jobFile, ...args]);
  const checkpoints = async (vm: string) =>
    (
      JSON.parse((await bkfsOk(['-r', repo, 'list', vm, '--json'])).stdout) as {
        name: string;
        level: string;
      }[]
    ).map((c) => `${c.name}:${c.level}`);
  const row = (j: RunJson, domain: string) => {
    const r = j.vms.find((v) => v.domain === domain);
    assert.ok(r, `a row for ${domain}: ${JSON.stringify(j.vms)}`);
    return r;
  };

  before(async () => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-jobs-test-'));
    fs.chmodSync(work, 0o755); // QEMU (libvirt-qemu) must reach the images and the scratch dir
    scratch = path.join(work, 'scratch');
    fs.mkdirSync(scratch, { mode: 0o755 });
    daemons = await startDaemons();
    let seed = 1;
    for (const [key, name] of Object.entries(names)) {
      const img = path.join(work, `${key}.qcow2`);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
      await qemuIo(
        img,
        'qcow2',
        `write -P 0x${(0x10 + seed).toString(16)} 1M 2M`,
        `write -P 0x7${seed} 9M 300k`,
      );
      refs[key] = path.join(work, `${key}.ref.raw`);
      images[key] = img;
      await run('qemu-img', ['convert', '-O', 'raw', '-f', 'qcow2', img, refs[key]]);
      doms.push(await TestDomain.create(work, name, [{ target: 'sda', file: img, format: 'qcow2' }]));
      seed++;
    }
    repo = path.join(work, 'repo');
    await bkfsOk(['-r', repo, 'init']);
    offsite = path.join(work, 'offsite');
    await bkfsOk(['-r', offsite, 'init']);
    logDir = path.join(work, 'logs');
    jobFile = path.join(work, 'estate.toml');
    fs.writeFileSync(
      jobFile,
      `# the test's estate
repository = "repo"          # relative: to this file's directory
log-dir = "logs"
concurrency = 3
retry-lock = "5m"
freeze = false

[level]
mode = "auto"
full-every-backups = 2

[retention]
keep-last = 2

[gc]
enabled = true

[copy]
to = "offsite"               # relative: to this file's directory

[[host]]
name = "local"
uri = "qemu:///system"
domains = ["${prefix}-*"]
exclude = ["${prefix}-db*"]
concurrency = 2
scratch-dir = "scratch"

[[host]]
name = "second"
uri = "qemu+unix:///system?socket=${SOCKET}"
domains = ["${names.db1}", "${prefix}-missing"]
scratch-dir = "scratch"

[[host]]
name = "gone"
uri = "qemu+unix:///system?socket=${work}/no-such-libvirt-sock"
domains = ["web*"]
`,
    );
  });

  after(async () => {
    try {
      for (const d of doms) await d.destroy();
    } finally {
      await stopDaemons(daemons);
      if (process.env.BKFS_JOBS_TEST_KEEP_LOGS && fs.existsSync(logDir))
        fs.cpSync(logDir, process.env.BKFS_JOBS_TEST_KEEP_LOGS, { recursive: true });
      fs.rmSync(work, { recursive: true, force: true });
    }
  });

  it('--dry-run resolves and plans, and starts nothing', async () => {
    const r = await runJob('--dry-run');
    assert.equal(r.code, EXIT_CODES.JOB_PARTIAL, r.stderr);
    const lines = r.stdout.split('\n');
    assert.match(lines[0]!, /^HOST\s+VM\s+LEVEL\s+RESULT\s+TIME\s+READ\s+STORED\s+ERROR$/);
    for (const n of [names.web1, names.web2]) {
      assert.match(r.stdout, new RegExp(`^local\\s+${n}\\s+full\\s+planned\\s.*no full yet$`, 'm'));
    }
    assert.match(r.stdout, new RegExp(`^second\\s+${names.db1}\\s+full\\s+planned\\s`, 'm'));
    assert.match(
      r.stdout,
      new RegExp(
        `^second\\s+${prefix}-missing\\s+.*failed.*SOURCE_NOT_FOUND: host second has no domain`,
        'm',
      ),
    );
    assert.match(r.stdout, /^gone\s+web\*\s+-\s+failed\s.*HOST_UNREACHABLE: host gone unreachable: /m);
    assert.match(
      r.stdout,
      /dry run: 3 backup\(s\) would run, 2 cannot, then retention, then gc, then a copy into \S+offsite; nothing started/,
    );
    assert.match(r.stderr, /^bkfs: 2 of 5 VM backup\(s\) failed$/m);
    const list = JSON.parse((await bkfsOk(['-r', repo, 'list', '--json'])).stdout) as unknown[];
    assert.deepEqual(list, [], 'no checkpoint');
    assert.ok(!fs.existsSync(logDir), 'no log of a dry run');
    for (const d of doms) {
      assert.deepEqual(await d.checkpointNames(), [], 'no libvirt checkpoint');
      assert.equal(await d.job(), null, 'no backup job');
    }
  });

  it('a run backs up every reachable domain in parallel children, fails the others, exits 30 (--json)', async () => {
    const r = await runJob('--json');
    assert.equal(r.code, EXIT_CODES.JOB_PARTIAL, r.stderr);
    assert.match(r.stderr, /^bkfs: 2 of 5 VM backup\(s\) failed$/m);
    const j = validate('run --json', r.stdout, runSchema) as RunJson;
    assert.equal(j.succeeded, 3);
    assert.equal(j.failed, 2);
    for (const d of [names.web1, names.web2, names.db1]) {
      const v = row(j, d);
      assert.equal(v.result, 'ok', JSON.stringify(v));
      assert.equal(v.vm, d);
      assert.equal(v.level, 'full');
      assert.equal(v.checkpoint, 'check1');
      assert.ok(v.bytesRead! >= 2 << 20 && v.storedBytes! > 0, JSON.stringify(v));
    }
    assert.equal(row(j, names.db1).host, 'second');
    assert.deepEqual(
      [row(j, `${prefix}-missing`).result, row(j, `${prefix}-missing`).error?.code],
      ['failed', 'SOURCE_NOT_FOUND'],
    );
    assert.deepEqual([row(j, 'web*').result, row(j, 'web*').error?.code], ['failed', 'HOST_UNREACHABLE']);
    // Retention ran for the VMs backed up (nothing to forget yet), and gc.
    assert.deepEqual(j.retention && { ...j.retention, vms: [...j.retention.vms].sort() }, {
      ok: true,
      error: null,
      vms: [names.db1, names.web1, names.web2].sort(),
      removed: 0,
      kept: 3,
    });
    assert.equal(j.gc?.ok, true);
    // The offsite copy of the VMs backed up.
    assert.deepEqual(j.copy && { ...j.copy, vms: [...j.copy.vms].sort() }, {
      ...j.copy!,
      ok: true,
      to: offsite,
      vms: [names.db1, names.web1, names.web2].sort(),
      copied: 3,
      skipped: 0,
    });
    for (const [k, n] of Object.entries(names)) {
      await assertCheckpointEquals(repo, `${n}@check1`, 'sda', refs[k]!);
      await assertCheckpointEquals(offsite, `${n}@check1`, 'sda', refs[k]!);
    }
    // The log: one file per run, 0600, in a 0700 directory, with every VM's lines.
    assert.equal(fs.statSync(logDir).mode & 0o777, 0o700);
    const logs = fs.readdirSync(logDir);
    assert.equal(logs.length, 1);
    assert.equal(path.join(logDir, logs[0]!), j.log);
    assert.equal(fs.statSync(j.log!).mode & 0o777, 0o600);
    const text = fs.readFileSync(j.log!, 'utf8');
    for (const n of Object.values(names)) {
      assert.match(
        text,
        new RegExp(`\\[${n}\\] start: bkfs -r \\S+ --retry-lock 5m backup ${n} --libvirt ${n} --connect `),
      );
      assert.match(text, new RegExp(`\\[${n}\\] ok ${n}@check1 \\(full\\)`));
    }
    assert.match(text, /host gone unreachable/);
    assert.match(text, /finished: 2 of 5 VM backup\(s\) failed/);
    assert.doesNotMatch(text, /bkfs-progress/, 'progress lines are not logged');
  });

  it('the next runs follow the level policy (inc, then a full every 2nd) with retention and gc', async () => {
    await doms[0]!.qemuIo('sda', 'write -P 0xa1 4M 64k');
    await qemuIo(refs.web1!, 'raw', 'write -P 0xa1 4M 64k');
    const r2 = await runJob();
    assert.equal(r2.code, EXIT_CODES.JOB_PARTIAL, r2.stderr);
    for (const n of Object.values(names)) {
      assert.match(r2.stdout, new RegExp(`^(local|second)\\s+${n}\\s+inc\\s+ok\\s`, 'm'));
    }
    assert.match(r2.stdout, /^3 of 5 VM\(s\) backed up, 2 failed, in /m);
    assert.match(r2.stdout, /^retention: forgot 0 checkpoint\(s\) of 3 VM\(s\), kept 6$/m);
    assert.match(r2.stdout, /^gc: freed /m);
    assert.match(r2.stdout, /^copy: 3 checkpoint\(s\) of 3 VM\(s\) into \S+offsite, /m);
    assert.match(r2.stdout, /^log: \S+\.log$/m);
    await assertCheckpointEquals(repo, `${names.web1}@check2`, 'sda', refs.web1!);
    const web1 = (await bkfsOk(['-r', repo, 'list', names.web1, '--json'])).stdout;
    assert.ok(
      (JSON.parse(web1) as { bytesRead: number }[])[1]!.bytesRead <= 1 << 20,
      'the inc read what changed',
    );

    await doms[1]!.qemuIo('sda', 'write -P 0xb2 7M 128k');
    await qemuIo(refs.web2!, 'raw', 'write -P 0xb2 7M 128k');
    const r3 = await runJob('--json');
    assert.equal(r3.code, EXIT_CODES.JOB_PARTIAL, r3.stderr);
    const j3 = validate('run --json', r3.stdout, runSchema) as RunJson;
    for (const n of Object.values(names)) {
      assert.equal(row(j3, n).level, 'full', 'every 2nd backup is a full');
      assert.equal(row(j3, n).checkpoint, 'check3');
    }
    // keep-last 2: check1 of each VM forgotten; gc freed its data.
    assert.deepEqual(j3.retention, { ok: true, error: null, vms: j3.retention!.vms, removed: 3, kept: 6 });
    assert.equal(j3.gc?.ok, true);
    for (const n of Object.values(names))
      assert.deepEqual(await checkpoints(n), ['check2:inc', 'check3:full']);
    // The offsite repository keeps what retention removed here: its own retention decides.
    assert.deepEqual(j3.copy && [j3.copy.ok, j3.copy.copied, j3.copy.skipped], [true, 3, 3]);
    const offsiteWeb2 = JSON.parse((await bkfsOk(['-r', offsite, 'list', names.web2, '--json'])).stdout) as {
      name: string;
      level: string;
    }[];
    assert.deepEqual(
      offsiteWeb2.map((c) => `${c.name}:${c.level}`),
      ['check1:full', 'check2:inc', 'check3:full'],
    );
    await assertCheckpointEquals(offsite, `${names.web2}@check3`, 'sda', refs.web2!);
    await bkfsOk(['-r', offsite, 'verify']);
    await assertCheckpointEquals(repo, `${names.web2}@check3`, 'sda', refs.web2!);
    await assertCheckpointEquals(repo, `${names.web1}@check2`, 'sda', refs.web1!);
    assert.equal(fs.readdirSync(logDir).length, 3, 'a log per run');
    await bkfsOk(['-r', repo, 'verify']);
  });

  it('a bad job file: one line with file:line, exit 29, nothing run', async () => {
    const bad = path.join(work, 'bad.toml');
    fs.writeFileSync(
      bad,
      fs.readFileSync(jobFile, 'utf8').replace('keep-last = 2', 'keep-last = 2\nkeep-forever = true'),
    );
    const r = await bkfs(['run', bad]);
    assert.equal(r.code, EXIT_CODES.JOB_INVALID);
    assert.equal(
      r.stderr,
      `bkfs: ${bad}:14: retention.keep-forever: unknown key (known here: keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly, keep-yearly, keep-within)\n`,
    );
    assert.equal(r.stdout, '');
    assert.equal(fs.readdirSync(logDir).length, 3, 'no log');
    const withRepo = await bkfs(['-r', repo, 'run', jobFile]);
    assert.equal(withRepo.code, EXIT_CODES.USAGE);
    assert.equal(withRepo.stderr, 'bkfs: bkfs run takes the repository from the job file, not from -r\n');
  });
});
