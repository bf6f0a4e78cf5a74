//! A video filter in Rust, the way ComfyUI's graphs do it: the clip split into its components,
//! its frames scaled 2x, a video made again and saved. The frames never exist as one batch:
//! they are decoded, scaled and encoded window by window, and each finished window is
//! announced while later ones are still being decoded.
//!
//! Run: `cargo run -p nova-tests --example video_filter [INPUT_DIR OUTPUT_DIR]` (defaults:
//! `examples/input`, whose `clip.mp4` it filters, and `output`).

use nova_dataflow::job::{Job, JobSpec};
use nova_dataflow::{EventKind, JobEnv, Pipeline, RunReport};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Filters `clip.mp4`; returns the report and the windows announced, in order.
fn filter(input: &Path, output: &Path) -> Result<(RunReport, Vec<u32>), String> {
    let mut p = Pipeline::new();
    let video = p.add("LoadVideo").with("file", "clip.mp4").done();
    let parts = p
        .add("GetVideoComponents")
        .link("video", &video.out(0))
        .done();
    let scaled = p
        .add("ImageScaleBy")
        .link("image", &parts.out(0))
        .with("upscale_method", "bicubic")
        .with("scale_by", 2.0)
        .done();
    let again = p
        .add("CreateVideo")
        .link("images", &scaled.out(0))
        .link("audio", &parts.out(1))
        .with("fps", 24.0)
        .done();
    p.add("SaveVideo")
        .link("video", &again.out(0))
        .with("filename_prefix", "filtered")
        .with("format", "mp4")
        .with("codec", "h264")
        .named("save")
        .done();

    let registry = nova_operators::registry();
    std::fs::create_dir_all(output).map_err(|e| e.to_string())?;
    let env = JobEnv::new(input, output, output.join("temp"));
    let job = Job::prepare(JobSpec::new(p.to_api(), env, &registry)).map_err(|e| e.to_string())?;
    let windows = Arc::new(Mutex::new(Vec::new()));
    let seen = windows.clone();
    let report = job
        .run(Default::default(), move |e| {
            if let EventKind::PartialVideo { window, windows, frame_start, frame_count, windows_decoded, .. } = &e.kind {
                println!(
                    "{:7.1} ms  window {}/{windows}: frames {frame_start}..{} final ({windows_decoded} decoded so far)",
                    e.t_ms,
                    window + 1,
                    frame_start + frame_count
                );
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(*window);
            }
        })
        .map_err(|e| e.to_string())?;
    let announced = windows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((report, announced))
}

#[cfg_attr(test, allow(dead_code))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    match filter(
        Path::new(&arg(0, "examples/input")),
        Path::new(&arg(1, "output")),
    ) {
        Ok((r, w)) => println!(
            "done in {:.0} ms, {} windows; wrote {}",
            r.wall_ms,
            w.len(),
            r.outputs["save"]
        ),
        Err(e) => {
            eprintln!("video_filter: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_streams_windows_in_order_and_saves_the_scaled_clip() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = tempfile::tempdir().unwrap();
        let (report, windows) =
            super::filter(&root.join("examples/input"), out.path()).expect("runs");
        assert!(windows.len() > 1, "{windows:?}");
        assert_eq!(windows, (0..windows.len() as u32).collect::<Vec<_>>());
        let name = report.outputs["save"]["images"][0]["filename"]
            .as_str()
            .unwrap();
        let info = nova_media::video::probe(&out.path().join(name)).unwrap();
        let src = nova_media::video::probe(&root.join("examples/input/clip.mp4")).unwrap();
        assert_eq!((info.width, info.height), (2 * src.width, 2 * src.height));
    }
}
