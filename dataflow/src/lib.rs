//! `nova-dataflow`: NOVA's engine core.
//!
//! A workflow in ComfyUI's API format (or built in Rust with a [`Pipeline`]) is parsed and
//! validated, planned against a device-memory budget into units and waves, and run as a timely
//! dataflow on the process's long-lived runtime, in which image tiles, video windows and audio
//! chunks flow as timestamped records through pipeline regions; events are derived from probes
//! on the dataflow's frontiers and the notes operators send. [`Job`] ties it together.
//!
//! The crate is split by concern, each folder importing only those above it here:
//! - [`node`]: the node interface (the `Node` trait and registry, schemas, values, chunks,
//!   sources and sinks, streams, errors; and what nodes use: the memory accountant, the
//!   residency registry of model weights, model folders, output files). Imports nothing else
//!   in the crate.
//! - [`control`]: workflows (parsing, validation, per-frame lifting, the Rust builder), the
//!   planner (units, regions, waves, the memory forecast), admission, hardware profiles.
//! - [`compute`]: the long-lived runtime, building a job's dataflow, its operators.
//! - [`telemetry`]: the event schema, the time split, the driver that turns probes and notes
//!   into events, the run's report.
//! - [`exec`] and [`job`]: running a planned job (compute and telemetry together), and a job
//!   from workflow to result.
//!
//! Node types live in `nova-operators`.
//!
//! Dependencies: `timely` (the dataflow runtime), `candle-core` (tensors), `serde`/`serde_json`
//! (the workflow format and records), `thiserror` (typed errors), `libloading` (NVML, when
//! present), `yaml-rust2` (ComfyUI's `extra_model_paths.yaml`, see [`model_paths`]), `libc` (the
//! host allocator's mmap threshold, see [`memory::return_large_blocks_to_the_system`]).
//!
//! ```
//! use nova_dataflow::{workflow, JobEnv, NodeRegistry};
//! // An empty registry knows no node types, so validation names the unknown one.
//! let env = JobEnv::new("input", "output", "temp");
//! let err = workflow::load(r#"{"1": {"class_type": "Nope", "inputs": {}}}"#,
//!                          &NodeRegistry::new(), &env).unwrap_err();
//! assert_eq!(err.errors()[0].node(), Some("1"));
//! ```

pub mod compute;
pub mod control;
pub mod exec;
pub mod job;
pub mod node;
pub mod telemetry;

// The modules other crates name by path, where they were before the crate was split by
// concern.
pub use control::{lift, pipeline, plan, profile, workflow};
pub use node::{chunk, error, memory, model_paths, output, residency, schema, stream, value};
pub use telemetry::{event, timing};

pub use chunk::{
    ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec, ChunkedOp, LocalOp, Merger, Rect, RegionReader,
    SinkOp, SourceOp,
};
pub use compute::{Runtime, RuntimeGone};
pub use control::admission::{admit, Refusal};
pub use control::planner::plan;
pub use error::{ValidationErrors, WorkflowError};
pub use event::{
    Emitter, Event, EventKind, EventSink, Lifecycle, NodeTimingEvent, RunTiming,
    EVENT_SCHEMA_VERSION,
};
pub use exec::{run, CancelToken, RunError, RunOptions, RunReport};
pub use job::{Job, JobSpec, PrepareError};
pub use memory::{Accountant, Bytes, Lease, OutOfMemory};
pub use model_paths::{ModelPaths, ModelPathsError};
pub use node::{
    Args, Chunking, ExecContext, Inputs, JobEnv, Node, NodeError, NodeId, NodeOutput, NodeRegistry,
    PreviewMethod, Sinking, StepPreview, Stepper,
};
pub use pipeline::{Handle, Literal, NodeBuilder, Output, Pipeline};
pub use plan::{
    ExecutionPlan, NodePlan, PlanError, PlanOptions, UnitKind, UnitPlan, WeightPlan, MIN_TILE,
};
pub use profile::{
    Admission, Detection, MemoryConfig, MemoryOverrides, Precision, Profile, ProfileId,
};
pub use residency::{
    Asset, AssetState, DeviceWeights, Phase, Registry, RegistryLimits, ResidencyDelta,
    WeightContext, WeightMode, WeightSource, WorkNotes,
};
pub use schema::{
    ExecMode, FileFolder, InputKind, InputSpec, MemoryEstimate, MemoryQuery, NodeMeta, NodeSchema,
    OutputSpec,
};
pub use stream::{
    AudioGraph, AudioMeta, AudioPull, AudioStream, Frame, FrameCursor, FrameOp, FrameSource,
    MemoryFrames, Planar, Temporal, VideoMeta, VideoShape, VideoStream,
};
pub use timing::TimeSplit;
pub use value::{DataType, ImageInfo, ModelInfo, ModelRef, TensorBox, Value, ValueInfo};
pub use workflow::{ValidatedWorkflow, WorkflowNode};
