//! The compute plane: a validated, planned workflow becomes one timely dataflow, run on N
//! worker threads; a driver turns frontier movement into events.
//!
//! Per node, by plan mode:
//! - **atomic**: one operator, owned by worker `node index % workers`, that waits until its
//!   input frontier passes the node's input time, runs the kernel, and emits the outputs at the
//!   node's output time.
//! - **iterative** (an atomic node with steps, e.g. a sampler): the same operator starts the
//!   node once its inputs are complete, then runs one step per activation, step `i` at time
//!   `in_time + i`, downgrading its capability after each, so the frontier after it passes
//!   step by step; the outputs come at the last step's time.
//! - **tiled**: *split* (owner: cuts the whole input into chunk records at successive times),
//!   *process* (chunks exchanged across all workers by index; one chunk per activation so the
//!   frontier moves chunk by chunk), *merge* (owner: assembles the output once the frontier
//!   passes the output time).
//!
//! Every worker builds the same dataflow in the same order from the same plan (the plan is
//! computed once and shared), so operator identities agree across workers.
//!
//! Events come from [`ProbeHandle`]s placed after every node's kernel and output, polled by
//! worker 0 between steps: operators never report progress themselves. A kernel's error or
//! panic is caught, recorded, and turns every later operator into a no-op, so a failed job
//! drains quickly and fails alone.

use crate::chunk::{ChunkSize, ChunkSpec, ChunkedOp, Merger};
use crate::event::{
    Emitter, EventKind, Lifecycle, MemoryForecast, MemoryUse, NodeTimingEvent, Progress, RunTiming,
};
use crate::memory::{Accountant, Bytes, Lease};
use crate::node::{
    guarded, Chunking, ExecContext, Inputs, JobEnv, NodeError, NodeId, NodeOutput, StepPreview,
    Stepper,
};
use crate::plan::ExecutionPlan;
use crate::residency::{DeltaLog, Registry, WeightContext, WeightMode};
use crate::schema::ExecMode;
use crate::timing::{NodeTiming, TimeSplit};
use crate::value::{Value, ValueInfo};
use crate::workflow::ValidatedWorkflow;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concatenate, Inspect, Operator, Probe};
use timely::dataflow::{ProbeHandle, Scope, Stream};

/// The record type of every stream: a value on an output port (or of a chunk).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    /// Output port of the producing node; for chunks, 0.
    port: u32,
    /// Chunk index within the producing node (0 for whole values).
    chunk: u32,
    value: Value,
    /// Memory set aside for processing this chunk (its result and workspace), taken when the
    /// piece was cut. Records move between threads of one process, never serialized.
    #[serde(skip)]
    reserve: Option<Arc<Lease>>,
}

type Recs<'s> = Stream<'s, u64, Vec<Record>>;
type Cb = CapacityContainerBuilder<Vec<Record>>;

/// A flag to stop a running job; cheap to clone and share.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the job to stop at the next chunk boundary.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Whether stop was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How to run a job. The worker count and the memory limit come from the plan, which was
/// fitted to them.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The job's id in events.
    pub job_id: String,
    pub cancel: CancelToken,
    /// The device budget (headroom included), reported with the job's end.
    pub budget: Option<Bytes>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            job_id: "job".into(),
            cancel: CancelToken::new(),
            budget: None,
        }
    }
}

/// Worker threads by default: the machine's cores.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

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

/// State shared by all workers of one run.
struct Shared {
    failure: Mutex<Option<(usize, NodeError)>>,
    stop: AtomicBool,
    cancel: CancelToken,
    ui: Mutex<BTreeMap<usize, Json>>,
    /// Chunks of nodes whose output an output node consumes, kept until announced.
    captured: Mutex<HashMap<(usize, u32), Value>>,
    /// Per node: whether it produced its outputs (so a stop after it still reports it).
    ran: Vec<AtomicBool>,
    /// Counts every value and workspace the run holds against the limit.
    acct: Arc<Accountant>,
    /// Chunks re-run at a smaller tile, for the driver to announce.
    retries: Mutex<Vec<Retry>>,
    retry_count: AtomicU64,
    /// Per tiled node: its output buffer, leased before its first piece is cut and handed to
    /// the merge.
    output_leases: Mutex<HashMap<usize, Lease>>,
    /// Per node: how many of its chunks the driver has announced (and released).
    announced: Vec<AtomicU64>,
    /// Per chunked node: how many pieces its split has cut (windows decoded, for streams).
    cut: Vec<AtomicU64>,
    /// Per tiled node: its operator bound to its other inputs (a model), while it runs.
    bound: Mutex<HashMap<usize, Arc<dyn ChunkedOp>>>,
    /// Residency changes the run caused, for the driver to announce.
    residency: DeltaLog,
    /// Previews iterative nodes made, by (node, step), until the driver announces them.
    previews: Mutex<HashMap<(usize, u32), StepPreview>>,
    /// Per node: where its time goes, and the phases it entered.
    timing: Vec<Arc<NodeTiming>>,
    /// Milliseconds from the job's start to the dataflow's first step, once it took one.
    startup_ms: Mutex<Option<f64>>,
}

/// A chunk that ran short of memory and was re-run as smaller tiles.
#[derive(Clone, Debug)]
struct Retry {
    node: usize,
    chunk: u32,
    from: usize,
    to: usize,
    reason: String,
}

