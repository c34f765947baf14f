//! Connection identity: the protocol and the two endpoints of a flow, oriented from the VM.

use std::fmt;
use std::hash::{Hash, Hasher};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// Bytes of [`FlowKey`]'s hash input: VLAN (3), protocol (3), two endpoints (19 each).
const KEY_BYTES: usize = 3 + 3 + 2 * ENDPOINT_BYTES;
/// Bytes of an endpoint in it: address family, 16 address bytes, port.
const ENDPOINT_BYTES: usize = 1 + 16 + 2;

impl Endpoint {
    /// The endpoint's fixed-size encoding (address family, address, port).
    fn encode(&self) -> [u8; ENDPOINT_BYTES] {
        let mut b = [0u8; ENDPOINT_BYTES];
        match self.addr {
            IpAddr::V4(a) => {
                b[0] = 4;
                b[1..5].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                b[0] = 6;
                b[1..17].copy_from_slice(&a.octets());
            }
        }
        b[17..19].copy_from_slice(&self.port.to_be_bytes());
        b
    }
}

impl Hash for FlowKey {
    /// One write of a fixed-size encoding of every field (the engine hashes a key for
    /// every frame; one write costs far less than a dozen small ones). Keys that are equal
    /// encode the same, as `Hash` requires; different keys encode differently.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; KEY_BYTES];
        if let Some(v) = self.vlan {
            b[0] = 1;
            b[1..3].copy_from_slice(&v.to_be_bytes());
        }
        let (tag, value) = match self.protocol {
            Protocol::Tcp => (0u8, 0u16),
            Protocol::Udp => (1, 0),
            Protocol::Icmp => (2, 0),
            Protocol::Icmpv6 => (3, 0),
            Protocol::Ip(n) => (4, u16::from(n)),
            Protocol::Ether(t) => (5, t),
        };
        b[3] = tag;
        b[4..6].copy_from_slice(&value.to_be_bytes());
        b[6..6 + ENDPOINT_BYTES].copy_from_slice(&self.vm.encode());
        b[6 + ENDPOINT_BYTES..].copy_from_slice(&self.peer.encode());
        state.write(&b);
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::hash::BuildHasher;
    use std::net::Ipv6Addr;

    use super::*;

    fn key(vlan: Option<u16>, protocol: Protocol, vm: IpAddr, peer: IpAddr) -> FlowKey {
        FlowKey {
            vlan,
            protocol,
            vm: Endpoint::new(vm, 80),
            peer: Endpoint::new(peer, 40000),
        }
    }

    #[test]
    fn equal_keys_hash_equal_and_fields_tell_keys_apart() {
        let s = std::hash::RandomState::new();
        let v4 = |n: u8| IpAddr::V4(Ipv4Addr::new(198, 18, 0, n));
        let v6 = |n: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n));
        let keys = [
            key(None, Protocol::Tcp, v4(2), v4(1)),
            key(Some(0), Protocol::Tcp, v4(2), v4(1)),
            key(Some(7), Protocol::Tcp, v4(2), v4(1)),
            key(None, Protocol::Udp, v4(2), v4(1)),
            key(None, Protocol::Ip(6), v4(2), v4(1)),
            key(None, Protocol::Ether(6), v4(2), v4(1)),
            key(None, Protocol::Tcp, v4(1), v4(2)),
            key(None, Protocol::Tcp, v6(2), v4(1)),
            key(None, Protocol::Tcp, v4(2), v6(1)),
            key(None, Protocol::Tcp, v6(2), v6(1)),
        ];
        for k in keys {
            assert_eq!(s.hash_one(k), s.hash_one(k));
        }
        let distinct: HashSet<u64> = keys.iter().map(|k| s.hash_one(k)).collect();
        assert_eq!(distinct.len(), keys.len());
        let set: HashSet<FlowKey> = keys.iter().copied().chain(keys).collect();
        assert_eq!(set.len(), keys.len());
    }
}
