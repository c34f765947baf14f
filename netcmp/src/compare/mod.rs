//! The compare engine: connection tracking, compare, release, checkpoint requests.
//!
//! [`Engine`] does no I/O and keeps no clock: every call takes the frame and the current
//! time and appends what must happen to an [`Output`]. The threaded proxy
//! ([`crate::proxy`]) drives it from its ports; the VMM can drive it directly.
//!
//! ```text
//!  client ──frame──> client_frame() ──> to_primary, to_secondary (acks translated)
//!  primary ─frame──> primary_frame() ─┐
//!  secondary frame─> secondary_frame()┴─ compare ─ same ──────> to_client
//!                                                └ different ─> checkpoint_requests,
//!                                                               hold until
//!  controller ─────> checkpoint_committed() ──────────────────> to_client (held), reset
//!  timer ──────────> poll() ── compare_timeout ───────────────> to_client + request
//! ```

mod ctx;
mod datagram;
mod output;
pub(crate) mod seq;
mod stream;
mod tcp;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use self::ctx::{Ctx, Handling};
use self::datagram::DatagramState;
pub use self::output::{CheckpointReason, CheckpointRequest, Output};
use self::tcp::TcpState;
use crate::config::{Config, MalformedPolicy};
use crate::error::Result;
use crate::flow::{FlowKey, Protocol, Side};
use crate::metrics::Metrics;
use crate::ratelimit::LogLimit;
use crate::wire::{self, Deltas, Parsed, Payload, rewrite_tcp};

/// Whom the proxy protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// COLO: both VMs run, their output is compared.
    #[default]
    Compare,
    /// The secondary is lost: client traffic goes to the primary only and its output is
    /// released at once.
    PrimaryOnly,
    /// Failover: the secondary took over. Client traffic goes to it only (acks translated
    /// into its sequence space) and its output goes to the client with its sequence
    /// numbers rewritten into the primary's, so open connections carry on.
    SecondaryOnly,
    /// Periodic checkpointing (Remus style): the secondary VM does not run. Client
    /// traffic goes to the primary only; the primary's output is held, in order, until
    /// the next [`Engine::checkpoint_committed`] (the checkpoint that covers it), then
    /// released. Nothing is compared.
    Periodic,
}

/// One tracked connection.
#[derive(Debug)]
struct Conn {
    state: ConnState,
    passthrough: bool,
    /// The outputs differed: held until a checkpoint commits.
    diverged: bool,
    last_seen: Instant,
}

#[derive(Debug)]
enum ConnState {
    Tcp(Box<TcpState>),
    Datagram(DatagramState),
}

impl Conn {
    fn handling(&self) -> Handling {
        if self.passthrough {
            Handling::Pass
        } else if self.diverged {
            Handling::Hold
        } else {
            Handling::Compare
        }
    }

    fn is_idle(&self) -> bool {
        match &self.state {
            ConnState::Tcp(t) => t.is_idle(),
            ConnState::Datagram(d) => d.is_idle(),
        }
    }

    fn held_len(&self) -> usize {
        match &self.state {
            ConnState::Tcp(t) => t.held_len(),
            ConnState::Datagram(d) => d.held_len(),
        }
    }

    fn tcp_translation(&self) -> Option<(u32, u32)> {
        match &self.state {
            ConnState::Tcp(t) => t.translation(),
            ConnState::Datagram(_) => None,
        }
    }
}

