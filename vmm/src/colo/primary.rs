//! The primary: runs the PVM and checkpoints it into the secondary.
//!
//! Between checkpoints a background push sends newly dirtied pages every
//! `push_interval`, so that at the pause only the pages dirtied since the last background
//! round are left. A checkpoint:
//!
//! 1. `CheckpointRequest(k)` (k: the push epoch that will close it), wait for the reply
//!    (the SVM is paused);
//! 2. pause the PVM, collect the last dirty pages, push them and commit push epoch k;
//! 3. save the device and vCPU state and send it (`VmstateSend`, `VmstateSize`);
//! 4. wait for `VmstateReceived`: the secondary holds the whole epoch;
//! 5. resume the PVM and release the output held for this epoch.
//!
//! If the secondary is lost at any point the primary leaves COLO and keeps serving.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_machine::memory::PAGE_SIZE;
use colo_machine::runner::VmHandle;
use colo_machine::{DirtyHandle, GuestExit, HotPolicy};
use colo_memory::PageBitmap;
use colo_memory::Region;
use colo_transport::control::{ControlChannel, Hello, Kind, MemRegion, Message, Role};
use colo_transport::push::{PushSender, WriteRun, push_epoch, start_epoch};

use super::event::{Event, Events, ExitReason, Request, Side};
use super::link::{Link, LostReason, MessageId};
use super::metrics::{EpochRecord, Summary, Trigger};
use super::progress::Progress;
use super::qmp::ColoExitReason;
use super::{Chain, ColoError, Params, Result, STEP_TIMEOUT};

/// A background collection with fewer dirty pages than this counts as idle: the next
/// one waits twice as long (see `Primary::epoch_wait`).
const IDLE_PUSH_PAGES: u64 = 64;

/// Where the secondary is and how to reach it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its control address (host:port).
    pub addr: String,
    /// The pair id both sides must agree on.
    pub pair_id: u64,
    /// The page-push transport.
    pub transport: super::push::PushTransport,
    /// The VM's vCPU count, which the secondary's must match.
    pub vcpus: u32,
    /// What every connection to the secondary authenticates with.
    pub creds: colo_auth::Credentials,
}

/// How the pause began: until every vCPU parked (and each one's stop time), then reading
/// the dirty log.
#[derive(Debug, Clone, Default)]
struct PauseStart {
    park: Duration,
    vcpu_stops: Vec<Duration>,
    collect: Duration,
}

/// The primary's state.
pub struct Primary {
    peer: Peer,
    ram: Arc<Region>,
    vm: VmHandle,
    dirty: DirtyHandle,
    push: Option<Box<dyn PushSender>>,
    link: Option<Link>,
    params: Params,
    bitmap: PageBitmap,
    /// Pages pushed in the background since the last checkpoint.
    bg_pages: u64,
    bg_bytes: u64,
    epoch: u64,
    /// When this primary was made: checkpoint records carry their time from here.
    started: Instant,
    /// The summary of every checkpoint.
    pub summary: Summary,
    events: Events,
    awaiting_loaded: Option<u64>,
    /// The QMP socket's state, if one is served.
    pub qmp: Option<super::qmp::Shared>,
    /// The replicated disk, if the disk is replicated.
    pub disk: Option<Arc<colo_blk::PrimaryDisk>>,
    /// Whether a new secondary may join after this one is lost.
    pub reprotect: bool,
    /// Commits reach the proxy as a marker in the PVM's network output (`--commit-marker`)
    /// instead of through the supervisor's round trip.
    pub commit_marker: bool,
    /// A JSON-lines stream of every checkpoint's record (`--metrics`).
    pub metrics: Option<std::fs::File>,
    /// A checkpoint is forced when the secondary's disk buffer holds this many bytes.
    pub disk_threshold: u64,
}

