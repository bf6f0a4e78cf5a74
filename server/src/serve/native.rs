//! NOVA's own routes (described in `server/openapi.json`, served at `/openapi.json`):
//! `GET /api/system/stats`, `POST /api/system/cleanup`, `GET /health`, `GET /health/vram`,
//! `GET /api/events` (Server-Sent Events), `GET /api/jobs/{id}`, `POST /api/plan`,
//! `POST /api/optimize` (Auto-Optimize, see [`crate::optimize`]),
//! `GET /api/model_index`, `POST /api/model_index/refresh`, `POST /api/queue/pause`,
//! `POST /api/queue/resume`, `GET /metrics`; and the studio's
//! static files at `/`.
//!
//! Device memory state, as `/api/system/stats` and `/health/vram` report it: the share of the
//! usable budget (budget minus headroom) that running jobs reserved — `LOW` under 50%,
//! `MODERATE` under 75%, `HIGH` up to 90%, `CRITICAL` above (then `/health/vram` answers 503);
//! `UNKNOWN` when the device memory could not be read.

use super::api::{ram, MODEL_KINDS};
use super::hub::{Channel, Client, Out};
use super::App;
use crate::job::{self, PrepareError};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

/// Routes under `/api/`.
pub(crate) fn api_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/system/stats", get(stats))
        .route("/system/cleanup", post(cleanup))
        .route("/events", get(events))
        .route("/jobs/{id}", get(job))
        .route("/plan", post(plan))
        .route("/optimize", post(optimize))
        .route("/model_index", get(model_index))
        .route("/model_index/refresh", post(model_index_refresh))
        .route("/queue/pause", post(pause))
        .route("/queue/resume", post(resume))
}

/// Holds the queue: jobs are accepted and queued but none starts until `resume`. The held
/// state is stored, so a restart keeps it.
async fn pause(State(app): State<Arc<App>>) -> Response {
    hold(&app, true).await
}

async fn resume(State(app): State<Arc<App>>) -> Response {
    hold(&app, false).await
}

async fn hold(app: &App, paused: bool) -> Response {
    if let Err(e) = app.store.set_paused(paused).await {
        return super::api::store_error(e);
    }
    app.sched.set_paused(paused);
    Json(json!({ "paused": paused })).into_response()
}

/// Routes outside `/api/`.
pub(crate) fn top_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/health", get(health))
        .route("/health/vram", get(health_vram))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

/// The studio's files, or a note that they are not built.
pub(crate) fn studio_service(app: &App) -> axum::routing::MethodRouter<Arc<App>> {
    match app.config.studio_dir.clone().filter(|d| d.is_dir()) {
        Some(dir) => {
            let index = dir.join("index.html");
            axum::routing::get_service(
                tower_http::services::ServeDir::new(dir)
                    .fallback(tower_http::services::ServeFile::new(index)),
            )
        }
        None => get(|| async {
            (
                StatusCode::NOT_FOUND,
                "NOVA is running. The studio's files are not built (studio/dist); the API is \
                 described at /openapi.json and ComfyUI's routes are at /prompt, /ws, ...",
            )
        }),
    }
}

/// The usable budget and what running jobs reserved.
fn memory_now(app: &App) -> (Option<u64>, u64) {
    let usable = app.warm.get().and_then(|w| w.memory.usable()).map(|b| b.0);
    (usable, app.sched.reserved())
}

/// `LOW` / `MODERATE` / `HIGH` / `CRITICAL` / `UNKNOWN` (see the module docs).
pub(crate) fn memory_state(usable: Option<u64>, used: u64) -> (&'static str, Option<f64>) {
    let Some(u) = usable.filter(|u| *u > 0) else {
        return ("UNKNOWN", None);
    };
    let f = used as f64 / u as f64;
    let s = if f < 0.5 {
        "LOW"
    } else if f < 0.75 {
        "MODERATE"
    } else if f <= 0.9 {
        "HIGH"
    } else {
        "CRITICAL"
    };
    (s, Some(f))
}

