//! Model operators: weights from safetensors files (memory-mapped) placed on the device
//! through the residency registry of `nova-dataflow`.

pub mod clip;
pub mod conv;
pub mod grid_sample;
pub mod kl_vae;
mod nn;
pub mod preview;
pub mod prompt;
pub mod rife;
pub mod safetensors;
pub mod sampling;
pub mod sd;
pub mod taesd;
pub mod unet;
pub mod upscale;
pub mod vae;
pub mod vae_tiled;

/// A safetensors model file through the process's residency registry: mapped once, shared by
/// every node and job that names it.
pub(crate) fn open_asset(
    name: &str,
    path: &std::path::Path,
    log: Option<&nova_dataflow::residency::DeltaLog>,
) -> Result<std::sync::Arc<nova_dataflow::Asset>, nova_dataflow::NodeError> {
    let p = path.to_path_buf();
    nova_dataflow::Registry::global().asset(
        name,
        path,
        move || Ok(Box::new(safetensors::SafetensorsFile::open(&p)?)),
        log,
    )
}

/// Largest absolute difference between two tensors (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).expect("same shapes"))
}

/// Largest absolute value of a tensor (tests).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar())
        .expect("a float tensor")
}
