//! Admission control: a plan whose forecast fits is accepted; one that does not is refused up
//! front with the numbers (what the largest wave needs, the budget after headroom) and a
//! suggestion (a smaller resolution of the source image, a profile whose budget would fit).

use super::plan::ExecutionPlan;
use crate::node::memory::Bytes;
use serde::Serialize;

/// A job refused by admission control: its most frugal plan does not fit.
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The node whose forecast is largest.
    pub node: String,
    pub class_type: String,
    /// Its forecast, safety margin included.
    pub need_bytes: u64,
    pub budget_bytes: u64,
    pub headroom_bytes: u64,
    /// What the plan may fill: the budget minus headroom.
    pub limit_bytes: u64,
    /// The tile side it would need at the smallest (if tiled).
    pub tile: Option<usize>,
    /// A smaller resolution of the workflow's source image that would fit, `(width, height)`.
    pub suggest_resolution: Option<(usize, usize)>,
    /// A profile whose budget would fit.
    pub suggest_profile: Option<String>,
    /// The whole message, for people.
    pub message: String,
}

/// Admission control: accepts a plan whose forecast fits, or says what it would need.
///
/// `budget` and `headroom` are what the limit was derived from; `profiles` lists the profiles
/// to suggest, each with its usable bytes (budget minus headroom), smallest first.
pub fn admit(
    plan: &ExecutionPlan,
    budget: Bytes,
    headroom: Bytes,
    profiles: &[(String, Bytes)],
) -> Result<(), Box<Refusal>> {
    if plan.fits {
        return Ok(());
    }
    let worst = plan
        .nodes
        .iter()
        .filter(|n| !n.forecast.fits)
        .max_by_key(|n| (n.forecast.peak_bytes, n.forecast.working_bytes))
        .or_else(|| plan.peak_node())
        .expect("a plan that does not fit has nodes");
    let limit = budget.saturating_sub(headroom);
    let need = (worst.forecast.peak_bytes as f64 * (1.0 + plan.safety_margin)).ceil() as u64;
    // Memory grows with pixels: scale the node's image sides by sqrt(limit / need).
    // Memory grows with pixels all the way down, so scale the image the workflow starts from
    // (the first node that makes an image from no image, e.g. LoadImage), or else the node's.
    let source = plan
        .nodes
        .iter()
        .find(|n| n.inputs.iter().all(|i| i.image().is_none()))
        .and_then(|n| n.outputs.first())
        .and_then(|o| o.image());
    let suggest_resolution = source
        .or_else(|| worst.outputs.first().and_then(|o| o.image()))
        .or_else(|| worst.inputs.iter().find_map(|i| i.image()))
        .map(|i| {
            let f = (limit.0 as f64 / need.max(1) as f64).sqrt().min(1.0) * 0.95;
            let side = |v: usize| ((v as f64 * f) as usize / 8 * 8).max(8);
            (side(i.width), side(i.height))
        })
        .filter(|(w, h)| *w >= 8 && *h >= 8 && limit.0 > 0);
    let suggest_profile = profiles
        .iter()
        .find(|(_, usable)| usable.0 >= need)
        .map(|(p, _)| p.clone());
    let at = match worst.tile {
        Some(t) => format!("at the smallest tile ({t} px)"),
        None => "running whole (it cannot be tiled)".to_string(),
    };
    // A region needs its memory as one: name all its nodes.
    let unit = plan.units.get(worst.unit);
    let what = match unit.filter(|u| u.members().count() > 1) {
        Some(u) => {
            let ids: Vec<&str> = u.members().map(|m| plan.nodes[m].node.as_str()).collect();
            let classes: Vec<&str> = u.members().map(|m| plan.nodes[m].class_type).collect();
            format!(
                "the region of nodes {} ({}) needs",
                ids.join(", "),
                classes.join(" -> ")
            )
        }
        None => format!("node {} ({}) needs", worst.node, worst.class_type),
    };
    let mut message = format!(
        "{what} {} {at}; budget {} after {} headroom",
        Bytes(need),
        limit,
        headroom
    );
    let mut tips = Vec::new();
    if let Some((w, h)) = suggest_resolution {
        tips.push(format!("lower the resolution to {w}x{h}"));
    }
    if let Some(p) = &suggest_profile {
        tips.push(format!("use the {p} profile on a larger device"));
    }
    if !tips.is_empty() {
        message.push_str("; ");
        message.push_str(&tips.join(" or "));
    }
    Err(Box::new(Refusal {
        node: worst.node.clone(),
        class_type: worst.class_type.to_string(),
        need_bytes: need,
        budget_bytes: budget.0,
        headroom_bytes: headroom.0,
        limit_bytes: limit.0,
        tile: worst.tile,
        suggest_resolution,
        suggest_profile,
        message,
    }))
}
