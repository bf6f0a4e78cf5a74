//! The driver of one job: turns frontier movement and the notes operators sent into events.
//!
//! It lives on the runtime's control worker and is polled after every step. For each node it
//! reads one probe, on the node's notes as they arrive on the control worker: when that
//! frontier passes a time, every note of the node up to that time is in the inbox, and the
//! node's data up to that time is final. So a chunk is announced once the frontier passes its
//! time, with the piece its operator sent for the partial output; a node starts when every
//! node its unit waits for has ended, and ends when the frontier passes its output time.
//! Notes that need no frontier (residency changes, retries, phases) are announced as they
//! arrive, a node's phases between its start and its end.

use crate::compute::build::{image_output_consumers, streams_output, Inbox};
use crate::compute::record::NoteKind;
use crate::compute::JobCompute;
use crate::node::residency::{Phase, ResidencyDelta};
use crate::node::value::{Value, ValueInfo};
use crate::node::NodeError;
use crate::telemetry::event::{
    Emitter, EventKind, Lifecycle, MemoryUse, NodeTimingEvent, Progress, RunTiming,
};
use crate::telemetry::report::{NodeStats, RunError, RunReport};
use crate::telemetry::timing::{NodeClock, TimeSplit};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use timely::dataflow::ProbeHandle;

/// A node's lifecycle phase as the event schema names it.
fn lifecycle(p: Phase) -> Lifecycle {
    match p {
        Phase::Indexing => Lifecycle::Indexing,
        Phase::Prefetching => Lifecycle::Prefetching,
        Phase::Warming => Lifecycle::Warming,
        Phase::Running => Lifecycle::Running,
        Phase::CachedReplay => Lifecycle::CachedReplay,
    }
}

/// What the driver knows of one node.
#[derive(Default)]
struct Seen {
    started: Option<Instant>,
    chunks_done: u32,
    ended: Option<f64>,
    /// Its outputs were produced (a `Ran` note).
    ran: bool,
    ui: Option<Json>,
    clock: NodeClock,
    /// Phases entered and not yet announced, and the last one announced.
    phases: Vec<Phase>,
    last_phase: Option<Phase>,
    /// Pieces for partial outputs, by chunk, until announced, with when they were finished.
    pieces: HashMap<u32, (Value, f64)>,
    /// Step previews, by step, until announced.
    previews: HashMap<u32, (Value, String)>,
    /// Pieces the node's input was cut into so far.
    cut: u32,
    /// The latest time (ms since the job began) a piece announced so far was finished: when
    /// the frontier could pass the last chunk announced.
    frontier_ms: f64,
    /// The most the run held while the node ran.
    peak: u64,
}

/// Worker 0's event source for one job.
pub(crate) struct Driver {
    job: Arc<JobCompute>,
    emitter: Arc<Emitter>,
    budget: Option<u64>,
    seen: Vec<Seen>,
    output_consumers: Vec<Vec<usize>>,
    /// Per node of a region: the stage (or, for its sink, the last stage) before it.
    pipeline_before: Vec<Option<usize>>,
    residency: Vec<ResidencyDelta>,
    retries: Vec<(usize, u32, usize, usize, String)>,
    retry_count: u32,
    announce_delays: Vec<f64>,
    failure: Option<(usize, NodeError)>,
    done_chunks: u64,
    total_chunks: u64,
    running: bool,
    streaming: bool,
    finalizing: bool,
    startup_ms: Option<f64>,
}

impl Driver {
    pub(crate) fn new(
        job: &Arc<JobCompute>,
        emitter: &Arc<Emitter>,
        budget: Option<u64>,
    ) -> Driver {
        let n = job.wf.nodes.len();
        Driver {
            job: job.clone(),
            emitter: emitter.clone(),
            budget,
            seen: (0..n).map(|_| Seen::default()).collect(),
            output_consumers: (0..n).map(|ix| image_output_consumers(job, ix)).collect(),
            pipeline_before: (0..n)
                .map(|ix| {
                    let u = job.plan.unit_of(ix);
                    let members: Vec<usize> = u.members().collect();
                    let at = members.iter().position(|&m| m == ix)?;
                    (u.kind != crate::control::plan::UnitKind::Whole && at > 0)
                        .then(|| members[at - 1])
                })
                .collect(),
            residency: Vec::new(),
            retries: Vec::new(),
            retry_count: 0,
            announce_delays: Vec::new(),
            failure: None,
            done_chunks: 0,
            total_chunks: job.plan.total_chunks(),
            running: false,
            streaming: false,
            finalizing: false,
            startup_ms: None,
        }
    }

