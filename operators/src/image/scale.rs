//! `ImageScale` and `ImageScaleBy` (ComfyUI names and inputs). Output size follows ComfyUI:
//! `ImageScale` keeps the aspect when one side is 0 and can centre-crop to the target aspect;
//! `ImageScaleBy` rounds `size * scale_by` (Python's round: half to even).
//! Receptive field: the span of the resampling taps of a tile's rows and columns.

use super::resample::{apply_axis_then, quantize_in, table, AxisTable, Method, METHODS};
use super::TileNode;
use crate::spec::{combo, float, int, link, out, MAX_RESOLUTION};
use candle_core::{Result, Tensor};
use nova_dataflow::{Args, DataType, NodeError, NodeSchema, Rect};
use nova_engines::{Border, TileKernel, Window};
use std::sync::{Arc, Mutex};

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
    method: Method,
    target: Target,
    /// Tables for the last input size asked about: a tiled run asks once per tile, and the
    /// tables of a large image take a while to build.
    cache: Mutex<Option<(usize, usize, Arc<Tables>)>>,
}

/// Row and column tables.
type Tables = (AxisTable, AxisTable);

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
    // An extreme aspect change would crop to nothing; keep at least the centre pixel.
    let x = x.min(w.saturating_sub(1) / 2);
    let y = y.min(h.saturating_sub(1) / 2);
    (x, y, w - 2 * x, h - 2 * y)
}

impl ScaleKernel {
    /// A kernel for `method` and `target`.
    pub fn new(method: Method, target: Target) -> Self {
        ScaleKernel {
            method,
            target,
            cache: Mutex::new(None),
        }
    }

    /// ComfyUI's `ImageScale` with width and height both 0 returns the image unchanged.
    fn identity(&self) -> bool {
        matches!(
            self.target,
            Target::Size {
                width: 0,
                height: 0,
                ..
            }
        )
    }

    fn tables(&self, h: usize, w: usize) -> Arc<Tables> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ch, cw, t)) = cache.as_ref() {
            if (*ch, *cw) == (h, w) {
                return t.clone();
            }
        }
        let (oh, ow) = self.output_size(h, w);
        let crop = matches!(self.target, Target::Size { crop: true, .. });
        let (cx, cy, cw, ch) = crop_box(h, w, oh, ow, crop);
        let t = Arc::new((
            table(self.method, ch, oh, cy),
            table(self.method, cw, ow, cx),
        ));
        *cache = Some((h, w, t.clone()));
        t
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
        if self.identity() {
            return Window::around(out, 0);
        }
        let t = self.tables(h, w);
        let (ty, tx) = (&t.0, &t.1);
        let (y0, y1) = ty.span(out.y, out.h);
        let (x0, x1) = tx.span(out.x, out.w);
        Window::spanning(x0, y0, x1, y1)
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
        if self.identity() {
            return Ok(source.clone());
        }
        let t = self.tables(h, w);
        let (ty, tx) = (&t.0, &t.1);
        let q = self.method.quantized();
        let src = if q {
            quantize_in(source)?
        } else {
            source.clone()
        };
        let rows = apply_axis_then(&src, 2, tx, out.x, out.w, window.x as usize, q)?;
        apply_axis_then(&rows, 1, ty, out.y, out.h, window.y as usize, q)
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

impl TileNode for ImageScale {
    type Kernel = ScaleKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, args: &Args) -> std::result::Result<ScaleKernel, NodeError> {
        Ok(ScaleKernel::new(
            method(args)?,
            Target::Size {
                width: args.int("width")? as usize,
                height: args.int("height")? as usize,
                crop: args.string("crop")? == "center",
            },
        ))
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

impl TileNode for ImageScaleBy {
    type Kernel = ScaleKernel;

    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn kernel(&self, args: &Args) -> std::result::Result<ScaleKernel, NodeError> {
        Ok(ScaleKernel::new(
            method(args)?,
            Target::Factor(args.float("scale_by")?),
        ))
    }
}

crate::spec::default_via_new!(ImageScale, ImageScaleBy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_aspect_crop_keeps_at_least_one_pixel() {
        // 640x480 to 16384x1 with a centre crop: the crop would be 0 rows high.
        let (x, y, w, h) = crop_box(480, 640, 1, 16384, true);
        assert_eq!((x, w), (0, 640));
        assert!(h >= 1 && y + h <= 480, "crop {y}+{h}");
        let (_, _, w, h) = crop_box(1, 1, 7, 9000, true);
        assert_eq!((w, h), (1, 1));
    }
}
