//! `EmptyImage` (ComfyUI name and inputs): a batch of images of one colour (`0xRRGGBB`).

use crate::spec::{int, out, MAX_RESOLUTION};
use candle_core::Tensor;
use nova_dataflow::{
    Args, ChunkRegion, DataType, ExecContext, ImageInfo, Inputs, JobEnv, Node, NodeError,
    NodeOutput, NodeSchema, RegionReader, SourceOp, Value, ValueInfo,
};
use std::sync::Arc;

/// The node.
pub struct EmptyImage {
    schema: NodeSchema,
}

impl EmptyImage {
    pub fn new() -> Self {
        EmptyImage {
            schema: NodeSchema {
                class_type: "EmptyImage",
                display_name: "EmptyImage",
                category: "image",
                description: "A solid-colour image batch.",
                inputs: vec![
                    int("width", 512, 1, MAX_RESOLUTION),
                    int("height", 512, 1, MAX_RESOLUTION),
                    int("batch_size", 1, 1, 4096),
                    int("color", 0, 0, 0xFFFFFF),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }

    fn info(args: &Args) -> Result<ImageInfo, NodeError> {
        Ok(ImageInfo {
            batch: args.int("batch_size")? as usize,
            height: args.int("height")? as usize,
            width: args.int("width")? as usize,
            channels: 3,
        })
    }
}

impl Node for EmptyImage {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Image(Self::info(args)?)])
    }

    fn source(&self, args: &Args, _env: &JobEnv) -> Option<Arc<dyn SourceOp>> {
        Some(Arc::new(Fill {
            rgb: rgb_of(args.int("color").ok()?),
            batch: Self::info(args).ok()?.batch,
        }))
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let i = Self::info(args)?;
        let rgb = rgb_of(args.int("color")?);
        let pixel = Tensor::from_vec(rgb.to_vec(), (1, 1, 1, 3), &ctx.device)?;
        let image = pixel
            .broadcast_as((i.batch, i.height, i.width, 3))?
            .contiguous()?;
        Ok(NodeOutput {
            values: vec![Value::image(image)],
            ui: None,
        })
    }
}

/// An `EmptyImage` read part by part: each part made when asked for.
struct Fill {
    rgb: [f32; 3],
    batch: usize,
}

impl SourceOp for Fill {
    fn memory(&self, _output: &ValueInfo, _regions: &[ChunkRegion]) -> u64 {
        0
    }

    fn open(&self, _ctx: &ExecContext) -> Result<Box<dyn RegionReader>, NodeError> {
        Ok(Box::new(Fill {
            rgb: self.rgb,
            batch: self.batch,
        }))
    }
}

impl RegionReader for Fill {
    fn read(&mut self, region: &ChunkRegion) -> Result<Value, NodeError> {
        let ChunkRegion::Tile { rect } = *region else {
            return Err(NodeError::Other(format!(
                "an image is read by tiles, not {region:?}"
            )));
        };
        let pixel = Tensor::from_vec(self.rgb.to_vec(), (1, 1, 1, 3), &candle_core::Device::Cpu)?;
        Ok(Value::image(
            pixel
                .broadcast_as((self.batch, rect.h, rect.w, 3))?
                .contiguous()?,
        ))
    }
}

/// ComfyUI's colour integer as RGB in `[0, 1]`.
fn rgb_of(color: i64) -> [f32; 3] {
    [
        ((color >> 16) & 0xFF) as f32 / 255.0,
        ((color >> 8) & 0xFF) as f32 / 255.0,
        (color & 0xFF) as f32 / 255.0,
    ]
}

crate::spec::default_via_new!(EmptyImage);
