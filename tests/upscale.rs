//! A real model through the memory planner: Real-ESRGAN's `realesr-animevideov3`
//! (SRVGGNetCompact x4) matches its reference outputs, runs tiled with the same pixels as
//! whole, and streams its weights block by block when they exceed the budget, with the same
//! output as fully resident and its tracked peak inside the budget.

use candle_core::DType;
use candle_core::{Device, Tensor};
use nova_dataflow::{AssetState, Bytes, EventKind, PlanOptions, WeightMode};
use nova_operators::model::safetensors::SafetensorsFile;
use nova_operators::model::upscale::{load_model, upscale_raw};
use nova_tests::{options, run_planned, shared_models, Job};
use std::sync::Mutex;

/// Runs share the process's residency registry; these tests take turns so each sees the
/// state changes its own run causes.
static REGISTRY: Mutex<()> = Mutex::new(());

fn reference(name: &str) -> (Tensor, Tensor) {
    let f = SafetensorsFile::open(&shared_models().join(format!(
        "upscale_models/reference/realesr-animevideov3_{name}.safetensors"
    )))
    .unwrap();
    use nova_dataflow::WeightSource;
    let nhwc = |t: Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    (
        nhwc(f.read("input").unwrap()),
        nhwc(f.read("output").unwrap()),
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn the_network_matches_its_reference_outputs() {
    let _turn = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let model =
        load_model(&shared_models().join("upscale_models/realesr-animevideov3.safetensors"))
            .unwrap();
    assert_eq!(model.info.scale, 4);
    assert_eq!(model.info.halo, 18);
    for name in ["32x32", "24x40"] {
        let (input, expected) = reference(name);
        let got = upscale_raw(&model, &input).unwrap();
        assert_eq!(got.dims(), expected.dims(), "{name}");
        let d = max_abs_diff(&got, &expected);
        assert!(d < 1e-4, "{name}: max |diff| {d}");
    }
}

/// Load, upscale with the model, save.
fn workflow(prefix: &str) -> String {
    format!(
        r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
  "2": {{"class_type": "UpscaleModelLoader", "inputs": {{"model_name": "realesr-animevideov3.safetensors"}}}},
  "3": {{"class_type": "ImageUpscaleWithModel", "inputs": {{"upscale_model": ["2", 0], "image": ["1", 0]}}}},
  "4": {{"class_type": "SaveImage", "inputs": {{"images": ["3", 0], "filename_prefix": "{prefix}"}}}}
}}"#
    )
}

/// Runs the workflow planned for `limit` with tiles from `tiles.0` down to `tiles.1` on
/// `workers` workers, one chunk cut ahead.
fn run_budgeted(
    job: &Job,
    prefix: &str,
    limit: u64,
    tiles: (usize, usize),
    workers: usize,
) -> nova_tests::Outcome {
    let opts = PlanOptions {
        tile: Some(tiles.0),
        min_tile: tiles.1,
        limit: Some(Bytes(limit)),
        workers,
        prefetch: 1,
        ..PlanOptions::default()
    };
    run_planned(
        &workflow(prefix),
        &job.env,
        &opts,
        Some(Bytes(limit)),
        |_| false,
    )
}

fn job(w: usize, h: usize) -> Job {
    let mut job = Job::new(w, h);
    job.env = job.env.clone().with_models_dir(shared_models());
    job
}

/// The saved image, as f32 in [0, 1].
fn output(job: &Job, out: &nova_tests::Outcome) -> Tensor {
    let report = out.result.as_ref().expect("run succeeds");
    let file = &nova_tests::reported_files(report, "4")[0];
    let d = nova_media::decode_image(&job.output(file)).unwrap();
    Tensor::from_vec(d.rgb, (d.height, d.width, 3), &Device::Cpu).unwrap()
}

