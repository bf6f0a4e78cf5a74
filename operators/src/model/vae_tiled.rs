//! Tiled VAE decode: `VAEDecodeTiled` (ComfyUI's name and inputs), and the chunked form the
//! planner gives `VAEDecode` when a whole decode does not fit the budget.
//!
//! The output is cut into tiles aligned to latent pixels (8 output pixels); each tile is
//! decoded from its latent window grown by `overlap` output pixels on every side (clipped at
//! the image border), and the decoded windows are blended: a window's weight rises linearly
//! from its interior edges over the overlap band, so neighbouring tiles cross-fade instead of
//! meeting at a seam. With an overlap at least the decoder's receptive field (about 19 latent
//! pixels for TAESD) the blend region only sees exact values; the defaults (64 pixels) trade a
//! little accuracy for much less recomputation, as ComfyUI's do.

use super::taesd::{Part, TaesdNet};
use super::vae::TaesdVae;
use candle_core::Tensor;
use nova_dataflow::{
    Asset, ChunkMemory, ChunkSize, ChunkSpec, ChunkedOp, DataType, DeviceWeights, ImageInfo,
    Inputs, Merger, NodeError, Rect, Value, ValueInfo, WeightContext,
};
use nova_engines::{specs, tile_grid};
use std::sync::Arc;

/// Latent windows decoded tile by tile with blended overlaps.
pub struct TiledDecode {
    /// Overlap in output pixels (rounded down to latent pixels).
    pub overlap: usize,
    /// Activation bytes per latent pixel while decoding.
    pub per_latent_px: u64,
    bound: Option<(TaesdNet, Arc<DeviceWeights>)>,
}

/// Latent dimensions `(batch, channels, height, width)` of a planned input.
fn latent_dims(info: &ValueInfo) -> Result<(usize, usize, usize, usize), NodeError> {
    match info {
        ValueInfo::Latent {
            batch,
            channels,
            height,
            width,
        } => Ok((*batch, *channels, *height, *width)),
        _ => Err(NodeError::Other(
            "tiled VAE decode needs a LATENT input".into(),
        )),
    }
}

fn rect_of(chunk: &ChunkSpec) -> Result<Rect, NodeError> {
    chunk
        .rect()
        .ok_or_else(|| NodeError::Other("VAE decode chunk without a tile rectangle".into()))
}

impl TiledDecode {
    /// An unbound operator (for planning and merging).
    pub fn new(overlap: usize, per_latent_px: u64) -> TiledDecode {
        TiledDecode {
            overlap,
            per_latent_px,
            bound: None,
        }
    }

