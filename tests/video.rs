//! Video through the engine: LoadVideo → image operators (run per frame) → SaveVideo streams
//! frame windows through the dataflow; windowed processing of a per-frame operator equals
//! frame-by-frame processing exactly; finished windows are announced while later ones are
//! still to be decoded; unchanged windows replay from the temporal cache; bad files are
//! refused naming the file.

use candle_core::{Device, Tensor};
use nova_dataflow::{Event, EventKind, Lifecycle};
use nova_media::audio::AudioSpec;
use nova_media::video::{EncodeOptions, Rational, VideoCodec, VideoReader, VideoWriter};
use nova_tests::{run_workflow, Job};
use std::path::Path;

const W: usize = 128;
const H: usize = 96;

/// Frame `i` of a moving test pattern, RGB24.
fn pattern(i: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(W * H * 3);
    for y in 0..H {
        for x in 0..W {
            let (xs, ys) = (x + 3 * i, y + i);
            let disc = (x as i64 - 30 - 2 * i as i64).pow(2) + (y as i64 - 40).pow(2) < 200;
            if disc {
                v.extend_from_slice(&[240, 140, 30]);
            } else {
                v.extend_from_slice(&[
                    (xs * 2 % 256) as u8,
                    (ys * 2 % 256) as u8,
                    ((xs + ys) % 256) as u8,
                ]);
            }
        }
    }
    v
}

/// Writes an H.264 clip of `frames` frames at 24 fps, with a 440 Hz tone when `audio`.
fn write_clip(path: &Path, frames: usize, audio: bool) {
    let opts = EncodeOptions::new(
        VideoCodec::H264,
        W as u32,
        H as u32,
        Rational { num: 24, den: 1 },
    );
    let mut w = if audio {
        VideoWriter::with_audio(
            path,
            &opts,
            AudioSpec {
                sample_rate: 48_000,
                channels: 2,
            },
        )
    } else {
        VideoWriter::create(path, &opts)
    }
    .expect("create clip");
    for i in 0..frames {
        w.write_frame(&pattern(i), i as f64 / 24.0)
            .expect("write frame");
        if audio {
            let tone: Vec<f32> = (i * 2000..(i + 1) * 2000)
                .map(|t| 0.3 * (2.0 * std::f32::consts::PI * 440.0 * t as f32 / 48_000.0).sin())
                .collect();
            w.write_audio(&[tone.clone(), tone]).expect("write audio");
        }
    }
    w.finish().expect("finish clip");
}

/// Every frame of a file, decoded, as `[n, h, w, 3]` in [0, 1], with the frames' times.
fn decode_all(path: &Path) -> (Tensor, Vec<f64>) {
    let mut r = VideoReader::open(path).expect("open video");
    let (mut data, mut pts, mut n) = (Vec::new(), Vec::new(), 0);
    let (mut w, mut h) = (0, 0);
    while let Some(f) = r.next_frame().expect("decode") {
        data.extend(f.rgb.iter().map(|&v| v as f32 / 255.0));
        pts.push(f.pts_s);
        (w, h) = (f.width as usize, f.height as usize);
        n += 1;
    }
    (
        Tensor::from_vec(data, (n, h, w, 3), &Device::Cpu).unwrap(),
        pts,
    )
}

fn partial_videos(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::PartialVideo { .. }))
        .collect()
}

fn invert_workflow(window: usize, prefix: &str) -> String {
    format!(
        r#"{{
      "1": {{"class_type": "LoadVideo", "inputs": {{"file": "clip.mp4"}}}},
      "2": {{"class_type": "ImageInvert", "inputs": {{"image": ["1", 0]}}}},
      "3": {{"class_type": "ImageBlur", "inputs": {{"image": ["2", 0], "blur_radius": 2, "sigma": 1.0}}}},
      "4": {{"class_type": "SaveVideo", "inputs": {{"video": ["3", 0], "filename_prefix": "{prefix}", "format": "mp4", "codec": "h264", "window": {window}}}}}
    }}"#
    )
}

