//! The results table on stdout, its notes, and the verdict on each target.

use colo_machine::SCRATCH_GPA;

use super::stats::{
    Steady, VcpuShares, baseline, median_range, over_rounds, ratio, service_factors,
};
use super::{
    COLO_THROUGHPUT_RATE_MIB, COLO_THROUGHPUT_TARGET, ColoBenchArgs, GIB, Kind, MIB, PAGE,
    PAGES_PER_MIB, PAUSE_TARGET_MS, PAUSE_TARGET_RATE_MIB, Run, THROUGHPUT_TARGET, mode_name,
    periodic_target,
};
use crate::bench::report::fmt_bytes;
use crate::colo::Mode;

fn opt(v: Option<f64>, width: usize, prec: usize) -> String {
    v.map_or_else(
        || format!("{:>width$}", "-"),
        |v| format!("{v:>width$.prec$}"),
    )
}

/// Prints the table: a row per run, the notes on what it shows, and the targets.
pub(super) fn print_table(args: &ColoBenchArgs, runs: &[Run], cpus: usize) {
    print_runs(args, runs, cpus);
    print_notes(args, runs, cpus);
    print_service_factors(args, runs);
    print_targets(args, runs);
}

/// The heading and a row per run.
fn print_runs(args: &ColoBenchArgs, runs: &[Run], cpus: usize) {
    println!(
        "COLO pair benchmark: {:.1} s of client load per run, checkpoint every {} ms, {} guest \
         RAM (dirty load in the {} above 16 MiB), {cpus} CPUs",
        args.duration.as_secs_f64(),
        args.checkpoint_delay.as_secs_f64() * 1e3,
        fmt_bytes(args.ram),
        fmt_bytes(args.ram - SCRATCH_GPA)
    );
    println!(
        "{:<14} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>6} {:>7} {:>7}",
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
        "CPU s",
        "us/rep",
        "us/rep"
    );
    println!(
        "{:<14} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>6} {:>7} {:>7}",
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
        "SVM",
        "vCPU P",
        "vCPU S"
    );
    for run in runs {
        let r = &run.report;
        let vs = ratio(runs, run).map_or_else(|| "-".into(), |x| format!("{:.0}%", x * 100.0));
        match run.kind {
            Kind::Unprotected => {
                let (name, rate, d) = (run.name(args.rounds), run.rate_mib, "-");
                let (rps, cpu) = (r.rps(), r.cpu_primary_s);
                let per = opt(r.vcpu_us_per_reply().map(|v| v.0), 7, 0);
                println!(
                    "{name:<14} {rate:>6} {d:>6} {d:>7} {d:>7} {d:>7} {d:>7} {d:>7} {d:>7} \
                     {d:>8} {rps:>7.0} {vs:>6} {cpu:>6.1} {d:>6} {per} {d:>7}"
                );
            }
            Kind::Protected(_) => {
                let s = Steady::of(r, args.ram);
                let pushed = (r.load_secs > 0.0).then(|| s.bytes as f64 / GIB / r.load_secs);
                let per = r.vcpu_us_per_reply();
                println!(
                    "{:<14} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.2} {} {} {} {} {:>7.0} {vs:>6} \
                     {:>6.1} {:>6.1} {} {}",
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
                    r.cpu_secondary_s,
                    opt(per.map(|v| v.0), 7, 0),
                    opt(per.map(|v| v.1), 7, 0)
                );
            }
        }
    }
}

/// What the columns mean, and notes on this machine and on runs that fell short.
fn print_notes(args: &ColoBenchArgs, runs: &[Run], cpus: usize) {
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
         initial sync included) to the end of the client load\n  \
         us/rep vCPU    CPU microseconds (user+system) of the VM's vCPU threads (the guest's \
         work and its exits, without the VMM's device, push and control threads) over the \
         client load window / the client's replies in it: P the PVM (or the baseline's VM), \
         S the SVM; both sides answer the same requests, so S above P is work the SVM did \
         that a checkpoint threw away (or its exits cost more)"
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
}

