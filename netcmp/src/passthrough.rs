//! Passthrough rules: flows whose output is known to differ between the VMs (a random
//! nonce, a clock) and must never trigger a checkpoint. The primary's output of a matching
//! flow is released at once; the secondary's is only tracked (TCP sequence offsets) and
//! dropped.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::Error;
use crate::flow::{FlowKey, Protocol};

/// Which protocols a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuleProtocol {
    /// Every protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
}

/// One rule: a protocol, optionally an address and a port of either end of the flow.
///
/// Written `PROTO`, `PROTO:PORT` or `PROTO:ADDR:PORT` (IPv6 addresses in brackets), with
/// PROTO one of `tcp`, `udp`, `icmp`, `any`; e.g. `udp:123`, `tcp:[fd00::1]:22`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughRule {
    /// The protocol.
    pub protocol: RuleProtocol,
    /// An address either end must have.
    pub addr: Option<IpAddr>,
    /// A port either end must have.
    pub port: Option<u16>,
}

impl PassthroughRule {
    /// A rule for every flow of `protocol` with `port` at either end.
    pub fn port(protocol: RuleProtocol, port: u16) -> Self {
        Self {
            protocol,
            addr: None,
            port: Some(port),
        }
    }

    /// Whether the flow matches.
    pub fn matches(&self, key: &FlowKey) -> bool {
        let proto = match self.protocol {
            RuleProtocol::Any => true,
            RuleProtocol::Tcp => key.protocol == Protocol::Tcp,
            RuleProtocol::Udp => key.protocol == Protocol::Udp,
            RuleProtocol::Icmp => matches!(key.protocol, Protocol::Icmp | Protocol::Icmpv6),
        };
        let addr = self
            .addr
            .is_none_or(|a| key.vm.addr == a || key.peer.addr == a);
        let port = self
            .port
            .is_none_or(|p| key.vm.port == p || key.peer.port == p);
        proto && addr && port
    }
}

impl FromStr for PassthroughRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("passthrough rule {s:?}: {why}"));
        let (proto, rest) = s.split_once(':').unwrap_or((s, ""));
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "any" => RuleProtocol::Any,
            "tcp" => RuleProtocol::Tcp,
            "udp" => RuleProtocol::Udp,
            "icmp" => RuleProtocol::Icmp,
            _ => return Err(bad("protocol must be tcp, udp, icmp or any")),
        };
        if rest.is_empty() {
            return Ok(Self {
                protocol,
                addr: None,
                port: None,
            });
        }
        let (addr, port) = match rest.rsplit_once(':') {
            Some((a, p)) => {
                let a = a.trim_start_matches('[').trim_end_matches(']');
                let a = a
                    .parse::<IpAddr>()
                    .map_err(|_| bad("bad address (IPv6 goes in brackets)"))?;
                (Some(a), p)
            }
            None => (None, rest),
        };
        let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
        Ok(Self {
            protocol,
            addr,
            port: Some(port),
        })
    }
}

impl fmt::Display for PassthroughRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.protocol {
            RuleProtocol::Any => "any",
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::Icmp => "icmp",
        };
        f.write_str(p)?;
        match (self.addr, self.port) {
            (Some(IpAddr::V6(a)), Some(port)) => write!(f, ":[{a}]:{port}"),
            (Some(a), Some(port)) => write!(f, ":{a}:{port}"),
            (None, Some(port)) => write!(f, ":{port}"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::flow::Endpoint;

    fn key(protocol: Protocol, vm_port: u16, peer_port: u16) -> FlowKey {
        FlowKey {
            vlan: None,
            protocol,
            vm: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), vm_port),
            peer: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), peer_port),
        }
    }

    #[test]
    fn parses_and_matches() {
        let r: PassthroughRule = "udp:123".parse().unwrap();
        assert!(r.matches(&key(Protocol::Udp, 123, 5000)));
        assert!(r.matches(&key(Protocol::Udp, 5000, 123)));
        assert!(!r.matches(&key(Protocol::Tcp, 123, 5000)));
        let r: PassthroughRule = "tcp:198.18.0.2:22".parse().unwrap();
        assert!(r.matches(&key(Protocol::Tcp, 22, 40000)));
        assert!(!r.matches(&key(Protocol::Tcp, 23, 40000)));
        let r: PassthroughRule = "TCP:[fd00::1]:22".parse().unwrap();
        assert_eq!(r.to_string(), "tcp:[fd00::1]:22");
        assert!(
            "icmp"
                .parse::<PassthroughRule>()
                .unwrap()
                .matches(&key(Protocol::Icmpv6, 1, 1))
        );
        assert!("any".parse::<PassthroughRule>().unwrap().matches(&key(
            Protocol::Ether(0x806),
            0,
            0
        )));
        for bad in ["", "sctp:1", "tcp:x", "tcp:1.2.3:4", "udp:70000"] {
            assert!(bad.parse::<PassthroughRule>().is_err(), "{bad}");
        }
    }
}
