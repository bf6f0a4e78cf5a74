//! Writes `report.json`, `report.md` and the SVG plots (plotters) from the figures.

use super::Config;
use plotters::prelude::*;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A number for a table: `-` for none.
fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".into(),
    }
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// Grouped bars: one group per label, one bar per series.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    labels: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<(), String> {
    let colors = [
        RGBColor(33, 102, 172),
        RGBColor(214, 96, 77),
        RGBColor(90, 160, 90),
    ];
    let top = series
        .iter()
        .flat_map(|s| s.1.iter())
        .copied()
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let width = (160 + 110 * labels.len()) as u32;
    let root = SVGBackend::new(path, (width.max(480), 360)).into_drawing_area();
    let e = |e: Box<dyn std::fmt::Display>| e.to_string();
    root.fill(&WHITE).map_err(|x| e(Box::new(x)))?;
    let n = labels.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..top)
        .map_err(|x| e(Box::new(x)))?;
    let labels_owned = labels.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < labels_owned.len() {
                labels_owned[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|x| e(Box::new(x)))?;
    let k = series.len() as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let c = colors[si % colors.len()];
        let w = 0.8 / k;
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| {
                        let x0 = i as f64 + 0.1 + si as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w * 0.92, v)], c.filled())
                    }),
            )
            .map_err(|x| e(Box::new(x)))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(Box::new(x)))?;
    root.present().map_err(|x| e(Box::new(x)))?;
    Ok(())
}

/// The design's targets against this run's figures: (name, NOVA, baseline, ratio, target,
/// met).
fn targets(r: &Value) -> Vec<[String; 6]> {
    let mut rows = Vec::new();
    // Time to first output: the median over the suite's cases of NOVA / naive.
    let ratios: Vec<f64> = r["suite"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["nova_over_naive"]["first_output"].as_f64())
        .filter(|x| x.is_finite())
        .collect();
    let ttfo = super::sections::median(&ratios);
    rows.push([
        "time to first output (median over the suite of NOVA / naive)".into(),
        String::new(),
        String::new(),
        format!("{ttfo:.2}"),
        "≤ 0.70 (30%+ faster)".into(),
        met(ttfo.is_finite().then_some(ttfo <= 0.7)).into(),
    ]);
    // OOM incidence on 2-4 GB.
    let (mut naive, mut nova) = (0u64, 0u64);
    for p in r["oom"]["by_profile"].as_array().into_iter().flatten() {
        if matches!(p["profile"].as_str(), Some("PASCAL_2G") | Some("PASCAL_4G")) {
            naive += p["naive_oom"].as_u64().unwrap_or(0);
            nova += p["nova_refused"].as_u64().unwrap_or(0);
        }
    }
    let red = if naive > 0 {
        1.0 - nova as f64 / naive as f64
    } else {
        f64::NAN
    };
    rows.push([
        "OOM/refused jobs on PASCAL_2G + PASCAL_4G (plans)".into(),
        nova.to_string(),
        naive.to_string(),
        format!("{:.0}% fewer", red * 100.0),
        "≥ 40% fewer".into(),
        met(red.is_finite().then_some(red >= 0.4)).into(),
    ]);
    let s = &r["model_switch"];
    let warm = s["warm_over_naive"].as_f64().unwrap_or(f64::NAN);
    rows.push([
        "warm model switch (load + transfer to ready)".into(),
        format!("{} ms", num(&s["warm_ms"], 2)),
        format!("{} ms", num(&s["naive_ms"], 2)),
        format!("{warm:.2}"),
        "≤ 0.80 (20%+ faster)".into(),
        met(warm.is_finite().then_some(warm <= 0.8)).into(),
    ]);
    let o = &r["engine_overhead"];
    let ratio = o["ratio"].as_f64().unwrap_or(f64::NAN);
    rows.push([
        "engine overhead (dataflow / plain loop, same tiles)".into(),
        format!("{} ms", num(&o["dataflow_ms"], 1)),
        format!("{} ms", num(&o["plain_loop_ms"], 1)),
        format!("{ratio:.3}"),
        "≤ 1.05".into(),
        met(ratio.is_finite().then_some(ratio <= 1.05)).into(),
    ]);
    let st = &r["startup"];
    let ui = st["ui_ready_ms"].as_f64().unwrap_or(f64::NAN);
    rows.push([
        "time to UI-ready (spawn to first /system_stats answer)".into(),
        format!("{ui:.1} ms"),
        format!(
            "{} ms (`nova --version`)",
            num(&st["process_baseline_ms"], 1)
        ),
        num(&st["ratio_to_baseline"], 2),
        "< 100 ms".into(),
        met(ui.is_finite().then_some(ui < 100.0)).into(),
    ]);
    rows
}

