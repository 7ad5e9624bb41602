/**
 * The file-level engines' NBD server is bkfs' one NBD server (src/nbd/server.ts) on a private Unix
 * socket, read-only: how they hand a checkpoint's disks to QEMU (libguestfs' appliance) and to
 * nbdfuse (the kernel engine's loop devices) without writing the disks anywhere.
 */
import { NbdServer, type NbdExport, type NbdServerStats } from '../nbd/server';

export type { NbdExport, NbdServerStats };

export class NbdExportServer {
  private constructor(private readonly server: NbdServer) {}

  get socketPath(): string {
    return (this.server.address as { unix: string }).unix;
  }

  get stats(): NbdServerStats {
    return this.server.stats;
  }

  /** Listen on `socketPath` (removed first if it exists). Exports are served read-only. */
  static async listen(
    socketPath: string,
    exports: ReadonlyMap<string, NbdExport>,
    onError: (msg: string) => void = () => undefined,
  ): Promise<NbdExportServer> {
    const ro = new Map<string, NbdExport>();
    for (const [k, v] of exports) {
      const e: NbdExport = { size: v.size, readAt: (o, l) => v.readAt(o, l) };
      if (v.blockStatus) e.blockStatus = (o, l) => v.blockStatus!(o, l);
      ro.set(k, e);
    }
    return new NbdExportServer(await NbdServer.listen({ unix: socketPath }, ro, { onError }));
  }

  close(): Promise<void> {
    return this.server.close();
  }
}
