//! `VideoCodec`: the video codecs NOVA writes, which FFmpeg encoder implements each, and how
//! that encoder takes a quality setting.
//!
//! Invariants: the encoder for a codec is the first of its candidate names that this process's
//! libavcodec has (so [`VideoCodec::encoder_available`] and the writer always agree); names
//! are FFmpeg's, as `ffmpeg -encoders` and `ffprobe` print them.

use ffmpeg_next as ffmpeg;

/// A video codec NOVA can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    H264,
    H265,
    Vp9,
    Av1,
    ProRes,
    Ffv1,
    Mpeg4,
}

/// How an encoder takes `EncodeOptions::crf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QualityKnob {
    /// A private `crf` option (x264, x265, libvpx, libaom, SVT-AV1); bit rate is cleared so
    /// that the rate is governed by quality alone.
    Crf,
    /// A fixed quantiser through `qscale` (`global_quality`, 1 best .. 31 worst): mpeg4, ProRes.
    QScale,
    /// Lossless: no quality setting applies (FFV1).
    Lossless,
}

impl VideoCodec {
    /// Every codec, in a fixed order.
    pub const ALL: [VideoCodec; 7] = [
        VideoCodec::H264,
        VideoCodec::H265,
        VideoCodec::Vp9,
        VideoCodec::Av1,
        VideoCodec::ProRes,
        VideoCodec::Ffv1,
        VideoCodec::Mpeg4,
    ];

