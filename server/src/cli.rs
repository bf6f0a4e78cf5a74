//! The command line: `nova run`, `nova plan`, `nova profiles` and `nova nodes`.
//!
//! Memory settings resolve into one [`MemoryConfig`]: command-line flags first, then the
//! workflow's `extra_data.nova`, then the environment (`NOVA_PROFILE`, `NOVA_VRAM_BUDGET`,
//! `NOVA_HEADROOM`, `NOVA_ADMISSION`, `NOVA_SAFETY_MARGIN`, `NOVA_TILE_SIZE`), then detection.
//!
//! Exit codes (documented in `nova --help` and the README):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 2 | bad command-line usage or setting (flag or environment variable) |
//! | 3 | invalid workflow: malformed JSON, unknown node, missing/mistyped input, cycle, missing file |
//! | 4 | the workflow failed while running (a node's error is printed) |
//! | 5 | a file the command itself needs could not be read or written (workflow, events file) |
//! | 6 | refused by admission control: the most frugal plan does not fit the memory budget |
//! | 70 | internal error (a bug: please report it) |
//! | 130 | interrupted |

use crate::job::{self, memory_line, weight_bytes, weight_label, JobSpec, Prepared};
use crate::progress::Progress;
use clap::{Args as ClapArgs, Parser, Subcommand};
use nova_dataflow::profile::{detect, parse_margin, Admission};
use nova_dataflow::{
    run, workflow, Bytes, Emitter, EventKind, EventSink, JobEnv, Lifecycle, MemoryOverrides,
    ModelPaths, PreviewMethod, ProfileId, RegistryLimits, RunError, RunOptions, MIN_TILE,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

/// Exit code: bad usage or setting.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: invalid workflow.
pub const EXIT_INVALID: u8 = 3;
/// Exit code: failure while running.
pub const EXIT_RUN_FAILED: u8 = 4;
/// Exit code: the command's own files.
pub const EXIT_IO: u8 = 5;
/// Exit code: refused by admission control.
pub const EXIT_REFUSED: u8 = 6;
/// Exit code: internal error.
pub const EXIT_INTERNAL: u8 = 70;
/// Exit code: interrupted.
pub const EXIT_INTERRUPTED: u8 = 130;

const EXIT_HELP: &str =
    "Exit codes: 0 success, 2 usage, 3 invalid workflow, 4 failed while running, \
5 cannot read/write the command's own files, 6 refused: does not fit the memory budget, \
70 internal error, 130 interrupted.";

#[derive(Parser, Debug)]
#[command(name = "nova", version, about = "NOVA: low-VRAM media generation as timely dataflows", after_help = EXIT_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a workflow (ComfyUI API format) to completion.
    Run(RunArgs),
    /// Print the plan a run would use: per node mode, tile, forecast memory; and whether it fits.
    Plan(PlanArgs),
    /// List the hardware profiles and show what was detected.
    Profiles {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the node catalogue as ComfyUI's /object_info JSON.
    Nodes,
    /// Run the service: ComfyUI's HTTP/WebSocket API with NOVA's additions, a durable
    /// priority queue, system stats and the studio.
    Serve(ServeArgs),
}

/// `nova serve`'s settings (each flag also settable by the environment variable named).
#[derive(ClapArgs, Debug)]
struct ServeArgs {
    /// Address to listen on (loopback unless a token is set).
    #[arg(long, env = "NOVA_LISTEN", default_value = "127.0.0.1:8188")]
    listen: std::net::SocketAddr,
    /// The data folder: input/, output/, temp/, models/ and the queue database.
    #[arg(long, env = "NOVA_DATA_DIR", default_value = "nova-data")]
    data_dir: PathBuf,
    /// API token clients must send (required when not listening on loopback).
    #[arg(long, env = "NOVA_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Jobs run at once (each admitted against the budget still free).
    #[arg(long, env = "NOVA_MAX_JOBS", default_value_t = 1)]
    max_jobs: usize,
    /// Worker threads per job (default: available cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Largest request body.
    #[arg(long, value_name = "SIZE", value_parser = Bytes::parse, default_value = "16MiB")]
    max_body: Bytes,
    /// Largest upload.
    #[arg(long, value_name = "SIZE", value_parser = Bytes::parse, default_value = "100MiB")]
    max_upload: Bytes,
    /// Uploads received at once (more wait their turn).
    #[arg(long, default_value_t = 8)]
    max_uploads: usize,
    /// Seconds an upload waits for its turn before it is answered 503.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    upload_wait: f64,
    /// Seconds a client has to send a request's headers before the connection is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a request body may go without sending data.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    body_timeout: f64,
    /// Connections open at once (more are answered 503).
    #[arg(long, env = "NOVA_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Most nodes one workflow may have (larger ones are refused with 413).
    #[arg(long, env = "NOVA_MAX_NODES", default_value_t = 10_000)]
    max_nodes: usize,
    /// Move a corrupt queue database aside (kept as queue.redb.corrupt-<time>) and start with
    /// an empty queue, instead of stopping with exit 5. A healthy database is not touched.
    #[arg(long)]
    reset_corrupt_queue: bool,
    /// Another origin (scheme://host:port) browsers may call the API from; repeatable.
    #[arg(long, value_name = "ORIGIN")]
    allow_origin: Vec<String>,
    /// Another host name (a reverse proxy's) requests may address the service by;
    /// repeatable.
    #[arg(long, value_name = "HOST[:PORT]")]
    allow_host: Vec<String>,
    /// Droppable messages (previews, progress) kept for clients that fall behind.
    #[arg(long, default_value_t = 65536)]
    client_buffer: usize,
    /// Folder of the studio's built files (default: studio/dist when present).
    #[arg(long, env = "NOVA_STUDIO_DIR")]
    studio_dir: Option<PathBuf>,
    /// What a restart does with jobs that were running: requeue or fail.
    #[arg(long, value_parser = crate::serve::config::RestartPolicy::parse, default_value = "requeue")]
    on_restart: crate::serve::RestartPolicy,
    /// Starts a job may have before a restart marks it failed instead of requeueing it.
    #[arg(long, default_value_t = 2)]
    max_attempts: u32,
    /// URL every finished job is POSTed to (http:// only).
    #[arg(long, env = "NOVA_WEBHOOK")]
    webhook: Option<String>,
    /// Delivery attempts per webhook (the wait between them doubles from 0.5 s).
    #[arg(long, default_value_t = 5)]
    webhook_attempts: u32,
    /// A target jobs' own webhooks may have (HOST[:PORT], IP[:PORT] or CIDR[:PORT]);
    /// repeatable. Without any, jobs cannot name webhooks.
    #[arg(
        long,
        value_name = "TARGET",
        env = "NOVA_WEBHOOK_ALLOW",
        value_delimiter = ','
    )]
    webhook_allow: Vec<String>,
    /// How samplers preview their steps (see `nova run --help`).
    #[arg(long, default_value = "auto")]
    preview_method: PreviewMethod,
    /// ComfyUI's extra_model_paths.yaml.
    #[arg(long, value_name = "FILE")]
    extra_model_paths_config: Option<PathBuf>,
    /// Print the resolved settings as JSON and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// What a job reads and where it writes.
