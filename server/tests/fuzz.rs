//! Fuzzing the two ways input gets in: the workflow parser (and what validation and planning
//! do with what it accepts) and the HTTP API of a real `nova serve`.
//!
//! Seeded and sized by the environment, so a failure can be replayed:
//! - `NOVA_FUZZ_CASES` cases per target (default 300: what CI runs); on demand, e.g.
//!   `NOVA_FUZZ_CASES=20000 cargo test -p nova-server --release --test fuzz -- --nocapture`.
//! - `NOVA_FUZZ_SEED` (default 18); each case's seed is the base seed plus its index, and a
//!   failing case is written to `target/fuzz-failures/` and named in the failure.
//!
//! What must hold for every case: no panic (in process, or as a dying service), every refusal
//! a typed answer (a workflow error naming a node, input or line; an HTTP status below 500
//! with a body), and the service still answering and running jobs afterwards.

mod common;

use common::*;
use nova_dataflow::{plan, workflow, JobEnv, PlanOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::time::Duration;

fn cases() -> usize {
    std::env::var("NOVA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn base_seed() -> u64 {
    std::env::var("NOVA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(18)
}

/// Writes a failing case where it can be replayed from, and returns its path.
fn keep_failure(target: &str, seed: u64, bytes: &[u8]) -> String {
    let dir = repo().join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{seed}.bin"));
    let _ = std::fs::write(&path, bytes);
    path.display().to_string()
}

/// Workflows to mutate: the examples and a few graphs of every node family.
fn corpus() -> Vec<Value> {
    let mut v = vec![];
    for name in [
        "sharpen_upscale.json",
        "audio_tone.json",
        "txt2img_tiny.json",
        "upscale_model.json",
        "video_filter.json",
    ] {
        let text = std::fs::read_to_string(repo().join("examples/workflows").join(name)).unwrap();
        v.push(serde_json::from_str(&text).unwrap());
    }
    v.push(quick_workflow("fuzz"));
    v.push(json!({
        "1": {"class_type": "AudioOscillator", "inputs": {"waveform": "sine", "frequency": 440.0, "amplitude": 0.5, "duration": 0.1, "sample_rate": 8000, "channels": 1}},
        "2": {"class_type": "AudioGain", "inputs": {"audio": ["1", 0], "gain_db": -3.0}},
        "3": {"class_type": "SaveAudio", "inputs": {"audio": ["2", 0], "filename_prefix": "a"}}
    }));
    v.push(json!({
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "l"}}
    }));
    v
}

/// A value of some other kind, often one at the edge of what a field takes.
fn odd_value(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..16) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(0),
        3 => json!(i64::MAX),
        4 => json!(u64::MAX),
        5 => json!(1e300),
        6 => json!(-1e-300),
        7 => json!(""),
        8 => json!("\u{0}\u{202e}../../etc/passwd"),
        9 => json!("x".repeat(rng.random_range(1..70_000))),
        10 => json!([]),
        11 => json!(["1", 0]),
        12 => json!([rng.random_range(0..20).to_string(), rng.random_range(-2..5)]),
        13 => json!({"class_type": "ImageInvert"}),
        14 => json!(true),
        _ => {
            // Deep nesting.
            let mut v = json!(0);
            for _ in 0..rng.random_range(1..300) {
                v = json!([v]);
            }
            v
        }
    }
}

/// One structural mutation of a workflow: a value replaced, a key dropped or added, a link
/// redirected (cycles, dangling and self links), a node duplicated or retyped.
fn mutate_json(wf: &mut Value, rng: &mut ChaCha8Rng) {
    let Some(nodes) = wf.as_object_mut() else {
        *wf = odd_value(rng);
        return;
    };
    let ids: Vec<String> = nodes.keys().cloned().collect();
    if ids.is_empty() {
        nodes.insert("1".into(), odd_value(rng));
        return;
    }
    let id = ids[rng.random_range(0..ids.len())].clone();
    match rng.random_range(0..9) {
        0 => {
            nodes.insert(id, odd_value(rng));
        }
        1 => {
            nodes.remove(&id);
        }
        2 => {
            let other = ids[rng.random_range(0..ids.len())].clone();
            if let Some(n) = nodes.get(&other).cloned() {
                nodes.insert(format!("{}{}", id, rng.random_range(0..1000)), n);
            }
        }
        3 => {
            let classes = [
                "ImageInvert",
                "SaveImage",
                "LoadImage",
                "KSampler",
                "SaveVideo",
                "LoadVideo",
                "VAEDecode",
                "Nope",
                "",
                "EmptyImage",
            ];
            if let Some(n) = nodes.get_mut(&id).and_then(|n| n.as_object_mut()) {
                n.insert(
                    "class_type".into(),
                    json!(classes[rng.random_range(0..classes.len())]),
                );
            }
        }
        _ => {
            let Some(inputs) = nodes
                .get_mut(&id)
                .and_then(|n| n.get_mut("inputs"))
                .and_then(|i| i.as_object_mut())
            else {
                return;
            };
            let keys: Vec<String> = inputs.keys().cloned().collect();
            if keys.is_empty() || rng.random_bool(0.2) {
                inputs.insert(format!("extra{}", rng.random_range(0..5)), odd_value(rng));
                return;
            }
            let k = keys[rng.random_range(0..keys.len())].clone();
            if rng.random_bool(0.3) {
                // A link to any node, itself included, at any port.
                let target = ids[rng.random_range(0..ids.len())].clone();
                inputs.insert(k, json!([target, rng.random_range(-1..4)]));
            } else if rng.random_bool(0.2) {
                inputs.remove(&k);
            } else {
                inputs.insert(k, odd_value(rng));
            }
        }
    }
}

