//! The engine on crafted sequences: segmentation, retransmission, reordering, a one-byte
//! difference, a late secondary, queue overflow, SYN/FIN/RST meaning, ACK gating,
//! passthrough, failover.

use std::time::{Duration, Instant};

use super::*;
use crate::passthrough::{PassthroughRule, RuleProtocol};
use crate::testing::{Seg, arp_reply, echo_reply_from_vm, udp_from_vm};
use crate::wire::parse;

const C_ISN: u32 = 1000;
const P_ISN: u32 = 0xFFFF_FF00; // wraps during the transfers
const S_ISN: u32 = 0x1234_5678;

struct H {
    e: Engine,
    out: Output,
    t: Instant,
}

impl H {
    fn new() -> Self {
        Self::with(Config::default())
    }

    fn with(config: Config) -> Self {
        Self {
            e: Engine::new(config).unwrap(),
            out: Output::default(),
            t: Instant::now(),
        }
    }

    fn p(&mut self, s: &Seg) {
        self.e.primary_frame(s.frame(), self.t, &mut self.out);
    }

    fn s(&mut self, s: &Seg) {
        self.e.secondary_frame(s.frame(), self.t, &mut self.out);
    }

    fn c(&mut self, s: &Seg) {
        self.e.client_frame(s.frame(), self.t, &mut self.out);
    }

    fn released(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.out.to_client)
    }

    fn requests(&mut self) -> Vec<CheckpointRequest> {
        std::mem::take(&mut self.out.checkpoint_requests)
    }

    fn m(&self) -> crate::MetricsSnapshot {
        self.e.metrics().snapshot()
    }

    /// Client SYN, both SYN-ACKs (released), client ACK. Returns the frames mirrored to the
    /// secondary by the client ACK.
    fn handshake(&mut self) -> Vec<Vec<u8>> {
        self.c(&Seg::client(C_ISN, None, b"").syn());
        self.p(&Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn());
        assert!(
            self.released().is_empty(),
            "SYN-ACK waits for the secondary's"
        );
        self.s(&Seg::vm(S_ISN, Some(C_ISN + 1), b"").syn());
        let r = self.released();
        assert_eq!(r, vec![Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn().frame()]);
        self.out.to_secondary.clear();
        self.out.to_primary.clear();
        self.c(&Seg::client(C_ISN + 1, Some(P_ISN.wrapping_add(1)), b""));
        std::mem::take(&mut self.out.to_secondary)
    }
}

/// Primary segment: `data` at stream offset `at` (after the SYN).
fn pseg(at: u32, data: &[u8]) -> Seg {
    Seg::vm(
        P_ISN.wrapping_add(1).wrapping_add(at),
        Some(C_ISN + 1),
        data,
    )
}

