//! The long-lived runtime: timely workers started once per process, on which each job is
//! installed as a new dataflow and dropped when it ends.
//!
//! A runtime of `n` compute workers runs `n + 1` timely worker threads. Worker 0 is the
//! *control worker*: it hosts every job's driver (which turns the job's probes and notes into
//! events) and gathers the notes, but runs no node code, so a long kernel never delays an
//! announcement. Workers `1..=n` run the operators (a node's owner, its chunks spread by
//! index).
//!
//! Jobs are broadcast to every worker in one order (a per-worker queue filled under one lock,
//! the in-process equivalent of timely's `Sequencer`): every worker builds the same dataflows
//! in the same order, so their identities agree. Several jobs may be in flight at once; a
//! worker with no job and no dataflow blocks on its queue instead of spinning.
//!
//! A job's result comes back on a channel. Node code runs under `catch_unwind` (a failing
//! node fails its job alone); should a worker thread die anyway, the jobs in flight fail with
//! [`RuntimeGone`], and [`Runtime::global`] starts a fresh runtime for the next job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use timely::worker::Worker;
use timely::WorkerConfig;

/// A job as one worker sees it once installed: polled after every step until it is done.
pub(crate) trait Installed {
    /// Looks at the job's probes (on the control worker: drives its events); `true` once the
    /// job is finished on this worker.
    fn poll(&mut self) -> bool;
}

/// Builds one job's dataflow on a worker.
pub(crate) type Install = dyn Fn(&mut Worker) -> Box<dyn Installed> + Send + Sync;

/// The runtime's worker threads died; the job could not finish.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the engine's runtime stopped: {0}")]
pub struct RuntimeGone(pub String);

struct Inner {
    compute: usize,
    /// Each timely worker's job queue, by worker index.
    queues: Mutex<Vec<Sender<Arc<Install>>>>,
    guards: Mutex<Option<timely::communication::initialize::WorkerGuards<()>>>,
    /// Each worker's thread, to wake it when a job is installed.
    threads: Arc<Mutex<Vec<std::thread::Thread>>>,
    broken: AtomicBool,
}

/// A handle on a long-lived runtime; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runtime({} compute workers)", self.inner.compute)
    }
}

/// The longest a worker with jobs in flight sleeps between looks. Workers are woken by
/// timely when data or progress reaches them, when an operator's timer is due, and when a job
/// is installed, so this only bounds a missed wake-up; short parks would wake the workers
/// hundreds of times a second and, on a small machine, preempt the kernels' own threads.
const PARK: Duration = Duration::from_millis(50);

