//! `colo bench colo`: whole COLO pairs on this machine under a guest dirty load, beside the
//! same guest unprotected.
//!
//! For every dirty rate of `--rates` the benchmark runs `colo pair --unprotected` (the
//! guest alone behind the same proxy and client load: the baseline), then `colo pair` once
//! per mode of `--modes`. Every run is a child process (this program, started again) that
//! lasts `--duration` and prints one JSON summary as its last line of stdout. The table
//! shows the checkpoint pauses, what was pushed, the client's request rate against the
//! baseline of the same dirty rate, and the CPU time of both sides; the pause distribution
//! of every protected run goes to an SVG file.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Deserialize;

use super::error::{Error, Result};
use super::report::fmt_bytes;
use crate::args::{parse_ms, parse_secs, parse_size};
use crate::colo::Mode;
use crate::vm::SCRATCH_GPA;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Pages per second of one MiB/s of dirtying.
const PAGES_PER_MIB: u64 = MIB / PAGE;
/// Target: checkpoint pause p99 at this dirty rate...
const PAUSE_TARGET_RATE_MIB: u64 = 100;
/// ...at most this long.
const PAUSE_TARGET_MS: f64 = 5.0;
/// Target: periodic mode keeps this fraction of the unprotected request rate.
const THROUGHPUT_TARGET: f64 = 0.80;
/// A child run may take this much longer than `--duration` (VM start, initial sync, stop).
const RUN_SLACK: Duration = Duration::from_secs(180);
/// Lines of a failed child's stderr shown in the error.
const TAIL_LINES: usize = 30;

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
}

/// Keys every run's summary must have.
const KEYS: &[&str] = &[
    "secs",
    "replies",
    "client_rps",
    "cpu_primary_s",
    "lost_acked",
    "contradictions",
];
/// Keys a protected run's summary must have too.
const PROTECTED_KEYS: &[&str] = &[
    "epochs",
    "pause_p50_ms",
    "pause_p99_ms",
    "pause_max_ms",
    "pauses_us",
    "pages",
    "bytes",
    "cpu_secondary_s",
    "failover",
];

/// Parses the last JSON line of a run's stdout and checks that it has the keys of `kind`.
fn parse_report(stdout: &[String], kind: Kind) -> std::result::Result<PairReport, String> {
    let line = stdout
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .ok_or("printed nothing on stdout")?;
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("last stdout line is not JSON ({e}): {line}"))?;
    let extra = match kind {
        Kind::Unprotected => &[][..],
        Kind::Protected(_) => PROTECTED_KEYS,
    };
    if let Some(k) = KEYS.iter().chain(extra).find(|k| v.get(**k).is_none()) {
        return Err(format!("its JSON summary has no \"{k}\": {line}"));
    }
    serde_json::from_value(v).map_err(|e| format!("unexpected JSON summary ({e}): {line}"))
}

/// The steady-state figures of a protected run: the initial full sync left out.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Steady {
    /// Checkpoints after the initial sync (one pause each).
    epochs: u64,
    /// Pages pushed after the initial sync, background and paused.
    pages: u64,
    /// Payload bytes pushed after the initial sync.
    bytes: u64,
    /// Sum of all pauses, in microseconds.
    pause_us: u64,
}

impl Steady {
    /// `colo pair` counts the initial sync (every page of RAM) in `epochs`, `pages` and
    /// `bytes` but keeps it out of `pauses_us`; this takes it out of all of them.
    fn of(r: &PairReport, ram: u64) -> Self {
        let epochs = r.pauses_us.len() as u64;
        let (pages, bytes) = if r.epochs > epochs {
            (
                r.pages.saturating_sub(ram / PAGE),
                r.bytes.saturating_sub(ram),
            )
        } else {
            (r.pages, r.bytes)
        };
        Self {
            epochs,
            pages,
            bytes,
            pause_us: r.pauses_us.iter().sum(),
        }
    }

    fn per_epoch(&self, v: u64) -> Option<f64> {
        (self.epochs > 0).then(|| v as f64 / self.epochs as f64)
    }

