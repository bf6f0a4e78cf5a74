//! Image nodes. Local operators (scale, blur, sharpen, invert) are written as a
//! [`TileNode`]: a schema and a [`TileKernel`]; [`Tiled`] turns one into a node that runs whole
//! or tile by tile through the same kernel, so tiled output equals untiled output.

pub mod blur;
pub mod empty;
pub mod filter;
pub mod invert;
pub mod load;
pub mod resample;
pub mod save;
pub mod scale;
pub mod sharpen;

use nova_dataflow::{
    Args, ChunkedOp, Chunking, ExecContext, Inputs, JobEnv, Node, NodeError, NodeMeta, NodeOutput,
    NodeSchema, Value, ValueInfo,
};
use nova_engines::{TileKernel, TiledImage};
use std::sync::Arc;

/// A local image operator: a schema with an `image` input and one `IMAGE` output, and a
/// kernel built from its widget inputs.
pub trait TileNode: Send + Sync + 'static {
    type Kernel: TileKernel;
    /// The node's schema.
    fn schema(&self) -> &NodeSchema;
    /// The kernel for these widget values.
    fn kernel(&self, args: &Args) -> Result<Self::Kernel, NodeError>;
}

/// Adapts a [`TileNode`] to the engine's [`Node`] interface.
pub struct Tiled<T>(pub T);

impl<T: TileNode> Tiled<T> {
    fn op(&self, args: &Args) -> Result<TiledImage<T::Kernel>, NodeError> {
        Ok(TiledImage::new(self.0.kernel(args)?))
    }
}

impl<T: TileNode> Node for Tiled<T> {
    fn schema(&self) -> &NodeSchema {
        self.0.schema()
    }

    fn meta(&self) -> NodeMeta {
        NodeMeta::tileable(2.0)
    }

    fn infer(
        &self,
        args: &Args,
        inputs: &Inputs<ValueInfo>,
        _env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let info = inputs.require("image")?;
        if matches!(info, ValueInfo::Unknown) {
            return Ok(vec![ValueInfo::Unknown]);
        }
        Ok(vec![self.op(args)?.output_info(info)?])
    }

    fn chunked(&self, args: &Args, _inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Chunking> {
        let op = self.op(args).ok()?;
        Some(Chunking {
            input: "image",
            op: Arc::new(op),
            max_tile: None,
        })
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        _ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let image = inputs.image("image")?;
        Ok(NodeOutput {
            values: vec![Value::image(self.op(args)?.run_whole(image)?)],
            ui: None,
        })
    }
}
