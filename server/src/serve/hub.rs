//! Connected clients (WebSocket and Server-Sent Events) and the one log they all read from.
//!
//! Every message is serialized once and published once, into a shared log; each client holds
//! a cursor into it, and its own connection task reads from the cursor at whatever pace the
//! client takes data. Invariants:
//! - **Publishing costs the same whatever the clients do.** It appends one entry under a short
//!   lock and wakes the connection tasks that are waiting for data; a client that does not read
//!   is blocked on its socket, not waiting, so it costs nothing — no copy, no queue of its own,
//!   no work per message. Filtering (which client hears which job, who negotiated what) is done
//!   by the reading task, paid at the reader's pace.
//! - **Memory is bounded once, not per client.** The log keeps the last `soft` droppable entries
//!   (and at most [`DROPPABLE_BYTES`] of them) and the last `hard` results.
//! - **Results are never dropped.** `executing`, `executed`, the job's end, `status`,
//!   lifecycle and node start/end are results. A client whose cursor falls behind the oldest
//!   result still kept is disconnected (it can read what it missed from `/history`), never
//!   silently short of one.
//! - **Droppable entries are skipped, newest kept.** Progress, previews, partial outputs and
//!   telemetry may be skipped by a client that is behind; progress and previews carry a key, and
//!   a reader skips an entry whose key has a newer entry in the log — so a client that falls
//!   behind gets the latest progress and the latest preview, not a stale one and not none.
//! - Messages reach a client in the order they were published.

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The most bytes of droppable entries the log keeps, whatever `soft` says.
pub(crate) const DROPPABLE_BYTES: usize = 64 << 20;

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

    fn len(&self) -> usize {
        match self {
            Out::Text(t) => t.len(),
            Out::Binary(b) => b.len(),
        }
    }
}

/// Who an entry is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum To {
    /// Every WebSocket client.
    AllWs,
    /// The WebSocket clients of a job's `client_id` (every WebSocket client when it has none).
    Job(Option<Arc<str>>),
    /// Those of them that negotiated NOVA's events.
    JobNova(Option<Arc<str>>),
    /// Those that negotiated NOVA's events and metadata frames: tiles, video frames and audio
    /// chunks, which a plain ComfyUI client would take for whole previews.
    JobNovaMeta(Option<Arc<str>>),
    /// Server-Sent Events subscribers of a job (and those of every job).
    Sse(Arc<str>),
}

/// Whether an entry may be skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Result,
    Droppable,
    /// Droppable, and superseded by a newer entry with the same key.
    Latest(u64),
}

/// One published message.
#[derive(Debug)]
pub(crate) struct Entry {
    seq: u64,
    to: To,
    out: Out,
    /// What WebSocket clients without preview metadata get instead (a preview's plain frame).
    plain: Option<Out>,
    class: Class,
}

#[derive(Default)]
struct Log {
    results: VecDeque<Arc<Entry>>,
    drops: VecDeque<Arc<Entry>>,
    drop_bytes: usize,
    next_seq: u64,
    /// The newest sequence per `Class::Latest` key among the kept entries.
    latest: HashMap<u64, u64>,
    /// The sequence of the newest result no longer kept.
    last_trimmed_result: Option<u64>,
    /// Droppable entries published, and those no longer kept (ordinals).
    drops_published: u64,
    drops_trimmed: u64,
}

