import { describe, expect, it } from "vitest";
import { compatibleOutputs, edges, isLinkKind, layout, type ApiWorkflow } from "./layout";
import example from "../../examples/workflows/sharpen_upscale.json";

describe("layout", () => {
  it("puts the core example's chain in five columns, left to right", () => {
    const placed = layout(example as ApiWorkflow);
    expect(placed.map((p) => [p.id, p.col])).toEqual([
      ["1", 0],
      ["2", 1],
      ["3", 2],
      ["4", 3],
      ["5", 4],
    ]);
    for (const e of edges(example as ApiWorkflow)) {
      const from = placed.find((p) => p.id === e.from)!;
      const to = placed.find((p) => p.id === e.to)!;
      expect(from.x).toBeLessThan(to.x);
    }
  });

  it("stacks siblings in rows and survives cycles and dangling links", () => {
    const wf: ApiWorkflow = {
      "1": { class_type: "EmptyImage", inputs: {} },
      "2": { class_type: "ImageBlur", inputs: { image: ["1", 0] } },
      "3": { class_type: "ImageInvert", inputs: { image: ["1", 0] } },
      "4": { class_type: "A", inputs: { x: ["5", 0] } },
      "5": { class_type: "B", inputs: { x: ["4", 0], y: ["99", 0] } },
    };
    const placed = layout(wf);
    const at = (id: string) => placed.find((p) => p.id === id)!;
    expect(at("2").col).toBe(1);
    expect(at("3").col).toBe(1);
    expect(at("3").row).toBe(at("2").row + 1);
    expect(edges(wf).some((e) => e.from === "99")).toBe(false);
    expect(placed).toHaveLength(5);
  });
});

describe("connecting inputs", () => {
  const outputs: Record<string, string[]> = {
    EmptyImage: ["IMAGE"],
    ImageBlur: ["IMAGE"],
    CheckpointLoaderSimple: ["MODEL", "CLIP", "VAE"],
    SaveImage: [],
  };
  const wf: ApiWorkflow = {
    "1": { class_type: "EmptyImage", inputs: {} },
    "2": { class_type: "ImageBlur", inputs: { image: ["1", 0] } },
    "3": { class_type: "ImageBlur", inputs: { image: ["2", 0] } },
    "4": { class_type: "CheckpointLoaderSimple", inputs: {} },
    "5": { class_type: "SaveImage", inputs: {} },
  };
  it("offers every output of the input's type, but none downstream of the node", () => {
    expect(compatibleOutputs(wf, (c) => outputs[c], "5", "IMAGE")).toEqual([["1", 0], ["2", 0], ["3", 0]]);
    // Node 2 feeds 3: linking 2's input to 3 would make a cycle.
    expect(compatibleOutputs(wf, (c) => outputs[c], "2", "IMAGE")).toEqual([["1", 0]]);
    expect(compatibleOutputs(wf, (c) => outputs[c], "5", "VAE")).toEqual([["4", 2]]);
  });
  it("tells links from widgets", () => {
    expect(isLinkKind("IMAGE")).toBe(true);
    expect(isLinkKind("INT")).toBe(false);
    expect(isLinkKind(["a", "b"])).toBe(false);
  });
});
