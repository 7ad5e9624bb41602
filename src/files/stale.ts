/**
 * Leftovers of a file session whose process died without cleaning up (kill -9, OOM kill): its
 * private `bkfs-files-*` directory in the temporary directory and, with the kernel engine, guest
 * filesystems mounted on read-only loop devices over `nbdfuse` files below it. Those mounts would
 * stay until reboot, keep loop devices busy and show up in `findmnt`.
 *
 * Each session writes `owner` (JSON: pid and the process start time from /proc, so a reused PID
 * is not mistaken for the owner) into its directory. The next session sweeps: for every
 * `bkfs-files-*` directory owned by this user whose owner process is gone, it unmounts the
 * ordinary mounts below it (deepest first), detaches the loop devices whose backing file lies
 * below it, unmounts the FUSE mounts (`fusermount3 -u -z`, which ends nbdfuse) and removes the
 * directory, but only once nothing is mounted below it any more. A directory without an owner
 * file, with a live owner or owned by another user is left alone. Nothing outside those
 * directories is touched: every mount point and backing file is checked to lie below one.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { errorMessage } from '../errors';
import { processStartTime } from '../fuse/state';
import { processAlive, run } from '../util/proc';
import { detachLoop, unmount } from './kernel';

export const SESSION_DIR_PREFIX = 'bkfs-files-';
export const OWNER_FILE = 'owner';

interface Owner {
  pid: number;
  startTime: number | null;
}

/** Record this process as the owner of a session directory. */
export function writeOwner(dir: string): void {
  const owner: Owner = { pid: process.pid, startTime: processStartTime(process.pid) };
  fs.writeFileSync(path.join(dir, OWNER_FILE), JSON.stringify(owner), { mode: 0o600 });
}

function ownerGone(dir: string): boolean {
  let o: Owner;
  try {
    o = JSON.parse(fs.readFileSync(path.join(dir, OWNER_FILE), 'utf8')) as Owner;
  } catch {
    return false; // no owner file (still being made, or not ours to judge)
  }
  if (!Number.isInteger(o.pid) || o.pid <= 0) return false;
  if (!processAlive(o.pid)) return true;
  const now = processStartTime(o.pid);
  return o.startTime !== null && now !== null && now !== o.startTime;
}

/** `/proc/self/mountinfo` mount points (unescaped) with their filesystem type. */
export function mountsInfo(): { dir: string; fstype: string }[] {
  const unescape = (s: string): string =>
    s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  const out: { dir: string; fstype: string }[] = [];
  for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-');
    if (f.length < 10 || sep < 0) continue;
    out.push({ dir: unescape(f[4]!), fstype: f[sep + 1] ?? '' });
  }
  return out;
}

const below = (p: string, dir: string): boolean => p.startsWith(dir + '/');

/** Loop devices whose backing file lies below `dir`. */
function loopsBelow(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync('/sys/block').filter((n) => /^loop\d+$/.test(n));
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const n of names) {
    try {
      const backing = fs.readFileSync(`/sys/block/${n}/loop/backing_file`, 'utf8').trim();
      if (below(backing, dir)) out.push(`/dev/${n}`);
    } catch {
      // not attached
    }
  }
  return out;
}

/** Release what one dead session left below `dir`; true when the directory could be removed. */
async function releaseDir(dir: string): Promise<boolean> {
  const mounts = (): { dir: string; fstype: string }[] =>
    mountsInfo()
      .filter((m) => below(m.dir, dir))
      .sort((a, b) => b.dir.length - a.dir.length);
  for (const m of mounts().filter((m) => !m.fstype.startsWith('fuse'))) await unmount(m.dir);
  for (const dev of loopsBelow(dir)) await detachLoop(dev);
  for (const m of mounts().filter((m) => m.fstype.startsWith('fuse'))) {
    await run('fusermount3', ['-u', '-z', m.dir], { allowFail: true });
  }
  if (mounts().length > 0) return false;
  await fsp.rm(dir, { recursive: true, force: true });
  return true;
}

/**
 * Sweep the leftovers of dead sessions of this user in `tmp` (see the top of this file). Problems
 * are reported through `onNotice` and never fail the caller's session.
 */
export async function sweepStaleSessions(
  onNotice?: (m: string) => void,
  tmp: string = os.tmpdir(),
): Promise<string[]> {
  let names: string[];
  try {
    names = fs.readdirSync(tmp).filter((n) => n.startsWith(SESSION_DIR_PREFIX));
  } catch {
    return [];
  }
  const uid = process.getuid?.() ?? -1;
  const swept: string[] = [];
  for (const n of names) {
    const dir = path.join(tmp, n);
    try {
      const st = fs.lstatSync(dir);
      if (!st.isDirectory() || st.uid !== uid || !ownerGone(dir)) continue;
      if (await releaseDir(dir)) swept.push(dir);
      else onNotice?.(`${dir}: a dead file session left mounts that could not be released`);
    } catch (e) {
      onNotice?.(`${dir}: cannot clean up a dead file session: ${errorMessage(e)}`);
    }
  }
  return swept;
}
