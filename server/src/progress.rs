//! Progress on stderr: bars (overall and per node) on a terminal, plain lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nova_dataflow::{Event, EventKind};
use std::collections::HashMap;

/// Renders job events for a person watching stderr.
pub(crate) struct Progress {
    bars: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    overall: Option<ProgressBar>,
    nodes: HashMap<String, ProgressBar>,
}

impl Progress {
    pub(crate) fn new(terminal: bool) -> Progress {
        Progress {
            bars: terminal.then(|| Bars {
                multi: MultiProgress::new(),
                overall: None,
                nodes: HashMap::new(),
            }),
        }
    }

    pub(crate) fn on_event(&mut self, ev: &Event) {
        match &mut self.bars {
            Some(b) => b.on_event(ev),
            None => plain(ev),
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(b) = &mut self.bars {
            if let Some(o) = &b.overall {
                o.finish();
            }
            let _ = b.multi.clear();
        }
    }
}

/// The run's time split as one line.
fn timing_line(t: &nova_dataflow::RunTiming) -> String {
    format!(
        "nova: time: start-up {:.1} ms, model load {:.1} ms, transfer {:.1} ms, compute {:.1} ms, cache replay {:.1} ms (summed over workers)",
        t.startup_ms, t.total.load_ms, t.total.transfer_ms, t.total.compute_ms, t.total.replay_ms
    )
}

fn plain(ev: &Event) {
    match &ev.kind {
        EventKind::Timing(t) => eprintln!("{}", timing_line(t)),
        EventKind::NodeStart {
            node,
            class_type,
            mode,
            chunks,
            steps,
        } => match steps {
            Some(s) => eprintln!("nova: node {node} ({class_type}) started, {s} steps"),
            None => {
                eprintln!("nova: node {node} ({class_type}) started, {mode:?} in {chunks} chunk(s)")
            }
        },
        EventKind::NodeEnd {
            node,
            class_type,
            wall_ms,
            ..
        } => eprintln!("nova: node {node} ({class_type}) finished in {wall_ms:.1} ms"),
        EventKind::PartialVideo {
            node,
            window,
            windows,
            frame_start,
            frame_count,
            cached,
            ..
        } => eprintln!(
            "nova: node {node} window {}/{windows} final: frames {frame_start}..{}{}",
            window + 1,
            frame_start + frame_count,
            if *cached {
                " (replayed from cache)"
            } else {
                ""
            }
        ),
        _ => {}
    }
}

impl Bars {
    fn on_event(&mut self, ev: &Event) {
        let style = ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        match &ev.kind {
            EventKind::NodeStart {
                node,
                class_type,
                chunks,
                ..
            } => {
                let bar = self.multi.add(ProgressBar::new(*chunks as u64));
                bar.set_style(style);
                bar.set_prefix(format!("{node} {class_type}"));
                self.nodes.insert(node.clone(), bar);
            }
            EventKind::Chunk { node, progress, .. } | EventKind::Step { node, progress, .. } => {
                if let Some(bar) = self.nodes.get(node) {
                    bar.inc(1);
                }
                let overall = self.overall.get_or_insert_with(|| {
                    let o = self.multi.insert(0, ProgressBar::new(progress.max));
                    o.set_style(style.clone());
                    o.set_prefix("overall");
                    o
                });
                overall.set_position(progress.value);
            }
            EventKind::NodeEnd { node, wall_ms, .. } => {
                if let Some(bar) = self.nodes.get(node) {
                    bar.finish_with_message(format!("{wall_ms:.0} ms"));
                }
            }
            EventKind::Timing(t) => {
                let _ = self.multi.println(timing_line(t));
            }
            _ => {}
        }
    }
}
