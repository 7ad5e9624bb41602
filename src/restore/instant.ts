/**
 * Instant recovery on libvirt (`bkfs instant-restore`): run a VM straight from a checkpoint, then
 * make its disks independent of the backup while it runs.
 *
 *   1. A bkfs NBD export of the checkpoint (the `bkfs serve` daemon, which pins the checkpoint)
 *      listens on DIR/bkfs-instant.sock, owned by the user libvirt runs QEMU as (mode 0600).
 *   2. Per disk, a qcow2 overlay DIR/<disk>.qcow2 whose backing is that export (raw over NBD).
 *   3. The saved domain XML is rewritten (src/restore/domain-xml.ts): each disk points at its
 *      overlay with the NBD export given as `<backingStore>` (libvirt passes the chain to QEMU from
 *      the XML); the disk's `error_policy`/`rerror_policy` become `stop` so an export outage pauses
 *      the VM instead of handing I/O errors to the guest; a new name also gets a new UUID and new
 *      MAC addresses. It is defined (persistent) and, with `start`, started.
 *   4. The copy: `virsh blockpull` per disk streams every block the overlay lacks from the export
 *      into the overlay, inside QEMU, while the guest runs; guest writes land in the overlay and are
 *      never overwritten by the pull. When a pull completes QEMU drops the backing (the overlay is a
 *      standalone image), the persistent definition is rewritten without it (and with the saved
 *      error policies), and the export is stopped: the VM no longer depends on bkfs.
 *
 * The copy is QEMU's job, so it goes on if bkfs is stopped; `resumeInstant` (--resume) restarts the
 * export when it is gone, resumes a VM paused by an export outage, re-issues a pull that failed and
 * finishes. State: DIR/bkfs-instant.json (0600), found by domain name through a pointer file in
 * bkfs's run directory (see `instantIndexDir`). Core code: progress and notes go to callbacks.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError, errorMessage } from '../errors';
import { CheckpointReader } from '../chain/reader';
import type { Repository } from '../repo/repository';
import { runDir } from '../fuse/state';
import { lastLine, run } from '../util/proc';
import { writeFileDurable } from '../util/private-fs';
import {
  escapeXmlAttr,
  findElements,
  getAttr,
  removeElements,
  rewriteDomainXml,
  setAttr,
} from './domain-xml';
import { configFileName, DOMAIN_XML } from './engine';

export const STATE_FILE = 'bkfs-instant.json';
export const SOCKET_FILE = 'bkfs-instant.sock';
/** Longest Unix socket path (sun_path is 108 bytes with the NUL). */
const SOCKET_MAX = 107;

export type InstantPhase = 'preparing' | 'defined' | 'copying' | 'independent';

export interface InstantDisk {
  /** bkfs disk name = libvirt target (vda). */
  name: string;
  overlay: string;
  size: number;
  independent: boolean;
}

export interface InstantState {
  version: 1;
  name: string;
  dir: string;
  repo: string;
  /** VM@CHECKPOINT served. */
  ref: string;
  socket: string;
  disks: InstantDisk[];
  phase: InstantPhase;
  /** Saved error policies of each disk's <driver> (restored when the disk is independent). */
  policies: Record<string, { errorPolicy: string | null; rerrorPolicy: string | null }>;
  bandwidthMiB: number | null;
  created: string;
  updated: string;
  /** When the domain was started, and when all its disks became independent (ISO 8601). */
  startedAt: string | null;
  independentAt: string | null;
  /** The bkfs process driving the copy (to refuse a second driver). */
  driver: { pid: number } | null;
  lastError: string | null;
}

export interface InstantProgress {
  name: string;
  phase: InstantPhase;
  done: number;
  total: number;
  disks: { name: string; done: number; total: number; independent: boolean; job: boolean }[];
}

/** What the CLI provides: the export daemon (a `bkfs serve` process) and the reports. */
export interface InstantHooks {
  startExport(s: InstantState): Promise<void>;
  exportAlive(s: InstantState): boolean;
  stopExport(s: InstantState): Promise<void>;
  onProgress?(p: InstantProgress): void;
  onNotice?(line: string): void;
  signal?: AbortSignal;
  /** Poll interval of the copy (ms). */
  pollMs?: number;
}