/// The compare engine. See the [module docs](self).
///
/// ```
/// use std::time::Instant;
/// use colo_netcmp::{Config, Engine, Output};
///
/// let mut engine = Engine::new(Config::default())?;
/// let mut out = Output::default();
/// // An ARP reply, the same from both VMs: released as soon as both are in.
/// let arp = colo_netcmp::testing::arp_reply();
/// engine.primary_frame(arp.clone(), Instant::now(), &mut out);
/// assert!(out.to_client.is_empty());
/// engine.secondary_frame(arp.clone(), Instant::now(), &mut out);
/// assert_eq!(out.to_client, vec![arp]);
/// assert!(out.checkpoint_requests.is_empty());
/// # Ok::<(), colo_netcmp::Error>(())
/// ```
#[derive(Debug)]
pub struct Engine {
    config: Config,
    conns: HashMap<FlowKey, Conn>,
    metrics: Arc<Metrics>,
    mode: Mode,
    pending: bool,
    next_scan: Option<Instant>,
    /// The secondary was asked to hold ([`Config::secondary_lead`]).
    secondary_held: bool,
    /// When to look at the secondary's lead again; `None` while nothing of it waits.
    next_pace: Option<Instant>,
    log_malformed: LogLimit,
    log_trigger: LogLimit,
    /// Periodic mode: the primary's output waiting for the checkpoint that covers it.
    periodic_held: std::collections::VecDeque<Vec<u8>>,
}

/// Periodic mode: frames held past this many ask for a checkpoint now.
const PERIODIC_EARLY_CHECKPOINT: usize = 4096;

