//! Auto-Optimize: the planner's profile-specific choices written into a workflow, so what
//! runs is what the user sees and saves.
//!
//! Given a workflow (ComfyUI's API format) and its `extra_data`, the job is planned as it
//! would run, then:
//! - `extra_data.nova.profile` is set to the profile it was planned for, when unset;
//! - when the job does not fit, ComfyUI's whole-image VAE nodes whose forecast alone is over
//!   the limit are swapped for their tiled forms (`VAEDecode` → `VAEDecodeTiled`, `VAEEncode`
//!   → `VAEEncodeTiled`, same inputs plus `tile_size`, the tile the planner cut, and
//!   `overlap`), kept only if the new plan's forecast is lower;
//! - `extra_data.nova.tile_size` is set to the tile the planner actually cut (it halves the
//!   configured tile until the forecast fits), or to the profile's tile when none was set.
//!
//! The result is a fixed point: optimizing it again changes nothing.
//!
//! Every change is listed with what it was, what it became and why. Nothing else of the
//! workflow is touched: sizes, seeds and prompts are the user's (a refusal that remains says
//! what would fit instead). Precision is the profile's policy and not a workflow input; it is
//! reported with the other profile settings.

use crate::job::{plan_json, PrepareError, Prepared};
use serde::Serialize;
use serde_json::{json, Value as Json};

/// One change Auto-Optimize made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Change {
    /// The node changed; `None` for job settings.
    pub node: Option<String>,
    /// What changed: `class_type`, an input name, or `extra_data.nova.<key>`.
    pub field: String,
    pub from: Json,
    pub to: Json,
    pub reason: String,
}

/// The optimized workflow and what changed.
#[derive(Debug, Serialize)]
pub(crate) struct Optimized {
    pub prompt: Json,
    pub extra_data: Json,
    pub changes: Vec<Change>,
    /// The plans before and after (`nova plan --json`'s form).
    pub before: Json,
    pub after: Json,
    /// The profile's settings the plan used.
    pub settings: Json,
}

/// Tiled forms of ComfyUI's whole-image VAE nodes.
const TILED: [(&str, &str); 2] = [
    ("VAEDecode", "VAEDecodeTiled"),
    ("VAEEncode", "VAEEncodeTiled"),
];

/// ComfyUI's `VAEDecodeTiled` overlap default.
const VAE_OVERLAP: u64 = 64;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Applies the planner's choices to `prompt`/`extra_data`; `prep` plans a job the way it
/// would run.
pub(crate) fn optimize(
    prompt: &Json,
    extra_data: &Json,
    prep: impl Fn(&Json, &Json) -> Result<Prepared, PrepareError>,
) -> Result<Optimized, PrepareError> {
    let before = prep(prompt, extra_data)?;
    let mut wf = prompt.clone();
    let mut extra = if extra_data.is_object() {
        extra_data.clone()
    } else {
        json!({})
    };
    if !extra.get("nova").is_some_and(Json::is_object) {
        extra["nova"] = json!({});
    }
    let mut changes = Vec::new();
    let before_json = plan_json(&before);
    let c = before.config.clone();
    let c = &c;

    let profile = c.profile.id.name();
    if extra["nova"].get("profile").is_none_or(Json::is_null) {
        extra["nova"]["profile"] = json!(profile);
        changes.push(Change {
            node: None,
            field: "extra_data.nova.profile".into(),
            from: Json::Null,
            to: json!(profile),
            reason: format!("the profile the run is planned for ({})", c.reason),
        });
    }

    // Whole-image VAE nodes that cannot fit become their tiled forms, kept if that helps.
    let mut current = before;
    if !current.plan.fits {
        let limit = current.plan.limit_bytes.unwrap_or(u64::MAX);
        let vae_tile = (c.tile as u64).clamp(256, 4096) / 64 * 64;
        let mut swapped = wf.clone();
        let mut swaps = Vec::new();
        for n in &current.plan.nodes {
            let Some((from, to)) = TILED.iter().find(|(f, _)| *f == n.class_type) else {
                continue;
            };
            if n.forecast.peak_bytes <= limit {
                continue;
            }
            let Some(node) = swapped.get_mut(&n.node) else {
                continue;
            };
            node["class_type"] = json!(to);
            node["inputs"]["tile_size"] = json!(vae_tile);
            node["inputs"]["overlap"] = json!(VAE_OVERLAP);
            swaps.push(Change {
                node: Some(n.node.clone()),
                field: "class_type".into(),
                from: json!(from),
                to: json!(to),
                reason: format!(
                    "whole it forecasts {}, over the {} usable: decoded in tiles of at most {vae_tile}px with {VAE_OVERLAP}px overlap",
                    mib(n.forecast.peak_bytes),
                    mib(limit)
                ),
            });
        }
        if !swaps.is_empty() {
            if let Ok(p) = prep(&swapped, &extra) {
                if p.plan.forecast_peak_bytes < current.plan.forecast_peak_bytes {
                    // Each swapped node's tile input says what the planner cut.
                    for ch in &swaps {
                        let id = ch.node.as_deref().unwrap_or_default();
                        let cut = p
                            .plan
                            .nodes
                            .iter()
                            .find(|n| n.node == id)
                            .and_then(|n| n.tile);
                        if let (Some(t), Some(node)) = (cut, swapped.get_mut(id)) {
                            if (t as u64) < vae_tile {
                                node["inputs"]["tile_size"] = json!(t.max(64));
                            }
                        }
                    }
                    wf = swapped;
                    changes.extend(swaps);
                    current = prep(&wf, &extra)?;
                }
            }
        }
    }

    // The tile the planner cut: the largest of the tiled nodes'.
    let cut = current.plan.nodes.iter().filter_map(|n| n.tile).max();
    let set = extra["nova"]
        .get("tile_size")
        .cloned()
        .unwrap_or(Json::Null);
    let tile = cut.unwrap_or(c.tile);
    if set.as_u64() != Some(tile as u64) && (cut.is_some() || set.is_null()) {
        let reason = match cut {
            Some(t) if t < c.tile => format!(
                "a {0}px tile does not fit {1}: the planner cut {t}px tiles",
                c.tile,
                current
                    .plan
                    .limit_bytes
                    .map_or("the budget".to_string(), |l| format!(
                        "the {} usable",
                        mib(l)
                    )),
            ),
            Some(t) => format!("the tile the planner cut ({t}px)"),
            None => format!("{profile}'s tile size"),
        };
        extra["nova"]["tile_size"] = json!(tile);
        changes.push(Change {
            node: None,
            field: "extra_data.nova.tile_size".into(),
            from: set,
            to: json!(tile),
            reason,
        });
    }
    let after = prep(&wf, &extra)?;

    let settings = json!({
        "profile": profile,
        "precision": c.profile.precision,
        "tile": c.tile,
        "min_tile": c.profile.min_tile,
        "prefetch_depth": c.profile.prefetch_depth,
        "headroom_bytes": c.headroom.0,
    });
    Ok(Optimized {
        prompt: wf,
        extra_data: extra,
        changes,
        before: before_json,
        after: plan_json(&after),
        settings,
    })
}
