//! The engine-overhead benchmark's two contenders, built from the same plan.

use nova_dataflow::{
    plan, run, workflow, Args, DataType, Emitter, EventSink, ExecContext, ExecutionPlan, InputKind,
    InputSpec, Inputs, JobEnv, Node, NodeError, NodeOutput, NodeRegistry, NodeSchema, PlanOptions,
    RunOptions, ValidatedWorkflow, Value,
};
use std::sync::Arc;

/// An output node that accepts an image and does nothing, so both contenders end at the same
/// point (no PNG encoding in the measurement).
pub struct Discard {
    schema: NodeSchema,
}

impl Discard {
    pub fn new() -> Self {
        Discard {
            schema: NodeSchema {
                class_type: "BenchDiscard",
                display_name: "Discard",
                category: "bench",
                description: "Drops its input.",
                inputs: vec![InputSpec {
                    name: "images",
                    kind: InputKind::Link(DataType::Image),
                    required: true,
                    tooltip: "",
                }],
                outputs: vec![],
                output_node: true,
            },
        }
    }
}

impl Default for Discard {
    fn default() -> Self {
        Self::new()
    }
}

impl Node for Discard {
    fn schema(&self) -> &NodeSchema {
        &self.schema
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

/// A planned `EmptyImage -> ImageBlur -> Discard` job.
pub struct Setup {
    pub wf: Arc<ValidatedWorkflow>,
    pub plan: Arc<ExecutionPlan>,
    pub env: JobEnv,
    ctx: ExecContext,
}

impl Setup {
    /// A `size` x `size` image blurred with radius 2, cut into `tile` x `tile` tiles.
    pub fn new(size: usize, tile: usize) -> Setup {
        let mut registry: NodeRegistry = nova_operators::registry();
        registry.register(Discard::new());
        let text = format!(
            r#"{{
              "1": {{"class_type": "EmptyImage", "inputs": {{"width": {size}, "height": {size}, "batch_size": 1, "color": 8421504}}}},
              "2": {{"class_type": "ImageBlur", "inputs": {{"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}}}},
              "3": {{"class_type": "BenchDiscard", "inputs": {{"images": ["2", 0]}}}}
            }}"#
        );
        let env = JobEnv::new("bench-in", "bench-out", "bench-tmp");
        let wf = workflow::load(&text, &registry, &env).expect("bench workflow is valid");
        let opts = PlanOptions {
            tile: Some(tile),
            workers: 1,
            ..PlanOptions::default()
        };
        let plan = plan(&wf, &env, &opts).expect("bench workflow plans");
        let ctx = ExecContext::standalone(env.clone(), "bench");
        Setup {
            wf: Arc::new(wf),
            plan: Arc::new(plan),
            env,
            ctx,
        }
    }

    /// Number of tiles the blur is cut into.
    pub fn tiles(&self) -> usize {
        self.plan.nodes[1].chunks.len()
    }

    /// The job through the timely dataflow on one worker, events discarded.
    pub fn run_dataflow(&self) {
        let sink: EventSink = Arc::new(|_| {});
        run(
            self.wf.clone(),
            self.plan.clone(),
            self.env.clone(),
            RunOptions::default(),
            Arc::new(Emitter::new("bench", sink)),
        )
        .expect("bench run succeeds");
    }

    /// The same work as a plain loop: make the image, split/process each tile, merge.
    pub fn run_plain_loop(&self) -> Value {
        let source = &self.wf.nodes[0];
        let image = source
            .node
            .execute(&source.args, Inputs::new(), &self.ctx)
            .expect("empty image")
            .values
            .remove(0);
        let blur = &self.wf.nodes[1];
        let op = blur
            .node
            .chunked(
                &blur.args,
                &nova_dataflow::Inputs::new(),
                &nova_dataflow::JobEnv::new("input", "output", "temp"),
            )
            .expect("blur is tileable")
            .op;
        let np = &self.plan.nodes[1];
        let info = np.chunked_input.expect("tiled");
        let mut merger = op.merger(&np.outputs[0]).expect("merger");
        for c in &np.chunks {
            let piece = op.split(&image, c).expect("split");
            let part = op.process(&info, c, &piece).expect("process");
            merger.add(c, part).expect("merge");
        }
        merger.finish().expect("merge")
    }
}
