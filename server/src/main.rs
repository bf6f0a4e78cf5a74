//! The `nova` binary. See `nova --help` and the crate docs of `nova_server::cli`.

fn main() -> std::process::ExitCode {
    nova_server::cli::main()
}
