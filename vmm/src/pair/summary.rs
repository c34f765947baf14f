//! The end of `colo pair`: every acknowledged write checked on the active side's disk, the
//! summary printed (and as JSON with `--json`), and the verdict.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use colo_netcmp::MetricsSnapshot;
use colo_netcmp::proxy::Proxy;

use super::child::VcpuTimes;
use super::client::ClientStats;
use super::disklog;
use super::shared::{Shared, lock};
use super::supervisor::Timeline;
use super::{PairArgs, flags};
use crate::colo::ColoError;
use crate::colo::metrics::Summary;

/// A silence of the client at least this long is listed in the failover timeline...
const LONG_SILENCE: std::time::Duration = std::time::Duration::from_millis(20);
/// ...up to this many.
const LONG_SILENCES_SHOWN: usize = 8;

/// The PVM's vCPU page faults and exits so far at a checkpoint, and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExitSnapshot {
    pub(super) faults: u64,
    pub(super) exits: u64,
    /// Milliseconds since the primary started.
    pub(super) at_ms: u64,
}

/// What the supervisor noted when the load ended, before it stopped the sides.
pub(super) struct Ending {
    /// Seconds of client load.
    pub(super) secs: f64,
    /// CPU seconds of the primary and of the secondary process.
    pub(super) cpu: (f64, f64),
    /// Their CPU seconds when the load started (after the initial sync).
    pub(super) cpu_at_start: (f64, f64),
    /// The primary's and the secondary's vCPU threads' CPU and run-queue seconds.
    pub(super) vcpu: (VcpuTimes, VcpuTimes),
    /// The same when the load started.
    pub(super) vcpu_at_start: (VcpuTimes, VcpuTimes),
    /// This process's CPU seconds (proxy, client, supervisor) when the load started and
    /// when it ended.
    pub(super) own_cpu: (f64, f64),
    /// The PVM's vCPU page faults and exits at the last checkpoint before the load and at
    /// the last before its end.
    pub(super) exits: (Option<ExitSnapshot>, Option<ExitSnapshot>),
    /// The side serving at the end: "primary", "secondary" or "none".
    pub(super) active: &'static str,
    /// The client's acknowledged value of every key it wrote.
    pub(super) acked: HashMap<u64, u64>,
}

/// A count per second between two checkpoints' snapshots, if both were reported and time
/// passed between them.
fn per_s(
    at: (Option<ExitSnapshot>, Option<ExitSnapshot>),
    count: fn(&ExitSnapshot) -> u64,
) -> Option<f64> {
    let (a, b) = (at.0?, at.1?);
    (b.at_ms > a.at_ms)
        .then(|| count(&b).saturating_sub(count(&a)) as f64 / ((b.at_ms - a.at_ms) as f64 / 1e3))
}

/// The run's figures, gathered once the proxy has stopped.
struct Figures {
    secs: f64,
    s: Summary,
    pm: MetricsSnapshot,
    failover: Option<Instant>,
    replies: u64,
    lost: u64,
    contradicted: u64,
    disk_keys: usize,
    disk_missing: usize,
}

/// Checks the disk, stops the proxy, prints the summary (and its JSON with `--json`).
///
/// # Errors
/// A client that saw lost or contradicted data (or a write missing from the disk), or
/// that got no reply at all.
pub(super) fn report(
    a: &PairArgs,
    dir: &Path,
    shared: &Shared,
    proxy: Proxy,
    stats: &ClientStats,
    t: &Timeline,
    end: &Ending,
) -> Result<(), ColoError> {
    // Every acknowledged write must be on the disk of the side that is active now.
    let failed_over = shared.failover_at.lock().is_ok_and(|f| f.is_some());
    let disk = if failed_over {
        flags::disk_of(a, dir, "secondary")
    } else {
        flags::disk_of(a, dir, "primary")
    };
    let (disk_keys, disk_missing) = if a.client_load() {
        check_disk(&disk, &end.acked, stats)
    } else {
        (0, 0)
    };
    if a.disk.is_some() && failed_over {
        eprintln!(
            "colo pair: the secondary took over; its disk {} is the current one",
            disk.display()
        );
    }
    let pm = proxy.metrics();
    let _ = proxy.shutdown();
    let f = Figures {
        secs: end.secs,
        s: lock(&shared.summary).clone(),
        pm,
        failover: *lock(&shared.failover_at),
        replies: stats.replies.load(Ordering::Relaxed),
        lost: stats.lost_acked.load(Ordering::Relaxed) + disk_missing as u64,
        contradicted: stats.contradictions.load(Ordering::Relaxed),
        disk_keys,
        disk_missing,
    };
    print_text(a, &f, stats, t);
    if a.json {
        println!("{}", json(a, &f, shared, stats, t, end));
    }
    if f.lost > 0 || f.contradicted > 0 {
        return Err(ColoError::DataLost {
            lost: f.lost,
            contradicted: f.contradicted,
        });
    }
    if a.client_load() {
        expect_replies(f.replies, shared)
    } else {
        Ok(())
    }
}

