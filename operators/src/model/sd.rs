//! Stable Diffusion 1.x nodes with ComfyUI's names and inputs: `CheckpointLoaderSimple`,
//! `CLIPTextEncode`, `KSampler` and `KSamplerAdvanced`.
//!
//! A single-file checkpoint in the original key layout is one asset in the residency
//! registry; each node puts only its own part on the device (`model.diffusion_model.`,
//! `cond_stage_model.transformer.`, `first_stage_model.`), counted by the run's accountant.
//!
//! The samplers are iterative nodes: each step is its own dataflow time (progress events per
//! step) and makes a preview of the denoised estimate.
//!
//! Prompts follow ComfyUI: `(word:1.2)` emphasis and 77-token windows for long prompts
//! ([`super::prompt`]).

use super::clip::{self, ClipTextConfig, ClipTokenizer};
use super::preview::Previewer;
use super::prompt;
use super::sampling::{self, SamplerKind, Sampling, Schedule, SAMPLERS, SCHEDULERS};
use super::unet;
use super::vae::KlVae;
use crate::spec::{combo, float, int, link, out};
use candle_core::{Device, Tensor};
use nova_dataflow::{
    Args, Asset, DataType, DeviceWeights, ExecContext, FileFolder, InputKind, InputSpec, Inputs,
    JobEnv, MemoryEstimate, MemoryQuery, ModelInfo, ModelRef, Node, NodeError, NodeOutput,
    NodeSchema, StepPreview, Stepper, Value, ValueInfo, WeightSource,
};
use std::sync::Arc;
use std::time::Instant;

/// The folder under the models folder where checkpoints live (ComfyUI's name).
pub const FOLDER: &str = "checkpoints";

fn bytes_with_prefix(src: &dyn WeightSource, prefix: &str) -> u64 {
    src.names()
        .iter()
        .filter(|n| n.starts_with(prefix))
        .filter_map(|n| src.f32_bytes(n))
        .sum()
}

fn info(bytes: u64, per_px: u64, tileable: bool) -> ModelInfo {
    ModelInfo {
        bytes,
        block_bytes: 0,
        scale: 8,
        halo: 0,
        activation_per_pixel: per_px,
        tileable,
    }
}

/// `CheckpointLoaderSimple`.
pub struct CheckpointLoaderSimple {
    schema: NodeSchema,
}

impl CheckpointLoaderSimple {
    pub fn new() -> Self {
        CheckpointLoaderSimple {
            schema: NodeSchema {
                class_type: "CheckpointLoaderSimple",
                display_name: "Load Checkpoint",
                category: "loaders",
                description: "Loads an SD1.x single-file checkpoint (.safetensors, original key layout) from models/checkpoints/.",
                inputs: vec![InputSpec {
                    name: "ckpt_name",
                    kind: InputKind::File {
                        folder: FileFolder::Models(FOLDER),
                        image_upload: false,
                    },
                    required: true,
                    tooltip: "",
                }],
                outputs: vec![
                    out("MODEL", DataType::Model),
                    out("CLIP", DataType::Clip),
                    out("VAE", DataType::Vae),
                ],
                output_node: false,
            },
        }
    }

    fn open(
        args: &Args,
        env: &JobEnv,
        log: Option<&nova_dataflow::residency::DeltaLog>,
    ) -> Result<(Arc<Asset>, ClipTextConfig), NodeError> {
        let name = args.string("ckpt_name")?;
        if !name.ends_with(".safetensors") {
            return Err(NodeError::input(
                "ckpt_name",
                format!("'{name}': NOVA loads weights from .safetensors files only"),
            ));
        }
        let path = env
            .require_model(FOLDER, name)
            .map_err(|r| NodeError::input("ckpt_name", r))?;
        let asset = super::open_asset(name, &path, log)?;
        let src = asset.source();
        let missing = |what: &str, key: &str| {
            NodeError::File {
            path: path.display().to_string(),
            reason: format!("tensor '{key}' is missing: no {what} in this checkpoint (SD1.x original key layout expected)"),
        }
        };
        for (what, key) in [
            ("UNet", "model.diffusion_model.input_blocks.0.0.weight"),
            ("VAE", "first_stage_model.decoder.conv_in.weight"),
        ] {
            if src.shape(key).is_none() {
                return Err(missing(what, key));
            }
        }
        let cfg = ClipTextConfig::from_shapes(&|n| src.shape(n)).map_err(|e| NodeError::File {
            path: path.display().to_string(),
            reason: format!("text encoder: {e}"),
        })?;
        Ok((asset, cfg))
    }

