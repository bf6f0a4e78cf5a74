//! Helpers shared by NOVA's integration tests: test images, folders, and running a workflow
//! through the real engine while collecting its events.

use nova_dataflow::{
    plan, run, workflow, Bytes, CancelToken, Emitter, Event, EventKind, EventSink, JobEnv,
    Lifecycle, PlanOptions, RunError, RunOptions, RunReport,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The project's shared models folder (`../shared/models` beside the repository), laid out
/// as ComfyUI's `models/`. Tests that need it fail if it is missing: it is part of the
/// project's environment, not optional.
pub fn shared_models() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    assert!(
        p.join("upscale_models").is_dir(),
        "the shared models folder is missing at {}",
        p.display()
    );
    p
}

/// The "card" test image of `shared/models/README.md`: RGB in [0, 1], row-major, interleaved.
pub fn card(h: usize, w: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32, y as f32);
            let mut px = [
                fx / (w.max(2) - 1) as f32,
                fy / (h.max(2) - 1) as f32,
                0.5 + 0.5 * (2.0 * std::f32::consts::PI * (fx + 2.0 * fy) / 32.0).sin(),
            ];
            if (fx - 40.0).powi(2) + (fy - 24.0).powi(2) <= 144.0 {
                px = [0.95, 0.55, 0.10];
            }
            if (40..56).contains(&y) && (8..24).contains(&x) {
                px = [0.08, 0.12, 0.20];
            }
            v.extend_from_slice(&px);
        }
    }
    v
}

/// Writes the card image as an 8-bit PNG.
pub fn write_card_png(path: &Path, w: usize, h: usize) {
    let samples: Vec<u8> = card(h, w)
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    nova_media::encode_png(path, w, h, 3, &samples, &[]).expect("write test PNG");
}

/// A job's folders in a fresh temporary directory, with `card.png` (`w` x `h`) as input.
pub struct Job {
    pub dir: tempfile::TempDir,
    pub env: JobEnv,
}

impl Job {
    pub fn new(w: usize, h: usize) -> Job {
        let dir = tempfile::tempdir().expect("temp dir");
        let env = JobEnv::new(
            dir.path().join("input"),
            dir.path().join("output"),
            dir.path().join("temp"),
        );
        for d in [&env.input_dir, &env.output_dir, &env.temp_dir] {
            std::fs::create_dir_all(d).expect("create job folder");
        }
        write_card_png(&env.input_dir.join("card.png"), w, h);
        Job { dir, env }
    }

    /// Path of a file in the output folder.
    pub fn output(&self, name: &str) -> PathBuf {
        self.env.output_dir.join(name)
    }
}

/// Result of running a workflow: the report (or error) and every event, in order.
pub struct Outcome {
    pub result: Result<RunReport, RunError>,
    pub events: Vec<Event>,
    pub plan: nova_dataflow::ExecutionPlan,
}

/// Validates, plans (tiles of `tile` pixels, or whole if `None`) and runs a workflow.
pub fn run_workflow(json: &str, env: &JobEnv, tile: Option<usize>, workers: usize) -> Outcome {
    run_workflow_cancelling(json, env, tile, workers, |_| false)
}

/// Plan options for tiles of at most `tile` pixels (down to 16 where a tile must be cut
/// smaller) on `workers` workers, without a memory limit.
pub fn options(tile: Option<usize>, workers: usize) -> PlanOptions {
    PlanOptions {
        tile,
        min_tile: tile.unwrap_or(16).min(16),
        workers,
        ..PlanOptions::default()
    }
}

/// Like [`run_workflow`], and cancels the job as soon as `cancel_on` holds for an event.
pub fn run_workflow_cancelling(
    json: &str,
    env: &JobEnv,
    tile: Option<usize>,
    workers: usize,
    cancel_on: fn(&Event) -> bool,
) -> Outcome {
    run_planned(json, env, &options(tile, workers), None, cancel_on)
}

/// Validates, plans with `opts` and runs a workflow, reporting `budget` with its end.
pub fn run_planned(
    json: &str,
    env: &JobEnv,
    opts: &PlanOptions,
    budget: Option<Bytes>,
    cancel_on: fn(&Event) -> bool,
) -> Outcome {
    let registry = nova_operators::registry();
    let wf = workflow::load(json, &registry, env).expect("workflow validates");
    let plan = plan(&wf, env, opts).expect("workflow plans");
    run_plan(wf, plan, env, budget, cancel_on)
}

