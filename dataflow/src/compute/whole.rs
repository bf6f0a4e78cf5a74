//! The operator of a node that runs on whole values: atomic (the kernel once) or iterative
//! (one step per activation, each at its own time).

use super::record::{NoteKind, Rec, Record};
use super::{JobCompute, Notes};
use crate::node::memory::Lease;
use crate::node::value::Value;
use crate::node::{guarded, Inputs, NodeError, NodeOutput, Stepper};
use std::sync::Arc;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::{Scope, Stream};

pub(crate) type Recs<'s> = Stream<'s, u64, Vec<Record>>;
pub(crate) type Out<'s> = Stream<'s, u64, Vec<Rec>>;
pub(crate) type Cb = CapacityContainerBuilder<Vec<Rec>>;

/// Collects stashed input records into named inputs.
pub(crate) fn named_inputs(job: &JobCompute, ix: usize, stash: &mut Vec<Record>) -> Inputs<Value> {
    let mut inputs = Inputs::new();
    for r in stash.drain(..) {
        if let Some(l) = job.wf.nodes[ix].links.get(r.port as usize) {
            inputs.insert(l.input, r.value);
        }
    }
    inputs
}

/// A node's outputs as tracked records and its `Ran` note; for a failure, its note (and the
/// job stops).
pub(crate) fn finished(
    job: &JobCompute,
    ix: usize,
    result: Result<NodeOutput, NodeError>,
    notes: &mut Notes,
) -> Vec<Rec> {
    match result {
        Ok(out) => {
            notes.push(ix, NoteKind::Ran { ui: out.ui });
            out.values
                .into_iter()
                .enumerate()
                .map(|(port, value)| Rec::Data(Record::value(port as u32, value.track(&job.acct))))
                .collect()
        }
        Err(e) => {
            job.halt();
            notes.push(ix, NoteKind::Failed(e));
            Vec::new()
        }
    }
}

/// A node that runs whole: waits for all inputs, then runs.
///
/// - An atomic node runs its kernel once and emits all outputs at the output time.
/// - An iterative node starts, then runs one step per activation, step `i` at time
///   `in_time + i`, downgrading its capability after each so the frontier passes step by step;
///   the outputs come at the last step's time (the output time). A step's preview leaves as a
///   note at the step's time.
///
/// Memory: before the kernel (or the first step) runs it leases the node's forecast working
/// set (outputs and workspace), held until the node finishes (a sampler keeps its latent and
/// activations across steps); the outputs then carry leases of their own.
pub(crate) fn whole<'s>(
    scope: Scope<'s, u64>,
    input: Recs<'s>,
    ix: usize,
    owner_ix: u64,
    job: &Arc<JobCompute>,
) -> Out<'s> {
    let job = job.clone();
    let np = &job.plan.nodes[ix];
    let (in_time, steps) = (np.in_time, np.steps);
    let owner = scope.index() as u64 == owner_ix;
    let name = format!("{}:{}", job.wf.nodes[ix].id, job.wf.nodes[ix].class_type);
    input.unary_frontier::<Cb, _, _, _>(
        Exchange::new(move |_r: &Record| owner_ix),
        &name,
        move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut cap: Option<Capability<u64>> = owner.then(|| cap.delayed(&in_time));
            let mut stash: Vec<Record> = Vec::new();
            let mut running: Option<(Box<dyn Stepper>, Lease)> = None;
            let mut done = 0u32;
            let ctx = job.context(ix);
            move |(input, frontier), output| {
                input.for_each(|_c, data| stash.append(data));
                if cap.is_none() || frontier.frontier().less_equal(&in_time) {
                    return;
                }
                if job.stopped() {
                    cap = None;
                    running = None;
                    stash.clear();
                    return;
                }
                let mut notes = Notes::default();
                let n = &job.wf.nodes[ix];
                // A failure: its note at the current time, and the job stops.
                macro_rules! fail {
                    ($e:expr) => {{
                        job.halt();
                        notes.push(ix, NoteKind::Failed($e));
                        if let Some(c) = cap.take() {
                            output
                                .session(&c)
                                .give_iterator(notes.drain(&job, ix).into_iter());
                        }
                        return;
                    }};
                }
                if running.is_none() {
                    let inputs = named_inputs(&job, ix, &mut stash);
                    let working = job.plan.nodes[ix].atomic_working_bytes();
                    let lease = match job.acct.try_lease(working, &format!("node {}", n.id)) {
                        Ok(l) => l,
                        Err(oom) => fail!(NodeError::OutOfMemory(oom.to_string())),
                    };
                    if steps == 0 {
                        // Atomic: the kernel once, the outputs at the output time.
                        let result = notes.busy(|| {
                            guarded(|| {
                                if n.streamed_batch {
                                    n.node.execute_streamed(&n.args, inputs, &ctx)
                                } else if n.lifted.is_empty() {
                                    n.node.execute(&n.args, inputs, &ctx)
                                } else {
                                    crate::control::lift::execute(n, inputs, &ctx)
                                }
                            })
                        });
                        drop(lease);
                        if let Some(c) = cap.take() {
                            let mut recs = finished(&job, ix, result, &mut notes);
                            recs.extend(notes.drain(&job, ix));
                            output.session(&c).give_iterator(recs.into_iter());
                        }
                        return;
                    }
                    match notes.busy(|| guarded(|| n.node.start(&n.args, inputs, &ctx))) {
                        Ok(s) => running = Some((s, lease)),
                        Err(e) => fail!(e),
                    }
                }
                let Some((stepper, _)) = running.as_mut() else {
                    return;
                };
                match notes.busy(|| guarded(|| stepper.step())) {
                    Ok(preview) => {
                        if let Some(p) = preview {
                            notes.push(
                                ix,
                                NoteKind::Preview {
                                    step: done,
                                    image: p.image,
                                    method: p.method.to_string(),
                                },
                            );
                        }
                        done += 1;
                    }
                    Err(e) => {
                        running = None;
                        fail!(e)
                    }
                }
                if done < steps {
                    // Step `done - 1` is finished: its notes at its time, then let the
                    // frontier pass it.
                    if let Some(c) = cap.as_mut() {
                        output
                            .session(&*c)
                            .give_iterator(notes.drain(&job, ix).into_iter());
                        c.downgrade(&(in_time + done as u64));
                    }
                    activator.activate();
                    return;
                }
                if let (Some(c), Some((stepper, lease))) = (cap.take(), running.take()) {
                    let result = notes.busy(|| guarded(|| stepper.finish()));
                    drop(lease);
                    let mut recs = finished(&job, ix, result, &mut notes);
                    recs.extend(notes.drain(&job, ix));
                    output.session(&c).give_iterator(recs.into_iter());
                }
            }
        },
    )
}
