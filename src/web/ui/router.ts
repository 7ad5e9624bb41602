/**
 * Hash routes (`#/vm/web/cp/check2/fs/vda:1?path=/etc`): the server serves one page, reloads and
 * shared links keep their place, and the back button walks the console's history.
 */
import { useEffect, useState } from 'preact/hooks';

export interface Route {
  /** Path segments after '#/', decoded. */
  parts: string[];
  query: URLSearchParams;
}

export function currentRoute(): Route {
  const raw = location.hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const pathPart = q < 0 ? raw : raw.slice(0, q);
  return {
    parts: pathPart.split('/').filter(Boolean).map(decodeURIComponent),
    query: new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)),
  };
}

/** `href('vm', 'web', 'cp', 'check2')` -> `#/vm/web/cp/check2`, query values encoded. */
export function href(...segs: (string | Record<string, string | undefined | null>)[]): string {
  const parts: string[] = [];
  let query = '';
  for (const s of segs) {
    if (typeof s === 'string') parts.push(encodeURIComponent(s));
    else {
      const p = new URLSearchParams();
      for (const [k, v] of Object.entries(s)) if (v !== undefined && v !== null && v !== '') p.set(k, v);
      const t = p.toString();
      if (t) query = `?${t}`;
    }
  }
  return `#/${parts.join('/')}${query}`;
}

export function navigate(to: string): void {
  location.hash = to.replace(/^#/, '');
}

export function useRoute(): Route {
  const [r, setR] = useState(currentRoute());
  useEffect(() => {
    const f = (): void => setR(currentRoute());
    addEventListener('hashchange', f);
    return () => removeEventListener('hashchange', f);
  }, []);
  return r;
}
