//! Latent nodes with ComfyUI's names and inputs: `EmptyLatentImage`, `SaveLatent`,
//! `LoadLatent`. Latents are `[batch, channels, height/8, width/8]` f32 tensors; `.latent`
//! files are ComfyUI's: safetensors with `latent_tensor` and an empty
//! `latent_format_version_0` marker (a file without the marker holds latents from before
//! ComfyUI's format change, scaled by 1/0.18215 on load, as ComfyUI does).

use crate::image::save::{ascii_json, next_counter, split_prefix};
use crate::model::safetensors::SafetensorsFile;
use crate::spec::{int, link, out, string, MAX_RESOLUTION};
use candle_core::{DType, Device, Tensor};
use nova_dataflow::{
    Args, DataType, ExecContext, FileFolder, ImageInfo, InputKind, InputSpec, Inputs, JobEnv, Node,
    NodeError, NodeOutput, NodeSchema, Value, ValueInfo, WeightSource,
};
use serde_json::json;
use std::collections::HashMap;

/// SD1 latents: 4 channels at 1/8 resolution.
const CHANNELS: usize = 4;
/// The scale of latents saved before ComfyUI's `latent_format_version_0`.
const LEGACY_SCALE: f64 = 0.18215;

/// `EmptyLatentImage`: zeros to start sampling from.
pub struct EmptyLatentImage {
    schema: NodeSchema,
}

impl EmptyLatentImage {
    pub fn new() -> Self {
        let dim = |name| InputSpec {
            kind: InputKind::Int {
                default: 512,
                min: 16,
                max: MAX_RESOLUTION,
                step: 8,
            },
            ..int(name, 512, 16, MAX_RESOLUTION)
        };
        EmptyLatentImage {
            schema: NodeSchema {
                class_type: "EmptyLatentImage",
                display_name: "Empty Latent Image",
                category: "latent",
                description: "A batch of zero latents for an image of the given size.",
                inputs: vec![dim("width"), dim("height"), int("batch_size", 1, 1, 4096)],
                outputs: vec![out("LATENT", DataType::Latent)],
                output_node: false,
            },
        }
    }

    fn shape(args: &Args) -> Result<(usize, usize, usize, usize), NodeError> {
        Ok((
            args.int("batch_size")? as usize,
            CHANNELS,
            args.int("height")? as usize / 8,
            args.int("width")? as usize / 8,
        ))
    }
}

impl Node for EmptyLatentImage {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let (batch, channels, height, width) = Self::shape(args)?;
        Ok(vec![ValueInfo::Latent {
            batch,
            channels,
            height,
            width,
        }])
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let shape = Self::shape(args)?;
        Ok(NodeOutput {
            values: vec![Value::latent(Tensor::zeros(
                shape,
                DType::F32,
                &ctx.device,
            )?)],
            ui: None,
        })
    }
}

/// `SaveLatent`: writes `.latent` files to the output folder.
pub struct SaveLatent {
    schema: NodeSchema,
}

impl SaveLatent {
    pub fn new() -> Self {
        SaveLatent {
            schema: NodeSchema {
                class_type: "SaveLatent",
                display_name: "Save Latent",
                category: "_for_testing",
                description: "Saves latents as ComfyUI .latent (safetensors) files.",
                inputs: vec![
                    link("samples", DataType::Latent),
                    string("filename_prefix", "latents/ComfyUI"),
                ],
                outputs: vec![],
                output_node: true,
            },
        }
    }
}

impl Node for SaveLatent {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, _env: &JobEnv) -> Result<(), NodeError> {
        split_prefix(args.string("filename_prefix")?).map(|_| ())
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let samples = inputs.latent("samples")?.to_device(&Device::Cpu)?;
        let (subfolder, stem) = split_prefix(args.string("filename_prefix")?)?;
        let io = |e: &dyn std::fmt::Display, p: &std::path::Path| NodeError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        };
        let folder = nova_dataflow::output::folder(&ctx.env.output_dir, &subfolder)
            .map_err(|e| io(&e, &ctx.env.output_dir.join(&subfolder)))?;
        let name = format!("{stem}_{:05}_.latent", next_counter(&folder, &stem));
        let path = folder.join(&name);
        let marker = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
        let mut meta = HashMap::new();
        if let Some(p) = &ctx.prompt {
            meta.insert("prompt".to_string(), ascii_json(&p.to_string()));
        }
        let data = [
            ("latent_tensor", &samples),
            ("latent_format_version_0", &marker),
        ];
        let bytes = safetensors::serialize(data, Some(meta)).map_err(|e| io(&e, &path))?;
        nova_dataflow::output::write_bytes(&path, &bytes).map_err(|e| io(&e, &path))?;
        Ok(NodeOutput {
            values: vec![],
            ui: Some(json!({"latents": [{
                "filename": name,
                "subfolder": subfolder.to_string_lossy(),
                "type": "output",
            }]})),
        })
    }
}

/// `LoadLatent`: reads a `.latent` file from the input folder.
pub struct LoadLatent {
    schema: NodeSchema,
}

impl LoadLatent {
    pub fn new() -> Self {
        LoadLatent {
            schema: NodeSchema {
                class_type: "LoadLatent",
                display_name: "Load Latent",
                category: "_for_testing",
                description: "Loads latents from a ComfyUI .latent file in the input folder.",
                inputs: vec![InputSpec {
                    name: "latent",
                    kind: InputKind::File {
                        folder: FileFolder::Input,
                        image_upload: false,
                    },
                    required: true,
                    tooltip: "",
                }],
                outputs: vec![out("LATENT", DataType::Latent)],
                output_node: false,
            },
        }
    }

    fn open(args: &Args, env: &JobEnv) -> Result<SafetensorsFile, NodeError> {
        let name = args.string("latent")?;
        let path =
            JobEnv::resolve_in(&env.input_dir, name).map_err(|r| NodeError::input("latent", r))?;
        let f = SafetensorsFile::open(&path)?;
        match f.shape("latent_tensor") {
            Some(s) if s.len() == 4 => Ok(f),
            Some(s) => Err(NodeError::File {
                path: path.display().to_string(),
                reason: format!("tensor 'latent_tensor' has shape {s:?}, expected [batch, channels, height, width]"),
            }),
            None => Err(NodeError::File {
                path: path.display().to_string(),
                reason: "tensor 'latent_tensor' is missing: not a ComfyUI .latent file".into(),
            }),
        }
    }
}

impl Node for LoadLatent {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        Self::open(args, env).map(|_| ())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let f = Self::open(args, env)?;
        let s = f.shape("latent_tensor").unwrap_or(&[0, 0, 0, 0]).to_vec();
        Ok(vec![ValueInfo::Latent {
            batch: s[0],
            channels: s[1],
            height: s[2],
            width: s[3],
        }])
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let f = Self::open(args, &ctx.env)?;
        let mut t = f.read("latent_tensor")?;
        if f.shape("latent_format_version_0").is_none() {
            t = (t * (1.0 / LEGACY_SCALE))?;
        }
        Ok(NodeOutput {
            values: vec![Value::latent(t.to_device(&ctx.device)?)],
            ui: None,
        })
    }
}

/// The image size a latent decodes to (SD-family: 8x).
pub fn decoded_info(batch: usize, height: usize, width: usize) -> ImageInfo {
    ImageInfo {
        batch,
        height: height * 8,
        width: width * 8,
        channels: 3,
    }
}

crate::spec::default_via_new!(EmptyLatentImage, SaveLatent, LoadLatent);
