//! `colo bench failover`: the client's gap when the primary dies.
//!
//! Every run is `colo pair --pipeline 32 --json` in a child process (this program, started
//! again). Two runs in three kill the primary outright at a random time
//! (`--kill-primary-after`, uniform in `--kill-from` to `--kill-to`), the third makes it
//! abort at a random step of a random checkpoint (`COLO_TEST_CRASH_AT`, at about the same
//! times). Baseline runs, spread among them, are the same pair over the same duration with
//! no fault: their longest wait is what this machine gives a client with nothing failing,
//! and a failover figure can only be read beside it.
//!
//! Each run's `failover_timeline` (see `colo pair --json`) says where the gap went, in
//! milliseconds from the death: the secondary lost the link, the supervisor saw the
//! process end (its alive file went: the split-brain guard), the secondary's takeover
//! check passed, the proxy switched the client to the secondary, the client's first reply
//! came. The table gives each figure's distribution over the runs, beside the heartbeat
//! timeout (which still decides for a primary that is silent but not dead).

mod run;
mod table;

use std::time::Duration;

use clap::Args;

use super::error::{Error, Result};
use crate::args::{parse_ms, parse_secs};
use run::{Fault, RunReport};

/// Target: the client's gap at a primary's death, at p99 over the runs...
const TARGET_MS: f64 = 100.0;
/// ...over at least this many runs.
const TARGET_RUNS: usize = 50;
/// The checkpoint steps a crash run picks from (`COLO_TEST_CRASH_AT`).
const CRASH_PHASES: [&str; 4] = ["request", "push", "state", "commit"];
/// Most runs of one benchmark.
const MAX_RUNS: usize = 1000;

/// `colo bench failover`.
#[derive(Debug, Args)]
#[command(
    after_help = "Every run is `colo pair --json` in a child process. Needs /dev/kvm, no \
                        root. Progress goes to stderr, a line per run.\n\
                        Example: colo bench failover --runs 50\n\
                        \x20        colo bench failover --runs 2 --baseline-runs 1 --duration 3s \
                        --json"
)]
pub struct FailoverArgs {
    /// Runs with the primary dying (killed or crashed at random), 1 to 1000; the target
    /// is judged over at least 50.
    #[arg(long, default_value_t = 50, value_parser = parse_runs)]
    runs: usize,
    /// Runs with no fault, over the same duration, spread among the others: the same-run
    /// baseline of the client's longest wait. 0 to 1000.
    #[arg(long, default_value_t = 5, value_parser = parse_baseline_runs)]
    baseline_runs: usize,
    /// Client load time of each run (e.g. 8s; plain numbers are seconds).
    #[arg(long, default_value = "8s", value_parser = parse_secs)]
    duration: Duration,
    /// Earliest kill, from the start of the client load.
    #[arg(long, default_value = "3s", value_parser = parse_secs)]
    kill_from: Duration,
    /// Latest kill; must stay before --duration.
    #[arg(long, default_value = "6s", value_parser = parse_secs)]
    kill_to: Duration,
    /// Every how many runs one crashes the primary at a random checkpoint step instead of
    /// killing it (0: only kills).
    #[arg(long, default_value_t = 3)]
    crash_every: usize,
    /// Requests the client keeps in flight.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pipeline: u64,
    /// Time between heartbeats (passed to every run).
    #[arg(long, default_value = "100ms", value_parser = parse_ms)]
    heartbeat_interval: Duration,
    /// Silence after which a side counts its peer as lost (passed to every run). A dead
    /// primary is noticed sooner, by its closed connections; this decides for a silent one.
    #[arg(long, default_value = "1s", value_parser = parse_ms)]
    heartbeat_timeout: Duration,
    /// Seed of the random kill times and crash points [default: from the clock; printed].
    #[arg(long)]
    seed: Option<u64>,
    /// One more argument for every `colo pair` run (repeatable), e.g.
    /// --pair-arg=--dirty-rate=2560.
    #[arg(long = "pair-arg", value_name = "ARG", allow_hyphen_values = true)]
    pair_args: Vec<String>,
    /// Print the results as one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_runs(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_RUNS).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a run count: use 1 to {MAX_RUNS}")),
    }
}

fn parse_baseline_runs(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_RUNS => Ok(n),
        _ => Err(format!("'{s}' is not a run count: use 0 to {MAX_RUNS}")),
    }
}

