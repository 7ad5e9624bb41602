/**
 * Assembles `bench/run`'s results: reads compare.json and engine.json (either may be missing),
 * adds the machine's description and tool versions, and writes
 *   bench/results/<date>-<mode>.md, .json, .svg   and   bench/results/latest-<mode>.md, .svg
 *
 *   node dist/bench/report.js --mode small|full --compare FILE --engine FILE --results DIR
 *                             [--instant FILE] [--parallel FILE] [--random-read FILE] [--started EPOCH_SECONDS]
 * `--parallel`: bench/parallel.ts's JSON (many backups into one repository), a table of its own.
 * `--random-read`: bench/random-read.ts's JSON (fio 4 KiB randread through the mount, the NBD
 * export, the qcow2 chain and the raw file); appended as its own section.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { arg, errMsg, sh } from './lib/common';
import {
  mdTargets,
  renderMarkdown,
  renderSvg,
  type CompareResult,
  type EngineResult,
  type InstantResult,
  type Report,
} from './lib/report';
import { renderRandomRead, type RandomReadResult } from './random-read';

interface ParallelResult {
  vms: number;
  sizeMiB: number;
  shared: number;
  runs: number;
  loadAvg: number;
  backups: { parallel: number; medianSecs: number; speedup: number }[];
  gc: { aloneMedianSecs: number; besideBackupsMedianSecs: number };
}

/** The row group of bench/parallel.ts: total time of N backups by processes at once; gc. */
function renderParallel(p: ParallelResult): string {
  const rows = p.backups.map(
    (b) =>
      `| ${b.parallel === 1 ? '1 (one after another)' : b.parallel} | ${b.medianSecs.toFixed(1)} | ${b.speedup.toFixed(2)} |`,
  );
  return [
    '',
    `## Many backups into one repository (${p.vms} VMs x ${p.sizeMiB} MiB, ${Math.round(p.shared * 100)} % shared data; median of ${p.runs}; load ${p.loadAvg.toFixed(1)})`,
    '',
    '| backups at once | total s | speed-up |',
    '| --- | --- | --- |',
    ...rows,
    '',
    `gc (\`--max-unused 0\`): alone ${p.gc.aloneMedianSecs.toFixed(1)} s, beside 4 running backups ${p.gc.besideBackupsMedianSecs.toFixed(1)} s.`,
    '',
  ].join('\n');
}

function readJson<T>(file: string): T | null {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch {
    return null;
  }
}

async function version(cmd: string, args: string[], re?: RegExp): Promise<string | null> {
  try {
    const r = await sh(cmd, args, { allowFail: true });
    if (r.code !== 0 && r.code !== 1) return null;
    const text = `${r.stdout}\n${r.stderr}`.trim();
    if (re) return re.exec(text)?.[0] ?? null;
    return text.split('\n')[0] ?? null;
  } catch {
    return null;
  }
}

async function main(): Promise<void> {
  const mode = arg('mode', 'small');
  const resultsDir = path.resolve(arg('results', path.join(__dirname, '../../bench/results')));
  const compare = readJson<CompareResult>(arg('compare', ''));
  const engine = readJson<EngineResult>(arg('engine', ''));
  const parallel = readJson<ParallelResult>(arg('parallel', ''));
  const randomRead = readJson<RandomReadResult>(arg('random-read', ''));
  const instant = readJson<InstantResult>(arg('instant', ''));
  const started = Number(arg('started', '0'));
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const osRelease = fs.existsSync('/etc/os-release') ? fs.readFileSync('/etc/os-release', 'utf8') : '';
  const machine = {
    cpu: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1]?.trim() ?? os.cpus()[0]?.model ?? '?',
    nproc: os.availableParallelism(),
    memGiB: os.totalmem() / 1024 ** 3,
    kernel: os.release(),
    os: /PRETTY_NAME="?([^"\n]*)"?/.exec(osRelease)?.[1] ?? os.type(),
    node: process.version,
  };
  const versions: Record<string, string> = {};
  for (const t of compare?.tools ?? []) versions[t.label] = t.version;
  const extra: [string, string, string[], RegExp?][] = [
    ['qemu', 'qemu-img', ['--version']],
    ['nbdkit', 'nbdkit', ['--version']],
    ['libnbd (nbdcopy, nbdfuse)', 'nbdcopy', ['--version']],
    ['fio', 'fio', ['--version']],
    ['GNU time', 'dpkg-query', ['-W', '-f', '${Version}', 'time']],
  ];
  for (const [name, cmd, args, re] of extra) {
    if (versions[name]) continue;
    const v = await version(cmd, args, re);
    if (v) versions[name] = v;
  }
  const now = new Date();
  const date = now.toISOString().slice(0, 10);
  const report: Report = {
    date,
    mode,
    machine,
    versions,
    compare,
    engine,
    instant,
    durationSecs:
      started > 0
        ? Math.round(Date.now() / 1000 - started)
        : (compare?.durationSecs ?? 0) + (engine?.durationSecs ?? 0),
  };
  fs.mkdirSync(resultsDir, { recursive: true });
  const stem = `${date}-${mode}`;
  const title = `bkfs beside the alternatives (${mode} mode, ${date}; ${compare?.params.diskMiB ?? '?'} MiB disk, ${compare?.params.checkpoints ?? '?'} checkpoints)`;
  const files: string[] = [];
  const write = (name: string, text: string): void => {
    const f = path.join(resultsDir, name);
    fs.writeFileSync(f, text);
    files.push(f);
  };
  write(`${stem}.json`, JSON.stringify({ ...report, parallel, randomRead }, null, 2) + '\n');
  const rr = randomRead ? `\n${renderRandomRead(randomRead)}` : '';
  if (compare) {
    const svg = renderSvg(compare, title);
    write(`${stem}.svg`, svg);
    write(`latest-${mode}.svg`, svg);
  }
  const par = parallel ? renderParallel(parallel) : '';
  write(`${stem}.md`, renderMarkdown(report, compare ? `${stem}.svg` : null) + par + rr);
  write(`latest-${mode}.md`, renderMarkdown(report, compare ? `latest-${mode}.svg` : null) + par + rr);
  for (const f of files) process.stdout.write(`${f}\n`);
  process.stdout.write(`\n${mdTargets(report).join('\n')}\n`);
}

main().catch((e: unknown) => {
  process.stderr.write(`report failed: ${errMsg(e)}\n`);
  process.exitCode = 1;
});
