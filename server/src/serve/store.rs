//! The durable queue and history: one redb database (`queue.redb` in the data folder).
//!
//! Tables: `jobs` (prompt id → the job's JSON record), `queue_v2` ((priority rank, ComfyUI
//! number, sequence) → prompt id), `running` (prompt id → start time), `history` (completion
//! sequence → prompt id), `models` (file path → model index entry) and `meta` (counters, the
//! held flag, the schema version).
//!
//! Invariants:
//! - A job is acknowledged to its client only after the transaction that queued it committed
//!   (redb commits are durable: fsync'd), so `kill -9` after `/prompt` answered loses nothing.
//! - One prompt id is accepted once: the duplicate check and the insert are the same write
//!   transaction (every write runs on the one writer thread), so concurrent submissions of an
//!   id get exactly one acceptance.
//! - The queue key is the service's own: a client's `number` orders the queue as ComfyUI's
//!   does (priority first, then number), and the service's sequence, unique per submission,
//!   breaks ties, so two jobs never share a key. Numbers are bounded (|n| ≤ 2^53) before they
//!   get here; the service's counter is never moved by a client's number.
//! - A job is in exactly one of `queue`, `running` or `history` (or cancelled: in none, its
//!   record kept); moves between them are single transactions. A queue entry that no longer
//!   matches its job (left by an older version) is removed when met, never retried forever.
//! - Writes go through one writer thread that commits whatever is waiting in one transaction
//!   (group commit): under many concurrent submissions the fsync cost is shared instead of
//!   serialised, which keeps `/prompt` acceptance latency flat. Each write does everything
//!   that can fail (decoding, encoding, checks) before its first change, so one that fails
//!   changes nothing in the batch it shares (a storage error fails the whole commit anyway).
//! - **Degraded mode.** A failed commit (a full disk, an I/O error) leaves redb refusing every
//!   later transaction until the file is closed and opened again. The writer then closes the
//!   database (waiting for readers to let go), reports the service degraded ([`Store::health`]:
//!   `/health`, `/system_stats`), answers writes with [`StoreErrorKind::Unavailable`] (HTTP 503:
//!   nothing is acknowledged that was not committed), reopens the file, and probes with a small
//!   write every half second until one commits; then the service is healthy again, with no
//!   restart.
//!
//! At open, a file that is empty, truncated or otherwise corrupt is refused with
//! [`OpenErrorKind::Corrupt`] (never started over silently); [`Store::move_aside`] keeps it
//! under another name so the service can start empty. Jobs found in `running` (the service
//! stopped without finishing them) are handled by the [`RestartPolicy`].

use super::config::RestartPolicy;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// The queue before schema 2, keyed by the client's number alone (migrated at open).
const QUEUE_V1: TableDefinition<(u8, i64), &str> = TableDefinition::new("queue");
const QUEUE: TableDefinition<(u8, i64, u64), &str> = TableDefinition::new("queue_v2");
const RUNNING: TableDefinition<&str, u64> = TableDefinition::new("running");
const HISTORY: TableDefinition<u64, &str> = TableDefinition::new("history");
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The schema this build writes (`meta.schema`).
const SCHEMA: u64 = 2;

/// The largest |number| a client may give: JavaScript's safe integers, which every ComfyUI
/// client can represent exactly.
pub const MAX_CLIENT_NUMBER: i64 = (1 << 53) - 1;

/// A job's priority; FIFO within one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Priority {
    Urgent,
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Urgent,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    /// Sort rank: lower runs first.
    pub fn rank(self) -> u8 {
        self as u8
    }

    /// Parses `URGENT`, `high`, ... (case-insensitive).
    pub fn parse(s: &str) -> Result<Priority, String> {
        match s.to_ascii_uppercase().as_str() {
            "URGENT" => Ok(Priority::Urgent),
            "HIGH" => Ok(Priority::High),
            "NORMAL" => Ok(Priority::Normal),
            "LOW" => Ok(Priority::Low),
            _ => Err(format!(
                "priority '{s}': expected URGENT, HIGH, NORMAL or LOW"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Urgent => "URGENT",
            Priority::High => "HIGH",
            Priority::Normal => "NORMAL",
            Priority::Low => "LOW",
        }
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Success,
    Error,
    Interrupted,
    /// Removed from the queue before it ran (`POST /queue {"delete": [...]}`).
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// Webhook delivery of a finished job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    pub url: String,
    pub attempts: u32,
    pub delivered: bool,
    pub last_error: Option<String>,
}

/// Everything the service keeps about one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// ComfyUI's `prompt_id`.
    pub id: String,
    /// ComfyUI's `number`: the client's, or the service's counter (negated for `front`).
    pub number: i64,
    /// The service's submission sequence: unique, increasing; the queue key's last part.
    #[serde(default)]
    pub seq: u64,
    pub priority: Priority,
    /// The workflow, API format.
    pub prompt: Json,
    pub client_id: Option<String>,
    pub extra_data: Json,
    /// Output nodes, as ComfyUI lists them in queue entries.
    pub outputs_to_execute: Vec<String>,
    pub state: JobState,
    /// Times the job was started (a restart may start it again).
    pub attempts: u32,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// ComfyUI's history `outputs`: node id → UI record.
    pub outputs: serde_json::Map<String, Json>,
    /// ComfyUI's history `status.messages`: `[type, data]` pairs.
    pub messages: Vec<(String, Json)>,
    pub error: Option<String>,
    /// The plan's forecast peak when it was admitted.
    pub forecast_peak_bytes: Option<u64>,
    pub tracked_peak_bytes: Option<u64>,
    pub webhooks: Vec<WebhookDelivery>,
    /// Where the run's time went (the engine's `telemetry.timing`), once it ran.
    #[serde(default)]
    pub timing: Option<Json>,
}

impl JobRecord {
    /// ComfyUI's queue/history tuple: `[number, prompt_id, prompt, extra_data, outputs]`.
    pub fn comfy_tuple(&self) -> Json {
        serde_json::json!([
            self.number,
            self.id,
            self.prompt,
            self.extra_data,
            self.outputs_to_execute
        ])
    }

    /// The job's key in the queue table.
    fn queue_key(&self) -> (u8, i64, u64) {
        (self.priority.rank(), self.number, self.seq)
    }
}

/// A queue entry's key: (priority rank, ComfyUI number, the service's sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueKey((u8, i64, u64));

/// How a new job gets its ComfyUI `number`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Number {
    /// The client's own (already checked against [`MAX_CLIENT_NUMBER`]).
    Client(i64),
    /// The service's counter; negated for ComfyUI's `front: true`.
    Next { front: bool },
}

