//! `colo primary` and `colo secondary`: one side each, on its own host.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use colo_machine::GuestExit;
use colo_machine::devices::console::ConsoleSink;
use colo_machine::runner::VmHandle;

use super::event::{Events, Side};
use super::link::Heartbeat;
use super::metrics_http::SideEndpoint;
use super::primary;
use super::prometheus::State;
use super::push::PushTransport;
use super::qmp::{self, Phase, QmpSocket, RunState, ShutdownCause};
use super::secondary::{self, Outcome};
use super::{ColoError, Mode, Params, Result};
use crate::args::{VmArgs, parse_mode, parse_ms, parse_ms_or_zero, parse_secs, parse_size};
use crate::interrupt::{catch_interrupts, interrupted};

/// Which page-push transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportKind {
    /// RDMA when a device exists, else a libfabric provider of RDMA-class hardware
    /// (verbs, efa, cxi, opx, psm3) when there is one, else TCP.
    Auto,
    /// TCP streams.
    Tcp,
    /// Verbs RDMA (fails when there is no device).
    Rdma,
    /// One-sided writes through libfabric (--ofi-provider; builds with the `ofi` feature).
    Ofi,
}

/// The kind of libfabric endpoint (`--ofi-endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OfiEndpointArg {
    /// Connected where the provider offers RMA on it (tcp, verbs), else reliable datagram
    /// (efa, cxi, shm).
    Auto,
    /// Connected (FI_EP_MSG): the receiver listens on a port.
    Msg,
    /// Reliable datagram (FI_EP_RDM): the endpoints' names travel over the control
    /// channel; tcp this way runs through libfabric's ofi_rxm layer.
    Rdm,
}

/// libfabric providers `--transport auto` takes: those of RDMA-class hardware. The `tcp`
/// provider is no faster than colo's own TCP push; it is there for `--transport ofi`.
const OFI_HARDWARE: [&str; 5] = ["verbs", "efa", "cxi", "opx", "psm3"];

/// Where the kernel lists the devices those providers drive: InfiniBand, RoCE, EFA and
/// Omni-Path (`infiniband`, also opx's and psm3's), Slingshot (`cxi`).
#[cfg(feature = "ofi")]
const FABRIC_DEVICE_CLASSES: [&str; 2] = ["/sys/class/infiniband", "/sys/class/cxi"];

