//! Operators of a node cut into chunks: split, process, and the exits shared with pipeline
//! regions (merge, sink).

use super::record::{NoteKind, Rec, Record};
use super::runtime::compute_worker;
use super::whole::{named_inputs, Cb, Out, Recs};
use super::{JobCompute, Notes};
use crate::node::chunk::{ChunkSize, ChunkSpec, ChunkedOp, Merger, SinkOp};
use crate::node::memory::Lease;
use crate::node::residency::Phase;
use crate::node::value::{Value, ValueInfo};
use crate::node::{guarded, NodeError};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::{ProbeHandle, Scope};

/// The memory an exit holds for the whole unit (the merged output, or a sink's buffers),
/// leased by the unit's cutter before its first piece and handed to the exit on the same
/// worker.
pub(crate) type ExitLease = Rc<RefCell<Option<Lease>>>;

/// How many of a unit's pieces its exit has finished, from the probe after the exit: the
/// pieces whose times the frontier has passed.
pub(crate) fn finished(probe: &ProbeHandle<u64>, in_time: u64, total: usize) -> usize {
    probe.with_frontier(|f| {
        f.iter()
            .map(|t| t.saturating_sub(in_time) as usize)
            .min()
            .unwrap_or(total)
    })
}

/// The side inputs of node `ix` (every linked input but `which`), as records for every
/// worker: each worker that processes pieces binds the node's operator to them.
pub(crate) fn side_inputs<'s>(
    input: Recs<'s>,
    ix: usize,
    which: &'static str,
    job: &JobCompute,
) -> Recs<'s> {
    use timely::dataflow::operators::vec::{Broadcast, Filter};
    let slots: Vec<bool> = job.wf.nodes[ix]
        .links
        .iter()
        .map(|l| l.input != which)
        .collect();
    input
        .filter(move |r: &Record| slots.get(r.port as usize).copied().unwrap_or(false))
        .broadcast()
}

/// What a piece operator does with one piece, with the node's bound operator: the record it
/// sends on (its chunk, value and the reservation it carries on), or why it failed.
pub(crate) type Kernel =
    dyn Fn(&JobCompute, &dyn ChunkedOp, usize, Record, &mut Notes) -> Result<Record, NodeError>;

/// An operator that works piece by piece on whichever compute worker a piece lands (pieces are
/// spread by index, the same way at every stage, so a piece stays where it was taken), one
/// per activation so the frontier, and the events, move per piece, once the node's side
/// inputs are in and its operator is bound to them. Sends each result's host copy as a note
/// when an output node shows it (`captured`), and the node's `Ran` with the last piece when
/// nothing after it does (`ran_on_last`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pieces<'s>(
    scope: Scope<'s, u64>,
    pieces: Recs<'s>,
    side: Recs<'s>,
    ix: usize,
    op: Arc<dyn ChunkedOp>,
    captured: bool,
    ran_on_last: bool,
    name: &str,
    kernel: Box<Kernel>,
    job: &Arc<JobCompute>,
) -> Out<'s> {
    let job = job.clone();
    let peers = scope.peers();
    let in_time = job.plan.nodes[ix].in_time;
    let last = job.plan.nodes[ix].chunks.len().saturating_sub(1) as u32;
    pieces.binary_frontier::<_, Cb, _, _, _, _>(
        side,
        Exchange::new(move |r: &Record| compute_worker(r.chunk as u64, peers)),
        Pipeline,
        name,
        move |_cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut queue: VecDeque<(Capability<u64>, Record)> = VecDeque::new();
            let mut side_stash: Vec<Record> = Vec::new();
            let mut bound: Option<Arc<dyn ChunkedOp>> = None;
            move |(input, _), (side_in, side_frontier), output| {
                input.for_each(|c, data| {
                    for r in data.drain(..) {
                        if let Some(cap) = c.retain_least(0) {
                            queue.push_back((cap, r));
                        }
                    }
                });
                side_in.for_each(|_c, data| side_stash.append(data));
                if queue.is_empty() {
                    return;
                }
                if job.stopped() {
                    queue.clear();
                    bound = None;
                    return;
                }
                if bound.is_none() {
                    if side_frontier.frontier().less_equal(&in_time) {
                        // The side inputs are still on their way: this worker is woken when
                        // they arrive.
                        return;
                    }
                    let side = named_inputs(&job, ix, &mut side_stash);
                    let mut notes = Notes::default();
                    match notes.busy(|| job.bound_op(ix, &op, &side)) {
                        Ok(b) => bound = Some(b),
                        Err(e) => {
                            job.halt();
                            notes.push(ix, NoteKind::Failed(e));
                            let (cap, _) = queue.pop_front().expect("not empty");
                            queue.clear();
                            output
                                .session(&cap)
                                .give_iterator(notes.drain(&job, ix).into_iter());
                            return;
                        }
                    }
                    // The binding's own notes (loading weights) leave with the first piece.
                    let recs = notes.drain(&job, ix);
                    let (cap, _) = queue.front().expect("not empty");
                    output.session(cap).give_iterator(recs.into_iter());
                }
                if let Some((cap, r)) = queue.pop_front() {
                    let op = bound.clone().expect("bound above");
                    let mut notes = Notes::default();
                    let mut recs = Vec::new();
                    match kernel(&job, op.as_ref(), ix, r, &mut notes) {
                        Ok(out) => {
                            if captured {
                                if let Ok(host) = out.value.to_host() {
                                    notes.push(
                                        ix,
                                        NoteKind::Piece {
                                            chunk: out.chunk,
                                            value: host,
                                            done_ms: job.started.elapsed().as_secs_f64() * 1e3,
                                        },
                                    );
                                }
                            }
                            if ran_on_last && out.chunk == last {
                                notes.push(ix, NoteKind::Ran { ui: None });
                            }
                            recs.push(Rec::Data(out));
                        }
                        Err(e) => {
                            job.halt();
                            notes.push(ix, NoteKind::Failed(e));
                        }
                    }
                    recs.extend(notes.drain(&job, ix));
                    output.session(&cap).give_iterator(recs.into_iter());
                }
                if !queue.is_empty() {
                    activator.activate();
                }
            }
        },
    )
}

