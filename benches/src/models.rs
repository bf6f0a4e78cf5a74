//! The models benchmark's pieces (`benches/models.rs`): TAESD and the tiny SD1 UNet with
//! their weights read into memory once, the PyTorch comparison, and the preview-overhead run.

use crate::memory::models_dir;
use candle_core::{Device, Tensor};
use nova_dataflow::{
    plan, run, workflow, Emitter, EventSink, JobEnv, PlanOptions, PreviewMethod, RunOptions,
    WeightSource,
};
use nova_operators::model::safetensors::SafetensorsFile;
use nova_operators::model::taesd::{Part, TaesdNet};
use nova_operators::model::unet;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every tensor of a safetensors file, read into memory.
fn read_all(path: &Path) -> (SafetensorsFile, HashMap<String, Tensor>) {
    let f = SafetensorsFile::open(path).expect("benchmark weights open");
    let all = f
        .names()
        .into_iter()
        .map(|n| {
            let t = f.read(&n).expect("tensor reads");
            (n, t)
        })
        .collect();
    (f, all)
}

/// A TAESD half (SD1 layout) with its weights in memory.
pub struct Taesd {
    net: TaesdNet,
    weights: HashMap<String, Tensor>,
}

impl Taesd {
    fn load(part: Part) -> Taesd {
        let file = match part {
            Part::Encoder => "taesd_encoder.safetensors",
            Part::Decoder => "taesd_decoder.safetensors",
        };
        let (f, weights) = read_all(&models_dir().join("taesd/synthetic-sd1-layout").join(file));
        let net = TaesdNet::from_source(&f, part).expect("TAESD layout");
        Taesd { net, weights }
    }

    pub fn decoder() -> Taesd {
        Self::load(Part::Decoder)
    }

    pub fn encoder() -> Taesd {
        Self::load(Part::Encoder)
    }

    /// One forward pass.
    pub fn run(&self, x: &Tensor) -> Tensor {
        self.net
            .forward(x, &|n| {
                self.weights
                    .get(n)
                    .cloned()
                    .ok_or_else(|| nova_dataflow::NodeError::Other(format!("no tensor {n}")))
            })
            .expect("TAESD runs")
    }

    /// Median seconds of `runs` passes after one warm-up.
    pub fn median_s(&self, x: &Tensor, runs: usize) -> f64 {
        self.run(x);
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                let s = Instant::now();
                std::hint::black_box(self.run(x));
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }
}

/// The tiny SD1 UNet with its weights in memory, and one guided step's inputs (64x64 image,
/// batch of two for classifier-free guidance).
pub struct TinyUnet {
    weights: HashMap<String, Tensor>,
    x: Tensor,
    t: Tensor,
    context: Tensor,
}

impl TinyUnet {
    pub fn load() -> TinyUnet {
        let (_, weights) = read_all(&models_dir().join("tiny-sd1/tiny_sd1.safetensors"));
        let (_, r) = read_all(&models_dir().join("tiny-sd1/reference.safetensors"));
        let x = &r["unet_latent_in"];
        let c = &r["text_last_hidden_state"];
        TinyUnet {
            x: Tensor::cat(&[x, x], 0).expect("batch"),
            t: Tensor::cat(&[&r["unet_timestep"], &r["unet_timestep"]], 0).expect("batch"),
            context: Tensor::cat(&[c, c], 0).expect("batch"),
            weights,
        }
    }

    /// One noise prediction.
    pub fn step(&self) -> Tensor {
        unet::predict_noise(
            &self.x,
            &self.t,
            &self.context,
            &|n| {
                self.weights
                    .get(n)
                    .cloned()
                    .ok_or_else(|| nova_dataflow::NodeError::Other(format!("no tensor {n}")))
            },
            &|n| self.weights.contains_key(n),
        )
        .expect("UNet runs")
    }
}

/// The Python that has PyTorch: `NOVA_BENCH_PYTHON`, else `benches/pytorch/.venv`.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NOVA_BENCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("pytorch/.venv/bin/python");
    venv.is_file().then_some(venv)
}

/// TAESD decode and encode at 512x512, PyTorch (2 threads) against NOVA.
pub struct TorchFigures {
    pub torch: String,
    pub threads: u64,
    pub decode_max_err: f64,
    pub encode_max_err: f64,
    pub torch_decode_s: f64,
    pub torch_encode_s: f64,
    pub nova_decode_s: f64,
    pub nova_encode_s: f64,
}

impl std::fmt::Display for TorchFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PyTorch {} ({} threads; reference max |err| decode {:.1e}, encode {:.1e})\n\
             decode: NOVA {:.3} s, PyTorch {:.3} s, NOVA/PyTorch {:.2}\n\
             encode: NOVA {:.3} s, PyTorch {:.3} s, NOVA/PyTorch {:.2}",
            self.torch,
            self.threads,
            self.decode_max_err,
            self.encode_max_err,
            self.nova_decode_s,
            self.torch_decode_s,
            self.nova_decode_s / self.torch_decode_s,
            self.nova_encode_s,
            self.torch_encode_s,
            self.nova_encode_s / self.torch_encode_s,
        )
    }
}

