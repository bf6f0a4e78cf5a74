//! `ImageScale` and `ImageScaleBy` (ComfyUI names and inputs). Output size follows ComfyUI:
//! `ImageScale` keeps the aspect when one side is 0 and can centre-crop to the target aspect;
//! `ImageScaleBy` rounds `size * scale_by` (Python's round: half to even).
//! Receptive field: the span of the resampling taps of a tile's rows and columns.

use super::resample::{apply_axis, quantize_in, quantize_out, table, Method, METHODS};
use super::TileNode;
use crate::spec::{combo, float, int, link, out, MAX_RESOLUTION};
use candle_core::{Result, Tensor};
use nova_dataflow::{Args, DataType, NodeError, NodeSchema, Rect};
use nova_engines::{Border, TileKernel, Window};

/// How the output size is derived from the input size.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// ComfyUI's ImageScale: fixed size (0 = keep aspect), optional centre crop.
    Size {
        width: usize,
        height: usize,
        crop: bool,
    },
    /// ComfyUI's ImageScaleBy.
    Factor(f64),
}

/// Resampling kernel for a method and target.
pub struct ScaleKernel {
    pub method: Method,
    pub target: Target,
}

/// The crop ComfyUI's `common_upscale(crop="center")` applies: `(x, y, w, h)` of the input.
fn crop_box(h: usize, w: usize, oh: usize, ow: usize, crop: bool) -> (usize, usize, usize, usize) {
    if !crop {
        return (0, 0, w, h);
    }
    let old = w as f64 / h as f64;
    let new = ow as f64 / oh as f64;
    let (mut x, mut y) = (0usize, 0usize);
    if old > new {
        x = ((w as f64 - w as f64 * (new / old)) / 2.0).round_ties_even() as usize;
    } else if old < new {
        y = ((h as f64 - h as f64 * (old / new)) / 2.0).round_ties_even() as usize;
    }
    (x, y, w - 2 * x, h - 2 * y)
}

impl ScaleKernel {
    fn tables(
        &self,
        h: usize,
        w: usize,
    ) -> (super::resample::AxisTable, super::resample::AxisTable) {
        let (oh, ow) = self.output_size(h, w);
        let crop = matches!(self.target, Target::Size { crop: true, .. });
        let (cx, cy, cw, ch) = crop_box(h, w, oh, ow, crop);
        (
            table(self.method, ch, oh, cy),
            table(self.method, cw, ow, cx),
        )
    }
}

impl TileKernel for ScaleKernel {
    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self.target {
            Target::Size {
                width: 0,
                height: 0,
                ..
            } => (h, w),
            Target::Size {
                width: 0, height, ..
            } => (
                height,
                ((w as f64 * height as f64 / h as f64).round_ties_even() as usize).max(1),
            ),
            Target::Size {
                width, height: 0, ..
            } => (
                ((h as f64 * width as f64 / w as f64).round_ties_even() as usize).max(1),
                width,
            ),
            Target::Size { width, height, .. } => (height, width),
            Target::Factor(f) => (
                ((h as f64 * f).round_ties_even() as usize).max(1),
                ((w as f64 * f).round_ties_even() as usize).max(1),
            ),
        }
    }

    fn window(&self, out: Rect, h: usize, w: usize) -> Window {
        let (ty, tx) = self.tables(h, w);
        let (y0, y1) = ty.span(out.y, out.h);
        let (x0, x1) = tx.span(out.x, out.w);
        Window {
            x: x0 as isize,
            y: y0 as isize,
            w: x1 - x0,
            h: y1 - y0,
        }
    }

    fn border(&self) -> Border {
        Border::Clamp
    }

    fn apply(
        &self,
        source: &Tensor,
        window: Window,
        out: Rect,
        h: usize,
        w: usize,
    ) -> Result<Tensor> {
        let (ty, tx) = self.tables(h, w);
        let q = self.method.quantized();
        let src = if q {
            quantize_in(source)?
        } else {
            source.clone()
        };
        let rows = apply_axis(&src, 2, &tx, out.x, out.w, window.x as usize)?;
        let rows = if q { quantize_out(&rows)? } else { rows };
        let res = apply_axis(&rows, 1, &ty, out.y, out.h, window.y as usize)?;
        if q {
            quantize_out(&res)
        } else {
            Ok(res)
        }
    }

    fn workspace_factor(&self) -> f64 {
        3.0
    }
}

fn method(args: &Args) -> std::result::Result<Method, NodeError> {
    let m = args.string("upscale_method")?;
    Method::parse(m)
        .ok_or_else(|| NodeError::input("upscale_method", format!("unknown method '{m}'")))
}

/// `ImageScale`.
pub struct ImageScale {
    schema: NodeSchema,
}

impl ImageScale {
    pub fn new() -> Self {
        ImageScale {
            schema: NodeSchema {
                class_type: "ImageScale",
                display_name: "Upscale Image",
                category: "image/upscaling",
                description: "Resizes to a width and height (0 keeps the aspect ratio).",
                inputs: vec![
                    link("image", DataType::Image),
                    combo("upscale_method", &METHODS),
                    int("width", 512, 0, MAX_RESOLUTION),
                    int("height", 512, 0, MAX_RESOLUTION),
                    combo("crop", &["disabled", "center"]),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }
}

impl Default for ImageScale {
    fn default() -> Self {
        Self::new()
    }
}

impl TileNode for ImageScale {
    type Kernel = ScaleKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, args: &Args) -> std::result::Result<ScaleKernel, NodeError> {
        Ok(ScaleKernel {
            method: method(args)?,
            target: Target::Size {
                width: args.int("width")? as usize,
                height: args.int("height")? as usize,
                crop: args.string("crop")? == "center",
            },
        })
    }
}

/// `ImageScaleBy`.
pub struct ImageScaleBy {
    schema: NodeSchema,
}

impl ImageScaleBy {
    pub fn new() -> Self {
        ImageScaleBy {
            schema: NodeSchema {
                class_type: "ImageScaleBy",
                display_name: "Upscale Image By",
                category: "image/upscaling",
                description: "Resizes by a factor.",
                inputs: vec![
                    link("image", DataType::Image),
                    combo("upscale_method", &METHODS),
                    float("scale_by", 1.0, 0.01, 8.0, 0.01),
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }
}

impl Default for ImageScaleBy {
    fn default() -> Self {
        Self::new()
    }
}

impl TileNode for ImageScaleBy {
    type Kernel = ScaleKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, args: &Args) -> std::result::Result<ScaleKernel, NodeError> {
        Ok(ScaleKernel {
            method: method(args)?,
            target: Target::Factor(args.float("scale_by")?),
        })
    }
}
