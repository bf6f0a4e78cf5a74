// The studio's model of the service: jobs, their nodes and partial outputs, reduced from the
// socket's messages. Pure and synchronous so it is unit-tested without a browser; the view
// renders from it at most once per animation frame (see `Scheduler`), so a burst of partial
// outputs costs one render, and no message is ever skipped by the reducer: final results are
// applied whatever the rate.

import type { Message, Rect } from "./protocol";

/** The lifecycle states NOVA announces, per job and per node. */
export const LIFECYCLE = [
  "planning",
  "indexing",
  "prefetching",
  "warming",
  "running",
  "streaming_partial",
  "finalizing",
  "cached_replay",
] as const;
export type Lifecycle = (typeof LIFECYCLE)[number];

/** Where a node's or a run's time went (`telemetry.node_end`'s `timing`), milliseconds. */
export interface TimeSplit {
  load_ms: number;
  transfer_ms: number;
  compute_ms: number;
  replay_ms: number;
}

/** `telemetry.timing`: the run's split, with start-up and per node. */
export interface RunTiming extends TimeSplit {
  startup_ms: number;
  wall_ms: number;
  nodes: Array<TimeSplit & { node: string; class_type: string; wall_ms: number }>;
}

export type NodeStatus = "pending" | "running" | "done" | "error";
export type JobStatus = "queued" | "running" | "success" | "error" | "interrupted";

export interface NodeState {
  id: string;
  classType?: string;
  status: NodeStatus;
  lifecycle?: Lifecycle;
  /** Chunks or steps done, of how many. */
  progress: { value: number; max: number } | null;
  mode?: string;
  tile?: number | null;
  chunks?: number;
  forecastBytes?: number;
  wallMs?: number;
  /** Every phase the node went through, in order. */
  phases: Lifecycle[];
  timing?: TimeSplit;
  /** The most device memory the run held while the node ran (at its end), or now (while it runs). */
  trackedBytes?: number;
}

export interface TileState {
  node: string;
  sourceNode: string;
  rect: Rect;
  index: number;
  tiles: number;
  width: number;
  height: number;
}

export interface JobState {
  promptId: string;
  status: JobStatus;
  lifecycle?: Lifecycle;
  nodes: Map<string, NodeState>;
  /** The node ComfyUI's `executing` named last. */
  executing: string | null;
  /** Output nodes' UI records (`executed`), by node. */
  outputs: Record<string, unknown>;
  tiles: TileState[];
  videoWindows: number;
  audioChunks: number;
  forecastPeakBytes?: number;
  limitBytes?: number | null;
  budgetBytes?: number | null;
  trackedPeakBytes?: number;
  /** Device memory the run holds now (the last chunk's figure). */
  trackedBytes?: number;
  timing?: RunTiming;
  /** Phases the job went through, in order. */
  phases: Lifecycle[];
  error?: { nodeId: string | null; nodeType: string | null; message: string };
  /** Messages applied to this job (all of them: nothing is dropped here). */
  messages: number;
}

export interface StudioState {
  sid?: string;
  queueRemaining: number;
  jobs: Map<string, JobState>;
  /** Prompt ids, oldest first. */
  order: string[];
  /** Bumped on every change; the view renders when it moved. */
  version: number;
}

export function emptyState(): StudioState {
  return { queueRemaining: 0, jobs: new Map(), order: [], version: 0 };
}

/** The job a message is about, created on first sight. */
function job(state: StudioState, id: string): JobState {
  let j = state.jobs.get(id);
  if (!j) {
    j = {
      promptId: id,
      status: "queued",
      nodes: new Map(),
      executing: null,
      outputs: {},
      tiles: [],
      videoWindows: 0,
      audioChunks: 0,
      messages: 0,
      phases: [],
    };
    state.jobs.set(id, j);
    state.order.push(id);
  }
  return j;
}

function enter(phases: Lifecycle[], s: Lifecycle): void {
  if (phases[phases.length - 1] !== s) phases.push(s);
}

function node(j: JobState, id: string): NodeState {
  let n = j.nodes.get(id);
  if (!n) {
    n = { id, status: "pending", progress: null, phases: [] };
    j.nodes.set(id, n);
  }
  return n;
}

const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
const num = (v: unknown): number | undefined => (typeof v === "number" ? v : undefined);

