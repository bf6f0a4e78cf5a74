//! Chunks: the unit of work that travels through a dataflow as a timestamped record.
//!
//! The compute plane is media-agnostic: it asks a node's [`ChunkedOp`] how to cut its input,
//! how to process one piece, and how to put the pieces back together. Media engines
//! (`nova-engines`: image tiles, video windows, audio chunks) implement the trait; the dataflow
//! only moves records and watches their timestamps.
//!
//! Invariant: `split`, `process` and `merge` are pure functions of their arguments, so the
//! order in which chunks are processed (and on which worker) never changes the result.

use crate::node::value::{Value, ValueInfo};
use crate::node::NodeError;
use serde::{Deserialize, Serialize};

/// An axis-aligned rectangle in pixel coordinates of some image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

impl Rect {
    /// A rectangle from origin and size.
    pub fn new(x: usize, y: usize, w: usize, h: usize) -> Rect {
        Rect { x, y, w, h }
    }

    /// Number of pixels covered.
    pub fn area(&self) -> usize {
        self.w * self.h
    }
}

/// Where a chunk sits in its node's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChunkRegion {
    /// A spatial tile of an image, in output pixel coordinates.
    Tile { rect: Rect },
    /// A window of video frames: source frames `[start, start + count)` and the output
    /// frames `[out_start, out_start + out_count)` it yields; the next window's output starts
    /// at `out_next` (frames from there on are shared with it and cross-faded).
    Frames {
        start: u64,
        count: u64,
        out_start: u64,
        out_count: u64,
        out_next: u64,
    },
    /// A span of audio frames `[start, start + len)` of the output.
    Samples { start: u64, len: u64 },
}

/// One chunk of a node's work: its index among `count` and its region of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpec {
    pub index: u32,
    pub count: u32,
    pub region: ChunkRegion,
}

impl ChunkSpec {
    /// The tile rectangle, for image chunks.
    pub fn rect(&self) -> Option<Rect> {
        match self.region {
            ChunkRegion::Tile { rect } => Some(rect),
            _ => None,
        }
    }
}

/// The size of the pieces a chunked operator is asked to cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkSize {
    /// Square-ish image tiles of at most this many pixels a side (output coordinates).
    Tile { width: usize, height: usize },
    /// Windows of at most `window` source frames, consecutive ones sharing `overlap`.
    Frames { window: usize, overlap: usize },
    /// Spans of at most `len` audio frames.
    Samples { len: usize },
}

/// Device memory of one chunk while it is processed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChunkMemory {
    /// What `split` cut for it (the tile with its halo).
    pub piece: u64,
    /// The processed chunk.
    pub result: u64,
    /// Kernel temporaries while it is processed.
    pub workspace: u64,
}

/// Assembles a node's output from processed chunks as they arrive, so a chunk's memory
/// returns as soon as it is pasted.
pub trait Merger: Send {
    /// Pastes one processed chunk.
    fn add(&mut self, chunk: &ChunkSpec, part: Value) -> Result<(), NodeError>;
    /// The assembled output, once every chunk was added.
    fn finish(self: Box<Self>) -> Result<Value, NodeError>;
    /// The assembled output with the node's UI record (an output node's files); by default
    /// [`Self::finish`]'s value and none.
    fn finish_output(self: Box<Self>) -> Result<crate::node::NodeOutput, NodeError> {
        Ok(crate::node::NodeOutput {
            values: vec![self.finish()?],
            ui: None,
        })
    }
}

/// How a node runs chunk by chunk. Implemented by the media engines.
pub trait ChunkedOp: Send + Sync {
    /// Cuts the output that `input` produces into chunks of at most `size`. Pure.
    fn plan(&self, input: &ValueInfo, size: ChunkSize) -> Result<Vec<ChunkSpec>, NodeError>;

    /// The output shape for `input`.
    fn output_info(&self, input: &ValueInfo) -> Result<ValueInfo, NodeError>;

    /// Extracts what `chunk` needs from the whole input (including any halo).
    fn split(&self, input: &Value, chunk: &ChunkSpec) -> Result<Value, NodeError>;

    /// Computes one chunk of the output from what `split` extracted; `input` is the shape of
    /// the whole input the piece was cut from.
    fn process(
        &self,
        input: &ValueInfo,
        chunk: &ChunkSpec,
        piece: &Value,
    ) -> Result<Value, NodeError>;

    /// Cuts `chunk` into sub-chunks of at most `size`, for a retry when memory ran short. The
    /// default cannot cut: the chunk itself.
    fn subdivide(&self, chunk: &ChunkSpec, _size: ChunkSize) -> Vec<ChunkSpec> {
        vec![*chunk]
    }

    /// Computes `chunk` from its `piece` as the sub-chunks `subs` (from [`Self::subdivide`]),
    /// one after another; the result equals [`Self::process`]'s.
    fn process_subdivided(
        &self,
        input: &ValueInfo,
        chunk: &ChunkSpec,
        piece: &Value,
        _subs: &[ChunkSpec],
    ) -> Result<Value, NodeError> {
        self.process(input, chunk, piece)
    }