impl Shared {
    /// The operator that processes node `ix`'s chunks: bound to its inputs if it was.
    fn op_for(&self, ix: usize, unbound: &Arc<dyn ChunkedOp>) -> Arc<dyn ChunkedOp> {
        self.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ix)
            .cloned()
            .unwrap_or_else(|| unbound.clone())
    }

    fn stopped(&self) -> bool {
        if self.cancel.is_cancelled() {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.stop.load(Ordering::SeqCst)
    }
    fn mark_ran(&self, node: usize) {
        self.ran[node].store(true, Ordering::SeqCst);
    }
    fn has_run(&self, node: usize) -> bool {
        self.ran[node].load(Ordering::SeqCst)
    }
    fn fail(&self, node: usize, e: NodeError) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some((node, e));
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Probes of one node: after its kernel (chunk progress) and after its output.
struct NodeProbes {
    chunk: ProbeHandle<u64>,
    out: ProbeHandle<u64>,
}

/// Runs a planned workflow to completion, emitting events through `emitter`.
///
/// Emits `lifecycle: running` onwards; the caller emits `planning` (it planned) and gets the
/// final event emitted here. Returns once every worker has finished.
pub fn run(
    wf: Arc<ValidatedWorkflow>,
    plan: Arc<ExecutionPlan>,
    env: JobEnv,
    opts: RunOptions,
    emitter: Arc<Emitter>,
) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let shared = Arc::new(Shared {
        failure: Mutex::new(None),
        stop: AtomicBool::new(false),
        cancel: opts.cancel.clone(),
        ui: Mutex::new(BTreeMap::new()),
        captured: Mutex::new(HashMap::new()),
        ran: wf.nodes.iter().map(|_| AtomicBool::new(false)).collect(),
        acct: match plan.limit_bytes {
            Some(l) => Accountant::new(Bytes(l)),
            None => Accountant::unlimited(),
        },
        retries: Mutex::new(Vec::new()),
        retry_count: AtomicU64::new(0),
        output_leases: Mutex::new(HashMap::new()),
        announced: wf.nodes.iter().map(|_| AtomicU64::new(0)).collect(),
        cut: wf.nodes.iter().map(|_| AtomicU64::new(0)).collect(),
        bound: Mutex::new(HashMap::new()),
        residency: DeltaLog::default(),
        previews: Mutex::new(HashMap::new()),
        timing: wf.nodes.iter().map(|_| Arc::default()).collect(),
        startup_ms: Mutex::new(None),
    });
    let stats: Arc<Mutex<Vec<NodeStats>>> = Arc::new(Mutex::new(Vec::new()));
    let workers = plan.workers.max(1);
    emitter.emit(EventKind::MemoryForecast(MemoryForecast::of(
        &plan,
        opts.budget.map(|b| b.0),
    )));
    let result = {
        let (wf, plan, shared, emitter, stats) = (
            wf.clone(),
            plan.clone(),
            shared.clone(),
            emitter.clone(),
            stats.clone(),
        );
        timely::execute(timely::Config::process(workers), move |worker| {
            let index = worker.index();
            let probes =
                worker.dataflow::<u64, _, _>(|scope| build(scope, &wf, &plan, &env, &shared));
            let mut driver = (index == 0).then(|| Driver::new(&wf, &plan, &shared, &emitter));
            loop {
                worker.step_or_park(Some(Duration::from_millis(1)));
                if let Some(d) = driver.as_mut() {
                    d.poll(&probes);
                }
                if probes.iter().all(|p| p.out.done()) {
                    break;
                }
            }
            if let Some(mut d) = driver {
                d.poll(&probes);
                *stats.lock().unwrap_or_else(|p| p.into_inner()) = d.stats();
            }
        })
        .and_then(|guards| {
            guards
                .join()
                .into_iter()
                .collect::<Result<Vec<()>, String>>()
        })
    };
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let timing = run_timing(&wf, &shared, &stats, emitter.elapsed_ms());
    let failure = shared
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let outcome = match (result, failure) {
        (_, Some((ix, error))) => Err(RunError::Node {
            node: wf.nodes[ix].id.0.clone(),
            class_type: wf.nodes[ix].class_type.to_string(),
            error,
        }),
        (Err(e), None) => Err(RunError::Runtime(e)),
        // A stop that came after every node had run changes nothing: the job succeeded.
        (Ok(_), None) if (0..wf.nodes.len()).any(|ix| !shared.has_run(ix)) => {
            if opts.cancel.is_cancelled() {
                Err(RunError::Interrupted)
            } else {
                Err(RunError::Runtime(
                    "the dataflow ended before every node ran".into(),
                ))
            }
        }
        (Ok(_), None) => {
            let ui = std::mem::take(&mut *shared.ui.lock().unwrap_or_else(|p| p.into_inner()));
            Ok(RunReport {
                outputs: ui
                    .into_iter()
                    .map(|(ix, v)| (wf.nodes[ix].id.0.clone(), v))
                    .collect(),
                nodes: std::mem::take(&mut *stats.lock().unwrap_or_else(|p| p.into_inner())),
                wall_ms,
                budget_bytes: opts.budget.map(|b| b.0),
                tracked_peak_bytes: shared.acct.peak().0,
                retries: shared.retry_count.load(Ordering::SeqCst) as u32,
            })
        }
    };
    emit_residency(&shared, &emitter);
    if let Some(t) = timing {
        emitter.emit(EventKind::Timing(t));
    }
    let memory = MemoryUse {
        budget_bytes: opts.budget.map(|b| b.0),
        tracked_peak_bytes: shared.acct.peak().0,
    };
    match &outcome {
        Ok(_) => emitter.emit(EventKind::Success { wall_ms, memory }),
        Err(RunError::Node {
            node,
            class_type,
            error,
        }) => emitter.emit(EventKind::Error {
            node_id: Some(node.clone()),
            node_type: Some(class_type.clone()),
            message: error.to_string(),
            memory: Some(memory),
        }),
        Err(RunError::Interrupted) => emitter.emit(EventKind::Interrupted {
            node_id: None,
            memory: Some(memory),
        }),
        Err(e @ RunError::Runtime(_)) => emitter.emit(EventKind::Error {
            node_id: None,
            node_type: None,
            message: e.to_string(),
            memory: Some(memory),
        }),
    }
    outcome
}

/// The run's time split, once its dataflow took a first step.
fn run_timing(
    wf: &ValidatedWorkflow,
    shared: &Shared,
    stats: &Mutex<Vec<NodeStats>>,
    now_ms: f64,
) -> Option<RunTiming> {
    let startup_ms = (*shared.startup_ms.lock().unwrap_or_else(|p| p.into_inner()))?;
    let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
    let nodes: Vec<NodeTimingEvent> = wf
        .nodes
        .iter()
        .enumerate()
        .map(|(ix, n)| NodeTimingEvent {
            node: n.id.0.clone(),
            class_type: n.class_type.to_string(),
            wall_ms: stats.get(ix).map_or(0.0, |s| s.wall_ms),
            split: shared.timing[ix].split(),
        })
        .collect();
    let total = nodes
        .iter()
        .fold(TimeSplit::default(), |acc, n| acc.plus(n.split));
    Some(RunTiming {
        startup_ms,
        wall_ms: now_ms - startup_ms,
        total,
        nodes,
    })
}

