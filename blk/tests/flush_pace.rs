//! The SVM paced by the primary's flushes (`SecondaryDisk::set_flush_lead`): an SVM flush
//! past the primary's waits, one within it does not, and a checkpoint lets every flush go
//! until the commit. The assertions count waits, never time them.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(10);

#[test]
fn an_svm_flush_ahead_of_the_primarys_waits_and_one_behind_does_not() {
    let (primary, secondary) = in_sync_pair(1 << 20);
    // Unpaced (the default): no flush waits.
    secondary.flush().unwrap();
    assert_eq!(secondary.flush_waits().0, 0);

    secondary.set_flush_lead(Some(0));
    std::thread::scope(|s| {
        // The primary has not flushed: the SVM's flush is ahead and waits...
        let svm = s.spawn(|| secondary.flush());
        // ...until the primary's flush arrives (or, on a very slow host, its bounded wait
        // ends first): either way it returns, and it waited.
        primary.write_at(0, &[1; 4096]).unwrap();
        primary.flush().unwrap();
        svm.join().unwrap().unwrap();
    });
    assert_eq!(secondary.flush_waits().0, 1);

    // A commit starts the count afresh on both sides: the primary's flushes since its
    // marker, the SVM's since the commit. Two primary flushes, then two SVM flushes: none
    // waits.
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    for i in 0..2u64 {
        primary.write_at(i * 4096, &[3; 4096]).unwrap();
        primary.flush().unwrap();
    }
    // The stream is in order: once the write after the flushes has landed, so have they.
    primary.write_at(8192, &[4; 4096]).unwrap();
    wait_for(T, "the primary's flushes", || secondary.stats().writes >= 4);
    secondary.flush().unwrap();
    secondary.flush().unwrap();
    assert_eq!(
        secondary.flush_waits().0,
        1,
        "within the primary's: no wait"
    );
}

#[test]
fn a_checkpoint_lets_every_svm_flush_go_until_the_commit() {
    let (primary, secondary) = in_sync_pair(1 << 20);
    secondary.set_flush_lead(Some(0));
    // A checkpoint starts: flushes ahead of the primary's go at once until the commit.
    secondary.release_flushes();
    for _ in 0..3 {
        secondary.flush().unwrap();
    }
    assert_eq!(secondary.flush_waits().0, 0);
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    // After the commit the SVM is paced again: a flush ahead waits, and a later
    // release_flushes (the next checkpoint) lets it go.
    std::thread::scope(|s| {
        let svm = s.spawn(|| secondary.flush());
        secondary.release_flushes();
        svm.join().unwrap().unwrap();
    });
    // It may have been released before it began to wait: then it did not wait at all.
    assert!(secondary.flush_waits().0 <= 1);
    // Off again: nothing waits.
    secondary.set_flush_lead(None);
    primary.checkpoint_barrier(2, T).unwrap();
    secondary.commit(2, T).unwrap();
    let before = secondary.flush_waits().0;
    secondary.flush().unwrap();
    assert_eq!(secondary.flush_waits().0, before);
}
