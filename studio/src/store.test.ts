import { describe, expect, it } from "vitest";
import { apply, emptyState, Scheduler } from "./store";
import type { Message } from "./protocol";
// Recorded from a real `nova serve` (the core example, sharpen_upscale.json, through /prompt
// and a socket that negotiated NOVA's events); binary frames are summarised.
import recorded from "./fixtures/core_run.json";

const messages = (recorded as Array<Message & { binary?: number }>).filter((m) => !m.binary);

describe("the reducer", () => {
  it("follows the recorded core run to success with every node done", () => {
    const s = emptyState();
    for (const m of messages) apply(s, m);
    expect(s.sid).toBe("studio-fixture");
    const j = s.jobs.get("fixture-core-run")!;
    expect(j.status).toBe("success");
    expect(j.executing).toBeNull();
    expect([...j.nodes.keys()].sort()).toEqual(["1", "2", "3", "4", "5"]);
    for (const n of j.nodes.values()) expect(n.status).toBe("done");
    expect(j.nodes.get("4")!.classType).toBe("ImageBlur");
    expect(j.forecastPeakBytes).toBeGreaterThan(0);
    expect(j.tiles.length).toBe(4);
    expect(j.tiles[0].tiles).toBe(4);
    const out = j.outputs["5"] as { images: Array<{ filename: string }> };
    expect(out.images[0].filename).toMatch(/^nova_example_\d+_\.png$/);
    expect(s.queueRemaining).toBe(0);
  });

  it("keeps chunk progress per node and counts every message", () => {
    const s = emptyState();
    for (const m of messages) apply(s, m);
    const j = s.jobs.get("fixture-core-run")!;
    const blur = j.nodes.get("4")!;
    expect(blur.progress).toEqual({ value: blur.chunks, max: blur.chunks });
    const jobMessages = messages.filter(
      (m) => m.type !== "status" && m.type !== "feature_flags",
    ).length;
    expect(j.messages).toBe(jobMessages);
  });

  it("applies results that arrive behind a thousand partial outputs", () => {
    const s = emptyState();
    const id = "burst";
    apply(s, { type: "execution_start", data: { prompt_id: id } });
    for (let i = 0; i < 1000; i++) {
      apply(s, {
        type: "output.partial.image",
        v: 1,
        job: id,
        data: {
          node: "9",
          source_node: "8",
          tile: { x: (i % 40) * 16, y: Math.floor(i / 40) * 16, w: 16, h: 16 },
          tile_index: i,
          tiles: 1000,
          width: 640,
          height: 400,
        },
      });
    }
    apply(s, { type: "executed", data: { prompt_id: id, node: "9", output: { images: [] } } });
    apply(s, { type: "execution_success", data: { prompt_id: id } });
    const j = s.jobs.get(id)!;
    expect(j.tiles.length).toBe(1000);
    expect(j.outputs["9"]).toEqual({ images: [] });
    expect(j.status).toBe("success");
  });

  it("names the failed node", () => {
    const s = emptyState();
    apply(s, {
      type: "execution_error",
      data: { prompt_id: "p", node_id: "1", node_type: "LoadImage", exception_message: "truncated" },
    });
    const j = s.jobs.get("p")!;
    expect(j.status).toBe("error");
    expect(j.error).toEqual({ nodeId: "1", nodeType: "LoadImage", message: "truncated" });
    expect(j.nodes.get("1")!.status).toBe("error");
  });
});

describe("the render scheduler", () => {
  it("renders once per frame however many messages arrive", () => {
    const frames: Array<() => void> = [];
    let renders = 0;
    const sch = new Scheduler(
      () => renders++,
      (cb) => frames.push(cb),
    );
    for (let i = 0; i < 500; i++) sch.schedule();
    expect(frames.length).toBe(1);
    frames.shift()!();
    expect(renders).toBe(1);
    sch.schedule();
    expect(frames.length).toBe(1);
  });
});

describe("NOVA's node phases and time split", () => {
  const run = (msgs: Array<[string, Record<string, unknown>]>) => {
    const s = emptyState();
    for (const [type, data] of msgs) apply(s, { v: 1, job: "m", type, data });
    return s.jobs.get("m")!;
  };

  it("keeps each node's phases in order and the job's current state", () => {
    const j = run([
      ["lifecycle", { state: "planning" }],
      ["lifecycle", { state: "running" }],
      ["telemetry.node_start", { node: "2", class_type: "UpscaleModelLoader" }],
      ["lifecycle", { state: "indexing", node: "2" }],
      ["telemetry.node_end", { node: "2", wall_ms: 1 }],
      ["telemetry.node_start", { node: "3", class_type: "ImageUpscaleWithModel" }],
      ["lifecycle", { state: "prefetching", node: "3" }],
      ["lifecycle", { state: "warming", node: "3" }],
      ["lifecycle", { state: "running", node: "3" }],
    ]);
    expect(j.nodes.get("2")!.phases).toEqual(["running", "indexing"]);
    expect(j.nodes.get("2")!.lifecycle).toBeUndefined();
    expect(j.nodes.get("3")!.phases).toEqual(["running", "prefetching", "warming", "running"]);
    expect(j.nodes.get("3")!.lifecycle).toBe("running");
    expect(j.phases).toEqual(["planning", "running", "indexing", "prefetching", "warming", "running"]);
  });

  it("marks cached nodes and replayed windows as cached_replay", () => {
    const j = run([
      ["execution_cached", { nodes: ["1"], prompt_id: "m" }],
      ["telemetry.node_start", { node: "4", class_type: "SaveVideo" }],
      ["lifecycle", { state: "cached_replay", node: "4" }],
    ]);
    expect(j.nodes.get("1")!.lifecycle).toBe("cached_replay");
    expect(j.nodes.get("4")!.lifecycle).toBe("cached_replay");
  });

  it("takes the run's split from telemetry.timing and each node's from node_end", () => {
    const split = { load_ms: 4, transfer_ms: 1, compute_ms: 9, replay_ms: 0 };
    const j = run([
      ["telemetry.node_end", { node: "3", wall_ms: 14, timing: split, tracked_peak_bytes: 100 }],
      ["telemetry.timing", { startup_ms: 2, wall_ms: 20, ...split, nodes: [{ node: "3", class_type: "X", wall_ms: 14, ...split }] }],
    ]);
    expect(j.nodes.get("3")!.timing).toEqual(split);
    expect(j.timing?.startup_ms).toBe(2);
    expect(j.timing?.nodes[0].compute_ms).toBe(9);
    expect(j.trackedPeakBytes).toBe(100);
  });
});
