/**
 * The tools compared by `bench/run`, behind one interface: bkfs, virtnbdbackup, qemu's own
 * backing chain, restic, borg, and a plain `dd` copy of the raw image (the ceiling line).
 *
 * Each tool backs up the same states of the same disk: qcow2 tools (bkfs, virtnbdbackup, qemu
 * chain) from their own working copy of the image, which the orchestrator brings from state to
 * state by replaying the recorded guest writes through qemu-nbd (so their dirty bitmaps see
 * them); raw tools (restic, borg, dd) from a raw file of the state. `full`/`inc` return the
 * seconds of the backup command alone (domain start/stop for virtnbdbackup is outside).
 * `mount` gives a raw view of a checkpoint as a file, the way the tool offers it.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import {
  Bg,
  allocatedBytes,
  fuseUnmount,
  have,
  isMounted,
  log,
  registerDomain,
  registerDaemon,
  rmTree,
  sh,
  startBg,
  unregisterDomain,
  waitUntil,
  type ShOptions,
} from './common';
import { HELPER, PYTHON, VNBD_MAP, qemuNbd, type Dataset, type NbdServer } from './dataset';

export interface Mounted {
  /** The checkpoint's disk as a raw file. */
  file: string;
  /** Seconds from starting the mount until the file was readable. */
  setupSecs: number;
  unmount(): Promise<void>;
}

export interface Restored {
  file: string;
  format: 'raw' | 'qcow2';
}

export class NotSupported extends Error {}

export interface ToolEnv {
  /** The tool's own directory (created, emptied). */
  dir: string;
  ds: Dataset;
  /** Number of checkpoints the history will have. */
  checkpoints: number;
}

export abstract class Tool {
  abstract readonly id: string;
  abstract readonly label: string;
  /** 'qcow2': backs up `image` (a working copy with bitmaps); 'raw': a raw file of the state. */
  abstract readonly source: 'qcow2' | 'raw';
  readonly notes: string[] = [];
  hasInc = true;
  /** The working image of qcow2 tools. */
  image = '';
  protected env!: ToolEnv;

  /** null when the tool can run here, else why it cannot. */
  abstract check(): Promise<string | null>;
  abstract version(): Promise<string>;

  async prepare(env: ToolEnv): Promise<void> {
    this.env = env;
    await rmTree(env.dir);
    await fsp.mkdir(env.dir, { recursive: true });
    if (this.source === 'qcow2') {
      this.image = path.join(env.dir, 'disk.qcow2');
      await sh('cp', ['--sparse=always', env.ds.base, this.image]);
    }
  }

  /** Untimed work around each backup (virtnbdbackup: start/stop the domain). */
  async beforeBackup(): Promise<void> {}
  async afterBackup(): Promise<void> {}
  /** Full backup of `src` into `slot` ('main' is kept and continued; others are discarded). */
  abstract full(slot: string, src: string): Promise<number>;
  abstract discardSlot(slot: string): Promise<void>;
  /** Incremental backup of state `i` into 'main'. */
  abstract inc(i: number, src: string): Promise<number>;
  abstract storedBytes(): Promise<number>;
  /** Mount checkpoint `k` (0 = the full, checkpoints-1 = the newest). */
  abstract mount(k: number, mnt: string): Promise<Mounted>;
  /** Restore checkpoint `k`'s whole disk into directory `outDir`. */
  abstract restoreDisk(k: number, outDir: string): Promise<Restored>;
  async teardown(): Promise<void> {}
}

function firstLine(s: string): string {
  return s.trim().split('\n')[0] ?? '';
}

/** Expose an NBD export as a raw file with nbdfuse (read-only); stops on unmount. */
async function nbdfuseMount(
  uri: string,
  mnt: string,
  t0: bigint,
  extra: () => Promise<void>,
): Promise<Mounted> {
  await fsp.mkdir(mnt, { recursive: true });
  const pidFile = `${mnt}.nbdfuse.pid`;
  fs.rmSync(pidFile, { force: true });
  const bg = startBg('nbdfuse', ['-r', '-P', pidFile, path.join(mnt, 'disk'), uri]);
  const stop = async (): Promise<void> => {
    try {
      if (await isMounted(mnt)) await fuseUnmount(mnt);
      if (!(await bg.waitExit(10000))) await bg.stop(5000);
    } finally {
      fs.rmSync(pidFile, { force: true });
      await extra();
    }
  };
  try {
    await waitUntil('nbdfuse', () => fs.existsSync(pidFile), bg, 30000);
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    file: path.join(mnt, 'disk'),
    setupSecs: Number(process.hrtime.bigint() - t0) / 1e9,
    unmount: stop,
  };
}

