//! 3x3 convolution (stride 1, padding 1) for the models: Winograd's F(4x4, 3x3) on the CPU,
//! candle's `conv2d` elsewhere and for shapes where Winograd does not pay.
//!
//! Why: candle's CPU `conv2d` builds the whole im2col matrix (9x the input) and multiplies it,
//! which at 512x512x64 moves 600 MB per layer; TAESD, Real-ESRGAN and the VAEs are made of
//! such layers. F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016) computes each 4x4 output tile from a 6x6 input tile with 36 products per
//! channel pair instead of 144: 36 matrix products `[tiles x C] x [C x K]` (candle's `matmul`,
//! the `gemm` crate, multi-threaded) between an input transform and an output transform that
//! run here over channel vectors (channels-last), split across threads.
//!
//! Invariant: the result equals `conv2d` up to f32 rounding (the transforms' constants are
//! small: the error stays near 1e-6 relative; see the tests).

use super::nn::{par_each, with_values};
use candle_core::{DType, Device, Tensor};
use nova_dataflow::NodeError;

/// Smallest channel count and image side for which Winograd is used.
const MIN_CHANNELS: usize = 8;
const MIN_SIDE: usize = 8;

/// What is applied to a convolution's result, fused into writing it: the bias, then a
/// residual added, then ReLU.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

/// `x` (`[n, c, h, w]`) convolved with `w` (`[k, c, 3, 3]`), stride 1, zero padding `pad`
/// (0 or 1), plus `b`.
pub fn conv3x3(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    pad: usize,
) -> Result<Tensor, NodeError> {
    conv3x3_with(
        x,
        w,
        pad,
        Epilogue {
            bias: b,
            ..Epilogue::default()
        },
    )
}

/// [`conv3x3`] followed by an [`Epilogue`].
pub fn conv3x3_with(x: &Tensor, w: &Tensor, pad: usize, ep: Epilogue) -> Result<Tensor, NodeError> {
    let (n, c, h, wd) = x.dims4()?;
    let (k, wc, kh, kw) = w.dims4()?;
    let (oh, ow) = (
        (h + 2 * pad).saturating_sub(2),
        (wd + 2 * pad).saturating_sub(2),
    );
    let fast = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && (kh, kw) == (3, 3)
        && wc == c
        && c >= MIN_CHANNELS
        && pad <= 1
        && h.min(wd) >= MIN_SIDE
        && ep
            .bias
            .is_none_or(|b| b.dims() == [k] && b.dtype() == DType::F32)
        && ep
            .residual
            .is_none_or(|r| r.dims() == [n, k, oh, ow] && r.dtype() == DType::F32);
    if fast {
        return winograd(x, w, (n, c, h, wd), k, pad, ep);
    }
    let mut y = x.conv2d(w, pad, 1, 1, 1)?;
    if let Some(b) = ep.bias {
        y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
    }
    if let Some(r) = ep.residual {
        y = (y + r)?;
    }
    Ok(if ep.relu { y.relu()? } else { y })
}

/// `x` convolved with `w` (`[k, c, 3, 3]`) at stride 2, padding 1, plus `b`. On the CPU, for
/// even sizes, the stride-1 Winograd convolution at the even positions (its result there is
/// the strided one), which beats `conv2d`'s im2col although it computes four times the
/// outputs.
pub fn conv3x3_stride2(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor, NodeError> {
    let (n, c, h, wd) = x.dims4()?;
    let k = w.dim(0)?;
    let winograd_applies = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && c >= MIN_CHANNELS
        && h.min(wd) >= MIN_SIDE
        && h % 2 == 0
        && wd % 2 == 0;
    if winograd_applies {
        let full = conv3x3(x, w, b, 1)?;
        return Ok(full
            .reshape((n, k, h / 2, 2, wd / 2, 2))?
            .narrow(3, 0, 1)?
            .narrow(5, 0, 1)?
            .reshape((n, k, h / 2, wd / 2))?);
    }
    let y = x.conv2d(w, 1, 2, 1, 1)?;
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    })
}

