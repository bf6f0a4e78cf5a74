//! Building one job's dataflow on one worker, from the plan: every worker builds the same
//! operators in the same order, so their identities agree.

use super::chunked::{
    exit, pieces as piece_op, process_kernel, side_inputs, Exit, ExitLease, Kernel,
};
use super::pipeline::{cut, stage_kernel, Entry};
use super::record::{Note, NoteKind, Rec, Record};
use super::runtime::compute_worker;
use super::whole::{whole, Cb, Out, Recs};
use super::JobCompute;
use crate::control::plan::UnitKind;
use crate::node::value::ValueInfo;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concatenate, OkErr, Operator, Probe};
use timely::dataflow::{ProbeHandle, Scope, Stream};

/// Notes of every node, as they reach the control worker: per node, `(time, note)`.
pub(crate) type Inbox = Rc<RefCell<Vec<Vec<(u64, NoteKind)>>>>;

/// What a worker keeps of a built job: per node, the probe of its notes (on the control
/// worker, the note's arrival; everywhere, the node's progress), and the notes themselves.
pub(crate) struct Built {
    pub probes: Vec<ProbeHandle<u64>>,
    pub inbox: Inbox,
}

type Notes<'s> = Stream<'s, u64, Vec<Note>>;

/// Splits an operator's output into its data and its notes (one operator, nothing cloned).
// The `Result` only routes each record to one of two outputs; a note is no error.
#[allow(clippy::result_large_err)]
fn parts<'s>(out: Out<'s>) -> (Recs<'s>, Notes<'s>) {
    out.ok_err(|r: Rec| match r {
        Rec::Data(d) => Ok(d),
        Rec::Note(n) => Err(n),
    })
}

/// A stream that carries only the completion of `s` (a gate).
fn gate<'s>(s: &Recs<'s>) -> Recs<'s> {
    s.clone().flat_map(|_r: Record| None)
}

