//! The control plane: the execution plan of a job, fitted to a device-memory budget.
//!
//! For each node the plan fixes its mode, its chunks (tiles, windows, steps) and the shapes it
//! sees, groups nodes into *units* that run as one (a node alone, or a pipeline region), orders
//! the units into *waves* that run at once, and forecasts the device memory held while each
//! wave runs; admission ([`admit`]) compares the forecast with the budget. Planning is pure: a
//! function of the validated workflow, the shapes nodes infer, and the options.
//!
//! # Units
//! - **Whole**: a node that runs on whole values (atomic, or iterative: a sampler's steps).
//! - **Chunked**: a node cut into chunks on its own (split, process, merge): tiles of a node
//!   that is not local (a tiled VAE that blends seams), the windows and chunks of a stream.
//! - **Pipeline region**: consecutive *local* image operators (each output pixel depends on a
//!   known neighbourhood of its input: blur, sharpen, scale, invert, Real-ESRGAN), each feeding
//!   only the next. The tile grid is cut over the last stage's output; each piece is walked
//!   back through the stages ([`LocalOp::input_region`](crate::node::chunk::LocalOp)) to the region
//!   of every stage's input it needs, so receptive fields and scale factors compose and the
//!   input is cut once. Every stage stays its own operator with its own chunks (its part of
//!   each piece), so per-node telemetry keeps its meaning.
//!
//! A chunked or pipeline unit over images ends in a merge (the last stage's output assembled
//! whole), or, when its only reader is an output node that takes pieces
//! ([`Node::sink`](crate::node::Node::sink), e.g. `SaveImage` writing PNG rows), in that sink:
//! then the whole output never exists.
//!
//! # The memory model
//! Units run in waves; the units of a wave run at once (independent branches), the waves one
//! after another. While wave `w` runs the device holds:
//! - every value produced in an earlier wave whose last reader is in wave `w` or later
//!   (`live_bytes`), and
//! - each unit's working set: for a whole node, its outputs and workspace (and its weights);
//!   for a chunked node, its output (or its sink's buffers) and, for each chunk in flight
//!   (`workers + prefetch`, cut ahead of the workers), its piece plus the result and workspace
//!   set aside when it was cut, and, if an output node shows it, the results kept until they
//!   are announced; for a pipeline region, its stages' weights, its exit (the merged output,
//!   or the sink's buffers), and per piece in flight the most any one stage holds for it
//!   (input piece, result and workspace: a piece is at one stage at a time, and the memory
//!   set aside when it was cut travels with it to the exit).
//!
//! Setting memory aside when a piece is cut, rather than when a worker happens to pick it up,
//! makes the held memory depend on the plan and not on thread scheduling: the measured peak
//! then tracks the forecast closely, and a piece is never started without its memory.
//!
//! Each unit is first sized as if it ran alone after the units before it (units in order of
//! their depth in the graph): the largest tile (from the configured size down by halves to
//! the smallest) whose forecast, plus the safety margin, fits the limit (the budget minus
//! headroom). Waves are then formed greedily in that order: a unit joins the current wave when
//! it reads nothing the wave produces and the wave's forecast with it still fits; otherwise it
//! starts the next wave. So independent branches run concurrently when their forecasts fit
//! together, and one after another when they do not. The forecast peak is the largest wave's.
//!
//! # Timestamps
//! Records carry a `u64` time. Wave `w` starts at time `T(w)`: chunk (piece, step) `i` of every
//! unit in it travels at `T(w) + i`, its output at `T(w) + count - 1`, and `T(w + 1)` is the
//! latest output time of wave `w`. So along any link times never decrease, and a probe that
//! sees the frontier pass a chunk's time knows that chunk, and every earlier one, is final.
//! Every unit of wave `w + 1` waits (a gate that carries no data) for every unit of wave `w`.

use crate::node::chunk::{ChunkMemory, ChunkRegion, ChunkSpec};
use crate::node::memory::Bytes;
use crate::node::residency::WeightMode;
use crate::node::schema::{ExecMode, MemoryEstimate};
use crate::node::value::ValueInfo;
use crate::node::NodeError;
use serde::Serialize;

/// The smallest tile side the planner cuts: below it, per-record overhead and halos dominate
/// the work, and the chunk count of a large image would explode.
pub const MIN_TILE: usize = 16;

