//! The KPI suite: a workspace (models copied from `shared/models`, generated inputs), its
//! workflows, and one job run through an executor with every event timed.

use crate::executor::Executor;
use nova_dataflow::{
    plan, run, workflow, Emitter, EventKind, EventSink, JobEnv, PreviewMethod, ProfileId, RunError,
    RunOptions,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The harness's folders: models, inputs, one output folder per job.
pub struct Workspace {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    jobs: std::sync::atomic::AtomicUsize,
}

impl Workspace {
    /// Copies the suite's models and writes its inputs (`clip_s` seconds of video, `wav_s`
    /// of audio, images of the given sides).
    pub fn new(image: (usize, usize), clip_s: u32, wav_s: u32) -> Result<Workspace, String> {
        let tmp = tempfile::tempdir().map_err(|e| format!("temp folder: {e}"))?;
        let root = tmp.path().to_path_buf();
        let shared = crate::memory::models_dir();
        for (sub, from, to) in [
            (
                "checkpoints",
                "tiny-sd1/tiny_sd1.safetensors",
                "tiny_sd1.safetensors",
            ),
            (
                "upscale_models",
                "upscale_models/realesr-animevideov3.safetensors",
                "realesr-animevideov3.safetensors",
            ),
            (
                "vae_approx",
                "taesd/synthetic-sd1-layout/taesd_decoder.safetensors",
                "taesd_decoder.safetensors",
            ),
            (
                "vae_approx",
                "taesd/synthetic-sd1-layout/taesd_encoder.safetensors",
                "taesd_encoder.safetensors",
            ),
        ] {
            let d = root.join("models").join(sub);
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            std::fs::copy(shared.join(from), d.join(to))
                .map_err(|e| format!("{}: {e}", shared.join(from).display()))?;
        }
        let input = root.join("in");
        std::fs::create_dir_all(&input).map_err(|e| format!("{}: {e}", input.display()))?;
        write_card(&input.join("card.png"), image.0, image.1)?;
        write_card(&input.join("small.png"), 128, 96)?;
        write_card(&input.join("square.png"), 512, 512)?;
        crate::media::make_clip_sized(&input.join("clip.mp4"), (320, 240), clip_s)?;
        crate::media::make_wav(&input.join("tone.wav"), wav_s)?;
        Ok(Workspace {
            _tmp: tmp,
            root,
            jobs: Default::default(),
        })
    }

    /// A fresh job environment (its own output folder).
    pub fn env(&self, preview: PreviewMethod) -> JobEnv {
        let n = self.jobs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let out = self.root.join("out").join(n.to_string());
        let tmp = self.root.join("tmp").join(n.to_string());
        let _ = std::fs::create_dir_all(&out);
        let _ = std::fs::create_dir_all(&tmp);
        JobEnv::new(self.root.join("in"), out, tmp)
            .with_models_dir(self.root.join("models"))
            .with_preview(preview)
    }
}

/// A test card: gradients, hard edges and fine texture, so tiling seams would show.
fn write_card(path: &Path, w: usize, h: usize) -> Result<(), String> {
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let stripes = if (x / 24 + y / 24) % 2 == 0 {
            60.0
        } else {
            0.0
        };
        let ring = ((fx - 0.5).hypot(fy - 0.5) * 60.0).sin() * 40.0;
        let noise = ((x.wrapping_mul(7919) ^ y.wrapping_mul(104729)) % 29) as f32;
        *p = image::Rgb([
            (fx * 180.0 + stripes + noise).clamp(0.0, 255.0) as u8,
            (fy * 160.0 + ring + 60.0).clamp(0.0, 255.0) as u8,
            (120.0 + ring - stripes * 0.5 + noise).clamp(0.0, 255.0) as u8,
        ]);
    }
    img.save(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What a case's throughput counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Output megapixels per second.
    Megapixels,
    /// Sampler steps per second (the sampler node's own time).
    Steps,
    /// Video frames per second.
    Frames,
    /// Seconds of audio per second (x real time).
    AudioSeconds,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Megapixels => "Mpx/s",
            Unit::Steps => "it/s",
            Unit::Frames => "frames/s",
            Unit::AudioSeconds => "x real time",
        }
    }
}

/// How a case's output is compared with the whole one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    Png,
    Video,
    Wav,
}

/// A workflow of the suite.
pub struct Case {
    pub id: &'static str,
    pub what: String,
    /// The workflow NOVA runs.
    pub nova: String,
    /// The workflow the naive executor runs (the same unless a node has a whole-tensor
    /// twin: `VAEDecodeTiled` → `VAEDecode`).
    pub naive: String,
    pub unit: Unit,
    /// Units of work in one job (for Steps: steps; the time is the sampler's).
    pub units: f64,
    pub output: OutputKind,
}

