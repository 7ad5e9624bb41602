/**
 * Live backups of libvirt domains: one pull-mode backup job per checkpoint, read by the engine.
 *
 * Running domain (`backupLibvirt`):
 *   1. Read the domain (state, live and inactive XML); end a backup job a killed bkfs left behind
 *      (its socket lives in a `bkfs-pull-*` directory whose owner process is gone), refuse any
 *      other job.
 *   2. Resolve the level. An inc (diff) is relative to the libvirt checkpoint recorded with the
 *      chain's latest checkpoint (the chain's full). Before using it, libvirt and the repository
 *      must agree (`reconcileProblem`): the checkpoint exists, its bitmap on every disk exists and
 *      is consistent (`checkpoint-dumpxml --size` reports a size only then), no other tool made a
 *      checkpoint after it. Otherwise inc/diff stop with CHAIN_BROKEN and `auto` takes a full.
 *   3. Delete this repository's libvirt checkpoints that no checkpoint of the repository records
 *      (left by an interrupted backup); create a private job directory `bkfs-pull-*` in the
 *      scratch directory (default /var/tmp), owned by the QEMU user, for the NBD socket and the
 *      scratch files; start the job guard (`libvirt-virsh.ts`).
 *   4. Freeze the guest's filesystems through the guest agent (unless --no-freeze; without an
 *      agent: a note, crash-consistent), `virsh backup-begin` with `<domainbackup mode='pull'>`
 *      for all selected disks at once plus a `<domaincheckpoint>` named
 *      `bkfs-<checkpoint uid>` (a bitmap per qcow2 disk), thaw at once (also on failure).
 *   5. `runBackup` reads every disk over NBD from the job's socket (export = target name; dirty
 *      map `qemu:dirty-bitmap:<exportbitmap>` from `backup-dumpxml`) and commits the checkpoint
 *      with `libvirt_checkpoint` and the inactive domain XML as config `domain.xml`.
 *   6. End the job (`domjobabort`: libvirt removes the socket and scratch files), remove the
 *      job directory. On failure or interruption also delete the new libvirt checkpoint, so libvirt
 *      and the repository keep agreeing. After a new full, delete this VM's older libvirt
 *      checkpoints (each is a bitmap QEMU updates on every guest write).
 *
 * Shut-off domain: full or copy from the images (`OfflineImageSource`), no libvirt checkpoint;
 * inc/diff are refused (start the domain, or use `--disk NAME=IMAGE`), `auto` takes a full.
 *
 * Memory: that of `runBackup` (bounded read window); scratch files grow on disk by what the guest
 * writes during the job. Locking: the repository's writer lock is taken by `runBackup`; libvirt
 * allows one job per domain, which also keeps two bkfs processes from backing up one domain at
 * once. Core code: reports through `onNotice`/`onProgress`, never prints.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BkfsError, isBkfsError } from '../errors';
import type { Repository } from '../repo/repository';
import { checkName, checkpointDisks, findVm } from '../index/catalog';
import { processAlive } from '../util/proc';
import {
  chainPlan,
  newCheckpointUid,
  runBackup,
  type BackupOptions,
  type BackupResult,
  type DiskSpec,
} from './engine';
import {
  bkfsJobKey,
  chooseTransport,
  DEFAULT_NBD_PORTS,
  incrementalDisks,
  parseDirectUri,
  type NbdTransport,
  isLiveState,
  isNoAgentError,
  jobOperation,
  legacyPrefix,
  libvirtCheckpointName,
  nextCheckpointName,
  ownCheckpointsToDelete,
  parseLibvirtUri,
  reconcileProblem,
  selectDisks,
  SOCKET_NAME,
  virshError,
  type DiskSelection,
  type ResolvedLevel,
} from './libvirt-plan';
import { OfflineImageSource, PullSource } from './libvirt-source';
import { Virsh } from './libvirt-virsh';
import { loadClientTls } from '../nbd/tls';
import {
  DirectJobSite,
  jobSiteFor,
  MAX_SOCKET_PATH,
  SshJobSite,
  type Guard,
  type JobSite,
} from './libvirt-remote';
import {
  backupXml,
  checkpointXml,
  parseBackupJob,
  parseCheckpoint,
  parseDomain,
  type BackupJob,
  type DomainDisk,
  type DomainInfo,
  type LibvirtCheckpoint,
} from './libvirt-xml';

export interface LibvirtBackupOptions extends Pick<
  BackupOptions,
  | 'vm'
  | 'level'
  | 'checkpoint'
  | 'onProgress'
  | 'onNotice'
  | 'signal'
  | 'readSize'
  | 'readConcurrency'
  | 'workers'
> {
  /** libvirt domain name (or UUID). */
  domain: string;
  /** libvirt URI: local QEMU, or qemu+ssh:// to a remote hypervisor. Default: virsh's default. */
  connect?: string;
  /** Back up only these disk targets (comma-separated lists allowed). */
  disks?: string[];
  /** Leave these disk targets out. */
  exclude?: string[];
  /** Freeze guest filesystems through the guest agent around backup-begin (default true). */
  freeze?: boolean;
  /** Where the job's scratch files go (default /var/tmp). */
  scratchDir?: string;
  /** More configuration files to save with the checkpoint (domain.xml is added). */
  configs?: { name: string; data: Buffer }[];
  /**
   * Remote hypervisor: read the disks over NBD+TLS with the client certificates in this directory
   * (ca-cert.pem, client-cert.pem, client-key.pem) instead of the ssh-forwarded socket. The default
   * for qemu+tls:// URIs (then `?pkipath=DIR` serves too).
   */
  nbdTls?: string;
  /** Remote hypervisor: plain NBD over TCP (unencrypted, unauthenticated). Only when asked. */
  insecureTcp?: boolean;
  /** TCP ports bkfs may ask the hypervisor's NBD server to listen on (default 10809-10872). */
  nbdPorts?: { min: number; max: number };
}