/// Announces the residency changes recorded since the last call.
fn emit_residency(shared: &Shared, emitter: &Emitter) {
    let deltas = std::mem::take(&mut *shared.residency.lock().unwrap_or_else(|p| p.into_inner()));
    for d in deltas {
        emitter.emit(EventKind::ResidencyDelta(d));
    }
}

/// Builds the dataflow of one job on one worker; returns each node's probes.
fn build(
    scope: Scope<'_, u64>,
    wf: &Arc<ValidatedWorkflow>,
    plan: &Arc<ExecutionPlan>,
    env: &JobEnv,
    shared: &Arc<Shared>,
) -> Vec<NodeProbes> {
    let peers = scope.peers() as u64;
    let me = scope.index() as u64;
    // Capture exactly what the driver announces as partial outputs, so nothing is left behind.
    let feeds_output: Vec<bool> = (0..wf.nodes.len())
        .map(|ix| !image_output_consumers(wf, plan, ix).is_empty() || streams_output(wf, plan, ix))
        .collect();
    let mut outputs: Vec<Recs> = Vec::with_capacity(wf.nodes.len());
    let mut probes = Vec::with_capacity(wf.nodes.len());
    for (ix, n) in wf.nodes.iter().enumerate() {
        let p = &plan.nodes[ix];
        let owner = ix as u64 % peers;
        // The node's input: producers' streams, filtered to the linked port, tagged by link slot.
        let tagged: Vec<Recs> = n
            .links
            .iter()
            .enumerate()
            .map(|(slot, l)| {
                let port = l.output as u32;
                outputs[l.from].clone().flat_map(move |r: Record| {
                    (r.port == port).then_some(Record {
                        port: slot as u32,
                        ..r
                    })
                })
            })
            .collect();
        // Nodes run one after another in plan order (the memory forecast assumes it): the
        // previous node's output joins the input as a gate that carries no data.
        let mut tagged = tagged;
        if ix > 0 {
            tagged.push(outputs[ix - 1].clone().flat_map(|_r: Record| None));
        }
        let input: Recs = if tagged.is_empty() {
            empty(scope)
        } else {
            scope.concatenate(tagged)
        };
        let ctx = ExecContext {
            env: env.clone(),
            device: Device::Cpu,
            prompt: Some(wf.prompt.clone()),
            node_id: NodeId(n.id.0.clone()),
            weights: WeightContext {
                registry: Registry::global(),
                acct: shared.acct.clone(),
                log: shared.residency.for_node(shared.timing[ix].clone()),
                device: Device::Cpu,
                mode: p.weights.mode.unwrap_or(WeightMode::Resident),
            },
        };
        let chunking = match p.mode {
            ExecMode::Tiled | ExecMode::Streamed => {
                let mut infos = Inputs::new();
                for (l, info) in n.links.iter().zip(&p.inputs) {
                    infos.insert(l.input, *info);
                }
                let c = n.node.chunked(&n.args, &infos, env);
                if let Some(c) = &c {
                    // What the plan leaves of the limit: caches across runs may use it.
                    let spare = shared.acct.limit().0.saturating_sub(
                        (plan.forecast_peak_bytes as f64 * (1.0 + plan.safety_margin.max(0.0)))
                            .ceil() as u64,
                    );
                    c.op.attach(&shared.acct, spare);
                }
                c
            }
            _ => None,
        };
        let chunk_probe = ProbeHandle::new();
        let out_probe = ProbeHandle::new();
        let capture = feeds_output[ix];
        let output = match chunking {
            None => {
                let out = whole(scope, input, ix, owner == me, wf, plan, ctx, shared);
                let sh = shared.clone();
                out.inspect(move |r: &Record| {
                    if capture && r.port == 0 {
                        sh.captured
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((ix, 0), r.value.clone());
                    }
                })
                .probe_with(&chunk_probe)
                .probe_with(&out_probe)
            }
            Some(chunking) => {
                let pieces = split(
                    scope,
                    input,
                    ix,
                    owner == me,
                    &chunking,
                    wf,
                    plan,
                    shared,
                    &chunk_probe,
                    ctx.weights.clone(),
                );
                let done = process(scope, pieces, ix, &chunking, plan, shared);
                let sh = shared.clone();
                let done = done
                    .inspect(move |r: &Record| {
                        if capture {
                            sh.captured
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert((ix, r.chunk), r.value.clone());
                        }
                    })
                    .probe_with(&chunk_probe);
                merge(
                    done,
                    ix,
                    owner,
                    owner == me,
                    p.out_time,
                    &chunking,
                    plan,
                    shared,
                )
                .probe_with(&out_probe)
            }
        };
        outputs.push(output);
        probes.push(NodeProbes {
            chunk: chunk_probe,
            out: out_probe,
        });
    }
    probes
}

/// Collects stashed input records into named inputs.
fn named_inputs(wf: &ValidatedWorkflow, ix: usize, stash: &mut Vec<Record>) -> Inputs<Value> {
    let mut inputs = Inputs::new();
    for r in stash.drain(..) {
        if let Some(l) = wf.nodes[ix].links.get(r.port as usize) {
            inputs.insert(l.input, r.value);
        }
    }
    inputs
}

/// A node's outputs as tracked records, recording its UI output and that it ran; for a
/// failure, records it and gives nothing.
fn finished(shared: &Shared, ix: usize, result: Result<NodeOutput, NodeError>) -> Vec<Record> {
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            shared.fail(ix, e);
            return Vec::new();
        }
    };
    if let Some(ui) = out.ui {
        shared
            .ui
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ix, ui);
    }
    shared.mark_ran(ix);
    out.values
        .into_iter()
        .enumerate()
        .map(|(port, value)| Record {
            port: port as u32,
            chunk: 0,
            value: value.track(&shared.acct),
            reserve: None,
        })
        .collect()
}

