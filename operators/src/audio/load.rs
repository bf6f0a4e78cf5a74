//! `LoadAudio` (ComfyUI's name and input): an audio file from the input folder — WAV read
//! directly, anything else ffmpeg reads (FLAC, MP3, Ogg, M4A, the audio of a video) decoded
//! by ffmpeg — as a lazy stream. The header is read at validation, so a missing, empty,
//! truncated or unsupported file is refused before any work, naming the file.

use super::media_error;
use crate::spec::{input_file, out};
use nova_dataflow::{
    Args, AudioGraph, AudioMeta, AudioPull, AudioStream, DataType, ExecContext, Inputs, JobEnv,
    Node, NodeError, NodeOutput, NodeSchema, Planar, Value, ValueInfo,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An audio file as a stream source.
pub struct FileAudio {
    path: PathBuf,
    meta: AudioMeta,
    signature: u64,
}

impl FileAudio {
    /// Opens the file's header: its rate, channels and length.
    pub fn probe(path: &Path) -> Result<FileAudio, NodeError> {
        let source = nova_media::audio::open_any(path).map_err(media_error)?;
        let spec = source.spec();
        // The exact length where the file states it (WAV); else the container's duration
        // estimate (a stream that ends early is padded with silence, one that runs longer is
        // cut at the stated length); else counted once, decoding in chunks.
        let estimate = source
            .duration_s()
            .filter(|d| *d > 0.0)
            .map(|d| (d * spec.sample_rate as f64).round() as u64);
        let frames = match source.len_frames().or(estimate) {
            Some(n) => n,
            None => {
                let mut s = source;
                let mut n = 0u64;
                loop {
                    let c = s.read(1 << 16).map_err(media_error)?;
                    let got = c.first().map_or(0, |c| c.len());
                    if got == 0 {
                        break;
                    }
                    n += got as u64;
                }
                n
            }
        };
        if frames == 0 {
            return Err(NodeError::File {
                path: path.display().to_string(),
                reason: "the audio stream is empty (zero samples)".into(),
            });
        }
        let meta = AudioMeta {
            sample_rate: spec.sample_rate,
            channels: spec.channels,
            frames,
        };
        let (len, mtime) = std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().ok()))
            .unwrap_or((0, None));
        Ok(FileAudio {
            path: path.to_path_buf(),
            meta,
            signature: super::signature((path, len, mtime)),
        })
    }

    pub fn stream(self) -> AudioStream {
        AudioStream::new(Arc::new(self))
    }
}

impl AudioGraph for FileAudio {
    fn meta(&self) -> AudioMeta {
        self.meta
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        let source = nova_media::audio::open_any(&self.path).map_err(media_error)?;
        let spec = source.spec();
        if spec.sample_rate != self.meta.sample_rate || spec.channels != self.meta.channels {
            return Err(NodeError::File {
                path: self.path.display().to_string(),
                reason: format!(
                    "changed since it was checked: now {} Hz, {} channels",
                    spec.sample_rate, spec.channels
                ),
            });
        }
        Ok(Box::new(FilePull {
            source,
            channels: spec.channels as usize,
        }))
    }
    fn signature(&self) -> u64 {
        self.signature
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

struct FilePull {
    source: Box<dyn nova_media::audio::AudioSource>,
    channels: usize,
}

impl AudioPull for FilePull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let c = self.source.read(max).map_err(media_error)?;
        if c.is_empty() {
            return Ok(vec![Vec::new(); self.channels]);
        }
        Ok(c)
    }
}

/// The node.
pub struct LoadAudio {
    schema: NodeSchema,
}

impl LoadAudio {
    pub fn new() -> Self {
        LoadAudio {
            schema: NodeSchema {
                class_type: "LoadAudio",
                display_name: "Load Audio",
                category: "audio",
                description: "Streams an audio file from the input folder (WAV, FLAC, MP3, \
                              Ogg, M4A, or a video's audio).",
                inputs: vec![input_file("audio")],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }

    fn path(args: &Args, env: &JobEnv) -> Result<PathBuf, NodeError> {
        let name = args.string("audio")?;
        JobEnv::resolve_in(&env.input_dir, name).map_err(|r| NodeError::input("audio", r))
    }
}

impl Node for LoadAudio {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        FileAudio::probe(&Self::path(args, env)?).map(|_| ())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Audio(
            FileAudio::probe(&Self::path(args, env)?)?.meta(),
        )])
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let audio = FileAudio::probe(&Self::path(args, &ctx.env)?)?.stream();
        Ok(NodeOutput {
            values: vec![Value::Audio(audio)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(LoadAudio);
