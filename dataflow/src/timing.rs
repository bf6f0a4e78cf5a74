//! Where a node's time goes: the bottleneck inspector's figures.
//!
//! Every node of a run has a [`NodeTiming`]. The run measures the time its worker threads
//! spend inside the node's operator (building, cutting, processing and merging its chunks);
//! the residency registry adds, as it does the work, the time spent indexing and reading
//! weight files (`load`) and moving tensors to the device (`transfer`), and the run adds the
//! time spent replaying windows from the temporal cache (`replay`). Compute is what remains
//! of the operator's time once load and transfer are taken out.
//!
//! The same ledger records the node's lifecycle phases as they begin (`indexing` when a
//! weights file is opened, `prefetching` when tensors are read from it, `warming` when they
//! move to the device, `running` once they are there, `cached_replay` when a window comes
//! from the cache); the run's driver announces them on its next poll, so nothing here calls
//! back into the event stream.
//!
//! Times are summed over worker threads: with several workers processing a node's chunks at
//! once, a node's split can exceed its wall time.

use crate::event::Lifecycle;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time and phases of one node in one run.
#[derive(Debug, Default)]
pub struct NodeTiming {
    load_ns: AtomicU64,
    transfer_ns: AtomicU64,
    busy_ns: AtomicU64,
    replay_ns: AtomicU64,
    /// Phases entered and not yet announced, and the last phase entered.
    phases: Mutex<(Vec<Lifecycle>, Option<Lifecycle>)>,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl NodeTiming {
    /// Time spent opening, indexing or reading weights.
    pub fn add_load(&self, d: Duration) {
        self.load_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    /// Time spent moving tensors to the device.
    pub fn add_transfer(&self, d: Duration) {
        self.transfer_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    /// Time spent replaying results from a cache.
    pub fn add_replay(&self, d: Duration) {
        self.replay_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    /// Operator time measured by the caller.
    pub fn add_busy(&self, d: Duration) {
        self.busy_ns.fetch_add(ns(d), Ordering::Relaxed);
    }

    /// Back to `running` after a replay (nothing is recorded otherwise).
    pub fn leave_replay(&self) {
        let mut p = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        if p.1 == Some(Lifecycle::CachedReplay) {
            p.1 = Some(Lifecycle::Running);
            p.0.push(Lifecycle::Running);
        }
    }

    /// Runs `f` as operator time of the node (its load and transfer are counted inside).
    pub fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add_busy(start.elapsed());
        out
    }

    /// Records that the node entered `phase` (a repeat of the last phase is not recorded).
    pub fn enter(&self, phase: Lifecycle) {
        let mut p = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        if p.1 != Some(phase) {
            p.1 = Some(phase);
            p.0.push(phase);
        }
    }

    /// The phases entered since the last call, in order.
    pub fn take_phases(&self) -> Vec<Lifecycle> {
        std::mem::take(&mut self.phases.lock().unwrap_or_else(|e| e.into_inner()).0)
    }

    /// The node's time so far, split.
    pub fn split(&self) -> TimeSplit {
        let load = self.load_ns.load(Ordering::Relaxed);
        let transfer = self.transfer_ns.load(Ordering::Relaxed);
        let busy = self.busy_ns.load(Ordering::Relaxed);
        TimeSplit {
            load_ms: ms(load),
            transfer_ms: ms(transfer),
            compute_ms: ms(busy.saturating_sub(load + transfer)),
            replay_ms: ms(self.replay_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A node's time, split by what it was spent on (milliseconds, summed over workers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeSplit {
    /// Opening and indexing weight files and reading their tensors.
    pub load_ms: f64,
    /// Moving tensors to the device.
    pub transfer_ms: f64,
    /// The operator's own work.
    pub compute_ms: f64,
    /// Results replayed from a cache instead of computed.
    pub replay_ms: f64,
}

impl TimeSplit {
    /// The sum of two splits.
    pub fn plus(self, o: TimeSplit) -> TimeSplit {
        TimeSplit {
            load_ms: self.load_ms + o.load_ms,
            transfer_ms: self.transfer_ms + o.transfer_ms,
            compute_ms: self.compute_ms + o.compute_ms,
            replay_ms: self.replay_ms + o.replay_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_is_operator_time_less_load_and_transfer() {
        let t = NodeTiming::default();
        t.busy(|| {
            t.add_load(Duration::from_millis(3));
            t.add_transfer(Duration::from_millis(2));
            std::thread::sleep(Duration::from_millis(12));
        });
        let s = t.split();
        assert_eq!(s.load_ms, 3.0);
        assert_eq!(s.transfer_ms, 2.0);
        assert!(s.compute_ms >= 7.0, "{s:?}");
        assert_eq!(s.replay_ms, 0.0);
    }

    #[test]
    fn phases_are_taken_in_order_without_repeats() {
        let t = NodeTiming::default();
        t.enter(Lifecycle::Indexing);
        t.enter(Lifecycle::Indexing);
        t.enter(Lifecycle::Warming);
        assert_eq!(t.take_phases(), [Lifecycle::Indexing, Lifecycle::Warming]);
        t.enter(Lifecycle::Warming);
        assert!(t.take_phases().is_empty());
        t.enter(Lifecycle::Running);
        assert_eq!(t.take_phases(), [Lifecycle::Running]);
    }
}