/** A FUSE-mounting tool process that stays in the foreground until unmounted. */
async function fuseProcessMount(
  bg: Bg,
  mnt: string,
  file: string,
  t0: bigint,
  unmountCmd?: () => Promise<void>,
): Promise<Mounted> {
  const stop = async (): Promise<void> => {
    if (await isMounted(mnt)) {
      if (unmountCmd) await unmountCmd().catch(() => undefined);
      if (await isMounted(mnt)) await fuseUnmount(mnt);
    }
    if (!(await bg.waitExit(15000))) await bg.stop(5000);
  };
  try {
    await waitUntil(`${bg.name} mount`, () => fs.existsSync(file), bg, 120000);
  } catch (e) {
    await stop();
    throw e;
  }
  return { file, setupSecs: Number(process.hrtime.bigint() - t0) / 1e9, unmount: stop };
}

// ---------------------------------------------------------------------------------------------
// bkfs

export class Bkfs extends Tool {
  readonly id = 'bkfs';
  readonly label = 'bkfs';
  readonly source = 'qcow2' as const;
  private help = '';
  private mountHelp = '';
  private restoreHelp = '';

  constructor(private readonly bin: string) {
    super();
  }

  private repo(slot: string): string {
    return path.join(this.env.dir, `repo-${slot}`);
  }

  private bkfs(args: string[], opts: ShOptions = {}): Promise<import('./common').ShResult> {
    return sh(this.bin, args, opts);
  }

  async check(): Promise<string | null> {
    if (!fs.existsSync(this.bin)) return `${this.bin} not found`;
    this.help = (await sh(this.bin, ['--help'], { allowFail: true })).stdout;
    if (/^\s+mount\b/m.test(this.help)) {
      this.mountHelp = (await sh(this.bin, ['mount', '--help'], { allowFail: true })).stdout;
    } else {
      this.notes.push('`bkfs mount` does not exist yet: mount, read and file-restore figures are n/a');
    }
    if (/^\s+restore\b/m.test(this.help)) {
      this.restoreHelp = (await sh(this.bin, ['restore', '--help'], { allowFail: true })).stdout;
    } else {
      this.notes.push('`bkfs restore` does not exist yet: disk-restore figure is n/a');
    }
    return null;
  }

  async version(): Promise<string> {
    return firstLine((await sh(this.bin, ['--version'], { allowFail: true })).stdout);
  }

  /** user+sys CPU seconds of the last full backup's process tree (bkfs, qemu-img, qemu-nbd). */
  lastFullCpuSecs = NaN;

  async full(slot: string, src: string): Promise<number> {
    await this.bkfs(['-r', this.repo(slot), 'init']);
    const tf = path.join(this.env.dir, 'full-time.txt');
    const r = await sh('/usr/bin/time', [
      '-f',
      '%U %S',
      '-o',
      tf,
      this.bin,
      '-r',
      this.repo(slot),
      'backup',
      'vm',
      '--disk',
      `vda=${src}`,
      '--level',
      'full',
    ]);
    const [u, sy] = fs.readFileSync(tf, 'utf8').trim().split('\n').pop()!.split(' ').map(Number);
    this.lastFullCpuSecs = (u ?? NaN) + (sy ?? NaN);
    return r.secs;
  }

  async discardSlot(slot: string): Promise<void> {
    // Bitmaps are named after checkpoint uids: the index knows which are this repository's.
    const db = new Database(path.join(this.repo(slot), 'index.db'), { readonly: true });
    const own = new Set(
      (db.prepare('SELECT bitmap FROM disks WHERE bitmap IS NOT NULL').all() as { bitmap: string }[]).map(
        (r) => r.bitmap,
      ),
    );
    db.close();
    await rmTree(this.repo(slot));
    // The discarded repository's bitmaps would otherwise stay enabled in the working image.
    const info = JSON.parse((await sh('qemu-img', ['info', '--output=json', this.image])).stdout) as {
      'format-specific'?: { data?: { bitmaps?: { name: string }[] } };
    };
    for (const b of info['format-specific']?.data?.bitmaps ?? []) {
      if (own.has(b.name)) await sh('qemu-img', ['bitmap', '--remove', this.image, b.name]);
    }
  }

