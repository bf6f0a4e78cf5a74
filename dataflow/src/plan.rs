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
//!   back through the stages ([`LocalOp::input_region`](crate::chunk::LocalOp)) to the region
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

use crate::chunk::{ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec, SourceOp};
use crate::memory::Bytes;
use crate::node::{guarded, Chunking, Inputs, JobEnv, NodeError, Sinking};
use crate::residency::WeightMode;
use crate::schema::{ExecMode, MemoryEstimate, MemoryQuery};
use crate::value::ValueInfo;
use crate::workflow::ValidatedWorkflow;
use serde::Serialize;
use std::sync::Arc;

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
    fn tile_sizes(&self) -> Vec<usize> {
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

    fn with_margin(&self, b: u64) -> u64 {
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
    fn resident(total: u64) -> WeightPlan {
        WeightPlan {
            mode: (total > 0).then_some(WeightMode::Resident),
            total_bytes: total,
            block_bytes: 0,
        }
    }

    fn streamed(depth: usize, block: u64, total: u64) -> WeightPlan {
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

/// What the first pass learns of a node.
struct Shaped {
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
    memory: MemoryEstimate,
    named: Inputs<ValueInfo>,
    /// Activations of an atomic run: outputs and workspace (inputs are held anyway).
    activations: u64,
}

/// How a node may be cut.
enum Cut {
    /// It runs whole.
    None,
    /// Windows or chunks of a stream (its chunked input's shape).
    Stream(Chunking, ValueInfo),
    /// Tiles of an image or latent; `local` when its pieces compose ([`crate::chunk::LocalOp`]).
    Tiles {
        chunking: Chunking,
        input: ValueInfo,
        local: bool,
    },
}

/// A unit being formed.
struct Draft {
    kind: UnitKind,
    nodes: Vec<usize>,
    sink: Option<(usize, Sinking)>,
    source: Option<(usize, Arc<dyn SourceOp>)>,
}

impl Draft {
    fn new(kind: UnitKind, ix: usize) -> Draft {
        Draft {
            kind,
            nodes: vec![ix],
            sink: None,
            source: None,
        }
    }

    /// The source, the stages, the sink.
    fn members(&self) -> impl Iterator<Item = usize> + '_ {
        self.source
            .as_ref()
            .map(|s| s.0)
            .into_iter()
            .chain(self.nodes.iter().copied())
            .chain(self.sink.as_ref().map(|s| s.0))
    }
}

/// What the planner chose for one node.
#[derive(Clone)]
struct NodeChoice {
    mode: ExecMode,
    tile: Option<usize>,
    chunks: Vec<ChunkSpec>,
    pieces_in: Vec<ChunkRegion>,
    chunked_input: Option<ValueInfo>,
    chunk_memory: Option<ChunkMemory>,
    weights: WeightPlan,
    inflight: usize,
    /// The node's own working set (its share, in a region).
    working: u64,
    steps: u32,
}

impl NodeChoice {
    fn whole(weights: WeightPlan, working: u64) -> NodeChoice {
        NodeChoice {
            mode: ExecMode::Atomic,
            tile: None,
            chunks: Vec::new(),
            pieces_in: Vec::new(),
            chunked_input: None,
            chunk_memory: None,
            weights,
            inflight: 1,
            working,
            steps: 0,
        }
    }
}

/// What the planner chose for one unit.
struct Sized {
    nodes: Vec<(usize, NodeChoice)>,
    pieces: u32,
    reserve: u64,
    working: u64,
}

/// Plans a validated workflow. See the module docs.
pub fn plan(
    wf: &ValidatedWorkflow,
    env: &JobEnv,
    opts: &PlanOptions,
) -> Result<ExecutionPlan, PlanError> {
    let count = wf.nodes.len();
    let fail_at = |ix: usize| {
        let n = &wf.nodes[ix];
        move |error: NodeError| PlanError {
            node: n.id.0.clone(),
            class_type: n.class_type.to_string(),
            error,
        }
    };
    // Pass 1: shapes, each node's own estimate, and how it may be cut.
    let mut shaped: Vec<Shaped> = Vec::with_capacity(count);
    let mut cuts: Vec<Cut> = Vec::with_capacity(count);
    for (ix, n) in wf.nodes.iter().enumerate() {
        let fail = fail_at(ix);
        let mut named = Inputs::new();
        let mut inputs = Vec::new();
        for l in &n.links {
            let info = shaped[l.from]
                .outputs
                .get(l.output)
                .copied()
                .unwrap_or(ValueInfo::Unknown);
            named.insert(l.input, info);
            inputs.push(info);
        }
        // Every call into node code is guarded: a node bug fails the plan, not the process.
        let outputs = if n.streamed_batch {
            guarded(|| n.node.infer_streamed(&n.args, &named, env)).map_err(&fail)?
        } else if n.lifted.is_empty() {
            guarded(|| n.node.infer(&n.args, &named, env)).map_err(&fail)?
        } else {
            guarded(|| crate::lift::infer(n, &named, env)).map_err(&fail)?
        };
        for (i, o) in outputs.iter().enumerate() {
            if let Some(b) = o.bytes().filter(|b| *b > opts.max_value_bytes) {
                return Err(fail(NodeError::Other(format!(
                    "output {i} would take {}, over the {} limit of one value",
                    Bytes(b),
                    Bytes(opts.max_value_bytes)
                ))));
            }
        }
        // A lifted node only extends a stream; its kernel's memory is part of the windows of
        // the node that consumes the video.
        let memory = if !n.lifted.is_empty() {
            MemoryEstimate::default()
        } else {
            guarded(|| {
                Ok(n.node.memory(
                    &n.args,
                    &MemoryQuery {
                        inputs: &inputs,
                        outputs: &outputs,
                        bytes_per_element: opts.bytes_per_element,
                    },
                ))
            })
            .map_err(&fail)?
        };
        let mut linked: Vec<(usize, usize)> = n.links.iter().map(|l| (l.from, l.output)).collect();
        linked.sort_unstable();
        linked.dedup();
        let input_bytes: u64 = linked
            .iter()
            .map(|&(f, o)| {
                shaped[f]
                    .outputs
                    .get(o)
                    .and_then(|i| i.bytes())
                    .unwrap_or(0)
            })
            .sum();
        let activations = memory
            .total()
            .saturating_sub(memory.weights)
            .saturating_sub(input_bytes);
        let meta = n.node.meta();
        let chunking = if n.lifted.is_empty()
            && (meta.supports(ExecMode::Tiled) || meta.supports(ExecMode::Streamed))
        {
            guarded(|| Ok(n.node.chunked(&n.args, &named, env))).map_err(&fail)?
        } else {
            None
        };
        let cut = match chunking {
            None => Cut::None,
            Some(c) => {
                let input = n
                    .links
                    .iter()
                    .position(|l| l.input == c.input)
                    .map(|i| inputs[i]);
                match input {
                    Some(i @ (ValueInfo::Video(_) | ValueInfo::Audio(_)))
                        if meta.supports(ExecMode::Streamed) =>
                    {
                        Cut::Stream(c, i)
                    }
                    Some(i) if i.image().is_some() || matches!(i, ValueInfo::Latent { .. }) => {
                        let local = i.image().is_some()
                            && guarded(|| Ok(c.op.local().is_some())).unwrap_or(false);
                        Cut::Tiles {
                            chunking: c,
                            input: i,
                            local,
                        }
                    }
                    _ => Cut::None,
                }
            }
        };
        shaped.push(Shaped {
            inputs,
            outputs,
            memory,
            named,
            activations,
        });
        cuts.push(cut);
    }

    // The naive forecast: every node whole, one after another in the workflow's order; a
    // value is held from its node to its last reader.
    let mut last_use: Vec<Vec<usize>> = (0..count)
        .map(|ix| vec![ix; shaped[ix].outputs.len()])
        .collect();
    for (ix, n) in wf.nodes.iter().enumerate() {
        for l in &n.links {
            if let Some(u) = last_use[l.from].get_mut(l.output) {
                *u = (*u).max(ix);
            }
        }
    }
    let atomic_live = held_before(
        count,
        (0..count).flat_map(|p| {
            let shaped = &shaped;
            shaped[p]
                .outputs
                .iter()
                .zip(&last_use[p])
                .map(move |(o, &u)| (p, u, o.bytes().unwrap_or(0)))
        }),
    );
    let atomic_peak: Vec<u64> = (0..count)
        .map(|ix| atomic_live[ix] + shaped[ix].memory.weights + shaped[ix].activations)
        .collect();
    let limit = opts.limit.map(|b| b.0);
    let fits = |peak: u64| limit.is_none_or(|l| opts.with_margin(peak) <= l);

    // Pass 2: units.
    let drafts = form_units(wf, &shaped, &cuts, &atomic_peak, &fits, env, opts)
        .map_err(|(ix, e)| fail_at(ix)(e))?;
    let mut unit_of = vec![0usize; count];
    for (u, d) in drafts.iter().enumerate() {
        for m in d.members() {
            unit_of[m] = u;
        }
    }
    // Order: by depth in the graph of units, then by the workflow's order. Deps point to
    // units whose nodes all come earlier in the workflow, so ordering by the last node first
    // lets depths be computed in one pass.
    let deps: Vec<Vec<usize>> = drafts
        .iter()
        .enumerate()
        .map(|(u, d)| {
            let mut v: Vec<usize> = d
                .members()
                .flat_map(|m| wf.nodes[m].links.iter().map(|l| unit_of[l.from]))
                .filter(|&p| p != u)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        })
        .collect();
    let last_node = |d: &Draft| d.members().max().unwrap_or(0);
    let mut by_last: Vec<usize> = (0..drafts.len()).collect();
    by_last.sort_by_key(|&u| last_node(&drafts[u]));
    let mut depth = vec![0usize; drafts.len()];
    for &u in &by_last {
        depth[u] = deps[u].iter().map(|&p| depth[p] + 1).max().unwrap_or(0);
    }
    let mut order = by_last;
    if opts.naive {
        // One node after another, as the naive executor runs them.
    } else {
        order.sort_by_key(|&u| (depth[u], last_node(&drafts[u])));
    }
    let mut pos = vec![0usize; drafts.len()];
    for (p, &u) in order.iter().enumerate() {
        pos[u] = p;
    }

    // Pass 3: liveness by unit position. A node's outputs exist whole unless it feeds the
    // next stage of its region or a sink.
    let internal = |ix: usize| {
        let d = &drafts[unit_of[ix]];
        d.sink.as_ref().is_some_and(|(s, _)| *s == ix)
            || d.source.as_ref().is_some_and(|(s, _)| *s == ix)
            || (d.nodes.contains(&ix) && (d.nodes.last() != Some(&ix) || d.sink.is_some()))
    };
    let mut values: Vec<(usize, usize, u64)> = Vec::new();
    for ix in 0..count {
        if internal(ix) && !matches!(drafts[unit_of[ix]].kind, UnitKind::Whole) {
            continue;
        }
        for (port, o) in shaped[ix].outputs.iter().enumerate() {
            let readers = wf
                .consumers(ix)
                .iter()
                .filter(|&&c| {
                    unit_of[c] != unit_of[ix]
                        && wf.nodes[c]
                            .links
                            .iter()
                            .any(|l| l.from == ix && l.output == port)
                })
                .map(|&c| pos[unit_of[c]]);
            let p = pos[unit_of[ix]];
            values.push((p, readers.max().unwrap_or(p), o.bytes().unwrap_or(0)));
        }
    }
    let live_at = held_before(drafts.len(), values.iter().copied());

    // Pass 4: each unit sized as if it ran alone at its position.
    let mut sized: Vec<Option<Sized>> = (0..drafts.len()).map(|_| None).collect();
    for &u in &order {
        let live = live_at[pos[u]];
        let fits_here = |working: u64| fits(live + working);
        let s = size_unit(wf, &drafts[u], &shaped, &cuts, &fits_here, opts)
            .map_err(|(ix, e)| fail_at(ix)(e))?;
        sized[u] = Some(s);
    }
    let sized: Vec<Sized> = sized
        .into_iter()
        .map(|s| s.expect("every unit was sized"))
        .collect();

    // Pass 5: waves, in order; a unit joins the current wave when it reads nothing the wave
    // produces and the wave still fits with it.
    let mut wave_of = vec![0usize; drafts.len()];
    let mut waves: Vec<Vec<usize>> = Vec::new();
    let mut wave_live: Vec<u64> = Vec::new();
    let mut wave_working: Vec<u64> = Vec::new();
    for &u in &order {
        let join = !opts.naive
            && waves.last().is_some_and(|w| {
                let wi = waves.len() - 1;
                !deps[u].iter().any(|d| w.contains(d))
                    && fits(wave_live[wi] + wave_working[wi] + sized[u].working)
            });
        if join {
            let wi = waves.len() - 1;
            waves[wi].push(u);
            wave_working[wi] += sized[u].working;
        } else {
            waves.push(vec![u]);
            wave_live.push(live_at[pos[u]]);
            wave_working.push(sized[u].working);
        }
        wave_of[u] = waves.len() - 1;
    }

    // Times and forecasts.
    let mut units: Vec<UnitPlan> = Vec::with_capacity(drafts.len());
    let mut new_index = vec![0usize; drafts.len()];
    let mut node_plans: Vec<Option<NodePlan>> = (0..count).map(|_| None).collect();
    let mut time = 0u64;
    let mut previous_wave_lasts: Vec<usize> = Vec::new();
    for (wi, wave) in waves.iter().enumerate() {
        let peak = wave_live[wi] + wave_working[wi];
        let mut next_time = time;
        let mut lasts = Vec::new();
        for &u in wave {
            let d = &drafts[u];
            let s = &sized[u];
            let in_time = time;
            let out_time = in_time + s.pieces.max(1) as u64 - 1;
            next_time = next_time.max(out_time);
            let mut after: Vec<usize> = d
                .members()
                .flat_map(|m| wf.nodes[m].links.iter().map(|l| l.from))
                .filter(|&p| unit_of[p] != u)
                .chain(previous_wave_lasts.iter().copied())
                .collect();
            after.sort_unstable();
            after.dedup();
            new_index[u] = units.len();
            for (ix, c) in &s.nodes {
                let sh = &shaped[*ix];
                node_plans[*ix] = Some(NodePlan {
                    node: wf.nodes[*ix].id.0.clone(),
                    class_type: wf.nodes[*ix].class_type,
                    mode: c.mode,
                    tile: c.tile,
                    chunks: c.chunks.clone(),
                    pieces_in: c.pieces_in.clone(),
                    steps: c.steps,
                    chunked_input: c.chunked_input,
                    chunk_memory: c.chunk_memory,
                    inputs: sh.inputs.clone(),
                    outputs: sh.outputs.clone(),
                    memory: sh.memory,
                    weights: c.weights,
                    inflight: c.inflight,
                    forecast: NodeForecast {
                        live_bytes: wave_live[wi],
                        working_bytes: c.working,
                        peak_bytes: peak,
                        fits: fits(peak),
                    },
                    atomic_peak_bytes: atomic_peak[*ix],
                    unit: units.len(),
                    in_time,
                    out_time,
                });
            }
            let plan = UnitPlan {
                kind: d.kind,
                nodes: d.nodes.clone(),
                sink: d.sink.as_ref().map(|s| s.0),
                source: d.source.as_ref().map(|s| s.0),
                wave: wi,
                pieces: s.pieces.max(1),
                reserve_bytes: s.reserve,
                working_bytes: s.working,
                after,
                in_time,
                out_time,
            };
            lasts.push(plan.last());
            units.push(plan);
        }
        previous_wave_lasts = lasts;
        time = next_time;
    }
    let nodes: Vec<NodePlan> = node_plans
        .into_iter()
        .map(|n| n.expect("every node is in a unit"))
        .collect();
    let forecast_peak_bytes = (0..waves.len())
        .map(|w| wave_live[w] + wave_working[w])
        .max()
        .unwrap_or(0);
    let naive_peak_bytes = atomic_peak.iter().copied().max().unwrap_or(0);
    Ok(ExecutionPlan {
        fits: nodes.iter().all(|p| p.forecast.fits),
        nodes,
        units,
        waves: waves.len(),
        forecast_peak_bytes,
        naive_peak_bytes,
        limit_bytes: limit,
        safety_margin: opts.safety_margin,
        workers: opts.workers.max(1),
        prefetch: opts.prefetch,
        min_tile: opts.min_tile.max(MIN_TILE),
    })
}

/// For `n` positions and values `(produced at, last read at, bytes)`, the bytes held before
/// each position runs: every value produced earlier and read there or later. Linear: prefix
/// sums of what was produced and what was released, not a scan of earlier values per position.
fn held_before(n: usize, values: impl Iterator<Item = (usize, usize, u64)>) -> Vec<u64> {
    let mut produced = vec![0u64; n + 1];
    let mut released = vec![0u64; n + 1];
    for (p, u, b) in values {
        produced[p + 1] += b;
        released[u.max(p) + 1] += b;
    }
    for i in 0..n {
        produced[i + 1] += produced[i];
        released[i + 1] += released[i];
    }
    (0..n).map(|i| produced[i] - released[i]).collect()
}

/// Groups nodes into units: a node alone, or consecutive local image operators (each read
/// only by the next) as one pipeline region, with an output node that takes the last stage's
/// pieces as its sink. A tiled unit whose tile grid is a single tile at the largest size, or
/// that prefers running whole and fits whole, runs whole instead.
fn form_units(
    wf: &ValidatedWorkflow,
    shaped: &[Shaped],
    cuts: &[Cut],
    atomic_peak: &[u64],
    fits: &dyn Fn(u64) -> bool,
    env: &JobEnv,
    opts: &PlanOptions,
) -> Result<Vec<Draft>, (usize, NodeError)> {
    let count = wf.nodes.len();
    // Links out of each node, over all its ports.
    let mut out_links = vec![0usize; count];
    for n in &wf.nodes {
        for l in &n.links {
            out_links[l.from] += 1;
        }
    }
    let top = opts.tile_sizes().first().copied();
    let smallest = opts.tile_sizes().last().copied();
    let pieces_at = |ix: usize, size: usize| -> usize {
        match &cuts[ix] {
            Cut::Tiles {
                chunking, input, ..
            } => {
                let size = chunking
                    .max_tile
                    .map_or(size, |m| size.min(m.max(opts.min_tile)));
                guarded(|| {
                    chunking.op.plan(
                        input,
                        ChunkSize::Tile {
                            width: size,
                            height: size,
                        },
                    )
                })
                .map_or(0, |c| c.len())
            }
            _ => 0,
        }
    };
    let mut drafts: Vec<Option<Draft>> = Vec::new();
    let mut unit_of: Vec<Option<usize>> = vec![None; count];
    for (ix, n) in wf.nodes.iter().enumerate() {
        // The sole reader of a tiled region's last stage, taking its pieces.
        let sinking = (!opts.naive && n.node.schema().output_node && n.lifted.is_empty())
            .then(|| guarded(|| Ok(n.node.sink(&n.args, &shaped[ix].named, env))).ok())
            .flatten()
            .flatten();
        if let Some(s) = sinking {
            let feeds = n.links.iter().find(|l| l.input == s.input);
            let only_link = n.links.len() == 1;
            if let (Some(l), true) = (feeds, only_link) {
                if let Some(u) = unit_of[l.from] {
                    let open = drafts[u].as_ref().is_some_and(|d| {
                        d.kind != UnitKind::Whole
                            && d.sink.is_none()
                            && d.nodes.last() == Some(&l.from)
                            && out_links[l.from] == 1
                            && l.output == 0
                            && matches!(cuts[l.from], Cut::Tiles { local: true, .. })
                    });
                    if open {
                        if let Some(d) = drafts[u].as_mut() {
                            d.sink = Some((ix, s));
                        }
                        unit_of[ix] = Some(u);
                        continue;
                    }
                }
            }
        }
        match &cuts[ix] {
            Cut::Tiles {
                chunking,
                local: true,
                ..
            } if !opts.naive => {
                // Extend the region its tiled input comes from, when that input's node feeds
                // nothing else.
                let from = n.links.iter().find(|l| l.input == chunking.input);
                let extend = from.and_then(|l| {
                    let u = unit_of[l.from]?;
                    let d = drafts[u].as_ref()?;
                    (d.kind != UnitKind::Whole
                        && d.sink.is_none()
                        && d.nodes.last() == Some(&l.from)
                        && out_links[l.from] == 1
                        && l.output == 0
                        && matches!(cuts[l.from], Cut::Tiles { local: true, .. }))
                    .then_some(u)
                });
                if let Some(u) = extend {
                    if let Some(d) = drafts[u].as_mut() {
                        d.nodes.push(ix);
                        d.kind = UnitKind::Pipeline;
                    }
                    unit_of[ix] = Some(u);
                    continue;
                }
                let mut d = Draft::new(UnitKind::Chunked, ix);
                // A producer that runs whole, feeds only this node, and can be read piece by
                // piece becomes the region's source: its output never exists whole.
                if let Some(l) = from.filter(|l| l.output == 0 && out_links[l.from] == 1) {
                    let p = &wf.nodes[l.from];
                    let alone = unit_of[l.from]
                        .and_then(|u| drafts[u].as_ref())
                        .is_some_and(|pd| {
                            pd.kind == UnitKind::Whole
                                && pd.nodes == [l.from]
                                && matches!(cuts[l.from], Cut::None)
                        });
                    let source = (alone && p.lifted.is_empty())
                        .then(|| guarded(|| Ok(p.node.source(&p.args, env))).ok())
                        .flatten()
                        .flatten();
                    if let Some(op) = source {
                        if let Some(u) = unit_of[l.from] {
                            drafts[u] = None;
                        }
                        d.source = Some((l.from, op));
                        d.kind = UnitKind::Pipeline;
                        unit_of[l.from] = Some(drafts.len());
                    }
                }
                unit_of[ix] = Some(drafts.len());
                drafts.push(Some(d));
            }
            Cut::None => {
                unit_of[ix] = Some(drafts.len());
                drafts.push(Some(Draft::new(UnitKind::Whole, ix)));
            }
            _ => {
                unit_of[ix] = Some(drafts.len());
                drafts.push(Some(Draft::new(UnitKind::Chunked, ix)));
            }
        }
    }
    let drafts: Vec<Draft> = drafts.into_iter().flatten().collect();
    // Units that gain nothing from tiles run whole: no tile size at all, a single tile at the
    // largest size when that fits, or a node that prefers running whole and fits whole.
    let mut out: Vec<Draft> = Vec::with_capacity(drafts.len());
    for d in drafts {
        let tiled = d.kind != UnitKind::Whole
            && d.nodes
                .iter()
                .all(|&ix| matches!(cuts[ix], Cut::Tiles { .. }));
        let dissolve = tiled && {
            let all_fit = d.members().all(|m| fits(atomic_peak[m]));
            let last = *d.nodes.last().expect("a unit has nodes");
            let single = top.is_none_or(|t| pieces_at(last, t) <= 1);
            // Not even the smallest tile cuts it in two: tiles cannot help.
            let uncuttable = smallest.is_none_or(|t| pieces_at(last, t) <= 1);
            let whole_first = d.nodes.len() == 1
                && wf.nodes[last].node.meta().modes.first() == Some(&ExecMode::Atomic);
            uncuttable || (single && all_fit) || (whole_first && all_fit)
        };
        if dissolve {
            for m in d.members() {
                out.push(Draft::new(UnitKind::Whole, m));
            }
        } else {
            out.push(d);
        }
    }
    Ok(out)
}

/// Sizes one unit for the memory its position leaves (`fits` says whether a working set fits
/// with what is held there).
fn size_unit(
    wf: &ValidatedWorkflow,
    d: &Draft,
    shaped: &[Shaped],
    cuts: &[Cut],
    fits: &dyn Fn(u64) -> bool,
    opts: &PlanOptions,
) -> Result<Sized, (usize, NodeError)> {
    let first = d.nodes[0];
    let at = |e: NodeError| (first, e);
    match (d.kind, &cuts[first]) {
        (UnitKind::Whole, _) | (_, Cut::None) => {
            let c = size_whole(wf, first, &shaped[first], fits, opts).map_err(at)?;
            let working = c.working;
            let pieces = c.steps.max(1);
            Ok(Sized {
                nodes: vec![(first, c)],
                pieces,
                reserve: 0,
                working,
            })
        }
        (UnitKind::Chunked, Cut::Stream(chunking, input)) => {
            let sh = &shaped[first];
            let announced = wf.nodes[first].node.schema().output_node
                || wf
                    .consumers(first)
                    .iter()
                    .any(|&c| wf.nodes[c].node.schema().output_node);
            let live_fits = |w: u64| fits(w);
            let choice = streamed(
                chunking,
                input,
                WeightPlan::resident(sh.memory.weights),
                0,
                opts,
                &live_fits,
                announced,
            )
            .map_err(at)?;
            let c = NodeChoice {
                mode: choice.mode,
                tile: choice.tile,
                pieces_in: Vec::new(),
                chunked_input: choice.chunked_input,
                chunk_memory: choice.chunk_memory,
                weights: choice.weights,
                inflight: choice.inflight,
                working: choice.working,
                steps: 0,
                chunks: choice.chunks,
            };
            Ok(Sized {
                pieces: c.chunks.len().max(1) as u32,
                reserve: 0,
                working: c.working,
                nodes: vec![(first, c)],
            })
        }
        (
            UnitKind::Chunked,
            Cut::Tiles {
                chunking, input, ..
            },
        ) => size_chunked(wf, d, first, chunking, *input, shaped, fits, opts).map_err(at),
        (UnitKind::Pipeline, _) => size_pipeline(wf, d, shaped, cuts, fits, opts),
    }
}

/// A node run whole: its weights resident, or streamed block by block when that fits better.
fn size_whole(
    wf: &ValidatedWorkflow,
    ix: usize,
    sh: &Shaped,
    fits: &dyn Fn(u64) -> bool,
    opts: &PlanOptions,
) -> Result<NodeChoice, NodeError> {
    let memory = sh.memory;
    let mut options = vec![WeightPlan::resident(memory.weights)];
    if !opts.naive
        && memory.weights > 0
        && memory.weight_block > 0
        && memory.weight_block < memory.weights
    {
        options.push(WeightPlan::streamed(
            opts.prefetch,
            memory.weight_block,
            memory.weights,
        ));
    }
    let mut chosen: Option<NodeChoice> = None;
    for weights in options {
        let c = NodeChoice::whole(weights, weights.device_bytes(1) + sh.activations);
        let ok = fits(c.working);
        if ok || chosen.as_ref().is_none_or(|b| c.working < b.working) {
            chosen = Some(c);
        }
        if ok {
            break;
        }
    }
    let mut c = chosen.expect("the resident option was tried");
    let n = &wf.nodes[ix];
    c.steps = guarded(|| Ok(n.node.steps(&n.args)))?;
    Ok(c)
}

/// Whether node `ix`'s first output is shown by an output node (its chunks are then
/// announced as partial outputs, and kept until they are).
fn shown(wf: &ValidatedWorkflow, ix: usize) -> bool {
    wf.consumers(ix)
        .iter()
        .any(|&c| wf.nodes[c].node.schema().output_node)
}

/// Candidates of a tiled unit, judged alike: the largest tile at full concurrency when it
/// fits (the configured preference); else the fitting one with the least estimated work per
/// worker (halos make small tiles costly); else the most frugal.
struct Candidates<T> {
    first: bool,
    fitting: Vec<(f64, T)>,
    frugal: Option<(u64, T)>,
    done: bool,
}

impl<T> Candidates<T> {
    fn new() -> Self {
        Candidates {
            first: true,
            fitting: Vec::new(),
            frugal: None,
            done: false,
        }
    }

    fn offer(&mut self, fits: bool, work: f64, working: u64, c: T) {
        if fits {
            if self.first {
                self.fitting = vec![(0.0, c)];
                self.done = true;
                return;
            }
            self.fitting.push((work, c));
        } else if self.frugal.as_ref().is_none_or(|(w, _)| working < *w) {
            self.frugal = Some((working, c));
        }
        self.first = false;
    }

    fn best(self) -> Option<T> {
        self.fitting
            .into_iter()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| c)
            .or(self.frugal.map(|(_, c)| c))
    }
}

/// Tile sides for a chunking, largest first, capped by the node's own request.
fn sizes_for(chunking: &Chunking, opts: &PlanOptions) -> Vec<usize> {
    opts.tile_sizes()
        .into_iter()
        .map(|t| chunking.max_tile.map_or(t, |m| t.min(m.max(opts.min_tile))))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// One node cut into tiles on its own: split, process, then merge (or its sink).
#[allow(clippy::too_many_arguments)]
fn size_chunked(
    wf: &ValidatedWorkflow,
    d: &Draft,
    ix: usize,
    chunking: &Chunking,
    input: ValueInfo,
    shaped: &[Shaped],
    fits: &dyn Fn(u64) -> bool,
    opts: &PlanOptions,
) -> Result<Sized, NodeError> {
    let sh = &shaped[ix];
    let memory = sh.memory;
    let output = sh.outputs.first().copied().unwrap_or(ValueInfo::Unknown);
    let output_bytes = output.bytes().unwrap_or(0);
    let merger_bytes = guarded(|| Ok(chunking.op.merger_memory(&input)))?;
    let announced = shown(wf, ix) || d.sink.is_some();
    let mut weight_options = vec![WeightPlan::resident(memory.weights)];
    if !opts.naive
        && memory.weights > 0
        && memory.weight_block > 0
        && memory.weight_block < memory.weights
    {
        weight_options.push(WeightPlan::streamed(
            opts.prefetch,
            memory.weight_block,
            memory.weights,
        ));
    }
    let serial_too = opts.inflight(usize::MAX) > 1;
    let sizes = sizes_for(chunking, opts);
    let mut chosen: Option<(NodeChoice, u64, u64)> = None;
    for weights in weight_options {
        let mut cands: Candidates<(NodeChoice, u64, u64)> = Candidates::new();
        'search: for serial in [false, true] {
            if serial && !serial_too {
                break;
            }
            for &side in &sizes {
                let size = ChunkSize::Tile {
                    width: side,
                    height: side,
                };
                let chunks = guarded(|| chunking.op.plan(&input, size))?;
                if chunks.len() <= 1 {
                    continue;
                }
                let (mem, pieces) = guarded(|| {
                    Ok(chunks
                        .iter()
                        .fold((ChunkMemory::default(), 0u64), |(m, t), c| {
                            let x = chunking.op.chunk_memory(&input, c);
                            (
                                ChunkMemory {
                                    piece: m.piece.max(x.piece),
                                    result: m.result.max(x.result),
                                    workspace: m.workspace.max(x.workspace),
                                },
                                t + x.piece,
                            )
                        }))
                })?;
                let inflight = if serial {
                    1
                } else {
                    opts.inflight(chunks.len())
                };
                let parallel = inflight.min(opts.workers.max(1)).min(chunks.len()) as f64;
                let users = (opts.workers.max(1) as u64).min(inflight as u64);
                let k = inflight as u64;
                let captured = if announced { k * mem.result } else { 0 };
                let sink_bytes = match &d.sink {
                    Some((_, s)) => guarded(|| Ok(s.op.memory(&output, &chunks, inflight)))?,
                    None => 0,
                };
                let exit = if d.sink.is_some() {
                    sink_bytes
                } else {
                    output_bytes + merger_bytes
                };
                let working = weights.device_bytes(users)
                    + exit
                    + k * (mem.piece + mem.result + mem.workspace)
                    + captured;
                let c = NodeChoice {
                    mode: ExecMode::Tiled,
                    tile: Some(side),
                    chunks,
                    pieces_in: Vec::new(),
                    chunked_input: Some(input),
                    chunk_memory: Some(mem),
                    weights,
                    inflight,
                    working: working - sink_bytes,
                    steps: 0,
                };
                cands.offer(
                    fits(working),
                    pieces as f64 / parallel,
                    working,
                    (c, working, sink_bytes),
                );
                if cands.done {
                    break 'search;
                }
            }
        }
        if let Some(best) = cands.best() {
            let ok = fits(best.1);
            let better = chosen.as_ref().is_none_or(|c| best.1 < c.1);
            if ok || better {
                chosen = Some(best);
            }
            if ok {
                break;
            }
        }
    }
    let (c, working, sink_bytes) = chosen.ok_or_else(|| {
        NodeError::Other(format!("{input:?} cannot be cut into more than one tile"))
    })?;
    let mut nodes = vec![(ix, c.clone())];
    if let Some((s, _)) = &d.sink {
        nodes.push((
            *s,
            NodeChoice {
                mode: ExecMode::Tiled,
                tile: c.tile,
                chunks: c.chunks.clone(),
                pieces_in: Vec::new(),
                chunked_input: Some(output),
                chunk_memory: None,
                weights: WeightPlan::default(),
                inflight: c.inflight,
                working: sink_bytes,
                steps: 0,
            },
        ));
    }
    Ok(Sized {
        pieces: c.chunks.len().max(1) as u32,
        reserve: 0,
        working,
        nodes,
    })
}

/// A pipeline region: the tile grid over the last stage's output, each piece walked back
/// through the stages; per piece in flight the most any stage holds for it.
///
/// Candidates are judged from a pass that keeps only sums and maxima (a large image at a small
/// tile has millions of pieces); the pieces of the chosen one are then walked again and kept.
fn size_pipeline(
    wf: &ValidatedWorkflow,
    d: &Draft,
    shaped: &[Shaped],
    cuts: &[Cut],
    fits: &dyn Fn(u64) -> bool,
    opts: &PlanOptions,
) -> Result<Sized, (usize, NodeError)> {
    let mut stages = Vec::with_capacity(d.nodes.len());
    for &ix in &d.nodes {
        let Cut::Tiles {
            chunking,
            input,
            local: true,
        } = &cuts[ix]
        else {
            return Err((ix, NodeError::Other("not a local operator".into())));
        };
        stages.push(Stage {
            ix,
            op: chunking,
            input: *input,
        });
    }
    let last = stages.last().expect("a region has stages");
    let output = shaped[last.ix]
        .outputs
        .first()
        .copied()
        .unwrap_or(ValueInfo::Unknown);
    let output_bytes = output.bytes().unwrap_or(0);
    let merger_bytes =
        guarded(|| Ok(last.op.op.merger_memory(&last.input))).map_err(|e| (last.ix, e))?;
    let announced = d.sink.is_some() || shown(wf, last.ix);
    let weights: Vec<WeightPlan> = stages
        .iter()
        .map(|s| WeightPlan::resident(shaped[s.ix].memory.weights))
        .collect();
    let weight_bytes: u64 = weights.iter().map(|w| w.device_bytes(1)).sum();
    let serial_too = opts.inflight(usize::MAX) > 1;
    let sizes = sizes_for(last.op, opts);
    let source = d.source.as_ref();
    let mut stats: std::collections::HashMap<usize, Option<RegionStats>> = Default::default();
    // (side, inflight, working, sink bytes)
    let mut cands: Candidates<(usize, usize, u64, u64)> = Candidates::new();
    'search: for serial in [false, true] {
        if serial && !serial_too {
            break;
        }
        for &side in &sizes {
            let st = match stats.get(&side) {
                Some(st) => st.clone(),
                None => {
                    let mut firsts = Vec::new();
                    let st = walk(&stages, side, None, source.map(|_| &mut firsts))?;
                    // What the source holds to be read in this order.
                    let st = match (st, source) {
                        (Some(mut st), Some((src, op))) => {
                            let out = shaped[*src]
                                .outputs
                                .first()
                                .copied()
                                .unwrap_or(ValueInfo::Unknown);
                            st.source =
                                guarded(|| Ok(op.memory(&out, &firsts))).map_err(|e| (*src, e))?;
                            Some(st)
                        }
                        (st, _) => st,
                    };
                    stats.insert(side, st.clone());
                    st
                }
            };
            let Some(st) = st else {
                continue;
            };
            let inflight = if serial { 1 } else { opts.inflight(st.pieces) };
            let parallel = inflight.min(opts.workers.max(1)).min(st.pieces) as f64;
            let k = inflight as u64;
            let captured = if announced { k * st.last_result } else { 0 };
            let sink_bytes = match &d.sink {
                Some((_, s)) => {
                    let outs = guarded(|| {
                        last.op.op.plan(
                            &last.input,
                            ChunkSize::Tile {
                                width: side,
                                height: side,
                            },
                        )
                    })
                    .map_err(|e| (last.ix, e))?;
                    guarded(|| Ok(s.op.memory(&output, &outs, inflight)))
                        .map_err(|e| (last.ix, e))?
                }
                None => 0,
            };
            let exit = if d.sink.is_some() {
                sink_bytes
            } else {
                output_bytes + merger_bytes
            };
            let working = weight_bytes + k * st.reserve + exit + captured + st.source;
            cands.offer(
                fits(working),
                st.work as f64 / parallel,
                working,
                (side, inflight, working, sink_bytes),
            );
            if cands.done {
                break 'search;
            }
        }
    }
    let (side, inflight, working, sink_bytes) = cands.best().ok_or_else(|| {
        (
            last.ix,
            NodeError::Other(format!("{output:?} cannot be cut into more than one tile")),
        )
    })?;
    let mut per: Vec<StageLayout> = stages.iter().map(|_| StageLayout::default()).collect();
    let st = walk(&stages, side, Some(&mut per), None)?.expect("the chosen size cuts pieces");
    let source_bytes = stats.get(&side).cloned().flatten().map_or(0, |s| s.source);
    let k = inflight as u64;
    let count = stages.len();
    let mut nodes = Vec::with_capacity(count + 2);
    if let Some((src, _)) = source {
        // The source's chunks: the parts of its output the first stage's pieces read.
        let first = per.first().expect("a region has stages");
        let chunks: Vec<ChunkSpec> = first
            .chunks
            .iter()
            .zip(&first.pieces_in)
            .map(|(c, have)| ChunkSpec {
                region: *have,
                ..*c
            })
            .collect();
        nodes.push((
            *src,
            NodeChoice {
                mode: ExecMode::Tiled,
                tile: Some(side),
                chunks,
                pieces_in: Vec::new(),
                chunked_input: None,
                chunk_memory: None,
                weights: WeightPlan::default(),
                inflight,
                working: source_bytes,
                steps: 0,
            },
        ));
    }
    for (j, (s, layout)) in stages.iter().zip(per).enumerate() {
        let mem = layout.most;
        let share = weights[j].device_bytes(1)
            + k * (mem.piece + mem.result + mem.workspace)
            + if j + 1 == count && d.sink.is_none() {
                output_bytes + merger_bytes
            } else {
                0
            };
        nodes.push((
            s.ix,
            NodeChoice {
                mode: ExecMode::Tiled,
                tile: Some(side),
                chunks: layout.chunks,
                pieces_in: layout.pieces_in,
                chunked_input: Some(s.input),
                chunk_memory: Some(mem),
                weights: weights[j],
                inflight,
                working: share,
                steps: 0,
            },
        ));
    }
    if let Some((sink, _)) = &d.sink {
        let chunks = nodes.last().expect("stages").1.chunks.clone();
        nodes.push((
            *sink,
            NodeChoice {
                mode: ExecMode::Tiled,
                tile: Some(side),
                chunks,
                pieces_in: Vec::new(),
                chunked_input: Some(output),
                chunk_memory: None,
                weights: WeightPlan::default(),
                inflight,
                working: sink_bytes,
                steps: 0,
            },
        ));
    }
    Ok(Sized {
        nodes,
        pieces: st.pieces as u32,
        reserve: st.reserve,
        working,
    })
}

