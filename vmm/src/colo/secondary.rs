//! The secondary: stages each epoch in the RAM cache and applies it to the SVM only once
//! the whole epoch has arrived; takes over when the primary is lost.
//!
//! The push receiver runs on its own thread ([`colo_ramcache::Landing`]): it lands every
//! push epoch in the cache and releases it at once, except the push epoch that closes the
//! checkpoint being taken (named by `CheckpointRequest`), which is released only after the
//! commit has copied the epoch into SVM memory.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_machine::memory::PAGE_SIZE;
use colo_machine::runner::VmHandle;
use colo_machine::{DirtyHandle, GuestExit};
use colo_memory::PageBitmap;
use colo_memory::Region;
use colo_ramcache::{Landing, LandingEnd, RamCache};
use colo_transport::control::{ControlChannel, Hello, Kind, MemRegion, Message, Role};
use colo_transport::push::RegionDesc;

use super::event::{Event, Events, ExitReason, Side, TakeoverTiming};
use super::link::{Link, LostReason, MessageId, unix_us};
use super::qmp::ColoExitReason;
use super::{ColoError, Mode, Params, Result, STEP_TIMEOUT};

/// The pause between two runs of the takeover check at first...
const CHECK_RETRY_FAST: Duration = Duration::from_millis(2);
/// ...for this long...
const CHECK_FAST_FOR: Duration = Duration::from_millis(250);
/// ...and then.
const CHECK_RETRY_SLOW: Duration = Duration::from_millis(50);

/// How the secondary's COLO session ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The primary left in order (Goodbye).
    PrimaryLeft,
    /// Ctrl-C, SIGTERM, QMP `quit` or `--duration` stopped this side while it followed.
    Stopped,
    /// The link was lost but the takeover check says the primary is still active: the
    /// secondary stays passive (split-brain prevention).
    Fenced {
        /// Why the link was lost.
        reason: ExitReason,
    },
    /// The secondary took over: the SVM now serves.
    TookOver {
        /// Why.
        reason: ExitReason,
        /// Checkpoints applied before.
        checkpoints: u64,
        /// Whether an incomplete epoch was dropped.
        dropped_epoch: bool,
    },
}

/// The secondary.
pub struct Secondary {
    vm: VmHandle,
    dirty: DirtyHandle,
    /// The RAM cache, the thread landing push epochs in it and the release gate.
    landing: Landing,
    link: Link,
    params: Params,
    checkpoints: u64,
    running: bool,
    svm_dirty: PageBitmap,
    /// The QMP socket's state, if one is served.
    pub qmp: Option<super::qmp::Shared>,
    /// A shell command that must succeed before the secondary takes over on a lost link
    /// (a fence or quorum hook). None: take over on any loss.
    pub takeover_check: Option<String>,
    /// The disk buffer, if the disk is replicated.
    pub disk: Option<Arc<colo_blk::SecondaryDisk>>,
    /// The failover state machine.
    pub failover: super::failover::Failover,
    /// Where takeover and fencing are reported (`colo pair`).
    pub events: Events,
}

/// What both sides must agree on.
#[derive(Debug, Clone)]
pub struct Pairing {
    /// The pair id.
    pub pair_id: u64,
    /// The page-push transport.
    pub transport: super::push::PushTransport,
    /// The VM's vCPU count.
    pub vcpus: u32,
    /// What every connection from the primary must authenticate with.
    pub creds: colo_auth::Credentials,
}