/// Builds the job's dataflow on this worker.
pub(crate) fn build<'s>(scope: Scope<'s, u64>, job: &Arc<JobCompute>) -> Built {
    let wf = job.wf.clone();
    let plan = job.plan.clone();
    let peers = scope.peers();
    let count = wf.nodes.len();
    // Per node: the stream of its whole outputs (for nodes other nodes read).
    let mut outputs: Vec<Option<Recs<'s>>> = (0..count).map(|_| None).collect();
    // Per node: its operators' notes.
    let mut notes: Vec<Vec<Notes>> = (0..count).map(|_| Vec::new()).collect();
    // Per unit: the stream whose completion ends it.
    let mut ends: Vec<Option<Recs>> = (0..plan.units.len()).map(|_| None).collect();
    for (ui, unit) in plan.units.iter().enumerate() {
        // The unit's gate: every unit of the previous wave.
        let gates: Vec<Recs> = plan
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.wave + 1 == unit.wave)
            .filter_map(|(i, _)| ends[i].as_ref().map(gate))
            .collect();
        // The input of node `ix`: producers' streams, filtered to the linked port and tagged
        // by link slot, and the gate.
        let inputs_of = |ix: usize, outputs: &Vec<Option<Recs<'s>>>| -> Vec<(usize, Recs<'s>)> {
            wf.nodes[ix]
                .links
                .iter()
                .enumerate()
                .filter_map(|(slot, l)| {
                    let port = l.output as u32;
                    outputs[l.from].clone().map(|s| {
                        (
                            slot,
                            s.flat_map(move |r: Record| {
                                (r.port == port).then_some(Record {
                                    port: slot as u32,
                                    ..r
                                })
                            }),
                        )
                    })
                })
                .collect()
        };
        let joined = |parts: Vec<Recs<'s>>, extra: &[Recs<'s>]| -> Recs<'s> {
            let all: Vec<Recs> = parts.into_iter().chain(extra.iter().cloned()).collect();
            if all.is_empty() {
                empty(scope)
            } else {
                scope.concatenate(all)
            }
        };
        let first = unit.nodes[0];
        let owner = compute_worker(ui as u64, peers);
        match unit.kind {
            UnitKind::Whole => {
                let ins: Vec<Recs> = inputs_of(first, &outputs)
                    .into_iter()
                    .map(|x| x.1)
                    .collect();
                let input = joined(ins, &gates);
                let out = whole(scope, input, first, owner, job);
                let (data, n) = parts(out);
                notes[first].push(n);
                ends[ui] = Some(data.clone());
                outputs[first] = Some(data);
            }
            UnitKind::Chunked | UnitKind::Pipeline => {
                // Each worker makes its own operators of the nodes (a stream's cutter and
                // merger keep state); a node's side inputs reach every worker.
                let mut ops = Vec::with_capacity(unit.nodes.len());
                for &ix in &unit.nodes {
                    let n = &wf.nodes[ix];
                    let p = &plan.nodes[ix];
                    let mut infos = crate::node::Inputs::new();
                    for (l, info) in n.links.iter().zip(&p.inputs) {
                        infos.insert(l.input, *info);
                    }
                    let Some(c) = n.node.chunked(&n.args, &infos, &job.env) else {
                        // The plan was made from the same node and shapes.
                        unreachable!("node {} was planned chunked but has no chunking", n.id)
                    };
                    // What the plan leaves of the limit: caches across runs may use it.
                    let spare = job.acct.limit().0.saturating_sub(
                        (plan.forecast_peak_bytes as f64 * (1.0 + plan.safety_margin.max(0.0)))
                            .ceil() as u64,
                    );
                    c.op.attach(&job.acct, spare);
                    ops.push(c);
                }
                let last = *unit.nodes.last().expect("a unit has nodes");
                let last_op = ops.last().expect("a unit has nodes").op.clone();
                let exit_bytes = match unit.sink {
                    Some(s) => plan.nodes[s].forecast.working_bytes,
                    None => {
                        let out = plan.nodes[last].outputs.first().copied();
                        let input = plan.nodes[last].chunked_input.unwrap_or(ValueInfo::Unknown);
                        out.and_then(|o| o.bytes()).unwrap_or(0)
                            + crate::node::guarded(|| Ok(last_op.merger_memory(&input)))
                                .unwrap_or(0)
                    }
                };
                let exit_lease: ExitLease = Rc::new(RefCell::new(None));
                let done = ProbeHandle::new();
                let sink_shows = unit.sink.is_some();
                let mut pieces: Option<Recs> = None;
                for (j, &ix) in unit.nodes.iter().enumerate() {
                    let which = ops[j].input;
                    let tagged = inputs_of(ix, &outputs);
                    let last_stage = j + 1 == unit.nodes.len();
                    let captured = last_stage && (sink_shows || shows_image(job, ix))
                        || streams_output(job, ix);
                    let ran_on_last = last_stage && unit.sink.is_some();
                    let out = if j == 0 {
                        let all = joined(tagged.iter().map(|x| x.1.clone()).collect(), &gates);
                        let side = if has_side_inputs(job, ix, which) {
                            side_inputs(all.clone(), ix, which, job)
                        } else {
                            empty(scope)
                        };
                        let op = ops[j].op.clone();
                        let (entry, cutter_ix) = match (unit.kind, unit.source) {
                            (UnitKind::Pipeline, Some(src)) => {
                                let n = &wf.nodes[src];
                                let Some(source) = n.node.source(&n.args, &job.env) else {
                                    unreachable!(
                                        "node {} was planned as a source but has none",
                                        n.id
                                    )
                                };
                                (
                                    Entry::Source {
                                        node: src,
                                        op: source,
                                    },
                                    src,
                                )
                            }
                            (UnitKind::Pipeline, None) => (
                                Entry::Crop {
                                    op: op.clone(),
                                    which,
                                },
                                ix,
                            ),
                            _ => (
                                Entry::Split {
                                    op: op.clone(),
                                    which,
                                },
                                ix,
                            ),
                        };
                        let (kernel, name): (Box<Kernel>, &str) = if unit.kind == UnitKind::Pipeline
                        {
                            (Box::new(stage_kernel), "stage")
                        } else {
                            (Box::new(process_kernel), "process")
                        };
                        let cutter = cut(
                            scope,
                            all,
                            ix,
                            owner,
                            entry,
                            exit_bytes,
                            exit_lease.clone(),
                            done.clone(),
                            job,
                        );
                        let (cut_data, cut_notes) = parts(cutter);
                        notes[cutter_ix].push(cut_notes);
                        piece_op(
                            scope,
                            cut_data,
                            side,
                            ix,
                            op,
                            captured,
                            ran_on_last || !last_stage,
                            name,
                            kernel,
                            job,
                        )
                    } else {
                        // A later stage: its pieces from the stage before, its other inputs
                        // (a model) from their producers.
                        let side_links: Vec<Recs> = tagged
                            .iter()
                            .filter(|(slot, _)| wf.nodes[ix].links[*slot].input != which)
                            .map(|x| x.1.clone())
                            .collect();
                        // Pieces reach a later stage only after the cut passed the gates.
                        let side = if side_links.is_empty() {
                            empty(scope)
                        } else {
                            side_inputs(joined(side_links, &gates), ix, which, job)
                        };
                        let prev = pieces.take().expect("the stage before made pieces");
                        piece_op(
                            scope,
                            prev,
                            side,
                            ix,
                            ops[j].op.clone(),
                            captured,
                            ran_on_last || !last_stage,
                            "stage",
                            Box::new(stage_kernel),
                            job,
                        )
                    };
                    let (data, n) = parts(out);
                    notes[ix].push(n);
                    pieces = Some(data);
                }
                let results = pieces.expect("a unit has stages");
                let end = match unit.sink {
                    Some(s) => {
                        let n = &wf.nodes[s];
                        let p = &plan.nodes[s];
                        let mut infos = crate::node::Inputs::new();
                        for (l, info) in n.links.iter().zip(&p.inputs) {
                            infos.insert(l.input, *info);
                        }
                        let Some(sinking) = n.node.sink(&n.args, &infos, &job.env) else {
                            unreachable!("node {} was planned as a sink but has none", n.id)
                        };
                        let end = Exit::Sink {
                            op: sinking.op,
                            source: last,
                        };
                        let (data, n) = parts(exit(results, s, owner, end, exit_lease, job));
                        notes[s].push(n);
                        data
                    }
                    None => {
                        let (data, n) = parts(exit(
                            results,
                            last,
                            owner,
                            Exit::Merge(last_op),
                            exit_lease,
                            job,
                        ));
                        notes[last].push(n);
                        outputs[last] = Some(data.clone());
                        data
                    }
                };
                let end = end.probe_with(&done);
                ends[ui] = Some(end);
            }
        }
    }
    // Every node's notes, gathered on the control worker, probed there.
    let inbox: Inbox = Rc::new(RefCell::new((0..count).map(|_| Vec::new()).collect()));
    let mut probes = Vec::with_capacity(count);
    for streams in notes {
        let all: Notes = if streams.is_empty() {
            empty(scope)
        } else {
            scope.concatenate(streams)
        };
        let ib = inbox.clone();
        let probe = ProbeHandle::new();
        all.unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|_n: &Note| 0),
            "notes",
            move |_cap, _info| {
                move |input, _output| {
                    input.for_each(|c, data| {
                        let t = c.least().copied().unwrap_or(0);
                        let mut ib = ib.borrow_mut();
                        for n in data.drain(..) {
                            if let Some(list) = ib.get_mut(n.node as usize) {
                                list.push((t, n.kind));
                            }
                        }
                    });
                }
            },
        )
        .probe_with(&probe);
        probes.push(probe);
    }
    Built { probes, inbox }
}