impl Primary {
    /// A primary with no secondary yet, around a VM that runs (a secondary that took over)
    /// or is about to (`colo primary --reprotect` started before its secondary): it serves
    /// unprotected, and with [`reprotect`](Self::reprotect) takes a secondary at `peer`
    /// once one listens there.
    pub fn serving(
        vm: VmHandle,
        ram: Arc<Region>,
        dirty: DirtyHandle,
        peer: &Peer,
        params: Params,
        events: Events,
    ) -> Primary {
        let pages = ram.len() as u64 / PAGE_SIZE;
        keep_hot(&dirty, &params);
        Primary {
            peer: peer.clone(),
            ram,
            vm,
            dirty,
            push: None,
            link: None,
            params,
            bitmap: PageBitmap::new(pages),
            bg_pages: 0,
            bg_bytes: 0,
            epoch: 0,
            started: Instant::now(),
            summary: Summary::default(),
            events,
            awaiting_loaded: None,
            qmp: None,
            disk: None,
            reprotect: false,
            commit_marker: false,
            metrics: None,
            disk_threshold: 64 << 20,
        }
    }

    /// Connects to the secondary at the peer address, for a VM that has not run yet
    /// ([`start`](Self::start) then brings it in sync). Attempts go on for up to `wait`;
    /// `stop` ends them sooner.
    ///
    /// # Errors
    /// Address resolution, handshake or push connection failures (a secondary that does
    /// not listen yet is tried again until `wait` ends), or [`ColoError::Stopped`] when
    /// `stop` said so first.
    pub fn connect(&mut self, wait: Duration, stop: &dyn Fn() -> bool) -> Result<()> {
        let deadline = Instant::now() + wait;
        let (link, push, _) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.clamp(Duration::from_millis(100), Duration::from_millis(250));
            match open_link(&self.peer, Arc::clone(&self.ram), self.params, attempt) {
                Ok(l) => break l,
                Err(_) if stop() => return Err(ColoError::Stopped),
                // Nobody listens yet: try again. Anything else (a refused key, another
                // pair, a different VM) is the answer.
                Err(ColoError::Transport {
                    source: colo_transport::Error::Connect { .. },
                    ..
                }) if left > attempt => {}
                Err(e) => return Err(e),
            }
        };
        self.events.watch_link(&link);
        tracing::info!(peer = %self.peer.addr, transport = %self.peer.transport, "connected to the secondary");
        self.link = Some(link);
        self.push = Some(push);
        Ok(())
    }

    /// The VM.
    pub fn vm(&self) -> &VmHandle {
        &self.vm
    }
}

/// Connects the control channel and the push streams to a secondary at `peer`.
fn open_link(
    peer: &Peer,
    ram: Arc<Region>,
    params: Params,
    connect_timeout: Duration,
) -> Result<(Link, Box<dyn PushSender>, u64)> {
    let pair_id = peer.pair_id;
    let mut ctl = ControlChannel::connect_authenticated(
        &peer.addr,
        connect_timeout,
        &peer.creds,
        colo_auth::Role::Primary,
    )
    .map_err(ColoError::transport("connect to the secondary"))?;
    let hello = Hello::new(
        Role::Primary,
        pair_id,
        PAGE_SIZE as u32,
        vec![MemRegion {
            gpa: 0,
            len: ram.len() as u64,
        }],
    )
    .and_then(|h| h.with_vcpus(peer.vcpus))
    .map_err(ColoError::transport("build the hello"))?;
    ctl.handshake(&hello)
        .map_err(ColoError::transport("handshake"))?;
    ctl.set_recv_timeout(Some(STEP_TIMEOUT))
        .map_err(ColoError::transport("set a timeout"))?;
    let region = MessageId {
        kind: Kind::Region,
        epoch: None,
    };
    let reply = ctl
        .recv()
        .map_err(ColoError::transport("receive the region"))?;
    let Message::Region(desc) = region.check(reply)? else {
        unreachable!("checked to be a Region");
    };
    let host = peer
        .addr
        .rsplit_once(':')
        .map_or(peer.addr.as_str(), |(h, _)| h);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, desc.port))
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ColoError::Resolve {
            addr: host.to_string(),
        })?;
    let (push, abort) = super::push::connect(&peer.transport, addr.ip(), desc, ram, &peer.creds)?;
    let link = Link::start(ctl, params.heartbeat)?;
    // A silent secondary (stopped, or the network cut) never fails the push path by
    // itself: the heartbeat's verdict ends it, so a background push or a commit waiting for
    // the secondary fails now rather than at the push's own timeout (TCP 60 s, verbs 30 s).
    link.on_lost(abort);
    Ok((link, push, desc.pages()))
}

