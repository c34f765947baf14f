//! The Prometheus metrics of a side (`colo primary`, `colo secondary`) and of the proxy,
//! in the registries of the `prometheus-client` crate; [`super::metrics_http`] serves
//! them (`--metrics-listen`).
//!
//! A side's metrics come from two places:
//!
//! - what the side reports anyway: every [`Event`] it emits also reaches
//!   [`SideMetrics::observe`] (through [`Events`](super::event::Events)), so the controller
//!   needs no call of its own for checkpoints, failovers or re-protection; the state
//!   changes at start-up and the secondary's applied checkpoints are the only explicit
//!   calls;
//! - what is read at each scrape: the heartbeat's silence and the disk replication's
//!   figures, through weak references, so a scrape never keeps a link or a disk alive.
//!
//! Every name starts with `colo_`:
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `colo_role{role}` | gauge | 1 for this side's role (`primary`, `secondary`, `proxy`) |
//! | `colo_state{state}` | gauge | 1 for the current [`State`], 0 for the others |
//! | `colo_checkpoints_total{cause}` | counter | primary: committed checkpoints by [`Trigger`] |
//! | `colo_checkpoint_pause_seconds` | histogram | primary: how long the PVM was paused (not for the initial sync) |
//! | `colo_pushed_pages_total` | counter | primary: guest pages pushed (background and pause) |
//! | `colo_pushed_bytes_total` | counter | primary: payload bytes pushed |
//! | `colo_aborted_checkpoints_total` | counter | primary: checkpoints abandoned mid-way |
//! | `colo_vcpu_page_faults_total` | counter | primary: page faults KVM took for the PVM's vCPUs (mostly dirty logging's write-protect faults; where the kernel reports them) |
//! | `colo_vcpu_exits_total` | counter | primary: the PVM's vCPUs' exits from the guest |
//! | `colo_checkpoints_applied_total` | counter | secondary: checkpoints applied to the SVM |
//! | `colo_applied_pages_total` | counter | secondary: pages copied into the SVM |
//! | `colo_failovers_total` | counter | secondary: takeovers; primary: secondaries lost |
//! | `colo_heartbeat_silence_seconds` | gauge | since the peer was last heard (no link: absent) |
//! | `colo_heartbeat_round_trip_seconds` | gauge | the last heartbeat's round trip (no link or no answer yet: absent) |
//! | `colo_disk_*` | gauges, counters | the disk replication (see [`DiskProbe`]) |
//! | `colo_proxy_*` | counters, gauges | the compare proxy (see [`proxy_registry`]) |

use std::sync::{Arc, Mutex, PoisonError, Weak};

use colo_blk::{PrimaryDisk, ReplicationState, SecondaryDisk};
use colo_netcmp::proxy::ProxyControl;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::event::{Event, Side};
use super::link::{Link, SilenceProbe};
use super::metrics::{EpochRecord, Trigger};

/// The pause histogram's buckets, in seconds: up to 100 ms, the checkpoint pauses worth
/// telling apart (anything longer is in `+Inf`).
pub const PAUSE_BUCKETS: [f64; 8] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1];

/// The content type of [`render`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Where a side stands, as `colo_state{state="..."}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Waiting for the peer (the primary before it connects, the secondary before the
    /// primary comes).
    Waiting,
    /// Connected, bringing the secondary in sync (disk, RAM, the first checkpoint).
    Syncing,
    /// COLO runs: checkpoints are taken (primary) or applied (secondary).
    Protected,
    /// The primary lost its secondary and serves alone.
    Unprotected,
    /// The secondary took over: the SVM serves.
    FailedOver,
    /// The secondary lost the primary but its takeover check refused: it stays passive.
    Fenced,
}

impl State {
    /// Every state, in label order.
    pub const ALL: [State; 6] = [
        State::Waiting,
        State::Syncing,
        State::Protected,
        State::Unprotected,
        State::FailedOver,
        State::Fenced,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Syncing => "syncing",
            State::Protected => "protected",
            State::Unprotected => "unprotected",
            State::FailedOver => "failed-over",
            State::Fenced => "fenced",
        }
    }
}

