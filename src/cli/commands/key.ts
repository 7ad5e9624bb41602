/**
 * `bkfs key list|add|remove|change-passphrase`: the key slots of an encrypted repository
 * (`src/crypto/keys.ts`). Slots wrap the one master key; adding or removing one rewrites
 * `bkfs-repo.json` only (atomically, under the maintenance lock), never data. Every change needs
 * the repository unlocked first (a current passphrase, key file or paper key); `list` reads the
 * configuration only.
 */
import type { Command } from 'commander';
import { BkfsError } from '../../errors';
import type { KeySlot } from '../../crypto/keys';
import { out, repoPath, retryLocked, withRepo } from '../context';
import { printJson } from '../json';
import { canPrompt, cliKeyProvider, newPassphrase } from '../keysource';
import { keyFileSecret } from './init';

interface SlotView {
  name: string;
  kind: KeySlot['kind'];
  created: string;
  keyId: string;
}

function view(s: KeySlot): SlotView {
  return { name: s.name, kind: s.kind, created: s.created, keyId: s.keyId };
}

function newPassphraseOrFail(file: string | undefined): Buffer {
  const p = newPassphrase(file ?? (process.env.BKFS_NEW_PASSWORD_FILE || undefined), 'new passphrase');
  if (!p) {
    throw new BkfsError(
      'KEY_REQUIRED',
      'no new passphrase: give --new-password-file F (or BKFS_NEW_PASSWORD_FILE), or run on a terminal',
    );
  }
  if (p.length === 0) throw new BkfsError('USAGE', 'an empty passphrase is not allowed');
  return p;
}

/** Change the slots of the repository (unlocked, under the maintenance lock). */
async function changeSlots(
  cmd: Command,
  what: string,
  fn: (slots: KeySlot[], master: Buffer) => KeySlot[],
): Promise<KeySlot[]> {
  const { loadConfig, writeConfig } = await import('../../repo/repository');
  const { rememberedMaster } = await import('../../crypto/keyring');
  return retryLocked(cmd, () =>
    withRepo(cmd, (repo) => {
      if (!repo.config.encryption) {
        throw new BkfsError('USAGE', `repository ${repo.dir} is not encrypted: it has no keys`);
      }
      repo.lockWriter(what, { kind: 'maintenance' });
      const cfg = loadConfig(repo.dir); // as on disk now (another key command may have run)
      const enc = cfg.encryption!;
      const master = rememberedMaster(enc.keyId);
      if (!master) throw new BkfsError('KEY_INVALID', 'the repository key is not unlocked');
      const slots = fn(enc.slots.slice(), master);
      if (slots.length === 0) throw new BkfsError('USAGE', 'refusing to remove the last key slot');
      cfg.encryption = { ...enc, slots };
      writeConfig(repo.dir, cfg);
      return slots;
    }),
  );
}

function uniqueName(slots: KeySlot[], wanted: string | undefined, base: string): string {
  if (wanted !== undefined) {
    if (!/^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/.test(wanted)) {
      throw new BkfsError('BAD_NAME', `key slot name '${wanted}' may hold letters, digits and . _ @ - only`);
    }
    if (slots.some((s) => s.name === wanted))
      throw new BkfsError('USAGE', `a key slot named '${wanted}' exists`);
    return wanted;
  }
  for (let i = 1; ; i++) {
    const n = i === 1 ? base : `${base}-${i}`;
    if (!slots.some((s) => s.name === n)) return n;
  }
}

