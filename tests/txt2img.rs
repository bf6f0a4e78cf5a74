//! ComfyUI's default txt2img workflow (checkpoint loader, two text encoders, empty latent,
//! KSampler, VAE decode, save), as ComfyUI exports it but for the checkpoint's file name and
//! the tiny model's native 64x64 size, runs on the tiny random-weight SD1 checkpoint:
//! deterministic for a seed, with one step event and one preview per sampler step.

use nova_dataflow::{EventKind, PreviewMethod, RunError};
use nova_tests::{options, png_samples, reported_files, run_planned, shared_models, Job, Outcome};

fn default_workflow(seed: u64, sampler: &str, scheduler: &str, prefix: &str) -> String {
    format!(
        r#"{{
  "3": {{"class_type": "KSampler", "inputs": {{"seed": {seed}, "steps": 20, "cfg": 8, "sampler_name": "{sampler}", "scheduler": "{scheduler}", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}}},
  "4": {{"class_type": "CheckpointLoaderSimple", "inputs": {{"ckpt_name": "tiny_sd1.safetensors"}}}},
  "5": {{"class_type": "EmptyLatentImage", "inputs": {{"width": 64, "height": 64, "batch_size": 1}}}},
  "6": {{"class_type": "CLIPTextEncode", "inputs": {{"text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,", "clip": ["4", 1]}}}},
  "7": {{"class_type": "CLIPTextEncode", "inputs": {{"text": "text, watermark", "clip": ["4", 1]}}}},
  "8": {{"class_type": "VAEDecode", "inputs": {{"samples": ["3", 0], "vae": ["4", 2]}}}},
  "9": {{"class_type": "SaveImage", "inputs": {{"filename_prefix": "{prefix}", "images": ["8", 0]}}}}
}}"#
    )
}

fn job() -> Job {
    let mut job = Job::new(8, 8);
    let models = job.dir.path().join("models");
    std::fs::create_dir_all(models.join("checkpoints")).unwrap();
    std::fs::copy(
        shared_models().join("tiny-sd1/tiny_sd1.safetensors"),
        models.join("checkpoints/tiny_sd1.safetensors"),
    )
    .unwrap();
    job.env = job.env.clone().with_models_dir(models);
    job
}

fn run(job: &Job, wf: &str) -> (usize, usize, Vec<u8>) {
    let out = run_planned(wf, &job.env, &options(Some(512), 2), None, |_| false);
    let report = out.result.expect("txt2img runs");
    png_samples(&job.output(&reported_files(&report, "9")[0]))
}

/// A preview's method, width and height.
type PreviewOf = (String, usize, usize);

/// The sampler's step events and previews, in order: `(step, Some((method, w, h)))` for a
/// preview, `(step, None)` for a step event.
fn step_events(out: &Outcome) -> Vec<(u32, Option<PreviewOf>)> {
    out.events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Step { node, step, .. } if node == "3" => Some((*step, None)),
            EventKind::Preview {
                node,
                step,
                method,
                width,
                height,
                ..
            } if node == "3" => {
                let img = e.attachment.as_ref().and_then(|v| v.info().image());
                assert_eq!(img.map(|i| (i.width, i.height)), Some((*width, *height)));
                Some((*step, Some((method.clone(), *width, *height))))
            }
            _ => None,
        })
        .collect()
}

fn with_taesd(job: &Job) {
    let approx = job.env.models_dir.join("vae_approx");
    std::fs::create_dir_all(&approx).unwrap();
    std::fs::copy(
        shared_models().join("taesd/synthetic-sd1-layout/taesd_decoder.safetensors"),
        approx.join("taesd_decoder.safetensors"),
    )
    .unwrap();
}

#[test]
fn the_default_txt2img_workflow_runs_unchanged_and_is_deterministic_for_a_seed() {
    let job = job();
    let (w, h, a) = run(
        &job,
        &default_workflow(156680208700286, "euler", "normal", "a"),
    );
    assert_eq!((w, h), (64, 64));
    let (_, _, b) = run(
        &job,
        &default_workflow(156680208700286, "euler", "normal", "b"),
    );
    assert_eq!(a, b, "same seed, same image");
    let (_, _, c) = run(&job, &default_workflow(42, "euler", "normal", "c"));
    assert_ne!(a, c, "another seed, another image");
    // The other samplers and schedulers run too, and differ from euler/normal.
    for (sampler, scheduler) in [("euler_ancestral", "normal"), ("dpmpp_2m", "karras")] {
        let (_, _, d) = run(
            &job,
            &default_workflow(156680208700286, sampler, scheduler, sampler),
        );
        assert_ne!(a, d, "{sampler}/{scheduler}");
    }
}

