//! Prometheus metrics at `/metrics` (OpenMetrics text, through `prometheus-client`, the
//! Prometheus project's own Rust client).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `nova_http_requests_total` | counter | `method`, `route` (the matched route), `status` |
//! | `nova_prompt_accept_seconds` | histogram | — (validation, planning and the durable commit of `/prompt`) |
//! | `nova_jobs_finished_total` | counter | `outcome` (`success`, `error`, `interrupted`) |
//! | `nova_job_seconds` | histogram | — (wall time of jobs that ran) |
//! | `nova_queue_pending`, `nova_jobs_running` | gauge | — |
//! | `nova_device_budget_bytes`, `nova_device_reserved_bytes` | gauge | — |
//! | `nova_ws_clients`, `nova_sse_clients` | gauge | — |
//! | `nova_client_messages_dropped_total` | counter | — (previews/progress dropped for slow clients) |
//! | `nova_webhook_attempts_total` | counter | `result` (`delivered`, `retry`, `failed`) |

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

type Labels = Vec<(String, String)>;

/// Every metric of the service.
pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    http: Family<Labels, Counter>,
    accept: Histogram,
    jobs: Family<Labels, Counter>,
    job_seconds: Histogram,
    pub pending: Gauge,
    pub running: Gauge,
    pub budget: Gauge,
    pub reserved: Gauge,
    pub ws_clients: Gauge,
    pub sse_clients: Gauge,
    dropped: Counter,
    webhooks: Family<Labels, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            http: Family::default(),
            accept: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            jobs: Family::default(),
            job_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            pending: Gauge::default(),
            running: Gauge::default(),
            budget: Gauge::default(),
            reserved: Gauge::default(),
            ws_clients: Gauge::default(),
            sse_clients: Gauge::default(),
            dropped: Counter::default(),
            webhooks: Family::default(),
            registry: Mutex::new(Registry::default()),
        };
        r.register(
            "nova_http_requests",
            "HTTP requests answered",
            m.http.clone(),
        );
        r.register(
            "nova_prompt_accept_seconds",
            "Time to validate, plan and durably queue a /prompt submission",
            m.accept.clone(),
        );
        r.register(
            "nova_jobs_finished",
            "Jobs that ended, by outcome",
            m.jobs.clone(),
        );
        r.register(
            "nova_job_seconds",
            "Wall time of jobs that ran",
            m.job_seconds.clone(),
        );
        r.register(
            "nova_queue_pending",
            "Jobs waiting in the queue",
            m.pending.clone(),
        );
        r.register("nova_jobs_running", "Jobs running now", m.running.clone());
        r.register(
            "nova_device_budget_bytes",
            "Device memory budget minus headroom",
            m.budget.clone(),
        );
        r.register(
            "nova_device_reserved_bytes",
            "Device memory reserved by running jobs' forecasts",
            m.reserved.clone(),
        );
        r.register(
            "nova_ws_clients",
            "Connected WebSocket clients",
            m.ws_clients.clone(),
        );
        r.register(
            "nova_sse_clients",
            "Connected SSE clients",
            m.sse_clients.clone(),
        );
        r.register(
            "nova_client_messages_dropped",
            "Previews and progress messages dropped for slow clients",
            m.dropped.clone(),
        );
        r.register(
            "nova_webhook_attempts",
            "Webhook delivery attempts by result",
            m.webhooks.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }

    pub(crate) fn http(&self, method: &str, route: &str, status: u16) {
        self.http
            .get_or_create(&vec![
                ("method".into(), method.into()),
                ("route".into(), route.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
    }

    pub(crate) fn accepted(&self, seconds: f64) {
        self.accept.observe(seconds);
    }

    pub(crate) fn job_finished(&self, outcome: &str, seconds: f64) {
        self.jobs
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
        if seconds > 0.0 {
            self.job_seconds.observe(seconds);
        }
    }

    pub(crate) fn webhook(&self, result: &str) {
        self.webhooks
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }

    /// Brings the dropped-message counter up to the hub's total.
    pub(crate) fn set_dropped(&self, total: u64) {
        let now = self.dropped.get();
        if total > now {
            self.dropped.inc_by(total - now);
        }
    }

    /// The OpenMetrics text.
    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut s, &r).is_err() {
            s.clear();
        }
        s
    }
}
