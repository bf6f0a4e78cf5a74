//! `LoadVideo` (ComfyUI's name and input `file`): a video from the input folder as a lazy
//! stream — decoded by ffmpeg one frame at a time when consumed, presentation times kept,
//! the audio track (if any) a lazy audio stream of the same file. The container is probed at
//! validation: a missing, empty, truncated or unsupported file is refused naming the file.

use crate::audio::load::FileAudio;
use crate::audio::media_error;
use crate::spec::{input_file, out};
use candle_core::{Device, Tensor};
use nova_dataflow::{
    Args, DataType, ExecContext, Frame, FrameCursor, FrameSource, Inputs, JobEnv, Node, NodeError,
    NodeOutput, NodeSchema, Value, ValueInfo, VideoMeta, VideoStream,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A video file as a frame source.
pub struct FileFrames {
    path: PathBuf,
    meta: VideoMeta,
    signature: u64,
}

impl FileFrames {
    /// Reads the container's header (and counts frames when it does not say).
    pub fn probe(path: &Path) -> Result<(FileFrames, Option<FileAudio>), NodeError> {
        let info = nova_media::video::probe(path).map_err(media_error)?;
        let frames = match info.frames.filter(|n| *n > 0) {
            Some(n) => n,
            None => {
                let mut r = nova_media::video::VideoReader::open(path).map_err(media_error)?;
                let mut n = 0u64;
                while r.next_frame().map_err(media_error)?.is_some() {
                    n += 1;
                }
                n
            }
        };
        if frames == 0 {
            return Err(NodeError::File {
                path: path.display().to_string(),
                reason: "the video stream has no frames".into(),
            });
        }
        let audio = match info.audio {
            Some(_) => Some(FileAudio::probe(path)?),
            None => None,
        };
        let (len, mtime) = std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().ok()))
            .unwrap_or((0, None));
        let meta = VideoMeta {
            width: info.width as usize,
            height: info.height as usize,
            frames,
            fps_num: info.fps.num.max(1) as u32,
            fps_den: info.fps.den.max(1) as u32,
            audio: None,
        };
        Ok((
            FileFrames {
                path: path.to_path_buf(),
                meta,
                signature: crate::audio::signature((path, len, mtime)),
            },
            audio,
        ))
    }

    /// The file as a stream, with its audio track.
    pub fn stream(path: &Path) -> Result<VideoStream, NodeError> {
        let (frames, audio) = Self::probe(path)?;
        let meta = frames.meta;
        Ok(VideoStream::new(
            Arc::new(frames),
            meta,
            audio.map(FileAudio::stream),
        ))
    }
}

impl FrameSource for FileFrames {
    fn open(&self) -> Result<Box<dyn FrameCursor>, NodeError> {
        let reader = nova_media::video::VideoReader::open(&self.path).map_err(media_error)?;
        Ok(Box::new(FileCursor {
            reader,
            path: self.path.clone(),
            size: (self.meta.width, self.meta.height),
        }))
    }
    fn signature(&self) -> u64 {
        self.signature
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

struct FileCursor {
    reader: nova_media::video::VideoReader,
    path: PathBuf,
    size: (usize, usize),
}

impl FrameCursor for FileCursor {
    fn next_frame(&mut self) -> Result<Option<Frame>, NodeError> {
        let Some(f) = self.reader.next_frame().map_err(media_error)? else {
            return Ok(None);
        };
        let (w, h) = (f.width as usize, f.height as usize);
        if (w, h) != self.size {
            return Err(NodeError::File {
                path: self.path.display().to_string(),
                reason: format!(
                    "frame {} is {w}x{h}, the stream is {}x{}",
                    f.index, self.size.0, self.size.1
                ),
            });
        }
        // Hot per frame: one pass from bytes to floats.
        let data: Vec<f32> = f.rgb.iter().map(|&v| v as f32 / 255.0).collect();
        let image = Tensor::from_vec(data, (1, h, w, 3), &Device::Cpu)?;
        Ok(Some(Frame {
            image,
            pts: f.pts_s,
        }))
    }
}

/// The node.
pub struct LoadVideo {
    schema: NodeSchema,
}

impl LoadVideo {
    pub fn new() -> Self {
        LoadVideo {
            schema: NodeSchema {
                class_type: "LoadVideo",
                display_name: "Load Video",
                category: "image/video",
                description: "Streams a video (and its audio) from the input folder.",
                inputs: vec![input_file("file")],
                outputs: vec![out("VIDEO", DataType::Video)],
                output_node: false,
            },
        }
    }

    fn path(args: &Args, env: &JobEnv) -> Result<PathBuf, NodeError> {
        let name = args.string("file")?;
        JobEnv::resolve_in(&env.input_dir, name).map_err(|r| NodeError::input("file", r))
    }
}

impl Node for LoadVideo {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        FileFrames::probe(&Self::path(args, env)?).map(|_| ())
    }
    fn infer(
        &self,
        args: &Args,
        _: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Video(
            FileFrames::stream(&Self::path(args, env)?)?.shape(),
        )])
    }
    fn execute(
        &self,
        args: &Args,
        _: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput {
            values: vec![Value::Video(FileFrames::stream(&Self::path(
                args, &ctx.env,
            )?)?)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(LoadVideo);