#[test]
fn every_sampler_step_is_a_progress_event_followed_by_its_preview() {
    let mut job = job();
    let wf = default_workflow(7, "dpmpp_2m", "karras", "p");
    // No TAESD in the models folder: previews are the latent projection, at latent size.
    let out = run_planned(&wf, &job.env, &options(Some(512), 2), None, |_| false);
    let report = out.result.as_ref().expect("txt2img runs");
    let (_, _, plain) = png_samples(&job.output(&reported_files(report, "9")[0]));
    assert_eq!(
        out.plan.nodes.iter().find(|n| n.node == "3").unwrap().steps,
        20
    );
    let mut want = Vec::new();
    for s in 1..=20 {
        want.push((s, None));
        want.push((s, Some(("latent2rgb".to_string(), 8, 8))));
    }
    assert_eq!(step_events(&out), want);
    // Steps come between the sampler's start and end.
    let pos = |f: &dyn Fn(&EventKind) -> bool| out.events.iter().position(|e| f(&e.kind));
    let start = pos(&|k| matches!(k, EventKind::NodeStart { node, .. } if node == "3")).unwrap();
    let end = pos(&|k| matches!(k, EventKind::NodeEnd { node, .. } if node == "3")).unwrap();
    let first = pos(&|k| matches!(k, EventKind::Step { .. })).unwrap();
    assert!(start < first && first < end);

    // With TAESD's decoder present and asked for, every preview is a full-size decode.
    with_taesd(&job);
    job.env = job.env.clone().with_preview(PreviewMethod::Taesd);
    let out = run_planned(&wf, &job.env, &options(Some(512), 2), None, |_| false);
    let report = out.result.as_ref().expect("txt2img runs");
    let (_, _, taesd) = png_samples(&job.output(&reported_files(report, "9")[0]));
    let previews: Vec<_> = step_events(&out).into_iter().filter_map(|e| e.1).collect();
    assert_eq!(previews, vec![("taesd".to_string(), 64, 64); 20]);
    // Previews only look: the image is the same.
    assert_eq!(plain, taesd);

    // `auto` gives one preview per step, whichever way each was made.
    job.env = job.env.clone().with_preview(PreviewMethod::Auto);
    let out = run_planned(&wf, &job.env, &options(Some(512), 2), None, |_| false);
    assert!(out.result.is_ok());
    let steps: Vec<u32> = step_events(&out)
        .into_iter()
        .filter(|e| e.1.is_some())
        .map(|e| e.0)
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());

    // `none`: steps still report progress, without previews.
    job.env = job.env.clone().with_preview(PreviewMethod::None);
    let out = run_planned(&wf, &job.env, &options(Some(512), 2), None, |_| false);
    assert!(out.result.is_ok());
    let events = step_events(&out);
    assert_eq!(events.len(), 20);
    assert!(events.iter().all(|e| e.1.is_none()));
}

#[test]
fn a_job_cancelled_during_sampling_stops_between_steps() {
    let job = job();
    let wf = default_workflow(7, "euler", "normal", "x");
    let out = run_planned(&wf, &job.env, &options(Some(512), 2), None, |e| {
        matches!(e.kind, EventKind::Step { step: 3, .. })
    });
    assert_eq!(out.result.as_ref().err(), Some(&RunError::Interrupted));
    let steps = step_events(&out).iter().filter(|e| e.1.is_none()).count();
    assert!((3..20).contains(&steps), "stopped after {steps} steps");
    assert!(!job.dir.path().join("output").join("x_00001_.png").exists());
}

#[test]
fn long_and_weighted_prompts_condition_the_sampler() {
    let job = job();
    let base = default_workflow(11, "euler", "normal", "w");
    let (_, _, plain) = run(&job, &base);
    // A prompt of three 77-token windows against a one-window negative prompt.
    let long = vec!["bottle"; 160].join(" ");
    let wf = base.replace(
        "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
        &long,
    );
    let (w, h, long_img) = run(&job, &wf.replace("\"w\"", "\"l\""));
    assert_eq!((w, h), (64, 64));
    assert_ne!(long_img, plain);
    // Emphasis changes the image; weight 1 does not.
    let weighted = base.replace("glass bottle", "(glass bottle:1.4)");
    let (_, _, emphasised) = run(&job, &weighted.replace("\"w\"", "\"e\""));
    assert_ne!(emphasised, plain);
    let neutral = base.replace("glass bottle", "(glass bottle:1.0)");
    let (_, _, same) = run(&job, &neutral.replace("\"w\"", "\"n\""));
    assert_eq!(same, plain);
}