/// Secondary segment: `data` at stream offset `at`.
fn sseg(at: u32, data: &[u8]) -> Seg {
    Seg::vm(
        S_ISN.wrapping_add(1).wrapping_add(at),
        Some(C_ISN + 1),
        data,
    )
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn handshake_translates_client_acks_for_the_secondary() {
    let mut h = H::new();
    let to_s = h.handshake();
    assert_eq!(to_s.len(), 1);
    let p = parse(&to_s[0]).unwrap();
    let t = p.tcp().unwrap();
    assert_eq!(
        t.ack,
        S_ISN.wrapping_add(1),
        "ack moved into the secondary's space"
    );
    assert_eq!(t.seq, C_ISN + 1, "client seq untouched");
    assert_eq!(h.out.to_primary.len(), 1);
    let pp = parse(&h.out.to_primary[0]).unwrap();
    assert_eq!(pp.tcp().unwrap().ack, P_ISN.wrapping_add(1));
    assert_eq!(h.m().ack_translations, 1);
    assert!(h.requests().is_empty());
}

#[test]
fn different_segmentation_releases_exactly_the_primarys_frames() {
    let mut h = H::new();
    h.handshake();
    let data = payload(3000);
    let p_segs = [
        pseg(0, &data[..1448]),
        pseg(1448, &data[1448..2896]),
        pseg(2896, &data[2896..]),
    ];
    let s_segs = [
        sseg(0, &data[..500]),
        sseg(500, &data[500..2000]),
        sseg(2000, &data[2000..]),
    ];
    for s in &p_segs {
        h.p(s);
    }
    assert!(h.released().is_empty());
    h.s(&s_segs[0]);
    assert!(
        h.released().is_empty(),
        "500 bytes do not cover the first primary segment"
    );
    h.s(&s_segs[1]);
    assert_eq!(h.released(), vec![p_segs[0].frame()]);
    h.s(&s_segs[2]);
    assert_eq!(h.released(), vec![p_segs[1].frame(), p_segs[2].frame()]);
    assert_eq!(h.m().matched_tcp_bytes, 3000);
    assert!(h.requests().is_empty());
    assert_eq!(h.e.held_frames(), 0);
}

#[test]
fn secondary_first_then_primary() {
    let mut h = H::new();
    h.handshake();
    let data = payload(2000);
    h.s(&sseg(0, &data));
    h.p(&pseg(0, &data[..1000]));
    assert_eq!(h.released(), vec![pseg(0, &data[..1000]).frame()]);
    h.p(&pseg(1000, &data[1000..]));
    assert_eq!(h.released(), vec![pseg(1000, &data[1000..]).frame()]);
    assert!(h.requests().is_empty());
}

#[test]
fn retransmissions_are_released_and_ignored() {
    let mut h = H::new();
    h.handshake();
    let data = payload(1000);
    h.p(&pseg(0, &data));
    h.s(&sseg(0, &data));
    assert_eq!(h.released().len(), 1);
    // The primary retransmits: its bytes were compared already, so it goes at once.
    h.p(&pseg(0, &data));
    assert_eq!(h.released(), vec![pseg(0, &data).frame()]);
    // The secondary retransmits (a different cut): nothing to compare.
    h.s(&sseg(100, &data[100..600]));
    assert!(h.released().is_empty());
    let m = h.m();
    assert_eq!((m.primary_retransmits, m.secondary_retransmits), (1, 1));
    assert!(h.requests().is_empty());
}

#[test]
fn reordered_segments_are_reassembled() {
    let mut h = H::new();
    h.handshake();
    let data = payload(3000);
    // Primary in order; the secondary's arrive last-first.
    for i in 0..3u32 {
        let r = (i * 1000) as usize..((i + 1) * 1000) as usize;
        h.p(&pseg(i * 1000, &data[r]));
    }
    h.s(&sseg(2000, &data[2000..]));
    h.s(&sseg(1000, &data[1000..2000]));
    assert!(h.released().is_empty());
    h.s(&sseg(0, &data[..1000]));
    assert_eq!(h.released().len(), 3);
    // And the primary out of order: the later segment waits behind the earlier one.
    let more = payload(2000);
    h.p(&pseg(3000 + 1000, &more[1000..]));
    h.s(&sseg(3000, &more));
    assert!(
        h.released().is_empty(),
        "its bytes are not contiguous on the primary yet"
    );
    h.p(&pseg(3000, &more[..1000]));
    let r = h.released();
    assert_eq!(
        r,
        vec![
            pseg(4000, &more[1000..]).frame(),
            pseg(3000, &more[..1000]).frame()
        ]
    );
    assert!(h.requests().is_empty());
}

#[test]
fn one_byte_difference_holds_until_commit() {
    let mut h = H::new();
    h.handshake();
    let data = payload(2000);
    let mut other = data.clone();
    other[1500] ^= 1;
    h.p(&pseg(0, &data[..1000]));
    h.p(&pseg(1000, &data[1000..]));
    h.s(&sseg(0, &other));
    assert_eq!(
        h.released(),
        vec![pseg(0, &data[..1000]).frame()],
        "the equal part goes"
    );
    let reqs = h.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].reason,
        CheckpointReason::PayloadDiffers { offset: 1500 }
    );
    assert_eq!(reqs[0].flow.unwrap().vm.port, 80);
    assert!(h.e.checkpoint_pending());
    // More primary output on the diverged connection is held too, without a new request.
    h.p(&pseg(2000, b"tail"));
    assert!(h.released().is_empty());
    assert!(h.requests().is_empty());
    assert_eq!(h.e.held_frames(), 2);
    h.e.checkpoint_committed(h.t, &mut h.out);
    assert_eq!(
        h.released(),
        vec![
            pseg(1000, &data[1000..]).frame(),
            pseg(2000, b"tail").frame()
        ]
    );
    assert!(!h.e.checkpoint_pending());
    let m = h.m();
    assert_eq!(
        (m.mismatches, m.checkpoint_requests, m.checkpoints_committed),
        (1, 1, 1)
    );
    // After the commit the secondary is the primary's copy: same sequence numbers.
    h.p(&pseg(2004, b"next"));
    h.s(&pseg(2004, b"next"));
    assert_eq!(h.released(), vec![pseg(2004, b"next").frame()]);
    // And a new difference asks again.
    h.p(&pseg(2008, b"abc"));
    h.s(&pseg(2008, b"abd"));
    assert_eq!(h.requests().len(), 1);
}

