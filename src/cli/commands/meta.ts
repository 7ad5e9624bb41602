/**
 * Commands about bkfs itself: `version`, `completion bash|zsh|fish` and `man`. Completion scripts
 * and the man page are generated from the commander definitions of `buildProgram`, so they list
 * exactly the commands and options that exist.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Command, Option } from 'commander';
import { BkfsError } from '../../errors';
import { EXIT_CODES } from '../exit-codes';
import { out, repoPath } from '../context';
import { printJson } from '../json';

const ROOT = path.resolve(__dirname, '../../../..');

export function packageVersion(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

/** The installed version of an npm package (its package.json, found upwards from its entry point). */
function moduleVersion(name: string): string | null {
  try {
    let dir = path.dirname(require.resolve(name));
    for (;;) {
      const f = path.join(dir, 'package.json');
      if (fs.existsSync(f)) {
        const pkg = JSON.parse(fs.readFileSync(f, 'utf8')) as { name?: string; version: string };
        if (pkg.name === name) return pkg.version;
      }
      const up = path.dirname(dir);
      if (up === dir) return null;
      dir = up;
    }
  } catch {
    return null;
  }
}

function firstLine(cmd: string, args: string[], cwd?: string): string | null {
  // eslint-disable-next-line @typescript-eslint/no-require-imports -- only `bkfs version` spawns
  const { spawnSync } = require('node:child_process') as typeof import('node:child_process');
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 5000, ...(cwd ? { cwd } : {}) });
  if (r.error || r.status !== 0) return null;
  return r.stdout.split('\n')[0]?.trim() || null;
}

export interface VersionInfo {
  bkfs: string;
  /** Repository format versions this bkfs reads (and the one it writes, the highest). */
  repositoryFormats: number[];
  repositoryFormatWritten: number;
  node: string;
  platform: string;
  gitCommit: string | null;
  dependencies: {
    betterSqlite3: string | null;
    sqlite: string | null;
    zstdNapi: string | null;
    zstd: string | null;
    fuseNative: string | null;
    blakeHash: string | null;
    commander: string | null;
  };
  /** `qemu-img --version`, null when qemu-img is not installed. */
  qemuImg: string | null;
  /** Format written for encrypted repositories (`init --encrypt`). */
  repositoryFormatEncrypted: number;
  /** The repository of -r / BKFS_REPO / the default path, when there is one: is it encrypted? */
  repository: { path: string; format: number; encrypted: boolean; cipher?: string; keyId?: string } | null;
}

export async function versionInfo(repoDir?: string): Promise<VersionInfo> {
  const { FORMAT_VERSION, PLAIN_FORMAT_VERSION, ENCRYPTED_FORMAT_VERSION } =
    await import('../../index/schema');
  let repository: VersionInfo['repository'] = null;
  if (repoDir !== undefined) {
    try {
      const { loadConfig } = await import('../../repo/repository');
      const c = loadConfig(repoDir);
      repository = {
        path: path.resolve(repoDir),
        format: c.format,
        encrypted: c.encryption !== undefined,
        ...(c.encryption ? { cipher: c.encryption.cipher, keyId: c.encryption.keyId } : {}),
      };
    } catch {
      repository = null; // no (readable) repository there: nothing to say about it
    }
  }
  let sqlite: string | null = null;
  try {
    const { default: Database } = await import('better-sqlite3');
    const db = new Database(':memory:');
    sqlite = (db.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v;
    db.close();
  } catch {
    sqlite = null;
  }
  let zstd: string | null = null;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    zstd = (require('zstd-napi/binding') as { versionString: () => string }).versionString();
  } catch {
    zstd = null;
  }
  const git = fs.existsSync(path.join(ROOT, '.git'))
    ? firstLine('git', ['rev-parse', '--short=12', 'HEAD'], ROOT)
    : null;
  const qemu = firstLine('qemu-img', ['--version']);
  return {
    bkfs: packageVersion(),
    repositoryFormats: Array.from({ length: FORMAT_VERSION }, (_, i) => i + 1),
    repositoryFormatWritten: PLAIN_FORMAT_VERSION,
    repositoryFormatEncrypted: ENCRYPTED_FORMAT_VERSION,
    repository,
    node: process.versions.node,
    platform: `${process.platform}-${process.arch}`,
    gitCommit: git,
    dependencies: {
      betterSqlite3: moduleVersion('better-sqlite3'),
      sqlite,
      zstdNapi: moduleVersion('zstd-napi'),
      zstd,
      fuseNative: moduleVersion('fuse-native'),
      blakeHash: moduleVersion('@napi-rs/blake-hash'),
      commander: moduleVersion('commander'),
    },
    qemuImg: qemu ? qemu.replace(/^qemu-img version\s*/, '') : null,
  };
}

