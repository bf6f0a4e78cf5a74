//! The KPI runner: NOVA's whole-process figures against the naive executor (and, where they
//! run here, against ffmpeg, sox and PyTorch), in one run, written as `report.json` and
//! `report.md` (with SVG plots) in `--out DIR` (default `target/kpi/`).
//!
//! `cargo run -p nova-benches --release -- kpi --quick` (a few minutes on 2 cores; the full
//! suite, without `--quick`, uses larger inputs, more rounds and three profiles).
//!
//! Every ratio is taken within this run, A and B alternated round by round (the order
//! swapped every round), medians over the rounds.

mod quality;
mod report;
pub mod sections;
pub mod suite;

pub use quality::{psnr, snr, ssim};

use crate::executor::Executor;
use std::path::PathBuf;
use std::process::ExitCode;

/// What a run of the harness measures and where it writes.
#[derive(Clone, Debug)]
pub struct Config {
    pub quick: bool,
    pub out: PathBuf,
    /// The executors to run the suite through (both unless `--executor` picks one).
    pub executors: Vec<Executor>,
}

const USAGE: &str = "usage: nova-benches kpi [--quick] [--out DIR] [--executor nova|naive]

  --quick           short inputs, 3 rounds, one profile (PASCAL_2G): a few minutes on 2 cores
  --out DIR         where report.json, report.md and the plots go (default target/kpi)
  --executor NAME   run the suite through one executor only (nova or naive); the default runs
                    both, alternated, and reports their ratios";

impl Config {
    /// Parses the arguments after `kpi`.
    pub fn parse(args: &[String]) -> Result<Config, String> {
        let mut c = Config {
            quick: false,
            out: PathBuf::from("target/kpi"),
            executors: vec![Executor::Nova, Executor::Naive],
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => c.quick = true,
                "--out" => {
                    c.out = it.next().ok_or("--out needs a folder")?.into();
                }
                "--executor" => {
                    c.executors = vec![Executor::parse(
                        it.next().ok_or("--executor needs a name")?,
                    )?]
                }
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
            }
        }
        Ok(c)
    }
}

/// `nova-benches kpi ...`: exit 0 with the report written, 2 for bad arguments, 1 when the
/// harness itself could not run (a figure that fails is recorded in the report instead).
pub fn main(args: &[String]) -> ExitCode {
    let config = match Config::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // The temporal cache would replay unchanged video windows from one round to the next.
    std::env::set_var("NOVA_TEMPORAL_CACHE_MB", "0");
    match sections::run_all(&config) {
        Ok(r) => match report::write(&config, &r) {
            Ok(paths) => {
                for p in paths {
                    eprintln!("kpi: wrote {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kpi: writing the report: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("kpi: {e}");
            ExitCode::from(1)
        }
    }
}

/// The model-switch child (`nova-benches __switch`): see [`sections::switch_child`].
pub fn switch_child(args: &[String]) -> ExitCode {
    sections::switch_child(args)
}
