/**
 * CPU per random 4 KiB read of bkfs's read path in one process, without fio, FUSE or a second
 * process: `reader` = `CheckpointReader.readAt`; `nbd` = bkfs's NBD server and client over a Unix
 * socket in this process. Prints reads/s and the CPU µs per read (process and main thread), which a
 * loaded machine disturbs far less than wall-clock figures. Offsets: xorshift32, the same every run,
 * so two builds compare on the same reads (A/B: run both builds on the same repository).
 *
 *   node dist/bench/read-cpu.js REPO [--ref VM[@CP]] [--n 20000] [--mode reader|nbd] [--qd 1]
 *
 * REPO: e.g. the "frames" repository `bench/random-read.js --keep --work DIR` leaves in DIR.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as os from 'node:os';
import { Repository } from '../src/repo/repository';
import { CheckpointReader } from '../src/chain/reader';
import { checkpointExport } from '../src/nbd/exports';
import { NbdServer } from '../src/nbd/server';
import { NbdClient } from '../src/nbd/client';

function arg(n: string, d: string): string {
  const i = process.argv.indexOf(`--${n}`);
  return i >= 0 ? process.argv[i + 1]! : d;
}

function threadCpu(): number {
  // main thread only: /proc/self/task/<pid>/stat
  const st = fs.readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

async function main(): Promise<void> {
  const repoDir = process.argv[2]!;
  const n = Number(arg('n', '20000'));
  const mode = arg('mode', 'reader');
  const qd = Number(arg('qd', '1'));
  const repo = Repository.open(repoDir, { readOnly: true });
  const reader = CheckpointReader.open(repo, arg('ref', 'vm'));
  const disk = reader.disks[0]!;
  const size = disk.virtual_size;
  let seed = 0x9e3779b9;
  const rnd = () => {
    // xorshift32
    seed ^= seed << 13;
    seed >>>= 0;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    seed >>>= 0;
    return seed;
  };
  const offs = Array.from({ length: n }, () => (rnd() % (size / 4096)) * 4096);
  let readFn: (o: number) => Promise<unknown>;
  let server: NbdServer | undefined;
  let tmp: string | undefined;
  let client: NbdClient | undefined;
  if (mode === 'reader') readFn = (o) => reader.readAt(disk.name, o, 4096);
  else {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bkfs-read-cpu-'));
    const sock = path.join(tmp, 's.sock');
    server = await NbdServer.listen(
      { unix: sock },
      new Map([[disk.name, checkpointExport(reader, disk.name)]]),
    );
    client = await NbdClient.connect({ socket: sock, exportName: disk.name });
    readFn = (o) => client!.read(o, 4096);
  }
  // warm-up: a few
  for (let i = 0; i < 200; i++) await readFn(offs[i]!);
  const u0 = process.cpuUsage();
  const t0c = threadCpu();
  const t0 = process.hrtime.bigint();
  let next = 0;
  const lanes = Array.from({ length: qd }, async () => {
    while (next < n) await readFn(offs[next++]!);
  });
  await Promise.all(lanes);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  const u = process.cpuUsage(u0);
  const tc = threadCpu() - t0c;
  const load = os.loadavg()[0]!.toFixed(1);
  console.log(
    `${mode} qd${qd}: ${n} reads ${(n / (ms / 1000)).toFixed(0)}/s wall; process CPU ${((u.user + u.system) / n).toFixed(1)} us/read (main thread ${((tc * 1e6) / n).toFixed(1)}); decoded frames ${reader.loader.framesDecoded} chunks ${reader.loader.chunksDecoded} storedMiB ${(reader.loader.bytesFromStore / 2 ** 20).toFixed(0)}; load ${load}`,
  );
  await client?.close();
  await server?.close();
  repo.close();
  if (tmp !== undefined) fs.rmSync(tmp, { recursive: true, force: true });
}
main().catch((e) => {
  console.error(e);
  process.exit(1);
});
