//! `Resampler`: exact output length, time alignment against the analytic signal, output
//! independent of how input is split, anti-aliasing, and agreement with sox's `rate -v`.

mod common;

use common::{run_tool, sine};
use nova_media::audio::{Resampler, SampleFormat, WavReader, WavWriter};

/// Resamples `input` fed in pieces of `chunk` frames (or all at once for `usize::MAX`).
fn resample(from: u32, to: u32, input: &[Vec<f32>], chunk: usize) -> Vec<Vec<f32>> {
    let mut r = Resampler::new(from, to, input.len()).unwrap();
    let mut out = vec![Vec::new(); input.len()];
    let n = input[0].len();
    let mut pos = 0;
    while pos < n {
        let end = n.min(pos.saturating_add(chunk));
        let piece: Vec<Vec<f32>> = input.iter().map(|c| c[pos..end].to_vec()).collect();
        for (o, p) in out.iter_mut().zip(r.process(&piece).unwrap()) {
            o.extend(p);
        }
        pos = end;
    }
    for (o, p) in out.iter_mut().zip(r.flush().unwrap()) {
        o.extend(p);
    }
    out
}

fn expected_len(n: usize, from: u32, to: u32) -> usize {
    ((n as u64 * u64::from(to) + u64::from(from) / 2) / u64::from(from)) as usize
}

/// Largest |got - want| over the middle of the signal (away from the start and end, where the
/// analytic sine has no silence before or after it but the resampled stream does).
fn middle_error(got: &[f32], want: &[f32], margin: usize) -> f32 {
    got[margin..got.len() - margin]
        .iter()
        .zip(&want[margin..])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn downsampling_a_sine_is_exact_in_length_and_aligned() {
    let (from, to) = (48_000, 44_100);
    let n = 2 * from as usize + 123;
    let input = vec![sine(1000.0, from, n, 0.8, 0.3)];
    let out = resample(from, to, &input, usize::MAX);
    let want_len = expected_len(n, from, to);
    assert_eq!(want_len, (n as f64 * 441.0 / 480.0).round() as usize);
    assert_eq!(out[0].len(), want_len);
    // The same sine, sampled at 44.1 kHz from the same start: frequency and phase preserved.
    let analytic = sine(1000.0, to, want_len, 0.8, 0.3);
    let err = middle_error(&out[0], &analytic, 2000);
    eprintln!(
        "48k->44.1k, 1 kHz sine: {} frames (expected {want_len}), max abs error {err:.2e}",
        out[0].len()
    );
    // 1e-3 would allow a time offset of 0.01 sample; 2e-5 holds alignment to 1e-4 sample
    // (about f32 rounding), which catches rubato's uncorrected 1/256-sample table offset.
    assert!(err < 2e-5, "max abs error {err}");
}

#[test]
fn upsampling_stereo_is_exact_in_length_and_aligned() {
    let (from, to) = (44_100, 48_000);
    let n = 44_100 + 7;
    let input = vec![
        sine(1000.0, from, n, 0.5, 0.0),
        sine(3000.0, from, n, 0.4, 1.0),
    ];
    let out = resample(from, to, &input, 1000);
    let want_len = expected_len(n, from, to);
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].len(), out[1].len()), (want_len, want_len));
    let errs = [
        middle_error(&out[0], &sine(1000.0, to, want_len, 0.5, 0.0), 2000),
        middle_error(&out[1], &sine(3000.0, to, want_len, 0.4, 1.0), 2000),
    ];
    eprintln!(
        "44.1k->48k stereo: max abs errors {:.2e} (1 kHz), {:.2e} (3 kHz)",
        errs[0], errs[1]
    );
    assert!(errs.iter().all(|e| *e < 2e-5), "{errs:?}");
}

#[test]
fn output_does_not_depend_on_how_input_is_split() {
    let (from, to) = (48_000, 44_100);
    let input = vec![
        sine(1000.0, from, 50_000, 0.8, 0.3),
        sine(440.0, from, 50_000, 0.5, 0.0),
    ];
    let whole = resample(from, to, &input, usize::MAX);
    for chunk in [37, 4096] {
        let split = resample(from, to, &input, chunk);
        assert_eq!(split[0].len(), whole[0].len());
        let diff = split
            .iter()
            .zip(&whole)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max);
        eprintln!("chunks of {chunk}: max difference from one call {diff:.2e}");
        assert!(diff <= 1e-6, "chunk {chunk}: {diff}");
    }
}

