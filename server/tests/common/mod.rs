//! Helpers shared by the service's end-to-end tests: a real `nova serve` on a loopback port,
//! driven over real HTTP (reqwest) and WebSocket (tokio-tungstenite). Each test binary uses
//! a different subset of them.
#![allow(dead_code)]

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running `nova serve`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

/// The `nova` binary under test: this build's, or `NOVA_TEST_BIN` (another build, e.g. an
/// older one to see a defect a test reproduces, or a release build).
pub fn nova_bin() -> std::ffi::OsString {
    std::env::var_os("NOVA_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_nova").into())
}

/// `serve` on an ephemeral loopback port with `data` as its data folder, two workers.
pub fn serve_args(data: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = ["serve", "--listen", "127.0.0.1:0", "--data-dir"]
        .iter()
        .map(Into::into)
        .collect();
    v.push(data.into());
    v.extend(["--workers", "2"].iter().map(Into::into));
    v
}

impl Server {
    pub fn start(data: &Path, args: &[&str]) -> Server {
        let mut cmd = Command::new(nova_bin());
        cmd.args(serve_args(data)).args(args);
        Server::spawn(cmd)
    }

    /// Starts a `nova serve` command line (its stderr is read for the address it listens on).
    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .env_remove("NOVA_API_TOKEN")
            .env_remove("NOVA_STUDIO_DIR")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting nova serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start: {}", log.lock().unwrap()));
        Server { child, addr, log }
    }

    /// Whether the service process is still running (not exited, not a zombie).
    pub fn child_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
            })
            .is_some_and(|dead| !dead)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn data_dir(tag: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("nova-serve-{tag}-"))
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(d.path().join("input")).unwrap();
    std::fs::copy(
        repo().join("examples/input/card.png"),
        d.path().join("input/card.png"),
    )
    .unwrap();
    d
}

/// Writes a `w`x`h` RGB PNG of noise (xorshift from `seed`) at `path`: tiles of it encode to
/// real JPEGs of some size, so previews fill sockets.
pub fn noise_png(path: &Path, w: u32, h: u32, seed: u32) {
    let mut s = seed.max(1);
    let noise: Vec<u8> = (0..w * h * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 24) as u8
        })
        .collect();
    image::RgbImage::from_raw(w, h, noise)
        .unwrap()
        .save(path)
        .unwrap();
}

pub fn example() -> Value {
    let text =
        std::fs::read_to_string(repo().join("examples/workflows/sharpen_upscale.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A job that takes a while: a large blur, tiled small.
pub fn slow_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1536, "height": 1536, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 8.0}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 31, "sigma": 8.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "slow"}}
    })
}

pub fn quick_workflow(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0xff0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    })
}

pub async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn submit(http: &reqwest::Client, s: &Server, body: Value) -> String {
    let (code, v) = post(http, &s.url("/prompt"), &body).await;
    assert_eq!(code, 200, "submission refused: {v}");
    v["prompt_id"].as_str().unwrap().to_string()
}

pub async fn ws(s: &Server, client_id: &str) -> Ws {
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?clientId={client_id}", s.addr))
            .await
            .unwrap();
    ws
}

/// The next text message as JSON (binary frames are returned as `{"binary": len, "kind": type}`).
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), ws.next())
            .await
            .expect("a message within 120 s")
            .expect("socket open")
            .expect("no socket error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Binary(b) => {
                let kind = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                let mut v = json!({"binary": b.len(), "kind": kind});
                if kind == 4 {
                    let n = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
                    v["meta"] = serde_json::from_slice(&b[8..8 + n]).unwrap();
                }
                return v;
            }
            _ => continue,
        }
    }
}

/// Messages until `executing` with `node: null` for `prompt_id` (ComfyUI's end of a job).
pub async fn until_done(ws: &mut Ws, prompt_id: &str) -> Vec<Value> {
    let mut got = vec![];
    loop {
        let m = next(ws).await;
        let end = m["type"] == "executing"
            && m["data"]["node"].is_null()
            && m["data"]["prompt_id"] == prompt_id;
        got.push(m);
        if end {
            return got;
        }
    }
}

pub async fn wait_history(http: &reqwest::Client, s: &Server, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let (_, h) = get(http, &s.url(&format!("/history/{id}"))).await;
        if let Some(e) = h.get(id) {
            return e.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "job {id} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until some job runs.
pub async fn wait_running(http: &reqwest::Client, s: &Server) {
    let t = Instant::now();
    loop {
        let (_, q) = get(http, &s.url("/queue")).await;
        if q["queue_running"].as_array().is_some_and(|r| !r.is_empty()) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no job started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn index_of(msgs: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    msgs.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("message missing among {} messages", msgs.len()))
}

pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory(bytes).unwrap().to_rgb8();
    (img.width(), img.height(), img.into_raw())
}
