//! A tiled run of a local operator equals the untiled run, pixel for pixel: first at the
//! kernel level in f32 (bitwise), then through the whole dataflow on saved files.

use candle_core::{Device, Tensor};
use nova_dataflow::{Args, ChunkSize, ExecContext, ExecMode, Inputs, JobEnv, Value};
use nova_tests::{card, chain_workflow, png_samples, reported_files, run_workflow, Job};
use serde_json::json;

/// Runs `class_type` whole and tile by tile (`tile` pixels) on a 2-image batch of the card,
/// and asserts the outputs are bitwise equal.
fn assert_tiled_equals_whole(
    class_type: &str,
    args: serde_json::Value,
    h: usize,
    w: usize,
    tile: usize,
) {
    let registry = nova_operators::registry();
    let node = registry.get(class_type).expect("registered");
    let args = Args::new(
        args.as_object()
            .expect("object")
            .clone()
            .into_iter()
            .collect(),
    );
    let mut data = card(h, w);
    data.extend(card(h, w).iter().map(|v| 1.0 - v));
    let image = Tensor::from_vec(data, (2, h, w, 3), &Device::Cpu).unwrap();
    let ctx = ExecContext::standalone(JobEnv::new("in", "out", "tmp"), "t");
    let mut inputs = Inputs::new();
    inputs.insert("image", Value::image(image.clone()));
    let whole = node.execute(&args, inputs, &ctx).expect("whole run");
    let whole = whole.values[0].as_image().unwrap().clone();

    let chunking = node
        .chunked(
            &args,
            &nova_dataflow::Inputs::new(),
            &nova_dataflow::JobEnv::new("input", "output", "temp"),
        )
        .expect("tileable");
    let op = chunking.op;
    let input = Value::image(image);
    let info = input.info();
    let chunks = op
        .plan(
            &info,
            ChunkSize::Tile {
                width: tile,
                height: tile,
            },
        )
        .unwrap();
    assert!(
        chunks.len() > 1,
        "{class_type}: expected several tiles, got {}",
        chunks.len()
    );
    let mut merger = op.merger(&op.output_info(&info).unwrap()).unwrap();
    for c in &chunks {
        let piece = op.split(&input, c).unwrap();
        merger
            .add(c, op.process(&info, c, &piece).unwrap())
            .unwrap();
    }
    let merged = merger.finish().unwrap();
    let merged = merged.as_image().unwrap();
    assert_eq!(merged.dims(), whole.dims(), "{class_type} {args:?}: shape");
    let a: Vec<u32> = whole
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let b: Vec<u32> = merged
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        diff,
        0,
        "{class_type} {args:?}: {diff} of {} values differ",
        a.len()
    );
}

#[test]
fn tiled_blur_equals_untiled() {
    for (r, s) in [(1, 1.0), (3, 0.5), (7, 2.5)] {
        for tile in [16, 23] {
            assert_tiled_equals_whole(
                "ImageBlur",
                json!({"blur_radius": r, "sigma": s}),
                61,
                90,
                tile,
            );
        }
    }
}

#[test]
fn tiled_sharpen_equals_untiled() {
    for (r, a) in [(1, 1.0), (2, 0.4), (5, 3.0)] {
        assert_tiled_equals_whole(
            "ImageSharpen",
            json!({"sharpen_radius": r, "sigma": 1.0, "alpha": a}),
            61,
            90,
            19,
        );
    }
}

#[test]
fn tiled_invert_equals_untiled() {
    assert_tiled_equals_whole("ImageInvert", json!({}), 40, 50, 16);
}

#[test]
fn tiled_scale_by_equals_untiled_for_every_method() {
    for method in ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"] {
        for factor in [0.45, 1.37, 2.0] {
            assert_tiled_equals_whole(
                "ImageScaleBy",
                json!({"upscale_method": method, "scale_by": factor}),
                61,
                90,
                17,
            );
        }
    }
}

