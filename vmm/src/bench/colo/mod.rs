//! `colo bench colo`: whole COLO pairs on this machine under a guest dirty load, beside the
//! same guest unprotected.
//!
//! For every dirty rate of `--rates` the benchmark runs `colo pair --unprotected` (the
//! guest alone behind the same proxy and client load: the baseline), then `colo pair` once
//! per mode of `--modes`. Every run is a child process (this program, started again) that
//! lasts `--duration` and prints one JSON summary as its last line of stdout. The table
//! shows the checkpoint pauses, what was pushed, the client's request rate against the
//! baseline of the same dirty rate, and the CPU time of both sides; the pause distribution
//! of every protected run goes to an SVG file, and with `--plot DIR` every protected run's
//! checkpoint records and their `colo report` go to DIR.

mod run;
mod stats;
mod svg;
mod table;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use colo_machine::SCRATCH_GPA;
use serde::Deserialize;

use super::error::{Error, Result};
use super::report::fmt_bytes;
use crate::args::{parse_ms, parse_secs, parse_size};
use crate::colo::Mode;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Pages per second of one MiB/s of dirtying.
const PAGES_PER_MIB: u64 = MIB / PAGE;
/// Target: checkpoint pause p99 at this dirty rate...
const PAUSE_TARGET_RATE_MIB: u64 = 100;
/// ...at most this long.
const PAUSE_TARGET_MS: f64 = 5.0;
/// Target: periodic mode keeps this fraction of the unprotected request rate up to 100 MiB/s
/// dirtied...
const THROUGHPUT_TARGET: f64 = 0.90;
/// ...and this fraction from [`HEAVY_RATE_MIB`] on.
const HEAVY_THROUGHPUT_TARGET: f64 = 0.60;
/// The dirty rate from which [`HEAVY_THROUGHPUT_TARGET`] applies.
const HEAVY_RATE_MIB: u64 = 400;

/// The periodic-mode service target at `rate` MiB/s dirtied.
fn periodic_target(rate: u64) -> f64 {
    if rate >= HEAVY_RATE_MIB {
        HEAVY_THROUGHPUT_TARGET
    } else {
        THROUGHPUT_TARGET
    }
}
/// Target: COLO mode keeps this fraction of the unprotected request rate...
const COLO_THROUGHPUT_TARGET: f64 = 0.90;
/// ...at this dirty rate.
const COLO_THROUGHPUT_RATE_MIB: u64 = 10;
/// `colo bench colo`.
#[derive(Debug, Args)]
#[command(
    after_help = "Every run is `colo pair --json` in a child process; the \
                        unprotected baseline of each dirty rate is `colo pair --unprotected` \
                        with the same rate. Needs /dev/kvm, no root. Progress goes to stderr.\n\
                        Example: colo bench colo --duration 5s --rates 100 --modes colo"
)]
pub struct ColoBenchArgs {
    /// Guest dirty rates, comma-separated, in MiB/s of guest memory written (one MiB/s is
    /// 256 pages/s).
    #[arg(long, default_value = "10,100,400", value_delimiter = ',')]
    rates: Vec<u64>,
    /// Which pages the guest's dirty load writes (see `colo pair --help`): zipf, hot or
    /// sweep. Sweep writes every page in turn, so every write takes a write-protect fault
    /// after each collection and the service is bounded by the host's fault cost.
    #[arg(long, default_value = "zipf", value_parser = crate::args::parse_pattern)]
    dirty_pattern: colo_machine::DirtyPattern,
    /// Checkpointing modes, comma-separated; every dirty rate runs once per mode.
    #[arg(
        long,
        value_enum,
        default_value = "periodic,colo",
        value_delimiter = ','
    )]
    modes: Vec<Mode>,
    /// Client load time of each run (e.g. 10s, 1m; plain numbers are seconds).
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    duration: Duration,
    /// Time between checkpoints.
    #[arg(long, default_value = "100ms", value_parser = parse_ms)]
    checkpoint_delay: Duration,
    /// Guest RAM of each VM; more than 16 MiB, since the dirty load writes from 16 MiB to
    /// the end of RAM.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    ram: u64,
    /// Where to write the pause histograms of every run (SVG).
    #[arg(long, default_value = "colo-pauses.svg")]
    svg: PathBuf,
    /// Also keep every protected run's checkpoint records in this directory (created if
    /// needed), as `<mode>-<rate>MiBs[-r<round>].jsonl`, and draw each as `colo report`
    /// does, beside it as `.svg`.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Requests the client keeps in flight (the same for every run). Periodic mode releases
    /// output only at checkpoints, so a client with one request in flight gets about one
    /// reply per checkpoint; a deep pipeline measures the service's throughput instead.
    #[arg(long, default_value_t = 2048)]
    pipeline: usize,
    /// One more argument for every `colo pair` run (repeatable), e.g.
    /// --pair-arg=--streams=4.
    #[arg(long = "pair-arg", value_name = "ARG", allow_hyphen_values = true)]
    pair_args: Vec<String>,
    /// Rounds of the whole plan. Each round runs every dirty rate's unprotected baseline
    /// and protected runs again, so each protected run has a baseline measured right
    /// before it; the targets are judged on the median over the rounds (this machine's
    /// disk and CPU vary by tens of percent from minute to minute).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

