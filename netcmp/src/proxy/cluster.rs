//! Cluster mode (`colo proxy --cluster`): two VM ports named by place, not by role, for a
//! pair whose sides a cluster manager starts, promotes and restarts. Which VM serves the
//! clients is decided at run time from the role words each VMM writes on its socket
//! ([`RoleWord`], `colo primary|secondary --role-words`), in order with its VM's frames:
//!
//! ```text
//!  VM port 0 ──reader──┐  frames, markers, words,  ┌──> client port (released output)
//!  VM port 1 ──reader──┼─> disconnections ─> engine ┤
//!  client port reader──┘                    thread  └──> the serving VM port (client input)
//! ```
//!
//! - `Follower`: the port's VM is a secondary; nothing it sends reaches the clients.
//! - `Protected`: the port serves; its output is held until its next commit marker (the
//!   engine in [`Mode::Periodic`]).
//! - `Alone`: the port serves unprotected; its output is released at once
//!   ([`Mode::PrimaryOnly`]).
//!
//! A port that says `Protected` or `Alone` while the other serves (a takeover) becomes the
//! serving port: the engine starts afresh ([`Engine::reset`]), so the old serving port's
//! output that no marker covered is dropped (its epoch died with it), and the old port
//! has no role until it says a word again. A port whose peer leaves loses its role; when
//! it served, its uncovered output is dropped the same way and no VM serves until one says
//! so. Nothing from a port that has said no word, or said `Follower`, reaches the clients,
//! and client frames go to the serving port only (dropped while none serves: the client's
//! TCP sends them again). Only periodic checkpointing is supported: a follower gets no
//! client traffic, so no output is compared.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{debug, error, info, warn};

use super::{EVENT_QUEUE, Event, ProxyControl, READ_SLICE, Running, forward, send_frames};
use crate::compare::{Engine, Mode, Output};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flow::Side;
use crate::framing::{FromVm, RoleWord};
use crate::io::{FrameReader, FrameWriter, Port, Recv};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::ratelimit::LogLimit;

/// What a VM port's reader hands the engine thread.
pub(super) enum VmEvent {
    /// A frame of the guest.
    Frame(Vec<u8>),
    /// The commit marker (an empty frame).
    Marker,
    /// A role word.
    Word(RoleWord),
    /// A one-byte frame that names no word.
    BadWord(u8),
    /// The peer left (a listening port accepts the next one) or the port closed.
    Gone,
}

/// The ports of a proxy in cluster mode.
#[derive(Debug)]
pub struct ClusterPorts {
    /// Towards the client network.
    pub client: Port,
    /// The two VM ports, by place (in the order of `--vm`); listening sockets, so that a
    /// restarted side connects again.
    pub vms: [Port; 2],
}

/// The roles as the proxy sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles {
    /// The last word of each VM port's current peer (`None`: none yet, or its peer left).
    pub words: [Option<RoleWord>; 2],
    /// The VM port whose output goes to the clients.
    pub serving: Option<usize>,
}

/// A proxy in cluster mode; see the [module docs](self).
///
/// ```no_run
/// use colo_netcmp::io::{Port, PortSpec};
/// use colo_netcmp::proxy::{ClusterPorts, ClusterProxy};
///
/// let ports = ClusterPorts {
///     client: Port::open(&"tap:colo-c".parse()?)?,
///     vms: [
///         Port::open(&"unix-listen:/run/colo/a.sock".parse()?)?,
///         Port::open(&"unix-listen:/run/colo/b.sock".parse()?)?,
///     ],
/// };
/// let proxy = ClusterProxy::start(colo_netcmp::Config::default(), ports)?;
/// println!("serving: {:?}", proxy.roles().serving);
/// # Ok::<(), colo_netcmp::Error>(())
/// ```
pub struct ClusterProxy {
    running: Running,
    roles: Arc<Mutex<Roles>>,
}