export interface LibvirtBackupResult extends BackupResult {
  domain: string;
  /** Targets backed up. */
  disks: string[];
  skipped: { target: string; reason: string }[];
  /** The libvirt checkpoint made with this checkpoint (null: copy, or an offline domain). */
  libvirtCheckpoint: string | null;
  /** frozen: guest filesystems were frozen; crash-consistent: not; offline: domain shut off. */
  consistency: 'frozen' | 'crash-consistent' | 'offline';
}

const DEFAULT_SCRATCH_DIR = '/var/tmp';
/** How long a job may take to end after domjobabort before bkfs gives up (not a speed limit). */
const JOB_END_WAIT_MS = 120_000;

function checkAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new BkfsError('INTERRUPTED', 'backup interrupted');
}

function withoutAdvice(msg: string): string {
  return msg.replace(/: use --level full.*$/, '');
}

export async function backupLibvirt(repo: Repository, o: LibvirtBackupOptions): Promise<LibvirtBackupResult> {
  try {
    return await backupDomain(repo, o);
  } catch (e) {
    // A Ctrl-C also reaches the virsh child of the moment, which then fails: report the interrupt.
    if (o.signal?.aborted && !isBkfsError(e, 'INTERRUPTED')) {
      throw new BkfsError('INTERRUPTED', 'backup interrupted');
    }
    throw e;
  }
}

async function backupDomain(repo: Repository, o: LibvirtBackupOptions): Promise<LibvirtBackupResult> {
  checkName('VM', o.vm);
  if (o.checkpoint !== undefined) checkName('checkpoint', o.checkpoint);
  const direct = parseDirectUri(o.connect);
  const sshTarget = direct === null ? parseLibvirtUri(o.connect) : null;
  const transport = chooseTransport(direct ? direct.kind : sshTarget ? 'ssh' : 'local', {
    ...(o.nbdTls !== undefined ? { nbdTls: o.nbdTls } : {}),
    ...(o.insecureTcp ? { insecureTcp: true } : {}),
    pkipath: direct?.pkipath ?? null,
  });
  if (transport.kind === 'tls') loadClientTls(transport.certDir); // a bad directory: USAGE before anything runs
  const nbdHost = direct?.host ?? sshTarget?.host ?? '';
  if (o.configs?.some((c) => c.name === 'domain.xml')) {
    throw new BkfsError(
      'USAGE',
      'domain.xml is saved automatically with a libvirt backup; name the file differently',
    );
  }
  const site = jobSiteFor(o.connect);
  try {
    return await backupAt(repo, o, site, { transport, host: nbdHost });
  } catch (e) {
    // A broken data path shows as NBD or I/O errors: report the dropped connection itself.
    const dropped = site.dropped();
    if (dropped !== null && !isBkfsError(e, 'INTERRUPTED')) throw new BkfsError('REMOTE_FAILED', dropped);
    throw e;
  } finally {
    await site.close();
  }
}

/** The data path of the job and the hypervisor's address (its NBD server listens there). */
interface DataPath {
  transport: NbdTransport;
  host: string;
}

