//! The frames each throughput workload feeds the engine, built once before any timing.

use colo_netcmp::testing::{Seg, udp_from_vm};

/// The primary's ISN (wraps during the longer TCP runs).
pub const P_ISN: u32 = 0xF000_0000;
/// The secondary's ISN: a different sequence space, so the offset is really mapped.
pub const S_ISN: u32 = 0x0000_1000;
/// The client's ISN.
pub const C_ISN: u32 = 5000;

/// What the engine must report after a run.
#[derive(Clone, Copy)]
pub enum Kind {
    /// Every stream byte matched (`matched_tcp_bytes`).
    Tcp,
    /// Every packet matched (`matched_packets`).
    Udp,
}

/// One throughput workload: frames from the primary (`true`) and the secondary (`false`)
/// in arrival order.
pub struct Workload {
    /// The row label.
    pub name: String,
    /// Fed before the timed region (handshake, first packet of each flow).
    pub setup: Vec<(bool, Vec<u8>)>,
    /// Primary frames the setup releases.
    pub setup_released: usize,
    /// The timed frames.
    pub stream: Vec<(bool, Vec<u8>)>,
    /// Primary frames in `stream` (each must be released).
    pub primary_count: usize,
    /// Payload bytes the primary frames of `stream` carry.
    pub payload_bytes: u64,
    /// How matching is checked.
    pub kind: Kind,
}

impl Workload {
    /// Bytes of all frames in `stream` (both VMs).
    pub fn frame_bytes(&self) -> usize {
        self.stream.iter().map(|(_, f)| f.len()).sum()
    }
}

/// One TCP connection carrying `total` bytes from the VM: the primary cuts the stream into
/// `p_seg`-byte segments, the secondary into `s_seg`-byte ones, interleaved by stream
/// position (a primary segment first where both start at the same byte).
pub fn tcp(total: usize, p_seg: usize, s_seg: usize) -> Workload {
    let data: Vec<u8> = (0..total)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let cut = |isn: u32, size: usize| -> Vec<(usize, Vec<u8>)> {
        data.chunks(size)
            .enumerate()
            .map(|(i, c)| {
                let at = i * size;
                let seq = isn.wrapping_add(1).wrapping_add(at as u32);
                (at, Seg::vm(seq, Some(C_ISN + 1), c).frame())
            })
            .collect()
    };
    let (p, s) = (cut(P_ISN, p_seg), cut(S_ISN, s_seg));
    let primary_count = p.len();
    let mut stream = Vec::with_capacity(p.len() + s.len());
    let (mut pi, mut si) = (p.into_iter().peekable(), s.into_iter().peekable());
    loop {
        let primary = match (pi.peek(), si.peek()) {
            (Some((a, _)), Some((b, _))) => a <= b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if primary { pi.next() } else { si.next() };
        if let Some((_, f)) = next {
            stream.push((primary, f));
        }
    }
    Workload {
        name: format!("tcp {p_seg}/{s_seg} B segs, 1 conn"),
        setup: vec![
            (true, Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn().frame()),
            (false, Seg::vm(S_ISN, Some(C_ISN + 1), b"").syn().frame()),
        ],
        setup_released: 1,
        stream,
        primary_count,
        payload_bytes: total as u64,
        kind: Kind::Tcp,
    }
}

/// `packets` UDP datagrams of `size` payload bytes from the VM, spread round-robin over
/// `flows` flows (VM ports); both VMs send the same datagrams, the secondary `lag`
/// datagrams behind the primary. The setup sends one matched datagram per flow, so the
/// timed part sees known flows.
pub fn udp(packets: usize, size: usize, flows: u16, lag: usize) -> Workload {
    let port = |i: usize| 10_000 + (i % usize::from(flows)) as u16;
    let frame = |i: usize| {
        let payload: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
        udp_from_vm(port(i), &payload)
    };
    let mut setup = Vec::with_capacity(usize::from(flows) * 2);
    for i in 0..usize::from(flows) {
        let f = frame(i);
        setup.push((true, f.clone()));
        setup.push((false, f));
    }
    let frames: Vec<Vec<u8>> = (0..packets).map(frame).collect();
    let mut stream = Vec::with_capacity(packets * 2);
    for i in 0..packets + lag {
        if let Some(f) = frames.get(i) {
            stream.push((true, f.clone()));
        }
        if let Some(f) = i.checked_sub(lag).and_then(|j| frames.get(j)) {
            stream.push((false, f.clone()));
        }
    }
    let what = if flows == 1 { "flow" } else { "flows" };
    Workload {
        name: format!("udp {size} B payload, {flows} {what}"),
        setup,
        setup_released: usize::from(flows),
        stream,
        primary_count: packets,
        payload_bytes: (packets * size) as u64,
        kind: Kind::Udp,
    }
}