    /// Takes every note that arrived into the driver's own state.
    fn take_notes(&mut self, inbox: &Inbox) {
        let mut ib = inbox.borrow_mut();
        for (ix, list) in ib.iter_mut().enumerate() {
            for (_t, kind) in list.drain(..) {
                let s = &mut self.seen[ix];
                match kind {
                    NoteKind::Ran { ui } => {
                        s.ran = true;
                        if ui.is_some() {
                            s.ui = ui;
                        }
                    }
                    NoteKind::Failed(e) => {
                        if self.failure.is_none() {
                            self.failure = Some((ix, e));
                        }
                    }
                    NoteKind::Piece {
                        chunk,
                        value,
                        done_ms,
                    } => {
                        s.pieces.insert(chunk, (value, done_ms));
                    }
                    NoteKind::Preview {
                        step,
                        image,
                        method,
                    } => {
                        s.previews.insert(step, (image, method));
                    }
                    NoteKind::Retry {
                        chunk,
                        from,
                        to,
                        reason,
                    } => {
                        self.retry_count += 1;
                        self.retries.push((ix, chunk, from, to, reason));
                    }
                    NoteKind::Cut { count } => s.cut = s.cut.max(count),
                    NoteKind::Work(w) => {
                        s.clock.load_ns += w.load_ns;
                        s.clock.transfer_ns += w.transfer_ns;
                        s.phases.extend(w.phases);
                        self.residency.extend(w.deltas);
                    }
                    NoteKind::Time { busy_ns, replay_ns } => {
                        s.clock.busy_ns += busy_ns;
                        s.clock.replay_ns += replay_ns;
                    }
                }
            }
        }
    }

    fn emit_residency(&mut self) {
        for d in self.residency.drain(..) {
            self.emitter.emit(EventKind::ResidencyDelta(d));
        }
    }