    /// Bytes of the epochs per second of pause: how much pushed data each second of guest
    /// downtime covered (most of it went in the background, so this is not a link rate).
    fn bytes_per_pause_s(&self) -> Option<f64> {
        (self.pause_us > 0).then(|| self.bytes as f64 / (self.pause_us as f64 / 1e6))
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
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    eprintln!(
        "colo bench colo: {} runs of {:.1} s of client load each (plus VM start and initial \
         sync), {} guest RAM, {cpus} CPUs",
        plan.len(),
        args.duration.as_secs_f64(),
        fmt_bytes(args.ram)
    );
    let mut runs = Vec::with_capacity(plan.len());
    for (i, &(round, kind, rate_mib)) in plan.iter().enumerate() {
        let label = format!(
            "run {}/{}: {} {rate_mib} MiB/s",
            i + 1,
            plan.len(),
            kind.name()
        );
        let report = run_one(&exe, args, kind, rate_mib, &label)?;
        runs.push(Run {
            round,
            kind,
            rate_mib,
            report,
        });
    }
    print_table(args, &runs, cpus);
    let svg = pause_svg(args, &runs);
    std::fs::write(&args.svg, svg).map_err(Error::io("write the pause histogram SVG"))?;
    println!(
        "\nPause histograms of every protected run: {}",
        args.svg.display()
    );
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

/// The `colo pair` arguments of one run.
fn pair_args(args: &ColoBenchArgs, kind: Kind, rate_mib: u64) -> Vec<String> {
    let mut v = vec![
        "pair".to_string(),
        "--json".into(),
        format!("--duration={}ms", args.duration.as_millis().max(1)),
        format!("--dirty-rate={}", rate_mib * PAGES_PER_MIB),
        format!("--ram={}", args.ram),
        format!("--pipeline={}", args.pipeline.max(1)),
    ];
    match kind {
        Kind::Unprotected => v.push("--unprotected".into()),
        Kind::Protected(m) => {
            v.push(format!(
                "--checkpoint-delay={}us",
                args.checkpoint_delay.as_micros()
            ));
            v.push(format!("--mode={}", mode_name(m)));
        }
    }
    v.extend(args.pair_args.iter().cloned());
    v
}

/// Starts a reader of `pipe` that collects its lines.
fn collect_lines(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        pipe.map(|p| {
            BufReader::new(p)
                .lines()
                .map_while(std::result::Result::ok)
                .collect()
        })
        .unwrap_or_default()
    })
}

/// The last lines of `lines`, indented, for an error message.
fn tail(lines: &[String]) -> String {
    let from = lines.len().saturating_sub(TAIL_LINES);
    let mut s = String::new();
    for l in &lines[from..] {
        let _ = writeln!(s, "    {l}");
    }
    if s.is_empty() {
        s.push_str("    (nothing)\n");
    }
    s
}

/// Runs one `colo pair` child to its end and returns its report.
fn run_one(
    exe: &Path,
    args: &ColoBenchArgs,
    kind: Kind,
    rate_mib: u64,
    label: &str,
) -> Result<PairReport> {
    let argv = pair_args(args, kind, rate_mib);
    let cmdline = format!("colo {}", argv.join(" "));
    eprintln!("{label} ({} pages/s) ...", rate_mib * PAGES_PER_MIB);
    tracing::debug!(%cmdline, "starting a run");
    let fail = |what: String, stderr: &[String]| {
        Error::Guest(format!(
            "{label}: `{cmdline}` {what}; the last lines of its stderr:\n{}",
            tail(stderr)
        ))
    };
    let t = Instant::now();
    let mut child = Command::new(exe)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("start a `colo pair` run"))?;
    let out = collect_lines(child.stdout.take());
    let err = collect_lines(child.stderr.take());
    let limit = args.duration + RUN_SLACK;
    let mut timed_out = false;
    let status: ExitStatus = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(Error::io("wait for a `colo pair` run"))?
        {
            break s;
        }
        if t.elapsed() > limit && !timed_out {
            // SIGTERM first: `colo pair` then stops its own children before it exits.
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet
            // (try_wait just saw it running), so the pid cannot have been reused.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            timed_out = true;
        }
        if timed_out && t.elapsed() > limit + Duration::from_secs(20) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if timed_out {
        return Err(fail(
            format!("did not finish within {} s", limit.as_secs()),
            &stderr,
        ));
    }
    if !status.success() {
        return Err(fail(format!("failed ({status})"), &stderr));
    }
    let mut r = parse_report(&stdout, kind).map_err(|e| fail(e, &stderr))?;
    r.load_secs = r.secs.min(args.duration.as_secs_f64());
    if r.lost_acked > 0 || r.contradictions > 0 {
        return Err(fail(
            format!(
                "reported {} lost acknowledged writes and {} contradicted replies",
                r.lost_acked, r.contradictions
            ),
            &stderr,
        ));
    }
    if r.failover {
        return Err(fail(
            "failed over to the secondary mid-run, so it did not measure a healthy pair".into(),
            &stderr,
        ));
    }
    match kind {
        Kind::Unprotected => eprintln!(
            "{label}: done in {:.1} s: {:.0} req/s",
            t.elapsed().as_secs_f64(),
            r.rps()
        ),
        Kind::Protected(_) => eprintln!(
            "{label}: done in {:.1} s: {} checkpoints, pause p50 {:.2} ms p99 {:.2} ms, \
             {:.0} req/s",
            t.elapsed().as_secs_f64(),
            r.pauses_us.len(),
            r.pause_p50_ms,
            r.pause_p99_ms,
            r.rps()
        ),
    }
    Ok(r)
}

