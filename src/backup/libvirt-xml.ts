/**
 * libvirt XML, as pure functions (unit-tested in `test/unit/libvirt-xml.test.ts`): a small parser
 * for the well-formed XML that libvirt prints (domain, checkpoint and backup-job descriptions),
 * the facts bkfs reads from it, and the two documents bkfs writes (`<domainbackup mode='pull'>`
 * and `<domaincheckpoint>`).
 *
 * The parser handles elements, attributes in either quote, text, the five predefined entities and
 * numeric character references, comments, processing instructions, CDATA and a DOCTYPE without an
 * internal subset; that is all libvirt emits. No namespaces, no validation. Documents are a few
 * KiB, parsed in memory. No I/O, no locking.
 */
import { BkfsError } from '../errors';

export interface XmlElement {
  name: string;
  attrs: Record<string, string>;
  children: XmlElement[];
  /** Concatenated text directly inside the element (entities decoded). */
  text: string;
}

const ENTITIES: Record<string, string> = { lt: '<', gt: '>', amp: '&', quot: '"', apos: "'" };

function xmlError(why: string): BkfsError {
  return new BkfsError('EXTERNAL_TOOL', `libvirt returned XML that bkfs cannot read: ${why}`);
}

function decodeEntities(s: string): string {
  return s.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-z]+);/g, (m, e: string) => {
    if (e.startsWith('#x')) return String.fromCodePoint(parseInt(e.slice(2), 16));
    if (e.startsWith('#')) return String.fromCodePoint(parseInt(e.slice(1), 10));
    const v = ENTITIES[e];
    if (v === undefined) throw xmlError(`unknown entity ${m}`);
    return v;
  });
}

/** Escape text or an attribute value (either quote). */
export function escapeXml(s: string): string {
  return s
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&apos;');
}

const NAME = /[A-Za-z_:][-A-Za-z0-9_:.]*/y;
const ATTR = /\s+([A-Za-z_:][-A-Za-z0-9_:.]*)\s*=\s*(?:"([^"<]*)"|'([^'<]*)')/y;

/** Parse one XML document; returns its root element. */
export function parseXml(text: string): XmlElement {
  let pos = 0;
  const stack: XmlElement[] = [];
  let root: XmlElement | undefined;
  const skipTo = (end: string, what: string): void => {
    const i = text.indexOf(end, pos);
    if (i < 0) throw xmlError(`unterminated ${what}`);
    pos = i + end.length;
  };
  while (pos < text.length) {
    const lt = text.indexOf('<', pos);
    const chunk = lt < 0 ? text.slice(pos) : text.slice(pos, lt);
    const top = stack[stack.length - 1];
    if (chunk.length > 0) {
      if (top) top.text += decodeEntities(chunk);
      else if (chunk.trim() !== '') throw xmlError('text outside the root element');
    }
    if (lt < 0) break;
    pos = lt;
    if (text.startsWith('<!--', pos)) {
      skipTo('-->', 'comment');
    } else if (text.startsWith('<![CDATA[', pos)) {
      const end = text.indexOf(']]>', pos);
      if (end < 0 || !top) throw xmlError('bad CDATA section');
      top.text += text.slice(pos + 9, end);
      pos = end + 3;
    } else if (text.startsWith('<?', pos)) {
      skipTo('?>', 'processing instruction');
    } else if (text.startsWith('<!', pos)) {
      skipTo('>', 'declaration');
    } else if (text.startsWith('</', pos)) {
      NAME.lastIndex = pos + 2;
      const m = NAME.exec(text);
      if (!m) throw xmlError(`bad end tag at offset ${pos}`);
      const el = stack.pop();
      if (!el || el.name !== m[0]) throw xmlError(`end tag </${m[0]}> does not match`);
      pos = NAME.lastIndex;
      skipTo('>', 'end tag');
    } else {
      NAME.lastIndex = pos + 1;
      const m = NAME.exec(text);
      if (!m) throw xmlError(`bad start tag at offset ${pos}`);
      const el: XmlElement = { name: m[0], attrs: {}, children: [], text: '' };
      pos = NAME.lastIndex;
      for (;;) {
        ATTR.lastIndex = pos;
        const a = ATTR.exec(text);
        if (!a) break;
        el.attrs[a[1] as string] = decodeEntities(a[2] ?? a[3] ?? '');
        pos = ATTR.lastIndex;
      }
      const close = /\s*(\/?)>/y;
      close.lastIndex = pos;
      const c = close.exec(text);
      if (!c) throw xmlError(`bad start tag <${el.name}> at offset ${pos}`);
      pos = close.lastIndex;
      if (top) top.children.push(el);
      else if (root) throw xmlError('more than one root element');
      else root = el;
      if (c[1] !== '/') stack.push(el);
    }
  }
  if (stack.length > 0) throw xmlError(`element <${stack[stack.length - 1]?.name}> is not closed`);
  if (!root) throw xmlError('no root element');
  return root;
}

