/**
 * Where the CLI gets the secret of an encrypted repository (restic's conventions), in this order:
 *
 *   1. a key file: the global `--key-file F` or `BKFS_KEY_FILE=F` (its bytes open a key-file slot);
 *   2. `BKFS_PAPER_KEY_FILE=F`: a file holding the paper key printed by `init` (the master secret);
 *   3. `BKFS_PASSWORD_FILE=F`: the passphrase is the file's content (one trailing newline dropped);
 *   4. `BKFS_PASSWORD_COMMAND=CMD`: the passphrase is what `sh -c CMD` prints (one trailing newline
 *      dropped), e.g. `pass show bkfs` or `secret-tool lookup bkfs repo`;
 *   5. a prompt on the terminal when stdin is one (echo off).
 *
 * Every source that is set is tried (a key file and a passphrase may both be given); none set and
 * no terminal: KEY_REQUIRED (exit 36). A passphrase never comes from an environment variable's
 * value or from argv (both are visible to other processes).
 */
import * as fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { BkfsError } from '../errors';
import type { KeyProvider, KeySource } from '../crypto/keyring';

/** Drop one trailing newline (and a CR before it), as restic does for password files. */
function chompOne(b: Buffer): Buffer {
  let n = b.length;
  if (n > 0 && b[n - 1] === 0x0a) n--;
  if (n > 0 && b[n - 1] === 0x0d) n--;
  return b.subarray(0, n);
}

function readSecretFile(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new BkfsError('KEY_REQUIRED', `${what} ${file} cannot be read: ${(e as Error).message}`);
  }
}

/** The passphrase from `BKFS_PASSWORD_FILE` / `BKFS_PASSWORD_COMMAND`, if either is set. */
export function passphraseFromEnv(env: NodeJS.ProcessEnv = process.env): KeySource[] {
  const out: KeySource[] = [];
  const file = env.BKFS_PASSWORD_FILE;
  if (file) {
    out.push({
      kind: 'passphrase',
      secret: chompOne(readSecretFile(file, 'BKFS_PASSWORD_FILE')),
      from: `BKFS_PASSWORD_FILE ${file}`,
    });
  }
  const cmd = env.BKFS_PASSWORD_COMMAND;
  if (cmd) {
    const r = spawnSync('/bin/sh', ['-c', cmd], { stdio: ['inherit', 'pipe', 'inherit'], timeout: 120_000 });
    if (r.error || r.status !== 0) {
      throw new BkfsError(
        'KEY_REQUIRED',
        `BKFS_PASSWORD_COMMAND failed (${r.error ? r.error.message : `exit status ${String(r.status ?? r.signal)}`}): no passphrase`,
      );
    }
    out.push({ kind: 'passphrase', secret: chompOne(r.stdout), from: 'BKFS_PASSWORD_COMMAND' });
  }
  return out;
}

/** Is there a terminal to ask on? (stdin is one: restic's rule.) */
export function canPrompt(): boolean {
  return process.stdin.isTTY === true;
}

/** Ask on the terminal with echo off; the answer without its newline. */
export function promptSecret(question: string): Buffer {
  fs.writeSync(2, question);
  const echoOff = spawnSync('stty', ['-echo'], { stdio: [0, 'ignore', 'ignore'] }).status === 0;
  const chunks: Buffer[] = [];
  try {
    const b = Buffer.alloc(1);
    for (;;) {
      let n: number;
      try {
        n = fs.readSync(0, b, 0, 1, null);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') continue;
        throw e;
      }
      if (n === 0 || b[0] === 0x0a) break;
      chunks.push(Buffer.from(b));
    }
  } finally {
    if (echoOff) spawnSync('stty', ['echo'], { stdio: [0, 'ignore', 'ignore'] });
    fs.writeSync(2, '\n');
  }
  return chompOne(Buffer.concat(chunks));
}

/** A new passphrase: from `file`, else the environment sources, else asked twice on the terminal. */
export function newPassphrase(file: string | undefined, what: string): Buffer | null {
  if (file) return chompOne(readSecretFile(file, 'the new passphrase file'));
  if (!canPrompt()) return null;
  const a = promptSecret(`${what}: `);
  const b = promptSecret(`${what} (again): `);
  if (!a.equals(b)) throw new BkfsError('USAGE', 'the two passphrases differ');
  if (a.length === 0) throw new BkfsError('USAGE', 'an empty passphrase is not allowed');
  return a;
}

export function keyFileFrom(
  opt: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): string | undefined {
  return opt ?? (env.BKFS_KEY_FILE || undefined);
}

/** The CLI's key provider (installed before every command; see this file's header). */
export function cliKeyProvider(keyFileOpt: string | undefined): KeyProvider {
  return (req) => {
    const out: KeySource[] = [];
    const kf = keyFileFrom(keyFileOpt);
    if (kf) out.push({ kind: 'keyfile', secret: readSecretFile(kf, 'key file'), from: `key file ${kf}` });
    const paper = process.env.BKFS_PAPER_KEY_FILE;
    if (paper) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const { fromPaperKey } = require('../crypto/keys') as typeof import('../crypto/keys');
      const text = readSecretFile(paper, 'BKFS_PAPER_KEY_FILE').toString('utf8');
      out.push({ kind: 'master', secret: fromPaperKey(text), from: `paper key ${paper}` });
    }
    out.push(...passphraseFromEnv());
    if (out.length === 0 && req.kinds.has('passphrase') && canPrompt()) {
      out.push({
        kind: 'passphrase',
        secret: promptSecret(`passphrase for encrypted repository ${req.dir}: `),
        from: 'the passphrase typed',
      });
    }
    if (out.length === 0) {
      throw new BkfsError(
        'KEY_REQUIRED',
        `repository ${req.dir} is encrypted: give its passphrase (BKFS_PASSWORD_FILE, BKFS_PASSWORD_COMMAND, or a terminal) or its key file (--key-file, BKFS_KEY_FILE)`,
      );
    }
    return out;
  };
}
