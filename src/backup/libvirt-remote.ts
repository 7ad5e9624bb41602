/**
 * Where a pull-mode backup job lives: on this host (`LocalJobSite`) or on a remote hypervisor
 * reached with `qemu+ssh://` (`SshJobSite`). `libvirt.ts` drives both the same way.
 *
 * Remote route (ssh): virsh talks to the remote libvirtd through its own ssh transport; the job's
 * private directory (`bkfs-pull-*`, socket, scratch files, owner file) is made on the hypervisor
 * with one short ssh command; then ONE long-lived ssh process (the URI's user, host, port, keyfile,
 * known_hosts / no_verify) forwards a local unix socket in a private 0700 directory to the job's
 * NBD socket (`-L local:remote`) and runs the job guard on the hypervisor as its remote command.
 * The NBD data is thus encrypted and authenticated by ssh, and nothing but sshd needs to be
 * reachable on the hypervisor.
 *
 * The guard's stdin is the ssh channel: when bkfs dies (kill -9 included), ssh's stdin closes, the
 * channel gets EOF, and the guard on the hypervisor thaws the guest if frozen, ends the job (if it
 * is still ours), waits until libvirt has torn it down and removes the job directory. A dropped
 * connection closes the channel too (same cleanup on the hypervisor), and bkfs reports
 * REMOTE_FAILED. Should the guard not run at all, the next bkfs run finds the leftover job through
 * its owner file (read over ssh) and ends it, as locally.
 *
 * Other data paths (`NbdTransport` in libvirt-plan.ts): with --nbd-tls or --insecure-tcp the job's
 * NBD server listens on TCP on the hypervisor (TLS: x509 verified both ways) and the ssh guard
 * session forwards nothing (it prints `ready` once it runs). A qemu+tls:// or qemu+tcp:// URI has
 * no ssh at all (`DirectJobSite`): virsh uses libvirt's own transport, the job has no directory
 * (libvirt creates and removes its scratch files, named after a key that says which bkfs owns
 * it), and the guard runs on this host, ending the job through that libvirt connection.
 *
 * No state beyond the processes; every remote argument is shell-quoted.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BkfsError } from '../errors';
import { processAlive, run, waitExit } from '../util/proc';
import { createHash } from 'node:crypto';
import {
  OWNER_FILE,
  parseDirectUri,
  parseLibvirtUri,
  SOCKET_DIR_PREFIX,
  SOCKET_NAME,
  type DirectTarget,
  type SshTarget,
} from './libvirt-plan';
import { NbdClient } from '../nbd/client';
import { GUARD_SCRIPT, JobGuard, type Virsh } from './libvirt-virsh';

/** Longest unix socket path (sun_path is 108 bytes with its NUL). */
export const MAX_SOCKET_PATH = 107;

/** `host` or `user@host`, for messages. */
export function sshName(t: SshTarget): string {
  return `${t.user ? `${t.user}@` : ''}${t.host}${t.port ? `:${t.port}` : ''}`;
}

/**
 * ssh options and destination for `t` (no command). `control`: the control socket of a master
 * connection to reuse (one TCP connection and one authentication for everything bkfs does).
 */
export function sshArgs(t: SshTarget, control?: string): string[] {
  const a = control ? ['-S', control, '-o', 'ControlMaster=no'] : [];
  a.push('-T', '-o', 'BatchMode=yes', '-o', 'ServerAliveInterval=5', '-o', 'ServerAliveCountMax=3');
  if (t.port !== null) a.push('-p', String(t.port));
  if (t.user !== null) a.push('-l', t.user);
  if (t.keyfile !== null) a.push('-i', t.keyfile, '-o', 'IdentitiesOnly=yes');
  if (t.noVerify) {
    // libvirt's no_verify: accept any host key. Not storing it keeps a changed key from
    // disabling port forwarding (ssh does that for keys that differ from a stored one).
    a.push('-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR');
  } else if (t.knownHosts !== null) {
    a.push('-o', `UserKnownHostsFile=${t.knownHosts}`);
  }
  a.push('--', t.host);
  return a;
}

/** One shell word. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The remote command line running `script` with positional arguments `args`. */
export function remoteCommand(script: string, args: readonly string[]): string {
  return ['sh', '-c', shq(script), 'bkfs', ...args.map(shq)].join(' ');
}

