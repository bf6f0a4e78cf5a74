//! `UpscaleModelLoader` and `ImageUpscaleWithModel` (ComfyUI names and inputs): learned
//! super-resolution with an SRVGGNetCompact network (Real-ESRGAN's `realesr-animevideov3` and
//! its kin), loaded from `models/upscale_models/*.safetensors`.
//!
//! The network: a 3x3 conv from RGB to `num_feat` channels and a per-channel PReLU, `num_conv`
//! more (conv, PReLU) pairs, a last 3x3 conv to `3 * scale²` channels, a pixel shuffle by
//! `scale`, plus the input upsampled by nearest neighbour. Every conv zero-pads at the image
//! border, so a tile computes exactly what the whole image computes for its pixels when it
//! reads one input pixel of context per conv layer on its interior sides, and pads (as the
//! whole image does) only on sides that are the image's border. Output is clamped to [0, 1],
//! as ComfyUI does.
//!
//! Weights are put on the device through the residency registry: resident for the node's
//! run, or streamed one (conv, PReLU) block at a time when the plan says they do not fit.

use super::safetensors::SafetensorsFile;
use crate::spec::{link, out};
use candle_core::Tensor;
use nova_dataflow::{
    Args, Chunking, DataType, DeviceWeights, ExecContext, ExecMode, FileFolder, ImageInfo,
    InputKind, InputSpec, Inputs, JobEnv, MemoryEstimate, MemoryQuery, ModelInfo, ModelRef, Node,
    NodeError, NodeMeta, NodeOutput, NodeSchema, Rect, Value, ValueInfo, WeightContext,
    WeightSource,
};
use nova_engines::{Border, TileKernel, TiledImage, Window};
use std::path::PathBuf;
use std::sync::Arc;

/// The folder under the models folder where upscale models live (ComfyUI's name).
pub const FOLDER: &str = "upscale_models";

/// The architecture of an SRVGGNetCompact file, read from its tensor names and shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct SrvggArch {
    pub num_feat: usize,
    /// 3x3 convs in all (first, body and last).
    pub convs: usize,
    pub scale: usize,
    /// Per conv: its weight and bias names, and the PReLU slope after it (all but the last).
    pub blocks: Vec<Vec<String>>,
}

fn shape_err(src: &dyn WeightSource, msg: String) -> NodeError {
    NodeError::File {
        path: src.path().display().to_string(),
        reason: msg,
    }
}

impl SrvggArch {
    /// Reads the architecture from `body.N.weight` / `body.N.bias` tensors, checking every
    /// shape (the error names the tensor).
    pub fn from_source(src: &dyn WeightSource) -> Result<SrvggArch, NodeError> {
        let shape = |n: &str| src.shape(n);
        let first = shape("body.0.weight").ok_or_else(|| {
            shape_err(
                src,
                "tensor 'body.0.weight' is missing: not an SRVGGNetCompact upscale model".into(),
            )
        })?;
        if first.len() != 4 || first[1] != 3 || first[2] != 3 || first[3] != 3 {
            return Err(shape_err(
                src,
                format!("tensor 'body.0.weight' has shape {first:?}, expected [num_feat, 3, 3, 3]"),
            ));
        }
        let f = first[0];
        // Convs sit at even indices, PReLUs at odd ones; the last conv has no PReLU.
        let mut last = 0;
        while shape(&format!("body.{}.weight", last + 2)).is_some() {
            last += 2;
        }
        if last == 0 {
            return Err(shape_err(
                src,
                "only one conv layer: not an SRVGGNetCompact model".into(),
            ));
        }
        let out_c = shape(&format!("body.{last}.weight")).unwrap_or_default();
        let scale = (((out_c.first().copied().unwrap_or(0) / 3) as f64).sqrt()) as usize;
        let expect = |name: String, want: Vec<usize>| -> Result<String, NodeError> {
            match shape(&name) {
                Some(s) if s == want => Ok(name),
                Some(s) => Err(shape_err(
                    src,
                    format!("tensor '{name}' has shape {s:?}, expected {want:?}"),
                )),
                None => Err(shape_err(src, format!("tensor '{name}' is missing"))),
            }
        };
        if scale == 0 || 3 * scale * scale != out_c.first().copied().unwrap_or(0) {
            return Err(shape_err(
                src,
                format!("tensor 'body.{last}.weight' has shape {out_c:?}: its output channels are not 3 x scale²"),
            ));
        }
        let mut blocks = Vec::new();
        for i in (0..=last).step_by(2) {
            let cin = if i == 0 { 3 } else { f };
            let cout = if i == last { 3 * scale * scale } else { f };
            let mut b = vec![
                expect(format!("body.{i}.weight"), vec![cout, cin, 3, 3])?,
                expect(format!("body.{i}.bias"), vec![cout])?,
            ];
            if i != last {
                b.push(expect(format!("body.{}.weight", i + 1), vec![f])?);
            }
            blocks.push(b);
        }
        Ok(SrvggArch {
            num_feat: f,
            convs: blocks.len(),
            scale,
            blocks,
        })
    }

