//! `AudioBiquad` (NOVA): a second-order IIR filter (Robert Bristow-Johnson's cookbook:
//! lowpass, highpass, bandpass, notch, peaking, lowshelf, highshelf), direct form I in f64,
//! with its state carried from chunk to chunk, so filtering in chunks equals filtering the
//! whole signal.

use super::{audio_info, audio_input, Mapped, SampleMap};
use crate::spec::{combo, float, link, out};
use nova_dataflow::{
    Args, DataType, ExecContext, Inputs, JobEnv, Node, NodeError, NodeOutput, NodeSchema, Planar,
    Value, ValueInfo,
};

const KINDS: &[&str] = &[
    "lowpass",
    "highpass",
    "bandpass",
    "notch",
    "peaking",
    "lowshelf",
    "highshelf",
];

/// Normalised coefficients `[b0, b1, b2, a1, a2]` (a0 = 1).
pub fn coefficients(
    kind: &str,
    rate: f64,
    freq: f64,
    q: f64,
    gain_db: f64,
) -> Result<[f64; 5], NodeError> {
    let w0 = 2.0 * std::f64::consts::PI * freq / rate;
    let (sin, cos) = w0.sin_cos();
    let alpha = sin / (2.0 * q);
    let a = 10f64.powf(gain_db / 40.0);
    let (b0, b1, b2, a0, a1, a2) = match kind {
        "lowpass" => (
            (1.0 - cos) / 2.0,
            1.0 - cos,
            (1.0 - cos) / 2.0,
            1.0 + alpha,
            -2.0 * cos,
            1.0 - alpha,
        ),
        "highpass" => (
            (1.0 + cos) / 2.0,
            -(1.0 + cos),
            (1.0 + cos) / 2.0,
            1.0 + alpha,
            -2.0 * cos,
            1.0 - alpha,
        ),
        "bandpass" => (alpha, 0.0, -alpha, 1.0 + alpha, -2.0 * cos, 1.0 - alpha),
        "notch" => (1.0, -2.0 * cos, 1.0, 1.0 + alpha, -2.0 * cos, 1.0 - alpha),
        "peaking" => (
            1.0 + alpha * a,
            -2.0 * cos,
            1.0 - alpha * a,
            1.0 + alpha / a,
            -2.0 * cos,
            1.0 - alpha / a,
        ),
        "lowshelf" | "highshelf" => {
            let s = 2.0 * a.sqrt() * alpha;
            let sign = if kind == "lowshelf" { 1.0 } else { -1.0 };
            (
                a * ((a + 1.0) - sign * (a - 1.0) * cos + s),
                sign * 2.0 * a * ((a - 1.0) - sign * (a + 1.0) * cos),
                a * ((a + 1.0) - sign * (a - 1.0) * cos - s),
                (a + 1.0) + sign * (a - 1.0) * cos + s,
                -sign * 2.0 * ((a - 1.0) + sign * (a + 1.0) * cos),
                (a + 1.0) + sign * (a - 1.0) * cos - s,
            )
        }
        other => {
            return Err(NodeError::input(
                "filter_type",
                format!("unknown filter '{other}'"),
            ))
        }
    };
    Ok([b0 / a0, b1 / a0, b2 / a0, a1 / a0, a2 / a0])
}

/// The filter with per-channel state `[x1, x2, y1, y2]`.
pub struct Biquad {
    c: [f64; 5],
    state: Vec<[f64; 4]>,
}

impl Biquad {
    pub fn new(c: [f64; 5], channels: usize) -> Biquad {
        Biquad {
            c,
            state: vec![[0.0; 4]; channels],
        }
    }
}

impl SampleMap for Biquad {
    fn apply(&mut self, chunk: &mut Planar, _at: u64) {
        let [b0, b1, b2, a1, a2] = self.c;
        for (ch, st) in chunk.iter_mut().zip(self.state.iter_mut()) {
            let [mut x1, mut x2, mut y1, mut y2] = *st;
            // Hot loop: one multiply-add chain per sample, state in registers.
            for s in ch.iter_mut() {
                let x = *s as f64;
                let y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2;
                x2 = x1;
                x1 = x;
                y2 = y1;
                y1 = y;
                *s = y as f32;
            }
            *st = [x1, x2, y1, y2];
        }
    }
}

/// The node.
pub struct AudioBiquad {
    schema: NodeSchema,
}

impl AudioBiquad {
    pub fn new() -> Self {
        AudioBiquad {
            schema: NodeSchema {
                class_type: "AudioBiquad",
                display_name: "Audio Biquad Filter",
                category: "audio/filters",
                description: "A second-order filter: low/high/band pass, notch, peaking or shelf.",
                inputs: vec![
                    link("audio", DataType::Audio),
                    combo("filter_type", KINDS),
                    float("frequency", 1000.0, 1.0, 96000.0, 1.0),
                    float("q", std::f64::consts::FRAC_1_SQRT_2, 0.01, 100.0, 0.01),
                    float("gain_db", 0.0, -48.0, 48.0, 0.1),
                ],
                outputs: vec![out("AUDIO", DataType::Audio)],
                output_node: false,
            },
        }
    }
}

impl Node for AudioBiquad {
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
        let f = args.float("frequency")?;
        if f >= m.sample_rate as f64 / 2.0 {
            return Err(NodeError::input(
                "frequency",
                format!(
                    "{f} Hz is at or above the Nyquist frequency of {} Hz audio",
                    m.sample_rate
                ),
            ));
        }
        Ok(vec![ValueInfo::Audio(m)])
    }
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let input = audio_input(&inputs, "audio")?;
        let m = input.meta();
        let kind = args.string("filter_type")?.to_string();
        let (f, q, g) = (
            args.float("frequency")?,
            args.float("q")?,
            args.float("gain_db")?,
        );
        let c = coefficients(&kind, m.sample_rate as f64, f, q, g)?;
        let settings = (kind.clone(), f.to_bits(), q.to_bits(), g.to_bits());
        let s = Mapped::stream(input, format!("{kind} {f} Hz"), settings, move |m| {
            Box::new(Biquad::new(c, m.channels as usize))
        });
        Ok(NodeOutput {
            values: vec![Value::Audio(s)],
            ui: None,
        })
    }
}

crate::spec::default_via_new!(AudioBiquad);
