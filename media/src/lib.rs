//! `nova-media`: codecs and containers, with no knowledge of the engine.
//!
//! - [`image`]: PNG and JPEG decode (the `image` crate, EXIF orientation applied as ComfyUI
//!   does) and PNG encode with text chunks (the `png` crate, so the workflow can be embedded
//!   in saved images as ComfyUI does).
//!
//! Errors name the file and the problem; nothing here panics on bad input.

pub mod image;

pub use crate::image::{decode_image, encode_png, probe_image, DecodedImage, MediaError};
