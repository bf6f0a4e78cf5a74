//! The harness's sections, each returning its figures as JSON (see `report.rs` for how they
//! are shown).

use super::quality;
use super::suite::{self, Case, JobRun, OutputKind, Unit, Workspace};
use super::Config;
use crate::executor::Executor;
use nova_dataflow::ProfileId;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The median (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn log(msg: impl AsRef<str>) {
    eprintln!("kpi: {}", msg.as_ref());
}

/// Every section, in order.
pub fn run_all(c: &Config) -> Result<Value, String> {
    let started = Instant::now();
    let q = c.quick;
    let (image, steps, sd, clip_s, wav_s) = if q {
        ((1024, 768), 10, 64, 2, 30)
    } else {
        ((2048, 1536), 20, 128, 4, 300)
    };
    log("preparing the workspace (models, generated inputs)");
    let ws = Workspace::new(image, clip_s, wav_s)?;
    let rounds = if q { 3 } else { 5 };
    let profiles: Vec<ProfileId> = if q {
        vec![ProfileId::Pascal2G]
    } else {
        vec![
            ProfileId::Pascal2G,
            ProfileId::Pascal4G,
            ProfileId::RtxModern,
        ]
    };
    log("start-up: time to UI-ready");
    let startup = startup(&ws, if q { 5 } else { 15 });
    let cases = suite::cases(image, steps, sd, clip_s, wav_s);
    let mut suite_out = Vec::new();
    for p in &profiles {
        for case in &cases {
            log(format!("suite: {} under {p}", case.id));
            suite_out.push(run_case(&ws, case, *p, &c.executors, rounds));
        }
    }
    log("model switches: cold, warm, naive");
    let switch = switch(if q { 2 } else { 4 }, if q { 3 } else { 5 });
    log("OOM incidence: planner vs naive");
    let oom = oom(&ws);
    log("engine overhead per record");
    let overhead = overhead(if q { 21 } else { 51 });
    log("job start: long-lived runtime vs a runtime per job");
    let job_start = job_start(if q { 21 } else { 51 });
    log("peers: ffmpeg, sox, PyTorch");
    let peers = peers(q);
    Ok(json!({
        "machine": machine(),
        "command": format!("cargo run -p nova-benches --release -- kpi{}", if q { " --quick" } else { "" }),
        "quick": q,
        "rounds": rounds,
        "executors": c.executors.iter().map(|e| e.name()).collect::<Vec<_>>(),
        "startup": startup,
        "suite": suite_out,
        "model_switch": switch,
        "oom": oom,
        "engine_overhead": overhead,
        "job_start": job_start,
        "peers": peers,
        "harness_wall_s": started.elapsed().as_secs_f64(),
    }))
}

/// What machine this is.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let detected = nova_dataflow::profile::detect();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": mem_kb as f64 / (1u64 << 20) as f64,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "device": "cpu (GPU budgets simulated by the accountant)",
        "detected_profile": detected.profile.name(),
        "date": date,
        "commit": commit,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

// ---------------------------------------------------------------- start-up

/// One blocking HTTP/1.1 GET; the status and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((code, body))
}

