//! ComfyUI's default txt2img workflow (checkpoint loader, two text encoders, empty latent,
//! KSampler, VAE decode, save), as ComfyUI exports it but for the checkpoint's file name and
//! the tiny model's native 64x64 size, runs on the tiny random-weight SD1 checkpoint:
//! deterministic for a seed.

use nova_tests::{options, png_samples, reported_files, run_planned, shared_models, Job};

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
