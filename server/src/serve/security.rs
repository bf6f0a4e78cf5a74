//! Who may call the service, from where, and which files a request may touch.
//!
//! - **Token**: when the service has an API token (required off loopback), every route but the
//!   studio's static files and `/health/vram` needs it, as `Authorization: Bearer <token>` or,
//!   where a header cannot be set (a browser's WebSocket), `?token=<token>`. Missing or wrong:
//!   401. Compared in constant time.
//! - **Origin**: a request that carries an `Origin` header (a browser's) must come from the
//!   service's own host (the `Host` header) or an origin in `--allow-origin`; otherwise 403.
//!   This covers the WebSocket handshake, so a page on another site cannot drive a local
//!   service (ComfyUI checks the same on loopback).
//! - **Sizes**: a body declared larger than its route takes (`--max-body`, `--max-upload` for
//!   uploads) gets 413 before any of it is read.
//! - **Paths**: a file name from a request is resolved inside its base folder or refused:
//!   no absolute paths, no `..`, no link that leads out ([`nova_dataflow::JobEnv::resolve_in`],
//!   the same rule workflow file inputs follow).

use super::App;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Constant-time comparison of two byte strings.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v.to_string())
}

/// Whether an `Origin` may talk to a service reached as `host`.
pub(crate) fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some(host) = host else { return false };
    let netloc = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin)
        .trim_end_matches('/');
    netloc.eq_ignore_ascii_case(host)
}

/// The token and origin checks, as middleware.
pub(crate) async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/health/vram" || !is_api(path);
    if let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        if !origin_allowed(origin, host, &app.config.allow_origins) {
            return (
                StatusCode::FORBIDDEN,
                format!("origin {origin} is not allowed (see --allow-origin)"),
            )
                .into_response();
        }
    }
    // A body declared larger than the route takes is refused before any of it is read (bodies
    // without a length are cut off at the same limit while they are read).
    let limit = if path.ends_with("/upload/image") {
        app.config.max_upload.0
    } else {
        app.config.max_body.0
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies here are limited to {limit} bytes"),
        )
            .into_response();
    }
    if let (Some(token), false) = (&app.config.token, open) {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let given = bearer.or_else(|| query_token(req.uri().query()));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "an API token is required (Authorization: Bearer <token>)",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Whether a path is an API route (not the studio's static files).
fn is_api(path: &str) -> bool {
    const API: [&str; 21] = [
        "/api",
        "/prompt",
        "/queue",
        "/history",
        "/view",
        "/upload",
        "/interrupt",
        "/free",
        "/object_info",
        "/system_stats",
        "/embeddings",
        "/models",
        "/extensions",
        "/features",
        "/ws",
        "/metrics",
        "/openapi.json",
        "/health",
        "/view_metadata",
        "/internal",
        "/jobs",
    ];
    API.iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// Resolves `subfolder/name` inside `base`, refusing escapes.
pub(crate) fn resolve(base: &Path, subfolder: &str, name: &str) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("empty file name".into());
    }
    if name.contains('/') || name.contains('\\') {
        return Err(format!("'{name}' must be a file name, not a path"));
    }
    let rel = if subfolder.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", subfolder.trim_end_matches('/'))
    };
    let path = nova_dataflow::JobEnv::resolve_in(base, &rel)?;
    // A path that does not exist yet (an upload): its nearest existing ancestor, links
    // resolved, must still be inside the base. `symlink_metadata` so a dangling link counts
    // as existing (and then fails to resolve) rather than being written through.
    let real_base = base
        .canonicalize()
        .map_err(|e| format!("folder {}: {e}", base.display()))?;
    let mut anc = path.as_path();
    while anc.symlink_metadata().is_err() {
        anc = anc
            .parent()
            .ok_or_else(|| format!("'{rel}' has no folder"))?;
    }
    let real = anc
        .canonicalize()
        .map_err(|_| format!("'{rel}' points outside the folder"))?;
    if !real.starts_with(&real_base) {
        return Err(format!("'{rel}' points outside the folder"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_match_the_host_or_the_allow_list() {
        assert!(origin_allowed(
            "http://127.0.0.1:8188",
            Some("127.0.0.1:8188"),
            &[]
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("127.0.0.1:8188"),
            &[]
        ));
        assert!(origin_allowed(
            "http://studio.local:5173",
            Some("127.0.0.1:8188"),
            &["http://studio.local:5173".into()]
        ));
        assert!(!origin_allowed(
            "http://127.0.0.1:9999",
            Some("127.0.0.1:8188"),
            &[]
        ));
    }

    #[test]
    fn file_names_cannot_leave_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        assert!(resolve(base, "", "a.png").is_ok());
        assert!(resolve(base, "sub", "a.png").is_ok());
        assert!(resolve(base, "", "../a.png").is_err());
        assert!(resolve(base, "..", "a.png").is_err());
        assert!(resolve(base, "/etc", "passwd").is_err());
        assert!(resolve(base, "", "/etc/passwd").is_err());
        assert!(resolve(base, "a/../..", "x").is_err());
        // A link inside the folder that points outside it.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), base.join("link")).unwrap();
        assert!(resolve(base, "link", "secret.txt").is_err());
    }

    #[test]
    fn tokens_come_from_the_query_when_no_header_can_be_set() {
        assert_eq!(query_token(Some("clientId=a&token=s3")), Some("s3".into()));
        assert_eq!(query_token(Some("clientId=a")), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"a", b"ab"));
    }
}