/// An error with the children's log if the client got no reply at all.
///
/// # Errors
/// `replies` is 0.
pub(super) fn expect_replies(replies: u64, shared: &Shared) -> Result<(), ColoError> {
    if replies == 0 {
        return Err(ColoError::NoReplies {
            log: shared.log_text(),
        });
    }
    Ok(())
}

/// Replays the guest's disk log in `disk` and counts the keys on it and the acknowledged
/// writes missing from it (each noted as an anomaly of the client's).
fn check_disk(disk: &Path, acked: &HashMap<u64, u64>, stats: &ClientStats) -> (usize, usize) {
    match std::fs::read(disk) {
        Ok(bytes) => {
            let log = disklog::replay(&bytes);
            // Values grow with every request, so a key's last value on disk must be the
            // acknowledged one or a later write (sent but not yet answered at the stop);
            // an older value or none means an acknowledged write was lost.
            let missing: Vec<String> = acked
                .iter()
                .filter(|(k, v)| {
                    log.get(&format!("k{k}"))
                        .and_then(|d| d.parse::<u64>().ok())
                        .is_none_or(|d| d < **v)
                })
                .map(|(k, v)| format!("k{k}={v}"))
                .collect();
            if !missing.is_empty() {
                stats
                    .anomalies
                    .lock()
                    .map(|mut a| {
                        a.push(format!(
                            "{} acknowledged SETs missing from {}: {:?}",
                            missing.len(),
                            disk.display(),
                            &missing[..missing.len().min(5)]
                        ))
                    })
                    .ok();
            }
            (log.len(), missing.len())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the disk image for the check");
            (0, 0)
        }
    }
}

/// The summary's lines on stdout.
fn print_text(a: &PairArgs, f: &Figures, stats: &ClientStats, t: &Timeline) {
    let (secs, replies, lost) = (f.secs, f.replies, f.lost);
    let contradicted = f.contradicted;
    println!("\ncolo pair summary ({secs:.1} s):");
    println!("  COLO: {}", f.s.text(secs));
    if !a.client_load() {
        let who = if a.tap.is_some() {
            "the tap's own clients"
        } else {
            "none"
        };
        println!(
            "  client: {who} (colo's client load runs only on the built-in guest without --tap)"
        );
    } else {
        println!(
            "  client: {replies} replies ({:.0}/s), {} acknowledged SETs, {lost} acknowledged writes lost, {contradicted} replies contradicted, longest wait {:.1} ms, {} connection(s)",
            replies as f64 / secs,
            stats.acked_sets.load(Ordering::Relaxed),
            stats.max_wait_us.load(Ordering::Relaxed) as f64 / 1e3,
            stats.connects.load(Ordering::Relaxed),
        );
    }
    if a.vcpus > 1 && a.client_load() {
        println!(
            "  vCPUs: {} each; worker counters {:?} at the end, {} VCPUS replies checked, {} with a counter that went back",
            a.vcpus,
            lock(&stats.vcpu_turns),
            stats.vcpu_checks.load(Ordering::Relaxed),
            stats.vcpu_regressions.load(Ordering::Relaxed),
        );
    }
    if f.pm.secondary_holds > 0 {
        println!(
            "  pacing: the proxy held the SVM {} times, when it ran more than {} ms ahead of the PVM",
            f.pm.secondary_holds,
            a.svm_lead.as_secs_f64() * 1e3
        );
    }
    if f.pm.secondary_discarded_bytes + f.pm.secondary_skipped_bytes > 0 {
        println!(
            "  at commits: {} bytes of SVM output thrown away (it ran ahead), {} bytes of PVM output the SVM skipped (it was behind); {} bytes compared",
            f.pm.secondary_discarded_bytes, f.pm.secondary_skipped_bytes, f.pm.matched_tcp_bytes
        );
    }
    if let Some(k) = t.killed_primary {
        let after = replies.saturating_sub(t.replies_at_kill);
        match f.failover {
            Some(fo) if a.client_load() => println!(
                "  failover: the secondary took over {:.0} ms after the primary was killed; the client got {after} replies after the kill on {} connection(s)",
                k.ms_to(fo),
                stats.connects.load(Ordering::Relaxed)
            ),
            Some(fo) => println!(
                "  failover: the secondary took over {:.0} ms after the primary was killed",
                k.ms_to(fo),
            ),
            None => println!("  failover: the secondary did NOT take over"),
        }
    }
}

