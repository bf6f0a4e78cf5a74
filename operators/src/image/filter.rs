//! Separable convolution on `[batch, height, width, channels]` tensors, shared by blur and
//! sharpen.
//!
//! Hot path: a tile's whole cost is here. Each tap is one strided multiply and one add over
//! the tile; the sum runs over taps in a fixed order, so every output pixel gets the same
//! arithmetic wherever its tile was cut (the tiling invariant needs this, and a GEMM-based
//! convolution would not guarantee it).

use candle_core::{Result, Tensor};

/// ComfyUI's Gaussian (`comfy_extras.nodes_post_processing.gaussian_kernel`), as its 1-D
/// factor: positions are `linspace(-1, 1, 2r+1)`, so `sigma` is relative to the radius. The
/// 2-D kernel ComfyUI builds is the outer product of these taps.
pub fn gaussian_taps(radius: usize, sigma: f64) -> Vec<f32> {
    let size = 2 * radius + 1;
    let pos = |i: usize| {
        if size == 1 {
            0.0
        } else {
            -1.0 + 2.0 * i as f64 / (size - 1) as f64
        }
    };
    let g: Vec<f64> = (0..size)
        .map(|i| (-(pos(i) * pos(i)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    g.iter().map(|v| (v / sum) as f32).collect()
}

/// Valid (no padding) 1-D convolution of `x` along `dim` with `taps`.
pub fn conv_axis(x: &Tensor, taps: &[f32], dim: usize) -> Result<Tensor> {
    let len = x.dim(dim)? + 1 - taps.len();
    let mut acc = x.narrow(dim, 0, len)?.affine(taps[0] as f64, 0.0)?;
    for (k, &w) in taps.iter().enumerate().skip(1) {
        acc = (acc + x.narrow(dim, k, len)?.affine(w as f64, 0.0)?)?;
    }
    Ok(acc)
}

/// Valid 2-D separable convolution: rows (width) first, then columns (height).
pub fn separable(x: &Tensor, taps: &[f32]) -> Result<Tensor> {
    conv_axis(&conv_axis(x, taps, 2)?, taps, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn taps_are_normalized_and_symmetric() {
        let t = gaussian_taps(3, 1.0);
        assert_eq!(t.len(), 7);
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for i in 0..3 {
            assert_eq!(t[i], t[6 - i]);
        }
        assert!(t[3] > t[2] && t[2] > t[1]);
    }

    #[test]
    fn separable_blur_of_a_constant_is_the_constant() {
        let x = Tensor::full(0.25f32, (1, 9, 9, 3), &Device::Cpu).unwrap();
        let y = separable(&x, &gaussian_taps(2, 0.7)).unwrap();
        assert_eq!(y.dims(), &[1, 5, 5, 3]);
        for v in y.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - 0.25).abs() < 1e-6);
        }
    }
}
