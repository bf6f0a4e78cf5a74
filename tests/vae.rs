//! The TAESD family as ComfyUI's VAE nodes: `VAELoader` finds `<name>_encoder/decoder` in
//! `models/vae_approx/`, `VAEEncode`/`VAEDecode` match the reference latents, `.latent` files
//! round-trip through `SaveLatent`/`LoadLatent`, and a bad VAE name is refused at validation.

use candle_core::Tensor;
use nova_dataflow::{workflow, WeightSource};
use nova_operators::model::safetensors::SafetensorsFile;
use nova_tests::{options, png_samples, reported_files, run_planned, shared_models, Job};
use std::path::Path;

/// A job whose models folder has `vae_approx/` holding the shared TAESD-family files.
fn job(w: usize, h: usize) -> Job {
    let mut job = Job::new(w, h);
    let models = job.dir.path().join("models");
    let approx = models.join("vae_approx");
    std::fs::create_dir_all(&approx).unwrap();
    let taesd = shared_models().join("taesd");
    for (from, to) in [
        ("taef2_encoder.safetensors", "taef2_encoder.safetensors"),
        ("taef2_decoder.safetensors", "taef2_decoder.safetensors"),
        (
            "synthetic-sd1-layout/taesd_encoder.safetensors",
            "taesd_encoder.safetensors",
        ),
        (
            "synthetic-sd1-layout/taesd_decoder.safetensors",
            "taesd_decoder.safetensors",
        ),
    ] {
        std::fs::copy(taesd.join(from), approx.join(to)).unwrap();
    }
    job.env = job.env.clone().with_models_dir(models);
    job
}

fn read(path: &Path, name: &str) -> Tensor {
    SafetensorsFile::open(path).unwrap().read(name).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

const ENCODE_DECODE: &str = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taef2"}},
  "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
  "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/card"}},
  "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
  "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "decoded"}}
}"#;

#[test]
fn taef2_encodes_like_the_reference_and_latents_round_trip_through_files() {
    let job = job(64, 64);
    let out = run_planned(ENCODE_DECODE, &job.env, &options(None, 2), None, |_| false);
    let report = out.result.expect("encode/decode runs");
    // The latent, from the 8-bit PNG of the reference card: close to the reference latent.
    let latents = report.outputs["4"]["latents"].as_array().unwrap();
    assert_eq!(latents[0]["subfolder"], "latents");
    let file = job.output(&format!(
        "latents/{}",
        latents[0]["filename"].as_str().unwrap()
    ));
    let latent = read(&file, "latent_tensor");
    assert_eq!(latent.dims(), &[1, 32, 8, 8]);
    let reference = shared_models().join("taesd/reference/taef2_64x64.safetensors");
    let d = max_diff(&latent, &read(&reference, "latent"));
    assert!(d < 0.05, "latent differs from the reference by {d}");
    // The file is ComfyUI's format: the version marker is there.
    let f = SafetensorsFile::open(&file).unwrap();
    assert_eq!(f.shape("latent_format_version_0"), Some(&[0usize][..]));

    // Decoding reconstructs the card (TAESD is lossy: the reference's own error is 0.056).
    let decoded = reported_files(&report, "6");
    let (w, h, px) = png_samples(&job.output(&decoded[0]));
    assert_eq!((w, h), (64, 64));
    let (_, _, card) = png_samples(&job.env.input_dir.join("card.png"));
    let mae = px
        .iter()
        .zip(&card)
        .map(|(a, b)| (*a as f32 - *b as f32).abs() / 255.0)
        .sum::<f32>()
        / px.len() as f32;
    assert!(mae < 0.08, "mean abs reconstruction error {mae}");

    // LoadLatent reads the saved file back; decoding it gives the same pixels.
    std::fs::copy(&file, job.env.input_dir.join("card.latent")).unwrap();
    let load = r#"{
      "1": {"class_type": "LoadLatent", "inputs": {"latent": "card.latent"}},
      "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taef2"}},
      "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
      "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "again"}}
    }"#;
    let again = run_planned(load, &job.env, &options(None, 1), None, |_| false);
    let report = again.result.expect("load and decode run");
    let (_, _, px2) = png_samples(&job.output(&reported_files(&report, "4")[0]));
    assert_eq!(px, px2);
}