  async inc(_i: number, src: string): Promise<number> {
    return (
      await this.bkfs(['-r', this.repo('main'), 'backup', 'vm', '--disk', `vda=${src}`, '--level', 'inc'])
    ).secs;
  }

  async storedBytes(): Promise<number> {
    return allocatedBytes(this.repo('main'));
  }

  /** Index bytes (index.db plus -wal) of the main repository. */
  indexBytes(): number {
    let n = 0;
    for (const f of ['index.db', 'index.db-wal']) {
      const p = path.join(this.repo('main'), f);
      if (fs.existsSync(p)) n += fs.statSync(p).size;
    }
    return n;
  }

  async mount(k: number, mnt: string): Promise<Mounted> {
    if (!this.mountHelp) throw new NotSupported('`bkfs mount` does not exist yet');
    await fsp.mkdir(mnt, { recursive: true });
    const t0 = process.hrtime.bigint();
    const args = ['-r', this.repo('main'), 'mount'];
    if (/--foreground/.test(this.mountHelp)) args.push('--foreground');
    args.push(`vm@check${k + 1}`, mnt);
    const bg = startBg(this.bin, args);
    const hasUmount = /^\s+umount\b/m.test(this.help);
    return fuseProcessMount(
      bg,
      mnt,
      path.join(mnt, 'vda.raw'),
      t0,
      hasUmount
        ? async () => void (await sh(this.bin, ['-r', this.repo('main'), 'umount', mnt], { allowFail: true }))
        : undefined,
    );
  }

  async restoreDisk(k: number, outDir: string): Promise<Restored> {
    if (!this.restoreHelp) throw new NotSupported('`bkfs restore` does not exist yet');
    await fsp.mkdir(outDir, { recursive: true });
    const file = path.join(outDir, 'vda.raw');
    const args = ['-r', this.repo('main'), 'restore', `vm@check${k + 1}`];
    const h = this.restoreHelp;
    if (/--disk\b/.test(h)) args.push('--disk', 'vda');
    if (/--format\b/.test(h)) args.push('--format', 'raw');
    if (/-o, --output\b|--output\b/.test(h)) args.push('--output', file);
    else if (/--to\b/.test(h)) args.push('--to', file);
    else if (/--target\b/.test(h)) args.push('--target', file);
    else args.push(file);
    await this.bkfs(args);
    if (fs.existsSync(file)) return { file, format: 'raw' };
    const made = (await fsp.readdir(outDir)).filter((f) => !f.endsWith('.xml'));
    if (made.length !== 1) throw new Error(`bkfs restore left ${JSON.stringify(made)} in ${outDir}`);
    return { file: path.join(outDir, made[0] as string), format: 'raw' };
  }
}

// ---------------------------------------------------------------------------------------------
// virtnbdbackup

async function libvirtUp(): Promise<boolean> {
  const r = await sh('virsh', ['-q', '-c', 'qemu:///system', 'version'], {
    allowFail: true,
    timeoutMs: 30000,
  });
  return r.code === 0;
}

/**
 * Start virtlogd/libvirtd when libvirt is not reachable (this machine is shared: someone may stop
 * the daemons between two backups). Daemons started here are recorded for the bash trap, which
 * stops them by PID when bench/run ends.
 */
async function ensureLibvirt(): Promise<void> {
  if (await libvirtUp()) return;
  for (const d of ['virtlogd', 'libvirtd']) {
    if ((await sh('pgrep', ['-x', d], { allowFail: true })).code === 0) continue;
    if (!(await have(d))) throw new Error(`${d} is not installed`);
    log(`starting ${d} (libvirt is not reachable)`);
    await sh(d, ['-d'], { allowFail: true });
    const pidFile = `/run/${d}.pid`;
    await waitUntil(
      `${d} pid file`,
      () => fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '',
      undefined,
      20000,
    ).catch(() => undefined);
    const pid = Number(fs.existsSync(pidFile) ? fs.readFileSync(pidFile, 'utf8').trim() : NaN);
    if (pid > 0) registerDaemon(pid, d);
  }
  await waitUntil('libvirt', libvirtUp, undefined, 30000);
}

export class VirtNbdBackup extends Tool {
  readonly id = 'virtnbdbackup';
  readonly label = 'virtnbdbackup';
  readonly source = 'qcow2' as const;
  private domain = `bkfs-bench-${process.pid}`;
  private defined = false;
  private running = false;

