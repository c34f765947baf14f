//! Bad input is refused with clear, typed errors: accesses past the end of the disk or of
//! the wrong size through the API, hostile frames on the wire (each closes the link, is
//! reported to the peer, and leaves the disk untouched), and a handshake between disks of
//! different sizes.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use colo_blk::wire::{Frame, MAX_WRITE_BYTES, SyncMode};
use colo_blk::{
    BlockBackend, BufferOptions, Disk, Error, PlainDisk, PrimaryDisk, PrimaryOptions,
    ReplicationState, SecondaryDisk,
};
use common::*;

const DISK: u64 = 64 << 10;

fn check_api(b: &dyn BlockBackend) {
    let mut buf = vec![0u8; 1024];
    let e = b.write_at(DISK - 512, &buf).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { offset, len: 1024, disk_len: DISK } if offset == DISK - 512),
        "{e:?}"
    );
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(matches!(
        b.write_at(DISK, &buf[..512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write_at(u64::MAX - 511, &buf[..512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        b.read_at(DISK - 512, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    let e = b.write_at(100, &buf[..512]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                offset: 100,
                len: 512
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("512-byte aligned"), "{e}");
    assert!(matches!(
        b.write_at(0, &buf[..100]),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(b.write_at(0, &[]), Err(Error::Misaligned { .. })));
    assert!(matches!(
        b.read_at(0, &mut buf[..513]),
        Err(Error::Misaligned { .. })
    ));
}

#[test]
fn api_refuses_bad_spans_on_every_backend() {
    let (d, f) = image(&vec![7; DISK as usize]);
    let plain = PlainDisk::new(d);
    check_api(&plain);
    let (d, _) = image(&vec![7; DISK as usize]);
    let primary = PrimaryDisk::new(d, PrimaryOptions::default());
    check_api(&primary);
    let (d, sf) = image(&vec![7; DISK as usize]);
    let secondary = SecondaryDisk::new(d, BufferOptions::default());
    connect(&primary, &secondary, SyncMode::InSync);
    check_api(&primary);
    check_api(&secondary);
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    assert!(contents(&f) == vec![7; DISK as usize]);
    assert!(contents(&sf) == vec![7; DISK as usize]);
    assert_eq!(primary.stats().writes, 0);
}

#[test]
fn disk_sizes_are_checked() {
    let f = tempfile::tempfile().unwrap();
    f.set_len(1000).unwrap();
    assert!(matches!(Disk::from_file(f), Err(Error::DiskSize(1000))));
    let f = tempfile::tempfile().unwrap();
    assert!(matches!(Disk::from_file(f), Err(Error::DiskSize(0))));
    let e = Disk::open("/nonexistent/disk.img".as_ref()).unwrap_err();
    assert!(matches!(e, Error::Open { .. }));
    assert!(e.to_string().contains("/nonexistent/disk.img"));
}

#[test]
fn the_secondary_refuses_to_use_its_disk_before_it_is_in_sync() {
    let (d, _) = image(&vec![0; DISK as usize]);
    let s = SecondaryDisk::new(d, BufferOptions::default());
    let e = s.write_at(0, &[1; 512]).unwrap_err();
    assert!(matches!(e, Error::WrongState { .. }), "{e:?}");
    assert!(matches!(s.failover(), Err(Error::WrongState { .. })));
    assert!(matches!(s.commit(1, T), Err(Error::WrongState { .. })));
}

/// Serves a fresh secondary on loopback; returns it, its disk file, and the raw
/// connection (already past the handshake) that plays a hostile primary.
fn hostile_primary() -> (SecondaryDisk, std::fs::File, TcpStream) {
    let (d, f) = image(&vec![0x11; DISK as usize]);
    let s = SecondaryDisk::new(d, BufferOptions::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    c.write_all(
        &Frame::Hello {
            disk_len: DISK,
            mode: SyncMode::InSync,
        }
        .to_bytes(),
    )
    .unwrap();
    let (conn, _) = l.accept().unwrap();
    s.serve(conn, T).unwrap();
    let mut h = [0u8; 32];
    c.read_exact(&mut h).unwrap();
    assert_eq!(
        Frame::parse(&h).unwrap(),
        Frame::HelloAck { disk_len: DISK }
    );
    c.set_read_timeout(Some(T)).unwrap();
    (s, f, c)
}

/// Sends `bytes`, then expects a Reject whose reason contains `why`, the link error on
/// the secondary to say the same, and the disk untouched.
fn refused(bytes: &[u8], why: &str) {
    let (s, f, mut c) = hostile_primary();
    let _ = c.write_all(bytes);
    let mut h = [0u8; 32];
    c.read_exact(&mut h).unwrap();
    let Frame::Reject { len } = Frame::parse(&h).unwrap() else {
        panic!("expected a reject")
    };
    let mut reason = vec![0u8; len as usize];
    c.read_exact(&mut reason).unwrap();
    let reason = String::from_utf8(reason).unwrap();
    assert!(reason.contains(why), "reason {reason:?} lacks {why:?}");
    wait_for(T, "the link error", || s.stats().link_error.is_some());
    let err = s.stats().link_error.unwrap();
    assert!(err.contains(why), "{err}");
    assert!(
        contents(&f) == vec![0x11; DISK as usize],
        "the disk was touched"
    );
    assert_eq!(s.stats().writes, 0);
}

fn with_payload(f: Frame, n: usize) -> Vec<u8> {
    let mut v = f.to_bytes().to_vec();
    v.extend(std::iter::repeat_n(0xEE, n));
    v
}

#[test]
fn hostile_frames_are_refused_with_typed_reasons() {
    // Past the end of the disk.
    refused(
        &with_payload(
            Frame::Write {
                seq: 1,
                offset: DISK - 512,
                len: 1024,
            },
            1024,
        ),
        "past the end",
    );
    // Offset overflow.
    refused(
        &with_payload(
            Frame::Write {
                seq: 1,
                offset: u64::MAX - 511,
                len: 1024,
            },
            1024,
        ),
        "past the end",
    );
    // Misaligned offset.
    refused(
        &with_payload(
            Frame::Write {
                seq: 1,
                offset: 100,
                len: 512,
            },
            512,
        ),
        "aligned",
    );
    // Wrong size: not a whole number of sectors (parsed before any payload is read).
    let mut h = Frame::Write {
        seq: 1,
        offset: 0,
        len: 512,
    }
    .to_bytes();
    h[8..12].copy_from_slice(&700u32.to_le_bytes());
    refused(&h, "multiple of 512");
    // Over the length limit: nothing is allocated for it.
    h[8..12].copy_from_slice(&((MAX_WRITE_BYTES as u32) * 2).to_le_bytes());
    refused(&h, "exceeds the limit");
    // Bad magic, wrong version, unknown type.
    let mut b = Frame::Flush { seq: 1 }.to_bytes();
    b[0] = b'X';
    refused(&b, "bad magic");
    let mut b = Frame::Flush { seq: 1 }.to_bytes();
    b[4] = 7;
    refused(&b, "version mismatch");
    let mut b = Frame::Flush { seq: 1 }.to_bytes();
    b[6] = 200;
    refused(&b, "unknown frame type 200");
    // A gap in the sequence.
    refused(
        &Frame::Flush { seq: 5 }.to_bytes(),
        "sequence 5 where 1 was due",
    );
    // Resync data outside a resync; an epoch marker that goes backwards.
    refused(
        &with_payload(
            Frame::SyncData {
                seq: 1,
                offset: 0,
                len: 512,
            },
            512,
        ),
        "resync data while replicating",
    );
    let mut two = Frame::Checkpoint { seq: 1, epoch: 0 }.to_bytes().to_vec();
    two.truncate(32);
    refused(&two, "does not follow epoch 0");
}

#[test]
fn a_truncated_frame_never_reaches_the_disk() {
    let (s, f, mut c) = hostile_primary();
    let mut v = with_payload(
        Frame::Write {
            seq: 1,
            offset: 0,
            len: 4096,
        },
        4096,
    );
    v.truncate(32 + 1000);
    c.write_all(&v).unwrap();
    drop(c);
    wait_for(T, "the link error", || s.stats().link_error.is_some());
    assert!(s.stats().link_error.unwrap().contains("truncated"));
    assert!(contents(&f) == vec![0x11; DISK as usize]);
    // Failover still works, and the disk is the last committed state.
    s.failover().unwrap();
    assert!(contents(&f) == vec![0x11; DISK as usize]);
}

#[test]
fn disks_of_different_sizes_refuse_to_pair() {
    let (pd, _) = image(&vec![0; DISK as usize]);
    let (sd, _) = image(&vec![0; 2 * DISK as usize]);
    let p = PrimaryDisk::new(pd, PrimaryOptions::default());
    let s = SecondaryDisk::new(sd, BufferOptions::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|sc| {
        let h = sc.spawn(|| s.serve(l.accept().unwrap().0, T));
        let e = p
            .attach(TcpStream::connect(addr).unwrap(), SyncMode::InSync, T)
            .unwrap_err();
        assert!(matches!(e, Error::Rejected(_)), "{e:?}");
        assert!(e.to_string().contains("disk size mismatch"), "{e}");
        let e = h.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::Handshake(_)), "{e:?}");
    });
    assert_eq!(p.state(), ReplicationState::Unprotected);
}

#[test]
fn a_hostile_secondary_ends_replication_but_not_the_primary() {
    let (pd, pf) = image(&vec![0; DISK as usize]);
    let p = PrimaryDisk::new(pd, PrimaryOptions::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut h = [0u8; 32];
        c.read_exact(&mut h).unwrap();
        c.write_all(&Frame::HelloAck { disk_len: DISK }.to_bytes())
            .unwrap();
        // Acknowledge a frame that was never sent.
        c.write_all(
            &Frame::Ack {
                seq: 1000,
                buffered: 0,
            }
            .to_bytes(),
        )
        .unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    });
    p.attach(TcpStream::connect(addr).unwrap(), SyncMode::InSync, T)
        .unwrap();
    wait_for(T, "the primary to drop the link", || {
        matches!(p.state(), ReplicationState::Lost(_))
    });
    let ReplicationState::Lost(why) = p.state() else {
        unreachable!()
    };
    assert!(why.contains("acknowledgement of frame 1000"), "{why}");
    // The guest's writes still succeed locally.
    p.write_at(0, &[5; 512]).unwrap();
    assert_eq!(&contents(&pf)[..512], &[5; 512]);
    assert!(matches!(
        p.checkpoint_barrier(1, T),
        Err(Error::ReplicationLost(_))
    ));
    // A lost link needs a resync: claiming the disks are equal is refused.
    let e = p
        .attach(
            TcpStream::connect("127.0.0.1:9").unwrap_or_else(|_| {
                // Nothing listens there; any stream will do, attach must refuse first.
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                TcpStream::connect(l.local_addr().unwrap()).unwrap()
            }),
            SyncMode::InSync,
            T,
        )
        .unwrap_err();
    assert!(matches!(e, Error::WrongState { .. }), "{e:?}");
    fake.join().unwrap();
}
