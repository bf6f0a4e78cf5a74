//! Tiled VAE decode and encode: `VAEDecodeTiled` and `VAEEncodeTiled` (ComfyUI's names and
//! inputs), and the chunked form the planner gives `VAEDecode` and `VAEEncode` when a whole
//! run does not fit the budget.
//!
//! Tiles are aligned to latent pixels (8 image pixels). Decode cuts the output image into
//! tiles and decodes each from its latent window grown by `overlap` image pixels on every side
//! (clipped at the border); encode cuts the output latent into tiles and encodes each from its
//! image window grown the same way. The windows' results are blended: a window's weight rises
//! linearly from its interior edges over the overlap band, so neighbouring tiles cross-fade
//! instead of meeting at a seam. With an overlap at least the network's receptive field
//! (about 19 latent pixels for TAESD) the blend only sees exact values; the defaults (64
//! pixels) trade a little accuracy for much less recomputation, as ComfyUI's do.
//!
//! Tile sizes are in image pixels for both directions. Encode crops the image to a multiple
//! of 8, centred, as the whole `VAEEncode` does.

use super::kl_vae;
use super::taesd::{Part, TaesdNet};
use super::vae::{KlVae, TaesdVae};
use candle_core::Tensor;
use nova_dataflow::{
    Asset, ChunkMemory, ChunkSize, ChunkSpec, ChunkedOp, DataType, DeviceWeights, ImageInfo,
    Inputs, Merger, NodeError, Rect, Value, ValueInfo, WeightContext,
};
use nova_engines::{specs, tile_grid};
use std::sync::Arc;

/// A TAESD-family decoder or encoder run tile by tile with blended overlaps.
pub struct TiledVae {
    pub part: Part,
    /// Overlap in image pixels (rounded down to latent pixels).
    pub overlap: usize,
    /// Activation bytes per input pixel while running (latent pixels for decode, image
    /// pixels for encode).
    pub per_px: u64,
    /// Latent channels the encoder makes (the planner assumes SD1's 4 until bound).
    pub latent_channels: usize,
    bound: Option<(Net, Arc<DeviceWeights>)>,
}

/// The network a tiled VAE runs: a TAESD half, or a checkpoint's KL VAE (whose weights are
/// the asset's `first_stage_model.` part).
#[derive(Clone)]
enum Net {
    Taesd(TaesdNet),
    Kl(Arc<Asset>),
}

/// Dimensions `(batch, channels, latent height, latent width)` of a planned input: a latent
/// for decode, an image (cropped to latent pixels) for encode.
fn dims(part: Part, info: &ValueInfo) -> Result<(usize, usize, usize, usize), NodeError> {
    match (part, info) {
        (
            Part::Decoder,
            ValueInfo::Latent {
                batch,
                channels,
                height,
                width,
            },
        ) => Ok((*batch, *channels, *height, *width)),
        (Part::Encoder, ValueInfo::Image(i)) => {
            Ok((i.batch, i.channels, i.height / 8, i.width / 8))
        }
        _ => Err(NodeError::Other(format!(
            "tiled VAE {part:?} got a {info:?} input"
        ))),
    }
}

fn rect_of(chunk: &ChunkSpec) -> Result<Rect, NodeError> {
    chunk
        .rect()
        .ok_or_else(|| NodeError::Other("VAE chunk without a tile rectangle".into()))
}

impl TiledVae {
    /// An unbound decoder (for planning and merging).
    pub fn new(overlap: usize, per_latent_px: u64) -> TiledVae {
        TiledVae {
            part: Part::Decoder,
            overlap,
            per_px: per_latent_px,
            latent_channels: 4,
            bound: None,
        }
    }

    /// An unbound encoder needing `per_image_px` activation bytes per image pixel.
    pub fn encoder(overlap: usize, per_image_px: u64) -> TiledVae {
        TiledVae {
            part: Part::Encoder,
            overlap,
            per_px: per_image_px,
            latent_channels: 4,
            bound: None,
        }
    }

