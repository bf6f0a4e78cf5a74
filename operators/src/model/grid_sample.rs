//! Bilinear sampling for flow-based models: PyTorch's `grid_sample` (bilinear, border
//! padding, `align_corners = true`), backward warping of an image by a per-pixel flow in
//! pixels (RIFE's `warp`), and bilinear resizing by a scale factor with the semantics of
//! `F.interpolate(mode="bilinear", align_corners=False, recompute_scale_factor=False)`.
//!
//! candle has no `grid_sample`, and its bilinear upsampling is not the place to keep
//! PyTorch's exact sampling positions, so both are here as plain loops over output pixels on
//! contiguous f32 data (CPU), rows split across threads. Tensors on another device, or of
//! another dtype, go through host f32 and back; a device kernel (e.g. CUDA behind a `cuda`
//! feature) would slot in at [`on_host`], the one place that dispatches on the device.
//!
//! Invariants: inputs are `[n, c, h, w]`; sampling positions are clamped into the image
//! (border padding) before interpolation, so every read is in bounds whatever the grid or
//! flow holds (NaN included: it propagates into the output, never into an index).

use super::nn::{par_each, with_values};
use candle_core::{bail, DType, Device, Result, Tensor};

/// Output rows per unit of parallel work.
const BAND_ROWS: usize = 8;

/// Below this many output values, the work stays in the calling thread: spawning threads
/// costs more than it saves.
const SERIAL_BELOW: usize = 1 << 14;

/// `grid_sample(input, grid, mode="bilinear", padding_mode="border", align_corners=True)`.
///
/// `input` is `[n, c, h, w]`; `grid` is `[n, ho, wo, 2]` of normalized `(x, y)` positions,
/// `-1` the centre of the first pixel and `1` that of the last. Returns `[n, c, ho, wo]`.
pub fn grid_sample(input: &Tensor, grid: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = input.dims4()?;
    let (gn, ho, wo, two) = grid.dims4()?;
    if h == 0 || w == 0 {
        bail!(
            "grid_sample: input {:?} has no pixels to sample",
            input.dims()
        )
    }
    if gn != n || two != 2 {
        bail!(
            "grid_sample: grid {:?} does not fit input {:?} (expected [{n}, h_out, w_out, 2])",
            grid.dims(),
            input.dims()
        )
    }
    on_host(input, Some(grid), |x, g| {
        let g = g.expect("grid_sample passes its grid");
        sample(x, (n, c, h, w), (ho, wo), &Positions::Grid(g))
    })
}

/// Backward warp: output pixel `(x, y)` samples `input` at `(x + flow_x, y + flow_y)` (pixels),
/// bilinearly, positions clamped to the image. `input` is `[n, c, h, w]`, `flow` `[n, 2, h, w]`.
///
/// This is RIFE's `warp` (the flow turned into a normalized grid for [`grid_sample`] with
/// `align_corners = true`, border padding), computed in pixels directly.
pub fn warp(input: &Tensor, flow: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = input.dims4()?;
    if h == 0 || w == 0 {
        bail!("warp: input {:?} has no pixels to sample", input.dims())
    }
    if flow.dims() != [n, 2, h, w] {
        bail!(
            "warp: flow {:?} does not fit input {:?} (expected [{n}, 2, {h}, {w}])",
            flow.dims(),
            input.dims()
        )
    }
    on_host(input, Some(flow), |x, f| {
        let f = f.expect("warp passes its flow");
        sample(x, (n, c, h, w), (h, w), &Positions::Flow(f))
    })
}

