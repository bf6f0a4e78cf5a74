//! Shared pieces of NOVA's benchmarks.
//!
//! [`overhead`] sets up the engine-overhead comparison: the same pipeline region (a generated
//! image, blurred and inverted tile by tile) run through the timely dataflow
//! ([`overhead::Setup::run_dataflow`]) and as a plain loop over the same pieces calling the
//! same kernels ([`overhead::Setup::run_plain_loop`]); and the job start-up comparison, the
//! same job on the process's long-lived runtime against a runtime started for it alone.
//!
//! Dependencies beyond the workspace's engine crates: `nova-server` (the KPI runner starts
//! the real service in a child process to time start-up), `image` and `hound` (reading the
//! outputs back for the quality deltas), `plotters` with only its SVG backend (the report's
//! plots; no font or bitmap libraries), and `libc` (`getrusage`: CPU time and page faults next
//! to wall time, [`usage`]).

pub mod overhead;

/// CPU time and page faults of measured work.
pub mod usage;

/// The memory-planner benchmark's suite and runners (`benches/memory_plan.rs`).
pub mod memory;

/// The models benchmark's pieces (`benches/models.rs`).
pub mod models;

/// The media benchmark's workloads and peers (`benches/media.rs`).
pub mod media;

/// The two executors the KPI harness compares (`--executor nova|naive`).
pub mod executor;

/// The KPI runner (`cargo run -p nova-benches --release -- kpi`).
pub mod kpi;
