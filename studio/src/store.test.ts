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
