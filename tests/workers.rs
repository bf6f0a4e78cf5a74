//! Running the same workflow with 1, 2 and 3 workers gives identical output files.

use nova_tests::{chain_workflow, reported_files, run_workflow, Job};

#[test]
fn one_and_two_workers_write_identical_files() {
    let job = Job::new(100, 64);
    let mut outputs = Vec::new();
    for workers in [1, 2, 3] {
        let out = run_workflow(
            &chain_workflow(&format!("w{workers}")),
            &job.env,
            Some(32),
            workers,
        );
        let report = out.result.expect("run succeeds");
        let file = reported_files(&report, "7").remove(0);
        // Compare pixel data (the embedded prompt differs by prefix only).
        outputs.push(nova_tests::png_samples(&job.output(&file)));
    }
    assert_eq!(outputs[0], outputs[1], "1 vs 2 workers");
    assert_eq!(outputs[0], outputs[2], "1 vs 3 workers");
}

#[test]
fn same_prompt_with_one_and_two_workers_writes_byte_identical_files() {
    let job = Job::new(80, 50);
    let wf = chain_workflow("same");
    let mut bytes = Vec::new();
    for workers in [1, 2] {
        let report = run_workflow(&wf, &job.env, Some(20), workers)
            .result
            .unwrap();
        let file = reported_files(&report, "7").remove(0);
        bytes.push(std::fs::read(job.output(&file)).unwrap());
    }
    assert_eq!(bytes[0], bytes[1]);
}
