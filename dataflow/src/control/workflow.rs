//! Workflow parsing and validation: ComfyUI's API format in, a [`ValidatedWorkflow`] out.
//!
//! The API format is `{"<id>": {"class_type": "...", "inputs": {...}}}` where an input is a
//! literal or a link `["<id>", <output_index>]`. A body of the form `{"prompt": {...}}` (what
//! clients POST to `/prompt`) is accepted too.
//!
//! As in ComfyUI, every node's `class_type` must exist, at least one output node must be
//! present, and only the nodes that output nodes depend on are validated further and run.
//! Validation collects every fault it can find rather than stopping at the first.
//!
//! Invariant (parse, don't validate): a `ValidatedWorkflow` has every node type resolved, every
//! widget input present, typed and in range (defaults filled in), every link pointing at an
//! existing output of the right type, no cycle, every input file present, and its nodes in a
//! deterministic topological order. Nothing downstream checks these again.

use crate::node::error::{ValidationErrors, WorkflowError};
use crate::node::schema::{FileFolder, InputKind};
use crate::node::value::DataType;
use crate::node::{Args, JobEnv, Node, NodeId, NodeRegistry};
use serde_json::{Map, Value as Json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A link from an input of one node to an output of an earlier node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The input name on the consuming node.
    pub input: &'static str,
    /// Index (into [`ValidatedWorkflow::nodes`]) of the producing node.
    pub from: usize,
    /// Output index on the producing node.
    pub output: usize,
}

/// One node of a validated workflow.
#[derive(Clone)]
pub struct WorkflowNode {
    pub id: NodeId,
    pub class_type: &'static str,
    pub node: Arc<dyn Node>,
    pub args: Args,
    /// Linked inputs, in schema order.
    pub links: Vec<Link>,
    /// `IMAGE` inputs linked to a video: the node runs on its frames ([`crate::control::lift`]) and
    /// its outputs are videos. Empty for a node that runs as declared.
    pub lifted: Vec<&'static str>,
    /// The node hands its video on through its `IMAGE` batch output instead of decoding it
    /// ([`Node::batch_port`]).
    pub streamed_batch: bool,
}

impl std::fmt::Debug for WorkflowNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowNode")
            .field("id", &self.id)
            .field("class_type", &self.class_type)
            .field("args", &self.args)
            .field("links", &self.links)
            .field("lifted", &self.lifted)
            .field("streamed_batch", &self.streamed_batch)
            .finish()
    }
}

/// A workflow that passed validation. See the module docs for what that guarantees.
#[derive(Clone, Debug)]
pub struct ValidatedWorkflow {
    /// Nodes in topological order: every link points to an earlier index.
    pub nodes: Vec<WorkflowNode>,
    /// The workflow as submitted (API format), kept to embed in outputs.
    pub prompt: Arc<Json>,
    /// For each node, the nodes that consume one of its outputs (ascending, once each);
    /// derived from `nodes` when validated.
    consumers: Vec<Vec<usize>>,
}

impl ValidatedWorkflow {
    /// Index of a node by id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id.0 == id)
    }

    /// Indices of nodes that consume an output of node `ix`, ascending.
    pub fn consumers(&self, ix: usize) -> &[usize] {
        self.consumers.get(ix).map_or(&[], Vec::as_slice)
    }
}

/// Each node's consumers, from the links (linear in nodes and links).
fn consumer_lists(nodes: &[WorkflowNode]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); nodes.len()];
    for (c, n) in nodes.iter().enumerate() {
        for l in &n.links {
            if let Some(list) = out.get_mut(l.from) {
                if list.last() != Some(&c) {
                    list.push(c);
                }
            }
        }
    }
    out
}

/// A node id ordered as [`id_order`] orders ids (numbers by value, before other names).
#[derive(PartialEq, Eq)]
struct ById<'a>(&'a str);

impl Ord for ById<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        id_order(self.0, other.0)
    }
}

impl PartialOrd for ById<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Parses workflow text, reporting malformed JSON with its line and column.
pub fn parse(text: &str) -> Result<Json, ValidationErrors> {
    serde_json::from_str::<Json>(text).map_err(|e| {
        WorkflowError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
        .into()
    })
}

