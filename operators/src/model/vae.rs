//! `VAELoader`, `VAEDecode` and `VAEEncode` (ComfyUI names and inputs) for the TAESD family.
//!
//! `VAELoader`'s `vae_name` takes, as ComfyUI does, the name of an approximate VAE whose
//! `<name>_encoder.safetensors` / `<name>_decoder.safetensors` sit in `models/vae_approx/`
//! (`taesd`, `taesdxl`, `taesd3`, `taef1`, `taef2`). Full KL-VAE files from `models/vae/` are
//! refused with a clear message until the full VAE lands.

use super::kl_vae;
use super::taesd::{Part, TaesdNet};
use super::vae_tiled::TiledVae;
use crate::spec::{int_step, link, out, string};
use candle_core::Tensor;
use nova_dataflow::{
    Args, Asset, Chunking, DataType, DeviceWeights, ExecContext, ExecMode, ImageInfo, InputSpec,
    Inputs, JobEnv, MemoryEstimate, MemoryQuery, ModelInfo, ModelRef, Node, NodeError, NodeMeta,
    NodeOutput, NodeSchema, Value, ValueInfo,
};
use std::path::PathBuf;
use std::sync::Arc;

/// The approximate-VAE folder under the models folder (ComfyUI's name).
pub const APPROX: &str = "vae_approx";

/// A loaded TAESD-family VAE: its encoder and decoder, where present.
pub struct TaesdVae {
    pub encoder: Option<(Arc<Asset>, TaesdNet)>,
    pub decoder: Option<(Arc<Asset>, TaesdNet)>,
}

/// `<name>_encoder.safetensors` or `_decoder` from the approximate-VAE folders, if present.
fn part_path(env: &JobEnv, name: &str, part: Part) -> Result<Option<PathBuf>, NodeError> {
    let suffix = match part {
        Part::Encoder => "encoder",
        Part::Decoder => "decoder",
    };
    env.find_model(APPROX, &format!("{name}_{suffix}.safetensors"))
        .map_err(|r| NodeError::input("vae_name", r))
}

impl TaesdVae {
    /// Opens `name`'s encoder and decoder through the registry; at least one must exist.
    fn open(
        name: &str,
        env: &JobEnv,
        log: Option<&nova_dataflow::residency::DeltaLog>,
    ) -> Result<TaesdVae, NodeError> {
        if name.ends_with(".safetensors") || name.ends_with(".pt") || name.ends_with(".ckpt") {
            return Err(NodeError::input(
                "vae_name",
                format!("'{name}': full VAE files from models/vae/ are not supported yet; use a TAESD-family VAE from models/{APPROX}/ (e.g. 'taesd')"),
            ));
        }
        let mut vae = TaesdVae {
            encoder: None,
            decoder: None,
        };
        for part in [Part::Encoder, Part::Decoder] {
            let Some(path) = part_path(env, name, part)? else {
                continue;
            };
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let asset = super::open_asset(&file, &path, log)?;
            let net = TaesdNet::from_source(asset.source(), part)?;
            match part {
                Part::Encoder => vae.encoder = Some((asset, net)),
                Part::Decoder => vae.decoder = Some((asset, net)),
            }
        }
        if vae.encoder.is_none() && vae.decoder.is_none() {
            return Err(NodeError::input(
                "vae_name",
                format!(
                    "no {name}_encoder.safetensors or {name}_decoder.safetensors in {}",
                    env.model_dirs_text(APPROX)
                ),
            ));
        }
        Ok(vae)
    }

    fn info(&self) -> ModelInfo {
        let bytes = [&self.encoder, &self.decoder]
            .iter()
            .filter_map(|p| p.as_ref().map(|(a, _)| a.bytes_total()))
            .max()
            .unwrap_or(0);
        ModelInfo {
            bytes,
            block_bytes: 0,
            scale: 8,
            halo: 0,
            activation_per_pixel: self
                .decoder
                .as_ref()
                .map(|(_, n)| n.activation_per_pixel())
                .unwrap_or(0),
            tileable: true,
        }
    }

    fn part(&self, part: Part) -> Result<&(Arc<Asset>, TaesdNet), NodeError> {
        match part {
            Part::Encoder => self.encoder.as_ref(),
            Part::Decoder => self.decoder.as_ref(),
        }
        .ok_or_else(|| NodeError::input("vae", format!("this VAE has no {part:?}")))
    }
}

/// The autoencoder of a single-file SD1 checkpoint (`first_stage_model.`).
pub struct KlVae;

