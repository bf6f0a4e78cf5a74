//! Audio files and sample-rate conversion: WAV read/write with hound ([`WavReader`],
//! [`WavWriter`]), any audio ffmpeg reads ([`AudioReader`]), and a streaming high-quality
//! resampler on rubato ([`Resampler`]).
//!
//! Invariants: audio crosses this API as planar `f32` (`[channel][frame]`, every channel the
//! same length), nominally in `[-1, 1]`; readers stream, holding at most one decoded packet
//! plus the frames asked for, whatever the file's length; a read of `max_frames` returns at
//! most that many frames and returns empty channels only at the end of the stream.
//!
//! ```
//! use nova_media::audio::Resampler;
//! # fn main() -> Result<(), nova_media::MediaError> {
//! let mut rs = Resampler::new(48_000, 44_100, 2)?;
//! let mut out = rs.process(&[vec![0.0; 4_000], vec![0.0; 4_000]])?;
//! for (o, rest) in out.iter_mut().zip(rs.process(&[vec![0.0; 800], vec![0.0; 800]])?) {
//!     o.extend(rest);
//! }
//! for (o, rest) in out.iter_mut().zip(rs.flush()?) {
//!     o.extend(rest);
//! }
//! assert_eq!(out[0].len(), 4_410); // 4800 frames at 48 kHz = 0.1 s = 4410 at 44.1 kHz
//! # Ok(())
//! # }
//! ```

mod decode;
mod resample;
mod wav;

pub use decode::AudioReader;
pub use resample::Resampler;
pub use wav::{SampleFormat, WavReader, WavWriter};

use crate::error::MediaError;
use std::path::Path;

/// Sample rate and channel count of an audio stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AudioSpec {
    pub sample_rate: u32,
    pub channels: u16,
}

/// A streaming source of planar f32 audio.
pub trait AudioSource: Send {
    fn spec(&self) -> AudioSpec;
    /// Up to `max_frames` frames, planar; empty channels at the end of the stream.
    fn read(&mut self, max_frames: usize) -> Result<Vec<Vec<f32>>, MediaError>;
    /// Total length in frames, where the file states it exactly.
    fn len_frames(&self) -> Option<u64>;
    /// The container's estimate of the duration in seconds, where it gives one.
    fn duration_s(&self) -> Option<f64> {
        None
    }
}

/// Opens any audio file: `.wav` through hound (fast path; WAV codecs hound lacks, such as
/// A-law or ADPCM, fall back to ffmpeg), everything else through ffmpeg.
pub fn open_any(path: &Path) -> Result<Box<dyn AudioSource>, MediaError> {
    let is_wav = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    if is_wav {
        match WavReader::open(path) {
            Ok(r) => return Ok(Box::new(r)),
            Err(MediaError::Unsupported { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Box::new(AudioReader::open(path)?))
}

/// Checks that planar audio has `channels` channels of equal length; returns that length.
pub(crate) fn check_planar(
    path: &str,
    planar: &[Vec<f32>],
    channels: usize,
) -> Result<usize, MediaError> {
    if planar.len() != channels {
        return Err(MediaError::Mismatch {
            path: path.to_string(),
            reason: format!("{} channels given, the stream has {channels}", planar.len()),
        });
    }
    let n = planar.first().map_or(0, Vec::len);
    if let Some((c, ch)) = planar.iter().enumerate().find(|(_, ch)| ch.len() != n) {
        return Err(MediaError::Mismatch {
            path: path.to_string(),
            reason: format!("channel {c} has {} frames, channel 0 has {n}", ch.len()),
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planar_checks_name_the_offending_channel() {
        assert_eq!(
            check_planar("x", &[vec![0.0; 3], vec![0.0; 3]], 2).unwrap(),
            3
        );
        let e = check_planar("x", &[vec![0.0; 3], vec![0.0; 2]], 2).unwrap_err();
        assert!(e.to_string().contains("channel 1 has 2 frames"), "{e}");
        let e = check_planar("x", &[vec![0.0; 3]], 2).unwrap_err();
        assert!(matches!(e, MediaError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn sources_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<WavReader>();
        is_send::<WavWriter>();
        is_send::<AudioReader>();
        is_send::<Resampler>();
        is_send::<Box<dyn AudioSource>>();
    }
}
