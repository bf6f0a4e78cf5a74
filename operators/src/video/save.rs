//! `SaveVideo` (ComfyUI's name and inputs `video`, `filename_prefix`, `format`, `codec`, plus
//! NOVA's optional `window`, `overlap`, `crf`, `preset`): consumes the stream window by
//! window — a streamed node of the dataflow whose windows are decoded in order, processed in
//! parallel, stitched in order and encoded as they finish, each announced as
//! `output.partial.video` — with the audio track muxed alongside, interleaved by time.

use super::video_info;
use crate::audio::media_error;
use crate::image::save::{release_reservation, reserve_file};
use crate::spec::{combo, int, link, string};
use candle_core::Tensor;
use nova_dataflow::{
    Args, AudioPull, AudioStream, Chunking, DataType, ExecContext, ExecMode, InputSpec, Inputs,
    JobEnv, MemoryEstimate, MemoryQuery, Node, NodeError, NodeMeta, NodeOutput, NodeSchema, Value,
    ValueInfo, VideoShape,
};
use nova_engines::video::{FrameSink, SinkFactory, VideoWindows};
use nova_media::video::{EncodeOptions, Rational, VideoCodec, VideoWriter};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

const FORMATS: &[&str] = &["auto", "mp4", "webm", "mkv", "mov"];
const CODECS: &[&str] = &[
    "auto", "h264", "hevc", "vp9", "av1", "prores", "ffv1", "mpeg4",
];

/// The container and codec `format` and `codec` choose.
fn choose(format: &str, codec: &str) -> Result<(String, VideoCodec), NodeError> {
    let codec = match (codec, format) {
        ("auto", "webm") => VideoCodec::Vp9,
        ("auto", "mov") => VideoCodec::ProRes,
        ("auto", _) => VideoCodec::H264,
        (c, _) => VideoCodec::from_name(c)
            .ok_or_else(|| NodeError::input("codec", format!("unknown codec '{c}'")))?,
    };
    if !codec.encoder_available() {
        return Err(NodeError::input(
            "codec",
            format!("no {} encoder in this machine's ffmpeg", codec.name()),
        ));
    }
    let ext = match format {
        "auto" => codec.default_container().to_string(),
        f => f.to_string(),
    };
    Ok((ext, codec))
}

fn optional(spec: InputSpec) -> InputSpec {
    InputSpec {
        required: false,
        ..spec
    }
}

/// Encodes stitched frames, pulling the audio track up to each frame's time.
struct EncoderSink {
    writer: Option<VideoWriter>,
    audio: Option<(Box<dyn AudioPull>, u32, u16, u64)>,
    fps: f64,
    frames: u64,
    ui: serde_json::Value,
}

impl EncoderSink {
    /// Audio up to `t` seconds into the muxer.
    fn audio_until(&mut self, t: f64) -> Result<(), NodeError> {
        let (Some((pull, rate, channels, written)), Some(w)) =
            (self.audio.as_mut(), self.writer.as_mut())
        else {
            return Ok(());
        };
        let target = (t * *rate as f64).round().max(0.0) as u64;
        while *written < target {
            let want = ((target - *written) as usize).min(1 << 14);
            let chunk = nova_engines::audio::pull_exact(pull.as_mut(), *channels as usize, want)?;
            let got = chunk.first().map_or(0, |c| c.len());
            if got == 0 {
                break;
            }
            w.write_audio(&chunk).map_err(media_error)?;
            *written += got as u64;
        }
        Ok(())
    }
}

impl FrameSink for EncoderSink {
    fn write(&mut self, frame: &Tensor, pts: f64) -> Result<(), NodeError> {
        // One frame to RGB bytes: clamp and round, as ComfyUI does for its outputs.
        let rgb: Vec<u8> = frame
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        if let Some(w) = self.writer.as_mut() {
            w.write_frame(&rgb, pts).map_err(media_error)?;
        }
        self.frames += 1;
        self.audio_until(pts + 1.0 / self.fps.max(1e-9))
    }