/// A stage of a region being planned.
struct Stage<'a> {
    ix: usize,
    op: &'a Chunking,
    input: ValueInfo,
}

/// What one tile size gives a region, in sums and maxima.
#[derive(Clone)]
struct RegionStats {
    pieces: usize,
    /// The most any stage holds for one piece (its input piece, result and workspace).
    reserve: u64,
    /// The largest result of the last stage (what an output node is shown).
    last_result: u64,
    /// Input bytes over every stage and piece: the work, halos included.
    work: u64,
    /// What the region's source holds while it is read (0 without one).
    source: u64,
}

/// One stage's part of every piece, kept for the chosen tile size.
#[derive(Default)]
struct StageLayout {
    chunks: Vec<ChunkSpec>,
    pieces_in: Vec<ChunkRegion>,
    most: ChunkMemory,
}

/// Cuts the last stage's output at `side` and walks every piece back through the stages;
/// `None` when the grid is a single tile. With `keep`, every stage's part of every piece is
/// kept there.
fn walk(
    stages: &[Stage<'_>],
    side: usize,
    mut keep: Option<&mut Vec<StageLayout>>,
    mut firsts: Option<&mut Vec<ChunkRegion>>,
) -> Result<Option<RegionStats>, (usize, NodeError)> {
    let last = stages.last().expect("a region has stages");
    let size = ChunkSize::Tile {
        width: side,
        height: side,
    };
    let outs = guarded(|| last.op.op.plan(&last.input, size)).map_err(|e| (last.ix, e))?;
    if outs.len() <= 1 {
        return Ok(None);
    }
    let locals: Vec<&dyn crate::chunk::LocalOp> = stages
        .iter()
        .map(|s| {
            s.op.op
                .local()
                .ok_or((s.ix, NodeError::Other("not a local operator".into())))
        })
        .collect::<Result<_, _>>()?;
    if let Some(k) = keep.as_deref_mut() {
        for l in k.iter_mut() {
            l.chunks.reserve(outs.len());
            l.pieces_in.reserve(outs.len());
        }
    }
    let mut st = RegionStats {
        pieces: outs.len(),
        reserve: 0,
        last_result: 0,
        work: 0,
        source: 0,
    };
    for spec in &outs {
        let mut need = spec.region;
        let mut most = 0u64;
        for (j, s) in stages.iter().enumerate().rev() {
            let local = locals[j];
            let have = guarded(|| local.input_region(&s.input, &need)).map_err(|e| (s.ix, e))?;
            let m = guarded(|| Ok(local.region_memory(&s.input, &need, &have)))
                .map_err(|e| (s.ix, e))?;
            most = most.max(m.piece + m.result + m.workspace);
            st.work += m.piece;
            if j + 1 == stages.len() {
                st.last_result = st.last_result.max(m.result);
            }
            if j == 0 {
                if let Some(f) = firsts.as_deref_mut() {
                    f.push(have);
                }
            }
            if let Some(k) = keep.as_deref_mut() {
                let slot = &mut k[j];
                slot.chunks.push(ChunkSpec {
                    region: need,
                    ..*spec
                });
                slot.pieces_in.push(have);
                slot.most = ChunkMemory {
                    piece: slot.most.piece.max(m.piece),
                    result: slot.most.result.max(m.result),
                    workspace: slot.most.workspace.max(m.workspace),
                };
            }
            need = have;
        }
        st.reserve = st.reserve.max(most);
    }
    Ok(Some(st))
}

/// The naive executor's one window (video) or chunk (audio): the whole stream.
fn whole_stream(input: &ValueInfo) -> Vec<ChunkSize> {
    match input {
        ValueInfo::Video(v) => vec![ChunkSize::Frames {
            window: (v.source_frames as usize).max(1),
            overlap: 0,
        }],
        ValueInfo::Audio(m) => vec![ChunkSize::Samples {
            len: (m.frames as usize).max(1),
        }],
        _ => Vec::new(),
    }
}

/// Window (video) or chunk (audio) sizes a streamed node may be cut at, largest first: the
/// node's own request when it makes one, else a preference halved down to a floor.
fn stream_sizes(input: &ValueInfo, requested: Option<usize>) -> Vec<ChunkSize> {
    match input {
        ValueInfo::Video(_) => {
            let top = requested.unwrap_or(16).max(1);
            let mut sizes = vec![top];
            while *sizes.last().expect("non-empty") > 1 && requested.is_none() {
                let next = sizes.last().expect("non-empty") / 2;
                sizes.push(next.max(1));
            }
            sizes
                .into_iter()
                .map(|window| ChunkSize::Frames { window, overlap: 0 })
                .collect()
        }
        ValueInfo::Audio(m) => {
            // One second by default: previews come often, per-chunk overhead stays small.
            let top = requested.unwrap_or(m.sample_rate.max(1024) as usize);
            let mut sizes = vec![top];
            while *sizes.last().expect("non-empty") > 1024 && requested.is_none() {
                let next = sizes.last().expect("non-empty") / 2;
                sizes.push(next.max(1024));
            }
            sizes
                .into_iter()
                .map(|len| ChunkSize::Samples { len })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The plan of a node that consumes a stream window by window: the largest window that fits
/// with the profile's windows in flight, else one at a time, else the most frugal.
fn streamed(
    chunking: &crate::node::Chunking,
    input: &ValueInfo,
    weights: WeightPlan,
    live: u64,
    opts: &PlanOptions,
    fits: &dyn Fn(u64) -> bool,
    announced: bool,
) -> Result<Choice, NodeError> {
    let mut frugal: Option<Choice> = None;
    for serial in [false, true] {
        let sizes = if opts.naive {
            whole_stream(input)
        } else {
            stream_sizes(input, chunking.max_tile)
        };
        for size in sizes {
            let chunks = guarded(|| chunking.op.plan(input, size))?;
            let mem = chunks.iter().fold(ChunkMemory::default(), |m, c| {
                let x = chunking.op.chunk_memory(input, c);
                ChunkMemory {
                    piece: m.piece.max(x.piece),
                    result: m.result.max(x.result),
                    workspace: m.workspace.max(x.workspace),
                }
            });
            let inflight = if serial {
                1
            } else {
                opts.inflight(chunks.len())
            } as u64;
            // Chunks of (or consumed by) an output node are kept until announced.
            let captured = if announced { inflight * mem.result } else { 0 };
            let working = weights.device_bytes(1)
                + inflight * (mem.piece + mem.result + mem.workspace)
                + captured
                + guarded(|| Ok(chunking.op.merger_memory(input)))?;
            let c = Choice {
                mode: ExecMode::Streamed,
                tile: None,
                chunks,
                chunked_input: Some(*input),
                chunk_memory: Some(mem),
                working,
                weights,
                inflight: inflight as usize,
            };
            if fits(live + working) {
                return Ok(c);
            }
            if frugal.as_ref().is_none_or(|f| working < f.working) {
                frugal = Some(c);
            }
        }
    }
    frugal.ok_or_else(|| NodeError::Other(format!("a stream of {input:?} cannot be cut")))
}

/// A candidate mode for one node.
#[derive(Clone)]
struct Choice {
    weights: WeightPlan,
    /// Chunks in flight at once (tiled).
    inflight: usize,
    mode: ExecMode,
    tile: Option<usize>,
    chunks: Vec<ChunkSpec>,
    chunked_input: Option<ValueInfo>,
    chunk_memory: Option<ChunkMemory>,
    working: u64,
}

/// A job refused by admission control: its most frugal plan does not fit.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The node whose forecast is largest.
    pub node: String,
    pub class_type: String,
    /// Its forecast, safety margin included.
    pub need_bytes: u64,
    pub budget_bytes: u64,
    pub headroom_bytes: u64,
    /// What the plan may fill: the budget minus headroom.
    pub limit_bytes: u64,
    /// The tile side it would need at the smallest (if tiled).
    pub tile: Option<usize>,
    /// A smaller resolution of the workflow's source image that would fit, `(width, height)`.
    pub suggest_resolution: Option<(usize, usize)>,
    /// A profile whose budget would fit.
    pub suggest_profile: Option<String>,
    /// The whole message, for people.
    pub message: String,
}

/// Admission control: accepts a plan whose forecast fits, or says what it would need.
///
/// `budget` and `headroom` are what the limit was derived from; `profiles` lists the profiles
/// to suggest, each with its usable bytes (budget minus headroom), smallest first.
pub fn admit(
    plan: &ExecutionPlan,
    budget: Bytes,
    headroom: Bytes,
    profiles: &[(String, Bytes)],
) -> Result<(), Box<Refusal>> {
    if plan.fits {
        return Ok(());
    }
    let worst = plan
        .nodes
        .iter()
        .filter(|n| !n.forecast.fits)
        .max_by_key(|n| (n.forecast.peak_bytes, n.forecast.working_bytes))
        .or_else(|| plan.peak_node())
        .expect("a plan that does not fit has nodes");
    let limit = budget.saturating_sub(headroom);
    let need = (worst.forecast.peak_bytes as f64 * (1.0 + plan.safety_margin)).ceil() as u64;
    // Memory grows with pixels: scale the node's image sides by sqrt(limit / need).
    // Memory grows with pixels all the way down, so scale the image the workflow starts from
    // (the first node that makes an image from no image, e.g. LoadImage), or else the node's.
    let source = plan
        .nodes
        .iter()
        .find(|n| n.inputs.iter().all(|i| i.image().is_none()))
        .and_then(|n| n.outputs.first())
        .and_then(|o| o.image());
    let suggest_resolution = source
        .or_else(|| worst.outputs.first().and_then(|o| o.image()))
        .or_else(|| worst.inputs.iter().find_map(|i| i.image()))
        .map(|i| {
            let f = (limit.0 as f64 / need.max(1) as f64).sqrt().min(1.0) * 0.95;
            let side = |v: usize| ((v as f64 * f) as usize / 8 * 8).max(8);
            (side(i.width), side(i.height))
        })
        .filter(|(w, h)| *w >= 8 && *h >= 8 && limit.0 > 0);
    let suggest_profile = profiles
        .iter()
        .find(|(_, usable)| usable.0 >= need)
        .map(|(p, _)| p.clone());
    let at = match worst.tile {
        Some(t) => format!("at the smallest tile ({t} px)"),
        None => "running whole (it cannot be tiled)".to_string(),
    };
    let mut message = format!(
        "node {} ({}) needs {} {at}; budget {} after {} headroom",
        worst.node,
        worst.class_type,
        Bytes(need),
        limit,
        headroom
    );
    let mut tips = Vec::new();
    if let Some((w, h)) = suggest_resolution {
        tips.push(format!("lower the resolution to {w}x{h}"));
    }
    if let Some(p) = &suggest_profile {
        tips.push(format!("use the {p} profile on a larger device"));
    }
    if !tips.is_empty() {
        message.push_str("; ");
        message.push_str(&tips.join(" or "));
    }
    Err(Box::new(Refusal {
        node: worst.node.clone(),
        class_type: worst.class_type.to_string(),
        need_bytes: need,
        budget_bytes: budget.0,
        headroom_bytes: headroom.0,
        limit_bytes: limit.0,
        tile: worst.tile,
        suggest_resolution,
        suggest_profile,
        message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Args, ExecContext, Node, NodeOutput, NodeRegistry};
    use crate::schema::{InputKind, InputSpec, NodeSchema, OutputSpec};
    use crate::value::{DataType, Value};
    use crate::workflow;

    /// A node with one optional IMAGE input and one IMAGE output; declares nothing else.
    struct Pass(NodeSchema);

    impl Node for Pass {
        fn schema(&self) -> &NodeSchema {
            &self.0
        }
        fn execute(
            &self,
            _: &Args,
            _: Inputs<Value>,
            _: &ExecContext,
        ) -> Result<NodeOutput, NodeError> {
            Ok(NodeOutput::default())
        }
    }

    fn registry() -> NodeRegistry {
        let mut r = NodeRegistry::new();
        for (name, output_node) in [("Pass", false), ("Out", true)] {
            r.register(Pass(NodeSchema {
                class_type: name,
                display_name: name,
                category: "test",
                description: "",
                inputs: vec![InputSpec {
                    name: "image",
                    kind: InputKind::Link(DataType::Image),
                    required: false,
                    tooltip: "",
                }],
                outputs: vec![OutputSpec {
                    name: "IMAGE",
                    data_type: DataType::Image,
                }],
                output_node,
            }));
        }
        r
    }

    #[test]
    fn undeclared_nodes_plan_atomic_and_times_never_decrease_along_links() {
        let env = JobEnv::new("i", "o", "t");
        let wf = workflow::load(
            r#"{"1": {"class_type": "Pass", "inputs": {}},
                "2": {"class_type": "Pass", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "Pass", "inputs": {}},
                "4": {"class_type": "Out", "inputs": {"image": ["2", 0]}},
                "5": {"class_type": "Out", "inputs": {"image": ["3", 0]}}}"#,
            &registry(),
            &env,
        )
        .unwrap();
        let p = plan(&wf, &env, &PlanOptions::default()).unwrap();
        assert!(p
            .nodes
            .iter()
            .all(|n| n.mode == ExecMode::Atomic && n.chunk_count() == 1));
        for (ix, n) in wf.nodes.iter().enumerate() {
            for l in &n.links {
                assert!(p.nodes[l.from].out_time <= p.nodes[ix].in_time);
            }
            assert_eq!(
                p.nodes[ix].out_time,
                p.nodes[ix].in_time + p.nodes[ix].chunk_count() as u64 - 1
            );
        }
        assert_eq!(p.total_chunks(), 5);
    }

    /// CPU time of this thread: what the work took, whatever else the machine is doing.
    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Validating and planning a chain of `n` nodes: the least thread CPU time of three runs.
    fn chain_cost(n: usize) -> std::time::Duration {
        let env = JobEnv::new("i", "o", "t");
        let mut wf = serde_json::Map::new();
        wf.insert(
            "1".into(),
            serde_json::json!({"class_type": "Pass", "inputs": {}}),
        );
        for i in 2..=n {
            let class = if i == n { "Out" } else { "Pass" };
            wf.insert(
                i.to_string(),
                serde_json::json!({"class_type": class, "inputs": {"image": [(i - 1).to_string(), 0]}}),
            );
        }
        let text = serde_json::Value::Object(wf).to_string();
        let registry = registry();
        (0..3)
            .map(|_| {
                let t = thread_cpu();
                let wf = workflow::load(&text, &registry, &env).unwrap();
                let p = plan(&wf, &env, &PlanOptions::default()).unwrap();
                assert_eq!(p.nodes.len(), n);
                thread_cpu() - t
            })
            .min()
            .unwrap()
    }

    #[test]
    fn validating_and_planning_grow_linearly_with_nodes() {
        // Ten times the nodes: about ten times the work when linear, a hundred when quadratic
        // (a 4,000-node chain once took 25 times a 1,000-node one). CPU time of this thread,
        // not wall time, so a loaded machine does not change the ratio.
        let small = chain_cost(1_000);
        let large = chain_cost(10_000);
        let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-6);
        eprintln!("1,000 nodes {small:?}, 10,000 nodes {large:?}: ratio {ratio:.1}");
        assert!(
            ratio < 50.0,
            "10,000 nodes took {ratio:.1} times 1,000 nodes ({large:?} against {small:?})"
        );
    }
}
