/**
 * A real libvirt for tests: starts `virtlogd -d` / `libvirtd -d` when they are not running (and
 * stops exactly those, by PID, afterwards), and runs small TRANSIENT QEMU domains (TCG: nested KVM
 * hangs on the test machine) that boot the host's kernel and initrd from /boot with no root
 * filesystem. The guest sits in its initramfs waiting for a root device that never comes; it
 * writes nothing to its disks, so the only writes are the test's: "guest-like" writes made inside
 * the running QEMU with HMP `qemu-io` on the disk's device (through the block layer, so the dirty
 * bitmaps record them), mirrored by the test onto raw reference copies.
 *
 * Needs (Debian): libvirt-daemon-system, libvirt-clients, qemu-system-x86, linux-image-amd64.
 * Must run as root (qemu:///system). Every domain is destroyed by its owner's `finally`/`after`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run, processAlive } from '../../src/util/proc';

export const URI = 'qemu:///system';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** virsh against the system libvirt; throws with virsh's stderr on failure. */
export async function virsh(...args: string[]): Promise<string> {
  const r = await run('virsh', ['-c', URI, ...args], {
    allowFail: true,
    env: { ...process.env, LC_ALL: 'C' },
  });
  if (r.code !== 0) throw new Error(`virsh ${args.join(' ')}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}

export async function virshTry(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return run('virsh', ['-c', URI, ...args], { allowFail: true, env: { ...process.env, LC_ALL: 'C' } });
}

/** Why libvirt tests cannot run here, or null. */
export function libvirtMissing(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (qemu:///system)';
  for (const bin of [
    '/usr/bin/virsh',
    '/usr/sbin/libvirtd',
    '/usr/sbin/virtlogd',
    '/usr/bin/qemu-system-x86_64',
  ]) {
    if (!fs.existsSync(bin)) return `${bin} is missing (run scripts/setup.sh)`;
  }
  if (!kernel()) return 'no kernel and initrd in /boot (install linux-image-amd64)';
  return null;
}

/** The newest /boot/vmlinuz-* that has an initrd. */
export function kernel(): { kernel: string; initrd: string } | null {
  const files = fs.existsSync('/boot') ? fs.readdirSync('/boot') : [];
  const versions = files
    .filter((f) => f.startsWith('vmlinuz-'))
    .map((f) => f.slice('vmlinuz-'.length))
    .filter((v) => files.includes(`initrd.img-${v}`))
    .sort();
  const v = versions[versions.length - 1];
  return v ? { kernel: `/boot/vmlinuz-${v}`, initrd: `/boot/initrd.img-${v}` } : null;
}

/** PID of a running (not zombie) process named `name`, or null. */
async function pidOf(name: string): Promise<number | null> {
  const r = await run('pgrep', ['-x', name], { allowFail: true });
  for (const line of r.stdout.split('\n')) {
    const pid = Number(line.trim());
    if (pid > 0 && procState(pid) !== null && procState(pid) !== 'Z') return pid;
  }
  return null;
}

/** The daemons this process started (stopped by `stopDaemons`). */
export interface Daemons {
  started: { name: string; pid: number }[];
}

/** The daemon's own PID from its pid file (the `-d` parent exits), once it is alive. */
function pidFromFile(name: string): number | null {
  try {
    const pid = Number(fs.readFileSync(`/run/${name}.pid`, 'utf8').trim());
    if (!(pid > 0)) return null;
    const comm = fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
    return comm === name && procState(pid) !== 'Z' ? pid : null;
  } catch {
    return null;
  }
}

/** Start virtlogd and libvirtd unless they run; wait until libvirt answers. */
export async function startDaemons(): Promise<Daemons> {
  const started: { name: string; pid: number }[] = [];
  for (const name of ['virtlogd', 'libvirtd']) {
    if ((await pidOf(name)) !== null) continue;
    await run(`/usr/sbin/${name}`, ['-d']);
    let pid: number | null = null;
    for (let i = 0; i < 600 && pid === null; i++) {
      pid = pidFromFile(name);
      if (pid === null) await sleep(50);
    }
    if (pid === null) throw new Error(`${name} -d did not start`);
    started.push({ name, pid });
  }
  for (let i = 0; ; i++) {
    const r = await virshTry('version');
    if (r.code === 0) break;
    if (i > 600) throw new Error(`libvirtd does not answer: ${r.stderr}`);
    await sleep(50);
  }
  return { started };
}

/**
 * Stop the daemons `startDaemons` started, by PID (libvirtd first), unless libvirt still has
 * domains: then someone else (another test or benchmark on this machine) uses the daemons we
 * started, and they are left running.
 */
export async function stopDaemons(d: Daemons): Promise<void> {
  if (d.started.length === 0) return;
  const others = await virshTry('list', '--all', '--name');
  if (others.code === 0 && others.stdout.trim() !== '') {
    process.stderr.write(
      `libvirt test helper: leaving libvirtd running, it has domains: ${others.stdout.trim()}\n`,
    );
    return;
  }
  for (const { pid } of [...d.started].reverse()) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      continue;
    }
    for (let i = 0; i < 400 && processAlive(pid); i++) await sleep(50);
    if (processAlive(pid)) process.kill(pid, 'SIGKILL');
  }
}

export interface DiskDef {
  target: string;
  /** Image path; omitted for an empty cdrom. */
  file?: string;
  format: 'qcow2' | 'raw';
  device?: 'disk' | 'cdrom';
  bus?: 'scsi' | 'ide' | 'virtio';
  readonly?: boolean;
}

/** Domain XML for a test VM: TCG, host kernel, no root fs, disks on virtio-scsi. */
export function domainXml(name: string, disks: DiskDef[]): string {
  const k = kernel();
  if (!k) throw new Error('no kernel in /boot');
  const disk = (d: DiskDef) =>
    [
      `    <disk type='file' device='${d.device ?? 'disk'}'>`,
      `      <driver name='qemu' type='${d.format}'/>`,
      ...(d.file ? [`      <source file='${d.file}'/>`] : []),
      `      <target dev='${d.target}' bus='${d.bus ?? 'scsi'}'/>`,
      ...(d.readonly ? ['      <readonly/>'] : []),
      '    </disk>',
    ].join('\n');
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${k.kernel}</kernel>
    <initrd>${k.initrd}</initrd>
    <cmdline>console=ttyS0 panic=0 root=/dev/bkfs-no-root rootdelay=100000 quiet</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>preserve</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' model='virtio-scsi' index='0'/>
${disks.map(disk).join('\n')}
    <serial type='pty'/>
    <console type='pty'/>
  </devices>
</domain>
`;
}

/** A running transient domain. */
export class TestDomain {
  private qdevs = new Map<string, string>();

  private constructor(
    readonly name: string,
    private readonly disks: DiskDef[],
  ) {}

  /** Create (start) a transient domain; the XML file goes to `dir`. */
  static async create(dir: string, name: string, disks: DiskDef[]): Promise<TestDomain> {
    const xml = path.join(dir, `${name}.xml`);
    fs.writeFileSync(xml, domainXml(name, disks));
    await virsh('create', xml);
    return new TestDomain(name, disks);
  }

  /**
   * Destroy the domain. If libvirtd is gone (someone stopped it), its QEMU keeps running: then kill
   * that QEMU by the PID in libvirt's pid file.
   */
  async destroy(): Promise<void> {
    const r = await virshTry('destroy', this.name);
    if (r.code === 0 || /not found|not running/i.test(r.stderr)) return;
    const pidFile = `/run/libvirt/qemu/${this.name}.pid`;
    const pid = fs.existsSync(pidFile) ? Number(fs.readFileSync(pidFile, 'utf8').trim()) : 0;
    const cmd =
      pid > 0 && fs.existsSync(`/proc/${pid}/cmdline`) ? fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8') : '';
    if (cmd.includes(`guest=${this.name},`)) {
      process.kill(pid, 'SIGKILL');
      return;
    }
    throw new Error(`virsh destroy ${this.name}: ${r.stderr.trim()}`);
  }

  /** qdev id (`scsi0-0-0-0`) and block node of a disk target, from `info block` / query-block. */
  private async qdev(target: string): Promise<string> {
    const cached = this.qdevs.get(target);
    if (cached) return cached;
    const file = this.disks.find((d) => d.target === target)?.file;
    if (!file) throw new Error(`no disk ${target}`);
    const info = await virsh('qemu-monitor-command', this.name, '--hmp', 'info block');
    const re = /^\S+: (.+?) \([^)]*\)\r?\n\s+Attached to:\s+(\S+)/gm;
    for (let m = re.exec(info); m; m = re.exec(info)) this.qdevs.set(path.basename(m[1]!), m[2]!);
    const q = this.qdevs.get(path.basename(file));
    if (!q) throw new Error(`disk ${target} not in 'info block': ${info}`);
    this.qdevs.set(target, q);
    return q;
  }

  /**
   * qemu-io commands on a disk inside the running VM (e.g. 'write -P 0x5a 1M 64k'). HMP answers
   * nothing when the command ran; qemu-io's own output goes to QEMU's log.
   */
  async qemuIo(target: string, cmd: string): Promise<void> {
    const q = await this.qdev(target);
    const out = await virsh('qemu-monitor-command', this.name, '--hmp', `qemu-io -d ${q} "${cmd}"`);
    if (out.trim() !== '') throw new Error(`qemu-io ${cmd} on ${target}: ${out.trim()}`);
  }

  /** Remove a dirty bitmap from a disk behind libvirt's back (QMP block-dirty-bitmap-remove). */
  async removeBitmap(target: string, bitmap: string): Promise<void> {
    const q = await this.qdev(target);
    const blocks = JSON.parse(
      await virsh('qemu-monitor-command', this.name, '{"execute":"query-block"}'),
    ) as {
      return: { qdev?: string; inserted?: { 'node-name': string } }[];
    };
    const node = blocks.return.find((b) => b.qdev === q)?.inserted?.['node-name'];
    if (!node) throw new Error(`no block node for ${target}`);
    await virsh(
      'qemu-monitor-command',
      this.name,
      JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node, name: bitmap } }),
    );
  }

  async checkpointNames(): Promise<string[]> {
    return (await virsh('checkpoint-list', this.name, '--name'))
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '');
  }

  /** `Operation:` of the running job, or null. */
  async job(): Promise<string | null> {
    const info = await virsh('domjobinfo', this.name);
    if (/^Job type:\s*None/m.test(info)) return null;
    return /^Operation:\s*(\S+)/m.exec(info)?.[1] ?? 'Unknown';
  }
}

