//! Golden frames, built and taken apart, and the TCP rewrite.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, TcpOptionElement};

use super::*;
use crate::testing::{CLIENT_MAC, Seg, VM_MAC, arp_reply, echo_reply_from_vm, udp_from_vm};

/// VM 198.18.0.2:80 -> client 198.18.0.1:40000, seq 0x01020304, ack 0x0a0b0c0d, ACK,
/// window 64240, payload "hi". Checksums verified independently.
const GOLDEN_TCP: [u8; 56] = [
    0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x45, 0x00,
    0x00, 0x2a, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xae, 0xa6, 0xc6, 0x12, 0x00, 0x02, 0xc6, 0x12,
    0x00, 0x01, 0x00, 0x50, 0x9c, 0x40, 0x01, 0x02, 0x03, 0x04, 0x0a, 0x0b, 0x0c, 0x0d, 0x50, 0x10,
    0xfa, 0xf0, 0x09, 0xa2, 0x00, 0x00, 0x68, 0x69,
];

/// VM 198.18.0.2:53 -> client 198.18.0.1:5353, payload "ok".
const GOLDEN_UDP: [u8; 44] = [
    0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x45, 0x00,
    0x00, 0x1e, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xae, 0xa7, 0xc6, 0x12, 0x00, 0x02, 0xc6, 0x12,
    0x00, 0x01, 0x00, 0x35, 0x14, 0xe9, 0x00, 0x0a, 0xef, 0x28, 0x6f, 0x6b,
];

/// Echo reply from the VM, id 7, seq 1, payload "ab".
const GOLDEN_ICMP: [u8; 44] = [
    0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x45, 0x00,
    0x00, 0x1e, 0x00, 0x00, 0x40, 0x00, 0x40, 0x01, 0xae, 0xb7, 0xc6, 0x12, 0x00, 0x02, 0xc6, 0x12,
    0x00, 0x01, 0x00, 0x00, 0x9e, 0x95, 0x00, 0x07, 0x00, 0x01, 0x61, 0x62,
];

/// The Internet checksum, written independently of etherparse.
fn inet_sum(parts: &[&[u8]]) -> u16 {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(p);
    }
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut s: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Whether an untagged IPv4 TCP frame's checksum is right.
fn tcp_checksum_ok(f: &[u8]) -> bool {
    let ip = &f[14..34];
    let tcp = &f[34..];
    let len = (tcp.len() as u16).to_be_bytes();
    inet_sum(&[&ip[12..20], &[0, 6], &len, tcp]) == 0
}

#[test]
fn golden_frames_construct() {
    assert_eq!(
        Seg::vm(0x0102_0304, Some(0x0a0b_0c0d), b"hi").frame(),
        GOLDEN_TCP
    );
    assert_eq!(udp_from_vm(53, b"ok"), GOLDEN_UDP);
    assert_eq!(echo_reply_from_vm(7, 1, b"ab"), GOLDEN_ICMP);
    assert!(tcp_checksum_ok(&GOLDEN_TCP));
    assert_eq!(inet_sum(&[&GOLDEN_TCP[14..34]]), 0);
}

#[test]
fn golden_tcp_deconstructs() {
    let p = parse(&GOLDEN_TCP).unwrap();
    assert_eq!(p.vlan, None);
    assert_eq!(p.protocol, Protocol::Tcp);
    assert_eq!(
        p.src,
        Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 80)
    );
    assert_eq!(
        p.dst,
        Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 40000)
    );
    let t = p.tcp().unwrap();
    assert_eq!((t.seq, t.ack), (0x0102_0304, 0x0a0b_0c0d));
    assert_eq!(
        t.flags,
        TcpFlags {
            ack: true,
            ..TcpFlags::default()
        }
    );
    assert_eq!(&GOLDEN_TCP[t.payload.clone()], b"hi");
    assert_eq!(p.egress_key().vm.port, 80);
    assert_eq!(p.ingress_key().vm.port, 40000);
}

#[test]
fn golden_udp_icmp_arp_deconstruct() {
    let p = parse(&GOLDEN_UDP).unwrap();
    assert_eq!(p.protocol, Protocol::Udp);
    assert_eq!((p.src.port, p.dst.port), (53, 5353));
    match p.payload {
        Payload::Datagram { compare, tag: 0 } => assert_eq!(&GOLDEN_UDP[compare], b"ok"),
        other => panic!("{other:?}"),
    }
    let p = parse(&GOLDEN_ICMP).unwrap();
    assert_eq!(p.protocol, Protocol::Icmp);
    assert_eq!(p.src.port, 7, "echo id keys the flow");
    match p.payload {
        Payload::Datagram { compare, .. } => assert_eq!(&GOLDEN_ICMP[compare], &GOLDEN_ICMP[34..]),
        other => panic!("{other:?}"),
    }
    let arp = arp_reply();
    let p = parse(&arp).unwrap();
    assert_eq!(p.protocol, Protocol::Ether(0x0806));
    assert_eq!(
        p.payload,
        Payload::Datagram {
            compare: 0..42,
            tag: 0
        }
    );
}

