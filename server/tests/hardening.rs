//! `nova serve` under attack and careless use: each test reproduces one defect found that way
//! (duplicate ids, client numbers as queue keys, uploads that script the origin, huge graphs,
//! a full disk, a corrupt queue file, half-sent requests, webhooks aimed inside, links out of
//! the output folder, slow WebSocket clients) and holds the behaviour that replaced it. Real
//! binary, real HTTP and WebSocket, real files, real database.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// A `/prompt` body's error type (`error.type`).
fn error_type(v: &Value) -> &str {
    v["error"]["type"].as_str().unwrap_or("")
}

/// CPU seconds the process has used (utime + stime from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn pending_ids(http: &reqwest::Client, s: &Server) -> Vec<String> {
    let (_, q) = get(http, &s.url("/queue")).await;
    q["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_id_sent_eight_times_at_once_is_accepted_once_and_the_queue_keeps_moving() {
    let data = data_dir("dupid");
    let http = reqwest::Client::new();
    let mut s = Server::start(data.path(), &[]);
    let body = json!({"prompt": quick_workflow("dup"), "prompt_id": "same-id"});
    let url = s.url("/prompt");
    let answers = futures_util::future::join_all((0..8).map(|_| post(&http, &url, &body))).await;
    let accepted = answers.iter().filter(|(c, _)| *c == 200).count();
    assert_eq!(accepted, 1, "{answers:?}");
    for (c, v) in answers.iter().filter(|(c, _)| *c != 200) {
        assert_eq!(*c, 400, "{v}");
        assert_eq!(error_type(v), "duplicate_prompt_id", "{v}");
    }
    let e = wait_history(&http, &s, "same-id").await;
    assert_eq!(e["status"]["status_str"], "success");
    // An unrelated job after it runs, and the idle scheduler does not spin.
    let other = submit(&http, &s, json!({"prompt": quick_workflow("other")})).await;
    assert_eq!(
        wait_history(&http, &s, &other).await["status"]["status_str"],
        "success"
    );
    let pid = s.child.id();
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.5, "an idle service used {used:.2} CPU-s in 2 s");
    // And after a restart, the same.
    s.kill9();
    let s = Server::start(data.path(), &[]);
    let (c, v) = post(&http, &s.url("/prompt"), &body).await;
    assert_eq!((c, error_type(&v)), (400, "duplicate_prompt_id"), "{v}");
    let third = submit(&http, &s, json!({"prompt": quick_workflow("third")})).await;
    assert_eq!(
        wait_history(&http, &s, &third).await["status"]["status_str"],
        "success"
    );
    assert!(pending_ids(&http, &s).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_s_number_orders_the_queue_but_never_keys_it() {
    let data = data_dir("number");
    let http = reqwest::Client::new();
    let mut s = Server::start(data.path(), &[]);
    let (c, _) = post(&http, &s.url("/api/queue/pause"), &json!({})).await;
    assert_eq!(c, 200);
    let with =
        |prefix: &str, number: Value| json!({"prompt": quick_workflow(prefix), "number": number});
    let a = submit(&http, &s, with("a", json!(5))).await;
    let b = submit(&http, &s, with("b", json!(5))).await;
    let d = submit(&http, &s, json!({"prompt": quick_workflow("d")})).await;
    let e = submit(&http, &s, with("e", json!(-3.0))).await;
    for bad in [
        json!(1e300),
        json!(-1e300),
        json!(0.5),
        json!("7"),
        json!(9007199254740993u64),
    ] {
        let (c, v) = post(&http, &s.url("/prompt"), &with("x", bad.clone())).await;
        assert_eq!((c, error_type(&v)), (400, "invalid_number"), "{bad}: {v}");
    }
    // ComfyUI's order: by number (the service's own counter starts at 0), ties in submission
    // order; every accepted job is listed.
    assert_eq!(
        pending_ids(&http, &s).await,
        [e.clone(), d.clone(), a.clone(), b.clone()]
    );
    // The held state survives a restart; so does every queued job.
    s.kill9();
    let s = Server::start(data.path(), &[]);
    let (_, stats) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(stats["queue"]["paused"], true, "{stats}");
    assert_eq!(
        pending_ids(&http, &s).await,
        [e.clone(), d.clone(), a.clone(), b.clone()]
    );
    let (c, v) = post(
        &http,
        &s.url("/prompt"),
        &json!({"prompt": quick_workflow("f")}),
    )
    .await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["number"], 1, "the service's counter continues: {v}");
    let f = v["prompt_id"].as_str().unwrap().to_string();
    let (c, _) = post(&http, &s.url("/api/queue/resume"), &json!({})).await;
    assert_eq!(c, 200);
    for id in [&e, &d, &a, &b, &f] {
        assert_eq!(
            wait_history(&http, &s, id).await["status"]["status_str"],
            "success",
            "{id}"
        );
    }
    assert!(pending_ids(&http, &s).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_over_the_node_cap_get_413_naming_the_cap() {
    let data = data_dir("cap");
    let http = reqwest::Client::new();
    let s = Server::start(data.path(), &["--max-nodes", "50"]);
    let mut wf = serde_json::Map::new();
    wf.insert(
        "1".into(),
        json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}),
    );
    for i in 2..=51 {
        wf.insert(
            i.to_string(),
            json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}),
        );
    }
    for path in ["/prompt", "/api/plan", "/api/optimize"] {
        let (c, v) = post(&http, &s.url(path), &json!({"prompt": wf})).await;
        assert_eq!(c, 413, "{path}: {v}");
        assert_eq!(error_type(&v), "too_many_nodes", "{path}: {v}");
        assert!(v.to_string().contains("51 nodes"), "{v}");
    }
}

