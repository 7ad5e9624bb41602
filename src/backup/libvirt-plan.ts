/**
 * Decisions of a libvirt backup, as pure functions (unit-tested in `test/unit/libvirt-plan.test.ts`):
 * which disks to back up, how bkfs names and recognises its own libvirt checkpoints, whether
 * libvirt's checkpoints and the repository agree well enough for an inc/diff, which checkpoints
 * to delete, and how to read virsh's answers. `libvirt.ts` runs virsh and applies them.
 *
 * No I/O, no state, no locking; inputs are small lists (disks, checkpoints).
 */
import { BkfsError } from '../errors';
import type { DomainDisk, LibvirtCheckpoint } from './libvirt-xml';

// ---------------------------------------------------------------------------------------------
// Names

/**
 * Prefix of every libvirt checkpoint made by bkfs, whatever the repository. Each is named after the
 * uid of its bkfs checkpoint (`bkfs-<uid>`, also the qcow2 bitmap's name), so copies of a
 * repository never make checkpoints of the same name. bkfs 0.1 named them
 * `bkfs-<repo id>-<checkpoint>` (`legacyPrefix`), names every copy shares.
 */
export const BKFS_PREFIX = 'bkfs-';

/** Prefix of the libvirt checkpoints bkfs 0.1 made for repository `repoId`. */
export function legacyPrefix(repoId: string): string {
  return `bkfs-${repoId}-`;
}

/** The libvirt checkpoint of the bkfs checkpoint with uid `uid` (also the qcow2 bitmap's name). */
export function libvirtCheckpointName(uid: string): string {
  return `${BKFS_PREFIX}${uid}`;
}

/** The name `runBackup` would give the next checkpoint (check1, check2, ...), given all names. */
export { nextCheckpointNameOf as nextCheckpointName } from './engine';

/** Name of the private directory of a pull-mode job (socket, scratch files), and its socket. */
export const SOCKET_DIR_PREFIX = 'bkfs-pull-';
export const SOCKET_NAME = 'nbd.sock';
/** File in the job directory naming the bkfs process that owns the job. */
export const OWNER_FILE = 'owner.json';

/** Is `socket` the socket of a pull-mode job started by bkfs (any repository)? */
export function isBkfsSocket(socket: string | null): boolean {
  return socket !== null && new RegExp(`/${SOCKET_DIR_PREFIX}[^/]+/${SOCKET_NAME}$`).test(socket);
}

/**
 * The key of a pull-mode job started by bkfs, or null for any other job: the job directory
 * (`.../bkfs-pull-X`, holding the socket and/or the scratch files), or for a job on a hypervisor
 * reached without ssh (no directory of its own) the prefix of its scratch files
 * (`.../bkfs-pull-X.<target>.qcow2`). Every path of the job contains its key followed by '/' or '.'.
 */