async function backupAt(
  repo: Repository,
  o: LibvirtBackupOptions,
  site: JobSite,
  dp: DataPath,
): Promise<LibvirtBackupResult> {
  const scratchRoot = scratchBase(o);
  const v = new Virsh(await site.open(o.connect), o.connect);
  // For a remote host, virsh first: it says whether the host is reachable at all.
  const state0 = site.remote ? await v.out(['domstate', o.domain]) : null;
  if (!(await site.scratchIsDir(scratchRoot))) {
    throw new BkfsError(
      'USAGE',
      `--scratch-dir ${scratchRoot} is not a directory${site.remote ? ` on ${site.remote.host}` : ''}`,
    );
  }
  const state = (state0 ?? (await v.out(['domstate', o.domain]))).trim();
  const inactiveXml = await v.out(['dumpxml', '--inactive', o.domain]);
  const configs = [...(o.configs ?? []), { name: 'domain.xml', data: Buffer.from(inactiveXml, 'utf8') }];
  checkAborted(o.signal);
  if (!isLiveState(state)) return offlineBackup(repo, o, parseDomain(inactiveXml), configs, site);

  const dom = parseDomain(await v.out(['dumpxml', o.domain]));
  await endLeftoverJob(v, o, site);
  checkAborted(o.signal);

  const want = o.level;
  let level: ResolvedLevel = want === 'auto' ? 'inc' : want;
  let incremental: string | null = null;
  if (level === 'inc' || level === 'diff') {
    try {
      incremental = await incrementalBase(repo, v, o, dom, level);
    } catch (e) {
      if (want !== 'auto' || !isBkfsError(e, 'CHAIN_BROKEN')) throw e;
      if (findVm(repo.db, o.vm)) o.onNotice?.(`${withoutAdvice(e.message)}; taking a full backup`);
      level = 'full';
    }
  }
  try {
    return await liveBackup(repo, v, site, dp, o, dom, level, incremental, configs);
  } catch (e) {
    // The engine's own checks (a disk's size changed, ...) for an auto run: a full instead.
    if (
      want === 'auto' &&
      level !== 'full' &&
      (isBkfsError(e, 'CHAIN_BROKEN') || isBkfsError(e, 'SIZE_CHANGED'))
    ) {
      o.onNotice?.(`${withoutAdvice(e.message)}; taking a full backup`);
      return liveBackup(repo, v, site, dp, o, dom, 'full', null, configs);
    }
    throw e;
  }
}

/** The libvirt checkpoint an inc/diff reads changes since; CHAIN_BROKEN when it cannot be trusted. */
async function incrementalBase(
  repo: Repository,
  v: Virsh,
  o: LibvirtBackupOptions,
  dom: DomainInfo,
  level: 'inc' | 'diff',
): Promise<string> {
  const plan = chainPlan(repo, o.vm, level);
  const parent = plan.parent;
  if (!parent) throw new BkfsError('CHAIN_BROKEN', `VM '${o.vm}' has no chain: use --level full`);
  const disks = incrementalDisks(dom.disks, choiceOf(o));
  if (parent.libvirt_checkpoint !== null && parent.libvirt_checkpoint !== libvirtCheckpointName(parent.uid)) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `libvirt checkpoint '${parent.libvirt_checkpoint}' of ${parent.name} was named by an older bkfs after the repository id, which every copy of the repository shares, so a copy may have re-created it: use --level full`,
    );
  }
  const checkpoints = await listCheckpoints(v, o.domain, parent.libvirt_checkpoint);
  const problem = reconcileProblem({
    domain: o.domain,
    parent: {
      name: parent.name,
      libvirtCheckpoint: parent.libvirt_checkpoint,
      disks: checkpointDisks(repo.db, parent.id).map((d) => d.name),
    },
    disks,
    checkpoints,
    own: new Set([...allLibvirtCheckpoints(repo), ...pendingLibvirtCheckpoints(repo)]),
  });
  if (problem !== null) throw new BkfsError('CHAIN_BROKEN', `${problem}: use --level full`);
  return parent.libvirt_checkpoint as string;
}

function choiceOf(o: LibvirtBackupOptions): { only?: string[]; exclude?: string[] } {
  return { ...(o.disks ? { only: o.disks } : {}), ...(o.exclude ? { exclude: o.exclude } : {}) };
}

/** Every checkpoint of the domain; sizes (bitmap health) only for `withSize`. */
async function listCheckpoints(
  v: Virsh,
  domain: string,
  withSize: string | null,
): Promise<LibvirtCheckpoint[]> {
  const names = await checkpointNames(v, domain);
  const out: LibvirtCheckpoint[] = [];
  for (const n of names) {
    const args = ['checkpoint-dumpxml', domain, n, '--no-domain'];
    let r = await v.tryRun(n === withSize ? [...args, '--size'] : args);
    // --size fails outright on some broken bitmaps: then read it without sizes (= broken).
    if (r.code !== 0 && n === withSize) r = await v.tryRun(args);
    if (r.code !== 0) {
      if (/not found|no domain checkpoint/i.test(r.stderr)) continue; // deleted meanwhile
      throw v.error(args, r);
    }
    out.push(parseCheckpoint(r.stdout));
  }
  return out;
}

async function checkpointNames(v: Virsh, domain: string): Promise<string[]> {
  const text = await v.out(['checkpoint-list', domain, '--name']);
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
}

