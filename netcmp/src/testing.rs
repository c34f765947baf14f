//! Frame builders for tests, benchmarks and fuzzing: a client at 198.18.0.1 talking to a
//! VM at 198.18.0.2 (the benchmarking range of RFC 2544, which never leaves this host),
//! built with etherparse's packet builder so that every checksum is right.

use std::net::Ipv4Addr;

use etherparse::PacketBuilder;

/// The client's MAC address.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The VM's MAC address (the same on the primary and the secondary).
pub const VM_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The VM's address.
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// A TCP segment between the client and the VM.
#[derive(Debug, Clone, Default)]
pub struct Seg {
    /// Sent by the VM (else by the client).
    pub from_vm: bool,
    /// The VM's port.
    pub vm_port: u16,
    /// The client's port.
    pub client_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number, with the ACK flag.
    pub ack: Option<u32>,
    /// SYN.
    pub syn: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// Window.
    pub window: u16,
    /// The timestamp option (TSval, TSecr), after two NOPs.
    pub ts: Option<(u32, u32)>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Seg {
    /// A segment from the VM on port 80 to client port 40000.
    pub fn vm(seq: u32, ack: Option<u32>, payload: &[u8]) -> Self {
        Self {
            from_vm: true,
            vm_port: 80,
            client_port: 40000,
            seq,
            ack,
            window: 64240,
            payload: payload.to_vec(),
            ..Self::default()
        }
    }

    /// A segment from the client port 40000 to the VM's port 80.
    pub fn client(seq: u32, ack: Option<u32>, payload: &[u8]) -> Self {
        Self {
            from_vm: false,
            ..Self::vm(seq, ack, payload)
        }
    }

    /// With SYN.
    pub fn syn(mut self) -> Self {
        self.syn = true;
        self
    }

    /// With FIN.
    pub fn fin(mut self) -> Self {
        self.fin = true;
        self
    }

    /// With RST.
    pub fn rst(mut self) -> Self {
        self.rst = true;
        self
    }

    /// With the timestamp option.
    pub fn ts(mut self, val: u32, ecr: u32) -> Self {
        self.ts = Some((val, ecr));
        self
    }

    /// With another window.
    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let (smac, dmac, sip, dip, sport, dport) = if self.from_vm {
            (
                VM_MAC,
                CLIENT_MAC,
                VM_IP,
                CLIENT_IP,
                self.vm_port,
                self.client_port,
            )
        } else {
            (
                CLIENT_MAC,
                VM_MAC,
                CLIENT_IP,
                VM_IP,
                self.client_port,
                self.vm_port,
            )
        };
        let mut b = PacketBuilder::ethernet2(smac, dmac)
            .ipv4(sip.octets(), dip.octets(), 64)
            .tcp(sport, dport, self.seq, self.window);
        if let Some(a) = self.ack {
            b = b.ack(a);
        }
        if self.syn {
            b = b.syn();
        }
        if self.fin {
            b = b.fin();
        }
        if self.rst {
            b = b.rst();
        }
        if let Some((val, ecr)) = self.ts {
            use etherparse::TcpOptionElement::{Noop, Timestamp};
            b = b
                .options(&[Noop, Noop, Timestamp(val, ecr)])
                .expect("12 bytes of options fit");
        }
        let mut v = Vec::with_capacity(b.size(self.payload.len()));
        b.write(&mut v, &self.payload).expect("writing to a Vec");
        v
    }
}

/// A UDP datagram from the VM's port `vm_port` to the client's port 5353.
pub fn udp_from_vm(vm_port: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4(VM_IP.octets(), CLIENT_IP.octets(), 64)
        .udp(vm_port, 5353);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("writing to a Vec");
    v
}

/// An ICMP echo reply from the VM.
pub fn echo_reply_from_vm(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4(VM_IP.octets(), CLIENT_IP.octets(), 64)
        .icmpv4_echo_reply(id, seq);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("writing to a Vec");
    v
}

/// The VM's ARP reply to the client (a golden frame: 42 bytes, no padding).
pub fn arp_reply() -> Vec<u8> {
    let mut v = Vec::with_capacity(42);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&VM_MAC);
    v.extend_from_slice(&[0x08, 0x06]); // ARP
    v.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]); // Ethernet/IPv4, reply
    v.extend_from_slice(&VM_MAC);
    v.extend_from_slice(&VM_IP.octets());
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&CLIENT_IP.octets());
    v
}