/// What submitting a job did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued, with this ComfyUI number.
    Queued(i64),
    /// A job with that prompt id exists already; nothing was written.
    Duplicate,
}

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The database cannot take writes now (an I/O error, a full disk): retry later (503).
    Unavailable,
    /// Anything else (a corrupt record, a bug).
    Other,
}

/// A queue database failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("queue database {path}: {reason}")]
pub struct StoreError {
    pub path: String,
    pub reason: String,
    pub kind: StoreErrorKind,
}

/// Why the database could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenErrorKind {
    /// The file is empty, truncated or damaged: it can be moved aside ([`Store::move_aside`]).
    Corrupt,
    /// It could not be read or created (permissions, a missing folder, held by another
    /// process).
    Io,
}

/// The database could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("queue database {path}: {reason}")]
pub struct OpenError {
    pub path: String,
    pub reason: String,
    pub kind: OpenErrorKind,
}

/// The queue database's health, for `/health` and `/system_stats`.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// Whether the last write committed.
    pub ok: bool,
    /// Why writes fail, while they do.
    pub reason: Option<String>,
    /// Since when (ms since the Unix epoch).
    pub since_ms: Option<u64>,
}

type Answer = Result<Box<dyn Any + Send>, StoreError>;
type Reply = tokio::sync::oneshot::Sender<Answer>;
type WriteFn = Box<dyn FnOnce(&WriteTransaction) -> Result<Box<dyn Any + Send>, String> + Send>;

/// The open database and its health, shared by the handles and the writer thread.
struct Shared {
    /// `None` while the writer reopens the file after an I/O error.
    db: RwLock<Option<Arc<Database>>>,
    health: Mutex<Option<(String, u64)>>,
    path: PathBuf,
}

impl Shared {
    fn err(&self, reason: impl std::fmt::Display, kind: StoreErrorKind) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
            kind,
        }
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                let reason = self
                    .degraded()
                    .unwrap_or_else(|| "the database is being reopened".into());
                self.err(
                    format!("unavailable: {reason}"),
                    StoreErrorKind::Unavailable,
                )
            })
    }

    fn degraded(&self) -> Option<String> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(r, _)| r.clone())
    }

    fn set_degraded(&self, reason: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match (reason, h.is_some()) {
            (Some(r), false) => {
                eprintln!(
                    "nova serve: queue database {}: writes fail ({r}); the service is degraded \
                     until a write commits again",
                    self.path.display()
                );
                *h = Some((r, now_ms()));
            }
            (Some(r), true) => {
                if let Some(cur) = h.as_mut() {
                    cur.0 = r;
                }
            }
            (None, true) => {
                eprintln!(
                    "nova serve: queue database {}: writes commit again; the service is healthy",
                    self.path.display()
                );
                *h = None;
            }
            (None, false) => {}
        }
    }

    /// Closes the file: takes the handle away and waits (briefly) for readers to drop theirs,
    /// so that reopening finds the file unlocked.
    fn close(&self) {
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut old) = old {
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        return;
                    }
                    Err(still) if Instant::now() < until => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still) => {
                        // A reader holds on; it drops the handle when it ends, and the next
                        // reopen attempt succeeds then.
                        drop(still);
                        return;
                    }
                }
            }
        }
    }

    fn reopen(&self) -> bool {
        match open_db(&self.path) {
            Ok(db) => {
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
                true
            }
            Err(e) => {
                self.set_degraded(Some(format!("reopening failed: {}", e.reason)));
                false
            }
        }
    }
}

/// The queue database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    writer: mpsc::Sender<(WriteFn, Reply)>,
}

/// What opening the database did to jobs left running by the last process.
#[derive(Debug, Default)]
pub struct Recovery {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
    /// Queue entries that no longer matched their job (an older version's), removed.
    pub stale_removed: usize,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (ComfyUI's message timestamps).
pub fn timestamp_ms() -> u64 {
    now_ms()
}

fn decode(bytes: &[u8]) -> Result<JobRecord, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("corrupt job record: {e}"))
}

