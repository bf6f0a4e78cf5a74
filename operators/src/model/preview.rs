//! Live previews of a sampler's state after each step: TAESD's decoder when
//! `models/vae_approx/taesd_decoder.safetensors` is present, else the linear latent-to-RGB
//! projection — throttled so that previews take at most [`TIME_SHARE`] of sampling time.
//!
//! Every step gets a preview. Under `auto` a step gets TAESD only when the decode's expected
//! time fits in what is left of the share (the time the steps so far took, times the share,
//! minus what previews already took); otherwise it gets the projection, whose cost (a 4x3
//! matrix product at latent resolution) is counted too. A decode's time is estimated from its
//! multiply-adds and this machine's measured rate: the rate comes from a calibration decode of
//! at most 8x8 latent pixels, run (and counted) once the share can pay for it at a
//! deliberately slow assumed rate, and from every TAESD preview after. Small decodes run
//! below the full rate, so the estimate errs long. `taesd` decodes every step with TAESD
//! regardless of time (as ComfyUI does); `latent2rgb` always projects; `none` makes no
//! previews.
//!
//! Memory: the decoder's weights are leased when first used and held until sampling ends;
//! each decode leases its activations first and falls back to the projection if the budget
//! refuses them, so previews never push a run over its budget.

use super::taesd::{Part, TaesdNet};
use super::vae::APPROX;
use candle_core::{DType, Device, Tensor};
use nova_dataflow::residency::WeightMode;
use nova_dataflow::{
    Asset, DeviceWeights, ExecContext, NodeError, PreviewMethod, StepPreview, Value, WeightContext,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most of sampling time that `auto` previews may take.
pub const TIME_SHARE: f64 = 0.05;

/// Multiply-adds per second assumed for the calibration decode before anything was measured:
/// slower than any CPU this runs on.
const PRIOR_MACS_PER_S: f64 = 5e9;

/// SD1's latent-to-RGB factors (ComfyUI's SD15 latent format): one row per latent channel.
const SD1_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.4702],
];

/// The TAESD decoder used for previews, and its weights once placed.
struct Decoder {
    asset: Arc<Asset>,
    net: TaesdNet,
    macs_per_px: u64,
    weights: Option<DeviceWeights>,
}

/// Makes one preview per step within the time share; see the module docs.
pub struct Previewer {
    method: PreviewMethod,
    decoder: Option<Decoder>,
    weights: WeightContext,
    /// Time the sampler's steps took so far.
    sampled: Duration,
    /// Time previews took so far.
    spent: Duration,
    /// TAESD's measured multiply-adds per second on this machine.
    rate: Option<f64>,
}

impl Previewer {
    /// A previewer for latents of `channels` channels in the job of `ctx`, unless the job
    /// asks for no previews. A TAESD decoder that is missing, of another latent width or
    /// unreadable leaves the projection.
    pub fn new(ctx: &ExecContext, channels: usize) -> Option<Previewer> {
        if ctx.env.preview == PreviewMethod::None {
            return None;
        }
        let mut weights = ctx.weights.clone();
        weights.mode = WeightMode::Resident;
        let decoder = match ctx.env.preview {
            PreviewMethod::Auto | PreviewMethod::Taesd => open_decoder(ctx, channels),
            _ => None,
        };
        Some(Previewer {
            method: ctx.env.preview,
            decoder,
            weights,
            sampled: Duration::ZERO,
            spent: Duration::ZERO,
            rate: None,
        })
    }

    /// A preview of `latent` (`[b, c, h, w]`, diffusion space; the first item is shown),
    /// after a step that took `step_time`.
    pub fn preview(
        &mut self,
        latent: &Tensor,
        step_time: Duration,
    ) -> Result<StepPreview, NodeError> {
        self.sampled += step_time;
        let first = latent.narrow(0, 0, 1)?;
        let allowed = self.taesd_allowed(&first)?;
        let start = Instant::now();
        let made = if allowed {
            self.taesd(&first).map(|img| (img, "taesd"))
        } else {
            None
        };
        let (image, method) = match made {
            Some(m) => {
                self.measured(&first, start.elapsed());
                m
            }
            None => (latent_to_rgb(&first)?, "latent2rgb"),
        };
        let image = image
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .to_device(&Device::Cpu)?;
        self.spent += start.elapsed();
        Ok(StepPreview {
            image: Value::image(image),
            method,
        })
    }

    /// Multiply-adds of a TAESD decode of `latent`.
    fn macs(&self, latent: &Tensor) -> f64 {
        let px = latent.dims().iter().skip(2).product::<usize>() as f64;
        self.decoder
            .as_ref()
            .map_or(0.0, |d| d.macs_per_px as f64 * px)
    }

    /// Records a TAESD decode of `latent` that took `took`.
    fn measured(&mut self, latent: &Tensor, took: Duration) {
        self.rate = Some(self.macs(latent) / took.as_secs_f64().max(1e-9));
    }

    /// What is left of the share.
    fn allowance(&self) -> Duration {
        self.sampled.mul_f64(TIME_SHARE).saturating_sub(self.spent)
    }

