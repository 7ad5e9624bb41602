/** Run the real `bkfs` executable as a user would, and a qemu-img convert reference. */
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { run } from '../../src/util/proc';

export const BKFS = path.resolve(__dirname, '../../../bin/bkfs');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function bkfs(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return collect(process.execPath, [BKFS, ...args], { ...process.env, CI: 'true', ...env }, undefined);
}

/** The uid/gid of user `nobody` / group `nogroup` on Debian. */
export const NOBODY = 65534;

/**
 * The real bkfs as the unprivileged user `nobody` (group `nogroup`, no supplementary groups),
 * through util-linux's `setpriv`: how the tests show what another local user can and cannot do.
 */
export function bkfsAsNobody(args: string[], opts: { home?: string; cwd?: string } = {}): Promise<CliResult> {
  return collect(
    'setpriv',
    [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, BKFS, ...args],
    { ...process.env, CI: 'true', HOME: opts.home ?? '/nonexistent' },
    opts.cwd,
  );
}

function collect(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  cwd: string | undefined,
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? 128, stdout, stderr }));
  });
}

/** Run bkfs and fail with its output unless it exits 0. */
export async function bkfsOk(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  const r = await bkfs(args, env);
  if (r.code !== 0) throw new Error(`bkfs ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r;
}

/** qemu-io commands on an image (guest-like writes that qcow2 bitmaps record). */
export async function qemuIo(image: string, format: 'qcow2' | 'raw', ...cmds: string[]): Promise<void> {
  const args = ['-f', format];
  for (const c of cmds) args.push('-c', c);
  args.push(image);
  await run('qemu-io', args);
}
