//! `AudioFade` (NOVA): linear fade-in from the start and fade-out to the end, in seconds.
//! The stream's length is known before reading, so the fade-out needs no look-ahead.

use super::{audio_info, audio_input, Mapped, SampleMap};
use crate::spec::{float, link, out};
use nova_dataflow::{
    Args, DataType, ExecContext, Inputs, JobEnv, Node, NodeError, NodeOutput, NodeSchema, Planar,
    Value, ValueInfo,
};

struct Fade {
    fade_in: u64,
    fade_out: u64,
    total: u64,
}

impl Fade {
    fn gain(&self, t: u64) -> f32 {
        let mut g = 1.0f64;
        if t < self.fade_in {
            g *= t as f64 / self.fade_in as f64;
        }
        let left = self.total.saturating_sub(t + 1);
        if left < self.fade_out {
            g *= left as f64 / self.fade_out as f64;
        }
        g as f32
    }
}

impl SampleMap for Fade {
    fn apply(&mut self, chunk: &mut Planar, at: u64) {
        let n = chunk.first().map_or(0, |c| c.len());
        for i in 0..n {
            let t = at + i as u64;
            if t >= self.fade_in && t + self.fade_out < self.total {
                continue;
            }
            let g = self.gain(t);
            for c in chunk.iter_mut() {
                c[i] *= g;
            }
        }
    }
}

/// The node.
pub struct AudioFade {
    schema: NodeSchema,
}

impl AudioFade {
    pub fn new() -> Self {
        AudioFade {
            schema: NodeSchema {
                class_type: "AudioFade",
                display_name: "Audio Fade",
                category: "audio",
                description: "Fades the audio in from silence and out to silence.",
                inputs: vec![
                    link("audio", DataType::Audio),
                    float("fade_in", 0.0, 0.0, 3600.0, 0.01),
                    float("fade_out", 0.0, 0.0, 3600.0, 0.01),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

impl Node for AudioFade {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        _: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Audio(audio_info(inputs, "audio")?)])
    }
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let input = audio_input(&inputs, "audio")?;
        let (fi, fo) = (args.float("fade_in")?, args.float("fade_out")?);
        let s = Mapped::stream(
            input,
            "fade".into(),
            (fi.to_bits(), fo.to_bits()),
            move |m| {
                let rate = m.sample_rate as f64;
                Box::new(Fade {
                    fade_in: (fi * rate).round() as u64,
                    fade_out: (fo * rate).round() as u64,
                    total: m.frames,
                })
            },
        );
        Ok(NodeOutput {
            values: vec![Value::Audio(s)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioFade);