function sshFailure(t: SshTarget, stderr: string): BkfsError {
  const line = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/^Warning: Permanently added/.test(l))
    .join(': ');
  return new BkfsError('REMOTE_FAILED', `cannot reach ${sshName(t)} over ssh: ${line || 'ssh failed'}`);
}

/** Run `script` on the hypervisor; ssh's own failures (exit 255) are REMOTE_FAILED. */
export async function sshRun(
  t: SshTarget,
  script: string,
  args: readonly string[] = [],
  control?: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const r = await run('ssh', [...sshArgs(t, control), remoteCommand(script, args)], {
    allowFail: true,
    timeoutMs: 120_000,
  });
  if (r.code === 255) throw sshFailure(t, r.stderr);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Job sites

export interface Guard {
  tell(what: 'frozen' | 'thawed'): void;
  disarm(): Promise<void>;
}

export interface JobOwner {
  pid: number;
  host: string;
  repo?: string;
}

export interface JobSite {
  readonly remote: SshTarget | null;
  /** Connect (remote: the ssh master connection); returns the URI virsh is to use. */
  open(uri: string | undefined): Promise<string | undefined>;
  /** Is `dir` a directory where the job may put its files (on the hypervisor)? */
  scratchIsDir(dir: string): Promise<boolean>;
  /**
   * Make the job's private directory in `scratch` (on the hypervisor), with the owner file, owned
   * by the QEMU user of `domain` (else of `image`). Returns its path on the hypervisor.
   */
  makeJobDir(scratch: string, domain: string, image: string | null, owner: JobOwner): Promise<string>;
  /** A local directory for the XML files given to virsh (virsh reads them on this host). */
  xmlDir(jobDir: string): string;
  /** The scratch file of disk `target` of the job (on the hypervisor). */
  scratchFile(jobDir: string, target: string): string;
  /**
   * Start the guard of the job `jobDir` (whose paths all contain `jobDir` + '/' or '.'); with
   * `forward`, the job's Unix socket, also return the socket bkfs's NBD client connects to.
   */
  startGuard(
    v: Virsh,
    domain: string,
    forward: string | null,
    jobDir: string,
  ): Promise<{ guard: Guard; socket: string | null }>;
  /** The owner file of a job directory, if readable. */
  readOwner(jobDir: string): Promise<JobOwner | undefined>;
  removeJobDir(jobDir: string): Promise<void>;
  /** Why the data path failed (the ssh connection dropped), or null. */
  dropped(): string | null;
  /** Release local resources (forwarding directory). */
  close(): Promise<void>;
}

function isJobDir(dir: string): boolean {
  return path.basename(dir).startsWith(SOCKET_DIR_PREFIX);
}

/** uid/gid of the domain's QEMU process (system libvirt), else of its first image; null: leave as is. */
function qemuOwner(domain: string, image: string | null): { uid: number; gid: number } | null {
  if (process.getuid?.() !== 0) return null;
  for (const dir of ['/run/libvirt/qemu', '/var/run/libvirt/qemu']) {
    try {
      const pid = fs.readFileSync(path.join(dir, `${domain}.pid`), 'utf8').trim();
      if (/^\d+$/.test(pid)) {
        const st = fs.statSync(`/proc/${pid}`);
        return { uid: st.uid, gid: st.gid };
      }
    } catch {
      // not this place
    }
  }
  if (image) {
    const st = fs.statSync(image, { throwIfNoEntry: false });
    if (st) return { uid: st.uid, gid: st.gid };
  }
  return null;
}

export class LocalJobSite implements JobSite {
  readonly remote = null;

  async open(uri: string | undefined): Promise<string | undefined> {
    return uri;
  }

  async scratchIsDir(dir: string): Promise<boolean> {
    return fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory() ?? false;
  }

  async makeJobDir(scratch: string, domain: string, image: string | null, owner: JobOwner): Promise<string> {
    const jobDir = fs.mkdtempSync(path.join(scratch, SOCKET_DIR_PREFIX));
    try {
      fs.writeFileSync(path.join(jobDir, OWNER_FILE), JSON.stringify(owner));
      const o = qemuOwner(domain, image);
      fs.chmodSync(jobDir, 0o700);
      if (o) fs.chownSync(jobDir, o.uid, o.gid);
    } catch (e) {
      fs.rmSync(jobDir, { recursive: true, force: true });
      throw e;
    }
    return jobDir;
  }

  xmlDir(jobDir: string): string {
    return jobDir;
  }

  scratchFile(jobDir: string, target: string): string {
    return path.join(jobDir, `${target}.qcow2`);
  }

  async startGuard(
    v: Virsh,
    domain: string,
    forward: string | null,
    jobDir: string,
  ): Promise<{ guard: Guard; socket: string | null }> {
    return {
      guard: JobGuard.start({ virsh: v, domain, socket: `${jobDir}/`, dir: jobDir }),
      socket: forward,
    };
  }

  async readOwner(jobDir: string): Promise<JobOwner | undefined> {
    try {
      return JSON.parse(fs.readFileSync(path.join(jobDir, OWNER_FILE), 'utf8')) as JobOwner;
    } catch {
      return undefined;
    }
  }

  async removeJobDir(jobDir: string): Promise<void> {
    if (isJobDir(jobDir)) fs.rmSync(jobDir, { recursive: true, force: true });
  }

  dropped(): string | null {
    return null;
  }

  async close(): Promise<void> {}
}

const MAKE_JOB_DIR = `
scratch=$1; dom=$2; img=$3; owner=$4
[ -d "$scratch" ] || { echo "no such directory: $scratch" >&2; exit 3; }
umask 077
dir=$(mktemp -d "$scratch/${SOCKET_DIR_PREFIX}XXXXXXXXXX") || exit 4
printf '%s\\n' "$owner" > "$dir/${OWNER_FILE}" || { rm -rf -- "$dir"; exit 4; }
if [ "$(id -u)" = 0 ]; then
  o=
  for d in /run/libvirt/qemu /var/run/libvirt/qemu; do
    if [ -z "$o" ] && [ -r "$d/$dom.pid" ]; then
      pid=$(cat "$d/$dom.pid"); o=$(stat -c %u:%g "/proc/$pid" 2>/dev/null)
    fi
  done
  if [ -z "$o" ] && [ -n "$img" ]; then o=$(stat -c %u:%g "$img" 2>/dev/null); fi
  if [ -n "$o" ]; then chown "$o" "$dir" || { rm -rf -- "$dir"; exit 4; }; fi
fi
printf '%s\\n' "$dir"
`;

/** Prefix of the local private directories holding a forwarded socket: `bkfs-fwd-<pid>-`. */
const FWD_PREFIX = 'bkfs-fwd-';

/** Remove forwarding directories of bkfs processes that are gone (killed -9). */
function removeStaleForwardDirs(base: string): void {
  let names: string[] = [];
  try {
    names = fs.readdirSync(base);
  } catch {
    return;
  }
  for (const n of names) {
    const m = new RegExp(`^${FWD_PREFIX}(\\d+)-`).exec(n);
    if (!m || processAlive(Number(m[1]))) continue;
    const p = path.join(base, n);
    const st = fs.lstatSync(p, { throwIfNoEntry: false });
    if (st?.isDirectory() && st.uid === process.getuid?.()) fs.rmSync(p, { recursive: true, force: true });
  }
}

/** The guard on the hypervisor, as the remote command of the forwarding ssh process. */
class SshGuard implements Guard {
  private closed = false;
  constructor(readonly child: ChildProcess) {}

  tell(what: 'frozen' | 'thawed'): void {
    if (!this.closed && this.child.stdin?.writable) this.child.stdin.write(`${what}\n`);
  }

  async disarm(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.stdin?.end('done\n');
    // The guard exits at once; ssh follows. A connection that hangs is cut after a while.
    const t = setTimeout(() => this.child.kill('SIGTERM'), 30_000);
    await waitExit(this.child);
    clearTimeout(t);
  }
}

export class SshJobSite implements JobSite {
  private fwdDir: string | undefined;
  private readonly images: RemoteImageSource[] = [];
  private master: ChildProcess | undefined;
  private droppedEarlier: string | null | undefined;
  private masterErr = '';
  private control: string | undefined;
  private child: ChildProcess | undefined;
  private stderr = '';
  private disarmed = false;

  constructor(readonly remote: SshTarget) {}

  /**
   * The master connection: `ssh -M` whose own session waits for EOF on its stdin (a pipe from
   * bkfs, so it ends when bkfs ends, kill -9 included). virsh reuses it through a two-line `ssh`
   * wrapper given as the URI's `command` parameter; bkfs's own ssh commands through `-S`.
   */
  async open(uri: string | undefined): Promise<string | undefined> {
    const dir = this.localDir();
    const control = path.join(dir, 'ctl');
    const master = spawn(
      'ssh',
      ['-M', '-S', control, '-o', 'ControlPersist=no', ...sshArgs(this.remote), 'cat >/dev/null'],
      { stdio: ['pipe', 'ignore', 'pipe'], detached: true },
    );
    this.master = master;
    master.stdin?.on('error', () => undefined);
    master.on('error', () => undefined);
    master.stderr?.on('data', (d: Buffer) => {
      if (this.masterErr.length < 4096) this.masterErr += d.toString();
    });
    for (let i = 0; !fs.existsSync(control); i++) {
      if (master.exitCode !== null || master.signalCode !== null)
        throw sshFailure(this.remote, this.masterErr);
      if (i > 2400) {
        master.kill('SIGTERM');
        throw new BkfsError('REMOTE_FAILED', `ssh to ${sshName(this.remote)} did not connect within 120 s`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    this.control = control;
    const wrapper = path.join(dir, 'ssh');
    fs.writeFileSync(wrapper, `#!/bin/sh\nexec ssh -S ${shq(control)} -o ControlMaster=no "$@"\n`, {
      mode: 0o700,
    });
    const u = uri ?? this.remote.uri;
    if (/[?&]command=/.test(u)) return u; // the user's own ssh command: leave it alone
    return `${u}${u.includes('?') ? '&' : '?'}command=${encodeURIComponent(wrapper)}`;
  }

  async scratchIsDir(dir: string): Promise<boolean> {
    const r = await sshRun(this.remote, '[ -d "$1" ]', [dir], this.control);
    return r.code === 0;
  }

  async makeJobDir(scratch: string, domain: string, image: string | null, owner: JobOwner): Promise<string> {
    const r = await sshRun(
      this.remote,
      MAKE_JOB_DIR,
      [scratch, domain, image ?? '', JSON.stringify(owner)],
      this.control,
    );
    const dir = r.stdout.trim();
    if (r.code !== 0 || !path.isAbsolute(dir) || !isJobDir(dir)) {
      throw new BkfsError(
        r.code === 3 ? 'USAGE' : 'REMOTE_FAILED',
        r.code === 3
          ? `--scratch-dir ${scratch} is not a directory on ${sshName(this.remote)}`
          : `cannot make the job directory in ${scratch} on ${sshName(this.remote)}: ${r.stderr.trim() || `exit ${r.code}`}`,
      );
    }
    return dir;
  }

  private localDir(): string {
    if (this.fwdDir === undefined) {
      const base = os.tmpdir();
      removeStaleForwardDirs(base);
      this.fwdDir = fs.mkdtempSync(path.join(base, `${FWD_PREFIX}${process.pid}-`));
      fs.chmodSync(this.fwdDir, 0o700);
    }
    return this.fwdDir;
  }

  xmlDir(): string {
    return this.localDir();
  }

  scratchFile(jobDir: string, target: string): string {
    return path.join(jobDir, `${target}.qcow2`);
  }

  async startGuard(
    _v: Virsh,
    domain: string,
    forward: string | null,
    jobDir: string,
  ): Promise<{ guard: Guard; socket: string | null }> {
    const local = forward !== null ? path.join(this.localDir(), SOCKET_NAME) : null;
    if (local !== null && local.length > MAX_SOCKET_PATH) {
      throw new BkfsError('USAGE', `socket path ${local} is too long: set TMPDIR to a shorter directory`);
    }
    const guardArgs = [domain, `${jobDir}/`, jobDir, '-c', this.remote.localUri];
    const args =
      local !== null
        ? [
            '-o',
            'ExitOnForwardFailure=yes',
            '-o',
            'StreamLocalBindUnlink=yes',
            '-o',
            'StreamLocalBindMask=0177',
            '-L',
            `${local}:${forward}`,
            ...sshArgs(this.remote, this.control),
            remoteCommand(GUARD_SCRIPT, guardArgs),
          ]
        : // No forwarding (the data goes over NBD+TCP): the guard says when it runs.
          [...sshArgs(this.remote, this.control), remoteCommand(`echo ready\n${GUARD_SCRIPT}`, guardArgs)];
    // Its own process group: a terminal's Ctrl-C leaves the cleanup to bkfs, as the local guard does.
    const child = spawn('ssh', args, {
      stdio: ['pipe', local !== null ? 'ignore' : 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
      detached: true,
    });
    let ready = false;
    child.stdout?.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) ready = true;
    });
    this.child = child;
    child.stdin?.on('error', () => undefined);
    child.on('error', () => undefined);
    child.stderr?.on('data', (d: Buffer) => {
      if (this.stderr.length < 4096) this.stderr += d.toString();
    });
    const guard = new SshGuard(child);
    // ssh listens on the local socket once the connection is up and the forward is set.
    for (let i = 0; ; i++) {
      if (local !== null ? fs.existsSync(local) : ready) break;
      if (child.exitCode !== null || child.signalCode !== null) {
        throw sshFailure(this.remote, this.stderr);
      }
      if (i > 1200) {
        child.kill('SIGTERM');
        throw new BkfsError('REMOTE_FAILED', `ssh to ${sshName(this.remote)} did not set up the forwarding`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    return {
      guard: {
        tell: (w) => guard.tell(w),
        disarm: async () => {
          // A drop seen now is still reported after the cleanup (the error reaches the caller
          // after this `finally` work).
          this.droppedEarlier ??= this.dropped();
          this.disarmed = true;
          await guard.disarm();
        },
      },
      socket: local,
    };
  }

  async readOwner(jobDir: string): Promise<JobOwner | undefined> {
    const r = await sshRun(this.remote, 'cat -- "$1/$2"', [jobDir, OWNER_FILE], this.control);
    if (r.code !== 0) return undefined;
    try {
      return JSON.parse(r.stdout) as JobOwner;
    } catch {
      return undefined;
    }
  }

  async removeJobDir(jobDir: string): Promise<void> {
    if (!isJobDir(jobDir)) return;
    await sshRun(this.remote, 'rm -rf -- "$1"', [jobDir], this.control);
  }

  /** A shut-off domain's image on the hypervisor, read through qemu-nbd there. */
  imageSource(image: string, domain: string, format: string, scratch: string): RemoteImageSource {
    const src = new RemoteImageSource(image, this.remote, domain, format, scratch, this.control);
    this.images.push(src);
    return src;
  }

  dropped(): string | null {
    if (this.droppedEarlier) return this.droppedEarlier;
    for (const i of this.images) {
      const d = i.dropped();
      if (d !== null) return d;
    }
    const m = this.master;
    if (m && this.control && !this.disarmed && (m.exitCode !== null || m.signalCode !== null)) {
      const why = this.masterErr
        .trim()
        .split('\n')
        .filter((l) => l !== '')
        .pop();
      return `the ssh connection to ${sshName(this.remote)} carrying the backup data dropped${why ? ` (${why})` : ''}`;
    }
    const c = this.child;
    if (!c || this.disarmed) return null;
    if (c.exitCode === null && c.signalCode === null) return null;
    const why = this.stderr
      .trim()
      .split('\n')
      .filter((l) => l !== '')
      .pop();
    return `the ssh connection to ${sshName(this.remote)} carrying the backup data dropped${why ? ` (${why})` : ''}`;
  }

  async close(): Promise<void> {
    for (const i of this.images) await i.close();
    const c = this.child;
    if (c && c.exitCode === null && c.signalCode === null) {
      c.kill('SIGTERM');
      await waitExit(c);
    }
    const m = this.master;
    if (m && m.exitCode === null && m.signalCode === null) {
      m.stdin?.end();
      const t = setTimeout(() => m.kill('SIGTERM'), 30_000);
      await waitExit(m);
      clearTimeout(t);
    }
    if (this.fwdDir !== undefined) fs.rmSync(this.fwdDir, { recursive: true, force: true });
  }
}

/** 8 hex digits naming this host in job keys of a `DirectJobSite`. */
function hostTag(): string {
  return createHash('sha256').update(os.hostname()).digest('hex').slice(0, 8);
}

/**
 * A hypervisor reached by libvirt's own TLS (or, with --insecure-tcp, TCP) transport: bkfs has no
 * shell there. The job has no directory of its own: its scratch files are created by libvirt in
 * the scratch directory (which must exist on the hypervisor) as `bkfs-pull-<pid>-<host>-<rand>.
 * <target>.qcow2` and removed by libvirt when the job ends; that prefix is the job's key and says
 * which bkfs process owns it. The guard runs on this host and ends the job through virsh over the
 * same libvirt connection when bkfs dies.
 */
export class DirectJobSite implements JobSite {
  readonly remote = null;
  private dir: string | undefined;

  constructor(readonly target: DirectTarget) {}

  async open(uri: string | undefined): Promise<string | undefined> {
    return uri ?? this.target.uri;
  }

  async scratchIsDir(): Promise<boolean> {
    return true; // unknown without a shell there: libvirt reports a missing directory itself
  }

  async makeJobDir(scratch: string): Promise<string> {
    return path.join(
      scratch,
      `${SOCKET_DIR_PREFIX}${process.pid}-${hostTag()}-${randomBytes(8).toString('hex')}`,
    );
  }

  xmlDir(): string {
    if (this.dir === undefined) {
      this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `${FWD_PREFIX}${process.pid}-`));
      fs.chmodSync(this.dir, 0o700);
    }
    return this.dir;
  }

  scratchFile(jobDir: string, target: string): string {
    return `${jobDir}.${target}.qcow2`;
  }

  async startGuard(
    v: Virsh,
    domain: string,
    _forward: string | null,
    jobDir: string,
  ): Promise<{ guard: Guard; socket: string | null }> {
    const local = this.xmlDir();
    return { guard: JobGuard.start({ virsh: v, domain, socket: `${jobDir}.`, dir: local }), socket: null };
  }

  async readOwner(jobDir: string): Promise<JobOwner | undefined> {
    const m = new RegExp(`${SOCKET_DIR_PREFIX}(\\d+)-([0-9a-f]{8})-`).exec(path.basename(jobDir));
    if (!m) return undefined;
    return { pid: Number(m[1]), host: m[2] === hostTag() ? os.hostname() : `host ${m[2]}` };
  }

  async removeJobDir(): Promise<void> {}

  dropped(): string | null {
    return null;
  }

  async close(): Promise<void> {
    if (this.dir !== undefined) fs.rmSync(this.dir, { recursive: true, force: true });
    this.dir = undefined;
  }
}

export function jobSiteFor(uri: string | undefined): JobSite {
  const d = parseDirectUri(uri);
  if (d !== null) return new DirectJobSite(d);
  const t = parseLibvirtUri(uri);
  return t === null ? new LocalJobSite() : new SshJobSite(t);
}

// ---------------------------------------------------------------------------------------------
// Shut-off remote domains

/**
 * On the hypervisor: a private directory, a read-only `qemu-nbd` of the image (declared format) on
 * a socket in it, serving until the ssh channel closes (bkfs done, killed, or the connection
 * dropped); then qemu-nbd is stopped and the directory removed.
 */
const SERVE_IMAGE = `
dir=$1; img=$2; fmt=$3
umask 077
mkdir -- "$dir" || exit 4
trap '' INT TERM HUP
qemu-nbd --read-only --persistent --shared=16 --cache=none --aio=threads "--format=$fmt" "--socket=$dir/${SOCKET_NAME}" -- "$img" 2>"$dir/err" &
pid=$!
i=0
while [ ! -S "$dir/${SOCKET_NAME}" ] && kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if [ -S "$dir/${SOCKET_NAME}" ]; then printf 'ready %s\\n' "$dir"; else printf 'failed %s\\n' "$(tr '\\n' ' ' < "$dir/err")"; fi
cat > /dev/null
kill $pid 2>/dev/null; wait $pid 2>/dev/null
rm -rf -- "$dir"
`;

/**
 * A disk image of a shut-off domain on a remote hypervisor, read through a read-only `qemu-nbd`
 * there (format as the domain XML declares it, like `OfflineImageSource`), over one ssh process
 * that forwards a local socket to it. Full/copy only (no bitmaps: libvirt owns change tracking).
 */
export class RemoteImageSource {
  private child: ChildProcess | undefined;
  private localDir: string | undefined;
  private socket: string | undefined;
  private stderr = '';

  constructor(
    readonly location: string,
    private readonly remote: SshTarget,
    private readonly domain: string,
    private readonly format: string,
    private readonly scratch: string,
    private readonly control?: string,
  ) {}

  private async start(): Promise<string> {
    if (this.socket !== undefined && this.child?.exitCode === null) return this.socket;
    const base = os.tmpdir();
    removeStaleForwardDirs(base);
    this.localDir = fs.mkdtempSync(path.join(base, `${FWD_PREFIX}${process.pid}-`));
    fs.chmodSync(this.localDir, 0o700);
    // A fresh random directory name (mkdir fails on an existing one), so the forward can be
    // set up by the same ssh process that starts qemu-nbd.
    const remoteDir = path.join(this.scratch, `${SOCKET_DIR_PREFIX}${randomBytes(8).toString('hex')}`);
    const local = path.join(this.localDir, SOCKET_NAME);
    const child = spawn(
      'ssh',
      [
        '-o',
        'ExitOnForwardFailure=yes',
        '-o',
        'StreamLocalBindUnlink=yes',
        '-o',
        'StreamLocalBindMask=0177',
        '-L',
        `${local}:${path.join(remoteDir, SOCKET_NAME)}`,
        ...sshArgs(this.remote, this.control),
        remoteCommand(SERVE_IMAGE, [remoteDir, this.location, this.format]),
      ],
      { stdio: ['pipe', 'pipe', 'pipe'], detached: true },
    );
    this.child = child;
    child.stdin?.on('error', () => undefined);
    child.on('error', () => undefined);
    child.stderr?.on('data', (d: Buffer) => {
      if (this.stderr.length < 4096) this.stderr += d.toString();
    });
    const line = await new Promise<string>((resolve) => {
      let buf = '';
      const onData = (d: Buffer) => {
        buf += d.toString();
        const nl = buf.indexOf('\n');
        if (nl >= 0) {
          child.stdout?.off('data', onData);
          resolve(buf.slice(0, nl));
        }
      };
      child.stdout?.on('data', onData);
      child.once('exit', () => resolve(buf));
    });
    if (!line.startsWith('ready ')) {
      await this.close();
      if (line.startsWith('failed ')) {
        throw new BkfsError(
          'EXTERNAL_TOOL',
          `qemu-nbd on ${sshName(this.remote)} cannot serve ${this.location}: ${line.slice(7).trim()}`,
        );
      }
      throw sshFailure(this.remote, this.stderr);
    }
    for (let i = 0; !fs.existsSync(local); i++) {
      if (child.exitCode !== null || i > 600) {
        await this.close();
        throw sshFailure(this.remote, this.stderr);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    this.socket = local;
    return local;
  }

  async probe(): Promise<{ size: number; format: string }> {
    const c = await NbdClient.connect({ socket: await this.start(), exportName: '' });
    try {
      return { size: c.size, format: this.format };
    } finally {
      await c.close();
    }
  }

  async dirtyBitmapFor(): Promise<string> {
    throw new BkfsError(
      'CHAIN_BROKEN',
      `domain '${this.domain}' is shut off: an incremental needs the running domain; start it`,
    );
  }

  async prepare(): Promise<string | null> {
    return null;
  }

  async open(): Promise<{ client: NbdClient; dirtyContext: null; close: () => Promise<void> }> {
    const client = await NbdClient.connect(
      { socket: await this.start(), exportName: '' },
      { metaContexts: ['base:allocation'] },
    );
    return { client, dirtyContext: null, close: () => client.close() };
  }

  async rollback(): Promise<void> {}
  async afterCommit(): Promise<void> {}

  /** Why the data path failed, or null. */
  dropped(): string | null {
    const c = this.child;
    if (!c || this.socket === undefined || (c.exitCode === null && c.signalCode === null)) return null;
    return `the ssh connection to ${sshName(this.remote)} carrying the backup data dropped`;
  }

  async close(): Promise<void> {
    const c = this.child;
    this.socket = undefined;
    if (c && c.exitCode === null && c.signalCode === null) {
      c.stdin?.end();
      const t = setTimeout(() => c.kill('SIGTERM'), 30_000);
      await waitExit(c);
      clearTimeout(t);
    }
    if (this.localDir !== undefined) fs.rmSync(this.localDir, { recursive: true, force: true });
    this.localDir = undefined;
  }
}