fn encode(rec: &JobRecord) -> Result<Vec<u8>, String> {
    serde_json::to_vec(rec).map_err(|e| e.to_string())
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Opens or creates the file, turning redb's refusals and panics on a damaged file into
/// [`OpenError`]s.
fn open_db(path: &Path) -> Result<Database, OpenError> {
    let err = |reason: String, kind| OpenError {
        path: path.display().to_string(),
        reason,
        kind,
    };
    if let Ok(m) = std::fs::metadata(path) {
        if m.is_file() && m.len() == 0 {
            return Err(err(
                "the file is empty (0 bytes): a database file is never empty, so it was \
                 truncated or never written"
                    .into(),
                OpenErrorKind::Corrupt,
            ));
        }
    }
    let opened = std::panic::catch_unwind(|| Database::create(path));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => {
            let kind = match &e {
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))
                | redb::DatabaseError::RepairAborted
                | redb::DatabaseError::UpgradeRequired(_) => OpenErrorKind::Corrupt,
                redb::DatabaseError::Storage(redb::StorageError::Io(io))
                    if io.kind() == std::io::ErrorKind::UnexpectedEof
                        || io.kind() == std::io::ErrorKind::InvalidData =>
                {
                    OpenErrorKind::Corrupt
                }
                _ => OpenErrorKind::Io,
            };
            Err(err(e.to_string(), kind))
        }
        Err(_) => Err(err(
            "the file is damaged (the database engine could not read its structure)".into(),
            OpenErrorKind::Corrupt,
        )),
    }
}

fn meta_get(meta: &redb::Table<&str, u64>, key: &str) -> Result<Option<u64>, String> {
    Ok(meta.get(key).map_err(s)?.map(|v| v.value()))
}

/// Moves schema 1's queue (keyed by number alone; duplicate keys overwrote each other, and
/// duplicate ids left several entries for one job) into `queue_v2`: one entry per queued
/// job, in the old order, each with a sequence of its own.
fn migrate_v1(txn: &WriteTransaction, recovery: &mut Recovery) -> Result<(), String> {
    let has_v1 = txn
        .list_tables()
        .map_err(s)?
        .any(|t| t.name() == QUEUE_V1.name());
    let mut meta = txn.open_table(META).map_err(s)?;
    let mut seq = meta_get(&meta, "seq")?.unwrap_or(0);
    if meta_get(&meta, "schema")?.is_none() {
        // The service's ComfyUI counter continues after schema 1's largest number.
        if let Some(max) = meta_get(&meta, "max_number")? {
            let next = meta_get(&meta, "number")?.unwrap_or(0);
            meta.insert(
                "number",
                next.max((max as i64).clamp(0, MAX_CLIENT_NUMBER) as u64 + 1),
            )
            .map_err(s)?;
        }
    }
    if has_v1 {
        let mut jobs = txn.open_table(JOBS).map_err(s)?;
        let mut queue = txn.open_table(QUEUE).map_err(s)?;
        let mut seen = std::collections::HashSet::new();
        {
            let old = txn.open_table(QUEUE_V1).map_err(s)?;
            let entries: Vec<((u8, i64), String)> = old
                .iter()
                .map_err(s)?
                .filter_map(|r| r.ok().map(|(k, v)| (k.value(), v.value().to_string())))
                .collect();
            for ((rank, number), id) in entries {
                let rec = jobs
                    .get(id.as_str())
                    .map_err(s)?
                    .map(|v| decode(v.value()))
                    .transpose()?;
                let Some(mut rec) = rec else {
                    recovery.stale_removed += 1;
                    continue;
                };
                if rec.state != JobState::Queued
                    || (rec.priority.rank(), rec.number) != (rank, number)
                    || !seen.insert(id.clone())
                {
                    recovery.stale_removed += 1;
                    continue;
                }
                rec.number = rec.number.clamp(-MAX_CLIENT_NUMBER, MAX_CLIENT_NUMBER);
                rec.seq = seq;
                seq += 1;
                queue.insert(rec.queue_key(), id.as_str()).map_err(s)?;
                jobs.insert(id.as_str(), encode(&rec)?.as_slice())
                    .map_err(s)?;
            }
        }
        txn.delete_table(QUEUE_V1).map_err(s)?;
        // A queued job whose entry an old duplicate key overwrote would wait forever: queue it
        // again. Only schema 1 could leave one, so only its migration scans every record.
        let orphans: Vec<JobRecord> = jobs
            .iter()
            .map_err(s)?
            .filter_map(|r| r.ok().and_then(|(_, v)| decode(v.value()).ok()))
            .filter(|r| r.state == JobState::Queued && !seen.contains(&r.id))
            .collect();
        for mut rec in orphans {
            rec.number = rec.number.clamp(-MAX_CLIENT_NUMBER, MAX_CLIENT_NUMBER);
            rec.seq = seq;
            seq += 1;
            queue.insert(rec.queue_key(), rec.id.as_str()).map_err(s)?;
            jobs.insert(rec.id.as_str(), encode(&rec)?.as_slice())
                .map_err(s)?;
        }
    }
    meta.insert("seq", seq).map_err(s)?;
    meta.insert("schema", SCHEMA).map_err(s)?;
    Ok(())
}

