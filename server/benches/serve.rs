//! `nova serve` benchmarks, each against a baseline measured in the same run:
//!
//! 1. **Start-up**: from spawning `nova serve` to its first answer of `GET /system_stats`
//!    (goal: under 100 ms), against spawning `nova --version` to its exit (the cost of
//!    starting the process at all).
//! 2. **`/prompt` acceptance under load**: 100 concurrent clients, each on its own connection,
//!    each submitting prompts back to back; latency per submission (validation, planning and
//!    the durable commit; goal: p99 under 10 ms), with the queue held (the API path alone)
//!    and with it draining (jobs running on the same cores), against the same clients
//!    calling `GET /prompt` (routing and JSON only).
//!
//! 3. **Fan-out to slow clients**: the same tile-heavy jobs (a 1024x1024 image inverted in
//!    32 px tiles, every tile announced as a frame) run back to back with one WebSocket
//!    client reading everything, and with that client plus 199 more of the same viewer that
//!    negotiate everything and never read; alternated round by round, each round on a fresh
//!    service. Reported: jobs per second, and the service's CPU time and minor page faults
//!    per job, with the ratio of the two setups (goal: fan-out costs the engine nothing per
//!    slow client, a ratio near 1).
//!
//! Run: `cargo bench -p nova-server --bench serve` (a release build); a filter argument
//! (`startup`, `prompt`, `fanout`) runs one part. `NOVA_BENCH_ROUNDS` sets the submissions
//! per client (default 20), `NOVA_BENCH_CLIENTS` the clients (default 100).

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `nova` binary this bench built, or `NOVA_BENCH_BIN` (another build to compare).
fn nova() -> Command {
    Command::new(
        std::env::var_os("NOVA_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_nova").into()),
    )
}

/// Spawns `nova serve` and waits for its address.
fn start(data: &std::path::Path) -> (std::process::Child, String, Instant) {
    let t = Instant::now();
    let mut child = nova()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning nova serve");
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("nova serve printed its address")
            .expect("readable stderr");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap_or("").to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (child, addr, t)
}

/// One blocking HTTP/1.1 GET on a fresh connection; returns the status code.
fn get_once(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn startup() {
    let rounds = 15;
    let mut serve_ms = vec![];
    let mut proc_ms = vec![];
    for _ in 0..rounds {
        let t = Instant::now();
        let st = nova()
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .expect("nova --version");
        assert!(st.success());
        proc_ms.push(t.elapsed().as_secs_f64() * 1e3);

        let dir = tempfile::tempdir().expect("temp dir");
        let (mut child, addr, t) = start(dir.path());
        let code = get_once(&addr, "/system_stats");
        serve_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(code, 200);
        let _ = child.kill();
        let _ = child.wait();
    }
    let (s, p) = (median(serve_ms), median(proc_ms));
    println!("start-up: spawn to first /system_stats answer, median of {rounds}");
    println!(
        "  nova serve first answer   {s:8.1} ms   (goal < 100 ms: {})",
        if s < 100.0 { "met" } else { "NOT met" }
    );
    println!("  baseline nova --version   {p:8.1} ms");
    println!("  ratio                     {:8.2}x", s / p);
}

fn load(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    clients: usize,
    rounds: usize,
    submit: bool,
) -> Vec<f64> {
    let wf = json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    }});
    let url = format!("http://{addr}/prompt");
    rt.block_on(async {
        let mut tasks = vec![];
        for _ in 0..clients {
            let url = url.clone();
            let wf = wf.clone();
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                // One warm-up request opens the connection.
                let _ = http.get(&url).send().await;
                let mut lat = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let t = Instant::now();
                    let r = if submit {
                        http.post(&url).json(&wf).send().await
                    } else {
                        http.get(&url).send().await
                    };
                    let ok = match r {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    assert!(ok, "request failed");
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            }));
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all.sort_by(|a, b| a.total_cmp(b));
        all
    })
}

