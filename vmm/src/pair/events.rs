//! The sides' event sockets (`--events`): the primary's checkpoints, aborted pauses,
//! failover (it lost its secondary) and re-protection, and the secondary's takeover or
//! fencing, come in as typed JSON lines (`crate::colo::event`); the proxy's checkpoint
//! requests go out to the primary as typed lines too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use colo_netcmp::proxy::{Proxy, ProxyControl};

use super::child::Kid;
use super::shared::{Shared, lock};
use crate::colo::ColoError;
use crate::colo::event::{self, Event, Request, Side, TakeoverTiming};
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
        .map_err(ColoError::io("make the event socket non-blocking"))?;
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
                return Err(ColoError::NoEvents {
                    log: shared.log_text(),
                });
            }
        }
    };
    ev.set_nonblocking(false)
        .map_err(ColoError::io("make the event socket blocking"))?;
    let requests_to = ev
        .try_clone()
        .map_err(ColoError::io("clone the event socket"))?;
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

/// Serves the secondaries' event sockets on `events`: the first secondary's and, after
/// re-protection, each new one's, each on its own thread.
pub(super) fn serve_secondaries(events: UnixListener, proxy: &Proxy, shared: &Arc<Shared>) {
    let (ctl, shared) = (proxy.control(), Arc::clone(shared));
    std::thread::spawn(move || {
        for s in events.incoming().map_while(std::result::Result::ok) {
            let (ctl, shared) = (ctl.clone(), Arc::clone(&shared));
            std::thread::spawn(move || serve(s, ctl, &shared));
        }
    });
}

/// Asks the primary for a checkpoint for every checkpoint request of the proxy (a
/// mismatch), until the proxy stops or the primary is gone.
fn forward_checkpoint_requests(
    reqs: &crossbeam_channel::Receiver<colo_netcmp::CheckpointRequest>,
    mut to: UnixStream,
) {
    let line = event::encode(&Request::Checkpoint);
    while let Ok(r) = reqs.recv() {
        tracing::debug!(%r, "proxy asks for a checkpoint");
        if to.write_all(&line).is_err() {
            return;
        }
    }
}