    /// What the planner needs: sizes, the largest streamable block, geometry.
    pub fn info(&self, src: &dyn WeightSource) -> ModelInfo {
        let bytes_of = |b: &Vec<String>| -> u64 { b.iter().filter_map(|n| src.f32_bytes(n)).sum() };
        ModelInfo {
            bytes: self.blocks.iter().map(bytes_of).sum(),
            block_bytes: self.blocks.iter().map(bytes_of).max().unwrap_or(0),
            scale: self.scale as u32,
            halo: self.convs as u32,
            activation_per_pixel: self.activation_per_pixel(),
            tileable: true,
        }
    }

    /// Temporaries per input pixel: a layer's input, padded copy, 3x3 patch matrix and output
    /// at `num_feat` channels, and the shuffle's copies at `3 * scale²`.
    fn activation_per_pixel(&self) -> u64 {
        (4 * (self.num_feat * 12 + 3 * self.scale * self.scale * 4)) as u64
    }
}

/// Pads `x` (`[b, c, h, w]`) with zeros on the sides that are the image's border.
fn pad_border(x: Tensor, sides: [bool; 4]) -> candle_core::Result<Tensor> {
    let [top, bottom, left, right] = sides.map(usize::from);
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
}

/// The tile kernel: geometry for planning; bound to device weights at run time.
#[derive(Clone)]
pub struct UpscaleKernel {
    info: ModelInfo,
    bound: Option<(Arc<SrvggArch>, Arc<DeviceWeights>)>,
}

impl UpscaleKernel {
    /// Runs the network on `src` (`[b, h, w, 3]`, the window), padding at `sides` (top,
    /// bottom, left, right) that are image borders; returns `[b, h', w', 3]` for the window
    /// less one pixel per conv on its interior sides, upscaled.
    fn forward(&self, src: &Tensor, sides: [bool; 4]) -> Result<Tensor, NodeError> {
        let (arch, weights) = self
            .bound
            .as_ref()
            .ok_or_else(|| NodeError::Other("upscale model is not loaded".into()))?;
        let s = arch.scale;
        let x = src.permute((0, 3, 1, 2))?.contiguous()?;
        let mut h = x.clone();
        let mut stream = weights.stream(&arch.blocks);
        for i in 0..arch.blocks.len() {
            let w = stream.block(i)?;
            h = super::conv::conv3x3(&pad_border(h, sides)?, &w[0], Some(&w[1]), 0)?;
            if let Some(a) = w.get(2) {
                let a = a.reshape((1, (), 1, 1))?;
                h = (h.relu()? + h.minimum(0f32)?.broadcast_mul(&a)?)?;
            }
        }
        drop(stream);
        // Pixel shuffle: [b, 3*s*s, h, w] -> [b, 3, h*s, w*s].
        let (b, _, hh, ww) = h.dims4()?;
        let h = h
            .reshape((b, 3, s, s, hh, ww))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, 3, hh * s, ww * s))?;
        // The input over the same region, upsampled by nearest neighbour.
        let l = arch.convs;
        let (top, left) = (if sides[0] { 0 } else { l }, if sides[2] { 0 } else { l });
        let base = x.narrow(2, top, hh)?.narrow(3, left, ww)?;
        let base = base
            .unsqueeze(3)?
            .unsqueeze(5)?
            .broadcast_as((b, 3, hh, s, ww, s))?
            .reshape((b, 3, hh * s, ww * s))?;
        Ok((h + base)?.permute((0, 2, 3, 1))?)
    }
}

