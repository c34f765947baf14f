//! `colo pair`: a whole COLO pair on this machine, the embedded default.
//!
//! The supervisor (this process) runs the proxy and a client load, and starts the two
//! sides as child processes (`colo secondary`, `colo primary`) on loopback:
//!
//! ```text
//!  client load ─frames─▶ proxy ─┬─ unix socket ─▶ PVM  (colo primary)  ══ push/control ══▶
//!   (smoltcp)  ◀─released─      └─ unix socket ─▶ SVM  (colo secondary) ◀════════════════
//! ```
//!
//! The primary marks every commit in its own network output (`--commit-marker`), so the
//! proxy releases the held output in order with the PVM's frames, and reports every
//! checkpoint on an event socket; the supervisor forwards the proxy's checkpoint requests
//! (mismatches) to the primary and shows a status line. The secondary reports a takeover
//! or fencing on an event socket of its own. Both carry typed JSON lines
//! (`crate::colo::event`). `--kill-primary-after` kills the primary process outright; the
//! secondary notices (heartbeat or closed connection), takes over, and the proxy switches
//! the client to it.

mod child;
pub mod client;
mod disklog;
mod events;
mod flags;
mod shared;
pub mod socket_client;
mod status;
mod summary;
mod supervisor;
mod unprotected;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Args;
use colo_netcmp::proxy::{Ports, Proxy};

use crate::args::{KernelArgs, configure_tap, parse_ms_or_zero, parse_secs, parse_size};
use crate::colo::ColoError;
use crate::colo::cli::ColoArgs;
use crate::interrupt::catch_interrupts;
use client::{ClientNet, ClientStats};

/// `colo pair`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  colo pair --duration 30s\n  \
                        colo pair --duration 20s --kill-primary-after 10s\n\n\
                        Needs /dev/kvm; no root and no tap device (the client is a user-space \
                        TCP stack). Scratch files go to a temporary directory that is removed \
                        at the end.")]
