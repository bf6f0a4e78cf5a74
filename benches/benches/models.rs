//! Model kernels on CPU: TAESD decode and encode at 512x512 (SD1 layout), one UNet step of the
//! tiny SD1 checkpoint, and what per-step previews cost a sampler.
//!
//! Criterion measures the kernels. Then, in the same run:
//! - **PyTorch**: `benches/pytorch/taesd_bench.py` times the same TAESD decode/encode on the
//!   same weights with PyTorch on CPU (2 threads), and NOVA's median over the same number of
//!   runs gives the ratio (below 1: NOVA is faster). The Python comes from `NOVA_BENCH_PYTHON`
//!   or `benches/pytorch/.venv` (made by `benches/pytorch/setup.sh`); without it the
//!   comparison is reported as not run.
//! - **Preview overhead**: ComfyUI's default txt2img workflow on the tiny checkpoint, sampler
//!   wall time with `auto` previews (TAESD present) against `none`, alternated, median ratio.
//!   Goal: under 1.05.
//!
//! Run: `cargo bench -p nova-benches --bench models`

use candle_core::{Device, Tensor};
use criterion::Criterion;
use nova_benches::models::{self, Taesd};
use std::hint::black_box;
use std::time::Duration;

fn kernels(c: &mut Criterion) {
    let dec = Taesd::decoder();
    let enc = Taesd::encoder();
    let latent = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &Device::Cpu).expect("latent");
    let image = Tensor::rand(0f32, 1.0, (1, 3, 512, 512), &Device::Cpu).expect("image");
    let mut g = c.benchmark_group("taesd_512x512");
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("decode", |b| b.iter(|| black_box(dec.run(&latent))));
    g.bench_function("encode", |b| b.iter(|| black_box(enc.run(&image))));
    g.finish();

    let unet = models::TinyUnet::load();
    let mut g = c.benchmark_group("unet_step_tiny_sd1");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("64x64_cfg_batch2", |b| b.iter(|| black_box(unet.step())));
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    kernels(&mut c);
    c.final_summary();

    println!("\n== TAESD 512x512 on CPU: NOVA vs PyTorch (same weights, same run) ==");
    match models::pytorch_comparison(7) {
        Ok(r) => println!("{r}"),
        Err(why) => println!("PyTorch comparison not run: {why}"),
    }

    println!("\n== Sampler with per-step previews vs none (tiny SD1, 20 steps) ==");
    for size in [64, 256] {
        let r = models::preview_overhead(size, 5);
        println!("{r}");
    }
}