    fn infos(asset: &Asset) -> [ModelInfo; 3] {
        let src = asset.source();
        let model_ch = src
            .shape("model.diffusion_model.input_blocks.0.0.weight")
            .map(|s| s[0] as u64)
            .unwrap_or(320);
        [
            // UNet activations per latent pixel: a few dozen feature maps at the widest level.
            info(
                bytes_with_prefix(src, unet::PREFIX),
                model_ch * 4 * 64,
                false,
            ),
            info(bytes_with_prefix(src, clip::PREFIX), 0, false),
            // Not tile-local (GroupNorm statistics and the mid-block's attention span the
            // whole latent): the planner runs it whole; VAEDecodeTiled tiles it on request.
            info(
                bytes_with_prefix(src, super::kl_vae::PREFIX),
                super::kl_vae::decode_bytes_per_latent_px(src),
                false,
            ),
        ]
    }
}

impl Node for CheckpointLoaderSimple {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        Self::open(args, env, None).map(|_| ())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let (asset, _) = Self::open(args, env, None)?;
        Ok(Self::infos(&asset).map(ValueInfo::Model).to_vec())
    }

    fn memory(&self, _args: &Args, _query: &MemoryQuery) -> MemoryEstimate {
        MemoryEstimate::default()
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let (asset, cfg) = Self::open(args, &ctx.env, Some(&ctx.weights.log))?;
        let [m, c, v] = Self::infos(&asset);
        let model = |kind, arch: Arc<dyn std::any::Any + Send + Sync>, info| {
            Value::Model(ModelRef {
                kind,
                asset: asset.clone(),
                arch,
                info,
            })
        };
        Ok(NodeOutput {
            values: vec![
                model(DataType::Model, Arc::new(()), m),
                model(DataType::Clip, Arc::new(cfg), c),
                model(DataType::Vae, Arc::new(KlVae), v),
            ],
            ui: None,
        })
    }
}

/// `CLIPTextEncode`: a prompt to conditioning (the text encoder's last layer, normed), with
/// ComfyUI's emphasis weights and 77-token windows (see [`super::prompt`]).
pub struct ClipTextEncode {
    schema: NodeSchema,
}

impl ClipTextEncode {
    pub fn new() -> Self {
        ClipTextEncode {
            schema: NodeSchema {
                class_type: "CLIPTextEncode",
                display_name: "CLIP Text Encode (Prompt)",
                category: "conditioning",
                description: "Encodes a text prompt with the checkpoint's CLIP text model.",
                inputs: vec![
                    InputSpec {
                        name: "text",
                        kind: InputKind::String {
                            default: String::new(),
                            multiline: true,
                        },
                        required: true,
                        tooltip: "",
                    },
                    link("clip", DataType::Clip),
                ],
                outputs: vec![out("CONDITIONING", DataType::Conditioning)],
                output_node: false,
            },
        }
    }
}

impl Node for ClipTextEncode {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn infer(
        &self,
        _args: &Args,
        _inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Unknown])
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let model = inputs.model("clip", DataType::Clip)?;
        let cfg = model
            .arch
            .clone()
            .downcast::<ClipTextConfig>()
            .map_err(|_| NodeError::input("clip", "not a CLIP text model"))?;
        let weights = DeviceWeights::part(model.asset.clone(), ctx.weights.clone(), clip::PREFIX)?;
        let cond = prompt::encode_prompt(ClipTokenizer::get(), args.string("text")?, &|ids| {
            Ok(clip::encode_text(&cfg, ids, &|n| weights.get(n).cloned())?.1)
        })?;
        Ok(NodeOutput {
            values: vec![Value::Conditioning(nova_dataflow::TensorBox::new(cond))],
            ui: None,
        })
    }
}