/// Handles a side's events: checkpoints (counted; the proxy learns of the commits from
/// the primary's own commit markers), aborted pauses, failover of either side, fencing,
/// and re-protection.
fn serve(s: UnixStream, proxy: ProxyControl, shared: &Shared) {
    for line in BufReader::new(s).lines().map_while(std::result::Result::ok) {
        let ev = match event::decode::<Event>(&line) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, line, "not an event; ignored");
                continue;
            }
        };
        match ev {
            Event::Checkpoint(r) => {
                // The primary marked the commit in its network output (--commit-marker):
                // the proxy acts on it in order with the PVM's frames. Only counted here.
                shared.commits.fetch_add(1, Ordering::Relaxed);
                checkpoint(r, shared);
            }
            Event::AbortedPause { pause_us } => {
                shared
                    .aborted_pause_us
                    .fetch_max(pause_us, Ordering::SeqCst);
            }
            Event::Failover {
                side: Side::Primary,
                ..
            } => *lock(&shared.secondary_lost) = true,
            Event::Failover {
                side: Side::Secondary,
                timing,
                ..
            } => took_over(timing, &proxy, shared),
            Event::Fenced { .. } => shared.fenced.store(true, Ordering::SeqCst),
            Event::Protected => {
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
}

/// The secondary took over: the client goes to it at once (every millisecond here is one
/// the client waits). Under the `secondary_lost` lock, so that the supervisor's
/// "secondary gone: primary only" cannot come between (see `Shared::secondary_lost`).
fn took_over(timing: Option<TakeoverTiming>, proxy: &ProxyControl, shared: &Shared) {
    let _lost = lock(&shared.secondary_lost);
    if lock(&shared.failover_at).is_some() {
        return;
    }
    *lock(&shared.failover_at) = Some(Instant::now());
    *lock(&shared.takeover) = timing;
    match proxy.set_mode(colo_netcmp::Mode::SecondaryOnly) {
        Ok(()) => {
            let _ = shared.proxy_switched_at.set(Instant::now());
        }
        // The supervisor tries again on its next round and fails the run if it cannot.
        Err(e) => tracing::warn!(error = %e, "proxy did not switch to the secondary"),
    }
}

/// One checkpoint's record: appended to the metrics file (as JSON), added to the summary,
/// kept as the last and maybe the longest pause.
fn checkpoint(r: EpochRecord, shared: &Shared) {
    let mut file = lock(&shared.metrics);
    if let Some(f) = file.as_mut() {
        if f.write_all(&event::encode(&r)).is_err() {
            tracing::warn!("cannot write the metrics file; stopping it");
            *file = None;
        }
    }
    drop(file);
    lock(&shared.summary).add(&r);
    if !matches!(r.trigger, Trigger::InitialSync | Trigger::Resync) {
        let mut l = lock(&shared.longest);
        if l.as_ref().is_none_or(|l| r.pause_us > l.pause_us) {
            *l = Some(r.clone());
        }
    }
    *lock(&shared.last) = Some(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colo::event::ExitReason;
    use crate::colo::link::LostReason;

    #[test]
    fn the_supervisor_acts_on_typed_events_and_skips_other_lines() {
        let (client, _c) = colo_netcmp::io::channel::port("client", 16);
        let (primary, _p) = colo_netcmp::io::channel::port("primary", 16);
        let (secondary, _s) = colo_netcmp::io::channel::port("secondary", 16);
        let ports = colo_netcmp::proxy::Ports {
            client,
            primary,
            secondary,
        };
        let proxy = Proxy::start(colo_netcmp::Config::default(), ports).unwrap();
        let shared = Shared::default();
        let feed = |lines: &[u8]| {
            let (mut side, sup) = UnixStream::pair().unwrap();
            side.write_all(lines).unwrap();
            drop(side);
            serve(sup, proxy.control(), &shared);
        };
        // Log lines that used to be acted on are only text now.
        feed(b"FENCED\nsecondary| FAILOVER: the secondary takes over\nCOMMIT 1\n");
        assert!(!shared.fenced.load(Ordering::SeqCst));
        assert!(lock(&shared.failover_at).is_none());
        assert_eq!(shared.commits.load(Ordering::Relaxed), 0);

        let lost = || ExitReason::PeerLost {
            lost: LostReason::Closed,
        };
        let rec: EpochRecord = serde_json::from_value(serde_json::json!({
            "epoch": 2, "trigger": "timer", "pause_us": 800, "pause_pages": 1,
            "background_pages": 9, "bytes": 40960, "state_bytes": 100
        }))
        .unwrap();
        let mut lines = Vec::new();
        for ev in [
            Event::Checkpoint(rec),
            Event::AbortedPause { pause_us: 5000 },
            Event::AbortedPause { pause_us: 300 },
            Event::Fenced { reason: lost() },
            Event::Failover {
                side: Side::Primary,
                reason: lost(),
                timing: None,
            },
        ] {
            lines.extend(event::encode(&ev));
        }
        feed(&lines);
        assert_eq!(shared.commits.load(Ordering::Relaxed), 1);
        assert_eq!(lock(&shared.summary).epochs, 1);
        assert_eq!(lock(&shared.last).as_ref().map(|r| r.pause_us), Some(800));
        assert_eq!(shared.aborted_pause_us.load(Ordering::SeqCst), 5000);
        assert!(shared.fenced.load(Ordering::SeqCst));
        assert!(
            *lock(&shared.secondary_lost),
            "the primary lost its secondary"
        );
        assert!(lock(&shared.failover_at).is_none(), "no takeover yet");

        let took_over = Event::Failover {
            side: Side::Secondary,
            reason: lost(),
            timing: Some(TakeoverTiming {
                lost_unix_us: 1,
                decided_unix_us: 2,
            }),
        };
        feed(&[event::encode(&took_over), event::encode(&Event::Protected)].concat());
        assert!(
            lock(&shared.failover_at).is_some(),
            "the secondary took over"
        );
        assert!(
            shared.proxy_switched_at.get().is_some(),
            "the event itself switched the proxy to the secondary"
        );
        assert_eq!(lock(&shared.takeover).map(|t| t.decided_unix_us), Some(2));
        assert!(!*lock(&shared.secondary_lost), "protected again");
        assert_eq!(shared.reprotected.load(Ordering::SeqCst), 1);
        proxy.shutdown().unwrap();
    }
}