/// Fault injection for the failover tests: `COLO_TEST_CRASH_AT=<phase>:<checkpoint>` makes
/// the primary abort at that phase of that checkpoint. Phases: `request` (after the
/// checkpoint request), `push` (pages posted, no commit), `state` (vmstate-send sent, the
/// state not), `commit` (the secondary holds the whole epoch; the primary dies before it
/// resumes).
fn crash_armed(phase: &str, checkpoint: u64) -> bool {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    AT.get_or_init(|| {
        let v = std::env::var("COLO_TEST_CRASH_AT").ok()?;
        let (p, n) = v.split_once(':')?;
        Some((p.to_string(), n.parse().ok()?))
    })
    .as_ref()
    .is_some_and(|(p, n)| p == phase && *n == checkpoint)
}

/// Keeps the pages the guest rewrites all the time writable, within `params`'s budget.
fn keep_hot(dirty: &DirtyHandle, params: &Params) {
    let budget = params.hot_budget_pages;
    let policy = (budget > 0).then_some(HotPolicy {
        after: HotPolicy::DEFAULT_AFTER,
        budget_pages: budget,
        lease: HotPolicy::DEFAULT_LEASE,
    });
    let on = dirty.keep_hot(policy);
    if budget > 0 && !on {
        tracing::info!(
            "hot pages are write-protected like any other: KVM lacks manual dirty-log protection"
        );
    } else if on {
        tracing::debug!(budget_pages = budget, "hot pages kept writable");
    }
}

/// Test hook (`COLO_TEST_DROP_HOT=1`): the checkpoint's collection leaves the hot pages
/// kept writable out, as a background round does, so their latest contents never reach
/// the secondary. Only tests that prove such a loss is caught set it.
fn drop_hot_for_test() -> bool {
    static ARMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ARMED.get_or_init(|| {
        let on = std::env::var_os("COLO_TEST_DROP_HOT").is_some_and(|v| v == "1");
        if on {
            eprintln!("COLO_TEST_DROP_HOT: checkpoints leave hot pages out (memory will be lost)");
        }
        on
    })
}

fn crash_point(phase: &str, checkpoint: u64) {
    if crash_armed(phase, checkpoint) {
        eprintln!("COLO_TEST_CRASH_AT: the primary aborts at {phase} of checkpoint {checkpoint}");
        std::process::abort();
    }
}

/// Connects the replicated disk `d` to the secondary at `peer` and copies it whole (the
/// PVM may run meanwhile). `link`'s heartbeat verdict ends the disk link at once, so a
/// copy (or later a barrier) gives up then rather than when the disk link's own stall
/// timeout (10 s) runs out.
fn sync_disk(
    d: &Arc<colo_blk::PrimaryDisk>,
    peer: &Peer,
    link: &Link,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let addr = super::blk_addr(&peer.addr)?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|source| {
            ColoError::Connect {
                what: "disk replication",
                addr: addr.to_string(),
                source,
            }
        })?;
    let _ = s.set_nodelay(true);
    let secondary = colo_auth::connect(
        &mut s,
        &peer.creds,
        colo_auth::Role::Primary,
        colo_auth::Channel::Disk,
        colo_auth::HANDSHAKE_TIMEOUT,
    )
    .map_err(|source| ColoError::Auth {
        what: "disk replication",
        source,
    })?;
    let s = if peer.creds.encrypts() {
        colo_auth::seal::bridge(s, &secondary).map_err(ColoError::io("seal the disk link"))?
    } else {
        s
    };
    d.attach(s, colo_blk::SyncMode::Resync, Duration::from_secs(30))
        .map_err(ColoError::disk("attach the secondary"))?;
    let disk = Arc::clone(d);
    link.on_lost(move || disk.drop_secondary("the heartbeat says the secondary is gone"));
    // The background copy runs while the guest writes on; the last chunks are copied
    // with its writes held. Ctrl-C or SIGTERM end it (the secondary's copy is then
    // partial; it says so).
    let mut progress = Progress::new("disk resync", d.len());
    let deadline = Instant::now() + Duration::from_secs(600);
    while let Some(p) = d.resync_progress() {
        if stop() {
            d.stop_replication();
            return Err(ColoError::Stopped);
        }
        if p.dirty_chunks <= 16 || Instant::now() >= deadline {
            break;
        }
        progress.set(p.copied_bytes.min(d.len()));
        std::thread::sleep(Duration::from_millis(50));
    }
    d.complete_resync(Duration::from_secs(600))
        .map_err(ColoError::disk("resync"))?;
    progress.finish();
    Ok(())
}

