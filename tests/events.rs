//! The event stream: ordering derived from progress tracking, one partial output per output
//! tile, the job's end last; and a failing node ends the job with its id.

use nova_dataflow::{EventKind, Lifecycle, RunError};
use nova_tests::{run_workflow, run_workflow_cancelling, Job};
use std::collections::HashMap;

const BLUR_SAVE: &str = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
  "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
  "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ev"}}
}"#;

#[test]
fn events_follow_progress_order_and_partials_cover_the_output() {
    let job = Job::new(130, 70);
    for workers in [1, 2] {
        let out = run_workflow(BLUR_SAVE, &job.env, Some(32), workers);
        out.result.as_ref().expect("run succeeds");
        let ev = &out.events;

        // Sequence numbers are dense and increasing.
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(e.seq, i as u64);
            assert_eq!(e.v, nova_dataflow::EVENT_SCHEMA_VERSION);
        }
        assert!(matches!(
            ev[0].kind,
            EventKind::Lifecycle {
                state: Lifecycle::Planning,
                node: None
            }
        ));
        assert!(
            matches!(ev.last().unwrap().kind, EventKind::Success { .. }),
            "job end is last"
        );
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e.kind, EventKind::Success { .. } | EventKind::Error { .. }))
                .count(),
            1
        );
        // Each node's tracked peak is within the run's, and the busiest node's is positive.
        let run_peak = match ev.last().unwrap().kind {
            EventKind::Success { memory, .. } => memory.tracked_peak_bytes,
            _ => unreachable!(),
        };
        let node_peaks: Vec<u64> = ev
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::NodeEnd {
                    tracked_peak_bytes, ..
                } => Some(tracked_peak_bytes),
                _ => None,
            })
            .collect();
        assert!(
            node_peaks.iter().all(|&p| p <= run_peak),
            "{node_peaks:?} vs {run_peak}"
        );
        assert!(node_peaks.iter().any(|&p| p > 0), "{node_peaks:?}");

        // Per node: start < chunks < end, with the planned number of chunks in order.
        for (ix, np) in out.plan.nodes.iter().enumerate() {
            let pos = |pred: &dyn Fn(&EventKind) -> bool| -> Vec<usize> {
                ev.iter()
                    .enumerate()
                    .filter(|(_, e)| pred(&e.kind))
                    .map(|(i, _)| i)
                    .collect()
            };
            let starts =
                pos(&|k| matches!(k, EventKind::NodeStart { node, .. } if *node == np.node));
            let ends = pos(&|k| matches!(k, EventKind::NodeEnd { node, .. } if *node == np.node));
            let chunks = pos(&|k| matches!(k, EventKind::Chunk { node, .. } if *node == np.node));
            assert_eq!(starts.len(), 1, "node {} starts once", np.node);
            assert_eq!(ends.len(), 1, "node {} ends once", np.node);
            assert_eq!(
                chunks.len() as u32,
                np.chunk_count(),
                "node {} chunk events",
                np.node
            );
            assert!(
                chunks.iter().all(|&c| starts[0] < c && c < ends[0]),
                "node {}: start < chunks < end",
                np.node
            );
            let order: Vec<u32> = chunks
                .iter()
                .map(|&c| match &ev[c].kind {
                    EventKind::Chunk { chunk, .. } => *chunk,
                    _ => unreachable!(),
                })
                .collect();
            assert_eq!(order, (0..np.chunk_count()).collect::<Vec<_>>());
            // A node starts only after each producer outside its unit ended; within a
            // pipeline region (blur, invert, and SaveImage taking their tiles) the nodes run
            // at once, and each piece is final at a stage only after the stage before.
            let wf_links: Vec<usize> = match ix {
                0 => vec![],
                i => vec![i - 1],
            };
            for p in wf_links {
                let pn = &out.plan.nodes[p];
                if pn.unit == np.unit {
                    for c in 0..np.chunk_count() {
                        let at = |node: &str| {
                            ev.iter()
                                .position(|e| matches!(&e.kind, EventKind::Chunk { node: n, chunk, .. } if n == node && *chunk == c))
                                .unwrap()
                        };
                        assert!(
                            at(&pn.node) < at(&np.node),
                            "piece {c}: {} before {}",
                            pn.node,
                            np.node
                        );
                    }
                    continue;
                }
                let pend = ev
                    .iter()
                    .position(
                        |e| matches!(&e.kind, EventKind::NodeEnd { node, .. } if *node == pn.node),
                    )
                    .unwrap();
                assert!(pend < starts[0]);
            }
        }

        // Partial outputs: one per tile of the image SaveImage consumes, covering it exactly.
        let source = &out.plan.nodes[2];
        assert!(source.chunks.len() > 1);
        let partials: Vec<_> = ev
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.kind {
                EventKind::PartialImage {
                    node,
                    source_node,
                    tile,
                    width,
                    height,
                    ..
                } => Some((
                    i,
                    node.clone(),
                    source_node.clone(),
                    *tile,
                    *width,
                    *height,
                    e.attachment.clone(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(partials.len(), source.chunks.len());
        let area: usize = partials.iter().map(|p| p.3.area()).sum();
        assert_eq!(area, 130 * 70);
        for p in &partials {
            assert_eq!((p.1.as_str(), p.2.as_str(), p.4, p.5), ("4", "3", 130, 70));
            let att = p.6.as_ref().expect("tile pixels attached");
            let dims = att.as_image().unwrap().dims().to_vec();
            assert_eq!(dims, vec![1, p.3.h, p.3.w, 3]);
        }
        let first_partial = partials[0].0;
        let end = ev.len() - 1;
        assert!(first_partial < end);
        // Each partial follows the chunk event that made its tile final.
        let mut last_chunk_of_3: HashMap<u32, usize> = HashMap::new();
        for (i, e) in ev.iter().enumerate() {
            if let EventKind::Chunk { node, chunk, .. } = &e.kind {
                if node == "3" {
                    last_chunk_of_3.insert(*chunk, i);
                }
            }
        }
        for (k, p) in partials.iter().enumerate() {
            assert!(last_chunk_of_3[&(k as u32)] < p.0);
        }
        // Lifecycle order.
        let states: Vec<Lifecycle> = ev
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Lifecycle { state, node: None } => Some(state),
                _ => None,
            })
            .collect();
        assert_eq!(
            states,
            vec![
                Lifecycle::Planning,
                Lifecycle::Running,
                Lifecycle::StreamingPartial,
                Lifecycle::Finalizing
            ]
        );
        // The saved file is announced.
        assert!(ev.iter().any(|e| matches!(&e.kind, EventKind::Executed { node, output } if node == "4" && output["images"][0]["type"] == "output")));
    }
}

