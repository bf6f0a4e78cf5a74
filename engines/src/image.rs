//! The ImageEngine: tiles with halos for local image operators.
//!
//! A [`TileKernel`] says, for any rectangle of its output, which window of its input it reads
//! (its receptive field, possibly reaching past the image edge) and how the edge is filled
//! ([`Border`]). [`TiledImage`] turns such a kernel into a `ChunkedOp`: it plans a tile grid,
//! extracts each tile's window (filling out-of-image pixels exactly as the whole-image kernel
//! would), and pastes results back.
//!
//! Invariant: the untiled run is the one-tile case of the same code path
//! ([`TiledImage::run_whole`]), and kernels compute each output pixel from its window with an
//! arithmetic sequence that does not depend on where the window was cut, so a tiled run
//! equals the untiled run bit for bit.

use candle_core::{Device, Tensor};
use nova_dataflow::{
    ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec, ChunkedOp, ImageInfo, Inputs, LocalOp, Merger,
    NodeError, Rect, Value, ValueInfo, WeightContext,
};
use std::sync::Arc;

/// How pixels outside the image are filled when a window reaches past an edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Border {
    /// Mirror without repeating the edge pixel (PyTorch's `reflect` padding).
    Reflect,
    /// Repeat the edge pixel.
    Clamp,
}

/// A window of input pixels: origin (may be negative) and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub x: isize,
    pub y: isize,
    pub w: usize,
    pub h: usize,
}

impl Window {
    /// The window of columns `x0..x1` and rows `y0..y1` (inside the image).
    pub fn spanning(x0: usize, y0: usize, x1: usize, y1: usize) -> Window {
        Window {
            x: x0 as isize,
            y: y0 as isize,
            w: x1.saturating_sub(x0),
            h: y1.saturating_sub(y0),
        }
    }

    /// The window `out` grown by `halo` pixels on every side.
    pub fn around(out: Rect, halo: usize) -> Window {
        Window {
            x: out.x as isize - halo as isize,
            y: out.y as isize - halo as isize,
            w: out.w + 2 * halo,
            h: out.h + 2 * halo,
        }
    }
}

/// A local image operator, described by its receptive field and its per-window kernel.
pub trait TileKernel: Send + Sync + 'static {
    /// Output `(height, width)` for an input of `(height, width)`.
    fn output_size(&self, height: usize, width: usize) -> (usize, usize);

    /// The input window that output rectangle `out` depends on.
    fn window(&self, out: Rect, height: usize, width: usize) -> Window;

    /// How out-of-image pixels in a window are filled.
    fn border(&self) -> Border {
        Border::Reflect
    }

    /// Computes output rectangle `out` (`[batch, out.h, out.w, channels]`) from `source`, the
    /// pixels of `window` (`[batch, window.h, window.w, channels]`).
    fn apply(
        &self,
        source: &Tensor,
        window: Window,
        out: Rect,
        input_height: usize,
        input_width: usize,
    ) -> candle_core::Result<Tensor>;

    /// Working memory as a multiple of the window and output bytes.
    fn workspace_factor(&self) -> f64 {
        2.0
    }

    /// Bytes of kernel temporaries for one window and output rectangle of `batch` images of
    /// `channels` channels; defaults to [`Self::workspace_factor`] times the data.
    fn workspace_bytes(&self, window: Window, out: Rect, batch: usize, channels: usize) -> u64 {
        let px = (batch * channels * 4) as u64;
        let data = (window.w * window.h + out.area()) as u64 * px;
        (data as f64 * self.workspace_factor()) as u64
    }

    /// This kernel bound to the node's other inputs (a model) at run time; `None` if it
    /// needs none.
    fn bind(
        &self,
        _side: &Inputs<Value>,
        _weights: &WeightContext,
    ) -> Result<Option<Self>, NodeError>
    where
        Self: Sized,
    {
        Ok(None)
    }
}

