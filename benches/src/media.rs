//! The media benchmark's workloads: NOVA's video and audio pipelines against the ffmpeg and
//! sox command lines doing the same work on the same files, alternated in one run.
//!
//! - **Video**: a 720p H.264 clip decoded, scaled 2x with lanczos and re-encoded with x264
//!   `ultrafast` — NOVA (`LoadVideo → ImageScaleBy → SaveVideo`, through the dataflow) versus
//!   `ffmpeg -vf scale=iw*2:ih*2:flags=lanczos -c:v libx264 -preset ultrafast`.
//! - **Audio**: a long 48 kHz stereo WAV resampled to 44.1 kHz — NOVA (`LoadAudio →
//!   AudioResample → SaveAudio`) versus `sox in.wav out.wav rate -v 44100`.
//!
//! Ratios are NOVA's throughput over the peer's (above 1: NOVA is faster), the median of
//! rounds in which the two ran back to back.

use nova_dataflow::{plan, run, workflow, Emitter, EventSink, JobEnv, PlanOptions, RunOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// A benchmark's folders.
pub struct Dirs {
    _tmp: tempfile::TempDir,
    pub env: JobEnv,
}

impl Dirs {
    pub fn new() -> Dirs {
        let tmp = tempfile::tempdir().expect("temp dir");
        let env = JobEnv::new(
            tmp.path().join("in"),
            tmp.path().join("out"),
            tmp.path().join("tmp"),
        );
        for d in [&env.input_dir, &env.output_dir, &env.temp_dir] {
            std::fs::create_dir_all(d).expect("bench folder");
        }
        Dirs { _tmp: tmp, env }
    }

    pub fn input(&self, name: &str) -> PathBuf {
        self.env.input_dir.join(name)
    }
}

impl Default for Dirs {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs a command line, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e} (scripts/setup.sh installs it)"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A 720p H.264 test clip (ffmpeg's `testsrc2`, moving content) of `seconds` at 24 fps.
pub fn make_clip(path: &Path, seconds: u32) -> Result<(), String> {
    make_clip_sized(path, (1280, 720), seconds)
}

/// An H.264 test clip (ffmpeg's `testsrc2`) of `size` (width, height) and `seconds` at 24 fps.
pub fn make_clip_sized(path: &Path, size: (u32, u32), seconds: u32) -> Result<(), String> {
    sh(
        "ffmpeg",
        &[
            "-y",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            &format!(
                "testsrc2=size={}x{}:rate=24:duration={seconds}",
                size.0, size.1
            ),
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            path.to_str().ok_or("path")?,
        ],
    )
}

/// A stereo 48 kHz WAV of `seconds` of tones and noise (sox's synth).
pub fn make_wav(path: &Path, seconds: u32) -> Result<(), String> {
    sh(
        "sox",
        &[
            "-n",
            "-r",
            "48000",
            "-c",
            "2",
            "-b",
            "16",
            path.to_str().ok_or("path")?,
            "synth",
            &seconds.to_string(),
            "sine",
            "440",
            "pinknoise",
            "gain",
            "-6",
        ],
    )
}

/// Plans and runs a workflow through the engine; wall seconds.
pub fn nova(json: &str, env: &JobEnv) -> Result<f64, String> {
    let registry = nova_operators::registry();
    let start = Instant::now();
    let wf = workflow::load(json, &registry, env).map_err(|e| e.to_string())?;
    let opts = PlanOptions {
        workers: nova_dataflow::exec::default_workers(),
        ..PlanOptions::default()
    };
    let p = plan(&wf, env, &opts).map_err(|e| e.to_string())?;
    let sink: EventSink = Arc::new(|_| {});
    run(
        Arc::new(wf),
        Arc::new(p),
        env.clone(),
        RunOptions::default(),
        Arc::new(Emitter::new("bench", sink)),
    )
    .map_err(|e| e.to_string())?;
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds a command line takes.
pub fn peer(program: &str, args: &[&str]) -> Result<f64, String> {
    let start = Instant::now();
    sh(program, args)?;
    Ok(start.elapsed().as_secs_f64())
}

/// The median.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One comparison's figures.
pub struct Comparison {
    pub what: String,
    pub units: f64,
    pub unit: &'static str,
    pub nova_s: Vec<f64>,
    pub peer_s: Vec<f64>,
    pub peer: &'static str,
}

impl Comparison {
    /// NOVA's throughput over the peer's: the median of per-round ratios.
    pub fn ratio(&self) -> f64 {
        median(
            self.nova_s
                .iter()
                .zip(&self.peer_s)
                .map(|(n, p)| p / n)
                .collect(),
        )
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, p) = (median(self.nova_s.clone()), median(self.peer_s.clone()));
        writeln!(f, "{}", self.what)?;
        writeln!(
            f,
            "  NOVA: median {n:.3} s ({:.1} {}/s)",
            self.units / n,
            self.unit
        )?;
        writeln!(
            f,
            "  {}: median {p:.3} s ({:.1} {}/s)",
            self.peer,
            self.units / p,
            self.unit
        )?;
        write!(
            f,
            "  NOVA / {} throughput: {:.2}x (median of {} alternated rounds; goal >= 1)",
            self.peer,
            self.ratio(),
            self.nova_s.len()
        )
    }
}

/// The video comparison over `rounds` alternated rounds on a clip of `seconds`.
pub fn video(seconds: u32, rounds: usize) -> Result<Comparison, String> {
    let d = Dirs::new();
    let clip = d.input("clip.mp4");
    make_clip(&clip, seconds)?;
    let frames = nova_media::video::probe(&clip)
        .map_err(|e| e.to_string())?
        .frames
        .unwrap_or(0) as f64;
    let wf = r#"{
      "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
      "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "scale_by": 2.0}},
      "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "up", "format": "mp4", "codec": "h264", "preset": "ultrafast"}}
    }"#;
    let out = d.env.output_dir.join("ffmpeg.mp4");
    let (clip_s, out_s) = (clip.to_str().ok_or("path")?, out.to_str().ok_or("path")?);
    let ffmpeg = [
        "-y",
        "-v",
        "error",
        "-i",
        clip_s,
        "-vf",
        "scale=iw*2:ih*2:flags=lanczos",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-an",
        out_s,
    ];
    let (mut nova_s, mut peer_s) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // The temporal cache would replay the unchanged windows: off, so each round works.
        std::env::set_var("NOVA_TEMPORAL_CACHE_MB", "0");
        nova_s.push(nova(wf, &d.env)?);
        peer_s.push(peer("ffmpeg", &ffmpeg)?);
    }
    Ok(Comparison {
        what: format!(
            "720p H.264, {frames} frames: decode, lanczos 2x to 2560x1440, x264 ultrafast"
        ),
        units: frames,
        unit: "frames",
        nova_s,
        peer_s,
        peer: "ffmpeg",
    })
}