/// Accepts a primary on `listener` and sets up the cache and push path for a VM that has
/// not run yet. Connections that do not authenticate as the pair's primary are logged
/// and dropped; the wait goes on until the primary comes or `stop` says so.
///
/// # Errors
/// Handshake, layout or socket failures; [`ColoError::AuthAccept`] when stopped first.
#[allow(clippy::too_many_arguments)]
pub fn accept(
    listener: &TcpListener,
    vm: VmHandle,
    svm_ram: Vec<Arc<Region>>,
    dirty: DirtyHandle,
    layout: colo_memory::GuestLayout,
    pairing: &Pairing,
    params: Params,
    stop: &dyn Fn() -> bool,
) -> Result<Secondary> {
    let (pair_id, transport) = (pairing.pair_id, &pairing.transport);
    // Map and pre-fault the cache before the primary is accepted: that takes about a
    // second per few GiB, and the primary waits for the region only a step's timeout.
    let bytes = layout.bytes();
    let cache = RamCache::new(layout, svm_ram)?;
    let (mut ctl, primary) = ControlChannel::accept_authenticated(
        listener,
        &pairing.creds,
        colo_auth::Role::Secondary,
        None,
        stop,
    )
    .map_err(ColoError::transport("accept the primary"))?;
    tracing::info!(%primary, "the primary authenticated");
    let hello = Hello::new(
        Role::Secondary,
        pair_id,
        PAGE_SIZE as u32,
        vec![MemRegion { gpa: 0, len: bytes }],
    )
    .and_then(|h| h.with_vcpus(pairing.vcpus))
    .map_err(ColoError::transport("build the hello"))?;
    ctl.handshake(&hello)
        .map_err(ColoError::transport("handshake"))?;
    let ip = listener
        .local_addr()
        .map_err(ColoError::io("read the control listener's address"))?
        .ip();
    let pl = super::push::PushListener::bind(
        transport,
        ip,
        Arc::clone(cache.region()),
        PAGE_SIZE as u32,
        &pairing.creds,
    )?;
    let desc: RegionDesc = pl.desc();
    ctl.send(&Message::Region(desc))
        .map_err(ColoError::transport("send the region"))?;
    let rx = pl.accept(Duration::from_secs(30))?;
    let link = Link::start(ctl, params.heartbeat)?;
    let landing = Landing::start(cache, rx)?;
    // The heartbeat is the authority on the peer: its verdict ends a wait for pages too.
    let interrupt = landing.interrupter();
    link.on_lost(move || interrupt.interrupt());
    let pages = desc.pages();
    tracing::info!(pages, "primary connected; waiting for the initial sync");
    // Until it takes over, the SVM's guest does not end the secondary by powering off,
    // resetting or exiting (it may get there before the PVM does): the PVM's end does.
    vm.set_hold_exits(true);
    Ok(Secondary {
        vm,
        dirty,
        landing,
        link,
        params,
        checkpoints: 0,
        running: false,
        svm_dirty: PageBitmap::new(pages),
        qmp: None,
        takeover_check: None,
        disk: None,
        failover: super::failover::Failover::default(),
        events: Events::none(),
    })
}

impl Secondary {
    /// The VM.
    pub fn vm(&self) -> &VmHandle {
        &self.vm
    }

    /// The VM, its dirty log and the event socket, for a secondary that took over and
    /// goes on as a primary (the cache, the landing thread and the old link end here).
    pub fn into_parts(self) -> (VmHandle, DirtyHandle, Events) {
        let Secondary {
            vm, dirty, events, ..
        } = self;
        (vm, dirty, events)
    }

    /// Stops the SVM (if its guest has not ended it already) and says how the guest
    /// ended.
    ///
    /// # Errors
    /// The guest's crash or a KVM failure that ended a vCPU.
    pub fn finish(self) -> Result<GuestExit> {
        Ok(self.vm.stop()?)
    }

    /// Follows the primary until it leaves or is lost; then takes over.
    ///
    /// # Errors
    /// A VM failure while taking over.
    pub fn run(&mut self, stop: &dyn Fn() -> bool) -> Result<Outcome> {
        self.events.watch_link(&self.link);
        loop {
            if stop() {
                return Ok(Outcome::Stopped);
            }
            if let Some(q) = &self.qmp {
                if std::mem::take(&mut q.lock().unwrap_or_else(|p| p.into_inner()).lost_heartbeat) {
                    self.link.force_lost();
                }
            }
            let m = match self.link.recv(Duration::from_millis(50)) {
                Ok(m) => m,
                Err(ColoError::Timeout { .. }) => continue,
                Err(e) => return self.take_over(ExitReason::of(&e, self.link.why()), false),
            };
            let r = match m {
                Message::CheckpointRequest { epoch } => self.checkpoint(epoch),
                Message::Goodbye => {
                    tracing::info!("the primary left in order");
                    return Ok(Outcome::PrimaryLeft);
                }
                Message::Failover => {
                    let lost = LostReason::FailoverRequested;
                    return self.take_over(ExitReason::PeerLost { lost }, false);
                }
                other => Err(ColoError::Stray {
                    got: MessageId::of(&other),
                }),
            };
            if let Err(e) = r {
                return self.take_over(ExitReason::of(&e, self.link.why()), true);
            }
        }
    }