/// Cuts a `width` x `height` image into a row-major grid of tiles of at most `tile_w` x
/// `tile_h`, with sizes balanced so that no tile is a sliver.
pub fn tile_grid(width: usize, height: usize, tile_w: usize, tile_h: usize) -> Vec<Rect> {
    let spans = |len: usize, tile: usize| -> Vec<(usize, usize)> {
        let tile = tile.max(1);
        let n = len.div_ceil(tile).max(1);
        (0..n)
            .map(|i| (i * len / n, (i + 1) * len / n - i * len / n))
            .filter(|(_, l)| *l > 0)
            .collect()
    };
    let cols = spans(width, tile_w);
    let rows = spans(height, tile_h);
    rows.iter()
        .flat_map(|&(y, h)| cols.iter().map(move |&(x, w)| Rect::new(x, y, w, h)))
        .collect()
}

/// Maps a coordinate outside `0..n` into it.
fn fold(i: isize, n: usize, border: Border) -> usize {
    let n = n as isize;
    if n <= 1 {
        return 0;
    }
    match border {
        Border::Clamp => i.clamp(0, n - 1) as usize,
        Border::Reflect => {
            let period = 2 * (n - 1);
            let m = i.rem_euclid(period);
            (if m >= n { period - m } else { m }) as usize
        }
    }
}

/// Extracts `window` from an image `[batch, height, width, channels]`, filling pixels outside
/// the image by `border`.
pub fn extract(image: &Tensor, window: Window, border: Border) -> candle_core::Result<Tensor> {
    let (_, h, w, _) = image.dims4()?;
    let axis = |t: Tensor, dim: usize, start: isize, len: usize, n: usize| {
        if start >= 0 && start as usize + len <= n {
            t.narrow(dim, start as usize, len)
        } else {
            let idx: Vec<u32> = (0..len as isize)
                .map(|i| fold(start + i, n, border) as u32)
                .collect();
            let idx = Tensor::from_vec(idx, len, image.device())?;
            t.contiguous()?.index_select(&idx, dim)
        }
    };
    let rows = axis(image.clone(), 1, window.y, window.h, h)?;
    axis(rows, 2, window.x, window.w, w)
}

/// The rows (or columns) of an axis of length `n` that the coordinates `start..start + len`
/// read once folded into it by `border`: the smallest span covering them.
fn folded_span(start: isize, len: usize, n: usize, border: Border) -> (usize, usize) {
    if start >= 0 && start as usize + len <= n {
        return (start as usize, len);
    }
    let (mut lo, mut hi) = (usize::MAX, 0usize);
    for i in 0..len as isize {
        let f = fold(start + i, n, border);
        lo = lo.min(f);
        hi = hi.max(f);
    }
    if lo > hi {
        (0, 0)
    } else {
        (lo, hi - lo + 1)
    }
}

/// The part of the image (inside it) that `window` reads once its out-of-image pixels are
/// folded in by `border`.
pub fn window_hull(window: Window, height: usize, width: usize, border: Border) -> Rect {
    let (x, w) = folded_span(window.x, window.w, width, border);
    let (y, h) = folded_span(window.y, window.h, height, border);
    Rect::new(x, y, w, h)
}

/// Extracts `window` of an image of `height` x `width` from `have`, the part `at` of it,
/// filling pixels outside the image by `border` exactly as [`extract`] does from the whole
/// image. `at` must cover [`window_hull`] of the window.
pub fn extract_within(
    have: &Tensor,
    at: Rect,
    window: Window,
    height: usize,
    width: usize,
    border: Border,
) -> candle_core::Result<Tensor> {
    let axis = |t: Tensor, dim: usize, start: isize, len: usize, n: usize, origin: usize| {
        let inside = start >= 0 && start as usize + len <= n;
        if inside && start as usize >= origin {
            t.narrow(dim, start as usize - origin, len)
        } else {
            let idx: Vec<u32> = (0..len as isize)
                .map(|i| fold(start + i, n, border).saturating_sub(origin) as u32)
                .collect();
            let idx = Tensor::from_vec(idx, len, have.device())?;
            t.contiguous()?.index_select(&idx, dim)
        }
    };
    let rows = axis(have.clone(), 1, window.y, window.h, height, at.y)?;
    axis(rows, 2, window.x, window.w, width, at.x)
}

