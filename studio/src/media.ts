// Playback of partial outputs while the run goes on: video frames (JPEG, one per final frame
// of each window) drawn on a canvas at the clip's rate, and audio chunks (16-bit PCM) queued
// back to back on the Web Audio clock. A player that runs out of frames or samples waits for
// the next window or chunk, so what plays is always final output.

import { decode } from "./decode";
import type { AudioChunkMeta, VideoFrameMeta } from "./protocol";

/** Interleaved little-endian 16-bit PCM as one Float32Array per channel. */
export function pcmToPlanar(bytes: Uint8Array, channels: number): Float32Array<ArrayBuffer>[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const frames = Math.floor(bytes.byteLength / 2 / Math.max(channels, 1));
  const out = Array.from({ length: channels }, () => new Float32Array(frames));
  for (let i = 0; i < frames; i++) {
    for (let c = 0; c < channels; c++) {
      out[c][i] = view.getInt16((i * channels + c) * 2, true) / 32767;
    }
  }
  return out;
}

/**
 * When a chunk of `duration` seconds starts: right after the previous one, or, if playback
 * ran dry, a little after `now` (so a late chunk does not start in the past).
 */
export function nextStart(queuedUntil: number, now: number, duration: number, lead = 0.05) {
  const start = Math.max(queuedUntil, now + lead);
  return { start, until: start + duration };
}

/** Plays audio chunks as they arrive. */
export class AudioPlayer {
  private ctx: AudioContext | null = null;
  private until = 0;
  /** Seconds of audio queued so far, and chunks. */
  queuedSeconds = 0;
  chunks = 0;

  /** Creates or resumes the context (call from a user gesture, e.g. the Queue button). */
  unlock(): void {
    try {
      this.ctx ??= new AudioContext();
      void this.ctx.resume();
    } catch {
      this.ctx = null;
    }
  }

  /** The job whose chunks are playing. */
  job: string | null = null;

  push(job: string, meta: AudioChunkMeta, pcm: Uint8Array): void {
    if (job !== this.job) {
      // A new job: start its audio afresh.
      this.job = job;
      this.until = 0;
      this.queuedSeconds = 0;
      this.chunks = 0;
    }
    this.unlock();
    const ctx = this.ctx;
    if (!ctx) return;
    const planar = pcmToPlanar(pcm, meta.channels);
    const frames = planar[0]?.length ?? 0;
    if (frames === 0) return;
    const buf = ctx.createBuffer(meta.channels, frames, meta.sample_rate);
    planar.forEach((ch, i) => buf.copyToChannel(ch, i));
    const src = ctx.createBufferSource();
    src.buffer = buf;
    src.connect(ctx.destination);
    const { start, until } = nextStart(this.until, ctx.currentTime, buf.duration);
    src.start(start);
    this.until = until;
    this.queuedSeconds += buf.duration;
    this.chunks++;
  }
}

interface Frame {
  pts: number;
  bmp: ImageBitmap;
}

/** Plays video frames as they arrive, at their presentation times. */
export class VideoPlayer {
  canvas: HTMLCanvasElement | null = null;
  private frames: Frame[] = [];
  private clock: { wall: number; pts: number } | null = null;
  private raf = 0;
  /** Frames drawn so far, and frames received. */
  played = 0;
  received = 0;
  onChange: () => void = () => {};

  /** The job whose frames are playing. */
  job: string | null = null;

  async push(job: string, meta: VideoFrameMeta, jpeg: Uint8Array, mime: string): Promise<void> {
    if (job !== this.job) {
      // A new job: drop what is left of the last one's frames.
      for (const f of this.frames) f.bmp.close();
      this.frames = [];
      this.clock = null;
      this.played = 0;
      this.received = 0;
      this.job = job;
    }
    const bmp = await decode(jpeg, mime);
    this.received++;
    // Frames arrive in order within a window and windows in order; keep them sorted anyway.
    this.frames.push({ pts: meta.pts, bmp });
    this.frames.sort((a, b) => a.pts - b.pts);
    if (!this.raf) this.raf = requestAnimationFrame(this.tick);
  }

  private tick = (now: number) => {
    this.raf = 0;
    const next = this.frames[0];
    if (!next || !this.canvas) return;
    // Start (or restart after running dry) the clock at the next frame.
    this.clock ??= { wall: now, pts: next.pts };
    const due = this.clock.wall + (next.pts - this.clock.pts) * 1000;
    if (now >= due) {
      this.frames.shift();
      if (this.canvas.width !== next.bmp.width) this.canvas.width = next.bmp.width;
      if (this.canvas.height !== next.bmp.height) this.canvas.height = next.bmp.height;
      this.canvas.getContext("2d")?.drawImage(next.bmp, 0, 0);
      next.bmp.close();
      this.played++;
      this.onChange();
      // Out of frames: the next one to arrive restarts the clock.
      if (this.frames.length === 0) this.clock = null;
    }
    if (this.frames.length) this.raf = requestAnimationFrame(this.tick);
  };
}