#[test]
fn empty_latents_decode_to_the_requested_size_with_the_sd1_layout() {
    let job = job(8, 8);
    let wf = r#"{
      "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 2}},
      "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
      "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
      "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "empty"}}
    }"#;
    let out = run_planned(wf, &job.env, &options(None, 1), None, |_| false);
    assert!(matches!(
        out.plan.nodes[0].outputs[0],
        nova_dataflow::ValueInfo::Latent {
            batch: 2,
            channels: 4,
            height: 8,
            width: 12
        }
    ));
    let report = out.result.expect("decode runs");
    let files = reported_files(&report, "4");
    assert_eq!(files.len(), 2);
    let (w, h, _) = png_samples(&job.output(&files[0]));
    assert_eq!((w, h), (96, 64));
    // The decoded weights were counted and released: the registry saw GPU_FULL.
    assert!(
        out.events.iter().any(|e| matches!(&e.kind,
        nova_dataflow::EventKind::ResidencyDelta(d) if d.to == nova_dataflow::AssetState::GpuFull))
    );
}

#[test]
fn an_unknown_or_unsupported_vae_is_refused_at_validation() {
    let job = job(8, 8);
    let registry = nova_operators::registry();
    for (name, says) in [
        (
            "nothing",
            "no nothing_encoder.safetensors or nothing_decoder.safetensors",
        ),
        ("sd15.safetensors", "full VAE files"),
    ] {
        let wf = format!(
            r#"{{"1": {{"class_type": "VAELoader", "inputs": {{"vae_name": "{name}"}}}},
                "2": {{"class_type": "EmptyLatentImage", "inputs": {{"width": 64, "height": 64, "batch_size": 1}}}},
                "3": {{"class_type": "VAEDecode", "inputs": {{"samples": ["2", 0], "vae": ["1", 0]}}}},
                "4": {{"class_type": "PreviewImage", "inputs": {{"images": ["3", 0]}}}}}}"#
        );
        let e = workflow::load(&wf, &registry, &job.env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node 1") && e.contains("vae_name") && e.contains(says),
            "{e}"
        );
    }
}

/// Plan options for 128-pixel tiles (down to 32) on 2 workers under `limit` bytes.
fn budgeted(limit: u64) -> nova_dataflow::PlanOptions {
    nova_dataflow::PlanOptions {
        tile: Some(128),
        min_tile: 32,
        limit: Some(nova_dataflow::Bytes(limit)),
        workers: 2,
        prefetch: 1,
        ..nova_dataflow::PlanOptions::default()
    }
}

/// PSNR in dB between two 8-bit sample arrays.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Encodes the card with `vae` and leaves `card.latent` in the input folder.
fn encode_card(job: &Job, vae: &str) {
    let wf = r#"{
      "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
      "2": {"class_type": "VAELoader", "inputs": {"vae_name": "@VAE@"}},
      "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
      "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "card"}}
    }"#
    .replace("@VAE@", vae);
    let out = run_planned(&wf, &job.env, &options(None, 2), None, |_| false);
    let report = out.result.expect("encode runs");
    let name = report.outputs["4"]["latents"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::copy(job.output(&name), job.env.input_dir.join("card.latent")).unwrap();
}

fn decode_workflow(vae: &str, node: &str, extra: &str, prefix: &str) -> String {
    format!(
        r#"{{
      "1": {{"class_type": "LoadLatent", "inputs": {{"latent": "card.latent"}}}},
      "2": {{"class_type": "VAELoader", "inputs": {{"vae_name": "{vae}"}}}},
      "3": {{"class_type": "{node}", "inputs": {{"samples": ["1", 0], "vae": ["2", 0]{extra}}}}},
      "4": {{"class_type": "SaveImage", "inputs": {{"images": ["3", 0], "filename_prefix": "{prefix}"}}}}
    }}"#
    )
}