/// A small, seeded generator (xorshift64*): the kill times and crash points of a seed are
/// the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What every run of the plan does, in order.
fn plan(a: &FailoverArgs, seed: u64) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let (from, to) = (a.kill_from.as_secs_f64(), a.kill_to.as_secs_f64());
    let mut faults: Vec<Fault> = (1..=a.runs)
        .map(|i| {
            let at = from + (to - from) * rng.unit();
            if a.crash_every > 0 && i % a.crash_every == 0 {
                let phase = CRASH_PHASES[(rng.next() % CRASH_PHASES.len() as u64) as usize];
                // Checkpoints come every 100 ms (the default delay) from the start.
                let checkpoint = (at * 10.0).round().max(2.0) as u64;
                Fault::Crash { phase, checkpoint }
            } else {
                Fault::Kill {
                    after: Duration::from_secs_f64(at),
                }
            }
        })
        .collect();
    // The baselines go evenly among the runs (the first one first).
    let n = a.baseline_runs;
    for k in (0..n).rev() {
        let pos = k * faults.len() / n.max(1);
        faults.insert(pos, Fault::None);
    }
    faults
}

/// Runs the benchmark and prints its table (or JSON).
///
/// # Errors
/// Arguments that do not fit together, a run that cannot start or prints no summary, or
/// a run that lost or contradicted data or did not fail over.
pub fn run(a: &FailoverArgs) -> Result<()> {
    if a.kill_from >= a.kill_to || a.kill_to >= a.duration {
        return Err(Error::InvalidArgs(format!(
            "the kills must fall inside the run: --kill-from ({:?}) < --kill-to ({:?}) < \
             --duration ({:?})",
            a.kill_from, a.kill_to, a.duration
        )));
    }
    if a.heartbeat_timeout <= a.heartbeat_interval {
        return Err(Error::InvalidArgs(
            "--heartbeat-timeout must exceed --heartbeat-interval".into(),
        ));
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let exe = std::env::current_exe().map_err(Error::io("find this program's executable"))?;
    let faults = plan(a, seed);
    eprintln!(
        "colo bench failover: {} runs with the primary dying and {} without a fault, {} s \
         each (seed {seed})",
        a.runs,
        a.baseline_runs,
        a.duration.as_secs_f64()
    );
    let total = faults.len();
    let mut reports: Vec<RunReport> = Vec::with_capacity(total);
    for (i, fault) in faults.into_iter().enumerate() {
        let label = format!("run {}/{total}", i + 1);
        let r = run::run_one(&exe, a, fault, &label)?;
        eprintln!("{label}: {}", r.line());
        reports.push(r);
    }
    let t = table::Table::of(&reports, a);
    if a.json {
        println!("{}", t.json(&reports, seed));
    } else {
        t.print(a, seed);
    }
    t.verdict()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: FailoverArgs,
    }

    fn args(extra: &[&str]) -> FailoverArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
            .expect("valid arguments")
            .a
    }

    #[test]
    fn the_plan_mixes_kills_crashes_and_spread_baselines() {
        let a = args(&["--runs", "9", "--baseline-runs", "3"]);
        let p = plan(&a, 7);
        assert_eq!(p.len(), 12);
        let none: Vec<usize> = (0..p.len())
            .filter(|&i| matches!(p[i], Fault::None))
            .collect();
        assert_eq!(
            none,
            [0, 4, 8],
            "baselines spread evenly, the first one first"
        );
        let crashes = p
            .iter()
            .filter(|f| matches!(f, Fault::Crash { .. }))
            .count();
        assert_eq!(crashes, 3, "every third dying run crashes");
        for f in &p {
            match f {
                Fault::Kill { after } => assert!((3.0..6.0).contains(&after.as_secs_f64())),
                Fault::Crash { checkpoint, .. } => assert!((30..=60).contains(checkpoint)),
                Fault::None => {}
            }
        }
        assert_eq!(plan(&a, 7), p, "a seed gives the same plan");
    }

    #[test]
    fn run_counts_are_bounded() {
        assert!(parse_runs("0").is_err());
        assert!(parse_runs("1001").is_err());
        assert_eq!(parse_runs("50"), Ok(50));
        assert_eq!(parse_baseline_runs("0"), Ok(0));
        assert!(parse_baseline_runs("x").is_err());
    }
}
