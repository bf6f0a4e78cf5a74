//! `LoadImage` (ComfyUI name and inputs): a PNG or JPEG from the input folder, EXIF orientation
//! applied. Outputs the RGB image and a mask that is `1 − alpha` (zeros 64x64 without alpha),
//! as ComfyUI does.

use crate::spec::{input_file, out};
use candle_core::{Device, Tensor};
use nova_dataflow::{
    Args, DataType, ExecContext, ImageInfo, Inputs, JobEnv, Node, NodeError, NodeOutput,
    NodeSchema, Value, ValueInfo,
};
use std::path::PathBuf;

/// The node.
pub struct LoadImage {
    schema: NodeSchema,
}

impl LoadImage {
    pub fn new() -> Self {
        LoadImage {
            schema: NodeSchema {
                class_type: "LoadImage",
                display_name: "Load Image",
                category: "image",
                description: "Loads a PNG or JPEG from the input folder.",
                inputs: vec![input_file("image")],
                outputs: vec![out("IMAGE", DataType::Image), out("MASK", DataType::Mask)],
                output_node: false,
            },
        }
    }

    fn path(args: &Args, env: &JobEnv) -> Result<PathBuf, NodeError> {
        let name = args.string("image")?;
        JobEnv::resolve_in(&env.input_dir, name).map_err(|r| NodeError::input("image", r))
    }
}

fn media(e: nova_media::MediaError, path: &std::path::Path) -> NodeError {
    NodeError::File {
        path: path.display().to_string(),
        reason: match e {
            nova_media::MediaError::Decode { .. } => {
                format!("not a readable PNG or JPEG image: {}", e.reason())
            }
            _ => e.reason().to_string(),
        },
    }
}

impl Node for LoadImage {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        let path = Self::path(args, env)?;
        nova_media::probe_image(&path).map_err(|e| media(e, &path))?;
        Ok(())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let path = Self::path(args, env)?;
        let (width, height) = nova_media::probe_image(&path).map_err(|e| media(e, &path))?;
        Ok(vec![
            ValueInfo::Image(ImageInfo {
                batch: 1,
                height,
                width,
                channels: 3,
            }),
            // Without alpha the mask is 64x64; the header does not say, so stay conservative.
            ValueInfo::Mask {
                batch: 1,
                height: height.max(64),
                width: width.max(64),
            },
        ])
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let path = Self::path(args, &ctx.env)?;
        let img = nova_media::decode_image(&path).map_err(|e| media(e, &path))?;
        let (h, w) = (img.height, img.width);
        let image =
            Tensor::from_vec(img.rgb, (1, h, w, 3), &Device::Cpu)?.to_device(&ctx.device)?;
        let mask = match img.alpha {
            Some(a) => Tensor::from_vec(a, (1, h, w), &Device::Cpu)?
                .affine(-1.0, 1.0)?
                .to_device(&ctx.device)?,
            None => Tensor::zeros((1, 64, 64), candle_core::DType::F32, &ctx.device)?,
        };
        Ok(NodeOutput {
            values: vec![Value::image(image), Value::mask(mask)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(LoadImage);
