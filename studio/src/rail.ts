// The VRAM budget rail's arithmetic: per node, the forecast (weights and activations, from
// the plan) against the usable budget (drawn to scale when it is within twice the largest bar), and, during and after a run, what the accountant
// tracked; for a selected subgraph, its peak. Nodes run one after another, so a subgraph's
// forecast peak is its largest node forecast, not their sum. Pure, unit-tested.

import type { Plan } from "./api";
import type { JobState } from "./store";

export interface RailBar {
  node: string;
  classType: string;
  weights: number;
  activations: number;
  forecast: number;
  /** What the run tracked while the node ran, once it did. */
  tracked: number | null;
  /** Over the usable budget. */
  over: boolean;
  selected: boolean;
  /** Heights as a share of the rail's scale, 0–100. */
  forecastPct: number;
  trackedPct: number | null;
}

export interface Rail {
  limit: number | null;
  /** Bars are drawn against `scale` bytes (the full height). */
  scale: number;
  /** Where the limit line sits, 0–100; `null` when it is far above every bar. */
  limitPct: number | null;
  bars: RailBar[];
  /** Forecast peak of the selected nodes, if any are selected. */
  selection: { nodes: number; peak: number; weights: number; fits: boolean } | null;
  /** The run's tracked peak against the plan's forecast peak. */
  run: { forecastPeak: number; trackedPeak: number | null };
}

export function rail(plan: Plan, job: JobState | undefined, selected: ReadonlySet<string>): Rail {
  const limit = plan.limit_bytes;
  const tracked = (id: string) => job?.nodes.get(id)?.trackedBytes ?? null;
  const top = Math.max(
    ...plan.nodes.map((n) => n.forecast_bytes),
    ...plan.nodes.map((n) => tracked(n.node) ?? 0),
    1,
  );
  // The limit is on the scale unless it would flatten every bar (a small job on a big budget:
  // then the rail says so in words).
  const limitOnScale = limit !== null && limit <= 2 * top;
  const scale = limitOnScale ? Math.max(limit, top) : top;
  const bars = plan.nodes.map((n) => {
    const t = tracked(n.node);
    return {
      node: n.node,
      classType: n.class_type,
      weights: n.weights_bytes,
      activations: n.activations_bytes,
      forecast: n.forecast_bytes,
      tracked: t,
      over: limit !== null && n.forecast_bytes > limit,
      selected: selected.has(n.node),
      forecastPct: (100 * n.forecast_bytes) / scale,
      trackedPct: t === null ? null : (100 * t) / scale,
    };
  });
  const sel = bars.filter((b) => b.selected);
  const peak = Math.max(0, ...sel.map((b) => b.forecast));
  return {
    limit,
    scale,
    limitPct: limitOnScale ? (100 * limit) / scale : null,
    bars,
    selection: sel.length
      ? {
          nodes: sel.length,
          peak,
          weights: sel.reduce((a, b) => a + b.weights, 0),
          fits: limit === null || peak <= limit,
        }
      : null,
    run: { forecastPeak: plan.forecast_peak_bytes, trackedPeak: job?.trackedPeakBytes ?? null },
  };
}
