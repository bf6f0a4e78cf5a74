//! The memory planner against real runs: budgets that a whole-tensor plan cannot meet are met
//! by tiling, the accountant's peak stays inside the budget and near the forecast, plans that
//! cannot fit are refused with numbers, and a chunk that still runs short is retried smaller.

use nova_dataflow::admit;
use nova_dataflow::{Bytes, EventKind, PlanOptions, RunReport};
use nova_tests::{chain_workflow, options, png_samples, reported_files, run_planned, Job};

/// Plans for a memory limit, as the CLI does on 2 workers with prefetch 1 and a 5% margin.
fn limited(limit: u64) -> PlanOptions {
    PlanOptions {
        tile: Some(256),
        min_tile: 16,
        limit: Some(Bytes(limit)),
        safety_margin: 0.05,
        workers: 2,
        prefetch: 1,
        ..PlanOptions::default()
    }
}

/// The output pixels of a successful run.
fn pixels(job: &Job, report: &RunReport) -> Vec<u8> {
    let files = reported_files(report, "7");
    png_samples(&job.output(&files[0])).2
}

#[test]
fn budgets_the_whole_tensor_plan_cannot_meet_are_met_by_tiling_with_the_same_pixels() {
    let job = Job::new(320, 240);
    // Reference: every node whole, no limit.
    let whole = run_planned(
        &chain_workflow("whole"),
        &job.env,
        &options(None, 2),
        None,
        |_| false,
    );
    let whole_report = whole.result.expect("whole run succeeds");
    let reference = pixels(&job, &whole_report);
    let naive = whole.plan.naive_peak_bytes;
    assert!(naive > 0);
    // Whole-tensor memory, as the accountant measured it, agrees with the forecast.
    let ratio = whole_report.tracked_peak_bytes as f64 / whole.plan.forecast_peak_bytes as f64;
    assert!(
        (0.75..=1.25).contains(&ratio),
        "whole run: tracked {} vs forecast {}",
        whole_report.tracked_peak_bytes,
        whole.plan.forecast_peak_bytes
    );

    for (i, fraction) in [0.9, 0.7, 0.55].into_iter().enumerate() {
        let limit = (naive as f64 * fraction) as u64;
        let prefix = format!("budget{i}");
        let out = run_planned(
            &chain_workflow(&prefix),
            &job.env,
            &limited(limit),
            Some(Bytes(limit)),
            |_| false,
        );
        let plan = &out.plan;
        assert!(
            plan.naive_peak_bytes > limit,
            "the whole-tensor plan must not fit {limit}"
        );
        assert!(plan.fits, "the planner fits {limit}: {plan:#?}");
        let report = out
            .result
            .unwrap_or_else(|e| panic!("budget {limit}: run failed: {e}"));
        assert_eq!(report.retries, 0, "the forecast held, nothing was retried");
        assert!(
            report.tracked_peak_bytes <= limit,
            "budget {limit}: tracked peak {} over the limit",
            report.tracked_peak_bytes
        );
        let ratio = report.tracked_peak_bytes as f64 / plan.forecast_peak_bytes as f64;
        eprintln!(
            "budget {limit}: forecast {} tracked {} ratio {ratio:.3}",
            plan.forecast_peak_bytes, report.tracked_peak_bytes
        );
        assert!(
            (0.75..=1.25).contains(&ratio),
            "budget {limit}: tracked {} vs forecast {} (ratio {ratio:.3})",
            report.tracked_peak_bytes,
            plan.forecast_peak_bytes
        );
        assert_eq!(
            pixels(&job, &report),
            reference,
            "budget {limit}: pixels differ from the whole run"
        );
        // The forecast and the measured peak are events too.
        match &out.events.last().unwrap().kind {
            EventKind::Success { memory, .. } => {
                assert_eq!(memory.budget_bytes, Some(limit));
                assert_eq!(memory.tracked_peak_bytes, report.tracked_peak_bytes);
            }
            k => panic!("expected success, got {k:?}"),
        }
        let forecast = out
            .events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::MemoryForecast(f) => Some(f.clone()),
                _ => None,
            })
            .expect("a memory forecast event");
        assert_eq!(forecast.forecast_peak_bytes, plan.forecast_peak_bytes);
        assert!(forecast.fits);
    }
}

