//! `colo`: the COLO fault-tolerance VMM.
//!
//! `colo run` runs one VM with the built-in guest; `colo primary` and `colo secondary` run
//! the two sides of a COLO pair; `colo proxy` runs the compare proxy on its own; `colo
//! bench` measures colo's parts.

mod args;
mod bench;
mod colo;
mod fault_signals;
mod interrupt;
mod pair;
mod report;
mod run;
mod sched;

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
                  the default is info.\n\nCOLO_SLICE_US: the CPU time slice (microseconds, \
                  Linux 6.12+) colo asks for its own threads, so that the checkpoint path \
                  preempts busy vCPUs at once; default 100 in COLO mode and 0 (the kernel's \
                  default) in periodic mode, where it slowed the guest without shortening \
                  the pause. Shorter pauses, slightly slower guests."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The top-level subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run one VM with the built-in guest: its console on stdout, its key-value service on
    /// a tap device. Or, with --kernel, a Linux kernel with its serial console on stdout.
    Run(run::RunArgs),
    /// Run a whole COLO pair on this machine: the proxy, a client load, and both sides as
    /// child processes, with a live status line.
    Pair(pair::PairArgs),
    /// Write a new random pair key (256 bits, mode 0600) for `colo primary` and `colo
    /// secondary --pair-key FILE`; copy the same file to both hosts.
    Keygen {
        /// Where to write it (must not exist yet).
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Ask a running side for its COLO status through its QMP socket (query-colo-status,
    /// with colo's x-colo-phase: waiting, syncing, colo or serving; and query-status).
    Status {
        /// The side's QMP socket (its --qmp).
        #[arg(long)]
        qmp: std::path::PathBuf,
        /// Print `KEY=value` lines (mode, last_mode, reason, phase, status) instead of
        /// JSON, for shell scripts such as the cluster agent.
        #[arg(long)]
        shell: bool,
    },
    /// Run one QMP command on a running side and print its answer (JSON), e.g. `colo qmp
    /// --qmp s.qmp x-colo-lost-heartbeat` (the secondary takes over) or `migrate
    /// '{"uri": "tcp:host:port"}'`.
    Qmp {
        /// The side's QMP socket (its --qmp).
        #[arg(long)]
        qmp: std::path::PathBuf,
        /// The command (`query-commands` lists them).
        command: String,
        /// Its arguments, as a JSON object.
        arguments: Option<String>,
    },
    /// Run `colo pair`'s client load against a guest behind a Unix socket of frames (e.g.
    /// `colo proxy --client unix-listen:PATH`): acknowledged SETs and GETs that check them;
    /// fails if an acknowledged write was lost.
    Client(pair::socket_client::ClientArgs),
    /// Run the primary side of a COLO pair: the PVM, checkpointed into a secondary.
    Primary(colo::cli::PrimaryArgs),
    /// Run the secondary side of a COLO pair: waits for a primary, follows its
    /// checkpoints, and takes over when it is lost.
    Secondary(colo::cli::SecondaryArgs),
    /// Run the COLO proxy on its own: mirror client traffic to a primary and a secondary,
    /// compare their output, release what matches, ask for a checkpoint when it does not.
    /// With --cluster: two VM ports by place, whose sides say their roles (--role-words).
    Proxy(ProxyCommand),
    /// Plot a checkpoint metrics file (`--metrics` of primary or pair) as one SVG or PNG:
    /// pauses over time, the pause distribution, pages per checkpoint, causes.
    Report(report::ReportArgs),
    /// Measure the speed of colo's parts on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// `colo proxy`: the proxy's own options, and where to serve its metrics.
#[derive(Debug, clap::Args)]
struct ProxyCommand {
    #[command(flatten)]
    proxy: colo_netcmp::proxy::ProxyArgs,
    /// Serve the proxy's Prometheus metrics (mismatches, queue overflows, the engine's
    /// queue, connections) at `GET /metrics` on this address (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
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

impl Command {
    /// The checkpointing mode of a command that runs a side of a pair (or the pair).
    fn mode(&self) -> Option<colo::Mode> {
        match self {
            Command::Primary(a) => Some(a.colo.mode),
            Command::Secondary(a) => Some(a.colo.mode),
            Command::Pair(a) => Some(a.colo.mode),
            _ => None,
        }
    }
}

fn main() -> ExitCode {
    let foreign = fault_signals::drop_foreign_handlers();
    let cli = Cli::parse();
    init_logging();
    if !foreign.is_empty() {
        tracing::debug!(
            signals = ?foreign,
            "fatal-signal handlers a linked library installed were reset to the default"
        );
    }
    // Before any thread starts, so that all inherit it (the vCPU threads give it back).
    sched::init(cli.command.mode());
    match cli.command {
        Command::Bench(cmd) => {
            let who = cmd.process_label();
            match bench::run(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(who, &e, e.exit_code()),
            }
        }
        Command::Proxy(cmd) => {
            // Bound before the proxy starts, so that a bad address fails at once.
            let endpoint =
                match colo::metrics_http::ProxyEndpoint::serve(cmd.metrics_listen.as_deref()) {
                    Ok(e) => e,
                    Err(e) => return report("", &e, 1),
                };
            let r = cmd.proxy.config().and_then(|c| {
                colo_netcmp::proxy::run_observed(c, |control| endpoint.attach(control))
            });
            endpoint.stop();
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let bad_args = matches!(e, colo_netcmp::Error::Config(_));
                    report("", &e, if bad_args { 2 } else { 1 })
                }
            }
        }
        Command::Keygen { out } => {
            match colo_auth::PairKey::generate().and_then(|k| k.write_new(&out).map(|()| k)) {
                Ok(k) => {
                    println!("wrote pair key {} ({k:?}, mode 0600)", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => report("", &e, 1),
            }
        }
        Command::Report(args) => match report::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report("", &e, e.exit_code()),
        },
        Command::Qmp {
            qmp,
            command,
            arguments,
        } => {
            let mut cmd = serde_json::json!({ "execute": command });
            if let Some(a) = arguments {
                match serde_json::from_str::<serde_json::Value>(&a) {
                    Ok(v @ serde_json::Value::Object(_)) => cmd["arguments"] = v,
                    _ => {
                        eprintln!(
                            "error: the arguments must be a JSON object, e.g. '{{\"uri\": \"tcp:10.0.0.2:7100\"}}'"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            match colo::qmp::execute(&qmp, &[cmd]) {
                Ok(v) => {
                    println!("{}", v.first().unwrap_or(&serde_json::Value::Null));
                    ExitCode::SUCCESS
                }
                Err(e) => report("", &e, 1),
            }
        }
        Command::Status { qmp, shell } => match colo::qmp::status(&qmp) {
            Ok(v) if shell => {
                print!("{}", colo::qmp::status_lines(&v));
                ExitCode::SUCCESS
            }
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => report("", &e, 1),
        },
        Command::Client(args) => match pair::socket_client::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(" (client)", &e, 1),
        },
        Command::Pair(args) => match pair::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(" (pair)", &e, 1),
        },
        Command::Primary(args) => match colo::cli::run_primary(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(" (primary)", &e, 1),
        },
        Command::Secondary(args) => match colo::cli::run_secondary(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(" (secondary)", &e, 1),
        },
        Command::Run(args) => match run::run(&args) {
            // The guest asked for a reboot (or panicked with panic=-1).
            Ok(colo_machine::GuestExit::Reset) => ExitCode::from(3),
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                let code = match e {
                    colo_machine::Error::Config(_)
                    | colo_machine::Error::Image(_)
                    | colo_machine::Error::GuestImage(_)
                    | colo_machine::Error::Kernel(_)
                    | colo_machine::Error::Disk { .. } => 2,
                    _ => 1,
                };
                report("", &e, code)
            }
        },
    }
}

/// Prints an error with its chain of causes and returns the exit code.
fn report(who: &str, e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("error{who}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    /// clap's own consistency checks over every subcommand (names that options refer to,
    /// defaults, conflicts): they run only in debug builds, at parse time, as a panic.
    #[test]
    fn every_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