/// A node that runs whole: waits for all inputs, then runs.
///
/// - An atomic node runs its kernel once and emits all outputs at the output time.
/// - An iterative node starts, then runs one step per activation, step `i` at time
///   `in_time + i`, downgrading its capability after each so the frontier passes step by step;
///   the outputs come at the last step's time (the output time). A step's preview is left for
///   the driver, which announces it once the frontier passes the step.
///
/// Memory: before the kernel (or the first step) runs it leases the node's forecast working
/// set (outputs and workspace), held until the node finishes (a sampler keeps its latent and
/// activations across steps); the outputs then carry leases of their own.
#[allow(clippy::too_many_arguments)]
fn whole<'s>(
    scope: Scope<'s, u64>,
    input: Recs<'s>,
    ix: usize,
    owner: bool,
    wf: &Arc<ValidatedWorkflow>,
    plan: &Arc<ExecutionPlan>,
    ctx: ExecContext,
    shared: &Arc<Shared>,
) -> Recs<'s> {
    let (wf, plan, shared) = (wf.clone(), plan.clone(), shared.clone());
    let (in_time, steps) = (plan.nodes[ix].in_time, plan.nodes[ix].steps);
    let timing = shared.timing[ix].clone();
    let owner_ix = (ix % input.scope().peers()) as u64;
    let name = format!("{}:{}", wf.nodes[ix].id, wf.nodes[ix].class_type);
    input.unary_frontier::<Cb, _, _, _>(
        Exchange::new(move |_r: &Record| owner_ix),
        &name,
        move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut cap: Option<Capability<u64>> = owner.then(|| cap.delayed(&in_time));
            let mut stash: Vec<Record> = Vec::new();
            let mut running: Option<(Box<dyn Stepper>, Lease)> = None;
            let mut done = 0u32;
            move |(input, frontier), output| {
                input.for_each(|_c, data| stash.append(data));
                if cap.is_none() || frontier.frontier().less_equal(&in_time) {
                    return;
                }
                if shared.stopped() {
                    cap = None;
                    running = None;
                    stash.clear();
                    return;
                }
                let n = &wf.nodes[ix];
                if running.is_none() {
                    let inputs = named_inputs(&wf, ix, &mut stash);
                    let working = plan.nodes[ix].atomic_working_bytes();
                    let lease = match shared.acct.try_lease(working, &format!("node {}", n.id)) {
                        Ok(l) => l,
                        Err(oom) => {
                            cap = None;
                            return shared.fail(ix, NodeError::OutOfMemory(oom.to_string()));
                        }
                    };
                    if steps == 0 {
                        // Atomic: the kernel once, the outputs at the output time.
                        let result = timing.busy(|| {
                            guarded(|| {
                                if n.lifted.is_empty() {
                                    n.node.execute(&n.args, inputs, &ctx)
                                } else {
                                    crate::lift::execute(n, inputs, &ctx)
                                }
                            })
                        });
                        drop(lease);
                        if let Some(c) = cap.take() {
                            let recs = finished(&shared, ix, result);
                            output.session(&c).give_iterator(recs.into_iter());
                        }
                        return;
                    }
                    match timing.busy(|| guarded(|| n.node.start(&n.args, inputs, &ctx))) {
                        Ok(s) => running = Some((s, lease)),
                        Err(e) => {
                            cap = None;
                            return shared.fail(ix, e);
                        }
                    }
                }
                let Some((stepper, _)) = running.as_mut() else {
                    return;
                };
                match timing.busy(|| guarded(|| stepper.step())) {
                    Ok(preview) => {
                        if let Some(p) = preview {
                            shared
                                .previews
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert((ix, done), p);
                        }
                        done += 1;
                    }
                    Err(e) => {
                        cap = None;
                        running = None;
                        return shared.fail(ix, e);
                    }
                }
                if done < steps {
                    // Step `done - 1` is finished: let the frontier pass its time.
                    if let Some(c) = cap.as_mut() {
                        c.downgrade(&(in_time + done as u64));
                    }
                    activator.activate();
                    return;
                }
                if let (Some(c), Some((stepper, lease))) = (cap.take(), running.take()) {
                    let result = timing.busy(|| guarded(|| stepper.finish()));
                    drop(lease);
                    let recs = finished(&shared, ix, result);
                    output.session(&c).give_iterator(recs.into_iter());
                }
            }
        },
    )
}

