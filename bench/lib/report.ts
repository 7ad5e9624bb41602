/**
 * Result types of `bench/compare.ts` and `bench/engine.ts`, and their rendering: a Markdown report
 * (absolute figures, ratios against bkfs, engine figures, machine, versions, notes) and an SVG
 * chart (grouped horizontal bars, one group per measurement, drawn here: no external service).
 */
import type { Stat } from './common';

export type Cell =
  { samples: number[]; partial?: boolean; note?: string; stat?: Stat | null } | { na: string; note?: string };

export interface Metric {
  id: string;
  label: string;
  unit: string;
  better: 'lower' | 'higher';
  cells: Record<string, Cell>;
}

export interface ToolInfo {
  id: string;
  label: string;
  version: string;
  notes: string[];
  unavailable?: string;
}

/** Full-backup baselines measured on the comparison's disk image in the same runs (issue 16). */
export interface Baselines {
  /** `qemu-img convert -f qcow2 -O raw` of the image to a file on the same disk, s. */
  convertRaw: number[];
  /** `nbdcopy` from a `qemu-nbd -r` export of the image to a file on the same disk, s. */
  nbdcopy: number[];
  /** user+sys CPU seconds of bkfs's full backups (its whole process tree, qemu-nbd included). */
  bkfsFullCpuSecs: number[];
}

export interface CompareResult {
  mode: string;
  baselines?: Baselines;
  params: Record<string, number | number[]>;
  tools: ToolInfo[];
  metrics: Metric[];
  errors: string[];
  durationSecs: number;
  host: string;
}

export interface EngineResult {
  mode: string;
  runs: number;
  imageMiB: number;
  dataBytes?: number;
  full?: Stat | null;
  convert?: Stat | null;
  nbdcopy?: Stat | null;
  inc?: Stat | null;
  virtualMBs?: number;
  dataMBs?: number;
  vsConvert?: number;
  vsNbdcopy?: number;
  incPercentOfFull?: number;
  indexBytes?: number;
  indexBytesPerGiB?: number;
  repoBytes?: number;
  rss?: Record<string, Stat | null>;
  fullCpuPercent?: Stat | null;
  /** user+sys CPU seconds of the bkfs full's process tree (qemu-nbd included) per GiB read. */
  fullCpuSecsPerGiB?: Stat | null;
  /** Wall ms of `bkfs --help`, `bkfs list` and `node -e 0` (the floor), median over the runs. */
  startupMs?: { help: Stat | null; list: Stat | null; node: Stat | null };
  nproc?: number;
  errors: string[];
  durationSecs?: number;
}

export interface Machine {
  cpu: string;
  nproc: number;
  memGiB: number;
  kernel: string;
  os: string;
  node: string;
}

export interface Report {
  date: string;
  mode: string;
  machine: Machine;
  versions: Record<string, string>;
  compare: CompareResult | null;
  engine: EngineResult | null;
  /** bench/instant.ts (absent in reports made before it existed). */
  instant?: InstantResult | null;
  durationSecs: number;
}

/** bench/instant.ts: time to a booted VM and to independence. */
export interface InstantResult {
  diskMiB: number;
  dataMiB: number;
  restoreBoot: { restoreSecs: number; markerSecs: number } | null;
  instant: { markerSecs: number; independentSecs: number } | null;
  errors: string[];
  durationSecs: number;
}

function mdInstant(x: InstantResult): string[] {
  const L: string[] = [];
  L.push(`## Instant recovery (${x.diskMiB} MiB disk, ${x.dataMiB} MiB of data; TCG guest)`);
  L.push('');
  L.push('| | time to marker (s) | restore (s) | independent of the backup (s) |');
  L.push('|---|---:|---:|---:|');
  const rb = x.restoreBoot;
  const ir = x.instant;
  L.push(
    `| restore, then boot | ${rb ? fmt(rb.markerSecs) : 'n/a'} | ${rb ? fmt(rb.restoreSecs) : 'n/a'} | ${rb ? fmt(rb.restoreSecs) : 'n/a'} |`,
  );
  L.push(
    `| instant-restore | ${ir ? fmt(ir.markerSecs) : 'n/a'} | - | ${ir ? fmt(ir.independentSecs) : 'n/a'} |`,
  );
  for (const e of x.errors) L.push(`- error: ${e}`);
  return L;
}

// ---------------------------------------------------------------------------------------------
// Numbers

