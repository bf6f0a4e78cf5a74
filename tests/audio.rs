//! Audio through the engine: LoadAudio → operators → SaveAudio streams in chunks, chunked
//! processing of linear operators equals whole-signal processing, memory does not depend on
//! the length of the audio, partial chunks are announced in order, and bad input is refused
//! naming the file or input.

use nova_dataflow::{EventKind, PlanOptions};
use nova_media::audio::{AudioSpec, SampleFormat, WavReader, WavWriter};
use nova_tests::{options, run_planned, run_workflow, Job};
use std::path::Path;

/// A stereo test signal: two tones and a deterministic rattle, left and right different.
fn signal(rate: u32, frames: usize) -> Vec<Vec<f32>> {
    signal_range(rate, 0, frames)
}

/// Frames `[start, start + n)` of [`signal`].
fn signal_range(rate: u32, start: usize, n: usize) -> Vec<Vec<f32>> {
    let frames = start + n;
    let tone = |f: f32, i: usize| {
        let phase = (f as f64 * i as f64 / rate as f64).fract();
        (2.0 * std::f64::consts::PI * phase).sin() as f32
    };
    let left = (start..frames)
        .map(|i| 0.4 * tone(440.0, i) + 0.2 * tone(5000.0, i) + ((i * 7919) % 97) as f32 / 970.0)
        .collect();
    let right = (start..frames)
        .map(|i| 0.3 * tone(660.0, i) - 0.1 * tone(9000.0, i))
        .collect();
    vec![left, right]
}

/// Writes `frames` of [`signal`] to a WAV in chunks (never the whole signal in memory).
fn write_wav(path: &Path, rate: u32, frames: usize, format: SampleFormat) {
    let mut w = WavWriter::create(
        path,
        AudioSpec {
            sample_rate: rate,
            channels: 2,
        },
        format,
    )
    .expect("create wav");
    let chunk = 1 << 16;
    let mut at = 0;
    while at < frames {
        let n = chunk.min(frames - at);
        w.write(&signal_range(rate, at, n)).expect("write wav");
        at += n;
    }
    w.finish().expect("finish wav");
}

fn read_wav(path: &Path) -> Vec<Vec<f32>> {
    let mut r = WavReader::open(path).expect("open output wav");
    let n = r.len_frames() as usize;
    let out = r.read(n).expect("read output wav");
    assert_eq!(out[0].len(), n);
    out
}

fn output_file(report: &nova_dataflow::RunReport, node: &str) -> String {
    report.outputs[node]["audio"][0]["filename"]
        .as_str()
        .expect("audio filename")
        .to_string()
}