/// ComfyUI's `devices` list.
pub(crate) fn devices(app: &App) -> Vec<Value> {
    let Some(w) = app.warm.get() else {
        return vec![];
    };
    let (usable, reserved) = memory_now(app);
    let budget = w.memory.budget.map(|b| b.0).unwrap_or(0);
    let free = usable.unwrap_or(0).saturating_sub(reserved);
    if w.detection.gpus.is_empty() {
        return vec![json!({
            "name": "cpu", "type": "cpu", "index": null,
            "vram_total": budget, "vram_free": free,
            "torch_vram_total": budget, "torch_vram_free": free,
        })];
    }
    w.detection
        .gpus
        .iter()
        .map(|g| {
            json!({
                "name": g.name, "type": "cuda", "index": g.index,
                "vram_total": g.total.0, "vram_free": g.free.0,
                "torch_vram_total": budget, "torch_vram_free": free,
            })
        })
        .collect()
}

async fn stats(State(app): State<Arc<App>>) -> Json<Value> {
    let (usable, reserved) = memory_now(&app);
    let (state, fraction) = memory_state(usable, reserved);
    let (queued, running, finished) = app.store.counts().unwrap_or((0, 0, 0));
    let pending = app.store.pending().unwrap_or_default();
    let by_priority: serde_json::Map<String, Value> = super::store::Priority::ALL
        .iter()
        .map(|p| {
            let n = pending.iter().filter(|r| r.priority == *p).count();
            (p.name().to_string(), json!(n))
        })
        .collect();
    let (ws, sse) = app.hub.counts();
    let held = app.hub.held();
    let (ram_total, ram_free) = ram();
    let warm = app.warm.get();
    let optimizations: Vec<String> = warm
        .map(|w| {
            let m = &w.memory;
            let mut o = vec![];
            if m.tile > 0 {
                o.push(format!("tiling (tiles up to {} px)", m.tile));
            }
            o.push(format!("precision {:?}", m.profile.precision).to_lowercase());
            if !m.profile.quantization.is_empty() {
                o.push(format!(
                    "quantization allowed: {}",
                    m.profile.quantization.join(",")
                ));
            }
            o.push(format!(
                "weight prefetch depth {}",
                m.profile.prefetch_depth
            ));
            o.push("memory-mapped weights, streamed when over budget".into());
            o.push(format!("admission {:?}", m.admission).to_lowercase());
            o
        })
        .unwrap_or_default();
    let db = app.store.health();
    Json(json!({
        "stage": app.warm.stage(),
        "uptime_ms": app.started.elapsed().as_secs_f64() * 1e3,
        "status": if db.ok { "ok" } else { "degraded" },
        "queue_db": db,
        "device": {
            "profile": warm.map(|w| w.memory.profile.id.name()),
            "profile_reason": warm.map(|w| w.memory.reason.clone()),
            "budget_bytes": warm.and_then(|w| w.memory.budget.map(|b| b.0)),
            "headroom_bytes": warm.map(|w| w.memory.headroom.0),
            "usable_bytes": usable,
            "reserved_bytes": reserved,
            "free_bytes": usable.map(|u| u.saturating_sub(reserved)),
            "used_fraction": fraction,
            "state": state,
            "gpus": warm.map(|w| w.detection.gpus.clone()).unwrap_or_default(),
        },
        "system": { "ram_total": ram_total, "ram_free": ram_free },
        "models": nova_dataflow::residency::Registry::global().status(),
        "queue": {
            "pending": queued, "running": running, "finished": finished,
            "pending_by_priority": by_priority, "max_jobs": app.config.max_jobs,
            "paused": app.sched.paused(),
        },
        "optimizations": optimizations,
        "clients": {
            "websocket": ws, "sse": sse, "dropped_messages": app.hub.dropped(),
            "held_messages": held.0 + held.1, "held_bytes": held.2,
        },
    }))
}

async fn cleanup(State(app): State<Arc<App>>) -> Json<Value> {
    let deltas = nova_dataflow::residency::Registry::global().release_unpinned();
    let (usable, reserved) = memory_now(&app);
    Json(json!({
        "released": deltas,
        "reserved_bytes": reserved,
        "free_bytes": usable.map(|u| u.saturating_sub(reserved)),
    }))
}

