//! The KPI harness's executors on real jobs: the naive baseline runs every node whole (its
//! only output is the whole one), NOVA tiles and streams, and the harness's quality comparison reads both
//! outputs back. Needs ffmpeg and sox (scripts/setup.sh), as the harness does.

use nova_benches::executor::Executor;
use nova_benches::kpi::sections::compare;
use nova_benches::kpi::suite::{cases, run_job, Workspace};
use nova_dataflow::ProfileId;

#[test]
fn naive_runs_whole_nova_streams_and_outputs_compare() {
    let ws = Workspace::new((600, 400), 1, 3).expect("workspace (ffmpeg and sox installed)");
    let suite = cases((600, 400), 2, 64, 1, 3);
    for id in ["image_chain", "audio", "video"] {
        let case = suite.iter().find(|c| c.id == id).expect("case in suite");
        let nova = run_job(
            &ws,
            &case.nova,
            Executor::Nova,
            ProfileId::Pascal2G,
            None,
            2,
        );
        let naive = run_job(
            &ws,
            &case.naive,
            Executor::Naive,
            ProfileId::Pascal2G,
            None,
            2,
        );
        assert_eq!(nova.error, None, "{id}: NOVA");
        assert_eq!(naive.error, None, "{id}: naive");
        // Whole tensors: at most one "partial" output, the whole one.
        assert!(
            naive.partials <= 1,
            "{id}: naive partial outputs {}",
            naive.partials
        );
        assert!(
            nova.partials > 1,
            "{id}: NOVA partial outputs {}",
            nova.partials
        );
        assert!(
            nova.chunks > naive.chunks,
            "{id}: chunks {} vs {}",
            nova.chunks,
            naive.chunks
        );
        let first = nova.first_output_ms.expect("NOVA output");
        assert!(
            first <= nova.final_ms,
            "{id}: first {first} > final {}",
            nova.final_ms
        );
        assert!(naive.first_output_ms.is_some());
        let q = compare(case.output, &naive.outputs, &nova.outputs).expect("outputs compare");
        // These pipelines are exact under tiling and streaming.
        assert_eq!(q["identical"], true, "{id}: {q}");
    }
}

#[test]
fn naive_runs_out_of_memory_where_nova_fits() {
    let ws = Workspace::new((64, 64), 1, 1).expect("workspace");
    let text = nova_benches::memory::chain(768, 576)
        .text
        .replace("BenchDiscard", "PreviewImage");
    let whole = run_job(&ws, &text, Executor::Naive, ProfileId::CpuSafe, None, 2);
    assert_eq!(whole.error, None);
    let limit = whole.forecast_peak_bytes / 2;
    let naive = run_job(
        &ws,
        &text,
        Executor::Naive,
        ProfileId::CpuSafe,
        Some(limit),
        2,
    );
    assert!(naive.oom, "naive under half its peak: {:?}", naive.error);
    let nova = run_job(
        &ws,
        &text,
        Executor::Nova,
        ProfileId::CpuSafe,
        Some(limit),
        2,
    );
    assert_eq!(nova.error, None);
    assert!(
        nova.tracked_peak_bytes <= limit,
        "{} > {limit}",
        nova.tracked_peak_bytes
    );
}