/// Where each protected run's service went, against its baseline's, measured in the same
/// run: the ratio is (how much of the load window the PVM's vCPUs ran) x (the CPU they
/// took per reply), each against the unprotected VM's; and how the PVM's vCPUs spent the
/// window they did not run.
fn print_service_factors(args: &ColoBenchArgs, runs: &[Run]) {
    let pct = |s: &VcpuShares| {
        format!(
            "running {:.0}%, waiting for a CPU {:.0}%, paused {:.0}%, halted or blocked {:.0}%",
            s.running * 100.0,
            s.waiting * 100.0,
            s.paused * 100.0,
            s.rest * 100.0
        )
    };
    let mut heading = true;
    for r in runs.iter().filter(|r| r.kind != Kind::Unprotected) {
        let (Some(v), Some((busy, cost)), Some(b)) =
            (ratio(runs, r), service_factors(runs, r), baseline(runs, r))
        else {
            continue;
        };
        let (Some(sr), Some(sb)) = (VcpuShares::primary(&r.report), VcpuShares::primary(b)) else {
            continue;
        };
        let (Some(pr), Some(pb)) = (r.report.vcpu_us_per_reply(), b.vcpu_us_per_reply()) else {
            continue;
        };
        if heading {
            println!(
                "\nWhere the service went (each protected run against the unprotected run of \
                 its round; the ratio = the vCPU's running share x its CPU per reply, each \
                 against the baseline's):"
            );
            heading = false;
        }
        let faults = exit_figures(runs, r);
        println!(
            "  {} {} MiB/s: {:.0}% = ran {:.2} of the baseline's time (x{busy:.2}) x {:.0} us \
             per reply against {:.0} (x{cost:.2}); PVM vCPU {}; unprotected VM {}{faults}",
            r.name(args.rounds),
            r.rate_mib,
            v * 100.0,
            busy,
            pr.0,
            pb.0,
            pct(&sr),
            pct(&sb)
        );
    }
}

/// A protected run's vCPU page faults and exits per second, and what one fault cost the
/// PVM's vCPU: the slope of its CPU per reply over its faults per reply, against the run
/// of the same mode and round at the lowest dirty rate (both measured in this bench).
fn exit_figures(runs: &[Run], r: &Run) -> String {
    let (Some(f), Some(x)) = (
        r.report.vcpu_primary_faults_per_s,
        r.report.vcpu_primary_exits_per_s,
    ) else {
        return String::new();
    };
    let per_reply = |run: &Run| -> Option<(f64, f64)> {
        let rep = &run.report;
        let f = rep.vcpu_primary_faults_per_s?;
        (rep.replies > 0).then(|| {
            (
                rep.vcpu_primary_load_s / rep.replies as f64,
                f * rep.load_secs / rep.replies as f64,
            )
        })
    };
    let low = runs
        .iter()
        .filter(|o| o.kind == r.kind && o.round == r.round && o.rate_mib < r.rate_mib)
        .min_by_key(|o| o.rate_mib);
    let cost = match (low.and_then(per_reply), per_reply(r)) {
        (Some((c0, f0)), Some((c1, f1))) if f1 > f0 && c1 > c0 => format!(
            "; {:.1} us of vCPU CPU per fault (against {} MiB/s: {:.1} more faults and {:.0} \
             us more CPU per reply)",
            (c1 - c0) / (f1 - f0) * 1e6,
            low.map_or(0, |l| l.rate_mib),
            f1 - f0,
            (c1 - c0) * 1e6
        ),
        _ => String::new(),
    };
    format!(
        "; PVM vCPU page faults {:.1}k/s, exits {:.1}k/s{cost}",
        f / 1e3,
        x / 1e3
    )
}