/// The next history sequence.
fn next_history(meta: &mut redb::Table<&str, u64>) -> Result<u64, String> {
    let seq = meta_get(meta, "next_history")?.unwrap_or(0);
    meta.insert("next_history", seq + 1).map_err(s)?;
    Ok(seq)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, migrates an older schema, and
    /// applies the restart policy to jobs the last process left running.
    pub fn open(
        path: &Path,
        policy: RestartPolicy,
        max_attempts: u32,
    ) -> Result<(Store, Recovery), OpenError> {
        let err = |reason: String| OpenError {
            path: path.display().to_string(),
            reason,
            kind: OpenErrorKind::Io,
        };
        let db = open_db(path)?;
        let mut recovery = Recovery::default();
        {
            let txn = db.begin_write().map_err(|e| err(s(e)))?;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                recover(&txn, policy, max_attempts, &mut recovery)
            }));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return Err(OpenError {
                        path: path.display().to_string(),
                        reason,
                        kind: OpenErrorKind::Corrupt,
                    })
                }
                Err(_) => {
                    return Err(OpenError {
                        path: path.display().to_string(),
                        reason: "the file is damaged (reading its tables failed)".into(),
                        kind: OpenErrorKind::Corrupt,
                    })
                }
            }
            txn.commit().map_err(|e| err(s(e)))?;
        }
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            health: Mutex::new(None),
            path: path.to_path_buf(),
        });
        let (tx, rx) = mpsc::channel::<(WriteFn, Reply)>();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("nova-queue-db".into())
            .spawn(move || writer(writer_shared, rx))
            .map_err(|e| err(s(e)))?;
        Ok((Store { shared, writer: tx }, recovery))
    }

    /// Renames a corrupt database file to `<name>.corrupt-<ms since the epoch>` beside it, so
    /// the service can start with an empty queue and the old file is kept. Returns the new
    /// path.
    pub fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "queue.redb".into());
        let aside = path.with_file_name(format!("{name}.corrupt-{}", now_ms()));
        std::fs::rename(path, &aside)?;
        Ok(aside)
    }

    /// Whether writes commit (see the module docs on degraded mode).
    pub fn health(&self) -> Health {
        let h = self
            .shared
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Health {
            ok: h.is_none(),
            reason: h.as_ref().map(|(r, _)| r.clone()),
            since_ms: h.map(|(_, t)| t),
        }
    }

    fn err(&self, reason: impl std::fmt::Display) -> StoreError {
        self.shared.err(reason, StoreErrorKind::Other)
    }

    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, String> + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<Answer>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let f: WriteFn = Box::new(move |txn| f(txn).map(|r| Box::new(r) as Box<dyn Any + Send>));
        self.writer
            .send((f, tx))
            .map_err(|_| self.err("the writer thread stopped"))?;
        Ok(rx)
    }

    fn unpack<R: 'static>(
        &self,
        r: Result<Answer, tokio::sync::oneshot::error::RecvError>,
    ) -> Result<R, StoreError> {
        let b = r.map_err(|_| self.err("the writer thread stopped"))??;
        b.downcast::<R>()
            .map(|b| *b)
            .map_err(|_| self.err("reply of the wrong type"))
    }

    /// Runs `f` in a write transaction (batched with others) and waits for its commit.
    pub async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, String> + Send + 'static,
    ) -> Result<R, StoreError> {
        let rx = self.submit(f)?;
        let r = rx.await;
        self.unpack(r)
    }

    /// [`Store::write`] from a thread that is not async.
    pub fn write_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, String> + Send + 'static,
    ) -> Result<R, StoreError> {
        let rx = self.submit(f)?;
        let r = rx.blocking_recv();
        self.unpack(r)
    }

    /// Queues a new job durably, unless its prompt id was submitted before (checked in the
    /// same transaction). `rec.number` and `rec.seq` are set here.
    pub async fn enqueue(
        &self,
        mut rec: JobRecord,
        number: Number,
    ) -> Result<Enqueued, StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            if jobs.get(rec.id.as_str()).map_err(s)?.is_some() {
                return Ok(Enqueued::Duplicate);
            }
            let mut queue = txn.open_table(QUEUE).map_err(s)?;
            let mut meta = txn.open_table(META).map_err(s)?;
            // Every fallible step before the first change: a write that fails changes nothing
            // (the batch it shares a commit with goes on).
            let mut next_number = None;
            rec.number = match number {
                Number::Client(n) => n.clamp(-MAX_CLIENT_NUMBER, MAX_CLIENT_NUMBER),
                Number::Next { front } => {
                    let n = meta_get(&meta, "number")?
                        .unwrap_or(0)
                        .min(MAX_CLIENT_NUMBER as u64);
                    next_number = Some(n + 1);
                    if front {
                        -(n as i64)
                    } else {
                        n as i64
                    }
                }
            };
            rec.seq = meta_get(&meta, "seq")?.unwrap_or(0);
            let bytes = encode(&rec)?;
            if let Some(n) = next_number {
                meta.insert("number", n).map_err(s)?;
            }
            meta.insert("seq", rec.seq + 1).map_err(s)?;
            queue.insert(rec.queue_key(), rec.id.as_str()).map_err(s)?;
            jobs.insert(rec.id.as_str(), bytes.as_slice()).map_err(s)?;
            Ok(Enqueued::Queued(rec.number))
        })
        .await
    }

    /// Moves the job queued under `key` to running (one more attempt). The entry is removed
    /// whatever it holds: `None` when it no longer matched a queued job (cancelled meanwhile,
    /// or left by an older version), so no caller meets it again.
    pub async fn start(
        &self,
        key: QueueKey,
        forecast_peak_bytes: Option<u64>,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            let mut queue = txn.open_table(QUEUE).map_err(s)?;
            let mut running = txn.open_table(RUNNING).map_err(s)?;
            let Some(id) = queue
                .remove(key.0)
                .map_err(s)?
                .map(|v| v.value().to_string())
            else {
                return Ok(None);
            };
            // An unreadable record cannot run: its entry is gone, the record is kept.
            let rec = jobs
                .get(id.as_str())
                .map_err(s)?
                .and_then(|v| decode(v.value()).ok());
            let Some(mut rec) =
                rec.filter(|r| r.state == JobState::Queued && r.queue_key() == key.0)
            else {
                return Ok(None);
            };
            rec.state = JobState::Running;
            rec.attempts += 1;
            rec.started_ms = Some(now_ms());
            rec.forecast_peak_bytes = forecast_peak_bytes;
            let bytes = encode(&rec)?;
            running.insert(id.as_str(), now_ms()).map_err(s)?;
            jobs.insert(id.as_str(), bytes.as_slice()).map_err(s)?;
            Ok(Some(rec))
        })
        .await
    }

    /// Records a job's end: out of `running` (or `queue`, for a job that never started) and
    /// into `history`.
    pub fn finish_blocking(&self, mut rec: JobRecord) -> Result<(), StoreError> {
        self.write_blocking(move |txn| finish_in(txn, &mut rec))
    }

    /// [`Store::finish_blocking`] for async callers.
    pub async fn finish(&self, mut rec: JobRecord) -> Result<(), StoreError> {
        self.write(move |txn| finish_in(txn, &mut rec)).await
    }

    /// Overwrites a job's record (webhook delivery state, ...), wherever it is.
    pub async fn update(&self, rec: JobRecord) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            jobs.insert(rec.id.as_str(), encode(&rec)?.as_slice())
                .map_err(s)?;
            Ok(())
        })
        .await
    }

    /// Cancels queued jobs (`None`: all). Returns the ids cancelled; running jobs are not
    /// touched (interrupt them instead).
    pub async fn cancel(&self, ids: Option<Vec<String>>) -> Result<Vec<String>, StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            let mut queue = txn.open_table(QUEUE).map_err(s)?;
            let queued: Vec<((u8, i64, u64), String)> = queue
                .iter()
                .map_err(s)?
                .filter_map(|r| r.ok().map(|(k, v)| (k.value(), v.value().to_string())))
                .collect();
            let mut done = vec![];
            for (key, id) in queued {
                if ids.as_ref().is_some_and(|want| !want.contains(&id)) {
                    continue;
                }
                let rec = jobs
                    .get(id.as_str())
                    .map_err(s)?
                    .and_then(|v| decode(v.value()).ok());
                queue.remove(key).map_err(s)?;
                if let Some(mut rec) = rec.filter(|r| r.state == JobState::Queued) {
                    rec.state = JobState::Cancelled;
                    rec.finished_ms = Some(now_ms());
                    let bytes = encode(&rec)?;
                    jobs.insert(id.as_str(), bytes.as_slice()).map_err(s)?;
                    done.push(id);
                }
            }
            Ok(done)
        })
        .await
    }

    /// Removes history entries (`None`: all). Their records go too; outputs stay on disk.
    pub async fn delete_history(&self, ids: Option<Vec<String>>) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            let mut history = txn.open_table(HISTORY).map_err(s)?;
            let entries: Vec<(u64, String)> = history
                .iter()
                .map_err(s)?
                .filter_map(|r| r.ok().map(|(k, v)| (k.value(), v.value().to_string())))
                .collect();
            let mut n = 0;
            for (seq, id) in entries {
                if ids.as_ref().is_some_and(|want| !want.contains(&id)) {
                    continue;
                }
                history.remove(seq).map_err(s)?;
                jobs.remove(id.as_str()).map_err(s)?;
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    /// Persists whether the queue is held, so a restart keeps it held.
    pub async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut meta = txn.open_table(META).map_err(s)?;
            meta.insert("paused", u64::from(paused)).map_err(s)?;
            Ok(())
        })
        .await
    }

    /// Whether the queue was held when the service last said so.
    pub fn paused(&self) -> Result<bool, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META).map_err(s)?;
            Ok(meta
                .get("paused")
                .map_err(s)?
                .is_some_and(|v| v.value() != 0))
        })
    }

    fn read<R>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R, String>,
    ) -> Result<R, StoreError> {
        let db = self.shared.db()?;
        let txn = db.begin_read().map_err(|e| {
            self.shared
                .err(format!("unavailable: {e}"), StoreErrorKind::Unavailable)
        })?;
        f(&txn).map_err(|e| self.err(e))
    }

    /// One job's record.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(s)?;
            let v = jobs.get(id).map_err(s)?;
            v.map(|b| decode(b.value())).transpose()
        })
    }

    /// Queued jobs in the order they will run.
    pub fn pending(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(s)?;
            let queue = txn.open_table(QUEUE).map_err(s)?;
            let mut out = vec![];
            for r in queue.iter().map_err(s)? {
                let (k, id) = r.map_err(s)?;
                if let Some(b) = jobs.get(id.value()).map_err(s)? {
                    let rec = decode(b.value())?;
                    if rec.state == JobState::Queued && rec.queue_key() == k.value() {
                        out.push(rec);
                    }
                }
            }
            Ok(out)
        })
    }

    /// The queue entry that runs next, and its job when the entry matches one that is
    /// queued (`None`: a stale entry, which [`Store::start`] removes).
    pub fn next_queued(&self) -> Result<Option<(QueueKey, Option<JobRecord>)>, StoreError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(s)?;
            let queue = txn.open_table(QUEUE).map_err(s)?;
            let Some(r) = queue.iter().map_err(s)?.next() else {
                return Ok(None);
            };
            let (k, id) = r.map_err(s)?;
            let key = k.value();
            let rec = jobs
                .get(id.value())
                .map_err(s)?
                .map(|b| decode(b.value()))
                .transpose()?
                .filter(|r| r.state == JobState::Queued && r.queue_key() == key);
            Ok(Some((QueueKey(key), rec)))
        })
    }

    /// Jobs running now (as recorded).
    pub fn running(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(s)?;
            let running = txn.open_table(RUNNING).map_err(s)?;
            let mut out = vec![];
            for r in running.iter().map_err(s)? {
                let (id, _) = r.map_err(s)?;
                if let Some(b) = jobs.get(id.value()).map_err(s)? {
                    out.push(decode(b.value())?);
                }
            }
            Ok(out)
        })
    }

    /// Finished jobs, oldest first: the last `max` (all when `None`) after skipping `offset`
    /// from the newest.
    pub fn history(&self, max: Option<usize>, offset: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(s)?;
            let history = txn.open_table(HISTORY).map_err(s)?;
            let mut out = vec![];
            let take = max.unwrap_or(usize::MAX);
            for r in history.iter().map_err(s)?.rev().skip(offset).take(take) {
                let (_, id) = r.map_err(s)?;
                if let Some(b) = jobs.get(id.value()).map_err(s)? {
                    out.push(decode(b.value())?);
                }
            }
            out.reverse();
            Ok(out)
        })
    }

    /// Counts: queued, running, finished.
    pub fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        self.read(|txn| {
            let q = txn.open_table(QUEUE).map_err(s)?.len().map_err(s)?;
            let r = txn.open_table(RUNNING).map_err(s)?.len().map_err(s)?;
            let h = txn.open_table(HISTORY).map_err(s)?.len().map_err(s)?;
            Ok((q, r, h))
        })
    }

    /// Every model index entry, by path.
    pub fn models(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(MODELS).map_err(s)?;
            let mut out = vec![];
            for r in t.iter().map_err(s)? {
                let (k, v) = r.map_err(s)?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Writes changed model index entries and removes the entries of files that are gone.
    pub fn update_models(
        &self,
        put: Vec<(String, Vec<u8>)>,
        remove: Vec<String>,
    ) -> Result<(), StoreError> {
        self.write_blocking(move |txn| {
            let mut t = txn.open_table(MODELS).map_err(s)?;
            for (k, v) in &put {
                t.insert(k.as_str(), v.as_slice()).map_err(s)?;
            }
            for k in &remove {
                t.remove(k.as_str()).map_err(s)?;
            }
            Ok(())
        })
    }
}

/// Open-time work: tables, migration, and the restart policy for jobs left running.
fn recover(
    txn: &WriteTransaction,
    policy: RestartPolicy,
    max_attempts: u32,
    recovery: &mut Recovery,
) -> Result<(), String> {
    for t in [JOBS, MODELS] {
        txn.open_table(t).map_err(s)?;
    }
    txn.open_table(RUNNING).map_err(s)?;
    txn.open_table(HISTORY).map_err(s)?;
    txn.open_table(QUEUE).map_err(s)?;
    txn.open_table(META).map_err(s)?;
    migrate_v1(txn, recovery)?;
    let mut jobs = txn.open_table(JOBS).map_err(s)?;
    let mut queue = txn.open_table(QUEUE).map_err(s)?;
    let mut running = txn.open_table(RUNNING).map_err(s)?;
    let mut history = txn.open_table(HISTORY).map_err(s)?;
    let mut meta = txn.open_table(META).map_err(s)?;
    let ids: Vec<String> = running
        .iter()
        .map_err(s)?
        .filter_map(|r| r.ok().map(|(k, _)| k.value().to_string()))
        .collect();
    for id in ids {
        running.remove(id.as_str()).map_err(s)?;
        let Some(bytes) = jobs
            .get(id.as_str())
            .map_err(s)?
            .map(|v| v.value().to_vec())
        else {
            continue;
        };
        // A record that does not decode is left out of the queue (and said so), rather than
        // making a healthy file look corrupt.
        let mut rec = match decode(&bytes) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("nova serve: job {id} was running but its record is unreadable ({e}); it is dropped from the queue");
                continue;
            }
        };
        if policy == RestartPolicy::Requeue && rec.attempts < max_attempts {
            rec.state = JobState::Queued;
            rec.messages.push((
                "nova_requeued".into(),
                serde_json::json!({"prompt_id": rec.id, "attempts": rec.attempts, "timestamp": now_ms()}),
            ));
            // A fresh sequence: a record from before schema 2 has none, and another job may
            // hold its old key.
            rec.seq = meta_get(&meta, "seq")?.unwrap_or(0);
            meta.insert("seq", rec.seq + 1).map_err(s)?;
            queue.insert(rec.queue_key(), id.as_str()).map_err(s)?;
            recovery.requeued.push(id.clone());
        } else {
            rec.state = JobState::Error;
            rec.finished_ms = Some(now_ms());
            let reason = format!(
                "the service stopped while this job ran (started {} time(s); restart policy {})",
                rec.attempts,
                match policy {
                    RestartPolicy::Requeue => "requeue",
                    RestartPolicy::Fail => "fail",
                }
            );
            rec.messages.push((
                "execution_error".into(),
                serde_json::json!({"prompt_id": rec.id, "node_id": null, "node_type": null,
                    "executed": [], "exception_message": reason, "exception_type": "ServiceRestart",
                    "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}),
            ));
            rec.error = Some(reason);
            let seq = next_history(&mut meta)?;
            history.insert(seq, id.as_str()).map_err(s)?;
            recovery.failed.push(id.clone());
        }
        jobs.insert(id.as_str(), encode(&rec)?.as_slice())
            .map_err(s)?;
    }
    Ok(())
}

fn finish_in(txn: &WriteTransaction, rec: &mut JobRecord) -> Result<(), String> {
    if rec.finished_ms.is_none() {
        rec.finished_ms = Some(now_ms());
    }
    let bytes = encode(rec)?;
    let mut jobs = txn.open_table(JOBS).map_err(s)?;
    let mut queue = txn.open_table(QUEUE).map_err(s)?;
    let mut running = txn.open_table(RUNNING).map_err(s)?;
    let mut history = txn.open_table(HISTORY).map_err(s)?;
    let mut meta = txn.open_table(META).map_err(s)?;
    running.remove(rec.id.as_str()).map_err(s)?;
    queue.remove(rec.queue_key()).map_err(s)?;
    let seq = next_history(&mut meta)?;
    history.insert(seq, rec.id.as_str()).map_err(s)?;
    jobs.insert(rec.id.as_str(), bytes.as_slice()).map_err(s)?;
    Ok(())
}

/// How often a degraded writer tries to reopen or probe the database.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// The writer thread: commits whatever is waiting in one transaction, then answers each. While
/// the database is degraded it answers writes at once with `Unavailable` and probes for
/// recovery (see the module docs).
fn writer(shared: Arc<Shared>, rx: mpsc::Receiver<(WriteFn, Reply)>) {
    let mut last_probe = Instant::now();
    loop {
        let first = if shared.degraded().is_some() {
            match rx.recv_timeout(PROBE_EVERY) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(op) => Some(op),
                Err(_) => return,
            }
        };
        if shared.degraded().is_some() && last_probe.elapsed() >= PROBE_EVERY {
            last_probe = Instant::now();
            probe(&shared);
        }
        let Some(first) = first else { continue };
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Some(reason) = shared.degraded() {
            for (_, reply) in batch {
                let _ = reply.send(Err(shared.err(
                    format!("unavailable: {reason}"),
                    StoreErrorKind::Unavailable,
                )));
            }
            continue;
        }
        let failed = |shared: &Shared, batch: Vec<Reply>, reason: String| {
            shared.set_degraded(Some(reason.clone()));
            shared.close();
            for reply in batch {
                let _ = reply.send(Err(shared.err(
                    format!("unavailable: {reason}"),
                    StoreErrorKind::Unavailable,
                )));
            }
            shared.reopen();
        };
        let db = match shared.db() {
            Ok(db) => db,
            Err(e) => {
                failed(&shared, batch.into_iter().map(|b| b.1).collect(), e.reason);
                continue;
            }
        };
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                drop(db);
                failed(&shared, batch.into_iter().map(|b| b.1).collect(), s(e));
                continue;
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        for (f, reply) in batch {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&txn)))
                .unwrap_or_else(|_| Err("the write panicked (this is a bug)".into()));
            results.push((reply, r));
        }
        match txn.commit() {
            Ok(()) => {
                for (reply, r) in results {
                    let _ = reply.send(r.map_err(|e| shared.err(e, StoreErrorKind::Other)));
                }
            }
            Err(e) => {
                drop(db);
                failed(&shared, results.into_iter().map(|r| r.0).collect(), s(e));
            }
        }
    }
}

