import { describe, expect, it } from "vitest";
import { parseBinary, parseText } from "./protocol";

function frame(kind: number, head: Uint8Array, body: Uint8Array): ArrayBuffer {
  const buf = new Uint8Array(4 + head.length + body.length);
  new DataView(buf.buffer).setUint32(0, kind, false);
  buf.set(head, 4);
  buf.set(body, 4 + head.length);
  return buf.buffer;
}

const u32 = (n: number) => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, false);
  return b;
};

describe("binary frames", () => {
  it("reads ComfyUI's type-1 previews", () => {
    const p = parseBinary(frame(1, u32(2), new Uint8Array([9, 8, 7])))!;
    expect(p.kind).toBe(1);
    expect(p.mime).toBe("image/png");
    expect([...p.image]).toEqual([9, 8, 7]);
  });

  it("reads type-4 frames with NOVA's tile metadata", () => {
    const meta = {
      node_id: "5",
      image_type: "image/jpeg",
      nova: { kind: "tile", source_node: "4", tile: { x: 0, y: 0, w: 8, h: 8 }, tile_index: 0, tiles: 4, width: 16, height: 16 },
    };
    const text = new TextEncoder().encode(JSON.stringify(meta));
    const head = new Uint8Array([...u32(text.length), ...text]);
    const p = parseBinary(frame(4, head, new Uint8Array([1, 2])))!;
    const t = p.meta.nova;
    expect(t?.kind).toBe("tile");
    if (t?.kind === "tile") expect(t.tile).toEqual({ x: 0, y: 0, w: 8, h: 8 });
    expect([...p.image]).toEqual([1, 2]);
  });

  it("refuses short or unknown frames", () => {
    expect(parseBinary(new ArrayBuffer(3))).toBeNull();
    expect(parseBinary(frame(3, u32(0), new Uint8Array()))).toBeNull();
    expect(parseBinary(frame(4, u32(1000), new Uint8Array()))).toBeNull();
    expect(parseText("not json")).toBeNull();
    expect(parseText('{"type":"status","data":{}}')?.type).toBe("status");
  });
});