impl std::fmt::Debug for ClusterProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterProxy")
            .field("roles", &self.roles())
            .finish_non_exhaustive()
    }
}

impl ClusterProxy {
    /// Starts the proxy on `ports`. `config.commit_marker` is implied (an empty frame from
    /// a VM is always its commit marker here); the engine starts in periodic mode with no
    /// VM serving.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration, [`Error::Thread`] when a thread cannot
    /// start.
    pub fn start(config: Config, ports: ClusterPorts) -> Result<Self> {
        let config = Config {
            commit_marker: true,
            secondary_lead: None,
            ..config
        };
        let mut engine = Engine::new(config)?;
        engine.set_mode(Mode::Periodic, Instant::now(), &mut Output::default());
        let metrics = Arc::clone(engine.metrics());
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let roles = Arc::new(Mutex::new(Roles::default()));
        let ClusterPorts { client, vms } = ports;
        let mut readers = Vec::new();
        let Port {
            reader,
            writer: client_writer,
            label,
        } = client;
        let (t, st) = (tx.clone(), Arc::clone(&stop));
        readers.push(
            std::thread::Builder::new()
                .name("netcmp-client".into())
                .spawn(move || read_client(&label, reader, &t, &st))
                .map_err(Error::Thread)?,
        );
        let mut labels = Vec::new();
        let mut writers = Vec::new();
        for (i, port) in vms.into_iter().enumerate() {
            let Port {
                reader,
                writer,
                label,
            } = port;
            labels.push(label.clone());
            writers.push(writer);
            let (t, st) = (tx.clone(), Arc::clone(&stop));
            readers.push(
                std::thread::Builder::new()
                    .name(format!("netcmp-vm{i}"))
                    .spawn(move || read_vm(i, &label, reader, &t, &st))
                    .map_err(Error::Thread)?,
            );
        }
        let state = Cluster {
            engine,
            labels,
            roles: Roles::default(),
            shared: Arc::clone(&roles),
            log_dropped: LogLimit::new(5),
        };
        let m = Arc::clone(&metrics);
        let engine_thread = std::thread::Builder::new()
            .name("netcmp-engine".into())
            .spawn(move || cluster_loop(state, &rx, client_writer, writers, &m))
            .map_err(Error::Thread)?;
        Ok(Self {
            running: Running {
                control: ProxyControl {
                    tx,
                    metrics,
                    cluster: true,
                },
                stop,
                engine: Some(engine_thread),
                readers,
            },
            roles,
        })
    }

