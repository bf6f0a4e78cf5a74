//! `AudioGain` (NOVA): multiplies every sample by a gain in decibels.

use super::{audio_info, audio_input, db, Mapped, SampleMap};
use crate::spec::{float, link, out};
use nova_dataflow::{
    Args, DataType, ExecContext, Inputs, JobEnv, Node, NodeError, NodeOutput, NodeSchema, Planar,
    Value, ValueInfo,
};

struct Gain(f32);

impl SampleMap for Gain {
    fn apply(&mut self, chunk: &mut Planar, _at: u64) {
        // Hot: every sample of the stream passes here.
        for c in chunk.iter_mut() {
            for s in c.iter_mut() {
                *s *= self.0;
            }
        }
    }
}

/// The node.
pub struct AudioGain {
    schema: NodeSchema,
}

impl AudioGain {
    pub fn new() -> Self {
        AudioGain {
            schema: NodeSchema {
                class_type: "AudioGain",
                display_name: "Audio Gain",
                category: "audio",
                description: "Changes the level of the audio by a gain in dB.",
                inputs: vec![
                    link("audio", DataType::Audio),
                    float("gain_db", 0.0, -96.0, 48.0, 0.1),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

impl Node for AudioGain {
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
        let g = args.float("gain_db")?;
        let s = Mapped::stream(
            audio_input(&inputs, "audio")?,
            format!("gain {g} dB"),
            g.to_bits(),
            move |_| Box::new(Gain(db(g))),
        );
        Ok(NodeOutput {
            values: vec![Value::Audio(s)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioGain);
