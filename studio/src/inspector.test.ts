import { describe, expect, it } from "vitest";
import { inspectorRows } from "./inspector";
import type { RunTiming } from "./store";

const timing: RunTiming = {
  startup_ms: 5,
  wall_ms: 120,
  load_ms: 40,
  transfer_ms: 2,
  compute_ms: 70,
  replay_ms: 0,
  nodes: [
    { node: "1", class_type: "LoadImage", wall_ms: 3, load_ms: 0, transfer_ms: 0, compute_ms: 3, replay_ms: 0 },
    { node: "2", class_type: "UpscaleModelLoader", wall_ms: 0, load_ms: 0, transfer_ms: 0, compute_ms: 0, replay_ms: 0 },
    { node: "3", class_type: "ImageUpscaleWithModel", wall_ms: 100, load_ms: 40, transfer_ms: 2, compute_ms: 67, replay_ms: 0 },
  ],
};

describe("the bottleneck inspector", () => {
  it("puts the run first with start-up, then nodes slowest first, leaving out idle ones", () => {
    const rows = inspectorRows(timing);
    expect(rows.map((r) => r.id)).toEqual(["run", "3", "1"]);
    expect(rows[0].totalMs).toBe(117);
    expect(rows[0].segments.map((s) => s.part)).toEqual(["startup", "load", "transfer", "compute"]);
    expect(rows[1].label).toBe("#3 ImageUpscaleWithModel");
  });

  it("splits each row into shares that sum to 100 and names the largest part", () => {
    for (const r of inspectorRows(timing)) {
      const sum = r.segments.reduce((a, s) => a + s.pct, 0);
      expect(sum).toBeCloseTo(100);
    }
    const node3 = inspectorRows(timing)[1];
    expect(node3.bottleneck).toBe("compute");
    const load = node3.segments.find((s) => s.part === "load")!;
    expect(load.pct).toBeCloseTo((100 * 40) / 109);
  });

  it("names a replay-bound run", () => {
    const replayed = { ...timing, compute_ms: 1, load_ms: 0, transfer_ms: 0, replay_ms: 50, nodes: [] };
    expect(inspectorRows(replayed)[0].bottleneck).toBe("replay");
  });
});
