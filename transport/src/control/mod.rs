//! The COLO control protocol: a versioned handshake and the checkpoint messages.
//!
//! Every frame starts with a fixed 24-byte header ([`FrameHeader`], a
//! [`framing::Header`](crate::framing::Header)): magic `"COLO"`, protocol version, message
//! type, a 64-bit argument (an epoch, a sequence number or a size), and the payload
//! length. Unknown types, other versions, oversized payloads and payloads on messages that
//! take none are refused before anything is allocated.
//!
//! What the controller (`colo primary` / `colo secondary`) sends, in order:
//!
//! ```text
//!  primary                                                secondary
//!     │── Hello(role, pair id, page size, layout, vCPUs) ──▶│
//!     │◀── Hello ───────────────────────────── (or Reject) ──│  both check the peer
//!     │◀── Region(addr, key, len, page size, port) ──────────│  page-push target
//!     │   (background push epochs stream into the cache while the PVM runs)
//!     │   ┌─ one checkpoint; the first is the initial sync of every page ─┐
//!     │── CheckpointRequest(k) ─────────────────────────────▶│  pause SVM; hold push
//!     │◀── CheckpointReply(k) ───────────────────────────────│  epoch k for the commit
//!     │   pause PVM, final dirty pages, push epoch k + commit │
//!     │── VmstateSend(k) ───────────────────────────────────▶│
//!     │── VmstateSize(n) + n bytes of device state ─────────▶│  buffered whole
//!     │◀── VmstateReceived(k) ───────────────────────────────│  disk epoch acknowledged
//!     │   resume PVM, release held output                    │  flush cache → SVM
//!     │◀── VmstateLoaded(k) ─────────────────────────────────│  resume SVM (the primary
//!     │   └─────────────────────────── reads it before the next request) ──┘
//!     │◀─── Heartbeat(seq) ──── both ways, any time ────────▶│
//!     │◀─── HeartbeatAck(seq) ─ the answer to each ─────────▶│
//!     │── Goodbye ──────────────────────────────────────────▶│  orderly end
//! ```
//!
//! `CheckpointReady` and `Failover` are defined and decoded (a peer may send them) but the
//! controller sends neither: the secondary is ready once it answers the first
//! `CheckpointRequest`, and a failover is decided by each side from the heartbeat.

mod channel;
mod conn;
mod frame;
mod handshake;
mod message;

