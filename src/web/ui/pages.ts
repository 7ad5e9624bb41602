/** The console's pages other than the file browser (browser.ts). */
import type { VNode } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { api, urls, type Checkpoint, type Job, type Session } from './api.js';
import { LAYOUT } from './browser.js';
import { BytesChart, chartPoints } from './chart.js';
import { ConfirmDialog, ErrorBox, Flags, Loading, useAsync } from './components.js';
import { bytes, modeString, parentPath, when } from './format.js';
import { html } from './html.js';
import { href, navigate } from './router.js';

const isOperator = (s: Session): boolean => s.role === 'operator';

// ---------------------------------------------------------------------------------------------
// Login

export function LoginPage({ onLogin }: { onLogin: (s: Session) => void }): VNode {
  const [token, setToken] = useState('');
  const [err, setErr] = useState<Error | undefined>();
  const [busy, setBusy] = useState(false);
  return html`<main class="login">
    <h1>bkfs console</h1>
    <form
      onSubmit=${async (e: Event) => {
        e.preventDefault();
        setBusy(true);
        setErr(undefined);
        try {
          onLogin(await api.login(token.trim()));
        } catch (x) {
          setErr(x as Error);
        } finally {
          setBusy(false);
        }
      }}
    >
      <label for="token" style="display:block">API token</label>
      <input
        id="token"
        name="token"
        type="password"
        autocomplete="off"
        required
        value=${token}
        onInput=${(e: Event) => setToken((e.target as HTMLInputElement).value)}
      />
      <button class="primary" id="login" disabled=${busy}>Log in</button>
      <${ErrorBox} error=${err} />
      <p class="muted">
        ${'Create a token on the server with '}<code>bkfs web token add NAME</code
        >${' (add '}<code>--read-only</code>${' for browse-only access).'}
      </p>
    </form>
  </main>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// VMs

export function VmsPage(): VNode {
  const vms = useAsync(() => api.vms(), []);
  return html`<div>
    <h1>Virtual machines</h1>
    <${ErrorBox} error=${vms.error} />
    ${vms.loading && !vms.data ? html`<${Loading} what="VMs" />` : null}
    ${vms.data && vms.data.length === 0 ? html`<p>The repository has no VMs yet: back one up with <code>bkfs backup</code>.</p>` : null}
    ${
      vms.data && vms.data.length > 0
        ? html`<table class="grid" id="vms">
            <thead>
              <tr>
                <th>VM</th>
                <th>Latest checkpoint</th>
                <th>Time</th>
                <th class="num">Checkpoints</th>
                <th class="num">Disk size</th>
                <th class="num">Stored</th>
                <th>Flags</th>
              </tr>
            </thead>
            <tbody>
              ${vms.data.map(
                (v) =>
                  html`<tr>
                    <td><a href=${href('vm', v.name)} class="vm-link">${v.name}</a></td>
                    <td>
                      ${v.latest ? html`<a href=${href('vm', v.name, 'cp', v.latest.name)}>${v.latest.name}</a> <${Flags} level=${v.latest.level} />` : '-'}
                    </td>
                    <td>${when(v.latest?.time)}</td>
                    <td class="num">${v.checkpoints}</td>
                    <td class="num">${bytes(v.virtualSize)}</td>
                    <td class="num">${bytes(v.storedBytes)}</td>
                    <td><${Flags} prot=${v.protected} damaged=${v.damaged} /></td>
                  </tr>`,
              )}
            </tbody>
          </table>`
        : null
    }
  </div>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// Operator actions on a checkpoint: protect/unprotect, forget

function CheckpointActions({
  cp,
  onChanged,
}: {
  cp: Checkpoint;
  onChanged: (forgotten: boolean) => void;
}): VNode {
  const [err, setErr] = useState<Error | undefined>();
  const [ask, setAsk] = useState(false);
  const full = `${cp.vm}@${cp.name}`;
  return html`<span class="row op-actions">
    <button
      class="protect"
      onClick=${async () => {
        setErr(undefined);
        try {
          await api.protect(cp.vm, cp.name, !cp.protected);
          onChanged(false);
        } catch (e) {
          setErr(e as Error);
        }
      }}
    >
      ${cp.protected ? 'Unprotect' : 'Protect'}
    </button>
    <button
      class="danger forget"
      disabled=${cp.protected}
      title=${cp.protected ? 'unprotect it first' : ''}
      onClick=${() => setAsk(true)}
    >
      Forget…
    </button>
    <${ConfirmDialog}
      open=${ask}
      title=${`Forget ${full}?`}
      body=${html`<p>The checkpoint is removed from the repository; data only it needs is freed by the next <code>bkfs gc</code>. This cannot be undone.</p>`}
      typed=${full}
      confirmLabel="Forget"
      danger=${true}
      onCancel=${() => setAsk(false)}
      onConfirm=${async () => {
        setAsk(false);
        try {
          await api.forget(cp.vm, cp.name);
          onChanged(true);
        } catch (e) {
          setErr(e as Error);
        }
      }}
    />
    <${ErrorBox} error=${err} />
  </span>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// One VM: timeline, chart, compare and find

export function VmPage({ vm, session }: { vm: string; session: Session }): VNode {
  const cps = useAsync(() => api.checkpoints(vm), [vm]);
  const list = cps.data ?? [];
  const [from, setFrom] = useState('');
  const [to, setTo] = useState('');
  const [pattern, setPattern] = useState('');
  useEffect(() => {
    if (list.length >= 2) {
      setFrom(list[list.length - 2]!.name);
      setTo(list[list.length - 1]!.name);
    } else if (list.length === 1) {
      setFrom(list[0]!.name);
      setTo(list[0]!.name);
    }
  }, [cps.data]);
  return html`<div>
    <nav class="crumbs" aria-label="Breadcrumbs">
      <a href="#/">VMs</a><span aria-hidden="true">›</span><span aria-current="page">${vm}</span>
    </nav>
    <h1>${vm}</h1>
    <${ErrorBox} error=${cps.error} />
    ${cps.loading && !cps.data ? html`<${Loading} what="checkpoints" />` : null}
    ${
      list.length > 0
        ? html`<h2>Logical vs stored bytes</h2>
            <${BytesChart} points=${chartPoints(list)} />
            <h2>Checkpoints</h2>
            <ol class="timeline" id="timeline" reversed>
              ${[...list].reverse().map(
                (c) =>
                  html`<li class=${`${c.level}${c.damaged ? ' damaged' : ''}`} data-cp=${c.name}>
                    <div class="row">
                      <a href=${href('vm', vm, 'cp', c.name)} class="cp-link"><strong>${c.name}</strong></a>
                      <span>${when(c.time)}</span>
                      <${Flags} level=${c.level} prot=${c.protected} damaged=${c.damaged} />
                      <span class="muted"
                        >${bytes(c.logicalBytes ?? c.bytesRead)} data · ${bytes(c.bytesNewStored)} new stored
                        · read ${bytes(c.bytesRead)} in ${(c.durationMs / 1000).toFixed(1)} s</span
                      >
                      ${isOperator(session) ? html`<${CheckpointActions} cp=${c} onChanged=${() => cps.reload()} />` : null}
                    </div>
                  </li>`,
              )}
            </ol>
            <h2>Compare two checkpoints</h2>
            <form
              class="row"
              id="compare-form"
              onSubmit=${(e: Event) => {
                e.preventDefault();
                navigate(href('vm', vm, 'compare', { from, to }));
              }}
            >
              <label
                >From
                <select
                  id="cmp-from"
                  value=${from}
                  onChange=${(e: Event) => setFrom((e.target as HTMLSelectElement).value)}
                >
                  ${list.map((c) => html`<option value=${c.name}>${c.name} (${when(c.time)})</option>`)}
                </select></label
              >
              <label
                >to
                <select
                  id="cmp-to"
                  value=${to}
                  onChange=${(e: Event) => setTo((e.target as HTMLSelectElement).value)}
                >
                  ${list.map((c) => html`<option value=${c.name}>${c.name} (${when(c.time)})</option>`)}
                </select></label
              >
              <button>Compare</button>
            </form>
            <h2>Find files</h2>
            <form
              class="row"
              role="search"
              onSubmit=${(e: Event) => {
                e.preventDefault();
                if (pattern.trim()) navigate(href('vm', vm, 'find', { pattern: pattern.trim() }));
              }}
            >
              <label
                >File name pattern (glob, in every checkpoint)
                <input
                  id="vm-find"
                  value=${pattern}
                  placeholder="*.conf"
                  onInput=${(e: Event) => setPattern((e.target as HTMLInputElement).value)}
              /></label>
              <button>Find</button>
            </form>`
        : null
    }
    ${cps.data && list.length === 0 ? html`<p>${vm} has no checkpoints.</p>` : null}
  </div>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// One checkpoint: disks, partitions, filesystems; restore

function volumeParam(v: {
  disk: string | null;
  partition: number | null;
  lv: string | null;
  id: string;
}): string {
  if (v.lv) return v.lv;
  if (v.disk !== null && v.partition !== null && v.partition > 0) return `${v.disk}:${v.partition}`;
  return v.disk ?? v.id;
}

function RestorePanel({ cp }: { cp: Checkpoint }): VNode {
  const [disk, setDisk] = useState(cp.disks[0]?.name ?? '');
  const [to, setTo] = useState(`${cp.vm}-${cp.name}-${cp.disks[0]?.name ?? 'disk'}.raw`);
  const [format, setFormat] = useState<'raw' | 'qcow2'>('raw');
  const [force, setForce] = useState(false);
  const [err, setErr] = useState<Error | undefined>();
  return html`<section class="panel" aria-labelledby="restore-h">
    <h2 id="restore-h">Restore a disk</h2>
    <form
      class="row"
      id="restore-form"
      onSubmit=${async (e: Event) => {
        e.preventDefault();
        setErr(undefined);
        try {
          const job = await api.restore({ vm: cp.vm, checkpoint: cp.name, disk, to, format, force });
          navigate(href('jobs', job.id));
        } catch (x) {
          setErr(x as Error);
        }
      }}
    >
      <label
        >Disk
        <select
          id="restore-disk"
          value=${disk}
          onChange=${(e: Event) => setDisk((e.target as HTMLSelectElement).value)}
        >
          ${cp.disks.map((d) => html`<option value=${d.name}>${d.name} (${bytes(d.virtualSize)})</option>`)}
        </select></label
      >
      <label
        >To (a file under the server's restore directory, or nbd://…)
        <input
          id="restore-to"
          size="40"
          value=${to}
          onInput=${(e: Event) => setTo((e.target as HTMLInputElement).value)}
      /></label>
      <label
        >Format
        <select
          id="restore-format"
          value=${format}
          onChange=${(e: Event) => setFormat((e.target as HTMLSelectElement).value as 'raw' | 'qcow2')}
        >
          <option value="raw">raw</option>
          <option value="qcow2">qcow2</option>
        </select></label
      >
      <label
        ><input
          type="checkbox"
          id="restore-force"
          checked=${force}
          onChange=${(e: Event) => setForce((e.target as HTMLInputElement).checked)}
        />
        replace an existing file</label
      >
      <button class="primary" id="restore-start">Start restore</button>
    </form>
    <${ErrorBox} error=${err} />
  </section>` as VNode;
}

export function CheckpointPage({ vm, cp, session }: { vm: string; cp: string; session: Session }): VNode {
  const info = useAsync(() => api.checkpoint(vm, cp), [vm, cp]);
  const ov = useAsync(() => api.overview(vm, cp), [vm, cp]);
  const c = info.data;
  const o = ov.data;
  return html`<div>
    <nav class="crumbs" aria-label="Breadcrumbs">
      <a href="#/">VMs</a><span aria-hidden="true">›</span><a href=${href('vm', vm)}>${vm}</a
      ><span aria-hidden="true">›</span><span aria-current="page">${cp}</span>
    </nav>
    <h1>
      ${vm}@${cp} ${c ? html`<${Flags} level=${c.level} prot=${c.protected} damaged=${c.damaged} />` : null}
    </h1>
    <${ErrorBox} error=${info.error} />
    ${
      c
        ? html`<p>
              ${`Taken ${when(c.time)} in ${(c.durationMs / 1000).toFixed(1)} s`}${c.parent ? ', parent ' : ''}${
                c.parent ? html`<a href=${href('vm', vm, 'cp', c.parent)}>${c.parent}</a>` : null
              }${`. ${bytes(c.bytesRead)} read; ${bytes(c.bytesNewRaw)} new data stored as ${bytes(c.bytesNewStored)}.`}
            </p>
            ${isOperator(session) ? html`<${CheckpointActions} cp=${c} onChanged=${(gone: boolean) => (gone ? navigate(href('vm', vm)) : info.reload())} />` : null}
            <h2>Disks</h2>
            <table class="grid" id="disks">
              <thead>
                <tr>
                  <th>Disk</th>
                  <th class="num">Size</th>
                  <th>Partition table</th>
                  <th class="num">Partitions</th>
                  <th>Source</th>
                  <th>Raw image</th>
                </tr>
              </thead>
              <tbody>
                ${c.disks.map((d) => {
                  const od = o?.disks.find((x) => x.name === d.name);
                  return html`<tr>
                    <td>${d.name}</td>
                    <td class="num">${bytes(d.virtualSize)}</td>
                    <td>
                      ${od?.table ?? (ov.loading ? '…' : '-')}${od && od.warnings.length ? html` <span class="flag damaged">${od.warnings.join('; ')}</span>` : null}
                    </td>
                    <td class="num">${od?.partitions ?? ''}</td>
                    <td class="muted">${d.source ?? '-'}${d.format ? ` (${d.format})` : ''}</td>
                    <td>
                      <a href=${urls.disk(vm, cp, d.name)} download=${`${vm}-${cp}-${d.name}.raw`}
                        >download</a
                      >
                    </td>
                  </tr>`;
                })}
              </tbody>
            </table>`
        : null
    }
    <h2>Partitions and filesystems</h2>
    ${ov.loading ? html`<${Loading} what="the partitions and filesystems (the first look at a checkpoint starts its file engine)" />` : null}
    <${ErrorBox} error=${ov.error} />
    ${
      o
        ? html`${
              o.fstabFrom || o.volumes.some((v) => v.mountpoint === '/')
                ? html`<p>
                    <a
                      class="button"
                      id="browse-layout"
                      href=${href('vm', vm, 'cp', cp, 'fs', LAYOUT, { path: '/' })}
                      >Browse the guest's files (/)</a
                    >
                    <span class="muted"
                      >${o.fstabFrom ? ` mount points from /etc/fstab on ${o.fstabFrom}` : ''}</span
                    >
                  </p>`
                : null
            }
            <table class="grid" id="volumes">
              <thead>
                <tr>
                  <th>Volume</th>
                  <th>Disk</th>
                  <th class="num">Partition</th>
                  <th class="num">Offset</th>
                  <th class="num">Size</th>
                  <th>Filesystem</th>
                  <th>Label</th>
                  <th>Mounted at</th>
                  <th></th>
                </tr>
              </thead>
              <tbody>
                ${o.volumes.map(
                  (v) =>
                    html`<tr>
                      <td>${v.id}</td>
                      <td>${v.disk ?? v.lv ?? '-'}</td>
                      <td class="num">${v.partition ?? '-'}</td>
                      <td class="num">${v.offset}</td>
                      <td class="num">${bytes(v.size)}</td>
                      <td>
                        ${v.type ?? '-'}${v.note ? html` <span class="muted">(${v.note})</span>` : null}
                      </td>
                      <td>${v.label ?? ''}</td>
                      <td>${v.mountpoint ?? ''}</td>
                      <td>
                        ${
                          v.type && !v.note
                            ? html`<a
                                class="browse-volume"
                                data-volume=${volumeParam(v)}
                                href=${href('vm', vm, 'cp', cp, 'fs', volumeParam(v), { path: '/' })}
                                >Browse</a
                              >`
                            : null
                        }
                      </td>
                    </tr>`,
                )}
              </tbody>
            </table>
            ${o.skipped.map((s) => html`<p class="muted">fstab ${s.mountpoint} (${s.spec}) not shown: ${s.reason}</p>`)}`
        : null
    }
    ${c && isOperator(session) ? html`<${RestorePanel} cp=${c} />` : null}
  </div>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// Find across checkpoints

export function FindPage({
  vm,
  pattern,
  volume,
}: {
  vm: string;
  pattern: string;
  volume: string | null;
}): VNode {
  const r = useAsync(() => api.find(vm, { pattern, volume }), [vm, pattern, volume]);
  return html`<div>
    <nav class="crumbs" aria-label="Breadcrumbs">
      <a href="#/">VMs</a><span aria-hidden="true">›</span><a href=${href('vm', vm)}>${vm}</a
      ><span aria-hidden="true">›</span><span aria-current="page">find</span>
    </nav>
    <h1>Files named <code>${pattern}</code> in ${vm}</h1>
    ${r.loading ? html`<${Loading} what="every checkpoint (this walks each filesystem)" />` : null}
    <${ErrorBox} error=${r.error} />
    ${
      r.data
        ? html`<p class="muted">
              ${r.data.matches.length} paths in ${r.data.checkpoints.length} checkpoints.
            </p>
            <table class="grid" id="find-results">
              <thead>
                <tr>
                  <th>Path</th>
                  <th>Checkpoint</th>
                  <th>State</th>
                  <th class="num">Size</th>
                  <th>Modified</th>
                  <th>Mode</th>
                  <th></th>
                </tr>
              </thead>
              <tbody>
                ${r.data.matches.flatMap((m) =>
                  m.history.map(
                    (h, i) =>
                      html`<tr>
                        <td>${i === 0 ? m.path : ''}</td>
                        <td>
                          <a
                            href=${href('vm', vm, 'cp', h.checkpoint, 'fs', volume ?? LAYOUT, { path: parentPath(m.path) })}
                            >${h.checkpoint}</a
                          >
                        </td>
                        <td>${h.state}</td>
                        <td class="num">${h.entry ? bytes(h.entry.size) : ''}</td>
                        <td>${h.entry ? when(h.entry.mtime) : ''}</td>
                        <td>
                          ${h.entry ? html`<code>${modeString(h.entry.kind, h.entry.mode)}</code>` : ''}
                        </td>
                        <td>
                          ${h.entry && h.entry.kind === 'file' ? html`<a href=${urls.download(vm, h.checkpoint, m.path, volume)} download>download</a>` : null}
                        </td>
                      </tr>`,
                  ),
                )}
              </tbody>
            </table>`
        : null
    }
  </div>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// Compare two checkpoints

export function ComparePage({
  vm,
  from,
  to,
  path,
  volume,
}: {
  vm: string;
  from: string;
  to: string;
  path: string;
  volume: string | null;
}): VNode {
  const r = useAsync(() => api.diff(vm, { from, to, path, volume }), [vm, from, to, path, volume]);
  const dl = (cp: string, p: string, label: string): VNode =>
    html`<a href=${urls.download(vm, cp, p, volume)} download class=${`dl-${label}`}
      >${label === 'from' ? from : to}</a
    >` as VNode;
  return html`<div>
    <nav class="crumbs" aria-label="Breadcrumbs">
      <a href="#/">VMs</a><span aria-hidden="true">›</span><a href=${href('vm', vm)}>${vm}</a
      ><span aria-hidden="true">›</span><span aria-current="page">compare</span>
    </nav>
    <h1>${vm}: ${from} → ${to} <span class="muted">${path}</span></h1>
    ${r.loading ? html`<${Loading} what="both checkpoints' files" />` : null}
    <${ErrorBox} error=${r.error} />
    ${
      r.data
        ? html`<p id="diff-summary">
              ${(['added', 'removed', 'changed'] as const).map(
                (k, i) =>
                  html`${i > 0 ? ', ' : ''}<span class=${`diff-${k}`}
                      >${`${r.data!.items.filter((x) => x.change === k).length} ${k}`}</span
                    >`,
              )}
            </p>
            <table class="grid" id="diff">
              <thead>
                <tr>
                  <th>Change</th>
                  <th>Path</th>
                  <th>What</th>
                  <th class="num">Size before</th>
                  <th class="num">Size after</th>
                  <th>Download from</th>
                </tr>
              </thead>
              <tbody>
                ${r.data.items.map(
                  (d) =>
                    html`<tr data-path=${d.path} data-change=${d.change}>
                      <td class=${`diff-${d.change}`}>${d.change}</td>
                      <td>${d.path}</td>
                      <td>${d.what.join(', ')}</td>
                      <td class="num">${d.before && d.before.kind !== 'dir' ? bytes(d.before.size) : ''}</td>
                      <td class="num">${d.after && d.after.kind !== 'dir' ? bytes(d.after.size) : ''}</td>
                      <td>
                        ${d.before?.kind === 'file' ? dl(from, d.path, 'from') : null}
                        ${d.after?.kind === 'file' ? dl(to, d.path, 'to') : null}
                      </td>
                    </tr>`,
                )}
              </tbody>
            </table>`
        : null
    }
  </div>` as VNode;
}

// ---------------------------------------------------------------------------------------------
// Restore jobs

function JobProgress({ job }: { job: Job }): VNode {
  const pct = job.total > 0 ? Math.min(100, (job.done / job.total) * 100) : job.state === 'done' ? 100 : 0;
  return html`<div class="progress" role="status" aria-live="polite">
    <progress max="100" value=${pct} aria-label="Restore progress"></progress>
    <span>${pct.toFixed(0)} % · ${bytes(job.done)} of ${bytes(job.total)}</span>
    <strong class=${`job-state ${job.state}`} id="job-state">${job.state}</strong>
  </div>` as VNode;
}

export function JobPage({ id }: { id: string }): VNode {
  const [job, setJob] = useState<Job | null>(null);
  const [err, setErr] = useState<Error | undefined>();
  useEffect(() => {
    let es: EventSource | null = null;
    api.job(id).then(
      (j) => {
        setJob(j);
        es = new EventSource(urls.jobEvents(id));
        const on = (ev: MessageEvent): void => setJob(JSON.parse(ev.data as string) as Job);
        es.addEventListener('progress', on as EventListener);
        es.addEventListener('end', ((ev: MessageEvent) => {
          on(ev);
          es?.close();
        }) as EventListener);
      },
      (e: Error) => setErr(e),
    );
    return () => es?.close();
  }, [id]);
  return html`<div>
    <nav class="crumbs" aria-label="Breadcrumbs">
      <a href="#/">VMs</a><span aria-hidden="true">›</span><a href="#/jobs">restores</a
      ><span aria-hidden="true">›</span><span aria-current="page">${id}</span>
    </nav>
    <${ErrorBox} error=${err} />
    ${
      job
        ? html`<h1>Restore of ${job.vm}@${job.checkpoint}${job.disk ? ` disk ${job.disk}` : ''}</h1>
            <p>
              ${'To '}<code>${job.to}</code>${`, started ${when(job.started)} by ${job.user}${job.finished ? `, ended ${when(job.finished)}` : ''}.`}
            </p>
            <${JobProgress} job=${job} />
            ${
              job.state === 'running'
                ? html`<p>
                    <button
                      class="danger"
                      id="job-cancel"
                      onClick=${async () => {
                        try {
                          setJob(await api.cancelJob(id));
                        } catch (e) {
                          setErr(e as Error);
                        }
                      }}
                    >
                      Cancel the restore
                    </button>
                  </p>`
                : null
            }
            ${job.error ? html`<p class="error" role="alert">${job.error.code}: ${job.error.message}</p>` : null}`
        : !err
          ? html`<${Loading} what="the restore" />`
          : null
    }
  </div>` as VNode;
}

export function JobsPage(): VNode {
  const jobs = useAsync(() => api.jobs(), []);
  return html`<div>
    <h1>Restores</h1>
    <${ErrorBox} error=${jobs.error} />
    ${jobs.data && jobs.data.length === 0 ? html`<p>No restore has been started on this server.</p>` : null}
    ${
      jobs.data && jobs.data.length > 0
        ? html`<table class="grid">
            <thead>
              <tr>
                <th>Started</th>
                <th>What</th>
                <th>To</th>
                <th>By</th>
                <th>State</th>
                <th class="num">Progress</th>
              </tr>
            </thead>
            <tbody>
              ${jobs.data.map(
                (j) =>
                  html`<tr>
                    <td><a href=${href('jobs', j.id)}>${when(j.started)}</a></td>
                    <td>${j.vm}@${j.checkpoint}${j.disk ? ` ${j.disk}` : ''}</td>
                    <td><code>${j.to}</code></td>
                    <td>${j.user}</td>
                    <td>${j.state}</td>
                    <td class="num">${bytes(j.done)} / ${bytes(j.total)}</td>
                  </tr>`,
              )}
            </tbody>
          </table>`
        : null
    }
  </div>` as VNode;
}