/// The label value of a checkpoint cause.
fn cause_label(t: Trigger) -> &'static str {
    match t {
        Trigger::InitialSync => "initial-sync",
        Trigger::Timer => "timer",
        Trigger::Mismatch => "mismatch",
        Trigger::Threshold => "threshold",
        Trigger::Resync => "resync",
    }
}

/// Every cause, so each counter shows (at 0) from the first scrape on.
const CAUSES: [Trigger; 5] = [
    Trigger::InitialSync,
    Trigger::Timer,
    Trigger::Mismatch,
    Trigger::Threshold,
    Trigger::Resync,
];

/// One label, as `prometheus-client` families take it.
type Label = [(&'static str, &'static str); 1];

/// The metrics of one side, shared (in an `Arc`) between the controller's events and the
/// HTTP server.
#[derive(Debug)]
pub struct SideMetrics {
    registry: Registry,
    state: Family<Label, Gauge>,
    checkpoints: Family<Label, Counter>,
    pause: Histogram,
    pages: Counter,
    bytes: Counter,
    aborted: Counter,
    applied: Counter,
    applied_pages: Counter,
    failovers: Counter,
    /// The PVM's vCPU page faults and exits, raised to each checkpoint's cumulative count.
    vcpu_faults: Cumulative,
    vcpu_exits: Cumulative,
    probes: Arc<Mutex<Probes>>,
}

/// A counter fed cumulative counts (KVM's, since the VM started): each new count raises it
/// by what it grew since the last.
#[derive(Debug, Default, Clone)]
struct Cumulative {
    counter: Counter,
    last: Arc<Mutex<u64>>,
}

impl Cumulative {
    fn observe(&self, count: Option<u64>) {
        let Some(count) = count else {
            return;
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        self.counter.inc_by(count.saturating_sub(*last));
        *last = (*last).max(count);
    }
}

impl SideMetrics {
    /// The metrics of `side`, in state [`State::Waiting`].
    pub fn new(side: Side) -> Self {
        let mut registry = Registry::with_prefix("colo");
        let role = Family::<Label, Gauge>::default();
        role.get_or_create(&[(
            "role",
            match side {
                Side::Primary => "primary",
                Side::Secondary => "secondary",
            },
        )])
        .set(1);
        registry.register("role", "This process's role in the pair (1)", role);
        let state = Family::<Label, Gauge>::default();
        registry.register(
            "state",
            "The COLO state: 1 for the current one, 0 for the others",
            state.clone(),
        );
        let checkpoints = Family::<Label, Counter>::default();
        for c in CAUSES {
            let _ = checkpoints.get_or_create(&[("cause", cause_label(c))]);
        }
        let pause = Histogram::new(PAUSE_BUCKETS);
        let (pages, bytes, aborted) = (Counter::default(), Counter::default(), Counter::default());
        let (applied, applied_pages) = (Counter::default(), Counter::default());
        let failovers = Counter::default();
        let (vcpu_faults, vcpu_exits) = (Cumulative::default(), Cumulative::default());
        match side {
            Side::Primary => {
                registry.register(
                    "vcpu_page_faults",
                    "Page faults KVM took for the PVM's vCPUs (mostly dirty logging's \
                     write-protect faults)",
                    vcpu_faults.counter.clone(),
                );
                registry.register(
                    "vcpu_exits",
                    "The PVM's vCPUs' exits from the guest",
                    vcpu_exits.counter.clone(),
                );
                registry.register(
                    "checkpoints",
                    "Checkpoints committed, by cause",
                    checkpoints.clone(),
                );
                registry.register_with_unit(
                    "checkpoint_pause",
                    "How long the PVM was paused for a committed checkpoint",
                    Unit::Seconds,
                    pause.clone(),
                );
                registry.register(
                    "pushed_pages",
                    "Guest pages pushed to the secondary (background and pause)",
                    pages.clone(),
                );
                registry.register_with_unit(
                    "pushed",
                    "Payload pushed to the secondary",
                    Unit::Bytes,
                    bytes.clone(),
                );
                registry.register(
                    "aborted_checkpoints",
                    "Checkpoints abandoned mid-way (the secondary was lost)",
                    aborted.clone(),
                );
                registry.register(
                    "failovers",
                    "Times the primary lost its secondary and went on alone",
                    failovers.clone(),
                );
            }
            Side::Secondary => {
                registry.register(
                    "checkpoints_applied",
                    "Checkpoints applied to the SVM",
                    applied.clone(),
                );
                registry.register(
                    "applied_pages",
                    "Pages copied from the RAM cache into the SVM",
                    applied_pages.clone(),
                );
                registry.register(
                    "failovers",
                    "Takeovers: the secondary lost the primary and its SVM serves",
                    failovers.clone(),
                );
            }
        }
        let probes = Arc::new(Mutex::new(Probes::default()));
        registry.register_collector(Box::new(ProbeCollector(Arc::clone(&probes))));
        let m = Self {
            registry,
            state,
            checkpoints,
            pause,
            pages,
            bytes,
            aborted,
            applied,
            applied_pages,
            failovers,
            vcpu_faults,
            vcpu_exits,
            probes,
        };
        m.set_state(State::Waiting);
        m
    }

