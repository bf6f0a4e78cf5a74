//! `VideoReader`: streaming decode of a file's best video stream into packed RGB24 frames.
//!
//! Invariants: the reader holds one demuxed packet, the decoder's own reorder/reference frames,
//! one decoded frame and one RGB frame at a time, whatever the file's length; frames come out
//! in presentation order with `index` counting from 0; `pts_s` is the frame's best-effort
//! timestamp minus the stream's start time; after the last packet the decoder is drained, so
//! no delayed (B-)frame is lost; end of stream is `Ok(None)` and stays `Ok(None)`. A read or
//! decode failure is an error naming the frame index and byte offset reached, after which the
//! reader is finished. A file cut short where the container cannot tell (Matroska, MPEG-TS:
//! the demuxer just meets end of file) ends early as a shorter stream; compare with
//! `info().frames` where the container states it.

use super::{Frame, Rational, VideoInfo};
use crate::audio::AudioSpec;
use crate::error::{shown, Location, MediaError, StreamKind};
use crate::ff::{self, Scaler};
use ffmpeg_next as ffmpeg;
use ffmpeg_next::format::context::Input;
use ffmpeg_next::format::Pixel;
use ffmpeg_next::software::scaling;
use ffmpeg_next::{codec, decoder, frame, media};
use std::path::Path;

/// Streaming decoder for the best video stream of a file.
pub struct VideoReader {
    path: String,
    input: Input,
    stream_index: usize,
    time_base: ffmpeg::Rational,
    /// Stream start in `time_base` units (0 when the container does not say).
    start: i64,
    decoder: decoder::Video,
    decoded: frame::Video,
    rgb: frame::Video,
    scaler: Option<Scaler>,
    info: VideoInfo,
    next_index: u64,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Packets still to demux.
    Reading,
    /// End of file reached and the decoder told; draining its delayed frames.
    Draining,
    /// Everything delivered (or an error ended the stream).
    Done,
}

