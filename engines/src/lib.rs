//! `nova-engines`: how media is cut into chunks and put back together, behind the one
//! `nova_dataflow::ChunkedOp` interface and the one event schema.
//!
//! - [`image`]: the ImageEngine — tile grids, halos sized from each kernel's receptive field,
//!   border handling that makes a tile's halo equal to what the whole image would see, and
//!   tile merging. It implements `ChunkedOp` for any [`image::TileKernel`], so an image
//!   operator writes only its per-region kernel.
//! - [`video`]: the VideoEngine — frame windows with overlap, decoding in order, a temporal
//!   cache of processed windows, stitching with cross-fades into a frame sink.
//! - [`audio`]: the AudioEngine — time chunks pulled in order through stateful operators, and
//!   STFT chunks whose overlap-add equals whole-signal processing.
//!
//! Dependencies: `nova-dataflow`, `candle-core` (tensors), `realfft` (the real FFT under the
//! STFT; already in the build through `rubato`, and the field's standard FFT).

pub mod audio;
pub mod image;
pub mod video;

pub use image::{specs, tile_grid, Border, TileKernel, TiledImage, Window};
