//! WAV and ffmpeg audio reading: round trips within quantisation, chunked reads equal whole
//! reads, hound and ffmpeg agree on the same file, sox-written files read right, and bad files
//! are typed errors naming the path (a truncated data chunk names the first missing frame).

mod common;

use common::{run_tool, sine};
use nova_media::audio::{
    open_any, AudioReader, AudioSource, AudioSpec, SampleFormat, WavReader, WavWriter,
};
use nova_media::MediaError;
use std::path::Path;

const RATE: u32 = 44_100;

fn stereo(len: usize) -> Vec<Vec<f32>> {
    // Full-scale peaks on the left, to exercise the clamp and the top of the range.
    vec![
        sine(1000.0, RATE, len, 0.999, 0.0),
        sine(313.0, RATE, len, 0.3, 0.5),
    ]
}

fn write_wav(path: &Path, planar: &[Vec<f32>], format: SampleFormat) {
    let spec = AudioSpec {
        sample_rate: RATE,
        channels: planar.len() as u16,
    };
    let mut w = WavWriter::create(path, spec, format).unwrap();
    // Several uneven writes: the file is the concatenation.
    let n = planar[0].len();
    let mut cuts = [0, 1.min(n), 777.min(n), n / 2, n];
    cuts.sort_unstable();
    for pair in cuts.windows(2) {
        let part: Vec<Vec<f32>> = planar
            .iter()
            .map(|c| c[pair[0]..pair[1]].to_vec())
            .collect();
        w.write(&part).unwrap();
    }
    w.finish().unwrap();
}

fn read_all(src: &mut dyn AudioSource, chunk: usize) -> Vec<Vec<f32>> {
    let mut out = vec![Vec::new(); usize::from(src.spec().channels)];
    loop {
        let part = src.read(chunk).unwrap();
        assert!(part[0].len() <= chunk);
        if part[0].is_empty() {
            return out;
        }
        for (o, p) in out.iter_mut().zip(part) {
            o.extend(p);
        }
    }
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn wav_round_trips_within_quantisation() {
    let dir = tempfile::tempdir().unwrap();
    let src = stereo(10_000);
    // Half a quantisation step (values in [-1, 1) map to +-2^(bits-1) steps).
    for (format, bound) in [
        (SampleFormat::I16, 0.5 / 32768.0),
        (SampleFormat::I24, 0.5 / 8_388_608.0),
        (SampleFormat::F32, 0.0),
    ] {
        let path = dir.path().join(format!("{format:?}.wav"));
        write_wav(&path, &src, format);
        let mut r = WavReader::open(&path).unwrap();
        assert_eq!(
            r.spec(),
            AudioSpec {
                sample_rate: RATE,
                channels: 2
            }
        );
        assert_eq!(r.len_frames(), 10_000);
        let back = read_all(&mut r, usize::MAX);
        let err = max_abs_diff(&src, &back);
        eprintln!("WAV {format:?}: max abs error {err:.3e} (bound {bound:.3e})");
        assert!(err <= bound * 1.0001, "{format:?}: {err}");
    }
}

#[test]
fn chunked_reads_equal_one_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.wav");
    let src = stereo(12_345);
    write_wav(&path, &src, SampleFormat::I16);
    let whole = read_all(&mut WavReader::open(&path).unwrap(), usize::MAX);
    let chunked = read_all(&mut WavReader::open(&path).unwrap(), 1000);
    assert_eq!(whole[0].len(), 12_345);
    assert_eq!(whole, chunked);
    // The same through ffmpeg, which decodes the same PCM to the same floats.
    let mut ff = AudioReader::open(&path).unwrap();
    assert_eq!(ff.spec().channels, 2);
    let via_ffmpeg = read_all(&mut ff, 1000);
    assert_eq!(via_ffmpeg, whole);
}

#[test]
fn truncated_data_chunk_names_the_first_missing_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.wav");
    write_wav(&path, &stereo(1000), SampleFormat::I16);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 44 + 1000 * 4, "hound writes a 44-byte header");
    // Keep 400 whole frames and half of the 401st.
    std::fs::write(&path, &bytes[..44 + 400 * 4 + 2]).unwrap();
    let mut r = WavReader::open(&path).unwrap();
    assert_eq!(r.len_frames(), 1000, "the header still claims 1000");
    let first = r.read(300).unwrap();
    assert_eq!(first[0].len(), 300);
    let e = r.read(1000).unwrap_err();
    eprintln!("truncated WAV: {e}");
    match &e {
        MediaError::Truncated { path, at, .. } => {
            assert!(path.ends_with("t.wav"));
            assert_eq!(at.frame, Some(400));
        }
        other => panic!("expected Truncated, got {other}"),
    }
}