pub struct PairArgs {
    #[command(flatten)]
    pub colo: ColoArgs,
    /// Kill the primary process (SIGKILL) this long after the start, to show failover.
    #[arg(long, value_parser = parse_secs)]
    pub kill_primary_after: Option<Duration>,
    /// Kill the secondary process this long after the start: the primary carries on alone.
    #[arg(long, value_parser = parse_secs)]
    pub kill_secondary_after: Option<Duration>,
    /// After --kill-secondary-after, start a new secondary 1 s later: the primary brings
    /// it in sync while serving and COLO goes on (re-protection).
    #[arg(long)]
    pub reprotect: bool,
    /// Nice value of the SVM's vCPU thread until it takes over (the secondary's
    /// --vcpu-nice). Both VMs share this machine's cores here, which two hosts would not:
    /// the SVM only has to keep up for the comparison, so by default it takes what the PVM
    /// and the checkpoint threads leave. 0 gives both VMs the same share.
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub svm_nice: i32,
    /// COLO mode: how far the SVM may run ahead of the PVM before the proxy holds it
    /// (netcmp's secondary_lead, measured by the SVM's oldest output still waiting for
    /// the PVM's). What the SVM does past the PVM is thrown away at the next checkpoint,
    /// and on one machine it takes CPU from the PVM. 0 turns pacing off.
    #[arg(long, default_value = "10ms", value_parser = parse_ms_or_zero)]
    pub svm_lead: Duration,
    /// COLO mode: pace the SVM by the PVM's disk flushes (the secondary's
    /// --disk-flush-lead): an SVM flush waits (at most 100 ms) until the PVM has sent as
    /// many since the last checkpoint, less this lead. The SVM, whose writes land in
    /// memory, otherwise answers the PVM's whole backlog of requests ahead of it, and every
    /// checkpoint throws that away. 1 lets a lone request go on both VMs at once; `off`
    /// turns it off.
    #[arg(long, default_value = "1", value_parser = parse_flush_lead)]
    pub svm_flush_lead: FlushLead,
    /// Guest RAM of each VM [default: 64MiB; 256MiB with --kernel]. Above 3GiB the RAM is
    /// split around the 32-bit hole.
    #[arg(long, value_parser = parse_size)]
    pub ram: Option<u64>,
    /// vCPUs of each VM (1 to 8; both sides get the same). vCPU 0 serves; each other vCPU
    /// runs a worker that dirties its share of --dirty-rate and counts, and the client
    /// checks with the service's VCPUS command that no count ever goes back (across
    /// checkpoints and failover).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub vcpus: u32,
    /// Pages per second each guest dirties (in all, shared evenly by its vCPUs).
    #[arg(long, default_value_t = 0)]
    pub dirty_rate: u64,
    /// Which pages the guests dirty: zipf (a working set, a few pages very often), hot (a
    /// fixed 4 MiB per vCPU rewritten in turn) or sweep (every page in turn). Hot and sweep
    /// check each page before writing it again, so a page a checkpoint missed stops the
    /// guest (exit status 7, "memory lost").
    #[arg(long, default_value = "zipf", value_parser = crate::args::parse_pattern)]
    pub dirty_pattern: colo_machine::DirtyPattern,
    /// Put the TSC into every reply, so PVM and SVM answer differently (mismatches).
    #[arg(long)]
    pub nondeterministic: bool,
    /// Requests the client keeps in flight on its connection (pipelining). Periodic mode
    /// releases output only at checkpoints, so its throughput depends on this. 0: no
    /// client load at all (an idle pair).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// The primary's disk image (a raw file, used in place). The secondary starts from a
    /// sparse copy beside it, `<image>.secondary`, kept when the pair ends: after a
    /// failover that copy is the current disk (the summary says so). Default: a fresh
    /// image for each side in the scratch directory.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Serve the guest's clients on this tap device (created if missing; needs root)
    /// instead of colo's own client load: the proxy compares the two VMs' output and
    /// releases it there, and switches to the secondary at failover.
    #[arg(long)]
    pub tap: Option<String>,
    /// With --tap: the host side's address, or "none" to leave the tap unconfigured.
    #[arg(long, default_value = "10.0.2.1/24", requires = "tap")]
    pub host_ip: String,
    /// Show the guests' consoles and the children's logs.
    #[arg(long)]
    pub verbose: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Baseline: run the primary alone, unprotected (no secondary, no checkpoints), behind
    /// the same proxy and client load.
    #[arg(long)]
    pub unprotected: bool,
    /// Append every checkpoint's record (epoch, trigger, pause_us, push_us, barrier_us,
    /// pages, bytes) as one JSON line to this file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
}

const GUEST: ([u8; 4], u16) = ([10, 0, 2, 15], 7000);
const CLIENT_IP: ([u8; 4], u8) = ([10, 0, 2, 100], 24);

/// Who talks to the guest through the proxy's client port.
pub(super) enum Clients {
    /// colo's own client load (the built-in guest's key-value service), on this end of a
    /// channel.
    Load(colo_netcmp::io::channel::VmEnd),
    /// The user's own clients, on the host side of a tap device.
    Tap,
    /// Nobody: `--pipeline 0`, or a kernel of the user's without `--tap`. The end is
    /// held for as long as the pair runs (the proxy ends when its client port closes).
    Idle(colo_netcmp::io::channel::VmEnd),
}

/// The running client side of the pair.
pub(super) enum Client {
    /// colo's client load: its thread returns the acknowledged writes.
    Load(std::thread::JoinHandle<std::collections::HashMap<u64, u64>>),
    /// No load (the tap's users, or nobody); an idle client port's end, kept open.
    None {
        _idle: Option<colo_netcmp::io::channel::VmEnd>,
    },
}

impl Client {
    /// Waits for the load to stop (after its stop flag is set) and returns the writes the
    /// guest acknowledged: key to value (none without colo's load).
    pub(super) fn finish(self) -> std::collections::HashMap<u64, u64> {
        match self {
            Client::Load(t) => t.join().unwrap_or_default(),
            Client::None { .. } => std::collections::HashMap::new(),
        }
    }
}

/// `colo pair --svm-flush-lead`: a lead in flushes, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushLead(pub Option<u64>);

