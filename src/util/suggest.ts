/**
 * "Did you mean" for mistyped names: the candidates closest to `word` by Damerau-Levenshtein
 * distance (an adjacent swap counts as one edit), within a third of the word's length.
 */
function distance(a: string, b: string): number {
  const d: number[][] = [];
  for (let i = 0; i <= a.length; i++) d.push([i, ...new Array<number>(b.length).fill(0)]);
  for (let j = 0; j <= b.length; j++) (d[0] as number[])[j] = j;
  for (let i = 1; i <= a.length; i++) {
    const row = d[i] as number[];
    const prev = d[i - 1] as number[];
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min((prev[j] as number) + 1, (row[j - 1] as number) + 1, (prev[j - 1] as number) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        v = Math.min(v, ((d[i - 2] as number[])[j - 2] as number) + 1);
      }
      row[j] = v;
    }
  }
  return (d[a.length] as number[])[b.length] as number;
}

/** The closest candidates (ties all returned, best first), or [] when none is close. */
export function suggestSimilar(word: string, candidates: readonly string[]): string[] {
  const w = word.toLowerCase();
  let best = Math.max(1, Math.floor(word.length / 3)) + 1;
  let out: string[] = [];
  for (const c of candidates) {
    if (c === word) continue;
    const cl = c.toLowerCase();
    const dist = cl === w ? 0.5 : distance(w, cl);
    if (dist < best) {
      best = dist;
      out = [c];
    } else if (dist === best) out.push(c);
  }
  return out;
}

/** " (did you mean 'x'?)" or "". */
export function didYouMean(word: string, candidates: readonly string[]): string {
  const s = suggestSimilar(word, candidates);
  if (s.length === 0) return '';
  return ` (did you mean ${s.map((x) => `'${x}'`).join(' or ')}?)`;
}