    /// Whether this step's preview may be a TAESD decode; calibrates the rate first when the
    /// share can pay for that (the calibration's time counts as preview time).
    fn taesd_allowed(&mut self, latent: &Tensor) -> Result<bool, NodeError> {
        if self.decoder.is_none() {
            return Ok(false);
        }
        if self.method == PreviewMethod::Taesd {
            return Ok(true);
        }
        if self.rate.is_none() {
            let (_, _, h, w) = latent.dims4()?;
            let crop = latent.narrow(2, 0, h.min(8))?.narrow(3, 0, w.min(8))?;
            let prior = Duration::from_secs_f64(self.macs(&crop) / PRIOR_MACS_PER_S);
            if prior > self.allowance() {
                return Ok(false);
            }
            let start = Instant::now();
            let done = self.taesd(&crop).is_some();
            let took = start.elapsed();
            self.spent += took;
            if !done {
                return Ok(false);
            }
            self.measured(&crop, took);
        }
        let rate = self.rate.unwrap_or(PRIOR_MACS_PER_S);
        Ok(Duration::from_secs_f64(self.macs(latent) / rate) <= self.allowance())
    }

    /// Decodes with TAESD under a lease of its activations; `None` when the budget refuses
    /// (the caller projects instead) or the decoder fails (it is then dropped for good).
    fn taesd(&mut self, latent: &Tensor) -> Option<Tensor> {
        let d = self.decoder.as_mut()?;
        if d.weights.is_none() {
            match DeviceWeights::new(d.asset.clone(), self.weights.clone()) {
                Ok(w) => d.weights = Some(w),
                Err(_) => return None,
            }
        }
        let px = latent.dims().iter().skip(2).product::<usize>() as u64;
        let _lease = self
            .weights
            .acct
            .try_lease(d.net.activation_per_pixel() * px, "preview decode")
            .ok()?;
        let w = d.weights.as_ref()?;
        let out = latent
            .to_dtype(DType::F32)
            .map_err(NodeError::from)
            .and_then(|l| d.net.forward(&l, &|n| w.get(n).cloned()));
        match out {
            Ok(img) => Some(img),
            Err(e) => {
                tracing::warn!("TAESD preview failed, projecting from now on: {e}");
                self.decoder = None;
                None
            }
        }
    }
}

/// `models/vae_approx/taesd_decoder.safetensors`, if present, readable and of `channels`.
fn open_decoder(ctx: &ExecContext, channels: usize) -> Option<Decoder> {
    let path = ctx
        .env
        .find_model(APPROX, "taesd_decoder.safetensors")
        .ok()??;
    let opened = super::open_asset("taesd_decoder.safetensors", &path, Some(&ctx.weights.log))
        .and_then(|asset| {
            let net = TaesdNet::from_source(asset.source(), Part::Decoder)?;
            Ok((asset, net))
        });
    match opened {
        Ok((asset, net)) if net.latent_channels == channels => {
            let src = asset.source();
            let macs_per_px = net.macs_per_input_pixel(&|n| src.shape(n));
            Some(Decoder {
                asset,
                net,
                macs_per_px,
                weights: None,
            })
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("TAESD previews off: {e}");
            None
        }
    }
}

/// The linear latent-to-RGB projection (`[1, c, h, w]` to `[1, 3, h, w]` in `[0, 1]`): SD1's
/// factors for 4 channels, else the first three channels.
pub fn latent_to_rgb(latent: &Tensor) -> Result<Tensor, NodeError> {
    let (_, c, h, w) = latent.dims4()?;
    let x = latent.to_dtype(DType::F32)?;
    let rgb = if c == SD1_RGB.len() {
        let f: Vec<f32> = SD1_RGB.iter().flatten().copied().collect();
        let f = Tensor::from_vec(f, (c, 3), x.device())?;
        // [h*w, c] x [c, 3] -> [h*w, 3] -> [1, 3, h, w]
        x.reshape((c, h * w))?
            .t()?
            .matmul(&f)?
            .t()?
            .reshape((1, 3, h, w))?
    } else {
        x.narrow(1, 0, c.min(3))?
    };
    Ok(((rgb + 1.0)? / 2.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projection_maps_each_channel_by_sd1s_factors() {
        let dev = Device::Cpu;
        // A latent whose channel 1 is 1 everywhere: the image is factor row 1, shifted.
        let mut v = vec![0f32; 4 * 2 * 3];
        v[6..12].fill(1.0);
        let lat = Tensor::from_vec(v, (1, 4, 2, 3), &dev).unwrap();
        let img = latent_to_rgb(&lat).unwrap();
        assert_eq!(img.dims(), &[1, 3, 2, 3]);
        let px: Vec<f32> = img
            .permute((0, 2, 3, 1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, got) in px.iter().enumerate() {
            let want = (SD1_RGB[1][i % 3] + 1.0) / 2.0;
            assert!((got - want).abs() < 1e-6, "{i}: {got} vs {want}");
        }
    }
}