fn prompt_latency() {
    let rounds: usize = std::env::var("NOVA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, addr, _) = start(dir.path());
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let clients: usize = std::env::var("NOVA_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let base = load(&rt, &addr, clients, rounds, false);
    // The API path alone: the queue held, so no job competes for the CPU.
    let control = |path: &str| {
        let url = format!("http://{addr}{path}");
        rt.block_on(async {
            let r = reqwest::Client::new().post(&url).send().await;
            assert!(r.is_ok_and(|r| r.status().is_success()), "{url}");
        })
    };
    control("/api/queue/pause");
    let held = load(&rt, &addr, clients, rounds, true);
    // Then with the queue draining: jobs run beside the submissions on the same cores.
    control("/api/queue/resume");
    let draining = load(&rt, &addr, clients, rounds, true);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "/prompt acceptance: {clients} concurrent clients x {rounds} requests ({} each)",
        held.len()
    );
    println!(
        "  {:<40} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "max ms"
    );
    for (name, v) in [
        ("POST /prompt, queue held", &held),
        ("POST /prompt, queue draining (jobs run)", &draining),
        ("GET /prompt (baseline)", &base),
    ] {
        println!(
            "  {name:<40} {:>9.2} {:>9.2} {:>9.2}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    let base99 = percentile(&base, 0.99);
    for (name, v) in [("held", &held), ("draining", &draining)] {
        let p99 = percentile(v, 0.99);
        println!(
            "  p99 ratio submit ({name}) / baseline {:8.2}x   (goal p99 < 10 ms: {})",
            p99 / base99,
            if p99 < 10.0 { "met" } else { "NOT met" }
        );
    }
}

/// (CPU seconds, minor faults) of process `pid`.
fn usage_of(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|s| s.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ((num(11) + num(12)) / 100.0, num(7) as u64)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until ComfyUI's end of job `id` (`executing` with `node: null`).
async fn until_done(reader: &mut Socket, id: &str) {
    use futures_util::StreamExt;
    while let Some(Ok(m)) = reader.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
            if v["type"] == "executing"
                && v["data"]["node"].is_null()
                && v["data"]["prompt_id"] == id
            {
                return;
            }
        }
    }
    panic!("socket closed");
}

/// One round: a fresh service, `idle` clients that never read, one that reads; `jobs` jobs
/// back to back. Returns (jobs per second, CPU s per job, minor faults per job).
fn fanout_round(rt: &tokio::runtime::Runtime, idle: usize, jobs: usize) -> (f64, f64, f64) {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("input")).expect("input dir");
    let (w, h) = (1024u32, 1024u32);
    let mut seed = 0x2545F491u32;
    let noise: Vec<u8> = (0..w * h * 3)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed >> 24) as u8
        })
        .collect();
    image::RgbImage::from_raw(w, h, noise)
        .expect("image")
        .save(dir.path().join("input/noise.png"))
        .expect("save");
    let (mut child, addr, _) = start(dir.path());
    let pid = child.id();
    let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "nova_events": true}}).to_string();
    let wf = json!({"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    }, "client_id": "viewer", "extra_data": {"nova": {"tile_size": 32}}});
    let out = rt.block_on(async {
        let url = format!("ws://{addr}/ws?clientId=viewer");
        let mut sleepers = vec![];
        for _ in 0..idle {
            let (mut c, _) = tokio_tungstenite::connect_async(&url).await.expect("ws");
            c.send(tokio_tungstenite::tungstenite::Message::text(flags.clone()))
                .await
                .expect("flags");
            sleepers.push(c);
        }
        let (mut reader, _) = tokio_tungstenite::connect_async(&url).await.expect("ws");
        reader
            .send(tokio_tungstenite::tungstenite::Message::text(flags.clone()))
            .await
            .expect("flags");
        let http = reqwest::Client::new();
        // A warm-up job (registry, first allocations), not counted.
        let submit = |http: reqwest::Client| {
            let wf = wf.clone();
            let url = format!("http://{addr}/prompt");
            async move {
                let v: serde_json::Value = http
                    .post(&url)
                    .json(&wf)
                    .send()
                    .await
                    .expect("submit")
                    .json()
                    .await
                    .expect("json");
                v["prompt_id"].as_str().expect("id").to_string()
            }
        };
        let id = submit(http.clone()).await;
        until_done(&mut reader, &id).await;
        let (c0, f0) = usage_of(pid);
        let t = Instant::now();
        for _ in 0..jobs {
            let id = submit(http.clone()).await;
            until_done(&mut reader, &id).await;
        }
        let wall = t.elapsed().as_secs_f64();
        let (c1, f1) = usage_of(pid);
        drop(sleepers);
        (
            jobs as f64 / wall,
            (c1 - c0) / jobs as f64,
            (f1 - f0) as f64 / jobs as f64,
        )
    });
    let _ = child.kill();
    let _ = child.wait();
    out
}

fn fanout() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (rounds, jobs) = (6, 5);
    let (mut one, mut many) = (vec![], vec![]);
    for r in 0..rounds {
        if r % 2 == 0 {
            one.push(fanout_round(&rt, 0, jobs));
            many.push(fanout_round(&rt, 199, jobs));
        } else {
            many.push(fanout_round(&rt, 199, jobs));
            one.push(fanout_round(&rt, 0, jobs));
        }
    }
    let med =
        |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(v.iter().map(f).collect());
    println!("fan-out: {jobs} tile-heavy jobs per round, {rounds} alternated rounds (medians)");
    println!(
        "  {:<42} {:>9} {:>12} {:>14}",
        "", "jobs/s", "CPU s/job", "faults/job"
    );
    for (name, v) in [
        ("1 reading client", &one),
        ("1 reading + 199 that never read", &many),
    ] {
        println!(
            "  {name:<42} {:>9.2} {:>12.3} {:>14.0}",
            med(v, |x| x.0),
            med(v, |x| x.1),
            med(v, |x| x.2)
        );
    }
    println!(
        "  throughput ratio (200 clients / 1)     {:>9.2}   CPU ratio {:.2}",
        med(&many, |x| x.0) / med(&one, |x| x.0),
        med(&many, |x| x.1) / med(&one, |x| x.1)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if want("startup") {
        startup();
    }
    if want("prompt") {
        prompt_latency();
    }
    if want("fanout") {
        fanout();
    }
}