#[test]
fn a_tiled_run_under_a_budget_equals_the_whole_run() {
    let _turn = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let job = job(96, 72);
    let whole = run_planned(
        &workflow("whole"),
        &job.env,
        &options(None, 2),
        None,
        |_| false,
    );
    assert_eq!(whole.plan.nodes[2].mode, nova_dataflow::ExecMode::Atomic);
    let reference = output(&job, &whole);
    let naive = whole.plan.naive_peak_bytes;
    // Each tile's window carries 18 pixels of context per side, so small tiles cost more
    // than they save: with three chunks in flight (two workers, one ahead) nothing fits, and
    // the planner falls back to one chunk at a time.
    let limit = naive * 8 / 10;
    let tiled = run_budgeted(&job, "tiled", limit, (128, 64), 2);
    let node = &tiled.plan.nodes[2];
    assert_eq!(
        node.mode,
        nova_dataflow::ExecMode::Tiled,
        "{:#?}",
        tiled.plan
    );
    assert!(tiled.plan.fits && naive > limit);
    assert!(node.chunks.len() > 1);
    assert_eq!(node.inflight, 1, "serial fallback");
    let report = tiled.result.as_ref().expect("tiled run succeeds");
    assert!(
        report.tracked_peak_bytes <= limit,
        "{} > {limit}",
        report.tracked_peak_bytes
    );
    let ratio = report.tracked_peak_bytes as f64 / tiled.plan.forecast_peak_bytes as f64;
    assert!(
        (0.75..=1.25).contains(&ratio),
        "tracked/forecast {ratio:.3}"
    );
    let got = output(&job, &tiled);
    let d = max_abs_diff(&got, &reference);
    let differing = (&got - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .gt(1e-6)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // The same arithmetic per pixel, except that the matrix multiply under each conv blocks
    // its sums by the matrix size, so a tile's f32 values may differ from the whole image's
    // in the last bits; after rounding to 8 bits that flips at most one level, rarely.
    let samples = got.elem_count() as f32;
    assert!(
        d <= 1.0 / 255.0 + 1e-6 && differing <= samples * 1e-4,
        "tiled differs from whole: max {d}, {differing} of {samples} samples"
    );
}

#[test]
fn weights_larger_than_the_budget_are_streamed_with_the_same_output() {
    let _turn = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let job = job(8, 8);
    let resident = run_planned(
        &workflow("resident"),
        &job.env,
        &options(Some(64), 1),
        None,
        |_| false,
    );
    assert_eq!(
        resident.plan.nodes[2].weights.mode,
        Some(WeightMode::Resident)
    );
    let reference = output(&job, &resident);
    let states = |out: &nova_tests::Outcome| -> Vec<AssetState> {
        out.events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::ResidencyDelta(d) => Some(d.to),
                _ => None,
            })
            .collect()
    };
    let seen = states(&resident);
    assert!(seen.contains(&AssetState::GpuFull), "{seen:?}");

    let weights = resident.plan.nodes[2].weights.total_bytes;
    assert!(weights > 2_000_000, "the model is {weights} bytes");
    let limit = Bytes::mib(3).0 / 2; // 1.5 MiB: less than the weights
    assert!(limit < weights);
    let streamed = run_budgeted(&job, "streamed", limit, (64, 32), 1);
    let node = &streamed.plan.nodes[2];
    assert_eq!(
        node.weights.mode,
        Some(WeightMode::Streamed { depth: 1 }),
        "{node:#?}"
    );
    assert!(streamed.plan.fits);
    let report = streamed.result.as_ref().expect("streamed run succeeds");
    assert!(
        report.tracked_peak_bytes <= limit,
        "{} > {limit}",
        report.tracked_peak_bytes
    );
    assert!(report.tracked_peak_bytes < weights);
    let seen = states(&streamed);
    assert!(seen.contains(&AssetState::GpuPartial), "{seen:?}");
    assert_eq!(
        output(&job, &streamed).to_vec3::<f32>().unwrap(),
        reference.to_vec3::<f32>().unwrap(),
        "streamed output differs from resident"
    );
}
