//! Building workflows in Rust: nodes by their class and typed inputs, links by handle, no
//! JSON to write. A [`Pipeline`] becomes ComfyUI's API format ([`Pipeline::to_api`]), the form
//! every job is validated from, so a pipeline built here runs exactly as the same workflow
//! sent by a client.
//!
//! ```
//! use nova_dataflow::Pipeline;
//! let mut p = Pipeline::new();
//! let image = p.add("LoadImage").with("image", "card.png").done();
//! let blurred = p
//!     .add("ImageBlur")
//!     .link("image", &image.out(0))
//!     .with("blur_radius", 3)
//!     .with("sigma", 1.0)
//!     .done();
//! p.add("SaveImage")
//!     .link("images", &blurred.out(0))
//!     .with("filename_prefix", "blurred")
//!     .done();
//! let api = p.to_api();
//! assert_eq!(api["2"]["inputs"]["image"], serde_json::json!(["1", 0]));
//! assert_eq!(api["2"]["inputs"]["blur_radius"], 3);
//! ```

use crate::control::workflow::ValidatedWorkflow;
use crate::node::error::ValidationErrors;
use crate::node::{JobEnv, NodeRegistry};
use serde_json::{Map, Value as Json};

/// A literal input value.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

impl From<i64> for Literal {
    fn from(v: i64) -> Self {
        Literal::Int(v)
    }
}
impl From<i32> for Literal {
    fn from(v: i32) -> Self {
        Literal::Int(v as i64)
    }
}
impl From<u32> for Literal {
    fn from(v: u32) -> Self {
        Literal::Int(v as i64)
    }
}
impl From<usize> for Literal {
    fn from(v: usize) -> Self {
        Literal::Int(v as i64)
    }
}
impl From<f64> for Literal {
    fn from(v: f64) -> Self {
        Literal::Float(v)
    }
}
impl From<f32> for Literal {
    fn from(v: f32) -> Self {
        Literal::Float(v as f64)
    }
}
impl From<&str> for Literal {
    fn from(v: &str) -> Self {
        Literal::Text(v.to_string())
    }
}
impl From<String> for Literal {
    fn from(v: String) -> Self {
        Literal::Text(v)
    }
}
impl From<bool> for Literal {
    fn from(v: bool) -> Self {
        Literal::Bool(v)
    }
}

impl Literal {
    fn json(&self) -> Json {
        match self {
            Literal::Int(v) => Json::from(*v),
            Literal::Float(v) => Json::from(*v),
            Literal::Text(v) => Json::from(v.clone()),
            Literal::Bool(v) => Json::from(*v),
        }
    }
}

/// An output of a node of a [`Pipeline`]: what a link points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    node: String,
    port: usize,
}

/// A node added to a [`Pipeline`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    id: String,
}

impl Handle {
    /// The node's output `port` (0-based, in the node's declared order).
    pub fn out(&self, port: usize) -> Output {
        Output {
            node: self.id.clone(),
            port,
        }
    }

    /// The node's id in the workflow (and in events).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A workflow under construction. Node ids are given in order ("1", "2", ...) unless a node
/// names its own.
#[derive(Clone, Debug, Default)]
pub struct Pipeline {
    nodes: Map<String, Json>,
    next: u64,
}

/// A node being added: set its inputs, then [`NodeBuilder::done`].
pub struct NodeBuilder<'a> {
    pipeline: &'a mut Pipeline,
    id: Option<String>,
    class_type: String,
    inputs: Map<String, Json>,
}

impl NodeBuilder<'_> {
    /// Sets widget input `name` to a literal.
    pub fn with(mut self, name: &str, value: impl Into<Literal>) -> Self {
        self.inputs.insert(name.to_string(), value.into().json());
        self
    }

    /// Links input `name` to another node's output.
    pub fn link(mut self, name: &str, from: &Output) -> Self {
        self.inputs.insert(
            name.to_string(),
            Json::Array(vec![Json::from(from.node.clone()), Json::from(from.port)]),
        );
        self
    }

    /// Gives the node its own id instead of the next number.
    pub fn named(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }

    /// Adds the node; its handle names its outputs.
    pub fn done(self) -> Handle {
        let id = match self.id {
            Some(id) => id,
            None => loop {
                self.pipeline.next += 1;
                let id = self.pipeline.next.to_string();
                if !self.pipeline.nodes.contains_key(&id) {
                    break id;
                }
            },
        };
        let mut node = Map::new();
        node.insert("class_type".into(), Json::from(self.class_type));
        node.insert("inputs".into(), Json::Object(self.inputs));
        self.pipeline.nodes.insert(id.clone(), Json::Object(node));
        Handle { id }
    }
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Starts a node of `class_type` (ComfyUI's name, e.g. `"ImageBlur"`).
    pub fn add(&mut self, class_type: &str) -> NodeBuilder<'_> {
        NodeBuilder {
            pipeline: self,
            id: None,
            class_type: class_type.to_string(),
            inputs: Map::new(),
        }
    }

    /// The workflow in ComfyUI's API format.
    pub fn to_api(&self) -> Json {
        Json::Object(self.nodes.clone())
    }

    /// Validates the pipeline against the node types of `registry` (every fault, each naming
    /// its node and input).
    pub fn validate(
        &self,
        registry: &NodeRegistry,
        env: &JobEnv,
    ) -> Result<ValidatedWorkflow, ValidationErrors> {
        crate::control::workflow::validate(self.to_api(), registry, env)
    }
}