/// The convolution whose tensors are `{p}.weight` and `{p}.bias` (the key layout of the SD
/// checkpoints), through [`conv3x3`] where it applies.
pub fn conv_named(
    x: &Tensor,
    get: &dyn Fn(&str) -> Result<Tensor, NodeError>,
    p: &str,
    pad: usize,
    stride: usize,
) -> Result<Tensor, NodeError> {
    let w = get(&format!("{p}.weight"))?;
    let b = get(&format!("{p}.bias"))?;
    if stride == 1 && w.dims().get(2..) == Some(&[3, 3][..]) {
        return conv3x3(x, &w, Some(&b), pad);
    }
    let y = x.conv2d(&w, pad, stride, 1, 1)?;
    Ok(y.broadcast_add(&b.reshape((1, (), 1, 1))?)?)
}

/// The rows of `B^T` = `[4,0,-5,0,1,0] [0,-4,-4,1,1,0] [0,4,-4,-1,1,0] [0,-2,-1,2,1,0]
/// [0,2,-1,-2,1,0] [0,4,0,-5,0,1]` applied to six vectors.
#[inline(always)]
fn bt6(d: [&[f32]; 6], o: [&mut [f32]; 6]) {
    let len = o[0].len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|x| &x[..len]);
    let [o0, o1, o2, o3, o4, o5] = o;
    let (o0, o1, o2) = (&mut o0[..len], &mut o1[..len], &mut o2[..len]);
    let (o3, o4, o5) = (&mut o3[..len], &mut o4[..len], &mut o5[..len]);
    for v in 0..len {
        let (a0, a1, a2, a3, a4, a5) = (d0[v], d1[v], d2[v], d3[v], d4[v], d5[v]);
        o0[v] = 4.0 * a0 - 5.0 * a2 + a4;
        o1[v] = -4.0 * (a1 + a2) + a3 + a4;
        o2[v] = 4.0 * (a1 - a2) - a3 + a4;
        o3[v] = -2.0 * (a1 - a3) - a2 + a4;
        o4[v] = 2.0 * (a1 - a3) - a2 + a4;
        o5[v] = 4.0 * a1 - 5.0 * a3 + a5;
    }
}

/// The rows of `A^T` = `[1,1,1,1,1,0] [0,1,-1,2,-2,0] [0,1,1,4,4,0] [0,1,-1,8,-8,1]` applied
/// to six vectors.
#[inline(always)]
fn at4(m: [&[f32]; 6], o: [&mut [f32]; 4]) {
    let len = o[0].len();
    let [m0, m1, m2, m3, m4, m5] = m.map(|x| &x[..len]);
    let [o0, o1, o2, o3] = o;
    let (o0, o1, o2, o3) = (
        &mut o0[..len],
        &mut o1[..len],
        &mut o2[..len],
        &mut o3[..len],
    );
    for v in 0..len {
        let (s12, d12) = (m1[v] + m2[v], m1[v] - m2[v]);
        let (s34, d34) = (m3[v] + m4[v], m3[v] - m4[v]);
        o0[v] = m0[v] + s12 + s34;
        o1[v] = d12 + 2.0 * d34;
        o2[v] = s12 + 4.0 * s34;
        o3[v] = d12 + 8.0 * d34 + m5[v];
    }
}

/// Six (or four) consecutive `len`-long slices of `buf` from slice `first` on.
fn six_mut(buf: &mut [f32], first: usize, len: usize) -> [&mut [f32]; 6] {
    let mut it = buf[first * len..(first + 6) * len].chunks_exact_mut(len);
    std::array::from_fn(|_| it.next().unwrap_or_default())
}

