import { describe, expect, it } from "vitest";
import type { Plan } from "./api";
import { rail } from "./rail";
import { apply, emptyState } from "./store";

const MiB = 2 ** 20;
const node = (id: string, forecast: number, weights = 0) => ({
  node: id,
  class_type: `N${id}`,
  mode: "tiled",
  tile: 256,
  chunks: 4,
  weights_bytes: weights * MiB,
  activations_bytes: (forecast - weights) * MiB,
  forecast_bytes: forecast * MiB,
  fits: true,
});
const plan: Plan = {
  profile: "PASCAL_2G",
  budget_bytes: 2048 * MiB,
  headroom_bytes: 512 * MiB,
  limit_bytes: 100 * MiB,
  forecast_peak_bytes: 120 * MiB,
  fits: false,
  refusal: null,
  nodes: [node("1", 10), node("2", 120, 60), node("3", 50, 20)],
};

describe("the budget rail", () => {
  it("scales bars to the larger of the limit and the largest forecast, and flags overruns", () => {
    const r = rail(plan, undefined, new Set());
    expect(r.scale).toBe(120 * MiB);
    expect(r.limitPct).toBeCloseTo(100 / 1.2);
    expect(r.bars.map((b) => b.over)).toEqual([false, true, false]);
    expect(r.bars[1].forecastPct).toBe(100);
    expect(r.bars[0].forecastPct).toBeCloseTo(100 / 12);
    expect(r.bars.every((b) => b.tracked === null)).toBe(true);
    expect(r.selection).toBeNull();
  });

  it("leaves a far-off limit off the scale", () => {
    const big = { ...plan, limit_bytes: 2000 * MiB };
    const r = rail(big, undefined, new Set());
    expect(r.scale).toBe(120 * MiB);
    expect(r.limitPct).toBeNull();
    expect(r.bars.every((b) => !b.over)).toBe(true);
  });

  it("gives a selected subgraph the peak of its nodes (they run one after another), not the sum", () => {
    const r = rail(plan, undefined, new Set(["1", "3"]));
    expect(r.selection).toEqual({ nodes: 2, peak: 50 * MiB, weights: 20 * MiB, fits: true });
    const over = rail(plan, undefined, new Set(["2", "3"]));
    expect(over.selection?.fits).toBe(false);
  });

  it("shows what the run tracked per node against the forecast", () => {
    const s = emptyState();
    const ev = (type: string, data: Record<string, unknown>) =>
      apply(s, { v: 1, job: "j", type, data });
    ev("telemetry.node_start", { node: "3", class_type: "N3", chunks: 2 });
    ev("telemetry.chunk", { node: "3", chunk: 0, chunks: 2, tracked_bytes: 30 * MiB });
    let r = rail(plan, s.jobs.get("j"), new Set());
    expect(r.bars[2].tracked).toBe(30 * MiB);
    ev("telemetry.node_end", { node: "3", wall_ms: 5, tracked_peak_bytes: 44 * MiB });
    r = rail(plan, s.jobs.get("j"), new Set());
    expect(r.bars[2].tracked).toBe(44 * MiB);
    expect(r.run.trackedPeak).toBe(44 * MiB);
    expect(r.bars[0].tracked).toBeNull();
  });
});
