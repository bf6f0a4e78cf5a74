//! The service's settings: one typed [`ServeConfig`], resolved from `nova serve`'s flags and the
//! environment (flags win), printed by `nova serve --print-config`. Defaults are documented
//! beside each field.

use nova_dataflow::{Bytes, MemoryOverrides, ModelPaths, PreviewMethod};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What happens, at start-up, to jobs that were running when the service last stopped without
/// finishing them (a crash, `kill -9`, power loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Put them back at the head of their priority, unless they have already been started
    /// [`ServeConfig::max_attempts`] times (then they are marked failed: a job that brings the
    /// service down must not do it forever).
    Requeue,
    /// Mark them failed, with the reason, in the history.
    Fail,
}

impl RestartPolicy {
    pub(crate) fn parse(s: &str) -> Result<RestartPolicy, String> {
        match s.to_ascii_lowercase().as_str() {
            "requeue" => Ok(RestartPolicy::Requeue),
            "fail" => Ok(RestartPolicy::Fail),
            _ => Err(format!("'{s}': expected requeue or fail")),
        }
    }
}

/// Every setting of `nova serve`.
#[derive(Clone, Debug, Serialize)]
pub struct ServeConfig {
    /// Address to listen on. Default `127.0.0.1:8188` (ComfyUI's port, loopback only).
    pub listen: SocketAddr,
    /// The data folder: `input/`, `output/`, `temp/`, `models/`, `queue.redb`. Default
    /// `./nova-data`; `NOVA_DATA_DIR`.
    pub data_dir: PathBuf,
    /// API token clients must present (`Authorization: Bearer`, or `?token=` where a header
    /// cannot be set, as on a browser's WebSocket). Required when `listen` is not loopback.
    /// `NOVA_API_TOKEN`. Never printed.
    #[serde(skip)]
    pub token: Option<String>,
    /// Whether a token is set (what `--print-config` shows instead of the token).
    pub token_set: bool,
    /// Jobs run at once, each admitted against the budget still free. Default 1;
    /// `NOVA_MAX_JOBS`.
    pub max_jobs: usize,
    /// Worker threads per job. Default: the machine's cores.
    pub workers: usize,
    /// Uploads received at once; more wait their turn. Default 8.
    pub max_uploads: usize,
    /// How long an upload waits for its turn before it is answered 503. Default 30 s.
    #[serde(with = "millis")]
    pub upload_wait: Duration,
    /// Largest request body (workflows, JSON). Default 16 MiB.
    pub max_body: Bytes,
    /// Largest upload. Default 100 MiB (ComfyUI's).
    pub max_upload: Bytes,
    /// Time a client has to send a request's headers (and a kept-alive connection to start
    /// its next request) before the connection is closed. Default 10 s.
    #[serde(with = "millis")]
    pub header_timeout: Duration,
    /// Longest a request body may go without sending data. Default 30 s.
    #[serde(with = "millis")]
    pub body_timeout: Duration,
    /// Connections open at once (WebSockets included); more are answered 503 and closed.
    /// Default 4096, lowered to fit the open-files limit.
    pub max_connections: usize,
    /// Most nodes one workflow may have (`/prompt`, `/api/plan`, `/api/optimize` answer 413
    /// beyond). Default 10,000; `NOVA_MAX_NODES`.
    pub max_nodes: usize,
    /// At start-up, a queue database that is corrupt (empty, truncated, damaged) is moved
    /// aside (`queue.redb.corrupt-<ms>`, kept) and the service starts with an empty queue;
    /// without it such a file stops start-up with exit 5. A healthy file is never touched.
    /// Default off.
    pub reset_corrupt_queue: bool,
    /// Origins (scheme://host:port) allowed besides the service's own, for browsers' WebSocket
    /// and state-changing requests. Default none.
    pub allow_origins: Vec<String>,
    /// Host names the service answers to besides its listening address (and, on loopback,
    /// `localhost`/`127.0.0.1`/`[::1]`): a reverse proxy's name. Requests naming another host
    /// get 403 (DNS rebinding). Default none.
    pub allow_hosts: Vec<String>,
    /// Droppable messages (progress, previews, partial outputs, telemetry) the service keeps
    /// for clients that fall behind, in one log all clients share (and at most 64 MiB of
    /// them); a client further behind skips ahead, getting the newest progress and preview of
    /// each node. Results are never dropped: a client that falls
    /// [`ServeConfig::client_hard_limit`] results behind is disconnected and can read
    /// `/history`. Default 65536.
    pub client_buffer: usize,
    /// See `client_buffer`. Default 16384.
    pub client_hard_limit: usize,
    /// Folder of the studio's built files, served at `/`. Default `studio/dist` when present;
    /// `NOVA_STUDIO_DIR`.
    pub studio_dir: Option<PathBuf>,
    /// See [`RestartPolicy`]. Default requeue.
    pub on_restart: RestartPolicy,
    /// Times a job may be started before a restart marks it failed instead. Default 2.
    pub max_attempts: u32,
    /// A URL every finished job is POSTed to (besides a job's own
    /// `extra_data.nova.webhook`). Default none; `NOVA_WEBHOOK`.
    pub webhook: Option<String>,
    /// Targets a job's own webhook (`extra_data.nova.webhook`) may have: `HOST[:PORT]`,
    /// `IP[:PORT]` or `CIDR[:PORT]` entries (see the webhook module). Empty (the default): jobs
    /// cannot name webhooks. `NOVA_WEBHOOK_ALLOW`, comma-separated.
    pub webhook_allow: Vec<String>,
    /// Delivery attempts per webhook; the wait doubles from `webhook_backoff`. Default 5.
    pub webhook_attempts: u32,
    /// First wait between webhook attempts. Default 500 ms.
    #[serde(with = "millis")]
    pub webhook_backoff: Duration,
    /// The service's memory settings (flags and environment); a job's `extra_data.nova` may
    /// narrow them, never widen the budget.
    #[serde(skip)]
    pub memory: MemoryOverrides,
    /// How samplers preview their steps.
    pub preview_method: PreviewMethod,
    /// More model folders (ComfyUI's `extra_model_paths.yaml`).
    #[serde(skip)]
    pub extra_models: Arc<ModelPaths>,
}