export function child(el: XmlElement | undefined, name: string): XmlElement | undefined {
  return el?.children.find((c) => c.name === name);
}

export function childrenNamed(el: XmlElement | undefined, name: string): XmlElement[] {
  return el ? el.children.filter((c) => c.name === name) : [];
}

// ---------------------------------------------------------------------------------------------
// Domain

export interface DomainDisk {
  /** Target device name (`vda`, `sda`): the disk's name in bkfs and in libvirt's backup XML. */
  target: string;
  /** disk, cdrom, floppy, lun. */
  device: string;
  /** file, block, network, volume, dir, nvme, vhostuser. */
  type: string;
  /** Driver format (qcow2, raw, ...) or null when not given. */
  format: string | null;
  bus: string | null;
  /** Image path (file), device (block), `protocol:name` (network), `pool/volume`, or null (empty). */
  source: string | null;
  readonly: boolean;
  shareable: boolean;
  transient: boolean;
}

export interface DomainInfo {
  name: string;
  disks: DomainDisk[];
}

function diskSource(type: string, src: XmlElement | undefined): string | null {
  if (!src) return null;
  const a = src.attrs;
  switch (type) {
    case 'file':
      return a.file ?? null;
    case 'block':
      return a.dev ?? null;
    case 'dir':
      return a.dir ?? null;
    case 'network':
      return a.protocol ? `${a.protocol}:${a.name ?? ''}` : (a.name ?? null);
    case 'volume':
      return a.pool && a.volume ? `${a.pool}/${a.volume}` : null;
    default:
      return a.file ?? a.dev ?? a.name ?? null;
  }
}

