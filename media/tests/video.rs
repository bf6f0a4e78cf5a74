//! Video round trips through `VideoWriter` and `VideoReader`, checked against the source
//! frames (PSNR computed here) and against ffprobe/ffmpeg as independent readers; and the
//! typed errors bad files and bad calls give.

mod common;

use common::{ffmpeg_decode_rgb, ffprobe_field, pattern, psnr, run_tool};
use nova_media::audio::AudioReader;
use nova_media::video::{self, EncodeOptions, Rational, VideoCodec, VideoReader, VideoWriter};
use nova_media::MediaError;
use std::path::Path;

const W: u32 = 128;
const H: u32 = 96;

/// Encodes `n` pattern frames at `fps` (pts = i / fps).
fn encode(path: &Path, opts: &EncodeOptions, n: u32) -> Vec<Vec<u8>> {
    let mut w = VideoWriter::create(path, opts).unwrap();
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| pattern(i, opts.width, opts.height))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        w.write_frame(f, i as f64 * opts.fps.den as f64 / opts.fps.num as f64)
            .unwrap();
    }
    w.finish().unwrap();
    frames
}

fn decode_all(path: &Path) -> Vec<video::Frame> {
    let mut r = VideoReader::open(path).unwrap();
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        out.push(f);
    }
    // End of stream stays the end.
    assert!(r.next_frame().unwrap().is_none());
    out
}

#[test]
fn h264_mp4_round_trip_keeps_count_timing_and_picture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.mp4");
    let fps = Rational::new(24, 1);
    let mut opts = EncodeOptions::new(VideoCodec::H264, W, H, fps);
    opts.crf = Some(20);
    opts.preset = Some("veryfast".into());
    let src = encode(&path, &opts, 24);

    let info = video::probe(&path).unwrap();
    eprintln!("probe: {info:?}");
    assert_eq!((info.width, info.height), (W, H));
    assert_eq!(info.fps, fps);
    assert_eq!(info.frames, Some(24));
    assert_eq!(info.codec, "h264");
    assert!(info.audio.is_none());
    let dur = info.duration_s.expect("mp4 states a duration");
    assert!((dur - 1.0).abs() < 0.05, "duration {dur}");

    let frames = decode_all(&path);
    assert_eq!(frames.len(), 24);
    let mut worst = f64::INFINITY;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.index, i as u64);
        assert_eq!(
            (f.width, f.height, f.rgb.len()),
            (W, H, (W * H * 3) as usize)
        );
        let want = i as f64 / 24.0;
        assert!(
            (f.pts_s - want).abs() < 1e-3,
            "frame {i}: pts {} s, want {want} s",
            f.pts_s
        );
        worst = worst.min(psnr(&src[i], &f.rgb));
    }
    eprintln!("h264 crf 20: worst frame PSNR vs source {worst:.2} dB");
    assert!(worst > 30.0, "worst PSNR {worst:.2} dB");

    // ffprobe, decoding every frame itself, agrees on the count and the codec.
    let out = run_tool(
        "ffprobe",
        &[
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=codec_name,nb_read_frames,width,height,color_space",
            "-of",
            "default=noprint_wrappers=1",
            path.to_str().unwrap(),
        ],
    );
    eprintln!("ffprobe: {}", out.replace('\n', " "));
    assert_eq!(ffprobe_field(&out, "codec_name").as_deref(), Some("h264"));
    assert_eq!(ffprobe_field(&out, "nb_read_frames").as_deref(), Some("24"));
    assert_eq!(ffprobe_field(&out, "width").as_deref(), Some("128"));
    assert_eq!(ffprobe_field(&out, "color_space").as_deref(), Some("bt709"));

    // ffmpeg's own decoder and colour conversion (matrix taken from the stream's tags) see
    // the same picture we do: a BT.601/BT.709 mix-up costs about 8 dB here.
    let peer = ffmpeg_decode_rgb(&path, W, H);
    assert_eq!(peer.len(), 24);
    let peer_worst = peer
        .iter()
        .zip(&src)
        .map(|(a, b)| psnr(a, b))
        .fold(f64::INFINITY, f64::min);
    eprintln!("h264: worst frame PSNR of ffmpeg's decode vs source {peer_worst:.2} dB");
    assert!(peer_worst > 30.0, "ffmpeg decode PSNR {peer_worst:.2} dB");
    assert!(
        (peer_worst - worst).abs() < 1.0,
        "ffmpeg {peer_worst:.2} dB vs ours {worst:.2} dB"
    );
}

