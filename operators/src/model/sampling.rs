//! Diffusion sampling for SD1's discrete noise schedule: sigma schedules (`normal`, `karras`,
//! `simple`), the samplers `euler`, `euler_ancestral` and `dpmpp_2m` (k-diffusion's
//! formulation, as ComfyUI uses), and seeded noise.
//!
//! Pure functions of their inputs; the model is a closure from `(x, sigma)` to the denoised
//! estimate, so samplers are tested without a network.
//!
//! Noise: NOVA draws Gaussian noise from ChaCha8 seeded with the workflow's seed (Box–Muller
//! over the `rand` family's standard normal). A seed gives the same image on every run and
//! machine; it does not give ComfyUI's image for that seed (ComfyUI draws with PyTorch's
//! generator).

use candle_core::{Device, Tensor};
use nova_dataflow::NodeError;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Samplers, by ComfyUI's names.
pub const SAMPLERS: [&str; 3] = ["euler", "euler_ancestral", "dpmpp_2m"];
/// Schedulers, by ComfyUI's names.
pub const SCHEDULERS: [&str; 3] = ["normal", "karras", "simple"];

/// SD1's discrete schedule: sigma for each of the 1000 training timesteps.
pub struct Schedule {
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::sd1()
    }
}

impl Schedule {
    /// Scaled-linear betas from 0.00085 to 0.012 over 1000 steps.
    pub fn sd1() -> Schedule {
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut cum = 1.0;
        let sigmas: Vec<f64> = (0..1000)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
                cum *= 1.0 - beta;
                ((1.0 - cum) / cum).sqrt()
            })
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Schedule { sigmas, log_sigmas }
    }

    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    pub fn sigma_max(&self) -> f64 {
        self.sigmas[999]
    }

    /// Sigma at a fractional timestep (log-linear interpolation).
    pub fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, 999.0);
        let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
        let w = t - lo as f64;
        ((1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
    }

    /// The fractional timestep of a sigma (inverse of [`Self::sigma`]).
    pub fn timestep(&self, sigma: f64) -> f64 {
        let ls = sigma.max(1e-10).ln();
        let ls_ = &self.log_sigmas;
        if ls <= ls_[0] {
            return 0.0;
        }
        if ls >= ls_[999] {
            return 999.0;
        }
        let hi = ls_.partition_point(|v| *v < ls);
        let lo = hi - 1;
        let w = (ls - ls_[lo]) / (ls_[hi] - ls_[lo]);
        lo as f64 + w
    }

    /// `steps + 1` sigmas, ending at 0, for a scheduler by ComfyUI's name.
    pub fn sigmas(&self, scheduler: &str, steps: usize) -> Result<Vec<f64>, String> {
        if steps == 0 {
            return Ok(vec![]);
        }
        let mut s: Vec<f64> = match scheduler {
            "normal" => {
                let (start, end) = (
                    self.timestep(self.sigma_max()),
                    self.timestep(self.sigma_min()),
                );
                (0..steps)
                    .map(|i| {
                        let t = if steps == 1 {
                            start
                        } else {
                            start + (end - start) * i as f64 / (steps - 1) as f64
                        };
                        self.sigma(t)
                    })
                    .collect()
            }
            "karras" => {
                let rho = 7.0;
                let (lo, hi) = (
                    self.sigma_min().powf(1.0 / rho),
                    self.sigma_max().powf(1.0 / rho),
                );
                (0..steps)
                    .map(|i| {
                        let r = if steps == 1 {
                            0.0
                        } else {
                            i as f64 / (steps - 1) as f64
                        };
                        (hi + r * (lo - hi)).powf(rho)
                    })
                    .collect()
            }
            "simple" => {
                let ss = 1000.0 / steps as f64;
                (0..steps)
                    .map(|i| self.sigmas[999 - (i as f64 * ss) as usize])
                    .collect()
            }
            other => {
                return Err(format!(
                    "unknown scheduler '{other}' (one of {SCHEDULERS:?})"
                ))
            }
        };
        s.push(0.0);
        Ok(s)
    }

    /// Sigmas for `steps` with `denoise` < 1: the last `steps + 1` of a schedule of
    /// `steps / denoise` steps, as ComfyUI does.
    pub fn sigmas_denoised(
        &self,
        scheduler: &str,
        steps: usize,
        denoise: f64,
    ) -> Result<Vec<f64>, String> {
        if denoise >= 0.9999 {
            return self.sigmas(scheduler, steps);
        }
        if denoise <= 0.0 {
            return Ok(vec![]);
        }
        let total = (steps as f64 / denoise) as usize;
        let all = self.sigmas(scheduler, total)?;
        Ok(all[all.len() - (steps + 1)..].to_vec())
    }
}