/** The disks of a domain definition (`virsh dumpxml`), in document order. */
export function parseDomain(xml: string): DomainInfo {
  const root = parseXml(xml);
  if (root.name !== 'domain') throw xmlError(`expected <domain>, got <${root.name}>`);
  const disks: DomainDisk[] = [];
  for (const d of childrenNamed(child(root, 'devices'), 'disk')) {
    const target = child(d, 'target')?.attrs.dev;
    if (!target) continue;
    const type = d.attrs.type ?? 'file';
    disks.push({
      target,
      device: d.attrs.device ?? 'disk',
      type,
      format: child(d, 'driver')?.attrs.type ?? null,
      bus: child(d, 'target')?.attrs.bus ?? null,
      source: diskSource(type, child(d, 'source')),
      readonly: child(d, 'readonly') !== undefined,
      shareable: child(d, 'shareable') !== undefined,
      transient: child(d, 'transient') !== undefined,
    });
  }
  return { name: child(root, 'name')?.text.trim() ?? '', disks };
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

export interface CheckpointDisk {
  name: string;
  /** 'bitmap' or 'no'. */
  checkpoint: string;
  bitmap: string | null;
  /**
   * Bytes changed since the checkpoint, present only in `checkpoint-dumpxml --size` output and only
   * when libvirt could compute it, i.e. when the disk's bitmap exists and is consistent.
   */
  size: number | null;
}

export interface LibvirtCheckpoint {
  name: string;
  parent: string | null;
  /** Seconds since the epoch. */
  creationTime: number;
  disks: CheckpointDisk[];
}

/** One checkpoint (`virsh checkpoint-dumpxml [--size] [--no-domain]`). */
export function parseCheckpoint(xml: string): LibvirtCheckpoint {
  const root = parseXml(xml);
  if (root.name !== 'domaincheckpoint') throw xmlError(`expected <domaincheckpoint>, got <${root.name}>`);
  const disks = childrenNamed(child(root, 'disks'), 'disk').map((d) => {
    const size = d.attrs.size;
    return {
      name: d.attrs.name ?? '',
      checkpoint: d.attrs.checkpoint ?? 'bitmap',
      bitmap: d.attrs.bitmap ?? null,
      size: size !== undefined && /^\d+$/.test(size) ? Number(size) : null,
    };
  });
  return {
    name: child(root, 'name')?.text.trim() ?? '',
    parent: child(child(root, 'parent'), 'name')?.text.trim() ?? null,
    creationTime: Number(child(root, 'creationTime')?.text.trim() ?? '0') || 0,
    disks,
  };
}

export interface CheckpointXmlDisk {
  name: string;
  /** Track changes of this disk in a bitmap (qcow2 only); otherwise checkpoint='no'. */
  bitmap: boolean;
}

/** `<domaincheckpoint>` for `virsh backup-begin`: every disk of the domain, each bitmap or no. */
export function checkpointXml(name: string, description: string, disks: CheckpointXmlDisk[]): string {
  const lines = [
    '<domaincheckpoint>',
    `  <name>${escapeXml(name)}</name>`,
    `  <description>${escapeXml(description)}</description>`,
    '  <disks>',
    ...disks.map((d) => `    <disk name='${escapeXml(d.name)}' checkpoint='${d.bitmap ? 'bitmap' : 'no'}'/>`),
    '  </disks>',
    '</domaincheckpoint>',
  ];
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------
// Pull-mode backup jobs

export interface BackupXmlDisk {
  name: string;
  /** Absent (or false): `backup='no'`. */
  scratch?: string;
}

/**
 * `<domainbackup mode='pull'>` exporting the disks that have a scratch file over NBD on a unix
 * socket, relative to checkpoint `incremental` when given; every other disk is `backup='no'`.
 */
/** Where a pull-mode job's NBD server listens: a Unix socket, or TCP (with TLS or plain). */
export type BackupServer = { socket: string } | { host: string; port: number; tls: boolean };

export function backupXml(
  server: string | BackupServer,
  incremental: string | null,
  disks: BackupXmlDisk[],
): string {
  const srv = typeof server === 'string' ? { socket: server } : server;
  const lines = ["<domainbackup mode='pull'>"];
  if (incremental !== null) lines.push(`  <incremental>${escapeXml(incremental)}</incremental>`);
  lines.push(
    'socket' in srv
      ? `  <server transport='unix' socket='${escapeXml(srv.socket)}'/>`
      : `  <server transport='tcp'${srv.tls ? " tls='yes'" : ''} name='${escapeXml(srv.host)}' port='${srv.port}'/>`,
    '  <disks>',
  );
  for (const d of disks) {
    if (d.scratch === undefined) {
      lines.push(`    <disk name='${escapeXml(d.name)}' backup='no'/>`);
    } else {
      lines.push(
        `    <disk name='${escapeXml(d.name)}' backup='yes' type='file'>`,
        `      <scratch file='${escapeXml(d.scratch)}'/>`,
        '    </disk>',
      );
    }
  }
  lines.push('  </disks>', '</domainbackup>');
  return lines.join('\n') + '\n';
}

export interface BackupJobDisk {
  name: string;
  backup: boolean;
  /** NBD export name (libvirt uses the target name). */
  exportName: string | null;
  /** Dirty bitmap exported as `qemu:dirty-bitmap:<exportBitmap>` (incremental only). */
  exportBitmap: string | null;
  scratch: string | null;
}

export interface BackupJob {
  mode: string;
  incremental: string | null;
  /** Unix socket of a pull-mode job, or null (push mode, TCP). */
  socket: string | null;
  /** TCP server of a pull-mode job, or null. */
  tcp: { host: string; port: number; tls: boolean } | null;
  disks: BackupJobDisk[];
}

/** The running backup job (`virsh backup-dumpxml`). */
export function parseBackupJob(xml: string): BackupJob {
  const root = parseXml(xml);
  if (root.name !== 'domainbackup') throw xmlError(`expected <domainbackup>, got <${root.name}>`);
  const server = child(root, 'server');
  return {
    mode: root.attrs.mode ?? 'push',
    incremental: child(root, 'incremental')?.text.trim() ?? null,
    socket: server && (server.attrs.transport ?? 'tcp') === 'unix' ? (server.attrs.socket ?? null) : null,
    tcp:
      server && (server.attrs.transport ?? 'tcp') === 'tcp' && server.attrs.port !== undefined
        ? {
            host: server.attrs.name ?? '',
            port: Number(server.attrs.port),
            tls: server.attrs.tls === 'yes',
          }
        : null,
    disks: childrenNamed(child(root, 'disks'), 'disk').map((d) => ({
      name: d.attrs.name ?? '',
      backup: d.attrs.backup !== 'no',
      exportName: d.attrs.exportname ?? null,
      exportBitmap: d.attrs.exportbitmap ?? null,
      scratch: child(d, 'scratch')?.attrs.file ?? null,
    })),
  };
}