mod millis {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

impl ServeConfig {
    /// Defaults for a data folder (what tests and library users start from).
    pub fn new(data_dir: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8188)),
            data_dir: data_dir.into(),
            token: None,
            token_set: false,
            max_jobs: 1,
            workers: nova_dataflow::exec::default_workers(),
            max_body: Bytes::mib(16),
            max_upload: Bytes::mib(100),
            max_uploads: 8,
            upload_wait: Duration::from_secs(30),
            max_nodes: 10_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 4096,
            reset_corrupt_queue: false,
            allow_origins: vec![],
            allow_hosts: vec![],
            client_buffer: 65536,
            client_hard_limit: 16384,
            studio_dir: None,
            on_restart: RestartPolicy::Requeue,
            max_attempts: 2,
            webhook: None,
            webhook_allow: vec![],
            webhook_attempts: 5,
            webhook_backoff: Duration::from_millis(500),
            memory: MemoryOverrides::default(),
            preview_method: PreviewMethod::Auto,
            extra_models: Arc::new(ModelPaths::none()),
        }
    }

    /// Checks settings that only make sense together.
    pub fn check(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && self.token.is_none() {
            return Err(format!(
                "listening on {} (not loopback) needs an API token: set --token or NOVA_API_TOKEN",
                self.listen
            ));
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.header_timeout.is_zero() || self.body_timeout.is_zero() {
            return Err("--header-timeout and --body-timeout must be more than 0".into());
        }
        if self.max_uploads == 0 {
            return Err("--max-uploads must be at least 1".into());
        }
        if self.max_nodes == 0 {
            return Err("--max-nodes must be at least 1".into());
        }
        if self.max_jobs == 0 {
            return Err("--max-jobs must be at least 1".into());
        }
        if self.client_buffer == 0 || self.client_hard_limit == 0 {
            return Err("--client-buffer must be at least 1".into());
        }
        if let Some(w) = &self.webhook {
            super::webhook::check_url(w)?;
        }
        for e in &self.webhook_allow {
            super::webhook::AllowEntry::parse(e)?;
        }
        Ok(())
    }

    pub(crate) fn input_dir(&self) -> PathBuf {
        self.data_dir.join("input")
    }
    pub(crate) fn output_dir(&self) -> PathBuf {
        self.data_dir.join("output")
    }
    pub(crate) fn temp_dir(&self) -> PathBuf {
        self.data_dir.join("temp")
    }
    pub(crate) fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }
    pub(crate) fn db_path(&self) -> PathBuf {
        self.data_dir.join("queue.redb")
    }
}
