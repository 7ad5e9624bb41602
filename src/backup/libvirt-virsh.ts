/**
 * Thin adapter over `virsh` (process spawning and error classification only; the decisions are in
 * `libvirt-plan.ts`, the XML in `libvirt-xml.ts`), plus the job guard.
 *
 * Every call is one short `virsh -c URI ...` process run with LC_ALL=C (bkfs reads a few English
 * words of `domjobinfo`); output is small and collected in memory. Failures become one-line
 * `BkfsError`s: a missing domain is SOURCE_NOT_FOUND, anything else EXTERNAL_TOOL with virsh's own
 * message.
 *
 * The guard is a tiny `sh` started before `backup-begin` that holds the read end of a pipe from
 * bkfs. bkfs tells it `frozen` / `thawed` and finally `done`. If bkfs dies without saying `done`
 * (SIGKILL, a crash, a second Ctrl-C), the pipe closes and the guard thaws the guest (if frozen),
 * ends the backup job if it is still the one bkfs started (matched by its socket), waits until
 * libvirt has torn it down, and removes the job directory (socket, scratch files). It ignores SIGINT/SIGTERM/SIGHUP so that a terminal's
 * Ctrl-C, which reaches the whole process group, leaves the cleanup to bkfs itself. Should the
 * guard be killed too, the next backup of the domain ends the leftover job (see `libvirt.ts`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { BkfsError } from '../errors';
import { run, waitExit, type RunResult } from '../util/proc';
import { virshError } from './libvirt-plan';

export class Virsh {
  /** `shownUri`: the URI for messages, when `uri` carries bkfs's own additions. */
  constructor(
    readonly uri: string | undefined,
    private readonly shownUri: string | undefined = uri,
  ) {}

  /** Arguments that select the connection (`-c URI`), for virsh and the guard. */
  get connectArgs(): string[] {
    return this.uri ? ['-c', this.uri] : [];
  }

  /** Run virsh; returns the result whatever the exit code. */
  tryRun(args: string[], timeoutMs = 120_000): Promise<RunResult> {
    return run('virsh', [...this.connectArgs, ...args], {
      allowFail: true,
      env: { ...process.env, LC_ALL: 'C' },
      timeoutMs,
    });
  }

  /** Run virsh; its stdout, or a one-line BkfsError. */
  async out(args: string[], timeoutMs?: number): Promise<string> {
    const r = await this.tryRun(args, timeoutMs);
    if (r.code !== 0) throw this.error(args, r);
    return r.stdout;
  }

  error(args: string[], r: RunResult): BkfsError {
    const msg = virshError(r.stderr || r.stdout);
    const cmd = args[0] ?? '';
    if (
      /failed to connect to the hypervisor|Failed to connect socket|End of file while reading data|Cannot recv data/i.test(
        msg,
      )
    ) {
      if (
        this.uri !== undefined &&
        /^[a-z0-9]+\+tls:/i.test(this.uri) &&
        /certificate|GnuTLS|TLS/i.test(msg)
      ) {
        return new BkfsError('TLS_FAILED', `TLS connection to libvirt at ${this.shownUri} failed: ${msg}`);
      }
      if (this.uri !== undefined && /^[a-z0-9]+\+(ssh|tls|tcp):/i.test(this.uri)) {
        return new BkfsError('REMOTE_FAILED', `cannot reach libvirt at ${this.shownUri}: ${msg}`);
      }
      return new BkfsError(
        'EXTERNAL_TOOL',
        `cannot connect to libvirt (${this.shownUri ?? 'default URI'}): ${msg} (is libvirtd running?)`,
      );
    }
    if (/failed to get domain|Domain not found|no domain with matching/i.test(msg)) {
      const dom = args[1] ?? '?';
      return new BkfsError('SOURCE_NOT_FOUND', `libvirt has no domain '${dom}' (see 'virsh list --all')`);
    }
    return new BkfsError('EXTERNAL_TOOL', `virsh ${cmd} failed: ${msg}`, { args, stderr: r.stderr });
  }
}

export interface GuardOptions {
  virsh: Virsh;
  domain: string;
  /** Socket of the job bkfs starts: the guard ends only that job. */
  socket: string;
  /** The job directory to remove. */
  dir: string;
}

/** The guard's shell script (also run on a remote hypervisor by `libvirt-remote.ts`). */
export const GUARD_SCRIPT = `
trap '' INT TERM HUP
dom=$1; sock=$2; dir=$3; shift 3
frozen=0
while IFS= read -r line; do
  case "$line" in
    done) exit 0 ;;
    frozen) frozen=1 ;;
    thawed) frozen=0 ;;
  esac
done
if [ "$frozen" = 1 ]; then virsh "$@" domfsthaw "$dom" >/dev/null 2>&1; fi
if virsh "$@" backup-dumpxml "$dom" 2>/dev/null | grep -qF "$sock"; then
  virsh "$@" domjobabort "$dom" >/dev/null 2>&1
  i=0
  while [ $i -lt 600 ] && ! virsh "$@" domjobinfo "$dom" 2>/dev/null | grep -q '^Job type: *None'; do
    sleep 0.2; i=$((i + 1))
  done
fi
rm -rf -- "$dir"
`;

/** The job guard (see the module comment). */
export class JobGuard {
  private closed = false;

  private constructor(private readonly child: ChildProcess) {}

  get pid(): number | undefined {
    return this.child.pid;
  }

  static start(o: GuardOptions): JobGuard {
    const child = spawn(
      'sh',
      ['-c', GUARD_SCRIPT, 'bkfs-job-guard', o.domain, o.socket, o.dir, ...o.virsh.connectArgs],
      { stdio: ['pipe', 'ignore', 'ignore'], env: { ...process.env, LC_ALL: 'C' } },
    );
    // A guard that died early must not crash bkfs with EPIPE; bkfs then cleans up by itself.
    child.stdin?.on('error', () => undefined);
    child.on('error', () => undefined);
    return new JobGuard(child);
  }

  tell(what: 'frozen' | 'thawed'): void {
    if (!this.closed && this.child.stdin?.writable) this.child.stdin.write(`${what}\n`);
  }

  /** bkfs cleaned up itself: the guard exits without doing anything. */
  async disarm(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.stdin?.end('done\n');
    await waitExit(this.child);
  }
}
