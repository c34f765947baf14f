//! Benchmarks of colo's parts, run as `colo bench <what>`.
//!
//! `colo bench transport` measures the page-push path between two processes on loopback
//! against the two limits that bound it: an in-process memcpy of the same pages and a raw
//! single TCP stream of the same bytes. See [`transport`] for how one run goes.

mod args;
mod child;
mod error;
mod pages;
mod protocol;
mod receiver;
mod report;
mod sock;
mod transport;

use clap::Subcommand;

pub use args::{ReceiverArgs, TransportArgs};
pub use error::Result;

/// `colo bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Push a region through the TCP page-push path between two processes on 127.0.0.1,
    /// and compare with memcpy and with a raw TCP stream.
    ///
    /// The source region is filled with random bytes and pushed into a pre-faulted region
    /// of a receiver process (this program, started again) in several cases: random 4 KiB
    /// pages (one case per --random-pages count) and the whole region as one contiguous
    /// run, each once per --streams count and --reps times. The receiver checks every
    /// pushed epoch with a checksum of exactly the committed pages; a mismatch fails the
    /// benchmark. The same run measures the two limits: an in-process memcpy of the same
    /// pages, and a raw single TCP stream of the same number of bytes (1 MiB writes and
    /// reads).
    ///
    /// The table shows every case and stream count, then the target lines: push/memcpy for
    /// random pages and push/raw-tcp for the contiguous case, at the best stream count.
    Transport(TransportArgs),
    /// The receiving process of `colo bench transport` (started by it, not by hand).
    #[command(hide = true)]
    TransportReceiver(ReceiverArgs),
}

impl BenchCommand {
    /// How this process names itself in its error message: helper processes say what
    /// they are, since they share the terminal with the benchmark that started them.
    pub fn process_label(&self) -> &'static str {
        match self {
            Self::TransportReceiver(_) => " (transport-receiver process)",
            _ => "",
        }
    }
}

/// Runs one benchmark subcommand.
///
/// # Errors
/// Invalid arguments, a transport or process failure, or a checksum mismatch.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Transport(args) => transport::run(&args.plan()?),
        BenchCommand::TransportReceiver(args) => receiver::run(&args),
    }
}