fn codec_err(path: &str, what: &str, e: ffmpeg::Error) -> MediaError {
    MediaError::Codec {
        path: path.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// Opens the decoder for a stream, mapping a missing decoder to `Unsupported`.
fn open_decoder(path: &str, stream: &ffmpeg::Stream) -> Result<decoder::Decoder, MediaError> {
    let params = stream.parameters();
    let id = params.id();
    if decoder::find(id).is_none() {
        return Err(MediaError::Unsupported {
            path: path.to_string(),
            reason: format!("no decoder for codec {:?} in this ffmpeg build", id),
        });
    }
    let mut ctx = codec::Context::from_parameters(params)
        .map_err(|e| codec_err(path, "reading codec parameters", e))?;
    // 0 lets libavcodec pick the thread count from the CPU count.
    ctx.set_threading(ffmpeg::threading::Config::count(0));
    Ok(ctx.decoder())
}

fn audio_spec(path: &str, input: &Input) -> Option<AudioSpec> {
    let stream = input.streams().best(media::Type::Audio)?;
    let dec = open_decoder(path, &stream).ok()?.audio().ok()?;
    let (rate, channels) = (dec.rate(), dec.channels());
    (rate > 0 && channels > 0).then_some(AudioSpec {
        sample_rate: rate,
        channels,
    })
}

fn stream_info(
    path: &str,
    input: &Input,
    stream: &ffmpeg::Stream,
    dec: &decoder::Video,
) -> VideoInfo {
    let tb = stream.time_base();
    let avg = Rational::from(stream.avg_frame_rate());
    let fps = if avg.is_positive() {
        avg
    } else {
        Rational::from(stream.rate())
    };
    let frames = u64::try_from(stream.frames()).ok().filter(|&n| n > 0);
    let duration_s = if stream.duration() > 0 && tb.denominator() > 0 {
        Some(stream.duration() as f64 * f64::from(tb))
    } else if input.duration() > 0 {
        Some(input.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE))
    } else {
        None
    };
    VideoInfo {
        width: dec.width(),
        height: dec.height(),
        fps,
        frames,
        duration_s,
        codec: stream.parameters().id().name().to_string(),
        audio: audio_spec(path, input),
    }
}

pub(super) fn probe(path: &Path) -> Result<VideoInfo, MediaError> {
    VideoReader::open(path).map(|r| r.info)
}

impl VideoReader {
    /// Opens `path` and its best video stream's decoder. Reads headers only.
    pub fn open(path: &Path) -> Result<Self, MediaError> {
        let p = shown(path);
        let input = ff::open_input(path)?;
        let stream =
            input
                .streams()
                .best(media::Type::Video)
                .ok_or_else(|| MediaError::NoStream {
                    path: p.clone(),
                    kind: StreamKind::Video,
                })?;
        let stream_index = stream.index();
        let time_base = stream.time_base();
        let start = match stream.start_time() {
            ffmpeg::ffi::AV_NOPTS_VALUE => 0,
            s => s,
        };
        let decoder = open_decoder(&p, &stream)?
            .video()
            .map_err(|e| codec_err(&p, "opening the video decoder", e))?;
        let info = stream_info(&p, &input, &stream, &decoder);
        if info.width == 0 || info.height == 0 {
            return Err(MediaError::Unsupported {
                path: p,
                reason: format!(
                    "video stream reports a {}x{} frame size",
                    info.width, info.height
                ),
            });
        }
        Ok(VideoReader {
            path: p,
            input,
            stream_index,
            time_base,
            start,
            decoder,
            decoded: frame::Video::empty(),
            rgb: frame::Video::empty(),
            scaler: None,
            info,
            next_index: 0,
            state: State::Reading,
        })
    }

    pub fn info(&self) -> &VideoInfo {
        &self.info
    }

    /// The next frame in presentation order, or `None` once the stream (decoder drained) ends.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, MediaError> {
        let result = self.advance();
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn here(&mut self) -> Location {
        Location::frame(self.next_index).with_byte(ff::input_position(&mut self.input))
    }

    fn advance(&mut self) -> Result<Option<Frame>, MediaError> {
        loop {
            if self.state == State::Done {
                return Ok(None);
            }
            match self.decoder.receive_frame(&mut self.decoded) {
                Ok(()) => return self.convert().map(Some),
                Err(ffmpeg::Error::Eof) => {
                    self.state = State::Done;
                    return Ok(None);
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
                // A drained decoder answers Eof, never EAGAIN; treat the odd one as the end.
                self.state = State::Done;
                return Ok(None);
            }
            self.feed()?;
        }
    }

    /// Sends the next packet of our stream to the decoder, or end-of-stream at end of file.
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
            // The decoder's output queue is full; `advance` drains it before the next feed.
            // This cannot happen after a receive answered EAGAIN, but losing the packet would be
            // worse than keeping a defensive branch.
            Err(e) if ff::is_again(&e) => Err(codec_err(
                &self.path,
                "decoder refused a packet while it had output pending",
                e,
            )),
            Err(e) => {
                let byte = u64::try_from(packet.position()).ok();
                Err(MediaError::Truncated {
                    path: self.path.clone(),
                    at: Location::frame(self.next_index).with_byte(byte),
                    reason: format!("the decoder rejected a packet: {e}"),
                })
            }
        }
    }

    /// Converts `self.decoded` to packed RGB24.
    fn convert(&mut self) -> Result<Frame, MediaError> {
        let (w, h, fmt) = (
            self.decoded.width(),
            self.decoded.height(),
            self.decoded.format(),
        );
        let stale = self.scaler.as_ref().is_none_or(|s| {
            let i = s.0.input();
            (i.format, i.width, i.height) != (fmt, w, h)
        });
        if stale {
            let ctx = scaling::Context::get(
                fmt,
                w,
                h,
                Pixel::RGB24,
                w,
                h,
                scaling::Flags::BICUBIC
                    | scaling::Flags::ACCURATE_RND
                    | scaling::Flags::FULL_CHR_H_INT,
            )
            .map_err(|e| MediaError::Unsupported {
                path: self.path.clone(),
                reason: format!("cannot convert {fmt:?} {w}x{h} frames to RGB: {e}"),
            })?;
            let mut scaler = Scaler(ctx);
            if ff::is_yuv(fmt) {
                let cs = ff::sws_colorspace(self.decoded.color_space(), h);
                let full = self.decoded.color_range() == ffmpeg::color::Range::JPEG;
                ff::set_yuv_details(&mut scaler, true, cs, full);
            }
            self.scaler = Some(scaler);
            self.rgb = frame::Video::new(Pixel::RGB24, w, h);
        }
        let scaler = self.scaler.as_mut().expect("scaler was built just above");
        scaler
            .0
            .run(&self.decoded, &mut self.rgb)
            .map_err(|e| codec_err(&self.path, "converting a frame to RGB", e))?;

        let row = w as usize * 3;
        let stride = self.rgb.stride(0);
        let data = self.rgb.data(0);
        let mut rgb = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            rgb.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        let ts = self.decoded.timestamp().or(self.decoded.pts());
        let pts_s = match ts {
            Some(t) => (t - self.start) as f64 * f64::from(self.time_base),
            // No timestamp at all: fall back to the nominal frame rate.
            None => {
                let fps = self.info.fps.as_f64();
                if fps > 0.0 {
                    self.next_index as f64 / fps
                } else {
                    0.0
                }
            }
        };
        let frame = Frame {
            index: self.next_index,
            pts_s,
            width: w,
            height: h,
            rgb,
        };
        self.next_index += 1;
        Ok(frame)
    }
}