    /// The roles now (after every event the engine thread has taken).
    pub fn roles(&self) -> Roles {
        *self.roles.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle for the counters from other threads (its `checkpoint_committed` and
    /// `set_mode` answer [`Error::ClusterMode`]).
    pub fn control(&self) -> ProxyControl {
        self.running.control.clone()
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.running.control.metrics()
    }

    /// Whether the proxy has stopped by itself (the client port closed or failed).
    pub fn is_finished(&self) -> bool {
        self.running.is_finished()
    }

    /// Stops the proxy and waits for its threads.
    ///
    /// # Errors
    /// The error that stopped the proxy earlier, if one did (the client port failed or
    /// closed).
    pub fn shutdown(mut self) -> Result<()> {
        self.running.stop_and_join()
    }
}

/// Reads the client port: its closing (a tap gone) stops the proxy.
fn read_client(
    label: &str,
    mut reader: Box<dyn FrameReader>,
    tx: &Sender<Event>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let ev = match reader.recv(READ_SLICE) {
            Ok(Recv::Frame(f)) => Event::Frame(Side::Client, f),
            Ok(Recv::Idle | Recv::Disconnected) => continue,
            Ok(Recv::Closed) => Event::PortClosed(Side::Client, None),
            Err(e) => {
                error!(port = %label, error = %e, "client port failed");
                Event::PortClosed(Side::Client, Some(e))
            }
        };
        let last = matches!(ev, Event::PortClosed(..));
        if !forward(ev, tx, stop) || last {
            return;
        }
    }
}

/// Reads VM port `i`: frames, markers and words in order, and each departure of its peer.
/// A port that closes for good (a connecting socket, a channel) or fails stops being read;
/// the proxy goes on.
fn read_vm(
    i: usize,
    label: &str,
    mut reader: Box<dyn FrameReader>,
    tx: &Sender<Event>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let (ev, last) = match reader.recv(READ_SLICE) {
            Ok(Recv::Frame(f)) => (
                match FromVm::classify(f) {
                    Ok(FromVm::Frame(f)) => VmEvent::Frame(f),
                    Ok(FromVm::Marker) => VmEvent::Marker,
                    Ok(FromVm::Role(w)) => VmEvent::Word(w),
                    Err(Error::UnknownRoleWord(b)) => VmEvent::BadWord(b),
                    Err(e) => {
                        warn!(port = %label, error = %e, "cannot read a VM's frame");
                        continue;
                    }
                },
                false,
            ),
            Ok(Recv::Idle) => continue,
            Ok(Recv::Disconnected) => (VmEvent::Gone, false),
            Ok(Recv::Closed) => {
                warn!(port = %label, "VM port closed for good; the proxy goes on without it");
                (VmEvent::Gone, true)
            }
            Err(e) => {
                error!(port = %label, error = %e, "VM port failed; the proxy goes on without it");
                (VmEvent::Gone, true)
            }
        };
        if !forward(Event::Vm(i, ev), tx, stop) || last {
            return;
        }
    }
}

/// The engine and who serves, on the engine thread.
struct Cluster {
    engine: Engine,
    labels: Vec<String>,
    roles: Roles,
    shared: Arc<Mutex<Roles>>,
    log_dropped: LogLimit,
}

/// The engine's mode while a port that said `w` serves.
fn mode_of(w: RoleWord) -> Mode {
    match w {
        RoleWord::Protected => Mode::Periodic,
        RoleWord::Alone | RoleWord::Follower => Mode::PrimaryOnly,
    }
}

impl Cluster {
    fn publish(&self) {
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = self.roles;
    }

    fn on_vm(&mut self, i: usize, ev: VmEvent, now: Instant, out: &mut Output) {
        let serving = self.roles.serving == Some(i);
        match ev {
            VmEvent::Frame(f) if serving => self.engine.primary_frame(f, now, out),
            VmEvent::Frame(_) => {
                let m = self.engine.metrics();
                Metrics::inc(&m.secondary_frames);
                Metrics::inc(&m.discarded_frames);
                if let Some(suppressed) = self.log_dropped.allow(now) {
                    debug!(port = %self.labels[i], role = ?self.roles.words[i], suppressed, "dropped a frame of a VM that does not serve");
                }
            }
            VmEvent::Marker if serving && self.roles.words[i] == Some(RoleWord::Protected) => {
                self.engine.checkpoint_committed(now, out);
            }
            VmEvent::Marker => {}
            VmEvent::Word(w) => self.on_word(i, w, now, out),
            VmEvent::BadWord(b) => {
                warn!(
                    vm = i, port = %self.labels[i], word = format_args!("{b:#04x}"),
                    "unknown role word: the port has no role until it says a known one"
                );
                self.lose(i, now, "an unknown role word");
            }
            VmEvent::Gone => self.lose(i, now, "its peer left"),
        }
    }

    /// Port `i` has no role any more (`why`); if it served, nothing serves and its output
    /// that no marker covered is dropped.
    fn lose(&mut self, i: usize, now: Instant, why: &str) {
        let had = self.roles.words[i].take();
        if self.roles.serving == Some(i) {
            self.roles.serving = None;
            let dropped = self.engine.reset(Mode::Periodic, now);
            warn!(
                vm = i, port = %self.labels[i], why, dropped,
                "role change: the serving VM is gone; no VM serves (its output no commit covered is dropped)"
            );
        } else if had.is_some() {
            info!(vm = i, port = %self.labels[i], why, was = ?had, "role change: the VM has no role");
        }
        self.publish();
    }