#[test]
fn vlan_and_ipv6() {
    // The golden TCP frame with an 802.1Q tag (VLAN 42) inserted after the MACs.
    let mut tagged = GOLDEN_TCP[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
    tagged.extend_from_slice(&GOLDEN_TCP[12..]);
    let p = parse(&tagged).unwrap();
    assert_eq!(p.vlan, Some(42));
    let t = p.tcp().unwrap();
    assert_eq!(&tagged[t.payload.clone()], b"hi");
    assert_eq!(p.egress_key().vlan, Some(42));

    let vm6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
    let cl6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv6(vm6.octets(), cl6.octets(), 64)
        .udp(1000, 2000)
        .write(&mut f, b"v6")
        .unwrap();
    let p = parse(&f).unwrap();
    assert_eq!(p.src, Endpoint::new(IpAddr::V6(vm6), 1000));
    assert_eq!(p.protocol, Protocol::Udp);
}

#[test]
fn malformed_frames_are_refused_not_panicked_on() {
    // Truncated at every length: never a panic; a frame cut inside the headers is refused.
    for n in 0..GOLDEN_TCP.len() {
        let r = parse(&GOLDEN_TCP[..n]);
        if n < 54 {
            assert!(r.is_err(), "cut at {n} parsed: {r:?}");
        }
    }
    // A TCP data offset past the segment.
    let mut f = GOLDEN_TCP;
    f[46] = 0xF0;
    assert!(parse(&f).is_err());
    // IPv4 header length below the minimum.
    let mut f = GOLDEN_TCP;
    f[14] = 0x44;
    assert!(parse(&f).is_err());
    // Unknown EtherType: not malformed, compared whole.
    let mut f = GOLDEN_TCP;
    f[12] = 0x88;
    f[13] = 0xb5;
    assert_eq!(parse(&f).unwrap().protocol, Protocol::Ether(0x88b5));
}

#[test]
fn rewrite_moves_seq_and_ack_and_fixes_checksum() {
    let mut f = GOLDEN_TCP.to_vec();
    let d = |seq: u32, ack: u32| Deltas {
        seq,
        ack,
        ..Deltas::default()
    };
    rewrite_tcp(&mut f, d(0x10, 0u32.wrapping_sub(0x0d))).unwrap();
    let t = parse(&f).unwrap().tcp().cloned().unwrap();
    assert_eq!((t.seq, t.ack), (0x0102_0314, 0x0a0b_0c00));
    assert!(tcp_checksum_ok(&f));
    assert_eq!(
        &f[..38],
        &GOLDEN_TCP[..38],
        "nothing before the seq changes"
    );
    assert_eq!(&f[54..], b"hi");
    // Back again gives the golden frame.
    rewrite_tcp(&mut f, d(0u32.wrapping_sub(0x10), 0x0d)).unwrap();
    assert_eq!(f, GOLDEN_TCP);
    // Not TCP: untouched.
    let mut u = GOLDEN_UDP.to_vec();
    assert_eq!(rewrite_tcp(&mut u, d(1, 1)), Err(RewriteError::NotTcp));
    assert_eq!(u, GOLDEN_UDP);
}

#[test]
fn rewrite_translates_sack_blocks() {
    let mut h = etherparse::TcpHeader::new(40000, 80, 500, 1000);
    h.ack = true;
    h.acknowledgment_number = 2000;
    h.set_options(&[
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::SelectiveAcknowledgement((3000, 4000), [Some((5000, 6000)), None, None]),
    ])
    .unwrap();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, VM_MAC)
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .tcp_header(h)
        .write(&mut f, b"")
        .unwrap();
    let d = Deltas {
        ack: 0u32.wrapping_sub(1000),
        tsecr: 5,
        ..Deltas::default()
    };
    let r = rewrite_tcp(&mut f, d).unwrap();
    assert!(!r.options_untranslated);
    assert!(tcp_checksum_ok(&f));
    let sliced = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
    let Some(etherparse::TransportSlice::Tcp(t)) = sliced.transport else {
        panic!("not tcp")
    };
    assert_eq!(t.acknowledgment_number(), 1000);
    assert_eq!(t.sequence_number(), 500, "client seq is not touched");
    let sack: Vec<_> = t.options_iterator().filter_map(Result::ok).collect();
    assert!(sack.contains(&TcpOptionElement::SelectiveAcknowledgement(
        (2000, 3000),
        [Some((4000, 5000)), None, None]
    )));
}

#[test]
fn rewrite_works_on_ipv6_and_vlan_tagged_frames() {
    let vm6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets();
    let cl6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv6(vm6, cl6, 64)
        .tcp(80, 40000, 1000, 500)
        .ack(77)
        .write(&mut f, b"six")
        .unwrap();
    let d = Deltas {
        seq: 5,
        ack: 3,
        ..Deltas::default()
    };
    rewrite_tcp(&mut f, d).unwrap();
    let sliced = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
    let Some(etherparse::TransportSlice::Tcp(t)) = &sliced.transport else {
        panic!("not tcp")
    };
    assert_eq!((t.sequence_number(), t.acknowledgment_number()), (1005, 80));
    assert_eq!(t.checksum(), t.calc_checksum_ipv6(vm6, cl6).unwrap());

    // 802.1Q: the same rewrite as untagged, with the tag kept.
    let tag = |f: &[u8]| {
        let mut v = f[..12].to_vec();
        v.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        v.extend_from_slice(&f[12..]);
        v
    };
    let mut tagged = tag(&GOLDEN_TCP);
    let mut plain = GOLDEN_TCP.to_vec();
    rewrite_tcp(&mut tagged, d).unwrap();
    rewrite_tcp(&mut plain, d).unwrap();
    assert_eq!(tagged, tag(&plain));
    assert!(tcp_checksum_ok(&plain));
}
