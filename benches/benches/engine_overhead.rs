//! Engine overhead per record: the same pipeline region (a 1024x1024 image made piece by piece,
//! blurred with radius 2 and inverted, 256x256 pieces) through
//! the timely dataflow versus a plain loop over the same pieces calling the same kernels.
//!
//! Criterion measures both; then an interleaved A/B run (A and B alternated, so machine noise
//! hits both) prints the ratio. Goal: dataflow within 5% of the plain loop.
//!
//! Run: `cargo bench -p nova-benches --bench engine_overhead`

use criterion::{criterion_group, Criterion};
use nova_benches::overhead::Setup;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn bench(c: &mut Criterion) {
    let setup = Setup::new(1024, 256);
    let mut g = c.benchmark_group(format!("tiled_blur_1024_{}tiles", setup.tiles()));
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("plain_loop", |b| {
        b.iter(|| black_box(setup.run_plain_loop()))
    });
    g.bench_function("dataflow", |b| b.iter(|| setup.run_dataflow()));
    g.finish();
}

criterion_group!(benches, bench);

/// Alternates A and B and reports the median of per-round ratios.
fn interleaved_ratio() {
    let setup = Setup::new(1024, 256);
    // Warm up both paths.
    setup.run_dataflow();
    black_box(setup.run_plain_loop());
    let mut ratios = Vec::new();
    let (mut ta, mut tb) = (Duration::ZERO, Duration::ZERO);
    for round in 0..30 {
        let time = |f: &dyn Fn()| {
            let t = Instant::now();
            f();
            t.elapsed()
        };
        let (a, b) = if round % 2 == 0 {
            let a = time(&|| setup.run_dataflow());
            let b = time(&|| drop(black_box(setup.run_plain_loop())));
            (a, b)
        } else {
            let b = time(&|| drop(black_box(setup.run_plain_loop())));
            let a = time(&|| setup.run_dataflow());
            (a, b)
        };
        ta += a;
        tb += b;
        ratios.push(a.as_secs_f64() / b.as_secs_f64());
    }
    ratios.sort_by(|x, y| x.total_cmp(y));
    let median = ratios[ratios.len() / 2];
    println!(
        "engine overhead, {} tiles of 256x256: dataflow {:.2} ms vs plain loop {:.2} ms per job; median ratio {:.4} ({:+.2}%)",
        setup.tiles(),
        ta.as_secs_f64() * 1e3 / 30.0,
        tb.as_secs_f64() * 1e3 / 30.0,
        median,
        (median - 1.0) * 100.0
    );
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    interleaved_ratio();
}
