//! Validation and planning against workflow size: a 10,000-node chain (EmptyImage, then
//! ImageInvert after ImageInvert, then SaveImage) against ten 1,000-node chains — the same
//! number of nodes in all, so linear planning gives a ratio of 1 and anything that grows with
//! the square of the graph shows as a ratio near 10.
//!
//! The two are alternated round by round (machine noise hits both), with CPU time and minor
//! page faults beside wall time. Goal: near-linear (ratio under 1.5) and 10,000 nodes in
//! under a second.
//!
//! Run: `cargo bench -p nova-benches --bench planning`

use criterion::{criterion_group, Criterion};
use nova_dataflow::{plan, workflow, JobEnv, NodeRegistry, PlanOptions};
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn chain(n: usize) -> Value {
    let mut wf = serde_json::Map::new();
    wf.insert(
        "1".into(),
        json!({"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}),
    );
    for i in 2..n {
        wf.insert(
            i.to_string(),
            json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}),
        );
    }
    wf.insert(
        n.to_string(),
        json!({"class_type": "SaveImage", "inputs": {"images": [(n - 1).to_string(), 0], "filename_prefix": "x"}}),
    );
    Value::Object(wf)
}

fn prepare(reg: &NodeRegistry, env: &JobEnv, wf: &Value) -> usize {
    let v = workflow::validate(wf.clone(), reg, env).expect("valid");
    let p = plan(&v, env, &PlanOptions::default()).expect("plans");
    p.nodes.len()
}

/// (CPU seconds, minor faults) of this process so far.
fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|s| s.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ((num(11) + num(12)) / 100.0, num(7) as u64)
}

fn bench(c: &mut Criterion) {
    let reg = nova_operators::registry();
    let env = JobEnv::new("input", "output", "temp");
    let big = chain(10_000);
    let mut g = c.benchmark_group("validate_and_plan");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("chain_10000", |b| {
        b.iter(|| black_box(prepare(&reg, &env, &big)))
    });
    g.finish();
}

criterion_group!(benches, bench);

fn interleaved() {
    let reg = nova_operators::registry();
    let env = JobEnv::new("input", "output", "temp");
    let big = chain(10_000);
    let small = chain(1_000);
    prepare(&reg, &env, &big);
    prepare(&reg, &env, &small);
    let rounds = 7;
    let mut ratios = vec![];
    let mut big_ms = vec![];
    let (mut big_cpu, mut big_faults, mut small_cpu, mut small_faults) = (0.0, 0, 0.0, 0);
    for round in 0..rounds {
        let one = |wf: &Value, times: usize| {
            let (c0, f0) = usage();
            let t = Instant::now();
            for _ in 0..times {
                black_box(prepare(&reg, &env, wf));
            }
            let wall = t.elapsed().as_secs_f64();
            let (c1, f1) = usage();
            (wall, c1 - c0, f1 - f0)
        };
        let (b, s) = if round % 2 == 0 {
            let b = one(&big, 1);
            (b, one(&small, 10))
        } else {
            let s = one(&small, 10);
            (one(&big, 1), s)
        };
        big_ms.push(b.0 * 1e3);
        big_cpu += b.1;
        big_faults += b.2;
        small_cpu += s.1;
        small_faults += s.2;
        ratios.push(b.0 / s.0);
    }
    ratios.sort_by(f64::total_cmp);
    big_ms.sort_by(f64::total_cmp);
    let r = rounds as f64;
    println!(
        "planning: one 10,000-node chain {:.1} ms median (CPU {:.1} ms, {} minor faults per round) \
         vs ten 1,000-node chains (CPU {:.1} ms, {} minor faults per round); median ratio {:.3} \
         (1 = linear, 10 = quadratic)",
        big_ms[big_ms.len() / 2],
        big_cpu / r * 1e3,
        big_faults / rounds as u64,
        small_cpu / r * 1e3,
        small_faults / rounds as u64,
        ratios[ratios.len() / 2]
    );
}

fn main() {
    benches();
    interleaved();
    Criterion::default().configure_from_args().final_summary();
}
