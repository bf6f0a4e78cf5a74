//! The execution plan: for each node, its mode, its chunks, the shapes it sees, a memory
//! forecast, and the timestamps its records carry.
//!
//! Planning is pure: a function of the validated workflow, the shapes nodes infer, and the
//! options. This first planner tiles every tileable node whose output exceeds the tile size;
//! the budget-driven choice of modes and sizes builds on the same structure.
//!
//! # Timestamps
//! Records carry a `u64` time. A node's input time is the latest output time of its producers
//! (0 for sources); chunk `i` of a node travels at `input time + i`; its output at
//! `input time + chunks - 1`. So along any path times never decrease, and a probe that sees
//! the frontier pass a chunk's time knows that chunk — and every earlier one — is final.

use crate::chunk::{ChunkSize, ChunkSpec};
use crate::node::{guarded, Inputs, JobEnv, NodeError};
use crate::schema::{ExecMode, MemoryEstimate, MemoryQuery};
use crate::value::ValueInfo;
use crate::workflow::ValidatedWorkflow;
use serde::Serialize;

/// The smallest tile side the planner cuts: below it, per-record overhead and halos dominate
/// the work, and the chunk count of a large image would explode.
pub const MIN_TILE: usize = 16;

/// Planner settings.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Size of the chunks tileable nodes are cut into; `None` runs every node whole.
    pub tile: Option<ChunkSize>,
    /// Bytes per activation element under the precision policy.
    pub bytes_per_element: u64,
    /// Largest single value (as f32) a run may create; larger ones are refused at plan time
    /// rather than failing an allocation mid-run. The budget-driven admission control
    /// refines this with the device budget.
    pub max_value_bytes: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            tile: Some(ChunkSize::Tile {
                width: 256,
                height: 256,
            }),
            bytes_per_element: 4,
            max_value_bytes: 16 << 30,
        }
    }
}

/// The plan of one node.
#[derive(Clone, Debug, Serialize)]
pub struct NodePlan {
    pub node: String,
    pub class_type: &'static str,
    pub mode: ExecMode,
    /// The chunks of a tiled node; empty for an atomic one.
    pub chunks: Vec<ChunkSpec>,
    /// Shape of the input that is cut into chunks (tiled nodes).
    pub chunked_input: Option<ValueInfo>,
    /// Shapes of the linked inputs, in link order.
    pub inputs: Vec<ValueInfo>,
    /// Shapes of the outputs.
    pub outputs: Vec<ValueInfo>,
    /// Forecast device memory while the node runs one unit (a chunk, or the whole).
    pub memory: MemoryEstimate,
    /// Time of the node's inputs.
    pub in_time: u64,
    /// Time of the node's outputs.
    pub out_time: u64,
}

impl NodePlan {
    /// Number of units of work (1 for atomic nodes).
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len().max(1) as u32
    }
}

/// The plan of a whole job.
#[derive(Clone, Debug, Serialize)]
pub struct ExecutionPlan {
    pub nodes: Vec<NodePlan>,
    /// The largest single-node forecast (nodes run one unit at a time per worker).
    pub forecast_peak_bytes: u64,
}

impl ExecutionPlan {
    /// Total chunks over all nodes.
    pub fn total_chunks(&self) -> u64 {
        self.nodes.iter().map(|n| n.chunk_count() as u64).sum()
    }
}

/// Why planning failed: a node could not infer its output from its inputs.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("node {node} ({class_type}): {error}")]
pub struct PlanError {
    pub node: String,
    pub class_type: String,
    pub error: NodeError,
}

