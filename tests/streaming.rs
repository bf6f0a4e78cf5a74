//! The engine streams: pieces flow through whole chains of nodes (pipeline regions), so a
//! chain runs in memory bounded by what is in flight, the first finished tile of its last node
//! appears early, and the output equals the node-by-node run bit for bit; independent branches
//! run at once when they fit together; ComfyUI's way to filter a video streams too.

use nova_dataflow::{Bytes, EventKind, ExecMode, Lifecycle, PlanOptions, UnitKind};
use nova_tests::{
    png_samples, reported_files, run_planned, run_planned_lean, run_workflow, write_card_png, Job,
};

/// The issue's chain: 2048² in, blurred, scaled 2× with lanczos, sharpened, inverted, saved.
fn chain(prefix: &str) -> String {
    format!(
        r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "big.png"}}}},
  "2": {{"class_type": "ImageBlur", "inputs": {{"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}}}},
  "3": {{"class_type": "ImageScaleBy", "inputs": {{"image": ["2", 0], "upscale_method": "lanczos", "scale_by": 2.0}}}},
  "4": {{"class_type": "ImageSharpen", "inputs": {{"image": ["3", 0], "sharpen_radius": 2, "sigma": 1.0, "alpha": 0.5}}}},
  "5": {{"class_type": "ImageInvert", "inputs": {{"image": ["4", 0]}}}},
  "6": {{"class_type": "SaveImage", "inputs": {{"images": ["5", 0], "filename_prefix": "{prefix}"}}}}
}}"#
    )
}

/// Plan options with a limit and no headroom (the limit is the budget).
fn limited(limit: u64, workers: usize) -> PlanOptions {
    PlanOptions {
        limit: Some(Bytes(limit)),
        workers,
        ..PlanOptions::default()
    }
}

/// Milliseconds into the run (from `lifecycle: running`) of the first event that `pred` holds
/// for, and the run's length (to its last event).
fn when(out: &nova_tests::Outcome, pred: impl Fn(&EventKind) -> bool) -> (f64, f64) {
    let start = out
        .events
        .iter()
        .find(|e| {
            matches!(
                e.kind,
                EventKind::Lifecycle {
                    state: Lifecycle::Running,
                    node: None
                }
            )
        })
        .expect("the run started")
        .t_ms;
    let end = out.events.last().expect("events").t_ms;
    let at = out
        .events
        .iter()
        .find(|e| pred(&e.kind))
        .expect("the event happened")
        .t_ms;
    (at - start, end - start)
}

#[test]
fn a_2048_chain_to_4096_runs_under_64_mib_and_its_first_tile_comes_early() {
    let job = Job::new(8, 8);
    write_card_png(&job.env.input_dir.join("big.png"), 2048, 2048);
    let limit = 64u64 << 20;
    let streamed = run_planned(
        &chain("streamed"),
        &job.env,
        &limited(limit, 2),
        Some(Bytes(limit)),
        |_| false,
    );
    let plan = &streamed.plan;
    assert!(plan.fits, "the chain must fit 64 MiB: {:#?}", plan.units);
    // One region: the PNG read band by band, four stages, the PNG written band by band.
    let region = plan
        .units
        .iter()
        .find(|u| u.kind == UnitKind::Pipeline)
        .expect("a region");
    assert_eq!(region.nodes.len(), 4);
    assert!(region.source.is_some() && region.sink.is_some());
    let report = streamed.result.as_ref().expect("the chain runs");
    assert!(
        report.tracked_peak_bytes <= limit,
        "tracked {} over the {limit} budget",
        report.tracked_peak_bytes
    );
    // The last node's first finished tile, as a share of the run.
    let (first, total) = when(
        &streamed,
        |k| matches!(k, EventKind::Chunk { node, .. } if node == "6"),
    );
    assert!(
        first < 0.4 * total,
        "the first tile of the last node came at {first:.0} of {total:.0} ms"
    );
    // Pixel for pixel the node-by-node run (every node whole, no limit).
    let whole = run_workflow(&chain("whole"), &job.env, None, 2);
    assert!(whole.plan.nodes.iter().all(|n| n.mode == ExecMode::Atomic));
    let a = png_samples(&job.output(&reported_files(report, "6")[0]));
    let b = png_samples(&job.output(&reported_files(whole.result.as_ref().unwrap(), "6")[0]));
    assert_eq!((a.0, a.1), (4096, 4096));
    assert_eq!((a.0, a.1), (b.0, b.1));
    let differ = a.2.iter().zip(&b.2).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} samples differ from the untiled run");
}

