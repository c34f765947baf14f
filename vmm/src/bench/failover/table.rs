//! The distributions `colo bench failover` prints, its target line and its verdict.

use serde_json::json;

use super::run::{Fault, RunReport, Timeline};
use super::{FailoverArgs, TARGET_MS, TARGET_RUNS};
use crate::bench::error::{Error, Result};

/// A distribution over the runs: min, median, p90, p99, max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dist {
    pub(super) n: usize,
    pub(super) min: f64,
    pub(super) median: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
}

impl Dist {
    /// The distribution of `v` (nearest rank: the smallest value with at least q of the
    /// runs at or below it); `None` if empty.
    pub(super) fn of(mut v: Vec<f64>) -> Option<Self> {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let q = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        (n > 0).then(|| Self {
            n,
            min: v[0],
            median: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: v[n - 1],
        })
    }

    fn json(&self) -> serde_json::Value {
        json!({"n": self.n, "min": self.min, "median": self.median, "p90": self.p90,
               "p99": self.p99, "max": self.max})
    }
}

/// One row: a name, a key for the JSON, and the distribution (if any run had the figure).
struct Row {
    name: &'static str,
    key: &'static str,
    dist: Option<Dist>,
}

/// The benchmark's figures.
pub(super) struct Table {
    rows: Vec<Row>,
    dying: usize,
    /// Runs whose fault did not happen (a crash point the run did not reach).
    no_death: usize,
    failovers: usize,
    /// Takeovers after which the client got no reply.
    stalled: usize,
    baselines: usize,
    lost: u64,
    contradicted: u64,
    heartbeat_timeout_ms: f64,
    heartbeat_interval_ms: f64,
}

impl Table {
    pub(super) fn of(reports: &[RunReport], a: &FailoverArgs) -> Self {
        // A crash point the run never reached is no death: counted, not judged.
        let planned = reports.iter().filter(|r| r.fault != Fault::None).count();
        let dying: Vec<&RunReport> = reports
            .iter()
            .filter(|r| r.fault != Fault::None && r.summary.failover_timeline.is_some())
            .collect();
        let base: Vec<&RunReport> = reports.iter().filter(|r| r.fault == Fault::None).collect();
        let timelines: Vec<&Timeline> = dying
            .iter()
            .filter(|r| r.summary.failover)
            .filter_map(|r| r.summary.failover_timeline.as_ref())
            .collect();
        let tl = |f: fn(&Timeline) -> Option<f64>| -> Option<Dist> {
            Dist::of(timelines.iter().filter_map(|t| f(t)).collect())
        };
        let rows = vec![
            Row {
                name: "longest wait, whole run (max_wait_ms)",
                key: "max_wait_ms",
                dist: Dist::of(dying.iter().map(|r| r.summary.max_wait_ms).collect()),
            },
            Row {
                name: "  baseline: same pair, no fault",
                key: "baseline_max_wait_ms",
                dist: Dist::of(base.iter().map(|r| r.summary.max_wait_ms).collect()),
            },
            Row {
                name: "longest wait of a request the death caught",
                key: "caught_wait_ms",
                dist: tl(|t| t.caught_wait_ms),
            },
            Row {
                name: "longest wait of a reply after the death",
                key: "after_death_max_wait_ms",
                dist: tl(|t| t.max_wait_ms),
            },
            Row {
                name: "client's silence across the switch",
                key: "gap_ms",
                dist: tl(|t| t.gap_ms),
            },
            Row {
                name: "longest silence after the death",
                key: "longest_silence_ms",
                dist: tl(|t| t.longest_silence_ms),
            },
            Row {
                name: "from the death: secondary lost the link",
                key: "lost_ms",
                dist: tl(|t| t.lost_ms),
            },
            Row {
                name: "  the process's end seen (alive file gone)",
                key: "exit_seen_ms",
                dist: tl(|t| t.exit_seen_ms),
            },
            Row {
                name: "  takeover check passed",
                key: "decided_ms",
                dist: tl(|t| t.decided_ms),
            },
            Row {
                name: "  proxy switched to the secondary",
                key: "switched_ms",
                dist: tl(|t| t.switched_ms),
            },
            Row {
                name: "  client's first reply after the switch",
                key: "resumed_ms",
                dist: tl(|t| t.resumed_ms),
            },
        ];
        Self {
            rows,
            dying: dying.len(),
            no_death: planned - dying.len(),
            failovers: timelines.len(),
            stalled: dying.iter().filter(|r| r.summary.stalled()).count(),
            baselines: base.len(),
            lost: reports.iter().map(|r| r.summary.lost_acked).sum(),
            contradicted: reports.iter().map(|r| r.summary.contradictions).sum(),
            heartbeat_timeout_ms: a.heartbeat_timeout.as_secs_f64() * 1e3,
            heartbeat_interval_ms: a.heartbeat_interval.as_secs_f64() * 1e3,
        }
    }