  async check(): Promise<string | null> {
    for (const c of ['virtnbdbackup', 'virtnbdrestore', 'virtnbdmap', 'virsh', 'nbdkit', 'nbdfuse']) {
      if (!(await have(c))) return `${c} is not installed`;
    }
    if (!fs.existsSync('/usr/bin/virtnbd-nbdkit-plugin')) return 'virtnbd-nbdkit-plugin not found';
    await ensureLibvirt().catch(() => undefined);
    const r = await sh('virsh', ['-c', 'qemu:///system', 'version'], { allowFail: true, timeoutMs: 30000 });
    if (r.code !== 0) return `libvirt is not reachable: ${firstLine(r.stderr)}`;
    if (!/Running hypervisor: QEMU/i.test(r.stdout)) return `libvirt has no QEMU driver: ${r.stdout.trim()}`;
    return null;
  }

  async version(): Promise<string> {
    const r = await sh('virtnbdbackup', ['-V'], { allowFail: true });
    const v = await sh('virsh', ['-c', 'qemu:///system', 'version', '--daemon'], { allowFail: true });
    const lib =
      /daemon: libvirt ([\d.]+)/.exec(v.stdout)?.[1] ?? /libvirt ([\d.]+)/.exec(v.stdout)?.[1] ?? '?';
    return `${firstLine(r.stdout || r.stderr)} (libvirt ${lib})`;
  }

  private virsh(args: string[], allowFail = false): Promise<import('./common').ShResult> {
    return sh('virsh', ['-q', '-c', 'qemu:///system', ...args], { allowFail, timeoutMs: 120000 });
  }

  override async prepare(env: ToolEnv): Promise<void> {
    await super.prepare(env);
    // libvirt's QEMU runs as libvirt-qemu: it must be able to reach the image (it chowns the file).
    for (let d = env.dir; d !== '/' && d !== path.dirname(d); d = path.dirname(d)) {
      const st = fs.statSync(d);
      if ((st.mode & 0o001) === 0) fs.chmodSync(d, st.mode | 0o711);
    }
    const xml = `<domain type='qemu'>
  <name>${this.domain}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${this.image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
`;
    const xmlFile = path.join(env.dir, 'domain.xml');
    await fsp.writeFile(xmlFile, xml);
    registerDomain(this.domain);
    await this.virsh(['define', xmlFile]);
    this.defined = true;
    this.notes.push(
      "libvirt domain type='qemu', started paused around each backup (virtnbdbackup backs up running domains; a shut-off one only gets copies)",
      'restores to qcow2 (virtnbdrestore has no raw output); mount = virtnbdmap with nbdfuse instead of /dev/nbd0 (no nbd kernel module here), incrementals replayed into its cow overlay at mount time',
    );
  }

  override async beforeBackup(): Promise<void> {
    await ensureLibvirt();
    await this.virsh(['start', '--paused', this.domain]);
    this.running = true;
  }

  override async afterBackup(): Promise<void> {
    if (!this.running) return;
    await this.virsh(['destroy', this.domain]);
    this.running = false;
  }

  private out(slot: string): string {
    return path.join(this.env.dir, `out-${slot}`);
  }

  private async backup(level: string, dir: string): Promise<number> {
    return (
      await sh(
        'virtnbdbackup',
        ['-d', this.domain, '-l', level, '-o', dir, '-n', '-S', path.join(this.env.dir, 'scratch')],
        {
          timeoutMs: 3600_000,
        },
      )
    ).secs;
  }

  async full(slot: string): Promise<number> {
    await fsp.mkdir(path.join(this.env.dir, 'scratch'), { recursive: true });
    return this.backup('full', this.out(slot));
  }

  async discardSlot(slot: string): Promise<void> {
    await rmTree(this.out(slot));
  }

  async inc(): Promise<number> {
    return this.backup('inc', this.out('main'));
  }

  async storedBytes(): Promise<number> {
    const dir = this.out('main');
    let n = 0;
    for (const f of await fsp.readdir(dir))
      if (f.endsWith('.data')) n += await allocatedBytes(path.join(dir, f));
    // Metadata (checkpoint XML, logs) is small; count everything.
    return Math.max(n, await allocatedBytes(dir));
  }

  private dataFiles(k: number): string[] {
    const dir = this.out('main');
    const files = [path.join(dir, 'vda.full.data')];
    for (let j = 1; j <= k; j++) files.push(path.join(dir, `vda.inc.virtnbdbackup.${j}.data`));
    for (const f of files) if (!fs.existsSync(f)) throw new Error(`${f} is missing`);
    return files;
  }