/// A chunked node's kernel: one chunk from its piece, under the memory set aside when the piece
/// was cut; a piece cut without (nothing was in flight to wait for) leases its result and
/// workspace before the kernel runs, and if that is refused, the chunk is re-run as tiles of
/// half the side (down to the plan's smallest), which read sub-windows of the same piece and so
/// give the same pixels; each such retry leaves a note. A window replayed from the temporal
/// cache counts as replay.
pub(crate) fn process_kernel(
    job: &JobCompute,
    op: &dyn ChunkedOp,
    ix: usize,
    mut r: Record,
    notes: &mut Notes,
) -> Result<Record, NodeError> {
    let reserve = r.reserve.take();
    let started = Instant::now();
    let done = process_chunk(job, op, ix, &r, reserve, notes);
    let replayed = matches!(&done, Ok(Value::Video(v))
        if v.source().as_memory().is_some_and(|w| w.cached));
    notes.add(started.elapsed(), replayed);
    if replayed {
        job.logs[ix].enter(Phase::CachedReplay);
    } else {
        job.logs[ix].leave_replay();
    }
    // The piece is no longer needed once its chunk is computed.
    let chunk = r.chunk;
    drop(r);
    Ok(Record {
        port: 0,
        chunk,
        value: done?.track(&job.acct),
        reserve: None,
    })
}

/// Runs one chunk under a memory lease, subdividing it while the lease is refused.
fn process_chunk(
    job: &JobCompute,
    op: &dyn ChunkedOp,
    ix: usize,
    r: &Record,
    reserve: Option<Arc<Lease>>,
    notes: &mut Notes,
) -> Result<Value, NodeError> {
    let np = &job.plan.nodes[ix];
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
    let min = job.plan.min_tile;
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
        match job.acct.try_lease(need, &what) {
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
                notes.push(
                    ix,
                    NoteKind::Retry {
                        chunk: r.chunk,
                        from: side,
                        to: smaller,
                        reason: oom.to_string(),
                    },
                );
                side = smaller;
                subs = next;
            }
        }
    }
}

/// How a unit ends: its last stage's output assembled whole, or an output node that takes
/// the pieces as they come ([`SinkOp`]; `source` is the node whose pieces it takes).
pub(crate) enum Exit {
    Merge(Arc<dyn ChunkedOp>),
    Sink { op: Arc<dyn SinkOp>, source: usize },
}