#[test]
fn commit_resets_ack_translation_to_zero_offset() {
    let mut h = H::new();
    h.handshake();
    h.p(&pseg(0, b"x"));
    h.s(&sseg(0, b"y"));
    assert_eq!(h.requests().len(), 1);
    h.e.checkpoint_committed(h.t, &mut h.out);
    h.out.to_secondary.clear();
    h.c(&Seg::client(C_ISN + 1, Some(P_ISN.wrapping_add(2)), b""));
    let t = parse(&h.out.to_secondary[0]).unwrap();
    assert_eq!(t.tcp().unwrap().ack, P_ISN.wrapping_add(2));
}

#[test]
fn late_secondary_times_out_releases_and_requests() {
    let mut h = H::with(Config {
        compare_timeout: Duration::from_millis(3000),
        expired_scan_cycle: Duration::from_millis(100),
        ..Config::default()
    });
    h.handshake();
    h.e.poll(h.t, &mut h.out);
    h.p(&pseg(0, b"hello"));
    h.t += Duration::from_millis(2950);
    h.e.poll(h.t, &mut h.out);
    assert!(h.released().is_empty(), "not yet");
    h.t += Duration::from_millis(100);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(h.released(), vec![pseg(0, b"hello").frame()]);
    let r = h.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reason, CheckpointReason::CompareTimeout);
    let m = h.m();
    assert_eq!(m.compare_timeouts, 1);
    assert!(m.expired_scans >= 2);
    // The late secondary still compares against the released bytes: equal, no mismatch.
    h.s(&sseg(0, b"hello"));
    assert_eq!(h.m().mismatches, 0);
}

#[test]
fn udp_queue_overflow_forces_a_checkpoint_and_drops_nothing() {
    let mut h = H::with(Config {
        max_queue_size: 4,
        ..Config::default()
    });
    for i in 0..6u8 {
        h.e.primary_frame(udp_from_vm(53, &[i]), h.t, &mut h.out);
    }
    let r = h.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reason, CheckpointReason::QueueOverflow);
    assert_eq!(h.m().queue_overflows, 1);
    assert_eq!(h.m().overflow_drops, 0);
    assert_eq!(h.e.held_frames(), 6);
    // The secondary catches up: the first four match and go.
    for i in 0..4u8 {
        h.e.secondary_frame(udp_from_vm(53, &[i]), h.t, &mut h.out);
    }
    assert_eq!(h.released().len(), 4);
    h.e.checkpoint_committed(h.t, &mut h.out);
    assert_eq!(
        h.released(),
        vec![udp_from_vm(53, &[4]), udp_from_vm(53, &[5])]
    );
}

#[test]
fn tcp_queue_overflow_forces_a_checkpoint() {
    let mut h = H::with(Config {
        max_queue_size: 8,
        ..Config::default()
    });
    h.handshake();
    for i in 0..9u32 {
        h.p(&pseg(i * 10, &[b'a'; 10]));
    }
    let r = h.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reason, CheckpointReason::QueueOverflow);
    h.e.checkpoint_committed(h.t, &mut h.out);
    assert_eq!(h.released().len(), 9);
}

