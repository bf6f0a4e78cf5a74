//! Who may call the service, from where, and which files a request may touch.
//!
//! - **Token**: when the service has an API token (required off loopback), every route but the
//!   studio's static files and the health checks needs it, as `Authorization: Bearer <token>`.
//!   Only the WebSocket handshake (`/ws`, where a browser cannot set headers) may carry it as
//!   `?token=<token>` instead; anywhere else a token in the URL is refused, since URLs end up
//!   in logs, histories and `Referer` headers. Missing or wrong: 401. Compared in constant
//!   time.
//! - **Host** (against DNS rebinding): a request must name the service as it listens — on
//!   loopback, `127.0.0.1`, `localhost` or `[::1]` with the listening port; on a given
//!   address, that address — or a name in `--allow-host` (a reverse proxy's). Listening on
//!   every address (`0.0.0.0`), which needs a token, any name is taken unless `--allow-host`
//!   lists some. Otherwise 403, before anything else runs.
//! - **Origin**: a request that carries an `Origin` header (a browser's) must come from an
//!   origin whose host is one of those names, or from one listed in `--allow-origin`; an
//!   `Origin` that is not plain ASCII, or `null` (a sandboxed page), is refused too: 403.
//!   This covers the WebSocket handshake, so a page on another site cannot drive a local
//!   service.
//! - **Sizes**: a body declared larger than its route takes (`--max-body`, `--max-upload` for
//!   uploads) gets 413 before any of it is read; a path longer than [`MAX_PATH`] gets 414.
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

/// The longest request path taken (longer ones get 414).
pub(crate) const MAX_PATH: usize = 2048;

/// The `Host` values that name this service (lower case), or `None` when any name is taken
/// (listening on every address, with no `--allow-host`).
pub(crate) fn expected_hosts(
    listen: std::net::SocketAddr,
    allow_hosts: &[String],
) -> Option<Vec<String>> {
    let port = listen.port();
    let mut names: Vec<String> = allow_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    let ip = listen.ip();
    if ip.is_unspecified() {
        return (!names.is_empty()).then_some(names);
    }
    let mut hosts = vec![match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }];
    if ip.is_loopback() {
        hosts.extend(["127.0.0.1", "localhost", "[::1]"].map(String::from));
    }
    for h in hosts {
        names.push(format!("{h}:{port}"));
        if port == 80 {
            names.push(h);
        }
    }
    names.sort();
    names.dedup();
    Some(names)
}

/// Whether `host` (a `Host` header, or an origin's `host[:port]`) names this service.
pub(crate) fn host_allowed(host: &str, expected: Option<&[String]>) -> bool {
    match expected {
        None => true,
        Some(names) => names.iter().any(|n| n.eq_ignore_ascii_case(host)),
    }
}

/// Whether an `Origin` may talk to the service.
pub(crate) fn origin_allowed(
    origin: &str,
    expected: Option<&[String]>,
    allowed: &[String],
) -> bool {
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some((scheme, netloc)) = origin.split_once("://") else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return false;
    }
    let netloc = netloc.trim_end_matches('/');
    if netloc.is_empty() || netloc.contains('/') || netloc.contains('@') {
        return false;
    }
    // An origin without a port is on its scheme's default port.
    let with_port = if netloc
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        && !netloc.ends_with(']')
    {
        netloc.to_string()
    } else if scheme.eq_ignore_ascii_case("https") {
        format!("{netloc}:443")
    } else {
        format!("{netloc}:80")
    };
    match expected {
        // Any name is taken (listening on every address): the origin must still be the
        // name the request was sent to.
        None => false,
        Some(_) => host_allowed(&with_port, expected) || host_allowed(netloc, expected),
    }
}

fn forbidden(m: String) -> Response {
    (StatusCode::FORBIDDEN, m).into_response()
}

/// The host, origin, size and token checks, as middleware.
pub(crate) async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.len() > MAX_PATH {
        return (
            StatusCode::URI_TOO_LONG,
            format!("request paths are limited to {MAX_PATH} bytes"),
        )
            .into_response();
    }
    let open = path == "/health/vram" || path == "/health" || !is_api(path);
    let expected = app.hosts.as_deref();
    let host = match req.headers().get(header::HOST).map(|h| h.to_str()) {
        Some(Ok(h)) => Some(h.to_string()),
        Some(Err(_)) => return forbidden("the Host header is not plain ASCII".into()),
        None => None,
    };
    match (&host, expected) {
        (Some(h), Some(names)) if !host_allowed(h, Some(names)) => {
            return forbidden(format!(
                "host {h:?} does not name this service (see --allow-host)"
            ))
        }
        (None, Some(_)) => return forbidden("a Host header is required".into()),
        _ => {}
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let Ok(origin) = origin.to_str() else {
            return forbidden("the Origin header is not plain ASCII".into());
        };
        let same_as_host = expected.is_none()
            && host.as_deref().is_some_and(|h| {
                origin
                    .split_once("://")
                    .is_some_and(|(_, n)| n.trim_end_matches('/').eq_ignore_ascii_case(h))
            });
        if !same_as_host && !origin_allowed(origin, expected, &app.config.allow_origins) {
            return forbidden(format!(
                "origin {origin} is not allowed (see --allow-origin)"
            ));
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
        // Only the WebSocket handshake may carry the token in its URL.
        let handshake = (path == "/ws" || path == "/api/ws")
            && req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let given = bearer.or_else(|| handshake.then(|| query_token(req.uri().query())).flatten());
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "an API token is required (Authorization: Bearer <token>; ?token= only on the WebSocket handshake)",
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
    fn hosts_and_origins_must_name_the_service() {
        let listen: std::net::SocketAddr = "127.0.0.1:8188".parse().unwrap();
        let names = expected_hosts(listen, &[]).unwrap();
        let e = Some(names.as_slice());
        for ok in [
            "127.0.0.1:8188",
            "localhost:8188",
            "LOCALHOST:8188",
            "[::1]:8188",
        ] {
            assert!(host_allowed(ok, e), "{ok}");
        }
        for bad in [
            "evil.example:8188",
            "127.0.0.1:9999",
            "rebind.attacker.test:8188",
            "127.0.0.1",
        ] {
            assert!(!host_allowed(bad, e), "{bad}");
        }
        assert!(origin_allowed("http://127.0.0.1:8188", e, &[]));
        assert!(origin_allowed("http://localhost:8188", e, &[]));
        assert!(!origin_allowed("http://evil.example", e, &[]));
        assert!(!origin_allowed("http://evil.example:8188", e, &[]));
        assert!(!origin_allowed("http://127.0.0.1:9999", e, &[]));
        assert!(!origin_allowed("null", e, &[]));
        assert!(!origin_allowed("file://", e, &[]));
        assert!(origin_allowed(
            "http://studio.local:5173",
            e,
            &["http://studio.local:5173".into()]
        ));
        // Behind a proxy: the proxy's name.
        let names = expected_hosts(listen, &["nova.example.org".into()]).unwrap();
        assert!(host_allowed("nova.example.org", Some(&names)));
        assert!(origin_allowed(
            "https://nova.example.org",
            Some(&names),
            &[]
        ));
        // Every address: any Host (a token is required there), unless names are given.
        let any: std::net::SocketAddr = "0.0.0.0:8188".parse().unwrap();
        assert!(expected_hosts(any, &[]).is_none());
        assert!(host_allowed("whatever:8188", None));
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