/// Starts `nova serve` on `data`, expecting it to stop at once: (exit code, stderr).
fn serve_exits(data: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(nova_bin())
        .args(serve_args(data))
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_empty_queue_file_is_exit_5_naming_it_and_can_be_moved_aside() {
    let data = data_dir("corrupt");
    let http = reqwest::Client::new();
    let db = data.path().join("queue.redb");
    {
        let mut s = Server::start(data.path(), &[]);
        let (c, _) = post(&http, &s.url("/api/queue/pause"), &json!({})).await;
        assert_eq!(c, 200);
        for i in 0..40 {
            submit(
                &http,
                &s,
                json!({"prompt": quick_workflow(&format!("j{i}"))}),
            )
            .await;
        }
        s.kill9();
    }
    let full = std::fs::read(&db).unwrap();
    for pct in [0, 5, 25, 50, 75, 99] {
        std::fs::write(&db, &full[..full.len() * pct / 100]).unwrap();
        let (code, err) = serve_exits(data.path(), &[]);
        assert_eq!(code, 5, "cut at {pct}%: {err}");
        assert!(err.contains(&db.display().to_string()), "{pct}%: {err}");
        assert!(err.contains("--reset-corrupt-queue"), "{pct}%: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // With the flag the damaged file is kept aside and the service starts empty.
    let s = Server::start(data.path(), &["--reset-corrupt-queue"]);
    assert!(s.log.lock().unwrap().contains("moved it aside"));
    let kept: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("queue.redb.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        std::fs::metadata(kept[0].path()).unwrap().len(),
        (full.len() * 99 / 100) as u64
    );
    let id = submit(&http, &s, json!({"prompt": quick_workflow("after")})).await;
    assert_eq!(
        wait_history(&http, &s, &id).await["status"]["status_str"],
        "success"
    );
    // The flag never touches a healthy file.
    drop(s);
    let s = Server::start(data.path(), &["--reset-corrupt-queue"]);
    let (_, h) = get(&http, &s.url(&format!("/history/{id}"))).await;
    assert!(h.get(&id).is_some(), "{h}");
}

/// Runs `nova serve` in a mount namespace of its own whose data folder is a tmpfs of `size`
/// (unshare: user and mount namespaces, which need no privileges on this kind of machine), so
/// the test can fill the disk. The data folder's files are reached from outside through
/// `/proc/<pid>/root`.
fn serve_on_small_disk(data: &std::path::Path, size: &str) -> Server {
    let nova = nova_bin();
    let script = format!(
        "mount -t tmpfs -o size={size} nova-test \"$0\" && mkdir -p \"$0/input\" && cp \"$1\" \"$0/input/\" && shift && exec \"$@\""
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .arg(data)
        .arg(repo().join("examples/input/card.png"))
        .arg(nova)
        .args(serve_args(data));
    Server::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_the_service_and_it_recovers_when_space_is_back() {
    let data = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let s = serve_on_small_disk(data.path(), "16m");
    let inside = std::path::PathBuf::from(format!("/proc/{}/root", s.child.id()))
        .join(data.path().strip_prefix("/").unwrap());
    let before = submit(&http, &s, json!({"prompt": quick_workflow("before")})).await;
    assert_eq!(
        wait_history(&http, &s, &before).await["status"]["status_str"],
        "success"
    );
    let (c, h) = get(&http, &s.url("/health")).await;
    assert_eq!((c, h["status"].as_str()), (200, Some("ok")), "{h}");
    // Fill the disk.
    let filler = inside.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 16];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    // Submissions fail cleanly (nothing acknowledged that was not stored) until writes commit
    // again; the service says it is degraded.
    let mut refused = None;
    for i in 0..50 {
        let big = json!({"prompt": quick_workflow(&format!("full{i}")), "extra_data": {"pad": "x".repeat(256 << 10)}});
        let (c, v) = post(&http, &s.url("/prompt"), &big).await;
        if c != 200 {
            refused = Some((c, v));
            break;
        }
    }
    let (c, v) = refused.expect("a submission is refused once the disk is full");
    assert_eq!(c, 503, "{v}");
    let (c, h) = get(&http, &s.url("/health")).await;
    assert_eq!((c, h["status"].as_str()), (503, Some("degraded")), "{h}");
    assert!(h["queue_db"]["reason"].is_string(), "{h}");
    let (_, stats) = get(&http, &s.url("/system_stats")).await;
    assert!(stats["system"].is_object());
    assert_eq!(stats["nova"]["status"], "degraded", "{stats}");
    // Space comes back: the service recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    loop {
        let (c, _) = get(&http, &s.url("/health")).await;
        if c == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = submit(&http, &s, json!({"prompt": quick_workflow("after")})).await;
    assert_eq!(
        wait_history(&http, &s, &after).await["status"]["status_str"],
        "success"
    );
    let (_, h) = get(&http, &s.url(&format!("/history/{before}"))).await;
    assert!(
        h.get(&before).is_some(),
        "the history before the failure is kept"
    );
}

async fn upload(http: &reqwest::Client, s: &Server, name: &str, bytes: Vec<u8>) -> (u16, String) {
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
        )
        .text("type", "input");
    let r = http
        .post(s.url("/upload/image"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn ffmpeg_file(dir: &std::path::Path, name: &str, args: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg made {name}");
    std::fs::read(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_accepted_by_what_they_are_and_user_files_cannot_script_the_origin() {
    let data = data_dir("xss");
    let http = reqwest::Client::new();
    let s = Server::start(data.path(), &[]);
    // An XHTML page whose bytes 4..8 read "ftyp", and whose script drives the API.
    let evil = b"<!--ftyp--><html xmlns=\"http://www.w3.org/1999/xhtml\"><script>fetch('/api/queue/pause',{method:'POST'})</script></html>".to_vec();
    for name in [
        "evil.xml",
        "evil.mp4",
        "evil.mov",
        "evil.png",
        "evil.html",
        "evil",
    ] {
        let (c, m) = upload(&http, &s, name, evil.clone()).await;
        assert_eq!(c, 415, "{name}: {m}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mp4 = ffmpeg_file(
        dir.path(),
        "clip.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=64x48:rate=8:duration=1",
            "-pix_fmt",
            "yuv420p",
        ],
    );
    let wav = ffmpeg_file(
        dir.path(),
        "tone.wav",
        &["-f", "lavfi", "-i", "sine=duration=0.2"],
    );
    let png = std::fs::read(repo().join("examples/input/card.png")).unwrap();
    // Real files of their claimed kind are taken; the same bytes under another kind's name
    // are not.
    for (name, bytes, ok) in [
        ("clip.mp4", mp4.clone(), true),
        ("tone.wav", wav.clone(), true),
        ("pic.png", png.clone(), true),
        ("tone.mp4", wav.clone(), false),
        ("clip.wav", mp4.clone(), false),
        ("pic.jpg", png.clone(), false),
        // A PNG signature followed by a page.
        ("fake.png", [&png[..8], &evil[..]].concat(), false),
    ] {
        let (c, m) = upload(&http, &s, name, bytes).await;
        assert_eq!(c == 200, ok, "{name}: {c} {m}");
    }
    // Files already in a folder (put there by anyone) are served as media or as downloads,
    // never as pages, and always under a policy that forbids scripts.
    std::fs::write(data.path().join("input/evil.xml"), &evil).unwrap();
    std::fs::write(data.path().join("input/page.html"), &evil).unwrap();
    std::fs::write(data.path().join("input/pic.svg"), &evil).unwrap();
    for (name, mime, inline) in [
        ("evil.xml", "application/octet-stream", false),
        ("page.html", "application/octet-stream", false),
        ("pic.svg", "application/octet-stream", false),
        ("pic.png", "image/png", true),
        ("clip.mp4", "video/mp4", true),
        ("tone.wav", "audio/wav", true),
    ] {
        let r = http
            .get(s.url(&format!("/view?filename={name}&type=input")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let h = r.headers();
        assert_eq!(h["content-type"], mime, "{name}");
        let disp = h["content-disposition"].to_str().unwrap();
        assert_eq!(disp.starts_with("inline"), inline, "{name}: {disp}");
        assert_eq!(disp.starts_with("attachment"), !inline, "{name}: {disp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("sandbox"),
            "{csp}"
        );
    }
    let (_, stats) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(stats["queue"]["paused"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_never_writes_through_a_link_out_of_its_output_folder() {
    let data = data_dir("links");
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("output")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), data.path().join("output/link")).unwrap();
    let http = reqwest::Client::new();
    let s = Server::start(data.path(), &[]);
    let id = submit(&http, &s, json!({"prompt": quick_workflow("link/x")})).await;
    let h = wait_history(&http, &s, &id).await;
    assert_eq!(h["status"]["status_str"], "error", "{h}");
    assert!(h.to_string().contains("symbolic link"), "{h}");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    // Uploads into a linked subfolder are refused too.
    std::os::unix::fs::symlink(elsewhere.path(), data.path().join("input/up")).unwrap();
    let png = std::fs::read(repo().join("examples/input/card.png")).unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png).file_name("a.png"),
        )
        .text("subfolder", "up");
    let r = http
        .post(s.url("/upload/image"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fills_the_disk_fails_the_job_and_leaves_no_file() {
    let data = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let s = serve_on_small_disk(data.path(), "16m");
    let inside = std::path::PathBuf::from(format!("/proc/{}/root", s.child.id()))
        .join(data.path().strip_prefix("/").unwrap());
    // 60 s of stereo noise as 32-bit float: 23 MB, more than the disk holds.
    let wf = json!({
        "1": {"class_type": "AudioNoise", "inputs": {"color": "white", "amplitude": 0.5, "duration": 60.0, "sample_rate": 48000, "channels": 2, "seed": 1}},
        "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "noise"}}
    });
    let id = submit(&http, &s, json!({"prompt": wf})).await;
    let h = wait_history(&http, &s, &id).await;
    assert_eq!(h["status"]["status_str"], "error", "{h}");
    assert!(h.to_string().contains("No space left"), "{h}");
    let left: Vec<String> = std::fs::read_dir(inside.join("output"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The next job (which fits) runs.
    let ok = submit(&http, &s, json!({"prompt": quick_workflow("fits")})).await;
    assert_eq!(
        wait_history(&http, &s, &ok).await["status"]["status_str"],
        "success"
    );
}

/// An ImageInvert chain of `n` nodes in all.
fn invert_chain(n: usize) -> Value {
    let mut wf = serde_json::Map::new();
    wf.insert(
        "1".into(),
        json!({"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}),
    );
    for i in 2..n {
        wf.insert(
            i.to_string(),
            json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}),
        );
    }
    wf.insert(
        n.to_string(),
        json!({"class_type": "SaveImage", "inputs": {"images": [(n - 1).to_string(), 0], "filename_prefix": "c"}}),
    );
    Value::Object(wf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_large_graphs_does_not_hold_up_other_requests() {
    let data = data_dir("bigplan");
    let http = reqwest::Client::new();
    let s = Server::start(data.path(), &["--max-nodes", "20000"]);
    get(&http, &s.url("/object_info")).await;
    let body = json!({"prompt": invert_chain(10_000)});
    // Plans of 10,000 nodes at once, more than the service has async threads (one per core)
    // on any machine, and a stats request just behind them: it is answered before any of the
    // plans.
    let n = std::thread::available_parallelism().map_or(2, |n| n.get()) + 2;
    let url = s.url("/api/plan");
    let mut plans: futures_util::stream::FuturesUnordered<_> =
        (0..n).map(|_| post(&http, &url, &body)).collect();
    let stats = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        get(&http, &s.url("/system_stats")).await
    };
    let first = tokio::select! {
        biased;
        (c, _) = stats => { assert_eq!(c, 200); "stats" }
        _ = futures_util::StreamExt::next(&mut plans) => "a plan",
    };
    assert_eq!(first, "stats", "/system_stats waited for the plans");
    while let Some((c, v)) = futures_util::StreamExt::next(&mut plans).await {
        assert_eq!(c, 200, "{v}");
        assert_eq!(v["nodes"].as_array().map(Vec::len), Some(10_000));
    }
}

/// A request over the connection cap: answered 503 at once (or closed).
async fn assert_busy(s: &Server) {
    match reqwest::Client::new()
        .get(s.url("/system_stats"))
        .send()
        .await
    {
        Ok(r) => assert_eq!(r.status(), 503),
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }
}

/// Opens `n` connections that each send half a request and then nothing.
async fn half_sent(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /system_stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
            .unwrap();
        v.push(c);
    }
    v
}

/// Whether the server closed `c` (a read returns end of file or an error, not data
/// pending).
async fn closed_by_server(c: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An error answer (408) before the close is fine.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_cannot_make_the_service_unreachable() {
    let data = data_dir("slowloris");
    let s = Server::start(data.path(), &["--header-timeout", "2"]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut slow = half_sent(&s.addr, 1100).await;
    // The service still answers while 1,100 requests hang half-sent…
    let (c, _) = get(&http, &s.url("/system_stats")).await;
    assert_eq!(c, 200);
    // …and closes them once their headers are overdue.
    let mut closed = 0;
    for c in slow.iter_mut().step_by(50) {
        closed += usize::from(closed_by_server(c).await);
    }
    assert_eq!(closed, 22, "every sampled half-sent request was closed");
    // A kept-alive connection that sends nothing more is closed too.
    let mut idle = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    assert!(closed_by_server(&mut idle).await);
    drop(slow);
    // Over the connection cap: answered 503 at once, never left waiting.
    drop(s);
    let s = Server::start(
        data.path(),
        &["--header-timeout", "30", "--max-connections", "20"],
    );
    let held = half_sent(&s.addr, 20).await;
    assert_busy(&s).await;
    // WebSockets count too, for as long as they are open.
    drop(held);
    drop(s);
    let s = Server::start(data.path(), &["--max-connections", "20"]);
    let mut sockets = vec![];
    for i in 0..20 {
        sockets.push(ws(&s, &format!("c{i}")).await);
    }
    assert_busy(&s).await;
    drop(sockets);
    let t = Instant::now();
    loop {
        let r = reqwest::Client::new()
            .get(s.url("/system_stats"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_must_name_the_service_and_tokens_stay_out_of_urls() {
    let data = data_dir("hosts");
    let s = Server::start(data.path(), &["--token", "s3cret"]);
    let port = s.addr.rsplit_once(':').unwrap().1.to_string();
    let http = reqwest::Client::new();
    let send = |host: &str, origin: Option<&str>, query: &str| {
        let mut r = http
            .get(s.url(&format!("/queue{query}")))
            .header("Host", host)
            .bearer_auth("s3cret");
        if let Some(o) = origin {
            r = r.header("Origin", o);
        }
        r.send()
    };
    for (host, origin, want) in [
        (format!("127.0.0.1:{port}"), None, 200),
        (
            format!("localhost:{port}"),
            Some(format!("http://localhost:{port}")),
            200,
        ),
        // DNS rebinding: the attacker's name resolves to 127.0.0.1.
        (format!("rebind.attacker.test:{port}"), None, 403),
        (
            format!("rebind.attacker.test:{port}"),
            Some(format!("http://rebind.attacker.test:{port}")),
            403,
        ),
        (
            format!("127.0.0.1:{port}"),
            Some("http://evil.example".into()),
            403,
        ),
        (format!("127.0.0.1:{port}"), Some("null".into()), 403),
    ] {
        let r = send(&host, origin.as_deref(), "").await.unwrap();
        assert_eq!(r.status(), want, "Host {host}, Origin {origin:?}");
    }
    // A non-ASCII Origin is refused, not skipped.
    let r = http
        .get(s.url("/queue"))
        .bearer_auth("s3cret")
        .header(
            "Origin",
            reqwest::header::HeaderValue::from_bytes(b"http://\xe9vil.example").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // ?token= opens the WebSocket handshake only.
    let r = http.get(s.url("/queue?token=s3cret")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (mut w, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token=s3cret", s.addr))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await["type"], "status");
    // Over-long paths and declared lengths.
    let r = http
        .get(s.url(&format!("/{}", "a".repeat(6000))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 414);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    c.write_all(
        format!(
            "POST /prompt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer s3cret\r\nContent-Length: {}\r\n\r\n",
            u64::MAX - 2
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"));
}

/// A receiver on loopback that counts hits and answers each with `answer` (a status, and
/// the `Location` in `location` once set, for redirects).
async fn receiver(
    answer: u16,
    location: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let h = h.clone();
            let location = location.lock().unwrap().clone();
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = axum::http::Response::builder().status(answer);
                if let Some(l) = location {
                    r = r.header("Location", l);
                }
                r.body(axum::body::Body::empty()).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

async fn webhooks_of(http: &reqwest::Client, s: &Server, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let (_, job) = get(http, &s.url(&format!("/api/jobs/{id}"))).await;
        if job["webhooks"].as_array().is_some_and(|w| !w.is_empty()) {
            return job["webhooks"].clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no delivery recorded: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_webhooks_reach_only_what_the_operator_allows() {
    let http = reqwest::Client::new();
    let job = |url: &str| json!({"prompt": quick_workflow("hook"), "extra_data": {"nova": {"webhook": url}}});
    // Off unless the operator allows targets.
    let data = data_dir("hook-off");
    let s = Server::start(data.path(), &[]);
    let (ok_addr, _) = receiver(200, Default::default()).await;
    let (c, v) = post(
        &http,
        &s.url("/prompt"),
        &job(&format!("http://{ok_addr}/hook")),
    )
    .await;
    assert_eq!((c, error_type(&v)), (400, "invalid_webhook"), "{v}");
    drop(s);

    // Allowed: the receivers' ports. The service itself, however spelled, is not; and a
    // receiver that redirects to the service is not followed.
    let location = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (redir_addr, redir_hits) = receiver(307, location.clone()).await;
    let (fail_addr, _) = receiver(500, Default::default()).await;
    let data = data_dir("hook-on");
    let s = Server::start(
        data.path(),
        &[
            "--webhook-allow",
            &ok_addr,
            "--webhook-allow",
            &redir_addr,
            "--webhook-allow",
            &fail_addr,
            "--webhook-attempts",
            "2",
        ],
    );
    let service_port = s.addr.rsplit_once(':').unwrap().1.to_string();
    let pause = format!("http://127.0.0.1:{service_port}/api/queue/pause");
    *location.lock().unwrap() = Some(pause.clone());
    let mut messages = std::collections::BTreeSet::new();
    for url in [
        pause.clone(),
        format!("http://localhost:{service_port}/api/queue/pause"),
        format!("http://2130706433:{service_port}/api/queue/pause"),
        format!("http://0x7f.0.0.1:{service_port}/api/queue/pause"),
        format!("http://127.1:{service_port}/api/queue/pause"),
        format!("http://[::ffff:127.0.0.1]:{service_port}/"),
        // Other ports of the same host: the list names ports.
        "http://127.0.0.1:1/".to_string(),
        "http://127.0.0.1:22/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let (c, v) = post(&http, &s.url("/prompt"), &job(&url)).await;
        assert_eq!((c, error_type(&v)), (400, "invalid_webhook"), "{url}: {v}");
        messages.insert(v["error"]["message"].to_string());
    }
    assert_eq!(messages.len(), 1, "refusals differ: {messages:?}");
    // The redirect is not followed: one hit per attempt at the receiver, the queue not held.
    let id = submit(&http, &s, job(&format!("http://{redir_addr}/hook"))).await;
    let w = webhooks_of(&http, &s, &id).await;
    assert_eq!(w[0]["delivered"], false, "{w}");
    assert_eq!(redir_hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    let (_, stats) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(
        stats["queue"]["paused"], false,
        "a webhook paused the queue"
    );
    // A failing receiver and a refusing one read the same in the record.
    let failed = submit(&http, &s, job(&format!("http://{fail_addr}/hook"))).await;
    let wf = webhooks_of(&http, &s, &failed).await;
    assert_eq!(wf[0]["last_error"], w[0]["last_error"]);
    // An allowed receiver gets the job's outcome.
    let ok = submit(&http, &s, job(&format!("http://{ok_addr}/hook"))).await;
    let w = webhooks_of(&http, &s, &ok).await;
    assert_eq!(w[0]["delivered"], true, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_websocket_clients_hold_nothing_and_a_fast_one_misses_nothing() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let data = data_dir("fanout");
    // A noisy image, so that tile frames are real JPEGs of some size.
    noise_png(&data.path().join("input/noise.png"), 1024, 1024, 0x9E3779B9);
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();
    let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "nova_events": true}}).to_string();
    // 199 clients of the same viewer that negotiate everything and then never read.
    let mut idle = vec![];
    for _ in 0..199 {
        let mut c = ws(&s, "viewer").await;
        c.send(Message::text(flags.clone())).await.unwrap();
        idle.push(c);
    }
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
        json!({"prompt": wf, "client_id": "viewer", "extra_data": {"nova": {"tile_size": 16}}}),
    )
    .await;
    let msgs = until_done(&mut fast, &id).await;
    // Every tile, and every message a ComfyUI client needs.
    let tiles: std::collections::BTreeSet<u64> = msgs
        .iter()
        .filter(|m| m["meta"]["nova"]["kind"] == "tile")
        .map(|m| m["meta"]["nova"]["tile_index"].as_u64().unwrap())
        .collect();
    let total = msgs
        .iter()
        .find_map(|m| m["meta"]["nova"]["tiles"].as_u64())
        .unwrap();
    assert!(total >= 4096, "{total} tiles");
    assert_eq!(tiles.len() as u64, total, "the fast client missed tiles");
    for t in [
        "execution_start",
        "execution_cached",
        "executed",
        "execution_success",
        "status",
    ] {
        assert!(msgs.iter().any(|m| m["type"] == t), "missed {t}");
    }
    for node in ["1", "2", "3"] {
        assert!(
            msgs.iter()
                .any(|m| m["type"] == "executing" && m["data"]["node"] == node),
            "missed executing {node}"
        );
    }
    let last_progress = msgs
        .iter()
        .rfind(|m| m["type"] == "progress" && m["data"]["node"] == "2")
        .unwrap();
    assert_eq!(last_progress["data"]["value"], last_progress["data"]["max"]);
    // What the service holds for its 200 clients is one bounded log, not 200 queues.
    let (_, stats) = get(&http, &s.url("/api/system/stats")).await;
    assert_eq!(stats["clients"]["websocket"], 200, "{stats}");
    let held = stats["clients"]["held_bytes"].as_u64().unwrap();
    assert!(held <= 64 << 20, "held {held} bytes for clients");
    // An idle client that reads at last still gets every result of the job, in order.
    let got = until_done(&mut idle[0], &id).await;
    let kinds: Vec<&str> = got
        .iter()
        .filter_map(|m| m["type"].as_str())
        .filter(|t| ["execution_start", "executed", "execution_success"].contains(t))
        .collect();
    assert_eq!(kinds, ["execution_start", "executed", "execution_success"]);
}

/// The resident and peak resident memory of process `pid`, in bytes.
fn rss_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_stream_to_disk_instead_of_memory() {
    let data = data_dir("bigupload");
    let s = Server::start(data.path(), &[]);
    let http = reqwest::Client::new();
    get(&http, &s.url("/system_stats")).await;
    // A WAV of 90 MiB of silence: a real file of its kind, large.
    let samples: u32 = 90 << 20;
    let mut wav = Vec::with_capacity(samples as usize + 44);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + samples).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&48000u32.to_le_bytes());
    wav.extend_from_slice(&(48000u32 * 4).to_le_bytes());
    wav.extend_from_slice(&4u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&samples.to_le_bytes());
    wav.resize(samples as usize + 44, 0);
    let (before, _) = rss_of(s.child.id());
    let uploads = (0..4).map(|i| {
        let form = reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(wav.clone()).file_name(format!("quiet{i}.wav")),
        );
        http.post(s.url("/upload/image")).multipart(form).send()
    });
    for r in futures_util::future::join_all(uploads).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    let (_, peak) = rss_of(s.child.id());
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "4 uploads of 90 MiB grew the service by {} MiB",
        grew >> 20
    );
    for i in 0..4 {
        let got = std::fs::metadata(data.path().join(format!("input/quiet{i}.wav"))).unwrap();
        assert_eq!(got.len(), wav.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_arriving_is_closed() {
    use tokio::io::AsyncWriteExt;
    let data = data_dir("slowbody");
    let s = Server::start(data.path(), &["--body-timeout", "1"]);
    let http = reqwest::Client::new();
    get(&http, &s.url("/system_stats")).await;
    // Whole headers of a 1,000-byte workflow, eleven bytes of it, then nothing: the header
    // timeout is behind it, so only the body's own timeout can free the connection.
    let mut c = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    c.write_all(
        format!(
            "POST /prompt HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"prompt\": ",
            s.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert!(
        closed_by_server(&mut c).await,
        "a stalled body held its connection for 30 s"
    );
    // The service is still there for everyone else.
    assert_eq!(get(&http, &s.url("/system_stats")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_cap_wait_their_turn_and_then_get_503() {
    use tokio::io::AsyncWriteExt;
    let data = data_dir("uploadcap");
    let s = Server::start(
        data.path(),
        &[
            "--max-uploads",
            "2",
            "--upload-wait",
            "1",
            "--body-timeout",
            "60",
        ],
    );
    let http = reqwest::Client::new();
    get(&http, &s.url("/system_stats")).await;
    let png = data.path().join("small.png");
    noise_png(&png, 16, 16, 7);
    let png = std::fs::read(&png).unwrap();
    let upload = |name: &str| {
        let form = reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(png.clone()).file_name(name.to_string()),
        );
        http.post(s.url("/upload/image")).multipart(form).send()
    };
    // Two uploads that send their headers and the start of a large file, then stall: they
    // hold both slots.
    let mut stalled = vec![];
    for i in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        let head = format!(
            "--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"slow{i}.png\"\r\nContent-Type: image/png\r\n\r\n"
        );
        c.write_all(
            format!(
                "POST /upload/image HTTP/1.1\r\nHost: {}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n{head}",
                s.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        c.write_all(&png[..8]).await.unwrap();
        stalled.push(c);
    }
    // A third waits its turn for --upload-wait, then is told to come back.
    let t = Instant::now();
    let mut refused = None;
    for k in 0.. {
        if t.elapsed() > Duration::from_secs(20) {
            break;
        }
        let name = format!("third{k}.png");
        let r = upload(&name).await.unwrap();
        if r.status() == 503 {
            refused = Some((r, name));
            break;
        }
        // The stalled uploads' requests may not have reached their handlers yet.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (r, name) = refused.expect("an upload over the cap was never refused");
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5")
    );
    assert!(!data.path().join("input").join(name).exists());
    // Once the stalled ones go, their slots come back.
    drop(stalled);
    let t = Instant::now();
    let placed = loop {
        let r = upload("fourth.png").await.unwrap();
        if r.status() == 200 {
            break r.json::<Value>().await.unwrap();
        }
        assert_eq!(r.status(), 503);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(placed["name"], "fourth.png", "{placed}");
    assert!(data.path().join("input/fourth.png").exists(), "{placed}");
}
