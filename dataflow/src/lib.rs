//! `nova-dataflow`: NOVA's engine core.
//!
//! A workflow in ComfyUI's API format is parsed and validated ([`workflow`]), planned
//! ([`plan`]), and compiled into a timely dataflow ([`exec`]) in which chunks of work — image
//! tiles now; video windows and audio chunks through the same [`ChunkedOp`] interface — flow
//! as timestamped records. Events ([`event`]) are derived from probes on the dataflow's
//! frontiers. Node types implement [`Node`] ([`node`], [`schema`]) and live in
//! `nova-operators`.
//!
//! Dependencies: `timely` (the dataflow runtime), `candle-core` (tensors), `serde`/`serde_json`
//! (the workflow format and records), `thiserror` (typed errors), `libloading` (NVML, when
//! present), `yaml-rust2` (ComfyUI's `extra_model_paths.yaml`, see [`model_paths`]), `libc` (the host
//! allocator's mmap threshold, see [`memory::return_large_blocks_to_the_system`]).
//!
//! ```
//! use nova_dataflow::{workflow, JobEnv, NodeRegistry};
//! // An empty registry knows no node types, so validation names the unknown one.
//! let env = JobEnv::new("input", "output", "temp");
//! let err = workflow::load(r#"{"1": {"class_type": "Nope", "inputs": {}}}"#,
//!                          &NodeRegistry::new(), &env).unwrap_err();
//! assert_eq!(err.errors()[0].node(), Some("1"));
//! ```

pub mod chunk;
pub mod compute;
mod driver;
pub mod error;
pub mod event;
pub mod exec;
pub mod job;
pub mod lift;
pub mod memory;
pub mod model_paths;
pub mod node;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod profile;
pub mod residency;
pub mod schema;
pub mod stream;
pub mod timing;
pub mod value;
pub mod workflow;

pub use chunk::{
    ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec, ChunkedOp, LocalOp, Merger, Rect, RegionReader,
    SinkOp, SourceOp,
};
pub use compute::{Runtime, RuntimeGone};
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
    plan, ExecutionPlan, NodePlan, PlanError, PlanOptions, UnitKind, UnitPlan, WeightPlan, MIN_TILE,
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