/// The audio comparison over `rounds` alternated rounds on a WAV of `seconds`.
pub fn audio(seconds: u32, rounds: usize) -> Result<Comparison, String> {
    let d = Dirs::new();
    let wav = d.input("long.wav");
    make_wav(&wav, seconds)?;
    let wf = r#"{
      "1": {"class_type": "LoadAudio", "inputs": {"audio": "long.wav"}},
      "2": {"class_type": "AudioResample", "inputs": {"audio": ["1", 0], "sample_rate": 44100}},
      "3": {"class_type": "SaveAudio", "inputs": {"audio": ["2", 0], "filename_prefix": "rs"}}
    }"#;
    let out = d.env.output_dir.join("sox.wav");
    let (wav_s, out_s) = (wav.to_str().ok_or("path")?, out.to_str().ok_or("path")?);
    let sox = [wav_s, out_s, "rate", "-v", "44100"];
    let (mut nova_s, mut peer_s) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        nova_s.push(nova(wf, &d.env)?);
        peer_s.push(peer("sox", &sox)?);
        for e in std::fs::read_dir(&d.env.output_dir)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            std::fs::remove_file(e.path()).ok();
        }
    }
    Ok(Comparison {
        what: format!("{seconds} s stereo WAV, 48 kHz -> 44.1 kHz"),
        units: seconds as f64,
        unit: "audio s",
        nova_s,
        peer_s,
        peer: "sox -v",
    })
}
