/**
 * Logical vs stored bytes over time for one VM, as an SVG drawn here (no chart library): logical
 * is the data each checkpoint holds (what a full restore writes), stored is what the repository
 * has kept for the VM up to that checkpoint (sum of new stored bytes). The gap is what
 * deduplication, incrementals and compression saved.
 */
import type { VNode } from 'preact';
import type { Checkpoint } from './api.js';
import { bytes, when } from './format.js';
import { html } from './html.js';

export interface ChartPoint {
  t: number;
  name: string;
  logical: number;
  stored: number;
}

export function chartPoints(cps: Checkpoint[]): ChartPoint[] {
  let stored = 0;
  return cps.map((c) => {
    stored += c.bytesNewStored;
    return { t: Date.parse(c.time), name: c.name, logical: c.logicalBytes ?? c.bytesRead, stored };
  });
}

export function BytesChart({
  points,
  width = 720,
  height = 240,
}: {
  points: ChartPoint[];
  width?: number;
  height?: number;
}): VNode {
  const padL = 70;
  const padR = 16;
  const padT = 12;
  const padB = 36;
  const w = width - padL - padR;
  const h = height - padT - padB;
  const t0 = points.length ? Math.min(...points.map((p) => p.t)) : 0;
  const t1 = points.length ? Math.max(...points.map((p) => p.t)) : 1;
  const yMax = Math.max(1, ...points.map((p) => Math.max(p.logical, p.stored))) * 1.05;
  const x = (t: number): number => padL + (t1 === t0 ? w / 2 : ((t - t0) / (t1 - t0)) * w);
  const y = (v: number): number => padT + h - (v / yMax) * h;
  const line = (f: (p: ChartPoint) => number): string =>
    points.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(f(p)).toFixed(1)}`).join(' ');
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((k) => k * yMax);
  const summary =
    points.length > 0
      ? `Latest checkpoint ${points[points.length - 1]!.name}: ${bytes(points[points.length - 1]!.logical)} logical, ${bytes(points[points.length - 1]!.stored)} stored in total.`
      : 'No checkpoints.';
  return html`<figure style="margin:0">
    <svg
      class="chart"
      role="img"
      aria-label=${`Logical versus stored bytes over time. ${summary}`}
      width=${width}
      height=${height}
      viewBox=${`0 0 ${width} ${height}`}
    >
      ${ticks.map(
        (v) =>
          html`<g>
            <line class="grid" x1=${padL} x2=${padL + w} y1=${y(v)} y2=${y(v)} />
            <text x=${padL - 6} y=${y(v) + 4} text-anchor="end">${bytes(Math.round(v))}</text>
          </g>`,
      )}
      <line class="axis" x1=${padL} x2=${padL + w} y1=${padT + h} y2=${padT + h} />
      <line class="axis" x1=${padL} x2=${padL} y1=${padT} y2=${padT + h} />
      ${
        points.length > 0
          ? html`<text x=${padL} y=${height - 8}>${when(new Date(t0).toISOString())}</text>
              <text x=${padL + w} y=${height - 8} text-anchor="end"
                >${when(new Date(t1).toISOString())}</text
              >`
          : null
      }
      <path class="logical" d=${line((p) => p.logical)} />
      <path class="stored" d=${line((p) => p.stored)} />
      ${points.map(
        (p) =>
          html`<g>
            <circle cx=${x(p.t)} cy=${y(p.logical)} r="3.5" fill="#0a58ca"
              ><title>${p.name}: ${bytes(p.logical)} logical</title></circle
            >
            <circle cx=${x(p.t)} cy=${y(p.stored)} r="3.5" fill="#bf3989"
              ><title>${p.name}: ${bytes(p.stored)} stored in total</title></circle
            >
          </g>`,
      )}
    </svg>
    <figcaption class="legend">
      <span><i style="background:#0a58ca"></i>logical (data in the checkpoint)</span>
      <span><i style="background:#bf3989"></i>stored (repository bytes for this VM, cumulative)</span>
    </figcaption>
  </figure>` as VNode;
}
