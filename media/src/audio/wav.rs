//! WAV files through hound: streaming [`WavReader`] (8/16/24/32-bit integer PCM and 32-bit
//! float to planar f32) and [`WavWriter`] (planar f32 to 16-bit, 24-bit or 32-bit float).
//!
//! Invariants: integers map to f32 by dividing by 2^(bits-1) and back by multiplying by it,
//! rounding and clipping to the integer range, so a write/read round trip is within half a
//! quantisation step; float samples pass through unchanged (not clamped); a data chunk that
//! ends before its header says is `MediaError::Truncated` naming the first missing frame; the
//! writer writes to `<path>.part` and renames on `finish`, so a reader never sees a
//! half-written file.

use super::{check_planar, AudioSource, AudioSpec};
use crate::error::{check_readable, shown, Location, MediaError};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

/// Sample encodings [`WavWriter`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleFormat {
    I16,
    I24,
    F32,
}

impl SampleFormat {
    fn hound_spec(self, spec: AudioSpec) -> hound::WavSpec {
        let (bits, fmt) = match self {
            SampleFormat::I16 => (16, hound::SampleFormat::Int),
            SampleFormat::I24 => (24, hound::SampleFormat::Int),
            SampleFormat::F32 => (32, hound::SampleFormat::Float),
        };
        hound::WavSpec {
            channels: spec.channels,
            sample_rate: spec.sample_rate,
            bits_per_sample: bits,
            sample_format: fmt,
        }
    }
}

/// Streaming WAV reader.
pub struct WavReader {
    path: String,
    reader: hound::WavReader<BufReader<File>>,
    spec: AudioSpec,
    /// `Some(2^(bits-1))` for integer PCM, `None` for float.
    int_scale: Option<f32>,
    frames_read: u64,
}

fn open_err(path: &Path, e: hound::Error) -> MediaError {
    let p = shown(path);
    match e {
        hound::Error::Unsupported => MediaError::Unsupported {
            path: p,
            reason: "WAV encoding other than integer PCM or 32-bit float".into(),
        },
        // The file exists and is not empty (checked first), so any other failure while reading
        // the header means it is not a WAV file, or its header is cut short or damaged.
        other => MediaError::Open {
            path: p,
            reason: format!("not a readable WAV file: {other}"),
        },
    }
}

impl WavReader {
    /// Opens a WAV file and reads its header.
    pub fn open(path: &Path) -> Result<Self, MediaError> {
        check_readable(path)?;
        let reader = hound::WavReader::open(path).map_err(|e| open_err(path, e))?;
        let s = reader.spec();
        let int_scale = match (s.sample_format, s.bits_per_sample) {
            (hound::SampleFormat::Int, bits @ 1..=32) => Some((1u64 << (bits - 1)) as f32),
            (hound::SampleFormat::Float, 32) => None,
            (fmt, bits) => {
                return Err(MediaError::Unsupported {
                    path: shown(path),
                    reason: format!("{bits}-bit {fmt:?} WAV samples"),
                })
            }
        };
        if s.channels == 0 || s.sample_rate == 0 {
            return Err(MediaError::Unsupported {
                path: shown(path),
                reason: format!(
                    "WAV header says {} channels at {} Hz",
                    s.channels, s.sample_rate
                ),
            });
        }
        Ok(WavReader {
            path: shown(path),
            reader,
            spec: AudioSpec {
                sample_rate: s.sample_rate,
                channels: s.channels,
            },
            int_scale,
            frames_read: 0,
        })
    }

    pub fn spec(&self) -> AudioSpec {
        self.spec
    }

    /// Frames the data chunk's header announces.
    pub fn len_frames(&self) -> u64 {
        u64::from(self.reader.duration())
    }

    /// Up to `max_frames` frames as planar f32; empty channels at the end.
    pub fn read(&mut self, max_frames: usize) -> Result<Vec<Vec<f32>>, MediaError> {
        let channels = usize::from(self.spec.channels);
        let left = self.len_frames().saturating_sub(self.frames_read);
        let n = (max_frames as u64).min(left) as usize;
        let mut out: Vec<Vec<f32>> = (0..channels).map(|_| Vec::with_capacity(n)).collect();
        let first_frame = self.frames_read;
        let path = &self.path;
        // The header is parsed, so inside the data chunk a failure means the bytes ran out
        // (hound reports that as an `Other` I/O error, "Failed to read enough bytes").
        let truncated = |read: usize, e: hound::Error| MediaError::Truncated {
            path: path.clone(),
            at: Location::frame(first_frame + (read / channels) as u64),
            reason: format!("the data chunk ends before the length its header gives ({e})"),
        };
        // Hot loop: one sample per iteration, no allocation (vectors were sized above).
        match self.int_scale {
            Some(scale) => {
                let inv = 1.0 / scale;
                for (i, s) in self.reader.samples::<i32>().take(n * channels).enumerate() {
                    let v = s.map_err(|e| truncated(i, e))?;
                    out[i % channels].push(v as f32 * inv);
                }
            }
            None => {
                for (i, s) in self.reader.samples::<f32>().take(n * channels).enumerate() {
                    let v = s.map_err(|e| truncated(i, e))?;
                    out[i % channels].push(v);
                }
            }
        }
        self.frames_read += n as u64;
        Ok(out)
    }
}

