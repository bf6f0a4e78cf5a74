//! The router, and ComfyUI's routes: `/prompt`, `/queue`, `/history`, `/view`,
//! `/upload/image`, `/interrupt`, `/free`, `/object_info`, `/system_stats`, `/embeddings`,
//! `/models`, `/extensions`, `/features` (each also under `/api/`, as ComfyUI registers them).
//!
//! Where ComfyUI answers a bad request with a 500 (malformed JSON, a non-integer
//! `max_items`), NOVA answers 400 with the reason; everything else keeps ComfyUI's status
//! codes and bodies.

use super::comfy;
use super::native;
use super::security;
use super::store::{
    timestamp_ms, Enqueued, JobRecord, JobState, Number, Priority, StoreError, StoreErrorKind,
    MAX_CLIENT_NUMBER,
};
use super::{ws, App};
use crate::job::{self, PrepareError, Prepared};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nova_dataflow::profile::Admission;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tower::ServiceExt;

/// Every route of the service.
pub(crate) fn router(app: Arc<App>) -> Router {
    let comfy: Router<Arc<App>> = Router::new()
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_one))
        .route("/view", get(view))
        .route(
            "/upload/image",
            post(upload_image).layer(DefaultBodyLimit::max(app.config.max_upload.0 as usize)),
        )
        .route("/interrupt", post(interrupt))
        .route("/free", post(free))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_one))
        .route("/system_stats", get(system_stats))
        .route("/embeddings", get(embeddings))
        .route("/models", get(model_folders))
        .route("/models/{folder}", get(model_files))
        .route("/extensions", get(|| async { Json(json!([])) }))
        .route("/features", get(features_route))
        .route("/ws", get(ws::handler));
    let api = comfy.clone().merge(native::api_routes());
    let studio = native::studio_service(&app);
    Router::new()
        .merge(comfy)
        .nest("/api", api)
        .merge(native::top_routes())
        .fallback(studio)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .layer(middleware::from_fn_with_state(app.clone(), security::guard))
        .layer(DefaultBodyLimit::max(app.config.max_body.0 as usize))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            app.config.body_timeout,
        ))
        .with_state(app)
}

async fn count_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "static".into());
    let resp = next.run(req).await;
    app.metrics.http(&method, &route, resp.status().as_u16());
    resp
}

fn bad(body: Value) -> Response {
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

/// A queue database failure as an answer: 503 (with `Retry-After`) while the database cannot
/// take writes (a full disk: see `/health`), 500 otherwise.
pub(crate) fn store_error(e: StoreError) -> Response {
    match e.kind {
        StoreErrorKind::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            e.to_string(),
        )
            .into_response(),
        StoreErrorKind::Other => internal(e),
    }
}

/// A client's ComfyUI `number`: an integer (`5` or `5.0`) within ±(2^53 − 1).
fn client_number(v: &Value) -> Result<i64, String> {
    let n = match (v.as_i64(), v.as_f64()) {
        (Some(n), _) => Some(n),
        (None, Some(f))
            if f.is_finite() && f.fract() == 0.0 && f.abs() <= MAX_CLIENT_NUMBER as f64 =>
        {
            Some(f as i64)
        }
        _ => None,
    };
    n.filter(|n| n.unsigned_abs() <= MAX_CLIENT_NUMBER as u64)
        .ok_or_else(|| {
            format!(
            "number {v} must be an integer between -{MAX_CLIENT_NUMBER} and {MAX_CLIENT_NUMBER}"
        )
        })
}

async fn get_prompt(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({ "exec_info": { "queue_remaining": app.queue_remaining() } }))
}

/// A prompt id a client chose: ComfyUI takes any string; NOVA keeps ids printable and short.
fn valid_prompt_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A `/prompt`-style body and its workflow, or ComfyUI's 400 body (`invalid_prompt` for
/// malformed JSON, with line and column; `no_prompt`), or 413 (`too_many_nodes`) for a
/// workflow of more than `max_nodes` nodes.
pub(crate) fn parse_prompt_body(
    body: &[u8],
    max_nodes: usize,
) -> Result<(Value, Value), Box<Response>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(bad(comfy::prompt_error(
            "invalid_prompt",
            &format!(
                "malformed JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
            "",
            json!({}),
        )))
    })?;
    let Some(prompt) = v.get("prompt").filter(|p| p.is_object()).cloned() else {
        return Err(Box::new(bad(comfy::prompt_error(
            "no_prompt",
            "No prompt provided",
            "No prompt provided",
            json!({}),
        ))));
    };
    let nodes = prompt.as_object().map_or(0, |m| m.len());
    if nodes > max_nodes {
        let m = format!(
            "the workflow has {nodes} nodes; this service takes at most {max_nodes} per workflow \
             (--max-nodes)"
        );
        return Err(Box::new(
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(comfy::prompt_error("too_many_nodes", &m, &m, json!({}))),
            )
                .into_response(),
        ));
    }
    Ok((v, prompt))
}

