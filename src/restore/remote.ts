/**
 * Remote restore: `bkfs restore VM@CP --connect qemu+ssh://[USER@]HOST/system --to DIR
 * [--define NAME]` writes the disks onto the hypervisor and defines the domain there.
 *
 * Route (the same as remote backups, `backup/libvirt-remote.ts`): one ssh master connection (the
 * URI's user, host, port, keyfile, known_hosts / no_verify); virsh reuses it. ONE more ssh process
 * runs the restore session script (`SESSION`) on the hypervisor and forwards one local unix socket
 * (in a private 0700 directory here) per disk to that disk's socket there. The script:
 *   - checks that the target files (and configuration files) do not exist (TARGET_EXISTS unless
 *     --force), creates DIR (0700, or 0711 with --define so that libvirt's QEMU user can reach the
 *     images, as locally), a private socket directory `DIR/.bkfs-restore-<random>` (0700);
 *   - creates each disk as `FILE.bkfs-partial` (`qemu-img create`, raw sparse or qcow2, 0600) and
 *     serves it writable with `qemu-nbd` on a socket in that directory, then says `ready`;
 *   - bkfs writes every disk through its forwarded socket with the restore engine's `copyRuns` (the
 *     same read path, hash checks and data-only writes into a fresh image as a local restore),
 *     flushes (qemu-nbd fsyncs) and disconnects;
 *   - on `commit` (after the configuration files, sent as base64 lines): stops the qemu-nbds,
 *     fsyncs, renames every partial file to its name, fsyncs DIR, says `committed`;
 *   - when its stdin ends without `commit` (bkfs failed, was interrupted or killed -9, or the ssh
 *     connection dropped): stops the qemu-nbds, removes the partial files, the socket directory and
 *     DIR if it made it. So an interrupted remote restore leaves nothing on the hypervisor; nothing
 *     existing is replaced before `commit`.
 * Then bkfs defines the domain with `virsh -c URI define` (the domain XML rewritten to the remote
 * paths, a new name drops the UUID and the MAC addresses, as locally).
 *
 * The data is encrypted and authenticated by ssh; nothing but sshd (and qemu-img/qemu-nbd, virsh's
 * libvirtd for --define) is needed on the hypervisor. Every remote argument is shell-quoted.
 * Core code: reports through `onProgress`/`onNotice`, never prints.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BkfsError, type ErrorCode } from '../errors';
import type { Repository } from '../repo/repository';
import { pinCheckpoints } from '../repo/pins';
import { CheckpointReader } from '../chain/reader';
import type { DiskRow } from '../index/catalog';
import {
  MAX_SOCKET_PATH,
  SshJobSite,
  remoteCommand,
  sshArgs,
  sshFailure,
  sshName,
} from '../backup/libvirt-remote';
import type { SshTarget } from '../backup/libvirt-plan';
import { Virsh } from '../backup/libvirt-virsh';
import { NbdClient } from '../nbd/client';
import { waitExit } from '../util/proc';
import { writeFilePrivate } from '../util/private-fs';
import { planRuns } from './plan';
import { NbdTarget, PARTIAL_SUFFIX } from './targets';
import {
  configFileName,
  copyDiskRuns,
  DEFAULT_CACHE_BYTES,
  DEFAULT_RUN_BYTES,
  dataBytes,
  DOMAIN_XML,
  planConfigs,
  stillThere,
  type CopyTuning,
  type DiskRestoreResult,
  type FileFormat,
  type RestoreProgress,
  type RestoreResult,
} from './engine';
import type { DiskRewrite } from './domain-xml';

export interface RemoteRestoreOptions extends CopyTuning {
  /** VM or VM@CHECKPOINT. */
  ref: string;
  /** The hypervisor: qemu+ssh://[USER@]HOST[:PORT]/system[?keyfile=…&known_hosts=…&no_verify=1]. */
  remote: SshTarget;
  /** Absolute path on the hypervisor: a directory (all disks), or a file (with `disk`). */
  to: string;
  disk?: string;
  format?: FileFormat;
  force?: boolean;
  /** Define the restored VM in the hypervisor's libvirt under this name. */
  define?: string;
  onProgress?: (p: RestoreProgress) => void;
  onNotice?: (msg: string) => void;
  signal?: AbortSignal;
}