#[test]
fn bad_audio_files_are_typed_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.wav");
    assert!(matches!(
        WavReader::open(&missing),
        Err(MediaError::Open { .. })
    ));
    assert!(matches!(open_any(&missing), Err(MediaError::Open { .. })));
    assert!(matches!(
        AudioReader::open(&dir.path().join("missing.flac")),
        Err(MediaError::Open { .. })
    ));

    let empty = dir.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        WavReader::open(&empty),
        Err(MediaError::Empty { .. })
    ));

    let garbage = dir.path().join("garbage.wav");
    std::fs::write(&garbage, b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk").unwrap();
    let e = open_any(&garbage).err().expect("garbage must not open");
    eprintln!("garbage WAV: {e}");
    assert!(e.to_string().contains("garbage.wav"), "{e}");

    let header_only = dir.path().join("short.wav");
    std::fs::write(&header_only, b"RIFF").unwrap();
    let e = WavReader::open(&header_only)
        .err()
        .expect("4 bytes is no WAV");
    assert!(matches!(e, MediaError::Open { .. }), "{e}");
}

#[test]
fn sox_written_wavs_read_at_every_int_depth() {
    // sox is an independent writer: the same tone at 8-bit (unsigned in WAV), 16, 24 and 32-bit
    // integer PCM, undithered (-D), so each file holds the same values rounded to its step.
    // Every depth must read back as the 32-bit file within half of its own step: scaling by
    // 2^(bits-1) and the 8-bit offset are right.
    let dir = tempfile::tempdir().unwrap();
    let mut decoded = Vec::new();
    for bits in [8, 16, 24, 32] {
        let path = dir.path().join(format!("sox{bits}.wav"));
        let b = bits.to_string();
        run_tool(
            "sox",
            &[
                "-D",
                "-n",
                "-r",
                "8000",
                "-c",
                "1",
                "-b",
                &b,
                path.to_str().unwrap(),
                "synth",
                "0.5",
                "sine",
                "500",
                "vol",
                "0.5",
            ],
        );
        let mut r = WavReader::open(&path).unwrap();
        assert_eq!(
            r.spec(),
            AudioSpec {
                sample_rate: 8000,
                channels: 1
            }
        );
        assert_eq!(r.len_frames(), 4000);
        decoded.push((bits, read_all(&mut r, 999).remove(0)));
    }
    let reference = decoded[3].1.clone();
    let peak = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let f = common::dominant_frequency(&reference, 8000, 400, 600);
    eprintln!("sox 32-bit: peak {peak:.6}, dominant {f} Hz");
    assert!((peak - 0.5).abs() < 0.01, "peak {peak}");
    assert_eq!(f, 500);
    for (bits, x) in &decoded[..3] {
        let err = x
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let half_step = 0.5 / 2f32.powi(bits - 1);
        eprintln!(
            "sox {bits}-bit vs 32-bit: max abs difference {err:.3e} (half step {half_step:.3e})"
        );
        assert!(err <= half_step * 1.001 + 1e-7, "{bits}-bit: {err}");
    }
}

#[test]
fn flac_reads_back_the_same_samples_as_the_wav() {
    // ffmpeg converts our 16-bit WAV to FLAC (lossless); AudioReader must give the same floats.
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("s.wav");
    let flac = dir.path().join("s.flac");
    let src = stereo(20_000);
    write_wav(&wav, &src, SampleFormat::I16);
    run_tool(
        "ffmpeg",
        &[
            "-v",
            "error",
            "-y",
            "-i",
            wav.to_str().unwrap(),
            flac.to_str().unwrap(),
        ],
    );
    let want = read_all(&mut WavReader::open(&wav).unwrap(), usize::MAX);
    let mut any = open_any(&flac).unwrap();
    assert_eq!(
        any.spec(),
        AudioSpec {
            sample_rate: RATE,
            channels: 2
        }
    );
    assert_eq!(
        any.len_frames(),
        None,
        "ffmpeg sources claim no exact length"
    );
    let got = read_all(any.as_mut(), 4096);
    assert_eq!(got, want);
    // open_any takes the hound fast path for .wav, which knows its length.
    assert_eq!(open_any(&wav).unwrap().len_frames(), Some(20_000));
}

#[test]
fn mp3_decodes_to_the_right_tone() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("m.wav");
    let mp3 = dir.path().join("m.mp3");
    write_wav(&wav, &stereo(RATE as usize), SampleFormat::I16);
    run_tool(
        "ffmpeg",
        &[
            "-v",
            "error",
            "-y",
            "-i",
            wav.to_str().unwrap(),
            "-b:a",
            "192k",
            mp3.to_str().unwrap(),
        ],
    );
    let mut r = AudioReader::open(&mp3).unwrap();
    assert_eq!(
        r.spec(),
        AudioSpec {
            sample_rate: RATE,
            channels: 2
        }
    );
    let got = read_all(&mut r, 1152);
    let f = common::dominant_frequency(&got[0][10_000..30_000], RATE, 800, 1200);
    eprintln!(
        "mp3: {} frames back (44100 written), dominant {f} Hz",
        got[0].len()
    );
    assert!((999..=1001).contains(&f), "{f} Hz");
    assert!((got[0].len() as i64 - RATE as i64).abs() < 3000);
}
