//! Benchmarks of colo's parts, run as `colo bench <what>`.
//!
//! `colo bench transport` measures the page-push path between two processes on loopback
//! against the two limits that bound it: an in-process memcpy of the same pages and a raw
//! single TCP stream of the same bytes, in throughput and in CPU seconds per GiB. See [`transport`] for how one run goes.
//!
//! `colo bench dirty` and `colo bench ramcache` measure dirty tracking and the RAM cache's
//! commit flush in process, each beside its same-run baseline.
//!
//! `colo bench idle` measures the CPU of an idle pair beside an idle unprotected guest.
//!
//! `colo bench failover` measures the client's gap when the primary dies, beside runs with
//! no fault and the heartbeat timeout.

mod args;
mod child;
mod colo;
mod cpu;
mod dirty;
mod error;
mod failover;
mod guest32;
mod idle;
mod output;
mod pages;
mod protocol;
mod ramcache;
mod receiver;
mod report;
mod sock;
mod timing;
mod transport;
mod vm;

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
    /// Both processes also measure their CPU time over every transfer (the receiver
    /// reports its own), so each push and the raw stream get the CPU seconds of sender and
    /// receiver together per GiB moved.
    ///
    /// The table shows every case and stream count, then the target lines: push/memcpy for
    /// random pages and push/raw-tcp for the contiguous case, at the best stream count;
    /// then push CPU per GiB over the raw stream's, at the cheapest stream count.
    Transport(TransportArgs),
    /// Dirty tracking: turning a 16 GiB guest's bitmap into page runs (sparse and dense,
    /// against a same-run popcount), and KVM_GET_DIRTY_LOG/KVM_CLEAR_DIRTY_LOG on 1 GiB
    /// and 8 GiB slots after a real guest dirtied 1k and 100k pages.
    Dirty(dirty::DirtyArgs),
    /// The RAM cache's commit flush of 16k and 64k random pages into SVM memory, against a
    /// same-run memcpy of the same pages.
    Ramcache(ramcache::RamcacheArgs),
    /// The VM: pause+resume latency (p50/p99 over --cycles), VM state save and restore
    /// time, and the guest service's request rate through a tap against a host-native
    /// server in the same run.
    Vm(vm::VmBenchArgs),
    /// Whole COLO pairs (`colo pair`) under a guest dirty load: checkpoint pauses, pushed
    /// pages and bytes, the client's request rate against the same guest unprotected
    /// (same-run baseline per dirty rate) and CPU time of both sides, per mode and dirty
    /// rate; the pause histograms go to an SVG file.
    Colo(colo::ColoBenchArgs),
    /// The CPU an idle pair costs: `colo pair --pipeline 0` (no client) for --duration,
    /// each side's CPU in % of one core, beside the same guest idle and unprotected; the
    /// target is at most 5% per side.
    Idle(idle::IdleArgs),
    /// The client's gap when the primary dies: --runs pairs (`colo pair --pipeline 32`)
    /// with the primary killed at a random time or crashed at a random checkpoint step,
    /// beside --baseline-runs pairs with no fault over the same duration.
    ///
    /// For each figure the table gives min, median, p90, p99 and max over the runs: the
    /// client's longest wait over the whole run (the target: <= 100 ms at p99 over >= 50
    /// runs), the same in the baseline runs, the longest wait of a reply after the death,
    /// the client's silence across the switch to the secondary, and where that went, in
    /// ms from the death: the secondary lost the link, the process's end was seen (the
    /// split-brain guard lets the secondary take over then), the takeover check passed,
    /// the proxy switched, the client's first reply came. Beside the heartbeat timeout,
    /// which still decides for a primary that is silent but not dead. Lost or contradicted
    /// data, or a death without a takeover, fails the benchmark.
    Failover(failover::FailoverArgs),
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
        BenchCommand::Dirty(args) => dirty::run(&args),
        BenchCommand::Ramcache(args) => ramcache::run(&args),
        BenchCommand::Vm(args) => vm::run(&args),
        BenchCommand::Colo(args) => colo::run(&args),
        BenchCommand::Idle(args) => idle::run_bench(&args),
        BenchCommand::Failover(args) => failover::run(&args),
    }
}
