//! The Stable Diffusion 1.x UNet, read directly in the original (LDM) single-file key layout
//! under `model.diffusion_model.` — no key mapping: the block structure is read from which
//! tensors exist (`in_layers` = residual block, `proj_in` = spatial transformer, `op` =
//! downsample, `conv` in an output block = upsample), so SD1-shaped checkpoints of any width
//! load as they are.
//!
//! Conventions of SD1 (LDM `openaimodel`): GroupNorm(32) with eps 1e-5 in residual blocks and
//! 1e-6 in front of transformers, LayerNorm eps 1e-5, 8 attention heads, GEGLU feed-forward,
//! sinusoidal timestep embedding with cosines first.

use super::nn::{layer_norm, linear, softmax_last_scaled};
use candle_core::{Tensor, D};
use nova_dataflow::NodeError;

fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    super::nn::group_norm(x, 32, w, b, eps)
}

/// The prefix of UNet tensors in a single-file checkpoint.
pub const PREFIX: &str = "model.diffusion_model.";

/// SD1's attention heads per transformer.
pub const HEADS: usize = 8;

/// The most bytes one block of attention scores (`batch x heads x queries x keys`, f32) may
/// take: queries are processed in slices small enough for it, so attention memory grows
/// linearly with the image's pixels instead of quadratically.
pub const ATTENTION_BLOCK_BYTES: u64 = 64 << 20;

/// Queries per slice for `batch` items attending over `keys` keys.
fn query_slice(batch: usize, keys: usize) -> usize {
    let per_query = (batch * HEADS * keys * 4).max(1) as u64;
    (ATTENTION_BLOCK_BYTES / per_query).max(1) as usize
}

/// Bytes attention holds at once for `batch` items of `tokens` tokens (self-attention, the
/// largest): the score block and its softmax temporaries.
pub fn attention_bytes(batch: usize, tokens: usize) -> u64 {
    let queries = tokens.min(query_slice(batch, tokens));
    3 * (batch * HEADS * queries * tokens * 4) as u64
}

type Get<'a> = &'a dyn Fn(&str) -> Result<Tensor, NodeError>;
type Has<'a> = &'a dyn Fn(&str) -> bool;

use super::conv::conv_named as conv;

/// Sinusoidal embedding of timesteps `t` (`[b]`) to `dim`: cosines, then sines.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

fn res_block(x: &Tensor, emb: &Tensor, get: Get, has: Has, p: &str) -> Result<Tensor, NodeError> {
    let g = |s: &str| get(&format!("{p}.{s}"));
    let h = group_norm(x, &g("in_layers.0.weight")?, &g("in_layers.0.bias")?, 1e-5)?.silu()?;
    let h = conv(&h, get, &format!("{p}.in_layers.2"), 1, 1)?;
    let e = linear(
        &emb.silu()?,
        &g("emb_layers.1.weight")?,
        Some(&g("emb_layers.1.bias")?),
    )?;
    let h = h.broadcast_add(&e.unsqueeze(2)?.unsqueeze(3)?)?;
    let h = group_norm(
        &h,
        &g("out_layers.0.weight")?,
        &g("out_layers.0.bias")?,
        1e-5,
    )?
    .silu()?;
    let h = conv(&h, get, &format!("{p}.out_layers.3"), 1, 1)?;
    let skip = if has(&format!("{p}.skip_connection.weight")) {
        conv(x, get, &format!("{p}.skip_connection"), 0, 1)?
    } else {
        x.clone()
    };
    Ok((skip + h)?)
}

fn attention(x: &Tensor, ctx: &Tensor, get: Get, p: &str) -> Result<Tensor, NodeError> {
    let slice = query_slice(x.dim(0)?, ctx.dim(1)?);
    attention_sliced(x, ctx, get, p, slice)
}

