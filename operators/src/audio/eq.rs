//! `AudioEqualizer` (NOVA): a three-band equaliser applied in the short-time Fourier domain
//! (`nova_engines::audio::Spectral`): each bin is scaled by a smooth gain curve (low, mid and
//! high gains crossing over around two frequencies). A linear operator: streamed in chunks it
//! equals the whole-signal STFT result.

use super::{audio_info, audio_input, db};
use crate::spec::{float, link, out};
use nova_dataflow::{
    Args, AudioStream, DataType, ExecContext, Inputs, JobEnv, Node, NodeError, NodeOutput,
    NodeSchema, Value, ValueInfo,
};
use nova_engines::audio::{Spectral, SpectralFn};
use std::sync::Arc;

/// The node.
pub struct AudioEqualizer {
    schema: NodeSchema,
}

impl AudioEqualizer {
    pub fn new() -> Self {
        AudioEqualizer {
            schema: NodeSchema {
                class_type: "AudioEqualizer",
                display_name: "Audio Equalizer (3 band)",
                category: "audio/filters",
                description: "Low, mid and high gains, applied per STFT bin.",
                inputs: vec![
                    link("audio", DataType::Audio),
                    float("low_gain_db", 0.0, -48.0, 24.0, 0.1),
                    float("mid_gain_db", 0.0, -48.0, 24.0, 0.1),
                    float("high_gain_db", 0.0, -48.0, 24.0, 0.1),
                    float("low_hz", 250.0, 10.0, 20000.0, 1.0),
                    float("high_hz", 4000.0, 10.0, 20000.0, 1.0),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

/// Gain of a bin at `f` Hz: logistic crossovers (one octave wide) between the three bands.
fn curve(f: f64, lo: f64, hi: f64, g: (f32, f32, f32)) -> f32 {
    let step = |f: f64, at: f64| 1.0 / (1.0 + (-(f.max(1.0) / at).log2() * 4.0).exp());
    let (s_lo, s_hi) = (step(f, lo) as f32, step(f, hi) as f32);
    g.0 * (1.0 - s_lo) + g.1 * (s_lo - s_hi).max(0.0) + g.2 * s_hi
}

impl Node for AudioEqualizer {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }
    fn infer(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        _: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        if args.float("low_hz")? >= args.float("high_hz")? {
            return Err(NodeError::input("high_hz", "must be above low_hz"));
        }
        Ok(vec![ValueInfo::Audio(audio_info(inputs, "audio")?)])
    }
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let input = audio_input(&inputs, "audio")?;
        let rate = input.meta().sample_rate as f64;
        let g = (
            db(args.float("low_gain_db")?),
            db(args.float("mid_gain_db")?),
            db(args.float("high_gain_db")?),
        );
        let (lo, hi) = (args.float("low_hz")?, args.float("high_hz")?);
        let frame = 1024usize;
        let gains: Vec<f32> = (0..=frame / 2)
            .map(|k| curve(k as f64 * rate / frame as f64, lo, hi, g))
            .collect();
        let settings = super::signature((
            g.0.to_bits(),
            g.1.to_bits(),
            g.2.to_bits(),
            lo.to_bits(),
            hi.to_bits(),
        ));
        let op: SpectralFn = Arc::new(move |_ch, _f, bins| {
            for (b, g) in bins.iter_mut().zip(&gains) {
                *b *= *g;
            }
        });
        let s = Spectral::new(input, frame, op, settings, "3-band EQ");
        Ok(NodeOutput {
            values: vec![Value::Audio(AudioStream::new(Arc::new(s)))],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioEqualizer);

#[cfg(test)]
mod tests {
    use super::curve;

    #[test]
    fn curve_takes_each_band_gain_far_from_the_crossovers() {
        let g = (0.25, 1.0, 4.0);
        assert!((curve(20.0, 250.0, 4000.0, g) - 0.25).abs() < 0.01);
        assert!((curve(1000.0, 250.0, 4000.0, g) - 1.0).abs() < 0.05);
        assert!((curve(18000.0, 250.0, 4000.0, g) - 4.0).abs() < 0.05);
    }
}