/// What one run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `colo pair --unprotected`: no secondary, no checkpoints.
    Unprotected,
    /// `colo pair --mode <mode>`.
    Protected(Mode),
}

impl Kind {
    fn name(self) -> String {
        match self {
            Self::Unprotected => "unprotected".into(),
            Self::Protected(m) => mode_name(m),
        }
    }
}

fn mode_name(m: Mode) -> String {
    m.to_possible_value()
        .map_or_else(|| format!("{m:?}"), |v| v.get_name().to_string())
}

/// The JSON summary `colo pair --json` prints last (the keys this benchmark reads).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
struct PairReport {
    secs: f64,
    epochs: u64,
    pause_p50_ms: f64,
    pause_p99_ms: f64,
    pause_max_ms: f64,
    pauses_us: Vec<u64>,
    pages: u64,
    bytes: u64,
    client_rps: f64,
    replies: u64,
    lost_acked: u64,
    contradictions: u64,
    connects: u64,
    failover: bool,
    cpu_primary_s: f64,
    cpu_secondary_s: f64,
    /// CPU seconds of the PVM's vCPU threads over the client load (the baseline's VM's in
    /// an unprotected run).
    vcpu_primary_load_s: f64,
    /// CPU seconds of the SVM's vCPU threads over the client load.
    vcpu_secondary_load_s: f64,
    /// Seconds the PVM's (the baseline VM's) vCPU threads were runnable but waited for a
    /// CPU, over the client load.
    vcpu_primary_wait_load_s: f64,
    /// The same of the SVM's.
    vcpu_secondary_wait_load_s: f64,
    /// vCPUs of each VM.
    vcpus: u64,
    /// The PVM's vCPU page faults per second over the load (KVM's `pf_taken`), where the
    /// kernel reports them; protected runs only.
    vcpu_primary_faults_per_s: Option<f64>,
    /// The PVM's vCPU exits per second over the load (KVM's `exits`).
    vcpu_primary_exits_per_s: Option<f64>,
    /// CPU seconds of the PVM process (the baseline's VM in an unprotected run) over the
    /// client load.
    cpu_primary_load_s: f64,
    /// CPU seconds of the SVM process over the client load.
    cpu_secondary_load_s: f64,
    /// CPU seconds of the `colo pair` process itself (proxy, client) over the load.
    cpu_pair_load_s: f64,
    /// Times the proxy held the SVM (`colo pair --svm-lead`).
    svm_holds: u64,
    /// SVM output bytes not yet compared when a checkpoint committed: work thrown away.
    svm_discarded_bytes: u64,
    /// PVM output bytes the SVM had not produced when a checkpoint committed: work the
    /// SVM skipped.
    svm_skipped_bytes: u64,
    /// TCP output bytes both sides produced and the proxy compared.
    matched_tcp_bytes: u64,
    /// The client load window in seconds (not in the JSON): `--duration`, or `secs` if the
    /// run ended sooner. `secs` of `colo pair` also counts its teardown after the load.
    #[serde(skip)]
    load_secs: f64,
}