    /// One checkpoint, closed by push epoch `k`.
    fn checkpoint(&mut self, k: u64) -> Result<()> {
        let _span = tracing::info_span!("checkpoint", epoch = self.checkpoints + 1, push_epoch = k)
            .entered();
        self.landing.hold(k);
        if let Some(d) = &self.disk {
            // An SVM flush waiting for the primary's ends now: the epoch commits only once
            // the SVM's disk requests are done.
            d.release_flushes();
        }
        if self.running {
            self.vm.pause()?;
        }
        self.link.send(&Message::CheckpointReply { epoch: k })?;
        self.link.expect(Kind::VmstateSend, Some(k), STEP_TIMEOUT)?;
        let epoch = k;
        let Message::VmstateSize { state } =
            self.link.expect(Kind::VmstateSize, None, STEP_TIMEOUT)?
        else {
            unreachable!("checked to be a VmstateSize");
        };
        // Every page of the epoch must have landed before it is sealed.
        self.landing
            .wait_landed(k, STEP_TIMEOUT)
            .map_err(|e| match e {
                colo_ramcache::Error::Landing(LandingEnd::Interrupted) => self.link.lost_error(),
                colo_ramcache::Error::Landing(_) => ColoError::PeerLost(LostReason::PushClosed),
                colo_ramcache::Error::LandTimeout { .. } => ColoError::NotLanded {
                    push_epoch: k,
                    after: STEP_TIMEOUT,
                },
                other => ColoError::Cache(other),
            })?;
        // "Disk acknowledged": the primary queued its end-of-epoch marker behind every
        // write of the epoch before it sent the state, and does not wait for the marker's
        // acknowledgement first; this answer is what tells it the disk is here too.
        if let Some(d) = &self.disk {
            d.wait_next_marker(STEP_TIMEOUT)
                .map_err(ColoError::disk("checkpoint marker"))?;
        }
        self.landing.with_cache(|c| -> Result<()> {
            c.seal_pages(k)?;
            c.stage_state(state)?;
            c.stage_disk_acked()?;
            Ok(())
        })?;
        self.link.send(&Message::VmstateReceived { epoch })?;
        // The whole checkpoint is here: the disk buffer may be dropped, once the paused
        // SVM's disk requests in flight have landed (the state loaded below runs them
        // again where they matter).
        if let Some(d) = &self.disk {
            self.vm.wait_disk_idle(STEP_TIMEOUT)?;
            // The marker that arrived above names the epoch to commit.
            d.commit_next(STEP_TIMEOUT)
                .map_err(ColoError::disk("commit"))?;
        }
        // Apply: SVM-dirty pages since the last commit, the cache flush, the state. A
        // failover asked for from now on waits for the load to finish (relaunch).
        self.svm_dirty.clear_all();
        self.dirty.collect(&mut self.svm_dirty)?;
        // The held push epoch goes once the commit has copied it: the cache may take the
        // next epoch's pages while the state loads.
        let done = self.landing.commit_and_release(k, &self.svm_dirty)?;
        self.vm.machine()?.restore_state(&done.state)?;
        self.checkpoints += 1;
        self.events.applied(done.pages);
        if self.params.mode == Mode::Colo {
            // The proxy may hold the SVM while it runs too far ahead of the PVM.
            self.vm.set_net_pacing(true);
            self.vm.resume();
            self.running = true;
        }
        super::qmp::set_running(self.qmp.as_ref(), self.running);
        super::qmp::set_phase(self.qmp.as_ref(), super::qmp::Phase::Colo);
        if let Some(q) = &self.qmp {
            if std::mem::take(&mut q.lock().unwrap_or_else(|p| p.into_inner()).lost_heartbeat) {
                self.failover.request(true);
                self.link.force_lost();
                return Err(ColoError::PeerLost(LostReason::Forced));
            }
        }
        self.link.send(&Message::VmstateLoaded { epoch })?;
        tracing::debug!(
            checkpoint = self.checkpoints,
            pages = done.pages,
            reverted = done.reverted_pages,
            flush_us = done.flush.as_micros() as u64,
            "checkpoint applied"
        );
        Ok(())
    }

