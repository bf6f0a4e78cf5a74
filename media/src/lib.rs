//! `nova-media`: codecs and containers, with no knowledge of the engine.
//!
//! - [`image`]: PNG and JPEG decode (the `image` crate, EXIF orientation applied as ComfyUI
//!   does) and PNG encode with text chunks (the `png` crate, so the workflow can be embedded
//!   in saved images as ComfyUI does).
//! - [`video`]: probe, streaming decode to RGB24 and streaming encode from RGB24 (H.264,
//!   H.265, VP9, AV1, ProRes, FFV1, MPEG-4 Part 2 in MP4/MKV/WebM/MOV, optionally with an AAC
//!   or Opus audio track).
//! - [`audio`]: WAV read/write, reading any audio ffmpeg decodes, and streaming sample-rate
//!   conversion.
//!
//! Errors are one type, [`MediaError`], naming the file and the problem (and, for truncated
//! data, the frame or byte where it stopped); nothing here panics on bad input. Readers and
//! writers stream: memory is bounded by a few frames, never by the file's length.
//!
//! Dependencies, and why each:
//! - `ffmpeg-next` (9.x, against the system FFmpeg: 5.1 on Debian 12): the codecs and
//!   containers users bring are FFmpeg's; only `codec`, `format`, `software-scaling` and
//!   `software-resampling` are enabled, so libavfilter/libavdevice are not linked.
//! - `hound` (3.5): WAV without FFmpeg, the fast path for the format NOVA's audio nodes
//!   read and write most.
//! - `rubato` (5.x, sinc only: the FFT resampler feature is off): streaming band-limited
//!   resampling in pure Rust whose delay is known exactly, so output is trimmed to line up
//!   with its input (rubato 5.1 tabulates its sinc one 1/256-sample step off; `Resampler`
//!   cancels that, see its module docs).
//! - `image`, `png`: still images (above); `thiserror`: [`MediaError`].
//!
//! Building needs FFmpeg's development headers and libclang (bindgen); `scripts/setup.sh`
//! installs them. FFmpeg's messages go through NOVA's log (`nova: ffmpeg <level>: ...` on
//! stderr) at the level `NOVA_FFMPEG_LOG` chooses (`quiet`, `error` — the default —,
//! `warning`, `info`, `verbose`, `debug`), so encoder statistics do not flood stderr and
//! nothing of FFmpeg's reaches the terminal unannounced.

pub mod audio;
mod error;
mod ff;
pub mod image;
pub mod video;

pub use crate::error::{Location, MediaError, StreamKind};
pub use crate::image::{
    decode_image, encode_png, png_streamable, probe_image, DecodedImage, PngRowReader, PngRows,
};

/// What an audio or video file is, from its container's header (FFmpeg's probe): no packet
/// is decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// FFmpeg's demuxer names, comma-separated as FFmpeg gives them (`mov,mp4,m4a,3gp,3g2,mj2`,
    /// `matroska,webm`, `wav`, `flac`, `ogg`, `mp3`).
    pub format: String,
    /// Whether it has a video stream (an attached cover picture does not count).
    pub video: bool,
    /// Whether it has an audio stream.
    pub audio: bool,
}

/// Reads a media file's container header: its format and which kinds of stream it holds.
/// A file FFmpeg cannot make sense of is [`MediaError::Open`].
pub fn probe_container(path: &std::path::Path) -> Result<Container, MediaError> {
    use ffmpeg_next::media::Type;
    let input = ff::open_input(path)?;
    let format = input.format().name().to_string();
    let is = |t: Type| {
        input.streams().any(|s| {
            s.parameters().medium() == t
                && (t != Type::Video
                    || !s
                        .disposition()
                        .contains(ffmpeg_next::format::stream::Disposition::ATTACHED_PIC))
        })
    };
    Ok(Container {
        format,
        video: is(Type::Video),
        audio: is(Type::Audio),
    })
}