#[derive(ClapArgs, Debug)]
struct JobArgs {
    /// The workflow file, in ComfyUI's API format.
    workflow: PathBuf,
    /// Folder that file inputs (LoadImage) are read from.
    #[arg(long, default_value = "input")]
    input_dir: PathBuf,
    /// Folder outputs (SaveImage) are written to.
    #[arg(long, default_value = "output")]
    out: PathBuf,
    /// Folder for previews (PreviewImage); defaults to OUT/../temp.
    #[arg(long)]
    temp_dir: Option<PathBuf>,
    /// Models folder laid out as ComfyUI's (upscale_models/, ...).
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// ComfyUI's extra_model_paths.yaml: more folders per model kind, searched after
    /// --models-dir.
    #[arg(long, value_name = "FILE")]
    extra_model_paths_config: Option<PathBuf>,
    /// How samplers preview each step: auto (TAESD from vae_approx/ when it costs under 5%
    /// of sampling time, else a latent-to-RGB projection), latent2rgb, taesd, none.
    #[arg(long, default_value = "auto")]
    preview_method: PreviewMethod,
    /// Worker threads (default: available cores).
    #[arg(long)]
    workers: Option<usize>,
}

/// Memory settings (each also settable by environment variable and per workflow).
#[derive(ClapArgs, Debug)]
struct MemoryArgs {
    /// Hardware profile (PASCAL_2G, PASCAL_4G, PASCAL_6G_8G, RTX_MODERN, AMD_ROCM, INTEL_XPU,
    /// CPU_SAFE); default: detected.
    #[arg(long, value_parser = ProfileId::parse)]
    profile: Option<ProfileId>,
    /// Device memory budget, e.g. 2GiB or 768MiB; default: the device's (half of system
    /// memory on CPU).
    #[arg(long, value_name = "SIZE", value_parser = Bytes::parse)]
    vram_budget: Option<Bytes>,
    /// Memory kept free of the budget; default: the profile's.
    #[arg(long, value_name = "SIZE", value_parser = Bytes::parse)]
    headroom: Option<Bytes>,
    /// What to do with a job that cannot fit: enforce (refuse it), dry-run (log and run), off.
    #[arg(long, value_parser = Admission::parse)]
    admission: Option<Admission>,
    /// Added to forecasts before they are compared with the budget: 0.1 or 10%.
    #[arg(long, value_name = "MARGIN", value_parser = parse_margin)]
    safety_margin: Option<f64>,
    /// Largest tile side in pixels (at least 16; the planner goes smaller to fit); 0 disables
    /// tiling. Default: the profile's.
    #[arg(long, value_parser = parse_tile_size)]
    tile_size: Option<usize>,
}