fn conditioning(inputs: &Inputs<Value>, name: &str) -> Result<Tensor, NodeError> {
    inputs
        .require(name)?
        .as_conditioning()
        .cloned()
        .ok_or_else(|| NodeError::input(name, "expected CONDITIONING"))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// The sigmas a sampler node's args ask for: `KSampler`'s steps and denoise, or
/// `KSamplerAdvanced`'s step range.
fn sampler_sigmas(args: &Args, advanced: bool) -> Result<Vec<f64>, NodeError> {
    let steps = args.int("steps")? as usize;
    let scheduler = args.string("scheduler")?;
    let schedule = Schedule::sd1();
    if !advanced {
        return schedule
            .sigmas_denoised(scheduler, steps, args.float("denoise")?)
            .map_err(|e| NodeError::input("scheduler", e));
    }
    let mut sigmas = schedule
        .sigmas(scheduler, steps)
        .map_err(|e| NodeError::input("scheduler", e))?;
    let (start, end) = (
        args.int("start_at_step")? as usize,
        args.int("end_at_step")? as usize,
    );
    // As ComfyUI: stop at `end_at_step` (fully denoised unless leftover noise is asked for),
    // then start at `start_at_step`.
    if end < steps {
        sigmas.truncate(end + 1);
        if args.string("return_with_leftover_noise")? != "enable" {
            if let Some(last) = sigmas.last_mut() {
                *last = 0.0;
            }
        }
    }
    Ok(if start < sigmas.len() {
        sigmas[start..].to_vec()
    } else {
        vec![]
    })
}

/// A sampler node's run in progress: the UNet on the device for the whole run, the
/// conditioning of both halves, the sampler's state and the previewer.
struct SamplerRun {
    weights: DeviceWeights,
    asset: Arc<Asset>,
    /// Unconditional then conditional context, repeated over the batch.
    context: Tensor,
    batch: usize,
    cfg: f64,
    schedule: Schedule,
    sampling: Sampling,
    previewer: Option<Previewer>,
}

impl SamplerRun {
    /// Noises the latent (unless `add_noise` is disabled) and places the UNet.
    fn start(
        args: &Args,
        inputs: &Inputs<Value>,
        ctx: &ExecContext,
        advanced: bool,
        previews: bool,
    ) -> Result<SamplerRun, NodeError> {
        let model = inputs.model("model", DataType::Model)?;
        let (positive, negative) = (
            conditioning(inputs, "positive")?,
            conditioning(inputs, "negative")?,
        );
        let latent = inputs.latent("latent_image")?;
        let kind = SamplerKind::parse(args.string("sampler_name")?)?;
        let sigmas = sampler_sigmas(args, advanced)?;
        let (seed, add_noise) = if advanced {
            (
                args.int("noise_seed")? as u64,
                args.string("add_noise")? == "enable",
            )
        } else {
            (args.int("seed")? as u64, true)
        };
        let weights = DeviceWeights::part(model.asset.clone(), ctx.weights.clone(), unet::PREFIX)?;
        let (b, c, _, _) = latent.dims4()?;
        // Prompts of different lengths (77-token windows) are repeated to a common length,
        // as ComfyUI does.
        let (np, nn) = (positive.dim(1)?, negative.dim(1)?);
        let common = np / gcd(np, nn) * nn;
        let widen = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            let t = Tensor::cat(&vec![t; common / n], 1)?;
            Tensor::cat(&vec![&t; b], 0)
        };
        let context = Tensor::cat(&[widen(&negative, nn)?, widen(&positive, np)?], 0)?;
        let x = match sigmas.first() {
            Some(&first) if add_noise => {
                let n = sampling::noise(seed, latent.dims(), latent.device())?;
                (latent + (n * first)?)?
            }
            _ => latent.clone(),
        };
        Ok(SamplerRun {
            weights,
            asset: model.asset.clone(),
            context,
            batch: b,
            cfg: args.float("cfg")?,
            schedule: Schedule::sd1(),
            sampling: Sampling::new(kind, x, sigmas, seed),
            previewer: if previews {
                Previewer::new(ctx, c)
            } else {
                None
            },
        })
    }

    /// Runs every step left (started without previews, it makes none).
    fn run(mut self) -> Result<Tensor, NodeError> {
        while self.sampling.remaining() > 0 {
            self.step()?;
        }
        Ok(self.sampling.into_latent())
    }
}

impl Stepper for SamplerRun {
    fn step(&mut self) -> Result<Option<StepPreview>, NodeError> {
        let started = Instant::now();
        let src = self.asset.source();
        let get = |n: &str| self.weights.get(n).cloned();
        let has = |n: &str| src.shape(n).is_some();
        let (b, cfg, schedule, context) = (self.batch, self.cfg, &self.schedule, &self.context);
        // Classifier-free guidance: both halves as one batch of two.
        let mut denoise = |x: &Tensor, sigma: f64| -> Result<Tensor, NodeError> {
            let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
            let xin = (Tensor::cat(&[x, x], 0)? * c_in)?;
            let t = Tensor::full(schedule.timestep(sigma) as f32, 2 * b, &Device::Cpu)?
                .to_device(x.device())?;
            let eps = unet::predict_noise(&xin, &t, context, &get, &has)?;
            let (eps_u, eps_c) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
            let eps = (&eps_u + ((eps_c - &eps_u)? * cfg)?)?;
            Ok((x - (eps * sigma)?)?)
        };
        let denoised = self.sampling.step(&mut denoise)?;
        self.previewer
            .as_mut()
            .map(|p| p.preview(&denoised, started.elapsed()))
            .transpose()
    }

    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput {
            values: vec![Value::latent(self.sampling.into_latent())],
            ui: None,
        })
    }
}