#[test]
fn chunked_biquad_and_gain_equal_whole_signal_processing() {
    let job = Job::new(8, 8);
    let rate = 48_000;
    // Not a multiple of any chunk size, so the last chunk is short.
    let frames = 3 * rate as usize + 1234;
    write_wav(
        &job.env.input_dir.join("in.wav"),
        rate,
        frames,
        SampleFormat::F32,
    );
    let wf = r#"{
      "1": {"class_type": "LoadAudio", "inputs": {"audio": "in.wav"}},
      "2": {"class_type": "AudioBiquad", "inputs": {"audio": ["1", 0], "filter_type": "lowpass", "frequency": 2000.0, "q": 0.9, "gain_db": 0.0}},
      "3": {"class_type": "AudioGain", "inputs": {"audio": ["2", 0], "gain_db": -6.0}},
      "4": {"class_type": "SaveAudio", "inputs": {"audio": ["3", 0], "filename_prefix": "lp"}}
    }"#;
    let out = run_workflow(wf, &job.env, None, 2);
    let report = out.result.expect("run succeeds");
    let got = read_wav(&job.output(&output_file(&report, "4")));
    // The whole signal at once, straight from the formulas.
    let c = nova_operators::audio::biquad::coefficients("lowpass", rate as f64, 2000.0, 0.9, 0.0)
        .unwrap();
    let g = 10f64.powf(-6.0 / 20.0);
    let input = signal(rate, frames);
    let mut worst = 0f32;
    for (ch, x) in input.iter().enumerate() {
        let (mut x1, mut x2, mut y1, mut y2) = (0f64, 0f64, 0f64, 0f64);
        assert_eq!(got[ch].len(), frames);
        for (i, &v) in x.iter().enumerate() {
            let v = v as f64;
            let y = c[0] * v + c[1] * x1 + c[2] * x2 - c[3] * y1 - c[4] * y2;
            (x2, x1, y2, y1) = (x1, v, y1, y);
            worst = worst.max(((y * g) as f32 - got[ch][i]).abs());
        }
    }
    eprintln!("chunked biquad+gain vs whole signal: max abs error {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
    // It ran as chunks of the stream, each announced in order.
    let plan = &out.plan.nodes[3];
    assert_eq!(plan.mode, nova_dataflow::ExecMode::Streamed);
    let starts: Vec<u64> = out
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::PartialAudio { sample_start, .. } => Some(*sample_start),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), plan.chunks.len());
    assert!(starts.len() >= 4, "{}", starts.len());
    assert!(starts.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn chunked_spectral_equalizer_matches_the_whole_signal_stft() {
    let job = Job::new(8, 8);
    let rate = 16_000;
    let frames = 40_001;
    write_wav(
        &job.env.input_dir.join("in.wav"),
        rate,
        frames,
        SampleFormat::F32,
    );
    let wf = r#"{
      "1": {"class_type": "LoadAudio", "inputs": {"audio": "in.wav"}},
      "2": {"class_type": "AudioEqualizer", "inputs": {"audio": ["1", 0], "low_gain_db": 6.0, "mid_gain_db": 0.0, "high_gain_db": -12.0, "low_hz": 300.0, "high_hz": 3000.0}},
      "3": {"class_type": "SaveAudio", "inputs": {"audio": ["2", 0], "filename_prefix": "eq"}}
    }"#;
    let out = run_workflow(wf, &job.env, None, 2);
    let report = out.result.expect("run succeeds");
    let got = read_wav(&job.output(&output_file(&report, "3")));
    // The same graph pulled whole, in one call, against the streamed, chunked run.
    let registry = nova_operators::registry();
    let wf = nova_dataflow::workflow::load(wf, &registry, &job.env).unwrap();
    let ctx = nova_dataflow::ExecContext::standalone(job.env.clone(), "t");
    let loaded = wf.nodes[0]
        .node
        .execute(&wf.nodes[0].args, nova_dataflow::Inputs::new(), &ctx)
        .unwrap();
    let mut inputs = nova_dataflow::Inputs::new();
    inputs.insert("audio", loaded.values[0].clone());
    let eq = wf.nodes[1]
        .node
        .execute(&wf.nodes[1].args, inputs, &ctx)
        .unwrap();
    let stream = eq.values[0].as_audio().unwrap().clone();
    let mut p = stream.open().unwrap();
    let whole = p.pull(frames).unwrap();
    let input = signal(rate, frames);
    let (mut worst, mut change) = (0f32, 0f32);
    for ch in 0..2 {
        for i in 0..frames {
            worst = worst.max((whole[ch][i] - got[ch][i]).abs());
            change = change.max((input[ch][i] - got[ch][i]).abs());
        }
    }
    eprintln!(
        "chunked STFT equalizer vs whole pull: max abs error {worst:.2e} (change {change:.3})"
    );
    assert!(worst < 1e-5, "{worst}");
    assert!(change > 0.05, "the equalizer changed nothing: {change}");
}

#[test]
fn ten_minutes_and_ten_seconds_take_the_same_tracked_memory() {
    let job = Job::new(8, 8);
    let rate = 48_000;
    let mut peaks = Vec::new();
    for (name, seconds) in [("short.wav", 10usize), ("long.wav", 600)] {
        write_wav(
            &job.env.input_dir.join(name),
            rate,
            seconds * rate as usize,
            SampleFormat::I16,
        );
        let wf = format!(
            r#"{{
          "1": {{"class_type": "LoadAudio", "inputs": {{"audio": "{name}"}}}},
          "2": {{"class_type": "AudioBiquad", "inputs": {{"audio": ["1", 0], "filter_type": "highpass", "frequency": 80.0, "q": 0.7071, "gain_db": 0.0}}}},
          "3": {{"class_type": "AudioResample", "inputs": {{"audio": ["2", 0], "sample_rate": 44100}}}},
          "4": {{"class_type": "SaveAudio", "inputs": {{"audio": ["3", 0], "filename_prefix": "{name}"}}}}
        }}"#
        );
        let out = run_planned(
            &wf,
            &job.env,
            &PlanOptions {
                workers: 2,
                ..PlanOptions::default()
            },
            None,
            |_| false,
        );
        let report = out.result.expect("run succeeds");
        let file = job.output(&output_file(&report, "4"));
        let r = WavReader::open(&file).unwrap();
        assert_eq!(r.len_frames(), (seconds * 44_100) as u64);
        assert_eq!(r.spec().sample_rate, 44_100);
        eprintln!(
            "{seconds} s stereo at 48 kHz: tracked peak {} bytes, forecast {}",
            report.tracked_peak_bytes, out.plan.forecast_peak_bytes
        );
        peaks.push((report.tracked_peak_bytes, out.plan.forecast_peak_bytes));
        std::fs::remove_file(file).ok();
    }
    let (short, long) = (peaks[0].0 as f64, peaks[1].0 as f64);
    assert!(short > 0.0);
    assert!(
        (long - short).abs() / short <= 0.10,
        "10 s: {short}, 10 min: {long}"
    );
    assert_eq!(
        peaks[0].1, peaks[1].1,
        "the forecast must not depend on the length"
    );
}

