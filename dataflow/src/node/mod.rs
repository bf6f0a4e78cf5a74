//! The node interface (ABI) and the registry of node types.
//!
//! A node type is a value implementing [`Node`]: its schema (types and constraints), its
//! metadata (modes, memory), shape inference for the planner, and its kernel. Operators live in
//! `nova-operators`, one node per file; the engine never names a node type.
//!
//! Invariant: by the time [`Node::execute`] runs, every widget input in [`Args`] exists with
//! the declared type and range and every linked input holds a value of the declared type —
//! validation guarantees it — so kernels only fail for reasons of the data itself.

pub mod chunk;
pub mod error;
pub mod memory;
pub mod model_paths;
pub mod output;
pub mod residency;
pub mod schema;
pub mod stream;
pub mod value;

use crate::node::chunk::ChunkedOp;
use crate::node::schema::{MemoryEstimate, MemoryQuery, NodeMeta, NodeSchema};
use crate::node::value::{DataType, Value, ValueInfo};
use candle_core::Device;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

/// A node's id within a workflow (the key in ComfyUI's API format).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a node could not do its work. The engine adds the node id and type.
#[derive(Clone, Debug, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum NodeError {
    #[error("input '{input}': {reason}")]
    Input { input: String, reason: String },
    #[error("file '{path}': {reason}")]
    File { path: String, reason: String },
    #[error("tensor operation failed: {0}")]
    Tensor(String),
    /// The device budget could not hold what the node needed, even at the smallest tile.
    #[error("{0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Other(String),
}

impl NodeError {
    /// An error about a named input.
    pub fn input(input: &str, reason: impl Into<String>) -> NodeError {
        NodeError::Input {
            input: input.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<candle_core::Error> for NodeError {
    fn from(e: candle_core::Error) -> Self {
        // Only the message: candle appends a backtrace when RUST_BACKTRACE is set.
        let text = e.to_string();
        NodeError::Tensor(text.lines().next().unwrap_or_default().to_string())
    }
}

/// The widget (literal) inputs of one node, complete with schema defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Args {
    values: BTreeMap<String, Json>,
}

impl Args {
    /// Builds args from literal values (validation fills in defaults).
    pub fn new(values: BTreeMap<String, Json>) -> Args {
        Args { values }
    }

    /// The raw literal, if present.
    pub fn raw(&self, name: &str) -> Option<&Json> {
        self.values.get(name)
    }

    fn missing(name: &str, what: &str) -> NodeError {
        NodeError::input(name, format!("expected {what}"))
    }

    /// An integer input.
    pub fn int(&self, name: &str) -> Result<i64, NodeError> {
        self.raw(name)
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
            .ok_or_else(|| Self::missing(name, "an integer"))
    }

    /// A float input.
    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        self.raw(name)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| Self::missing(name, "a number"))
    }

    /// A string (or combo choice) input.
    pub fn string(&self, name: &str) -> Result<&str, NodeError> {
        self.raw(name)
            .and_then(|v| v.as_str())
            .ok_or_else(|| Self::missing(name, "a string"))
    }

    /// A boolean input.
    pub fn boolean(&self, name: &str) -> Result<bool, NodeError> {
        self.raw(name)
            .and_then(|v| v.as_bool())
            .ok_or_else(|| Self::missing(name, "a boolean"))
    }

    /// All literals, for hashing and display.
    pub fn values(&self) -> &BTreeMap<String, Json> {
        &self.values
    }
}

/// Values of the linked inputs of one node, by input name.
#[derive(Clone, Debug, Default)]
pub struct Inputs<T> {
    map: BTreeMap<String, T>,
}

impl<T> Inputs<T> {
    /// Empty inputs.
    pub fn new() -> Self {
        Inputs {
            map: BTreeMap::new(),
        }
    }

    /// Sets an input.
    pub fn insert(&mut self, name: impl Into<String>, value: T) {
        self.map.insert(name.into(), value);
    }

    /// An input, if linked.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.map.get(name)
    }

    /// A required input; an error naming it if absent.
    pub fn require(&self, name: &str) -> Result<&T, NodeError> {
        self.get(name)
            .ok_or_else(|| NodeError::input(name, "required input is not connected"))
    }

    /// Removes and returns an input.
    pub fn take(&mut self, name: &str) -> Option<T> {
        self.map.remove(name)
    }

    /// Every input, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of linked inputs present.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no input is present.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Inputs<Value> {
    /// A required image input.
    pub fn image(&self, name: &str) -> Result<&candle_core::Tensor, NodeError> {
        self.require(name)?
            .as_image()
            .ok_or_else(|| NodeError::input(name, "expected an IMAGE"))
    }

    /// A latent input's tensor.
    pub fn latent(&self, name: &str) -> Result<&candle_core::Tensor, NodeError> {
        self.require(name)?
            .as_latent()
            .ok_or_else(|| NodeError::input(name, "expected a LATENT"))
    }

    /// A model input of `kind`.
    pub fn model(
        &self,
        name: &str,
        kind: DataType,
    ) -> Result<&crate::node::value::ModelRef, NodeError> {
        match self.require(name)? {
            Value::Model(m) if m.kind == kind => Ok(m),
            other => Err(NodeError::input(
                name,
                format!("expected a {kind}, got {}", other.data_type()),
            )),
        }
    }
}

