//! `GetVideoComponents` (ComfyUI's name; input `video`; outputs `images`, `audio`, `fps`):
//! the video's frames as one `IMAGE` batch (decoded and processed window by window into it;
//! the batch is whole, so the planner counts it and refuses what cannot fit), its audio track
//! (silence of the video's length when it has none) and its frame rate. When every reader of
//! the batch runs per frame down to a `CreateVideo` (ComfyUI's way to filter a video), the
//! batch is handed on as the video itself, so the clip is decoded and filtered window by
//! window by the node that consumes the video, in bounded memory.

use super::{video_info, video_input};
use crate::spec::{link, out};
use nova_dataflow::{
    Args, AudioMeta, AudioStream, DataType, ExecContext, ImageInfo, Inputs, JobEnv, Node,
    NodeError, NodeOutput, NodeSchema, Value, ValueInfo,
};
use nova_engines::video::{CollectFrames, VideoWindows};

/// The node.
pub struct GetVideoComponents {
    schema: NodeSchema,
}

impl GetVideoComponents {
    pub fn new() -> Self {
        GetVideoComponents {
            schema: NodeSchema {
                class_type: "GetVideoComponents",
                display_name: "Get Video Components",
                category: "image/video",
                description: "Splits a video into its frames, audio and frame rate.",
                inputs: vec![link("video", DataType::Video)],
                outputs: vec![
                    out("images", DataType::Image),
                    out("audio", DataType::Audio),
                    out("fps", DataType::Float),
                ],
                output_node: false,
            },
        }
    }
}

/// Stereo silence at 44.1 kHz for `seconds` (ComfyUI gives no audio; NOVA's AUDIO is never
/// missing, so a video without a track has silence).
fn silence(seconds: f64) -> AudioMeta {
    AudioMeta {
        sample_rate: 44100,
        channels: 2,
        frames: (seconds * 44100.0).round() as u64,
    }
}

impl Node for GetVideoComponents {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        _: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let s = video_info(inputs, "video")?;
        let m = s.out;
        Ok(vec![
            ValueInfo::Image(ImageInfo {
                batch: m.frames as usize,
                height: m.height,
                width: m.width,
                channels: 3,
            }),
            ValueInfo::Audio(m.audio.unwrap_or(silence(m.frames as f64 / m.fps()))),
            ValueInfo::Scalar,
        ])
    }
    fn batch_port(&self) -> Option<usize> {
        Some(0)
    }

    fn infer_streamed(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let mut out = self.infer(args, inputs, env)?;
        out[0] = ValueInfo::Video(video_info(inputs, "video")?);
        Ok(out)
    }

    fn execute_streamed(
        &self,
        _: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        // The video itself stands for its frames: whatever consumes it decodes them window
        // by window.
        let video = video_input(&inputs, "video")?;
        let m = video.meta();
        let audio = match video.audio() {
            Some(a) => a.clone(),
            None => {
                let s = silence(m.frames as f64 / m.fps());
                AudioStream::from_planar(s.sample_rate, vec![vec![0.0; s.frames as usize]; 2])
            }
        };
        Ok(NodeOutput {
            values: vec![
                Value::Video(video.clone()),
                Value::Audio(audio),
                Value::Float(m.fps()),
            ],
            ui: None,
        })
    }

    fn execute(
        &self,
        _: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let video = video_input(&inputs, "video")?;
        let m = video.meta();
        let out = VideoWindows::run_whole(&video, 16, CollectFrames::factory())?;
        let images = out
            .values
            .into_iter()
            .next()
            .ok_or_else(|| NodeError::Other("no frames were collected".into()))?;
        let audio = match video.audio() {
            Some(a) => a.clone(),
            None => {
                let s = silence(m.frames as f64 / m.fps());
                AudioStream::from_planar(s.sample_rate, vec![vec![0.0; s.frames as usize]; 2])
            }
        };
        Ok(NodeOutput {
            values: vec![images, Value::Audio(audio), Value::Float(m.fps())],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(GetVideoComponents);
