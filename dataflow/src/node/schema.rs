//! The node interface's declarative half: typed input/output schemas (enough to answer ComfyUI's
//! `/object_info`) and execution metadata the planner reads (modes, memory, quantization,
//! checkpointing, warm-up).
//!
//! Invariant: a node that declares no metadata gets [`NodeMeta::default`] — atomic execution
//! and a whole-input memory estimate — so the planner never has to guess optimistically.

use crate::node::value::{DataType, ValueInfo};
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

/// How a node's work can be cut up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecMode {
    /// The whole input at once.
    Atomic,
    /// Spatial tiles with halos (images, latents).
    Tiled,
    /// Sequential windows or chunks (video frames, audio samples).
    Streamed,
    /// Slices of the batch dimension.
    Microbatch,
}

/// What a node declares about itself beyond its types.
#[derive(Clone, Debug, Serialize)]
pub struct NodeMeta {
    /// Supported execution modes, most preferred first. Never empty.
    pub modes: Vec<ExecMode>,
    /// Whether the node's weights may be quantized by a profile that allows it.
    pub quantizable: bool,
    /// Whether the node has state that can be checkpointed and resumed (e.g. sampler steps).
    pub checkpointable: bool,
    /// A key identifying compiled kernels or caches that a warm-up run prepares; `None` if the
    /// node needs no warm-up.
    pub warmup_signature: Option<String>,
    /// Extra working memory as a multiple of the node's input and output bytes (kernel
    /// temporaries). `1.0` means "as much again as the data itself".
    pub workspace_factor: f64,
}

impl Default for NodeMeta {
    fn default() -> Self {
        NodeMeta {
            modes: vec![ExecMode::Atomic],
            quantizable: false,
            checkpointable: false,
            warmup_signature: None,
            workspace_factor: 1.0,
        }
    }
}

impl NodeMeta {
    /// Metadata for a local image operator that can run on tiles as well as whole.
    pub fn tileable(workspace_factor: f64) -> Self {
        NodeMeta {
            modes: vec![ExecMode::Tiled, ExecMode::Atomic],
            workspace_factor,
            ..NodeMeta::default()
        }
    }

    /// Whether the node can run in `mode`.
    pub fn supports(&self, mode: ExecMode) -> bool {
        self.modes.contains(&mode)
    }
}

/// Device bytes a node needs, split as the planner reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Model weights resident while the node runs.
    pub weights: u64,
    /// Inputs, outputs and workspace of one unit of work (the whole value, or one chunk).
    pub activations: u64,
    /// The largest block of `weights` that can be put on the device on its own, so the
    /// weights can be streamed when they do not fit whole (0: they cannot).
    pub weight_block: u64,
}

impl MemoryEstimate {
    /// Weights plus activations.
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// What a memory estimate is asked for: the shapes involved and the profile's element size.
#[derive(Clone, Debug)]
pub struct MemoryQuery<'a> {
    pub inputs: &'a [ValueInfo],
    pub outputs: &'a [ValueInfo],
    /// Bytes per element of the activations a node computes itself under the profile's
    /// precision policy (4 for f32, 2 for f16). IMAGE and MASK values are f32 whatever the
    /// policy (ComfyUI's convention), and their [`ValueInfo::bytes`] already says so.
    pub bytes_per_element: u64,
}

impl MemoryQuery<'_> {
    /// The conservative default: all inputs and outputs whole, plus workspace.
    pub fn whole(&self, meta: &NodeMeta) -> MemoryEstimate {
        let data: u64 = self
            .inputs
            .iter()
            .chain(self.outputs.iter())
            .map(|i| i.bytes().unwrap_or(0))
            .sum();
        MemoryEstimate {
            weights: 0,
            activations: data + (data as f64 * meta.workspace_factor) as u64,
            weight_block: 0,
        }
    }
}

/// The kind of value an input takes, with its constraints.
#[derive(Clone, Debug)]
pub enum InputKind {
    Int {
        default: i64,
        min: i64,
        max: i64,
        step: i64,
    },
    Float {
        default: f64,
        min: f64,
        max: f64,
        step: f64,
    },
    String {
        default: String,
        multiline: bool,
    },
    Boolean {
        default: bool,
    },
    /// One of fixed options.
    Combo {
        options: Vec<String>,
        default: String,
    },
    /// A file name relative to one of the job's folders (e.g. `input`); validated to exist.
    File {
        folder: FileFolder,
        /// Whether clients may upload into the folder for this input (ComfyUI's `image_upload`).
        image_upload: bool,
    },
    /// A value produced by another node.
    Link(DataType),
}

/// Folders a file input can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFolder {
    Input,
    /// A subfolder of the models folder laid out as ComfyUI's (`upscale_models`, `vae`, ...).
    Models(&'static str),
}

impl InputKind {
    /// The data type a link into this input must carry.
    pub fn data_type(&self) -> DataType {
        match self {
            InputKind::Int { .. } => DataType::Int,
            InputKind::Float { .. } => DataType::Float,
            InputKind::String { .. } => DataType::String,
            InputKind::Boolean { .. } => DataType::Boolean,
            InputKind::Combo { .. } | InputKind::File { .. } => DataType::Combo,
            InputKind::Link(t) => t.clone(),
        }
    }

    /// Whether the input is a widget (a literal in the workflow) rather than a link-only input.
    pub fn is_widget(&self) -> bool {
        !matches!(self, InputKind::Link(_))
    }
}