#[test]
fn udp_icmp_arp_compare_by_payload() {
    let mut h = H::new();
    h.e.primary_frame(udp_from_vm(53, b"answer"), h.t, &mut h.out);
    h.e.secondary_frame(udp_from_vm(53, b"answer"), h.t, &mut h.out);
    h.e.primary_frame(echo_reply_from_vm(1, 1, b"ping"), h.t, &mut h.out);
    h.e.secondary_frame(echo_reply_from_vm(1, 1, b"ping"), h.t, &mut h.out);
    h.e.primary_frame(arp_reply(), h.t, &mut h.out);
    h.e.secondary_frame(arp_reply(), h.t, &mut h.out);
    assert_eq!(h.released().len(), 3);
    // UDP is compared by payload only: another IP id does not matter.
    let mut p = udp_from_vm(54, b"same");
    let s = udp_from_vm(54, b"same");
    p[18] = 0x12; // IP identification
    h.e.primary_frame(p.clone(), h.t, &mut h.out);
    h.e.secondary_frame(s, h.t, &mut h.out);
    assert_eq!(h.released(), vec![p]);
    assert!(h.requests().is_empty());
    h.e.primary_frame(echo_reply_from_vm(1, 2, b"ping"), h.t, &mut h.out);
    h.e.secondary_frame(echo_reply_from_vm(1, 2, b"pong"), h.t, &mut h.out);
    assert!(h.released().is_empty());
    // The first difference is in the ICMP checksum, which covers the payload.
    assert!(matches!(
        h.requests()[0].reason,
        CheckpointReason::PayloadDiffers { offset: 2 | 3 }
    ));
}

#[test]
fn pure_acks_wait_for_the_secondarys_ack() {
    let mut h = H::new();
    h.handshake();
    // The client sent 100 bytes; the primary acks them at once, the secondary later.
    let p_ack = Seg::vm(P_ISN.wrapping_add(1), Some(C_ISN + 101), b"");
    h.p(&p_ack);
    assert!(
        h.released().is_empty(),
        "the secondary has not acked the client's bytes yet"
    );
    // The secondary's ack comes with data (so the primary's data must come too).
    h.s(&Seg::vm(S_ISN.wrapping_add(1), Some(C_ISN + 101), b"r"));
    assert_eq!(h.released(), vec![p_ack.frame()]);
    h.p(&Seg::vm(P_ISN.wrapping_add(1), Some(C_ISN + 101), b"r"));
    assert_eq!(h.released().len(), 1);
    assert!(h.requests().is_empty());
}

#[test]
fn fin_and_rst_must_mean_the_same() {
    let mut h = H::new();
    h.handshake();
    h.p(&pseg(0, b"bye").fin());
    h.s(&sseg(0, b"b"));
    h.s(&sseg(1, b"ye").fin());
    assert_eq!(h.released(), vec![pseg(0, b"bye").fin().frame()]);
    assert!(h.requests().is_empty());

    // FIN at different places.
    let mut h = H::new();
    h.handshake();
    h.p(&pseg(0, b"bye").fin());
    h.s(&sseg(0, b"bye!"));
    let r = h.requests();
    assert_eq!(r.len(), 1);
    assert!(
        matches!(r[0].reason, CheckpointReason::ControlDiffers(_)),
        "{r:?}"
    );

    // RST only from the primary: it waits, and times out.
    let mut h = H::with(Config {
        compare_timeout: Duration::from_millis(10),
        expired_scan_cycle: Duration::from_millis(10),
        ..Config::default()
    });
    h.handshake();
    h.e.poll(h.t, &mut h.out);
    h.p(&pseg(0, b"").rst());
    assert!(h.released().is_empty());
    h.s(&sseg(0, b"").rst());
    assert_eq!(h.released().len(), 1, "both reset: released");

    // SYN against SYN-ACK.
    let mut h = H::new();
    h.p(&Seg::vm(P_ISN, None, b"").syn());
    h.s(&Seg::vm(S_ISN, Some(5), b"").syn());
    assert!(matches!(
        h.requests()[0].reason,
        CheckpointReason::ControlDiffers(_)
    ));
}

