//! The Stable Diffusion 1.x autoencoder (KL-f8), read in the original (LDM) single-file key
//! layout under `first_stage_model.`: encoder (`encoder.down.N.block.M`, `downsample`,
//! `mid.block_1/attn_1/block_2`, `quant_conv`) and decoder (`post_quant_conv`, `mid`,
//! `decoder.up.N` run from the deepest level up, `upsample`). GroupNorm(32) eps 1e-6, SiLU.
//!
//! Conventions: images in `[-1, 1]` here (nodes map from and to ComfyUI's `[0, 1]`);
//! latents are the VAE's own (`encode` returns the mean and log-variance "moments";
//! diffusion latents are `mean × 0.18215`, which the nodes apply).

use super::taesd::Part;
use candle_core::Tensor;
use nova_dataflow::NodeError;

/// The prefix of VAE tensors in a single-file checkpoint.
pub const PREFIX: &str = "first_stage_model.";
/// SD1's latent scale between VAE latents and diffusion latents.
pub const SCALE: f64 = 0.18215;

type Get<'a> = &'a dyn Fn(&str) -> Result<Tensor, NodeError>;
type Has<'a> = &'a dyn Fn(&str) -> bool;

fn group_norm(x: &Tensor, get: Get, p: &str) -> Result<Tensor, NodeError> {
    let (w, b) = (get(&format!("{p}.weight"))?, get(&format!("{p}.bias"))?);
    Ok(super::nn::group_norm(x, 32, &w, &b, 1e-6)?)
}

use super::conv::conv_named as conv;

fn resnet(x: &Tensor, get: Get, has: Has, p: &str) -> Result<Tensor, NodeError> {
    let h = group_norm(x, get, &format!("{p}.norm1"))?.silu()?;
    let h = conv(&h, get, &format!("{p}.conv1"), 1, 1)?;
    let h = group_norm(&h, get, &format!("{p}.norm2"))?.silu()?;
    let h = conv(&h, get, &format!("{p}.conv2"), 1, 1)?;
    let skip = if has(&format!("{p}.nin_shortcut.weight")) {
        conv(x, get, &format!("{p}.nin_shortcut"), 0, 1)?
    } else {
        x.clone()
    };
    Ok((skip + h)?)
}

fn attn(x: &Tensor, get: Get, p: &str) -> Result<Tensor, NodeError> {
    let (b, c, h, w) = x.dims4()?;
    let n = group_norm(x, get, &format!("{p}.norm"))?;
    let flat = |t: Tensor| -> candle_core::Result<Tensor> {
        t.flatten_from(2)?.transpose(1, 2)?.contiguous()
    };
    let q = flat(conv(&n, get, &format!("{p}.q"), 0, 1)?)?;
    let k = flat(conv(&n, get, &format!("{p}.k"), 0, 1)?)?;
    let v = flat(conv(&n, get, &format!("{p}.v"), 0, 1)?)?;
    let att = super::nn::softmax_last_scaled(&q.matmul(&k.t()?)?, (c as f64).powf(-0.5))?;
    let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, c, h, w))?;
    Ok((x + conv(&o, get, &format!("{p}.proj_out"), 0, 1)?)?)
}

fn mid(h: &Tensor, get: Get, has: Has, p: &str) -> Result<Tensor, NodeError> {
    let h = resnet(h, get, has, &format!("{p}.mid.block_1"))?;
    let h = attn(&h, get, &format!("{p}.mid.attn_1"))?;
    resnet(&h, get, has, &format!("{p}.mid.block_2"))
}

fn levels(has: Has, p: &str) -> usize {
    let mut n = 0;
    while has(&format!("{PREFIX}{p}.{n}.block.0.conv1.weight")) {
        n += 1;
    }
    n
}

fn blocks(has: Has, p: &str) -> usize {
    let mut n = 0;
    while has(&format!("{p}.block.{n}.conv1.weight")) {
        n += 1;
    }
    n
}

/// Encodes images (`[b, 3, h, w]` in `[-1, 1]`) to moments (`[b, 2·c, h/8, w/8]`: mean, then
/// log-variance).
pub fn encode(x: &Tensor, get: Get, has: Has) -> Result<Tensor, NodeError> {
    let g = |s: &str| get(&format!("{PREFIX}{s}"));
    let hp = |s: &str| has(&format!("{PREFIX}{s}"));
    let mut h = conv(x, &g, "encoder.conv_in", 1, 1)?;
    let n = levels(has, "encoder.down");
    for i in 0..n {
        let p = format!("encoder.down.{i}");
        for j in 0..blocks(&hp, &p) {
            h = resnet(&h, &g, &hp, &format!("{p}.block.{j}"))?;
        }
        if hp(&format!("{p}.downsample.conv.weight")) {
            // Asymmetric padding (right and bottom), then a stride-2 conv.
            let padded = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            h = conv(&padded, &g, &format!("{p}.downsample.conv"), 0, 2)?;
        }
    }
    h = mid(&h, &g, &hp, "encoder")?;
    h = group_norm(&h, &g, "encoder.norm_out")?.silu()?;
    h = conv(&h, &g, "encoder.conv_out", 1, 1)?;
    conv(&h, &g, "quant_conv", 0, 1)
}

