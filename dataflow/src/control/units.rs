//! How the planner groups nodes into units and sizes each: whole nodes, chunked nodes (tiles
//! of a node on its own, windows and chunks of a stream), and pipeline regions of local image
//! operators with their sources and sinks. See [`super::plan`]'s module docs for the memory
//! model these sizes follow.

use super::plan::{PlanOptions, UnitKind, WeightPlan};
use crate::control::workflow::ValidatedWorkflow;
use crate::node::chunk::{ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec, SourceOp};
use crate::node::schema::{ExecMode, MemoryEstimate};
use crate::node::value::ValueInfo;
use crate::node::{guarded, Chunking, Inputs, JobEnv, NodeError, Sinking};
use std::sync::Arc;

/// What the first pass learns of a node.
pub(crate) struct Shaped {
    pub(crate) inputs: Vec<ValueInfo>,
    pub(crate) outputs: Vec<ValueInfo>,
    pub(crate) memory: MemoryEstimate,
    pub(crate) named: Inputs<ValueInfo>,
    /// Activations of an atomic run: outputs and workspace (inputs are held anyway).
    pub(crate) activations: u64,
}

/// How a node may be cut.
pub(crate) enum Cut {
    /// It runs whole.
    None,
    /// Windows or chunks of a stream (its chunked input's shape).
    Stream(Chunking, ValueInfo),
    /// Tiles of an image or latent; `local` when its pieces compose ([`crate::node::chunk::LocalOp`]).
    Tiles {
        chunking: Chunking,
        input: ValueInfo,
        local: bool,
    },
}

/// A unit being formed.
pub(crate) struct Draft {
    pub(crate) kind: UnitKind,
    pub(crate) nodes: Vec<usize>,
    pub(crate) sink: Option<(usize, Sinking)>,
    pub(crate) source: Option<(usize, Arc<dyn SourceOp>)>,
}

impl Draft {
    pub(crate) fn new(kind: UnitKind, ix: usize) -> Draft {
        Draft {
            kind,
            nodes: vec![ix],
            sink: None,
            source: None,
        }
    }

    /// The source, the stages, the sink.
    pub(crate) fn members(&self) -> impl Iterator<Item = usize> + '_ {
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
pub(crate) struct NodeChoice {
    pub(crate) mode: ExecMode,
    pub(crate) tile: Option<usize>,
    pub(crate) chunks: Vec<ChunkSpec>,
    pub(crate) pieces_in: Vec<ChunkRegion>,
    pub(crate) chunked_input: Option<ValueInfo>,
    pub(crate) chunk_memory: Option<ChunkMemory>,
    pub(crate) weights: WeightPlan,
    pub(crate) inflight: usize,
    /// The node's own working set (its share, in a region).
    pub(crate) working: u64,
    pub(crate) steps: u32,
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
pub(crate) struct Sized {
    pub(crate) nodes: Vec<(usize, NodeChoice)>,
    pub(crate) pieces: u32,
    pub(crate) reserve: u64,
    pub(crate) working: u64,
}

/// Groups nodes into units: a node alone, or consecutive local image operators (each read
/// only by the next) as one pipeline region, with an output node that takes the last stage's
/// pieces as its sink. A tiled unit whose tile grid is a single tile at the largest size, or
/// that prefers running whole and fits whole, runs whole instead.
pub(crate) fn form_units(
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
pub(crate) fn size_unit(
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

/// Where a node's weights may live: all resident, or else (outside the naive plan) streamed
/// block by block when they can be.
fn weight_options(memory: &MemoryEstimate, opts: &PlanOptions) -> Vec<WeightPlan> {
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
    options
}

/// A node run whole: its weights resident, or streamed block by block when that fits better.
pub(crate) fn size_whole(
    wf: &ValidatedWorkflow,
    ix: usize,
    sh: &Shaped,
    fits: &dyn Fn(u64) -> bool,
    opts: &PlanOptions,
) -> Result<NodeChoice, NodeError> {
    let options = weight_options(&sh.memory, opts);
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
pub(crate) fn shown(wf: &ValidatedWorkflow, ix: usize) -> bool {
    wf.consumers(ix)
        .iter()
        .any(|&c| wf.nodes[c].node.schema().output_node)
}

/// Candidates of a tiled unit, judged alike: the largest tile at full concurrency when it
/// fits (the configured preference); else the fitting one with the least estimated work per
/// worker (halos make small tiles costly); else the most frugal.
pub(crate) struct Candidates<T> {
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
pub(crate) fn sizes_for(chunking: &Chunking, opts: &PlanOptions) -> Vec<usize> {
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
pub(crate) fn size_chunked(
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
    let weight_options = weight_options(&memory, opts);
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
pub(crate) fn size_pipeline(
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
pub(crate) struct Stage<'a> {
    pub(crate) ix: usize,
    pub(crate) op: &'a Chunking,
    pub(crate) input: ValueInfo,
}

/// What one tile size gives a region, in sums and maxima.
#[derive(Clone)]
pub(crate) struct RegionStats {
    pub(crate) pieces: usize,
    /// The most any stage holds for one piece (its input piece, result and workspace).
    pub(crate) reserve: u64,
    /// The largest result of the last stage (what an output node is shown).
    pub(crate) last_result: u64,
    /// Input bytes over every stage and piece: the work, halos included.
    pub(crate) work: u64,
    /// What the region's source holds while it is read (0 without one).
    pub(crate) source: u64,
}

/// One stage's part of every piece, kept for the chosen tile size.
#[derive(Default)]
pub(crate) struct StageLayout {
    pub(crate) chunks: Vec<ChunkSpec>,
    pub(crate) pieces_in: Vec<ChunkRegion>,
    pub(crate) most: ChunkMemory,
}

/// Cuts the last stage's output at `side` and walks every piece back through the stages;
/// `None` when the grid is a single tile. With `keep`, every stage's part of every piece is
/// kept there.
pub(crate) fn walk(
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
    let locals: Vec<&dyn crate::node::chunk::LocalOp> = stages
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
pub(crate) fn whole_stream(input: &ValueInfo) -> Vec<ChunkSize> {
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
pub(crate) fn stream_sizes(input: &ValueInfo, requested: Option<usize>) -> Vec<ChunkSize> {
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
pub(crate) fn streamed(
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
pub(crate) struct Choice {
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
