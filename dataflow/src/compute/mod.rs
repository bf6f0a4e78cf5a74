//! The compute plane: a planned job becomes one timely dataflow, installed on every worker of
//! the process's long-lived [`Runtime`].
//!
//! Per unit of the plan ([`crate::control::plan::UnitPlan`]):
//! - **whole**: one operator, owned by one compute worker, that waits until its input
//!   frontier passes the unit's input time, runs the kernel, and emits the outputs at the
//!   output time. An *iterative* node (a sampler) runs one step per activation, step `i` at
//!   time `in_time + i`, downgrading its capability after each, so the frontier after it
//!   passes step by step.
//! - **chunked**: *split* (the owner cuts the whole input into pieces at successive times,
//!   at most the plan's in-flight count ahead of the pieces its exit has finished), *process*
//!   (pieces spread over the compute workers by index, one per activation so the frontier
//!   moves piece by piece; a piece short of memory is re-run as smaller tiles), and an exit:
//!   *merge* (the owner assembles the output) or the output node's *sink* (which takes the
//!   pieces as they come: a PNG written by row bands).
//! - **pipeline region**: *cut* (the owner cuts the region's input once, each piece the part
//!   of the first stage's input it needs), one *stage* operator per node (every worker; a
//!   piece stays on the worker that took it), and the same exits. The memory set aside for a
//!   piece when it was cut travels with it through every stage to the exit.
//!
//! Units of a wave start together; every unit of the next wave waits for them (a gate that
//! carries no data). Nodes bound to side inputs (a model) are bound once per process by the
//! first of their operators that needs it.
//!
//! What operators learn travels as notes on their output streams (see [`record`]); the
//! driver (in [`crate::telemetry::driver`]) gathers each node's notes on the control worker and reads
//! them when the node's probe says they are complete. Operators never call the driver, and
//! nothing flows back from telemetry into compute: pacing reads the probes of the data.
//!
//! A kernel's error or panic is caught, sent as a note, and stops the job: every later
//! operator becomes a no-op, so a failed job drains quickly and fails alone.

pub(crate) mod build;
mod chunked;
mod pipeline;
pub(crate) mod record;
pub mod runtime;
mod whole;

pub use runtime::{Runtime, RuntimeGone};

use crate::control::plan::ExecutionPlan;
use crate::control::workflow::ValidatedWorkflow;
use crate::node::chunk::ChunkedOp;
use crate::node::memory::Accountant;
use crate::node::residency::{DeltaLog, Registry, WeightContext, WeightMode};
use crate::node::{ExecContext, JobEnv, NodeError, NodeId};
use candle_core::Device;
use record::{Note, NoteKind, Rec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

/// A node's operator bound to its side inputs, or why binding failed.
type Bound = Result<Arc<dyn ChunkedOp>, NodeError>;

/// What every operator of one job shares, on every worker of the process.
pub(crate) struct JobCompute {
    pub wf: Arc<ValidatedWorkflow>,
    pub plan: Arc<ExecutionPlan>,
    pub env: JobEnv,
    /// Counts every value, piece and workspace the job holds against its limit.
    pub acct: Arc<Accountant>,
    stop: AtomicBool,
    pub cancel: CancelToken,
    /// Per node: its work log (residency changes, phases, load and transfer time), shared by
    /// its operators, each of which drains it into notes after calling node code.
    pub logs: Vec<DeltaLog>,
    /// Per chunked node: its operator bound to its side inputs (a model), bound once per
    /// process; released when its exit has every piece, so the weights go with the node.
    pub bound: Vec<Mutex<Option<Bound>>>,
    /// When the job was submitted, for its start-up time.
    pub started: Instant,
}

impl JobCompute {
    pub fn new(
        wf: Arc<ValidatedWorkflow>,
        plan: Arc<ExecutionPlan>,
        env: JobEnv,
        acct: Arc<Accountant>,
        cancel: CancelToken,
    ) -> JobCompute {
        let n = wf.nodes.len();
        JobCompute {
            wf,
            plan,
            env,
            acct,
            stop: AtomicBool::new(false),
            cancel,
            logs: (0..n).map(|_| DeltaLog::default()).collect(),
            bound: (0..n).map(|_| Mutex::new(None)).collect(),
            started: Instant::now(),
        }
    }

    /// Whether the job was stopped (a failure or a cancel): operators then do nothing more.
    pub fn stopped(&self) -> bool {
        if self.cancel.is_cancelled() {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.stop.load(Ordering::SeqCst)
    }

    /// Stops the job after a failure.
    pub fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The context node `ix`'s code runs with.
    pub fn context(&self, ix: usize) -> ExecContext {
        let n = &self.wf.nodes[ix];
        ExecContext {
            env: self.env.clone(),
            device: Device::Cpu,
            prompt: Some(self.wf.prompt.clone()),
            node_id: NodeId(n.id.0.clone()),
            weights: WeightContext {
                registry: Registry::global(),
                acct: self.acct.clone(),
                log: self.logs[ix].clone(),
                device: Device::Cpu,
                mode: self.plan.nodes[ix]
                    .weights
                    .mode
                    .unwrap_or(WeightMode::Resident),
            },
        }
    }

    /// Node `ix`'s operator bound to its side inputs, binding it on first use.
    pub fn bound_op(
        &self,
        ix: usize,
        unbound: &Arc<dyn ChunkedOp>,
        side: &crate::node::Inputs<crate::node::value::Value>,
    ) -> Result<Arc<dyn ChunkedOp>, NodeError> {
        let mut cell = self.bound[ix].lock().unwrap_or_else(|p| p.into_inner());
        if cell.is_none() {
            let ctx = self.context(ix);
            let made = crate::node::guarded(|| unbound.bind(side, &ctx.weights))
                .map(|b| b.unwrap_or_else(|| unbound.clone()));
            *cell = Some(made);
        }
        cell.clone().expect("set above")
    }

    /// Drops node `ix`'s bound operator (and the weights it holds).
    pub fn unbind(&self, ix: usize) {
        let taken = self.bound[ix]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(taken);
    }
}

/// Notes an operator collects during one activation, sent under its capability.
#[derive(Default)]
pub(crate) struct Notes {
    pub notes: Vec<Note>,
    busy_ns: u64,
    replay_ns: u64,
}

impl Notes {
    pub fn push(&mut self, node: usize, kind: NoteKind) {
        self.notes.push(Note {
            node: node as u32,
            kind,
        });
    }

    /// Runs `f` as operator time of the node.
    pub fn busy<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.busy_ns += t.elapsed().as_nanos() as u64;
        out
    }

    /// Adds time measured by the caller: replay when the result came from a cache.
    pub fn add(&mut self, took: std::time::Duration, replay: bool) {
        let ns = took.as_nanos() as u64;
        if replay {
            self.replay_ns += ns;
        } else {
            self.busy_ns += ns;
        }
    }

    /// Everything to send for node `ix`: the notes, its time, and its work log's contents.
    pub fn drain(&mut self, job: &JobCompute, ix: usize) -> Vec<Rec> {
        if self.busy_ns > 0 || self.replay_ns > 0 {
            let (busy_ns, replay_ns) = (self.busy_ns, self.replay_ns);
            self.push(ix, NoteKind::Time { busy_ns, replay_ns });
            self.busy_ns = 0;
            self.replay_ns = 0;
        }
        let work = job.logs[ix].take();
        if !work.is_empty() {
            self.push(ix, NoteKind::Work(work));
        }
        self.notes.drain(..).map(Rec::Note).collect()
    }
}
