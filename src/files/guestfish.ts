/**
 * One libguestfs appliance per bkfs command, driven through a single `guestfish --ro` process:
 * commands are written to its stdin one line each, every command followed by `echo <marker>`, and
 * its stdout and stderr arrive merged in one pipe, so each command's output and errors are the text
 * between two markers (guestfish flushes stdout after every command). Commands are prefixed with
 * `-` so that an error does not end the session; errors are recognised by guestfish's
 * `*stdin*:LINE: libguestfs: error:` prefix. Launching the appliance costs 3-50 s (KVM vs TCG);
 * each later command about 1 ms.
 *
 * Arguments are double-quoted with every control byte, `"` and `\` escaped, so any guest file name
 * (spaces, quotes, newlines, UTF-8) reaches libguestfs unchanged. Optional arguments (`name:value`)
 * are bkfs' own words and are passed unquoted.
 *
 * Lifetime: the process is a ChildProcess of this one and is stopped by PID; when this process dies
 * guestfish sees EOF on stdin and exits, and libguestfs' recovery process kills the appliance's
 * QEMU. Environment: LIBGUESTFS_BACKEND defaults to `direct` (no libvirt needed);
 * LIBGUESTFS_BACKEND_SETTINGS=force_tcg (or `tcg: true`) avoids KVM where nested KVM hangs.
 * Memory: one command's output until its marker; bulk data (listings, file contents) goes through
 * host files or FIFOs instead.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BkfsError } from '../errors';
import { stopChild } from '../util/proc';

export interface GuestfishOptions {
  /** Add `force_tcg` to LIBGUESTFS_BACKEND_SETTINGS (software emulation; no KVM). */
  tcg?: boolean;
  env?: NodeJS.ProcessEnv;
  signal?: AbortSignal;
}

/** An optional argument `name:value`, passed unquoted. */
export interface OptArg {
  opt: string;
}

export type Arg = string | OptArg;

export interface CommandResult {
  output: string;
  /** The libguestfs error message, when the command failed. */
  error?: string;
}

/** Quote one argument for a guestfish command line. */
export function quoteArg(s: string): string {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0) as number;
    if (ch === '"' || ch === '\\') out += `\\${ch}`;
    else if (c < 0x20 || c === 0x7f) out += `\\x${c.toString(16).padStart(2, '0')}`;
    else out += ch;
  }
  return out + '"';
}

export function commandLine(cmd: string, args: readonly Arg[]): string {
  return [cmd, ...args.map((a) => (typeof a === 'string' ? quoteArg(a) : a.opt))].join(' ');
}

/** Parse guestfish's `key: value` struct output (one struct). */
export function parseStruct(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^\s*([a-z_0-9]+): (.*)$/.exec(line);
    if (m) out[m[1] as string] = m[2] as string;
  }
  return out;
}

/** Parse a list of structs (`[0] = { ... }`). */
export function parseStructList(text: string): Record<string, string>[] {
  const out: Record<string, string>[] = [];
  let cur: Record<string, string> | undefined;
  for (const line of text.split('\n')) {
    if (/^\[\d+\] = \{$/.test(line)) {
      cur = {};
      out.push(cur);
    } else if (cur) {
      const m = /^\s+([a-z_0-9]+): (.*)$/.exec(line);
      if (m) cur[m[1] as string] = m[2] as string;
    }
  }
  return out;
}

function which(cmd: string): boolean {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    try {
      fs.accessSync(path.join(dir, cmd), fs.constants.X_OK);
      return true;
    } catch {
      // next
    }
  }
  return false;
}

/** Whether guestfish is installed (PATH lookup only). */
export function guestfishAvailable(): boolean {
  return which('guestfish');
}

export const GUESTFS_MISSING =
  'libguestfs is not installed: install the Debian package libguestfs-tools (its appliance also needs a kernel in /boot: linux-image-amd64)';

export function guestfsEnv(opts: GuestfishOptions): NodeJS.ProcessEnv {
  const env = { ...(opts.env ?? process.env) };
  if (!env.LIBGUESTFS_BACKEND) env.LIBGUESTFS_BACKEND = 'direct';
  if (opts.tcg) {
    const cur = (env.LIBGUESTFS_BACKEND_SETTINGS ?? '').split(':').filter((s) => s !== '');
    if (!cur.includes('force_tcg')) cur.push('force_tcg');
    env.LIBGUESTFS_BACKEND_SETTINGS = cur.join(':');
  }
  return env;
}

interface Pending {
  marker: string;
  line: number;
  resolve: (r: CommandResult) => void;
}

export class Guestfish {
  private buf = '';
  private readonly queue: Pending[] = [];
  private lineNo = 0;
  private readonly token = randomBytes(6).toString('hex');
  private seq = 0;
  private exited = false;
  private readonly exitPromise: Promise<void>;

