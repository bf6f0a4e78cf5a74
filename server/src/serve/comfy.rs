//! ComfyUI's wire formats: WebSocket messages, binary preview frames, `/prompt`'s error
//! bodies and `node_errors`. Pure functions, so the shapes are unit-tested here.
//!
//! Shapes follow ComfyUI's `server.py`/`execution.py`: every text frame is
//! `{"type": ..., "data": {...}}`; binary frames are `[u32 BE event type][payload]` with
//! `PREVIEW_IMAGE = 1` (`[u32 image type: 1 JPEG, 2 PNG][bytes]`) and
//! `PREVIEW_IMAGE_WITH_METADATA = 4` (`[u32 length][metadata JSON][bytes]`).

use nova_dataflow::{NodeRegistry, ValidationErrors, WorkflowError};
use serde_json::{json, Map, Value as Json};
use std::collections::{BTreeMap, BTreeSet};

/// Binary frame type: a JPEG/PNG preview.
pub(crate) const PREVIEW_IMAGE: u32 = 1;
/// Binary frame type: a preview with a JSON metadata header.
pub(crate) const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// A text frame.
pub(crate) fn msg(kind: &str, data: Json) -> Json {
    json!({ "type": kind, "data": data })
}

/// `status`: the queue's length; `sid` only in the first message a socket gets.
pub(crate) fn status(queue_remaining: u64, sid: Option<&str>) -> Json {
    let mut data = json!({ "status": { "exec_info": { "queue_remaining": queue_remaining } } });
    if let Some(sid) = sid {
        data["sid"] = json!(sid);
    }
    msg("status", data)
}

pub(crate) fn execution_start(prompt_id: &str, ts: u64) -> Json {
    msg(
        "execution_start",
        json!({ "prompt_id": prompt_id, "timestamp": ts }),
    )
}

pub(crate) fn execution_cached(prompt_id: &str, nodes: &[String], ts: u64) -> Json {
    msg(
        "execution_cached",
        json!({ "nodes": nodes, "prompt_id": prompt_id, "timestamp": ts }),
    )
}

/// `executing`: a node started; `None` once the job is over.
pub(crate) fn executing(prompt_id: &str, node: Option<&str>) -> Json {
    match node {
        Some(n) => msg(
            "executing",
            json!({ "node": n, "display_node": n, "prompt_id": prompt_id }),
        ),
        None => msg("executing", json!({ "node": null, "prompt_id": prompt_id })),
    }
}

pub(crate) fn progress(prompt_id: &str, node: &str, value: u64, max: u64) -> Json {
    msg(
        "progress",
        json!({ "value": value, "max": max, "prompt_id": prompt_id, "node": node }),
    )
}

pub(crate) fn executed(prompt_id: &str, node: &str, output: &Json) -> Json {
    msg(
        "executed",
        json!({ "node": node, "display_node": node, "output": output, "prompt_id": prompt_id }),
    )
}

pub(crate) fn execution_success(prompt_id: &str, ts: u64) -> Json {
    msg(
        "execution_success",
        json!({ "prompt_id": prompt_id, "timestamp": ts }),
    )
}

/// What a failed job reports.
pub(crate) struct Failure<'a> {
    pub node_id: Option<&'a str>,
    pub node_type: Option<&'a str>,
    pub executed: &'a [String],
    pub message: &'a str,
    /// ComfyUI puts the Python exception's class here; NOVA names the error's kind.
    pub exception_type: &'a str,
}

pub(crate) fn execution_error(prompt_id: &str, f: &Failure<'_>, ts: u64) -> Json {
    msg(
        "execution_error",
        json!({
            "prompt_id": prompt_id,
            "node_id": f.node_id,
            "node_type": f.node_type,
            "executed": f.executed,
            "exception_message": f.message,
            "exception_type": f.exception_type,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": [],
            "timestamp": ts,
        }),
    )
}

pub(crate) fn execution_interrupted(
    prompt_id: &str,
    node_id: Option<&str>,
    node_type: Option<&str>,
    executed: &[String],
    ts: u64,
) -> Json {
    msg(
        "execution_interrupted",
        json!({
            "prompt_id": prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "executed": executed,
            "timestamp": ts,
        }),
    )
}

/// A type-1 preview frame (for clients that did not negotiate metadata).
pub(crate) fn preview_frame(image: &[u8], jpeg: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + image.len());
    v.extend_from_slice(&PREVIEW_IMAGE.to_be_bytes());
    v.extend_from_slice(&(if jpeg { 1u32 } else { 2u32 }).to_be_bytes());
    v.extend_from_slice(image);
    v
}