  /** virtnbdmap's nbdkit command (qemu/util.py startNbdkitProcess), on a unix socket. */
  private startNbdkit(work: string, map: string, full: string, filters: string[]): { bg: Bg; sock: string } {
    const sock = path.join(work, `nbdkit${filters.join('').length}.sock`);
    fs.rmSync(sock, { force: true });
    const args = ['-f', '-U', sock, '-e', 'sda', ...filters.map((f) => `--filter=${f}`), 'python'];
    args.push(
      '/usr/bin/virtnbd-nbdkit-plugin',
      'maxlen=4096',
      `blockmap=${map}`,
      `disk=${full}`,
      'debug=0',
      '-t',
      '1',
    );
    return { bg: startBg('nbdkit', args, { env: { ...process.env, TMPDIR: work } }), sock };
  }

  /** Filter order that works: virtnbdmap's own, unless a read of its first MiB fails (decided once). */
  private filters: string[] | undefined;

  private async chooseFilters(work: string, map: string, full: string): Promise<string[]> {
    if (this.filters) return this.filters;
    const own = ['blocksize', 'cow'];
    const kit = this.startNbdkit(work, map, full, own);
    let err = '';
    try {
      await waitUntil('nbdkit (virtnbd plugin)', () => fs.existsSync(kit.sock), kit.bg, 60000);
      const uri = `nbd+unix:///sda?socket=${kit.sock}`;
      const r = await sh('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 1M', uri], {
        allowFail: true,
        timeoutMs: 60000,
      });
      if (r.code !== 0 || /error|failed/i.test(r.stdout + r.stderr)) err = firstLine(r.stderr || r.stdout);
    } finally {
      await kit.bg.stop(20000);
    }
    if (err === '') {
      this.filters = own;
    } else {
      const m = /RuntimeError: ([^\n]*)/.exec(kit.bg.stderr());
      this.filters = ['cow', 'blocksize'];
      this.notes.push(
        `virtnbdmap's own nbdkit command (--filter=blocksize --filter=cow) cannot read this backup: the cow filter reads 64 KiB blocks ` +
          `and the plugin refuses reads that are not smaller than the stream frame they start in` +
          `${m ? ` ("${m[1]}")` : ''}, which fails on the disk's first frame (the 64 KiB GPT area); measured with the two filters swapped ` +
          `(the plugin then gets the 4 KiB reads it expects)`,
      );
      log(
        `virtnbdbackup: virtnbdmap's filter order fails here (${err}); using --filter=cow --filter=blocksize`,
      );
    }
    return this.filters;
  }

  async mount(k: number, mnt: string): Promise<Mounted> {
    const files = this.dataFiles(k);
    const work = `${mnt}.vnbd`;
    await rmTree(work);
    await fsp.mkdir(work, { recursive: true });
    const map = path.join(work, 'block.map');
    const full = files[0] as string;
    if (!this.filters) {
      await sh(PYTHON, [VNBD_MAP, 'blockmap', map, full]);
      await this.chooseFilters(work, map, full);
    }
    const t0 = process.hrtime.bigint();
    await sh(PYTHON, [VNBD_MAP, 'blockmap', map, files.join(',')]);
    const kit = this.startNbdkit(work, map, full, this.filters as string[]);
    const stopKit = async (): Promise<void> => {
      await kit.bg.stop(20000);
      await rmTree(work);
    };
    try {
      await waitUntil('nbdkit (virtnbd plugin)', () => fs.existsSync(kit.sock), kit.bg, 60000);
      const uri = `nbd+unix:///sda?socket=${kit.sock}`;
      if (k > 0) await sh(PYTHON, [VNBD_MAP, 'replay', uri, map], { timeoutMs: 3600_000 });
      return await nbdfuseMount(uri, mnt, t0, stopKit);
    } catch (e) {
      await stopKit();
      throw e;
    }
  }

  async restoreDisk(k: number, outDir: string): Promise<Restored> {
    const args = ['-i', this.out('main'), '-o', outDir, '-n', '-L', path.join(this.env.dir, 'restore.log')];
    if (k < this.env.checkpoints - 1) args.push('-u', `virtnbdbackup.${k}`);
    await ensureLibvirt(); // virtnbdrestore connects to libvirt even without --define
    await sh('virtnbdrestore', args, { timeoutMs: 3600_000 });
    const img = (await fsp.readdir(outDir)).filter((f) => !f.endsWith('.xml') && !f.endsWith('.log'));
    if (img.length !== 1) throw new Error(`virtnbdrestore left ${JSON.stringify(img)} in ${outDir}`);
    return { file: path.join(outDir, img[0] as string), format: 'qcow2' };
  }

  override async teardown(): Promise<void> {
    if (this.defined)
      await ensureLibvirt().catch((e: unknown) => log(`virtnbdbackup: ${(e as Error).message}`));
    if (this.running) await this.afterBackup().catch(() => undefined);
    if (this.defined) {
      const st = await this.virsh(['domstate', this.domain], true);
      if (st.code === 0 && !/shut off/.test(st.stdout)) await this.virsh(['destroy', this.domain], true);
      await this.virsh(['undefine', this.domain, '--checkpoints-metadata'], true);
      this.defined = false;
    }
    unregisterDomain(this.domain);
  }
}