impl Log {
    fn trim(&mut self, soft: usize, hard: usize) {
        while self.drops.len() > soft || self.drop_bytes > DROPPABLE_BYTES {
            let Some(e) = self.drops.pop_front() else {
                break;
            };
            self.drop_bytes -= e.out.len() + e.plain.as_ref().map_or(0, Out::len);
            self.drops_trimmed += 1;
            if let Class::Latest(k) = e.class {
                if self.latest.get(&k) == Some(&e.seq) {
                    self.latest.remove(&k);
                }
            }
        }
        while self.results.len() > hard {
            if let Some(e) = self.results.pop_front() {
                self.last_trimmed_result = Some(e.seq);
            }
        }
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

/// Where a client is in the log.
struct Cursor {
    /// The next sequence it reads.
    seq: u64,
    /// The ordinal of the next droppable entry it would read (to count what it skipped).
    drop_ordinal: u64,
}

/// One connected client.
pub(crate) struct Client {
    pub conn: u64,
    /// ComfyUI's `clientId` / `sid`.
    pub sid: String,
    pub channel: Channel,
    /// Negotiated: binary previews as type 4 (with metadata).
    preview_metadata: AtomicBool,
    /// Negotiated: NOVA's additive events (`telemetry.*`, `lifecycle`, `output.*`).
    nova_events: AtomicBool,
    cursor: Mutex<Cursor>,
    closed: AtomicBool,
}

impl Client {
    fn job_matches(&self, cid: &Option<Arc<str>>) -> bool {
        cid.as_deref().is_none_or(|id| id == self.sid)
    }

    /// What this client hears of `e`, if anything.
    fn pick<'a>(&self, e: &'a Entry) -> Option<&'a Out> {
        let ws = self.channel == Channel::WebSocket;
        let nova = self.nova_events.load(Ordering::Relaxed);
        let meta = self.preview_metadata.load(Ordering::Relaxed);
        let hears = match &e.to {
            To::AllWs => ws,
            To::Job(cid) => ws && self.job_matches(cid),
            To::JobNova(cid) => ws && nova && self.job_matches(cid),
            To::JobNovaMeta(cid) => ws && nova && meta && self.job_matches(cid),
            To::Sse(job) => match &self.channel {
                Channel::Sse { job: None } => true,
                Channel::Sse { job: Some(j) } => j.as_str() == &**job,
                Channel::WebSocket => false,
            },
        };
        if !hears {
            return None;
        }
        match (&e.plain, meta) {
            (Some(plain), false) => Some(plain),
            _ => Some(&e.out),
        }
    }