/// Attention with queries in slices of `slice`.
fn attention_sliced(
    x: &Tensor,
    ctx: &Tensor,
    get: Get,
    p: &str,
    slice: usize,
) -> Result<Tensor, NodeError> {
    let g = |s: &str| get(&format!("{p}.{s}"));
    let (b, n, c) = x.dims3()?;
    let m = ctx.dim(1)?;
    let hd = c / HEADS;
    let split = |t: Tensor, len: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, len, HEADS, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = split(linear(x, &g("to_q.weight")?, None)?, n)?;
    let k = split(linear(ctx, &g("to_k.weight")?, None)?, m)?;
    let v = split(linear(ctx, &g("to_v.weight")?, None)?, m)?;
    let kt = k.t()?;
    let scale = (hd as f64).powf(-0.5);
    // Queries in slices, so the score block stays under ATTENTION_BLOCK_BYTES.
    let slice = slice.max(1);
    let mut outs = Vec::with_capacity(n.div_ceil(slice));
    for start in (0..n).step_by(slice) {
        let qs = q.narrow(2, start, slice.min(n - start))?;
        let att = softmax_last_scaled(&qs.matmul(&kt)?, scale)?;
        outs.push(att.matmul(&v)?);
    }
    let o = Tensor::cat(&outs, 2)?.transpose(1, 2)?.reshape((b, n, c))?;
    Ok(linear(
        &o,
        &g("to_out.0.weight")?,
        Some(&g("to_out.0.bias")?),
    )?)
}

fn spatial_transformer(x: &Tensor, ctx: &Tensor, get: Get, p: &str) -> Result<Tensor, NodeError> {
    let g = |s: &str| get(&format!("{p}.{s}"));
    let (b, c, h, w) = x.dims4()?;
    let y = group_norm(x, &g("norm.weight")?, &g("norm.bias")?, 1e-6)?;
    let y = conv(&y, get, &format!("{p}.proj_in"), 0, 1)?;
    let mut t = y.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
    let tb = format!("{p}.transformer_blocks.0");
    let gt = |s: &str| get(&format!("{tb}.{s}"));
    let n1 = layer_norm(&t, &gt("norm1.weight")?, &gt("norm1.bias")?)?;
    t = (attention(&n1, &n1, get, &format!("{tb}.attn1"))? + &t)?;
    let n2 = layer_norm(&t, &gt("norm2.weight")?, &gt("norm2.bias")?)?;
    t = (attention(&n2, ctx, get, &format!("{tb}.attn2"))? + &t)?;
    let n3 = layer_norm(&t, &gt("norm3.weight")?, &gt("norm3.bias")?)?;
    let proj = linear(
        &n3,
        &gt("ff.net.0.proj.weight")?,
        Some(&gt("ff.net.0.proj.bias")?),
    )?;
    let inner = proj.dim(D::Minus1)? / 2;
    let ff =
        (proj.narrow(D::Minus1, 0, inner)? * proj.narrow(D::Minus1, inner, inner)?.gelu_erf()?)?;
    let ff = linear(&ff, &gt("ff.net.2.weight")?, Some(&gt("ff.net.2.bias")?))?;
    t = (ff + t)?;
    let y = t.transpose(1, 2)?.reshape((b, c, h, w))?;
    let y = conv(&y, get, &format!("{p}.proj_out"), 0, 1)?;
    Ok((y + x)?)
}

/// Runs one block (`input_blocks.N`, `middle_block`, `output_blocks.N`): its layers in order.
fn block(
    h: Tensor,
    emb: &Tensor,
    ctx: &Tensor,
    get: Get,
    has: Has,
    p: &str,
) -> Result<Tensor, NodeError> {
    let mut h = h;
    let mut m = 0;
    loop {
        let l = format!("{p}.{m}");
        if has(&format!("{l}.in_layers.0.weight")) {
            h = res_block(&h, emb, get, has, &l)?;
        } else if has(&format!("{l}.proj_in.weight")) {
            h = spatial_transformer(&h, ctx, get, &l)?;
        } else if has(&format!("{l}.op.weight")) {
            h = conv(&h, get, &format!("{l}.op"), 1, 2)?;
        } else if has(&format!("{l}.conv.weight")) {
            let (_, _, hh, ww) = h.dims4()?;
            h = conv(
                &h.upsample_nearest2d(hh * 2, ww * 2)?,
                get,
                &format!("{l}.conv"),
                1,
                1,
            )?;
        } else if m == 0 && has(&format!("{l}.weight")) {
            h = conv(&h, get, &l, 1, 1)?; // input_blocks.0.0: the input conv
        } else {
            break;
        }
        m += 1;
    }
    if m == 0 {
        return Err(NodeError::Other(format!(
            "UNet block '{p}' has no known layers"
        )));
    }
    Ok(h)
}

