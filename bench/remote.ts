/**
 * Benchmark: a full backup of a domain on a remote hypervisor, bkfs over ssh (forwarded NBD unix
 * socket, one ssh master connection), over NBD+TLS (--nbd-tls with qemu+ssh, and a qemu+tls://
 * URI), over plain NBD/TCP (--insecure-tcp), against bkfs run on the hypervisor itself (local unix
 * socket), and against `virtnbdbackup` with the same remote URI (NBD over plain TCP to the
 * hypervisor, its remote mode). Besides wall time: CPU seconds per GiB of data spent on the backup
 * server (bkfs and its ssh/virsh children; not sshd/QEMU on the hypervisor), the cost of TLS/ssh.
 *
 *   node dist/bench/remote.js [--disk-mib 1024] [--data-mib 512] [--runs 1]
 *
 * The "remote hypervisor" is test/helpers/remote-host.ts (network + mount namespace with its own
 * libvirtd and sshd on a veth pair): the network is a veth pair on this machine, so the figures
 * show the cost of ssh (encryption, one more copy through sshd/ssh) and of the extra processes,
 * not of a physical network. One qcow2 disk holds `data-mib` of data (half random, half text);
 * every run is a full (no change tracking involved). Reported per tool: wall time of the command
 * and data MB/s (data-mib / time). Each tool's libvirt checkpoints are deleted before the next
 * one runs. Everything it starts is stopped and removed.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBuffer, textFile } from '../test/helpers/images';
import { RemoteHost, type RemoteDomain } from '../test/helpers/remote-host';
import { run } from '../src/util/proc';

const MiB = 1024 * 1024;
const BKFS = path.resolve(__dirname, '../../bin/bkfs');

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1] ?? def) : def;
}

/**
 * Run a command, return its wall time and the CPU time (user + system) of it and its children on
 * this machine (sh's `times`), in seconds; throws with its output on failure.
 */
function timed(cmd: string, args: string[]): Promise<{ secs: number; cpu: number }> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn('sh', ['-c', '"$@"; r=$?; times >&2; exit $r', 'sh', cmd, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, CI: 'true' },
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      // The second line of `times`: children's user and system time, e.g. "0m1.230s 0m0.450s".
      const t = out.trim().split('\n').slice(-1)[0] ?? '';
      const cpu = [...t.matchAll(/(\d+)m([\d.]+)s/g)].reduce(
        (a, m) => a + Number(m[1]) * 60 + Number(m[2]),
        0,
      );
      if (code === 0) resolve({ secs, cpu });
      else reject(new Error(`${cmd} ${args.slice(0, 8).join(' ')} exited ${code}:\n${out.slice(-2000)}`));
    });
  });
}

