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

// ---------------------------------------------------------------------------------------------
// The marker guest: a TCG domain that really boots, reads its disk and writes to it.
// ---------------------------------------------------------------------------------------------

/**
 * Where the marker guest reads and writes on /dev/vda (in 512-byte sectors), and how it writes.
 * Its /init (busybox-static + a shell script, in an initrd the helper builds):
 *   1. loads virtio_pci/virtio_blk from the host kernel's modules and waits for /dev/vda;
 *   2. reads sector `markerSector` (printable characters only) and prints `BKFS-MARKER <text>`;
 *   3. `writes` times: writes sector `writeSector + i` = `BKFS-WRITE %08d\n` padded with zeros
 *      (dd conv=sync,notrunc,fsync: a real guest write that reaches the disk), then prints
 *      `BKFS-WROTE i`, and sleeps `intervalSec`;
 *   4. prints `BKFS-WRITES-DONE`, then every second drops its page cache, re-reads the marker
 *      sector and the first written sector from the disk and prints `BKFS-READ <marker> <first>`.
 * Every line goes to the serial console, which the domain writes to `consoleLog`.
 */
export interface MarkerGuestSpec {
  markerSector: number;
  writeSector: number;
  writes: number;
  intervalSec: number;
}

export const DEFAULT_MARKER_GUEST: MarkerGuestSpec = {
  markerSector: 8192, // 4 MiB: not a sector the kernel's partition scan reads
  writeSector: 16384, // 8 MiB
  writes: 40,
  intervalSec: 0.5,
};

/** The bytes of sector `i`'s guest write (what the marker guest writes at writeSector + i). */
export function markerGuestWrite(i: number): Buffer {
  const b = Buffer.alloc(512);
  b.write(`BKFS-WRITE ${String(i).padStart(8, '0')}\n`, 'latin1');
  return b;
}

/** Why the marker guest cannot run here (on top of `libvirtMissing`), or null. */
export function markerGuestMissing(): string | null {
  if (!fs.existsSync('/bin/busybox') || !isStaticBusybox('/bin/busybox'))
    return 'a static /bin/busybox is missing (apt-get install busybox-static)';
  const k = kernel();
  if (!k) return 'no kernel in /boot (install linux-image-amd64)';
  const mods = modulesDir(k.kernel);
  if (!fs.existsSync(path.join(mods, 'modules.dep')))
    return `no modules for ${path.basename(k.kernel)} in ${mods}`;
  return null;
}

function isStaticBusybox(file: string): boolean {
  // A dynamically linked ELF has a PT_INTERP program header naming /lib64/ld-linux…
  const b = fs.readFileSync(file);
  return !b.subarray(0, 4096).includes(Buffer.from('/lib64/ld-linux'));
}

function modulesDir(kernelFile: string): string {
  return `/lib/modules/${path.basename(kernelFile).slice('vmlinuz-'.length)}`;
}

/** The modules (and their dependencies, in load order) that give a guest /dev/vda. */
function virtioModules(mods: string): string[] {
  const dep = new Map<string, string[]>();
  for (const line of fs.readFileSync(path.join(mods, 'modules.dep'), 'utf8').split('\n')) {
    const [mod, deps] = line.split(':');
    if (mod && deps !== undefined) dep.set(mod, deps.trim().split(/\s+/).filter(Boolean));
  }
  const order: string[] = [];
  const visit = (m: string) => {
    if (order.includes(m)) return;
    for (const d of dep.get(m) ?? []) visit(d);
    order.push(m);
  };
  for (const want of ['virtio_pci', 'virtio_blk']) {
    const m = [...dep.keys()].find((k) => path.basename(k).replace(/\.ko(\..*)?$/, '') === want);
    if (m) visit(m); // built in when absent from modules.dep
  }
  return order;
}