/// One byte-level mutation of a text.
fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    if bytes.is_empty() {
        bytes.push(rng.random());
        return;
    }
    let at = rng.random_range(0..bytes.len());
    match rng.random_range(0..6) {
        0 => bytes[at] ^= 1 << rng.random_range(0..8),
        1 => bytes.truncate(at),
        2 => {
            bytes.remove(at);
        }
        3 => bytes.insert(
            at,
            [b'{', b'[', b'"', b'\\', 0xff, 0][rng.random_range(0..6)],
        ),
        4 => {
            let end = (at + rng.random_range(1..64)).min(bytes.len());
            let chunk = bytes[at..end].to_vec();
            bytes.splice(at..at, chunk);
        }
        _ => bytes[at] = rng.random(),
    }
}

/// A number at the edge of what a field takes (the graph's shape stays valid).
fn edge_number(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..10) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(16384),
        4 => json!(1 << 20),
        5 => json!(i64::MAX),
        6 => json!(0.5),
        7 => json!(1e9),
        8 => json!(-1e9),
        _ => json!(rng.random_range(-100..100_000)),
    }
}

/// Replaces one number of a node's literal inputs with an edge value.
fn tweak_number(wf: &mut Value, rng: &mut ChaCha8Rng) {
    let Some(nodes) = wf.as_object_mut() else {
        return;
    };
    let ids: Vec<String> = nodes.keys().cloned().collect();
    if ids.is_empty() {
        return;
    }
    let id = &ids[rng.random_range(0..ids.len())];
    let Some(inputs) = nodes
        .get_mut(id)
        .and_then(|n| n.get_mut("inputs"))
        .and_then(|i| i.as_object_mut())
    else {
        return;
    };
    let numeric: Vec<String> = inputs
        .iter()
        .filter(|(_, v)| v.is_number())
        .map(|(k, _)| k.clone())
        .collect();
    if numeric.is_empty() {
        return;
    }
    let k = numeric[rng.random_range(0..numeric.len())].clone();
    inputs.insert(k, edge_number(rng));
}

/// A fuzzed workflow text: JSON-level mutations of a corpus workflow (half the time only
/// its numbers, so what is planned is valid but extreme), then (sometimes) bytes.
fn fuzzed_workflow(corpus: &[Value], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut wf = corpus[rng.random_range(0..corpus.len())].clone();
    let numbers_only = rng.random_bool(0.5);
    for _ in 0..rng.random_range(1..6) {
        if numbers_only {
            tweak_number(&mut wf, rng);
        } else {
            mutate_json(&mut wf, rng);
        }
    }
    let mut bytes = serde_json::to_vec(&wf).unwrap();
    if !numbers_only && rng.random_bool(0.3) {
        for _ in 0..rng.random_range(1..4) {
            mutate_bytes(&mut bytes, rng);
        }
    }
    bytes
}

