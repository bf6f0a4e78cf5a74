//! `nova-operators`: the node catalogue. One node per file; [`registry`] is the one table that
//! registers them. Nodes that ComfyUI also has keep its `class_type` and input names, so
//! API-format workflows exported from ComfyUI run unchanged.
//!
//! Tensor work is on candle tensors created on the job's device (the CPU today; nothing here
//! assumes it).

pub mod image;
pub mod latent;
pub mod model;
mod spec;

use nova_dataflow::NodeRegistry;

/// Every node type NOVA ships, registered.
pub fn registry() -> NodeRegistry {
    let mut r = NodeRegistry::new();
    r.register(image::load::LoadImage::new());
    r.register(image::save::SaveImage::new());
    r.register(image::save::PreviewImage::new());
    r.register(image::empty::EmptyImage::new());
    r.register(image::Tiled(image::scale::ImageScale::new()));
    r.register(image::Tiled(image::scale::ImageScaleBy::new()));
    r.register(image::Tiled(image::blur::ImageBlur::new()));
    r.register(image::Tiled(image::sharpen::ImageSharpen::new()));
    r.register(image::Tiled(image::invert::ImageInvert::new()));
    r.register(model::upscale::UpscaleModelLoader::new());
    r.register(model::upscale::ImageUpscaleWithModel::new());
    r.register(model::vae::VaeLoader::new());
    r.register(model::vae::VaeDecode::new());
    r.register(model::vae::VaeDecodeTiled::new());
    r.register(model::vae::VaeEncode::new());
    r.register(model::vae::VaeDecodeTiled::encode());
    r.register(latent::EmptyLatentImage::new());
    r.register(model::sd::CheckpointLoaderSimple::new());
    r.register(model::sd::ClipTextEncode::new());
    r.register(model::sd::KSampler::new());
    r.register(model::sd::KSampler::advanced());
    r.register(latent::SaveLatent::new());
    r.register(latent::LoadLatent::new());
    r
}