#[test]
fn passthrough_flows_never_wait_or_trigger() {
    let mut h = H::with(Config {
        passthrough: vec![PassthroughRule::port(RuleProtocol::Udp, 123)],
        compare_timeout: Duration::from_millis(10),
        expired_scan_cycle: Duration::from_millis(10),
        ..Config::default()
    });
    h.e.poll(h.t, &mut h.out);
    h.e.primary_frame(udp_from_vm(123, b"time=1"), h.t, &mut h.out);
    assert_eq!(h.released(), vec![udp_from_vm(123, b"time=1")]);
    h.e.secondary_frame(udp_from_vm(123, b"time=2"), h.t, &mut h.out);
    h.t += Duration::from_secs(1);
    h.e.poll(h.t, &mut h.out);
    assert!(h.requests().is_empty());
    assert_eq!(h.m().passthrough_frames, 1);
}

#[test]
fn passthrough_tcp_still_translates_acks() {
    let mut h = H::with(Config {
        passthrough: vec!["tcp:80".parse().unwrap()],
        ..Config::default()
    });
    h.c(&Seg::client(C_ISN, None, b"").syn());
    h.p(&Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn());
    assert_eq!(h.released().len(), 1, "released at once");
    h.s(&Seg::vm(S_ISN, Some(C_ISN + 1), b"").syn());
    h.out.to_secondary.clear();
    h.c(&Seg::client(C_ISN + 1, Some(P_ISN.wrapping_add(1)), b""));
    let t = parse(&h.out.to_secondary[0]).unwrap();
    assert_eq!(t.tcp().unwrap().ack, S_ISN.wrapping_add(1));
}

#[test]
fn malformed_frames_are_counted_and_forwarded_or_dropped() {
    let mut h = H::new();
    let junk = vec![
        0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00, 0x45, 0,
    ];
    h.e.client_frame(junk.clone(), h.t, &mut h.out);
    assert_eq!(h.out.to_primary, vec![junk.clone()]);
    assert_eq!(h.out.to_secondary, vec![junk.clone()]);
    h.e.primary_frame(junk.clone(), h.t, &mut h.out);
    assert_eq!(h.released(), vec![junk.clone()]);
    h.e.secondary_frame(junk.clone(), h.t, &mut h.out);
    h.e.primary_frame(vec![], h.t, &mut h.out);
    assert_eq!(h.m().malformed_frames, 4);
    // Empty and one-byte client frames reach neither VM: on a VM's socket they would be a
    // commit marker (or end the stream) and a pacing word.
    h.out.clear();
    for short in [vec![], vec![1u8], vec![0u8]] {
        h.e.client_frame(short, h.t, &mut h.out);
    }
    assert!(h.out.is_empty(), "{:?}", h.out);
    assert_eq!(h.m().malformed_dropped, 3);

    let mut h = H::with(Config {
        malformed: MalformedPolicy::Drop,
        ..Config::default()
    });
    h.e.client_frame(junk.clone(), h.t, &mut h.out);
    h.e.primary_frame(junk, h.t, &mut h.out);
    assert!(h.out.is_empty());
    assert_eq!(h.m().malformed_dropped, 2);
}

#[test]
fn failover_rewrites_the_secondarys_sequence_numbers() {
    let mut h = H::new();
    h.handshake();
    h.p(&pseg(0, b"abc"));
    h.e.set_mode(Mode::SecondaryOnly, h.t, &mut h.out);
    assert!(h.released().is_empty(), "the primary's held output is void");
    h.out.to_primary.clear();
    h.out.to_secondary.clear();
    h.s(&sseg(0, b"abc"));
    let r = h.released();
    assert_eq!(r.len(), 1);
    let t = parse(&r[0]).unwrap();
    assert_eq!(
        t.tcp().unwrap().seq,
        P_ISN.wrapping_add(1),
        "in the primary's space"
    );
    assert_eq!(
        r[0],
        pseg(0, b"abc").frame(),
        "the very frame the primary would send"
    );
    h.c(&Seg::client(C_ISN + 1, Some(P_ISN.wrapping_add(4)), b""));
    assert!(h.out.to_primary.is_empty());
    let t = parse(&h.out.to_secondary[0]).unwrap();
    assert_eq!(t.tcp().unwrap().ack, S_ISN.wrapping_add(4));
}