fn four_mut(buf: &mut [f32], first: usize, len: usize) -> [&mut [f32]; 4] {
    let mut it = buf[first * len..(first + 4) * len].chunks_exact_mut(len);
    std::array::from_fn(|_| it.next().unwrap_or_default())
}

/// `B^T d B` of a 6x6 tile of channel vectors (`d[r * 6 + q]`, each `len` long) into
/// `out[i * 6 + j]`, through `tmp` (36 x `len`, laid out `[j][i]`).
fn input_transform(d: &[&[f32]], len: usize, tmp: &mut [f32], out: &mut [&mut [f32]]) {
    // Columns: tmp[j][i] = sum_r BT[i][r] d[r][j].
    for j in 0..6 {
        bt6(
            std::array::from_fn(|r| d[r * 6 + j]),
            six_mut(tmp, j * 6, len),
        );
    }
    // Rows: out[i][j] = sum_c tmp[c][i] BT[j][c].
    for i in 0..6 {
        let src: [&[f32]; 6] =
            std::array::from_fn(|c| &tmp[(c * 6 + i) * len..(c * 6 + i + 1) * len]);
        let [o0, o1, o2, o3, o4, o5] = &mut out[i * 6..i * 6 + 6] else {
            unreachable!("six outputs per row")
        };
        bt6(src, [o0, o1, o2, o3, o4, o5]);
    }
}

/// `G g G^T` of one 3x3 filter, `G` = `[1/4,0,0] [-1/6,-1/6,-1/6] [-1/6,1/6,-1/6]
/// [1/24,1/12,1/6] [1/24,-1/12,1/6] [0,0,1]`.
fn filter_transform(g: &[f32]) -> [f32; 36] {
    const G: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut tmp = [[0f64; 3]; 6];
    for (i, row) in G.iter().enumerate() {
        for j in 0..3 {
            tmp[i][j] = (0..3).map(|r| row[r] * g[r * 3 + j] as f64).sum();
        }
    }
    let mut out = [0f32; 36];
    for i in 0..6 {
        for (j, row) in G.iter().enumerate() {
            out[i * 6 + j] = (0..3).map(|c| tmp[i][c] * row[c]).sum::<f64>() as f32;
        }
    }
    out
}