    fn finish(mut self: Box<Self>) -> Result<NodeOutput, NodeError> {
        self.audio_until(f64::INFINITY)?;
        if let Some(w) = self.writer.take() {
            w.finish().map_err(media_error)?;
        }
        Ok(NodeOutput {
            values: vec![],
            ui: Some(json!({ "images": [self.ui], "animated": [true] })),
        })
    }
}

fn factory(
    base: PathBuf,
    prefix: String,
    format: String,
    codec: String,
    crf: Option<u32>,
    preset: Option<String>,
) -> SinkFactory {
    Arc::new(move |shape: &VideoShape, audio: Option<&AudioStream>| {
        let (ext, codec) = choose(&format, &codec)?;
        let (path, subfolder, file) = reserve_file(&base, &prefix, &ext)?;
        let m = shape.out;
        let opts = EncodeOptions {
            codec,
            width: m.width as u32,
            height: m.height as u32,
            fps: Rational {
                num: m.fps_num as i32,
                den: m.fps_den.max(1) as i32,
            },
            crf,
            preset: preset.clone(),
            threads: None,
        };
        let opened = (|| -> Result<_, NodeError> {
            Ok(match audio {
                Some(a) => {
                    let am = a.meta();
                    let spec = nova_media::audio::AudioSpec {
                        sample_rate: am.sample_rate,
                        channels: am.channels,
                    };
                    let w = VideoWriter::with_audio(&path, &opts, spec).map_err(media_error)?;
                    (w, Some((a.open()?, am.sample_rate, am.channels, 0u64)))
                }
                None => (
                    VideoWriter::create(&path, &opts).map_err(media_error)?,
                    None,
                ),
            })
        })();
        let (writer, audio) = opened.inspect_err(|_| release_reservation(&path))?;
        Ok(Box::new(EncoderSink {
            writer: Some(writer),
            audio,
            fps: m.fps(),
            frames: 0,
            ui: json!({"filename": file, "subfolder": subfolder, "type": "output", "format": codec.name()}),
        }) as Box<dyn FrameSink>)
    })
}

/// What an encoding sink holds for the whole run: the encoder's frames (its lookahead,
/// references and threads, [`VideoCodec::encoder_memory`]) and one frame on its way in (the
/// f32 frame read back, its 8-bit RGB, the converted YUV).
fn sink_memory(codec: VideoCodec, preset: Option<&str>, shape: &VideoShape) -> u64 {
    let (w, h) = (shape.out.width as u64, shape.out.height as u64);
    let frame_in = w * h * (3 * 4 + 3) + w * h * 3 / 2;
    codec.encoder_memory(w as u32, h as u32, preset) + frame_in
}

/// The node.
pub struct SaveVideo {
    schema: NodeSchema,
}

impl SaveVideo {
    pub fn new() -> Self {
        SaveVideo {
            schema: NodeSchema {
                class_type: "SaveVideo",
                display_name: "Save Video",
                category: "image/video",
                description: "Encodes the video to the output folder, window by window.",
                inputs: vec![
                    link("video", DataType::Video),
                    string("filename_prefix", "video/ComfyUI"),
                    combo("format", FORMATS),
                    combo("codec", CODECS),
                    optional(int("window", 0, 0, 4096)),
                    optional(int("overlap", 0, 0, 256)),
                    optional(int("crf", -1, -1, 63)),
                    optional(combo(
                        "preset",
                        &[
                            "auto",
                            "ultrafast",
                            "superfast",
                            "veryfast",
                            "faster",
                            "fast",
                            "medium",
                            "slow",
                            "slower",
                            "veryslow",
                        ],
                    )),
                ],
                outputs: vec![],
                output_node: true,
            },
        }
    }

