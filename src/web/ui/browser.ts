/**
 * The file browser of one filesystem (or of the guest's /etc/fstab layout) of a checkpoint:
 * breadcrumbs, a lazily loaded directory tree, a sortable virtualized listing, a text preview of
 * small files, file downloads and folder downloads (zip or tar.gz) with a progress indicator.
 */
import type { VNode } from 'preact';
import { useEffect, useMemo, useState } from 'preact/hooks';
import { api, urls, type Entry, type Listing, type Preview } from './api.js';
import { ErrorBox, Loading, VirtualList, useAsync } from './components.js';
import { baseName, bytes, joinPath, modeString, parentPath, when } from './format.js';
import { html } from './html.js';
import { listDir } from './listing-cache.js';
import { href } from './router.js';

/** The route token for "the guest's own layout" (no volume chosen). */
export const LAYOUT = '-';

type SortKey = 'name' | 'size' | 'mtime' | 'mode';

interface Where {
  vm: string;
  cp: string;
  /** null: the guest's layout. */
  volume: string | null;
}

function browseHref(w: Where, path: string, extra: Record<string, string> = {}): string {
  return href('vm', w.vm, 'cp', w.cp, 'fs', w.volume ?? LAYOUT, { path, ...extra });
}

function Crumbs({ w, path }: { w: Where; path: string }): VNode {
  const parts = path.split('/').filter(Boolean);
  return html`<nav class="crumbs" aria-label="Breadcrumbs">
    <a href=${href('vm', w.vm)}>${w.vm}</a><span aria-hidden="true">›</span>
    <a href=${href('vm', w.vm, 'cp', w.cp)}>${w.cp}</a><span aria-hidden="true">›</span>
    <a href=${browseHref(w, '/')}>${w.volume ?? 'guest /'}</a>
    ${parts.map((p, i) => {
      const to = `/${parts.slice(0, i + 1).join('/')}`;
      return html`<span aria-hidden="true">/</span>${
          i === parts.length - 1
            ? html`<span aria-current="page">${p}</span>`
            : html`<a href=${browseHref(w, to)}>${p}</a>`
        }`;
    })}
  </nav>` as VNode;
}

function TreeNode({
  w,
  path,
  current,
  depth,
}: {
  w: Where;
  path: string;
  current: string;
  depth: number;
}): VNode {
  const onPath = current === path || current.startsWith(path === '/' ? '/' : `${path}/`);
  const [open, setOpen] = useState(onPath);
  useEffect(() => {
    if (onPath) setOpen(true);
  }, [onPath]);
  const [kids, setKids] = useState<Entry[] | null>(null);
  const [err, setErr] = useState<Error | undefined>();
  useEffect(() => {
    if (!open || kids) return;
    listDir(w.vm, w.cp, w.volume, path).then(
      (l) => setKids(l.entries.filter((e) => e.kind === 'dir').sort((a, b) => (a.name < b.name ? -1 : 1))),
      (e: Error) => setErr(e),
    );
  }, [open, w.vm, w.cp, w.volume, path]);
  const name = path === '/' ? (w.volume ?? '/') : baseName(path);
  return html`<li role="treeitem" aria-expanded=${open} aria-level=${depth + 1}>
    <button
      class="twisty"
      aria-label=${`${open ? 'Collapse' : 'Expand'} ${name}`}
      onClick=${() => setOpen(!open)}
    >
      ${open ? '▾' : '▸'}
    </button>
    <a href=${browseHref(w, path)} class=${current === path ? 'current' : ''}>${name}</a>
    ${err ? html`<span class="error">${err.message}</span>` : null}
    ${
      open && kids
        ? html`<ul role="group">
            ${kids.map((k) => html`<${TreeNode} key=${k.path} w=${w} path=${k.path} current=${current} depth=${depth + 1} />`)}
          </ul>`
        : null
    }
  </li>` as VNode;
}

