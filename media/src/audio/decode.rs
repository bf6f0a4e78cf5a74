//! `AudioReader`: streaming decode of any audio ffmpeg reads (FLAC, MP3, Ogg, M4A/AAC, WAV,
//! or the audio track of a video file) into planar f32 at the file's own rate and channels.
//!
//! Invariants: decoded frames go through swresample to planar f32 with no rate or layout
//! change (so no resampling delay and no samples invented or lost); the reader holds one
//! demuxed packet, one decoded frame and fewer than one frame's worth of leftover samples
//! beyond what a `read` asks for; samples come out in stream order, with the decoder drained
//! at end of file; end of stream is empty channels, and stays so. A packet the decoder rejects
//! is `MediaError::Truncated` with the frame and byte reached (as in `VideoReader`), not
//! skipped silently; after an error the reader is finished.

use super::{AudioSource, AudioSpec};
use crate::error::{shown, Location, MediaError, StreamKind};
use crate::ff;
use ffmpeg_next as ffmpeg;
use ffmpeg_next::format::context::Input;
use ffmpeg_next::format::Sample;
use ffmpeg_next::software::resampling;
use ffmpeg_next::{codec, decoder, frame, media, ChannelLayout};
use std::collections::VecDeque;
use std::path::Path;

/// Streaming decoder for the best audio stream of a file.
pub struct AudioReader {
    path: String,
    input: Input,
    stream_index: usize,
    decoder: decoder::Audio,
    layout: ChannelLayout,
    /// Built for the first decoded frame's sample format and rebuilt if it changes.
    swr: Option<(Sample, resampling::Context)>,
    decoded: frame::Audio,
    spec: AudioSpec,
    /// Decoded samples not yet returned, per channel.
    pending: Vec<VecDeque<f32>>,
    frames_out: u64,
    duration_s: Option<f64>,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Reading,
    Draining,
    Done,
}

fn codec_err(path: &str, what: &str, e: ffmpeg::Error) -> MediaError {
    MediaError::Codec {
        path: path.to_string(),
        reason: format!("{what}: {e}"),
    }
}