export function fmt(v: number, unit = ''): string {
  if (!Number.isFinite(v)) return 'n/a';
  const a = Math.abs(v);
  let s: string;
  if (unit === 'IOPS' || a >= 1000) s = Math.round(v).toLocaleString('en-US');
  else if (a >= 100) s = v.toFixed(0);
  else if (a >= 10) s = v.toFixed(1);
  else if (a >= 1) s = v.toFixed(2);
  else s = v.toPrecision(2);
  return s;
}

function statOf(c: Cell | undefined): Stat | null {
  if (!c || !('samples' in c)) return null;
  if (c.stat) return c.stat;
  const xs = [...c.samples].sort((a, b) => a - b);
  if (xs.length === 0) return null;
  const mid = Math.floor(xs.length / 2);
  const median = xs.length % 2 ? (xs[mid] as number) : ((xs[mid - 1] as number) + (xs[mid] as number)) / 2;
  return { median, min: xs[0] as number, max: xs[xs.length - 1] as number, n: xs.length };
}

function cellText(m: Metric, c: Cell | undefined): string {
  if (!c) return 'n/a';
  const st = statOf(c);
  if (!st) return `n/a${'na' in c && c.na ? ` ¹` : ''}`;
  let t = fmt(st.median, m.unit);
  if (st.n > 1) t += ` (${fmt(st.min, m.unit)}–${fmt(st.max, m.unit)})`;
  if ('partial' in c && c.partial) t += ' ²';
  if (c.note) t += ` *${c.note}*`;
  return t;
}

function ratioText(m: Metric, c: Cell | undefined, base: Cell | undefined): string {
  const a = statOf(c);
  const b = statOf(base);
  if (!a || !b || b.median === 0) return 'n/a';
  const r = a.median / b.median;
  return `${r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2)}×`;
}

const arrow = (m: Metric): string => (m.better === 'lower' ? '↓' : '↑');

// ---------------------------------------------------------------------------------------------
// Markdown

function mdCompare(c: CompareResult, chart: string | null): string[] {
  const tools = c.tools;
  const L: string[] = [];
  const p = c.params;
  const changed = Array.isArray(p.changedMiB) ? p.changedMiB : [];
  const disk = Number(p.diskMiB);
  L.push('## bkfs beside the alternatives');
  L.push('');
  L.push(
    `Disk: ${disk} MiB qcow2, GPT, ext4 root partition (75 %) with ${p.files ?? '?'} files (${p.fileMiB ?? '?'} MiB: ` +
      `config and text files, logs, libraries, media, a database, a preallocated file of zeros), an unformatted partition ` +
      `and unpartitioned space; ${p.allocatedMiB ?? '?'} MiB allocated. History: ${p.checkpoints} checkpoints` +
      (changed.length > 0
        ? `, ${fmt(Math.min(...changed))}–${fmt(Math.max(...changed))} MiB changed per checkpoint ` +
          `(${fmt((100 * Math.min(...changed)) / disk)}–${fmt((100 * Math.max(...changed)) / disk)} % of the disk) by file changes inside the guest filesystem through QEMU`
        : '') +
      `. Each figure: median of ${p.runs} run(s), (min–max) when more than one; incrementals: median over the history (min–max over it).`,
  );
  L.push('');
  L.push(
    'Page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every timed step for every tool; every read uses a fresh mount. ' +
      "Backups and disk restores are timed up to a `sync` after the command. Reads go through each tool's own mount " +
      `(FUSE file of the raw disk); sequential = \`dd bs=1M\` of the whole disk (stopped after ${p.seqCapSecs} s ²); ` +
      `random = fio 4 KiB randread, queue depth 1, ${p.fioSecs} s, O_DIRECT where the mount allows it. ` +
      'Small file = mount + `losetup -r -o` + `mount -o ro,noload` of the ext4 partition + `cp`, everything torn down again.',
  );
  L.push('');
  if (chart) {
    L.push(`![bkfs beside the alternatives](${chart})`);
    L.push('');
  }
  L.push('### Absolute figures');
  L.push('');
  L.push(`| measurement | ${tools.map((t) => t.label).join(' | ')} |`);
  L.push(`|---|${tools.map(() => '---:').join('|')}|`);
  for (const m of c.metrics) {
    L.push(
      `| ${m.label} (${m.unit}) ${arrow(m)} | ${tools.map((t) => cellText(m, m.cells[t.id])).join(' | ')} |`,
    );
  }
  L.push('');
  L.push('¹ see the reasons below. ² the read was stopped at the cap; the rate is over what was read.');
  L.push('');
  const others = tools.filter((t) => t.id !== 'bkfs');
  if (tools.some((t) => t.id === 'bkfs')) {
    L.push('### Ratios against bkfs');
    L.push('');
    L.push(
      "Each tool's median divided by bkfs's. For ↓ rows (times, bytes) a ratio above 1 means bkfs is better; for ↑ rows (throughput) a ratio below 1 means bkfs is better.",
    );
    L.push('');
    L.push(`| measurement | ${others.map((t) => t.label).join(' | ')} |`);
    L.push(`|---|${others.map(() => '---:').join('|')}|`);
    for (const m of c.metrics) {
      L.push(
        `| ${m.label} ${arrow(m)} | ${others.map((t) => ratioText(m, m.cells[t.id], m.cells['bkfs'])).join(' | ')} |`,
      );
    }
    L.push('');
  }
  const na: string[] = [];
  for (const m of c.metrics) {
    for (const t of tools) {
      const cell = m.cells[t.id];
      if (cell && 'na' in cell && !tools.find((x) => x.id === t.id)?.unavailable)
        na.push(`${t.label}, ${m.label}: ${cell.na}`);
    }
  }
  L.push('### How each tool was run');
  L.push('');
  for (const t of tools) {
    L.push(`- **${t.label}** (${t.version})${t.unavailable ? `: **not run**: ${t.unavailable}` : ''}`);
    for (const n of t.notes) L.push(`  - ${n}`);
  }
  if (na.length > 0) {
    L.push('');
    L.push('n/a:');
    L.push('');
    for (const x of na) L.push(`- ${x}`);
  }
  return L;
}

