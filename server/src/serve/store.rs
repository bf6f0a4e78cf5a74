//! The durable queue and history: one redb database (`queue.redb` in the data folder).
//!
//! Tables: `jobs` (prompt id → the job's JSON record), `queue` ((priority rank, number) →
//! prompt id: priority first, FIFO within a priority), `running` (prompt id → start time),
//! `history` (completion sequence → prompt id), `models` (file path → model index entry) and
//! `meta` (counters).
//!
//! Invariants:
//! - A job is acknowledged to its client only after the transaction that queued it committed
//!   (redb commits are durable: fsync'd), so `kill -9` after `/prompt` answered loses nothing.
//! - A job is in exactly one of `queue`, `running` or `history` (or cancelled: in none, its
//!   record kept); moves between them are single transactions.
//! - Writes go through one writer thread that commits whatever is waiting in one transaction
//!   (group commit): under many concurrent submissions the fsync cost is shared instead of
//!   serialised, which keeps `/prompt` acceptance latency flat.
//!
//! At open, jobs found in `running` (the service stopped without finishing them) are handled by
//! the [`RestartPolicy`].

use super::config::RestartPolicy;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const QUEUE: TableDefinition<(u8, i64), &str> = TableDefinition::new("queue");
const RUNNING: TableDefinition<&str, u64> = TableDefinition::new("running");
const HISTORY: TableDefinition<u64, &str> = TableDefinition::new("history");
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

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
    /// ComfyUI's `number`: submission order (negative for `front: true`).
    pub number: i64,
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
}

/// A queue database failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("queue database {path}: {reason}")]
pub struct StoreError {
    pub path: String,
    pub reason: String,
}

type Answer = Result<Box<dyn Any + Send>, StoreError>;
type Reply = tokio::sync::oneshot::Sender<Answer>;
type WriteFn = Box<dyn FnOnce(&WriteTransaction) -> Result<Box<dyn Any + Send>, String> + Send>;

/// The queue database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    writer: mpsc::Sender<(WriteFn, Reply)>,
    next_number: Arc<AtomicI64>,
    front_number: Arc<AtomicI64>,
}

/// What opening the database did to jobs left running by the last process.
#[derive(Debug, Default)]
pub struct Recovery {
    pub requeued: Vec<String>,
    pub failed: Vec<String>,
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

impl Store {
    /// Opens (creating if needed) the database at `path` and applies the restart policy to
    /// jobs the last process left running.
    pub fn open(
        path: &Path,
        policy: RestartPolicy,
        max_attempts: u32,
    ) -> Result<(Store, Recovery), StoreError> {
        let err = |reason: String| StoreError {
            path: path.display().to_string(),
            reason,
        };
        let db = Database::create(path).map_err(|e| err(s(e)))?;
        let db = Arc::new(db);
        let mut recovery = Recovery::default();
        let (max_number, min_number) = {
            let txn = db.begin_write().map_err(|e| err(s(e)))?;
            let r = (|| -> Result<(i64, i64), String> {
                let mut jobs = txn.open_table(JOBS).map_err(s)?;
                let mut queue = txn.open_table(QUEUE).map_err(s)?;
                let mut running = txn.open_table(RUNNING).map_err(s)?;
                let mut history = txn.open_table(HISTORY).map_err(s)?;
                txn.open_table(MODELS).map_err(s)?;
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
                    let mut rec = decode(&bytes)?;
                    if policy == RestartPolicy::Requeue && rec.attempts < max_attempts {
                        rec.state = JobState::Queued;
                        rec.messages.push((
                            "nova_requeued".into(),
                            serde_json::json!({"prompt_id": rec.id, "attempts": rec.attempts, "timestamp": now_ms()}),
                        ));
                        queue
                            .insert((rec.priority.rank(), rec.number), id.as_str())
                            .map_err(s)?;
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
                        let seq = meta
                            .get("next_history")
                            .map_err(s)?
                            .map(|v| v.value())
                            .unwrap_or(0);
                        meta.insert("next_history", seq + 1).map_err(s)?;
                        history.insert(seq, id.as_str()).map_err(s)?;
                        recovery.failed.push(id.clone());
                    }
                    jobs.insert(id.as_str(), encode(&rec)?.as_slice())
                        .map_err(s)?;
                }
                let max = meta
                    .get("max_number")
                    .map_err(s)?
                    .map(|v| v.value() as i64)
                    .unwrap_or(0);
                let min = meta
                    .get("min_number")
                    .map_err(s)?
                    .map(|v| v.value() as i64)
                    .unwrap_or(0);
                Ok((max, -min))
            })();
            let r = r.map_err(err)?;
            txn.commit().map_err(|e| err(s(e)))?;
            r
        };
        let (tx, rx) = mpsc::channel::<(WriteFn, Reply)>();
        let writer_db = db.clone();
        let writer_path = path.display().to_string();
        std::thread::Builder::new()
            .name("nova-queue-db".into())
            .spawn(move || writer(writer_db, writer_path, rx))
            .map_err(|e| err(s(e)))?;
        Ok((
            Store {
                db,
                path: path.to_path_buf(),
                writer: tx,
                next_number: Arc::new(AtomicI64::new(max_number + 1)),
                front_number: Arc::new(AtomicI64::new(min_number.min(0) - 1)),
            },
            recovery,
        ))
    }

