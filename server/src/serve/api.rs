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
use super::store::{timestamp_ms, JobRecord, JobState, Priority};
use super::{ws, App};
use crate::job::{self, PrepareError, Prepared};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
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
/// malformed JSON, with line and column; `no_prompt`).
pub(crate) fn parse_prompt_body(body: &[u8]) -> Result<(Value, Value), Box<Response>> {
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
    Ok((v, prompt))
}

/// A workflow validated and planned against the whole budget, or ComfyUI's 400 body
/// (`invalid_settings`, `node_errors`, `invalid_prompt`).
pub(crate) async fn prepare_prompt(
    app: &App,
    prompt: &Value,
    extra_data: Option<&Value>,
) -> Result<Prepared, Box<Response>> {
    let warm = app.warmed().await;
    let spec = app
        .job_spec(&warm, prompt.clone(), extra_data, None)
        .map_err(|m| {
            Box::new(bad(comfy::prompt_error(
                "invalid_settings",
                &m,
                "",
                json!({}),
            )))
        })?;
    job::prepare(spec).map_err(|e| {
        Box::new(bad(match e {
            PrepareError::Invalid(e) => comfy::validation_error_body(&e, prompt, &warm.registry),
            e @ PrepareError::Plan(_) => {
                comfy::prompt_error("invalid_prompt", &e.to_string(), "", json!({}))
            }
        }))
    })
}

