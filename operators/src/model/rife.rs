//! `RIFE VFI` (the ComfyUI-Frame-Interpolation extension's name and inputs): video frame
//! interpolation with RIFE "HD v3" (IFNet of ECCV2022-RIFE's `train_log`), loaded from
//! `models/frame_interpolation/*.safetensors`. Only the midpoint (t = 0.5) is supported, so
//! `multiplier` is 2: each pair of consecutive frames gets one frame between them.
//!
//! The network: three IFBlocks at scales 4, 2 and 1. Each block sees the two frames as warped
//! so far, the running blend mask and the running flow (4 channels: pixels from the middle
//! frame back to frame 0, then to frame 1), resized by 1/scale with the flow divided by the
//! scale; two stride-2 conv3x3 + PReLU, four residual pairs of conv3x3 + PReLU, and two
//! transposed-conv heads give a flow update and a mask update at the resized size, resized
//! back (flow times the scale). Each block also runs on the mirrored input (frames swapped,
//! mask negated, flow halves swapped); the two answers are averaged into the running flow and
//! mask (here both run as one batch of two). After each block both frames are re-warped
//! (bilinear, border padding). The middle frame is `w0·σ(mask) + w1·(1 − σ(mask))`, a convex
//! combination of input pixels, so it stays in the inputs' range (it is not clamped).
//!
//! Frames are padded with zeros on the right and bottom to multiples of 32 (as RIFE's
//! inference scripts do) and the outputs cropped back. The extension's other inputs
//! (`clear_cache_after_n_frames`, `fast_mode`, `ensemble`, `scale_factor`) are not declared;
//! workflows that carry them run, with them ignored (scale list 4, 2, 1).
//!
//! Weights go on the device through the residency registry, resident for the node's run or
//! streamed one IFBlock at a time when the plan says they do not fit.