    /// The latent window of an output tile: the tile in latent pixels grown by the overlap,
    /// clipped to the latent's `h` x `w`.
    fn window(&self, out: Rect, h: usize, w: usize) -> Rect {
        let ov = self.overlap / 8;
        let (x0, y0) = (
            (out.x / 8).saturating_sub(ov),
            (out.y / 8).saturating_sub(ov),
        );
        let x1 = ((out.x + out.w) / 8 + ov).min(w);
        let y1 = ((out.y + out.h) / 8 + ov).min(h);
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    fn decode(&self, latent: &Tensor) -> Result<Tensor, NodeError> {
        let (net, weights) = self
            .bound
            .as_ref()
            .ok_or_else(|| NodeError::Other("VAE decoder is not loaded".into()))?;
        let rgb = net.forward(latent, &|n| weights.get(n).cloned())?;
        Ok(rgb.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// This operator with the `vae` input's decoder on the device.
    pub fn bind_to(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<TiledDecode, NodeError> {
        let model = side.model("vae", DataType::Vae)?;
        let vae = model
            .arch
            .clone()
            .downcast::<TaesdVae>()
            .map_err(|_| NodeError::input("vae", "not a TAESD-family VAE"))?;
        let (asset, net): &(Arc<Asset>, TaesdNet) = vae
            .decoder
            .as_ref()
            .ok_or_else(|| NodeError::input("vae", "this VAE has no decoder"))?;
        debug_assert_eq!(net.part, Part::Decoder);
        let device = DeviceWeights::new(asset.clone(), weights.clone())?;
        Ok(TiledDecode {
            overlap: self.overlap,
            per_latent_px: self.per_latent_px,
            bound: Some((net.clone(), Arc::new(device))),
        })
    }

    /// Decodes the whole latent tile by tile, in this thread (the atomic form).
    pub fn run_whole(&self, latent: &Tensor, tile: usize) -> Result<Tensor, NodeError> {
        let (b, c, h, w) = latent.dims4()?;
        let info = ValueInfo::Latent {
            batch: b,
            channels: c,
            height: h,
            width: w,
        };
        let size = ChunkSize::Tile {
            width: tile,
            height: tile,
        };
        let out = self.output_info(&info)?;
        let mut merger = self.merger(&out)?;
        let value = Value::latent(latent.clone());
        for chunk in self.plan(&info, size)? {
            let piece = self.split(&value, &chunk)?;
            merger.add(&chunk, self.process(&info, &chunk, &piece)?)?;
        }
        let image = merger.finish()?;
        image
            .as_image()
            .cloned()
            .ok_or_else(|| NodeError::Other("decode produced no image".into()))
    }
}

impl ChunkedOp for TiledDecode {
    fn plan(&self, input: &ValueInfo, size: ChunkSize) -> Result<Vec<ChunkSpec>, NodeError> {
        let (_, _, h, w) = latent_dims(input)?;
        let ChunkSize::Tile { width, height } = size;
        // Tiles in whole latent pixels, so every window starts on one.
        let rects = tile_grid(w, h, (width / 8).max(1), (height / 8).max(1))
            .into_iter()
            .map(|r| Rect::new(r.x * 8, r.y * 8, r.w * 8, r.h * 8))
            .collect();
        Ok(specs(rects))
    }

    fn output_info(&self, input: &ValueInfo) -> Result<ValueInfo, NodeError> {
        let (batch, _, h, w) = latent_dims(input)?;
        Ok(ValueInfo::Image(ImageInfo {
            batch,
            height: h * 8,
            width: w * 8,
            channels: 3,
        }))
    }

    fn split(&self, input: &Value, chunk: &ChunkSpec) -> Result<Value, NodeError> {
        let latent = input
            .as_latent()
            .ok_or_else(|| NodeError::input("samples", "expected a LATENT"))?;
        let (_, _, h, w) = latent.dims4()?;
        let win = self.window(rect_of(chunk)?, h, w);
        let piece = latent.narrow(2, win.y, win.h)?.narrow(3, win.x, win.w)?;
        Ok(Value::latent(piece.contiguous()?))
    }

    fn process(
        &self,
        _input: &ValueInfo,
        _chunk: &ChunkSpec,
        piece: &Value,
    ) -> Result<Value, NodeError> {
        let latent = piece
            .as_latent()
            .ok_or_else(|| NodeError::input("samples", "expected a LATENT"))?;
        Ok(Value::image(self.decode(latent)?))
    }

    fn bind(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<Option<Arc<dyn ChunkedOp>>, NodeError> {
        Ok(Some(Arc::new(self.bind_to(side, weights)?)))
    }

    fn merger(&self, output: &ValueInfo) -> Result<Box<dyn Merger>, NodeError> {
        let info = output
            .image()
            .ok_or_else(|| NodeError::Other("tiled VAE decode makes an IMAGE".into()))?;
        Ok(Box::new(BlendMerger {
            overlap: (self.overlap / 8) * 8,
            op: TiledDecode::new(self.overlap, self.per_latent_px),
            acc: vec![0.0; info.batch * info.height * info.width * 3],
            weight: vec![0.0; info.height * info.width],
            info,
        }))
    }

    fn chunk_memory(&self, input: &ValueInfo, chunk: &ChunkSpec) -> ChunkMemory {
        let (Ok((b, c, h, w)), Ok(out)) = (latent_dims(input), rect_of(chunk)) else {
            return ChunkMemory::default();
        };
        let win = self.window(out, h, w);
        let px = (b * win.w * win.h) as u64;
        ChunkMemory {
            piece: px * c as u64 * 4,
            result: px * 64 * 3 * 4,
            workspace: px * self.per_latent_px,
        }
    }
}

/// Accumulates weighted decoded windows and divides by the weights at the end.
struct BlendMerger {
    info: ImageInfo,
    overlap: usize,
    op: TiledDecode,
    acc: Vec<f32>,
    weight: Vec<f32>,
}

/// Weight of position `i` of `n` along one axis: ramps up over `ov` from each side that is
/// not the image's border.
fn ramp(i: usize, n: usize, ov: usize, start_inside: bool, end_inside: bool) -> f32 {
    if ov == 0 {
        return 1.0;
    }
    let mut w: f32 = 1.0;
    if start_inside {
        w = w.min((i as f32 + 0.5) / ov as f32);
    }
    if end_inside {
        w = w.min(((n - i) as f32 - 0.5) / ov as f32);
    }
    w.clamp(1e-3, 1.0)
}

impl Merger for BlendMerger {
    fn add(&mut self, chunk: &ChunkSpec, part: Value) -> Result<(), NodeError> {
        let ImageInfo {
            batch: b,
            height: oh,
            width: ow,
            ..
        } = self.info;
        let win = self.op.window(rect_of(chunk)?, oh / 8, ow / 8);
        let (x0, y0, ww, wh) = (win.x * 8, win.y * 8, win.w * 8, win.h * 8);
        let t = part
            .as_image()
            .ok_or_else(|| NodeError::Other("decoded tile is not an image".into()))?;
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        if data.len() != b * wh * ww * 3 {
            return Err(NodeError::Other(format!(
                "decoded window {ww}x{wh} has {} values",
                data.len()
            )));
        }
        let ov = self.overlap;
        for y in 0..wh {
            let wy = ramp(y, wh, ov, y0 > 0, y0 + wh < oh);
            for x in 0..ww {
                let wgt = wy * ramp(x, ww, ov, x0 > 0, x0 + ww < ow);
                let o = (y0 + y) * ow + x0 + x;
                self.weight[o] += wgt;
                for bi in 0..b {
                    let src = ((bi * wh + y) * ww + x) * 3;
                    let dst = (bi * oh * ow + o) * 3;
                    for ch in 0..3 {
                        self.acc[dst + ch] += wgt * data[src + ch];
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Value, NodeError> {
        let ImageInfo {
            batch: b,
            height: oh,
            width: ow,
            ..
        } = self.info;
        let mut out = self.acc;
        for bi in 0..b {
            for (o, w) in self.weight.iter().enumerate() {
                if *w <= 0.0 {
                    return Err(NodeError::Other("a decoded pixel was never covered".into()));
                }
                let d = (bi * oh * ow + o) * 3;
                for ch in 0..3 {
                    out[d + ch] /= w;
                }
            }
        }
        Ok(Value::image(Tensor::from_vec(
            out,
            (b, oh, ow, 3),
            &candle_core::Device::Cpu,
        )?))
    }
}