/** Applies one message. Unknown types are counted and otherwise ignored. */
export function apply(state: StudioState, m: Message): void {
  const d = m.data ?? {};
  state.version++;
  if (m.type === "status") {
    const info = (d.status as { exec_info?: { queue_remaining?: number } } | undefined)?.exec_info;
    state.queueRemaining = info?.queue_remaining ?? state.queueRemaining;
    const sid = str(d.sid);
    if (sid) state.sid = sid;
    return;
  }
  // NOVA's events name their job in `job`; ComfyUI's in `data.prompt_id`.
  const id = str(m.job) ?? str(d.prompt_id);
  if (!id) return;
  const j = job(state, id);
  j.messages++;
  switch (m.type) {
    case "execution_start":
      j.status = "running";
      break;
    case "execution_cached":
      for (const n of (d.nodes as string[] | undefined) ?? []) {
        const s = node(j, n);
        s.status = "done";
        s.lifecycle = "cached_replay";
        enter(s.phases, "cached_replay");
      }
      break;
    case "executing": {
      const n = str(d.node);
      if (n === null) {
        j.executing = null;
        if (j.status === "running" || j.status === "queued") j.status = "success";
      } else {
        j.executing = n;
        const s = node(j, n);
        if (s.status === "pending") s.status = "running";
      }
      break;
    }
    case "progress": {
      const n = str(d.node);
      if (n) node(j, n).progress = { value: num(d.value) ?? 0, max: num(d.max) ?? 0 };
      break;
    }
    case "executed": {
      const n = str(d.node);
      if (n) {
        j.outputs[n] = d.output;
        node(j, n).status = "done";
      }
      break;
    }
    case "execution_success":
      j.status = "success";
      j.lifecycle = undefined;
      break;
    case "execution_error":
      j.status = "error";
      j.error = {
        nodeId: str(d.node_id),
        nodeType: str(d.node_type),
        message: str(d.exception_message) ?? str(d.message) ?? "failed",
      };
      if (j.error.nodeId) node(j, j.error.nodeId).status = "error";
      break;
    case "execution_interrupted":
      j.status = "interrupted";
      break;
    case "lifecycle": {
      const s = str(d.state) as Lifecycle | null;
      if (!s) break;
      j.lifecycle = s;
      enter(j.phases, s);
      const n = str(d.node);
      if (n) {
        const ns = node(j, n);
        ns.lifecycle = s;
        enter(ns.phases, s);
      }
      break;
    }
    case "telemetry.memory_forecast": {
      j.forecastPeakBytes = num(d.forecast_peak_bytes);
      j.limitBytes = (d.limit_bytes as number | null) ?? null;
      j.budgetBytes = (d.budget_bytes as number | null) ?? null;
      for (const f of (d.nodes as Array<Record<string, unknown>> | undefined) ?? []) {
        const n = node(j, String(f.node));
        n.forecastBytes = num(f.forecast_bytes);
        n.mode = str(f.mode) ?? undefined;
        n.tile = (f.tile as number | null) ?? null;
        n.chunks = num(f.chunks);
      }
      break;
    }
    case "telemetry.node_start": {
      const n = node(j, String(d.node));
      n.classType = str(d.class_type) ?? n.classType;
      n.status = "running";
      n.lifecycle = "running";
      enter(n.phases, "running");
      n.chunks = num(d.steps) ?? num(d.chunks) ?? n.chunks;
      break;
    }
    case "telemetry.chunk":
    case "telemetry.step": {
      const n = node(j, String(d.node));
      const done = m.type === "telemetry.step" ? num(d.step) : (n.progress?.value ?? 0) + 1;
      n.progress = { value: done ?? 0, max: num(d.chunks) ?? num(d.steps) ?? 0 };
      const held = num(d.tracked_bytes);
      if (held !== undefined) {
        j.trackedBytes = held;
        n.trackedBytes = Math.max(n.trackedBytes ?? 0, held);
      }
      break;
    }
    case "telemetry.node_end": {
      const n = node(j, String(d.node));
      n.status = "done";
      n.lifecycle = undefined;
      n.wallMs = num(d.wall_ms);
      n.timing = d.timing as TimeSplit | undefined;
      // The job's peak is taken below, as for every event that carries one.
      const peak = num(d.tracked_peak_bytes);
      if (peak !== undefined) n.trackedBytes = peak;
      break;
    }
    case "telemetry.timing":
      j.timing = d as unknown as RunTiming;
      break;
    case "output.partial.image":
      j.tiles.push({
        node: String(d.node),
        sourceNode: String(d.source_node),
        rect: d.tile as Rect,
        index: num(d.tile_index) ?? 0,
        tiles: num(d.tiles) ?? 0,
        width: num(d.width) ?? 0,
        height: num(d.height) ?? 0,
      });
      {
        const n = node(j, String(d.node));
        n.lifecycle = "streaming_partial";
        enter(n.phases, "streaming_partial");
      }
      break;
    case "output.partial.video":
      j.videoWindows++;
      break;
    case "output.partial.audio":
      j.audioChunks++;
      break;
    default:
      break;
  }
  // The end of a job in NOVA's schema (SSE) carries the tracked peak.
  const peak = num(d.tracked_peak_bytes);
  if (peak !== undefined) j.trackedPeakBytes = Math.max(j.trackedPeakBytes ?? 0, peak);
}

/**
 * Coalesces renders: `schedule()` from every message, `render` runs at most once per frame
 * (`requestAnimationFrame` in the browser, injected in tests).
 */
export class Scheduler {
  private pending = false;
  constructor(
    private readonly render: () => void,
    private readonly frame: (cb: () => void) => void,
  ) {}
  schedule(): void {
    if (this.pending) return;
    this.pending = true;
    this.frame(() => {
      this.pending = false;
      this.render();
    });
  }
}
