//! The planner: a validated workflow's shapes, its units, their order and sizes, the waves
//! they run in, and every node's forecast and times (see [`super::plan`] for the model).

use super::plan::{
    ExecutionPlan, NodeForecast, NodePlan, PlanError, PlanOptions, UnitKind, UnitPlan, MIN_TILE,
};
use super::units::{form_units, size_unit, Cut, Draft, Shaped, Sized};
use crate::control::workflow::ValidatedWorkflow;
use crate::node::memory::Bytes;
use crate::node::schema::{ExecMode, MemoryEstimate, MemoryQuery};
use crate::node::value::ValueInfo;
use crate::node::{guarded, Inputs, JobEnv, NodeError};

/// Plans a validated workflow. See the module docs.
pub fn plan(
    wf: &ValidatedWorkflow,
    env: &JobEnv,
    opts: &PlanOptions,
) -> Result<ExecutionPlan, PlanError> {
    let count = wf.nodes.len();
    let fail_at = |ix: usize| {
        let n = &wf.nodes[ix];
        move |error: NodeError| PlanError {
            node: n.id.0.clone(),
            class_type: n.class_type.to_string(),
            error,
        }
    };
    // Pass 1: shapes, each node's own estimate, and how it may be cut.
    let mut shaped: Vec<Shaped> = Vec::with_capacity(count);
    let mut cuts: Vec<Cut> = Vec::with_capacity(count);
    for (ix, n) in wf.nodes.iter().enumerate() {
        let fail = fail_at(ix);
        let mut named = Inputs::new();
        let mut inputs = Vec::new();
        for l in &n.links {
            let info = shaped[l.from]
                .outputs
                .get(l.output)
                .copied()
                .unwrap_or(ValueInfo::Unknown);
            named.insert(l.input, info);
            inputs.push(info);
        }
        // Every call into node code is guarded: a node bug fails the plan, not the process.
        let outputs = if n.streamed_batch {
            guarded(|| n.node.infer_streamed(&n.args, &named, env)).map_err(&fail)?
        } else if n.lifted.is_empty() {
            guarded(|| n.node.infer(&n.args, &named, env)).map_err(&fail)?
        } else {
            guarded(|| crate::control::lift::infer(n, &named, env)).map_err(&fail)?
        };
        for (i, o) in outputs.iter().enumerate() {
            if let Some(b) = o.bytes().filter(|b| *b > opts.max_value_bytes) {
                return Err(fail(NodeError::Other(format!(
                    "output {i} would take {}, over the {} limit of one value",
                    Bytes(b),
                    Bytes(opts.max_value_bytes)
                ))));
            }
        }
        // A lifted node only extends a stream; its kernel's memory is part of the windows of
        // the node that consumes the video.
        let memory = if !n.lifted.is_empty() {
            MemoryEstimate::default()
        } else {
            guarded(|| {
                Ok(n.node.memory(
                    &n.args,
                    &MemoryQuery {
                        inputs: &inputs,
                        outputs: &outputs,
                        bytes_per_element: opts.bytes_per_element,
                    },
                ))
            })
            .map_err(&fail)?
        };
        let mut linked: Vec<(usize, usize)> = n.links.iter().map(|l| (l.from, l.output)).collect();
        linked.sort_unstable();
        linked.dedup();
        let input_bytes: u64 = linked
            .iter()
            .map(|&(f, o)| {
                shaped[f]
                    .outputs
                    .get(o)
                    .and_then(|i| i.bytes())
                    .unwrap_or(0)
            })
            .sum();
        let activations = memory
            .total()
            .saturating_sub(memory.weights)
            .saturating_sub(input_bytes);
        let meta = n.node.meta();
        let chunking = if n.lifted.is_empty()
            && (meta.supports(ExecMode::Tiled) || meta.supports(ExecMode::Streamed))
        {
            guarded(|| Ok(n.node.chunked(&n.args, &named, env))).map_err(&fail)?
        } else {
            None
        };
        let cut = match chunking {
            None => Cut::None,
            Some(c) => {
                let input = n
                    .links
                    .iter()
                    .position(|l| l.input == c.input)
                    .map(|i| inputs[i]);
                match input {
                    Some(i @ (ValueInfo::Video(_) | ValueInfo::Audio(_)))
                        if meta.supports(ExecMode::Streamed) =>
                    {
                        Cut::Stream(c, i)
                    }
                    Some(i) if i.image().is_some() || matches!(i, ValueInfo::Latent { .. }) => {
                        let local = i.image().is_some()
                            && guarded(|| Ok(c.op.local().is_some())).unwrap_or(false);
                        Cut::Tiles {
                            chunking: c,
                            input: i,
                            local,
                        }
                    }
                    _ => Cut::None,
                }
            }
        };
        shaped.push(Shaped {
            inputs,
            outputs,
            memory,
            named,
            activations,
        });
        cuts.push(cut);
    }

    // The naive forecast: every node whole, one after another in the workflow's order; a
    // value is held from its node to its last reader.
    let mut last_use: Vec<Vec<usize>> = (0..count)
        .map(|ix| vec![ix; shaped[ix].outputs.len()])
        .collect();
    for (ix, n) in wf.nodes.iter().enumerate() {
        for l in &n.links {
            if let Some(u) = last_use[l.from].get_mut(l.output) {
                *u = (*u).max(ix);
            }
        }
    }
    let atomic_live = held_before(
        count,
        (0..count).flat_map(|p| {
            let shaped = &shaped;
            shaped[p]
                .outputs
                .iter()
                .zip(&last_use[p])
                .map(move |(o, &u)| (p, u, o.bytes().unwrap_or(0)))
        }),
    );
    let atomic_peak: Vec<u64> = (0..count)
        .map(|ix| atomic_live[ix] + shaped[ix].memory.weights + shaped[ix].activations)
        .collect();
    let limit = opts.limit.map(|b| b.0);
    let fits = |peak: u64| limit.is_none_or(|l| opts.with_margin(peak) <= l);

    // Pass 2: units.
    let drafts = form_units(wf, &shaped, &cuts, &atomic_peak, &fits, env, opts)
        .map_err(|(ix, e)| fail_at(ix)(e))?;
    let mut unit_of = vec![0usize; count];
    for (u, d) in drafts.iter().enumerate() {
        for m in d.members() {
            unit_of[m] = u;
        }
    }
    // Order: by depth in the graph of units, then by the workflow's order. Deps point to
    // units whose nodes all come earlier in the workflow, so ordering by the last node first
    // lets depths be computed in one pass.
    let deps: Vec<Vec<usize>> = drafts
        .iter()
        .enumerate()
        .map(|(u, d)| {
            let mut v: Vec<usize> = d
                .members()
                .flat_map(|m| wf.nodes[m].links.iter().map(|l| unit_of[l.from]))
                .filter(|&p| p != u)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        })
        .collect();
    let last_node = |d: &Draft| d.members().max().unwrap_or(0);
    let mut by_last: Vec<usize> = (0..drafts.len()).collect();
    by_last.sort_by_key(|&u| last_node(&drafts[u]));
    let mut depth = vec![0usize; drafts.len()];
    for &u in &by_last {
        depth[u] = deps[u].iter().map(|&p| depth[p] + 1).max().unwrap_or(0);
    }
    let mut order = by_last;
    if opts.naive {
        // One node after another, as the naive executor runs them.
    } else {
        order.sort_by_key(|&u| (depth[u], last_node(&drafts[u])));
    }
    let mut pos = vec![0usize; drafts.len()];
    for (p, &u) in order.iter().enumerate() {
        pos[u] = p;
    }

    // Pass 3: liveness by unit position. A node's outputs exist whole unless it feeds the
    // next stage of its region or a sink.
    let internal = |ix: usize| {
        let d = &drafts[unit_of[ix]];
        d.sink.as_ref().is_some_and(|(s, _)| *s == ix)
            || d.source.as_ref().is_some_and(|(s, _)| *s == ix)
            || (d.nodes.contains(&ix) && (d.nodes.last() != Some(&ix) || d.sink.is_some()))
    };
    let mut values: Vec<(usize, usize, u64)> = Vec::new();
    for ix in 0..count {
        if internal(ix) && !matches!(drafts[unit_of[ix]].kind, UnitKind::Whole) {
            continue;
        }
        for (port, o) in shaped[ix].outputs.iter().enumerate() {
            let readers = wf
                .consumers(ix)
                .iter()
                .filter(|&&c| {
                    unit_of[c] != unit_of[ix]
                        && wf.nodes[c]
                            .links
                            .iter()
                            .any(|l| l.from == ix && l.output == port)
                })
                .map(|&c| pos[unit_of[c]]);
            let p = pos[unit_of[ix]];
            values.push((p, readers.max().unwrap_or(p), o.bytes().unwrap_or(0)));
        }
    }
    let live_at = held_before(drafts.len(), values.iter().copied());

    // Pass 4: each unit sized as if it ran alone at its position.
    let mut sized: Vec<Option<Sized>> = (0..drafts.len()).map(|_| None).collect();
    for &u in &order {
        let live = live_at[pos[u]];
        let fits_here = |working: u64| fits(live + working);
        let s = size_unit(wf, &drafts[u], &shaped, &cuts, &fits_here, opts)
            .map_err(|(ix, e)| fail_at(ix)(e))?;
        sized[u] = Some(s);
    }
    let sized: Vec<Sized> = sized
        .into_iter()
        .map(|s| s.expect("every unit was sized"))
        .collect();

    // Pass 5: waves, in order; a unit joins the current wave when it reads nothing the wave
    // produces and the wave still fits with it.
    let mut wave_of = vec![0usize; drafts.len()];
    let mut waves: Vec<Vec<usize>> = Vec::new();
    let mut wave_live: Vec<u64> = Vec::new();
    let mut wave_working: Vec<u64> = Vec::new();
    for &u in &order {
        let join = !opts.naive
            && waves.last().is_some_and(|w| {
                let wi = waves.len() - 1;
                !deps[u].iter().any(|d| w.contains(d))
                    && fits(wave_live[wi] + wave_working[wi] + sized[u].working)
            });
        if join {
            let wi = waves.len() - 1;
            waves[wi].push(u);
            wave_working[wi] += sized[u].working;
        } else {
            waves.push(vec![u]);
            wave_live.push(live_at[pos[u]]);
            wave_working.push(sized[u].working);
        }
        wave_of[u] = waves.len() - 1;
    }

    // Times and forecasts.
    let mut units: Vec<UnitPlan> = Vec::with_capacity(drafts.len());
    let mut new_index = vec![0usize; drafts.len()];
    let mut node_plans: Vec<Option<NodePlan>> = (0..count).map(|_| None).collect();
    let mut time = 0u64;
    let mut previous_wave_lasts: Vec<usize> = Vec::new();
    for (wi, wave) in waves.iter().enumerate() {
        let peak = wave_live[wi] + wave_working[wi];
        let mut next_time = time;
        let mut lasts = Vec::new();
        for &u in wave {
            let d = &drafts[u];
            let s = &sized[u];
            let in_time = time;
            let out_time = in_time + s.pieces.max(1) as u64 - 1;
            next_time = next_time.max(out_time);
            let mut after: Vec<usize> = d
                .members()
                .flat_map(|m| wf.nodes[m].links.iter().map(|l| l.from))
                .filter(|&p| unit_of[p] != u)
                .chain(previous_wave_lasts.iter().copied())
                .collect();
            after.sort_unstable();
            after.dedup();
            new_index[u] = units.len();
            for (ix, c) in &s.nodes {
                let sh = &shaped[*ix];
                node_plans[*ix] = Some(NodePlan {
                    node: wf.nodes[*ix].id.0.clone(),
                    class_type: wf.nodes[*ix].class_type,
                    mode: c.mode,
                    tile: c.tile,
                    chunks: c.chunks.clone(),
                    pieces_in: c.pieces_in.clone(),
                    steps: c.steps,
                    chunked_input: c.chunked_input,
                    chunk_memory: c.chunk_memory,
                    inputs: sh.inputs.clone(),
                    outputs: sh.outputs.clone(),
                    memory: sh.memory,
                    weights: c.weights,
                    inflight: c.inflight,
                    forecast: NodeForecast {
                        live_bytes: wave_live[wi],
                        working_bytes: c.working,
                        peak_bytes: peak,
                        fits: fits(peak),
                    },
                    atomic_peak_bytes: atomic_peak[*ix],
                    unit: units.len(),
                    in_time,
                    out_time,
                });
            }
            let plan = UnitPlan {
                kind: d.kind,
                nodes: d.nodes.clone(),
                sink: d.sink.as_ref().map(|s| s.0),
                source: d.source.as_ref().map(|s| s.0),
                wave: wi,
                pieces: s.pieces.max(1),
                reserve_bytes: s.reserve,
                working_bytes: s.working,
                after,
                in_time,
                out_time,
            };
            lasts.push(plan.last());
            units.push(plan);
        }
        previous_wave_lasts = lasts;
        time = next_time;
    }
    let nodes: Vec<NodePlan> = node_plans
        .into_iter()
        .map(|n| n.expect("every node is in a unit"))
        .collect();
    let forecast_peak_bytes = (0..waves.len())
        .map(|w| wave_live[w] + wave_working[w])
        .max()
        .unwrap_or(0);
    let naive_peak_bytes = atomic_peak.iter().copied().max().unwrap_or(0);
    Ok(ExecutionPlan {
        fits: nodes.iter().all(|p| p.forecast.fits),
        nodes,
        units,
        waves: waves.len(),
        forecast_peak_bytes,
        naive_peak_bytes,
        limit_bytes: limit,
        safety_margin: opts.safety_margin,
        workers: opts.workers.max(1),
        prefetch: opts.prefetch,
        min_tile: opts.min_tile.max(MIN_TILE),
    })
}

