//! What travels through a job's dataflow: data records (whole values and pieces) and notes
//! (what operators learned, for telemetry), on one stream per operator.
//!
//! Every operator's output is a stream of [`Rec`]: its data, and its notes at the times they
//! concern. The builder splits the two: data goes on to the next operators, notes of every
//! operator of a node are gathered on the driver's worker and probed there, so when the probe
//! of a node's notes passes a time, every note of that node up to that time has arrived, and
//! so has the data (both leave under the same capability).
//!
//! Records and notes are serializable (a model by its registry name, a tensor by its dims and
//! values) so that a dataflow spanning processes can carry them; a piece's memory reservation
//! is process-local and is not carried.

use crate::node::memory::Lease;
use crate::node::residency::WorkNotes;
use crate::node::value::Value;
use crate::node::NodeError;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::sync::Arc;

/// A value on an output port, or a piece of a chunked node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Output port of the producing node (for a consumer, the slot of the link it came in
    /// on); for pieces, 0.
    pub port: u32,
    /// Piece index within the producing unit (0 for whole values).
    pub chunk: u32,
    pub value: Value,
    /// Memory set aside for this piece when it was cut; it travels with the piece and
    /// returns when the last holder drops it.
    #[serde(skip)]
    pub reserve: Option<Arc<Lease>>,
}

impl Record {
    /// A whole value on `port`.
    pub fn value(port: u32, value: Value) -> Record {
        Record {
            port,
            chunk: 0,
            value,
            reserve: None,
        }
    }
}

/// What an operator learned while it worked, for the driver.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum NoteKind {
    /// The node produced its outputs; an output node's UI record (ComfyUI's `executed`).
    Ran { ui: Option<Json> },
    /// The node failed (the job stops).
    Failed(NodeError),
    /// A chunk's result, as shown by the partial output of the output node it feeds (a host
    /// copy; for a streamed output node, its own window or chunk).
    Piece {
        chunk: u32,
        value: Value,
        /// When the operator finished the piece, in milliseconds since the job began.
        done_ms: f64,
    },
    /// A step of an iterative node made a preview.
    Preview {
        step: u32,
        image: Value,
        method: String,
    },
    /// A chunk ran short of memory and was re-run as smaller tiles.
    Retry {
        chunk: u32,
        from: usize,
        to: usize,
        reason: String,
    },
    /// Pieces the node's input was cut into so far (windows decoded, for streams).
    Cut { count: u32 },
    /// Residency changes, phases, and load and transfer time from the node's work log.
    Work(WorkNotes),
    /// Operator time inside node code (`busy_ns`), and time spent replaying cached results.
    Time { busy_ns: u64, replay_ns: u64 },
}

/// A note of one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Note {
    pub node: u32,
    pub kind: NoteKind,
}

/// One record of an operator's output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Rec {
    Data(Record),
    Note(Note),
}