/// Decodes VAE latents (`[b, c, h, w]`, not scaled) to images in `[-1, 1]`.
/// One half of the VAE as NOVA's VAE nodes use it: images in `[0, 1]` (`[b, 3, h, w]`),
/// diffusion latents (VAE latents times [`SCALE`]); the encoder returns the mean.
pub fn forward(part: Part, x: &Tensor, get: Get, has: Has) -> Result<Tensor, NodeError> {
    match part {
        Part::Decoder => {
            let img = decode(&(x / SCALE)?, get, has)?;
            Ok(((img + 1.0)? / 2.0)?)
        }
        Part::Encoder => {
            let moments = encode(&((x * 2.0)? - 1.0)?, get, has)?;
            let c = moments.dim(1)? / 2;
            Ok((moments.narrow(1, 0, c)? * SCALE)?)
        }
    }
}

/// Activation bytes per latent pixel while decoding (f32): the widest level's channels times
/// its pixels per latent pixel, times the feature maps alive at once (a block's input,
/// output and residual, norm and activation temporaries: 8, with room to spare; the
/// convolutions' Winograd buffers are per band and small). SD1: 128 channels at 8x8 per latent
/// pixel, 256 KiB.
pub fn decode_bytes_per_latent_px(src: &dyn nova_dataflow::WeightSource) -> u64 {
    let channels = |i: usize| {
        src.shape(&format!("{PREFIX}decoder.up.{i}.block.0.conv2.weight"))
            .map(|s| s[0] as u64)
    };
    let levels = (0..).take_while(|&i| channels(i).is_some()).count();
    let widest = (0..levels)
        .filter_map(|i| Some(channels(i)? << (2 * (levels - 1 - i))))
        .max()
        .unwrap_or(128 * 64);
    widest * 4 * 8
}

/// Latent channels of the checkpoint's VAE (SD1: 4).
pub fn latent_channels(src: &dyn nova_dataflow::WeightSource) -> usize {
    src.shape(&format!("{PREFIX}decoder.conv_in.weight"))
        .and_then(|s| s.get(1).copied())
        .unwrap_or(4)
}

pub fn decode(z: &Tensor, get: Get, has: Has) -> Result<Tensor, NodeError> {
    let g = |s: &str| get(&format!("{PREFIX}{s}"));
    let hp = |s: &str| has(&format!("{PREFIX}{s}"));
    let z = conv(z, &g, "post_quant_conv", 0, 1)?;
    let mut h = conv(&z, &g, "decoder.conv_in", 1, 1)?;
    h = mid(&h, &g, &hp, "decoder")?;
    for i in (0..levels(has, "decoder.up")).rev() {
        let p = format!("decoder.up.{i}");
        for j in 0..blocks(&hp, &p) {
            h = resnet(&h, &g, &hp, &format!("{p}.block.{j}"))?;
        }
        if hp(&format!("{p}.upsample.conv.weight")) {
            let (_, _, hh, ww) = h.dims4()?;
            h = conv(
                &h.upsample_nearest2d(hh * 2, ww * 2)?,
                &g,
                &format!("{p}.upsample.conv"),
                1,
                1,
            )?;
        }
    }
    h = group_norm(&h, &g, "decoder.norm_out")?.silu()?;
    conv(&h, &g, "decoder.conv_out", 1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::safetensors::SafetensorsFile;
    use nova_dataflow::WeightSource;
    use std::path::PathBuf;

    #[test]
    fn the_tiny_vae_decodes_and_encodes_like_the_reference() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/tiny-sd1");
        let ckpt = SafetensorsFile::open(&dir.join("tiny_sd1.safetensors")).unwrap();
        let r = SafetensorsFile::open(&dir.join("reference.safetensors")).unwrap();
        let get = |n: &str| ckpt.read(n);
        let has = |n: &str| ckpt.shape(n).is_some();
        let diff = crate::model::max_abs_diff;
        // The reference decodes diffusion latents: VAE latents are those divided by SCALE.
        let z = (r.read("vae_decode_latent_in").unwrap() / SCALE).unwrap();
        let img = decode(&z, &get, &has).unwrap();
        let e_dec = diff(&img, &r.read("vae_decode_image_out").unwrap());
        let moments = encode(&r.read("vae_encode_image_in").unwrap(), &get, &has).unwrap();
        let e_enc = diff(&moments, &r.read("vae_encode_moments_out").unwrap());
        eprintln!("KL VAE: decode max |err| {e_dec:.2e}, encode (moments) {e_enc:.2e}");
        assert!(
            e_dec < 1e-3 && e_enc < 1e-3,
            "decode {e_dec}, encode {e_enc}"
        );
    }
}
