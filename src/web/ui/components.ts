/** Small shared pieces: async loading, errors, flags, a virtualized list and a confirm dialog. */
import type { ComponentChildren, VNode } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { ApiError } from './api.js';
import { html } from './html.js';

export interface Async<T> {
  data: T | undefined;
  error: Error | undefined;
  loading: boolean;
  reload: () => void;
}

/** Runs `fn` when `deps` change; a stale answer (deps changed meanwhile) is dropped. */
export function useAsync<T>(fn: () => Promise<T>, deps: unknown[]): Async<T> {
  const [state, setState] = useState<{ data?: T; error?: Error; loading: boolean }>({ loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true, error: undefined }));
    fn().then(
      (data) => live && setState({ data, loading: false }),
      (error: Error) => live && setState({ error, loading: false }),
    );
    return () => {
      live = false;
    };
  }, [...deps, tick]);
  return {
    data: state.data,
    error: state.error,
    loading: state.loading,
    reload: () => setTick((t) => t + 1),
  };
}

export function ErrorBox({ error }: { error: Error | undefined }): VNode | null {
  if (!error) return null;
  const code = error instanceof ApiError ? `${error.code}: ` : '';
  return html`<p class="error" role="alert">${code}${error.message}</p>` as VNode;
}

export function Loading({ what }: { what: string }): VNode {
  return html`<p class="muted" role="status" aria-live="polite">Loading ${what}…</p>` as VNode;
}

export function Flags({
  prot,
  damaged,
  level,
}: {
  prot?: boolean | number;
  damaged?: boolean | number;
  level?: string;
}): VNode {
  return html`<span class="flags">
    ${level ? html`<span class="flag level">${level}</span>` : null}
    ${prot ? html`<span class="flag protected" title="protected from forget and retention">protected${typeof prot === 'number' && prot > 0 ? ` ×${prot}` : ''}</span>` : null}
    ${damaged ? html`<span class="flag damaged" title="verify found damaged data">DAMAGED${typeof damaged === 'number' && damaged > 0 ? ` ×${damaged}` : ''}</span>` : null}
  </span>` as VNode;
}

/**
 * A list of `count` fixed-height rows of which only the visible ones (plus a margin) are in the
 * DOM, so a 10 000-entry directory scrolls as smoothly as a 10-entry one.
 */
export function VirtualList(props: {
  count: number;
  rowHeight: number;
  height: number;
  row: (i: number) => ComponentChildren;
  label: string;
}): VNode {
  const { count, rowHeight, height, row } = props;
  const ref = useRef<HTMLDivElement>(null);
  const [top, setTop] = useState(0);
  useEffect(() => {
    if (ref.current && ref.current.scrollTop > count * rowHeight) ref.current.scrollTop = 0;
  }, [count, rowHeight]);
  const viewH = Math.min(height, Math.max(count * rowHeight, rowHeight));
  const first = Math.max(0, Math.floor(top / rowHeight) - 10);
  const last = Math.min(count, Math.ceil((top + viewH) / rowHeight) + 10);
  const rows: ComponentChildren[] = [];
  for (let i = first; i < last; i++) rows.push(row(i));
  return html`<div
    class="vlist"
    ref=${ref}
    role="rowgroup"
    aria-label=${props.label}
    aria-rowcount=${count}
    style=${`height:${viewH}px`}
    onScroll=${(e: Event) => setTop((e.currentTarget as HTMLDivElement).scrollTop)}
  >
    <div style=${`height:${count * rowHeight}px;position:relative`}>
      <div style=${`position:absolute;top:${first * rowHeight}px;left:0;right:0`}>${rows}</div>
    </div>
  </div>` as VNode;
}

/** A modal confirmation; `typed` makes the person type that text before confirming. */
export function ConfirmDialog(props: {
  open: boolean;
  title: string;
  body: ComponentChildren;
  typed?: string;
  confirmLabel: string;
  danger?: boolean;
  onConfirm: () => void;
  onCancel: () => void;
}): VNode {
  const ref = useRef<HTMLDialogElement>(null);
  const [text, setText] = useState('');
  useEffect(() => {
    const d = ref.current;
    if (!d) return;
    if (props.open && !d.open) {
      setText('');
      d.showModal();
    } else if (!props.open && d.open) d.close();
  }, [props.open]);
  const ok = props.typed === undefined || text === props.typed;
  return html`<dialog
    ref=${ref}
    aria-labelledby="dlg-title"
    onCancel=${props.onCancel}
    onClose=${props.onCancel}
  >
    <h2 id="dlg-title">${props.title}</h2>
    <div>${props.body}</div>
    ${
      props.typed !== undefined
        ? html`<p>
            <label
              >Type <code>${props.typed}</code> to confirm:
              <input
                id="confirm-text"
                value=${text}
                onInput=${(e: Event) => setText((e.target as HTMLInputElement).value)}
              />
            </label>
          </p>`
        : null
    }
    <div class="row">
      <button
        class=${props.danger ? 'danger' : 'primary'}
        id="confirm-ok"
        disabled=${!ok}
        onClick=${() => ok && props.onConfirm()}
      >
        ${props.confirmLabel}
      </button>
      <button onClick=${props.onCancel}>Cancel</button>
    </div>
  </dialog>` as VNode;
}