    /// Makes `s` the current state.
    pub fn set_state(&self, s: State) {
        for each in State::ALL {
            self.state
                .get_or_create(&[("state", each.label())])
                .set(i64::from(each == s));
        }
    }

    /// Counts what an event says (the controller emits every event here too).
    pub fn observe(&self, ev: &Event) {
        match ev {
            Event::Checkpoint(rec) => self.checkpoint(rec),
            Event::AbortedPause { .. } => {
                self.aborted.inc();
            }
            Event::Protected => self.set_state(State::Protected),
            Event::Failover { side, .. } => {
                self.failovers.inc();
                self.set_state(match side {
                    Side::Primary => State::Unprotected,
                    Side::Secondary => State::FailedOver,
                });
            }
            Event::Fenced { .. } => self.set_state(State::Fenced),
        }
    }

    /// One committed checkpoint of the primary.
    fn checkpoint(&self, rec: &EpochRecord) {
        self.checkpoints
            .get_or_create(&[("cause", cause_label(rec.trigger))])
            .inc();
        // The initial sync pauses a VM that has not run yet: no guest waits for it, and
        // its full copy would sit past every bucket.
        if rec.trigger != Trigger::InitialSync {
            self.pause.observe(rec.pause_us as f64 / 1e6);
        }
        self.pages.inc_by(rec.pause_pages + rec.background_pages);
        self.bytes.inc_by(rec.bytes);
        self.vcpu_faults.observe(rec.vcpu_faults);
        self.vcpu_exits.observe(rec.vcpu_exits);
        self.set_state(State::Protected);
    }

    /// One checkpoint applied on the secondary, with the pages it copied into the SVM.
    pub fn applied(&self, pages: u64) {
        self.applied.inc();
        self.applied_pages.inc_by(pages);
        self.set_state(State::Protected);
    }

    /// Reads the heartbeat's silence from `link` at each scrape (replacing an older link).
    pub fn watch_link(&self, link: &Link) {
        self.probes().link = Some(link.silence_probe());
    }

    /// Reads the primary's disk replication figures at each scrape.
    pub fn watch_primary_disk(&self, d: &Arc<PrimaryDisk>) {
        self.probes().disk = Some(DiskProbe::Primary(Arc::downgrade(d)));
    }