function statText(s: Stat | null | undefined, unit = ''): string {
  if (!s) return 'n/a';
  return s.n > 1 ? `${fmt(s.median, unit)} (${fmt(s.min, unit)}–${fmt(s.max, unit)})` : fmt(s.median, unit);
}

function mdEngine(e: EngineResult): string[] {
  const L: string[] = [];
  const MiB = 1024 * 1024;
  L.push('## Backup engine');
  L.push('');
  L.push(
    `A ${e.imageMiB} MiB qcow2, half random data (${fmt((e.dataBytes ?? NaN) / MiB)} MiB in 32 MiB blocks), half unallocated zeros, read through qemu-nbd. ` +
      `The image is in the page cache before every run (for every tool alike: this measures the pipeline, not the disk), and every run is timed up to a \`sync\`. Median of ${e.runs} run(s).`,
  );
  L.push('');
  L.push('| figure | value | target |');
  L.push('|---|---:|---|');
  L.push(`| bkfs full backup | ${statText(e.full)} s | |`);
  if (e.fullCpuPercent) {
    L.push(
      `| — CPU of the bkfs process tree (user+sys ÷ wall; ${e.nproc ?? '?'} CPUs) | ${statText(e.fullCpuPercent)} % | |`,
    );
  }
  L.push(`| — MB/s of virtual size | ${fmt(e.virtualMBs ?? NaN)} | |`);
  L.push(`| — MB/s of data read | ${fmt(e.dataMBs ?? NaN)} | |`);
  L.push(`| \`qemu-img convert -O raw\` | ${statText(e.convert)} s | |`);
  L.push(`| \`nbdcopy\` from \`qemu-nbd -r\` to a file | ${statText(e.nbdcopy)} s | |`);
  L.push(`| bkfs ÷ qemu-img convert | ${fmt(e.vsConvert ?? NaN)}× | |`);
  const okCopy = (e.vsNbdcopy ?? Infinity) <= 2;
  L.push(`| bkfs ÷ nbdcopy | ${fmt(e.vsNbdcopy ?? NaN)}× | ≤ 2× ${okCopy ? '✔' : '✘'} |`);
  L.push(`| incremental after 1 % changed | ${statText(e.inc)} s | |`);
  const okInc = (e.incPercentOfFull ?? Infinity) <= 5;
  L.push(`| — as % of the full's time | ${fmt(e.incPercentOfFull ?? NaN)} % | ≤ 5 % ${okInc ? '✔' : '✘'} |`);
  L.push(
    `| index bytes (index.db after \`wal_checkpoint(TRUNCATE)\`) per GiB of data backed up | ${fmt((e.indexBytesPerGiB ?? NaN) / 1024)} KiB | |`,
  );
  for (const [mib, st] of Object.entries(e.rss ?? {}).sort((a, b) => Number(a[0]) - Number(b[0]))) {
    L.push(
      `| peak RSS of \`bkfs backup\`, ${mib} MiB image (\`/usr/bin/time -v\`) | ${st ? `${statText({ ...st, median: st.median / MiB, min: st.min / MiB, max: st.max / MiB })} MiB` : 'n/a'} | flat |`,
    );
  }
  if (e.errors.length > 0) {
    L.push('');
    for (const x of e.errors) L.push(`- error: ${x}`);
  }
  return L;
}