/// Planner settings.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Largest tile side for tileable nodes; `None` runs every node whole.
    pub tile: Option<usize>,
    /// The smallest tile side the planner may go down to (at least [`MIN_TILE`]).
    pub min_tile: usize,
    /// Device memory the run may hold (the budget minus headroom); `None`: no limit known.
    pub limit: Option<Bytes>,
    /// Fraction added to a forecast before it is compared with the limit.
    pub safety_margin: f64,
    /// Worker threads (chunks processed at once).
    pub workers: usize,
    /// Chunks cut ahead of the workers.
    pub prefetch: usize,
    /// Bytes per activation element under the precision policy.
    pub bytes_per_element: u64,
    /// Largest single value (as f32) a run may create; larger ones are refused at plan time
    /// rather than failing an allocation mid-run.
    pub max_value_bytes: u64,
    /// The baseline executor of the KPI harness (`--executor naive`): every node whole (no
    /// tiles, no pipeline regions or sinks, one window per video stream, one chunk per audio
    /// stream), weights resident, one node at a time, whatever the limit; used only for
    /// comparisons and A/B checks.
    pub naive: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            tile: Some(256),
            min_tile: MIN_TILE,
            limit: None,
            safety_margin: 0.0,
            workers: 1,
            prefetch: 1,
            bytes_per_element: 4,
            max_value_bytes: 16 << 30,
            naive: false,
        }
    }
}

impl PlanOptions {
    /// Chunks in flight at once for a node of `chunks` chunks: cut but not yet merged.
    pub fn inflight(&self, chunks: usize) -> usize {
        (self.workers.max(1) + self.prefetch).min(chunks.max(1))
    }

    /// Tile sides to try, largest first: the configured size, halved down to the smallest.
    pub(crate) fn tile_sizes(&self) -> Vec<usize> {
        let Some(top) = self.tile.filter(|_| !self.naive) else {
            return vec![];
        };
        let min = self.min_tile.max(MIN_TILE);
        let mut v = vec![top.max(min)];
        while let Some(&last) = v.last() {
            if last <= min {
                break;
            }
            v.push((last / 2).max(min));
        }
        v
    }

    pub(crate) fn with_margin(&self, b: u64) -> u64 {
        (b as f64 * (1.0 + self.safety_margin.max(0.0))).ceil() as u64
    }
}

/// Where a node's weights live while it runs, and what that costs on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WeightPlan {
    /// `None` for a node without weights.
    pub mode: Option<WeightMode>,
    /// Every weight of the node.
    pub total_bytes: u64,
    /// The largest block streamed at once (streamed mode).
    pub block_bytes: u64,
}

impl WeightPlan {
    pub(crate) fn resident(total: u64) -> WeightPlan {
        WeightPlan {
            mode: (total > 0).then_some(WeightMode::Resident),
            total_bytes: total,
            block_bytes: 0,
        }
    }

    pub(crate) fn streamed(depth: usize, block: u64, total: u64) -> WeightPlan {
        WeightPlan {
            mode: Some(WeightMode::Streamed { depth }),
            total_bytes: total,
            block_bytes: block,
        }
    }

    /// Device bytes of weights while `users` chunks run at once: all of them once when
    /// resident; the block in use and `depth` ahead, per user, when streamed.
    pub fn device_bytes(&self, users: u64) -> u64 {
        match self.mode {
            None => 0,
            Some(WeightMode::Resident) => self.total_bytes,
            Some(WeightMode::Streamed { depth }) => {
                users.max(1) * (depth as u64 + 1) * self.block_bytes
            }
        }
    }
}

/// The memory forecast of one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeForecast {
    /// Values of earlier waves still held while the node's wave runs (its inputs among them).
    pub live_bytes: u64,
    /// The node's own working set (for a stage of a pipeline region, its share of the
    /// region's).
    pub working_bytes: u64,
    /// What the device holds while the node's wave runs: `live_bytes` plus the working sets
    /// of every unit of the wave.
    pub peak_bytes: u64,
    /// Whether the peak plus the safety margin fits the limit.
    pub fits: bool,
}

/// The plan of one node.
#[derive(Clone, Debug, Serialize)]
pub struct NodePlan {
    pub node: String,
    pub class_type: &'static str,
    pub mode: ExecMode,
    /// Tile side of a tiled node.
    pub tile: Option<usize>,
    /// The chunks of a chunked node: for a pipeline stage, its own part of each piece (a
    /// region of its output); for a sink, the pieces it takes. Empty for an atomic node.
    pub chunks: Vec<ChunkSpec>,
    /// For a stage of a pipeline region: per piece, the region of its input the piece carries
    /// when it reaches the stage (for the first stage, what is cut from the whole input).
    pub pieces_in: Vec<ChunkRegion>,
    /// Steps of an iterative node (a sampler), each its own time; 0 for other nodes.
    pub steps: u32,
    /// Shape of the input that is cut into chunks (chunked nodes).
    pub chunked_input: Option<ValueInfo>,
    /// Memory of the largest chunk (chunked nodes).
    pub chunk_memory: Option<ChunkMemory>,
    /// Shapes of the linked inputs, in link order.
    pub inputs: Vec<ValueInfo>,
    /// Shapes of the outputs.
    pub outputs: Vec<ValueInfo>,
    /// The node's own estimate for an atomic run (weights and activations).
    pub memory: MemoryEstimate,
    /// Where the node's weights live while it runs.
    pub weights: WeightPlan,
    /// Chunks cut but not yet finished at once (chunked nodes): workers plus prefetch, or one
    /// when only serial processing fits.
    pub inflight: usize,
    /// What the device holds while the node runs, in the chosen mode.
    pub forecast: NodeForecast,
    /// The forecast had the node run atomic (the naive plan).
    pub atomic_peak_bytes: u64,
    /// The unit the node runs in ([`ExecutionPlan::units`]).
    pub unit: usize,
    /// Time of the node's inputs.
    pub in_time: u64,
    /// Time of the node's outputs.
    pub out_time: u64,
}