function printVersion(v: VersionInfo): void {
  const d = v.dependencies;
  const na = (s: string | null) => s ?? 'not found';
  out(`bkfs ${v.bkfs}${v.gitCommit ? ` (git ${v.gitCommit})` : ''}`);
  out(
    `repository format ${v.repositoryFormatWritten} (reads ${v.repositoryFormats.join(', ')}; writes ${v.repositoryFormatWritten}, or ${v.repositoryFormatEncrypted} when encrypted)`,
  );
  const r = v.repository;
  if (r) {
    out(
      `repository ${r.path}: format ${r.format}, ${r.encrypted ? `encrypted (${r.cipher ?? '?'}, key id ${r.keyId ?? '?'})` : 'not encrypted'}`,
    );
  }
  out(`node ${v.node} on ${v.platform}`);
  out(`better-sqlite3 ${na(d.betterSqlite3)}, SQLite ${na(d.sqlite)}`);
  out(`zstd-napi ${na(d.zstdNapi)}, zstd ${na(d.zstd)}`);
  out(`fuse-native ${na(d.fuseNative)}`);
  out(`@napi-rs/blake-hash ${na(d.blakeHash)}, commander ${na(d.commander)}`);
  out(`qemu-img ${v.qemuImg ?? 'not found (needed for qcow2 sources and restores)'}`);
}

/** Visible subcommands, depth first, with their full names ('completion', ...). */
function commandsOf(program: Command): Command[] {
  return program.commands.filter((c) => !(c as unknown as { _hidden: boolean })._hidden);
}

function visibleOptions(c: Command): readonly Option[] {
  return c.options.filter((o) => !o.hidden);
}

/** The text a command adds after its generated help (its notes and Examples section). */
export function helpAfterText(c: Command): string {
  let buf = '';
  const saved = { ...c.configureOutput() };
  c.configureOutput({ ...saved, writeOut: (s) => (buf += s) });
  try {
    c.outputHelp();
  } finally {
    c.configureOutput(saved);
  }
  return buf.slice(c.helpInformation().length).replace(/^\n+/, '').trimEnd();
}

function optionNames(c: Command): string[] {
  return visibleOptions(c).flatMap((o) => [o.long, o.short].filter((x): x is string => Boolean(x)));
}

const sq = (s: string) => `'${s.replace(/'/g, "'\\''")}'`;

export function bashCompletion(program: Command): string {
  const cmds = commandsOf(program);
  const names = cmds.flatMap((c) => [c.name(), ...c.aliases()]);
  const globals = [...optionNames(program), '--help'];
  const cases = cmds
    .map(
      (c) =>
        `    ${[c.name(), ...c.aliases()].join('|')}) opts=${sq([...optionNames(c), '--help'].join(' '))} ;;`,
    )
    .join('\n');
  return `# bash completion for bkfs (generated by 'bkfs completion bash')
# Install: bkfs completion bash > /etc/bash_completion.d/bkfs   (or source it from ~/.bashrc)
_bkfs() {
  local cur cmd i opts
  cur="\${COMP_WORDS[COMP_CWORD]}"
  cmd=""
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "\${COMP_WORDS[i]}" in
      -r|--repo|--retry-lock) ((i++)) ;;
      -*) ;;
      *) cmd="\${COMP_WORDS[i]}"; break ;;
    esac
  done
  if [[ -z "$cmd" ]]; then
    if [[ "$cur" == -* ]]; then
      COMPREPLY=($(compgen -W ${sq(globals.join(' '))} -- "$cur"))
    else
      COMPREPLY=($(compgen -W ${sq(names.join(' '))} -- "$cur"))
    fi
    return
  fi
  case "$cmd" in
${cases}
    *) opts="" ;;
  esac
  if [[ "$cur" == -* ]]; then
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
  else
    COMPREPLY=($(compgen -f -- "$cur"))
  fi
}
complete -o filenames -F _bkfs bkfs
`;
}