/// Where the client's wait at the primary's death went, in milliseconds from that death
/// (the SIGKILL of `--kill-primary-after`, else the moment the supervisor saw the primary
/// process end), or `null` if the primary did not die while the load ran:
///
/// - `exit_seen_ms`: the supervisor saw the process end (its alive file went then);
/// - `lost_ms`: the secondary lost its link to the primary;
/// - `decided_ms`: its takeover check passed (the takeover event goes out);
/// - `switched_ms`: the proxy sends the client to the secondary;
/// - `resumed_ms`: the client's first reply after the switch, and `gap_ms` the silence
///   that reply ended (from the reply before it);
/// - `longest_silence_ms`: the client's longest silence that ended after the death (the
///   failover's, or a later stall of the secondary serving alone), and `max_wait_ms` the
///   longest wait for a reply that came after the death;
/// - `caught_wait_ms`: the longest wait of a request the failover caught: sent before
///   the proxy switched, answered after the death (later stalls of the secondary serving
///   alone are not in it);
/// - `long_silences`: the first few silences of at least 20 ms after the death, each as
///   `[ms when it ended, its length in ms]`.
fn failover_timeline(t: &Timeline, shared: &Shared, stats: &ClientStats) -> serde_json::Value {
    let seen = *lock(&shared.primary_exit_seen);
    let (cause, t0) = match (t.killed_primary, seen) {
        (Some(k), _) => ("kill", k),
        (None, Some(s)) => ("exit", s),
        (None, None) => return serde_json::Value::Null,
    };
    let round = |ms: f64| (ms * 1e3).round() / 1e3;
    let at = |i: Option<Instant>| i.map(|i| round(t0.ms_to(i)));
    let len = |(a, b): (Instant, Instant)| round((b - a).as_secs_f64() * 1e3);
    let takeover = *lock(&shared.takeover);
    let switched = shared.proxy_switched_at.get().copied();
    let silences = stats
        .failover_silences
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    // The silence the switch ended: the first one that ends after it.
    let across = switched.and_then(|w| silences.iter().copied().find(|s| s.1 >= w));
    let longest = silences.iter().copied().max_by_key(|(a, b)| *b - *a);
    let long: Vec<[f64; 2]> = silences
        .iter()
        .filter(|(a, b)| *b - *a >= LONG_SILENCE)
        .take(LONG_SILENCES_SHOWN)
        .map(|&(a, b)| [round(t0.ms_to(b)), len((a, b))])
        .collect();
    serde_json::json!({
        "cause": cause,
        "exit_seen_ms": at(seen.map(|s| s.at)),
        "lost_ms": takeover.map(|x| round(t0.ms_to_unix(x.lost_unix_us))),
        "decided_ms": takeover.map(|x| round(t0.ms_to_unix(x.decided_unix_us))),
        "switched_ms": at(switched),
        "resumed_ms": at(across.map(|s| s.1)),
        "gap_ms": across.map(len),
        "longest_silence_ms": longest.map(len),
        "long_silences": long,
        "max_wait_ms": stats.failover_max_wait_us.load(Ordering::Relaxed) as f64 / 1e3,
        "caught_wait_ms": stats.caught_max_wait_us.load(Ordering::Relaxed) as f64 / 1e3,
    })
}