impl TileKernel for UpscaleKernel {
    fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let s = self.info.scale as usize;
        (height * s, width * s)
    }

    fn window(&self, out: Rect, height: usize, width: usize) -> Window {
        let (s, l) = (self.info.scale.max(1) as usize, self.info.halo as usize);
        let x0 = (out.x / s).saturating_sub(l);
        let y0 = (out.y / s).saturating_sub(l);
        let x1 = ((out.x + out.w).div_ceil(s) + l).min(width);
        let y1 = ((out.y + out.h).div_ceil(s) + l).min(height);
        Window::spanning(x0, y0, x1, y1)
    }

    fn border(&self) -> Border {
        // Windows never leave the image; the network pads its layers itself.
        Border::Clamp
    }

    fn apply(
        &self,
        source: &Tensor,
        window: Window,
        out: Rect,
        input_height: usize,
        input_width: usize,
    ) -> candle_core::Result<Tensor> {
        let sides = [
            window.y == 0,
            window.y as usize + window.h == input_height,
            window.x == 0,
            window.x as usize + window.w == input_width,
        ];
        let y = self
            .forward(source, sides)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (s, l) = (self.info.scale as usize, self.info.halo as usize);
        // The computed region starts `l` pixels in on interior sides.
        let vx = window.x as usize + if sides[2] { 0 } else { l };
        let vy = window.y as usize + if sides[0] { 0 } else { l };
        y.narrow(1, out.y - vy * s, out.h)?
            .narrow(2, out.x - vx * s, out.w)?
            .clamp(0f32, 1f32)?
            .contiguous()
    }

    fn workspace_bytes(&self, window: Window, out: Rect, batch: usize, channels: usize) -> u64 {
        let _ = (out, channels);
        (window.w * window.h * batch) as u64 * self.info.activation_per_pixel
    }

    fn bind(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<Option<Self>, NodeError> {
        Ok(Some(self.bind_model(side, weights)?))
    }
}

impl UpscaleKernel {
    fn bind_model(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<UpscaleKernel, NodeError> {
        let model = match side.require("upscale_model")? {
            Value::Model(m) => m,
            other => {
                return Err(NodeError::input(
                    "upscale_model",
                    format!("expected an UPSCALE_MODEL, got {}", other.data_type()),
                ))
            }
        };
        let arch = model
            .arch
            .clone()
            .downcast::<SrvggArch>()
            .map_err(|_| NodeError::input("upscale_model", "not an SRVGGNetCompact model"))?;
        let device = DeviceWeights::new(model.asset.clone(), weights.clone())?;
        Ok(UpscaleKernel {
            info: model.info,
            bound: Some((arch, Arc::new(device))),
        })
    }
}

/// `UpscaleModelLoader`: maps a model file and reads its architecture.
pub struct UpscaleModelLoader {
    schema: NodeSchema,
}

impl UpscaleModelLoader {
    pub fn new() -> Self {
        UpscaleModelLoader {
            schema: NodeSchema {
                class_type: "UpscaleModelLoader",
                display_name: "Load Upscale Model",
                category: "loaders",
                description: "Loads an SRVGGNetCompact (Real-ESRGAN compact) model from models/upscale_models/ (safetensors only).",
                inputs: vec![InputSpec {
                    name: "model_name",
                    kind: InputKind::File {
                        folder: FileFolder::Models(FOLDER),
                        image_upload: false,
                    },
                    required: true,
                    tooltip: "",
                }],
                outputs: vec![out("UPSCALE_MODEL", DataType::UpscaleModel)],
                output_node: false,
            },
        }
    }

    fn path(args: &Args, env: &JobEnv) -> Result<(String, PathBuf), NodeError> {
        let name = args.string("model_name")?;
        let path = env
            .require_model(FOLDER, name)
            .map_err(|r| NodeError::input("model_name", r))?;
        if !name.ends_with(".safetensors") {
            return Err(NodeError::input(
                "model_name",
                format!("'{name}': NOVA loads weights from .safetensors files only"),
            ));
        }
        Ok((name.to_string(), path))
    }

    /// The model, through the registry (mapped once per process).
    fn open(
        args: &Args,
        env: &JobEnv,
        log: Option<&nova_dataflow::residency::DeltaLog>,
    ) -> Result<(Arc<nova_dataflow::Asset>, Arc<SrvggArch>), NodeError> {
        let (name, path) = Self::path(args, env)?;
        let asset = super::open_asset(&name, &path, log)?;
        let arch = SrvggArch::from_source(asset.source())?;
        Ok((asset, Arc::new(arch)))
    }
}

impl Node for UpscaleModelLoader {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        let (_, path) = Self::path(args, env)?;
        let f = SafetensorsFile::open(&path)?;
        SrvggArch::from_source(&f).map(|_| ())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let (asset, arch) = Self::open(args, env, None)?;
        Ok(vec![ValueInfo::Model(arch.info(asset.source()))])
    }

