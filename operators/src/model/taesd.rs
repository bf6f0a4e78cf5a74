//! The TAESD family of tiny autoencoders for diffusion latents (SD1 `taesd`, `taesdxl`,
//! `taesd3`, `taef1`, and FLUX.2's `taef2` with its global-context branch), loaded from
//! ComfyUI's `vae_approx/<name>_encoder.safetensors` and `_decoder.safetensors` key layout
//! (PyTorch `nn.Sequential` numbering: `0.weight`, `1.conv.0.weight`, `11.pool.1.bias`, ...).
//!
//! One implementation serves every plain variant: the latent channel count and the presence
//! of the global-context ("pool") branch are read from the tensors, so a user's official
//! `taesd_encoder/decoder.safetensors` loads unchanged.
//!
//! Conventions (see `shared/models/taesd/ARCHITECTURE.md`): images are `[0, 1]` (not the
//! `[-1, 1]` of the full SD VAE), latents are diffusion-space latents (scale factor 1: never
//! apply SD's 0.18215 around TAESD), the decoder soft-clamps its input to `3·tanh(x/3)`, and
//! the network itself does not clamp its output (nodes clamp images to `[0, 1]`).

use super::conv::{conv3x3_with, Epilogue};
use candle_core::Tensor;
use nova_dataflow::{NodeError, WeightSource};

/// Which half of the autoencoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Encoder,
    Decoder,
}

/// One layer of the sequence, with the names of its tensors.
#[derive(Clone, Debug, PartialEq)]
enum Layer {
    /// 3x3 conv with padding 1.
    Conv {
        weight: String,
        bias: Option<String>,
        stride: usize,
    },
    /// Residual block of three 3x3 convs; `pool` is the global-context branch
    /// (1x1 conv, GroupNorm(4), ReLU, 1x1 conv) when present.
    Block {
        prefix: String,
        pool: bool,
    },
    Relu,
    Upsample,
    /// `3·tanh(x/3)`.
    SoftClamp,
}

/// A TAESD encoder or decoder: its layer list, read and checked from a weight file.
#[derive(Clone, Debug, PartialEq)]
pub struct TaesdNet {
    pub part: Part,
    /// Latent channels (4 for SD1/SDXL, 16 for SD3/FLUX.1, 32 for FLUX.2).
    pub latent_channels: usize,
    /// Whether the deepest blocks carry the global-context branch (FLUX.2), which makes the
    /// network not tile-local.
    pub global_context: bool,
    layers: Vec<Layer>,
}

/// Channels of every block.
const F: usize = 64;

fn file_err(src: &dyn WeightSource, reason: String) -> NodeError {
    NodeError::File {
        path: src.path().display().to_string(),
        reason,
    }
}

impl TaesdNet {
    /// Reads the layer list of `part` from `src`, checking every tensor's shape.
    pub fn from_source(src: &dyn WeightSource, part: Part) -> Result<TaesdNet, NodeError> {
        let shape = |n: &str| src.shape(n);
        let expect = |name: String, want: &[usize]| -> Result<String, NodeError> {
            match shape(&name) {
                Some(s) if s == want => Ok(name),
                Some(s) => Err(file_err(
                    src,
                    format!("tensor '{name}' has shape {s:?}, expected {want:?}"),
                )),
                None => Err(file_err(
                    src,
                    format!(
                        "tensor '{name}' is missing: not a TAESD {part:?} in vae_approx layout"
                    ),
                )),
            }
        };
        let c = match part {
            Part::Encoder => shape("14.weight").map(|s| s.first().copied().unwrap_or(0)),
            Part::Decoder => shape("1.weight").and_then(|s| s.get(1).copied()),
        }
        .filter(|c| *c > 0)
        .ok_or_else(|| {
            let key = if part == Part::Encoder {
                "14.weight"
            } else {
                "1.weight"
            };
            file_err(
                src,
                format!("tensor '{key}' is missing: not a TAESD {part:?} in vae_approx layout"),
            )
        })?;
        let conv = |i: usize, cin: usize, cout: usize, bias: bool, stride: usize| {
            Ok::<Layer, NodeError>(Layer::Conv {
                weight: expect(format!("{i}.weight"), &[cout, cin, 3, 3])?,
                bias: if bias {
                    Some(expect(format!("{i}.bias"), &[cout])?)
                } else {
                    None
                },
                stride,
            })
        };
        let block = |i: usize| -> Result<Layer, NodeError> {
            for k in [0, 2, 4] {
                expect(format!("{i}.conv.{k}.weight"), &[F, F, 3, 3])?;
                expect(format!("{i}.conv.{k}.bias"), &[F])?;
            }
            let pool = shape(&format!("{i}.pool.0.weight")).is_some();
            if pool {
                expect(format!("{i}.pool.0.weight"), &[4 * F, F, 1, 1])?;
                expect(format!("{i}.pool.1.weight"), &[4 * F])?;
                expect(format!("{i}.pool.1.bias"), &[4 * F])?;
                expect(format!("{i}.pool.3.weight"), &[F, 4 * F, 1, 1])?;
            }
            Ok(Layer::Block {
                prefix: i.to_string(),
                pool,
            })
        };
        let mut layers = Vec::new();
        match part {
            Part::Encoder => {
                layers.push(conv(0, 3, F, true, 1)?);
                layers.push(block(1)?);
                for stage in [2, 6, 10] {
                    layers.push(conv(stage, F, F, false, 2)?);
                    for b in stage + 1..stage + 4 {
                        layers.push(block(b)?);
                    }
                }
                layers.push(conv(14, F, c, true, 1)?);
            }
            Part::Decoder => {
                layers.push(Layer::SoftClamp);
                layers.push(conv(1, c, F, true, 1)?);
                layers.push(Layer::Relu);
                for b in 3..6 {
                    layers.push(block(b)?);
                }
                for stage in [6, 11] {
                    layers.push(Layer::Upsample);
                    layers.push(conv(stage + 1, F, F, false, 1)?);
                    for b in stage + 2..stage + 5 {
                        layers.push(block(b)?);
                    }
                }
                layers.push(Layer::Upsample);
                layers.push(conv(17, F, F, false, 1)?);
                layers.push(block(18)?);
                layers.push(conv(19, F, 3, true, 1)?);
            }
        }
        let global_context = layers
            .iter()
            .any(|l| matches!(l, Layer::Block { pool: true, .. }));
        Ok(TaesdNet {
            part,
            latent_channels: c,
            global_context,
            layers,
        })
    }

