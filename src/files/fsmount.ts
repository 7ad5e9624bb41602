/**
 * `bkfs mount --files VM@CP DIR`: the checkpoint's raw disks and its guest filesystems side by side.
 *
 *   DIR/disks/<disk>.raw       the FUSE mount of `bkfs mount VM@CP DIR/disks` (src/fuse, unchanged)
 *   DIR/fs/<volume>/...        each filesystem, browsable with ordinary tools (vda1, vda2, vg-lv)
 *
 * The filesystems are mounted over the FUSE disk files, so this needs no daemon of its own beyond
 * what the engine needs:
 *  - kernel: `mount -o ro,loop,offset=,sizelimit=` (+ noload/norecovery, nosuid,nodev,noexec) of
 *    `DIR/disks/<disk>.raw` on `DIR/fs/<volume>`; the loop devices are auto-cleared on unmount.
 *  - guestfs: one detached `guestfish` (one appliance) runs a script that adds the raw files
 *    read-only, creates one appliance mount point per filesystem (`mkmountpoint`), mounts them and
 *    serves the lot on `DIR/fs` with `mount-local` + `mount-local-run`; unmounting `DIR/fs` ends
 *    it. Its output goes to a log next to the state file.
 * Who can read: only the mounting user. DIR/disks and DIR/fs are made 0700; the kernel engine's
 * mounts sit below DIR/fs; the guestfs FUSE mount on DIR/fs has no allow_other (the kernel then
 * refuses every other user, root's `bkfs mount` of DIR/disks keeps default_permissions + 0400).
 * State: `<runDir>/<key>.files.json` (runDir/key as in src/fuse/state.ts) lists what was mounted,
 * the guestfish PID and start time (a PID is only signalled if its start time matches).
 * `unmountFiles` takes everything down in reverse order: DIR/fs mounts, guestfish, DIR/disks, then
 * removes the directories it created, leaving DIR empty as it was.
 */
import { spawn } from 'node:child_process';
import { keyHandoff } from '../crypto/keyring';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { BkfsError, errorMessage } from '../errors';
import { CheckpointReader } from '../chain/reader';
import { resolveRef } from '../index/catalog';
import type { Repository } from '../repo/repository';
import { run } from '../util/proc';
import {
  daemonAlive,
  fusermount,
  mountAt,
  mountKey,
  processStartTime,
  runDir,
  unmountPath,
  type MountState,
} from '../fuse/state';
import {
  detectKernelSupport,
  kernelDriver,
  kernelMountOptions,
  pickEngine,
  type EngineChoice,
} from './engine';
import { guestfishAvailable, guestfsEnv, commandLine } from './guestfish';
import { unmount } from './kernel';
import { FilesSession } from './session';
import { discoverVolumes, isFilesystem, type Volume } from './volumes';
import { mkdirPrivateSync, openPrivateSync, writeFilePrivateSync } from '../util/private-fs';

export interface FilesMountOptions {
  /** Canonical absolute mount directory (must exist and be empty). */
  dir: string;
  ref: string;
  engine: EngineChoice;
  guestfsTcg?: boolean;
  /** bin/bkfs of this installation (runs `bkfs mount` for DIR/disks). */
  bkfsBin: string;
  onNotice?: (msg: string) => void;
}

export interface FilesMountState {
  dir: string;
  ref: string;
  engine: 'kernel' | 'guestfs';
  disksDir: string;
  fsDir: string;
  /** Volume directory names under fs/ and what they hold. */
  volumes: { name: string; id: string; type: string; mounted: boolean; note?: string }[];
  guestfish: { pid: number; startTime: number | null; log: string } | null;
  started: string;
}

export function filesStatePath(dir: string): string {
  return path.join(runDir(), `${mountKey(dir)}.files.json`);
}

export function readFilesState(dir: string): FilesMountState | undefined {
  try {
    return JSON.parse(fs.readFileSync(filesStatePath(dir), 'utf8')) as FilesMountState;
  } catch {
    return undefined;
  }
}

function writeFilesState(s: FilesMountState): void {
  const file = filesStatePath(s.dir);
  mkdirPrivateSync(path.dirname(file), { recursive: true });
  writeFilePrivateSync(`${file}.tmp`, JSON.stringify(s, null, 2) + '\n');
  fs.renameSync(`${file}.tmp`, file);
}