use super::conv::conv3x3;
use super::grid_sample::{interpolate_bilinear, warp};
use super::nn::{par_each, with_values};
use super::safetensors::SafetensorsFile;
use crate::spec::{int, link, out};
use candle_core::Tensor;
use nova_dataflow::{
    Args, DataType, DeviceWeights, ExecContext, FileFolder, ImageInfo, InputKind, InputSpec,
    Inputs, JobEnv, MemoryEstimate, MemoryQuery, Node, NodeError, NodeOutput, NodeSchema, Value,
    ValueInfo, WeightContext, WeightSource,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The folder under the models folder where frame interpolation models live (the
/// extension's name).
pub const FOLDER: &str = "frame_interpolation";

/// The IFBlocks' scales, coarse to fine (RIFE's `scale_list` at scale factor 1).
const SCALES: [usize; 3] = [4, 2, 1];

/// Frames are padded to multiples of this, as RIFE's inference scripts do: the coarsest
/// scale (4) times the blocks' two stride-2 convs (4) needs 16; 32 is RIFE's choice.
const PAD_TO: usize = 32;

/// A block's input channels: two frames (3 + 3), the mask (1) and the flow (4).
const IN_CHANNELS: usize = 11;

/// The feature width of RIFE HD v3's blocks, used to size the weights before a file is read.
const HDV3_WIDTH: usize = 90;

/// f32 temporaries per padded pixel of one pair while a block runs at scale 1 (the largest
/// step; the mirrored pair is a batch of two): frames, warps, flow and mask (17), the block
/// input and the pieces it is built from (44), and at the heads the hidden 90-channel map at
/// half resolution with its PReLU and its channels-last copy (3 x 45) and the 5-channel
/// output (10); the conv stages before them hold less. An estimate, rounded up from ~190.
const FLOATS_PER_PIXEL: u64 = 192;

/// Tensor names (after `block{i}.`) of one IFBlock and their shapes for width `c`, in the
/// order the forward pass reads them.
fn block_layout(c: usize) -> Vec<(String, Vec<usize>)> {
    let h = c / 2;
    let mut l = Vec::with_capacity(40);
    let mut conv = |name: String, shape: Vec<usize>| {
        let cout = shape[0];
        l.push((format!("{name}.0.weight"), shape));
        l.push((format!("{name}.0.bias"), vec![cout]));
        l.push((format!("{name}.1.weight"), vec![cout]));
    };
    conv("conv0.0".into(), vec![h, IN_CHANNELS, 3, 3]);
    conv("conv0.1".into(), vec![c, h, 3, 3]);
    for j in 0..4 {
        for k in 0..2 {
            conv(format!("convblock{j}.{k}"), vec![c, c, 3, 3]);
        }
    }
    // Heads: ConvTranspose2d(c, c/2, 4, 2, 1), PReLU, ConvTranspose2d(c/2, out, 4, 2, 1);
    // transposed-conv weights are [in, out, kh, kw].
    for (head, outs) in [("conv1", 4), ("conv2", 1)] {
        l.push((format!("{head}.0.weight"), vec![c, h, 4, 4]));
        l.push((format!("{head}.0.bias"), vec![h]));
        l.push((format!("{head}.1.weight"), vec![h]));
        l.push((format!("{head}.2.weight"), vec![h, outs, 4, 4]));
        l.push((format!("{head}.2.bias"), vec![outs]));
    }
    l
}

/// Bytes of one block's weights (f32) at width `c`.
fn block_bytes(c: usize) -> u64 {
    block_layout(c)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 4)
        .sum()
}

/// The architecture of a RIFE HD v3 file, read from its tensor names and shapes.
#[derive(Clone, Debug, PartialEq)]
struct RifeArch {
    /// Per IFBlock, its tensor names in [`block_layout`] order.
    blocks: Vec<Vec<String>>,
}

fn file_err(src: &dyn WeightSource, reason: String) -> NodeError {
    NodeError::File {
        path: src.path().display().to_string(),
        reason,
    }
}

impl RifeArch {
    /// Reads the architecture from `block{0,1,2}.*` tensors (optionally under `module.`, as
    /// checkpoints saved from a `DataParallel` model are), checking every shape; an error
    /// names the tensor.
    fn from_source(src: &dyn WeightSource) -> Result<RifeArch, NodeError> {
        let first = "block0.conv0.0.0.weight";
        let prefix = ["", "module."]
            .into_iter()
            .find(|p| src.shape(&format!("{p}{first}")).is_some())
            .ok_or_else(|| {
                file_err(
                    src,
                    format!("tensor '{first}' is missing: not a RIFE HD v3 (IFNet) model"),
                )
            })?;
        let mut blocks = Vec::with_capacity(SCALES.len());
        for i in 0..SCALES.len() {
            let p = format!("{prefix}block{i}.");
            let name = format!("{p}conv0.0.0.weight");
            let c = match src.shape(&name) {
                Some(s) if s.len() == 4 && s[0] > 0 => 2 * s[0],
                Some(s) => {
                    return Err(file_err(
                        src,
                        format!(
                            "tensor '{name}' has shape {s:?}, expected [c/2, {IN_CHANNELS}, 3, 3]"
                        ),
                    ))
                }
                None => return Err(file_err(src, format!("tensor '{name}' is missing"))),
            };
            let mut names = Vec::with_capacity(40);
            for (suffix, want) in block_layout(c) {
                let name = format!("{p}{suffix}");
                match src.shape(&name) {
                    Some(s) if s == want => names.push(name),
                    Some(s) => {
                        return Err(file_err(
                            src,
                            format!("tensor '{name}' has shape {s:?}, expected {want:?}"),
                        ))
                    }
                    None => return Err(file_err(src, format!("tensor '{name}' is missing"))),
                }
            }
            blocks.push(names);
        }
        Ok(RifeArch { blocks })
    }
}

/// What one interpolation gives, all at the input frames' size.
#[derive(Clone, Debug)]
pub struct Interpolation {
    /// The middle frame, `[b, 3, h, w]`.
    pub mid: Tensor,
    /// The flow from the middle frame to frame 0 (channels 0, 1: x, y in pixels) and to
    /// frame 1 (channels 2, 3), `[b, 4, h, w]`.
    pub flow: Tensor,
    /// The blend weight of warped frame 0 (σ of the mask), `[b, 1, h, w]`.
    pub mask: Tensor,
}

/// A RIFE HD v3 model with its weights on the device.
pub struct Rife {
    arch: RifeArch,
    weights: DeviceWeights,
}

impl std::fmt::Debug for Rife {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rife")
            .field("weights", &self.weights)
            .finish()
    }
}

/// PReLU with per-channel slopes `a` (`[c]`) on `[b, c, h, w]`. On the CPU in f32 one pass
/// into one new tensor (candle's ops would make four, and the heads' PReLU runs on the
/// largest maps of the network); candle's ops elsewhere.
fn prelu(x: &Tensor, a: &Tensor) -> Result<Tensor, NodeError> {
    let (_, c, h, w) = x.dims4()?;
    if !matches!(x.device(), candle_core::Device::Cpu) || x.dtype() != candle_core::DType::F32 {
        let a = a.reshape((1, (), 1, 1))?;
        return Ok((x.relu()? + x.minimum(0f32)?.broadcast_mul(&a)?)?);
    }
    let slopes: Vec<f32> = a.to_vec1()?;
    if slopes.len() != c {
        return Err(NodeError::Other(format!(
            "PReLU: {} slopes for {c} channels",
            slopes.len()
        )));
    }
    let mut out = vec![0f32; x.elem_count()];
    with_values(x, |xs| {
        let planes: Vec<_> = out
            .chunks_mut((h * w).max(1))
            .zip(xs.chunks((h * w).max(1)))
            .enumerate()
            .collect();
        // Hot: after every conv of every block, so one pass per plane, nothing allocated.
        let plane = |(i, (o, v)): (usize, (&mut [f32], &[f32]))| {
            let slope = slopes[i % c];
            for (o, &v) in o.iter_mut().zip(v) {
                *o = if v >= 0.0 { v } else { v * slope };
            }
        };
        if xs.len() < 1 << 16 {
            planes.into_iter().for_each(plane);
        } else {
            par_each(planes, plane);
        }
    })?;
    Ok(Tensor::from_vec(out, x.dims(), x.device())?)
}