// ---------------------------------------------------------------------------------------------
// qemu's own backing chain

export class QemuChain extends Tool {
  readonly id = 'qemu-chain';
  readonly label = 'qemu chain';
  readonly source = 'qcow2' as const;

  async check(): Promise<string | null> {
    for (const c of ['qemu-img', 'qemu-nbd', 'nbdfuse']) if (!(await have(c))) return `${c} is not installed`;
    const r = await sh(PYTHON, ['-c', 'import nbd'], { allowFail: true });
    if (r.code !== 0) return 'python3-libnbd is not installed';
    return null;
  }

  async version(): Promise<string> {
    return firstLine((await sh('qemu-img', ['--version'])).stdout);
  }

  override async prepare(env: ToolEnv): Promise<void> {
    await super.prepare(env);
    this.notes.push(
      'full = qemu-img convert to qcow2; inc = the dirty bitmap exported by qemu-nbd -B, its dirty clusters copied (libnbd) into a new qcow2 overlay on the previous one; read with qemu-nbd + nbdfuse, restore with qemu-img convert',
    );
  }

  private out(slot: string): string {
    return path.join(this.env.dir, `chain-${slot}`);
  }

  private layer(k: number): string {
    return path.join(this.out('main'), k === 0 ? 'full.qcow2' : `inc${k}.qcow2`);
  }

  async full(slot: string, src: string): Promise<number> {
    const dir = this.out(slot);
    await fsp.mkdir(dir, { recursive: true });
    const t0 = process.hrtime.bigint();
    await sh('qemu-img', ['bitmap', '--add', src, `qchain-${slot}.0`]);
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', src, path.join(dir, 'full.qcow2')]);
    return Number(process.hrtime.bigint() - t0) / 1e9;
  }

  async discardSlot(slot: string): Promise<void> {
    await rmTree(this.out(slot));
    await sh('qemu-img', ['bitmap', '--remove', this.image, `qchain-${slot}.0`]);
  }

  async inc(i: number, src: string): Promise<number> {
    const t0 = process.hrtime.bigint();
    const prev = `qchain-main.${i - 1}`;
    await sh('qemu-img', ['bitmap', '--add', src, `qchain-main.${i}`]);
    const dir = this.out('main');
    const extents = path.join(dir, `.dirty${i}.json`);
    const dst = this.layer(i);
    await sh('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      path.basename(this.layer(i - 1)),
      '-F',
      'qcow2',
      dst,
    ]);
    let s: NbdServer | undefined;
    let d: NbdServer | undefined;
    try {
      s = await qemuNbd(src, path.join(dir, 'src.sock'), { readOnly: true, bitmap: prev });
      const r = await sh(PYTHON, [HELPER, 'dirty', s.uri, `qemu:dirty-bitmap:${prev}`]);
      await fsp.writeFile(extents, r.stdout);
      d = await qemuNbd(dst, path.join(dir, 'dst.sock'), { readOnly: false });
      await sh(PYTHON, [HELPER, 'copy', s.uri, d.uri, extents]);
    } finally {
      await d?.stop();
      await s?.stop();
    }
    await sh('qemu-img', ['bitmap', '--remove', src, prev]);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    await fsp.rm(extents, { force: true });
    return secs;
  }

  async storedBytes(): Promise<number> {
    return allocatedBytes(this.out('main'));
  }

  async mount(k: number, mnt: string): Promise<Mounted> {
    const t0 = process.hrtime.bigint();
    const s = await qemuNbd(this.layer(k), `${mnt}.sock`, { readOnly: true });
    try {
      return await nbdfuseMount(s.uri, mnt, t0, () => s.stop());
    } catch (e) {
      await s.stop();
      throw e;
    }
  }

  async restoreDisk(k: number, outDir: string): Promise<Restored> {
    const file = path.join(outDir, 'disk.raw');
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', this.layer(k), file]);
    return { file, format: 'raw' };
  }
}