/// A [`TileKernel`] run tile by tile: the `ChunkedOp` of a local image operator.
pub struct TiledImage<K> {
    kernel: K,
}

fn image_info(info: &ValueInfo) -> Result<ImageInfo, NodeError> {
    info.image()
        .ok_or_else(|| NodeError::Other("tiled image operator needs an IMAGE input".into()))
}

fn image_of(v: &Value) -> Result<&Tensor, NodeError> {
    v.as_image()
        .ok_or_else(|| NodeError::Other("tiled image operator needs an IMAGE input".into()))
}

impl<K: TileKernel> TiledImage<K> {
    /// Wraps a kernel.
    pub fn new(kernel: K) -> Self {
        TiledImage { kernel }
    }

    /// The kernel.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Runs the kernel on the whole image: the single-tile case of the tiled path.
    pub fn run_whole(&self, image: &Tensor) -> Result<Tensor, NodeError> {
        let (_, h, w, _) = image.dims4()?;
        let (oh, ow) = self.kernel.output_size(h, w);
        let out = Rect::new(0, 0, ow, oh);
        let window = self.kernel.window(out, h, w);
        let source = extract(image, window, self.kernel.border())?;
        Ok(self.kernel.apply(&source, window, out, h, w)?)
    }

    fn input_dims(&self, chunk: &ChunkSpec) -> Result<Rect, NodeError> {
        chunk
            .rect()
            .ok_or_else(|| NodeError::Other("image chunk without a tile rectangle".into()))
    }
}

impl<K: TileKernel> ChunkedOp for TiledImage<K> {
    fn plan(&self, input: &ValueInfo, size: ChunkSize) -> Result<Vec<ChunkSpec>, NodeError> {
        let i = image_info(input)?;
        let (oh, ow) = self.kernel.output_size(i.height, i.width);
        let ChunkSize::Tile { width, height } = size else {
            return Err(NodeError::Other(format!(
                "image tiles cannot be cut as {size:?}"
            )));
        };
        Ok(specs(tile_grid(ow, oh, width, height)))
    }

    fn output_info(&self, input: &ValueInfo) -> Result<ValueInfo, NodeError> {
        let i = image_info(input)?;
        let (height, width) = self.kernel.output_size(i.height, i.width);
        Ok(ValueInfo::Image(ImageInfo { height, width, ..i }))
    }

    fn split(&self, input: &Value, chunk: &ChunkSpec) -> Result<Value, NodeError> {
        let image = image_of(input)?;
        let (_, h, w, _) = image.dims4()?;
        let out = self.input_dims(chunk)?;
        let window = self.kernel.window(out, h, w);
        let source = extract(image, window, self.kernel.border())?;
        Ok(Value::image(source.contiguous()?))
    }

    fn process(
        &self,
        input: &ValueInfo,
        chunk: &ChunkSpec,
        piece: &Value,
    ) -> Result<Value, NodeError> {
        let out = self.input_dims(chunk)?;
        let i = image_info(input)?;
        let (h, w) = (i.height, i.width);
        let window = self.kernel.window(out, h, w);
        let source = image_of(piece)?;
        Ok(Value::image(self.kernel.apply(source, window, out, h, w)?))
    }

    fn subdivide(&self, chunk: &ChunkSpec, size: ChunkSize) -> Vec<ChunkSpec> {
        let (Some(rect), ChunkSize::Tile { width, height }) = (chunk.rect(), size) else {
            return vec![*chunk];
        };
        let subs: Vec<Rect> = tile_grid(rect.w, rect.h, width, height)
            .into_iter()
            .map(|r| Rect::new(rect.x + r.x, rect.y + r.y, r.w, r.h))
            .collect();
        specs(subs)
    }

