//! Model operators: weights from safetensors files (memory-mapped) placed on the device
//! through the residency registry of `nova-dataflow`.

pub mod clip;
pub mod kl_vae;
mod nn;
pub mod safetensors;
pub mod sampling;
pub mod sd;
pub mod taesd;
pub mod unet;
pub mod upscale;
pub mod vae;
pub mod vae_tiled;