    /// Looks at the probes and the notes; emits what became true.
    pub(crate) fn poll(&mut self, probes: &[ProbeHandle<u64>], inbox: &Inbox) {
        self.take_notes(inbox);
        // After a stop, frontiers also pass nodes that never ran: report only those that did.
        let stopped = self.job.stopped();
        if stopped && !self.running {
            return;
        }
        if !self.running {
            self.running = true;
            self.startup_ms = Some(self.emitter.elapsed_ms());
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::Running,
                node: None,
            });
        }
        self.emit_residency();
        // What the run held since the last look, for every node running now.
        let held = self.job.acct.take_window_peak().0;
        for s in self.seen.iter_mut() {
            if s.started.is_some() && s.ended.is_none() {
                s.peak = s.peak.max(held);
            }
        }
        let job = self.job.clone();
        let (wf, plan) = (&job.wf, &job.plan);
        for ix in 0..wf.nodes.len() {
            if self.seen[ix].ended.is_some() || (stopped && !self.seen[ix].ran) {
                continue;
            }
            let n = &wf.nodes[ix];
            let p = &plan.nodes[ix];
            if self.seen[ix].started.is_none() {
                // Every node the node's unit waits for has ended.
                let ready = plan.units[p.unit]
                    .after
                    .iter()
                    .all(|&a| !probes[a].less_equal(&plan.nodes[a].out_time));
                if !ready {
                    continue;
                }
                self.seen[ix].started = Some(Instant::now());
                self.seen[ix].peak = self.job.acct.current().0;
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
            let (mine, rest): (Vec<_>, Vec<_>) = self.retries.drain(..).partition(|r| r.0 == ix);
            self.retries = rest;
            for (_, chunk, from, to, reason) in mine {
                self.emitter.emit(EventKind::Retry {
                    node: n.id.0.clone(),
                    chunk,
                    tile_from: from,
                    tile_to: to,
                    reason,
                });
            }
            let count = p.chunk_count();
            // In a region, a piece is final at a stage only once it is at the stage before
            // (their notes may reach this worker in either order).
            let before = self.pipeline_before[ix];
            while self.seen[ix].chunks_done < count
                && !probes[ix].less_equal(&(p.in_time + self.seen[ix].chunks_done as u64))
                && before.is_none_or(|b| self.seen[b].chunks_done > self.seen[ix].chunks_done)
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
                    tracked_bytes: self.job.acct.current().0,
                });
                self.announce_partial(ix, chunk);
            }
            if self.seen[ix].chunks_done == count && !probes[ix].less_equal(&p.out_time) {
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
                    timing: self.seen[ix].clock.split(),
                    tracked_peak_bytes: self.seen[ix].peak.max(held),
                });
                if n.node.schema().output_node {
                    self.emitter.emit(EventKind::Executed {
                        node: n.id.0.clone(),
                        output: self.seen[ix].ui.clone().unwrap_or(Json::Null),
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
                .all(|(ix, s)| s.ended.is_some() || wf.nodes[ix].node.schema().output_node)
        {
            self.finalizing = true;
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::Finalizing,
                node: None,
            });
        }
    }

    /// Announces the phases node `ix` entered since the last poll (no repeats).
    fn announce_phases(&mut self, ix: usize) {
        let phases = std::mem::take(&mut self.seen[ix].phases);
        for p in phases {
            if self.seen[ix].last_phase == Some(p) {
                continue;
            }
            self.seen[ix].last_phase = Some(p);
            self.emitter.emit(EventKind::Lifecycle {
                state: lifecycle(p),
                node: Some(self.job.wf.nodes[ix].id.0.clone()),
            });
        }
    }

    /// Announces step `step` (0-based) of iterative node `ix`, and its preview if it made one.
    fn announce_step(&mut self, ix: usize, step: u32) {
        let node = self.job.wf.nodes[ix].id.0.clone();
        let steps = self.job.plan.nodes[ix].steps;
        self.emitter.emit(EventKind::Step {
            node: node.clone(),
            step: step + 1,
            steps,
            progress: Progress {
                value: self.done_chunks,
                max: self.total_chunks,
            },
        });
        if let Some((image, method)) = self.seen[ix].previews.remove(&step) {
            let (width, height) = image
                .info()
                .image()
                .map(|i| (i.width, i.height))
                .unwrap_or((0, 0));
            self.emitter.emit_with(
                EventKind::Preview {
                    node,
                    step: step + 1,
                    steps,
                    method,
                    width,
                    height,
                },
                Some(image),
            );
        }
    }

    fn streaming(&mut self) {
        if !self.streaming {
            self.streaming = true;
            self.emitter.emit(EventKind::Lifecycle {
                state: Lifecycle::StreamingPartial,
                node: None,
            });
        }
    }

    /// Announces window or chunk `chunk` of a streamed output node `ix`.
    fn announce_stream(&mut self, ix: usize, chunk: u32) {
        let value = self.take_piece(ix, chunk);
        let job = self.job.clone();
        let p = &job.plan.nodes[ix];
        let Some(spec) = p.chunks.get(chunk as usize) else {
            return;
        };
        self.streaming();
        let node = job.wf.nodes[ix].id.0.clone();
        let cut = self.seen[ix].cut;
        match (spec.region, p.chunked_input) {
            (
                crate::node::chunk::ChunkRegion::Frames {
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
            (
                crate::node::chunk::ChunkRegion::Samples { start, len },
                Some(ValueInfo::Audio(meta)),
            ) => {
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

    /// The piece of chunk `chunk` of node `ix` for its announcement, noting how long after the
    /// frontier could pass it the announcement comes: chunks are announced in order, so the
    /// frontier passes chunk `c` once every piece up to it is finished, the latest of them last.
    fn take_piece(&mut self, ix: usize, chunk: u32) -> Option<Value> {
        let (value, done_ms) = self.seen[ix].pieces.remove(&chunk)?;
        let s = &mut self.seen[ix];
        s.frontier_ms = s.frontier_ms.max(done_ms);
        let now = self.job.started.elapsed().as_secs_f64() * 1e3;
        self.announce_delays.push((now - s.frontier_ms).max(0.0));
        Some(value)
    }

    /// Announces chunk `chunk` of node `ix` as a partial output of each output node it feeds.
    fn announce_partial(&mut self, ix: usize, chunk: u32) {
        if streams_output(&self.job, ix) {
            return self.announce_stream(ix, chunk);
        }
        if self.output_consumers[ix].is_empty() {
            return;
        }
        let host = self.take_piece(ix, chunk);
        let job = self.job.clone();
        let p = &job.plan.nodes[ix];
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
            .unwrap_or(crate::node::chunk::Rect::new(0, 0, width, height));
        self.streaming();
        for &c in &self.output_consumers[ix] {
            self.emitter.emit_with(
                EventKind::PartialImage {
                    node: job.wf.nodes[c].id.0.clone(),
                    source_node: job.wf.nodes[ix].id.0.clone(),
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

    /// Once every worker is done: the last notes, the run's time split and its final event;
    /// the job's result.
    pub(crate) fn finish(
        mut self,
        probes: &[ProbeHandle<u64>],
        inbox: &Inbox,
    ) -> Result<RunReport, RunError> {
        self.poll(probes, inbox);
        self.take_notes(inbox);
        let job = self.job.clone();
        let wf = &job.wf;
        let wall_ms = job.started.elapsed().as_secs_f64() * 1e3;
        let stats: Vec<NodeStats> = wf
            .nodes
            .iter()
            .zip(job.plan.nodes.iter())
            .zip(self.seen.iter())
            .map(|((n, p), s)| NodeStats {
                node: n.id.0.clone(),
                class_type: n.class_type.to_string(),
                mode: p.mode,
                chunks: p.chunk_count(),
                wall_ms: s.ended.unwrap_or(0.0),
                timing: s.clock.split(),
            })
            .collect();
        let timing = self.startup_ms.map(|startup_ms| {
            let nodes: Vec<NodeTimingEvent> = stats
                .iter()
                .map(|s| NodeTimingEvent {
                    node: s.node.clone(),
                    class_type: s.class_type.clone(),
                    wall_ms: s.wall_ms,
                    split: s.timing,
                })
                .collect();
            let total = nodes
                .iter()
                .fold(TimeSplit::default(), |acc, n| acc.plus(n.split));
            RunTiming {
                startup_ms,
                wall_ms: self.emitter.elapsed_ms() - startup_ms,
                total,
                nodes,
            }
        });
        let outcome = match self.failure.take() {
            Some((ix, error)) => Err(RunError::Node {
                node: wf.nodes[ix].id.0.clone(),
                class_type: wf.nodes[ix].class_type.to_string(),
                error,
            }),
            // A stop that came after every node had run changes nothing: the job succeeded.
            None if self.seen.iter().any(|s| !s.ran) => {
                if job.cancel.is_cancelled() {
                    Err(RunError::Interrupted)
                } else {
                    Err(RunError::Runtime(
                        "the dataflow ended before every node ran".into(),
                    ))
                }
            }
            None => {
                let outputs: BTreeMap<String, Json> = wf
                    .nodes
                    .iter()
                    .zip(self.seen.iter_mut())
                    .filter_map(|(n, s)| s.ui.take().map(|ui| (n.id.0.clone(), ui)))
                    .collect();
                Ok(RunReport {
                    outputs,
                    nodes: stats,
                    wall_ms,
                    budget_bytes: self.budget,
                    tracked_peak_bytes: job.acct.peak().0,
                    retries: self.retry_count,
                    announce_delays_ms: std::mem::take(&mut self.announce_delays),
                })
            }
        };
        self.emit_residency();
        if let Some(t) = timing {
            self.emitter.emit(EventKind::Timing(t));
        }
        let memory = MemoryUse {
            budget_bytes: self.budget,
            tracked_peak_bytes: job.acct.peak().0,
        };
        match &outcome {
            Ok(_) => self.emitter.emit(EventKind::Success { wall_ms, memory }),
            Err(RunError::Node {
                node,
                class_type,
                error,
            }) => self.emitter.emit(EventKind::Error {
                node_id: Some(node.clone()),
                node_type: Some(class_type.clone()),
                message: error.to_string(),
                memory: Some(memory),
            }),
            Err(RunError::Interrupted) => self.emitter.emit(EventKind::Interrupted {
                node_id: None,
                memory: Some(memory),
            }),
            Err(e @ RunError::Runtime(_)) => self.emitter.emit(EventKind::Error {
                node_id: None,
                node_type: None,
                message: e.to_string(),
                memory: Some(memory),
            }),
        }
        outcome
    }
}