  private constructor(
    private readonly child: ChildProcess,
    private readonly signal?: AbortSignal,
  ) {
    child.stdout?.setEncoding('utf8');
    child.stdout?.on('data', (d: string) => {
      this.buf += d;
      this.drain();
    });
    child.stdin?.on('error', () => undefined); // EPIPE after an exit is reported via the queue
    this.exitPromise = new Promise((resolve) => {
      child.on('close', () => {
        this.exited = true;
        for (const p of this.queue.splice(0)) {
          p.resolve({ output: this.buf, error: `guestfish exited unexpectedly: ${lastLines(this.buf)}` });
        }
        resolve();
      });
    });
  }

  /** Start guestfish (no appliance yet). */
  static spawn(opts: GuestfishOptions = {}): Guestfish {
    if (!guestfishAvailable()) throw new BkfsError('EXTERNAL_TOOL', GUESTFS_MISSING);
    // `2>&1` through sh, which then execs guestfish: one ordered stream, and the PID is guestfish's.
    const child = spawn('sh', ['-c', 'exec "$0" "$@" 2>&1', 'guestfish', '--ro', '--no-progress-bars'], {
      stdio: ['pipe', 'pipe', 'ignore'],
      env: guestfsEnv(opts),
    });
    child.on('error', () => undefined); // reported through 'close'
    const g = new Guestfish(child, opts.signal);
    if (opts.signal) {
      // Interrupted: stop guestfish at once (libguestfs' recovery process then kills QEMU).
      const onAbort = (): void => void stopChild(child, 5000);
      opts.signal.addEventListener('abort', onAbort, { once: true });
      void g.exitPromise.then(() => opts.signal?.removeEventListener('abort', onAbort));
    }
    return g;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  private drain(): void {
    for (;;) {
      const head = this.queue[0];
      if (!head) return;
      const i = this.buf.indexOf(head.marker);
      if (i < 0) return;
      const text = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + head.marker.length).replace(/^\n/, '');
      this.queue.shift();
      head.resolve(splitErrors(text, head.line));
    }
  }

  /** Send one command; resolves with its output or its error (never rejects while alive). */
  send(cmd: string, args: readonly Arg[] = []): Promise<CommandResult> {
    if (this.exited) return Promise.resolve({ output: '', error: 'guestfish is not running' });
    const marker = `@@bkfs-${this.token}-${++this.seq}@@`;
    const line = ++this.lineNo;
    this.lineNo++; // the echo line
    const text = `-${commandLine(cmd, args)}\necho ${marker}\n`;
    return new Promise((resolve) => {
      this.queue.push({ marker: `${marker}\n`, line, resolve });
      this.child.stdin?.write(text);
    });
  }

  /** Send a command and fail with EXTERNAL_TOOL on error. */
  async run(cmd: string, args: readonly Arg[] = []): Promise<string> {
    const r = await this.send(cmd, args);
    if (this.signal?.aborted) {
      throw this.signal.reason instanceof Error
        ? this.signal.reason
        : new BkfsError('INTERRUPTED', 'interrupted');
    }
    if (r.error !== undefined) throw new BkfsError('EXTERNAL_TOOL', `guestfish ${cmd}: ${r.error}`, { cmd });
    return r.output;
  }

  /** End the session: guestfish shuts the appliance down; stopped by PID if it does not exit. */
  async close(): Promise<void> {
    if (this.exited) return;
    this.child.stdin?.end();
    const t = setTimeout(() => void stopChild(this.child, 10000), 60000);
    await this.exitPromise;
    clearTimeout(t);
  }
}

function lastLines(s: string): string {
  const lines = s
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
  return lines.slice(-3).join(' ') || '(no output)';
}

/**
 * Separate guestfish's error for command line `line` from its output. A failing command prints
 * nothing after its error, so every line after the first error line continues that message (launch
 * failures add several lines of advice); only the first line of each error is kept.
 */
export function splitErrors(text: string, line: number): CommandResult {
  const prefix = `*stdin*:${line}: `;
  const out: string[] = [];
  const errors: string[] = [];
  let inError = false;
  for (const l of text.split('\n')) {
    if (l.startsWith(prefix)) {
      const msg = l.slice(prefix.length);
      if (/^libguestfs: error: /.test(msg)) {
        errors.push(msg.replace(/^libguestfs: error: /, ''));
        inError = true;
      }
      continue; // warnings and other diagnostics
    }
    if (!inError) out.push(l);
  }
  const r: CommandResult = { output: out.join('\n') };
  if (errors.length > 0) r.error = errors.join('; ');
  return r;
}
