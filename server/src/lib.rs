//! `nova-server`: the `nova` binary's library — the command line now, the HTTP/WebSocket
//! service later. Nothing imports this crate.
//!
//! Dependencies: `clap` (arguments), `indicatif` (terminal progress bars).

pub mod cli;
mod progress;