/// Folders and settings a job runs with.
#[derive(Clone, Debug)]
pub struct JobEnv {
    /// Where `LoadImage` and other file inputs look.
    pub input_dir: PathBuf,
    /// Where `SaveImage` writes.
    pub output_dir: PathBuf,
    /// Where `PreviewImage` writes.
    pub temp_dir: PathBuf,
    /// Model files, laid out as ComfyUI's `models/` (`upscale_models/`, ...).
    pub models_dir: PathBuf,
    /// How iterative nodes (samplers) preview their state after each step.
    pub preview: PreviewMethod,
    /// Extra model folders by kind, searched after `models_dir` (ComfyUI's
    /// `extra_model_paths.yaml`).
    pub extra_models: Arc<crate::node::model_paths::ModelPaths>,
}

/// How a sampler previews its latent after each step (ComfyUI's `--preview-method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewMethod {
    /// TAESD when its decoder is in `models/vae_approx/` and the time budget allows, else
    /// the linear latent-to-RGB projection.
    #[default]
    Auto,
    /// Always the linear latent-to-RGB projection (cheapest).
    Latent2rgb,
    /// TAESD every step, whatever it costs (the projection when no decoder is present).
    Taesd,
    /// No previews.
    None,
}

impl std::str::FromStr for PreviewMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PreviewMethod::Auto),
            "latent2rgb" => Ok(PreviewMethod::Latent2rgb),
            "taesd" => Ok(PreviewMethod::Taesd),
            "none" => Ok(PreviewMethod::None),
            other => Err(format!(
                "unknown preview method '{other}' (one of auto, latent2rgb, taesd, none)"
            )),
        }
    }
}

impl JobEnv {
    /// An environment with the three folders.
    pub fn new(
        input_dir: impl Into<PathBuf>,
        output_dir: impl Into<PathBuf>,
        temp_dir: impl Into<PathBuf>,
    ) -> JobEnv {
        JobEnv {
            input_dir: input_dir.into(),
            output_dir: output_dir.into(),
            temp_dir: temp_dir.into(),
            models_dir: PathBuf::from("models"),
            preview: PreviewMethod::Auto,
            extra_models: Arc::new(crate::node::model_paths::ModelPaths::none()),
        }
    }

    /// The same environment with extra model folders.
    pub fn with_extra_models(mut self, paths: crate::node::model_paths::ModelPaths) -> JobEnv {
        self.extra_models = Arc::new(paths);
        self
    }

    /// The folders models of `kind` (`checkpoints`, `vae_approx`, ...) are looked for in,
    /// in order: the models folder's, then the extra ones.
    pub fn model_dirs(&self, kind: &str) -> Vec<PathBuf> {
        std::iter::once(self.models_dir.join(kind))
            .chain(self.extra_models.extra(kind).iter().cloned())
            .collect()
    }