    /// Every tensor name the network reads.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in &self.layers {
            match l {
                Layer::Conv { weight, bias, .. } => {
                    v.push(weight.clone());
                    v.extend(bias.clone());
                }
                Layer::Block { prefix, pool } => {
                    for k in [0, 2, 4] {
                        v.push(format!("{prefix}.conv.{k}.weight"));
                        v.push(format!("{prefix}.conv.{k}.bias"));
                    }
                    if *pool {
                        for s in [
                            "pool.0.weight",
                            "pool.1.weight",
                            "pool.1.bias",
                            "pool.3.weight",
                        ] {
                            v.push(format!("{prefix}.{s}"));
                        }
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// Spatial scale from input to output: 1/8 for the encoder, 8 for the decoder.
    pub fn scale(&self) -> (usize, usize) {
        match self.part {
            Part::Encoder => (1, 8),
            Part::Decoder => (8, 1),
        }
    }

    /// Activation bytes per input pixel while running (f32): the widest layer's input,
    /// output and 3x3 patch matrix at 64 channels, at the largest resolution reached.
    pub fn activation_per_pixel(&self) -> u64 {
        let per = (F * (2 + 9 + 2) * 4) as u64;
        match self.part {
            Part::Encoder => per,
            Part::Decoder => per * 64,
        }
    }

    /// Multiply-adds per input pixel (convolutions only), for time estimates; `shape` gives a
    /// tensor's shape by name.
    pub fn macs_per_input_pixel(&self, shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> u64 {
        // Output pixels per input pixel at the current layer, times 64 to stay integral
        // through the encoder's stride-2 convolutions (at most three).
        let mut px: u64 = 64;
        let mut macs: u64 = 0;
        for l in &self.layers {
            match l {
                Layer::Conv { weight, stride, .. } => {
                    if *stride == 2 {
                        px /= 4;
                    }
                    let w: u64 = shape(weight)
                        .map(|s| s.iter().map(|&d| d as u64).product())
                        .unwrap_or((F * F * 9) as u64);
                    macs += w * px;
                }
                Layer::Block { .. } => macs += 3 * (F * F * 9) as u64 * px,
                Layer::Upsample => px *= 4,
                Layer::Relu | Layer::SoftClamp => {}
            }
        }
        macs / 64
    }

    /// Runs the network on `x` (`[n, c, h, w]`), reading tensors through `get`.
    pub fn forward(
        &self,
        x: &Tensor,
        get: &dyn Fn(&str) -> Result<Tensor, NodeError>,
    ) -> Result<Tensor, NodeError> {
        let mut h = x.clone();
        for l in &self.layers {
            h = match l {
                Layer::Conv {
                    weight,
                    bias,
                    stride,
                } => conv3(
                    &h,
                    &get(weight)?,
                    bias.as_ref().map(|b| get(b)).transpose()?.as_ref(),
                    *stride,
                )?,
                Layer::Block { prefix, pool } => {
                    let g = |s: &str| get(&format!("{prefix}.{s}"));
                    let mut x = h;
                    if *pool {
                        let p = x.conv2d(&g("pool.0.weight")?, 0, 1, 1, 1)?;
                        let p = super::nn::group_norm(
                            &p,
                            4,
                            &g("pool.1.weight")?,
                            &g("pool.1.bias")?,
                            1e-5,
                        )?;
                        let p = p.relu()?.conv2d(&g("pool.3.weight")?, 0, 1, 1, 1)?;
                        x = (x + p)?;
                    }
                    // conv, ReLU, conv, ReLU, conv, then ReLU(y + x): each ReLU and the
                    // residual fused into the convolution before it.
                    let mut y = x.clone();
                    for k in [0, 2, 4] {
                        let b = g(&format!("conv.{k}.bias"))?;
                        let ep = Epilogue {
                            bias: Some(&b),
                            residual: (k == 4).then_some(&x),
                            relu: true,
                        };
                        y = conv3x3_with(&y, &g(&format!("conv.{k}.weight"))?, 1, ep)?;
                    }
                    y
                }
                Layer::Relu => h.relu()?,
                Layer::Upsample => {
                    let (_, _, hh, ww) = h.dims4()?;
                    h.upsample_nearest2d(hh * 2, ww * 2)?
                }
                Layer::SoftClamp => ((h / 3.0)?.tanh()? * 3.0)?,
            };
        }
        Ok(h)
    }
}

/// 3x3 convolution, padding 1, optional bias.
fn conv3(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize) -> Result<Tensor, NodeError> {
    match stride {
        1 => return super::conv::conv3x3(x, w, b, 1),
        2 => return super::conv::conv3x3_stride2(x, w, b),
        _ => {}
    }
    let y = x.conv2d(w, 1, stride, 1, 1)?;
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::safetensors::SafetensorsFile;
    use std::path::PathBuf;

    fn shared(rel: &str) -> PathBuf {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models/taesd")
            .join(rel);
        assert!(p.exists(), "missing {}", p.display());
        p
    }

    use crate::model::max_abs_diff as max_diff;

    /// Encodes and decodes a reference's input; returns (latent error, decoded error).
    fn check(
        encoder: &str,
        decoder: &str,
        reference: &str,
        channels: usize,
        pool: bool,
    ) -> (f32, f32) {
        let r = SafetensorsFile::open(&shared(reference)).unwrap();
        let (input, latent, decoded) = (
            r.read("input").unwrap(),
            r.read("latent").unwrap(),
            r.read("decoded").unwrap(),
        );
        let mut errs = (0.0, 0.0);
        for (file, part) in [(encoder, Part::Encoder), (decoder, Part::Decoder)] {
            let f = SafetensorsFile::open(&shared(file)).unwrap();
            let net = TaesdNet::from_source(&f, part).unwrap();
            assert_eq!((net.latent_channels, net.global_context), (channels, pool));
            let get = |n: &str| f.read(n);
            match part {
                Part::Encoder => errs.0 = max_diff(&net.forward(&input, &get).unwrap(), &latent),
                Part::Decoder => errs.1 = max_diff(&net.forward(&latent, &get).unwrap(), &decoded),
            }
        }
        errs
    }

    #[test]
    fn taef2_and_the_sd1_layout_match_their_references() {
        for (enc, dec, reference, c, pool) in [
            (
                "taef2_encoder.safetensors",
                "taef2_decoder.safetensors",
                "reference/taef2_64x64.safetensors",
                32,
                true,
            ),
            (
                "taef2_encoder.safetensors",
                "taef2_decoder.safetensors",
                "reference/taef2_48x80.safetensors",
                32,
                true,
            ),
            (
                "synthetic-sd1-layout/taesd_encoder.safetensors",
                "synthetic-sd1-layout/taesd_decoder.safetensors",
                "synthetic-sd1-layout/reference_64x64.safetensors",
                4,
                false,
            ),
        ] {
            let (e, d) = check(enc, dec, reference, c, pool);
            eprintln!("{reference}: encode max |err| {e:.2e}, decode max |err| {d:.2e}");
            assert!(e < 1e-3 && d < 1e-3, "{reference}: encode {e}, decode {d}");
        }
    }

    #[test]
    fn a_file_of_the_wrong_part_or_shape_names_the_tensor() {
        let f = SafetensorsFile::open(&shared("taef2_decoder.safetensors")).unwrap();
        let e = TaesdNet::from_source(&f, Part::Encoder)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'14.weight' is missing"), "{e}");
    }
}