/// Cuts the whole input into chunk records, chunk `i` at `in_time + i`, keeping at most the
/// plan's in-flight count cut ahead of the chunks the probe has seen finished, so a node never
/// holds all its pieces at once.
#[allow(clippy::too_many_arguments)]
fn split<'s>(
    scope: Scope<'s, u64>,
    input: Recs<'s>,
    ix: usize,
    owner: bool,
    chunking: &Chunking,
    wf: &Arc<ValidatedWorkflow>,
    plan: &Arc<ExecutionPlan>,
    shared: &Arc<Shared>,
    done_probe: &ProbeHandle<u64>,
    weights: WeightContext,
) -> Recs<'s> {
    let in_time = plan.nodes[ix].in_time;
    let (wf, plan, shared, op, which, done_probe) = (
        wf.clone(),
        plan.clone(),
        shared.clone(),
        chunking.op.clone(),
        chunking.input,
        done_probe.clone(),
    );
    let owner_ix = (ix % input.scope().peers()) as u64;
    let total = plan.nodes[ix].chunks.len();
    let ahead = plan.nodes[ix].inflight.clamp(1, total.max(1));
    // A chunk an output node shows is kept until the driver announces it: count it in flight
    // until then.
    let announces =
        !image_output_consumers(&wf, &plan, ix).is_empty() || streams_output(&wf, &plan, ix);
    input.unary_frontier::<Cb, _, _, _>(
        Exchange::new(move |_r: &Record| owner_ix),
        "split",
        move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut cap: Option<Capability<u64>> = owner.then(|| cap.delayed(&in_time));
            let mut stash: Vec<Record> = Vec::new();
            let mut whole: Option<Value> = None;
            let mut next = 0usize;
            let mut op = op.clone();
            move |(input, frontier), output| {
                input.for_each(|_c, data| stash.append(data));
                if cap.is_none() || frontier.frontier().less_equal(&in_time) {
                    return;
                }
                if shared.stopped() {
                    cap = None;
                    whole = None;
                    stash.clear();
                    return;
                }
                if whole.is_none() {
                    // The record on the link the chunking names, with the shape it was planned
                    // for; the other inputs (a model) bind the operator.
                    let mut inputs = named_inputs(&wf, ix, &mut stash);
                    let Some(value) = inputs.take(which) else {
                        cap = None;
                        return shared.fail(ix, NodeError::input(which, "no value arrived"));
                    };
                    match shared.timing[ix].busy(|| guarded(|| op.bind(&inputs, &weights))) {
                        Ok(Some(bound)) => {
                            shared
                                .bound
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(ix, bound.clone());
                            op = bound;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            cap = None;
                            return shared.fail(ix, e);
                        }
                    }
                    let planned = plan.nodes[ix].chunked_input;
                    if planned != Some(value.info()) {
                        cap = None;
                        let msg = format!(
                            "arrived as {:?}, but the plan cut it as {:?}",
                            value.info(),
                            planned
                        );
                        return shared.fail(ix, NodeError::input(which, msg));
                    }
                    // The output buffer (and what the merger holds for the whole run) first:
                    // without it no chunk can be kept.
                    let np = &plan.nodes[ix];
                    let out_bytes = np.outputs.first().and_then(|o| o.bytes()).unwrap_or(0)
                        + guarded(|| Ok(op.merger_memory(&value.info()))).unwrap_or(0);
                    match shared
                        .acct
                        .try_lease(out_bytes, &format!("output of node {}", np.node))
                    {
                        Ok(l) => {
                            shared
                                .output_leases
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(ix, l);
                        }
                        Err(oom) => {
                            cap = None;
                            return shared.fail(ix, NodeError::OutOfMemory(oom.to_string()));
                        }
                    }
                    whole = Some(value);
                }
                // Chunks whose time the probe after the kernel has passed are finished.
                let finished = done_probe.with_frontier(|f| {
                    f.iter()
                        .map(|t| t.saturating_sub(in_time) as usize)
                        .min()
                        .unwrap_or(total)
                });
                let finished = if announces {
                    finished.min(shared.announced[ix].load(Ordering::SeqCst) as usize)
                } else {
                    finished
                };
                let c = cap.as_ref().expect("checked above");
                let source = whole.as_ref().expect("set above");
                let info = plan.nodes[ix].chunked_input.unwrap_or(ValueInfo::Unknown);
                while next < total && next < finished + ahead {
                    let chunk = &plan.nodes[ix].chunks[next];
                    // Set aside the chunk's result and workspace before cutting it. If that
                    // is refused while chunks are in flight, wait for them to return memory;
                    // if none is, cut it anyway and let processing retry it smaller.
                    let mem = guarded(|| Ok(op.chunk_memory(&info, chunk))).unwrap_or_default();
                    let what = format!("chunk {} of node {}", chunk.index, plan.nodes[ix].node);
                    let reserve = match shared.acct.try_lease(mem.result + mem.workspace, &what) {
                        Ok(l) => Some(Arc::new(l)),
                        Err(_) if next > finished => break,
                        Err(_) => None,
                    };
                    match shared.timing[ix].busy(|| guarded(|| op.split(source, chunk))) {
                        Ok(piece) => {
                            let at = c.delayed(&(in_time + chunk.index as u64));
                            output.session(&at).give(Record {
                                port: 0,
                                chunk: chunk.index,
                                value: piece.track(&shared.acct),
                                reserve,
                            });
                        }
                        Err(e) => {
                            cap = None;
                            whole = None;
                            return shared.fail(ix, e);
                        }
                    }
                    next += 1;
                    shared.cut[ix].store(next as u64, Ordering::SeqCst);
                }
                if next < total {
                    // Hold only the time of the next piece, so the probe after the kernel can
                    // pass the chunks in flight as they finish; look again shortly.
                    if let Some(c) = cap.as_mut() {
                        c.downgrade(&(in_time + next as u64));
                    }
                    activator.activate_after(Duration::from_micros(200));
                } else {
                    // Every piece is cut: release the whole input and the capability.
                    whole = None;
                    cap = None;
                }
            }
        },
    )
}

/// Processes chunk records on whichever worker they land, one per activation.
///
/// Memory: a chunk's result and workspace were set aside when its piece was cut; a piece cut
/// without (nothing was in flight to wait for) leases them before the kernel runs, and if that
/// is refused, the chunk is re-run as tiles of half the side (down to the plan's smallest),
/// which read sub-windows of the same piece and so give the same pixels; each such retry is
/// recorded for the driver to announce.
fn process<'s>(
    scope: Scope<'s, u64>,
    pieces: Recs<'s>,
    ix: usize,
    chunking: &Chunking,
    plan: &Arc<ExecutionPlan>,
    shared: &Arc<Shared>,
) -> Recs<'s> {
    let (plan, shared, op) = (plan.clone(), shared.clone(), chunking.op.clone());
    pieces.unary::<Cb, _, _, _>(
        Exchange::new(|r: &Record| r.chunk as u64),
        "process",
        move |_cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut queue: VecDeque<(Capability<u64>, Record)> = VecDeque::new();
            move |input, output| {
                input.for_each(|c, data| {
                    for r in data.drain(..) {
                        if let Some(cap) = c.retain_least(0) {
                            queue.push_back((cap, r));
                        }
                    }
                });
                // One chunk per activation: the frontier, and so the events, move per chunk.
                if let Some((cap, mut r)) = queue.pop_front() {
                    if !shared.stopped() {
                        let reserve = r.reserve.take();
                        let op = shared.op_for(ix, &op);
                        let started = Instant::now();
                        let done = process_chunk(&plan, &shared, op.as_ref(), ix, &r, reserve);
                        account_chunk(&shared.timing[ix], &done, started.elapsed());
                        // The piece is no longer needed once its chunk is computed.
                        let chunk = r.chunk;
                        drop(r);
                        match done {
                            Ok(value) => output.session(&cap).give(Record {
                                port: 0,
                                chunk,
                                value: value.track(&shared.acct),
                                reserve: None,
                            }),
                            Err(e) => shared.fail(ix, e),
                        }
                    }
                }
                if !queue.is_empty() {
                    activator.activate();
                }
            }
        },
    )
}

/// Counts a processed chunk's time: a window replayed from the temporal cache is replay,
/// anything else the operator's own time.
fn account_chunk(timing: &NodeTiming, done: &Result<Value, NodeError>, took: Duration) {
    let replayed = matches!(done, Ok(Value::Video(v))
        if v.source().as_memory().is_some_and(|w| w.cached));
    if replayed {
        timing.add_replay(took);
        timing.enter(Lifecycle::CachedReplay);
    } else {
        timing.add_busy(took);
        timing.leave_replay();
    }
}

