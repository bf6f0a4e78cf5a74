// The bottleneck inspector's arithmetic: a run's time (telemetry.timing) as stacked bars, per
// run and per node, in start-up/import, model load, transfer, compute and cache replay. Pure,
// so it is unit-tested without a browser.

import type { RunTiming, TimeSplit } from "./store";

export const PARTS = ["startup", "load", "transfer", "compute", "replay"] as const;
export type Part = (typeof PARTS)[number];

export const PART_LABEL: Record<Part, string> = {
  startup: "start-up/import",
  load: "model load",
  transfer: "transfer",
  compute: "compute",
  replay: "cache replay",
};

export interface Segment {
  part: Part;
  ms: number;
  /** Share of the row's total, 0–100. */
  pct: number;
}

export interface Row {
  /** `run` for the whole job, else the node id. */
  id: string;
  label: string;
  totalMs: number;
  segments: Segment[];
  /** The part that took longest: the row's bottleneck. */
  bottleneck: Part | null;
}

function row(id: string, label: string, ms: Record<Part, number>): Row {
  const totalMs = PARTS.reduce((a, p) => a + ms[p], 0);
  const segments = PARTS.filter((p) => ms[p] > 0).map((p) => ({
    part: p,
    ms: ms[p],
    pct: totalMs > 0 ? (100 * ms[p]) / totalMs : 0,
  }));
  const top = segments.reduce<Segment | null>((a, s) => (a === null || s.ms > a.ms ? s : a), null);
  return { id, label, totalMs, segments, bottleneck: top?.part ?? null };
}

const split = (t: TimeSplit, startup = 0): Record<Part, number> => ({
  startup,
  load: t.load_ms,
  transfer: t.transfer_ms,
  compute: t.compute_ms,
  replay: t.replay_ms,
});

/** The run's row first, then one per node that spent any time, slowest first. */
export function inspectorRows(t: RunTiming): Row[] {
  const nodes = t.nodes
    .map((n) => row(n.node, `#${n.node} ${n.class_type}`, split(n)))
    .filter((r) => r.totalMs > 0)
    .sort((a, b) => b.totalMs - a.totalMs);
  return [row("run", "whole run", split(t, t.startup_ms)), ...nodes];
}
