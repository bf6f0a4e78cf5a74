//! `AudioMix` (NOVA): `gain_a·a + gain_b·b`. Both inputs must have the same sample rate and
//! channel count (checked at planning, before any work); the shorter one is padded with
//! silence.

use super::{audio_info, audio_input, signature};
use crate::spec::{float, link, out};
use nova_dataflow::{
    Args, AudioGraph, AudioMeta, AudioPull, AudioStream, DataType, ExecContext, Inputs, JobEnv,
    Node, NodeError, NodeOutput, NodeSchema, Planar, Value, ValueInfo,
};
use std::sync::Arc;

struct Mix {
    a: AudioStream,
    b: AudioStream,
    gains: (f32, f32),
    signature: u64,
}

impl AudioGraph for Mix {
    fn meta(&self) -> AudioMeta {
        let (a, b) = (self.a.meta(), self.b.meta());
        AudioMeta {
            frames: a.frames.max(b.frames),
            ..a
        }
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        Ok(Box::new(MixPull {
            a: self.a.open()?,
            b: self.b.open()?,
            gains: self.gains,
            channels: self.a.meta().channels as usize,
            left: self.meta().frames,
        }))
    }
    fn signature(&self) -> u64 {
        self.signature
    }
    fn describe(&self) -> String {
        format!(
            "mix of {} and {}",
            self.a.graph().describe(),
            self.b.graph().describe()
        )
    }
}

struct MixPull {
    a: Box<dyn AudioPull>,
    b: Box<dyn AudioPull>,
    gains: (f32, f32),
    channels: usize,
    left: u64,
}

impl AudioPull for MixPull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let n = (max as u64).min(self.left) as usize;
        let a = nova_engines::audio::pull_exact(self.a.as_mut(), self.channels, n)?;
        let b = nova_engines::audio::pull_exact(self.b.as_mut(), self.channels, n)?;
        self.left -= n as u64;
        let at = |c: &Vec<f32>, i: usize| c.get(i).copied().unwrap_or(0.0);
        Ok((0..self.channels)
            .map(|ch| {
                (0..n)
                    .map(|i| self.gains.0 * at(&a[ch], i) + self.gains.1 * at(&b[ch], i))
                    .collect()
            })
            .collect())
    }
}

/// The node.
pub struct AudioMix {
    schema: NodeSchema,
}

impl AudioMix {
    pub fn new() -> Self {
        AudioMix {
            schema: NodeSchema {
                class_type: "AudioMix",
                display_name: "Audio Mix",
                category: "audio",
                description: "Mixes two audio streams of the same rate and channel count.",
                inputs: vec![
                    link("audio_a", DataType::Audio),
                    link("audio_b", DataType::Audio),
                    float("gain_a", 1.0, 0.0, 16.0, 0.01),
                    float("gain_b", 1.0, 0.0, 16.0, 0.01),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

/// Refuses streams that cannot be mixed sample by sample.
fn compatible(a: &AudioMeta, b: &AudioMeta) -> Result<(), NodeError> {
    if a.sample_rate != b.sample_rate {
        return Err(NodeError::input(
            "audio_b",
            format!(
                "mismatched sample rates: audio_a is {} Hz, audio_b is {} Hz; resample one \
                 with AudioResample first",
                a.sample_rate, b.sample_rate
            ),
        ));
    }
    if a.channels != b.channels {
        return Err(NodeError::input(
            "audio_b",
            format!(
                "mismatched channels: audio_a has {}, audio_b has {}",
                a.channels, b.channels
            ),
        ));
    }
    Ok(())
}

impl Node for AudioMix {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        _: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let (a, b) = (
            audio_info(inputs, "audio_a")?,
            audio_info(inputs, "audio_b")?,
        );
        compatible(&a, &b)?;
        Ok(vec![ValueInfo::Audio(AudioMeta {
            frames: a.frames.max(b.frames),
            ..a
        })])
    }
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let (a, b) = (
            audio_input(&inputs, "audio_a")?,
            audio_input(&inputs, "audio_b")?,
        );
        compatible(&a.meta(), &b.meta())?;
        let (ga, gb) = (args.float("gain_a")?, args.float("gain_b")?);
        let sig = signature((a.signature(), b.signature(), ga.to_bits(), gb.to_bits()));
        let mix = Mix {
            a,
            b,
            gains: (ga as f32, gb as f32),
            signature: sig,
        };
        Ok(NodeOutput {
            values: vec![Value::Audio(AudioStream::new(Arc::new(mix)))],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioMix);
