//! `colo pair` with both sides: the supervisor's steps, from starting the children to the
//! summary.
//!
//! 1. [`Supervisor::start`]: the proxy is up; start the secondary and the primary, and
//!    connect the primary's event socket.
//! 2. [`Supervisor::wait_initial_sync`]: the first commit.
//! 3. The client load starts; [`Supervisor::watch`] runs until `--duration`: it kills sides
//!    when asked to, starts a new secondary (re-protection), switches the proxy on failover
//!    or when the secondary is lost, and shows the status line.
//! 4. [`Supervisor::stop`]: the client and both sides stop; [`summary::report`] checks the
//!    disk and prints the summary.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use colo_netcmp::proxy::Proxy;

use super::child::{ExitWatch, Kid, VcpuTimes, spawn, spawn_with};
use super::client::ClientStats;
use super::shared::{Moment, Shared, lock};
use super::status::StatusLine;
use super::summary::{self, Ending};
use super::{Client, PairArgs, events, flags, start_client, start_proxy};
use crate::colo::ColoError;
use crate::colo::metrics_http::{ProxyEndpoint, port_after};
use crate::interrupt::interrupted;

/// Runs a protected pair in the scratch directory `dir`.
///
/// # Errors
/// A side that cannot start, no initial sync, a proxy that cannot switch modes, or a
/// client that saw lost or contradicted data.
pub(super) fn run(a: &PairArgs, dir: &Path) -> Result<(), ColoError> {
    flags::metrics_addrs_fit(a)?;
    let proxy_metrics = ProxyEndpoint::serve(
        a.colo
            .metrics_listen
            .as_deref()
            .and_then(|m| port_after(m, 2))
            .as_deref(),
    )?;
    let stats = Arc::new(ClientStats::default());
    let shared = Arc::new(Shared {
        proxy_switched_at: Arc::clone(&stats.switched),
        ..Shared::default()
    });
    if let Some(path) = &a.metrics {
        let f = crate::colo::metrics::open_stream(path)?;
        *lock(&shared.metrics) = Some(f);
    }
    // The primary marks each commit in its own output stream (--commit-marker): the proxy
    // releases the epoch's output in order with the PVM's frames, without a round trip.
    let config = colo_netcmp::Config {
        commit_marker: true,
        secondary_lead: (!a.svm_lead.is_zero()).then_some(a.svm_lead),
        ..colo_netcmp::Config::default()
    };
    let (proxy, clients) = start_proxy(a, dir, config)?;
    proxy_metrics.attach(proxy.control());
    if a.colo.mode == crate::colo::Mode::Periodic {
        // The SVM does not run: output is held until the checkpoint that covers it.
        proxy
            .control()
            .set_mode(colo_netcmp::Mode::Periodic)
            .map_err(ColoError::Proxy)?;
    }
    let mut sup = Supervisor::start(a, dir, shared, proxy, &stats)?;
    sup.wait_initial_sync()?;
    let stop = Arc::new(AtomicBool::new(false));
    // CPU from here on is the load's (the start-up and the initial sync are not).
    let cpu_at_start = (sup.primary.cpu_secs(), sup.secondary.cpu_secs());
    let vcpu_at_start = (sup.primary.vcpu_times(), sup.secondary.vcpu_times());
    let own_at_start = super::child::own_cpu_secs();
    let exits_at_start = last_exits(&sup.shared);
    let client = start_client(a.pipeline, a.vcpus, clients, &stats, &stop);
    let start = Instant::now();
    let timeline = sup.watch(start, &stats)?;
    let mut ending = sup.stop(start, &timeline, &stop, client);
    ending.cpu_at_start = cpu_at_start;
    ending.vcpu_at_start = vcpu_at_start;
    ending.own_cpu.0 = own_at_start;
    ending.exits.0 = exits_at_start;
    let Supervisor { shared, proxy, .. } = sup;
    proxy_metrics.stop();
    summary::report(a, dir, &shared, proxy, &stats, &timeline, &ending)
}

