//! The crash test: the primary runs in a real child process (this test binary run again)
//! and is killed with SIGKILL in the middle of its stream of writes. The parent plays the
//! secondary and its controller: it commits the epochs the primary completes, makes SVM
//! writes of its own, then fails over. The secondary's disk must then hold exactly every
//! write the primary completed before the barrier of the last committed epoch, with the
//! SVM's writes since that commit on top, and nothing else: no later primary write,
//! whole or torn.
//!
//! The checkpoint messages go over colo-transport's control channel, as in the product
//! (`VmstateSend(epoch)` after the disk barrier, `VmstateReceived(epoch)` after the
//! commit).

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use colo_blk::{BufferOptions, Disk, PrimaryDisk, PrimaryOptions, SecondaryDisk, SyncMode};
use colo_transport::control::{ControlChannel, Message};
use colo_transport::testing::{ROLE_VAR, spawn_child};
use common::*;

const DISK: u64 = 4 << 20;
/// Epochs the parent commits before it kills the primary.
const COMMITTED: u64 = 3;
const SEED: u64 = 0x5EED;

/// The `i`-th write of `epoch`: a sector-aligned span (some over 1 MiB, so that they are
/// split into several frames) and the seed of its data.
fn primary_write(epoch: u64, i: u64) -> (u64, usize, u64) {
    let h = (epoch * 1_000_003 + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ SEED;
    let sectors = if i % 17 == 5 {
        2100 + h % 300
    } else {
        1 + (h >> 8) % 128
    };
    let start = (h >> 20) % (DISK / 512 - sectors);
    (start * 512, (sectors * 512) as usize, h)
}

/// Writes per committed epoch.
const PER_EPOCH: u64 = 60;

/// The SVM's `i`-th write after the commit of `epoch`.
fn svm_write(epoch: u64, i: u64) -> (u64, usize, u64) {
    let h = (epoch * 7919 + i).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ 0xAB;
    let sectors = 1 + h % 64;
    let start = (h >> 16) % (DISK / 512 - sectors);
    (start * 512, (sectors * 512) as usize, h)
}

fn initial() -> Vec<u8> {
    data(1, DISK as usize)
}

/// The primary, in the child: writes epoch after epoch until it is killed.
fn primary_child() {
    let path = std::env::var("COLO_BLK_PRIMARY_IMAGE").unwrap();
    let scenario = std::env::var("COLO_BLK_SCENARIO").unwrap();
    let primary = PrimaryDisk::new(
        Disk::open(path.as_ref()).unwrap(),
        PrimaryOptions {
            window_frames: 64,
            window_bytes: 4 << 20,
            ..PrimaryOptions::default()
        },
    );
    let blk = TcpStream::connect(std::env::var("COLO_BLK_ADDR").unwrap()).unwrap();
    primary.attach(blk, SyncMode::InSync, T).unwrap();
    let mut ctl = ControlChannel::connect(&std::env::var("COLO_CTL_ADDR").unwrap(), T).unwrap();
    for epoch in 1.. {
        let n = if epoch > COMMITTED && scenario == "mid-epoch" {
            u64::MAX // write until killed
        } else {
            PER_EPOCH
        };
        for i in 0..n {
            let (off, len, seed) = primary_write(epoch, i);
            primary.write_at(off, &data(seed, len)).unwrap();
            if i % 10 == 9 {
                primary.flush().unwrap();
            }
        }
        primary.checkpoint_barrier(epoch, T).unwrap();
        ctl.send(&Message::VmstateSend { epoch }).unwrap();
        // In the after-barrier scenario the parent kills us while we wait here.
        assert_eq!(ctl.recv().unwrap(), Message::VmstateReceived { epoch });
    }
}

#[test]
#[ignore = "child half of the crash tests; run by them"]
fn child_entry() {
    match std::env::var(ROLE_VAR)
        .expect("run only as a child")
        .as_str()
    {
        "primary" => primary_child(),
        other => panic!("unknown role {other}"),
    }
}

fn crash(scenario: &str) {
    let dir = tempfile::tempdir().unwrap();
    let init = initial();
    let ppath = dir.path().join("primary.img");
    std::fs::write(&ppath, &init).unwrap();
    let (sdisk, sfile) = image(&init);
    let secondary = SecondaryDisk::new(
        sdisk,
        BufferOptions {
            mem_limit: 1 << 20, // small: the buffer spills to its file as well
            ..BufferOptions::default()
        },
    );
    let blk_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ctl_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut child = spawn_child(
        "child_entry",
        "primary",
        &[
            ("COLO_BLK_PRIMARY_IMAGE", ppath.display().to_string()),
            ("COLO_BLK_SCENARIO", scenario.to_string()),
            ("COLO_BLK_ADDR", blk_l.local_addr().unwrap().to_string()),
            ("COLO_CTL_ADDR", ctl_l.local_addr().unwrap().to_string()),
        ],
    );
    // Bound the accepts: a child that fails early must not hang the test.
    blk_l.set_nonblocking(true).unwrap();
    let mut conn = None;
    wait_for(T, "the primary to connect", || {
        conn = blk_l.accept().ok().map(|c| c.0);
        conn.is_some()
    });
    let conn = conn.unwrap();
    conn.set_nonblocking(false).unwrap();
    assert_eq!(secondary.serve(conn, T).unwrap(), SyncMode::InSync);
    ctl_l.set_nonblocking(true).unwrap();
    let mut ctl = None;
    wait_for(T, "the control connection", || {
        ctl = ctl_l.accept().ok().map(|c| c.0);
        ctl.is_some()
    });
    let ctl_s = ctl.unwrap();
    ctl_s.set_nonblocking(false).unwrap();
    ctl_s.set_read_timeout(Some(T)).unwrap();
    let mut ctl = ControlChannel::from_tcp(ctl_s).unwrap();

    let mut committed = init;
    let mut svm_view;
    for epoch in 1..=COMMITTED {
        // SVM writes during the epoch: dropped by the commit.
        for i in 0..10 {
            let (off, len, seed) = svm_write(epoch * 100, i);
            secondary.write_at(off, &data(seed, len)).unwrap();
        }
        assert_eq!(ctl.recv().unwrap(), Message::VmstateSend { epoch });
        secondary.commit(epoch, T).unwrap();
        for i in 0..PER_EPOCH {
            let (off, len, seed) = primary_write(epoch, i);
            committed[off as usize..off as usize + len].copy_from_slice(&data(seed, len));
        }
        assert!(
            contents(&sfile) == committed,
            "secondary disk differs after commit {epoch}"
        );
        ctl.send(&Message::VmstateReceived { epoch }).unwrap();
    }
    // After the last commit the SVM's writes are kept.
    svm_view = committed.clone();
    for i in 0..25 {
        let (off, len, seed) = svm_write(COMMITTED, i);
        let d = data(seed, len);
        secondary.write_at(off, &d).unwrap();
        svm_view[off as usize..off as usize + len].copy_from_slice(&d);
    }
    let at_commit = secondary.stats().writes;
    match scenario {
        "mid-epoch" => {
            // Let some writes of the next epoch land, then kill the primary mid-stream.
            wait_for(T, "writes of the uncommitted epoch", || {
                secondary.stats().writes >= at_commit + 40
            });
        }
        "after-barrier" => {
            // The whole next epoch is on the secondary's disk and acknowledged, but its
            // checkpoint never completes.
            assert_eq!(
                ctl.recv().unwrap(),
                Message::VmstateSend {
                    epoch: COMMITTED + 1
                }
            );
            assert_eq!(secondary.stats().last_marker, Some(COMMITTED + 1));
        }
        other => panic!("unknown scenario {other}"),
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let uncommitted = secondary.stats();
    assert!(
        uncommitted.buffer.hidden_bytes > 0,
        "the kill found no uncommitted writes"
    );
    wait_for(T, "the secondary to notice", || {
        secondary.stats().link_error.is_some()
    });
    let f = secondary.failover().unwrap();
    assert_eq!(f.committed, COMMITTED);
    assert!(f.rolled_back_bytes > 0);
    let got = contents(&sfile);
    if got != svm_view {
        let first = got.iter().zip(&svm_view).position(|(a, b)| a != b).unwrap();
        panic!(
            "secondary disk after failover differs from last commit + SVM writes, first at byte {first} (sector {})",
            first / 512
        );
    }
    let mut all = vec![0u8; DISK as usize];
    secondary.read_at(0, &mut all).unwrap();
    assert!(all == svm_view);
    // The secondary keeps serving its VM.
    secondary.write_at(0, &[9; 512]).unwrap();
    secondary.flush().unwrap();
    let _ = Duration::ZERO;
}

#[test]
fn primary_killed_mid_epoch() {
    crash("mid-epoch");
}

#[test]
fn primary_killed_after_disk_ack_before_commit() {
    crash("after-barrier");
}
