//! Connection identity: the protocol and the two endpoints of a flow, oriented from the VM.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// The protocol of a flow, as the proxy distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Protocol {
    /// TCP: compared as a byte stream.
    Tcp,
    /// UDP: compared by payload.
    Udp,
    /// ICMP for IPv4: compared by the whole ICMP message.
    Icmp,
    /// ICMP for IPv6: compared by the whole ICMPv6 message.
    Icmpv6,
    /// Another IP protocol (the IP protocol number): compared by IP payload.
    Ip(u8),
    /// A non-IP frame (its EtherType, e.g. ARP): compared by whole frame.
    Ether(u16),
}

impl Protocol {
    /// The protocol's name as passthrough rules and logs spell it.
    pub fn name(&self) -> String {
        match self {
            Self::Tcp => "tcp".into(),
            Self::Udp => "udp".into(),
            Self::Icmp => "icmp".into(),
            Self::Icmpv6 => "icmpv6".into(),
            Self::Ip(n) => format!("ip-proto-{n}"),
            Self::Ether(t) => format!("ethertype-{t:#06x}"),
        }
    }
}

/// One end of a flow: an address and a port (zero where the protocol has none; the echo
/// identifier for ICMP echo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// The IP address (unspecified for non-IP frames).
    pub addr: IpAddr,
    /// The port.
    pub port: u16,
}

impl Endpoint {
    /// An endpoint.
    pub fn new(addr: IpAddr, port: u16) -> Self {
        Self { addr, port }
    }

    /// The endpoint of non-IP frames.
    pub fn none() -> Self {
        Self::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// The identity of a connection: VLAN, protocol, the VM's endpoint and the peer's.
///
/// Both directions of a connection map to the same key: for output of the VMs the VM end is
/// the source, for client input it is the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The outermost VLAN id, if the frame was tagged.
    pub vlan: Option<u16>,
    /// The protocol.
    pub protocol: Protocol,
    /// The VM's end.
    pub vm: Endpoint,
    /// The client's (peer's) end.
    pub peer: Endpoint,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vm {} <-> {}",
            self.protocol.name(),
            self.vm,
            self.peer
        )?;
        if let Some(v) = self.vlan {
            write!(f, " vlan {v}")?;
        }
        Ok(())
    }
}

/// Which of the proxy's three ports a frame came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client (the outside network).
    Client,
    /// The primary VM.
    Primary,
    /// The secondary VM.
    Secondary,
}

impl Side {
    /// The side's name in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Primary => "primary",
            Self::Secondary => "secondary",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
