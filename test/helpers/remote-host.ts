/**
 * A second "hypervisor" on this machine, for remote-backup tests: a network namespace
 * (`bkfsremote-<suffix>`, a veth pair, a private /30 in 10.213.0.0/16) whose processes also run in
 * their own mount namespace, where tmpfs mounts hide /run (so /var/run), /var/lib/libvirt,
 * /var/cache/libvirt and /root, and a private copy of /etc/libvirt (without domain definitions)
 * hides the host's. In it run its own virtlogd and libvirtd (started through symlinks named
 * `bkfsr-virtlogd` / `bkfsr-libvirtd`, so that `pgrep -x libvirtd` of the local libvirt test
 * helper never mistakes them for the host's daemons) and an sshd with its own host key, config and
 * authorized_keys (in a 0700 temp dir), listening only on the namespace's address. From the host,
 * `virsh -c <uri>` (uri = `qemu+ssh://root@ADDR/system?keyfile=K&no_verify=1&no_tty=1`) reaches
 * that libvirtd and nothing else. The namespace's /root is an empty tmpfs: the host root's shell
 * start-up files (pyenv, conda) would otherwise run on every ssh command.
 *
 * Every process is started by this helper and stopped by PID in `stop()`, which also destroys the
 * namespace's domains and deletes the namespace (the veth pair goes with it). Only loopback and the
 * namespace's two addresses are used.
 *
 * With `{ tls: true }` (test/integration/remote-tls.test.ts) the host also gets x509 certificates
 * made by openssl (test/helpers/tls-certs.ts: one CA, a server certificate for the namespace's
 * address, a client certificate): qemu.conf sets `backup_tls_x509_cert_dir` (a 0750 directory in
 * the namespace's /var/lib/libvirt readable by the QEMU user) and `backup_tls_x509_verify = 1`,
 * so pull-mode jobs can serve NBD over TLS; libvirtd is started with `--listen` and listens on the
 * namespace's address with TLS (port 16514, its own key_file/cert_file/ca_file, clients need a
 * certificate of the CA) and plain TCP (16509, auth_tcp "none": only for the refusal and
 * --insecure-tcp tests). `tlsUri` (`qemu+tls://ADDR/system?pkipath=DIR`) and `tcpUri` reach it.
 *
 * Needs (Debian): iproute2, util-linux (unshare, nsenter), openssh-server, openssh-client,
 * libvirt-daemon-system, libvirt-clients, qemu-system-x86, linux-image-amd64, openssl (tls); root.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes, randomInt } from 'node:crypto';
import { spawn, type ChildProcess } from 'node:child_process';
import { run, processAlive, type RunResult } from '../../src/util/proc';
import { domainXml, kernel, type DiskDef } from './libvirt';
import { issue, libvirtPkiDir, makeCa } from './tls-certs';

export interface RemoteHostOptions {
  /** Certificates, TLS for backup jobs' NBD servers, libvirtd listening on TLS and TCP. */
  tls?: boolean;
}

/** Where the namespace's QEMU finds its NBD server certificates (inside its private tmpfs). */
const QEMU_TLS_DIR = '/var/lib/libvirt/bkfs-backup-tls';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Why remote-host tests cannot run here (what to install), or null. */
export function remoteHostMissing(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (network namespaces, qemu:///system)';
  const bins: [string, string][] = [
    ['/usr/sbin/ip', 'iproute2'],
    ['/usr/bin/unshare', 'util-linux'],
    ['/usr/bin/nsenter', 'util-linux'],
    ['/usr/sbin/sshd', 'openssh-server'],
    ['/usr/bin/ssh', 'openssh-client'],
    ['/usr/bin/ssh-keygen', 'openssh-client'],
    ['/usr/bin/virsh', 'libvirt-clients'],
    ['/usr/sbin/libvirtd', 'libvirt-daemon-system'],
    ['/usr/sbin/virtlogd', 'libvirt-daemon-system'],
    ['/usr/bin/qemu-system-x86_64', 'qemu-system-x86'],
    ['/usr/bin/qemu-nbd', 'qemu-utils'],
  ];
  for (const [bin, pkg] of bins) {
    if (!fs.existsSync(bin)) return `${bin} is missing: apt-get install ${pkg} (or run scripts/setup.sh)`;
  }
  if (!kernel()) return 'no kernel and initrd in /boot: apt-get install linux-image-amd64';
  return null;
}

async function must(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { allowFail: true, env: { ...process.env, LC_ALL: 'C' } });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}