/// The verdict on each target: pause p99 per mode, periodic throughput per dirty rate.
fn print_targets(args: &ColoBenchArgs, runs: &[Run]) {
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
    print_colo_targets(args, runs);
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
        let goal = periodic_target(rate);
        let verdict = median_range(ratios).map_or_else(
            || "not measured (the baseline got no replies)".into(),
            |v| {
                format!(
                    "{} -> {}",
                    over_rounds(v, n, |x| format!("{:.0}%", x * 100.0)),
                    met(v.0 >= goal)
                )
            },
        );
        println!(
            "target: service throughput >= {:.0}% of unprotected in periodic mode, {rate} MiB/s \
             dirty, {} pattern: {verdict}",
            goal * 100.0,
            args.dirty_pattern.name(),
        );
    }
}

/// The verdict on COLO mode's targets: the SVM's vCPU CPU per reply against the PVM's of
/// the same run at every dirty rate, and the service against its baseline at
/// [`COLO_THROUGHPUT_RATE_MIB`].
fn print_colo_targets(args: &ColoBenchArgs, runs: &[Run]) {
    let colo = Kind::Protected(Mode::Colo);
    if !args.modes.contains(&Mode::Colo) {
        println!(
            "target: SVM vCPU CPU per reply <= PVM's in colo mode: not measured (colo is not \
             in --modes)"
        );
        return;
    }
    for &rate in &args.rates {
        let of_rate: Vec<&Run> = runs
            .iter()
            .filter(|r| r.kind == colo && r.rate_mib == rate)
            .collect();
        let svm_over_pvm: Vec<f64> = of_rate
            .iter()
            .filter_map(|r| r.report.vcpu_us_per_reply())
            .filter(|v| v.0 > 0.0)
            .map(|v| v.1 / v.0)
            .collect();
        let n = svm_over_pvm.len();
        let per = |f: fn((f64, f64)) -> f64| {
            median_range(
                of_rate
                    .iter()
                    .filter_map(|r| r.report.vcpu_us_per_reply().map(f))
                    .collect(),
            )
        };
        let verdict = match (median_range(svm_over_pvm), per(|v| v.0), per(|v| v.1)) {
            (Some(v), Some(p), Some(s)) => format!(
                "SVM/PVM {} (PVM {:.0} us, SVM {:.0} us per reply) -> {}",
                over_rounds(v, n, |x| format!("{x:.2}")),
                p.0,
                s.0,
                met(v.0 <= 1.0)
            ),
            _ => "not measured (no replies or no vCPU time)".into(),
        };
        for r in &of_rate {
            let rep = &r.report;
            // The PVM's TCP output: compared with the SVM's, or released by a commit
            // before the SVM had produced it.
            let out = (rep.matched_tcp_bytes + rep.svm_skipped_bytes).max(1) as f64;
            let of = |b: u64| b as f64 / out * 100.0;
            println!(
                "  {} {rate} MiB/s: of the PVM's TCP output {} was compared and {} ({:.1}%) \
                 went out at a commit before the SVM had produced it (the SVM was behind; it \
                 skips that work); the SVM's output thrown away at commits (it was ahead): {} \
                 ({:.1}% of the PVM's); the SVM was held {} times",
                r.name(args.rounds),
                fmt_bytes(rep.matched_tcp_bytes),
                fmt_bytes(rep.svm_skipped_bytes),
                of(rep.svm_skipped_bytes),
                fmt_bytes(rep.svm_discarded_bytes),
                of(rep.svm_discarded_bytes),
                rep.svm_holds
            );
        }
        println!(
            "target: SVM vCPU CPU per reply <= PVM's in colo mode, {rate} MiB/s dirty, pipeline \
             {}: {verdict}",
            args.pipeline.max(1)
        );
    }
    let ratios: Vec<f64> = runs
        .iter()
        .filter(|r| r.kind == colo && r.rate_mib == COLO_THROUGHPUT_RATE_MIB)
        .filter_map(|r| ratio(runs, r))
        .collect();
    let n = ratios.len();
    let verdict = if !args.rates.contains(&COLO_THROUGHPUT_RATE_MIB) {
        format!("not measured ({COLO_THROUGHPUT_RATE_MIB} is not in --rates)")
    } else {
        median_range(ratios).map_or_else(
            || "not measured (the baseline got no replies)".into(),
            |v| {
                format!(
                    "{} -> {}",
                    over_rounds(v, n, |x| format!("{:.0}%", x * 100.0)),
                    met(v.0 >= COLO_THROUGHPUT_TARGET)
                )
            },
        )
    };
    println!(
        "target: service throughput >= {:.0}% of unprotected in colo mode, \
         {COLO_THROUGHPUT_RATE_MIB} MiB/s dirty, pipeline {}: {verdict}",
        COLO_THROUGHPUT_TARGET * 100.0,
        args.pipeline.max(1)
    );
    // Where the time went, measured in the same runs: the CPU both sides took from this
    // machine's cores, and how much of the PVM's output had to wait for a checkpoint
    // because the SVM had not produced it yet.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    for r in runs
        .iter()
        .filter(|r| r.kind == colo && r.rate_mib == COLO_THROUGHPUT_RATE_MIB)
    {
        let (rep, secs) = (&r.report, r.report.load_secs.max(1e-9));
        let base = baseline(runs, r);
        let out = (rep.matched_tcp_bytes + rep.svm_skipped_bytes).max(1) as f64;
        println!(
            "  {}: PVM {:.2} + SVM {:.2} + proxy and client {:.2} CPUs busy over the load, \
             of {cpus} (unprotected: {}); {:.1}% of the PVM's output waited for a checkpoint \
             (up to {} ms) because the SVM had not produced it",
            r.name(args.rounds),
            rep.cpu_primary_load_s / secs,
            rep.cpu_secondary_load_s / secs,
            rep.cpu_pair_load_s / secs,
            base.map_or_else(
                || "-".into(),
                |b| {
                    let s = b.load_secs.max(1e-9);
                    format!(
                        "the VM {:.2} + proxy and client {:.2}",
                        b.cpu_primary_load_s / s,
                        b.cpu_pair_load_s / s
                    )
                }
            ),
            rep.svm_skipped_bytes as f64 / out * 100.0,
            args.checkpoint_delay.as_millis()
        );
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::colo::PairReport;

    fn periodic(rate_mib: u64, replies: u64, vcpu: f64, faults: f64) -> Run {
        Run {
            round: 1,
            kind: Kind::Protected(Mode::Periodic),
            rate_mib,
            report: PairReport {
                replies,
                load_secs: 10.0,
                vcpu_primary_load_s: vcpu,
                vcpu_primary_faults_per_s: Some(faults),
                vcpu_primary_exits_per_s: Some(faults * 2.0),
                ..PairReport::default()
            },
        }
    }

    #[test]
    fn a_fault_costs_the_slope_of_cpu_over_faults_per_reply() {
        // 10 000 replies each: 100 and 300 us of vCPU per reply; 1 and 5 faults per reply.
        let runs = [
            periodic(0, 10_000, 1.0, 1_000.0),
            periodic(100, 10_000, 3.0, 5_000.0),
        ];
        let text = exit_figures(&runs, &runs[1]);
        assert!(text.contains("page faults 5.0k/s, exits 10.0k/s"), "{text}");
        // 200 us more over 4 more faults per reply: 50 us each.
        assert!(text.contains("50.0 us of vCPU CPU per fault"), "{text}");
        assert!(text.contains("against 0 MiB/s"), "{text}");
        // The lowest rate has nothing to compare with.
        assert!(!exit_figures(&runs, &runs[0]).contains("per fault"));
        // Without the kernel's counters, nothing is said.
        let mut bare = periodic(100, 1, 1.0, 1.0);
        bare.report.vcpu_primary_faults_per_s = None;
        assert_eq!(exit_figures(&runs, &bare), "");
    }
}