#[test]
fn lengths_are_exact_for_short_and_odd_inputs() {
    for (from, to) in [
        (48_000, 44_100),
        (44_100, 48_000),
        (48_000, 16_000),
        (22_050, 48_000),
        (8_000, 8_000),
    ] {
        for n in [0usize, 1, 2, 100, 1023, 1024, 1025, 9_999] {
            let out = resample(from, to, &[vec![0.1; n]], 333);
            assert_eq!(
                out[0].len(),
                expected_len(n, from, to),
                "{from}->{to}, {n} frames"
            );
        }
    }
}

#[test]
fn frequencies_above_the_new_nyquist_are_removed() {
    // 48 kHz -> 44.1 kHz: a 23 kHz tone has no place below 22.05 kHz and must vanish; a 19 kHz
    // tone is in the passband and must keep its level.
    let (from, to) = (48_000, 44_100);
    let n = 48_000;
    let rms =
        |x: &[f32]| (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
    let r = Resampler::new(from, to, 1).unwrap();
    let cutoff = r.cutoff_hz().expect("a sinc resampler has a cutoff");
    let stop = resample(from, to, &[sine(23_000.0, from, n, 0.9, 0.0)], 4096);
    let pass = resample(from, to, &[sine(19_000.0, from, n, 0.9, 0.0)], 4096);
    let m = 2000;
    let in_rms = 0.9 / 2f64.sqrt();
    let stop_db = 20.0 * (rms(&stop[0][m..stop[0].len() - m]) / in_rms).log10();
    let pass_db = 20.0 * (rms(&pass[0][m..pass[0].len() - m]) / in_rms).log10();
    eprintln!(
        "48k->44.1k: cutoff {cutoff:.0} Hz ({:.3} of 22.05 kHz); 23 kHz tone {stop_db:.1} dB, \
         19 kHz tone {pass_db:+.4} dB",
        cutoff / 22_050.0
    );
    assert!(
        cutoff > 0.9 * 22_050.0 && cutoff < 22_050.0,
        "cutoff {cutoff} Hz"
    );
    assert!(stop_db < -100.0, "23 kHz leaks at {stop_db:.1} dB");
    assert!(
        pass_db.abs() < 0.01,
        "19 kHz changes level by {pass_db:.4} dB"
    );
}

#[test]
fn agrees_with_sox_rate_very_high_quality() {
    // sox's `rate -v` is the reference resampler: both must produce the same samples.
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (48_000, 44_100);
    let n = from as usize;
    let input = vec![sine(1000.0, from, n, 0.5, 0.0)];
    let src = dir.path().join("in.wav");
    let spec = nova_media::audio::AudioSpec {
        sample_rate: from,
        channels: 1,
    };
    let mut w = WavWriter::create(&src, spec, SampleFormat::F32).unwrap();
    w.write(&input).unwrap();
    w.finish().unwrap();
    let dst = dir.path().join("sox.wav");
    run_tool(
        "sox",
        &[
            src.to_str().unwrap(),
            "-b",
            "32",
            "-e",
            "floating-point",
            dst.to_str().unwrap(),
            "rate",
            "-v",
            "44100",
        ],
    );
    let mut r = WavReader::open(&dst).unwrap();
    let theirs = r.read(usize::MAX).unwrap().remove(0);
    let ours = resample(from, to, &input, 4096).remove(0);
    eprintln!("sox rate -v: {} frames, ours {}", theirs.len(), ours.len());
    assert!((theirs.len() as i64 - ours.len() as i64).abs() <= 1);
    let m = 2000;
    let diff = ours[m..ours.len() - m]
        .iter()
        .zip(&theirs[m..])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("sox rate -v vs ours, 1 kHz sine 48k->44.1k: max abs difference {diff:.2e}");
    assert!(diff < 2e-5, "differs from sox by {diff}");
}
