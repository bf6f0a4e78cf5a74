//! `VideoWriter`: streaming encode of RGB24 frames (and optionally planar f32 audio) into an
//! MP4, Matroska, WebM or QuickTime file.
//!
//! Invariants: the container is chosen by the path's extension and is checked to accept the
//! codec before anything is encoded; frames are converted with swscale to the encoder's pixel
//! format (4:2:0 YUV for lossy codecs, BT.709 limited range, and the stream is tagged so;
//! 8-bit RGB for FFV1, so that it is lossless end to end); each frame's `pts_s` is kept
//! (rounded to the encoder time base, 1/90000 s, or 1/fps for MPEG-4 Part 2) and must strictly
//! increase; audio is buffered only up to one encoder frame; the file is written under a
//! `.part` name and renamed on [`VideoWriter::finish`], so a reader never sees a half-written
//! file, and a writer dropped without `finish` removes its partial file.

use super::codec::QualityKnob;
use super::{Rational, VideoCodec};
use crate::audio::AudioSpec;
use crate::error::{shown, MediaError};
use crate::ff::{self, Scaler};
use ffmpeg_next as ffmpeg;
use ffmpeg_next::format::context::Output;
use ffmpeg_next::format::{Pixel, Sample};
use ffmpeg_next::software::scaling;
use ffmpeg_next::{codec, encoder, frame, ChannelLayout, Packet};
use std::path::{Path, PathBuf};

/// How to encode a video stream.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodeOptions {
    pub codec: VideoCodec,
    pub width: u32,
    pub height: u32,
    /// Nominal frame rate (the container's rate; each frame's own pts is what counts).
    pub fps: Rational,
    /// Constant-quality setting: CRF for x264/x265/VP9/AV1 (lower is better), the fixed
    /// quantiser (1..=31) for MPEG-4 Part 2 and ProRes. `None` keeps the encoder's default.
    /// FFV1 is lossless and refuses it.
    pub crf: Option<u32>,
    /// The encoder's own speed preset (x264/x265 `ultrafast`..`placebo`, SVT-AV1 `0`..`13`).
    /// An encoder without a `preset` option refuses it.
    pub preset: Option<String>,
    /// Encoder threads; `None` lets libavcodec choose from the CPU count.
    pub threads: Option<u32>,
}

impl EncodeOptions {
    /// Options with the encoder's defaults for quality, speed and threads.
    pub fn new(codec: VideoCodec, width: u32, height: u32, fps: Rational) -> Self {
        EncodeOptions {
            codec,
            width,
            height,
            fps,
            crf: None,
            preset: None,
            threads: None,
        }
    }
}

/// Streaming video (and audio) encoder writing one file.
pub struct VideoWriter {
    path: String,
    final_path: PathBuf,
    tmp_path: PathBuf,
    /// `Some` from `create` until `finish` consumes the writer.
    inner: Option<Inner>,
}

struct Inner {
    output: Output,
    video: VideoTrack,
    audio: Option<AudioTrack>,
}

struct VideoTrack {
    encoder: encoder::video::Encoder,
    route: Route,
    scaler: Scaler,
    rgb: frame::Video,
    yuv: frame::Video,
    width: u32,
    height: u32,
    last_pts: Option<i64>,
    frames: u64,
    encoder_name: &'static str,
}

struct AudioTrack {
    encoder: encoder::audio::Encoder,
    route: Route,
    spec: AudioSpec,
    layout: ChannelLayout,
    format: Sample,
    /// Samples per encoder frame.
    frame_size: usize,
    /// The encoder takes a shorter final frame (else the last frame is padded with silence).
    small_last_frame: bool,
    /// Per channel, fewer than `frame_size` samples waiting for the next frame.
    pending: Vec<Vec<f32>>,
    next_pts: i64,
    encoder_name: &'static str,
}

/// Muxer name for a file extension.
fn muxer_for(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "mp4" | "m4v" => "mp4",
        "mkv" => "matroska",
        "webm" => "webm",
        "mov" => "mov",
        _ => return None,
    })
}

