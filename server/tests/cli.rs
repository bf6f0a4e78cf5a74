//! The `nova` binary as a user meets it: exit codes, one clear message, no panic text.

use std::path::Path;
use std::process::{Command, Output};

/// The memory settings `nova` reads from the environment; tests set them explicitly.
const MEMORY_ENV: [&str; 6] = [
    "NOVA_PROFILE",
    "NOVA_VRAM_BUDGET",
    "NOVA_HEADROOM",
    "NOVA_ADMISSION",
    "NOVA_SAFETY_MARGIN",
    "NOVA_TILE_SIZE",
];

/// The `nova` binary under test: this build's, or `NOVA_TEST_BIN` (another build).
fn nova_bin() -> std::ffi::OsString {
    std::env::var_os("NOVA_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_nova").into())
}

fn nova(args: &[&str], cwd: &Path) -> Output {
    nova_with_env(args, cwd, &[])
}

fn nova_with_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(nova_bin());
    cmd.args(args).current_dir(cwd).env("RUST_BACKTRACE", "1");
    for k in MEMORY_ENV {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run nova")
}

/// `nova plan --json` output, parsed.
fn plan_json(out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("plan --json prints JSON")
}

struct Setup {
    dir: std::path::PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("nova-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("input")).unwrap();
        let samples: Vec<u8> = (0..48 * 40 * 3).map(|i| (i * 13 % 251) as u8).collect();
        nova_media::encode_png(&dir.join("input/card.png"), 48, 40, 3, &samples, &[]).unwrap();
        Setup { dir }
    }

    fn workflow(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.join(name), text).unwrap();
        name.to_string()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const OK: &str = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cli"}}
}"#;