/// Runs one part of the VAE on `x` with its weights resident for the call. Images are in
/// `[0, 1]` (`[b, 3, h, w]`), latents are diffusion latents, for every kind of VAE.
fn run_part(
    model: &ModelRef,
    part: Part,
    x: &Tensor,
    ctx: &ExecContext,
) -> Result<Tensor, NodeError> {
    if model.arch.clone().downcast::<KlVae>().is_ok() {
        let weights =
            DeviceWeights::part(model.asset.clone(), ctx.weights.clone(), kl_vae::PREFIX)?;
        let src = model.asset.source();
        return kl_vae::forward(part, x, &|n| weights.get(n).cloned(), &|n| {
            src.shape(n).is_some()
        });
    }
    let vae = model
        .arch
        .clone()
        .downcast::<TaesdVae>()
        .map_err(|_| NodeError::input("vae", "not a TAESD-family VAE"))?;
    let (asset, net) = vae.part(part)?;
    let weights = DeviceWeights::new(asset.clone(), ctx.weights.clone())?;
    net.forward(x, &|n| weights.get(n).cloned())
}

/// `VAELoader`.
pub struct VaeLoader {
    schema: NodeSchema,
}

impl VaeLoader {
    pub fn new() -> Self {
        VaeLoader {
            schema: NodeSchema {
                class_type: "VAELoader",
                display_name: "Load VAE",
                category: "loaders",
                description: "Loads a TAESD-family VAE (e.g. 'taesd') from models/vae_approx/.",
                inputs: vec![string("vae_name", "taesd")],
                outputs: vec![out("VAE", DataType::Vae)],
                output_node: false,
            },
        }
    }
}

impl Node for VaeLoader {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        TaesdVae::open(args.string("vae_name")?, env, None).map(|_| ())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let vae = TaesdVae::open(args.string("vae_name")?, env, None)?;
        Ok(vec![ValueInfo::Model(vae.info())])
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
        let vae = TaesdVae::open(args.string("vae_name")?, &ctx.env, Some(&ctx.weights.log))?;
        let info = vae.info();
        let asset = vae
            .decoder
            .as_ref()
            .or(vae.encoder.as_ref())
            .map(|(a, _)| a.clone())
            .expect("open returns at least one part");
        Ok(NodeOutput {
            values: vec![Value::Model(ModelRef {
                kind: DataType::Vae,
                asset,
                arch: Arc::new(vae),
                info,
            })],
            ui: None,
        })
    }
}

fn model_info(inputs: &[ValueInfo]) -> Option<ModelInfo> {
    inputs.iter().find_map(|i| match i {
        ValueInfo::Model(m) => Some(*m),
        _ => None,
    })
}

/// The overlap (output pixels) of automatic tiled decode: ComfyUI's `VAEDecodeTiled` default.
pub const DEFAULT_OVERLAP: usize = 64;

/// The tile inputs of ComfyUI's tiled VAE nodes.
fn tile_inputs(tile_step: i64) -> Vec<InputSpec> {
    let optional = |spec: InputSpec| InputSpec {
        required: false,
        ..spec
    };
    vec![
        int_step("tile_size", 512, 64, 4096, tile_step),
        int_step("overlap", 64, 0, 4096, 32),
        optional(int_step("temporal_size", 64, 8, 4096, 4)),
        optional(int_step("temporal_overlap", 8, 4, 4096, 4)),
    ]
}

/// Activation bytes per image pixel while encoding, from the VAE's per-latent-pixel decode
/// figure: the encoder's widest level mirrors the decoder's (64 image pixels a latent pixel);
/// TAESD's 64 channels with 3x3 patches when unknown.
fn encode_per_px(decode_per_latent_px: u64) -> u64 {
    match decode_per_latent_px / 64 {
        0 => 64 * 13 * 4,
        n => n,
    }
}

/// VAEDecode's and VAEEncode's modes: whole when it fits; tiles blend their overlaps, so they
/// only approximate it.
fn whole_first() -> NodeMeta {
    NodeMeta {
        modes: vec![ExecMode::Atomic, ExecMode::Tiled],
        ..NodeMeta::default()
    }
}

/// The planner's tiles for VAEDecode/VAEEncode: a tile-local VAE, ComfyUI's default overlap.
fn auto_tiles(part: Part, inputs: &Inputs<ValueInfo>) -> Option<Chunking> {
    let m = tileable_vae(inputs)?;
    let (input, op) = match part {
        Part::Decoder => (
            "samples",
            TiledVae::new(DEFAULT_OVERLAP, m.activation_per_pixel),
        ),
        Part::Encoder => (
            "pixels",
            TiledVae::encoder(DEFAULT_OVERLAP, encode_per_px(m.activation_per_pixel)),
        ),
    };
    Some(Chunking {
        input,
        op: Arc::new(op),
        max_tile: None,
    })
}