#[test]
fn a_4096_blur_and_lanczos_scale_runs_under_96_mib_equal_to_the_untiled_run() {
    let job = Job::new(8, 8);
    write_card_png(&job.env.input_dir.join("big.png"), 4096, 4096);
    let wf = |prefix: &str| {
        format!(
            r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "big.png"}}}},
  "2": {{"class_type": "ImageBlur", "inputs": {{"image": ["1", 0], "blur_radius": 7, "sigma": 1.0}}}},
  "3": {{"class_type": "ImageScaleBy", "inputs": {{"image": ["2", 0], "upscale_method": "lanczos", "scale_by": 1.5}}}},
  "4": {{"class_type": "SaveImage", "inputs": {{"images": ["3", 0], "filename_prefix": "{prefix}"}}}}
}}"#
        )
    };
    let limit = 96u64 << 20;
    let streamed = run_planned(
        &wf("streamed"),
        &job.env,
        &limited(limit, 2),
        Some(Bytes(limit)),
        |_| false,
    );
    assert!(streamed.plan.fits);
    let report = streamed
        .result
        .as_ref()
        .expect("the chain runs under 96 MiB");
    assert!(report.tracked_peak_bytes <= limit);
    let whole = run_workflow(&wf("whole"), &job.env, None, 2);
    let a = png_samples(&job.output(&reported_files(report, "4")[0]));
    let b = png_samples(&job.output(&reported_files(whole.result.as_ref().unwrap(), "4")[0]));
    assert_eq!((a.0, a.1), (6144, 6144));
    let differ = a.2.iter().zip(&b.2).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} samples differ from the untiled run");
}

/// Load, blur, scale, save: a 4-node chain.
fn four(prefix: &str) -> String {
    format!(
        r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
  "2": {{"class_type": "ImageBlur", "inputs": {{"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}}}},
  "3": {{"class_type": "ImageScaleBy", "inputs": {{"image": ["2", 0], "upscale_method": "lanczos", "scale_by": 1.3}}}},
  "4": {{"class_type": "SaveImage", "inputs": {{"images": ["3", 0], "filename_prefix": "{prefix}"}}}}
}}"#
    )
}

#[test]
fn a_four_node_chain_gives_the_same_pixels_on_any_worker_count_and_tile_size() {
    let job = Job::new(150, 110);
    let reference = {
        let out = run_workflow(&four("ref"), &job.env, None, 1);
        png_samples(&job.output(&reported_files(out.result.as_ref().unwrap(), "4")[0]))
    };
    for workers in [1, 2, 4] {
        for tile in [16, 32, 64, 128, 256] {
            let prefix = format!("w{workers}t{tile}");
            let out = run_workflow(&four(&prefix), &job.env, Some(tile), workers);
            let report = out.result.as_ref().expect("runs");
            let got = png_samples(&job.output(&reported_files(report, "4")[0]));
            assert_eq!(got, reference, "{workers} workers, {tile} px tiles");
        }
    }
}

/// Two branches that share nothing: each loads, blurs and saves its own image.
fn branches() -> String {
    r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "a"}},
  "11": {"class_type": "LoadImage", "inputs": {"image": "other.png"}},
  "12": {"class_type": "ImageBlur", "inputs": {"image": ["11", 0], "blur_radius": 3, "sigma": 1.0}},
  "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "b"}}
}"#
    .to_string()
}

/// The span of a node: the positions of its start and end events.
fn span(out: &nova_tests::Outcome, id: &str) -> (usize, usize) {
    let pos = |f: &dyn Fn(&EventKind) -> bool| out.events.iter().position(|e| f(&e.kind)).unwrap();
    (
        pos(&|k| matches!(k, EventKind::NodeStart { node, .. } if node == id)),
        pos(&|k| matches!(k, EventKind::NodeEnd { node, .. } if node == id)),
    )
}