fn assert_clean_failure(out: &Output, code: i32, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    for s in must_contain {
        assert!(stderr.contains(s), "stderr lacks {s:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "panic text leaked: {stderr}");
    assert!(!stderr.contains("backtrace"), "backtrace leaked: {stderr}");
}

#[test]
fn a_valid_workflow_runs_and_writes_its_output() {
    let s = Setup::new("ok");
    let wf = s.workflow("ok.json", OK);
    let out = nova(
        &[
            "run",
            &wf,
            "--tile-size",
            "16",
            "--events",
            "ev.jsonl",
            "--workers",
            "2",
        ],
        &s.dir,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.dir.join("output/cli_00001_.png").is_file());
    let events = std::fs::read_to_string(s.dir.join("ev.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines[0]["type"], "lifecycle");
    assert_eq!(lines.last().unwrap()["type"], "execution_success");
    let partials = lines
        .iter()
        .filter(|l| l["type"] == "output.partial.image")
        .count();
    assert_eq!(partials, 9, "48x40 in 16px tiles is 3x3");
}

#[test]
fn events_can_go_to_stdout() {
    let s = Setup::new("stdout");
    let wf = s.workflow("ok.json", OK);
    let out = nova(&["run", &wf, "--events", "-"], &s.dir);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    assert!(stdout.contains("\"execution_success\""));
}

#[test]
fn each_invalid_workflow_exits_3_with_node_and_input_named() {
    let s = Setup::new("invalid");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("json", "{\n \"1\": {\"class_type\": \n".to_string(), vec!["line 3"]),
        ("unknown", OK.replace("\"ImageBlur\"", "\"Blurry\""), vec!["node 2", "Blurry"]),
        ("missing", OK.replace("\"sigma\": 1.0", "\"sigmaa\": 1.0"), vec!["node 2", "'sigma'"]),
        ("type", OK.replace("[\"2\", 0]", "[\"1\", 1]"), vec!["node 3", "'images'", "MASK"]),
        ("index", OK.replace("[\"2\", 0]", "[\"2\", 4]"), vec!["node 3", "output 4"]),
        ("range", OK.replace("\"blur_radius\": 2", "\"blur_radius\": 64"), vec!["node 2", "'blur_radius'", "64"]),
        (
            "cycle",
            OK.replace("[\"1\", 0]", "[\"4\", 0]").replace(
                "\"3\": {",
                "\"4\": {\"class_type\": \"ImageInvert\", \"inputs\": {\"image\": [\"2\", 0]}},\n  \"3\": {",
            ),
            vec!["cycle through nodes 4 -> 2 -> 4"],
        ),
        ("file", OK.replace("card.png", "absent.png"), vec!["node 1", "'image'", "absent.png"]),
        (
            "huge",
            r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 16384, "height": 16384, "batch_size": 4096, "color": 0}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cli"}}}"#
                .to_string(),
            vec!["node 1", "GiB"],
        ),
    ];
    for (name, text, needles) in cases {
        let wf = s.workflow(&format!("{name}.json"), &text);
        let out = nova(&["run", &wf], &s.dir);
        assert_clean_failure(&out, 3, &needles);
        let written: Vec<_> = std::fs::read_dir(s.dir.join("output"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            written.is_empty(),
            "{name}: nothing may be written: {written:?}"
        );
    }
}

#[test]
fn a_failure_while_running_exits_4_naming_the_node() {
    let s = Setup::new("runfail");
    let good = std::fs::read(s.dir.join("input/card.png")).unwrap();
    std::fs::write(s.dir.join("input/cut.png"), &good[..good.len() - 40]).unwrap();
    let wf = s.workflow("cut.json", &OK.replace("card.png", "cut.png"));
    let out = nova(&["run", &wf], &s.dir);
    assert_clean_failure(&out, 4, &["node 1", "LoadImage", "cut.png"]);
}

#[test]
fn an_unreadable_workflow_file_exits_5() {
    let s = Setup::new("io");
    let out = nova(&["run", "does-not-exist.json"], &s.dir);
    assert_clean_failure(&out, 5, &["does-not-exist.json"]);
}

#[test]
fn bad_usage_exits_2() {
    let s = Setup::new("usage");
    let out = nova(&["run", "x.json", "--workers", "many"], &s.dir);
    assert_eq!(out.status.code(), Some(2));
    let wf = s.workflow("ok.json", OK);
    let out = nova(&["run", &wf, "--tile-size", "4"], &s.dir);
    assert_clean_failure(&out, 2, &["--tile-size", "16"]);
}

#[test]
fn non_ascii_text_in_a_workflow_is_saved_with_the_image() {
    let s = Setup::new("unicode");
    let wf = s.workflow("u.json", &OK.replace("\"cli\"", "\"café/東京\""));
    let out = nova(&["run", &wf], &s.dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(s.dir.join("output/café/東京_00001_.png")).unwrap();
    // The workflow rides along in a tEXt chunk, escaped to ASCII as ComfyUI writes it.
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("caf\\u00e9/\\u6771\\u4eac"),
        "prompt chunk missing"
    );
}

#[test]
fn nodes_prints_object_info_with_comfyui_names() {
    let s = Setup::new("nodes");
    let out = nova(&["nodes"], &s.dir);
    assert_eq!(out.status.code(), Some(0));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let blur = &info["ImageBlur"]["input"]["required"];
    assert_eq!(blur["image"][0], "IMAGE");
    assert_eq!(blur["blur_radius"][1]["max"], 31);
    assert_eq!(info["SaveImage"]["output_node"], true);
    assert_eq!(
        info["LoadImage"]["output"],
        serde_json::json!(["IMAGE", "MASK"])
    );
}

#[test]
fn plan_json_reports_profile_budget_forecast_and_fit_per_node() {
    let s = Setup::new("planjson");
    let wf = s.workflow("ok.json", OK);
    let out = nova(
        &[
            "plan",
            &wf,
            "--vram-budget",
            "64MiB",
            "--headroom",
            "0",
            "--json",
        ],
        &s.dir,
    );
    let p = plan_json(&out);
    assert_eq!(p["budget_bytes"], 64 << 20);
    assert_eq!(p["limit_bytes"], 64 << 20);
    assert_eq!(p["fits"], true);
    assert!(p["profile"].is_string());
    let nodes = p["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let peak = nodes
        .iter()
        .map(|n| n["forecast_bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(p["forecast_peak_bytes"].as_u64(), Some(peak));
    // The loaded 48x40 RGB image is 48*40*3*4 bytes of f32; the blur holds it and its output.
    assert!(peak >= 2 * 48 * 40 * 3 * 4, "{peak}");
    assert_eq!(nodes[1]["class_type"], "ImageBlur");
    // Nothing ran: plan writes no output.
    assert!(!s.dir.join("output").exists());
}

#[test]
fn a_tight_budget_tiles_the_run_and_the_final_event_reports_the_tracked_peak() {
    let s = Setup::new("tight");
    let samples: Vec<u8> = (0..320 * 240 * 3).map(|i| (i * 7 % 253) as u8).collect();
    nova_media::encode_png(&s.dir.join("input/big.png"), 320, 240, 3, &samples, &[]).unwrap();
    let wf = s.workflow("big.json", &OK.replace("card.png", "big.png"));
    let whole = plan_json(&nova(&["plan", &wf, "--json"], &s.dir));
    let naive = whole["naive_peak_bytes"].as_u64().unwrap();
    let budget = (naive * 7 / 10).to_string();
    let args = [
        "--vram-budget",
        &budget,
        "--headroom",
        "0",
        "--tile-size",
        "64",
    ];
    let mut plan_args = vec!["plan", &wf, "--json"];
    plan_args.extend(args);
    let p = plan_json(&nova(&plan_args, &s.dir));
    assert_eq!(p["fits"], true);
    assert_eq!(p["nodes"][1]["mode"], "tiled");
    let mut run_args = vec!["run", &wf, "--events", "ev.jsonl"];
    run_args.extend(args);
    let out = nova(&run_args, &s.dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = std::fs::read_to_string(s.dir.join("ev.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let forecast = events
        .iter()
        .find(|e| e["type"] == "telemetry.memory_forecast")
        .expect("a memory forecast event");
    assert_eq!(
        forecast["data"]["forecast_peak_bytes"],
        p["forecast_peak_bytes"]
    );
    let last = events.last().unwrap();
    assert_eq!(last["type"], "execution_success");
    assert_eq!(last["data"]["budget_bytes"].as_u64(), budget.parse().ok());
    let tracked = last["data"]["tracked_peak_bytes"].as_u64().unwrap();
    assert!(
        tracked > 0 && tracked <= budget.parse::<u64>().unwrap(),
        "{tracked}"
    );
}

#[test]
fn a_workflow_that_cannot_fit_is_refused_by_plan_and_run_with_exit_6() {
    let s = Setup::new("refuse");
    let wf = s.workflow("ok.json", OK);
    let budget = ["--vram-budget", "16KiB", "--headroom", "0"];
    let mut args = vec!["plan", &wf];
    args.extend(budget);
    let out = nova(&args, &s.dir);
    assert_clean_failure(
        &out,
        6,
        &[
            "refused: the region of nodes 1, 2, 3 (LoadImage -> ImageBlur -> SaveImage) needs ",
            "at the smallest tile",
            "budget 16.0 KiB after 0 B headroom",
        ],
    );
    let mut args = vec!["run", &wf, "--events", "ev.jsonl"];
    args.extend(budget);
    let out = nova(&args, &s.dir);
    assert_clean_failure(
        &out,
        6,
        &["refused: the region of nodes", "lower the resolution to"],
    );
    assert!(!s.dir.join("output").exists(), "nothing ran");
    // Dry-run only logs; the run then meets the budget for real and fails cleanly.
    let mut args = vec!["run", &wf, "--admission", "dry-run"];
    args.extend(budget);
    let out = nova(&args, &s.dir);
    assert_clean_failure(
        &out,
        4,
        &["would refuse (admission dry-run)", "out of device memory"],
    );
}

#[test]
fn profile_and_budget_come_from_flags_then_workflow_then_environment() {
    let s = Setup::new("overrides");
    let wf = s.workflow("ok.json", OK);
    let wrapped = format!(
        r#"{{"prompt": {OK}, "extra_data": {{"nova": {{"profile": "PASCAL_4G", "headroom": "1GiB"}}}}}}"#
    );
    let wrapped = s.workflow("wrapped.json", &wrapped);
    let p = plan_json(&nova(
        &["plan", &wf, "--json", "--profile", "PASCAL_2G"],
        &s.dir,
    ));
    assert_eq!(p["profile"], "PASCAL_2G");
    assert_eq!(p["budget_bytes"], 2u64 << 30);
    let env = [("NOVA_PROFILE", "RTX_MODERN"), ("NOVA_VRAM_BUDGET", "3GiB")];
    let p = plan_json(&nova_with_env(&["plan", &wf, "--json"], &s.dir, &env));
    assert_eq!(p["profile"], "RTX_MODERN");
    assert_eq!(p["budget_bytes"], 3u64 << 30);
    // The workflow's settings beat the environment's; flags beat both.
    let p = plan_json(&nova_with_env(&["plan", &wrapped, "--json"], &s.dir, &env));
    assert_eq!(p["profile"], "PASCAL_4G");
    assert_eq!(p["budget_bytes"], 3u64 << 30);
    assert_eq!(p["headroom_bytes"], 1u64 << 30);
    let args = ["plan", &wrapped, "--json", "--vram-budget", "5GiB"];
    let p = plan_json(&nova_with_env(&args, &s.dir, &env));
    assert_eq!(p["budget_bytes"], 5u64 << 30);
    // Bad settings name their source and exit 2 (usage).
    let out = nova_with_env(&["plan", &wf], &s.dir, &[("NOVA_VRAM_BUDGET", "lots")]);
    assert_clean_failure(&out, 2, &["NOVA_VRAM_BUDGET", "lots"]);
    let out = nova(&["plan", &wf, "--profile", "GTX_9000"], &s.dir);
    assert_clean_failure(&out, 2, &["GTX_9000"]);
    let bad = format!(r#"{{"prompt": {OK}, "extra_data": {{"nova": {{"budget": "1GiB"}}}}}}"#);
    let bad = s.workflow("bad.json", &bad);
    let out = nova(&["plan", &bad], &s.dir);
    assert_clean_failure(&out, 3, &["extra_data.nova.budget", "unknown setting"]);
}

#[test]
fn profiles_lists_every_profile_and_what_was_detected() {
    let s = Setup::new("profiles");
    let out = nova(&["profiles"], &s.dir);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for p in [
        "PASCAL_2G",
        "PASCAL_4G",
        "PASCAL_6G_8G",
        "RTX_MODERN",
        "AMD_ROCM",
        "INTEL_XPU",
        "CPU_SAFE",
    ] {
        assert!(text.contains(p), "{p} missing: {text}");
    }
    assert!(text.contains("detected: "), "{text}");
    let out = nova(&["profiles", "--json"], &s.dir);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["profiles"].as_array().unwrap().len(), 7);
    let detected = j["detected"]["profile"].as_str().unwrap();
    assert!(j["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == detected));
    assert!(!j["detected"]["reason"].as_str().unwrap().is_empty());
}

#[test]
fn a_missing_or_corrupt_model_file_is_an_invalid_workflow_naming_the_file() {
    let s = Setup::new("models");
    let folder = s.dir.join("models/upscale_models");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("broken.safetensors"), [0xffu8; 64]).unwrap();
    let upscale = |name: &str| {
        format!(
            r#"{{
  "1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
  "2": {{"class_type": "UpscaleModelLoader", "inputs": {{"model_name": "{name}"}}}},
  "3": {{"class_type": "ImageUpscaleWithModel", "inputs": {{"upscale_model": ["2", 0], "image": ["1", 0]}}}},
  "4": {{"class_type": "SaveImage", "inputs": {{"images": ["3", 0], "filename_prefix": "up"}}}}
}}"#
        )
    };
    let wf = s.workflow("missing.json", &upscale("nowhere.safetensors"));
    let out = nova(&["run", &wf], &s.dir);
    assert_clean_failure(
        &out,
        3,
        &[
            "node 2",
            "model_name",
            "nowhere.safetensors",
            "upscale_models",
        ],
    );
    let wf = s.workflow("broken.json", &upscale("broken.safetensors"));
    let out = nova(&["plan", &wf], &s.dir);
    assert_clean_failure(&out, 3, &["node 2", "broken.safetensors", "byte offset 0"]);
    assert!(!s.dir.join("output").exists());
}

#[test]
fn models_are_found_through_comfyuis_extra_model_paths_file() {
    let s = Setup::new("extra");
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let shared = shared.canonicalize().expect("the shared models folder");
    std::fs::write(
        s.dir.join("extra_model_paths.yaml"),
        format!(
            "other_install:\n    base_path: {}\n    upscale_models: |\n        nothing_here\n        upscale_models\n",
            shared.display()
        ),
    )
    .unwrap();
    let wf = s.workflow(
        "up.json",
        r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
  "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "realesr-animevideov3.safetensors"}},
  "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
  "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}
}"#,
    );
    // Not in ./models: the workflow names the file and every folder searched.
    let out = nova(&["plan", &wf], &s.dir);
    assert_clean_failure(&out, 3, &["node 2", "realesr-animevideov3.safetensors"]);
    // Found in the second folder the file lists for the kind.
    let plan = plan_json(&nova(
        &[
            "plan",
            &wf,
            "--json",
            "--extra-model-paths-config",
            "extra_model_paths.yaml",
        ],
        &s.dir,
    ));
    assert_eq!(plan["fits"], true);
    // A malformed file is bad usage, naming the file and the place.
    std::fs::write(s.dir.join("bad.yaml"), "x:\n  upscale_models: [a, b]\n").unwrap();
    let out = nova(
        &["plan", &wf, "--extra-model-paths-config", "bad.yaml"],
        &s.dir,
    );
    assert_clean_failure(&out, 2, &["bad.yaml", "section 'x', upscale_models"]);
}

#[test]
fn the_txt2img_example_reports_every_step_with_a_preview() {
    let s = Setup::new("txt2img");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wf = repo.join("examples/workflows/txt2img_tiny.json");
    let paths = repo.join("examples/extra_model_paths.yaml");
    let out = nova(
        &[
            "run",
            wf.to_str().unwrap(),
            "--extra-model-paths-config",
            paths.to_str().unwrap(),
            "--events",
            "-",
        ],
        &s.dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("node 3 (KSampler) started, 20 steps"),
        "{stderr}"
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let of = |t: &str| events.iter().filter(|e| e["type"] == t).collect::<Vec<_>>();
    let steps: Vec<u64> = of("telemetry.step")
        .iter()
        .map(|e| e["data"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    let previews = of("output.preview");
    assert_eq!(previews.len(), 20);
    // `auto`: a projection at latent size, or TAESD at image size where the time share
    // allows it (on the tiny model, rarely if ever).
    for p in previews {
        let size = match p["data"]["method"].as_str() {
            Some("latent2rgb") => 8,
            Some("taesd") => 64,
            other => panic!("unexpected preview method {other:?}"),
        };
        assert_eq!(
            (p["data"]["width"].as_u64(), p["data"]["height"].as_u64()),
            (Some(size), Some(size))
        );
    }
    assert!(s.dir.join("output/txt2img_tiny_00001_.png").is_file());
}

/// Writes `seconds` of a stereo 48 kHz tone as 16-bit WAV, chunk by chunk.
fn write_tone_wav(path: &Path, seconds: usize) {
    use nova_media::audio::{AudioSpec, SampleFormat, WavWriter};
    let spec = AudioSpec {
        sample_rate: 48_000,
        channels: 2,
    };
    let mut w = WavWriter::create(path, spec, SampleFormat::I16).unwrap();
    // One second repeats (440 Hz fits a whole number of periods in it).
    let c: Vec<f32> = (0..48_000)
        .map(|i| 0.3 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48_000.0).sin())
        .collect();
    for _ in 0..seconds {
        w.write(&[c.clone(), c.clone()]).unwrap();
    }
    w.finish().unwrap();
}

/// Writes an H.264 MP4 of FFmpeg's test pattern (`testsrc2=...`) at `path`, with the ffmpeg
/// command line (an independent peer).
fn make_clip(path: &Path, testsrc: &str) {
    let st = Command::new("ffmpeg")
        .args([
            "-v", "error", "-y", "-f", "lavfi", "-i", testsrc, "-pix_fmt", "yuv420p",
        ])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg made {}", path.display());
}

/// The "process peak RSS" figure of `nova run`'s closing line, in bytes.
fn peak_rss(stderr: &str) -> f64 {
    let text = stderr
        .lines()
        .find_map(|l| l.split("process peak RSS ").nth(1))
        .unwrap_or_else(|| panic!("no peak RSS in: {stderr}"));
    let mut parts = text.split_whitespace();
    let v: f64 = parts.next().unwrap().parse().unwrap();
    let unit = parts.next().unwrap();
    v * match unit {
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    }
}

#[test]
fn ten_minutes_of_audio_run_in_the_same_process_memory_as_ten_seconds() {
    let s = Setup::new("long-audio");
    let mut rss = Vec::new();
    for (name, seconds) in [("short.wav", 10), ("long.wav", 600)] {
        write_tone_wav(&s.dir.join("input").join(name), seconds);
        let wf = s.workflow(
            &format!("{name}.json"),
            &format!(
                r#"{{"1": {{"class_type": "LoadAudio", "inputs": {{"audio": "{name}"}}}},
                    "2": {{"class_type": "AudioBiquad", "inputs": {{"audio": ["1", 0], "filter_type": "highpass", "frequency": 80.0, "q": 0.7071, "gain_db": 0.0}}}},
                    "3": {{"class_type": "AudioResample", "inputs": {{"audio": ["2", 0], "sample_rate": 44100}}}},
                    "4": {{"class_type": "SaveAudio", "inputs": {{"audio": ["3", 0], "filename_prefix": "{name}"}}}}}}"#
            ),
        );
        let out = nova(
            &[
                "run",
                &wf,
                "--input-dir",
                "input",
                "--out",
                "output",
                "--workers",
                "2",
            ],
            &s.dir,
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let peak = peak_rss(&stderr);
        eprintln!(
            "{seconds} s of 48 kHz stereo: process peak RSS {:.1} MiB",
            peak / 1048576.0
        );
        rss.push(peak);
    }
    let ratio = rss[1] / rss[0];
    eprintln!("10 min / 10 s peak RSS: {ratio:.3}");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "10 s: {} B, 10 min: {} B",
        rss[0],
        rss[1]
    );
}

#[test]
fn outputs_are_never_written_through_a_link_out_of_the_output_folder() {
    let s = Setup::new("links");
    let elsewhere = s.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(s.dir.join("output")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, s.dir.join("output/link")).unwrap();
    let cases = [
        (
            "image",
            r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "card.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "link/x"}}}"#,
            "SaveImage",
        ),
        (
            "audio",
            r#"{"1": {"class_type": "AudioOscillator", "inputs": {"waveform": "sine", "frequency": 440.0, "amplitude": 0.5, "duration": 0.1, "sample_rate": 8000, "channels": 1}},
                "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "link/a"}}}"#,
            "SaveAudio",
        ),
        (
            "latent",
            r#"{"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "link/deeper/l"}}}"#,
            "SaveLatent",
        ),
    ];
    for (tag, wf, class) in cases {
        let name = s.workflow(&format!("{tag}.json"), wf);
        let out = nova(&["run", &name], &s.dir);
        assert_clean_failure(&out, 4, &["node 2", class, "link"]);
        let written: Vec<_> = std::fs::read_dir(&elsewhere).unwrap().flatten().collect();
        assert!(
            written.is_empty(),
            "{tag}: wrote {written:?} through the link"
        );
    }
    // The same prefix through a real folder works.
    std::fs::create_dir_all(s.dir.join("output/real")).unwrap();
    let ok = s.workflow("real.json", &cases[0].1.replace("link/x", "real/x"));
    let out = nova(&["run", &ok], &s.dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.dir.join("output/real/x_00001_.png").is_file());
}

#[test]
fn a_workflow_file_that_is_not_utf8_is_invalid_at_its_byte_offset() {
    let s = Setup::new("utf8");
    std::fs::write(s.dir.join("bad.json"), b"{\"1\": \"\xff\"}").unwrap();
    let out = nova(&["run", "bad.json"], &s.dir);
    assert_clean_failure(&out, 3, &["bad.json", "UTF-8", "byte offset 7"]);
}

#[test]
fn settings_that_cannot_be_written_fail_before_any_work_and_leave_no_file() {
    let s = Setup::new("unwritable");
    let save = |prefix: &str| {
        format!(
            r#"{{"1": {{"class_type": "LoadImage", "inputs": {{"image": "card.png"}}}},
                 "2": {{"class_type": "SaveImage", "inputs": {{"images": ["1", 0], "filename_prefix": {prefix}}}}}}}"#
        )
    };
    let video = |codec: &str, extra: &str| {
        format!(
            r#"{{"1": {{"class_type": "LoadVideo", "inputs": {{"file": "clip.mp4"}}}},
                 "2": {{"class_type": "SaveVideo", "inputs": {{"video": ["1", 0], "filename_prefix": "v", "format": "auto", "codec": "{codec}"{extra}}}}}}}"#
        )
    };
    make_clip(
        &s.dir.join("input/clip.mp4"),
        "testsrc2=size=64x48:rate=8:duration=1",
    );
    let cases = [
        ("nul", save(r#""a\u0000b""#), "filename_prefix"),
        (
            "long",
            save(&format!("\"{}\"", "n".repeat(300))),
            "filename_prefix",
        ),
        ("prores", video("prores", r#", "preset": "fast""#), "preset"),
        ("mpeg4", video("mpeg4", r#", "crf": 0"#), "crf"),
    ];
    for (tag, wf, input) in cases {
        let name = s.workflow(&format!("{tag}.json"), &wf);
        let out = nova(&["run", &name], &s.dir);
        assert_clean_failure(&out, 3, &["node 2", input]);
        let left: Vec<_> = std::fs::read_dir(s.dir.join("output"))
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{tag} left {left:?}");
    }
}

#[test]
fn events_to_a_pipe_nobody_reads_do_not_hold_the_process() {
    let s = Setup::new("pipe");
    // Hundreds of tiles: far more events than a pipe holds.
    let wf = s.workflow(
        "tiles.json",
        r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}}"#,
    );
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = Command::new(nova_bin())
        .args(["run", &wf, "--events", "-", "--tile-size", "16"])
        .current_dir(&s.dir)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "nova run never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(reader);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(err.contains("events"), "{err}");
    assert!(
        s.dir.join("output/t_00001_.png").is_file(),
        "the run itself finished: {err}"
    );
    // A reader that goes away (a broken pipe) is exit 5 too.
    let mut child = Command::new(nova_bin())
        .args(["run", &wf, "--events", "-", "--tile-size", "16"])
        .current_dir(&s.dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_video_upscale_stays_within_its_budget_in_process_memory() {
    // 48 frames of 320x240 upscaled 3x by lanczos into H.264 (x264's default preset, whose
    // lookahead holds dozens of frames), under a 256 MiB budget: the process's resident
    // memory may grow by no more than the budget over a run that does almost nothing.
    let s = Setup::new("videorss");
    make_clip(
        &s.dir.join("input/clip.mp4"),
        "testsrc2=size=320x240:rate=24:duration=2",
    );
    let up = s.workflow(
        "up3.json",
        r#"{"1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
            "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "scale_by": 3.0}},
            "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "up", "format": "mp4", "codec": "h264"}}}"#,
    );
    let tiny = s.workflow(
        "tiny.json",
        r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}}"#,
    );
    let budget = 256.0 * 1048576.0;
    let rss = |wf: &str| {
        let out = nova(
            &["run", wf, "--vram-budget", "256MiB", "--workers", "2"],
            &s.dir,
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        (peak_rss(&stderr), stderr)
    };
    let (base, _) = rss(&tiny);
    let (video, stderr) = rss(&up);
    let growth = video - base;
    eprintln!(
        "video 3x under 256 MiB: peak RSS {:.1} MiB, {:.1} MiB over a trivial run",
        video / 1048576.0,
        growth / 1048576.0
    );
    assert!(
        growth <= budget,
        "grew {growth} B over a {budget} B budget: {stderr}"
    );
    let written = std::fs::metadata(s.dir.join("output/up_00001_.mp4"))
        .unwrap()
        .len();
    assert!(written > 0);
}

#[test]
fn ffmpeg_speaks_only_through_nova_s_log_at_the_level_chosen() {
    let s = Setup::new("ffmpeglog");
    let clip = s.dir.join("input/clip.mp4");
    make_clip(&clip, "testsrc2=size=64x48:rate=8:duration=2");
    // Damage the middle of the stream so the decoder complains while the run goes on.
    let mut bytes = std::fs::read(&clip).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n / 3..n / 3 + n / 6] {
        *b = 0x5a;
    }
    std::fs::write(s.dir.join("input/damaged.mp4"), &bytes).unwrap();
    let wf = s.workflow(
        "damaged.json",
        r#"{"1": {"class_type": "LoadVideo", "inputs": {"file": "damaged.mp4"}},
            "2": {"class_type": "SaveVideo", "inputs": {"video": ["1", 0], "filename_prefix": "v", "format": "mkv", "codec": "ffv1"}}}"#,
    );
    for (level, expect_ffmpeg) in [("warning", true), ("quiet", false)] {
        let out = nova_with_env(&["run", &wf], &s.dir, &[("NOVA_FFMPEG_LOG", level)]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.starts_with("nova"),
                "{level}: a line not from NOVA's log: {line:?}"
            );
        }
        assert_eq!(
            stderr.contains("nova: ffmpeg "),
            expect_ffmpeg,
            "{level}: {stderr}"
        );
    }
}
