//! Jobs as the command line and the service present them: preparing is the library's
//! ([`nova_dataflow::job`], shared with library users so everyone plans alike); here are the
//! plan's JSON (`nova plan --json`, `POST /api/plan`) and its one-line summaries.

use nova_dataflow::{Bytes, ExecutionPlan, MemoryConfig, NodePlan, WeightMode};
use serde_json::{json, Value as Json};

pub(crate) use nova_dataflow::job::{workflow_overrides, Job as Prepared, JobSpec, PrepareError};

/// Validates and plans a job (the library's [`nova_dataflow::Job::prepare`]).
pub(crate) fn prepare(spec: JobSpec<'_>) -> Result<Prepared, PrepareError> {
    Prepared::prepare(spec)
}

/// Device bytes of a node's weights in its plan.
pub(crate) fn weight_bytes(plan: &ExecutionPlan, n: &NodePlan) -> u64 {
    let users = (plan.workers as u64).min(n.chunk_count() as u64);
    n.weights.device_bytes(users)
}

/// A node's weights for the plan table: bytes on the device and how they are held.
pub(crate) fn weight_label(plan: &ExecutionPlan, n: &NodePlan) -> String {
    match n.weights.mode {
        None => "0 B".into(),
        Some(WeightMode::Resident) => format!("{} resident", Bytes(weight_bytes(plan, n))),
        Some(WeightMode::Streamed { .. }) => {
            format!("{} streamed", Bytes(weight_bytes(plan, n)))
        }
    }
}

/// The plan as JSON: what `nova plan --json` prints and `POST /api/plan` answers.
pub(crate) fn plan_json(p: &Prepared) -> Json {
    let c = &p.config;
    json!({
        "profile": c.profile.id.name(),
        "profile_reason": c.reason,
        "budget_bytes": c.budget.map(|b| b.0),
        "headroom_bytes": c.headroom.0,
        "limit_bytes": p.plan.limit_bytes,
        "safety_margin": c.safety_margin,
        "forecast_peak_bytes": p.plan.forecast_peak_bytes,
        "naive_peak_bytes": p.plan.naive_peak_bytes,
        "fits": p.plan.fits,
        "admission": c.admission,
        "refusal": p.refusal,
        "workers": p.plan.workers,
        "nodes": p.plan.nodes.iter().map(|n| json!({
            "node": n.node,
            "class_type": n.class_type,
            "mode": n.mode,
            "tile": n.tile,
            "chunks": n.chunk_count(),
            "inflight": n.inflight,
            "outputs": n.outputs,
            "weights": n.weights,
            "weights_bytes": weight_bytes(&p.plan, n),
            "activations_bytes": n.forecast.working_bytes.saturating_sub(weight_bytes(&p.plan, n)),
            "live_bytes": n.forecast.live_bytes,
            "forecast_bytes": n.forecast.peak_bytes,
            "fits": n.forecast.fits,
            "estimated_ms": Json::Null,
        })).collect::<Vec<_>>(),
    })
}

/// One line on the memory settings, for the log.
pub(crate) fn memory_line(c: &MemoryConfig) -> String {
    match c.budget {
        Some(b) => format!(
            "profile {} ({}); budget {b} ({}), {} headroom",
            c.profile.id,
            c.reason,
            c.budget_source.describe(),
            c.headroom
        ),
        None => format!(
            "profile {} ({}); memory could not be read: admitting without a limit",
            c.profile.id, c.reason
        ),
    }
}