/// The suite at the given sizes.
pub fn cases(image: (usize, usize), steps: u32, sd: usize, clip_s: u32, wav_s: u32) -> Vec<Case> {
    let (w, h) = image;
    let chain = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "ImageSharpen", "inputs": {"image": ["1", 0], "sharpen_radius": 2, "sigma": 1.0, "alpha": 0.5}},
  "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "bicubic", "scale_by": 1.5}},
  "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 3, "sigma": 1.5}},
  "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
  "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "chain"}}
}"#;
    let upscale = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
  "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "realesr-animevideov3.safetensors"}},
  "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
  "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}
}"#;
    let taesd = |decode: &str| {
        format!(
            r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "square.png"}}}},
  "2": {{"class_type": "VAELoader", "inputs": {{"vae_name": "taesd"}}}},
  "3": {{"class_type": "VAEEncode", "inputs": {{"pixels": ["1", 0], "vae": ["2", 0]}}}},
  "4": {decode},
  "5": {{"class_type": "SaveImage", "inputs": {{"images": ["4", 0], "filename_prefix": "taesd"}}}}
}}"#
        )
    };
    let tiled = r#"{"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["2", 0], "tile_size": 256, "overlap": 64}}"#;
    let whole = r#"{"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}}"#;
    let sd_text = format!(
        r#"{{
  "3": {{"class_type": "KSampler", "inputs": {{"seed": 7, "steps": {steps}, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}}},
  "4": {{"class_type": "CheckpointLoaderSimple", "inputs": {{"ckpt_name": "tiny_sd1.safetensors"}}}},
  "5": {{"class_type": "EmptyLatentImage", "inputs": {{"width": {sd}, "height": {sd}, "batch_size": 1}}}},
  "6": {{"class_type": "CLIPTextEncode", "inputs": {{"text": "a glass bottle on a beach", "clip": ["4", 1]}}}},
  "7": {{"class_type": "CLIPTextEncode", "inputs": {{"text": "text, watermark", "clip": ["4", 1]}}}},
  "8": {{"class_type": "VAEDecode", "inputs": {{"samples": ["3", 0], "vae": ["4", 2]}}}},
  "9": {{"class_type": "SaveImage", "inputs": {{"images": ["8", 0], "filename_prefix": "sd"}}}}
}}"#
    );
    let video = r#"{
  "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
  "2": {"class_type": "ImageSharpen", "inputs": {"image": ["1", 0], "sharpen_radius": 1, "sigma": 1.0, "alpha": 0.5}},
  "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "lanczos", "scale_by": 1.5}},
  "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "vid", "format": "mkv", "codec": "ffv1"}}
}"#;
    let audio = r#"{
  "1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}},
  "2": {"class_type": "AudioBiquad", "inputs": {"audio": ["1", 0], "filter_type": "lowpass", "frequency": 2000.0, "q": 0.7071, "gain_db": 0.0}},
  "3": {"class_type": "AudioResample", "inputs": {"audio": ["2", 0], "sample_rate": 44100}},
  "4": {"class_type": "SaveAudio", "inputs": {"audio": ["3", 0], "filename_prefix": "aud"}}
}"#;
    let mpx = |w: usize, h: usize| (w * h) as f64 / 1e6;
    let (sw, sh) = (w * 3 / 2, h * 3 / 2);
    vec![
        Case {
            id: "image_chain",
            what: format!("sharpen, bicubic 1.5x, blur, invert: {w}x{h} -> {sw}x{sh}"),
            nova: chain.into(),
            naive: chain.into(),
            unit: Unit::Megapixels,
            units: mpx(sw, sh),
            output: OutputKind::Png,
        },
        Case {
            id: "upscale",
            what: "Real-ESRGAN x4 (SRVGGNetCompact): 128x96 -> 512x384".into(),
            nova: upscale.into(),
            naive: upscale.into(),
            unit: Unit::Megapixels,
            units: mpx(512, 384),
            output: OutputKind::Png,
        },
        Case {
            id: "taesd",
            what: "TAESD encode + decode 512x512 (NOVA: VAEDecodeTiled 256/64; naive: VAEDecode)"
                .into(),
            nova: taesd(tiled),
            naive: taesd(whole),
            unit: Unit::Megapixels,
            units: mpx(512, 512),
            output: OutputKind::Png,
        },
        Case {
            id: "tiny_sd",
            what: format!("tiny SD1 txt2img {sd}x{sd}, {steps} euler steps, cfg 8"),
            nova: sd_text.clone(),
            naive: sd_text,
            unit: Unit::Steps,
            units: steps as f64,
            output: OutputKind::Png,
        },
        Case {
            id: "video",
            what: format!(
                "320x240 H.264, {} frames: sharpen, lanczos 1.5x, FFV1",
                clip_s * 24
            ),
            nova: video.into(),
            naive: video.into(),
            unit: Unit::Frames,
            units: (clip_s * 24) as f64,
            output: OutputKind::Video,
        },
        Case {
            id: "audio",
            what: format!("{wav_s} s stereo 48 kHz: lowpass biquad, resample to 44.1 kHz"),
            nova: audio.into(),
            naive: audio.into(),
            unit: Unit::AudioSeconds,
            units: wav_s as f64,
            output: OutputKind::Wav,
        },
    ]
}

