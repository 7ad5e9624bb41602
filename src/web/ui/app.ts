/** The bkfs web console: session handling, header and the page for the current route. */
import { render, type VNode } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { api, setCsrf, setUnauthorizedHandler, type Session } from './api.js';
import { BrowserPage } from './browser.js';
import { Loading } from './components.js';
import { html } from './html.js';
import { forgetListings } from './listing-cache.js';
import {
  CheckpointPage,
  ComparePage,
  FindPage,
  JobPage,
  JobsPage,
  LoginPage,
  VmPage,
  VmsPage,
} from './pages.js';
import { useRoute } from './router.js';

function Page({ session }: { session: Session }): VNode {
  const { parts, query } = useRoute();
  const [a, b, c, d, e, f] = parts;
  if (a === 'vm' && b) {
    if (c === 'cp' && d && e === 'fs' && f)
      return html`<${BrowserPage}
        vm=${b}
        cp=${d}
        volumeToken=${f}
        path=${query.get('path') || '/'}
        file=${query.get('file')}
      />` as VNode;
    if (c === 'cp' && d)
      return html`<${CheckpointPage} key=${`${b}@${d}`} vm=${b} cp=${d} session=${session} />` as VNode;
    if (c === 'find')
      return html`<${FindPage}
        vm=${b}
        pattern=${query.get('pattern') ?? '*'}
        volume=${query.get('volume')}
      />` as VNode;
    if (c === 'compare')
      return html`<${ComparePage}
        vm=${b}
        from=${query.get('from') ?? ''}
        to=${query.get('to') ?? ''}
        path=${query.get('path') || '/'}
        volume=${query.get('volume')}
      />` as VNode;
    return html`<${VmPage} vm=${b} session=${session} />` as VNode;
  }
  if (a === 'jobs' && session.role === 'operator')
    return b ? (html`<${JobPage} key=${b} id=${b} />` as VNode) : (html`<${JobsPage} />` as VNode);
  return html`<${VmsPage} />` as VNode;
}

function App(): VNode {
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const login = (s: Session | null): void => {
    setCsrf(s?.csrfToken ?? null);
    forgetListings();
    setSession(s);
  };
  useEffect(() => {
    setUnauthorizedHandler(() => login(null));
    api.session().then(login, () => login(null));
  }, []);
  if (session === undefined) return html`<${Loading} what="the console" />` as VNode;
  if (session === null) return html`<${LoginPage} onLogin=${login} />` as VNode;
  return html`<div>
    <header class="top">
      <a class="brand" href="#/">bkfs</a>
      <nav class="row" aria-label="Main">
        <a href="#/">VMs</a>${session.role === 'operator' ? html`<a href="#/jobs">Restores</a>` : null}
      </nav>
      <span class="who" id="who">${session.name} (${session.role})</span>
      <button
        id="logout"
        onClick=${async () => {
          await api.logout().catch(() => undefined);
          login(null);
        }}
      >
        Log out
      </button>
    </header>
    <main><${Page} session=${session} /></main>
  </div>` as VNode;
}

const root = document.getElementById('app');
if (root) {
  root.textContent = '';
  render(html`<${App} />` as VNode, root);
}
