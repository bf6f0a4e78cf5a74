import { describe, expect, it } from "vitest";
import { nextStart, pcmToPlanar } from "./media";

describe("audio chunks", () => {
  it("decode interleaved 16-bit PCM into channels", () => {
    const v = new Int16Array([0, 32767, -32767, 16384, 8192, -8192]);
    const [l, r] = pcmToPlanar(new Uint8Array(v.buffer), 2);
    const f = (xs: number[]) => Array.from(new Float32Array(xs));
    expect(Array.from(l)).toEqual(f([0, -1, 8192 / 32767]));
    expect(Array.from(r)).toEqual(f([1, 16384 / 32767, -8192 / 32767]));
  });

  it("queue back to back, and restart a little ahead when playback ran dry", () => {
    let until = 0;
    const a = nextStart(until, 10, 0.5);
    expect(a.start).toBeCloseTo(10.05);
    until = a.until;
    const b = nextStart(until, 10.2, 0.5);
    expect(b.start).toBeCloseTo(a.until);
    // Late: the clock passed the queue's end.
    const c = nextStart(b.until, 20, 0.5);
    expect(c.start).toBeCloseTo(20.05);
  });
});