/// Plans `json` with `opts` (which should set no limit), then runs it under an accountant
/// limited to `limit`: a budget the forecast did not foresee, as when memory was taken after
/// planning.
pub fn run_with_limit(json: &str, env: &JobEnv, opts: &PlanOptions, limit: u64) -> Outcome {
    let registry = nova_operators::registry();
    let wf = workflow::load(json, &registry, env).expect("workflow validates");
    let mut plan = plan(&wf, env, opts).expect("workflow plans");
    plan.limit_bytes = Some(limit);
    run_plan(wf, plan, env, Some(Bytes(limit)), |_| false)
}

/// Runs a planned workflow, collecting its events.
pub fn run_plan(
    wf: nova_dataflow::ValidatedWorkflow,
    plan: nova_dataflow::ExecutionPlan,
    env: &JobEnv,
    budget: Option<Bytes>,
    cancel_on: fn(&Event) -> bool,
) -> Outcome {
    run_plan_keeping(wf, plan, env, budget, cancel_on, true)
}

/// Plans and runs `json` like [`run_planned`], keeping its events without their attachments
/// (a long video's partial windows, kept, would hold every frame of the clip).
pub fn run_planned_lean(
    json: &str,
    env: &JobEnv,
    opts: &PlanOptions,
    budget: Option<Bytes>,
) -> Outcome {
    let registry = nova_operators::registry();
    let wf = workflow::load(json, &registry, env).expect("workflow validates");
    let plan = plan(&wf, env, opts).expect("workflow plans");
    run_plan_keeping(wf, plan, env, budget, |_| false, false)
}

fn run_plan_keeping(
    wf: nova_dataflow::ValidatedWorkflow,
    plan: nova_dataflow::ExecutionPlan,
    env: &JobEnv,
    budget: Option<Bytes>,
    cancel_on: fn(&Event) -> bool,
    attachments: bool,
) -> Outcome {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = events.clone();
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let sink: EventSink = Arc::new(move |e| {
        if cancel_on(&e) {
            token.cancel();
        }
        let mut e = e;
        if !attachments {
            e.attachment = None;
        }
        sink_events.lock().unwrap().push(e)
    });
    let emitter = Arc::new(Emitter::new("test", sink));
    emitter.emit(EventKind::Lifecycle {
        state: Lifecycle::Planning,
        node: None,
    });
    let result = run(
        Arc::new(wf),
        Arc::new(plan.clone()),
        env.clone(),
        RunOptions {
            job_id: "test".into(),
            cancel,
            budget,
            runtime: None,
        },
        emitter,
    );
    let events = std::mem::take(&mut *events.lock().unwrap());
    Outcome {
        result,
        events,
        plan,
    }
}

/// Decodes a PNG into 8-bit samples, for exact comparisons.
pub fn png_samples(path: &Path) -> (usize, usize, Vec<u8>) {
    let d = nova_media::decode_image(path).expect("decode output");
    (
        d.width,
        d.height,
        d.rgb.iter().map(|v| (v * 255.0).round() as u8).collect(),
    )
}

/// The filenames an output node reported.
pub fn reported_files(report: &RunReport, node: &str) -> Vec<String> {
    report.outputs[node]["images"]
        .as_array()
        .expect("images list")
        .iter()
        .map(|i| i["filename"].as_str().expect("filename").to_string())
        .collect()
}

/// A workflow of every local image operator in a chain, saving with `prefix`.
pub fn chain_workflow(prefix: &str) -> String {
    format!(
        r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
  "2": {{"class_type": "ImageSharpen", "inputs": {{"image": ["1", 0], "sharpen_radius": 2, "sigma": 1.0, "alpha": 0.4}}}},
  "3": {{"class_type": "ImageScaleBy", "inputs": {{"image": ["2", 0], "upscale_method": "bicubic", "scale_by": 1.37}}}},
  "4": {{"class_type": "ImageBlur", "inputs": {{"image": ["3", 0], "blur_radius": 3, "sigma": 1.5}}}},
  "5": {{"class_type": "ImageScale", "inputs": {{"image": ["4", 0], "upscale_method": "lanczos", "width": 101, "height": 0, "crop": "disabled"}}}},
  "6": {{"class_type": "ImageInvert", "inputs": {{"image": ["5", 0]}}}},
  "7": {{"class_type": "SaveImage", "inputs": {{"images": ["6", 0], "filename_prefix": "{prefix}"}}}}
}}"#
    )
}
