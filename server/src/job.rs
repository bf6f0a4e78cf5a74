//! Preparing a job: a workflow, its settings and its folders in; a validated, planned job and
//! admission's verdict out. `nova run`, `nova plan` and `nova serve` all go through here, so
//! they plan alike.
//!
//! Memory settings resolve in one order everywhere: the caller's (command-line flags, or the
//! service's own settings), then the workflow's `extra_data.nova`, then the environment, then
//! detection. The service additionally caps the plan's limit at the budget still free
//! ([`JobSpec::free_limit`]) so that concurrent jobs share the device.

use nova_dataflow::plan::{admit, Refusal};
use nova_dataflow::profile::Detection;
use nova_dataflow::{
    plan, workflow, Bytes, ExecutionPlan, JobEnv, MemoryConfig, MemoryOverrides, NodePlan,
    NodeRegistry, PlanOptions, ProfileId, ValidatedWorkflow, ValidationErrors, WeightMode,
    MIN_TILE,
};
use serde_json::{json, Value as Json};

/// What a job is made of.
pub(crate) struct JobSpec<'a> {
    /// The workflow (API format, or a `/prompt` body holding one under `prompt`).
    pub prompt: Json,
    pub env: JobEnv,
    /// Settings that take precedence over the workflow's (flags, the service's).
    pub overrides: MemoryOverrides,
    /// The workflow's own `extra_data.nova` settings.
    pub workflow: MemoryOverrides,
    /// Settings from the environment.
    pub from_env: MemoryOverrides,
    pub detection: &'a Detection,
    pub registry: &'a NodeRegistry,
    /// Worker threads.
    pub workers: usize,
    /// The most the plan may fill, when less than the budget minus headroom is free.
    pub free_limit: Option<Bytes>,
    /// The most budget the job may have, whatever its settings say (the service's own).
    pub budget_cap: Option<Bytes>,
}

/// A validated, planned job and the settings it was planned under.
pub(crate) struct Prepared {
    pub wf: ValidatedWorkflow,
    pub plan: ExecutionPlan,
    pub config: MemoryConfig,
    pub env: JobEnv,
    /// Admission's verdict when the plan does not fit the whole budget.
    pub refusal: Option<Box<Refusal>>,
}

/// Why a job could not be prepared.
#[derive(Debug)]
pub(crate) enum PrepareError {
    /// The workflow is invalid: every fault, each naming its node and input.
    Invalid(ValidationErrors),
    /// The planner rejected the workflow (a shape it cannot place).
    Plan(String),
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrepareError::Invalid(e) => write!(f, "{e}"),
            PrepareError::Plan(m) => write!(f, "invalid workflow: {m}"),
        }
    }
}

/// Keys of `extra_data.nova` that `nova serve` reads itself.
pub(crate) const SERVICE_KEYS: [&str; 2] = ["priority", "webhook"];

/// Reads `extra_data.nova` of a `/prompt`-style body (absent: no settings).
pub(crate) fn workflow_overrides(extra_data: Option<&Json>) -> Result<MemoryOverrides, String> {
    match extra_data.and_then(|e| e.get("nova")) {
        Some(serde_json::Value::Object(m)) => {
            // The service's own keys (queue priority, completion webhook) are not memory
            // settings.
            let mut m = m.clone();
            for k in SERVICE_KEYS {
                m.remove(k);
            }
            MemoryOverrides::from_json(&serde_json::Value::Object(m))
        }
        Some(v) => MemoryOverrides::from_json(v),
        None => Ok(MemoryOverrides::default()),
    }
}

/// Validates and plans a job.
pub(crate) fn prepare(spec: JobSpec<'_>) -> Result<Prepared, PrepareError> {
    let overrides = spec.overrides.or(spec.workflow).or(spec.from_env);
    let mut config = MemoryConfig::resolve(&overrides, spec.detection);
    if let (Some(b), Some(cap)) = (config.budget, spec.budget_cap) {
        config.budget = Some(b.min(cap));
    }
    let wf =
        workflow::validate(spec.prompt, spec.registry, &spec.env).map_err(PrepareError::Invalid)?;
    let tile = (config.tile > 0).then_some(config.tile);
    let limit = match (config.usable(), spec.free_limit) {
        (Some(u), Some(f)) => Some(u.min(f)),
        (u, f) => u.or(f),
    };
    let opts = PlanOptions {
        tile,
        min_tile: config.profile.min_tile.min(config.tile.max(MIN_TILE)),
        limit,
        safety_margin: config.safety_margin,
        workers: spec.workers.max(1),
        prefetch: config.profile.prefetch_depth,
        bytes_per_element: config.profile.precision.bytes(),
        ..PlanOptions::default()
    };
    let plan = plan(&wf, &spec.env, &opts).map_err(|e| PrepareError::Plan(e.to_string()))?;
    let refusal = match config.budget {
        Some(budget) if !plan.fits && limit == config.usable() => {
            admit(&plan, budget, config.headroom, &bigger_profiles(&config)).err()
        }
        _ => None,
    };
    Ok(Prepared {
        wf,
        plan,
        config,
        env: spec.env,
        refusal,
    })
}

/// Profiles whose usable memory exceeds this configuration's, for refusal suggestions.
fn bigger_profiles(config: &MemoryConfig) -> Vec<(String, Bytes)> {
    ProfileId::ALL
        .iter()
        .map(|p| p.spec())
        .filter_map(|p| {
            p.device_memory
                .map(|m| (p.id.name().to_string(), m.saturating_sub(p.headroom)))
        })
        .filter(|(_, usable)| Some(*usable) > config.usable())
        .collect()
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