/// A unit's exit, on its owner: takes the pieces as they arrive (pasting them into the output
/// being assembled, or handing them to the sink, which writes what they make final), and once
/// the frontier passes the output time ends the output: the merged value (leased with the
/// memory the cutter set aside for it) or the sink's UI record. Node `ix`'s notes: the last
/// stage's for a merge, the sink's for a sink. The bound operator of the node whose pieces
/// these are (and the weights it holds) goes then. A sink dropped unfinished (the job
/// stopped) leaves nothing behind.
pub(crate) fn exit<'s>(
    done: Recs<'s>,
    ix: usize,
    owner_ix: u64,
    exit: Exit,
    exit_lease: ExitLease,
    job: &Arc<JobCompute>,
) -> Out<'s> {
    let job = job.clone();
    let owner = done.scope().index() as u64 == owner_ix;
    let out_time = job.plan.nodes[ix].out_time;
    let (name, source) = match &exit {
        Exit::Merge(_) => ("merge", ix),
        Exit::Sink { source, .. } => ("sink", *source),
    };
    done.unary_frontier::<Cb, _, _, _>(
        Exchange::new(move |_r: &Record| owner_ix),
        name,
        move |cap, _info| {
            let mut cap: Option<Capability<u64>> = owner.then(|| cap.delayed(&out_time));
            let mut open: Option<Box<dyn Merger>> = None;
            let mut failed = false;
            let ctx = job.context(ix);
            move |(input, frontier), output| {
                let np = &job.plan.nodes[ix];
                let mut notes = Notes::default();
                input.for_each(|_c, data| {
                    for r in data.drain(..) {
                        if failed || job.stopped() {
                            continue;
                        }
                        if open.is_none() {
                            let made = notes.busy(|| {
                                guarded(|| match &exit {
                                    Exit::Merge(op) => op.merger(
                                        &np.outputs.first().copied().unwrap_or(ValueInfo::Unknown),
                                    ),
                                    Exit::Sink { op, .. } => op.open(
                                        &np.chunked_input.unwrap_or(ValueInfo::Unknown),
                                        &np.chunks,
                                        &ctx,
                                    ),
                                })
                            });
                            match made {
                                Ok(m) => open = Some(m),
                                Err(e) => {
                                    failed = true;
                                    job.halt();
                                    notes.push(ix, NoteKind::Failed(e));
                                    continue;
                                }
                            }
                        }
                        let m = open.as_mut().expect("opened above");
                        let added = match np.chunks.get(r.chunk as usize).copied() {
                            Some(spec) => notes.busy(|| guarded(|| m.add(&spec, r.value))),
                            None => Err(NodeError::Other(format!(
                                "piece {} is not in the plan",
                                r.chunk
                            ))),
                        };
                        if let Err(e) = added {
                            failed = true;
                            job.halt();
                            notes.push(ix, NoteKind::Failed(e));
                        }
                    }
                });
                let Some(c) = cap.as_ref() else {
                    return;
                };
                if frontier.frontier().less_equal(&out_time) {
                    let recs = notes.drain(&job, ix);
                    if !recs.is_empty() {
                        output.session(c).give_iterator(recs.into_iter());
                    }
                    return;
                }
                // Every piece is in (or the job stopped).
                if !(failed || job.stopped()) {
                    job.unbind(source);
                    if let Some(m) = open.take() {
                        let lease = exit_lease.borrow_mut().take();
                        match notes.busy(|| guarded(|| m.finish_output())) {
                            Ok(out) => {
                                notes.push(ix, NoteKind::Ran { ui: out.ui });
                                if matches!(exit, Exit::Merge(_)) {
                                    let value = out
                                        .values
                                        .into_iter()
                                        .next()
                                        .unwrap_or(Value::Boolean(true));
                                    let value = match lease {
                                        Some(l) => value.with_lease(l),
                                        None => value.track(&job.acct),
                                    };
                                    output.session(c).give(Rec::Data(Record::value(0, value)));
                                }
                            }
                            Err(e) => {
                                job.halt();
                                notes.push(ix, NoteKind::Failed(e));
                            }
                        }
                    }
                }
                open = None;
                exit_lease.borrow_mut().take();
                let recs = notes.drain(&job, ix);
                output.session(c).give_iterator(recs.into_iter());
                cap = None;
            }
        },
    )
}
