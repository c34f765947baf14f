//! The primary's sender gathers writes for `send_delay` before it sends them on: what it
//! must still do at once (a checkpoint marker, stopping), and that gathered writes still
//! go out without one.

mod common;

use std::time::{Duration, Instant};

use colo_blk::{BufferOptions, PrimaryDisk, PrimaryOptions, SecondaryDisk, SyncMode};
use common::*;

const T: Duration = Duration::from_secs(10);

/// A replicating pair whose sender gathers for `delay`.
fn pair(delay: Duration) -> (PrimaryDisk, SecondaryDisk) {
    let (pd, _) = image(&vec![0; 1 << 20]);
    let (sd, _) = image(&vec![0; 1 << 20]);
    let primary = PrimaryDisk::new(
        pd,
        PrimaryOptions {
            send_delay: delay,
            ..PrimaryOptions::default()
        },
    );
    let secondary = SecondaryDisk::new(sd, BufferOptions::default());
    connect(&primary, &secondary, SyncMode::InSync);
    (primary, secondary)
}

#[test]
fn a_checkpoint_does_not_wait_for_the_send_delay() {
    // Longer than the barrier's timeout: a marker that waited for the sender's next round
    // would fail the barrier.
    let (primary, secondary) = pair(Duration::from_secs(60));
    primary.write_at(0, &[1; 4096]).unwrap();
    // The first write woke the idle sender; once it is on the wire the sender sleeps for
    // the delay, and the next write waits in the queue.
    wait_for(T, "the first write", || secondary.stats().writes == 1);
    primary.write_at(4096, &[2; 4096]).unwrap();
    primary.flush().unwrap();
    let s = primary.checkpoint_barrier(1, T).unwrap();
    assert_eq!(s.epoch, 1);
    assert_eq!(secondary.commit(1, T).unwrap().epoch, 1);
    let mut b = vec![0u8; 8192];
    secondary.read_at(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 1));
    assert!(
        b[4096..].iter().all(|&x| x == 2),
        "the write queued during the delay went out with the marker"
    );
}

#[test]
fn gathered_writes_go_out_without_a_checkpoint() {
    let (primary, secondary) = pair(Duration::from_millis(20));
    for i in 0..40u64 {
        primary.write_at(i * 4096, &data(i, 4096)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Forwarding is asynchronous: every write arrives, with no marker to push it out.
    wait_for(T, "every forwarded write", || {
        secondary.stats().writes == 40
    });
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    let mut b = vec![0u8; 4096];
    for i in 0..40u64 {
        secondary.read_at(i * 4096, &mut b).unwrap();
        assert!(b == data(i, 4096), "block {i} differs after the commit");
    }
}

#[test]
fn stopping_replication_sends_what_was_gathered_and_does_not_wait_out_the_delay() {
    let (primary, secondary) = pair(Duration::from_secs(60));
    primary.write_at(0, &[1; 4096]).unwrap();
    wait_for(T, "the first write", || secondary.stats().writes == 1);
    primary.write_at(4096, &[2; 4096]).unwrap();
    let t = Instant::now();
    primary.stop_replication();
    // The sender was asleep for the delay: stopping wakes it, it sends the queued write
    // and the goodbye, and it exits. Stopping used to wait its whole drain limit (2 s)
    // because nothing recorded that the sender had exited.
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "stopping took {took:?}: it waited out its drain limit"
    );
    wait_for(T, "the goodbye", || secondary.stats().link_error.is_some());
    let why = secondary.stats().link_error.unwrap();
    assert!(why.contains("goodbye"), "{why}");
    assert_eq!(
        secondary.stats().writes,
        2,
        "the gathered write was sent first"
    );
}
