//! `nova-operators`: the node catalogue. One node per file; [`registry`] is the one table that
//! registers them. Nodes that ComfyUI also has keep its `class_type` and input names, so
//! API-format workflows exported from ComfyUI run unchanged.
//!
//! Tensor work is on candle tensors created on the job's device (the CPU today; nothing here
//! assumes it).

pub mod audio;
pub mod image;
pub mod latent;
pub mod model;
mod spec;
pub mod video;

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
    r.register(model::rife::RifeVfi::new());
    r.register(video::load::LoadVideo::new());
    r.register(video::save::SaveVideo::new());
    r.register(video::create::CreateVideo::new());
    r.register(video::components::GetVideoComponents::new());
    r.register(audio::load::LoadAudio::new());
    r.register(audio::save::SaveAudio::new());
    r.register(audio::save::SaveAudio::preview());
    r.register(audio::resample::AudioResample::new());
    r.register(audio::gain::AudioGain::new());
    r.register(audio::biquad::AudioBiquad::new());
    r.register(audio::fade::AudioFade::new());
    r.register(audio::mix::AudioMix::new());
    r.register(audio::eq::AudioEqualizer::new());
    r.register(audio::generate::AudioOscillator::new());
    r.register(audio::generate::AudioNoise::new());
    r
}