#[test]
fn mismatched_sample_rates_are_refused_before_running_naming_the_input() {
    let job = Job::new(8, 8);
    write_wav(
        &job.env.input_dir.join("a.wav"),
        48_000,
        1000,
        SampleFormat::I16,
    );
    write_wav(
        &job.env.input_dir.join("b.wav"),
        44_100,
        1000,
        SampleFormat::I16,
    );
    let wf = r#"{
      "1": {"class_type": "LoadAudio", "inputs": {"audio": "a.wav"}},
      "2": {"class_type": "LoadAudio", "inputs": {"audio": "b.wav"}},
      "3": {"class_type": "AudioMix", "inputs": {"audio_a": ["1", 0], "audio_b": ["2", 0], "gain_a": 1.0, "gain_b": 1.0}},
      "4": {"class_type": "SaveAudio", "inputs": {"audio": ["3", 0], "filename_prefix": "mix"}}
    }"#;
    let registry = nova_operators::registry();
    let wf = nova_dataflow::workflow::load(wf, &registry, &job.env).expect("validates");
    let err = nova_dataflow::plan(&wf, &job.env, &options(None, 1)).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.node, "3");
    assert!(
        text.contains("audio_b") && text.contains("48000 Hz") && text.contains("44100 Hz"),
        "{text}"
    );
}

#[test]
fn bad_audio_files_are_refused_at_validation_naming_the_file() {
    let job = Job::new(8, 8);
    let dir = &job.env.input_dir;
    std::fs::write(dir.join("empty.wav"), b"").unwrap();
    std::fs::write(
        dir.join("garbage.wav"),
        b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk",
    )
    .unwrap();
    std::fs::write(dir.join("noise.flac"), [0x5au8; 4096]).unwrap();
    write_wav(&dir.join("silent.wav"), 8000, 0, SampleFormat::I16);
    let registry = nova_operators::registry();
    for name in ["empty.wav", "garbage.wav", "noise.flac", "silent.wav"] {
        let wf = format!(
            r#"{{"1": {{"class_type": "LoadAudio", "inputs": {{"audio": "{name}"}}}},
                 "2": {{"class_type": "SaveAudio", "inputs": {{"audio": ["1", 0], "filename_prefix": "x"}}}}}}"#
        );
        let err = nova_dataflow::workflow::load(&wf, &registry, &job.env).unwrap_err();
        let text = err.to_string();
        eprintln!("{name}: {text}");
        assert_eq!(err.errors()[0].node(), Some("1"), "{text}");
        assert!(text.contains(name), "{name}: {text}");
    }
}

#[test]
fn oscillator_through_resample_keeps_its_frequency() {
    let job = Job::new(8, 8);
    let wf = r#"{
      "1": {"class_type": "AudioOscillator", "inputs": {"waveform": "sine", "frequency": 1000.0, "amplitude": 0.5, "duration": 2.0, "sample_rate": 48000, "channels": 1}},
      "2": {"class_type": "AudioResample", "inputs": {"audio": ["1", 0], "sample_rate": 44100}},
      "3": {"class_type": "AudioFade", "inputs": {"audio": ["2", 0], "fade_in": 0.1, "fade_out": 0.1}},
      "4": {"class_type": "PreviewAudio", "inputs": {"audio": ["3", 0]}}
    }"#;
    let out = run_workflow(wf, &job.env, None, 2);
    let report = out.result.expect("run succeeds");
    let file = report.outputs["4"]["audio"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let got = read_wav(&job.env.temp_dir.join(file));
    assert_eq!(got[0].len(), 88_200);
    // Away from the fades, the analytic 1 kHz sine at 44.1 kHz.
    let mut worst = 0f32;
    for (i, v) in got[0].iter().enumerate().take(78_000).skip(10_000) {
        let want = 0.5 * (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 44_100.0).sin();
        worst = worst.max((want - v).abs());
    }
    eprintln!("oscillator 48k -> 44.1k: max abs error vs analytic sine {worst:.2e}");
    assert!(worst < 2e-3, "{worst}");
    // The fades reach silence at both ends.
    assert!(got[0][0].abs() < 1e-6 && got[0][88_199].abs() < 1e-3);
}