/// `F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False,
/// recompute_scale_factor=False)` on `[n, c, h, w]`: the output is `floor(h * factor)` by
/// `floor(w * factor)`, and output pixel `i` samples the input at
/// `max((i + 0.5) / factor - 0.5, 0)` (no antialiasing when downscaling). A factor of 1 is the
/// identity.
pub fn interpolate_bilinear(x: &Tensor, factor: f64) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if !(factor.is_finite() && factor > 0.0) {
        bail!("interpolate_bilinear: scale factor {factor} is not a positive number")
    }
    let (ho, wo) = (
        (h as f64 * factor).floor() as usize,
        (w as f64 * factor).floor() as usize,
    );
    if ho == 0 || wo == 0 {
        bail!("interpolate_bilinear: {h}x{w} scaled by {factor} leaves no pixels ({ho}x{wo})")
    }
    if (ho, wo) == (h, w) && factor == 1.0 {
        return Ok(x.clone());
    }
    let scale = (1.0 / factor) as f32;
    on_host(x, None, |xs, _| resize(xs, (n, c, h, w), (ho, wo), scale))
}

/// Runs `f` on the f32 values of `x` (and of `aux`, the grid or flow) on the host, and puts
/// the `[n, c, ho, wo]` result it returns back on `x`'s device in `x`'s dtype.
fn on_host(
    x: &Tensor,
    aux: Option<&Tensor>,
    f: impl FnOnce(&[f32], Option<&[f32]>) -> (Vec<f32>, [usize; 4]),
) -> Result<Tensor> {
    let host = |t: &Tensor| -> Result<Tensor> { t.to_device(&Device::Cpu)?.to_dtype(DType::F32) };
    let xh = host(x)?;
    let ah = aux.map(host).transpose()?;
    let (values, dims) = with_values(&xh, |xs| match &ah {
        Some(a) => with_values(a, |a| f(xs, Some(a))),
        None => Ok(f(xs, None)),
    })??;
    Tensor::from_vec(values, dims.to_vec(), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

/// Where each output pixel reads its input.
enum Positions<'a> {
    /// Normalized `(x, y)` per output pixel, `[n, ho, wo, 2]`.
    Grid(&'a [f32]),
    /// A displacement in pixels per output pixel, `[n, 2, h, w]` (output size = input size).
    Flow(&'a [f32]),
}

/// The output (`[n, c, ho, wo]`, zeroed) cut into bands of [`BAND_ROWS`] rows of one image,
/// each band holding its rows of every channel plane; `f(image, first_row, planes)` fills a
/// band. Bands are disjoint, so threads write only memory they alone hold.
fn for_each_band(
    out: &mut [f32],
    (n, c, ho, wo): (usize, usize, usize, usize),
    f: impl Fn(usize, usize, &mut [&mut [f32]]) + Sync,
) {
    if out.is_empty() {
        return;
    }
    let bands = ho.div_ceil(BAND_ROWS);
    let mut jobs: Vec<(usize, usize, Vec<&mut [f32]>)> = Vec::with_capacity(n * bands);
    for (img, planes) in out.chunks_mut(c * ho * wo).enumerate() {
        let first = jobs.len();
        for b in 0..bands {
            jobs.push((img, b * BAND_ROWS, Vec::with_capacity(c)));
        }
        for plane in planes.chunks_mut(ho * wo) {
            for (b, rows) in plane.chunks_mut(BAND_ROWS * wo).enumerate() {
                jobs[first + b].2.push(rows);
            }
        }
    }
    let run = |(img, y0, mut planes): (usize, usize, Vec<&mut [f32]>)| f(img, y0, &mut planes);
    if n * c * ho * wo < SERIAL_BELOW {
        jobs.into_iter().for_each(run);
    } else {
        par_each(jobs, run);
    }
}

/// Bilinear sampling with border clamping of `x` (`[n, c, h, w]`) at `pos`, into
/// `[n, c, ho, wo]`.
fn sample(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    (ho, wo): (usize, usize),
    pos: &Positions,
) -> (Vec<f32>, [usize; 4]) {
    let mut out = vec![0f32; n * c * ho * wo];
    let (xmax, ymax) = ((w - 1) as f32, (h - 1) as f32);
    for_each_band(&mut out, (n, c, ho, wo), |img, y0, planes| {
        // Hot: this runs once per output pixel (RIFE warps both frames after each of its
        // three blocks), so it allocates nothing and computes the four taps once for all
        // channels.
        let src = &x[img * c * h * w..(img + 1) * c * h * w];
        let rows = planes.first().map_or(0, |p| p.len() / wo.max(1));
        for r in 0..rows {
            let y = y0 + r;
            for xo in 0..wo {
                let (px, py) = match pos {
                    Positions::Grid(g) => {
                        let o = ((img * ho + y) * wo + xo) * 2;
                        // align_corners = true: -1 and 1 are the centres of the end pixels.
                        ((g[o] + 1.0) / 2.0 * xmax, (g[o + 1] + 1.0) / 2.0 * ymax)
                    }
                    Positions::Flow(f) => {
                        let o = img * 2 * h * w + y * w + xo;
                        (xo as f32 + f[o], y as f32 + f[o + h * w])
                    }
                };
                // Border padding: the position is clamped into the image first.
                let (px, py) = (px.clamp(0.0, xmax), py.clamp(0.0, ymax));
                // `as usize` saturates (NaN gives 0), so indices stay in bounds.
                let (x0, y0i) = (px.floor() as usize, py.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(w - 1), (y0i + 1).min(h - 1));
                let (fx, fy) = (px - x0 as f32, py - y0i as f32);
                // PyTorch's weights: north-west, north-east, south-west, south-east.
                let (nw, ne) = ((1.0 - fx) * (1.0 - fy), fx * (1.0 - fy));
                let (sw, se) = ((1.0 - fx) * fy, fx * fy);
                let (i00, i01) = (y0i * w + x0, y0i * w + x1);
                let (i10, i11) = (y1 * w + x0, y1 * w + x1);
                for (ch, plane) in planes.iter_mut().enumerate() {
                    let s = &src[ch * h * w..(ch + 1) * h * w];
                    plane[r * wo + xo] = s[i00] * nw + s[i01] * ne + s[i10] * sw + s[i11] * se;
                }
            }
        }
    });
    (out, [n, c, ho, wo])
}

/// One output coordinate's two source taps and their weights.
#[derive(Clone, Copy)]
struct Taps {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// PyTorch's `area_pixel_compute_source_index` (align_corners = false) for every output
/// index along one axis of `size` input pixels.
fn taps(out: usize, size: usize, scale: f32) -> Vec<Taps> {
    (0..out)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(size - 1);
            let i1 = if i0 < size - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            Taps {
                i0,
                i1,
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

/// Bilinear resize of `x` (`[n, c, h, w]`) to `[n, c, ho, wo]`, source position
/// `scale * (i + 0.5) - 0.5` on both axes.
fn resize(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    (ho, wo): (usize, usize),
    scale: f32,
) -> (Vec<f32>, [usize; 4]) {
    let (ty, tx) = (taps(ho, h, scale), taps(wo, w, scale));
    let mut out = vec![0f32; n * c * ho * wo];
    for_each_band(&mut out, (n, c, ho, wo), |img, y0, planes| {
        // Hot: once per output value of every resize (RIFE resizes each block's input and
        // output), so the taps are computed once per call and nothing is allocated here.
        for (ch, plane) in planes.iter_mut().enumerate() {
            let s = &x[((img * c) + ch) * h * w..((img * c) + ch + 1) * h * w];
            for (r, row) in plane.chunks_mut(wo).enumerate() {
                let t = ty[y0 + r];
                let (a, b) = (&s[t.i0 * w..(t.i0 + 1) * w], &s[t.i1 * w..(t.i1 + 1) * w]);
                for (o, u) in row.iter_mut().zip(&tx) {
                    // PyTorch's order: rows weighted after each row's horizontal blend.
                    *o = t.l0 * (u.l0 * a[u.i0] + u.l1 * a[u.i1])
                        + t.l1 * (u.l0 * b[u.i0] + u.l1 * b[u.i1]);
                }
            }
        }
    });
    (out, [n, c, ho, wo])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], dims: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_vec(values.to_vec(), dims, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    /// The identity grid of PyTorch's `affine_grid` with `align_corners = true`.
    fn identity_grid(n: usize, h: usize, w: usize) -> Tensor {
        let mut g = Vec::new();
        for _ in 0..n {
            for y in 0..h {
                for x in 0..w {
                    g.push(-1.0 + 2.0 * x as f32 / (w - 1) as f32);
                    g.push(-1.0 + 2.0 * y as f32 / (h - 1) as f32);
                }
            }
        }
        Tensor::from_vec(g, (n, h, w, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_identity_grid_and_a_zero_flow_return_the_input() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu).unwrap();
        let by_grid = grid_sample(&x, &identity_grid(2, 5, 7)).unwrap();
        assert!(close(&values(&by_grid), &values(&x)));
        let zero = Tensor::zeros((2, 2, 5, 7), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(values(&warp(&x, &zero).unwrap()), values(&x));
    }

    #[test]
    fn a_half_pixel_shift_averages_neighbours_and_clamps_at_the_border() {
        // One row [0, 2, 4, 8]; sampling at x + 0.5 gives the mean of x and x + 1, and the
        // last pixel, whose position is clamped to itself, stays 8.
        let x = t(&[0.0, 2.0, 4.0, 8.0], (1, 1, 1, 4));
        let mut flow = vec![0.5f32; 4];
        flow.extend([0.0; 4]);
        let flow = t(&flow, (1, 2, 1, 4));
        assert_eq!(values(&warp(&x, &flow).unwrap()), [1.0, 3.0, 6.0, 8.0]);
        // Vertically: rows [1, 3] sampled a quarter pixel down.
        let x = t(&[1.0, 3.0], (1, 1, 2, 1));
        let flow = t(&[0.0, 0.0, 0.25, 0.25], (1, 2, 2, 1));
        assert_eq!(values(&warp(&x, &flow).unwrap()), [1.5, 3.0]);
    }

    #[test]
    fn positions_outside_the_image_take_the_nearest_border_value() {
        // 2x2 image [[1, 2], [3, 4]], sampled far outside each corner and at the centre.
        let x = t(&[1.0, 2.0, 3.0, 4.0], (1, 1, 2, 2));
        let grid = t(
            &[
                -9.0, -9.0, 9.0, -9.0, -9.0, 9.0, 9.0, 9.0, 0.0, 0.0, 3.0, 0.0,
            ],
            (1, 1, 6, 2),
        );
        assert_eq!(
            values(&grid_sample(&x, &grid).unwrap()),
            [1.0, 2.0, 3.0, 4.0, 2.5, 3.0]
        );
        // A flow pointing out of the image, and a NaN flow, never read out of bounds.
        let flow = t(
            &[-5.0, 7.0, 0.0, 0.0, 0.0, 0.0, f32::NAN, -100.0],
            (1, 2, 2, 2),
        );
        let got = values(&warp(&x, &flow).unwrap());
        assert_eq!(got[..2], [1.0, 2.0]);
        assert!(got[2].is_nan());
        assert_eq!(got[3], 2.0);
    }

    #[test]
    fn grid_sample_at_fractional_positions_is_bilinear() {
        // 3x3 image of v = 10 y + x: bilinear sampling reproduces the plane exactly.
        let x: Vec<f32> = (0..9).map(|i| (10 * (i / 3) + i % 3) as f32).collect();
        let x = t(&x, (1, 1, 3, 3));
        // Pixel (0.5, 1.25) and (1.75, 0.25); normalized = p / 1 - 1 for size 3.
        let grid = t(&[-0.5, 0.25, 0.75, -0.75], (1, 1, 2, 2));
        assert!(close(
            &values(&grid_sample(&x, &grid).unwrap()),
            &[13.0, 4.25]
        ));
    }

    #[test]
    fn a_grid_built_from_a_flow_samples_what_warp_samples() {
        let dev = Device::Cpu;
        let (h, w) = (6, 9);
        let x = Tensor::randn(0f32, 1.0, (1, 2, h, w), &dev).unwrap();
        let flow = Tensor::randn(0f32, 2.0, (1, 2, h, w), &dev).unwrap();
        let f = values(&flow);
        let mut g = Vec::new();
        for y in 0..h {
            for xx in 0..w {
                let (px, py) = (xx as f32 + f[y * w + xx], y as f32 + f[h * w + y * w + xx]);
                g.push(px / (w - 1) as f32 * 2.0 - 1.0);
                g.push(py / (h - 1) as f32 * 2.0 - 1.0);
            }
        }
        let grid = Tensor::from_vec(g, (1, h, w, 2), &dev).unwrap();
        let a = grid_sample(&x, &grid).unwrap();
        let b = warp(&x, &flow).unwrap();
        assert!(crate::model::max_abs_diff(&a, &b) < 1e-5);
    }

    #[test]
    fn downscaling_samples_where_pytorch_does() {
        // 8 columns 0..8: by 1/2, output i samples 2i + 0.5 (mean of 2i and 2i + 1); by 1/4,
        // it samples 4i + 1.5 (mean of 4i + 1 and 4i + 2), not the mean of the 4-block.
        let x: Vec<f32> = (0..8).map(|i| (i * i) as f32).collect();
        let x = t(&x, (1, 1, 1, 8));
        let x2 = x.broadcast_as((1, 1, 2, 8)).unwrap().contiguous().unwrap();
        let half = values(&interpolate_bilinear(&x2, 0.5).unwrap());
        assert_eq!(half, [0.5, 6.5, 20.5, 42.5]);
        let x4 = x.broadcast_as((1, 1, 4, 8)).unwrap().contiguous().unwrap();
        let quarter = values(&interpolate_bilinear(&x4, 0.25).unwrap());
        assert_eq!(quarter, [2.5, 30.5]);
    }

    #[test]
    fn upscaling_clamps_the_source_position_at_both_ends() {
        // [0, 1] by 2: positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (last pixel only).
        let x = t(&[0.0, 1.0], (1, 1, 1, 2));
        let y = interpolate_bilinear(&x, 2.0).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 4]);
        assert_eq!(values(&y), [0.0, 0.25, 0.75, 1.0, 0.0, 0.25, 0.75, 1.0]);
        // A 2-D case with every channel and image independent.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 6), &Device::Cpu).unwrap();
        let y = interpolate_bilinear(&x, 4.0).unwrap();
        assert_eq!(y.dims(), [2, 3, 16, 24]);
        let one = interpolate_bilinear(&x.narrow(1, 1, 1).unwrap(), 4.0).unwrap();
        let d = crate::model::max_abs_diff(&y.narrow(1, 1, 1).unwrap(), &one);
        assert_eq!(d, 0.0);
    }

    #[test]
    fn large_inputs_split_across_threads_equal_the_serial_result() {
        // 2 x 3 x 100 x 80 values: well above the serial threshold, with a short last band.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 100, 80), &dev).unwrap();
        let flow = Tensor::randn(0f32, 3.0, (2, 2, 100, 80), &dev).unwrap();
        let all = warp(&x, &flow).unwrap();
        for i in 0..2 {
            let one = warp(
                &x.narrow(0, i, 1).unwrap().narrow(1, 2, 1).unwrap(),
                &flow.narrow(0, i, 1).unwrap(),
            )
            .unwrap();
            let part = all.narrow(0, i, 1).unwrap().narrow(1, 2, 1).unwrap();
            assert_eq!(crate::model::max_abs_diff(&part, &one), 0.0);
        }
        let down = interpolate_bilinear(&x, 0.5).unwrap();
        let one = interpolate_bilinear(&x.narrow(1, 0, 1).unwrap(), 0.5).unwrap();
        let part = down.narrow(1, 0, 1).unwrap();
        assert_eq!(crate::model::max_abs_diff(&part, &one), 0.0);
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_with_both_shapes() {
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let bad = Tensor::zeros((1, 2, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let e = warp(&x, &bad).unwrap_err().to_string();
        assert!(
            e.contains("[1, 2, 4, 5]") && e.contains("[1, 3, 4, 4]"),
            "{e}"
        );
        let grid = Tensor::zeros((1, 4, 4, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(grid_sample(&x, &grid).is_err());
        assert!(interpolate_bilinear(&x, 0.0).is_err());
        assert!(interpolate_bilinear(&x, 0.1).is_err());
    }
}