#[test]
fn at_failover_the_secondarys_output_the_client_lacks_goes_out_at_once() {
    let mut h = H::new();
    h.handshake();
    // Both sent "abc" (compared, released); the secondary then ran ahead with "def" and
    // "gh", the primary only got as far as "de" (matched and released).
    h.p(&pseg(0, b"abc"));
    h.s(&sseg(0, b"abc"));
    assert_eq!(h.released().len(), 1);
    h.out.clear();
    h.s(&sseg(3, b"def"));
    h.s(&sseg(6, b"gh"));
    h.p(&pseg(3, b"de"));
    assert_eq!(
        h.released(),
        vec![pseg(3, b"de").frame()],
        "only what matched"
    );
    h.out.clear();
    // The primary dies; the secondary serves: its "def" (the client has "de" of it and
    // drops those two bytes again) and "gh" reach the client now, in the primary's space,
    // without waiting for a retransmission.
    h.e.set_mode(Mode::SecondaryOnly, h.t, &mut h.out);
    let r = h.released();
    assert_eq!(
        r,
        vec![pseg(3, b"def").frame(), pseg(6, b"gh").frame()],
        "{r:?}"
    );
    // What was compared is not sent again.
    h.out.clear();
    let mut h2 = H::new();
    h2.handshake();
    h2.p(&pseg(0, b"abc"));
    h2.s(&sseg(0, b"abc"));
    h2.out.clear();
    h2.e.set_mode(Mode::SecondaryOnly, h2.t, &mut h2.out);
    assert!(h2.released().is_empty(), "{:?}", h2.released());
}

#[test]
fn primary_only_releases_everything() {
    let mut h = H::new();
    h.handshake();
    h.p(&pseg(0, b"abc"));
    h.e.set_mode(Mode::PrimaryOnly, h.t, &mut h.out);
    assert_eq!(h.released().len(), 1);
    h.p(&pseg(3, b"d"));
    assert_eq!(h.released().len(), 1);
    h.out.to_secondary.clear();
    h.c(&Seg::client(C_ISN + 1, None, b"x"));
    assert!(h.out.to_secondary.is_empty());
}

#[test]
fn connection_table_limit_and_idle_expiry() {
    let mut h = H::with(Config {
        max_connections: 2,
        flow_idle_timeout: Duration::from_secs(5),
        expired_scan_cycle: Duration::from_secs(1),
        ..Config::default()
    });
    for port in [1, 2] {
        h.e.primary_frame(udp_from_vm(port, b"a"), h.t, &mut h.out);
    }
    h.e.primary_frame(udp_from_vm(3, b"a"), h.t, &mut h.out);
    assert_eq!(
        h.released(),
        vec![udp_from_vm(3, b"a")],
        "not compared, not lost"
    );
    assert_eq!(
        h.requests()[0].reason,
        CheckpointReason::ConnectionTableFull
    );
    h.e.checkpoint_committed(h.t, &mut h.out);
    h.released();
    h.t += Duration::from_secs(6);
    h.e.scan(h.t, &mut h.out);
    assert_eq!(h.e.connections(), 0);
    assert_eq!(h.m().connections_expired, 2);
}

#[test]
fn secondary_output_without_primary_counterpart_requests_a_checkpoint() {
    let mut h = H::with(Config {
        compare_timeout: Duration::from_millis(100),
        expired_scan_cycle: Duration::from_millis(100),
        ..Config::default()
    });
    h.e.secondary_frame(udp_from_vm(9, b"extra"), h.t, &mut h.out);
    h.t += Duration::from_millis(150);
    h.e.scan(h.t, &mut h.out);
    assert_eq!(h.requests()[0].reason, CheckpointReason::SecondaryTimeout);
    assert_eq!(h.m().secondary_timeouts, 1);
}

/// Timestamps from the TCP option of a frame (TSval, TSecr).
fn ts_of(frame: &[u8]) -> Option<(u32, u32)> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    let Some(etherparse::TransportSlice::Tcp(t)) = sliced.transport else {
        return None;
    };
    t.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::Timestamp(v, e)) => Some((v, e)),
        _ => None,
    })
}

