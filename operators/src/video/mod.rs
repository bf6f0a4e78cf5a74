//! Video nodes. `VIDEO` values are lazy streams ([`nova_dataflow::VideoStream`]): `LoadVideo`
//! makes a decoder source, image nodes linked to a video run on its frames (the engine lifts
//! them, see `nova_dataflow::lift`), and `SaveVideo` consumes the stream window by window as a
//! streamed node of the dataflow, encoding as windows finish. ComfyUI's names and inputs:
//! `LoadVideo`, `SaveVideo`, `CreateVideo`, `GetVideoComponents`.

pub mod components;
pub mod create;
pub mod load;
pub mod save;

use nova_dataflow::{Inputs, NodeError, Value, ValueInfo, VideoShape, VideoStream};

/// The stream of a required `VIDEO` input.
pub(crate) fn video_input(inputs: &Inputs<Value>, name: &str) -> Result<VideoStream, NodeError> {
    inputs
        .require(name)?
        .as_video()
        .cloned()
        .ok_or_else(|| NodeError::input(name, "expected a VIDEO"))
}

/// The shape of a `VIDEO` input at plan time.
pub(crate) fn video_info(inputs: &Inputs<ValueInfo>, name: &str) -> Result<VideoShape, NodeError> {
    match inputs.get(name) {
        Some(ValueInfo::Video(s)) => Ok(*s),
        Some(other) => Err(NodeError::input(
            name,
            format!("expected a VIDEO, found {other:?}"),
        )),
        None => Err(NodeError::input(name, "required input is not connected")),
    }
}
