/**
 * Whole-directory listings for the file browser and its tree, fetched in pages of up to 10 000
 * entries (the API's maximum) and kept per checkpoint/volume/path while the page is open, so the
 * tree and the listing share one request and going back is instant.
 */
import { api, type Entry, type Listing } from './api.js';

const PAGE = 10000;
const cache = new Map<string, Promise<Listing>>();

export function volumeKey(volume: string | null | undefined): string {
  return volume ?? '';
}

/**
 * All entries of a directory. `onFirstPage` sees the first page as soon as it arrives (a large
 * directory shows at once while the rest loads).
 */
export function listDir(
  vm: string,
  cp: string,
  volume: string | null,
  path: string,
  onFirstPage?: (l: Listing) => void,
): Promise<Listing> {
  const key = `${vm}\u0000${cp}\u0000${volumeKey(volume)}\u0000${path}`;
  const hit = cache.get(key);
  if (hit) return hit;
  const p = (async (): Promise<Listing> => {
    const first = await api.files(vm, cp, { path, volume, offset: 0, limit: PAGE });
    onFirstPage?.(first);
    const entries: Entry[] = [...first.entries];
    while (entries.length < first.total) {
      const next = await api.files(vm, cp, { path, volume, offset: entries.length, limit: PAGE });
      if (next.entries.length === 0) break;
      entries.push(...next.entries);
    }
    return { ...first, offset: 0, limit: entries.length, entries };
  })();
  cache.set(key, p);
  p.catch(() => cache.delete(key));
  return p;
}

export function forgetListings(): void {
  cache.clear();
}