/// Seeded standard-normal noise of `shape`.
pub fn noise(seed: u64, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, device)
}

/// A sampler's name, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    Dpmpp2m,
}

impl SamplerKind {
    /// The sampler named `name` (ComfyUI's names).
    pub fn parse(name: &str) -> Result<SamplerKind, NodeError> {
        match name {
            "euler" => Ok(SamplerKind::Euler),
            "euler_ancestral" => Ok(SamplerKind::EulerAncestral),
            "dpmpp_2m" => Ok(SamplerKind::Dpmpp2m),
            other => Err(NodeError::input(
                "sampler_name",
                format!("unknown sampler '{other}' (one of {SAMPLERS:?})"),
            )),
        }
    }
}

/// A sampling run in progress: one [`Sampling::step`] per interval of the sigma schedule.
pub struct Sampling {
    kind: SamplerKind,
    sigmas: Vec<f64>,
    next: usize,
    x: Tensor,
    /// The previous step's denoised estimate (dpmpp_2m's history).
    old: Option<Tensor>,
    /// Ancestral noise comes from its own stream, seeded from the workflow's seed.
    step_seed: u64,
}

impl Sampling {
    /// Starts from `x` (already noised to `sigmas[0]`).
    pub fn new(kind: SamplerKind, x: Tensor, sigmas: Vec<f64>, seed: u64) -> Sampling {
        Sampling {
            kind,
            sigmas,
            next: 0,
            x,
            old: None,
            step_seed: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1),
        }
    }

    /// Steps in the whole run.
    pub fn steps(&self) -> usize {
        self.sigmas.len().saturating_sub(1)
    }

    /// Steps still to run.
    pub fn remaining(&self) -> usize {
        self.steps() - self.next
    }

    /// Runs the next step with `denoise`, the model's estimate from `(x, sigma)`; returns that
    /// estimate (what previews show).
    pub fn step(
        &mut self,
        denoise: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor, NodeError>,
    ) -> Result<Tensor, NodeError> {
        let i = self.next;
        if i >= self.steps() {
            return Err(NodeError::Other("sampling has no steps left".into()));
        }
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x = &self.x;
        let den = denoise(x, s)?;
        let x = match self.kind {
            SamplerKind::Euler => {
                let d = ((x - &den)? / s)?;
                (x + (d * (s_next - s))?)?
            }
            SamplerKind::EulerAncestral => {
                let up = if s_next > 0.0 {
                    (s_next.powi(2) * (s.powi(2) - s_next.powi(2)) / s.powi(2))
                        .sqrt()
                        .min(s_next)
                } else {
                    0.0
                };
                let down = (s_next.powi(2) - up.powi(2)).max(0.0).sqrt();
                let d = ((x - &den)? / s)?;
                let mut x = (x + (d * (down - s))?)?;
                if s_next > 0.0 {
                    self.step_seed = self.step_seed.wrapping_add(1);
                    let n = noise(self.step_seed, x.dims(), x.device())?;
                    x = (x + (n * up)?)?;
                }
                x
            }
            SamplerKind::Dpmpp2m => {
                let t = -s.ln();
                let h = -s_next.max(1e-10).ln() - t;
                let scale = (-h).exp_m1();
                let d = match &self.old {
                    Some(prev) if s_next > 0.0 && i > 0 => {
                        let t_prev = -self.sigmas[i - 1].ln();
                        let r = (t - t_prev) / h;
                        ((&den * (1.0 + 1.0 / (2.0 * r)))? - (prev * (1.0 / (2.0 * r)))?)?
                    }
                    _ => den.clone(),
                };
                if s_next == 0.0 {
                    den.clone()
                } else {
                    ((x * (s_next / s))? - (d * scale)?)?
                }
            }
        };
        self.x = x;
        self.old = Some(den.clone());
        self.next += 1;
        Ok(den)
    }

    /// The current latent.
    pub fn latent(&self) -> &Tensor {
        &self.x
    }

    /// The latent after the last step.
    pub fn into_latent(self) -> Tensor {
        self.x
    }
}