impl NodePlan {
    /// Number of units of work: chunks of a chunked node, steps of an iterative one, else 1.
    pub fn chunk_count(&self) -> u32 {
        if self.steps > 0 {
            self.steps
        } else {
            self.chunks.len().max(1) as u32
        }
    }

    /// Bytes an atomic run leases before its kernel runs: outputs and workspace (its weights
    /// are leased where they are put on the device).
    pub fn atomic_working_bytes(&self) -> u64 {
        self.forecast
            .working_bytes
            .saturating_sub(self.weights.device_bytes(1))
    }
}

/// How a unit runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// One node on whole values (atomic or iterative).
    Whole,
    /// One node cut into chunks: split, process, merge (or sink).
    Chunked,
    /// A pipeline region: the input cut once, every piece through every stage, then merged
    /// or sunk.
    Pipeline,
}

/// A unit of execution: one node, or a pipeline region (see the module docs).
#[derive(Clone, Debug, Serialize)]
pub struct UnitPlan {
    pub kind: UnitKind,
    /// The node, or the region's stages in order.
    pub nodes: Vec<usize>,
    /// The output node that takes the last stage's pieces, if any.
    pub sink: Option<usize>,
    /// The node the region reads its input from piece by piece, if any.
    pub source: Option<usize>,
    /// The wave the unit runs in.
    pub wave: usize,
    /// Pieces of a chunked or pipeline unit; steps of an iterative node; else 1.
    pub pieces: u32,
    /// Device memory set aside per piece when it is cut (pipeline regions).
    pub reserve_bytes: u64,
    /// The unit's working set (see the module docs).
    pub working_bytes: u64,
    /// Nodes whose output must be complete before the unit may start: the producers of its
    /// inputs, and the last node of every unit of the previous wave.
    pub after: Vec<usize>,
    pub in_time: u64,
    pub out_time: u64,
}

impl UnitPlan {
    /// The node whose completion ends the unit: its sink, or its last stage.
    pub fn last(&self) -> usize {
        self.sink
            .or_else(|| self.nodes.last().copied())
            .expect("a unit has nodes")
    }

    /// Every node of the unit: its source, its stages, its sink.
    pub fn members(&self) -> impl Iterator<Item = usize> + '_ {
        self.source
            .into_iter()
            .chain(self.nodes.iter().copied())
            .chain(self.sink)
    }
}

/// The plan of a whole job.
#[derive(Clone, Debug, Serialize)]
pub struct ExecutionPlan {
    pub nodes: Vec<NodePlan>,
    /// Units in the order they run; a unit's nodes refer to [`Self::nodes`].
    pub units: Vec<UnitPlan>,
    /// Number of waves.
    pub waves: usize,
    /// The largest wave forecast: the most the device holds at once.
    pub forecast_peak_bytes: u64,
    /// The same for the naive plan that runs every node whole, one after another.
    pub naive_peak_bytes: u64,
    /// The limit the plan was fitted to (budget minus headroom), if any.
    pub limit_bytes: Option<u64>,
    pub safety_margin: f64,
    /// Whether every wave's forecast fits the limit.
    pub fits: bool,
    /// Worker threads the plan was fitted to (chunks processed at once).
    pub workers: usize,
    /// Chunks cut ahead of the workers.
    pub prefetch: usize,
    /// The smallest tile a chunk may be re-run at when memory runs short.
    pub min_tile: usize,
}

impl ExecutionPlan {
    /// Total chunks over all nodes.
    pub fn total_chunks(&self) -> u64 {
        self.nodes.iter().map(|n| n.chunk_count() as u64).sum()
    }

    /// Chunks in flight at once for a node of `chunks` chunks: cut but not yet merged.
    pub fn inflight_chunks(&self, chunks: usize) -> usize {
        (self.workers.max(1) + self.prefetch).min(chunks.max(1))
    }

    /// The node with the largest forecast (the largest working set among equal peaks).
    pub fn peak_node(&self) -> Option<&NodePlan> {
        self.nodes
            .iter()
            .max_by_key(|n| (n.forecast.peak_bytes, n.forecast.working_bytes))
    }

    /// The unit node `ix` runs in.
    pub fn unit_of(&self, ix: usize) -> &UnitPlan {
        &self.units[self.nodes[ix].unit]
    }
}

/// Why planning failed: a node could not infer its output from its inputs.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("node {node} ({class_type}): {error}")]
pub struct PlanError {
    pub node: String,
    pub class_type: String,
    pub error: NodeError,
}
