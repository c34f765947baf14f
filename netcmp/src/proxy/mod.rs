//! The proxy running: the [`Engine`] on its own thread, fed by one reader thread per port.
//!
//! ```text
//!  client port ──reader──┐                        ┌──> client port (released output)
//!  primary port ─reader──┼─> events ─> engine ────┼──> primary port (mirrored input)
//!  secondary port reader─┘      ^      thread     ├──> secondary port (mirrored input)
//!                               │                 └──> checkpoint requests (channel)
//!  controller: checkpoint_committed(), set_mode(), shutdown()
//! ```
//!
//! Control calls travel through the same queue as frames, so a commit applies after every
//! frame read before it.

mod args;
mod cluster;
mod run;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{debug, error, warn};

pub use self::args::ProxyArgs;
pub use self::cluster::{ClusterPorts, ClusterProxy, Roles};
pub use self::run::{ProxyConfig, VmPorts, run, run_observed};
use crate::compare::{CheckpointRequest, Engine, Mode, Output};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flow::Side;
use crate::io::{FrameReader, FrameWriter, Port, Recv, Sent};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::ratelimit::LogLimit;

/// How long reader threads wait per read before checking whether to stop.
const READ_SLICE: Duration = Duration::from_millis(100);
/// Frames and commands queued towards the engine thread.
const EVENT_QUEUE: usize = 8192;
/// How long a control call waits for the engine thread to act on it.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The three ports of a proxy.
#[derive(Debug)]
pub struct Ports {
    /// Towards the client network.
    pub client: Port,
    /// Towards the primary VM.
    pub primary: Port,
    /// Towards the secondary VM.
    pub secondary: Port,
}

enum Event {
    Frame(Side, Vec<u8>),
    PortClosed(Side, Option<Error>),
    /// A commit; the sender waits on the acknowledgement if there is one.
    Committed(Option<Sender<()>>),
    SetMode(Mode, Sender<()>),
    /// Cluster mode: what VM port 0 or 1 said or sent.
    Vm(usize, cluster::VmEvent),
    Shutdown,
}

/// A handle to send the running proxy commands from any thread.
#[derive(Clone)]
pub struct ProxyControl {
    tx: Sender<Event>,
    metrics: Arc<Metrics>,
    /// Cluster mode: the VMs' words decide, commits and modes are refused.
    cluster: bool,
}

impl std::fmt::Debug for ProxyControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyControl").finish_non_exhaustive()
    }
}

impl ProxyControl {
    fn call(&self, make: impl FnOnce(Sender<()>) -> Event, what: &'static str) -> Result<()> {
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        self.tx
            .send_timeout(make(ack_tx), CONTROL_TIMEOUT)
            .map_err(|_| Error::Stopped)?;
        match ack_rx.recv_timeout(CONTROL_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout(CONTROL_TIMEOUT, what)),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Stopped),
        }
    }

    /// Reports that a checkpoint committed (the secondary is a copy of the primary again).
    /// Returns once the held output has been released and the compare state reset; call it
    /// before the primary VM resumes.
    ///
    /// # Errors
    /// [`Error::Stopped`] when the proxy is not running, [`Error::Timeout`] when it did not
    /// act within 10 s, [`Error::ClusterMode`] for a proxy in cluster mode (its VMs' commit
    /// markers commit).
    pub fn checkpoint_committed(&self) -> Result<()> {
        if self.cluster {
            return Err(Error::ClusterMode);
        }
        self.call(|ack| Event::Committed(Some(ack)), "commit a checkpoint")
    }

    /// Frames and commands waiting for the engine thread (at most 8192): how far the
    /// engine is behind its ports.
    pub fn queued_events(&self) -> usize {
        self.tx.len()
    }

    /// Changes the mode (failover, or the secondary lost); see [`Mode`].
    ///
    /// # Errors
    /// As for [`checkpoint_committed`](Self::checkpoint_committed).
    pub fn set_mode(&self, mode: Mode) -> Result<()> {
        if self.cluster {
            return Err(Error::ClusterMode);
        }
        self.call(|ack| Event::SetMode(mode, ack), "change mode")
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }
}