pub use channel::ControlChannel;
pub use conn::Conn;
pub use frame::{CONTROL_MAGIC, ControlFields, FrameHeader, HEADER_LEN, Kind, PROTOCOL_VERSION};
pub use handshake::{Hello, MAX_REGIONS, MemRegion, Role};
pub use message::{DEFAULT_MAX_STATE, MAX_REJECT_LEN, Message};

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::error::Error;
    use crate::framing::Error as FrameError;
    use crate::push::RegionDesc;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(
                Hello::new(
                    Role::Primary,
                    9,
                    4096,
                    vec![MemRegion { gpa: 0, len: 4096 }],
                )
                .unwrap(),
            ),
            Message::Reject("no".into()),
            Message::CheckpointReady,
            Message::CheckpointRequest { epoch: 1 },
            Message::CheckpointReply { epoch: 2 },
            Message::VmstateSend { epoch: 3 },
            Message::VmstateSize {
                state: vec![7; 1000],
            },
            Message::VmstateReceived { epoch: 4 },
            Message::VmstateLoaded { epoch: 5 },
            Message::Heartbeat { seq: 6 },
            Message::HeartbeatAck { seq: 6 },
            Message::Failover,
            Message::Goodbye,
            Message::Region(RegionDesc {
                addr: 0x1000,
                key: 42,
                len: 1 << 30,
                page_size: 4096,
                port: 4444,
                name: crate::push::EndpointName::EMPTY,
            }),
            Message::Region(RegionDesc {
                addr: 0,
                key: u64::MAX,
                len: 4096,
                page_size: 4096,
                port: 0,
                name: crate::push::EndpointName::new(b"fi_shm://4242").unwrap(),
            }),
        ]
    }

    #[test]
    fn only_the_checkpoint_messages_name_an_epoch() {
        let named: Vec<_> = all_messages()
            .iter()
            .filter_map(|m| Some((m.kind(), m.epoch()?)))
            .collect();
        assert_eq!(
            named,
            [
                (Kind::CheckpointRequest, 1),
                (Kind::CheckpointReply, 2),
                (Kind::VmstateSend, 3),
                (Kind::VmstateReceived, 4),
                (Kind::VmstateLoaded, 5),
            ]
        );
    }

    #[test]
    fn every_message_round_trips_over_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = ControlChannel::new(a);
        let mut rx = ControlChannel::new(b);
        for m in all_messages() {
            tx.send(&m).unwrap();
            assert_eq!(rx.recv().unwrap(), m);
        }
        drop(tx);
        assert!(matches!(
            rx.recv(),
            Err(Error::Frame(FrameError::PeerClosed))
        ));
    }

    #[test]
    fn truncated_frames_are_typed_errors_at_every_cut() {
        for m in all_messages() {
            let bytes = m.encode().unwrap();
            for cut in 1..bytes.len() {
                let mut ch = ControlChannel::new(std::io::Cursor::new(bytes[..cut].to_vec()));
                let e = ch.recv().unwrap_err();
                assert!(
                    matches!(e, Error::Frame(FrameError::Truncated { .. })),
                    "{m:?} cut at {cut}: {e}"
                );
                assert!(matches!(ch.recv(), Err(Error::Closed)));
            }
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let mut f = FrameHeader::new(Kind::VmstateSize, ControlFields::new(1 << 31, u32::MAX))
            .to_bytes()
            .to_vec();
        f.extend_from_slice(&[0; 16]);
        let mut ch = ControlChannel::new(std::io::Cursor::new(f));
        assert!(matches!(
            ch.recv(),
            Err(Error::Frame(FrameError::TooLarge { .. }))
        ));
        let f = FrameHeader::new(Kind::Heartbeat, ControlFields::new(1, 1))
            .to_bytes()
            .to_vec();
        let mut ch = ControlChannel::new(std::io::Cursor::new(f));
        assert!(matches!(
            ch.recv(),
            Err(Error::Frame(FrameError::TooLarge { max: 0, .. }))
        ));
    }

    #[test]
    fn vmstate_size_must_match_its_payload() {
        let mut f = FrameHeader::new(Kind::VmstateSize, ControlFields::new(5, 4))
            .to_bytes()
            .to_vec();
        f.extend_from_slice(&[1, 2, 3, 4]);
        let mut ch = ControlChannel::new(std::io::Cursor::new(f));
        assert!(matches!(ch.recv(), Err(Error::Protocol(_))));
    }

    #[test]
    fn handshake_mismatch_is_reported_on_both_sides() {
        let (a, b) = UnixStream::pair().unwrap();
        let p = Hello::new(
            Role::Primary,
            1,
            4096,
            vec![MemRegion { gpa: 0, len: 8192 }],
        )
        .unwrap();
        let s = Hello::new(
            Role::Secondary,
            2,
            4096,
            vec![MemRegion { gpa: 0, len: 8192 }],
        )
        .unwrap();
        let t = std::thread::spawn(move || ControlChannel::new(b).handshake(&s));
        let ep = ControlChannel::new(a).handshake(&p).unwrap_err();
        let es = t.join().unwrap().unwrap_err();
        // Whichever side checks first refuses; the other sees either its own check fail or
        // the peer's Reject. Both name the pair id.
        assert!(ep.to_string().contains("pair id"), "{ep}");
        assert!(es.to_string().contains("pair id"), "{es}");
    }

    #[test]
    fn handshake_with_another_version_is_refused_with_reason() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let s = Hello::new(
            Role::Secondary,
            1,
            4096,
            vec![MemRegion { gpa: 0, len: 8192 }],
        )
        .unwrap();
        let t = std::thread::spawn(move || ControlChannel::new(b).handshake(&s));
        // A peer from the future: version 5 header.
        let mut f = Message::Hello(
            Hello::new(
                Role::Primary,
                1,
                4096,
                vec![MemRegion { gpa: 0, len: 8192 }],
            )
            .unwrap(),
        )
        .encode()
        .unwrap();
        f[4] = 5;
        std::io::Write::write_all(&mut a, &f).unwrap();
        let e = t.join().unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Frame(FrameError::VersionMismatch {
                    ours: 4,
                    theirs: 5,
                    ..
                })
            ),
            "{e}"
        );
        // The future peer receives our Hello and then a Reject naming the versions.
        let mut ch = ControlChannel::new(a);
        assert!(matches!(ch.recv().unwrap(), Message::Hello(_)));
        match ch.recv().unwrap() {
            Message::Reject(why) => assert!(why.contains("version"), "{why}"),
            other => panic!("expected Reject, got {other:?}"),
        }
    }
}
