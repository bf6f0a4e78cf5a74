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

/// A planned `EmptyImage -> ImageBlur -> ImageInvert -> Discard` job: one pipeline region
/// (the image made piece by piece, two stages), merged for the discard.
pub struct Setup {
    pub wf: Arc<ValidatedWorkflow>,
    pub plan: Arc<ExecutionPlan>,
    pub env: JobEnv,
    ctx: ExecContext,
}

impl Setup {
    /// A `size` x `size` image blurred with radius 2 and inverted, cut into `tile` x `tile`
    /// tiles, on `workers` compute workers.
    pub fn new(size: usize, tile: usize) -> Setup {
        Self::with_workers(size, tile, 1)
    }

    /// [`Setup::new`] on `workers` compute workers.
    pub fn with_workers(size: usize, tile: usize, workers: usize) -> Setup {
        let mut registry: NodeRegistry = nova_operators::registry();
        registry.register(Discard::new());
        let text = format!(
            r#"{{
              "1": {{"class_type": "EmptyImage", "inputs": {{"width": {size}, "height": {size}, "batch_size": 1, "color": 8421504}}}},
              "2": {{"class_type": "ImageBlur", "inputs": {{"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}}}},
              "3": {{"class_type": "ImageInvert", "inputs": {{"image": ["2", 0]}}}},
              "4": {{"class_type": "BenchDiscard", "inputs": {{"images": ["3", 0]}}}}
            }}"#
        );
        let env = JobEnv::new("bench-in", "bench-out", "bench-tmp");
        let wf = workflow::load(&text, &registry, &env).expect("bench workflow is valid");
        let opts = PlanOptions {
            tile: Some(tile),
            workers,
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

    /// Pieces the region is cut into.
    pub fn tiles(&self) -> usize {
        self.plan.nodes[1].chunks.len()
    }

    /// Records through the region's stages per job (pieces times stages).
    pub fn records(&self) -> usize {
        self.tiles() * 2
    }

    /// The job through the timely dataflow on the process's runtime, events discarded.
    pub fn run_dataflow(&self) {
        self.run_on(None);
    }

    /// The job on a runtime started for it alone (what every job paid before the long-lived
    /// runtime: timely's workers started and joined per job).
    pub fn run_dataflow_fresh(&self) {
        let rt = nova_dataflow::Runtime::new(self.plan.workers).expect("a runtime starts");
        self.run_on(Some(rt));
    }

    fn run_on(&self, runtime: Option<nova_dataflow::Runtime>) {
        let sink: EventSink = Arc::new(|_| {});
        run(
            self.wf.clone(),
            self.plan.clone(),
            self.env.clone(),
            RunOptions {
                runtime,
                ..RunOptions::default()
            },
            Arc::new(Emitter::new("bench", sink)),
        )
        .expect("bench run succeeds");
    }

    /// The same work as a plain loop: each piece read from the source, through both stages'
    /// kernels, and merged, one after another.
    pub fn run_plain_loop(&self) -> Value {
        let source = &self.wf.nodes[0];
        let mut reader = source
            .node
            .source(&source.args, &self.env)
            .expect("EmptyImage is a source")
            .open(&self.ctx)
            .expect("source opens");
        let stages: Vec<_> = [1usize, 2]
            .iter()
            .map(|&ix| {
                let n = &self.wf.nodes[ix];
                let op = n
                    .node
                    .chunked(&n.args, &nova_dataflow::Inputs::new(), &self.env)
                    .expect("tileable")
                    .op;
                (ix, op)
            })
            .collect();
        let last = &self.plan.nodes[2];
        let mut merger = stages[1].1.merger(&last.outputs[0]).expect("merger");
        for i in 0..self.tiles() {
            let mut piece = reader.read(&self.plan.nodes[1].pieces_in[i]).expect("read");
            for (ix, op) in &stages {
                let np = &self.plan.nodes[*ix];
                let local = op.local().expect("local");
                piece = local
                    .process_within(
                        &np.chunked_input.expect("tiled"),
                        &np.chunks[i].region,
                        &np.pieces_in[i],
                        &piece,
                    )
                    .expect("process");
            }
            merger.add(&last.chunks[i], piece).expect("merge");
        }
        merger.finish().expect("merge")
    }
}