/// The ratios of the targets table as numbers, with their targets (all "at most").
fn target_ratios(r: &Value) -> (Vec<String>, Vec<f64>, Vec<f64>) {
    let ratios: Vec<f64> = r["suite"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["nova_over_naive"]["first_output"].as_f64())
        .collect();
    let (mut naive, mut nova) = (0.0, 0.0);
    for p in r["oom"]["by_profile"].as_array().into_iter().flatten() {
        if matches!(p["profile"].as_str(), Some("PASCAL_2G") | Some("PASCAL_4G")) {
            naive += p["naive_oom"].as_f64().unwrap_or(0.0);
            nova += p["nova_refused"].as_f64().unwrap_or(0.0);
        }
    }
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    (
        vec![
            "first output".into(),
            "OOM jobs 2-4 GB".into(),
            "warm switch".into(),
            "engine overhead".into(),
        ],
        vec![
            super::sections::median(&ratios),
            if naive > 0.0 { nova / naive } else { f64::NAN },
            f(&r["model_switch"]["warm_over_naive"]),
            f(&r["engine_overhead"]["ratio"]),
        ],
        vec![0.7, 0.6, 0.8, 1.05],
    )
}

fn table(md: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let _ = writeln!(md, "| {} |", r.join(" | "));
    }
    md.push('\n');
}

fn quality_text(q: &Value) -> String {
    if q.is_null() {
        return "-".into();
    }
    if let Some(e) = q["error"].as_str() {
        return format!("not compared: {e}");
    }
    if q["identical"] == true {
        return "identical".into();
    }
    let mut parts = Vec::new();
    if !q["psnr_db"].is_null() {
        parts.push(format!("PSNR {} dB", num(&q["psnr_db"], 1)));
    }
    if !q["ssim"].is_null() {
        parts.push(format!("SSIM {}", num(&q["ssim"], 4)));
    }
    if !q["snr_db"].is_null() {
        parts.push(format!("SNR {} dB", num(&q["snr_db"], 1)));
    }
    parts.join(", ")
}

