//! The primary's event socket (`--events`): its commits, metrics, exit and re-protection
//! come in as lines; the proxy's checkpoint requests go out as `CHECKPOINT` lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use colo_netcmp::proxy::{Proxy, ProxyControl};

use super::child::Kid;
use super::setup;
use super::shared::{Shared, lock};
use crate::colo::ColoError;
use crate::colo::metrics::{EpochRecord, Trigger};

/// Waits (at most 60 s, while both sides run) for the primary to connect its event socket;
/// then reads its events on a thread and forwards the proxy's checkpoint requests to it.
///
/// # Errors
/// The primary did not connect (the error holds the children's log), or a socket call
/// failed.
pub(super) fn connect(
    events: &UnixListener,
    primary: &mut Kid,
    secondary: &mut Kid,
    proxy: &Proxy,
    shared: &Arc<Shared>,
) -> Result<(), ColoError> {
    events
        .set_nonblocking(true)
        .map_err(|e| setup(e.to_string()))?;
    let t0 = Instant::now();
    let ev = loop {
        match events.accept() {
            Ok((s, _)) => break s,
            Err(_)
                if t0.elapsed() < Duration::from_secs(60)
                    && primary.alive()
                    && secondary.alive() =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => {
                return Err(setup(format!(
                    "the primary did not connect its event socket:\n{}",
                    shared.log_text()
                )));
            }
        }
    };
    ev.set_nonblocking(false)
        .map_err(|e| setup(e.to_string()))?;
    let requests_to = ev.try_clone().map_err(|e| setup(e.to_string()))?;
    {
        let (ctl, s) = (proxy.control(), Arc::clone(shared));
        std::thread::spawn(move || serve(ev, ctl, &s));
    }
    {
        let reqs = proxy.checkpoint_requests().clone();
        std::thread::spawn(move || forward_checkpoint_requests(&reqs, requests_to));
    }
    Ok(())
}

/// Writes a `CHECKPOINT` line to the primary for every checkpoint request of the proxy (a
/// mismatch), until the proxy stops or the primary is gone.
fn forward_checkpoint_requests(
    reqs: &crossbeam_channel::Receiver<colo_netcmp::CheckpointRequest>,
    mut to: UnixStream,
) {
    while let Ok(r) = reqs.recv() {
        tracing::debug!(%r, "proxy asks for a checkpoint");
        if to.write_all(b"CHECKPOINT\n").is_err() {
            return;
        }
    }
}

/// Handles the primary's event lines: commits (counted; the proxy learns of them from the
/// primary's own commit markers), metrics, its exit, and re-protection.
fn serve(s: UnixStream, proxy: ProxyControl, shared: &Shared) {
    for line in BufReader::new(s).lines().map_while(std::result::Result::ok) {
        if line.starts_with("COMMIT ") {
            // The primary marked the commit in its network output (--commit-marker): the
            // proxy acts on it in order with the PVM's frames. Only counted here.
            shared.commits.fetch_add(1, Ordering::Relaxed);
        } else if let Some(j) = line.strip_prefix("METRIC ") {
            metric(j, shared);
        } else if let Some(us) = line.strip_prefix("ABORTED_PAUSE_US ") {
            if let Ok(us) = us.trim().parse() {
                shared.aborted_pause_us.fetch_max(us, Ordering::SeqCst);
            }
        } else if line.starts_with("EXIT ") {
            *lock(&shared.secondary_lost) = true;
        } else if line == "PROTECTED" {
            // A new secondary joined: compare again from its first checkpoint on.
            let mut lost = lock(&shared.secondary_lost);
            if let Err(e) = proxy.set_mode(colo_netcmp::Mode::Compare) {
                tracing::warn!(error = %e, "proxy did not switch back to compare");
            }
            *lost = false;
            drop(lost);
            shared.reprotected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// One checkpoint's record (JSON): appended to the metrics file, added to the summary,
/// kept as the last and maybe the longest pause.
fn metric(j: &str, shared: &Shared) {
    let mut file = lock(&shared.metrics);
    if let Some(f) = file.as_mut() {
        if writeln!(f, "{j}").is_err() {
            tracing::warn!("cannot write the metrics file; stopping it");
            *file = None;
        }
    }
    drop(file);
    if let Ok(r) = serde_json::from_str::<EpochRecord>(j) {
        lock(&shared.summary).add(&r);
        if !matches!(r.trigger, Trigger::InitialSync | Trigger::Resync) {
            let mut l = lock(&shared.longest);
            if l.as_ref().is_none_or(|l| r.pause_us > l.pause_us) {
                *l = Some(r.clone());
            }
        }
        *lock(&shared.last) = Some(r);
    }
}