/// Values of a transposed conv's per-tap products computed at once: bounds its
/// temporaries (16 MB) whatever the frame size.
const TAP_FLOATS: usize = 1 << 22;

/// `ConvTranspose2d(kernel 4, stride 2, padding 1)` of `x` (`[b, cin, h, w]`) with `w`
/// (`[cin, cout, 4, 4]`) and bias `bias`: `[b, cout, 2h, 2w]`.
///
/// Every input pixel's contribution through each of the 16 taps is one matrix product,
/// channels-last input `[pixels, cin]` times `[cin, 16 cout]` (candle's `matmul`, the
/// multi-threaded `gemm` crate), in bands of input rows (plus one row of context each side)
/// so the products stay under [`TAP_FLOATS`]. Output pixel `(2m + py, 2n + px)` then sums
/// exactly four of them: along each axis an even output `2m` takes kernel index 1 at input
/// `m` and 3 at `m - 1`; an odd one `2m + 1` takes 0 at `m + 1` and 2 at `m`. candle's own
/// CPU `conv_transpose2d` is a direct loop of dot products per output pixel and tap, several
/// times slower at RIFE's shapes; it is used on other devices and dtypes.
fn up2(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor, NodeError> {
    let (b, cin, h, wd) = x.dims4()?;
    let (wc, cout, kh, kw) = w.dims4()?;
    if !matches!(x.device(), candle_core::Device::Cpu) || x.dtype() != candle_core::DType::F32 {
        return Ok(x
            .conv_transpose2d(w, 1, 0, 2, 1)?
            .broadcast_add(&bias.reshape((1, (), 1, 1))?)?);
    }
    if (wc, kh, kw) != (cin, 4, 4) || bias.dims() != [cout] {
        return Err(NodeError::Other(format!(
            "transposed conv: weight {:?} and bias {:?} do not fit input {:?}",
            w.dims(),
            bias.dims(),
            x.dims()
        )));
    }
    // Per axis and output parity: (kernel index, input offset) of its two taps.
    const TAPS: [[(usize, isize); 2]; 2] = [[(1, 0), (3, -1)], [(0, 1), (2, 0)]];
    let cpu = candle_core::Device::Cpu;
    // [cin, (ky, kx, co)] from PyTorch's [cin, cout, ky, kx].
    let wall = w
        .permute((0, 2, 3, 1))?
        .reshape((cin, 16 * cout))?
        .contiguous()?;
    let bs: Vec<f32> = bias.to_vec1()?;
    let xt = x.permute((0, 2, 3, 1))?.contiguous()?;
    let (oh, ow) = (2 * h, 2 * wd);
    let band = (TAP_FLOATS / (wd * 16 * cout).max(1))
        .saturating_sub(2)
        .clamp(1, h.max(1));
    let mut out = vec![0f32; b * cout * oh * ow];
    let mut acc = vec![0f32; cout];
    for img in 0..b {
        let planes = &mut out[img * cout * oh * ow..(img + 1) * cout * oh * ow];
        for y0 in (0..h).step_by(band) {
            let rows = band.min(h - y0);
            let (lo, hi) = (y0.saturating_sub(1), (y0 + rows + 1).min(h));
            let xb = xt
                .get(img)?
                .narrow(0, lo, hi - lo)?
                .reshape(((hi - lo) * wd, cin))?;
            let y = xb.matmul(&wall)?;
            with_values(&y, |y| {
                // Hot: every output value of the heads is summed here from its four taps;
                // the taps of one pixel are contiguous runs of `cout` values, and nothing is
                // allocated per pixel.
                for m in y0..y0 + rows {
                    for (py, ty) in TAPS.iter().enumerate() {
                        let oy = 2 * m + py;
                        for mx in 0..wd {
                            for (px, tx) in TAPS.iter().enumerate() {
                                acc.copy_from_slice(&bs);
                                for &(ky, dy) in ty {
                                    let iy = m as isize + dy;
                                    if iy < 0 || iy >= h as isize {
                                        continue;
                                    }
                                    for &(kx, dx) in tx {
                                        let ix = mx as isize + dx;
                                        if ix < 0 || ix >= wd as isize {
                                            continue;
                                        }
                                        let pixel = (iy as usize - lo) * wd + ix as usize;
                                        let o = pixel * 16 * cout + (ky * 4 + kx) * cout;
                                        for (a, v) in acc.iter_mut().zip(&y[o..o + cout]) {
                                            *a += v;
                                        }
                                    }
                                }
                                let at = oy * ow + 2 * mx + px;
                                for (co, a) in acc.iter().enumerate() {
                                    planes[co * oh * ow + at] = *a;
                                }
                            }
                        }
                    }
                }
            })?;
        }
    }
    Ok(Tensor::from_vec(out, (b, cout, oh, ow), &cpu)?)
}

/// `[a, b]` halves of the channel dimension swapped into `[b, a]` (flow to frame 0 and to
/// frame 1 exchanged).
fn swap_halves(flow: &Tensor) -> candle_core::Result<Tensor> {
    let half = flow.dim(1)? / 2;
    Tensor::cat(&[flow.narrow(1, half, half)?, flow.narrow(1, 0, half)?], 1)
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Smallest map side for which 3x3 convs take conv.rs's Winograd path. Measured at RIFE's
/// 90 channels (batch 2, 2 cores): candle's `conv2d` (tiled im2col) is 2.8x faster at 8x12,
/// about even at 16x24, and Winograd 2.7x faster at 32x48 and 3.2x at 64x96.
const WINOGRAD_MIN_SIDE: usize = 16;

/// 3x3 conv, stride 1, padding 1, plus bias.
fn conv3(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor, NodeError> {
    let (_, _, h, wd) = x.dims4()?;
    if h.min(wd) >= WINOGRAD_MIN_SIDE {
        return conv3x3(x, w, Some(b), 1);
    }
    Ok(x.conv2d(w, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, (), 1, 1))?)?)
}

/// 3x3 conv, stride 2, padding 1, plus bias: candle's `conv2d`, measured 1.2-3.6x faster at
/// RIFE's shapes than conv.rs's `conv3x3_stride2` (which computes all four times the
/// outputs at full resolution, and so also needs more memory than the tiled im2col).
fn conv3_s2(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor, NodeError> {
    Ok(x.conv2d(w, 1, 2, 1, 1)?
        .broadcast_add(&b.reshape((1, (), 1, 1))?)?)
}

/// One IFBlock on `x` (`[b, 11, H, W]`: two frames, mask, flow already divided by `s`) at
/// scale `s`, with its weights `w` in [`block_layout`] order; returns the flow update
/// (`[b, 4, H, W]`, pixels) and the mask update (`[b, 1, H, W]`).
///
/// The two heads run fused: their first transposed convs as one of twice the width (same
/// input), their second as one block-diagonal conv to 4 + 1 channels.
fn ifblock(w: &[Tensor], x: &Tensor, s: usize) -> Result<(Tensor, Tensor), NodeError> {
    let x = interpolate_bilinear(x, 1.0 / s as f64)?;
    let mut feat = prelu(&conv3_s2(&x, &w[0], &w[1])?, &w[2])?;
    feat = prelu(&conv3_s2(&feat, &w[3], &w[4])?, &w[5])?;
    for j in 0..4 {
        let k = 6 + 6 * j;
        let t = prelu(&conv3(&feat, &w[k], &w[k + 1])?, &w[k + 2])?;
        let t = prelu(&conv3(&t, &w[k + 3], &w[k + 4])?, &w[k + 5])?;
        feat = (t + feat)?;
    }
    // conv1 (flow, 4 channels) at 30..35, conv2 (mask, 1 channel) at 35..40.
    let (f, m) = (&w[30..35], &w[35..40]);
    let cat = |a: &Tensor, b: &Tensor, dim: usize| Tensor::cat(&[a, b], dim);
    let hidden = prelu(
        &up2(&feat, &cat(&f[0], &m[0], 1)?, &cat(&f[1], &m[1], 0)?)?,
        &cat(&f[2], &m[2], 0)?,
    )?;
    let (hf, hm) = (f[3].dim(0)?, m[3].dim(0)?);
    let (of, om) = (f[3].dim(1)?, m[3].dim(1)?);
    let zeros = |a, b| Tensor::zeros((a, b, 4, 4), f[3].dtype(), f[3].device());
    let second = cat(
        &cat(&f[3], &zeros(hf, om)?, 1)?,
        &cat(&zeros(hm, of)?, &m[3], 1)?,
        0,
    )?;
    let out = up2(&hidden, &second, &cat(&f[4], &m[4], 0)?)?;
    let out = interpolate_bilinear(&out, s as f64)?;
    let flow = (out.narrow(1, 0, of)? * s as f64)?;
    let mask = out.narrow(1, of, om)?;
    Ok((flow, mask))
}

impl Rife {
    /// Opens a model file outside a workflow (library use, tests): through the process's
    /// residency registry, weights resident and counted by an unlimited accountant.
    pub fn load(path: &Path) -> Result<Rife, NodeError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let asset = super::open_asset(&name, path, None)?;
        let ctx = WeightContext::resident(nova_dataflow::Accountant::unlimited());
        Self::bind(asset, &ctx)
    }

    /// The model of `asset`, its weights placed as `ctx` says.
    fn bind(asset: Arc<nova_dataflow::Asset>, ctx: &WeightContext) -> Result<Rife, NodeError> {
        let arch = RifeArch::from_source(asset.source())?;
        let weights = DeviceWeights::new(asset, ctx.clone())?;
        Ok(Rife { arch, weights })
    }

    /// The frame midway between `img0` and `img1` (`[b, 3, h, w]`, f32 in `[0, 1]`, any size:
    /// padded to multiples of 32 inside), with the flow and mask that made it.
    pub fn interpolate(&self, img0: &Tensor, img1: &Tensor) -> Result<Interpolation, NodeError> {
        let (b, c, h, w) = img0.dims4()?;
        if c != 3 || img1.dims() != img0.dims() || h == 0 || w == 0 {
            return Err(NodeError::Other(format!(
                "RIFE interpolates two frames of one shape [b, 3, h, w], got {:?} and {:?}",
                img0.dims(),
                img1.dims()
            )));
        }
        let (ph, pw) = (h.div_ceil(PAD_TO) * PAD_TO, w.div_ceil(PAD_TO) * PAD_TO);
        let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.pad_with_zeros(2, 0, ph - h)?
                .pad_with_zeros(3, 0, pw - w)?
                .contiguous()
        };
        let (i0, i1) = (pad(img0)?, pad(img1)?);
        let dev = i0.device().clone();
        let mut flow = Tensor::zeros((b, 4, ph, pw), i0.dtype(), &dev)?;
        let mut mask = Tensor::zeros((b, 1, ph, pw), i0.dtype(), &dev)?;
        let (mut w0, mut w1) = (i0.clone(), i1.clone());
        let mut stream = self.weights.stream(&self.arch.blocks);
        for (i, &s) in SCALES.iter().enumerate() {
            let wts = stream.block(i)?;
            let inv = 1.0 / s as f64;
            // The block's input and its mirror, as one batch of 2b.
            let fwd = Tensor::cat(&[&w0, &w1, &mask, &(&flow * inv)?], 1)?;
            let rev = Tensor::cat(&[&w1, &w0, &mask.neg()?, &(swap_halves(&flow)? * inv)?], 1)?;
            let (f, m) = ifblock(&wts, &Tensor::cat(&[fwd, rev], 0)?, s)?;
            let (f0, f1) = (f.narrow(0, 0, b)?, f.narrow(0, b, b)?);
            let (m0, m1) = (m.narrow(0, 0, b)?, m.narrow(0, b, b)?);
            flow = (flow + ((f0 + swap_halves(&f1)?)? / 2.0)?)?;
            mask = (mask + ((m0 - m1)? / 2.0)?)?;
            w0 = warp(&i0, &flow.narrow(1, 0, 2)?)?;
            w1 = warp(&i1, &flow.narrow(1, 2, 2)?)?;
        }
        drop(stream);
        let m = sigmoid(&mask)?;
        let mid = (w0.broadcast_mul(&m)? + w1.broadcast_mul(&m.affine(-1.0, 1.0)?)?)?;
        let crop = |t: Tensor| -> candle_core::Result<Tensor> {
            t.narrow(2, 0, h)?.narrow(3, 0, w)?.contiguous()
        };
        Ok(Interpolation {
            mid: crop(mid)?,
            flow: crop(flow)?,
            mask: crop(m)?,
        })
    }
}