impl AudioReader {
    /// Opens `path` and its best audio stream's decoder. Reads headers only.
    pub fn open(path: &Path) -> Result<Self, MediaError> {
        let p = shown(path);
        let input = ff::open_input(path)?;
        let stream =
            input
                .streams()
                .best(media::Type::Audio)
                .ok_or_else(|| MediaError::NoStream {
                    path: p.clone(),
                    kind: StreamKind::Audio,
                })?;
        let stream_index = stream.index();
        let id = stream.parameters().id();
        if decoder::find(id).is_none() {
            return Err(MediaError::Unsupported {
                path: p,
                reason: format!("no decoder for codec {id:?} in this ffmpeg build"),
            });
        }
        let tb = stream.time_base();
        let duration_s = if stream.duration() > 0 && tb.denominator() > 0 {
            Some(stream.duration() as f64 * f64::from(tb))
        } else if input.duration() > 0 {
            Some(input.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE))
        } else {
            None
        };
        let ctx = codec::Context::from_parameters(stream.parameters())
            .map_err(|e| codec_err(&p, "reading codec parameters", e))?;
        let decoder = ctx
            .decoder()
            .audio()
            .map_err(|e| codec_err(&p, "opening the audio decoder", e))?;
        let (rate, channels) = (decoder.rate(), decoder.channels());
        if rate == 0 || channels == 0 {
            return Err(MediaError::Unsupported {
                path: p,
                reason: format!("audio stream reports {channels} channels at {rate} Hz"),
            });
        }
        let layout = match decoder.channel_layout() {
            l if l.is_empty() || l.channels() != i32::from(channels) => {
                ChannelLayout::default(i32::from(channels))
            }
            l => l,
        };
        Ok(AudioReader {
            path: p,
            input,
            stream_index,
            decoder,
            layout,
            swr: None,
            decoded: frame::Audio::empty(),
            spec: AudioSpec {
                sample_rate: rate,
                channels,
            },
            pending: vec![VecDeque::new(); usize::from(channels)],
            frames_out: 0,
            duration_s,
            state: State::Reading,
        })
    }

    pub fn spec(&self) -> AudioSpec {
        self.spec
    }

    /// The container's duration, if it states one (an estimate for some formats, e.g. MP3).
    pub fn duration_s(&self) -> Option<f64> {
        self.duration_s
    }

    /// Up to `max_frames` frames as planar f32; empty channels at the end.
    pub fn read(&mut self, max_frames: usize) -> Result<Vec<Vec<f32>>, MediaError> {
        while self.pending[0].len() < max_frames && self.state != State::Done {
            if let Err(e) = self.decode_some() {
                self.state = State::Done;
                return Err(e);
            }
        }
        let n = max_frames.min(self.pending[0].len());
        self.frames_out += n as u64;
        Ok(self
            .pending
            .iter_mut()
            .map(|ch| ch.drain(..n).collect())
            .collect())
    }

    fn here(&mut self) -> Location {
        let buffered = self.pending[0].len() as u64;
        Location::frame(self.frames_out + buffered).with_byte(ff::input_position(&mut self.input))
    }

    /// Decodes one more frame into `pending` (or moves the state towards the end).
    fn decode_some(&mut self) -> Result<(), MediaError> {
        loop {
            match self.decoder.receive_frame(&mut self.decoded) {
                Ok(()) => return self.convert(),
                Err(ffmpeg::Error::Eof) => {
                    self.state = State::Done;
                    return Ok(());
                }
                Err(e) if ff::is_again(&e) => {}
                Err(e) => {
                    let at = self.here();
                    return Err(MediaError::Truncated {
                        path: self.path.clone(),
                        at,
                        reason: format!("the decoder rejected the data: {e}"),
                    });
                }
            }
            if self.state == State::Draining {
                self.state = State::Done;
                return Ok(());
            }
            self.feed()?;
        }
    }

    fn feed(&mut self) -> Result<(), MediaError> {
        let packet = match ff::next_packet(&mut self.input, self.stream_index) {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.decoder
                    .send_eof()
                    .map_err(|e| codec_err(&self.path, "flushing the decoder", e))?;
                self.state = State::Draining;
                return Ok(());
            }
            Err(e) => {
                let at = self.here();
                return Err(MediaError::Truncated {
                    path: self.path.clone(),
                    at,
                    reason: format!("reading the container failed: {e}"),
                });
            }
        };
        match self.decoder.send_packet(&packet) {
            Ok(()) => Ok(()),
            Err(e) => {
                let byte = u64::try_from(packet.position()).ok();
                let buffered = self.pending[0].len() as u64;
                Err(MediaError::Truncated {
                    path: self.path.clone(),
                    at: Location::frame(self.frames_out + buffered).with_byte(byte),
                    reason: format!("the decoder rejected a packet: {e}"),
                })
            }
        }
    }

    /// Converts `self.decoded` to planar f32 and appends it to `pending`.
    fn convert(&mut self) -> Result<(), MediaError> {
        let fmt = self.decoded.format();
        let channels = usize::from(self.spec.channels);
        if usize::from(self.decoded.channels()) != channels
            || self.decoded.rate() != self.spec.sample_rate
        {
            let at = self.here();
            return Err(MediaError::Mismatch {
                path: self.path.clone(),
                reason: format!(
                    "{at}: the stream changes to {} channels at {} Hz mid-way (it began with {} \
                     at {} Hz)",
                    self.decoded.channels(),
                    self.decoded.rate(),
                    channels,
                    self.spec.sample_rate
                ),
            });
        }
        // Decoders may leave the layout unset; swresample insists it match what it was set up for.
        if self.decoded.channel_layout() != self.layout {
            self.decoded.set_channel_layout(self.layout);
        }
        let target = Sample::F32(ffmpeg::format::sample::Type::Planar);
        if self.swr.as_ref().is_none_or(|(f, _)| *f != fmt) {
            let ctx = resampling::Context::get(
                fmt,
                self.layout,
                self.spec.sample_rate,
                target,
                self.layout,
                self.spec.sample_rate,
            )
            .map_err(|e| MediaError::Unsupported {
                path: self.path.clone(),
                reason: format!("cannot convert {fmt:?} audio to f32: {e}"),
            })?;
            self.swr = Some((fmt, ctx));
        }
        let (_, swr) = self.swr.as_mut().expect("built just above");
        let mut out = frame::Audio::empty();
        swr.run(&self.decoded, &mut out)
            .map_err(|e| codec_err(&self.path, "converting samples to f32", e))?;
        let n = out.samples();
        for (c, pend) in self.pending.iter_mut().enumerate() {
            let bytes = &out.data(c)[..n * 4];
            pend.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(())
    }
}

impl AudioSource for AudioReader {
    fn spec(&self) -> AudioSpec {
        AudioReader::spec(self)
    }
    fn read(&mut self, max_frames: usize) -> Result<Vec<Vec<f32>>, MediaError> {
        AudioReader::read(self, max_frames)
    }
    /// Compressed containers state durations that are estimates (and include or exclude
    /// encoder padding by convention), so no exact length is claimed.
    fn len_frames(&self) -> Option<u64> {
        None
    }
    fn duration_s(&self) -> Option<f64> {
        AudioReader::duration_s(self)
    }
}