/// The PVM's vCPU page faults and exits at the last committed checkpoint, with when it
/// was taken, if the primary reports them.
fn last_exits(shared: &Shared) -> Option<super::summary::ExitSnapshot> {
    let last = lock(&shared.last);
    let r = last.as_ref()?;
    Some(super::summary::ExitSnapshot {
        faults: r.vcpu_faults?,
        exits: r.vcpu_exits?,
        at_ms: r.at_ms?,
    })
}

/// The primary process has ended: noted (the first time) with the moment, the client
/// watches its failover gap, and the alive file goes, so the secondary may take over.
fn primary_gone(shared: &Shared, stats: &ClientStats, alive: &Path) {
    lock(&shared.primary_exit_seen).get_or_insert_with(Moment::now);
    stats.watch_failover.store(true, Ordering::SeqCst);
    let _ = std::fs::remove_file(alive);
}

/// What happened to the sides while the load ran, for the status line and the summary.
#[derive(Debug, Default)]
pub(super) struct Timeline {
    /// When the primary was killed (`--kill-primary-after`).
    pub(super) killed_primary: Option<Moment>,
    /// The client's replies by then.
    pub(super) replies_at_kill: u64,
    /// The client's replies when the supervisor saw the failover.
    pub(super) replies_at_failover: Option<u64>,
    /// The worker vCPUs' counters the client had seen by then (`VCPUS`).
    pub(super) vcpu_turns_at_failover: Option<Vec<u64>>,
    /// When the secondary was killed (`--kill-secondary-after`).
    killed_secondary: Option<Instant>,
    /// Whether a new secondary was started since (`--reprotect`).
    respawned: bool,
    /// Whether the secondary took over and the proxy now sends the client to it.
    pub(super) failover_done: bool,
}

/// The two sides and the proxy between them and the client.
pub(super) struct Supervisor<'a> {
    a: &'a PairArgs,
    /// Removes `alive` the moment the primary process ends (until dropped or disarmed).
    /// First, so that it is disarmed before the sides are killed when dropped.
    exit_watch: Option<ExitWatch>,
    // The sides go first when dropped (killed), then the proxy.
    primary: Kid,
    secondary: Kid,
    proxy: Proxy,
    shared: Arc<Shared>,
    /// The secondary's command line, for a new one (re-protection).
    sec_args: Vec<String>,
    /// Exists while the primary process runs: the secondary takes over only once it is
    /// gone (split-brain prevention).
    alive: PathBuf,
}

impl<'a> Supervisor<'a> {
    /// Starts the secondary and the primary (on loopback, with their network on the
    /// proxy's sockets in `dir`) and connects their event sockets.
    ///
    /// # Errors
    /// A socket or file in `dir`, a child that does not start, or a primary that does not
    /// connect its event socket.
    pub(super) fn start(
        a: &'a PairArgs,
        dir: &Path,
        shared: Arc<Shared>,
        proxy: Proxy,
        stats: &Arc<ClientStats>,
    ) -> Result<Self, ColoError> {
        let events_path: PathBuf = dir.join("events.sock");
        let events = UnixListener::bind(&events_path)
            .map_err(ColoError::file("bind the event socket", &events_path))?;
        let sec_events_path: PathBuf = dir.join("secondary-events.sock");
        let sec_events = UnixListener::bind(&sec_events_path)
            .map_err(ColoError::file("bind the event socket", &sec_events_path))?;
        events::serve_secondaries(sec_events, &proxy, &shared);
        let port = flags::free_port()?;
        // Split-brain prevention: the secondary takes over only once the supervisor has
        // seen the primary process gone (this file is removed then).
        let alive = dir.join("primary.alive");
        std::fs::write(&alive, b"").map_err(ColoError::file("write", &alive))?;
        flags::copy_disk(a, dir)?;
        let key = flags::pair_key(a, dir)?;
        let mut sec_args = flags::secondary_args(a, dir, port, &alive, &sec_events_path);
        let mut pri_args = flags::primary_args(a, dir, port, &events_path);
        sec_args.extend(key.iter().cloned());
        pri_args.extend(key);
        eprintln!(
            "colo pair: starting the secondary and the primary (scratch in {})",
            dir.display()
        );
        let mut secondary = spawn("secondary", &sec_args, &shared, a.verbose)?;
        let mut primary = spawn_with("primary", &pri_args, &shared, a.verbose, true)?;
        let exit_watch = {
            let (shared, stats, alive) = (Arc::clone(&shared), Arc::clone(stats), alive.clone());
            primary.watch_exit(move || primary_gone(&shared, &stats, &alive))
        };
        events::connect(&events, &mut primary, &mut secondary, &proxy, &shared)?;
        Ok(Self {
            a,
            primary,
            secondary,
            proxy,
            shared,
            sec_args,
            alive,
            exit_watch,
        })
    }