/// Device bytes of one pair's interpolation at `h` x `w` besides the weights.
fn pair_workspace(h: usize, w: usize) -> u64 {
    let (ph, pw) = (h.div_ceil(PAD_TO) * PAD_TO, w.div_ceil(PAD_TO) * PAD_TO);
    (ph * pw) as u64 * FLOATS_PER_PIXEL * 4
}

/// `RIFE VFI`: interpolates a batch of consecutive frames, `N` in, `2N − 1` out.
pub struct RifeVfi {
    schema: NodeSchema,
}

impl RifeVfi {
    pub fn new() -> Self {
        let mut multiplier = int("multiplier", 2, 2, 2);
        multiplier.tooltip =
            "Output frames per input frame; RIFE HD v3 makes only the midpoint, so 2.";
        RifeVfi {
            schema: NodeSchema {
                class_type: "RIFE VFI",
                display_name: "RIFE VFI",
                category: "ComfyUI-Frame-Interpolation/VFI",
                description: "Doubles a frame sequence with RIFE HD v3: each pair of consecutive frames gets its midpoint (models/frame_interpolation/, safetensors only).",
                inputs: vec![
                    InputSpec {
                        name: "ckpt_name",
                        kind: InputKind::File {
                            folder: FileFolder::Models(FOLDER),
                            image_upload: false,
                        },
                        required: true,
                        tooltip: "",
                    },
                    link("frames", DataType::Image),
                    multiplier,
                ],
                outputs: vec![out("IMAGE", DataType::Image)],
                output_node: false,
            },
        }
    }