/** Fill `[0, mib)` MiB of a qcow2 image: even 64 MiB pieces random, odd pieces text. */
async function fill(img: string, mib: number, tmp: string): Promise<void> {
  for (let off = 0, i = 0; off < mib; off += 64, i++) {
    const len = Math.min(64, mib - off);
    const f = path.join(tmp, 'fill.bin');
    fs.writeFileSync(
      f,
      i % 2 === 0 ? randomBuffer(i + 1, len * MiB) : textFile(i + 1, len * MiB).subarray(0, len * MiB),
    );
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -s ${f} ${off}M ${len}M`, img]);
  }
  fs.rmSync(path.join(tmp, 'fill.bin'), { force: true });
}

async function deleteAllCheckpoints(dom: RemoteDomain): Promise<void> {
  for (const n of (await dom.checkpointNames()).reverse()) {
    await dom.host
      .virsh('checkpoint-delete', dom.name, n)
      .catch(() => dom.host.virsh('checkpoint-delete', dom.name, n, '--metadata'));
  }
}

interface Row {
  tool: string;
  secs: number[];
  cpu: number[];
  error?: string;
}

async function main(): Promise<void> {
  const diskMib = arg('disk-mib', 1024);
  const dataMib = arg('data-mib', 512);
  const runs = arg('runs', 1);
  const work = fs.mkdtempSync('/var/tmp/bkfs-bench-remote-');
  fs.chmodSync(work, 0o755);
  let host: RemoteHost | undefined;
  const rows: Row[] = [];
  try {
    const img = path.join(work, 'sda.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, `${diskMib}M`]);
    console.error(`bench: writing ${dataMib} MiB of data`);
    await fill(img, dataMib, work);
    const scratch = path.join(work, 'scratch');
    fs.mkdirSync(scratch, { mode: 0o755 });
    console.error('bench: starting the remote host');
    host = await RemoteHost.start({ tls: true });
    const name = `bkfs-rbench-${process.pid}`;
    const dom = await host.createDomain(name, [{ target: 'sda', file: img, format: 'qcow2' }]);

    const remoteBkfs = (repo: string, uri: string, ...extra: string[]) => (i: number) =>
      timed(process.execPath, [
        BKFS, '-r', path.join(work, `${repo}-${i}`), 'backup', '--libvirt', name, '--connect', uri,
        '--level', 'full', '--scratch-dir', scratch, '--no-freeze', ...extra,
      ]); // prettier-ignore
    const tools: {
      tool: string;
      repo?: string;
      once: (i: number) => Promise<{ secs: number; cpu: number }>;
    }[] = [
      {
        tool: 'bkfs, remote (qemu+ssh, NBD over TLS: --nbd-tls)',
        repo: 'repo-nbdtls',
        once: remoteBkfs('repo-nbdtls', host.uri, '--nbd-tls', host.clientTlsDir),
      },
      {
        tool: 'bkfs, remote (qemu+tls://, NBD over TLS)',
        repo: 'repo-tlsuri',
        once: remoteBkfs('repo-tlsuri', host.tlsUri),
      },
      {
        tool: 'bkfs, remote (qemu+ssh, --insecure-tcp: plain NBD/TCP)',
        repo: 'repo-tcp',
        once: remoteBkfs('repo-tcp', host.uri, '--insecure-tcp'),
      },
      {
        tool: 'bkfs, remote (qemu+ssh, ssh-forwarded NBD)',
        repo: 'repo-ssh',
        once: (i) =>
          timed(process.execPath, [
            BKFS,
            '-r',
            path.join(work, `repo-ssh-${i}`),
            'backup',
            '--libvirt',
            name,
            '--connect',
            host!.uri,
            '--level',
            'full',
            '--scratch-dir',
            scratch,
          ]),
      },
      {
        tool: 'bkfs, on the hypervisor (qemu:///system, local socket)',
        repo: 'repo-local',
        once: (i) =>
          timed('nsenter', [
            '-t',
            String(host!.holderPid),
            '-m',
            '-n',
            '--',
            process.execPath,
            BKFS,
            '-r',
            path.join(work, `repo-local-${i}`),
            'backup',
            '--libvirt',
            name,
            '--connect',
            'qemu:///system',
            '--level',
            'full',
            '--scratch-dir',
            scratch,
          ]),
      },
      {
        tool: 'virtnbdbackup -U qemu+ssh://… (NBD over plain TCP)',
        once: (i) =>
          timed('virtnbdbackup', [
            '-U',
            host!.uri,
            '--ssh-user',
            'root',
            '-d',
            name,
            '-l',
            'full',
            '-o',
            path.join(work, `vnb-${i}`),
            '-n',
          ]),
      },
    ];
    for (const t of tools) {
      const row: Row = { tool: t.tool, secs: [], cpu: [] };
      rows.push(row);
      for (let i = 0; i < runs; i++) {
        await deleteAllCheckpoints(dom);
        console.error(`bench: ${t.tool}, run ${i + 1}`);
        try {
          if (t.repo !== undefined) {
            await run(process.execPath, [BKFS, '-r', path.join(work, `${t.repo}-${i}`), 'init']);
          }
          const r = await t.once(i);
          row.secs.push(r.secs);
          row.cpu.push(r.cpu);
        } catch (e) {
          row.error = (e as Error).message
            .split('\n')
            .filter((l) => l.trim() !== '')
            .slice(-2)
            .join(' | ');
          console.error(`bench: ${t.tool} failed: ${row.error}`);
          break;
        }
      }
    }
  } finally {
    await host?.stop().catch((e: unknown) => console.error(`bench: stopping the remote host: ${String(e)}`));
    fs.rmSync(work, { recursive: true, force: true });
  }
  const lines = [
    `Full backup of ${dataMib} MiB of data (${diskMib} MiB qcow2 disk), remote host in a network namespace (veth), ${runs} run(s), median:`,
    '',
    '| tool | time (s) | data MB/s | CPU s per GiB of data on the backup server |',
    '|---|---:|---:|---:|',
  ];
  const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
  for (const r of rows) {
    const s = median(r.secs);
    const c = median(r.cpu);
    lines.push(
      s === undefined
        ? `| ${r.tool} | failed: ${r.error ?? '?'} | | |`
        : `| ${r.tool} | ${s.toFixed(1)} | ${((dataMib * MiB) / 1e6 / s).toFixed(1)} | ${c === undefined ? '' : ((c * 1024) / dataMib).toFixed(1)} |`,
    );
  }
  console.log(lines.join('\n'));
}

main().catch((e: unknown) => {
  console.error(`bench/remote: ${(e as Error).message}`);
  process.exit(1);
});
