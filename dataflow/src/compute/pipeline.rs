//! Operators of a pipeline region: the cut at its entry and one stage per node.

use super::chunked::{finished, ExitLease};
use super::record::{NoteKind, Rec, Record};
use super::whole::{named_inputs, Cb, Out, Recs};
use super::{JobCompute, Notes};
use crate::node::chunk::{ChunkedOp, RegionReader, SourceOp};
use crate::node::memory::Lease;
use crate::node::value::{Value, ValueInfo};
use crate::node::{guarded, NodeError};
use std::sync::Arc;
use std::time::Duration;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::{ProbeHandle, Scope};

/// Where a unit's pieces come from: the whole input, cut by a chunked node's own operator
/// (its windows with halos, a stream's windows: memory set aside per piece for its result and
/// workspace, the piece counted on its own); the whole input cropped by a region's first stage
/// (the part of it each piece needs); or a source node read part by part (its output never
/// exists whole). For a region, the memory set aside per piece is the most any stage holds
/// for it.
pub(crate) enum Entry {
    Split {
        op: Arc<dyn ChunkedOp>,
        which: &'static str,
    },
    Crop {
        op: Arc<dyn ChunkedOp>,
        which: &'static str,
    },
    Source {
        node: usize,
        op: Arc<dyn SourceOp>,
    },
}