#[test]
fn a_plan_that_cannot_fit_is_refused_with_numbers_and_a_suggestion() {
    let job = Job::new(320, 240);
    let json = chain_workflow("refused");
    let registry = nova_operators::registry();
    let wf = nova_dataflow::workflow::load(&json, &registry, &job.env).unwrap();
    // 64 KiB cannot even hold the pieces in flight of the one region the chain forms.
    let plan = nova_dataflow::plan(&wf, &job.env, &limited(64 << 10)).unwrap();
    assert!(!plan.fits);
    let profiles = vec![("PASCAL_2G".to_string(), Bytes::gib(2))];
    let refusal = admit(&plan, Bytes(96 << 10), Bytes(32 << 10), &profiles).unwrap_err();
    assert!(refusal.need_bytes > refusal.limit_bytes);
    assert_eq!(refusal.limit_bytes, 64 << 10);
    let m = &refusal.message;
    assert!(
        m.starts_with("the region of nodes 1, 2, 3, 4, 5, 6, 7 (LoadImage -> "),
        "{m}"
    );
    assert!(
        m.contains(&format!(" {} ", refusal.node)) || m.contains(&format!(" {},", refusal.node)),
        "{m}"
    );
    assert!(m.contains("budget 64.0 KiB after 32.0 KiB headroom"), "{m}");
    assert!(m.contains("use the PASCAL_2G profile"), "{m}");
    let (w, h) = refusal.suggest_resolution.expect("a smaller resolution");
    assert!(w < 320 && h < 240, "{w}x{h}");
    assert!(
        m.contains(&format!("lower the resolution to {w}x{h}")),
        "{m}"
    );
    // Nothing ran: admission looks at the plan only, and the output folder is untouched.
    assert_eq!(std::fs::read_dir(&job.env.output_dir).unwrap().count(), 0);

    // A plan that fits is admitted.
    let ok = nova_dataflow::plan(&wf, &job.env, &limited(64 << 20)).unwrap();
    assert!(ok.fits);
    assert!(admit(&ok, Bytes(64 << 20), Bytes(0), &profiles).is_ok());
}

/// Load, blur, save: one region (the PNG read band by band, the blur tiled, the PNG written
/// band by band).
fn blur_workflow(prefix: &str) -> String {
    format!(
        r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
  "2": {{"class_type": "ImageBlur", "inputs": {{"image": ["1", 0], "blur_radius": 4, "sigma": 2.0}}}},
  "7": {{"class_type": "SaveImage", "inputs": {{"images": ["2", 0], "filename_prefix": "{prefix}"}}}}
}}"#
    )
}

#[test]
fn a_chunk_that_runs_out_of_memory_is_retried_at_half_the_tile_with_the_same_pixels() {
    let job = Job::new(320, 240);
    let reference = {
        let out = run_planned(
            &blur_workflow("ref"),
            &job.env,
            &options(None, 1),
            None,
            |_| false,
        );
        pixels(&job, &out.result.expect("reference run"))
    };
    // Plan generous 128 px tiles without a limit, then run them under a limit the forecast
    // did not foresee (as when another process took memory after planning): the blur's
    // chunks cannot all lease their result and workspace at full size.
    let plan_opts = options(Some(128), 1);
    let registry = nova_operators::registry();
    let json = blur_workflow("retry");
    let wf = nova_dataflow::workflow::load(&json, &registry, &job.env).unwrap();
    let probe = nova_dataflow::plan(&wf, &job.env, &plan_opts).unwrap();
    let blur = probe.nodes.iter().find(|n| n.node == "2").unwrap();
    assert_eq!(blur.tile, Some(128));
    // The load, the blur and the save form one region: the input is read band by band, the
    // output written band by band. The forecast: the rows each end holds, each piece in flight
    // with the most a stage holds for it (set aside when it is cut), and the blurred tiles
    // kept until announced (the save shows them).
    let unit = &probe.units[blur.unit];
    assert_eq!(unit.kind, nova_dataflow::UnitKind::Pipeline);
    let ends: u64 = [unit.source, unit.sink]
        .iter()
        .flatten()
        .map(|&n| probe.nodes[n].forecast.working_bytes)
        .sum();
    assert_eq!((unit.source.is_some(), unit.sink.is_some()), (true, true));
    let cm = blur.chunk_memory.unwrap();
    let inflight = blur.inflight as u64;
    assert_eq!(blur.inflight, probe.inflight_chunks(blur.chunks.len()));
    assert_eq!(unit.reserve_bytes, cm.piece + cm.result + cm.workspace);
    assert_eq!(
        ends + inflight * (unit.reserve_bytes + cm.result),
        unit.working_bytes
    );
    // Room for both ends, one piece and its result, and half its workspace: not even one
    // piece's memory can be set aside, but a subdivided one can run.
    let limit = ends + cm.piece + cm.result + cm.workspace / 2;
    assert!(unit.working_bytes > limit);
    let out = nova_tests::run_with_limit(&json, &job.env, &plan_opts, limit);
    let report = out.result.expect("the job survives by retrying smaller");
    assert!(report.retries > 0, "some chunk must have been retried");
    let retries: Vec<_> = out
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Retry {
                node,
                tile_from,
                tile_to,
                ..
            } => Some((node.clone(), *tile_from, *tile_to)),
            _ => None,
        })
        .collect();
    assert_eq!(retries.len() as u32, report.retries);
    for (node, from, to) in &retries {
        assert_eq!(node, "2");
        assert!(to < from && *to >= 16, "{from} -> {to}");
    }
    assert!(report.tracked_peak_bytes <= limit);
    assert_eq!(pixels(&job, &report), reference);
}