/// Predicts the noise in `x` (`[b, 4, h, w]`) at timesteps `t` (`[b]`) given text `context`
/// (`[b, 77, d]`). `get`/`has` read tensors by name relative to [`PREFIX`].
pub fn predict_noise(
    x: &Tensor,
    t: &Tensor,
    context: &Tensor,
    get: Get,
    has: Has,
) -> Result<Tensor, NodeError> {
    let g = |s: &str| get(&format!("{PREFIX}{s}"));
    let gp = |s: &str| get(&format!("{PREFIX}{s}"));
    let hp = |s: &str| has(&format!("{PREFIX}{s}"));
    let model_ch = g("input_blocks.0.0.weight")?.dim(0)?;
    let emb = timestep_embedding(t, model_ch)?;
    let emb = linear(
        &emb,
        &g("time_embed.0.weight")?,
        Some(&g("time_embed.0.bias")?),
    )?
    .silu()?;
    let emb = linear(
        &emb,
        &g("time_embed.2.weight")?,
        Some(&g("time_embed.2.bias")?),
    )?;
    let mut hs = Vec::new();
    let mut h = x.clone();
    let mut n = 0;
    while hp(&format!("input_blocks.{n}.0.weight"))
        || hp(&format!("input_blocks.{n}.0.in_layers.0.weight"))
        || hp(&format!("input_blocks.{n}.0.op.weight"))
    {
        h = block(h, &emb, context, &gp, &hp, &format!("input_blocks.{n}"))?;
        hs.push(h.clone());
        n += 1;
    }
    h = block(h, &emb, context, &gp, &hp, "middle_block")?;
    let mut n = 0;
    while hp(&format!("output_blocks.{n}.0.in_layers.0.weight")) {
        let skip = hs
            .pop()
            .ok_or_else(|| NodeError::Other("UNet has more output than input blocks".into()))?;
        h = block(
            Tensor::cat(&[&h, &skip], 1)?,
            &emb,
            context,
            &gp,
            &hp,
            &format!("output_blocks.{n}"),
        )?;
        n += 1;
    }
    let h = group_norm(&h, &g("out.0.weight")?, &g("out.0.bias")?, 1e-5)?.silu()?;
    conv(&h, &gp, "out.2", 1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::safetensors::SafetensorsFile;
    use nova_dataflow::WeightSource;
    use std::path::PathBuf;

    fn shared(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models")
            .join(rel)
    }

    #[test]
    fn one_tiny_unet_step_matches_the_reference() {
        let ckpt = SafetensorsFile::open(&shared("tiny-sd1/tiny_sd1.safetensors")).unwrap();
        let r = SafetensorsFile::open(&shared("tiny-sd1/reference.safetensors")).unwrap();
        let eps = predict_noise(
            &r.read("unet_latent_in").unwrap(),
            &r.read("unet_timestep").unwrap(),
            &r.read("text_last_hidden_state").unwrap(),
            &|n| ckpt.read(n),
            &|n| ckpt.shape(n).is_some(),
        )
        .unwrap();
        let want = r.read("unet_eps_out").unwrap();
        let e = crate::model::max_abs_diff(&eps, &want);
        eprintln!("UNet step at t=500: max |err| {e:.2e}");
        assert!(e < 1e-3, "{e}");
    }

    #[test]
    fn sliced_attention_equals_whole_attention() {
        let ckpt = SafetensorsFile::open(&shared("tiny-sd1/tiny_sd1.safetensors")).unwrap();
        let p = format!("{PREFIX}input_blocks.1.1.transformer_blocks.0.attn1");
        let c = WeightSource::shape(&ckpt, &format!("{p}.to_q.weight")).unwrap()[1];
        let x = Tensor::randn(0f32, 1.0, (2, 50, c), &candle_core::Device::Cpu).unwrap();
        let get = |n: &str| ckpt.read(n);
        let whole = attention_sliced(&x, &x, &get, &p, 50).unwrap();
        let sliced = attention_sliced(&x, &x, &get, &p, 7).unwrap();
        assert!(crate::model::max_abs_diff(&whole, &sliced) < 1e-6);
        // The slice bounds the score block: 4096 tokens (SD1 at 512x512) in a batch of two.
        assert!(attention_bytes(2, 4096) <= 3 * ATTENTION_BLOCK_BYTES);
        assert_eq!(attention_bytes(1, 64), 3 * (HEADS * 64 * 64 * 4) as u64);
    }
}
