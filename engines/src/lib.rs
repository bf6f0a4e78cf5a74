//! `nova-engines`: how media is cut into chunks and put back together.
//!
//! - [`image`]: the ImageEngine — tile grids, halos sized from each kernel's receptive field,
//!   border handling that makes a tile's halo equal to what the whole image would see, and
//!   tile merging. It implements `nova_dataflow::ChunkedOp` for any [`image::TileKernel`], so
//!   an image operator writes only its per-region kernel.
//!
//! Video windows and audio chunks will join here behind the same `ChunkedOp` interface and the
//! same telemetry schema.

pub mod image;

pub use image::{specs, tile_grid, Border, TileKernel, TiledImage, Window};