/// Cuts a unit's input once: piece `i`, at `in_time + i`, with the memory set aside for it
/// (see [`Entry`]; it travels with the piece to the exit). If that is refused while pieces are
/// in flight, it waits for them to return memory; with none in flight, it cuts the piece
/// anyway and the piece's operators lease what they need themselves, re-running it as smaller
/// tiles if they must. At most the plan's in-flight count of pieces are cut ahead of those the
/// exit has finished, so a unit never holds all its pieces at once. Its notes are the
/// source's, or the first node's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cut<'s>(
    scope: Scope<'s, u64>,
    input: Recs<'s>,
    ix: usize,
    owner_ix: u64,
    entry: Entry,
    exit_bytes: u64,
    exit_lease: ExitLease,
    done: ProbeHandle<u64>,
    job: &Arc<JobCompute>,
) -> Out<'s> {
    let job = job.clone();
    let np = &job.plan.nodes[ix];
    let unit = &job.plan.units[np.unit];
    let (in_time, reserve_bytes) = (np.in_time, unit.reserve_bytes);
    let total = np.chunks.len();
    let ahead = np.inflight.clamp(1, total.max(1));
    let owner = scope.index() as u64 == owner_ix;
    // Whose notes these are: the source's, or the first stage's.
    let me = match &entry {
        Entry::Source { node, .. } => *node,
        Entry::Crop { .. } | Entry::Split { .. } => ix,
    };
    input.unary_frontier::<Cb, _, _, _>(
        Exchange::new(move |_r: &Record| owner_ix),
        "cut",
        move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut cap: Option<Capability<u64>> = owner.then(|| cap.delayed(&in_time));
            let mut stash: Vec<Record> = Vec::new();
            let mut whole: Option<Value> = None;
            let mut reader: Option<Box<dyn RegionReader>> = None;
            // What the source holds while it is read (its rows), counted until it is done.
            let mut held: Option<Lease> = None;
            let mut next = 0usize;
            move |(input, frontier), output| {
                input.for_each(|_c, data| stash.append(data));
                if cap.is_none() || frontier.frontier().less_equal(&in_time) {
                    return;
                }
                if job.stopped() {
                    cap = None;
                    whole = None;
                    reader = None;
                    drop(held.take());
                    stash.clear();
                    return;
                }
                let mut notes = Notes::default();
                let np = &job.plan.nodes[ix];
                macro_rules! fail {
                    ($e:expr) => {{
                        job.halt();
                        notes.push(me, NoteKind::Failed($e));
                        if let Some(c) = cap.take() {
                            output
                                .session(&c)
                                .give_iterator(notes.drain(&job, me).into_iter());
                        }
                        whole = None;
                        reader = None;
                        drop(held.take());
                        return;
                    }};
                }
                let started = whole.is_some() || reader.is_some();
                if !started {
                    match &entry {
                        Entry::Crop { op, which } | Entry::Split { op, which } => {
                            if matches!(entry, Entry::Crop { .. }) && op.local().is_none() {
                                fail!(NodeError::Other(
                                    "a pipeline stage that is not a local operator".into()
                                ))
                            }
                            let mut inputs = named_inputs(&job, ix, &mut stash);
                            let Some(value) = inputs.take(which) else {
                                fail!(NodeError::input(which, "no value arrived"))
                            };
                            if np.chunked_input != Some(value.info()) {
                                let msg = format!(
                                    "arrived as {:?}, but the plan cut it as {:?}",
                                    value.info(),
                                    np.chunked_input
                                );
                                fail!(NodeError::input(which, msg))
                            }
                            whole = Some(value);
                        }
                        Entry::Source { node, op } => {
                            let bytes = job.plan.nodes[*node].forecast.working_bytes;
                            let what =
                                format!("the rows node {} holds", job.plan.nodes[*node].node);
                            match job.acct.try_lease(bytes, &what) {
                                Ok(l) => held = Some(l),
                                Err(oom) => fail!(NodeError::OutOfMemory(oom.to_string())),
                            }
                            let ctx = job.context(*node);
                            match notes.busy(|| guarded(|| op.open(&ctx))) {
                                Ok(r) => reader = Some(r),
                                Err(e) => fail!(e),
                            }
                        }
                    }
                    match job.acct.try_lease(
                        exit_bytes,
                        &format!("the exit of node {}'s region", np.node),
                    ) {
                        Ok(l) => *exit_lease.borrow_mut() = Some(l),
                        Err(oom) => fail!(NodeError::OutOfMemory(oom.to_string())),
                    }
                }
                let finished = finished(&done, in_time, total);
                let cut_before = next;
                let mut failed = None;
                while next < total && next < finished + ahead {
                    let chunk = np.chunks[next];
                    let info = np.chunked_input.unwrap_or(ValueInfo::Unknown);
                    let bytes = match &entry {
                        Entry::Split { op, .. } => guarded(|| Ok(op.chunk_memory(&info, &chunk)))
                            .map(|m| m.result + m.workspace)
                            .unwrap_or(0),
                        _ => reserve_bytes,
                    };
                    let what = format!("piece {next} of node {}", np.node);
                    let reserve = match job.acct.try_lease(bytes, &what) {
                        Ok(l) => Some(Arc::new(l)),
                        // Pieces in flight return memory as they finish: wait for them. With
                        // none in flight, cut it anyway: each stage then leases what it needs
                        // itself, re-running the piece as smaller tiles if it must.
                        Err(_) if next > finished => break,
                        Err(_) => None,
                    };
                    let region = np.pieces_in.get(next).copied().unwrap_or(chunk.region);
                    let piece = notes.busy(|| {
                        guarded(|| match (&entry, whole.as_ref(), reader.as_mut()) {
                            (Entry::Split { op, .. }, Some(source), _) => op.split(source, &chunk),
                            (Entry::Crop { op, .. }, Some(source), _) => op
                                .local()
                                .ok_or_else(|| NodeError::Other("not a local operator".into()))?
                                .crop(source, &region),
                            (Entry::Source { .. }, _, Some(r)) => r.read(&region),
                            _ => Err(NodeError::Other("the region's input is gone".into())),
                        })
                    });
                    match piece {
                        Ok(piece) => {
                            let at = cap
                                .as_ref()
                                .expect("checked above")
                                .delayed(&(in_time + next as u64));
                            // A piece cut without memory set aside, or a chunked node's piece
                            // (not part of what is set aside), is counted on its own.
                            let value = match (&entry, &reserve) {
                                (Entry::Crop { .. } | Entry::Source { .. }, Some(_)) => piece,
                                _ => piece.track(&job.acct),
                            };
                            output.session(&at).give(Rec::Data(Record {
                                port: 0,
                                chunk: next as u32,
                                value,
                                reserve,
                            }));
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    next += 1;
                }
                if let Some(e) = failed {
                    fail!(e)
                }
                if next > cut_before {
                    notes.push(me, NoteKind::Cut { count: next as u32 });
                }
                let read_all = next == total;
                if read_all && me != ix {
                    // A source has made its output once every part of it was read.
                    notes.push(me, NoteKind::Ran { ui: None });
                }
                let recs = notes.drain(&job, me);
                if let Some(c) = cap.as_mut() {
                    if read_all {
                        // The last notes at the last piece's time, so they are in before the
                        // frontier passes it.
                        let at = c.delayed(&(in_time + total.saturating_sub(1) as u64));
                        output.session(&at).give_iterator(recs.into_iter());
                    } else {
                        output.session(&*c).give_iterator(recs.into_iter());
                    }
                }
                if !read_all {
                    if let Some(c) = cap.as_mut() {
                        c.downgrade(&(in_time + next as u64));
                    }
                    activator.activate_after(Duration::from_micros(200));
                } else {
                    whole = None;
                    reader = None;
                    drop(held.take());
                    cap = None;
                }
            }
        },
    )
}