/// A running proxy.
///
/// ```no_run
/// use colo_netcmp::io::{Port, PortSpec};
/// use colo_netcmp::proxy::{Ports, Proxy};
///
/// let ports = Ports {
///     client: Port::open(&"tap:colo-c".parse()?)?,
///     primary: Port::open(&"unix-listen:/run/colo/pvm.sock".parse()?)?,
///     secondary: Port::open(&"tcp-listen:127.0.0.1:9003".parse()?)?,
/// };
/// let proxy = Proxy::start(colo_netcmp::Config::default(), ports)?;
/// while let Ok(req) = proxy.checkpoint_requests().recv() {
///     println!("checkpoint needed: {req}");
///     // ... take the checkpoint, then, before the primary resumes:
///     proxy.control().checkpoint_committed()?;
/// }
/// # Ok::<(), colo_netcmp::Error>(())
/// ```
pub struct Proxy {
    running: Running,
    requests: Receiver<CheckpointRequest>,
}

/// A running proxy's threads (the engine and the port readers) and its control: what
/// [`Proxy`] and the cluster-mode proxy share. Dropping it stops and joins the threads.
pub(crate) struct Running {
    pub(crate) control: ProxyControl,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) engine: Option<JoinHandle<Result<()>>>,
    pub(crate) readers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Whether the engine thread has ended by itself.
    pub(crate) fn is_finished(&self) -> bool {
        self.engine.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the threads and waits for them; the engine's result.
    pub(crate) fn stop_and_join(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.control.tx.try_send(Event::Shutdown);
        let r = match self.engine.take() {
            Some(h) => h.join().unwrap_or(Err(Error::Stopped)),
            None => Ok(()),
        };
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
        r
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts the proxy on `ports` with `config`.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration, [`Error::Thread`] when a thread cannot
    /// start.
    pub fn start(config: Config, ports: Ports) -> Result<Self> {
        let commit_marker = config.commit_marker;
        let engine = Engine::new(config)?;
        let metrics = Arc::clone(engine.metrics());
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        let (req_tx, requests) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let Ports {
            client,
            primary,
            secondary,
        } = ports;
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for (side, port) in [
            (Side::Client, client),
            (Side::Primary, primary),
            (Side::Secondary, secondary),
        ] {
            let Port {
                reader,
                writer,
                label,
            } = port;
            writers.push((side, writer));
            let (tx, stop) = (tx.clone(), Arc::clone(&stop));
            let markers = commit_marker && side == Side::Primary;
            let h = std::thread::Builder::new()
                .name(format!("netcmp-{side}"))
                .spawn(move || read_loop(side, label, reader, markers, &tx, &stop))
                .map_err(Error::Thread)?;
            readers.push(h);
        }
        let m = Arc::clone(&metrics);
        let engine_thread = std::thread::Builder::new()
            .name("netcmp-engine".into())
            .spawn(move || engine_loop(engine, &rx, writers, &req_tx, &m))
            .map_err(Error::Thread)?;
        Ok(Self {
            running: Running {
                control: ProxyControl {
                    tx,
                    metrics,
                    cluster: false,
                },
                stop,
                engine: Some(engine_thread),
                readers,
            },
            requests,
        })
    }

    /// Checkpoint requests, for the controller to consume. The channel disconnects when
    /// the proxy stops.
    pub fn checkpoint_requests(&self) -> &Receiver<CheckpointRequest> {
        &self.requests
    }

    /// A handle for commands from other threads.
    pub fn control(&self) -> ProxyControl {
        self.running.control.clone()
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.running.control.metrics()
    }

    /// Whether the proxy has stopped by itself (a port closed or failed).
    pub fn is_finished(&self) -> bool {
        self.running.is_finished()
    }

    /// Stops the proxy and waits for its threads.
    ///
    /// # Errors
    /// The error that stopped the proxy earlier, if one did (a port that failed or closed).
    pub fn shutdown(mut self) -> Result<()> {
        self.running.stop_and_join()
    }
}

/// Reads one port into the event queue. With `markers` (the primary's port, with
/// [`Config::commit_marker`]), an empty frame becomes a commit, in order with the frames.
fn read_loop(
    side: Side,
    label: String,
    mut reader: Box<dyn FrameReader>,
    markers: bool,
    tx: &Sender<Event>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let ev = match reader.recv(READ_SLICE) {
            Ok(Recv::Frame(f)) if markers && f.is_empty() => Event::Committed(None),
            Ok(Recv::Frame(f)) => Event::Frame(side, f),
            Ok(Recv::Idle | Recv::Disconnected) => continue,
            Ok(Recv::Closed) => Event::PortClosed(side, None),
            Err(e) => {
                error!(port = %label, error = %e, "port failed");
                Event::PortClosed(side, Some(e))
            }
        };
        let last = matches!(ev, Event::PortClosed(..));
        if !forward(ev, tx, stop) || last {
            return;
        }
    }
}