function median(xs: number[] | undefined): number {
  const st = xs && xs.length > 0 ? statOf({ samples: xs }) : null;
  return st ? st.median : NaN;
}

/**
 * Issue 16's targets as one Markdown table, every ratio from the same run (the README's
 * performance table is copied from it).
 */
export function mdTargets(r: Report): string[] {
  const c = r.compare;
  const e = r.engine;
  const full = c?.metrics.find((m) => m.id === 'full');
  const inc = c?.metrics.find((m) => m.id === 'inc');
  const cell = (m: Metric | undefined, tool: string): number => statOf(m?.cells[tool])?.median ?? NaN;
  const bk = cell(full, 'bkfs');
  const b = c?.baselines;
  const conv = median(b?.convertRaw);
  const copy = median(b?.nbdcopy);
  const borg = cell(full, 'borg');
  const allocGiB = Number(c?.params.allocatedMiB ?? NaN) / 1024;
  const cpuGiB = median(b?.bkfsFullCpuSecs) / allocGiB;
  const bkInc = cell(inc, 'bkfs');
  const mark = (ok: boolean, v: number): string => (Number.isFinite(v) ? (ok ? '✔' : '✘') : '');
  const x = (v: number): string => (Number.isFinite(v) ? `${fmt(v)}×` : 'n/a');
  const sec = (v: number): string => (Number.isFinite(v) ? `${fmt(v)} s` : 'n/a');
  const MiB = 1024 * 1024;
  const L: string[] = [];
  L.push('## Issue 16 targets');
  L.push('');
  L.push(
    `Medians of ${c?.params.runs ?? e?.runs ?? '?'} runs; each ratio from figures of the same run. "bench image" = the comparison's ` +
      `${c?.params.diskMiB ?? '?'} MiB disk (${c?.params.allocatedMiB ?? '?'} MiB allocated), caches dropped before every step; ` +
      `"engine image" = the ${e?.imageMiB ?? '?'} MiB half-random qcow2, in the page cache.`,
  );
  L.push('');
  L.push('| target | measured | ratio | goal | |');
  L.push('|---|---:|---:|---|---|');
  const rv = bk / conv;
  L.push(
    `| full backup of the bench image vs \`qemu-img convert -O raw\` | ${sec(bk)} vs ${sec(conv)} | ${x(rv)} | ≤ 1.0× | ${mark(rv <= 1, rv)} |`,
  );
  const rb = bk / borg;
  L.push(`| full backup vs borg | ${sec(bk)} vs ${sec(borg)} | ${x(rb)} | ≤ 1.0× | ${mark(rb <= 1, rb)} |`);
  const rc = bk / copy;
  L.push(
    `| full backup vs \`nbdcopy\` to a file | ${sec(bk)} vs ${sec(copy)} | ${x(rc)} | ≤ 1.5× | ${mark(rc <= 1.5, rc)} |`,
  );
  L.push(
    `| CPU s per GiB read, bkfs + qemu-nbd (bench image / engine image) | ${fmt(cpuGiB)} / ${fmt(e?.fullCpuSecsPerGiB?.median ?? NaN)} | | report | |`,
  );
  const ip = (100 * bkInc) / bk;
  L.push(
    `| incremental (median over the history) as % of the full, bench image, incl. start-up | ${sec(bkInc)} | ${fmt(ip)} % | ≤ 5 % | ${mark(ip <= 5, ip)} |`,
  );
  const ie = e?.incPercentOfFull ?? NaN;
  L.push(
    `| incremental after 1 % change as % of the full, engine image, incl. start-up | ${sec(e?.inc?.median ?? NaN)} | ${fmt(ie)} % | ≤ 5 % | ${mark(ie <= 5, ie)} |`,
  );
  for (const [k, label] of [
    ['help', '`bkfs --help`'],
    ['list', '`bkfs list`'],
  ] as const) {
    const v = e?.startupMs?.[k]?.median ?? NaN;
    L.push(
      `| start-up of ${label} (\`node -e 0\`: ${fmt(e?.startupMs?.node?.median ?? NaN)} ms) | ${fmt(v)} ms | | < 100 ms | ${mark(v < 100, v)} |`,
    );
  }
  for (const [mib, st] of Object.entries(e?.rss ?? {}).sort((a, b) => Number(a[0]) - Number(b[0]))) {
    const v = (st?.max ?? NaN) / MiB;
    L.push(
      `| peak RSS of a full backup, ${fmt(Number(mib) / 1024)} GiB disk (max of the runs) | ${fmt(v)} MiB | | < 300 MB | ${mark(v * 1.048576 < 300, v)} |`,
    );
  }
  return L;
}