    /// Waits (at most 60 s) for the initial sync, before the load starts.
    ///
    /// # Errors
    /// No commit in time, a primary that died, or one that lost its secondary during the
    /// sync (it serves unprotected: nothing to show here).
    pub(super) fn wait_initial_sync(&mut self) -> Result<(), ColoError> {
        let t1 = Instant::now();
        while self.shared.commits.load(Ordering::Relaxed) == 0 {
            let lost = *lock(&self.shared.secondary_lost);
            if lost || !self.primary.alive() || t1.elapsed() > Duration::from_secs(60) {
                return Err(ColoError::NoInitialSync {
                    log: self.shared.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "colo pair: initial sync done in {} ms; {}",
            t1.elapsed().as_millis(),
            if self.a.client_load() {
                "client load starts"
            } else {
                "the guest is protected"
            }
        );
        Ok(())
    }

    /// Runs the load until `--duration`, Ctrl-C, or both sides gone: every 20 ms the
    /// faults asked for, the sides' state, and once a second the status line.
    ///
    /// # Errors
    /// A new secondary that cannot start, or a proxy that cannot switch to the secondary.
    pub(super) fn watch(
        &mut self,
        start: Instant,
        stats: &ClientStats,
    ) -> Result<Timeline, ColoError> {
        let mut t = Timeline::default();
        let mut status = StatusLine::new();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let el = start.elapsed();
            if interrupted() || self.a.colo.duration.is_some_and(|d| el >= d) {
                break;
            }
            self.inject_faults(el, &mut t, stats)?;
            self.follow_sides(&mut t, stats)?;
            if self.both_gone() {
                break;
            }
            status.tick(el, &self.shared, &self.proxy, stats, t.failover_done);
        }
        Ok(t)
    }

    /// `--kill-primary-after`, `--kill-secondary-after` and `--reprotect`, when due.
    fn inject_faults(
        &mut self,
        el: Duration,
        t: &mut Timeline,
        stats: &ClientStats,
    ) -> Result<(), ColoError> {
        let a = self.a;
        if t.killed_primary.is_none() && a.kill_primary_after.is_some_and(|k| el >= k) {
            eprintln!(
                "\ncolo pair: killing the primary (SIGKILL) at {:.1} s",
                el.as_secs_f64()
            );
            stats.watch_failover.store(true, Ordering::SeqCst);
            t.killed_primary = Some(Moment::now());
            self.primary.kill();
            t.replies_at_kill = stats.replies.load(Ordering::Relaxed);
        }
        if a.kill_secondary_after.is_some_and(|k| el >= k)
            && self.secondary.alive()
            && t.killed_secondary.is_none()
        {
            eprintln!(
                "\ncolo pair: killing the secondary (SIGKILL) at {:.1} s",
                el.as_secs_f64()
            );
            self.secondary.kill();
            t.killed_secondary = Some(Instant::now());
        }
        if a.reprotect
            && !t.respawned
            && t.killed_secondary
                .is_some_and(|k| k.elapsed() >= Duration::from_secs(1))
        {
            eprintln!("\ncolo pair: starting a new secondary (re-protection)");
            self.secondary = spawn("secondary", &self.sec_args, &self.shared, a.verbose)?;
            t.respawned = true;
        }
        Ok(())
    }

    /// Follows the sides: the primary gone (its alive file removed), the secondary taking
    /// over (the client goes to it), or the secondary lost (the primary alone).
    fn follow_sides(&mut self, t: &mut Timeline, stats: &ClientStats) -> Result<(), ColoError> {
        if !self.primary.alive() && self.alive.exists() {
            // Without a pidfd (or before its thread ran): the poll sees it.
            primary_gone(&self.shared, stats, &self.alive);
        }
        let failover = *lock(&self.shared.failover_at);
        if !t.failover_done && failover.is_some() {
            t.failover_done = true;
            t.replies_at_failover = Some(stats.replies.load(Ordering::Relaxed));
            t.vcpu_turns_at_failover = Some(lock(&stats.vcpu_turns).clone());
            // The event thread switched it already (see `events::took_over`); again here
            // (a no-op then) so that a switch that failed there fails the run.
            self.proxy
                .control()
                .set_mode(colo_netcmp::Mode::SecondaryOnly)
                .map_err(ColoError::Proxy)?;
            eprintln!("\ncolo pair: failover: the secondary took over; the client now talks to it");
        }
        if failover.is_none() && self.primary.alive() {
            // Decided and applied under the lock: see `Shared::secondary_lost`. A takeover
            // is applied under it too, so it is read again here.
            let lost = lock(&self.shared.secondary_lost);
            let took_over = lock(&self.shared.failover_at).is_some();
            if !took_over && (*lost || !self.secondary.alive()) {
                let _ = self
                    .proxy
                    .control()
                    .set_mode(colo_netcmp::Mode::PrimaryOnly);
            }
        }
        Ok(())
    }

    /// Whether both sides are gone; if so, says so with the last warnings of their logs.
    fn both_gone(&mut self) -> bool {
        if self.primary.alive() || self.secondary.alive() {
            return false;
        }
        eprintln!("\ncolo pair: both sides are gone");
        let log = lock(&self.shared.log);
        let tail: Vec<&String> = log
            .iter()
            .filter(|l| !l.contains("] ") || l.contains("ERROR") || l.contains("WARN"))
            .rev()
            .take(25)
            .collect();
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
        true
    }

    /// Ends the run: notes the figures of its end, stops the client and then both sides.
    pub(super) fn stop(
        &mut self,
        start: Instant,
        t: &Timeline,
        stop: &AtomicBool,
        client: Client,
    ) -> Ending {
        let secs = start.elapsed().as_secs_f64();
        let cpu = (self.primary.cpu_secs(), self.secondary.cpu_secs());
        let vcpu = (self.primary.vcpu_times(), self.secondary.vcpu_times());
        let own = super::child::own_cpu_secs();
        let exits = last_exits(&self.shared);
        let active = match (self.primary.alive(), t.failover_done) {
            (_, true) => "secondary",
            (true, false) => "primary",
            (false, false) => "none",
        };
        stop.store(true, Ordering::SeqCst);
        // The primary's end from here on is the orderly stop, not a death to act on.
        drop(self.exit_watch.take());
        let acked = client.finish();
        self.primary.stop(Duration::from_secs(5));
        self.secondary.stop(Duration::from_secs(5));
        Ending {
            secs,
            cpu,
            cpu_at_start: (0.0, 0.0),
            vcpu,
            vcpu_at_start: (VcpuTimes::default(), VcpuTimes::default()),
            own_cpu: (0.0, own),
            exits: (None, exits),
            active,
            acked,
        }
    }
}
