//! Sources for generation demos (NOVA): `AudioOscillator` (sine, square, sawtooth, triangle)
//! and `AudioNoise` (white or pink, seeded). Samples are computed from their index, so any
//! chunking gives the same stream.

use super::signature;
use crate::spec::{combo, float, int, out};
use nova_dataflow::{
    Args, AudioGraph, AudioMeta, AudioPull, AudioStream, DataType, ExecContext, Inputs, JobEnv,
    Node, NodeError, NodeOutput, NodeSchema, Planar, Value, ValueInfo,
};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// A waveform of one frequency, identical on every channel.
struct Oscillator {
    meta: AudioMeta,
    wave: String,
    freq: f64,
    amp: f32,
}

impl Oscillator {
    fn sample(&self, t: u64) -> f32 {
        let phase = (t as f64 * self.freq / self.meta.sample_rate as f64).fract();
        let v = match self.wave.as_str() {
            "square" => {
                if phase < 0.5 {
                    1.0
                } else {
                    -1.0
                }
            }
            "sawtooth" => 2.0 * phase - 1.0,
            "triangle" => 1.0 - 4.0 * (phase - 0.5).abs(),
            _ => (2.0 * std::f64::consts::PI * phase).sin(),
        };
        self.amp * v as f32
    }
}

impl AudioGraph for Oscillator {
    fn meta(&self) -> AudioMeta {
        self.meta
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        Ok(Box::new(OscPull {
            osc: Oscillator {
                wave: self.wave.clone(),
                ..*self
            },
            at: 0,
        }))
    }
    fn signature(&self) -> u64 {
        signature((
            &self.wave,
            self.freq.to_bits(),
            self.amp.to_bits(),
            self.meta,
        ))
    }
    fn describe(&self) -> String {
        format!("{} {} Hz", self.wave, self.freq)
    }
}

struct OscPull {
    osc: Oscillator,
    at: u64,
}

impl AudioPull for OscPull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let end = (self.at + max as u64).min(self.osc.meta.frames);
        let one: Vec<f32> = (self.at..end).map(|t| self.osc.sample(t)).collect();
        self.at = end;
        Ok(vec![one; self.osc.meta.channels as usize])
    }
}

/// Seeded noise, one independent generator per channel.
struct Noise {
    meta: AudioMeta,
    pink: bool,
    amp: f32,
    seed: u64,
}

impl AudioGraph for Noise {
    fn meta(&self) -> AudioMeta {
        self.meta
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        let ch = self.meta.channels as usize;
        Ok(Box::new(NoisePull {
            rngs: (0..ch)
                .map(|c| rand_chacha::ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(c as u64)))
                .collect(),
            pink: vec![[0f32; 3]; ch],
            is_pink: self.pink,
            amp: self.amp,
            left: self.meta.frames,
        }))
    }
    fn signature(&self) -> u64 {
        signature((self.pink, self.amp.to_bits(), self.seed, self.meta))
    }
    fn describe(&self) -> String {
        format!(
            "{} noise (seed {})",
            if self.pink { "pink" } else { "white" },
            self.seed
        )
    }
}

struct NoisePull {
    rngs: Vec<rand_chacha::ChaCha8Rng>,
    pink: Vec<[f32; 3]>,
    is_pink: bool,
    amp: f32,
    left: u64,
}

impl AudioPull for NoisePull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let n = (max as u64).min(self.left) as usize;
        self.left -= n as u64;
        let mut out = Vec::with_capacity(self.rngs.len());
        for (rng, st) in self.rngs.iter_mut().zip(self.pink.iter_mut()) {
            let c: Vec<f32> = (0..n)
                .map(|_| {
                    let w: f32 = rng.random_range(-1.0..1.0);
                    if !self.is_pink {
                        return self.amp * w;
                    }
                    // Paul Kellet's economy pink filter (-3 dB/octave within 0.05 dB).
                    st[0] = 0.99765 * st[0] + w * 0.0990460;
                    st[1] = 0.96300 * st[1] + w * 0.2965164;
                    st[2] = 0.57000 * st[2] + w * 1.0526913;
                    self.amp * 0.25 * (st[0] + st[1] + st[2] + w * 0.1848)
                })
                .collect();
            out.push(c);
        }
        Ok(out)
    }
}

fn source_meta(args: &Args) -> Result<AudioMeta, NodeError> {
    let rate = args.int("sample_rate")? as u32;
    let seconds = args.float("duration")?;
    Ok(AudioMeta {
        sample_rate: rate,
        channels: args.int("channels")? as u16,
        frames: (seconds * rate as f64).round() as u64,
    })
}

/// `AudioOscillator`.
pub struct AudioOscillator {
    schema: NodeSchema,
}

impl AudioOscillator {
    pub fn new() -> Self {
        AudioOscillator {
            schema: NodeSchema {
                class_type: "AudioOscillator",
                display_name: "Audio Oscillator",
                category: "audio/generate",
                description: "A tone: sine, square, sawtooth or triangle.",
                inputs: vec![
                    combo("waveform", &["sine", "square", "sawtooth", "triangle"]),
                    float("frequency", 440.0, 0.0, 48000.0, 0.1),
                    float("amplitude", 0.5, 0.0, 1.0, 0.01),
                    float("duration", 5.0, 0.001, 86400.0, 0.001),
                    int("sample_rate", 48000, 1000, 384000),
                    int("channels", 2, 1, 16),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

impl Node for AudioOscillator {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        args: &Args,
        _: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Audio(source_meta(args)?)])
    }
    fn execute(
        &self,
        args: &Args,
        _: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let osc = Oscillator {
            meta: source_meta(args)?,
            wave: args.string("waveform")?.to_string(),
            freq: args.float("frequency")?,
            amp: args.float("amplitude")? as f32,
        };
        Ok(NodeOutput {
            values: vec![Value::Audio(AudioStream::new(Arc::new(osc)))],
            ui: None,
        })
    }
}

/// `AudioNoise`.
pub struct AudioNoise {
    schema: NodeSchema,
}

impl AudioNoise {
    pub fn new() -> Self {
        AudioNoise {
            schema: NodeSchema {
                class_type: "AudioNoise",
                display_name: "Audio Noise",
                category: "audio/generate",
                description: "White or pink noise from a seed.",
                inputs: vec![
                    combo("color", &["white", "pink"]),
                    float("amplitude", 0.25, 0.0, 1.0, 0.01),
                    float("duration", 5.0, 0.001, 86400.0, 0.001),
                    int("sample_rate", 48000, 1000, 384000),
                    int("channels", 2, 1, 16),
                    int("seed", 0, 0, i64::MAX),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

impl Node for AudioNoise {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        args: &Args,
        _: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(vec![ValueInfo::Audio(source_meta(args)?)])
    }
    fn execute(
        &self,
        args: &Args,
        _: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let noise = Noise {
            meta: source_meta(args)?,
            pink: args.string("color")? == "pink",
            amp: args.float("amplitude")? as f32,
            seed: args.int("seed")? as u64,
        };
        Ok(NodeOutput {
            values: vec![Value::Audio(AudioStream::new(Arc::new(noise)))],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioOscillator, AudioNoise);
