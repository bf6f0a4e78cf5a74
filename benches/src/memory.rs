//! The memory-planner benchmark: over one set of workflows and each GPU profile's budget,
//! how many jobs a naive whole-tensor executor would run out of memory on versus NOVA's plan;
//! and, on budgets small enough to run here, real runs of both under the accountant, and the
//! time cost of a budgeted (tiled) run against the unbudgeted (whole) one.

use crate::overhead::Discard;
use nova_dataflow::{
    plan, run, workflow, Bytes, Emitter, EventSink, ExecutionPlan, JobEnv, NodeRegistry,
    PlanOptions, ProfileId, RunError, RunOptions, ValidatedWorkflow,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A workflow of the suite: a name and its API-format text.
pub struct Case {
    pub name: String,
    pub text: String,
}

/// The chain of local image operators on a `w` x `h` image.
pub fn chain(w: usize, h: usize) -> Case {
    Case {
        name: format!("chain {w}x{h}"),
        text: format!(
            r#"{{
  "1": {{"class_type": "EmptyImage", "inputs": {{"width": {w}, "height": {h}, "batch_size": 1, "color": 3368652}}}},
  "2": {{"class_type": "ImageSharpen", "inputs": {{"image": ["1", 0], "sharpen_radius": 2, "sigma": 1.0, "alpha": 0.5}}}},
  "3": {{"class_type": "ImageScaleBy", "inputs": {{"image": ["2", 0], "upscale_method": "bicubic", "scale_by": 1.5}}}},
  "4": {{"class_type": "ImageBlur", "inputs": {{"image": ["3", 0], "blur_radius": 3, "sigma": 1.5}}}},
  "5": {{"class_type": "ImageInvert", "inputs": {{"image": ["4", 0]}}}},
  "6": {{"class_type": "BenchDiscard", "inputs": {{"images": ["5", 0]}}}}
}}"#
        ),
    }
}

/// Real-ESRGAN x4 (SRVGGNetCompact) on a `w` x `h` image.
pub fn upscale(w: usize, h: usize) -> Case {
    Case {
        name: format!("upscale x4 {w}x{h}"),
        text: format!(
            r#"{{
  "1": {{"class_type": "EmptyImage", "inputs": {{"width": {w}, "height": {h}, "batch_size": 1, "color": 3368652}}}},
  "2": {{"class_type": "UpscaleModelLoader", "inputs": {{"model_name": "realesr-animevideov3.safetensors"}}}},
  "3": {{"class_type": "ImageUpscaleWithModel", "inputs": {{"upscale_model": ["2", 0], "image": ["1", 0]}}}},
  "4": {{"class_type": "BenchDiscard", "inputs": {{"images": ["3", 0]}}}}
}}"#
        ),
    }
}

/// The shared models folder beside the repository.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models")
}

fn registry() -> NodeRegistry {
    let mut r = nova_operators::registry();
    r.register(Discard::new());
    r
}

fn env() -> JobEnv {
    JobEnv::new("bench-in", "bench-out", "bench-tmp").with_models_dir(models_dir())
}

/// A validated workflow of the suite.
pub fn load(case: &Case) -> ValidatedWorkflow {
    workflow::load(&case.text, &registry(), &env()).expect("suite workflow is valid")
}

/// Plan options under `limit` as a profile sets them; `tiled: false` is the naive executor
/// (every node whole, weights resident).
pub fn options(
    profile: ProfileId,
    limit: Option<Bytes>,
    tiled: bool,
    workers: usize,
) -> PlanOptions {
    let p = profile.spec();
    PlanOptions {
        tile: tiled.then_some(p.tile),
        min_tile: p.min_tile,
        limit,
        safety_margin: 0.05,
        workers,
        prefetch: p.prefetch_depth,
        ..PlanOptions::default()
    }
}

/// Plans `wf`.
pub fn plan_of(wf: &ValidatedWorkflow, opts: &PlanOptions) -> ExecutionPlan {
    plan(wf, &env(), opts).expect("suite workflow plans")
}

/// Runs a planned workflow under its plan's limit; returns the outcome and wall seconds.
pub fn run_plan(wf: &ValidatedWorkflow, plan: ExecutionPlan) -> (Result<u64, RunError>, f64) {
    let sink: EventSink = Arc::new(|_| {});
    let started = Instant::now();
    let r = run(
        Arc::new(wf.clone()),
        Arc::new(plan),
        env(),
        RunOptions::default(),
        Arc::new(Emitter::new("bench", sink)),
    );
    (
        r.map(|rep| rep.tracked_peak_bytes),
        started.elapsed().as_secs_f64(),
    )
}