/// Runs one chunk under a memory lease, subdividing it while the lease is refused.
fn process_chunk(
    plan: &ExecutionPlan,
    shared: &Shared,
    op: &dyn ChunkedOp,
    ix: usize,
    r: &Record,
    reserve: Option<Arc<Lease>>,
) -> Result<Value, NodeError> {
    let np = &plan.nodes[ix];
    let spec: ChunkSpec = *np
        .chunks
        .get(r.chunk as usize)
        .ok_or_else(|| NodeError::Other(format!("chunk {} is not in the plan", r.chunk)))?;
    let info = np.chunked_input.unwrap_or(ValueInfo::Unknown);
    let full = guarded(|| Ok(op.chunk_memory(&info, &spec)))?;
    if let Some(reserve) = reserve {
        // Memory was set aside when the piece was cut; it returns as the result is counted.
        let out = guarded(|| op.process(&info, &spec, &r.value));
        drop(reserve);
        return out;
    }
    let what = format!("chunk {} of node {}", r.chunk, np.node);
    let mut side = np.tile.unwrap_or(0);
    let min = plan.min_tile;
    let mut subs = vec![spec];
    loop {
        // A subdivided chunk holds its whole result plus one sub-chunk's result and workspace.
        let need = if subs.len() > 1 {
            let worst = subs
                .iter()
                .map(|s| op.chunk_memory(&info, s))
                .map(|m| m.result + m.workspace)
                .max()
                .unwrap_or(0);
            full.result + worst
        } else {
            full.result + full.workspace
        };
        match shared.acct.try_lease(need, &what) {
            Ok(lease) => {
                let out = if subs.len() > 1 {
                    guarded(|| op.process_subdivided(&info, &spec, &r.value, &subs))
                } else {
                    guarded(|| op.process(&info, &spec, &r.value))
                };
                drop(lease);
                return out;
            }
            Err(oom) => {
                let smaller = side / 2;
                if side == 0 || smaller < min {
                    return Err(NodeError::OutOfMemory(oom.to_string()));
                }
                let next = op.subdivide(
                    &spec,
                    ChunkSize::Tile {
                        width: smaller,
                        height: smaller,
                    },
                );
                shared
                    .retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Retry {
                        node: ix,
                        chunk: r.chunk,
                        from: side,
                        to: smaller,
                        reason: oom.to_string(),
                    });
                shared.retry_count.fetch_add(1, Ordering::SeqCst);
                side = smaller;
                subs = next;
            }
        }
    }
}

/// Assembles processed chunks as they arrive, and emits the output once the frontier passes
/// the node's output time.
///
/// Memory: the output buffer, leased by the split before its first piece, passes to the
/// output value; each chunk's memory returns as soon as it is pasted.
#[allow(clippy::too_many_arguments)]
fn merge<'s>(
    done: Recs<'s>,
    ix: usize,
    owner_ix: u64,
    owner: bool,
    out_time: u64,
    chunking: &Chunking,
    plan: &Arc<ExecutionPlan>,
    shared: &Arc<Shared>,
) -> Recs<'s> {
    let (plan, shared, op) = (plan.clone(), shared.clone(), chunking.op.clone());
    done.unary_frontier::<Cb, _, _, _>(
        Exchange::new(move |_r: &Record| owner_ix),
        "merge",
        move |cap, _info| {
            let mut cap: Option<Capability<u64>> = owner.then(|| cap.delayed(&out_time));
            let mut merger: Option<(Box<dyn Merger>, Lease)> = None;
            let mut failed = false;
            move |(input, frontier), output| {
                let np = &plan.nodes[ix];
                let info = np.outputs.first().copied().unwrap_or(ValueInfo::Unknown);
                input.for_each(|_c, data| {
                    for r in data.drain(..) {
                        if failed || shared.stopped() {
                            continue;
                        }
                        if merger.is_none() {
                            let input = np.chunked_input.unwrap_or(ValueInfo::Unknown);
                            let bytes = info.bytes().unwrap_or(0)
                                + guarded(|| Ok(op.merger_memory(&input))).unwrap_or(0);
                            let what = format!("output of node {}", np.node);
                            let reserved = shared
                                .output_leases
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&ix);
                            let made = match reserved {
                                Some(l) => Ok(l),
                                None => shared
                                    .acct
                                    .try_lease(bytes, &what)
                                    .map_err(|oom| NodeError::OutOfMemory(oom.to_string())),
                            }
                            .and_then(|l| {
                                shared.timing[ix]
                                    .busy(|| guarded(|| op.merger(&info)))
                                    .map(|m| (m, l))
                            });
                            match made {
                                Ok(m) => merger = Some(m),
                                Err(e) => {
                                    failed = true;
                                    shared.fail(ix, e);
                                    continue;
                                }
                            }
                        }
                        let (m, _) = merger.as_mut().expect("made above");
                        let spec = np.chunks.get(r.chunk as usize).copied();
                        let added = match spec {
                            Some(spec) => {
                                shared.timing[ix].busy(|| guarded(|| m.add(&spec, r.value)))
                            }
                            None => Err(NodeError::Other(format!(
                                "chunk {} is not in the plan",
                                r.chunk
                            ))),
                        };
                        if let Err(e) = added {
                            failed = true;
                            shared.fail(ix, e);
                        }
                    }
                });
                if cap.is_none() || frontier.frontier().less_equal(&out_time) {
                    return;
                }
                let cap = cap.take().expect("checked above");
                let Some((m, lease)) = merger.take() else {
                    return;
                };
                if failed || shared.stopped() {
                    return;
                }
                // Every chunk is in: the bound operator (and the weights it holds) can go.
                shared
                    .bound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&ix);
                match shared.timing[ix].busy(|| guarded(|| m.finish_output())) {
                    Ok(out) => {
                        if let Some(ui) = out.ui {
                            shared
                                .ui
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(ix, ui);
                        }
                        shared.mark_ran(ix);
                        let value = out
                            .values
                            .into_iter()
                            .next()
                            .unwrap_or(Value::Boolean(true));
                        output.session(&cap).give(Record {
                            port: 0,
                            chunk: 0,
                            value: value.with_lease(lease),
                            reserve: None,
                        })
                    }
                    Err(e) => shared.fail(ix, e),
                }
            }
        },
    )
}

/// Whether node `ix` is an output node that consumes a stream window by window: its own
/// windows (chunks) are announced as partial outputs.
fn streams_output(wf: &ValidatedWorkflow, plan: &ExecutionPlan, ix: usize) -> bool {
    plan.nodes[ix].mode == ExecMode::Streamed && wf.nodes[ix].node.schema().output_node
}