fn unsupported(path: &str, reason: String) -> MediaError {
    MediaError::Unsupported {
        path: path.to_string(),
        reason,
    }
}

fn codec_err(path: &str, what: &str, e: ffmpeg::Error) -> MediaError {
    MediaError::Codec {
        path: path.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// Makes a frame's buffers exclusively ours again: an encoder may still hold a reference to
/// the previous frame's data (for lookahead or B-frames), and writing into it would corrupt
/// that queued picture.
fn make_writable(frame: *mut ffmpeg::ffi::AVFrame) -> Result<(), ffmpeg::Error> {
    // SAFETY: `frame` comes from an exclusively borrowed, allocated ffmpeg-next frame.
    match unsafe { ffmpeg::ffi::av_frame_make_writable(frame) } {
        0 => Ok(()),
        e => Err(ffmpeg::Error::from(e)),
    }
}

/// Where an encoder's packets go, and how their timestamps convert on the way.
#[derive(Clone, Copy, Debug)]
struct Route {
    /// The output stream's index.
    stream: usize,
    /// The encoder's time base (packets come out in it).
    enc_tb: ffmpeg::Rational,
    /// The output stream's time base (the muxer may pick its own when writing the header).
    stream_tb: ffmpeg::Rational,
    /// Duration to give packets that come out without one, in `enc_tb` ticks.
    default_duration: Option<i64>,
}

/// Moves every packet the encoder has ready into the muxer.
fn drain(
    enc: &mut encoder::Encoder,
    output: &mut Output,
    route: Route,
    path: &str,
    name: &str,
) -> Result<(), MediaError> {
    let mut packet = Packet::empty();
    loop {
        match enc.receive_packet(&mut packet) {
            Ok(()) => {
                // Video encoders here leave durations unset; without one the MP4 muxer gives
                // the last frame no time, and its edit list then hides that frame.
                if let Some(d) = route.default_duration.filter(|_| packet.duration() <= 0) {
                    packet.set_duration(d);
                }
                packet.set_stream(route.stream);
                packet.rescale_ts(route.enc_tb, route.stream_tb);
                packet
                    .write_interleaved(output)
                    .map_err(|e| MediaError::Io {
                        path: path.to_string(),
                        reason: format!("writing a {name} packet failed: {e}"),
                    })?;
            }
            Err(ffmpeg::Error::Eof) => return Ok(()),
            Err(e) if ff::is_again(&e) => return Ok(()),
            Err(e) => return Err(codec_err(path, &format!("{name} encoder failed"), e)),
        }
    }
}

impl VideoWriter {
    /// Creates a video-only file. The container comes from the extension (.mp4 .mkv .webm .mov).
    pub fn create(path: &Path, opts: &EncodeOptions) -> Result<Self, MediaError> {
        Self::open(path, opts, None)
    }

    /// Creates a file with a video track and an audio track of `audio`'s rate and channels:
    /// AAC in MP4/MOV/Matroska, Opus in WebM (48, 24, 16, 12 or 8 kHz only).
    pub fn with_audio(
        path: &Path,
        opts: &EncodeOptions,
        audio: AudioSpec,
    ) -> Result<Self, MediaError> {
        Self::open(path, opts, Some(audio))
    }

    fn open(
        path: &Path,
        opts: &EncodeOptions,
        audio: Option<AudioSpec>,
    ) -> Result<Self, MediaError> {
        let p = shown(path);
        let muxer = muxer_for(path).ok_or_else(|| {
            unsupported(
                &p,
                "container: the extension must be .mp4, .mkv, .webm or .mov".to_string(),
            )
        })?;
        if opts.width == 0 || opts.height == 0 {
            return Err(unsupported(
                &p,
                format!("frame size {}x{}", opts.width, opts.height),
            ));
        }
        if !opts.fps.is_positive() {
            return Err(unsupported(
                &p,
                format!("frame rate {}/{}", opts.fps.num, opts.fps.den),
            ));
        }
        ff::init();
        let codec = opts.codec;
        let enc_codec = codec.find_encoder().ok_or_else(|| {
            unsupported(
                &p,
                format!(
                    "no {} encoder in this ffmpeg build (looked for {})",
                    codec.name(),
                    codec.encoder_names().join(", ")
                ),
            )
        })?;
        let encoder_name = codec
            .encoder_name()
            .expect("an encoder was found just above");

        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".part");
        // Declared before the output so that on an early return the output is closed first
        // and this guard's `Drop` then removes the partial file.
        let mut writer = VideoWriter {
            path: p.clone(),
            final_path: path.to_path_buf(),
            tmp_path: PathBuf::from(tmp),
            inner: None,
        };
        let mut output =
            ffmpeg::format::output_as(&writer.tmp_path, muxer).map_err(|e| MediaError::Io {
                path: p.clone(),
                reason: format!("cannot create {}: {e}", writer.tmp_path.display()),
            })?;
        if !ff::muxer_takes(&output.format(), enc_codec.id()) {
            return Err(unsupported(
                &p,
                format!("the {muxer} container cannot hold {}", codec.name()),
            ));
        }
        let global_header = output
            .format()
            .flags()
            .contains(ffmpeg::format::Flags::GLOBAL_HEADER);

        let video = VideoTrack::new(
            &p,
            &mut output,
            opts,
            enc_codec,
            encoder_name,
            global_header,
        )?;
        let audio = match audio {
            Some(spec) => Some(AudioTrack::new(
                &p,
                &mut output,
                muxer,
                spec,
                global_header,
            )?),
            None => None,
        };
        output.write_header().map_err(|e| {
            unsupported(&p, format!("the {muxer} muxer refused these streams: {e}"))
        })?;
        let mut inner = Inner {
            output,
            video,
            audio,
        };
        // The muxer may pick its own stream time bases when writing the header.
        inner.video.route.stream_tb = stream_time_base(&inner.output, inner.video.route.stream);
        if let Some(a) = inner.audio.as_mut() {
            a.route.stream_tb = stream_time_base(&inner.output, a.route.stream);
        }
        writer.inner = Some(inner);
        Ok(writer)
    }

    /// The path as errors show it, and the encoding state.
    fn parts(&mut self) -> (&str, &mut Inner) {
        let inner = self
            .inner
            .as_mut()
            .expect("inner is present until finish consumes the writer");
        (&self.path, inner)
    }

    /// Encodes one frame of packed RGB24 (`width * height * 3` bytes) shown at `pts_s` seconds.
    pub fn write_frame(&mut self, rgb: &[u8], pts_s: f64) -> Result<(), MediaError> {
        let (path, inner) = self.parts();
        inner.video.write(path, &mut inner.output, rgb, pts_s)
    }

    /// Encodes planar f32 audio (`[channel][sample]`, any length; all channels equally long).
    /// Needs a writer made with [`VideoWriter::with_audio`].
    pub fn write_audio(&mut self, planar: &[Vec<f32>]) -> Result<(), MediaError> {
        let (path, inner) = self.parts();
        let Some(audio) = inner.audio.as_mut() else {
            return Err(MediaError::Mismatch {
                path: path.to_string(),
                reason:
                    "audio written to a writer without an audio track (use VideoWriter::with_audio)"
                        .into(),
            });
        };
        audio.write(path, &mut inner.output, planar)
    }

    /// Flushes the encoders, writes the container trailer and moves the file into place.
    pub fn finish(mut self) -> Result<(), MediaError> {
        let path = self.path.clone();
        let mut inner = self
            .inner
            .take()
            .expect("inner is present until finish consumes the writer");
        let result = (|| {
            if inner.video.frames == 0 {
                return Err(MediaError::Empty {
                    path: path.clone(),
                    reason: "no video frames were written".into(),
                });
            }
            if let Some(a) = inner.audio.as_mut() {
                a.finish(&path, &mut inner.output)?;
            }
            inner.video.finish(&path, &mut inner.output)?;
            inner.output.write_trailer().map_err(|e| MediaError::Io {
                path: path.clone(),
                reason: format!("writing the container trailer failed: {e}"),
            })
        })();
        // Closing the output flushes and closes the file before it is renamed or removed.
        drop(inner);
        match result {
            Ok(()) => {
                std::fs::rename(&self.tmp_path, &self.final_path).map_err(|e| MediaError::Io {
                    path,
                    reason: format!("moving {} into place: {e}", self.tmp_path.display()),
                })
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for VideoWriter {
    fn drop(&mut self) {
        // Not finished (or finishing failed): close the file, then remove the partial output.
        drop(self.inner.take());
        if self.tmp_path.exists() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

fn stream_time_base(output: &Output, index: usize) -> ffmpeg::Rational {
    output
        .stream(index)
        .map(|s| s.time_base())
        .expect("the stream was added to this output")
}

impl VideoTrack {
    fn new(
        p: &str,
        output: &mut Output,
        opts: &EncodeOptions,
        enc_codec: ffmpeg::Codec,
        encoder_name: &'static str,
        global_header: bool,
    ) -> Result<Self, MediaError> {
        let codec = opts.codec;
        let formats: Vec<Pixel> = enc_codec
            .video()
            .ok()
            .and_then(|v| v.formats())
            .map(|f| f.collect())
            .unwrap_or_default();
        // Lossless FFV1 stores RGB (as bgr0), so RGB frames come back bit-exact; lossy codecs
        // get 4:2:0, what every player decodes; otherwise the encoder's first choice.
        let wanted = if codec == VideoCodec::Ffv1 {
            Pixel::BGRZ
        } else {
            Pixel::YUV420P
        };
        let pix = if formats.is_empty() || formats.contains(&wanted) {
            wanted
        } else {
            formats[0]
        };
        if let Some(d) = pix.descriptor() {
            let (cw, ch) = (1u32 << d.log2_chroma_w(), 1u32 << d.log2_chroma_h());
            if !opts.width.is_multiple_of(cw) || !opts.height.is_multiple_of(ch) {
                return Err(unsupported(
                    p,
                    format!(
                        "{encoder_name} encodes {} ({}), which needs width a multiple of {cw} and \
                         height a multiple of {ch}; got {}x{}",
                        codec.name(),
                        d.name(),
                        opts.width,
                        opts.height
                    ),
                ));
            }
        }
        // MPEG-4 Part 2 caps the time base denominator at 65535; everything else gets 1/90000 s
        // ticks, which hold every common rate (24, 25, 30000/1001, 50, 60, ...) exactly.
        let enc_tb = if codec == VideoCodec::Mpeg4 {
            ffmpeg::Rational::new(opts.fps.den, opts.fps.num)
        } else {
            ffmpeg::Rational::new(1, 90_000)
        };

        let mut enc = codec::Context::new_with_codec(enc_codec)
            .encoder()
            .video()
            .map_err(|e| codec_err(p, "creating the video encoder", e))?;
        enc.set_width(opts.width);
        enc.set_height(opts.height);
        enc.set_format(pix);
        enc.set_time_base(enc_tb);
        enc.set_frame_rate(Some(ffmpeg::Rational::from(opts.fps)));
        if ff::is_yuv(pix) {
            enc.set_colorspace(ffmpeg::color::Space::BT709);
            enc.set_color_range(ffmpeg::color::Range::MPEG);
            enc.set_color_primaries(ffmpeg::color::Primaries::BT709);
            enc.set_color_transfer_characteristic(ffmpeg::color::TransferCharacteristic::BT709);
        }
        if global_header {
            enc.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let threads = opts.threads.map_or(0, |t| t as usize);
        enc.set_threading(ffmpeg::threading::Config::count(threads));

        if let Some(q) = opts.crf {
            match codec.quality_knob() {
                QualityKnob::Crf => {
                    ff::set_private_option(&mut enc, "crf", &q.to_string()).map_err(|e| {
                        unsupported(p, format!("{encoder_name} refuses crf {q}: {e}"))
                    })?;
                    // Bit rate 0: quality alone governs the rate (libvpx/libaom otherwise run
                    // "constrained quality" against the 200 kb/s default).
                    enc.set_bit_rate(0);
                }
                QualityKnob::QScale => {
                    if !(1..=31).contains(&q) {
                        return Err(unsupported(
                            p,
                            format!("{encoder_name} takes a quantiser 1..=31 as crf, got {q}"),
                        ));
                    }
                    enc.set_flags(
                        if global_header {
                            codec::Flags::GLOBAL_HEADER
                        } else {
                            codec::Flags::empty()
                        } | codec::Flags::QSCALE,
                    );
                    enc.set_quality(q as usize * ffmpeg::ffi::FF_QP2LAMBDA as usize);
                }
                QualityKnob::Lossless => {
                    return Err(unsupported(
                        p,
                        format!("{} is lossless; crf does not apply", codec.name()),
                    ));
                }
            }
        }
        for (key, value) in VideoCodec::quiet_options(encoder_name) {
            // Best effort: an encoder build without the option still encodes, only louder.
            let _ = ff::set_private_option(&mut enc, key, value);
        }
        if let Some(preset) = &opts.preset {
            ff::set_private_option(&mut enc, "preset", preset).map_err(|e| {
                unsupported(p, format!("{encoder_name} refuses preset {preset:?}: {e}"))
            })?;
        }
        // Bad settings (an unknown preset, a size or rate the encoder cannot do) surface here.
        let encoder = enc.open_as(enc_codec).map_err(|e| {
            unsupported(
                p,
                format!(
                    "{encoder_name} refused {}x{} {} at {}/{} fps (crf {:?}, preset {:?}): {e}",
                    opts.width,
                    opts.height,
                    pix.descriptor().map_or("?", |d| d.name()),
                    opts.fps.num,
                    opts.fps.den,
                    opts.crf,
                    opts.preset
                ),
            )
        })?;

        let mut stream = output
            .add_stream(enc_codec)
            .map_err(|e| codec_err(p, "adding the video stream", e))?;
        stream.set_time_base(enc_tb);
        stream.set_parameters(&encoder);
        let stream = stream.index();

        let sws = scaling::Context::get(
            Pixel::RGB24,
            opts.width,
            opts.height,
            pix,
            opts.width,
            opts.height,
            scaling::Flags::BICUBIC | scaling::Flags::ACCURATE_RND | scaling::Flags::FULL_CHR_H_INP,
        )
        .map_err(|e| unsupported(p, format!("cannot convert RGB24 to {pix:?}: {e}")))?;
        let mut scaler = Scaler(sws);
        if ff::is_yuv(pix) {
            ff::set_yuv_details(
                &mut scaler,
                false,
                ff::sws_colorspace(ffmpeg::color::Space::BT709, opts.height),
                false,
            );
        }
        let mut yuv = frame::Video::new(pix, opts.width, opts.height);
        if ff::is_yuv(pix) {
            yuv.set_color_space(ffmpeg::color::Space::BT709);
            yuv.set_color_range(ffmpeg::color::Range::MPEG);
            yuv.set_color_primaries(ffmpeg::color::Primaries::BT709);
            yuv.set_color_transfer_characteristic(ffmpeg::color::TransferCharacteristic::BT709);
        }
        // One nominal frame (1/fps) in encoder ticks: the duration each packet is given.
        let frame_ticks = ((f64::from(enc_tb.denominator()) * f64::from(opts.fps.den))
            / (f64::from(enc_tb.numerator()) * f64::from(opts.fps.num)))
        .round()
        .max(1.0) as i64;
        Ok(VideoTrack {
            encoder,
            route: Route {
                stream,
                enc_tb,
                stream_tb: enc_tb,
                default_duration: Some(frame_ticks),
            },
            scaler,
            rgb: frame::Video::new(Pixel::RGB24, opts.width, opts.height),
            yuv,
            width: opts.width,
            height: opts.height,
            last_pts: None,
            frames: 0,
            encoder_name,
        })
    }

    fn write(
        &mut self,
        p: &str,
        output: &mut Output,
        rgb: &[u8],
        pts_s: f64,
    ) -> Result<(), MediaError> {
        let (w, h) = (self.width as usize, self.height as usize);
        if rgb.len() != w * h * 3 {
            return Err(MediaError::Mismatch {
                path: p.to_string(),
                reason: format!(
                    "frame {} has {} bytes; a {w}x{h} RGB24 frame has {}",
                    self.frames,
                    rgb.len(),
                    w * h * 3
                ),
            });
        }
        if !pts_s.is_finite() {
            return Err(MediaError::Mismatch {
                path: p.to_string(),
                reason: format!("frame {} has pts {pts_s}", self.frames),
            });
        }
        let tb = self.route.enc_tb;
        let pts = (pts_s * tb.denominator() as f64 / tb.numerator() as f64).round() as i64;
        if let Some(last) = self.last_pts {
            if pts <= last {
                return Err(MediaError::Mismatch {
                    path: p.to_string(),
                    reason: format!(
                        "frame {} at {pts_s} s is not after the previous frame (at tick {last} of \
                         {}/{} s); timestamps must increase",
                        self.frames,
                        tb.numerator(),
                        tb.denominator()
                    ),
                });
            }
        }
        let row = w * 3;
        let stride = self.rgb.stride(0);
        let data = self.rgb.data_mut(0);
        for (y, src) in rgb.chunks_exact(row).enumerate() {
            data[y * stride..y * stride + row].copy_from_slice(src);
        }
        // SAFETY of the pointer: `self.yuv` is ours and allocated; see `make_writable`.
        make_writable(unsafe { self.yuv.as_mut_ptr() })
            .map_err(|e| codec_err(p, "reallocating the frame buffer", e))?;
        self.scaler
            .0
            .run(&self.rgb, &mut self.yuv)
            .map_err(|e| codec_err(p, "converting RGB to the encoder's format", e))?;
        self.yuv.set_pts(Some(pts));
        self.encoder.send_frame(&self.yuv).map_err(|e| {
            codec_err(
                p,
                &format!("{} refused frame {}", self.encoder_name, self.frames),
                e,
            )
        })?;
        self.last_pts = Some(pts);
        self.frames += 1;
        drain(&mut self.encoder, output, self.route, p, self.encoder_name)
    }

    fn finish(&mut self, p: &str, output: &mut Output) -> Result<(), MediaError> {
        self.encoder
            .send_eof()
            .map_err(|e| codec_err(p, "flushing the video encoder", e))?;
        drain(&mut self.encoder, output, self.route, p, self.encoder_name)
    }
}

impl AudioTrack {
    fn new(
        p: &str,
        output: &mut Output,
        muxer: &str,
        spec: AudioSpec,
        global_header: bool,
    ) -> Result<Self, MediaError> {
        if spec.sample_rate == 0 || spec.channels == 0 {
            return Err(unsupported(
                p,
                format!(
                    "audio of {} Hz, {} channels",
                    spec.sample_rate, spec.channels
                ),
            ));
        }
        // WebM takes Vorbis or Opus only; everything else here takes AAC.
        let candidates: &[&'static str] = if muxer == "webm" {
            &["libopus"]
        } else {
            &["aac"]
        };
        let (encoder_name, enc_codec) = candidates
            .iter()
            .find_map(|n| ffmpeg::encoder::find_by_name(n).map(|c| (*n, c)))
            .ok_or_else(|| {
                unsupported(
                    p,
                    format!(
                        "no audio encoder for {muxer} in this ffmpeg build (looked for {})",
                        candidates.join(", ")
                    ),
                )
            })?;
        let caps = enc_codec.audio().ok();
        if let Some(rates) = caps.as_ref().and_then(|a| a.rates()) {
            let rates: Vec<i32> = rates.collect();
            if !rates.is_empty() && !rates.contains(&(spec.sample_rate as i32)) {
                return Err(unsupported(
                    p,
                    format!(
                        "{encoder_name} takes {rates:?} Hz, not {} Hz; resample first \
                         (audio::Resampler)",
                        spec.sample_rate
                    ),
                ));
            }
        }
        let formats: Vec<Sample> = caps
            .as_ref()
            .and_then(|a| a.formats())
            .map(|f| f.collect())
            .unwrap_or_default();
        let preferred = [
            Sample::F32(ffmpeg::format::sample::Type::Planar),
            Sample::F32(ffmpeg::format::sample::Type::Packed),
            Sample::I16(ffmpeg::format::sample::Type::Planar),
            Sample::I16(ffmpeg::format::sample::Type::Packed),
        ];
        let format = preferred
            .iter()
            .copied()
            .find(|f| formats.contains(f))
            .ok_or_else(|| {
                unsupported(
                    p,
                    format!(
                        "{encoder_name} takes none of the sample formats f32/s16 ({formats:?})"
                    ),
                )
            })?;
        let layout = ChannelLayout::default(i32::from(spec.channels));
        let enc_tb = ffmpeg::Rational::new(1, spec.sample_rate as i32);

        let mut enc = codec::Context::new_with_codec(enc_codec)
            .encoder()
            .audio()
            .map_err(|e| codec_err(p, "creating the audio encoder", e))?;
        enc.set_rate(spec.sample_rate as i32);
        enc.set_format(format);
        enc.set_channel_layout(layout);
        enc.set_time_base(enc_tb);
        // 64 kb/s per channel: transparent for AAC-LC and Opus at speech/music rates.
        enc.set_bit_rate(64_000 * usize::from(spec.channels));
        if global_header {
            enc.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let encoder = enc.open_as(enc_codec).map_err(|e| {
            unsupported(
                p,
                format!(
                    "{encoder_name} refused {} Hz, {} channels: {e}",
                    spec.sample_rate, spec.channels
                ),
            )
        })?;
        let caps_flags = enc_codec.capabilities();
        let variable = caps_flags.contains(codec::Capabilities::VARIABLE_FRAME_SIZE);
        let frame_size = match encoder.frame_size() as usize {
            0 => 1024,
            n => n,
        };
        let small_last_frame =
            variable || caps_flags.contains(codec::Capabilities::SMALL_LAST_FRAME);

        let mut stream = output
            .add_stream(enc_codec)
            .map_err(|e| codec_err(p, "adding the audio stream", e))?;
        stream.set_time_base(enc_tb);
        stream.set_parameters(&encoder);
        let stream = stream.index();
        Ok(AudioTrack {
            encoder,
            route: Route {
                stream,
                enc_tb,
                stream_tb: enc_tb,
                // Audio encoders give every packet its duration.
                default_duration: None,
            },
            spec,
            layout,
            format,
            frame_size,
            small_last_frame,
            pending: vec![Vec::with_capacity(frame_size); usize::from(spec.channels)],
            next_pts: 0,
            encoder_name,
        })
    }

    fn write(
        &mut self,
        p: &str,
        output: &mut Output,
        planar: &[Vec<f32>],
    ) -> Result<(), MediaError> {
        let n = crate::audio::check_planar(p, planar, usize::from(self.spec.channels))?;
        let mut offset = 0;
        // Top up the pending frame first, then encode whole frames straight from the input.
        if !self.pending[0].is_empty() {
            let take = (self.frame_size - self.pending[0].len()).min(n);
            for (pend, ch) in self.pending.iter_mut().zip(planar) {
                pend.extend_from_slice(&ch[..take]);
            }
            offset = take;
            if self.pending[0].len() == self.frame_size {
                let pending = std::mem::take(&mut self.pending);
                let slices: Vec<&[f32]> = pending.iter().map(|c| c.as_slice()).collect();
                let sent = self.send(p, output, &slices);
                self.pending = pending;
                self.pending.iter_mut().for_each(|c| c.clear());
                sent?;
            }
        }
        while n - offset >= self.frame_size {
            let slices: Vec<&[f32]> = planar
                .iter()
                .map(|c| &c[offset..offset + self.frame_size])
                .collect();
            self.send(p, output, &slices)?;
            offset += self.frame_size;
        }
        for (pend, ch) in self.pending.iter_mut().zip(planar) {
            pend.extend_from_slice(&ch[offset..]);
        }
        Ok(())
    }

    /// Encodes one frame of `planar[c].len()` samples (all channels equally long).
    fn send(&mut self, p: &str, output: &mut Output, planar: &[&[f32]]) -> Result<(), MediaError> {
        let n = planar[0].len();
        let mut frame = frame::Audio::new(self.format, n, self.layout);
        frame.set_rate(self.spec.sample_rate);
        frame.set_pts(Some(self.next_pts));
        fill_audio_frame(&mut frame, self.format, planar);
        self.encoder
            .send_frame(&frame)
            .map_err(|e| codec_err(p, &format!("{} refused audio", self.encoder_name), e))?;
        self.next_pts += n as i64;
        drain(&mut self.encoder, output, self.route, p, self.encoder_name)
    }

    fn finish(&mut self, p: &str, output: &mut Output) -> Result<(), MediaError> {
        if !self.pending[0].is_empty() {
            let mut pending = std::mem::take(&mut self.pending);
            if !self.small_last_frame {
                pending
                    .iter_mut()
                    .for_each(|c| c.resize(self.frame_size, 0.0));
            }
            let slices: Vec<&[f32]> = pending.iter().map(|c| c.as_slice()).collect();
            self.send(p, output, &slices)?;
        }
        self.encoder
            .send_eof()
            .map_err(|e| codec_err(p, "flushing the audio encoder", e))?;
        drain(&mut self.encoder, output, self.route, p, self.encoder_name)
    }
}

/// Writes planar f32 samples into a frame of the encoder's sample format.
fn fill_audio_frame(frame: &mut frame::Audio, format: Sample, planar: &[&[f32]]) {
    use ffmpeg::format::sample::Type;
    let channels = planar.len();
    let n = planar[0].len();
    let to_i16 = |v: f32| (v.clamp(-1.0, 1.0) * 32767.0).round() as i16;
    match format {
        Sample::F32(Type::Planar) => {
            for (c, ch) in planar.iter().enumerate() {
                let dst = frame.data_mut(c);
                for (d, s) in dst.chunks_exact_mut(4).zip(ch.iter()) {
                    d.copy_from_slice(&s.to_ne_bytes());
                }
            }
        }
        Sample::F32(Type::Packed) => {
            let dst = frame.data_mut(0);
            for i in 0..n {
                for (c, ch) in planar.iter().enumerate() {
                    let o = (i * channels + c) * 4;
                    dst[o..o + 4].copy_from_slice(&ch[i].to_ne_bytes());
                }
            }
        }
        Sample::I16(Type::Planar) => {
            for (c, ch) in planar.iter().enumerate() {
                let dst = frame.data_mut(c);
                for (d, s) in dst.chunks_exact_mut(2).zip(ch.iter()) {
                    d.copy_from_slice(&to_i16(*s).to_ne_bytes());
                }
            }
        }
        Sample::I16(Type::Packed) => {
            let dst = frame.data_mut(0);
            for i in 0..n {
                for (c, ch) in planar.iter().enumerate() {
                    let o = (i * channels + c) * 2;
                    dst[o..o + 2].copy_from_slice(&to_i16(ch[i]).to_ne_bytes());
                }
            }
        }
        _ => unreachable!("AudioTrack::new only picks f32 or s16 formats"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_follows_the_extension() {
        assert_eq!(muxer_for(Path::new("a.MP4")), Some("mp4"));
        assert_eq!(muxer_for(Path::new("a.mkv")), Some("matroska"));
        assert_eq!(muxer_for(Path::new("a.webm")), Some("webm"));
        assert_eq!(muxer_for(Path::new("a.mov")), Some("mov"));
        assert_eq!(muxer_for(Path::new("a.avi")), None);
        assert_eq!(muxer_for(Path::new("noext")), None);
    }

    #[test]
    fn packed_s16_frames_interleave_and_clamp() {
        let fmt = Sample::I16(ffmpeg::format::sample::Type::Packed);
        let mut frame = frame::Audio::new(fmt, 2, ChannelLayout::STEREO);
        fill_audio_frame(&mut frame, fmt, &[&[0.5, 2.0], &[-1.0, 0.0]]);
        let d = frame.data(0);
        let got: Vec<i16> = d[..8]
            .chunks_exact(2)
            .map(|b| i16::from_ne_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(got, vec![16384, -32767, 32767, 0]);
    }
}
