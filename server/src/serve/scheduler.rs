//! Admission and running: takes queued jobs in priority order, admits each against the device
//! budget still free, and runs it on a thread of its own.
//!
//! Decisions (the module's policy):
//! - At most `max_jobs` jobs run at once. The head of the queue is planned against the budget
//!   minus what running jobs reserved (their forecast peaks); if it fits it starts and reserves
//!   its own forecast peak, else it waits for a running job to end (no job behind it jumps
//!   ahead: priorities stay strict). With nothing running, a job that still does not fit is
//!   refused with admission's numbers (or run anyway under `--admission dry-run`/`off`).
//! - The budget a job's accountant enforces is the limit it was planned under, so concurrent
//!   jobs together stay within the device budget.
//! - A job's failure, refusal, panic or interruption ends that job only; its reservation is
//!   released whatever happened.

use super::comfy::{self, Failure};
use super::relay::JobTag;
use super::store::{timestamp_ms, JobRecord, JobState, StoreErrorKind};
use super::App;
use crate::job::{self, PrepareError, Prepared};
use nova_dataflow::profile::Admission;
use nova_dataflow::{
    run, CancelToken, Emitter, EventKind, EventSink, Lifecycle, RunError, RunOptions,
};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A job that is running.
pub(crate) struct Running {
    pub cancel: CancelToken,
    pub reserved: u64,
    pub client_id: Option<String>,
    /// The node that started last (for a reconnecting client's `executing`).
    pub current: Arc<Mutex<Option<String>>>,
}

/// The scheduler's shared state.
#[derive(Default)]
pub(crate) struct Scheduler {
    wake: tokio::sync::Notify,
    running: Mutex<HashMap<String, Running>>,
    /// Held: queued jobs stay queued (running ones go on); submissions are still accepted.
    paused: std::sync::atomic::AtomicBool,
}

enum Decision {
    Admit(Box<Prepared>),
    Wait,
    Fail { message: String, kind: &'static str },
}

impl Scheduler {
    /// A scheduler whose queue starts held (or not).
    pub(crate) fn held(paused: bool) -> Scheduler {
        let s = Scheduler::default();
        s.paused.store(paused, std::sync::atomic::Ordering::SeqCst);
        s
    }

    /// Something changed (a job was queued or ended): look at the queue again.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Holds or releases the queue.
    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
        self.wake();
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes reserved by running jobs.
    pub(crate) fn reserved(&self) -> u64 {
        self.lock().values().map(|r| r.reserved).sum()
    }