/** Delete a libvirt checkpoint; when its bitmaps are broken, delete its metadata only. */
async function deleteCheckpoint(
  v: Virsh,
  domain: string,
  name: string,
  notice: (m: string) => void,
): Promise<void> {
  const r = await v.tryRun(['checkpoint-delete', domain, name]);
  if (r.code === 0) return;
  const m = await v.tryRun(['checkpoint-delete', domain, name, '--metadata']);
  if (m.code === 0) {
    notice(
      `libvirt could not delete checkpoint '${name}' with its bitmaps (${virshError(r.stderr)}); deleted its metadata only (leftover bitmaps stay in the images)`,
    );
    return;
  }
  if (/not found|no domain checkpoint/i.test(m.stderr)) return;
  throw v.error(['checkpoint-delete', domain, name], m);
}

async function backupJobOf(v: Virsh, domain: string): Promise<BackupJob | null> {
  const r = await v.tryRun(['backup-dumpxml', domain]);
  if (r.code !== 0) return null;
  return parseBackupJob(r.stdout);
}

/** End a pull-mode job that a killed bkfs left running; refuse any other running job. */
async function endLeftoverJob(v: Virsh, o: LibvirtBackupOptions, site: JobSite): Promise<void> {
  const op = jobOperation(await v.out(['domjobinfo', o.domain]));
  if (op === null) return;
  const job = op === 'Backup' ? await backupJobOf(v, o.domain) : null;
  if (!job) {
    throw new BkfsError(
      'SOURCE_IN_USE',
      `domain '${o.domain}' is busy with a libvirt job (${op}); try again later`,
    );
  }
  const key = bkfsJobKey(job);
  if (key === null) {
    throw new BkfsError(
      'SOURCE_IN_USE',
      `domain '${o.domain}' already has a backup job that bkfs did not start; if it is stale, end it with 'virsh domjobabort ${o.domain}'`,
    );
  }
  const owner = await site.readOwner(key);
  if (owner && owner.host === os.hostname() && owner.pid !== process.pid && processAlive(owner.pid)) {
    throw new BkfsError(
      'SOURCE_IN_USE',
      `domain '${o.domain}' is being backed up by bkfs (pid ${owner.pid})`,
    );
  }
  await abortJob(v, o.domain, key);
  await site.removeJobDir(key);
  o.onNotice?.(
    `ended the backup job of domain '${o.domain}' left by a bkfs that was killed${owner ? ` (pid ${owner.pid})` : ''}`,
  );
}

function noteSkipped(o: LibvirtBackupOptions, sel: DiskSelection): void {
  for (const s of sel.skipped) o.onNotice?.(`disk '${s.target}' is not backed up: ${s.reason}`);
}

function knownLibvirtCheckpoints(repo: Repository, exceptVm?: string): Set<string> {
  const rows = repo.db
    .prepare(
      `SELECT c.libvirt_checkpoint AS n FROM checkpoints c JOIN vms v ON v.id = c.vm_id
       WHERE c.libvirt_checkpoint IS NOT NULL AND c.state = 'complete' AND v.name != ?`,
    )
    .all(exceptVm ?? '') as { n: string }[];
  return new Set(rows.map((r) => r.n));
}

/** Every libvirt checkpoint recorded by this repository (any VM, any state). */
function allLibvirtCheckpoints(repo: Repository): Set<string> {
  const rows = repo.db
    .prepare('SELECT libvirt_checkpoint AS n FROM checkpoints WHERE libvirt_checkpoint IS NOT NULL')
    .all() as { n: string }[];
  return new Set(rows.map((r) => r.n));
}

/** Libvirt checkpoints recorded by this repository for VM `vm` (any state). */
function vmLibvirtCheckpoints(repo: Repository, vm: string): Set<string> {
  const rows = repo.db
    .prepare(
      `SELECT c.libvirt_checkpoint AS n FROM checkpoints c JOIN vms v ON v.id = c.vm_id
       WHERE c.libvirt_checkpoint IS NOT NULL AND v.name = ?`,
    )
    .all(vm) as { n: string }[];
  return new Set(rows.map((r) => r.n));
}

/**
 * Libvirt checkpoints this repository is creating: `meta` rows `pending-libvirt-checkpoint:<name>`
 * written before `backup-begin` and removed once the checkpoint is committed or deleted. A killed
 * bkfs leaves the row, so the next run knows the orphan is this repository's (its name, after a
 * fresh uid, says nothing of the repository).
 */
const PENDING_KEY = 'pending-libvirt-checkpoint:';

function pendingLibvirtCheckpoints(repo: Repository): Set<string> {
  const rows = repo.db
    .prepare('SELECT key FROM meta WHERE key >= ? AND key < ?')
    .all(PENDING_KEY, `${PENDING_KEY}\uffff`) as { key: string }[];
  return new Set(rows.map((r) => r.key.slice(PENDING_KEY.length)));
}

function markPending(repo: Repository, name: string, domain: string): void {
  repo.db
    .prepare('INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)')
    .run(
      `${PENDING_KEY}${name}`,
      JSON.stringify({ domain, pid: process.pid, time: new Date().toISOString() }),
    );
}