    /// The model file `name` of `kind` from the first of [`Self::model_dirs`] that has it, or
    /// `None`. A name that would leave its folder is refused.
    pub fn find_model(&self, kind: &str, name: &str) -> Result<Option<PathBuf>, String> {
        for dir in self.model_dirs(kind) {
            let path = Self::resolve_in(&dir, name)?;
            if path.is_file() {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }

    /// [`Self::find_model`], with a missing file an error that names every folder searched.
    pub fn require_model(&self, kind: &str, name: &str) -> Result<PathBuf, String> {
        self.find_model(kind, name)?
            .ok_or_else(|| format!("no '{name}' in {}", self.model_dirs_text(kind)))
    }

    /// The folders of a model kind, for messages.
    pub fn model_dirs_text(&self, kind: &str) -> String {
        let dirs: Vec<String> = self
            .model_dirs(kind)
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        dirs.join(", ")
    }

    /// The same environment with another preview method.
    pub fn with_preview(mut self, preview: PreviewMethod) -> JobEnv {
        self.preview = preview;
        self
    }

    /// The same environment with models from `dir`.
    pub fn with_models_dir(mut self, dir: impl Into<PathBuf>) -> JobEnv {
        self.models_dir = dir.into();
        self
    }

    /// Resolves a file name given in a workflow against `base`, refusing anything that would
    /// escape it (absolute paths, `..`, or symbolic links pointing outside).
    pub fn resolve_in(base: &std::path::Path, name: &str) -> Result<PathBuf, String> {
        let rel = std::path::Path::new(name);
        if name.is_empty() {
            return Err("empty file name".into());
        }
        for c in rel.components() {
            match c {
                std::path::Component::Normal(_) => {}
                _ => {
                    return Err(format!(
                        "'{name}' must be a plain relative path inside the folder"
                    ))
                }
            }
        }
        let path = base.join(rel);
        if let (Ok(real), Ok(real_base)) = (path.canonicalize(), base.canonicalize()) {
            if !real.starts_with(&real_base) {
                return Err(format!("'{name}' points outside the folder"));
            }
        }
        Ok(path)
    }
}

/// What a running node sees besides its inputs.
#[derive(Clone, Debug)]
pub struct ExecContext {
    pub env: JobEnv,
    /// The device tensors are created on.
    pub device: Device,
    /// The workflow as submitted, embedded into saved images as ComfyUI does.
    pub prompt: Option<Arc<Json>>,
    /// The node being run.
    pub node_id: NodeId,
    /// Where the node puts model weights: the registry, the run's accountant, and the plan's
    /// residency decision for this node.
    pub weights: crate::node::residency::WeightContext,
}

impl ExecContext {
    /// A context for running a node outside a job (library use, tests): the CPU device, no
    /// prompt, weights kept resident and counted by an unlimited accountant.
    pub fn standalone(env: JobEnv, node_id: &str) -> ExecContext {
        ExecContext {
            env,
            device: Device::Cpu,
            prompt: None,
            node_id: NodeId(node_id.to_string()),
            weights: crate::node::residency::WeightContext::resident(
                crate::node::memory::Accountant::unlimited(),
            ),
        }
    }
}

/// What a node produced: one value per declared output, and for output nodes a UI record
/// (ComfyUI's `{"images": [{"filename", "subfolder", "type"}]}`).
#[derive(Clone, Debug, Default)]
pub struct NodeOutput {
    pub values: Vec<Value>,
    pub ui: Option<Json>,
}

/// How a node runs chunk by chunk: which input is cut and the operator that does it.
#[derive(Clone)]
pub struct Chunking {
    pub input: &'static str,
    pub op: Arc<dyn ChunkedOp>,
    /// The largest tile side the node asks for (e.g. `VAEDecodeTiled`'s `tile_size`); the
    /// planner goes no larger.
    pub max_tile: Option<usize>,
}

/// How an output node takes its input piece by piece: which input, and the sink.
#[derive(Clone)]
pub struct Sinking {
    pub input: &'static str,
    pub op: Arc<dyn crate::node::chunk::SinkOp>,
}

/// A preview of an iterative node's state after one step: an image (`[1, h, w, 3]`, host
/// memory) and how it was made (`taesd`, `latent2rgb`).
#[derive(Clone, Debug)]
pub struct StepPreview {
    pub image: Value,
    pub method: &'static str,
}

/// An iterative node in progress (a sampler): the engine calls [`Stepper::step`] once per
/// planned step, each at its own dataflow time, then [`Stepper::finish`].
pub trait Stepper: Send {
    /// Runs the next step; returns a preview of the state it reached, if the node made one.
    fn step(&mut self) -> Result<Option<StepPreview>, NodeError>;
    /// The node's outputs once every step ran.
    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError>;
}

/// A node type. See the module docs.
pub trait Node: Send + Sync + 'static {
    /// Types, names and constraints of inputs and outputs.
    fn schema(&self) -> &NodeSchema;

    /// Execution metadata; conservative defaults unless the node declares more.
    fn meta(&self) -> NodeMeta {
        NodeMeta::default()
    }

    /// Checks that need the environment (a file exists and decodes); runs during validation.
    fn check(&self, _args: &Args, _env: &JobEnv) -> Result<(), NodeError> {
        Ok(())
    }

    /// Output shapes from input shapes, for planning. Defaults to unknown shapes.
    fn infer(
        &self,
        _args: &Args,
        _inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        Ok(self
            .schema()
            .outputs
            .iter()
            .map(|_| ValueInfo::Unknown)
            .collect())
    }

    /// Device memory for one atomic run; defaults to whole inputs and outputs plus workspace.
    fn memory(&self, _args: &Args, query: &MemoryQuery) -> MemoryEstimate {
        query.whole(&self.meta())
    }

    /// The chunked form of this node for these args and input shapes, if it has one.
    fn chunked(
        &self,
        _args: &Args,
        _inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Option<Chunking> {
        None
    }

    /// For output nodes that can take their input piece by piece as it becomes final: the
    /// input and the sink ([`crate::node::chunk::SinkOp`]). The planner uses it when the node's input
    /// comes from a tiled region and nothing else reads it, so the whole input never exists.
    fn sink(&self, _args: &Args, _inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Sinking> {
        None
    }

    /// For nodes whose first output can be read piece by piece (see
    /// [`crate::node::chunk::SourceOp`]): the source. The planner uses it when that output's only
    /// reader is the first stage of a pipeline region, so the output never exists whole (a
    /// large input image is decoded band by band as its tiles are cut).
    fn source(&self, _args: &Args, _env: &JobEnv) -> Option<Arc<dyn crate::node::chunk::SourceOp>> {
        None
    }

    /// For a node that splits a video into an `IMAGE` batch and other values
    /// (`GetVideoComponents`): the output port of the batch, when the node can hand the video
    /// itself through that port instead of decoding it ([`Node::infer_streamed`],
    /// [`Node::execute_streamed`]). Validation has it do so when every reader of the batch runs
    /// per frame ([`crate::control::lift`]) and the chain ends in a node that takes a video on its
    /// `IMAGE` input ([`Node::takes_video`], `CreateVideo`): the frames are then decoded
    /// window by window by whatever consumes the video, in bounded memory, instead of as one
    /// batch of the whole clip.
    fn batch_port(&self) -> Option<usize> {
        None
    }

    /// Output shapes when the batch is handed on as the video (see [`Node::batch_port`]).
    fn infer_streamed(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        self.infer(args, inputs, env)
    }

    /// The outputs with the batch handed on as the video (see [`Node::batch_port`]).
    fn execute_streamed(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        self.execute(args, inputs, ctx)
    }

    /// Whether the node takes a video on its `IMAGE` input `input` (its frames, as
    /// `CreateVideo` takes a batch of images).
    fn takes_video(&self, _input: &str) -> bool {
        false
    }

    /// For iterative nodes: how many steps these args ask for (0: the node runs whole
    /// through [`Node::execute`]). Each step becomes its own dataflow time, so its completion
    /// is observable as progress.
    fn steps(&self, _args: &Args) -> u32 {
        0
    }

    /// How the node relates frames when its `IMAGE` input is a video (see [`crate::control::lift`]):
    /// by default each frame on its own. `None`: the node cannot run on video frames.
    fn temporal(&self, _args: &Args) -> Option<crate::node::stream::Temporal> {
        Some(crate::node::stream::Temporal::PER_FRAME)
    }

    /// Starts an iterative node on its inputs; called only when [`Node::steps`] is positive.
    fn start(
        &self,
        _args: &Args,
        _inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<Box<dyn Stepper>, NodeError> {
        Err(NodeError::Other(
            "this node does not run step by step".into(),
        ))
    }

    /// Runs the node on whole values.
    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError>;
}

/// The node types a workflow may use, by `class_type`.
#[derive(Clone, Default)]
pub struct NodeRegistry {
    nodes: BTreeMap<&'static str, Arc<dyn Node>>,
}

impl NodeRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node type, replacing one of the same name.
    pub fn register(&mut self, node: impl Node) {
        let name = node.schema().class_type;
        self.nodes.insert(name, Arc::new(node));
    }

    /// The node type for a `class_type`.
    pub fn get(&self, class_type: &str) -> Option<&Arc<dyn Node>> {
        self.nodes.get(class_type)
    }

    /// All registered `class_type`s, sorted.
    pub fn class_types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.nodes.keys().copied()
    }

    /// ComfyUI's `/object_info` answer for every registered node.
    pub fn object_info(&self) -> Json {
        let map: serde_json::Map<String, Json> = self
            .nodes
            .iter()
            .map(|(k, n)| (k.to_string(), n.schema().object_info(&n.meta())))
            .collect();
        Json::Object(map)
    }
}

/// Whether a node type can run per frame of a video ([`crate::lift`]): it is not an output
/// node and every output is an `IMAGE`, and it says how it relates frames
/// ([`Node::temporal`]).
pub fn liftable(node: &dyn Node, args: &Args) -> Option<crate::node::stream::Temporal> {
    let s = node.schema();
    let all_images =
        !s.outputs.is_empty() && s.outputs.iter().all(|o| o.data_type == DataType::Image);
    (all_images && !s.output_node)
        .then(|| node.temporal(args))
        .flatten()
}

/// Runs node code, turning a panic into a [`NodeError`] so that a bug in one node fails its
/// job with a message instead of taking down the process. Used for every call into a node,
/// at plan time and at run time.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, NodeError>) -> Result<T, NodeError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(NodeError::Other(format!("internal error in node: {msg}")))
        }
    }
}
