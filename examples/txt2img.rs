//! Text to image in Rust with a step preview after every sampler step: ComfyUI's default
//! txt2img graph on the tiny SD1 checkpoint, each step a dataflow time whose preview arrives
//! as soon as the frontier passes it.
//!
//! Run: `cargo run -p nova-tests --example txt2img [OUTPUT_DIR MODELS_DIR]` (defaults:
//! `output`, `../shared/models`, whose `tiny-sd1/tiny_sd1.safetensors` is the checkpoint).

use nova_dataflow::job::{Job, JobSpec};
use nova_dataflow::{EventKind, JobEnv, Pipeline, PreviewMethod, RunReport};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Runs `steps` steps; returns the report and the step of every preview seen.
fn txt2img(output: &Path, models: &Path, steps: u32) -> Result<(RunReport, Vec<u32>), String> {
    // ComfyUI keeps checkpoints in `models/checkpoints`: a folder of our own with a copy of
    // the shared tiny checkpoint (11 MB; a link out of the folder would be refused).
    let ours = output.join("models");
    std::fs::create_dir_all(ours.join("checkpoints")).map_err(|e| e.to_string())?;
    let ckpt = ours.join("checkpoints/tiny_sd1.safetensors");
    if !ckpt.exists() {
        std::fs::copy(models.join("tiny-sd1/tiny_sd1.safetensors"), &ckpt)
            .map_err(|e| e.to_string())?;
    }
    let mut p = Pipeline::new();
    let ckpt = p
        .add("CheckpointLoaderSimple")
        .with("ckpt_name", "tiny_sd1.safetensors")
        .done();
    let positive = p
        .add("CLIPTextEncode")
        .with("text", "a lighthouse on a cliff at dawn")
        .link("clip", &ckpt.out(1))
        .done();
    let negative = p
        .add("CLIPTextEncode")
        .with("text", "text, watermark")
        .link("clip", &ckpt.out(1))
        .done();
    let latent = p
        .add("EmptyLatentImage")
        .with("width", 64)
        .with("height", 64)
        .with("batch_size", 1)
        .done();
    let sampled = p
        .add("KSampler")
        .link("model", &ckpt.out(0))
        .link("positive", &positive.out(0))
        .link("negative", &negative.out(0))
        .link("latent_image", &latent.out(0))
        .with("seed", 42)
        .with("steps", steps)
        .with("cfg", 7.0)
        .with("sampler_name", "euler")
        .with("scheduler", "normal")
        .with("denoise", 1.0)
        .done();
    let image = p
        .add("VAEDecode")
        .link("samples", &sampled.out(0))
        .link("vae", &ckpt.out(2))
        .done();
    p.add("SaveImage")
        .link("images", &image.out(0))
        .with("filename_prefix", "txt2img")
        .named("save")
        .done();

    let registry = nova_operators::registry();
    let env = JobEnv::new(output, output, output.join("temp"))
        .with_models_dir(&ours)
        .with_preview(PreviewMethod::Latent2rgb);
    let job = Job::prepare(JobSpec::new(p.to_api(), env, &registry)).map_err(|e| e.to_string())?;
    let previews = Arc::new(Mutex::new(Vec::new()));
    let seen = previews.clone();
    let report = job
        .run(Default::default(), move |e| {
            if let EventKind::Preview {
                step,
                steps,
                width,
                height,
                ..
            } = &e.kind
            {
                println!(
                    "{:7.1} ms  preview after step {step}/{steps} ({width}x{height})",
                    e.t_ms
                );
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(*step);
            }
        })
        .map_err(|e| e.to_string())?;
    let steps_seen = previews.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((report, steps_seen))
}

#[cfg_attr(test, allow(dead_code))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    match txt2img(
        Path::new(&arg(0, "output")),
        Path::new(&arg(1, "../shared/models")),
        8,
    ) {
        Ok((r, _)) => println!("done in {:.0} ms; wrote {}", r.wall_ms, r.outputs["save"]),
        Err(e) => {
            eprintln!("txt2img: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_previews_every_step_then_saves_the_image() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = tempfile::tempdir().unwrap();
        let (report, previews) =
            super::txt2img(out.path(), &root.join("../shared/models"), 4).expect("runs");
        assert_eq!(previews, vec![1, 2, 3, 4]);
        let name = report.outputs["save"]["images"][0]["filename"]
            .as_str()
            .unwrap();
        assert_eq!(
            nova_media::probe_image(&out.path().join(name)).unwrap(),
            (64, 64)
        );
    }
}