/// The tileable VAE among a node's planned inputs.
fn tileable_vae(inputs: &Inputs<ValueInfo>) -> Option<ModelInfo> {
    match inputs.get("vae") {
        Some(ValueInfo::Model(m)) if m.tileable => Some(*m),
        _ => None,
    }
}

/// `VAEDecodeTiled` and `VAEEncodeTiled`: decode or encode in tiles of at most `tile_size`
/// pixels with `overlap` pixels blended between them. `temporal_size` and `temporal_overlap`
/// (ComfyUI's, for video VAEs) are accepted and do not apply to images. A VAE that is not
/// tile-local (a checkpoint's KL VAE: GroupNorm and attention span the whole latent) is tiled
/// too, as ComfyUI does; its tiles then only approximate the whole run.
pub struct VaeDecodeTiled {
    schema: NodeSchema,
    part: Part,
}

impl VaeDecodeTiled {
    /// `VAEDecodeTiled`.
    pub fn new() -> Self {
        VaeDecodeTiled {
            schema: NodeSchema {
                class_type: "VAEDecodeTiled",
                display_name: "VAE Decode (Tiled)",
                category: "_for_testing",
                description: "Decodes latents tile by tile, blending overlaps.",
                inputs: [
                    vec![
                        link("samples", DataType::Latent),
                        link("vae", DataType::Vae),
                    ],
                    tile_inputs(32),
                ]
                .concat(),
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
            part: Part::Decoder,
        }
    }

    /// `VAEEncodeTiled`.
    pub fn encode() -> Self {
        VaeDecodeTiled {
            schema: NodeSchema {
                class_type: "VAEEncodeTiled",
                display_name: "VAE Encode (Tiled)",
                category: "_for_testing",
                description: "Encodes images tile by tile, blending overlaps.",
                inputs: [
                    vec![link("pixels", DataType::Image), link("vae", DataType::Vae)],
                    tile_inputs(64),
                ]
                .concat(),
                outputs: vec![out("LATENT", DataType::Latent)],
                output_node: false,
            },
            part: Part::Encoder,
        }
    }

    /// The whole-run node of the same direction.
    fn whole(&self) -> Box<dyn Node> {
        match self.part {
            Part::Decoder => Box::new(VaeDecode::new()),
            Part::Encoder => Box::new(VaeEncode::new()),
        }
    }

    /// The input that is cut.
    fn input(&self) -> &'static str {
        match self.part {
            Part::Decoder => "samples",
            Part::Encoder => "pixels",
        }
    }

    fn op(&self, args: &Args, per_latent_px: u64) -> Result<TiledVae, NodeError> {
        let overlap = args.int("overlap")? as usize;
        Ok(match self.part {
            Part::Decoder => TiledVae::new(overlap, per_latent_px),
            Part::Encoder => TiledVae::encoder(overlap, encode_per_px(per_latent_px)),
        })
    }
}

impl Node for VaeDecodeTiled {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn meta(&self) -> NodeMeta {
        NodeMeta {
            modes: vec![ExecMode::Tiled, ExecMode::Atomic],
            ..NodeMeta::default()
        }
    }

    fn infer(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        self.whole().infer(args, inputs, env)
    }

    fn memory(&self, args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        self.whole().memory(args, query)
    }

