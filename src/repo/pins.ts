/**
 * Pins: how a long-lived reader (a mount, a restore) tells forget/gc which checkpoints it is using.
 *
 * A pin is a small JSON file `pins/<pid>-<random>.json` = {pid, host, checkpoints: number[], time}.
 * While a live process pins a checkpoint, `forget` may hide it from the catalogue but must keep its
 * rows, and `gc` must keep every chunk and page it uses. A pin whose process is gone (same host)
 * is stale and ignored (and removed by `activePins`). Pins are files rather than rows so that a
 * reader never writes to the index and a crash leaves nothing that needs a writer to clean.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Repository } from './repository';
import { processAlive } from '../util/proc';

export interface PinInfo {
  pid: number;
  host: string;
  checkpoints: number[];
  time: string;
}

export class Pin {
  private released = false;

  constructor(
    /** Null for a reader that cannot write the repository: it cannot pin (see Repository.open). */
    readonly file: string | null,
    private checkpoints: number[],
  ) {
    this.write();
  }

  private write(): void {
    if (this.file === null) return;
    const info: PinInfo = {
      pid: process.pid,
      host: os.hostname(),
      checkpoints: this.checkpoints,
      time: new Date().toISOString(),
    };
    const tmp = `${this.file}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(info));
    fs.renameSync(tmp, this.file);
  }

  /** Replace the set of pinned checkpoints (e.g. a tree mount opening another checkpoint). */
  update(checkpoints: number[]): void {
    if (this.released) return;
    this.checkpoints = [...new Set(checkpoints)].sort((a, b) => a - b);
    this.write();
  }

  add(id: number): void {
    if (!this.checkpoints.includes(id)) this.update([...this.checkpoints, id]);
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    if (this.file !== null) fs.rmSync(this.file, { force: true });
  }
}

function pinsDir(repo: Repository): string {
  return path.join(repo.dir, 'pins');
}

export function pinCheckpoints(repo: Repository, checkpoints: number[]): Pin {
  if (!repo.writable) return new Pin(null, [...new Set(checkpoints)]);
  fs.mkdirSync(pinsDir(repo), { recursive: true });
  const file = path.join(pinsDir(repo), `${process.pid}-${randomBytes(4).toString('hex')}.json`);
  return new Pin(file, [...new Set(checkpoints)]);
}

/** Pins held by live processes; stale pin files of this host are removed. */
export function activePins(repo: Repository): PinInfo[] {
  const dir = pinsDir(repo);
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((n) => n.endsWith('.json'));
  } catch {
    return [];
  }
  const out: PinInfo[] = [];
  for (const n of names) {
    const p = path.join(dir, n);
    let info: PinInfo;
    try {
      info = JSON.parse(fs.readFileSync(p, 'utf8')) as PinInfo;
    } catch {
      continue; // being written
    }
    if (info.host === os.hostname() && !processAlive(info.pid)) {
      fs.rmSync(p, { force: true });
      continue;
    }
    out.push(info);
  }
  return out;
}

/** Ids of every checkpoint pinned by a live process. */
export function pinnedCheckpointIds(repo: Repository): Set<number> {
  return new Set(activePins(repo).flatMap((p) => p.checkpoints));
}
