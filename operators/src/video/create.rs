//! `CreateVideo` (ComfyUI's name and inputs `images`, `fps`, optional `audio`): an `IMAGE`
//! batch as a video of frames in memory, at a constant rate. Handed a video's frames still as
//! the video (a `GetVideoComponents` batch filtered per frame), it sets the rate and audio on
//! that stream instead, so nothing is decoded until the video is consumed.

use super::super::spec::{float, link, out};
use nova_dataflow::{
    Args, DataType, ExecContext, InputSpec, Inputs, JobEnv, MemoryFrames, Node, NodeError,
    NodeOutput, NodeSchema, Value, ValueInfo, VideoMeta, VideoStream,
};
use std::sync::Arc;

/// The node.
pub struct CreateVideo {
    schema: NodeSchema,
}

impl CreateVideo {
    pub fn new() -> Self {
        CreateVideo {
            schema: NodeSchema {
                class_type: "CreateVideo",
                display_name: "Create Video",
                category: "image/video",
                description: "Makes a video from a batch of images, with optional audio.",
                inputs: vec![
                    link("images", DataType::Image),
                    float("fps", 30.0, 1.0, 120.0, 1.0),
                    InputSpec {
                        required: false,
                        ..link("audio", DataType::Audio)
                    },
                ],
                outputs: vec![out("VIDEO", DataType::Video)],
                output_node: false,
            },
        }
    }
}

/// `fps` as a fraction (thousandths, reduced), as containers store it.
fn rate(fps: f64) -> (u32, u32) {
    let (mut n, mut d) = ((fps * 1000.0).round().max(1.0) as u32, 1000u32);
    let mut a = n;
    let mut b = d;
    while b != 0 {
        (a, b) = (b, a % b);
    }
    n /= a;
    d /= a;
    (n, d)
}

fn meta(images: &ValueInfo, fps: f64) -> Result<VideoMeta, NodeError> {
    let i = images
        .image()
        .ok_or_else(|| NodeError::input("images", "expected an IMAGE batch"))?;
    if i.channels != 3 {
        return Err(NodeError::input(
            "images",
            format!("{} channels; a video frame has 3", i.channels),
        ));
    }
    let (fps_num, fps_den) = rate(fps);
    Ok(VideoMeta {
        width: i.width,
        height: i.height,
        frames: i.batch as u64,
        fps_num,
        fps_den,
        audio: None,
    })
}

impl Node for CreateVideo {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn takes_video(&self, input: &str) -> bool {
        input == "images"
    }

    fn infer(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let images = inputs.require("images")?;
        if let ValueInfo::Video(mut s) = *images {
            // A video's frames, at this rate, with this audio (or none).
            let (fps_num, fps_den) = rate(args.float("fps")?);
            s.out.fps_num = fps_num;
            s.out.fps_den = fps_den;
            s.out.audio = match inputs.get("audio") {
                Some(ValueInfo::Audio(a)) => Some(*a),
                _ => None,
            };
            return Ok(vec![ValueInfo::Video(s)]);
        }
        let mut m = meta(images, args.float("fps")?)?;
        if let Some(ValueInfo::Audio(a)) = inputs.get("audio") {
            m.audio = Some(*a);
        }
        let frames = MemoryFrames {
            frames: candle_core::Tensor::zeros(
                (0, 1, 1, 3),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?,
            pts: vec![],
            key: 0,
            cached: false,
        };
        let mut s = VideoStream::new(Arc::new(frames), m, None).shape();
        s.out.audio = m.audio;
        Ok(vec![ValueInfo::Video(s)])
    }
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let fps = args.float("fps")?;
        let audio = inputs.get("audio").and_then(|v| v.as_audio()).cloned();
        if let Some(video) = inputs.get("images").and_then(|v| v.as_video()) {
            let (num, den) = rate(fps);
            return Ok(NodeOutput {
                values: vec![Value::Video(video.with_rate(num, den).with_audio(audio))],
                ui: None,
            });
        }
        let images = inputs.image("images")?.clone();
        let m = meta(&Value::image(images.clone()).info(), fps)?;
        let frames = MemoryFrames::at_rate(images, m.fps())?;
        Ok(NodeOutput {
            values: vec![Value::Video(VideoStream::new(Arc::new(frames), m, audio))],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(CreateVideo);

#[cfg(test)]
mod tests {
    #[test]
    fn frame_rates_become_reduced_fractions() {
        assert_eq!(super::rate(30.0), (30, 1));
        assert_eq!(super::rate(29.97), (2997, 100));
        assert_eq!(super::rate(23.976), (2997, 125));
    }
}
