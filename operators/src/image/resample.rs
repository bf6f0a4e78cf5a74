//! Resampling as per-axis weight tables: for every output coordinate, a fixed number of input
//! indices and weights. Covers ComfyUI's `upscale_method`s:
//!
//! - `nearest-exact`, `bilinear`, `bicubic` (a = −0.75), `area`: PyTorch's
//!   `F.interpolate` semantics with `align_corners=False` and no antialiasing, which is what
//!   ComfyUI's `common_upscale` calls.
//! - `lanczos`: PIL's Lanczos-3 (support widened by the scale when downscaling). ComfyUI runs it
//!   through 8-bit PIL images, so the kernel quantizes input and output to 8 bits too.
//!
//! Tables are pure functions of (method, input length, output length); a tile uses rows of
//! the whole-image table, so tiled and untiled output agree exactly.

use candle_core::{Result, Tensor};

/// A resampling method, by ComfyUI's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    NearestExact,
    Bilinear,
    Area,
    Bicubic,
    Lanczos,
}

/// ComfyUI's option list, in its order.
pub const METHODS: [&str; 5] = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"];

impl Method {
    /// Parses ComfyUI's name.
    pub fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "nearest-exact" => Method::NearestExact,
            "bilinear" => Method::Bilinear,
            "area" => Method::Area,
            "bicubic" => Method::Bicubic,
            "lanczos" => Method::Lanczos,
            _ => return None,
        })
    }

    /// Whether the method works on 8-bit samples (as ComfyUI's PIL path does).
    pub fn quantized(self) -> bool {
        self == Method::Lanczos
    }
}

/// Weights of one axis: `taps` (index, weight) pairs per output coordinate.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisTable {
    pub taps: usize,
    pub index: Vec<u32>,
    pub weight: Vec<f32>,
}

impl AxisTable {
    /// The input range `[lo, hi)` that outputs `o0..o0+len` read.
    pub fn span(&self, o0: usize, len: usize) -> (usize, usize) {
        let ix = &self.index[o0 * self.taps..(o0 + len) * self.taps];
        let lo = ix.iter().copied().min().unwrap_or(0) as usize;
        let hi = ix.iter().copied().max().unwrap_or(0) as usize + 1;
        (lo, hi)
    }
}

fn cubic1(x: f64, a: f64) -> f64 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

fn cubic2(x: f64, a: f64) -> f64 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = std::f64::consts::PI * x;
        px.sin() / px
    }
}

