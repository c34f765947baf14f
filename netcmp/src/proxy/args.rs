//! The `colo proxy` command line.

use std::time::Duration;

use clap::Args;

use super::run::ProxyConfig;
use crate::config::{Config, MalformedPolicy};
use crate::error::Result;
use crate::io::PortSpec;
use crate::passthrough::PassthroughRule;

/// `colo proxy`: run the COLO proxy on its own.
///
/// Client frames are mirrored to both VMs; the VMs' output is compared and the primary's
/// released when it matches. Ports are `tap:NAME`, `unix:PATH`, `unix-listen:PATH`,
/// `tcp:HOST:PORT` or `tcp-listen:HOST:PORT` (sockets carry frames as a 4-byte big-endian
/// length then the frame, like QEMU's socket chardev with vnet_hdr off).
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Without a COLO controller, each checkpoint request is logged with its reason \
                  and treated as committed after --commit-delay-ms. Counters are logged every \
                  --stats-interval seconds and at exit."
)]
pub struct ProxyArgs {
    /// The client port.
    #[arg(long, value_parser = parse_port)]
    client: PortSpec,

    /// The primary VM's port.
    #[arg(long, value_parser = parse_port)]
    primary: PortSpec,

    /// The secondary VM's port.
    #[arg(long, value_parser = parse_port)]
    secondary: PortSpec,

    /// How long a primary packet waits for its secondary counterpart, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    compare_timeout_ms: u64,

    /// How often queues are scanned for expired packets, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    expired_scan_cycle_ms: u64,

    /// Most packets queued per connection and side; past it a checkpoint is forced.
    #[arg(long, default_value_t = 1024)]
    max_queue_size: usize,

    /// Most connections tracked.
    #[arg(long, default_value_t = 65536)]
    max_connections: usize,

    /// Flows never compared, e.g. `udp:123` or `tcp:10.0.0.5:22` (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', value_parser = parse_rule)]
    passthrough: Vec<PassthroughRule>,

    /// What to do with frames that do not parse.
    #[arg(long, value_enum, default_value = "forward")]
    malformed: Malformed,

    /// An empty frame from the primary is its commit marker (`colo primary
    /// --commit-marker`): the held output before it is released, in order with the
    /// primary's frames. Without it an empty frame is malformed.
    #[arg(long)]
    commit_marker: bool,

    /// Pace the secondary, in milliseconds: when its oldest output still waiting for the
    /// primary's is older than this, tell it to hold its VM (a one-byte frame a colo
    /// secondary understands) until that falls under half. Needs a socket port for the
    /// secondary. Default: off.
    #[arg(long)]
    secondary_lead_ms: Option<u64>,

    /// Delay before a checkpoint request counts as committed, in milliseconds.
    #[arg(long, default_value_t = 0)]
    commit_delay_ms: u64,

    /// Stop after this many seconds (default: run until a port closes).
    #[arg(long)]
    duration_secs: Option<u64>,

    /// Seconds between counter logs.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
}

/// `--malformed` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Malformed {
    /// Count and forward unchanged.
    Forward,
    /// Count and drop.
    Drop,
}

fn parse_port(s: &str) -> std::result::Result<PortSpec, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

fn parse_rule(s: &str) -> std::result::Result<PassthroughRule, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

impl ProxyArgs {
    /// The checked configuration.
    ///
    /// # Errors
    /// [`crate::Error::Config`] when a limit is zero, or pacing is asked for a secondary
    /// on a tap.
    pub fn config(&self) -> Result<ProxyConfig> {
        let engine = Config {
            compare_timeout: Duration::from_millis(self.compare_timeout_ms),
            expired_scan_cycle: Duration::from_millis(self.expired_scan_cycle_ms),
            max_queue_size: self.max_queue_size,
            max_connections: self.max_connections,
            malformed: match self.malformed {
                Malformed::Forward => MalformedPolicy::Forward,
                Malformed::Drop => MalformedPolicy::Drop,
            },
            passthrough: self.passthrough.clone(),
            commit_marker: self.commit_marker,
            secondary_lead: self.secondary_lead_ms.map(Duration::from_millis),
            ..Config::default()
        };
        engine.validate()?;
        if engine.secondary_lead.is_some() && matches!(self.secondary, PortSpec::Tap(_)) {
            return Err(crate::Error::Config(
                "--secondary-lead-ms needs a socket port for the secondary: a tap cannot carry the pacing words".into(),
            ));
        }
        Ok(ProxyConfig {
            engine,
            client: self.client.clone(),
            primary: self.primary.clone(),
            secondary: self.secondary.clone(),
            commit_delay: Duration::from_millis(self.commit_delay_ms),
            duration: self.duration_secs.map(Duration::from_secs),
            stats_interval: Duration::from_secs(self.stats_interval.max(1)),
        })
    }
}