#[test]
fn every_available_codec_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let fps = Rational::new(25, 1);
    let mut available = Vec::new();
    for codec in VideoCodec::ALL {
        eprintln!(
            "{:>6}: encoder {}",
            codec.name(),
            codec.encoder_name().unwrap_or("(none)")
        );
        if codec.encoder_available() {
            available.push(codec);
        }
    }
    assert!(
        VideoCodec::H264.encoder_available(),
        "Debian's libavcodec has libx264; H.264 must be available"
    );
    for codec in available {
        let path = dir
            .path()
            .join(format!("c_{}.{}", codec.name(), codec.default_container()));
        let mut opts = EncodeOptions::new(codec, W, H, fps);
        opts.threads = Some(2);
        let src = encode(&path, &opts, 6);
        let info = video::probe(&path).unwrap();
        assert_eq!(info.codec, codec.name(), "{path:?}");
        assert_eq!((info.width, info.height), (W, H));
        let frames = decode_all(&path);
        assert_eq!(frames.len(), 6, "{}", codec.name());
        let mut worst = f64::INFINITY;
        for (i, f) in frames.iter().enumerate() {
            assert!(
                (f.pts_s - i as f64 / 25.0).abs() < 1e-3,
                "{} frame {i}: pts {}",
                codec.name(),
                f.pts_s
            );
            worst = worst.min(psnr(&src[i], &f.rgb));
        }
        let size = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "{:>6} in .{}: 6 frames, {size} bytes, worst PSNR {worst:.2} dB",
            codec.name(),
            codec.default_container()
        );
        assert!(worst > 28.0, "{}: worst PSNR {worst:.2} dB", codec.name());
        if codec == VideoCodec::Ffv1 {
            assert_eq!(worst, f64::INFINITY, "FFV1 stores RGB losslessly");
        }
    }
}

#[test]
fn video_with_audio_track_round_trips_both() {
    let dir = tempfile::tempdir().unwrap();
    // AAC in MP4, and Opus in WebM (VP9 video) where libvpx is present.
    let mut cases = vec![("av.mp4", VideoCodec::H264)];
    if VideoCodec::Vp9.encoder_available() {
        cases.push(("av.webm", VideoCodec::Vp9));
    }
    for (name, codec) in cases {
        let path = dir.path().join(name);
        let spec = nova_media::audio::AudioSpec {
            sample_rate: 48_000,
            channels: 2,
        };
        let fps = Rational::new(24, 1);
        let opts = EncodeOptions::new(codec, W, H, fps);
        let mut w = VideoWriter::with_audio(&path, &opts, spec).unwrap();
        let left = common::sine(440.0, 48_000, 48_000, 0.5, 0.0);
        let right = common::sine(440.0, 48_000, 48_000, 0.25, 1.0);
        // Interleave as a generator would: one frame, then that frame's 2000 samples (in two
        // uneven pieces, to exercise the writer's buffering to the encoder's frame size).
        for i in 0..24u32 {
            w.write_frame(&pattern(i, W, H), f64::from(i) / 24.0)
                .unwrap();
            let s = (i * 2000) as usize;
            for (a, b) in [(s, s + 700), (s + 700, s + 2000)] {
                w.write_audio(&[left[a..b].to_vec(), right[a..b].to_vec()])
                    .unwrap();
            }
        }
        w.finish().unwrap();

        let info = video::probe(&path).unwrap();
        assert_eq!(info.audio, Some(spec), "{name}");
        assert_eq!(decode_all(&path).len(), 24, "{name}");

        let mut r = AudioReader::open(&path).unwrap();
        assert_eq!(r.spec(), spec);
        let mut got = [Vec::new(), Vec::new()];
        loop {
            let chunk = r.read(4096).unwrap();
            if chunk[0].is_empty() {
                break;
            }
            for (g, c) in got.iter_mut().zip(chunk) {
                g.extend(c);
            }
        }
        // A sine repeats every 109 samples, so the search stays within half a period: the
        // track must come back aligned (encoder priming trimmed by the container), not merely
        // similar somewhere.
        let (corr_l, lag_l) = common::best_correlation(&left, &got[0], 50);
        let (corr_r, lag_r) = common::best_correlation(&right, &got[1], 50);
        let f = common::dominant_frequency(&got[0][12_000..36_000], 48_000, 300, 600);
        eprintln!(
            "{name}: {} audio frames back (48000 written); L corr {corr_l:.4} at lag {lag_l}, \
             R corr {corr_r:.4} at lag {lag_r}; dominant {f} Hz",
            got[0].len()
        );
        assert!(
            (got[0].len() as i64 - 48_000).abs() <= 2048,
            "{name}: {} frames",
            got[0].len()
        );
        assert!(
            corr_l > 0.9 && corr_r > 0.9,
            "{name}: correlations {corr_l} {corr_r}"
        );
        assert!(
            lag_l.abs() <= 2 && lag_r.abs() <= 2,
            "{name}: lags {lag_l} {lag_r}"
        );
        assert!(
            (439..=441).contains(&f),
            "{name}: dominant frequency {f} Hz"
        );
    }
}