/** Starts every line the session script prints (anything else on its stdout is ignored). */
const LINE_TAG = 'bkfs-restore-session: ';
/** Prefix of the session's socket directory inside the target directory. */
export const REMOTE_SESSION_PREFIX = '.bkfs-restore-';

/**
 * The restore session on the hypervisor. Arguments: SOCKDIR DIR DIRMODE(0700|0711) FORCE(0|1)
 * MKDIR(0|1) NDISKS, then NDISKS x (FILE FORMAT SIZE), then the configuration files' paths.
 * Protocol: stdout lines `ready`, `committed`, `error CODE MESSAGE` (each after `LINE_TAG`);
 * stdin lines `config INDEX BASE64`, `commit`, `done`.
 */
export const SESSION = `
trap '' INT TERM HUP
sockdir=$1; dir=$2; dmode=$3; force=$4; mk=$5; nd=$6; shift 6
say() { printf '${LINE_TAG}%s\\n' "$*"; }
created=0; pids=; committed=0; started=0
disks() { cb=$1; shift; i=0; while [ $i -lt $nd ]; do "$cb" $i "$1" "$2" "$3"; shift 3; i=$((i + 1)); done; }
configs() { cb=$1; shift; shift $((nd * 3)); i=0; for c in "$@"; do "$cb" $i "$c"; i=$((i + 1)); done; }
rm_partial() { rm -f -- "$2${PARTIAL_SUFFIX}"; }
rm_cpartial() { rm -f -- "$2${PARTIAL_SUFFIX}"; }
cleanup() {
  for p in $pids; do kill $p 2>/dev/null; done
  for p in $pids; do wait $p 2>/dev/null; done
  pids=
  if [ $committed = 0 ] && [ $started = 1 ]; then
    disks rm_partial "$@"; configs rm_cpartial "$@"
  fi
  [ $started = 1 ] && rm -rf -- "$sockdir"
  if [ $committed = 0 ] && [ $created = 1 ]; then rmdir -- "$dir" 2>/dev/null; fi
}
fail() { say "error $1 $2"; shift 2; cleanup "$@"; exit 1; }
for t in qemu-img qemu-nbd; do
  command -v $t >/dev/null 2>&1 || { say "error EXTERNAL_TOOL $t is not installed (install qemu-utils)"; exit 1; }
done
check() {
  if [ -L "$2" ] || { [ -e "$2" ] && [ ! -f "$2" ]; }; then say "error TARGET_INVALID $2 is not a regular file"; exit 1; fi
  if [ -e "$2" ] && [ "$force" != 1 ]; then say "error TARGET_EXISTS $2 exists (use --force to replace it)"; exit 1; fi
}
if [ -e "$dir" ] || [ -L "$dir" ]; then
  [ -d "$dir" ] || { say "error TARGET_INVALID $dir is not a directory"; exit 1; }
  disks check "$@"; configs check "$@"
  [ -w "$dir" ] || { say "error PERMISSION_DENIED cannot write into $dir: permission denied"; exit 1; }
elif [ "$mk" = 1 ]; then
  if [ "$dmode" = 0711 ]; then umask 066; else umask 077; fi
  mkdir -p -- "$dir" 2>/dev/null || { say "error TARGET_INVALID cannot create the directory $dir"; exit 1; }
  created=1
else
  say "error TARGET_INVALID $dir does not exist"; exit 1
fi
umask 077
mkdir -m 0700 -- "$sockdir" || fail EXTERNAL_TOOL "cannot create $sockdir" "$@"
started=1
serve() {
  [ $ok = 1 ] || return 0
  p="$2${PARTIAL_SUFFIX}"
  rm -f -- "$p"
  qemu-img create -q -f "$3" -- "$p" "$4" 2>"$sockdir/err" || { ok=0; return 0; }
  # The shell ignores INT/TERM/HUP (above); qemu-nbd gets the defaults back.
  (trap - INT TERM HUP; exec qemu-nbd "--format=$3" "--socket=$sockdir/$1.sock" --cache=writeback --aio=threads -- "$p" 2>"$sockdir/err.$1") &
  pids="$pids $!"
}
ok=1
disks serve "$@"
if [ $ok = 0 ]; then fail TARGET_INVALID "cannot create the image: $(tr '\\n' ' ' < "$sockdir/err")" "$@"; fi
sock_ready() { [ -S "$sockdir/$1.sock" ] || ready=0; }
n=0
while :; do
  ready=1; disks sock_ready "$@"
  [ $ready = 1 ] && break
  for p in $pids; do kill -0 $p 2>/dev/null || fail EXTERNAL_TOOL "qemu-nbd failed: $(cat "$sockdir"/err.* | tr '\\n' ' ')" "$@"; done
  n=$((n + 1)); [ $n -gt 600 ] && fail EXTERNAL_TOOL "qemu-nbd did not start within 60 s" "$@"
  sleep 0.1
done
say ready
stop_nbd() {
  for p in $pids; do
    n=0; while kill -0 $p 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    kill $p 2>/dev/null; wait $p 2>/dev/null
  done
  pids=
}
sync_file() { sync -- "$2${PARTIAL_SUFFIX}" || ok=0; }
commit_file() { mv -f -- "$2${PARTIAL_SUFFIX}" "$2" || ok=0; }
while IFS= read -r line; do
  case "$line" in
    config\\ *)
      rest=\${line#config }; idx=\${rest%% *}
      cfg() { [ "$1" = "$idx" ] && printf '%s' "\${rest#* }" | base64 -d > "$2${PARTIAL_SUFFIX}"; return 0; }
      configs cfg "$@" ;;
    commit)
      stop_nbd
      ok=1; disks sync_file "$@"; configs sync_file "$@"
      [ $ok = 1 ] || fail TARGET_INVALID "cannot sync the restored files in $dir" "$@"
      disks commit_file "$@"; configs commit_file "$@"
      [ $ok = 1 ] || fail TARGET_INVALID "cannot rename the restored files in $dir" "$@"
      sync -- "$dir"
      committed=1
      say committed ;;
    done) break ;;
  esac
done
cleanup "$@"
`;