#[test]
fn independent_branches_run_at_once_when_they_fit_together_and_in_turn_when_not() {
    let job = Job::new(400, 300);
    write_card_png(&job.env.input_dir.join("other.png"), 300, 400);
    let probe = run_planned(
        &branches(),
        &job.env,
        &limited(u64::MAX / 4, 2),
        None,
        |_| false,
    );
    let p = &probe.plan;
    let regions: Vec<_> = p
        .units
        .iter()
        .filter(|u| u.kind == UnitKind::Pipeline)
        .collect();
    assert_eq!(regions.len(), 2);
    // A budget for both at once: one wave, and the blurs' spans overlap.
    let both: u64 = regions.iter().map(|u| u.working_bytes).sum();
    let together = run_planned(
        &branches(),
        &job.env,
        &limited(both, 2),
        Some(Bytes(both)),
        |_| false,
    );
    assert_eq!(together.plan.waves, 1, "{:#?}", together.plan.units);
    let report = together.result.as_ref().expect("both run");
    assert!(report.tracked_peak_bytes <= both);
    let (a, b) = (span(&together, "2"), span(&together, "12"));
    assert!(a.0 < b.1 && b.0 < a.1, "spans {a:?} and {b:?} overlap");
    // A budget for one at a time: two waves, one branch after the other, both finish.
    let one = regions.iter().map(|u| u.working_bytes).max().unwrap() + 1024;
    assert!(one < both);
    let apart = run_planned(
        &branches(),
        &job.env,
        &limited(one, 2),
        Some(Bytes(one)),
        |_| false,
    );
    assert_eq!(apart.plan.waves, 2, "{:#?}", apart.plan.units);
    let report = apart.result.as_ref().expect("both run in turn");
    assert!(report.tracked_peak_bytes <= one);
    let (a, b) = (span(&apart, "2"), span(&apart, "12"));
    assert!(
        a.1 < b.0 || b.1 < a.0,
        "spans {a:?} and {b:?} do not overlap"
    );
    assert_eq!(report.outputs.len(), 2);
}

/// An H.264 clip of `frames` frames of `w` x `h` at 24 fps: a moving gradient.
fn clip(path: &std::path::Path, frames: usize, (w, h): (usize, usize)) {
    use nova_media::video::{EncodeOptions, Rational, VideoCodec, VideoWriter};
    let opts = EncodeOptions::new(
        VideoCodec::H264,
        w as u32,
        h as u32,
        Rational { num: 24, den: 1 },
    );
    let mut wr = VideoWriter::create(path, &opts).expect("create clip");
    for i in 0..frames {
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(&[
                    ((x + 4 * i) % 256) as u8,
                    ((y + 2 * i) % 256) as u8,
                    ((x + y + i) % 256) as u8,
                ]);
            }
        }
        wr.write_frame(&rgb, i as f64 / 24.0).expect("write frame");
    }
    wr.finish().expect("finish clip");
}

/// ComfyUI's way to filter a video: its components, the frames scaled, a video again, saved
/// losslessly so outputs can be compared exactly.
fn comfy_video(file: &str, prefix: &str) -> String {
    format!(
        r#"{{
  "1": {{"class_type": "LoadVideo", "inputs": {{"file": "{file}"}}}},
  "2": {{"class_type": "GetVideoComponents", "inputs": {{"video": ["1", 0]}}}},
  "3": {{"class_type": "ImageScaleBy", "inputs": {{"image": ["2", 0], "upscale_method": "lanczos", "scale_by": 2.0}}}},
  "4": {{"class_type": "CreateVideo", "inputs": {{"images": ["3", 0], "fps": 24.0}}}},
  "5": {{"class_type": "SaveVideo", "inputs": {{"video": ["4", 0], "filename_prefix": "{prefix}", "format": "mkv", "codec": "ffv1"}}}}
}}"#
    )
}

/// Every frame of a saved video, as 8-bit RGB.
fn frames_of(path: &std::path::Path) -> Vec<Vec<u8>> {
    let mut r = nova_media::video::VideoReader::open(path).expect("open output");
    let mut v = Vec::new();
    while let Some(f) = r.next_frame().expect("decode output") {
        v.push(f.rgb.to_vec());
    }
    v
}

