//! Typed errors of workflow parsing and validation. Each names the node, the input and the
//! reason, so a user (or a ComfyUI client, through `node_errors`) can find the fault.

use serde::Serialize;
use std::fmt;

/// One fault found in a workflow before any work runs.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkflowError {
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("a workflow must be a JSON object mapping node ids to nodes")]
    NotAnObject,
    #[error("node {node}: {reason}")]
    MalformedNode { node: String, reason: String },
    #[error("node {node}: unknown node type '{class_type}'")]
    UnknownNodeType { node: String, class_type: String },
    #[error("node {node} ({class_type}): missing required input '{input}'")]
    MissingInput {
        node: String,
        class_type: String,
        input: String,
    },
    #[error("node {node} ({class_type}): input '{input}' links to node '{target}', which does not exist")]
    DanglingLink {
        node: String,
        class_type: String,
        input: String,
        target: String,
    },
    #[error("node {node} ({class_type}): input '{input}' expects {expected}, but output {output} of node {from} is {found}")]
    TypeMismatch {
        node: String,
        class_type: String,
        input: String,
        expected: String,
        from: String,
        output: usize,
        found: String,
    },
    #[error("node {node} ({class_type}): input '{input}' links to output {output} of node {from}, which has {count} output(s)")]
    OutputIndexOutOfRange {
        node: String,
        class_type: String,
        input: String,
        from: String,
        output: i64,
        count: usize,
    },
    #[error("node {node} ({class_type}): input '{input}' is {value}, outside [{min}, {max}]")]
    OutOfRange {
        node: String,
        class_type: String,
        input: String,
        value: String,
        min: String,
        max: String,
    },
    #[error("node {node} ({class_type}): input '{input}': {reason}")]
    InvalidValue {
        node: String,
        class_type: String,
        input: String,
        reason: String,
    },
    #[error("cycle through nodes {}", nodes.join(" -> "))]
    Cycle { nodes: Vec<String> },
    #[error("node {node} ({class_type}): input '{input}': file '{file}' not found in {folder}")]
    MissingFile {
        node: String,
        class_type: String,
        input: String,
        file: String,
        folder: String,
    },
    #[error("node {node} ({class_type}): {reason}")]
    NodeCheck {
        node: String,
        class_type: String,
        reason: String,
    },
    #[error("the workflow has no output node (such as SaveImage or PreviewImage)")]
    NoOutputs,
}

impl WorkflowError {
    /// The node the error is about, if any.
    pub fn node(&self) -> Option<&str> {
        use WorkflowError::*;
        match self {
            MalformedNode { node, .. }
            | UnknownNodeType { node, .. }
            | MissingInput { node, .. }
            | DanglingLink { node, .. }
            | TypeMismatch { node, .. }
            | OutputIndexOutOfRange { node, .. }
            | OutOfRange { node, .. }
            | InvalidValue { node, .. }
            | MissingFile { node, .. }
            | NodeCheck { node, .. } => Some(node),
            Cycle { nodes } => nodes.first().map(|s| s.as_str()),
            Json { .. } | NotAnObject | NoOutputs => None,
        }
    }

    /// The input the error is about, if any.
    pub fn input(&self) -> Option<&str> {
        use WorkflowError::*;
        match self {
            MissingInput { input, .. }
            | DanglingLink { input, .. }
            | TypeMismatch { input, .. }
            | OutputIndexOutOfRange { input, .. }
            | OutOfRange { input, .. }
            | InvalidValue { input, .. }
            | MissingFile { input, .. } => Some(input),
            _ => None,
        }
    }
}

/// Every fault found in one workflow; never empty.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValidationErrors(pub Vec<WorkflowError>);

impl ValidationErrors {
    /// The faults.
    pub fn errors(&self) -> &[WorkflowError] {
        &self.0
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid workflow: {one}"),
            many => {
                write!(f, "invalid workflow ({} errors):", many.len())?;
                for e in many {
                    write!(f, "\n  - {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ValidationErrors {}

impl From<WorkflowError> for ValidationErrors {
    fn from(e: WorkflowError) -> Self {
        ValidationErrors(vec![e])
    }
}