const zq = (s: string) => s.replace(/[[\]:'\\]/g, (ch) => `\\${ch}`);

export function zshCompletion(program: Command): string {
  const cmds = commandsOf(program);
  const list = cmds
    .flatMap((c) => [c.name(), ...c.aliases()].map((n) => `    '${n}:${zq(c.description())}'`))
    .join('\n');
  const optSpec = (o: Option) => {
    const takes = o.required || o.optional ? ':value:_files' : '';
    const desc = zq(o.description);
    if (o.short && o.long) return `'(${o.short} ${o.long})'{${o.short},${o.long}}'[${desc}]${takes}'`;
    return `'${o.long ?? o.short}[${desc}]${takes}'`;
  };
  const cases = cmds
    .map(
      (c) =>
        `    ${[c.name(), ...c.aliases()].join('|')})\n      _arguments ${[...visibleOptions(c).map(optSpec), "'*:file:_files'"].join(' ')} ;;`,
    )
    .join('\n');
  return `#compdef bkfs
# zsh completion for bkfs (generated by 'bkfs completion zsh')
# Install: bkfs completion zsh > "\${fpath[1]}/_bkfs"
_bkfs() {
  local -a commands
  commands=(
${list}
  )
  _arguments -C ${visibleOptions(program).map(optSpec).join(' ')} '1:command:->command' '*::arg:->args'
  case $state in
  command) _describe -t commands 'bkfs command' commands ;;
  args)
    case $words[1] in
${cases}
    esac ;;
  esac
}
_bkfs "$@"
`;
}

export function fishCompletion(program: Command): string {
  const cmds = commandsOf(program);
  const all = cmds.flatMap((c) => [c.name(), ...c.aliases()]).join(' ');
  const lines = [
    "# fish completion for bkfs (generated by 'bkfs completion fish')",
    '# Install: bkfs completion fish > ~/.config/fish/completions/bkfs.fish',
    'complete -c bkfs -f',
  ];
  const opt = (o: Option, cond: string) => {
    const parts = ['complete -c bkfs', cond];
    if (o.short) parts.push(`-s ${o.short.replace(/^-/, '')}`);
    if (o.long) parts.push(`-l ${o.long.replace(/^--/, '')}`);
    if (o.required || o.optional) parts.push('-r');
    parts.push(`-d ${sq(o.description)}`);
    return parts.join(' ');
  };
  for (const o of visibleOptions(program)) lines.push(opt(o, ''));
  for (const c of cmds) {
    for (const n of [c.name(), ...c.aliases()])
      lines.push(
        `complete -c bkfs -n "not __fish_seen_subcommand_from ${all}" -a ${n} -d ${sq(c.description())}`,
      );
    const cond = `-n "__fish_seen_subcommand_from ${[c.name(), ...c.aliases()].join(' ')}"`;
    for (const o of visibleOptions(c)) lines.push(opt(o, cond));
    if (c.registeredArguments.length > 0) lines.push(`complete -c bkfs ${cond} -F`);
  }
  return `${lines.join('\n').replace(/complete -c bkfs {2}/g, 'complete -c bkfs ')}\n`;
}

/** roff-escape a line of text. */
function roff(s: string): string {
  return s
    .replace(/\\/g, '\\e')
    .replace(/-/g, '\\-')
    .replace(/^([.'])/gm, '\\&$1');
}

function manOptions(c: Command): string[] {
  const l: string[] = [];
  for (const o of visibleOptions(c)) {
    l.push('.TP', `.B ${roff(o.flags)}`, roff(o.description));
    if (o.defaultValue !== undefined && typeof o.defaultValue !== 'boolean' && !Array.isArray(o.defaultValue))
      l.push(`(default: ${roff(String(o.defaultValue))})`);
  }
  return l;
}

export function manPage(program: Command, version: string): string {
  const date = new Date().toISOString().slice(0, 10);
  const l: string[] = [
    `.\\" Generated by 'bkfs man' from the command definitions; do not edit.`,
    `.TH BKFS 1 "${date}" "bkfs ${version}" "User Commands"`,
    '.SH NAME',
    `bkfs \\- ${roff(program.description())}`,
    '.SH SYNOPSIS',
    '.B bkfs',
    '[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]',
    '.SH GLOBAL OPTIONS',
    ...manOptions(program),
    '.SH COMMANDS',
  ];
  for (const c of commandsOf(program)) {
    const aliases = c.aliases().length ? ` (alias: ${c.aliases().join(', ')})` : '';
    l.push('.SS', `.B bkfs ${roff(c.name())} ${roff(c.usage())}`);
    l.push('.PP', `${roff(c.description())}${roff(aliases)}`);
    if (c.options.some((o) => !o.hidden)) l.push('.PP', 'Options:', '.RS', ...manOptions(c), '.RE');
    const after = helpAfterText(c);
    if (after) l.push('.PP', '.nf', roff(after), '.fi');
  }
  l.push('.SH EXIT STATUS', '.TP', '.B 0', 'success', '.TP', '.B 1', 'internal error (a bug)');
  for (const [code, n] of Object.entries(EXIT_CODES).sort((a, b) => a[1] - b[1]))
    l.push('.TP', `.B ${n}`, roff(code));
  l.push(
    '.SH ENVIRONMENT',
    '.TP',
    '.B BKFS_REPO',
    'repository directory when \\-r is not given',
    '.TP',
    '.B TZ',
    'time zone of the times shown to people (JSON times are always UTC)',
    '.TP',
    '.B BKFS_DEBUG',
    'print stack traces of internal errors (as \\-v)',
    '.SH SEE ALSO',
    'The README of bkfs; \\fBqemu-img\\fR(1), \\fBvirsh\\fR(1).',
  );
  return `${l.join('\n')}\n`;
}

export function registerMeta(program: Command): void {
  program
    .command('version')
    .description('show the versions of bkfs, its repository format and its libraries')
    .option('--json', 'machine-readable output')
    .addHelpText(
      'after',
      `
Examples:
  bkfs version
  bkfs --version
  bkfs version --json | jq -r .repositoryFormatWritten`,
    )
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const v = await versionInfo(repoPath(cmd));
      if (opts.json) printJson(v);
      else printVersion(v);
    });

  program
    .command('completion')
    .description('print a shell completion script (bash, zsh or fish)')
    .argument('<shell>', 'bash, zsh or fish')
    .addHelpText(
      'after',
      `
Examples:
  bkfs completion bash > /etc/bash_completion.d/bkfs
  source <(bkfs completion bash)
  bkfs completion zsh > "\${fpath[1]}/_bkfs"
  bkfs completion fish > ~/.config/fish/completions/bkfs.fish`,
    )
    .action((shell: string) => {
      const gen = { bash: bashCompletion, zsh: zshCompletion, fish: fishCompletion }[shell];
      if (!gen)
        throw new BkfsError('USAGE', `completion is available for bash, zsh and fish, not '${shell}'`);
      process.stdout.write(gen(program));
    });

  program
    .command('man')
    .description('print the bkfs(1) manual page (roff), generated from the command definitions')
    .addHelpText(
      'after',
      `
Examples:
  bkfs man | man -l -
  bkfs man > /usr/local/share/man/man1/bkfs.1`,
    )
    .action(() => {
      process.stdout.write(manPage(program, packageVersion()));
    });
}