/** Directory name under fs/ of a volume: vda1, vdb, vg-lv. */
export function volumeDirName(v: Volume): string {
  return v.lv ? `${v.lv.vg}-${v.lv.lv}` : v.id;
}

/** The guestfish script that serves `fsDir` (pure; unit-tested). */
export function guestfishMountScript(
  disks: readonly { file: string }[],
  mounts: readonly { name: string; device: string; options: string }[],
  fsDir: string,
): string {
  const lines: string[] = [];
  for (const d of disks)
    lines.push(commandLine('add-drive', [d.file, { opt: 'format:raw' }, { opt: 'readonly:true' }]));
  lines.push('run');
  for (const m of mounts) lines.push(commandLine('mkmountpoint', [`/${m.name}`]));
  // A filesystem that fails to mount leaves its directory empty rather than failing the rest.
  for (const m of mounts) lines.push(`-${commandLine('mount-options', [m.options, m.device, `/${m.name}`])}`);
  // No allow_other: only the mounting user reaches guest files (libguestfs' FUSE layer checks no
  // permissions of its own, so allow_other would let every local user read the whole guest).
  lines.push(commandLine('mount-local', [fsDir, { opt: 'readonly:true' }]));
  lines.push('mount-local-run');
  return lines.join('\n') + '\n';
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function runBkfs(bin: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    // An encrypted repository unlocked here: the child gets its key through a pipe (fd 3).
    const handoff = keyHandoff(3);
    const child = spawn(process.execPath, [bin, ...args], {
      stdio: ['ignore', 'pipe', 'pipe', handoff.active ? 'pipe' : 'ignore'],
      env: { ...process.env, ...handoff.env },
    });
    handoff.send(child.stdio as unknown[]);
    let output = '';
    child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    child.on('error', (e) => resolve({ code: 1, output: e.message }));
    child.on('close', (code) => resolve({ code: code ?? 1, output }));
  });
}

/** Mount VM@CP's disks and filesystems under `o.dir`. */
export async function mountFiles(repo: Repository, o: FilesMountOptions): Promise<FilesMountState> {
  const dir = o.dir;
  if (readFilesState(dir)) {
    throw new BkfsError(
      'MOUNT_FAILED',
      `${dir} already holds a bkfs --files mount: run 'bkfs umount ${dir}' first`,
    );
  }
  await checkEmptyDir(dir);

  const { vm, checkpoint } = resolveRef(repo.db, o.ref);
  const ref = `${vm.name}@${checkpoint.name}`;
  const reader = new CheckpointReader(repo, vm, checkpoint);
  const set = await discoverVolumes(
    reader.disks.map((d) => ({
      name: d.name,
      size: d.virtual_size,
      readAt: (off: number, l: number) => reader.readAt(d.name, off, l),
    })),
  );
  const fsVolumes = set.volumes.filter(isFilesystem);
  const pvs = set.volumes.filter((v) => v.probe?.type === 'LVM2_member');
  const support = detectKernelSupport();
  let engine: 'kernel' | 'guestfs';
  if (o.engine === 'kernel') {
    engine = pickEngine('kernel', support, guestfishAvailable(), []).engine;
  } else {
    const pick = pickEngine(o.engine, support, guestfishAvailable(), [...fsVolumes, ...pvs]);
    if (pick.note) o.onNotice?.(pick.note);
    engine = pick.engine;
  }
  let volumes: Volume[] = fsVolumes;
  if (engine === 'guestfs' && pvs.length > 0) {
    // Logical volume names are needed before the serving appliance starts: ask one appliance.
    const s = await FilesSession.open(repo, vm, [checkpoint], {
      engine: 'guestfs',
      ...(o.guestfsTcg ? { guestfsTcg: true } : {}),
      ...(o.onNotice ? { onNotice: o.onNotice } : {}),
    });
    try {
      await s.layout(checkpoint.name).catch(() => null);
      volumes = (await s.volumes(checkpoint.name)).volumes.filter(isFilesystem);
    } finally {
      await s.close();
    }
  }
  for (const v of set.volumes.filter((x) => !isFilesystem(x))) {
    o.onNotice?.(`${v.id} not shown under fs/: ${v.probe ? v.probe.type : 'no filesystem recognised'}`);
  }

  const disksDir = path.join(dir, 'disks');
  const fsDir = path.join(dir, 'fs');
  // 0700 whatever the umask: the kernel engine's guest filesystems (guest modes and owners, which
  // may match host users) are mounted below fs/, so only the mounting user can reach them.
  await fsp.mkdir(disksDir, { mode: 0o700 });
  await fsp.mkdir(fsDir, { mode: 0o700 });
  await fsp.chmod(disksDir, 0o700);
  await fsp.chmod(fsDir, 0o700);
  const state: FilesMountState = {
    dir,
    ref,
    engine,
    disksDir,
    fsDir,
    volumes: [],
    guestfish: null,
    started: new Date().toISOString(),
  };
  writeFilesState(state);
  try {
    const r = await runBkfs(o.bkfsBin, ['-r', repo.dir, 'mount', ref, disksDir]);
    if (r.code !== 0) {
      throw new BkfsError(
        'MOUNT_FAILED',
        `bkfs mount ${ref} ${disksDir} failed: ${r.output.trim().split('\n').pop() ?? ''}`,
      );
    }
    if (engine === 'kernel') {
      for (const v of volumes) await kernelMountVolume(v, state, support, o);
    } else {
      await startGuestfish(
        state,
        reader.disks.map((d) => d.name),
        volumes,
        o,
      );
    }
    writeFilesState(state);
    return state;
  } catch (e) {
    await unmountFiles(dir, { lazy: true }).catch((u: unknown) =>
      o.onNotice?.(`cleanup: ${errorMessage(u)}`),
    );
    throw e;
  }
}