    /// Reads the secondary's disk buffer figures at each scrape.
    pub fn watch_secondary_disk(&self, d: &Arc<SecondaryDisk>) {
        self.probes().disk = Some(DiskProbe::Secondary(Arc::downgrade(d)));
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, Probes> {
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a side records its metrics with: a cheap clone of the shared [`SideMetrics`], or
/// nothing at all without `--metrics-listen` (every call is then a no-op).
#[derive(Debug, Clone, Default)]
pub struct MetricsHandle(Option<Arc<SideMetrics>>);

impl MetricsHandle {
    /// Records into `m`.
    pub fn new(m: Arc<SideMetrics>) -> Self {
        Self(Some(m))
    }

    /// Records nothing.
    pub fn none() -> Self {
        Self(None)
    }

    /// See [`SideMetrics::set_state`].
    pub fn set_state(&self, s: State) {
        if let Some(m) = &self.0 {
            m.set_state(s);
        }
    }

    /// See [`SideMetrics::observe`].
    pub fn observe(&self, ev: &Event) {
        if let Some(m) = &self.0 {
            m.observe(ev);
        }
    }

    /// See [`SideMetrics::applied`].
    pub fn applied(&self, pages: u64) {
        if let Some(m) = &self.0 {
            m.applied(pages);
        }
    }

    /// See [`SideMetrics::watch_link`].
    pub fn watch_link(&self, link: &Link) {
        if let Some(m) = &self.0 {
            m.watch_link(link);
        }
    }

    /// See [`SideMetrics::watch_primary_disk`].
    pub fn watch_primary_disk(&self, d: &Arc<PrimaryDisk>) {
        if let Some(m) = &self.0 {
            m.watch_primary_disk(d);
        }
    }

    /// See [`SideMetrics::watch_secondary_disk`].
    pub fn watch_secondary_disk(&self, d: &Arc<SecondaryDisk>) {
        if let Some(m) = &self.0 {
            m.watch_secondary_disk(d);
        }
    }
}

/// `registry` in the OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a collector,
    // and then the scrape shows what was written before it.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// A disk whose figures are read at each scrape, without keeping it alive.
///
/// - primary: `colo_disk_replicating` (1 while every write is forwarded),
///   `colo_disk_write_bytes_total` (guest writes), `colo_disk_inflight_bytes` (sent, not
///   yet acknowledged), `colo_disk_secondary_buffer_bytes` (the secondary's buffer as of
///   its last acknowledgement);
/// - secondary: `colo_disk_buffer_bytes` (memory and spill of the disk buffer),
///   `colo_disk_buffer_active_bytes` (the SVM's writes), `colo_disk_buffer_hidden_bytes`
///   (original sectors kept), `colo_disk_applied_write_bytes_total` (the primary's writes
///   applied).
#[derive(Debug, Clone)]
pub enum DiskProbe {
    /// The primary's replicated disk.
    Primary(Weak<PrimaryDisk>),
    /// The secondary's buffered disk.
    Secondary(Weak<SecondaryDisk>),
}

/// What is read at scrape time.
#[derive(Debug, Default)]
struct Probes {
    link: Option<SilenceProbe>,
    disk: Option<DiskProbe>,
}

#[derive(Debug)]
struct ProbeCollector(Arc<Mutex<Probes>>);

/// Writes one gauge.
fn gauge<N>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: N,
) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    // The registry ends the help of what it holds with a full stop: so do these.
    let m = enc.encode_descriptor(name, &format!("{help}."), unit, g.metric_type())?;
    g.encode(m)
}

/// Writes one counter.
fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, &format!("{help}."), unit, c.metric_type())?;
    c.encode(m)
}