/// One recovery attempt of a degraded database: reopen the file if it is closed, then try a
/// small write; the service is healthy again when it commits.
fn probe(shared: &Shared) {
    if shared.db().is_err() && !shared.reopen() {
        return;
    }
    let Ok(db) = shared.db() else { return };
    let committed = (|| -> Result<(), String> {
        let txn = db.begin_write().map_err(s)?;
        {
            let mut meta = txn.open_table(META).map_err(s)?;
            meta.insert("probe_ms", now_ms()).map_err(s)?;
        }
        txn.commit().map_err(s)
    })();
    drop(db);
    match committed {
        Ok(()) => shared.set_degraded(None),
        Err(e) => {
            shared.set_degraded(Some(e));
            shared.close();
            shared.reopen();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, priority: Priority) -> JobRecord {
        JobRecord {
            priority,
            prompt: serde_json::json!({}),
            extra_data: serde_json::json!({}),
            state: JobState::Queued,
            ..blank(id)
        }
    }

    /// A record with nothing in it but its id.
    fn blank(id: &str) -> JobRecord {
        JobRecord {
            id: id.to_string(),
            number: 0,
            seq: 0,
            priority: Priority::Normal,
            prompt: Json::Null,
            client_id: None,
            extra_data: Json::Null,
            outputs_to_execute: vec![],
            state: JobState::Cancelled,
            attempts: 0,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            outputs: Default::default(),
            messages: vec![],
            error: None,
            forecast_peak_bytes: None,
            tracked_peak_bytes: None,
            webhooks: vec![],
            timing: None,
        }
    }

    async fn start_id(store: &Store, id: &str) -> Option<JobRecord> {
        let key = store
            .pending()
            .unwrap()
            .iter()
            .find(|r| r.id == id)
            .map(|r| QueueKey(r.queue_key()))?;
        store.start(key, None).await.unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn next() -> Number {
        Number::Next { front: false }
    }

    #[test]
    fn queue_orders_by_priority_then_submission() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            Store::open(&dir.path().join("q.redb"), RestartPolicy::Requeue, 2).unwrap();
        rt().block_on(async {
            store
                .enqueue(rec("a", Priority::Low), next())
                .await
                .unwrap();
            store
                .enqueue(rec("b", Priority::Normal), next())
                .await
                .unwrap();
            store
                .enqueue(rec("c", Priority::Urgent), next())
                .await
                .unwrap();
            store
                .enqueue(rec("d", Priority::Normal), next())
                .await
                .unwrap();
        });
        let order: Vec<String> = store.pending().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(order, ["c", "b", "d", "a"]);
        assert_eq!(store.next_queued().unwrap().unwrap().1.unwrap().id, "c");
    }

    #[test]
    fn one_prompt_id_is_accepted_once_even_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            Store::open(&dir.path().join("q.redb"), RestartPolicy::Requeue, 2).unwrap();
        let got: Vec<Enqueued> = rt().block_on(async {
            let futs: Vec<_> = (0..8)
                .map(|_| store.enqueue(rec("same", Priority::Normal), next()))
                .collect();
            futures_util::future::join_all(futs)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect()
        });
        assert_eq!(
            got.iter()
                .filter(|e| matches!(e, Enqueued::Queued(_)))
                .count(),
            1,
            "{got:?}"
        );
        assert_eq!(store.pending().unwrap().len(), 1);
        assert_eq!(store.counts().unwrap().0, 1);
    }

    #[test]
    fn equal_client_numbers_keep_both_jobs_queued_in_submission_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            Store::open(&dir.path().join("q.redb"), RestartPolicy::Requeue, 2).unwrap();
        rt().block_on(async {
            store
                .enqueue(rec("a", Priority::Normal), Number::Client(5))
                .await
                .unwrap();
            store
                .enqueue(rec("b", Priority::Normal), Number::Client(5))
                .await
                .unwrap();
            assert_eq!(
                store
                    .enqueue(rec("c", Priority::Normal), next())
                    .await
                    .unwrap(),
                Enqueued::Queued(0),
                "a client's number does not move the service's counter"
            );
            assert_eq!(
                store
                    .enqueue(rec("d", Priority::Normal), Number::Next { front: true })
                    .await
                    .unwrap(),
                Enqueued::Queued(-1)
            );
        });
        let order: Vec<String> = store.pending().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(order, ["d", "c", "a", "b"]);
    }

    #[test]
    fn reopening_requeues_running_jobs_until_attempts_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        {
            let (store, _) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
            rt().block_on(async {
                store
                    .enqueue(rec("a", Priority::Normal), next())
                    .await
                    .unwrap();
                store
                    .enqueue(rec("b", Priority::Normal), next())
                    .await
                    .unwrap();
                assert!(start_id(&store, "a").await.is_some());
            });
        }
        // The writer thread of the first handle still holds the file; a second process
        // would see it closed. Wait for the handle to drop.
        std::thread::sleep(Duration::from_millis(50));
        let (store, rec1) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
        assert_eq!(rec1.requeued, ["a"]);
        let order: Vec<String> = store.pending().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(order, ["a", "b"]);
        rt().block_on(async {
            assert_eq!(
                store
                    .enqueue(rec("c", Priority::Normal), next())
                    .await
                    .unwrap(),
                Enqueued::Queued(2)
            );
            assert_eq!(start_id(&store, "a").await.unwrap().attempts, 2);
        });
        drop(store);
        std::thread::sleep(Duration::from_millis(50));
        let (store, rec2) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
        assert_eq!(rec2.failed, ["a"]);
        let h = store.history(None, 0).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].state, JobState::Error);
        assert!(h[0].error.as_deref().unwrap().contains("started 2 time(s)"));
    }

    #[test]
    fn schema_1_queues_migrate_without_stale_or_lost_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        {
            // Schema 1 as the old service left it after the duplicate-id and equal-number
            // defects: "dup" twice in the queue, "x" overwritten by "y" under key (2, 5).
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut jobs = txn.open_table(JOBS).unwrap();
                let mut q = txn.open_table(QUEUE_V1).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                for (id, n) in [("dup", 1), ("x", 5), ("y", 5), ("z", 7)] {
                    let mut r = rec(id, Priority::Normal);
                    r.number = n;
                    jobs.insert(id, encode(&r).unwrap().as_slice()).unwrap();
                }
                q.insert((2, 1), "dup").unwrap();
                q.insert((2, 3), "dup").unwrap();
                q.insert((2, 5), "y").unwrap();
                q.insert((2, 7), "z").unwrap();
                meta.insert("max_number", 7).unwrap();
            }
            txn.commit().unwrap();
        }
        let (store, recovery) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
        assert_eq!(recovery.stale_removed, 1);
        // "x" had lost its entry: it is queued again, after the job that took its key.
        let order: Vec<String> = store.pending().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(order, ["dup", "y", "x", "z"]);
        rt().block_on(async {
            assert_eq!(
                store
                    .enqueue(rec("n", Priority::Normal), next())
                    .await
                    .unwrap(),
                Enqueued::Queued(8)
            );
            for id in ["dup", "x", "y", "z", "n"] {
                assert!(start_id(&store, id).await.is_some(), "{id}");
            }
        });
        assert_eq!(store.counts().unwrap().0, 0);
    }

    #[test]
    fn empty_and_truncated_files_are_corrupt_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        std::fs::write(&path, b"").unwrap();
        let e = Store::open(&path, RestartPolicy::Requeue, 2).err().unwrap();
        assert_eq!(e.kind, OpenErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("q.redb"), "{e}");
        std::fs::remove_file(&path).unwrap();
        {
            let (store, _) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
            rt().block_on(async {
                for i in 0..50 {
                    store
                        .enqueue(rec(&format!("j{i}"), Priority::Normal), next())
                        .await
                        .unwrap();
                }
            });
        }
        std::thread::sleep(Duration::from_millis(50));
        let full = std::fs::read(&path).unwrap();
        for pct in [5, 30, 60, 95] {
            std::fs::write(&path, &full[..full.len() * pct / 100]).unwrap();
            let e = Store::open(&path, RestartPolicy::Requeue, 2).err();
            let e = e.unwrap_or_else(|| panic!("a file cut at {pct}% opened"));
            assert_eq!(e.kind, OpenErrorKind::Corrupt, "{pct}%: {e}");
        }
        let aside = Store::move_aside(&path).unwrap();
        assert!(aside.exists() && !path.exists());
        assert!(Store::open(&path, RestartPolicy::Requeue, 2).is_ok());
    }
}