/// A type-4 preview frame: metadata (node, prompt, image type, and NOVA's tile fields) first.
pub(crate) fn preview_frame_with_metadata(meta: &Json, image: &[u8]) -> Vec<u8> {
    let m = meta.to_string();
    let mut v = Vec::with_capacity(8 + m.len() + image.len());
    v.extend_from_slice(&PREVIEW_IMAGE_WITH_METADATA.to_be_bytes());
    v.extend_from_slice(&(m.len() as u32).to_be_bytes());
    v.extend_from_slice(m.as_bytes());
    v.extend_from_slice(image);
    v
}

/// `/prompt`'s 400 body: `{"error": {type, message, details, extra_info}, "node_errors"}`.
pub(crate) fn prompt_error(kind: &str, message: &str, details: &str, node_errors: Json) -> Json {
    json!({
        "error": { "type": kind, "message": message, "details": details, "extra_info": {} },
        "node_errors": node_errors,
    })
}

/// The `/prompt` error body for a workflow that failed validation, in ComfyUI's shape:
/// faults that stop the whole prompt (malformed JSON, unknown node types, no outputs) as
/// `invalid_prompt`/`prompt_no_outputs`, the rest per node under `node_errors` with
/// ComfyUI's error types and `extra_info.input_name`.
pub(crate) fn validation_error_body(
    errors: &ValidationErrors,
    prompt: &Json,
    registry: &NodeRegistry,
) -> Json {
    use WorkflowError as E;
    let errs = errors.errors();
    // Whole-prompt faults first, as ComfyUI checks them before validating nodes.
    for e in errs {
        match e {
            E::Json { .. } | E::NotAnObject | E::MalformedNode { .. } => {
                return prompt_error("invalid_prompt", &e.to_string(), "", json!({}));
            }
            E::UnknownNodeType { node, class_type } => {
                return prompt_error(
                    "invalid_prompt",
                    &format!("Cannot execute because node {class_type} does not exist."),
                    &format!("Node ID '#{node}'"),
                    json!({}),
                );
            }
            E::NoOutputs => {
                return prompt_error("prompt_no_outputs", "Prompt has no outputs", "", json!({}));
            }
            _ => {}
        }
    }
    let graph = prompt_graph(prompt);
    let mut by_node: BTreeMap<String, Vec<Json>> = BTreeMap::new();
    for e in errs {
        let (kind, message) = comfy_kind(e);
        let details = match e.input() {
            Some(i) => format!("{i}: {e}"),
            None => e.to_string(),
        };
        let mut extra = Map::new();
        if let Some(i) = e.input() {
            extra.insert("input_name".into(), json!(i));
        }
        let item =
            json!({ "type": kind, "message": message, "details": details, "extra_info": extra });
        let nodes: Vec<String> = match e {
            E::Cycle { nodes } => nodes.clone(),
            _ => e.node().map(|n| vec![n.to_string()]).unwrap_or_default(),
        };
        for n in nodes {
            by_node.entry(n).or_default().push(item.clone());
        }
    }
    let outputs = output_nodes(graph, registry);
    let node_errors: Map<String, Json> = by_node
        .into_iter()
        .map(|(node, errors)| {
            let class_type = graph
                .and_then(|g| g.get(&node))
                .and_then(|n| n.get("class_type"))
                .cloned()
                .unwrap_or(Json::Null);
            let dependent: Vec<&String> = outputs
                .iter()
                .filter(|o| graph.is_some_and(|g| depends_on(g, o, &node)))
                .collect();
            (
                node,
                json!({ "errors": errors, "dependent_outputs": dependent, "class_type": class_type }),
            )
        })
        .collect();
    let details = errs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    prompt_error(
        "prompt_outputs_failed_validation",
        "Prompt outputs failed validation",
        &details,
        Json::Object(node_errors),
    )
}

/// ComfyUI's error type and message for a node fault.
fn comfy_kind(e: &WorkflowError) -> (&'static str, String) {
    use WorkflowError as E;
    match e {
        E::MissingInput { .. } => ("required_input_missing", "Required input is missing".into()),
        E::TypeMismatch { .. } => (
            "return_type_mismatch",
            "Return type mismatch between linked nodes".into(),
        ),
        E::DanglingLink { .. } | E::OutputIndexOutOfRange { .. } => (
            "bad_linked_input",
            "Bad linked input, must be a length-2 list of [node_id, slot_index]".into(),
        ),
        E::OutOfRange {
            value, min, max, ..
        } => {
            let below = match (value.parse::<f64>(), min.parse::<f64>()) {
                (Ok(v), Ok(m)) => v < m,
                _ => false,
            };
            if below {
                (
                    "value_smaller_than_min",
                    format!("Value {value} smaller than min of {min}"),
                )
            } else {
                (
                    "value_bigger_than_max",
                    format!("Value {value} bigger than max of {max}"),
                )
            }
        }
        E::MissingFile { .. } => ("value_not_in_list", "Value not in list".into()),
        E::InvalidValue { reason, .. } => ("invalid_input_type", reason.clone()),
        E::Cycle { .. } => ("dependency_cycle", "Dependency cycle detected".into()),
        E::NodeCheck { reason, .. } => ("custom_validation_failed", reason.clone()),
        _ => ("exception_during_validation", e.to_string()),
    }
}

