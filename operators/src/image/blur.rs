//! `ImageBlur` (ComfyUI name and inputs): Gaussian blur with reflect padding.
//! Receptive field: `blur_radius` pixels on each side.

use super::filter::{gaussian_taps, separable};
use super::TileNode;
use crate::spec::{float, int, link, out};
use candle_core::{Result, Tensor};
use nova_dataflow::{Args, DataType, NodeError, NodeSchema, Rect};
use nova_engines::{TileKernel, Window};

/// The node.
pub struct ImageBlur {
    schema: NodeSchema,
}

impl ImageBlur {
    pub fn new() -> Self {
        ImageBlur {
            schema: NodeSchema {
                class_type: "ImageBlur",
                display_name: "Image Blur",
                category: "image/postprocessing",
                description: "Gaussian blur (reflect-padded), as ComfyUI's ImageBlur.",
                inputs: vec![
                    link("image", DataType::Image),
                    int("blur_radius", 1, 1, 31),
                    float("sigma", 1.0, 0.1, 10.0, 0.1),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }
}

/// Blur kernel: radius and 1-D taps.
pub struct BlurKernel {
    pub radius: usize,
    pub taps: Vec<f32>,
}

impl BlurKernel {
    /// The kernel for a radius and ComfyUI-relative sigma.
    pub fn new(radius: usize, sigma: f64) -> Self {
        BlurKernel {
            radius,
            taps: gaussian_taps(radius, sigma),
        }
    }
}

impl TileKernel for BlurKernel {
    fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        (height, width)
    }

    fn window(&self, out: Rect, _h: usize, _w: usize) -> Window {
        Window::around(out, self.radius)
    }

    fn apply(
        &self,
        source: &Tensor,
        _w: Window,
        _out: Rect,
        _ih: usize,
        _iw: usize,
    ) -> Result<Tensor> {
        separable(source, &self.taps)
    }
}

impl TileNode for ImageBlur {
    type Kernel = BlurKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, args: &Args) -> std::result::Result<BlurKernel, NodeError> {
        Ok(BlurKernel::new(
            args.int("blur_radius")? as usize,
            args.float("sigma")?,
        ))
    }
}

crate::spec::default_via_new!(ImageBlur);