    /// Negotiated flags (see the WebSocket module).
    pub(crate) fn set_flags(&self, hub: &Hub, preview_metadata: bool, nova_events: bool) {
        let was = self.wants_meta();
        if preview_metadata {
            self.preview_metadata.store(true, Ordering::Relaxed);
        }
        if nova_events {
            self.nova_events.store(true, Ordering::Relaxed);
        }
        if !was && self.wants_meta() {
            hub.meta_clients.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn wants_meta(&self) -> bool {
        self.preview_metadata.load(Ordering::Relaxed) && self.nova_events.load(Ordering::Relaxed)
    }
}

/// Every connected client, and the log they read.
pub(crate) struct Hub {
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    log: Mutex<Log>,
    wake: tokio::sync::Notify,
    next: AtomicU64,
    soft: usize,
    hard: usize,
    dropped: AtomicU64,
    /// Clients that negotiated NOVA's events and metadata frames (whether tiles are worth
    /// encoding at all).
    meta_clients: AtomicUsize,
    sse_clients: AtomicUsize,
}

impl Hub {
    /// A hub keeping the last `soft` droppable entries and `hard` results.
    pub(crate) fn new(soft: usize, hard: usize) -> Hub {
        Hub {
            clients: Mutex::new(HashMap::new()),
            log: Mutex::new(Log::default()),
            wake: tokio::sync::Notify::new(),
            next: AtomicU64::new(1),
            soft: soft.max(1),
            hard: hard.max(1),
            dropped: AtomicU64::new(0),
            meta_clients: AtomicUsize::new(0),
            sse_clients: AtomicUsize::new(0),
        }
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a client; it hears what is published from now on, until [`Hub::remove`].
    pub(crate) fn add(&self, sid: String, channel: Channel) -> Arc<Client> {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let cursor = {
            let log = self.lock_log();
            Cursor {
                seq: log.next_seq,
                drop_ordinal: log.drops_published,
            }
        };
        if matches!(channel, Channel::Sse { .. }) {
            self.sse_clients.fetch_add(1, Ordering::Relaxed);
        }
        let c = Arc::new(Client {
            conn,
            sid,
            channel,
            preview_metadata: AtomicBool::new(false),
            nova_events: AtomicBool::new(false),
            cursor: Mutex::new(cursor),
            closed: AtomicBool::new(false),
        });
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, c.clone());
        c
    }

    pub(crate) fn remove(&self, conn: u64) {
        let c = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
        if let Some(c) = c {
            c.closed.store(true, Ordering::Relaxed);
            if c.wants_meta() {
                self.meta_clients.fetch_sub(1, Ordering::Relaxed);
            }
            if matches!(c.channel, Channel::Sse { .. }) {
                self.sse_clients.fetch_sub(1, Ordering::Relaxed);
            }
            self.wake.notify_waiters();
        }
    }

    /// Publishes one message (and, for previews, the plain frame clients without metadata
    /// get). O(1) in the number of clients.
    pub(crate) fn publish(&self, to: To, class: Class, out: Out, plain: Option<Out>) {
        {
            let mut log = self.lock_log();
            let seq = log.next_seq;
            log.next_seq += 1;
            let bytes = out.len() + plain.as_ref().map_or(0, Out::len);
            let e = Arc::new(Entry {
                seq,
                to,
                out,
                plain,
                class,
            });
            match class {
                Class::Result => log.results.push_back(e),
                Class::Droppable | Class::Latest(_) => {
                    if let Class::Latest(k) = class {
                        log.latest.insert(k, seq);
                    }
                    log.drop_bytes += bytes;
                    log.drops_published += 1;
                    log.drops.push_back(e);
                }
            }
            log.trim(self.soft, self.hard);
        }
        self.wake.notify_waiters();
    }

    /// Whether some client would hear tiles, video frames or audio chunks.
    pub(crate) fn wants_frames(&self) -> bool {
        self.meta_clients.load(Ordering::Relaxed) > 0
    }

    /// Whether any Server-Sent Events client is connected.
    pub(crate) fn has_sse(&self) -> bool {
        self.sse_clients.load(Ordering::Relaxed) > 0
    }

    /// Up to `max` messages for `c`, waiting until there is one; `None` once the client is
    /// removed, or fell so far behind that a result it needed is gone (it is removed then).
    /// Cancel-safe: nothing moves unless messages are returned.
    pub(crate) async fn next_batch(&self, c: &Client, max: usize) -> Option<Vec<Out>> {
        loop {
            let waiting = self.wake.notified();
            if c.closed.load(Ordering::Relaxed) {
                return None;
            }
            match self.take(c, max) {
                Ok(batch) if !batch.is_empty() => return Some(batch),
                Ok(_) => {}
                Err(()) => {
                    self.remove(c.conn);
                    return None;
                }
            }
            waiting.await;
        }
    }

    /// What is waiting for `c` now, moving its cursor past what it skips; `Err` when a
    /// result it may have needed is no longer kept.
    fn take(&self, c: &Client, max: usize) -> Result<Vec<Out>, ()> {
        let log = self.lock_log();
        let mut cur = c.cursor.lock().unwrap_or_else(|p| p.into_inner());
        if log.last_trimmed_result.is_some_and(|s| s >= cur.seq) {
            return Err(());
        }
        if cur.drop_ordinal < log.drops_trimmed {
            let skipped = log.drops_trimmed - cur.drop_ordinal;
            self.dropped.fetch_add(skipped, Ordering::Relaxed);
            cur.drop_ordinal = log.drops_trimmed;
        }
        let start = cur.seq;
        let (mut ri, mut di) = (
            log.results.partition_point(|e| e.seq < start),
            log.drops.partition_point(|e| e.seq < start),
        );
        let mut out = Vec::new();
        while out.len() < max {
            let r = log.results.get(ri);
            let d = log.drops.get(di);
            let e = match (r, d) {
                (Some(r), Some(d)) if r.seq < d.seq => {
                    ri += 1;
                    r
                }
                (Some(r), None) => {
                    ri += 1;
                    r
                }
                (_, Some(d)) => {
                    di += 1;
                    cur.drop_ordinal += 1;
                    d
                }
                (None, None) => break,
            };
            cur.seq = e.seq + 1;
            if let Class::Latest(k) = e.class {
                // A newer entry with the same key is kept: this one is stale for this reader.
                if log.latest.get(&k).is_some_and(|&newest| newest > e.seq) {
                    continue;
                }
            }
            if let Some(o) = c.pick(e) {
                out.push(o.clone());
            }
        }
        Ok(out)
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

    /// Droppable messages clients skipped because they were behind, since start.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// (droppable entries, results, bytes) the log holds now.
    pub(crate) fn held(&self) -> (usize, usize, usize) {
        let log = self.lock_log();
        let result_bytes: usize = log
            .results
            .iter()
            .map(|e| e.out.len() + e.plain.as_ref().map_or(0, Out::len))
            .sum();
        (
            log.drops.len(),
            log.results.len(),
            log.drop_bytes + result_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Out {
        Out::Text(Utf8Bytes::from(s.to_string()))
    }

    fn texts(v: Option<Vec<Out>>) -> Vec<String> {
        v.unwrap_or_default()
            .into_iter()
            .map(|o| match o {
                Out::Text(t) => t.to_string(),
                Out::Binary(_) => "binary".into(),
            })
            .collect()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_reader_behind_skips_previews_but_keeps_results_in_order() {
        let hub = Hub::new(2, 5);
        let c = hub.add("a".into(), Channel::WebSocket);
        hub.publish(To::AllWs, Class::Droppable, text("p1"), None);
        hub.publish(To::AllWs, Class::Droppable, text("p2"), None);
        hub.publish(To::AllWs, Class::Droppable, text("p3"), None); // p1 leaves the log
        hub.publish(To::AllWs, Class::Result, text("result"), None);
        let got = texts(rt().block_on(hub.next_batch(&c, 10)));
        assert_eq!(got, ["p2", "p3", "result"]);
        assert_eq!(hub.dropped(), 1);
    }

    #[test]
    fn a_reader_behind_gets_the_latest_progress_not_every_step() {
        let hub = Hub::new(100, 100);
        let c = hub.add("a".into(), Channel::WebSocket);
        for i in 0..5 {
            hub.publish(
                To::AllWs,
                Class::Latest(7),
                text(&format!("progress {i}")),
                None,
            );
            hub.publish(
                To::AllWs,
                Class::Latest(8),
                text(&format!("other {i}")),
                None,
            );
        }
        hub.publish(To::AllWs, Class::Result, text("executed"), None);
        let got = texts(rt().block_on(hub.next_batch(&c, 100)));
        assert_eq!(got, ["progress 4", "other 4", "executed"]);
    }

    #[test]
    fn a_client_too_far_behind_on_results_is_closed() {
        let hub = Hub::new(1, 3);
        let c = hub.add("a".into(), Channel::WebSocket);
        for i in 0..4 {
            hub.publish(To::AllWs, Class::Result, text(&format!("r{i}")), None);
        }
        assert!(rt().block_on(hub.next_batch(&c, 10)).is_none());
        assert_eq!(hub.counts(), (0, 0));
    }

    #[test]
    fn job_messages_go_to_the_submitting_client_and_negotiated_kinds_only() {
        let hub = Hub::new(8, 8);
        let a = hub.add("a".into(), Channel::WebSocket);
        let b = hub.add("b".into(), Channel::WebSocket);
        let s = hub.add("s".into(), Channel::Sse { job: None });
        b.set_flags(&hub, true, true);
        assert!(hub.wants_frames());
        let job_a: Option<Arc<str>> = Some("a".into());
        hub.publish(To::Job(job_a.clone()), Class::Result, text("for a"), None);
        hub.publish(To::JobNovaMeta(None), Class::Droppable, text("tile"), None);
        hub.publish(
            To::Job(None),
            Class::Droppable,
            text("with meta"),
            Some(text("plain")),
        );
        hub.publish(To::Sse("j".into()), Class::Result, text("sse"), None);
        let rt = rt();
        assert_eq!(
            texts(rt.block_on(hub.next_batch(&a, 10))),
            ["for a", "plain"]
        );
        assert_eq!(
            texts(rt.block_on(hub.next_batch(&b, 10))),
            ["tile", "with meta"]
        );
        assert_eq!(texts(rt.block_on(hub.next_batch(&s, 10))), ["sse"]);
        assert_eq!(hub.counts(), (2, 1));
        hub.remove(b.conn);
        assert!(!hub.wants_frames());
    }

    #[test]
    fn a_client_that_never_reads_holds_nothing_of_its_own() {
        // Publishing to 200 idle clients keeps one bounded log, not 200 queues.
        let hub = Hub::new(64, 128);
        let idle: Vec<_> = (0..200)
            .map(|i| hub.add(format!("c{i}"), Channel::WebSocket))
            .collect();
        for i in 0..10_000 {
            hub.publish(
                To::AllWs,
                Class::Droppable,
                text(&format!("tile {i}")),
                None,
            );
            if i % 100 == 0 {
                hub.publish(To::AllWs, Class::Result, text("executed"), None);
            }
        }
        let (drops, results, _) = hub.held();
        assert_eq!((drops, results), (64, 100));
        assert_eq!(idle.len(), 200);
    }
}
