//! Layers the models share, on candle tensors: GroupNorm, LayerNorm, linear and softmax (f32,
//! CPU or any device the tensors are on), and the CPU helpers the fused kernels use (direct
//! access to a tensor's values, work split across threads).

use candle_core::{DType, Device, Result, Storage, Tensor, D};

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

/// Softmax over the last dimension of `x * scale` (`scale` > 0). On the CPU in f32 one fused
/// pass per row (max, exponentials, sum, normalize), rows split across threads; candle's ops
/// elsewhere.
pub fn softmax_last_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        let x = (x * scale)?;
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    let dims = x.dims().to_vec();
    let n = dims.last().copied().unwrap_or(1).max(1);
    let mut out = vec![0f32; x.elem_count()];
    let scale = scale as f32;
    with_values(x, |xs| {
        let rows: Vec<(&mut [f32], &[f32])> = out.chunks_mut(n).zip(xs.chunks(n)).collect();
        // Small blocks in this thread: spawning costs more than they do.
        let row = |(o, i): (&mut [f32], &[f32])| {
            // Scaled first, then shifted by the scaled maximum: PyTorch's order of rounding.
            for (o, &v) in o.iter_mut().zip(i) {
                *o = v * scale;
            }
            let m = o.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for o in o.iter_mut() {
                let e = (*o - m).exp();
                *o = e;
                sum += e;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        };
        if xs.len() < 1 << 16 {
            rows.into_iter().for_each(row);
        } else {
            par_each(rows, row);
        }
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// Runs `f` on the values of an f32 CPU tensor, without copying them when it is contiguous.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("direct access to values is for CPU tensors only")
    };
    let all = cpu.as_slice::<f32>()?;
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("tensor is not contiguous")
    };
    Ok(f(&all[a..b]))
}

/// Worker threads for the CPU kernels.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `f` on each item of `items`, the items split into one run per thread.
pub(crate) fn par_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let per = items.len().div_ceil(threads()).max(1);
    let mut items = items.into_iter();
    std::thread::scope(|s| loop {
        let run: Vec<T> = items.by_ref().take(per).collect();
        if run.is_empty() {
            break;
        }
        let f = &f;
        s.spawn(move || run.into_iter().for_each(f));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_softmax_equals_candles() {
        let x = Tensor::randn(0f32, 3.0, (3, 5, 37), &Device::Cpu).unwrap();
        let fused = softmax_last_scaled(&x, 0.7).unwrap();
        let y = (&x * 0.7).unwrap();
        let e = y
            .broadcast_sub(&y.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let want = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        assert!(crate::model::max_abs_diff(&fused, &want) < 1e-6);
    }
}
