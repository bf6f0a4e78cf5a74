//! `ImageSharpen` (ComfyUI name and inputs). ComfyUI's kernel is `-10·alpha·G` with the centre
//! raised so the kernel sums to 1, i.e. `(1 + 10·alpha)·x − 10·alpha·blur(x)`, clamped to
//! `[0, 1]`; computed here in that separable form. Receptive field: `sharpen_radius`.

use super::filter::{gaussian_taps, separable};
use super::TileNode;
use crate::spec::{float, int, link, out};
use candle_core::{Result, Tensor};
use nova_dataflow::{Args, DataType, NodeError, NodeSchema, Rect};
use nova_engines::{TileKernel, Window};

/// The node.
pub struct ImageSharpen {
    schema: NodeSchema,
}

impl ImageSharpen {
    pub fn new() -> Self {
        ImageSharpen {
            schema: NodeSchema {
                class_type: "ImageSharpen",
                display_name: "Image Sharpen",
                category: "image/postprocessing",
                description: "Unsharp-style sharpening, as ComfyUI's ImageSharpen.",
                inputs: vec![
                    link("image", DataType::Image),
                    int("sharpen_radius", 1, 1, 31),
                    float("sigma", 1.0, 0.1, 10.0, 0.01),
                    float("alpha", 1.0, 0.0, 5.0, 0.01),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }
}

/// Sharpen kernel.
pub struct SharpenKernel {
    radius: usize,
    taps: Vec<f32>,
    alpha: f64,
}

impl TileKernel for SharpenKernel {
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
        out: Rect,
        _ih: usize,
        _iw: usize,
    ) -> Result<Tensor> {
        let blurred = separable(source, &self.taps)?;
        let centre = source
            .narrow(1, self.radius, out.h)?
            .narrow(2, self.radius, out.w)?;
        let k = 10.0 * self.alpha;
        (centre.affine(1.0 + k, 0.0)? - blurred.affine(k, 0.0)?)?.clamp(0f32, 1f32)
    }
}

impl TileNode for ImageSharpen {
    type Kernel = SharpenKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, args: &Args) -> std::result::Result<SharpenKernel, NodeError> {
        let radius = args.int("sharpen_radius")? as usize;
        Ok(SharpenKernel {
            radius,
            taps: gaussian_taps(radius, args.float("sigma")?),
            alpha: args.float("alpha")?,
        })
    }
}

crate::spec::default_via_new!(ImageSharpen);