fn sampler_inputs() -> Vec<InputSpec> {
    vec![
        float("cfg", 8.0, 0.0, 100.0, 0.1),
        combo("sampler_name", &SAMPLERS),
        combo("scheduler", &SCHEDULERS),
        link("positive", DataType::Conditioning),
        link("negative", DataType::Conditioning),
        link("latent_image", DataType::Latent),
    ]
}

fn sampler_memory(query: &MemoryQuery) -> MemoryEstimate {
    let m = query.inputs.iter().find_map(|i| match i {
        ValueInfo::Model(m) => Some(*m),
        _ => None,
    });
    let px: u64 = query
        .inputs
        .iter()
        .map(|i| match i {
            ValueInfo::Latent {
                batch,
                height,
                width,
                ..
            } => (batch * height * width) as u64,
            _ => 0,
        })
        .sum();
    let out: u64 = query.outputs.iter().filter_map(|o| o.bytes()).sum();
    // Self-attention at the first level: scores in query slices of bounded size (see
    // `unet::ATTENTION_BLOCK_BYTES`), so linear in the latent's pixels past the first slice.
    let tokens: u64 = query
        .inputs
        .iter()
        .map(|i| match i {
            ValueInfo::Latent { height, width, .. } => (height * width) as u64,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    let batch = px / tokens.max(1);
    // Conditional and unconditional halves: a batch of two per item.
    let attention = unet::attention_bytes(2 * batch as usize, tokens as usize);
    MemoryEstimate {
        weights: m.map(|m| m.bytes).unwrap_or(0),
        // Conditional and unconditional halves run as one batch of two.
        activations: out + 2 * px * m.map(|m| m.activation_per_pixel).unwrap_or(0) + attention,
        weight_block: 0,
    }
}

/// `KSampler` and `KSamplerAdvanced`: an iterative node, one dataflow time per step, with a
/// preview after each (see [`super::preview`]).
pub struct KSampler {
    schema: NodeSchema,
    advanced: bool,
}

impl KSampler {
    /// `KSampler`.
    pub fn new() -> Self {
        let mut inputs = vec![
            link("model", DataType::Model),
            int("seed", 0, 0, i64::MAX),
            int("steps", 20, 1, 10000),
        ];
        inputs.extend(sampler_inputs());
        inputs.push(float("denoise", 1.0, 0.0, 1.0, 0.01));
        KSampler {
            schema: NodeSchema {
                class_type: "KSampler",
                display_name: "KSampler",
                category: "sampling",
                description: "Denoises a latent with the model, guided by positive and negative conditioning.",
                inputs,
                outputs: vec![out("LATENT", DataType::Latent)],
                output_node: false,
            },
            advanced: false,
        }
    }

    /// `KSamplerAdvanced`.
    pub fn advanced() -> Self {
        let mut inputs = vec![
            link("model", DataType::Model),
            combo("add_noise", &["enable", "disable"]),
            int("noise_seed", 0, 0, i64::MAX),
            int("steps", 20, 1, 10000),
        ];
        inputs.extend(sampler_inputs());
        inputs.push(int("start_at_step", 0, 0, 10000));
        inputs.push(int("end_at_step", 10000, 0, 10000));
        inputs.push(combo("return_with_leftover_noise", &["disable", "enable"]));
        KSampler {
            schema: NodeSchema {
                class_type: "KSamplerAdvanced",
                display_name: "KSampler (Advanced)",
                category: "sampling",
                description:
                    "KSampler over a range of steps, with optional noise and leftover noise.",
                inputs,
                outputs: vec![out("LATENT", DataType::Latent)],
                output_node: false,
            },
            advanced: true,
        }
    }
}

impl Node for KSampler {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn infer(
        &self,
        _args: &Args,
        inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![inputs
            .get("latent_image")
            .copied()
            .unwrap_or(ValueInfo::Unknown)])
    }

    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        sampler_memory(query)
    }

    fn steps(&self, args: &Args) -> u32 {
        // Bad args plan as a whole run, which reports them when it executes.
        sampler_sigmas(args, self.advanced).map_or(0, |s| s.len().saturating_sub(1) as u32)
    }

    fn start(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<Box<dyn Stepper>, NodeError> {
        Ok(Box::new(SamplerRun::start(
            args,
            &inputs,
            ctx,
            self.advanced,
            true,
        )?))
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let latent = SamplerRun::start(args, &inputs, ctx, self.advanced, false)?.run()?;
        Ok(NodeOutput {
            values: vec![Value::latent(latent)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(CheckpointLoaderSimple, ClipTextEncode, KSampler);