impl MemoryArgs {
    fn overrides(&self) -> MemoryOverrides {
        MemoryOverrides {
            profile: self.profile,
            budget: self.vram_budget,
            headroom: self.headroom,
            admission: self.admission,
            safety_margin: self.safety_margin,
            tile: self.tile_size,
        }
    }
}

#[derive(ClapArgs, Debug)]
struct RunArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    memory: MemoryArgs,
    /// Write the event stream as JSON lines to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Job id used in events.
    #[arg(long, default_value = "cli")]
    job_id: String,
}

#[derive(ClapArgs, Debug)]
struct PlanArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    memory: MemoryArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// `--tile-size`: 0 (off) or at least [`MIN_TILE`].
fn parse_tile_size(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("{e}"))?;
    if v != 0 && v < MIN_TILE {
        return Err(format!(
            "tiles smaller than {MIN_TILE} pixels are not useful; use 0 to turn tiling off"
        ));
    }
    Ok(v)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// The binary's entry point on given arguments (the first is the program name): the KPI
/// harness starts the service in a child process of its own through this.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // On the CPU device the budget is this process's memory: freed frames must leave it.
    nova_dataflow::memory::return_large_blocks_to_the_system();
    // Kernel panics are caught and reported as node errors; keep their text off the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(code) => code,
        Err(_) => {
            eprintln!("nova: internal error (this is a bug; please report it with the workflow)");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Nodes => {
            let info = nova_operators::registry().object_info();
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_else(|_| "{}".into())
            );
            ExitCode::SUCCESS
        }
        Command::Profiles { json } => profiles_command(json),
        Command::Plan(args) => plan_command(args),
        Command::Run(args) => run_command(args),
        Command::Serve(args) => serve_command(args),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("nova: {msg}");
    ExitCode::from(code)
}