/// Plans a validated workflow.
pub fn plan(
    wf: &ValidatedWorkflow,
    env: &JobEnv,
    opts: &PlanOptions,
) -> Result<ExecutionPlan, PlanError> {
    let mut plans: Vec<NodePlan> = Vec::with_capacity(wf.nodes.len());
    for n in &wf.nodes {
        let fail = |error: NodeError| PlanError {
            node: n.id.0.clone(),
            class_type: n.class_type.to_string(),
            error,
        };
        let mut infos = Inputs::new();
        let mut input_list = Vec::new();
        let mut in_time = 0;
        for l in &n.links {
            let p = &plans[l.from];
            let info = p
                .outputs
                .get(l.output)
                .copied()
                .unwrap_or(ValueInfo::Unknown);
            infos.insert(l.input, info);
            input_list.push(info);
            in_time = in_time.max(p.out_time);
        }
        // Every call into node code is guarded: a node bug fails the plan, not the process.
        let outputs = guarded(|| n.node.infer(&n.args, &infos, env)).map_err(fail)?;
        for (i, o) in outputs.iter().enumerate() {
            if let Some(b) = o.bytes().filter(|b| *b > opts.max_value_bytes) {
                return Err(fail(NodeError::Other(format!(
                    "output {i} would take {:.1} GiB, over the {:.1} GiB limit of one value",
                    b as f64 / (1u64 << 30) as f64,
                    opts.max_value_bytes as f64 / (1u64 << 30) as f64
                ))));
            }
        }
        let meta = n.node.meta();
        let mut mode = ExecMode::Atomic;
        let mut chunks = Vec::new();
        let mut chunked_input = None;
        let mut memory = guarded(|| {
            Ok(n.node.memory(
                &n.args,
                &MemoryQuery {
                    inputs: &input_list,
                    outputs: &outputs,
                    bytes_per_element: opts.bytes_per_element,
                },
            ))
        })
        .map_err(fail)?;
        let chunking = match (opts.tile, meta.supports(ExecMode::Tiled)) {
            (Some(size), true) => guarded(|| Ok(n.node.chunked(&n.args)))
                .map_err(fail)?
                .map(|c| (size, c)),
            _ => None,
        };
        if let Some((ChunkSize::Tile { width, height }, chunking)) = chunking {
            let size = ChunkSize::Tile {
                width: width.max(MIN_TILE),
                height: height.max(MIN_TILE),
            };
            if let Some(input) = infos.get(chunking.input).filter(|i| i.image().is_some()) {
                let planned = guarded(|| chunking.op.plan(input, size)).map_err(fail)?;
                if planned.len() > 1 {
                    let per_chunk = guarded(|| {
                        Ok(planned
                            .iter()
                            .map(|c| chunking.op.chunk_bytes(input, c))
                            .max()
                            .unwrap_or(0))
                    })
                    .map_err(fail)?;
                    memory = MemoryEstimate {
                        weights: memory.weights,
                        activations: per_chunk / 4 * opts.bytes_per_element,
                    };
                    mode = ExecMode::Tiled;
                    chunks = planned;
                    chunked_input = Some(*input);
                }
            }
        }
        let count = chunks.len().max(1) as u64;
        plans.push(NodePlan {
            node: n.id.0.clone(),
            class_type: n.class_type,
            mode,
            chunks,
            chunked_input,
            inputs: input_list,
            outputs,
            memory,
            in_time,
            out_time: in_time + count - 1,
        });
    }
    let forecast_peak_bytes = plans.iter().map(|p| p.memory.total()).max().unwrap_or(0);
    Ok(ExecutionPlan {
        nodes: plans,
        forecast_peak_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Args, ExecContext, Node, NodeOutput, NodeRegistry};
    use crate::schema::{InputKind, InputSpec, NodeSchema, OutputSpec};
    use crate::value::{DataType, Value};
    use crate::workflow;

    /// A node with one optional IMAGE input and one IMAGE output; declares nothing else.
    struct Pass(NodeSchema);

    impl Node for Pass {
        fn schema(&self) -> &NodeSchema {
            &self.0
        }
        fn execute(
            &self,
            _: &Args,
            _: Inputs<Value>,
            _: &ExecContext,
        ) -> Result<NodeOutput, NodeError> {
            Ok(NodeOutput::default())
        }
    }

    fn registry() -> NodeRegistry {
        let mut r = NodeRegistry::new();
        for (name, output_node) in [("Pass", false), ("Out", true)] {
            r.register(Pass(NodeSchema {
                class_type: name,
                display_name: name,
                category: "test",
                description: "",
                inputs: vec![InputSpec {
                    name: "image",
                    kind: InputKind::Link(DataType::Image),
                    required: false,
                    tooltip: "",
                }],
                outputs: vec![OutputSpec {
                    name: "IMAGE",
                    data_type: DataType::Image,
                }],
                output_node,
            }));
        }
        r
    }

    #[test]
    fn undeclared_nodes_plan_atomic_and_times_never_decrease_along_links() {
        let env = JobEnv::new("i", "o", "t");
        let wf = workflow::load(
            r#"{"1": {"class_type": "Pass", "inputs": {}},
                "2": {"class_type": "Pass", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "Pass", "inputs": {}},
                "4": {"class_type": "Out", "inputs": {"image": ["2", 0]}},
                "5": {"class_type": "Out", "inputs": {"image": ["3", 0]}}}"#,
            &registry(),
            &env,
        )
        .unwrap();
        let p = plan(&wf, &env, &PlanOptions::default()).unwrap();
        assert!(p
            .nodes
            .iter()
            .all(|n| n.mode == ExecMode::Atomic && n.chunk_count() == 1));
        for (ix, n) in wf.nodes.iter().enumerate() {
            for l in &n.links {
                assert!(p.nodes[l.from].out_time <= p.nodes[ix].in_time);
            }
            assert_eq!(
                p.nodes[ix].out_time,
                p.nodes[ix].in_time + p.nodes[ix].chunk_count() as u64 - 1
            );
        }
        assert_eq!(p.total_chunks(), 5);
    }
}