/** The mount point exists, is a directory and is empty. */
async function checkEmptyDir(dir: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fsp.stat(dir);
  } catch {
    throw new BkfsError('TARGET_INVALID', `mount point ${dir} does not exist (create the directory first)`);
  }
  if (!st.isDirectory()) throw new BkfsError('TARGET_INVALID', `mount point ${dir} is not a directory`);
  if ((await fsp.readdir(dir)).length > 0)
    throw new BkfsError('TARGET_INVALID', `mount point ${dir} is not empty`);
}

/** Mount one guest filesystem read-only below fs/ from its disk file in disks/ (loop at its offset). */
async function kernelMountVolume(
  v: Volume,
  state: FilesMountState,
  support: ReturnType<typeof detectKernelSupport>,
  o: FilesMountOptions,
): Promise<void> {
  const { disksDir, fsDir } = state;
  const name = volumeDirName(v);
  const drv = kernelDriver(v, support);
  if ('reason' in drv || v.disk === undefined) {
    const note = 'reason' in drv ? drv.reason : 'not on a disk';
    o.onNotice?.(`fs/${name} not mounted: ${note}`);
    state.volumes.push({ name, id: v.id, type: v.probe?.type ?? '?', mounted: false, note });
    return;
  }
  const target = path.join(fsDir, name);
  await fsp.mkdir(target);
  const opts = [
    ...kernelMountOptions(v.probe?.type ?? '', []),
    'loop',
    `offset=${v.offset}`,
    `sizelimit=${v.size}`,
  ];
  const file = path.join(disksDir, `${v.disk}.raw`);
  const m = await run('mount', ['-t', drv.driver, '-o', opts.join(','), file, target], {
    allowFail: true,
  });
  const ok = m.code === 0;
  if (!ok) {
    await fsp.rmdir(target).catch(() => undefined);
    o.onNotice?.(`fs/${name} not mounted: ${m.stderr.trim().split('\n').pop() ?? ''}`);
  }
  state.volumes.push({ name, id: v.id, type: v.probe?.type ?? '?', mounted: ok });
  writeFilesState(state);
}

