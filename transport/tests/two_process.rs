//! The control protocol and the TCP push path between two real processes on loopback.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use colo_memory::Region;
use colo_transport::Error;
use colo_transport::control::{ControlChannel, Hello, MemRegion, Message, Role};
use colo_transport::framing;
use colo_transport::push::{PushReceiver, WriteRun, push_epoch};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};
use colo_transport::testing::{ROLE_VAR, spawn_child, wait_child};
use common::*;

const PAGE: u32 = 4096;
const PAGES: u64 = 1024; // 4 MiB
const EPOCHS: u64 = 4;
const T: Duration = Duration::from_secs(20);

fn hello(role: Role) -> Hello {
    Hello::new(
        role,
        0xC010,
        PAGE,
        vec![MemRegion {
            gpa: 0,
            len: PAGES * u64::from(PAGE),
        }],
    )
    .unwrap()
}

/// The secondary's side, run in the child process: handshake, publish the region, receive
/// epochs, verify every page, acknowledge over the control channel.
fn secondary(addr: &str) {
    let mut ctl = ControlChannel::connect(addr, T).unwrap();
    let peer = ctl.handshake(&hello(Role::Secondary)).unwrap();
    assert_eq!(peer.role(), Role::Primary);
    let cache = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&cache),
        PAGE,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    ctl.send(&Message::Region(*listener.desc())).unwrap();
    let mut rx = listener.accept(T).unwrap();
    ctl.send(&Message::CheckpointReady).unwrap();
    let mut expect = vec![0u8; PAGE as usize];
    let mut got = vec![0u8; PAGE as usize];
    for epoch in 1..=EPOCHS {
        assert_eq!(ctl.recv().unwrap(), Message::CheckpointRequest { epoch });
        ctl.send(&Message::CheckpointReply { epoch }).unwrap();
        let c = rx.next_commit(T).unwrap();
        assert_eq!(c.epoch, epoch);
        let pages = epoch_pages(epoch, PAGES);
        assert_eq!(c.bitmap, bitmap_of(&pages, PAGES));
        assert_eq!(c.bytes, pages.len() as u64 * u64::from(PAGE));
        for &p in &pages {
            pattern(epoch, p, &mut expect);
            cache.read_at(p * u64::from(PAGE), &mut got).unwrap();
            assert!(expect == got, "page {p} of epoch {epoch} differs");
        }
        assert_eq!(ctl.recv().unwrap(), Message::VmstateSend { epoch });
        let Message::VmstateSize { state } = ctl.recv().unwrap() else {
            panic!("expected vmstate-size")
        };
        assert_eq!(state, format!("device state of epoch {epoch}").into_bytes());
        ctl.send(&Message::VmstateReceived { epoch }).unwrap();
        rx.release(epoch).unwrap();
        ctl.send(&Message::VmstateLoaded { epoch }).unwrap();
    }
    assert_eq!(ctl.recv().unwrap(), Message::Heartbeat { seq: 99 });
    ctl.send(&Message::Heartbeat { seq: 100 }).unwrap();
    assert_eq!(ctl.recv().unwrap(), Message::Goodbye);
    // The primary's push streams said goodbye too.
    assert!(matches!(
        rx.next_commit(T),
        Err(Error::Frame(framing::Error::PeerClosed))
    ));
}

#[test]
#[ignore = "child half of two-process tests; run by them"]
fn child_entry() {
    let role = std::env::var(ROLE_VAR).expect("run only as a child");
    let addr = std::env::var("COLO_TEST_ADDR").unwrap();
    match role.as_str() {
        "secondary" => secondary(&addr),
        "mismatched-secondary" => {
            let mut ctl = ControlChannel::connect(&addr, T).unwrap();
            let bad = Hello::new(
                Role::Secondary,
                0xC010,
                PAGE,
                vec![MemRegion { gpa: 0, len: 8192 }],
            )
            .unwrap();
            let e = ctl.handshake(&bad).unwrap_err();
            assert!(e.to_string().contains("layout"), "{e}");
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn epochs_flow_between_two_processes_over_control_and_push() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let child = spawn_child("child_entry", "secondary", &[("COLO_TEST_ADDR", addr)]);
    let mut ctl = ControlChannel::accept(&l).unwrap();
    let peer = ctl.handshake(&hello(Role::Primary)).unwrap();
    assert_eq!(peer.role(), Role::Secondary);
    let Message::Region(desc) = ctl.recv().unwrap() else {
        panic!("expected the region")
    };
    assert_eq!(desc.len, PAGES * u64::from(PAGE));
    let guest = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let opts = TcpPushOptions {
        streams: 3,
        batch_runs: 7,
        ..TcpPushOptions::default()
    };
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        Arc::clone(&guest),
        &colo_transport::testing::credentials(),
        opts,
    )
    .unwrap();
    assert_eq!(ctl.recv().unwrap(), Message::CheckpointReady);
    let mut buf = vec![0u8; PAGE as usize];
    for epoch in 1..=EPOCHS {
        let pages = epoch_pages(epoch, PAGES);
        for &p in &pages {
            pattern(epoch, p, &mut buf);
            guest.write_at(p * u64::from(PAGE), &buf).unwrap();
        }
        ctl.send(&Message::CheckpointRequest { epoch }).unwrap();
        assert_eq!(ctl.recv().unwrap(), Message::CheckpointReply { epoch });
        let runs = pages.iter().map(|&p| WriteRun::pages(p, 1, PAGE));
        let stats = push_epoch(&mut tx, runs, &bitmap_of(&pages, PAGES)).unwrap();
        assert_eq!(stats.epoch, epoch);
        ctl.send(&Message::VmstateSend { epoch }).unwrap();
        ctl.send(&Message::VmstateSize {
            state: format!("device state of epoch {epoch}").into_bytes(),
        })
        .unwrap();
        assert_eq!(ctl.recv().unwrap(), Message::VmstateReceived { epoch });
        assert_eq!(ctl.recv().unwrap(), Message::VmstateLoaded { epoch });
    }
    ctl.send(&Message::Heartbeat { seq: 99 }).unwrap();
    assert_eq!(ctl.recv().unwrap(), Message::Heartbeat { seq: 100 });
    tx.close().unwrap();
    ctl.send(&Message::Goodbye).unwrap();
    assert!(
        wait_child(child, T),
        "the secondary process failed; see its output above"
    );
}

#[test]
fn handshake_mismatch_between_two_processes_is_refused_on_both_sides() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let child = spawn_child(
        "child_entry",
        "mismatched-secondary",
        &[("COLO_TEST_ADDR", addr)],
    );
    let mut ctl = ControlChannel::accept(&l).unwrap();
    let e = ctl.handshake(&hello(Role::Primary)).unwrap_err();
    assert!(e.to_string().contains("layout"), "{e}");
    assert!(
        wait_child(child, T),
        "the secondary process failed; see its output above"
    );
}