    fn process_subdivided(
        &self,
        input: &ValueInfo,
        chunk: &ChunkSpec,
        piece: &Value,
        subs: &[ChunkSpec],
    ) -> Result<Value, NodeError> {
        let out = self.input_dims(chunk)?;
        let i = image_info(input)?;
        let (h, w) = (i.height, i.width);
        let window = self.kernel.window(out, h, w);
        let source = image_of(piece)?;
        let mut merger = ImageMerger::new(ImageInfo {
            height: out.h,
            width: out.w,
            ..i
        });
        for sub in subs {
            let r = self.input_dims(sub)?;
            // A sub-rectangle reads a sub-window of the chunk's window (receptive fields are
            // monotone), so its pixels are a plain crop of the piece.
            let sw = self.kernel.window(r, h, w);
            let (dx, dy) = (sw.x - window.x, sw.y - window.y);
            if dx < 0 || dy < 0 || dx as usize + sw.w > window.w || dy as usize + sw.h > window.h {
                return Err(NodeError::Other(format!(
                    "sub-tile {r:?} reads outside its tile's window"
                )));
            }
            let src = source
                .narrow(1, dy as usize, sw.h)?
                .narrow(2, dx as usize, sw.w)?;
            let part = self.kernel.apply(&src, sw, r, h, w)?;
            let local = Rect::new(r.x - out.x, r.y - out.y, r.w, r.h);
            merger.paste(local, &part)?;
        }
        Box::new(merger).finish()
    }

    fn merger(&self, output: &ValueInfo) -> Result<Box<dyn Merger>, NodeError> {
        Ok(Box::new(ImageMerger::new(image_info(output)?)))
    }

    fn chunk_memory(&self, input: &ValueInfo, chunk: &ChunkSpec) -> ChunkMemory {
        let (Some(i), Some(out)) = (input.image(), chunk.rect()) else {
            return ChunkMemory::default();
        };
        let window = self.kernel.window(out, i.height, i.width);
        let px_bytes = (i.batch * i.channels * 4) as u64;
        let piece = (window.w * window.h) as u64 * px_bytes;
        let result = out.area() as u64 * px_bytes;
        ChunkMemory {
            piece,
            result,
            workspace: self
                .kernel
                .workspace_bytes(window, out, i.batch, i.channels),
        }
    }

    fn bind(
        &self,
        side: &Inputs<Value>,
        weights: &WeightContext,
    ) -> Result<Option<Arc<dyn ChunkedOp>>, NodeError> {
        Ok(self
            .kernel
            .bind(side, weights)?
            .map(|k| Arc::new(TiledImage::new(k)) as Arc<dyn ChunkedOp>))
    }

    fn local(&self) -> Option<&dyn LocalOp> {
        Some(self)
    }
}

fn tile_of(region: &ChunkRegion) -> Result<Rect, NodeError> {
    match region {
        ChunkRegion::Tile { rect } => Ok(*rect),
        other => Err(NodeError::Other(format!(
            "an image stage was handed {other:?}, not a tile"
        ))),
    }
}

impl<K: TileKernel> LocalOp for TiledImage<K> {
    fn input_region(&self, input: &ValueInfo, out: &ChunkRegion) -> Result<ChunkRegion, NodeError> {
        let i = image_info(input)?;
        let window = self.kernel.window(tile_of(out)?, i.height, i.width);
        Ok(ChunkRegion::Tile {
            rect: window_hull(window, i.height, i.width, self.kernel.border()),
        })
    }

    fn crop(&self, input: &Value, region: &ChunkRegion) -> Result<Value, NodeError> {
        let r = tile_of(region)?;
        let image = image_of(input)?;
        Ok(Value::image(
            image
                .narrow(1, r.y, r.h)?
                .narrow(2, r.x, r.w)?
                .contiguous()?,
        ))
    }

