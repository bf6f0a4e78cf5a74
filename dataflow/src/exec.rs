//! Running a planned job: installs its dataflow ([`crate::compute`]) on the process's
//! long-lived runtime with its driver ([`crate::telemetry::driver`]) on the control worker, and waits for
//! the result. Events flow to the job's emitter as the driver derives them.

use crate::compute::build::{build, Built};
use crate::compute::runtime::{Install, Installed, Runtime};
pub use crate::compute::CancelToken;
use crate::compute::JobCompute;
use crate::control::plan::ExecutionPlan;
use crate::control::workflow::ValidatedWorkflow;
use crate::node::memory::{Accountant, Bytes};
use crate::node::JobEnv;
use crate::telemetry::driver::Driver;
use crate::telemetry::event::{Emitter, EventKind, MemoryForecast};
pub use crate::telemetry::report::{NodeStats, RunError, RunReport};
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
