//! The control plane: workflows in (ComfyUI's API format, or built with a
//! [`pipeline::Pipeline`]), validated ([`workflow`]) with image nodes lifted onto videos
//! ([`lift`]); the plan of a job fitted to its device-memory budget ([`plan`], its units and
//! regions in [`units`]), admission ([`admission`]), and the hardware profiles that set the
//! budget ([`profile`]). Pure functions of their inputs; builds on the node interface only.

pub mod admission;
pub mod lift;
pub mod pipeline;
pub mod plan;
pub mod planner;
pub mod profile;
pub(crate) mod units;
pub mod workflow;