export function renderMarkdown(r: Report, chart: string | null): string {
  const L: string[] = [];
  L.push(`# bkfs benchmark: ${r.mode} mode, ${r.date}`);
  L.push('');
  const m = r.machine;
  L.push(
    `Machine: ${m.cpu}, ${m.nproc} CPUs, ${fmt(m.memGiB)} GiB RAM, Linux ${m.kernel}, ${m.os}, Node ${m.node}. ` +
      `Shared with other work while it ran: absolute figures drift, ratios within one run hold better. Took ${Math.round(r.durationSecs / 60)} min (\`bash bench/run${r.mode === 'small' ? ' --small' : ''}\`).`,
  );
  L.push('');
  L.push(...mdTargets(r), '');
  if (r.compare) L.push(...mdCompare(r.compare, chart), '');
  else L.push('The comparison did not produce results (see the log).', '');
  if (r.engine) L.push(...mdEngine(r.engine), '');
  if (r.instant) L.push(...mdInstant(r.instant), '');
  L.push('## Versions');
  L.push('');
  for (const [k, v] of Object.entries(r.versions)) L.push(`- ${k}: ${v}`);
  const errs = r.compare?.errors ?? [];
  if (errs.length > 0) {
    L.push('');
    L.push('## Errors');
    L.push('');
    for (const x of errs) L.push(`- ${x}`);
  }
  L.push('');
  return L.join('\n');
}

// ---------------------------------------------------------------------------------------------
// SVG

const COLORS = ['#d6452b', '#3b6fb6', '#5a9e4b', '#8d5fb3', '#d8932a', '#7a7a7a', '#2a9d9d'];

const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** Grouped horizontal bars: one group per measurement, one bar per tool, scaled to the group's largest. */
export function renderSvg(c: CompareResult, title: string): string {
  const tools = c.tools;
  const W = 920;
  const left = 130;
  const right = 150;
  const barH = 15;
  const gap = 3;
  const groupPad = 34;
  const legendH = 30;
  const metrics = c.metrics;
  const groupH = tools.length * (barH + gap) + groupPad;
  const H = 50 + legendH + metrics.length * groupH + 10;
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
  );
  out.push(`<rect width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="16" y="26" font-size="16" font-weight="bold">${esc(title)}</text>`);
  let lx = 16;
  tools.forEach((t, i) => {
    out.push(`<rect x="${lx}" y="42" width="12" height="12" fill="${COLORS[i % COLORS.length]}"/>`);
    out.push(`<text x="${lx + 16}" y="52">${esc(t.label)}</text>`);
    lx += 28 + t.label.length * 7;
  });
  let y = 50 + legendH;
  const maxW = W - left - right;
  for (const m of metrics) {
    out.push(
      `<text x="16" y="${y + 14}" font-weight="bold">${esc(m.label)} (${esc(m.unit)}, ${m.better === 'lower' ? 'lower' : 'higher'} is better)</text>`,
    );
    const stats = tools.map((t) => statOf(m.cells[t.id]));
    const max = Math.max(...stats.map((s) => s?.max ?? 0), 1e-12);
    let by = y + 22;
    tools.forEach((t, i) => {
      const s = stats[i];
      out.push(
        `<text x="${left - 8}" y="${by + barH - 3}" text-anchor="end" fill="#333">${esc(t.label)}</text>`,
      );
      if (s) {
        const w = Math.max(1, (s.median / max) * maxW);
        out.push(
          `<rect x="${left}" y="${by}" width="${w.toFixed(1)}" height="${barH}" fill="${COLORS[i % COLORS.length]}"/>`,
        );
        if (s.n > 1 && s.max > s.min) {
          const x1 = left + (s.min / max) * maxW;
          const x2 = left + (s.max / max) * maxW;
          out.push(
            `<line x1="${x1.toFixed(1)}" x2="${x2.toFixed(1)}" y1="${by + barH / 2}" y2="${by + barH / 2}" stroke="#000" stroke-width="1"/>`,
          );
        }
        const c = m.cells[t.id];
        const mark = c && 'partial' in c && c.partial ? ' (partial)' : '';
        const tx = left + Math.max(w, (s.max / max) * maxW) + 6;
        out.push(
          `<text x="${tx.toFixed(1)}" y="${by + barH - 3}">${esc(fmt(s.median, m.unit) + mark)}</text>`,
        );
      } else {
        out.push(`<text x="${left + 4}" y="${by + barH - 3}" fill="#999">n/a</text>`);
      }
      by += barH + gap;
    });
    y += groupH;
  }
  out.push('</svg>');
  return out.join('\n') + '\n';
}