fn opt(v: Option<f64>, width: usize, prec: usize) -> String {
    v.map_or_else(
        || format!("{:>width$}", "-"),
        |v| format!("{v:>width$.prec$}"),
    )
}

/// The unprotected run of the same round and dirty rate.
fn baseline<'a>(runs: &'a [Run], run: &Run) -> Option<&'a PairReport> {
    runs.iter()
        .find(|r| r.kind == Kind::Unprotected && r.rate_mib == run.rate_mib && r.round == run.round)
        .map(|r| &r.report)
}

fn ratio(runs: &[Run], run: &Run) -> Option<f64> {
    baseline(runs, run)
        .filter(|b| b.replies > 0)
        .map(|b| run.report.rps() / b.rps())
}

/// The median of `v` (the lower middle for an even count), with the least and the
/// greatest; `None` if empty.
fn median_range(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.sort_by(f64::total_cmp);
    Some((*v.get((v.len().max(1) - 1) / 2)?, v[0], v[v.len() - 1]))
}

/// How a value judged over the rounds reads: the median, and the range when there are
/// several rounds.
fn over_rounds(v: (f64, f64, f64), rounds: usize, fmt: impl Fn(f64) -> String) -> String {
    if rounds > 1 {
        format!(
            "median of {rounds} rounds {} (range {} to {})",
            fmt(v.0),
            fmt(v.1),
            fmt(v.2)
        )
    } else {
        fmt(v.0)
    }
}