function compare(key: SortKey): (a: Entry, b: Entry) => number {
  switch (key) {
    case 'size':
      return (a, b) => a.size - b.size;
    case 'mtime':
      return (a, b) => (a.mtime < b.mtime ? -1 : a.mtime > b.mtime ? 1 : 0);
    case 'mode':
      return (a, b) =>
        modeString(a.kind, a.mode) < modeString(b.kind, b.mode)
          ? -1
          : modeString(a.kind, a.mode) > modeString(b.kind, b.mode)
            ? 1
            : 0;
    default:
      return (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  }
}

function kindIcon(e: Entry): string {
  // Glyphs every system font has (emoji fonts are often missing on servers and in CI).
  return e.kind === 'dir' ? '▪' : e.kind === 'symlink' ? '↪' : e.kind === 'file' ? '·' : '◦';
}

const ROW = 28;
/** Text previews of files up to this size. */
const PREVIEW_MAX = 256 * 1024;

function Listing({
  w,
  listing,
  selected,
  onSelect,
}: {
  w: Where;
  listing: Listing;
  selected: string | null;
  onSelect: (e: Entry) => void;
}): VNode {
  const [sort, setSort] = useState<{ key: SortKey; desc: boolean }>({ key: 'name', desc: false });
  const rows = useMemo(() => {
    const c = compare(sort.key);
    const dirsFirst = (a: Entry, b: Entry): number => (a.kind === 'dir' ? 0 : 1) - (b.kind === 'dir' ? 0 : 1);
    const list = [...listing.entries].sort((a, b) => dirsFirst(a, b) || (sort.desc ? -c(a, b) : c(a, b)));
    return list;
  }, [listing, sort]);
  const head = (key: SortKey, label: string, cls = ''): VNode =>
    html`<span
      class=${cls}
      role="columnheader"
      aria-sort=${sort.key === key ? (sort.desc ? 'descending' : 'ascending') : 'none'}
    >
      <button
        id=${`sort-${key}`}
        onClick=${() => setSort({ key, desc: sort.key === key ? !sort.desc : false })}
      >
        ${label}${sort.key === key ? (sort.desc ? ' ▼' : ' ▲') : ''}
      </button>
    </span>` as VNode;
  return html`<div
    class="listing"
    role="table"
    aria-label=${`Contents of ${listing.path}`}
    aria-rowcount=${rows.length}
  >
    <div class="head" role="row">
      <span></span
      >${head('name', 'Name')}${head('size', 'Size', 'num')}${head('mtime', 'Modified')}${head('mode', 'Mode')}<span
        >Actions</span
      >
    </div>
    ${rows.length === 0 ? html`<p class="muted" style="padding:0.5rem">This folder is empty.</p>` : null}
    <${VirtualList}
      count=${rows.length}
      rowHeight=${ROW}
      height=${Math.max(200, Math.min(560, window.innerHeight - 320))}
      label="Directory entries"
      row=${(i: number) => {
        const e = rows[i]!;
        return html`<div
          class=${`item${selected === e.path ? ' selected' : ''}`}
          role="row"
          key=${e.path}
          data-name=${e.name}
        >
          <span aria-hidden="true">${kindIcon(e)}</span>
          <span role="cell" title=${e.target ? `${e.name} -> ${e.target}` : e.name}>
            ${
              e.kind === 'dir'
                ? html`<a href=${browseHref(w, e.path)} class="entry-link">${e.name}</a>`
                : html`<a
                      href=${browseHref(w, listing.path, { file: e.name })}
                      class="entry-link"
                      onClick=${(ev: Event) => {
                        ev.preventDefault();
                        onSelect(e);
                      }}
                      >${e.name}</a
                    >${e.target ? html`<span class="muted"> → ${e.target}</span>` : null}`
            }
          </span>
          <span role="cell" class="num">${e.kind === 'dir' ? '' : bytes(e.size)}</span>
          <span role="cell">${when(e.mtime)}</span>
          <span role="cell"><code>${modeString(e.kind, e.mode)}</code></span>
          <span role="cell">
            ${
              e.kind === 'file'
                ? html`<a
                    href=${urls.download(w.vm, w.cp, e.path, w.volume)}
                    download=${e.name}
                    class="dl"
                    aria-label=${`Download ${e.name}`}
                    >download</a
                  >`
                : null
            }
          </span>
        </div>`;
      }}
    />
  </div>` as VNode;
}

function PreviewPane({ w, entry, onClose }: { w: Where; entry: Entry; onClose: () => void }): VNode {
  const small = entry.size <= PREVIEW_MAX;
  const pv = useAsync<Preview | null>(
    () =>
      small
        ? api.preview(w.vm, w.cp, { path: entry.path, volume: w.volume, maxBytes: PREVIEW_MAX })
        : Promise.resolve(null),
    [w.vm, w.cp, w.volume, entry.path],
  );
  return html`<section class="preview" aria-label=${`Preview of ${entry.name}`}>
    <header>
      <strong>${entry.path}</strong>
      <span class="muted"
        >${bytes(entry.size)} · ${when(entry.mtime)} · ${modeString(entry.kind, entry.mode)}</span
      >
      <a
        class="button"
        id="download-file"
        href=${urls.download(w.vm, w.cp, entry.path, w.volume)}
        download=${entry.name}
        >Download</a
      >
      <button onClick=${onClose}>Close</button>
    </header>
    ${pv.loading ? html`<${Loading} what="the preview" />` : null}
    <${ErrorBox} error=${pv.error} />
    ${
      !small || pv.data?.tooLarge
        ? html`<p class="muted" style="padding:0.5rem">
            Larger than ${bytes(PREVIEW_MAX)}: no preview; download it instead.
          </p>`
        : null
    }
    ${pv.data && pv.data.binary ? html`<p class="muted" style="padding:0.5rem">Binary file: no text preview.</p>` : null}
    ${pv.data && pv.data.text !== null ? html`<pre id="preview-text">${pv.data.text}</pre>` : null}
  </section>` as VNode;
}

/** The file name of a Content-Disposition header (RFC 6266: filename* first). */
function dispositionName(h: string | null): string | null {
  if (!h) return null;
  const star = /filename\*=UTF-8''([^;]+)/i.exec(h);
  if (star) {
    try {
      return decodeURIComponent(star[1]!);
    } catch {
      /* fall through */
    }
  }
  const plain = /filename="([^"]*)"/i.exec(h);
  return plain ? plain[1]! : null;
}