fn profiles_command(json: bool) -> ExitCode {
    let d = detect();
    let specs: Vec<_> = ProfileId::ALL.iter().map(|p| p.spec()).collect();
    if json {
        let v = serde_json::json!({ "detected": d, "profiles": specs });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<13} {:>9} {:>9} {:>5} {:>5} {:>8} {:<6} quantization / kernels",
        "profile", "memory", "headroom", "tile", "min", "prefetch", "dtype"
    );
    for p in &specs {
        let mark = if p.id == d.profile { "*" } else { " " };
        println!(
            "{mark}{:<12} {:>9} {:>9} {:>5} {:>5} {:>8} {:<6} {} / {}",
            p.id.name(),
            p.device_memory
                .map(|b| b.to_string())
                .unwrap_or_else(|| "system".into()),
            p.headroom.to_string(),
            p.tile,
            p.min_tile,
            p.prefetch_depth,
            format!("{:?}", p.precision).to_lowercase(),
            p.quantization.join(","),
            p.kernels
        );
    }
    println!();
    println!("detected: {} ({})", d.profile, d.reason);
    for g in &d.gpus {
        println!(
            "  GPU {}: {} compute {}.{} total {} free {}",
            g.index, g.name, g.compute_capability.0, g.compute_capability.1, g.total, g.free
        );
    }
    if let Some(m) = d.system_memory {
        println!("  system memory: {m}");
    }
    ExitCode::SUCCESS
}

