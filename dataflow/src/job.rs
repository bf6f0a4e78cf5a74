//! A job from workflow to result: validated, planned against its memory budget, admitted or
//! refused with numbers, and run on the process's long-lived runtime. `nova run`, `nova plan`,
//! `nova serve` and library users all go through [`Job::prepare`], so they plan alike.
//!
//! Memory settings resolve in one order everywhere: the caller's (command-line flags, or the
//! service's own settings), then the workflow's `extra_data.nova`, then the environment, then
//! detection. A service additionally caps the plan's limit at the budget still free
//! ([`JobSpec::free_limit`]) so that concurrent jobs share the device.
//!
//! ```no_run
//! use nova_dataflow::{job::{Job, JobSpec}, Pipeline, JobEnv, NodeRegistry};
//! # fn registry() -> NodeRegistry { NodeRegistry::new() }
//! let mut p = Pipeline::new();
//! let img = p.add("LoadImage").with("image", "card.png").done();
//! p.add("SaveImage").link("images", &img.out(0)).with("filename_prefix", "out").done();
//! let registry = registry(); // e.g. nova_operators::registry()
//! let job = Job::prepare(JobSpec::new(p.to_api(), JobEnv::new("in", "out", "tmp"), &registry))
//!     .expect("valid and planned");
//! let report = job.run(Default::default(), |event| println!("{}", event.to_json_line()))
//!     .expect("runs");
//! println!("tracked peak {} bytes", report.tracked_peak_bytes);
//! ```

use crate::control::admission::{admit, Refusal};
use crate::control::plan::{ExecutionPlan, PlanOptions, MIN_TILE};
use crate::control::planner::plan;
use crate::control::profile::{Detection, MemoryConfig, MemoryOverrides, ProfileId};
use crate::control::workflow::{self, ValidatedWorkflow};
use crate::exec::{run, RunError, RunOptions, RunReport};
use crate::node::error::ValidationErrors;
use crate::node::memory::Bytes;
use crate::node::{JobEnv, NodeRegistry};
use crate::telemetry::event::Event;
use crate::telemetry::event::{Emitter, EventKind, Lifecycle};
use serde_json::Value as Json;
use std::sync::Arc;

/// What a job is made of.
pub struct JobSpec<'a> {
    /// The workflow (ComfyUI's API format, or a `/prompt` body holding one under `prompt`).
    pub prompt: Json,
    pub env: JobEnv,
    /// Settings that take precedence over the workflow's (flags, the service's).
    pub overrides: MemoryOverrides,
    /// The workflow's own `extra_data.nova` settings.
    pub workflow: MemoryOverrides,
    /// Settings from the environment.
    pub from_env: MemoryOverrides,
    /// The device, as detected (see [`crate::control::profile::detect`]).
    pub detection: std::borrow::Cow<'a, Detection>,
    pub registry: &'a NodeRegistry,
    /// Compute workers.
    pub workers: usize,
    /// The most the plan may fill, when less than the budget minus headroom is free.
    pub free_limit: Option<Bytes>,
    /// The most budget the job may have, whatever its settings say (a service's own).
    pub budget_cap: Option<Bytes>,
}

impl<'a> JobSpec<'a> {
    /// A job of `prompt` with every setting from detection and the defaults: the detected
    /// device's profile and budget, a worker per core.
    pub fn new(prompt: Json, env: JobEnv, registry: &'a NodeRegistry) -> JobSpec<'a> {
        JobSpec {
            prompt,
            env,
            overrides: MemoryOverrides::default(),
            workflow: MemoryOverrides::default(),
            from_env: MemoryOverrides::default(),
            detection: std::borrow::Cow::Owned(crate::control::profile::detect()),
            registry,
            workers: crate::exec::default_workers(),
            free_limit: None,
            budget_cap: None,
        }
    }

    /// The same job under settings that take precedence over the workflow's (a profile, a
    /// budget, a tile size).
    pub fn with_overrides(mut self, overrides: MemoryOverrides) -> JobSpec<'a> {
        self.overrides = overrides;
        self
    }

    /// The same job on `workers` compute workers.
    pub fn with_workers(mut self, workers: usize) -> JobSpec<'a> {
        self.workers = workers.max(1);
        self
    }
}

/// A validated, planned job and the settings it was planned under.
pub struct Job {
    pub wf: ValidatedWorkflow,
    pub plan: ExecutionPlan,
    pub config: MemoryConfig,
    pub env: JobEnv,
    /// Admission's verdict when the plan does not fit the whole budget.
    pub refusal: Option<Box<Refusal>>,
}

/// Why a job could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The workflow is invalid: every fault, each naming its node and input.
    #[error("{0}")]
    Invalid(ValidationErrors),
    /// The planner rejected the workflow (a shape it cannot place).
    #[error("invalid workflow: {0}")]
    Plan(String),
}

/// Keys of `extra_data.nova` that a service reads itself, not memory settings.
pub const SERVICE_KEYS: [&str; 2] = ["priority", "webhook"];

/// Reads `extra_data.nova` of a `/prompt`-style body (absent: no settings).
pub fn workflow_overrides(extra_data: Option<&Json>) -> Result<MemoryOverrides, String> {
    match extra_data.and_then(|e| e.get("nova")) {
        Some(Json::Object(m)) => {
            let mut m = m.clone();
            for k in SERVICE_KEYS {
                m.remove(k);
            }
            MemoryOverrides::from_json(&Json::Object(m))
        }
        Some(v) => MemoryOverrides::from_json(v),
        None => Ok(MemoryOverrides::default()),
    }
}

impl Job {
    /// Validates and plans a job.
    pub fn prepare(spec: JobSpec<'_>) -> Result<Job, PrepareError> {
        let overrides = spec.overrides.or(spec.workflow).or(spec.from_env);
        let mut config = MemoryConfig::resolve(&overrides, &spec.detection);
        if let (Some(b), Some(cap)) = (config.budget, spec.budget_cap) {
            config.budget = Some(b.min(cap));
        }
        let wf = workflow::validate(spec.prompt, spec.registry, &spec.env)
            .map_err(PrepareError::Invalid)?;
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
        Ok(Job {
            wf,
            plan,
            config,
            env: spec.env,
            refusal,
        })
    }

    /// Runs the job (refused up front if admission refused it), sending every event to
    /// `events` as it happens, on the process's runtime unless `opts` names another.
    pub fn run(
        self,
        opts: RunOptions,
        events: impl Fn(Event) + Send + Sync + 'static,
    ) -> Result<RunReport, RunError> {
        let emitter = Arc::new(Emitter::new(opts.job_id.clone(), Arc::new(events)));
        emitter.emit(EventKind::Lifecycle {
            state: Lifecycle::Planning,
            node: None,
        });
        if let Some(r) = &self.refusal {
            emitter.emit(EventKind::Error {
                node_id: Some(r.node.clone()),
                node_type: Some(r.class_type.clone()),
                message: r.message.clone(),
                memory: None,
            });
            return Err(RunError::Runtime(format!("refused: {}", r.message)));
        }
        let opts = RunOptions {
            budget: opts.budget.or(self.config.budget),
            ..opts
        };
        run(
            Arc::new(self.wf),
            Arc::new(self.plan),
            self.env,
            opts,
            emitter,
        )
    }
}

/// Profiles whose usable memory exceeds this configuration's, for refusal suggestions.
pub fn bigger_profiles(config: &MemoryConfig) -> Vec<(String, Bytes)> {
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