#[test]
fn tiled_scale_to_size_with_crop_equals_untiled() {
    for (w, h, crop) in [
        (50, 80, "center"),
        (120, 0, "disabled"),
        (0, 33, "disabled"),
        (97, 41, "center"),
        // Aspect so extreme that the centre crop keeps a single input row.
        (400, 1, "center"),
    ] {
        for method in ["bilinear", "lanczos", "area"] {
            assert_tiled_equals_whole(
                "ImageScale",
                json!({"upscale_method": method, "width": w, "height": h, "crop": crop}),
                61,
                90,
                16,
            );
        }
    }
}

#[test]
fn scale_to_zero_by_zero_returns_the_image_unchanged() {
    // ComfyUI's ImageScale with width = height = 0 passes the image through, even for the
    // 8-bit lanczos path.
    let registry = nova_operators::registry();
    let node = registry.get("ImageScale").unwrap();
    let args = Args::new(
        json!({"upscale_method": "lanczos", "width": 0, "height": 0, "crop": "center"})
            .as_object()
            .unwrap()
            .clone()
            .into_iter()
            .collect(),
    );
    let data = card(21, 34);
    let image = Tensor::from_vec(data.clone(), (1, 21, 34, 3), &Device::Cpu).unwrap();
    let mut inputs = Inputs::new();
    inputs.insert("image", Value::image(image));
    let ctx = ExecContext::standalone(JobEnv::new("in", "out", "tmp"), "t");
    let out = node.execute(&args, inputs, &ctx).unwrap();
    let out = out.values[0].as_image().unwrap();
    assert_eq!(out.dims(), &[1, 21, 34, 3]);
    assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), data);
}

#[test]
fn tiled_dataflow_run_saves_the_same_pixels_as_the_untiled_run() {
    let job = Job::new(96, 72);
    let tiled = run_workflow(&chain_workflow("tiled"), &job.env, Some(24), 2);
    let whole = run_workflow(&chain_workflow("whole"), &job.env, None, 2);
    assert!(tiled
        .plan
        .nodes
        .iter()
        .filter(|n| n.mode == ExecMode::Tiled)
        .all(|n| n.chunks.len() > 1));
    assert_eq!(
        tiled
            .plan
            .nodes
            .iter()
            .filter(
                |n| n.mode == ExecMode::Tiled && !matches!(n.class_type, "SaveImage" | "LoadImage")
            )
            .count(),
        5,
        "every local operator ran tiled"
    );
    // The five form one pipeline region, and SaveImage takes its tiles as they come.
    let region = tiled
        .plan
        .units
        .iter()
        .find(|u| u.kind == nova_dataflow::UnitKind::Pipeline)
        .expect("a pipeline region");
    assert_eq!(region.nodes.len(), 5, "{:#?}", tiled.plan.units);
    assert_eq!(
        region.sink.map(|s| tiled.plan.nodes[s].node.as_str()),
        Some("7")
    );
    // …and the input PNG is read band by band as the region cuts its pieces.
    assert_eq!(
        region.source.map(|s| tiled.plan.nodes[s].class_type),
        Some("LoadImage")
    );
    assert!(whole.plan.nodes.iter().all(|n| n.mode == ExecMode::Atomic));
    let tiled_file = reported_files(tiled.result.as_ref().unwrap(), "7").remove(0);
    let whole_file = reported_files(whole.result.as_ref().unwrap(), "7").remove(0);
    let (tw, th, a) = png_samples(&job.output(&tiled_file));
    let (ww, wh, b) = png_samples(&job.output(&whole_file));
    // 96x72 scaled by 1.37 is 132x99; to width 101 keeping aspect: round(99*101/132) = 76.
    assert_eq!((tw, th), (101, 76));
    assert_eq!((tw, th), (ww, wh));
    assert_eq!(a, b, "tiled and untiled outputs differ");
}