impl Runtime {
    /// Starts a runtime with `compute_workers` compute workers (at least one) and the control
    /// worker.
    pub fn new(compute_workers: usize) -> Result<Runtime, RuntimeGone> {
        let compute = compute_workers.max(1);
        let peers = compute + 1;
        let mut senders = Vec::with_capacity(peers);
        let mut receivers = Vec::with_capacity(peers);
        for _ in 0..peers {
            let (tx, rx) = mpsc::channel::<Arc<Install>>();
            senders.push(tx);
            receivers.push(Some(rx));
        }
        let receivers = Arc::new(Mutex::new(receivers));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let registry = threads.clone();
        let config = timely::Config {
            communication: timely::CommunicationConfig::Process(peers),
            worker: WorkerConfig::default(),
        };
        let guards = timely::execute(config, move |worker| {
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(std::thread::current());
            let rx = receivers.lock().unwrap_or_else(|p| p.into_inner())[worker.index()].take();
            if let Some(rx) = rx {
                serve(worker, rx);
            }
        })
        .map_err(RuntimeGone)?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                compute,
                queues: Mutex::new(senders),
                guards: Mutex::new(Some(guards)),
                threads,
                broken: AtomicBool::new(false),
            }),
        })
    }

    /// The process's runtime with `compute_workers` compute workers: started on first use and
    /// kept for the life of the process (a broken one is replaced).
    pub fn global(compute_workers: usize) -> Result<Runtime, RuntimeGone> {
        static RUNTIMES: OnceLock<Mutex<HashMap<usize, Runtime>>> = OnceLock::new();
        let compute = compute_workers.max(1);
        let mut all = RUNTIMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(r) = all.get(&compute).filter(|r| r.healthy()) {
            return Ok(r.clone());
        }
        let r = Runtime::new(compute)?;
        all.insert(compute, r.clone());
        Ok(r)
    }

    /// Compute workers (timely workers besides the control worker).
    pub fn compute_workers(&self) -> usize {
        self.inner.compute
    }

    /// Whether every worker thread is still running.
    pub fn healthy(&self) -> bool {
        if self.inner.broken.load(Ordering::SeqCst) {
            return false;
        }
        let guards = self.inner.guards.lock().unwrap_or_else(|p| p.into_inner());
        let alive = guards
            .as_ref()
            .is_some_and(|g| g.guards().iter().all(|h| !h.is_finished()));
        if !alive {
            self.inner.broken.store(true, Ordering::SeqCst);
        }
        alive
    }

    /// Installs a job on every worker, in the same order on all of them.
    pub(crate) fn install(&self, job: Arc<Install>) -> Result<(), RuntimeGone> {
        let queues = self.inner.queues.lock().unwrap_or_else(|p| p.into_inner());
        for q in queues.iter() {
            if q.send(job.clone()).is_err() {
                self.inner.broken.store(true, Ordering::SeqCst);
                return Err(RuntimeGone("a worker thread has exited".into()));
            }
        }
        // Workers busy with other jobs may be parked in timely's wait: wake them to install it.
        for t in self
            .inner
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.unpark();
        }
        Ok(())
    }

    /// Waits for a job's result, failing if the runtime dies meanwhile.
    pub(crate) fn wait<T>(&self, rx: &Receiver<T>) -> Result<T, RuntimeGone> {
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(v) => return Ok(v),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !self.healthy() {
                        return Err(RuntimeGone("a worker thread died".into()));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.inner.broken.store(true, Ordering::SeqCst);
                    return Err(RuntimeGone(
                        "the job's driver ended without a result".into(),
                    ));
                }
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queues lets idle workers return; then their threads are joined.
        self.queues
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(g) = self
            .guards
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = g.join();
        }
    }
}

/// One worker's loop: install jobs as they come, step, poll the jobs in flight; block on the
/// queue when there is nothing to do; return once the queue is closed and nothing is left.
fn serve(worker: &mut Worker, rx: Receiver<Arc<Install>>) {
    let mut jobs: Vec<Box<dyn Installed>> = Vec::new();
    let mut open = true;
    loop {
        while open {
            let idle = jobs.is_empty() && !worker.has_dataflows();
            let next = if idle {
                rx.recv().ok()
            } else {
                match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(install) => jobs.push(install(worker)),
                None => open = false,
            }
        }
        if !open && jobs.is_empty() && !worker.has_dataflows() {
            return;
        }
        worker.step_or_park(Some(PARK));
        jobs.retain_mut(|j| !j.poll());
    }
}

/// The worker a piece or node of index `key` runs on: one of the compute workers (never the
/// control worker, unless it is the only one).
pub(crate) fn compute_worker(key: u64, peers: usize) -> u64 {
    if peers > 1 {
        1 + key % (peers as u64 - 1)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count;
    impl Installed for Count {
        fn poll(&mut self) -> bool {
            true
        }
    }

    #[test]
    fn every_worker_installs_every_job_and_idle_workers_block() {
        let rt = Runtime::new(2).unwrap();
        let seen = Arc::new(Mutex::new(0usize));
        for _ in 0..3 {
            let s = seen.clone();
            let job: Arc<Install> = Arc::new(move |_w: &mut Worker| {
                *s.lock().unwrap() += 1;
                Box::new(Count) as Box<dyn Installed>
            });
            rt.install(job).unwrap();
        }
        let t = std::time::Instant::now();
        while *seen.lock().unwrap() < 9 {
            assert!(t.elapsed() < Duration::from_secs(10), "jobs not installed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(rt.healthy());
        assert_eq!(compute_worker(0, 3), 1);
        assert_eq!(compute_worker(5, 3), 2);
        assert_eq!(compute_worker(5, 1), 0);
    }
}
