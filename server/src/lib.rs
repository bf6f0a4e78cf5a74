//! `nova-server`: the `nova` binary's library — the command line ([`cli`]) and the service
//! ([`serve`]: ComfyUI-compatible HTTP/WebSocket API, durable queue, relay of events). Nothing
//! imports this crate.
//!
//! Dependencies: `clap` (arguments), `indicatif` (terminal progress bars); the service's are
//! listed in [`serve`]'s docs.

pub mod cli;
mod job;
mod optimize;
mod progress;
pub mod serve;
