//! `AudioResample` (NOVA; inputs `audio`, `sample_rate`): sample-rate conversion through
//! rubato's band-limited sinc resampler (`nova_media::audio::Resampler`), streaming. The
//! output has exactly `round(frames · to / from)` frames, aligned in time with the input.

use super::{audio_info, audio_input, media_error, signature};
use crate::spec::{int, link, out};
use nova_dataflow::{
    Args, AudioGraph, AudioMeta, AudioPull, AudioStream, DataType, ExecContext, Inputs, JobEnv,
    Node, NodeError, NodeOutput, NodeSchema, Planar, Value, ValueInfo,
};
use std::sync::Arc;

/// Output frames for `frames` at `from` Hz resampled to `to` Hz.
pub fn resampled_len(frames: u64, from: u32, to: u32) -> u64 {
    ((frames as u128 * to as u128 + from as u128 / 2) / from.max(1) as u128) as u64
}

struct Resample {
    input: AudioStream,
    to: u32,
}

impl AudioGraph for Resample {
    fn meta(&self) -> AudioMeta {
        let m = self.input.meta();
        AudioMeta {
            sample_rate: self.to,
            frames: resampled_len(m.frames, m.sample_rate, self.to),
            ..m
        }
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        let m = self.input.meta();
        let resampler =
            nova_media::audio::Resampler::new(m.sample_rate, self.to, m.channels as usize)
                .map_err(media_error)?;
        Ok(Box::new(ResamplePull {
            upstream: self.input.open()?,
            resampler,
            ready: vec![Vec::new(); m.channels as usize],
            flushed: false,
            left: self.meta().frames,
            step: (m.sample_rate as usize / 10).max(1024),
        }))
    }
    fn signature(&self) -> u64 {
        signature((self.input.signature(), "resample", self.to))
    }
    fn describe(&self) -> String {
        format!(
            "{} resampled to {} Hz",
            self.input.graph().describe(),
            self.to
        )
    }
}

struct ResamplePull {
    upstream: Box<dyn AudioPull>,
    resampler: nova_media::audio::Resampler,
    /// Output computed but not yet handed out.
    ready: Planar,
    flushed: bool,
    left: u64,
    /// Input frames read per refill.
    step: usize,
}

impl AudioPull for ResamplePull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let want = (max as u64).min(self.left) as usize;
        while self.ready[0].len() < want && !self.flushed {
            let chunk = self.upstream.pull(self.step)?;
            let produced = if chunk.first().is_none_or(|c| c.is_empty()) {
                self.flushed = true;
                self.resampler.flush().map_err(media_error)?
            } else {
                self.resampler.process(&chunk).map_err(media_error)?
            };
            for (r, p) in self.ready.iter_mut().zip(produced) {
                r.extend_from_slice(&p);
            }
        }
        let n = want.min(self.ready[0].len());
        self.left -= n as u64;
        let mut out: Planar = self
            .ready
            .iter_mut()
            .map(|r| r.drain(..n).collect())
            .collect();
        // The resampler promises the exact length; pad if it fell short at the very end.
        if self.flushed && n < want && self.ready[0].is_empty() {
            for c in &mut out {
                c.resize(want, 0.0);
            }
            self.left -= (want - n) as u64;
        }
        Ok(out)
    }
}

/// The node.
pub struct AudioResample {
    schema: NodeSchema,
}

impl AudioResample {
    pub fn new() -> Self {
        AudioResample {
            schema: NodeSchema {
                class_type: "AudioResample",
                display_name: "Audio Resample",
                category: "audio",
                description: "Converts the audio to another sample rate (band-limited sinc).",
                inputs: vec![
                    link("audio", DataType::Audio),
                    int("sample_rate", 44100, 1000, 384000),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

impl Node for AudioResample {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let m = audio_info(inputs, "audio")?;
        let to = args.int("sample_rate")? as u32;
        Ok(vec![ValueInfo::Audio(AudioMeta {
            sample_rate: to,
            frames: resampled_len(m.frames, m.sample_rate, to),
            ..m
        })])
    }
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let input = audio_input(&inputs, "audio")?;
        let to = args.int("sample_rate")? as u32;
        let out = if input.meta().sample_rate == to {
            input
        } else {
            AudioStream::new(Arc::new(Resample { input, to }))
        };
        Ok(NodeOutput {
            values: vec![Value::Audio(out)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioResample);