/// One named input of a node.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: &'static str,
    pub kind: InputKind,
    pub required: bool,
    pub tooltip: &'static str,
}

/// One output of a node.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    pub name: &'static str,
    pub data_type: DataType,
}

/// A node's type signature and catalogue entry.
#[derive(Clone, Debug)]
pub struct NodeSchema {
    /// The `class_type` in workflows, e.g. `ImageBlur`.
    pub class_type: &'static str,
    pub display_name: &'static str,
    pub category: &'static str,
    pub description: &'static str,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Whether the node is a sink whose results are reported (ComfyUI's `OUTPUT_NODE`).
    pub output_node: bool,
}

impl NodeSchema {
    /// Looks up an input by name.
    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// The entry of ComfyUI's `/object_info` for this node, plus a `nova` key with metadata.
    pub fn object_info(&self, meta: &NodeMeta) -> Json {
        let mut required = Map::new();
        let mut optional = Map::new();
        let mut order_req = Vec::new();
        let mut order_opt = Vec::new();
        for input in &self.inputs {
            let mut spec = match &input.kind {
                InputKind::Int {
                    default,
                    min,
                    max,
                    step,
                } => json!(["INT", {"default": default, "min": min, "max": max, "step": step}]),
                InputKind::Float {
                    default,
                    min,
                    max,
                    step,
                } => json!(["FLOAT", {"default": default, "min": min, "max": max, "step": step}]),
                InputKind::String { default, multiline } => {
                    json!(["STRING", {"default": default, "multiline": multiline}])
                }
                InputKind::Boolean { default } => json!(["BOOLEAN", {"default": default}]),
                InputKind::Combo { options, default } => json!([options, {"default": default}]),
                InputKind::File { image_upload, .. } => {
                    json!([Vec::<String>::new(), {"image_upload": image_upload}])
                }
                InputKind::Link(t) => json!([t.as_str()]),
            };
            if !input.tooltip.is_empty() {
                if let Some(Json::Object(opts)) = spec.get_mut(1) {
                    opts.insert("tooltip".into(), json!(input.tooltip));
                } else if let Json::Array(items) = &mut spec {
                    items.push(json!({"tooltip": input.tooltip}));
                }
            }
            if input.required {
                required.insert(input.name.into(), spec);
                order_req.push(input.name);
            } else {
                optional.insert(input.name.into(), spec);
                order_opt.push(input.name);
            }
        }
        json!({
            "input": {"required": required, "optional": optional},
            "input_order": {"required": order_req, "optional": order_opt},
            "output": self.outputs.iter().map(|o| o.data_type.as_str()).collect::<Vec<_>>(),
            "output_is_list": self.outputs.iter().map(|_| false).collect::<Vec<_>>(),
            "output_name": self.outputs.iter().map(|o| o.name).collect::<Vec<_>>(),
            "name": self.class_type,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "python_module": "nova",
            "output_node": self.output_node,
            "nova": meta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::value::ImageInfo;

    #[test]
    fn a_node_that_declares_nothing_is_atomic_with_whole_input_memory() {
        let meta = NodeMeta::default();
        assert_eq!(meta.modes, vec![ExecMode::Atomic]);
        assert!(!meta.supports(ExecMode::Tiled));
        let img = ValueInfo::Image(ImageInfo {
            batch: 1,
            height: 100,
            width: 200,
            channels: 3,
        });
        let q = MemoryQuery {
            inputs: &[img],
            outputs: &[img],
            bytes_per_element: 4,
        };
        let m = q.whole(&meta);
        // Input and output whole (2 x 240,000 bytes) plus the same again as workspace.
        assert_eq!(m.activations, 4 * 100 * 200 * 3 * 2 * 2);
        assert_eq!(m.weights, 0);
        // Image values stay f32 under a half-precision policy.
        let q16 = MemoryQuery {
            bytes_per_element: 2,
            ..q
        };
        assert_eq!(q16.whole(&meta).activations, m.activations);
    }

    #[test]
    fn object_info_uses_comfyui_shapes() {
        let schema = NodeSchema {
            class_type: "T",
            display_name: "T",
            category: "c",
            description: "",
            inputs: vec![
                InputSpec {
                    name: "image",
                    kind: InputKind::Link(DataType::Image),
                    required: true,
                    tooltip: "",
                },
                InputSpec {
                    name: "mode",
                    kind: InputKind::Combo {
                        options: vec!["a".into(), "b".into()],
                        default: "a".into(),
                    },
                    required: false,
                    tooltip: "pick one",
                },
            ],
            outputs: vec![OutputSpec {
                name: "IMAGE",
                data_type: DataType::Image,
            }],
            output_node: false,
        };
        let info = schema.object_info(&NodeMeta::tileable(1.0));
        assert_eq!(
            info["input"]["required"]["image"],
            serde_json::json!(["IMAGE"])
        );
        assert_eq!(
            info["input"]["optional"]["mode"][0],
            serde_json::json!(["a", "b"])
        );
        assert_eq!(info["input"]["optional"]["mode"][1]["tooltip"], "pick one");
        assert_eq!(info["output"], serde_json::json!(["IMAGE"]));
        assert_eq!(
            info["nova"]["modes"],
            serde_json::json!(["tiled", "atomic"])
        );
    }
}
