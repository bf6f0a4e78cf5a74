//! A tiled upscale chain built in Rust, no JSON: a PNG is read band by band, upscaled 4x by
//! Real-ESRGAN, sharpened, and written band by band, all as one pipeline region under a 64 MiB
//! budget. Prints each node's progress as the dataflow reports it.
//!
//! Run: `cargo run -p nova-tests --example tiled_upscale [INPUT_DIR OUTPUT_DIR MODELS_DIR]`
//! (defaults: `examples/input`, `output`, `../shared/models`).

use nova_dataflow::job::{Job, JobSpec};
use nova_dataflow::{Bytes, EventKind, JobEnv, MemoryOverrides, Pipeline, ProfileId, RunReport};
use std::path::Path;

/// Builds and runs the chain; returns the run's report.
fn upscale(input: &Path, output: &Path, models: &Path) -> Result<RunReport, String> {
    let mut p = Pipeline::new();
    let image = p.add("LoadImage").with("image", "card.png").done();
    let model = p
        .add("UpscaleModelLoader")
        .with("model_name", "realesr-animevideov3.safetensors")
        .done();
    let up = p
        .add("ImageUpscaleWithModel")
        .link("upscale_model", &model.out(0))
        .link("image", &image.out(0))
        .done();
    let sharp = p
        .add("ImageSharpen")
        .link("image", &up.out(0))
        .with("sharpen_radius", 1)
        .with("sigma", 1.0)
        .with("alpha", 0.5)
        .done();
    p.add("SaveImage")
        .link("images", &sharp.out(0))
        .with("filename_prefix", "upscaled")
        .done();

    let registry = nova_operators::registry();
    let env = JobEnv::new(input, output, output.join("temp")).with_models_dir(models);
    std::fs::create_dir_all(output).map_err(|e| e.to_string())?;
    let spec = JobSpec::new(p.to_api(), env, &registry).with_overrides(MemoryOverrides {
        profile: Some(ProfileId::CpuSafe),
        budget: Some(Bytes::mib(64)),
        headroom: Some(Bytes(0)),
        ..MemoryOverrides::default()
    });
    let job = Job::prepare(spec).map_err(|e| e.to_string())?;
    for u in &job.plan.units {
        let names: Vec<&str> = u.members().map(|n| job.plan.nodes[n].class_type).collect();
        println!(
            "{:?} of {} pieces: {}",
            u.kind,
            u.pieces,
            names.join(" -> ")
        );
    }
    job.run(Default::default(), |e| match &e.kind {
        EventKind::NodeStart {
            node,
            class_type,
            chunks,
            ..
        } => {
            println!(
                "{:7.1} ms  node {node} ({class_type}) starts, {chunks} chunks",
                e.t_ms
            )
        }
        EventKind::NodeEnd { node, .. } => println!("{:7.1} ms  node {node} done", e.t_ms),
        _ => {}
    })
    .map_err(|e| e.to_string())
}

#[cfg_attr(test, allow(dead_code))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    match upscale(
        Path::new(&arg(0, "examples/input")),
        Path::new(&arg(1, "output")),
        Path::new(&arg(2, "../shared/models")),
    ) {
        Ok(r) => println!(
            "done in {:.0} ms; tracked peak {}; wrote {}",
            r.wall_ms,
            Bytes(r.tracked_peak_bytes),
            r.outputs["5"]
        ),
        Err(e) => {
            eprintln!("tiled_upscale: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_upscales_four_times_within_its_budget() {
        // The example's own image is 640x480; a smaller card keeps the test quick.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let input = tempfile::tempdir().unwrap();
        nova_tests::write_card_png(&input.path().join("card.png"), 160, 120);
        let out = tempfile::tempdir().unwrap();
        let report = super::upscale(input.path(), out.path(), &root.join("../shared/models"))
            .expect("the example runs");
        assert!(report.tracked_peak_bytes <= 64 << 20);
        let name = report.outputs["5"]["images"][0]["filename"]
            .as_str()
            .unwrap();
        let (w, h) = nova_media::probe_image(&out.path().join(name)).unwrap();
        assert_eq!((w, h), (640, 480));
    }
    use std::path::Path;
}
