//! Video files: probing, streaming decode to RGB24 ([`VideoReader`]) and streaming encode from
//! RGB24 ([`VideoWriter`]), through FFmpeg (libavformat/libavcodec/libswscale).
//!
//! Invariants: readers and writers hold O(1) frames whatever the file's length (one demuxed
//! packet, the codec's own reorder/reference frames, one conversion frame); frames are packed
//! RGB24, row-major, `width * height * 3` bytes; timestamps are seconds (`f64`) from the
//! stream's start and are carried through both directions unchanged (no frame-rate
//! resampling, no dropped or duplicated frames); colour is converted with the stream's own
//! YUV matrix and range (BT.709 limited range is what the writer uses and tags).
//!
//! ```
//! use nova_media::video::{EncodeOptions, Rational, VideoCodec, VideoReader, VideoWriter};
//! # fn main() -> Result<(), nova_media::MediaError> {
//! let path = std::env::temp_dir().join(format!("nova-media-doc-{}.mp4", std::process::id()));
//! let opts = EncodeOptions::new(VideoCodec::H264, 64, 48, Rational::new(25, 1));
//! let mut writer = VideoWriter::create(&path, &opts)?;
//! for i in 0..10u8 {
//!     writer.write_frame(&vec![i * 20; 64 * 48 * 3], f64::from(i) / 25.0)?;
//! }
//! writer.finish()?;
//!
//! let mut reader = VideoReader::open(&path)?;
//! assert_eq!(reader.info().frames, Some(10));
//! while let Some(frame) = reader.next_frame()? {
//!     assert_eq!(frame.rgb.len(), 64 * 48 * 3);
//!     assert!((frame.pts_s - frame.index as f64 / 25.0).abs() < 1e-3);
//! }
//! # std::fs::remove_file(&path).ok();
//! # Ok(())
//! # }
//! ```

mod codec;
mod reader;
mod writer;

pub use codec::VideoCodec;
pub use reader::VideoReader;
pub use writer::{EncodeOptions, VideoWriter};

use crate::audio::AudioSpec;
use crate::error::MediaError;
use std::path::Path;

/// A frame rate (or any ratio) as FFmpeg gives it: `num / den`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rational {
    pub num: i32,
    pub den: i32,
}

impl Rational {
    pub const fn new(num: i32, den: i32) -> Self {
        Rational { num, den }
    }

    /// The ratio as a float; 0 when `den` is 0 (FFmpeg's "unknown").
    pub fn as_f64(self) -> f64 {
        if self.den == 0 {
            0.0
        } else {
            self.num as f64 / self.den as f64
        }
    }

    /// A usable frame rate: both parts positive.
    pub(crate) fn is_positive(self) -> bool {
        self.num > 0 && self.den > 0
    }
}

impl From<ffmpeg_next::Rational> for Rational {
    fn from(r: ffmpeg_next::Rational) -> Self {
        Rational::new(r.numerator(), r.denominator())
    }
}

impl From<Rational> for ffmpeg_next::Rational {
    fn from(r: Rational) -> Self {
        ffmpeg_next::Rational::new(r.num, r.den)
    }
}

/// What a video file says about itself, read from the container and codec headers.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoInfo {
    pub width: u32,
    pub height: u32,
    /// Average frame rate if the container states one, else the stream's base rate.
    pub fps: Rational,
    /// Frame count, if the container says (MP4/MOV do; Matroska/WebM usually do not).
    pub frames: Option<u64>,
    /// Duration in seconds, from the stream or else the container, if either says.
    pub duration_s: Option<f64>,
    /// FFmpeg's codec name, as `ffprobe` prints it (`h264`, `hevc`, `vp9`, `av1`, ...).
    pub codec: String,
    /// The best audio stream's rate and channel count, if the file has audio ffmpeg can decode.
    pub audio: Option<AudioSpec>,
}

/// One decoded frame in packed RGB24.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// 0-based position in the order the decoder delivers frames (presentation order).
    pub index: u64,
    /// Presentation time in seconds from the stream's start, as stored in the file.
    pub pts_s: f64,
    pub width: u32,
    pub height: u32,
    /// `height` rows of `width * 3` bytes, R G B.
    pub rgb: Vec<u8>,
}

/// Reads a video file's headers: size, rate, length, codec, audio track. Decodes no frames.
pub fn probe(path: &Path) -> Result<VideoInfo, MediaError> {
    reader::probe(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rational_converts_and_guards_zero_denominator() {
        assert_eq!(Rational::new(30000, 1001).as_f64(), 30000.0 / 1001.0);
        assert_eq!(Rational::new(1, 0).as_f64(), 0.0);
        let ff: ffmpeg_next::Rational = Rational::new(24, 1).into();
        assert_eq!(Rational::from(ff), Rational::new(24, 1));
        assert!(!Rational::new(0, 1).is_positive());
    }

    #[test]
    fn frames_and_readers_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<Frame>();
        is_send::<VideoReader>();
        is_send::<VideoWriter>();
    }
}