/// Queues `ev` for the engine thread, blocking while the engine is behind (back-pressure
/// onto the port); false when the proxy stops meanwhile.
fn forward(ev: Event, tx: &Sender<Event>, stop: &AtomicBool) -> bool {
    let mut ev = Some(ev);
    while let Some(e) = ev.take() {
        match tx.send_timeout(e, READ_SLICE) {
            Ok(()) => {}
            Err(crossbeam_channel::SendTimeoutError::Timeout(e)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                ev = Some(e);
            }
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
        }
    }
    true
}

/// Sends out what the engine produced.
struct Sink {
    writers: Vec<(Side, Box<dyn FrameWriter>)>,
    log: LogLimit,
}

impl Sink {
    fn write(&mut self, side: Side, frames: &mut Vec<Vec<u8>>, m: &Metrics, now: Instant) {
        if frames.is_empty() {
            return;
        }
        let Some((_, w)) = self.writers.iter_mut().find(|(s, _)| *s == side) else {
            return;
        };
        send_frames(w.as_mut(), side.name(), frames, m, &mut self.log, now);
    }
}

/// Writes `frames` to `w` (the port named `port` in logs), counting drops and failures.
fn send_frames(
    w: &mut dyn FrameWriter,
    port: &str,
    frames: &mut Vec<Vec<u8>>,
    m: &Metrics,
    log: &mut LogLimit,
    now: Instant,
) {
    for f in frames.drain(..) {
        match w.send(&f) {
            Ok(Sent::Written) => {}
            Ok(Sent::Dropped) => Metrics::inc(&m.port_drops),
            Err(e) => {
                Metrics::inc(&m.port_write_errors);
                if let Some(suppressed) = log.allow(now) {
                    warn!(port, error = %e, suppressed, "cannot send a frame");
                }
            }
        }
    }
}

fn engine_loop(
    mut engine: Engine,
    rx: &Receiver<Event>,
    writers: Vec<(Side, Box<dyn FrameWriter>)>,
    req_tx: &Sender<CheckpointRequest>,
    m: &Metrics,
) -> Result<()> {
    let mut sink = Sink {
        writers,
        log: LogLimit::new(5),
    };
    let mut out = Output::default();
    let cycle = engine.config().expired_scan_cycle;
    engine.poll(Instant::now(), &mut out);
    loop {
        let now = Instant::now();
        let wait = engine
            .next_deadline()
            .map_or(cycle, |d| d.saturating_duration_since(now));
        let mut ack = None;
        match rx.recv_timeout(wait) {
            Ok(Event::Frame(side, f)) => {
                let now = Instant::now();
                match side {
                    Side::Client => engine.client_frame(f, now, &mut out),
                    Side::Primary => engine.primary_frame(f, now, &mut out),
                    Side::Secondary => engine.secondary_frame(f, now, &mut out),
                }
            }
            Ok(Event::Committed(a)) => {
                engine.checkpoint_committed(Instant::now(), &mut out);
                ack = a;
            }
            Ok(Event::SetMode(mode, a)) => {
                engine.set_mode(mode, Instant::now(), &mut out);
                ack = Some(a);
            }
            // Only a proxy in cluster mode has VM ports by place.
            Ok(Event::Vm(..)) => {}
            Ok(Event::PortClosed(side, e)) => {
                warn!(%side, "port closed: stopping the proxy");
                return Err(e.unwrap_or(Error::PortClosed(side.name())));
            }
            Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                debug!("proxy stopping");
                return Ok(());
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        engine.poll(now, &mut out);
        sink.write(Side::Client, &mut out.to_client, m, now);
        sink.write(Side::Primary, &mut out.to_primary, m, now);
        sink.write(Side::Secondary, &mut out.to_secondary, m, now);
        for r in out.checkpoint_requests.drain(..) {
            let _ = req_tx.send(r);
        }
        if let Some(a) = ack {
            let _ = a.send(());
        }
    }
}
