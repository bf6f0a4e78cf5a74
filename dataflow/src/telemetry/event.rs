//! The event stream of a job: one schema, versioned, for the CLI's `--events` file, the
//! server's WebSocket relay and library users.
//!
//! # Schema (version 1)
//!
//! Every event is a JSON object
//! `{"v": 1, "seq": N, "job": "<id>", "t_ms": <ms since the job began>, "type": "...", "data": {...}}`
//! with `seq` increasing by one per event. Types and their `data`:
//!
//! | type | data | when |
//! |---|---|---|
//! | `lifecycle` | `state`: `planning`, `running`, `streaming_partial`, `finalizing` | the job enters that state |
//! | `lifecycle` | `state`: `indexing`, `prefetching`, `warming`, `running`, `cached_replay`; `node` | a node entered that phase: opening and indexing a weights file, reading its tensors, moving them to the device, computing, replaying a window from the temporal cache |
//! | `telemetry.memory_forecast` | `profile` (when known), `budget_bytes`, `limit_bytes` (budget minus headroom), `forecast_peak_bytes`, `naive_peak_bytes` (every node whole), `fits`, `nodes`: `[{node, mode, tile, chunks, forecast_bytes}]` | the plan is fixed, before any node runs |
//! | `telemetry.retry` | `node`, `chunk`, `tile_from`, `tile_to`, `reason` | a chunk ran short of memory and is re-run as smaller tiles |
//! | `telemetry.residency_delta` | `asset`, `from`, `to` (`UNLOADED`, `CPU_MMAP`, `CPU_HOT`, `GPU_FULL`, `GPU_PARTIAL`), `bytes_on_device`, `reason` | a model asset changed state |
//! | `telemetry.node_start` | `node`, `class_type`, `mode`, `chunks`, and `steps` for an iterative node | the frontier of every input of the node passed the time of its input: the node may run |
//! | `telemetry.chunk` | `node`, `chunk`, `chunks`, `rect` (tiles), `progress` `{value, max}` over all chunks of the job, `tracked_bytes` (held now) | the frontier after the node's kernel passed the chunk's timestamp |
//! | `telemetry.step` | `node`, `step` (1-based), `steps`, `progress` `{value, max}` over all units of the job | an iterative node (a sampler): the frontier after it passed the step's time |
//! | `output.preview` | `node` (the iterative node), `step`, `steps`, `method` (`taesd` or `latent2rgb`), `width`, `height` | right after that step's `telemetry.step`, when the node made a preview |
//! | `telemetry.node_end` | `node`, `class_type`, `wall_ms`, `chunks`, `timing` `{load_ms, transfer_ms, compute_ms, replay_ms}`, `tracked_peak_bytes` (the most the run held from the node's start to its end, as the driver saw them) | the frontier of the node's output passed its output time |
//! | `output.partial.image` | `node` (the output node), `source_node`, `tile` `{x,y,w,h}`, `tile_index`, `tiles`, `width`, `height` | a tile of an image that an output node consumes is final |
//! | `output.partial.video` | `node` (the output node), `window`, `windows`, `frame_start`, `frame_count` (output frames that are now final, the window's overlap with the next one excluded), `pts_start`, `pts_end` (seconds), `width`, `height`, `fps`, `windows_decoded` (windows of the source cut so far), `cached` (replayed from the temporal cache) | a window of a video that an output node consumes is final; the frames travel with the event to library and server consumers |
//! | `output.partial.audio` | `node`, `chunk`, `chunks`, `sample_start`, `sample_count`, `sample_rate`, `channels`, `chunks_decoded` | a chunk of audio that an output node consumes is final; its PCM travels with the event |
//! | `executed` | `node`, `output` (ComfyUI's UI record, e.g. `{"images": [...]}`) | an output node finished |
//! | `telemetry.timing` | `startup_ms` (the job's start to the dataflow's first step: parsing, validation, planning, building), `wall_ms`, `load_ms`, `transfer_ms`, `compute_ms`, `replay_ms` (sums over nodes), `nodes`: `[{node, class_type, wall_ms, load_ms, transfer_ms, compute_ms, replay_ms}]` | once, right before the final event of a run that started |
//! | `execution_success` | `wall_ms`, `budget_bytes`, `tracked_peak_bytes` | the job finished; always the last event |
//! | `execution_error` | `node_id`, `node_type`, `message`, and once it ran `budget_bytes`, `tracked_peak_bytes` | the job failed; always the last event |
//! | `execution_interrupted` | `node_id` (if known), `budget_bytes`, `tracked_peak_bytes` | the job was interrupted; always the last event |
//!
//! `budget_bytes` is `null` when the device memory could not be read (the job was admitted
//! without a limit); `tracked_peak_bytes` is the most device memory the accountant counted
//! the job holding at once. `profile` in the forecast is filled in by the caller that chose it.
//! Time splits are summed over worker threads (see [`crate::telemetry::timing`]); a node's phases come
//! after its `node_start` and before its `node_end`.
//!
//! Invariant: every event except `lifecycle: planning`, the forecast and the final one is
//! derived by the driver from probes on the dataflow's frontiers and from what operators
//! recorded (retries, residency changes) — operators never call back to report.
//! Hence for every node: `node_start` < its `chunk` (or `step`) events < `node_end`, a tile's
//! `output.partial.image` follows the `chunk` event that made it final, and a step's
//! `output.preview` follows its `step` event.