/// A region stage's kernel: its part of a piece from the part of its input the piece carries,
/// the reservation the piece was cut with travelling on; a piece cut without one is computed
/// under a lease of its own, re-run as smaller tiles while that is refused.
pub(crate) fn stage_kernel(
    job: &JobCompute,
    op: &dyn ChunkedOp,
    ix: usize,
    r: Record,
    notes: &mut Notes,
) -> Result<Record, NodeError> {
    let np = &job.plan.nodes[ix];
    let info = np.chunked_input.unwrap_or(ValueInfo::Unknown);
    let c = r.chunk as usize;
    let value = match (np.chunks.get(c), np.pieces_in.get(c)) {
        (Some(out), Some(have)) if r.reserve.is_some() => notes.busy(|| {
            guarded(|| match op.local() {
                Some(local) => local.process_within(&info, &out.region, have, &r.value),
                None => Err(NodeError::Other("not a local operator".into())),
            })
        })?,
        (Some(out), Some(have)) => {
            let (v, retries) = notes.busy(|| within_retrying(job, op, ix, out, have, &r.value))?;
            for (from, to, reason) in retries {
                notes.push(
                    ix,
                    NoteKind::Retry {
                        chunk: r.chunk,
                        from,
                        to,
                        reason,
                    },
                );
            }
            v.track(&job.acct)
        }
        _ => {
            return Err(NodeError::Other(format!(
                "piece {c} is not in the plan of this stage"
            )))
        }
    };
    Ok(Record {
        port: 0,
        chunk: r.chunk,
        value,
        reserve: r.reserve,
    })
}

/// Computes a stage's part of a piece that was cut without memory set aside (nothing was in
/// flight to wait for): leases its result and workspace, and while that is refused re-runs it
/// as tiles of half the side (down to the plan's smallest), each computed from the same piece,
/// so the values are the same. Returns the result and the retries made, `(from, to, reason)`.
#[allow(clippy::type_complexity)]
fn within_retrying(
    job: &JobCompute,
    op: &dyn ChunkedOp,
    ix: usize,
    spec: &crate::node::chunk::ChunkSpec,
    have: &crate::node::chunk::ChunkRegion,
    piece: &Value,
) -> Result<(Value, Vec<(usize, usize, String)>), NodeError> {
    use crate::node::chunk::{ChunkRegion, ChunkSize, ChunkSpec, Rect};
    let np = &job.plan.nodes[ix];
    let info = np.chunked_input.unwrap_or(ValueInfo::Unknown);
    let local = op
        .local()
        .ok_or_else(|| NodeError::Other("not a local operator".into()))?;
    let full = guarded(|| Ok(local.region_memory(&info, &spec.region, have)))?;
    let what = format!("chunk {} of node {}", spec.index, np.node);
    let mut side = np.tile.unwrap_or(0);
    let mut subs = vec![*spec];
    let mut retries = Vec::new();
    loop {
        // A subdivided part holds its whole result plus one sub-part's result and workspace.
        let need = if subs.len() > 1 {
            let worst = subs
                .iter()
                .map(|s| local.region_memory(&info, &s.region, have))
                .map(|m| m.result + m.workspace)
                .max()
                .unwrap_or(0);
            full.result + worst
        } else {
            full.result + full.workspace
        };
        match job.acct.try_lease(need, &what) {
            Ok(lease) => {
                let out = if subs.len() == 1 {
                    guarded(|| local.process_within(&info, &spec.region, have, piece))
                } else {
                    guarded(|| {
                        let rect = spec
                            .rect()
                            .ok_or_else(|| NodeError::Other("only tiles are subdivided".into()))?;
                        let whole = match np.outputs.first() {
                            Some(ValueInfo::Image(i)) => {
                                ValueInfo::Image(crate::node::value::ImageInfo {
                                    height: rect.h,
                                    width: rect.w,
                                    ..*i
                                })
                            }
                            other => *other.unwrap_or(&ValueInfo::Unknown),
                        };
                        let mut merger = op.merger(&whole)?;
                        for sub in &subs {
                            let part = local.process_within(&info, &sub.region, have, piece)?;
                            let r = sub.rect().ok_or_else(|| {
                                NodeError::Other("only tiles are subdivided".into())
                            })?;
                            let at = ChunkSpec {
                                region: ChunkRegion::Tile {
                                    rect: Rect::new(r.x - rect.x, r.y - rect.y, r.w, r.h),
                                },
                                ..*sub
                            };
                            merger.add(&at, part)?;
                        }
                        merger.finish()
                    })
                };
                drop(lease);
                return out.map(|v| (v, retries));
            }
            Err(oom) => {
                let smaller = side / 2;
                if side == 0 || smaller < job.plan.min_tile {
                    return Err(NodeError::OutOfMemory(oom.to_string()));
                }
                subs = op.subdivide(
                    spec,
                    ChunkSize::Tile {
                        width: smaller,
                        height: smaller,
                    },
                );
                retries.push((side, smaller, oom.to_string()));
                side = smaller;
            }
        }
    }
}