/// Winograd F(4x4, 3x3) of `x` with dims `(n, c, ih, iw)` and `k` filters, padding `pad`.
///
/// Work is cut in bands: one row of output tiles (4 output rows) of one image, each carried
/// through the whole pipeline while its data is in cache: its input rows are gathered
/// channels-last into a small buffer, transformed into `V[xi][tile][c]`, multiplied by the
/// transformed filters `U[xi][c][k]` (36 products in one batched `matmul`), and `M[xi][tile][k]`
/// is transformed back into a channels-last band, which goes through the epilogue into the
/// band's rows of every output plane. Threads own whole bands, so every write is to memory
/// the thread alone holds.
fn winograd(
    x: &Tensor,
    w: &Tensor,
    (n, c, ih, iw): (usize, usize, usize, usize),
    k: usize,
    pad: usize,
    ep: Epilogue,
) -> Result<Tensor, NodeError> {
    // Output size and tiles.
    let (h, wd) = (ih + 2 * pad - 2, iw + 2 * pad - 2);
    let (th, tw) = (h.div_ceil(4), wd.div_ceil(4));
    let dev = Device::Cpu;

    // U[xi][c][k] from the filters.
    let ws: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let mut u = vec![0f32; 36 * c * k];
    // Filters in order: (k, c) pairs of nine taps.
    for (i, g) in ws.chunks_exact(9).enumerate() {
        let (kk, cc) = (i / c, i % c);
        for (xi, val) in filter_transform(g).into_iter().enumerate() {
            u[(xi * c + cc) * k + kk] = val;
        }
    }
    let u = Tensor::from_vec(u, (36, c, k), &dev)?;
    let bias: Option<Vec<f32>> = ep.bias.map(|b| b.to_vec1()).transpose()?;
    let residual = ep.residual.map(|r| r.contiguous()).transpose()?;

    // The output, cut into the bands' rows of every plane (the last band may be short).
    let mut ys = vec![0f32; n * k * h * wd];
    let jobs: Vec<(usize, Vec<&mut [f32]>)> = ys
        .chunks_mut(k * h * wd)
        .enumerate()
        .flat_map(|(img, planes)| {
            let mut per: Vec<Vec<&mut [f32]>> = (0..th).map(|_| Vec::new()).collect();
            for plane in planes.chunks_mut(h * wd) {
                for (i, s) in plane.chunks_mut(4 * wd).enumerate() {
                    per[i].push(s);
                }
            }
            per.into_iter()
                .enumerate()
                .map(move |(ty, s)| (img * th + ty, s))
        })
        .collect();
    let failed = std::sync::Mutex::new(None);
    // Gathered input rows: 6 rows of (4 tw + 2) pixels, channels-last, zero outside.
    let row_px = 4 * tw + 2;
    let row = 4 * tw;
    let run = |xs: &[f32], res: Option<&[f32]>| {
        par_each(jobs, |(band, mut rows)| {
            let (img, ty) = (band / th, band % th);
            // Gather, in blocks of 8 channels x 8 pixels so reads and writes both stay on
            // few cache lines.
            let mut buf = vec![0f32; 6 * row_px * c];
            let cols = iw.min(row_px - pad);
            for r in 0..6 {
                let y = (ty * 4 + r) as isize - pad as isize;
                if y < 0 || y >= ih as isize {
                    continue;
                }
                let y = y as usize;
                let dst = &mut buf[r * row_px * c..(r + 1) * row_px * c];
                for ch0 in (0..c).step_by(8) {
                    for x0 in (0..cols).step_by(8) {
                        let xr = x0..(x0 + 8).min(cols);
                        for ch in ch0..(ch0 + 8).min(c) {
                            let o = ((img * c + ch) * ih + y) * iw;
                            for (xx, val) in xr.clone().zip(&xs[o + xr.start..o + xr.end]) {
                                // Input column xx sits at buffer column xx + pad.
                                dst[(xx + pad) * c + ch] = *val;
                            }
                        }
                    }
                }
            }
            // V[xi][tx][c].
            let mut v = vec![0f32; 36 * tw * c];
            let mut tmp = vec![0f32; 36 * c];
            for tx in 0..tw {
                let d: [&[f32]; 36] = std::array::from_fn(|i| {
                    let o = ((i / 6) * row_px + tx * 4 + i % 6) * c;
                    &buf[o..o + c]
                });
                let mut outs: Vec<&mut [f32]> = v
                    .chunks_exact_mut(tw * c)
                    .map(|plane| &mut plane[tx * c..(tx + 1) * c])
                    .collect();
                input_transform(&d, c, &mut tmp, &mut outs);
            }
            // M[xi][tx][k].
            let product = Tensor::from_vec(v, (36, tw, c), &dev).and_then(|v| v.matmul(&u));
            let done = product.and_then(|p| {
                with_values(&p, |m| {
                    // Y = A^T M A per tile, channels-last: yb[i][pixel][k].
                    let mut tmp = vec![0f32; 24 * k];
                    let mut yb = vec![0f32; 4 * row * k];
                    for tx in 0..tw {
                        let at = |xi: usize| &m[(xi * tw + tx) * k..(xi * tw + tx + 1) * k];
                        for j in 0..6 {
                            let src = std::array::from_fn(|r| at(r * 6 + j));
                            at4(src, four_mut(&mut tmp, j * 4, k));
                        }
                        for i in 0..4 {
                            let src: [&[f32]; 6] =
                                std::array::from_fn(|c| &tmp[(c * 4 + i) * k..(c * 4 + i + 1) * k]);
                            at4(src, four_mut(&mut yb, i * row + tx * 4, k));
                        }
                    }
                    // Into the planes with the epilogue, in blocks of 8 channels x 8 pixels.
                    for i in 0..(h - ty * 4).min(4) {
                        let y = ty * 4 + i;
                        for q0 in (0..k).step_by(8) {
                            for x0 in (0..wd).step_by(8) {
                                let xr = x0..(x0 + 8).min(wd);
                                for q in q0..(q0 + 8).min(k) {
                                    let b = bias.as_ref().map_or(0.0, |b| b[q]);
                                    let out = &mut rows[q][i * wd + xr.start..i * wd + xr.end];
                                    let res = res.map(|r| {
                                        let o = ((img * k + q) * h + y) * wd;
                                        &r[o + xr.start..o + xr.end]
                                    });
                                    for (j, (o, x)) in out.iter_mut().zip(xr.clone()).enumerate() {
                                        let mut v = yb[(i * row + x) * k + q] + b;
                                        if let Some(r) = res {
                                            v += r[j];
                                        }
                                        *o = if ep.relu { v.max(0.0) } else { v };
                                    }
                                }
                            }
                        }
                    }
                })
            });
            if let Err(e) = done {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(NodeError::from(e));
            }
        })
    };
    with_values(x, |xs| match &residual {
        Some(r) => with_values(r, |r| run(xs, Some(r))),
        None => {
            run(xs, None);
            Ok(())
        }
    })??;
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Tensor::from_vec(ys, (n, k, h, wd), &dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        crate::model::max_abs_diff(a, b) / crate::model::max_abs(b)
    }

    #[test]
    fn winograd_equals_direct_convolution_on_odd_and_even_shapes() {
        let dev = Device::Cpu;
        for (n, c, k, h, w) in [
            (1, 8, 8, 8, 8),
            (2, 16, 12, 13, 10),
            (1, 64, 64, 37, 21),
            (1, 32, 3, 9, 40),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (k, c, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, k, &dev).unwrap();
            for pad in [0, 1] {
                let fast = conv3x3(&x, &wt, Some(&b), pad).unwrap();
                let want = x
                    .conv2d(&wt, pad, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&b.reshape((1, k, 1, 1)).unwrap())
                    .unwrap();
                assert_eq!(fast.dims(), want.dims());
                let e = max_rel(&fast, &want);
                assert!(
                    e < 1e-5,
                    "{n}x{c}x{h}x{w} -> {k} pad {pad}: relative error {e}"
                );
            }
        }
    }

    #[test]
    fn the_fused_epilogue_equals_bias_residual_then_relu() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 16, 11, 14), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.2, (16, 16, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 16, &dev).unwrap();
        let ep = Epilogue {
            bias: Some(&b),
            residual: Some(&x),
            relu: true,
        };
        let fast = conv3x3_with(&x, &wt, 1, ep).unwrap();
        let want = (x
            .conv2d(&wt, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 16, 1, 1)).unwrap())
            .unwrap()
            + &x)
            .unwrap()
            .relu()
            .unwrap();
        assert!(max_rel(&fast, &want) < 1e-5);
    }

    #[test]
    fn stride_two_is_the_even_positions_of_stride_one() {
        let dev = Device::Cpu;
        for (h, w) in [(16, 12), (9, 14)] {
            let x = Tensor::randn(0f32, 1.0, (1, 16, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (8, 16, 3, 3), &dev).unwrap();
            let got = conv3x3_stride2(&x, &wt, None).unwrap();
            let want = x.conv2d(&wt, 1, 2, 1, 1).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_rel(&got, &want) < 1e-5);
        }
    }

    #[test]
    fn small_shapes_fall_back_to_conv2d() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 3, 5, 5), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
        let y = conv3x3(&x, &wt, None, 1).unwrap();
        let want = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        assert_eq!(max_rel(&y, &want), 0.0);
    }
}
