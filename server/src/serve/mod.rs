//! `nova serve`: the long-running service. ComfyUI's HTTP and WebSocket API (at `/` and under
//! `/api/`, as ComfyUI registers them), NOVA's additions under `/api/`, `/health/vram`,
//! `/metrics` and `/openapi.json`, and the studio's built files at `/`.
//!
//! Start-up is staged so the API answers at once: the process opens the queue database (and
//! applies the restart policy), binds the socket and serves; the node registry, device
//! detection and the model index warm up in the background (`/system_stats` and
//! `/api/system/stats` show the stage). Requests that need the registry wait for it.
//!
//! Stopping (SIGINT/SIGTERM) ends the process without finishing running jobs: they stay
//! recorded as running, and the next start applies the restart policy to them exactly as after
//! a crash, so there is one recovery path.
//!
//! Dependencies: `tokio` and `axum` (HTTP/WebSocket, the field's standard), `hyper` and
//! `hyper-util` (axum's own HTTP/1 server, used directly for its header read timeout, which
//! `axum::serve` does not set), `tower-http` (static files with ranges and traversal checks;
//! request body timeouts), `redb` (the embedded, crash-safe queue database: pure Rust, ACID,
//! no server), `uuid` (ComfyUI's prompt ids), `sha2` (model hashes as hubs publish them),
//! `prometheus-client` (metrics), `reqwest` (webhook delivery; also the tests' HTTP client),
//! `url` (browsers' parsing of webhook hosts), `libc` (the open-files limit, socket buffer
//! sizes), `futures-util` (SSE streams), `nova-media` (uploads checked by FFmpeg's probe) and
//! `nova-engines` (the temporal cache the scheduler keeps within the budget).

pub mod config;

mod api;
mod comfy;
mod files;
mod hub;
mod listen;
mod metrics;
mod models;
mod native;
mod relay;
mod scheduler;
mod security;
mod store;
mod webhook;
mod ws;

pub use config::{RestartPolicy, ServeConfig};
pub use store::Priority;

use crate::job::JobSpec;
use hub::Hub;
use metrics::Metrics;
use models::ModelIndex;
use nova_dataflow::profile::{detect, Detection};
use nova_dataflow::{Bytes, JobEnv, MemoryConfig, NodeRegistry};
use relay::Relay;
use scheduler::Scheduler;
use serde_json::Value as Json;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use store::Store;

/// What start-up warms in the background.
pub(crate) struct Warmed {
    pub registry: NodeRegistry,
    pub object_info: Json,
    pub detection: Detection,
    /// The service's memory settings resolved against the detected device.
    pub memory: MemoryConfig,
}

/// Start-up stages and the warmed state.
pub(crate) struct Warm {
    cell: tokio::sync::OnceCell<Arc<Warmed>>,
    /// (stage, ms since the process started) in the order reached.
    stages: Mutex<Vec<(&'static str, f64)>>,
}

impl Warm {
    pub(crate) fn get(&self) -> Option<&Arc<Warmed>> {
        self.cell.get()
    }

    pub(crate) async fn wait_registry(&self) {
        while self.cell.get().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub(crate) fn stage(&self) -> &'static str {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(|s| s.0)
            .unwrap_or("starting")
    }

    pub(crate) fn stages(&self) -> Vec<(&'static str, f64)> {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn enter(&self, stage: &'static str, started: Instant) {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stage, started.elapsed().as_secs_f64() * 1e3));
    }
}

/// The service's shared state.
pub(crate) struct App {
    pub config: ServeConfig,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub relay: Relay,
    pub sched: Scheduler,
    pub metrics: Metrics,
    pub warm: Warm,
    pub models: ModelIndex,
    pub started: Instant,
    /// Uploads received at once ([`ServeConfig::max_uploads`]).
    pub uploads: tokio::sync::Semaphore,
    /// The `Host` names requests may use (see [`security`]), from the address actually bound
    /// (the configured port may be 0).
    pub hosts: Option<Vec<String>>,
    /// Where jobs' own webhooks may go.
    pub webhooks: webhook::Policy,
}

