//! The two executors the KPI harness compares (`--executor nova|naive`), on the same kernels.
//!
//! - **nova**: the planner fits the run to the budget (tiles, stream windows, streamed
//!   weights), the residency registry keeps weights between jobs, step previews on (`auto`).
//! - **naive**: the baseline — every node whole (no tiles; one window per video, one chunk
//!   per audio stream: [`PlanOptions::naive`]), weights resident, and no residency
//!   management: every model asset is released before each job, so each job reads its
//!   weights from the file again; no previews. It runs under the same accountant and budget,
//!   so where whole tensors do not fit it fails with the same out-of-memory error a GPU would
//!   give. Used only for these comparisons and for A/B checks.

use nova_dataflow::{Bytes, PlanOptions, PreviewMethod, ProfileId, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executor {
    Nova,
    Naive,
}

impl Executor {
    pub fn name(self) -> &'static str {
        match self {
            Executor::Nova => "nova",
            Executor::Naive => "naive",
        }
    }

    /// `nova` or `naive`.
    pub fn parse(s: &str) -> Result<Executor, String> {
        match s {
            "nova" => Ok(Executor::Nova),
            "naive" => Ok(Executor::Naive),
            _ => Err(format!("--executor: '{s}' is not one of nova, naive")),
        }
    }

    /// Plan options under `limit` as `profile` sets them.
    pub fn options(self, profile: ProfileId, limit: Option<Bytes>, workers: usize) -> PlanOptions {
        let p = profile.spec();
        PlanOptions {
            tile: Some(p.tile),
            min_tile: p.min_tile,
            limit,
            safety_margin: 0.05,
            workers: workers.max(1),
            prefetch: p.prefetch_depth,
            naive: self == Executor::Naive,
            ..PlanOptions::default()
        }
    }

    /// Step previews: NOVA's `auto`; none for the baseline.
    pub fn preview(self) -> PreviewMethod {
        match self {
            Executor::Nova => PreviewMethod::Auto,
            Executor::Naive => PreviewMethod::None,
        }
    }

    /// Before a job: the baseline drops every cached model (no residency management).
    pub fn prepare(self) {
        if self == Executor::Naive {
            Registry::global().release_unpinned();
        }
    }
}