#[test]
fn a_node_failing_at_run_time_ends_the_job_with_its_id_and_the_engine_runs_on() {
    let job = Job::new(64, 48);
    // A PNG whose header is valid (so validation passes) but whose data is cut short.
    let good = std::fs::read(job.env.input_dir.join("card.png")).unwrap();
    std::fs::write(job.env.input_dir.join("cut.png"), &good[..good.len() / 2]).unwrap();
    let wf = BLUR_SAVE.replace("card.png", "cut.png");
    let out = run_workflow(&wf, &job.env, Some(32), 2);
    match out.result {
        Err(RunError::Node {
            node,
            class_type,
            error,
        }) => {
            assert_eq!(node, "1");
            assert_eq!(class_type, "LoadImage");
            assert!(error.to_string().contains("cut.png"), "{error}");
        }
        other => panic!("expected a node error, got {other:?}"),
    }
    match &out.events.last().unwrap().kind {
        EventKind::Error {
            node_id,
            node_type,
            message,
            ..
        } => {
            assert_eq!(node_id.as_deref(), Some("1"));
            assert_eq!(node_type.as_deref(), Some("LoadImage"));
            assert!(message.contains("cut.png"));
        }
        k => panic!("last event should be the error, got {k:?}"),
    }
    // The save node (streaming in the same region as the load, so it may have started)
    // never finished and never reported a file.
    assert!(!out.events.iter().any(|e| matches!(
        e.kind,
        EventKind::NodeEnd { ref node, .. } | EventKind::Executed { ref node, .. } if node == "4"
    )));
    // Nothing was written: the save node never ran to its end.
    let written: Vec<_> = std::fs::read_dir(&job.env.output_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "output folder holds {written:?}");
    // The engine is intact: the next job on the same process succeeds.
    let again = run_workflow(BLUR_SAVE, &job.env, Some(32), 2);
    assert!(again.result.is_ok());
}

#[test]
fn a_cancel_mid_run_interrupts_before_anything_is_saved() {
    let job = Job::new(64, 48);
    // One worker: the driver sees the first chunk of node 2 before the next chunk runs.
    let out = run_workflow_cancelling(
        BLUR_SAVE,
        &job.env,
        Some(16),
        1,
        |e| matches!(&e.kind, EventKind::Chunk { node, .. } if node == "2"),
    );
    assert_eq!(out.result.err(), Some(RunError::Interrupted));
    assert!(matches!(
        out.events.last().unwrap().kind,
        EventKind::Interrupted { .. }
    ));
    assert!(!out
        .events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Executed { .. })));
    let written: Vec<_> = std::fs::read_dir(&job.env.output_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "output folder holds {written:?}");
}

#[test]
fn a_cancel_after_the_output_is_written_still_reports_success() {
    let job = Job::new(64, 48);
    let out = run_workflow_cancelling(BLUR_SAVE, &job.env, Some(16), 2, |e| {
        matches!(e.kind, EventKind::Executed { .. })
    });
    let report = out.result.expect("the job had finished its work");
    assert!(report.outputs.contains_key("4"));
    assert!(matches!(
        out.events.last().unwrap().kind,
        EventKind::Success { .. }
    ));
}