impl AudioSource for WavReader {
    fn spec(&self) -> AudioSpec {
        WavReader::spec(self)
    }
    fn read(&mut self, max_frames: usize) -> Result<Vec<Vec<f32>>, MediaError> {
        WavReader::read(self, max_frames)
    }
    fn len_frames(&self) -> Option<u64> {
        Some(WavReader::len_frames(self))
    }
}

/// Streaming WAV writer.
pub struct WavWriter {
    path: String,
    final_path: PathBuf,
    tmp_path: PathBuf,
    /// `Some` until `finish`.
    writer: Option<hound::WavWriter<BufWriter<File>>>,
    spec: AudioSpec,
    format: SampleFormat,
}

impl WavWriter {
    /// Creates `path` (written as `<path>.part` until [`WavWriter::finish`]).
    pub fn create(path: &Path, spec: AudioSpec, format: SampleFormat) -> Result<Self, MediaError> {
        let p = shown(path);
        if spec.channels == 0 || spec.sample_rate == 0 {
            return Err(MediaError::Unsupported {
                path: p,
                reason: format!("{} channels at {} Hz", spec.channels, spec.sample_rate),
            });
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".part");
        let tmp_path = PathBuf::from(tmp);
        let writer = hound::WavWriter::create(&tmp_path, format.hound_spec(spec)).map_err(|e| {
            MediaError::Io {
                path: p.clone(),
                reason: format!("cannot create {}: {e}", tmp_path.display()),
            }
        })?;
        Ok(WavWriter {
            path: p,
            final_path: path.to_path_buf(),
            tmp_path,
            writer: Some(writer),
            spec,
            format,
        })
    }

    /// Appends planar frames. Integer formats clamp to `[-1, 1]`.
    pub fn write(&mut self, planar: &[Vec<f32>]) -> Result<(), MediaError> {
        let n = check_planar(&self.path, planar, usize::from(self.spec.channels))?;
        let path = &self.path;
        let w = self
            .writer
            .as_mut()
            .expect("writer is present until finish consumes self");
        let io = |e: hound::Error| MediaError::Io {
            path: path.clone(),
            reason: format!("writing samples: {e}"),
        };
        // Hot loop: one sample per iteration, interleaving as it goes.
        match self.format {
            SampleFormat::I16 => {
                for i in 0..n {
                    for ch in planar {
                        let v = (ch[i] * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                        w.write_sample(v).map_err(io)?;
                    }
                }
            }
            SampleFormat::I24 => {
                for i in 0..n {
                    for ch in planar {
                        let v = (f64::from(ch[i]) * 8_388_608.0)
                            .round()
                            .clamp(-8_388_608.0, 8_388_607.0)
                            as i32;
                        w.write_sample(v).map_err(io)?;
                    }
                }
            }
            SampleFormat::F32 => {
                for i in 0..n {
                    for ch in planar {
                        w.write_sample(ch[i]).map_err(io)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the final header and moves the file into place. On failure (and when the
    /// writer is dropped unfinished) the partial file is removed.
    pub fn finish(mut self) -> Result<(), MediaError> {
        let w = self
            .writer
            .take()
            .expect("writer is present until finish consumes self");
        w.finalize().map_err(|e| MediaError::Io {
            path: self.path.clone(),
            reason: format!("finishing the WAV file: {e}"),
        })?;
        std::fs::rename(&self.tmp_path, &self.final_path).map_err(|e| MediaError::Io {
            path: self.path.clone(),
            reason: format!("moving {} into place: {e}", self.tmp_path.display()),
        })
    }
}

impl Drop for WavWriter {
    fn drop(&mut self) {
        // Unfinished, or finishing failed: close the file and remove the partial output.
        if let Some(w) = self.writer.take() {
            let _ = w.finalize();
        }
        if self.tmp_path.exists() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_int_samples_and_keeps_floats() {
        let dir = tempfile::tempdir().unwrap();
        let spec = AudioSpec {
            sample_rate: 8000,
            channels: 1,
        };
        let path = dir.path().join("c.wav");
        let mut w = WavWriter::create(&path, spec, SampleFormat::I16).unwrap();
        w.write(&[vec![1.5, -2.0, 0.5]]).unwrap();
        w.finish().unwrap();
        let got = WavReader::open(&path).unwrap().read(10).unwrap();
        assert_eq!(got, vec![vec![32767.0 / 32768.0, -1.0, 0.5]]);

        let mut w = WavWriter::create(&path, spec, SampleFormat::F32).unwrap();
        w.write(&[vec![1.5, -2.0]]).unwrap();
        w.finish().unwrap();
        let got = WavReader::open(&path).unwrap().read(10).unwrap();
        assert_eq!(got, vec![vec![1.5, -2.0]]);
    }

    #[test]
    fn dropped_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.wav");
        let spec = AudioSpec {
            sample_rate: 8000,
            channels: 2,
        };
        let mut w = WavWriter::create(&path, spec, SampleFormat::I24).unwrap();
        w.write(&[vec![0.1; 10], vec![0.2; 10]]).unwrap();
        drop(w);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn channel_count_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.wav");
        let spec = AudioSpec {
            sample_rate: 8000,
            channels: 2,
        };
        let mut w = WavWriter::create(&path, spec, SampleFormat::I16).unwrap();
        let e = w.write(&[vec![0.0; 4]]).unwrap_err();
        assert!(matches!(e, MediaError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("m.wav"), "{e}");
    }
}