#[allow(clippy::too_many_lines)]
fn print_table(args: &ColoBenchArgs, runs: &[Run], cpus: usize) {
    println!(
        "COLO pair benchmark: {:.1} s of client load per run, checkpoint every {} ms, {} guest \
         RAM (dirty load in the {} above 16 MiB), {cpus} CPUs",
        args.duration.as_secs_f64(),
        args.checkpoint_delay.as_secs_f64() * 1e3,
        fmt_bytes(args.ram),
        fmt_bytes(args.ram - SCRATCH_GPA)
    );
    println!(
        "{:<14} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>6}",
        "",
        "dirty",
        "",
        "pause",
        "pause",
        "pause",
        "pages",
        "MiB",
        "pushed",
        "epoch",
        "client",
        "vs",
        "CPU s",
        "CPU s"
    );
    println!(
        "{:<14} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>6}",
        "mode",
        "MiB/s",
        "epochs",
        "p50 ms",
        "p99 ms",
        "max ms",
        "/epoch",
        "/epoch",
        "GiB/s",
        "GiB/ps",
        "req/s",
        "unprot",
        "PVM",
        "SVM"
    );
    for run in runs {
        let r = &run.report;
        let vs = ratio(runs, run).map_or_else(|| "-".into(), |x| format!("{:.0}%", x * 100.0));
        match run.kind {
            Kind::Unprotected => {
                let (name, rate, d) = (run.name(args.rounds), run.rate_mib, "-");
                let (rps, cpu) = (r.rps(), r.cpu_primary_s);
                println!(
                    "{name:<14} {rate:>6} {d:>6} {d:>7} {d:>7} {d:>7} {d:>7} {d:>7} {d:>7} \
                     {d:>8} {rps:>7.0} {vs:>6} {cpu:>6.1} {d:>6}"
                );
            }
            Kind::Protected(_) => {
                let s = Steady::of(r, args.ram);
                let pushed = (r.load_secs > 0.0).then(|| s.bytes as f64 / GIB / r.load_secs);
                println!(
                    "{:<14} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.2} {} {} {} {} {:>7.0} {vs:>6} \
                     {:>6.1} {:>6.1}",
                    run.name(args.rounds),
                    run.rate_mib,
                    s.epochs,
                    r.pause_p50_ms,
                    r.pause_p99_ms,
                    r.pause_max_ms,
                    opt(s.per_epoch(s.pages), 7, 0),
                    opt(s.per_epoch(s.bytes).map(|b| b / MIB as f64), 7, 1),
                    opt(pushed, 7, 3),
                    opt(s.bytes_per_pause_s().map(|b| b / GIB), 8, 2),
                    r.rps(),
                    r.cpu_primary_s,
                    r.cpu_secondary_s
                );
            }
        }
    }
    println!(
        "\nColumns (protected runs; the initial full sync of the RAM is left out of all of them):\n  \
         epochs         checkpoints after the initial sync until the primary stopped (each \
         one pause)\n  \
         pause          how long the PVM stayed paused per checkpoint, as `colo pair` reports it \
         (with under 100 checkpoints p99 is about the max)\n  \
         pages, MiB /epoch  pages pushed per checkpoint, in the background during the epoch and \
         in the pause together (a page dirtied again after its background push is counted again)\n  \
         pushed GiB/s   pushed over the run: all page bytes pushed / the client load window \
         (--duration): the average load on the push path, not its speed\n  \
         epoch GiB/ps   bytes pushed per epoch / pause time (= all bytes / all pauses): how \
         much replicated memory one second of PVM downtime covered; most pages went in the \
         background, so this is not a transfer rate either\n  \
         client req/s   replies the one client connection got / the client load window \
         (--duration; one request at a time unless --pair-arg says otherwise); vs unprot = that \
         / the same-run unprotected baseline of the same dirty rate\n  \
         CPU s          user+system CPU seconds of the PVM process (colo primary, or the VM of \
         the baseline) and of the SVM process (colo secondary) from their start (VM boot and \
         initial sync included) to the end of the client load"
    );
    let protected: Vec<&Run> = runs
        .iter()
        .filter(|r| r.kind != Kind::Unprotected)
        .collect();
    if !protected.is_empty() {
        let secs = protected.iter().map(|r| r.report.secs).sum::<f64>() / protected.len() as f64;
        println!(
            "Rates are over the load window, not over `secs` of `colo pair --json` (its own \
             client_rps), which also counts the teardown after the load: {secs:.1} s on average \
             for the protected runs here."
        );
    }
    println!(
        "Note: this machine has {cpus} CPU(s){}; in colo mode the SVM runs too and competes \
         with the PVM (and the proxy and client) for them, in periodic mode it stays paused.",
        if cpus <= 2 {
            ", so contention is real"
        } else {
            ""
        }
    );
    let epoch_pages = args.checkpoint_delay.as_secs_f64()
        * args.rates.iter().copied().max().unwrap_or(0) as f64
        * PAGES_PER_MIB as f64;
    let scratch_pages = (args.ram - SCRATCH_GPA) / PAGE;
    if epoch_pages > scratch_pages as f64 {
        println!(
            "Note: at the highest rate the guest writes {epoch_pages:.0} pages per epoch into a \
             scratch area of {scratch_pages} pages; the load wraps, so distinct dirty pages per \
             epoch are capped at the scratch size (raise --ram)."
        );
    }
    println!(
        "Note: the guest's dirty load drops work it falls more than 100 ms behind on (e.g. \
         when it is paused or starved of CPU), so the rate written can be below the rate asked."
    );
    // The load's pages per epoch, at the rate asked, over one checkpoint delay alone.
    for run in runs.iter().filter(|r| r.kind != Kind::Unprotected) {
        let asked = (run.rate_mib * PAGES_PER_MIB) as f64 * args.checkpoint_delay.as_secs_f64();
        let s = Steady::of(&run.report, args.ram);
        match s.per_epoch(s.pages) {
            Some(got) if asked > 0.0 && got < asked * 0.75 => println!(
                "Note: {} {} MiB/s pushed {got:.0} pages per epoch where the rate asked writes \
                 {asked:.0} in one checkpoint delay ({:.0}%): the guest did not dirty memory at \
                 that rate.",
                run.kind.name(),
                run.rate_mib,
                got / asked * 100.0
            ),
            _ => {}
        }
    }
    if args.modes.contains(&Mode::Periodic) {
        println!(
            "Note: in periodic mode the proxy releases a reply only when the checkpoint after \
             it commits, so a client with one request in flight gets at most about one reply \
             per checkpoint ({:.0}/s at this checkpoint delay).",
            1.0 / args.checkpoint_delay.as_secs_f64()
        );
    }
    // A pair whose secondary dropped out carries on unprotected and stops checkpointing.
    let expected = args.duration.as_secs_f64() / args.checkpoint_delay.as_secs_f64();
    for run in runs.iter().filter(|r| r.kind != Kind::Unprotected) {
        let n = run.report.pauses_us.len();
        if (n as f64) < expected / 2.0 {
            println!(
                "Note: {} {} MiB/s took {n} checkpoints, under half of the {expected:.0} its \
                 duration and checkpoint delay allow (slow checkpoints, or a secondary lost \
                 mid-run).",
                run.kind.name(),
                run.rate_mib
            );
        }
    }

    println!();
    for &m in &args.modes {
        let name = mode_name(m);
        let p99s: Vec<f64> = runs
            .iter()
            .filter(|r| r.kind == Kind::Protected(m) && r.rate_mib == PAUSE_TARGET_RATE_MIB)
            .filter(|r| !r.report.pauses_us.is_empty())
            .map(|r| r.report.pause_p99_ms)
            .collect();
        let n = p99s.len();
        let verdict = if !args.rates.contains(&PAUSE_TARGET_RATE_MIB) {
            format!("not measured ({PAUSE_TARGET_RATE_MIB} is not in --rates)")
        } else {
            match median_range(p99s) {
                None => "not measured (no checkpoints)".into(),
                Some(v) => format!(
                    "{} -> {}",
                    over_rounds(v, n, |x| format!("{x:.2} ms")),
                    met(v.0 <= PAUSE_TARGET_MS)
                ),
            }
        };
        println!(
            "target: pause p99 <= {PAUSE_TARGET_MS} ms at {PAUSE_TARGET_RATE_MIB} MiB/s dirty, \
             {name}: {verdict}"
        );
    }
    if !args.modes.contains(&Mode::Periodic) {
        println!(
            "target: service throughput >= {:.0}% of unprotected in periodic mode: not \
             measured (periodic is not in --modes)",
            THROUGHPUT_TARGET * 100.0
        );
        return;
    }
    for &rate in &args.rates {
        let ratios: Vec<f64> = runs
            .iter()
            .filter(|r| r.kind == Kind::Protected(Mode::Periodic) && r.rate_mib == rate)
            .filter_map(|r| ratio(runs, r))
            .collect();
        let n = ratios.len();
        let verdict = median_range(ratios).map_or_else(
            || "not measured (the baseline got no replies)".into(),
            |v| {
                format!(
                    "{} -> {}",
                    over_rounds(v, n, |x| format!("{:.0}%", x * 100.0)),
                    met(v.0 >= THROUGHPUT_TARGET)
                )
            },
        );
        println!(
            "target: service throughput >= {:.0}% of unprotected in periodic mode, {rate} MiB/s \
             dirty: {verdict}",
            THROUGHPUT_TARGET * 100.0,
        );
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

/// Log-spaced histogram bins in milliseconds: `per_decade` bins per power of ten, from
/// `lo` over `decades` decades.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LogBins {
    /// Lowest edge, a power of ten (as an exponent).
    lo_exp: i32,
    decades: u32,
    per_decade: u32,
}

impl LogBins {
    /// Bins that cover every value of `values_ms` and `also_ms`, from 10 us up.
    fn covering(values_ms: impl IntoIterator<Item = f64>, also_ms: f64, per_decade: u32) -> Self {
        let (mut lo, mut hi) = (also_ms, also_ms);
        for v in values_ms.into_iter().filter(|v| *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let lo_exp = (lo.max(0.01).log10().floor() as i32).min(2);
        let hi_exp = (hi.log10().ceil() as i32).max(lo_exp + 1);
        Self {
            lo_exp,
            decades: (hi_exp - lo_exp) as u32,
            per_decade: per_decade.max(1),
        }
    }

    fn len(&self) -> usize {
        (self.decades * self.per_decade) as usize
    }

    /// The lower edge of bin `i` (`i == len()` gives the top edge).
    fn edge(&self, i: usize) -> f64 {
        10f64.powf(f64::from(self.lo_exp) + i as f64 / f64::from(self.per_decade))
    }

    /// Where `v` lies on the axis, 0 at the lowest edge and 1 at the top one (clamped).
    fn position(&self, v: f64) -> f64 {
        if v <= 0.0 {
            return 0.0;
        }
        ((v.log10() - f64::from(self.lo_exp)) / f64::from(self.decades)).clamp(0.0, 1.0)
    }

    /// The bin of `v`; values outside the range land in the first or the last bin.
    fn index(&self, v: f64) -> usize {
        let x = self.position(v) * self.len() as f64;
        // A value on an edge belongs to the bin above it, despite rounding in log10.
        ((x + 1e-9).floor() as usize).min(self.len() - 1)
    }

    fn counts(&self, values_ms: impl IntoIterator<Item = f64>) -> Vec<u64> {
        let mut c = vec![0; self.len()];
        for v in values_ms {
            c[self.index(v)] += 1;
        }
        c
    }
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick label for 10^e ms.
fn decade_label(e: i32) -> String {
    if e >= 0 {
        format!("{}", 10u64.pow(e as u32))
    } else {
        format!("{:.*}", (-e) as usize, 10f64.powi(e))
    }
}

/// A round upper bound of a y axis in percent, whose quarters are round too.
fn nice_top(max_pct: f64) -> f64 {
    [2.0, 4.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        .into_iter()
        .find(|t| *t >= max_pct)
        .unwrap_or(100.0)
}

/// One panel of the histogram file.
struct Panel<'a> {
    title: String,
    color: &'static str,
    pauses_us: &'a [u64],
    p50_ms: f64,
    p99_ms: f64,
}

const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 250.0;
/// Plot area inside a panel: left, right, top and bottom margins.
const PLOT: (f64, f64, f64, f64) = (52.0, 14.0, 34.0, 44.0);
const HEADER_H: f64 = 64.0;

fn mode_color(m: Mode) -> &'static str {
    match m {
        Mode::Periodic => "#1f77b4",
        Mode::Colo => "#2ca02c",
    }
}

/// The SVG of every protected run's pauses: one panel per run, a row per dirty rate and a
/// column per mode, all on the same log-spaced millisecond axis.
fn pause_svg(args: &ColoBenchArgs, runs: &[Run]) -> String {
    let cols = args.modes.len().max(1);
    let panels: Vec<Panel<'_>> = runs
        .iter()
        .filter_map(|r| match r.kind {
            Kind::Unprotected => None,
            Kind::Protected(m) => Some(Panel {
                title: format!(
                    "{}{}, {} MiB/s dirty: {} pauses, max {:.2} ms",
                    mode_name(m),
                    if args.rounds > 1 {
                        format!(" #{}", r.round)
                    } else {
                        String::new()
                    },
                    r.rate_mib,
                    r.report.pauses_us.len(),
                    r.report.pause_max_ms
                ),
                color: mode_color(m),
                pauses_us: &r.report.pauses_us,
                p50_ms: r.report.pause_p50_ms,
                p99_ms: r.report.pause_p99_ms,
            }),
        })
        .collect();
    let title = format!(
        "colo bench colo: checkpoint pause distribution ({:.1} s per run, checkpoint every {} \
         ms, {} RAM)",
        args.duration.as_secs_f64(),
        args.checkpoint_delay.as_secs_f64() * 1e3,
        fmt_bytes(args.ram)
    );
    let legend: Vec<(String, &'static str)> = args
        .modes
        .iter()
        .map(|&m| (mode_name(m), mode_color(m)))
        .collect();
    histogram_svg(&title, &legend, &panels, cols)
}

/// Hand-written SVG: bar histograms (share of pauses per log-spaced bin) in a grid of
/// `cols` columns, with p50, p99 and target markers and a legend.
#[allow(clippy::too_many_lines)]
fn histogram_svg(
    title: &str,
    legend: &[(String, &'static str)],
    panels: &[Panel<'_>],
    cols: usize,
) -> String {
    let ms = |us: &u64| *us as f64 / 1e3;
    let bins = LogBins::covering(
        panels.iter().flat_map(|p| p.pauses_us.iter().map(ms)),
        PAUSE_TARGET_MS * 2.0,
        10,
    );
    let rows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (
        PANEL_W * cols as f64,
        HEADER_H + PANEL_H * rows as f64 + 8.0,
    );
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    // Legend: one swatch per mode, then the markers.
    let mut x = 10.0;
    let y = 44.0;
    for (name, color) in legend {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}" fill-opacity="0.75"/><text x="{}" y="{y}">{} (share of pauses per bin)</text>"#,
            y - 10.0,
            x + 16.0,
            esc(name)
        );
        x += 16.0 + 7.0 * (name.len() as f64 + 28.0);
    }
    for (label, style) in [
        ("p50", r#"stroke="black""#),
        ("p99", r#"stroke="black" stroke-dasharray="4,3""#),
        (
            "5 ms target",
            r##"stroke="#d62728" stroke-dasharray="2,2""##,
        ),
    ] {
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" {style} stroke-width="1.5"/><text x="{}" y="{y}">{label}</text>"#,
            y - 4.0,
            x + 22.0,
            y - 4.0,
            x + 26.0
        );
        x += 26.0 + 7.0 * (label.len() as f64 + 2.0);
    }

    let (ml, mr, mt, mb) = PLOT;
    let (pw, ph) = (PANEL_W - ml - mr, PANEL_H - mt - mb);
    for (i, p) in panels.iter().enumerate() {
        let (ox, oy) = (
            (i % cols) as f64 * PANEL_W,
            HEADER_H + (i / cols) as f64 * PANEL_H,
        );
        let (x0, y0) = (ox + ml, oy + mt + ph);
        let xat = |v: f64| x0 + bins.position(v) * pw;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
            ox + 8.0,
            oy + 16.0,
            esc(&p.title)
        );
        let counts = bins.counts(p.pauses_us.iter().map(ms));
        let n = p.pauses_us.len().max(1) as f64;
        let max_pct = counts.iter().copied().max().unwrap_or(0) as f64 * 100.0 / n;
        let top = nice_top(max_pct);
        let yat = |pct: f64| y0 - pct / top * ph;
        // Grid and y ticks.
        for k in 0..=4 {
            let pct = top * f64::from(k) / 4.0;
            let yy = yat(pct);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{pct}%</text>"##,
                x0 + pw,
                x0 - 4.0,
                yy + 4.0
            );
        }
        // Bars.
        for (b, &c) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            let (xa, xb) = (xat(bins.edge(b)), xat(bins.edge(b + 1)));
            let yy = yat(c as f64 * 100.0 / n);
            let _ = writeln!(
                s,
                r#"<rect x="{xa:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}" fill-opacity="0.75"><title>{:.3}-{:.3} ms: {c}</title></rect>"#,
                (xb - xa - 0.5).max(0.5),
                y0 - yy,
                p.color,
                bins.edge(b),
                bins.edge(b + 1)
            );
        }
        if p.pauses_us.is_empty() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">no checkpoint pauses</text>"#,
                x0 + pw / 2.0,
                y0 - ph / 2.0
            );
        } else {
            for (v, dash) in [(p.p50_ms, ""), (p.p99_ms, r#" stroke-dasharray="4,3""#)] {
                let xx = xat(v);
                let _ = writeln!(
                    s,
                    r#"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{y0}" stroke="black" stroke-width="1.5"{dash}/>"#,
                    y0 - ph
                );
            }
        }
        let xt = xat(PAUSE_TARGET_MS);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.1}" y1="{}" x2="{xt:.1}" y2="{y0}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="2,2"/>"##,
            y0 - ph
        );
        // Axes, x ticks (decades labelled, 2x and 5x marked) and labels.
        let _ = writeln!(
            s,
            r#"<path d="M{x0},{} V{y0} H{}" fill="none" stroke="black"/>"#,
            y0 - ph,
            x0 + pw
        );
        for d in 0..=bins.decades as i32 {
            let e = bins.lo_exp + d;
            let xx = xat(10f64.powi(e));
            let _ = writeln!(
                s,
                r#"<line x1="{xx:.1}" y1="{y0}" x2="{xx:.1}" y2="{}" stroke="black"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"#,
                y0 + 5.0,
                y0 + 17.0,
                decade_label(e)
            );
            if d < bins.decades as i32 {
                for m in [2.0, 5.0] {
                    let xm = xat(m * 10f64.powi(e));
                    let _ = writeln!(
                        s,
                        r#"<line x1="{xm:.1}" y1="{y0}" x2="{xm:.1}" y2="{}" stroke="black"/>"#,
                        y0 + 3.0
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">checkpoint pause (ms, log scale)</text>"#,
            x0 + pw / 2.0,
            y0 + 32.0
        );
        let (lx, ly) = (ox + 11.0, oy + mt + ph / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{lx}" y="{ly}" text-anchor="middle" transform="rotate(-90 {lx} {ly})">% of pauses</text>"#
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_bins_cover_the_values_and_the_target() {
        let b = LogBins::covering([0.3, 42.0], 10.0, 10);
        assert_eq!((b.lo_exp, b.decades), (-1, 3));
        assert_eq!(b.len(), 30);
        assert!((b.edge(0) - 0.1).abs() < 1e-12);
        assert!((b.edge(30) - 100.0).abs() < 1e-9);
        // Values on a decade edge go to the bin that starts there.
        assert_eq!(b.index(1.0), 10);
        assert_eq!(b.index(10.0), 20);
        assert_eq!(b.index(0.1), 0);
        // Outside the range: clamped into the first and last bin.
        assert_eq!(b.index(0.0), 0);
        assert_eq!(b.index(1e6), 29);
        let c = b.counts([0.1, 0.5, 1.0, 1.0, 99.0, 500.0]);
        assert_eq!(c.iter().sum::<u64>(), 6);
        assert_eq!(c[10], 2);
        assert_eq!(c[29], 2);
    }

    #[test]
    fn log_bins_of_nothing_still_span_a_decade() {
        let b = LogBins::covering([], 10.0, 4);
        assert_eq!((b.lo_exp, b.decades, b.len()), (1, 1, 4));
        assert_eq!(decade_label(-2), "0.01");
        assert_eq!(decade_label(2), "100");
    }

    #[test]
    fn steady_figures_leave_out_the_initial_sync() {
        let ram = 64 * MIB;
        let r = PairReport {
            epochs: 3,
            pauses_us: vec![1000, 3000],
            pages: ram / PAGE + 100,
            bytes: ram + 100 * PAGE,
            ..PairReport::default()
        };
        let s = Steady::of(&r, ram);
        assert_eq!(
            s,
            Steady {
                epochs: 2,
                pages: 100,
                bytes: 100 * PAGE,
                pause_us: 4000
            }
        );
        assert_eq!(s.per_epoch(s.pages), Some(50.0));
        assert_eq!(s.bytes_per_pause_s(), Some(100.0 * PAGE as f64 / 4e-3));
    }

    #[test]
    fn each_run_is_compared_with_the_baseline_of_its_own_round() {
        let run = |round, kind, replies| Run {
            round,
            kind,
            rate_mib: 100,
            report: PairReport {
                replies,
                load_secs: 10.0,
                ..PairReport::default()
            },
        };
        let p = Kind::Protected(Mode::Periodic);
        let runs = [
            run(1, Kind::Unprotected, 1000),
            run(1, p, 500),
            run(2, Kind::Unprotected, 2000),
            run(2, p, 1800),
            run(3, Kind::Unprotected, 1000),
            run(3, p, 700),
        ];
        let ratios: Vec<f64> = runs.iter().filter_map(|r| ratio(&runs, r)).collect();
        assert_eq!(ratios, [1.0, 0.5, 1.0, 0.9, 1.0, 0.7]);
        let periodic = runs
            .iter()
            .filter(|r| r.kind == p)
            .filter_map(|r| ratio(&runs, r))
            .collect();
        assert_eq!(median_range(periodic), Some((0.7, 0.5, 0.9)));
        assert_eq!(median_range(vec![3.0, 1.0]), Some((1.0, 1.0, 3.0)));
        assert_eq!(median_range(Vec::new()), None);
        assert_eq!(runs[1].name(3), "periodic #1");
        assert_eq!(runs[1].name(1), "periodic");
    }

    #[test]
    fn reports_need_their_keys() {
        let line = r#"{"secs":5.0,"replies":10,"client_rps":2.0,"cpu_primary_s":1.0,"lost_acked":0,"contradictions":0}"#;
        let r = parse_report(
            &["noise".into(), line.into(), String::new()],
            Kind::Unprotected,
        )
        .expect("a baseline summary");
        assert_eq!(r.replies, 10);
        let e = parse_report(&[line.into()], Kind::Protected(Mode::Colo)).unwrap_err();
        assert!(e.contains("\"epochs\""), "{e}");
        assert!(parse_report(&["not json".into()], Kind::Unprotected).is_err());
    }

    #[test]
    fn svg_has_one_panel_per_run_and_escapes_text() {
        let pauses = [800, 1200, 4000, 12_000];
        let panels = [
            Panel {
                title: "periodic <a & b>".into(),
                color: "#1f77b4",
                pauses_us: &pauses,
                p50_ms: 1.2,
                p99_ms: 12.0,
            },
            Panel {
                title: "colo".into(),
                color: "#2ca02c",
                pauses_us: &[],
                p50_ms: 0.0,
                p99_ms: 0.0,
            },
        ];
        let svg = histogram_svg("t", &[("periodic".into(), "#1f77b4")], &panels, 2);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("periodic &lt;a &amp; b&gt;"));
        assert!(svg.contains("no checkpoint pauses"));
        // Four pauses in four distinct bins: four bars.
        assert_eq!(svg.matches("<rect x=").count(), 4 + 1);
        assert_eq!(svg.matches("<svg").count(), 1);
    }
}