/// Starts the service in a child (this program re-run as `nova`), times its first
/// `/system_stats` answer and its `ready` stage, against starting `nova --version`.
fn startup(ws: &Workspace, rounds: usize) -> Value {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return json!({"error": format!("own executable: {e}")}),
    };
    let (mut ready, mut stages_done, mut proc_ms) = (vec![], vec![], vec![]);
    let mut stages = Value::Null;
    let mut error = None;
    for i in 0..rounds {
        let data = ws.root.join(format!("serve{i}"));
        let _ = copy_dir(&ws.root.join("models"), &data.join("models"));
        let t = Instant::now();
        let child = Command::new(&exe)
            .args(["__nova", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                error = Some(format!("spawning the service: {e}"));
                break;
            }
        };
        let Some(stderr) = child.stderr.take() else {
            break;
        };
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        break Some(rest.split_whitespace().next().unwrap_or("").to_string());
                    }
                }
                _ => break None,
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let Some(addr) = addr else {
            error = Some("the service exited before listening".into());
            let _ = child.kill();
            break;
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut first = None;
        while Instant::now() < deadline {
            if let Some((200, body)) = http_get(&addr, "/system_stats") {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                first.get_or_insert(ms);
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if v["nova"]["stage"] == "ready" {
                    stages_done.push(ms);
                    stages = v["nova"]["stages"].clone();
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let _ = child.wait();
        match first {
            Some(ms) => ready.push(ms),
            None => {
                error = Some("no /system_stats answer within 20 s".into());
                break;
            }
        }
        let t = Instant::now();
        let ok = Command::new(&exe)
            .args(["__nova", "--version"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            proc_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    json!({
        "rounds": ready.len(),
        "ui_ready_ms": median(&ready),
        "stages_done_ms": median(&stages_done),
        "process_baseline_ms": median(&proc_ms),
        "ratio_to_baseline": median(&ready) / median(&proc_ms),
        "stages": stages,
        "target_ms": 100.0,
        "error": error,
    })
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- the suite

fn job_json(r: &JobRun) -> Value {
    json!({
        "error": r.error,
        "oom": r.oom,
        "refused": r.refused,
        "first_output_ms": r.first_output_ms,
        "final_ms": r.final_ms,
        "partial_outputs": r.partials,
        "chunks": r.chunks,
        "sampler_ms": r.sampler_ms,
        "load_ms": r.load_ms,
        "transfer_ms": r.transfer_ms,
        "tracked_peak_bytes": r.tracked_peak_bytes,
        "forecast_peak_bytes": r.forecast_peak_bytes,
    })
}

/// One case under one profile: warm-up, then `rounds` alternated rounds of each executor.
fn run_case(
    ws: &Workspace,
    case: &Case,
    profile: ProfileId,
    executors: &[Executor],
    rounds: usize,
) -> Value {
    let workers = nova_dataflow::exec::default_workers();
    let text = |e: Executor| match e {
        Executor::Nova => &case.nova,
        Executor::Naive => &case.naive,
    };
    // Warm-up: page cache, allocator, code paths touched once.
    for &e in executors {
        let _ = suite::run_job(ws, text(e), e, profile, None, workers);
    }
    let mut runs: Vec<Vec<JobRun>> = executors.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 {
            (0..executors.len()).collect()
        } else {
            (0..executors.len()).rev().collect()
        };
        for i in order {
            let e = executors[i];
            runs[i].push(suite::run_job(ws, text(e), e, profile, None, workers));
        }
    }
    let mut per = serde_json::Map::new();
    for (i, e) in executors.iter().enumerate() {
        let rs = &runs[i];
        let ok: Vec<&JobRun> = rs.iter().filter(|r| r.error.is_none()).collect();
        let first: Vec<f64> = ok.iter().filter_map(|r| r.first_output_ms).collect();
        let fin: Vec<f64> = ok.iter().map(|r| r.final_ms).collect();
        let work_s: Vec<f64> = ok
            .iter()
            .map(|r| match case.unit {
                Unit::Steps => r.sampler_ms.unwrap_or(r.final_ms) / 1e3,
                _ => r.final_ms / 1e3,
            })
            .collect();
        let chunks = ok.first().map(|r| r.chunks).unwrap_or(0);
        let mut delays: Vec<f64> = ok
            .iter()
            .flat_map(|r| r.announce_delays_ms.iter().copied())
            .collect();
        delays.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| -> f64 {
            if delays.is_empty() {
                f64::NAN
            } else {
                delays[((delays.len() - 1) as f64 * q).round() as usize]
            }
        };
        per.insert(
            e.name().into(),
            json!({
                "completed": ok.len(),
                "failed": rs.len() - ok.len(),
                "errors": rs.iter().filter_map(|r| r.error.clone()).collect::<std::collections::BTreeSet<_>>(),
                "first_output_ms": median(&first),
                "final_ms": median(&fin),
                "throughput": case.units / median(&work_s),
                "tiles_per_s": if chunks > 0 { chunks as f64 / (median(&fin) / 1e3) } else { f64::NAN },
                "partial_outputs": ok.first().map(|r| r.partials).unwrap_or(0),
                "announce_delay_ms": json!({
                    "announced": delays.len(),
                    "p50": pct(0.5),
                    "p95": pct(0.95),
                    "max": pct(1.0),
                }),
                "chunks": chunks,
                "tracked_peak_bytes": ok.iter().map(|r| r.tracked_peak_bytes).max().unwrap_or(0),
                "forecast_peak_bytes": rs.first().map(|r| r.forecast_peak_bytes).unwrap_or(0),
                "rounds": rs.iter().map(job_json).collect::<Vec<_>>(),
            }),
        );
    }
    // Ratios within the run: NOVA over naive, per round then the median.
    let mut ratios = json!(null);
    let mut quality = json!(null);
    if executors.len() == 2 {
        let pair = |f: &dyn Fn(&JobRun) -> Option<f64>| -> f64 {
            let v: Vec<f64> = runs[0]
                .iter()
                .zip(&runs[1])
                .filter_map(|(a, b)| Some(f(a)? / f(b)?))
                .collect();
            median(&v)
        };
        let ok = |r: &JobRun| r.error.is_none();
        ratios = json!({
            "first_output": pair(&|r| ok(r).then_some(r.first_output_ms).flatten()),
            "final": pair(&|r| ok(r).then_some(r.final_ms)),
        });
        let (a, b) = (runs[0].last(), runs[1].last());
        if let (Some(a), Some(b)) = (a, b) {
            quality = match compare(case.output, &b.outputs, &a.outputs) {
                Ok(q) => q,
                Err(e) => json!({"error": e}),
            };
        }
    }
    json!({
        "case": case.id,
        "what": case.what,
        "profile": profile.name(),
        "unit": case.unit.name(),
        "executors": per,
        "nova_over_naive": ratios,
        "quality": quality,
    })
}

/// Quality of `test`'s outputs against `reference`'s (the whole output).
pub fn compare(kind: OutputKind, reference: &[PathBuf], test: &[PathBuf]) -> Result<Value, String> {
    let (Some(r), Some(t)) = (reference.first(), test.first()) else {
        return Err("an executor wrote no output".into());
    };
    match kind {
        OutputKind::Png => {
            let a = image::open(r)
                .map_err(|e| format!("{}: {e}", r.display()))?
                .to_rgb8();
            let b = image::open(t)
                .map_err(|e| format!("{}: {e}", t.display()))?
                .to_rgb8();
            let (w, h) = a.dimensions();
            Ok(json!({
                "psnr_db": quality::psnr(a.as_raw(), b.as_raw())?,
                "ssim": quality::ssim(a.as_raw(), b.as_raw(), w as usize, h as usize)?,
                "identical": a.as_raw() == b.as_raw(),
            }))
        }
        OutputKind::Video => {
            let read = |p: &Path| -> Result<Vec<nova_media::video::Frame>, String> {
                let mut rd = nova_media::video::VideoReader::open(p).map_err(|e| e.to_string())?;
                let mut v = Vec::new();
                while let Some(f) = rd.next_frame().map_err(|e| e.to_string())? {
                    v.push(f);
                }
                Ok(v)
            };
            let (a, b) = (read(r)?, read(t)?);
            if a.len() != b.len() {
                return Err(format!("frame counts differ: {} vs {}", a.len(), b.len()));
            }
            let (mut ps, mut ss, mut identical) = (Vec::new(), Vec::new(), true);
            for (x, y) in a.iter().zip(&b) {
                identical &= x.rgb == y.rgb;
                if let Some(p) = quality::psnr(&x.rgb, &y.rgb)? {
                    ps.push(p);
                }
                ss.push(quality::ssim(
                    &x.rgb,
                    &y.rgb,
                    x.width as usize,
                    x.height as usize,
                )?);
            }
            Ok(json!({
                "frames": a.len(),
                "psnr_db": if ps.is_empty() { None } else { Some(ps.iter().cloned().fold(f64::INFINITY, f64::min)) },
                "ssim": ss.iter().cloned().fold(1.0, f64::min),
                "identical": identical,
                "note": "worst frame",
            }))
        }
        OutputKind::Wav => {
            let read = |p: &Path| -> Result<Vec<f32>, String> {
                let mut rd =
                    hound::WavReader::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
                rd.samples::<f32>()
                    .collect::<Result<Vec<f32>, _>>()
                    .map_err(|e| format!("{}: {e}", p.display()))
            };
            let (a, b) = (read(r)?, read(t)?);
            Ok(json!({
                "snr_db": quality::snr(&a, &b)?,
                "samples": a.len(),
                "identical": a == b,
            }))
        }
    }
}

// ---------------------------------------------------------------- model switches

/// The switch child: jobs alternating between two models (Real-ESRGAN and TAESD), `rounds`
/// switches each way after a first touch of both; prints the load + transfer time of each
/// switch as JSON. Run with `NOVA_MAX_CACHE_SIZE_GB=0` the assets stay `CPU_MMAP` between
/// jobs (cold); with the default cache they are `CPU_HOT` (warm).
pub fn switch_child(args: &[String]) -> ExitCode {
    let executor = match args.first().map(|s| Executor::parse(s)) {
        Some(Ok(e)) => e,
        _ => {
            eprintln!("usage: nova-benches __switch nova|naive ROUNDS");
            return ExitCode::from(2);
        }
    };
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let ws = match Workspace::new((64, 64), 1, 1) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let a = r#"{
  "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 3368652}},
  "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "realesr-animevideov3.safetensors"}},
  "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
  "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
}"#;
    let b = r#"{
  "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
  "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
  "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
  "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
}"#;
    let mut switch_ms = Vec::new();
    let mut job_ms = Vec::new();
    let mut error = None;
    for i in 0..(rounds * 2 + 2) {
        let text = if i % 2 == 0 { a } else { b };
        let r = suite::run_job(&ws, text, executor, ProfileId::Pascal2G, None, 1);
        if let Some(e) = r.error {
            error = Some(e);
            break;
        }
        if i >= 2 {
            switch_ms.push(r.load_ms + r.transfer_ms);
            job_ms.push(r.final_ms);
        }
    }
    println!(
        "{}",
        json!({"switch_ms": switch_ms, "job_ms": job_ms, "error": error,
               "states": nova_dataflow::Registry::global().status().iter().map(|s| json!({"asset": s.name, "state": s.state})).collect::<Vec<_>>()})
    );
    ExitCode::SUCCESS
}

/// Switch latency: NOVA warm (host cache), NOVA cold (mapped only), naive (released and
/// re-read every job); children alternated `outer` times, `inner` switches each.
fn switch(outer: usize, inner: usize) -> Value {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return json!({"error": format!("own executable: {e}")}),
    };
    let variants: [(&str, &str, Option<&str>); 3] = [
        ("warm", "nova", None),
        ("cold", "nova", Some("0")),
        ("naive", "naive", None),
    ];
    let mut samples: Vec<(Vec<f64>, Vec<f64>, Value)> = variants
        .iter()
        .map(|_| (vec![], vec![], Value::Null))
        .collect();
    let mut errors = Vec::new();
    for round in 0..outer {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            let (name, exec, cache) = variants[i];
            let mut cmd = Command::new(&exe);
            cmd.args(["__switch", exec, &inner.to_string()]);
            match cache {
                Some(c) => cmd.env("NOVA_MAX_CACHE_SIZE_GB", c),
                None => cmd.env_remove("NOVA_MAX_CACHE_SIZE_GB"),
            };
            let out = cmd.stderr(Stdio::null()).output();
            let v: Value = match out {
                Ok(o) if o.status.success() => {
                    serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
                }
                Ok(o) => {
                    errors.push(format!("{name}: exit {:?}", o.status.code()));
                    continue;
                }
                Err(e) => {
                    errors.push(format!("{name}: {e}"));
                    continue;
                }
            };
            if let Some(e) = v["error"].as_str() {
                errors.push(format!("{name}: {e}"));
            }
            let nums = |k: &str| -> Vec<f64> {
                v[k].as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default()
            };
            samples[i].0.extend(nums("switch_ms"));
            samples[i].1.extend(nums("job_ms"));
            samples[i].2 = v["states"].clone();
        }
    }
    let m = |i: usize| median(&samples[i].0);
    json!({
        "warm_ms": m(0), "cold_ms": m(1), "naive_ms": m(2),
        "warm_job_ms": median(&samples[0].1), "cold_job_ms": median(&samples[1].1), "naive_job_ms": median(&samples[2].1),
        "samples": samples.iter().map(|s| s.0.len()).collect::<Vec<_>>(),
        "warm_over_naive": m(0) / m(2),
        "cold_over_naive": m(1) / m(2),
        "states_after": {"warm": samples[0].2, "cold": samples[1].2, "naive": samples[2].2},
        "target_warm_over_naive": 0.8,
        "errors": errors,
    })
}

// ---------------------------------------------------------------- OOM incidence

/// Plan-decided incidence over a large suite and every GPU profile, and real runs of both
/// executors under budgets cut from the whole-tensor peak.
fn oom(ws: &Workspace) -> Value {
    let registry = nova_operators::registry();
    let env = ws.env(nova_dataflow::PreviewMethod::None);
    let mut texts: Vec<(String, String)> = Vec::new();
    for (w, h) in [(1024, 768), (2048, 1536), (3840, 2160), (7680, 4320)] {
        texts.push((
            format!("chain {w}x{h}"),
            crate::memory::chain(w, h)
                .text
                .replace("BenchDiscard", "PreviewImage"),
        ));
    }
    for (w, h) in [(256, 256), (512, 512), (1024, 768), (1920, 1080)] {
        texts.push((
            format!("upscale x4 {w}x{h}"),
            crate::memory::upscale(w, h)
                .text
                .replace("BenchDiscard", "PreviewImage"),
        ));
    }
    for s in [512, 1024, 2048] {
        texts.push((format!("TAESD decode {s}x{s}"), format!(r#"{{
  "1": {{"class_type": "EmptyLatentImage", "inputs": {{"width": {s}, "height": {s}, "batch_size": 1}}}},
  "2": {{"class_type": "VAELoader", "inputs": {{"vae_name": "taesd"}}}},
  "3": {{"class_type": "VAEDecode", "inputs": {{"samples": ["1", 0], "vae": ["2", 0]}}}},
  "4": {{"class_type": "PreviewImage", "inputs": {{"images": ["3", 0]}}}}
}}"#)));
    }
    let mut profiles = Vec::new();
    for p in [
        ProfileId::Pascal2G,
        ProfileId::Pascal4G,
        ProfileId::Pascal6G8G,
        ProfileId::RtxModern,
    ] {
        let spec = p.spec();
        let Some(budget) = spec.device_memory else {
            continue;
        };
        let limit = budget.saturating_sub(spec.headroom);
        let (mut naive_oom, mut refused, mut total) = (0, 0, 0);
        let mut rows = Vec::new();
        for (name, text) in &texts {
            let wf = match nova_dataflow::workflow::load(text, &registry, &env) {
                Ok(w) => w,
                Err(e) => {
                    rows.push(json!({"workflow": name, "error": e.to_string()}));
                    continue;
                }
            };
            let plan = |e: Executor| nova_dataflow::plan(&wf, &env, &e.options(p, Some(limit), 2));
            match (plan(Executor::Naive), plan(Executor::Nova)) {
                (Ok(a), Ok(b)) => {
                    total += 1;
                    naive_oom += usize::from(!a.fits);
                    refused += usize::from(!b.fits);
                    rows.push(json!({"workflow": name, "naive_fits": a.fits, "nova_fits": b.fits,
                        "naive_peak_bytes": a.forecast_peak_bytes, "nova_peak_bytes": b.forecast_peak_bytes}));
                }
                (a, b) => rows.push(
                    json!({"workflow": name, "error": format!("{:?} / {:?}", a.err(), b.err())}),
                ),
            }
        }
        profiles.push(json!({
            "profile": p.name(), "limit_bytes": limit.0, "workflows": total,
            "naive_oom": naive_oom, "nova_refused": refused,
            "reduction": if naive_oom > 0 { 1.0 - refused as f64 / naive_oom as f64 } else { f64::NAN },
            "rows": rows,
        }));
    }
    // Real runs under budgets cut from the whole-tensor peak (simulated device, 2 workers).
    let mut real = Vec::new();
    let (mut naive_failed, mut nova_failed, mut total) = (0, 0, 0);
    let small = [
        ("chain 768x576", crate::memory::chain(768, 576).text),
        ("upscale x4 96x72", crate::memory::upscale(96, 72).text),
    ];
    for (name, text) in small {
        let text = text.replace("BenchDiscard", "PreviewImage");
        let Ok(wf) = nova_dataflow::workflow::load(&text, &registry, &env) else {
            continue;
        };
        let Ok(whole) = nova_dataflow::plan(
            &wf,
            &env,
            &Executor::Naive.options(ProfileId::CpuSafe, None, 2),
        ) else {
            continue;
        };
        for fraction in [0.9, 0.7, 0.5] {
            let limit = (whole.forecast_peak_bytes as f64 * fraction) as u64;
            let a = suite::run_job(
                ws,
                &text,
                Executor::Naive,
                ProfileId::CpuSafe,
                Some(limit),
                2,
            );
            let b = suite::run_job(
                ws,
                &text,
                Executor::Nova,
                ProfileId::CpuSafe,
                Some(limit),
                2,
            );
            total += 1;
            naive_failed += usize::from(a.error.is_some());
            nova_failed += usize::from(b.error.is_some());
            real.push(json!({
                "workflow": name, "budget_bytes": limit, "fraction_of_whole": fraction,
                "naive": {"error": a.error, "oom": a.oom},
                "nova": {"error": b.error, "tracked_peak_bytes": b.tracked_peak_bytes, "forecast_peak_bytes": b.forecast_peak_bytes},
            }));
        }
    }
    json!({
        "by_profile": profiles,
        "real_runs": {"runs": total, "naive_failed": naive_failed, "nova_failed": nova_failed, "rows": real},
        "target_reduction": 0.4,
    })
}

// ---------------------------------------------------------------- engine overhead

/// Alternates `a` and `b` for `rounds` rounds (order swapped each round); the medians of
/// wall time, CPU time and minor faults of each, and the median of per-round wall ratios.
fn ab(rounds: usize, a: &dyn Fn(), b: &dyn Fn()) -> (Value, Value, f64) {
    use crate::usage::{measure, Usage};
    let (mut ua, mut ub, mut ratios): (Vec<Usage>, Vec<Usage>, Vec<f64>) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        let (x, y) = if r % 2 == 0 {
            let x = measure(a).1;
            (x, measure(b).1)
        } else {
            let y = measure(b).1;
            (measure(a).1, y)
        };
        ratios.push(x.wall_ms / y.wall_ms);
        ua.push(x);
        ub.push(y);
    }
    let sum = |u: &[Usage]| {
        json!({
            "wall_ms": median(&u.iter().map(|x| x.wall_ms).collect::<Vec<_>>()),
            "cpu_ms": median(&u.iter().map(|x| x.cpu_ms).collect::<Vec<_>>()),
            "minor_faults": median(&u.iter().map(|x| x.minor_faults as f64).collect::<Vec<_>>()),
        })
    };
    (sum(&ua), sum(&ub), median(&ratios))
}

/// A pipeline region through the dataflow against a plain loop over the same pieces.
fn overhead(rounds: usize) -> Value {
    let s = crate::overhead::Setup::new(1024, 256);
    let records = s.records();
    s.run_dataflow();
    std::hint::black_box(s.run_plain_loop());
    let (a, b, ratio) = ab(rounds, &|| s.run_dataflow(), &|| {
        std::hint::black_box(s.run_plain_loop());
    });
    let (ma, mb) = (
        a["wall_ms"].as_f64().unwrap_or(0.0),
        b["wall_ms"].as_f64().unwrap_or(0.0),
    );
    json!({
        "workload": "1024x1024 generated image, blurred (radius 2) and inverted: one pipeline region of sixteen 256x256 pieces through two stages, one compute worker",
        "records": records,
        "dataflow_ms": ma,
        "plain_loop_ms": mb,
        "dataflow": a,
        "plain_loop": b,
        "ratio": ratio,
        "overhead_per_record_us": (ma - mb) * 1e3 / records as f64,
        "target_ratio": 1.05,
        "rounds": rounds,
    })
}

/// Starting a small job on the process's long-lived runtime against starting timely's
/// workers for it alone (as every job did before).
fn job_start(rounds: usize) -> Value {
    let s = crate::overhead::Setup::new(64, 32);
    s.run_dataflow();
    s.run_dataflow_fresh();
    let (a, b, ratio) = ab(rounds, &|| s.run_dataflow(), &|| s.run_dataflow_fresh());
    json!({
        "workload": "a 64x64 image through a 4-piece region, one compute worker",
        "long_lived": a,
        "fresh_runtime": b,
        "ratio": ratio,
        "rounds": rounds,
    })
}

// ---------------------------------------------------------------- peers

fn peers(quick: bool) -> Value {
    let cmp = |c: Result<crate::media::Comparison, String>| match c {
        Ok(c) => json!({
            "what": c.what, "peer": c.peer, "unit": c.unit,
            "nova_median_s": crate::media::median(c.nova_s.clone()),
            "peer_median_s": crate::media::median(c.peer_s.clone()),
            "nova_per_s": c.units / crate::media::median(c.nova_s.clone()),
            "peer_per_s": c.units / crate::media::median(c.peer_s.clone()),
            "nova_over_peer_throughput": c.ratio(),
            "rounds": c.nova_s.len(),
        }),
        Err(e) => json!({"skipped": e}),
    };
    let (clip, wav, rounds) = if quick { (1, 60, 3) } else { (4, 600, 5) };
    let video = cmp(crate::media::video(clip, rounds));
    let audio = cmp(crate::media::audio(wav, rounds));
    let torch = match crate::models::pytorch_figures(if quick { 3 } else { 7 }) {
        Ok(f) => json!({
            "torch": f.torch, "threads": f.threads,
            "decode_nova_s": f.nova_decode_s, "decode_torch_s": f.torch_decode_s,
            "encode_nova_s": f.nova_encode_s, "encode_torch_s": f.torch_encode_s,
            "decode_ratio": f.nova_decode_s / f.torch_decode_s,
            "encode_ratio": f.nova_encode_s / f.torch_encode_s,
        }),
        Err(e) => {
            log(format!("PyTorch peer skipped: {e}"));
            json!({"skipped": e})
        }
    };
    json!({"ffmpeg_video": video, "sox_audio": audio, "pytorch_taesd": torch})
}