/// Writes the report; the paths written.
pub fn write(c: &Config, r: &Value) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(&c.out).map_err(|e| format!("{}: {e}", c.out.display()))?;
    let mut written = Vec::new();
    let json_path = c.out.join("report.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(r).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", json_path.display()))?;
    written.push(json_path);

    let m = &r["machine"];
    let mut md = String::new();
    let _ = writeln!(md, "# NOVA KPI report\n");
    let _ = writeln!(
        md,
        "`{}` — {} on {} ({} cores, {:.0} GiB, {}), commit {}, {} build; harness wall time {:.0} s. \
         GPU budgets are simulated by the accountant on the CPU device. Ratios are NOVA over \
         the naive executor (below 1: NOVA takes less time), taken round by round within this \
         run with the order alternated, medians over {} rounds.\n",
        r["command"].as_str().unwrap_or(""),
        m["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"].as_f64().unwrap_or(0.0),
        m["os"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
        m["build"].as_str().unwrap_or("?"),
        r["harness_wall_s"].as_f64().unwrap_or(0.0),
        r["rounds"],
    );
    let _ = writeln!(md, "## The design's targets\n");
    let rows: Vec<Vec<String>> = targets(r).into_iter().map(|x| x.to_vec()).collect();
    table(
        &mut md,
        &["figure", "NOVA", "baseline", "ratio", "target", ""],
        &rows,
    );
    let (labels, ratio, target) = target_ratios(r);
    let p = c.out.join("targets.svg");
    bars(
        &p,
        "NOVA / baseline against the design's targets (lower is better)",
        "ratio",
        &labels,
        &[("NOVA / baseline", ratio), ("target (at most)", target)],
    )?;
    let _ = writeln!(md, "![ratios against targets](targets.svg)\n");
    written.push(p);

    // The suite.
    let _ = writeln!(
        md,
        "## Suite: first output, final output, throughput, quality\n"
    );
    let _ = writeln!(
        md,
        "First output: from submission (before validation) to the first output a user sees — \
         a partial tile/window/chunk, a step preview, or a finished output node. The naive \
         executor has no partial outputs and no previews, and releases every model before \
         each job; NOVA's jobs here start with models unloaded too (the naive run before \
         released them), so model-load cost is the same on both sides. Quality: NOVA's \
         tiled/streamed output against the naive executor's whole output.\n"
    );
    let mut rows = Vec::new();
    let (mut labels, mut nova_ttfo, mut naive_ttfo) = (vec![], vec![], vec![]);
    for case in r["suite"].as_array().into_iter().flatten() {
        let ex = &case["executors"];
        let e = |name: &str, k: &str, d: usize| num(&ex[name][k], d);
        let failed = |name: &str| -> String {
            let f = ex[name]["failed"].as_u64().unwrap_or(0);
            if f == 0 {
                String::new()
            } else {
                format!(
                    " ({f} failed: {})",
                    ex[name]["errors"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join("; "))
                        .unwrap_or_default()
                )
            }
        };
        rows.push(vec![
            format!(
                "{} ({})",
                case["case"].as_str().unwrap_or(""),
                case["profile"].as_str().unwrap_or("")
            ),
            case["what"].as_str().unwrap_or("").to_string(),
            format!(
                "{} / {}",
                e("nova", "first_output_ms", 1),
                e("naive", "first_output_ms", 1)
            ),
            num(&case["nova_over_naive"]["first_output"], 2),
            format!(
                "{} / {}",
                e("nova", "final_ms", 1),
                e("naive", "final_ms", 1)
            ),
            num(&case["nova_over_naive"]["final"], 2),
            format!(
                "{} / {} {}",
                e("nova", "throughput", 2),
                e("naive", "throughput", 2),
                case["unit"].as_str().unwrap_or("")
            ),
            format!(
                "{} ({} chunks){}{}",
                e("nova", "partial_outputs", 0),
                e("nova", "chunks", 0),
                failed("nova"),
                failed("naive")
            ),
            quality_text(&case["quality"]),
        ]);
        if case["profile"] == r["suite"][0]["profile"] {
            labels.push(case["case"].as_str().unwrap_or("").to_string());
            nova_ttfo.push(ex["nova"]["first_output_ms"].as_f64().unwrap_or(f64::NAN));
            naive_ttfo.push(ex["naive"]["first_output_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    table(
        &mut md,
        &[
            "case",
            "workload",
            "first output ms (NOVA / naive)",
            "ratio",
            "final ms (NOVA / naive)",
            "ratio",
            "throughput (NOVA / naive)",
            "NOVA partial outputs",
            "quality vs whole",
        ],
        &rows,
    );
    if !labels.is_empty() {
        let p = c.out.join("first_output.svg");
        bars(
            &p,
            &format!(
                "Time to first output ({})",
                r["suite"][0]["profile"].as_str().unwrap_or("")
            ),
            "ms",
            &labels,
            &[("NOVA", nova_ttfo), ("naive", naive_ttfo)],
        )?;
        let _ = writeln!(md, "![time to first output](first_output.svg)\n");
        written.push(p);
    }

    // Start-up.
    let st = &r["startup"];
    let _ = writeln!(md, "## Start-up\n");
    let stages: Vec<String> = st["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{} at {} ms",
                s["stage"].as_str().unwrap_or("?"),
                num(&s["at_ms"], 1)
            )
        })
        .collect();
    table(
        &mut md,
        &[
            "spawn → first /system_stats",
            "spawn → stage `ready`",
            "spawn → `nova --version` exits",
            "stages (last run, service clock)",
        ],
        &[vec![
            format!("{} ms", num(&st["ui_ready_ms"], 1)),
            format!("{} ms", num(&st["stages_done_ms"], 1)),
            format!("{} ms", num(&st["process_baseline_ms"], 1)),
            stages.join(", "),
        ]],
    );

    // Model switches.
    let s = &r["model_switch"];
    let _ = writeln!(md, "## Model switches\n");
    let _ = writeln!(
        md,
        "Jobs alternating between Real-ESRGAN and TAESD, each job switching model; the figure \
         is the load + transfer time until the weights are ready (the run's timing split), \
         median over {} switches each. Warm: NOVA with its host cache (`CPU_HOT`); cold: NOVA \
         with `NOVA_MAX_CACHE_SIZE_GB=0` (assets stay `CPU_MMAP`); naive: every asset released \
         before each job (re-opened and re-read). Each in its own process, alternated.\n",
        s["samples"][0]
    );
    table(
        &mut md,
        &["", "warm (CPU_HOT)", "cold (CPU_MMAP)", "naive (re-read)"],
        &[
            vec![
                "switch to ready".into(),
                format!("{} ms", num(&s["warm_ms"], 2)),
                format!("{} ms", num(&s["cold_ms"], 2)),
                format!("{} ms", num(&s["naive_ms"], 2)),
            ],
            vec![
                "whole job".into(),
                format!("{} ms", num(&s["warm_job_ms"], 1)),
                format!("{} ms", num(&s["cold_job_ms"], 1)),
                format!("{} ms", num(&s["naive_job_ms"], 1)),
            ],
        ],
    );
    if let Some(errs) = s["errors"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(md, "Errors: {errs:?}\n");
    }
    let p = c.out.join("model_switch.svg");
    bars(
        &p,
        "Model switch to ready",
        "ms",
        &["switch".to_string()],
        &[
            ("NOVA warm", vec![s["warm_ms"].as_f64().unwrap_or(f64::NAN)]),
            ("NOVA cold", vec![s["cold_ms"].as_f64().unwrap_or(f64::NAN)]),
            ("naive", vec![s["naive_ms"].as_f64().unwrap_or(f64::NAN)]),
        ],
    )?;
    let _ = writeln!(md, "![model switch](model_switch.svg)\n");
    written.push(p);

    // OOM.
    let o = &r["oom"];
    let _ = writeln!(md, "## Out-of-memory incidence\n");
    let _ = writeln!(
        md,
        "Decided by the plans over {} workflows (sharpen/scale/blur chain 1024×768 to 7680×4320, \
         Real-ESRGAN x4 256×256 to 1920×1080, TAESD decode 512² to 2048²): a job is an OOM for \
         the naive executor when its whole-tensor forecast (+5%) exceeds the profile's budget \
         minus headroom; NOVA refuses a job up front only when its most frugal plan does not \
         fit.\n",
        o["by_profile"][0]["workflows"]
    );
    let mut rows = Vec::new();
    let (mut labels, mut a, mut b) = (vec![], vec![], vec![]);
    for p in o["by_profile"].as_array().into_iter().flatten() {
        rows.push(vec![
            p["profile"].as_str().unwrap_or("").to_string(),
            format!(
                "{:.2} GiB",
                p["limit_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64
            ),
            format!("{}/{}", p["naive_oom"], p["workflows"]),
            format!("{}/{}", p["nova_refused"], p["workflows"]),
        ]);
        labels.push(p["profile"].as_str().unwrap_or("").to_string());
        a.push(p["naive_oom"].as_f64().unwrap_or(f64::NAN));
        b.push(p["nova_refused"].as_f64().unwrap_or(f64::NAN));
    }
    table(
        &mut md,
        &["profile", "limit", "naive OOM", "NOVA refused"],
        &rows,
    );
    let rr = &o["real_runs"];
    let _ = writeln!(
        md,
        "Real runs under budgets of 90/70/50% of the whole-tensor peak (chain 768×576, upscale \
         96×72, 2 workers, simulated device): naive failed {}/{}, NOVA failed {}/{}.\n",
        rr["naive_failed"], rr["runs"], rr["nova_failed"], rr["runs"]
    );
    let p = c.out.join("oom.svg");
    bars(
        &p,
        "Jobs out of memory / refused",
        "jobs",
        &labels,
        &[("naive OOM", a), ("NOVA refused", b)],
    )?;
    let _ = writeln!(md, "![OOM incidence](oom.svg)\n");
    written.push(p);

    // Overhead.
    let ov = &r["engine_overhead"];
    let _ = writeln!(md, "## Engine overhead\n");
    let _ = writeln!(
        md,
        "{}: dataflow {} ms, plain loop over the same tiles {} ms (medians of {} alternated \
         rounds); median per-round ratio {}, i.e. {} µs per record.\n",
        ov["workload"].as_str().unwrap_or(""),
        num(&ov["dataflow_ms"], 2),
        num(&ov["plain_loop_ms"], 2),
        ov["rounds"],
        num(&ov["ratio"], 3),
        num(&ov["overhead_per_record_us"], 1),
    );

    let _ = writeln!(
        md,
        "Dataflow: CPU {} ms, {} minor faults per job; plain loop: CPU {} ms, {} minor faults.\n",
        num(&ov["dataflow"]["cpu_ms"], 2),
        num(&ov["dataflow"]["minor_faults"], 0),
        num(&ov["plain_loop"]["cpu_ms"], 2),
        num(&ov["plain_loop"]["minor_faults"], 0),
    );

    // Job start.
    let js = &r["job_start"];
    let _ = writeln!(
        md,
        "## Job start on the long-lived runtime
"
    );
    let _ = writeln!(
        md,
        "{}: on the process's runtime {} ms (CPU {} ms, {} minor faults), on a runtime started \
         for the job {} ms (CPU {} ms, {} minor faults); median per-round ratio {} ({} \
         alternated rounds).\n",
        js["workload"].as_str().unwrap_or(""),
        num(&js["long_lived"]["wall_ms"], 2),
        num(&js["long_lived"]["cpu_ms"], 2),
        num(&js["long_lived"]["minor_faults"], 0),
        num(&js["fresh_runtime"]["wall_ms"], 2),
        num(&js["fresh_runtime"]["cpu_ms"], 2),
        num(&js["fresh_runtime"]["minor_faults"], 0),
        num(&js["ratio"], 3),
        js["rounds"],
    );

    // Announcement delays.
    let _ = writeln!(
        md,
        "## From a frontier passing to its announcement\n\nPer partial output: from the moment \
         the frontier could pass it (it and every earlier piece of its node finished) to the \
         driver announcing it.\n"
    );
    let mut rows = Vec::new();
    for c in r["suite"].as_array().into_iter().flatten() {
        let d = &c["executors"]["nova"]["announce_delay_ms"];
        if d["announced"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        rows.push(vec![
            format!(
                "{} ({})",
                c["case"].as_str().unwrap_or(""),
                c["profile"].as_str().unwrap_or("")
            ),
            d["announced"].to_string(),
            num(&d["p50"], 2),
            num(&d["p95"], 2),
            num(&d["max"], 2),
        ]);
    }
    table(
        &mut md,
        &["case", "partial outputs", "p50 ms", "p95 ms", "max ms"],
        &rows,
    );
    let _ = writeln!(md);

    // Peers.
    let pe = &r["peers"];
    let _ = writeln!(md, "## Peers\n");
    let mut rows = Vec::new();
    for k in ["ffmpeg_video", "sox_audio"] {
        let v = &pe[k];
        if let Some(s) = v["skipped"].as_str() {
            rows.push(vec![
                k.into(),
                format!("skipped: {s}"),
                "".into(),
                "".into(),
                "".into(),
            ]);
        } else {
            rows.push(vec![
                v["what"].as_str().unwrap_or("").into(),
                format!(
                    "{} {}/s",
                    num(&v["nova_per_s"], 1),
                    v["unit"].as_str().unwrap_or("")
                ),
                v["peer"].as_str().unwrap_or("").into(),
                format!(
                    "{} {}/s",
                    num(&v["peer_per_s"], 1),
                    v["unit"].as_str().unwrap_or("")
                ),
                num(&v["nova_over_peer_throughput"], 2),
            ]);
        }
    }
    let t = &pe["pytorch_taesd"];
    if let Some(s) = t["skipped"].as_str() {
        rows.push(vec![
            "TAESD decode/encode 512×512".into(),
            format!("skipped: {s}"),
            "PyTorch".into(),
            "".into(),
            "".into(),
        ]);
    } else {
        rows.push(vec![
            "TAESD decode 64×64 latent → 512×512".into(),
            format!("{} s", num(&t["decode_nova_s"], 3)),
            format!("PyTorch {}", t["torch"].as_str().unwrap_or("")),
            format!("{} s", num(&t["decode_torch_s"], 3)),
            format!("{} (time)", num(&t["decode_ratio"], 2)),
        ]);
        rows.push(vec![
            "TAESD encode 512×512 → 64×64 latent".into(),
            format!("{} s", num(&t["encode_nova_s"], 3)),
            format!("PyTorch {}", t["torch"].as_str().unwrap_or("")),
            format!("{} s", num(&t["encode_torch_s"], 3)),
            format!("{} (time)", num(&t["encode_ratio"], 2)),
        ]);
    }
    table(
        &mut md,
        &["workload", "NOVA", "peer", "peer figure", "NOVA / peer"],
        &rows,
    );
    let md_path = c.out.join("report.md");
    std::fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    written.push(md_path);
    Ok(written)
}
