//! The figures the table and the targets are judged on: steady-state pushes and pauses,
//! the ratio of each run to its same-round baseline, medians over the rounds.

use super::{Kind, PAGE, PairReport, Run};

/// The steady-state figures of a protected run: the initial full sync left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Steady {
    /// Checkpoints after the initial sync (one pause each).
    pub(super) epochs: u64,
    /// Pages pushed after the initial sync, background and paused.
    pub(super) pages: u64,
    /// Payload bytes pushed after the initial sync.
    pub(super) bytes: u64,
    /// Sum of all pauses, in microseconds.
    pub(super) pause_us: u64,
}

impl Steady {
    /// `colo pair` counts the initial sync (every page of RAM) in `epochs`, `pages` and
    /// `bytes` but keeps it out of `pauses_us`; this takes it out of all of them.
    pub(super) fn of(r: &PairReport, ram: u64) -> Self {
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

    pub(super) fn per_epoch(&self, v: u64) -> Option<f64> {
        (self.epochs > 0).then(|| v as f64 / self.epochs as f64)
    }

    /// Bytes of the epochs per second of pause: how much pushed data each second of guest
    /// downtime covered (most of it went in the background, so this is not a link rate).
    pub(super) fn bytes_per_pause_s(&self) -> Option<f64> {
        (self.pause_us > 0).then(|| self.bytes as f64 / (self.pause_us as f64 / 1e6))
    }
}

/// How a VM's vCPU threads spent the client load window, as shares of it (all its vCPUs'
/// time together): running (the guest's work and its exits), runnable but waiting for a
/// CPU another thread held, stopped for checkpoints, and the rest (halted in the guest, or
/// blocked in the VMM).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct VcpuShares {
    pub(super) running: f64,
    pub(super) waiting: f64,
    pub(super) paused: f64,
    pub(super) rest: f64,
}

impl VcpuShares {
    /// The PVM's (the baseline VM's) shares; `None` without a load window.
    pub(super) fn primary(r: &PairReport) -> Option<Self> {
        let window = r.load_secs * r.vcpus.max(1) as f64;
        (window > 0.0).then(|| {
            // Every vCPU stops for each pause; the pauses are those of the load window.
            let paused = r.pauses_us.iter().sum::<u64>() as f64 / 1e6 * r.vcpus.max(1) as f64;
            let running = r.vcpu_primary_load_s / window;
            let waiting = r.vcpu_primary_wait_load_s / window;
            let paused = (paused / window).min(1.0);
            Self {
                running,
                waiting,
                paused,
                rest: (1.0 - running - waiting - paused).max(0.0),
            }
        })
    }
}

/// A protected run's service against its baseline's, split into its two factors (their
/// product is the ratio): how much of the load window the PVM's vCPUs ran, against the
/// baseline VM's, and the baseline's vCPU CPU per reply against the PVM's.
pub(super) fn service_factors(runs: &[Run], run: &Run) -> Option<(f64, f64)> {
    let b = baseline(runs, run)?;
    let (rb, rr) = (VcpuShares::primary(b)?, VcpuShares::primary(&run.report)?);
    let (pb, pr) = (b.vcpu_us_per_reply()?.0, run.report.vcpu_us_per_reply()?.0);
    (rb.running > 0.0 && pr > 0.0).then(|| (rr.running / rb.running, pb / pr))
}

/// The unprotected run of the same round and dirty rate.
pub(super) fn baseline<'a>(runs: &'a [Run], run: &Run) -> Option<&'a PairReport> {
    runs.iter()
        .find(|r| r.kind == Kind::Unprotected && r.rate_mib == run.rate_mib && r.round == run.round)
        .map(|r| &r.report)
}

pub(super) fn ratio(runs: &[Run], run: &Run) -> Option<f64> {
    baseline(runs, run)
        .filter(|b| b.replies > 0)
        .map(|b| run.report.rps() / b.rps())
}

/// The median of `v` (the lower middle for an even count), with the least and the
/// greatest; `None` if empty.
pub(super) fn median_range(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.sort_by(f64::total_cmp);
    Some((*v.get((v.len().max(1) - 1) / 2)?, v[0], v[v.len() - 1]))
}

/// How a value judged over the rounds reads: the median, and the range when there are
/// several rounds.
pub(super) fn over_rounds(
    v: (f64, f64, f64),
    rounds: usize,
    fmt: impl Fn(f64) -> String,
) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::colo::MIB;
    use crate::colo::Mode;

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
    fn vcpu_cpu_per_reply_needs_replies() {
        let mut r = PairReport {
            replies: 2000,
            vcpu_primary_load_s: 0.5,
            vcpu_secondary_load_s: 0.25,
            ..PairReport::default()
        };
        assert_eq!(r.vcpu_us_per_reply(), Some((250.0, 125.0)));
        r.replies = 0;
        assert_eq!(r.vcpu_us_per_reply(), None);
    }

    #[test]
    fn the_service_ratio_is_the_product_of_its_factors() {
        let report = |replies, vcpu, wait, pauses_us| PairReport {
            replies,
            load_secs: 10.0,
            vcpu_primary_load_s: vcpu,
            vcpu_primary_wait_load_s: wait,
            pauses_us,
            vcpus: 1,
            ..PairReport::default()
        };
        let colo = Kind::Protected(Mode::Colo);
        let runs = [
            Run {
                round: 1,
                kind: Kind::Unprotected,
                rate_mib: 10,
                report: report(100_000, 9.0, 0.5, Vec::new()),
            },
            Run {
                round: 1,
                kind: colo,
                rate_mib: 10,
                report: report(50_000, 6.0, 2.0, vec![500_000, 500_000]),
            },
        ];
        let s = VcpuShares::primary(&runs[1].report).unwrap();
        assert!((s.running - 0.6).abs() < 1e-9);
        assert!((s.waiting - 0.2).abs() < 1e-9);
        assert!((s.paused - 0.1).abs() < 1e-9);
        assert!((s.rest - 0.1).abs() < 1e-9);
        let (busy, cost) = service_factors(&runs, &runs[1]).unwrap();
        // Ran 6 of the baseline's 9 s; 90 us per reply against 120.
        assert!((busy - 6.0 / 9.0).abs() < 1e-9);
        assert!((cost - 90.0 / 120.0).abs() < 1e-9);
        assert!((busy * cost - ratio(&runs, &runs[1]).unwrap()).abs() < 1e-9);
        assert_eq!(VcpuShares::primary(&PairReport::default()), None);
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
}