impl Collector for ProbeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (link, disk) = {
            let p = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            (p.link.clone(), p.disk.clone())
        };
        if let Some(silence) = link.as_ref().and_then(SilenceProbe::silence) {
            gauge(
                &mut enc,
                "heartbeat_silence",
                "Time since the peer was last heard on the control link (heartbeat or message)",
                Some(&Unit::Seconds),
                silence.as_secs_f64(),
            )?;
        }
        if let Some(rtt) = link.as_ref().and_then(SilenceProbe::round_trip) {
            gauge(
                &mut enc,
                "heartbeat_round_trip",
                "The last heartbeat's round trip on the control link",
                Some(&Unit::Seconds),
                rtt.as_secs_f64(),
            )?;
        }
        match disk {
            Some(DiskProbe::Primary(d)) => {
                if let Some(d) = d.upgrade() {
                    let s = d.stats();
                    gauge(
                        &mut enc,
                        "disk_replicating",
                        "1 while every guest write is forwarded to the secondary",
                        None,
                        i64::from(s.state == ReplicationState::Replicating),
                    )?;
                    counter(
                        &mut enc,
                        "disk_write",
                        "Guest disk writes completed",
                        Some(&Unit::Bytes),
                        s.write_bytes,
                    )?;
                    gauge(
                        &mut enc,
                        "disk_inflight",
                        "Replicated bytes sent and not yet acknowledged",
                        Some(&Unit::Bytes),
                        s.inflight_bytes,
                    )?;
                    gauge(
                        &mut enc,
                        "disk_secondary_buffer",
                        "The secondary's disk buffer, as of its last acknowledgement",
                        Some(&Unit::Bytes),
                        s.secondary_buffered,
                    )?;
                }
            }
            Some(DiskProbe::Secondary(d)) => {
                if let Some(d) = d.upgrade() {
                    let s = d.stats();
                    gauge(
                        &mut enc,
                        "disk_buffer",
                        "The disk buffer's memory and spill file in use",
                        Some(&Unit::Bytes),
                        s.buffer.footprint(),
                    )?;
                    gauge(
                        &mut enc,
                        "disk_buffer_active",
                        "SVM writes held in the disk buffer",
                        Some(&Unit::Bytes),
                        s.buffer.active_bytes,
                    )?;
                    gauge(
                        &mut enc,
                        "disk_buffer_hidden",
                        "Original sectors kept in the disk buffer",
                        Some(&Unit::Bytes),
                        s.buffer.hidden_bytes,
                    )?;
                    counter(
                        &mut enc,
                        "disk_applied_write",
                        "The primary's disk writes applied",
                        Some(&Unit::Bytes),
                        s.write_bytes,
                    )?;
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// A registry of the compare proxy's figures, read from `proxy` at each scrape:
/// `colo_role{role="proxy"}`, `colo_proxy_mismatches_total`,
/// `colo_proxy_compare_timeouts_total`, `colo_proxy_secondary_timeouts_total`,
/// `colo_proxy_queue_overflows_total`, `colo_proxy_overflow_drops_total`,
/// `colo_proxy_checkpoint_requests_total`, `colo_proxy_released_frames_total`,
/// `colo_proxy_released_bytes_total`, `colo_proxy_port_drops_total`,
/// `colo_proxy_connections` and `colo_proxy_queued_events` (frames and commands waiting
/// for the engine thread).
pub fn proxy_registry(proxy: ProxyControl) -> Registry {
    let mut registry = Registry::with_prefix("colo");
    let role = Family::<Label, Gauge>::default();
    role.get_or_create(&[("role", "proxy")]).set(1);
    registry.register("role", "This process's role in the pair (1)", role);
    registry.register_collector(Box::new(ProxyCollector(proxy)));
    registry
}

#[derive(Debug)]
struct ProxyCollector(ProxyControl);

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let m = self.0.metrics();
        let counters = [
            (
                "proxy_mismatches",
                "Primary and secondary output that differed",
                m.mismatches,
            ),
            (
                "proxy_compare_timeouts",
                "Primary packets released after the compare timeout without a secondary counterpart",
                m.compare_timeouts,
            ),
            (
                "proxy_secondary_timeouts",
                "Secondary output with no primary counterpart within the compare timeout",
                m.secondary_timeouts,
            ),
            (
                "proxy_queue_overflows",
                "Times a connection's queue went past its limit (each forces a checkpoint)",
                m.queue_overflows,
            ),
            (
                "proxy_overflow_drops",
                "Packets dropped at four times the queue limit while a checkpoint was pending",
                m.overflow_drops,
            ),
            (
                "proxy_checkpoint_requests",
                "Checkpoint requests sent",
                m.checkpoint_requests,
            ),
            (
                "proxy_released_frames",
                "Frames released to the client",
                m.released_frames,
            ),
            (
                "proxy_released_bytes",
                "Bytes released to the client",
                m.released_bytes,
            ),
            (
                "proxy_port_drops",
                "Frames dropped because a port had no peer or its queue was full",
                m.port_drops,
            ),
        ];
        for (name, help, v) in counters {
            counter(&mut enc, name, help, None, v)?;
        }
        gauge(
            &mut enc,
            "proxy_connections",
            "Connections tracked now",
            None,
            m.connections,
        )?;
        gauge(
            &mut enc,
            "proxy_queued_events",
            "Frames and commands waiting for the proxy's engine thread",
            None,
            self.0.queued_events() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colo::event::ExitReason;
    use crate::colo::link::LostReason;

    fn rec(trigger: Trigger, pause_us: u64) -> EpochRecord {
        EpochRecord {
            epoch: 1,
            at_ms: None,
            trigger,
            pause_us,
            park_us: 0,
            vcpu_stop_us: vec![],
            collect_us: 0,
            push_us: 0,
            barrier_us: 0,
            answer_us: 0,
            release_us: 0,
            pause_pages: 3,
            hot_pages: 0,
            background_pages: 7,
            bytes: 40_960,
            state_bytes: 100,
            vcpu_faults: None,
            vcpu_exits: None,
        }
    }

    /// The value of the sample line that starts with `series` (name and labels).
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn vcpu_counters_rise_by_what_the_cumulative_counts_grew() {
        let m = SideMetrics::new(Side::Primary);
        assert_eq!(sample(&m.render(), "colo_vcpu_page_faults_total"), 0.0);
        for (faults, exits) in [
            (Some(100), Some(1000)),
            (None, None),
            (Some(250), Some(1600)),
        ] {
            let mut r = rec(Trigger::Timer, 1_000);
            r.vcpu_faults = faults;
            r.vcpu_exits = exits;
            m.observe(&Event::Checkpoint(r));
        }
        let t = m.render();
        assert_eq!(sample(&t, "colo_vcpu_page_faults_total"), 250.0);
        assert_eq!(sample(&t, "colo_vcpu_exits_total"), 1600.0);
    }

    #[test]
    fn a_primary_renders_its_checkpoints_by_cause_its_pauses_and_its_state() {
        let m = SideMetrics::new(Side::Primary);
        let t = m.render();
        assert_eq!(sample(&t, r#"colo_state{state="waiting"}"#), 1.0);
        assert_eq!(sample(&t, r#"colo_state{state="protected"}"#), 0.0);
        assert_eq!(sample(&t, r#"colo_role{role="primary"}"#), 1.0);
        assert_eq!(sample(&t, r#"colo_checkpoints_total{cause="timer"}"#), 0.0);
        assert!(t.ends_with("# EOF\n"), "{t}");

        m.set_state(State::Syncing);
        m.observe(&Event::Checkpoint(rec(Trigger::InitialSync, 250_000)));
        m.observe(&Event::Checkpoint(rec(Trigger::Timer, 1_500)));
        m.observe(&Event::Checkpoint(rec(Trigger::Timer, 4_000)));
        m.observe(&Event::Checkpoint(rec(Trigger::Mismatch, 700)));
        m.observe(&Event::AbortedPause { pause_us: 9 });
        let t = m.render();
        assert_eq!(sample(&t, r#"colo_checkpoints_total{cause="timer"}"#), 2.0);
        assert_eq!(
            sample(&t, r#"colo_checkpoints_total{cause="mismatch"}"#),
            1.0
        );
        assert_eq!(
            sample(&t, r#"colo_checkpoints_total{cause="initial-sync"}"#),
            1.0
        );
        assert_eq!(sample(&t, r#"colo_checkpoints_total{cause="resync"}"#), 0.0);
        assert_eq!(sample(&t, "colo_pushed_pages_total"), 40.0);
        assert_eq!(sample(&t, "colo_pushed_bytes_total"), 4.0 * 40_960.0);
        assert_eq!(sample(&t, "colo_aborted_checkpoints_total"), 1.0);
        assert!(
            t.contains("# HELP colo_pushed_pages Guest pages pushed"),
            "{t}"
        );
        // The initial sync (its VM had not run) is no pause; of the others 0.7 ms and
        // 1.5 ms are under 2 ms, 4 ms is not, the 150 ms resync is past every bucket.
        m.observe(&Event::Checkpoint(rec(Trigger::Resync, 150_000)));
        let t = m.render();
        assert_eq!(sample(&t, r#"colo_checkpoints_total{cause="resync"}"#), 1.0);
        assert_eq!(sample(&t, "colo_checkpoint_pause_seconds_count"), 4.0);
        assert_eq!(
            sample(&t, r#"colo_checkpoint_pause_seconds_bucket{le="0.002"}"#),
            2.0
        );
        assert_eq!(
            sample(&t, r#"colo_checkpoint_pause_seconds_bucket{le="0.005"}"#),
            3.0
        );
        assert_eq!(
            sample(&t, r#"colo_checkpoint_pause_seconds_bucket{le="0.1"}"#),
            3.0
        );
        assert_eq!(
            sample(&t, r#"colo_checkpoint_pause_seconds_bucket{le="+Inf"}"#),
            4.0
        );
        assert_eq!(sample(&t, r#"colo_state{state="protected"}"#), 1.0);
        assert_eq!(sample(&t, r#"colo_state{state="syncing"}"#), 0.0);
        assert!(
            t.contains("# TYPE colo_checkpoint_pause_seconds histogram"),
            "{t}"
        );
        assert!(
            t.contains("# UNIT colo_checkpoint_pause_seconds seconds"),
            "{t}"
        );
        // The secondary's families are not the primary's.
        assert!(!t.contains("colo_checkpoints_applied"), "{t}");

        m.observe(&Event::Failover {
            side: Side::Primary,
            reason: ExitReason::PeerLost {
                lost: LostReason::Closed,
            },
            timing: None,
        });
        let t = m.render();
        assert_eq!(sample(&t, r#"colo_state{state="unprotected"}"#), 1.0);
        assert_eq!(sample(&t, r#"colo_state{state="protected"}"#), 0.0);
        assert_eq!(sample(&t, "colo_failovers_total"), 1.0);
        m.observe(&Event::Protected);
        assert_eq!(sample(&m.render(), r#"colo_state{state="protected"}"#), 1.0);
    }

    #[test]
    fn a_secondary_renders_applied_checkpoints_and_its_takeover() {
        let m = SideMetrics::new(Side::Secondary);
        m.applied(100);
        m.applied(5);
        let t = m.render();
        assert_eq!(sample(&t, r#"colo_role{role="secondary"}"#), 1.0);
        assert_eq!(sample(&t, "colo_checkpoints_applied_total"), 2.0);
        assert_eq!(sample(&t, "colo_applied_pages_total"), 105.0);
        assert_eq!(sample(&t, r#"colo_state{state="protected"}"#), 1.0);
        assert_eq!(sample(&t, "colo_failovers_total"), 0.0);
        assert!(!t.contains("colo_checkpoint_pause"), "{t}");
        m.observe(&Event::Failover {
            side: Side::Secondary,
            reason: ExitReason::PeerLost {
                lost: LostReason::Closed,
            },
            timing: None,
        });
        let t = m.render();
        assert_eq!(sample(&t, r#"colo_state{state="failed-over"}"#), 1.0);
        assert_eq!(sample(&t, "colo_failovers_total"), 1.0);
        m.observe(&Event::Fenced {
            reason: ExitReason::PeerLost {
                lost: LostReason::Closed,
            },
        });
        assert_eq!(sample(&m.render(), r#"colo_state{state="fenced"}"#), 1.0);
    }

    #[test]
    fn a_disk_is_read_at_each_scrape_and_never_kept_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let backend = colo_blk::Disk::open(&path).unwrap();
        let d = Arc::new(SecondaryDisk::new(
            backend,
            colo_blk::BufferOptions::default(),
        ));
        let m = SideMetrics::new(Side::Secondary);
        m.watch_secondary_disk(&d);
        let t = m.render();
        assert_eq!(sample(&t, "colo_disk_buffer_bytes"), 0.0);
        assert_eq!(sample(&t, "colo_disk_applied_write_bytes_total"), 0.0);
        drop(d);
        assert!(!m.render().contains("colo_disk_buffer"));
    }
}