#[test]
fn comfyui_s_video_filter_streams_in_memory_that_does_not_grow_with_the_clip() {
    // The issue's case is 720p; CI runs it at 320x180 (the same windows, a sixteenth of the
    // pixels, minutes less on two cores). NOVA_STREAMING_720P=1 runs it at 1280x720.
    let size = if std::env::var_os("NOVA_STREAMING_720P").is_some() {
        (1280, 720)
    } else {
        (320, 180)
    };
    // The temporal cache keeps processed windows in whatever memory the plan leaves spare (up
    // to 512 MiB), for re-runs of the same clip; it fills with the clip by design. Measured
    // here is what the run needs, so it is off (this test binary touches no other video).
    std::env::set_var("NOVA_TEMPORAL_CACHE_MB", "0");
    let job = Job::new(8, 8);
    clip(&job.env.input_dir.join("short.mp4"), 60, size);
    clip(&job.env.input_dir.join("long.mp4"), 300, size);
    let limit = 1u64 << 30;
    let short = run_planned_lean(
        &comfy_video("short.mp4", "short"),
        &job.env,
        &limited(limit, 2),
        Some(Bytes(limit)),
    );
    let long = run_planned_lean(
        &comfy_video("long.mp4", "long"),
        &job.env,
        &limited(limit, 2),
        Some(Bytes(limit)),
    );
    for out in [&short, &long] {
        assert!(out.plan.fits);
        // The batch is handed on as the video: the scale runs per frame, in windows.
        let get = out.plan.nodes.iter().position(|n| n.node == "2").unwrap();
        assert!(matches!(
            out.plan.nodes[get].outputs[0],
            nova_dataflow::ValueInfo::Video(_)
        ));
        let save = out.plan.nodes.iter().find(|n| n.node == "5").unwrap();
        assert_eq!(save.mode, ExecMode::Streamed);
        assert!(save.chunks.len() > 1, "{} windows", save.chunks.len());
    }
    let (s, l) = (
        short.result.as_ref().expect("60 frames run"),
        long.result.as_ref().expect("300 frames run"),
    );
    assert!(s.tracked_peak_bytes <= limit && l.tracked_peak_bytes <= limit);
    eprintln!(
        "{}x{}: tracked peak 60 frames {} B, 300 frames {} B",
        size.0, size.1, s.tracked_peak_bytes, l.tracked_peak_bytes
    );
    assert!(
        (l.tracked_peak_bytes as f64) <= s.tracked_peak_bytes as f64 * 1.1,
        "the peak grew with the clip: {} at 60 frames, {} at 300",
        s.tracked_peak_bytes,
        l.tracked_peak_bytes
    );
    // The frames equal the unbudgeted run's (every frame in one window: ComfyUI's whole IMAGE
    // batch). At 720p that run of the long clip needs about 17 GiB of host memory (300 frames
    // in and 2560x1440 out, as f32), more than a CI machine has: there the short clip is
    // compared with its unbudgeted run, and the long clip with a run under 4 GiB (other
    // window sizes).
    let file = |r: &nova_dataflow::RunReport| {
        r.outputs["5"]["images"][0]["filename"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let large = size.0 * size.1 > 320 * 180;
    let pairs = if large {
        vec![
            (&long, "long.mp4", 300, Some(4u64 << 30)),
            (&short, "short.mp4", 60, None),
        ]
    } else {
        vec![(&long, "long.mp4", 300usize, None)]
    };
    for (budgeted, input, frames, other) in pairs {
        let prefix = format!("free_{frames}");
        let opts = match other {
            Some(l) => limited(l, 2),
            None => PlanOptions {
                workers: 2,
                ..PlanOptions::default()
            },
        };
        let free = run_planned_lean(
            &comfy_video(input, &prefix),
            &job.env,
            &opts,
            other.map(Bytes),
        );
        let windows = |o: &nova_tests::Outcome| {
            o.plan
                .nodes
                .iter()
                .find(|n| n.node == "5")
                .unwrap()
                .chunks
                .len()
        };
        let a = frames_of(&job.output(&file(budgeted.result.as_ref().unwrap())));
        let b = frames_of(&job.output(&file(free.result.as_ref().expect("comparison run"))));
        assert_eq!(a.len(), frames);
        assert_eq!(a.len(), b.len());
        assert!(
            a == b,
            "{input}: the frames in {} windows differ from those in {}",
            windows(budgeted),
            windows(&free)
        );
    }
}