export interface InstantOptions {
  ref: string;
  dir: string;
  repoDir: string;
  define?: string;
  start: boolean;
  /** blockpull bandwidth limit, MiB/s. */
  bandwidthMiB?: number;
}

export interface InstantResult {
  name: string;
  dir: string;
  ref: string;
  phase: InstantPhase;
  disks: InstantDisk[];
  domainXml: string;
  stateFile: string;
  socket: string;
  /** ms from the command's start to the domain running, and to independence. */
  startMs: number | null;
  independentMs: number | null;
}

// ---------------------------------------------------------------------------------------------
// virsh (default connection: qemu:///system as root, or $LIBVIRT_DEFAULT_URI)

async function virsh(args: string[], allowFail = false): Promise<{ code: number; out: string; err: string }> {
  const r = await run('virsh', ['-q', ...args], {
    allowFail: true,
    env: { ...process.env, LC_ALL: 'C' },
  }).catch((e: unknown) => {
    throw new BkfsError('EXTERNAL_TOOL', `cannot run virsh: ${errorMessage(e)}`);
  });
  if (r.code !== 0 && !allowFail) {
    throw new BkfsError('EXTERNAL_TOOL', `virsh ${args[0]} failed: ${lastLine(r.stderr || r.stdout)}`);
  }
  return { code: r.code, out: r.stdout, err: r.stderr };
}

async function domainExists(name: string): Promise<boolean> {
  const r = await virsh(['domuuid', name], true);
  if (r.code === 0) return true;
  if (/failed to connect|no connection driver|cannot connect/i.test(r.err))
    throw new BkfsError('EXTERNAL_TOOL', `cannot reach libvirt: ${lastLine(r.err)}`);
  return false;
}

/** `running`, `paused`, `shut off`, … and the reason (`ioerror`, `booted`, …); null when undefined. */
export async function domainState(name: string): Promise<{ state: string; reason: string } | null> {
  const r = await virsh(['domstate', name, '--reason'], true);
  if (r.code !== 0) return null;
  const m = /^(.+?)\s*\((.*)\)\s*$/.exec(r.out.trim());
  return m ? { state: m[1]!, reason: m[2]! } : { state: r.out.trim(), reason: '' };
}

/**
 * The running block job of a disk as a fraction done, or null when none runs. (virsh 9.0 prints
 * `Block Pull: [ 57 %]` on stderr, also with --bytes; a byte count `N/M` is taken when given.)
 */
async function blockJob(name: string, target: string): Promise<{ cur: number; end: number } | null> {
  const r = await virsh(['blockjob', name, target, '--info', '--bytes'], true);
  const text = `${r.out}\n${r.err}`;
  if (r.code !== 0 || /no current block job/i.test(text)) {
    if (r.code === 0 || /not running|no current block job|not found/i.test(text)) return null;
    throw new BkfsError('EXTERNAL_TOOL', `virsh blockjob ${name} ${target}: ${lastLine(r.err)}`);
  }
  const bytesM = /Block \w+:\s*(\d+)\s*\/\s*(\d+)/.exec(text);
  if (bytesM) return { cur: Number(bytesM[1]), end: Number(bytesM[2]) };
  const pct = /\[\s*(\d+(?:\.\d+)?)\s*%\s*\]/.exec(text);
  if (pct) return { cur: Number(pct[1]), end: 100 };
  return /Block \w+/.test(text) ? { cur: 0, end: 100 } : null;
}