/** The session script's side here: one ssh process (forwards + the script). */
class RemoteSession {
  private readonly lines: string[] = [];
  private waiters: (() => void)[] = [];
  private stderr = '';
  private buf = '';
  private ended = false;
  committed = false;

  private constructor(
    private readonly child: ChildProcess,
    private readonly remote: SshTarget,
    /** Local forwarded socket of each disk. */
    readonly sockets: string[],
  ) {
    child.stdin?.on('error', () => undefined);
    child.on('error', () => undefined);
    child.stderr?.on('data', (d: Buffer) => {
      if (this.stderr.length < 4096) this.stderr += d.toString();
    });
    child.stdout?.on('data', (d: Buffer) => {
      this.buf += d.toString();
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const l = this.buf.slice(0, nl);
        // Only the script's own lines (a shell start-up file on the host may print too).
        if (l.startsWith(LINE_TAG)) this.lines.push(l.slice(LINE_TAG.length));
        this.buf = this.buf.slice(nl + 1);
      }
      this.wake();
    });
    child.once('exit', () => {
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static start(
    remote: SshTarget,
    control: string | undefined,
    localDir: string,
    args: string[],
    remoteSockets: string[],
  ): RemoteSession {
    const sockets = remoteSockets.map((_, i) => path.join(localDir, `restore-${i}.sock`));
    const fwd: string[] = [];
    remoteSockets.forEach((r, i) => fwd.push('-L', `${sockets[i]}:${r}`));
    const child = spawn(
      'ssh',
      [
        '-o',
        'ExitOnForwardFailure=yes',
        '-o',
        'StreamLocalBindUnlink=yes',
        '-o',
        'StreamLocalBindMask=0177',
        ...fwd,
        ...sshArgs(remote, control),
        remoteCommand(SESSION, args),
      ],
      // Its own process group: a terminal's Ctrl-C leaves the cleanup to bkfs (stdin closing).
      { stdio: ['pipe', 'pipe', 'pipe'], detached: true, env: { ...process.env, LC_ALL: 'C' } },
    );
    return new RemoteSession(child, remote, sockets);
  }

  /** The next line of the script, or null when the ssh process ended. */
  async line(): Promise<string | null> {
    for (;;) {
      const l = this.lines.shift();
      if (l !== undefined) return l;
      if (this.ended) return null;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  /** Wait for `want`; the script's own errors keep their code, a vanished ssh is REMOTE_FAILED. */
  async expect(want: string): Promise<void> {
    const l = await this.line();
    if (l === want) return;
    if (l !== null) {
      const m = /^error (\S+) (.*)$/.exec(l);
      if (m) throw new BkfsError(m[1] as ErrorCode, `${sshName(this.remote)}: ${m[2]}`);
      throw new BkfsError('REMOTE_FAILED', `unexpected answer from ${sshName(this.remote)}: ${l}`);
    }
    throw this.droppedError();
  }

  droppedError(): BkfsError {
    const why = this.stderr
      .trim()
      .split('\n')
      .filter((l) => l !== '' && !/^Warning: Permanently added/.test(l))
      .pop();
    if (why && /Permission denied|Connection refused|Could not resolve|timed out|No route/i.test(why)) {
      return sshFailure(this.remote, this.stderr);
    }
    return new BkfsError(
      'REMOTE_FAILED',
      `the ssh connection to ${sshName(this.remote)} carrying the restore dropped${why ? ` (${why})` : ''}`,
    );
  }

  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  send(line: string): void {
    if (this.alive && this.child.stdin?.writable) this.child.stdin.write(`${line}\n`);
  }

  /** Wait until the local end of every forward listens (ssh binds them once connected). */
  async forwardsReady(): Promise<void> {
    for (let i = 0; !this.sockets.every((s) => fs.existsSync(s)); i++) {
      if (!this.alive) throw this.droppedError();
      if (i > 1200)
        throw new BkfsError('REMOTE_FAILED', `ssh to ${sshName(this.remote)} did not set up the forwarding`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /**
   * End the session: after `commit`, `done`; otherwise stdin just ends and the script cleans up.
   * Waits for the ssh process (the cleanup on the hypervisor is over when it exits).
   */
  async close(): Promise<void> {
    if (!this.alive) return;
    if (this.committed) this.child.stdin?.end('done\n');
    else this.child.stdin?.end();
    const t = setTimeout(() => this.child.kill('SIGTERM'), 60_000);
    await waitExit(this.child);
    clearTimeout(t);
  }
}

/** Paths on the hypervisor are POSIX and absolute; no newline (the session reads lines). */
function checkRemotePath(p: string, what: string): void {
  if (!path.posix.isAbsolute(p)) {
    throw new BkfsError('USAGE', `--to ${p}: with --connect, ${what} is an absolute path on the remote host`);
  }
  if (/[\n\r\0]/.test(p)) throw new BkfsError('USAGE', `--to: a path with a newline is not supported`);
}

interface RemoteJob {
  disk: DiskRow;
  kind: FileFormat;
  to: string;
}

async function connectForwarded(socket: string, s: RemoteSession): Promise<NbdClient> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      return await NbdClient.connect({ socket });
    } catch (e) {
      if (!s.alive) throw s.droppedError();
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** Restore a checkpoint onto a remote hypervisor (see the module comment). */
export async function runRemoteRestore(repo: Repository, o: RemoteRestoreOptions): Promise<RestoreResult> {
  const t0 = Date.now();
  const host = sshName(o.remote);
  checkRemotePath(o.to, o.disk !== undefined ? 'the file' : 'the directory');
  const to = path.posix.normalize(o.to).replace(/(.)\/+$/, '$1');
  const reader = CheckpointReader.open(repo, o.ref, {
    cacheBytes: o.cacheBytes ?? DEFAULT_CACHE_BYTES,
    readAheadBytes: 0,
  });
  const cpRef = `${reader.vm.name}@${reader.checkpoint.name}`;
  const { jobs, dir } = remoteJobs(reader, o, to);
  const configs = o.disk === undefined ? reader.configs() : [];
  if (o.define !== undefined && !configs.some((c) => configFileName(c.name) === DOMAIN_XML)) {
    throw new BkfsError(
      'NOT_FOUND',
      `${cpRef} has no saved ${DOMAIN_XML} to define (back up with --config ${DOMAIN_XML}=FILE)`,
    );
  }
  const sockDir = path.posix.join(dir, `${REMOTE_SESSION_PREFIX}${randomBytes(8).toString('hex')}`);
  const remoteSockets = jobs.map((_, i) => path.posix.join(sockDir, `${i}.sock`));
  if (remoteSockets.some((s) => Buffer.byteLength(s) > MAX_SOCKET_PATH)) {
    throw new BkfsError(
      'USAGE',
      `--to ${o.to} is too long: the restore's sockets in it would be longer than ${MAX_SOCKET_PATH} bytes`,
    );
  }

  const site = new SshJobSite(o.remote);
  let session: RemoteSession | undefined;
  const pin = pinCheckpoints(repo, [reader.checkpoint.id]);
  try {
    const virshUri = await site.open(o.remote.uri);
    const v = new Virsh(virshUri, o.remote.uri);
    const existingUuid = o.define !== undefined ? await existingDomain(v, o.define, host, o.force) : null;
    const diskMap: Record<string, DiskRewrite> = {};
    for (const j of jobs) diskMap[j.disk.name] = { path: j.to, format: j.kind };
    const cfg =
      o.disk === undefined
        ? planConfigs(dir, configs, diskMap, o.define, existingUuid ?? undefined)
        : { files: new Map<string, Buffer>(), domainXml: null, notes: [] };
    const cfgPaths = [...cfg.files.keys()];
    stillThere(repo, [reader.checkpoint], reader.vm.name);

    const args = [
      sockDir,
      dir,
      o.define !== undefined ? '0711' : '0700',
      o.force ? '1' : '0',
      o.disk === undefined ? '1' : '0',
      String(jobs.length),
      ...jobs.flatMap((j) => [j.to, j.kind, String(j.disk.virtual_size)]),
      ...cfgPaths,
    ];
    session = RemoteSession.start(o.remote, site.controlSocket, site.xmlDir(), args, remoteSockets);
    await session.expect('ready');
    await session.forwardsReady();

    const progress = { done: 0, total: 0 };
    for (const j of jobs) progress.total += dataBytes(repo, j.disk.id);
    const results: DiskRestoreResult[] = [];
    for (const [i, j] of jobs.entries()) {
      if (o.signal?.aborted) throw new BkfsError('INTERRUPTED', 'restore interrupted');
      results.push(await restoreDiskOver(reader, j, session, i, host, o, progress));
    }

    for (const n of cfg.notes) o.onNotice?.(n);
    cfgPaths.forEach((p, i) => session!.send(`config ${i} ${cfg.files.get(p)!.toString('base64')}`));
    session.send('commit');
    await session.expect('committed');
    session.committed = true;

    const defined =
      o.define !== undefined && cfg.domainXml
        ? await defineRemote(v, site, cfg.files.get(cfg.domainXml)!, cfg.domainXml, o.define, host)
        : null;
    return {
      vm: reader.vm.name,
      checkpoint: reader.checkpoint.name,
      since: null,
      disks: results,
      configs: cfgPaths.map((p) => `${host}:${p}`),
      domainXml: cfg.domainXml !== null ? `${host}:${cfg.domainXml}` : null,
      defined,
      durationMs: Date.now() - t0,
    };
  } finally {
    pin.release();
    // Without `commit`, the script removes the partial files; wait for it before reporting.
    await session?.close();
    await site.close();
  }
}

/** The disks to restore and the directory they go into (`--disk`: one file; else one per disk). */
function remoteJobs(
  reader: CheckpointReader,
  o: RemoteRestoreOptions,
  to: string,
): { jobs: RemoteJob[]; dir: string } {
  if (o.disk !== undefined) {
    if (o.define !== undefined)
      throw new BkfsError('USAGE', '--define needs a whole-VM restore into a directory (no --disk)');
    const kind = o.format ?? (/\.qcow2$/i.test(to) ? 'qcow2' : 'raw');
    return { jobs: [{ disk: reader.disk(o.disk), kind, to }], dir: path.posix.dirname(to) };
  }
  if (reader.disks.length === 0) throw new BkfsError('NOT_FOUND', 'the checkpoint has no disks');
  const kind = o.format ?? 'raw';
  const jobs = reader.disks.map((disk) => ({ disk, kind, to: path.posix.join(to, `${disk.name}.${kind}`) }));
  return { jobs, dir: to };
}

/** The UUID of the remote domain `name`, null when there is none; TARGET_EXISTS unless `force`. */
async function existingDomain(v: Virsh, name: string, host: string, force?: boolean): Promise<string | null> {
  const r = await v.tryRun(['-q', 'domuuid', name]);
  let uuid: string | null = null;
  if (r.code === 0) uuid = r.stdout.trim() || null;
  else {
    const e = v.error(['domuuid', name], r);
    if (e.code !== 'SOURCE_NOT_FOUND') throw e;
  }
  if (uuid !== null && !force) {
    throw new BkfsError(
      'TARGET_EXISTS',
      `libvirt on ${host} already has a domain named '${name}' (use --force to redefine it)`,
    );
  }
  return uuid;
}

/** Copy one disk into the remote qemu-nbd serving its target (socket `i` of the session). */
async function restoreDiskOver(
  reader: CheckpointReader,
  j: RemoteJob,
  session: RemoteSession,
  i: number,
  host: string,
  o: RemoteRestoreOptions,
  progress: { done: number; total: number },
): Promise<DiskRestoreResult> {
  const t1 = Date.now();
  const size = j.disk.virtual_size;
  const client = await connectForwarded(session.sockets[i]!, session);
  const where = `${host}:${j.to}`;
  if (client.readOnly || client.size < size) {
    await client.close().catch(() => undefined);
    throw new BkfsError('REMOTE_FAILED', `qemu-nbd on ${host} serves ${j.to} read-only or too small`);
  }
  const target = new NbdTarget(client, where, true, client.size);
  let ok = false;
  try {
    const runs = planRuns(reader.extents(j.disk.name), {
      size,
      maxRun: o.runBytes ?? DEFAULT_RUN_BYTES,
      zeros: false,
      fillGaps: false,
    });
    const st = await copyDiskRuns(reader, j.disk, target, runs, o, progress);
    await target.finish(); // NBD flush (qemu-nbd fsyncs the image), then disconnect
    ok = true;
    return {
      disk: j.disk.name,
      target: where,
      format: j.kind,
      virtualSize: size,
      bytesWritten: st.data,
      bytesZeroed: st.zero,
      holes: size - st.data,
      durationMs: Date.now() - t1,
    };
  } catch (e) {
    throw session.alive ? e : session.droppedError();
  } finally {
    if (!ok) await target.abort();
  }
}

/** `virsh define` of the restored domain XML (`remotePath` on the host) as `name`; returns the name. */
async function defineRemote(
  v: Virsh,
  site: SshJobSite,
  xml: Buffer,
  remotePath: string,
  name: string,
  host: string,
): Promise<string> {
  const local = path.join(site.xmlDir(), DOMAIN_XML);
  await writeFilePrivate(local, xml);
  const r = await v.tryRun(['-q', 'define', local]);
  if (r.code !== 0) {
    const e = v.error(['define'], r);
    throw new BkfsError(e.code, `${e.message} (the restored files are in place on ${host}: ${remotePath})`);
  }
  return name;
}