    fn err(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// A number for a new job: increasing, or decreasing below every other for `front`.
    pub fn next_number(&self, front: bool) -> i64 {
        if front {
            self.front_number.fetch_sub(1, Ordering::SeqCst)
        } else {
            self.next_number.fetch_add(1, Ordering::SeqCst)
        }
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

    /// Queues a new job durably.
    pub async fn enqueue(&self, rec: JobRecord) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            let mut queue = txn.open_table(QUEUE).map_err(s)?;
            let mut meta = txn.open_table(META).map_err(s)?;
            jobs.insert(rec.id.as_str(), encode(&rec)?.as_slice())
                .map_err(s)?;
            queue
                .insert((rec.priority.rank(), rec.number), rec.id.as_str())
                .map_err(s)?;
            if rec.number >= 0 {
                let max = meta
                    .get("max_number")
                    .map_err(s)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                meta.insert("max_number", max.max(rec.number as u64))
                    .map_err(s)?;
            } else {
                let min = meta
                    .get("min_number")
                    .map_err(s)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                meta.insert("min_number", min.max(rec.number.unsigned_abs()))
                    .map_err(s)?;
            }
            Ok(())
        })
        .await
    }

    /// Moves a queued job to running (one more attempt). `None` if it is no longer queued.
    pub async fn start(
        &self,
        id: String,
        forecast_peak_bytes: Option<u64>,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(s)?;
            let mut queue = txn.open_table(QUEUE).map_err(s)?;
            let mut running = txn.open_table(RUNNING).map_err(s)?;
            let Some(bytes) = jobs
                .get(id.as_str())
                .map_err(s)?
                .map(|v| v.value().to_vec())
            else {
                return Ok(None);
            };
            let mut rec = decode(&bytes)?;
            if rec.state != JobState::Queued
                || queue
                    .remove((rec.priority.rank(), rec.number))
                    .map_err(s)?
                    .is_none()
            {
                return Ok(None);
            }
            rec.state = JobState::Running;
            rec.attempts += 1;
            rec.started_ms = Some(now_ms());
            rec.forecast_peak_bytes = forecast_peak_bytes;
            running.insert(id.as_str(), now_ms()).map_err(s)?;
            jobs.insert(id.as_str(), encode(&rec)?.as_slice())
                .map_err(s)?;
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
            let queued: Vec<((u8, i64), String)> = queue
                .iter()
                .map_err(s)?
                .filter_map(|r| r.ok().map(|(k, v)| (k.value(), v.value().to_string())))
                .collect();
            let mut done = vec![];
            for (key, id) in queued {
                if ids.as_ref().is_some_and(|want| !want.contains(&id)) {
                    continue;
                }
                queue.remove(key).map_err(s)?;
                let bytes = jobs
                    .get(id.as_str())
                    .map_err(s)?
                    .map(|v| v.value().to_vec());
                if let Some(bytes) = bytes {
                    let mut rec = decode(&bytes)?;
                    rec.state = JobState::Cancelled;
                    rec.finished_ms = Some(now_ms());
                    jobs.insert(id.as_str(), encode(&rec)?.as_slice())
                        .map_err(s)?;
                }
                done.push(id);
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

    fn read<R>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R, String>,
    ) -> Result<R, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
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
                let (_, id) = r.map_err(s)?;
                if let Some(b) = jobs.get(id.value()).map_err(s)? {
                    out.push(decode(b.value())?);
                }
            }
            Ok(out)
        })
    }

    /// The queued job that runs next.
    pub fn next_queued(&self) -> Result<Option<JobRecord>, StoreError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(s)?;
            let queue = txn.open_table(QUEUE).map_err(s)?;
            for r in queue.iter().map_err(s)? {
                let (_, id) = r.map_err(s)?;
                if let Some(b) = jobs.get(id.value()).map_err(s)? {
                    return Ok(Some(decode(b.value())?));
                }
            }
            Ok(None)
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