#[test]
fn timestamps_are_translated_like_sequence_numbers() {
    // The VMs' timestamp clocks differ (a newer Linux drops a handshake ACK whose TSecr
    // does not echo its own SYN-ACK's TSval), so the client's echoes are translated.
    let (p_ts, s_ts) = (50_000u32, 49_990u32);
    let mut h = H::new();
    h.c(&Seg::client(C_ISN, None, b"").syn().ts(777, 0));
    h.p(&Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn().ts(p_ts, 777));
    h.s(&Seg::vm(S_ISN, Some(C_ISN + 1), b"").syn().ts(s_ts, 777));
    assert_eq!(h.released().len(), 1);
    h.out.to_secondary.clear();
    h.c(&Seg::client(C_ISN + 1, Some(P_ISN.wrapping_add(1)), b"GET").ts(778, p_ts));
    let to_s = &h.out.to_secondary[0];
    assert_eq!(
        ts_of(to_s),
        Some((778, s_ts)),
        "TSecr echoes the secondary's clock"
    );
    assert_eq!(
        parse(to_s).unwrap().tcp().unwrap().ack,
        S_ISN.wrapping_add(1)
    );
    assert_eq!(ts_of(&h.out.to_primary[1]), Some((778, p_ts)));
    // Failover: the secondary's TSval moves onto the primary's clock.
    h.e.set_mode(Mode::SecondaryOnly, h.t, &mut h.out);
    h.s(&sseg(0, b"x").ts(s_ts + 5, 778));
    let r = h.released();
    assert_eq!(ts_of(&r[0]), Some((p_ts + 5, 778)));
    assert_eq!(
        parse(&r[0]).unwrap().tcp().unwrap().seq,
        P_ISN.wrapping_add(1)
    );
}

#[test]
fn periodic_mode_holds_the_primarys_output_until_the_checkpoint_commits() {
    let mut h = H::new();
    let t = h.t;
    h.e.set_mode(Mode::Periodic, t, &mut h.out);
    // Client traffic goes to the primary only (the secondary VM is not running).
    h.c(&Seg::client(C_ISN, None, b"").syn());
    assert_eq!(h.out.to_primary.len(), 1);
    assert!(h.out.to_secondary.is_empty());
    // The primary's answers are held, in order, whatever the secondary sends.
    h.p(&Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn());
    h.p(&pseg(0, b"hello"));
    h.s(&sseg(0, b"other"));
    assert!(
        h.released().is_empty(),
        "nothing leaves before the checkpoint"
    );
    assert_eq!(h.e.held_frames(), 2);
    h.e.checkpoint_committed(t, &mut h.out);
    assert_eq!(
        h.released(),
        vec![
            Seg::vm(P_ISN, Some(C_ISN + 1), b"").syn().frame(),
            pseg(0, b"hello").frame()
        ]
    );
    assert_eq!(h.e.held_frames(), 0);
    // Output after the commit waits for the next one.
    h.p(&pseg(5, b"again"));
    assert!(h.released().is_empty());
    // Losing the secondary releases what is held; failover would drop it instead.
    h.e.set_mode(Mode::PrimaryOnly, t, &mut h.out);
    assert_eq!(h.released(), vec![pseg(5, b"again").frame()]);
}

/// The pace frames the engine sent the secondary since the last call.
fn pace_frames(h: &mut H) -> Vec<Vec<u8>> {
    let (pace, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut h.out.to_secondary)
        .into_iter()
        .partition(|f| f.len() == 1);
    h.out.to_secondary = rest;
    pace
}

