//! Telemetry: the event schema ([`event`]), where a node's time goes ([`timing`]), the driver
//! that turns a job's probes and the notes its operators send into events ([`driver`]), and
//! the report of a finished run ([`report`]). Reads compute's probes and record streams; never
//! calls into compute.

pub(crate) mod driver;
pub mod event;
pub mod report;
pub mod timing;