/**
 * A `virsh` wrapper for PATH that stops its caller (SIGSTOP) at its first `backup-dumpxml`, i.e.
 * right after bkfs's `backup-begin`, and writes the caller's PID to `stopFile`; then runs the real
 * virsh. It gives tests a deterministic point "in the middle of a backup" to kill or interrupt
 * bkfs at, without relying on timing. Returns the directory to put first in PATH.
 */
export function stopAtBackupDumpxml(dir: string, stopFile: string): string {
  const bin = path.join(dir, 'virsh-wrapper');
  fs.mkdirSync(bin, { recursive: true });
  fs.writeFileSync(
    path.join(bin, 'virsh'),
    `#!/bin/sh
for a in "$@"; do
  if [ "$a" = backup-dumpxml ] && [ ! -e '${stopFile}' ]; then
    echo $PPID > '${stopFile}.tmp' && mv '${stopFile}.tmp' '${stopFile}'
    kill -STOP $PPID
  fi
done
exec /usr/bin/virsh "$@"
`,
    { mode: 0o755 },
  );
  return bin;
}

/** Process state letter from /proc/PID/stat ('T' = stopped), or null when gone. */
export function procState(pid: number): string | null {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2, s.lastIndexOf(')') + 3);
  } catch {
    return null;
  }
}

/** PIDs of the children of `pid` whose command line contains `needle`. */
export function childrenMatching(pid: number, needle: string): number[] {
  const out: number[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid !== pid) continue;
      if (fs.readFileSync(`/proc/${e}/cmdline`, 'utf8').includes(needle)) out.push(Number(e));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** Poll `cond` until it holds (generous cap: this is about progress, not speed). */
export async function eventually(
  what: string,
  cond: () => Promise<boolean> | boolean,
  capMs = 120_000,
): Promise<void> {
  const end = Date.now() + capMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`gave up waiting: ${what}`);
    await sleep(50);
  }
}
