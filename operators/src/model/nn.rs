//! Layers the models share, on candle tensors: GroupNorm, LayerNorm and linear (f32, CPU or
//! any device the tensors are on).

use candle_core::{Result, Tensor, D};

/// GroupNorm of `x` (`[n, c, h, w]`) over `groups` groups of channels and all positions
/// (biased variance, as PyTorch), then the per-channel affine `w`, `b`.
pub fn group_norm(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let g = x.reshape((n, groups, (c / groups) * h * wd))?;
    let d = g.broadcast_sub(&g.mean_keepdim(2)?)?;
    let var = d.sqr()?.mean_keepdim(2)?;
    d.broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((n, c, h, wd))?
        .broadcast_mul(&w.reshape((1, c, 1, 1))?)?
        .broadcast_add(&b.reshape((1, c, 1, 1))?)
}

/// LayerNorm over the last dimension, eps 1e-5.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = d.sqr()?.mean_keepdim(D::Minus1)?;
    d.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// `x · wᵀ (+ b)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
