//! The command line: `nova run WORKFLOW.json` and `nova nodes`.
//!
//! Exit codes (documented in `nova --help` and the README):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 2 | bad command-line usage |
//! | 3 | invalid workflow: malformed JSON, unknown node, missing/mistyped input, cycle, missing file |
//! | 4 | the workflow failed while running (a node's error is printed) |
//! | 5 | a file the command itself needs could not be read or written (workflow, events file) |
//! | 70 | internal error (a bug: please report it) |
//! | 130 | interrupted |

use crate::progress::Progress;
use clap::{Args as ClapArgs, Parser, Subcommand};
use nova_dataflow::{
    plan, run, workflow, ChunkSize, Emitter, EventKind, EventSink, JobEnv, Lifecycle, PlanOptions,
    RunError, RunOptions,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

/// Exit code: invalid workflow.
pub const EXIT_INVALID: u8 = 3;
/// Exit code: failure while running.
pub const EXIT_RUN_FAILED: u8 = 4;
/// Exit code: the command's own files.
pub const EXIT_IO: u8 = 5;
/// Exit code: internal error.
pub const EXIT_INTERNAL: u8 = 70;
/// Exit code: interrupted.
pub const EXIT_INTERRUPTED: u8 = 130;

const EXIT_HELP: &str =
    "Exit codes: 0 success, 2 usage, 3 invalid workflow, 4 failed while running, \
5 cannot read/write the command's own files, 70 internal error, 130 interrupted.";

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
    /// Print the node catalogue as ComfyUI's /object_info JSON.
    Nodes,
}

#[derive(ClapArgs, Debug)]
struct RunArgs {
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
    /// Write the event stream as JSON lines to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Worker threads (default: available cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Largest tile side in pixels for tileable nodes (at least 16); 0 disables tiling.
    #[arg(long, default_value_t = 256, value_parser = parse_tile_size)]
    tile_size: usize,
    /// Job id used in events.
    #[arg(long, default_value = "cli")]
    job_id: String,
}

/// `--tile-size`: 0 (off) or at least [`nova_dataflow::MIN_TILE`].
fn parse_tile_size(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("{e}"))?;
    if v != 0 && v < nova_dataflow::MIN_TILE {
        return Err(format!(
            "tiles smaller than {} pixels are not useful; use 0 to turn tiling off",
            nova_dataflow::MIN_TILE
        ));
    }
    Ok(v)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // Kernel panics are caught and reported as node errors; keep their text off the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    let cli = match Cli::try_parse() {
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
        Command::Run(args) => run_command(args),
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("nova: {msg}");
    ExitCode::from(code)
}

fn run_command(args: RunArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.workflow) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                EXIT_IO,
                format!("cannot read workflow {}: {e}", args.workflow.display()),
            )
        }
    };
    let temp = args.temp_dir.clone().unwrap_or_else(|| {
        args.out
            .parent()
            .map(|p| p.join("temp"))
            .unwrap_or_else(|| PathBuf::from("temp"))
    });
    let env = JobEnv::new(&args.input_dir, &args.out, temp);

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
    let (tx, rx) = mpsc::channel::<nova_dataflow::Event>();
    let tx = std::sync::Mutex::new(tx);
    let sink: EventSink = Arc::new(move |ev| {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(ev);
        }
    });
    let emitter = Arc::new(Emitter::new(args.job_id.clone(), sink));
    let terminal = std::io::stderr().is_terminal();
    let consumer = std::thread::spawn(move || {
        let mut progress = Progress::new(terminal);
        let mut write_failed = None;
        for ev in rx {
            progress.on_event(&ev);
            if let Some(w) = events_out.as_mut() {
                if let Err(e) = writeln!(w, "{}", ev.to_json_line()) {
                    write_failed.get_or_insert(e.to_string());
                }
            }
        }
        if let Some(w) = events_out.as_mut() {
            if let Err(e) = w.flush() {
                write_failed.get_or_insert(e.to_string());
            }
        }
        progress.finish();
        write_failed
    });

    emitter.emit(EventKind::Lifecycle {
        state: Lifecycle::Planning,
    });
    let outcome = (|| {
        let registry = nova_operators::registry();
        let wf =
            workflow::load(&text, &registry, &env).map_err(|e| (EXIT_INVALID, e.to_string()))?;
        let opts = PlanOptions {
            tile: (args.tile_size > 0).then_some(ChunkSize::Tile {
                width: args.tile_size,
                height: args.tile_size,
            }),
            ..PlanOptions::default()
        };
        let plan =
            plan(&wf, &env, &opts).map_err(|e| (EXIT_INVALID, format!("invalid workflow: {e}")))?;
        for dir in [&env.output_dir, &env.temp_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| (EXIT_IO, format!("cannot create {}: {e}", dir.display())))?;
        }
        let run_opts = RunOptions {
            workers: args
                .workers
                .unwrap_or_else(|| RunOptions::default().workers),
            job_id: args.job_id.clone(),
            ..RunOptions::default()
        };
        run(
            Arc::new(wf),
            Arc::new(plan),
            env.clone(),
            run_opts,
            emitter.clone(),
        )
        .map_err(|e| match e {
            RunError::Interrupted => (EXIT_INTERRUPTED, "interrupted".to_string()),
            RunError::Runtime(_) => (EXIT_INTERNAL, e.to_string()),
            e => (EXIT_RUN_FAILED, e.to_string()),
        })
    })();
    if let Err((_, msg)) = &outcome {
        // Validation and planning failures end the event stream too.
        if !msg.is_empty() && matches!(outcome, Err((EXIT_INVALID, _)) | Err((EXIT_IO, _))) {
            emitter.emit(EventKind::Error {
                node_id: None,
                node_type: None,
                message: msg.clone(),
            });
        }
    }
    drop(emitter);
    let write_failed = consumer
        .join()
        .unwrap_or(Some("event writer crashed".into()));
    match outcome {
        Ok(report) => {
            for (node, ui) in &report.outputs {
                if let Some(images) = ui.get("images").and_then(|i| i.as_array()) {
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
            eprintln!("nova: done in {:.0} ms", report.wall_ms);
            match write_failed {
                Some(e) => fail(EXIT_IO, format!("writing events failed: {e}")),
                None => ExitCode::SUCCESS,
            }
        }
        Err((code, msg)) => fail(code, msg),
    }
}