impl App {
    /// The warmed registry and settings, warming them if no one has yet.
    pub(crate) async fn warmed(&self) -> Arc<Warmed> {
        self.warm
            .cell
            .get_or_init(|| async {
                let memory = self.config.memory.clone();
                tokio::task::spawn_blocking(move || {
                    let registry = nova_operators::registry();
                    let object_info = registry.object_info();
                    let detection = detect();
                    let memory = MemoryConfig::resolve(&memory, &detection);
                    Arc::new(Warmed {
                        registry,
                        object_info,
                        detection,
                        memory,
                    })
                })
                .await
                .expect("warming the registry does not panic")
            })
            .await
            .clone()
    }

    /// The folders a job reads and writes.
    pub(crate) fn job_env(&self) -> JobEnv {
        JobEnv::new(
            self.config.input_dir(),
            self.config.output_dir(),
            self.config.temp_dir(),
        )
        .with_models_dir(self.config.models_dir())
        .with_extra_models((*self.config.extra_models).clone())
        .with_preview(self.config.preview_method)
    }

    /// What to prepare a job from. A job's `extra_data.nova` may narrow the service's budget
    /// (by a budget or a smaller profile), never widen it, and cannot change admission.
    pub(crate) fn job_spec<'a>(
        &self,
        warm: &'a Warmed,
        prompt: Json,
        extra_data: Option<&Json>,
        free: Option<Bytes>,
    ) -> Result<JobSpec<'a>, String> {
        let mut workflow = crate::job::workflow_overrides(extra_data)?;
        workflow.admission = None;
        Ok(JobSpec {
            prompt,
            env: self.job_env(),
            overrides: self.config.memory.clone(),
            workflow,
            from_env: Default::default(),
            detection: std::borrow::Cow::Borrowed(&warm.detection),
            registry: &warm.registry,
            workers: self.config.workers,
            free_limit: free,
            budget_cap: warm.memory.budget,
        })
    }

    /// ComfyUI's `queue_remaining`: queued plus running.
    pub(crate) fn queue_remaining(&self) -> u64 {
        self.store.counts().map(|(q, r, _)| q + r).unwrap_or(0)
    }
}

/// Exit code: the data folder or the database could not be opened, or the address bound.
const EXIT_IO: u8 = 5;

