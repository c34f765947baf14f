//! The `colo proxy` command line.

use std::time::Duration;

use clap::Args;

use super::run::{ProxyConfig, VmPorts};
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
///
/// With `--cluster`, the two VM ports are named by place (`--vm` twice) and the VMs say
/// which one serves (see `--cluster`).
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Without a COLO controller, each checkpoint request is logged with its reason \
                  and treated as committed after --commit-delay-ms. Counters are logged every \
                  --stats-interval seconds and at exit.\n\n\
                  Cluster mode (--cluster --vm unix-listen:A --vm unix-listen:B), for sides that \
                  a cluster manager starts, promotes and restarts (colo primary|secondary \
                  --role-words --net-socket ...): each VMM says on its socket, in order with \
                  its frames, one-byte role words: 'F' follower (a secondary: its output is \
                  dropped, it gets no client traffic), 'P' protected (it serves; its output \
                  is held until its next commit marker, an empty frame), 'A' alone (it serves \
                  unprotected; its output is released at once). Client frames go to the \
                  serving port only. A port that says P or A while the other serves takes \
                  over: the old one's output that no marker covered is dropped. A port whose \
                  side goes away loses its role (its uncovered output is dropped) and accepts \
                  the restarted side; nothing from a port that has said no word reaches the \
                  clients. Only periodic checkpointing (--mode periodic on both sides) is \
                  supported: nothing is compared. The proxy stops only when the client port \
                  closes or --duration-secs ends."
)]
pub struct ProxyArgs {
    /// The client port.
    #[arg(long, value_parser = parse_port)]
    client: PortSpec,

    /// The primary VM's port.
    #[arg(long, value_parser = parse_port, required_unless_present = "cluster")]
    primary: Option<PortSpec>,

    /// The secondary VM's port.
    #[arg(long, value_parser = parse_port, required_unless_present = "cluster")]
    secondary: Option<PortSpec>,

