//! What a finished run reports: its outputs (ComfyUI's UI records), each node's time, its
//! memory, and how promptly pieces were announced; or why it failed.

use crate::node::schema::ExecMode;
use crate::node::NodeError;
use crate::telemetry::timing::TimeSplit;
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeMap;

/// Timing of one node in a finished run.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStats {
    pub node: String,
    pub class_type: String,
    pub mode: ExecMode,
    pub chunks: u32,
    pub wall_ms: f64,
    /// Where the node's time went (summed over workers).
    pub timing: TimeSplit,
}

/// What a successful run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// UI records of output nodes (ComfyUI's `executed` outputs), by node id.
    pub outputs: BTreeMap<String, Json>,
    pub nodes: Vec<NodeStats>,
    pub wall_ms: f64,
    /// The device budget, if known.
    pub budget_bytes: Option<u64>,
    /// The most device memory the run held at once, as the accountant counted it.
    pub tracked_peak_bytes: u64,
    /// Chunks re-run at a smaller tile because memory ran short.
    pub retries: u32,
    /// For every partial output announced (a tile, a window, a chunk): milliseconds from the
    /// moment the frontier could pass it (it and every earlier piece of its node finished) to
    /// the driver announcing it.
    pub announce_delays_ms: Vec<f64>,
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RunError {
    #[error("node {node} ({class_type}) failed: {error}")]
    Node {
        node: String,
        class_type: String,
        error: NodeError,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("dataflow runtime error: {0}")]
    Runtime(String),
}
