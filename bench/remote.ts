/**
 * Benchmark: a full backup of a domain on a remote hypervisor, bkfs over ssh (forwarded NBD unix
 * socket, one ssh master connection) against bkfs run on the hypervisor itself (local unix
 * socket), and against `virtnbdbackup` with the same remote URI (NBD over plain TCP to the
 * hypervisor, its remote mode).
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
 *
 * Then restores of bkfs's remote checkpoint (a second table, same number of runs): `bkfs restore
 * --connect qemu+ssh://` (a raw file written on the hypervisor through a qemu-nbd there,
 * ssh-forwarded), bkfs restore run on the hypervisor itself, bkfs restore onto this machine, and
 * `virsh vol-upload --sparse` of that local raw file into a directory pool on the hypervisor
 * (libvirt's own stream over the same qemu+ssh URI: the other way to put a disk there).
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

/** Run a command, return its wall time in seconds; throws with its output on failure. */
function timed(cmd: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, CI: 'true' },
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code === 0) resolve(secs);
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
  error?: string;
}

interface Tool {
  tool: string;
  once: (i: number) => Promise<number>;
  /** Before each run (not timed). */
  prepare?: (i: number) => Promise<void>;
}

/** `runs` timed runs of a tool; the first failure ends its row. */
async function measure(t: Tool, runs: number): Promise<Row> {
  const row: Row = { tool: t.tool, secs: [] };
  for (let i = 0; i < runs; i++) {
    console.error(`bench: ${t.tool}, run ${i + 1}`);
    try {
      await t.prepare?.(i);
      row.secs.push(await t.once(i));
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
  return row;
}

function table(rows: Row[], dataMib: number): string[] {
  const out = ['| tool | time (s) | data MB/s |', '|---|---:|---:|'];
  for (const r of rows) {
    const s = [...r.secs].sort((a, b) => a - b)[Math.floor(r.secs.length / 2)];
    out.push(
      s === undefined
        ? `| ${r.tool} | failed: ${r.error ?? '?'} | |`
        : `| ${r.tool} | ${s.toFixed(1)} | ${((dataMib * MiB) / 1e6 / s).toFixed(1)} |`,
    );
  }
  return out;
}

async function main(): Promise<void> {
  const diskMib = arg('disk-mib', 1024);
  const dataMib = arg('data-mib', 512);
  const runs = arg('runs', 1);
  const work = fs.mkdtempSync('/var/tmp/bkfs-bench-remote-');
  fs.chmodSync(work, 0o755);
  let host: RemoteHost | undefined;
  const rows: Row[] = [];
  const restoreRows: Row[] = [];
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

    const initRepo = async (r: string): Promise<void> => {
      await run(process.execPath, [BKFS, '-r', path.join(work, r), 'init']);
    };
    const remoteBkfs = (repo: string, uri: string, ...extra: string[]) => (i: number) =>
      timed(process.execPath, [
        BKFS, '-r', path.join(work, `${repo}-${i}`), 'backup', '--libvirt', name, '--connect', uri,
        '--level', 'full', '--scratch-dir', scratch, ...extra,
      ]); // prettier-ignore
    const tlsTools: Tool[] = [
      {
        tool: 'bkfs, remote (qemu+ssh, NBD over TLS: --nbd-tls)',
        prepare: (i) => initRepo(`repo-nbdtls-${i}`),
        once: remoteBkfs('repo-nbdtls', host.uri, '--nbd-tls', host.clientTlsDir),
      },
      {
        tool: 'bkfs, remote (qemu+tls://, NBD over TLS)',
        prepare: (i) => initRepo(`repo-tlsuri-${i}`),
        once: remoteBkfs('repo-tlsuri', host.tlsUri),
      },
      {
        tool: 'bkfs, remote (qemu+ssh, --insecure-tcp: plain NBD/TCP)',
        prepare: (i) => initRepo(`repo-tcp-${i}`),
        once: remoteBkfs('repo-tcp', host.uri, '--insecure-tcp'),
      },
    ];
    const tools: Tool[] = [
      {
        tool: 'bkfs, remote (qemu+ssh, ssh-forwarded NBD)',
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
      rows.push(
        await measure(
          {
            ...t,
            prepare: async (i) => {
              await deleteAllCheckpoints(dom);
              if (t.tool.startsWith('bkfs')) {
                const kind = t.tool.includes('remote') ? 'ssh' : 'local';
                await run(process.execPath, [BKFS, '-r', path.join(work, `repo-${kind}-${i}`), 'init']);
              }
            },
          },
          runs,
        ),
      );
    }
    // The same backup over the other transports (NBD over TLS, plain TCP).
    for (const t of tlsTools) {
      const prep = t.prepare;
      rows.push(
        await measure(
          {
            ...t,
            prepare: async (i) => {
              await deleteAllCheckpoints(dom);
              await prep?.(i);
            },
          },
          runs,
        ),
      );
    }

    // Restores of bkfs's remote checkpoint, onto the hypervisor and onto this machine.
    const repo = path.join(work, 'repo-ssh-0');
    const rdir = '/var/lib/libvirt/bkfs-bench-restore'; // in the remote host's private tmpfs
    if ((rows[0]?.secs.length ?? 0) > 0) {
      await host.exec('mkdir', ['-p', rdir]);
      const pool = `bkfs-bench-${process.pid}`;
      await host.virsh('pool-create-as', pool, 'dir', '--target', rdir);
      const local = (i: number) => path.join(work, `restored-${i}`);
      const restoreTools: Tool[] = [
        {
          tool: 'bkfs restore --connect qemu+ssh://… (ssh-forwarded qemu-nbd on the hypervisor)',
          once: (i) =>
            timed(process.execPath, [
              BKFS,
              '-r',
              repo,
              'restore',
              name,
              '--connect',
              host!.uri,
              '--to',
              `${rdir}/ssh-${i}`,
            ]),
        },
        {
          tool: 'bkfs restore, run on the hypervisor (local files there)',
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
              repo,
              'restore',
              name,
              '--to',
              `${rdir}/local-${i}`,
            ]),
        },
        {
          tool: 'bkfs restore onto the backup host (local files here)',
          once: (i) => timed(process.execPath, [BKFS, '-r', repo, 'restore', name, '--to', local(i)]),
        },
        {
          tool: 'virsh -c qemu+ssh://… vol-upload --sparse of that raw file (dir pool)',
          prepare: async (i) => {
            await host!.virsh('vol-create-as', pool, `up-${i}.raw`, `${diskMib}M`, '--format', 'raw');
          },
          once: (i) =>
            timed('virsh', [
              '-c',
              host!.uri,
              'vol-upload',
              '--sparse',
              '--pool',
              pool,
              `up-${i}.raw`,
              path.join(local(i), 'sda.raw'),
            ]),
        },
      ];
      for (const t of restoreTools) restoreRows.push(await measure(t, runs));
      await host.virshTry('pool-destroy', pool);
    }
  } finally {
    await host?.stop().catch((e: unknown) => console.error(`bench: stopping the remote host: ${String(e)}`));
    fs.rmSync(work, { recursive: true, force: true });
  }
  const lines = [
    `Full backup of ${dataMib} MiB of data (${diskMib} MiB qcow2 disk), remote host in a network namespace (veth), ${runs} run(s), median:`,
    '',
    ...table(rows, dataMib),
  ];
  if (restoreRows.length > 0) {
    lines.push(
      '',
      `Restore of that checkpoint (${dataMib} MiB of data, a raw ${diskMib} MiB file), ${runs} run(s), median:`,
      '',
      ...table(restoreRows, dataMib),
    );
  }
  console.log(lines.join('\n'));
}

main().catch((e: unknown) => {
  console.error(`bench/remote: ${(e as Error).message}`);
  process.exit(1);
});
