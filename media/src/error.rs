//! `MediaError`: the one error type of `nova-media`, for images, video and audio alike.
//!
//! Invariants: every variant names the file (`path`, as the caller gave it) and says the
//! problem in `reason` in words a user can act on; [`MediaError::Truncated`] also says where
//! the data stopped making sense (frame index and/or byte offset, whichever is known). Nothing
//! in this crate panics on bad input: every failure of ffmpeg, hound or rubato becomes one of
//! these values.

use std::fmt;
use std::path::Path;

/// Which kind of stream a file lacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Video,
    Audio,
}

impl StreamKind {
    fn missing(self) -> &'static str {
        match self {
            StreamKind::Video => "no video stream",
            StreamKind::Audio => "no audio stream",
        }
    }
}

/// Where in a file the data ended or stopped decoding, as far as it is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// 0-based index of the first frame (video frame, or audio sample frame) that is missing.
    pub frame: Option<u64>,
    /// Byte offset in the file where reading failed.
    pub byte: Option<u64>,
}

impl Location {
    pub fn frame(frame: u64) -> Self {
        Location {
            frame: Some(frame),
            byte: None,
        }
    }

    pub fn with_byte(self, byte: Option<u64>) -> Self {
        Location { byte, ..self }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.frame, self.byte) {
            (Some(fr), Some(b)) => write!(f, "at frame {fr} (byte {b})"),
            (Some(fr), None) => write!(f, "at frame {fr}"),
            (None, Some(b)) => write!(f, "at byte {b}"),
            (None, None) => write!(f, "at an unknown position"),
        }
    }
}

/// Why a media file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The file does not exist, cannot be opened, or is not a container ffmpeg recognises.
    #[error("{path}: cannot open: {reason}")]
    Open { path: String, reason: String },
    /// The file opened but has no stream of the kind asked for.
    #[error("{path}: {}", kind.missing())]
    NoStream { path: String, kind: StreamKind },
    /// The codec, container, sample format or option is not supported here (named in `reason`).
    #[error("{path}: unsupported: {reason}")]
    Unsupported { path: String, reason: String },
    /// The file ends early or its data is corrupt from `at` on.
    #[error("{path}: truncated or corrupt {at}: {reason}")]
    Truncated {
        path: String,
        at: Location,
        reason: String,
    },
    /// A zero-length file, or a stream with nothing in it where something is required.
    #[error("{path}: empty: {reason}")]
    Empty { path: String, reason: String },
    /// Data handed in does not match what the stream was set up for (frame size, channels, ...).
    #[error("{path}: mismatch: {reason}")]
    Mismatch { path: String, reason: String },
    /// An encoder or decoder failed.
    #[error("{path}: codec error: {reason}")]
    Codec { path: String, reason: String },
    /// Reading or writing the file failed at the operating-system level.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// A still image that is not a readable PNG or JPEG.
    #[error("{path}: not a readable PNG or JPEG image: {reason}")]
    Decode { path: String, reason: String },
    /// A PNG that could not be encoded.
    #[error("{path}: could not encode PNG: {reason}")]
    Encode { path: String, reason: String },
}

impl MediaError {
    /// The problem without the file name (for callers that name the file themselves).
    pub fn reason(&self) -> &str {
        match self {
            MediaError::NoStream { kind, .. } => kind.missing(),
            MediaError::Open { reason, .. }
            | MediaError::Unsupported { reason, .. }
            | MediaError::Truncated { reason, .. }
            | MediaError::Empty { reason, .. }
            | MediaError::Mismatch { reason, .. }
            | MediaError::Codec { reason, .. }
            | MediaError::Io { reason, .. }
            | MediaError::Decode { reason, .. }
            | MediaError::Encode { reason, .. } => reason,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &str {
        match self {
            MediaError::Open { path, .. }
            | MediaError::NoStream { path, .. }
            | MediaError::Unsupported { path, .. }
            | MediaError::Truncated { path, .. }
            | MediaError::Empty { path, .. }
            | MediaError::Mismatch { path, .. }
            | MediaError::Codec { path, .. }
            | MediaError::Io { path, .. }
            | MediaError::Decode { path, .. }
            | MediaError::Encode { path, .. } => path,
        }
    }
}

/// The path as errors print it.
pub(crate) fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Checks that `path` names a non-empty regular file before a decoder sees it, so that a missing
/// file is [`MediaError::Open`] and a zero-byte file is [`MediaError::Empty`] whatever the
/// decoder would have said.
pub(crate) fn check_readable(path: &Path) -> Result<u64, MediaError> {
    let meta = std::fs::metadata(path).map_err(|e| MediaError::Open {
        path: shown(path),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(MediaError::Open {
            path: shown(path),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() == 0 {
        return Err(MediaError::Empty {
            path: shown(path),
            reason: "the file is 0 bytes long".into(),
        });
    }
    Ok(meta.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_the_place() {
        let e = MediaError::Truncated {
            path: "clip.wav".into(),
            at: Location::frame(12).with_byte(Some(4044)),
            reason: "data chunk ends early".into(),
        };
        assert_eq!(
            e.to_string(),
            "clip.wav: truncated or corrupt at frame 12 (byte 4044): data chunk ends early"
        );
        let e = MediaError::NoStream {
            path: "a.mp4".into(),
            kind: StreamKind::Audio,
        };
        assert_eq!(e.to_string(), "a.mp4: no audio stream");
        assert_eq!(e.reason(), "no audio stream");
        assert_eq!(e.path(), "a.mp4");
    }

    #[test]
    fn missing_and_empty_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.mp4");
        assert!(matches!(
            check_readable(&missing),
            Err(MediaError::Open { path, .. }) if path.ends_with("nope.mp4")
        ));
        let empty = dir.path().join("empty.mp4");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            check_readable(&empty),
            Err(MediaError::Empty { path, .. }) if path.ends_with("empty.mp4")
        ));
        std::fs::write(&empty, b"x").unwrap();
        assert_eq!(check_readable(&empty).unwrap(), 1);
    }
}
