/**
 * Rewrites a saved libvirt domain XML so that it describes the restored VM. Pure string work, no
 * XML library: libvirt writes a small, regular dialect (no CDATA in the elements touched here),
 * and the rewrite only edits a few known elements, leaving everything else byte for byte as saved.
 *
 * Per `<disk>` whose `<target dev='X'>` names a restored bkfs disk X:
 *   - the disk becomes `type='file'` with `<source file='PATH'/>` (whatever the source was: file,
 *     block device, network), the `<driver type=…>` becomes the restored format (a driver element
 *     is added when missing);
 *   - stale chain and job state is dropped: `<backingStore>` (the restored file has its own chain,
 *     or none), `<mirror>`, and any `<checkpoint>`/`<backup>` elements.
 * Domain-wide: `<name>` becomes the new name when one is given, and `<uuid>` and the `<mac>` of
 * every `<interface>` are dropped when that name differs from the saved one (libvirt makes new
 * ones, so the copy never collides with the original, on the host or on its network; redefining an
 * existing domain with --force keeps that domain's UUID). Other disks (a cdrom, a disk bkfs did not back up) are left alone and reported.
 */
import { escapeXml as escapeXmlAttr } from '../backup/libvirt-xml';

/** Escape an attribute value (either quote): the same rules as the libvirt XML writer. */
export { escapeXmlAttr };

export interface DiskRewrite {
  path: string;
  format: 'raw' | 'qcow2';
}

export interface XmlRewriteOptions {
  /** Restored disks by libvirt target name (the bkfs disk name), e.g. { vda: {...} }. */
  disks: Record<string, DiskRewrite>;
  /** New domain name (--define NAME). */
  name?: string;
  /** UUID to use (redefining an existing domain of that name keeps its UUID). */
  uuid?: string;
}

export interface XmlRewriteResult {
  xml: string;
  /** `<name>` of the saved XML, if any. */
  originalName: string | null;
  /** Target names whose disk was pointed at a restored file. */
  rewritten: string[];
  /** Target names of `<disk>` elements left unchanged (no restored disk of that name). */
  untouched: string[];
  /** Restored disks that no `<disk>` element of the XML mentions. */
  missing: string[];
}

function unescapeXml(s: string): string {
  return s
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&amp;/g, '&');
}

/** Value of attribute `name` in a start tag, or undefined. */
export function getAttr(tag: string, name: string): string | undefined {
  const m = new RegExp(`\\s${name}\\s*=\\s*(?:'([^']*)'|"([^"]*)")`).exec(tag);
  if (!m) return undefined;
  return unescapeXml(m[1] ?? m[2] ?? '');
}

/** A start tag with attribute `name` set to `value` (replaced in place, or appended). */
export function setAttr(tag: string, name: string, value: string): string {
  const re = new RegExp(`(\\s${name}\\s*=\\s*)(?:'[^']*'|"[^"]*")`);
  const v = `'${escapeXmlAttr(value)}'`;
  if (re.test(tag)) return tag.replace(re, (_m, pre: string) => `${pre}${v}`);
  return tag.replace(/\s*(\/?>)$/, (_m, end: string) => ` ${name}=${v}${end}`);
}

interface Span {
  start: number;
  end: number;
}

/**
 * Spans of every `<tag …/>` or `<tag …>…</tag>` element in `xml` at any depth (same-name nesting,
 * as `<backingStore>` chains have, is matched correctly); only outermost ones are returned.
 */
export function findElements(xml: string, tag: string): Span[] {
  const out: Span[] = [];
  const open = new RegExp(`<${tag}(?=[\\s/>])[^>]*?(/?)>|</${tag}\\s*>`, 'g');
  let depth = 0;
  let start = -1;
  for (let m = open.exec(xml); m; m = open.exec(xml)) {
    const isClose = m[0].startsWith('</');
    if (isClose) {
      if (depth === 0) continue; // stray close tag: leave it
      depth--;
      if (depth === 0) out.push({ start, end: m.index + m[0].length });
    } else if (m[1] === '/') {
      if (depth === 0) out.push({ start: m.index, end: m.index + m[0].length });
    } else {
      if (depth === 0) start = m.index;
      depth++;
    }
  }
  return out;
}

/** Remove every `tag` element (and the whitespace-only line it stood on). */
export function removeElements(xml: string, tag: string): string {
  const spans = findElements(xml, tag);
  let out = xml;
  for (let i = spans.length - 1; i >= 0; i--) {
    let { start, end } = spans[i]!;
    // Swallow the indentation before and the newline after, if the element had its own line.
    const lineStart = out.lastIndexOf('\n', start - 1) + 1;
    if (/^[ \t]*$/.test(out.slice(lineStart, start)) && out[end] === '\n') {
      start = lineStart;
      end += 1;
    }
    out = out.slice(0, start) + out.slice(end);
  }
  return out;
}