/// The summary as one JSON object (`--json`).
fn json(
    a: &PairArgs,
    f: &Figures,
    shared: &Shared,
    stats: &ClientStats,
    t: &Timeline,
    end: &Ending,
) -> serde_json::Value {
    let (s, secs, replies) = (&f.s, f.secs, f.replies);
    let mut v = serde_json::json!({
        "secs": secs,
        "svm_holds": f.pm.secondary_holds,
        "epochs": s.epochs,
        "pause_p50_ms": s.pause(0.5).as_secs_f64() * 1e3,
        "pause_p99_ms": s.pause(0.99).as_secs_f64() * 1e3,
        "pause_max_ms": s.pause(1.0).as_secs_f64() * 1e3,
        "vcpus": a.vcpus,
        "vcpu_stop_p99_us": s.stop(0.99).as_micros() as u64,
        "vcpu_stop_max_us": s.stop(1.0).as_micros() as u64,
        "vcpu_turns": lock(&stats.vcpu_turns).clone(),
        "vcpu_turns_at_failover": t.vcpu_turns_at_failover,
        "vcpu_checks": stats.vcpu_checks.load(Ordering::Relaxed),
        "vcpu_regressions": stats.vcpu_regressions.load(Ordering::Relaxed),
        "longest_pause": lock(&shared.longest).clone(),
        "pauses_us": s.pauses_us,
        "pages": s.pages,
        "bytes": s.bytes,
        "client_rps": replies as f64 / secs,
        "cpu_primary_s": end.cpu.0,
        "cpu_secondary_s": end.cpu.1,
        "cpu_primary_load_s": end.cpu.0 - end.cpu_at_start.0,
        "cpu_secondary_load_s": end.cpu.1 - end.cpu_at_start.1,
        "replies": replies,
        "acked_sets": stats.acked_sets.load(Ordering::Relaxed),
        "lost_acked": f.lost,
        "contradictions": f.contradicted,
        "connects": stats.connects.load(Ordering::Relaxed),
        "failover": f.failover.is_some(),
        "replies_after_kill": t.killed_primary.map(|_| replies.saturating_sub(t.replies_at_kill)),
        "replies_after_failover": t.replies_at_failover.map(|r| replies.saturating_sub(r)),
        "fenced": shared.fenced.load(Ordering::SeqCst),
        "disk_keys": f.disk_keys,
        "reprotected": shared.reprotected.load(Ordering::SeqCst),
        "disk_missing": f.disk_missing,
        "aborted_pause_ms": shared.aborted_pause_us.load(Ordering::SeqCst) as f64 / 1e3,
        "max_wait_ms": stats.max_wait_us.load(Ordering::Relaxed) as f64 / 1e3,
        "failover_timeline": failover_timeline(t, shared, stats),
        "anomalies": stats.anomalies.lock().map(|a| a.clone()).unwrap_or_default(),
        "child_warnings": shared
            .log
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|x| x.contains(" WARN ") || x.contains(" ERROR ") || x.contains("error"))
                    .rev()
                    .take(12)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
        "active": end.active,
    });
    // A second object: one literal this long reaches serde_json's macro recursion limit.
    let pacing = serde_json::json!({
        "vcpu_primary_load_s": (end.vcpu.0 - end.vcpu_at_start.0).cpu_s,
        "vcpu_secondary_load_s": (end.vcpu.1 - end.vcpu_at_start.1).cpu_s,
        "vcpu_primary_wait_load_s": (end.vcpu.0 - end.vcpu_at_start.0).wait_s,
        "vcpu_primary_faults_per_s": per_s(end.exits, |c| c.faults),
        "vcpu_primary_exits_per_s": per_s(end.exits, |c| c.exits),
        "vcpu_secondary_wait_load_s": (end.vcpu.1 - end.vcpu_at_start.1).wait_s,
        "cpu_pair_load_s": end.own_cpu.1 - end.own_cpu.0,
        "svm_discarded_bytes": f.pm.secondary_discarded_bytes,
        "svm_skipped_bytes": f.pm.secondary_skipped_bytes,
        "matched_tcp_bytes": f.pm.matched_tcp_bytes,
    });
    if let (Some(o), serde_json::Value::Object(more)) = (v.as_object_mut(), pacing) {
        o.extend(more);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_two_snapshots_apart_in_time() {
        let at = |faults, exits, at_ms| {
            Some(ExitSnapshot {
                faults,
                exits,
                at_ms,
            })
        };
        let two = (at(1000, 10, 2000), at(4000, 510, 2500));
        assert_eq!(per_s(two, |c| c.faults), Some(6000.0));
        assert_eq!(per_s(two, |c| c.exits), Some(1000.0));
        assert_eq!(per_s((None, two.1), |c| c.faults), None);
        assert_eq!(per_s((at(1, 1, 2500), two.1), |c| c.faults), None);
    }
}
