//! `EmptyImage` (ComfyUI name and inputs): a batch of images of one colour (`0xRRGGBB`).

use crate::spec::{int, out, MAX_RESOLUTION};
use candle_core::Tensor;
use nova_dataflow::{
    Args, DataType, ExecContext, ImageInfo, Inputs, JobEnv, Node, NodeError, NodeOutput,
    NodeSchema, Value, ValueInfo,
};

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

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let i = Self::info(args)?;
        let color = args.int("color")?;
        let rgb = [
            ((color >> 16) & 0xFF) as f32 / 255.0,
            ((color >> 8) & 0xFF) as f32 / 255.0,
            (color & 0xFF) as f32 / 255.0,
        ];
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

crate::spec::default_via_new!(EmptyImage);