use crate::control::plan::ExecutionPlan;
use crate::node::chunk::Rect;
use crate::node::schema::ExecMode;
use crate::node::value::Value;
use crate::telemetry::timing::TimeSplit;
use serde::Serialize;
use serde_json::Value as Json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Version of the event schema described in the module docs.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// States a job passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Planning,
    Indexing,
    Prefetching,
    Warming,
    Running,
    StreamingPartial,
    Finalizing,
    CachedReplay,
}

/// Overall progress of a job in chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub value: u64,
    pub max: u64,
}

/// Memory figures of a finished job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryUse {
    pub budget_bytes: Option<u64>,
    pub tracked_peak_bytes: u64,
}

/// One node of a memory forecast.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeForecastEvent {
    pub node: String,
    pub mode: ExecMode,
    pub tile: Option<usize>,
    pub chunks: u32,
    pub forecast_bytes: u64,
}

/// The `telemetry.memory_forecast` payload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryForecast {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub budget_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub forecast_peak_bytes: u64,
    pub naive_peak_bytes: u64,
    pub fits: bool,
    pub nodes: Vec<NodeForecastEvent>,
}

impl MemoryForecast {
    /// The forecast of a plan.
    pub fn of(plan: &ExecutionPlan, budget_bytes: Option<u64>) -> MemoryForecast {
        MemoryForecast {
            profile: None,
            budget_bytes,
            limit_bytes: plan.limit_bytes,
            forecast_peak_bytes: plan.forecast_peak_bytes,
            naive_peak_bytes: plan.naive_peak_bytes,
            fits: plan.fits,
            nodes: plan
                .nodes
                .iter()
                .map(|n| NodeForecastEvent {
                    node: n.node.clone(),
                    mode: n.mode,
                    tile: n.tile,
                    chunks: n.chunk_count(),
                    forecast_bytes: n.forecast.peak_bytes,
                })
                .collect(),
        }
    }
}

/// One node of a run's time split.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeTimingEvent {
    pub node: String,
    pub class_type: String,
    pub wall_ms: f64,
    #[serde(flatten)]
    pub split: TimeSplit,
}

/// The `telemetry.timing` payload: where a run's time went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunTiming {
    /// From the job's start to the dataflow's first step.
    pub startup_ms: f64,
    pub wall_ms: f64,
    /// Sums over the nodes.
    #[serde(flatten)]
    pub total: TimeSplit,
    pub nodes: Vec<NodeTimingEvent>,
}