/** A `newc` cpio archive (what the kernel unpacks as initramfs) of the given entries. */
function cpioNewc(entries: { name: string; mode: number; data?: Buffer; target?: string }[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  const add = (name: string, mode: number, body: Buffer) => {
    const nameBuf = Buffer.from(`${name}\0`, 'latin1');
    const hdr = Buffer.from(
      '070701' + [ino++, mode, 0, 0, 1, 0, body.length, 0, 0, 0, 0, nameBuf.length, 0].map(hex).join(''),
      'latin1',
    );
    parts.push(hdr, nameBuf, pad4(hdr.length + nameBuf.length), body, pad4(body.length));
  };
  for (const e of entries) {
    if (e.target !== undefined) add(e.name, 0o120777, Buffer.from(e.target, 'latin1'));
    else if (e.data !== undefined) add(e.name, 0o100000 | e.mode, e.data);
    else add(e.name, 0o040000 | e.mode, Buffer.alloc(0));
  }
  add('TRAILER!!!', 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

/** The marker guest's /init. */
export function markerGuestInit(spec: MarkerGuestSpec, modules: string[]): string {
  return `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/ttyS0 2>&1
for m in ${modules.map((m) => `/lib/modules/${path.basename(m)}`).join(' ')}; do insmod "$m"; done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n+1)); [ $n -gt 600 ] && { echo BKFS-NO-DISK; break; }
  sleep 0.1
done
sector() { dd if=/dev/vda bs=512 skip=$1 count=1 2>/dev/null | tr -dc 'A-Za-z0-9_.:=-' ; }
echo "BKFS-MARKER $(sector ${spec.markerSector})"
i=0
while [ $i -lt ${spec.writes} ]; do
  printf 'BKFS-WRITE %08d\\n' $i | dd of=/dev/vda bs=512 seek=$((${spec.writeSector} + i)) conv=sync,notrunc,fsync 2>/dev/null \\
    && echo "BKFS-WROTE $i" || echo "BKFS-WRITE-FAILED $i"
  i=$((i+1))
  sleep ${spec.intervalSec}
done
echo BKFS-WRITES-DONE
while true; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  echo "BKFS-READ $(sector ${spec.markerSector}) $(sector ${spec.writeSector})"
  sleep 1
done
`;
}

/** Build the marker guest's initrd into `file` (uncompressed newc cpio). */
export function buildMarkerInitrd(file: string, spec: MarkerGuestSpec = DEFAULT_MARKER_GUEST): void {
  const why = markerGuestMissing();
  if (why) throw new Error(why);
  const k = kernel()!;
  const mods = modulesDir(k.kernel);
  const modules = virtioModules(mods);
  const entries: { name: string; mode: number; data?: Buffer; target?: string }[] = [
    { name: 'bin', mode: 0o755 },
    { name: 'lib', mode: 0o755 },
    { name: 'lib/modules', mode: 0o755 },
    { name: 'bin/busybox', mode: 0o755, data: fs.readFileSync('/bin/busybox') },
    { name: 'bin/sh', mode: 0o777, target: 'busybox' },
    { name: 'init', mode: 0o755, data: Buffer.from(markerGuestInit(spec, modules), 'latin1') },
    ...modules.map((m) => ({
      name: `lib/modules/${path.basename(m)}`,
      mode: 0o644,
      data: fs.readFileSync(path.join(mods, m)),
    })),
  ];
  fs.writeFileSync(file, cpioNewc(entries), { mode: 0o644 });
}

/** Write `text` as the marker into an image's marker sector (raw file, before any backup). */
export function writeMarker(
  rawFile: string,
  text: string,
  spec: MarkerGuestSpec = DEFAULT_MARKER_GUEST,
): void {
  const fd = fs.openSync(rawFile, 'r+');
  try {
    const b = Buffer.alloc(512);
    b.write(text, 'latin1');
    fs.writeSync(fd, b, 0, 512, spec.markerSector * 512);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Domain XML of a marker guest: TCG, the host kernel with `initrd` (from `buildMarkerInitrd`),
 * one virtio disk vda, serial console written to `consoleLog` (a file QEMU appends to).
 */
export function markerDomainXml(
  name: string,
  o: { initrd: string; disk: string; format: 'qcow2' | 'raw'; consoleLog: string },
): string {
  const k = kernel();
  if (!k) throw new Error('no kernel in /boot');
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${k.kernel}</kernel>
    <initrd>${o.initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet loglevel=1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='${o.format}'/>
      <source file='${o.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:4b:46:53'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='${o.consoleLog}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='${o.consoleLog}' append='on'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
`;
}

/** Lines of a console log that start with `prefix` (the guest's BKFS-* lines). */
export function consoleLines(consoleLog: string, prefix: string): string[] {
  let text = '';
  try {
    text = fs.readFileSync(consoleLog, 'latin1');
  } catch {
    return [];
  }
  return text
    .split(/\r?\n/)
    .map((l) => l.replace(/^[^B]*(?=BKFS-)/, ''))
    .filter((l) => l.startsWith(prefix));
}