export function bkfsJobKey(job: {
  socket: string | null;
  disks: readonly { scratch: string | null }[];
}): string | null {
  if (isBkfsSocket(job.socket)) return (job.socket as string).slice(0, -(SOCKET_NAME.length + 1));
  for (const d of job.disks) {
    if (d.scratch === null) continue;
    const m =
      new RegExp(`^(.*/${SOCKET_DIR_PREFIX}[^/]+)/[^/]+$`).exec(d.scratch) ??
      new RegExp(`^(.*/${SOCKET_DIR_PREFIX}[^/.]+)\\.[^/]+\\.qcow2$`).exec(d.scratch);
    if (m) return m[1]!;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// The NBD data path of a remote backup

/**
 * How the disk data of a pull-mode job reaches bkfs:
 * - unix: a local job's Unix socket;
 * - ssh: the job's Unix socket forwarded through bkfs's ssh connection (default for qemu+ssh);
 * - tls: NBD over TCP with TLS, x509 certificates both ways (libvirt `<server transport='tcp'
 *   tls='yes'>`; default for qemu+tls, or --nbd-tls DIR);
 * - tcp: plain NBD over TCP, only with --insecure-tcp.
 */
export type NbdTransport =
  { kind: 'unix' } | { kind: 'ssh' } | { kind: 'tls'; certDir: string } | { kind: 'tcp' };

/** Default TCP port range for a job's NBD server on the hypervisor (a firewall must let it in). */
export const DEFAULT_NBD_PORTS = { min: 10809, max: 10872 };

export function parsePortRange(s: string): { min: number; max: number } {
  const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(s.trim());
  const min = Number(m?.[1]);
  const max = Number(m?.[2] ?? m?.[1]);
  if (!m || min < 1 || max > 65535 || min > max) {
    throw new BkfsError('USAGE', `--nbd-ports '${s}': expected PORT or MIN-MAX (1-65535)`);
  }
  return { min, max };
}

/**
 * The data path for a connection of `kind` (see `remoteKind`). USAGE for contradictions and for
 * plain TCP that was not asked for.
 */
export function chooseTransport(
  kind: 'local' | 'ssh' | 'tls' | 'tcp',
  o: { nbdTls?: string; insecureTcp?: boolean; pkipath?: string | null },
): NbdTransport {
  if (o.nbdTls !== undefined && o.insecureTcp) {
    throw new BkfsError('USAGE', '--nbd-tls and --insecure-tcp exclude each other');
  }
  if (kind === 'local') {
    if (o.nbdTls !== undefined || o.insecureTcp) {
      throw new BkfsError(
        'USAGE',
        `${o.insecureTcp ? '--insecure-tcp' : '--nbd-tls'} is for a remote hypervisor (--connect qemu+ssh:// or qemu+tls://)`,
      );
    }
    return { kind: 'unix' };
  }
  if (kind === 'tcp' && !o.insecureTcp) {
    throw new BkfsError(
      'USAGE',
      '--connect qemu+tcp:// sends libvirt commands and the disk contents unencrypted and unauthenticated: use qemu+ssh:// or qemu+tls://, or give --insecure-tcp if that is really wanted',
    );
  }
  if (o.insecureTcp) return { kind: 'tcp' };
  if (o.nbdTls !== undefined) return { kind: 'tls', certDir: o.nbdTls };
  if (kind === 'ssh') return { kind: 'ssh' };
  if (o.pkipath) return { kind: 'tls', certDir: o.pkipath };
  throw new BkfsError(
    'USAGE',
    '--connect qemu+tls://: give the client certificates for NBD over TLS with --nbd-tls DIR (ca-cert.pem, client-cert.pem, client-key.pem) or ?pkipath=DIR in the URI',
  );
}

// ---------------------------------------------------------------------------------------------
// Connection URIs

/** An ssh destination taken from a `qemu+ssh://[user@]host[:port]/system?...` URI. */
export interface SshTarget {
  /** The URI itself (for messages). */
  uri: string;
  user: string | null;
  host: string;
  port: number | null;
  keyfile: string | null;
  knownHosts: string | null;
  noVerify: boolean;
  /** The URI libvirt uses on the hypervisor itself (`qemu:///system`). */
  localUri: string;
}

/** A hypervisor reached by libvirt's own TLS or TCP transport (no ssh). */
export interface DirectTarget {
  uri: string;
  kind: 'tls' | 'tcp';
  host: string;
  /** `?pkipath=DIR` of a qemu+tls URI (libvirt's client certificates), or null. */
  pkipath: string | null;
}

/**
 * A qemu+tls:// or qemu+tcp:// URI (a hypervisor without ssh), or null for any other URI (then
 * see `parseLibvirtUri`).
 */
export function parseDirectUri(
  uri: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): DirectTarget | null {
  const u = uri ?? env.LIBVIRT_DEFAULT_URI;
  if (u === undefined || u === '') return null;
  const m = /^qemu\+(tls|tcp):\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?/i.exec(u);
  if (!m) return null;
  const am = /^(?:[^@]+@)?(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(m[2] ?? '');
  if (!am) throw new BkfsError('USAGE', `--connect ${u}: no host in the URI`);
  const params = new URLSearchParams(m[4] ?? '');
  return {
    uri: u,
    kind: (m[1] ?? '').toLowerCase() as 'tls' | 'tcp',
    host: (am[1] ?? '').replace(/^\[|\]$/g, ''),
    pkipath: params.get('pkipath'),
  };
}

/**
 * The ssh target of a libvirt URI, or null for a local URI (qemu:///system, qemu+unix://...).
 * USAGE for what bkfs does not back up from (other drivers, tls/tcp transports for now).
 */
export function parseLibvirtUri(
  uri: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): SshTarget | null {
  const u = uri ?? env.LIBVIRT_DEFAULT_URI;
  if (u === undefined || u === '') return null;
  const m = /^([a-z0-9+]+):\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?/i.exec(u);
  if (!m) throw new BkfsError('USAGE', `--connect: '${u}' is not a libvirt URI (e.g. qemu:///system)`);
  const scheme = (m[1] ?? '').toLowerCase();
  const authority = m[2] ?? '';
  const [driver, transport] = scheme.split('+');
  if (driver !== 'qemu') {
    throw new BkfsError('USAGE', `--connect ${u}: bkfs backs up QEMU domains only (qemu:///system)`);
  }
  if (transport === undefined || transport === 'unix') {
    if (authority !== '') {
      throw new BkfsError('USAGE', `--connect ${u}: a remote host needs qemu+ssh://[USER@]HOST/system`);
    }
    return null;
  }
  if (transport !== 'ssh') {
    throw new BkfsError(
      'USAGE',
      `--connect ${u}: bkfs reaches remote hypervisors through ssh only (qemu+ssh://[USER@]HOST/system); '${transport}' is not supported`,
    );
  }
  const am = /^(?:([^@]+)@)?(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(authority);
  if (!am) throw new BkfsError('USAGE', `--connect ${u}: no host in the URI`);
  const params = new URLSearchParams(m[4] ?? '');
  const pathPart = m[3] && m[3] !== '/' ? m[3] : '/system';
  return {
    uri: u,
    user: am[1] ? decodeURIComponent(am[1]) : null,
    host: (am[2] ?? '').replace(/^\[|\]$/g, ''),
    port: am[3] ? Number(am[3]) : null,
    keyfile: params.get('keyfile'),
    knownHosts: params.get('known_hosts'),
    noVerify: params.get('no_verify') === '1',
    localUri: `qemu://${pathPart}`,
  };
}

/** Check a --connect URI of a backup (see `parseLibvirtUri`; qemu+tls/qemu+tcp too). */
export function checkConnectUri(uri: string | undefined, env: NodeJS.ProcessEnv = process.env): void {
  if (parseDirectUri(uri, env) === null) parseLibvirtUri(uri, env);
}

// ---------------------------------------------------------------------------------------------
// Disk selection

export type ResolvedLevel = 'full' | 'inc' | 'diff' | 'copy';

export interface DiskChoice {
  only?: readonly string[];
  exclude?: readonly string[];
}

export interface DiskSelection {
  selected: DomainDisk[];
  /** Disks left out, with the reason (a note for the user). */
  skipped: { target: string; reason: string }[];
}

/** Why `d` cannot be backed up at `level` (live: through a pull-mode job), or null. */
export function unbackupable(d: DomainDisk, level: ResolvedLevel, live: boolean): string | null {
  if (d.device === 'cdrom' || d.device === 'floppy') return `a ${d.device}`;
  if (d.source === null) return 'has no source (empty drive)';
  if (d.readonly) return 'read-only';
  if (d.shareable) return 'shareable (other VMs write it; it has no consistent point in time)';
  if (d.transient) return 'transient (its changes are discarded)';
  if (!live && d.type !== 'file' && d.type !== 'block') {
    return `a ${d.type} disk, which bkfs opens only through the running domain`;
  }
  if ((level === 'inc' || level === 'diff') && d.format !== 'qcow2') {
    return `${d.format ?? 'raw'}, which has no dirty bitmaps: back it up with --level full or copy`;
  }
  return null;
}

function splitList(v: readonly string[] | undefined): string[] {
  return (v ?? [])
    .flatMap((s) => s.split(','))
    .map((s) => s.trim())
    .filter((s) => s !== '');
}

/**
 * The disks to back up. `only` (--disks) names disks that must be backed up: one that cannot be
 * is an error. Without `only`, every disk is taken except the `exclude`d ones and those that cannot
 * be backed up at this level, which are skipped with a reason. Unknown names are errors.
 */
export function selectDisks(
  disks: readonly DomainDisk[],
  level: ResolvedLevel,
  live: boolean,
  choice: DiskChoice = {},
): DiskSelection {
  const only = splitList(choice.only);
  const exclude = splitList(choice.exclude);
  const names = new Set(disks.map((d) => d.target));
  for (const n of [...only, ...exclude]) {
    if (!names.has(n)) {
      throw new BkfsError(
        'USAGE',
        `the domain has no disk '${n}' (it has: ${[...names].join(', ') || 'none'})`,
      );
    }
  }
  const selected: DomainDisk[] = [];
  const skipped: { target: string; reason: string }[] = [];
  for (const d of disks) {
    if (exclude.includes(d.target)) {
      skipped.push({ target: d.target, reason: 'excluded' });
      continue;
    }
    if (only.length > 0 && !only.includes(d.target)) continue;
    const why = unbackupable(d, level, live);
    if (why !== null) {
      if (only.includes(d.target)) {
        throw new BkfsError(
          'USAGE',
          `disk '${d.target}' cannot be backed up at level ${level}: it is ${why}`,
        );
      }
      skipped.push({ target: d.target, reason: why });
      continue;
    }
    selected.push(d);
  }
  if (selected.length === 0) {
    throw new BkfsError(
      'USAGE',
      `no disk of the domain can be backed up at level ${level}${skipped.length ? ` (${skipped.map((s) => `${s.target}: ${s.reason}`).join('; ')})` : ''}`,
    );
  }
  return { selected, skipped };
}

/**
 * The disks an inc/diff reads changes of: the selected qcow2 disks. Raw disks are left out (a
 * note at backup time), unless named in --disks; CHAIN_BROKEN when none is left or a named disk
 * has no bitmaps, so that `auto` can take a full instead.
 */
export function incrementalDisks(disks: readonly DomainDisk[], choice: DiskChoice = {}): string[] {
  const sel = selectDisks(disks, 'full', true, choice);
  const only = splitList(choice.only);
  const raw = sel.selected.find((d) => d.format !== 'qcow2' && only.includes(d.target));
  if (raw) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `disk '${raw.target}' is ${raw.format ?? 'raw'}, which has no dirty bitmaps: use --level full`,
    );
  }
  const out = sel.selected.filter((d) => d.format === 'qcow2').map((d) => d.target);
  if (out.length === 0) {
    throw new BkfsError(
      'CHAIN_BROKEN',
      'no disk of the domain is qcow2, so none has dirty bitmaps: use --level full',
    );
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Checkpoint reconciliation

export interface ReconcileInput {
  domain: string;
  /** The bkfs checkpoint an inc/diff is relative to (inc: the chain's latest, diff: the full). */
  parent: { name: string; libvirtCheckpoint: string | null; disks: readonly string[] };
  /** Target names of the disks to back up (all qcow2). */
  disks: readonly string[];
  /** Every checkpoint of the domain, with `--size` information. */
  checkpoints: readonly LibvirtCheckpoint[];
  /**
   * The libvirt checkpoints this repository made (recorded with any of its checkpoints). Any other
   * one, a copy of this repository's included, is another tool's.
   */
  own: ReadonlySet<string>;
}

/**
 * Why an inc/diff relative to `parent` cannot be trusted, or null when libvirt and the repository
 * agree: the parent's libvirt checkpoint exists, covers every disk with a bitmap that exists and is
 * consistent (libvirt reports a size only then), and no other tool made a checkpoint after it
 * (bkfs cannot know what that tool does with its checkpoints and their bitmaps, e.g. redefining
 * or deleting checkpoints with `--metadata`, so the chain's history is no longer bkfs's alone).
 * The reasons end without advice; the caller adds ': use --level full'.
 */
export function reconcileProblem(i: ReconcileInput): string | null {
  const lv = i.parent.libvirtCheckpoint;
  if (lv === null) {
    return `checkpoint ${i.parent.name} has no libvirt checkpoint (it was taken while domain '${i.domain}' was shut off, or from image files)`;
  }
  const cp = i.checkpoints.find((c) => c.name === lv);
  if (!cp) {
    return `libvirt checkpoint '${lv}' of ${i.parent.name} is missing from domain '${i.domain}' (deleted, or the domain was redefined)`;
  }
  for (const disk of i.disks) {
    if (!i.parent.disks.includes(disk)) {
      return `disk '${disk}' is not in checkpoint ${i.parent.name} (a new disk needs a full backup)`;
    }
    const d = cp.disks.find((x) => x.name === disk);
    if (!d || d.checkpoint !== 'bitmap') {
      return `disk '${disk}' is not tracked by libvirt checkpoint '${lv}'`;
    }
    if (d.size === null) {
      return `the dirty bitmap '${d.bitmap ?? lv}' of disk '${disk}' is missing or broken in domain '${i.domain}' (libvirt checkpoint '${lv}')`;
    }
  }
  const after = foreignAfter(i.checkpoints, cp, i.own);
  if (after) {
    return `checkpoint '${after.name}' of domain '${i.domain}' was made by another tool after bkfs's '${lv}'`;
  }
  return null;
}

/**
 * A checkpoint not made by this repository that came after `cp`: a descendant of it in libvirt's
 * checkpoint tree, or, unless it is an ancestor, one created in the same second or later.
 */
function foreignAfter(
  all: readonly LibvirtCheckpoint[],
  cp: LibvirtCheckpoint,
  own: ReadonlySet<string>,
): LibvirtCheckpoint | undefined {
  const byName = new Map(all.map((c) => [c.name, c]));
  const ancestors = (c: LibvirtCheckpoint): Set<string> => {
    const seen = new Set<string>();
    let p = c.parent;
    while (p !== null && !seen.has(p)) {
      seen.add(p);
      p = byName.get(p)?.parent ?? null;
    }
    return seen;
  };
  const before = ancestors(cp);
  return all.find(
    (c) =>
      c.name !== cp.name &&
      !own.has(c.name) &&
      (ancestors(c).has(cp.name) || (!before.has(c.name) && c.creationTime >= cp.creationTime)),
  );
}

/**
 * This repository's checkpoints among `names` that must go: those not in `keep` (orphans left by
 * an interrupted backup, and, after a new full, the VM's older chains). Checkpoints of other tools
 * and other repositories are never touched.
 */
export function ownCheckpointsToDelete(
  names: readonly string[],
  prefix: string,
  keep: ReadonlySet<string>,
): string[] {
  return names.filter((n) => n.startsWith(prefix) && !keep.has(n));
}

// ---------------------------------------------------------------------------------------------
// virsh output

/** `Operation:` of `virsh domjobinfo` (e.g. 'Backup'), or null when no job runs. */
export function jobOperation(domjobinfo: string): string | null {
  const type = /^Job type:\s*(\S+)/m.exec(domjobinfo)?.[1];
  if (!type || type === 'None') return null;
  return /^Operation:\s*(.+?)\s*$/m.exec(domjobinfo)?.[1] ?? 'Unknown';
}

/** Live states in which QEMU runs (a pull-mode job is possible); 'shut off' is offline. */
export function isLiveState(domstate: string): boolean {
  const s = domstate.trim().toLowerCase();
  return s !== 'shut off' && s !== 'shutoff' && s !== '';
}

/** Does a `virsh domfsfreeze` failure mean the domain has no usable guest agent? */
export function isNoAgentError(stderr: string): boolean {
  return /guest agent is not (configured|connected|responding|available)|agent is not (connected|responding)|QEMU guest agent/i.test(
    stderr,
  );
}

/** virsh's error message (lines starting 'error: '), on one line. */
export function virshError(stderr: string): string {
  const lines = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .map((l) => l.replace(/^error:\s*/, ''));
  return lines.join(': ') || '(no output)';
}
