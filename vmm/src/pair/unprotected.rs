//! `colo pair --unprotected`: the baseline, the primary's VM alone (`colo run` on a socket
//! backend) behind the proxy in primary-only mode, with the same client.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::child::spawn;
use super::client::ClientStats;
use super::shared::Shared;
use super::summary::expect_replies;
use super::{PairArgs, flags, start_client, start_proxy};
use crate::colo::ColoError;
use crate::interrupt::interrupted;

/// Runs the baseline in the scratch directory `dir`.
///
/// # Errors
/// The VM or the proxy cannot start, or the client got no reply at all.
pub(super) fn run(a: &PairArgs, dir: &Path) -> Result<(), ColoError> {
    let shared = Arc::new(Shared::default());
    let (proxy, clients) = start_proxy(a, dir, colo_netcmp::Config::default())?;
    proxy
        .control()
        .set_mode(colo_netcmp::Mode::PrimaryOnly)
        .map_err(ColoError::Proxy)?;
    let mut args = vec!["run".to_string()];
    args.extend(flags::vm_flags(a, dir, "primary"));
    eprintln!("colo pair --unprotected: the primary's VM alone, no checkpoints");
    let mut vm = spawn("vm", &args, &shared, a.verbose)?;
    let stats = Arc::new(ClientStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = start_client(a.pipeline, a.vcpus, clients, &stats, &stop);
    let start = Instant::now();
    let cpu_at_start = vm.cpu_secs();
    let vcpu_at_start = vm.vcpu_times();
    let own_at_start = super::child::own_cpu_secs();
    let limit = a.colo.duration.unwrap_or(Duration::from_secs(3600));
    while start.elapsed() < limit && !interrupted() && vm.alive() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = vm.cpu_secs();
    let vcpu = vm.vcpu_times();
    let own = super::child::own_cpu_secs() - own_at_start;
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    client.finish();
    vm.stop(Duration::from_secs(5));
    let _ = proxy.shutdown();
    let replies = stats.replies.load(Ordering::Relaxed);
    println!(
        "\ncolo pair --unprotected summary ({secs:.1} s): client {replies} replies ({:.0}/s); VM CPU {cpu:.2} s",
        replies as f64 / secs
    );
    if a.json {
        let j = serde_json::json!({
            "secs": secs,
            "replies": replies,
            "client_rps": replies as f64 / secs,
            "cpu_primary_s": cpu,
            "cpu_primary_load_s": cpu - cpu_at_start,
            "vcpu_primary_load_s": (vcpu - vcpu_at_start).cpu_s,
            "vcpu_primary_wait_load_s": (vcpu - vcpu_at_start).wait_s,
            "cpu_pair_load_s": own,
            "vcpus": a.vcpus,
            "lost_acked": stats.lost_acked.load(Ordering::Relaxed),
            "contradictions": stats.contradictions.load(Ordering::Relaxed),
        });
        println!("{j}");
    }
    if a.client_load() {
        expect_replies(replies, &shared)
    } else {
        Ok(())
    }
}