/// Decodes until the end or an error; returns the frames decoded and the error, if any.
fn decode_until_error(path: &Path) -> Result<(usize, Option<MediaError>), MediaError> {
    let mut r = VideoReader::open(path)?;
    let mut n = 0;
    loop {
        match r.next_frame() {
            Ok(Some(_)) => n += 1,
            Ok(None) => return Ok((n, None)),
            Err(e) => {
                // After an error the reader is finished, not stuck.
                assert!(r.next_frame().unwrap().is_none());
                return Ok((n, Some(e)));
            }
        }
    }
}

#[test]
fn truncated_files_are_an_error_or_a_shorter_stream() {
    let dir = tempfile::tempdir().unwrap();
    let opts = EncodeOptions::new(VideoCodec::H264, W, H, Rational::new(24, 1));
    // MP4 keeps its index (moov) at the end, so half a file cannot even be opened; Matroska
    // is written front to back, so half a file decodes until the data runs out.
    for (name, full_frames) in [("full.mp4", 24), ("full.mkv", 24)] {
        let path = dir.path().join(name);
        encode(&path, &opts, full_frames);
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join(format!("cut_{name}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        match decode_until_error(&cut) {
            Err(e) => {
                eprintln!("half {name}: open fails: {e}");
                assert!(e.to_string().contains("cut_"), "{e}");
            }
            Ok((n, err)) => {
                eprintln!("half {name}: {n} of {full_frames} frames, then {err:?}");
                assert!(n < full_frames as usize);
                if let Some(e) = err {
                    assert!(e.to_string().contains("cut_"), "{e}");
                }
            }
        }
    }
}

#[test]
fn bad_files_are_typed_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();

    let garbage = dir.path().join("garbage.mp4");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, bytes).unwrap();
    let e = VideoReader::open(&garbage)
        .err()
        .expect("garbage must not open");
    eprintln!("garbage: {e}");
    assert!(e.path().ends_with("garbage.mp4"), "{e}");
    assert!(e.to_string().contains("garbage.mp4"));
    assert!(video::probe(&garbage).is_err());

    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let e = VideoReader::open(&empty)
        .err()
        .expect("an empty file must not open");
    eprintln!("empty: {e}");
    assert!(
        matches!(e, MediaError::Empty { .. } | MediaError::Open { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("empty.mp4"));

    let missing = dir.path().join("missing.mp4");
    let e = VideoReader::open(&missing)
        .err()
        .expect("a missing file must not open");
    assert!(
        matches!(e, MediaError::Open { ref path, .. } if path.ends_with("missing.mp4")),
        "{e}"
    );

    // An audio-only file has no video stream.
    let wav = dir.path().join("tone.wav");
    let spec = nova_media::audio::AudioSpec {
        sample_rate: 8000,
        channels: 1,
    };
    let mut ww =
        nova_media::audio::WavWriter::create(&wav, spec, nova_media::audio::SampleFormat::I16)
            .unwrap();
    ww.write(&[common::sine(440.0, 8000, 800, 0.5, 0.0)])
        .unwrap();
    ww.finish().unwrap();
    let e = VideoReader::open(&wav).err().expect("a WAV has no video");
    assert!(matches!(e, MediaError::NoStream { .. }), "{e}");

    // A video without audio, read for audio.
    let silent = dir.path().join("silent.mp4");
    encode(
        &silent,
        &EncodeOptions::new(VideoCodec::H264, W, H, Rational::new(24, 1)),
        2,
    );
    let e = AudioReader::open(&silent).err().expect("no audio stream");
    assert!(matches!(e, MediaError::NoStream { .. }), "{e}");
}

#[test]
fn bad_writes_are_refused_and_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let fps = Rational::new(24, 1);
    let opts = EncodeOptions::new(VideoCodec::H264, W, H, fps);

    let avi = dir.path().join("x.avi");
    let e = VideoWriter::create(&avi, &opts)
        .err()
        .expect(".avi is not offered");
    assert!(matches!(e, MediaError::Unsupported { .. }), "{e}");

    let odd = EncodeOptions::new(VideoCodec::H264, 127, 96, fps);
    let e = VideoWriter::create(&dir.path().join("odd.mp4"), &odd)
        .err()
        .expect("odd width");
    eprintln!("odd size: {e}");
    assert!(matches!(e, MediaError::Unsupported { .. }), "{e}");

    let mut bad_preset = opts.clone();
    bad_preset.preset = Some("warp-speed".into());
    let e = VideoWriter::create(&dir.path().join("p.mp4"), &bad_preset)
        .err()
        .expect("bad preset");
    eprintln!("bad preset: {e}");
    assert!(matches!(e, MediaError::Unsupported { .. }), "{e}");

    if VideoCodec::Ffv1.encoder_available() {
        let mut ffv1 = EncodeOptions::new(VideoCodec::Ffv1, W, H, fps);
        ffv1.crf = Some(10);
        let e = VideoWriter::create(&dir.path().join("f.mkv"), &ffv1)
            .err()
            .expect("ffv1 crf");
        assert!(matches!(e, MediaError::Unsupported { .. }), "{e}");
    }
    if VideoCodec::ProRes.encoder_available() {
        let prores = EncodeOptions::new(VideoCodec::ProRes, W, H, fps);
        let e = VideoWriter::create(&dir.path().join("pr.mp4"), &prores)
            .err()
            .expect("prores in mp4");
        eprintln!("prores in mp4: {e}");
        assert!(matches!(e, MediaError::Unsupported { .. }), "{e}");
    }

    let path = dir.path().join("w.mp4");
    let mut w = VideoWriter::create(&path, &opts).unwrap();
    let e = w.write_frame(&[0u8; 10], 0.0).unwrap_err();
    assert!(matches!(e, MediaError::Mismatch { .. }), "{e}");
    w.write_frame(&pattern(0, W, H), 0.0).unwrap();
    let e = w.write_frame(&pattern(1, W, H), 0.0).unwrap_err();
    eprintln!("repeated pts: {e}");
    assert!(matches!(e, MediaError::Mismatch { .. }), "{e}");
    let e = w.write_audio(&[vec![0.0; 100]]).unwrap_err();
    assert!(matches!(e, MediaError::Mismatch { .. }), "{e}");
    drop(w);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a dropped writer leaves nothing behind"
    );

    let w = VideoWriter::create(&path, &opts).unwrap();
    let e = w.finish().unwrap_err();
    assert!(matches!(e, MediaError::Empty { .. }), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn timestamps_are_kept_not_renumbered() {
    // Variable frame timing survives the round trip: the writer keeps each frame's pts.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vfr.mkv");
    let opts = EncodeOptions::new(VideoCodec::H264, W, H, Rational::new(30, 1));
    let times = [0.0, 0.033, 0.1, 0.5, 0.52, 1.25];
    let mut w = VideoWriter::create(&path, &opts).unwrap();
    for (i, t) in times.iter().enumerate() {
        w.write_frame(&pattern(i as u32, W, H), *t).unwrap();
    }
    w.finish().unwrap();
    let frames = decode_all(&path);
    let got: Vec<f64> = frames.iter().map(|f| f.pts_s).collect();
    eprintln!("vfr mkv pts: {got:?}");
    assert_eq!(got.len(), times.len());
    for (g, t) in got.iter().zip(times) {
        // Matroska stores milliseconds.
        assert!((g - t).abs() <= 0.0015, "pts {g} for {t}");
    }
}