    fn unbound(&self) -> TiledVae {
        TiledVae {
            part: self.part,
            overlap: self.overlap,
            per_px: self.per_px,
            latent_channels: self.latent_channels,
            bound: None,
        }
    }

    /// A tile's window in latent pixels: the tile (in latent pixels) grown by the overlap,
    /// clipped to the latent's `h` x `w`.
    fn window(&self, tile: Rect, h: usize, w: usize) -> Rect {
        let ov = self.overlap / 8;
        let (x0, y0) = (tile.x.saturating_sub(ov), tile.y.saturating_sub(ov));
        let x1 = (tile.x + tile.w + ov).min(w);
        let y1 = (tile.y + tile.h + ov).min(h);
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    /// A chunk's tile in latent pixels (decode chunks are in image pixels).
    fn latent_tile(&self, chunk: &ChunkSpec) -> Result<Rect, NodeError> {
        let r = rect_of(chunk)?;
        Ok(match self.part {
            Part::Decoder => Rect::new(r.x / 8, r.y / 8, r.w / 8, r.h / 8),
            Part::Encoder => r,
        })
    }

    /// The network on a piece: images in `[0, 1]` (`[b, 3, h, w]`), diffusion latents.
    fn run_net(&self, x: &Tensor) -> Result<Tensor, NodeError> {
        let (net, weights) = self
            .bound
            .as_ref()
            .ok_or_else(|| NodeError::Other(format!("VAE {:?} is not loaded", self.part)))?;
        let get = |n: &str| weights.get(n).cloned();
        match net {
            Net::Taesd(t) => t.forward(x, &get),
            Net::Kl(asset) => {
                let src = asset.source();
                kl_vae::forward(self.part, x, &get, &|n| src.shape(n).is_some())
            }
        }
    }

    /// This operator with the `vae` input's decoder or encoder on the device.
    pub fn bind_to(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<TiledVae, NodeError> {
        let model = side.model("vae", DataType::Vae)?;
        if model.arch.clone().downcast::<KlVae>().is_ok() {
            let device = DeviceWeights::part(model.asset.clone(), weights.clone(), kl_vae::PREFIX)?;
            return Ok(TiledVae {
                latent_channels: kl_vae::latent_channels(model.asset.source()),
                bound: Some((Net::Kl(model.asset.clone()), Arc::new(device))),
                ..self.unbound()
            });
        }
        let vae = model
            .arch
            .clone()
            .downcast::<TaesdVae>()
            .map_err(|_| NodeError::input("vae", "not a TAESD-family or SD1 VAE"))?;
        let half = match self.part {
            Part::Decoder => &vae.decoder,
            Part::Encoder => &vae.encoder,
        };
        let (asset, net): &(Arc<Asset>, TaesdNet) = half
            .as_ref()
            .ok_or_else(|| NodeError::input("vae", format!("this VAE has no {:?}", self.part)))?;
        let device = DeviceWeights::new(asset.clone(), weights.clone())?;
        Ok(TiledVae {
            latent_channels: net.latent_channels,
            bound: Some((Net::Taesd(net.clone()), Arc::new(device))),
            ..self.unbound()
        })
    }

    /// Runs the whole input tile by tile, in this thread (the atomic form): a latent to an
    /// image for decode, an image to a latent for encode.
    pub fn run_whole(&self, input: &Value, tile: usize) -> Result<Value, NodeError> {
        let info = input.info();
        let size = ChunkSize::Tile {
            width: tile,
            height: tile,
        };
        let out = self.output_info(&info)?;
        let mut merger = self.merger(&out)?;
        for chunk in self.plan(&info, size)? {
            let piece = self.split(input, &chunk)?;
            merger.add(&chunk, self.process(&info, &chunk, &piece)?)?;
        }
        merger.finish()
    }
}

impl ChunkedOp for TiledVae {
    fn plan(&self, input: &ValueInfo, size: ChunkSize) -> Result<Vec<ChunkSpec>, NodeError> {
        let (_, _, h, w) = dims(self.part, input)?;
        let ChunkSize::Tile { width, height } = size else {
            return Err(NodeError::Other(format!(
                "VAE tiles cannot be cut as {size:?}"
            )));
        };
        // Tiles in whole latent pixels, so every window starts on one.
        let tiles = tile_grid(w, h, (width / 8).max(1), (height / 8).max(1));
        let rects = match self.part {
            Part::Decoder => tiles
                .into_iter()
                .map(|r| Rect::new(r.x * 8, r.y * 8, r.w * 8, r.h * 8))
                .collect(),
            Part::Encoder => tiles,
        };
        Ok(specs(rects))
    }

    fn output_info(&self, input: &ValueInfo) -> Result<ValueInfo, NodeError> {
        let (batch, _, h, w) = dims(self.part, input)?;
        Ok(match self.part {
            Part::Decoder => ValueInfo::Image(ImageInfo {
                batch,
                height: h * 8,
                width: w * 8,
                channels: 3,
            }),
            Part::Encoder => ValueInfo::Latent {
                batch,
                channels: self.latent_channels,
                height: h,
                width: w,
            },
        })
    }

    fn split(&self, input: &Value, chunk: &ChunkSpec) -> Result<Value, NodeError> {
        let tile = self.latent_tile(chunk)?;
        match self.part {
            Part::Decoder => {
                let latent = input
                    .as_latent()
                    .ok_or_else(|| NodeError::input("samples", "expected a LATENT"))?;
                let (_, _, h, w) = latent.dims4()?;
                let win = self.window(tile, h, w);
                let piece = latent.narrow(2, win.y, win.h)?.narrow(3, win.x, win.w)?;
                Ok(Value::latent(piece.contiguous()?))
            }
            Part::Encoder => {
                let image = input
                    .as_image()
                    .ok_or_else(|| NodeError::input("pixels", "expected an IMAGE"))?;
                let (_, ih, iw, _) = image.dims4()?;
                let win = self.window(tile, ih / 8, iw / 8);
                // The centred crop to whole latent pixels, then the window.
                let (oy, ox) = ((ih % 8) / 2, (iw % 8) / 2);
                let piece = image.narrow(1, oy + win.y * 8, win.h * 8)?.narrow(
                    2,
                    ox + win.x * 8,
                    win.w * 8,
                )?;
                Ok(Value::image(piece.contiguous()?))
            }
        }
    }

    fn process(
        &self,
        _input: &ValueInfo,
        _chunk: &ChunkSpec,
        piece: &Value,
    ) -> Result<Value, NodeError> {
        match self.part {
            Part::Decoder => {
                let latent = piece
                    .as_latent()
                    .ok_or_else(|| NodeError::input("samples", "expected a LATENT"))?;
                let rgb = self.run_net(latent)?;
                Ok(Value::image(
                    rgb.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?.contiguous()?,
                ))
            }
            Part::Encoder => {
                let image = piece
                    .as_image()
                    .ok_or_else(|| NodeError::input("pixels", "expected an IMAGE"))?;
                let x = image.narrow(3, 0, 3)?.permute((0, 3, 1, 2))?.contiguous()?;
                Ok(Value::latent(self.run_net(&x)?))
            }
        }
    }

    fn bind(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<Option<Arc<dyn ChunkedOp>>, NodeError> {
        Ok(Some(Arc::new(self.bind_to(side, weights)?)))
    }

    fn merger(&self, output: &ValueInfo) -> Result<Box<dyn Merger>, NodeError> {
        let (b, c, h, w, channels_last, scale) = match (self.part, output) {
            (Part::Decoder, ValueInfo::Image(i)) => (i.batch, 3, i.height, i.width, true, 8),
            (
                Part::Encoder,
                ValueInfo::Latent {
                    batch,
                    channels,
                    height,
                    width,
                },
            ) => (*batch, *channels, *height, *width, false, 1),
            _ => {
                return Err(NodeError::Other(format!(
                    "tiled VAE {:?} cannot make a {output:?}",
                    self.part
                )))
            }
        };
        Ok(Box::new(BlendMerger {
            dims: (b, c, h, w),
            channels_last,
            scale,
            overlap: (self.overlap / 8) * scale,
            op: self.unbound(),
            acc: vec![0.0; b * c * h * w],
            weight: vec![0.0; h * w],
        }))
    }

    fn chunk_memory(&self, input: &ValueInfo, chunk: &ChunkSpec) -> ChunkMemory {
        let (Ok((b, c, h, w)), Ok(tile)) = (dims(self.part, input), self.latent_tile(chunk)) else {
            return ChunkMemory::default();
        };
        let win = self.window(tile, h, w);
        let latent_px = (b * win.w * win.h) as u64;
        match self.part {
            Part::Decoder => ChunkMemory {
                piece: latent_px * c as u64 * 4,
                result: latent_px * 64 * 3 * 4,
                workspace: latent_px * self.per_px,
            },
            Part::Encoder => ChunkMemory {
                piece: latent_px * 64 * c as u64 * 4,
                result: latent_px * self.latent_channels as u64 * 4,
                workspace: latent_px * 64 * self.per_px,
            },
        }
    }
}

/// Accumulates weighted windows of the output and divides by the weights at the end.
struct BlendMerger {
    /// Output `(batch, channels, height, width)`.
    dims: (usize, usize, usize, usize),
    /// Image layout `[b, h, w, c]` (decode) or latent layout `[b, c, h, w]` (encode).
    channels_last: bool,
    /// Output pixels per latent pixel.
    scale: usize,
    /// Blend band in output pixels.
    overlap: usize,
    op: TiledVae,
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
        let (b, c, oh, ow) = self.dims;
        let k = self.scale;
        let win = self.op.window(self.op.latent_tile(chunk)?, oh / k, ow / k);
        let (x0, y0, ww, wh) = (win.x * k, win.y * k, win.w * k, win.h * k);
        let t = part
            .as_tensor()
            .ok_or_else(|| NodeError::Other("a tile's result is not a tensor".into()))?;
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        if data.len() != b * c * wh * ww {
            return Err(NodeError::Other(format!(
                "window {ww}x{wh} has {} values",
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
                    for ch in 0..c {
                        let (src, dst) = if self.channels_last {
                            (
                                ((bi * wh + y) * ww + x) * c + ch,
                                (bi * oh * ow + o) * c + ch,
                            )
                        } else {
                            (
                                ((bi * c + ch) * wh + y) * ww + x,
                                (bi * c + ch) * oh * ow + o,
                            )
                        };
                        self.acc[dst] += wgt * data[src];
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Value, NodeError> {
        let (b, c, oh, ow) = self.dims;
        let mut out = self.acc;
        if self.weight.iter().any(|w| *w <= 0.0) {
            return Err(NodeError::Other("an output pixel was never covered".into()));
        }
        for bi in 0..b {
            for ch in 0..c {
                for (o, w) in self.weight.iter().enumerate() {
                    let d = if self.channels_last {
                        (bi * oh * ow + o) * c + ch
                    } else {
                        (bi * c + ch) * oh * ow + o
                    };
                    out[d] /= w;
                }
            }
        }
        let dev = &candle_core::Device::Cpu;
        Ok(if self.channels_last {
            Value::image(Tensor::from_vec(out, (b, oh, ow, c), dev)?)
        } else {
            Value::latent(Tensor::from_vec(out, (b, c, oh, ow), dev)?)
        })
    }
}