#[test]
fn a_secondary_too_far_ahead_is_held_until_the_primary_catches_up() {
    let lead = Duration::from_millis(10);
    let mut h = H::with(Config {
        secondary_lead: Some(lead),
        ..Config::default()
    });
    h.handshake();
    let t0 = h.t;
    let at = |ms: f64| t0 + Duration::from_secs_f64(ms / 1e3);
    let hold = crate::framing::PACE_HOLD.to_vec();
    let go = crate::framing::PACE_GO.to_vec();
    // The secondary answers requests the primary has not reached yet: A at 0 ms, B at
    // 4 ms. The lead is looked at every 2.5 ms while its output waits.
    h.s(&sseg(0, b"A\n"));
    let due =
        h.e.next_deadline()
            .expect("a look at the lead is scheduled");
    assert_eq!(due, at(2.5));
    h.t = at(4.0);
    h.s(&sseg(2, b"B\n"));
    h.t = at(9.0);
    h.e.poll(h.t, &mut h.out);
    assert!(
        pace_frames(&mut h).is_empty(),
        "9 ms ahead is within the lead"
    );
    h.t = at(11.5);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(
        pace_frames(&mut h),
        vec![hold.clone()],
        "11.5 ms ahead: hold"
    );
    assert!(h.e.secondary_held());
    assert_eq!(h.m().secondary_holds, 1);
    // The primary reaches A; B (at 4 ms) and C (12 ms) still wait.
    h.p(&pseg(0, b"A\n"));
    assert_eq!(h.released().len(), 1);
    h.t = at(12.0);
    h.s(&sseg(4, b"C\n"));
    // At 14 ms B is 10 ms old: under the lead, but over half of it, so the hold stays.
    h.t = at(14.0);
    h.e.poll(h.t, &mut h.out);
    assert!(pace_frames(&mut h).is_empty(), "hysteresis: still held");
    assert!(h.e.secondary_held());
    // The primary reaches B: the oldest is C, 4.5 ms old at 16.5 ms, under half the lead.
    h.p(&pseg(2, b"B\n"));
    h.t = at(16.5);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(
        pace_frames(&mut h),
        vec![go.clone()],
        "under half the lead: go"
    );
    assert!(!h.e.secondary_held());
    // C waits on: held again once it is over the lead, then a checkpoint commits and the
    // secondary (now the primary's copy) goes on at once.
    h.t = at(25.0);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(pace_frames(&mut h), vec![hold]);
    h.e.checkpoint_committed(h.t, &mut h.out);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(pace_frames(&mut h), vec![go]);
    assert_eq!(h.e.next_pace, None, "nothing waits: no look is scheduled");
    assert!(h.requests().is_empty(), "pacing asks for no checkpoint");
}

#[test]
fn a_held_secondary_goes_on_at_failover_and_is_never_held_without_a_lead() {
    let mut h = H::with(Config {
        secondary_lead: Some(Duration::from_millis(10)),
        ..Config::default()
    });
    h.handshake();
    h.s(&sseg(0, b"OK\n"));
    h.t += Duration::from_millis(11);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(
        pace_frames(&mut h),
        vec![crate::framing::PACE_HOLD.to_vec()]
    );
    h.e.set_mode(Mode::SecondaryOnly, h.t, &mut h.out);
    h.e.poll(h.t, &mut h.out);
    assert_eq!(pace_frames(&mut h), vec![crate::framing::PACE_GO.to_vec()]);

    // Off by default: no pace frame however far ahead the secondary is.
    let mut h = H::new();
    h.handshake();
    h.s(&sseg(0, b"OK\n"));
    h.t += Duration::from_millis(2000);
    h.e.poll(h.t, &mut h.out);
    assert!(pace_frames(&mut h).is_empty());
    assert!(!h.e.secondary_held());
}

#[test]
fn a_commit_counts_the_output_the_secondary_ran_ahead_or_behind() {
    let mut h = H::new();
    h.handshake();
    // Both sent "AB"; the secondary also "CDE" (ahead), which the commit throws away.
    h.p(&pseg(0, b"AB"));
    h.s(&sseg(0, b"ABCDE"));
    h.e.checkpoint_committed(h.t, &mut h.out);
    let m = h.m();
    assert_eq!(
        (m.secondary_discarded_bytes, m.secondary_skipped_bytes),
        (3, 0)
    );
    // Now the primary runs ahead by "GHIJ" (after "AB" at offset 2): the secondary skips it.
    h.p(&pseg(2, b"FGHIJ"));
    h.s(&pseg(2, b"F"));
    h.e.checkpoint_committed(h.t, &mut h.out);
    let m = h.m();
    assert_eq!(
        (m.secondary_discarded_bytes, m.secondary_skipped_bytes),
        (3, 4)
    );
}
