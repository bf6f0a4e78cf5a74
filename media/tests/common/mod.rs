//! Helpers shared by nova-media's integration tests: synthetic inputs generated in the test
//! (nothing is downloaded), picture and signal measures, and the ffmpeg/ffprobe/sox command-line
//! tools that `scripts/setup.sh` installs, used as independent peers.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Frame `i` of a moving test pattern: colour gradients drifting diagonally plus a bright disc
/// circling the frame; smooth enough for lossy codecs, different in every frame.
pub fn pattern(i: u32, w: u32, h: u32) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    let t = i as f32;
    let (cx, cy) = (
        w as f32 * (0.5 + 0.3 * (t * 0.26).cos()),
        h as f32 * (0.5 + 0.3 * (t * 0.26).sin()),
    );
    let radius = h as f32 * 0.18;
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            let r = 128.0 + 100.0 * ((xf + 2.0 * t) * 0.05).sin();
            let g = 128.0 + 100.0 * ((yf - 1.5 * t) * 0.07).cos();
            let b = 128.0 + 90.0 * ((xf + yf + 3.0 * t) * 0.03).sin();
            let d = ((xf - cx).powi(2) + (yf - cy).powi(2)).sqrt();
            // Soft-edged disc: full inside, fading over 3 px.
            let a = ((radius - d) / 3.0 + 0.5).clamp(0.0, 1.0);
            let mix =
                |v: f32, disc: f32| (v * (1.0 - a) + disc * a).round().clamp(0.0, 255.0) as u8;
            rgb.push(mix(r, 240.0));
            rgb.push(mix(g, 230.0));
            rgb.push(mix(b, 40.0));
        }
    }
    rgb
}

/// Peak signal-to-noise ratio of 8-bit samples, in dB (infinite for identical inputs).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "PSNR of differently sized frames");
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// `amp * sin(2 pi f n / rate + phase)` for `n` in `0..len`.
pub fn sine(f: f64, rate: u32, len: usize, amp: f32, phase: f64) -> Vec<f32> {
    (0..len)
        .map(|n| {
            amp * (2.0 * std::f64::consts::PI * f * n as f64 / f64::from(rate) + phase).sin() as f32
        })
        .collect()
}

/// The frequency in `lo..=hi` (1 Hz steps) with the most energy (Goertzel, Hann-windowed).
pub fn dominant_frequency(x: &[f32], rate: u32, lo: u32, hi: u32) -> u32 {
    let n = x.len() as f64;
    let power = |f: u32| {
        let w = 2.0 * std::f64::consts::PI * f64::from(f) / f64::from(rate);
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for (i, &v) in x.iter().enumerate() {
            let win = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n).cos();
            let s0 = f64::from(v) * win + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2
    };
    (lo..=hi)
        .max_by(|&a, &b| power(a).total_cmp(&power(b)))
        .expect("a non-empty frequency range")
}

/// Normalised cross-correlation of `got` against `want` at the best lag in `-max_lag..=max_lag`
/// (`got[i + lag]` against `want[i]`), over `want`'s middle half. Returns `(correlation, lag)`.
pub fn best_correlation(want: &[f32], got: &[f32], max_lag: i64) -> (f64, i64) {
    let (start, end) = (want.len() / 4, 3 * want.len() / 4);
    let mut best = (f64::MIN, 0);
    for lag in -max_lag..=max_lag {
        let (mut xy, mut xx, mut yy) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &x) in want.iter().enumerate().take(end).skip(start) {
            let j = i as i64 + lag;
            if j < 0 || j as usize >= got.len() {
                continue;
            }
            let (x, y) = (f64::from(x), f64::from(got[j as usize]));
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        if xx > 0.0 && yy > 0.0 {
            let c = xy / (xx * yy).sqrt();
            if c > best.0 {
                best = (c, lag);
            }
        }
    }
    best
}

/// Runs a command-line tool and returns its stdout. A missing tool fails the test:
/// `scripts/setup.sh` installs ffmpeg and sox, so their absence is a broken setup.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is not runnable ({e}); run scripts/setup.sh to install it")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `key=value` lines from `ffprobe -show_entries ... -of default=noprint_wrappers=1`.
pub fn ffprobe_field(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// Decodes a file's first video stream with the ffmpeg CLI into packed RGB24 frames (the YUV
/// matrix is ffmpeg's choice from the stream's tags; the scaler flags match ours).
pub fn ffmpeg_decode_rgb(path: &Path, w: u32, h: u32) -> Vec<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args([
            "-map",
            "0:v:0",
            "-vf",
            "scale=flags=bicubic+accurate_rnd+full_chroma_int",
        ])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg is not runnable; run scripts/setup.sh to install it");
    assert!(
        out.status.success(),
        "ffmpeg decode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact((w * h * 3) as usize)
        .map(<[u8]>::to_vec)
        .collect()
}