impl PairReport {
    /// Replies per second of the client load window.
    fn rps(&self) -> f64 {
        self.replies as f64 / self.load_secs.max(1e-9)
    }

    /// vCPU CPU microseconds per reply of the PVM (or the baseline's VM) and of the SVM
    /// over the client load; `None` without replies.
    fn vcpu_us_per_reply(&self) -> Option<(f64, f64)> {
        (self.replies > 0).then(|| {
            let per = |s: f64| s * 1e6 / self.replies as f64;
            (
                per(self.vcpu_primary_load_s),
                per(self.vcpu_secondary_load_s),
            )
        })
    }
}

/// One finished run.
#[derive(Debug)]
struct Run {
    /// Which round of the plan (from 1).
    round: u32,
    kind: Kind,
    rate_mib: u64,
    report: PairReport,
}

impl Run {
    /// The run's name in the table: its kind, and its round when there are several.
    fn name(&self, rounds: u32) -> String {
        if rounds > 1 {
            format!("{} #{}", self.kind.name(), self.round)
        } else {
            self.kind.name()
        }
    }
}

/// Runs `colo bench colo`.
///
/// # Errors
/// Bad arguments, a run that cannot start, fails or times out, a run whose client saw a
/// lost acknowledged write or a contradicted reply, or an SVG file that cannot be written.
pub fn run(args: &ColoBenchArgs) -> Result<()> {
    check(args)?;
    let exe = std::env::current_exe().map_err(Error::io("find this program's executable"))?;
    let mut plan = Vec::new();
    for round in 1..=args.rounds {
        for &rate in &args.rates {
            plan.push((round, Kind::Unprotected, rate));
            plan.extend(
                args.modes
                    .iter()
                    .map(|&m| (round, Kind::Protected(m), rate)),
            );
        }
    }
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir).map_err(Error::io("create the --plot directory"))?;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    eprintln!(
        "colo bench colo: {} runs of {:.1} s of client load each (plus VM start and initial \
         sync), {} guest RAM, dirty pattern {}, {cpus} CPUs",
        plan.len(),
        args.duration.as_secs_f64(),
        fmt_bytes(args.ram),
        args.dirty_pattern.name()
    );
    let mut runs = Vec::with_capacity(plan.len());
    for (i, &(round, kind, rate_mib)) in plan.iter().enumerate() {
        let label = format!(
            "run {}/{}: {} {rate_mib} MiB/s",
            i + 1,
            plan.len(),
            kind.name()
        );
        let report = run::run_one(&exe, args, (kind, rate_mib, round), &label)?;
        runs.push(Run {
            round,
            kind,
            rate_mib,
            report,
        });
    }
    table::print_table(args, &runs, cpus);
    let svg = svg::pause_svg(args, &runs).map_err(|source| Error::Plot {
        what: "the pause histograms",
        source,
    })?;
    std::fs::write(&args.svg, svg).map_err(Error::io("write the pause histogram SVG"))?;
    println!(
        "\nPause histograms of every protected run: {}",
        args.svg.display()
    );
    if let Some(dir) = &args.plot {
        println!(
            "Checkpoint records and a report of every protected run: {}",
            dir.display()
        );
    }
    Ok(())
}

fn check(args: &ColoBenchArgs) -> Result<()> {
    if args.ram <= SCRATCH_GPA || args.ram % PAGE != 0 {
        return Err(Error::InvalidArgs(format!(
            "--ram {} leaves no scratch area for the dirty load: the guest dirties memory from \
             {} to the end of RAM, so RAM must be more than {} and a multiple of 4 KiB",
            fmt_bytes(args.ram),
            fmt_bytes(SCRATCH_GPA),
            fmt_bytes(SCRATCH_GPA)
        )));
    }
    if args.rates.is_empty() || args.modes.is_empty() {
        return Err(Error::InvalidArgs(
            "--rates and --modes must each name at least one value".into(),
        ));
    }
    if let Some(r) = args
        .rates
        .iter()
        .find(|r| r.checked_mul(PAGES_PER_MIB).is_none())
    {
        return Err(Error::InvalidArgs(format!(
            "dirty rate {r} MiB/s is too large"
        )));
    }
    Ok(())
}