    fn on_word(&mut self, i: usize, w: RoleWord, now: Instant, out: &mut Output) {
        let before = self.roles.words[i].replace(w);
        let port = &self.labels[i];
        match (w, self.roles.serving) {
            (RoleWord::Follower, Some(s)) if s == i => {
                self.roles.serving = None;
                let dropped = self.engine.reset(Mode::Periodic, now);
                warn!(vm = i, %port, dropped, "role change: the serving VM says follower; no VM serves");
            }
            (RoleWord::Follower, _) => {
                info!(vm = i, %port, was = ?before, "role change: follower (its output is dropped)");
            }
            (_, Some(s)) if s == i => {
                self.engine.set_mode(mode_of(w), now, out);
                info!(vm = i, %port, was = ?before, now = %w, "role change: the serving VM's protection changed");
            }
            (_, other) => {
                let dropped = self.engine.reset(mode_of(w), now);
                self.roles.serving = Some(i);
                if let Some(j) = other {
                    // The old serving port keeps no role: if its VM still runs, nothing of
                    // it reaches the clients until it says a word again.
                    self.roles.words[j] = None;
                    if before == Some(RoleWord::Follower) {
                        warn!(vm = i, %port, now = %w, from = j, dropped, "role change: takeover; this VM serves, the old one's uncovered output is dropped");
                    } else {
                        warn!(vm = i, %port, now = %w, from = j, was = ?before, dropped, "role change: a VM that was not following claims to serve; it serves (the latest claim wins)");
                    }
                } else {
                    info!(vm = i, %port, now = %w, was = ?before, "role change: this VM serves");
                }
            }
        }
        self.publish();
    }
}

fn cluster_loop(
    mut st: Cluster,
    rx: &Receiver<Event>,
    mut client: Box<dyn FrameWriter>,
    mut vms: Vec<Box<dyn FrameWriter>>,
    m: &Metrics,
) -> Result<()> {
    let mut log = LogLimit::new(5);
    let mut out = Output::default();
    let cycle = st.engine.config().expired_scan_cycle;
    st.engine.poll(Instant::now(), &mut out);
    loop {
        let now = Instant::now();
        let wait = st
            .engine
            .next_deadline()
            .map_or(cycle, |d| d.saturating_duration_since(now));
        match rx.recv_timeout(wait) {
            Ok(Event::Frame(_, f)) => {
                if st.roles.serving.is_some() {
                    st.engine.client_frame(f, Instant::now(), &mut out);
                } else {
                    Metrics::inc(&m.client_frames);
                    Metrics::inc(&m.port_drops);
                }
            }
            Ok(Event::Vm(i, ev)) => st.on_vm(i, ev, Instant::now(), &mut out),
            Ok(Event::PortClosed(_, e)) => {
                warn!("client port closed: stopping the proxy");
                return Err(e.unwrap_or(Error::PortClosed(Side::Client.name())));
            }
            // Refused by the control before they are sent; nothing to acknowledge.
            Ok(Event::Committed(_) | Event::SetMode(..)) => {}
            Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                debug!("proxy stopping");
                return Ok(());
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        st.engine.poll(now, &mut out);
        send_frames(
            client.as_mut(),
            "client",
            &mut out.to_client,
            m,
            &mut log,
            now,
        );
        match st.roles.serving.and_then(|s| vms.get_mut(s)) {
            Some(w) => send_frames(
                w.as_mut(),
                "serving VM",
                &mut out.to_primary,
                m,
                &mut log,
                now,
            ),
            None => out.to_primary.clear(),
        }
        out.to_secondary.clear();
        // Nothing can act on a request here: the VMM checkpoints on its own timer.
        out.checkpoint_requests.clear();
    }
}