/** Downloads a folder archive with a live byte count; the browser saves it when complete. */
function FolderDownload({ w, path }: { w: Where; path: string }): VNode {
  const [state, setState] = useState<{
    format: string;
    received: number;
    started: number;
    abort: AbortController;
  } | null>(null);
  const [msg, setMsg] = useState<string | null>(null);
  const [err, setErr] = useState<Error | undefined>();
  const name = path === '/' ? (w.volume ?? w.cp).replace(/[/:]/g, '_') : baseName(path);
  const start = async (format: 'zip' | 'tar.gz'): Promise<void> => {
    const abort = new AbortController();
    const started = Date.now();
    setErr(undefined);
    setMsg(null);
    setState({ format, received: 0, started, abort });
    try {
      const res = await fetch(urls.archive(w.vm, w.cp, path, format, w.volume), {
        credentials: 'same-origin',
        signal: abort.signal,
      });
      if (!res.ok || !res.body) {
        const body = (await res.json().catch(() => null)) as {
          error?: { code: string; message: string };
        } | null;
        throw new Error(
          body?.error ? `${body.error.code}: ${body.error.message}` : `${res.status} ${res.statusText}`,
        );
      }
      const fileName = dispositionName(res.headers.get('content-disposition')) ?? `${name}.${format}`;
      const reader = res.body.getReader();
      const parts: Uint8Array[] = [];
      let received = 0;
      let last = 0;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parts.push(value);
        received += value.length;
        if (Date.now() - last > 100) {
          last = Date.now();
          setState({ format, received, started, abort });
        }
      }
      const blob = new Blob(parts as BlobPart[], {
        type: format === 'zip' ? 'application/zip' : 'application/gzip',
      });
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = fileName;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
      setMsg(`${fileName}: ${bytes(received)} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    } catch (e) {
      if (!abort.signal.aborted) setErr(e as Error);
      else setMsg('Download cancelled.');
    } finally {
      setState(null);
    }
  };
  return html`<div class="row" aria-live="polite">
    <span>Download this folder:</span>
    <button id="dl-zip" disabled=${state !== null} onClick=${() => void start('zip')}>.zip</button>
    <button id="dl-targz" disabled=${state !== null} onClick=${() => void start('tar.gz')}>.tar.gz</button>
    ${
      state
        ? html`<span class="progress" id="archive-progress">
            <progress aria-label="Folder download progress"></progress>
            <span>${name}.${state.format}: ${bytes(state.received)} received</span>
            <button onClick=${() => state.abort.abort()}>Cancel</button>
          </span>`
        : null
    }
    ${msg ? html`<span class="muted" id="archive-done">${msg}</span>` : null}
    <${ErrorBox} error=${err} />
  </div>` as VNode;
}

function entryCount(total: number, loaded: number | null): string {
  return `${total} ${total === 1 ? 'entry' : 'entries'}${loaded !== null ? ` (loading ${loaded}…)` : ''}`;
}

export function BrowserPage({
  vm,
  cp,
  volumeToken,
  path,
  file,
}: {
  vm: string;
  cp: string;
  volumeToken: string;
  path: string;
  file: string | null;
}): VNode {
  const w: Where = { vm, cp, volume: volumeToken === LAYOUT ? null : volumeToken };
  const [first, setFirst] = useState<Listing | null>(null);
  const listing = useAsync(() => {
    setFirst(null);
    return listDir(vm, cp, w.volume, path, (l) => setFirst(l));
  }, [vm, cp, volumeToken, path]);
  const [selected, setSelected] = useState<Entry | null>(null);
  useEffect(() => setSelected(null), [vm, cp, volumeToken, path]);
  const shown = listing.data ?? first;
  useEffect(() => {
    if (file && shown) setSelected(shown.entries.find((e) => e.name === file) ?? null);
  }, [file, shown]);
  const [q, setQ] = useState('');
  return html`<div>
    <h1>Files of ${vm}@${cp}${w.volume ? html` <span class="muted">(${w.volume})</span>` : null}</h1>
    <${Crumbs} w=${w} path=${path} />
    <div class="row">
      <form
        class="row"
        role="search"
        onSubmit=${(e: Event) => {
          e.preventDefault();
          if (q.trim())
            location.hash = href('vm', vm, 'find', {
              pattern: q.trim(),
              volume: w.volume ?? undefined,
            }).slice(1);
        }}
      >
        <label
          >Find file names in every checkpoint of ${vm}:
          <input
            id="find-input"
            value=${q}
            placeholder="*.conf"
            onInput=${(e: Event) => setQ((e.target as HTMLInputElement).value)}
        /></label>
        <button>Find</button>
      </form>
    </div>
    <div class="browser">
      <nav class="tree" aria-label="Directory tree">
        <ul role="tree">
          <${TreeNode} key=${`${vm}/${cp}/${volumeToken}`} w=${w} path="/" current=${path} depth=${0} />
        </ul>
      </nav>
      <div>
        ${shown && shown.dir ? html`<${FolderDownload} w=${w} path=${path} />` : null}
        <${ErrorBox} error=${listing.error} />
        ${!shown && listing.loading ? html`<${Loading} what=${path} />` : null}
        ${
          shown
            ? html`<p class="muted" id="entry-count">
                  ${entryCount(shown.total, listing.loading ? shown.entries.length : null)}
                </p>
                <${Listing}
                  w=${w}
                  listing=${shown}
                  selected=${selected?.path ?? null}
                  onSelect=${(e: Entry) => setSelected(e)}
                />`
            : null
        }
        ${selected ? html`<${PreviewPane} key=${selected.path} w=${w} entry=${selected} onClose=${() => setSelected(null)} />` : null}
      </div>
    </div>
  </div>` as VNode;
}

export { browseHref, parentPath, joinPath };