/// Runs the service until SIGINT/SIGTERM.
pub fn serve(config: ServeConfig) -> ExitCode {
    let started = Instant::now();
    if let Err(m) = config.check() {
        eprintln!("nova serve: {m}");
        return ExitCode::from(crate::cli::EXIT_USAGE);
    }
    for dir in [
        config.input_dir(),
        config.output_dir(),
        config.temp_dir(),
        config.models_dir(),
    ] {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("nova serve: cannot create {}: {e}", dir.display());
            return ExitCode::from(EXIT_IO);
        }
    }
    let (store, recovery) = match open_store(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if recovery.stale_removed > 0 {
        eprintln!(
            "nova serve: removed {} stale queue entries left by an older version",
            recovery.stale_removed
        );
    }
    if !recovery.requeued.is_empty() || !recovery.failed.is_empty() {
        eprintln!(
            "nova serve: the last run stopped with jobs running: {} requeued, {} marked failed",
            recovery.requeued.len(),
            recovery.failed.len()
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nova-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nova serve: cannot start the runtime: {e}");
            return ExitCode::from(crate::cli::EXIT_INTERNAL);
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("nova serve: cannot listen on {}: {e}", config.listen);
                return ExitCode::from(EXIT_IO);
            }
        };
        let addr = listener.local_addr().unwrap_or(config.listen);
        let hub = Arc::new(Hub::new(config.client_buffer, config.client_hard_limit));
        let relay = match Relay::start(hub.clone()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("nova serve: cannot start the relay thread: {e}");
                return ExitCode::from(crate::cli::EXIT_INTERNAL);
            }
        };
        let models = ModelIndex::load(&store);
        let paused = store.paused().unwrap_or(false);
        if paused {
            eprintln!("nova serve: the queue is held (as it was left); POST /api/queue/resume releases it");
        }
        let app = Arc::new(App {
            relay,
            hub,
            store,
            sched: Scheduler::held(paused),
            metrics: Metrics::new(),
            warm: Warm {
                cell: tokio::sync::OnceCell::new(),
                stages: Mutex::new(vec![]),
            },
            models,
            started,
            uploads: tokio::sync::Semaphore::new(config.max_uploads),
            hosts: security::expected_hosts(addr, &config.allow_hosts),
            webhooks: webhook::Policy {
                allow: config
                    .webhook_allow
                    .iter()
                    .filter_map(|e| webhook::AllowEntry::parse(e).ok())
                    .collect(),
                own: Some(addr),
            },
            config,
        });
        app.warm.enter("warming", started);
        let router = api::router(app.clone());
        eprintln!(
            "nova serve: listening on http://{addr} (data folder {})",
            app.config.data_dir.display()
        );
        // Warm-up: registry and detection, then the model index.
        {
            let app = app.clone();
            tokio::spawn(async move {
                let w = app.warmed().await;
                eprintln!("nova serve: {}", crate::job::memory_line(&w.memory));
                app.warm.enter("indexing", app.started);
                let app2 = app.clone();
                let report =
                    tokio::task::spawn_blocking(move || app2.models.refresh(&app2.store, &native::model_roots(&app2)))
                        .await
                        .unwrap_or_default();
                eprintln!(
                    "nova serve: model index: {} file(s), {} read, {} unchanged, {} removed ({:.0} ms)",
                    report.files, report.read, report.unchanged, report.removed, report.ms
                );
                app.warm.enter("ready", app.started);
            });
        }
        tokio::spawn(scheduler::schedule(app.clone()));
        // No graceful drain: open WebSockets would hold it forever, and running jobs are
        // recovered by the restart policy (see the module docs).
        let served_config = app.config.clone();
        tokio::select! {
            () = listen::serve(listener, router, &served_config) => ExitCode::SUCCESS,
            _ = shutdown_signal() => {
                eprintln!("nova serve: stopping");
                ExitCode::SUCCESS
            }
        }
    })
}

/// Opens the queue database. A corrupt file stops start-up (exit 5, naming the file and the
/// way out) unless `--reset-corrupt-queue` says to move it aside and start empty.
fn open_store(config: &ServeConfig) -> Result<(Store, store::Recovery), ExitCode> {
    let path = config.db_path();
    let open = || Store::open(&path, config.on_restart, config.max_attempts);
    match open() {
        Ok(s) => Ok(s),
        Err(e) if e.kind == store::OpenErrorKind::Corrupt && config.reset_corrupt_queue => {
            match Store::move_aside(&path) {
                Ok(aside) => {
                    eprintln!(
                        "nova serve: {e}; moved it aside to {} (kept) and starting with an empty queue",
                        aside.display()
                    );
                    open().map_err(|e| {
                        eprintln!("nova serve: {e}");
                        ExitCode::from(EXIT_IO)
                    })
                }
                Err(io) => {
                    eprintln!("nova serve: {e}; moving it aside failed: {io}");
                    Err(ExitCode::from(EXIT_IO))
                }
            }
        }
        Err(e) if e.kind == store::OpenErrorKind::Corrupt => {
            eprintln!(
                "nova serve: {e}\nnova serve: the queue file is corrupt; to keep it and start \
                 with an empty queue, run again with --reset-corrupt-queue (it is renamed to \
                 {}.corrupt-<time>, not deleted)",
                path.display()
            );
            Err(ExitCode::from(EXIT_IO))
        }
        Err(e) => {
            eprintln!("nova serve: {e}");
            Err(ExitCode::from(EXIT_IO))
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
