/**
 * The two virsh calls restore needs (process spawning only). virsh uses `uri` when given (bkfs
 * restore --connect), else its default connection (qemu:///system as root, or
 * $LIBVIRT_DEFAULT_URI).
 */
import { BkfsError } from '../errors';
import { lastLine, run } from '../util/proc';

function connectArgs(uri: string | undefined): string[] {
  return uri !== undefined ? ['-c', uri] : [];
}

/** The UUID of the domain of that name, or null when libvirt has none (defined or running). */
export async function domainUuid(name: string, uri?: string): Promise<string | null> {
  const r = await run('virsh', [...connectArgs(uri), '-q', 'domuuid', name], { allowFail: true }).catch(
    (e: unknown) => {
      throw new BkfsError('EXTERNAL_TOOL', `cannot run virsh to define the domain: ${(e as Error).message}`);
    },
  );
  if (r.code === 0) return r.stdout.trim() || null;
  if (/failed to connect|no connection driver|cannot connect|Failed to connect/i.test(r.stderr)) {
    throw new BkfsError('EXTERNAL_TOOL', `cannot reach libvirt: ${lastLine(r.stderr)}`);
  }
  return null;
}

/** `virsh define FILE`. */
export async function defineDomain(xmlFile: string, uri?: string): Promise<void> {
  const r = await run('virsh', [...connectArgs(uri), '-q', 'define', xmlFile], { allowFail: true });
  if (r.code !== 0) {
    throw new BkfsError('EXTERNAL_TOOL', `virsh define ${xmlFile} failed: ${lastLine(r.stderr || r.stdout)}`);
  }
}
