//! The control plane: the execution plan of a job, fitted to a device-memory budget.
//!
//! For each node the plan fixes its mode, its chunks (tiles) and the shapes it sees, and
//! forecasts the device memory held while it runs; admission ([`admit`]) compares the
//! forecast with the budget. Planning is pure: a function of the validated workflow, the shapes
//! nodes infer, and the options.
//!
//! # The memory model
//! Nodes run one after another in plan order (a node's chunks run in parallel across
//! workers), so the device holds, while node `n` runs:
//! - every value produced earlier whose last consumer is `n` or later (`live_bytes`), and
//! - `n`'s working set: for an atomic node its outputs and workspace; for a tiled node its
//!   output (assembled as chunks arrive) and, for each chunk in flight (`workers + prefetch`,
//!   cut ahead of the workers), its piece plus the result and workspace set aside for it when
//!   it was cut; and, if an output node consumes it, the results kept until announced.
//!
//! Setting memory aside when a chunk is cut, rather than when a worker happens to pick it up,
//! makes the held memory depend on the plan and not on thread scheduling: the measured peak
//! then tracks the forecast closely, and a chunk is never started without its memory.
//!
//! The forecast peak is the largest such sum. The planner gives each tileable node the largest
//! tile (from the configured size down by halves to the smallest) whose forecast, plus the
//! safety margin, fits the limit (the budget minus headroom).
//!
//! # Timestamps
//! Records carry a `u64` time. Node `n`'s input time is node `n-1`'s output time (0 for the
//! first), which is at least every producer's; chunk `i` of a node travels at `input time + i`;
//! its output at `input time + chunks - 1`. So along any path times never decrease, and a
//! probe that sees the frontier pass a chunk's time knows that chunk — and every earlier one —
//! is final.

use crate::chunk::{ChunkMemory, ChunkSize, ChunkSpec};
use crate::memory::Bytes;
use crate::node::{guarded, Inputs, JobEnv, NodeError};
use crate::residency::WeightMode;
use crate::schema::{ExecMode, MemoryEstimate, MemoryQuery};
use crate::value::ValueInfo;
use crate::workflow::ValidatedWorkflow;
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
    /// tiles, one window per video stream, one chunk per audio stream) and weights resident,
    /// whatever the limit; used only for comparisons and A/B checks.
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
    /// Earlier values still held while the node runs (its inputs among them).
    pub live_bytes: u64,
    /// The node's own working set.
    pub working_bytes: u64,
    /// `live_bytes + working_bytes`.
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
    /// The chunks of a tiled node; empty for an atomic one.
    pub chunks: Vec<ChunkSpec>,
    /// Steps of an iterative node (a sampler), each its own time; 0 for other nodes.
    pub steps: u32,
    /// Shape of the input that is cut into chunks (tiled nodes).
    pub chunked_input: Option<ValueInfo>,
    /// Memory of the largest chunk (tiled nodes).
    pub chunk_memory: Option<ChunkMemory>,
    /// Shapes of the linked inputs, in link order.
    pub inputs: Vec<ValueInfo>,
    /// Shapes of the outputs.
    pub outputs: Vec<ValueInfo>,
    /// The node's own estimate for an atomic run (weights and activations).
    pub memory: MemoryEstimate,
    /// Where the node's weights live while it runs.
    pub weights: WeightPlan,
    /// Chunks cut but not yet finished at once (tiled nodes): workers plus prefetch, or one
    /// when only serial processing fits.
    pub inflight: usize,
    /// What the device holds while the node runs, in the chosen mode.
    pub forecast: NodeForecast,
    /// The forecast had the node run atomic (the naive plan).
    pub atomic_peak_bytes: u64,
    /// Time of the node's inputs.
    pub in_time: u64,
    /// Time of the node's outputs.
    pub out_time: u64,
}