/// For `n` positions and values `(produced at, last read at, bytes)`, the bytes held before
/// each position runs: every value produced earlier and read there or later. Linear: prefix
/// sums of what was produced and what was released, not a scan of earlier values per position.
fn held_before(n: usize, values: impl Iterator<Item = (usize, usize, u64)>) -> Vec<u64> {
    let mut produced = vec![0u64; n + 1];
    let mut released = vec![0u64; n + 1];
    for (p, u, b) in values {
        produced[p + 1] += b;
        released[u.max(p) + 1] += b;
    }
    for i in 0..n {
        produced[i + 1] += produced[i];
        released[i + 1] += released[i];
    }
    (0..n).map(|i| produced[i] - released[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::workflow;
    use crate::node::schema::{InputKind, InputSpec, NodeSchema, OutputSpec};
    use crate::node::value::{DataType, Value};
    use crate::node::{Args, ExecContext, Node, NodeOutput, NodeRegistry};

    /// A node with one optional IMAGE input and one IMAGE output; declares nothing else.
    struct Pass(NodeSchema);

    impl Node for Pass {
        fn schema(&self) -> &NodeSchema {
            &self.0
        }
        fn execute(
            &self,
            _: &Args,
            _: Inputs<Value>,
            _: &ExecContext,
        ) -> Result<NodeOutput, NodeError> {
            Ok(NodeOutput::default())
        }
    }

    fn registry() -> NodeRegistry {
        let mut r = NodeRegistry::new();
        for (name, output_node) in [("Pass", false), ("Out", true)] {
            r.register(Pass(NodeSchema {
                class_type: name,
                display_name: name,
                category: "test",
                description: "",
                inputs: vec![InputSpec {
                    name: "image",
                    kind: InputKind::Link(DataType::Image),
                    required: false,
                    tooltip: "",
                }],
                outputs: vec![OutputSpec {
                    name: "IMAGE",
                    data_type: DataType::Image,
                }],
                output_node,
            }));
        }
        r
    }

    #[test]
    fn undeclared_nodes_plan_atomic_and_times_never_decrease_along_links() {
        let env = JobEnv::new("i", "o", "t");
        let wf = workflow::load(
            r#"{"1": {"class_type": "Pass", "inputs": {}},
                "2": {"class_type": "Pass", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "Pass", "inputs": {}},
                "4": {"class_type": "Out", "inputs": {"image": ["2", 0]}},
                "5": {"class_type": "Out", "inputs": {"image": ["3", 0]}}}"#,
            &registry(),
            &env,
        )
        .unwrap();
        let p = plan(&wf, &env, &PlanOptions::default()).unwrap();
        assert!(p
            .nodes
            .iter()
            .all(|n| n.mode == ExecMode::Atomic && n.chunk_count() == 1));
        for (ix, n) in wf.nodes.iter().enumerate() {
            for l in &n.links {
                assert!(p.nodes[l.from].out_time <= p.nodes[ix].in_time);
            }
            assert_eq!(
                p.nodes[ix].out_time,
                p.nodes[ix].in_time + p.nodes[ix].chunk_count() as u64 - 1
            );
        }
        assert_eq!(p.total_chunks(), 5);
    }

    /// CPU time of this thread: what the work took, whatever else the machine is doing.
    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Validating and planning a chain of `n` nodes: the least thread CPU time of three runs.
    fn chain_cost(n: usize) -> std::time::Duration {
        let env = JobEnv::new("i", "o", "t");
        let mut wf = serde_json::Map::new();
        wf.insert(
            "1".into(),
            serde_json::json!({"class_type": "Pass", "inputs": {}}),
        );
        for i in 2..=n {
            let class = if i == n { "Out" } else { "Pass" };
            wf.insert(
                i.to_string(),
                serde_json::json!({"class_type": class, "inputs": {"image": [(i - 1).to_string(), 0]}}),
            );
        }
        let text = serde_json::Value::Object(wf).to_string();
        let registry = registry();
        (0..3)
            .map(|_| {
                let t = thread_cpu();
                let wf = workflow::load(&text, &registry, &env).unwrap();
                let p = plan(&wf, &env, &PlanOptions::default()).unwrap();
                assert_eq!(p.nodes.len(), n);
                thread_cpu() - t
            })
            .min()
            .unwrap()
    }

    #[test]
    fn validating_and_planning_grow_linearly_with_nodes() {
        // Ten times the nodes: about ten times the work when linear, a hundred when quadratic
        // (a 4,000-node chain once took 25 times a 1,000-node one). CPU time of this thread,
        // not wall time, so a loaded machine does not change the ratio.
        let small = chain_cost(1_000);
        let large = chain_cost(10_000);
        let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-6);
        eprintln!("1,000 nodes {small:?}, 10,000 nodes {large:?}: ratio {ratio:.1}");
        assert!(
            ratio < 50.0,
            "10,000 nodes took {ratio:.1} times 1,000 nodes ({large:?} against {small:?})"
        );
    }
}
