//! Connected clients (WebSocket and Server-Sent Events) and their bounded outboxes.
//!
//! Invariants:
//! - Nothing that publishes to a client ever waits for it: publishing appends to the client's
//!   outbox under a short lock and returns; one task per connection drains the outbox into the
//!   socket at whatever pace the client reads.
//! - An outbox holds at most `soft` messages that may be dropped (progress, previews, partial
//!   outputs); beyond that such messages are dropped for that client alone and counted.
//!   Results (`executing`, `executed`, the job's end, `status`, lifecycle and node start/end)
//!   are never dropped; a client that falls `hard` messages behind is disconnected instead,
//!   and can read what it missed from `/history`.
//! - Messages reach a client in the order they were published.

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One message for a client.
#[derive(Clone, Debug)]
pub(crate) enum Out {
    /// A text frame (JSON); cheap to clone for many clients.
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Out {
    pub(crate) fn json(v: &serde_json::Value) -> Out {
        Out::Text(Utf8Bytes::from(v.to_string()))
    }
}

struct Inner {
    queue: VecDeque<Out>,
    closed: bool,
}

/// A client's pending messages.
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    notify: tokio::sync::Notify,
    soft: usize,
    hard: usize,
    dropped: AtomicU64,
}

impl Outbox {
    fn new(soft: usize, hard: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                closed: false,
            }),
            notify: tokio::sync::Notify::new(),
            soft,
            hard,
            dropped: AtomicU64::new(0),
        }
    }

    /// Appends a message; returns whether it was dropped.
    fn push(&self, out: Out, droppable: bool) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.closed {
            return true;
        }
        if droppable && g.queue.len() >= self.soft {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if g.queue.len() >= self.hard {
            g.closed = true;
            g.queue.clear();
            drop(g);
            self.notify.notify_one();
            return true;
        }
        g.queue.push_back(out);
        drop(g);
        self.notify.notify_one();
        false
    }

    /// The next message, waiting for one; `None` once the outbox is closed.
    pub(crate) async fn pop(&self) -> Option<Out> {
        loop {
            let notified = self.notify.notified();
            {
                let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                if g.closed {
                    return None;
                }
                if let Some(o) = g.queue.pop_front() {
                    return Some(o);
                }
            }
            notified.await;
        }
    }

    /// Up to `max` messages that are waiting now, without waiting for more.
    pub(crate) fn take_ready(&self, max: usize) -> Vec<Out> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.closed {
            return Vec::new();
        }
        let n = g.queue.len().min(max);
        g.queue.drain(..n).collect()
    }

    /// Stops delivery (the connection is going away, or fell too far behind).
    pub(crate) fn close(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.notify.notify_one();
    }

    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// How a client is connected, and what it hears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Channel {
    /// ComfyUI's WebSocket: ComfyUI's messages, and NOVA's once negotiated.
    WebSocket,
    /// Server-Sent Events: NOVA's event schema only, for one job or all.
    Sse { job: Option<String> },
}

/// One connected client.
pub(crate) struct Client {
    pub conn: u64,
    /// ComfyUI's `clientId` / `sid`.
    pub sid: String,
    pub channel: Channel,
    /// Negotiated: binary previews as type 4 (with metadata).
    pub preview_metadata: AtomicBool,
    /// Negotiated: NOVA's additive events (`telemetry.*`, `lifecycle`, `output.*`).
    pub nova_events: AtomicBool,
    pub outbox: Outbox,
}

/// Who a message is for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Audience<'a> {
    /// Every WebSocket client.
    All,
    /// The WebSocket clients of a job's `client_id` (every WebSocket client when it has none).
    Job(Option<&'a str>),
}

/// Every connected client.
pub(crate) struct Hub {
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    next: AtomicU64,
    soft: usize,
    hard: usize,
    dropped: AtomicU64,
}

impl Hub {
    pub(crate) fn new(soft: usize, hard: usize) -> Hub {
        Hub {
            clients: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            soft,
            hard,
            dropped: AtomicU64::new(0),
        }
    }