    fn dist(&self, key: &str) -> Option<Dist> {
        self.rows.iter().find(|r| r.key == key).and_then(|r| r.dist)
    }

    /// The target line.
    fn target(&self) -> String {
        let Some(w) = self.dist("max_wait_ms") else {
            return "target: no run with the primary dying".into();
        };
        let caught = self.dist("caught_wait_ms");
        let judge = |p99: f64| {
            if self.dying < TARGET_RUNS {
                format!("not judged: fewer than {TARGET_RUNS} runs")
            } else if p99 <= TARGET_MS {
                "met".into()
            } else {
                "NOT met".into()
            }
        };
        let base = self
            .dist("baseline_max_wait_ms")
            .map_or("no baseline run".into(), |b| {
                format!(
                    "the baseline's (no fault) p99 {:.1} ms, max {:.1} ms",
                    b.p99, b.max
                )
            });
        format!(
            "target: the client's longest wait with the primary dying <= {TARGET_MS:.0} ms at p99 \
             over >= {TARGET_RUNS} runs: whole run p99 {:.1} ms over {} runs ({}); the requests \
             the death caught p99 {}; beside {base}; heartbeat timeout {:.0} ms (interval {:.0} \
             ms) still decides for a silent primary",
            w.p99,
            w.n,
            judge(w.p99),
            caught.map_or("-".into(), |d| format!(
                "{:.1} ms ({})",
                d.p99,
                judge(d.p99)
            )),
            self.heartbeat_timeout_ms,
            self.heartbeat_interval_ms,
        )
    }

    pub(super) fn print(&self, a: &FailoverArgs, seed: u64) {
        println!(
            "\ncolo bench failover: {} runs of `colo pair --pipeline {} --duration {:.1}s` with \
             the primary dying (killed at {:.1}-{:.1} s, or crashed at a checkpoint step every \
             {} runs; seed {seed}), {} runs with no fault",
            self.dying,
            a.pipeline,
            a.duration.as_secs_f64(),
            a.kill_from.as_secs_f64(),
            a.kill_to.as_secs_f64(),
            a.crash_every,
            self.baselines,
        );
        println!(
            "{:<44} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "figure (ms)", "n", "min", "median", "p90", "p99", "max"
        );
        for r in &self.rows {
            match r.dist {
                Some(d) => println!(
                    "{:<44} {:>4} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                    r.name, d.n, d.min, d.median, d.p90, d.p99, d.max
                ),
                None => println!("{:<44} {:>4}", r.name, 0),
            }
        }
        println!(
            "heartbeat timeout {:.0} ms, interval {:.0} ms",
            self.heartbeat_timeout_ms, self.heartbeat_interval_ms
        );
        println!(
            "failovers {}/{} deaths ({} planned deaths did not happen), {} with no reply after \
             the takeover, lost {}, contradicted {}",
            self.failovers, self.dying, self.no_death, self.stalled, self.lost, self.contradicted
        );
        println!("{}", self.target());
    }

    pub(super) fn json(&self, reports: &[RunReport], seed: u64) -> serde_json::Value {
        let figures: serde_json::Map<String, serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                (
                    r.key.to_string(),
                    r.dist.map_or(serde_json::Value::Null, |d| d.json()),
                )
            })
            .collect();
        json!({
            "seed": seed,
            "runs": self.dying,
            "baseline_runs": self.baselines,
            "failovers": self.failovers,
            "no_death": self.no_death,
            "stalled": self.stalled,
            "lost": self.lost,
            "contradicted": self.contradicted,
            "heartbeat_timeout_ms": self.heartbeat_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "figures": figures,
            "target": self.target(),
            "each": reports,
        })
    }

    /// Fails the benchmark on what must never happen, whatever the timing: data lost or
    /// contradicted, a primary that died without the secondary taking over, or a takeover
    /// after which the client got no reply.
    ///
    /// # Errors
    /// [`Error::Guest`] saying which.
    pub(super) fn verdict(&self) -> Result<()> {
        if self.lost > 0 || self.contradicted > 0 || self.failovers < self.dying || self.stalled > 0
        {
            return Err(Error::Guest(format!(
                "{} acknowledged writes lost, {} replies contradicted, {} of {} deaths without a \
                 takeover, {} takeovers with no reply after them",
                self.lost,
                self.contradicted,
                self.dying - self.failovers,
                self.dying,
                self.stalled
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_use_the_nearest_rank() {
        let d = Dist::of((1..=50).map(f64::from).collect()).unwrap();
        assert_eq!(
            (d.n, d.min, d.median, d.p90, d.p99, d.max),
            (50, 1.0, 25.0, 45.0, 50.0, 50.0)
        );
        let d = Dist::of((1..=200).map(f64::from).collect()).unwrap();
        assert_eq!((d.p90, d.p99), (180.0, 198.0));
        assert_eq!(Dist::of(vec![f64::NAN]), None);
        assert_eq!(Dist::of(vec![]), None);
    }
}