/// Sleeps `d`, or less once `stop` says so.
fn nap(d: Duration, stop: &dyn Fn() -> bool) {
    let end = Instant::now() + d;
    while !stop() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runs(b: &PageBitmap) -> impl Iterator<Item = WriteRun> + '_ {
    b.runs()
        .map(|(p, n)| WriteRun::pages(p, n, PAGE_SIZE as u32))
}

impl Primary {
    /// Whether the pair is still protected.
    pub fn protected(&self) -> bool {
        self.link.as_ref().is_some_and(|l| !l.is_lost())
    }

    /// Brings the secondary in sync before the PVM first runs: the disk (if replicated),
    /// then every page and the state; then the PVM starts. If the secondary is lost
    /// meanwhile, the primary leaves COLO and starts the PVM unprotected, as a failed
    /// migration leaves its source running; with [`reprotect`](Self::reprotect) a new
    /// secondary may join later.
    ///
    /// # Errors
    /// A VM failure, or [`ColoError::Stopped`] when `stop` ended the sync (the VM has not
    /// run).
    pub fn start(&mut self, stop: &dyn Fn() -> bool) -> Result<()> {
        let r = match &self.disk {
            Some(d) => {
                let t = Instant::now();
                let link = self.peer()?;
                sync_disk(d, &self.peer, link, stop).inspect(|()| {
                    tracing::info!(
                        ms = t.elapsed().as_millis() as u64,
                        bytes = d.len(),
                        "disk in sync with the secondary"
                    );
                })
            }
            None => Ok(()),
        };
        match r.and_then(|()| self.initial_sync(stop)) {
            Ok(()) => Ok(()),
            Err(e @ (ColoError::Vm(_) | ColoError::Stopped)) => Err(e),
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "the initial sync failed: the primary starts unprotected");
                self.leave(&e);
                Ok(())
            }
        }
    }

    /// The initial full synchronization: every page and the state, with the VM paused
    /// (it has not run yet). Then the PVM starts.
    ///
    /// # Errors
    /// A lost secondary or a VM failure.
    fn initial_sync(&mut self, stop: &dyn Fn() -> bool) -> Result<()> {
        // Reset the dirty log: everything is pushed anyway.
        self.dirty.collect(&mut self.bitmap)?;
        self.bitmap.clear_all();
        let t = Instant::now();
        self.push_everything_with_progress("initial sync", stop)?;
        let r = self.checkpoint_paused(Trigger::InitialSync, t, PauseStart::default());
        match r {
            Ok(()) => {
                tracing::info!(ms = t.elapsed().as_millis() as u64, "initial sync done");
                super::role::announce(&self.vm, &self.params, super::role::RoleWord::Protected);
                self.vm.resume();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Pushes every page of guest RAM as one push epoch, in 32 MiB steps, with a progress
    /// line on stderr.
    fn push_everything_with_progress(
        &mut self,
        what: &'static str,
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        const STEP: u64 = 8192; // pages (32 MiB)
        let push = self.push.as_mut().ok_or(ColoError::NoPeer)?;
        let pages = push.remote().pages();
        let mut progress = Progress::new(what, pages * PAGE_SIZE);
        let mut done = 0;
        while done < pages {
            if stop() {
                return Err(ColoError::Stopped);
            }
            let n = STEP.min(pages - done);
            push.post(&[WriteRun::pages(done, n, PAGE_SIZE as u32)])
                .and_then(|()| push.fence())
                .map_err(ColoError::transport(what))?;
            done += n;
            progress.set(done * PAGE_SIZE);
        }
        progress.finish();
        let mut all = PageBitmap::new(pages);
        all.set_range(0, pages);
        push.commit(&all)
            .map_err(ColoError::transport("initial sync"))?;
        self.bg_pages += pages;
        self.bg_bytes += pages * PAGE_SIZE;
        Ok(())
    }

    /// Stops the PVM (if its guest has not ended it already) and says how the guest
    /// ended.
    ///
    /// # Errors
    /// The guest's crash or a KVM failure that ended a vCPU.
    pub fn finish(self) -> Result<GuestExit> {
        Ok(self.vm.stop()?)
    }

    /// Runs checkpoints until `stop` says so or the secondary is lost; then keeps the PVM
    /// running unprotected until `stop`.
    ///
    /// # Errors
    /// A VM failure (a lost secondary is not an error: the primary leaves COLO).
    pub fn run(&mut self, stop: &dyn Fn() -> bool) -> Result<()> {
        loop {
            while !stop() && self.protected() && !self.vm.finished() {
                let trigger = match self.epoch_wait(stop) {
                    Ok(t) => t,
                    Err(e @ ColoError::Vm(_)) => return Err(e),
                    Err(e) => {
                        // The background push or the link failed: the secondary is gone.
                        self.leave(&e);
                        break;
                    }
                };
                if stop() || self.vm.finished() {
                    break;
                }
                if let Err(e) = self.checkpoint(trigger) {
                    self.leave(&e);
                }
            }
            if let Some(why) = self.link.as_ref().and_then(Link::why) {
                self.leave(&ColoError::PeerLost(why));
            } else if let Some(l) = self.link.take() {
                // An orderly stop: the secondary must not take over.
                let _ = l.send(&Message::Goodbye);
                tracing::info!("COLO stopped; the secondary was told goodbye");
                break;
            }
            // Unprotected: serve, and take a new secondary when one appears.
            let mut protected_again = false;
            while !stop() && !self.vm.finished() && !protected_again {
                super::qmp::apply_run_request(self.qmp.as_ref(), &self.vm);
                if self.reprotect {
                    match self.reprotect(stop) {
                        Ok(true) => protected_again = true,
                        Ok(false) => nap(Duration::from_millis(500), stop),
                        Err(e @ ColoError::Vm(_)) => return Err(e),
                        Err(ColoError::Stopped) => {
                            tracing::info!(
                                "stopped during a re-protection; the secondary's copy is partial"
                            );
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::warn!(error = %Chain(&e), "re-protection failed; retrying");
                            self.link = None;
                            self.push = None;
                            if let Some(d) = &self.disk {
                                d.stop_replication();
                            }
                            nap(Duration::from_millis(500), stop);
                        }
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if !protected_again {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Re-protection: if a new secondary listens at the peer address, connects it, brings
    /// its disk and RAM in sync while the PVM serves (a live full copy, then an ordinary
    /// checkpoint for what changed meanwhile), and returns true: COLO goes on.
    fn reprotect(&mut self, stop: &dyn Fn() -> bool) -> Result<bool> {
        let (link, push, pages) = match open_link(
            &self.peer,
            Arc::clone(&self.ram),
            self.params,
            Duration::from_millis(100),
        ) {
            Ok(l) => l,
            // Nobody listens there yet.
            Err(ColoError::Transport {
                source: colo_transport::Error::Connect { .. },
                ..
            }) => return Ok(false),
            Err(e) => return Err(e),
        };
        tracing::info!(peer = %self.peer.addr, "a new secondary joined: resynchronizing while serving");
        let t = Instant::now();
        if let Some(d) = &self.disk {
            sync_disk(d, &self.peer, &link, stop)?;
        }
        // Every page, while the PVM runs; what it dirties meanwhile goes in the first
        // checkpoint.
        self.bitmap = PageBitmap::new(pages);
        self.dirty.collect(&mut self.bitmap)?;
        self.bitmap.clear_all();
        self.push = Some(push);
        self.push_everything_with_progress("re-protection", stop)?;
        self.events.watch_link(&link);
        self.link = Some(link);
        self.awaiting_loaded = None;
        self.events.emit(&Event::Protected);
        super::qmp::colo_entered(self.qmp.as_ref(), Side::Primary);
        // Every frame after this word (the VM stays paused into the checkpoint's pause) is
        // held by a cluster proxy until the checkpoint's marker.
        super::role::announce(&self.vm, &self.params, super::role::RoleWord::Protected);
        if let Err(e) = self.checkpoint(Trigger::Resync) {
            super::role::announce(&self.vm, &self.params, super::role::RoleWord::Alone);
            self.vm.resume();
            return Err(e);
        }
        tracing::info!(
            ms = t.elapsed().as_millis() as u64,
            "re-protected: COLO again"
        );
        Ok(true)
    }

    /// Applies QMP requests: new parameters, `x-colo-lost-heartbeat`.
    fn poll_qmp(&mut self) {
        let Some(q) = &self.qmp else { return };
        let mut st = q.lock().unwrap_or_else(|p| p.into_inner());
        self.params.checkpoint_delay = Duration::from_millis(st.checkpoint_delay_ms);
        if std::mem::take(&mut st.lost_heartbeat) {
            drop(st);
            if let Some(l) = &self.link {
                l.force_lost();
            }
        }
    }

    /// Leaves COLO: the secondary is gone, the PVM runs on alone.
    fn leave(&mut self, e: &ColoError) {
        if self.link.is_none() {
            return;
        }
        let _span = tracing::info_span!("failover", side = "primary", epoch = self.epoch).entered();
        let lost = self.link.as_ref().and_then(Link::why);
        // When the heartbeat declared the peer lost, that is the cause; the failure that
        // surfaced here (a push ended by it, say) is only its consequence.
        let consequence = lost.is_some() && !matches!(e, ColoError::PeerLost(_));
        let reason = ExitReason::of(e, lost);
        if let Some(q) = &self.qmp {
            super::qmp::colo_exit(q, ColoExitReason::from(&reason));
        }
        let shown = if consequence {
            format!("{reason} (then: {})", Chain(e))
        } else {
            reason.to_string()
        };
        tracing::warn!(error = %shown, "secondary lost: leaving COLO, the primary keeps serving");
        if let Some(d) = &self.disk {
            d.stop_replication();
        }
        self.events.emit(&Event::Failover {
            side: Side::Primary,
            reason,
            timing: None,
        });
        self.link = None;
        self.push = None;
        super::role::announce(&self.vm, &self.params, super::role::RoleWord::Alone);
        self.vm.resume();
    }

    /// Waits out the epoch, pushing dirty pages in the background. Returns what ends it.
    fn epoch_wait(&mut self, stop: &dyn Fn() -> bool) -> Result<Trigger> {
        let deadline = Instant::now() + self.params.checkpoint_delay;
        let waited_for_load = Instant::now() + STEP_TIMEOUT;
        let mut due: Option<Trigger> = None;
        // The background push wakes every push interval while the guest dirties pages,
        // and backs off (doubling, up to the checkpoint delay) while it dirties next to
        // nothing: an idle guest then costs a few wake-ups per epoch, not one per interval
        // (each wake-up of a blocking channel wait spins and yields first, which is dear
        // on a virtualized host).
        let mut interval = self.params.push_interval;
        loop {
            let now = Instant::now();
            if now >= deadline && due.is_none() {
                due = Some(Trigger::Timer);
            }
            // A checkpoint waits until the secondary has loaded the previous one; the
            // background push goes on meanwhile, so the pause does not inherit every page
            // dirtied during a long load (the first one copies all of RAM).
            if let Some(t) = due {
                if self.awaiting_loaded.is_none() || now >= waited_for_load {
                    return Ok(t);
                }
            }
            let wait = deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1))
                .min(interval);
            if let Ok(Request::Checkpoint) = self.events.requests.recv_timeout(wait) {
                due = Some(Trigger::Mismatch);
            }
            self.poll_qmp();
            if stop() || !self.protected() || self.vm.finished() {
                return Ok(Trigger::Timer);
            }
            if let Some(m) = self.link.as_ref().and_then(Link::try_recv) {
                self.on_stray(m)?;
            }
            // With --hot-flush, the round just before the checkpoint flushes the hot pages
            // too, so the pause carries only those written again since (see
            // `Collection::Flush`).
            let last = due.is_some() || Instant::now() >= deadline;
            let n = if last && self.params.hot_flush {
                self.dirty.collect_flush(&mut self.bitmap)?
            } else {
                self.dirty.collect_background(&mut self.bitmap)?
            };
            interval = if n < IDLE_PUSH_PAGES {
                (interval * 2).min(self.params.checkpoint_delay)
            } else {
                self.params.push_interval
            };
            if n > 0 {
                let count = self.bitmap.count();
                let Some(push) = self.push.as_mut() else {
                    return Ok(Trigger::Timer);
                };
                match push_epoch(push, runs(&self.bitmap), &self.bitmap) {
                    Ok(s) => {
                        self.bg_pages += count;
                        self.bg_bytes += s.bytes;
                    }
                    Err(e) => {
                        self.bitmap.clear_all();
                        return Err(ColoError::transport("background push")(e));
                    }
                }
                self.bitmap.clear_all();
                if self.params.dirty_threshold > 0 && self.bg_pages >= self.params.dirty_threshold {
                    return Ok(Trigger::Threshold);
                }
            }
            if self
                .disk
                .as_ref()
                .is_some_and(|d| d.stats().secondary_buffered >= self.disk_threshold)
            {
                return Ok(Trigger::Threshold);
            }
        }
    }

    fn on_stray(&mut self, m: Message) -> Result<()> {
        match m {
            Message::VmstateLoaded { epoch } if Some(epoch) == self.awaiting_loaded => {
                self.awaiting_loaded = None;
                Ok(())
            }
            Message::Failover => Err(ColoError::PeerLost(LostReason::FailoverRequested)),
            Message::Goodbye => Err(ColoError::PeerLost(LostReason::Left)),
            other => Err(ColoError::Stray {
                got: MessageId::of(&other),
            }),
        }
    }

    fn peer(&self) -> Result<&Link> {
        self.link.as_ref().ok_or(ColoError::NoPeer)
    }

    /// One checkpoint while the PVM runs.
    fn checkpoint(&mut self, trigger: Trigger) -> Result<()> {
        // The secondary answers in order: the previous epoch's Loaded comes first.
        if let Some(e) = self.awaiting_loaded {
            self.peer()?
                .expect(Kind::VmstateLoaded, Some(e), STEP_TIMEOUT)?;
            self.awaiting_loaded = None;
        }
        let k = self
            .push
            .as_ref()
            .map(PushSender::epoch)
            .unwrap_or_default();
        // Every line of this checkpoint, from this thread and the ones it waits on, reads
        // together under this span.
        let _span = tracing::info_span!(
            "checkpoint",
            epoch = self.epoch + 1,
            push_epoch = k,
            cause = ?trigger
        )
        .entered();
        self.peer()?
            .send(&Message::CheckpointRequest { epoch: k })?;
        crash_point("request", self.epoch + 1);
        self.peer()?
            .expect(Kind::CheckpointReply, Some(k), STEP_TIMEOUT)?;
        let t = Instant::now();
        let report = self.vm.pause()?;
        let parked = t.elapsed();
        self.dirty.collect(&mut self.bitmap)?;
        if drop_hot_for_test() {
            self.dirty.remove_kept(&mut self.bitmap);
        }
        let start = PauseStart {
            park: parked,
            vcpu_stops: report.stops().to_vec(),
            collect: t.elapsed() - parked,
        };
        let r = self.checkpoint_paused(trigger, t, start);
        self.vm.resume();
        if r.is_err() {
            // A checkpoint that failed (the secondary vanished mid-way) paused the PVM too.
            let us = t.elapsed().as_micros() as u64;
            self.events.emit(&Event::AbortedPause { pause_us: us });
            tracing::warn!(pause_us = us, "checkpoint abandoned; the PVM resumed");
        }
        r
    }

    /// The paused part: last pages, state, wait for the secondary to hold it all.
    fn checkpoint_paused(
        &mut self,
        trigger: Trigger,
        paused_at: Instant,
        start: PauseStart,
    ) -> Result<()> {
        let pause_pages = self.bitmap.count();
        let push = self.push.as_mut().ok_or(ColoError::NoPeer)?;
        let k = push.epoch();
        if trigger == Trigger::InitialSync {
            self.peer()?
                .send(&Message::CheckpointRequest { epoch: k })?;
            self.peer()?
                .expect(Kind::CheckpointReply, Some(k), STEP_TIMEOUT)?;
        }
        let push = self.push.as_mut().expect("checked above");
        let checkpoint = self.epoch + 1;
        let stats = if crash_armed("push", checkpoint) {
            // Post the pages, then die before the commit: the secondary holds a partial
            // epoch in its cache.
            let all: Vec<WriteRun> = runs(&self.bitmap).collect();
            let _ = push.post(&all);
            let _ = push.fence();
            crash_point("push", checkpoint);
            unreachable!("crash_point aborts");
        } else {
            // Only the commit is sent: its acknowledgement, the disk marker's and the
            // secondary's answer to the state then overlap instead of following each other
            // (the secondary answers only once it holds the pages and the disk marker).
            start_epoch(push, runs(&self.bitmap), &self.bitmap)
        };
        self.bitmap.clear_all();
        let stats = stats.map_err(ColoError::transport("checkpoint push"))?;
        let pushed_at = paused_at.elapsed();
        let state = self.vm.machine()?.save_state()?;
        let state_bytes = state.len() as u64;
        // "Disk acknowledged": the end-of-epoch marker follows every write the PVM
        // completed so far; the secondary waits for it before it answers.
        if let Some(d) = &self.disk {
            d.checkpoint_marker(checkpoint)
                .map_err(ColoError::disk("checkpoint marker"))?;
        }
        let barrier_done = paused_at.elapsed();
        let link = self.peer()?;
        link.send(&Message::VmstateSend { epoch: k })?;
        crash_point("state", checkpoint);
        link.send(&Message::VmstateSize { state })?;
        link.expect(Kind::VmstateReceived, Some(k), STEP_TIMEOUT)?;
        // Normally here already: the answer implies both. The push's must be taken before
        // the PVM may change a page that was on its way.
        self.push
            .as_mut()
            .ok_or(ColoError::NoPeer)?
            .finish_commit()
            .map_err(ColoError::transport("checkpoint push"))?;
        if let Some(d) = &self.disk {
            d.checkpoint_barrier(checkpoint, STEP_TIMEOUT)
                .map_err(ColoError::disk("checkpoint barrier"))?;
        }
        crash_point("commit", checkpoint);
        self.awaiting_loaded = Some(k);
        self.epoch += 1;
        // The proxy must take the commit (release the epoch's held output, reset its
        // connections) before anything the PVM sends after resuming.
        let received_at = paused_at.elapsed();
        if self.commit_marker {
            // In the PVM's own output stream, after everything it sent in this epoch and
            // before anything it sends after resuming: the proxy releases the epoch's
            // output without a round trip.
            if let Err(e) = self.vm.machine()?.net_commit_marker() {
                tracing::warn!(error = %e, "cannot mark the commit in the network output");
            }
        }
        let pause = paused_at.elapsed();
        // After the pause's end is taken: not part of it.
        let counts = self.vm.vcpu_exit_counts();
        let rec = EpochRecord {
            epoch: self.epoch,
            at_ms: Some(
                paused_at
                    .saturating_duration_since(self.started)
                    .as_millis() as u64,
            ),
            trigger,
            pause_us: pause.as_micros() as u64,
            release_us: (pause - received_at).as_micros() as u64,
            park_us: start.park.as_micros() as u64,
            vcpu_stop_us: start
                .vcpu_stops
                .iter()
                .map(|d| d.as_micros() as u64)
                .collect(),
            collect_us: start.collect.as_micros() as u64,
            push_us: pushed_at.as_micros() as u64,
            barrier_us: (barrier_done - pushed_at).as_micros() as u64,
            answer_us: (received_at - barrier_done).as_micros() as u64,
            pause_pages,
            hot_pages: self.dirty.kept_pages(),
            background_pages: self.bg_pages,
            bytes: stats.bytes + self.bg_bytes,
            state_bytes,
            vcpu_faults: counts.map(|c| c.faults),
            vcpu_exits: counts.map(|c| c.exits),
        };
        self.bg_pages = 0;
        self.bg_bytes = 0;
        self.summary.add(&rec);
        self.events.emit(&Event::Checkpoint(rec.clone()));
        if let Some(f) = &mut self.metrics {
            if f.write_all(&super::event::encode(&rec))
                .and_then(|()| f.flush())
                .is_err()
            {
                tracing::warn!("cannot write the metrics stream; stopping it");
                self.metrics = None;
            }
        }
        tracing::debug!(?rec, "checkpoint");
        Ok(())
    }
}