#[test]
fn a_decode_that_cannot_fit_whole_is_tiled_by_the_planner_without_visible_seams() {
    let job = job(512, 384);
    encode_card(&job, "taesd");
    let whole = run_planned(
        &decode_workflow("taesd", "VAEDecode", "", "whole"),
        &job.env,
        &options(None, 2),
        None,
        |_| false,
    );
    assert_eq!(whole.plan.nodes[2].mode, nova_dataflow::ExecMode::Atomic);
    let report = whole.result.expect("whole decode runs");
    let (_, _, reference) = png_samples(&job.output(&reported_files(&report, "4")[0]));
    let limit = whole.plan.naive_peak_bytes / 2;
    let opts = budgeted(limit);
    let tiled = run_planned(
        &decode_workflow("taesd", "VAEDecode", "", "tiled"),
        &job.env,
        &opts,
        Some(nova_dataflow::Bytes(limit)),
        |_| false,
    );
    let node = &tiled.plan.nodes[2];
    assert_eq!(
        node.mode,
        nova_dataflow::ExecMode::Tiled,
        "{:#?}",
        tiled.plan
    );
    assert!(tiled.plan.fits && tiled.plan.naive_peak_bytes > limit);
    let report = tiled.result.expect("tiled decode runs");
    assert!(report.tracked_peak_bytes <= limit);
    let (w, h, px) = png_samples(&job.output(&reported_files(&report, "4")[0]));
    assert_eq!((w, h), (512, 384));
    let p = psnr(&px, &reference);
    eprintln!(
        "planner-tiled decode ({} tiles) vs whole: PSNR {p:.1} dB",
        node.chunks.len()
    );
    assert!(p > 35.0, "PSNR {p:.1} dB");
}

#[test]
fn vae_decode_tiled_blends_its_overlaps_close_to_the_whole_decode() {
    let job = job(256, 192);
    encode_card(&job, "taesd");
    let run = |node: &str, extra: &str, prefix: &str| {
        let out = run_planned(
            &decode_workflow("taesd", node, extra, prefix),
            &job.env,
            &options(Some(512), 1),
            None,
            |_| false,
        );
        let report = out.result.expect("decode runs");
        png_samples(&job.output(&reported_files(&report, "4")[0])).2
    };
    let whole = run("VAEDecode", "", "whole");
    let tiled = run(
        "VAEDecodeTiled",
        r#", "tile_size": 128, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8"#,
        "tiled",
    );
    let p = psnr(&tiled, &whole);
    eprintln!("VAEDecodeTiled 128/64 vs whole: PSNR {p:.1} dB");
    assert!(p > 35.0, "PSNR {p:.1} dB");
}

/// Encodes the card with `node` (and `extra` inputs) under `opts`, saving `<prefix>.latent`;
/// returns the run and the latent file's name.
fn encode_with(
    job: &Job,
    node: &str,
    extra: &str,
    prefix: &str,
    opts: &nova_dataflow::PlanOptions,
    budget: Option<nova_dataflow::Bytes>,
) -> (nova_tests::Outcome, String) {
    let wf = format!(
        r#"{{
      "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
      "2": {{"class_type": "VAELoader", "inputs": {{"vae_name": "taesd"}}}},
      "3": {{"class_type": "{node}", "inputs": {{"pixels": ["1", 0], "vae": ["2", 0]{extra}}}}},
      "4": {{"class_type": "SaveLatent", "inputs": {{"samples": ["3", 0], "filename_prefix": "{prefix}"}}}}
    }}"#
    );
    let out = run_planned(&wf, &job.env, opts, budget, |_| false);
    let name = {
        let report = out.result.as_ref().expect("encode runs");
        report.outputs["4"]["latents"][0]["filename"]
            .as_str()
            .unwrap()
            .to_string()
    };
    (out, name)
}

/// Decodes a saved latent whole and returns the image's samples.
fn decode_saved(job: &Job, latent: &str, prefix: &str) -> Vec<u8> {
    std::fs::copy(job.output(latent), job.env.input_dir.join("card.latent")).unwrap();
    let out = run_planned(
        &decode_workflow("taesd", "VAEDecode", "", prefix),
        &job.env,
        &options(None, 2),
        None,
        |_| false,
    );
    let report = out.result.expect("decode runs");
    png_samples(&job.output(&reported_files(&report, "4")[0])).2
}