    /// Parses a codec or encoder name as FFmpeg spells it (`h264`, `libx264`, `hevc`, `vp9`,
    /// `libsvtav1`, `prores_ks`, ...), case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "h264" | "avc" | "libx264" => VideoCodec::H264,
            "hevc" | "h265" | "libx265" => VideoCodec::H265,
            "vp9" | "libvpx-vp9" => VideoCodec::Vp9,
            "av1" | "libaom-av1" | "libsvtav1" => VideoCodec::Av1,
            "prores" | "prores_ks" => VideoCodec::ProRes,
            "ffv1" => VideoCodec::Ffv1,
            "mpeg4" => VideoCodec::Mpeg4,
            _ => return None,
        })
    }

    /// FFmpeg's codec name (what `ffprobe` reports as `codec_name`).
    pub fn name(self) -> &'static str {
        match self {
            VideoCodec::H264 => "h264",
            VideoCodec::H265 => "hevc",
            VideoCodec::Vp9 => "vp9",
            VideoCodec::Av1 => "av1",
            VideoCodec::ProRes => "prores",
            VideoCodec::Ffv1 => "ffv1",
            VideoCodec::Mpeg4 => "mpeg4",
        }
    }

    /// The FFmpeg encoders that implement this codec, in order of preference.
    pub(crate) fn encoder_names(self) -> &'static [&'static str] {
        match self {
            VideoCodec::H264 => &["libx264"],
            VideoCodec::H265 => &["libx265"],
            VideoCodec::Vp9 => &["libvpx-vp9"],
            // libaom is the reference encoder; SVT-AV1 is the fallback where libaom is absent.
            VideoCodec::Av1 => &["libaom-av1", "libsvtav1"],
            VideoCodec::ProRes => &["prores_ks"],
            VideoCodec::Ffv1 => &["ffv1"],
            VideoCodec::Mpeg4 => &["mpeg4"],
        }
    }

    /// The encoder this process would use, if libavcodec has one.
    pub(crate) fn find_encoder(self) -> Option<ffmpeg::Codec> {
        crate::ff::init();
        self.encoder_names()
            .iter()
            .find_map(|n| ffmpeg::encoder::find_by_name(n))
    }

    /// The name of the encoder [`VideoWriter`](super::VideoWriter) would use here, if any.
    pub fn encoder_name(self) -> Option<&'static str> {
        crate::ff::init();
        self.encoder_names()
            .iter()
            .copied()
            .find(|n| ffmpeg::encoder::find_by_name(n).is_some())
    }

    /// Whether this process's libavcodec has an encoder for this codec.
    pub fn encoder_available(self) -> bool {
        self.find_encoder().is_some()
    }

    /// The container extension this codec is most at home in.
    pub fn default_container(self) -> &'static str {
        match self {
            VideoCodec::H264 | VideoCodec::H265 | VideoCodec::Mpeg4 => "mp4",
            VideoCodec::Vp9 => "webm",
            VideoCodec::Av1 | VideoCodec::Ffv1 => "mkv",
            VideoCodec::ProRes => "mov",
        }
    }

    /// Private options that keep an encoder's own logger (which ignores FFmpeg's log level)
    /// to errors, for the encoder named `encoder`.
    pub(crate) fn quiet_options(encoder: &str) -> &'static [(&'static str, &'static str)] {
        match encoder {
            "libx265" => &[("x265-params", "log-level=error")],
            _ => &[],
        }
    }

    /// Checks a quality (`crf`) and speed preset against what this codec's encoder takes,
    /// without encoding anything: what [`VideoWriter`](super::VideoWriter) would refuse
    /// after the work is refused here, before it (a preset for an encoder that has none,
    /// a quantiser out of range, a quality for a lossless codec).
    pub fn check_settings(self, crf: Option<u32>, preset: Option<&str>) -> Result<(), String> {
        let Some(enc_codec) = self.find_encoder() else {
            return Err(format!("no {} encoder in this ffmpeg build", self.name()));
        };
        let encoder = self.encoder_name().unwrap_or("the encoder");
        let mut ctx = ffmpeg::codec::Context::new_with_codec(enc_codec);
        if let Some(q) = crf {
            match self.quality_knob() {
                QualityKnob::Crf => crate::ff::set_private_option(&mut ctx, "crf", &q.to_string())
                    .map_err(|e| format!("{encoder} refuses crf {q}: {e}"))?,
                QualityKnob::QScale if !(1..=31).contains(&q) => {
                    return Err(format!(
                        "{encoder} takes a quantiser 1..=31 as crf, got {q}"
                    ))
                }
                QualityKnob::QScale => {}
                QualityKnob::Lossless => {
                    return Err(format!("{} is lossless; crf does not apply", self.name()))
                }
            }
        }
        if let Some(p) = preset {
            crate::ff::set_private_option(&mut ctx, "preset", p)
                .map_err(|e| format!("{encoder} refuses preset {p:?}: {e}"))?;
        }
        Ok(())
    }

    /// Memory the encoder holds while it encodes `width`x`height` frames with `preset` (the
    /// encoder's default when `None`): its lookahead, reference and threading frames. A model
    /// fitted to measurements, not a bound: peak resident memory of FFmpeg 5.1 encoding
    /// 640x360 and 1280x720 test video on a 2-core machine (threads auto), less the same
    /// decoding into a null sink, gives `bytes_per_pixel * pixels + fixed`; the figures below
    /// are those fits, rounded up (x264 `medium`: 213 B/px + 12 MB; `ultrafast` 31 B/px; ProRes
    /// 13 B/px). Encoders keep more frames in flight with more threads: the estimate grows
    /// with the machine's cores beyond two (a quarter per core, at most four times).
    pub fn encoder_memory(self, width: u32, height: u32, preset: Option<&str>) -> u64 {
        const MB: u64 = 1 << 20;
        let (per_px, fixed): (u64, u64) = match self {
            VideoCodec::H264 => match preset.unwrap_or("medium") {
                "ultrafast" => (32, 0),
                "superfast" => (84, 5 * MB),
                "veryfast" => (112, 6 * MB),
                "faster" => (146, 8 * MB),
                "fast" => (176, 11 * MB),
                "slow" => (258, 15 * MB),
                "slower" => (314, 18 * MB),
                "veryslow" | "placebo" => (458, 13 * MB),
                _ => (218, 12 * MB),
            },
            VideoCodec::H265 => (185, 38 * MB),
            VideoCodec::Vp9 => (137, 32 * MB),
            VideoCodec::Av1 => (161, 58 * MB),
            VideoCodec::ProRes => (13, MB),
            VideoCodec::Ffv1 => (164, MB),
            VideoCodec::Mpeg4 => (25, MB),
        };
        // A quarter more per core beyond two, at most four times the 2-core figure.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        let scale_pct = (100 + 25 * cores.saturating_sub(2)).min(400);
        width as u64 * height as u64 * per_px * scale_pct / 100 + fixed
    }

    pub(crate) fn quality_knob(self) -> QualityKnob {
        match self {
            VideoCodec::H264 | VideoCodec::H265 | VideoCodec::Vp9 | VideoCodec::Av1 => {
                QualityKnob::Crf
            }
            VideoCodec::ProRes | VideoCodec::Mpeg4 => QualityKnob::QScale,
            VideoCodec::Ffv1 => QualityKnob::Lossless,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_encoder_aliases_parse() {
        for c in VideoCodec::ALL {
            assert_eq!(VideoCodec::from_name(c.name()), Some(c));
            for e in c.encoder_names() {
                assert_eq!(VideoCodec::from_name(e), Some(c), "{e}");
            }
        }
        assert_eq!(VideoCodec::from_name("LibX264"), Some(VideoCodec::H264));
        assert_eq!(VideoCodec::from_name("theora"), None);
    }

    #[test]
    fn availability_agrees_with_the_encoder_name() {
        for c in VideoCodec::ALL {
            assert_eq!(c.encoder_available(), c.encoder_name().is_some(), "{c:?}");
        }
    }
}