/// Whether node `ix` has linked inputs besides `which` (a model, a mask): they are broadcast
/// to every worker that processes its pieces.
fn has_side_inputs(job: &JobCompute, ix: usize, which: &str) -> bool {
    job.wf.nodes[ix].links.iter().any(|l| l.input != which)
}

/// Whether node `ix`'s first output is an image some output node shows: its chunks are then
/// announced as partial outputs of that node.
pub(crate) fn shows_image(job: &JobCompute, ix: usize) -> bool {
    !image_output_consumers(job, ix).is_empty()
}

/// The output nodes that consume node `ix`'s first output as an image (or take its pieces as
/// a sink): the nodes its chunks are announced to as partial outputs.
pub(crate) fn image_output_consumers(job: &JobCompute, ix: usize) -> Vec<usize> {
    let plan = &job.plan;
    if !matches!(plan.nodes[ix].outputs.first(), Some(ValueInfo::Image(_))) {
        return Vec::new();
    }
    job.wf
        .consumers(ix)
        .iter()
        .copied()
        .filter(|&c| {
            job.wf.nodes[c].node.schema().output_node
                && job.wf.nodes[c]
                    .links
                    .iter()
                    .any(|l| l.from == ix && l.output == 0)
        })
        .collect()
}

/// Whether node `ix` is an output node that consumes a stream window by window: its own
/// windows (chunks) are announced as partial outputs.
pub(crate) fn streams_output(job: &JobCompute, ix: usize) -> bool {
    job.plan.nodes[ix].mode == crate::node::schema::ExecMode::Streamed
        && job.wf.nodes[ix].node.schema().output_node
}

#[allow(dead_code)]
fn _assert_types(_: Cb) {}
