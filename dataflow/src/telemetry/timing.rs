//! Where a node's time goes: the bottleneck inspector's figures.
//!
//! Operators measure the time they spend inside a node's code (cutting, processing, merging
//! its chunks) and send it as telemetry records; the residency registry adds to the node's
//! work log, as it does the work, the time spent indexing and reading weight files (`load`)
//! and moving tensors to the device (`transfer`), which the operators drain into records too;
//! replaying a window from the temporal cache counts as `replay`. The driver sums the records
//! of each node in a [`NodeClock`]: compute is what remains of the operator's time once load
//! and transfer are taken out.
//!
//! Times are summed over worker threads: with several workers processing a node's chunks at
//! once, a node's split can exceed its wall time.

use serde::Serialize;

/// The sums of one node's time records, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeClock {
    pub busy_ns: u64,
    pub load_ns: u64,
    pub transfer_ns: u64,
    pub replay_ns: u64,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl NodeClock {
    /// The node's time so far, split.
    pub fn split(&self) -> TimeSplit {
        TimeSplit {
            load_ms: ms(self.load_ns),
            transfer_ms: ms(self.transfer_ns),
            compute_ms: ms(self.busy_ns.saturating_sub(self.load_ns + self.transfer_ns)),
            replay_ms: ms(self.replay_ns),
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
        let c = NodeClock {
            busy_ns: 12_000_000,
            load_ns: 3_000_000,
            transfer_ns: 2_000_000,
            replay_ns: 0,
        };
        let s = c.split();
        assert_eq!(s.load_ms, 3.0);
        assert_eq!(s.transfer_ms, 2.0);
        assert_eq!(s.compute_ms, 7.0);
        assert_eq!(s.replay_ms, 0.0);
    }
}