/// The output nodes that consume node `ix`'s first output as an image: the nodes its chunks
/// are announced to as partial outputs.
fn image_output_consumers(wf: &ValidatedWorkflow, plan: &ExecutionPlan, ix: usize) -> Vec<usize> {
    if !matches!(plan.nodes[ix].outputs.first(), Some(ValueInfo::Image(_))) {
        return Vec::new();
    }
    wf.consumers(ix)
        .iter()
        .copied()
        .filter(|&c| {
            wf.nodes[c].node.schema().output_node
                && wf.nodes[c]
                    .links
                    .iter()
                    .any(|l| l.from == ix && l.output == 0)
        })
        .collect()
}

/// Per-node progress as the driver has announced it.
struct Seen {
    started: Option<Instant>,
    chunks_done: u32,
    ended: Option<f64>,
}

/// Worker 0's event source: compares probes with the plan's times after every step.
struct Driver {
    wf: Arc<ValidatedWorkflow>,
    plan: Arc<ExecutionPlan>,
    shared: Arc<Shared>,
    emitter: Arc<Emitter>,
    seen: Vec<Seen>,
    /// For each node, the output nodes (and the input link) that consume its port 0 image.
    output_consumers: Vec<Vec<usize>>,
    done_chunks: u64,
    total_chunks: u64,
    running: bool,
    streaming: bool,
    finalizing: bool,
}

impl Driver {
    fn new(
        wf: &Arc<ValidatedWorkflow>,
        plan: &Arc<ExecutionPlan>,
        shared: &Arc<Shared>,
        emitter: &Arc<Emitter>,
    ) -> Driver {
        let output_consumers = (0..wf.nodes.len())
            .map(|ix| image_output_consumers(wf, plan, ix))
            .collect();
        Driver {
            wf: wf.clone(),
            plan: plan.clone(),
            shared: shared.clone(),
            emitter: emitter.clone(),
            seen: wf
                .nodes
                .iter()
                .map(|_| Seen {
                    started: None,
                    chunks_done: 0,
                    ended: None,
                })
                .collect(),
            output_consumers,
            done_chunks: 0,
            total_chunks: plan.total_chunks(),
            running: false,
            streaming: false,
            finalizing: false,
        }
    }

