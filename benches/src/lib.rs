//! Shared pieces of NOVA's benchmarks.
//!
//! [`overhead`] sets up the engine-overhead comparison: the same tiled blur run through the
//! timely dataflow ([`overhead::Setup::run_dataflow`]) and as a plain loop over the same tiles
//! calling the same split/process/merge ([`overhead::Setup::run_plain_loop`]).

pub mod overhead;

/// The memory-planner benchmark's suite and runners (`benches/memory_plan.rs`).
pub mod memory;

/// The models benchmark's pieces (`benches/models.rs`).
pub mod models;

/// The media benchmark's workloads and peers (`benches/media.rs`).
pub mod media;
