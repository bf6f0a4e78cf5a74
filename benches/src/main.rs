//! `nova-benches`: the KPI runner (`nova-benches kpi [--quick] [--out DIR] [--executor
//! nova|naive]`; see `nova_benches::kpi`). Two hidden subcommands serve the runner's own child
//! processes: `__nova ARGS` is the `nova` binary (so start-up is measured on the real
//! service), `__switch EXECUTOR ROUNDS` runs the model-switch sequence.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("kpi") => nova_benches::kpi::main(&args[2..]),
        Some("__nova") => nova_server::cli::main_from(
            std::iter::once("nova".to_string()).chain(args[2..].iter().cloned()),
        ),
        Some("__switch") => nova_benches::kpi::switch_child(&args[2..]),
        _ => {
            eprintln!("usage: nova-benches kpi [--quick] [--out DIR] [--executor nova|naive]");
            ExitCode::from(2)
        }
    }
}