    fn poll(&mut self, probes: &[NodeProbes]) {
        // After a stop, frontiers also pass nodes that never ran: report only those that did.
        let stopped = self.shared.stopped();
        if stopped && !self.running {
            return;
        }
        if !self.running {
            self.running = true;
            *self
                .shared
                .startup_ms
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(self.emitter.elapsed_ms());
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::Running,
                node: None,
            });
        }
        emit_residency(&self.shared, &self.emitter);

        for ix in 0..self.wf.nodes.len() {
            if self.seen[ix].ended.is_some() || (stopped && !self.shared.has_run(ix)) {
                continue;
            }
            let wf = self.wf.clone();
            let plan = self.plan.clone();
            let n = &wf.nodes[ix];
            let p = &plan.nodes[ix];
            if self.seen[ix].started.is_none() {
                // Inputs complete, and the previous node done (nodes run in plan order).
                let after_previous =
                    ix == 0 || !probes[ix - 1].out.less_equal(&plan.nodes[ix - 1].out_time);
                let ready = after_previous
                    && n.links
                        .iter()
                        .all(|l| !probes[l.from].out.less_equal(&plan.nodes[l.from].out_time));
                if !ready {
                    continue;
                }
                self.seen[ix].started = Some(Instant::now());
                self.shared.acct.take_window_peak();
                self.emitter.emit(EventKind::NodeStart {
                    node: n.id.0.clone(),
                    class_type: n.class_type.to_string(),
                    mode: p.mode,
                    chunks: p.chunk_count(),
                    steps: (p.steps > 0).then_some(p.steps),
                });
            }
            self.announce_phases(ix);
            // Retries of this node's chunks, before the chunk events they delayed.
            let retries: Vec<Retry> = {
                let mut all = self
                    .shared
                    .retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let (mine, rest) = all.drain(..).partition(|r| r.node == ix);
                *all = rest;
                mine
            };
            for r in retries {
                self.emitter.emit(EventKind::Retry {
                    node: n.id.0.clone(),
                    chunk: r.chunk,
                    tile_from: r.from,
                    tile_to: r.to,
                    reason: r.reason,
                });
            }
            let count = p.chunk_count();
            while self.seen[ix].chunks_done < count
                && !probes[ix]
                    .chunk
                    .less_equal(&(p.in_time + self.seen[ix].chunks_done as u64))
            {
                let chunk = self.seen[ix].chunks_done;
                self.seen[ix].chunks_done += 1;
                self.done_chunks += 1;
                if p.steps > 0 {
                    self.announce_step(ix, chunk);
                    continue;
                }
                let rect = p.chunks.get(chunk as usize).and_then(|c| c.rect());
                self.emitter.emit(EventKind::Chunk {
                    node: n.id.0.clone(),
                    chunk,
                    chunks: count,
                    rect,
                    progress: Progress {
                        value: self.done_chunks,
                        max: self.total_chunks,
                    },
                    tracked_bytes: self.shared.acct.current().0,
                });
                self.announce_partial(ix, chunk);
            }
            if self.seen[ix].chunks_done == count && !probes[ix].out.less_equal(&p.out_time) {
                let wall = self.seen[ix]
                    .started
                    .map(|s| s.elapsed().as_secs_f64() * 1e3)
                    .unwrap_or(0.0);
                self.seen[ix].ended = Some(wall);
                self.announce_phases(ix);
                self.emitter.emit(EventKind::NodeEnd {
                    node: n.id.0.clone(),
                    class_type: n.class_type.to_string(),
                    wall_ms: wall,
                    chunks: count,
                    timing: self.shared.timing[ix].split(),
                    tracked_peak_bytes: self.shared.acct.take_window_peak().0,
                });
                if n.node.schema().output_node {
                    let ui = self
                        .shared
                        .ui
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&ix)
                        .cloned();
                    self.emitter.emit(EventKind::Executed {
                        node: n.id.0.clone(),
                        output: ui.unwrap_or(Json::Null),
                    });
                }
            }
        }
        if !stopped
            && !self.finalizing
            && self
                .seen
                .iter()
                .enumerate()
                .all(|(ix, s)| s.ended.is_some() || self.wf.nodes[ix].node.schema().output_node)
        {
            self.finalizing = true;
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::Finalizing,
                node: None,
            });
        }
    }

    /// Announces the phases node `ix` entered since the last poll.
    fn announce_phases(&mut self, ix: usize) {
        for state in self.shared.timing[ix].take_phases() {
            self.emitter.emit(EventKind::Lifecycle {
                state,
                node: Some(self.wf.nodes[ix].id.0.clone()),
            });
        }
    }

    /// Announces step `step` (0-based) of iterative node `ix`, and its preview if it made one.
    fn announce_step(&mut self, ix: usize, step: u32) {
        let node = self.wf.nodes[ix].id.0.clone();
        let steps = self.plan.nodes[ix].steps;
        self.emitter.emit(EventKind::Step {
            node: node.clone(),
            step: step + 1,
            steps,
            progress: Progress {
                value: self.done_chunks,
                max: self.total_chunks,
            },
        });
        let preview = self
            .shared
            .previews
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ix, step));
        if let Some(p) = preview {
            let (width, height) = p
                .image
                .info()
                .image()
                .map(|i| (i.width, i.height))
                .unwrap_or((0, 0));
            self.emitter.emit_with(
                EventKind::Preview {
                    node,
                    step: step + 1,
                    steps,
                    method: p.method.to_string(),
                    width,
                    height,
                },
                Some(p.image),
            );
        }
    }

    /// Announces window or chunk `chunk` of a streamed output node `ix`.
    fn announce_stream(&mut self, ix: usize, chunk: u32) {
        let value = self
            .shared
            .captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ix, chunk));
        self.shared.announced[ix].fetch_max(chunk as u64 + 1, Ordering::SeqCst);
        let p = &self.plan.nodes[ix];
        let Some(spec) = p.chunks.get(chunk as usize) else {
            return;
        };
        if !self.streaming {
            self.streaming = true;
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::StreamingPartial,
                node: None,
            });
        }
        let node = self.wf.nodes[ix].id.0.clone();
        let cut = self.shared.cut[ix].load(Ordering::SeqCst) as u32;
        match (spec.region, p.chunked_input) {
            (
                crate::chunk::ChunkRegion::Frames {
                    out_start,
                    out_next,
                    ..
                },
                Some(ValueInfo::Video(shape)),
            ) => {
                // The window's own frames that are final now: up to where the next begins.
                let window = value
                    .as_ref()
                    .and_then(|v| v.as_video().and_then(|s| s.source().as_memory().cloned()));
                let keep = out_next.saturating_sub(out_start) as usize;
                let (pts_start, pts_end, cached) = window.as_ref().map_or((0.0, 0.0, false), |w| {
                    let last = keep.min(w.len()).saturating_sub(1);
                    (
                        w.pts.first().copied().unwrap_or(0.0),
                        w.pts.get(last).copied().unwrap_or(0.0),
                        w.cached,
                    )
                });
                let frames = window.and_then(|w| {
                    let n = keep.min(w.len());
                    w.frames
                        .narrow(0, 0, n)
                        .ok()
                        .map(Value::image)
                        .and_then(|v| v.to_host().ok())
                });
                self.emitter.emit_with(
                    EventKind::PartialVideo {
                        node,
                        window: chunk,
                        windows: p.chunk_count(),
                        frame_start: out_start,
                        frame_count: keep as u64,
                        pts_start,
                        pts_end,
                        width: shape.out.width,
                        height: shape.out.height,
                        fps: shape.out.fps(),
                        windows_decoded: cut,
                        cached,
                    },
                    frames,
                );
            }
            (crate::chunk::ChunkRegion::Samples { start, len }, Some(ValueInfo::Audio(meta))) => {
                self.emitter.emit_with(
                    EventKind::PartialAudio {
                        node,
                        chunk,
                        chunks: p.chunk_count(),
                        sample_start: start,
                        sample_count: len,
                        sample_rate: meta.sample_rate,
                        channels: meta.channels,
                        chunks_decoded: cut,
                    },
                    value,
                );
            }
            _ => {}
        }
    }

    /// Announces chunk `chunk` of node `ix` as a partial output of each output node it feeds.
    fn announce_partial(&mut self, ix: usize, chunk: u32) {
        if streams_output(&self.wf, &self.plan, ix) {
            return self.announce_stream(ix, chunk);
        }
        if self.output_consumers[ix].is_empty() {
            return;
        }
        let value = self
            .shared
            .captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ix, chunk));
        // Event consumers get a host copy: what they keep is not device memory of this run.
        let host = value.as_ref().and_then(|v| v.to_host().ok());
        drop(value);
        self.shared.announced[ix].fetch_max(chunk as u64 + 1, Ordering::SeqCst);
        let p = &self.plan.nodes[ix];
        let (width, height) = match p.outputs.first() {
            Some(ValueInfo::Image(i)) => (i.width, i.height),
            _ => host
                .as_ref()
                .and_then(|v| v.info().image())
                .map(|i| (i.width, i.height))
                .unwrap_or((0, 0)),
        };
        let tile = p
            .chunks
            .get(chunk as usize)
            .and_then(|c| c.rect())
            .unwrap_or(crate::chunk::Rect::new(0, 0, width, height));
        if !self.streaming {
            self.streaming = true;
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::StreamingPartial,
                node: None,
            });
        }
        for &c in &self.output_consumers[ix] {
            self.emitter.emit_with(
                EventKind::PartialImage {
                    node: self.wf.nodes[c].id.0.clone(),
                    source_node: self.wf.nodes[ix].id.0.clone(),
                    tile,
                    tile_index: chunk,
                    tiles: p.chunk_count(),
                    width,
                    height,
                },
                host.clone(),
            );
        }
    }

    fn stats(&self) -> Vec<NodeStats> {
        self.wf
            .nodes
            .iter()
            .zip(self.plan.nodes.iter())
            .zip(self.seen.iter())
            .enumerate()
            .map(|(ix, ((n, p), s))| NodeStats {
                node: n.id.0.clone(),
                class_type: n.class_type.to_string(),
                mode: p.mode,
                chunks: p.chunk_count(),
                wall_ms: s.ended.unwrap_or(0.0),
                timing: self.shared.timing[ix].split(),
            })
            .collect()
    }
}
