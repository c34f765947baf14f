//! Resync: a new secondary with unrelated content is brought in sync with a running
//! primary by a full copy while the guest keeps writing, with dirty-chunk tracking; then
//! replication and checkpoints go on as usual.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use colo_blk::{
    BufferOptions, Error, PrimaryDisk, PrimaryOptions, ReplicationState, SecondaryDisk,
    SecondaryPhase, SyncMode,
};
use common::*;

const DISK: u64 = 8 << 20;

#[test]
fn a_new_secondary_catches_up_while_writes_continue() {
    let (pd, pf) = image(&data(1, DISK as usize));
    let (sd, sf) = image(&vec![0; DISK as usize]);
    let primary = PrimaryDisk::new(
        pd,
        PrimaryOptions {
            resync_chunk: 64 << 10,
            window_frames: 16,
            ..PrimaryOptions::default()
        },
    );
    let secondary = SecondaryDisk::new(sd, BufferOptions::default());
    // The primary runs unprotected first.
    primary.write_at(0, &data(2, 1 << 20)).unwrap();
    assert!(primary.checkpoint_barrier(1, T).is_err());

    connect(&primary, &secondary, SyncMode::Resync);
    assert_eq!(primary.state(), ReplicationState::Resyncing);
    assert!(matches!(
        secondary.read_at(0, &mut [0; 512]),
        Err(Error::WrongState { .. })
    ));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let sectors = 1 + h % 200;
                let off = (h >> 16) % (DISK / 512 - sectors) * 512;
                primary
                    .write_at(off, &data(h, (sectors * 512) as usize))
                    .unwrap();
                i += 1;
                if i % 64 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            i
        });
        // Let the copy make one full pass while the writer runs, then finish it with the
        // writer still going (its writes wait for the final pass, then are forwarded).
        wait_for(T, "the first copy pass", || {
            primary
                .resync_progress()
                .is_some_and(|p| p.copied_bytes >= DISK)
        });
        let p = primary.resync_progress().unwrap();
        assert_eq!(p.total_chunks, DISK / (64 << 10));
        primary.complete_resync(T).unwrap();
        assert_eq!(primary.state(), ReplicationState::Replicating);
        secondary.wait_synced(T).unwrap();
        assert_eq!(secondary.phase(), SecondaryPhase::Replicating);
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let n = writer.join().unwrap();
        assert!(n > 0);
    });
    assert!(secondary.stats().sync_bytes >= DISK);
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    assert!(
        contents(&sf) == contents(&pf),
        "disks differ after resync and commit"
    );
    // Replication goes on as usual.
    primary.write_at(4096, &[3; 8192]).unwrap();
    primary.checkpoint_barrier(2, T).unwrap();
    secondary.commit(2, T).unwrap();
    assert!(contents(&sf) == contents(&pf));
}

#[test]
fn in_sync_is_refused_after_unreplicated_writes() {
    let (pd, _) = image(&vec![0; 1 << 20]);
    let (sd, _) = image(&vec![0; 1 << 20]);
    let primary = PrimaryDisk::new(pd, PrimaryOptions::default());
    primary.write_at(0, &[1; 512]).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let e = primary.attach(c, SyncMode::InSync, T).unwrap_err();
    assert!(matches!(e, Error::WrongState { .. }), "{e:?}");
    // A resync is the way in.
    let secondary = SecondaryDisk::new(sd, BufferOptions::default());
    connect(&primary, &secondary, SyncMode::Resync);
    primary.complete_resync(T).unwrap();
    secondary.wait_synced(T).unwrap();
    let mut b = [0u8; 512];
    secondary.read_at(0, &mut b).unwrap();
    assert_eq!(b, [1; 512]);
}

#[test]
fn stopping_replication_leaves_the_primary_serving() {
    let (primary, secondary) = in_sync_pair(1 << 20);
    primary.write_at(0, &[1; 4096]).unwrap();
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    primary.write_at(0, &[2; 4096]).unwrap();
    primary.stop_replication();
    assert_eq!(primary.state(), ReplicationState::Unprotected);
    primary.write_at(0, &[3; 4096]).unwrap();
    wait_for(T, "the goodbye", || secondary.stats().link_error.is_some());
    assert!(secondary.stats().link_error.unwrap().contains("goodbye"));
    // The secondary can still take over from the last commit.
    secondary.failover().unwrap();
    let mut b = [0u8; 4096];
    secondary.read_at(0, &mut b).unwrap();
    assert_eq!(b, [1; 4096]);
}

#[test]
fn stopping_replication_is_bounded_when_the_secondary_stops_reading() {
    let (primary, secondary) = in_sync_pair(32 << 20);
    primary.write_at(0, &[1; 4096]).unwrap();
    primary.checkpoint_barrier(1, T).unwrap();
    // Epoch 1 is never committed: the secondary's receiver stays paused and stops
    // reading, so the next epoch's writes pile up in the socket.
    let chunk = vec![2u8; 1 << 20];
    for i in 0..24 {
        primary.write_at(i << 20, &chunk).unwrap();
    }
    let t = std::time::Instant::now();
    primary.stop_replication();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(primary.state(), ReplicationState::Unprotected);
    primary.write_at(0, &[3; 512]).unwrap();
    // The secondary notices and can fail over to the last commit (epoch 0: the start).
    wait_for(T, "the secondary to notice", || {
        secondary.stats().link_error.is_some()
    });
    let f = secondary.failover().unwrap();
    assert_eq!(f.committed, 0);
    let mut b = [9u8; 4096];
    secondary.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0; 4096]);
}