    /// A fenced secondary (its takeover check did not pass) stays passive until it is
    /// told to take over by hand (QMP `x-colo-lost-heartbeat`: an operator, or a cluster
    /// promoting it once the old primary is stopped or fenced), or until `stop`.
    ///
    /// # Errors
    /// A VM failure while taking over.
    pub fn wait_fenced(&mut self, stop: &dyn Fn() -> bool) -> Result<Option<Outcome>> {
        loop {
            if stop() {
                return Ok(None);
            }
            let asked = self.qmp.as_ref().is_some_and(|q| {
                std::mem::take(&mut q.lock().unwrap_or_else(|p| p.into_inner()).lost_heartbeat)
            });
            if asked {
                let lost = LostReason::Forced;
                return self
                    .take_over(ExitReason::PeerLost { lost }, false)
                    .map(Some);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the takeover check until it passes or the heartbeat timeout passes.
    ///
    /// The retries come [`CHECK_RETRY_FAST`] apart for the first [`CHECK_FAST_FOR`], then
    /// [`CHECK_RETRY_SLOW`] apart: a closed link is seen a moment before whatever the
    /// check asks knows the primary is gone (`colo pair`'s alive file goes when the
    /// process has ended, 5-20 ms after its sockets closed here), and every millisecond
    /// waited here is one the client waits for a reply.
    fn may_take_over(&self) -> bool {
        let Some(cmd) = &self.takeover_check else {
            return true;
        };
        let start = Instant::now();
        let deadline = start + self.params.heartbeat.timeout.max(Duration::from_secs(1));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match std::process::Command::new("sh").args(["-c", cmd]).status() {
                Ok(s) if s.success() => {
                    tracing::debug!(
                        attempt,
                        after_us = start.elapsed().as_micros() as u64,
                        "the takeover check passed"
                    );
                    return true;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot run the takeover check"),
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(if start.elapsed() < CHECK_FAST_FOR {
                CHECK_RETRY_FAST
            } else {
                CHECK_RETRY_SLOW
            });
        }
    }

    /// Failover: drop an incomplete epoch, and let the SVM serve.
    fn take_over(&mut self, reason: ExitReason, mid_epoch: bool) -> Result<Outcome> {
        let _span = tracing::info_span!(
            "failover",
            side = "secondary",
            checkpoint = self.checkpoints,
            mid_epoch
        )
        .entered();
        let lost_unix_us = self
            .link
            .lost_at_unix_us()
            .unwrap_or_else(|| unix_us(std::time::SystemTime::now()));
        self.failover.request(false);
        // No more pages land: the cache's incomplete epoch is dropped below and the SVM
        // goes on from its own state.
        self.landing.interrupt();
        let dropped = self.landing.with_cache(|c| {
            let s = c.status();
            let incomplete = mid_epoch || s.sealed || s.state_bytes.is_some() || s.pages > 0;
            c.abort();
            incomplete
        });
        if self.checkpoints == 0 {
            return Err(ColoError::NothingToTakeOver { reason });
        }
        // The peer's own request or an order by hand (QMP `x-colo-lost-heartbeat`: an
        // operator, or a cluster that decided) needs no check.
        if !reason.peer_asked() && !reason.by_hand() && !self.may_take_over() {
            tracing::warn!(
                %reason,
                "FENCED: the takeover check says the primary is still active; the secondary stays passive"
            );
            self.events.emit(&Event::Fenced {
                reason: reason.clone(),
            });
            if self.running {
                self.vm.pause()?;
                self.running = false;
            }
            return Ok(Outcome::Fenced { reason });
        }
        if let Some(q) = &self.qmp {
            super::qmp::colo_exit(q, ColoExitReason::from(&reason));
        }
        tracing::warn!(
            %reason,
            checkpoints = self.checkpoints,
            dropped_incomplete_epoch = dropped,
            "FAILOVER: the secondary takes over"
        );
        self.events.emit(&Event::Failover {
            side: Side::Secondary,
            reason: reason.clone(),
            timing: Some(TakeoverTiming {
                lost_unix_us,
                decided_unix_us: unix_us(std::time::SystemTime::now()),
            }),
        });
        self.failover.activate();
        // The SVM is the only VM now: nothing may hold it, and its guest's end is the end.
        self.vm.set_net_pacing(false);
        self.vm.set_hold_exits(false);
        if let Some(d) = &self.disk {
            match d.failover() {
                Ok(st) => tracing::info!(?st, "disk buffer flushed into the secondary disk"),
                Err(e) => tracing::error!(error = %e, "disk failover failed"),
            }
        }
        super::role::announce(&self.vm, &self.params, super::role::RoleWord::Alone);
        self.vm.resume();
        self.running = true;
        self.failover.complete();
        tracing::info!(
            state = ?self.failover.state(),
            path = ?self.failover.path(),
            "failover done"
        );
        Ok(Outcome::TookOver {
            reason,
            checkpoints: self.checkpoints,
            dropped_epoch: dropped,
        })
    }
}