#[test]
fn an_encode_that_cannot_fit_whole_is_tiled_and_decodes_without_visible_seams() {
    let job = job(512, 384);
    let (whole, whole_latent) =
        encode_with(&job, "VAEEncode", "", "whole", &options(None, 2), None);
    assert_eq!(whole.plan.nodes[2].mode, nova_dataflow::ExecMode::Atomic);
    let limit = whole.plan.naive_peak_bytes / 2;
    let opts = budgeted(limit);
    let (tiled, tiled_latent) = encode_with(
        &job,
        "VAEEncode",
        "",
        "tiled",
        &opts,
        Some(nova_dataflow::Bytes(limit)),
    );
    let node = &tiled.plan.nodes[2];
    assert_eq!(
        node.mode,
        nova_dataflow::ExecMode::Tiled,
        "{:#?}",
        tiled.plan
    );
    assert!(tiled.plan.fits && tiled.plan.naive_peak_bytes > limit);
    let report = tiled.result.as_ref().unwrap();
    assert!(report.tracked_peak_bytes <= limit);
    let a = read(&job.output(&whole_latent), "latent_tensor");
    let b = read(&job.output(&tiled_latent), "latent_tensor");
    assert_eq!(a.dims(), &[1, 4, 48, 64]);
    assert_eq!(a.dims(), b.dims());
    let p = psnr(
        &decode_saved(&job, &tiled_latent, "dt"),
        &decode_saved(&job, &whole_latent, "dw"),
    );
    eprintln!(
        "planner-tiled encode ({} tiles) vs whole, decoded: PSNR {p:.1} dB; latent max |diff| {:.2e}",
        node.chunks.len(),
        max_diff(&a, &b)
    );
    assert!(p > 35.0, "PSNR {p:.1} dB");

    // ComfyUI's VAEEncodeTiled, whatever the budget.
    let (_, named) = encode_with(
        &job,
        "VAEEncodeTiled",
        r#", "tile_size": 192, "overlap": 64"#,
        "named",
        &options(Some(512), 2),
        None,
    );
    let p = psnr(
        &decode_saved(&job, &named, "dn"),
        &decode_saved(&job, &whole_latent, "dw2"),
    );
    eprintln!("VAEEncodeTiled 192/64 vs whole, decoded: PSNR {p:.1} dB");
    assert!(p > 35.0, "PSNR {p:.1} dB");
}

#[test]
fn a_checkpoints_vae_runs_whole_under_the_planner_and_tiled_on_request() {
    let job = job(256, 192);
    let ckpts = job.env.models_dir.join("checkpoints");
    std::fs::create_dir_all(&ckpts).unwrap();
    std::fs::copy(
        shared_models().join("tiny-sd1/tiny_sd1.safetensors"),
        ckpts.join("tiny_sd1.safetensors"),
    )
    .unwrap();
    let wf = |decode: &str, prefix: &str| {
        format!(
            r#"{{
      "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
      "2": {{"class_type": "CheckpointLoaderSimple", "inputs": {{"ckpt_name": "tiny_sd1.safetensors"}}}},
      "3": {{"class_type": "VAEEncode", "inputs": {{"pixels": ["1", 0], "vae": ["2", 2]}}}},
      "4": {{"class_type": {decode}, "vae": ["2", 2]}}}},
      "5": {{"class_type": "SaveImage", "inputs": {{"images": ["4", 0], "filename_prefix": "{prefix}"}}}}
    }}"#
        )
    };
    let run = |decode: &str, prefix: &str| {
        let out = run_planned(
            &wf(decode, prefix),
            &job.env,
            &options(Some(512), 2),
            None,
            |_| false,
        );
        let modes: Vec<_> = out.plan.nodes.iter().map(|n| n.mode).collect();
        let report = out.result.expect("round trip runs");
        (
            modes,
            png_samples(&job.output(&reported_files(&report, "5")[0])).2,
        )
    };
    let (modes, whole) = run(r#""VAEDecode", "inputs": {"samples": ["3", 0]"#, "whole");
    assert_eq!(modes[2], nova_dataflow::ExecMode::Atomic);
    assert_eq!(modes[3], nova_dataflow::ExecMode::Atomic);
    // One tile covering the image is the whole decode (the planner runs it whole).
    let tiled_input = |tile: u32, overlap: u32| {
        format!(
            r#""VAEDecodeTiled", "inputs": {{"samples": ["3", 0], "tile_size": {tile}, "overlap": {overlap}"#
        )
    };
    let (_, one) = run(&tiled_input(512, 64), "one");
    assert_eq!(one, whole);
    // Smaller tiles run and blend; GroupNorm statistics per tile make them approximate.
    let (modes, tiled) = run(&tiled_input(128, 64), "tiled");
    assert_eq!(modes[3], nova_dataflow::ExecMode::Tiled);
    // Tiles whose windows reach across the whole latent see what the whole run sees.
    let (_, wide) = run(&tiled_input(128, 512), "wide");
    let p = psnr(&wide, &whole);
    assert!(p > 50.0, "PSNR {p:.1} dB");
    eprintln!(
        "KL VAE VAEDecodeTiled 128/64 vs whole (random tiny weights): PSNR {:.1} dB",
        psnr(&tiled, &whole)
    );
}