async function startGuestfish(
  state: FilesMountState,
  diskNames: readonly string[],
  volumes: readonly Volume[],
  o: FilesMountOptions,
): Promise<void> {
  const letters = (i: number): string => {
    let s = '';
    let n = i + 1;
    while (n > 0) {
      s = String.fromCharCode(97 + ((n - 1) % 26)) + s;
      n = Math.floor((n - 1) / 26);
    }
    return s;
  };
  const devOf = (v: Volume): string => {
    if (v.lv) return `/dev/${v.lv.vg}/${v.lv.lv}`;
    const i = diskNames.indexOf(v.disk ?? '');
    return `/dev/sd${letters(i)}${v.partition ? v.partition : ''}`;
  };
  const mounts = volumes.map((v) => ({
    name: volumeDirName(v),
    device: devOf(v),
    options: v.probe?.type === 'xfs' ? 'ro,nouuid' : 'ro',
  }));
  const script = guestfishMountScript(
    diskNames.map((d) => ({ file: path.join(state.disksDir, `${d}.raw`) })),
    mounts,
    state.fsDir,
  );
  const base = filesStatePath(state.dir).replace(/\.json$/, '');
  const scriptFile = `${base}.guestfish`;
  const log = `${base}.log`;
  writeFilePrivateSync(scriptFile, script);
  const logFd = openPrivateSync(log, 'a');
  let child;
  try {
    child = spawn('guestfish', ['--ro', '--no-progress-bars', '-f', scriptFile], {
      detached: true,
      cwd: '/',
      stdio: ['ignore', logFd, logFd],
      env: guestfsEnv(o.guestfsTcg ? { tcg: true } : {}),
    });
  } finally {
    fs.closeSync(logFd);
  }
  child.on('error', () => undefined);
  const pid = child.pid;
  if (pid === undefined) throw new BkfsError('EXTERNAL_TOOL', 'cannot start guestfish');
  state.guestfish = { pid, startTime: processStartTime(pid), log };
  state.volumes = volumes.map((v) => ({
    name: volumeDirName(v),
    id: v.id,
    type: v.probe?.type ?? '?',
    mounted: true,
  }));
  writeFilesState(state);
  // Ready when DIR/fs is a FUSE mount (mount-local); failed when guestfish exits first.
  while (!mountAt(state.fsDir)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      const tail = fs.readFileSync(log, 'utf8').trim().split('\n').slice(-2).join(' ');
      throw new BkfsError(
        'EXTERNAL_TOOL',
        `guestfish could not serve ${state.fsDir}: ${tail || 'exited'} (log ${log})`,
      );
    }
    await sleep(200);
  }
  child.unref();
}

/** Take down a `--files` mount: fs/ mounts, guestfish, disks/ (bkfs FUSE), then the directories. */
export async function unmountFiles(dir: string, opts: { lazy?: boolean } = {}): Promise<FilesMountState> {
  const state = readFilesState(dir);
  if (!state) throw new BkfsError('TARGET_INVALID', `${dir} is not a bkfs --files mount`);
  const errors: string[] = [];
  if (state.guestfish) {
    const gf = state.guestfish;
    if (mountAt(state.fsDir)) {
      const r = await fusermount(state.fsDir, opts.lazy ?? false);
      if (r.code !== 0 && mountAt(state.fsDir)) {
        errors.push(`${state.fsDir}: ${r.message}`);
      }
    }
    // guestfish ends once mount-local-run returns; wait for it (by PID and start time).
    const ms: MountState = {
      pid: gf.pid,
      startTime: gf.startTime,
      mountpoint: state.fsDir,
      repo: '',
      ref: null,
      log: null,
      started: '',
    };
    for (let i = 0; i < 600 && daemonAlive(ms); i++) await sleep(100);
    if (daemonAlive(ms)) {
      try {
        process.kill(gf.pid, 'SIGTERM');
      } catch {
        // gone meanwhile
      }
    }
  } else {
    for (const v of [...state.volumes].reverse()) {
      const target = path.join(state.fsDir, v.name);
      if (!v.mounted || !mountAt(target)) continue;
      try {
        await unmount(target);
      } catch (e) {
        if (opts.lazy) await run('umount', ['-l', target], { allowFail: true });
        else errors.push(errorMessage(e));
      }
    }
  }
  if (errors.length > 0) {
    throw new BkfsError(
      'MOUNT_FAILED',
      `${errors.join('; ')}: close the files in use under ${state.fsDir}, or use --lazy`,
    );
  }
  if (mountAt(state.disksDir)) {
    await unmountPath(state.disksDir, { lazy: opts.lazy ?? false });
  }
  for (const v of state.volumes) await fsp.rmdir(path.join(state.fsDir, v.name)).catch(() => undefined);
  await fsp.rmdir(state.fsDir).catch(() => undefined);
  await fsp.rmdir(state.disksDir).catch(() => undefined);
  const base = filesStatePath(dir).replace(/\.json$/, '');
  await fsp.rm(`${base}.guestfish`, { force: true });
  await fsp.rm(`${base}.log`, { force: true });
  fs.rmSync(filesStatePath(dir), { force: true });
  return state;
}