    /// Cluster mode: no fixed primary and secondary. Two VM ports by place (`--vm` twice,
    /// listening sockets that accept a restarted side again), and the VMs' role words
    /// (`colo primary|secondary --role-words`) say which one serves and whether its output
    /// waits for its commit markers. A closing VM port never stops the proxy. Periodic
    /// checkpointing only (see below).
    #[arg(
        long,
        requires = "vm",
        conflicts_with_all = ["primary", "secondary", "secondary_lead_ms", "commit_delay_ms"]
    )]
    cluster: bool,

    /// With --cluster: a VM port (give it twice), `unix-listen:PATH` or
    /// `tcp-listen:HOST:PORT`.
    #[arg(long = "vm", value_parser = parse_port)]
    vm: Vec<PortSpec>,

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
    /// [`crate::Error::Config`] when a limit is zero, pacing is asked for a secondary on a
    /// tap, or cluster mode lacks two listening VM ports.
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
        let vms = self.vm_ports()?;
        if engine.secondary_lead.is_some()
            && matches!(
                &vms,
                VmPorts::Pair {
                    secondary: PortSpec::Tap(_),
                    ..
                }
            )
        {
            return Err(crate::Error::Config(
                "--secondary-lead-ms needs a socket port for the secondary: a tap cannot carry the pacing words".into(),
            ));
        }
        Ok(ProxyConfig {
            engine,
            client: self.client.clone(),
            vms,
            commit_delay: Duration::from_millis(self.commit_delay_ms),
            duration: self.duration_secs.map(Duration::from_secs),
            stats_interval: Duration::from_secs(self.stats_interval.max(1)),
        })
    }

    fn vm_ports(&self) -> Result<VmPorts> {
        if !self.cluster {
            if !self.vm.is_empty() {
                return Err(crate::Error::Config("--vm needs --cluster".into()));
            }
            return match (&self.primary, &self.secondary) {
                (Some(p), Some(s)) => Ok(VmPorts::Pair {
                    primary: p.clone(),
                    secondary: s.clone(),
                }),
                _ => Err(crate::Error::Config(
                    "--primary and --secondary are needed (or --cluster with two --vm)".into(),
                )),
            };
        }
        let [a, b] = self.vm.as_slice() else {
            return Err(crate::Error::Config(format!(
                "--cluster needs two --vm ports, not {}",
                self.vm.len()
            )));
        };
        for p in [a, b] {
            if !matches!(p, PortSpec::UnixListen(_) | PortSpec::TcpListen(_)) {
                return Err(crate::Error::Config(format!(
                    "--vm {p}: a cluster VM port must listen (unix-listen:PATH or \
                     tcp-listen:HOST:PORT), so that a restarted side can connect again"
                )));
            }
        }
        if a == b {
            return Err(crate::Error::Config(format!("--vm {a} given twice")));
        }
        Ok(VmPorts::Cluster([a.clone(), b.clone()]))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<ProxyArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("colo-proxy").chain(args.iter().copied()))
            .map(|c| c.proxy)
    }

    #[test]
    fn cluster_takes_two_listening_vm_ports_by_place() {
        let a = parse(&[
            "--client",
            "tcp-listen:127.0.0.1:9000",
            "--cluster",
            "--vm",
            "unix-listen:/tmp/a.sock",
            "--vm",
            "tcp-listen:127.0.0.1:9001",
        ])
        .unwrap();
        let c = a.config().unwrap();
        let VmPorts::Cluster([x, y]) = c.vms else {
            panic!("not cluster ports: {:?}", c.vms);
        };
        assert_eq!(x.to_string(), "unix-listen:/tmp/a.sock");
        assert_eq!(y.to_string(), "tcp-listen:127.0.0.1:9001");
    }

    #[test]
    fn cluster_refuses_fixed_roles_one_port_and_connecting_ports() {
        let base = ["--client", "tap:c0", "--cluster"];
        let with = |more: &[&str]| parse(&[&base[..], more].concat());
        // Fixed roles and the compare-only options do not mix with it.
        assert!(
            with(&[
                "--vm",
                "unix-listen:/a",
                "--vm",
                "unix-listen:/b",
                "--primary",
                "unix-listen:/p"
            ])
            .is_err()
        );
        assert!(
            with(&[
                "--vm",
                "unix-listen:/a",
                "--vm",
                "unix-listen:/b",
                "--secondary-lead-ms",
                "5"
            ])
            .is_err()
        );
        // --vm only with --cluster, and --cluster needs --vm.
        let a = parse(&[
            "--client",
            "tap:c0",
            "--primary",
            "unix-listen:/p",
            "--secondary",
            "unix-listen:/s",
            "--vm",
            "unix-listen:/a",
        ])
        .unwrap();
        assert!(matches!(a.config(), Err(crate::Error::Config(_))));
        assert!(with(&[]).is_err());
        for vms in [
            &["--vm", "unix-listen:/a"][..],
            &[
                "--vm",
                "unix-listen:/a",
                "--vm",
                "unix-listen:/b",
                "--vm",
                "unix-listen:/c",
            ],
            &["--vm", "unix:/a", "--vm", "unix-listen:/b"],
            &["--vm", "unix-listen:/a", "--vm", "unix-listen:/a"],
        ] {
            let a = with(vms).unwrap();
            assert!(
                matches!(a.config(), Err(crate::Error::Config(_))),
                "{vms:?}"
            );
        }
        // Without --cluster, the fixed roles are still required.
        assert!(parse(&["--client", "tap:c0", "--primary", "unix-listen:/p"]).is_err());
        let a = parse(&[
            "--client",
            "tap:c0",
            "--primary",
            "unix-listen:/p",
            "--secondary",
            "unix-listen:/s",
        ])
        .unwrap();
        assert!(matches!(a.config().unwrap().vms, VmPorts::Pair { .. }));
    }
}