function clearPending(repo: Repository, name: string): void {
  repo.db.prepare('DELETE FROM meta WHERE key = ?').run(`${PENDING_KEY}${name}`);
}

async function liveBackup(
  repo: Repository,
  v: Virsh,
  site: JobSite,
  dp: DataPath,
  o: LibvirtBackupOptions,
  dom: DomainInfo,
  level: ResolvedLevel,
  incremental: string | null,
  configs: { name: string; data: Buffer }[],
): Promise<LibvirtBackupResult> {
  const notice = (m: string) => o.onNotice?.(m);
  const sel = selectDisks(dom.disks, level, true, choiceOf(o));
  noteSkipped(o, sel);
  const { name, uid, lvName } = await newLiveCheckpoint(repo, v, o, level, notice);
  checkAborted(o.signal);

  // One private directory holds the job's socket, scratch files and XML; QEMU owns it. On a
  // remote hypervisor it is made there, and the XML files virsh reads go to a local one.
  const jobDir = await site.makeJobDir(
    scratchBase(o),
    dom.name || o.domain,
    sel.selected[0]?.source ?? null,
    {
      pid: process.pid,
      host: os.hostname(),
      repo: repo.dir,
    },
  );
  const socket = path.join(jobDir, SOCKET_NAME);
  let guard: Guard | undefined;
  const state = { begun: false, committed: false };
  try {
    const tcp = dp.transport.kind === 'tls' || dp.transport.kind === 'tcp';
    if (!tcp && socket.length > MAX_SOCKET_PATH) {
      throw new BkfsError('USAGE', `socket path ${socket} is too long: choose a shorter --scratch-dir`);
    }
    const xml = new JobXml(site, jobDir, tcp ? dp : null, socket, incremental, dom, sel, o);
    const args = ['backup-begin', o.domain, xml.writeBackup()];
    if (lvName !== null) {
      args.push(
        xml.writeCheckpoint(lvName, `bkfs checkpoint ${o.vm}@${name} of repository ${repo.config.id}`),
      );
    }
    const started = await site.startGuard(v, o.domain, tcp ? null : socket, jobDir);
    guard = started.guard;
    const nbdSocket = started.socket ?? socket;

    const consistency = await beginJob(repo, v, o, guard, xml, args, lvName, state, notice);
    const job = await backupJobOf(v, o.domain);
    if (!job || bkfsJobKey(job) !== jobDir) {
      throw new BkfsError(
        'EXTERNAL_TOOL',
        `the backup job of domain '${o.domain}' is not the one bkfs started`,
      );
    }
    checkAborted(o.signal);
    const disks = pullSources(sel.selected, job, {
      socket: nbdSocket,
      tcp: tcp ? xml.port : null,
      dp,
      lvName,
    });
    const res = await runBackup(repo, {
      vm: o.vm,
      disks,
      level,
      checkpoint: name,
      configs,
      ...(lvName !== null ? { libvirtCheckpoint: lvName } : {}),
      uid,
      ...(o.onProgress ? { onProgress: o.onProgress } : {}),
      ...(o.onNotice ? { onNotice: o.onNotice } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
      ...(o.readSize ? { readSize: o.readSize } : {}),
      ...(o.readConcurrency ? { readConcurrency: o.readConcurrency } : {}),
      ...(o.workers ? { workers: o.workers } : {}),
    });
    state.committed = true;
    state.begun = false;
    if (lvName !== null) clearPending(repo, lvName);
    // The checkpoint is committed: a job that will not end is worth a note, not a failure.
    await endJob(v, o.domain, jobDir).catch((e: unknown) =>
      notice(`could not end the backup job: ${(e as Error).message} (run 'virsh domjobabort ${o.domain}')`),
    );
    if (level === 'full' && lvName !== null) await deleteOlderChain(repo, v, o, lvName, notice);
    return {
      ...res,
      domain: o.domain,
      disks: sel.selected.map((d) => d.target),
      skipped: sel.skipped,
      libvirtCheckpoint: lvName,
      consistency,
    };
  } finally {
    if (state.begun) {
      await endJob(v, o.domain, jobDir).catch((e: unknown) =>
        notice(`could not end the backup job: ${(e as Error).message} (run 'virsh domjobabort ${o.domain}')`),
      );
      if (!state.committed && lvName !== null) {
        await deleteCheckpoint(v, o.domain, lvName, notice)
          .then(() => clearPending(repo, lvName))
          .catch((e: unknown) =>
            notice(`could not delete libvirt checkpoint '${lvName}': ${(e as Error).message}`),
          );
      }
    }
    await site
      .removeJobDir(jobDir)
      .catch((e: unknown) => notice(`could not remove the job directory ${jobDir}: ${(e as Error).message}`));
    await guard?.disarm();
  }
}

/**
 * The new checkpoint's name (`--checkpoint` or the next free one), its uid and the libvirt
 * checkpoint it will create (none for a copy). Orphan libvirt checkpoints of this repository are
 * deleted first; a libvirt name another VM of the repository records is BAD_NAME.
 */
async function newLiveCheckpoint(
  repo: Repository,
  v: Virsh,
  o: LibvirtBackupOptions,
  level: ResolvedLevel,
  notice: (m: string) => void,
): Promise<{ name: string; uid: string; lvName: string | null }> {
  const vm = findVm(repo.db, o.vm);
  const names = vm
    ? (repo.db.prepare('SELECT name FROM checkpoints WHERE vm_id = ?').all(vm.id) as { name: string }[]).map(
        (r) => r.name,
      )
    : [];
  const name = o.checkpoint ?? nextCheckpointName(names);
  if (names.includes(name))
    throw new BkfsError('BAD_NAME', `VM '${o.vm}' already has a checkpoint named '${name}'`);
  const uid = newCheckpointUid();
  const lvName = level === 'copy' ? null : libvirtCheckpointName(uid);
  const known = await deleteOrphanCheckpoints(repo, v, o.domain, notice);
  if (lvName !== null && known.has(lvName)) {
    throw new BkfsError(
      'BAD_NAME',
      `libvirt checkpoint '${lvName}' is used by another VM of this repository: give --checkpoint NAME`,
    );
  }
  return { name, uid, lvName };
}

/**
 * The XML files `virsh backup-begin` reads: the backup job (pull mode, its NBD server on the
 * job's socket or, over TCP, on a port picked from `--nbd-ports`, rewritten with the next port when
 * that one is taken) and the libvirt checkpoint it creates.
 */
class JobXml {
  port = 0;
  private readonly ports: PortPicker;
  private readonly dir: string;
  private readonly selected: Set<string>;

  constructor(
    private readonly site: JobSite,
    private readonly jobDir: string,
    private readonly tcp: DataPath | null,
    private readonly socket: string,
    private readonly incremental: string | null,
    private readonly dom: DomainInfo,
    sel: DiskSelection,
    o: LibvirtBackupOptions,
  ) {
    this.ports = new PortPicker(o.nbdPorts ?? DEFAULT_NBD_PORTS);
    this.dir = site.xmlDir(jobDir);
    this.selected = new Set(sel.selected.map((d) => d.target));
  }

  /** Another port to try, when there is one. */
  morePorts(): boolean {
    return this.tcp !== null && this.ports.more();
  }

  /** (Re)write the backup XML, over TCP with the next port; returns its path. */
  writeBackup(): string {
    const tcp = this.tcp;
    if (tcp !== null) this.port = this.ports.next();
    const file = path.join(this.dir, 'backup.xml');
    const xml = backupXml(
      tcp !== null ? { host: tcp.host, port: this.port, tls: tcp.transport.kind === 'tls' } : this.socket,
      this.incremental,
      this.dom.disks.map((d) =>
        this.selected.has(d.target)
          ? { name: d.target, scratch: this.site.scratchFile(this.jobDir, d.target) }
          : { name: d.target },
      ),
    );
    fs.writeFileSync(file, xml);
    return file;
  }

  /** Write the checkpoint XML (a bitmap on every selected qcow2 disk); returns its path. */
  writeCheckpoint(lvName: string, description: string): string {
    const file = path.join(this.dir, 'checkpoint.xml');
    fs.writeFileSync(
      file,
      checkpointXml(
        lvName,
        description,
        this.dom.disks.map((d) => ({
          name: d.target,
          bitmap: this.selected.has(d.target) && d.format === 'qcow2',
        })),
      ),
    );
    return file;
  }
}

/**
 * Freeze the guest's file systems (unless `--no-freeze`), `virsh backup-begin` (over TCP, the next
 * port while the hypervisor says the one tried is in use), thaw. `state.begun` is set before the
 * job can exist, so the caller ends it and deletes its libvirt checkpoint on failure. Returns the
 * consistency of what the job reads.
 */
async function beginJob(
  repo: Repository,
  v: Virsh,
  o: LibvirtBackupOptions,
  guard: Guard,
  xml: JobXml,
  args: string[],
  lvName: string | null,
  state: { begun: boolean },
  notice: (m: string) => void,
): Promise<'frozen' | 'crash-consistent'> {
  const fz = o.freeze === false ? { frozen: false, thaw: false } : await freeze(v, o.domain, guard, notice);
  try {
    checkAborted(o.signal);
    state.begun = true;
    if (lvName !== null) markPending(repo, lvName, o.domain);
    for (;;) {
      const r = await v.tryRun(args);
      if (r.code === 0) break;
      // Another program holds the port on the hypervisor: the next one of the range.
      if (!xml.morePorts() || !/address already in use|Failed to bind socket|EADDRINUSE/i.test(r.stderr)) {
        throw v.error(args, r);
      }
      xml.writeBackup();
    }
  } finally {
    if (fz.thaw && (await thaw(v, o.domain, notice))) guard.tell('thawed');
  }
  return fz.frozen ? 'frozen' : 'crash-consistent';
}

/**
 * Delete the libvirt checkpoints of this repository that no checkpoint records: left by an
 * interrupted backup (its checkpoint row still 'running', or named the bkfs 0.1 way). Those of
 * other repositories, copies of this one included, are never touched: their chains need them.
 * Returns the libvirt checkpoints the repository's checkpoints record.
 */
async function deleteOrphanCheckpoints(
  repo: Repository,
  v: Virsh,
  domain: string,
  notice: (m: string) => void,
): Promise<Set<string>> {
  const known = knownLibvirtCheckpoints(repo);
  const existing = await checkpointNames(v, domain);
  const pending = pendingLibvirtCheckpoints(repo);
  for (const n of pending) if (known.has(n) || !existing.includes(n)) clearPending(repo, n);
  const orphans = new Set([
    ...ownCheckpointsToDelete(existing, legacyPrefix(repo.config.id), known),
    ...[...pending].filter((n) => existing.includes(n) && !known.has(n)),
  ]);
  for (const n of orphans) {
    await deleteCheckpoint(v, domain, n, notice);
    clearPending(repo, n);
    notice(
      `deleted libvirt checkpoint '${n}' of domain '${domain}': no checkpoint of the repository uses it`,
    );
  }
  return known;
}

/**
 * After a committed full (`lvName` its libvirt checkpoint): a new chain, so this VM's older
 * libvirt checkpoints serve no inc/diff any more; deleted (a failure is a notice).
 */
async function deleteOlderChain(
  repo: Repository,
  v: Virsh,
  o: LibvirtBackupOptions,
  lvName: string,
  notice: (m: string) => void,
): Promise<void> {
  const keep = knownLibvirtCheckpoints(repo, o.vm);
  keep.add(lvName);
  const names = await checkpointNames(v, o.domain);
  const old = new Set([
    ...ownCheckpointsToDelete(names, legacyPrefix(repo.config.id), keep),
    ...[...vmLibvirtCheckpoints(repo, o.vm)].filter((n) => names.includes(n) && !keep.has(n)),
  ]);
  for (const n of old) {
    await deleteCheckpoint(v, o.domain, n, notice).catch((e: unknown) =>
      notice(`could not delete old libvirt checkpoint '${n}': ${(e as Error).message}`),
    );
  }
}

/**
 * The backup job's NBD exports as the engine's disk sources: over the job's Unix socket, or over
 * TCP (`at.tcp`: the port bkfs asked for, unless the job reports another) with TLS when the data
 * path has it.
 */
function pullSources(
  selected: readonly DomainDisk[],
  job: BackupJob,
  at: { socket: string; tcp: number | null; dp: DataPath; lvName: string | null },
): DiskSpec[] {
  const { dp, lvName } = at;
  return selected.map((d) => {
    const jd = job.disks.find((x) => x.name === d.target);
    return {
      name: d.target,
      source: new PullSource({
        socket: at.socket,
        ...(at.tcp !== null
          ? {
              tcp: {
                host: dp.host,
                port: job.tcp?.port ?? at.tcp,
                ...(dp.transport.kind === 'tls' ? { tls: { certDir: dp.transport.certDir } } : {}),
              },
            }
          : {}),
        target: d.target,
        exportName: jd?.exportName ?? d.target,
        exportBitmap: jd?.exportBitmap ?? null,
        incremental: job.incremental,
        newCheckpoint: lvName !== null && d.format === 'qcow2' ? lvName : null,
        location: d.source ?? d.target,
        format: d.format ?? 'raw',
      }),
    };
  });
}

function scratchBase(o: LibvirtBackupOptions): string {
  return path.resolve(o.scratchDir ?? DEFAULT_SCRATCH_DIR);
}

/** End our job (key `jobDir`) if it still runs (a failed backup-begin may have left none). */
async function endJob(v: Virsh, domain: string, jobDir: string): Promise<void> {
  const job = await backupJobOf(v, domain);
  if (!job || bkfsJobKey(job) !== jobDir) return;
  await abortJob(v, domain, jobDir);
}

/** Ports of the range in a random order (two bkfs processes rarely try the same one first). */
class PortPicker {
  private readonly order: number[];
  private i = 0;
  constructor(range: { min: number; max: number }) {
    const n = range.max - range.min + 1;
    const start = Math.floor(Math.random() * n);
    this.order = Array.from({ length: Math.min(n, 16) }, (_, k) => range.min + ((start + k) % n));
  }
  next(): number {
    return this.order[this.i++ % this.order.length]!;
  }
  more(): boolean {
    return this.i < this.order.length;
  }
}

/**
 * `domjobabort`, then wait until the job is really gone: libvirt returns while QEMU still tears
 * the job's block jobs down, and a checkpoint cannot be deleted (nor a new job begun) until then.
 */
async function abortJob(v: Virsh, domain: string, key: string | null): Promise<void> {
  const r = await v.tryRun(['domjobabort', domain]);
  const deadline = Date.now() + JOB_END_WAIT_MS;
  for (;;) {
    // Gone when libvirt reports no job at all (backup-dumpxml may fail while it tears down).
    const info = await v.tryRun(['domjobinfo', domain]);
    if (info.code === 0 && jobOperation(info.stdout) === null) return;
    const job = await backupJobOf(v, domain);
    if (job && bkfsJobKey(job) !== key) return; // ours ended, another began
    if (Date.now() > deadline) {
      throw r.code !== 0
        ? v.error(['domjobabort', domain], r)
        : new BkfsError(
            'EXTERNAL_TOOL',
            `the backup job of domain '${domain}' did not end after 'virsh domjobabort'`,
          );
    }
    await new Promise((res) => setTimeout(res, 100));
  }
}

/**
 * Freeze guest filesystems through the guest agent. Failure is a note, not an error; `thaw` says
 * whether a thaw is due (also after a failure that may have frozen part of the guest).
 */
async function freeze(
  v: Virsh,
  domain: string,
  guard: Guard,
  notice: (m: string) => void,
): Promise<{ frozen: boolean; thaw: boolean }> {
  guard.tell('frozen'); // first: virsh may freeze the guest and still fail (a timeout)
  const r = await v.tryRun(['domfsfreeze', domain], 60_000);
  if (r.code === 0) return { frozen: true, thaw: true };
  if (isNoAgentError(r.stderr)) {
    guard.tell('thawed');
    notice(
      `domain '${domain}' has no guest agent: the backup is crash-consistent (install qemu-guest-agent in the guest to freeze its filesystems)`,
    );
    return { frozen: false, thaw: false };
  }
  notice(
    `could not freeze the filesystems of domain '${domain}' (${virshError(r.stderr)}): the backup is crash-consistent`,
  );
  return { frozen: false, thaw: true };
}

async function thaw(v: Virsh, domain: string, notice: (m: string) => void): Promise<boolean> {
  for (let i = 0; i < 3; i++) {
    const r = await v.tryRun(['domfsthaw', domain], 60_000);
    if (r.code === 0) return true;
    if (isNoAgentError(r.stderr) || /not frozen/i.test(r.stderr)) return true;
    if (i === 2)
      notice(
        `could not thaw the filesystems of domain '${domain}': ${virshError(r.stderr)} (run 'virsh domfsthaw ${domain}')`,
      );
  }
  return false;
}

async function offlineBackup(
  repo: Repository,
  o: LibvirtBackupOptions,
  dom: DomainInfo,
  configs: { name: string; data: Buffer }[],
  site: JobSite,
): Promise<LibvirtBackupResult> {
  if (o.level === 'inc' || o.level === 'diff') {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `domain '${o.domain}' is shut off: a${o.level === 'inc' ? 'n inc' : ' diff'} needs the running domain (libvirt checkpoints); start it, use --level full, or back up the images with --disk NAME=IMAGE`,
    );
  }
  if (site instanceof DirectJobSite) {
    // Its image paths name files on the hypervisor, which bkfs cannot read without ssh (and must
    // never read on this host instead).
    throw new BkfsError(
      'USAGE',
      `domain '${o.domain}' is shut off: bkfs reads the images of a shut-off remote domain through ssh only; use --connect qemu+ssh://, or start the domain`,
    );
  }
  const level = o.level === 'auto' ? 'full' : o.level;
  if (o.level === 'auto') {
    o.onNotice?.(
      `domain '${o.domain}' is shut off: taking a full backup of its images, without a libvirt checkpoint (start the domain for incremental backups)`,
    );
  }
  const sel = selectDisks(dom.disks, level, false, choiceOf(o));
  noteSkipped(o, sel);
  const res = await runBackup(repo, {
    vm: o.vm,
    disks: sel.selected.map((d) => ({
      name: d.target,
      source:
        site instanceof SshJobSite
          ? site.imageSource(d.source as string, o.domain, d.format ?? 'raw', scratchBase(o))
          : new OfflineImageSource(d.source as string, o.domain, d.format),
    })),
    level,
    ...(o.checkpoint !== undefined ? { checkpoint: o.checkpoint } : {}),
    configs,
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.onNotice ? { onNotice: o.onNotice } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
    ...(o.readSize ? { readSize: o.readSize } : {}),
    ...(o.readConcurrency ? { readConcurrency: o.readConcurrency } : {}),
    ...(o.workers ? { workers: o.workers } : {}),
  });
  return {
    ...res,
    domain: o.domain,
    disks: sel.selected.map((d) => d.target),
    skipped: sel.skipped,
    libvirtCheckpoint: null,
    consistency: 'offline',
  };
}
