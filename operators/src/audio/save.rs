//! `SaveAudio` and `PreviewAudio` (ComfyUI's names and inputs): pull the stream chunk by
//! chunk — a streamed node of the dataflow, each chunk a timestamped record announced as
//! `output.partial.audio` when final — and write a 32-bit float WAV (lossless for the
//! engine's samples) to the output or temp folder. ComfyUI writes FLAC here; NOVA writes WAV
//! so that nothing is lost and every player reads it.

use super::media_error;
use crate::image::save::{release_reservation, reserve_file};
use crate::spec::{link, string};
use nova_dataflow::{
    Args, AudioMeta, Chunking, DataType, ExecContext, ExecMode, Inputs, Node, NodeError, NodeMeta,
    NodeOutput, NodeSchema, Value, ValueInfo,
};
use nova_engines::audio::{AudioChunks, AudioSink, AudioSinkFactory};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// Writes chunks into a WAV file.
struct WavSink {
    writer: nova_media::audio::WavWriter,
    ui: serde_json::Value,
}

impl AudioSink for WavSink {
    fn write(&mut self, chunk: &[Vec<f32>]) -> Result<(), NodeError> {
        self.writer.write(chunk).map_err(media_error)
    }
    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError> {
        self.writer.finish().map_err(media_error)?;
        Ok(NodeOutput {
            values: vec![],
            ui: Some(json!({ "audio": [self.ui] })),
        })
    }
}

fn factory(base: PathBuf, prefix: String, kind: &'static str) -> AudioSinkFactory {
    Arc::new(move |m: &AudioMeta| {
        let (path, subfolder, file) = reserve_file(&base, &prefix, "wav")?;
        let spec = nova_media::audio::AudioSpec {
            sample_rate: m.sample_rate,
            channels: m.channels,
        };
        let writer =
            nova_media::audio::WavWriter::create(&path, spec, nova_media::audio::SampleFormat::F32)
                .map_err(|e| {
                    release_reservation(&path);
                    media_error(e)
                })?;
        Ok(Box::new(WavSink {
            writer,
            ui: json!({"filename": file, "subfolder": subfolder, "type": kind}),
        }) as Box<dyn AudioSink>)
    })
}

/// The nodes: `SaveAudio` (output folder) and `PreviewAudio` (temp folder).
pub struct SaveAudio {
    schema: NodeSchema,
    temp: bool,
}

impl SaveAudio {
    pub fn new() -> Self {
        SaveAudio {
            schema: NodeSchema {
                class_type: "SaveAudio",
                display_name: "Save Audio",
                category: "audio",
                description: "Writes the audio to the output folder as WAV, chunk by chunk.",
                inputs: vec![
                    link("audio", DataType::Audio),
                    string("filename_prefix", "audio/ComfyUI"),
                ],
                outputs: vec![],
                output_node: true,
            },
            temp: false,
        }
    }

    pub fn preview() -> Self {
        SaveAudio {
            schema: NodeSchema {
                class_type: "PreviewAudio",
                display_name: "Preview Audio",
                category: "audio",
                description: "Writes the audio to the temp folder for playback, chunk by chunk.",
                inputs: vec![link("audio", DataType::Audio)],
                outputs: vec![],
                output_node: true,
            },
            temp: true,
        }
    }

    fn sinks(
        &self,
        args: &Args,
        env: &nova_dataflow::JobEnv,
    ) -> Result<AudioSinkFactory, NodeError> {
        Ok(if self.temp {
            factory(env.temp_dir.clone(), "ComfyUI_temp_audio".into(), "temp")
        } else {
            factory(
                env.output_dir.clone(),
                args.string("filename_prefix")?.to_string(),
                "output",
            )
        })
    }
}

impl Node for SaveAudio {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn meta(&self) -> NodeMeta {
        NodeMeta {
            modes: vec![ExecMode::Streamed, ExecMode::Atomic],
            ..NodeMeta::default()
        }
    }

    /// Whole, the stream would be pulled into memory at once (the naive plan's figure).
    fn memory(
        &self,
        _args: &Args,
        query: &nova_dataflow::MemoryQuery,
    ) -> nova_dataflow::MemoryEstimate {
        let activations = match query.inputs.first() {
            Some(ValueInfo::Audio(m)) => m.frames * m.channels as u64 * 4 * 2,
            _ => 0,
        };
        nova_dataflow::MemoryEstimate {
            activations,
            ..Default::default()
        }
    }

    fn check(&self, args: &Args, _env: &nova_dataflow::JobEnv) -> Result<(), NodeError> {
        if !self.temp {
            crate::image::save::split_prefix(args.string("filename_prefix")?)?;
        }
        Ok(())
    }

    fn infer(
        &self,
        _: &Args,
        _: &Inputs<ValueInfo>,
        _: &nova_dataflow::JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![])
    }

    fn chunked(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &nova_dataflow::JobEnv,
    ) -> Option<Chunking> {
        let sinks = self.sinks(args, env).ok()?;
        Some(Chunking {
            input: "audio",
            op: Arc::new(AudioChunks::new(sinks)),
            max_tile: None,
        })
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let audio = super::audio_input(&inputs, "audio")?;
        AudioChunks::run_whole(
            &audio,
            audio.meta().sample_rate as usize,
            self.sinks(args, &ctx.env)?,
        )
    }
}

crate::spec::default_via_new!(SaveAudio);