    /// This operator bound to the node's other inputs (those not cut into chunks, e.g. a
    /// model) at run time, with what it needs to put weights on the device. `None`: the
    /// operator needs nothing besides its pieces.
    fn bind(
        &self,
        _side: &crate::node::Inputs<Value>,
        _weights: &crate::node::residency::WeightContext,
    ) -> Result<Option<std::sync::Arc<dyn ChunkedOp>>, NodeError> {
        Ok(None)
    }

    /// A fresh assembler for an output of shape `output`.
    fn merger(&self, output: &ValueInfo) -> Result<Box<dyn Merger>, NodeError>;

    /// Device memory the merger holds for the whole run besides the output it assembles (an
    /// encoder's frame buffers and lookahead, frames kept for stitching), for chunks of
    /// `input`. The planner adds it to every chunked plan of the node, and the engine leases
    /// it when it makes the merger, so the budget covers it. Default: none.
    fn merger_memory(&self, _input: &ValueInfo) -> u64 {
        0
    }

    /// Called once per run before any chunk is cut, with the run's accountant and the device
    /// memory the plan leaves unused (`spare`: the limit less the forecast peak): a cache the
    /// operator keeps across runs may hold at most `spare`, leased from `acct`. Default:
    /// nothing to do.
    fn attach(&self, _acct: &std::sync::Arc<crate::node::memory::Accountant>, _spare: u64) {}

    /// Device memory one chunk needs while it is processed.
    fn chunk_memory(&self, input: &ValueInfo, chunk: &ChunkSpec) -> ChunkMemory;

    /// The operator as a stage of a pipeline region, when its pieces compose with its
    /// neighbours' (see [`LocalOp`]). Default: it does not; it runs as a region of its own.
    fn local(&self) -> Option<&dyn LocalOp> {
        None
    }
}

/// A chunked operator that is *local*: any region of its output depends on a known region of
/// its input (its receptive field, clipped to the input), and it can compute an output region
/// from any piece of the input that covers that region. Consecutive local operators form a
/// pipeline region: the planner walks each output piece back through the stages to the region
/// of the first stage's input it needs (receptive fields and scale factors compose), the input
/// is cut once, and every stage computes its part of the piece from the previous stage's.
///
/// Invariant: [`LocalOp::process_within`] gives, for every output region, exactly the values
/// the whole-input run gives there, whatever covering piece it was handed, so a pipeline run
/// equals the node-by-node run bit for bit.
pub trait LocalOp: Send + Sync {
    /// The region of the input (inside its bounds) that output region `out` reads.
    fn input_region(&self, input: &ValueInfo, out: &ChunkRegion) -> Result<ChunkRegion, NodeError>;

    /// Cuts `region` (inside the input's bounds) out of the whole input.
    fn crop(&self, input: &Value, region: &ChunkRegion) -> Result<Value, NodeError>;

    /// Computes output region `out` from `have`, the part `have_region` of an input of shape
    /// `input` (covering [`Self::input_region`] of `out`).
    fn process_within(
        &self,
        input: &ValueInfo,
        out: &ChunkRegion,
        have_region: &ChunkRegion,
        have: &Value,
    ) -> Result<Value, NodeError>;

    /// Device memory while output region `out` is computed from the piece `have_region`.
    fn region_memory(
        &self,
        input: &ValueInfo,
        out: &ChunkRegion,
        have_region: &ChunkRegion,
    ) -> ChunkMemory;
}

/// A node whose output can be read piece by piece, in the order a pipeline region cuts its
/// pieces, without the whole value ever existing: a PNG decoded band of rows by band of rows,
/// an image generated on demand. See [`crate::node::Node::source`].
pub trait SourceOp: Send + Sync {
    /// Memory the source holds while the parts `regions` of its output (of shape `output`)
    /// are read, in this order.
    fn memory(&self, output: &ValueInfo, regions: &[ChunkRegion]) -> u64;

    /// Opens the source for reading.
    fn open(&self, ctx: &crate::node::ExecContext) -> Result<Box<dyn RegionReader>, NodeError>;
}

/// Reads parts of a source's output.
pub trait RegionReader: Send {
    /// The part `region` of the output. Parts come in the order the region's pieces were cut
    /// (for images, tile rows top to bottom: a part never starts or ends above the one before).
    fn read(&mut self, region: &ChunkRegion) -> Result<Value, NodeError>;
}

/// An output node that consumes its input piece by piece as the pieces become final (a PNG
/// written row band by row band, frames handed to an encoder), so its input never has to
/// exist whole. See [`crate::node::Node::sink`].
pub trait SinkOp: Send + Sync {
    /// Memory the sink holds (buffers, encoder state) while the pieces `chunks` of an input of
    /// shape `input` arrive, at most `inflight` of them ahead of the first one it lacks.
    fn memory(&self, input: &ValueInfo, chunks: &[ChunkSpec], inflight: usize) -> u64;

    /// Opens the sink for an input of shape `input` arriving as `chunks` (in any order): the
    /// [`Merger::add`] of each piece writes what became final, [`Merger::finish_output`] ends
    /// the output and gives the node's UI record. A sink dropped before it finished leaves
    /// nothing behind.
    fn open(
        &self,
        input: &ValueInfo,
        chunks: &[ChunkSpec],
        ctx: &crate::node::ExecContext,
    ) -> Result<Box<dyn Merger>, NodeError>;
}
