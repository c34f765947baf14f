//! `colo`: the COLO fault-tolerance VMM.
//!
//! For now it benchmarks its parts (`colo bench transport`) and runs the COLO proxy on its
//! own (`colo proxy`); running and pairing VMs come as further subcommands.

mod bench;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "colo",
    version,
    about = "COLO fault tolerance for virtual machines",
    after_help = "Logs go to stderr. Set RUST_LOG (e.g. RUST_LOG=debug) to change the level; \
                  the default is info."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The top-level subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the speed of colo's parts on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the COLO proxy on its own: mirror client traffic to two VMs, compare their
    /// output, release the primary's when it matches.
    Proxy(colo_netcmp::proxy::ProxyArgs),
}

/// Logs to stderr, at the level RUST_LOG asks for (info by default).
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let (who, result) = match cli.command {
        Command::Bench(cmd) => (cmd.process_label(), bench::run(cmd)),
        Command::Proxy(args) => {
            return match args.config().and_then(colo_netcmp::proxy::run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report("", &e);
                    let bad_args = matches!(e, colo_netcmp::Error::Config(_));
                    ExitCode::from(if bad_args { 2 } else { 1 })
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(who, &e);
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints an error and its chain of causes to stderr.
fn report(who: &str, e: &dyn std::error::Error) {
    eprintln!("error{who}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
}