fn lanczos3(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Builds the table mapping `n_out` outputs onto inputs `offset .. offset + n_in`.
/// An empty input (`n_in == 0`) has nothing to read: every output reads index `offset` with
/// weight 0 rather than panicking; callers never size an image at 0.
pub fn table(method: Method, n_in: usize, n_out: usize, offset: usize) -> AxisTable {
    if n_in == 0 {
        return AxisTable {
            taps: 1,
            index: vec![offset as u32; n_out],
            weight: vec![0.0; n_out],
        };
    }
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as i64 - 1;
    let clampi = |i: i64| i.clamp(0, last) as usize;
    let rows: Vec<Vec<(usize, f64)>> = (0..n_out)
        .map(|o| {
            let of = o as f64;
            match method {
                Method::NearestExact => {
                    vec![(((of + 0.5) * scale).floor().min(last as f64) as usize, 1.0)]
                }
                Method::Bilinear => {
                    let src = ((of + 0.5) * scale - 0.5).max(0.0);
                    let i0 = src.floor() as i64;
                    let l1 = src - i0 as f64;
                    let i1 = if i0 < last { i0 + 1 } else { i0 };
                    vec![(clampi(i0), 1.0 - l1), (clampi(i1), l1)]
                }
                Method::Bicubic => {
                    let src = (of + 0.5) * scale - 0.5;
                    let f = src.floor();
                    let t = src - f;
                    let i = f as i64;
                    let a = -0.75;
                    let w = [
                        cubic2(t + 1.0, a),
                        cubic1(t, a),
                        cubic1(1.0 - t, a),
                        cubic2(2.0 - t, a),
                    ];
                    (0..4).map(|k| (clampi(i - 1 + k as i64), w[k])).collect()
                }
                Method::Area => {
                    let start = o * n_in / n_out;
                    let end = ((o + 1) * n_in).div_ceil(n_out);
                    let n = (end - start) as f64;
                    (start..end).map(|i| (i, 1.0 / n)).collect()
                }
                Method::Lanczos => {
                    let fscale = scale.max(1.0);
                    let support = 3.0 * fscale;
                    let center = (of + 0.5) * scale;
                    let xmin = ((center - support + 0.5) as i64).max(0);
                    let xmax = ((center + support + 0.5) as i64).min(n_in as i64);
                    let mut taps: Vec<(usize, f64)> = (xmin..xmax)
                        .map(|x| (x as usize, lanczos3((x as f64 - center + 0.5) / fscale)))
                        .collect();
                    let total: f64 = taps.iter().map(|t| t.1).sum();
                    if total != 0.0 {
                        for t in &mut taps {
                            t.1 /= total;
                        }
                    }
                    if taps.is_empty() {
                        taps.push((clampi(center as i64), 1.0));
                    }
                    taps
                }
            }
        })
        .collect();
    let taps = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let mut index = Vec::with_capacity(n_out * taps);
    let mut weight = Vec::with_capacity(n_out * taps);
    for r in &rows {
        for k in 0..taps {
            // Pad short rows with a zero weight on an index the row already reads.
            let (i, w) = r.get(k).copied().unwrap_or((r[r.len() - 1].0, 0.0));
            index.push((i + offset) as u32);
            weight.push(w as f32);
        }
    }
    AxisTable {
        taps,
        index,
        weight,
    }
}

/// Resamples `x` along `dim` for outputs `o0..o0+len` of `table`, where `x` holds the inputs
/// from `lo` on. Taps are summed in a fixed order, `((x0·w0 + x1·w1) + x2·w2) + …`, whatever
/// the tile (see module docs).
///
/// Hot path (every resize, every video frame): one pass over the output, each value the sum
/// of its taps read straight from the input, rows split across threads for large images.
pub fn apply_axis(
    x: &Tensor,
    dim: usize,
    table: &AxisTable,
    o0: usize,
    len: usize,
    lo: usize,
) -> Result<Tensor> {
    apply_axis_then(x, dim, table, o0, len, lo, false)
}

/// [`apply_axis`], each result rounded to 8-bit levels in the same pass when `round8` (what
/// [`quantize_out`] does, without a second pass and buffer).
pub fn apply_axis_then(
    x: &Tensor,
    dim: usize,
    table: &AxisTable,
    o0: usize,
    len: usize,
    lo: usize,
    round8: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let outer: usize = dims[..dim].iter().product();
    let n_in = dims[dim];
    let inner: usize = dims[dim + 1..].iter().product();
    let mut out_dims = dims.clone();
    out_dims[dim] = len;
    if len == 0 || table.taps == 0 {
        return x.narrow(dim, 0, 0);
    }
    let src = x.flatten_all()?.to_vec1::<f32>()?;
    let taps = table.taps;
    // Every tap's input index must lie in the slice given.
    for o in o0..o0 + len {
        for k in 0..taps {
            let i = table.index[o * taps + k] as usize;
            if i < lo || i - lo >= n_in {
                candle_core::bail!(
                    "resampling tap {i} lies outside the input rows {lo}..{}",
                    lo + n_in
                );
            }
        }
    }
    let mut dst = vec![0f32; outer * len * inner];
    let fill = |rows: &mut [f32], first: usize| {
        // `rows` holds output rows first.. of the (outer, len) grid, `inner` values each.
        for (r, row) in rows.chunks_mut(inner).enumerate() {
            let (b, j) = ((first + r) / len, (first + r) % len);
            let o = o0 + j;
            let base = b * n_in * inner;
            for k in 0..taps {
                let i = table.index[o * taps + k] as usize - lo;
                let w = table.weight[o * taps + k];
                let s = &src[base + i * inner..base + (i + 1) * inner];
                if k == 0 {
                    for (d, v) in row.iter_mut().zip(s) {
                        *d = v * w;
                    }
                } else {
                    for (d, v) in row.iter_mut().zip(s) {
                        *d += v * w;
                    }
                }
            }
            if round8 {
                // As quantize_out: ×255, round, clamp, ×(1/255).
                for d in row.iter_mut() {
                    *d = (*d * 255.0).round().clamp(0.0, 255.0) * (1.0 / 255.0);
                }
            }
        }
    };
    let rows = outer * len;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if rows * inner * taps < (1 << 20) || threads == 1 || rows < 2 {
        fill(&mut dst, 0);
    } else {
        let per = rows.div_ceil(threads);
        std::thread::scope(|sc| {
            for (t, part) in dst.chunks_mut(per * inner).enumerate() {
                let fill = &fill;
                sc.spawn(move || fill(part, t * per));
            }
        });
    }
    Tensor::from_vec(dst, out_dims, x.device())
}

/// Quantizes to 8-bit levels as ComfyUI's PIL round trip does on the way in (truncation).
pub fn quantize_in(x: &Tensor) -> Result<Tensor> {
    x.affine(255.0, 0.0)?
        .clamp(0f32, 255f32)?
        .floor()?
        .affine(1.0 / 255.0, 0.0)
}

/// Rounds to 8-bit levels as PIL stores each resampling pass.
pub fn quantize_out(x: &Tensor) -> Result<Tensor> {
    x.affine(255.0, 0.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .affine(1.0 / 255.0, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_rounding_equals_rounding_after_the_pass() {
        let x = Tensor::rand(0f32, 1.0, (1, 9, 13, 3), &candle_core::Device::Cpu).unwrap();
        let t = table(Method::Lanczos, 13, 29, 0);
        let fused = apply_axis_then(&x, 2, &t, 0, 29, 0, true).unwrap();
        let apart = quantize_out(&apply_axis(&x, 2, &t, 0, 29, 0).unwrap()).unwrap();
        let d = (&fused - &apart).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn every_table_row_sums_to_one() {
        for m in METHODS {
            let m = Method::parse(m).unwrap();
            for (n_in, n_out) in [(10, 4), (4, 10), (7, 7), (1, 5), (33, 8)] {
                let t = table(m, n_in, n_out, 0);
                for o in 0..n_out {
                    let s: f32 = t.weight[o * t.taps..(o + 1) * t.taps].iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{m:?} {n_in}->{n_out} row {o}: {s}");
                    assert!(t.index[o * t.taps..(o + 1) * t.taps]
                        .iter()
                        .all(|&i| (i as usize) < n_in));
                }
            }
        }
    }

    #[test]
    fn identity_size_is_identity_for_interpolating_methods() {
        for m in [
            Method::NearestExact,
            Method::Bilinear,
            Method::Bicubic,
            Method::Area,
        ] {
            let t = table(m, 6, 6, 0);
            for o in 0..6 {
                let row = &t.weight[o * t.taps..(o + 1) * t.taps];
                let ix = &t.index[o * t.taps..(o + 1) * t.taps];
                let w_at_o: f32 = row
                    .iter()
                    .zip(ix)
                    .filter(|(_, &i)| i as usize == o)
                    .map(|(w, _)| *w)
                    .sum();
                assert!((w_at_o - 1.0).abs() < 1e-6, "{m:?} row {o}");
            }
        }
    }

    #[test]
    fn area_downscale_by_two_averages_pairs() {
        let t = table(Method::Area, 4, 2, 0);
        assert_eq!(t.taps, 2);
        assert_eq!(t.index, vec![0, 1, 2, 3]);
        assert_eq!(t.weight, vec![0.5; 4]);
    }
}
