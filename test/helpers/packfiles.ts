/**
 * The pack files of a local repository as the file system shows them (tests look at the disk
 * itself, not through the store under test): every `packs/NN/<name>.pack` (NN = the name's first
 * two digits), in name order.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

export function packFilesOnDisk(repoDir: string): { name: string; size: number }[] {
  const out: { name: string; size: number }[] = [];
  const root = path.join(repoDir, 'packs');
  let subdirs: string[] = [];
  try {
    subdirs = fs.readdirSync(root);
  } catch {
    return out;
  }
  for (const sd of subdirs.sort()) {
    let names: string[] = [];
    try {
      names = fs.readdirSync(path.join(root, sd));
    } catch {
      continue;
    }
    for (const n of names.sort()) {
      if (!/^[0-9a-f]{32}\.pack$/.test(n) || !n.startsWith(sd)) continue;
      try {
        out.push({ name: n.slice(0, -'.pack'.length), size: fs.statSync(path.join(root, sd, n)).size });
      } catch {
        // removed meanwhile
      }
    }
  }
  return out;
}
