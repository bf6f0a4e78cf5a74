//! Running a planned job: installs its dataflow ([`crate::compute`]) on the process's
//! long-lived runtime with its driver ([`crate::driver`]) on the control worker, and waits for
//! the result. Events flow to the job's emitter as the driver derives them.

use crate::compute::build::{build, Built};
use crate::compute::runtime::{Install, Installed, Runtime};
pub use crate::compute::CancelToken;
use crate::compute::JobCompute;
use crate::driver::Driver;
use crate::event::{Emitter, EventKind, MemoryForecast};
use crate::memory::{Accountant, Bytes};
use crate::node::{JobEnv, NodeError};
use crate::plan::ExecutionPlan;
use crate::schema::ExecMode;
use crate::timing::TimeSplit;
use crate::workflow::ValidatedWorkflow;
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex};

/// How to run a job. The worker count and the memory limit come from the plan, which was
/// fitted to them.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The job's id in events.
    pub job_id: String,
    pub cancel: CancelToken,
    /// The device budget (headroom included), reported with the job's end.
    pub budget: Option<Bytes>,
    /// The runtime to run on; `None`: the process's runtime with the plan's worker count
    /// ([`Runtime::global`]).
    pub runtime: Option<Runtime>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            job_id: "job".into(),
            cancel: CancelToken::new(),
            budget: None,
            runtime: None,
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

/// One worker's view of an installed job: its probes and, on the control worker, its driver.
struct OnWorker {
    built: Built,
    driver: Option<Driver>,
    result: Option<mpsc::SyncSender<Result<RunReport, RunError>>>,
}

impl Installed for OnWorker {
    fn poll(&mut self) -> bool {
        if let Some(d) = self.driver.as_mut() {
            d.poll(&self.built.probes, &self.built.inbox);
        }
        let done = self.built.probes.iter().all(|p| p.done());
        if done {
            if let (Some(d), Some(tx)) = (self.driver.take(), self.result.take()) {
                let _ = tx.send(d.finish(&self.built.probes, &self.built.inbox));
            }
        }
        done
    }
}

/// Runs a planned workflow to completion, emitting events through `emitter`.
///
/// Emits the forecast and `lifecycle: running` onwards; the caller emits `planning` (it
/// planned) and gets the final event emitted here. Returns once the job is done on every
/// worker.
pub fn run(
    wf: Arc<ValidatedWorkflow>,
    plan: Arc<ExecutionPlan>,
    env: JobEnv,
    opts: RunOptions,
    emitter: Arc<Emitter>,
) -> Result<RunReport, RunError> {
    let runtime = match opts.runtime.clone() {
        Some(r) => r,
        None => Runtime::global(plan.workers).map_err(|e| RunError::Runtime(e.to_string()))?,
    };
    let acct = match plan.limit_bytes {
        Some(l) => Accountant::new(Bytes(l)),
        None => Accountant::unlimited(),
    };
    emitter.emit(EventKind::MemoryForecast(MemoryForecast::of(
        &plan,
        opts.budget.map(|b| b.0),
    )));
    let job = Arc::new(JobCompute::new(wf, plan, env, acct, opts.cancel.clone()));
    let (tx, rx) = mpsc::sync_channel(1);
    let tx = Mutex::new(Some(tx));
    let budget = opts.budget.map(|b| b.0);
    let install: Arc<Install> = {
        let job = job.clone();
        let emitter = emitter.clone();
        Arc::new(move |worker: &mut timely::worker::Worker| {
            let built = worker.dataflow::<u64, _, _>(|scope| build(scope, &job));
            let control = worker.index() == 0;
            Box::new(OnWorker {
                built,
                driver: control.then(|| Driver::new(&job, &emitter, budget)),
                result: if control {
                    tx.lock().unwrap_or_else(|p| p.into_inner()).take()
                } else {
                    None
                },
            }) as Box<dyn Installed>
        })
    };
    let outcome = runtime
        .install(install)
        .and_then(|()| runtime.wait(&rx))
        .map_err(|e| RunError::Runtime(e.to_string()));
    match outcome {
        Ok(result) => result,
        Err(e) => {
            emitter.emit(EventKind::Error {
                node_id: None,
                node_type: None,
                message: e.to_string(),
                memory: None,
            });
            Err(e)
        }
    }
}