impl Engine {
    /// An engine with `config`.
    ///
    /// # Errors
    /// [`crate::Error::Config`] when the configuration does not validate.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            conns: HashMap::new(),
            metrics: Arc::new(Metrics::default()),
            mode: Mode::Compare,
            pending: false,
            next_scan: None,
            secondary_held: false,
            next_pace: None,
            log_malformed: LogLimit::new(5),
            log_trigger: LogLimit::new(5),
            periodic_held: std::collections::VecDeque::new(),
        })
    }

    /// The counters (shared: clone the `Arc` to read them from another thread).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether a checkpoint request is outstanding.
    pub fn checkpoint_pending(&self) -> bool {
        self.pending
    }

    /// Connections tracked.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Primary frames held, over all connections.
    pub fn held_frames(&self) -> usize {
        self.conns.values().map(Conn::held_len).sum::<usize>() + self.periodic_held.len()
    }

    fn ctx<'a>(
        metrics: &'a Metrics,
        config: &Config,
        out: &'a mut Output,
        now: Instant,
    ) -> Ctx<'a> {
        Ctx {
            m: metrics,
            out,
            max_queue: config.max_queue_size,
            now,
        }
    }

    /// Counts and logs a frame that did not parse; says whether policy forwards it.
    fn malformed(&mut self, side: Side, why: &wire::Malformed, len: usize, now: Instant) -> bool {
        Metrics::inc(&self.metrics.malformed_frames);
        if let Some(suppressed) = self.log_malformed.allow(now) {
            debug!(%side, len, %why, suppressed, "malformed frame");
        }
        let forward = self.config.malformed == MalformedPolicy::Forward;
        if !forward {
            Metrics::inc(&self.metrics.malformed_dropped);
        }
        forward
    }

    /// A frame from the client: mirrored to both VMs (in compare mode), with the TCP
    /// acknowledgment numbers of the secondary's copy translated into its sequence space.
    pub fn client_frame(&mut self, frame: Vec<u8>, now: Instant, out: &mut Output) {
        Metrics::inc(&self.metrics.client_frames);
        let parsed = match wire::parse(&frame) {
            Ok(p) => p,
            Err(why) => {
                // An empty or one-byte frame is never passed on: on a VM's socket it would
                // mean a commit marker or a pacing word, and a VM's socket ends at an empty
                // one.
                if self.malformed(Side::Client, &why, frame.len(), now) {
                    if frame.len() > crate::framing::PACE_HOLD.len() {
                        self.mirror(frame, None, out);
                    } else {
                        Metrics::inc(&self.metrics.malformed_dropped);
                    }
                }
                return;
            }
        };
        let mut offset = None;
        if let Some(seg) = parsed.tcp() {
            let key = parsed.ingress_key();
            let stale = match self.conns.get_mut(&key) {
                Some(conn) => {
                    conn.last_seen = now;
                    match &mut conn.state {
                        ConnState::Tcp(t) => {
                            let stale =
                                seg.flags.syn && !seg.flags.ack && t.is_closed() && t.is_idle();
                            t.client_segment(seg.flags);
                            offset = t.translation();
                            stale
                        }
                        ConnState::Datagram(_) => false,
                    }
                }
                None => false,
            };
            if stale {
                // A new connection reuses the 5-tuple of a closed one.
                self.conns.remove(&key);
                offset = None;
                Metrics::inc(&self.metrics.connections_expired);
            }
            if offset.is_none() && seg.flags.ack {
                Metrics::inc(&self.metrics.untranslated_acks);
            }
        }
        self.mirror(frame, offset.filter(|_| parsed.tcp().is_some()), out);
    }

    /// Sends a client frame on according to the mode; `offset` is the connection's TCP
    /// (sequence, timestamp) translation when the frame is TCP and it is known.
    fn mirror(&mut self, frame: Vec<u8>, offset: Option<(u32, u32)>, out: &mut Output) {
        let for_secondary = |m: &Metrics, f: &[u8]| {
            let mut copy = f.to_vec();
            if let Some((seq, ts)) = offset.filter(|o| *o != (0, 0)) {
                let d = Deltas {
                    ack: seq.wrapping_neg(),
                    tsecr: ts.wrapping_neg(),
                    ..Deltas::default()
                };
                match rewrite_tcp(&mut copy, d) {
                    Ok(r) => {
                        Metrics::inc(&m.ack_translations);
                        if r.options_untranslated {
                            Metrics::inc(&m.options_untranslated);
                        }
                    }
                    Err(_) => Metrics::inc(&m.untranslated_acks),
                }
            }
            copy
        };
        match self.mode {
            Mode::Compare => {
                Metrics::inc(&self.metrics.mirrored_frames);
                out.to_secondary.push(for_secondary(&self.metrics, &frame));
                out.to_primary.push(frame);
            }
            Mode::PrimaryOnly | Mode::Periodic => out.to_primary.push(frame),
            Mode::SecondaryOnly => out.to_secondary.push(for_secondary(&self.metrics, &frame)),
        }
    }

    /// A frame the primary VM sent.
    pub fn primary_frame(&mut self, frame: Vec<u8>, now: Instant, out: &mut Output) {
        Metrics::inc(&self.metrics.primary_frames);
        match self.mode {
            Mode::Compare => {}
            Mode::PrimaryOnly => {
                Metrics::inc(&self.metrics.unprotected_frames);
                Self::ctx(&self.metrics, &self.config, out, now).release(frame);
                return;
            }
            Mode::SecondaryOnly => {
                Metrics::inc(&self.metrics.discarded_frames);
                return;
            }
            Mode::Periodic => {
                self.periodic_held.push_back(frame);
                if self.periodic_held.len() >= PERIODIC_EARLY_CHECKPOINT && !self.pending {
                    self.trigger(None, CheckpointReason::QueueOverflow, now, out);
                }
                return;
            }
        }
        let parsed = match wire::parse(&frame) {
            Ok(p) => p,
            Err(why) => {
                if self.malformed(Side::Primary, &why, frame.len(), now) {
                    Self::ctx(&self.metrics, &self.config, out, now).release(frame);
                }
                return;
            }
        };
        let key = parsed.egress_key();
        if !self.room_for(&key, now) {
            Self::ctx(&self.metrics, &self.config, out, now).release(frame);
            self.trigger(None, CheckpointReason::ConnectionTableFull, now, out);
            return;
        }
        let conn = Self::conn_mut(
            &mut self.conns,
            &self.config,
            &self.metrics,
            key,
            &parsed,
            now,
        );
        let how = conn.handling();
        let mut ctx = Self::ctx(&self.metrics, &self.config, out, now);
        let mut secondary_waits = false;
        let r = match (&mut conn.state, &parsed.payload) {
            (ConnState::Tcp(t), Payload::Tcp(seg)) => {
                let r = t.primary(seg, frame, how, &mut ctx);
                // Learning the offset replays the secondary's early segments into its
                // queue.
                secondary_waits = t.oldest_secondary().is_some();
                r
            }
            (ConnState::Datagram(d), Payload::Datagram { compare, tag }) => {
                d.primary(frame, compare.clone(), *tag, how, &mut ctx)
            }
            // A TCP segment and a TCP fragment can share a key (ports zero); such a
            // frame is not compared.
            _ => {
                ctx.release(frame);
                None
            }
        };
        if let Some(reason) = r {
            self.trigger(Some(key), reason, now, out);
        }
        if secondary_waits {
            self.schedule_pace(now);
        }
    }

    /// A frame the secondary VM sent.
    pub fn secondary_frame(&mut self, frame: Vec<u8>, now: Instant, out: &mut Output) {
        Metrics::inc(&self.metrics.secondary_frames);
        match self.mode {
            Mode::Compare => {}
            Mode::PrimaryOnly | Mode::Periodic => {
                Metrics::inc(&self.metrics.discarded_frames);
                return;
            }
            Mode::SecondaryOnly => {
                self.failover_release(frame, now, out);
                return;
            }
        }
        let parsed = match wire::parse(&frame) {
            Ok(p) => p,
            Err(why) => {
                // The secondary's output never reaches the client, whatever the policy.
                self.malformed(Side::Secondary, &why, frame.len(), now);
                return;
            }
        };
        let key = parsed.egress_key();
        if !self.room_for(&key, now) {
            self.trigger(None, CheckpointReason::ConnectionTableFull, now, out);
            return;
        }
        let conn = Self::conn_mut(
            &mut self.conns,
            &self.config,
            &self.metrics,
            key,
            &parsed,
            now,
        );
        let how = conn.handling();
        let mut ctx = Self::ctx(&self.metrics, &self.config, out, now);
        let r = match (&mut conn.state, &parsed.payload) {
            (ConnState::Tcp(t), Payload::Tcp(seg)) => t.secondary(seg, frame, how, &mut ctx),
            (ConnState::Datagram(d), Payload::Datagram { compare, tag }) => {
                d.secondary(frame, compare.clone(), *tag, how, &mut ctx)
            }
            _ => None,
        };
        if let Some(reason) = r {
            self.trigger(Some(key), reason, now, out);
        }
        self.schedule_pace(now);
    }

    /// Failover: the secondary's frame goes to the client, TCP sequence numbers rewritten
    /// into the primary's space for connections that began before the failover.
    fn failover_release(&mut self, mut frame: Vec<u8>, now: Instant, out: &mut Output) {
        let parsed = wire::parse(&frame);
        if let Ok(p) = &parsed
            && p.tcp().is_some()
            && let Some(conn) = self.conns.get_mut(&p.egress_key())
        {
            conn.last_seen = now;
            if let Some((seq, tsval)) = conn.tcp_translation().filter(|o| *o != (0, 0))
                && rewrite_tcp(
                    &mut frame,
                    Deltas {
                        seq,
                        tsval,
                        ..Deltas::default()
                    },
                )
                .is_ok()
            {
                Metrics::inc(&self.metrics.seq_rewrites);
            }
        }
        if let Err(why) = &parsed
            && !self.malformed(Side::Secondary, why, frame.len(), now)
        {
            return;
        }
        Self::ctx(&self.metrics, &self.config, out, now).release(frame);
    }

    /// Makes room for a new connection when the table is full (evicting idle ones); false
    /// when `key` is new and there is still no room.
    fn room_for(&mut self, key: &FlowKey, now: Instant) -> bool {
        if self.conns.len() < self.config.max_connections || self.conns.contains_key(key) {
            return true;
        }
        self.evict(now, true);
        if self.conns.len() < self.config.max_connections {
            return true;
        }
        Metrics::inc(&self.metrics.connection_table_full);
        false
    }

    /// The connection of `key`, created if new (or replaced, when a SYN reuses the 5-tuple
    /// of a closed one), marked as seen now. One hash lookup; call
    /// [`room_for`](Self::room_for) first.
    fn conn_mut<'a>(
        conns: &'a mut HashMap<FlowKey, Conn>,
        config: &Config,
        m: &Metrics,
        key: FlowKey,
        parsed: &Parsed,
        now: Instant,
    ) -> &'a mut Conn {
        let tcp_syn = parsed.tcp().map(|s| s.flags.syn && !s.flags.rst);
        let fresh = || {
            Metrics::inc(&m.connections_created);
            let state = if key.protocol == Protocol::Tcp && tcp_syn.is_some() {
                ConnState::Tcp(Box::default())
            } else {
                ConnState::Datagram(DatagramState::default())
            };
            Conn {
                state,
                passthrough: config.passthrough.iter().any(|r| r.matches(&key)),
                diverged: false,
                last_seen: now,
            }
        };
        let before = conns.len();
        let conn = match conns.entry(key) {
            Entry::Occupied(o) => {
                let c = o.into_mut();
                if let ConnState::Tcp(t) = &c.state
                    && tcp_syn == Some(true)
                    && t.is_closed()
                    && t.is_idle()
                {
                    Metrics::inc(&m.connections_expired);
                    *c = fresh();
                }
                c
            }
            Entry::Vacant(v) => {
                Metrics::set(&m.connections, before as u64 + 1);
                v.insert(fresh())
            }
        };
        conn.last_seen = now;
        conn
    }

    /// Forgets idle connections: those past their idle timeout, or (with `closed_now`)
    /// every closed TCP connection with nothing queued.
    fn evict(&mut self, now: Instant, closed_now: bool) {
        let (tcp_idle, flow_idle) = (self.config.tcp_idle_timeout, self.config.flow_idle_timeout);
        let before = self.conns.len();
        self.conns.retain(|_, c| {
            if !c.is_idle() {
                return true;
            }
            let idle = now.saturating_duration_since(c.last_seen);
            match &c.state {
                ConnState::Tcp(t) if t.is_closed() => !closed_now && idle < flow_idle,
                ConnState::Tcp(_) => idle < tcp_idle,
                ConnState::Datagram(_) => !closed_now && idle < flow_idle,
            }
        });
        let gone = before - self.conns.len();
        if gone > 0 {
            Metrics::add(&self.metrics.connections_expired, gone as u64);
            Metrics::set(&self.metrics.connections, self.conns.len() as u64);
        }
    }

    /// Something calls for a checkpoint: counts it, holds a connection whose outputs
    /// differed, and sends a request unless one is outstanding.
    fn trigger(
        &mut self,
        key: Option<FlowKey>,
        reason: CheckpointReason,
        now: Instant,
        out: &mut Output,
    ) {
        Metrics::inc(&self.metrics.checkpoint_triggers);
        let mismatch = matches!(
            reason,
            CheckpointReason::PayloadDiffers { .. } | CheckpointReason::ControlDiffers(_)
        );
        if mismatch {
            Metrics::inc(&self.metrics.mismatches);
            if let Some(c) = key.and_then(|k| self.conns.get_mut(&k)) {
                c.diverged = true;
            }
        }
        let req = CheckpointRequest { reason, flow: key };
        if let Some(suppressed) = self.log_trigger.allow(now) {
            if self.pending {
                debug!(%req, suppressed, "checkpoint already requested");
            } else {
                warn!(%req, suppressed, "requesting a checkpoint");
            }
        }
        if !self.pending {
            self.pending = true;
            Metrics::inc(&self.metrics.checkpoint_requests);
            out.checkpoint_requests.push(req);
        }
    }

    /// When [`poll`](Self::poll) next has work: the next expired-packet scan, or the next
    /// look at the secondary's lead.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_scan, self.next_pace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the secondary is being held ([`Config::secondary_lead`]).
    pub fn secondary_held(&self) -> bool {
        self.secondary_held
    }

    /// How often the secondary's lead is looked at while it has output waiting.
    fn pace_cycle(lead: Duration) -> Duration {
        (lead / 4).clamp(Duration::from_millis(1), Duration::from_millis(50))
    }

    /// Paces the secondary ([`Config::secondary_lead`]): asks it to hold once its oldest
    /// TCP output not yet compared is older than the lead, and to go on once that is
    /// younger than half the lead (hysteresis, so that it has output ready when the
    /// primary catches up) or gone. Outside compare mode it is never held.
    fn pace(&mut self, now: Instant, out: &mut Output) {
        let Some(lead) = self.config.secondary_lead else {
            return;
        };
        // Looks are scheduled only while something of the secondary waits (or it is held):
        // with nothing scheduled there is nothing to look at, and no table walk per frame.
        if self.next_pace.is_none_or(|t| now < t) {
            return;
        }
        let oldest = if self.mode == Mode::Compare {
            self.conns
                .values()
                .filter(|c| c.handling() == Handling::Compare)
                .filter_map(|c| match &c.state {
                    ConnState::Tcp(t) => t.oldest_secondary(),
                    ConnState::Datagram(_) => None,
                })
                .min()
        } else {
            None
        };
        let limit = if self.secondary_held { lead / 2 } else { lead };
        let hold = oldest.is_some_and(|t| now.saturating_duration_since(t) > limit);
        self.next_pace = (hold || oldest.is_some()).then(|| now + Self::pace_cycle(lead));
        if hold != self.secondary_held {
            self.secondary_held = hold;
            if hold {
                Metrics::inc(&self.metrics.secondary_holds);
                out.to_secondary.push(crate::framing::PACE_HOLD.to_vec());
            } else {
                out.to_secondary.push(crate::framing::PACE_GO.to_vec());
            }
        }
    }

    /// Schedules a look at the secondary's lead one cycle from now, unless one is due
    /// sooner: secondary output may have started to wait.
    fn schedule_pace(&mut self, now: Instant) {
        if self.next_pace.is_none()
            && let Some(lead) = self.config.secondary_lead
        {
            self.next_pace = Some(now + Self::pace_cycle(lead));
        }
    }

    /// Makes the next [`poll`](Self::poll) look at the secondary's lead.
    fn pace_now(&mut self, now: Instant) {
        if self.config.secondary_lead.is_some() {
            self.next_pace = Some(now);
        }
    }

    /// Looks at the secondary's lead when due ([`Config::secondary_lead`]), and runs the
    /// expired-packet scan if its cycle has come (the first call only schedules it):
    /// primary packets older than `compare_timeout` are released and a checkpoint
    /// requested; secondary output that old is forgotten and a checkpoint requested; idle
    /// connections are forgotten.
    pub fn poll(&mut self, now: Instant, out: &mut Output) {
        self.pace(now, out);
        match self.next_scan {
            None => {
                self.next_scan = Some(now + self.config.expired_scan_cycle);
                return;
            }
            Some(t) if now < t => return,
            Some(_) => {}
        }
        self.next_scan = Some(now + self.config.expired_scan_cycle);
        self.scan(now, out);
    }

    /// The expired-packet scan itself, now.
    pub fn scan(&mut self, now: Instant, out: &mut Output) {
        Metrics::inc(&self.metrics.expired_scans);
        if self.mode == Mode::Compare
            && let Some(deadline) = now.checked_sub(self.config.compare_timeout)
        {
            let mut triggers = Vec::new();
            let mut ctx = Self::ctx(&self.metrics, &self.config, out, now);
            for (key, conn) in &mut self.conns {
                if conn.handling() != Handling::Compare {
                    continue;
                }
                let r = match &mut conn.state {
                    ConnState::Tcp(t) => t.expire(deadline, &mut ctx),
                    ConnState::Datagram(d) => d.expire(deadline, &mut ctx),
                };
                if let Some(r) = r {
                    triggers.push((*key, r));
                }
            }
            for (key, r) in triggers {
                self.trigger(Some(key), r, now, out);
            }
        }
        self.evict(now, false);
    }

    /// The controller reports that a checkpoint committed: the secondary is now a copy of
    /// the primary. Every held primary frame is released, every connection's compare
    /// state is reset to the primary's (TCP sequence offsets become zero), and a new
    /// checkpoint request may be sent.
    ///
    /// Call it once every frame the primary produced before the checkpoint has been fed.
    pub fn checkpoint_committed(&mut self, now: Instant, out: &mut Output) {
        Metrics::inc(&self.metrics.checkpoints_committed);
        let held = self.held_frames();
        let mut ctx = Self::ctx(&self.metrics, &self.config, out, now);
        for f in self.periodic_held.drain(..) {
            ctx.release(f);
        }
        for conn in self.conns.values_mut() {
            match &mut conn.state {
                ConnState::Tcp(t) => t.commit(&mut ctx),
                ConnState::Datagram(d) => d.commit(&mut ctx),
            }
            conn.diverged = false;
        }
        self.pending = false;
        self.pace_now(now);
        tracing::debug!(released = held, "checkpoint committed");
    }

    /// Starts afresh in `mode`, for a proxy whose primary changed (cluster mode: another VM
    /// serves now, from the last checkpoint, so nothing the old one sent that no commit
    /// covered may go out): every held frame is dropped and counted in
    /// `discarded_frames`, every connection is forgotten, no checkpoint request is
    /// outstanding. A held secondary is let go at the next [`poll`](Self::poll) (outside
    /// compare mode nothing is paced). Returns the frames dropped.
    pub fn reset(&mut self, mode: Mode, now: Instant) -> usize {
        let dropped = self.held_frames();
        self.periodic_held.clear();
        self.conns.clear();
        Metrics::set(&self.metrics.connections, 0);
        Metrics::add(&self.metrics.discarded_frames, dropped as u64);
        self.pending = false;
        if mode != self.mode {
            info!(from = ?self.mode, to = ?mode, "proxy mode (reset)");
        }
        self.mode = mode;
        self.pace_now(now);
        dropped
    }

    /// Changes the mode (see [`Mode`]).
    ///
    /// - To `PrimaryOnly`: held primary frames are released.
    /// - To `SecondaryOnly` (failover): held primary frames are dropped; TCP state stays,
    ///   so that open connections keep being translated; the secondary's frames whose
    ///   bytes were not compared yet go to the client now (translated), as the secondary
    ///   that serves already sent them.
    /// - Back to `Compare` (a new secondary): the connection table starts afresh; the
    ///   controller then takes a checkpoint and calls
    ///   [`checkpoint_committed`](Self::checkpoint_committed).
    pub fn set_mode(&mut self, mode: Mode, now: Instant, out: &mut Output) {
        if mode == self.mode {
            return;
        }
        info!(from = ?self.mode, to = ?mode, "proxy mode");
        // Failover: what the secondary sent that the client has not had yet.
        let mut resend = Vec::new();
        let mut ctx = Self::ctx(&self.metrics, &self.config, out, now);
        match mode {
            Mode::PrimaryOnly => {
                for conn in self.conns.values_mut() {
                    match &mut conn.state {
                        ConnState::Tcp(t) => t.stop_comparing(&mut ctx),
                        ConnState::Datagram(d) => d.commit(&mut ctx),
                    }
                }
                self.pending = false;
            }
            Mode::SecondaryOnly => {
                let mut dropped = 0;
                for conn in self.conns.values_mut() {
                    dropped += match &mut conn.state {
                        ConnState::Tcp(t) => {
                            let (n, frames) = t.drop_held();
                            resend.extend(frames);
                            n
                        }
                        ConnState::Datagram(d) => d.drop_held(),
                    };
                }
                Metrics::add(&self.metrics.discarded_frames, dropped as u64);
                self.pending = false;
            }
            Mode::Compare | Mode::Periodic => {
                self.conns.clear();
                Metrics::set(&self.metrics.connections, 0);
            }
        }
        if self.mode == Mode::Periodic && mode != Mode::Periodic {
            // Leaving periodic mode: what the primary sent is released (to primary-only)
            // or dropped (failover: the secondary continues from the last checkpoint).
            let held: Vec<Vec<u8>> = self.periodic_held.drain(..).collect();
            if mode == Mode::PrimaryOnly {
                let mut ctx = Self::ctx(&self.metrics, &self.config, out, now);
                for f in held {
                    ctx.release(f);
                }
            } else {
                Metrics::add(&self.metrics.discarded_frames, held.len() as u64);
            }
        }
        self.mode = mode;
        if !resend.is_empty() {
            info!(
                frames = resend.len(),
                "failover: the secondary's output the client had not had goes out now"
            );
        }
        for f in resend {
            self.failover_release(f, now, out);
        }
        self.pace_now(now);
    }
}

#[cfg(test)]
mod tests;