impl NodePlan {
    /// Number of units of work: chunks of a tiled node, steps of an iterative one, else 1.
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

/// The plan of a whole job.
#[derive(Clone, Debug, Serialize)]
pub struct ExecutionPlan {
    pub nodes: Vec<NodePlan>,
    /// The largest node forecast: the most the device holds at once.
    pub forecast_peak_bytes: u64,
    /// The same for the naive plan that runs every node whole.
    pub naive_peak_bytes: u64,
    /// The limit the plan was fitted to (budget minus headroom), if any.
    pub limit_bytes: Option<u64>,
    pub safety_margin: f64,
    /// Whether every node's forecast fits the limit.
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

    /// The node with the largest forecast.
    pub fn peak_node(&self) -> Option<&NodePlan> {
        self.nodes.iter().max_by_key(|n| n.forecast.peak_bytes)
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

/// Plans a validated workflow.
pub fn plan(
    wf: &ValidatedWorkflow,
    env: &JobEnv,
    opts: &PlanOptions,
) -> Result<ExecutionPlan, PlanError> {
    let count = wf.nodes.len();
    // Pass 1: shapes, and each node's own estimate.
    let mut shapes: Vec<(Vec<ValueInfo>, Vec<ValueInfo>, MemoryEstimate)> =
        Vec::with_capacity(count);
    let mut named: Vec<Inputs<ValueInfo>> = Vec::with_capacity(count);
    for n in &wf.nodes {
        let fail = |error: NodeError| PlanError {
            node: n.id.0.clone(),
            class_type: n.class_type.to_string(),
            error,
        };
        let mut infos = Inputs::new();
        let mut input_list = Vec::new();
        for l in &n.links {
            let info = shapes[l.from]
                .1
                .get(l.output)
                .copied()
                .unwrap_or(ValueInfo::Unknown);
            infos.insert(l.input, info);
            input_list.push(info);
        }
        // Every call into node code is guarded: a node bug fails the plan, not the process.
        let outputs = if n.lifted.is_empty() {
            guarded(|| n.node.infer(&n.args, &infos, env)).map_err(fail)?
        } else {
            guarded(|| crate::lift::infer(n, &infos, env)).map_err(fail)?
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
                        inputs: &input_list,
                        outputs: &outputs,
                        bytes_per_element: opts.bytes_per_element,
                    },
                ))
            })
            .map_err(fail)?
        };
        shapes.push((input_list, outputs, memory));
        named.push(infos);
    }

    // Pass 2: liveness. A value (node, port) is held from its node until its last consumer.
    let mut last_use: Vec<Vec<usize>> = (0..count).map(|ix| vec![ix; shapes[ix].1.len()]).collect();
    for (ix, n) in wf.nodes.iter().enumerate() {
        for l in &n.links {
            if let Some(u) = last_use[l.from].get_mut(l.output) {
                *u = (*u).max(ix);
            }
        }
    }
    // Value (p, o) is held while node ix runs when p < ix <= its last use. With `produced[i]`
    // the bytes of every output of nodes before i and `released[i]` those whose last use is
    // before i (all produced before i too), the bytes held are their difference: linear, not
    // a scan of every earlier node for every node.
    let mut produced = vec![0u64; count + 1];
    let mut released = vec![0u64; count + 1];
    for p in 0..count {
        produced[p + 1] = produced[p];
        for (o, &u) in shapes[p].1.iter().zip(&last_use[p]) {
            let b = o.bytes().unwrap_or(0);
            produced[p + 1] += b;
            released[u + 1] += b;
        }
    }
    for i in 0..count {
        released[i + 1] += released[i];
    }
    let live_before = |ix: usize| -> u64 { produced[ix] - released[ix] };

    // Pass 3: modes and sizes.
    let limit = opts.limit.map(|b| b.0);
    let fits = |peak: u64| limit.is_none_or(|l| opts.with_margin(peak) <= l);
    let mut plans: Vec<NodePlan> = Vec::with_capacity(count);
    let mut time = 0u64;
    for (ix, n) in wf.nodes.iter().enumerate() {
        let fail = |error: NodeError| PlanError {
            node: n.id.0.clone(),
            class_type: n.class_type.to_string(),
            error,
        };
        let (input_list, outputs, memory) = shapes[ix].clone();
        let live = live_before(ix);
        // Inputs are part of `live`; an atomic run adds its outputs and workspace.
        let mut linked: Vec<(usize, usize)> = n.links.iter().map(|l| (l.from, l.output)).collect();
        linked.sort_unstable();
        linked.dedup();
        let input_bytes: u64 = linked
            .iter()
            .map(|&(f, o)| shapes[f].1.get(o).and_then(|i| i.bytes()).unwrap_or(0))
            .sum();
        // Activations of an atomic run: outputs and workspace (inputs are part of `live`).
        let activations = memory
            .total()
            .saturating_sub(memory.weights)
            .saturating_sub(input_bytes);
        let atomic_peak = live + memory.weights + activations;
        let feeds_output = wf
            .consumers(ix)
            .iter()
            .any(|&c| wf.nodes[c].node.schema().output_node);
        let meta = n.node.meta();
        let chunking = if n.lifted.is_empty()
            && (meta.supports(ExecMode::Tiled) || meta.supports(ExecMode::Streamed))
        {
            guarded(|| Ok(n.node.chunked(&n.args, &named[ix], env))).map_err(fail)?
        } else {
            None
        };
        let input = chunking.as_ref().and_then(|c| {
            n.links
                .iter()
                .position(|l| l.input == c.input)
                .map(|i| input_list[i])
                .filter(|i| i.image().is_some() || matches!(i, ValueInfo::Latent { .. }))
        });
        // Where the weights can live: all resident, or else streamed block by block.
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
        let stream_input = chunking.as_ref().and_then(|c| {
            n.links
                .iter()
                .position(|l| l.input == c.input)
                .map(|i| input_list[i])
                .filter(|i| matches!(i, ValueInfo::Video(_) | ValueInfo::Audio(_)))
        });
        let mut chosen: Option<Choice> = None;
        if let (Some(chunking), Some(sin), true) =
            (&chunking, stream_input, meta.supports(ExecMode::Streamed))
        {
            let weights = WeightPlan::resident(memory.weights);
            chosen = Some(
                streamed(
                    chunking,
                    &sin,
                    weights,
                    live,
                    opts,
                    &fits,
                    feeds_output || n.node.schema().output_node,
                )
                .map_err(fail)?,
            );
        }
        let decided = chosen.is_some();
        for weights in weight_options.into_iter().filter(|_| !decided) {
            let users = opts.workers.max(1) as u64;
            let atomic = Choice {
                mode: ExecMode::Atomic,
                tile: None,
                chunks: Vec::new(),
                chunked_input: None,
                chunk_memory: None,
                working: weights.device_bytes(1) + activations,
                weights,
                inflight: 1,
            };
            let mut choice = atomic.clone();
            // A node that prefers running whole (its tiles only approximate it, e.g. a VAE
            // decode that blends overlaps) is tiled only when whole does not fit.
            let whole_first = meta.modes.first() == Some(&ExecMode::Atomic);
            let tile_it = !(whole_first && fits(live + atomic.working));
            if let (Some(chunking), Some(input), true) = (&chunking, input, tile_it) {
                let output_bytes = outputs.first().and_then(|o| o.bytes()).unwrap_or(0);
                let serial_too = opts.inflight(usize::MAX) > 1;
                let sizes: Vec<usize> = opts
                    .tile_sizes()
                    .into_iter()
                    .map(|t| chunking.max_tile.map_or(t, |m| t.min(m.max(opts.min_tile))))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                // Candidates: every tile size with the profile's chunks in flight, then one
                // at a time. The largest tile at full concurrency is taken when it fits (the
                // configured preference); otherwise the fitting candidate with the least
                // estimated work per worker (halos make small tiles costly), and if none
                // fits, the most frugal.
                let mut fitting: Vec<(f64, Choice)> = Vec::new();
                let mut frugal: Option<Choice> = None;
                let mut first = true;
                let merger_bytes =
                    guarded(|| Ok(chunking.op.merger_memory(&input))).map_err(fail)?;
                'search: for serial in [false, true] {
                    if serial && !serial_too {
                        break;
                    }
                    for &side in &sizes {
                        let size = ChunkSize::Tile {
                            width: side,
                            height: side,
                        };
                        let chunks = guarded(|| chunking.op.plan(&input, size)).map_err(fail)?;
                        if chunks.len() <= 1 {
                            // One tile covers the whole output: run it whole if that fits, else
                            // try smaller tiles.
                            if !serial && fits(live + atomic.working) {
                                break 'search;
                            }
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
                        })
                        .map_err(fail)?;
                        let inflight = if serial {
                            1
                        } else {
                            opts.inflight(chunks.len())
                        };
                        let parallel = inflight.min(opts.workers.max(1)).min(chunks.len()) as f64;
                        let users = users.min(inflight as u64);
                        let inflight = inflight as u64;
                        let captured = if feeds_output {
                            inflight * mem.result
                        } else {
                            0
                        };
                        let working = weights.device_bytes(users)
                            + output_bytes
                            + inflight * (mem.piece + mem.result + mem.workspace)
                            + captured
                            + merger_bytes;
                        let c = Choice {
                            mode: ExecMode::Tiled,
                            tile: Some(side),
                            chunks,
                            chunked_input: Some(input),
                            chunk_memory: Some(mem),
                            working,
                            weights,
                            inflight: inflight as usize,
                        };
                        if fits(live + working) {
                            if first {
                                fitting = vec![(0.0, c)];
                                break 'search;
                            }
                            fitting.push((pieces as f64 / parallel, c));
                        } else if frugal.as_ref().is_none_or(|f| working < f.working) {
                            frugal = Some(c);
                        }
                        first = false;
                    }
                }
                let best = fitting
                    .into_iter()
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, c)| c)
                    .or(frugal);
                if let Some(b) = best {
                    // Otherwise prefer tiles (partial outputs, bounded workspace) over a
                    // whole run that fits, except where one tile would cover everything.
                    choice = b;
                }
            }
            let ok = fits(live + choice.working);
            let frugal = chosen.as_ref().is_none_or(|c| choice.working < c.working);
            if ok || frugal {
                chosen = Some(choice);
            }
            if ok {
                break;
            }
        }
        let choice = chosen.expect("at least the resident option was tried");
        // An iterative node runs whole, one time per step.
        let steps = if choice.mode == ExecMode::Atomic {
            guarded(|| Ok(n.node.steps(&n.args))).map_err(fail)?
        } else {
            0
        };
        let peak = live + choice.working;
        plans.push(NodePlan {
            node: n.id.0.clone(),
            class_type: n.class_type,
            mode: choice.mode,
            tile: choice.tile,
            chunks: choice.chunks,
            steps,
            chunked_input: choice.chunked_input,
            chunk_memory: choice.chunk_memory,
            inputs: input_list,
            outputs,
            memory,
            weights: choice.weights,
            inflight: choice.inflight,
            forecast: NodeForecast {
                live_bytes: live,
                working_bytes: choice.working,
                peak_bytes: peak,
                fits: fits(peak),
            },
            atomic_peak_bytes: atomic_peak,
            in_time: time,
            out_time: time,
        });
        if let Some(np) = plans.last_mut() {
            np.out_time = np.in_time + np.chunk_count() as u64 - 1;
            time = np.out_time;
        }
    }
    let forecast_peak_bytes = plans
        .iter()
        .map(|p| p.forecast.peak_bytes)
        .max()
        .unwrap_or(0);
    let naive_peak_bytes = plans.iter().map(|p| p.atomic_peak_bytes).max().unwrap_or(0);
    Ok(ExecutionPlan {
        fits: plans.iter().all(|p| p.forecast.fits),
        nodes: plans,
        forecast_peak_bytes,
        naive_peak_bytes,
        limit_bytes: limit,
        safety_margin: opts.safety_margin,
        workers: opts.workers.max(1),
        prefetch: opts.prefetch,
        min_tile: opts.min_tile.max(MIN_TILE),
    })
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
        .max_by_key(|n| n.forecast.peak_bytes)
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