/// A workflow validated and planned against the whole budget, or ComfyUI's 400 body
/// (`invalid_settings`, `node_errors`, `invalid_prompt`). Validation and planning run on a
/// blocking thread: a large graph never holds up the async threads that answer other requests.
pub(crate) async fn prepare_prompt(
    app: &Arc<App>,
    prompt: &Value,
    extra_data: Option<&Value>,
) -> Result<Prepared, Box<Response>> {
    let warm = app.warmed().await;
    let (app2, warm2, prompt2) = (app.clone(), warm.clone(), prompt.clone());
    let extra = extra_data.cloned();
    let prepared =
        tokio::task::spawn_blocking(move || -> Result<Prepared, Result<PrepareError, String>> {
            let spec = app2
                .job_spec(&warm2, prompt2, extra.as_ref(), None)
                .map_err(Err)?;
            job::prepare(spec).map_err(Ok)
        })
        .await
        .map_err(|_| Box::new(internal("planning the job panicked (this is a bug)")))?;
    prepared.map_err(|e| {
        Box::new(bad(match e {
            Err(m) => comfy::prompt_error("invalid_settings", &m, "", json!({})),
            Ok(PrepareError::Invalid(e)) => {
                comfy::validation_error_body(&e, prompt, &warm.registry)
            }
            Ok(e @ PrepareError::Plan(_)) => {
                comfy::prompt_error("invalid_prompt", &e.to_string(), "", json!({}))
            }
        }))
    })
}

async fn post_prompt(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let t = Instant::now();
    let (v, prompt) = match parse_prompt_body(&body, app.config.max_nodes) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let client_id = v
        .get("client_id")
        .and_then(|c| c.as_str())
        .map(str::to_string);
    let mut extra_data = v
        .get("extra_data")
        .filter(|e| e.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(c) = &client_id {
        extra_data["client_id"] = json!(c);
    }
    let priority = match v
        .get("priority")
        .or_else(|| extra_data.get("nova").and_then(|n| n.get("priority")))
    {
        None | Some(Value::Null) => Priority::Normal,
        Some(p) => match p.as_str().map(Priority::parse) {
            Some(Ok(p)) => p,
            Some(Err(m)) => return bad(comfy::prompt_error("invalid_priority", &m, "", json!({}))),
            None => {
                return bad(comfy::prompt_error(
                    "invalid_priority",
                    "priority must be a string: URGENT, HIGH, NORMAL or LOW",
                    "",
                    json!({}),
                ))
            }
        },
    };
    if let Some(w) = extra_data.get("nova").and_then(|n| n.get("webhook")) {
        // One answer for every refused target (see the webhook module).
        let ok = match w.as_str() {
            Some(url) => app.webhooks.resolve(url).await.is_ok(),
            None => false,
        };
        if !ok {
            return bad(comfy::prompt_error(
                "invalid_webhook",
                super::webhook::REFUSED,
                "",
                json!({}),
            ));
        }
    }
    let prompt_id = match v.get("prompt_id") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(id)) if valid_prompt_id(id) => id.clone(),
        Some(other) => {
            return bad(comfy::prompt_error(
                "invalid_prompt_id",
                &format!("prompt_id {other} must be 1-128 letters, digits, '-' or '_'"),
                "",
                json!({}),
            ))
        }
    };
    // A quick look saves planning a resubmission; `enqueue` decides, atomically.
    match app.store.get(&prompt_id) {
        Ok(None) => {}
        Ok(Some(_)) => return duplicate(&prompt_id),
        Err(e) => return store_error(e),
    }
    let front = v.get("front").and_then(|f| f.as_bool()).unwrap_or(false);
    let number = match v.get("number") {
        None | Some(Value::Null) => Number::Next { front },
        Some(n) => match client_number(n) {
            Ok(n) => Number::Client(n),
            Err(m) => return bad(comfy::prompt_error("invalid_number", &m, "", json!({}))),
        },
    };
    let prepared = match prepare_prompt(&app, &prompt, Some(&extra_data)).await {
        Ok(p) => p,
        Err(r) => return *r,
    };
    if let (Some(r), Admission::Enforce) = (&prepared.refusal, prepared.config.admission) {
        let mut body = comfy::prompt_error(
            "nova_refused_memory",
            &format!("refused: {}", r.message),
            &r.message,
            json!({}),
        );
        body["error"]["extra_info"] = serde_json::to_value(r).unwrap_or(Value::Null);
        return bad(body);
    }
    let outputs_to_execute: Vec<String> = prepared
        .wf
        .nodes
        .iter()
        .filter(|n| n.node.schema().output_node)
        .map(|n| n.id.0.clone())
        .collect();
    let rec = JobRecord {
        id: prompt_id.clone(),
        number: 0,
        seq: 0,
        priority,
        prompt,
        client_id,
        extra_data,
        outputs_to_execute,
        state: JobState::Queued,
        attempts: 0,
        created_ms: timestamp_ms(),
        started_ms: None,
        finished_ms: None,
        outputs: Default::default(),
        messages: vec![],
        error: None,
        forecast_peak_bytes: Some(prepared.plan.forecast_peak_bytes),
        tracked_peak_bytes: None,
        webhooks: vec![],
        timing: None,
    };
    let number = match app.store.enqueue(rec, number).await {
        Ok(Enqueued::Queued(n)) => n,
        Ok(Enqueued::Duplicate) => return duplicate(&prompt_id),
        Err(e) => return store_error(e),
    };
    app.sched.wake();
    app.relay.status(app.queue_remaining());
    app.metrics.accepted(t.elapsed().as_secs_f64());
    Json(json!({ "prompt_id": prompt_id, "number": number, "node_errors": {} })).into_response()
}