/// Times TAESD decode and encode at 512x512 with PyTorch (2 threads) and with NOVA, `runs`
/// passes each (median); an error when PyTorch is not set up (benches/pytorch/setup.sh).
pub fn pytorch_figures(runs: usize) -> Result<TorchFigures, String> {
    let py = python().ok_or("no Python with PyTorch (run benches/pytorch/setup.sh)")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pytorch/taesd_bench.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(models_dir())
        .args(["--threads", "2", "--runs", &runs.to_string()])
        .output()
        .map_err(|e| format!("{}: {e}", py.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the PyTorch script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("PyTorch's answer: {e}"))?;
    let f = |k: &str| v[k].as_f64().ok_or(format!("PyTorch's answer lacks {k}"));
    let latent =
        Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &Device::Cpu).map_err(|e| e.to_string())?;
    let image =
        Tensor::rand(0f32, 1.0, (1, 3, 512, 512), &Device::Cpu).map_err(|e| e.to_string())?;
    Ok(TorchFigures {
        torch: v["torch"].as_str().unwrap_or("?").to_string(),
        threads: v["threads"].as_u64().unwrap_or(0),
        decode_max_err: f("decode_max_err")?,
        encode_max_err: f("encode_max_err")?,
        torch_decode_s: f("decode_s")?,
        torch_encode_s: f("encode_s")?,
        nova_decode_s: Taesd::decoder().median_s(&latent, runs),
        nova_encode_s: Taesd::encoder().median_s(&image, runs),
    })
}

/// [`pytorch_figures`] as text.
pub fn pytorch_comparison(runs: usize) -> Result<String, String> {
    pytorch_figures(runs).map(|f| f.to_string())
}

/// ComfyUI's default txt2img workflow on the tiny checkpoint at `size`x`size`.
fn txt2img(size: usize) -> String {
    format!(
        r#"{{
  "3": {{"class_type": "KSampler", "inputs": {{"seed": 1, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}}},
  "4": {{"class_type": "CheckpointLoaderSimple", "inputs": {{"ckpt_name": "tiny_sd1.safetensors"}}}},
  "5": {{"class_type": "EmptyLatentImage", "inputs": {{"width": {size}, "height": {size}, "batch_size": 1}}}},
  "6": {{"class_type": "CLIPTextEncode", "inputs": {{"text": "a bottle", "clip": ["4", 1]}}}},
  "7": {{"class_type": "CLIPTextEncode", "inputs": {{"text": "text", "clip": ["4", 1]}}}},
  "8": {{"class_type": "VAEDecode", "inputs": {{"samples": ["3", 0], "vae": ["4", 2]}}}},
  "9": {{"class_type": "PreviewImage", "inputs": {{"images": ["8", 0]}}}}
}}"#
    )
}

/// The sampler node's wall time in one run of the workflow with `preview`, and the previews'
/// methods.
fn sampler_time(dir: &Path, size: usize, preview: PreviewMethod) -> (Duration, Vec<String>) {
    let env = JobEnv::new(dir.join("in"), dir.join("out"), dir.join("tmp"))
        .with_models_dir(dir.join("models"))
        .with_preview(preview);
    let registry = nova_operators::registry();
    let wf = workflow::load(&txt2img(size), &registry, &env).expect("workflow validates");
    let opts = PlanOptions {
        workers: 2,
        ..PlanOptions::default()
    };
    let p = plan(&wf, &env, &opts).expect("plans");
    let methods = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = methods.clone();
    let sink: EventSink = Arc::new(move |e| {
        if let nova_dataflow::EventKind::Preview { method, .. } = &e.kind {
            seen.lock().expect("not poisoned").push(method.clone());
        }
    });
    let report = run(
        Arc::new(wf),
        Arc::new(p),
        env,
        RunOptions::default(),
        Arc::new(Emitter::new("bench", sink)),
    )
    .expect("txt2img runs");
    let ms = report
        .nodes
        .iter()
        .find(|n| n.node == "3")
        .map(|n| n.wall_ms)
        .unwrap_or(0.0);
    let m = std::mem::take(&mut *methods.lock().expect("not poisoned"));
    (Duration::from_secs_f64(ms / 1e3), m)
}

/// Sampler time with `auto` previews (TAESD's decoder present) over time without previews,
/// alternated `rounds` times; the median ratio and how previews were made.
pub fn preview_overhead(size: usize, rounds: usize) -> String {
    let dir = tempfile_dir();
    for (sub, from, to) in [
        (
            "checkpoints",
            "tiny-sd1/tiny_sd1.safetensors",
            "tiny_sd1.safetensors",
        ),
        (
            "vae_approx",
            "taesd/synthetic-sd1-layout/taesd_decoder.safetensors",
            "taesd_decoder.safetensors",
        ),
    ] {
        let d = dir.join("models").join(sub);
        std::fs::create_dir_all(&d).expect("bench folder");
        std::fs::copy(models_dir().join(from), d.join(to)).expect("copy model");
    }
    // Warm-up (maps the weights).
    sampler_time(&dir, size, PreviewMethod::None);
    let mut ratios = Vec::new();
    let mut methods = Vec::new();
    let (mut with, mut without) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let (a, m) = sampler_time(&dir, size, PreviewMethod::Auto);
        let (b, _) = sampler_time(&dir, size, PreviewMethod::None);
        ratios.push(a.as_secs_f64() / b.as_secs_f64());
        methods = m;
        with += a;
        without += b;
    }
    let _ = std::fs::remove_dir_all(&dir);
    ratios.sort_by(f64::total_cmp);
    let taesd = methods.iter().filter(|m| *m == "taesd").count();
    format!(
        "{size}x{size}: sampler {:.1} ms with previews, {:.1} ms without; median ratio {:.3} \
         over {rounds} alternated rounds; previews per run {} ({taesd} TAESD, {} latent2rgb)",
        with.as_secs_f64() * 1e3 / rounds as f64,
        without.as_secs_f64() * 1e3 / rounds as f64,
        ratios[ratios.len() / 2],
        methods.len(),
        methods.len() - taesd,
    )
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nova-bench-models-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("bench folder");
    d
}