fn finish_in(txn: &WriteTransaction, rec: &mut JobRecord) -> Result<(), String> {
    let mut jobs = txn.open_table(JOBS).map_err(s)?;
    let mut queue = txn.open_table(QUEUE).map_err(s)?;
    let mut running = txn.open_table(RUNNING).map_err(s)?;
    let mut history = txn.open_table(HISTORY).map_err(s)?;
    let mut meta = txn.open_table(META).map_err(s)?;
    running.remove(rec.id.as_str()).map_err(s)?;
    queue.remove((rec.priority.rank(), rec.number)).map_err(s)?;
    if rec.finished_ms.is_none() {
        rec.finished_ms = Some(now_ms());
    }
    let seq = meta
        .get("next_history")
        .map_err(s)?
        .map(|v| v.value())
        .unwrap_or(0);
    meta.insert("next_history", seq + 1).map_err(s)?;
    history.insert(seq, rec.id.as_str()).map_err(s)?;
    jobs.insert(rec.id.as_str(), encode(rec)?.as_slice())
        .map_err(s)?;
    Ok(())
}

/// The writer thread: commits whatever is waiting in one transaction, then answers each.
fn writer(db: Arc<Database>, path: String, rx: mpsc::Receiver<(WriteFn, Reply)>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let fail = |reason: String| StoreError {
            path: path.clone(),
            reason,
        };
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(fail(s(&e))));
                }
                continue;
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        for (f, reply) in batch {
            results.push((reply, f(&txn)));
        }
        match txn.commit() {
            Ok(()) => {
                for (reply, r) in results {
                    let _ = reply.send(r.map_err(fail));
                }
            }
            Err(e) => {
                for (reply, _) in results {
                    let _ = reply.send(Err(fail(s(&e))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, number: i64, priority: Priority) -> JobRecord {
        JobRecord {
            id: id.into(),
            number,
            priority,
            prompt: serde_json::json!({}),
            client_id: None,
            extra_data: serde_json::json!({}),
            outputs_to_execute: vec![],
            state: JobState::Queued,
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

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn queue_orders_by_priority_then_submission() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            Store::open(&dir.path().join("q.redb"), RestartPolicy::Requeue, 2).unwrap();
        rt().block_on(async {
            store.enqueue(rec("a", 1, Priority::Low)).await.unwrap();
            store.enqueue(rec("b", 2, Priority::Normal)).await.unwrap();
            store.enqueue(rec("c", 3, Priority::Urgent)).await.unwrap();
            store.enqueue(rec("d", 4, Priority::Normal)).await.unwrap();
        });
        let order: Vec<String> = store.pending().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(order, ["c", "b", "d", "a"]);
        assert_eq!(store.next_queued().unwrap().unwrap().id, "c");
    }

    #[test]
    fn reopening_requeues_running_jobs_until_attempts_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        {
            let (store, _) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
            rt().block_on(async {
                store.enqueue(rec("a", 1, Priority::Normal)).await.unwrap();
                store.enqueue(rec("b", 2, Priority::Normal)).await.unwrap();
                assert!(store.start("a".into(), None).await.unwrap().is_some());
            });
        }
        // The writer thread of the first handle still holds the file; a second process
        // would see it closed. Wait for the handle to drop.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (store, rec1) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
        assert_eq!(rec1.requeued, ["a"]);
        let order: Vec<String> = store.pending().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(order, ["a", "b"]);
        assert_eq!(store.next_number(false), 3);
        rt().block_on(async {
            assert_eq!(
                store
                    .start("a".into(), None)
                    .await
                    .unwrap()
                    .unwrap()
                    .attempts,
                2
            );
        });
        drop(store);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (store, rec2) = Store::open(&path, RestartPolicy::Requeue, 2).unwrap();
        assert_eq!(rec2.failed, ["a"]);
        let h = store.history(None, 0).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].state, JobState::Error);
        assert!(h[0].error.as_deref().unwrap().contains("started 2 time(s)"));
    }
}