function tcpOpen(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** A free 10.213.X.Y/30 (not on any interface of this machine). */
async function freeSubnet(): Promise<{ host: string; ns: string }> {
  const used = await must('ip', ['-4', '-o', 'addr', 'show']);
  for (;;) {
    const x = randomInt(0, 256);
    const y = randomInt(0, 64) * 4;
    const host = `10.213.${x}.${y + 1}`;
    const ns = `10.213.${x}.${y + 2}`;
    if (!used.includes(`10.213.${x}.${y + 1}/`) && !used.includes(`10.213.${x}.${y + 2}/`)) {
      return { host, ns };
    }
  }
}

export class RemoteHost {
  /** Daemons started here, newest last (stopped in reverse order). */
  private readonly daemons: { name: string; child: ChildProcess }[] = [];
  private holder: ChildProcess | undefined;
  private netnsMade = false;

  private constructor(
    /** Private 0700 directory of this host (keys, configs, logs). */
    readonly dir: string,
    /** Network namespace name. */
    readonly netns: string,
    /** The namespace's address (sshd listens here). */
    readonly address: string,
    /** The host side's address on the veth pair. */
    readonly hostAddress: string,
  ) {}

  /** Private key that the namespace's sshd accepts for root. */
  get keyfile(): string {
    return path.join(this.dir, 'client_key');
  }

  /** The libvirt URI bkfs uses to reach this host. */
  get uri(): string {
    return `qemu+ssh://root@${this.address}/system?keyfile=${this.keyfile}&no_verify=1&no_tty=1`;
  }

  /** tls: client certificates in qemu's layout (ca-cert.pem, client-cert.pem, client-key.pem). */
  get clientTlsDir(): string {
    return path.join(this.dir, 'tls-client');
  }

  /** tls: libvirt's client pki layout of the same certificates (for ?pkipath=). */
  get pkiDir(): string {
    return path.join(this.dir, 'tls-pki');
  }

  /** tls: the libvirt URI over libvirt's TLS transport (no ssh). */
  get tlsUri(): string {
    return `qemu+tls://${this.address}/system?pkipath=${this.pkiDir}`;
  }

  /** tls: the libvirt URI over plain TCP (auth none: tests of --insecure-tcp only). */
  get tcpUri(): string {
    return `qemu+tcp://${this.address}/system`;
  }

  /** PID of the process that holds the namespaces. */
  get holderPid(): number {
    const pid = this.holder?.pid;
    if (pid === undefined) throw new Error('remote host not started');
    return pid;
  }

  private tls = false;

  static async start(opts: RemoteHostOptions = {}): Promise<RemoteHost> {
    const missing = remoteHostMissing();
    if (missing !== null) throw new Error(`remote-host tests cannot run: ${missing}`);
    const suffix = randomBytes(3).toString('hex');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `bkfsremote-${suffix}-`));
    fs.chmodSync(dir, 0o700);
    const { host, ns } = await freeSubnet();
    const h = new RemoteHost(dir, `bkfsremote-${suffix}`, ns, host);
    h.tls = opts.tls === true;
    try {
      await h.setUp(suffix);
    } catch (e) {
      await h.stop().catch(() => undefined);
      throw e;
    }
    return h;
  }

  private async setUp(suffix: string): Promise<void> {
    const d = this.dir;
    // Network: a veth pair, one end in the namespace.
    const vh = `bkr${suffix}h`;
    const vn = `bkr${suffix}n`;
    await must('ip', ['netns', 'add', this.netns]);
    this.netnsMade = true;
    await must('ip', ['link', 'add', vh, 'type', 'veth', 'peer', 'name', vn]);
    await must('ip', ['link', 'set', vn, 'netns', this.netns]);
    await must('ip', ['addr', 'add', `${this.hostAddress}/30`, 'dev', vh]);
    await must('ip', ['link', 'set', vh, 'up']);
    const inNs = (...a: string[]) => must('ip', ['netns', 'exec', this.netns, ...a]);
    await inNs('ip', 'addr', 'add', `${this.address}/30`, 'dev', vn);
    await inNs('ip', 'link', 'set', vn, 'up');
    await inNs('ip', 'link', 'set', 'lo', 'up');

    // Private state: /etc/libvirt without domain definitions or autostarted networks.
    const etc = path.join(d, 'etc-libvirt');
    await must('cp', ['-a', '/etc/libvirt', etc]);
    for (const sub of ['qemu', 'storage', 'qemu/autostart', 'qemu/networks/autostart', 'storage/autostart']) {
      const p = path.join(etc, sub);
      if (!fs.existsSync(p)) continue;
      for (const f of fs.readdirSync(p)) {
        if (f.endsWith('.xml')) fs.rmSync(path.join(p, f));
      }
    }
    const bin = path.join(d, 'bin');
    fs.mkdirSync(bin);
    for (const name of ['libvirtd', 'virtlogd', 'sshd']) {
      fs.symlinkSync(`/usr/sbin/${name}`, path.join(bin, `bkfsr-${name}`));
    }
    await must('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(d, 'host_key')]);
    await must('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', this.keyfile]);
    fs.copyFileSync(`${this.keyfile}.pub`, path.join(d, 'authorized_keys'));
    fs.writeFileSync(
      path.join(d, 'sshd_config'),
      [
        `ListenAddress ${this.address}`,
        'Port 22',
        `HostKey ${path.join(d, 'host_key')}`,
        'PidFile none',
        `AuthorizedKeysFile ${path.join(d, 'authorized_keys')}`,
        'PermitRootLogin prohibit-password',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'UsePAM no',
        'StrictModes no',
        'UseDNS no',
        'PrintMotd no',
        'PrintLastLog no',
        'PermitUserRC no',
        'X11Forwarding no',
        'AllowStreamLocalForwarding yes',
        'MaxSessions 50',
        'MaxStartups 50:30:100',
        'LogLevel ERROR',
        '',
      ].join('\n'),
    );

    // The holder: in the network namespace and a mount namespace of its own, with the private
    // mounts; every daemon joins both namespaces through nsenter -t HOLDER.
    const ready = path.join(d, 'ready');
    const script = [
      'set -e',
      'for m in /run /var/lib/libvirt /var/cache/libvirt; do mkdir -p $m; mount -t tmpfs -o mode=0755 tmpfs $m; done',
      'mount -t tmpfs -o mode=0700 tmpfs /root',
      'mkdir -p /run/sshd /run/libvirt',
      `mount --bind '${etc}' /etc/libvirt`,
      `: > '${ready}'`,
      'exec sleep 2147483647',
    ].join('\n');
    this.holder = spawn(
      'ip',
      ['netns', 'exec', this.netns, 'unshare', '-m', '--propagation', 'private', '--', 'sh', '-c', script],
      { stdio: ['ignore', 'ignore', fs.openSync(path.join(d, 'holder.log'), 'w')] },
    );
    for (let i = 0; !fs.existsSync(ready); i++) {
      if (this.holder.exitCode !== null || i > 600) {
        throw new Error(`namespace holder failed: ${fs.readFileSync(path.join(d, 'holder.log'), 'utf8')}`);
      }
      await sleep(50);
    }

    this.daemon('virtlogd', [path.join(bin, 'bkfsr-virtlogd')]);
    await this.waitFor('virtlogd socket', () =>
      fs.existsSync(`/proc/${this.holderPid}/root/run/libvirt/virtlogd-sock`),
    );
    if (this.tls) await this.setUpTls(etc);
    this.daemon('libvirtd', [path.join(bin, 'bkfsr-libvirtd'), ...(this.tls ? ['--listen'] : [])]);
    this.daemon('sshd', [path.join(bin, 'bkfsr-sshd'), '-D', '-e', '-f', path.join(d, 'sshd_config')]);
    await this.waitFor('sshd', () => tcpOpen(this.address, 22));
    await this.waitFor('libvirtd', async () => (await this.virshTry('version')).code === 0);
    if (this.tls) await this.waitFor('libvirtd on TLS', () => tcpOpen(this.address, 16514));
  }

  /** Certificates; qemu.conf and libvirtd.conf of the private /etc/libvirt (before libvirtd starts). */
  private async setUpTls(etc: string): Promise<void> {
    const d = this.dir;
    const ca = await makeCa(path.join(d, 'tls-ca'), `bkfs remote test CA ${this.netns}`);
    const srv = path.join(d, 'tls-server');
    await issue(ca, srv, 'server', [this.address]);
    await issue(ca, this.clientTlsDir, 'client', ['bkfs-backup-server']);
    libvirtPkiDir(this.clientTlsDir, this.pkiDir);
    // QEMU (user libvirt-qemu) reads its certificates itself: a directory it may read.
    const q = `/proc/${this.holderPid}/root${QEMU_TLS_DIR}`;
    fs.mkdirSync(q, { mode: 0o750 });
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) {
      fs.copyFileSync(path.join(srv, f), path.join(q, f));
      fs.chmodSync(path.join(q, f), f.endsWith('key.pem') ? 0o640 : 0o644);
    }
    const qemuGid = Number((await must('id', ['-g', 'libvirt-qemu'])).trim());
    for (const f of ['', 'ca-cert.pem', 'server-cert.pem', 'server-key.pem'])
      fs.chownSync(path.join(q, f), 0, qemuGid);
    fs.appendFileSync(
      path.join(etc, 'qemu.conf'),
      `\n# bkfs remote-tls test\nbackup_tls_x509_cert_dir = "${QEMU_TLS_DIR}"\nbackup_tls_x509_verify = 1\n`,
    );
    fs.appendFileSync(
      path.join(etc, 'libvirtd.conf'),
      [
        '',
        '# bkfs remote-tls test',
        'listen_tls = 1',
        'listen_tcp = 1',
        `listen_addr = "${this.address}"`,
        'auth_tls = "none"',
        'auth_tcp = "none"',
        'tls_no_verify_certificate = 0',
        `key_file = "${path.join(srv, 'server-key.pem')}"`,
        `cert_file = "${path.join(srv, 'server-cert.pem')}"`,
        `ca_file = "${path.join(srv, 'ca-cert.pem')}"`,
        '',
      ].join('\n'),
    );
  }

  private daemon(name: string, argv: string[]): void {
    const log = fs.openSync(path.join(this.dir, `${name}.log`), 'w');
    const child = spawn('nsenter', ['-t', String(this.holderPid), '-m', '-n', '--', ...argv], {
      stdio: ['ignore', log, log],
      env: { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C' },
    });
    fs.closeSync(log);
    this.daemons.push({ name, child });
  }

  private async waitFor(what: string, cond: () => boolean | Promise<boolean>): Promise<void> {
    for (let i = 0; !(await cond()); i++) {
      const dead = this.daemons.find((x) => x.child.exitCode !== null || x.child.signalCode !== null);
      if (dead) {
        const log = fs.readFileSync(path.join(this.dir, `${dead.name}.log`), 'utf8');
        throw new Error(
          `${dead.name} of the remote host exited: ${log.trim().split('\n').slice(-3).join(' | ')}`,
        );
      }
      if (i > 1200) throw new Error(`remote host: ${what} did not come up`);
      await sleep(50);
    }
  }

  /** Run a program inside the namespaces (as the hypervisor itself would). */
  exec(cmd: string, args: string[], input?: string): Promise<RunResult> {
    return run('nsenter', ['-t', String(this.holderPid), '-m', '-n', '--', cmd, ...args], {
      allowFail: true,
      env: { ...process.env, LC_ALL: 'C' },
      ...(input !== undefined ? { input } : {}),
    });
  }

  /** virsh against the namespace's libvirtd, run inside the namespace (not through ssh). */
  virshTry(...args: string[]): Promise<RunResult> {
    return this.exec('virsh', ['-c', 'qemu:///system', ...args]);
  }

  async virsh(...args: string[]): Promise<string> {
    const r = await this.virshTry(...args);
    if (r.code !== 0)
      throw new Error(`remote virsh ${args.join(' ')}: ${r.stderr.trim() || r.stdout.trim()}`);
    return r.stdout;
  }

  /** Start a transient TCG domain (see test/helpers/libvirt.ts) on this host. */
  async createDomain(name: string, disks: DiskDef[]): Promise<RemoteDomain> {
    const xml = path.join(this.dir, `${name}.xml`);
    fs.writeFileSync(xml, domainXml(name, disks));
    await this.virsh('create', xml);
    return new RemoteDomain(this, name, disks);
  }

  /** Backup jobs (`domjobinfo` operations) running on this host's domains. */
  async runningJobs(): Promise<string[]> {
    const names = (await this.virsh('list', '--name')).split('\n').filter((l) => l.trim() !== '');
    const out: string[] = [];
    for (const n of names) {
      const info = await this.virsh('domjobinfo', n.trim());
      if (!/^Job type:\s*None/m.test(info)) out.push(`${n.trim()}: ${info.replace(/\s+/g, ' ')}`);
    }
    return out;
  }

  /** Tear everything down (domains, daemons by PID, the holder, the namespace). */
  async stop(): Promise<void> {
    if (this.holder && this.holder.exitCode === null) {
      const libvirtd = this.daemons.find((x) => x.name === 'libvirtd');
      if (libvirtd && libvirtd.child.exitCode === null) {
        const r = await this.virshTry('list', '--all', '--name');
        for (const n of r.stdout
          .split('\n')
          .map((l) => l.trim())
          .filter((l) => l !== '')) {
          await this.virshTry('destroy', n);
          await this.virshTry('undefine', n, '--checkpoints-metadata');
        }
      }
    }
    for (const { child } of [...this.daemons].reverse()) {
      const pid = child.pid;
      if (pid === undefined || child.exitCode !== null || child.signalCode !== null) continue;
      child.kill('SIGTERM');
      for (
        let i = 0;
        i < 400 && processAlive(pid) && child.exitCode === null && child.signalCode === null;
        i++
      ) {
        await sleep(50);
      }
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
    if (this.holder?.pid !== undefined && this.holder.exitCode === null && this.holder.signalCode === null) {
      this.holder.kill('SIGKILL');
      await new Promise((r) => this.holder?.once('exit', r));
    }
    if (this.netnsMade) {
      await run('ip', ['netns', 'del', this.netns], { allowFail: true });
      this.netnsMade = false;
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A running transient domain on a RemoteHost (the remote twin of TestDomain). */
export class RemoteDomain {
  private qdevs = new Map<string, string>();

  constructor(
    readonly host: RemoteHost,
    readonly name: string,
    private readonly disks: DiskDef[],
  ) {}

  async destroy(): Promise<void> {
    await this.host.virshTry('destroy', this.name);
  }

  private async qdev(target: string): Promise<string> {
    const cached = this.qdevs.get(target);
    if (cached) return cached;
    const file = this.disks.find((d) => d.target === target)?.file;
    if (!file) throw new Error(`no disk ${target}`);
    const info = await this.host.virsh('qemu-monitor-command', this.name, '--hmp', 'info block');
    const re = /^\S+: (.+?) \([^)]*\)\r?\n\s+Attached to:\s+(\S+)/gm;
    for (let m = re.exec(info); m; m = re.exec(info)) this.qdevs.set(path.basename(m[1]!), m[2]!);
    const q = this.qdevs.get(path.basename(file));
    if (!q) throw new Error(`disk ${target} not in 'info block': ${info}`);
    this.qdevs.set(target, q);
    return q;
  }

  /** qemu-io commands on a disk inside the running VM (guest-like writes the bitmaps record). */
  async qemuIo(target: string, cmd: string): Promise<void> {
    const q = await this.qdev(target);
    const out = await this.host.virsh('qemu-monitor-command', this.name, '--hmp', `qemu-io -d ${q} "${cmd}"`);
    if (out.trim() !== '') throw new Error(`qemu-io ${cmd} on ${target}: ${out.trim()}`);
  }

  async checkpointNames(): Promise<string[]> {
    return (await this.host.virsh('checkpoint-list', this.name, '--name'))
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '');
  }

  /** `Operation:` of the running job, or null. */
  async job(): Promise<string | null> {
    const info = await this.host.virsh('domjobinfo', this.name);
    if (/^Job type:\s*None/m.test(info)) return null;
    return /^Operation:\s*(\S+)/m.exec(info)?.[1] ?? 'Unknown';
  }
}
