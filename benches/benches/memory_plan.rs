//! OOM incidence of a naive whole-tensor executor versus NOVA's planner, per hardware profile,
//! over one workflow set; real runs of both under small budgets on the simulated device; and
//! the time cost of a budgeted run relative to the unbudgeted one (A and B alternated in the
//! same process, ratio of medians).
//!
//! Run: `cargo bench -p nova-benches --bench memory_plan`
//!
//! Part 1 is decided by the plans (a job is an OOM for an executor when its forecast peak,
//! plus the 5% safety margin, exceeds the profile's budget minus headroom): running 4K
//! images through every profile is beyond a 2-core CPU, and the forecast's honesty is what
//! parts 2 and the integration tests measure (tracked peak within 1% of the forecast).

use nova_benches::memory::{chain, load, options, plan_of, run_plan, upscale, Case};
use nova_dataflow::{Bytes, ProfileId, RunError};

fn part1() {
    let suite: Vec<Case> = vec![
        chain(1024, 768),
        chain(2048, 1536),
        chain(3840, 2160),
        chain(7680, 4320),
        upscale(256, 256),
        upscale(512, 512),
        upscale(1024, 768),
        upscale(1920, 1080),
    ];
    let wfs: Vec<_> = suite.iter().map(|c| (c, load(c))).collect();
    println!("## OOM incidence per profile ({} workflows)\n", suite.len());
    println!("| profile | limit | naive OOM | NOVA refused | NOVA tiled/streamed nodes |");
    println!("|---|---|---|---|---|");
    for p in [
        ProfileId::Pascal2G,
        ProfileId::Pascal4G,
        ProfileId::Pascal6G8G,
        ProfileId::RtxModern,
    ] {
        let spec = p.spec();
        let budget = spec.device_memory.expect("GPU profiles have a size");
        let limit = budget.saturating_sub(spec.headroom);
        let (mut naive_oom, mut refused, mut adapted) = (0, 0, 0);
        for (_, wf) in &wfs {
            let naive = plan_of(wf, &options(p, Some(limit), false, 1));
            let nova = plan_of(wf, &options(p, Some(limit), true, 1));
            naive_oom += usize::from(!naive.fits);
            refused += usize::from(!nova.fits);
            adapted += nova
                .nodes
                .iter()
                .filter(|n| {
                    n.mode == nova_dataflow::ExecMode::Tiled
                        || matches!(
                            n.weights.mode,
                            Some(nova_dataflow::WeightMode::Streamed { .. })
                        )
                })
                .count();
        }
        let n = wfs.len();
        println!(
            "| {p} | {limit} | {naive_oom}/{n} ({:.0}%) | {refused}/{n} ({:.0}%) | {adapted} |",
            100.0 * naive_oom as f64 / n as f64,
            100.0 * refused as f64 / n as f64
        );
    }
    println!();
}

fn part2() {
    println!("## Real runs under small budgets (simulated device, 2 workers)\n");
    println!("| workflow | budget | naive | NOVA | NOVA tracked peak / forecast |");
    println!("|---|---|---|---|---|");
    let cases = [chain(768, 576), upscale(96, 72)];
    let (mut naive_oom, mut nova_ok, mut total) = (0, 0, 0);
    for case in &cases {
        let wf = load(case);
        let whole = plan_of(&wf, &options(ProfileId::CpuSafe, None, false, 2));
        for fraction in [0.9, 0.7, 0.5] {
            let limit = Bytes((whole.naive_peak_bytes as f64 * fraction) as u64);
            let naive = plan_of(&wf, &options(ProfileId::CpuSafe, Some(limit), false, 2));
            let mut nova_opts = options(ProfileId::CpuSafe, Some(limit), true, 2);
            nova_opts.tile = Some(256);
            let nova = plan_of(&wf, &nova_opts);
            let forecast = nova.forecast_peak_bytes;
            let (n_res, _) = run_plan(&wf, naive);
            let (p_res, _) = if nova.fits {
                run_plan(&wf, nova)
            } else {
                (Err(RunError::Runtime("refused".into())), 0.0)
            };
            total += 1;
            let show = |r: &Result<u64, RunError>| match r {
                Ok(_) => "completed".to_string(),
                Err(RunError::Node { error, .. })
                    if error.to_string().contains("out of device memory") =>
                {
                    "out of memory".to_string()
                }
                Err(RunError::Runtime(m)) if m == "refused" => "refused up front".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            naive_oom += usize::from(n_res.is_err());
            nova_ok += usize::from(p_res.is_ok());
            let ratio = match &p_res {
                Ok(peak) => format!("{:.3}", *peak as f64 / forecast as f64),
                Err(_) => "-".into(),
            };
            println!(
                "| {} | {limit} ({:.0}% of whole) | {} | {} | {ratio} |",
                case.name,
                fraction * 100.0,
                show(&n_res),
                show(&p_res)
            );
        }
    }
    println!("\nnaive out of memory: {naive_oom}/{total}; NOVA completed: {nova_ok}/{total}\n");
}

fn part3() {
    println!("## Time cost of the budgeted plan (A = whole, B = budgeted, alternated)\n");
    println!("| workflow | budget | tile | rounds | whole median s | budgeted median s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (case, rounds) in [(chain(1536, 1152), 7), (upscale(128, 96), 5)] {
        let wf = load(&case);
        let whole = plan_of(&wf, &options(ProfileId::CpuSafe, None, false, 2));
        // The tightest of these budgets the planner fits.
        let (fraction, limit, budgeted) = [0.5, 0.7, 0.9]
            .into_iter()
            .map(|f| {
                let limit = Bytes((whole.naive_peak_bytes as f64 * f) as u64);
                let mut opts = options(ProfileId::CpuSafe, Some(limit), true, 2);
                opts.tile = Some(512);
                (f, limit, plan_of(&wf, &opts))
            })
            .find(|(_, _, p)| p.fits)
            .expect("a budgeted plan fits");
        let tile = budgeted
            .nodes
            .iter()
            .filter_map(|n| n.tile)
            .min()
            .unwrap_or(0);
        // Warm up both (page cache, allocator, weight host cache).
        let _ = run_plan(&wf, whole.clone());
        let _ = run_plan(&wf, budgeted.clone());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (r, t) = run_plan(&wf, whole.clone());
            r.expect("whole run");
            a.push(t);
            let (r, t) = run_plan(&wf, budgeted.clone());
            r.expect("budgeted run");
            b.push(t);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|x, y| x.total_cmp(y));
            v[v.len() / 2]
        };
        let (ma, mb) = (median(&mut a), median(&mut b));
        println!(
            "| {} | {limit} ({:.0}% of whole) | {tile} | {rounds} | {ma:.3} | {mb:.3} | {:.3} |",
            case.name,
            fraction * 100.0,
            mb / ma
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no options.
    part1();
    part2();
    part3();
}