#[test]
fn the_workflow_parser_validation_and_planner_survive_fuzzed_workflows() {
    let registry = nova_operators::registry();
    let data = data_dir("fuzz-parse");
    let env = JobEnv::new(
        data.path().join("input"),
        data.path().join("output"),
        data.path().join("temp"),
    )
    .with_models_dir(data.path().join("models"));
    let corpus = corpus();
    let (n, seed0) = (cases(), base_seed());
    let (mut valid, mut planned) = (0, 0);
    for i in 0..n {
        let seed = seed0 + i as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bytes = fuzzed_workflow(&corpus, &mut rng);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let text = match std::str::from_utf8(&bytes) {
                Ok(t) => t,
                Err(_) => return Ok(false),
            };
            let json = match workflow::parse(text) {
                Ok(j) => j,
                Err(e) => {
                    let m = e.to_string();
                    return if m.contains("line") {
                        Ok(false)
                    } else {
                        Err(format!("untyped parse error: {m}"))
                    };
                }
            };
            match workflow::validate(json, &registry, &env) {
                Ok(wf) => {
                    let opts = PlanOptions {
                        limit: Some(nova_dataflow::Bytes::mib(256)),
                        ..PlanOptions::default()
                    };
                    match plan(&wf, &env, &opts) {
                        Ok(_) => Ok(true),
                        Err(e) if !e.node.is_empty() => Ok(false),
                        Err(e) => Err(format!("a plan error that names no node: {e}")),
                    }
                }
                Err(errors) => {
                    for e in errors.errors() {
                        if e.to_string().trim().is_empty() {
                            return Err("an empty validation error".into());
                        }
                    }
                    Ok(false)
                }
            }
        }));
        match outcome {
            Ok(Ok(p)) => {
                valid += usize::from(p);
                planned += usize::from(p);
            }
            Ok(Err(m)) => panic!("case {seed}: {m} ({})", keep_failure("parse", seed, &bytes)),
            Err(_) => panic!(
                "case {seed} panicked ({})",
                keep_failure("parse", seed, &bytes)
            ),
        }
    }
    eprintln!("fuzz parse: {n} cases from seed {seed0}; {planned} validated and planned");
    let _ = valid;
}

/// The routes a client can reach, with the methods they answer.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/prompt"),
    ("GET", "/prompt"),
    ("POST", "/api/prompt"),
    ("GET", "/queue"),
    ("POST", "/queue"),
    ("GET", "/history"),
    ("POST", "/history"),
    ("GET", "/history/x"),
    ("GET", "/view"),
    ("POST", "/upload/image"),
    ("POST", "/interrupt"),
    ("POST", "/free"),
    ("GET", "/object_info"),
    ("GET", "/object_info/ImageInvert"),
    ("GET", "/system_stats"),
    ("GET", "/models"),
    ("GET", "/models/checkpoints"),
    ("GET", "/embeddings"),
    ("GET", "/features"),
    ("POST", "/api/plan"),
    ("POST", "/api/optimize"),
    ("GET", "/api/jobs/x"),
    ("GET", "/api/system/stats"),
    ("GET", "/api/model_index"),
    ("GET", "/health"),
    ("GET", "/health/vram"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
];