// ---------------------------------------------------------------------------------------------
// restic

interface ResticSnapshot {
  id: string;
  short_id: string;
  time: string;
}

export class Restic extends Tool {
  readonly id = 'restic';
  readonly label = 'restic';
  readonly source = 'raw' as const;

  async check(): Promise<string | null> {
    return (await have('restic')) ? null : 'restic is not installed';
  }

  async version(): Promise<string> {
    return firstLine((await sh('restic', ['version'])).stdout);
  }

  override async prepare(env: ToolEnv): Promise<void> {
    await super.prepare(env);
    this.notes.push(
      'backup of the raw image from stdin (restic backup --stdin); repository format 2 (zstd, auto)',
    );
  }

  private envFor(slot: string): NodeJS.ProcessEnv {
    return {
      ...process.env,
      RESTIC_PASSWORD: 'x',
      RESTIC_REPOSITORY: path.join(this.env.dir, `repo-${slot}`),
      RESTIC_CACHE_DIR: path.join(this.env.dir, 'cache'),
    };
  }

  private backup(slot: string, src: string): Promise<number> {
    return sh('restic', ['backup', '-q', '--host', 'bench', '--stdin', '--stdin-filename', 'disk.raw'], {
      env: this.envFor(slot),
      stdinFile: src,
      timeoutMs: 3600_000,
    }).then((r) => r.secs);
  }

  async full(slot: string, src: string): Promise<number> {
    await sh('restic', ['init', '-q'], { env: this.envFor(slot) });
    return this.backup(slot, src);
  }

  async discardSlot(slot: string): Promise<void> {
    await rmTree(path.join(this.env.dir, `repo-${slot}`));
  }

  inc(_i: number, src: string): Promise<number> {
    return this.backup('main', src);
  }

  async storedBytes(): Promise<number> {
    return allocatedBytes(path.join(this.env.dir, 'repo-main'));
  }

  private async snapshots(): Promise<ResticSnapshot[]> {
    const r = await sh('restic', ['snapshots', '--json'], { env: this.envFor('main') });
    return (JSON.parse(r.stdout) as ResticSnapshot[]).sort((a, b) => (a.time < b.time ? -1 : 1));
  }

  async mount(k: number, mnt: string): Promise<Mounted> {
    const snaps = await this.snapshots();
    const snap = snaps[k];
    if (!snap) throw new Error(`restic has ${snaps.length} snapshots, not ${k + 1}`);
    await fsp.mkdir(mnt, { recursive: true });
    const t0 = process.hrtime.bigint();
    const bg = startBg('restic', ['mount', mnt], { env: this.envFor('main') });
    return fuseProcessMount(bg, mnt, path.join(mnt, 'ids', snap.short_id, 'disk.raw'), t0);
  }

  async restoreDisk(k: number, outDir: string): Promise<Restored> {
    const snap = (await this.snapshots())[k];
    if (!snap) throw new Error(`no restic snapshot ${k}`);
    await sh('restic', ['restore', '-q', snap.id, '--target', outDir], {
      env: this.envFor('main'),
      timeoutMs: 3600_000,
    });
    return { file: path.join(outDir, 'disk.raw'), format: 'raw' };
  }
}

// ---------------------------------------------------------------------------------------------
// borg

export class Borg extends Tool {
  readonly id = 'borg';
  readonly label = 'borg';
  readonly source = 'raw' as const;
  private archives = 0;

  async check(): Promise<string | null> {
    if (!(await have('borg'))) return 'borgbackup is not installed';
    const r = await sh('/usr/bin/python3', ['-c', 'import llfuse'], { allowFail: true });
    if (r.code !== 0) this.notes.push('python3-llfuse is missing: borg mount figures are n/a');
    return null;
  }

  async version(): Promise<string> {
    return firstLine((await sh('borg', ['--version'])).stdout);
  }

  override async prepare(env: ToolEnv): Promise<void> {
    await super.prepare(env);
    this.notes.push(
      "borg create --read-special of the raw image, --chunker-params fixed,4194304 (borg's setting for disk images), default lz4, --encryption none",
    );
  }

  private envFor(slot: string): NodeJS.ProcessEnv {
    return {
      ...process.env,
      BORG_REPO: path.join(this.env.dir, `repo-${slot}`),
      BORG_BASE_DIR: path.join(this.env.dir, 'base'),
      BORG_PASSPHRASE: '',
      BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes',
      BORG_RELOCATED_REPO_ACCESS_IS_OK: 'yes',
    };
  }