async fn post_prompt(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let t = Instant::now();
    let (v, prompt) = match parse_prompt_body(&body) {
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
        match w.as_str().map(super::webhook::check_url) {
            Some(Ok(())) => {}
            Some(Err(m)) => return bad(comfy::prompt_error("invalid_webhook", &m, "", json!({}))),
            None => {
                return bad(comfy::prompt_error(
                    "invalid_webhook",
                    "extra_data.nova.webhook must be a URL string",
                    "",
                    json!({}),
                ))
            }
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
    match app.store.get(&prompt_id) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return bad(comfy::prompt_error(
                "duplicate_prompt_id",
                &format!("prompt_id {prompt_id} was already submitted"),
                "",
                json!({}),
            ))
        }
        Err(e) => return internal(e),
    }
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
    let front = v.get("front").and_then(|f| f.as_bool()).unwrap_or(false);
    let number = match v.get("number").and_then(|n| n.as_f64()) {
        Some(n) => n as i64,
        None => app.store.next_number(front),
    };
    let rec = JobRecord {
        id: prompt_id.clone(),
        number,
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
    if let Err(e) = app.store.enqueue(rec).await {
        return internal(e);
    }
    app.sched.wake();
    app.relay.status(app.queue_remaining());
    app.metrics.accepted(t.elapsed().as_secs_f64());
    Json(json!({ "prompt_id": prompt_id, "number": number, "node_errors": {} })).into_response()
}

async fn get_queue(State(app): State<Arc<App>>) -> Response {
    let running = match app.store.running() {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let pending = match app.store.pending() {
        Ok(r) => r,
        Err(e) => return internal(e),
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
            Err(e) => return internal(e),
        }
    }
    if !req.delete.is_empty() {
        match app.store.cancel(Some(req.delete)).await {
            Ok(v) => changed += v.len(),
            Err(e) => return internal(e),
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
        Err(e) => internal(e),
    }
}

async fn get_history_one(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.store.get(&id) {
        Ok(Some(r)) if r.state.is_final() && r.state != JobState::Cancelled => {
            Json(history_map(&[r])).into_response()
        }
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => internal(e),
    }
}

async fn post_history(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req = match clear_or_delete(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if req.clear {
        if let Err(e) = app.store.delete_history(None).await {
            return internal(e);
        }
    }
    if !req.delete.is_empty() {
        if let Err(e) = app.store.delete_history(Some(req.delete)).await {
            return internal(e);
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
    let disposition = HeaderValue::from_str(&format!("filename=\"{}\"", filename.replace('"', "")))
        .unwrap_or_else(|_| HeaderValue::from_static("inline"));
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
            Ok(Ok(bytes)) => (
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
                    (header::CONTENT_DISPOSITION, disposition),
                ],
                bytes,
            )
                .into_response(),
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
    let h = resp.headers_mut();
    // Files written by workflows are data, never pages or scripts of this origin.
    let risky = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            [
                "text/html",
                "application/xhtml",
                "text/javascript",
                "application/javascript",
                "text/css",
                "image/svg",
            ]
            .iter()
            .any(|r| t.starts_with(r))
        });
    if risky {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    h.insert(header::CONTENT_DISPOSITION, disposition);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// What an upload holds, from its first bytes: the media LoadImage, LoadVideo and LoadAudio
/// read. Anything else is refused.
pub(crate) fn sniff(bytes: &[u8]) -> Option<&'static str> {
    let starts = |p: &[u8]| bytes.starts_with(p);
    if starts(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if starts(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        Some("audio/wav")
    } else if starts(b"fLaC") {
        Some("audio/flac")
    } else if starts(b"OggS") {
        Some("audio/ogg")
    } else if starts(b"ID3") || (bytes.len() > 1 && bytes[0] == 0xFF && bytes[1] & 0xE0 == 0xE0) {
        Some("audio/mpeg")
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        Some("video/mp4")
    } else if starts(&[0x1A, 0x45, 0xDF, 0xA3]) {
        Some("video/webm")
    } else {
        None
    }
}

async fn upload_image(State(app): State<Arc<App>>, mut form: Multipart) -> Response {
    let mut file: Option<(String, Bytes)> = None;
    let mut overwrite = false;
    let mut subfolder = String::new();
    let mut kind = "input".to_string();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return (e.status(), e.body_text()).into_response(),
        };
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let data = match field.bytes().await {
            Ok(d) => d,
            Err(e) => return (e.status(), e.body_text()).into_response(),
        };
        let text = || String::from_utf8_lossy(&data).to_string();
        match name.as_str() {
            "image" => file = Some((file_name.unwrap_or_default(), data.clone())),
            "overwrite" => overwrite = matches!(text().as_str(), "true" | "1"),
            "subfolder" => subfolder = text(),
            "type" => kind = text(),
            _ => {}
        }
    }
    let Some((name, data)) = file else {
        return (StatusCode::BAD_REQUEST, "no 'image' file in the form").into_response();
    };
    if sniff(&data).is_none() {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a PNG, JPEG, WAV, FLAC, Ogg, MP3, MP4 or WebM file",
        )
            .into_response();
    }
    let Some(base) = folder_of(&app, &kind) else {
        return (StatusCode::BAD_REQUEST, format!("unknown type '{kind}'")).into_response();
    };
    let saved = tokio::task::spawn_blocking(move || {
        save_upload(&base, &subfolder, &name, &data, overwrite).map(|name| (name, subfolder))
    })
    .await;
    match saved {
        Ok(Ok((name, subfolder))) => {
            Json(json!({ "name": name, "subfolder": subfolder, "type": kind })).into_response()
        }
        Ok(Err(m)) => (StatusCode::BAD_REQUEST, m).into_response(),
        Err(e) => internal(e),
    }
}

/// Writes an upload inside `base`; returns the name it got. Without `overwrite`, a clash with
/// identical content reuses the file and any other clash gets `"stem (i).ext"`, as ComfyUI.
fn save_upload(
    base: &std::path::Path,
    subfolder: &str,
    name: &str,
    data: &[u8],
    overwrite: bool,
) -> Result<String, String> {
    let mut path = security::resolve(base, subfolder, name)?;
    let dir = path
        .parent()
        .ok_or_else(|| "no folder".to_string())?
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create the folder: {e}"))?;
    // Re-check now that the folder exists: a link on the way must not lead out.
    security::resolve(base, subfolder, name)?;
    let mut final_name = name.to_string();
    if !overwrite {
        let (stem, ext) = match name.rsplit_once('.') {
            Some((s, e)) => (s.to_string(), format!(".{e}")),
            None => (name.to_string(), String::new()),
        };
        let mut i = 1;
        while path.exists() {
            if std::fs::read(&path).is_ok_and(|old| old == data) {
                return Ok(final_name);
            }
            final_name = format!("{stem} ({i}){ext}");
            path = dir.join(&final_name);
            i += 1;
        }
    }
    let tmp = dir.join(format!(".{}.upload", uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, data).map_err(|e| format!("cannot write the file: {e}"))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write the file: {e}")
    })?;
    Ok(final_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_sniffed_by_content() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Some("audio/wav"));
        assert_eq!(sniff(b"<html><script>"), None);
        assert_eq!(sniff(b"#!/bin/sh"), None);
    }

    #[test]
    fn upload_name_clashes_get_a_counter_unless_identical() {
        let dir = tempfile::tempdir().unwrap();
        let png = b"\x89PNG\r\n\x1a\none";
        assert_eq!(
            save_upload(dir.path(), "", "a.png", png, false).unwrap(),
            "a.png"
        );
        assert_eq!(
            save_upload(dir.path(), "", "a.png", png, false).unwrap(),
            "a.png"
        );
        let other = b"\x89PNG\r\n\x1a\ntwo";
        assert_eq!(
            save_upload(dir.path(), "", "a.png", other, false).unwrap(),
            "a (1).png"
        );
        assert_eq!(
            save_upload(dir.path(), "s", "a.png", other, true).unwrap(),
            "a.png"
        );
        assert!(save_upload(dir.path(), "../x", "a.png", png, false).is_err());
        assert!(save_upload(dir.path(), "", "../a.png", png, false).is_err());
    }
}