/// Reads, validates and plans a job; resolves its memory settings.
fn prepare(job: &JobArgs, memory: &MemoryArgs) -> Result<Prepared, (u8, String)> {
    let bytes = std::fs::read(&job.workflow).map_err(|e| {
        (
            EXIT_IO,
            format!("cannot read workflow {}: {e}", job.workflow.display()),
        )
    })?;
    // Readable but not text: an invalid workflow, at the first byte that is not UTF-8.
    let text = String::from_utf8(bytes).map_err(|e| {
        (
            EXIT_INVALID,
            format!(
                "invalid workflow {}: not UTF-8 text (byte offset {})",
                job.workflow.display(),
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let temp = job.temp_dir.clone().unwrap_or_else(|| {
        job.out
            .parent()
            .map(|p| p.join("temp"))
            .unwrap_or_else(|| PathBuf::from("temp"))
    });
    let extra = match &job.extra_model_paths_config {
        Some(file) => ModelPaths::load(file).map_err(|e| (EXIT_USAGE, e.to_string()))?,
        None => ModelPaths::none(),
    };
    let env = JobEnv::new(&job.input_dir, &job.out, temp)
        .with_models_dir(&job.models_dir)
        .with_extra_models(extra)
        .with_preview(job.preview_method);
    RegistryLimits::from_env(|k| std::env::var(k).ok())
        .map_err(|e| (EXIT_USAGE, format!("bad setting: {e}")))?;
    let from_env = MemoryOverrides::from_env(|k| std::env::var(k).ok())
        .map_err(|e| (EXIT_USAGE, format!("bad setting: {e}")))?;
    let prompt = workflow::parse(&text).map_err(|e| (EXIT_INVALID, e.to_string()))?;
    // `{"prompt": ..., "extra_data": {"nova": {...}}}` carries per-workflow settings.
    let from_workflow =
        job::workflow_overrides(prompt.get("extra_data")).map_err(|e| (EXIT_INVALID, e))?;
    let detection = detect();
    job::prepare(JobSpec {
        prompt,
        env,
        overrides: memory.overrides(),
        workflow: from_workflow,
        from_env,
        detection: std::borrow::Cow::Borrowed(&detection),
        registry: &nova_operators::registry(),
        workers: job
            .workers
            .unwrap_or_else(nova_dataflow::exec::default_workers),
        free_limit: None,
        budget_cap: None,
    })
    .map_err(|e| (EXIT_INVALID, e.to_string()))
}

fn plan_command(args: PlanArgs) -> ExitCode {
    let p = match prepare(&args.job, &args.memory) {
        Ok(p) => p,
        Err((code, msg)) => return fail(code, msg),
    };
    let c = &p.config;
    if args.json {
        let v = job::plan_json(&p);
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
        );
    } else {
        println!("{}", memory_line(c));
        println!(
            "{:<6} {:<22} {:<7} {:>5} {:>6} {:>20} {:>11} {:>11}",
            "node", "class", "mode", "tile", "chunks", "weights", "activations", "forecast"
        );
        for n in &p.plan.nodes {
            println!(
                "{:<6} {:<22} {:<7} {:>5} {:>6} {:>20} {:>11} {:>11}{}",
                n.node,
                n.class_type,
                format!("{:?}", n.mode).to_lowercase(),
                n.tile.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                n.chunk_count(),
                weight_label(&p.plan, n),
                Bytes(
                    n.forecast
                        .working_bytes
                        .saturating_sub(weight_bytes(&p.plan, n))
                )
                .to_string(),
                Bytes(n.forecast.peak_bytes).to_string(),
                if n.forecast.fits {
                    ""
                } else {
                    "  (does not fit)"
                }
            );
        }
        println!(
            "forecast peak {} (every node whole: {}); limit {}; {}",
            Bytes(p.plan.forecast_peak_bytes),
            Bytes(p.plan.naive_peak_bytes),
            p.plan
                .limit_bytes
                .map(|l| Bytes(l).to_string())
                .unwrap_or_else(|| "none".into()),
            if p.plan.fits { "fits" } else { "does NOT fit" }
        );
    }
    match (&p.refusal, c.admission) {
        (Some(r), Admission::Enforce) => fail(EXIT_REFUSED, format!("refused: {}", r.message)),
        (Some(r), Admission::DryRun) => {
            eprintln!("nova: would refuse (admission dry-run): {}", r.message);
            ExitCode::SUCCESS
        }
        (_, _) => ExitCode::SUCCESS,
    }
}

fn run_command(args: RunArgs) -> ExitCode {
    // Event consumers: the events file and the progress display, fed from one channel.
    let mut events_out: Option<Box<dyn Write + Send>> = match &args.events {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
        Some(p) => match p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::File::create(p))
        {
            Ok(f) => Some(Box::new(std::io::BufWriter::new(f))),
            Err(e) => {
                return fail(
                    EXIT_IO,
                    format!("cannot create events file {}: {e}", p.display()),
                )
            }
        },
    };
    // Bounded: a reader that stops reading (a pipe nobody drains) holds at most
    // EVENTS_BUFFER events; the engine waits for it at most READER_STALL, then goes on without
    // it, and the command ends with exit 5 instead of hanging.
    let (tx, rx) = mpsc::sync_channel::<nova_dataflow::Event>(EVENTS_BUFFER);
    let events = Arc::new(EventsState::default());
    let sink: EventSink = {
        let events = events.clone();
        let tx = std::sync::Mutex::new(tx);
        Arc::new(move |ev| events.offer(&tx, ev))
    };
    let emitter = Arc::new(Emitter::new(args.job_id.clone(), sink));
    let terminal = std::io::stderr().is_terminal();
    let (done_tx, done_rx) = mpsc::channel::<Option<String>>();
    {
        let events = events.clone();
        std::thread::spawn(move || {
            let mut progress = Progress::new(terminal);
            let mut write_failed = None;
            for ev in rx {
                progress.on_event(&ev);
                if let (Some(w), None) = (events_out.as_mut(), &write_failed) {
                    if let Err(e) = writeln!(w, "{}", ev.to_json_line()) {
                        // A broken pipe or a full disk: the rest is not written either.
                        write_failed = Some(e.to_string());
                        events.reader_gone();
                    }
                }
                events.handled();
            }
            if let (Some(w), None) = (events_out.as_mut(), &write_failed) {
                if let Err(e) = w.flush() {
                    write_failed = Some(e.to_string());
                }
            }
            progress.finish();
            let _ = done_tx.send(write_failed);
        });
    }

    emitter.emit(EventKind::Lifecycle {
        state: Lifecycle::Planning,
        node: None,
    });
    let mut env_out: Option<JobEnv> = None;
    let outcome = (|| {
        let p = prepare(&args.job, &args.memory)?;
        eprintln!("nova: {}", memory_line(&p.config));
        if let Some(r) = &p.refusal {
            match p.config.admission {
                Admission::Enforce => {
                    return Err((EXIT_REFUSED, format!("refused: {}", r.message)))
                }
                Admission::DryRun => eprintln!(
                    "nova: would refuse (admission dry-run), running anyway: {}",
                    r.message
                ),
                Admission::Off => {}
            }
        }
        for dir in [&p.env.output_dir, &p.env.temp_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| (EXIT_IO, format!("cannot create {}: {e}", dir.display())))?;
        }
        env_out = Some(p.env.clone());
        let run_opts = RunOptions {
            job_id: args.job_id.clone(),
            budget: p.config.budget,
            ..RunOptions::default()
        };
        run(
            Arc::new(p.wf),
            Arc::new(p.plan),
            p.env.clone(),
            run_opts,
            emitter.clone(),
        )
        .map_err(|e| match e {
            RunError::Interrupted => (EXIT_INTERRUPTED, "interrupted".to_string()),
            RunError::Runtime(_) => (EXIT_INTERNAL, e.to_string()),
            e => (EXIT_RUN_FAILED, e.to_string()),
        })
    })();
    if let Err((code, msg)) = &outcome {
        // Failures before the run end the event stream too.
        if !msg.is_empty() && [EXIT_INVALID, EXIT_IO, EXIT_REFUSED, EXIT_USAGE].contains(code) {
            emitter.emit(EventKind::Error {
                node_id: None,
                node_type: None,
                message: msg.clone(),
                memory: None,
            });
        }
    }
    drop(emitter);
    let write_failed = events.wait_reader(&done_rx);
    match outcome {
        Ok(report) => {
            let env = env_out.expect("set before the run");
            for (node, ui) in &report.outputs {
                let files = ["images", "audio"]
                    .iter()
                    .filter_map(|k| ui.get(*k).and_then(|i| i.as_array()));
                for images in files {
                    for img in images {
                        let sub = img["subfolder"].as_str().unwrap_or("");
                        let name = img["filename"].as_str().unwrap_or("");
                        let dir = if img["type"] == "temp" {
                            &env.temp_dir
                        } else {
                            &env.output_dir
                        };
                        eprintln!(
                            "nova: node {node} wrote {}",
                            dir.join(sub).join(name).display()
                        );
                    }
                }
            }
            eprintln!(
                "nova: done in {:.0} ms; tracked peak {}{}{}",
                report.wall_ms,
                Bytes(report.tracked_peak_bytes),
                report
                    .budget_bytes
                    .map(|b| format!(" of {} budget", Bytes(b)))
                    .unwrap_or_default(),
                peak_rss()
                    .map(|b| format!("; process peak RSS {}", Bytes(b)))
                    .unwrap_or_default()
            );
            match write_failed {
                Some(e) => fail(EXIT_IO, format!("writing events failed: {e}")),
                None => ExitCode::SUCCESS,
            }
        }
        Err((code, msg)) => fail(code, msg),
    }
}

/// Events the events writer may fall behind by.
const EVENTS_BUFFER: usize = 8192;
/// How long the engine waits for an events reader that takes nothing, and the command for it
/// at the end, before going on without it.
const READER_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// The events writer's progress, shared by the engine's sink and the writer thread.
#[derive(Default)]
struct EventsState {
    handled: std::sync::atomic::AtomicU64,
    lost: std::sync::atomic::AtomicU64,
    gone: std::sync::atomic::AtomicBool,
}

impl EventsState {
    /// Hands an event to the writer; waits while its buffer is full, up to [`READER_STALL`]
    /// without progress, then gives up on the reader.
    fn offer(
        &self,
        tx: &std::sync::Mutex<mpsc::SyncSender<nova_dataflow::Event>>,
        ev: nova_dataflow::Event,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok(tx) = tx.lock() else { return };
        let mut ev = ev;
        let mut last = (self.handled.load(Relaxed), std::time::Instant::now());
        loop {
            if self.gone.load(Relaxed) {
                self.lost.fetch_add(1, Relaxed);
                return;
            }
            match tx.try_send(ev) {
                Ok(()) => return,
                Err(mpsc::TrySendError::Full(back)) => {
                    ev = back;
                    let now = self.handled.load(Relaxed);
                    if now != last.0 {
                        last = (now, std::time::Instant::now());
                    } else if last.1.elapsed() > READER_STALL {
                        self.reader_gone();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    self.lost.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    }

    fn handled(&self) {
        self.handled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn reader_gone(&self) {
        self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for the writer to finish: its error, if writing failed or the reader stopped
    /// taking events.
    fn wait_reader(&self, done: &mpsc::Receiver<Option<String>>) -> Option<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut last = (self.handled.load(Relaxed), std::time::Instant::now());
        let failed = loop {
            match done.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(failed) => break failed,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Some("the event writer stopped".into())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = self.handled.load(Relaxed);
                    if now != last.0 {
                        last = (now, std::time::Instant::now());
                    } else if last.1.elapsed() > READER_STALL {
                        break Some(format!(
                            "the reader stopped taking events (nothing read for {} s)",
                            READER_STALL.as_secs()
                        ));
                    }
                }
            }
        };
        let lost = self.lost.load(Relaxed);
        match (failed, lost) {
            (Some(e), 0) => Some(e),
            (Some(e), n) => Some(format!("{e}; {n} event(s) not written")),
            (None, 0) => None,
            (None, n) => Some(format!(
                "{n} event(s) not written: the reader stopped taking them"
            )),
        }
    }
}

/// The process's peak resident memory (`VmHWM`, Linux), for the closing line.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn serve_command(args: ServeArgs) -> ExitCode {
    let from_env = match MemoryOverrides::from_env(|k| std::env::var(k).ok()) {
        Ok(o) => o,
        Err(e) => return fail(EXIT_USAGE, format!("bad setting: {e}")),
    };
    if let Err(e) = RegistryLimits::from_env(|k| std::env::var(k).ok()) {
        return fail(EXIT_USAGE, format!("bad setting: {e}"));
    }
    let extra = match &args.extra_model_paths_config {
        Some(file) => match ModelPaths::load(file) {
            Ok(p) => p,
            Err(e) => return fail(EXIT_USAGE, e),
        },
        None => ModelPaths::none(),
    };
    let mut c = crate::serve::ServeConfig::new(&args.data_dir);
    c.listen = args.listen;
    c.token = args.token.filter(|t| !t.is_empty());
    c.token_set = c.token.is_some();
    c.max_jobs = args.max_jobs;
    if let Some(w) = args.workers {
        c.workers = w.max(1);
    }
    c.max_body = args.max_body;
    c.max_upload = args.max_upload;
    c.max_nodes = args.max_nodes;
    c.max_uploads = args.max_uploads;
    c.max_connections = args.max_connections;
    for (secs, field, flag) in [
        (
            args.header_timeout,
            &mut c.header_timeout,
            "--header-timeout",
        ),
        (args.body_timeout, &mut c.body_timeout, "--body-timeout"),
        (args.upload_wait, &mut c.upload_wait, "--upload-wait"),
    ] {
        match std::time::Duration::try_from_secs_f64(secs) {
            Ok(d) if !d.is_zero() => *field = d,
            _ => {
                return fail(
                    EXIT_USAGE,
                    format!("{flag} must be a positive number of seconds"),
                )
            }
        }
    }
    c.reset_corrupt_queue = args.reset_corrupt_queue;
    c.allow_origins = args.allow_origin;
    c.allow_hosts = args.allow_host;
    c.client_buffer = args.client_buffer;
    c.studio_dir = args
        .studio_dir
        .or_else(|| Some(PathBuf::from("studio/dist")).filter(|d| d.is_dir()));
    c.on_restart = args.on_restart;
    c.max_attempts = args.max_attempts.max(1);
    c.webhook = args.webhook.filter(|w| !w.is_empty());
    c.webhook_allow = args.webhook_allow;
    c.webhook_attempts = args.webhook_attempts.max(1);
    c.memory = args.memory.overrides().or(from_env);
    c.preview_method = args.preview_method;
    c.extra_models = Arc::new(extra);
    if args.print_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).unwrap_or_else(|_| "{}".into())
        );
        return match c.check() {
            Ok(()) => ExitCode::SUCCESS,
            Err(m) => fail(EXIT_USAGE, m),
        };
    }
    crate::serve::serve(c)
}
