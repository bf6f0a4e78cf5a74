//! A real model through the memory planner: Real-ESRGAN's `realesr-animevideov3`
//! (SRVGGNetCompact x4) matches its reference outputs, runs tiled with the same pixels as
//! whole, and streams its weights block by block when they exceed the budget, with the same
//! output as fully resident and its tracked peak inside the budget.

use candle_core::DType;
use candle_core::{Device, Tensor};
use nova_dataflow::{
    AssetState, Bytes, Event, EventKind, Lifecycle, PlanOptions, Registry, WeightMode,
};
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

/// Node `node`'s phases, each checked to lie between its `node_start` and `node_end`.
fn phases(events: &[Event], node: &str) -> Vec<Lifecycle> {
    let at = |f: &dyn Fn(&EventKind) -> bool| events.iter().position(|e| f(&e.kind)).unwrap();
    let start = at(&|k| matches!(k, EventKind::NodeStart { node: n, .. } if n == node));
    let end = at(&|k| matches!(k, EventKind::NodeEnd { node: n, .. } if n == node));
    events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.kind {
            EventKind::Lifecycle {
                state,
                node: Some(n),
            } if n == node => {
                assert!(
                    start < i && i < end,
                    "{state:?} of node {node} outside its run"
                );
                Some(*state)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_model_nodes_phases_and_time_split_are_announced_cold_and_warm() {
    let _turn = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let job = job(32, 32);
    let run = |prefix: &str| {
        let out = run_planned(
            &workflow(prefix),
            &job.env,
            &options(Some(16), 2),
            None,
            |_| false,
        );
        out.result.as_ref().expect("run succeeds");
        out
    };
    // Validation maps and indexes the file. Evicted before the run (as the registry's LRU may
    // do while a job waits in a queue), the loader maps and indexes it again; the upscaler
    // reads the tensors, moves them to the device, then computes.
    let cold = {
        let registry = nova_operators::registry();
        let wf = nova_dataflow::workflow::load(&workflow("cold"), &registry, &job.env).unwrap();
        let plan = nova_dataflow::plan(&wf, &job.env, &options(Some(16), 2)).unwrap();
        Registry::global().release_unpinned();
        let out = nova_tests::run_plan(wf, plan, &job.env, None, |_| false);
        out.result.as_ref().expect("run succeeds");
        out
    };
    assert_eq!(phases(&cold.events, "2"), [Lifecycle::Indexing]);
    assert_eq!(
        phases(&cold.events, "3"),
        [
            Lifecycle::Prefetching,
            Lifecycle::Warming,
            Lifecycle::Running
        ]
    );
    let timing = |out: &nova_tests::Outcome| {
        let n = out.events.len();
        match &out.events[n - 2].kind {
            EventKind::Timing(t) => t.clone(),
            k => panic!("the event before the last is {k:?}"),
        }
    };
    let t = timing(&cold);
    let node = |id: &str| t.nodes.iter().find(|n| n.node == id).unwrap().split;
    assert!(node("2").load_ms > 0.0, "{t:?}");
    assert!(
        node("3").load_ms > 0.0 && node("3").compute_ms > 0.0,
        "{t:?}"
    );
    assert_eq!(node("1").load_ms, 0.0, "an image loader reads no weights");
    let sum: f64 = t.nodes.iter().map(|n| n.split.compute_ms).sum();
    assert!((t.total.compute_ms - sum).abs() < 1e-6);
    assert!(t.startup_ms >= 0.0 && t.wall_ms > 0.0);
    // node_end carries the node's split as it stood when the node finished.
    let end3 = cold
        .events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::NodeEnd { node, timing, .. } if node == "3" => Some(*timing),
            _ => None,
        })
        .unwrap();
    assert_eq!(end3.load_ms, node("3").load_ms);
    assert!(end3.compute_ms <= node("3").compute_ms);

    // Warm: the file stays mapped (validation found it so) and its tensors in the host cache.
    let warm = run("warm");
    assert!(phases(&warm.events, "2").is_empty());
    assert_eq!(
        phases(&warm.events, "3"),
        [Lifecycle::Warming, Lifecycle::Running]
    );
    let w = timing(&warm);
    let load = |t: &nova_dataflow::RunTiming| t.total.load_ms;
    assert!(
        load(&w) < load(&t),
        "warm load {} ms, cold {} ms",
        load(&w),
        load(&t)
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
