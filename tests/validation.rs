//! Every kind of invalid workflow is refused before any work with a typed error naming the
//! node, the input and the reason.

use nova_dataflow::{workflow, ValidationErrors, WorkflowError};
use nova_tests::Job;

fn errors(json: &str) -> Vec<WorkflowError> {
    let job = Job::new(16, 16);
    let r: Result<_, ValidationErrors> =
        workflow::load(json, &nova_operators::registry(), &job.env);
    r.expect_err("workflow should be invalid").0
}

fn one(json: &str) -> WorkflowError {
    let e = errors(json);
    assert_eq!(e.len(), 1, "expected one error, got {e:?}");
    e.into_iter().next().unwrap()
}

const OK: &str = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
}"#;

#[test]
fn the_valid_workflow_validates_in_topological_order() {
    let job = Job::new(16, 16);
    let wf = workflow::load(OK, &nova_operators::registry(), &job.env).unwrap();
    let ids: Vec<&str> = wf.nodes.iter().map(|n| n.id.0.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3"]);
    assert_eq!(wf.nodes[1].links[0].from, 0);
}

#[test]
fn malformed_json_reports_line_and_column() {
    let e = one("{\n  \"1\": {\"class_type\": \"LoadImage\",\n    \"inputs\": {\"image\": }\n}");
    match e {
        WorkflowError::Json { line, column, .. } => {
            assert_eq!(line, 3);
            assert!(column > 10, "column {column}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn not_an_object_is_refused() {
    assert_eq!(one("[1, 2]"), WorkflowError::NotAnObject);
}

#[test]
fn unknown_node_type_names_node_and_type() {
    let e = one(&OK.replace("\"ImageBlur\"", "\"ImageBlurr\""));
    assert_eq!(
        e,
        WorkflowError::UnknownNodeType {
            node: "2".into(),
            class_type: "ImageBlurr".into()
        }
    );
    assert!(e.to_string().contains("ImageBlurr"));
}

#[test]
fn missing_required_input_names_it() {
    let e = one(&OK.replace("\"blur_radius\": 2, ", ""));
    assert_eq!(e.node(), Some("2"));
    assert_eq!(e.input(), Some("blur_radius"));
    assert!(matches!(e, WorkflowError::MissingInput { .. }));
}

#[test]
fn wrong_type_on_a_link_names_both_ends() {
    let e = one(&OK.replace("\"images\": [\"2\", 0]", "\"images\": [\"1\", 1]"));
    match e {
        WorkflowError::TypeMismatch {
            node,
            input,
            expected,
            from,
            output,
            found,
            ..
        } => {
            assert_eq!((node.as_str(), input.as_str()), ("3", "images"));
            assert_eq!((expected.as_str(), found.as_str()), ("IMAGE", "MASK"));
            assert_eq!((from.as_str(), output), ("1", 1));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn out_of_range_output_index_is_refused() {
    let e = one(&OK.replace("\"image\": [\"1\", 0]", "\"image\": [\"1\", 7]"));
    match e {
        WorkflowError::OutputIndexOutOfRange {
            node,
            input,
            from,
            output,
            count,
            ..
        } => {
            assert_eq!(
                (node.as_str(), input.as_str(), from.as_str()),
                ("2", "image", "1")
            );
            assert_eq!((output, count), (7, 2));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn value_out_of_range_names_bounds() {
    let e = one(&OK.replace("\"blur_radius\": 2", "\"blur_radius\": 99"));
    match e {
        WorkflowError::OutOfRange {
            node,
            input,
            value,
            min,
            max,
            ..
        } => {
            assert_eq!((node.as_str(), input.as_str()), ("2", "blur_radius"));
            assert_eq!(
                (value.as_str(), min.as_str(), max.as_str()),
                ("99", "1", "31")
            );
        }
        e => panic!("{e:?}"),
    }
    let e = one(&OK.replace("\"sigma\": 1.0", "\"sigma\": 0.0"));
    assert!(matches!(e, WorkflowError::OutOfRange { ref input, .. } if input == "sigma"));
}

#[test]
fn wrong_literal_type_and_bad_choice_are_invalid_values() {
    let e = one(&OK.replace("\"blur_radius\": 2", "\"blur_radius\": \"wide\""));
    assert!(matches!(e, WorkflowError::InvalidValue { ref input, .. } if input == "blur_radius"));
    let wf = r#"{
      "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
      "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "magic", "scale_by": 2}},
      "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
    }"#;
    let e = one(wf);
    assert!(
        matches!(e, WorkflowError::InvalidValue { ref input, ref reason, .. } if input == "upscale_method" && reason.contains("magic"))
    );
}

#[test]
fn cycle_names_the_nodes_on_it() {
    let wf = r#"{
      "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
      "2": {"class_type": "ImageBlur", "inputs": {"image": ["4", 0], "blur_radius": 2, "sigma": 1.0}},
      "4": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
      "3": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
    }"#;
    match one(wf) {
        WorkflowError::Cycle { nodes } => {
            assert!(
                nodes.contains(&"2".to_string()) && nodes.contains(&"4".to_string()),
                "{nodes:?}"
            );
            assert!(
                !nodes.contains(&"3".to_string()),
                "3 is downstream, not on the cycle: {nodes:?}"
            );
            assert_eq!(nodes.first(), nodes.last(), "the cycle closes: {nodes:?}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_input_file_names_file_and_folder() {
    let e = one(&OK.replace("card.png", "nope.png"));
    match e {
        WorkflowError::MissingFile {
            node, input, file, ..
        } => {
            assert_eq!(
                (node.as_str(), input.as_str(), file.as_str()),
                ("1", "image", "nope.png")
            );
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn paths_escaping_the_input_folder_are_refused() {
    for bad in ["../card.png", "/etc/passwd"] {
        let e = one(&OK.replace("card.png", bad));
        assert!(
            matches!(e, WorkflowError::InvalidValue { ref input, .. } if input == "image"),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn dangling_link_and_missing_output_node_are_refused() {
    let e = one(&OK.replace("\"image\": [\"1\", 0]", "\"image\": [\"9\", 0]"));
    assert!(matches!(e, WorkflowError::DanglingLink { ref target, .. } if target == "9"));
    let no_out = r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}}}"#;
    assert_eq!(one(no_out), WorkflowError::NoOutputs);
}

#[test]
fn every_fault_is_reported_at_once() {
    let wf = r#"{
      "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
      "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 0, "sigma": 1.0}},
      "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 3], "filename_prefix": true}}
    }"#;
    let mut found: Vec<(String, String, &str)> = errors(wf)
        .iter()
        .map(|e| {
            let kind = match e {
                WorkflowError::InvalidValue { .. } => "invalid",
                WorkflowError::OutOfRange { .. } => "range",
                WorkflowError::OutputIndexOutOfRange { .. } => "index",
                _ => "other",
            };
            (
                e.node().unwrap_or("").to_string(),
                e.input().unwrap_or("").to_string(),
                kind,
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("2".to_string(), "blur_radius".to_string(), "range"),
            ("3".to_string(), "filename_prefix".to_string(), "invalid"),
            ("3".to_string(), "images".to_string(), "index"),
        ]
    );
}

#[test]
fn a_non_integer_output_index_is_an_invalid_value() {
    let e = one(&OK.replace("[\"1\", 0]", "[\"1\", 0.5]"));
    match e {
        WorkflowError::InvalidValue {
            node,
            input,
            reason,
            ..
        } => {
            assert_eq!((node.as_str(), input.as_str()), ("2", "image"));
            assert!(reason.contains("0.5"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_link_into_a_widget_input_is_refused() {
    let e = one(&OK.replace("\"blur_radius\": 2", "\"blur_radius\": [\"1\", 1]"));
    match e {
        WorkflowError::InvalidValue { node, input, .. } => {
            assert_eq!((node.as_str(), input.as_str()), ("2", "blur_radius"));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_prompt_body_and_numeric_strings_are_accepted_as_comfyui_does() {
    let job = Job::new(16, 16);
    let body = format!(
        r#"{{"prompt": {}, "client_id": "abc"}}"#,
        OK.replace("\"blur_radius\": 2", "\"blur_radius\": \"2\"")
    );
    let wf = workflow::load(&body, &nova_operators::registry(), &job.env).unwrap();
    assert_eq!(wf.nodes[1].args.int("blur_radius").unwrap(), 2);
}
