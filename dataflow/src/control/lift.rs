//! Image nodes applied to video: a node whose `IMAGE` input is linked to a `VIDEO` runs on
//! every window of frames, without a second implementation.
//!
//! Validation marks such a node *lifted* (its `IMAGE` outputs become `VIDEO`); planning infers
//! its output shape by asking the node about one frame; running it only appends a
//! [`FrameOp`] to the stream, which calls the node's own kernel ([`Node::execute`]) on each
//! window as an `IMAGE` batch when the video is consumed.
//!
//! Invariant: a lifted node's kernel sees exactly what it would see for an `IMAGE` batch of
//! those frames, with the same widget values and side inputs, so per frame it computes what
//! it computes on images.

use crate::control::workflow::WorkflowNode;
use crate::node::schema::MemoryQuery;
use crate::node::stream::{FrameOp, Temporal, VideoShape};
use crate::node::value::{ImageInfo, Value, ValueInfo};
use crate::node::{Args, ExecContext, Inputs, JobEnv, Node, NodeError, NodeOutput};
use candle_core::Tensor;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub use crate::node::liftable;

/// One frame of `shape`'s output, as an image shape.
fn frame_info(shape: &VideoShape, frames: usize) -> ValueInfo {
    ValueInfo::Image(ImageInfo {
        batch: frames,
        height: shape.out.height,
        width: shape.out.width,
        channels: 3,
    })
}

/// Output shapes of a lifted node, from its input shapes (the lifted inputs are videos).
pub(crate) fn infer(
    n: &WorkflowNode,
    inputs: &Inputs<ValueInfo>,
    env: &JobEnv,
) -> Result<Vec<ValueInfo>, NodeError> {
    let name = n.lifted[0];
    let Some(ValueInfo::Video(shape)) = inputs.get(name).copied() else {
        return Ok(n
            .node
            .schema()
            .outputs
            .iter()
            .map(|_| ValueInfo::Unknown)
            .collect());
    };
    let temporal = liftable(n.node.as_ref(), &n.args)
        .ok_or_else(|| NodeError::input(name, "this node cannot run on video frames"))?;
    let mut one = inputs.clone();
    one.insert(name, frame_info(&shape, 1));
    let frame_outs = n.node.infer(&n.args, &one, env)?;
    let workspace = frame_workspace(n.node.as_ref(), &n.args, frame_info(&shape, 1), &frame_outs);
    frame_outs
        .iter()
        .map(|o| {
            let Some(img) = o.image() else {
                return Ok(ValueInfo::Unknown);
            };
            Ok(ValueInfo::Video(then(
                &shape,
                temporal,
                (img.width, img.height),
                workspace,
            )))
        })
        .collect()
}

/// The node's working memory for one frame, by its own estimate (frames are f32 `IMAGE`s
/// whatever the profile's precision, so the element size is 4).
fn frame_workspace(node: &dyn Node, args: &Args, input: ValueInfo, outputs: &[ValueInfo]) -> u64 {
    node.memory(
        args,
        &MemoryQuery {
            inputs: &[input],
            outputs,
            bytes_per_element: 4,
        },
    )
    .activations
}

/// `shape` after one more operator.
fn then(shape: &VideoShape, t: Temporal, size: (usize, usize), workspace: u64) -> VideoShape {
    let mut s = *shape;
    let m = t.multiplier.max(1) as u32;
    s.workspace_per_frame = s
        .workspace_per_frame
        .max(workspace * shape.multiplier.max(1) as u64);
    s.multiplier *= m;
    s.overlap = s.overlap.max(t.overlap as u32);
    s.out.width = size.0;
    s.out.height = size.1;
    s.out.frames = s.out_frames(s.source_frames);
    s.out.fps_num = s.out.fps_num.saturating_mul(m);
    s
}

/// Runs a lifted node: its outputs are the input video with the node appended per frame.
pub(crate) fn execute(
    n: &WorkflowNode,
    mut inputs: Inputs<Value>,
    ctx: &ExecContext,
) -> Result<NodeOutput, NodeError> {
    let name = n.lifted[0];
    let video = match inputs.take(name) {
        Some(Value::Video(v)) => v,
        _ => return Err(NodeError::input(name, "expected a VIDEO")),
    };
    let temporal = liftable(n.node.as_ref(), &n.args)
        .ok_or_else(|| NodeError::input(name, "this node cannot run on video frames"))?;
    let meta = video.meta();
    let mut probe = Inputs::new();
    for (k, v) in inputs.iter() {
        probe.insert(k.to_string(), v.info());
    }
    probe.insert(
        name,
        ValueInfo::Image(ImageInfo {
            batch: 1,
            height: meta.height,
            width: meta.width,
            channels: 3,
        }),
    );
    let outs = n.node.infer(&n.args, &probe, &ctx.env)?;
    let one = probe.get(name).copied().unwrap_or(ValueInfo::Unknown);
    let workspace = frame_workspace(n.node.as_ref(), &n.args, one, &outs);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    n.class_type.hash(&mut h);
    for (k, v) in n.args.values() {
        (k, v.to_string()).hash(&mut h);
    }
    for (k, v) in inputs.iter() {
        (k, format!("{:?}", v.info()), format!("{}", v.data_type())).hash(&mut h);
        if let Value::Model(m) = v {
            m.asset.name().hash(&mut h);
        }
    }
    let base = h.finish();
    let side = Arc::new(inputs);
    let values = outs
        .iter()
        .enumerate()
        .map(|(port, o)| {
            let size = o
                .image()
                .map_or((meta.width, meta.height), |i| (i.width, i.height));
            let op = NodeFrames {
                node: n.node.clone(),
                args: n.args.clone(),
                input: name,
                side: side.clone(),
                ctx: ctx.clone(),
                port,
                temporal,
                size,
                workspace,
                signature: base ^ (port as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                label: format!("node {} ({})", n.id, n.class_type),
            };
            Value::Video(video.then(Arc::new(op)))
        })
        .collect();
    Ok(NodeOutput { values, ui: None })
}

/// A node's kernel over windows of frames.
struct NodeFrames {
    node: Arc<dyn Node>,
    args: Args,
    input: &'static str,
    side: Arc<Inputs<Value>>,
    ctx: ExecContext,
    port: usize,
    temporal: Temporal,
    size: (usize, usize),
    workspace: u64,
    signature: u64,
    label: String,
}

impl FrameOp for NodeFrames {
    fn temporal(&self) -> Temporal {
        self.temporal
    }
    fn out_size(&self, _w: usize, _h: usize) -> (usize, usize) {
        self.size
    }
    fn apply(&self, frames: &Tensor) -> Result<Tensor, NodeError> {
        let mut inputs = (*self.side).clone();
        inputs.insert(self.input, Value::image(frames.clone()));
        let out = crate::node::guarded(|| self.node.execute(&self.args, inputs, &self.ctx))
            .map_err(|e| NodeError::Other(format!("{} on video frames: {e}", self.label)))?;
        out.values
            .into_iter()
            .nth(self.port)
            .and_then(|v| v.as_image().cloned())
            .ok_or_else(|| NodeError::Other(format!("{} gave no image for its frames", self.label)))
    }
    fn signature(&self) -> u64 {
        self.signature
    }
    fn workspace_per_frame(&self, _w: usize, _h: usize) -> u64 {
        self.workspace
    }
    fn describe(&self) -> String {
        self.label.clone()
    }
}