    /// `crf` (absent or -1: the encoder's default) and `preset` (absent or `auto`: its
    /// default).
    fn settings(args: &Args) -> (Option<u32>, Option<String>) {
        let crf = args.int("crf").ok().filter(|c| *c >= 0).map(|c| c as u32);
        let preset = args
            .string("preset")
            .ok()
            .filter(|p| *p != "auto")
            .map(str::to_string);
        (crf, preset)
    }

    fn sinks(args: &Args, env: &JobEnv) -> Result<SinkFactory, NodeError> {
        let (crf, preset) = Self::settings(args);
        Ok(factory(
            env.output_dir.clone(),
            args.string("filename_prefix")?.to_string(),
            args.string("format")?.to_string(),
            args.string("codec")?.to_string(),
            crf,
            preset,
        ))
    }

    fn op(args: &Args, env: &JobEnv) -> Result<VideoWindows, NodeError> {
        let overlap = args.int("overlap").unwrap_or(0).max(0) as usize;
        let (_, codec) = choose(args.string("format")?, args.string("codec")?)?;
        let (_, preset) = Self::settings(args);
        Ok(VideoWindows::new(Self::sinks(args, env)?)
            .with_overlap(overlap)
            .with_sink_memory(move |shape| sink_memory(codec, preset.as_deref(), shape)))
    }
}

impl Node for SaveVideo {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn meta(&self) -> NodeMeta {
        NodeMeta {
            modes: vec![ExecMode::Streamed, ExecMode::Atomic],
            ..NodeMeta::default()
        }
    }

    /// Whole, the clip would be decoded and processed at once (the naive plan's figure; the
    /// streamed plan holds only its windows).
    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        let activations = match query.inputs.first() {
            Some(ValueInfo::Video(s)) => {
                let src = (s.source_width * s.source_height * 3 * 4) as u64;
                s.source_frames * (src + s.workspace_per_frame) + s.out.frames * s.out.frame_bytes()
            }
            _ => 0,
        };
        MemoryEstimate {
            activations,
            ..MemoryEstimate::default()
        }
    }

    fn check(&self, args: &Args, _env: &JobEnv) -> Result<(), NodeError> {
        crate::image::save::split_prefix(args.string("filename_prefix")?)?;
        let (_, codec) = choose(args.string("format")?, args.string("codec")?)?;
        // Settings the encoder would refuse after the work are refused now.
        let (crf, preset) = Self::settings(args);
        codec.check_settings(crf, preset.as_deref()).map_err(|m| {
            NodeError::input(
                if m.contains("preset") {
                    "preset"
                } else {
                    "crf"
                },
                m,
            )
        })
    }

    fn infer(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let shape = video_info(inputs, "video")?;
        let (_, codec) = choose(args.string("format")?, args.string("codec")?)?;
        let (w, h) = (shape.out.width, shape.out.height);
        let even = matches!(
            codec,
            VideoCodec::H264 | VideoCodec::H265 | VideoCodec::Vp9 | VideoCodec::Av1
        );
        if even && (w % 2 == 1 || h % 2 == 1) {
            return Err(NodeError::input(
                "video",
                format!("{} needs an even width and height; the video is {w}x{h} (scale it to an even size first)", codec.name()),
            ));
        }
        Ok(vec![])
    }

    fn chunked(&self, args: &Args, _inputs: &Inputs<ValueInfo>, env: &JobEnv) -> Option<Chunking> {
        let op = Self::op(args, env).ok()?;
        let window = args.int("window").unwrap_or(0);
        Some(Chunking {
            input: "video",
            op: Arc::new(op),
            max_tile: (window > 0).then_some(window as usize),
        })
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let video = super::video_input(&inputs, "video")?;
        let window = args.int("window").unwrap_or(0);
        let window = if window > 0 { window as usize } else { 16 };
        Self::op(args, &ctx.env)?.run(&video, window)
    }
}

crate::spec::default_via_new!(SaveVideo);