fn duplicate(prompt_id: &str) -> Response {
    bad(comfy::prompt_error(
        "duplicate_prompt_id",
        &format!("prompt_id {prompt_id} was already submitted"),
        "",
        json!({}),
    ))
}

async fn get_queue(State(app): State<Arc<App>>) -> Response {
    let running = match app.store.running() {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let pending = match app.store.pending() {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    Json(json!({
        "queue_running": running.iter().map(JobRecord::comfy_tuple).collect::<Vec<_>>(),
        "queue_pending": pending.iter().map(JobRecord::comfy_tuple).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
struct ClearOrDelete {
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    delete: Vec<String>,
}

fn clear_or_delete(body: &Bytes) -> Result<ClearOrDelete, Box<Response>> {
    if body.is_empty() {
        return Ok(ClearOrDelete::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Box::new(
            (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"clear\": bool, \"delete\": [prompt ids]}}: {e}"),
            )
                .into_response(),
        )
    })
}

async fn post_queue(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req = match clear_or_delete(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let mut changed = 0;
    if req.clear {
        match app.store.cancel(None).await {
            Ok(v) => changed += v.len(),
            Err(e) => return store_error(e),
        }
    }
    if !req.delete.is_empty() {
        match app.store.cancel(Some(req.delete)).await {
            Ok(v) => changed += v.len(),
            Err(e) => return store_error(e),
        }
    }
    if changed > 0 {
        app.relay.status(app.queue_remaining());
    }
    StatusCode::OK.into_response()
}

/// A history entry in ComfyUI's shape.
pub(crate) fn history_entry(rec: &JobRecord) -> Value {
    let success = rec.state == JobState::Success;
    let meta: serde_json::Map<String, Value> = rec
        .outputs
        .keys()
        .map(|n| {
            (
                n.clone(),
                json!({"node_id": n, "display_node": n, "parent_node": null, "real_node_id": n}),
            )
        })
        .collect();
    json!({
        "prompt": rec.comfy_tuple(),
        "outputs": rec.outputs,
        "status": {
            "status_str": if success { "success" } else { "error" },
            "completed": success,
            "messages": rec.messages,
        },
        "meta": meta,
    })
}

fn history_map(recs: &[JobRecord]) -> Value {
    let m: serde_json::Map<String, Value> = recs
        .iter()
        .map(|r| (r.id.clone(), history_entry(r)))
        .collect();
    Value::Object(m)
}

async fn get_history(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let parse = |k: &str| -> Result<Option<usize>, String> {
        match q.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .map(|n| (n >= 0).then_some(n as usize))
                .map_err(|_| format!("{k} must be an integer")),
        }
    };
    let (max, offset) = match (parse("max_items"), parse("offset")) {
        (Ok(m), Ok(o)) => (m, o.unwrap_or(0)),
        (Err(m), _) | (_, Err(m)) => return (StatusCode::BAD_REQUEST, m).into_response(),
    };
    match app.store.history(max, offset) {
        Ok(recs) => Json(history_map(&recs)).into_response(),
        Err(e) => store_error(e),
    }
}

async fn get_history_one(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.store.get(&id) {
        Ok(Some(r)) if r.state.is_final() && r.state != JobState::Cancelled => {
            Json(history_map(&[r])).into_response()
        }
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => store_error(e),
    }
}

async fn post_history(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req = match clear_or_delete(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if req.clear {
        if let Err(e) = app.store.delete_history(None).await {
            return store_error(e);
        }
    }
    if !req.delete.is_empty() {
        if let Err(e) = app.store.delete_history(Some(req.delete)).await {
            return store_error(e);
        }
    }
    StatusCode::OK.into_response()
}

async fn interrupt(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("prompt_id")
            .and_then(|p| p.as_str())
            .map(str::to_string)
    });
    app.sched.interrupt(id.as_deref());
    StatusCode::OK.into_response()
}

async fn free(State(_app): State<Arc<App>>) -> Response {
    nova_dataflow::residency::Registry::global().release_unpinned();
    StatusCode::OK.into_response()
}

async fn object_info(State(app): State<Arc<App>>) -> Response {
    Json(app.warmed().await.object_info.clone()).into_response()
}

async fn object_info_one(State(app): State<Arc<App>>, Path(class): Path<String>) -> Response {
    let w = app.warmed().await;
    match w.object_info.get(&class) {
        Some(info) => Json(json!({ class: info })).into_response(),
        None => Json(json!({})).into_response(),
    }
}

/// `(MemTotal, MemAvailable)` from `/proc/meminfo`, in bytes.
pub(crate) fn ram() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

async fn system_stats(State(app): State<Arc<App>>) -> Json<Value> {
    let (ram_total, ram_free) = ram();
    let devices = native::devices(&app);
    let db = app.store.health();
    Json(json!({
        "system": {
            "os": std::env::consts::FAMILY,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": format!("nova-{}", env!("CARGO_PKG_VERSION")),
            "python_version": "none (NOVA is a Rust engine)",
            "pytorch_version": "none (candle)",
            "embedded_python": false,
            "argv": std::env::args().collect::<Vec<_>>(),
        },
        "devices": devices,
        "nova": {
            "version": env!("CARGO_PKG_VERSION"),
            "status": if db.ok { "ok" } else { "degraded" },
            "queue_db": db,
            "stage": app.warm.stage(),
            "stages": app.warm.stages().iter().map(|(s, ms)| json!({"stage": s, "at_ms": ms})).collect::<Vec<_>>(),
            "uptime_ms": app.started.elapsed().as_secs_f64() * 1e3,
        },
    }))
}

/// Model folder kinds ComfyUI clients ask for, besides the folders that exist.
pub(crate) const MODEL_KINDS: [&str; 12] = [
    "checkpoints",
    "clip",
    "controlnet",
    "diffusion_models",
    "embeddings",
    "frame_interpolation",
    "loras",
    "text_encoders",
    "unet",
    "upscale_models",
    "vae",
    "vae_approx",
];

async fn embeddings(State(app): State<Arc<App>>) -> Json<Value> {
    let names: Vec<String> = native::model_names(&app, "embeddings")
        .into_iter()
        .map(|n| {
            n.rsplit_once('.')
                .map(|(stem, _)| stem.to_string())
                .unwrap_or(n)
        })
        .collect();
    Json(json!(names))
}

async fn model_folders(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!(native::model_kinds(&app)))
}

async fn model_files(State(app): State<Arc<App>>, Path(folder): Path<String>) -> Response {
    if !native::model_kinds(&app).contains(&folder) {
        return (StatusCode::NOT_FOUND, format!("no model folder '{folder}'")).into_response();
    }
    Json(json!(native::model_names(&app, &folder))).into_response()
}

/// What the service supports, for `/features` and the socket's feature-flags answer.
pub(crate) fn features(app: &App) -> Value {
    json!({
        "supports_preview_metadata": true,
        "max_upload_size": app.config.max_upload.0,
        "nova_events": ["telemetry", "lifecycle", "output.partial", "output.preview"],
        "nova_event_schema": nova_dataflow::EVENT_SCHEMA_VERSION,
    })
}

async fn features_route(State(app): State<Arc<App>>) -> Json<Value> {
    Json(features(&app))
}

#[derive(Deserialize)]
struct ViewQuery {
    filename: Option<String>,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    preview: Option<String>,
}

/// The base folder of a ComfyUI file `type`.
fn folder_of(app: &App, kind: &str) -> Option<std::path::PathBuf> {
    match kind {
        "output" => Some(app.config.output_dir()),
        "input" => Some(app.config.input_dir()),
        "temp" => Some(app.config.temp_dir()),
        _ => None,
    }
}

async fn view(State(app): State<Arc<App>>, Query(q): Query<ViewQuery>, req: Request) -> Response {
    let Some(mut filename) = q.filename else {
        return (StatusCode::NOT_FOUND, "filename is required").into_response();
    };
    let mut kind = q.kind.unwrap_or_else(|| "output".into());
    // ComfyUI's annotated names: "name.png [input]".
    for k in ["output", "input", "temp"] {
        if let Some(stem) = filename.strip_suffix(&format!(" [{k}]")) {
            filename = stem.to_string();
            kind = k.to_string();
        }
    }
    let Some(base) = folder_of(&app, &kind) else {
        return (StatusCode::BAD_REQUEST, format!("unknown type '{kind}'")).into_response();
    };
    let path = match security::resolve(&base, &q.subfolder, &filename) {
        Ok(p) => p,
        Err(m) => return (StatusCode::BAD_REQUEST, m).into_response(),
    };
    if !path.is_file() {
        return (StatusCode::NOT_FOUND, format!("no file {filename}")).into_response();
    }
    if let Some(p) = q.preview {
        // ComfyUI's `preview=webp;90` / `jpeg;90`: this build re-encodes as JPEG either way.
        let quality = p
            .split_once(';')
            .and_then(|(_, q)| q.parse::<u8>().ok())
            .unwrap_or(90)
            .clamp(1, 100);
        let encoded = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            let img = image::open(&path).map_err(|e| e.to_string())?.to_rgb8();
            let mut out = Vec::new();
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            img.write_with_encoder(enc).map_err(|e| e.to_string())?;
            Ok(out)
        })
        .await;
        return match encoded {
            Ok(Ok(bytes)) => {
                let stem = filename.rsplit_once('.').map_or(filename.as_str(), |s| s.0);
                let mut resp = bytes.into_response();
                super::files::serve_headers(resp.headers_mut(), &format!("{stem}.jpg"));
                resp
            }
            _ => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not an image this build can preview",
            )
                .into_response(),
        };
    }
    let mut resp = match tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.into_response(),
        Err(e) => return internal(e),
    };
    if resp.status().is_success() || resp.status() == StatusCode::PARTIAL_CONTENT {
        super::files::serve_headers(resp.headers_mut(), &filename);
    }
    resp
}