    fn path(args: &Args, env: &JobEnv) -> Result<(String, PathBuf), NodeError> {
        let name = args.string("ckpt_name")?;
        if !name.ends_with(".safetensors") {
            return Err(NodeError::input(
                "ckpt_name",
                format!("'{name}': NOVA loads weights from .safetensors files only"),
            ));
        }
        let path = env
            .require_model(FOLDER, name)
            .map_err(|r| NodeError::input("ckpt_name", r))?;
        Ok((name.to_string(), path))
    }

    fn multiplier(args: &Args) -> Result<(), NodeError> {
        match args.int("multiplier")? {
            2 => Ok(()),
            m => Err(NodeError::input(
                "multiplier",
                format!("{m}: RIFE HD v3 interpolates the midpoint only (multiplier 2)"),
            )),
        }
    }
}

impl Node for RifeVfi {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    /// On a video, each window shares one frame with the next (the pair across the window
    /// boundary is interpolated once) and the frame rate doubles.
    fn temporal(&self, _args: &Args) -> Option<nova_dataflow::Temporal> {
        Some(nova_dataflow::Temporal {
            overlap: 1,
            multiplier: 2,
        })
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        Self::multiplier(args)?;
        let (_, path) = Self::path(args, env)?;
        let f = SafetensorsFile::open(&path)?;
        RifeArch::from_source(&f).map(|_| ())
    }