/// The payload of an event; see the module docs for the schema.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", content = "data")]
pub enum EventKind {
    #[serde(rename = "lifecycle")]
    Lifecycle {
        state: Lifecycle,
        /// The node that entered the phase; absent for the job's own states.
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    #[serde(rename = "telemetry.memory_forecast")]
    MemoryForecast(MemoryForecast),
    /// A model asset changed state (loaded, streamed, released, evicted).
    #[serde(rename = "telemetry.residency_delta")]
    ResidencyDelta(crate::node::residency::ResidencyDelta),
    #[serde(rename = "telemetry.retry")]
    Retry {
        node: String,
        chunk: u32,
        tile_from: usize,
        tile_to: usize,
        reason: String,
    },
    #[serde(rename = "telemetry.node_start")]
    NodeStart {
        node: String,
        class_type: String,
        mode: ExecMode,
        chunks: u32,
        /// Steps of an iterative node (then `chunks` counts them); absent otherwise.
        #[serde(skip_serializing_if = "Option::is_none")]
        steps: Option<u32>,
    },
    #[serde(rename = "telemetry.chunk")]
    Chunk {
        node: String,
        chunk: u32,
        chunks: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        rect: Option<Rect>,
        progress: Progress,
        /// Device memory the run holds now, as its accountant counts it.
        tracked_bytes: u64,
    },
    #[serde(rename = "telemetry.step")]
    Step {
        node: String,
        step: u32,
        steps: u32,
        progress: Progress,
    },
    #[serde(rename = "output.preview")]
    Preview {
        node: String,
        step: u32,
        steps: u32,
        method: String,
        width: usize,
        height: usize,
    },
    #[serde(rename = "telemetry.node_end")]
    NodeEnd {
        node: String,
        class_type: String,
        wall_ms: f64,
        chunks: u32,
        timing: TimeSplit,
        /// The most device memory the run held while the node ran.
        tracked_peak_bytes: u64,
    },
    #[serde(rename = "telemetry.timing")]
    Timing(RunTiming),
    #[serde(rename = "output.partial.image")]
    PartialImage {
        node: String,
        source_node: String,
        tile: Rect,
        tile_index: u32,
        tiles: u32,
        width: usize,
        height: usize,
    },
    #[serde(rename = "output.partial.video")]
    PartialVideo {
        node: String,
        window: u32,
        windows: u32,
        frame_start: u64,
        frame_count: u64,
        pts_start: f64,
        pts_end: f64,
        width: usize,
        height: usize,
        fps: f64,
        windows_decoded: u32,
        cached: bool,
    },
    #[serde(rename = "output.partial.audio")]
    PartialAudio {
        node: String,
        chunk: u32,
        chunks: u32,
        sample_start: u64,
        sample_count: u64,
        sample_rate: u32,
        channels: u16,
        chunks_decoded: u32,
    },
    #[serde(rename = "executed")]
    Executed { node: String, output: Json },
    #[serde(rename = "execution_success")]
    Success {
        wall_ms: f64,
        #[serde(flatten)]
        memory: MemoryUse,
    },
    #[serde(rename = "execution_error")]
    Error {
        node_id: Option<String>,
        node_type: Option<String>,
        message: String,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        memory: Option<MemoryUse>,
    },
    #[serde(rename = "execution_interrupted")]
    Interrupted {
        node_id: Option<String>,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        memory: Option<MemoryUse>,
    },
}

/// One event of a job.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub v: u32,
    pub seq: u64,
    pub job: String,
    pub t_ms: f64,
    #[serde(flatten)]
    pub kind: EventKind,
    /// The pixels of a partial output (`output.partial.image`) or a preview
    /// (`output.preview`), for consumers that show them; not part of the JSON schema.
    #[serde(skip)]
    pub attachment: Option<Value>,
}

impl Event {
    /// The event as one JSON line.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"v\":{EVENT_SCHEMA_VERSION},\"type\":\"encoding_error\",\"data\":\"{e}\"}}")
        })
    }

    /// The event's type name as it appears in JSON.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            EventKind::Lifecycle { .. } => "lifecycle",
            EventKind::MemoryForecast(_) => "telemetry.memory_forecast",
            EventKind::Retry { .. } => "telemetry.retry",
            EventKind::ResidencyDelta(_) => "telemetry.residency_delta",
            EventKind::NodeStart { .. } => "telemetry.node_start",
            EventKind::Chunk { .. } => "telemetry.chunk",
            EventKind::Step { .. } => "telemetry.step",
            EventKind::Preview { .. } => "output.preview",
            EventKind::NodeEnd { .. } => "telemetry.node_end",
            EventKind::Timing(_) => "telemetry.timing",
            EventKind::PartialImage { .. } => "output.partial.image",
            EventKind::PartialVideo { .. } => "output.partial.video",
            EventKind::PartialAudio { .. } => "output.partial.audio",
            EventKind::Executed { .. } => "executed",
            EventKind::Success { .. } => "execution_success",
            EventKind::Error { .. } => "execution_error",
            EventKind::Interrupted { .. } => "execution_interrupted",
        }
    }
}

/// Where events go. Must not block for long: the engine's driver calls it.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Stamps events with sequence number, job id and time, and hands them to a sink.
pub struct Emitter {
    sink: EventSink,
    job: String,
    start: Instant,
    seq: AtomicU64,
}

impl Emitter {
    /// An emitter for one job.
    pub fn new(job: impl Into<String>, sink: EventSink) -> Emitter {
        Emitter {
            sink,
            job: job.into(),
            start: Instant::now(),
            seq: AtomicU64::new(0),
        }
    }

    /// Milliseconds since the job began.
    pub fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// Emits an event.
    pub fn emit(&self, kind: EventKind) {
        self.emit_with(kind, None)
    }

    /// Emits an event with an attachment.
    pub fn emit_with(&self, kind: EventKind, attachment: Option<Value>) {
        let ev = Event {
            v: EVENT_SCHEMA_VERSION,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            job: self.job.clone(),
            t_ms: self.elapsed_ms(),
            kind,
            attachment,
        };
        (self.sink)(ev)
    }
}