    fn chunked(&self, args: &Args, inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Chunking> {
        // Asked for tiles: any VAE, tile-local or not (as ComfyUI does).
        let Some(ValueInfo::Model(m)) = inputs.get("vae") else {
            return None;
        };
        Some(Chunking {
            input: self.input(),
            op: Arc::new(self.op(args, m.activation_per_pixel).ok()?),
            max_tile: Some(args.int("tile_size").ok()? as usize),
        })
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let model = inputs.model("vae", DataType::Vae)?;
        let op = self
            .op(args, model.info.activation_per_pixel)?
            .bind_to(&inputs, &ctx.weights)?;
        let whole = inputs.require(self.input())?;
        let out = op.run_whole(whole, args.int("tile_size")? as usize)?;
        Ok(NodeOutput {
            values: vec![out],
            ui: None,
        })
    }
}

/// `VAEDecode`: latents to images in [0, 1].
pub struct VaeDecode {
    schema: NodeSchema,
}

impl VaeDecode {
    pub fn new() -> Self {
        VaeDecode {
            schema: NodeSchema {
                class_type: "VAEDecode",
                display_name: "VAE Decode",
                category: "latent",
                description: "Decodes latents into images with a VAE.",
                inputs: vec![
                    link("samples", DataType::Latent),
                    link("vae", DataType::Vae),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }
}

impl Node for VaeDecode {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn meta(&self) -> NodeMeta {
        whole_first()
    }

    fn chunked(&self, _args: &Args, inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Chunking> {
        auto_tiles(Part::Decoder, inputs)
    }

    fn infer(
        &self,
        _args: &Args,
        inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![match inputs.get("samples") {
            Some(ValueInfo::Latent {
                batch,
                height,
                width,
                ..
            }) => ValueInfo::Image(crate::latent::decoded_info(*batch, *height, *width)),
            _ => ValueInfo::Unknown,
        }])
    }

    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        let m = model_info(query.inputs).unwrap_or(ModelInfo {
            bytes: 0,
            block_bytes: 0,
            scale: 8,
            halo: 0,
            activation_per_pixel: 0,
            tileable: true,
        });
        let latent_px: u64 = query
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
        let output: u64 = query.outputs.iter().filter_map(|o| o.bytes()).sum();
        MemoryEstimate {
            weights: m.bytes,
            activations: output + latent_px * m.activation_per_pixel,
            weight_block: 0,
        }
    }

    fn execute(
        &self,
        _args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let latent = inputs.latent("samples")?;
        let model = inputs.model("vae", DataType::Vae)?;
        let rgb = run_part(model, Part::Decoder, latent, ctx)?;
        let image = rgb.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?.contiguous()?;
        Ok(NodeOutput {
            values: vec![Value::image(image)],
            ui: None,
        })
    }
}

/// `VAEEncode`: images in [0, 1] to latents (cropped to multiples of 8, centred, as ComfyUI).
pub struct VaeEncode {
    schema: NodeSchema,
}

impl VaeEncode {
    pub fn new() -> Self {
        VaeEncode {
            schema: NodeSchema {
                class_type: "VAEEncode",
                display_name: "VAE Encode",
                category: "latent",
                description: "Encodes images into latents with a VAE.",
                inputs: vec![link("pixels", DataType::Image), link("vae", DataType::Vae)],
                outputs: vec![out("LATENT", DataType::Latent)],
                output_node: false,
            },
        }
    }
}

impl Node for VaeEncode {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn meta(&self) -> NodeMeta {
        whole_first()
    }

    fn chunked(&self, _args: &Args, inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Chunking> {
        auto_tiles(Part::Encoder, inputs)
    }

    fn infer(
        &self,
        _args: &Args,
        inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let channels = match inputs.get("vae") {
            // The latent channel count is the encoder's; ModelInfo does not carry it, so the
            // planner sizes SD1's 4 and the run reports the real shape.
            Some(ValueInfo::Model(_)) => 4,
            _ => return Ok(vec![ValueInfo::Unknown]),
        };
        Ok(vec![match inputs.get("pixels") {
            Some(ValueInfo::Image(ImageInfo {
                batch,
                height,
                width,
                ..
            })) => ValueInfo::Latent {
                batch: *batch,
                channels,
                height: height / 8,
                width: width / 8,
            },
            _ => ValueInfo::Unknown,
        }])
    }

    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        let m = model_info(query.inputs);
        let px: u64 = query
            .inputs
            .iter()
            .filter_map(|i| i.image())
            .map(|i| (i.batch * i.height * i.width) as u64)
            .sum();
        let output: u64 = query.outputs.iter().filter_map(|o| o.bytes()).sum();
        MemoryEstimate {
            weights: m.map(|m| m.bytes).unwrap_or(0),
            activations: output + px * encode_per_px(m.map_or(0, |m| m.activation_per_pixel)),
            weight_block: 0,
        }
    }

    fn execute(
        &self,
        _args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let pixels = inputs.image("pixels")?;
        let model = inputs.model("vae", DataType::Vae)?;
        let (_, h, w, _) = pixels.dims4()?;
        let (ch, cw) = (h / 8 * 8, w / 8 * 8);
        if ch == 0 || cw == 0 {
            return Err(NodeError::input(
                "pixels",
                format!("a {w}x{h} image is smaller than one 8x8 latent pixel"),
            ));
        }
        let x = pixels
            .narrow(1, (h % 8) / 2, ch)?
            .narrow(2, (w % 8) / 2, cw)?
            .narrow(3, 0, 3)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let latent = run_part(model, Part::Encoder, &x, ctx)?;
        Ok(NodeOutput {
            values: vec![Value::latent(latent)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(VaeLoader, VaeDecodeTiled, VaeDecode, VaeEncode);
