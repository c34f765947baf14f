//! `colo proxy`: the proxy on its own, without a COLO controller.

use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use tracing::{info, info_span, warn};

use super::{ClusterPorts, ClusterProxy, Ports, Proxy, ProxyControl};
use crate::config::Config;
use crate::error::Result;
use crate::io::{Port, PortSpec};

/// Everything `colo proxy` needs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The compare engine's limits and policies.
    pub engine: Config,
    /// The client port.
    pub client: PortSpec,
    /// The VM ports.
    pub vms: VmPorts,
    /// With no controller to take checkpoints, each request is logged and treated as
    /// committed after this delay.
    pub commit_delay: Duration,
    /// Stop after this long (run until a port closes if `None`).
    pub duration: Option<Duration>,
    /// How often the counters are logged.
    pub stats_interval: Duration,
}

/// The VM ports of `colo proxy`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum VmPorts {
    /// A fixed primary and secondary, compared.
    Pair {
        /// The primary VM's port.
        primary: PortSpec,
        /// The secondary VM's port.
        secondary: PortSpec,
    },
    /// Cluster mode ([`ClusterProxy`]): two ports by place; the VMs' role words say which
    /// one serves.
    Cluster([PortSpec; 2]),
}

/// Runs the proxy standalone until `duration` passes or a port closes.
///
/// There is no COLO controller here, so nothing can make the secondary a copy of the
/// primary: each checkpoint request is logged with its reason and treated as committed
/// after `commit_delay`, which releases the held output. This makes the command a live
/// monitor of where two VMs' outputs diverge.
///
/// # Errors
/// A port cannot be opened, or fails or closes while running.
pub fn run(config: ProxyConfig) -> Result<()> {
    run_observed(config, |_| {})
}

/// As [`run`], handing `started` a control of the proxy once it runs (to read its
/// counters from another thread, e.g. for a metrics endpoint).
///
/// # Errors
/// As for [`run`].
pub fn run_observed(config: ProxyConfig, started: impl FnOnce(ProxyControl)) -> Result<()> {
    let span = info_span!("proxy");
    let _g = span.enter();
    config.engine.validate()?;
    let (primary, secondary) = match &config.vms {
        VmPorts::Pair { primary, secondary } => (primary, secondary),
        VmPorts::Cluster(vms) => return run_cluster(&config, vms, started),
    };
    let ports = Ports {
        client: Port::open(&config.client)?,
        primary: Port::open(primary)?,
        secondary: Port::open(secondary)?,
    };
    info!(
        client = %config.client, %primary, %secondary,
        compare_timeout_ms = config.engine.compare_timeout.as_millis(),
        max_queue_size = config.engine.max_queue_size,
        passthrough = config.engine.passthrough.len(),
        "proxy running"
    );
    let proxy = Proxy::start(config.engine.clone(), ports)?;
    started(proxy.control());
    let start = Instant::now();
    let mut next_stats = start + config.stats_interval;
    loop {
        let now = Instant::now();
        if config.duration.is_some_and(|d| now >= start + d) {
            break;
        }
        let mut until = next_stats;
        if let Some(d) = config.duration {
            until = until.min(start + d);
        }
        match proxy
            .checkpoint_requests()
            .recv_timeout(until.saturating_duration_since(now))
        {
            Ok(req) => {
                warn!(%req, "checkpoint requested; no controller: treating it as committed");
                std::thread::sleep(config.commit_delay);
                proxy.control().checkpoint_committed()?;
            }
            Err(RecvTimeoutError::Timeout) => {}
            // The engine thread stopped: a port failed or closed.
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_stats {
            info!(metrics = %proxy.metrics(), "proxy counters");
            next_stats = Instant::now() + config.stats_interval;
        }
    }
    let m = proxy.metrics();
    let r = proxy.shutdown();
    info!(metrics = %m, "proxy stopped");
    r
}

/// Cluster mode: runs until `duration` passes or the client port closes; the VM ports
/// outlive their peers. Checkpoint requests never arise from a controller here: the
/// serving VM's commit markers release its output.
fn run_cluster(
    config: &ProxyConfig,
    vms: &[PortSpec; 2],
    started: impl FnOnce(ProxyControl),
) -> Result<()> {
    let ports = ClusterPorts {
        client: Port::open(&config.client)?,
        vms: [Port::open(&vms[0])?, Port::open(&vms[1])?],
    };
    info!(
        client = %config.client, vm0 = %vms[0], vm1 = %vms[1],
        "proxy running in cluster mode: the VMs' role words say which one serves"
    );
    let proxy = ClusterProxy::start(config.engine.clone(), ports)?;
    started(proxy.control());
    let start = Instant::now();
    let mut next_stats = start + config.stats_interval;
    while !proxy.is_finished() && config.duration.is_none_or(|d| start.elapsed() < d) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if Instant::now() >= next_stats {
            info!(metrics = %proxy.metrics(), roles = ?proxy.roles(), "proxy counters");
            next_stats = Instant::now() + config.stats_interval;
        }
    }
    let m = proxy.metrics();
    let r = proxy.shutdown();
    info!(metrics = %m, "proxy stopped");
    r
}