/// The service's health: `ok`, or `degraded` (503) while the queue database cannot take
/// writes (a full disk; see the store's degraded mode) — new jobs are refused then, and
/// everything already accepted is kept.
async fn health(State(app): State<Arc<App>>) -> Response {
    let db = app.store.health();
    let body = json!({
        "status": if db.ok { "ok" } else { "degraded" },
        "queue_db": db,
        "stage": app.warm.stage(),
    });
    let code = if db.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn health_vram(State(app): State<Arc<App>>) -> Response {
    let (usable, reserved) = memory_now(&app);
    let (state, fraction) = memory_state(usable, reserved);
    let body = json!({
        "status": if state == "CRITICAL" { "critical" } else { "ok" },
        "state": state,
        "used_fraction": fraction,
        "usable_bytes": usable,
        "reserved_bytes": reserved,
        "stage": app.warm.stage(),
    });
    let code = if state == "CRITICAL" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    prompt_id: Option<String>,
}

/// Removes an SSE client when its stream is dropped (the client went away).
struct SseGuard {
    app: Arc<App>,
    client: Arc<Client>,
}

impl Drop for SseGuard {
    fn drop(&mut self) {
        self.app.hub.remove(self.client.conn);
    }
}

/// Server-Sent Events: NOVA's event schema (one `data:` line each, the SSE event name being
/// the event's `type`), for one job (`?prompt_id=`) or every job.
async fn events(
    State(app): State<Arc<App>>,
    Query(q): Query<EventsQuery>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let client = app.hub.add(
        uuid::Uuid::new_v4().simple().to_string(),
        Channel::Sse { job: q.prompt_id },
    );
    let guard = SseGuard { app, client };
    let stream = futures_util::stream::unfold(guard, |g| async move {
        let batch = g.app.hub.next_batch(&g.client, 64).await?;
        let events: Vec<Result<SseEvent, Infallible>> = batch
            .into_iter()
            .map(|out| {
                let Out::Text(t) = out else {
                    return Ok(SseEvent::default().comment("binary"));
                };
                let name = serde_json::from_str::<Value>(t.as_str())
                    .ok()
                    .and_then(|v| v.get("type").and_then(|x| x.as_str()).map(str::to_string))
                    .unwrap_or_else(|| "message".into());
                Ok(SseEvent::default().event(name).data(t.as_str()))
            })
            .collect();
        Some((futures_util::stream::iter(events), g))
    });
    let stream = futures_util::StreamExt::flatten(stream);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.store.get(&id) {
        Ok(Some(r)) => {
            let position = app
                .store
                .pending()
                .ok()
                .and_then(|p| p.iter().position(|x| x.id == id));
            Json(json!({
                "prompt_id": r.id, "number": r.number, "priority": r.priority, "state": r.state,
                "queue_position": position, "attempts": r.attempts,
                "created_ms": r.created_ms, "started_ms": r.started_ms, "finished_ms": r.finished_ms,
                "forecast_peak_bytes": r.forecast_peak_bytes, "tracked_peak_bytes": r.tracked_peak_bytes,
                "error": r.error, "outputs": r.outputs, "webhooks": r.webhooks, "timing": r.timing,
            }))
            .into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `nova plan --json` over HTTP: body `{"prompt": ..., "extra_data": ...}`.
async fn plan(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let (v, prompt) = match super::api::parse_prompt_body(&body, app.config.max_nodes) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match super::api::prepare_prompt(&app, &prompt, v.get("extra_data")).await {
        Ok(p) => Json(job::plan_json(&p)).into_response(),
        Err(r) => *r,
    }
}

/// Auto-Optimize: body `{"prompt": ..., "extra_data": ...}`; answers the workflow with the
/// planner's choices applied and the list of changes.
async fn optimize(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let (v, prompt) = match super::api::parse_prompt_body(&body, app.config.max_nodes) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let extra = v.get("extra_data").cloned().unwrap_or(Value::Null);
    let warm = app.warmed().await;
    // Planning (several times) runs off the async threads.
    let (app2, warm2, prompt2) = (app.clone(), warm.clone(), prompt.clone());
    let out = tokio::task::spawn_blocking(move || {
        crate::optimize::optimize(&prompt2, &extra, |p, e| {
            let spec = app2
                .job_spec(&warm2, p.clone(), Some(e), None)
                .map_err(PrepareError::Plan)?;
            job::prepare(spec)
        })
    })
    .await
    .unwrap_or_else(|_| {
        Err(PrepareError::Plan(
            "planning the job panicked (this is a bug)".into(),
        ))
    });
    match out {
        Ok(o) => Json(o).into_response(),
        Err(PrepareError::Invalid(e)) => (
            StatusCode::BAD_REQUEST,
            Json(super::comfy::validation_error_body(
                &e,
                &prompt,
                &warm.registry,
            )),
        )
            .into_response(),
        Err(e @ PrepareError::Plan(_)) => (
            StatusCode::BAD_REQUEST,
            Json(super::comfy::prompt_error(
                "invalid_prompt",
                &e.to_string(),
                "",
                json!({}),
            )),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct IndexQuery {
    #[serde(default)]
    tensors: bool,
}

async fn model_index(State(app): State<Arc<App>>, Query(q): Query<IndexQuery>) -> Json<Value> {
    let mut entries = app.models.entries();
    if !q.tensors {
        for e in &mut entries {
            e.tensors.clear();
        }
    }
    Json(json!({ "stage": app.warm.stage(), "models": entries }))
}

async fn model_index_refresh(State(app): State<Arc<App>>) -> Response {
    let app2 = app.clone();
    match tokio::task::spawn_blocking(move || app2.models.refresh(&app2.store, &model_roots(&app2)))
        .await
    {
        Ok(report) => Json(json!(report)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let (q, r, _) = app.store.counts().unwrap_or((0, 0, 0));
    m.pending.set(q as i64);
    m.running.set(r as i64);
    let (usable, reserved) = memory_now(&app);
    m.budget.set(usable.unwrap_or(0) as i64);
    m.reserved.set(reserved as i64);
    let (ws, sse) = app.hub.counts();
    m.ws_clients.set(ws as i64);
    m.sse_clients.set(sse as i64);
    m.set_dropped(app.hub.dropped());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

/// The OpenAPI description of NOVA's native routes.
pub(crate) const OPENAPI: &str = include_str!("../../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Model folder kinds: ComfyUI's usual ones and every folder that exists.
pub(crate) fn model_kinds(app: &App) -> Vec<String> {
    let mut kinds: Vec<String> = MODEL_KINDS.iter().map(|s| s.to_string()).collect();
    if let Ok(rd) = std::fs::read_dir(app.config.models_dir()) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kinds.push(e.file_name().to_string_lossy().to_string());
            }
        }
    }
    kinds.sort();
    kinds.dedup();
    kinds
}

/// (kind, folder) for every model folder that exists.
pub(crate) fn model_roots(app: &App) -> Vec<(String, PathBuf)> {
    let env = app.job_env();
    model_kinds(app)
        .into_iter()
        .flat_map(|k| {
            env.model_dirs(&k)
                .into_iter()
                .filter(|d| d.is_dir())
                .map(move |d| (k.clone(), d))
        })
        .collect()
}

/// Files of a model folder kind (relative names, as workflows name them).
pub(crate) fn model_names(app: &App, kind: &str) -> Vec<String> {
    let env = app.job_env();
    let mut names = vec![];
    for dir in env.model_dirs(kind) {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    Ok(t) if t.is_file() => {
                        if let Ok(rel) = p.strip_prefix(&dir) {
                            names.push(rel.to_string_lossy().to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_states_follow_the_documented_thresholds() {
        assert_eq!(memory_state(Some(100), 49).0, "LOW");
        assert_eq!(memory_state(Some(100), 50).0, "MODERATE");
        assert_eq!(memory_state(Some(100), 80).0, "HIGH");
        assert_eq!(memory_state(Some(100), 90).0, "HIGH");
        assert_eq!(memory_state(Some(100), 91).0, "CRITICAL");
        assert_eq!(memory_state(None, 10).0, "UNKNOWN");
    }

    #[test]
    fn the_openapi_document_parses_and_lists_the_native_routes() {
        let v: Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = v["paths"].as_object().unwrap();
        for p in [
            "/api/system/stats",
            "/api/system/cleanup",
            "/health",
            "/health/vram",
            "/api/events",
            "/api/jobs/{id}",
            "/api/plan",
            "/api/optimize",
            "/api/model_index",
            "/api/model_index/refresh",
            "/api/queue/pause",
            "/api/queue/resume",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p} missing from openapi.json");
        }
    }
}
