//! `ImageInvert` (ComfyUI name and inputs): `1 − x`. Pointwise, so its receptive field is the
//! pixel itself.

use super::TileNode;
use crate::spec::{link, out};
use candle_core::{Result, Tensor};
use nova_dataflow::{Args, DataType, NodeError, NodeSchema, Rect};
use nova_engines::{TileKernel, Window};

/// The node.
pub struct ImageInvert {
    schema: NodeSchema,
}

impl ImageInvert {
    pub fn new() -> Self {
        ImageInvert {
            schema: NodeSchema {
                class_type: "ImageInvert",
                display_name: "Invert Image",
                category: "image",
                description: "Inverts colours: 1 - x.",
                inputs: vec![link("image", DataType::Image)],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }
}

/// Invert kernel.
pub struct InvertKernel;

impl TileKernel for InvertKernel {
    fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        (height, width)
    }

    fn window(&self, out: Rect, _h: usize, _w: usize) -> Window {
        Window::around(out, 0)
    }

    fn apply(
        &self,
        source: &Tensor,
        _w: Window,
        _o: Rect,
        _ih: usize,
        _iw: usize,
    ) -> Result<Tensor> {
        source.affine(-1.0, 1.0)
    }

    fn workspace_factor(&self) -> f64 {
        0.0
    }
}

impl TileNode for ImageInvert {
    type Kernel = InvertKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, _args: &Args) -> std::result::Result<InvertKernel, NodeError> {
        Ok(InvertKernel)
    }
}

crate::spec::default_via_new!(ImageInvert);