    pub(crate) fn running_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Interrupts one running job, or all of them. Returns how many were told to stop.
    pub(crate) fn interrupt(&self, prompt_id: Option<&str>) -> usize {
        let running = self.lock();
        let mut n = 0;
        for (id, r) in running.iter() {
            if prompt_id.is_none_or(|p| p == id) {
                r.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    /// The node a client's running job is at, if any.
    pub(crate) fn current_node_of(&self, client_id: &str) -> Option<(String, String)> {
        let running = self.lock();
        running.iter().find_map(|(id, r)| {
            if r.client_id.as_deref() != Some(client_id) {
                return None;
            }
            let node = r
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()?;
            Some((id.clone(), node))
        })
    }
}

/// The scheduler loop: runs for the life of the service.
pub(crate) async fn schedule(app: Arc<App>) {
    app.warm.wait_registry().await;
    loop {
        let notified = app.sched.wake.notified();
        admit_what_fits(&app).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
    }
}

async fn admit_what_fits(app: &Arc<App>) {
    while !app.sched.paused() && app.sched.running_count() < app.config.max_jobs {
        let (key, rec) = match app.store.next_queued() {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                tracing_error(&format!("reading the queue: {e}"));
                return;
            }
        };
        let Some(rec) = rec else {
            // An entry that matches no queued job: `start` removes it, and the loop goes on
            // to the next one (it never meets this one again).
            if let Err(e) = app.store.start(key, None).await {
                tracing_error(&format!("removing a stale queue entry: {e}"));
                return;
            }
            continue;
        };
        let app2 = app.clone();
        let rec2 = rec.clone();
        let decision = tokio::task::spawn_blocking(move || decide(&app2, &rec2))
            .await
            .unwrap_or_else(|_| Decision::Fail {
                message: "planning the job panicked (this is a bug)".into(),
                kind: "InternalError",
            });
        match decision {
            Decision::Wait => return,
            Decision::Fail { message, kind } => {
                if !fail_unstarted(app, rec, &message, kind).await {
                    // Not recorded (the database cannot take writes): look again later, not
                    // at once.
                    return;
                }
            }
            Decision::Admit(prepared) => {
                let reserved = prepared.plan.forecast_peak_bytes;
                // Video windows cached by earlier jobs stay in memory: they may keep only what
                // this job's plan leaves of the memory it was planned against.
                if let Some(limit) = prepared.plan.limit_bytes {
                    let need = (reserved as f64 * (1.0 + prepared.plan.safety_margin.max(0.0)))
                        .ceil() as u64;
                    nova_engines::video::TemporalCache::global()
                        .shrink_to(limit.saturating_sub(need));
                }
                let started = match app.store.start(key, Some(reserved)).await {
                    Ok(Some(r)) => r,
                    Ok(None) => continue, // cancelled meanwhile
                    Err(e) => {
                        tracing_error(&format!("starting job {}: {e}", rec.id));
                        return;
                    }
                };
                let current = Arc::new(Mutex::new(None));
                let cancel = CancelToken::new();
                app.sched.lock().insert(
                    started.id.clone(),
                    Running {
                        cancel: cancel.clone(),
                        reserved,
                        client_id: started.client_id.clone(),
                        current: current.clone(),
                    },
                );
                app.relay.status(app.queue_remaining());
                let app3 = app.clone();
                let handle = tokio::runtime::Handle::current();
                let spawned = std::thread::Builder::new()
                    .name(format!(
                        "nova-job-{}",
                        &started.id[..started.id.len().min(8)]
                    ))
                    .spawn(move || run_job(app3, handle, started, *prepared, cancel, current));
                if let Err(e) = spawned {
                    tracing_error(&format!("cannot start a job thread: {e}"));
                }
            }
        }
    }
}

fn tracing_error(msg: &str) {
    eprintln!("nova serve: {msg}");
}

/// Plans the job against the budget still free and decides.
fn decide(app: &App, rec: &JobRecord) -> Decision {
    let Some(warm) = app.warm.get() else {
        return Decision::Wait;
    };
    let reserved = app.sched.reserved();
    let usable = warm.memory.usable();
    let free = usable.map(|u| nova_dataflow::Bytes(u.0.saturating_sub(reserved)));
    let anything_running = app.sched.running_count() > 0;
    let spec = match app.job_spec(warm, rec.prompt.clone(), Some(&rec.extra_data), free) {
        Ok(s) => s,
        Err(m) => {
            return Decision::Fail {
                message: m,
                kind: "InvalidSettings",
            }
        }
    };
    match job::prepare(spec) {
        Ok(p) if p.plan.fits => Decision::Admit(Box::new(p)),
        Ok(_) if anything_running => Decision::Wait,
        Ok(p) => match (&p.refusal, p.config.admission) {
            (Some(r), Admission::Enforce) => Decision::Fail {
                message: format!("refused: {}", r.message),
                kind: "Refused",
            },
            _ => Decision::Admit(Box::new(p)),
        },
        Err(PrepareError::Invalid(e)) => Decision::Fail {
            message: e.to_string(),
            kind: "ValidationError",
        },
        Err(e @ PrepareError::Plan(_)) => Decision::Fail {
            message: e.to_string(),
            kind: "PlanError",
        },
    }
}

/// Ends a job that could not start (it became invalid or cannot fit); `false` when its end
/// could not be recorded (it stays queued).
async fn fail_unstarted(app: &Arc<App>, mut rec: JobRecord, message: &str, kind: &str) -> bool {
    let ts = timestamp_ms();
    let last = comfy::execution_error(
        &rec.id,
        &Failure {
            node_id: None,
            node_type: None,
            executed: &[],
            message,
            exception_type: kind,
        },
        ts,
    );
    rec.state = JobState::Error;
    rec.error = Some(message.to_string());
    rec.messages
        .push(("execution_error".into(), last["data"].clone()));
    if let Err(e) = app.store.finish(rec.clone()).await {
        // Still queued in the database: it is looked at again once writes commit.
        tracing_error(&format!("recording job {}: {e}", rec.id));
        return false;
    }
    let tag = Arc::new(JobTag {
        prompt_id: rec.id.clone(),
        client_id: rec.client_id.clone(),
    });
    let fallback = json!({"v": nova_dataflow::EVENT_SCHEMA_VERSION, "job": rec.id, "type": "execution_error",
        "data": {"node_id": null, "node_type": null, "message": message}});
    app.relay.end(&tag, last, app.queue_remaining(), fallback);
    app.metrics.job_finished("error", 0.0);
    super::webhook::spawn(app.clone(), rec);
    true
}

/// Commits a job's end. While the database cannot take writes (a full disk) the job keeps its
/// running slot and the commit is retried until it lands: an accepted job's result is never
/// dropped, and its end is announced only once it is recorded.
fn record_end(app: &App, rec: &JobRecord) {
    let mut wait = Duration::from_millis(200);
    loop {
        match app.store.finish_blocking(rec.clone()) {
            Ok(()) => return,
            Err(e) if e.kind == StoreErrorKind::Unavailable => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing_error(&format!("recording job {}: {e}", rec.id));
                return;
            }
        }
    }
}

/// Runs one admitted job to its end, on its own thread.
fn run_job(
    app: Arc<App>,
    rt: tokio::runtime::Handle,
    mut rec: JobRecord,
    p: Prepared,
    cancel: CancelToken,
    current: Arc<Mutex<Option<String>>>,
) {
    let tag = Arc::new(JobTag {
        prompt_id: rec.id.clone(),
        client_id: rec.client_id.clone(),
    });
    let ts = timestamp_ms();
    let start = comfy::execution_start(&rec.id, ts);
    let cached = comfy::execution_cached(&rec.id, &[], ts);
    rec.messages
        .push(("execution_start".into(), start["data"].clone()));
    rec.messages
        .push(("execution_cached".into(), cached["data"].clone()));
    app.relay.deliver(&tag, vec![start, cached]);

    // Nodes that finished, and which node ran last: for ComfyUI's error messages.
    let executed: Arc<Mutex<Vec<String>>> = Arc::default();
    let last_node: Arc<Mutex<Option<(String, String)>>> = Arc::default();
    let timing: Arc<Mutex<Option<Json>>> = Arc::default();
    let sink: EventSink = {
        let timing = timing.clone();
        let app = app.clone();
        let tag = tag.clone();
        let executed = executed.clone();
        let last_node = last_node.clone();
        Arc::new(move |ev| {
            match &ev.kind {
                EventKind::NodeStart {
                    node, class_type, ..
                } => {
                    *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(node.clone());
                    *last_node.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((node.clone(), class_type.clone()));
                }
                EventKind::NodeEnd { node, .. } => executed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(node.clone()),
                EventKind::Timing(t) => {
                    *timing.lock().unwrap_or_else(|p| p.into_inner()) =
                        serde_json::to_value(t).ok();
                }
                _ => {}
            }
            app.relay.event(&tag, ev);
        })
    };
    let emitter = Arc::new(Emitter::new(rec.id.clone(), sink));
    emitter.emit(EventKind::Lifecycle {
        state: Lifecycle::Planning,
        node: None,
    });
    let began = std::time::Instant::now();
    let budget = p.config.budget;
    let env = p.env.clone();
    let outcome = (|| {
        for dir in [&env.output_dir, &env.temp_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| RunError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
        }
        let opts = RunOptions {
            job_id: rec.id.clone(),
            cancel,
            budget,
            runtime: None,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(
                Arc::new(p.wf),
                Arc::new(p.plan),
                env.clone(),
                opts,
                emitter.clone(),
            )
        }))
        .unwrap_or_else(|_| Err(RunError::Runtime("the run panicked (this is a bug)".into())))
    })();
    drop(emitter);
    let ts = timestamp_ms();
    let executed = executed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let last_node = last_node.lock().unwrap_or_else(|p| p.into_inner()).clone();
    rec.timing = timing.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (last, outcome_name): (Json, &str) = match outcome {
        Ok(report) => {
            rec.state = JobState::Success;
            rec.outputs = report.outputs.into_iter().collect();
            rec.tracked_peak_bytes = Some(report.tracked_peak_bytes);
            (comfy::execution_success(&rec.id, ts), "success")
        }
        Err(RunError::Interrupted) => {
            rec.state = JobState::Interrupted;
            rec.error = Some("interrupted".into());
            let (n, t) = last_node.unzip();
            (
                comfy::execution_interrupted(&rec.id, n.as_deref(), t.as_deref(), &executed, ts),
                "interrupted",
            )
        }
        Err(RunError::Node {
            node,
            class_type,
            error,
        }) => {
            rec.state = JobState::Error;
            let message = error.to_string();
            rec.error = Some(format!("node {node} ({class_type}) failed: {message}"));
            (
                comfy::execution_error(
                    &rec.id,
                    &Failure {
                        node_id: Some(&node),
                        node_type: Some(&class_type),
                        executed: &executed,
                        message: &message,
                        exception_type: "NodeError",
                    },
                    ts,
                ),
                "error",
            )
        }
        Err(e) => {
            rec.state = JobState::Error;
            let message = e.to_string();
            rec.error = Some(message.clone());
            (
                comfy::execution_error(
                    &rec.id,
                    &Failure {
                        node_id: None,
                        node_type: None,
                        executed: &executed,
                        message: &message,
                        exception_type: "InternalError",
                    },
                    ts,
                ),
                "error",
            )
        }
    };
    let kind = last["type"]
        .as_str()
        .unwrap_or("execution_error")
        .to_string();
    rec.messages.push((kind, last["data"].clone()));
    record_end(&app, &rec);
    app.sched.lock().remove(&rec.id);
    app.sched.wake();
    let fallback = json!({"v": nova_dataflow::EVENT_SCHEMA_VERSION, "job": rec.id, "type": last["type"], "data": last["data"]});
    app.relay.end(&tag, last, app.queue_remaining(), fallback);
    app.metrics
        .job_finished(outcome_name, began.elapsed().as_secs_f64());
    let _guard = rt.enter();
    super::webhook::spawn(app, rec);
}
