//! Model operators: weights from safetensors files (memory-mapped) placed on the device
//! through the residency registry of `nova-dataflow`.

pub mod clip;
pub mod conv;
pub mod kl_vae;
mod nn;
pub mod preview;
pub mod prompt;
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