  private async create(slot: string, src: string, name: string): Promise<number> {
    const r = await sh(
      'borg',
      [
        'create',
        '--read-special',
        '--files-cache=disabled',
        '--chunker-params',
        'fixed,4194304',
        `::${name}`,
        path.basename(src),
      ],
      { env: this.envFor(slot), cwd: path.dirname(src), timeoutMs: 3600_000 },
    );
    return r.secs;
  }

  async full(slot: string, src: string): Promise<number> {
    await sh('borg', ['init', '-e', 'none'], { env: this.envFor(slot) });
    this.archives = 1;
    return this.create(slot, src, 's0');
  }

  async discardSlot(slot: string): Promise<void> {
    await rmTree(path.join(this.env.dir, `repo-${slot}`));
  }

  inc(i: number, src: string): Promise<number> {
    this.archives = i + 1;
    return this.create('main', src, `s${i}`);
  }

  async storedBytes(): Promise<number> {
    return allocatedBytes(path.join(this.env.dir, 'repo-main'));
  }

  async mount(k: number, mnt: string): Promise<Mounted> {
    await fsp.mkdir(mnt, { recursive: true });
    const t0 = process.hrtime.bigint();
    const bg = startBg('borg', ['mount', '-f', `::s${k}`, mnt], { env: this.envFor('main') });
    return fuseProcessMount(bg, mnt, path.join(mnt, 'disk.raw'), t0);
  }

  async restoreDisk(k: number, outDir: string): Promise<Restored> {
    await fsp.mkdir(outDir, { recursive: true });
    await sh('borg', ['extract', '--sparse', `::s${k}`, 'disk.raw'], {
      env: this.envFor('main'),
      cwd: outDir,
      timeoutMs: 3600_000,
    });
    return { file: path.join(outDir, 'disk.raw'), format: 'raw' };
  }
}

// ---------------------------------------------------------------------------------------------
// dd of the raw image: the ceiling

export class DdRaw extends Tool {
  readonly id = 'dd';
  readonly label = 'dd (raw file)';
  readonly source = 'raw' as const;
  override hasInc = false;
  /** Raw files of the states, kept by the orchestrator (k -> path). */
  readonly raws = new Map<number, string>();
  private copies = 0;

  async check(): Promise<string | null> {
    return null;
  }

  async version(): Promise<string> {
    return firstLine((await sh('dd', ['--version'])).stdout);
  }

  override async prepare(env: ToolEnv): Promise<void> {
    await super.prepare(env);
    this.notes.push(
      'the ceiling: backup = dd of the raw image (conv=sparse,fsync), no incremental; stored = one sparse copy per checkpoint; reads from the raw file itself',
    );
  }

  private async copy(src: string, dst: string): Promise<number> {
    return (await sh('dd', [`if=${src}`, `of=${dst}`, 'bs=1M', 'conv=sparse,fsync', 'status=none'])).secs;
  }

  async full(slot: string, src: string): Promise<number> {
    const dst = path.join(this.env.dir, `copy-${slot}.raw`);
    const secs = await this.copy(src, dst);
    this.copies = await allocatedBytes(dst);
    await fsp.rm(dst, { force: true });
    return secs;
  }

  async discardSlot(): Promise<void> {}

  inc(): Promise<number> {
    throw new NotSupported('dd has no incremental');
  }

  /** Stored bytes if every checkpoint were kept as a sparse copy. */
  perCheckpoint: number[] = [];

  async storedBytes(): Promise<number> {
    return this.perCheckpoint.length > 0 ? this.perCheckpoint.reduce((a, b) => a + b, 0) : this.copies;
  }

  async mount(k: number): Promise<Mounted> {
    const f = this.raws.get(k);
    if (!f) throw new NotSupported(`no raw file of checkpoint ${k} kept`);
    return { file: f, setupSecs: 0, unmount: async () => undefined };
  }

  async restoreDisk(k: number, outDir: string): Promise<Restored> {
    const f = this.raws.get(k);
    if (!f) throw new NotSupported(`no raw file of checkpoint ${k} kept`);
    await fsp.mkdir(outDir, { recursive: true });
    const file = path.join(outDir, 'disk.raw');
    await this.copy(f, file);
    return { file, format: 'raw' };
  }
}

export function logNotes(t: Tool): void {
  for (const n of t.notes) log(`  ${t.id}: ${n}`);
}