/// Checkpoint and heartbeat options shared by both sides.
#[derive(Debug, Args, Clone)]
pub struct ColoArgs {
    /// Time between checkpoints (QEMU's x-checkpoint-delay).
    #[arg(long, default_value = "100ms", value_parser = parse_ms)]
    pub checkpoint_delay: Duration,
    /// Time between background pushes of dirty pages within an epoch.
    #[arg(long, default_value = "10ms", value_parser = parse_ms)]
    pub push_interval: Duration,
    /// Primary: how long the disk replication sender gathers guest writes before it
    /// sends them on (0: each write at once). Forwarding is asynchronous, so no guest
    /// write waits for it; a checkpoint sends at once. 1 ms cut the replication threads'
    /// CPU from about 35% to 16% of a core at 2,900 writes/s.
    #[arg(long, default_value = "1ms", value_parser = parse_ms_or_zero)]
    pub disk_send_delay: Duration,
    /// Time between heartbeats.
    #[arg(long, default_value = "100ms", value_parser = parse_ms)]
    pub heartbeat_interval: Duration,
    /// Silence after which the peer counts as lost.
    #[arg(long, default_value = "1s", value_parser = parse_ms)]
    pub heartbeat_timeout: Duration,
    /// colo: the SVM runs and output is compared; periodic: the SVM waits paused.
    #[arg(long, value_enum, default_value = "colo")]
    pub mode: Mode,
    /// Force a checkpoint when this many pages were pushed in the background (0: never).
    #[arg(long, default_value_t = 65_536)]
    pub dirty_threshold: u64,
    /// Primary: most guest memory kept writable because the guest rewrites it all the
    /// time (0: none). A page dirty in the last checkpoint interval and written again is
    /// no longer write-protected after each collection (each first write after one costs
    /// the guest a fault of 6-15 us); instead it goes into every checkpoint, so this is
    /// also the most it adds to each checkpoint's pause. Kept pages must qualify again
    /// every 16 checkpoints. Needs KVM's manual dirty-log protection.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub hot_budget: u64,
    /// Primary: the last background push round before each checkpoint pushes the kept
    /// pages too and write-protects them again, so the pause carries only those written
    /// again after it (a shorter pause: p50 0.55 against 2-2.7 ms at 100 MiB/s dirtied on
    /// the project's test hosts), at the price of one write-protect fault per hot page the
    /// guest rewrites per checkpoint interval. Off by default: on those hosts the faults
    /// cost the guest more than the pushed bytes cost the pause.
    #[arg(long)]
    pub hot_flush: bool,
    /// Pair id: both sides must agree.
    #[arg(long, default_value_t = 1)]
    pub pair_id: u64,
    /// The page-push transport.
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportKind,
    /// Parallel TCP push streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// RDMA: the device to use (e.g. mlx5_0, rxe0). Default: the device behind the
    /// address (the secondary's --listen IP, which must be the RDMA netdev's).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// RDMA: the device port.
    #[arg(long, default_value_t = 1)]
    pub rdma_port: u8,
    /// RDMA over Converged Ethernet: the primary's GID table index, whose IP address
    /// becomes the connection's source (see `show_gids`). Default: the routing table picks.
    #[arg(long)]
    pub rdma_gid_index: Option<u8>,
    /// libfabric (--transport ofi): the provider, e.g. tcp (user space, any network),
    /// shm (one machine, shared memory), verbs (InfiniBand, RoCE), efa (AWS), cxi (HPE
    /// Slingshot); `fi_info -l` lists this machine's. Default: the first that offers RMA
    /// writes. Both sides need the same one.
    #[arg(long, value_name = "NAME")]
    pub ofi_provider: Option<String>,
    /// libfabric: the kind of endpoint. Only the secondary's choice counts (the primary
    /// follows the secondary's published region: a port or an endpoint name).
    #[arg(long, value_enum, default_value = "auto")]
    pub ofi_endpoint: OfiEndpointArg,
    /// The pair key file (`colo keygen --out FILE`, mode 0600; the same file on both
    /// sides): every connection between the two sides (control, push streams, disk)
    /// proves it before anything else crosses. `colo pair` makes one for its two sides.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub pair_key: Option<PathBuf>,
    /// Run without a pair key: anyone who reaches this side's ports can then write into
    /// the protected guest's memory and disk. For tests on a closed network only.
    #[arg(long)]
    pub insecure: bool,
    /// Encrypt the control channel, every push stream and the disk link (AES-256-GCM
    /// with keys from the authenticated handshake); both sides must agree. Without it a
    /// sniffer on the network between the sides sees guest memory and disk writes. Costs
    /// push bandwidth (see README, Security). TCP transport only.
    #[arg(long, conflicts_with = "insecure")]
    pub encrypt: bool,
    /// Serve a QMP-compatible control socket here (mode 0600 unless --qmp-mode says
    /// otherwise). A stale socket at the path is replaced; anything else there is refused.
    /// The socket is removed when the side ends. With `colo pair`: PATH is the primary's
    /// socket and PATH.secondary the secondary's.
    #[arg(long)]
    pub qmp: Option<PathBuf>,
    /// The QMP socket's mode, in octal (e.g. 660 to let the owner's group connect too);
    /// at most 777.
    #[arg(long, requires = "qmp", default_value = "600", value_parser = parse_mode)]
    pub qmp_mode: u32,
    /// Stop after this long (e.g. 30s, 2m; plain numbers are seconds).
    #[arg(long, value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Serve Prometheus metrics at `GET /metrics` on this address (HOST:PORT). `colo
    /// pair` gives its primary this port, its secondary the next one and its proxy the
    /// one after (PORT, PORT+1, PORT+2).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
}

impl ColoArgs {
    /// What this side authenticates with: the key file, or (said loudly) nothing.
    ///
    /// # Errors
    /// [`ColoError::NoPairKey`] without --pair-key or --insecure; [`ColoError::Key`] for a
    /// key file that cannot be read, is not a key, or that others can read.
    pub fn credentials(&self) -> Result<colo_auth::Credentials> {
        let creds = self.key_credentials()?.encrypted(self.encrypt);
        if self.encrypt {
            tracing::info!("control, push and disk traffic encrypted (--encrypt)");
        }
        Ok(creds)
    }

    fn key_credentials(&self) -> Result<colo_auth::Credentials> {
        match (&self.pair_key, self.insecure) {
            (Some(path), _) => {
                let key = colo_auth::PairKey::load(path)?;
                tracing::info!(key = %path.display(), pair = ?key, "pair key loaded");
                Ok(colo_auth::Credentials::key(key))
            }
            (None, true) => {
                tracing::warn!(
                    "INSECURE: running without a pair key (--insecure); anyone who can reach \
                     this side's ports can write into the protected guest's memory and disk"
                );
                Ok(colo_auth::Credentials::insecure())
            }
            (None, false) => Err(ColoError::NoPairKey),
        }
    }