export function registerKey(program: Command): void {
  const key = program
    .command('key')
    .description('key slots of an encrypted repository: list, add, remove, change-passphrase')
    .addHelpText(
      'after',
      `
Examples:
  bkfs key list
  BKFS_PASSWORD_FILE=/root/pw bkfs key add --name offsite --new-password-file /root/pw2
  bkfs --key-file /root/bkfs.key key remove passphrase
  bkfs key change-passphrase`,
    );

  key
    .command('list')
    .description('list the key slots (reads bkfs-repo.json only; needs no key)')
    .option('--json', 'machine-readable output')
    .action(keyList);

  key
    .command('add')
    .description('add a key slot: a new passphrase, or a key file (--new-key-file)')
    .option('--name <name>', 'slot name (default: passphrase, passphrase-2, ... or keyfile, ...)')
    .option(
      '--new-key-file <file>',
      'the new slot opens with this key file (created, 64 random bytes, if missing)',
    )
    .option(
      '--new-password-file <file>',
      'the new passphrase is in this file (else BKFS_NEW_PASSWORD_FILE or asked)',
    )
    .addHelpText(
      'after',
      `
The repository is unlocked first with a current secret (--key-file, BKFS_PASSWORD_FILE,
BKFS_PASSWORD_COMMAND, BKFS_PAPER_KEY_FILE or the terminal).

Examples:
  bkfs key add --name alice
  bkfs --key-file /root/old.key key add --new-key-file /root/new.key
  BKFS_PAPER_KEY_FILE=paper.txt bkfs key add --new-password-file /root/pw`,
    )
    .action(async (opts: { name?: string; newKeyFile?: string; newPasswordFile?: string }, cmd: Command) => {
      if (opts.newKeyFile && opts.newPasswordFile) {
        throw new BkfsError('USAGE', '--new-key-file and --new-password-file exclude each other');
      }
      const { makeSlot } = await import('../../crypto/keys');
      let added = '';
      await changeSlots(cmd, 'key add', (slots, master) => {
        const kind: KeySlot['kind'] = opts.newKeyFile ? 'keyfile' : 'passphrase';
        const name = uniqueName(slots, opts.name, kind);
        const secret = opts.newKeyFile
          ? keyFileSecret(opts.newKeyFile).secret
          : newPassphraseOrFail(opts.newPasswordFile);
        slots.push(makeSlot(master, kind, secret, name));
        added = `${name} (${kind})`;
        return slots;
      });
      out(`added key slot ${added}`);
    });

  key
    .command('remove')
    .description('remove a key slot (never the last one)')
    .argument('<name>', 'slot name (see bkfs key list)')
    .action(async (name: string, _opts: unknown, cmd: Command) => {
      await changeSlots(cmd, 'key remove', (slots) => {
        const i = slots.findIndex((s) => s.name === name);
        if (i < 0) throw new BkfsError('NOT_FOUND', `no key slot named '${name}'`);
        if (slots.length === 1) throw new BkfsError('USAGE', 'refusing to remove the last key slot');
        slots.splice(i, 1);
        return slots;
      });
      out(`removed key slot ${name}`);
    });

  key
    .command('change-passphrase')
    .description('replace the passphrase of a passphrase slot')
    .option('--name <name>', 'the slot (default: the one the current passphrase opens, or the only one)')
    .option(
      '--new-password-file <file>',
      'the new passphrase is in this file (else BKFS_NEW_PASSWORD_FILE or asked)',
    )
    .action(async (opts: { name?: string; newPasswordFile?: string }, cmd: Command) => {
      const { makeSlot, openSlot } = await import('../../crypto/keys');
      const keyFile = cmd.optsWithGlobals<{ keyFile?: string }>().keyFile;
      let changed = '';
      await changeSlots(cmd, 'key change-passphrase', (slots, master) => {
        const target = passphraseSlot(slots, opts.name, keyFile, openSlot);
        const secret = newPassphraseOrFail(opts.newPasswordFile);
        const next = makeSlot(master, 'passphrase', secret, target.name);
        changed = target.name;
        return slots.map((s) => (s === target ? next : s));
      });
      out(`changed the passphrase of key slot ${changed}`);
    });
}

/** `bkfs key list`: the slots as bkfs-repo.json has them (no key needed). */
async function keyList(opts: { json?: boolean }, cmd: Command): Promise<void> {
  const { loadConfig } = await import('../../repo/repository');
  const dir = repoPath(cmd);
  const cfg = loadConfig(dir);
  const enc = cfg.encryption;
  if (opts.json) {
    printJson({
      encrypted: enc !== undefined,
      ...(enc ? { cipher: enc.cipher, keyId: enc.keyId, slots: enc.slots.map(view) } : {}),
    });
    return;
  }
  if (!enc) {
    out(`repository ${dir} is not encrypted`);
    return;
  }
  out(`key id ${enc.keyId} (${enc.cipher}), ${enc.slots.length} slot(s):`);
  for (const s of enc.slots) out(`  ${s.name.padEnd(16)} ${s.kind.padEnd(10)} created ${s.created}`);
}

/**
 * The passphrase slot `key change-passphrase` replaces: the one named, else the one the current
 * passphrase opens (the repository was unlocked with it), else the only one.
 */
function passphraseSlot(
  slots: KeySlot[],
  name: string | undefined,
  keyFile: string | undefined,
  openSlot: (s: KeySlot, secret: Buffer) => unknown,
): KeySlot {
  const pw = slots.filter((s) => s.kind === 'passphrase');
  let target: KeySlot | undefined;
  if (name !== undefined) {
    target = pw.find((s) => s.name === name);
    if (!target) throw new BkfsError('NOT_FOUND', `no passphrase key slot named '${name}'`);
  } else {
    // The slot the current passphrase opens (the repository was unlocked with it).
    let sources: { kind: string; secret: Buffer }[] = [];
    if (!canPrompt() || process.env.BKFS_PASSWORD_FILE || process.env.BKFS_PASSWORD_COMMAND) {
      try {
        sources = cliKeyProvider(keyFile)({ dir: '', repoId: '', kinds: new Set(['passphrase']) });
      } catch {
        sources = [];
      }
    }
    target = pw.find((s) => sources.some((x) => x.kind === 'passphrase' && openSlot(s, x.secret)));
    target ??= pw.length === 1 ? pw[0] : undefined;
    if (!target) throw new BkfsError('USAGE', 'several passphrase slots: name one with --name');
  }
  return target;
}
