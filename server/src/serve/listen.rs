//! Accepting connections so that no client can stall the service: a header read timeout, a
//! body inactivity timeout, a connection cap, and file descriptors to spare.
//!
//! - Each connection is served by hyper's HTTP/1 with its header read timeout
//!   ([`ServeConfig::header_timeout`]): a request whose headers are not complete in time —
//!   a half-sent request, or a kept-alive connection that sends nothing — is closed. The
//!   timer starts whenever hyper waits for a request head, so idle connections are reaped too.
//!   WebSocket connections, once upgraded, are not subject to it.
//! - Request bodies time out when no data arrives for [`ServeConfig::body_timeout`] (the
//!   router's `RequestBodyTimeoutLayer`).
//! - At most [`ServeConfig::max_connections`] connections are open at once, WebSockets
//!   included (an upgraded session keeps its connection's slot); one more is answered
//!   `503 Service Unavailable` with `Retry-After` and closed at once, so a client learns to
//!   retry instead of waiting in the accept queue.
//! - At start-up the soft limit on open files is raised to the hard limit (Linux's default
//!   soft limit, 1024, is fewer than the connection cap), and the cap is lowered to fit below
//!   it with room for the files jobs open.

use super::ServeConfig;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// File descriptors kept for everything but connections (model files, outputs, the
/// database, FFmpeg, the studio's files).
const FD_RESERVE: u64 = 256;

/// Raises the soft open-files limit to the hard limit; returns the soft limit now in force.
fn raise_nofile() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed; no other memory.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// The connection cap in force: the configured one, lowered to fit the open-files limit.
pub(crate) fn connection_cap(config: &ServeConfig) -> usize {
    let configured = config.max_connections;
    match raise_nofile() {
        Some(fds) if fds <= FD_RESERVE + 16 => configured.min(16),
        Some(fds) => configured.min((fds - FD_RESERVE) as usize),
        None => configured,
    }
}

/// A connection's place under the cap; held by the connection and by the WebSocket session
/// it may become (see [`super::ws`]), which can also size its socket's send buffer.
#[derive(Clone)]
pub(crate) struct Slot {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
    /// The connection's socket; open while any clone of the slot is held (the connection, or
    /// the session it was upgraded to, owns it).
    fd: std::os::fd::RawFd,
}

impl Slot {
    /// Caps the kernel's send buffer of this connection at `bytes`: what a client that stops
    /// reading can absorb before its session blocks (and costs nothing more).
    pub(crate) fn limit_send_buffer(&self, bytes: usize) {
        let v = bytes as libc::c_int;
        // SAFETY: the socket is open while this slot is held (see `fd`); setsockopt reads
        // `size_of::<c_int>()` bytes from `v`.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// What an over-cap connection is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 40\r\nConnection: close\r\n\r\ntoo many connections; retry in a second\n";

/// Serves `router` on `listener` until the process ends.
pub(crate) async fn serve(listener: TcpListener, router: Router, config: &ServeConfig) {
    let cap = connection_cap(config);
    if cap < config.max_connections {
        eprintln!(
            "nova serve: at most {cap} connections (the open-files limit allows no more than that)"
        );
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let header_timeout = config.header_timeout;
    let service = hyper_util::service::TowerToHyperService::new(router.map_request(
        |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
    ));
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors or a transient network error: back off briefly
                // rather than spin.
                eprintln!("nova serve: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The slot lives as long as the connection, and as long as a WebSocket it was
        // upgraded to: each request carries a handle the upgraded session keeps.
        let slot = Slot {
            _permit: Arc::new(slot),
            fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
        };
        let service = {
            let (service, slot) = (service.clone(), slot.clone());
            hyper::service::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(slot.clone());
                    hyper::service::Service::call(&service, req)
                },
            )
        };
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                // A client that shuts its sending side after the request still gets the
                // answer (hyper would otherwise drop the connection at that end of input).
                .half_close(true)
                .keep_alive(true);
            let _ = builder.serve_connection(io, service).with_upgrades().await;
            drop(slot);
        });
    }
}