    fn params(&self) -> Result<Params> {
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(ColoError::Usage(
                "--heartbeat-timeout must exceed --heartbeat-interval",
            ));
        }
        if !(1..=16).contains(&self.streams) {
            return Err(ColoError::Usage("--streams must be 1 to 16"));
        }
        Ok(Params {
            checkpoint_delay: self.checkpoint_delay,
            push_interval: self.push_interval.min(self.checkpoint_delay),
            heartbeat: Heartbeat {
                interval: self.heartbeat_interval,
                timeout: self.heartbeat_timeout,
            },
            mode: self.mode,
            dirty_threshold: self.dirty_threshold,
            hot_budget_pages: self.hot_budget / colo_memory::PAGE_SIZE,
            hot_flush: self.hot_flush,
            role_words: false,
        })
    }

    /// Resolves `--transport`: RDMA needs a device (and this build's `rdma` feature),
    /// libfabric a provider with connected RMA (and the `ofi` feature).
    fn check_transport(&self) -> Result<PushTransport> {
        let tcp = PushTransport::Tcp {
            streams: self.streams,
        };
        if self.encrypt {
            // One-sided writes land without the secondary's CPU: nothing could open a
            // sealed record on the way.
            return match self.transport {
                TransportKind::Rdma | TransportKind::Ofi => Err(ColoError::Usage(
                    "--encrypt needs the TCP push (--transport tcp or auto): one-sided \
                     writes (RDMA, libfabric) land without the secondary's CPU and cannot be \
                     opened on the way",
                )),
                _ => {
                    tracing::info!("--encrypt: pushing pages over sealed TCP streams");
                    Ok(tcp)
                }
            };
        }
        match self.transport {
            TransportKind::Tcp => Ok(tcp),
            TransportKind::Rdma => match rdma_devices() {
                Ok(devices) => self.rdma(&devices),
                Err(why) => Err(ColoError::NoRdma(why)),
            },
            TransportKind::Ofi => self.ofi(self.ofi_provider.as_deref()),
            TransportKind::Auto => {
                let why = match rdma_devices() {
                    Ok(devices) => return self.rdma(&devices),
                    Err(why) => why,
                };
                if let Some(t) = self.ofi_hardware() {
                    return Ok(t);
                }
                tracing::info!("no RDMA ({why}) and no libfabric RDMA-class provider; using TCP");
                Ok(tcp)
            }
        }
    }

    /// `--transport ofi` with `provider` (or libfabric's first with connected RMA).
    #[cfg(feature = "ofi")]
    fn ofi(&self, provider: Option<&str>) -> Result<PushTransport> {
        use colo_transport::ofi::EndpointKind;
        let opts = colo_transport::ofi::OfiOptions {
            provider: provider.map(str::to_string),
            endpoint: match self.ofi_endpoint {
                OfiEndpointArg::Auto => EndpointKind::Any,
                OfiEndpointArg::Msg => EndpointKind::Msg,
                OfiEndpointArg::Rdm => EndpointKind::Rdm,
            },
            ..colo_transport::ofi::OfiOptions::default()
        };
        let (chosen, kind) =
            colo_transport::ofi::probe(&opts).map_err(ColoError::transport("--transport ofi"))?;
        tracing::info!(
            provider = %chosen,
            endpoint = kind.describe(),
            "pushing pages with libfabric RMA writes"
        );
        Ok(PushTransport::Ofi(colo_transport::ofi::OfiOptions {
            provider: Some(chosen),
            endpoint: kind,
            ..opts
        }))
    }

    #[cfg(not(feature = "ofi"))]
    fn ofi(&self, _provider: Option<&str>) -> Result<PushTransport> {
        Err(ColoError::NoOfi(
            "this build has no libfabric support (build with --features ofi; needs \
             libfabric-dev)"
                .into(),
        ))
    }

    /// For `--transport auto`: a libfabric provider of RDMA-class hardware, if this build
    /// and this machine have one (`--ofi-provider` narrows the choice).
    ///
    /// libfabric is not asked at all on a machine with no fabric device in sysfs: asking
    /// it starts every provider it has (0.1-0.3 s here, and each may probe the network),
    /// for an answer that is known to be no.
    #[cfg(feature = "ofi")]
    fn ofi_hardware(&self) -> Option<PushTransport> {
        if !FABRIC_DEVICE_CLASSES
            .iter()
            .any(|c| std::fs::read_dir(c).is_ok_and(|mut d| d.next().is_some()))
        {
            return None;
        }
        let present = colo_transport::ofi::providers();
        OFI_HARDWARE
            .iter()
            .filter(|p| self.ofi_provider.as_deref().is_none_or(|w| w == **p))
            .filter(|p| present.iter().any(|q| q == *p))
            .find_map(|p| self.ofi(Some(p)).ok())
    }

    #[cfg(not(feature = "ofi"))]
    fn ofi_hardware(&self) -> Option<PushTransport> {
        let _ = OFI_HARDWARE;
        None
    }

    #[cfg(feature = "rdma")]
    fn rdma(&self, devices: &[String]) -> Result<PushTransport> {
        if let Some(d) = &self.rdma_device {
            if !devices.contains(d) {
                return Err(ColoError::NoSuchRdmaDevice {
                    device: d.clone(),
                    present: devices.to_vec(),
                });
            }
        }
        tracing::info!(
            ?devices,
            "RDMA devices found; pushing pages with RDMA WRITE"
        );
        Ok(PushTransport::Rdma(colo_transport::rdma::RdmaOptions {
            device: self.rdma_device.clone(),
            port: self.rdma_port,
            gid_index: self.rdma_gid_index,
            ..colo_transport::rdma::RdmaOptions::default()
        }))
    }

    #[cfg(not(feature = "rdma"))]
    fn rdma(&self, _devices: &[String]) -> Result<PushTransport> {
        unreachable!("rdma_devices() never finds devices without the rdma feature")
    }

    /// Serves the QMP socket of `--qmp`, if given, before anything else is set up, so a
    /// bad path is refused at once. The socket lives as long as the returned value.
    fn serve_qmp(&self, side: Side, params: &Params) -> Result<Option<QmpSocket>> {
        let Some(path) = &self.qmp else {
            return Ok(None);
        };
        let st = qmp::QmpState::new(
            side,
            params.checkpoint_delay.as_millis() as u64,
            (
                params.heartbeat.interval.as_millis() as u64,
                params.heartbeat.timeout.as_millis() as u64,
            ),
        );
        let socket = qmp::serve(path, self.qmp_mode, st)?;
        tracing::info!(path = %path.display(), mode = format_args!("{:o}", self.qmp_mode), "QMP socket ready");
        Ok(Some(socket))
    }

    /// The side's stop condition: Ctrl-C or SIGTERM, a QMP `quit` on `qmp`, or the end of
    /// `--duration` (counted from now).
    fn stop_fn(&self, qmp: Option<&QmpSocket>) -> impl Fn() -> bool + use<> {
        let start = Instant::now();
        let limit = self.duration;
        let quit = quit_flag(qmp);
        move || {
            interrupted()
                || quit.as_ref().is_some_and(|q| q.load(Ordering::SeqCst))
                || limit.is_some_and(|l| start.elapsed() >= l)
        }
    }
}