/// ComfyUI's `/upload/image` (also used for audio and video): a multipart form with the file
/// as `image` and optional `overwrite`, `subfolder` and `type`. The file streams to disk and is
/// accepted only if it is what its name claims (see [`super::files`]).
async fn upload_image(State(app): State<Arc<App>>, form: Multipart) -> Response {
    let waited = tokio::time::timeout(app.config.upload_wait, app.uploads.acquire()).await;
    let _permit = match waited {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return internal("the upload limiter is closed"),
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "too many uploads in progress; retry shortly",
            )
                .into_response()
        }
    };
    match tokio::time::timeout(super::files::UPLOAD_DEADLINE, receive_upload(&app, form)).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            "the upload took longer than its deadline",
        )
            .into_response(),
    }
}

/// Receives, checks and places one upload (see [`upload_image`]).
async fn receive_upload(app: &Arc<App>, mut form: Multipart) -> Response {
    let mut file: Option<(String, super::files::TempUpload)> = None;
    let mut overwrite = false;
    let mut subfolder = String::new();
    let mut kind = "input".to_string();
    let staging = app.config.temp_dir().join(".uploads");
    loop {
        let mut field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return multipart_error(e),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == "image" {
            let file_name = field.file_name().unwrap_or_default().to_string();
            let ext = file_name
                .rsplit_once('.')
                .map(|(_, e)| e.to_ascii_lowercase())
                .unwrap_or_default();
            if super::files::claim_of(&file_name).is_none() {
                return (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "'{}' is not a kind of file NOVA loads (accepted: {})",
                        file_name.chars().take(200).collect::<String>(),
                        super::files::upload_extensions()
                    ),
                )
                    .into_response();
            }
            let mut tmp = match super::files::TempUpload::create(&staging, &ext).await {
                Ok(t) => t,
                Err(e) => return internal(format!("cannot stage the upload: {e}")),
            };
            let Some(mut out) = tmp.file.take() else {
                return internal("the staging file is gone");
            };
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await
                        {
                            return storage_full_or_internal(e);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return multipart_error(e),
                }
            }
            if let Err(e) = tokio::io::AsyncWriteExt::flush(&mut out).await {
                return storage_full_or_internal(e);
            }
            drop(out);
            file = Some((file_name, tmp));
            continue;
        }
        // The other fields are short text; a long one is cut off at 4 KiB.
        let mut text = Vec::new();
        loop {
            match field.chunk().await {
                Ok(Some(c)) => {
                    if text.len() < 4096 {
                        text.extend_from_slice(&c[..c.len().min(4096 - text.len())]);
                    }
                }
                Ok(None) => break,
                Err(e) => return multipart_error(e),
            }
        }
        let text = String::from_utf8_lossy(&text).to_string();
        match name.as_str() {
            "overwrite" => overwrite = matches!(text.as_str(), "true" | "1"),
            "subfolder" => subfolder = text,
            "type" => kind = text,
            _ => {}
        }
    }
    let Some((name, mut tmp)) = file else {
        return (StatusCode::BAD_REQUEST, "no 'image' file in the form").into_response();
    };
    let Some(base) = folder_of(app, &kind) else {
        return (StatusCode::BAD_REQUEST, format!("unknown type '{kind}'")).into_response();
    };
    let path = tmp.path.clone();
    let placed = tokio::task::spawn_blocking(move || {
        let Some(claim) = super::files::claim_of(&name) else {
            return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "not media".to_string()));
        };
        let ext = name
            .rsplit_once('.')
            .map(|(_, e)| e.to_ascii_lowercase())
            .unwrap_or_default();
        super::files::verify(&path, claim, &ext)
            .map_err(|m| (StatusCode::UNSUPPORTED_MEDIA_TYPE, m))?;
        super::files::place_upload(&base, &subfolder, &name, &path, overwrite)
            .map(|name| (name, subfolder))
            .map_err(|m| (StatusCode::BAD_REQUEST, m))
    })
    .await;
    match placed {
        Ok(Ok((name, subfolder))) => {
            tmp.keep();
            Json(json!({ "name": name, "subfolder": subfolder, "type": kind })).into_response()
        }
        Ok(Err((code, m))) => (code, m).into_response(),
        Err(e) => internal(e),
    }
}

/// A form that could not be read: the client's body (cut short, badly framed) is a 400,
/// a body over the limit a 413.
fn multipart_error(e: axum::extract::multipart::MultipartError) -> Response {
    let status = e.status();
    let status = if status.is_server_error() {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    (
        status,
        format!("the upload form could not be read: {}", e.body_text()),
    )
        .into_response()
}

/// A failed write of the service's own files: 507 for a full disk, 500 otherwise.
fn storage_full_or_internal(e: std::io::Error) -> Response {
    if e.raw_os_error() == Some(28) {
        (
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the data folder is full: {e}"),
        )
            .into_response()
    } else {
        internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_numbers_are_integers_within_javascript_s_safe_range() {
        assert_eq!(client_number(&json!(5)), Ok(5));
        assert_eq!(client_number(&json!(-3.0)), Ok(-3));
        assert_eq!(
            client_number(&json!(MAX_CLIENT_NUMBER)),
            Ok(MAX_CLIENT_NUMBER)
        );
        for bad in [
            json!(1e300),
            json!(0.5),
            json!("7"),
            json!(null),
            json!(MAX_CLIENT_NUMBER + 1),
            json!(f64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
        ] {
            assert!(client_number(&bad).is_err(), "{bad}");
        }
    }
}