    fn memory(&self, _args: &Args, _query: &MemoryQuery) -> MemoryEstimate {
        // Mapping reads nothing onto the device; the node that runs the model places it.
        MemoryEstimate::default()
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let (asset, arch) = Self::open(args, &ctx.env, Some(&ctx.weights.log))?;
        let info = arch.info(asset.source());
        Ok(NodeOutput {
            values: vec![Value::Model(ModelRef {
                kind: DataType::UpscaleModel,
                asset,
                arch,
                info,
            })],
            ui: None,
        })
    }
}

/// `ImageUpscaleWithModel`: runs an upscale model over an image, tile by tile when the budget
/// asks for it.
pub struct ImageUpscaleWithModel {
    schema: NodeSchema,
}

impl ImageUpscaleWithModel {
    pub fn new() -> Self {
        ImageUpscaleWithModel {
            schema: NodeSchema {
                class_type: "ImageUpscaleWithModel",
                display_name: "Upscale Image (using Model)",
                category: "image/upscaling",
                description: "Upscales an image with a loaded upscale model; tiles and weight streaming follow the memory plan.",
                inputs: vec![
                    link("upscale_model", DataType::UpscaleModel),
                    link("image", DataType::Image),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }

    fn model_info(inputs: &[ValueInfo]) -> Option<ModelInfo> {
        inputs.iter().find_map(|i| match i {
            ValueInfo::Model(m) => Some(*m),
            _ => None,
        })
    }
}

impl Node for ImageUpscaleWithModel {
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
        _args: &Args,
        inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let (Some(ValueInfo::Model(m)), Some(ValueInfo::Image(i))) =
            (inputs.get("upscale_model"), inputs.get("image"))
        else {
            return Ok(vec![ValueInfo::Unknown]);
        };
        let s = m.scale as usize;
        Ok(vec![ValueInfo::Image(ImageInfo {
            height: i.height * s,
            width: i.width * s,
            ..*i
        })])
    }

    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        let Some(m) = Self::model_info(query.inputs) else {
            return query.whole(&self.meta());
        };
        let image = query.inputs.iter().find_map(|i| i.image());
        let output = query.outputs.first().and_then(|o| o.bytes()).unwrap_or(0);
        let (input, px) = image
            .map(|i| (i.bytes(), (i.batch * i.width * i.height) as u64))
            .unwrap_or((0, 0));
        MemoryEstimate {
            weights: m.bytes,
            activations: input + output + px * m.activation_per_pixel,
            weight_block: m.block_bytes,
        }
    }

    fn chunked(&self, _args: &Args, inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Chunking> {
        let Some(ValueInfo::Model(info)) = inputs.get("upscale_model") else {
            return None;
        };
        Some(Chunking {
            input: "image",
            op: Arc::new(TiledImage::new(UpscaleKernel {
                info: *info,
                bound: None,
            })),
            max_tile: None,
        })
    }

    fn execute(
        &self,
        _args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let image = inputs.image("image")?;
        let unbound = UpscaleKernel {
            info: ModelInfo {
                bytes: 0,
                block_bytes: 0,
                scale: 1,
                halo: 0,
                activation_per_pixel: 0,
                tileable: true,
            },
            bound: None,
        };
        let kernel = unbound.bind_model(&inputs, &ctx.weights)?;
        let out = TiledImage::new(kernel).run_whole(image)?;
        Ok(NodeOutput {
            values: vec![Value::image(out)],
            ui: None,
        })
    }
}

/// Runs the raw network (no clamp) on a whole `[b, h, w, 3]` image with resident weights
/// counted against an unlimited accountant: for checks against reference outputs.
pub fn upscale_raw(model: &ModelRef, image: &Tensor) -> Result<Tensor, NodeError> {
    let ctx = WeightContext::resident(nova_dataflow::Accountant::unlimited());
    let mut side = Inputs::new();
    side.insert("upscale_model", Value::Model(model.clone()));
    let k = UpscaleKernel {
        info: model.info,
        bound: None,
    }
    .bind_model(&side, &ctx)?;
    k.forward(image, [true; 4])
}

/// Opens a model file outside a workflow (library use and tests).
pub fn load_model(path: &std::path::Path) -> Result<ModelRef, NodeError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let asset = super::open_asset(&name, path, None)?;
    let arch = Arc::new(SrvggArch::from_source(asset.source())?);
    let info = arch.info(asset.source());
    Ok(ModelRef {
        kind: DataType::UpscaleModel,
        asset,
        arch,
        info,
    })
}

crate::spec::default_via_new!(UpscaleModelLoader, ImageUpscaleWithModel);