fn odd_text(rng: &mut ChaCha8Rng) -> String {
    let pieces = [
        "..",
        "%2e%2e",
        "/",
        "%00",
        "\u{202e}",
        "?",
        "&",
        "=",
        "[",
        "]",
        "\"",
        "'",
        "<script>",
        "%",
        "%zz",
        "~",
        "a",
        "0",
        "-1",
        "99999999999999999999",
        "nan",
        " ",
    ];
    (0..rng.random_range(0..12))
        .map(|_| pieces[rng.random_range(0..pieces.len())])
        .collect()
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/%=&?".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A raw HTTP/1.1 request: usually well formed with fuzzed parts, sometimes broken; and
/// whether it is well formed HTTP (its framing is right, whatever its content).
fn fuzzed_request(rng: &mut ChaCha8Rng, host: &str, corpus: &[Value]) -> (Vec<u8>, bool) {
    let (method, path) = ROUTES[rng.random_range(0..ROUTES.len())];
    let method = if rng.random_bool(0.1) {
        ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"][rng.random_range(0..6)]
    } else {
        method
    };
    let mut path = path.to_string();
    if rng.random_bool(0.5) {
        path.push_str(&format!(
            "?filename={}&subfolder={}&type={}&max_items={}&offset={}&preview={}",
            percent(&odd_text(rng)),
            percent(&odd_text(rng)),
            ["output", "input", "temp", "x", ""][rng.random_range(0..5)],
            percent(&odd_text(rng)),
            percent(&odd_text(rng)),
            ["webp;90", "jpeg;0", "jpeg;x", ""][rng.random_range(0..4)],
        ));
    }
    if rng.random_bool(0.1) {
        path.push_str(&"a/".repeat(rng.random_range(1..2000)));
    }
    let body: Vec<u8> = match rng.random_range(0..5) {
        0 => vec![],
        1 => {
            let wf = fuzzed_workflow(corpus, rng);
            let mut b = br#"{"prompt": "#.to_vec();
            b.extend_from_slice(&wf);
            b.extend_from_slice(
                format!(
                    r#", "number": {}, "front": {}, "client_id": {}, "prompt_id": {}, "extra_data": {}}}"#,
                    odd_value(rng),
                    odd_value(rng),
                    odd_value(rng),
                    odd_value(rng),
                    odd_value(rng)
                )
                .as_bytes(),
            );
            b
        }
        2 => serde_json::to_vec(&json!({"clear": odd_value(rng), "delete": odd_value(rng), "prompt_id": odd_value(rng)})).unwrap(),
        3 => {
            let boundary = "fuzzboundary";
            let mut b = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{}\"\r\nContent-Type: image/png\r\n\r\n",
                odd_text(rng).replace(['\r', '\n', '"'], "")
            )
            .into_bytes();
            let mut content = b"\x89PNG\r\n\x1a\n".to_vec();
            for _ in 0..rng.random_range(0..200) {
                content.push(rng.random());
            }
            b.extend_from_slice(&content);
            b.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\n{}\r\n--{boundary}--\r\n", odd_text(rng)).as_bytes());
            b
        }
        _ => (0..rng.random_range(0..512)).map(|_| rng.random()).collect(),
    };
    let content_type = if body.starts_with(b"--fuzzboundary") {
        "multipart/form-data; boundary=fuzzboundary"
    } else {
        "application/json"
    };
    let (length, framed) = match rng.random_range(0..10) {
        0 => (
            format!(
                "Content-Length: {}\r\n",
                body.len() + rng.random_range(1..50)
            ),
            false,
        ),
        1 => ("Transfer-Encoding: chunked\r\n".to_string(), false),
        _ => (format!("Content-Length: {}\r\n", body.len()), true),
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n{length}Connection: close\r\n"
    )
    .into_bytes();
    if rng.random_bool(0.2) {
        req.extend_from_slice(format!("X-Fuzz: {}\r\n", odd_text(rng)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(&body);
    let mut well_formed = framed;
    if rng.random_bool(0.05) {
        mutate_bytes(&mut req, rng);
        well_formed = false;
    }
    (req, well_formed)
}

/// Sends a raw request; the status line's code, or `None` when the service closed the
/// connection without an answer (what it does with requests too broken to parse).
async fn send_raw(addr: &str, req: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = c.write_all(req).await;
    let _ = c.shutdown().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf)).await;
    let line = String::from_utf8_lossy(&buf[..buf.len().min(64)]).to_string();
    line.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_survives_fuzzed_requests() {
    let data = data_dir("fuzz-http");
    // Small jobs only: whatever the fuzzer gets accepted runs within 64 MiB.
    let s = Server::start(
        data.path(),
        &["--vram-budget", "64MiB", "--header-timeout", "5"],
    );
    let corpus = corpus();
    let (n, seed0) = (cases(), base_seed());
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..n {
        let seed = seed0 + i as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (req, well_formed) = fuzzed_request(&mut rng, &s.addr, &corpus);
        let code = send_raw(&s.addr, &req).await;
        *codes.entry(code).or_insert(0) += 1;
        // A request with broken framing may be closed without an answer; any other gets one.
        if code.is_none() && well_formed {
            panic!(
                "case {seed}: no answer to a well-formed request ({})",
                keep_failure("http", seed, &req)
            );
        }
        if code.is_some_and(|c| c >= 500) {
            panic!(
                "case {seed}: HTTP {} ({})",
                code.unwrap(),
                keep_failure("http", seed, &req)
            );
        }
        assert!(
            s.child_alive(),
            "the service died at case {seed} ({})",
            keep_failure("http", seed, &req)
        );
    }
    eprintln!("fuzz http: {n} cases from seed {seed0}; answers {codes:?}");
    // Still answering, and still running jobs: clear what the fuzzer queued, then one more.
    let http = reqwest::Client::new();
    let (c, _) = post(&http, &s.url("/queue"), &json!({"clear": true})).await;
    assert_eq!(c, 200);
    let (c, _) = post(&http, &s.url("/api/queue/resume"), &json!({})).await;
    assert_eq!(c, 200);
    let _ = post(&http, &s.url("/interrupt"), &json!({})).await;
    let id = submit(&http, &s, json!({"prompt": quick_workflow("after-fuzz")})).await;
    assert_eq!(
        wait_history(&http, &s, &id).await["status"]["status_str"],
        "success"
    );
    let log = s.log.lock().unwrap().clone();
    assert!(!log.contains("panicked"), "{log}");
}