/// The flag a QMP `quit` sets on `qmp`'s socket, if one is served.
fn quit_flag(qmp: Option<&QmpSocket>) -> Option<Arc<AtomicBool>> {
    qmp.map(|q| qmp::QmpState::quit_flag(&q.state()))
}

/// Tells the QMP clients that the side ends its VM (`SHUTDOWN`, with why), and says so
/// in the log when a QMP `quit` ended it.
fn qmp_shutdown(qmp: Option<&QmpSocket>, guest: Option<&GuestExit>) {
    let Some(q) = qmp else { return };
    let quit = quit_flag(Some(q)).is_some_and(|f| f.load(Ordering::SeqCst));
    let cause = match guest {
        _ if quit => ShutdownCause::HostQmpQuit,
        _ if interrupted() => ShutdownCause::HostSignal,
        Some(GuestExit::PowerOff | GuestExit::Status(_)) => ShutdownCause::GuestShutdown,
        Some(GuestExit::Reset) => ShutdownCause::GuestReset,
        Some(GuestExit::Stopped) | None => ShutdownCause::None,
    };
    if quit {
        tracing::info!("stopped by QMP quit");
    }
    qmp::shutdown(&q.state(), cause);
}

#[cfg(feature = "rdma")]
fn rdma_devices() -> std::result::Result<Vec<String>, String> {
    match colo_transport::rdma::device_names() {
        Ok(d) if d.is_empty() => Err("no RDMA device".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(not(feature = "rdma"))]
fn rdma_devices() -> std::result::Result<Vec<String>, String> {
    Err("this build has no RDMA support (build with --features rdma)".into())
}

/// `colo primary`.
#[derive(Debug, Args)]
pub struct PrimaryArgs {
    /// The secondary's control address (host:port). Without it, the primary waits for a
    /// QMP `migrate` command with `tcp:host:port` (needs --qmp).
    #[arg(long)]
    pub peer: Option<String>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub colo: ColoArgs,
    /// Append every checkpoint's record (epoch, trigger, pause_us, pages, bytes) as one
    /// JSON line to this file (a FIFO works too), for dashboards and scripts.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// When the secondary is lost, keep trying to connect a new one at --peer; it is
    /// brought in sync while the primary serves (RAM and disk), then COLO goes on.
    #[arg(long)]
    pub reprotect: bool,
    /// Mark each committed checkpoint in the network output (an empty frame on the
    /// --net-socket stream) instead of waiting for a supervisor to release the proxy: for a
    /// proxy with commit markers (`colo proxy --commit-marker`, and `colo pair`). The PVM
    /// then resumes without that round trip.
    #[arg(long, requires = "net_socket")]
    pub commit_marker: bool,
    /// Say this side's role to a proxy in cluster mode (`colo proxy --cluster`) on the
    /// --net-socket stream, in order with the VM's frames: `Protected` when the PVM first
    /// runs with its secondary in sync (commit markers are then on, as with
    /// --commit-marker), `Alone` when it serves without one (started unprotected with
    /// --reprotect, or after it left COLO), `Protected` again when it re-protects. Off by
    /// default (`colo pair` does not use it); the cluster agent passes it.
    #[arg(long, requires = "net_socket")]
    pub role_words: bool,
    /// A supervisor's event socket (used by `colo pair`).
    #[arg(long, hide = true)]
    pub events: Option<PathBuf>,
}

/// `colo secondary`.
#[derive(Debug, Args)]
pub struct SecondaryArgs {
    /// Where to listen for the primary (host:port).
    #[arg(long, default_value = "127.0.0.1:7100")]
    pub listen: String,
    /// Protect the VM again after a takeover: this side then acts as a primary that
    /// pushes to a new secondary listening at this address (host:port; the other host's
    /// --listen), brings it in sync while serving (RAM and disk) and goes on in COLO. A
    /// QMP `migrate` with `tcp:host:port` sets or changes it. Without it, a secondary
    /// that took over serves unprotected. (The cluster agent, ocf/colo, gives each side
    /// the other's address.)
    #[arg(long)]
    pub peer: Option<String>,
    /// Split-brain prevention: a shell command that must exit 0 before this side takes
    /// over after losing the link (e.g. a fence that powers the primary off, or a quorum
    /// query). It is retried until the heartbeat timeout; if it never succeeds, the
    /// secondary stays passive. Without it, any loss of the link means takeover.
    #[arg(long)]
    pub takeover_check: Option<String>,
    /// Nice value (0-19) of the SVM's vCPU thread while it follows the primary; 0 again
    /// once it takes over (raising it back needs CAP_SYS_NICE, e.g. root; otherwise a
    /// warning says it stays). Use a high value when the secondary shares cores with the
    /// primary (as in `colo pair`): the SVM only has to keep up for the comparison, and
    /// the PVM and the checkpoint threads go first.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub vcpu_nice: i32,
    /// COLO mode with a replicated disk: pace the SVM by the primary's disk flushes. An
    /// SVM flush waits (at most 100 ms) until the primary has sent as many flushes since
    /// the last checkpoint, less this lead, so that the SVM, whose writes land in memory,
    /// does not run ahead of the primary into work the next checkpoint throws away. Off
    /// by default.
    #[arg(long)]
    pub disk_flush_lead: Option<u64>,
    /// Say this side's role to a proxy in cluster mode (`colo proxy --cluster`) on the
    /// --net-socket stream, in order with the VM's frames: `Follower` from the start (its
    /// output is not for clients), `Alone` when it takes over (before its VM resumes), and,
    /// with --peer, `Protected` when it protects its VM again (commit markers are then on).
    /// Off by default; the cluster agent passes it.
    #[arg(long, requires = "net_socket")]
    pub role_words: bool,
    /// A supervisor's event socket (used by `colo pair`): takeover and fencing.
    #[arg(long, hide = true)]
    pub events: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub colo: ColoArgs,
}

/// The supervisor's event socket at `path`, if one is given.
fn connect_events(path: Option<&std::path::Path>) -> Result<Events> {
    path.map_or_else(|| Ok(Events::none()), Events::connect)
}

/// Runs `colo primary`.
///
/// # Errors
/// A VM or setup failure.
pub fn run_primary(a: &PrimaryArgs) -> Result<()> {
    let params = Params {
        role_words: a.role_words,
        ..a.colo.params()?
    };
    let creds = a.colo.credentials()?;
    let transport = a.colo.check_transport()?;
    catch_interrupts();
    // Removes the socket file when this function returns, however it returns.
    let qmp_socket = a.colo.serve_qmp(Side::Primary, &params)?;
    let endpoint = SideEndpoint::serve(a.colo.metrics_listen.as_deref(), Side::Primary)?;
    let metrics = endpoint.metrics();
    let mut pdisk = None;
    let machine =
        a.vm.build_with("primary", ConsoleSink::Stdout("pvm".into()), |d| {
            let opts = colo_blk::PrimaryOptions {
                send_delay: a.colo.disk_send_delay,
                ..colo_blk::PrimaryOptions::default()
            };
            let p = Arc::new(colo_blk::PrimaryDisk::new(d, opts));
            metrics.watch_primary_disk(&p);
            pdisk = Some(Arc::clone(&p));
            Ok(Some(p))
        })?;
    // The push sender reads guest memory through this region, which keeps the mapping
    // alive however the VM and the sender are dropped.
    let ram = machine.ram.region();
    let dirty = machine.dirty_handle();
    let vm = VmHandle::start(machine, true)?;
    let events = connect_events(a.events.as_deref())?.with_metrics(metrics.clone());
    let qmp = qmp_socket.as_ref().map(QmpSocket::state);
    let stop = a.colo.stop_fn(qmp_socket.as_ref());
    let peer = match (&a.peer, &qmp) {
        (Some(p), _) => p.clone(),
        (None, Some(q)) => {
            tracing::info!("waiting for a QMP 'migrate' command with the secondary's address");
            loop {
                if stop() {
                    println!("primary: stopped before a QMP 'migrate' named the secondary");
                    qmp_shutdown(qmp_socket.as_ref(), None);
                    return Ok(());
                }
                if let Some(u) = lock_qmp(q).migrate_uri.clone() {
                    break u;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (None, None) => {
            return Err(ColoError::Usage(
                "give --peer, or --qmp and a QMP 'migrate'",
            ));
        }
    };
    let peer = primary::Peer {
        addr: peer,
        pair_id: a.colo.pair_id,
        transport: transport.clone(),
        vcpus: a.vm.vcpus,
        creds,
    };
    let mut p = primary::Primary::serving(vm, ram, dirty, &peer, params, events);
    p.qmp = qmp;
    p.reprotect = a.reprotect;
    p.commit_marker = a.commit_marker || a.role_words;
    if let Some(path) = &a.metrics {
        p.metrics = Some(super::metrics::open_stream(path)?);
    }
    p.disk = pdisk;
    metrics.set_state(State::Syncing);
    // With --reprotect the primary need not wait long: it serves alone and takes the
    // secondary once it listens.
    let wait = if a.reprotect {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(30)
    };
    let started = match p.connect(wait, &stop) {
        Ok(()) => {
            qmp::set_phase(p.qmp.as_ref(), Phase::Syncing);
            p.start(&stop)
        }
        Err(e @ ColoError::Stopped) => Err(e),
        Err(e) if a.reprotect => {
            tracing::warn!(
                error = %super::Chain(&e),
                peer = %peer.addr,
                "no secondary yet: the PVM starts unprotected and takes one once it listens"
            );
            super::role::announce(p.vm(), &params, super::role::RoleWord::Alone);
            p.vm().resume();
            metrics.set_state(State::Unprotected);
            qmp::set_phase(p.qmp.as_ref(), Phase::Serving);
            Ok(())
        }
        Err(e) => Err(e),
    };
    match started {
        Ok(()) => {}
        Err(ColoError::Stopped) => {
            println!("primary: stopped before the secondary was in sync; the guest did not run");
            qmp_shutdown(qmp_socket.as_ref(), None);
            endpoint.stop();
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    if let Some(q) = &qmp_socket {
        qmp::set_run_state(&q.state(), RunState::Running);
    }
    if p.protected() {
        metrics.set_state(State::Protected);
        qmp::set_phase(p.qmp.as_ref(), Phase::Colo);
        tracing::info!(mode = ?params.mode, delay_ms = params.checkpoint_delay.as_millis() as u64, "COLO running");
    }
    let started = Instant::now();
    p.run(&stop)?;
    println!(
        "primary: {}",
        p.summary.text(started.elapsed().as_secs_f64())
    );
    let exit = p.finish()?;
    qmp_shutdown(qmp_socket.as_ref(), Some(&exit));
    say_guest_end("primary", exit);
    endpoint.stop();
    Ok(())
}

/// The QMP state, whatever a panicked holder left.
fn lock_qmp(q: &qmp::Shared) -> std::sync::MutexGuard<'_, qmp::QmpState> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a secondary that took over keeps to serve as a primary.
struct Served {
    /// Guest RAM as one flat view (what the push reads).
    ram: Arc<colo_memory::Region>,
    /// The disk image.
    disk: PathBuf,
    /// The VM's disk device's backend.
    switch: Option<Arc<colo_blk::SwitchableDisk>>,
}

/// A secondary that took over becomes a primary for `peer`: the VM's disk is served by a
/// replicating primary disk from now on, and a new secondary listening at `peer` is
/// brought in sync while the VM serves, then COLO goes on (and again whenever that
/// secondary is lost).
fn serve_as_primary(
    s: secondary::Secondary,
    served: Served,
    peer: primary::Peer,
    params: Params,
    stop: &dyn Fn() -> bool,
) -> Result<GuestExit> {
    let qmp = s.qmp.clone();
    let (vm, dirty, events) = s.into_parts();
    let mut pdisk = None;
    if let Some(sw) = &served.switch {
        // No guest request may run on the old backend once the new one serves.
        vm.pause()?;
        let swapped = vm
            .wait_disk_idle(Duration::from_secs(10))
            .map_err(ColoError::from)
            .and_then(|()| {
                let d = colo_blk::Disk::open(&served.disk)
                    .map_err(ColoError::disk("open the disk as the primary's"))?;
                Ok(Arc::new(colo_blk::PrimaryDisk::new(
                    d,
                    colo_blk::PrimaryOptions::default(),
                )))
            });
        let swapped = match swapped {
            Ok(p) => {
                sw.replace(Arc::clone(&p) as Arc<dyn colo_blk::BlockBackend>);
                Ok(p)
            }
            Err(e) => Err(e),
        };
        vm.resume();
        pdisk = Some(swapped?);
    }
    tracing::info!(peer = %peer.addr, "serving as the primary: a new secondary at the peer address is taken once it listens");
    let mut p = primary::Primary::serving(vm, served.ram, dirty, &peer, params, events);
    p.qmp = qmp;
    p.reprotect = true;
    p.commit_marker = params.role_words;
    p.disk = pdisk;
    let started = Instant::now();
    p.run(stop)?;
    if p.summary.epochs > 0 {
        println!(
            "secondary (serving as the primary): {}",
            p.summary.text(started.elapsed().as_secs_f64())
        );
    }
    p.finish()
}

/// Says how the guest of a side that served ended, if it ended itself.
fn say_guest_end(side: &str, exit: GuestExit) {
    match exit {
        GuestExit::Stopped => {}
        GuestExit::PowerOff => println!("{side}: the guest powered off; the pair ends"),
        GuestExit::Reset => println!(
            "{side}: the guest reset the machine (a reboot, or a panic with panic=-1); colo \
             does not reboot a VM: the pair ends"
        ),
        GuestExit::Status(status) => println!("{side}: the guest exited with status {status}"),
    }
}

/// Runs `colo secondary`.
///
/// # Errors
/// A VM or setup failure, or losing the primary before the first checkpoint.
pub fn run_secondary(a: &SecondaryArgs) -> Result<()> {
    let params = Params {
        role_words: a.role_words,
        ..a.colo.params()?
    };
    let creds = a.colo.credentials()?;
    let transport = a.colo.check_transport()?;
    catch_interrupts();
    // Removes the socket file when this function returns, however it returns.
    let qmp_socket = a.colo.serve_qmp(Side::Secondary, &params)?;
    let endpoint = SideEndpoint::serve(a.colo.metrics_listen.as_deref(), Side::Secondary)?;
    let metrics = endpoint.metrics();
    colo_machine::sched::set_vcpu_nice(a.vcpu_nice);
    let mut sdisk = None;
    // The VM's disk goes through a switch: after a takeover with --peer, the same device
    // is served by a replicating primary disk.
    let mut switch = None;
    let machine =
        a.vm.build_with("secondary", ConsoleSink::Stdout("svm".into()), |d| {
            let s = Arc::new(colo_blk::SecondaryDisk::new(
                d,
                colo_blk::BufferOptions::default(),
            ));
            metrics.watch_secondary_disk(&s);
            sdisk = Some(Arc::clone(&s));
            let sw = Arc::new(colo_blk::SwitchableDisk::new(s));
            switch = Some(Arc::clone(&sw));
            Ok(Some(sw))
        })?;
    let flat_ram = machine.ram.region();
    // The first commit copies all of RAM into the SVM: fault it in now, not then.
    machine.ram.prefault();
    // The cache commits into these regions, which keep the mapping alive however the VM
    // and the cache are dropped.
    let ram = machine.ram.regions_by_slot();
    let dirty = machine.dirty_handle();
    let layout = machine.ram.layout().clone();
    let vm = VmHandle::start(machine, true)?;
    super::role::announce(&vm, &params, super::role::RoleWord::Follower);
    let events = connect_events(a.events.as_deref())?.with_metrics(metrics.clone());
    let listener = TcpListener::bind(&a.listen).map_err(|source| ColoError::Listen {
        what: "the primary",
        addr: a.listen.clone(),
        source,
    })?;
    let blk_at = super::blk_addr(&a.listen)?;
    let blk_listener = TcpListener::bind(blk_at).map_err(|source| ColoError::Listen {
        what: "disk replication",
        addr: blk_at.to_string(),
        source,
    })?;
    tracing::info!(listen = %a.listen, "waiting for the primary");
    let stop = a.colo.stop_fn(qmp_socket.as_ref());
    let pairing = secondary::Pairing {
        pair_id: a.colo.pair_id,
        transport,
        vcpus: a.vm.vcpus,
        creds,
    };
    let mut s = match secondary::accept(&listener, vm, ram, dirty, layout, &pairing, params, &stop)
    {
        Ok(s) => s,
        Err(_) if stop() => {
            println!("secondary: stopped before the primary connected");
            qmp_shutdown(qmp_socket.as_ref(), None);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    metrics.set_state(State::Syncing);
    qmp::set_phase(
        qmp_socket.as_ref().map(QmpSocket::state).as_ref(),
        Phase::Syncing,
    );
    s.qmp = qmp_socket.as_ref().map(QmpSocket::state);
    s.takeover_check = a.takeover_check.clone();
    s.events = events;
    if let Some(d) = sdisk {
        blk_listener
            .set_nonblocking(false)
            .map_err(ColoError::io("make the disk listener blocking"))?;
        let (stream, _, peer) = colo_auth::accept_peer(
            &blk_listener,
            &pairing.creds,
            colo_auth::Role::Secondary,
            colo_auth::Channel::Disk,
            Some(Duration::from_secs(30)),
            colo_auth::HANDSHAKE_TIMEOUT,
            &stop,
        )?;
        let stream = if pairing.creds.encrypts() {
            colo_auth::seal::bridge(stream, &peer).map_err(ColoError::io("seal the disk link"))?
        } else {
            stream
        };
        let _ = stream.set_nodelay(true);
        d.serve(stream, Duration::from_secs(30))
            .map_err(ColoError::disk("serve the primary"))?;
        // The resync of the disk: up to 10 minutes, and SIGTERM or Ctrl-C end it sooner
        // (the image is then a partial copy, which only a new resync makes usable).
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match d.wait_synced(Duration::from_millis(200)) {
                Ok(()) => break,
                Err(colo_blk::Error::Timeout(..)) if Instant::now() < deadline => {
                    if stop() {
                        println!(
                            "secondary: stopped during the disk resync; this disk copy is partial"
                        );
                        return Ok(());
                    }
                }
                Err(e) => return Err(ColoError::disk("resync")(e)),
            }
        }
        tracing::info!("disk in sync with the primary");
        d.set_flush_lead(a.disk_flush_lead);
        s.disk = Some(d);
    }
    let qmp_state = qmp_socket.as_ref().map(QmpSocket::state);
    let mut outcome = s.run(&stop)?;
    if let Outcome::Fenced { reason } = &outcome {
        qmp::set_running(qmp_state.as_ref(), false);
        println!(
            "secondary: FENCED ({reason}); the primary may still be active: this side stays \
             passive until it is told to take over (QMP x-colo-lost-heartbeat) or stopped"
        );
        if let Some(o) = s.wait_fenced(&stop)? {
            outcome = o;
        }
    }
    if matches!(outcome, Outcome::PrimaryLeft | Outcome::Stopped) {
        // The disk as of the last checkpoint, not half of the next one.
        if let Some(d) = &s.disk {
            d.stop_at_commit()
                .map_err(ColoError::disk("leave the disk at the last commit"))?;
        }
    }
    let exit = match outcome {
        Outcome::PrimaryLeft => {
            println!(
                "secondary: the primary left in order; this side stops (its disk as of the last checkpoint)"
            );
            None
        }
        Outcome::Stopped => {
            println!(
                "secondary: stopped while following the primary; its disk is as of the last checkpoint"
            );
            None
        }
        Outcome::Fenced { .. } => {
            println!("secondary: stopped while fenced");
            None
        }
        Outcome::TookOver {
            reason,
            checkpoints,
            dropped_epoch,
        } => {
            if a.vcpu_nice != 0 {
                match s.vm().set_vcpu_nice(0) {
                    Ok(()) => tracing::info!("the SVM's vCPU runs at nice 0 again"),
                    Err(e) => tracing::warn!(
                        error = %e,
                        nice = a.vcpu_nice,
                        "cannot raise the serving SVM's vCPU priority back to nice 0"
                    ),
                }
            }
            println!(
                "secondary: FAILOVER after {checkpoints} checkpoints ({reason}); dropped an \
                 incomplete epoch: {dropped_epoch}; the SVM now serves"
            );
            qmp::set_running(qmp_state.as_ref(), true);
            let next = a
                .peer
                .clone()
                .or_else(|| s.qmp.as_ref().and_then(|q| lock_qmp(q).migrate_uri.clone()));
            match next {
                Some(addr) => {
                    let peer = primary::Peer {
                        addr,
                        pair_id: pairing.pair_id,
                        transport: pairing.transport.clone(),
                        vcpus: a.vm.vcpus,
                        creds: pairing.creds.clone(),
                    };
                    let served = Served {
                        ram: flat_ram,
                        disk: a.vm.disk.clone(),
                        switch,
                    };
                    Some(serve_as_primary(s, served, peer, params, &stop)?)
                }
                None => {
                    while !stop() && !s.vm().finished() {
                        qmp::apply_run_request(qmp_state.as_ref(), s.vm());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Some(s.finish()?)
                }
            }
        }
    };
    qmp_shutdown(qmp_socket.as_ref(), exit.as_ref());
    if let Some(exit) = exit {
        say_guest_end("secondary", exit);
    }
    endpoint.stop();
    Ok(())
}