    fn process_within(
        &self,
        input: &ValueInfo,
        out: &ChunkRegion,
        have_region: &ChunkRegion,
        have: &Value,
    ) -> Result<Value, NodeError> {
        let i = image_info(input)?;
        let (h, w) = (i.height, i.width);
        let out = tile_of(out)?;
        let at = tile_of(have_region)?;
        let window = self.kernel.window(out, h, w);
        let hull = window_hull(window, h, w, self.kernel.border());
        if hull.x < at.x
            || hull.y < at.y
            || hull.x + hull.w > at.x + at.w
            || hull.y + hull.h > at.y + at.h
        {
            return Err(NodeError::Other(format!(
                "tile {out:?} reads {hull:?} of its input, but its piece covers {at:?}"
            )));
        }
        let source = extract_within(image_of(have)?, at, window, h, w, self.kernel.border())?;
        Ok(Value::image(self.kernel.apply(&source, window, out, h, w)?))
    }

    fn region_memory(
        &self,
        input: &ValueInfo,
        out: &ChunkRegion,
        have_region: &ChunkRegion,
    ) -> ChunkMemory {
        let (Some(i), Ok(out), Ok(at)) = (input.image(), tile_of(out), tile_of(have_region)) else {
            return ChunkMemory::default();
        };
        let window = self.kernel.window(out, i.height, i.width);
        let px_bytes = (i.batch * i.channels * 4) as u64;
        ChunkMemory {
            piece: at.area() as u64 * px_bytes,
            result: out.area() as u64 * px_bytes,
            // The extracted window, and the kernel's own temporaries.
            workspace: (window.w * window.h) as u64 * px_bytes
                + self
                    .kernel
                    .workspace_bytes(window, out, i.batch, i.channels),
        }
    }
}

/// Chunk specs for rectangles, in order.
pub fn specs(rects: Vec<Rect>) -> Vec<ChunkSpec> {
    let count = rects.len() as u32;
    rects
        .into_iter()
        .enumerate()
        .map(|(index, rect)| ChunkSpec {
            index: index as u32,
            count,
            region: ChunkRegion::Tile { rect },
        })
        .collect()
}

/// Pastes tiles into an image buffer as they arrive.
struct ImageMerger {
    info: ImageInfo,
    buf: Vec<f32>,
}

impl ImageMerger {
    fn new(info: ImageInfo) -> Self {
        ImageMerger {
            info,
            buf: vec![0f32; info.batch * info.height * info.width * info.channels],
        }
    }

    fn paste(&mut self, rect: Rect, t: &Tensor) -> Result<(), NodeError> {
        let ImageInfo {
            batch: b,
            height: oh,
            width: ow,
            channels: c,
        } = self.info;
        if rect.x + rect.w > ow || rect.y + rect.h > oh {
            return Err(NodeError::Other(format!(
                "tile {rect:?} lies outside the {ow}x{oh} output"
            )));
        }
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        if data.len() != b * rect.h * rect.w * c {
            return Err(NodeError::Other(format!(
                "tile {rect:?} has {} values, expected {}",
                data.len(),
                b * rect.h * rect.w * c
            )));
        }
        let row = rect.w * c;
        for bi in 0..b {
            for y in 0..rect.h {
                let src = (bi * rect.h + y) * row;
                let dst = ((bi * oh + rect.y + y) * ow + rect.x) * c;
                self.buf[dst..dst + row].copy_from_slice(&data[src..src + row]);
            }
        }
        Ok(())
    }
}

impl Merger for ImageMerger {
    fn add(&mut self, chunk: &ChunkSpec, part: Value) -> Result<(), NodeError> {
        let rect = chunk
            .rect()
            .ok_or_else(|| NodeError::Other("image chunk without a tile rectangle".into()))?;
        self.paste(rect, image_of(&part)?)
    }

    fn finish(self: Box<Self>) -> Result<Value, NodeError> {
        let i = self.info;
        Ok(Value::image(Tensor::from_vec(
            self.buf,
            (i.batch, i.height, i.width, i.channels),
            &Device::Cpu,
        )?))
    }
}