#[test]
fn windowed_per_frame_chain_equals_frame_by_frame_and_streams_partials() {
    let job = Job::new(8, 8);
    let clip = job.env.input_dir.join("clip.mp4");
    write_clip(&clip, 40, true);
    let out = run_workflow(&invert_workflow(4, "inv"), &job.env, None, 2);
    let report = out.result.expect("run succeeds");
    let plan = &out.plan.nodes[3];
    assert_eq!(plan.mode, nova_dataflow::ExecMode::Streamed);
    assert_eq!(plan.chunks.len(), 10);

    // Frame by frame, straight through the image nodes' own kernels.
    let (source, source_pts) = decode_all(&clip);
    let registry = nova_operators::registry();
    let ctx = nova_dataflow::ExecContext::standalone(job.env.clone(), "t");
    let blur_args = {
        let wf =
            nova_dataflow::workflow::load(&invert_workflow(4, "x"), &registry, &job.env).unwrap();
        wf.nodes[2].args.clone()
    };
    let invert = registry.get("ImageInvert").unwrap();
    let blur = registry.get("ImageBlur").unwrap();
    let mut expected = Vec::new();
    for i in 0..40 {
        let mut inputs = nova_dataflow::Inputs::new();
        inputs.insert(
            "image",
            nova_dataflow::Value::image(source.narrow(0, i, 1).unwrap()),
        );
        let inv = invert.execute(&Default::default(), inputs, &ctx).unwrap();
        let mut inputs = nova_dataflow::Inputs::new();
        inputs.insert("image", inv.values[0].clone());
        let b = blur.execute(&blur_args, inputs, &ctx).unwrap();
        expected.push(b.values[0].as_image().unwrap().clone());
    }
    let expected = Tensor::cat(&expected, 0).unwrap();

    // The windows the dataflow announced, with their frames.
    let partials = partial_videos(&out.events);
    assert_eq!(partials.len(), 10);
    let mut frames = Vec::new();
    for (k, e) in partials.iter().enumerate() {
        let EventKind::PartialVideo {
            window,
            frame_start,
            frame_count,
            pts_start,
            ..
        } = e.kind
        else {
            unreachable!()
        };
        assert_eq!(window as usize, k);
        assert_eq!(frame_start, 4 * k as u64);
        assert_eq!(frame_count, 4);
        assert!((pts_start - source_pts[4 * k]).abs() < 1e-9);
        frames.push(e.attachment.as_ref().unwrap().as_image().unwrap().clone());
    }
    let windowed = Tensor::cat(&frames, 0).unwrap();
    let diff = (&windowed - &expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(
        diff.to_scalar::<f32>().unwrap(),
        0.0,
        "windowed differs from frame by frame"
    );

    // The first window was announced before the last was decoded.
    let EventKind::PartialVideo {
        windows_decoded,
        windows,
        ..
    } = partials[0].kind
    else {
        unreachable!()
    };
    eprintln!("first output.partial.video after {windows_decoded} of {windows} windows decoded");
    assert!(windows_decoded < windows, "{windows_decoded} of {windows}");

    // The file: every frame, times preserved, audio kept.
    let file = report.outputs["4"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let saved = job.output(&file);
    let info = nova_media::video::probe(&saved).unwrap();
    assert_eq!((info.width, info.height), (W as u32, H as u32));
    assert!(info.audio.is_some(), "the audio track was dropped");
    let (decoded, pts) = decode_all(&saved);
    assert_eq!(decoded.dims()[0], 40);
    for (a, b) in pts.iter().zip(&source_pts) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    let mse = (&decoded - &expected)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let psnr = 10.0 * (1.0 / mse as f64).log10();
    eprintln!("saved video vs frame-by-frame result: PSNR {psnr:.1} dB");
    assert!(psnr > 30.0, "{psnr}");
}

#[test]
fn unchanged_windows_replay_from_the_temporal_cache() {
    let job = Job::new(8, 8);
    write_clip(&job.env.input_dir.join("clip.mp4"), 16, false);
    let first = run_workflow(&invert_workflow(8, "a"), &job.env, None, 2);
    let second = run_workflow(&invert_workflow(8, "b"), &job.env, None, 2);
    first.result.as_ref().expect("first run");
    second.result.as_ref().expect("second run");
    let cached = |o: &nova_tests::Outcome| -> Vec<bool> {
        partial_videos(&o.events)
            .iter()
            .map(|e| match e.kind {
                EventKind::PartialVideo { cached, .. } => cached,
                _ => unreachable!(),
            })
            .collect()
    };
    assert_eq!(cached(&first), vec![false, false]);
    assert_eq!(cached(&second), vec![true, true]);
    // The replay is a phase of the save node and a share of its time.
    let replay = |o: &nova_tests::Outcome| -> (bool, f64, f64) {
        let phase = o.events.iter().any(|e| {
            matches!(
                &e.kind,
                EventKind::Lifecycle {
                    state: Lifecycle::CachedReplay,
                    node: Some(_)
                }
            )
        });
        let t = o
            .events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::Timing(t) => Some(t.clone()),
                _ => None,
            })
            .expect("a timing event");
        (phase, t.total.replay_ms, t.total.compute_ms)
    };
    let (phase, ms, _) = replay(&first);
    assert!(!phase && ms == 0.0, "first run replays nothing ({ms} ms)");
    let (phase, ms, _) = replay(&second);
    assert!(phase && ms > 0.0, "second run replays ({phase}, {ms} ms)");
    for (a, b) in partial_videos(&first.events)
        .iter()
        .zip(partial_videos(&second.events))
    {
        let (a, b) = (
            a.attachment.as_ref().unwrap(),
            b.attachment.as_ref().unwrap(),
        );
        let d = (a.as_image().unwrap() - b.as_image().unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
    // Another setting is another chain: nothing replays.
    let third = run_workflow(
        &invert_workflow(8, "c").replace("\"sigma\": 1.0", "\"sigma\": 1.5"),
        &job.env,
        None,
        2,
    );
    third.result.as_ref().expect("third run");
    assert_eq!(cached(&third), vec![false, false]);
}

#[test]
fn video_components_give_frames_audio_and_rate() {
    let job = Job::new(8, 8);
    write_clip(&job.env.input_dir.join("clip.mp4"), 12, true);
    let wf = r#"{
      "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
      "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
      "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 12.0, "audio": ["2", 1]}},
      "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "re", "format": "auto", "codec": "auto"}}
    }"#;
    let out = run_workflow(wf, &job.env, None, 2);
    let report = out.result.expect("run succeeds");
    let file = report.outputs["4"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let info = nova_media::video::probe(&job.output(&file)).unwrap();
    assert_eq!(info.fps.as_f64(), 12.0);
    let (decoded, pts) = decode_all(&job.output(&file));
    assert_eq!(decoded.dims()[0], 12);
    assert!((pts[11] - 11.0 / 12.0).abs() < 1e-3);
    assert!(info.audio.is_some());
}

#[test]
fn bad_video_files_are_refused_at_validation_naming_the_file() {
    let job = Job::new(8, 8);
    let dir = &job.env.input_dir;
    write_clip(&dir.join("good.mp4"), 24, false);
    let bytes = std::fs::read(dir.join("good.mp4")).unwrap();
    std::fs::write(dir.join("cut.mp4"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(dir.join("empty.mp4"), b"").unwrap();
    std::fs::write(dir.join("garbage.mp4"), [0x17u8; 5000]).unwrap();
    // A WAV has no video stream.
    nova_media::audio::WavWriter::create(
        &dir.join("sound.mp4"),
        AudioSpec {
            sample_rate: 8000,
            channels: 1,
        },
        nova_media::audio::SampleFormat::I16,
    )
    .and_then(|mut w| w.write(&[vec![0.1; 800]]).and_then(|_| w.finish()))
    .unwrap();
    let registry = nova_operators::registry();
    for name in ["cut.mp4", "empty.mp4", "garbage.mp4", "sound.mp4"] {
        let wf = format!(
            r#"{{"1": {{"class_type": "LoadVideo", "inputs": {{"file": "{name}"}}}},
                 "2": {{"class_type": "SaveVideo", "inputs": {{"video": ["1", 0], "filename_prefix": "x", "format": "mp4", "codec": "h264"}}}}}}"#
        );
        match nova_dataflow::workflow::load(&wf, &registry, &job.env) {
            Err(err) => {
                let text = err.to_string();
                eprintln!("{name}: {text}");
                assert_eq!(err.errors()[0].node(), Some("1"), "{text}");
                assert!(text.contains(name), "{name}: {text}");
            }
            // A cut file may still hold a readable head: then it runs on what is there, or
            // fails naming the file — never panics.
            Ok(_) if name == "cut.mp4" => {
                let out = run_workflow(&wf, &job.env, None, 2);
                if let Err(e) = out.result {
                    assert!(e.to_string().contains(name), "{e}");
                }
            }
            Ok(_) => panic!("{name} validated"),
        }
    }
}

#[test]
fn an_image_node_cannot_take_a_video_where_it_cannot_run_per_frame() {
    let job = Job::new(8, 8);
    write_clip(&job.env.input_dir.join("clip.mp4"), 4, false);
    let wf = r#"{
      "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    }"#;
    let registry = nova_operators::registry();
    let err = nova_dataflow::workflow::load(wf, &registry, &job.env).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("IMAGE") && text.contains("VIDEO"), "{text}");
    assert_eq!(err.errors()[0].node(), Some("2"));
}

#[test]
fn rife_on_a_video_doubles_the_frame_rate_and_windows_equal_the_whole_batch() {
    let job = Job::new(8, 8);
    let env = job.env.clone().with_models_dir(nova_tests::shared_models());
    write_clip(&env.input_dir.join("clip.mp4"), 4, false);
    let wf = r#"{
      "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
      "2": {"class_type": "RIFE VFI", "inputs": {"ckpt_name": "rife_hdv3.safetensors", "frames": ["1", 0], "multiplier": 2}},
      "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "rife", "format": "mp4", "codec": "h264", "window": 3}}
    }"#;
    let out = run_workflow(wf, &env, None, 2);
    let report = out.result.expect("run succeeds");
    // Windows of 3 source frames sharing one: [0, 3) and [2, 4).
    assert_eq!(out.plan.nodes[2].chunks.len(), 2);
    let file = report.outputs["3"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let info = nova_media::video::probe(&job.output(&file)).unwrap();
    assert_eq!(info.fps.as_f64(), 48.0);
    let (decoded, pts) = decode_all(&job.output(&file));
    assert_eq!(decoded.dims()[0], 7);
    assert!((pts[1] - 1.0 / 48.0).abs() < 1e-3, "{pts:?}");

    // The whole clip as one IMAGE batch through the same node.
    let (source, _) = decode_all(&env.input_dir.join("clip.mp4"));
    let registry = nova_operators::registry();
    let parsed = nova_dataflow::workflow::load(wf, &registry, &env).unwrap();
    let ctx = nova_dataflow::ExecContext::standalone(env.clone(), "2");
    let mut inputs = nova_dataflow::Inputs::new();
    inputs.insert("frames", nova_dataflow::Value::image(source));
    let whole = parsed.nodes[1]
        .node
        .execute(&parsed.nodes[1].args, inputs, &ctx)
        .unwrap();
    let whole = whole.values[0].as_image().unwrap().clone();
    assert_eq!(whole.dims()[0], 7);
    let frames: Vec<Tensor> = partial_videos(&out.events)
        .iter()
        .map(|e| e.attachment.as_ref().unwrap().as_image().unwrap().clone())
        .collect();
    let windowed = Tensor::cat(&frames, 0).unwrap();
    assert_eq!(windowed.dims()[0], 7);
    let diff = (&windowed - &whole)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("RIFE over windows vs the whole batch: max abs difference {diff:.2e}");
    assert!(diff < 1e-5, "{diff}");
}