fn parse_flush_lead(s: &str) -> std::result::Result<FlushLead, String> {
    match s.trim() {
        "off" => Ok(FlushLead(None)),
        n => n
            .parse()
            .map(|n| FlushLead(Some(n)))
            .map_err(|_| format!("'{s}' is not a number of flushes or `off`")),
    }
}

impl PairArgs {
    /// Whether colo's own client load runs (the built-in guest, no --tap, a pipeline).
    fn client_load(&self) -> bool {
        self.kernel.kernel.is_none() && self.tap.is_none() && self.pipeline > 0
    }
}

/// Starts the proxy with `config`: its client port is a channel for colo's client load
/// (the returned end is the client's), the tap of `--tap`, or a channel nobody uses; its
/// primary and secondary ports the Unix sockets `primary.sock` and `secondary.sock` in
/// `dir`, where the VMs connect.
///
/// # Errors
/// A socket or tap that cannot be set up, or a proxy that does not start.
fn start_proxy(
    a: &PairArgs,
    dir: &Path,
    config: colo_netcmp::Config,
) -> Result<(Proxy, Clients), ColoError> {
    let (client_port, clients) = match &a.tap {
        Some(name) => {
            let tap = colo_netcmp::io::tap::Tap::open(name).map_err(ColoError::Proxy)?;
            configure_tap(name, &a.host_ip)?;
            eprintln!(
                "colo pair: the guest's clients reach it on tap {name} (host side {})",
                a.host_ip
            );
            (tap.into_port().map_err(ColoError::Proxy)?, Clients::Tap)
        }
        None => {
            let (port, end) = colo_netcmp::io::channel::port("client", 4096);
            if a.client_load() {
                (port, Clients::Load(end))
            } else {
                eprintln!("colo pair: no client load (--pipeline 0, or --kernel without --tap)");
                (port, Clients::Idle(end))
            }
        }
    };
    let ports = Ports {
        client: client_port,
        primary: colo_netcmp::io::stream::listen_unix(&dir.join("primary.sock"))
            .map_err(ColoError::Proxy)?,
        secondary: colo_netcmp::io::stream::listen_unix(&dir.join("secondary.sock"))
            .map_err(ColoError::Proxy)?,
    };
    let proxy = Proxy::start(config, ports).map_err(ColoError::Proxy)?;
    Ok((proxy, clients))
}

/// Runs `colo pair`.
///
/// # Errors
/// A side that cannot start, or a client that saw lost or contradicted data.
pub fn run(a: &PairArgs) -> Result<(), ColoError> {
    catch_interrupts();
    let dir = std::env::temp_dir().join(format!("colo-pair-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(ColoError::file("create", &dir))?;
    let r = if a.unprotected {
        unprotected::run(a, &dir)
    } else {
        supervisor::run(a, &dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Starts colo's client load on the proxy's client port, if it is colo's.
fn start_client(
    window: usize,
    vcpus: u32,
    clients: Clients,
    stats: &Arc<ClientStats>,
    stop: &Arc<AtomicBool>,
) -> Client {
    let client_end = match clients {
        Clients::Load(end) => end,
        Clients::Tap => return Client::None { _idle: None },
        Clients::Idle(end) => return Client::None { _idle: Some(end) },
    };
    let (stats, stop) = (Arc::clone(stats), Arc::clone(stop));
    let rx = client_end.receiver().clone();
    let net = ClientNet {
        ip: CLIENT_IP,
        server: GUEST,
        window,
        vcpus,
    };
    Client::Load(std::thread::spawn(move || {
        let out: colo_machine::peer::FrameOut = Box::new(move |f| {
            let _ = client_end.send(f);
        });
        client::run(net, out, rx, &stats, &stop)
    }))
}

#[cfg(test)]
mod flush_lead_tests {
    use super::*;

    #[test]
    fn a_flush_lead_is_a_number_or_off() {
        assert_eq!(parse_flush_lead("1"), Ok(FlushLead(Some(1))));
        assert_eq!(parse_flush_lead(" 0 "), Ok(FlushLead(Some(0))));
        assert_eq!(parse_flush_lead("off"), Ok(FlushLead(None)));
        assert!(parse_flush_lead("-1").is_err());
        assert!(parse_flush_lead("").is_err());
    }
}
