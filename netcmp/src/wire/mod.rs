//! Reading frames: Ethernet, VLAN, IPv4, IPv6, TCP, UDP and ICMP, through etherparse.
//!
//! [`parse`] turns a frame into a [`Parsed`] summary that holds only numbers and byte
//! ranges into the frame, so the frame itself can be moved into a queue afterwards. Every
//! length is checked by etherparse before any range is taken; a frame it refuses is
//! [`Malformed`] and never reaches the compare logic. No code here can panic on input.

mod rewrite;

use std::net::IpAddr;
use std::ops::Range;

use etherparse::{Ipv6ExtensionSlice, LinkExtSlice, NetSlice, SlicedPacket, TransportSlice};

use crate::flow::{Endpoint, FlowKey, Protocol};

pub use rewrite::{Deltas, RewriteError, Rewritten, rewrite_tcp};

/// The TCP header fields the compare engine uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful when `flags.ack`).
    pub ack: u32,
    /// The control flags.
    pub flags: TcpFlags,
    /// The timestamp option's TSval, read from SYN segments only (where the proxy learns
    /// each side's timestamp clock).
    pub syn_tsval: Option<u32>,
    /// Where the TCP payload lies in the frame.
    pub payload: Range<usize>,
}

impl TcpSegment {
    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the segment carries no payload.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

/// TCP control flags that carry meaning for the compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// ACK.
    pub ack: bool,
}

/// What a frame carries, as far as the compare is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A TCP segment (not an IP fragment).
    Tcp(TcpSegment),
    /// Anything compared packet by packet: the bytes in `compare` (a range of the frame)
    /// plus `tag` (the fragment offset and more-fragments bit of a fragment, else zero)
    /// must be equal.
    Datagram {
        /// The bytes compared.
        compare: Range<usize>,
        /// Extra state compared alongside the bytes.
        tag: u32,
    },
}

/// A frame that parsed: its flow (oriented source to destination) and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The outermost VLAN id.
    pub vlan: Option<u16>,
    /// The protocol.
    pub protocol: Protocol,
    /// Source endpoint.
    pub src: Endpoint,
    /// Destination endpoint.
    pub dst: Endpoint,
    /// What is compared.
    pub payload: Payload,
}

impl Parsed {
    /// The flow key of a frame the VM sent (the VM is the source).
    pub fn egress_key(&self) -> FlowKey {
        FlowKey {
            vlan: self.vlan,
            protocol: self.protocol,
            vm: self.src,
            peer: self.dst,
        }
    }

    /// The flow key of a frame sent to the VM (the VM is the destination).
    pub fn ingress_key(&self) -> FlowKey {
        FlowKey {
            vlan: self.vlan,
            protocol: self.protocol,
            vm: self.dst,
            peer: self.src,
        }
    }

    /// The TCP segment, if this is one.
    pub fn tcp(&self) -> Option<&TcpSegment> {
        match &self.payload {
            Payload::Tcp(t) => Some(t),
            Payload::Datagram { .. } => None,
        }
    }
}

/// Why a frame could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where `sub`, a sub-slice of `frame`, starts inside it.
fn offset_in(frame: &[u8], sub: &[u8]) -> usize {
    (sub.as_ptr() as usize).saturating_sub(frame.as_ptr() as usize)
}

/// The range `sub`, a sub-slice of `frame`, covers inside it.
fn range_in(frame: &[u8], sub: &[u8]) -> Range<usize> {
    let start = offset_in(frame, sub);
    start..start + sub.len()
}