    fn infer(
        &self,
        _args: &Args,
        inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![match inputs.get("frames").and_then(|i| i.image()) {
            Some(i) if i.batch > 0 => ValueInfo::Image(ImageInfo {
                batch: 2 * i.batch - 1,
                ..i
            }),
            _ => ValueInfo::Unknown,
        }])
    }

    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        let Some(frames) = query.inputs.iter().find_map(|i| i.image()) else {
            return query.whole(&self.meta());
        };
        let output = ImageInfo {
            batch: (2 * frames.batch).saturating_sub(1),
            ..frames
        };
        // Sized for HD v3's width before any file is read (memory gets no environment);
        // the weights a run puts on the device are counted at their real size.
        let block = block_bytes(HDV3_WIDTH);
        let workspace = if frames.batch > 1 {
            pair_workspace(frames.height, frames.width)
        } else {
            0
        };
        MemoryEstimate {
            weights: block * SCALES.len() as u64,
            activations: frames.bytes() + output.bytes() + workspace,
            weight_block: block,
        }
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        Self::multiplier(args)?;
        let frames = inputs.image("frames")?;
        let (n, h, w, c) = frames.dims4()?;
        if n == 0 || c != 3 {
            return Err(NodeError::input(
                "frames",
                format!(
                    "expected a batch of RGB frames [n, h, w, 3], got {:?}",
                    frames.dims()
                ),
            ));
        }
        let (name, path) = Self::path(args, &ctx.env)?;
        if n == 1 {
            // No pair to interpolate: the one frame is the whole output.
            return Ok(NodeOutput {
                values: vec![Value::image(frames.clone())],
                ui: None,
            });
        }
        let asset = super::open_asset(&name, &path, Some(&ctx.weights.log))?;
        let rife = Rife::bind(asset, &ctx.weights)?;
        let frames = frames.to_device(&ctx.weights.device)?;
        let nchw = |i: usize| -> candle_core::Result<Tensor> {
            frames.narrow(0, i, 1)?.permute((0, 3, 1, 2))?.contiguous()
        };
        let mut out = Vec::with_capacity(2 * n - 1);
        let mut prev = nchw(0)?;
        out.push(frames.narrow(0, 0, 1)?);
        for i in 1..n {
            let next = nchw(i)?;
            let mid = rife.interpolate(&prev, &next)?.mid;
            out.push(mid.permute((0, 2, 3, 1))?);
            out.push(frames.narrow(0, i, 1)?);
            prev = next;
        }
        let images = Tensor::cat(&out, 0)?.contiguous()?;
        debug_assert_eq!(images.dims(), [2 * n - 1, h, w, 3]);
        Ok(NodeOutput {
            values: vec![Value::image(images)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(RifeVfi);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use std::collections::BTreeMap;
    use std::time::Instant;

    /// A file under `shared/models/frame_interpolation/`; fails (never skips) when absent.
    fn shared(rel: &str) -> PathBuf {
        let p = models_root().join(FOLDER).join(rel);
        assert!(p.exists(), "missing {}", p.display());
        p
    }

    fn models_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models")
    }

    fn model() -> Rife {
        Rife::load(&shared("rife_hdv3.safetensors")).unwrap()
    }

    /// The reference tensors of `rife_hdv3_{size}.safetensors` by name.
    fn reference(size: &str) -> impl Fn(&str) -> Tensor {
        let f = SafetensorsFile::open(&shared(&format!("reference/rife_hdv3_{size}.safetensors")))
            .unwrap();
        move |name| f.read(name).unwrap()
    }

    fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn midframe_flow_and_mask_match_the_pytorch_reference_within_1e_3() {
        let rife = model();
        for size in ["64x64", "64x96"] {
            let r = reference(size);
            let got = rife.interpolate(&r("img0"), &r("img1")).unwrap();
            // Timed warm (the first call also faults the mapped weights in), best of three:
            // the figure is for reading, not asserted.
            let mut took = std::time::Duration::MAX;
            for _ in 0..3 {
                let started = Instant::now();
                let again = rife.interpolate(&r("img0"), &r("img1")).unwrap();
                took = took.min(started.elapsed());
                assert_eq!(max_abs_diff(&again.mid, &got.mid), 0.0, "deterministic");
            }
            let (mid, flow, mask) = (
                max_abs_diff(&got.mid, &r("midframe")),
                max_abs_diff(&got.flow, &r("flow")),
                max_abs_diff(&got.mask, &r("mask_sigmoid")),
            );
            let truth = mean_abs_diff(&got.mid, &r("true_midframe"));
            eprintln!(
                "RIFE HD v3 {size}: max |diff| midframe {mid:.2e}, flow {flow:.2e}, mask {mask:.2e}; \
                 mean |diff| to the true midframe {truth:.4}; one interpolation {:.1} ms",
                took.as_secs_f64() * 1e3
            );
            assert!(mid < 1e-3 && flow < 1e-3 && mask < 1e-3, "{size}");
        }
    }

    #[test]
    fn frames_of_any_size_are_padded_inside_and_come_back_at_their_size() {
        // A 50x70 crop of the 64x96 reference: padded to 64x96 inside, cropped back.
        let rife = model();
        let r = reference("64x96");
        let crop = |t: Tensor| t.narrow(2, 0, 50).unwrap().narrow(3, 0, 70).unwrap();
        let got = rife
            .interpolate(&crop(r("img0")), &crop(r("img1")))
            .unwrap();
        assert_eq!(got.mid.dims(), [1, 3, 50, 70]);
        assert_eq!(got.flow.dims(), [1, 4, 50, 70]);
        assert_eq!(got.mask.dims(), [1, 1, 50, 70]);
        // Zero padding changes the content near the border, not the motion: still far
        // closer to the true middle frame than the naive average (0.042 at full size).
        let truth = mean_abs_diff(&got.mid, &crop(r("true_midframe")));
        eprintln!("RIFE HD v3 50x70 (padded): mean |diff| to the true midframe {truth:.4}");
        assert!(truth < 0.01, "{truth}");
    }

    #[test]
    fn the_node_interleaves_each_frame_with_the_midpoint_to_the_next() {
        let r = reference("64x64");
        let (a, b) = (r("img0"), r("img1"));
        let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        // Three frames: forward motion, then back.
        let frames = Tensor::cat(&[nhwc(&a), nhwc(&b), nhwc(&a)], 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let env = JobEnv::new(dir.path(), dir.path(), dir.path()).with_models_dir(models_root());
        let ctx = ExecContext::standalone(env, "1");
        let args = Args::new(BTreeMap::from([
            ("ckpt_name".to_string(), "rife_hdv3.safetensors".into()),
            ("multiplier".to_string(), 2.into()),
        ]));
        let node = RifeVfi::new();
        node.check(&args, &ctx.env).unwrap();
        let mut inputs = Inputs::new();
        inputs.insert("frames", Value::image(frames.clone()));
        let out = node.execute(&args, inputs, &ctx).unwrap();
        let images = out.values[0].as_image().unwrap();
        assert_eq!(images.dims(), [5, 64, 64, 3]);
        let frame = |i: usize| images.narrow(0, i, 1).unwrap();
        for (o, i) in [(0, 0), (2, 1), (4, 2)] {
            let d = max_abs_diff(&frame(o), &frames.narrow(0, i, 1).unwrap());
            assert_eq!(d, 0.0, "output {o} is input {i}");
        }
        let rife = model();
        for (o, (x, y)) in [(1, (&a, &b)), (3, (&b, &a))] {
            let want = nhwc(&rife.interpolate(x, y).unwrap().mid);
            assert_eq!(max_abs_diff(&frame(o), &want), 0.0, "output {o}");
        }
        assert!(max_abs_diff(&frame(1), &nhwc(&r("midframe"))) < 1e-3);

        // The planner's view: 2N - 1 frames out, HD v3's weights streamable by block.
        let info = ValueInfo::Image(ImageInfo {
            batch: 3,
            height: 64,
            width: 64,
            channels: 3,
        });
        let mut shapes = Inputs::new();
        shapes.insert("frames", info);
        let outs = node.infer(&args, &shapes, &ctx.env).unwrap();
        assert_eq!(outs[0].image().map(|i| i.batch), Some(5));
        let m = node.memory(
            &args,
            &MemoryQuery {
                inputs: &[info],
                outputs: &outs,
                bytes_per_element: 4,
            },
        );
        assert_eq!(m.weights, 2_277_600 * 4, "HD v3 has 2,277,600 parameters");
        assert_eq!(m.weight_block * 3, m.weights);
    }

    #[test]
    fn the_node_refuses_other_multipliers_files_and_frame_layouts_by_input_name() {
        let dir = tempfile::tempdir().unwrap();
        let env = JobEnv::new(dir.path(), dir.path(), dir.path()).with_models_dir(models_root());
        let node = RifeVfi::new();
        let args = |ckpt: &str, m: i64| {
            Args::new(BTreeMap::from([
                ("ckpt_name".to_string(), ckpt.into()),
                ("multiplier".to_string(), m.into()),
            ]))
        };
        let e = node
            .check(&args("rife_hdv3.safetensors", 4), &env)
            .unwrap_err();
        assert!(e.to_string().contains("input 'multiplier'"), "{e}");
        let e = node.check(&args("rife47.pth", 2), &env).unwrap_err();
        assert!(
            e.to_string().contains("input 'ckpt_name'") && e.to_string().contains(".safetensors"),
            "{e}"
        );
        let e = node
            .check(&args("absent.safetensors", 2), &env)
            .unwrap_err();
        assert!(e.to_string().contains("no 'absent.safetensors'"), "{e}");

        let ctx = ExecContext::standalone(env, "1");
        let mut inputs = Inputs::new();
        let gray = Tensor::zeros(
            (2, 32, 32, 1),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        inputs.insert("frames", Value::image(gray));
        let e = node
            .execute(&args("rife_hdv3.safetensors", 2), inputs, &ctx)
            .unwrap_err();
        assert!(e.to_string().contains("input 'frames'"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_rife_hdv3_is_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        // One f32 tensor of `shape` under `name`.
        let write = |file: &str, name: &str, shape: &[usize]| {
            let n: usize = shape.iter().product();
            let header = format!(
                r#"{{"{name}":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,{}]}}}}"#,
                n * 4
            );
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend(std::iter::repeat_n(0u8, n * 4));
            let p = dir.path().join(file);
            std::fs::write(&p, b).unwrap();
            SafetensorsFile::open(&p).unwrap()
        };
        let err = |f: SafetensorsFile| RifeArch::from_source(&f).unwrap_err().to_string();

        let e = err(write("other.safetensors", "body.0.weight", &[4]));
        assert!(
            e.contains("'block0.conv0.0.0.weight' is missing") && e.contains("not a RIFE"),
            "{e}"
        );
        let e = err(write(
            "wide.safetensors",
            "block0.conv0.0.0.weight",
            &[45, 3, 3, 3],
        ));
        assert!(
            e.contains(
                "tensor 'block0.conv0.0.0.weight' has shape [45, 3, 3, 3], expected [45, 11, 3, 3]"
            ),
            "{e}"
        );
        let e = err(write(
            "cut.safetensors",
            "module.block0.conv0.0.0.weight",
            &[45, 11, 3, 3],
        ));
        assert!(
            e.contains("tensor 'module.block0.conv0.0.0.bias' is missing"),
            "{e}"
        );
        assert!(e.contains("cut.safetensors"), "{e}");
    }

    #[test]
    fn the_fast_transposed_conv_and_prelu_equal_candles_ops() {
        let dev = candle_core::Device::Cpu;
        // RIFE's head shapes, a 1x1 input, and one tall enough to run in several bands.
        for (b, cin, cout, h, w) in [
            (2, 90, 45, 5, 7),
            (2, 45, 5, 6, 4),
            (1, 3, 2, 1, 1),
            (1, 8, 45, 130, 96),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (cin, cout, 4, 4), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let got = up2(&x, &wt, &bias).unwrap();
            let want = x
                .conv_transpose2d(&wt, 1, 0, 2, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let e = max_abs_diff(&got, &want);
            assert!(e < 1e-4, "{b}x{cin}x{h}x{w} -> {cout}: {e}");
        }
        let x = Tensor::randn(0f32, 1.0, (2, 5, 3, 4), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let want = (x.relu().unwrap()
            + x.minimum(0f32)
                .unwrap()
                .broadcast_mul(&a.reshape((1, 5, 1, 1)).unwrap())
                .unwrap())
        .unwrap();
        assert_eq!(max_abs_diff(&prelu(&x, &a).unwrap(), &want), 0.0);
    }

    #[test]
    fn hdv3_blocks_hold_a_third_of_its_2_277_600_parameters_each() {
        assert_eq!(block_layout(HDV3_WIDTH).len(), 40);
        assert_eq!(block_bytes(HDV3_WIDTH) * 3, 2_277_600 * 4);
    }
}
