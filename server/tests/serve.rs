//! `nova serve` end to end: the real binary on a loopback port, driven over real HTTP
//! (reqwest) and WebSocket (tokio-tungstenite) as a ComfyUI client would.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comfyui_client_runs_the_core_example_and_gets_nova_run_s_output() {
    let data = data_dir("core");
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();

    // Two sockets of one client: one negotiates NOVA's events, one is a plain ComfyUI client.
    let mut nova_ws = ws(&s, "client-a").await;
    let hello = next(&mut nova_ws).await;
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], "client-a");
    nova_ws
        .send(Message::text(
            json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "nova_events": true}})
                .to_string(),
        ))
        .await
        .unwrap();
    let flags = next(&mut nova_ws).await;
    assert_eq!(flags["type"], "feature_flags");
    assert_eq!(flags["data"]["supports_preview_metadata"], true);
    let mut plain_ws = ws(&s, "client-a").await;
    assert_eq!(next(&mut plain_ws).await["type"], "status");

    let id = submit(
        &http,
        &s,
        json!({"prompt": example(), "client_id": "client-a"}),
    )
    .await;
    let nova_msgs = until_done(&mut nova_ws, &id).await;
    let plain_msgs = until_done(&mut plain_ws, &id).await;

    // ComfyUI's sequence, in ComfyUI's order.
    let ty = |m: &Value, t: &str| {
        m["type"] == t && (m["data"]["prompt_id"] == id.as_str() || t == "status")
    };
    for msgs in [&nova_msgs, &plain_msgs] {
        let start = index_of(msgs, |m| ty(m, "execution_start"));
        let cached = index_of(msgs, |m| ty(m, "execution_cached"));
        let first_exec = index_of(msgs, |m| ty(m, "executing") && !m["data"]["node"].is_null());
        let executed = index_of(msgs, |m| ty(m, "executed") && m["data"]["node"] == "5");
        let success = index_of(msgs, |m| ty(m, "execution_success"));
        let status_after = msgs.iter().rposition(|m| m["type"] == "status").unwrap();
        let end = msgs.len() - 1;
        assert!(start < cached && cached < first_exec && first_exec < executed);
        assert!(
            executed < success && success < status_after && status_after < end,
            "{msgs:#?}"
        );
        assert!(msgs
            .iter()
            .any(|m| ty(m, "progress") && m["data"]["max"].as_u64() > Some(0)));
        let executing: Vec<&str> = msgs
            .iter()
            .filter(|m| ty(m, "executing"))
            .filter_map(|m| m["data"]["node"].as_str())
            .collect();
        for node in ["1", "2", "3", "4", "5"] {
            assert!(executing.contains(&node), "executing {node}: {executing:?}");
        }
    }
    // NOVA's events only where negotiated.
    let nova_types: Vec<&str> = nova_msgs
        .iter()
        .filter_map(|m| m["type"].as_str())
        .collect();
    for t in [
        "lifecycle",
        "telemetry.memory_forecast",
        "telemetry.node_start",
        "telemetry.node_end",
        "output.partial.image",
    ] {
        assert!(nova_types.contains(&t), "{t} missing: {nova_types:?}");
    }
    assert!(nova_msgs
        .iter()
        .any(|m| m["kind"] == 4 && m["meta"]["nova"]["kind"] == "tile"));
    assert!(plain_msgs.iter().all(|m| {
        let t = m["type"].as_str().unwrap_or("");
        !t.starts_with("telemetry.")
            && !t.starts_with("output.")
            && t != "lifecycle"
            && m.get("binary").is_none()
    }));

    // History, then the file through /view, equal to `nova run`'s.
    let entry = wait_history(&http, &s, &id).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["prompt"][1], id.as_str());
    let img = &entry["outputs"]["5"]["images"][0];
    let url = s.url(&format!(
        "/view?filename={}&subfolder={}&type={}",
        img["filename"].as_str().unwrap(),
        img["subfolder"].as_str().unwrap(),
        img["type"].as_str().unwrap()
    ));
    let served = http.get(&url).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "image/png");
    let served = served.bytes().await.unwrap();

    let cli = tempfile::tempdir().unwrap();
    let wf = cli.path().join("wf.json");
    std::fs::write(&wf, example().to_string()).unwrap();
    let out = Command::new(nova_bin())
        .arg("run")
        .arg(&wf)
        .arg("--input-dir")
        .arg(repo().join("examples/input"))
        .arg("--out")
        .arg(cli.path().join("out"))
        .args(["--workers", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::read_dir(cli.path().join("out"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "png"))
        .unwrap()
        .path();
    let ran = std::fs::read(file).unwrap();
    assert_eq!(
        decode_png(&served),
        decode_png(&ran),
        "pixels differ from nova run's"
    );
    // Same workflow, same embedded prompt: the files are identical byte for byte.
    assert_eq!(served.as_ref(), ran.as_slice());

    // The API under /api/ is the same.
    let (code, q) = get(&http, &s.url("/api/queue")).await;
    assert_eq!(code, 200);
    assert_eq!(q["queue_pending"], json!([]));
    let (_, info) = get(&http, &s.url("/api/object_info/ImageBlur")).await;
    assert!(info["ImageBlur"]["input"]["required"]["blur_radius"].is_array());
    let (_, stats) = get(&http, &s.url("/system_stats")).await;
    assert_eq!(stats["devices"][0]["type"], "cpu");
    assert_eq!(stats["nova"]["stage"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_websocket_client_does_not_slow_the_engine_or_other_clients() {
    let data = data_dir("slow");
    // A noisy image, so that tile previews are big and fill the slow client's socket.
    noise_png(&data.path().join("input/noise.png"), 1536, 1536, 0x2545F491);
    let s = Server::start(data.path(), &["--client-buffer", "16"]);
    let http = reqwest::Client::new();
    let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "nova_events": true}}).to_string();
    let mut slow = ws(&s, "viewer").await;
    slow.send(Message::text(flags.clone())).await.unwrap();
    let mut fast = ws(&s, "viewer").await;
    fast.send(Message::text(flags)).await.unwrap();
    let wf = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "noise"}}
    });
    let id = submit(
        &http,
        &s,
        json!({"prompt": wf, "client_id": "viewer", "extra_data": {"nova": {"tile_size": 32}}}),
    )
    .await;
    // The fast client sees the whole job end while the slow one has read nothing at all.
    let fast_msgs = until_done(&mut fast, &id).await;
    assert!(fast_msgs.iter().any(|m| m["type"] == "execution_success"));
    assert!(fast_msgs.iter().any(|m| m["type"] == "executed"));
    let tiles = fast_msgs.iter().filter(|m| m["kind"] == 4).count();
    assert!(tiles > 0, "the fast client got tile previews");
    let (_, stats) = get(&http, &s.url("/api/system/stats")).await;
    let dropped = stats["clients"]["dropped_messages"].as_u64().unwrap();
    assert!(
        dropped > 0,
        "previews were dropped for the slow client: {stats}"
    );
    // Results are never dropped: the slow client, reading at last, gets every one of them.
    let slow_msgs = until_done(&mut slow, &id).await;
    for t in ["execution_start", "executed", "execution_success"] {
        assert!(
            slow_msgs.iter().any(|m| m["type"] == t),
            "slow client missed {t}"
        );
    }
    let slow_tiles = slow_msgs.iter().filter(|m| m["kind"] == 4).count();
    let total = fast_msgs
        .iter()
        .find_map(|m| m["meta"]["nova"]["tiles"].as_u64())
        .unwrap() as usize;
    assert!(
        slow_tiles < total,
        "the slow client lost previews ({slow_tiles} of {total})"
    );
    let (_, metrics) = get(&http, &s.url("/metrics")).await;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("nova_client_messages_dropped_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_run_loses_no_accepted_job_and_keeps_history() {
    let data = data_dir("kill");
    let http = reqwest::Client::new();
    let mut s = Server::start(data.path(), &[]);
    let done = submit(&http, &s, json!({"prompt": quick_workflow("before")})).await;
    assert_eq!(
        wait_history(&http, &s, &done).await["status"]["status_str"],
        "success"
    );
    let slow = submit(&http, &s, json!({"prompt": slow_workflow()})).await;
    let queued: Vec<String> = [
        submit(&http, &s, json!({"prompt": quick_workflow("q1")})).await,
        submit(
            &http,
            &s,
            json!({"prompt": quick_workflow("q2"), "priority": "LOW"}),
        )
        .await,
    ]
    .into();
    // Kill once the slow job runs.
    wait_running(&http, &s).await;
    s.kill9();

    let s = Server::start(data.path(), &[]);
    assert!(
        s.log.lock().unwrap().contains("1 requeued"),
        "{}",
        s.log.lock().unwrap()
    );
    for id in std::iter::once(&slow).chain(queued.iter()) {
        let e = wait_history(&http, &s, id).await;
        assert_eq!(e["status"]["status_str"], "success", "{id}: {e}");
    }
    let (_, job) = get(&http, &s.url(&format!("/api/jobs/{slow}"))).await;
    assert_eq!(job["attempts"], 2);
    let (_, h) = get(&http, &s.url("/history")).await;
    let ids: Vec<&String> = h.as_object().unwrap().keys().collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(
        ids[0], &done,
        "the job finished before the kill is still first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_oversized_bodies_and_foreign_origins_are_refused() {
    let data = data_dir("sec");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "TOPSECRET-CONTENT").unwrap();
    std::fs::create_dir_all(data.path().join("output")).unwrap();
    std::os::unix::fs::symlink(outside.path(), data.path().join("output/link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), data.path().join("input/link")).unwrap();
    let s = Server::start(
        data.path(),
        &["--max-body", "64KiB", "--max-upload", "1MiB"],
    );
    let http = reqwest::Client::new();
    let secret_name = outside
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    for q in [
        "filename=../queue.redb".to_string(),
        "filename=queue.redb&subfolder=..".to_string(),
        "filename=passwd&subfolder=/etc".to_string(),
        "filename=/etc/passwd".to_string(),
        "filename=secret.txt&subfolder=link".to_string(),
        format!("filename=secret.txt&subfolder=../../{secret_name}"),
        "filename=card.png&type=../input".to_string(),
    ] {
        let r = http.get(s.url(&format!("/view?{q}"))).send().await.unwrap();
        let code = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!((400..500).contains(&code), "{q}: {code}");
        assert!(!body.contains("TOPSECRET"), "{q} leaked the file");
    }
    // An input inside the data folder is fine.
    let r = http
        .get(s.url("/view?filename=card.png&type=input"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Uploads: names and folders that escape, content that is not media, too big.
    let png = std::fs::read(data.path().join("input/card.png")).unwrap();
    let upload = |name: &str, sub: &str, bytes: Vec<u8>| {
        let part = reqwest::multipart::Part::bytes(bytes).file_name(name.to_string());
        reqwest::multipart::Form::new()
            .part("image", part)
            .text("subfolder", sub.to_string())
    };
    for (name, sub, bytes, want) in [
        ("../evil.png", "", png.clone(), 400),
        ("evil.png", "../../", png.clone(), 400),
        ("evil.png", "link", png.clone(), 400),
        ("evil.png", "", b"<script>alert(1)</script>".to_vec(), 415),
    ] {
        let r = http
            .post(s.url("/upload/image"))
            .multipart(upload(name, sub, bytes))
            .send()
            .await
            .unwrap_or_else(|e| panic!("upload {name} into '{sub}': {e:?}"));
        assert_eq!(r.status().as_u16(), want, "upload {name} into '{sub}'");
    }
    assert!(!data.path().join("evil.png").exists());
    assert!(!data.path().parent().unwrap().join("evil.png").exists());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    let ok = http
        .post(s.url("/upload/image"))
        .multipart(upload("mine.png", "sub", png.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json().await.unwrap();
    assert_eq!(
        v,
        json!({"name": "mine.png", "subfolder": "sub", "type": "input"})
    );
    assert_eq!(
        std::fs::read(data.path().join("input/sub/mine.png")).unwrap(),
        png
    );

    // A workflow file input that escapes: ComfyUI's error body naming node and input.
    let wf = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "../queue.redb"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let (code, body) = post(&http, &s.url("/prompt"), &json!({"prompt": wf})).await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"],
        "image"
    );
    assert_eq!(body["node_errors"]["1"]["dependent_outputs"], json!(["2"]));

    // Oversized bodies are refused from their declared length, before any is read (a client
    // that kept writing would see the connection closed after the 413).
    assert_eq!(
        declared_length_status(&s, "/prompt", "application/json", 100 << 10).await,
        413
    );
    assert_eq!(
        declared_length_status(
            &s,
            "/upload/image",
            "multipart/form-data; boundary=x",
            2 << 20
        )
        .await,
        413
    );
    // Malformed bodies.
    let r = http
        .post(s.url("/prompt"))
        .body("{\"prompt\": {")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_prompt");

    // A page on another origin cannot open the socket or post.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", s.addr),
    )
    .unwrap();
    req.headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let r = http
        .post(s.url("/prompt"))
        .header("Origin", "http://evil.example")
        .json(&json!({"prompt": quick_workflow("x")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let same_origin = format!("http://{}", s.addr);
    let r = http
        .post(s.url("/prompt"))
        .header("Origin", same_origin)
        .json(&json!({"prompt": quick_workflow("x")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The status a request declaring a `length`-byte body gets, sending none of it.
async fn declared_length_status(s: &Server, path: &str, content_type: &str, length: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n",
        s.addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("an answer before the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_off_loopback_and_checked_when_set() {
    // Not loopback without a token: refused at start, exit 2.
    let out = Command::new(nova_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--print-config"])
        .env_remove("NOVA_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));

    let data = data_dir("token");
    let s = Server::start(data.path(), &["--token", "s3cret"]);
    let http = reqwest::Client::new();
    let r = http.get(s.url("/queue")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(s.url("/queue"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(s.url("/queue"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr))
            .await
            .is_err()
    );
    let (mut w, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token=s3cret", s.addr))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await["type"], "status");
    // Health stays open for probes.
    let r = http.get(s.url("/health/vram")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_order_the_queue_and_cancel_and_interrupt_release_memory() {
    let data = data_dir("prio");
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();
    let slow = submit(&http, &s, json!({"prompt": slow_workflow()})).await;
    // Wait until it runs, so the rest queue behind it.
    wait_running(&http, &s).await;
    let (_, running_stats) = get(&http, &s.url("/api/system/stats")).await;
    assert!(running_stats["device"]["reserved_bytes"].as_u64().unwrap() > 0);
    let low = submit(
        &http,
        &s,
        json!({"prompt": quick_workflow("low"), "priority": "LOW"}),
    )
    .await;
    let normal = submit(&http, &s, json!({"prompt": quick_workflow("normal")})).await;
    let urgent = submit(
        &http,
        &s,
        json!({"prompt": quick_workflow("urgent"), "extra_data": {"nova": {"priority": "URGENT"}}}),
    )
    .await;
    let (_, q) = get(&http, &s.url("/queue")).await;
    let pending: Vec<&str> = q["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[1].as_str().unwrap())
        .collect();
    assert_eq!(pending, [urgent.as_str(), normal.as_str(), low.as_str()]);
    let (code, bad) = post(
        &http,
        &s.url("/prompt"),
        &json!({"prompt": quick_workflow("x"), "priority": "SOON"}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(bad["error"]["type"], "invalid_priority");

    // SSE for the urgent job, in NOVA's schema.
    let sse = http
        .get(s.url(&format!("/api/events?prompt_id={urgent}")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    // Cancel the normal one, interrupt the running one.
    let r = http
        .post(s.url("/queue"))
        .json(&json!({"delete": [normal]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(s.url("/interrupt"))
        .json(&json!({"prompt_id": slow}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e = wait_history(&http, &s, &slow).await;
    assert_eq!(e["status"]["status_str"], "error");
    let kinds: Vec<&str> = e["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "execution_start",
            "execution_cached",
            "execution_interrupted"
        ]
    );
    wait_history(&http, &s, &urgent).await;
    wait_history(&http, &s, &low).await;
    let (_, h) = get(&http, &s.url("/history")).await;
    let order: Vec<&String> = h.as_object().unwrap().keys().collect();
    assert_eq!(order, [&slow, &urgent, &low]);
    let (_, cancelled) = get(&http, &s.url(&format!("/api/jobs/{normal}"))).await;
    assert_eq!(cancelled["state"], "cancelled");
    let (_, stats) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(
        stats["device"]["reserved_bytes"], 0,
        "memory released: {stats}"
    );
    assert_eq!(stats["device"]["state"], "LOW");

    let body = tokio::time::timeout(Duration::from_secs(30), async {
        let mut text = String::new();
        let mut stream = sse.bytes_stream();
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("event: execution_success") {
                break;
            }
        }
        text
    })
    .await
    .expect("the SSE stream ends the job");
    assert!(body.contains("event: telemetry.node_start"), "{body}");
    let last = body
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["v"], 1);
    assert_eq!(last["job"], urgent.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_retry_until_delivered_and_metrics_and_openapi_describe_the_service() {
    // A receiver that fails the first delivery.
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = {
        let got = got.clone();
        let calls = calls.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let got = got.clone();
                let calls = calls.clone();
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    got.lock().unwrap().push(v);
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let data = data_dir("hook");
    std::fs::create_dir_all(data.path().join("models/upscale_models")).unwrap();
    let model = repo().join("../shared/models/upscale_models/realesr-animevideov3.safetensors");
    std::fs::copy(
        &model,
        data.path().join("models/upscale_models/esr.safetensors"),
    )
    .unwrap();
    let s = Server::start(data.path(), &["--webhook", &hook]);
    let http = reqwest::Client::new();
    let id = submit(&http, &s, json!({"prompt": quick_workflow("hook")})).await;
    wait_history(&http, &s, &id).await;
    let t = Instant::now();
    let job = loop {
        let (_, job) = get(&http, &s.url(&format!("/api/jobs/{id}"))).await;
        if job["webhooks"].as_array().is_some_and(|w| !w.is_empty()) {
            break job;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no webhook delivery recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["webhooks"][0]["attempts"], 2);
    assert_eq!(job["webhooks"][0]["delivered"], true);
    let delivered = got.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["prompt_id"], id.as_str());
    assert_eq!(delivered[0]["status"], "success");
    assert!(delivered[0]["outputs"]["2"]["images"].is_array());

    // Metrics.
    let (_, m) = get(&http, &s.url("/metrics")).await;
    let m = m.as_str().unwrap();
    assert!(
        m.contains("nova_jobs_finished_total{outcome=\"success\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("nova_webhook_attempts_total{result=\"delivered\"} 1"),
        "{m}"
    );
    assert!(m.contains("route=\"/prompt\""), "{m}");

    // The model index: header, hash and tags of the file in models/.
    let t = Instant::now();
    let models = loop {
        let (_, idx) = get(&http, &s.url("/api/model_index?tensors=true")).await;
        if idx["stage"] == "ready" {
            break idx["models"].clone();
        }
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let m0 = &models[0];
    assert_eq!(m0["name"], "esr.safetensors");
    assert_eq!(m0["folder"], "upscale_models");
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(std::fs::read(&model).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(m0["sha256"], want.as_str());
    assert!(m0["tags"]
        .as_array()
        .unwrap()
        .contains(&json!("esrgan-compact")));
    assert!(m0["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "body.0.weight"));
    let (_, files) = get(&http, &s.url("/models/upscale_models")).await;
    assert_eq!(files, json!(["esr.safetensors"]));
    let (code, _) = get(&http, &s.url("/models/no_such_folder")).await;
    assert_eq!(code, 404);
    let (_, r) = post(&http, &s.url("/api/model_index/refresh"), &json!({})).await;
    assert_eq!(r["unchanged"], 1, "an unchanged file is not re-read: {r}");
    assert_eq!(r["read"], 0);

    // Every route in the OpenAPI document answers (GET or POST as described).
    let (_, doc) = get(&http, &s.url("/openapi.json")).await;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if path.contains('{') || path == "/api/events" {
            continue;
        }
        for op in ops.as_object().unwrap().keys() {
            let r = match op.as_str() {
                "get" => http.get(s.url(path)).send().await.unwrap(),
                _ => http
                    .post(s.url(path))
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap(),
            };
            assert_ne!(r.status(), 404, "{op} {path}");
            assert_ne!(r.status(), 405, "{op} {path}");
        }
    }
    // The plan route reports what `nova plan --json` does.
    let (code, plan) = post(&http, &s.url("/api/plan"), &json!({"prompt": example()})).await;
    assert_eq!(code, 200);
    assert_eq!(plan["fits"], true);
    assert_eq!(plan["nodes"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_optimize_writes_the_planners_choices_into_the_workflow_and_lists_them() {
    let data = data_dir("optimize");
    std::fs::create_dir_all(data.path().join("models/checkpoints")).unwrap();
    std::fs::copy(
        repo().join("../shared/models/tiny-sd1/tiny_sd1.safetensors"),
        data.path().join("models/checkpoints/tiny_sd1.safetensors"),
    )
    .unwrap();
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();
    // ComfyUI's default txt2img at 1024x1024 under 512 MiB: the sampler fits, the whole-image
    // VAE decode does not.
    let mut wf: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/workflows/txt2img_tiny.json")).unwrap(),
    )
    .unwrap();
    wf["5"]["inputs"]["width"] = json!(1024);
    wf["5"]["inputs"]["height"] = json!(1024);
    let extra = json!({"nova": {"vram_budget": "512MiB", "headroom": "0"}});
    let (code, o) = post(
        &http,
        &s.url("/api/optimize"),
        &json!({"prompt": wf, "extra_data": extra}),
    )
    .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(o["before"]["fits"], false, "{o}");
    assert_eq!(o["after"]["fits"], true, "{o}");
    let changes = o["changes"].as_array().unwrap();
    let field = |f: &str| changes.iter().find(|c| c["field"] == f).cloned();
    let swap = field("class_type").expect("the VAE decode is swapped");
    assert_eq!(
        (&swap["node"], &swap["from"], &swap["to"]),
        (&json!("8"), &json!("VAEDecode"), &json!("VAEDecodeTiled"))
    );
    assert!(
        swap["reason"]
            .as_str()
            .unwrap()
            .contains("512.0 MiB usable"),
        "{swap}"
    );
    assert_eq!(o["prompt"]["8"]["class_type"], "VAEDecodeTiled");
    assert_eq!(o["prompt"]["8"]["inputs"]["samples"], json!(["3", 0]));
    assert_eq!(o["prompt"]["8"]["inputs"]["overlap"], 64);
    let profile = field("extra_data.nova.profile").unwrap();
    assert_eq!(o["extra_data"]["nova"]["profile"], profile["to"]);
    assert_eq!(
        o["extra_data"]["nova"]["vram_budget"], "512MiB",
        "the user's settings stay"
    );
    assert!(o["extra_data"]["nova"]["tile_size"].is_u64());
    // Nothing else of the workflow changed.
    for id in ["3", "4", "5", "6", "7", "9"] {
        assert_eq!(o["prompt"][id], wf[id], "node {id}");
    }
    // What it answers is what the planner admits, and optimizing it again changes nothing.
    let again = json!({"prompt": o["prompt"], "extra_data": o["extra_data"]});
    let (code, plan) = post(&http, &s.url("/api/plan"), &again).await;
    assert_eq!((code, &plan["fits"]), (200, &json!(true)), "{plan}");
    let (_, o2) = post(&http, &s.url("/api/optimize"), &again).await;
    assert_eq!(o2["changes"], json!([]), "{o2}");
    // A workflow that is not valid is ComfyUI's 400 body, naming the node.
    let mut bad = wf.clone();
    bad["8"]["inputs"]["vae"] = json!(["99", 0]);
    let (code, err) = post(&http, &s.url("/api/optimize"), &json!({"prompt": bad})).await;
    assert_eq!(code, 400, "{err}");
    assert!(
        err["node_errors"]["8"].is_object() || err["error"].is_object(),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_together_stay_within_the_budget() {
    let data = data_dir("budget");
    let s = Server::start(
        data.path(),
        &[
            "--max-jobs",
            "2",
            "--vram-budget",
            "96MiB",
            "--headroom",
            "0",
        ],
    );
    let http = reqwest::Client::new();
    let a = submit(&http, &s, json!({"prompt": slow_workflow()})).await;
    let b = submit(&http, &s, json!({"prompt": slow_workflow()})).await;
    let usable = 96u64 << 20;
    let (mut max_reserved, mut max_running) = (0u64, 0usize);
    let t = Instant::now();
    loop {
        let (_, st) = get(&http, &s.url("/api/system/stats")).await;
        assert_eq!(st["device"]["usable_bytes"], usable);
        max_reserved = max_reserved.max(st["device"]["reserved_bytes"].as_u64().unwrap());
        max_running = max_running.max(st["queue"]["running"].as_u64().unwrap() as usize);
        let (_, ha) = get(&http, &s.url(&format!("/history/{a}"))).await;
        let (_, hb) = get(&http, &s.url(&format!("/history/{b}"))).await;
        if ha.get(&a).is_some() && hb.get(&b).is_some() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(180));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        max_reserved > 0 && max_reserved <= usable,
        "reserved {max_reserved} of {usable}"
    );
    assert!(max_running >= 1);
    for id in [&a, &b] {
        let (_, j) = get(&http, &s.url(&format!("/api/jobs/{id}"))).await;
        assert_eq!(j["state"], "success", "{j}");
        // The run's time split is kept with the job, per node too.
        let t = &j["timing"];
        assert!(t["compute_ms"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["startup_ms"].as_f64().unwrap() >= 0.0, "{t}");
        assert_eq!(t["nodes"].as_array().unwrap().len(), 4, "{t}");
        let peak = j["tracked_peak_bytes"].as_u64().unwrap();
        let forecast = j["forecast_peak_bytes"].as_u64().unwrap();
        assert!(peak <= usable && forecast <= usable, "{j}");
    }
    let (_, st) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(st["device"]["reserved_bytes"], 0);
    // A job cannot widen the service's budget, by a budget or by a bigger profile.
    for nova in [
        json!({"vram_budget": "8GiB"}),
        json!({"profile": "RTX_MODERN"}),
    ] {
        let (code, plan) = post(
            &http,
            &s.url("/api/plan"),
            &json!({"prompt": quick_workflow("p"), "extra_data": {"nova": nova}}),
        )
        .await;
        assert_eq!(code, 200, "{plan}");
        assert!(
            plan["budget_bytes"].as_u64().unwrap() <= 96 << 20,
            "{nova}: {plan}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_queue_accepts_jobs_and_starts_none_until_released() {
    let data = data_dir("pause");
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();
    let (code, _) = post(&http, &s.url("/api/queue/pause"), &json!({})).await;
    assert_eq!(code, 200);
    let id = submit(&http, &s, json!({"prompt": quick_workflow("held")})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, job) = get(&http, &s.url(&format!("/api/jobs/{id}"))).await;
    assert_eq!(job["state"], "queued");
    assert_eq!(job["queue_position"], 0);
    let (_, st) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(st["queue"]["paused"], true);
    post(&http, &s.url("/api/queue/resume"), &json!({})).await;
    assert_eq!(
        wait_history(&http, &s, &id).await["status"]["status_str"],
        "success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_fails_ends_with_comfyui_s_error_and_the_next_job_runs() {
    let data = data_dir("fail");
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();
    let mut w = ws(&s, "c").await;
    next(&mut w).await;
    post(&http, &s.url("/api/queue/pause"), &json!({})).await;
    std::fs::copy(
        data.path().join("input/card.png"),
        data.path().join("input/gone.png"),
    )
    .unwrap();
    let wf = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "gone.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "gone"}}
    });
    let bad = submit(&http, &s, json!({"prompt": wf, "client_id": "c"})).await;
    // A truncated file passes validation (its header is whole) and fails while running.
    let png = std::fs::read(data.path().join("input/card.png")).unwrap();
    std::fs::write(data.path().join("input/cut.png"), &png[..png.len() - 40]).unwrap();
    let wf = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "cut.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cut"}}
    });
    let cut = submit(&http, &s, json!({"prompt": wf, "client_id": "c"})).await;
    let good = submit(
        &http,
        &s,
        json!({"prompt": quick_workflow("after"), "client_id": "c"}),
    )
    .await;
    // The file goes away while the job waits: it fails when its turn comes.
    std::fs::remove_file(data.path().join("input/gone.png")).unwrap();
    post(&http, &s.url("/api/queue/resume"), &json!({})).await;
    let msgs = until_done(&mut w, &bad).await;
    let err = msgs
        .iter()
        .find(|m| m["type"] == "execution_error")
        .expect("execution_error");
    for k in [
        "prompt_id",
        "node_id",
        "node_type",
        "executed",
        "exception_message",
        "exception_type",
        "traceback",
        "current_inputs",
        "current_outputs",
        "timestamp",
    ] {
        assert!(
            err["data"].get(k).is_some(),
            "execution_error lacks {k}: {err}"
        );
    }
    assert!(
        err["data"]["exception_message"]
            .as_str()
            .unwrap()
            .contains("gone.png"),
        "{err}"
    );
    let e = wait_history(&http, &s, &bad).await;
    assert_eq!(e["status"]["status_str"], "error");
    let msgs = until_done(&mut w, &cut).await;
    let err = msgs
        .iter()
        .find(|m| m["type"] == "execution_error")
        .expect("execution_error");
    assert_eq!(err["data"]["node_id"], "1", "{err}");
    assert_eq!(err["data"]["node_type"], "LoadImage", "{err}");
    assert_eq!(
        wait_history(&http, &s, &good).await["status"]["status_str"],
        "success"
    );
}