/// Runs `sampler` over `sigmas` from `x` (already noised to `sigmas[0]`), calling `denoise`
/// for the model's estimate and `on_step(i, &x, &denoised)` after each step.
pub fn sample(
    sampler: &str,
    x: Tensor,
    sigmas: &[f64],
    seed: u64,
    denoise: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor, NodeError>,
    on_step: &mut dyn FnMut(usize, &Tensor, &Tensor),
) -> Result<Tensor, NodeError> {
    let mut run = Sampling::new(SamplerKind::parse(sampler)?, x, sigmas.to_vec(), seed);
    for i in 0..run.steps() {
        let den = run.step(denoise)?;
        on_step(i, run.latent(), &den);
    }
    Ok(run.into_latent())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd1_schedule_has_comfyuis_extremes_and_inverts() {
        let s = Schedule::sd1();
        assert!((s.sigma_min() - 0.0292).abs() < 1e-3, "{}", s.sigma_min());
        assert!((s.sigma_max() - 14.6146).abs() < 1e-3, "{}", s.sigma_max());
        for t in [0.0, 10.5, 500.0, 998.25] {
            assert!((s.timestep(s.sigma(t)) - t).abs() < 1e-6);
        }
        for sched in SCHEDULERS {
            let v = s.sigmas(sched, 10).unwrap();
            assert_eq!(v.len(), 11);
            assert!((v[0] - s.sigma_max()).abs() < 1e-6, "{sched}: {}", v[0]);
            assert_eq!(v[10], 0.0);
            assert!(v.windows(2).all(|w| w[0] > w[1]), "{sched} decreases");
        }
        let part = s.sigmas_denoised("normal", 4, 0.5).unwrap();
        let full = s.sigmas("normal", 8).unwrap();
        assert_eq!(part, full[4..].to_vec());
        assert!(s.sigmas("linear", 4).is_err());
    }

    #[test]
    fn samplers_reach_the_target_of_an_exact_denoiser() {
        // A denoiser that always answers `target` drives every sampler to it.
        let dev = Device::Cpu;
        let target = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
        let s = Schedule::sd1();
        for sampler in SAMPLERS {
            let sigmas = s.sigmas("karras", 12).unwrap();
            let x = (noise(7, &[3], &dev).unwrap() * sigmas[0]).unwrap();
            let mut steps = 0;
            let out = sample(
                sampler,
                x,
                &sigmas,
                7,
                &mut |_, _| Ok(target.clone()),
                &mut |_, _, _| steps += 1,
            )
            .unwrap();
            assert_eq!(steps, 12);
            let err: f32 = (out - &target)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-4, "{sampler}: {err}");
        }
        // Same seed, same noise; another seed, other noise.
        let a = noise(1, &[4], &dev).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, noise(1, &[4], &dev).unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(a, noise(2, &[4], &dev).unwrap().to_vec1::<f32>().unwrap());
    }
}