/// One job's figures.
#[derive(Clone, Debug, Default)]
pub struct JobRun {
    pub error: Option<String>,
    /// Failed for want of device memory (at run time) or refused up front.
    pub oom: bool,
    pub refused: bool,
    /// From submission (before validation) to the first output a user sees: a partial
    /// output, a step preview or a finished output node.
    pub first_output_ms: Option<f64>,
    /// From submission to the run's end (every output written).
    pub final_ms: f64,
    pub partials: u64,
    pub chunks: u64,
    /// Per partial output: from its operator finishing it to its announcement (ms).
    pub announce_delays_ms: Vec<f64>,
    /// The sampler node's own time, if the workflow has one.
    pub sampler_ms: Option<f64>,
    pub load_ms: f64,
    pub transfer_ms: f64,
    pub tracked_peak_bytes: u64,
    pub forecast_peak_bytes: u64,
    pub outputs: Vec<PathBuf>,
}

/// Runs `text` once through `executor` under `profile`'s budget (minus headroom); `limit`
/// overrides the budget.
pub fn run_job(
    ws: &Workspace,
    text: &str,
    executor: Executor,
    profile: ProfileId,
    limit: Option<u64>,
    workers: usize,
) -> JobRun {
    let env = ws.env(executor.preview());
    let started = Instant::now();
    let first = Arc::new(Mutex::new(None::<f64>));
    let partials = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let timing = Arc::new(Mutex::new((0.0f64, 0.0f64)));
    let (f, p, t) = (first.clone(), partials.clone(), timing.clone());
    let sink: EventSink = Arc::new(move |e| {
        let output = match &e.kind {
            EventKind::PartialImage { .. }
            | EventKind::PartialVideo { .. }
            | EventKind::PartialAudio { .. }
            | EventKind::Preview { .. } => {
                p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                true
            }
            EventKind::Executed { .. } => true,
            EventKind::Timing(rt) => {
                *t.lock().unwrap_or_else(|x| x.into_inner()) =
                    (rt.total.load_ms, rt.total.transfer_ms);
                false
            }
            _ => false,
        };
        if output {
            let mut g = f.lock().unwrap_or_else(|x| x.into_inner());
            if g.is_none() {
                *g = Some(started.elapsed().as_secs_f64() * 1e3);
            }
        }
    });
    let mut out = JobRun::default();
    let registry = nova_operators::registry();
    let wf = match workflow::load(text, &registry, &env) {
        Ok(w) => w,
        Err(e) => {
            out.error = Some(format!("invalid workflow: {e}"));
            return out;
        }
    };
    let spec = profile.spec();
    let limit = limit.or_else(|| {
        spec.device_memory
            .map(|b| b.saturating_sub(spec.headroom).0)
    });
    let opts = executor.options(profile, limit.map(nova_dataflow::Bytes), workers);
    let p = match plan(&wf, &env, &opts) {
        Ok(p) => p,
        Err(e) => {
            out.error = Some(format!("plan: {e}"));
            return out;
        }
    };
    out.forecast_peak_bytes = p.forecast_peak_bytes;
    if executor == Executor::Nova && !p.fits {
        out.refused = true;
        out.oom = true;
        out.error = Some("refused up front: the most frugal plan exceeds the budget".into());
        out.final_ms = started.elapsed().as_secs_f64() * 1e3;
        return out;
    }
    executor.prepare();
    let r = run(
        Arc::new(wf),
        Arc::new(p),
        env.clone(),
        RunOptions::default(),
        Arc::new(Emitter::new("kpi", sink)),
    );
    out.final_ms = started.elapsed().as_secs_f64() * 1e3;
    out.first_output_ms = *first.lock().unwrap_or_else(|x| x.into_inner());
    out.partials = partials.load(std::sync::atomic::Ordering::SeqCst);
    let (l, tr) = *timing.lock().unwrap_or_else(|x| x.into_inner());
    out.load_ms = l;
    out.transfer_ms = tr;
    match r {
        Ok(rep) => {
            out.tracked_peak_bytes = rep.tracked_peak_bytes;
            out.announce_delays_ms = rep.announce_delays_ms.clone();
            out.chunks = rep.nodes.iter().map(|n| n.chunks as u64).sum();
            out.sampler_ms = rep
                .nodes
                .iter()
                .find(|n| n.class_type == "KSampler")
                .map(|n| n.wall_ms);
        }
        Err(e) => {
            out.oom = is_oom(&e);
            out.error = Some(e.to_string());
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&env.output_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    out.outputs = files;
    out
}

/// Whether a run failed for want of device memory.
pub fn is_oom(e: &RunError) -> bool {
    e.to_string().contains("out of device memory")
}