/// Parses and validates workflow text in one step.
pub fn load(
    text: &str,
    registry: &NodeRegistry,
    env: &JobEnv,
) -> Result<ValidatedWorkflow, ValidationErrors> {
    let json = parse(text)?;
    validate(json, registry, env)
}

/// Orders node ids numerically where they are numbers ("2" < "10"), else as strings.
fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// A raw link as written: `["<id>", <index>]`.
fn as_link(v: &Json) -> Option<(String, Json)> {
    let arr = v.as_array()?;
    if arr.len() != 2 {
        return None;
    }
    let id = match &arr[0] {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => return None,
    };
    Some((id, arr[1].clone()))
}

/// Validates a parsed workflow against the registry and the job's folders.
pub fn validate(
    json: Json,
    registry: &NodeRegistry,
    env: &JobEnv,
) -> Result<ValidatedWorkflow, ValidationErrors> {
    // Accept a /prompt body: {"prompt": {...}, ...} where "prompt" is not itself a node.
    let json = match json {
        Json::Object(mut m)
            if m.get("prompt")
                .is_some_and(|p| p.is_object() && p.get("class_type").is_none()) =>
        {
            m.remove("prompt").unwrap_or(Json::Null)
        }
        other => other,
    };
    let Json::Object(raw) = &json else {
        return Err(WorkflowError::NotAnObject.into());
    };
    let mut errors = Vec::new();

    // Pass 1: every node has a known class_type and an inputs object.
    struct Raw<'a> {
        node: Arc<dyn Node>,
        inputs: &'a Map<String, Json>,
    }
    let empty = Map::new();
    let mut nodes: BTreeMap<&str, Raw> = BTreeMap::new();
    let mut ids: Vec<&str> = raw.keys().map(|k| k.as_str()).collect();
    ids.sort_by(|a, b| id_order(a, b));
    for id in &ids {
        let entry = &raw[*id];
        let Some(obj) = entry.as_object() else {
            errors.push(WorkflowError::MalformedNode {
                node: id.to_string(),
                reason: "a node must be an object with 'class_type' and 'inputs'".into(),
            });
            continue;
        };
        let Some(class_type) = obj.get("class_type").and_then(|c| c.as_str()) else {
            errors.push(WorkflowError::MalformedNode {
                node: id.to_string(),
                reason: "missing 'class_type'".into(),
            });
            continue;
        };
        let inputs = match obj.get("inputs") {
            None => &empty,
            Some(Json::Object(m)) => m,
            Some(_) => {
                errors.push(WorkflowError::MalformedNode {
                    node: id.to_string(),
                    reason: "'inputs' must be an object".into(),
                });
                continue;
            }
        };
        match registry.get(class_type) {
            Some(node) => {
                nodes.insert(
                    id,
                    Raw {
                        node: node.clone(),
                        inputs,
                    },
                );
            }
            None => errors.push(WorkflowError::UnknownNodeType {
                node: id.to_string(),
                class_type: class_type.to_string(),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }

    // Pass 2: the nodes output nodes depend on.
    let outputs: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| nodes[id].node.schema().output_node)
        .collect();
    if outputs.is_empty() {
        return Err(WorkflowError::NoOutputs.into());
    }
    let mut needed: BTreeSet<&str> = BTreeSet::new();
    let mut stack = outputs.clone();
    while let Some(id) = stack.pop() {
        if !needed.insert(id) {
            continue;
        }
        let raw = &nodes[id];
        for (_, v) in raw.inputs.iter() {
            if let Some((target, _)) = as_link(v) {
                if let Some((k, _)) = nodes.get_key_value(target.as_str()) {
                    stack.push(k);
                }
            }
        }
    }
    let mut needed: Vec<&str> = needed.into_iter().collect();
    needed.sort_by(|a, b| id_order(a, b));

    // Pass 3: inputs of each needed node.
    struct Checked {
        args: BTreeMap<String, Json>,
        links: Vec<(&'static str, String, usize)>,
        ok: bool,
    }
    let mut checked: BTreeMap<&str, Checked> = BTreeMap::new();
    for id in &needed {
        let raw = &nodes[id];
        let schema = raw.node.schema();
        let class_type = schema.class_type;
        let mut c = Checked {
            args: BTreeMap::new(),
            links: Vec::new(),
            ok: true,
        };
        for spec in &schema.inputs {
            let err_base =
                |input: &str| (id.to_string(), class_type.to_string(), input.to_string());
            let Some(v) = raw.inputs.get(spec.name) else {
                if spec.required {
                    let (node, class_type, input) = err_base(spec.name);
                    errors.push(WorkflowError::MissingInput {
                        node,
                        class_type,
                        input,
                    });
                    c.ok = false;
                } else if let Some(d) = default_of(&spec.kind) {
                    c.args.insert(spec.name.to_string(), d);
                }
                continue;
            };
            if let Some((target, index)) = as_link(v) {
                let (node, class_type, input) = err_base(spec.name);
                let Some(src) = nodes.get(target.as_str()) else {
                    errors.push(WorkflowError::DanglingLink {
                        node,
                        class_type,
                        input,
                        target,
                    });
                    c.ok = false;
                    continue;
                };
                if !matches!(spec.kind, InputKind::Link(_)) {
                    // ComfyUI lets a client convert a widget to an input; no NOVA node
                    // produces widget values yet, so refuse such a link up front.
                    errors.push(WorkflowError::InvalidValue {
                        node,
                        class_type,
                        input,
                        reason: format!(
                            "is a widget input and takes a literal value here, not a link \
                             to node {target}"
                        ),
                    });
                    c.ok = false;
                    continue;
                }
                let outs = &src.node.schema().outputs;
                let Some(idx) = index.as_i64() else {
                    errors.push(WorkflowError::InvalidValue {
                        node,
                        class_type,
                        input,
                        reason: format!(
                            "link to node {target} has output index {index}, not an integer"
                        ),
                    });
                    c.ok = false;
                    continue;
                };
                let Some(out) =
                    (idx >= 0 && (idx as usize) < outs.len()).then(|| &outs[idx as usize])
                else {
                    errors.push(WorkflowError::OutputIndexOutOfRange {
                        node,
                        class_type,
                        input,
                        from: target,
                        output: idx,
                        count: outs.len(),
                    });
                    c.ok = false;
                    continue;
                };
                let expected = spec.kind.data_type();
                let compatible = out.data_type == expected
                    || (expected == DataType::Combo && out.data_type == DataType::String);
                // IMAGE and VIDEO meet where image nodes run on video frames: decided once
                // every producer's effective type is known (after ordering).
                let video_image = matches!(
                    (&expected, &out.data_type),
                    (DataType::Image, DataType::Video) | (DataType::Video, DataType::Image)
                );
                if !compatible && !video_image {
                    errors.push(WorkflowError::TypeMismatch {
                        node,
                        class_type,
                        input,
                        expected: expected.to_string(),
                        from: target,
                        output: idx as usize,
                        found: out.data_type.to_string(),
                    });
                    c.ok = false;
                    continue;
                }
                c.links.push((spec.name, target, idx as usize));
                continue;
            }
            match literal(&spec.kind, v, env) {
                Ok(norm) => {
                    c.args.insert(spec.name.to_string(), norm);
                }
                Err(fault) => {
                    let (node, class_type, input) = err_base(spec.name);
                    errors.push(fault.into_error(node, class_type, input));
                    c.ok = false;
                }
            }
        }
        checked.insert(id, c);
    }

    // Pass 4: cycles among needed nodes (Kahn; what remains lies on or behind a cycle).
    // Linear in nodes and links: each link is looked at once when counted and once when its
    // source is ordered; ready nodes wait in a heap, lowest id first.
    let mut indeg: BTreeMap<&str, usize> = needed.iter().map(|id| (*id, 0)).collect();
    let mut users: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for id in &needed {
        for (_, t, _) in &checked[id].links {
            if let Some((target, _)) = indeg.get_key_value(t.as_str()) {
                users.entry(*target).or_default().push(id);
            }
        }
    }
    for list in users.values() {
        for u in list {
            *indeg.get_mut(u).expect("a user is needed") += 1;
        }
    }
    let mut order: Vec<&str> = Vec::new();
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<ById>> = needed
        .iter()
        .copied()
        .filter(|id| indeg[id] == 0)
        .map(|id| std::cmp::Reverse(ById(id)))
        .collect();
    while let Some(std::cmp::Reverse(ById(id))) = ready.pop() {
        order.push(id);
        for other in users.get(id).map(Vec::as_slice).unwrap_or(&[]) {
            let d = indeg.get_mut(other).expect("needed");
            *d -= 1;
            if *d == 0 {
                ready.push(std::cmp::Reverse(ById(other)));
            }
        }
    }
    if order.len() < needed.len() {
        let ordered: BTreeSet<&str> = order.iter().copied().collect();
        let left: BTreeSet<&str> = needed
            .iter()
            .copied()
            .filter(|id| !ordered.contains(id))
            .collect();
        errors.push(WorkflowError::Cycle {
            nodes: find_cycle(
                &left,
                &checked
                    .iter()
                    .map(|(k, c)| (*k, c.links.iter().map(|l| l.1.as_str()).collect()))
                    .collect(),
            ),
        });
    }

    // Pass 4b: effective types. A node whose IMAGE input carries a video runs per frame, and
    // its IMAGE outputs are videos; every other link must then agree exactly.
    let mut lifted: BTreeMap<&str, Vec<&'static str>> = BTreeMap::new();
    let mut streamed_batch: BTreeSet<&str> = BTreeSet::new();
    if errors.is_empty() {
        let mut video_out: BTreeMap<&str, bool> = BTreeMap::new();
        // Nodes that hand their video on through their IMAGE batch: every reader of the
        // batch, and of what reads it, runs per frame, down to nodes that take a video.
        let mut readers: BTreeMap<(&str, usize), Vec<(&str, &'static str)>> = BTreeMap::new();
        for id in &order {
            for (input, t, idx) in &checked[id].links {
                readers
                    .entry((t.as_str(), *idx))
                    .or_default()
                    .push((*id, *input));
            }
        }
        for id in &order {
            let Some(port) = nodes[id].node.batch_port() else {
                continue;
            };
            let mut frontier = vec![(*id, port)];
            let mut seen_end = false;
            let mut ok = true;
            while let Some(out) = frontier.pop() {
                let list = readers.get(&out).map(Vec::as_slice).unwrap_or(&[]);
                if list.is_empty() {
                    ok = false;
                }
                for (r, input) in list {
                    let node = &nodes[r].node;
                    let args = Args::new(checked[r].args.clone());
                    let images_in = checked[r]
                        .links
                        .iter()
                        .filter(|l| {
                            node.schema()
                                .inputs
                                .iter()
                                .any(|s| s.name == l.0 && s.kind.data_type() == DataType::Image)
                        })
                        .count();
                    if node.takes_video(input) {
                        seen_end = true;
                    } else if images_in == 1
                        && crate::node::liftable(node.as_ref(), &args).is_some()
                    {
                        for o in 0..node.schema().outputs.len() {
                            frontier.push((r, o));
                        }
                    } else {
                        ok = false;
                    }
                }
            }
            if ok && seen_end {
                streamed_batch.insert(id);
                video_out.insert(id, true);
            }
        }
        for id in &order {
            let raw = &nodes[id];
            let schema = raw.node.schema();
            let c = &checked[id];
            let effective = |t: &str, idx: usize| -> Option<DataType> {
                let out = nodes
                    .get(t)?
                    .node
                    .schema()
                    .outputs
                    .get(idx)?
                    .data_type
                    .clone();
                Some(
                    if out == DataType::Image && video_out.get(t).copied().unwrap_or(false) {
                        DataType::Video
                    } else {
                        out
                    },
                )
            };
            let mut mine = Vec::new();
            for (input, t, idx) in &c.links {
                let Some(spec) = schema.inputs.iter().find(|s| s.name == *input) else {
                    continue;
                };
                let expected = spec.kind.data_type();
                let Some(found) = effective(t, *idx) else {
                    continue;
                };
                let ok = found == expected
                    || (expected == DataType::Combo && found == DataType::String)
                    || (expected == DataType::Image
                        && found == DataType::Video
                        && raw.node.takes_video(input));
                if ok {
                    continue;
                }
                let args = Args::new(c.args.clone());
                if expected == DataType::Image
                    && found == DataType::Video
                    && mine.is_empty()
                    && crate::node::liftable(raw.node.as_ref(), &args).is_some()
                {
                    mine.push(*input);
                    continue;
                }
                errors.push(WorkflowError::TypeMismatch {
                    node: id.to_string(),
                    class_type: schema.class_type.to_string(),
                    input: input.to_string(),
                    expected: expected.to_string(),
                    from: t.clone(),
                    output: *idx,
                    found: found.to_string(),
                });
            }
            if !streamed_batch.contains(id) {
                video_out.insert(id, !mine.is_empty());
            }
            if !mine.is_empty() {
                lifted.insert(id, mine);
            }
        }
    }

    // Pass 5: checks that need the environment, only for structurally sound nodes.
    if errors.is_empty() {
        for id in &order {
            let raw = &nodes[id];
            let c = &checked[id];
            if !c.ok {
                continue;
            }
            if let Err(e) = raw.node.check(&Args::new(c.args.clone()), env) {
                errors.push(WorkflowError::NodeCheck {
                    node: id.to_string(),
                    class_type: raw.node.schema().class_type.to_string(),
                    reason: e.to_string(),
                });
            }
        }
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }

    let position: BTreeMap<&str, usize> =
        order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let nodes_out: Vec<WorkflowNode> = order
        .iter()
        .map(|id| {
            let raw = &nodes[id];
            let c = checked.remove(id).expect("checked every needed node");
            WorkflowNode {
                id: NodeId(id.to_string()),
                class_type: raw.node.schema().class_type,
                node: raw.node.clone(),
                args: Args::new(c.args),
                links: c
                    .links
                    .into_iter()
                    .map(|(input, t, output)| Link {
                        input,
                        from: position[t.as_str()],
                        output,
                    })
                    .collect(),
                lifted: lifted.remove(id).unwrap_or_default(),
                streamed_batch: streamed_batch.contains(id),
            }
        })
        .collect();
    let consumers = consumer_lists(&nodes_out);
    Ok(ValidatedWorkflow {
        nodes: nodes_out,
        prompt: Arc::new(json.clone()),
        consumers,
    })
}

/// Finds one cycle among `left` (nodes Kahn could not order) and names its nodes in order.
fn find_cycle(left: &BTreeSet<&str>, deps: &BTreeMap<&str, Vec<&str>>) -> Vec<String> {
    // Walk dependencies from any remaining node; in a finite set the walk must revisit a node.
    let Some(start) = left.iter().min_by(|a, b| id_order(a, b)) else {
        return Vec::new();
    };
    let mut path: Vec<&str> = vec![start];
    loop {
        let cur = *path.last().expect("path starts non-empty");
        let next = deps.get(cur).and_then(|d| {
            d.iter()
                .copied()
                .filter(|t| left.contains(t))
                .min_by(|a, b| id_order(a, b))
        });
        let Some(next) = next else {
            return path.iter().map(|s| s.to_string()).collect();
        };
        if let Some(pos) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[pos..].iter().rev().map(|s| s.to_string()).collect();
            cycle.push(cycle[0].clone());
            return cycle;
        }
        path.push(next);
    }
}

/// The schema default of a widget input.
fn default_of(kind: &InputKind) -> Option<Json> {
    match kind {
        InputKind::Int { default, .. } => Some(Json::from(*default)),
        InputKind::Float { default, .. } => Some(Json::from(*default)),
        InputKind::String { default, .. } => Some(Json::from(default.clone())),
        InputKind::Boolean { default } => Some(Json::from(*default)),
        InputKind::Combo { default, .. } => Some(Json::from(default.clone())),
        InputKind::File { .. } | InputKind::Link(_) => None,
    }
}

enum Fault {
    Invalid(String),
    Range {
        value: String,
        min: String,
        max: String,
    },
    MissingFile {
        file: String,
        folder: String,
    },
}

impl Fault {
    fn into_error(self, node: String, class_type: String, input: String) -> WorkflowError {
        match self {
            Fault::Invalid(reason) => WorkflowError::InvalidValue {
                node,
                class_type,
                input,
                reason,
            },
            Fault::Range { value, min, max } => WorkflowError::OutOfRange {
                node,
                class_type,
                input,
                value,
                min,
                max,
            },
            Fault::MissingFile { file, folder } => WorkflowError::MissingFile {
                node,
                class_type,
                input,
                file,
                folder,
            },
        }
    }
}

/// Checks and normalizes a literal input value. Numbers written as strings are accepted, as
/// ComfyUI converts them.
fn literal(kind: &InputKind, v: &Json, env: &JobEnv) -> Result<Json, Fault> {
    let number = |v: &Json| -> Option<f64> {
        match v {
            Json::Number(n) => n.as_f64(),
            Json::String(s) => s.trim().parse::<f64>().ok(),
            Json::Bool(b) => Some(*b as i64 as f64),
            _ => None,
        }
    };
    match kind {
        InputKind::Link(t) => Err(Fault::Invalid(format!(
            "expects a link to a {t} output (\"[node_id, output_index]\"), got {v}"
        ))),
        InputKind::Int { min, max, .. } => {
            let n = number(v).ok_or_else(|| Fault::Invalid(format!("expects an INT, got {v}")))?;
            if n.fract() != 0.0 || !n.is_finite() {
                return Err(Fault::Invalid(format!("expects an INT, got {v}")));
            }
            let i = n as i64;
            if i < *min || i > *max {
                return Err(Fault::Range {
                    value: i.to_string(),
                    min: min.to_string(),
                    max: max.to_string(),
                });
            }
            Ok(Json::from(i))
        }
        InputKind::Float { min, max, .. } => {
            let n = number(v).ok_or_else(|| Fault::Invalid(format!("expects a FLOAT, got {v}")))?;
            if !n.is_finite() {
                return Err(Fault::Invalid(format!("expects a finite FLOAT, got {v}")));
            }
            if n < *min || n > *max {
                return Err(Fault::Range {
                    value: n.to_string(),
                    min: min.to_string(),
                    max: max.to_string(),
                });
            }
            Ok(Json::from(n))
        }
        InputKind::Boolean { .. } => match v {
            Json::Bool(b) => Ok(Json::from(*b)),
            _ => Err(Fault::Invalid(format!("expects a BOOLEAN, got {v}"))),
        },
        InputKind::String { .. } => match v {
            Json::String(s) => Ok(Json::from(s.clone())),
            Json::Number(n) => Ok(Json::from(n.to_string())),
            _ => Err(Fault::Invalid(format!("expects a STRING, got {v}"))),
        },
        InputKind::Combo { options, .. } => {
            let s = v
                .as_str()
                .ok_or_else(|| Fault::Invalid(format!("expects one of {options:?}, got {v}")))?;
            if options.iter().any(|o| o == s) {
                Ok(Json::from(s))
            } else {
                Err(Fault::Invalid(format!("'{s}' is not one of {options:?}")))
            }
        }
        InputKind::File { folder, .. } => {
            let s = v
                .as_str()
                .ok_or_else(|| Fault::Invalid(format!("expects a file name, got {v}")))?;
            // Some ComfyUI clients annotate a file with its folder: "name.png [input]".
            // Only the input folder is read from, so only that annotation is accepted.
            let name = s.strip_suffix(" [input]").unwrap_or(s);
            match folder {
                FileFolder::Input => {
                    let base = &env.input_dir;
                    let path = JobEnv::resolve_in(base, name).map_err(Fault::Invalid)?;
                    if !path.is_file() {
                        return Err(Fault::MissingFile {
                            file: name.to_string(),
                            folder: format!("the input folder ({})", base.display()),
                        });
                    }
                }
                FileFolder::Models(sub) => {
                    if env.find_model(sub, name).map_err(Fault::Invalid)?.is_none() {
                        return Err(Fault::MissingFile {
                            file: name.to_string(),
                            folder: format!(
                                "the models folder's {sub}/ ({})",
                                env.model_dirs_text(sub)
                            ),
                        });
                    }
                }
            }
            Ok(Json::from(name))
        }
    }
}