    /// Registers a client; it hears messages until [`Hub::remove`].
    pub(crate) fn add(&self, sid: String, channel: Channel) -> Arc<Client> {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Client {
            conn,
            sid,
            channel,
            preview_metadata: AtomicBool::new(false),
            nova_events: AtomicBool::new(false),
            outbox: Outbox::new(self.soft, self.hard),
        });
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, c.clone());
        c
    }

    pub(crate) fn remove(&self, conn: u64) {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn)
        {
            c.outbox.close();
        }
    }

    /// The WebSocket clients a message for `audience` goes to.
    pub(crate) fn ws_targets(&self, audience: Audience<'_>) -> Vec<Arc<Client>> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .values()
            .filter(|c| c.channel == Channel::WebSocket)
            .filter(|c| match audience {
                Audience::All | Audience::Job(None) => true,
                Audience::Job(Some(id)) => c.sid == id,
            })
            .cloned()
            .collect()
    }

    /// SSE clients listening to `job`.
    pub(crate) fn sse_targets(&self, job: &str) -> Vec<Arc<Client>> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .values()
            .filter(|c| match &c.channel {
                Channel::Sse { job: None } => true,
                Channel::Sse { job: Some(j) } => j == job,
                Channel::WebSocket => false,
            })
            .cloned()
            .collect()
    }

    /// Sends to one client.
    pub(crate) fn send(&self, c: &Client, out: Out, droppable: bool) {
        if c.outbox.push(out, droppable) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends to every client in `targets`.
    pub(crate) fn send_all(&self, targets: &[Arc<Client>], out: &Out, droppable: bool) {
        for c in targets {
            self.send(c, out.clone(), droppable);
        }
    }

    /// (WebSocket clients, SSE clients).
    pub(crate) fn counts(&self) -> (usize, usize) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let ws = clients
            .values()
            .filter(|c| c.channel == Channel::WebSocket)
            .count();
        (ws, clients.len() - ws)
    }

    /// Messages dropped for slow clients since start.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Out {
        Out::Text(Utf8Bytes::from(s.to_string()))
    }

    #[test]
    fn a_full_outbox_drops_previews_but_keeps_results_in_order() {
        let hub = Hub::new(2, 5);
        let c = hub.add("a".into(), Channel::WebSocket);
        hub.send(&c, text("p1"), true);
        hub.send(&c, text("p2"), true);
        hub.send(&c, text("p3"), true); // over the soft bound: dropped
        hub.send(&c, text("result"), false); // kept
        assert_eq!(c.outbox.dropped(), 1);
        assert_eq!(hub.dropped(), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got: Vec<String> = rt.block_on(async {
            let mut v = vec![];
            for _ in 0..3 {
                if let Some(Out::Text(t)) = c.outbox.pop().await {
                    v.push(t.to_string());
                }
            }
            v
        });
        assert_eq!(got, ["p1", "p2", "result"]);
    }

    #[test]
    fn a_client_too_far_behind_on_results_is_closed() {
        let hub = Hub::new(1, 3);
        let c = hub.add("a".into(), Channel::WebSocket);
        for i in 0..4 {
            hub.send(&c, text(&format!("r{i}")), false);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(c.outbox.pop()).is_none());
    }

    #[test]
    fn job_messages_go_to_the_submitting_client_only() {
        let hub = Hub::new(8, 8);
        let a = hub.add("a".into(), Channel::WebSocket);
        let _b = hub.add("b".into(), Channel::WebSocket);
        let _s = hub.add("s".into(), Channel::Sse { job: None });
        let t = hub.ws_targets(Audience::Job(Some("a")));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].conn, a.conn);
        assert_eq!(hub.ws_targets(Audience::Job(None)).len(), 2);
        assert_eq!(hub.sse_targets("any").len(), 1);
        assert_eq!(hub.counts(), (2, 1));
    }
}
