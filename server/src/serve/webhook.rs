//! Completion webhooks: when a job ends, its outcome is POSTed as JSON to the service's
//! `--webhook` and to the job's own `extra_data.nova.webhook`.
//!
//! Delivery is retried on connection errors and non-2xx answers, `webhook_attempts` times,
//! the wait doubling from `webhook_backoff`; each attempt's result is recorded in the job's
//! record (`GET /api/jobs/{id}` shows it). Only `http://` URLs: the build carries no TLS
//! stack (a reverse proxy or a local relay can forward to https).
//!
//! Body: `{"prompt_id", "status": "success"|"error"|"interrupted", "outputs", "error",
//! "started_ms", "finished_ms", "number", "priority"}`.

use super::store::{JobRecord, WebhookDelivery};
use super::App;
use serde_json::json;
use std::sync::Arc;

/// Checks that a webhook URL is one this build can deliver to.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook '{url}': {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!(
            "webhook '{url}': only http:// URLs are supported (this build has no TLS)"
        ));
    }
    if parsed.host_str().is_none() {
        return Err(format!("webhook '{url}': no host"));
    }
    Ok(())
}

/// Delivers a finished job's webhooks in the background, if it has any.
pub(crate) fn spawn(app: Arc<App>, rec: JobRecord) {
    let mut urls: Vec<String> = app.config.webhook.iter().cloned().collect();
    if let Some(u) = rec
        .extra_data
        .get("nova")
        .and_then(|n| n.get("webhook"))
        .and_then(|u| u.as_str())
    {
        urls.push(u.to_string());
    }
    if urls.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let body = json!({
            "prompt_id": rec.id,
            "status": rec.state,
            "outputs": rec.outputs,
            "error": rec.error,
            "started_ms": rec.started_ms,
            "finished_ms": rec.finished_ms,
            "number": rec.number,
            "priority": rec.priority,
        });
        let mut deliveries = vec![];
        for url in urls {
            deliveries.push(deliver(&app, &url, &body).await);
        }
        // Record the outcome on the latest version of the record.
        if let Ok(Some(mut latest)) = app.store.get(&rec.id) {
            latest.webhooks = deliveries;
            if let Err(e) = app.store.update(latest).await {
                eprintln!("nova serve: recording webhook delivery of {}: {e}", rec.id);
            }
        }
    });
}

async fn deliver(app: &App, url: &str, body: &serde_json::Value) -> WebhookDelivery {
    let mut d = WebhookDelivery {
        url: url.to_string(),
        ..WebhookDelivery::default()
    };
    let mut wait = app.config.webhook_backoff;
    for attempt in 1..=app.config.webhook_attempts.max(1) {
        d.attempts = attempt;
        let r = app
            .http
            .post(url)
            .json(body)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                d.delivered = true;
                d.last_error = None;
                app.metrics.webhook("delivered");
                return d;
            }
            Ok(resp) => d.last_error = Some(format!("HTTP {}", resp.status())),
            Err(e) => d.last_error = Some(e.to_string()),
        }
        app.metrics.webhook("retry");
        if attempt < app.config.webhook_attempts {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    app.metrics.webhook("failed");
    d
}