/** Does the disk `target` of the running domain still read from `socket`? */
function dependsOn(xml: string, target: string, socket: string): boolean {
  for (const span of findElements(xml, 'disk')) {
    const el = xml.slice(span.start, span.end);
    const t = /<target\b[^>]*>/.exec(el)?.[0];
    if (!t || getAttr(t, 'dev') !== target) continue;
    for (const b of findElements(el, 'backingStore')) {
      const bs = el.slice(b.start, b.end);
      for (const h of bs.match(/<host\b[^>]*>/g) ?? []) if (getAttr(h, 'socket') === socket) return true;
    }
    return false;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// The user QEMU runs as (owner of the export socket)

/** uid:gid of QEMU under the system libvirt (qemu.conf `user`/`group`), or null when not root. */
export async function qemuOwner(
  confFile = '/etc/libvirt/qemu.conf',
): Promise<{ uid: number; gid: number } | null> {
  if (process.getuid?.() !== 0) return null; // session libvirt: QEMU runs as this user
  let conf = '';
  try {
    conf = fs.readFileSync(confFile, 'utf8');
  } catch {
    // no qemu.conf: the built-in default
  }
  const val = (k: string) => new RegExp(`^\\s*${k}\\s*=\\s*"([^"]*)"`, 'm').exec(conf)?.[1];
  const idOf = async (flag: '-u' | '-g', who: string): Promise<number | null> => {
    if (/^\+\d+$/.test(who)) return Number(who.slice(1));
    const r = await run('id', [flag, who], { allowFail: true });
    return r.code === 0 ? Number(r.stdout.trim()) : null;
  };
  let user = val('user');
  if (user === undefined) {
    for (const u of ['libvirt-qemu', 'qemu']) {
      if ((await idOf('-u', u)) !== null) {
        user = u;
        break;
      }
    }
  }
  if (user === undefined) return { uid: 0, gid: 0 };
  const uid = await idOf('-u', user);
  if (uid === null) throw new BkfsError('EXTERNAL_TOOL', `libvirt's QEMU user '${user}' does not exist`);
  const group = val('group');
  let gid: number | null = null;
  if (group !== undefined && /^\+\d+$/.test(group)) gid = Number(group.slice(1));
  else if (group !== undefined) {
    const r = await run('getent', ['group', group], { allowFail: true });
    gid = r.code === 0 ? Number(r.stdout.split(':')[2]) : null;
  }
  if (gid === null) gid = (await idOf('-g', user)) ?? 0;
  return { uid, gid };
}

// ---------------------------------------------------------------------------------------------
// State

/** Where `NAME.json` pointers ({dir}) to each restore's state live: beside the mount states. */
export function instantIndexDir(): string {
  return path.join(path.dirname(runDir()), 'instant');
}

function pointerFile(name: string): string {
  return path.join(instantIndexDir(), `${encodeURIComponent(name)}.json`);
}

export function saveState(s: InstantState): void {
  s.updated = new Date().toISOString();
  writeFileDurable(path.join(s.dir, STATE_FILE), Buffer.from(JSON.stringify(s, null, 2) + '\n'), 0o600);
  fs.mkdirSync(instantIndexDir(), { recursive: true, mode: 0o700 });
  writeFileDurable(pointerFile(s.name), Buffer.from(JSON.stringify({ dir: s.dir }) + '\n'), 0o600);
}

export function readStateDir(dir: string): InstantState {
  const file = path.join(dir, STATE_FILE);
  let s: InstantState;
  try {
    s = JSON.parse(fs.readFileSync(file, 'utf8')) as InstantState;
  } catch (e) {
    throw new BkfsError('NOT_FOUND', `no instant restore state in ${file}: ${errorMessage(e)}`);
  }
  if (s.version !== 1 || typeof s.name !== 'string' || !Array.isArray(s.disks))
    throw new BkfsError('TARGET_INVALID', `${file} is not a bkfs instant-restore state file`);
  return s;
}

/** The state of the instant restore of domain `name`. */
export function findState(name: string): InstantState {
  let dir: string;
  try {
    dir = (JSON.parse(fs.readFileSync(pointerFile(name), 'utf8')) as { dir: string }).dir;
  } catch {
    throw new BkfsError(
      'NOT_FOUND',
      `no instant restore of '${name}' is known here (after a reboot: --to DIR with --resume or --status)`,
    );
  }
  return readStateDir(dir);
}

/** Every instant restore known here (pointers whose state file is gone are dropped). */
export function listStates(): InstantState[] {
  let names: string[];
  try {
    names = fs.readdirSync(instantIndexDir()).filter((n) => n.endsWith('.json'));
  } catch {
    return [];
  }
  const out: InstantState[] = [];
  for (const n of names) {
    try {
      out.push(findState(decodeURIComponent(n.slice(0, -5))));
    } catch {
      fs.rmSync(path.join(instantIndexDir(), n), { force: true });
    }
  }
  return out.sort((a, b) => a.created.localeCompare(b.created));
}

// ---------------------------------------------------------------------------------------------
// Domain XML

/**
 * The saved domain XML made to run from the overlays: disks → overlay + NBD backingStore and error
 * policy `stop`; a new name drops the UUID (rewriteDomainXml) and the MAC addresses.
 */
export function instantDomainXml(
  saved: string,
  o: { name: string; socket: string; disks: InstantDisk[] },
): { xml: string; policies: InstantState['policies']; untouched: string[]; missing: string[] } {
  const r = rewriteDomainXml(saved, {
    disks: Object.fromEntries(o.disks.map((d) => [d.name, { path: d.overlay, format: 'qcow2' as const }])),
    name: o.name,
  });
  let xml = r.xml;
  const policies: InstantState['policies'] = {};
  const spans = findElements(xml, 'disk');
  for (let i = spans.length - 1; i >= 0; i--) {
    const span = spans[i]!;
    let el = xml.slice(span.start, span.end);
    const t = /<target\b[^>]*>/.exec(el)?.[0];
    const dev = t ? getAttr(t, 'dev') : undefined;
    const d = o.disks.find((x) => x.name === dev);
    if (!d || !r.rewritten.includes(d.name)) continue;
    const src = `<source file='${escapeXmlAttr(d.overlay)}'/>`;
    const at = el.indexOf(src);
    const indent = /\n([ \t]*)<source /.exec(el)?.[1] ?? '      ';
    const backing =
      `\n${indent}<backingStore type='network' index='1'>` +
      `\n${indent}  <format type='raw'/>` +
      `\n${indent}  <source protocol='nbd' name='${escapeXmlAttr(d.name)}'>` +
      `\n${indent}    <host transport='unix' socket='${escapeXmlAttr(o.socket)}'/>` +
      `\n${indent}  </source>` +
      `\n${indent}  <backingStore/>` +
      `\n${indent}</backingStore>`;
    el = el.slice(0, at + src.length) + backing + el.slice(at + src.length);
    const dm = /<driver\b[^>]*>/.exec(el)!;
    policies[d.name] = {
      errorPolicy: getAttr(dm[0], 'error_policy') ?? null,
      rerrorPolicy: getAttr(dm[0], 'rerror_policy') ?? null,
    };
    const drv = setAttr(setAttr(dm[0], 'error_policy', 'stop'), 'rerror_policy', 'stop');
    el = el.slice(0, dm.index) + drv + el.slice(dm.index + dm[0].length);
    xml = xml.slice(0, span.start) + el + xml.slice(span.end);
  }
  if (r.originalName !== o.name) {
    const ifs = findElements(xml, 'interface');
    for (let i = ifs.length - 1; i >= 0; i--) {
      const s = ifs[i]!;
      xml = xml.slice(0, s.start) + removeElements(xml.slice(s.start, s.end), 'mac') + xml.slice(s.end);
    }
  }
  return { xml, policies, untouched: r.untouched, missing: r.missing };
}

/** The persistent definition without the NBD backing and with the saved error policies again. */
export function independentDomainXml(xml: string, s: InstantState): string {
  const spans = findElements(xml, 'disk');
  for (let i = spans.length - 1; i >= 0; i--) {
    const span = spans[i]!;
    let el = xml.slice(span.start, span.end);
    const t = /<target\b[^>]*>/.exec(el)?.[0];
    const dev = t ? getAttr(t, 'dev') : undefined;
    const d = s.disks.find((x) => x.name === dev);
    if (!d) continue;
    el = removeElements(el, 'backingStore');
    const dm = /<driver\b[^>]*>/.exec(el);
    const pol = s.policies[d.name];
    if (dm && pol) {
      let drv = dm[0];
      for (const [k, v] of [
        ['error_policy', pol.errorPolicy],
        ['rerror_policy', pol.rerrorPolicy],
      ] as const) {
        drv =
          v !== null
            ? setAttr(drv, k, v)
            : drv.replace(new RegExp(`\\s${k}\\s*=\\s*(?:'[^']*'|"[^"]*")`), '');
      }
      el = el.slice(0, dm.index) + drv + el.slice(dm.index + dm[0].length);
    }
    xml = xml.slice(0, span.start) + el + xml.slice(span.end);
  }
  return xml;
}

// ---------------------------------------------------------------------------------------------
// Prepare, start, copy

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function result(s: InstantState, t0: number): InstantResult {
  return {
    name: s.name,
    dir: s.dir,
    ref: s.ref,
    phase: s.phase,
    disks: s.disks,
    domainXml: path.join(s.dir, DOMAIN_XML),
    stateFile: path.join(s.dir, STATE_FILE),
    socket: s.socket,
    startMs: s.startedAt !== null ? Math.max(0, Date.parse(s.startedAt) - t0) : null,
    independentMs: s.independentAt !== null ? Math.max(0, Date.parse(s.independentAt) - t0) : null,
  };
}

/** A prepared instant restore: `finishInstant` drives its copy (without the repository open). */
export interface InstantPrepared {
  state: InstantState;
  t0: number;
}

/**
 * Everything up to a defined (and with `start`, running) domain reading from the export. The
 * repository is only read here; `finishInstant` then copies to independence.
 */
export async function instantRestore(
  repo: Repository,
  o: InstantOptions,
  hooks: InstantHooks,
): Promise<InstantPrepared> {
  const t0 = Date.now();
  const reader = CheckpointReader.open(repo, o.ref);
  const { ref, saved, name, dir, socket } = await instantTarget(reader, o);
  const disks: InstantDisk[] = reader.disks.map((d) => ({
    name: d.name,
    overlay: path.join(dir, `${configFileName(d.name)}.qcow2`),
    size: d.virtual_size,
    independent: false,
  }));
  // QEMU (libvirt-qemu) must reach the overlays and the socket: the directory is traversable
  // (0711), not listable; every file in it is 0600.
  fs.mkdirSync(dir, { recursive: true, mode: 0o711 });
  for (const f of [STATE_FILE, ...disks.map((d) => d.overlay)]) {
    if (fs.existsSync(path.resolve(dir, f))) {
      throw new BkfsError(
        'TARGET_EXISTS',
        `${path.resolve(dir, f)} exists: an instant restore was made in ${dir} (--status / --resume NAME, or remove it)`,
      );
    }
  }
  const s: InstantState = {
    version: 1,
    name,
    dir,
    repo: o.repoDir,
    ref,
    socket,
    disks,
    phase: 'preparing',
    policies: {},
    bandwidthMiB: o.bandwidthMiB ?? null,
    created: new Date().toISOString(),
    updated: '',
    startedAt: null,
    independentAt: null,
    driver: { pid: process.pid },
    lastError: null,
  };
  saveState(s);
  try {
    await hooks.startExport(s);
    for (const d of disks) await createOverlay(d, socket);
    await defineInstant(s, saved, hooks);
    if (!o.start) {
      s.driver = null;
      saveState(s);
      return { state: s, t0 };
    }
    const st = await virsh(['start', name], true);
    if (st.code !== 0) {
      throw new BkfsError(
        'RECOVERY_FAILED',
        `virsh start ${name}: ${lastLine(st.err || st.out)} (defined, not running: see ${path.join(dir, STATE_FILE)})`,
      );
    }
    s.startedAt = new Date().toISOString();
    s.phase = 'copying';
    saveState(s);
    hooks.onNotice?.(`${name} runs from ${ref} (export ${socket}); copying its disks into ${dir}`);
    return { state: s, t0 };
  } catch (e) {
    s.lastError = errorMessage(e);
    s.driver = null;
    saveState(s);
    throw e;
  }
}

/**
 * What an instant restore of `reader`'s checkpoint needs before it touches anything: the saved
 * domain XML, the domain's name (`--define`, else the saved one; no domain of that name may
 * exist), the directory and the export's socket in it (short enough for a Unix socket).
 */
async function instantTarget(
  reader: CheckpointReader,
  o: InstantOptions,
): Promise<{ ref: string; saved: { data: Buffer }; name: string; dir: string; socket: string }> {
  const ref = `${reader.vm.name}@${reader.checkpoint.name}`;
  const saved = reader.configs().find((c) => configFileName(c.name) === DOMAIN_XML);
  if (!saved) {
    throw new BkfsError(
      'NOT_FOUND',
      `${ref} has no saved ${DOMAIN_XML} (a libvirt backup saves it; else back up with --config domain.xml=FILE)`,
    );
  }
  const name = o.define ?? /<name>([^<]*)<\/name>/.exec(saved.data.toString('utf8'))?.[1]?.trim();
  if (!name) throw new BkfsError('USAGE', `the saved ${DOMAIN_XML} has no <name>: give --define NAME`);
  const dir = path.resolve(o.dir);
  const socket = path.join(dir, SOCKET_FILE);
  if (Buffer.byteLength(socket) > SOCKET_MAX) {
    throw new BkfsError(
      'USAGE',
      `--to ${dir}: too long for the export's Unix socket (${socket}); use a shorter path`,
    );
  }
  if (await domainExists(name)) {
    throw new BkfsError(
      'TARGET_EXISTS',
      `libvirt already has a domain named '${name}' (give --define NEWNAME, or undefine the old one)`,
    );
  }
  return { ref, saved, name, dir, socket };
}

/** The disk's qcow2 overlay (0600) whose backing file is its export on `socket`. */
async function createOverlay(d: InstantDisk, socket: string): Promise<void> {
  const backing = JSON.stringify({
    driver: 'nbd',
    server: { type: 'unix', path: socket },
    export: d.name,
    'reconnect-delay': 30,
  });
  const r = await run(
    'qemu-img',
    ['create', '-q', '-f', 'qcow2', '-u', '-F', 'raw', '-b', `json:${backing}`, d.overlay, String(d.size)],
    { allowFail: true },
  );
  if (r.code !== 0)
    throw new BkfsError('EXTERNAL_TOOL', `qemu-img create ${d.overlay}: ${lastLine(r.stderr)}`);
  fs.chmodSync(d.overlay, 0o600);
}

/** Write the domain XML pointing at the overlays (and the saved one beside it), `virsh define` it. */
async function defineInstant(s: InstantState, saved: { data: Buffer }, hooks: InstantHooks): Promise<void> {
  const x = instantDomainXml(saved.data.toString('utf8'), { name: s.name, socket: s.socket, disks: s.disks });
  for (const u of x.untouched)
    hooks.onNotice?.(`domain.xml: disk ${u} was not backed up; its source is unchanged`);
  if (x.missing.length > 0)
    throw new BkfsError(
      'TARGET_INVALID',
      `the saved ${DOMAIN_XML} has no <disk> for ${x.missing.join(', ')}`,
    );
  s.policies = x.policies;
  writeFileDurable(path.join(s.dir, 'domain.orig.xml'), saved.data, 0o600);
  const xmlFile = path.join(s.dir, DOMAIN_XML);
  writeFileDurable(xmlFile, Buffer.from(x.xml, 'utf8'), 0o600);
  await virsh(['define', xmlFile]);
  s.phase = 'defined';
  saveState(s);
}

/** The copy to independence of a started instant restore (nothing to do when only defined). */
export async function finishInstant(p: InstantPrepared, hooks: InstantHooks): Promise<InstantResult> {
  const s = p.state;
  if (s.phase !== 'copying') return result(s, p.t0);
  try {
    await copyToIndependence(s, hooks);
    return result(s, p.t0);
  } catch (e) {
    s.lastError = errorMessage(e);
    s.driver = null;
    saveState(s);
    throw e;
  }
}

/**
 * `--resume`: restart the export if it is gone, start the domain if it is not running, resume it
 * if an export outage paused it, and drive the copy to independence.
 */
export async function resumeInstant(
  s: InstantState,
  hooks: InstantHooks,
  o: { bandwidthMiB?: number } = {},
): Promise<InstantResult> {
  const t0 = Date.now();
  if (s.driver && s.driver.pid !== process.pid && processRuns(s.driver.pid)) {
    throw new BkfsError(
      'TARGET_EXISTS',
      `bkfs (pid ${s.driver.pid}) is already driving the instant restore of '${s.name}'`,
    );
  }
  if (s.phase === 'independent') return { ...result(s, t0), startMs: null, independentMs: null };
  s.driver = { pid: process.pid };
  s.lastError = null;
  saveState(s);
  try {
    const st = await domainState(s.name);
    if (st === null) {
      throw new BkfsError(
        'RECOVERY_FAILED',
        `libvirt has no domain '${s.name}' any more; the overlays in ${s.dir} hold its data (see README "Instant recovery")`,
      );
    }
    if (!hooks.exportAlive(s)) {
      hooks.onNotice?.(`the export of ${s.ref} is not running: restarting it on ${s.socket}`);
      await hooks.startExport(s);
    }
    if (o.bandwidthMiB !== undefined) {
      // A new limit (0 = none) for the pulls to come and for those running now.
      s.bandwidthMiB = o.bandwidthMiB === 0 ? null : o.bandwidthMiB;
      if (st.state !== 'shut off') {
        for (const d of s.disks.filter((x) => !x.independent)) {
          await virsh(['blockjob', s.name, d.name, '--bandwidth', String(o.bandwidthMiB)], true);
        }
      }
    }
    let started = false;
    if (st.state === 'shut off') {
      await virsh(['start', s.name]);
      s.startedAt = new Date().toISOString();
      started = true;
    }
    s.phase = 'copying';
    saveState(s);
    await copyToIndependence(s, hooks);
    const r = result(s, t0);
    return started ? r : { ...r, startMs: null };
  } catch (e) {
    s.lastError = errorMessage(e);
    s.driver = null;
    saveState(s);
    throw e;
  }
}

function processRuns(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Consecutive pulls that may end without the disk becoming independent before giving up. */
const MAX_PULL_FAILURES = 5;

async function copyToIndependence(s: InstantState, hooks: InstantHooks): Promise<void> {
  const failures = new Map<string, number>();
  const pulled = new Map<string, boolean>();
  const pollMs = hooks.pollMs ?? 500;
  for (;;) {
    if (hooks.signal?.aborted) {
      throw new BkfsError(
        'INTERRUPTED',
        `interrupted: the copy goes on inside QEMU; 'bkfs instant-restore --resume ${s.name}' finishes it`,
      );
    }
    const st = await domainState(s.name);
    if (st === null) throw new BkfsError('RECOVERY_FAILED', `libvirt has no domain '${s.name}' any more`);
    if (st.state === 'shut off') {
      throw new BkfsError(
        'RECOVERY_FAILED',
        `${s.name} stopped (${st.reason}) before its disks were independent; 'bkfs instant-restore --resume ${s.name}' starts it and goes on`,
      );
    }
    const remaining = s.disks.filter((d) => !d.independent);
    if (remaining.length > 0 && !hooks.exportAlive(s)) {
      hooks.onNotice?.(`the export of ${s.ref} stopped: restarting it`);
      await hooks.startExport(s);
    }
    if (st.state === 'paused' && /ioerror/i.test(st.reason)) {
      hooks.onNotice?.(`${s.name} was paused by an I/O error (export outage): resuming it`);
      await virsh(['resume', s.name], true);
    }
    const live = remaining.length > 0 ? (await virsh(['dumpxml', s.name])).out : '';
    const prog: InstantProgress['disks'] = [];
    for (const d of s.disks) {
      if (d.independent) {
        prog.push({ name: d.name, done: d.size, total: d.size, independent: true, job: false });
        continue;
      }
      const job = await blockJob(s.name, d.name);
      if (job) {
        failures.set(d.name, 0);
        pulled.set(d.name, true);
        const done = job.end > 0 ? Math.round((job.cur / job.end) * d.size) : 0;
        prog.push({ name: d.name, done, total: d.size, independent: false, job: true });
        continue;
      }
      if (!dependsOn(live, d.name, s.socket)) {
        d.independent = true;
        saveState(s);
        hooks.onNotice?.(`${d.name}: independent of the export (${d.overlay})`);
        prog.push({ name: d.name, done: d.size, total: d.size, independent: true, job: false });
        continue;
      }
      // No job and still on the export: start the pull (again, if one failed).
      const n = failures.get(d.name) ?? 0;
      if (pulled.get(d.name)) {
        if (n >= MAX_PULL_FAILURES) {
          throw new BkfsError(
            'RECOVERY_FAILED',
            `${d.name}: the copy failed ${n} times; the VM still runs from the export (see README "Instant recovery"; --resume retries)`,
          );
        }
        hooks.onNotice?.(`${d.name}: the copy ended before the disk was independent: starting it again`);
        failures.set(d.name, n + 1);
      }
      const args = ['blockpull', s.name, d.name];
      if (s.bandwidthMiB !== null) args.push('--bandwidth', String(s.bandwidthMiB));
      const r = await virsh(args, true);
      if (r.code !== 0) {
        failures.set(d.name, n + 1);
        hooks.onNotice?.(`${d.name}: virsh blockpull: ${lastLine(r.err)}`);
        if (n + 1 >= MAX_PULL_FAILURES)
          throw new BkfsError('RECOVERY_FAILED', `${d.name}: virsh blockpull failed: ${lastLine(r.err)}`);
      }
      pulled.set(d.name, true);
      prog.push({ name: d.name, done: 0, total: d.size, independent: false, job: r.code === 0 });
    }
    hooks.onProgress?.({
      name: s.name,
      phase: s.phase,
      done: prog.reduce((a, p) => a + p.done, 0),
      total: prog.reduce((a, p) => a + p.total, 0),
      disks: prog,
    });
    if (s.disks.every((d) => d.independent)) break;
    await sleep(pollMs);
  }
  // The persistent definition must not name the export either (libvirt may keep it there).
  const inactive = (await virsh(['dumpxml', '--inactive', s.name])).out;
  const fixed = independentDomainXml(inactive, s);
  const file = path.join(s.dir, 'domain.independent.xml');
  writeFileDurable(file, Buffer.from(fixed, 'utf8'), 0o600);
  await virsh(['define', file]);
  s.independentAt = new Date().toISOString();
  s.phase = 'independent';
  s.driver = null;
  saveState(s);
  if (hooks.exportAlive(s)) await hooks.stopExport(s);
  hooks.onNotice?.(`${s.name} no longer depends on the backup; the export is stopped`);
}

/** Live view for --status: the saved state plus libvirt's and the export's current state. */
export interface InstantStatus extends InstantState {
  domain: { state: string; reason: string } | null;
  exportRunning: boolean;
  progress: { name: string; done: number; total: number; independent: boolean; job: boolean }[];
}

export async function instantStatus(
  s: InstantState,
  exportAlive: (s: InstantState) => boolean,
): Promise<InstantStatus> {
  const domain = await domainState(s.name).catch(() => null);
  const progress: InstantStatus['progress'] = [];
  for (const d of s.disks) {
    if (d.independent) {
      progress.push({ name: d.name, done: d.size, total: d.size, independent: true, job: false });
      continue;
    }
    const job =
      domain && domain.state !== 'shut off' ? await blockJob(s.name, d.name).catch(() => null) : null;
    progress.push({
      name: d.name,
      done: job && job.end > 0 ? Math.round((job.cur / job.end) * d.size) : 0,
      total: d.size,
      independent: false,
      job: job !== null,
    });
  }
  return { ...s, domain, exportRunning: exportAlive(s), progress };
}