/// Parses an Ethernet frame (optionally VLAN-tagged).
///
/// # Errors
/// [`Malformed`] when etherparse refuses the frame: too short for a header it announces, a
/// bad IP version or header length, a TCP data offset outside the segment, and so on.
pub fn parse(frame: &[u8]) -> Result<Parsed, Malformed> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| Malformed(e.to_string()))?;
    let vlan = sliced.link_exts.iter().find_map(|e| match e {
        LinkExtSlice::Vlan(v) => Some(v.vlan_identifier().value()),
        LinkExtSlice::Macsec(_) => None,
    });
    let (src, dst, ip_payload) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                ip.payload(),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                ip.payload(),
            )
        }
        Some(NetSlice::Arp(_)) | None => {
            let ether_type = match &sliced.net {
                Some(NetSlice::Arp(_)) => etherparse::EtherType::ARP.0,
                _ => sliced.payload_ether_type().map_or(0, |t| t.0),
            };
            return Ok(Parsed {
                vlan,
                protocol: Protocol::Ether(ether_type),
                src: Endpoint::none(),
                dst: Endpoint::none(),
                payload: Payload::Datagram {
                    compare: 0..frame.len(),
                    tag: 0,
                },
            });
        }
    };
    let ip_number = ip_payload.ip_number.0;
    if ip_payload.fragmented {
        // Ports are only in the first fragment: key the fragment by addresses and compare
        // its IP payload together with its place in the datagram.
        let tag = fragment_tag(&sliced);
        return Ok(Parsed {
            vlan,
            protocol: ip_protocol(ip_number),
            src: Endpoint::new(src, 0),
            dst: Endpoint::new(dst, 0),
            payload: Payload::Datagram {
                compare: range_in(frame, ip_payload.payload),
                tag,
            },
        });
    }
    let (protocol, sport, dport, payload) = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => (
            Protocol::Tcp,
            t.source_port(),
            t.destination_port(),
            Payload::Tcp(TcpSegment {
                seq: t.sequence_number(),
                ack: t.acknowledgment_number(),
                flags: TcpFlags {
                    syn: t.syn(),
                    fin: t.fin(),
                    rst: t.rst(),
                    ack: t.ack(),
                },
                syn_tsval: if t.syn() { tsval(t) } else { None },
                payload: range_in(frame, t.payload()),
            }),
        ),
        Some(TransportSlice::Udp(u)) => (
            Protocol::Udp,
            u.source_port(),
            u.destination_port(),
            Payload::Datagram {
                compare: range_in(frame, u.payload()),
                tag: 0,
            },
        ),
        Some(TransportSlice::Icmpv4(i)) => {
            let id = echo_id(i.type_u8(), 0, 8, i.bytes5to8());
            let msg = Payload::Datagram {
                compare: range_in(frame, i.slice()),
                tag: 0,
            };
            (Protocol::Icmp, id, 0, msg)
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let id = echo_id(i.type_u8(), 129, 128, i.bytes5to8());
            let msg = Payload::Datagram {
                compare: range_in(frame, i.slice()),
                tag: 0,
            };
            (Protocol::Icmpv6, id, 0, msg)
        }
        Some(TransportSlice::Igmp(_)) | None => (
            ip_protocol(ip_number),
            0,
            0,
            Payload::Datagram {
                compare: range_in(frame, ip_payload.payload),
                tag: 0,
            },
        ),
    };
    // ICMP echo: both directions share the identifier, kept as the VM-side "port" of
    // requests and replies alike.
    let (sport, dport) = match protocol {
        Protocol::Icmp | Protocol::Icmpv6 => (sport, sport),
        _ => (sport, dport),
    };
    Ok(Parsed {
        vlan,
        protocol,
        src: Endpoint::new(src, sport),
        dst: Endpoint::new(dst, dport),
        payload,
    })
}

/// The TSval of a segment's timestamp option, if it has a readable one.
fn tsval(t: &etherparse::TcpSlice<'_>) -> Option<u32> {
    t.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::Timestamp(val, _)) => Some(val),
        _ => None,
    })
}

/// The echo identifier of an ICMP echo request or reply (types `reply`/`request`), else 0.
fn echo_id(ty: u8, reply: u8, request: u8, rest: [u8; 4]) -> u16 {
    if ty == reply || ty == request {
        u16::from_be_bytes([rest[0], rest[1]])
    } else {
        0
    }
}

/// The protocol of an IP protocol number.
fn ip_protocol(n: u8) -> Protocol {
    match n {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        1 => Protocol::Icmp,
        58 => Protocol::Icmpv6,
        n => Protocol::Ip(n),
    }
}

/// Fragment offset and more-fragments bit of a fragmented packet, as one number.
fn fragment_tag(sliced: &SlicedPacket<'_>) -> u32 {
    match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            (u32::from(h.fragments_offset().value()) << 1) | u32::from(h.more_fragments())
        }
        Some(NetSlice::Ipv6(ip)) => ip
            .extensions()
            .clone()
            .into_iter()
            .find_map(|e| match e {
                Ipv6ExtensionSlice::Fragment(f) => Some(
                    (u32::from(f.fragment_offset().value()) << 1) | u32::from(f.more_fragments()),
                ),
                _ => None,
            })
            .unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