/// The node map of a prompt (a `/prompt` body's `prompt`, or the map itself).
fn prompt_graph(prompt: &Json) -> Option<&Map<String, Json>> {
    let p = match prompt.get("prompt") {
        Some(inner) if inner.is_object() && prompt.get("class_type").is_none() => inner,
        _ => prompt,
    };
    p.as_object()
}

/// Ids of the prompt's output nodes (by their schemas), in id order.
pub(crate) fn output_nodes(
    graph: Option<&Map<String, Json>>,
    registry: &NodeRegistry,
) -> Vec<String> {
    let Some(g) = graph else { return vec![] };
    let mut v: Vec<String> = g
        .iter()
        .filter(|(_, n)| {
            n.get("class_type")
                .and_then(|c| c.as_str())
                .and_then(|c| registry.get(c))
                .is_some_and(|node| node.schema().output_node)
        })
        .map(|(id, _)| id.clone())
        .collect();
    v.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    v
}

/// Whether `from` (transitively) takes input from `target`.
fn depends_on(g: &Map<String, Json>, from: &str, target: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(n) = stack.pop() {
        if n == target {
            return true;
        }
        if !seen.insert(n.clone()) {
            continue;
        }
        if let Some(inputs) = g
            .get(&n)
            .and_then(|x| x.get("inputs"))
            .and_then(|i| i.as_object())
        {
            for v in inputs.values() {
                if let Some([Json::String(src), Json::Number(_)]) =
                    v.as_array().map(|a| a.as_slice())
                {
                    stack.push(src.clone());
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_the_sid_only_when_given() {
        let s = status(3, Some("abc"));
        assert_eq!(s["type"], "status");
        assert_eq!(s["data"]["status"]["exec_info"]["queue_remaining"], 3);
        assert_eq!(s["data"]["sid"], "abc");
        assert!(status(0, None)["data"].get("sid").is_none());
    }

    #[test]
    fn preview_frames_have_comfyui_headers() {
        let f = preview_frame(b"JPEGDATA", true);
        assert_eq!(&f[..4], &[0, 0, 0, 1]);
        assert_eq!(&f[4..8], &[0, 0, 0, 1]);
        assert_eq!(&f[8..], b"JPEGDATA");
        let meta = json!({"node_id": "3", "image_type": "image/jpeg"});
        let f = preview_frame_with_metadata(&meta, b"IMG");
        assert_eq!(&f[..4], &[0, 0, 0, 4]);
        let n = u32::from_be_bytes([f[4], f[5], f[6], f[7]]) as usize;
        let parsed: Json = serde_json::from_slice(&f[8..8 + n]).unwrap();
        assert_eq!(parsed, meta);
        assert_eq!(&f[8 + n..], b"IMG");
    }

    #[test]
    fn executing_null_ends_a_job() {
        let m = executing("p", None);
        assert!(m["data"]["node"].is_null());
        assert_eq!(m["data"]["prompt_id"], "p");
        assert_eq!(executing("p", Some("4"))["data"]["display_node"], "4");
    }

    #[test]
    fn node_errors_name_the_input_and_the_outputs_that_depend_on_it() {
        let registry = nova_operators::registry();
        let prompt = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 500, "sigma": 1.0}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        });
        let env = nova_dataflow::JobEnv::new("/nonexistent", "/tmp/out", "/tmp/temp");
        let errs = nova_dataflow::workflow::validate(prompt.clone(), &registry, &env).unwrap_err();
        let body = validation_error_body(&errs, &prompt, &registry);
        assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
        let e = &body["node_errors"]["2"];
        assert_eq!(e["class_type"], "ImageBlur");
        assert_eq!(e["dependent_outputs"], json!(["3"]));
        assert_eq!(e["errors"][0]["type"], "value_bigger_than_max");
        assert_eq!(e["errors"][0]["extra_info"]["input_name"], "blur_radius");
    }

    #[test]
    fn unknown_node_types_stop_the_whole_prompt() {
        let registry = nova_operators::registry();
        let prompt = json!({"7": {"class_type": "NoSuchNode", "inputs": {}}});
        let env = nova_dataflow::JobEnv::new("/nonexistent", "/tmp/out", "/tmp/temp");
        let errs = nova_dataflow::workflow::validate(prompt.clone(), &registry, &env).unwrap_err();
        let body = validation_error_body(&errs, &prompt, &registry);
        assert_eq!(body["error"]["type"], "invalid_prompt");
        assert_eq!(body["error"]["details"], "Node ID '#7'");
        assert_eq!(body["node_errors"], json!({}));
    }
}