function rewriteDisk(el: string, d: DiskRewrite): string {
  const startEnd = el.indexOf('>') + 1;
  let head = el.slice(0, startEnd);
  let body = el.slice(startEnd);
  head = setAttr(head, 'type', 'file');
  for (const t of ['backingStore', 'mirror', 'checkpoint', 'backup']) body = removeElements(body, t);
  const src = `<source file='${escapeXmlAttr(d.path)}'/>`;
  const sources = findElements(body, 'source');
  if (sources.length > 0) {
    const first = sources[0]!;
    for (let i = sources.length - 1; i >= 1; i--) {
      body = body.slice(0, sources[i]!.start) + body.slice(sources[i]!.end);
    }
    body = body.slice(0, first.start) + src + body.slice(first.end);
  }
  const drivers = findElements(body, 'driver');
  const indent = /\n([ \t]*)</.exec(body)?.[1] ?? '';
  if (drivers.length > 0) {
    const dr = drivers[0]!;
    const tagEnd = body.indexOf('>', dr.start) + 1;
    const tag = body.slice(dr.start, tagEnd);
    body = body.slice(0, dr.start) + setAttr(tag, 'type', d.format) + body.slice(tagEnd);
  } else {
    body = `\n${indent}<driver name='qemu' type='${d.format}'/>` + body;
  }
  if (sources.length === 0) {
    const at = findElements(body, 'driver')[0]!.end;
    body = body.slice(0, at) + `\n${indent}${src}` + body.slice(at);
  }
  return head + body;
}

/** The XML without the `<mac>` of any `<interface>` (libvirt generates new addresses). */
export function removeInterfaceMacs(xml: string): string {
  const ifs = findElements(xml, 'interface');
  let out = xml;
  for (let i = ifs.length - 1; i >= 0; i--) {
    const s = ifs[i]!;
    out = out.slice(0, s.start) + removeElements(out.slice(s.start, s.end), 'mac') + out.slice(s.end);
  }
  return out;
}

export function rewriteDomainXml(xml: string, o: XmlRewriteOptions): XmlRewriteResult {
  const rewritten: string[] = [];
  const untouched: string[] = [];
  let out = '';
  let last = 0;
  for (const span of findElements(xml, 'disk')) {
    const el = xml.slice(span.start, span.end);
    const targetTag = /<target\b[^>]*>/.exec(el)?.[0];
    const dev = targetTag ? getAttr(targetTag, 'dev') : undefined;
    const d = dev !== undefined ? o.disks[dev] : undefined;
    out += xml.slice(last, span.start);
    if (dev !== undefined && d && !rewritten.includes(dev)) {
      out += rewriteDisk(el, d);
      rewritten.push(dev);
    } else {
      out += el;
      untouched.push(dev ?? '(no target)');
    }
    last = span.end;
  }
  out += xml.slice(last);
  for (const t of ['checkpoint', 'backup']) out = removeElements(out, t);

  const nameM = /<name>([^<]*)<\/name>/.exec(out);
  const originalName = nameM ? unescapeXml(nameM[1]!.trim()) : null;
  if (o.name !== undefined) {
    const esc = escapeXmlAttr(o.name);
    if (nameM)
      out = out.slice(0, nameM.index) + `<name>${esc}</name>` + out.slice(nameM.index + nameM[0].length);
    else out = out.replace(/(<domain\b[^>]*>)/, `$1\n  <name>${esc}</name>`);
    if (o.name !== originalName) {
      out = removeElements(out, 'uuid');
      out = removeInterfaceMacs(out);
    }
  }
  if (o.uuid !== undefined) {
    const u = `<uuid>${escapeXmlAttr(o.uuid)}</uuid>`;
    const at = findElements(out, 'uuid')[0];
    if (at) out = out.slice(0, at.start) + u + out.slice(at.end);
    else {
      const nm = /<name>[^<]*<\/name>/.exec(out);
      if (nm) {
        const end = nm.index + nm[0].length;
        const indent = /\n([ \t]*)<name>/.exec(out)?.[1] ?? '';
        out = out.slice(0, end) + `\n${indent}${u}` + out.slice(end);
      }
    }
  }
  const missing = Object.keys(o.disks).filter((k) => !rewritten.includes(k));
  return { xml: out, originalName, rewritten, untouched, missing };
}
