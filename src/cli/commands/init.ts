import * as fs from 'node:fs';
import type { Command } from 'commander';
import * as path from 'node:path';
import { othersCanRead } from '../../util/private-fs';
import { note, out, parseIntOption, repoPath } from '../context';
import { printJson } from '../json';
import { BkfsError } from '../../errors';
import type { KeySlot } from '../../crypto/keys';
import type { RepoConfig } from '../../repo/repository';
import { canPrompt, keyFileFrom, newPassphrase, passphraseFromEnv } from '../keysource';

/** Read a key file, or create one (64 random bytes, 0600) if it does not exist. */
export function keyFileSecret(file: string): { secret: Buffer; created: boolean } {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { randomBytes } = require('node:crypto') as typeof import('node:crypto');
  let secret: Buffer;
  try {
    secret = fs.readFileSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new BkfsError('USAGE', `key file ${file} cannot be read: ${(e as Error).message}`);
    }
    secret = randomBytes(64);
    const fd = fs.openSync(file, 'wx', 0o600);
    try {
      fs.writeSync(fd, secret);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    note(`created key file ${file} (64 random bytes, mode 0600): keep a copy elsewhere`);
    return { secret, created: true };
  }
  if (secret.length < 32) throw new BkfsError('USAGE', `key file ${file} holds fewer than 32 bytes`);
  return { secret, created: false };
}

/** A new master secret and its slots: a passphrase slot and/or a key-file slot. */
function newKeySlots(keyFile: string | undefined): { master: Buffer; slots: KeySlot[]; paperKey: string } {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const keys = require('../../crypto/keys') as typeof import('../../crypto/keys');
  let pass: Buffer | null = passphraseFromEnv()[0]?.secret ?? null;
  if (!pass && canPrompt()) pass = newPassphrase(undefined, 'passphrase for the new repository');
  if (pass !== null && pass.length === 0) throw new BkfsError('USAGE', 'an empty passphrase is not allowed');
  if (!pass && !keyFile) {
    throw new BkfsError(
      'KEY_REQUIRED',
      'init --encrypt needs a passphrase (BKFS_PASSWORD_FILE, BKFS_PASSWORD_COMMAND, or a terminal) or a key file (--key-file)',
    );
  }
  const master = keys.newMasterSecret();
  const slots: KeySlot[] = [];
  if (pass) slots.push(keys.makeSlot(master, 'passphrase', pass, 'passphrase'));
  if (keyFile) slots.push(keys.makeSlot(master, 'keyfile', keyFileSecret(keyFile).secret, 'keyfile'));
  return { master, slots, paperKey: keys.toPaperKey(master) };
}

export function registerInit(program: Command): void {
  program
    .command('init')
    .description('create a new, empty repository')
    .option('--chunk-size <bytes>', 'chunk grid in bytes (power of two, 4 KiB to 16 MiB)', '262144')
    .option('--compression-level <n>', 'zstd level for new chunks', '1')
    .option(
      '--encrypt',
      'encrypt everything stored (format 5): a random key, wrapped by a passphrase and/or the global --key-file',
    )
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Encryption (--encrypt): the passphrase comes from $BKFS_PASSWORD_FILE, $BKFS_PASSWORD_COMMAND or
is asked twice on the terminal; with --key-file F (created with 64 random bytes if it does not
exist) the key file opens the repository too, or alone when there is no passphrase source. The
paper key printed once at the end is the repository's key itself: keep it offline. Losing every
passphrase, key file and the paper key loses the data; there is no way around it.

Examples:
  bkfs -r /srv/bkfs init
  BKFS_REPO=/srv/bkfs bkfs init --chunk-size 1048576
  bkfs -r /srv/bkfs init --json
  bkfs -r /srv/bkfs init --encrypt
  bkfs -r /srv/bkfs --key-file /root/bkfs.key init --encrypt`,
    )
    .action(
      async (
        opts: { chunkSize: string; compressionLevel: string; json?: boolean; encrypt?: boolean },
        cmd: Command,
      ) => {
        const loc = repoPath(cmd);
        const keyFileOpt = cmd.optsWithGlobals<{ keyFile?: string }>().keyFile;
        if (!opts.encrypt && keyFileFrom(keyFileOpt, {}) !== undefined) {
          throw new BkfsError('USAGE', '--key-file at init needs --encrypt');
        }
        const remote = loc.startsWith('s3://');
        if (!remote && othersCanRead(loc)) {
          note(
            `warning: ${loc} can be read by other local users (mode ${modeOf(loc)}); bkfs creates its files 0600, but others can list them: run 'chmod 700 ${loc}' so that only you can reach the repository`,
          );
        }
        const chunkSize = parseIntOption('--chunk-size', opts.chunkSize);
        const { Repository } = await import('../../repo/repository');
        const enc = opts.encrypt ? newKeySlots(keyFileFrom(keyFileOpt)) : undefined;
        const initOpts = {
          chunkSize,
          compressionLevel: Number(opts.compressionLevel),
          ...(enc ? { encryption: { master: enc.master, slots: enc.slots } } : {}),
        };
        let c: RepoConfig;
        let cacheDir: string | undefined;
        if (remote) {
          // The index is made in the bucket's cache directory; bkfs-repo.json goes up last.
          const { initRemote } = await import('../../store/location');
          cacheDir = await initRemote(loc, (d) => {
            const r = Repository.init(d, initOpts);
            const id = r.config.id;
            r.close();
            return { id };
          });
          c = (await import('../../repo/repository')).loadConfig(cacheDir);
        } else {
          const repo = Repository.init(loc, initOpts);
          c = repo.config;
          repo.close();
        }
        const paperKey = enc ? enc.paperKey : undefined;
        if (enc) {
          note(
            'WARNING: this repository is encrypted. Without one of its passphrases or key files, or the paper key below, its data cannot be read by anyone, including you. Write the paper key down and keep it offline; it is not shown again.',
          );
        }
        if (opts.json) {
          printJson({
            id: c.id,
            path: remote ? loc : path.resolve(loc),
            ...(cacheDir !== undefined ? { cacheDir } : {}),
            format: c.format,
            chunkSize: c.chunkSize,
            pageSpan: c.pageSpan,
            hash: c.hash,
            compression: c.compression,
            created: c.created,
            encrypted: c.encryption !== undefined,
            ...(c.encryption
              ? { keyId: c.encryption.keyId, slots: c.encryption.slots.map((k) => k.name) }
              : {}),
            ...(paperKey ? { paperKey } : {}),
          });
          return;
        }
        out(
          `created bkfs repository ${c.id} at ${loc}${cacheDir !== undefined ? ` (local cache ${cacheDir})` : ''}${enc ? ' (encrypted)' : ''}`,
        );
        if (enc) {
          out(`key slots: ${enc.slots.map((k) => `${k.name} (${k.kind})`).join(', ')}`);
          out('paper key (the repository key itself; anyone holding it can read the backups):');
          out(`  ${paperKey}`);
        }
      },
    );
}

function modeOf(dir: string): string {
  return (fs.statSync(dir).mode & 0o7777).toString(8).padStart(4, '0');
}
